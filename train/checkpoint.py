"""Checkpoints: the format, written whole and read back checked (``checkpointer.py`` uses it).

Written atomically (a crash never leaves a truncated file under a checkpoint's name); read with
``weights_only=True`` (a pickled object that would run code is refused, never executed); trusted
only once ``check`` finds it complete with finite weights and ``weights_digest`` finds the
weights each rank wrote.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..common.files import MAX_DEPTH, too_deep, write_atomic

__all__ = [
    "CheckpointError",
    "FORMAT",
    "VERSION",
    "save",
    "latest",
    "candidates",
    "load",
    "check",
    "check_optimizer_state",
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
            or holds pickled Python objects beyond tensors and plain values, or a tensor
            declaring more elements than its storage holds, or nests deeper than MAX_DEPTH.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
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
    _check_tensors(value, path)
    return value


def _named_tensors(tree: Any):
    """(where, tensor) for every tensor in ``tree``, in a loop (a file's nesting is not our stack)."""
    stack = [("", tree)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, torch.Tensor):
            yield where or "(top)", value
        elif isinstance(value, dict):
            stack += [(f"{where}.{key}" if where else str(key), v) for key, v in value.items()]
        elif isinstance(value, (list, tuple)):
            stack += [(f"{where}[{i}]", v) for i, v in enumerate(value)]


def _tensors(tree: Any):
    return (tensor for _, tensor in _named_tensors(tree))


def _check_tensors(value: Any, path: Path) -> None:
    """Every tensor holds the elements its shape declares. A shape over a smaller storage (strides
    of 0 declaring 10**12 numbers over one) loads as a view, and the first copy, cast or check of
    it (a move to the GPU, ``isfinite``) would allocate what it declares."""
    if too_deep(value):
        raise CheckpointError(f"{path}: refused: nested deeper than {MAX_DEPTH} levels")
    for where, tensor in _named_tensors(value):
        declared = tensor.numel() * tensor.element_size()
        held = tensor.untyped_storage().nbytes()
        if declared > held:
            raise CheckpointError(
                f"{path}: refused: {where} declares shape {tuple(tensor.shape)} ({declared} "
                f"bytes) over a storage of {held} bytes"
            )


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


def check_optimizer_state(saved: Any, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """A stored optimizer state that fits ``optimizer``: its groups hold as many parameters,
    and every per-parameter tensor (a momentum buffer) has its parameter's shape.

    The weights and the queue are covered by the digest written with them; the optimizer's
    state is not, and ``load_state_dict`` takes a buffer of the right size in the wrong shape,
    to fail in the first step's arithmetic.
    """
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    state = saved.get("state") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: its optimizer state is not an optimizer's state_dict")
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{path}: its optimizer has {len(groups)} parameter groups, this run's "
            f"{len(optimizer.param_groups)}"
        )
    for number, (group, live) in enumerate(zip(groups, optimizer.param_groups)):
        ids = group.get("params") if isinstance(group, dict) else None
        if not isinstance(ids, list) or len(ids) != len(live["params"]):
            raise CheckpointError(
                f"{path}: optimizer group {number} holds {len(ids or [])} parameters, this run's "
                f"{len(live['params'])}"
            )
        for index, param in zip(ids, live["params"]):
            for name, value in (state.get(index) or {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    raise CheckpointError(
                        f"{path}: optimizer.state.{index}.{name} has shape "
                        f"{tuple(value.shape)}, its parameter {tuple(param.shape)}"
                    )


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
