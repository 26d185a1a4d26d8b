"""The training loop: set-up, then epochs of steps, with logging and checkpoints in the order they run.

``Run`` builds each part of a run once, from the tree, cheapest checks first (the keys, the
folders' manifests), then the model, the optimizer and the schedules, then the checkpoint to
continue from and the data; ``train`` is the loop over them. Resumable state goes through
``state_dict()`` everywhere, so a run killed at any moment and resumed continues with the same
losses, step for step (same seed and world size); on another world size it reads the rest of the
interrupted epoch, dealt again, with the epochs' ends and the schedules moved (``epochs``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..common.files import write_json_atomic
from ..model.moco import MoCo
from ..pipeline.config import LoaderConfig
from ..pipeline.loader import ViewLoader
from . import distributed
from .checkpointer import Checkpointer
from .config import MAX_STEPS, Config, ConfigError, check, to_dict
from .epochs import EpochClock, describe, world_change
from .eval.knn import config_knn
from .folders import check_knn_folders, check_out, check_resume, hold_out, steps_per_epoch
from .metrics import Metrics
from .step import (
    NonFinite,
    amp_dtype,
    backward_step,
    build_model,
    build_optimizer,
    compile_encoders,
    forward_loss,
    schedules,
    views_dtype,
)

__all__ = ["train", "Run", "TrainingStopped", "set_determinism"]

log = logging.getLogger("moco-train")


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite losses); the last good checkpoint stays newest."""


def set_determinism(deterministic: bool) -> None:
    """``run.deterministic``: deterministic kernels for bit-exact resumes on a GPU, or the fastest ones.

    Off, cuDNN benchmarks its convolution algorithms once per shape and keeps the
    fastest (training shapes are fixed). On, cuDNN and cuBLAS take their
    deterministic paths and PyTorch warns about any operation that has none (a
    warning, not an error: the kNN monitor's scatter has none on a GPU).
    """
    if deterministic:
        # cuBLAS reads this when its first handle is made: before any CUDA work.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


class _StopSignal:
    """SIGTERM / SIGINT (preemption): finish the step, checkpoint, exit 0."""

    def __init__(self):
        self.requested = False
        self._previous = {
            s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)
        }

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(config: Config) -> dict:
    """Run (or resume) pretraining as ``config`` says; return the last metrics."""
    stop = _StopSignal()  # from the start, so a preemption during set-up is not lost
    try:
        run = Run(config)  # set up, resumed where a checkpoint says
        try:
            while run.step < run.total_steps:
                if run.train_epoch(stop):
                    return run.last  # stopped by a signal, checkpoint written
                if run.clock.ends_epoch(run.step):
                    run.end_of_epoch()
            run.finish()
            return run.last
        finally:
            run.close()
    finally:
        stop.restore()


@dataclass
class Parts:
    """What a run is built from, once its configuration and folders are known to be good."""

    model: MoCo
    optimizer: torch.optim.Optimizer
    steps: int
    """Steps per epoch, the same on every rank."""
    rates: np.ndarray
    momenta: np.ndarray


def prepare(config: Config, dist: distributed.Dist) -> Parts:
    """The parts of a run, each built once, in the order that reports a bad value soonest.

    The keys' rules with each other and the world, then the model and its optimizer (a refused
    value named by its key), then the folders from their manifests, then the schedules over the
    steps the data gives: all before a checkpoint is touched or a shard opened. Seeds the
    generators as the run starts from them.
    """
    r, device = config.run, dist.device
    amp = amp_dtype(r.amp, device)
    check(config, dist.world, cuda=device.type == "cuda", amp=amp is not None)
    random.seed(r.seed + dist.rank)
    np.random.seed(r.seed + dist.rank)
    torch.manual_seed(r.seed)  # identical initial weights on every rank
    model = build_model(config, device)
    optimizer = build_optimizer(config, model, device)
    check_resume(config)
    steps = steps_per_epoch(config, dist.world)
    if steps * r.epochs > MAX_STEPS:
        raise ConfigError(
            f"run.epochs {r.epochs} of {steps} steps each is {steps * r.epochs} steps, more than "
            f"a run's schedules are computed for ({MAX_STEPS}); lower run.epochs"
        )
    check_knn_folders(config)
    check_out(config, dist)
    rates, momenta = schedules(config, steps)
    return Parts(model, optimizer, steps, rates, momenta)


class Run:
    """One training process: its parts, built once in the order below, and the steps of the loop.

    The state the steps share lives on the object, not in closures; each method is one step of
    the loop in ``train``.
    """

    def __init__(self, config: Config):
        self.config = config
        set_determinism(config.run.deterministic)  # before any CUDA work
        self.dist = distributed.setup(config.run.device, config.run.dist_timeout_s)
        self.lock = None
        try:
            self._set_up()
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            distributed.teardown()
            raise

    def _set_up(self) -> None:
        config, r = self.config, self.config.run
        self.device = self.dist.device
        self.amp = amp_dtype(r.amp, self.device)
        parts = prepare(config, self.dist)
        # Held from before a checkpoint is read or set aside until the last one is written.
        self.lock = hold_out(config, self.dist)
        self.model, self.optimizer = parts.model, parts.optimizer
        self.steps_per_epoch, self.rates, self.momenta = parts.steps, parts.rates, parts.momenta
        self.net = self._wrap(self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.checkpointer = Checkpointer(config, self.dist, self.device)
        resumed = self.checkpointer.resume(self.model)  # the checkpoint's weights from here on
        self.resumed_from: Optional[Path] = resumed.path
        self.step, self.streak, self.skipped = 0, 0, 0
        if resumed.state:
            self.step, self.skipped = self.checkpointer.restore(
                resumed.state, self.optimizer, self.scaler
            )
        self.nonfinite = NonFinite(r.max_nonfinite, self.device, self.skipped)
        self.loader = self._data(resumed.state)
        assert len(self.loader) == self.steps_per_epoch, (len(self.loader), self.steps_per_epoch)
        self.clock = EpochClock.of(self.step, self.steps_per_epoch, self.loader)
        if not self.clock.regular:  # the world size changed in this run: the epochs moved
            self.rates, self.momenta = schedules(
                config, self.steps_per_epoch, self.clock.epoch_at_step(r.epochs)
            )
        self.total_steps = self.clock.total_steps(r.epochs)
        if r.max_steps:
            self.total_steps = min(r.max_steps, self.total_steps)
        moved = world_change(
            config, resumed.state, self.dist.world, self.step, self.rates, self.clock
        )
        self.out = Path(r.out)
        self.metrics = Metrics(self.out, self.dist.main)
        if self.dist.main:
            self._announce(resumed.path, resumed.changes, moved)
        self.last: dict = {}
        self.window = _Window(time.perf_counter())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.dist.main and r.progress) or None,
        )

    # ---- set-up

    def _wrap(self, model: MoCo) -> torch.nn.Module:
        """The module the step calls: the encoders compiled if asked, under DDP with several ranks."""
        compile_encoders(model, self.config)
        if self.dist.world == 1:
            return model
        # The queue and the key encoder are kept identical on every rank by the algorithm
        # itself; broadcasting buffers on every forward would only cost time.
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def _data(self, state: Optional[dict]) -> ViewLoader:
        """This rank's loader: it opens only the shards dealt to it, a window at a time, and
        every epoch deals them anew (pipeline/partition.py)."""
        d, r, world = self.config.data, self.config.run, self.dist.world
        loader_cfg = LoaderConfig(
            batch_size=d.batch_size // world,
            dtype=views_dtype(d.dtype, self.amp),
            seed=r.seed,
            read=d.read,
        )
        return ViewLoader(
            d.train,
            d.views,
            loader_cfg,
            rank=self.dist.rank,
            world=world,
            device_id=distributed.dali_device_id(self.device),
            state=state["loader"][self.dist.rank] if state and state["world"] == world else None,
            old_states=state["loader"] if state and state["world"] != world else None,
        )

    def _announce(self, resumed: Optional[Path], changes: dict, moved: dict) -> None:
        config = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if not resumed or changes or not (self.out / "config.json").exists():
            write_json_atomic(self.out / "config.json", to_dict(config), sort_keys=False)
        log.info("configuration: %s", json.dumps(to_dict(config)))
        if changes:
            listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
            log.info("resuming with changed keys (allowed, config.json updated): %s", listed)
        if moved:
            log.info(describe(self.step, moved))
        if changes or moved:
            changed = {k: list(v) for k, v in changes.items()}
            self.metrics.write(
                "resume", self.step, {"checkpoint": str(resumed), "changed": changed, **moved}
            )
        log.info(
            "%s on %s x%d, AMP %s, %d steps per epoch, %s",
            config.model.arch,
            self.device.type,
            self.dist.world,
            self.amp or "off",
            self.steps_per_epoch,
            f"resuming at step {self.step} from {resumed}" if resumed else "from scratch",
        )
        if not config.data.knn_train:
            log.info(
                "kNN monitor off: give labelled shard folders as data.knn_train and data.knn_val"
            )

    # ---- the loop

    def train_epoch(self, stop: _StopSignal) -> bool:
        """The rest of this epoch; True when a stop was requested (a checkpoint is written)."""
        r = self.config.run
        epoch = self.clock.epoch(self.step)
        ready = time.perf_counter()
        for batch in self.loader:  # the rest of this epoch, after a resume
            self.window.wait += time.perf_counter() - ready
            loss, logits, labels = self.train_step(batch)
            if self.step % r.log_every == 0 or self.step == self.total_steps:
                self.log(epoch, loss, logits, labels)
            if self.step % r.ckpt_every == 0 or stop.requested:
                self.checkpoint()
            if stop.requested:
                log.info("stop requested: checkpoint written at step %d, exiting", self.step)
                return True
            if self.step >= self.total_steps:
                break
            ready = time.perf_counter()
        return False

    def train_step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step at the scheduled rate and momentum."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.rates[self.step])
        self.model.m = float(self.momenta[self.step])
        loss, logits, labels = forward_loss(self.net, batch.view_q, batch.view_k, self.amp)
        self.optimizer.zero_grad(set_to_none=True)
        # Non-finite gradients skip the update on the device, and the skip is counted there:
        # the host reads the count at the logging and checkpoint cadence only, so the device
        # never waits for the host between them.
        bad = backward_step(loss, self.optimizer, self.scaler)
        self.step += 1
        self.bar.update(1)
        self.nonfinite.record(bad, self.step)
        self.window.steps += 1
        return loss, logits, labels

    def settle_nonfinite(self) -> None:
        """Read the device's count of skipped steps (a host sync); stop once a streak of
        ``run.max_nonfinite`` happened."""
        self.streak, self.skipped, stopped_at = self.nonfinite.read()
        if stopped_at >= 0:
            last_good = self.checkpointer.last_good
            good = (
                f"the last good checkpoint is {last_good}"
                if last_good
                else "no checkpoint was written"
            )
            raise TrainingStopped(
                f"{self.nonfinite.limit} non-finite losses in a row at step {stopped_at}; "
                f"stopped, {good}"
            )

    def log(
        self, epoch: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
    ) -> None:
        """One metrics record over the steps since the last (a host sync)."""
        self.settle_nonfinite()
        elapsed = time.perf_counter() - self.window.start
        images = self.window.steps * self.config.data.batch_size
        self.last = {
            "epoch": epoch,
            "loss": loss.item(),
            "acc1": (logits.argmax(dim=1) == labels).float().mean().item() * 100,
            "lr": float(self.rates[self.step - 1]),
            "momentum": self.model.m,
            "images_per_s": images / elapsed,
            "images_per_s_per_gpu": images / elapsed / self.dist.world,
            "data_wait": self.window.wait / elapsed,
            "skipped_steps": self.skipped,
            "peak_memory_MB": torch.cuda.max_memory_allocated(self.device) / 2**20
            if self.device.type == "cuda"
            else None,
        }
        last = self.last
        self.bar.set_postfix(loss=f"{last['loss']:.3f}", img_s=f"{last['images_per_s']:.0f}")
        self.metrics.write(
            "train",
            self.step,
            last,
            (
                f"step {self.step}/{self.total_steps} epoch {epoch} loss {last['loss']:.4f} "
                f"acc1 {last['acc1']:.1f} lr {last['lr']:.4g} m {last['momentum']:.4f} "
                f"{last['images_per_s']:.0f} img/s data-wait {100 * last['data_wait']:.0f}%"
            ),
        )
        self.window = _Window(time.perf_counter())

    def end_of_epoch(self) -> None:
        """A checkpoint at every epoch end, and the kNN monitor when it is due."""
        self.checkpoint()
        finished = self.clock.epoch(self.step)
        r = self.config.run
        if r.knn_every and finished % r.knn_every == 0 and self.config.data.knn_train:
            # Every rank extracts its own share of the folders and gets the same result;
            # no rank waits for another in a barrier while the monitor runs.
            result = config_knn(
                self.model.encoder_q,
                self.config,
                self.device,
                self.amp,
                rank=self.dist.rank,
                world=self.dist.world,
            )
            if self.dist.main:
                self.metrics.write(
                    "knn",
                    self.step,
                    {"epoch": finished, **result},
                    f"epoch {finished} kNN top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%",
                )
            self.last = {**self.last, "knn_top1": result["top1"], "knn_top5": result["top5"]}

    def finish(self) -> None:
        """The last checkpoint, unless a periodic or epoch-end one has just been written."""
        self.settle_nonfinite()
        if (
            self.step % self.config.run.ckpt_every
            and not self.clock.ends_epoch(self.step)
            and self.streak == 0
        ):
            self.save()

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        if self.lock is not None:
            self.lock.release()
        distributed.teardown()

    # ---- checkpoints

    def checkpoint(self) -> None:
        """Settle the pending skip flag; save, unless inside a streak of non-finite losses (the
        newest checkpoint stays good)."""
        self.settle_nonfinite()
        if self.streak == 0:
            self.save()

    def save(self) -> None:
        self.checkpointer.save(
            self.step,
            self.skipped,
            self.model,
            self.optimizer,
            self.scaler,
            self.loader.state_dict(),
        )


@dataclass
class _Window:
    """The steps since the last metrics record: when it began, how long steps waited for data."""

    start: float
    wait: float = 0.0
    steps: int = 0
