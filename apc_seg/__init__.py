"""apc-seg: weakly supervised semantic segmentation with APC (Adaptive-K Pooling + Patch Contrastive Learning)."""

__version__ = "0.1.0"

from .labels import COCO_CLASSES, IGNORE_INDEX, SYNTHETIC_CLASSES, VOC_CLASSES, VOC_PALETTE
