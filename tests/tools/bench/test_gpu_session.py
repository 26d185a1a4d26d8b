"""benchmarks/gpu_session: stages within their budgets, skipped with a reason, and a summary written as it goes."""

from __future__ import annotations

import argparse
import json
import sys
import time

import pytest

from benchmarks import gpu_session


def _session(tmp_path, monkeypatch, outcomes: dict, **overrides) -> gpu_session.Session:
    args = argparse.Namespace(
        dry_run=True,
        out=tmp_path / "out",
        work=tmp_path / "work",
        total_s=100.0,
        budget={},
        stages=list(gpu_session.STAGES),
        min_stage_s=20.0,
        python=sys.executable,
        bench_args="",
        quality_min_s=120.0,
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    args.out.mkdir()
    args.work.mkdir()
    session = gpu_session.Session(args)
    for name in gpu_session.STAGES:
        outcome = outcomes.get(name, {"status": "ok"})
        monkeypatch.setattr(session, "stage_" + name, lambda budget, outcome=outcome: dict(outcome))
    return session


def _run_all(session) -> dict:
    for name in gpu_session.STAGES:
        session.stage(name)
    return json.loads((session.out / "summary.json").read_text())


def test_a_failed_install_skips_what_needs_it_and_says_why(tmp_path, monkeypatch):
    session = _session(
        tmp_path, monkeypatch, {"install": {"status": "failed", "reason": "no DALI"}}
    )
    stages = _run_all(session)["stages"]
    assert stages["install"]["status"] == "failed"
    for name, reason in [
        ("tests", "needs install, which failed"),
        ("data", "needs install, which failed"),
        ("bench", "needs data, which skipped"),
        ("quality", "needs install, which failed"),
    ]:
        assert stages[name] == {
            "budget_s": stages[name]["budget_s"],
            "status": "skipped",
            "reason": reason,
        }
    assert stages["splitbn"]["status"] == "ok"  # needs torch only


def test_stages_not_asked_for_or_without_time_are_skipped(tmp_path, monkeypatch):
    session = _session(tmp_path, monkeypatch, {}, stages=["bench", "quality"], total_s=300.0)
    clock = {"left": 300.0}
    monkeypatch.setattr(session, "left_s", lambda: clock["left"])

    def bench(budget):  # the bench takes most of what is left
        clock["left"] = 50.0
        return {"status": "ok"}

    monkeypatch.setattr(session, "stage_bench", bench)
    stages = _run_all(session)["stages"]
    assert stages["install"]["status"] == "ok"  # always: the others need what it installs
    assert stages["tests"]["reason"] == "not asked for (--stages)"
    assert stages["bench"]["status"] == "ok"  # data was not asked for: its shards are already there
    # every stage ends inside the total: the bench's 400 s are cut to what is left, less the
    # summary's 15 s and a stopped command's grace
    assert stages["bench"]["budget_s"] == 300 - 15 - gpu_session.GRACE_S
    # quality gets what the total leaves (50 s less 35): under --min-stage-s
    assert (
        stages["quality"]["status"] == "skipped"
        and "left of the total budget" in stages["quality"]["reason"]
    )


def test_a_stage_that_raises_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    session = _session(tmp_path, monkeypatch, {})
    monkeypatch.setattr(session, "stage_splitbn", lambda budget: 1 / 0)
    summary = _run_all(session)
    assert summary["stages"]["splitbn"] == {
        "budget_s": gpu_session.BUDGETS_S["splitbn"],
        "status": "failed",
        "reason": "ZeroDivisionError: division by zero",
        "seconds": summary["stages"]["splitbn"]["seconds"],
    }
    assert summary["stages"]["quality"]["status"] == "ok"
    # What comes back from the device: plain names, one folder, at most 8 files.
    assert summary["out"] == ["session.log", "summary.json"]


def test_a_command_past_its_time_is_stopped_with_sigterm_first(tmp_path, monkeypatch):
    session = _session(tmp_path, monkeypatch, {})
    start = time.monotonic()
    code = session.run(
        [
            sys.executable,
            "-c",
            "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: (print('checkpointed', flush=True), sys.exit(0)))\n"
            "time.sleep(30)",
        ],
        timeout_s=1.0,
    )
    assert code == 124 and time.monotonic() - start < 15
    log = (session.out / "session.log").read_text()
    assert "checkpointed" in log and "exit code 0 after SIGTERM" in log


def test_bad_options_name_themselves():
    with pytest.raises(argparse.ArgumentTypeError, match="unknown benches"):
        gpu_session._stages("tests,benches")
    with pytest.raises(argparse.ArgumentTypeError, match="give STAGE=SECONDS"):
        gpu_session._budgets("bench=lots")
    assert gpu_session._budgets("bench=200,tests=60.5") == {"bench": 200.0, "tests": 60.5}
