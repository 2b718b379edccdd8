"""apc-infer: index PNGs in the VOC palette and overlays, for files and folders; the examples/quickstart.py script."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apc_seg import APCForSemanticSegmentation, APCImageProcessor, VOC_PALETTE
from apc_seg.evaluation import predict_probabilities
from apc_seg.infer import main, overlay, segment

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REAL_PHOTOS = ROOT.parent / "shared" / "realdata" / "voc" / "JPEGImages"
CLASSES = {0: "background", 1: "stripes", 2: "dots", 3: "checker"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained tiny model saved like apc-train's output (weights, config, image processor)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("apc-tiny")
    APCForSemanticSegmentation(tiny_config(id2label=CLASSES)).save_pretrained(folder)
    APCImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def write_images(folder: Path, sizes) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (height, width) in enumerate(sizes):
        path = folder / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_infer_writes_palette_index_and_overlay_pngs_for_files_and_folders(model_dir, tmp_path, capsys):
    photos = write_images(tmp_path / "photos", [(37, 45), (24, 24)])
    single = write_images(tmp_path / "single", [(29, 33)])[0].rename(tmp_path / "single" / "lone.jpg")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")  # folders are filtered by suffix
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), str(tmp_path / "photos"), str(single), "--output_dir", str(out),
                 "--scales", "1.0,1.5", "--flip"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img0_overlay.png", "img1.png", "img1_overlay.png",
                                                     "lone.png", "lone_overlay.png"]
    model = APCForSemanticSegmentation.from_pretrained(model_dir).eval()
    for source in [*photos, single]:
        image = Image.open(source).convert("RGB")
        index = Image.open(out / f"{source.stem}.png")
        assert index.mode == "P" and index.size == image.size
        assert index.getpalette()[: 3 * 4] == VOC_PALETTE[: 3 * 4]
        labels = np.array(index)
        assert set(np.unique(labels)) <= set(CLASSES)
        # The same rule as apc-eval: the full image, averaged over scales and flips (ViT normalisation).
        pixel_values = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        expected = predict_probabilities(model, pixel_values, (1.0, 1.5), True)[0].argmax(0).numpy()
        assert np.array_equal(labels, expected)
        blended = np.array(Image.open(out / f"{source.stem}_overlay.png"))
        assert blended.shape == (image.height, image.width, 3)
        background = labels == 0
        assert np.array_equal(blended[background], np.asarray(image)[background])
        if (~background).any():
            assert not np.array_equal(blended[~background], np.asarray(image)[~background])
    printed = capsys.readouterr().out
    assert "Segmented 3 of 3 image(s)" in printed


def test_image_list_segments_only_the_listed_images_without_overlays(model_dir, tmp_path, capsys):
    # The VOC test-server workflow: JPEGImages + ImageSets/Segmentation/test.txt, index PNGs only.
    write_images(tmp_path / "JPEGImages", [(16, 16), (24, 16), (16, 24)])  # img0.jpg, img1.png, img2.jpg
    other = write_images(tmp_path / "more", [(8, 8), (8, 8)])[1]  # more/img1.png: the first folder wins
    (tmp_path / "test.txt").write_text("img2\n\nimg0.jpg\nimg1\n")
    out = tmp_path / "results"
    assert main(["--model", str(model_dir), str(tmp_path / "JPEGImages"), str(other.parent),
                 "--image_list", str(tmp_path / "test.txt"), "--no_overlay", "--output_dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img1.png", "img2.png"]
    assert Image.open(out / "img1.png").size == (16, 24)  # JPEGImages/img1.png (16 wide, 24 high), not more/img1.png
    printed = capsys.readouterr().out.splitlines()
    assert [Path(line.split(" -> ")[0]).name for line in printed[:3]] == ["img2.jpg", "img0.jpg", "img1.png"]


@pytest.mark.parametrize(
    "listed, use_file, message",
    [
        ("img0\nnope_1\nnope_2\n", False, "2 image(s) of"),
        ("", False, "names no images"),
        ("img0\n", True, "is not a folder"),
    ],
)
def test_image_list_errors_name_the_flag_and_the_problem(listed, use_file, message, model_dir, tmp_path, capsys):
    image = write_images(tmp_path / "JPEGImages", [(16, 16)])[0]
    (tmp_path / "test.txt").write_text(listed)
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), str(image if use_file else image.parent), "--image_list",
              str(tmp_path / "test.txt"), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert "--image_list" in err and message in err and "\n" not in err


def test_overlay_blends_the_palette_colour_on_foreground_only():
    image = Image.new("RGB", (2, 1), (100, 100, 100))
    labels = np.array([[0, 1]], dtype=np.uint8)
    blended = np.array(overlay(image, labels, alpha=0.5))
    assert blended[0, 0].tolist() == [100, 100, 100]
    assert blended[0, 1].tolist() == [round(0.5 * 100 + 0.5 * c) for c in VOC_PALETTE[3:6]]


def test_unreadable_file_is_skipped_with_a_warning_and_exit_code_1(model_dir, tmp_path, capsys):
    write_images(tmp_path / "photos", [(16, 16)])
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["--model", str(model_dir), str(tmp_path / "photos"), "--output_dir", str(tmp_path / "out")]) == 1
    assert (tmp_path / "out" / "img0.png").is_file()
    assert "skipping" in capsys.readouterr().err


@pytest.mark.parametrize(
    "inputs, extra, flag",
    [
        (["missing.jpg"], [], "IMAGE_OR_FOLDER"),
        (["empty_folder"], [], "IMAGE_OR_FOLDER"),
        (["a/x.jpg", "b/x.png"], [], "IMAGE_OR_FOLDER"),  # both would be x.png
        (["a/x.jpg"], ["--scales", "1.0,huge"], "--scales"),
        (["a/x.jpg"], ["--model", "/no/such/model"], "--model"),
    ],
)
def test_bad_input_is_one_line_naming_the_argument(inputs, extra, flag, model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_folder").mkdir()
    write_images(tmp_path / "a", [(16, 16)])[0].rename(tmp_path / "a" / "x.jpg")
    write_images(tmp_path / "b", [(8, 8), (16, 16)])[1].rename(tmp_path / "b" / "x.png")
    with pytest.raises(SystemExit) as error:
        main(["--model", str(model_dir), *inputs, "--output_dir", "out", *extra])
    err = capsys.readouterr().err.strip()
    assert error.value.code != 0 and flag in err and "\n" not in err


@pytest.mark.skipif(not REAL_PHOTOS.is_dir(), reason=f"no real VOC photos at {REAL_PHOTOS}")
def test_console_script_on_a_real_photo(model_dir, tmp_path):
    photo = sorted(REAL_PHOTOS.glob("*.jpg"))[0]  # read in place
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([str(BIN / "apc-infer"), "--model", str(model_dir), str(photo), "--output_dir",
                             str(tmp_path), "--scales", "0.5"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    index = Image.open(tmp_path / f"{photo.stem}.png")
    assert index.mode == "P" and index.size == Image.open(photo).size
    assert Image.open(tmp_path / f"{photo.stem}_overlay.png").size == index.size


def test_segment_with_crf_returns_a_full_size_label_map(model_dir):
    pytest.importorskip("pydensecrf.densecrf")
    model = APCForSemanticSegmentation.from_pretrained(model_dir).eval()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(19, 23, 3), dtype=np.uint8))
    labels = segment(model, image, crf=True)
    assert labels.shape == (19, 23) and labels.dtype == np.uint8 and labels.max() < 4


def test_examples_quickstart_predicts_and_saves_an_overlay(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "overlay.png"
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--model", str(model_dir), "--output", str(out)])
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    assert Image.open(out).mode == "RGB"
    assert "Saved" in capsys.readouterr().out


def test_crf_in_worker_processes_writes_the_same_files_in_input_order(model_dir, tmp_path, capsys):
    pytest.importorskip("pydensecrf.densecrf")
    photos = write_images(tmp_path / "photos", [(37, 45), (24, 24), (30, 20), (41, 33), (24, 40), (16, 16)])
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    printed = {}
    for out, workers in ((serial, "0"), (parallel, "2")):
        assert main(["--model", str(model_dir), str(tmp_path / "photos"), "--output_dir", str(out), "--crf",
                     "--num_workers", workers]) == 0
        printed[workers] = [line.split(" -> ")[0] for line in capsys.readouterr().out.splitlines() if " -> " in line]
    assert printed["2"] == printed["0"] == [str(p) for p in sorted(photos)]  # 2 per worker waiting: all 6 queued
    for photo in photos:
        for suffix in (".png", "_overlay.png"):
            assert (parallel / f"{photo.stem}{suffix}").read_bytes() == (serial / f"{photo.stem}{suffix}").read_bytes()
