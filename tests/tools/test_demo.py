"""moco-demo: the README's main job on its generated fallback, and the IDX reader."""

import gzip

import numpy as np

from moco_dali.pipeline import shards
from moco_dali.tools import demo


def test_idx_reader_reads_images_and_labels(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    labels = np.array([7, 3], np.uint8)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + images.tobytes())
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x01" + (2).to_bytes(4, "big") + labels.tobytes())
    got_images, got_labels = demo.load_fashion_mnist(tmp_path, "train")
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_demo_builds_verified_labelled_shards(tmp_path, capsys):
    assert demo.main(["--generated", "--limit", "100", "--out", str(tmp_path), "--workers", "2", "--train-steps", "0"]) == 0
    out = capsys.readouterr().out
    assert "verify train: OK" in out and "verify test: OK" in out
    manifest = shards.load_manifest(tmp_path / "generated-shapes" / "shards" / "train")
    assert manifest.samples == 100 and len(manifest.classes) == 10
