"""Shards in, MoCo view pairs out: the DALI pipeline and the adapter that hands it to torch.

``ViewLoader`` reads a shard folder with ``fn.readers.webdataset`` and its index
files, decodes each image once (``mixed`` on a GPU, ``cpu`` otherwise), makes two
independent views (or one evaluation view) and yields ``Batch`` objects whose image
tensors are NCHW-shaped with channels-last strides on the training device, without
a copy: DALI writes HWC and the adapter only permutes the view.

Sharding and epochs: each rank reads its own contiguous slice of the samples
(``shard_id``/``num_shards``); the tar order is reshuffled every epoch with a seed
shared by all ranks (``shuffle_after_epoch``) and samples are further mixed in a
shuffle buffer (``random_shuffle``), so the slices of one epoch are disjoint and cover
every sample once. With ``last_batch="drop"`` (training) every rank yields exactly
``(samples // world) // batch_size`` batches per epoch, so ranks never disagree on
step counts; what a rank's slice holds beyond that is read and discarded. With
``"partial"`` (evaluation) every sample of the slice is yielded once, the last batch
possibly short, and ranks may differ by one batch.

Resuming: ``state_dict()`` holds DALI's pipeline checkpoint (reader positions and
random generator states) and the epoch and step counters; a loader built with
``load_state_dict`` yields exactly the batches the old one would have.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from moco_dali.pipeline import shards
from moco_dali.pipeline.augment import AugmentConfig, EvalConfig, augment, eval_view
from moco_dali.pipeline.scan import first_undecodable
from moco_dali.pipeline.shards import ShardError

__all__ = ["LoaderConfig", "Batch", "ViewLoader", "decode_pipeline"]

log = logging.getLogger(__name__)

_DTYPES = {"float16": (types.FLOAT16, torch.float16), "float32": (types.FLOAT, torch.float32)}


@dataclass(frozen=True)
class LoaderConfig:
    """How the data path reads, decodes and hands over."""

    batch_size: int = 256
    """Samples per batch on this rank."""
    dtype: str = "float16"
    """Image tensor dtype: "float16" or "float32"."""
    shuffle: bool = True
    """Shuffle buffer plus per-epoch reshuffling of tar order (off for evaluation)."""
    shuffle_buffer: int = 4096
    """Samples held in the shuffle buffer."""
    seed: int = 0
    """Seed of the tar order (shared by all ranks) and, plus the rank, of the augmentations."""
    threads: Optional[int] = None
    """DALI CPU threads (default: the cores per local rank)."""
    prefetch: int = 2
    """Batches DALI prepares ahead."""
    last_batch: str = "drop"
    """"drop": equal step counts on every rank (training); "partial": every sample once (evaluation)."""
    hw_decoder_load: float = 0.75
    """Share of JPEG decoding given to the GPU's hardware decoder (the rest runs on CUDA cores)."""
    labels: bool = True
    """Hand over ``.cls`` labels when the shards have them."""
    keys: bool = False
    """Hand over sample keys (costs a host copy of a few bytes per sample)."""
    views: int = 2
    """Random views per image with an ``AugmentConfig``: 2 for MoCo, 1 for a linear probe's training."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.last_batch not in ("drop", "partial"):
            raise ValueError(f"last_batch must be 'drop' or 'partial', got {self.last_batch!r}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        if self.shuffle_buffer < 1 or self.prefetch < 1:
            raise ValueError("shuffle_buffer and prefetch must be at least 1")
        if self.views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {self.views}")


def _decode(jpeg, on_gpu: bool, hw_decoder_load: float):
    """Decode once: ``mixed`` on a GPU, ``cpu`` otherwise."""
    if on_gpu:
        # The hardware decoder takes its share, CUDA cores the rest; the hints
        # preallocate for ImageNet-sized images to avoid reallocations.
        return fn.decoders.image(jpeg, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                                 preallocate_width_hint=640, preallocate_height_hint=640)
    return fn.decoders.image(jpeg, device="cpu", output_type=types.RGB)


def decode_pipeline(folder: str | os.PathLike, batch_size: int, *, threads: Optional[int] = None,
                    device_id: Optional[int] = None, hw_decoder_load: float = 0.75, prefetch: int = 2):
    """A built DALI pipeline that only reads and decodes, as ``ViewLoader`` does: the decoder's rate.

    ``run()`` returns a batch of decoded images; it is the ceiling a view pipeline
    over the same shards and settings cannot pass.
    """
    manifest, pairs = shards.discover(folder)
    on_gpu = device_id is not None

    @pipeline_def
    def decode():
        jpeg = fn.readers.webdataset(paths=[str(t) for t, _ in pairs], index_paths=[str(i) for _, i in pairs],
                                     ext=["jpg"], missing_component_behavior="error", name="reader",
                                     pad_last_batch=True, prefetch_queue_depth=prefetch)
        return _decode(jpeg, on_gpu, hw_decoder_load)

    threads = threads or max(1, os.cpu_count() or 1)
    pipe = decode(batch_size=batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=prefetch)
    pipe.build()
    return pipe


@dataclass
class Batch:
    """One batch: views as NCHW-shaped, channels-last tensors; labels and keys when asked."""

    view_q: torch.Tensor
    view_k: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    keys: Optional[list[str]] = None

    def __len__(self) -> int:
        return self.view_q.shape[0]


def _ascii_to_int(padded: torch.Tensor) -> torch.Tensor:
    """Zero-padded ASCII digits (N, L) -> integers (N,), on the CPU without a Python loop."""
    digits = padded.to(torch.int64)
    valid = digits > 0
    lengths = valid.sum(dim=1, keepdim=True)
    positions = torch.arange(digits.shape[1]).unsqueeze(0)
    powers = torch.where(valid, 10 ** (lengths - 1 - positions).clamp(min=0), 0)
    return ((digits - 48) * powers).sum(dim=1)


class ViewLoader:
    """Iterate a shard folder as MoCo view pairs (``two_views``) or evaluation views.

    Args:
        folder: a shard folder written by ``moco-shards build``.
        augment_cfg: the view recipe (``AugmentConfig``) or an ``EvalConfig``.
        config: reading, decoding and hand-over settings.
        rank, world: this process's slice of the data.
        device_id: GPU to decode and augment on; None runs everything on the CPU.
        state: a ``state_dict()`` to resume from.

    Raises:
        ShardError: no shards, a missing or stale index, a batch larger than a rank's
            slice; while iterating, a sample that does not decode (shard and key named).
        ValueError: conflicting options.
    """

    def __init__(self, folder: str | os.PathLike, augment_cfg: AugmentConfig | EvalConfig,
                 config: LoaderConfig = LoaderConfig(), *, rank: int = 0, world: int = 1,
                 device_id: Optional[int] = None, state: Optional[dict] = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        if device_id is not None and not torch.cuda.is_available():
            raise ValueError(f"device_id={device_id} but torch sees no CUDA GPU; use device_id=None for the CPU")
        self.manifest, self.pairs = shards.discover(folder)
        self.augment_cfg, self.config = augment_cfg, config
        self.rank, self.world, self.device_id = rank, world, device_id
        self.two_views = isinstance(augment_cfg, AugmentConfig) and config.views == 2
        self.samples = self.manifest.samples
        slice_size = self.samples // world
        if slice_size < config.batch_size and config.last_batch == "drop":
            raise ShardError(f"{self.manifest.root}: batch of {config.batch_size} is larger than rank {rank}'s slice "
                             f"of {slice_size} samples ({self.samples} samples over {world} ranks)")
        self.has_labels = config.labels and bool(self.manifest.classes)
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.epoch = 0
        self.step_in_epoch = 0
        self._last_tar: Optional[str] = None
        self._build(state["dali"] if state else None)
        if state:
            self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]

    # ------------------------------------------------------------------ pipeline

    def _build(self, checkpoint: Optional[str]) -> None:
        cfg, loader = self.augment_cfg, self.config
        dali_dtype = _DTYPES[loader.dtype][0]
        tars = [str(t) for t, _ in self.pairs]
        indexes = [str(i) for _, i in self.pairs]
        on_gpu = self.device_id is not None
        extensions = ["jpg"] + (["cls"] if self.has_labels else [])

        @pipeline_def(enable_conditionals=True, enable_checkpointing=True)
        def views():
            outputs = fn.readers.webdataset(
                paths=tars, index_paths=indexes, ext=extensions, missing_component_behavior="error",
                name="reader", shard_id=self.rank, num_shards=self.world,
                random_shuffle=loader.shuffle, initial_fill=loader.shuffle_buffer,
                shuffle_after_epoch=loader.shuffle, shuffle_after_epoch_seed=loader.seed if loader.shuffle else None,
                # Padding the last batch with repeats of the last sample keeps the next
                # epoch's samples out of it, so every epoch starts at a boundary.
                pad_last_batch=True, prefetch_queue_depth=loader.prefetch,
            )
            jpeg = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
            image = _decode(jpeg, on_gpu, loader.hw_decoder_load)
            if isinstance(cfg, AugmentConfig):
                result = [augment(image, cfg, dali_dtype) for _ in range(loader.views)]
            else:
                result = [eval_view(image, cfg, dali_dtype)]
            if self.has_labels:
                result.append(fn.pad(outputs[1], fill_value=0))
            if loader.keys:
                result.append(fn.pad(fn.get_property(jpeg, key="source_info"), fill_value=0))
            return tuple(result)

        threads = loader.threads or max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        kwargs = {"checkpoint": checkpoint} if checkpoint else {}
        self._pipe = views(batch_size=loader.batch_size, num_threads=threads, device_id=self.device_id,
                           seed=loader.seed * 1000 + self.rank, prefetch_queue_depth=loader.prefetch, **kwargs)
        self._outputs = (["view_q", "view_k"] if self.two_views else ["view_q"]) + \
            (["labels"] if self.has_labels else []) + (["source"] if loader.keys else [])
        try:
            self._pipe.build()
            policy = LastBatchPolicy.DROP if loader.last_batch == "drop" else LastBatchPolicy.PARTIAL
            self._iterator = DALIGenericIterator([self._pipe], self._outputs, reader_name="reader",
                                                 last_batch_policy=policy, auto_reset=False,
                                                 prepare_first_batch=False)
        except RuntimeError as exc:
            raise self._locate(exc) from None

    # ------------------------------------------------------------------ iteration

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.config.last_batch == "drop":
            return (self.samples // self.world) // self.config.batch_size
        mine = self._slice_size(self.rank)
        return -(-mine // self.config.batch_size)

    def _slice_size(self, rank: int) -> int:
        # DALI's split of N samples over W shards: [N * r // W, N * (r + 1) // W).
        return self.samples * (rank + 1) // self.world - self.samples * rank // self.world

    def __iter__(self) -> Iterator[Batch]:
        """One epoch (the rest of it, after a resume)."""
        steps = len(self)
        while self.step_in_epoch < steps:
            batch = self._next()
            self.step_in_epoch += 1
            yield batch
        # Read and discard whatever DALI still holds of this rank's slice (beyond the
        # agreed step count, or padding), so the next epoch starts at a boundary.
        while True:
            try:
                self._next_raw()
            except StopIteration:
                break
        self._iterator.reset()
        self.epoch += 1
        self.step_in_epoch = 0

    def _next_raw(self) -> dict:
        try:
            return next(self._iterator)[0]
        except StopIteration:
            raise
        except RuntimeError as exc:
            raise self._locate(exc) from None

    def _next(self) -> Batch:
        try:
            data = self._next_raw()
        except StopIteration:
            raise ShardError(f"{self.manifest.root}: rank {self.rank} ran out of samples before step "
                             f"{self.step_in_epoch} of {len(self)}") from None
        views = [data[name].permute(0, 3, 1, 2) for name in self._outputs if name.startswith("view")]
        labels = _ascii_to_int(data["labels"]).to(self.device, non_blocking=True) if self.has_labels else None
        keys = None
        if self.config.keys:
            # source_info is "path/to/shard.tar:offset:KEY.jpg"
            decoded = [bytes(row[row > 0].tolist()).decode() for row in data["source"].cpu()]
            self._last_tar = decoded[-1].rsplit(":", 2)[0]
            keys = [s.rsplit(":", 1)[1].split(".")[0] for s in decoded]
        return Batch(views[0], views[1] if len(views) > 1 else None, labels, keys)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """DALI's checkpoint plus the epoch and step counters; pass to a new loader as ``state``."""
        return {"dali": self._iterator.checkpoints()[0], "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "rank": self.rank, "world": self.world}

    # ------------------------------------------------------------------ errors

    def _locate(self, error: RuntimeError) -> Exception:
        """Turn DALI's decode failure into a ShardError naming the shard and key."""
        message = str(error)
        if "decoders.image" not in message and "nvImageCodec" not in message:
            return error
        pairs = list(self.pairs)
        if self._last_tar:  # known when keys are handed over: look where the reader was last
            pairs.sort(key=lambda pair: str(pair[0]) != self._last_tar)
        located = first_undecodable(shards.iter_members(pairs, "jpg"))
        if located:
            return ShardError(located)
        first = next((line for line in message.splitlines() if "failure" in line or "rror" in line), message[:200])
        return ShardError(f"{self.manifest.root}: DALI could not decode a sample: {first.strip()}")
