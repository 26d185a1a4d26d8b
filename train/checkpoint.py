"""Checkpoints: the format, and the checkpointer that finds, verifies, restores and writes them.

Written atomically (a crash never leaves a truncated file under a checkpoint's name); read with
``weights_only=True`` (a pickled object that would run code is refused, never executed); trusted
only once ``check`` finds it complete with finite weights and ``weights_digest`` finds the
weights each rank wrote. ``Checkpointer`` is what the engine calls to resume and to save.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..common.files import write_atomic
from .config import Config, ConfigError, to_dict
from .distributed import Dist, on_main
from .resume import resume_changes

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "Resumed",
    "FORMAT",
    "VERSION",
    "save",
    "latest",
    "candidates",
    "load",
    "check",
    "weights_digest",
    "rng_state",
    "set_rng_state",
]

log = logging.getLogger("moco-train")

_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")
FORMAT = "moco-dali-checkpoint"
VERSION = 2
"""2: every value loadable with ``weights_only=True`` (numpy's random state as a tensor)."""
_REQUIRED = (
    "model",
    "optimizer",
    "scaler",
    "step",
    "skipped",
    "world",
    "config",
    "loader",
    "rng",
    "rank_digests",
)
_LOADER_COUNTERS = ("epoch", "step_in_epoch", "window", "window_step", "rank", "world")
"""A rank's data position (``ViewLoader.state_dict``): these counters, ``assignment`` and ``dali``."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and why."""


def save(out: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` as ``out/ckpt-STEP.pt`` atomically; delete all but the newest ``keep_last``.

    Raises:
        CheckpointError: the file cannot be written (a full disk, a read-only folder), naming
            it; no temporary file is left and the checkpoints already there are untouched.
    """
    state = {"format": FORMAT, "version": VERSION, **state}
    path = out / f"ckpt-{step:09d}.pt"
    try:
        write_atomic(path, lambda f: torch.save(state, f))
    except OSError as error:
        newest = latest(out) if out.is_dir() else None
        kept = f"the newest checkpoint is still {newest}" if newest else "no checkpoint was written"
        raise CheckpointError(
            f"{path}: cannot write the checkpoint ({error.strerror or error}); {kept}"
        ) from None
    for old in sorted(p for p in out.iterdir() if _NAME.match(p.name))[:-keep_last]:
        old.unlink()
    return path


def candidates(out: Path) -> list[Path]:
    """The checkpoints in ``out``, newest first."""
    if not out.is_dir():
        return []
    return sorted((p for p in out.iterdir() if _NAME.match(p.name)), reverse=True)


def latest(out: Path) -> Optional[Path]:
    """The newest checkpoint in ``out`` by name, or None (not verified: see ``check``)."""
    found = candidates(out)
    return found[0] if found else None


def load(path: str | os.PathLike) -> Any:
    """A checkpoint's contents, on the CPU, read without running any code it may carry.

    Raises:
        CheckpointError: the file is missing, unreadable (truncated, not a checkpoint),
            or holds pickled Python objects beyond tensors and plain values.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "WeightsUnpickler error" not in str(error):
            raise CheckpointError(
                f"{path}: not a readable checkpoint (not a pickle of tensors)"
            ) from None
        with open(
            path, "rb"
        ) as f:  # pickle protocol 2 and later open with PROTO (0x80); junk does not
            pickled = f.read(1) == b"\x80"
        if "Unsupported operand" in str(error) and not pickled:
            raise CheckpointError(
                f"{path}: not a readable checkpoint (not a pickle of tensors)"
            ) from None
        if "Unsupported operand" in str(error):  # a plain pickle.dump, not torch.save's archive
            raise CheckpointError(
                f"{path}: refused: it holds a pickled Python object stream, not torch.save's "
                "archive of tensors, and loading it could run code"
            ) from None
        found = re.search(r"Unsupported global: GLOBAL ([^\s]+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused: it holds a pickled Python object{what} beyond tensors and plain "
            "values, and loading it could run code (moco-train checkpoints from before version "
            f"{VERSION} are refused too)"
        ) from None
    except Exception as error:  # truncated, empty, not a torch file: whatever the reader says
        reason = " ".join(str(error).split())[:200] or "empty or truncated"
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(error).__name__}: {reason})"
        ) from None


def _tensors(tree: Any):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def check(state: Any, path: Path) -> dict[str, Any]:
    """``state`` if it is a complete training checkpoint of this version with finite weights; else CheckpointError."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a moco-train checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {state.get('version')}, this moco-train reads {VERSION}"
        )
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"{path}: incomplete, no {', '.join(missing)}")
    world = state["world"]
    if (
        not isinstance(world, int)
        or world < 1
        or not isinstance(state["step"], int)
        or state["step"] < 0
    ):
        raise CheckpointError(f"{path}: incomplete, world {world!r} and step {state['step']!r}")
    for key in ("loader", "rng", "rank_digests"):
        if not isinstance(state[key], list) or len(state[key]) != world:
            raise CheckpointError(
                f"{path}: incomplete, {key} does not hold one entry per rank ({world})"
            )
    for rank, position in enumerate(state["loader"]):
        _check_position(position, rank, world, path)
    if not isinstance(state["model"], dict) or not isinstance(state["optimizer"], dict):
        raise CheckpointError(f"{path}: incomplete, model or optimizer state is not a state dict")
    for name, tensor in state["model"].items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: model entry {name} is not a tensor")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: {name} holds non-finite values")
    if not all(
        bool(torch.isfinite(t).all()) for t in _tensors(state["optimizer"]) if t.is_floating_point()
    ):
        raise CheckpointError(f"{path}: the optimizer state holds non-finite values")
    return state


def _check_position(position: Any, rank: int, world: int, path: Path) -> None:
    """Rank ``rank``'s loader entry is a data position of that rank of ``world``, as the loader will read it."""
    if not isinstance(position, dict):
        raise CheckpointError(f"{path}: loader entry {rank} is not a data position")
    missing = [key for key in (*_LOADER_COUNTERS, "assignment", "dali") if key not in position]
    if missing:
        raise CheckpointError(
            f"{path}: incomplete, loader entry {rank} has no {', '.join(missing)}"
        )
    for key in _LOADER_COUNTERS:
        value = position[key]
        if type(value) is not int or value < 0:
            raise CheckpointError(f"{path}: loader entry {rank}: {key} {value!r} is not a count")
    if (position["rank"], position["world"]) != (rank, world):
        raise CheckpointError(
            f"{path}: loader entry {rank} is the data position of rank {position['rank']} of "
            f"{position['world']}, not of rank {rank} of {world}"
        )
    if not isinstance(position["assignment"], str):
        raise CheckpointError(
            f"{path}: loader entry {rank}: assignment {position['assignment']!r} is not a digest"
        )
    if not isinstance(position["dali"], (str, bytes, type(None))):
        raise CheckpointError(f"{path}: loader entry {rank}: dali is not a DALI reader checkpoint")


def weights_digest(model: torch.nn.Module) -> str:
    """What MoCo keeps identical on every rank: both encoders' parameters and the queue (sha256, float32 bytes).

    BN statistics are per rank under shuffle-BN and are left out.
    """
    h = hashlib.sha256()
    for tensor in [
        *model.encoder_q.parameters(),
        *model.encoder_k.parameters(),
        model.queue.queue,
        model.queue.queue_ptr,
    ]:
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def rng_state(device: torch.device) -> dict:
    """This process's random generators (Python, numpy, torch, CUDA) as plain values and tensors."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Put back what ``rng_state`` took."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["position"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------- the checkpointer


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
        favour) and named in the log. A checkpoint of another world size or configuration is
        refused, not skipped: the older ones were written by the same run.
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
        if state["world"] != self.dist.world:
            raise ConfigError(
                f"{path}: written by {state['world']} ranks, this run has {self.dist.world}; "
                "an exact resume needs the same world size"
            )
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
        if weights_digest(model) != state["rank_digests"][self.dist.rank]:
            raise CheckpointError(
                f"{path}: its weights or queue differ from the digest written with them "
                "(changed after it was written)"
            )
        return state, allowed

    def restore(self, state: dict, optimizer, scaler) -> tuple[int, int]:
        """Put the optimizer, the scaler and this rank's random generators back; ``(step,
        skipped)``."""
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.dist.rank], self.device)
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
