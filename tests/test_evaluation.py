"""evaluation.evaluate and apc-eval: multi-scale + flip, dense CRF, pseudo mode, odd image sizes, the CLI, and the
mIoU gathered over two CPU processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from apc_seg import APCForSemanticSegmentation
from apc_seg.data.transforms import EvalTransform
from apc_seg.cli import parse_scales
from apc_seg.evaluation import evaluate, main, predict_probabilities
from apc_seg.metrics import confusion_matrix, miou_from_confusion

from conftest import tiny_config

BIN = Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def example(height: int, width: int, seed: int, labels=(1, 2)) -> dict:
    """A random image, and a mask with ignore pixels and the given classes (in the apc-seg schema)."""
    rng = np.random.default_rng(seed)
    mask = rng.choice([0, *labels], size=(height, width)).astype(np.uint8)
    mask[0, :] = 255
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return {"image": Image.fromarray(image), "mask": Image.fromarray(mask), "class_labels": list(labels)}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return APCForSemanticSegmentation(tiny_config(par_dilations=[1, 2])).eval()


def brute_force(model, dataset, predict) -> dict:
    """The metric from one whole-split confusion matrix of per-image predictions made by `predict`."""
    cm = sum(
        confusion_matrix(predict(ex), torch.from_numpy(np.array(ex["mask"])), model.config.num_labels)
        for ex in dataset
    )
    return miou_from_confusion(cm)


def pixels(ex) -> torch.Tensor:
    return EvalTransform().apply(ex["image"])["pixel_values"][None]


# ------------------------------------------------------------------------------------------------ predictions


class RecordingModel(torch.nn.Module):
    """Records its inputs; class 1 scores grow left to right (a positional bias that flipping must cancel)."""

    def __init__(self, patch: int = 8):
        super().__init__()
        self.config = SimpleNamespace(patch_size=patch, num_labels=2, id2label={0: "background", 1: "thing"})
        self.inputs = []

    def forward(self, pixel_values):
        self.inputs.append(pixel_values)
        b, _, h, w = pixel_values.shape
        ramp = torch.linspace(-2, 2, w // self.config.patch_size).expand(b, 1, h // self.config.patch_size, -1)
        return SimpleNamespace(logits=torch.cat([torch.zeros_like(ramp), ramp + pixel_values.mean()], 1))


def test_multi_scale_resizes_to_patch_multiples_and_flip_averages_the_mirrored_input():
    model = RecordingModel()
    image = torch.randn(1, 3, 37, 29)  # not a multiple of the patch size
    probs = predict_probabilities(model, image, scales=(0.75, 1.0, 1.5), flip=True)

    assert probs.shape == (1, 2, 37, 29)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 37, 29))
    # Each scale: round(side * scale / 8) * 8; each twice, the second time mirrored.
    assert [tuple(x.shape[-2:]) for x in model.inputs] == [(24, 24)] * 2 + [(40, 32)] * 2 + [(56, 40)] * 2
    for plain, mirrored in zip(model.inputs[::2], model.inputs[1::2]):
        assert torch.equal(mirrored, plain.flip(-1))
    # The positional bias cancels: the flip-averaged map is mirror-symmetric, the plain one is not.
    torch.testing.assert_close(probs, probs.flip(-1))
    plain = predict_probabilities(RecordingModel(), image, scales=(1.0,), flip=False)
    assert not torch.allclose(plain, plain.flip(-1))


def test_parse_scales():
    assert parse_scales("1.0,1.25, 1.5") == (1.0, 1.25, 1.5)
    for bad in ("", "1.0,big", "0", "1.0,-1"):
        with pytest.raises(ValueError, match="--scales"):
            parse_scales(bad)


# ------------------------------------------------------------------------------------------------ evaluate


def test_evaluate_multi_scale_flip_on_odd_sizes_matches_a_brute_force_count(tiny_model):
    # Sizes that are not multiples of the patch (8), and two sizes in one split (never batched together).
    dataset = [example(37, 29, 0), example(37, 29, 1), example(20, 45, 2)]
    result = evaluate(tiny_model, dataset, scales=(1.0, 1.5), flip=True, batch_size=2)

    def predict(ex):
        return predict_probabilities(tiny_model, pixels(ex), (1.0, 1.5), True)[0].argmax(0)

    expected = brute_force(tiny_model, dataset, predict)
    assert result["num_pixels"] == 2 * 36 * 29 + 19 * 45  # every pixel but the ignored first rows
    assert result["per_class_iou"] == pytest.approx(expected["per_class_iou"])
    assert result["miou"] == pytest.approx(expected["miou"]) and 0 <= result["miou"] <= 1
    assert result["class_names"] == ["background", "cat", "dog"]
    single = evaluate(tiny_model, dataset)
    assert single["num_pixels"] == result["num_pixels"]


@pytest.mark.parametrize("as_dataset", [False, True])
def test_images_of_one_size_are_batched_together_wherever_they_are_in_the_split(tiny_model, as_dataset, monkeypatch):
    # VOC's val alternates sizes; batching only neighbours would give batches of one. Same metric as one by one.
    import datasets

    from apc_seg import evaluation

    dataset = [example(*((24, 40) if i % 2 else (40, 24)), seed=i) for i in range(6)]
    if as_dataset:  # sizes then come from the stored files' headers
        dataset = datasets.Dataset.from_list(dataset, features=datasets.Features({
            "image": datasets.Image(), "mask": datasets.Image(),
            "class_labels": datasets.List(datasets.Value("int64"))}))
    one_by_one = evaluate(tiny_model, dataset, batch_size=1)
    calls = []

    def predict(model, pixel_values, scales, flip):
        calls.append(tuple(pixel_values.shape))
        return predict_probabilities(model, pixel_values, scales, flip)

    monkeypatch.setattr(evaluation, "predict_probabilities", predict)
    batched = evaluate(tiny_model, dataset, batch_size=3)
    assert sorted(calls) == [(3, 3, 24, 40), (3, 3, 40, 24)]
    assert batched["per_class_iou"] == pytest.approx(one_by_one["per_class_iou"], abs=1e-6)
    assert batched["num_pixels"] == one_by_one["num_pixels"]


class ColourOracle(torch.nn.Module):
    """Knows that red is class 1, but only per 8x8 patch: upsampled, its boundaries blur across patch edges."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(patch_size=8, num_labels=2, id2label={0: "background", 1: "red"})
        self.gain = torch.nn.Parameter(torch.tensor(4.0))

    def forward(self, pixel_values):
        red = F.avg_pool2d(pixel_values[:, :1], 8)
        return SimpleNamespace(logits=torch.cat([-red, red], 1) * self.gain)


def test_crf_snaps_blurry_predictions_to_the_colour_edges():
    pytest.importorskip("pydensecrf.densecrf")
    mask = np.zeros((40, 48), np.uint8)
    mask[5:27, 11:37] = 1  # edges inside patches
    image = np.full((40, 48, 3), 40, np.uint8)
    image[mask == 1] = (220, 30, 30)
    dataset = [{"image": Image.fromarray(image), "mask": Image.fromarray(mask), "class_labels": [1]}]
    model = ColourOracle()
    plain = evaluate(model, dataset)["miou"]
    refined = evaluate(model, dataset, crf=True)["miou"]
    assert plain < 0.95 and refined > 0.99


def test_crf_path_on_a_real_model_equals_refining_each_image(tiny_model):
    pytest.importorskip("pydensecrf.densecrf")
    from apc_seg.crf import dense_crf

    dataset = [example(21, 27, 3), example(21, 27, 4)]
    result = evaluate(tiny_model, dataset, crf=True)

    def predict(ex):
        probs = predict_probabilities(tiny_model, pixels(ex))[0]
        return torch.as_tensor(dense_crf(np.array(ex["image"]), probs.numpy())).argmax(0)

    assert result["per_class_iou"] == pytest.approx(brute_force(tiny_model, dataset, predict)["per_class_iou"])


def test_pseudo_mode_scores_the_pseudo_labels_and_uses_only_the_image_labels(tiny_model):
    # Class 2 ("dog") is in no image label, so the pseudo-labels never predict it, whatever the model thinks.
    dataset = [example(35, 27, 5, labels=(1,)), example(35, 27, 6, labels=(1,))]
    result = evaluate(tiny_model, dataset, mode="pseudo")

    def predict(ex):
        multi_hot = torch.tensor([[1.0, 1.0, 0.0]])
        labels = tiny_model.pseudo_labels(F.interpolate(pixels(ex), size=(32, 24), mode="bilinear"), multi_hot)
        labels = F.interpolate(labels[:, None].float(), size=(35, 27), mode="nearest")[0, 0].long()
        return labels.masked_fill(labels == 255, 0)  # unconfident pixels count as background

    expected = brute_force(tiny_model, dataset, predict)
    assert result["per_class_iou"] == pytest.approx(expected["per_class_iou"])
    assert result["per_class_iou"][2] is None  # neither in the truth nor predicted
    with pytest.raises(ValueError, match="mode"):
        evaluate(tiny_model, dataset, mode="teacher")


def test_max_images_and_restoring_training_mode(tiny_model):
    dataset = [example(16, 16, i) for i in range(3)]
    tiny_model.train()
    result = evaluate(tiny_model, dataset, max_images=2)
    assert tiny_model.training
    tiny_model.eval()
    assert result["num_pixels"] == 2 * 15 * 16


# ------------------------------------------------------------------------------------------------ apc-eval


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_model):
    """An untrained tiny model on the synthetic classes: its predictions are varied, so equality means something."""
    torch.manual_seed(1)
    model = APCForSemanticSegmentation(
        tiny_config(id2label={0: "background", 1: "stripes", 2: "dots", 3: "checker"}, par_dilations=[1, 2])
    )
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    return folder


def run_eval(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip()


def test_apc_eval_writes_the_json_and_table(saved_model, tmp_path, capsys):
    out = tmp_path / "eval" / "result.json"
    assert main(["--model", str(saved_model), "--dataset", "synthetic", "--split", "val", "--num_images", "8",
                 "--image_size", "32", "--scales", "1.0,1.5", "--flip", "--output_json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("miou", "per_class_iou", "pixel_accuracy"):
        assert key in result
    assert len(result["per_class_iou"]) == 4 and 0 <= result["miou"] <= 1
    printed = capsys.readouterr()
    assert "mIoU" in printed.out and "stripes" in printed.out
    assert "8/8" in printed.err  # the progress bar (on stderr) counted every image


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--scales", "1.0,large"], "--scales"),
        (["--scales", "0"], "--scales"),
        (["--scales", ""], "--scales"),
        (["--mode", "teacher"], "--mode"),
        (["--dataset", "voc"], "--data_dir"),
        (["--dataset", "voc", "--data_dir", "/no/such/VOCdevkit"], "--data_dir"),
        (["--split", "holdout"], "--split"),
    ],
)
def test_apc_eval_bad_input_is_one_line_naming_the_flag(argv, flag, saved_model, capsys):
    code, err = run_eval(["--model", str(saved_model), "--dataset", "synthetic", "--num_images", "8",
                          "--image_size", "32", *argv], capsys)
    assert code != 0 and flag in err and "\n" not in err and "Traceback" not in err


def test_apc_eval_missing_model_is_one_line(tmp_path, capsys):
    code, err = run_eval(["--model", str(tmp_path / "nothing"), "--dataset", "synthetic"], capsys)
    assert code != 0 and "--model" in err and "\n" not in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_apc_eval_on_two_cpu_processes_gathers_the_single_process_result(saved_model, tmp_path, capsys):
    # Batches of one image: each image then goes through the very same computation in both runs.
    common = ["--model", str(saved_model), "--dataset", "synthetic", "--split", "val", "--num_images", "8",
              "--image_size", "32", "--batch_size", "1"]
    assert main(common + ["--output_json", str(tmp_path / "one.json")]) == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    launched = subprocess.run(
        [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "-m", "apc_seg.evaluation", *common, "--output_json", str(tmp_path / "two.json")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert sum(v is not None and v > 0 for v in one["per_class_iou"]) >= 3, "a degenerate model proves little"
    assert two == one  # the confusion matrices of the two halves add up to the whole one


@pytest.mark.parametrize("crf", [False, True])
def test_worker_processes_give_the_same_result_as_one_process(tiny_model, crf):
    # Decoding in DataLoader workers and, with the CRF, refining in a process pool (results may come back in any
    # order): the confusion matrix must be exactly the one-process one.
    if crf:
        pytest.importorskip("pydensecrf.densecrf")
    dataset = [example(21, 27, 3), example(21, 27, 4), example(30, 18, 5), example(21, 27, 6), example(16, 16, 7)]
    serial = evaluate(tiny_model, dataset, crf=crf, batch_size=2)
    parallel = evaluate(tiny_model, dataset, crf=crf, batch_size=2, num_workers=2)
    assert parallel == serial  # every figure comes from the confusion matrix, so equal counts give equal dicts
    assert parallel["num_pixels"] == sum(int((np.array(ex["mask"]) != 255).sum()) for ex in dataset)  # all scored


def test_evaluation_leaves_the_global_rng_alone(tiny_model):
    # apc-train validates in the middle of a run: the run's dropout and PCL draws must not depend on --eval_steps.
    state = torch.get_rng_state()
    evaluate(tiny_model, [example(21, 27, 3), example(21, 27, 4)], num_workers=1)
    assert torch.equal(torch.get_rng_state(), state)
