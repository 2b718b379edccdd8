"""Helpers shared by the VOC, COCO and synthetic loaders: the schema, validated image/mask reading and caching.

Every loader turns a list of raw records (paths, ids) into a ``datasets.Dataset`` with ``Dataset.from_generator``.
Each image (and mask) is decoded once while the dataset is built, so that a truncated file, a wrong mask or an
out-of-range label is caught before training starts; the Arrow cache then makes the second call fast. The cache
key is our own fingerprint of the root path and of every file's size and mtime, so a different folder or an edited
file never reuses a stale cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..labels import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Bump when the schema or the decoding rules change, so old caches are not reused.
CACHE_VERSION = "apc-data-2"  # 2: bad-file reports per shard (num_proc)


class BadInputError(ValueError):
    """An image, mask or annotation that cannot be used as is. The message always names the file."""


def make_features(class_names: Sequence[str]):
    """The schema shared by every loader: ``image``, ``mask`` (may be None), ``class_labels``, ``image_id``.

    ``class_labels`` holds the foreground class ids present in the image (sorted, no background, no 255); their
    names travel with the dataset as a ``ClassLabel``, so ``features["class_labels"].feature.names`` is the full
    class list with background at 0 and ``.num_classes`` is ``num_labels``.
    """
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "class_labels": datasets.List(datasets.ClassLabel(names=list(class_names))),
            "image_id": datasets.Value("string"),
        }
    )


def num_labels_of(dataset) -> int:
    """``num_labels`` (background included) of a dataset built by this package."""
    return dataset.features["class_labels"].feature.num_classes


# ----------------------------------------------------------------------------------------------------------------
# Images


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without silently wrong colours."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grayscale: convert("RGB") would clip at 255 and turn the image white; scale
        # the 0..65535 range down instead.
        array = np.asarray(image, dtype=np.float64)
        array = np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        raise ValueError("floating-point images ('F' mode) have no defined 8-bit range")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # Composite transparency onto white, as transformers' convert_to_rgb does, so the model sees what a viewer
        # shows instead of whatever colour hides under alpha 0.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, YCbCr, LAB, 1, RGB


def open_rgb(path: str | os.PathLike) -> tuple[Image.Image, bool]:
    """Fully decode an image file as upright 8-bit RGB.

    Returns ``(image, converted)``; ``converted`` is True when the file on disk is not already what the dataset
    should hold (not RGB, or rotated by EXIF), in which case the loader stores the converted pixels instead of the
    path. Raises :class:`BadInputError` naming the file if it is missing, not an image or truncated.
    """
    path = str(path)
    try:
        with Image.open(path) as raw:
            raw.load()  # forces a full decode: a truncated JPEG raises here and not in the middle of training
            orientation = raw.getexif().get(0x0112)  # EXIF Orientation; 1 means "already upright"
            image = ImageOps.exif_transpose(raw) if orientation not in (None, 1) else raw.copy()
            converted = orientation not in (None, 1) or raw.mode != "RGB"
            if image.mode != "RGB":
                image = _to_rgb(image)
    except FileNotFoundError as err:
        raise BadInputError(f"Image file not found: {path}") from err
    except UnidentifiedImageError as err:
        raise BadInputError(f"Not an image file (cannot identify it): {path}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise BadInputError(f"Unreadable or truncated image {path}: {err}") from err
    return image, converted


def image_value(path: str | os.PathLike, image: Image.Image, converted: bool) -> dict:
    """The value stored in an ``Image`` column: the file path when it can be read as is, else lossless PNG bytes."""
    if not converted:
        return {"path": os.path.abspath(path), "bytes": None}
    return {"path": None, "bytes": encode_png(image)}


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Masks and labels


def check_mask_array(mask: np.ndarray, num_labels: int, source: str, image_size: tuple[int, int] | None) -> None:
    """Raise :class:`BadInputError` if ``mask`` has the wrong size or a value outside ``0..num_labels-1`` and 255."""
    if image_size is not None and (mask.shape[1], mask.shape[0]) != tuple(image_size):
        raise BadInputError(
            f"Mask {source} is {mask.shape[1]}x{mask.shape[0]} but its image is {image_size[0]}x{image_size[1]}."
        )
    values = np.unique(mask)
    bad = values[(values >= num_labels) & (values != IGNORE_INDEX)]
    if bad.size:
        raise BadInputError(
            f"Mask {source} holds label values {bad.tolist()} outside 0..{num_labels - 1} and {IGNORE_INDEX}."
        )


def read_mask(path: str | os.PathLike, num_labels: int, image_size: tuple[int, int] | None) -> np.ndarray:
    """Read an index mask (palette or grayscale PNG) as uint8 and validate it against ``num_labels`` and its image.

    Palette PNGs are read by index (the VOC convention), never by colour. Colour (RGB) masks are refused rather than
    guessed at.
    """
    path = str(path)
    try:
        with Image.open(path) as raw:
            raw.load()
            if raw.mode not in ("P", "L"):
                raise BadInputError(
                    f"Mask {path} has mode {raw.mode!r}; expected an index PNG (palette 'P' or grayscale 'L') whose "
                    "pixel values are class ids."
                )
            mask = np.array(raw, dtype=np.uint8)
    except FileNotFoundError as err:
        raise BadInputError(f"Mask file not found: {path}") from err
    except UnidentifiedImageError as err:
        raise BadInputError(f"Not an image file (cannot identify mask): {path}") from err
    except OSError as err:
        raise BadInputError(f"Unreadable or truncated mask {path}: {err}") from err
    check_mask_array(mask, num_labels, path, image_size)
    return mask


def labels_from_mask(mask: np.ndarray) -> list[int]:
    """The sorted foreground class ids in a mask: every value other than 0 (background) and 255 (ignore)."""
    values = np.unique(mask)
    return [int(v) for v in values if v != 0 and v != IGNORE_INDEX]


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints and building


def fingerprint(*parts, files: Iterable[str | os.PathLike] = ()) -> str:
    """A cache key from ``parts`` (paths, options) and the size and mtime of each file in ``files``."""
    digest = hashlib.sha256(CACHE_VERSION.encode())
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\0")
    for file in files:
        try:
            stat = os.stat(file)
            digest.update(f"{file}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            digest.update(f"{file}|missing\n".encode())
    return digest.hexdigest()[:32]


def default_cache_dir() -> str:
    import datasets

    return str(datasets.config.HF_DATASETS_CACHE)


# Records per generator shard. Set by the split's size alone, not by the number of processes, so that a cached call
# reads exactly the report files the build wrote, whatever `num_proc` either call used.
RECORDS_PER_SHARD = 1000


def _report_path(report_stem: str, shard_index: int) -> str:
    return f"{report_stem}-{shard_index:05d}.json"


def _error_path(report_stem: str, shard_index: int) -> str:
    return f"{report_stem}-{shard_index:05d}.error"


def _generate(shards: list, make_example: Callable, report_stem: str, skip_bad_images: bool):
    """The generator behind ``Dataset.from_generator``: decodes each record, skipping or raising on bad input.

    ``shards`` is this process's part of the split, a list of ``(shard_index, records)`` in split order.
    """
    for shard_index, records in shards:
        skipped = []
        for record in records:
            try:
                example = make_example(record)
            except BadInputError as err:
                if not skip_bad_images:
                    # A worker process's exception reaches the parent without its cause (exceptions pickle without
                    # `__cause__`), so the message that names the file travels through the cache folder too.
                    path = _error_path(report_stem, shard_index)
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                    Path(path).write_text(str(err))
                    raise
                warnings.warn(f"Skipping bad input: {err}", stacklevel=2)
                skipped.append(str(err))
                continue
            yield example
        # Written only after the shard's last example, so all reports exist exactly when the cache is complete.
        path = _report_path(report_stem, shard_index)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"skipped": len(skipped), "messages": skipped}, f)


def _skipped_count(report_stem: str, shards: list) -> int:
    total = 0
    for shard_index, _ in shards:
        if os.path.exists(_report_path(report_stem, shard_index)):
            with open(_report_path(report_stem, shard_index)) as f:
                total += json.load(f)["skipped"]
    return total


def build_dataset(
    records: list,
    make_example: Callable,
    *,
    class_names: Sequence[str],
    key: str,
    split: str,
    cache_dir: str | None,
    skip_bad_images: bool,
    description: str,
    num_proc: int | None = None,
):
    """Build (or load from cache) one split.

    ``records`` are the raw per-image inputs, ``make_example(record)`` returns one schema row or raises
    :class:`BadInputError`. ``key`` is the fingerprint. The number of skipped records is logged, stored in
    ``dataset.info.description`` (read it with :func:`skipped_count`); small sidecar reports in the cache keep it
    known on a cached call, which decodes nothing. ``num_proc`` processes decode shards of
    :data:`RECORDS_PER_SHARD` records (at most one process per shard); rows keep the records' order, and the cache is
    the same whatever ``num_proc`` built it.
    """
    import datasets

    if not records:
        raise BadInputError(f"Split {split!r} is empty: {description}")
    cache_dir = cache_dir or default_cache_dir()
    report_stem = os.path.join(cache_dir, "apc_seg_reports", key)
    shards = [(index, tuple(records[start: start + RECORDS_PER_SHARD]))
              for index, start in enumerate(range(0, len(records), RECORDS_PER_SHARD))]
    num_proc = min(num_proc or 1, len(shards))
    try:
        dataset = datasets.Dataset.from_generator(
            _generate,
            features=make_features(class_names),
            cache_dir=cache_dir,
            # A list: datasets gives each process a contiguous part of it, and concatenates their outputs in order.
            gen_kwargs={"shards": shards, "make_example": make_example, "report_stem": report_stem,
                        "skip_bad_images": skip_bad_images},
            num_proc=num_proc if num_proc > 1 else None,
            fingerprint=key,
            # datasets reserves "all" and wants \w+ names; the DatasetDict key stays the user's name.
            split=datasets.NamedSplit(split if re.fullmatch(r"\w+", split) and split != "all" else f"split_{key[:8]}"),
        )
    except datasets.exceptions.DatasetGenerationError as err:
        # datasets wraps whatever the generator raised; give the user our error, which names the file.
        messages = []
        for shard_index, _ in shards:
            path = Path(_error_path(report_stem, shard_index))
            if path.exists():
                messages.append(path.read_text())
                path.unlink()
        if isinstance(err.__cause__, BadInputError):
            raise err.__cause__ from None
        if messages:
            raise BadInputError(messages[0]) from None
        raise
    except ValueError:
        # datasets cannot make a dataset of no rows; when every file was skipped, say so.
        if _skipped_count(report_stem, shards) == len(records):
            raise BadInputError(f"Split {split!r} is empty after skipping {len(records)} bad file(s): "
                                f"{description}") from None
        raise
    skipped = _skipped_count(report_stem, shards)
    if skipped:
        logger.warning("Split %r: skipped %d bad file(s) of %d.", split, skipped, len(records))
    dataset.info.description = f"{description} | skipped bad files: {skipped}"
    return dataset


def skipped_count(dataset) -> int:
    """How many bad files were skipped when ``dataset`` was built (0 unless ``skip_bad_images=True``)."""
    text = dataset.info.description or ""
    marker = "skipped bad files: "
    return int(text.rsplit(marker, 1)[1]) if marker in text else 0
