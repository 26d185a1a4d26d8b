"""What a caller asks of the data path, as data: how shards are read (``ReadConfig``) and what a
loader hands over (``LoaderConfig``). No DALI or torch here, so configurations load fast."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DTYPE_NAMES", "VIEW_BRANCHES", "ReadConfig", "LoaderConfig"]

DTYPE_NAMES = ("float16", "float32")
"""The views' dtypes a loader hands over."""
VIEW_BRANCHES = ("conditional", "blend")
"""How a view's random operations reach the samples that draw them (``augment.augment``)."""


@dataclass(frozen=True)
class ReadConfig:
    """How a rank reads and decodes its shards: the knobs of throughput and host memory."""

    threads: int = 0
    """DALI CPU threads per rank (0: the cores per local rank)."""
    shuffle_buffer: int = 4096
    """Samples held in the shuffle buffer."""
    prefetch: int = 2
    """Batches DALI prepares ahead."""
    hw_decoder_load: float = 0.75
    """Share of JPEG decoding given to the GPU's hardware decoder (the rest runs on CUDA cores)."""
    max_window_samples: int = 1_000_000
    """Samples one DALI reader is given at most (whole shards, at least one): bounds host memory
    and start-up."""
    max_window_shards: int = 8192
    """Shards one DALI reader is given at most: it maps each into memory, and Linux allows 65,530
    mappings per process by default."""
    cache_dir: str = ""
    """A folder in the store (s3://...) is read through a local cache in a private folder here
    (empty: the system's temporary folder), removed when the reader ends."""
    cache_limit: int = 8 << 30
    """Bytes a rank's cache may hold (a folder in the store): two windows, the one read and the
    next, fetched while the first trains; windows are sized to fit."""
    cache_jobs: int = 8
    """Files a rank fetches from the store at once."""
    view_branches: str = "conditional"
    """conditional: DALI conditionals, an operation runs on the samples that draw it; blend: every
    operation on every sample, kept per sample by a 0/1 blend (no split and merge of the batch).
    The same views; which is faster is the device's to say (moco-bench views)."""

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be at least 0, got {self.threads}")
        for name in (
            "shuffle_buffer",
            "prefetch",
            "max_window_samples",
            "max_window_shards",
            "cache_limit",
            "cache_jobs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.cache_jobs > 256:
            raise ValueError(f"cache_jobs must be at most 256, got {self.cache_jobs}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        if self.view_branches not in VIEW_BRANCHES:
            raise ValueError(
                f"view_branches {self.view_branches!r}: choose {', '.join(VIEW_BRANCHES)}"
            )


@dataclass(frozen=True)
class LoaderConfig:
    """What a caller asks of the data path: batches, their dtype, the deal, what is handed over."""

    batch_size: int = 256
    """Samples per batch on this rank."""
    dtype: str = "float16"
    """Image tensor dtype: "float16" or "float32"."""
    shuffle: bool = True
    """Shuffle buffer plus a new deal of shards every epoch (off for evaluation)."""
    seed: int = 0
    """Seed of the deal of shards (shared by all ranks) and, with the rank, epoch and window, of
    the augmentations."""
    last_batch: str = "drop"
    """"drop": equal step counts on every rank (training); "partial": every sample once
    (evaluation)."""
    labels: bool = True
    """Hand over ``.cls`` labels when the shards have them."""
    keys: bool = False
    """Hand over sample keys (costs a host copy of a few bytes per sample)."""
    views: int = 2
    """Random views per image with an ``AugmentConfig``: 2 for MoCo, 1 for a linear probe's
    training."""
    read: ReadConfig = field(default_factory=ReadConfig)
    """How the shards are read and decoded."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.last_batch not in ("drop", "partial"):
            raise ValueError(f"last_batch must be 'drop' or 'partial', got {self.last_batch!r}")
        if self.views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {self.views}")
