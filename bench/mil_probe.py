"""Probe: can the synthetic recipe's tiny ViT learn the classes from image labels (MIL), and from patch labels?

    python bench/mil_probe.py 1e-3 600                          # the recipe's model, image labels only (BCE)
    python bench/mil_probe.py 1e-3 400 sup=1                    # same model, per-patch labels from the true masks
    python bench/mil_probe.py 1e-3 600 bb=OUT_OF_APC_PRETRAIN r=0.0    # MAE backbone, frozen
    python bench/mil_probe.py 1e-3 500 pooling=max              # any APCConfig field; ps=, sr=lo;hi also
    python bench/mil_probe.py 1e-3 600 backbone_stem=patch      # ViT's linear patch embedding instead of the stem

A bare loop (no decoder loss, no schedule beyond a 50-step linear warm-up, one thread is enough) so the question
"does the classifier learn at all" is answered in a minute. Every 50 steps it prints the mean training loss, and
how often the label-masked, max-normalised patch argmax (the pseudo-label rule before PAR) names the true class of a
foreground patch (`fg`) and of a background patch (`bg`). The BCE of a model that has learned nothing (each
foreground class scored 0.5, background 1) is 0.52.

Arguments: learning rate, steps, then FIELD=VALUE: APCConfig fields, `bb` (a ViT folder to start from), `r` (backbone
learning-rate ratio, default 1.0), `ps` (patch size, default 8), `sr` (rescale range of the augmentation,
default 0.5;2.0), `sup=1` (train on per-patch majority labels from the masks instead: an upper bound).
"""

import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from apc_seg.configuration_apc import APCConfig
from apc_seg.data.synthetic import make_synthetic
from apc_seg.data.transforms import TrainTransform, collate_fn
from apc_seg.labels import SYNTHETIC_CLASSES
from apc_seg.modeling_apc import APCForSemanticSegmentation
from apc_seg.train import RECIPES


def parse_value(value: str):
    if "." in value:
        return float(value)
    return int(value) if value.isdigit() else value


def main() -> None:
    torch.manual_seed(0)
    lr, steps = float(sys.argv[1]), int(sys.argv[2])
    raw = dict(a.split("=") for a in sys.argv[3:])
    options = {k: parse_value(v) for k, v in raw.items() if k != "sr"}
    scale_range = tuple(float(x) for x in raw.get("sr", "0.5;2.0").split(";"))
    data = make_synthetic(num_train=1024, num_val=0, num_test=0, image_size=96, seed=0)["train"]
    transform = TrainTransform(crop_size=96, seed=0, scale_range=scale_range)
    loader = torch.utils.data.DataLoader(data.with_transform(transform), batch_size=16, shuffle=True, drop_last=True,
                                         collate_fn=partial(collate_fn, num_labels=4))
    patch = int(options.pop("ps", 8))
    supervised = int(options.pop("sup", 0))
    backbone = options.pop("bb", None)
    ratio = float(options.pop("r", "1.0"))
    recipe = RECIPES["synthetic"]
    # A ViT folder (bb=) keeps its own linear patch embedding; a backbone from scratch gets the recipe's stem.
    options.setdefault("backbone_stem", "patch" if backbone else recipe["backbone_stem"])
    config = APCConfig(backbone_config=dict(recipe["backbone"], patch_size=patch),
                       id2label=dict(enumerate(SYNTHETIC_CLASSES)), decoder_hidden_size=64, decoder_dilation=2,
                       pcl_max_patches=64, **options)
    model = (APCForSemanticSegmentation.from_pretrained_backbone(backbone, config=config) if backbone
             else APCForSemanticSegmentation(config))
    groups = [{"params": [p for n, p in model.named_parameters() if n.startswith("vit.")], "base": lr * ratio},
              {"params": [p for n, p in model.named_parameters() if not n.startswith("vit.")], "base": lr}]
    optimizer = torch.optim.AdamW([dict(g, lr=g["base"]) for g in groups], weight_decay=0.01)

    step, start, loss_sum, fg_hits, bg_hits = 0, time.time(), 0.0, [], []
    while step < steps:
        for batch in loader:
            out = model(pixel_values=batch["pixel_values"], class_labels=batch["class_labels"], use_seg_loss=False)
            for group in optimizer.param_groups:
                group["lr"] = group["base"] * min(1.0, (step + 1) / 50)
            with torch.no_grad():
                labels = batch["pixel_labels"].clone()
                labels[labels == 255] = 0
                one_hot = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
                target = F.avg_pool2d(one_hot, patch).argmax(1)  # each patch's majority class
                probs = out.patch_logits.softmax(1) * batch["class_labels"][:, :, None, None]
                probs = probs / probs.amax((2, 3), keepdim=True).clamp_min(1e-6)
                guess = probs.argmax(1)
                fg_hits.append(((guess == target) & (target > 0)).sum().item() / max(1, (target > 0).sum().item()))
                bg_hits.append(((guess == 0) & (target == 0)).sum().item() / max(1, (target == 0).sum().item()))
            loss = F.cross_entropy(out.patch_logits, target) if supervised else out.loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            loss_sum += loss.item() if supervised else out.loss_terms["cls"].item()
            if step % 50 == 0:
                print(step, round(loss_sum / 50, 4), "fg", round(sum(fg_hits) / len(fg_hits), 3),
                      "bg", round(sum(bg_hits) / len(bg_hits), 3), round(time.time() - start), flush=True)
                loss_sum, fg_hits, bg_hits = 0.0, [], []
            if step >= steps:
                break


if __name__ == "__main__":
    main()
