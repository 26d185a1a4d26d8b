"""``moco-bench momentum``: the key encoder's momentum update against the per-parameter loop and the floor.

Every implementation of ``model.momentum`` on ResNet-50 with v2's head, alternating,
beside the memory-bandwidth floor (3 x parameter bytes over a measured copy), plus
the two other per-step dictionary costs at K = 65536: the enqueue and the
negative-logit matmul.
"""

from __future__ import annotations

import torch

from moco_dali.model import momentum
from moco_dali.model.encoders import add_mlp_head, resnet
from moco_dali.model.queue import KeyQueue
from moco_dali.tools.bench.common import copy_bandwidth, summary, time_ms

__all__ = ["bench_momentum", "print_momentum"]


def bench_momentum(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    encoders = []
    for _ in range(2):
        encoder = resnet(args.arch)(num_classes=128)
        if args.mlp:
            add_mlp_head(encoder)
        encoders.append(encoder.to(device))
    key, query = encoders
    params = list(key.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    implementations = [i for i in ("loop", "foreach", "foreach_lerp", "apex") if i in momentum.available_implementations()]

    bandwidth = copy_bandwidth(device, reps=max(5, args.calls // 5), mib=args.copy_mib)
    floor_ms = 3 * param_bytes / bandwidth * 1e3  # read theta_k and theta_q, write theta_k

    # Alternate the implementations, a few calls each round, so drift hits all alike.
    runs: dict[str, list[float]] = {name: [] for name in implementations}
    for name in implementations:
        time_ms(lambda: momentum.momentum_update_(key, query, 0.999, name), device, 1, warmup=3)
    for _ in range(args.reps):
        for name in implementations:
            runs[name] += time_ms(lambda: momentum.momentum_update_(key, query, 0.999, name), device, args.calls,
                                  warmup=1)
    results = {name: summary(t) for name, t in runs.items()}

    queue = KeyQueue(args.K, 128).to(device)
    keys = torch.nn.functional.normalize(torch.randn(args.batch, 128, device=device), dim=1)
    q = torch.nn.functional.normalize(torch.randn(args.batch, 128, device=device), dim=1)
    enqueue = summary(time_ms(lambda: queue.enqueue(keys), device, args.calls * args.reps))
    negatives = summary(time_ms(lambda: q @ queue.keys().t(), device, args.calls * args.reps))

    best = min((n for n in implementations if n != "loop"), key=lambda n: results[n]["median_ms"])
    return {
        "mode": "momentum",
        "config": {"arch": args.arch, "mlp_head": args.mlp, "parameters": sum(p.numel() for p in params),
                   "tensors": len(params), "param_bytes": param_bytes, "K": args.K, "batch": args.batch,
                   "calls": args.calls, "reps": args.reps, "device": str(device)},
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "floor_ms": floor_ms,
        "momentum": results,
        "best": best,
        "best_over_floor": results[best]["median_ms"] / floor_ms,
        "loop_over_best": results["loop"]["median_ms"] / results[best]["median_ms"],
        "enqueue": enqueue,
        "negative_logits": negatives,
        "goals": {"best_over_floor": 1.5, "loop_over_best": 10.0},
    }


def print_momentum(r: dict) -> None:
    c = r["config"]
    print(f"momentum update, {c['arch']}{' + MLP head' if c['mlp_head'] else ''}: {c['parameters'] / 1e6:.1f} M "
          f"parameters in {c['tensors']} tensors, {c['device']}; copy bandwidth {r['copy_bandwidth_GBps']:.1f} GB/s")
    print(f"{'implementation':16s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'x floor':>8s}")
    for name, s in r["momentum"].items():
        print(f"{name:16s} {s['median_ms']:10.3f} {s['min_ms']:8.3f} {s['max_ms']:8.3f} "
              f"{s['median_ms'] / r['floor_ms']:8.2f}")
    print(f"{'floor (3 x bytes / bandwidth)':30s} {r['floor_ms']:.3f} ms")
    print(f"best: {r['best']}, {r['best_over_floor']:.2f}x the floor (goal <= 1.5), "
          f"{r['loop_over_best']:.1f}x faster than the loop (goal >= 10)")
    print(f"enqueue of {c['batch']} keys into K={c['K']}: {r['enqueue']['median_ms']:.3f} ms; "
          f"negative logits {c['batch']}x128 @ 128x{c['K']}: {r['negative_logits']['median_ms']:.3f} ms")
