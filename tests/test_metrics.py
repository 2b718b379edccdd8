"""mIoU: confusion matrix vs a brute-force count, summaries, streaming + gathering, the `evaluate` front end."""

import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from apc_seg.metrics import (
    MIoUAccumulator,
    StreamingConfusionMatrix,
    confusion_matrix,
    format_iou_table,
    miou_from_confusion,
)

NUM_CLASSES = 5


def random_masks(seed, shape=(3, 17, 23), num_classes=NUM_CLASSES, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, num_classes, shape, generator=g)
    target = torch.randint(0, num_classes, shape, generator=g)
    target[torch.rand(shape, generator=g) < ignore_frac] = 255
    return pred, target


def brute_force_iou(preds, targets, num_classes, ignore_index=255):
    """Per-class IoU by counting pixels class by class, with no confusion matrix."""
    ious, tp_total, valid_total = [], 0, 0
    for c in range(num_classes):
        tp = fp = fn = 0
        for p, t in zip(preds, targets):
            p, t = np.asarray(p), np.asarray(t)
            valid = t != ignore_index
            tp += int(((p == c) & (t == c) & valid).sum())
            fp += int(((p == c) & (t != c) & valid).sum())
            fn += int(((p != c) & (t == c) & valid).sum())
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else None)
        tp_total += tp
    for t in targets:
        valid_total += int((np.asarray(t) != ignore_index).sum())
    present = [v for v in ious if v is not None]
    return ious, sum(present) / len(present), tp_total / valid_total


def assert_close_lists(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None and y is None) or (x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9))


def test_confusion_matrix_orientation_and_ignore():
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    target = torch.tensor([[0, 0, 1], [2, 255, 255]])
    cm = confusion_matrix(pred, target, num_classes=3)
    assert cm.dtype == torch.int64 and cm.shape == (3, 3)
    # rows = truth, columns = prediction; the two ignored pixels are not counted.
    expected = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    assert torch.equal(cm, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_matches_brute_force_with_ignore(seed):
    pred, target = random_masks(seed)
    # Make class 4 absent from truth and prediction so its IoU is undefined and excluded from the mean.
    pred[pred == 4] = 3
    target[target == 4] = 0
    cm = confusion_matrix(pred, target, NUM_CLASSES)
    assert int(cm.sum()) == int((target != 255).sum())
    result = miou_from_confusion(cm)
    ious, miou, pixel_acc = brute_force_iou(pred, target, NUM_CLASSES)
    assert ious[4] is None and result["per_class_iou"][4] is None
    assert_close_lists(result["per_class_iou"], ious)
    assert math.isclose(result["miou"], miou, rel_tol=1e-9)
    assert math.isclose(result["pixel_accuracy"], pixel_acc, rel_tol=1e-9)


def test_miou_summary_values_and_json():
    # truth: class 0 x3, class 1 x1; prediction: 0,0,1,1 -> IoU0 = 2/3, IoU1 = 1/2; class 2 never occurs.
    cm = confusion_matrix(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]), num_classes=3)
    result = miou_from_confusion(cm, class_names=["bg", "cat", "dog"])
    assert result["per_class_iou"][:2] == pytest.approx([2 / 3, 1 / 2]) and result["per_class_iou"][2] is None
    assert result["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert result["pixel_accuracy"] == pytest.approx(3 / 4)
    assert result["mean_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert result["num_pixels"] == 4 and result["class_names"] == ["bg", "cat", "dog"]
    json.dumps(result, allow_nan=False)  # no NaN, no tensors

    empty = miou_from_confusion(torch.zeros(3, 3, dtype=torch.long))
    assert empty["miou"] is None and empty["pixel_accuracy"] is None
    json.dumps(empty, allow_nan=False)


def test_a_class_only_predicted_counts_in_the_mean():
    # Class 2 is predicted but never true: IoU 0, and it lowers the mean (false positives are punished).
    cm = confusion_matrix(torch.tensor([0, 2]), torch.tensor([0, 0]), num_classes=3)
    result = miou_from_confusion(cm)
    assert result["per_class_iou"] == [0.5, None, 0.0]
    assert result["miou"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "pred, target, match",
    [
        (torch.tensor([0, 5]), torch.tensor([0, 1]), "pred values"),
        (torch.tensor([0, -1]), torch.tensor([0, 1]), "pred values"),
        (torch.tensor([0, 1]), torch.tensor([0, 7]), "target values"),
        (torch.tensor([0, 1]), torch.tensor([0, 1, 1]), "shapes differ"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "integer"),
    ],
)
def test_confusion_matrix_rejects_bad_input(pred, target, match):
    with pytest.raises(ValueError, match=match):
        confusion_matrix(pred, target, num_classes=5)


def test_streaming_equals_one_shot_and_reset():
    pred, target = random_masks(3, shape=(6, 9, 11))
    metric = StreamingConfusionMatrix(NUM_CLASSES)
    for i in range(0, 6, 2):
        metric.update(pred[i : i + 2], target[i : i + 2].numpy())  # numpy targets work too
    assert torch.equal(metric.gather(), confusion_matrix(pred, target, NUM_CLASSES))
    assert metric.compute() == miou_from_confusion(confusion_matrix(pred, target, NUM_CLASSES))
    metric.reset()
    assert int(metric.gather().sum()) == 0
    assert MIoUAccumulator is StreamingConfusionMatrix


class FakeTwoProcessAccelerator:
    """Stands in for rank 0 of a 2-process run: `reduce` adds the other rank's matrix."""

    device = torch.device("cpu")

    def __init__(self, other_matrix):
        self.other_matrix = other_matrix
        self.calls = []

    def reduce(self, tensor, reduction="mean"):
        self.calls.append(reduction)
        return tensor + self.other_matrix


def test_gather_sums_over_processes_without_changing_local_counts():
    pred, target = random_masks(4, shape=(4, 8, 8))
    rank0, rank1 = StreamingConfusionMatrix(NUM_CLASSES), StreamingConfusionMatrix(NUM_CLASSES)
    rank0.update(pred[:2], target[:2])
    rank1.update(pred[2:], target[2:])
    local = rank0.gather().clone()
    accelerator = FakeTwoProcessAccelerator(rank1.gather())
    result = rank0.compute(accelerator)
    assert accelerator.calls == ["sum"]
    assert result == miou_from_confusion(confusion_matrix(pred, target, NUM_CLASSES))
    assert torch.equal(rank0.gather(), local)


def test_gather_with_single_process_accelerator():
    from accelerate import Accelerator

    pred, target = random_masks(5)
    metric = StreamingConfusionMatrix(NUM_CLASSES)
    metric.update(pred, target)
    assert torch.equal(metric.gather(Accelerator(cpu=True)), confusion_matrix(pred, target, NUM_CLASSES))


def _gloo_worker(rank, world_size, port, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    pred, target = random_masks(6, shape=(4, 10, 12))
    metric = StreamingConfusionMatrix(NUM_CLASSES)
    shard = slice(rank * 2, rank * 2 + 2)  # each process sees half of the split
    metric.update(pred[shard], target[shard])
    result = metric.compute(accelerator)
    queue.put((rank, result))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_gather_across_two_gloo_processes_equals_single_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_gloo_worker, args=(2, port, queue), nprocs=2, join=True, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    pred, target = random_masks(6, shape=(4, 10, 12))
    expected = miou_from_confusion(confusion_matrix(pred, target, NUM_CLASSES))
    assert results[0] == expected and results[1] == expected


def test_format_iou_table():
    cm = confusion_matrix(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]), num_classes=3)
    table = format_iou_table(miou_from_confusion(cm), ["background", "cat", "dog"])
    lines = table.splitlines()
    assert any("background" in line and "66.67" in line for line in lines)
    assert any("dog" in line and line.rstrip().endswith("-") for line in lines)
    assert any("mIoU" in line and "58.33" in line for line in lines)
    with pytest.raises(ValueError):
        format_iou_table(miou_from_confusion(cm), ["only", "two"])


def test_evaluate_metric_agrees_with_metrics_and_brute_force(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import evaluate

    import apc_seg.miou_metric as miou_metric

    metric = evaluate.load(miou_metric.__file__, cache_dir=str(tmp_path))
    assert isinstance(metric, evaluate.Metric)
    # Images of different sizes, with ignore pixels, fed in two batches.
    preds, targets = [], []
    for seed, shape in enumerate([(9, 13), (12, 7), (5, 5)]):
        p, t = random_masks(10 + seed, shape=shape)
        preds.append(p.numpy())
        targets.append(t.numpy())
    metric.add_batch(predictions=preds[:2], references=targets[:2])
    metric.add_batch(predictions=preds[2:], references=targets[2:])
    result = metric.compute(num_labels=NUM_CLASSES)

    cm = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(t), NUM_CLASSES) for p, t in zip(preds, targets))
    assert result == miou_from_confusion(cm)
    ious, miou, pixel_acc = brute_force_iou(preds, targets, NUM_CLASSES)
    assert_close_lists(result["per_class_iou"], ious)
    assert math.isclose(result["miou"], miou, rel_tol=1e-9)
    assert math.isclose(result["pixel_accuracy"], pixel_acc, rel_tol=1e-9)

    # The convenience loader gives the same metric.
    again = miou_metric.load_miou_metric(cache_dir=str(tmp_path))
    assert again.compute(predictions=preds, references=targets, num_labels=NUM_CLASSES) == result
