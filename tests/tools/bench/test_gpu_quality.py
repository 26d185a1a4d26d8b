"""benchmarks/gpu_quality: the quality stage's shard building, run for real at a tiny size.

The session tests mock every stage; these run the function the stage runs (in the
subprocess it starts, for the generated stand-in), so that an import it depends on
cannot break unseen.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks import gpu_quality

REPO = Path(__file__).resolve().parents[3]


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _samples(folder: Path) -> int:
    return json.loads((folder / "manifest.json").read_text())["samples"]


def test_the_stage_builds_shards_of_the_generated_stand_in_as_its_command(tmp_path):
    # What quality_stage runs in a dry run without Fashion-MNIST: the module as a command.
    out = tmp_path / "fmnist"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_quality",
            "shards",
            "generated",
            str(out),
            "--limit",
            "20",
            "--workers",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert _samples(out / "shards" / "train") == 20 and _samples(out / "shards" / "test") == 10


def test_the_stage_builds_shards_of_fashion_mnist_files(tmp_path):
    source = tmp_path / "gz"
    source.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 30), ("t10k", 12)):
        _idx(source / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        _idx(source / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    gpu_quality.build_shards(str(source), tmp_path / "out", limit=24, workers=1)
    train = json.loads((tmp_path / "out" / "shards" / "train" / "manifest.json").read_text())
    assert train["samples"] == 24 and train["classes"][0] == "0-tshirt-top"
    assert _samples(tmp_path / "out" / "shards" / "test") == 10
