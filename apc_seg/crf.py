"""Dense CRF refinement of segmentation probabilities (optional post-processing of ``apc-eval --crf``).

A fully connected CRF (Krähenbühl & Koltun, 2011) sharpens the decoder's upsampled, blurry probabilities along
image edges: pixels that look alike and lie close together are pushed towards the same label. The defaults are the
usual DeepLab / WSSS settings: 10 mean-field iterations, a Gaussian smoothness kernel (sxy 1, compat 1) and a
bilateral appearance kernel (sxy 121, srgb 5, compat 4).

Needs ``pydensecrf2`` (``pip install "apc-seg[crf]"``), imported only when the CRF is used.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_MISSING_MESSAGE = (
    'The dense CRF needs pydensecrf2, which is not installed. Install it with: pip install "apc-seg[crf]"'
)


def _import_densecrf():
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError as err:
        raise ImportError(_MISSING_MESSAGE) from err
    return densecrf


def dense_crf(
    image: Any,
    probs: Any,
    iterations: int = 10,
    gaussian_sxy: float = 1,
    gaussian_compat: float = 1,
    bilateral_sxy: float = 121,
    bilateral_srgb: float = 5,
    bilateral_compat: float = 4,
) -> Any:
    """Refines per-pixel class probabilities with a dense CRF.

    Args:
        image: H x W x 3 uint8 RGB image (numpy array, tensor or PIL image) at the resolution of ``probs``.
        probs: C x H x W class probabilities (softmax output; each pixel sums to 1), numpy array or tensor.
        iterations: mean-field inference steps.
        gaussian_sxy, gaussian_compat: spatial smoothness kernel (position only).
        bilateral_sxy, bilateral_srgb, bilateral_compat: appearance kernel (position and colour).

    Returns:
        Refined C x H x W float32 probabilities (each pixel sums to 1): a tensor on ``probs``' device if ``probs``
        is a tensor, else a numpy array.
    """
    densecrf = _import_densecrf()
    is_tensor = isinstance(probs, torch.Tensor)
    probs_np = probs.detach().float().cpu().numpy() if is_tensor else np.asarray(probs, dtype=np.float32)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image_np = np.asarray(image)
    if probs_np.ndim != 3:
        raise ValueError(f"probs must be C x H x W, got shape {probs_np.shape}")
    num_classes, height, width = probs_np.shape
    if image_np.shape != (height, width, 3):
        raise ValueError(f"image must be H x W x 3 = {(height, width, 3)} to match probs, got {image_np.shape}")
    if image_np.dtype != np.uint8:
        # The bilateral kernel's srgb is in 0-255 intensity units; a float image in [0, 1] would silently
        # make every pixel look alike.
        raise ValueError(f"image must be uint8 (0-255), got {image_np.dtype}")

    crf = densecrf.DenseCRF2D(width, height, num_classes)
    # Unary energy = -log p, clipped so a zero probability gives a large finite cost instead of inf.
    unary = -np.log(np.clip(probs_np, 1e-8, 1.0)).reshape(num_classes, -1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(
        # pydensecrf needs a writable C-contiguous buffer; np.asarray(pil_image) is read-only.
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.require(image_np, requirements=["C", "W"]),
        compat=bilateral_compat,
    )
    refined = np.asarray(crf.inference(iterations), dtype=np.float32).reshape(num_classes, height, width)
    if is_tensor:
        return torch.from_numpy(refined).to(probs.device)
    return refined
