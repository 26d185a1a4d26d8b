"""Which keys of the configuration a resumed run may change from the run that wrote its checkpoint.

Keys that decide where a run lives, how fast it goes and when it looks or stops may change
(each change logged); every other key changes the state's shape or the run's meaning and is
refused, a key added to the tree later included, until it is listed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..common.options import flatten, to_dict
from .config import LEGACY_KEYS, Config

__all__ = ["SAFE_TO_CHANGE", "resume_changes"]

SAFE_TO_CHANGE = frozenset(
    {
        # when to stop, how often to look and to save: none of them is in the state
        "run.max_steps",
        "run.log_every",
        "run.ckpt_every",
        "run.keep_last",
        "run.progress",
        "run.max_nonfinite",
        "run.knn_every",
        "run.knn_k",
        "run.knn_t",
        "data.knn_train",
        "data.knn_val",
        "data.eval_resize",
        # where the run lives and how fast it goes, not what it computes
        "run.out",
        "run.resume",
        "run.device",
        "run.deterministic",
        "run.dist_timeout_s",
        "run.channels_last",
        "run.compile",  # compiled in place: the same parameters, the same arithmetic to rounding
        "run.compile_mode",
        "run.compile_backend",
        "data.threads",
        "data.prefetch",
        "data.hw_decoder_load",
        "data.view_branches",  # the same views, made another way
        # a folder in the store: where its cache lives and how many files it fetches at once;
        # a cache limit that makes other windows is refused by the loader (the data position)
        "data.cache_dir",
        "data.cache_jobs",
        "data.cache_limit",
    }
)
"""Keys a resumed run may change (each change is logged). Every other key changes the state's
shape (model.*) or the run's meaning (the data, the views, the
batch, the optimizer, the schedule over run.epochs, the precision, the seeds, the windows that
the data position counts in) and is refused; a key added to the tree later is refused until
listed here."""


def resume_changes(
    stored: dict[str, Any], config: Config
) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """``(allowed, refused)``: ``{key: (checkpoint's value, this run's value)}`` where they differ."""
    current = flatten(to_dict(config))
    before = flatten(stored) if stored else {}
    for old, new in LEGACY_KEYS.items():
        if old in before:
            before.setdefault(new, before.pop(old))
    before = {**current, **before}
    allowed, refused = {}, {}
    for key in sorted(set(current) | set(before)):
        if key == "run.resume":  # how this run was started, not what it is
            continue
        old, new = before.get(key), current.get(key)
        if key == "data.train" and old and new and Path(old).resolve() == Path(new).resolve():
            continue
        if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
            old, new = tuple(old), tuple(new)
        if old != new:
            (allowed if key in SAFE_TO_CHANGE else refused)[key] = (old, new)
    return allowed, refused
