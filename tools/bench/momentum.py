"""``moco-bench momentum``: the key encoder's momentum update against the per-parameter loop and the floor.

Every implementation of ``model.momentum`` on ResNet-50 with v2's head, alternating,
beside the memory-bandwidth floor (``FloorPass``: 3 x parameter bytes at the bandwidth
of one streaming pass over buffers of the parameters' size), plus the two other
per-step dictionary costs at K = 65536: the enqueue and the negative-logit matmul.
"""

from __future__ import annotations

import torch

from ...model import momentum
from ...model.encoders import add_mlp_head, resnet
from ...model.queue import KeyQueue
from .common import summary, time_ms

__all__ = ["FloorPass", "time_updates", "bench_momentum", "print_momentum"]


class FloorPass:
    """The update's cheapest possible form: ``x += a * y`` in place over one flat buffer of ``nbytes``.

    It moves what the update must (read theta_k and theta_q, write theta_k: 3 x
    ``nbytes``) in one kernel, so no implementation can be much faster. A copy is no
    such probe on a CPU: each store first reads the line it writes (write-allocate),
    so a copy of n bytes moves 3n but counts 2n, and the update beat a floor taken from
    it. The buffers are the parameters' size, not a fixed large one: a buffer past the
    caches streams slower than parameters that fit in them.
    """

    def __init__(self, nbytes: int, device: torch.device):
        n = -(-nbytes // 4)
        self.x, self.y = torch.rand(n, device=device), torch.rand(n, device=device)
        self.buffer_bytes = self.x.numel() * self.x.element_size()
        self.bytes_moved = 3 * self.buffer_bytes  # reads x and y, writes x

    def __call__(self) -> None:
        self.x.add_(self.y, alpha=0.001)


def time_updates(
    key: torch.nn.Module,
    query: torch.nn.Module,
    device: torch.device,
    calls: int,
    reps: int,
) -> tuple[dict, dict, FloorPass]:
    """Time every available implementation and the floor pass over the same bytes: summaries of
    each, and the pass. With the encoders flattened (``flatten_parameters_``), ``flat_lerp``
    (the engine's default) runs among them.

    They alternate, ``calls`` calls each per round for ``reps`` rounds, so drift and
    other processes hit the floor and the implementations alike.
    """
    params_k, params_q = list(key.parameters()), list(query.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params_k)
    floor = FloorPass(param_bytes, device)
    implementations = [
        i
        for i in ("loop", "foreach", "foreach_lerp", "apex")
        if i in momentum.available_implementations()
    ]
    contenders = {
        name: (lambda name=name: momentum.momentum_update_(params_k, params_q, 0.999, name))
        for name in implementations
    }
    if momentum.resolve_implementation("auto", key, query) == "flat_lerp":
        contenders["flat_lerp"] = lambda: momentum.momentum_update_(key, query, 0.999, "flat_lerp")
    contenders["floor"] = floor
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        time_ms(fn, device, 1, warmup=3)
    for _ in range(reps):
        for name, fn in contenders.items():
            runs[name] += time_ms(fn, device, calls, warmup=1)
    floor_times = summary(runs.pop("floor"))
    return {name: summary(t) for name, t in runs.items()}, floor_times, floor


def bench_momentum(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    encoders = []
    for _ in range(2):
        encoder = resnet(args.tree.model.arch)(num_classes=128)
        if args.tree.model.mlp:
            add_mlp_head(encoder)
        encoders.append(encoder.to(device))
    key, query = encoders
    for encoder in encoders:  # as the engine builds them: one buffer per encoder
        momentum.flatten_parameters_(encoder)
    params = list(key.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    results, floor_times, floor = time_updates(
        key, query, device, args.options.calls, args.options.reps
    )
    bandwidth = floor.bytes_moved / (floor_times["median_ms"] / 1e3)
    floor_ms = 3 * param_bytes / bandwidth * 1e3  # read theta_k and theta_q, write theta_k

    queue = KeyQueue(args.tree.model.K, 128).to(device)
    keys = torch.nn.functional.normalize(
        torch.randn(args.tree.data.batch_size, 128, device=device), dim=1
    )
    q = torch.nn.functional.normalize(
        torch.randn(args.tree.data.batch_size, 128, device=device), dim=1
    )
    enqueue = summary(
        time_ms(lambda: queue.enqueue(keys), device, args.options.calls * args.options.reps)
    )
    negatives = summary(
        time_ms(lambda: q @ queue.keys().t(), device, args.options.calls * args.options.reps)
    )

    best = min((n for n in results if n != "loop"), key=lambda n: results[n]["median_ms"])
    return {
        "mode": "momentum",
        "config": {
            "arch": args.tree.model.arch,
            "mlp_head": args.tree.model.mlp,
            "parameters": sum(p.numel() for p in params),
            "tensors": len(params),
            "param_bytes": param_bytes,
            "K": args.tree.model.K,
            "batch": args.tree.data.batch_size,
            "calls": args.options.calls,
            "reps": args.options.reps,
            "device": str(device),
        },
        # The key keeps its name for the records and charts that read it; the probe is FloorPass.
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "copy_bytes": floor.buffer_bytes,
        "floor_pass": floor_times,
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
    print(
        f"momentum update, {c['arch']}{' + MLP head' if c['mlp_head'] else ''}: {c['parameters'] / 1e6:.1f} M "
        f"parameters in {c['tensors']} tensors, {c['device']}; streaming bandwidth {r['copy_bandwidth_GBps']:.1f} GB/s "
        f"over {r['copy_bytes'] / 2**20:.0f} MiB buffers"
    )
    print(f"{'implementation':16s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'x floor':>8s}")
    for name, s in r["momentum"].items():
        print(
            f"{name:16s} {s['median_ms']:10.3f} {s['min_ms']:8.3f} {s['max_ms']:8.3f} "
            f"{s['median_ms'] / r['floor_ms']:8.2f}"
        )
    print(
        f"{'floor (3 x bytes / bandwidth)':30s} {r['floor_ms']:.3f} ms, one x.add_(y) over flat buffers"
    )
    print(
        f"best: {r['best']}, {r['best_over_floor']:.2f}x the floor (goal <= 1.5), "
        f"{r['loop_over_best']:.1f}x faster than the loop (goal >= 10)"
    )
    print(
        f"enqueue of {c['batch']} keys into K={c['K']}: {r['enqueue']['median_ms']:.3f} ms; "
        f"negative logits {c['batch']}x128 @ 128x{c['K']}: {r['negative_logits']['median_ms']:.3f} ms"
    )
