"""The training loop: set-up, then epochs of steps, with logging and checkpoints in the order they run.

Resumable state goes through ``state_dict()`` everywhere (model with its queue,
optimizer, scaler, data loader, random generators), so resuming is one mechanism:
a run killed at any moment and resumed from its newest checkpoint continues with
the same losses, step for step, as one never interrupted (same seed and world size).
A checkpoint is trusted only once verified (``_resume``): read without running code,
complete, weights finite and equal to the digest written with them, written by the
same configuration up to the keys ``config.SAFE_TO_CHANGE`` allows.
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

from ..model.moco import MoCo
from ..model.momentum import momentum_at
from ..pipeline.loader import ViewLoader
from . import checkpoint, distributed
from .checkpoint import CheckpointError
from .config import Config, ConfigError, resume_changes, to_dict
from .eval.knn import config_knn
from .metrics import Metrics
from .schedule import learning_rates
from .step import (
    amp_dtype,
    backward_step,
    build_model,
    build_optimizer,
    forward_loss,
)
from .validation import (
    augment_config,
    check_knn_folders,
    check_out,
    check_train_folder,
    loader_config,
    validate,
)

__all__ = ["train", "Run", "build_model", "knn_accuracy", "TrainingStopped", "set_determinism"]

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


def knn_accuracy(model: MoCo, config: Config, device: torch.device) -> dict:
    """Weighted kNN top-1/top-5 of the query backbone on ``data.knn_train`` / ``data.knn_val``."""
    return config_knn(model.encoder_q, config, device, amp_dtype(config.run.amp, device))


def train(config: Config) -> dict:
    """Run (or resume) pretraining as ``config`` says; return the last metrics."""
    stop = _StopSignal()  # from the start, so a preemption during set-up is not lost
    try:
        return _train(config, stop)
    finally:
        stop.restore()


def _train(config: Config, stop: _StopSignal) -> dict:
    run = Run(config)  # set up, resumed where a checkpoint says
    try:
        while run.step < run.total_steps:
            if run.train_epoch(stop):
                return run.last  # stopped by a signal, checkpoint written
            if run.step % run.steps_per_epoch == 0:
                run.end_of_epoch()
        run.finish()
        return run.last
    finally:
        run.close()


class Run:
    """One training process: what its steps share, set up (or resumed) once.

    The loop in ``_train`` reads top to bottom: epochs of steps, a checkpoint and the
    kNN monitor at each epoch end, a last checkpoint. Each method here is one of
    those steps; the state they share lives on the object, not in closures.
    """

    def __init__(self, config: Config):
        self.config = config
        r = config.run
        set_determinism(r.deterministic)  # before any CUDA work
        self.dist = distributed.setup(r.device, r.dist_timeout_s)
        try:
            self._set_up()
        except BaseException:
            distributed.teardown()
            raise

    def _set_up(self) -> None:
        config, r = self.config, self.config.run
        validate(config, self.dist.world, torch.cuda.is_available() and r.device != "cpu")
        self.device = self.dist.device
        self.amp = amp_dtype(r.amp, self.device)
        self.out = Path(r.out)
        check_train_folder(config, self.dist.world)  # before any checkpoint is read or set aside
        check_knn_folders(config)
        if self.dist.main:
            check_out(self.out)
        random.seed(r.seed + self.dist.rank)
        np.random.seed(r.seed + self.dist.rank)
        torch.manual_seed(r.seed)  # identical initial weights on every rank
        self.model, self.net = self._model()
        self.resume_path, state, changes = (
            self._resume()
        )  # the model holds the checkpoint's weights from here
        self.loader = self._data(state)
        self.optimizer = build_optimizer(config, self.model, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.steps_per_epoch = len(self.loader)
        self.total_steps = self.steps_per_epoch * r.epochs
        if r.max_steps:
            self.total_steps = min(r.max_steps, self.total_steps)
        o = config.optim
        self.rates = learning_rates(
            o.lr_per_256 * config.data.batch_size / 256,
            self.steps_per_epoch,
            r.epochs,
            o.schedule,
            o.milestones,
            o.warmup_epochs,
        )
        self.step, self.nonfinite, self.skipped = 0, 0, 0
        self.pending: Optional[tuple[int, torch.Tensor]] = None  # (step, skip flag) not read yet
        self.last_good = (
            self.resume_path
        )  # the newest checkpoint known good: resumed from, or written
        if state:
            self._restore(state)
        self.metrics = Metrics(self.out, self.dist.main)
        if self.dist.main:
            self._announce(state is not None, changes)
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

    def _data(self, state: Optional[dict]) -> ViewLoader:
        d, _r = self.config.data, self.config.run
        augment_cfg = augment_config(self.config)
        loader_cfg = loader_config(self.config, self.dist.world, self.amp)
        # Each rank opens only the shards dealt to it, a window at a time, and every
        # epoch deals them anew (see pipeline/partition.py); the loader hands epochs over.
        return ViewLoader(
            d.train,
            augment_cfg,
            loader_cfg,
            rank=self.dist.rank,
            world=self.dist.world,
            device_id=distributed.dali_device_id(self.device),
            state=state["loader"][self.dist.rank] if state else None,
        )

    def _model(self) -> tuple[MoCo, torch.nn.Module]:
        try:
            model = build_model(self.config, self.device)
        except (
            ValueError
        ) as error:  # what only the real run can check (a shuffle group of torchrun's nodes)
            raise ConfigError(f"model: {error}") from None
        if self.config.run.compile:
            model.encoder_q = torch.compile(model.encoder_q)
            model.encoder_k = torch.compile(model.encoder_k)
        if self.dist.world == 1:
            return model, model
        # The queue and the key encoder are kept identical on every rank by the algorithm
        # itself; broadcasting buffers on every forward would only cost time.
        return model, DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,
        )

    def _resume(self) -> tuple[Optional[Path], Optional[dict], dict]:
        """The checkpoint to continue from, verified, its weights loaded into the model; and the keys changed since.

        With ``run.resume auto`` a checkpoint that fails verification is skipped for the
        next older one, renamed ``*.pt.bad`` (so that rotation never deletes a good one
        in its favour) and named in the log. A checkpoint of another world size or
        configuration is refused, not skipped: the older ones were written by the same run.
        """
        r = self.config.run
        if not r.resume:
            newest = checkpoint.latest(self.out)
            if newest is not None:
                raise ConfigError(
                    f"run.out {self.out} holds a run (newest {newest.name}): continue it with "
                    "--run.resume auto, or give another run.out"
                )
            return None, None, {}
        found = checkpoint.candidates(self.out) if r.resume == "auto" else [Path(r.resume)]
        chosen, state, changes, skipped = None, None, {}, []
        for path in found:
            try:
                state, changes = self._verified(path)
                chosen = path
                break
            except CheckpointError as error:
                if r.resume != "auto":
                    raise
                skipped.append((path, str(error)))
        if self.dist.world > 1:  # every rank read the files itself: they must agree
            chosen_by_rank = [None] * self.dist.world
            torch.distributed.all_gather_object(chosen_by_rank, str(chosen))
            if len(set(chosen_by_rank)) > 1:
                raise CheckpointError(
                    f"run.resume auto: ranks found different good checkpoints ({chosen_by_rank})"
                )
        if self.dist.main:
            for path, why in skipped:
                path.rename(path.with_name(path.name + ".bad"))
                log.warning("skipped %s (renamed *.bad): %s", path.name, why)
        if skipped and chosen is None:
            raise CheckpointError(
                f"run.resume auto: no good checkpoint in {self.out}; skipped {len(skipped)}, "
                f"newest: {skipped[0][1]}"
            )
        return chosen, state, changes

    def _verified(self, path: Path) -> tuple[dict, dict]:
        """A checkpoint's state once it is known good, loaded into the model; the configuration keys changed."""
        state = checkpoint.check(checkpoint.load(path), path)
        if state["world"] != self.dist.world:
            raise ConfigError(
                f"{path}: written by {state['world']} ranks, this run has {self.dist.world}; "
                "an exact resume needs the same world size"
            )
        allowed, refused = resume_changes(state["config"], self.config)
        if refused:
            listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in refused.items())
            raise ConfigError(
                f"{path}: written with another configuration: {listed}; these keys change the run's "
                "state or meaning: resume with the checkpoint's values, or start another run.out"
            )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            first = next(
                (line.strip() for line in str(error).splitlines()[1:] if line.strip()),
                str(error)[:200],
            )
            raise CheckpointError(f"{path}: its weights do not fit this model: {first}") from None
        if checkpoint.weights_digest(self.model) != state["rank_digests"][self.dist.rank]:
            raise CheckpointError(
                f"{path}: its weights or queue differ from the digest written with them "
                "(changed after it was written)"
            )
        return state, allowed

    def _restore(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.skipped = state["step"], state["skipped"]
        checkpoint.set_rng_state(state["rng"][self.dist.rank], self.device)

    def _announce(self, resumed: bool, changes: dict) -> None:
        config = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if not resumed or changes or not (self.out / "config.json").exists():
            checkpoint.write_atomic(
                self.out / "config.json",
                lambda f: f.write((json.dumps(to_dict(config), indent=1) + "\n").encode()),
            )
        log.info("configuration: %s", json.dumps(to_dict(config)))
        if changes:
            listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
            log.info("resuming with changed keys (allowed, config.json updated): %s", listed)
            self.metrics.write(
                "resume",
                self.step,
                {
                    "checkpoint": str(self.resume_path),
                    "changed": {k: list(v) for k, v in changes.items()},
                },
            )
        log.info(
            "%s on %s x%d, AMP %s, %d steps per epoch, %s",
            config.model.arch,
            self.device.type,
            self.dist.world,
            self.amp or "off",
            self.steps_per_epoch,
            f"resuming at step {self.step} from {self.resume_path}" if resumed else "from scratch",
        )
        if not config.data.knn_train:
            log.info(
                "kNN monitor off: give labelled shard folders as data.knn_train and data.knn_val"
            )

    # ---- the loop

    def train_epoch(self, stop: _StopSignal) -> bool:
        """The rest of this epoch; True when a stop was requested (a checkpoint is written)."""
        r = self.config.run
        epoch = self.step // self.steps_per_epoch
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
        self.model.m = momentum_at(
            self.step,
            self.steps_per_epoch * self.config.run.epochs,
            self.config.model.m,
            self.config.model.momentum_schedule,
        )
        loss, logits, labels = forward_loss(self.net, batch.view_q, batch.view_k, self.amp)
        self.optimizer.zero_grad(set_to_none=True)
        # Non-finite gradients skip the update on the device; the flag is read one step
        # later, once this step's work is queued, so the GPU never waits for the host.
        bad = backward_step(loss, self.optimizer, self.scaler)
        self.step += 1
        self.bar.update(1)
        self.settle_nonfinite()
        self.pending = (self.step, bad)
        self.window.steps += 1
        return loss, logits, labels

    def settle_nonfinite(self) -> None:
        """Read the pending skip flag (a host sync) and keep the streak; stop after ``run.max_nonfinite``."""
        if self.pending is None:
            return
        (at, bad), self.pending = self.pending, None
        if not bad.item():
            self.nonfinite = 0
            return
        self.nonfinite += 1
        self.skipped += 1
        if self.nonfinite >= self.config.run.max_nonfinite:
            good = (
                f"the last good checkpoint is {self.last_good}"
                if self.last_good
                else "no checkpoint was written"
            )
            raise TrainingStopped(
                f"{self.nonfinite} non-finite losses in a row at step {at}; stopped, {good}"
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
                f"step {self.step}/{self.total_steps} epoch {epoch} loss {last['loss']:.4f} acc1 {last['acc1']:.1f} "
                f"lr {last['lr']:.4g} m {last['momentum']:.4f} {last['images_per_s']:.0f} img/s "
                f"data-wait {100 * last['data_wait']:.0f}%"
            ),
        )
        self.window = _Window(time.perf_counter())

    def end_of_epoch(self) -> None:
        """A checkpoint at every epoch end, and the kNN monitor when it is due."""
        self.checkpoint()
        finished = self.step // self.steps_per_epoch
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
            and self.step % self.steps_per_epoch
            and self.nonfinite == 0
        ):
            self.save()

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        distributed.teardown()

    # ---- checkpoints

    def checkpoint(self) -> None:
        """Settle the pending skip flag; save, unless inside a streak of non-finite losses (the newest stays good)."""
        self.settle_nonfinite()
        if self.nonfinite == 0:
            self.save()

    def save(self) -> None:
        """Every rank's loader and random state, gathered; written by rank 0."""
        gathered = {
            "loader": self.loader.state_dict(),
            "rng": checkpoint.rng_state(self.device),
            "digest": checkpoint.weights_digest(self.model),
        }
        parts = [gathered]
        if self.dist.world > 1:
            parts = [None] * self.dist.world
            torch.distributed.all_gather_object(parts, gathered)
        if self.dist.main:
            self.last_good = checkpoint.save(
                self.out,
                self.step,
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "step": self.step,
                    "skipped": self.skipped,
                    "world": self.dist.world,
                    "config": to_dict(self.config),
                    "loader": [p["loader"] for p in parts],
                    "rng": [p["rng"] for p in parts],
                    "rank_digests": [p["digest"] for p in parts],
                },
                self.config.run.keep_last,
            )
            if len({p["digest"] for p in parts}) > 1:
                log.warning(
                    "step %d: ranks disagree on weights or queue (digests %s)",
                    self.step,
                    [p["digest"][:8] for p in parts],
                )
        if self.dist.world > 1:
            torch.distributed.barrier()


@dataclass
class _Window:
    """The steps since the last metrics record: when it began, how long steps waited for data."""

    start: float
    wait: float = 0.0
    steps: int = 0
