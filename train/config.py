"""The training configuration: one typed tree of dataclasses, presets, and how it is set.

Every leaf is settable from the command line (``--optim.lr_per_256 0.06``,
``--data.views.jitter_p 0.8``) and from a TOML or YAML file (``--config run.toml``,
sections named like the tree, ``[data.views]`` included); command-line values win over
the file, the file over the preset. Unknown keys and wrong types raise ``ConfigError``
here; the values' rules are the classes' own, checked by ``train.validation.validate``.
Which keys a resumed run may change is decided here too (``SAFE_TO_CHANGE``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "ConfigError",
    "ViewsConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "Config",
    "PRESETS",
    "preset",
    "apply_overrides",
    "unknown_key",
    "load_file",
    "to_dict",
    "from_dict",
    "flat_fields",
    "flatten",
    "SAFE_TO_CHANGE",
    "resume_changes",
]


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key and why."""


@dataclass
class ViewsConfig:
    """The view recipe: ``pipeline.augment.AugmentConfig``'s fields (its rules, its units).

    Unset (None) takes the value of ``data.preset``'s recipe; the resolved values are
    what config.json and checkpoints hold. Hue is in turns, as torchvision's.
    """

    crop_scale: Optional[tuple[float, ...]] = None
    """RandomResizedCrop area fraction (min, max)."""
    crop_ratio: Optional[tuple[float, ...]] = None
    """RandomResizedCrop aspect ratio (min, max), drawn log-uniformly."""
    jitter: Optional[tuple[float, ...]] = None
    """ColorJitter brightness, contrast, saturation, hue (hue in turns, <= 0.5)."""
    jitter_p: Optional[float] = None
    """Probability of ColorJitter."""
    gray_p: Optional[float] = None
    """Probability of grayscale."""
    gray_before_jitter: Optional[bool] = None
    """v1's order (grey, then jitter); v2 jitters first."""
    hue_space: Optional[str] = None
    """hsv (exact, as torchvision) or yiq (DALI's operator, cheaper on a CPU)."""
    blur_p: Optional[float] = None
    """Probability of Gaussian blur."""
    blur_sigma: Optional[tuple[float, ...]] = None
    """Gaussian blur sigma range (min, max) in px."""
    flip_p: Optional[float] = None
    """Probability of a horizontal flip."""
    mean: Optional[tuple[float, ...]] = None
    """Normalisation mean per RGB channel, in [0, 1] units."""
    std: Optional[tuple[float, ...]] = None
    """Normalisation std per RGB channel, in [0, 1] units."""


@dataclass
class DataConfig:
    train: str = ""
    """Shard folder to pretrain on (written by moco-shards build)."""
    knn_train: str = ""
    """Labelled shard folder for the kNN monitor's memory bank ("" = off)."""
    knn_val: str = ""
    """Labelled shard folder the kNN monitor classifies ("" = off)."""
    preset: str = "v1"
    """Augmentation recipe the unset ``data.views`` keys come from: v1, v2 or cifar (v2 without blur)."""
    size: int = 224
    """View size in px."""
    eval_resize: int = 256
    """kNN monitor: shorter side before the centre crop of ``size``."""
    batch_size: int = 256
    """Global batch (all ranks together)."""
    dtype: str = "auto"
    """View dtype: float16, float32, or auto (float16 with AMP on a GPU, else float32)."""
    threads: int = 0
    """DALI CPU threads per rank (0: the cores per local rank)."""
    shuffle_buffer: int = 4096
    """Samples in the shuffle buffer."""
    views: ViewsConfig = field(default_factory=ViewsConfig)
    """The view recipe, field by field (``data.views.jitter_p`` ...)."""


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    """torchvision ResNet family member."""
    small_stem: bool = False
    """3x3 stem without max-pool, for 32-64 px images."""
    dim: int = 128
    """Feature dimension."""
    K: int = 65536
    """Queue size."""
    m: float = 0.999
    """Key encoder momentum."""
    momentum_schedule: str = "constant"
    """constant, or cosine from m to 1."""
    T: float = 0.07
    """Softmax temperature."""
    mlp: bool = False
    """MoCo v2's MLP head."""
    symmetric: bool = False
    """Both views as queries, loss averaged."""
    shuffle: str = "auto"
    """Shuffle-BN mode: auto, ddp, split, syncbn, none."""
    num_splits: int = 8
    """Sub-batches of split BN."""
    shuffle_group_size: int = 0
    """Ranks per shuffle group (0: one node)."""
    queue_dtype: str = "float32"
    """Queue storage: float32, float16 or bfloat16."""


@dataclass
class OptimConfig:
    name: str = "sgd"
    """sgd (fused on a GPU, foreach on a CPU) or lars (trust ratio per weight tensor; no decay on 1-d ones)."""
    lr_per_256: float = 0.03
    """Learning rate per 256 images of global batch (scaled linearly)."""
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    """step (x0.1 at the milestones) or cosine."""
    milestones: tuple = (120, 160)
    """Epochs at which the step schedule multiplies the rate by 0.1."""
    warmup_epochs: float = 0.0
    """Linear warm-up from 0, in epochs."""
    trust_coefficient: float = 0.001
    """LARS: the update of a weight tensor is scaled to this fraction of its norm."""


@dataclass
class RunConfig:
    epochs: int = 200
    max_steps: int = 0
    """Stop after this many steps in all (0: run all epochs)."""
    amp: str = "auto"
    """bf16, fp16 (with a gradient scaler), none, or auto (bf16 on a GPU that has it, else none)."""
    channels_last: bool = True
    compile: bool = False
    """torch.compile the encoders."""
    seed: int = 0
    """Seeds weights, queue, views and shard order (0 <= seed < 2**31)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    deterministic: bool = False
    """Deterministic kernels (cuDNN, cuBLAS, torch.use_deterministic_algorithms): bit-exact resume on a GPU, slower.
    Off: cuDNN picks the fastest convolution for the fixed shapes (cudnn.benchmark)."""
    out: str = "runs/moco"
    """Folder for checkpoints, config, metrics.jsonl and TensorBoard events."""
    resume: str = ""
    """"auto" (newest complete checkpoint in out, if any) or a checkpoint path."""
    log_every: int = 50
    """Steps between metric lines (each costs one host sync)."""
    ckpt_every: int = 1000
    """Steps between checkpoints (and one at every epoch end)."""
    keep_last: int = 3
    """Checkpoints kept."""
    knn_every: int = 10
    """Epochs between kNN monitor runs (0: off)."""
    knn_k: int = 200
    knn_t: float = 0.1
    max_nonfinite: int = 10
    """Stop after this many non-finite losses in a row."""
    progress: bool = True
    """Progress bar on rank 0."""
    dist_timeout_s: int = 1800
    """Seconds a collective (all-reduce, gather, barrier) waits for the slowest rank before the run fails."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ----------------------------------------------------------------------- presets


def _v1() -> Config:
    """MoCo v1: ResNet-50, fc head, T 0.07, step schedule at 120 and 160 of 200 epochs."""
    return Config()


def _v2() -> Config:
    """MoCo v2: as v1 with T 0.2, the MLP head, a cosine schedule and the v2 augmentations."""
    config = Config()
    config.model.T, config.model.mlp = 0.2, True
    config.optim.schedule = "cosine"
    config.data.preset = "v2"
    return config


def _small() -> Config:
    """Small images (Fashion-MNIST, CIFAR): the reference small-scale recipe (MoCo's CIFAR-10 demo).

    ResNet-18 with the small stem, 32 px views, K 4096, m 0.99, T 0.1, symmetric loss,
    lr 0.06 per 512 images, weight decay 5e-4, cosine schedule, v2 augmentations.
    """
    config = _v2()
    config.model.arch, config.model.small_stem, config.model.K = "resnet18", True, 4096
    config.model.m, config.model.T, config.model.symmetric = 0.99, 0.1, True
    config.data.size, config.data.eval_resize = 32, 32
    config.optim.lr_per_256, config.optim.weight_decay = 0.03, 5e-4
    config.run.epochs, config.run.knn_every = 200, 10
    return config


def _cifar() -> Config:
    """MoCo's CIFAR-10 demonstration, as its authors ran it (published kNN top-1: 82.6% at 200 epochs, 85.3% symmetric).

    ResNet-18 with the small-image stem (3x3 convolution, stride 1, no max-pool), fc
    head of dim 128 (no MLP), batch 512, SGD lr 0.06 (0.03 per 256) cosine, momentum
    0.9, weight decay 5e-4, K 4096, m 0.99, T 0.1, symmetric loss, split BN over 8 with
    the keys' batch shuffled on one device (``auto``: shuffle-BN across ranks under
    torchrun), 32 px views without blur, kNN monitor k 200, T 0.1 every epoch.
    """
    config = _v2()
    m = config.model
    m.arch, m.small_stem, m.dim, m.mlp, m.K, m.m, m.T, m.symmetric = (
        "resnet18",
        True,
        128,
        False,
        4096,
        0.99,
        0.1,
        True,
    )
    m.shuffle, m.num_splits = "auto", 8
    config.data.preset, config.data.size, config.data.eval_resize, config.data.batch_size = (
        "cifar",
        32,
        32,
        512,
    )
    o = config.optim
    o.lr_per_256, o.momentum, o.weight_decay, o.schedule = 0.03, 0.9, 5e-4, "cosine"
    config.run.epochs, config.run.knn_every, config.run.knn_k, config.run.knn_t = 200, 1, 200, 0.1
    return config


PRESETS = {"v1": _v1, "v2": _v2, "small": _small, "cifar": _cifar}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------- setting


def _leaf_type(kind: Any) -> Any:
    """``Optional[X]`` -> X (None is always accepted for an optional leaf)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    return kind


def flat_fields(config: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (the dataclass holding it, its annotated type)}`` for every leaf, nested sections included."""
    out = {}
    hints = typing.get_type_hints(type(config))
    for leaf in dataclasses.fields(config):
        value = getattr(config, leaf.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value, f"{prefix}{leaf.name}."))
        else:
            out[f"{prefix}{leaf.name}"] = (config, hints[leaf.name])
    return out


def type_name(kind: Any) -> str:
    """How a leaf's type reads in a message or ``--help``: int, float, str, bool, floats, numbers."""
    kind = _leaf_type(kind)
    if typing.get_origin(kind) is tuple:
        return "floats"
    return "numbers" if kind is tuple else kind.__name__


def _number(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        number = int(value) if not isinstance(value, str) else int(value.strip())
        if abs(number) >= 2**63:  # what every consumer (torch, numpy, DALI) can hold
            raise ConfigError(f"{key}: {value!r} does not fit in 64 bits")
        return number
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return number


def _coerce(key: str, value: Any, kind: Any) -> Any:
    optional = _leaf_type(kind) is not kind
    kind = _leaf_type(kind)
    if value is None and optional:
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in (
                "true",
                "1",
                "yes",
                "on",
                "false",
                "0",
                "no",
                "off",
            ):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if kind in (int, float):
            return _number(key, value, kind)
        if kind is tuple or typing.get_origin(kind) is tuple:
            if isinstance(value, str):
                text = value.strip()
                value = (
                    json.loads(text)
                    if text.startswith("[")
                    else [v for v in text.strip("()").split(",") if v.strip()]
                )
            if not isinstance(value, (list, tuple)):
                raise ValueError
            if kind is tuple:  # milestones: whole numbers stay ints
                return tuple(
                    _number(key, v, int if str(v).strip().lstrip("-").isdigit() else float)
                    for v in value
                )
            return tuple(_number(key, v, float) for v in value)
        if kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            if "\0" in str(value):
                raise ConfigError(f"{key}: a NUL character in {value!r}")
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError, RecursionError):
        pass
    raise ConfigError(f"{key}: expected {type_name(kind)}, got {value!r}")


def unknown_key(key: str, source: str) -> ConfigError:
    """The error for a key the tree does not have, with the nearest real key as a hint."""
    import difflib

    leaves = list(flat_fields(Config()))
    if any(leaf.startswith(key + ".") for leaf in leaves):
        return ConfigError(f"{source}: {key!r} is a section of keys, not a value")
    close = difflib.get_close_matches(key, leaves, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"{source}: unknown key {key!r}{hint}")


def apply_overrides(
    config: Config, overrides: dict[str, Any], source: str = "command line"
) -> Config:
    """Set ``{"section.key": value}`` leaves, checking keys and types."""
    leaves = flat_fields(config)
    for key, value in overrides.items():
        if key not in leaves:
            raise unknown_key(key, source)
        obj, kind = leaves[key]
        setattr(obj, key.rsplit(".", 1)[1], _coerce(key, value, kind))
    return config


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested ``{"data": {"views": {"flip_p": 0.5}}}`` as ``{"data.views.flip_p": 0.5}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_file(path: str | Path) -> dict[str, Any]:
    """A TOML or YAML file as flat ``{"section.key": value}`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text()) or {}
        else:
            raise ConfigError(f"--config {path}: use a .toml, .yaml or .yml file")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"--config {path}: cannot parse: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected sections of keys, got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"--config {path}: {section!r} must be a section of keys")
    return flatten(data)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> Config:
    config = Config()
    apply_overrides(config, flatten(data), "checkpoint")
    return config


# ----------------------------------------------------------------------- resuming

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
        "data.threads",
    }
)
"""Keys a resumed run may change (each change is logged). Every other key changes the
state's shape (model.*, run.compile's parameter names) or the run's meaning (the data,
the views, the batch, the optimizer, the schedule over run.epochs, the precision, the
seeds) and is refused; a key added to the tree later is refused until listed here."""


def resume_changes(
    stored: dict[str, Any], config: Config
) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """``(allowed, refused)``: ``{key: (checkpoint's value, this run's value)}`` where they differ."""
    current = flatten(to_dict(config))
    before = {**current, **flatten(stored)} if stored else current
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
