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


_LABEL_TAIL = 19  # bytes read from the end of a row: SampleCheck's most digits (18), and one


def _ascii_to_int(padded: torch.Tensor) -> torch.Tensor:
    """Zero-padded ``cls`` bytes (N, L) -> classes (N,), on the CPU without a Python loop: the
    ASCII digits each row ends in, all of a ``.cls``, the field's value of a label pointer's JSON
    (``shards.label_digits``). ``SampleCheck`` stops a batch holding any other row.
    """
    # A row ends at its last byte that is not zero: the padding is zeros, and neither digits nor
    # JSON text (which escapes control characters) hold one.
    ends = padded.shape[1] - (padded != 0).flip(1).to(torch.uint8).argmax(1)
    at = ends[:, None] + torch.arange(-_LABEL_TAIL, 0)
    tail = torch.where(at >= 0, padded.gather(1, at.clamp(min=0)), 0).to(torch.int64)
    # A digit counts when every byte after it, to the row's end, is a digit too.
    run = ((tail >= 48) & (tail <= 57)).flip(1).cumprod(1).flip(1)
    after = run.flip(1).cumsum(1).flip(1) - run  # digits of the run that follow this one
    return (run * (tail - 48) * 10**after).sum(1)


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
