"""apc-seg: weakly supervised semantic segmentation with APC (Adaptive-K Pooling + Patch Contrastive Learning).

Importing the package registers the model with transformers' Auto classes, so `AutoConfig`,
`AutoModelForSemanticSegmentation`, `AutoImageProcessor` and `pipeline("image-segmentation")` load APC folders.
"""

__version__ = "0.1.0"

from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation

from .configuration_apc import APCConfig
from .image_processing_apc import APCImageProcessor
from .labels import COCO_CLASSES, IGNORE_INDEX, SYNTHETIC_CLASSES, VOC_CLASSES, VOC_PALETTE
from .modeling_apc import APCForSemanticSegmentation, APCPreTrainedModel, APCSemanticSegmenterOutput

AutoConfig.register(APCConfig.model_type, APCConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(APCConfig, APCForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(APCConfig, image_processor_classes={"pil": APCImageProcessor}, exist_ok=True)

__all__ = [
    "APCConfig",
    "APCForSemanticSegmentation",
    "APCImageProcessor",
    "APCPreTrainedModel",
    "APCSemanticSegmenterOutput",
    "COCO_CLASSES",
    "IGNORE_INDEX",
    "SYNTHETIC_CLASSES",
    "VOC_CLASSES",
    "VOC_PALETTE",
]
