"""Distributed set-up: the process group gets the configured timeout."""

from __future__ import annotations

from datetime import timedelta

import pytest

from moco_dali.train import distributed


def test_the_process_group_waits_as_long_as_configured(monkeypatch):
    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        distributed.dist,
        "init_process_group",
        lambda backend, **kw: joined.update(kw, backend=backend),
    )
    result = distributed.setup("cpu", timeout_s=42)
    assert (result.rank, result.world) == (1, 2)
    assert joined["backend"] == "gloo" and joined["timeout"] == timedelta(seconds=42)


def test_the_timeout_is_a_validated_run_key():
    from moco_dali.train.config import Config, ConfigError
    from moco_dali.train.presets import resolve

    with pytest.raises(ConfigError, match="run.dist_timeout_s must be at least 1, got 0"):
        resolve("v2", None, {"data.train": "x", "run.dist_timeout_s": "0"})
    assert Config().run.dist_timeout_s == 1800
