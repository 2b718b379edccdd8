"""Segment images with a trained APC model: an index PNG (VOC palette) and an overlay PNG per image.

    apc-infer --model apc-voc photo.jpg more_photos/ --output_dir predictions
    apc-infer --model USER/apc-voc photos/ --output_dir predictions --scales 1.0,1.25,1.5 --flip --crf
    apc-infer --model apc-voc VOC2012/JPEGImages --image_list VOC2012/ImageSets/Segmentation/test.txt \
        --no_overlay --output_dir results/VOC2012/Segmentation/comp6_test_cls     # the VOC test server's layout

For `photo.jpg` it writes `predictions/photo.png` (class ids as a palette PNG: it opens in the usual VOC colours, and
`np.array(Image.open(...))` gives the ids) and `predictions/photo_overlay.png` (the colours blended over the
photo). Folders are read one level deep; with `--image_list`, only the images it names (ids such as VOC's
`2008_000006`, or file names) are taken from the folders. Prediction is the evaluation protocol of `apc-eval`: the
full image, the same multi-scale + flip averaging (`evaluation.predict_probabilities`) and optional dense CRF.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .cli import OneLineParser, default_num_workers, non_negative_int, prediction_flags
from .data.transforms import VIT_MEAN, VIT_STD, EvalTransform
from .evaluation import crf_labels, predict_probabilities
from .labels import VOC_PALETTE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly, plus the image files directly inside named folders (sorted), in input order.

    Raises:
        ValueError: naming an input that does not exist, or a folder without images.
    """
    images = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"{item} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            images.extend(found)
        elif item.is_file():
            images.append(item)
        else:
            raise ValueError(f"{item} does not exist")
    return images


def select_listed(folders: Sequence[str | Path], list_file: str | Path) -> list[Path]:
    """The images named in `list_file` (one id or file name per line, blank lines ignored; VOC's
    `ImageSets/Segmentation/*.txt` are such lists), each looked up in `folders` in order, in the list's order.

    Raises:
        ValueError: naming the list, an input that is not a folder, or the first entries that no folder holds.
    """
    list_file = Path(list_file)
    try:
        entries = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {list_file}: {error}") from error
    if not entries:
        raise ValueError(f"{list_file} names no images")
    folders = [Path(f) for f in folders]
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder (with --image_list, give the folders the images are in)")
    by_name: dict[str, Path] = {}
    for folder in reversed(folders):  # the first folder wins
        for path in folder.iterdir():
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                by_name[path.name] = by_name[path.stem] = path
    missing = [entry for entry in entries if entry not in by_name]
    if missing:
        raise ValueError(f"{len(missing)} image(s) of {list_file} not found in {', '.join(map(str, folders))}: "
                         f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    return [by_name[entry] for entry in entries]


def output_names(images: Sequence[Path]) -> list[str]:
    """One output stem per image; two inputs with the same file stem (a/x.jpg, b/x.png) are an error rather than
    a silent overwrite."""
    seen: dict[str, Path] = {}
    for path in images:
        if path.stem in seen and seen[path.stem].resolve() != path.resolve():
            raise ValueError(f"{seen[path.stem]} and {path} would both be written as {path.stem}.png; "
                             "run them with different --output_dir")
        seen[path.stem] = path
    return [path.stem for path in images]


def load_model(model_name_or_path: str, device: torch.device | str = "cpu"):
    """The model in eval mode and the normalisation its image processor uses (ViT's 0.5/0.5 when it has none)."""
    from transformers import AutoImageProcessor

    from .modeling_apc import APCForSemanticSegmentation

    model = APCForSemanticSegmentation.from_pretrained(model_name_or_path).to(device).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError):  # a folder saved without preprocessor_config.json
        mean, std = VIT_MEAN, VIT_STD
    return model, mean, std


@torch.no_grad()
def segment(
    model,
    image: Image.Image,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: bool = False,
    mean: Sequence[float] = VIT_MEAN,
    std: Sequence[float] = VIT_STD,
) -> np.ndarray:
    """Class ids `(H, W)` uint8 for one PIL image, at its own resolution."""
    probs = image_probabilities(model, image, scales, flip, mean, std)
    if crf:
        return crf_labels(image, probs.cpu().numpy()).astype(np.uint8)
    return probs.max(dim=0).indices.to(torch.uint8).cpu().numpy()  # = argmax(0), 3x faster on a CPU


@torch.no_grad()
def image_probabilities(model, image: Image.Image, scales: Sequence[float] = (1.0,), flip: bool = False,
                        mean: Sequence[float] = VIT_MEAN, std: Sequence[float] = VIT_STD) -> torch.Tensor:
    """`(C, H, W)` class probabilities of one PIL image (the evaluation protocol's multi-scale + flip average)."""
    pixel_values = EvalTransform(size=None, mean=mean, std=std).apply(image.convert("RGB"))["pixel_values"]
    device = next(model.parameters()).device
    return predict_probabilities(model, pixel_values[None].to(device), scales, flip)[0]


def colorize(labels: np.ndarray) -> Image.Image:
    """Class ids -> a palette ("P") image in the VOC colours; its pixel values stay the class ids."""
    index = Image.fromarray(labels.astype(np.uint8))
    index.putpalette(VOC_PALETTE)  # an "L" image with a palette becomes "P", values unchanged
    return index


def overlay(image: Image.Image, labels: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The class colours blended over the image, on non-background pixels only, so the scene stays readable."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = np.asarray(VOC_PALETTE, dtype=np.float32).reshape(-1, 3)[labels]
    foreground = (labels != 0)[..., None]
    blended = np.where(foreground, (1 - alpha) * rgb + alpha * colours, rgb)
    return Image.fromarray(blended.round().astype(np.uint8))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="apc-infer", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="Image files and/or folders of images.")
    parser.add_argument("--model", required=True, help="A trained APC folder (apc-train's output) or Hub id.")
    parser.add_argument("--output_dir", required=True, help="Where NAME.png and NAME_overlay.png are written.")
    parser.add_argument("--scales", default="1.0", help="Comma-separated test scales, e.g. 1.0,1.25,1.5.")
    parser.add_argument("--flip", action="store_true", help="Also average the horizontally flipped image.")
    parser.add_argument("--crf", action="store_true", help="Refine with a dense CRF (pip install 'apc-seg[crf]').")
    parser.add_argument("--alpha", type=float, default=0.5, help="Opacity of the colours in the overlay.")
    parser.add_argument("--image_list", help="Text file of image ids or file names, one per line (e.g. VOC's "
                        "ImageSets/Segmentation/test.txt): segment only these, found in the given folders.")
    parser.add_argument("--no_overlay", action="store_true",
                        help="Write only the index PNGs (e.g. for the VOC evaluation server).")
    parser.add_argument("--num_workers", type=non_negative_int, default=default_num_workers(),
                        help="With --crf: processes that run the dense CRF while the model goes on (default: the "
                             "CPU count, at most 8; 0 = in this process).")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    scales = prediction_flags(parser, args)
    if args.image_list:
        try:
            images = select_listed(args.inputs, args.image_list)
        except ValueError as error:
            parser.error(f"--image_list: {error}")
    else:
        try:
            images = collect_images(args.inputs)
        except ValueError as error:
            parser.error(f"IMAGE_OR_FOLDER: {error}")
    try:
        names = output_names(images)
    except ValueError as error:
        parser.error(f"IMAGE_OR_FOLDER: {error}")
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--output_dir {output_dir} is not writable ({error.strerror or error})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, mean, std = load_model(args.model, device)
    except (OSError, ValueError) as error:
        parser.error(f"--model {args.model}: {str(error).splitlines()[0]}")

    def write(path, name, image, labels):
        colorize(labels).save(output_dir / f"{name}.png")
        if not args.no_overlay:
            overlay(image, labels, args.alpha).save(output_dir / f"{name}_overlay.png")
        found = ", ".join(model.config.id2label[int(c)] for c in np.unique(labels))
        print(f"{path} -> {output_dir / name}.png ({found})")

    # The dense CRF (about 0.75 s per VOC image on one core) runs in worker processes while the model goes on;
    # results are written in input order, at most 2 per worker waiting.
    crf_pool = concurrent.futures.ProcessPoolExecutor(args.num_workers) if args.crf and args.num_workers else None
    waiting: collections.deque = collections.deque()
    failed = 0
    try:
        for path, name in zip(images, names):
            try:
                image = Image.open(path)
                image.load()
            except (OSError, UnidentifiedImageError) as error:  # one bad file does not stop a folder
                print(f"apc-infer: warning: skipping {path}: {error}", file=sys.stderr)
                failed += 1
                continue
            if crf_pool is None:
                write(path, name, image, segment(model, image, scales, args.flip, args.crf, mean, std))
                continue
            probs = image_probabilities(model, image, scales, args.flip, mean, std).cpu().numpy()
            waiting.append((path, name, image, crf_pool.submit(crf_labels, image, probs)))
            while len(waiting) > 2 * args.num_workers:
                path, name, image, future = waiting.popleft()
                write(path, name, image, future.result().astype(np.uint8))
        while waiting:
            path, name, image, future = waiting.popleft()
            write(path, name, image, future.result().astype(np.uint8))
    finally:
        if crf_pool is not None:
            crf_pool.shutdown(cancel_futures=True)
    print(f"Segmented {len(images) - failed} of {len(images)} image(s) into {output_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
