"""Pretrained query encoders out of checkpoint files, and the two layouts they are exported in.

Reads this project's checkpoints (``moco-train``'s ``ckpt-*.pt``) and the reference
MoCo code's (``main_moco.py``'s ``checkpoint_*.pth.tar``, keys ``module.encoder_q.*``),
so that ``moco-eval`` measures and exports either; both are read with
``weights_only=True`` (``train.checkpoint.load``), so a shared file that carries code
is refused, never run. Exports the query backbone (the
projection head dropped) as a plain torchvision ResNet state dict, or as the
detectron2 pickle that the reference ``convert-pretrain-to-detectron2.py`` writes,
atomically and under a lock, so two exports never write one file at once.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ...common.files import write_atomic
from ...common.lock import FolderLock
from ...model.encoders import ARCHS, add_mlp_head, resnet
from ..checkpoint import CheckpointError
from ..checkpoint import load as load_checkpoint
from ..config import Config, ConfigError, from_dict, to_dict
from ..step import build_model

__all__ = [
    "CheckpointError",
    "Pretrained",
    "load_encoder",
    "torchvision_state_dict",
    "detectron2_weights",
    "export",
    "weights_digest",
]


@dataclass
class Pretrained:
    """What a checkpoint says about its query encoder."""

    path: Path
    source: str
    """"moco-dali" or "reference"."""
    arch: str
    small_stem: bool
    mlp: bool
    dim: int
    step: Optional[int]
    config: Optional[dict]
    """The run's configuration tree, as checked by ``from_dict`` (this project's checkpoints
    only)."""


def _stored_config(stored: Any, path: Path) -> Config:
    """The run's configuration as the checkpoint stores it, typed and bounded by the tree's own
    declaration before anything is built from it (``model.dim`` 10**11 would be 800 TB)."""
    try:
        return from_dict(stored, source=str(path))
    except ConfigError as error:
        message = str(error).removeprefix(f"{path}: ")
        raise CheckpointError(f"{path}: its stored configuration: {message}") from None


def _query_weights(state: Any, path: Path) -> tuple[dict[str, torch.Tensor], Pretrained]:
    if isinstance(state, dict) and "model" in state and "config" in state:
        config = _stored_config(state["config"], path)
        model = config.model
        prefix = "encoder_q."
        # torch.compile wraps a module as ``_orig_mod``; the weights are the same.
        weights = {
            k[len(prefix) :].replace("_orig_mod.", ""): v
            for k, v in state["model"].items()
            if k.startswith(prefix)
        }
        info = Pretrained(
            path,
            "moco-dali",
            model.arch,
            model.small_stem,
            model.mlp,
            model.dim,
            state.get("step"),
            to_dict(config),
        )
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        prefix = next(
            (
                p
                for p in ("module.encoder_q.", "encoder_q.")
                if any(k.startswith(p) for k in state["state_dict"])
            ),
            None,
        )
        if prefix is None:
            raise CheckpointError(
                f"{path}: its state_dict holds no encoder_q weights; not a MoCo checkpoint"
            )
        weights = {
            k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)
        }
        mlp = "fc.0.weight" in weights
        head = weights.get("fc.2.weight" if mlp else "fc.weight")
        conv1 = weights.get("conv1.weight")
        if head is None or conv1 is None:
            raise CheckpointError(
                f"{path}: encoder_q has no conv1 or fc weights; not a ResNet MoCo checkpoint"
            )
        info = Pretrained(
            path,
            "reference",
            state.get("arch", "resnet50"),
            conv1.shape[-1] == 3,
            mlp,
            head.shape[0],
            state.get("epoch"),
            None,
        )
    else:
        raise CheckpointError(
            f"{path}: neither a moco-train checkpoint nor a reference MoCo checkpoint"
        )
    if not weights:
        raise CheckpointError(f"{path}: holds no query-encoder weights")
    return weights, info


def load_encoder(
    path: str | os.PathLike, arch: Optional[str] = None, random_init: bool = False
) -> tuple[nn.Module, Pretrained]:
    """The query encoder (with its head) of a checkpoint, on the CPU, in eval mode.

    ``arch``: the architecture the caller expects; a checkpoint of another one is an
    error. ``random_init``: the same encoder as the run's step 0 (this project's
    checkpoints only: built from the stored configuration and seed), for baselines.
    """
    path = Path(path)
    try:
        weights, info = _query_weights(load_checkpoint(path), path)
    except (
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
    ) as error:  # plain values, but not where we look
        raise CheckpointError(
            f"{path}: malformed checkpoint ({type(error).__name__}: {error})"
        ) from None
    if arch is not None and arch != info.arch:
        raise CheckpointError(f"{path}: a {info.arch} checkpoint, not {arch}")
    if info.arch not in ARCHS:
        raise CheckpointError(
            f"{path}: architecture {info.arch!r} is not one of {', '.join(ARCHS)}"
        )
    if random_init:
        if info.config is None:
            raise CheckpointError(
                f"{path}: --random-init needs a moco-train checkpoint (it rebuilds the run's step 0)"
            )
        config = from_dict(info.config, source=str(path))
        config.run.channels_last = False
        torch.manual_seed(config.run.seed)  # as the engine does before building the model
        encoder = build_model(config, torch.device("cpu")).encoder_q
        return encoder.eval(), info
    encoder = resnet(info.arch, small_stem=info.small_stem)(num_classes=info.dim)
    if info.mlp:
        add_mlp_head(encoder)
    try:
        missing, unexpected = encoder.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        first = next(
            (line.strip() for line in str(exc).splitlines() if "size mismatch" in line),
            str(exc)[:200],
        )
        raise CheckpointError(f"{path}: weights do not fit {info.arch}: {first}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit {info.arch}: {len(missing)} missing "
            f"({', '.join(missing[:2])}), {len(unexpected)} unexpected ({', '.join(unexpected[:2])})"
        )
    return encoder.eval(), info


def torchvision_state_dict(encoder: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The backbone as torchvision names it, without ``fc``: loads with strict=True once fc is Identity."""
    return OrderedDict(
        (k, v.detach().clone()) for k, v in encoder.state_dict().items() if not k.startswith("fc.")
    )


def detectron2_weights(encoder: nn.Module) -> dict[str, Any]:
    """The reference conversion's layout: ``stem.conv1``, ``res2``-``res5``, ``convN.norm``, ``shortcut``.

    As ``moco/detection/convert-pretrain-to-detectron2.py`` names them, numpy arrays in
    ``{"model": ..., "__author__": "MOCO", "matching_heuristics": True}``. The
    projection head (which that script carries along as ``stem.fc.*`` and detectron2
    then ignores) is left out.
    """
    weights = {}
    for key, value in torchvision_state_dict(encoder).items():
        name = key if "layer" in key else "stem." + key
        for i in (1, 2, 3, 4):
            name = name.replace(f"layer{i}", f"res{i + 1}")
        for i in (1, 2, 3):
            name = name.replace(f"bn{i}", f"conv{i}.norm")
        name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        weights[name] = value.numpy()
    return {"model": weights, "__author__": "MOCO", "matching_heuristics": True}


def export(encoder: nn.Module, fmt: str, out: str | os.PathLike) -> Path:
    """Write the backbone as ``fmt`` ("torchvision" or "detectron2") to ``out``, atomically.

    Raises ``ValueError`` naming ``out`` when it cannot be written (a folder, a read-only
    place, a full disk) or another export is writing it (``FolderInUse``, the lock file
    ``.NAME.lock`` beside it); no temporary file is left behind.
    """
    out = Path(out)
    if fmt == "torchvision":
        payload, dump = torchvision_state_dict(encoder), torch.save
    elif fmt == "detectron2":
        payload, dump = detectron2_weights(encoder), pickle.dump
    else:
        raise ValueError(f"--format {fmt!r}: choose torchvision or detectron2")
    if out.is_dir():
        raise ValueError(f"--out {out}: a folder; give the file to write")
    try:
        with FolderLock(
            out.with_name(f".{out.name}.lock"), "moco-eval export", "--out", create=True
        ):
            write_atomic(out, lambda f: dump(payload, f))
    except OSError as error:
        reason = error.strerror or os.strerror(error.errno or errno.EIO)
        raise ValueError(f"--out {out}: cannot write ({reason})") from None
    return out


def weights_digest(module: nn.Module) -> str:
    """sha256 over a module's state (parameters and buffers), to prove it did not change."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        h.update(
            value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            if value.numel()
            else b""
        )
    return h.hexdigest()
