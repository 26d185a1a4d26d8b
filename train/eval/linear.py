"""Linear evaluation: the paper's protocol for measuring frozen features.

A linear layer on the pooled features of the frozen query backbone (kept in eval
mode, so its BN statistics do not move either), trained with SGD at the reference
settings of ``main_lincls.py``: lr 30, momentum 0.9, no weight decay, batch 256,
x0.1 at 60 and 80 of 100 epochs; RandomResizedCrop (0.08, 1) plus flip for
training, resize plus centre crop for validation, both through the DALI pipeline.
Resumable at epoch boundaries; at the end it checks that the backbone's weights
are bit for bit what they were. The output folder is locked while a probe writes in it.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from ...common.lock import FolderLock
from ...common.options import flatten
from ...model.encoders import feature_dim
from ...pipeline.config import LoaderConfig, ReadConfig
from ...pipeline.loader import ViewLoader
from ...pipeline.recipes import EvalConfig, custom
from .. import checkpoint
from ..distributed import dali_device_id
from ..metrics import Metrics
from ..schedule import learning_rates
from .knn import pooled_features
from .pretrained import weights_digest
from .protocol import LinearConfig

__all__ = ["linear_probe", "evaluate", "LOCK_NAME"]

LOCK_NAME = ".moco-eval-linear.lock"
"""The lock file a probe holds in its output folder while it runs."""

log = logging.getLogger("moco-eval")


def _settings(config: dict) -> dict:
    # What decides the result; threads, progress and validation frequency may change on resume.
    flat = flatten(config)
    return {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in _MAY_CHANGE}


_MAY_CHANGE = ("threads", "progress", "val_every")


@torch.no_grad()
def evaluate(
    encoder: nn.Module, classifier: nn.Module, loader: ViewLoader, amp_dtype: Optional[torch.dtype]
) -> dict[str, float]:
    """Top-1 / top-5 (%) and mean loss of ``classifier`` on every sample of ``loader``."""
    correct1 = correct5 = seen = 0
    loss = 0.0
    for batch in loader:
        logits = classifier(pooled_features(encoder, batch.view_q, amp_dtype))
        loss += F.cross_entropy(logits, batch.labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == batch.labels).sum().item()
        correct5 += (top == batch.labels[:, None]).any(dim=1).sum().item()
        seen += len(batch)
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "loss": loss / seen}


def linear_probe(
    encoder: nn.Module,
    train: str,
    val: str,
    cfg: LinearConfig,
    out: Path,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    resume: bool = True,
) -> dict:
    """Train and validate the linear classifier on ``encoder``'s frozen backbone; return the final
    figures. ``cfg.views`` must have its size and resize.

    ``out`` (made if missing) is locked for the probe's whole life: a second probe into it is
    refused with ``FolderInUse`` (a ``ValueError``) before anything is read or written.
    """
    out = Path(out)
    with FolderLock(out / LOCK_NAME, "moco-eval linear", "--out", create=True):
        return _probe(encoder, train, val, cfg, out, device, amp_dtype, resume)


def _probe(
    encoder: nn.Module,
    train: str,
    val: str,
    cfg: LinearConfig,
    out: Path,
    device: torch.device,
    amp_dtype: Optional[torch.dtype],
    resume: bool,
) -> dict:
    views = cfg.views
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    state = checkpoint.load(checkpoint.latest(out)) if resume and checkpoint.latest(out) else None
    if state and _settings(state["config"]) != _settings(asdict(cfg)):
        raise ValueError(
            f"{out}: holds a linear probe with other settings; use another --out or the same settings"
        )

    train_view = custom(
        size=views.size,
        crop_scale=tuple(cfg.crop_scale),
        jitter=(0.0, 0.0, 0.0, 0.0),
        gray_p=0.0,
        blur_p=0.0,
        flip_p=0.5,
    )
    device_id = dali_device_id(device)
    train_loader = ViewLoader(
        train,
        train_view,
        LoaderConfig(
            batch_size=views.batch_size,
            dtype="float32",
            views=1,
            last_batch="partial",
            seed=cfg.seed,
            read=ReadConfig(threads=views.threads),
        ),
        device_id=device_id,
        state=state["loader"] if state else None,
    )
    val_loader = ViewLoader(
        val,
        EvalConfig(resize=views.resize, size=views.size),
        LoaderConfig(
            batch_size=views.batch_size,
            dtype="float32",
            shuffle=False,
            last_batch="partial",
            read=ReadConfig(threads=views.threads),
        ),
        device_id=device_id,
    )
    for name, loader in (("--train", train_loader), ("--val", val_loader)):
        if not loader.has_labels:
            raise ValueError(
                f"{name} {loader.manifest.root}: the shards have no labels (build with --labels folder)"
            )
    classes = len(train_loader.manifest.classes)
    if val_loader.manifest.classes != train_loader.manifest.classes:
        raise ValueError(f"--val {val_loader.manifest.root}: its classes differ from --train's")

    encoder = encoder.to(device).to(memory_format=torch.channels_last).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    before = weights_digest(encoder)
    classifier = nn.Linear(feature_dim(encoder), classes).to(device)
    # main_lincls.py's initialisation of the new layer
    nn.init.normal_(classifier.weight, mean=0.0, std=0.01)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    steps_per_epoch = len(train_loader)
    rates = learning_rates(
        cfg.lr, steps_per_epoch, cfg.epochs, "step", tuple(m * cfg.epochs for m in cfg.milestones)
    )
    epoch, history = 0, []
    if state:
        classifier.load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, history = state["epoch"], state["history"]
        torch.set_rng_state(state["rng"])
        if state["backbone_digest"] != before:
            raise ValueError(f"{out}: was trained on another backbone (weights digest differs)")
        log.info("resuming the linear probe after epoch %d from %s", epoch, out)

    metrics = Metrics(out, True)
    bar = tqdm(
        total=cfg.epochs * steps_per_epoch,
        initial=epoch * steps_per_epoch,
        unit="step",
        disable=not cfg.progress or None,
        dynamic_ncols=True,
    )
    try:
        while epoch < cfg.epochs:
            step = epoch * steps_per_epoch
            total_loss, seen = 0.0, 0
            for batch in train_loader:
                for group in optimizer.param_groups:
                    group["lr"] = float(rates[step])
                logits = classifier(pooled_features(encoder, batch.view_q, amp_dtype))
                loss = F.cross_entropy(logits, batch.labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                bar.update(1)
                total_loss += loss.detach() * len(batch)
                seen += len(batch)
            epoch += 1
            record = {
                "epoch": epoch,
                "train_loss": float(total_loss) / seen,
                "lr": float(rates[step - 1]),
            }
            if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
                result = evaluate(encoder, classifier, val_loader, amp_dtype)
                record.update(
                    val_top1=result["top1"], val_top5=result["top5"], val_loss=result["loss"]
                )
            history.append(record)
            bar.set_postfix(
                loss=f"{record['train_loss']:.3f}",
                top1=f"{record.get('val_top1', float('nan')):.2f}",
            )
            metrics.write(
                "linear",
                epoch,
                record,
                "linear epoch {epoch}: train loss {train_loss:.4f}".format(**record)
                + (
                    " val top-1 {val_top1:.2f}% top-5 {val_top5:.2f}%".format(**record)
                    if "val_top1" in record
                    else ""
                ),
            )
            checkpoint.save(
                out,
                epoch,
                {
                    "classifier": classifier.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "history": history,
                    "config": asdict(cfg),
                    "loader": train_loader.state_dict(),
                    "rng": torch.get_rng_state(),
                    "backbone_digest": before,
                },
                keep_last=2,
            )
    finally:
        bar.close()
        metrics.close()
    if weights_digest(encoder) != before:
        raise RuntimeError(
            "the backbone's weights changed during the linear probe; its result is not valid"
        )
    final = history[-1]
    result = {
        "top1": final["val_top1"],
        "top5": final["val_top5"],
        "best_top1": max(r["val_top1"] for r in history if "val_top1" in r),
        "epochs": cfg.epochs,
        "config": asdict(cfg),
        "history": history,
        "backbone_unchanged": True,
    }
    (out / "linear.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
