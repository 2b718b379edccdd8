"""PASCAL VOC 2012 (and SBD's SegmentationClassAug for ``train_aug``) as a ``datasets.DatasetDict``.

    >>> from apc_seg.data import load_voc
    >>> voc = load_voc("data/VOCdevkit/VOC2012", splits=("train_aug", "val"))
    >>> voc["val"][0]  # {"image": PIL, "mask": PIL (palette) or None, "class_labels": [15], "image_id": "2007_000033"}

Image-level labels come from the masks (every value other than 0 and 255) or, for an image without a mask, from
its ``Annotations/<id>.xml``. The loader never guesses a label: an image with neither raises an error.
"""

from __future__ import annotations

import functools
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable

from ..labels import VOC_CLASSES
from .common import (
    BadInputError,
    build_dataset,
    fingerprint,
    image_value,
    labels_from_mask,
    open_rgb,
    read_mask,
)

VOC_LAYOUT = """Expected a PASCAL VOC 2012 folder laid out as
  <root>/VOCdevkit/VOC2012/        (root may also be the VOCdevkit/ or the VOC2012/ folder itself)
      JPEGImages/<id>.jpg
      SegmentationClass/<id>.png       index (palette) PNGs, values 0..20 and 255
      SegmentationClassAug/<id>.png    SBD masks, only needed for the 'train_aug' split
      Annotations/<id>.xml             optional: image labels for images that have no mask
      ImageSets/Segmentation/<split>.txt   one image id per line: train.txt, val.txt, trainval.txt, test.txt,
                                           train_aug.txt (optional), or any <name>.txt for splits=["<name>"]
Get VOC 2012 from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ (VOCtrainval_11-May-2012.tar) and SBD's
SegmentationClassAug (10,582 train_aug masks, e.g. the SegmentationClassAug.zip used by DeepLab/SEAM/ToCo);
see docs/data.md."""

_VOC_LABEL = {name: i for i, name in enumerate(VOC_CLASSES)}


def find_voc_root(root: str | os.PathLike) -> Path:
    """The VOC2012 folder for ``root`` = VOC2012/, VOCdevkit/ or the parent of VOCdevkit/."""
    root = Path(root).expanduser()
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate.resolve()
    raise FileNotFoundError(f"No PASCAL VOC folder found at {str(root)!r}.\n{VOC_LAYOUT}")


def default_train_split(root: str | os.PathLike) -> str:
    """The training split WSSS papers use: ``train_aug`` (10,582 images) when SBD's ``SegmentationClassAug`` is
    there, else VOC's own ``train`` (1,464)."""
    root = Path(root).expanduser()
    folders = (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012")
    has_aug = any((folder / "SegmentationClassAug").is_dir() for folder in folders)
    return "train_aug" if has_aug else "train"


def _read_id_list(path: Path) -> list[str]:
    """Image ids of a split list. Accepts plain ids and DeepLab-style lines ("/JPEGImages/x.jpg /Seg.../x.png")."""
    ids = []
    for line in path.read_text().splitlines():
        if line.strip():
            ids.append(Path(line.split()[0]).stem)
    return ids


def labels_from_xml(path: str | os.PathLike) -> list[int]:
    """Sorted VOC class ids of the objects listed in an ``Annotations/<id>.xml`` file."""
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as err:
        raise BadInputError(f"Unreadable annotation {path}: {err}") from err
    labels = set()
    for name in tree.getroot().iter("object"):
        text = (name.findtext("name") or "").strip()
        if text not in _VOC_LABEL or text == "background":
            raise BadInputError(f"Annotation {path} names an unknown VOC class {text!r}.")
        labels.add(_VOC_LABEL[text])
    return sorted(labels)


def _split_records(voc: Path, split: str) -> tuple[list[tuple], Path]:
    """(image_id, image_path, mask_path or None, xml_path or None) for each image of ``split``, and the list file."""
    lists = voc / "ImageSets" / "Segmentation"
    mask_dir = voc / ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass")
    list_file = lists / f"{split}.txt"
    if split == "train_aug" and not mask_dir.is_dir():
        raise FileNotFoundError(f"Split 'train_aug' needs SBD's masks in {mask_dir}, which is missing.\n{VOC_LAYOUT}")
    if list_file.is_file():
        ids = _read_id_list(list_file)
    elif split == "train_aug":
        # The standard train_aug list: every SBD+VOC mask except the VOC val images (10,582 for the full data).
        val_file = lists / "val.txt"
        if not val_file.is_file():
            raise FileNotFoundError(f"Building 'train_aug' needs {val_file} to exclude val images.\n{VOC_LAYOUT}")
        val = set(_read_id_list(val_file))
        ids = sorted(p.stem for p in mask_dir.glob("*.png") if p.stem not in val)
        list_file = mask_dir
    else:
        available = sorted(p.stem for p in lists.glob("*.txt"))
        raise FileNotFoundError(
            f"Split {split!r} not found: {list_file} is missing (available: {available}).\n{VOC_LAYOUT}"
        )
    records = []
    for image_id in ids:
        mask = mask_dir / f"{image_id}.png"
        xml = voc / "Annotations" / f"{image_id}.xml"
        records.append(
            (image_id, str(voc / "JPEGImages" / f"{image_id}.jpg"),
             str(mask) if mask.is_file() else None, str(xml) if xml.is_file() else None)
        )
    return records, list_file


def _voc_example(record: tuple, num_labels: int) -> dict:
    image_id, image_path, mask_path, xml_path = record
    image, converted = open_rgb(image_path)
    if mask_path is not None:
        mask = read_mask(mask_path, num_labels, image.size)
        labels = labels_from_mask(mask)
    elif xml_path is not None:
        labels = labels_from_xml(xml_path)
    else:
        raise BadInputError(
            f"Image {image_path} has neither a mask nor an Annotations xml, so its labels are unknown. (A split "
            "without labels, such as VOC's test split, is segmented with apc-infer --image_list; docs/training.md.)"
        )
    return {
        "image": image_value(image_path, image, converted),
        "mask": {"path": mask_path, "bytes": None} if mask_path is not None else None,
        "class_labels": labels,
        "image_id": image_id,
    }


def load_voc(
    root: str | os.PathLike,
    splits: str | Iterable[str] = ("train", "val"),
    skip_bad_images: bool = False,
    cache_dir: str | None = None,
    num_proc: int | None = None,
):
    """Load PASCAL VOC 2012 splits as a ``datasets.DatasetDict``.

    Args:
        root: the VOC2012 folder, the VOCdevkit folder or its parent.
        splits: names of ``ImageSets/Segmentation/<name>.txt`` lists (train, val, trainval, test, or any other),
            or ``"train_aug"`` (SBD masks from ``SegmentationClassAug``; list from ``train_aug.txt`` if present,
            else every SegmentationClassAug mask not in val).
        skip_bad_images: skip unreadable images and invalid masks with a warning (the count is in
            ``dataset.info.description``; see :func:`apc_seg.data.skipped_count`) instead of raising.
        cache_dir: where ``datasets`` caches the built Arrow files (default: the HF datasets cache).
        num_proc: processes that decode the images when a split is first built (default: one). Each takes shards of
            1,000 images, so small splits stay in one process; the result and its cache do not depend on it.

    Returns:
        ``DatasetDict`` with columns ``image``, ``mask`` (None without a mask), ``class_labels``, ``image_id``.
    """
    import datasets

    voc = find_voc_root(root)
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    num_labels = len(VOC_CLASSES)
    out = {}
    for split in splits:
        records, list_file = _split_records(voc, split)
        files = [str(list_file)] + [p for r in records for p in r[1:] if p is not None]
        key = fingerprint("voc", str(voc), split, skip_bad_images, files=files)
        out[split] = build_dataset(
            records,
            functools.partial(_voc_example, num_labels=num_labels),
            class_names=VOC_CLASSES,
            key=key,
            split=split,
            cache_dir=cache_dir,
            skip_bad_images=skip_bad_images,
            description=f"PASCAL VOC 2012 '{split}' from {voc} ({list_file})",
            num_proc=num_proc,
        )
    return datasets.DatasetDict(out)
