"""The kNN monitor: weighted kNN on l2-normalised backbone features (Wu et al. 2018).

Each validation feature votes with its k most similar training features, each vote weighted by
exp(similarity / T). Under torch.distributed every rank extracts the features of its own share
of each folder; the k nearest of every rank's share are gathered and merged, which gives every
rank the single-process answer without one rank reading a whole folder.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.nn import functional as F

from ...model.encoders import backbone, feature_dim
from ...pipeline.config import LoaderConfig, ReadConfig
from ...pipeline.loader import ViewLoader
from ...pipeline.recipes import EvalConfig
from ..config import eval_view
from ..distributed import dali_device_id, gather_rows, world_size

__all__ = ["pooled_features", "extract_features", "knn_classify", "config_knn"]


@torch.no_grad()
def pooled_features(
    encoder: torch.nn.Module,
    images: torch.Tensor,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = True,
) -> torch.Tensor:
    """The backbone's pooled features of ``images`` in float32 (autocast as asked), as kNN and the linear probe use."""
    images = (
        images.contiguous(memory_format=torch.channels_last)
        if channels_last
        else images.contiguous()
    )
    with torch.autocast(
        images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    ):
        return backbone(encoder, images).float()


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module,
    folder: str,
    eval_cfg: EvalConfig,
    *,
    batch_size: int,
    device: torch.device,
    channels_last: bool = True,
    amp_dtype: Optional[torch.dtype] = None,
    threads: int = 0,
    rank: int = 0,
    world: int = 1,
    read: Optional[ReadConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Normalised backbone features (n, D) float32 and labels (n,) of rank ``rank``'s share of a labelled
    folder (all of it with ``world`` 1), and the folder's class count; ``read`` (a run's reading
    settings, its cache's for a folder in the store) replaces ``threads``."""
    loader = ViewLoader(
        folder,
        eval_cfg,
        LoaderConfig(
            batch_size=batch_size,
            dtype="float32",
            shuffle=False,
            last_batch="partial",
            read=read or ReadConfig(threads=threads),
        ),
        rank=rank,
        world=world,
        device_id=dali_device_id(device),
    )
    if not loader.has_labels:
        raise ValueError(
            f"{folder}: the kNN monitor needs labelled shards (build with --labels folder)"
        )
    was_training = encoder.training
    encoder.eval()
    features = [torch.zeros(0, feature_dim(encoder), device=device)]
    labels = [torch.zeros(0, dtype=torch.int64, device=device)]
    try:
        for batch in loader:
            features.append(
                F.normalize(
                    pooled_features(encoder, batch.view_q.to(device), amp_dtype, channels_last),
                    dim=1,
                )
            )
            labels.append(batch.labels.to(device))
    finally:
        encoder.train(was_training)
    return torch.cat(features), torch.cat(labels), len(loader.manifest.classes)


def _over_ranks(value: int, op, device: torch.device) -> int:
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    classes: int,
    k: int = 200,
    t: float = 0.1,
    max_elements: int = 2**27,
    sharded: bool = False,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (in %) of weighted kNN.

    With ``sharded`` (under torch.distributed) ``train_*`` are this rank's share and
    ``val_*`` the whole validation set, the same on every rank; every rank must call,
    and every rank gets the single-process result.
    """
    world = world_size() if sharded else 1
    device = train_features.device
    mine = train_features.shape[0]
    total = _over_ranks(mine, dist.ReduceOp.SUM, device) if world > 1 else mine
    widest = _over_ranks(mine, dist.ReduceOp.MAX, device) if world > 1 else mine
    if total == 0:
        raise ValueError("the kNN monitor's training folder holds no samples")
    k = min(k, total)
    chunk = max(
        1, max_elements // max(widest, world * k)
    )  # the same on every rank: they gather together
    top1 = top5 = 0
    for start in range(0, val_features.shape[0], chunk):
        similarity = val_features[start : start + chunk] @ train_features.t()
        weights, indices = similarity.topk(min(k, mine), dim=1)
        neighbours = train_labels[indices]
        if world > 1:
            weights, neighbours = _nearest_over_ranks(weights, neighbours, k, world)
        votes = torch.zeros(similarity.shape[0], classes, device=similarity.device)
        votes.scatter_add_(1, neighbours, (weights / t).exp())
        predictions = votes.topk(min(5, classes), dim=1).indices
        truth = val_labels[start : start + chunk, None]
        top1 += (predictions[:, :1] == truth).any(dim=1).sum().item()
        top5 += (predictions == truth).any(dim=1).sum().item()
    n = val_features.shape[0]
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def _nearest_over_ranks(
    weights: torch.Tensor, labels: torch.Tensor, k: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest of every rank's k nearest: gathered candidates, padded where a share is smaller than k."""
    rows, found = weights.shape
    if found < k:  # a pad never wins (it weighs exp(-inf) = 0 if it had to)
        weights = torch.cat([weights, weights.new_full((rows, k - found), float("-inf"))], dim=1)
        labels = torch.cat([labels, labels.new_zeros((rows, k - found))], dim=1)
    all_weights = [torch.empty_like(weights) for _ in range(world)]
    all_labels = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(all_weights, weights.contiguous())
    dist.all_gather(all_labels, labels.contiguous())
    weights, picked = torch.cat(all_weights, dim=1).topk(k, dim=1)
    return weights, torch.cat(all_labels, dim=1).gather(1, picked)


def config_knn(
    encoder: torch.nn.Module,
    config,
    device: torch.device,
    amp_dtype: Optional[torch.dtype],
    *,
    rank: int = 0,
    world: int = 1,
) -> dict[str, float]:
    """The kNN monitor of a training configuration: ``data.knn_train`` votes on ``data.knn_val``.

    Views are the run's size after ``data.eval_resize``; the batch is a rank's share of
    ``data.batch_size``; k and T are ``run.knn_k`` and ``run.knn_t``. Under
    torch.distributed every rank calls it with its rank; each reads its share.
    """
    d = config.data
    eval_cfg = eval_view(config)
    common = dict(
        batch_size=max(1, d.batch_size // world),
        device=device,
        channels_last=config.run.channels_last,
        amp_dtype=amp_dtype,
        read=d.read,
        rank=rank,
        world=world,
    )
    train_f, train_y, classes = extract_features(encoder, d.knn_train, eval_cfg, **common)
    val_f, val_y, _ = extract_features(encoder, d.knn_val, eval_cfg, **common)
    if world > 1:
        val_f, val_y = gather_rows(val_f), gather_rows(val_y)
    return knn_classify(
        train_f,
        train_y,
        val_f,
        val_y,
        classes,
        k=config.run.knn_k,
        t=config.run.knn_t,
        sharded=world > 1,
    )
