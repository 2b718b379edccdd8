"""Pretrain a ViT backbone as a masked autoencoder (MAE) on unlabeled images, for APC.

    apc-pretrain --dataset synthetic --output_dir vit-mae-synthetic                      # tiny ViT from scratch
    apc-pretrain --dataset imagefolder --data_dir my_images --output_dir vit-mae-mine \\
        --model_name_or_path google/vit-base-patch16-224 --image_size 224                 # domain adaptation
    apc-train --recipe voc --data_dir data/VOCdevkit --model_name_or_path vit-mae-mine

APC classifies every patch token of the ViT, so it needs a backbone whose patch tokens keep *local* meaning. A ViT
trained from scratch on image labels alone learns whatever global shortcut separates the labels and often paints a
class on the background; a masked autoencoder must reconstruct each hidden patch from its neighbours, which is
exactly local evidence. The model is transformers' `ViTMAEForPreTraining` (random masking of `--mask_ratio` of the
patches, a light decoder, the pixel loss on the masked patches). The output folder is a plain `ViTModel`
(config.json + model.safetensors; ViTMAE's encoder uses ViTModel's parameter names under a `vit.` prefix), so
`ViTModel.from_pretrained(OUT, add_pooling_layer=False)`, `APCForSemanticSegmentation.from_pretrained_backbone(OUT)`
and `apc-train --model_name_or_path OUT` load it with no missing weights. The full MAE (with its decoder) is kept in
OUT/mae, so a later run can continue pretraining from it.

The loop follows apc-train's conventions: Accelerate, `--mixed_precision`, `accelerator.save_state` checkpoints in
OUT/checkpoints/step_N with an exact `--resume_from_checkpoint latest`, tqdm, and `--report_to tensorboard`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .cli import OneLineParser, add_preprocessing_num_workers, non_negative_int, positive_int, usable_mixed_precision

def _synthetic_backbone() -> dict[str, Any]:
    """The synthetic recipe's tiny ViT: the one apc-train trains on, defined once in its RECIPES."""
    from .train import RECIPES

    return dict(RECIPES["synthetic"]["backbone"])


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="apc-pretrain", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data (unlabeled: only the images are read)")
    g.add_argument("--dataset", choices=("voc", "coco", "synthetic", "imagefolder"), default="synthetic")
    g.add_argument("--data_dir", help="VOCdevkit, COCO root, or any folder of images (searched recursively).")
    g.add_argument("--train_split", default=None,
                   help="voc: train_aug if present, else train; coco: train; synthetic: train.")
    g.add_argument("--num_train_images", type=positive_int, default=1024,
                   help="Synthetic only: images generated (the same as apc-train's train split for the seed).")
    g.add_argument("--image_size", type=positive_int, default=None,
                   help="Training crop (a multiple of the patch size). Default: the backbone's image_size.")
    g.add_argument("--num_workers", type=non_negative_int, default=0, help="DataLoader workers (persistent).")
    g.add_argument("--skip_bad_images", action="store_true")
    add_preprocessing_num_workers(g)
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", default=None,
                   help="Continue from a ViT (or ViTMAE, e.g. a previous OUT/mae) checkpoint; default: from scratch.")
    g.add_argument("--backbone_overrides", default="",
                   help='ViTConfig fields of a backbone from scratch, e.g. "hidden_size=32,num_hidden_layers=1".')
    g.add_argument("--mask_ratio", type=float, default=0.75, help="Fraction of patches hidden from the encoder.")
    g.add_argument("--norm_pix_loss", action="store_true",
                   help="Reconstruct per-patch normalised pixels (MAE paper's better-features option).")
    g.add_argument("--decoder_hidden_size", type=positive_int, default=None, help="Default: half the encoder.")
    g.add_argument("--decoder_num_hidden_layers", type=positive_int, default=2)
    g.add_argument("--decoder_num_attention_heads", type=positive_int, default=None,
                   help="Default: the encoder's head count.")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max_train_steps", type=positive_int, default=1000)
    g.add_argument("--per_device_train_batch_size", type=positive_int, default=32)
    g.add_argument("--learning_rate", type=float, default=1.5e-3)
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--warmup_steps", type=int, default=100, help="Linear warm-up, then cosine decay to 0.")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no",
                   help="Falls back to 'no' on a CPU.")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--output_dir", default="vit-mae")
    g.add_argument("--checkpointing_steps", type=positive_int, default=500)
    g.add_argument("--checkpoints_total_limit", type=positive_int, default=2)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoints/step_N folder.")
    g.add_argument("--logging_steps", type=positive_int, default=50)
    g.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all, or none.")
    g.add_argument("--quiet", action="store_true", help="No progress bar (e.g. when apc-train runs it).")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset != "synthetic" and not args.data_dir:
        parser.error(f"--data_dir is required for --dataset {args.dataset}")
    if args.data_dir and not Path(args.data_dir).is_dir():
        parser.error(f"--data_dir {args.data_dir} does not exist")
    if not 0.0 <= args.mask_ratio < 1.0:
        parser.error(f"--mask_ratio {args.mask_ratio} must be in [0, 1)")
    if args.backbone_overrides and args.model_name_or_path:
        parser.error("--backbone_overrides applies to a backbone from scratch, not to --model_name_or_path")
    try:
        args.mixed_precision = usable_mixed_precision(args.mixed_precision, flag_given=True)
    except ValueError as error:
        parser.error(str(error))
    return args


# --------------------------------------------------------------------------------------------------- data


def load_images(args):
    """A `datasets.Dataset` with an `image` column (and `image_id`, which keys each sample's augmentation RNG)."""
    import datasets

    if args.dataset == "synthetic":
        from .data.synthetic import make_synthetic

        # Same generator call as apc-train's synthetic recipe, so "the training images" are the same images.
        size = args.image_size or _synthetic_backbone()["image_size"]
        data = make_synthetic(num_train=args.num_train_images, num_val=0, num_test=0, image_size=size, seed=args.seed)
        return data["train"].select_columns(["image", "image_id"])
    if args.dataset == "voc":
        from .data.voc import default_train_split, load_voc

        split = args.train_split or default_train_split(args.data_dir)
        data = load_voc(args.data_dir, splits=[split], skip_bad_images=args.skip_bad_images,
                        num_proc=args.preprocessing_num_workers)
        return data[split].select_columns(["image", "image_id"])
    if args.dataset == "coco":
        from .data import load_coco

        split = args.train_split or "train"
        data = load_coco(args.data_dir, splits=[split], skip_bad_images=args.skip_bad_images,
                         num_proc=args.preprocessing_num_workers)
        return data[split].select_columns(["image", "image_id"])
    root = Path(args.data_dir)
    paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise SystemExit(f"apc-pretrain: error: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    ids = [str(Path(p).relative_to(root)) for p in paths]
    return datasets.Dataset.from_dict({"image": paths, "image_id": ids}).cast_column("image", datasets.Image())


class MAETransform:
    """apc-train's geometry and colour augmentation without a mask; per-sample RNG = f(seed, epoch, image_id)."""

    def __init__(self, image_size: int, seed: int):
        from .data.transforms import TrainTransform

        # A milder rescale than segmentation training: MAE reconstructs pixels, and padded (mean-colour) margins are
        # trivially reconstructed patches that teach nothing.
        self.inner = TrainTransform(crop_size=image_size, scale_range=(0.8, 1.6), color_jitter=(0.2, 0.2, 0.2),
                                    seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __call__(self, batch: dict) -> dict:
        pixel_values = [self.inner.apply(image, None, self.inner.rng_for(key))["pixel_values"]
                        for image, key in zip(batch["image"], batch["image_id"])]
        return {"pixel_values": pixel_values}


def collate(samples: list[dict]) -> dict:
    return {"pixel_values": torch.stack([s["pixel_values"] for s in samples])}


# --------------------------------------------------------------------------------------------------- model


def build_mae(args):
    """`ViTMAEForPreTraining` from scratch, from a ViTMAE checkpoint, or with its encoder loaded from a ViT one."""
    from transformers import AutoConfig, ViTConfig, ViTMAEConfig, ViTMAEForPreTraining, ViTModel

    def mae_config(vit: dict) -> ViTMAEConfig:
        fields = {k: v for k, v in vit.items() if k in ViTMAEConfig().to_dict() and k not in ("model_type",
                                                                                              "architectures")}
        if args.image_size:
            fields["image_size"] = args.image_size
        hidden = fields.get("hidden_size", 768)
        heads = fields.get("num_attention_heads", 12)
        decoder_hidden = args.decoder_hidden_size or max(heads, (hidden // 2) // heads * heads)
        return ViTMAEConfig(**fields, mask_ratio=args.mask_ratio, norm_pix_loss=args.norm_pix_loss,
                            decoder_hidden_size=decoder_hidden,
                            decoder_num_hidden_layers=args.decoder_num_hidden_layers,
                            decoder_num_attention_heads=args.decoder_num_attention_heads or heads,
                            decoder_intermediate_size=2 * decoder_hidden)

    path = args.model_name_or_path
    if path is None:
        from .train import parse_backbone_overrides

        vit = ViTConfig(**parse_backbone_overrides(_synthetic_backbone(), args.backbone_overrides)).to_dict()
        return ViTMAEForPreTraining(mae_config(vit))
    source = AutoConfig.from_pretrained(path)
    if source.model_type == "vit_mae":
        return ViTMAEForPreTraining.from_pretrained(path, mask_ratio=args.mask_ratio, norm_pix_loss=args.norm_pix_loss)
    if source.model_type != "vit":
        raise SystemExit(f"apc-pretrain: error: --model_name_or_path {path} is a {source.model_type!r} checkpoint; "
                         "expected a ViT or ViTMAE one")
    vit = ViTModel.from_pretrained(path, add_pooling_layer=False)
    model = ViTMAEForPreTraining(mae_config(vit.config.to_dict()))
    state = vit.state_dict()
    if args.image_size and args.image_size != vit.config.image_size:
        # Resample the learned position embeddings to the new crop once (ViT's bicubic interpolation).
        with torch.no_grad():
            grid = vit.embeddings.interpolate_pos_encoding(
                torch.zeros(1, 1 + (args.image_size // vit.config.patch_size) ** 2, vit.config.hidden_size),
                args.image_size, args.image_size)
        state["embeddings.position_embeddings"] = grid
    result = model.vit.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SystemExit(f"apc-pretrain: error: {path} does not match ViTMAE's encoder: missing "
                         f"{result.missing_keys}, unexpected {result.unexpected_keys}")
    return model


def vit_from_mae(mae):
    """The MAE encoder as a plain `ViTModel` (no pooler): same parameter names without the `vit.` prefix.

    ViTMAE's encoder differs from ViT's only in masking (dropped tokens, no mask token) and in its position
    embeddings being fixed sin-cos; without `noise`/masking at inference they compute the same function."""
    from transformers import ViTConfig, ViTModel

    source = mae.config.to_dict()
    fields = {k: source[k] for k in ViTConfig().to_dict() if k in source and k not in ("model_type", "architectures",
                                                                                       "transformers_version")}
    vit = ViTModel(ViTConfig(**fields), add_pooling_layer=False)
    encoder = {k[len("vit."):]: v for k, v in mae.state_dict().items() if k.startswith("vit.")}
    vit.load_state_dict(encoder, strict=True)  # any difference in names is an error, never silently random weights
    return vit


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------------- checkpoints

# Settings that change what a step computes; a resume must match them to be exact.
_RESUME_KEYS = ("dataset", "train_split", "num_train_images", "image_size", "model_name_or_path",
                "backbone_overrides", "mask_ratio", "norm_pix_loss", "decoder_hidden_size",
                "decoder_num_hidden_layers", "decoder_num_attention_heads", "per_device_train_batch_size",
                "learning_rate", "weight_decay", "warmup_steps", "seed", "mixed_precision", "max_train_steps")


def list_checkpoints(output_dir: Path) -> list[Path]:
    folder = output_dir / "checkpoints"
    found = [p for p in folder.glob("step_*") if (p / "mae_run.json").exists()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[-1]))


def _fingerprint(args) -> dict[str, Any]:
    return json.loads(json.dumps({k: getattr(args, k) for k in _RESUME_KEYS}))


# --------------------------------------------------------------------------------------------------- main


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Runs MAE pretraining as configured by `args` (see `build_parser`); returns the metrics it writes."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from .data.transforms import defer_stop_signals
    from .train import NonFiniteLossGuard, StopOnSignal, end_early, leave

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report_to = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)

    with accelerator.main_process_first():
        try:
            images = load_images(args)
        except (FileNotFoundError, ValueError) as error:  # the message names the folder or file and what to do
            raise SystemExit(f"apc-pretrain: error: {error}") from None
    model = build_mae(args)
    image_size = model.config.image_size
    if image_size % model.config.patch_size:
        raise SystemExit(f"apc-pretrain: error: image size {image_size} is not a multiple of the patch size "
                         f"{model.config.patch_size}")
    transform = MAETransform(image_size, args.seed)
    loader = torch.utils.data.DataLoader(
        images.with_transform(transform), batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True,
        num_workers=args.num_workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
        persistent_workers=args.num_workers > 0, worker_init_fn=defer_stop_signals,
        generator=torch.Generator().manual_seed(args.seed),
    )
    if len(loader) == 0:
        raise SystemExit(f"apc-pretrain: error: {len(images)} images, fewer than one batch of "
                         f"--per_device_train_batch_size {args.per_device_train_batch_size}")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:  # ViTMAE's sin-cos position embeddings are frozen
            (decay if param.ndim >= 2 and "token" not in name else no_decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.learning_rate, betas=(0.9, 0.95))
    scheduler = cosine_schedule(optimizer, args.warmup_steps, args.max_train_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    updates_per_epoch = len(loader)

    fingerprint = _fingerprint(args)
    global_step, history = 0, []
    if args.resume_from_checkpoint:
        checkpoints = list_checkpoints(output_dir)
        checkpoint = (checkpoints[-1] if checkpoints else None) if args.resume_from_checkpoint == "latest" \
            else Path(args.resume_from_checkpoint)
        if checkpoint is not None:
            saved = json.loads((checkpoint / "mae_run.json").read_text())
            changed = [k for k in _RESUME_KEYS if saved["fingerprint"].get(k) != fingerprint.get(k)]
            if changed:
                raise SystemExit(f"apc-pretrain: error: {checkpoint} was made with other settings ({', '.join(changed)})"
                                 "; resume with the same flags or start a new --output_dir")
            accelerator.load_state(str(checkpoint))
            global_step, history = saved["step"], saved["history"]
            accelerator.print(f"Resumed from {checkpoint} at step {global_step}.")
    if report_to:
        accelerator.init_trackers("apc-pretrain", config={k: v for k, v in vars(args).items()
                                                          if isinstance(v, (int, float, str, bool))})
    accelerator.print(f"apc-pretrain: {args.dataset}, {len(images)} images of {image_size} px, "
                      f"{args.max_train_steps} steps of {args.per_device_train_batch_size} x "
                      f"{accelerator.num_processes}, mask ratio {args.mask_ratio}, output {output_dir}")

    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="apc-pretrain",
                    disable=args.quiet or not accelerator.is_local_main_process)
    start = time.time()
    loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
    nonfinite = NonFiniteLossGuard(accelerator, "apc-pretrain", global_step, lambda: list_checkpoints(output_dir))

    def save_checkpoint():
        path = output_dir / "checkpoints" / f"step_{global_step}"
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            (path / "mae_run.json").write_text(json.dumps(
                {"step": global_step, "fingerprint": fingerprint, "history": history}, indent=2))
            for old in list_checkpoints(output_dir)[:-args.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    model.train()
    with StopOnSignal(accelerator) as stop:  # Ctrl-C / SIGTERM: finish the step, save it, exit (as apc-train)
        epoch = global_step // updates_per_epoch
        while global_step < args.max_train_steps and not nonfinite.stopped and not stop.stopped:
            transform.set_epoch(epoch)
            loader.set_epoch(epoch)
            batches = loader
            skip = global_step - epoch * updates_per_epoch
            if skip:  # mid-epoch resume: the seedable sampler replays this epoch's order minus the batches done
                batches = accelerator.skip_first_batches(loader, skip)
            for batch in stop.batches(batches):
                # Masking noise comes from the global torch RNG, which save_state/load_state restore exactly.
                loss = model(pixel_values=batch["pixel_values"]).loss
                accelerator.backward(loss)
                nonfinite.update(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                progress.update(1)
                loss_sum += loss.detach()
                loss_count += 1
                looks = global_step % args.logging_steps == 0 or global_step % args.checkpointing_steps == 0
                if (looks or global_step >= args.max_train_steps) and nonfinite.check(global_step):
                    break  # the host reads the device there anyway
                if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                    mean_loss = (loss_sum / loss_count).item()
                    history.append({"step": global_step, "loss": mean_loss})
                    accelerator.log({"mae/loss": mean_loss, "lr": scheduler.get_last_lr()[0]}, step=global_step)
                    progress.set_postfix(loss=f"{mean_loss:.4f}")
                    loss_sum.zero_()
                    loss_count = 0
                if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
                    save_checkpoint()
                if global_step >= args.max_train_steps or stop.check(looks):
                    break
            epoch += 1
    progress.close()
    if nonfinite.stopped or stop.stopped:
        if stop.stopped and global_step % args.checkpointing_steps:  # else the loop has just saved this step
            save_checkpoint()
        del model  # the DDP wrapper; `end_early` releases the accelerator's reference
        if nonfinite.stopped:
            end_early(accelerator, nonfinite.message, 1)
        end_early(accelerator, stop.message("apc-pretrain", global_step, args.max_train_steps, output_dir),
                  128 + stop.signum)

    accelerator.wait_for_everyone()
    metrics = {"final_loss": history[-1]["loss"] if history else None, "train_steps": global_step,
               "train_seconds": round(time.time() - start, 1), "history": history}
    if accelerator.is_main_process:
        mae = accelerator.unwrap_model(model)
        vit_from_mae(mae).save_pretrained(output_dir)
        mae.save_pretrained(output_dir / "mae")
        (output_dir / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2))
        accelerator.print(f"MAE loss {metrics['final_loss']}; ViT backbone saved to {output_dir}")
    accelerator.wait_for_everyone()  # no process tears the group down while the main one is still saving
    del model  # the DDP wrapper; `leave` releases the accelerator's reference
    leave(accelerator)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    pretrain(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
