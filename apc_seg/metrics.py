"""Semantic segmentation metrics: the one implementation of mIoU in apc-seg.

Everything that reports an mIoU (training validation, ``apc-eval``, the ``evaluate`` metric in
``miou_metric.py``, the benchmarks) goes through :func:`confusion_matrix` and :func:`miou_from_confusion`, so all
numbers are computed the same way:

- pixels whose truth is ``ignore_index`` (255: VOC object borders, crop padding) are left out;
- the IoU of class c is ``TP / (TP + FP + FN)`` summed over the whole split (not averaged per image);
- the mIoU is the mean over the classes that occur in the truth or in the prediction of the split. A class that
  never occurs in either has an undefined IoU, reported as ``None`` (not NaN) so results stay valid JSON.

All fractions are in [0, 1].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # accelerate is only needed by callers that gather across processes
    from accelerate import Accelerator

IGNORE_INDEX = 255


def _as_long_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        t = torch.as_tensor(np.asarray(x))
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    return t.long()


def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Counts (truth, prediction) pixel pairs.

    Args:
        pred: predicted class ids, integer tensor (or array) of any shape, e.g. B x H x W.
        target: true class ids, same shape as ``pred``; pixels equal to ``ignore_index`` are skipped.
        num_classes: C, the number of classes (background included).
        ignore_index: the truth value that marks "don't care" pixels.

    Returns:
        int64 tensor C x C on ``pred``'s device; ``cm[t, p]`` = number of pixels of true class t predicted as p
        (rows = truth, columns = prediction).

    Raises:
        ValueError: on a shape mismatch, non-integer input, a prediction outside [0, C) or a (non-ignored) truth
        outside [0, C). A label out of range is a bug upstream; counting it silently would give a wrong mIoU.
    """
    pred = _as_long_tensor(pred, "pred")
    target = _as_long_tensor(target, "target").to(pred.device)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    pred, target = pred.reshape(-1), target.reshape(-1)
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(
            f"pred values must be in [0, {num_classes}), got min {int(pred.min())} max {int(pred.max())}"
        )
    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(
            f"target values must be in [0, {num_classes}) or {ignore_index}, "
            f"got min {int(target.min())} max {int(target.max())}"
        )
    # One bincount over the flattened (truth, prediction) pair index: t * C + p.
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def miou_from_confusion(cm: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """IoU and accuracy summaries from a confusion matrix (rows = truth, columns = prediction).

    Args:
        cm: C x C counts (tensor, array or nested list), e.g. from :func:`confusion_matrix`.
        class_names: optional C names; when given they are echoed under ``class_names``.

    Returns:
        A JSON-serialisable dict (plain Python floats, ints and ``None``; never NaN):

        - ``miou``: mean IoU over classes present in truth or prediction (``None`` if no pixel was counted);
        - ``per_class_iou``: C entries, ``None`` for classes that occur in neither truth nor prediction;
        - ``per_class_accuracy``: C entries, TP / (pixels of the class in truth), ``None`` if absent from truth;
        - ``pixel_accuracy``: correct pixels / counted pixels (``None`` if none was counted);
        - ``mean_accuracy``: mean of the defined ``per_class_accuracy`` values;
        - ``num_pixels``: counted (non-ignored) pixels;
        - ``class_names``: only when ``class_names`` was given.
    """
    cm = torch.as_tensor(np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm)).double()
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square C x C matrix, got shape {tuple(cm.shape)}")
    num_classes = cm.shape[0]
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for a {num_classes}-class confusion matrix")

    tp = cm.diag()
    truth = cm.sum(dim=1)  # pixels of each class in the truth
    predicted = cm.sum(dim=0)  # pixels predicted as each class
    union = truth + predicted - tp
    total = cm.sum().item()

    per_class_iou = [(tp[c] / union[c]).item() if union[c] > 0 else None for c in range(num_classes)]
    per_class_acc = [(tp[c] / truth[c]).item() if truth[c] > 0 else None for c in range(num_classes)]
    ious = [v for v in per_class_iou if v is not None]
    accs = [v for v in per_class_acc if v is not None]
    result: dict[str, Any] = {
        "miou": sum(ious) / len(ious) if ious else None,
        "per_class_iou": per_class_iou,
        "per_class_accuracy": per_class_acc,
        "pixel_accuracy": tp.sum().item() / total if total > 0 else None,
        "mean_accuracy": sum(accs) / len(accs) if accs else None,
        "num_pixels": int(total),
    }
    if class_names is not None:
        result["class_names"] = list(class_names)
    return result


class StreamingConfusionMatrix:
    """Accumulates a confusion matrix batch by batch, so a whole split is scored without keeping its masks.

    Each process of a distributed run updates its own matrix with its shard; :meth:`gather` sums the matrices of
    all processes, which gives exactly the single-process result because counts add up.

    Example::

        metric = StreamingConfusionMatrix(num_classes=21)
        for batch in loader:
            metric.update(logits.argmax(1), batch["labels"])     # B x H x W each
        result = metric.compute(accelerator)                      # summed over processes
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.device = torch.device(device) if device is not None else None
        self.reset()

    def reset(self) -> None:
        """Clears the counts (e.g. before the next validation round)."""
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def update(self, pred: Any, target: Any) -> None:
        """Adds one batch. ``pred`` and ``target``: integer class ids of the same shape (any, e.g. B x H x W)."""
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.matrix += cm.to(self.matrix.device)

    def gather(self, accelerator: "Accelerator | None" = None) -> torch.Tensor:
        """The C x C matrix summed over all processes (a copy on the CPU; this object's counts are unchanged).

        Every process must call it (it is a collective operation). ``accelerator=None`` returns the local counts.
        """
        matrix = self.matrix
        if accelerator is not None:
            # The collective runs on the accelerator's device (NCCL cannot reduce CPU tensors).
            matrix = accelerator.reduce(matrix.to(accelerator.device).clone(), reduction="sum")
        return matrix.detach().cpu().clone()

    def compute(
        self, accelerator: "Accelerator | None" = None, class_names: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """:func:`miou_from_confusion` of the (gathered, if ``accelerator`` is given) matrix."""
        return miou_from_confusion(self.gather(accelerator), class_names)


# The name used in the spec's prose; both refer to the same class.
MIoUAccumulator = StreamingConfusionMatrix


def format_iou_table(result: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """A readable per-class table of a :func:`miou_from_confusion` result, in percent.

    ``class_names`` defaults to ``result["class_names"]``, then to the class indices. Undefined values print "-".
    """
    ious = result["per_class_iou"]
    accs = result.get("per_class_accuracy") or [None] * len(ious)
    names = list(class_names or result.get("class_names") or [str(i) for i in range(len(ious))])
    if len(names) != len(ious):
        raise ValueError(f"got {len(names)} class names for {len(ious)} classes")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    width = max([len("class"), len("mIoU"), *map(len, names)])
    lines = [f"{'id':>3}  {'class':<{width}}  {'IoU':>7}  {'Acc':>7}", "-" * (width + 23)]
    for i, (name, iou, acc) in enumerate(zip(names, ious, accs)):
        lines.append(f"{i:>3}  {name:<{width}}  {pct(iou):>7}  {pct(acc):>7}")
    lines.append("-" * (width + 23))
    lines.append(f"{'':>3}  {'mIoU':<{width}}  {pct(result['miou']):>7}")
    lines.append(f"pixel accuracy {pct(result['pixel_accuracy'])}  mean accuracy {pct(result.get('mean_accuracy'))}")
    return "\n".join(lines)
