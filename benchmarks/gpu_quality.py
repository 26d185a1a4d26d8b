"""The GPU session's quality stage: Fashion-MNIST pretraining sized to the time left, then its record.

Builds train and test shards from the four Fashion-MNIST ``.gz`` files (carried in
``.gpu/fmnist``, else ``$FASHION_MNIST_DIR`` or Debian's package), measures the
recipe's rate (``--quality-preset``, default ``cifar``) in a short calibration run, picks the number of epochs that
fits the time left (cosine schedule over them, kNN every epoch), pretrains, measures
the kNN of the same encoder at initialisation and, time permitting, a short linear
probe, and writes ``quality.json`` and ``quality.png`` with ``benchmarks.quality_record``.

Also a command, run by the stage in a subprocess (it imports the project):

    python -m benchmarks.gpu_quality shards SRC_DIR OUT_DIR [--limit N] [--workers W]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

GZ_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def fashion_mnist_source(repo: Path) -> Path | None:
    """The first folder holding the four files: carried, ``$FASHION_MNIST_DIR``, Debian's package."""
    candidates = [repo / ".gpu" / "fmnist"] + (
        [Path(os.environ["FASHION_MNIST_DIR"])] if os.environ.get("FASHION_MNIST_DIR") else []
    )
    for folder in candidates + [Path("/usr/share/datasets/fashion-mnist")]:
        if all((folder / name).is_file() for name in GZ_FILES):
            return folder
    return None


def _rate(run_dir: Path) -> float | None:
    """Median images/s of a run's train records after the first (which holds the warm-up)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = [
        r["images_per_s"]
        for r in map(json.loads, path.read_text().splitlines())
        if r["kind"] == "train"
    ]
    return statistics.median(rates[1:] or rates) if rates else None


def _latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = sorted(run_dir.glob("ckpt-*.pt"))
    return checkpoints[-1] if checkpoints else None


def quality_stage(session, budget: float) -> dict:
    """Run inside ``gpu_session.Session``: ``session.run`` runs and logs commands."""
    dry, work, out = session.dry, session.work / "fmnist", session.out
    deadline = time.monotonic() + budget
    if not dry and budget < session.args.quality_min_s:
        return {"status": "skipped", "reason": f"{budget:.0f} s left, under --quality-min-s"}
    source = fashion_mnist_source(Path(__file__).resolve().parents[1])
    if source is None and not dry:
        return {
            "status": "skipped",
            "reason": "no Fashion-MNIST .gz files: carry them in .gpu/fmnist",
        }
    limit = ["--limit", "256"] if dry else []
    code = session.run(
        session.python(
            "-m",
            "benchmarks.gpu_quality",
            "shards",
            str(source or "generated"),
            str(work),
            "--workers",
            str(session.cores),
            *limit,
        ),
        budget * 0.25,
    )
    if code:
        return {"status": "failed", "reason": "building the Fashion-MNIST shards"}
    train, test = work / "shards" / "train", work / "shards" / "test"
    samples = json.loads((train / "manifest.json").read_text())["samples"]
    common = [
        "--preset",
        session.args.quality_preset,
        "--data.train",
        str(train),
        "--data.knn_train",
        str(train),
        "--data.knn_val",
        str(test),
        "--run.progress",
        "false",
    ]
    if not dry:  # compiled in place, bf16 (run.amp auto): the recipe's rate on the GPU
        common += ["--run.compile", "true"]
    if dry:  # the standard stem and one direction: the small stem costs 16x the compute at 32 px
        common += [
            "--data.batch_size",
            "32",
            "--model.small_stem",
            "false",
            "--model.symmetric",
            "false",
            "--run.device",
            "cpu",
        ]

    # Calibration: the rate of this recipe on this machine, and the start-up cost.
    calib_steps = 2 if dry else 60
    started = time.monotonic()
    code = session.run(
        session.python(
            "-m",
            "moco_dali.train",
            *common,
            "--run.out",
            str(work / "calibration"),
            "--run.max_steps",
            str(calib_steps),
            "--run.log_every",
            str(max(1, calib_steps // 4)),
            "--run.knn_every",
            "0",
        ),
        deadline - time.monotonic(),
    )
    rate = _rate(work / "calibration")
    if code or not rate:
        return {"status": "failed", "reason": "the calibration run failed (see session.log)"}
    batch = json.loads((work / "calibration" / "config.json").read_text())["data"]["batch_size"]
    startup_s = max(0.0, time.monotonic() - started - calib_steps * batch / rate)
    # Per epoch: the steps, and the kNN monitor's pass over train and test features
    # (forward only, taken as a third of a training step's cost per image).
    test_samples = json.loads((test / "manifest.json").read_text())["samples"]
    epoch_s = samples / rate + (samples + test_samples) / (3 * rate)
    reserve_s = 10 if dry else 60  # kNN at initialisation, the record, the summary
    available_s = deadline - time.monotonic() - startup_s - reserve_s
    epochs = 1 if dry else max(1, math.floor(available_s / epoch_s))
    command = [
        "moco-train",
        *common,
        "--run.out",
        str(work / "run"),
        "--run.epochs",
        str(epochs),
        "--run.knn_every",
        "1",
        "--run.log_every",
        "2" if dry else "50",
    ]
    started = time.monotonic()
    code = session.run(
        session.python("-m", "moco_dali.train", *command[1:]),
        deadline - time.monotonic() - reserve_s,
    )
    wall_s = time.monotonic() - started
    checkpoint = _latest_checkpoint(work / "run")
    if checkpoint is None:
        return {
            "status": "failed" if code != 124 else "timed_out",
            "reason": "pretraining left no checkpoint",
        }
    record = {
        "status": "ok" if code == 0 else "timed_out",
        "epochs": epochs,
        "calibration_images_per_s": rate,
        "startup_s": round(startup_s, 1),
        "pretraining_wall_s": round(wall_s, 1),
    }

    eval_args = ["--checkpoint", str(checkpoint), "--train", str(train), "--val", str(test)]
    if dry:
        eval_args += ["--device", "cpu"]
    knn_init = work / "knn-init.json"
    if session.run(
        session.python(
            "-m",
            "moco_dali.train.eval.cli",
            "knn",
            *eval_args,
            "--random-init",
            "--json",
            str(knn_init),
        ),
        max(10.0, deadline - time.monotonic()),
    ):
        return {**record, "status": "failed", "reason": "kNN at initialisation"}
    linear = work / "linear.json"
    linear_epochs = 1 if dry else 10
    linear_args = []
    if deadline - time.monotonic() > (10 if dry else 60):
        code = session.run(
            session.python(
                "-m",
                "moco_dali.train.eval.cli",
                "linear",
                *eval_args,
                "--epochs",
                str(linear_epochs),
                "--no-progress",
                "--out",
                str(work / "linear"),
                "--json",
                str(linear),
            ),
            deadline - time.monotonic() - 5,
        )
        if code == 0 and linear.is_file():
            linear_args = ["--linear", str(linear)]
    record["linear_probe"] = f"{linear_epochs} epochs" if linear_args else "skipped: no time left"
    code = session.run(
        [
            session.args.python,
            "-m",
            "benchmarks.quality_record",
            "--run",
            str(work / "run"),
            "--wall-s",
            f"{wall_s:.1f}",
            "--knn-init",
            str(knn_init),
            *linear_args,
            "--command",
            " ".join(command),
            "--note",
            f"gpu_session.sh{' --dry-run' if dry else ''}: {epochs} epochs sized to the time left "
            f"from a {calib_steps}-step calibration at {rate:.0f} img/s",
            "--out",
            str(out / "quality"),
        ],
        60,
    )
    if code == 0:
        result = json.loads((out / "quality.json").read_text())
        record["knn"] = {
            "at_init": result["knn"]["at_init"],
            "final": result["knn"]["final"],
            "best": result["knn"]["best"],
            "goal": 90.0,
        }
        if result.get("linear"):
            record["linear_top1"] = result["linear"].get("top1")
    else:
        record.update(status="failed", reason="writing the quality record")
    return record


def build_shards(source: str, out: Path, limit: int | None, workers: int) -> None:
    """Raw dumps (one PNG per image, a folder per class) and shards of both splits, as ``moco-demo`` builds them."""
    import shutil

    from moco_dali.tools.demo import data as demo
    from moco_dali.tools.shards.build import build
    from moco_dali.tools.shards.settings import BuildSettings

    shutil.rmtree(out, ignore_errors=True)
    for split in ("train", "test"):
        raw = out / "raw" / split
        split_limit = limit if split == "train" or limit is None else max(limit // 6, 10)
        if source == "generated":  # a dry run on a machine without Fashion-MNIST
            demo.generated_dump(
                raw, max(1, (split_limit or 600) // 10), seed=0 if split == "train" else 1
            )
        else:
            images, labels = demo.load_fashion_mnist(Path(source), split)
            demo.write_dump(
                images[:split_limit], labels[:split_limit], demo.FASHION_MNIST_CLASSES, raw
            )
        report = build(
            [str(raw)],
            out / "shards" / split,
            BuildSettings(name=f"fashion-mnist-{split}", labels="folder"),
            workers=workers,
            progress=False,
        )
        print(f"{split}: {report.summary()}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_quality")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "shards", help="Fashion-MNIST .gz files -> raw dumps -> train and test shards"
    )
    s.add_argument("source", help="folder with the four .gz files, or 'generated'")
    s.add_argument("out", type=Path)
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    build_shards(args.source, args.out, args.limit, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
