"""Shards in, MoCo view pairs out: the DALI pipeline and the adapter that hands it to torch.

``ViewLoader`` reads a shard folder with ``fn.readers.webdataset`` and its index
files, decodes each image once (``mixed`` on a GPU, ``cpu`` otherwise), makes two
independent views (or one evaluation view) and yields ``Batch`` objects whose image
tensors are NCHW-shaped with channels-last strides on the training device, without
a copy: DALI writes HWC and the adapter only permutes the view.

Sharding and epochs (``pipeline/partition.py``): every epoch the shards are dealt to
the ranks as whole shards, from the manifest's per-shard counts alone, and a rank
reads only its own, as consecutive windows of at most ``max_window_samples``
samples and ``max_window_shards`` shards; each window is a DALI reader of its own, given only that window's tars and
indexes, whose shuffle buffer (``random_shuffle``) mixes the samples. Start-up and
host memory per rank are therefore bounded by a window, whatever the size of the
data set; the manifest's list of shards is the only thing a rank reads whole. With
``last_batch="drop"`` (training) every rank yields exactly the same number of
batches per epoch, the minimum over ranks of the whole batches their windows hold;
with ``"partial"`` (evaluation) every sample of the rank's share is yielded once,
the last batch of each window possibly short.

Checks on what is read: each shard a window opens is checked against the manifest
and its index (``shards.open_shard``: sizes, sample count, the tar headers the index
points at); inside the pipeline every sample's JPEG header and ``.cls`` are checked
before the decoder sees them (``pipeline/samplecheck.py``: a header DALI 2.4 cannot
parse crashes the process instead of raising), and the loader raises ``ShardError``
naming the shard and key of a bad sample before its batch is handed over.

Resuming: ``state_dict()`` holds the epoch, the window and the step within it, the
window's DALI checkpoint (reader position and random generator states) and a digest
of the rank's assignment; a loader built with ``state`` yields exactly the batches
the old one would have. The same world size is required.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from . import partition, shards
from .augment import AugmentConfig, EvalConfig, augment, eval_view
from .samplecheck import PLACEHOLDER_JPEG, SampleCheck
from .scan import first_undecodable
from .shards import ShardError

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
    """Shuffle buffer plus a new deal of shards every epoch (off for evaluation)."""
    shuffle_buffer: int = 4096
    """Samples held in the shuffle buffer."""
    seed: int = 0
    """Seed of the deal of shards (shared by all ranks) and, with the rank, epoch and window, of the augmentations."""
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
    max_window_samples: int = 1_000_000
    """Samples one DALI reader is given at most (whole shards; at least one): bounds host memory and start-up."""
    max_window_shards: int = 8192
    """Shards one DALI reader is given at most: it maps each into memory, under the kernel's per-process limit."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.last_batch not in ("drop", "partial"):
            raise ValueError(f"last_batch must be 'drop' or 'partial', got {self.last_batch!r}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        if (
            min(self.shuffle_buffer, self.prefetch, self.max_window_samples, self.max_window_shards)
            < 1
        ):
            raise ValueError(
                "shuffle_buffer, prefetch, max_window_samples and max_window_shards must be at least 1"
            )
        if self.views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {self.views}")


def _decode(jpeg, on_gpu: bool, hw_decoder_load: float):
    """Decode once: ``mixed`` on a GPU, ``cpu`` otherwise."""
    if on_gpu:
        # The hardware decoder takes its share, CUDA cores the rest; the hints
        # preallocate for ImageNet-sized images to avoid reallocations.
        return fn.decoders.image(
            jpeg,
            device="mixed",
            output_type=types.RGB,
            hw_decoder_load=hw_decoder_load,
            preallocate_width_hint=640,
            preallocate_height_hint=640,
        )
    return fn.decoders.image(jpeg, device="cpu", output_type=types.RGB)


def decode_pipeline(
    folder: str | os.PathLike,
    batch_size: int,
    *,
    threads: Optional[int] = None,
    device_id: Optional[int] = None,
    hw_decoder_load: float = 0.75,
    prefetch: int = 2,
):
    """A built DALI pipeline that only reads and decodes, as ``ViewLoader`` does: the decoder's rate.

    ``run()`` returns a batch of decoded images; it is the ceiling a view pipeline
    over the same shards and settings cannot pass.
    """
    manifest = shards.load_manifest(folder)
    pairs = [shards.open_shard(manifest, manifest.entry(i)) for i in range(len(manifest.counts))]
    on_gpu = device_id is not None

    @pipeline_def
    def decode():
        jpeg = fn.readers.webdataset(
            paths=[str(t) for t, _ in pairs],
            index_paths=[str(i) for _, i in pairs],
            ext=["jpg"],
            missing_component_behavior="error",
            name="reader",
            pad_last_batch=True,
            prefetch_queue_depth=prefetch,
        )
        return _decode(jpeg, on_gpu, hw_decoder_load)

    threads = threads or max(1, os.cpu_count() or 1)
    pipe = decode(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
    )
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
    """Zero-padded ASCII digits (N, L) -> integers (N,), on the CPU without a Python loop.

    Only digits reach it: ``SampleCheck`` stops a batch holding anything else.
    """
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
        rank, world: this process's share of the data.
        device_id: GPU to decode and augment on; None runs everything on the CPU.
        state: a ``state_dict()`` to resume from.

    Attributes:
        pairs: ``(tar, index)`` of the shards of the window being read.

    Raises:
        ShardError: no shards, a missing, changed or stale shard or index, a batch
            larger than a rank's share, a resume state that does not fit; while
            iterating, a sample that does not decode or whose class is not a class
            index (shard and key named).
        ValueError: conflicting options.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        augment_cfg: AugmentConfig | EvalConfig,
        config: LoaderConfig = LoaderConfig(),
        *,
        rank: int = 0,
        world: int = 1,
        device_id: Optional[int] = None,
        state: Optional[dict] = None,
    ):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        if device_id is not None and not torch.cuda.is_available():
            raise ValueError(
                f"device_id={device_id} but torch sees no CUDA GPU; use device_id=None for the CPU"
            )
        self.manifest = shards.load_manifest(folder)
        counts = self.manifest.counts
        if not len(counts):
            raise ShardError(f"{self.manifest.root}: the manifest lists no shards")
        self.augment_cfg, self.config = augment_cfg, config
        self.rank, self.world, self.device_id = rank, world, device_id
        self.two_views = isinstance(augment_cfg, AugmentConfig) and config.views == 2
        self.samples = self.manifest.samples
        self.has_labels = config.labels and bool(self.manifest.classes)
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self._drop = config.last_batch == "drop"
        self._per_window = partition.shards_per_window(
            counts, config.max_window_samples, config.max_window_shards
        )
        window_samples = partition.rank_window_samples(counts, world, rank, self._per_window)
        self._window_batches = partition.window_batches(
            window_samples, config.batch_size, self._drop
        )
        self._idle = (
            not self._window_batches.sum()
        )  # evaluation on a rank dealt no samples: nothing to read
        if self._drop:
            self._steps = partition.steps_per_epoch(
                counts, world, config.batch_size, self._per_window
            )
            if self._steps < 1:
                self._refuse_batch(counts)
        self.epoch = self.step_in_epoch = self.window = self.window_step = 0
        self._order_epoch, self._mine = -1, np.zeros(0, dtype=np.int64)
        self._pipe = self._iterator = self._check = None
        self.pairs: list = []
        if state:
            self._resume(state)
        if not self._idle:
            self._advance_past_finished()
            self._open(state.get("dali") if state and self.window_step else None)

    def _refuse_batch(self, counts: np.ndarray) -> None:
        shares = [
            int(partition.rank_window_samples(counts, self.world, r, len(counts)).sum())
            for r in range(self.world)
        ]
        poorest = int(np.argmin(shares))
        raise ShardError(
            f"{self.manifest.root}: a batch of {self.config.batch_size} is larger than rank {poorest}'s "
            f"share of {shares[poorest]} samples per epoch ({len(counts)} shards dealt whole to "
            f"{self.world} ranks); "
            + (
                "use a smaller batch or more samples"
                if self.world == 1
                else "use fewer ranks or a smaller batch, or build smaller shards"
            )
        )

    # ------------------------------------------------------------------ the deal

    def _my_shards(self) -> np.ndarray:
        """This epoch's shards of this rank, in reading order (computed once per epoch)."""
        if self._order_epoch != self.epoch:
            order = partition.epoch_order(
                self.manifest.counts, self.config.seed, self.epoch, self.config.shuffle
            )
            self._mine = partition.rank_shards(order, self.world, self.rank)
            self._order_epoch = self.epoch
        return self._mine

    def _window_limit(self) -> int:
        """Batches to take from the current window (the epoch's step count may end it early)."""
        if self.window >= len(self._window_batches):
            return 0
        limit = int(self._window_batches[self.window])
        return (
            min(limit, self.window_step + self._steps - self.step_in_epoch) if self._drop else limit
        )

    def _advance_past_finished(self) -> None:
        """Move past a window (or an epoch) whose batches have all been taken."""
        while self.window_step >= self._window_limit():
            self.window += 1
            self.window_step = 0
            if self.window >= len(self._window_batches) or (
                self._drop and self.step_in_epoch >= self._steps
            ):
                self.epoch += 1
                self.step_in_epoch = self.window = 0

    # ------------------------------------------------------------------ pipeline

    def _open(self, checkpoint: Optional[str]) -> None:
        """Build the current window's reader over only its tars and indexes, each checked first."""
        self._close()
        start = self.window * self._per_window
        window = self._my_shards()[start : start + self._per_window]
        self.pairs = [shards.open_shard(self.manifest, self.manifest.entry(int(i))) for i in window]
        cfg, loader = self.augment_cfg, self.config
        dali_dtype = _DTYPES[loader.dtype][0]
        tars, indexes = [str(t) for t, _ in self.pairs], [str(i) for _, i in self.pairs]
        on_gpu = self.device_id is not None
        extensions = ["jpg"] + (["cls"] if self.has_labels else [])
        self._check = check = SampleCheck(len(self.manifest.classes))

        @pipeline_def(enable_conditionals=True, enable_checkpointing=True)
        def views():
            outputs = fn.readers.webdataset(
                paths=tars,
                index_paths=indexes,
                ext=extensions,
                missing_component_behavior="error",
                name="reader",
                random_shuffle=loader.shuffle,
                initial_fill=loader.shuffle_buffer,
                # Padding the last batch with repeats of the last sample keeps a partial
                # batch's padding out of evaluation (the iterator trims it).
                pad_last_batch=True,
                prefetch_queue_depth=loader.prefetch,
            )
            jpeg = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
            source = fn.get_property(jpeg, key="source_info")
            checked = [jpeg, source] + ([outputs[1]] if self.has_labels else [])
            if fn.python_function(*checked, function=check, batch_processing=True):
                image = _decode(jpeg, on_gpu, loader.hw_decoder_load)
            else:
                image = _decode(
                    types.Constant(PLACEHOLDER_JPEG, device="cpu"), on_gpu, loader.hw_decoder_load
                )
            if isinstance(cfg, AugmentConfig):
                result = [augment(image, cfg, dali_dtype) for _ in range(loader.views)]
            else:
                result = [eval_view(image, cfg, dali_dtype)]
            if self.has_labels:
                result.append(fn.pad(outputs[1], fill_value=0))
            if loader.keys:
                result.append(fn.pad(source, fill_value=0))
            return tuple(result)

        threads = loader.threads or max(
            1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        )
        kwargs = {"checkpoint": checkpoint} if checkpoint else {}
        seed = int(
            np.random.SeedSequence(
                [loader.seed, self.epoch, self.rank, self.window]
            ).generate_state(1)[0]
        )
        self._pipe = views(
            batch_size=loader.batch_size,
            num_threads=threads,
            device_id=self.device_id,
            seed=seed,
            prefetch_queue_depth=loader.prefetch,
            **kwargs,
        )
        self._outputs = (
            (["view_q", "view_k"] if self.two_views else ["view_q"])
            + (["labels"] if self.has_labels else [])
            + (["source"] if loader.keys else [])
        )
        try:
            self._pipe.build()
            policy = LastBatchPolicy.DROP if self._drop else LastBatchPolicy.PARTIAL
            self._iterator = DALIGenericIterator(
                [self._pipe],
                self._outputs,
                reader_name="reader",
                last_batch_policy=policy,
                auto_reset=False,
                prepare_first_batch=False,
            )
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ShardError(
                f"{tars[0]} (window of {len(tars)} shards): DALI could not open it: {first}"
            ) from None

    def _close(self) -> None:
        self._iterator = self._pipe = (
            None  # DALI frees the reader's metadata and threads with the pipeline
        )

    # ------------------------------------------------------------------ iteration

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank and in every epoch with ``drop``)."""
        return self._steps if self._drop else int(self._window_batches.sum())

    def __iter__(self) -> Iterator[Batch]:
        """One epoch (the rest of it, after a resume)."""
        epoch = self.epoch
        while self.epoch == epoch and not self._idle:
            if self._pipe is None:
                self._open(None)
            while self.window_step < self._window_limit():
                try:
                    batch = self._next()
                except StopIteration:  # "partial": the window ended
                    break
                self.window_step += 1
                self.step_in_epoch += 1
                yield batch
            self._close()
            self.window_step = max(self.window_step, self._window_limit())
            self._advance_past_finished()
        if self._idle:
            self.epoch += 1

    def _next_raw(self) -> dict:
        try:
            data = next(self._iterator)[0]
        except StopIteration:
            self._raise_found()
            raise
        except RuntimeError as exc:
            raise self._locate(exc) from None
        self._raise_found()
        return data

    def _raise_found(self) -> None:
        if self._check.found:
            found = self._check.found[0]
            self._close()
            raise ShardError(found)

    def _next(self) -> Batch:
        try:
            data = self._next_raw()
        except StopIteration:
            if self._drop:
                raise ShardError(
                    f"{self.manifest.root}: rank {self.rank} ran out of samples at step "
                    f"{self.step_in_epoch} of {len(self)}"
                ) from None
            raise
        views = [
            data[name].permute(0, 3, 1, 2) for name in self._outputs if name.startswith("view")
        ]
        labels = (
            _ascii_to_int(data["labels"]).to(self.device, non_blocking=True)
            if self.has_labels
            else None
        )
        keys = None
        if self.config.keys:
            decoded = [bytes(row[row > 0].tolist()).decode() for row in data["source"].cpu()]
            keys = [s.rsplit(":", 1)[1].split(".")[0] for s in decoded]
        return Batch(views[0], views[1] if len(views) > 1 else None, labels, keys)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Where this rank is: epoch, window, step, the window's DALI checkpoint; pass to a new loader as ``state``."""
        dali = (
            self._iterator.checkpoints()[0]
            if self._iterator is not None and self.window_step
            else None
        )
        return {
            "dali": dali,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "window": self.window,
            "window_step": self.window_step,
            "rank": self.rank,
            "world": self.world,
            "assignment": partition.assignment_digest(self._my_shards(), len(self.manifest.counts)),
        }

    def _resume(self, state: dict) -> None:
        root = self.manifest.root
        if "window" not in state:
            raise ShardError(
                f"{root}: the saved data position predates per-rank shard windows; "
                "this checkpoint cannot be resumed exactly"
            )
        if (state["world"], state["rank"]) != (self.world, self.rank):
            raise ShardError(
                f"{root}: the saved data position is rank {state['rank']} of {state['world']}, "
                f"this is rank {self.rank} of {self.world}; an exact resume needs the same world size"
            )
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.window, self.window_step = state["window"], state["window_step"]
        if (
            partition.assignment_digest(self._my_shards(), len(self.manifest.counts))
            != state["assignment"]
        ):
            raise ShardError(
                f"{root}: the shards dealt to rank {self.rank} in epoch {self.epoch} differ from the "
                "saved run's (the manifest or the seed changed); cannot resume exactly"
            )

    # ------------------------------------------------------------------ errors

    def _locate(self, error: RuntimeError) -> Exception:
        """Turn a DALI decode failure the header check let through into a ShardError naming shard and key."""
        message = str(error)
        if "decoders.image" not in message and "nvImageCodec" not in message:
            return error
        located = first_undecodable(shards.iter_members(self.pairs, "jpg"))
        if located:
            return ShardError(located)
        first = next(
            (line for line in message.splitlines() if "failure" in line or "rror" in line),
            message[:200],
        )
        return ShardError(f"{self.manifest.root}: DALI could not decode a sample: {first.strip()}")
