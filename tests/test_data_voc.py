"""load_voc on tiny VOC folders built on the fly (real JPEG/PNG files, palette masks, XML), bad input, real samples."""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apc_seg.data import BadInputError, load_voc, skipped_count
from apc_seg.data import voc as voc_module
from apc_seg.labels import VOC_CLASSES, VOC_PALETTE

H, W = 16, 24
REAL_VOC = Path(__file__).resolve().parents[1] / ".." / "shared" / "realdata" / "voc"


def _image(seed, height=H, width=W):
    # Smooth content so JPEG round trips stay within a few levels.
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 220, size=(2, 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(colours).resize((width, height), Image.BILINEAR))


def _palette_png(path, mask):
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    image.putpalette(VOC_PALETTE)
    image.save(path)


def _mask(*boxes, border=True):
    """A mask with rectangles (label, y0, y1, x0, x1) and, like VOC, a 255 outline."""
    mask = np.zeros((H, W), dtype=np.uint8)
    for label, y0, y1, x0, x1 in boxes:
        mask[y0:y1, x0:x1] = label
        if border:
            mask[y0, x0:x1] = 255
    return mask


def _xml(path, names):
    objects = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
    Path(path).write_text(f"<annotation><filename>x.jpg</filename>{objects}</annotation>")


MASKS = {
    "2007_000001": _mask((15, 2, 10, 3, 12)),
    "2007_000002": _mask((1, 0, 8, 0, 8), (12, 8, 16, 10, 20)),
    "2007_000003": _mask(),
}
AUG = {"2007_000001": MASKS["2007_000001"], "2007_000003": MASKS["2007_000003"], "2007_000005": _mask((7, 1, 9, 1, 9))}


def make_voc(base: Path, aug=True) -> Path:
    """VOCdevkit/VOC2012 with 5 images: 3 with masks, 1 with only an XML, 1 only in SBD's SegmentationClassAug."""
    voc = base / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for i in range(1, 6):
        Image.fromarray(_image(i)).save(voc / "JPEGImages" / f"2007_00000{i}.jpg", quality=95)
    for image_id, mask in MASKS.items():
        _palette_png(voc / "SegmentationClass" / f"{image_id}.png", mask)
    _xml(voc / "Annotations" / "2007_000004.xml", ["dog", "person", "dog"])
    _xml(voc / "Annotations" / "2007_000001.xml", ["cat"])  # a mask, when present, wins over the XML
    lists = voc / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("2007_000001\n2007_000002\n")
    (lists / "val.txt").write_text("2007_000003\n2007_000004\n")
    (lists / "trainval.txt").write_text("2007_000001\n2007_000002\n2007_000003\n2007_000004\n")
    if aug:
        (voc / "SegmentationClassAug").mkdir()
        for image_id, mask in AUG.items():  # SBD ships grayscale ('L') index PNGs
            Image.fromarray(mask).save(voc / "SegmentationClassAug" / f"{image_id}.png")
    return voc


@pytest.fixture
def voc(tmp_path):
    return make_voc(tmp_path / "data")


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


def test_load_splits_counts_labels_masks_names(voc, cache):
    ds = load_voc(voc.parents[1], splits=("train", "val", "trainval"), cache_dir=cache)
    assert {k: len(v) for k, v in ds.items()} == {"train": 2, "val": 2, "trainval": 4}
    assert ds["train"].features["class_labels"].feature.names == list(VOC_CLASSES)
    assert ds["train"]["image_id"] == ["2007_000001", "2007_000002"]
    assert ds["train"]["class_labels"] == [[15], [1, 12]]
    assert ds["val"]["class_labels"] == [[], [12, 15]]  # an all-background mask; labels from the XML
    for split in ds.values():
        for row in split:
            image = row["image"]
            assert image.mode == "RGB" and image.size == (W, H)
            original = _image(int(row["image_id"][-1]))
            assert np.abs(np.asarray(image, dtype=int) - original).mean() < 3
            if row["image_id"] in MASKS:
                np.testing.assert_array_equal(np.array(row["mask"]), MASKS[row["image_id"]])
            else:
                assert row["mask"] is None


@pytest.mark.parametrize("level", [0, 1, 2])
def test_root_may_be_parent_devkit_or_voc2012(voc, cache, level):
    root = [voc.parents[1], voc.parent, voc][level]
    ds = load_voc(root, splits="train", cache_dir=cache)
    assert ds["train"]["class_labels"] == [[15], [1, 12]]


def test_train_aug_default_list_excludes_val(voc, cache):
    ds = load_voc(voc, splits=["train_aug"], cache_dir=cache)["train_aug"]
    assert ds["image_id"] == ["2007_000001", "2007_000005"]  # 2007_000003 is in val
    assert ds["class_labels"] == [[15], [7]]
    np.testing.assert_array_equal(np.array(ds[1]["mask"]), AUG["2007_000005"])


def test_train_aug_list_file_deeplab_format(voc, cache):
    (voc / "ImageSets/Segmentation/train_aug.txt").write_text(
        "/JPEGImages/2007_000005.jpg /SegmentationClassAug/2007_000005.png\n"
    )
    ds = load_voc(voc, splits=["train_aug"], cache_dir=cache)["train_aug"]
    assert ds["image_id"] == ["2007_000005"] and ds["class_labels"] == [[7]]


def test_missing_root_or_split_shows_layout(tmp_path, voc, cache):
    with pytest.raises(FileNotFoundError, match="ImageSets/Segmentation") as err:
        load_voc(tmp_path / "nowhere", cache_dir=cache)
    assert "JPEGImages" in str(err.value) and "host.robots.ox.ac.uk" in str(err.value)
    with pytest.raises(FileNotFoundError, match="'test' not found") as err:
        load_voc(voc, splits=["test"], cache_dir=cache)
    assert "SegmentationClass" in str(err.value)
    shutil.rmtree(voc / "SegmentationClassAug")
    with pytest.raises(FileNotFoundError, match="SegmentationClassAug"):
        load_voc(voc, splits=["train_aug"], cache_dir=cache)


def test_cache_reused_but_never_stale(tmp_path, voc, cache, monkeypatch):
    first = load_voc(voc, splits="train", cache_dir=cache)["train"]
    with monkeypatch.context() as m:  # a cache hit decodes nothing
        m.setattr(voc_module, "open_rgb", lambda *a: pytest.fail("cache was not used"))
        second = load_voc(voc, splits="train", cache_dir=cache)["train"]
    assert second.cache_files == first.cache_files and second["class_labels"] == [[15], [1, 12]]

    other = make_voc(tmp_path / "other")  # same layout, another root, different content
    _palette_png(other / "SegmentationClass" / "2007_000001.png", _mask((3, 0, 5, 0, 5)))
    assert load_voc(other, splits="train", cache_dir=cache)["train"]["class_labels"] == [[3], [1, 12]]

    _palette_png(voc / "SegmentationClass" / "2007_000002.png", _mask((9, 0, 4, 0, 4)))  # edited in place
    assert load_voc(voc, splits="train", cache_dir=cache)["train"]["class_labels"] == [[15], [9]]


def test_real_voc_samples_in_place(tmp_path):
    if not (REAL_VOC / "ImageSets" / "Segmentation" / "all.txt").is_file():
        pytest.skip(f"real VOC samples not found at {REAL_VOC.resolve()}")
    ds = load_voc(REAL_VOC, splits=["all"], cache_dir=str(tmp_path / "cache"))["all"]
    assert len(ds) == 7
    cls_labels = np.load(REAL_VOC / "cls_labels.npy", allow_pickle=True).item()  # id -> 20 floats, class k at k-1
    for row in ds:
        expected = [int(k) + 1 for k in np.flatnonzero(cls_labels[row["image_id"]])]
        assert row["class_labels"] == expected, row["image_id"]
        mask = np.array(row["mask"])
        assert row["image"].size == row["mask"].size and 255 in mask
    assert ds[0]["image_id"] == "2007_000032" and ds[0]["class_labels"] == [1, 15]  # aeroplane, person


# ---------------------------------------------------------------------------------------------------- bad input


def _bad_voc(tmp_path, write_bad):
    """A VOC folder whose train split is one good image and one bad one written by ``write_bad(voc)``."""
    voc = make_voc(tmp_path / "bad", aug=False)
    write_bad(voc)
    (voc / "ImageSets/Segmentation/train.txt").write_text("2007_000009\n2007_000001\n")  # bad one first
    return voc


def _jpeg(voc, array, **kwargs):
    Image.fromarray(array).save(voc / "JPEGImages" / "2007_000009.jpg", **kwargs)


def _truncated(voc):
    _jpeg(voc, _image(9, 64, 64), quality=95)
    path = voc / "JPEGImages" / "2007_000009.jpg"
    path.write_bytes(path.read_bytes()[:400])
    _palette_png(voc / "SegmentationClass" / "2007_000009.png", np.zeros((64, 64)))


def _not_an_image(voc):
    (voc / "JPEGImages" / "2007_000009.jpg").write_text("this is not a jpeg")
    _palette_png(voc / "SegmentationClass" / "2007_000009.png", _mask())


def _missing_image(voc):
    _palette_png(voc / "SegmentationClass" / "2007_000009.png", _mask())


def _mask_wrong_size(voc):
    _jpeg(voc, _image(9))
    _palette_png(voc / "SegmentationClass" / "2007_000009.png", np.zeros((H + 1, W)))


def _mask_out_of_range(voc):
    _jpeg(voc, _image(9))
    _palette_png(voc / "SegmentationClass" / "2007_000009.png", _mask((21, 0, 4, 0, 4)))


def _rgb_mask(voc):
    _jpeg(voc, _image(9))
    Image.fromarray(_image(3)).save(voc / "SegmentationClass" / "2007_000009.png")


def _no_label_source(voc):
    _jpeg(voc, _image(9))


@pytest.mark.parametrize(
    "write_bad, message",
    [
        (_truncated, "truncated"),
        (_not_an_image, "Not an image"),
        (_missing_image, "not found"),
        (_mask_wrong_size, "is 24x17 but its image is 24x16"),
        (_mask_out_of_range, r"values \[21\] outside 0..20 and 255"),
        (_rgb_mask, "mode 'RGB'"),
        (_no_label_source, "neither a mask nor an Annotations xml"),
    ],
)
def test_bad_input_raises_naming_file_or_is_skipped_and_counted(tmp_path, cache, write_bad, message):
    voc = _bad_voc(tmp_path, write_bad)
    with pytest.raises(BadInputError, match=message) as err:
        load_voc(voc, splits="train", cache_dir=cache)
    assert "2007_000009" in str(err.value)

    with pytest.warns(UserWarning, match="2007_000009"):
        ds = load_voc(voc, splits="train", skip_bad_images=True, cache_dir=cache)["train"]
    assert ds["image_id"] == ["2007_000001"] and ds["class_labels"] == [[15]]
    assert skipped_count(ds) == 1
    with warnings.catch_warnings():  # the cached call knows the count too, without decoding again
        warnings.simplefilter("error")
        assert skipped_count(load_voc(voc, splits="train", skip_bad_images=True, cache_dir=cache)["train"]) == 1


def test_empty_split(voc, cache):
    (voc / "ImageSets/Segmentation/empty.txt").write_text("\n")
    with pytest.raises(BadInputError, match="'empty' is empty") as err:
        load_voc(voc, splits="empty", cache_dir=cache)
    assert "empty.txt" in str(err.value)
    (voc / "ImageSets/Segmentation/allbad.txt").write_text("2007_000077\n")  # every image skipped -> empty too
    with pytest.warns(UserWarning), pytest.raises(BadInputError, match="empty after skipping 1"):
        load_voc(voc, splits="allbad", skip_bad_images=True, cache_dir=cache)


def test_several_processes_build_the_same_split_and_name_bad_files(tmp_path, voc, cache, monkeypatch):
    from apc_seg.data import common

    monkeypatch.setattr(common, "RECORDS_PER_SHARD", 1)  # one image per shard, so 2 processes share the work
    one = load_voc(voc, splits="trainval", cache_dir=cache)["trainval"]
    other_cache = tmp_path / "other_cache"
    two = load_voc(voc, splits="trainval", cache_dir=str(other_cache), num_proc=2)["trainval"]
    assert len(list(other_cache.rglob("*-of-00002.arrow"))) == 2  # each process wrote its part
    assert two["image_id"] == one["image_id"] and two["class_labels"] == one["class_labels"]  # in list order
    for a, b in zip(one, two):
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        assert (a["mask"] is None and b["mask"] is None) or np.array_equal(np.asarray(a["mask"]), np.asarray(b["mask"]))

    bad = _bad_voc(tmp_path, _not_an_image)
    with pytest.raises(BadInputError, match="Not an image") as err:  # raised in a worker process, still ours
        load_voc(bad, splits="train", cache_dir=cache, num_proc=2)
    assert "2007_000009" in str(err.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip warning is a worker process's
        ds = load_voc(bad, splits="train", skip_bad_images=True, cache_dir=cache, num_proc=2)["train"]
    assert ds["image_id"] == ["2007_000001"] and skipped_count(ds) == 1
    # The cache does not depend on how many processes built it, nor does the count it reports.
    assert skipped_count(load_voc(bad, splits="train", skip_bad_images=True, cache_dir=cache)["train"]) == 1


def _converted(tmp_path, cache, image: Image.Image, fmt: str, mask_size, **save):
    voc = make_voc(tmp_path / "conv", aug=False)
    image.save(voc / "JPEGImages" / "2007_000009.jpg", format=fmt, **save)  # content decides, not the extension
    _palette_png(voc / "SegmentationClass" / "2007_000009.png", np.zeros(mask_size))
    (voc / "ImageSets/Segmentation/one.txt").write_text("2007_000009\n")
    loaded = load_voc(voc, splits="one", cache_dir=cache)["one"][0]["image"]
    assert loaded.mode == "RGB"
    return np.asarray(loaded, dtype=int)


def test_grayscale_cmyk_rgba_16bit_become_correct_rgb(tmp_path, cache):
    gray = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (H, 1))
    out = _converted(tmp_path / "l", cache, Image.fromarray(gray), "PNG", (H, W))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))

    sixteen = (gray.astype(np.uint16) * 257).astype(np.uint16)  # full 16-bit range; plain convert() would clip
    out = _converted(tmp_path / "i16", cache, Image.fromarray(sixteen), "PNG", (H, W))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))

    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[:, : W // 2, 3] = 255  # left opaque, right transparent -> white
    out = _converted(tmp_path / "rgba", cache, Image.fromarray(rgba), "PNG", (H, W))
    np.testing.assert_array_equal(out[:, : W // 2], np.broadcast_to([10, 200, 30], (H, W // 2, 3)))
    np.testing.assert_array_equal(out[:, W // 2 :], np.full((H, W // 2, 3), 255))

    cmyk = Image.fromarray(_image(5)).convert("CMYK")
    out = _converted(tmp_path / "cmyk", cache, cmyk, "JPEG", (H, W), quality=100)
    assert np.abs(out - _image(5)).mean() < 4


def test_exif_rotated_jpeg_is_upright_and_checked_against_mask(tmp_path, cache):
    array = _image(7, height=10, width=20)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the upright image is 10 wide, 20 high
    upright = np.asarray(Image.fromarray(array).transpose(Image.Transpose.ROTATE_270), dtype=int)
    out = _converted(tmp_path / "exif", cache, Image.fromarray(array), "JPEG", (20, 10), quality=100,
                     exif=exif.tobytes())
    assert out.shape == (20, 10, 3) and np.abs(out - upright).mean() < 3
    with pytest.raises(BadInputError, match="is 20x10 but its image is 10x20"):  # a mask drawn on the raw pixels
        _converted(tmp_path / "exif2", cache, Image.fromarray(array), "JPEG", (10, 20), exif=exif.tobytes())
