"""The kNN monitor: weighted kNN on l2-normalised backbone features (Wu et al. 2018).

Each validation feature votes with its k most similar training features, each vote
weighted by exp(similarity / T); k = 200 and T = 0.1 by default, as in the
instance-discrimination literature. Similarities are computed in chunks sized so
that a million training features fit.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from moco_dali.model.encoders import backbone
from moco_dali.pipeline.augment import EvalConfig
from moco_dali.pipeline.loader import LoaderConfig, ViewLoader

__all__ = ["pooled_features", "extract_features", "knn_classify", "config_knn"]


@torch.no_grad()
def pooled_features(encoder: torch.nn.Module, images: torch.Tensor, amp_dtype: Optional[torch.dtype] = None,
                    channels_last: bool = True) -> torch.Tensor:
    """The backbone's pooled features of ``images`` in float32 (autocast as asked), as kNN and the linear probe use."""
    images = images.contiguous(memory_format=torch.channels_last) if channels_last else images.contiguous()
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return backbone(encoder, images).float()


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, folder: str, eval_cfg: EvalConfig, *, batch_size: int,
                     device: torch.device, channels_last: bool = True, amp_dtype: Optional[torch.dtype] = None,
                     threads: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Normalised backbone features (N, D) float32, labels (N,) and the class count of a labelled folder."""
    loader = ViewLoader(folder, eval_cfg, LoaderConfig(batch_size=batch_size, dtype="float32", shuffle=False,
                                                       last_batch="partial", threads=threads),
                        device_id=device.index if device.type == "cuda" else None)
    if not loader.has_labels:
        raise ValueError(f"{folder}: the kNN monitor needs labelled shards (build with --labels folder)")
    was_training = encoder.training
    encoder.eval()
    features, labels = [], []
    try:
        for batch in loader:
            features.append(F.normalize(pooled_features(encoder, batch.view_q.to(device), amp_dtype, channels_last),
                                        dim=1))
            labels.append(batch.labels.to(device))
    finally:
        encoder.train(was_training)
    return torch.cat(features), torch.cat(labels), len(loader.manifest.classes)


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, classes: int, k: int = 200, t: float = 0.1,
                 max_elements: int = 2**27) -> dict[str, float]:
    """Top-1 and top-5 accuracy (in %) of weighted kNN."""
    k = min(k, train_features.shape[0])
    chunk = max(1, max_elements // train_features.shape[0])
    top1 = top5 = 0
    for start in range(0, val_features.shape[0], chunk):
        similarity = val_features[start:start + chunk] @ train_features.t()
        weights, indices = similarity.topk(k, dim=1)
        votes = torch.zeros(similarity.shape[0], classes, device=similarity.device)
        votes.scatter_add_(1, train_labels[indices], (weights / t).exp())
        predictions = votes.topk(min(5, classes), dim=1).indices
        truth = val_labels[start:start + chunk, None]
        top1 += (predictions[:, :1] == truth).any(dim=1).sum().item()
        top5 += (predictions == truth).any(dim=1).sum().item()
    n = val_features.shape[0]
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def config_knn(encoder: torch.nn.Module, config, world: int, device: torch.device,
               amp_dtype: Optional[torch.dtype]) -> dict[str, float]:
    """The kNN monitor of a training configuration: ``data.knn_train`` votes on ``data.knn_val``.

    Views are the run's size after ``data.eval_resize``; the batch is a rank's share of
    ``data.batch_size``; k and T are ``run.knn_k`` and ``run.knn_t``.
    """
    d = config.data
    eval_cfg = EvalConfig(resize=d.eval_resize, size=d.size)
    common = dict(batch_size=max(1, d.batch_size // world), device=device, channels_last=config.run.channels_last,
                  amp_dtype=amp_dtype, threads=d.threads or None)
    train_f, train_y, classes = extract_features(encoder, d.knn_train, eval_cfg, **common)
    val_f, val_y, _ = extract_features(encoder, d.knn_val, eval_cfg, **common)
    return knn_classify(train_f, train_y, val_f, val_y, classes, k=config.run.knn_k, t=config.run.knn_t)
