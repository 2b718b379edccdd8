"""Datasets for apc-seg: PASCAL VOC 2012, MS COCO 2014 and the built-in synthetic dataset, all in one schema.

Every loader returns a ``datasets.DatasetDict`` whose rows are
``{"image": PIL RGB, "mask": PIL index mask or None, "class_labels": [foreground ids], "image_id": str}``.
"""

from .coco import load_coco, load_coco_instances, render_coco_mask
from .common import BadInputError, labels_from_mask, num_labels_of, skipped_count
from .voc import load_voc
from .synthetic import make_synthetic, write_voc
from .transforms import (
    VIT_MEAN,
    VIT_STD,
    EvalTransform,
    TrainTransform,
    class_labels_to_multi_hot,
    collate_fn,
    sample_rng,
)
