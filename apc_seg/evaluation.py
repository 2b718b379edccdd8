"""Evaluation with the standard protocol: full images, confusion-matrix mIoU ignoring 255, optional multi-scale +
flip and dense CRF; `--mode pseudo` judges the training pseudo-labels instead of the decoder.

    apc-eval --model apc-voc --dataset voc --data_dir data/VOCdevkit --split val --scales 1.0,1.25,1.5 --flip
    accelerate launch --num_processes 2 -m apc_seg.evaluation --model apc-voc --dataset voc --data_dir ...
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cli import OneLineParser, add_preprocessing_num_workers, default_num_workers, non_negative_int, prediction_flags
from .data.transforms import EvalTransform, class_labels_to_multi_hot, defer_stop_signals
from .metrics import StreamingConfusionMatrix, format_iou_table

# The protocol WSSS papers report final segmentation results with (ToCo, APC): test scales 1.0/1.25/1.5, each with
# its horizontal flip, then a dense CRF. `evaluate(model, dataset, **STANDARD_PROTOCOL)`, or
# `apc-eval --scales 1.0,1.25,1.5 --flip --crf`.
STANDARD_PROTOCOL: dict[str, Any] = {"scales": (1.0, 1.25, 1.5), "flip": True, "crf": True}


def _resize_to_patch_multiple(pixel_values: torch.Tensor, scale: float, patch: int) -> torch.Tensor:
    height, width = pixel_values.shape[-2:]
    size = (max(patch, round(height * scale / patch) * patch), max(patch, round(width * scale / patch) * patch))
    if size == (height, width):
        return pixel_values
    return F.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_probabilities(
    model, pixel_values: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False
) -> torch.Tensor:
    """Decoder class probabilities `(B, C, H, W)` at the input's resolution, averaged over scales and flips.

    Each scale resizes the image to the nearest multiple of the patch size, so any image size can be evaluated.
    """
    height, width = pixel_values.shape[-2:]
    patch = model.config.patch_size
    total = None
    for scale in scales:
        scaled = _resize_to_patch_multiple(pixel_values, scale, patch)
        for flipped in (False, True) if flip else (False,):
            inputs = scaled.flip(-1) if flipped else scaled
            logits = model(pixel_values=inputs).logits.float()
            if flipped:
                logits = logits.flip(-1)
            probs = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False).softmax(1)
            total = probs if total is None else total + probs
    return total / (len(scales) * (2 if flip else 1))


@torch.no_grad()
def predict_pseudo_labels(model, pixel_values: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
    """The model's training pseudo-labels `(B, H, W)` for images of any size (resized to a patch multiple)."""
    height, width = pixel_values.shape[-2:]
    scaled = _resize_to_patch_multiple(pixel_values, 1.0, model.config.patch_size)
    labels = model.pseudo_labels(scaled, class_labels)
    if labels.shape[-2:] != (height, width):
        labels = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest")[:, 0].long()
    return labels


def crf_labels(image, probs: np.ndarray) -> np.ndarray:
    """Class ids `(H, W)` of one image after dense-CRF refinement of its `(C, H, W)` probabilities.

    `image` is PIL or `H x W x 3` uint8. A plain function of numpy arrays, so it runs in worker processes.
    """
    from .crf import dense_crf

    # np.array copies: pydensecrf needs a writable buffer, and np.asarray of a PIL image is read-only.
    rgb = np.array(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
    return dense_crf(rgb, probs).argmax(0)


class _EvalSamples(torch.utils.data.Dataset):
    """The examples at `indices`, decoded and normalised (in DataLoader workers when there are any)."""

    def __init__(self, dataset, indices: list[int], transform: EvalTransform, keep_image: bool):
        self.dataset, self.indices, self.transform, self.keep_image = dataset, indices, transform, keep_image

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        example = self.dataset[self.indices[i]]
        sample = self.transform.apply(example["image"], example["mask"])
        sample["class_labels"] = example["class_labels"]
        # The CRF's pairwise term needs the RGB image; kept only then (as PIL: the loader would make an array a
        # tensor, which then travels to the CRF processes through shared-memory files).
        sample["image"] = example["image"].convert("RGB") if self.keep_image else None
        return sample


def _image_sizes(dataset, indices: list[int]) -> list[tuple[int, int]]:
    """`(width, height)` of the images at `indices`, from their file headers: nothing is decoded."""
    import datasets
    from PIL import Image

    if not (isinstance(dataset, datasets.Dataset) and isinstance(dataset.features.get("image"), datasets.Image)):
        return [dataset[i]["image"].size for i in indices]  # PIL images open lazily
    files = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    sizes = []
    for stored in files[indices]["image"]:
        with Image.open(io.BytesIO(stored["bytes"]) if stored["bytes"] is not None else stored["path"]) as image:
            sizes.append(image.size)
    return sizes


def _same_size_batches(samples, batch_size: int):
    """Consecutive samples of equal image size, at most `batch_size` each: batching never pads an image."""
    batch = []
    for sample in samples:
        if batch and (sample["pixel_values"].shape != batch[0]["pixel_values"].shape or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


@torch.no_grad()
def evaluate(
    model,
    dataset,
    mode: str = "decoder",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: bool = False,
    batch_size: int = 8,
    accelerator=None,
    max_images: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """mIoU of `model` on a dataset in the apc-seg schema (rows with `image`, `mask`, `class_labels`).

    Args:
        mode: `"decoder"` (the segmenter's predictions) or `"pseudo"` (the pseudo-labels made with the true image
            labels, as the decoder is trained on them; pixels they leave ignored count as background, as is usual
            when pseudo-labels are scored).
        accelerator: with several processes, each scores its shard and the confusion matrices are summed, so the
            result equals the single-process one.
        max_images: score only the first `max_images` examples (e.g. a quick check during training).
        mean, std: normalisation; defaults to the model's image processor convention (ViT 0.5/0.5).
        num_workers: DataLoader workers that decode and normalise the images while the model runs (on a GPU the
            main process alone decodes slower than the model predicts), and with `crf` as many processes for the
            dense CRF. The result does not depend on it (tested).
        progress: show a progress bar of the images scored (by this process).

    Returns:
        `apc_seg.metrics.miou_from_confusion` output (`miou`, `per_class_iou`, `pixel_accuracy`, ...).
    """
    if mode not in ("decoder", "pseudo"):
        raise ValueError(f"mode={mode!r} is invalid: expected 'decoder' or 'pseudo'.")
    num_labels = model.config.num_labels
    device = next(model.parameters()).device
    transform = EvalTransform(size=None, **({"mean": mean} if mean else {}), **({"std": std} if std else {}))
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    indices = list(range(rank, count, world))
    if batch_size > 1:
        # Same-size images in a row, so batches fill up: VOC's val alternates 500x375, 375x500 and other sizes, and
        # its images one by one keep a GPU waiting on kernel launches. The confusion matrix is a sum: order is free.
        sizes = _image_sizes(dataset, indices)
        indices = [index for _, index in sorted(zip(sizes, indices))]
    metric = StreamingConfusionMatrix(num_labels, device=device)
    was_training = model.training
    model.eval()
    # batch_size=None: the loader hands over single samples, in order; equal sizes are batched here. Its own
    # generator: a loader without one draws its workers' seed from the global RNG, and validation would then change
    # the training run's dropout and PCL sampling.
    samples = torch.utils.data.DataLoader(_EvalSamples(dataset, indices, transform, keep_image=crf), batch_size=None,
                                          num_workers=num_workers, generator=torch.Generator(),
                                          worker_init_fn=defer_stop_signals)  # apc-train may be validating
    # The dense CRF (about 0.75 s per VOC image on one core, 18 minutes for VOC val) runs in worker processes while
    # the model goes on; the confusion matrix is a sum, so the order results come back in does not matter.
    crf_pool = concurrent.futures.ProcessPoolExecutor(num_workers) if crf and num_workers > 0 else None
    pending: set = set()
    bar = tqdm(total=len(indices), desc="apc-eval", unit="image", disable=not progress)

    def score(pred, target):
        metric.update(pred, target)
        bar.update(1 if pred.dim() == 2 else len(pred))

    try:
        for batch in _same_size_batches(samples, batch_size):
            pixel_values = torch.stack([s["pixel_values"] for s in batch]).to(device)
            targets = torch.stack([s["pixel_labels"] for s in batch]).to(device)
            if mode == "pseudo":
                class_labels = torch.stack([class_labels_to_multi_hot(s["class_labels"], num_labels) for s in batch])
                pred = predict_pseudo_labels(model, pixel_values, class_labels.to(device))
                score(pred.masked_fill(pred == 255, 0), targets)
            elif not crf:
                probs = predict_probabilities(model, pixel_values, scales, flip)
                score(probs.max(dim=1).indices, targets)  # = argmax(1), 3x faster on a CPU
            else:
                probs = predict_probabilities(model, pixel_values, scales, flip).cpu().numpy()
                for sample, image_probs, target in zip(batch, probs, targets):
                    if crf_pool is None:
                        score(torch.from_numpy(crf_labels(sample["image"], image_probs)), target)
                        continue
                    future = crf_pool.submit(crf_labels, sample["image"], image_probs)
                    future.target = target
                    pending.add(future)
                while len(pending) > 2 * num_workers:  # bounded: each holds a C x H x W probability map
                    done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        score(torch.from_numpy(future.result()), future.target)
        for future in concurrent.futures.as_completed(pending):
            score(torch.from_numpy(future.result()), future.target)
    finally:
        bar.close()
        if crf_pool is not None:
            crf_pool.shutdown(cancel_futures=True)
    if was_training:
        model.train()
    class_names = [model.config.id2label[i] for i in range(num_labels)]
    return metric.compute(accelerator, class_names=class_names)


def load_split(dataset: str, data_dir: str | None, split: str, skip_bad_images: bool = False, seed: int = 0,
               num_images: int | None = None, image_size: int = 96, num_proc: int | None = None):
    """One split of `voc`, `coco` or `synthetic`.

    The synthetic split is generated (`data_dir` unused) with `num_images` images of `image_size` pixels; defaults
    are the synthetic recipe's (1024 train, 256 val or test, 96 px). Pass what training used to score the same data.
    `num_proc` processes build a VOC / COCO split that is not cached yet.
    """
    from . import data

    if dataset == "synthetic":
        from .data.synthetic import make_synthetic

        if split not in ("train", "val", "test"):
            raise ValueError(f"--split {split!r} is invalid for --dataset synthetic: expected train, val or test")
        counts = {"train": 0, "val": 0, "test": 0}
        counts[split] = num_images or (1024 if split == "train" else 256)
        return make_synthetic(num_train=counts["train"], num_val=counts["val"], num_test=counts["test"],
                              image_size=image_size, seed=seed)[split]
    if data_dir is None:
        raise ValueError(f"--data_dir is required for --dataset {dataset}")
    if dataset == "voc":
        return data.load_voc(data_dir, splits=[split], skip_bad_images=skip_bad_images, num_proc=num_proc)[split]
    if dataset == "coco":
        return data.load_coco(data_dir, splits=[split], skip_bad_images=skip_bad_images, num_proc=num_proc)[split]
    raise ValueError(f"--dataset {dataset!r} is invalid: expected voc, coco or synthetic")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="apc-eval", description="Evaluate an APC model (mIoU, standard protocol).")
    parser.add_argument("--model", required=True, help="A trained APC folder or Hub id.")
    parser.add_argument("--dataset", choices=("voc", "coco", "synthetic"), default="voc")
    parser.add_argument("--data_dir", help="VOCdevkit / COCO root (not needed for synthetic).")
    parser.add_argument("--split", default="val")
    parser.add_argument("--scales", default="1.0", help="Comma-separated test scales, e.g. 1.0,1.25,1.5.")
    parser.add_argument("--flip", action="store_true", help="Also average the horizontally flipped image.")
    parser.add_argument("--crf", action="store_true", help="Refine with a dense CRF (pip install 'apc-seg[crf]').")
    parser.add_argument("--mode", choices=("decoder", "pseudo"), default="decoder",
                        help="decoder: the segmenter; pseudo: the pseudo-labels (use a train split).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=non_negative_int, default=default_num_workers(),
                        help="Processes that decode images and, with --crf, run the dense CRF (default: the CPU "
                             "count, at most 8; 0 = all in this process).")
    parser.add_argument("--max_images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="Synthetic only: the dataset's seed.")
    parser.add_argument("--num_images", type=int, default=None,
                        help="Synthetic only: images generated for the split (as apc-train's --num_val_images).")
    parser.add_argument("--image_size", type=int, default=96,
                        help="Synthetic only: image side (as apc-train's --crop_size).")
    parser.add_argument("--skip_bad_images", action="store_true")
    add_preprocessing_num_workers(parser)
    parser.add_argument("--output_json", help="Write miou, per_class_iou, pixel_accuracy here.")
    return parser


def launched_without_gpus() -> bool:
    """True for several processes (torchrun / `accelerate launch --multi_gpu` set WORLD_SIZE) on a machine without
    CUDA GPUs. accelerate only connects CPU processes (gloo) when told it runs on CPUs; otherwise each process would
    run alone, and every process would score the whole split and write the same files."""
    import os

    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    scales = prediction_flags(parser, args)
    if args.data_dir and not Path(args.data_dir).is_dir():
        parser.error(f"--data_dir {args.data_dir} does not exist")
    from accelerate import Accelerator

    from .modeling_apc import APCForSemanticSegmentation

    accelerator = Accelerator(cpu=launched_without_gpus())
    try:
        with accelerator.main_process_first():  # the first process builds the datasets cache, the others reuse it
            dataset = load_split(args.dataset, args.data_dir, args.split, args.skip_bad_images, args.seed,
                                 args.num_images, args.image_size, args.preprocessing_num_workers)
    except (FileNotFoundError, ValueError, KeyError) as error:
        parser.error(str(error).strip("'\""))
    try:
        model = APCForSemanticSegmentation.from_pretrained(args.model).to(accelerator.device)
    except (OSError, ValueError) as error:
        parser.error(f"--model {args.model}: {str(error).splitlines()[0]}")
    result = evaluate(model, dataset, mode=args.mode, scales=scales, flip=args.flip, crf=args.crf,
                      batch_size=args.batch_size, accelerator=accelerator, max_images=args.max_images,
                      num_workers=args.num_workers, progress=accelerator.is_local_main_process)
    if accelerator.is_main_process:
        print(format_iou_table(result))
        if args.output_json:
            Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output_json).write_text(json.dumps(result, indent=2))
    accelerator.wait_for_everyone()  # leave together: tearing down gloo while a peer still writes can hang
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
