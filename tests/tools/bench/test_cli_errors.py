"""moco-bench: every user mistake ends in one line naming the option or file, and exit 2, before any work."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

from moco_dali.tools.bench import cli as bench

# (arguments, what the one line must name); {tmp} is the test's own folder.
HOSTILE = [
    (["pipeline", "--data.batch_size", "0"], "data.batch_size"),
    (["pipeline", "--data.batch_size", "x"], "data.batch_size"),
    (["pipeline", "--reps", "-1"], "--reps"),
    (["pipeline", "--warmup", "0"], "--warmup"),
    (["pipeline", "--batches", "0"], "--batches"),
    (["pipeline", "--synthetic", "0"], "--synthetic"),
    (["pipeline", "--data.views.size", "0"], "data.views.size"),
    (["pipeline", "--data.threads", "-1"], "data.threads"),
    (["pipeline", "--workers", "-2"], "--workers"),
    (["pipeline", "--data.hw_decoder_load", "2"], "data.hw_decoder_load"),
    (["pipeline", "--data.batchsize", "8"], "did you mean data.batch_size?"),
    (["pipeline", "--device", "tpu"], "--device"),
    (["pipeline", "--device", "mps"], "--device"),
    (["pipeline", "--device", "cuda:99"], "--device"),
    (["pipeline", "--shards", "{tmp}/none"], "--shards {tmp}/none"),
    (["pipeline", "--shards", "{tmp}/empty"], "--shards {tmp}/empty"),
    (["pipeline", "--shards", "{tmp}/garbage"], "--shards {tmp}/garbage"),
    (["pipeline", "--shards", "{tmp}/file.txt"], "--shards {tmp}/file.txt"),
    (["pipeline", "--out", "/proc/x.json", "--synthetic", "2"], "--out /proc/x.json"),
    (["pipeline", "--out", "/proc/new/x.json"], "--out /proc/new/x.json"),
    (["pipeline", "--out", "{tmp}/empty"], "--out {tmp}/empty"),
    (["pipeline", "--out", "{tmp}/file.txt/x.json"], "--out {tmp}/file.txt/x.json"),
    (["pipeline", "--chart", "{tmp}/empty"], "--chart {tmp}/empty"),
    (["pipeline", "--chart", "/proc/x.png"], "--chart /proc/x.png"),
    (["shards", "--synthetic", "-5"], "--synthetic"),
    (["shards", "--reps", "0"], "--reps"),
    (["shards", "--build-workers", "0,2"], "--build-workers"),
    (["shards", "--build-workers", "two"], "--build-workers"),
    (["shards", "--photos", "{tmp}/none"], "--photos {tmp}/none"),
    (["shards", "--photos", "{tmp}/empty"], "--photos {tmp}/empty"),
    (["momentum", "--calls", "0"], "--calls"),
    (["momentum", "--model.K", "0"], "model.K"),
    (["momentum", "--model.K", "64", "--data.batch_size", "256"], "model.K 64"),
    (["momentum", "--data.batch_size", "0"], "data.batch_size"),
    (["momentum", "--model.arch", "resnet7"], "model.arch"),
    (["step", "--data.batch_size", "12"], "model.num_splits"),
    (["step", "--data.batch_size", "8"], "model.num_splits"),
    (["step", "--model.arch", "vgg"], "model.arch"),
    (["step", "--optim.name", "adam"], "optim.name"),
    (["e2e", "--model.K", "0"], "model.K"),
    (["e2e", "--batches", "-3"], "--batches"),
    (["all", "--reps", "0"], "--reps"),
    (["all", "--modes", "pipeline,bogus"], "--modes"),
    (["all", "--modes", ""], "--modes"),
    (["all", "--data.views.size", "-1"], "data.views.size"),
    (["all", "--config", "{tmp}/none.toml"], "--config {tmp}/none.toml"),
    (["scale", "--data.batch_size", "0"], "data.batch_size"),
    (["scale", "--data.threads", "-1"], "data.threads"),
    (["scale", "--reps", "0"], "--reps"),
    (["scale", "--folders", "10:20"], "--folders 10:20"),
    (["scale", "--folders", "abc"], "--folders"),
    (["scale", "--worlds", "0,8"], "--worlds"),
    (["scale", "--root", "{tmp}/file.txt"], "--root {tmp}/file.txt"),
    (["scale", "--pipeline-from", "{tmp}/empty"], "--pipeline-from {tmp}/empty"),
    (["scale-build", "--sizes", "0"], "--sizes"),
    (["scale-build", "--parts", "x"], "--parts"),
    (["scale-build", "--kinds", "tree"], "--kinds"),
    (["scale-build", "--out", "{tmp}/empty"], "--out {tmp}/empty"),
    (["bogus"], "bogus"),
    (["--compare", "{tmp}/garbage.json", "{tmp}/garbage.json"], "garbage.json"),
    (["--compare", "{tmp}/list.json", "{tmp}/list.json"], "list.json"),
    (["--compare", "{tmp}/shape.json", "{tmp}/shape.json"], "shape.json"),
    (["--compare", "{tmp}/words.json", "{tmp}/words.json"], "words.json"),
    (["--compare", "{tmp}/zero.json", "{tmp}/zero.json"], "zero.json"),
    (["--compare", "{tmp}/binary.json", "{tmp}/binary.json"], "binary.json"),
    (["--compare", "{tmp}/empty", "{tmp}/empty"], "{tmp}/empty"),
    (["--compare", "{tmp}/none.json", "{tmp}/none.json"], "none.json"),
    # The old variants: a RecursionError, and an AttributeError from a manifest that is a list.
    (
        ["--compare", "{tmp}/deep.json", "{tmp}/deep.json"],
        "moco-bench record nested deeper than 32",
    ),
    (
        ["--compare", "{tmp}/huge.json", "{tmp}/huge.json"],
        "results.ours.images_per_s: expected `float` <= 1000000000000000.0",
    ),
    (["pipeline", "--shards", "{tmp}/listed"], "listed/manifest.json: not a moco-dali-shards"),
]


def _step_record(ours, reference) -> dict:
    return {
        "mode": "step",
        "results": {"ours": {"images_per_s": ours}, "reference": {"images_per_s": reference}},
    }


@pytest.fixture
def hostile_folder(tmp_path, monkeypatch):
    """Files to be hostile with; any work the command starts fails the test, and temp files land in one place."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "manifest.json").write_text("{not json")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "shape.json").write_text(json.dumps({"mode": "step", "results": {}}))
    (tmp_path / "words.json").write_text(json.dumps(_step_record("fast", 3.0)))
    (tmp_path / "zero.json").write_text(json.dumps(_step_record(0, 3.0)))
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "huge.json").write_text(json.dumps(_step_record(1e300, 3.0)))
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "manifest.json").write_text("[1, 2]")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(
        tempfile, "tempdir", str(scratch)
    )  # where generated photos and shards would go

    def no_work(*args, **kwargs):
        raise AssertionError("the benchmark started before the arguments were checked")

    monkeypatch.setattr(bench, "_run", no_work)
    monkeypatch.setattr(bench, "compare", no_work)
    return tmp_path


def _main(argv) -> int:
    try:
        return bench.main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def _listing(folder) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("argv, named", HOSTILE, ids=[" ".join(a) for a, _ in HOSTILE])
def test_a_mistake_is_one_line_naming_it_and_exit_2_before_any_work(
    hostile_folder, capsys, argv, named
):
    before = _listing(hostile_folder)
    argv = [a.format(tmp=hostile_folder) for a in argv]
    assert _main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert named.format(tmp=hostile_folder) in lines[0] and "error" in lines[0]
    assert captured.out == ""
    assert _listing(hostile_folder) == before  # nothing generated, no probe or parent folder left


def test_a_writable_out_in_new_folders_passes_the_check_and_leaves_nothing(tmp_path, monkeypatch):
    out, chart = tmp_path / "new" / "deeper" / "x.json", tmp_path / "pictures" / "x.png"
    started = []

    def run(mode, args):  # the check has passed: nothing of its probe is left
        started.append(_listing(tmp_path))
        raise ValueError("stop here")

    monkeypatch.setattr(bench, "_run", run)
    assert (
        bench.main(["momentum", "--device", "cpu", "--out", str(out), "--chart", str(chart)]) == 2
    )
    assert started == [[]]


def test_the_command_line_reports_an_unwritable_out_before_the_run(tmp_path):
    """The reported case: it used to run the whole benchmark, then die with a traceback."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moco_dali.tools.bench.cli",
            "pipeline",
            "--out",
            "/proc/x.json",
            "--synthetic",
            "2",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "--out /proc/x.json" in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []
