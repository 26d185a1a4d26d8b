"""What a loader hands to torch: ``Batch``, made from one DALI iterator output, with the views as
NCHW-shaped, channels-last tensors (DALI writes HWC; only the view is permuted, no copy), labels
from the ``.cls`` digits and keys from the readers' source info."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["Batch", "batch"]


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


def batch(
    data: dict, outputs: Sequence[str], device: torch.device, *, labels: bool, keys: bool
) -> Batch:
    """The ``Batch`` of one DALI output ``data`` (named by ``outputs``)."""
    views = [data[name].permute(0, 3, 1, 2) for name in outputs if name.startswith("view")]
    classes = _ascii_to_int(data["labels"]).to(device, non_blocking=True) if labels else None
    names = None
    if keys:
        decoded = [bytes(row[row > 0].tolist()).decode() for row in data["source"].cpu()]
        names = [s.rsplit(":", 1)[1].split(".")[0] for s in decoded]
    return Batch(views[0], views[1] if len(views) > 1 else None, classes, names)
