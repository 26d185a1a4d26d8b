"""The whole configuration checked before any work, against the rules of the classes a run builds.

``validate`` builds from the tree what a run builds: the view recipe
(``AugmentConfig``), the loader's settings (``LoaderConfig``), the evaluation view of
the kNN monitor (``EvalConfig``), the model and its optimizer (on PyTorch's meta
device: no memory, no arithmetic) and the schedules. A ``ValueError`` of any of them
becomes a ``ConfigError`` naming the key at fault, so the rules live once, in the
classes. Written here are only the rules no class holds: combinations of keys with
each other or with the world size, choices looked up in tables, folders and files.
``augment_config``, ``loader_config`` and ``resolve_views`` are the builders the engine
itself uses, so a run and its check cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from .config import Config, ConfigError, ModelConfig, OptimConfig, ViewsConfig

__all__ = [
    "validate",
    "augment_config",
    "loader_config",
    "resolve_views",
    "shuffle_mode",
    "check_train_folder",
    "check_knn_folders",
    "check_out",
]

T = TypeVar("T")
_BUILD_ERRORS = (ValueError, OverflowError, RuntimeError)
"""What a constructor raises for arguments it refuses (RuntimeError: a tensor too large even for the meta device)."""


def _say(key: str, value: Any, error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    return (
        f"{key}: {message}"
        if repr(value) in message or str(value) in message
        else f"{key} {value!r}: {message}"
    )


def _construct(build: Callable[..., T], given: dict[str, tuple[str, Any]], alone: bool = True) -> T:
    """``build(**values)`` for ``given = {argument: (key, value)}``; its refusal names the key at fault.

    With ``alone``, each value is tried alone on ``build``'s defaults; the first one
    refused alone is named, with the refusal it gets beside the values that pass alone
    (so the message shows the user's values). Otherwise, or if only the combination is
    refused, all keys are named.
    """
    values = {name: value for name, (_, value) in given.items()}
    try:
        return build(**values)
    except _BUILD_ERRORS as error:
        if alone:
            refused_alone = {}
            for name, value in values.items():
                try:
                    build(**{name: value})
                except _BUILD_ERRORS as refused:
                    refused_alone[name] = refused
            if refused_alone:
                name = next(iter(refused_alone))
                passing = {
                    other: value for other, value in values.items() if other not in refused_alone
                }
                try:
                    build(**passing, **{name: values[name]})
                    reason = refused_alone[name]
                except _BUILD_ERRORS as refused:
                    reason = refused
                raise ConfigError(_say(given[name][0], values[name], reason)) from None
        keys = " and ".join(f"{key} {value!r}" for key, value in given.values())
        raise ConfigError(f"{keys}: {' '.join(str(error).split())}") from None


# ----------------------------------------------------------------------- builders the engine uses


def augment_config(config: Config):
    """The ``AugmentConfig`` of ``data.preset`` at ``data.size`` with the ``data.views`` keys that are set."""
    from ..pipeline import augment

    d = config.data
    given = {"name": ("data.preset", d.preset), "size": ("data.size", d.size)}
    given.update(
        {
            name: (f"data.views.{name}", value)
            for name, value in dataclasses.asdict(d.views).items()
            if value is not None
        }
    )
    return _construct(
        lambda name="v2", size=224, **fields: augment.preset(name, size, **fields), given
    )


def resolve_views(config: Config) -> Config:
    """Fill every unset ``data.views`` key with its value in ``data.preset``'s recipe (in place)."""
    recipe = augment_config(config)
    for leaf in dataclasses.fields(ViewsConfig):
        if getattr(config.data.views, leaf.name) is None:
            setattr(config.data.views, leaf.name, getattr(recipe, leaf.name))
    return config


def loader_config(config: Config, world: int, amp: torch.dtype | None):
    """The ``LoaderConfig`` of one rank of ``world`` under the autocast dtype ``amp``."""
    from ..pipeline.loader import LoaderConfig
    from .step import views_dtype

    d, r = config.data, config.run
    return _construct(
        LoaderConfig,
        {
            "batch_size": ("data.batch_size", d.batch_size // world),
            "dtype": ("data.dtype", views_dtype(d.dtype, amp)),
            "seed": ("run.seed", r.seed),
            "threads": ("data.threads", d.threads or None),
            "shuffle_buffer": ("data.shuffle_buffer", d.shuffle_buffer),
        },
    )


def shuffle_mode(config: Config, world: int) -> str:
    """The shuffle-BN mode ``model.shuffle`` means in a run of ``world`` ranks ("auto" as MoCo resolves it)."""
    if config.model.shuffle == "auto":
        return "ddp" if world > 1 else "split"
    return config.model.shuffle


# ----------------------------------------------------------------------- the model, on the meta device


@functools.lru_cache(maxsize=8)
def _meta_model(fields: tuple):
    from .step import build_model

    config = Config()
    config.model = ModelConfig(**dict(fields))
    config.run.channels_last = False
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "zero-element tensors": dim 0 is refused just after
        return build_model(config, torch.device("meta"))


def _model(config: Config, world: int):
    m = config.model
    given = {
        leaf.name: (f"model.{leaf.name}", getattr(m, leaf.name))
        for leaf in dataclasses.fields(ModelConfig)
    }
    if world > 1 and m.shuffle in ("auto", "ddp", "syncbn"):
        # What these modes need, a process group, exists only inside the run (which
        # builds the real model); here they are checked by the rules below.
        given["shuffle"] = ("model.shuffle", "none")

    def build(**fields):
        return _meta_model(tuple(sorted({"arch": "resnet18", **fields}.items())))

    return _construct(build, given)


def _optimizer(config: Config, model) -> None:
    from .step import build_optimizer

    o = config.optim
    names = ("name", "lr_per_256", "momentum", "weight_decay", "trust_coefficient")

    def build(**fields):
        trial = Config()
        trial.optim = dataclasses.replace(OptimConfig(name=config.optim.name), **fields)
        trial.data.batch_size = config.data.batch_size
        with torch.device("meta"):
            build_optimizer(trial, model, torch.device("meta"))

    _construct(build, {name: (f"optim.{name}", getattr(o, name)) for name in names})


# ----------------------------------------------------------------------- validate


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} must be at least {low}, got {value}")


def _folder_for_writing(key: str, path: str) -> None:
    """``path`` is a folder, or can become one: no file in the way, and the nearest existing folder is writable."""
    try:
        target = Path(path)
        if target.exists() and not target.is_dir():
            raise ConfigError(f"{key} {path}: a file, not a folder")
        ancestor = target.absolute()
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ConfigError(f"{key} {path}: {ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(f"{key} {path}: {ancestor} is not writable")
    except ConfigError:
        raise
    except (OSError, ValueError) as error:  # too long, unencodable
        raise ConfigError(f"{key} {path!r}: {getattr(error, 'strerror', None) or error}") from None


def _choices(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} {value!r}: choose {', '.join(choices)}")


def validate(config: Config, world: int, cuda: bool) -> Config:
    """Refuse a configuration that cannot run in ``world`` ranks (``cuda``: a GPU is there), before any work.

    Returns the configuration with its ``data.views`` resolved. Raises ``ConfigError``
    with one line naming the key (or keys) at fault.
    """
    from ..model.momentum import momentum_at
    from ..pipeline.augment import EvalConfig
    from .schedule import learning_rates
    from .step import AMP_DTYPES, QUEUE_DTYPES, amp_dtype

    d, m, o, r = config.data, config.model, config.optim, config.run
    if not d.train:
        raise ConfigError("data.train: give the shard folder to pretrain on (--data.train DIR)")
    _choices("run.device", r.device, ("auto", "cpu", "cuda"))
    if r.device == "cuda" and not cuda:
        raise ConfigError("run.device cuda: no CUDA GPU here")
    _choices("run.amp", r.amp, ("auto", *AMP_DTYPES))
    if r.amp == "fp16" and not cuda:
        raise ConfigError("run.amp fp16 needs a CUDA GPU; use bf16 or none on a CPU")
    _choices("model.queue_dtype", m.queue_dtype, tuple(QUEUE_DTYPES))
    for key, value, low in (
        ("data.threads", d.threads, 0),
        ("run.epochs", r.epochs, 1),
        ("run.max_steps", r.max_steps, 0),
        ("run.log_every", r.log_every, 1),
        ("run.ckpt_every", r.ckpt_every, 1),
        ("run.keep_last", r.keep_last, 1),
        ("run.max_nonfinite", r.max_nonfinite, 1),
        ("run.dist_timeout_s", r.dist_timeout_s, 1),
        ("run.knn_every", r.knn_every, 0),
        ("run.knn_k", r.knn_k, 1),
        ("model.shuffle_group_size", m.shuffle_group_size, 0),
        ("run.seed", r.seed, 0),
    ):
        _at_least(key, value, low)
    # numpy's global generator takes seed + rank, which must stay below 2**32: 2**31 leaves room for any world
    # size. The views' DALI seeds come from SeedSequence([seed, epoch, rank, window]), which takes any size.
    if r.seed >= 2**31:
        raise ConfigError(f"run.seed must be below 2**31, got {r.seed}")
    if d.batch_size % world:
        raise ConfigError(
            f"data.batch_size {d.batch_size} is not divisible by the world size {world}"
        )

    # The classes' own rules: views, loader, model, optimizer, schedules.
    resolve_views(config)
    device = torch.device("cuda" if cuda else "cpu")
    amp = amp_dtype(r.amp, device)
    loader = loader_config(config, world, amp)
    if loader.dtype == "float16" and amp is None:
        raise ConfigError(
            f"data.dtype {d.dtype} gives float16 views, which a float32 model (run.amp {r.amp} resolves "
            "to none here) cannot take; use data.dtype float32 or auto, or run.amp bf16"
        )
    model = _model(config, world)
    _optimizer(config, model)
    if not o.lr_per_256 > 0:
        raise ConfigError(f"optim.lr_per_256 must be positive, got {o.lr_per_256}")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {o.momentum}")
    if o.warmup_epochs < 0 or any(epoch < 0 for epoch in o.milestones):
        raise ConfigError(
            f"optim.warmup_epochs and optim.milestones are epochs >= 0, got {o.warmup_epochs} and "
            f"{o.milestones}"
        )
    _construct(
        lambda schedule: learning_rates(1.0, 1, 1, schedule, o.milestones, o.warmup_epochs),
        {"schedule": ("optim.schedule", o.schedule)},
    )
    _construct(
        lambda schedule: momentum_at(0, 1, m.m, schedule),
        {"schedule": ("model.momentum_schedule", m.momentum_schedule)},
    )

    # Combinations of keys, and the world.
    per_step_keys = d.batch_size * (2 if m.symmetric else 1)
    if m.K < per_step_keys:
        raise ConfigError(
            f"model.K {m.K} is smaller than the keys enqueued per step ({per_step_keys}, from "
            f"data.batch_size{' and model.symmetric' if m.symmetric else ''}); raise K"
        )
    per_rank = d.batch_size // world
    mode = shuffle_mode(config, world)
    if mode == "split" and m.num_splits > 1:
        if per_rank % m.num_splits:
            raise ConfigError(
                f"model.num_splits {m.num_splits} does not divide the batch of a rank ({per_rank}: "
                f"data.batch_size {d.batch_size} over {world} rank(s))"
            )
        if per_rank // m.num_splits < 2:
            raise ConfigError(
                f"model.num_splits {m.num_splits} leaves {per_rank // m.num_splits} sample per split of "
                f"the batch of a rank ({per_rank}); split BN needs at least 2: raise data.batch_size or "
                "lower model.num_splits"
            )
    if mode == "ddp" and world > 1:
        group = m.shuffle_group_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if world % group:
            raise ConfigError(
                f"model.shuffle_group_size {group} does not divide the world size {world}"
            )

    # The kNN monitor and the files.
    if bool(d.knn_train) != bool(d.knn_val):
        raise ConfigError(
            "data.knn_train and data.knn_val go together (both labelled shard folders, or neither)"
        )
    if d.knn_train:
        if not r.knn_t > 0:
            raise ConfigError(f"run.knn_t must be positive, got {r.knn_t}")
        _construct(
            EvalConfig,
            {"resize": ("data.eval_resize", d.eval_resize), "size": ("data.size", d.size)},
            alone=False,
        )
    _folder_for_writing("run.out", r.out)
    if r.resume not in ("", "auto"):
        try:
            found = Path(r.resume).is_file()
        except (OSError, ValueError):
            found = False
        if not found:
            raise ConfigError(f"run.resume {r.resume}: no such checkpoint")
    return config


def check_train_folder(config: Config, world: int) -> None:
    """``data.train`` is a shard folder whose manifest reads, holding a whole batch for every rank of ``world``.

    Known before any checkpoint is touched or any model built. Reads the manifest only
    (O(shards)); the shards and their indexes are opened by the loader, each by the
    rank dealt it.
    """
    from ..pipeline import partition
    from ..pipeline.loader import LoaderConfig
    from ..pipeline.shards import ShardError, load_manifest

    d = config.data
    try:
        counts = load_manifest(d.train).counts
    except ShardError as error:
        raise ConfigError(f"data.train: {error}") from None
    samples = int(counts.sum())
    if not len(counts):
        raise ConfigError(f"data.train {d.train}: the manifest lists no shards")
    # The loader's own rule (whole batches, shards dealt whole, windows of shards), from the counts alone.
    loader = LoaderConfig()
    per_window = partition.shards_per_window(
        counts, loader.max_window_samples, loader.max_window_shards
    )
    if partition.steps_per_epoch(counts, world, d.batch_size // world, per_window) >= 1:
        return
    if world == 1:
        raise ConfigError(
            f"data.batch_size {d.batch_size} is larger than the {samples} samples of data.train "
            f"{d.train}: use a smaller batch or more samples"
        )
    raise ConfigError(
        f"data.batch_size {d.batch_size} leaves a rank of {world} no whole batch of {d.batch_size // world} "
        f"per epoch in data.train {d.train} ({samples} samples in {len(counts)} shards dealt "
        "whole to the ranks); use fewer ranks or a smaller batch, or build smaller shards"
    )


def check_knn_folders(config: Config) -> None:
    """The kNN monitor's folders exist and hold labelled shards of the same classes: known at start, not after an epoch.

    Reads the two manifests only (O(shards)).
    """
    from ..pipeline.shards import ShardError, load_manifest

    d = config.data
    if not (d.knn_train and config.run.knn_every):
        return
    classes = {}
    for key, folder in (("data.knn_train", d.knn_train), ("data.knn_val", d.knn_val)):
        try:
            classes[key] = load_manifest(folder).classes
        except ShardError as error:
            raise ConfigError(f"{key}: {error}") from None
        if not classes[key]:
            raise ConfigError(
                f"{key} {folder}: the kNN monitor needs labelled shards (build with --labels folder)"
            )
    if classes["data.knn_train"] != classes["data.knn_val"]:
        raise ConfigError(
            f"data.knn_train and data.knn_val hold different classes ({len(classes['data.knn_train'])} "
            f"and {len(classes['data.knn_val'])}, or in another order); the kNN monitor needs the same "
            "labels on both"
        )


def check_out(out: Path) -> None:
    """``run.out`` can be written: made if need be, and a file made and removed in it."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ConfigError(
            f"run.out {out}: cannot write there ({error.strerror or error})"
        ) from None
