"""Checkpoints and resume never lose a run: verified before trusted, read without running code, same configuration.

One short run writes two checkpoints (steps 3 and 6); each test damages a copy of its
folder the way a disk, a copy or a person would, and resumes from it.
"""

from __future__ import annotations

import builtins
import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from moco_dali.tools.demo.data import generated_dump
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from moco_dali.train import checkpoint
from moco_dali.train.cli import main as moco_train
from tests.conftest import small_disk
from tests.train.runs import THREADS, TINY, losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    generated_dump(root / "raw", per_class=40, seed=0)
    build(
        [str(root / "raw")],
        root / "train",
        BuildSettings(labels="folder"),
        workers=0,
        progress=False,
    )
    assert run(root, root / "run", "--run.max_steps", "6") == 0
    assert [p.name for p in checkpoint.candidates(root / "run")] == [
        "ckpt-000000006.pt",
        "ckpt-000000003.pt",
    ]
    return {"train": root / "train", "run": root / "run", "root": root}


def run(root: Path, out: Path, *extra: str) -> int:
    """``moco-train`` in this process, on the threads the command-line tests run with (same losses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return moco_train(
            [
                *TINY,
                "--data.train",
                str(root / "train"),
                "--run.out",
                str(out),
                "--run.ckpt_every",
                "3",
                *extra,
            ]
        )
    finally:
        torch.set_num_threads(threads)


def copy(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained["run"], out)
    return out


def set_up(trained, out: Path, *extra: str):
    """The resumed run's set-up (no step taken): which checkpoint it trusted."""
    from moco_dali.train.cli import parse
    from moco_dali.train.engine import Run

    config, _ = parse(
        [
            *TINY,
            "--data.train",
            str(trained["train"]),
            "--run.out",
            str(out),
            "--run.ckpt_every",
            "3",
            "--run.resume",
            "auto",
            *extra,
        ]
    )
    resumed = Run(config)
    resumed.close()
    return resumed


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _huge_weight(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["model"]["encoder_q.layer1.0.conv1.weight"][3, 2, 1, 0] = 1e30  # finite, and wrong
    torch.save(state, path)


def _nan_in_the_queue(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["model"]["queue.queue"][3, 5] = float("nan")
    torch.save(state, path)


def _missing_key(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    del state["optimizer"]
    torch.save(state, path)


def _loader_without_world(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    del state["loader"][0]["world"]
    torch.save(state, path)


def _loader_of_another_rank(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["loader"][0]["rank"] = 1
    torch.save(state, path)


def _loader_step_as_text(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["loader"][0]["window_step"] = "3"
    torch.save(state, path)


DAMAGE = {
    "truncated": (_truncate, "not a readable checkpoint"),
    "empty": (_empty, "not a readable checkpoint"),
    "a weight flipped to 1e30": (_huge_weight, "differ from the digest written with them"),
    "NaN in the queue": (_nan_in_the_queue, "queue.queue holds non-finite values"),
    "incomplete": (_missing_key, "incomplete, no optimizer"),
    "a data position without its world": (
        _loader_without_world,
        "incomplete, loader entry 0 has no world",
    ),
    "another rank's data position": (
        _loader_of_another_rank,
        "loader entry 0 is the data position of rank 1",
    ),
    "a data position counter as text": (
        _loader_step_as_text,
        "loader entry 0: window_step '3' is not a count",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_auto_skips_a_damaged_newest_checkpoint_for_the_good_one(
    trained, tmp_path, caplog, damage
):
    out = copy(trained, tmp_path)
    harm, reason = DAMAGE[damage]
    harm(out / "ckpt-000000006.pt")
    resumed = set_up(trained, out)
    assert resumed.resumed_from == out / "ckpt-000000003.pt" and resumed.step == 3
    skipped = [
        r.getMessage() for r in caplog.records if "skipped ckpt-000000006.pt" in r.getMessage()
    ]
    assert len(skipped) == 1 and reason in skipped[0], [r.getMessage() for r in caplog.records]
    # Set aside, so that rotation never deletes the good ones in its favour.
    assert (out / "ckpt-000000006.pt.bad").exists() and checkpoint.latest(
        out
    ) == out / "ckpt-000000003.pt"


def test_the_resumed_run_continues_with_the_same_losses_after_a_skip(trained, tmp_path):
    out = copy(trained, tmp_path)
    _truncate(out / "ckpt-000000006.pt")
    assert run(trained["root"], out, "--run.max_steps", "6", "--run.resume", "auto") == 0
    assert losses(out) == losses(trained["run"])  # steps 4-6 again, exactly as the first time


def test_a_damaged_checkpoint_named_explicitly_is_refused_in_one_line(trained, tmp_path, capsys):
    out = copy(trained, tmp_path)
    _huge_weight(out / "ckpt-000000006.pt")
    assert (
        run(trained["root"], tmp_path / "other", "--run.resume", str(out / "ckpt-000000006.pt"))
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("moco-train: error: ") and "ckpt-000000006.pt" in err and "digest" in err
    assert "\n" not in err


def test_no_good_checkpoint_at_all_is_an_error_not_a_fresh_start(trained, tmp_path, capsys):
    out = copy(trained, tmp_path)
    for path in checkpoint.candidates(out):
        _empty(path)
    assert run(trained["root"], out, "--run.resume", "auto") == 2
    assert "no good checkpoint" in capsys.readouterr().err
    assert (
        not checkpoint.candidates(out) and len(list(out.glob("*.bad"))) == 2
    )  # kept for a look, not deleted


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(trained, tmp_path, capsys):
    out = copy(trained, tmp_path)
    assert run(trained["root"], out) == 2
    assert (
        "holds a run (newest ckpt-000000006.pt): continue it with --run.resume auto"
        in capsys.readouterr().err
    )
    assert [p.name for p in checkpoint.candidates(out)] == [
        "ckpt-000000006.pt",
        "ckpt-000000003.pt",
    ]


@pytest.mark.parametrize(
    "extra, keys",
    [
        (["--model.K", "128"], ["model.K 64 -> 128"]),
        (["--model.arch", "resnet34"], ["model.arch 'resnet18' -> 'resnet34'"]),
        (
            ["--model.mlp", "false", "--model.dim", "64"],
            ["model.mlp True -> False", "model.dim 128 -> 64"],
        ),
        (["--optim.name", "lars"], ["optim.name 'sgd' -> 'lars'"]),
        (
            ["--data.batch_size", "16", "--optim.lr_per_256", "0.1"],
            ["data.batch_size 32 -> 16", "optim.lr_per_256"],
        ),
        (["--data.views.size", "48"], ["data.views.size 32 -> 48"]),
        (["--data.views.blur_p", "0"], ["data.views.blur_p 0.5 -> 0.0"]),
    ],
)
def test_resuming_with_keys_that_change_the_state_or_meaning_is_refused(
    trained, tmp_path, capsys, extra, keys
):
    out = copy(trained, tmp_path)
    config_json = (out / "config.json").read_bytes()
    assert run(trained["root"], out, "--run.resume", "auto", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "written with another configuration" in err, err
    assert all(key in err for key in keys), err
    assert (out / "config.json").read_bytes() == config_json  # not rewritten
    assert [p.name for p in checkpoint.candidates(out)] == [
        "ckpt-000000006.pt",
        "ckpt-000000003.pt",
    ]


def _without_manifest(trained, tmp_path) -> Path:
    folder = tmp_path / "copied-train"
    shutil.copytree(trained["train"], folder)
    (folder / "manifest.json").unlink()
    return folder


@pytest.mark.parametrize(
    "folder, says",
    [
        (lambda trained, tmp_path: tmp_path / "missing", "missing: not a folder"),
        (_without_manifest, "manifest.json: no manifest"),
    ],
    ids=["missing", "no manifest"],
)
def test_a_bad_training_folder_is_refused_before_any_checkpoint_is_touched(
    trained, tmp_path, capsys, folder, says
):
    out = copy(trained, tmp_path)
    _truncate(out / "ckpt-000000006.pt")  # would be set aside as *.bad once checkpoints were read
    train = folder(trained, tmp_path)
    assert (
        moco_train(
            [*TINY, "--data.train", str(train), "--run.out", str(out), "--run.resume", "auto"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("moco-train: error: data.train: ") and says in err and "\n" not in err, (
        err
    )
    assert [p.name for p in checkpoint.candidates(out)] == [
        "ckpt-000000006.pt",
        "ckpt-000000003.pt",
    ]
    assert not list(out.glob("*.bad"))


def test_a_batch_larger_than_the_training_folder_is_refused_before_any_checkpoint_is_touched(
    trained, tmp_path, capsys
):
    out = copy(trained, tmp_path)
    _truncate(out / "ckpt-000000006.pt")
    assert (
        run(
            trained["root"],
            out,
            "--run.resume",
            "auto",
            "--data.batch_size",
            "512",
            "--model.K",
            "1024",
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == (
        f"moco-train: error: data.batch_size 512 is larger than the 400 samples of data.train "
        f"{trained['train']}: use a smaller batch or more samples"
    )
    assert not list(out.glob("*.bad"))


def test_another_shard_folder_is_refused(trained, tmp_path, capsys):
    out = copy(trained, tmp_path)
    shutil.copytree(trained["train"], tmp_path / "train")
    assert (
        moco_train(
            [
                *TINY,
                "--data.train",
                str(tmp_path / "train"),
                "--run.out",
                str(out),
                "--run.ckpt_every",
                "3",
                "--run.resume",
                "auto",
            ]
        )
        == 2
    )
    assert "data.train" in capsys.readouterr().err


def test_resuming_with_safe_keys_changed_logs_them_and_goes_on(trained, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = copy(trained, tmp_path)
    assert (
        run(
            trained["root"],
            out,
            "--run.resume",
            "auto",
            "--run.max_steps",
            "8",
            "--run.log_every",
            "2",
            "--run.keep_last",
            "2",
        )
        == 0
    )
    changed = [
        r.getMessage() for r in caplog.records if "resuming with changed keys" in r.getMessage()
    ]
    assert (
        len(changed) == 1
        and "run.max_steps 6 -> 8" in changed[0]
        and "run.log_every 1 -> 2" in changed[0]
    )
    assert json.loads((out / "config.json").read_text())["run"]["max_steps"] == 8
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resume = [r for r in records if r["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["changed"]["run.max_steps"] == [6, 8]
    assert max(losses(out)) == 8


class _WritesAFile:
    """Unpickled, it would write a file: what a hostile checkpoint does to whoever loads it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _hostile(path: Path, marker: Path, like: Path, as_torch: bool = True) -> Path:
    """A copy of the checkpoint ``like`` carrying a payload beside its weights."""
    state = torch.load(like, weights_only=True)
    state["payload"] = _WritesAFile(marker)
    if as_torch:
        torch.save(state, path)
    else:
        # Each parameter is a view into its encoder's one flat buffer; pickle would write
        # the whole buffer once per view (gigabytes), so the file holds copies.
        state = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, state)
        with open(path, "wb") as f:
            pickle.dump(state, f)
    return path


@pytest.mark.parametrize("as_torch", [True, False], ids=["torch.save", "plain pickle"])
def test_a_checkpoint_that_carries_code_is_refused_and_the_code_never_runs(
    trained, tmp_path, capsys, as_torch
):
    marker = tmp_path / "the-code-ran"
    hostile = _hostile(tmp_path / "ckpt.pt", marker, trained["run"] / "ckpt-000000006.pt", as_torch)
    assert run(trained["root"], tmp_path / "other", "--run.resume", str(hostile)) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"moco-train: error: {hostile}: refused: it holds a pickled Python object")
        and "\n" not in err
    )
    from moco_dali.train.eval.cli import main as moco_eval

    assert (
        moco_eval(
            [
                "export",
                "--checkpoint",
                str(hostile),
                "--format",
                "torchvision",
                "--out",
                str(tmp_path / "r18.pth"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "refused: it holds a pickled Python object" in err and "\n" not in err
    assert not marker.exists() and not (tmp_path / "r18.pth").exists()


def test_resume_auto_skips_a_hostile_newest_checkpoint(trained, tmp_path, caplog):
    out = copy(trained, tmp_path)
    marker = tmp_path / "the-code-ran"
    _hostile(out / "ckpt-000000009.pt", marker, out / "ckpt-000000006.pt")
    resumed = set_up(trained, out)
    assert resumed.resumed_from == out / "ckpt-000000006.pt" and not marker.exists()
    assert any(
        "skipped ckpt-000000009.pt" in r.getMessage() and "refused" in r.getMessage()
        for r in caplog.records
    )


def test_what_a_checkpoint_holds_loads_without_pickled_objects(trained):
    state = checkpoint.check(checkpoint.load(trained["run"] / "ckpt-000000006.pt"), trained["run"])
    assert state["version"] == checkpoint.VERSION and isinstance(
        state["loader"][0]["dali"], (str, bytes)
    )
    assert state["rng"][0]["numpy"]["keys"].dtype == torch.int64


def test_a_full_disk_during_a_checkpoint_ends_in_one_line_and_keeps_the_last_one(
    trained, tmp_path, capsys
):
    """torch.save turns the full disk into a RuntimeError; the run ends in one line (exit 2),
    the newest checkpoint stays good and no temporary file is left."""
    out = copy(trained, tmp_path)
    with small_disk(10 << 20):  # a checkpoint of the tiny run is over 100 MB
        assert run(trained["root"], out, "--run.resume", "auto", "--run.max_steps", "9") == 2
    assert capsys.readouterr().err.strip() == (
        f"moco-train: error: {out / 'ckpt-000000009.pt'}: cannot write the checkpoint (File too "
        f"large); the newest checkpoint is still {out / 'ckpt-000000006.pt'}"
    )
    assert [p.name for p in checkpoint.candidates(out)] == [
        "ckpt-000000006.pt",
        "ckpt-000000003.pt",
    ]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no .tmp, no lock
    checkpoint.check(checkpoint.load(out / "ckpt-000000006.pt"), out / "ckpt-000000006.pt")


@pytest.mark.parametrize("where", ["optimizer", "model"])
def test_a_tensor_declaring_a_huge_shape_over_a_tiny_storage_is_refused_in_one_line(
    trained, tmp_path, capsys, where
):
    """The old variant loaded it: strides of 0 declare 10**12 numbers over one, and the first
    check, cast or copy of it (the finiteness check, a move to the GPU) set out to allocate 4 TB."""
    state = checkpoint.load(trained["run"] / "ckpt-000000006.pt")
    huge = torch.zeros(1).as_strided((10**6, 10**6), (0, 0))
    if where == "optimizer":
        state["optimizer"]["state"][0]["momentum_buffer"] = huge
    else:
        state["model"]["encoder_q.fc.weight"] = huge
    hostile = tmp_path / "ckpt.pt"
    torch.save(state, hostile)
    original = (trained["run"] / "ckpt-000000006.pt").stat().st_size
    assert hostile.stat().st_size < original + 10**6  # one number stored where 10**12 are declared
    assert run(trained["root"], tmp_path / "other", "--run.resume", str(hostile)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"moco-train: error: {hostile}: refused: ")
    assert "(1000000, 1000000)" in err
    from moco_dali.train.eval.cli import main as moco_eval

    out = tmp_path / "r18.pth"
    args = ["export", "--checkpoint", str(hostile), "--format", "torchvision", "--out", str(out)]
    assert moco_eval(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "(1000000, 1000000)" in err and not out.exists()
