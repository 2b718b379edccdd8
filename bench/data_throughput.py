"""Images/s of the training data pipeline: decode + TrainTransform + collate, through a torch DataLoader.

    python bench/data_throughput.py                                   # synthetic data written as a VOC folder
    python bench/data_throughput.py --data_dir ../shared/realdata/voc --split all --repeat 40
    python bench/data_throughput.py --crop_sizes 448,96 --workers 0,1,2 --batch_size 8
    python bench/data_throughput.py --num_images 2000 --image_size 448 --build_workers 1,2 --workers ""

The first batch of each run (worker start-up, first decode) is not timed; the rest is, so the figure is the steady
rate a training loop sees. Decoding is what `datasets` does on access (JPEG from disk for VOC).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from functools import partial

import torch

from apc_seg.data import TrainTransform, collate_fn, load_voc, make_synthetic, num_labels_of, write_voc


def measure(dataset, crop_size: int, workers: int, batch_size: int, num_batches: int) -> float:
    transform = TrainTransform(crop_size=crop_size, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset.with_transform(transform), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=workers, collate_fn=partial(collate_fn, num_labels=num_labels_of(dataset)),
        generator=torch.Generator().manual_seed(0),
        # As apc-train's loader: persistent workers (so a new epoch does not restart them) and pinned batches on CUDA.
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
    )
    iterator = iter(loader)
    next(iterator)  # warm-up: worker start-up and first decode
    start, images = time.perf_counter(), 0
    for _ in range(num_batches):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        images += batch["pixel_values"].shape[0]
    return images / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", help="a VOC folder (default: synthetic data written as VOC to a temp dir)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_images", type=int, default=512, help="synthetic train images to write")
    parser.add_argument("--image_size", type=int, default=96, help="synthetic image size")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the split (for tiny folders)")
    parser.add_argument("--crop_sizes", default="448,96")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_batches", type=int, default=30)
    parser.add_argument("--cache_dir", help="datasets cache (default: inside the temp dir)")
    parser.add_argument("--build_workers", default="",
                        help="also time building the split's cache (decode + check every image, write Arrow) with "
                             "each of these load_voc num_proc values, e.g. 1,2 (each into a fresh cache)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # as in a DataLoader worker; keeps 0-worker and n-worker runs comparable
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = os.path.join(tmp, "voc")
            write_voc(make_synthetic(args.num_images, 0, 0, args.image_size, seed=0), data_dir)
        for num_proc in (int(n) for n in args.build_workers.split(",") if n):
            start = time.perf_counter()
            built = load_voc(data_dir, splits=[args.split], cache_dir=os.path.join(tmp, f"build_{num_proc}"),
                             num_proc=num_proc)[args.split]
            seconds = time.perf_counter() - start
            print(f"# build with num_proc={num_proc}: {len(built)} images in {seconds:.1f} s, "
                  f"{len(built) / seconds:.0f} images/s", flush=True)
        dataset = load_voc(data_dir, splits=[args.split], cache_dir=args.cache_dir or os.path.join(tmp, "cache"))
        dataset = dataset[args.split]
        if args.repeat > 1:
            import datasets

            dataset = datasets.concatenate_datasets([dataset] * args.repeat)
        size = dataset[0]["image"].size
        print(f"# data: {args.data_dir or f'synthetic ({args.num_images} x {args.image_size}px, as VOC JPEG)'}"
              f" split {args.split}, {len(dataset)} images, first image {size[0]}x{size[1]}")
        print(f"# host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
        print("| crop | workers | batch | images/s |")
        print("|---:|---:|---:|---:|")
        for crop in (int(c) for c in args.crop_sizes.split(",") if c):
            for workers in (int(w) for w in args.workers.split(",") if w):
                rate = measure(dataset, crop, workers, args.batch_size, args.num_batches)
                print(f"| {crop} | {workers} | {args.batch_size} | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
