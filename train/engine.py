"""The training loop: set-up, then epochs of steps, with logging and checkpoints in the order they run.

Resumable state goes through ``state_dict()`` everywhere (model with its queue,
optimizer, scaler, data loader, random generators), so resuming is one mechanism:
a run killed at any moment and resumed from its newest checkpoint continues with
the same losses, step for step, as one never interrupted (same seed and world size).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from moco_dali.model.moco import MoCo
from moco_dali.model.momentum import momentum_at
from moco_dali.pipeline.augment import EvalConfig, preset as augment_preset
from moco_dali.pipeline.loader import LoaderConfig, ViewLoader
from moco_dali.train import checkpoint, distributed
from moco_dali.train.config import Config, ConfigError, to_dict, validate
from moco_dali.train.eval.knn import extract_features, knn_classify
from moco_dali.train.metrics import Metrics
from moco_dali.train.schedule import learning_rates
from moco_dali.train.step import amp_dtype, backward_step, build_model, build_optimizer, forward_loss, views_dtype

__all__ = ["train", "build_model", "knn_accuracy", "TrainingStopped"]

log = logging.getLogger("moco-train")


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite losses); the last good checkpoint stays newest."""


def _rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class _StopSignal:
    """SIGTERM / SIGINT (preemption): finish the step, checkpoint, exit 0."""

    def __init__(self):
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _knn(model: MoCo, config: Config, dist, device, amp) -> Optional[dict]:
    d = config.data
    if not d.knn_train:
        return None
    eval_cfg = EvalConfig(resize=d.eval_resize, size=d.size)
    batch = max(1, d.batch_size // dist.world)
    train_f, train_y, classes = extract_features(model.encoder_q, d.knn_train, eval_cfg, batch_size=batch,
                                                 device=device, channels_last=config.run.channels_last,
                                                 amp_dtype=amp, threads=d.threads or None)
    val_f, val_y, _ = extract_features(model.encoder_q, d.knn_val, eval_cfg, batch_size=batch, device=device,
                                       channels_last=config.run.channels_last, amp_dtype=amp,
                                       threads=d.threads or None)
    return knn_classify(train_f, train_y, val_f, val_y, classes, k=config.run.knn_k, t=config.run.knn_t)


def knn_accuracy(model: MoCo, config: Config, device: torch.device) -> dict:
    """Weighted kNN top-1/top-5 of the query backbone on ``data.knn_train`` / ``data.knn_val``."""
    from moco_dali.train.distributed import Dist

    return _knn(model, config, Dist(0, 1, 0, device), device, amp_dtype(config.run.amp, device))


def train(config: Config) -> dict:
    """Run (or resume) pretraining as ``config`` says; return the last metrics."""
    # ---- set-up: distributed, data, model, optimizer, schedules, resume
    stop = _StopSignal()  # from the start, so a preemption during set-up is not lost
    try:
        return _train(config, stop)
    finally:
        stop.restore()


def _train(config: Config, stop: _StopSignal) -> dict:
    dist = distributed.setup(config.run.device)
    validate(config, dist.world, torch.cuda.is_available() and config.run.device != "cpu")
    device = dist.device
    amp = amp_dtype(config.run.amp, device)
    out = Path(config.run.out)
    d, m, o, r = config.data, config.model, config.optim, config.run
    random.seed(r.seed + dist.rank)
    np.random.seed(r.seed + dist.rank)
    torch.manual_seed(r.seed)  # identical initial weights on every rank

    view_dtype = views_dtype(d.dtype, amp)
    augment_cfg = augment_preset(d.preset, d.size, hue_space=d.hue_space)
    loader_cfg = LoaderConfig(batch_size=d.batch_size // dist.world, dtype=view_dtype, seed=r.seed,
                              threads=d.threads or None, shuffle_buffer=d.shuffle_buffer)
    resume_path = checkpoint.latest(out) if r.resume == "auto" else (Path(r.resume) if r.resume else None)
    state = checkpoint.load(resume_path) if resume_path else None
    if state and state["world"] != dist.world:
        raise ConfigError(f"{resume_path}: written by {state['world']} ranks, this run has {dist.world}; "
                          "an exact resume needs the same world size")
    loader = ViewLoader(d.train, augment_cfg, loader_cfg, rank=dist.rank, world=dist.world,
                        device_id=device.index if device.type == "cuda" else None,
                        state=state["loader"][dist.rank] if state else None)

    model = build_model(config, device)
    if r.compile:
        model.encoder_q = torch.compile(model.encoder_q)
        model.encoder_k = torch.compile(model.encoder_k)
    # The queue and the key encoder are kept identical on every rank by the algorithm
    # itself; broadcasting buffers on every forward would only cost time.
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  broadcast_buffers=False) if dist.world > 1 else model
    base_lr = o.lr_per_256 * d.batch_size / 256
    optimizer = build_optimizer(config, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * r.epochs if not r.max_steps else min(r.max_steps, steps_per_epoch * r.epochs)
    rates = learning_rates(base_lr, steps_per_epoch, r.epochs, o.schedule, o.milestones, o.warmup_epochs)
    step, nonfinite, skipped = 0, 0, 0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, skipped = state["step"], state["skipped"]
        _set_rng_state(state["rng"][dist.rank], device)

    metrics = Metrics(out, dist.main)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(config), indent=1) + "\n")
        log.info("configuration: %s", json.dumps(to_dict(config)))
        log.info("%s on %s x%d, AMP %s, %d steps per epoch, %s", m.arch, device.type, dist.world,
                 amp or "off", steps_per_epoch, f"resuming at step {step} from {resume_path}" if state
                 else "from scratch")
        if not d.knn_train:
            log.info("kNN monitor off: give labelled shard folders as data.knn_train and data.knn_val")

    def digest() -> str:
        # What the algorithm keeps identical on every rank: both encoders' weights and
        # the queue (BN statistics are per rank under shuffle-BN and are left out).
        h = hashlib.sha256()
        for tensor in [*model.encoder_q.parameters(), *model.encoder_k.parameters(), model.queue.queue,
                       model.queue.queue_ptr]:
            h.update(tensor.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    def save() -> None:
        gathered = {"loader": loader.state_dict(), "rng": _rng_state(device), "digest": digest()}
        if dist.world > 1:
            parts = [None] * dist.world
            torch.distributed.all_gather_object(parts, gathered)
        else:
            parts = [gathered]
        if dist.main:
            checkpoint.save(out, step, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "skipped": skipped, "world": dist.world, "config": to_dict(config),
                "loader": [p["loader"] for p in parts], "rng": [p["rng"] for p in parts],
                "rank_digests": [p["digest"] for p in parts],
            }, r.keep_last)
            if len({p["digest"] for p in parts}) > 1:
                log.warning("step %d: ranks disagree on weights or queue (digests %s)", step,
                            [p["digest"][:8] for p in parts])
        if dist.world > 1:
            torch.distributed.barrier()

    pending: Optional[tuple[int, torch.Tensor]] = None  # (step, skip flag) not read yet

    def settle_nonfinite() -> None:
        """Read the pending skip flag (a host sync) and keep the streak; stop after ``run.max_nonfinite``."""
        nonlocal pending, nonfinite, skipped
        if pending is None:
            return
        (at, bad), pending = pending, None
        if bad.item():
            nonfinite += 1
            skipped += 1
            if nonfinite >= r.max_nonfinite:
                raise TrainingStopped(f"{nonfinite} non-finite losses in a row at step {at}; stopped, "
                                      f"the newest checkpoint in {out} is the last good one")
        else:
            nonfinite = 0

    # ---- the loop
    last: dict = {}
    window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not (dist.main and r.progress) or None,
               dynamic_ncols=True)
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            ready = time.perf_counter()
            for batch in loader:  # the rest of this epoch, after a resume
                window_wait += time.perf_counter() - ready
                for group in optimizer.param_groups:
                    group["lr"] = float(rates[step])
                model.m = momentum_at(step, steps_per_epoch * r.epochs, m.m, m.momentum_schedule)
                loss, logits, labels = forward_loss(net, batch.view_q, batch.view_k, amp)
                optimizer.zero_grad(set_to_none=True)
                # Non-finite gradients skip the update on the device; the flag is read one
                # step later, once this step's work is queued, so the GPU never waits for
                # the host in between.
                bad = backward_step(loss, optimizer, scaler)
                step += 1
                bar.update(1)
                settle_nonfinite()
                pending = (step, bad)
                window_steps += 1
                if step % r.log_every == 0 or step == total_steps:
                    settle_nonfinite()
                    elapsed = time.perf_counter() - window_start
                    images = window_steps * d.batch_size
                    last = {
                        "epoch": epoch, "loss": loss.item(),
                        "acc1": (logits.argmax(dim=1) == labels).float().mean().item() * 100,
                        "lr": float(rates[step - 1]), "momentum": model.m,
                        "images_per_s": images / elapsed, "images_per_s_per_gpu": images / elapsed / dist.world,
                        "data_wait": window_wait / elapsed, "skipped_steps": skipped,
                        "peak_memory_MB": torch.cuda.max_memory_allocated(device) / 2**20
                        if device.type == "cuda" else None,
                    }
                    bar.set_postfix(loss=f"{last['loss']:.3f}", img_s=f"{last['images_per_s']:.0f}")
                    metrics.write("train", step, last, (
                        f"step {step}/{total_steps} epoch {epoch} loss {last['loss']:.4f} acc1 {last['acc1']:.1f} "
                        f"lr {last['lr']:.4g} m {last['momentum']:.4f} {last['images_per_s']:.0f} img/s "
                        f"data-wait {100 * last['data_wait']:.0f}%"))
                    window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
                # No checkpoint inside a streak of non-finite losses: the newest one stays good.
                if step % r.ckpt_every == 0 or stop.requested:
                    settle_nonfinite()
                    if nonfinite == 0:
                        save()
                if stop.requested:
                    log.info("stop requested: checkpoint written at step %d, exiting", step)
                    return last
                if step >= total_steps:
                    break
                ready = time.perf_counter()
            if step % steps_per_epoch == 0:  # a whole epoch: checkpoint, and the kNN monitor when due
                settle_nonfinite()
                if nonfinite == 0:
                    save()
                finished_epoch = step // steps_per_epoch
                if r.knn_every and finished_epoch % r.knn_every == 0 and config.data.knn_train:
                    if dist.main:
                        result = _knn(model, config, dist, device, amp)
                        metrics.write("knn", step, {"epoch": finished_epoch, **result},
                                      f"epoch {finished_epoch} kNN top-1 {result['top1']:.2f}% "
                                      f"top-5 {result['top5']:.2f}%")
                        last = {**last, "knn_top1": result["top1"], "knn_top5": result["top5"]}
                    if dist.world > 1:
                        torch.distributed.barrier()
        settle_nonfinite()
        if step % r.ckpt_every and step % steps_per_epoch and nonfinite == 0:
            save()
        return last
    finally:
        bar.close()
        metrics.close()
        distributed.teardown()
