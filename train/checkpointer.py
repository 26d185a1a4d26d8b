"""The checkpointer: which checkpoint a run continues from (found, verified, restored) and
writing the next, every rank's state gathered; the format itself is ``checkpoint.py``'s."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import (
    CheckpointError,
    candidates,
    check,
    check_optimizer_state,
    latest,
    load,
    rng_state,
    save,
    set_rng_state,
    weights_digest,
)
from .config import Config, ConfigError, to_dict
from .distributed import Dist, on_main
from .resume import resume_changes

__all__ = ["Checkpointer", "Resumed"]

log = logging.getLogger("moco-train")


@dataclass
class Resumed:
    """What a run continues from: the checkpoint, its state, the allowed keys changed since."""

    path: Optional[Path] = None
    state: Optional[dict] = None
    changes: dict = field(default_factory=dict)


class Checkpointer:
    """A run's checkpoints in ``run.out``: which one to continue from, and writing the next.

    Every rank reads and verifies the checkpoint itself (its own weights digest, its own data
    position); rank 0 writes, after gathering every rank's loader and random states.
    """

    def __init__(self, config: Config, dist: Dist, device: torch.device):
        self.config, self.dist, self.device = config, dist, device
        self.out = Path(config.run.out)
        self.last_good: Optional[Path] = None
        """The newest checkpoint known good: resumed from, or written."""

    def resume(self, model: torch.nn.Module) -> Resumed:
        """The checkpoint to continue from, verified, its weights loaded into ``model``.

        With ``run.resume auto`` a checkpoint that fails verification is skipped for the next
        older one, renamed ``*.pt.bad`` (so that rotation never deletes a good one in its
        favour) and named in the log. A checkpoint of a refused configuration change is refused,
        not skipped: the older ones were written by the same run. One of another world size is
        resumed (the loader deals the rest of its epoch anew).
        """
        r = self.config.run
        if not r.resume:
            newest = latest(self.out)
            if newest is not None:
                raise ConfigError(
                    f"run.out {self.out} holds a run (newest {newest.name}): continue it with "
                    "--run.resume auto, or give another run.out"
                )
            return Resumed()
        found = candidates(self.out) if r.resume == "auto" else [Path(r.resume)]
        chosen, skipped = Resumed(), []
        for path in found:
            try:
                state, changes = self._verified(path, model)
                chosen = Resumed(path, state, changes)
                break
            except CheckpointError as error:
                if r.resume != "auto":
                    raise
                skipped.append((path, str(error)))
        if self.dist.world > 1:  # every rank read the files itself: they must agree
            chosen_by_rank = [None] * self.dist.world
            torch.distributed.all_gather_object(chosen_by_rank, str(chosen.path))
            if len(set(chosen_by_rank)) > 1:
                raise CheckpointError(
                    f"run.resume auto: ranks found different good checkpoints ({chosen_by_rank})"
                )
        if self.dist.main:
            for path, why in skipped:
                path.rename(path.with_name(path.name + ".bad"))
                log.warning("skipped %s (renamed *.bad): %s", path.name, why)
        if skipped and chosen.path is None:
            raise CheckpointError(
                f"run.resume auto: no good checkpoint in {self.out}; skipped {len(skipped)}, "
                f"newest: {skipped[0][1]}"
            )
        self.last_good = chosen.path
        return chosen

    def _verified(self, path: Path, model: torch.nn.Module) -> tuple[dict, dict]:
        """A checkpoint's state once it is known good, loaded into ``model``; the keys changed."""
        state = check(load(path), path)
        allowed, refused = resume_changes(state["config"], self.config)
        if refused:
            listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in refused.items())
            raise ConfigError(
                f"{path}: written with another configuration: {listed}; these keys change the "
                "run's state or meaning: resume with the checkpoint's values, or start another "
                "run.out"
            )
        # Runs of the version that wrapped compiled encoders saved them under "_orig_mod.".
        weights = {k.replace("._orig_mod.", "."): v for k, v in state["model"].items()}
        try:
            model.load_state_dict(weights)
        except RuntimeError as error:
            first = next(
                (line.strip() for line in str(error).splitlines()[1:] if line.strip()),
                str(error)[:200],
            )
            raise CheckpointError(f"{path}: its weights do not fit this model: {first}") from None
        # Every rank holds the same weights and queue: a new rank checks against an old one's.
        if weights_digest(model) != state["rank_digests"][self.dist.rank % state["world"]]:
            raise CheckpointError(
                f"{path}: its weights or queue differ from the digest written with them "
                "(changed after it was written)"
            )
        return state, allowed

    def restore(self, state: dict, optimizer, scaler) -> tuple[int, int]:
        """Put the optimizer, the scaler and this rank's random generators back; ``(step,
        skipped)``."""
        check_optimizer_state(state["optimizer"], optimizer, self.last_good)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        # On another world size rank r continues old rank r % old world's generators.
        set_rng_state(state["rng"][self.dist.rank % state["world"]], self.device)
        return state["step"], state["skipped"]

    def save(self, step: int, skipped: int, model, optimizer, scaler, loader_state: dict) -> None:
        """Every rank's loader and random state, gathered; the checkpoint written by rank 0."""
        gathered = {
            "loader": loader_state,
            "rng": rng_state(self.device),
            "digest": weights_digest(model),
        }
        parts = [gathered]
        if self.dist.world > 1:
            parts = [None] * self.dist.world
            torch.distributed.all_gather_object(parts, gathered)
        # Rank 0 writes; every rank waits for it and stops with its error when the write fails
        # (a full disk), rather than wait for it in the next step's collectives.
        written = on_main(
            self.dist, lambda: self._write(step, skipped, model, optimizer, scaler, parts)
        )
        if written is not None:
            self.last_good = written

    def _write(self, step: int, skipped: int, model, optimizer, scaler, parts: list) -> Path:
        """The checkpoint of ``parts`` (every rank's gathered state), on rank 0."""
        written = save(
            self.out,
            step,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "skipped": skipped,
                "world": self.dist.world,
                "config": to_dict(self.config),
                "loader": [p["loader"] for p in parts],
                "rng": [p["rng"] for p in parts],
                "rank_digests": [p["digest"] for p in parts],
            },
            self.config.run.keep_last,
        )
        if len({p["digest"] for p in parts}) > 1:
            log.warning(
                "step %d: ranks disagree on weights or queue (digests %s)",
                step,
                [p["digest"][:8] for p in parts],
            )
        return written
