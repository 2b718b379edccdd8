"""load_coco / load_coco_instances on a tiny COCO folder with polygon, RLE and crowd annotations, and real samples."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools", reason="the [coco] extra (pycocotools) is not installed")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from apc_seg.data import BadInputError, load_coco, load_coco_instances  # noqa: E402
from apc_seg.labels import COCO_CATEGORY_TO_LABEL, COCO_CLASSES, VOC_PALETTE  # noqa: E402

H, W = 30, 40
REAL_COCO = Path(__file__).resolve().parents[1] / ".." / "shared" / "realdata" / "coco"
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 44, "name": "bottle"},
              {"id": 90, "name": "toothbrush"}]


def _rle_counts(binary):
    """Uncompressed (list) RLE counts, column-major as COCO stores them."""
    flat = binary.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    return counts


def _box(y0, y1, x0, x1):
    binary = np.zeros((H, W), dtype=np.uint8)
    binary[y0:y1, x0:x1] = 1
    return binary


def _val_json():
    crowd = _box(0, 12, 20, 40)
    compressed = mask_utils.encode(np.asfortranarray(_box(20, 28, 2, 12)))
    compressed["counts"] = compressed["counts"].decode()
    annotations = [
        # image 1: a large person polygon, a smaller dog polygon on top of it, and a crowd of persons (list RLE)
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 500.0,
         "segmentation": [[2, 2, 30, 2, 30, 25, 2, 25]]},
        {"id": 2, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 100.0,
         "segmentation": [[10, 10, 20, 10, 15, 20]]},
        {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 240.0,
         "segmentation": {"size": [H, W], "counts": _rle_counts(crowd)}},
        # image 2: a toothbrush as compressed RLE and a two-part bottle polygon
        {"id": 4, "image_id": 2, "category_id": 90, "iscrowd": 0, "area": 80.0, "segmentation": compressed},
        {"id": 5, "image_id": 2, "category_id": 44, "iscrowd": 0, "area": 60.0,
         "segmentation": [[20, 2, 28, 2, 28, 8, 20, 8], [30, 10, 38, 10, 38, 16, 30, 16]]},
    ]
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "height": H, "width": W} for i in (1, 2, 3)]
    return {"images": images, "annotations": annotations, "categories": [dict(c) for c in CATEGORIES]}


def _write_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for info in images:
        rng = np.random.default_rng(info["id"])
        array = rng.integers(0, 255, size=(info["height"], info["width"], 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / info["file_name"], quality=95)


def make_coco(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    val = _val_json()
    train = {"images": [{"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": H, "width": W}],
             "annotations": [{"id": 9, "image_id": 7, "category_id": 44, "iscrowd": 0, "area": 4.0,
                              "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]}],
             "categories": CATEGORIES}
    for split, data in (("val", val), ("train", train)):
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
        _write_images(root / f"{split}2014", data["images"])
    return root


def reference_mask(annotation_file, image_id):
    """Independent rendering with pycocotools' own annToMask: larger instances first, crowd -> 255 where uncovered."""
    coco = COCO(str(annotation_file))
    info = coco.loadImgs(image_id)[0]
    mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    covered = np.zeros_like(mask, dtype=bool)
    for ann in sorted((a for a in anns if not a["iscrowd"]), key=lambda a: -a["area"]):
        binary = coco.annToMask(ann).astype(bool)
        mask[binary] = COCO_CATEGORY_TO_LABEL[ann["category_id"]]
        covered |= binary
    for ann in (a for a in anns if a["iscrowd"]):
        mask[coco.annToMask(ann).astype(bool) & ~covered] = 255
    return mask


@pytest.fixture
def coco_root(tmp_path):
    return make_coco(tmp_path / "coco")


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


@pytest.mark.parametrize("num_proc", [None, 2])
def test_load_coco_counts_labels_names_masks(coco_root, cache, num_proc, monkeypatch):
    from apc_seg.data import common

    monkeypatch.setattr(common, "RECORDS_PER_SHARD", 1)  # with num_proc=2, two processes render val's masks
    ds = load_coco(coco_root, splits=("train", "val"), cache_dir=cache, num_proc=num_proc)
    assert {k: len(v) for k, v in ds.items()} == {"train": 1, "val": 3}
    val = ds["val"]
    assert val.features["class_labels"].feature.names == list(COCO_CLASSES)
    assert val["image_id"] == [f"COCO_val2014_{i:012d}" for i in (1, 2, 3)]
    assert val["class_labels"] == [[1, 17], [40, 80], []]  # person, dog (18 -> 17) | bottle (44 -> 40), toothbrush (90 -> 80)
    assert [COCO_CLASSES[i] for i in val["class_labels"][1]] == ["bottle", "toothbrush"]
    assert ds["train"]["class_labels"] == [[40]]

    annotation_file = coco_root / "annotations" / "instances_val2014.json"
    for row, image_id in zip(val, (1, 2, 3)):
        mask = np.array(row["mask"])
        np.testing.assert_array_equal(mask, reference_mask(annotation_file, image_id))
        assert row["image"].size == (W, H) and row["image"].mode == "RGB"
    mask1 = np.array(val[0]["mask"])
    assert mask1[15, 15] == 17 and mask1[5, 5] == 1  # the smaller dog is on top of the person
    assert mask1[5, 35] == 255 and mask1[5, 25] == 1  # crowd only where no instance covers it
    assert set(np.unique(np.array(val[2]["mask"]))) == {0}


def test_prepared_mask_dir_and_labels_without_masks(coco_root, cache, tmp_path):
    mask_dir = tmp_path / "masks" / "val2014"
    mask_dir.mkdir(parents=True)
    prepared = {}
    for i in (1, 2, 3):
        prepared[i] = np.full((H, W), i, dtype=np.uint8)
        image = Image.fromarray(prepared[i])
        image.putpalette(VOC_PALETTE)
        image.save(mask_dir / f"COCO_val2014_{i:012d}.png")
    val = load_coco(coco_root, splits="val", mask_dir=tmp_path / "masks", cache_dir=cache)["val"]
    for row, i in zip(val, (1, 2, 3)):
        np.testing.assert_array_equal(np.array(row["mask"]), prepared[i])
    assert val["class_labels"] == [[1, 17], [40, 80], []]  # labels still come from the instances

    Image.fromarray(np.full((H, W), 81, dtype=np.uint8)).save(mask_dir / "COCO_val2014_000000000002.png")
    with pytest.raises(BadInputError, match=r"COCO_val2014_000000000002.png holds label values \[81\]"):
        load_coco(coco_root, splits="val", mask_dir=tmp_path / "masks", cache_dir=cache)

    no_masks = load_coco(coco_root, splits="val", masks=False, cache_dir=cache)["val"]
    assert no_masks["mask"] == [None, None, None] and no_masks["class_labels"] == [[1, 17], [40, 80], []]


def test_missing_root_split_and_bad_annotations(coco_root, cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_val2014.json") as err:
        load_coco(tmp_path / "nowhere", cache_dir=cache)
    assert "cocodataset.org" in str(err.value)
    with pytest.raises(FileNotFoundError, match="'val' \\(year 2017\\) not found"):
        load_coco(coco_root, splits="val", year=2017, cache_dir=cache)

    data = _val_json()
    data["categories"][1]["name"] = "wolf"  # id 18 is "dog" in COCO: refuse rather than mislabel
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(BadInputError, match="bad.json: category id 18 \\('wolf'\\)"):
        load_coco_instances(bad, coco_root / "val2014", cache_dir=cache)

    data = _val_json()
    data["images"][0]["width"] = W + 1
    bad.write_text(json.dumps(data))
    with pytest.raises(BadInputError, match="COCO_val2014_000000000001.jpg is 40x30 but its annotation says 41x30"):
        load_coco_instances(bad, coco_root / "val2014", cache_dir=cache)
    with pytest.warns(UserWarning, match="000000000001"):
        ds = load_coco_instances(bad, coco_root / "val2014", skip_bad_images=True, cache_dir=cache)
    assert len(ds) == 2

    (coco_root / "val2014" / "COCO_val2014_000000000003.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(BadInputError, match="COCO_val2014_000000000003.jpg"):
        load_coco(coco_root, splits="val", cache_dir=cache)


def test_clear_message_without_pycocotools(coco_root, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # makes "from pycocotools import mask" fail
    with pytest.raises(ImportError, match=r'pip install "apc-seg\[coco\]"'):
        load_coco(coco_root, splits="val", cache_dir=cache)
    assert load_coco(coco_root, splits="val", masks=False, cache_dir=cache)["val"]["class_labels"][0] == [1, 17]


def test_real_coco_samples_in_place(tmp_path):
    annotation_file = REAL_COCO / "test_coco.json"
    if not annotation_file.is_file():
        pytest.skip(f"real COCO samples not found at {REAL_COCO.resolve()}")
    ds = load_coco_instances(annotation_file, REAL_COCO / "images", split="test", cache_dir=str(tmp_path / "c"))
    assert len(ds) == 4 and ds["class_labels"] == [[1]] * 4
    coco = COCO(str(annotation_file))
    for row in ds:
        image_id = int(row["image_id"])
        mask = np.array(row["mask"])
        np.testing.assert_array_equal(mask, reference_mask(annotation_file, image_id))
        info = coco.loadImgs(image_id)[0]
        assert row["image"].size == (info["width"], info["height"]) and mask.any()
