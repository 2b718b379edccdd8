"""Image processor for APC: Segformer's PIL-backend processor with ViT normalisation and a 448 default size."""

from __future__ import annotations

from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil


class APCImageProcessor(SegformerImageProcessorPil):
    r"""
    Resizes images to `size` (default 448x448, the APC training crop; a multiple of the ViT patch size 16),
    rescales to [0, 1] and normalises with the ViT mean/std (0.5, 0.5, 0.5). Segmentation maps are resized with
    nearest neighbour and returned as `labels`, unchanged otherwise (`do_reduce_labels=False`: APC's label 0 is
    background and is a real class). `post_process_semantic_segmentation` upsamples the decoder logits to any size.

    It is Segformer's PIL backend (no torchvision needed). The class name must not end in `Pil`: transformers strips
    that suffix in `to_dict`, and the saved `image_processor_type` would then name a class that does not exist.
    """

    model_input_names = ["pixel_values"]
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    size = {"height": 448, "width": 448}
    do_reduce_labels = False


__all__ = ["APCImageProcessor"]
