"""Training-step throughput of APC against a reference step, measured in the same run.

Fast path: bf16 autocast, SDPA attention, fused AdamW, AKP pooling (optionally torch.compile).
Reference: the same ViT backbone in fp32 with eager attention, max pooling, unfused (for-loop) AdamW.
Both run the full training step: forward with all three losses (PCL, pseudo-labels with PAR, decoder CE),
backward, optimiser step. Inputs are random tensors already on the device, so the data pipeline is not measured
here (see bench/data_throughput.py).

    python bench/throughput.py --device cuda                    # ViT-B/16, 448 crops, batch 8, 21 labels (VOC)
    python bench/throughput.py --device cpu --small             # a tiny config, for a smoke run on a laptop

MFU = (FLOPs of one step counted by torch.utils.flop_counter) / step time / peak FLOP/s of the device.
Also per step: the aten operators dispatched (the non-view ones are kernel launches on a GPU, which bound this step
there) and, on CUDA, the host-device synchronisations reported by torch's sync debug mode.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apc_seg import APCConfig, APCForSemanticSegmentation, pseudo_labels  # noqa: E402
from apc_seg.labels import VOC_CLASSES  # noqa: E402
from apc_seg.train import prefer_flash_attention  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12}
VOC_STEPS, VOC_BATCH, COCO_STEPS = 20_000, 8, 80_000
# Width x height of the validation stand-ins, in turn: VOC photographs are 500 px on their long side, most often
# 500 x 375, in both orientations and a few other heights (the mix decides how full `evaluate`'s same-size batches get).
VOC_IMAGE_SIZES = [(500, 375), (375, 500), (500, 333), (500, 375), (500, 281), (500, 375), (333, 500), (500, 366)]
VOC_VALIDATION_IMAGES = 10 * 1_449 + 500  # the VOC recipe: val every 2k of 20k steps, then 500 pseudo-label images


def default_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def build(small: bool, fast: bool, crop_size: int, max_classes: int | None):
    backbone = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     patch_size=16) if small else dict())  # ViT-B/16
    # Position embeddings at the crop size, as apc-train's from_pretrained_backbone(image_size=crop) makes them.
    backbone["image_size"] = crop_size
    config = APCConfig(backbone_config=backbone, id2label=dict(enumerate(VOC_CLASSES)),
                       pooling="adaptive_k" if fast else "max",
                       pseudo_label_max_classes=max_classes if fast else None)
    config._attn_implementation = "sdpa" if fast else "eager"
    return APCForSemanticSegmentation(config)


def measure(args, fast: bool, compile_model: bool = False) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args.small, fast, args.crop_size, args.max_classes).to(device).train()
    fused = fast  # torch has a fused AdamW for CPU tensors too, so a CPU run counts the same optimiser operators
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused or None,
                                  foreach=None if fused else False)
    if fast:
        prefer_flash_attention(device)  # as apc-train does
    step_model = torch.compile(model, mode=args.compile_mode) if compile_model else model
    batch, size = args.batch_size, args.crop_size
    pixel_values = torch.randn(batch, 3, size, size, device=device)
    # VOC-like image labels: background plus 1-3 foreground classes per image.
    generator = torch.Generator().manual_seed(0)
    class_labels = torch.zeros(batch, model.config.num_labels)
    class_labels[:, 0] = 1
    for row in class_labels:
        count = int(torch.randint(1, 4, (1,), generator=generator))
        row[1 + torch.randperm(model.config.num_labels - 1, generator=generator)[:count]] = 1
    class_labels = class_labels.to(device)
    use_bf16 = fast and (device.type != "cpu" or args.cpu_bf16)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = step_model(pixel_values=pixel_values, class_labels=class_labels, use_seg_loss=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    from torch.utils.flop_counter import FlopCounterMode

    # One uncompiled step under both counters (compiled kernels are not aten operators, so the compiled row
    # reports the eager step's operator count).
    with FlopCounterMode(display=False) as counter, OperatorCounter() as operators:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(pixel_values=pixel_values, class_labels=class_labels, use_seg_loss=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()  # matmuls, convolutions and attention; LSTMs are not counted
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        out = step()
    sync()
    step_time = (time.perf_counter() - start) / args.steps
    loss = out.loss.item()
    syncs = count_syncs(step) if device.type == "cuda" else None
    if args.profile and fast:
        profile_steps(step, device)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else default_peak(device)
    return {
        "name": ("fast" + (f" + compile ({args.compile_mode})" if compile_model else "")) if fast else "reference",
        "images_per_s": batch / step_time,
        "step_ms": 1000 * step_time,
        "peak_mem_gib": peak_mem,
        "tflop_per_step": flops / 1e12,
        "mfu": flops / step_time / peak if peak else float("nan"),
        "operators": operators.total,
        "kernel_operators": operators.kernels,
        "syncs_per_step": syncs,
        "loss": loss,
    }


class OperatorCounter(TorchDispatchMode):
    """Counts the aten operators one step dispatches, and among them those that are not views.

    On a GPU each non-view operator is at least one kernel launch, and every operator costs the host a few
    microseconds of dispatch; when the host cannot launch as fast as the GPU runs, this count, not FLOPs, sets the
    step time (docs/benchmarks.md). The count is the same on any device except for device-specific schedules
    (PAR's propagation is a loop on CPU, a gather on GPU).
    """

    def __init__(self):
        super().__init__()
        self.total = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))


def measure_validation(args) -> dict:
    """Images/s of `evaluate` (apc-train's validation: full images, decoding in workers) with the fast model.

    Synthetic images in VOC's sizes (`VOC_IMAGE_SIZES`), JPEG-encoded, stand in for VOC val (such images decode about
    as fast as VOC's photographs, docs/benchmarks.md, and the model's cost depends on the size only); the projection
    counts the VOC recipe's 10 validations of 1,449 images plus the 500-image pseudo-label score (at the same rate,
    though PAR makes those slower).
    """
    import io

    import numpy as np
    from PIL import Image

    from apc_seg.data.synthetic import render
    from apc_seg.evaluation import evaluate

    device = torch.device(args.device)
    model = build(args.small, True, args.crop_size, args.max_classes).to(device)
    dataset = []
    for i in range(args.eval_images):
        width, height = VOC_IMAGE_SIZES[i % len(VOC_IMAGE_SIZES)]
        image, mask = render(np.random.default_rng(i), max(width, height), [1 + i % 3])
        image, mask = np.ascontiguousarray(image[:height, :width]), np.ascontiguousarray(mask[:height, :width])
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=95)
        dataset.append({"image": Image.open(io.BytesIO(buffer.getvalue())), "mask": Image.fromarray(mask),
                        "class_labels": [1 + i % 3]})
    use_bf16 = device.type != "cpu" or args.cpu_bf16
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):  # as accelerate's wrapped forward
        evaluate(model, dataset[:8], num_workers=args.eval_workers)  # warm-up
        start = time.perf_counter()
        evaluate(model, dataset, num_workers=args.eval_workers)
        seconds = time.perf_counter() - start
    rate = args.eval_images / seconds
    return {"images_per_s": rate, "voc_minutes": VOC_VALIDATION_IMAGES / rate / 60}


def count_syncs(step) -> int:
    """Host-device synchronisations in one step (CUDA), as reported by torch's sync debug mode."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def profile_steps(step, device: torch.device, steps: int = 3, rows: int = 30) -> None:
    """Print where the fast step's time goes (the top operators by device time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="A tiny ViT instead of ViT-B/16 (CPU smoke runs).")
    parser.add_argument("--batch_size", type=int, default=None, help="Default 8 (VOC recipe); 2 with --small.")
    parser.add_argument("--crop_size", type=int, default=None, help="Default 448; 96 with --small.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="Also measure the fast path under torch.compile.")
    parser.add_argument("--compile_mode", default="default",
                        help="torch.compile mode of the compiled row, e.g. reduce-overhead (CUDA graphs).")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="Device peak (dense bf16) TFLOP/s for MFU; default from the device name "
                             "(H100/H200 989, A100 312).")
    parser.add_argument("--max_classes", type=int, default=4,
                        help="pseudo_label_max_classes of the fast path (background + at most 3 classes here; "
                             "apc-train takes it from the training split). 0 = off.")
    parser.add_argument("--cpu_bf16", action="store_true", help="Use bf16 autocast on the CPU fast path too.")
    parser.add_argument("--par_schedule", choices=["device", "gather", "shifts"], default="device",
                        help="PAR's propagation: the device's own (shifts on CPU, gather on GPU), or either one on "
                             "any device, e.g. to count the GPU schedule's operators on a CPU or time the loop on "
                             "a GPU.")
    parser.add_argument("--profile", action="store_true", help="Print a profile of the fast step.")
    parser.add_argument("--eval_images", type=int, default=0,
                        help="Also time apc-train's validation (evaluate) on this many VOC-sized synthetic images "
                             "and add the VOC recipe's validation to the projection (e.g. 64; 0 = off).")
    parser.add_argument("--eval_workers", type=int, default=8, help="Decoding workers of that validation.")
    parser.add_argument("--json", help="Also write the rows to this file.")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (2 if args.small else VOC_BATCH)
    args.crop_size = args.crop_size or (96 if args.small else 448)
    args.max_classes = args.max_classes or None

    if args.par_schedule != "device":
        propagate = getattr(pseudo_labels, f"_propagate_by_{args.par_schedule}")
        pseudo_labels._propagate_by_shifts = pseudo_labels._propagate_by_gather = propagate
    device = torch.device(args.device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    print(f"# {hardware}, torch {torch.__version__}, batch {args.batch_size}, crop {args.crop_size}, "
          f"{'tiny ViT' if args.small else 'ViT-B/16'}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"PAR schedule {args.par_schedule}")
    variants = [dict(fast=False), dict(fast=True)] + ([dict(fast=True, compile_model=True)] if args.compile else [])
    rows = []
    for variant in variants:  # each row is printed as soon as it is measured, so a time limit keeps the rest
        rows.append(measure(args, **variant))
        r, reference = rows[-1], rows[0]["images_per_s"]
        if len(rows) == 1:
            print("| step | images/s | step ms | peak GiB | TFLOP/step | MFU | x reference | ops/step (non-view) "
                  "| syncs/step | loss |")
            print("|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {r['name']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | {r['peak_mem_gib']:.2f} | "
              f"{r['tflop_per_step']:.3f} | {100 * r['mfu']:.1f}% | {r['images_per_s'] / reference:.2f} | "
              f"{r['operators']} ({r['kernel_operators']}) | "
              f"{'-' if r['syncs_per_step'] is None else r['syncs_per_step']} | {r['loss']:.4f} |", flush=True)
    best = max(rows[1:], key=lambda r: r["images_per_s"])
    voc_minutes = VOC_STEPS * VOC_BATCH / best["images_per_s"] / 60
    coco_minutes = COCO_STEPS * VOC_BATCH / best["images_per_s"] / 60
    print(f"Projected training time at {best['name']} speed: VOC recipe ({VOC_STEPS} steps x {VOC_BATCH}) "
          f"{voc_minutes:.1f} min; COCO recipe ({COCO_STEPS} steps x {VOC_BATCH}) {coco_minutes:.1f} min "
          "(steps only; validation and data loading not included).")
    validation = measure_validation(args) if args.eval_images else None
    if validation:
        print(f"Validation: {validation['images_per_s']:.1f} images/s ({args.eval_images} synthetic "
              f"VOC-sized JPEGs, {args.eval_workers} workers); the VOC recipe's "
              f"{VOC_VALIDATION_IMAGES} images add {validation['voc_minutes']:.1f} min: "
              f"{voc_minutes + validation['voc_minutes']:.1f} min in all.")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hardware, "torch": torch.__version__, "rows": rows,
                                               "voc_minutes": voc_minutes, "coco_minutes": coco_minutes,
                                               "validation": validation}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
