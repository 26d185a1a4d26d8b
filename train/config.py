"""The training configuration: one typed tree of dataclasses, presets, and how it is set.

Every leaf is settable from the command line (``--optim.lr_per_256 0.06``) and from a
TOML or YAML file (``--config run.toml``, sections named like the tree); command-line
values win over the file, the file over the preset. Unknown keys, wrong types and
impossible combinations raise ``ConfigError`` with one line that says what to fix.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "RunConfig", "Config", "PRESETS", "preset",
           "apply_overrides", "unknown_key", "load_file", "to_dict", "flat_fields"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key and why."""


@dataclass
class DataConfig:
    train: str = ""
    """Shard folder to pretrain on (written by moco-shards build)."""
    knn_train: str = ""
    """Labelled shard folder for the kNN monitor's memory bank ("" = off)."""
    knn_val: str = ""
    """Labelled shard folder the kNN monitor classifies ("" = off)."""
    preset: str = "v1"
    """Augmentation recipe: v1, v2 or cifar (v2 without blur)."""
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
    hue_space: str = "hsv"
    """hsv (exact, as torchvision) or yiq (DALI's operator, cheaper on a CPU)."""


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
    device: str = "auto"
    """auto, cpu or cuda."""
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
    m.arch, m.small_stem, m.dim, m.mlp, m.K, m.m, m.T, m.symmetric = "resnet18", True, 128, False, 4096, 0.99, 0.1, True
    m.shuffle, m.num_splits = "auto", 8
    config.data.preset, config.data.size, config.data.eval_resize, config.data.batch_size = "cifar", 32, 32, 512
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

def flat_fields(config: Config) -> dict[str, tuple[Any, type]]:
    """``{"section.key": (section_object, annotated type)}`` for every leaf."""
    out = {}
    for section in dataclasses.fields(config):
        obj = getattr(config, section.name)
        hints = typing.get_type_hints(type(obj))
        for leaf in dataclasses.fields(obj):
            out[f"{section.name}.{leaf.name}"] = (obj, hints[leaf.name])
    return out


def _coerce(key: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is tuple:
            if isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            return tuple(float(v) if "." in str(v) else int(v) for v in value)
        if kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")


def unknown_key(key: str, source: str) -> ConfigError:
    """The error for a key the tree does not have, with the nearest real key as a hint."""
    import difflib

    close = difflib.get_close_matches(key, list(flat_fields(Config())), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"{source}: unknown key {key!r}{hint}")


def apply_overrides(config: Config, overrides: dict[str, Any], source: str = "command line") -> Config:
    """Set ``{"section.key": value}`` leaves, checking keys and types."""
    leaves = flat_fields(config)
    for key, value in overrides.items():
        if key not in leaves:
            raise unknown_key(key, source)
        obj, kind = leaves[key]
        setattr(obj, key.split(".", 1)[1], _coerce(key, value, kind))
    return config


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
        raise ConfigError(f"--config {path}: cannot parse: {exc}") from None
    flat = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"--config {path}: {section!r} must be a section of keys")
        flat.update({f"{section}.{key}": value for key, value in values.items()})
    return flat


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> Config:
    config = Config()
    apply_overrides(config, {f"{s}.{k}": v for s, values in data.items() for k, v in values.items()}, "checkpoint")
    return config


def validate(config: Config, world: int, cuda: bool) -> None:
    """Combinations that cannot run, checked before any work."""
    d, m, o, r = config.data, config.model, config.optim, config.run
    if not d.train:
        raise ConfigError("data.train: give the shard folder to pretrain on (--data.train DIR)")
    if d.batch_size % world:
        raise ConfigError(f"data.batch_size {d.batch_size} is not divisible by the world size {world}")
    per_step_keys = d.batch_size * (2 if m.symmetric else 1)
    if m.K < per_step_keys:
        raise ConfigError(f"model.K {m.K} is smaller than the keys enqueued per step ({per_step_keys}); raise K")
    if r.amp not in ("auto", "bf16", "fp16", "none"):
        raise ConfigError(f"run.amp {r.amp!r}: choose auto, bf16, fp16 or none")
    if r.amp == "fp16" and not cuda:
        raise ConfigError("run.amp fp16 needs a CUDA GPU; use bf16 or none on a CPU")
    if r.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"run.device {r.device!r}: choose auto, cpu or cuda")
    if r.device == "cuda" and not cuda:
        raise ConfigError("run.device cuda: no CUDA GPU here")
    if o.name not in ("sgd", "lars"):
        raise ConfigError(f"optim.name {o.name!r}: choose sgd or lars")
    if o.trust_coefficient <= 0:
        raise ConfigError(f"optim.trust_coefficient must be positive, got {o.trust_coefficient}")
    if o.schedule not in ("step", "cosine"):
        raise ConfigError(f"optim.schedule {o.schedule!r}: choose step or cosine")
    if m.momentum_schedule not in ("constant", "cosine"):
        raise ConfigError(f"model.momentum_schedule {m.momentum_schedule!r}: choose constant or cosine")
    if m.queue_dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"model.queue_dtype {m.queue_dtype!r}: choose float32, float16 or bfloat16")
    if d.dtype not in ("auto", "float16", "float32"):
        raise ConfigError(f"data.dtype {d.dtype!r}: choose auto, float16 or float32")
    if bool(d.knn_train) != bool(d.knn_val):
        raise ConfigError("data.knn_train and data.knn_val go together (both labelled shard folders, or neither)")
    for key, value in (("run.epochs", r.epochs), ("run.log_every", r.log_every), ("run.ckpt_every", r.ckpt_every),
                       ("run.keep_last", r.keep_last), ("run.max_nonfinite", r.max_nonfinite)):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if r.resume not in ("", "auto") and not Path(r.resume).is_file():
        raise ConfigError(f"run.resume {r.resume}: no such checkpoint")
