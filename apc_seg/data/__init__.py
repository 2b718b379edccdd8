"""Datasets for apc-seg: PASCAL VOC 2012, MS COCO 2014 and the built-in synthetic dataset, all in one schema.

Every loader returns a ``datasets.DatasetDict`` whose rows are
``{"image": PIL RGB, "mask": PIL index mask or None, "class_labels": [foreground ids], "image_id": str}``.
"""

from .coco import load_coco, load_coco_instances, render_coco_mask
from .common import BadInputError, labels_from_mask, num_labels_of, skipped_count
from .transforms import (
    VIT_MEAN,
    VIT_STD,
    EvalTransform,
    TrainTransform,
    class_labels_to_multi_hot,
    collate_fn,
    sample_rng,
)
from .voc import load_voc


def __getattr__(name):
    # The synthetic module is imported on first use, so `python -m apc_seg.data.synthetic` runs it cleanly
    # (importing it here would load it twice, once as a package member and once as __main__).
    if name in ("make_synthetic", "write_voc"):
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BadInputError",
    "EvalTransform",
    "TrainTransform",
    "VIT_MEAN",
    "VIT_STD",
    "class_labels_to_multi_hot",
    "collate_fn",
    "labels_from_mask",
    "load_coco",
    "load_coco_instances",
    "load_voc",
    "make_synthetic",
    "num_labels_of",
    "render_coco_mask",
    "sample_rng",
    "skipped_count",
    "write_voc",
]
