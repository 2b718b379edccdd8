"""Train APC with Accelerate, in one stage, from image-level labels.

    apc-train --recipe synthetic                                   # built-in data, 2 CPU cores, a few minutes
    apc-train --recipe voc --data_dir data/VOCdevkit --model_name_or_path google/vit-base-patch16-224
    accelerate launch --num_processes 4 -m apc_seg.train --recipe coco --data_dir data/coco ...

A recipe sets every default; any flag overrides it. The loop is plain and reads top to bottom: data, model,
optimiser, schedule, resume, steps (with checkpoints and validation), then the saved model, metrics and card.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import torch

from .cli import OneLineParser, add_preprocessing_num_workers, non_negative_int, positive_int, usable_mixed_precision

RECIPES: dict[str, dict[str, Any]] = {
    # ToCo/APC VOC setting: train_aug, 448 crops, global batch 8, 20k steps, 1.5k warm-up, bf16 on GPU.
    "voc": dict(
        dataset="voc", train_split=None, val_split="val", output_dir="apc-voc",
        model_name_or_path="google/vit-base-patch16-224", backbone=None, backbone_stem="patch",
        max_train_steps=20_000, per_device_train_batch_size=8, learning_rate=6e-5, backbone_lr_ratio=0.1,
        weight_decay=0.01, warmup_steps=1500, seg_warmup_steps=1500, crop_size=448, mixed_precision="bf16",
        checkpointing_steps=2000, eval_steps=2000, eval_max_images=None, pseudo_eval_max_images=500,
        logging_steps=50, num_workers=8, config_overrides="",
    ),
    "coco": dict(
        dataset="coco", train_split="train", val_split="val", output_dir="apc-coco",
        model_name_or_path="google/vit-base-patch16-224", backbone=None, backbone_stem="patch",
        max_train_steps=80_000, per_device_train_batch_size=8, learning_rate=6e-5, backbone_lr_ratio=0.1,
        weight_decay=0.01, warmup_steps=1500, seg_warmup_steps=1500, crop_size=448, mixed_precision="bf16",
        checkpointing_steps=5000, eval_steps=10_000, eval_max_images=5000, pseudo_eval_max_images=500,
        logging_steps=50, num_workers=8, config_overrides="",
    ),
    # A tiny ViT from scratch on the built-in synthetic data: the quick start, the tests and the learning bench.
    "synthetic": dict(
        dataset="synthetic", train_split="train", val_split="val", output_dir="apc-synthetic",
        model_name_or_path=None,
        backbone=dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=3, intermediate_size=192,
                      patch_size=8, image_size=96),
        # A convolutional stem instead of the linear patch embedding: the from-scratch ViT then sees texture, not
        # only hue, from the first step (test mIoU 45 -> 78; with its convolutions He-initialised, the model
        # default, no seed of 12 fails; docs/benchmarks.md, "Learning").
        backbone_stem="conv",
        # A backbone from scratch learns at the new layers' rate (the 0.1 ratio is for pretrained weights). With the
        # stem the patch classifier localises within 300 steps, so the decoder starts there; 700 steps in all:
        # trained longer the classifier keeps fitting the image labels and its pseudo-labels spread (val pseudo
        # mIoU 86 at step 900, 77 at 1500; the decoder followed). docs/benchmarks.md, "Learning".
        max_train_steps=700, per_device_train_batch_size=16, learning_rate=1e-3, backbone_lr_ratio=1.0,
        weight_decay=0.01, warmup_steps=60, seg_warmup_steps=300, crop_size=96, mixed_precision="no",
        checkpointing_steps=500, eval_steps=300, eval_max_images=None, pseudo_eval_max_images=256,
        logging_steps=20, num_workers=0,
        config_overrides="decoder_hidden_size=64,decoder_dilation=2,pcl_max_patches=64,par_dilations=1;2;4",
        num_train_images=1024, num_val_images=256,
        # MAE pretraining of the from-scratch ViT before APC (apc-pretrain); off: with the linear patch embedding
        # it raised the mean but lost a class in 2 of 3 seeds, and the conv stem does better without it
        # (docs/benchmarks.md, "Learning").
        mae_pretrain_steps=0,
    ),
}

# Flags whose default comes from the recipe (argparse default None means "take the recipe's").
_RECIPE_KEYS = sorted({key for recipe in RECIPES.values() for key in recipe} - {"backbone"})


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="apc-train", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="synthetic",
                   help="Sets every default below (see docs/training.md); any flag overrides it.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=("voc", "coco", "synthetic"), help="Recipe default.")
    g.add_argument("--data_dir", help="VOCdevkit (VOC) or COCO root; not needed for synthetic.")
    g.add_argument("--train_split", help="VOC: train_aug when SBD masks are present, else train.")
    g.add_argument("--val_split", help="Validation split (masks needed).")
    g.add_argument("--num_train_images", type=positive_int, help="Synthetic only: images generated for train.")
    g.add_argument("--num_val_images", type=positive_int, help="Synthetic only: images generated for val.")
    g.add_argument("--crop_size", type=positive_int, help="Training crop (a multiple of the patch size).")
    g.add_argument("--num_workers", type=non_negative_int,
                   help="DataLoader workers per process (persistent; validation decodes with as many).")
    g.add_argument("--skip_bad_images", action="store_true", help="Skip unreadable images with a warning.")
    add_preprocessing_num_workers(g)
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path",
                   help="A ViT checkpoint (new APC model on it) or an APC checkpoint (continue); 'none' = scratch.")
    g.add_argument("--config_overrides", help='APCConfig fields, e.g. "akp_ratio=0.6,pooling=max" (lists: 1;2;4).')
    g.add_argument("--backbone_overrides",
                   help='Advanced: ViTConfig fields of a backbone trained from scratch (synthetic recipe), e.g. '
                        '"hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64" for '
                        'tests and smoke runs.')
    g.add_argument("--backbone_stem", choices=("patch", "conv"),
                   help="Patch embedding of a backbone trained from scratch: 'conv' (a convolutional stem, Xiao et "
                        "al. 2021) or 'patch' (ViT's linear one). Recipe default; a pretrained backbone "
                        "(--model_name_or_path, --mae_pretrain_steps) keeps its own patch embedding.")
    g.add_argument("--mae_pretrain_steps", type=int,
                   help="With no --model_name_or_path: first pretrain the from-scratch ViT as a masked autoencoder "
                        "(apc-pretrain) for this many steps on the training images, unlabeled, into "
                        "OUTPUT/mae_backbone, then train APC on it. 0 disables. Recipe default.")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max_train_steps", type=positive_int,
                   help="Optimizer updates in all. May be raised when resuming, to extend a run (see "
                        "--resume_from_checkpoint).")
    g.add_argument("--per_device_train_batch_size", type=positive_int)
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    g.add_argument("--learning_rate", type=float, help="Learning rate of the new layers.")
    g.add_argument("--backbone_lr_ratio", type=float, help="Backbone lr = learning_rate x this (paper: 0.1).")
    g.add_argument("--weight_decay", type=float)
    g.add_argument("--warmup_steps", type=int, help="Linear warm-up, then poly(0.9) decay.")
    g.add_argument("--seg_warmup_steps", type=int, help="Decoder loss switched on after this many steps.")
    g.add_argument("--max_grad_norm", type=float, default=None, help="Clip gradients (off by default).")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"),
                   help="Recipe default (bf16 for VOC/COCO; falls back to 'no' on a CPU for speed).")
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the model.")
    g = p.add_argument_group("checkpoints, evaluation, logging")
    g.add_argument("--output_dir")
    g.add_argument("--checkpointing_steps", type=positive_int)
    g.add_argument("--checkpoints_total_limit", type=positive_int, default=2)
    g.add_argument("--resume_from_checkpoint",
                   help="'latest' or a checkpoint folder. Restores model, optimiser, schedule, RNGs and data position, "
                        "so the result is bit-identical to an uninterrupted run. The other flags must match the "
                        "checkpoint's, except --max_train_steps: raising it extends the run (the poly decay then "
                        "stretches to the new end, so it is no longer identical to a straight run of either length).")
    g.add_argument("--eval_steps", type=positive_int, help="Validate every N steps (and at the end).")
    g.add_argument("--eval_max_images", type=positive_int, help="Validate on the first N images only.")
    g.add_argument("--pseudo_eval_max_images", type=positive_int,
                   help="Judge the pseudo-labels on the first N train images at the end.")
    g.add_argument("--logging_steps", type=positive_int)
    g.add_argument("--report_to", default="tensorboard",
                   choices=("tensorboard", "wandb", "comet_ml", "mlflow", "clearml", "dvclive", "aim", "all", "none"),
                   help="Experiment tracker (through Accelerate), or none.")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", help="Defaults to the output folder's name under your user.")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags -> namespace with the recipe's defaults filled in; bad input exits with one line naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    recipe = RECIPES[args.recipe]
    stem_given = args.backbone_stem is not None
    precision_given = args.mixed_precision is not None
    for key in _RECIPE_KEYS:
        if getattr(args, key, None) is None:
            setattr(args, key, recipe.get(key))
    if args.model_name_or_path in ("none", ""):
        args.model_name_or_path = None
    try:
        args.mixed_precision = usable_mixed_precision(args.mixed_precision, precision_given)
    except ValueError as error:
        parser.error(str(error))
    if args.dataset != "synthetic" and not args.data_dir:
        parser.error(f"--data_dir is required for --dataset {args.dataset} (see docs/data.md for the layout)")
    if args.data_dir and not Path(args.data_dir).is_dir():
        parser.error(f"--data_dir {args.data_dir} does not exist")
    try:
        args.config_overrides = parse_config_overrides(args.config_overrides)
    except ValueError as error:
        parser.error(f"--config_overrides: {error}")
    if args.model_name_or_path or args.mae_pretrain_steps:
        if stem_given and args.backbone_stem != "patch":
            pretrained = (f"--model_name_or_path {args.model_name_or_path}" if args.model_name_or_path
                          else f"--mae_pretrain_steps {args.mae_pretrain_steps}")
            parser.error(f"--backbone_stem {args.backbone_stem} applies to a backbone trained from scratch; with "
                         f"{pretrained} the backbone keeps its own patch embedding (drop --backbone_stem)")
        args.backbone_stem = None  # the checkpoint's (a ViT's is 'patch'; an APC checkpoint's is in its config)
    if args.backbone_overrides and args.model_name_or_path:
        parser.error("--backbone_overrides applies to a backbone trained from scratch, not to "
                     f"--model_name_or_path {args.model_name_or_path}")
    try:
        args.backbone = parse_backbone_overrides(recipe.get("backbone"), args.backbone_overrides)
    except ValueError as error:
        parser.error(f"--backbone_overrides: {error}")
    try:
        check_writable(Path(args.output_dir))
    except OSError as error:
        parser.error(f"--output_dir {args.output_dir} is not writable ({error.strerror or error})")
    resume = args.resume_from_checkpoint
    if resume not in (None, "latest") and not (Path(resume) / "apc_run.json").is_file():
        parser.error(f"--resume_from_checkpoint {resume} is not a complete apc-train checkpoint "
                     "(a checkpoints/step_N folder with apc_run.json)")
    return args


def check_writable(folder: Path) -> None:
    """Creates `folder` and a scratch file in it. `os.access` says yes to root even where writing fails, and a path
    below a regular file only fails at `mkdir`, so trying is the one reliable test, and it fails before training."""
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


def _parse_fields(text: str | None, defaults: dict[str, Any], example: str) -> dict[str, Any]:
    """`"a=1,b=x,c=1;2"` -> values typed like `defaults[key]`; unknown keys and bad values raise `ValueError`."""
    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in defaults:
            raise ValueError(f"{item!r} is not FIELD=VALUE with a known field (e.g. {example})")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                    raise ValueError(f"expected true or false, got {value!r}")
                overrides[key] = value.lower() in ("1", "true", "yes")
            elif isinstance(default, (list, tuple)):
                overrides[key] = [type(default[0])(v) for v in value.split(";")]
            elif isinstance(default, (int, float)):
                overrides[key] = type(default)(value)
            else:
                overrides[key] = value
        except ValueError as error:
            raise ValueError(f"{item!r}: {error}") from None
    return overrides


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """`"akp_ratio=0.6,pooling=max,par_dilations=1;2;4"` -> typed values, checked by `APCConfig.validate`."""
    from .configuration_apc import APCConfig

    tiny_backbone = {"hidden_size": 8, "num_attention_heads": 1}
    defaults = APCConfig(backbone_config=tiny_backbone).to_dict()
    for reserved in ("backbone_config", "id2label", "label2id", "backbone_stem"):
        defaults.pop(reserved)
    if any(item.split("=")[0].strip() == "backbone_stem" for item in (text or "").split(",")):
        raise ValueError("backbone_stem is set with --backbone_stem (it only applies to a backbone from scratch)")
    overrides = _parse_fields(text, defaults, "akp_ratio=0.6")
    APCConfig(backbone_config=tiny_backbone, **overrides)  # a bad value (akp_ratio=2) fails here, before any work
    return overrides


def parse_backbone_overrides(backbone: dict | None, text: str | None) -> dict | None:
    """The recipe's from-scratch ViT settings updated with `--backbone_overrides`."""
    if not text:
        return backbone
    from transformers import ViTConfig

    defaults = ViTConfig().to_dict()
    from .configuration_apc import APCConfig

    merged = {**(backbone or {}), **_parse_fields(text, defaults, "hidden_size=32")}
    config = ViTConfig(**merged)
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                         f"{config.num_attention_heads}")
    APCConfig(backbone_config=merged)  # e.g. the patch mixer needs hidden_size to be a multiple of 4
    return merged


# --------------------------------------------------------------------------------------------------- data


def load_datasets(args):
    """The recipe's train and validation splits in the apc-seg schema, and the dataset's class names."""
    from .labels import COCO_CLASSES, SYNTHETIC_CLASSES, VOC_CLASSES

    if args.dataset == "synthetic":
        from .data.synthetic import make_synthetic

        data = make_synthetic(num_train=args.num_train_images, num_val=args.num_val_images, num_test=0,
                              image_size=args.crop_size, seed=args.seed)
        return data["train"], data["val"], SYNTHETIC_CLASSES
    if args.dataset == "voc":
        from .data.voc import default_train_split, load_voc

        if args.train_split is None:
            args.train_split = default_train_split(args.data_dir)
        data = load_voc(args.data_dir, splits=[args.train_split, args.val_split],
                        skip_bad_images=args.skip_bad_images, num_proc=args.preprocessing_num_workers)
        return data[args.train_split], data[args.val_split], VOC_CLASSES
    from .data import load_coco

    data = load_coco(args.data_dir, splits=[args.train_split, args.val_split], skip_bad_images=args.skip_bad_images,
                     num_proc=args.preprocessing_num_workers)
    return data[args.train_split], data[args.val_split], COCO_CLASSES


# --------------------------------------------------------------------------------------------------- model


def build_model(args, class_names):
    from transformers import AutoConfig

    from .configuration_apc import APCConfig
    from .modeling_apc import APCForSemanticSegmentation

    id2label = dict(enumerate(class_names))
    path = args.model_name_or_path
    if path is not None:
        source_type = AutoConfig.from_pretrained(path).model_type
        if source_type == "apc":  # continue training an APC checkpoint
            model = APCForSemanticSegmentation.from_pretrained(path, **args.config_overrides)
            if model.config.num_labels != len(class_names):
                raise ValueError(f"--model_name_or_path {path} has {model.config.num_labels} labels but the "
                                 f"{args.dataset} dataset has {len(class_names)}")
            return model
        config = APCConfig(id2label=id2label, **args.config_overrides)
        return APCForSemanticSegmentation.from_pretrained_backbone(path, config=config, image_size=args.crop_size)
    config = APCConfig(backbone_config=args.backbone, backbone_stem=args.backbone_stem, id2label=id2label,
                       **args.config_overrides)
    return APCForSemanticSegmentation(config)


def pretrain_backbone(args) -> str:
    """Runs `apc-pretrain` on this run's training images (labels unused) and returns the ViT folder it writes.

    A ViT from scratch trained on image labels alone learns whatever global cue separates the labels; a masked
    autoencoder first makes its patch tokens describe their neighbourhood, which APC's patch classifier needs.
    Deterministic by seed, and reused when a resumed run finds it complete."""
    from .pretrain import main as pretrain_main

    folder = Path(args.output_dir) / "mae_backbone"
    done = folder / "pretrain_metrics.json"
    if done.is_file() and json.loads(done.read_text()).get("train_steps") == args.mae_pretrain_steps:
        return str(folder)
    argv = ["--dataset", args.dataset, "--output_dir", str(folder), "--max_train_steps", str(args.mae_pretrain_steps),
            "--image_size", str(args.crop_size), "--seed", str(args.seed), "--mixed_precision", args.mixed_precision,
            "--num_workers", str(args.num_workers), "--report_to", args.report_to,
            "--preprocessing_num_workers", str(args.preprocessing_num_workers),
            "--per_device_train_batch_size", str(args.per_device_train_batch_size),
            "--checkpointing_steps", str(10 ** 9)]
    if args.dataset == "synthetic":
        argv += ["--num_train_images", str(args.num_train_images)]
    else:
        argv += ["--data_dir", args.data_dir] + (["--train_split", args.train_split] if args.train_split else [])
    if args.backbone:
        argv += ["--backbone_overrides", ",".join(f"{k}={v}" for k, v in args.backbone.items())]
    if args.skip_bad_images:
        argv.append("--skip_bad_images")
    pretrain_main(argv)
    return str(folder)


def build_optimizer(model, args, fused: bool):
    """AdamW with the backbone at `learning_rate * backbone_lr_ratio` and no decay on biases and norms."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        backbone = name.startswith("vit.")
        decay = param.ndim >= 2 and "position_embeddings" not in name and "cls_token" not in name
        groups.setdefault((backbone, decay), []).append(param)
    param_groups = [
        {"params": params, "lr": args.learning_rate * (args.backbone_lr_ratio if backbone else 1.0),
         "weight_decay": args.weight_decay if decay else 0.0}
        for (backbone, decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=args.learning_rate, fused=fused or None)


def prefer_flash_attention(device: torch.device) -> None:
    """On a GPU, take PyTorch's flash / memory-efficient attention kernels rather than cuDNN's.

    PyTorch picks cuDNN's attention first on Hopper GPUs, and `torch.compile` then replaces it with batched matmuls
    and a softmax (bmm was a third of the compiled step's GPU time in the profile). Without it: 40.1 instead of 44.8
    ms per compiled step, 44.9 instead of 47.6 uncompiled (ViT-B 448, batch 8, bf16, H200; docs/benchmarks.md).
    Process-wide, as `apc-train` owns its process; cuDNN attention only ever ran in fp16 / bf16, so fp32 runs are
    unaffected. A no-op on a CPU.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def warmup_poly_schedule(optimizer, warmup_steps: int, total_steps: int, power: float = 0.9):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - progress) ** power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("_")[-1])


def list_checkpoints(output_dir: Path) -> list[Path]:
    folder = output_dir / "checkpoints"
    found = [p for p in folder.glob("step_*") if (p / "apc_run.json").exists()] if folder.is_dir() else []
    return sorted(found, key=_checkpoint_step)


# Settings that change what an optimiser step computes; a resume must use the checkpoint's values to be exact.
_RESUME_KEYS = ("dataset", "train_split", "crop_size", "num_train_images", "seed", "per_device_train_batch_size",
                "gradient_accumulation_steps", "learning_rate", "backbone_lr_ratio", "weight_decay", "warmup_steps",
                "seg_warmup_steps", "max_grad_norm", "mixed_precision")
# Settings a resume may change, with a warning that the run is no longer identical to an uninterrupted one:
# raising max_train_steps extends a run (the poly decay stretches to the new end), and another number of processes
# lets a run move to other hardware (each process then sees other samples).
_RESUME_MAY_CHANGE = ("max_train_steps", "num_processes")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_fingerprint(model, args, num_processes: int) -> dict[str, Any]:
    """What a resume must match: the model config and the settings above, as JSON would store them."""
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation"):
        config.pop(volatile, None)
        config.get("backbone_config", {}).pop(volatile, None)
    settings = {k: getattr(args, k) for k in _RESUME_KEYS + _RESUME_MAY_CHANGE if k != "num_processes"}
    settings["num_processes"] = num_processes
    # The JSON round trip makes it comparable with the saved copy (int dict keys such as id2label's become str).
    return json.loads(json.dumps({"config": _flatten(config), "args": settings}))


def check_resumable(checkpoint: Path, fingerprint: dict) -> list[str]:
    """Exits with one line naming what differs from the checkpoint's run; returns warnings for allowed changes."""
    from .configuration_apc import APCConfig

    saved = json.loads((checkpoint / "apc_run.json").read_text())["fingerprint"]
    # A checkpoint made before an APCConfig field existed behaved as that field's default does.
    field_defaults = {name: parameter.default for name, parameter in
                      inspect.signature(APCConfig.__init__).parameters.items()
                      if parameter.default is not inspect.Parameter.empty}
    warnings = []
    for part, what in (("config", "model config"), ("args", "run")):
        then, now = saved[part], fingerprint[part]
        for key in sorted(set(then) | set(now)):
            if then.get(key) == now.get(key):
                continue
            if part == "config" and key not in then and key in field_defaults and now[key] == field_defaults[key]:
                continue
            change = f"{key}: checkpoint {then.get(key)!r}, now {now.get(key)!r}"
            if part == "args" and key in _RESUME_MAY_CHANGE:
                warnings.append(f"{change}; the result will differ from an uninterrupted run")
                continue
            if part == "args" or key == "backbone_stem":
                flag = f"--{key}"
            else:
                flag = "--config_overrides/--backbone_overrides"
            raise SystemExit(f"apc-train: error: --resume_from_checkpoint {checkpoint} was made with a different "
                             f"{what} ({change}); resume with the checkpoint's {flag}, or start a new --output_dir.")
    return warnings


# --------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model_name_or_path is None and args.mae_pretrain_steps:
        args.model_name_or_path = pretrain_backbone(args)

    import datasets
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration,
                                  set_seed)
    from tqdm.auto import tqdm

    from .data.transforms import TrainTransform, collate_fn, defer_stop_signals
    from .evaluation import evaluate, launched_without_gpus
    from .image_processing_apc import APCImageProcessor

    output_dir = Path(args.output_dir)
    report_to = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        cpu=launched_without_gpus(),  # several processes on a machine without GPUs: gloo on the CPUs
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        # Sampling order = f(seed, epoch) only, so a resumed run draws the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # The decoder gets no gradient before --seg_warmup_steps; DDP must not wait for it.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if not accelerator.is_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)

    # Data
    with accelerator.main_process_first():
        try:
            train_set, val_set, class_names = load_datasets(args)
        except (FileNotFoundError, ValueError) as error:  # the message names the folder or file and what to do
            raise SystemExit(f"apc-train: error: {error}") from None
    num_labels = len(class_names)
    transform = TrainTransform(crop_size=args.crop_size, seed=args.seed)  # per-sample RNG = f(seed, epoch, image_id)
    train_loader = torch.utils.data.DataLoader(
        train_set.with_transform(transform), batch_size=args.per_device_train_batch_size, shuffle=True,
        drop_last=True, num_workers=args.num_workers, collate_fn=partial(collate_fn, num_labels=num_labels),
        pin_memory=torch.cuda.is_available(), persistent_workers=args.num_workers > 0,
        worker_init_fn=defer_stop_signals,  # Ctrl-C is the main process's to handle (StopOnSignal)
        # Its own generator: without one, every new iterator (each epoch, and the resumed one) draws the workers'
        # base seed from the global RNG, and a mid-epoch resume would then see other dropout and PCL draws.
        generator=torch.Generator().manual_seed(args.seed),
    )

    # Model, optimiser, schedule
    model = build_model(args, class_names)
    if model.config.pseudo_label_max_classes is None and "pseudo_label_max_classes" not in args.config_overrides:
        # Pseudo-labels and PAR then run on the present classes only (exact; ~3x cheaper on VOC's 21 labels).
        model.config.pseudo_label_max_classes = 1 + max(map(len, train_set["class_labels"]), default=0)
    if args.crop_size % model.config.patch_size:
        raise SystemExit(f"apc-train: error: --crop_size {args.crop_size} is not a multiple of the patch size "
                         f"{model.config.patch_size}")
    optimizer = build_optimizer(model, args, fused=torch.cuda.is_available())
    prefer_flash_attention(accelerator.device)
    scheduler = warmup_poly_schedule(optimizer, args.warmup_steps, args.max_train_steps)
    fingerprint = run_fingerprint(model, args, accelerator.num_processes)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if args.torch_compile:
        model = torch.compile(model)
    unwrapped = accelerator.unwrap_model(model)
    # With gradient accumulation the last update of an epoch may use fewer batches (accelerate syncs at its end).
    updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    if len(train_loader) == 0:
        raise SystemExit(f"apc-train: error: the training split has {len(train_set)} images, fewer than one "
                         f"batch of --per_device_train_batch_size {args.per_device_train_batch_size} per process")

    global_step, state = resume(accelerator, args, output_dir, fingerprint)
    if report_to:
        accelerator.init_trackers("apc", config={k: v for k, v in vars(args).items()
                                                 if isinstance(v, (int, float, str, bool))})
    accelerator.print(
        f"apc-train: {args.recipe} recipe, {len(train_set)} train / {len(val_set)} val images, "
        f"{args.max_train_steps} steps of {args.per_device_train_batch_size} x {accelerator.num_processes} "
        f"process(es) x {args.gradient_accumulation_steps} accumulation, {accelerator.device}, output {output_dir}"
    )

    # Train
    progress = tqdm(total=args.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="apc-train")
    start_time, images_seen, window_start = time.time(), 0, time.time()
    seconds_before = state.get("train_seconds", 0.0)  # of the runs before a resume
    val_result = None  # of the final step, when the loop evaluated it
    nonfinite = NonFiniteLossGuard(accelerator, "apc-train", global_step, lambda: list_checkpoints(output_dir))
    model.train()
    with StopOnSignal(accelerator) as stop:  # from its end on, a signal acts as usual again
        epoch = global_step // updates_per_epoch
        while global_step < args.max_train_steps and not nonfinite.stopped and not stop.stopped:
            transform.set_epoch(epoch)
            train_loader.set_epoch(epoch)
            loader = train_loader
            skip = (global_step - epoch * updates_per_epoch) * args.gradient_accumulation_steps
            if skip:  # resuming mid-epoch: the sampler replays this epoch's order, minus the batches already seen
                loader = accelerator.skip_first_batches(train_loader, skip)
            for batch in stop.batches(loader):
                with accelerator.accumulate(model):
                    out = model(pixel_values=batch["pixel_values"], class_labels=batch["class_labels"],
                                use_seg_loss=global_step >= args.seg_warmup_steps)
                    accelerator.backward(out.loss)
                    nonfinite.update(out.loss)
                    if args.max_grad_norm and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                images_seen += batch["pixel_values"].shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                progress.update(1)
                # The host reads the device at logging, validation, checkpoints and the end; first it checks that no
                # step since the last look had a NaN or infinite loss, so nothing trained on one is ever saved.
                looks = any(global_step % every == 0 for every in (args.logging_steps, args.eval_steps,
                                                                   args.checkpointing_steps))
                if (looks or global_step >= args.max_train_steps) and nonfinite.check(global_step):
                    break
                if global_step % args.logging_steps == 0:  # the only host-device syncs of the loop
                    elapsed = time.time() - window_start
                    logs = {f"loss/{k}": v.item() for k, v in out.loss_terms.items()}
                    logs.update({"loss/total": out.loss.item(), "lr": scheduler.get_last_lr()[-1],
                                 "images_per_second": images_seen / max(elapsed, 1e-9)})
                    progress.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items()})
                    accelerator.log(logs, step=global_step)
                    images_seen, window_start = 0, time.time()
                if global_step % args.eval_steps == 0 or global_step == args.max_train_steps:
                    val_result = validate(accelerator, unwrapped, val_set, args, output_dir, global_step, state,
                                          progress)
                    model.train()
                if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
                    state["train_seconds"] = seconds_before + time.time() - start_time
                    save_checkpoint(accelerator, output_dir, global_step, fingerprint, state,
                                    args.checkpoints_total_limit)
                if global_step >= args.max_train_steps or stop.check(looks):
                    break
            epoch += 1
    progress.close()
    train_seconds = seconds_before + time.time() - start_time
    if nonfinite.stopped or stop.stopped:
        if stop.stopped and global_step % args.checkpointing_steps:  # else the loop has just saved this step
            state["train_seconds"] = train_seconds
            save_checkpoint(accelerator, output_dir, global_step, fingerprint, state, args.checkpoints_total_limit)
        del model  # the DDP wrapper; `end_early` releases the accelerator's reference
        if nonfinite.stopped:
            end_early(accelerator, nonfinite.message, 1)
        end_early(accelerator, stop.message("apc-train", global_step, args.max_train_steps, output_dir),
                  128 + stop.signum)

    # Final model, metrics and card
    accelerator.wait_for_everyone()
    if val_result is None:  # resumed at or past the last step
        average_batchnorm_statistics(unwrapped, accelerator)
        val_result = evaluate(unwrapped, val_set, accelerator=accelerator, max_images=args.eval_max_images,
                              num_workers=args.num_workers)
    pseudo_result = evaluate(unwrapped, train_set, mode="pseudo", accelerator=accelerator,
                             max_images=args.pseudo_eval_max_images, num_workers=args.num_workers)
    status = 0
    if accelerator.is_main_process:
        status = finish(args, unwrapped, output_dir, class_names, val_result, pseudo_result, state, global_step,
                        train_seconds, accelerator.num_processes, APCImageProcessor)
    # All processes leave together: a process group torn down while another process is still saving can hang gloo.
    accelerator.wait_for_everyone()
    del model  # the DDP wrapper; `leave` releases the accelerator's reference
    leave(accelerator)
    return status


class StopOnSignal:
    """Ctrl-C (SIGINT) or a scheduler's notice (SIGTERM, e.g. SLURM before preemption) ends the run cleanly.

    The handler only records the signal; the loop finishes the optimiser step it is in, saves a checkpoint there and
    exits with status 128 + signal, so `--resume_from_checkpoint latest` goes on exactly as if nothing had happened.
    With several processes they must stop at the same step (saving is collective), so they compare flags only where
    the loop syncs anyway (logging, validation, checkpoints): at most `--logging_steps` steps later. A second Ctrl-C
    interrupts at once. Further SIGTERMs change nothing: `accelerate launch` / torchrun relay the one they got to
    every process (then SIGKILL after 30 s, as SLURM does), so a process sees the same notice twice.

    A SIGTERM sent to every process (a cluster's, or `kill -TERM -PGID`) also reaches the DataLoader workers, which
    go on for a while (`data.transforms.defer_stop_signals`) so the loop gets its batches up to the stop. Should
    workers die anyway (SIGKILL), their deaths must not raise in the middle of a step or a save (the DataLoader's
    SIGCHLD check does that), so it is switched off once the signal has come; and when the loop then runs out of
    batches (`batches`), one process stops at its last completed step. Several processes cannot agree on a step
    without batches, so they fail as before.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.signum = None  # as received by this process
        self.stopped = False
        self._previous = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._receive)
        return self

    def __exit__(self, *exc) -> None:
        # SIGCHLD stays off after a stop: the run is ending, and workers that die late would still raise in the save.
        for signum, handler in self._previous.items():
            if signum != signal.SIGCHLD:
                signal.signal(signum, handler)
        self._previous = {}

    def _receive(self, signum, frame) -> None:
        self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous[signum])
        if signal.SIGCHLD not in self._previous:
            self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def batches(self, loader):
        """`loader`'s batches; after a stop signal, a DataLoader whose workers died of it ends the epoch instead."""
        iterator = iter(loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except RuntimeError:  # "DataLoader worker (pid ...) exited unexpectedly"
                if self.signum is None or self.accelerator.num_processes > 1:
                    raise
                self.stopped = True
                return
            yield batch

    def message(self, prog: str, step: int, total: int, output_dir: Path) -> str:
        return (f"{prog}: stopped by {signal.Signals(self.signum).name} after step {step} of {total}; saved "
                f"{output_dir / 'checkpoints' / f'step_{step}'}. To go on, run the same command with "
                "--resume_from_checkpoint latest.")

    def check(self, at_sync_point: bool) -> bool:
        """Whether to stop after this step (True on every process alike)."""
        if self.accelerator.num_processes == 1:
            self.stopped = self.signum is not None
        elif at_sync_point:
            flag = torch.tensor(float(self.signum is not None), device=self.accelerator.device)
            self.stopped = bool(self.accelerator.reduce(flag, reduction="sum") > 0)
        if self.stopped and self.signum is None:  # a peer process was signalled
            self.signum = signal.SIGTERM
        return self.stopped


class NonFiniteLossGuard:
    """Stops a run whose loss became NaN or infinite, before anything trained on such a step is saved.

    Each forward adds its loss's non-finiteness to a counter on the device (no host-device sync per step); `check`
    reads it (summed over processes) where the loop syncs anyway. On a hit, `check` returns True and `message` says
    which steps, that the checkpoints and model on disk predate them, and what to change. The update of a bad step
    has already been applied (skipping it would cost a sync per step), so the run cannot go on from memory.
    Off under fp16, whose gradient scaler skips the update of a step with non-finite gradients and goes on.
    """

    def __init__(self, accelerator, prog: str, step: int, checkpoints: Callable[[], list[Path]]):
        self.accelerator, self.prog, self.checkpoints = accelerator, prog, checkpoints
        self.enabled = accelerator.mixed_precision != "fp16"
        self.count = torch.zeros((), dtype=torch.int64, device=accelerator.device)
        self.checked_step = step
        self.message = None

    @property
    def stopped(self) -> bool:
        return self.message is not None

    def update(self, loss: torch.Tensor) -> None:
        if self.enabled:
            self.count += ~torch.isfinite(loss.detach())

    def check(self, step: int) -> bool:
        bad = int(self.accelerator.reduce(self.count, reduction="sum")) if self.enabled else 0
        if bad:
            checkpoints = self.checkpoints()
            resume_hint = (f"the last checkpoint, {checkpoints[-1]}, predates them" if checkpoints
                           else "no checkpoint was saved before them")
            self.message = (
                f"{self.prog}: error: the loss was NaN or infinite {bad} time(s) between steps "
                f"{self.checked_step + 1} and {step}; stopped without saving anything trained on them "
                f"({resume_hint}). Start a new --output_dir with a lower --learning_rate, or --max_grad_norm 1.0"
                + (", or --mixed_precision no" if self.accelerator.mixed_precision != "no" else "") + "."
            )
        self.checked_step = step
        return self.stopped


def end_early(accelerator, message: str, status: int) -> NoReturn:
    """All processes leave together and exit with `status`; the main process prints `message` (once)."""
    is_main_process = accelerator.is_main_process
    accelerator.wait_for_everyone()
    leave(accelerator)
    if is_main_process:
        print(message, file=sys.stderr)
    raise SystemExit(status)


def leave(accelerator) -> None:
    """End the run (trackers, process group) without gloo's teardown deadlock.

    Seen in 2 of 81 two-process CPU runs, with py-spy: at interpreter exit DDP's reducer dropped the last reference to
    the gloo process group, whose destructor (main thread, GIL held) waited for a gloo worker thread that was still
    releasing the final barrier's tensors, which needs the GIL. So the DDP wrapper is freed while the group is alive,
    and after one more barrier the main thread releases the GIL briefly, letting the workers finish, before the group
    is destroyed."""
    accelerator.free_memory()
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(0.1)
    accelerator.end_training()


def resume(accelerator, args, output_dir: Path, fingerprint: dict) -> tuple[int, dict]:
    """Loads `--resume_from_checkpoint` (model, optimiser, schedule, RNGs); returns the step and the loop's state."""
    state = {"best_val_miou": -1.0, "best_step": None, "history": []}
    if not args.resume_from_checkpoint:
        return 0, state
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            accelerator.print(f"No checkpoint in {output_dir / 'checkpoints'}; starting from step 0.")
            return 0, state
        checkpoint = checkpoints[-1]
    else:
        checkpoint = Path(args.resume_from_checkpoint)
    for warning in check_resumable(checkpoint, fingerprint):
        accelerator.print(f"apc-train: warning: resuming with {warning}")
    accelerator.load_state(str(checkpoint))
    saved = json.loads((checkpoint / "apc_run.json").read_text())
    accelerator.print(f"Resumed from {checkpoint} at step {saved['step']}.")
    set_aside_later_checkpoints(accelerator, output_dir, saved["step"])
    return saved["step"], saved["state"]


def set_aside_later_checkpoints(accelerator, output_dir: Path, step: int) -> None:
    """Move OUTPUT/checkpoints/step_N with N > `step` to OUTPUT/checkpoints/superseded/ (nothing is deleted).

    They exist when a run is resumed from an earlier checkpoint than its last; they belong to the run this resume
    replaces, and neither `--resume_from_checkpoint latest` nor `--checkpoints_total_limit` may count them."""
    if accelerator.is_main_process:
        later = [c for c in list_checkpoints(output_dir) if _checkpoint_step(c) > step]
        if later:
            target = output_dir / "checkpoints" / "superseded"
            target.mkdir(exist_ok=True)
            for checkpoint in later:
                destination, n = target / checkpoint.name, 1
                while destination.exists():
                    destination, n = target / f"{checkpoint.name}.{n}", n + 1
                checkpoint.rename(destination)
            accelerator.print(f"apc-train: moved {len(later)} checkpoint(s) made after step {step} "
                              f"({', '.join(c.name for c in later)}) to {target}: they belong to the run this resume "
                              "replaces.")
    accelerator.wait_for_everyone()


def average_batchnorm_statistics(model, accelerator) -> None:
    """Give every process the same BatchNorm running statistics (the conv stem's): their mean over processes.

    Each process updates them on its own batches and DDP copies rank 0's to the others only at the next training
    forward, but validation gathers predictions from every process and the saved model is rank 0's: both need one
    set. Averaging is what timm's `distribute_bn` does; SyncBatchNorm has no CPU kernel."""
    if accelerator.num_processes == 1:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.copy_(accelerator.reduce(module.running_mean, reduction="mean"))
            module.running_var.copy_(accelerator.reduce(module.running_var, reduction="mean"))


def validate(accelerator, model, val_set, args, output_dir: Path, step: int, state: dict, progress) -> dict:
    """Validation mIoU, logged and tracked; the best model so far is saved to OUTPUT/best."""
    from .evaluation import evaluate

    average_batchnorm_statistics(model, accelerator)
    result = evaluate(model, val_set, accelerator=accelerator, max_images=args.eval_max_images,
                      num_workers=args.num_workers)
    accelerator.log({"val/miou": result["miou"]}, step=step)
    state["history"].append({"step": step, "val_miou": result["miou"]})
    progress.write(f"step {step}: val mIoU {100 * result['miou']:.2f}")
    if result["miou"] > state["best_val_miou"]:
        state.update(best_val_miou=result["miou"], best_step=step)
        if accelerator.is_main_process:
            model.save_pretrained(output_dir / "best")
    return result


def save_checkpoint(accelerator, output_dir: Path, step: int, fingerprint: dict, state: dict, limit: int) -> None:
    """`accelerator.save_state` (model, optimiser, schedule, RNGs) plus what the loop needs to resume exactly."""
    path = output_dir / "checkpoints" / f"step_{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        # Written last: a folder without apc_run.json is an interrupted save and is never resumed from.
        (path / "apc_run.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint, "state": state},
                                                      indent=2))
        for old in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def hardware_description(mixed_precision: str, num_processes: int = 1) -> str:
    if torch.cuda.is_available():
        device = f"{num_processes}x {torch.cuda.get_device_name(0)}"
    else:
        cpu = platform.processor() or platform.machine()
        device = f"{num_processes} process(es) on CPU ({cpu}, {os.cpu_count()} cores)"
    return f"{device}, mixed precision {mixed_precision}, torch {torch.__version__}"


def finish(args, model, output_dir, class_names, val_result, pseudo_result, state, step, seconds, num_processes,
           processor_class) -> int:
    """Main process: the model folder that `from_pretrained`/`pipeline` load, metrics.json, the card, the push."""
    from .model_card import make_model_card

    model.save_pretrained(output_dir)
    processor_class(size={"height": args.crop_size, "width": args.crop_size}).save_pretrained(output_dir)
    metrics = {
        "val_miou": val_result["miou"],
        "val_per_class_iou": dict(zip(class_names, val_result["per_class_iou"])),
        "train_pseudo_miou": pseudo_result["miou"],
        "train_pseudo_per_class_iou": dict(zip(class_names, pseudo_result["per_class_iou"])),
        "best_val_miou": state["best_val_miou"],
        "best_step": state["best_step"],
        "val_history": state["history"],
        "train_steps": step,
        "train_seconds": round(seconds, 1),
        "hardware": hardware_description(args.mixed_precision, num_processes),
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    repo_name = args.hub_model_id or output_dir.resolve().name
    recipe = {k: v for k, v in vars(args).items() if k not in ("push_to_hub", "hub_model_id", "report_to")
              and isinstance(v, (int, float, str, bool, dict)) and v not in (None, {})}
    card = make_model_card(model_id=repo_name, dataset_name=args.dataset, class_names=list(class_names),
                           recipe=recipe, metrics=metrics, hardware=metrics["hardware"],
                           base_model=args.model_name_or_path)
    (output_dir / "README.md").write_text(card)
    print(f"val mIoU {100 * metrics['val_miou']:.2f}, train pseudo-label mIoU "
          f"{100 * metrics['train_pseudo_miou']:.2f}; model saved to {output_dir}")
    if not args.push_to_hub:
        return 0
    from .hub import push_to_hub

    try:
        commit = push_to_hub(output_dir, repo_name, commit_message=f"apc-train --recipe {args.recipe}: {step} steps")
    except Exception as error:  # the model is saved; say how to retry rather than lose the run in a traceback
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"apc-train: error: --push_to_hub to {repo_name} failed: {message}; the model is in {output_dir}, "
              f"retry with: apc-push --model_dir {output_dir} --repo_id {repo_name}", file=sys.stderr)
        return 1
    print(f"Pushed to {getattr(commit, 'commit_url', None) or repo_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
