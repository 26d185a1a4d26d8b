"""Metrics on rank 0: a line every N steps, a JSONL record of the same, and TensorBoard scalars."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["Metrics"]

log = logging.getLogger("moco-train")


class Metrics:
    """Writes ``out/metrics.jsonl`` and TensorBoard events under ``out/tb``; a no-op off rank 0."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            out.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(out / "metrics.jsonl", "a")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tb"))

    def write(self, kind: str, step: int, values: dict[str, Any], line: str = "") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{kind}/{name}", value, step)
        if line:
            log.info(line)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
