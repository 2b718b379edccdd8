"""MS COCO (2014 by default) as a ``datasets.DatasetDict`` with image-level labels and semantic masks.

    >>> from apc_seg.data import load_coco, load_coco_instances
    >>> coco = load_coco("data/coco", splits=("train", "val"))                  # train2014/, val2014/, annotations/
    >>> one = load_coco_instances("instances.json", "images/", split="test")    # any instances json + image folder

Labels: the categories of all the image's instances (crowd ones included), mapped from COCO category ids (1..90 with
gaps) to contiguous label ids 1..80 by ``apc_seg.labels.COCO_CATEGORY_TO_LABEL``.

Masks are rendered from the instances (polygons, uncompressed and compressed RLE) unless ``mask_dir`` is given:
- non-crowd instances are painted largest first, so a smaller instance lying on a larger one stays visible
  (a person in front of a couch keeps its pixels); equal areas keep the annotation order (later on top);
- crowd regions (``iscrowd=1``) become 255 (ignored) wherever no non-crowd instance covers them;
- everything else is background (0).
Rendering needs pycocotools (``pip install "apc-seg[coco]"``); ``masks=False`` loads labels without it.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from ..labels import COCO_CATEGORIES, COCO_CATEGORY_TO_LABEL, COCO_CLASSES, IGNORE_INDEX, VOC_PALETTE
from .common import (
    BadInputError,
    build_dataset,
    check_mask_array,
    encode_png,
    fingerprint,
    image_value,
    open_rgb,
    read_mask,
)

COCO_LAYOUT = """Expected an MS COCO folder laid out as
  <root>/train2014/COCO_train2014_<id>.jpg
  <root>/val2014/COCO_val2014_<id>.jpg
  <root>/annotations/instances_train2014.json
  <root>/annotations/instances_val2014.json
(year=2017 reads train2017/, val2017/ and instances_*2017.json). Optional prepared masks: <mask_dir>/<split><year>/
<file stem>.png or <mask_dir>/<file stem>.png, index PNGs with values 0..80 and 255.
Get COCO 2014 from https://cocodataset.org/#download (2014 Train images, 2014 Val images,
2014 Train/Val annotations); see docs/data.md."""

_COCO_NAMES = dict(COCO_CATEGORIES)


def _pycocotools_mask():
    try:
        from pycocotools import mask as mask_utils
    except ImportError as err:
        raise ImportError(
            'Rendering COCO masks needs pycocotools: pip install "apc-seg[coco]" (or pass masks=False, or a '
            "prepared mask_dir)."
        ) from err
    return mask_utils


def _check_categories(categories: list[dict], annotation_file: str) -> None:
    """Refuse a json whose category ids or names differ from COCO's, rather than mislabel silently."""
    for cat in categories:
        expected = _COCO_NAMES.get(cat["id"])
        if expected is None or expected != cat.get("name", expected):
            raise BadInputError(
                f"{annotation_file}: category id {cat['id']} ({cat.get('name')!r}) is not the COCO category "
                f"{cat['id']} ({expected!r}); only the 80 standard COCO categories are supported."
            )


def _annotation_rle(annotation: dict, height: int, width: int, mask_utils):
    """A compressed RLE for any COCO segmentation form (as pycocotools' COCO.annToRLE)."""
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation  # compressed RLE


def render_coco_mask(annotations: list[dict], height: int, width: int) -> np.ndarray:
    """The semantic mask (H x W uint8: 0 background, 1..80 classes, 255 crowd) of one image's instances."""
    mask_utils = _pycocotools_mask()
    mask = np.zeros((height, width), dtype=np.uint8)
    crowd = np.zeros((height, width), dtype=bool)
    things = []
    for order, ann in enumerate(annotations):
        binary = mask_utils.decode(_annotation_rle(ann, height, width, mask_utils)).astype(bool)
        if ann.get("iscrowd", 0):
            crowd |= binary
        else:
            area = ann.get("area", binary.sum())
            things.append((-area, order, COCO_CATEGORY_TO_LABEL[ann["category_id"]], binary))
    covered = np.zeros((height, width), dtype=bool)
    for _, _, label, binary in sorted(things, key=lambda t: (t[0], t[1])):  # largest first; smaller on top
        mask[binary] = label
        covered |= binary
    mask[crowd & ~covered] = IGNORE_INDEX
    return mask


def _coco_example(record: dict, masks: bool) -> dict:
    image, converted = open_rgb(record["path"])
    if image.size != (record["width"], record["height"]):
        raise BadInputError(
            f"Image {record['path']} is {image.width}x{image.height} but its annotation says "
            f"{record['width']}x{record['height']}."
        )
    mask_value = None
    if record["mask_path"] is not None:
        read_mask(record["mask_path"], len(COCO_CLASSES), image.size)
        mask_value = {"path": os.path.abspath(record["mask_path"]), "bytes": None}
    elif masks:
        mask = render_coco_mask(record["annotations"], record["height"], record["width"])
        check_mask_array(mask, len(COCO_CLASSES), record["path"], image.size)
        mask_image = Image.fromarray(mask)
        mask_image.putpalette(VOC_PALETTE)
        mask_value = {"path": None, "bytes": encode_png(mask_image)}
    return {
        "image": image_value(record["path"], image, converted),
        "mask": mask_value,
        "class_labels": record["class_labels"],
        "image_id": record["image_id"],
    }


def _records(annotation_file: Path, image_dir: Path, mask_dir: Path | None) -> list[dict]:
    with open(annotation_file) as f:
        data = json.load(f)
    _check_categories(data.get("categories", []), str(annotation_file))
    by_image: dict[int, list] = {}
    for ann in data.get("annotations", []):
        if ann["category_id"] not in COCO_CATEGORY_TO_LABEL:
            raise BadInputError(f"{annotation_file}: annotation {ann.get('id')} has unknown category {ann['category_id']}.")
        by_image.setdefault(ann["image_id"], []).append(ann)
    records = []
    for info in sorted(data["images"], key=lambda im: im["id"]):
        anns = by_image.get(info["id"], [])
        stem = Path(info["file_name"]).stem
        mask_path = None
        if mask_dir is not None:
            mask_path = str(mask_dir / f"{stem}.png")
        records.append(
            {
                "image_id": stem,
                "path": str(image_dir / info["file_name"]),
                "height": int(info["height"]),
                "width": int(info["width"]),
                "annotations": anns,
                "class_labels": sorted({COCO_CATEGORY_TO_LABEL[a["category_id"]] for a in anns}),
                "mask_path": mask_path,
            }
        )
    return records


def load_coco_instances(
    annotation_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    split: str = "val",
    mask_dir: str | os.PathLike | None = None,
    masks: bool = True,
    skip_bad_images: bool = False,
    cache_dir: str | None = None,
    num_proc: int | None = None,
):
    """One split from any COCO instances json and its image folder, as a ``datasets.Dataset``.

    Args:
        annotation_file: an ``instances_*.json`` (COCO categories, any subset of them).
        image_dir: the folder the json's ``file_name`` entries are relative to.
        split: the split's name.
        mask_dir: read ``<mask_dir>/<file stem>.png`` index masks instead of rendering them.
        masks: render masks from the instances (needs pycocotools); False leaves ``mask`` None.
        skip_bad_images, cache_dir, num_proc: as in :func:`apc_seg.data.load_voc`.
    """
    annotation_file, image_dir = Path(annotation_file).expanduser().resolve(), Path(image_dir).expanduser().resolve()
    for path in (annotation_file, image_dir):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist.\n{COCO_LAYOUT}")
    mask_dir = Path(mask_dir).expanduser().resolve() if mask_dir is not None else None
    if mask_dir is not None and not mask_dir.is_dir():
        raise FileNotFoundError(f"Mask folder {mask_dir} does not exist.\n{COCO_LAYOUT}")
    if masks and mask_dir is None:
        _pycocotools_mask()  # fail early with the install hint, not inside the generator
    records = _records(annotation_file, image_dir, mask_dir)
    files = [str(annotation_file)] + [r["path"] for r in records] + [r["mask_path"] for r in records if r["mask_path"]]
    key = fingerprint("coco", str(annotation_file), str(image_dir), split, masks, skip_bad_images, files=files)
    return build_dataset(
        records,
        functools.partial(_coco_example, masks=masks),
        class_names=COCO_CLASSES,
        key=key,
        split=split,
        cache_dir=cache_dir,
        skip_bad_images=skip_bad_images,
        description=f"MS COCO '{split}' from {annotation_file} and {image_dir}",
        num_proc=num_proc,
    )


def load_coco(
    root: str | os.PathLike,
    splits: str | Iterable[str] = ("train", "val"),
    year: int = 2014,
    mask_dir: str | os.PathLike | None = None,
    skip_bad_images: bool = False,
    cache_dir: str | None = None,
    masks: bool = True,
    num_proc: int | None = None,
):
    """Load MS COCO splits (``train``/``val``) from ``<root>/<split><year>/`` and
    ``<root>/annotations/instances_<split><year>.json`` as a ``datasets.DatasetDict``.

    ``mask_dir``: prepared index masks, in ``<mask_dir>/<split><year>/`` or directly in ``<mask_dir>``; otherwise
    masks are rendered from the instances (see the module docstring for the overlap rules).
    ``skip_bad_images``, ``cache_dir``, ``num_proc``: as in :func:`apc_seg.data.load_voc`.
    """
    import datasets

    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"No MS COCO folder found at {str(root)!r}.\n{COCO_LAYOUT}")
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    out = {}
    for split in splits:
        name = f"{split}{year}"
        annotation_file, image_dir = root / "annotations" / f"instances_{name}.json", root / name
        if not annotation_file.is_file() or not image_dir.is_dir():
            raise FileNotFoundError(
                f"Split {split!r} (year {year}) not found: need {image_dir} and {annotation_file}.\n{COCO_LAYOUT}"
            )
        split_masks = None
        if mask_dir is not None:
            split_masks = Path(mask_dir) / name if (Path(mask_dir) / name).is_dir() else Path(mask_dir)
        out[split] = load_coco_instances(
            annotation_file, image_dir, split, split_masks, masks, skip_bad_images, cache_dir, num_proc
        )
    return datasets.DatasetDict(out)
