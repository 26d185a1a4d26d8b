"""``moco-bench pipeline``: view pairs per second delivered by the DALI pipeline and by the reference loader.

Both read the same shards, alternating after a warm-up; the ceiling is the same
reader and decoder with nothing after them; peak memory is reported (host RSS; on a
GPU torch's and NVML's per-process figure, which includes DALI's pools).
"""

from __future__ import annotations

import statistics
import time

import torch

from moco_dali.tools.bench.common import forever, peak_memory, shards_for, sync

__all__ = ["bench_pipeline", "print_pipeline"]


def bench_pipeline(args) -> dict:
    from moco_dali.pipeline.augment import preset
    from moco_dali.pipeline.loader import LoaderConfig, ViewLoader, decode_pipeline
    from moco_dali.pipeline.reference import reference_loader

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    shards, photoset = shards_for(args)
    cfg = preset(args.preset, args.size, hue_space=args.hue_space)
    dali = ViewLoader(shards, cfg, LoaderConfig(batch_size=args.batch, dtype=args.dtype, threads=args.threads,
                                                     hw_decoder_load=args.hw_decoder_load, labels=False),
                      device_id=device.index or 0 if gpu else None)
    contenders = {
        "dali": forever(lambda: ((b.view_q, b.view_k) for b in dali)),
        "reference": forever(lambda: reference_loader(shards, cfg, args.batch, workers=args.workers,
                                                       device=device)),
    }

    def run(stream, batches: int) -> float:
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        sync(device)
        return time.perf_counter() - start

    for stream in contenders.values():
        run(stream, args.warmup)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.reps):
        for name, stream in contenders.items():
            seconds[name].append(run(stream, args.batches))
    pairs = args.batches * args.batch
    results = {name: {"pairs_per_s": statistics.median(pairs / t for t in ts),
                      "pairs_per_s_min": pairs / max(ts), "pairs_per_s_max": pairs / min(ts),
                      "seconds": ts} for name, ts in seconds.items()}
    memory = peak_memory(device)  # before the decode-only pipeline adds its own buffers

    # The ceiling: the same reader and decoder with nothing after them. Timed after the
    # contenders, so that its memory does not count as theirs.
    decoder = decode_pipeline(shards, args.batch, threads=args.threads, hw_decoder_load=args.hw_decoder_load,
                              device_id=(device.index or 0) if gpu else None)
    decoded = forever(lambda: iter(decoder.run, None))
    run(decoded, args.warmup)
    decode_s = [run(decoded, args.batches) for _ in range(args.reps)]
    return {
        "mode": "pipeline",
        "config": {"shards": str(shards), "samples": dali.samples, "preset": args.preset, "size": args.size,
                   "augment": cfg.to_dict(), "batch": args.batch, "batches": args.batches, "warmup": args.warmup,
                   "reps": args.reps, "dtype": args.dtype, "dali_threads": args.threads or "default",
                   "reference_workers": args.workers, "hw_decoder_load": args.hw_decoder_load if gpu else None,
                   "device": str(device), "decoder": "mixed (nvJPEG)" if gpu else "cpu (libjpeg-turbo)"},
        "photoset": photoset,
        "results": results,
        "dali_over_reference": results["dali"]["pairs_per_s"] / results["reference"]["pairs_per_s"],
        "decode_ceiling": {"images_per_s": statistics.median(pairs / t for t in decode_s),
                           "images_per_s_min": pairs / max(decode_s), "images_per_s_max": pairs / min(decode_s),
                           "seconds": decode_s},
        "memory": memory,
        "goals": {"gpu_pairs_per_s": 8000, "gpu_dali_over_reference": 5.0, "cpu_dali_over_reference": 1.0},
    }


def print_pipeline(r: dict) -> None:
    c = r["config"]
    print(f"view pipeline, {c['preset']} (hue in {c['augment']['hue_space']}) at {c['size']} px, "
          f"batch {c['batch']}, {c['batches']} batches x {c['reps']} reps, {c['device']} ({c['decoder']}), "
          f"{c['samples']} samples in {c['shards']}")
    print(f"{'loader':12s} {'pairs/s':>10s} {'min':>10s} {'max':>10s}")
    for name, s in r["results"].items():
        print(f"{name:12s} {s['pairs_per_s']:10.0f} {s['pairs_per_s_min']:10.0f} {s['pairs_per_s_max']:10.0f}")
    d = r.get("decode_ceiling")
    if d:
        print(f"{'decode only':12s} {d['images_per_s']:10.0f} {d['images_per_s_min']:10.0f} "
              f"{d['images_per_s_max']:10.0f}   (images/s: the ceiling of the pairs above)")
    print(f"DALI / reference: {r['dali_over_reference']:.2f}x; memory: "
          + ", ".join(f"{k} {v:.0f}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in r["memory"].items()))
