"""Shards in, MoCo view pairs out: a rank's windows of shards through DALI, handed to torch.

``ViewLoader`` yields ``Batch`` objects (``handover``) on the training device. Every
epoch the shards are dealt to the ranks whole (``partition``); a rank reads its share as
windows of at most ``max_window_samples`` samples and ``max_window_shards`` shards, each a
DALI pipeline of its own (``graph``), so start-up and host memory are bounded by a window.
``state_dict()`` holds where the rank is; a loader built with it yields the same batches. A
loader given every rank's state of a run of another world size (``old_states``) reads the rest of
that run's epoch, dealt again (``elastic``), then deals the next epochs as usual.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Iterator, Optional

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from . import cache, elastic, handover, partition, shards
from .config import LoaderConfig
from .graph import default_threads, view_pipeline, window_seed
from .handover import Batch
from .pieces import piece_pairs, rank_rest, same_windows, saved_world
from .recipes import AugmentConfig, EvalConfig
from .samplecheck import SampleCheck
from .scan import first_undecodable
from .shards import ShardError

__all__ = ["Batch", "ViewLoader"]

log = logging.getLogger(__name__)


class ViewLoader:
    """Iterate a shard folder as MoCo view pairs (``two_views``) or evaluation views.

    Args:
        folder: a shard folder written by ``moco-shards build``.
        augment_cfg: the view recipe (``AugmentConfig``) or an ``EvalConfig``.
        config: reading, decoding and hand-over settings.
        rank, world: this process's share of the data.
        device_id: GPU to decode and augment on; None runs everything on the CPU.
        state: a ``state_dict()`` to resume from.
        old_states: every rank's ``state_dict()`` of a run of another world size, to read the
            rest of its epoch (elastic resume); not with ``state``.

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
        config: Optional[LoaderConfig] = None,
        *,
        rank: int = 0,
        world: int = 1,
        device_id: Optional[int] = None,
        state: Optional[dict] = None,
        old_states: Optional[list[dict]] = None,
    ):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        if device_id is not None and not torch.cuda.is_available():
            raise ValueError(
                f"device_id={device_id} but torch sees no CUDA GPU; use device_id=None for the CPU"
            )
        config = config or LoaderConfig()
        self.manifest = cache.load_manifest(str(folder))
        counts = self.manifest.counts
        if not len(counts):
            raise ShardError(f"{self.manifest.name}: the manifest lists no shards")
        self.augment_cfg, self.config = augment_cfg, config
        self.rank, self.world, self.device_id = rank, world, device_id
        self.two_views = isinstance(augment_cfg, AugmentConfig) and config.views == 2
        self.samples = self.manifest.samples
        self.has_labels = config.labels and bool(self.manifest.classes)
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self._drop = config.last_batch == "drop"
        self._per_window = cache.shards_per_window(self.manifest, config.read)
        # A folder in the store: the current window's shards and the next's, on local disk.
        self.cache = cache.ShardCache(self.manifest, config.read) if self.manifest.url else None
        window_samples = partition.rank_window_samples(counts, world, rank, self._per_window)
        self._window_batches = partition.window_batches(
            window_samples, config.batch_size, self._drop
        )
        self._steps = 0
        # Evaluation on a rank dealt no samples: nothing to read.
        self._idle = not self._window_batches.sum()
        if self._drop:
            self._steps = partition.steps_per_epoch(
                counts, world, config.batch_size, self._per_window
            )
            if self._steps < 1:
                self._refuse_batch(counts)
        self.epoch = self.step_in_epoch = self.window = self.window_step = 0
        self._orders: dict[int, np.ndarray] = {}
        self._usual = (self._window_batches, self._steps)
        # The rest of an epoch begun at another world size: its epoch, the old ranks' positions,
        # this rank's windows of it (elastic.py).
        self._rest_epoch, self._old, self._rest = -1, None, []
        self._scratch = None
        self._pipe = self._iterator = self._check = None
        self.pairs: list = []
        if state and old_states:
            raise ValueError("give state (same world size) or old_states (another), not both")
        if state:
            self._resume(state)
        if old_states:
            self._resume_elsewhere(old_states)
        if not self._idle:
            self._advance_past_finished()
            self._open(state.get("dali") if state and self.window_step else None)

    def _refuse_batch(self, counts: np.ndarray) -> None:
        shares = [
            int(partition.rank_window_samples(counts, self.world, r, len(counts)).sum())
            for r in range(self.world)
        ]
        poorest = int(np.argmin(shares))
        if shares[poorest] >= self.config.batch_size:  # whole shares hold a batch; windows do not
            raise ShardError(
                f"{self.manifest.name}: a batch of {self.config.batch_size} is larger than a window "
                f"of {self._per_window} shards (data.max_window_samples, data.max_window_shards, "
                "data.cache_limit for a folder in the store): give windows more room"
            )
        raise ShardError(
            f"{self.manifest.name}: a batch of {self.config.batch_size} is larger than rank {poorest}'s "
            f"share of {shares[poorest]} samples per epoch ({len(counts)} shards dealt whole to "
            f"{self.world} ranks); "
            + (
                "use a smaller batch or more samples"
                if self.world == 1
                else "use fewer ranks or a smaller batch, or build smaller shards"
            )
        )

    # ------------------------------------------------------------------ the deal

    def _my_shards(self, epoch: Optional[int] = None) -> np.ndarray:
        """An epoch's shards of this rank, in reading order (computed once per epoch)."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._orders:
            order = partition.epoch_order(
                self.manifest.counts, self.config.seed, epoch, self.config.shuffle
            )
            # this epoch's and the next's (the cache fetches the next epoch's first window)
            self._orders = {e: o for e, o in self._orders.items() if e >= self.epoch}
            self._orders[epoch] = partition.rank_shards(order, self.world, self.rank)
        return self._orders[epoch]

    def _window_shards(self, epoch: int, window: int) -> list[int]:
        """The shards of one of this rank's windows (of the rest of an epoch begun elsewhere)."""
        if epoch == self._rest_epoch:
            return list(self._rest[window].shards) if window < len(self._rest) else []
        start = window * self._per_window
        return [int(s) for s in self._my_shards(epoch)[start : start + self._per_window]]

    def _next_shards(self) -> list[int]:
        """The shards of the window after the current one, as far as it can be foreseen (a wrong
        guess costs a wait, never a wrong read)."""
        following, batches = self.window + 1, self._window_batches
        if following < len(batches) and batches[following] > 0:
            if not self._drop or int(batches[:following].sum()) < self._steps:
                return self._window_shards(self.epoch, following)
        return self._window_shards(self.epoch + 1, 0)

    def _files(self, window: list[int]) -> list[tuple]:
        """The checked ``(tar, index)`` of each shard: from the folder, or the store's through the cache."""
        if self.cache is not None:
            return self.cache.pairs(window)
        return [shards.open_shard(self.manifest, self.manifest.entry(i)) for i in window]

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
                self._window_batches, self._steps = self._usual

    # ------------------------------------------------------------------ pipeline

    def _open(self, checkpoint: Optional[str]) -> None:
        """Build the current window's reader over only its tars and indexes, each checked first."""
        self._close()
        cfg, read = self.config, self.config.read
        window = self._window_shards(self.epoch, self.window)
        files = self._files(window)
        if self.epoch == self._rest_epoch and self._rest[self.window].old_rank >= 0:
            if self._scratch is None:
                self._scratch = tempfile.TemporaryDirectory(prefix="moco-elastic-")
            self.pairs = piece_pairs(
                self.manifest,
                self._rest[self.window],
                self._old,
                dict(zip(window, files)),
                seed=cfg.seed,
                epoch=self.epoch,
                shuffle=cfg.shuffle,
                shuffle_buffer=read.shuffle_buffer,
                workdir=self._scratch.name,
            )
        else:
            self.pairs = files
        if self.cache is not None:
            self.cache.prefetch(self._next_shards())
        tars, indexes = [str(t) for t, _ in self.pairs], [str(i) for _, i in self.pairs]
        self._check = SampleCheck(len(self.manifest.classes), self.manifest.label_key is not None)
        self._pipe, self._outputs = view_pipeline(
            tars,
            indexes,
            self.augment_cfg,
            self._check,
            views=cfg.views,
            labels=self.has_labels,
            keys=cfg.keys,
            dtype=cfg.dtype,
            shuffle=cfg.shuffle,
            shuffle_buffer=read.shuffle_buffer,
            prefetch=read.prefetch,
            hw_decoder_load=read.hw_decoder_load,
            branches=read.view_branches,
            batch_size=cfg.batch_size,
            threads=read.threads or default_threads(),
            device_id=self.device_id,
            seed=window_seed(cfg.seed, self.epoch, self.rank, self.window),
            checkpoint=checkpoint,
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
        # DALI frees the reader's metadata and threads with the pipeline.
        self._iterator = self._pipe = None

    # ------------------------------------------------------------------ iteration

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank and in every epoch with ``drop``)."""
        batches, steps = self._usual
        return steps if self._drop else int(batches.sum())

    @property
    def per_window(self) -> int:
        """Shards a window holds (the last of an epoch may hold fewer)."""
        return self._per_window

    @property
    def epoch_steps(self) -> int:
        """Batches of the current epoch: ``len(self)``, or the rest of an epoch begun elsewhere."""
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
                    f"{self.manifest.name}: rank {self.rank} ran out of samples at step "
                    f"{self.step_in_epoch} of {len(self)}"
                ) from None
            raise
        return handover.batch(
            data, self._outputs, self.device, labels=self.has_labels, keys=self.config.keys
        )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Where this rank is: epoch, window, step, the window's DALI checkpoint; pass to a new loader as ``state``."""
        dali = (
            self._iterator.checkpoints()[0]
            if self._iterator is not None and self.window_step
            else None
        )
        state = {
            "dali": dali,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "window": self.window,
            "window_step": self.window_step,
            "rank": self.rank,
            "world": self.world,
            "batch_size": self.config.batch_size,
            "per_window": self._per_window,
            "assignment": self._assignment(),
        }
        if self.epoch == self._rest_epoch:
            old = self._old
            state["elastic"] = {
                "world": old.world,
                "batch_size": old.batch_size,
                "windows": list(old.windows),
                "window_steps": list(old.window_steps),
            }
        return state

    def _assignment(self) -> str:
        if self.epoch == self._rest_epoch:
            return elastic.windows_digest(self._rest)
        return partition.assignment_digest(self._my_shards(), len(self.manifest.counts))

    def _resume(self, state: dict) -> None:
        root = self.manifest.name
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
        same_windows(root, state, self._per_window)
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.window, self.window_step = state["window"], state["window_step"]
        if state.get("elastic"):
            o = state["elastic"]
            self._deal_rest(
                elastic.OldWorld(
                    o["world"], o["batch_size"], tuple(o["windows"]), tuple(o["window_steps"])
                )
            )
        if self._assignment() != state["assignment"]:
            raise ShardError(
                f"{root}: the shards dealt to rank {self.rank} in epoch {self.epoch} differ from the "
                "saved run's (the manifest or the seed changed); cannot resume exactly"
            )

    def _resume_elsewhere(self, states: list[dict]) -> None:
        """Continue the epoch that every rank of another world size (``states``) was in."""
        self.epoch, old = saved_world(states, self.manifest, self.config, self._per_window)
        if old is not None:
            self._deal_rest(old)

    def _deal_rest(self, old: elastic.OldWorld) -> None:
        """This rank's windows of the rest of ``self.epoch``, of which ``old``'s ranks had read part."""
        cfg = self.config
        self._rest, steps = rank_rest(
            self.manifest, cfg, self.epoch, self._per_window, old, self.world, self.rank
        )
        self._old, self._rest_epoch = old, self.epoch
        samples = np.array([w.samples for w in self._rest], dtype=np.int64)
        self._window_batches = partition.window_batches(samples, cfg.batch_size, self._drop)
        if self._drop:
            self._steps = steps

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
        return ShardError(f"{self.manifest.name}: DALI could not decode a sample: {first.strip()}")
