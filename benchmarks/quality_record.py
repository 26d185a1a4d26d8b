"""Turn a pretraining run on Fashion-MNIST into the project's quality record: JSON plus a plot.

Reads what the run left in its folder (``config.json``, ``metrics.jsonl`` with the
per-epoch kNN monitor), the kNN of the same encoder at
initialisation and the linear probe (``moco-eval ... --json`` / ``linear.json``), and
writes one JSON record and a PNG of the kNN curve.

    python -m benchmarks.quality_record --run RUN_DIR --wall-s SECONDS --knn-init INIT.json \
        --linear RUN_DIR/linear/linear.json --command "moco-train ..." --out PREFIX
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moco_dali.tools.bench.machine import describe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument(
        "--wall-s", type=float, required=True, help="measured wall time of the pretraining"
    )
    parser.add_argument("--knn-init", type=Path, required=True)
    parser.add_argument("--linear", type=Path, default=None)
    parser.add_argument("--linear-wall-s", type=float, default=None)
    parser.add_argument(
        "--linear-init",
        type=Path,
        default=None,
        help="the same probe on the encoder at initialisation",
    )
    parser.add_argument(
        "--linear-long", type=Path, default=None, help="the probe at its full schedule (100 epochs)"
    )
    parser.add_argument("--linear-long-wall-s", type=float, default=None)
    parser.add_argument("--command", required=True)
    parser.add_argument("--note", default="")
    parser.add_argument(
        "--out", type=Path, required=True, help="PREFIX: writes PREFIX.json and PREFIX.png"
    )
    args = parser.parse_args()

    records = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines()]
    init = json.loads(args.knn_init.read_text())
    curve = [{"epoch": 0, "top1": init["top1"], "top5": init["top5"]}] + [
        {"epoch": r["epoch"], "top1": r["top1"], "top5": r["top5"]}
        for r in records
        if r["kind"] == "knn"
    ]
    train = [r for r in records if r["kind"] == "train"]
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe(),
        "command": args.command,
        "config": json.loads((args.run / "config.json").read_text()),
        "knn": {
            "k": init["k"],
            "t": init["t"],
            "curve": curve,
            "at_init": init["top1"],
            "final": curve[-1]["top1"],
            "best": max(c["top1"] for c in curve[1:]),
        },
        "pretext": [{"step": r["step"], "loss": r["loss"], "acc1": r["acc1"]} for r in train],
        "images_per_s_median": sorted(r["images_per_s"] for r in train)[len(train) // 2],
        "pretraining_wall_s": args.wall_s,
        "linear": json.loads(args.linear.read_text()) if args.linear else None,
        "linear_wall_s": args.linear_wall_s,
        "linear_at_init": json.loads(args.linear_init.read_text()) if args.linear_init else None,
        "linear_long": json.loads(args.linear_long.read_text()) if args.linear_long else None,
        "linear_long_wall_s": args.linear_long_wall_s,
        "note": args.note,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    epochs = [c["epoch"] for c in curve]
    ax.plot(
        epochs, [c["top1"] for c in curve], marker="o", label="MoCo v2, kNN top-1 (k=200, T=0.1)"
    )
    ax.axhline(
        init["top1"],
        color="grey",
        linestyle=":",
        label=f"same encoder at initialisation ({init['top1']:.1f}%)",
    )
    if record["linear"]:
        ax.axhline(
            record["linear"]["top1"],
            color="#e0a030",
            linestyle="--",
            label=f"linear probe after pretraining ({record['linear']['top1']:.1f}%)",
        )
    if record["linear_at_init"]:
        ax.axhline(
            record["linear_at_init"]["top1"],
            color="#e0a030",
            linestyle=":",
            label=f"linear probe at initialisation ({record['linear_at_init']['top1']:.1f}%)",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    m = record["machine"]
    where = m["gpus"][0] if m.get("gpus") else f"{m['cores']}-core CPU ({m['cpu']})"
    ax.set_title(f"Fashion-MNIST, {record['config']['model']['arch']}, {where}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
