"""Where does a trained APC model put each class? Image-level AUC and patch-level confusion on synthetic val.

    python bench/patch_diagnosis.py apc-synthetic            # a folder written by apc-train --recipe synthetic

Prints, per class, the mean pooled image score of images with and without it and the AUC of that score, then for
the patches of each true class (mask downsampled to the patch grid by nearest) how often the patch classifier's
argmax picks each class. A class that is recognised (high AUC) but whose own patches go to background while
background patches go to it is "swapped with the background".

    python bench/patch_diagnosis.py apc-synthetic --figure dots.png --figure_class 2   # + a picture of the failure

With `--figure`, writes a PNG with one row per val image holding `--figure_class`: image, true mask, patch-classifier
argmax, the class's patch probability (white = 1), the pseudo-labels (white = ignored) and the decoder's prediction.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from apc_seg import APCForSemanticSegmentation
from apc_seg.data.synthetic import make_synthetic
from apc_seg.data.transforms import EvalTransform, class_labels_to_multi_hot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic dataset the model trained on.")
    parser.add_argument("--num_val_images", type=int, default=256)
    parser.add_argument("--figure", help="Also write a PNG of predictions on images holding --figure_class.")
    parser.add_argument("--figure_class", type=int, default=1)
    parser.add_argument("--figure_rows", type=int, default=6)
    args = parser.parse_args()

    model = APCForSemanticSegmentation.from_pretrained(args.model).eval()
    num_labels = model.config.num_labels
    val = make_synthetic(num_train=0, num_val=args.num_val_images, num_test=0,
                         image_size=model.config.backbone_config.image_size, seed=args.seed)["val"]
    transform = EvalTransform()
    pixel_values = torch.stack([transform.apply(ex["image"])["pixel_values"] for ex in val])
    masks = torch.stack([torch.as_tensor(np.array(ex["mask"])) for ex in val]).long()
    labels = torch.stack([class_labels_to_multi_hot(ex["class_labels"], num_labels) for ex in val])
    with torch.no_grad():
        out = model(pixel_values)
    for c in range(1, num_labels):
        pos, neg = out.image_scores[labels[:, c] == 1, c], out.image_scores[labels[:, c] == 0, c]
        auc = (pos[:, None] > neg[None, :]).float().mean().item()
        print(f"{model.config.id2label[c]:>12}: image score with {pos.mean():.2f}, without {neg.mean():.2f}, "
              f"AUC {auc:.3f}")
    grid = out.patch_logits.shape[-2:]
    patch_truth = F.interpolate(masks[:, None].float(), size=grid, mode="nearest")[:, 0].long()
    predicted = out.patch_logits.argmax(1)
    names = [model.config.id2label[i] for i in range(num_labels)]
    print("patches of true class -> predicted class counts", names)
    for c in range(num_labels):
        counts = torch.bincount(predicted[patch_truth == c], minlength=num_labels).tolist()
        print(f"{names[c]:>12}: {counts}")
    if args.figure:
        rows = [i for i in range(len(val)) if labels[i, args.figure_class] == 1][: args.figure_rows]
        write_figure(args.figure, model, pixel_values[rows], masks[rows], labels[rows], out, rows, args.figure_class)


def write_figure(path, model, pixel_values, masks, labels, out, rows, cls) -> None:
    from PIL import Image

    from apc_seg.labels import IGNORE_INDEX, VOC_PALETTE

    palette = np.array(VOC_PALETTE, dtype=np.uint8).reshape(-1, 3)
    palette[IGNORE_INDEX] = 255
    size = pixel_values.shape[-2:]

    def up(x, mode="nearest"):
        return F.interpolate(x, size=size, mode=mode)

    with torch.no_grad():
        probs = out.patch_logits[rows].softmax(1)
        pseudo = model.pseudo_labels(pixel_values, labels)
    image = ((pixel_values * 0.5 + 0.5).clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).numpy()
    heat = (up(probs[:, cls: cls + 1])[:, 0].clamp(0, 1) * 255).byte().numpy()
    panels = [image, palette[masks.numpy()], palette[up(probs).argmax(1).numpy()], np.stack([heat] * 3, -1),
              palette[pseudo.numpy()], palette[up(out.logits[rows], "bilinear").argmax(1).numpy()]]
    picture = np.concatenate([np.concatenate(list(panel), 0) for panel in panels], 1)
    Image.fromarray(picture).save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
