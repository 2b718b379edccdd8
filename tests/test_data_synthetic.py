"""The synthetic dataset: schema, determinism, balanced class sets, distractors, VOC round trip and CLI."""

import io
from collections import Counter
from itertools import combinations

import datasets
import numpy as np
import pytest
from PIL import Image

from apc_seg.data import load_voc, make_synthetic, write_voc
from apc_seg.data.synthetic import generate_split, main, render
from apc_seg.labels import SYNTHETIC_CLASSES, VOC_PALETTE

SIZE = 48


@pytest.fixture(scope="module")
def small():
    return make_synthetic(num_train=16, num_val=8, num_test=8, image_size=SIZE, seed=3)


def _raw(dataset):
    """The stored bytes of every image and mask."""
    raw = dataset.cast_column("image", datasets.Image(decode=False)).cast_column("mask", datasets.Image(decode=False))
    return [(r["image"]["bytes"], r["mask"]["bytes"]) for r in raw]


def test_schema_and_labels_match_masks(small):
    assert {k: len(v) for k, v in small.items()} == {"train": 16, "val": 8, "test": 8}
    train = small["train"]
    assert train.features["class_labels"].feature.names == list(SYNTHETIC_CLASSES) and len(SYNTHETIC_CLASSES) == 4
    assert train[0]["image_id"] == "train_00000" and small["test"][7]["image_id"] == "test_00007"
    for row in train:
        mask = np.array(row["mask"])
        assert row["image"].mode == "RGB" and row["image"].size == (SIZE, SIZE)
        assert row["mask"].mode == "P" and mask.shape == (SIZE, SIZE)
        assert set(np.unique(mask)) <= {0, 1, 2, 3}
        assert row["class_labels"] == sorted(set(np.unique(mask)) - {0})


def test_deterministic_by_seed(small):
    again = make_synthetic(num_train=16, num_val=8, num_test=8, image_size=SIZE, seed=3)
    for split in small:
        assert _raw(again[split]) == _raw(small[split])
    other = make_synthetic(num_train=16, num_val=0, num_test=0, image_size=SIZE, seed=4)
    assert _raw(other["train"]) != _raw(small["train"]) and list(other) == ["train"]
    assert _raw(small["val"]) != _raw(small["train"])[:8]  # splits are different streams


def test_every_class_set_equally_often_and_objects_overlap():
    rows = generate_split(64, image_size=SIZE, seed=0, split="train")
    sets = Counter(tuple(r["class_labels"]) for r in rows)
    all_sets = [c for k in range(4) for c in combinations((1, 2, 3), k)]
    assert sets == {s: 8 for s in all_sets}  # 8 subsets x 8: each class present in exactly half, independently

    masks = [np.array(Image.open(io.BytesIO(r["mask"]["bytes"]))) for r in rows]
    touching = sum(
        bool(((m[:, 1:] != m[:, :-1]) & (m[:, 1:] > 0) & (m[:, :-1] > 0)).any()) for m in masks
    )  # two different classes side by side: one painted over the other
    assert touching >= 4
    areas = [(m > 0).mean() for m, r in zip(masks, rows) if len(r["class_labels"]) == 1]
    assert max(areas) > 2.5 * min(areas)  # sizes vary


def test_distractors_are_small_unlabelled_background():
    changed = 0
    for i in range(12):
        plain, plain_mask = render(np.random.default_rng(i), SIZE, [1, 2], distractor_probability=0.0)
        image, mask = render(np.random.default_rng(i), SIZE, [1, 2], distractor_probability=1.0)
        np.testing.assert_array_equal(mask, plain_mask)  # never labelled
        diff = np.abs(image.astype(int) - plain).sum(-1) > 0
        assert not (diff & (mask > 0)).any()  # only on background
        assert diff.sum() <= 2 * round(0.08 * SIZE) ** 2  # tiny: at most two patches of 8% of the side
        changed += bool(diff.any())
    assert changed >= 6


def test_write_voc_loads_unchanged_through_load_voc(small, tmp_path):
    out = write_voc(small, tmp_path / "synthetic_voc")
    assert (out / "ImageSets/Segmentation/val.txt").read_text().split() == small["val"]["image_id"]
    on_disk = Image.open(out / "SegmentationClass" / "train_00000.png")
    assert on_disk.mode == "P" and on_disk.getpalette()[: 3 * 4] == VOC_PALETTE[: 3 * 4]
    loaded = load_voc(out, splits=("train", "val", "test"), cache_dir=str(tmp_path / "cache"))
    for split in small:
        assert loaded[split]["image_id"] == small[split]["image_id"]
        assert loaded[split]["class_labels"] == small[split]["class_labels"]
        for a, b in zip(loaded[split], small[split]):
            np.testing.assert_array_equal(np.array(a["mask"]), np.array(b["mask"]))
            assert np.abs(np.asarray(a["image"], dtype=int) - np.asarray(b["image"], dtype=int)).mean() < 4


def test_cli_writes_voc_folder(tmp_path, capsys):
    main(["--write_voc", str(tmp_path / "v"), "--num_train", "8", "--num_val", "8", "--num_test", "0",
          "--image_size", "32", "--seed", "1"])
    assert "Wrote 16 images" in capsys.readouterr().out
    assert len(list((tmp_path / "v" / "JPEGImages").glob("*.jpg"))) == 16
    assert len((tmp_path / "v" / "ImageSets/Segmentation/train.txt").read_text().split()) == 8
    assert Image.open(tmp_path / "v" / "JPEGImages" / "val_00003.jpg").size == (32, 32)
