"""The apc-seg mIoU as an `evaluate` metric.

A thin wrapper: the counting is :mod:`apc_seg.metrics`, so this metric and ``apc-eval`` always agree. Load it
offline with either::

    from apc_seg.miou_metric import load_miou_metric
    metric = load_miou_metric()

    import evaluate, apc_seg.miou_metric
    metric = evaluate.load(apc_seg.miou_metric.__file__)

then ``metric.add_batch(predictions=[...], references=[...])`` with H x W integer masks and
``metric.compute(num_labels=21)``. The result is the dict of :func:`apc_seg.metrics.miou_from_confusion`.

This file is also loaded as a standalone script by ``evaluate.load``, so it imports the package absolutely.
"""

from __future__ import annotations

from typing import Any, Sequence

import datasets
import evaluate
import numpy as np

from apc_seg.metrics import IGNORE_INDEX, confusion_matrix, miou_from_confusion
from apc_seg.model_card import APC_BIBTEX

_CITATION = APC_BIBTEX

_DESCRIPTION = """\
Mean intersection over union for semantic segmentation, from a confusion matrix accumulated over the whole split
(IoU_c = TP / (TP + FP + FN)). Pixels whose reference equals `ignore_index` (255) are skipped. The mean is taken
over the classes that occur in the references or the predictions; the IoU of a class that occurs in neither is
None.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of H x W integer masks of predicted class ids in [0, num_labels).
    references: list of H x W integer masks of true class ids (same sizes), `ignore_index` for "don't care".
    num_labels: number of classes, background included (21 for PASCAL VOC).
    ignore_index: reference value to skip [255].
    class_names: optional list of num_labels names, echoed in the result.
Returns:
    miou, per_class_iou, per_class_accuracy, pixel_accuracy, mean_accuracy, num_pixels (fractions in [0, 1];
    None where undefined).
Examples:
    >>> metric = load_miou_metric()
    >>> metric.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [0, 255]]], num_labels=2)["miou"]
    0.5
"""

# datasets >= 4 names the list feature `List`; older releases only have `Sequence`.
_List = getattr(datasets, "List", datasets.Sequence)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class APCMeanIoU(evaluate.Metric):
    """``evaluate`` front end of :func:`apc_seg.metrics.confusion_matrix` + :func:`miou_from_confusion`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": _List(_List(datasets.Value("int64"))),
                    "references": _List(_List(datasets.Value("int64"))),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2407.10649"],
        )

    def _compute(
        self,
        predictions: Sequence[Any],
        references: Sequence[Any],
        num_labels: int,
        ignore_index: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        if len(predictions) != len(references):
            raise ValueError(f"got {len(predictions)} predictions and {len(references)} references")
        cm = None
        # Masks may differ in size from image to image, so they are counted one pair at a time.
        for pred, ref in zip(predictions, references):
            counts = confusion_matrix(np.asarray(pred), np.asarray(ref), num_labels, ignore_index)
            cm = counts if cm is None else cm + counts
        if cm is None:
            raise ValueError("no predictions to score")
        return miou_from_confusion(cm, class_names)


def load_miou_metric(**kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load`` of this file (works offline); ``kwargs`` go to ``evaluate.load``."""
    return evaluate.load(__file__, **kwargs)
