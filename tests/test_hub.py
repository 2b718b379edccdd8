"""apc-push against a fake Hub client: files, repo id, message, visibility, model card; the token stays secret."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from apc_seg import hub
from apc_seg.model_card import APC_BIBTEX, make_model_card

TOKEN = "hf_FAKEtokenDoNotLeak1234567890"
CLASSES = ["background", "disc", "square", "triangle"]


class FakeHfApi:
    """Records calls like huggingface_hub.HfApi would receive them; reads file contents at commit time."""

    def __init__(self, user="alice"):
        self.user = user
        self.calls = []
        self.uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        full_id = repo_id if "/" in repo_id else f"{self.user}/{repo_id}"
        return SimpleNamespace(repo_id=full_id)

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, kwargs))
        for op in operations:
            src = op.path_or_fileobj
            self.uploaded[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, str) else bytes(src)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123")


class FailingHfApi(FakeHfApi):
    def create_repo(self, repo_id, **kwargs):
        raise RuntimeError(f"401 Unauthorized for token {kwargs.get('token')}")


def make_model_dir(path: Path, readme=False, metrics=True, processor=True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "apc",
        "num_labels": len(CLASSES),
        "id2label": {str(i): name for i, name in enumerate(CLASSES)},
        "label2id": {name: i for i, name in enumerate(CLASSES)},
    }
    (path / "config.json").write_text(json.dumps(config))
    save_file({"classifier.weight": torch.zeros(len(CLASSES), 8)}, str(path / "model.safetensors"))
    if processor:
        (path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "APCImageProcessor"}))
    if metrics:
        (path / "metrics.json").write_text(
            json.dumps(
                {
                    "val_miou": 0.6512,
                    "train_pseudo_miou": 0.7034,
                    "train_steps": 300,
                    "train_seconds": 95.5,
                    "per_class_iou": [0.9, 0.5, None, 0.6],
                    "dataset": "synthetic",
                    "recipe": {"learning_rate": 6e-5, "max_train_steps": 300},
                    "hardware": "2 CPU cores",
                }
            )
        )
    if readme:
        (path / "README.md").write_text("# my own card\n")
    # Things that must stay local.
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "step_100.safetensors").write_bytes(b"x")
    (path / "optimizer.bin").write_bytes(b"pickle")
    return path


def assert_no_token_anywhere(capsys, model_dir: Path):
    out, err = capsys.readouterr()
    assert TOKEN not in out and TOKEN not in err
    for f in model_dir.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f"token written to {f}"


def test_push_uploads_the_model_files_in_one_commit(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "apc-synthetic")
    before = sorted(p.name for p in model_dir.iterdir())
    api = FakeHfApi()
    hub.push_to_hub(model_dir, "alice/apc-synthetic", private=True, commit_message="first model", token=TOKEN, api=api)

    (name1, repo1, kw1), (name2, repo2, kw2) = api.calls
    assert (name1, repo1) == ("create_repo", "alice/apc-synthetic")
    assert kw1["private"] is True and kw1["exist_ok"] is True and kw1["token"] == TOKEN
    assert (name2, repo2) == ("create_commit", "alice/apc-synthetic")
    assert kw2["commit_message"] == "first model" and kw2["token"] == TOKEN
    assert set(api.uploaded) == {
        "model.safetensors", "config.json", "preprocessor_config.json", "metrics.json", "README.md",
    }
    assert api.uploaded["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()

    card = api.uploaded["README.md"].decode()
    assert card.startswith("---\n") and "library_name: apc-seg" in card and "pipeline_tag: image-segmentation" in card
    assert "weakly-supervised-semantic-segmentation" in card and "license: apache-2.0" in card
    assert "value: 65.12" in card  # val_miou in the model-index, in percent
    assert "70.34 %" in card and "2 CPU cores" in card and "`learning_rate`" in card
    assert 'from_pretrained("alice/apc-synthetic")' in card and "triangle" in card
    assert "2407.10649" in card and "Adaptive Patch Contrast" in card
    # The card is generated in memory: the user's folder is unchanged.
    assert sorted(p.name for p in model_dir.iterdir()) == before
    assert_no_token_anywhere(capsys, model_dir)


def test_existing_readme_is_uploaded_as_is_and_defaults(tmp_path):
    model_dir = make_model_dir(tmp_path / "m", readme=True, metrics=False)
    api = FakeHfApi()
    hub.push_to_hub(model_dir, "apc-synthetic", api=api)
    create_repo, create_commit = api.calls
    assert create_repo[2]["private"] is False and "token" not in create_repo[2]
    assert create_commit[1] == "alice/apc-synthetic"  # the full id returned by create_repo
    assert create_commit[2]["commit_message"] == "Upload APC model"
    assert api.uploaded["README.md"] == b"# my own card\n"
    assert "metrics.json" not in api.uploaded


def test_missing_processor_warns_but_uploads(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "m", processor=False)
    api = FakeHfApi()
    hub.push_to_hub(model_dir, "alice/m", api=api)
    assert "preprocessor_config.json" not in api.uploaded and "model.safetensors" in api.uploaded
    assert "preprocessor_config.json" in capsys.readouterr().err


def test_cli_pushes_and_keeps_token_secret(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "m")
    api = FakeHfApi()
    argv = ["--model_dir", str(model_dir), "--repo_id", "alice/m", "--private", "--commit_message", "v1"]
    assert hub.main(argv + ["--token", TOKEN], api=api) == 0
    assert api.calls[0][2]["private"] is True and api.calls[1][2]["commit_message"] == "v1"
    out, err = capsys.readouterr()
    assert "https://huggingface.co/alice/m/commit/abc123" in out
    assert TOKEN not in out + err


def test_cli_upload_failure_masks_the_token(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "m")
    with pytest.raises(SystemExit) as exc:
        hub.main(["--model_dir", str(model_dir), "--repo_id", "alice/m", "--token", TOKEN], api=FailingHfApi())
    message = str(exc.value.code)
    assert "401 Unauthorized" in message and TOKEN not in message and "***" in message
    assert_no_token_anywhere(capsys, model_dir)


def _bad_dir(tmp_path, kind):
    d = tmp_path / kind
    if kind == "missing":
        return d
    d.mkdir(parents=True)
    if kind == "no_config":
        save_file({"w": torch.zeros(1)}, str(d / "model.safetensors"))
    elif kind in ("no_weights", "pickle_only"):
        (d / "config.json").write_text("{}")
        if kind == "pickle_only":
            (d / "pytorch_model.bin").write_bytes(b"pickle")
    return d


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", "not a directory"),
        ("no_config", "config.json"),
        ("no_weights", "model.safetensors"),
        ("pickle_only", "pytorch_model.bin"),
    ],
)
def test_cli_bad_model_dir_exits_naming_the_flag(tmp_path, capsys, kind, match):
    api = FakeHfApi()
    with pytest.raises(SystemExit) as exc:
        hub.main(["--model_dir", str(_bad_dir(tmp_path, kind)), "--repo_id", "alice/m"], api=api)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--model_dir" in err and match in err
    assert api.calls == []
    with pytest.raises(ValueError, match=match):
        hub.push_to_hub(_bad_dir(tmp_path / "api", kind), "alice/m", api=api)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--repo_id", "alice/m"], "--model_dir"),
        (["--model_dir", "{dir}"], "--repo_id"),
        (["--model_dir", "{dir}", "--repo_id", "alice/bad name"], "--repo_id"),
        (["--model_dir", "{dir}", "--repo_id", "a/b/c"], "--repo_id"),
        (["--model_dir", "{dir}", "--repo_id", "alice/m", "--privat"], "--privat"),
    ],
)
def test_cli_bad_flags_exit_naming_the_flag(tmp_path, capsys, argv, flag):
    model_dir = make_model_dir(tmp_path / "m")
    api = FakeHfApi()
    with pytest.raises(SystemExit) as exc:
        hub.main([a.replace("{dir}", str(model_dir)) for a in argv], api=api)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and flag in err
    assert api.calls == []


def test_model_card_without_metrics_has_no_model_index():
    card = make_model_card("apc-voc", "voc", CLASSES, recipe=None, metrics=None, hardware=None, base_model=None)
    assert "model-index" not in card and "Not evaluated." in card and "PASCAL VOC 2012" in card
    assert "base_model" not in card and APC_BIBTEX in card
    card = make_model_card("u/apc-voc", "voc", CLASSES, {"seed": 0}, {"val_miou": 0.723}, "8x H100", "google/vit-b")
    assert "value: 72.3" in card and "base_model: google/vit-b" in card and "8x H100" in card


def test_generated_card_names_the_full_repo_id_and_bad_metrics_fail_before_the_hub(tmp_path):
    model_dir = make_model_dir(tmp_path / "m")
    api = FakeHfApi(user="bob")
    hub.push_to_hub(model_dir, "apc-synthetic", api=api)
    assert 'from_pretrained("bob/apc-synthetic")' in api.uploaded["README.md"].decode()

    (model_dir / "metrics.json").write_text("{not json")
    api = FakeHfApi()
    with pytest.raises(ValueError, match="metrics.json"):
        hub.push_to_hub(model_dir, "alice/m", api=api)
    assert api.calls == []
