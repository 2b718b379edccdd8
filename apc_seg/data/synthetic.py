"""The built-in synthetic WSSS dataset: textured objects of 3 classes on textured backgrounds, with true masks.

    >>> from apc_seg.data import make_synthetic
    >>> ds = make_synthetic(num_train=1024, num_val=256, num_test=256, image_size=96, seed=0)
    $ python -m apc_seg.data.synthetic --write_voc data/synthetic_voc --seed 0     # the same data as a VOC folder

Design (why it is built this way: a ViT trained from scratch on image labels learns any global shortcut it is given):
- A class is a texture family with a typical hue, as real classes have a typical appearance: ``stripes`` (reds),
  ``dots`` (a lattice of discs; greens) or ``checker`` (blues). Period, angle, the exact hue, saturation and
  brightness of the two colours vary per object, and the object's shape (ellipse, rectangle, triangle, wavy blob) is
  drawn independently of the class. The background's smooth colour fields span every hue, so colour alone neither
  finds nor delimits an object; colour and texture together do, and both are local evidence. (With colours drawn
  alike for every class, a tiny ViT from scratch did not learn the image labels at all within the recipe's budget:
  docs/benchmarks.md.)
- Backgrounds are textured too (smooth colour fields with a low-contrast, long-period marble grain and pixel noise).
- Each image holds 0..3 objects. The set of classes present is drawn so that all 8 subsets of the 3 classes
  (empty included) are equally frequent, i.e. each class is present with probability 1/2 independently of the
  others: "neither A nor B, so C" is never a valid inference. Objects of one or several classes overlap (later ones
  on top) and vary in size, but every object stays at least 40% visible, so every labelled class has real evidence.
- Half of the images get 1-2 tiny distractor patches (where they fit on the background) with a class texture; they
  are not labelled and are background in the mask (they are far smaller than any object), so "any trace of the
  texture" is not the label.
- Deterministic: image ``i`` of a split depends only on ``(seed, split, i)`` and the split's size (the class subsets
  are balanced over the whole split); the same seed and sizes give identical bytes.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..labels import SYNTHETIC_CLASSES, VOC_PALETTE
from .common import labels_from_mask, make_features

NUM_CLASSES = len(SYNTHETIC_CLASSES) - 1  # foreground classes
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_MIN_VISIBLE_FRACTION = 0.4  # of an object's own area
_MIN_VISIBLE_AREA = 0.025  # of the image area; distractors are at most 0.08**2 = 0.0064 of it


# ----------------------------------------------------------------------------------------------------------------
# Textures: each returns a {0, 1} pattern over the pixel grid, to be coloured with two colours.


def _rotated(yy, xx, rng):
    angle = rng.uniform(0, np.pi)
    return xx * np.cos(angle) + yy * np.sin(angle), -xx * np.sin(angle) + yy * np.cos(angle)


def _stripes(yy, xx, rng, scale):
    u, _ = _rotated(yy, xx, rng)
    period = rng.uniform(4.0, 8.0) * scale
    return (np.mod(u, period) < period / 2).astype(np.float32)


def _dots(yy, xx, rng, scale):
    u, v = _rotated(yy, xx, rng)
    period = rng.uniform(6.0, 9.0) * scale
    du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
    # Radius 0.32 period: separate dots, unlike the checker's corner-touching squares. Covering ~1/3 instead of 1/2
    # reveals nothing globally, since the two colours are drawn alike.
    return (du**2 + dv**2 < (0.32 * period) ** 2).astype(np.float32)


def _checker(yy, xx, rng, scale):
    u, v = _rotated(yy, xx, rng)
    cell = rng.uniform(3.0, 5.0) * scale
    return (np.mod(np.floor(u / cell) + np.floor(v / cell), 2)).astype(np.float32)


TEXTURES = {1: _stripes, 2: _dots, 3: _checker}  # class id -> texture family


CLASS_HUES = {1: 0.0, 2: 1 / 3, 3: 2 / 3}  # class id -> centre of its hue band (HSV hue in [0, 1))


def _class_colours(cls: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A light and a dark colour around class ``cls``'s hue, so the texture is visible (value 0.75-1 vs 0.15-0.45)."""
    hue = (CLASS_HUES[cls] + rng.uniform(-0.07, 0.07)) % 1.0
    light = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    dark = colorsys.hsv_to_rgb((hue + rng.uniform(-0.04, 0.04)) % 1.0, rng.uniform(0.4, 1.0), rng.uniform(0.15, 0.45))
    return np.array(light, np.float32) * 255, np.array(dark, np.float32) * 255


def _textured(cls, yy, xx, rng, scale) -> np.ndarray:
    """H x W x 3 float image of class ``cls``'s texture in its colours, with a soft shading gradient."""
    pattern = TEXTURES[cls](yy, xx, rng, scale)[..., None]
    a, b = _class_colours(cls, rng)
    gu, _ = _rotated(yy, xx, rng)
    shading = 1.0 + rng.uniform(0.0, 0.25) * (gu / max(gu.max() - gu.min(), 1.0))[..., None]
    return (a + (b - a) * pattern) * shading


# ----------------------------------------------------------------------------------------------------------------
# Shapes: class-independent boolean masks.


def _shape(yy, xx, rng, size: float, cy: float, cx: float) -> np.ndarray:
    u, v = _rotated(yy - cy, xx - cx, rng)
    kind = rng.integers(4)
    if kind == 0:  # ellipse
        return (u / size) ** 2 + (v / (size * rng.uniform(0.5, 1.0))) ** 2 <= 1
    if kind == 1:  # rectangle
        return (np.abs(u) <= 0.85 * size) & (np.abs(v) <= size * rng.uniform(0.45, 0.85))
    if kind == 2:  # triangle: inside all three edges of a jittered equilateral triangle
        angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.3, 0.3, 3)
        py, px = size * 1.2 * np.sin(angles), size * 1.2 * np.cos(angles)
        inside = np.ones_like(u, dtype=bool)
        for j in range(3):
            k = (j + 1) % 3
            cross = (px[k] - px[j]) * (v - py[j]) - (py[k] - py[j]) * (u - px[j])
            inside &= cross >= 0
        return inside
    # wavy blob: radius modulated with the polar angle
    radius = np.hypot(u, v)
    theta = np.arctan2(v, u)
    wobble = 1 + 0.25 * np.sin(rng.integers(3, 6) * theta + rng.uniform(0, 2 * np.pi))
    return radius <= size * wobble


# ----------------------------------------------------------------------------------------------------------------
# Images


def _smooth_field(rng, grid: int, size: int, channels: int) -> np.ndarray:
    """A smooth random field: a grid x grid random image upsampled bicubically."""
    coarse = rng.uniform(0, 255, size=(grid, grid, channels)).astype(np.uint8)
    image = Image.fromarray(coarse.squeeze(-1) if channels == 1 else coarse)
    field = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32)
    return field if channels > 1 else field[..., None]


def _background(yy, xx, rng, size: int, scale: float) -> np.ndarray:
    colour = _smooth_field(rng, 3, size, 3) * rng.uniform(0.5, 1.0) + rng.uniform(0, 100)
    warp = _smooth_field(rng, 5, size, 1)[..., 0] / 255.0 * rng.uniform(2.0, 6.0)
    u, _ = _rotated(yy, xx, rng)
    marble = np.sin(2 * np.pi * u / (rng.uniform(14.0, 28.0) * scale) + warp)  # long period, low contrast
    return colour + rng.uniform(8.0, 20.0) * marble[..., None]


def render(
    rng: np.random.Generator, image_size: int, object_classes: list[int], distractor_probability: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """One image (H x W x 3 uint8) and mask (H x W uint8) with objects of ``object_classes`` painted in order,
    and with probability ``distractor_probability`` 1-2 unlabelled distractor patches."""
    size, scale = image_size, image_size / 96.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _background(yy, xx, rng, size, scale)

    # Place the objects; redraw the layout until every object keeps enough visible area.
    for _ in range(100):
        owner = np.zeros((size, size), dtype=np.int64)  # 0 = background, j + 1 = object j
        areas = []
        for j in range(len(object_classes)):
            radius = rng.uniform(0.12, 0.28) * size
            cy, cx = rng.uniform(0.15, 0.85, size=2) * size
            shape = _shape(yy, xx, rng, radius, cy, cx)
            owner[shape] = j + 1
            areas.append(shape.sum())
        visible = np.bincount(owner.ravel(), minlength=len(object_classes) + 1)[1:]
        if all(v >= max(_MIN_VISIBLE_FRACTION * a, _MIN_VISIBLE_AREA * size * size) for v, a in zip(visible, areas)):
            break
    else:
        raise RuntimeError("could not place the objects")  # never seen with <= 3 objects; guards an endless loop

    lookup = np.array([0] + list(object_classes), dtype=np.uint8)
    mask = lookup[owner]
    for j, cls in enumerate(object_classes):
        region = owner == j + 1
        rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # texture only the bounding box
        image[box][region[box]] = _textured(cls, yy[box], xx[box], rng, scale)[region[box]]

    grain = rng.normal(0.0, 3.0, size=image.shape)  # drawn before the distractors, so they change nothing else

    # Distractors: tiny unlabelled texture fragments on the background (the mask stays 0 there).
    if rng.random() < distractor_probability:
        for _ in range(rng.integers(1, 3)):
            side = max(3, int(round(rng.uniform(0.05, 0.08) * size)))
            y0, x0 = rng.integers(0, size - side, size=2)
            window = (slice(y0, y0 + side), slice(x0, x0 + side))
            margin = (slice(max(0, y0 - 1), y0 + side + 1), slice(max(0, x0 - 1), x0 + side + 1))
            if owner[margin].any():
                continue  # only on background, never touching an object
            patch = _textured(int(rng.integers(1, NUM_CLASSES + 1)), yy[window], xx[window], rng, scale)
            if rng.random() < 0.5:  # a disc instead of a square
                dy, dx = yy[window] - (y0 + side / 2 - 0.5), xx[window] - (x0 + side / 2 - 0.5)
                keep = (dy**2 + dx**2 <= (side / 2) ** 2)[..., None]
                patch = np.where(keep, patch, image[window])
            image[window] = patch

    image = image + grain  # sensor-like grain everywhere
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


def _object_classes(rng: np.random.Generator, subset: int) -> list[int]:
    """The classes of the objects of an image whose class set is the bit set ``subset`` (0..7)."""
    present = [c for c in range(1, NUM_CLASSES + 1) if subset >> (c - 1) & 1]
    if not present:
        return []
    extra = rng.integers(0, NUM_CLASSES - len(present) + 1)  # up to 3 objects in all
    classes = present + list(rng.choice(present, size=extra))
    return [int(c) for c in rng.permutation(classes)]


def _png(array: np.ndarray, palette: list[int] | None = None) -> dict:
    """An ``Image`` column value: PNG bytes (fast compression; what datasets would store, made quicker)."""
    image = Image.fromarray(array)
    if palette:
        image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


def generate_split(num_images: int, image_size: int = 96, seed: int = 0, split: str = "train") -> list[dict]:
    """Rows of one split: ``image`` (RGB PNG), ``mask`` (palette PNG), ``class_labels``, ``image_id``."""
    code = _SPLIT_CODE[split]
    # Every class subset equally often (exactly, when num_images is a multiple of 8), in a seeded order.
    subsets = np.random.default_rng([seed, code, 1 << 20]).permutation(np.arange(num_images) % (1 << NUM_CLASSES))
    rows = []
    for i, subset in enumerate(subsets):
        rng = np.random.default_rng([seed, code, i])
        classes = _object_classes(rng, int(subset))
        image, mask = render(rng, image_size, classes)
        labels = labels_from_mask(mask)
        assert labels == sorted(set(classes)), (labels, classes)  # holds by the visibility rule
        rows.append(
            {"image": _png(image), "mask": _png(mask, VOC_PALETTE), "class_labels": labels, "image_id": f"{split}_{i:05d}"}
        )
    return rows


def make_synthetic(num_train: int = 1024, num_val: int = 256, num_test: int = 256, image_size: int = 96, seed: int = 0):
    """The synthetic dataset as a ``datasets.DatasetDict`` with ``train``/``val``/``test`` (masks always present).

    Class names are ``apc_seg.labels.SYNTHETIC_CLASSES`` (``num_labels`` = 4 with background). Built in memory
    (about 1,000 images of 96 px per few seconds); use :func:`write_voc` to keep it on disk.
    """
    import datasets

    features = make_features(SYNTHETIC_CLASSES)
    out = {}
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        if count <= 0:
            continue
        rows = generate_split(count, image_size, seed, split)
        columns = {key: [row[key] for row in rows] for key in features}
        dataset = datasets.Dataset.from_dict(columns, features=features, split=split)
        dataset.info.description = f"apc-seg synthetic '{split}': {count} images of {image_size}px, seed {seed}"
        out[split] = dataset
    return datasets.DatasetDict(out)


def write_voc(dataset_dict, out_dir: str | os.PathLike, jpeg_quality: int = 95) -> Path:
    """Write a DatasetDict in this package's schema as a VOC-style folder that :func:`load_voc` loads unchanged:
    ``JPEGImages/<id>.jpg`` (quality ``jpeg_quality``, no chroma subsampling so fine textures survive),
    ``SegmentationClass/<id>.png`` (palette PNGs in the VOC palette) and ``ImageSets/Segmentation/<split>.txt``."""
    out = Path(out_dir)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for split, dataset in dataset_dict.items():
        ids = []
        for row in dataset:
            image_id = row["image_id"]
            row["image"].convert("RGB").save(out / "JPEGImages" / f"{image_id}.jpg", quality=jpeg_quality, subsampling=0)
            if row["mask"] is not None:
                mask = Image.fromarray(np.array(row["mask"], dtype=np.uint8))
                mask.putpalette(VOC_PALETTE)
                mask.save(out / "SegmentationClass" / f"{image_id}.png")
            ids.append(image_id)
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate the apc-seg synthetic dataset as a VOC-format folder.")
    parser.add_argument("--write_voc", required=True, metavar="DIR", help="output folder (VOC2012-style layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=1024)
    parser.add_argument("--num_val", type=int, default=256)
    parser.add_argument("--num_test", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=96)
    args = parser.parse_args(argv)
    ds = make_synthetic(args.num_train, args.num_val, args.num_test, args.image_size, args.seed)
    out = write_voc(ds, args.write_voc)
    print(f"Wrote {sum(len(d) for d in ds.values())} images to {out} ({', '.join(f'{k}: {len(v)}' for k, v in ds.items())})")


if __name__ == "__main__":
    main()
