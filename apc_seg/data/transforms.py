"""Training/evaluation transforms and the collate function (numpy + PIL + torch; no torchvision).

    >>> from functools import partial
    >>> from apc_seg.data import TrainTransform, collate_fn, load_voc
    >>> train = load_voc(root, splits="train_aug")["train_aug"]
    >>> transform = TrainTransform(crop_size=448, seed=0)
    >>> train = train.with_transform(transform)        # rows become {"pixel_values", "pixel_labels", "class_labels"}
    >>> loader = DataLoader(train, batch_size=8, shuffle=True, num_workers=2, collate_fn=partial(collate_fn, num_labels=21))

Reproducibility: with ``seed`` set, the random crop/flip/jitter of a sample depends only on ``(seed, epoch,
image_id)``, never on worker count or sample order, so a resumed run sees the same crops as an uninterrupted one.
Call ``transform.set_epoch(epoch)`` before starting each epoch's iterator. The epoch lives in shared memory, so
DataLoader workers see it, persistent ones (``persistent_workers=True``) included.
"""

from __future__ import annotations

import signal
import zlib
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import default_collate

from ..labels import IGNORE_INDEX

# The ViT default (google/vit-*): pixels in [0, 1] mapped to [-1, 1].
VIT_MEAN = (0.5, 0.5, 0.5)
VIT_STD = (0.5, 0.5, 0.5)


def class_labels_to_multi_hot(class_ids: Sequence[int], num_labels: int) -> torch.Tensor:
    """Foreground class ids -> a (num_labels,) float multi-hot vector with background (index 0) always 1."""
    target = torch.zeros(num_labels, dtype=torch.float32)
    target[0] = 1.0
    for c in class_ids:
        if not 0 <= int(c) < num_labels:
            raise ValueError(f"class id {c} is outside 0..{num_labels - 1}")
        target[int(c)] = 1.0
    return target


def sample_rng(seed: int, epoch: int, key: int | str) -> np.random.Generator:
    """The random generator of one sample, derived from (seed, epoch, key); key is an index or an image id."""
    if isinstance(key, str):
        key = zlib.crc32(key.encode())  # stable across processes, unlike hash()
    return np.random.default_rng([int(seed), int(epoch), int(key)])


# How long a DataLoader worker goes on delivering batches after a SIGTERM: time for the main process to reach a step
# all processes agree on and save it (launchers and SLURM send SIGKILL 30 s after their SIGTERM anyway).
WORKER_STOP_GRACE_SECONDS = 60


def defer_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGINT and goes on for a while after a SIGTERM.

    Ctrl-C, a cluster's SIGTERM (SLURM signals every process of the job) or a launcher's (``accelerate launch`` /
    torchrun relay theirs to each training process's group) reach the workers too. apc-train's main process turns the
    signal into a checkpoint and a clean stop (``train.StopOnSignal``) and needs batches until then: with several
    processes, up to the next logging step. So the worker ignores SIGINT, and a SIGTERM (and any repeat of it) ends it
    only after :data:`WORKER_STOP_GRACE_SECONDS`, unless the DataLoader has shut it down before, as it does at the
    end of the run; a worker whose main process is gone exits by itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _start_stop_grace_period)


def _start_stop_grace_period(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "alarm"):  # not on Windows, which has no SIGTERM to defer either
        signal.alarm(WORKER_STOP_GRACE_SECONDS)  # SIGALRM's default action then ends the worker


def _normalise(image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """H x W x 3 uint8 image (PIL or array) -> 3 x H x W float32, (x / 255 - mean) / std, in one pass after the cast."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
    offset = torch.tensor([m / s for m, s in zip(mean, std)]).view(3, 1, 1)
    return x.mul_(scale).sub_(offset)


def _as_rgb(image) -> Image.Image:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _as_mask(mask) -> np.ndarray | None:
    if mask is None:
        return None
    # np.array of a palette image gives the indices, which is what we want (never the colours).
    return np.asarray(mask, dtype=np.uint8)


def _crop_axis(size: int, crop: int, rng: np.random.Generator) -> tuple[slice, slice]:
    """Source and destination slices along one axis: a random window if the image is larger than the crop,
    else the whole image at a random offset inside the (padded) crop."""
    if size >= crop:
        start = int(rng.integers(0, size - crop + 1))
        return slice(start, start + crop), slice(0, crop)
    offset = int(rng.integers(0, crop - size + 1))
    return slice(0, size), slice(offset, offset + size)


class TrainTransform:
    """Random rescale -> horizontal flip -> random crop (padding: image 0 after normalisation = the mean colour,
    mask ``ignore_index``) -> colour jitter -> normalise. Image and mask go through the same geometry.

    Args:
        crop_size: side of the square crop.
        scale_range: the random rescale factor range.
        flip: random horizontal flip with probability 0.5.
        color_jitter: (brightness, contrast, saturation) strengths, each factor drawn from [1 - s, 1 + s];
            None or (0, 0, 0) disables it. Hue is not jittered.
        mean, std: per-channel normalisation of pixels in [0, 1] (default: the ViT 0.5/0.5).
        ignore_index: mask value of padded pixels.
        seed: if set, each sample's randomness is a function of (seed, epoch, image_id); if None, fresh entropy.
    """

    def __init__(
        self,
        crop_size: int = 448,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        color_jitter: tuple[float, float, float] | None = (0.3, 0.3, 0.3),
        mean: Sequence[float] = VIT_MEAN,
        std: Sequence[float] = VIT_STD,
        ignore_index: int = IGNORE_INDEX,
        seed: int | None = None,
    ):
        self.crop_size = int(crop_size)
        self.scale_range = tuple(scale_range)
        self.flip = flip
        self.color_jitter = tuple(color_jitter) if color_jitter else (0.0, 0.0, 0.0)
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index
        self.seed = seed
        # A shared-memory tensor rather than an int: DataLoader workers hold their own copy of the transform, and
        # persistent workers (which keep a GPU fed without restarting every epoch) would otherwise never see a new
        # epoch and repeat the first epoch's crops.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def rng_for(self, key: int | str) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        return sample_rng(self.seed, self.epoch, key)

    def apply(self, image, mask=None, rng: np.random.Generator | None = None) -> dict:
        """Transform one sample. Returns ``pixel_values`` (3 x crop x crop float) and ``pixel_labels``
        (crop x crop long, or None without a mask)."""
        rng = rng if rng is not None else np.random.default_rng()
        image = _as_rgb(image)
        mask = _as_mask(mask)
        if mask is not None and mask.shape != (image.height, image.width):
            raise ValueError(f"mask {mask.shape} and image {(image.height, image.width)} differ in size")
        # All geometric draws come first, so switching colour jitter on or off never changes the geometry.
        scale = rng.uniform(*self.scale_range)
        do_flip = self.flip and rng.random() < 0.5
        width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        rows = _crop_axis(height, self.crop_size, rng)
        cols = _crop_axis(width, self.crop_size, rng)
        factors = [rng.uniform(1 - s, 1 + s) for s in self.color_jitter]

        # PIL (C code, uint8) does the heavy lifting, and resamples only the source box that lands in the crop:
        # the same pixels as rescaling the whole image and cropping, without the work outside the crop.
        if do_flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        sx, sy = width / image.width, height / image.height
        box = (cols[0].start / sx, rows[0].start / sy, cols[0].stop / sx, rows[0].stop / sy)
        out_size = (cols[0].stop - cols[0].start, rows[0].stop - rows[0].start)
        region = self._jitter(image.resize(out_size, Image.BILINEAR, box=box), *factors)

        crop = self.crop_size
        pixel_values = torch.zeros(3, crop, crop)  # zero after normalisation = the mean colour
        pixel_values[:, rows[1], cols[1]] = _normalise(region, self.mean, self.std)
        pixel_labels = None
        if mask is not None:
            labels = Image.fromarray(mask)
            if do_flip:
                labels = labels.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            labels = labels.resize(out_size, Image.NEAREST, box=box)
            pixel_labels = torch.full((crop, crop), self.ignore_index, dtype=torch.long)
            pixel_labels[rows[1], cols[1]] = torch.from_numpy(np.array(labels, dtype=np.int64))
        return {"pixel_values": pixel_values, "pixel_labels": pixel_labels}

    @staticmethod
    def _jitter(region: Image.Image, brightness: float, contrast: float, saturation: float) -> Image.Image:
        # ImageEnhance blends with black (brightness), the mean gray (contrast) and the grayscale image (saturation).
        for enhancer, factor in ((ImageEnhance.Brightness, brightness), (ImageEnhance.Contrast, contrast),
                                 (ImageEnhance.Color, saturation)):
            if factor != 1.0:
                region = enhancer(region).enhance(factor)
        return region

    def __call__(self, batch: dict) -> dict:
        """Batched form for ``Dataset.with_transform`` / ``set_transform`` (a dict of lists in and out)."""
        images = batch["image"]
        masks = batch.get("mask") or [None] * len(images)
        keys = batch.get("image_id") or [zlib.crc32(np.asarray(im).tobytes()) for im in images]
        out = {"pixel_values": [], "pixel_labels": []}
        for image, mask, key in zip(images, masks, keys):
            sample = self.apply(image, mask, self.rng_for(key))
            out["pixel_values"].append(sample["pixel_values"])
            out["pixel_labels"].append(sample["pixel_labels"])
        return _carry_labels(batch, out)


class EvalTransform:
    """Deterministic evaluation transform: optional resize of the image to ``size`` and normalisation.

    ``pixel_labels`` keep the mask's original resolution (metrics are computed there; upsample the logits to it).
    ``size`` is an int (square) or (height, width); None keeps the full image.
    """

    def __init__(
        self,
        size: int | tuple[int, int] | None = None,
        mean: Sequence[float] = VIT_MEAN,
        std: Sequence[float] = VIT_STD,
    ):
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
        self.mean, self.std = tuple(mean), tuple(std)

    def apply(self, image, mask=None) -> dict:
        image = _as_rgb(image)
        if self.size is not None:
            image = image.resize((self.size[1], self.size[0]), Image.BILINEAR)
        mask = _as_mask(mask)
        return {
            "pixel_values": _normalise(image, self.mean, self.std),
            "pixel_labels": torch.from_numpy(mask.copy()).long() if mask is not None else None,
        }

    def __call__(self, batch: dict) -> dict:
        images = batch["image"]
        masks = batch.get("mask") or [None] * len(images)
        samples = [self.apply(image, mask) for image, mask in zip(images, masks)]
        out = {key: [s[key] for s in samples] for key in ("pixel_values", "pixel_labels")}
        return _carry_labels(batch, out)


def _carry_labels(batch: dict, out: dict) -> dict:
    for key in ("class_labels", "image_id"):
        if key in batch:
            out[key] = batch[key]
    return out


def collate_fn(examples: list[dict], num_labels: int, ignore_index: int = IGNORE_INDEX) -> dict:
    """Stack transformed examples into a batch.

    Returns ``pixel_values`` (B, 3, H, W) float, ``class_labels`` (B, num_labels) multi-hot float with background
    always 1, and ``pixel_labels`` (B, H, W) long (``ignore_index`` where an example has no mask). Examples of
    different sizes (evaluation) are padded bottom/right with 0 and ``ignore_index``.
    Use with ``functools.partial(collate_fn, num_labels=...)`` so it pickles for DataLoader workers.
    """
    values = [ex["pixel_values"] for ex in examples]
    # Labels may have their own (original) resolution; an example without a mask counts with its image size.
    labels = [ex.get("pixel_labels") for ex in examples]
    labels = [
        torch.full(v.shape[-2:], ignore_index, dtype=torch.long) if t is None else t for v, t in zip(values, labels)
    ]
    return {
        "pixel_values": _stack_padded(values, 0.0),
        "class_labels": torch.stack([class_labels_to_multi_hot(ex["class_labels"], num_labels) for ex in examples]),
        "pixel_labels": _stack_padded(labels, ignore_index),
    }


def _stack_padded(tensors: list[torch.Tensor], fill) -> torch.Tensor:
    if all(t.shape == tensors[0].shape for t in tensors):
        # default_collate allocates the batch in shared memory inside a DataLoader worker, so handing it to the
        # main process copies nothing: 1.5-2x the images/s of a plain torch.stack with workers at crop 448.
        return default_collate(tensors)
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    out = torch.full((len(tensors), *tensors[0].shape[:-2], height, width), fill, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-2], : t.shape[-1]] = t
    return out
