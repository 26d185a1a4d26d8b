"""The training configuration: one typed tree of dataclasses and the rules of its keys.

The tree holds the owners' classes: ``data.views`` is the pipeline's ``AugmentConfig`` and the
reading keys (``data.threads`` ...) its ``ReadConfig``, each with its own docs and rules.
Declared here are the training's own keys, the rules that tie keys to each other and to the
world size (``check``), and how a stored tree is read back (``from_dict``). The presets and
resolving a tree from a preset, a file and the command line are ``presets.py``'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..common.files import MAX_DEPTH, too_deep
from ..common.options import (
    FLAT,
    OptionError,
    build,
    flatten,
    to_dict,
)
from ..pipeline.config import ReadConfig
from ..pipeline.recipes import AugmentConfig, EvalConfig, recipe_names, v1
from .schedule import LR_SCHEDULES, MOMENTUM_SCHEDULES

__all__ = [
    "LEGACY_KEYS",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "Config",
    "AMP_NAMES",
    "QUEUE_DTYPE_NAMES",
    "from_dict",
    "to_dict",
    "check",
    "check_batch",
    "config_error",
    "eval_view",
]

AMP_NAMES = ("auto", "bf16", "fp16", "none")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MAX_EPOCHS = 100_000
MAX_STEPS = 2**28
"""The most steps a run's schedules are computed for (two float64 values each: 4 GiB)."""
QUEUE_DTYPE_NAMES = ("float32", "float16", "bfloat16")
MAX_DIM, MAX_QUEUE, MAX_QUEUE_VALUES = 65536, 2**24, 2**31
"""model.dim, model.K and the (K, dim) queue at most, checked before anything is allocated (a tree
may come from a file): the widest head in use is 2048, the paper's queue 65536 keys."""


class ConfigError(OptionError):
    """A configuration that cannot run; the message says which key and why."""


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r}: choose {', '.join(choices)}")


def _at_least(owner: Any, low: int, *names: str) -> None:
    for name in names:
        if getattr(owner, name) < low:
            raise ValueError(f"{name} must be at least {low}, got {getattr(owner, name)}")


@dataclass
class DataConfig:
    train: str = ""
    """Shard folder to pretrain on (written by moco-shards build)."""
    knn_train: str = ""
    """Labelled shard folder for the kNN monitor's memory bank ("" = off)."""
    knn_val: str = ""
    """Labelled shard folder the kNN monitor classifies ("" = off)."""
    preset: str = "v1"
    """The recipe data.views starts from: v1, v2 or cifar (v2 without blur). Setting it sets every
    data.views key but size to that recipe's; data.views keys given beside it apply after."""
    eval_resize: int = 256
    """kNN monitor: shorter side before the centre crop of data.views.size."""
    batch_size: int = 256
    """Global batch (all ranks together)."""
    dtype: str = "auto"
    """View dtype: float16, float32, or auto (float16 with AMP, else float32)."""
    views: AugmentConfig = field(default_factory=v1)
    """The view recipe, field by field (data.views.size, data.views.jitter_p ...)."""
    read: ReadConfig = field(default_factory=ReadConfig, metadata=FLAT)
    """How each rank reads and decodes (data.threads, data.shuffle_buffer ...)."""

    def __post_init__(self) -> None:
        _choice("preset", self.preset, recipe_names())
        _choice("dtype", self.dtype, ("auto", "float16", "float32"))
        _at_least(self, 1, "batch_size", "eval_resize")


@dataclass
class ModelConfig:
    """The arguments of ``model.moco.MoCo`` and its encoder; their rules are the model's own."""

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

    def __post_init__(self) -> None:
        _choice("queue_dtype", self.queue_dtype, QUEUE_DTYPE_NAMES)
        _choice("momentum_schedule", self.momentum_schedule, MOMENTUM_SCHEDULES)
        _at_least(self, 0, "shuffle_group_size")
        for name, high in (("dim", MAX_DIM), ("K", MAX_QUEUE)):
            if not 1 <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be in 1..{high}, got {getattr(self, name)}")
        if (values := self.K * self.dim) > MAX_QUEUE_VALUES:
            raise ValueError(
                f"K x dim = {values} queue values, over the limit of {MAX_QUEUE_VALUES}"
            )


@dataclass
class OptimConfig:
    name: str = "sgd"
    """sgd (fused kernels) or lars (trust ratio per weight tensor; no decay on 1-d ones)."""
    lr_per_256: float = 0.03
    """Learning rate per 256 images of global batch (scaled linearly)."""
    momentum: float = 0.9
    """SGD momentum, in [0, 1)."""
    weight_decay: float = 1e-4
    """L2 weight decay."""
    schedule: str = "step"
    """step (x0.1 at the milestones) or cosine."""
    milestones: tuple = (120, 160)
    """Epochs at which the step schedule multiplies the rate by 0.1."""
    warmup_epochs: float = 0.0
    """Linear warm-up from 0, in epochs."""
    trust_coefficient: float = 0.001
    """LARS: the update of a weight tensor is scaled to this fraction of its norm."""

    def __post_init__(self) -> None:
        _choice("schedule", self.schedule, LR_SCHEDULES)
        if not self.lr_per_256 > 0:
            raise ValueError(f"lr_per_256 must be positive, got {self.lr_per_256}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs is in epochs >= 0, got {self.warmup_epochs}")
        if any(epoch < 0 for epoch in self.milestones):
            raise ValueError(f"milestones are epochs >= 0, got {self.milestones}")


@dataclass
class RunConfig:
    epochs: int = 200
    """Epochs of the schedule."""
    max_steps: int = 0
    """Stop after this many steps in all (0: run all epochs)."""
    amp: str = "auto"
    """bf16, fp16 (with a gradient scaler), none, or auto (bf16 on a GPU that has it, else none)."""
    channels_last: bool = True
    """Channels-last model and inputs."""
    compile: bool = False
    """torch.compile the two encoders (in place: their parameter names and checkpoints stay
    those of an eager run)."""
    compile_mode: str = "default"
    """torch.compile's mode: default, reduce-overhead (CUDA graphs), max-autotune,
    max-autotune-no-cudagraphs."""
    compile_backend: str = "inductor"
    """torch.compile's backend: inductor (generated kernels), or aot_eager and eager to find
    where a compiled step goes wrong."""
    seed: int = 0
    """Seeds weights, queue, views and shard order (0 <= seed < 2**31)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    deterministic: bool = False
    """Deterministic kernels (cuDNN, cuBLAS, torch.use_deterministic_algorithms): bit-exact resume
    on a GPU, slower. Off: cuDNN picks the fastest convolution for the fixed shapes."""
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
    """kNN monitor: neighbours that vote."""
    knn_t: float = 0.1
    """kNN monitor: temperature of the exp(similarity / t) votes."""
    max_nonfinite: int = 10
    """Stop after this many non-finite losses in a row."""
    progress: bool = True
    """Progress bar on rank 0."""
    dist_timeout_s: int = 1800
    """Seconds a collective waits for the slowest rank before the run fails."""

    def __post_init__(self) -> None:
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("amp", self.amp, AMP_NAMES)
        _choice("compile_mode", self.compile_mode, COMPILE_MODES)
        _choice("compile_backend", self.compile_backend, ("inductor", "aot_eager", "eager"))
        _at_least(self, 1, "epochs", "log_every", "ckpt_every", "keep_last", "max_nonfinite")
        _at_least(self, 1, "dist_timeout_s", "knn_k")
        _at_least(self, 0, "max_steps", "knn_every", "seed")
        if self.epochs > MAX_EPOCHS:
            raise ValueError(f"epochs must be at most {MAX_EPOCHS}, got {self.epochs}")
        # numpy's global generator takes seed + rank, which must stay below 2**32: 2**31 leaves
        # room for any world size (DALI's seeds come from a SeedSequence, which takes any size).
        if self.seed >= 2**31:
            raise ValueError(f"seed must be below 2**31, got {self.seed}")
        if not self.knn_t > 0:
            raise ValueError(f"knn_t must be positive, got {self.knn_t}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def config_error(error: OptionError) -> ConfigError:
    """``error`` as the tree's own error (a ``ConfigError``), for the callers that catch it."""
    return error if isinstance(error, ConfigError) else ConfigError(str(error))


LEGACY_KEYS = {"data.size": "data.views.size"}
"""Keys stored by earlier versions (checkpoints, config.json) and what they are now."""


def from_dict(stored: dict[str, Any], source: str = "checkpoint") -> Config:
    """A tree stored as nested values (config.json, a checkpoint), checked as a file would be."""
    if not isinstance(stored, dict):
        raise ConfigError(f"{source}: expected sections of keys, got {type(stored).__name__}")
    if too_deep(stored):  # flatten recurses; the tree is 3 levels deep
        raise ConfigError(f"{source}: nested deeper than {MAX_DEPTH} levels")
    flat = flatten(stored)
    for old, new in LEGACY_KEYS.items():
        if old in flat:
            flat.setdefault(new, flat.pop(old))
    try:
        return build(Config, flat, source=source, given=list(flat))
    except OptionError as error:
        raise config_error(error) from None


def eval_view(config: Config) -> EvalConfig:
    """The kNN monitor's view: shorter side to data.eval_resize, centre crop of the views' size,
    normalised as the views are."""
    d = config.data
    try:
        return EvalConfig(d.eval_resize, d.views.size, d.views.mean, d.views.std)
    except ValueError as error:
        raise ConfigError(
            f"data.eval_resize {d.eval_resize} and data.views.size {d.views.size}: {error}"
        ) from None


def check_batch(config: Config, world: int) -> None:
    """The batch's rules with the queue and split BN, for ``world`` ranks."""
    d, m = config.data, config.model
    per_step_keys = d.batch_size * (2 if m.symmetric else 1)
    if m.K < per_step_keys:
        raise ConfigError(
            f"model.K {m.K} is smaller than the keys enqueued per step ({per_step_keys}, from "
            f"data.batch_size{' and model.symmetric' if m.symmetric else ''}); raise K"
        )
    per_rank = d.batch_size // world
    mode = m.shuffle if m.shuffle != "auto" else ("ddp" if world > 1 else "split")
    if mode == "split" and m.num_splits > 1:
        if per_rank % m.num_splits:
            raise ConfigError(
                f"model.num_splits {m.num_splits} does not divide the batch of a rank "
                f"({per_rank}: data.batch_size {d.batch_size} over {world} rank(s))"
            )
        if per_rank // m.num_splits < 2:
            raise ConfigError(
                f"model.num_splits {m.num_splits} leaves {per_rank // m.num_splits} sample per "
                f"split of the batch of a rank ({per_rank}); split BN needs at least 2: raise "
                "data.batch_size or lower model.num_splits"
            )
    if mode == "ddp" and world > 1:
        group = m.shuffle_group_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if world % group:
            raise ConfigError(
                f"model.shuffle_group_size {group} does not divide the world size {world}"
            )


def check(config: Config, world: int, cuda: bool, amp: bool) -> None:
    """The rules that tie keys to each other and to the run: ``world`` ranks, a GPU (``cuda``),
    autocast on (``amp``). Raises ``ConfigError`` naming the keys; reads no file."""
    d, r = config.data, config.run
    if not d.train:
        raise ConfigError("data.train: give the shard folder to pretrain on (--data.train DIR)")
    if r.device == "cuda" and not cuda:
        raise ConfigError("run.device cuda: no CUDA GPU here")
    if r.amp == "fp16" and not cuda:
        raise ConfigError("run.amp fp16 needs a CUDA GPU; use bf16 or none on a CPU")
    if d.batch_size % world:
        raise ConfigError(
            f"data.batch_size {d.batch_size} is not divisible by the world size {world}"
        )
    if d.dtype == "float16" and not amp:
        raise ConfigError(
            f"data.dtype {d.dtype} gives float16 views, which a float32 model (run.amp {r.amp} "
            "resolves to none here) cannot take; use data.dtype float32 or auto, or run.amp bf16"
        )
    check_batch(config, world)
    if bool(d.knn_train) != bool(d.knn_val):
        raise ConfigError(
            "data.knn_train and data.knn_val go together (both labelled shard folders, or neither)"
        )
    if d.knn_train:
        eval_view(config)
