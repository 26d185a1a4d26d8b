"""The MoCo module: Algorithm 1 of He et al. (2019), with v2's MLP head (Chen et al. 2020).

The constructor and call shape are the reference code's (``moco/builder.py``)::

    model = MoCo(resnet("resnet50"), dim=128, K=65536, m=0.999, T=0.07, mlp=False)
    logits, labels = model(im_q, im_k)      # logits already divided by T

What the reference simplified away lives in its own module: the ring-buffer queue
(``queue.py``), the multi-tensor momentum update (``momentum.py``), shuffle-BN and split BN
(``shuffle_bn.py``). Extra behaviour is opt-in, by keyword.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from . import momentum, shuffle_bn
from .encoders import add_mlp_head
from .momentum import momentum_update_
from .queue import KeyQueue

__all__ = ["MoCo"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class MoCo(nn.Module):
    """Momentum Contrast: a query encoder, a momentum key encoder and a queue of keys.

    Args:
        base_encoder: constructor ``base_encoder(num_classes=dim[, norm_layer=...])``,
            e.g. ``model.encoders.resnet("resnet50")`` or ``torchvision.models.resnet50``.
        dim: feature dimension of keys and queries (default 128).
        K: queue size, the number of negatives (default 65536).
        m: key encoder momentum (default 0.999); the engine may change ``self.m``
            every step to follow a schedule.
        T: softmax temperature (default 0.07; MoCo v2 uses 0.2).
        mlp: MoCo v2's 2-layer MLP head instead of the fc head.
        queue_dtype: storage dtype of the queue (float32; float16/bfloat16 halve it).
        shuffle: how BN is kept from leaking the positive: ``"ddp"``, ``"split"``,
            ``"syncbn"``, ``"none"`` (see ``shuffle_bn``), or ``"auto"``: ``"ddp"``
            under torch.distributed with several ranks, else ``"split"``.
        num_splits: sub-batches of ``"split"`` mode (default 8, as 8 GPUs).
        shuffle_group_size: ranks per shuffle group in ``"ddp"`` mode (default: one node).
        symmetric: use both views as queries and average the two losses.
        momentum_impl: implementation of the momentum update (``momentum.IMPLEMENTATIONS``).
    """

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        mlp: bool = False,
        *,
        queue_dtype: torch.dtype = torch.float32,
        shuffle: str = "auto",
        num_splits: int = 8,
        shuffle_group_size: Optional[int] = None,
        symmetric: bool = False,
        momentum_impl: str = "auto",
    ):
        super().__init__()
        if shuffle == "auto":
            shuffle = "ddp" if _distributed() else "split"
        if shuffle not in shuffle_bn.SHUFFLE_MODES:
            raise ValueError(
                f"shuffle must be one of {shuffle_bn.SHUFFLE_MODES} or 'auto', got {shuffle!r}"
            )
        if shuffle in ("ddp", "syncbn") and not _distributed():
            raise ValueError(
                f"shuffle={shuffle!r} needs torch.distributed with more than one rank; "
                "use 'split' on one process"
            )
        if not 0.0 <= m <= 1.0 or T <= 0:
            raise ValueError(f"need 0 <= m <= 1 and T > 0, got m={m}, T={T}")
        self.K, self.m, self.T = K, m, T
        self.shuffle, self.symmetric, self.momentum_impl = shuffle, symmetric, momentum_impl

        extra = (
            {"norm_layer": partial(shuffle_bn.SplitBatchNorm2d, num_splits=num_splits)}
            if shuffle == "split"
            else {}
        )
        self.encoder_q = base_encoder(num_classes=dim, **extra)
        self.encoder_k = base_encoder(num_classes=dim, **extra)
        if mlp:
            add_mlp_head(self.encoder_q)
            add_mlp_head(self.encoder_k)
        if shuffle == "syncbn":
            self.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_q)
            self.encoder_k = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_k)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for param in self.encoder_k.parameters():
            param.requires_grad = False  # the key encoder learns only by momentum

        self.queue = KeyQueue(K, dim, dtype=queue_dtype)
        self._group = shuffle_bn.shuffle_group(shuffle_group_size) if shuffle == "ddp" else None

    def flatten_parameters(self) -> None:
        """Each encoder's parameters as views into one buffer of its own, so the momentum update
        is one pass over two buffers. Call it last, after the model's moves (``.to``)."""
        momentum.flatten_parameters_(self.encoder_q)
        momentum.flatten_parameters_(self.encoder_k)

    # --- the steps of Algorithm 1 -------------------------------------------------

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        momentum_update_(self.encoder_k, self.encoder_q, self.m, self.momentum_impl)

    def _query(self, im_q: torch.Tensor) -> torch.Tensor:
        return self._normalize(self.encoder_q(im_q))

    @torch.no_grad()
    def _keys(self, im_k: torch.Tensor) -> torch.Tensor:
        if self.shuffle == "ddp":
            im_k, idx_unshuffle = shuffle_bn.batch_shuffle_ddp(im_k, self._group)
            return shuffle_bn.batch_unshuffle_ddp(
                self._normalize(self.encoder_k(im_k)), idx_unshuffle, self._group
            )
        if self.shuffle == "split":
            im_k, idx_unshuffle = shuffle_bn.batch_shuffle_local(im_k)
            return shuffle_bn.batch_unshuffle_local(
                self._normalize(self.encoder_k(im_k)), idx_unshuffle
            )
        return self._normalize(self.encoder_k(im_k))

    @staticmethod
    def _normalize(features: torch.Tensor) -> torch.Tensor:
        # In float32 whatever autocast chose for the encoder: logits of unit vectors
        # divided by T = 0.07 amplify half-precision rounding 14-fold.
        with torch.autocast(features.device.type, enabled=False):
            return F.normalize(features.float(), dim=1)

    def _logits(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(q.device.type, enabled=False):
            l_pos = (q * k).sum(dim=1, keepdim=True)  # N x 1
            l_neg = q @ self.queue.keys().t()  # N x K
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return logits, labels

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        # Keys of every rank, so every rank's queue stays identical.
        self.queue.enqueue(shuffle_bn.gather(keys) if _distributed() else keys)

    # --- forward -------------------------------------------------------------------

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, 1 + K) already divided by T, and labels (N,) of zeros.

        With ``symmetric=True`` both views serve as queries: logits (2N, 1 + K),
        whose mean cross-entropy is the average of the two directions' losses.
        """
        if self.symmetric:
            return self._forward_symmetric(im_q, im_k)
        q = self._query(im_q)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = self._keys(im_k)
        logits, labels = self._logits(q, k)
        self._dequeue_and_enqueue(k)
        return logits, labels

    def _forward_symmetric(
        self, im_1: torch.Tensor, im_2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q1, q2 = self._query(im_1), self._query(im_2)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k1, k2 = self._keys(im_1), self._keys(im_2)
        logits_12, labels = self._logits(q1, k2)
        logits_21, _ = self._logits(q2, k1)
        self._dequeue_and_enqueue(torch.cat([k1, k2]))
        return torch.cat([logits_12, logits_21]), torch.cat([labels, labels])
