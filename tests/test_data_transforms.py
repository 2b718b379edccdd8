"""Training/evaluation transforms and collate: alignment, padding, reproducibility, batching."""

import multiprocessing
import os
import signal
import time
from functools import partial

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from apc_seg.data import EvalTransform, TrainTransform, class_labels_to_multi_hot, collate_fn, make_synthetic

COLOURS = np.array([[0, 0, 0], [250, 30, 30], [30, 250, 30], [30, 30, 250], [250, 250, 30]], dtype=np.uint8)


def _pattern(height=30, width=50):
    """Vertical bands of labels 0..4 (left to right) with a block of label 2 in band 4; colours encode labels."""
    mask = np.minimum(np.arange(width) * 5 // width, 4)[None].repeat(height, 0).astype(np.uint8)
    mask[5:15, 42:48] = 2
    return Image.fromarray(COLOURS[mask]), mask


def _decoded(pixel_values):
    """Back to 0..255 with the default ViT mean/std 0.5."""
    return ((pixel_values.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).round()


def _interior(labels):
    """Pixels whose 3x3 neighbourhood has a single label: no interpolation across a boundary reaches them."""
    lab = np.pad(labels, 1, constant_values=-1)
    same = np.ones(labels.shape, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= lab[1 + dy : 1 + dy + labels.shape[0], 1 + dx : 1 + dx + labels.shape[1]] == labels
    return same


def test_pattern_stays_aligned_through_rescale_flip_crop_and_padding():
    image, mask = _pattern()
    transform = TrainTransform(crop_size=40, scale_range=(0.5, 2.0), color_jitter=None, seed=0)
    directions = set()
    for key in range(30):
        out = transform.apply(image, mask, transform.rng_for(key))
        values, labels = out["pixel_values"], out["pixel_labels"].numpy()
        assert values.shape == (3, 40, 40) and values.dtype == torch.float32
        assert labels.shape == (40, 40) and out["pixel_labels"].dtype == torch.long
        padded = labels == 255  # the pattern has no 255, so every 255 is padding
        assert (values[:, torch.from_numpy(padded)] == 0).all()  # padded image = 0 = the mean colour
        inside = _interior(labels) & ~padded
        assert inside.sum() > 50
        colours = _decoded(values)[inside]
        nearest = np.abs(colours[:, None, :] - COLOURS[None].astype(float)).sum(-1).argmin(1)
        np.testing.assert_array_equal(nearest, labels[inside])
        row = labels[labels.shape[0] // 2 + 5]
        row = row[(row != 255) & (row != 2)]  # bands only
        if len(np.unique(row)) > 1:
            directions.add("right" if (np.diff(row.astype(int)) >= 0).all() else "left")
    assert directions == {"right", "left"}  # some crops were flipped, some not


def test_color_jitter_changes_colours_not_geometry():
    image, mask = _pattern()
    plain = TrainTransform(crop_size=24, color_jitter=None, seed=1)
    jitter = TrainTransform(crop_size=24, color_jitter=(0.4, 0.4, 0.4), seed=1)
    for key in ("a", "b", "c"):
        a, b = plain.apply(image, mask, plain.rng_for(key)), jitter.apply(image, mask, jitter.rng_for(key))
        assert torch.equal(a["pixel_labels"], b["pixel_labels"])
        assert not torch.allclose(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["pixel_values"] == 0, b["pixel_values"] == 0) or (b["pixel_labels"] != 255).all()


def _tiny_dataset():
    return make_synthetic(num_train=8, num_val=0, num_test=0, image_size=32, seed=0)["train"]


def test_reproducible_per_sample_and_epoch_through_dataloader_workers():
    base = _tiny_dataset()
    transform = TrainTransform(crop_size=24, seed=7)
    ds = base.with_transform(transform)
    first = ds[3]
    assert set(first) >= {"pixel_values", "pixel_labels", "class_labels"}
    assert torch.equal(ds[3]["pixel_values"], first["pixel_values"])  # same (seed, epoch, id): same crop
    assert not torch.equal(ds[4]["pixel_labels"], first["pixel_labels"]) or not torch.equal(
        ds[4]["pixel_values"], first["pixel_values"])
    transform.set_epoch(1)
    assert not torch.equal(base.with_transform(transform)[3]["pixel_values"], first["pixel_values"])
    transform.set_epoch(0)

    def batches(workers):
        loader = torch.utils.data.DataLoader(
            base.with_transform(transform), batch_size=4, num_workers=workers,
            collate_fn=partial(collate_fn, num_labels=4),
        )
        return list(loader)

    serial, parallel = batches(0), batches(2)
    for a, b in zip(serial, parallel):
        for key in ("pixel_values", "class_labels", "pixel_labels"):
            assert torch.equal(a[key], b[key])
    assert serial[0]["pixel_values"].shape == (4, 3, 24, 24)
    expected = torch.stack([class_labels_to_multi_hot(labels, 4) for labels in base["class_labels"][:4]])
    assert torch.equal(serial[0]["class_labels"], expected)


def test_persistent_workers_see_each_new_epoch():
    # apc-train keeps its workers between epochs; each epoch must still get that epoch's crops, exactly those of a
    # single-process loader.
    base = _tiny_dataset()

    def epochs(workers):
        transform = TrainTransform(crop_size=24, seed=7)
        loader = torch.utils.data.DataLoader(
            base.with_transform(transform), batch_size=4, num_workers=workers, persistent_workers=workers > 0,
            collate_fn=partial(collate_fn, num_labels=4),
        )
        out = []
        for epoch in range(3):
            transform.set_epoch(epoch)
            out.append(torch.cat([batch["pixel_values"] for batch in loader]))
        return out

    serial, persistent = epochs(0), epochs(2)
    for epoch in range(3):
        assert torch.equal(serial[epoch], persistent[epoch]), epoch
    assert not torch.equal(persistent[0], persistent[1])


def test_collate_pads_mixed_sizes_and_missing_masks():
    examples = [
        {"pixel_values": torch.ones(3, 4, 6), "pixel_labels": torch.full((4, 6), 2), "class_labels": [2]},
        {"pixel_values": torch.ones(3, 5, 3), "pixel_labels": None, "class_labels": []},
    ]
    batch = collate_fn(examples, num_labels=3)
    assert batch["pixel_values"].shape == (2, 3, 5, 6) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"][0, :, 4:].abs().sum() == 0 and batch["pixel_values"][1, :, :, 3:].abs().sum() == 0
    assert batch["pixel_labels"].dtype == torch.long and batch["pixel_labels"].shape == (2, 5, 6)
    assert (batch["pixel_labels"][0, :4] == 2).all() and (batch["pixel_labels"][0, 4:] == 255).all()
    assert (batch["pixel_labels"][1] == 255).all()
    assert batch["class_labels"].tolist() == [[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]


def test_multi_hot():
    assert class_labels_to_multi_hot([3, 1], 5).tolist() == [1, 1, 0, 1, 0]
    assert class_labels_to_multi_hot([], 3).tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="class id 5 is outside 0..4"):
        class_labels_to_multi_hot([5], 5)


def test_eval_transform_keeps_mask_resolution():
    image, mask = _pattern()
    out = EvalTransform().apply(image, mask)
    assert out["pixel_values"].shape == (3, 30, 50) and torch.equal(out["pixel_labels"], torch.from_numpy(mask).long())
    np.testing.assert_allclose(_decoded(out["pixel_values"]), np.asarray(image, dtype=float))
    assert out["pixel_values"].min() == -1.0 and out["pixel_values"].max() == pytest.approx(250 / 255 * 2 - 1)
    resized = EvalTransform(size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).apply(image, None)
    assert resized["pixel_values"].shape == (3, 32, 32) and resized["pixel_labels"] is None
    assert 0.0 <= resized["pixel_values"].min() and resized["pixel_values"].max() <= 1.0

    ds = datasets.Dataset.from_dict({"image": [image], "mask": [Image.fromarray(mask)], "class_labels": [[1, 2]]})
    row = ds.with_transform(EvalTransform())[0]
    assert row["pixel_values"].shape == (3, 30, 50) and row["class_labels"] == [1, 2]


def _worker_that_defers_stop_signals(ready):
    from apc_seg.data import transforms

    transforms.WORKER_STOP_GRACE_SECONDS = 1
    transforms.defer_stop_signals(0)
    ready.set()
    while True:
        time.sleep(0.01)


def test_a_dataloader_worker_outlives_sigint_and_repeated_sigterms_for_the_grace_period():
    # The main process needs batches until its clean stop; a worker nobody shuts down still ends after the grace
    # period (SIGALRM), so a stuck one cannot hang the exit.
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    worker = context.Process(target=_worker_that_defers_stop_signals, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(10)
        start = time.monotonic()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGTERM):  # Ctrl-C; the cluster's, the launcher's
            os.kill(worker.pid, signum)
            time.sleep(0.1)
        assert worker.is_alive()
        worker.join(10)
        assert not worker.is_alive() and worker.exitcode == -signal.SIGALRM
        assert time.monotonic() - start >= 0.9
    finally:
        if worker.is_alive():
            worker.kill()
