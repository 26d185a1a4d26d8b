"""moco-train end to end on tiny shards on the CPU: learning, exact resume, signals, errors, outputs."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moco_dali.tools.demo.data import generated_dump
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from moco_dali.train import checkpoint
from tests.train.runs import REPO, THREADS, TINY, losses, metrics, moco_train, train_here


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    generated_dump(root / "raw-train", per_class=40, seed=0)
    generated_dump(root / "raw-val", per_class=10, seed=1)
    for split in ("train", "val"):  # shards of 50: ranks are dealt whole shards
        build(
            [str(root / f"raw-{split}")],
            root / split,
            BuildSettings(labels="folder", max_count=50),
            workers=0,
            progress=False,
        )
    return {"train": root / "train", "val": root / "val", "root": root}


# The learning check's run: 160 steps of the tiny run with T 0.1 and plain BN (split
# BN on sub-batches of 4 learns too slowly for a test).
LEARN = [*TINY, "--model.T", "0.1", "--model.shuffle", "none", "--run.max_steps", "160"]


def mean(values) -> float:
    return sum(values) / len(values)


def learned(records: list[dict], K: int = 64) -> list[str]:
    """What is wrong with a run's pretext curve; empty when it shows MoCo learning.

    The pretext task is the (K+1)-way lookup of each query's key, chance 1/(K+1) =
    1.5%. Measured on this run (seeds 0, 1, 5, one and two threads): the correct
    engine gives 3-7% over steps 3-12 (once real keys have replaced the queue's
    random start) and 19-21% over the last 40 steps, its loss falling by 0.7-0.9.
    Each broken engine of ``BROKEN`` fails at least one bound by a wide margin: no
    momentum update stays near 4.5% (its loss falls by 0.35); a queue never written
    is solved at once (100%, loss near 0); identical views climb past 85%; keys that
    carry gradients start near 95% and collapse to 8%, the loss rising.
    """
    train_records = [r for r in records if r["kind"] == "train"]
    acc = [r["acc1"] for r in train_records]
    loss = [r["loss"] for r in train_records]
    early_acc, late_acc = mean(acc[2:12]), mean(acc[-40:])
    early_loss, late_loss = mean(loss[2:12]), mean(loss[-40:])
    faults = []
    if early_acc > 30:
        faults.append(
            f"pretext top-1 {early_acc:.1f}% over steps 3-12: solved before learning anything"
        )
    if not 12 <= late_acc <= 60:
        faults.append(
            f"pretext top-1 {late_acc:.1f}% over the last 40 steps, outside 12-60% (chance {100 / (K + 1):.1f}%)"
        )
    if late_loss > early_loss - 0.3:
        faults.append(
            f"loss {early_loss:.2f} over steps 3-12 -> {late_loss:.2f} over the last 40: not falling"
        )
    return faults


def test_pretext_task_is_learned_and_outputs_hold_their_fields(data, tmp_path, caplog):
    """In this process, as the broken engines below (the same losses as the command's)."""
    caplog.set_level(logging.INFO, logger="moco-train")
    out = tmp_path / "run"
    code = train_here(
        *LEARN,
        "--data.train",
        str(data["train"]),
        "--run.out",
        str(out),
        "--data.knn_train",
        str(data["train"]),
        "--data.knn_val",
        str(data["val"]),
        "--run.knn_every",
        "4",
    )
    assert code == 0
    records = metrics(out)
    assert sorted(r["step"] for r in records if r["kind"] == "train") == list(range(1, 161))
    assert learned(records) == []
    train_record = next(r for r in records if r["kind"] == "train")
    assert {
        "step",
        "epoch",
        "loss",
        "acc1",
        "lr",
        "momentum",
        "images_per_s",
        "images_per_s_per_gpu",
        "data_wait",
        "peak_memory_MB",
        "skipped_steps",
    } <= set(train_record)
    # The monitor's figure is moco-eval's on the same checkpoint: the features and the
    # labels it votes with line up (a kNN that says nothing about learning here: 160
    # steps of MoCo do not beat a random encoder's kNN on these drawings).
    knn = [r for r in records if r["kind"] == "knn"]
    assert [r["epoch"] for r in knn] == [4, 8, 12]
    from moco_dali.train.eval.cli import main as moco_eval

    report = tmp_path / "knn.json"
    assert (
        moco_eval(
            [
                "knn",
                "--checkpoint",
                str(out / "ckpt-000000144.pt"),
                "--train",
                str(data["train"]),
                "--val",
                str(data["val"]),
                "--threads",
                "1",
                "--batch-size",
                "32",
                "--device",
                "cpu",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    assert json.loads(report.read_text())["top1"] == knn[-1]["top1"]
    assert json.loads((out / "config.json").read_text())["model"]["arch"] == "resnet18"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/images_per_s", "train/data_wait", "knn/top1"} <= set(
        events.Tags()["scalars"]
    )
    assert any(line.startswith("step 160/160 ") for line in caplog.messages)


def _no_momentum(monkeypatch):
    from moco_dali.model.moco import MoCo

    monkeypatch.setattr(MoCo, "_momentum_update_key_encoder", lambda self: None)


def _queue_never_written(monkeypatch):
    from moco_dali.model.queue import KeyQueue

    monkeypatch.setattr(KeyQueue, "enqueue", lambda self, keys: None)


def _identical_views(monkeypatch):
    from moco_dali.model.moco import MoCo

    forward = MoCo.forward
    monkeypatch.setattr(MoCo, "forward", lambda self, im_q, im_k: forward(self, im_q, im_q))


def _keys_with_gradients(monkeypatch):
    from moco_dali.model.moco import MoCo

    monkeypatch.setattr(MoCo, "_keys", lambda self, im_k: self._normalize(self.encoder_q(im_k)))


# Each broken engine, the steps that show its fault and the fault ``learned`` names. The two
# that solve the task at once are caught by a bound a correct engine never comes near (3-7%
# over steps 3-12, against 30%), so 24 steps show them; the other two are as far outside the
# 12-60% band over steps 41-80 as over the last 40 of 160 (measured on two threads: no
# momentum update 3.9%, identical views 85.0%), so 80 steps show them.
BROKEN = {
    "no momentum update": (_no_momentum, 80, "over the last 40 steps, outside 12-60%"),
    "queue never written": (_queue_never_written, 24, "solved before learning anything"),
    "identical views": (_identical_views, 80, "over the last 40 steps, outside 12-60%"),
    "keys with gradients": (_keys_with_gradients, 24, "solved before learning anything"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_the_learning_check_fails_a_broken_engine(data, tmp_path, monkeypatch, broken):
    """The same run in this process with one piece of MoCo broken: ``learned`` must object."""
    from moco_dali.train.cli import parse
    from moco_dali.train.engine import train

    breaking, steps, fault = BROKEN[broken]
    breaking(monkeypatch)
    config, _ = parse(
        [
            *LEARN,
            "--run.max_steps",
            str(steps),
            "--data.train",
            str(data["train"]),
            "--run.out",
            str(tmp_path / "run"),
        ]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # as the command-line runs
    try:
        train(config)
    finally:
        torch.set_num_threads(threads)
    faults = learned(metrics(tmp_path / "run"))
    assert any(fault in f for f in faults), faults


def test_lars_runs_and_its_state_is_checkpointed(data, tmp_path):
    out = tmp_path / "lars"
    code = train_here(
        *TINY,
        "--data.train",
        str(data["train"]),
        "--run.out",
        str(out),
        "--run.max_steps",
        "6",
        "--optim.name",
        "lars",
        "--optim.lr_per_256",
        "2.4",
        "--run.ckpt_every",
        "6",
    )
    assert code == 0
    assert all(math.isfinite(v) for v in losses(out).values()) and len(losses(out)) == 6
    state = checkpoint.load(checkpoint.latest(out))
    assert state["config"]["optim"]["name"] == "lars"
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())


def test_kill_minus_9_and_resume_gives_the_same_losses(data, tmp_path, caplog):
    """Only the killed run is a process of its own; the uninterrupted run and the resume run in
    this process (the same losses: ``train_here``), which also checks that the steps the killed
    process took before its checkpoint are the ones this process takes."""
    caplog.set_level(logging.INFO, logger="moco-train")
    args = [*TINY, "--data.train", str(data["train"]), "--run.epochs", "2", "--run.ckpt_every", "3"]
    assert train_here(*args, "--run.out", str(tmp_path / "clean")) == 0
    expected = losses(tmp_path / "clean")

    out = tmp_path / "killed"
    # A checkpoint exists from step 3 on; the run ends at 24: the kill lands in either epoch.
    kill_after = random.Random().randint(4, 18)
    proc = moco_train(*args, "--run.out", str(out), wait=False)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and max(losses(out), default=0) >= kill_after:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    proc.communicate()
    newest = checkpoint.latest(out)
    assert newest is not None
    resumed_from = checkpoint.load(newest)["step"]  # the resumed run rotates old checkpoints away

    caplog.clear()
    assert train_here(*args, "--run.out", str(out), "--run.resume", "auto") == 0
    assert f"resuming at step {resumed_from} from {newest}" in caplog.text
    assert losses(out) == expected


def test_sigterm_writes_a_checkpoint_and_exits_0(data, tmp_path):
    out = tmp_path / "run"
    proc = moco_train(
        *TINY,
        "--data.train",
        str(data["train"]),
        "--run.out",
        str(out),
        "--run.epochs",
        "50",
        "--run.ckpt_every",
        "1000",
        wait=False,
    )
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and losses(out):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    # The command's log lines on stderr, as a user reads them (the tests that run moco-train
    # in their own process read the logger's messages instead).
    assert "\nmoco-train: step 1/600 epoch 0 loss " in stderr
    assert "\nmoco-train: stop requested: checkpoint written at step" in stderr
    state = checkpoint.load(checkpoint.latest(out))
    assert state["step"] == max(losses(out)) and state["step"] < 50 * 12


def test_two_process_gloo_run_agrees_across_ranks(data, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "moco_dali.train",
        *TINY,
        "--data.train",
        str(data["train"]),
        "--run.out",
        str(out),
        "--run.max_steps",
        "6",
        "--run.ckpt_every",
        "3",
    ]
    result = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cpu x2" in result.stderr
    for path in sorted(out.glob("ckpt-*.pt")):
        state = checkpoint.load(path)
        assert state["world"] == 2 and len(set(state["rank_digests"])) == 1
    assert int(checkpoint.load(checkpoint.latest(out))["model"]["queue.queue_ptr"]) == (6 * 32) % 64


def test_non_finite_losses_stop_the_run_leaving_the_last_good_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    code = train_here(
        *TINY,
        "--data.train",
        str(data["train"]),
        "--run.out",
        str(out),
        "--run.epochs",
        "5",
        "--optim.lr_per_256",
        "1e30",
        "--run.max_nonfinite",
        "2",
        "--run.ckpt_every",
        "1",
    )
    assert code == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("moco-train: stopped: 2 non-finite losses in a row")
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_bad = min(r["step"] for r in records if r["skipped_steps"] > 0)
    assert checkpoint.load(checkpoint.latest(out))["step"] < first_bad


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--data.batch_size", "40", "--model.K", "16"],
            "model.K 16 is smaller than the keys enqueued per step (40, from data.batch_size); raise K",
        ),
        (["--run.amp", "fp16"], "run.amp fp16 needs a CUDA GPU; use bf16 or none on a CPU"),
        (["--model.m", "2"], "model.m: need 0 <= m <= 1 and T > 0, got m=2.0, T=0.2"),
        (["--model.dims", "3"], "command line: unknown key 'model.dims' (did you mean model.dim?)"),
        (["--run.epochs", "many"], "run.epochs: expected int, got 'many'"),
        (
            ["--optim.schedule", "linear"],
            "optim.schedule 'linear': choose step, cosine",
        ),
        (["--optim.name", "adam"], "optim.name: optimizer 'adam': choose sgd or lars"),
    ],
)
def test_configuration_errors_are_one_line(data, extra, message, tmp_path, monkeypatch, capsys):
    """In this process (``test_config`` runs a refusal as a command); nothing written anywhere."""
    from moco_dali.train.cli import main

    monkeypatch.chdir(tmp_path)  # where the default run.out would go
    assert main([*TINY, "--data.train", str(data["train"]), *extra]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"moco-train: error: {message}"]
    assert list(tmp_path.iterdir()) == []


def test_batch_not_divisible_by_world_and_missing_shards(data, tmp_path, capsys):
    from moco_dali.train.config import ConfigError, check
    from moco_dali.train.presets import preset

    config = preset("v2")
    config.data.train = str(data["train"])
    with pytest.raises(
        ConfigError, match="data.batch_size 256 is not divisible by the world size 3"
    ):
        check(config, world=3, cuda=False, amp=False)
    from moco_dali.train.cli import main

    assert main([*TINY, "--data.train", str(tmp_path), "--run.out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"moco-train: error: data.train: {tmp_path / 'manifest.json'}: no manifest; is this a folder written by "
        "'moco-shards build'?"
    ]
    assert not (tmp_path / "run").exists()


def test_config_file_and_command_line_precedence(tmp_path):
    from moco_dali.train.cli import parse

    (tmp_path / "run.toml").write_text(
        "[optim]\nlr_per_256 = 0.5\nmilestones = [3, 4]\n[run]\nepochs = 7\n"
    )
    (tmp_path / "run.yaml").write_text("model:\n  K: 4096\n  mlp: false\n")
    config, _ = parse(
        ["--preset", "v1", "--config", str(tmp_path / "run.toml"), "--run.epochs", "9"]
    )
    assert (
        config.optim.lr_per_256,
        config.optim.milestones,
        config.run.epochs,
        config.model.T,
    ) == (0.5, (3, 4), 9, 0.07)
    config, _ = parse(["--config", str(tmp_path / "run.yaml")])
    assert (config.model.K, config.model.mlp, config.model.T, config.optim.schedule) == (
        4096,
        False,
        0.2,
        "cosine",
    )


@pytest.mark.parametrize(
    "folder, message",
    [
        ("missing", "data.knn_val: {folder}: not a folder"),
        (
            "unlabelled",
            "data.knn_val {folder}: the kNN monitor needs labelled shards (build with --labels folder)",
        ),
    ],
)
def test_the_knn_monitors_folders_are_checked_before_the_first_step(
    data, tmp_path, capsys, folder, message
):
    """Not after an epoch of training: the run below would end (exit 0) before its first kNN pass."""
    from moco_dali.train.cli import main

    if folder == "unlabelled":
        build(
            [str(data["root"] / "raw-val")],
            tmp_path / folder,
            BuildSettings(),
            workers=0,
            progress=False,
        )
    out = tmp_path / "run"
    assert (
        main(
            [
                *TINY,
                "--data.train",
                str(data["train"]),
                "--run.out",
                str(out),
                "--run.max_steps",
                "2",
                "--data.knn_train",
                str(data["train"]),
                "--data.knn_val",
                str(tmp_path / folder),
                "--run.knn_every",
                "1",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == "moco-train: error: " + message.format(
        folder=tmp_path / folder
    )
    assert not (out / "metrics.jsonl").exists()


def test_run_deterministic_is_applied_before_any_work(data, tmp_path, monkeypatch):
    from moco_dali.train import engine
    from moco_dali.train.cli import main

    asked = []
    monkeypatch.setattr(engine, "set_determinism", asked.append)
    # Refused by the configuration: the switch was applied before, as cuBLAS needs.
    assert (
        main(
            [
                *TINY,
                "--data.train",
                str(data["train"]),
                "--run.out",
                str(tmp_path),
                "--run.deterministic",
                "true",
                "--model.m",
                "2",
            ]
        )
        == 2
    )
    assert (
        main(
            [
                *TINY,
                "--data.train",
                str(data["train"]),
                "--run.out",
                str(tmp_path),
                "--model.m",
                "2",
            ]
        )
        == 2
    )
    assert asked == [True, False]


def test_set_determinism_sets_the_kernels_choice(monkeypatch):
    from moco_dali.train.engine import set_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        set_determinism(True)
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (False, True)
        assert (
            torch.are_deterministic_algorithms_enabled()
            and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        )
        set_determinism(False)  # shapes are fixed: let cuDNN pick the fastest algorithm once
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


@pytest.mark.gpu
def test_a_deterministic_gpu_run_resumes_with_the_same_losses(data, tmp_path):
    """On the GPU (bf16 autocast, the mixed decoder) with run.deterministic: stopped at step 7, resumed, equal."""
    args = [
        *TINY,
        "--data.train",
        str(data["train"]),
        "--run.device",
        "cuda",
        "--run.amp",
        "bf16",
        "--run.deterministic",
        "true",
        "--run.epochs",
        "2",
        "--run.ckpt_every",
        "7",
    ]
    clean = moco_train(*args, "--run.out", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr[-2000:]
    out = tmp_path / "stopped"
    first = moco_train(*args, "--run.out", str(out), "--run.max_steps", "7")
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = moco_train(*args, "--run.out", str(out), "--run.resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step 7" in resumed.stderr and "cuda x1" in resumed.stderr
    assert losses(out) == losses(tmp_path / "clean")


@pytest.mark.gpu
def test_fp16_on_the_gpu_counts_no_scaler_back_off_as_a_skipped_step(data, tmp_path):
    out = tmp_path / "fp16"
    result = moco_train(
        *TINY,
        "--data.train",
        str(data["train"]),
        "--run.device",
        "cuda",
        "--run.amp",
        "fp16",
        "--run.out",
        str(out),
        "--run.max_steps",
        "12",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [r for r in metrics(out) if r["kind"] == "train"]
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["skipped_steps"] == 0
