"""Online pseudo-labels: the one place where patch probabilities become pixel labels.

The rule (spec section 3): zero the classes absent from the image, divide each class map by its spatial maximum,
renormalise over classes, upsample to the crop, optionally refine with PAR, take the argmax, and mark pixels whose
winning probability is below ``pseudo_label_threshold`` as ignored (255).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .labels import IGNORE_INDEX

_EPS = 1e-6


def mask_absent_classes(probs: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
    """Zero the classes an image does not contain and renormalise over classes.

    Args:
        probs: `(B, C, ...)` per-patch (or per-pixel) class probabilities.
        class_labels: `(B, C)` multi-hot image labels; background (index 0) is always kept.

    Returns:
        `(B, C, ...)` probabilities that sum to 1 over the present classes.
    """
    present = class_labels.to(probs.dtype).clone()
    present[:, 0] = 1.0
    present = present.view(*present.shape, *([1] * (probs.dim() - 2)))
    masked = probs * present
    return masked / masked.sum(dim=1, keepdim=True).clamp_min(_EPS)


def class_normalised_probs(patch_probs: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
    """`(B, C, h, w)` patch probabilities -> label-masked maps, each class scaled by its spatial max, renormalised.

    Dividing by the spatial maximum lets a class whose best patch is only moderately confident still win its own
    region; without it a weak foreground class loses every pixel to a confident background.
    """
    present = class_labels.to(patch_probs.dtype).clone()
    present[:, 0] = 1.0
    maps = patch_probs * present[:, :, None, None]
    maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(_EPS)
    return maps / maps.sum(dim=1, keepdim=True).clamp_min(_EPS)


def _neighbour_offsets(dilations: list[int]) -> list[tuple[int, int, float]]:
    # The 8 neighbours at each dilation (ToCo's PAR kernel), with their distance for the positional affinity.
    offsets = []
    for d in dilations:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    offsets.append((dy * d, dx * d, math.hypot(dy, dx) * d))
    return offsets


def _gather_neighbours(x: torch.Tensor, offsets: list[tuple[int, int, float]], pad: int) -> torch.Tensor:
    """`(B, C, H, W)` -> `(B, C, K, H, W)`: the value at each of K neighbour offsets, replicate-padded at borders."""
    h, w = x.shape[-2:]
    padded = F.pad(x, [pad] * 4, mode="replicate")
    return torch.stack([padded[..., pad + dy: pad + dy + h, pad + dx: pad + dx + w] for dy, dx, _ in offsets], dim=2)


def par_refine(
    image: torch.Tensor,
    probs: torch.Tensor,
    dilations: list[int] = (1, 2, 4, 8, 12, 24),
    iterations: int = 10,
    w1: float = 0.3,
    w2: float = 0.01,
) -> torch.Tensor:
    """Pixel-adaptive refinement (ToCo, Ru et al. CVPR 2023): propagate `probs` to neighbours of similar colour.

    Args:
        image: `(B, 3, H, W)` image (any affine normalisation; affinities are scale-free per channel).
        probs: `(B, C, H, W)` class probabilities at the image's resolution.

    Returns:
        `(B, C, H, W)` refined probabilities, renormalised over classes (ToCo's affinity rows sum to `1 + w2`, which
        would otherwise inflate scores by `(1 + w2) ** iterations` before our probability threshold).
    """
    dilations = [int(d) for d in dilations]
    offsets = _neighbour_offsets(dilations)
    pad = max(dilations)
    image = image.float()
    neighbours = _gather_neighbours(image, offsets, pad)  # B, 3, K, H, W
    # ToCo's colour affinity -(|I_j - I_i| / (std_K(I_j) + eps) / w1)^2, averaged over channels, written with squares
    # and in-place steps: `Tensor.std` over this middle dimension and the extra temporaries were most of PAR's CPU
    # time in the synthetic recipe.
    centred = neighbours - neighbours.mean(dim=2, keepdim=True)
    colour_std = (centred.square_().sum(dim=2, keepdim=True) / (len(offsets) - 1)).sqrt_()  # unbiased, as ToCo's
    del centred
    scale = ((colour_std + 1e-8) * w1).square_()
    colour_aff = -(neighbours.sub_(image.unsqueeze(2)).square_().div_(scale)).mean(dim=1, keepdim=True)  # B,1,K,H,W
    distance = _offset_distances(tuple(o[2] for o in offsets), image.device)
    pos_aff = -((distance / (distance.std() + 1e-8) / w1) ** 2)
    affinity = F.softmax(colour_aff, dim=2) + w2 * F.softmax(pos_aff, dim=0).view(1, 1, -1, 1, 1)
    # Two schedules of the same sum (equal within float rounding, tested): the loop is 3-4x faster on a CPU; on a GPU
    # the gather is 2x faster alone (H200: 5.3 vs 11.0 ms) and launches 16x fewer kernels, which bound the step there.
    propagate = _propagate_by_shifts if probs.device.type == "cpu" else _propagate_by_gather
    refined = propagate(probs.float(), affinity, offsets, iterations)
    return refined / refined.sum(dim=1, keepdim=True).clamp_min(_EPS)


def _propagate_by_shifts(probs: torch.Tensor, affinity: torch.Tensor, offsets, iterations: int) -> torch.Tensor:
    """`iterations` steps of `p_i <- sum_k affinity[k, i] * p_{neighbour k of i}`, one offset at a time (CPU).

    Each step streams the `(B, C, H, W)` map once per offset through cache with a fused multiply-add; on a CPU this
    is 3-4x faster than gathering all offsets at once (measured at the VOC and synthetic sizes), and memory stays
    `O(B * C * H * W)` for COCO's 81 classes.
    """
    height, width = probs.shape[-2:]
    pad = max(max(abs(dy), abs(dx)) for dy, dx, _ in offsets)
    refined = probs
    for _ in range(iterations):
        padded = F.pad(refined, [pad] * 4, mode="replicate")
        refined = torch.zeros_like(refined)
        for k, (dy, dx, _) in enumerate(offsets):
            refined.addcmul_(padded[..., pad + dy: pad + dy + height, pad + dx: pad + dx + width], affinity[:, :, k])
    return refined


def _device_constant(build):
    """Cache `build(*key)`, a small tensor made from Python numbers, per key and device.

    Made every step, such a tensor is a host-to-device copy, and a blocking copy synchronises the GPU in the middle
    of the step; cached, it is copied once per run. Under `torch.compile` the builder is traced instead (it becomes
    a constant of the graph; dynamo does not trace through `lru_cache`).
    """
    cached = functools.lru_cache(maxsize=8)(build)

    @functools.wraps(build)
    def get(*key):
        return build(*key) if torch.compiler.is_compiling() else cached(*key)

    get.cache_clear = cached.cache_clear
    return get


@_device_constant
def _offset_distances(distances: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(distances, dtype=torch.float32).to(device)


@_device_constant
def _neighbour_index(height: int, width: int, offsets: tuple, device: torch.device) -> torch.Tensor:
    """`(K, H * W)` flat index of each pixel's neighbour at each offset, clamped at the borders (replicate padding).

    Cached: the crop size is fixed in training, so the index is built (and copied to the device) once per run.
    """
    dy = torch.tensor([o[0] for o in offsets])[:, None, None]
    dx = torch.tensor([o[1] for o in offsets])[:, None, None]
    rows = (torch.arange(height)[None, :, None] + dy).clamp_(0, height - 1)
    cols = (torch.arange(width)[None, None, :] + dx).clamp_(0, width - 1)
    return (rows * width + cols).view(len(offsets), height * width).to(device)


# Elements of the gathered neighbour tensor per kernel in _propagate_by_gather (fp32: 512 MiB).
_GATHER_CHUNK_ELEMENTS = 2**27


def _propagate_by_gather(probs: torch.Tensor, affinity: torch.Tensor, offsets, iterations: int) -> torch.Tensor:
    """The same propagation as `_propagate_by_shifts` with all offsets gathered at once (GPU).

    On a GPU the training step is bound by the host launching kernels, and the offset-by-offset loop is 48 of them
    per iteration (480 per step, a third of the step's kernels; docs/benchmarks.md). Here an iteration is one gather,
    one multiply and one sum over the offsets, in chunks of offsets that keep the gathered tensor under
    `_GATHER_CHUNK_ELEMENTS`. The gather runs along the pixel axis of a class-major `(B * C, H * W)` map: for one
    offset, neighbouring threads read neighbouring pixels, so the reads coalesce (H200, VOC bench size, 4 classes:
    5.3 ms per PAR call, against 17.8 ms gathering pixel-major `B x C` rows and 11.0 ms for the loop). Replicate
    padding is an index clamp, as in the loop.
    """
    batch, classes, height, width = probs.shape
    num_pixels, num_offsets = height * width, len(offsets)
    neighbour_index = _neighbour_index(height, width, tuple((dy, dx) for dy, dx, _ in offsets), probs.device)
    weights = affinity.reshape(batch, 1, num_offsets, num_pixels)
    chunk = max(1, _GATHER_CHUNK_ELEMENTS // (num_pixels * batch * classes))
    refined = probs.reshape(batch * classes, num_pixels)
    for _ in range(iterations):
        total = None
        for start in range(0, num_offsets, chunk):
            index = neighbour_index[start: start + chunk]
            part = refined.index_select(1, index.flatten()).view(batch, classes, len(index), num_pixels)
            part = part.mul_(weights[:, :, start: start + chunk]).sum(dim=2)
            total = part if total is None else total.add_(part)
        refined = total.view(batch * classes, num_pixels)
    return refined.view(batch, classes, height, width)


@torch.no_grad()
def make_pseudo_labels(
    patch_probs: torch.Tensor,
    class_labels: torch.Tensor,
    pixel_values: torch.Tensor,
    threshold: float = 0.5,
    refine: str = "par",
    par_kwargs: dict | None = None,
    par_scale: float = 0.5,
    max_classes: int | None = None,
) -> torch.Tensor:
    """Pixel pseudo-labels for the decoder's loss.

    Args:
        patch_probs: `(B, C, h, w)` per-patch softmax probabilities.
        class_labels: `(B, C)` multi-hot image labels (background always present).
        pixel_values: `(B, 3, H, W)` the crop the labels are for.
        threshold: pixels whose winning probability is below it become 255.
        refine: `"par"` or `"none"`.
        par_scale: PAR runs at this fraction of the crop resolution (ToCo: 0.5), then is upsampled.
        max_classes: if set, the work after the label mask runs on each image's first `max_classes` channels in
            present-first order and the labels are mapped back. Absent classes are exactly zero throughout, so this
            is exact when no image holds more classes (background included); on VOC (at most 7 of 21) it makes
            PAR, the costliest part of the training step on a GPU, about 3x cheaper. Checked on the device without
            a host sync.

    Returns:
        `(B, H, W)` int64 labels in `[0, C)` or 255.
    """
    height, width = pixel_values.shape[-2:]
    probs = class_normalised_probs(patch_probs.float(), class_labels)
    channels = None
    if max_classes is not None and max_classes < probs.shape[1]:
        present = class_labels.clone()
        present[:, 0] = 1
        torch._assert_async((present > 0).sum(dim=1).max() <= max_classes)
        channels = present.argsort(dim=1, descending=True, stable=True)[:, :max_classes]  # present ones first
        probs = probs.gather(1, channels[:, :, None, None].expand(-1, -1, *probs.shape[-2:]))
    if refine == "par":
        small = (max(1, round(height * par_scale)), max(1, round(width * par_scale)))
        image = F.interpolate(pixel_values.float(), size=small, mode="bilinear", align_corners=False)
        probs = F.interpolate(probs, size=small, mode="bilinear", align_corners=False)
        probs = par_refine(image, probs, **(par_kwargs or {}))
    elif refine != "none":
        raise ValueError(f"refine={refine!r} is invalid: expected 'par' or 'none'.")
    probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
    confidence, labels = probs.max(dim=1)
    if channels is not None:
        labels = channels.gather(1, labels.flatten(1)).view_as(labels)
    return labels.masked_fill(confidence < threshold, IGNORE_INDEX)
