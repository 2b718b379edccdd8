"""apc-pretrain: the MAE backbone folder loads as a plain ViT with every weight, and resume is exact."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTMAEForPreTraining, ViTModel

from apc_seg import APCConfig, APCForSemanticSegmentation
from apc_seg.pretrain import main as pretrain_main

TINY = "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,image_size=32"


def _run(out, *extra, steps=4):
    argv = ["--dataset", "synthetic", "--num_train_images", "16", "--backbone_overrides", TINY,
            "--per_device_train_batch_size", "4", "--max_train_steps", str(steps), "--warmup_steps", "1",
            "--checkpointing_steps", "2", "--logging_steps", "2", "--report_to", "none", "--quiet",
            "--decoder_hidden_size", "16", "--decoder_num_hidden_layers", "1", "--output_dir", str(out), *extra]
    assert pretrain_main(argv) == 0


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("mae")
    _run(out)
    return out


def test_output_is_a_complete_vit(pretrained):
    vit, info = ViTModel.from_pretrained(pretrained, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # The saved encoder is the MAE's encoder, weight for weight (compared as loaded: transformers may store
    # checkpoints under legacy parameter names).
    mae = ViTMAEForPreTraining.from_pretrained(pretrained / "mae").state_dict()
    for name, value in vit.state_dict().items():
        torch.testing.assert_close(value, mae[f"vit.{name}"], rtol=0, atol=0)

    config = APCConfig(id2label={0: "background", 1: "a", 2: "b", 3: "c"}, decoder_hidden_size=16,
                       decoder_dilation=2)
    model = APCForSemanticSegmentation.from_pretrained_backbone(str(pretrained), config=config)
    assert not model.backbone_loading_info["missing_keys"]
    torch.testing.assert_close(model.vit.embeddings.patch_embeddings.projection.weight,
                               vit.embeddings.patch_embeddings.projection.weight)
    out = model(pixel_values=torch.randn(1, 3, 32, 32))
    assert out.logits.shape == (1, 4, 4, 4)


def test_voc_folder_and_continue_from_vit(pretrained, tmp_path):
    from apc_seg.data import make_synthetic, write_voc

    write_voc(make_synthetic(num_train=8, num_val=0, num_test=0, image_size=32, seed=1), tmp_path / "voc")
    out = tmp_path / "adapted"
    argv = ["--dataset", "voc", "--data_dir", str(tmp_path / "voc"), "--train_split", "train",
            "--model_name_or_path", str(pretrained), "--per_device_train_batch_size", "4", "--max_train_steps", "2",
            "--warmup_steps", "1", "--report_to", "none", "--quiet", "--decoder_hidden_size", "16",
            "--decoder_num_hidden_layers", "1", "--output_dir", str(out)]
    assert pretrain_main(argv) == 0
    before = ViTModel.from_pretrained(pretrained, add_pooling_layer=False)
    after, info = ViTModel.from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"]
    # It started from the given weights (same shapes) and trained them.
    w0 = before.encoder.layer[0].mlp.fc1.weight if hasattr(before, "encoder") else before.layers[0].mlp.fc1.weight
    w1 = after.encoder.layer[0].mlp.fc1.weight if hasattr(after, "encoder") else after.layers[0].mlp.fc1.weight
    assert w0.shape == w1.shape and not torch.equal(w0, w1)


def test_resume_is_exact(pretrained, tmp_path):
    # `pretrained` ran 4 steps straight and kept checkpoints/step_2; a new run resumed from that checkpoint must end
    # with bit-identical weights.
    resumed = tmp_path / "resumed"
    shutil.copytree(pretrained / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    _run(resumed, "--resume_from_checkpoint", "latest")
    straight = load_file(pretrained / "mae" / "model.safetensors")
    again = load_file(resumed / "mae" / "model.safetensors")
    assert straight.keys() == again.keys()
    for name in straight:
        torch.testing.assert_close(again[name], straight[name], rtol=0, atol=0)


def test_resume_with_other_settings_fails(pretrained, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(pretrained / "checkpoints" / "step_2", other / "checkpoints" / "step_2")
    with pytest.raises(SystemExit, match="mask_ratio"):
        _run(other, "--resume_from_checkpoint", "latest", "--mask_ratio", "0.5")


def test_apc_train_pretrains_first(tmp_path):
    from apc_seg.train import main as train_main

    out = tmp_path / "apc"
    argv = ["--recipe", "synthetic", "--num_train_images", "16", "--num_val_images", "4", "--crop_size", "32",
            "--per_device_train_batch_size", "4", "--backbone_overrides", TINY,
            "--config_overrides", "decoder_hidden_size=16,pcl_max_patches=8,par_dilations=1;2",
            "--max_train_steps", "2", "--eval_steps", "2", "--seg_warmup_steps", "1", "--pseudo_eval_max_images", "4",
            "--report_to", "none", "--output_dir", str(out), "--mae_pretrain_steps", "2"]
    assert train_main(argv) == 0
    backbone = ViTModel.from_pretrained(out / "mae_backbone", add_pooling_layer=False)
    model = APCForSemanticSegmentation.from_pretrained(out)
    assert model.config.backbone_config.hidden_size == backbone.config.hidden_size == 32


def test_a_nan_loss_stops_pretraining_before_anything_trained_on_it_is_saved(tmp_path, monkeypatch, capsys):
    from test_train import poison_training_step

    poison_training_step(monkeypatch, ViTMAEForPreTraining, step=1)
    with pytest.raises(SystemExit) as error:
        _run(tmp_path / "mae")
    assert error.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("apc-pretrain: error: the loss was NaN or infinite 2 time(s) between "
                              "steps 1 and 2")  # step 1 and step 2 (on the spoilt weights)
    assert "no checkpoint was saved before them" in message
    assert not (tmp_path / "mae" / "config.json").exists() and not (tmp_path / "mae" / "checkpoints").exists()


def test_sigterm_saves_the_step_and_the_resumed_pretraining_is_bit_identical(pretrained, tmp_path, monkeypatch,
                                                                              capsys):
    # As apc-train: a SIGTERM during forward 3 (between the step-2 checkpoint and the end) saves step 3 and exits 143.
    import os
    import signal

    original, calls = ViTMAEForPreTraining.forward, {"count": 0}

    def forward(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(ViTMAEForPreTraining, "forward", forward)
        with pytest.raises(SystemExit) as error:
            _run(stopped)
    assert error.value.code == 128 + signal.SIGTERM
    assert "apc-pretrain: stopped by SIGTERM after step 3 of 4" in capsys.readouterr().err
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["step_2", "step_3"]
    assert not (stopped / "config.json").exists()
    _run(stopped, "--resume_from_checkpoint", "latest")
    straight = load_file(pretrained / "mae" / "model.safetensors")
    again = load_file(stopped / "mae" / "model.safetensors")
    for name in straight:
        torch.testing.assert_close(again[name], straight[name], rtol=0, atol=0)
