"""One data set in the three layouts others hand us: the same samples and the same kNN at initialisation.

A study (not a ``moco-bench`` mode: it checks that three ways in give one data set, it does not
time them). Fashion-MNIST (train 60,000 / test 10,000 by default, or ``--train N --val M`` evenly
spread subsets) is encoded once as baseline RGB JPEGs, then written as:

- img2dataset-shaped WebDataset tars (``KEY.jpg``, ``KEY.cls``, ``KEY.json``), indexed in place
  with ``moco-shards index --labels cls``;
- an ImageNet-shaped archive of per-class archives (``SPLIT.tar`` holding ``CLASS.tar`` holding
  ``CLASS_N.JPEG``), built with ``moco-shards build --labels archive``;
- Hugging Face-layout Parquet (an ``image`` struct of ``bytes`` and ``path``, a ``label`` column
  with ``ClassLabel`` names, row groups of 1,000), built with ``moco-shards build --labels column``.

For each layout it records the sample count, the multiset of (JPEG sha256, class) of each split,
and the weighted kNN top-1/top-5 (k 200, T 0.1, 32 px) of one randomly initialised ResNet-18
(seed 0) with the train split voting on the test split. The figures are equal because the three
folders hold the same JPEG bytes with the same classes (the builds keep a clean baseline JPEG
byte for byte, the index never rewrites one), the evaluation view is deterministic (resize and
centre crop) and the encoder is in eval mode (each image's features its own); only the order of
the samples differs, which the kNN does not see.

    python -m benchmarks.studies.three_layouts --out RESULT.json [--train N --val M]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import simplejpeg

from moco_dali.pipeline import shards
from moco_dali.tools.bench.machine import describe
from moco_dali.tools.demo.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.index import IndexCommand, index
from moco_dali.tools.shards.settings import BuildSettings

LAYOUTS = ("webdataset_index", "imagenet_archive", "hf_parquet")
PER_TAR = 10_000
ROW_GROUP = 1_000


def jpegs(images: np.ndarray) -> list[bytes]:
    """Each grey image as a baseline RGB JPEG (what a build keeps byte for byte)."""
    return [
        simplejpeg.encode_jpeg(np.repeat(image[:, :, None], 3, axis=2), 90, "RGB", "420")
        for image in images
    ]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(data: list[bytes], labels: np.ndarray, out: Path) -> list[str]:
    """img2dataset's shape: ``NNNNN.tar`` of ``KEY.jpg``, ``KEY.cls``, ``KEY.json``."""
    out.mkdir(parents=True)
    paths = []
    for start in range(0, len(data), PER_TAR):
        path = out / f"{start // PER_TAR:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + PER_TAR, len(data))):
                key = f"{i:09d}"
                _add(tar, f"{key}.jpg", data[i])
                _add(tar, f"{key}.cls", str(int(labels[i])).encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
        paths.append(str(path))
    return paths


def write_archive(data: list[bytes], labels: np.ndarray, path: Path) -> None:
    """ImageNet's shape: one archive of ``CLASS.tar`` archives of ``CLASS_N.JPEG``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as outer:
        for c, name in enumerate(FASHION_MNIST_CLASSES):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as inner:
                for i in np.flatnonzero(labels == c):
                    _add(inner, f"{name}_{i}.JPEG", data[i])
            _add(outer, f"{name}.tar", buffer.getvalue())


def write_parquet(data: list[bytes], labels: np.ndarray, path: Path) -> None:
    """The Hugging Face layout: an ``image`` struct of bytes and path, a ClassLabel ``label``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {
        "image": {"_type": "Image"},
        "label": {"names": FASHION_MNIST_CLASSES, "_type": "ClassLabel"},
    }
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image), ("label", pa.int64())]).with_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})}
    )
    table = pa.table(
        {
            "image": pa.array([{"bytes": b, "path": None} for b in data], type=image),
            "label": pa.array(labels.astype(np.int64)),
        },
        schema=schema,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=ROW_GROUP)


def content(folder: Path) -> str:
    """sha256 of the sorted (JPEG sha256, class) pairs of a shard folder: its samples as a multiset."""
    manifest = shards.load_manifest(folder)
    pairs = []
    for entry in manifest.shards:
        with tarfile.open(manifest.path(entry.tar)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                key = name[: -len(".jpg")]
                cls = members[f"{key}.cls"].decode()
                pairs.append(f"{hashlib.sha256(data).hexdigest()} {cls}\n")
    return hashlib.sha256("".join(sorted(pairs)).encode()).hexdigest()


def make_layouts(splits: dict, work: Path, workers: int) -> dict[str, dict[str, Path]]:
    """Each layout's shard folder of each split (``{"train": (images, labels), ...}``)."""
    folders: dict[str, dict[str, Path]] = collections.defaultdict(dict)
    for split, (images, labels) in splits.items():
        data = jpegs(images)
        tars = write_webdataset(data, labels, work / "wds" / split)
        out = work / "shards" / "webdataset_index" / split
        index(IndexCommand(sources=tars, out=str(out), labels="cls"))
        folders["webdataset_index"][split] = out
        write_archive(data, labels, work / "imagenet" / f"{split}.tar")
        out = work / "shards" / "imagenet_archive" / split
        settings = BuildSettings(labels="archive")
        build(
            [str(work / "imagenet" / f"{split}.tar")],
            out,
            settings,
            workers=workers,
            progress=False,
        )
        folders["imagenet_archive"][split] = out
        write_parquet(data, labels, work / "hf" / split / f"{split}-00000-of-00001.parquet")
        out = work / "shards" / "hf_parquet" / split
        settings = BuildSettings(labels="column")
        build([str(work / "hf" / split)], out, settings, workers=workers, progress=False)
        folders["hf_parquet"][split] = out
    return folders


def knn_at_init(train: Path, val: Path, size: int, threads: int) -> dict:
    """Weighted kNN (k 200, T 0.1) of a ResNet-18 drawn with seed 0, as ``moco-eval knn
    --random-init`` measures a run's step 0."""
    import torch

    from moco_dali.model.encoders import resnet
    from moco_dali.pipeline.recipes import EvalConfig
    from moco_dali.train.eval.knn import extract_features, knn_classify

    torch.manual_seed(0)
    encoder = resnet("resnet18")(num_classes=128).eval()
    view = EvalConfig(resize=size, size=size)
    common = dict(batch_size=256, device=torch.device("cpu"), threads=threads)
    train_f, train_y, classes = extract_features(encoder, str(train), view, **common)
    val_f, val_y, _ = extract_features(encoder, str(val), view, **common)
    return knn_classify(train_f, train_y, val_f, val_y, classes, k=200, t=0.1)


def compare(splits: dict, work: Path, workers: int = 2, threads: int = 2, size: int = 32) -> dict:
    """Every layout's counts, content digests and kNN at initialisation."""
    started = time.perf_counter()
    folders = make_layouts(splits, work, workers)
    layouts = {}
    for layout in LAYOUTS:
        manifests = {
            s: json.loads((f / "manifest.json").read_text()) for s, f in folders[layout].items()
        }
        layouts[layout] = {
            "samples": {s: m["samples"] for s, m in manifests.items()},
            "rejected": {s: m["rejected"] for s, m in manifests.items()},
            "classes": manifests["train"]["classes"],
            "content_sha256": {s: content(f) for s, f in folders[layout].items()},
            "knn": knn_at_init(folders[layout]["train"], folders[layout]["val"], size, threads),
        }
        print(f"{layout:18s} {json.dumps(layouts[layout]['knn'])}", file=sys.stderr, flush=True)
    first = layouts[LAYOUTS[0]]
    same = {
        key: all(layouts[layout][key] == first[key] for layout in LAYOUTS)
        for key in ("samples", "content_sha256", "knn")
    }
    return {"layouts": layouts, "equal": same, "seconds": time.perf_counter() - started}


def _spread(images: np.ndarray, labels: np.ndarray, count: Optional[int]):
    if count is None or count >= len(images):
        return images, labels
    picks = np.arange(count) * len(images) // count
    return images[picks], labels[picks]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=None, help="train images (default: all)")
    parser.add_argument("--val", type=int, default=None, help="test images (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    splits = {
        "train": _spread(*load_fashion_mnist(split="train"), args.train),
        "val": _spread(*load_fashion_mnist(split="test"), args.val),
    }
    work = Path(tempfile.mkdtemp(prefix="three-layouts-"))
    try:
        result = compare(splits, work, workers=args.workers, threads=args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {
        "benchmark": "three_layouts",
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe(),
        "data": f"Fashion-MNIST: {len(splits['train'][0])} train images (kNN votes), "
        f"{len(splits['val'][0])} test images (classified)",
        "encoder": "resnet18, torch.manual_seed(0), eval mode; 32 px (resize 32, centre crop 32)",
        "knn": {"k": 200, "t": 0.1},
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0 if all(result["equal"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
