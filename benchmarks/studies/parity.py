"""The learning curve of moco-dali's engine against the plain reference, epoch by epoch, on the same data.

Runs ``moco-train --preset cifar`` and ``benchmarks/studies/plain_moco.py`` (the same recipe,
written independently in plain PyTorch) on the same shard folders for the same
number of epochs, reads the kNN top-1 each measured after every epoch (and at
initialisation) and their images/s, and writes one JSON record and one chart. The
goal: ours at or above the reference's minus 1 point at every epoch.

    python -m benchmarks.studies.parity --train SHARDS --val SHARDS --epochs 5 \\
        --out benchmarks/results/DATE-MACHINE-parity.json --chart benchmarks/results/DATE-MACHINE-parity.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GOAL_POINTS = 1.0


def run_ours(args, work: Path) -> dict:
    out = work / "ours"
    command = [
        sys.executable,
        "-m",
        "moco_dali.train",
        "--preset",
        "cifar",
        "--data.train",
        str(args.train),
        "--data.knn_train",
        str(args.train),
        "--data.knn_val",
        str(args.val),
        "--run.epochs",
        str(args.epochs),
        "--run.out",
        str(out),
        "--run.seed",
        str(args.seed),
        "--run.progress",
        "false",
        "--run.log_every",
        "10",
        "--data.threads",
        str(args.threads),
        "--run.device",
        "cpu",
        "--model.small_stem",
        str(args.stem == "small").lower(),
        *args.ours_extra,
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    knn = {r["epoch"]: r["top1"] for r in records if r["kind"] == "knn"}
    train = [r for r in records if r["kind"] == "train"]
    # The step-0 encoder, rebuilt from the run's configuration and seed, as the baseline.
    first_ckpt = sorted(out.glob("ckpt-*.pt"))[0]
    init_json = work / "ours-init.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "moco_dali.train.eval.cli",
            "knn",
            "--checkpoint",
            str(first_ckpt),
            "--random-init",
            "--train",
            str(args.train),
            "--val",
            str(args.val),
            "--threads",
            str(args.threads),
            "--device",
            "cpu",
            "--batch-size",
            "512",
            "--json",
            str(init_json),
        ],
        check=True,
    )
    history = [{"epoch": 0, "knn_top1": json.loads(init_json.read_text())["top1"]}]
    history += [{"epoch": e, "knn_top1": knn[e]} for e in sorted(knn)]
    return {
        "command": command,
        "seconds": seconds,
        "history": history,
        "images_per_s_median": sorted(r["images_per_s"] for r in train)[len(train) // 2],
        "last_loss": train[-1]["loss"],
        "last_pretext_top1": train[-1]["acc1"],
    }


def run_reference(args, work: Path) -> dict:
    out = work / "reference.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.studies.plain_moco",
        "--train",
        str(args.train),
        "--val",
        str(args.val),
        "--epochs",
        str(args.epochs),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--stem",
        args.stem,
        "--out",
        str(out),
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    record = json.loads(out.read_text())
    rates = sorted(h["images_per_s"] for h in record["history"] if "images_per_s" in h)
    return {
        "command": command,
        "seconds": time.perf_counter() - started,
        "history": [{"epoch": h["epoch"], "knn_top1": h["knn_top1"]} for h in record["history"]],
        "images_per_s_median": rates[len(rates) // 2],
        "last_loss": record["history"][-1]["loss"],
        "last_pretext_top1": record["history"][-1]["pretext_top1"],
    }


def chart(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, style in (("ours", "o-"), ("reference", "s--")):
        h = record[name]["history"]
        ax.plot(
            [p["epoch"] for p in h],
            [p["knn_top1"] for p in h],
            style,
            label=f"{name} ({record[name]['images_per_s_median']:.0f} img/s)",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%), k 200, T 0.1")
    ax.set_title(
        f"cifar recipe ({record['stem']} stem) on {record['train_samples']} Fashion-MNIST images, "
        f"{record['machine']}",
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--train", type=Path, required=True, help="labelled shard folder to pretrain on"
    )
    parser.add_argument(
        "--val", type=Path, required=True, help="labelled shard folder the kNN classifies"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--stem",
        choices=["small", "standard"],
        default="small",
        help="the recipe's small stem, or torchvision's standard one on a CPU budget (both sides)",
    )
    parser.add_argument("--work", type=Path, default=Path(".runs/parity"))
    parser.add_argument(
        "--ours-extra",
        nargs=argparse.REMAINDER,
        default=[],
        help="further moco-train settings (last on the line)",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--chart", type=Path, default=None)
    args = parser.parse_args()
    from moco_dali.tools.bench.machine import describe

    args.work.mkdir(parents=True, exist_ok=True)
    machine = describe()
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine_facts": machine,
        "machine": f"{machine['cores']}-core {machine['cpu']}"
        + (f", {machine['gpus'][0]}" if machine.get("gpus") else ""),
        "epochs": args.epochs,
        "stem": args.stem,
        "train": str(args.train),
        "val": str(args.val),
        "train_samples": json.loads((args.train / "manifest.json").read_text())["samples"],
        "val_samples": json.loads((args.val / "manifest.json").read_text())["samples"],
        "goal": f"ours >= reference - {GOAL_POINTS} points at every epoch",
    }
    record["reference"] = run_reference(args, args.work)
    record["ours"] = run_ours(args, args.work)
    gaps = [
        o["knn_top1"] - r["knn_top1"]
        for o, r in zip(record["ours"]["history"], record["reference"]["history"])
        if o["epoch"] > 0
    ]
    record["gap_points_by_epoch"] = gaps
    record["goal_met"] = all(g >= -GOAL_POINTS for g in gaps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    if args.chart:
        chart(record, args.chart)
    for name in ("ours", "reference"):
        print(
            f"{name:10s} kNN by epoch: "
            + ", ".join(f"{h['knn_top1']:.2f}" for h in record[name]["history"])
            + f"  ({record[name]['images_per_s_median']:.0f} img/s)"
        )
    print(
        f"gap by epoch (points): {', '.join(f'{g:+.2f}' for g in gaps)}; goal met: {record['goal_met']}"
    )


if __name__ == "__main__":
    main()
