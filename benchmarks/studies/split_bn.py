"""Split BN before and after: the per-sub-batch Python loop against the whole-batch kernels of ``SplitBatchNorm2d``.

Counts the operators one split-BN layer dispatches in a forward and backward (each
one a kernel launch on a GPU, where the loop's hundreds per layer cost more than the
arithmetic), and times an encoder's training forward and backward and its no-grad
forward (the key encoder's) with each, alternating, as the median over repetitions
after a warm-up. The loop is the implementation ``model/shuffle_bn.py`` had before
(kept here as the baseline).

    python -m benchmarks.studies.split_bn --device cpu --arch resnet18 --batch 16 --size 112 --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moco_dali.model.encoders import resnet
from moco_dali.model.shuffle_bn import SplitBatchNorm2d
from moco_dali.tools.bench.common import sync, time_ms
from moco_dali.tools.bench.machine import describe


class LoopSplitBatchNorm2d(SplitBatchNorm2d):
    """The previous implementation: one ``F.batch_norm`` per sub-batch on copies of the running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return torch.nn.BatchNorm2d.forward(self, x)
        momentum = 0.1 if self.momentum is None else self.momentum
        outputs, means, variances = [], [], []
        for chunk in x.chunk(self.num_splits):
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outputs.append(
                F.batch_norm(chunk, mean, var, self.weight, self.bias, True, momentum, self.eps)
            )
            means.append(mean)
            variances.append(var)
        with torch.no_grad():
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
            self.num_batches_tracked.add_(1)
        return torch.cat(outputs)


IMPLEMENTATIONS = {"loop (before)": LoopSplitBatchNorm2d, "whole-batch (now)": SplitBatchNorm2d}


class _CountOps(TorchDispatchMode):
    """Counts the operators that do work on the data (views and bare allocations launch no kernel)."""

    ALLOCATIONS = {"empty", "empty_like", "empty_strided"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in self.ALLOCATIONS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_layer(cls, device, channels: int, batch: int, size: int, splits: int, amp) -> dict:
    """Operators that do work in one layer's training forward, and in its backward.

    On a GPU each is at least one kernel launch; ``native_batch_norm`` and its backward
    are several, so the loop's count is a lower bound.
    """
    layer = cls(channels, num_splits=splits).to(device)
    # Under autocast a BN layer receives the convolution's output in the autocast dtype.
    x = torch.randn(batch, channels, size, size, device=device, dtype=amp or torch.float32)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        layer(x.detach().requires_grad_()).float().sum().backward()  # warm-up, outside the count
        with _CountOps() as forward:
            y = layer(x)
    grad = torch.ones_like(y)
    with _CountOps() as backward:
        y.backward(grad)
    return {"forward": forward.count, "backward": backward.count}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112, help="input size in px")
    parser.add_argument("--splits", type=int, default=8)
    parser.add_argument(
        "--amp",
        choices=["auto", "bf16", "none"],
        default="auto",
        help="autocast dtype (auto: bf16 on a GPU, none on a CPU), as moco-train's default",
    )
    parser.add_argument(
        "--reps", type=int, default=7, help="alternating repetitions (median reported)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the JSON record here")
    args = parser.parse_args()

    device = torch.device(args.device)
    amp = {"bf16": torch.bfloat16, "none": None}.get(
        args.amp, torch.bfloat16 if device.type == "cuda" else None
    )
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    nets = {}
    for name, cls in IMPLEMENTATIONS.items():
        torch.manual_seed(0)
        nets[name] = (
            resnet(args.arch)(num_classes=128, norm_layer=partial(cls, num_splits=args.splits))
            .to(device)
            .to(memory_format=torch.channels_last)
        )

    def train_pass(net):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = net(x).float().pow(2).mean()
        loss.backward()

    def key_pass(net):
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None),
        ):
            net(x)

    passes = {"train forward+backward": train_pass, "no-grad forward (key encoder)": key_pass}
    times = {p: {n: [] for n in nets} for p in passes}
    for pass_name, fn in passes.items():
        for net in nets.values():
            for _ in range(args.warmup):
                fn(net)
        sync(device)
        for _ in range(args.reps):
            for name, net in nets.items():
                times[pass_name][name] += time_ms(
                    lambda fn=fn, net=net: fn(net), device, reps=1, warmup=0
                )

    layer = {
        name: ops_per_layer(cls, device, 64, args.batch, args.size // 4, args.splits, amp)
        for name, cls in IMPLEMENTATIONS.items()
    }
    bn_layers = sum(isinstance(m, SplitBatchNorm2d) for m in nets["whole-batch (now)"].modules())
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe(),
        "command": "python -m benchmarks.studies.split_bn " + " ".join(sys.argv[1:]),
        "config": {
            "device": str(device),
            "arch": args.arch,
            "batch": args.batch,
            "size": args.size,
            "splits": args.splits,
            "amp": str(amp).replace("torch.", "") if amp else "none",
            "channels_last": True,
            "reps": args.reps,
            "warmup": args.warmup,
            "bn_layers": bn_layers,
        },
        "ops_per_layer": layer,
        "times_ms": {
            p: {
                n: {
                    "median_ms": statistics.median(ts),
                    "min_ms": min(ts),
                    "max_ms": max(ts),
                    "ms": ts,
                }
                for n, ts in by_name.items()
            }
            for p, by_name in times.items()
        },
    }
    print(
        f"split BN, {args.arch}, batch {args.batch} at {args.size} px, {args.splits} splits, "
        f"{record['config']['amp']}, channels-last, {device}; median of {args.reps} alternating reps"
    )
    print(f"{'':32s} " + " ".join(f"{n:>20s}" for n in IMPLEMENTATIONS) + "   before / now")
    for p, by_name in record["times_ms"].items():
        before, now = (by_name[n]["median_ms"] for n in IMPLEMENTATIONS)
        print(f"{p + ', ms':32s} {before:20.1f} {now:20.1f}   {before / now:.2f}x")
    for kind in ("forward", "backward"):
        before, now = (layer[n][kind] for n in IMPLEMENTATIONS)
        print(f"{'operators per layer, ' + kind:32s} {before:20d} {now:20d}   x {bn_layers} layers")
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
