"""apc-train end to end on a tiny model: the output folder, exact resume after a kill, checkpoints, two CPU
processes, the Hub push path and one-line CLI errors."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from apc_seg import train

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A 1-layer hidden-32 ViT on 32 px crops, 32 train / 8 val images, 4 updates per epoch; PCL keeps 8 of 16 patches,
# so its random subset is exercised, as are the dropouts of the mixer and the classifier.
TINY = [
    "--recipe", "synthetic", "--num_train_images", "32", "--num_val_images", "8", "--crop_size", "32",
    "--per_device_train_batch_size", "8",
    "--backbone_overrides", "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,image_size=32",
    "--config_overrides", "decoder_hidden_size=16,pcl_max_patches=8,par_dilations=1;2",
    "--seg_warmup_steps", "3", "--pseudo_eval_max_images", "8", "--logging_steps", "1",
]


def offline_env(**extra) -> dict:
    # One thread, as in this process (below): bit-identity between processes needs the same reduction order.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"


# ------------------------------------------------------------------------------------------------ quick start


def test_quick_start_leaves_a_loadable_model_with_metrics_events_and_card(tmp_path, capsys):
    import transformers

    from apc_seg import APCForSemanticSegmentation

    out = tmp_path / "apc-synthetic"
    assert train.main(TINY + ["--output_dir", str(out), "--max_train_steps", "4", "--eval_steps", "2",
                              "--checkpointing_steps", "2"]) == 0
    printed = capsys.readouterr()
    assert "apc-train" in printed.err and "4/4" in printed.err  # the tqdm bar
    assert "step 2: val mIoU" in printed.err + printed.out and "model saved to" in printed.out

    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val_miou", "train_pseudo_miou"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["train_steps"] == 4 and metrics["train_seconds"] > 0
    assert [h["step"] for h in metrics["val_history"]] == [2, 4]
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard event files"
    card = (out / "README.md").read_text()
    assert "APC" in card and "synthetic" in card and f"{100 * metrics['val_miou']:.2f}" in card
    assert (out / "best" / "model.safetensors").is_file()

    model = APCForSemanticSegmentation.from_pretrained(out)
    assert model.config.backbone_stem == "conv"  # the synthetic recipe's from-scratch backbone
    auto = transformers.AutoModelForSemanticSegmentation.from_pretrained(out)
    assert type(auto) is APCForSemanticSegmentation and model.config.num_labels == 4
    segmenter = transformers.pipeline("image-segmentation", model=str(out))
    masks = segmenter(Image.new("RGB", (45, 37), (120, 60, 30)))
    assert masks and all(m["mask"].size == (45, 37) for m in masks)
    assert {m["label"] for m in masks} <= {"background", "stripes", "dots", "checker"}


# ------------------------------------------------------------------------------------------------ resume

# Run in a fresh interpreter: apc-train, with the batches' image ids logged, and (for "kill") os._exit right after
# the first checkpoint is written, which ends the process as abruptly as SIGKILL (no cleanup, no final save).
_DRIVER = textwrap.dedent("""
    import json, os, sys
    import apc_seg.data.transforms as transforms
    import apc_seg.train as train

    log, kill, argv = sys.argv[1], sys.argv[2] == "kill", sys.argv[3:]
    collate = transforms.collate_fn
    def logged_collate(examples, **kwargs):
        with open(log, "a") as f:
            f.write(json.dumps([ex["image_id"] for ex in examples]) + "\\n")
        return collate(examples, **kwargs)
    transforms.collate_fn = logged_collate
    if kill:
        save = train.save_checkpoint
        def save_then_die(*args, **kwargs):
            save(*args, **kwargs)
            os._exit(137)
        train.save_checkpoint = save_then_die
    sys.exit(train.main(argv))
""")


def log_batches(monkeypatch, log: Path) -> None:
    """The same image-id log as _DRIVER, for runs in this process."""
    import apc_seg.data.transforms as transforms

    collate = transforms.collate_fn

    def logged_collate(examples, **kwargs):
        with open(log, "a") as f:
            f.write(json.dumps([ex["image_id"] for ex in examples]) + "\n")
        return collate(examples, **kwargs)

    monkeypatch.setattr(transforms, "collate_fn", logged_collate)


def read_batches(log: Path) -> list[list[str]]:
    # The loader collates one batch ahead of the one in use, so a log may end with a batch that never trained.
    return [json.loads(line) for line in log.read_text().splitlines()]


def kill_and_resume(tmp_path, monkeypatch, capsys, run: list[str], kill_at: int) -> tuple[Path, Path]:
    """A straight run and the same run killed after its checkpoint at `kill_at`, then resumed with `latest`:
    same weights, bit for bit. Returns both output folders (the batch logs are next to them)."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run = TINY + run + ["--report_to", "none", "--checkpointing_steps", str(kill_at)]

    log_batches(monkeypatch, tmp_path / "straight.log")
    assert train.main(run + ["--output_dir", str(straight)]) == 0

    killed = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(tmp_path / "killed.log"), "kill", *run, "--output_dir", str(broken)],
        env=offline_env(), capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert [p.name for p in train.list_checkpoints(broken)] == [f"step_{kill_at}"]
    assert not (broken / "model.safetensors").exists()  # it really died before the end

    log_batches(monkeypatch, tmp_path / "resumed.log")
    capsys.readouterr()
    assert train.main(run + ["--output_dir", str(broken), "--resume_from_checkpoint", "latest"]) == 0
    assert f"at step {kill_at}" in capsys.readouterr().out  # lost nothing: it goes on from the last checkpoint

    assert_same_weights(straight, broken)
    straight_metrics = json.loads((straight / "metrics.json").read_text())
    resumed_metrics = json.loads((broken / "metrics.json").read_text())
    assert resumed_metrics["val_history"] == straight_metrics["val_history"]
    assert resumed_metrics["val_miou"] == straight_metrics["val_miou"]
    return straight, broken


def test_resume_after_kill_is_bit_identical_with_the_same_data_order(tmp_path, monkeypatch, capsys):
    # 10 steps of 4 per epoch; the kill comes after the checkpoint at step 6, in the middle of the second epoch,
    # so the resumed run must replay that epoch's order and skip its first 2 batches. Validation at steps 3 and 9
    # runs in between, as in real runs.
    run = ["--max_train_steps", "10", "--eval_steps", "3"]
    straight, broken = kill_and_resume(tmp_path, monkeypatch, capsys, run, kill_at=6)

    order = read_batches(tmp_path / "straight.log")
    assert read_batches(tmp_path / "killed.log")[:6] == order[:6]
    assert read_batches(tmp_path / "resumed.log")[:4] == order[6:10]
    assert order[:4] != order[4:8], "the epochs should be shuffled differently"

    # Another config is refused with one line naming the flag; a longer run is allowed, with a warning.
    with pytest.raises(SystemExit) as error:
        train.main(TINY + run + ["--output_dir", str(broken), "--resume_from_checkpoint", "latest",
                                 "--config_overrides", "decoder_hidden_size=24,pcl_max_patches=8,par_dilations=1;2"])
    message = str(error.value)
    assert "--config_overrides" in message and "decoder_hidden_size" in message and "\n" not in message
    with pytest.raises(SystemExit) as error:
        train.main(TINY + run + ["--output_dir", str(broken), "--resume_from_checkpoint", "latest",
                                 "--learning_rate", "0.01"])
    assert "--learning_rate" in str(error.value)
    with pytest.raises(SystemExit) as error:
        train.main(TINY + run + ["--output_dir", str(broken), "--resume_from_checkpoint", "latest",
                                 "--backbone_stem", "patch"])
    assert "backbone_stem: checkpoint 'conv', now 'patch'" in str(error.value)
    assert "resume with the checkpoint's --backbone_stem" in str(error.value)
    capsys.readouterr()
    assert train.main(TINY + ["--max_train_steps", "12", "--eval_steps", "100", "--report_to", "none",
                              "--output_dir", str(broken), "--resume_from_checkpoint", "latest"]) == 0
    assert "warning: resuming with max_train_steps: checkpoint 10, now 12" in capsys.readouterr().out
    assert json.loads((broken / "metrics.json").read_text())["train_steps"] == 12


def test_checkpoints_from_before_a_config_field_existed_resume_at_its_default(tmp_path):
    # apc_run.json of a checkpoint written before `backbone_stem` existed: it had ViT's patch embedding.
    fingerprint = {"config": {"pooling": "adaptive_k", "backbone_stem": "patch"}, "args": {"seed": 0}}
    old = {"config": {"pooling": "adaptive_k"}, "args": {"seed": 0}}
    (tmp_path / "apc_run.json").write_text(json.dumps({"fingerprint": old}))
    assert train.check_resumable(tmp_path, fingerprint) == []
    with pytest.raises(SystemExit, match="backbone_stem: checkpoint None, now 'conv'.*--backbone_stem"):
        train.check_resumable(tmp_path, {**fingerprint, "config": {"pooling": "adaptive_k", "backbone_stem": "conv"}})


def test_resume_with_gradient_accumulation_is_bit_identical(tmp_path, monkeypatch, capsys):
    # 4 batches per epoch in updates of 3: each epoch ends with a 1-batch update (accelerate syncs at the end of
    # the loader), so there are 2 updates per epoch and the kill at step 3 falls after the first 3 batches of epoch 2.
    kill_and_resume(tmp_path, monkeypatch, capsys, ["--max_train_steps", "5", "--gradient_accumulation_steps", "3",
                                                    "--eval_steps", "2"], kill_at=3)


def test_resume_with_persistent_workers_is_bit_identical(tmp_path, monkeypatch, capsys):
    # Two persistent workers (the VOC recipe keeps 8 between epochs): 4 batches per epoch, so the 10 steps cross two
    # epoch boundaries in the straight run and one after the resume; each epoch must get its own crops in the
    # workers, as the single-process runs above do.
    straight, _ = kill_and_resume(tmp_path, monkeypatch, capsys,
                                  ["--max_train_steps", "10", "--eval_steps", "5", "--num_workers", "2"], kill_at=6)
    order = read_batches(tmp_path / "straight.log")
    assert order[:4] != order[4:8], "the epochs should be shuffled differently"


def poison_training_step(monkeypatch, model_class, step: int) -> None:
    """Make the loss of training forward number `step` NaN (its backward then spoils every weight)."""
    original, calls = model_class.forward, {"count": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["count"] += 1
            if calls["count"] == step:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model_class, "forward", forward)


def test_a_nan_loss_stops_the_run_before_anything_trained_on_it_is_saved(tmp_path, monkeypatch, capsys):
    from apc_seg import APCForSemanticSegmentation

    poison_training_step(monkeypatch, APCForSemanticSegmentation, step=3)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as error:  # looks at steps 2 (checkpoint) and 4 (log, checkpoint): stops at 4
        train.main(TINY + ["--max_train_steps", "8", "--logging_steps", "4", "--checkpointing_steps", "2",
                           "--eval_steps", "100", "--report_to", "none", "--output_dir", str(out)])
    assert error.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    # Step 3's update spoilt the weights, so step 4's loss is NaN too.
    assert message.startswith("apc-train: error: the loss was NaN or infinite 2 time(s) between steps 3 and 4")
    assert str(out / "checkpoints" / "step_2") in message and "--learning_rate" in message
    assert [p.name for p in train.list_checkpoints(out)] == ["step_2"]  # step 4's weights were never saved
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()


@pytest.mark.parametrize("precision, stops", [("bf16", True), ("no", True), ("fp16", False)])
def test_nan_guard_defers_to_fp16s_gradient_scaler(precision, stops):
    # fp16's scaler skips an overflowing step and goes on; elsewhere the update already spoilt the weights.
    from types import SimpleNamespace

    accelerator = SimpleNamespace(mixed_precision=precision, device=torch.device("cpu"),
                                  reduce=lambda tensor, reduction: tensor)
    guard = train.NonFiniteLossGuard(accelerator, "apc-train", 0, lambda: [])
    guard.update(torch.tensor(1.0))
    assert not guard.check(10)
    guard.update(torch.tensor(float("inf")))
    assert guard.check(20) == stops
    assert stops == (guard.message is not None and "between steps 11 and 20" in guard.message)


@pytest.mark.parametrize("signum, workers", [(signal.SIGINT, 0), (signal.SIGTERM, 0), (signal.SIGTERM, 2)])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_is_bit_identical(signum, workers, tmp_path, monkeypatch,
                                                                          capsys):
    # Ctrl-C or a scheduler's SIGTERM during training forward 4: step 4 finishes, is saved, the run exits 128 + signal,
    # and resuming it ends with the straight run's weights. Afterwards the usual handlers are back. With workers the
    # signal reaches them too, as it does from a terminal or a cluster (the whole process group).
    import psutil

    from apc_seg import APCForSemanticSegmentation

    run = TINY + ["--max_train_steps", "7", "--eval_steps", "100", "--report_to", "none", "--num_workers", str(workers)]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train.main(run + ["--output_dir", str(straight)]) == 0
    original, calls = APCForSemanticSegmentation.forward, {"count": 0}

    def forward(self, *args, **kwargs):
        if self.training:
            calls["count"] += 1
            if calls["count"] == 4:
                for child in psutil.Process().children():
                    if child.name() == "pt_data_worker":
                        os.kill(child.pid, signum)
                os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(APCForSemanticSegmentation, "forward", forward)
        with pytest.raises(SystemExit) as error:
            train.main(run + ["--output_dir", str(stopped)])
    assert error.value.code == 128 + signum
    # Its workers outlive the SIGTERM for a while (so a run's loop gets its batches until the stop); a process would
    # now exit and take them along, this one goes on to the next test.
    for child in psutil.Process().children():
        if child.name() == "pt_data_worker":
            child.kill()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert f"stopped by {signal.Signals(signum).name} after step 4 of 7" in capsys.readouterr().err
    assert [p.name for p in train.list_checkpoints(stopped)] == ["step_4"]
    assert not (stopped / "model.safetensors").exists()
    assert train.main(run + ["--output_dir", str(stopped), "--resume_from_checkpoint", "latest"]) == 0
    assert_same_weights(straight, stopped)


def test_checkpoints_total_limit_keeps_the_newest_complete_ones(tmp_path):
    out = tmp_path / "run"
    assert train.main(TINY + ["--output_dir", str(out), "--max_train_steps", "5", "--checkpointing_steps", "1",
                              "--checkpoints_total_limit", "2", "--eval_steps", "100", "--report_to", "none"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_4"]
    for step in ("step_3", "step_4"):
        saved = json.loads((out / "checkpoints" / step / "apc_run.json").read_text())
        assert saved["step"] == int(step.split("_")[1])
    # A save that was interrupted (no apc_run.json, written last) is never resumed from.
    (out / "checkpoints" / "step_9").mkdir()
    assert train.list_checkpoints(out)[-1].name == "step_4"


def test_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    # Going back to step_2 replaces the run after it: its step_3 and step_4 must not be what `latest` or the total
    # limit see afterwards, and they are moved, not deleted.
    out = tmp_path / "run"
    run = TINY + ["--output_dir", str(out), "--max_train_steps", "5", "--checkpointing_steps", "1",
                  "--checkpoints_total_limit", "3", "--eval_steps", "100", "--report_to", "none"]
    assert train.main(run) == 0
    assert [p.name for p in train.list_checkpoints(out)] == ["step_2", "step_3", "step_4"]
    old_step_4 = (out / "checkpoints" / "step_4" / "apc_run.json").stat().st_mtime_ns
    capsys.readouterr()
    assert train.main(run + ["--max_train_steps", "3",  # a repeated flag takes its last value
                             "--resume_from_checkpoint", str(out / "checkpoints" / "step_2")]) == 0
    printed = capsys.readouterr().out
    assert "moved 2 checkpoint(s) made after step 2 (step_3, step_4)" in printed
    superseded = out / "checkpoints" / "superseded"
    assert sorted(p.name for p in superseded.iterdir()) == ["step_3", "step_4"]
    assert (superseded / "step_4" / "apc_run.json").stat().st_mtime_ns == old_step_4
    assert [p.name for p in train.list_checkpoints(out)] == ["step_2"]  # the 3-step run saves none at its end


# ------------------------------------------------------------------------------------------------ two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes_trains_and_gathers_the_single_process_miou(tmp_path):
    from apc_seg import APCForSemanticSegmentation
    from apc_seg.data import make_synthetic
    from apc_seg.evaluation import evaluate

    out = tmp_path / "ddp"
    # On a machine without GPUs, `--multi_gpu` is accelerate's torchrun launcher; apc-train then runs gloo on CPUs.
    launched = subprocess.run(
        [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "-m", "apc_seg.train", *TINY, "--per_device_train_batch_size", "4", "--output_dir", str(out),
         "--max_train_steps", "4", "--eval_steps", "2", "--checkpointing_steps", "2", "--report_to", "none"],
        env=offline_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "4 x 2 process(es)" in launched.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 4 and metrics["hardware"].startswith("2 process(es)")
    assert (out / "checkpoints" / "step_2" / "random_states_1.pkl").is_file()  # each process saved its RNGs

    # The validation mIoU gathered over 2 processes (4 images each) is the one process sees on all 8.
    model = APCForSemanticSegmentation.from_pretrained(out)
    val = make_synthetic(num_train=0, num_val=8, num_test=0, image_size=32, seed=0)["val"]
    assert metrics["val_miou"] == evaluate(model, val)["miou"]


@pytest.mark.parametrize("everyone", [False, True])
def test_a_sigterm_to_two_processes_and_their_workers_ends_in_one_checkpoint(everyone, tmp_path):
    # `kill -TERM` to the launcher's group: accelerate launch (torchrun) relays it to each training process's group,
    # DataLoader workers included. `everyone`: as SLURM, which signals every process of the job, so the training
    # processes and workers get it twice. They agree on a step at the next logging step (up to 40 steps on), save it
    # and stop; the workers keep delivering batches until then.
    import time

    import psutil

    out, log = tmp_path / "ddp", tmp_path / "stderr.txt"
    launched = subprocess.Popen(
        [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "-m", "apc_seg.train", *TINY, "--per_device_train_batch_size", "4", "--output_dir", str(out),
         "--max_train_steps", "100000", "--eval_steps", "100000", "--checkpointing_steps", "3",
         "--logging_steps", "40", "--num_workers", "2", "--report_to", "none"],
        # stderr to a file: a pipe nobody reads fills up with the progress bar and blocks the run.
        env=offline_env(), stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=tmp_path,
        start_new_session=True,  # its own process group, as a job's
    )
    try:
        deadline = time.monotonic() + 240
        while not [p for p in train.list_checkpoints(out) if p.name != "step_3"]:  # training is under way
            assert launched.poll() is None and time.monotonic() < deadline, "the run saved no checkpoint"
            time.sleep(0.1)
        processes = psutil.Process(launched.pid).children(recursive=True)
        os.killpg(launched.pid, signal.SIGTERM)
        if everyone:
            for process in processes:
                process.send_signal(signal.SIGTERM)
        launched.wait(timeout=120)
    finally:
        # torchrun starts each training process in a session of its own, so the launcher's group is not all of them.
        for process in psutil.Process(launched.pid).children(recursive=True) if launched.poll() is None else []:
            process.kill()
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)
    stderr = log.read_text()
    stopped = re.findall(r"apc-train: stopped by SIGTERM after step (\d+) of 100000; saved (\S+)\.", stderr)
    assert len(stopped) == 1, stderr[-3000:]  # printed once, by the main process
    step = int(stopped[0][0])
    saved = json.loads((out / "checkpoints" / f"step_{step}" / "apc_run.json").read_text())
    assert saved["step"] == step and step >= 6
    assert (out / "checkpoints" / f"step_{step}" / "random_states_1.pkl").is_file()
    assert "]: Traceback" not in stderr  # no training process failed on the way ("[rank1]: Traceback ...")


# ------------------------------------------------------------------------------------------------ push


class FakeHfApi:
    """Records what huggingface_hub.HfApi would be asked; reads the files at commit time."""

    instances = []

    def __init__(self, token=None):
        self.calls, self.uploaded = [], {}
        FakeHfApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, commit_message, **kwargs):
        self.calls.append(("create_commit", repo_id, commit_message))
        for op in operations:
            self.uploaded[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()


def test_push_to_hub_uploads_the_trained_folder(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.instances.clear()
    out = tmp_path / "apc-synthetic"
    assert train.main(TINY + ["--output_dir", str(out), "--max_train_steps", "2", "--eval_steps", "100",
                              "--checkpointing_steps", "1", "--report_to", "none", "--push_to_hub",
                              "--hub_model_id", "alice/apc-tiny"]) == 0
    (api,) = FakeHfApi.instances
    assert [c[:2] for c in api.calls] == [("create_repo", "alice/apc-tiny"), ("create_commit", "alice/apc-tiny")]
    assert api.calls[1][2] == "apc-train --recipe synthetic: 2 steps"
    assert set(api.uploaded) == {"model.safetensors", "config.json", "preprocessor_config.json", "metrics.json",
                                 "README.md"}  # no checkpoints, optimiser states or TensorBoard logs
    assert api.uploaded["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert b"alice/apc-tiny" in api.uploaded["README.md"]
    assert "Pushed to https://huggingface.co/alice/apc-tiny" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ bad input


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--recipe", "imagenet"], "--recipe"),
        (["--recipe", "voc"], "--data_dir"),
        (["--recipe", "voc", "--data_dir", "/no/such/VOCdevkit"], "--data_dir"),
        (["--config_overrides", "akp_ratio=2"], "--config_overrides"),
        (["--config_overrides", "akp_ratio=high"], "--config_overrides"),
        (["--config_overrides", "no_such_field=1"], "--config_overrides"),
        (["--backbone_overrides", "hidden_size=30"], "--backbone_overrides"),
        (["--backbone_stem", "conv", "--mae_pretrain_steps", "5"], "--backbone_stem"),
        (["--backbone_stem", "resnet"], "--backbone_stem"),
        (["--config_overrides", "backbone_stem=conv"], "--config_overrides"),
        (["--max_train_steps", "0"], "--max_train_steps"),
        (["--preprocessing_num_workers", "0"], "--preprocessing_num_workers"),
        (["--resume_from_checkpoint", "/no/such/checkpoint"], "--resume_from_checkpoint"),
    ],
)
def test_bad_flags_exit_with_one_line_naming_the_flag(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        train.main(argv + ["--output_dir", str(tmp_path / "out")])
    assert error.value.code != 0
    assert flag in _error_line(capsys)


@pytest.mark.parametrize("damage, message", [
    ("missing_list", "ImageSets/Segmentation/val.txt"),
    ("truncated_image", "2007_000001"),
])
def test_data_errors_end_apc_train_with_the_loaders_message_not_a_traceback(damage, message, tmp_path):
    from test_data_voc import make_voc

    voc = make_voc(tmp_path / "data")
    if damage == "missing_list":
        (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    else:
        image = voc / "JPEGImages" / "2007_000001.jpg"
        image.write_bytes(image.read_bytes()[:300])
    with pytest.raises(SystemExit) as error:
        train.main(["--recipe", "voc", "--data_dir", str(voc), "--model_name_or_path", "none",
                    "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    assert str(error.value.code).startswith("apc-train: error: ") and message in str(error.value.code)


def test_output_dir_that_cannot_be_created_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as error:
        train.main(TINY + ["--output_dir", str(blocker / "out")])
    assert error.value.code != 0 and "--output_dir" in _error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; the path-below-a-file test covers root")
def test_read_only_output_dir_is_a_one_line_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SystemExit) as error:
        train.main(TINY + ["--output_dir", str(locked / "out")])
    assert error.value.code != 0 and "--output_dir" in _error_line(capsys)


def test_crop_size_not_a_patch_multiple_names_the_flag(tmp_path):
    with pytest.raises(SystemExit) as error:
        train.main(TINY + ["--crop_size", "30", "--output_dir", str(tmp_path / "out")])
    assert "--crop_size 30" in str(error.value) and "\n" not in str(error.value)


def test_mixed_precision_fits_the_machine(tmp_path, monkeypatch, capsys):
    # The VOC recipe's bf16: fp32 on a CPU; fp16 on a GPU without bf16 (V100, T4), with a notice. bf16 asked for by
    # the flag there is an error naming the flag, not a failure inside accelerate.
    voc = ["--recipe", "voc", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.parse_args(voc).mixed_precision == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla T4")
    assert train.parse_args(voc).mixed_precision == "fp16"
    assert "bf16 is not supported by the Tesla T4: training in fp16" in capsys.readouterr().err
    assert train.parse_args(voc + ["--mixed_precision", "no"]).mixed_precision == "no"
    with pytest.raises(SystemExit) as error:
        train.parse_args(voc + ["--mixed_precision", "bf16"])
    assert error.value.code == 2
    assert "--mixed_precision bf16: the Tesla T4 has no bf16; use --mixed_precision fp16" in _error_line(capsys)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert train.parse_args(voc).mixed_precision == "bf16"


def test_console_script_reports_an_unknown_recipe_in_one_line(tmp_path):
    result = subprocess.run([str(BIN / "apc-train"), "--recipe", "imagenet", "--output_dir", str(tmp_path)],
                            env=offline_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "--recipe" in result.stderr


def test_help_documents_the_recipes_and_the_interface_flags():
    text = train.build_parser().format_help()
    for flag in ("--recipe", "--dataset", "--data_dir", "--train_split", "--val_split", "--output_dir",
                 "--model_name_or_path", "--config_overrides", "--max_train_steps", "--per_device_train_batch_size",
                 "--gradient_accumulation_steps", "--learning_rate", "--crop_size", "--seed", "--mixed_precision",
                 "--checkpointing_steps", "--checkpoints_total_limit", "--resume_from_checkpoint", "--eval_steps",
                 "--num_workers", "--report_to", "--push_to_hub", "--hub_model_id", "--skip_bad_images",
                 "--backbone_overrides", "--backbone_stem"):
        assert flag in text, flag


def _documented_commands():
    """Shell lines of docs/training.md's code blocks and of examples/*.sh, backslash continuations joined."""
    texts = [block.split("```")[0] for block in (ROOT / "docs" / "training.md").read_text().split("```bash")[1:]]
    texts += [path.read_text() for path in sorted((ROOT / "examples").glob("*.sh"))]
    for text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                yield line


def test_documented_commands_use_existing_flags():
    from apc_seg import evaluation, hub, infer, pretrain

    parsers = {"train": train.build_parser(), "eval": evaluation.build_parser(), "infer": infer.build_parser(),
               "push": hub.build_parser(), "pretrain": pretrain.build_parser()}
    tools = {"apc-train": "train", "apc_seg.train": "train", '"${TRAIN[@]}"': "train",
             "apc-eval": "eval", "apc_seg.evaluation": "eval", '"${EVAL[@]}"': "eval",
             "apc-infer": "infer", "apc-push": "push", "apc-pretrain": "pretrain"}
    checked = {name: 0 for name in parsers}
    for line in _documented_commands():
        tool = None  # flags before a tool belong to accelerate launch
        for token in line.split():
            tool = tools.get(token, tool)
            if tool and token.startswith("--"):
                flag = token.split("=")[0]
                assert flag in parsers[tool]._option_string_actions, f"{flag} is not an option of {tool}: {line}"
                checked[tool] += 1
    assert all(checked.values()), checked


def test_recipe_table_in_the_docs_states_the_recipes_values():
    """docs/training.md's recipe table against `RECIPES`: a row naming one recipe flag must start each recipe's cell
    with that recipe's value (the table went stale once when the synthetic recipe changed)."""
    lines = (ROOT / "docs" / "training.md").read_text().split("## Recipes")[1].split("\n## ")[0].splitlines()
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    recipes = [name.strip("`") for name in rows[0][1:]]
    assert recipes == ["voc", "coco", "synthetic"]
    checked = 0
    for cells in rows[2:]:
        flags = [flag for flag in re.findall(r"`--(\w+)`", cells[0]) if flag in train.RECIPES["voc"]]
        if len(flags) != 1:
            continue
        for name, cell in zip(recipes, cells[1:]):
            value, first = train.RECIPES[name][flags[0]], (cell.replace("`", " ").split() or [""])[0]
            if value is None or value == "":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                assert first == str(value), (flags[0], name, cell)
            else:
                assert float(first.replace(",", "")) == value, (flags[0], name, cell)
            checked += 1
    assert checked >= 30, checked
