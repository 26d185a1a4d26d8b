"""``moco-demo``: the built-in default job, on real data where the machine has it.

Unpacks Fashion-MNIST (Debian package ``dataset-fashion-mnist``) into a raw image
dump, one PNG per image in one folder per class, as users' own dumps look; where
the package is absent it generates a small labelled set of drawn shapes instead.
Then it builds train and test shards from the dump with ``moco-shards build``'s
code, verifies them through DALI and prints what they hold; then it pretrains a
small encoder for a few minutes with ``moco-train``'s engine and prints the kNN
accuracy on the test images of the pretrained encoder beside that of the same
encoder at initialisation.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from moco_dali.tools.shards.build import BuildSettings, build
from moco_dali.tools.shards.verify import format_inspection, inspect, verify

__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "load_fashion_mnist", "write_dump", "generated_dump", "main"]

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
# Numbered so that sorted folder names give the data set's own label order.
FASHION_MNIST_CLASSES = [
    "0-tshirt-top", "1-trouser", "2-pullover", "3-dress", "4-coat",
    "5-sandal", "6-shirt", "7-sneaker", "8-bag", "9-ankle-boot",
]
_SPLITS = {"train": "train", "test": "t10k"}


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format): big-endian dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(root: Path = FASHION_MNIST_DIR, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of one split ("train" or "test")."""
    prefix = _SPLITS[split]
    return (_read_idx(root / f"{prefix}-images-idx3-ubyte.gz"),
            _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz"))


def write_dump(images: np.ndarray, labels: np.ndarray, classes: list[str], out: Path) -> int:
    """Write ``out/CLASS/NNNNN.png`` for each image; return how many were written."""
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        path = out / classes[label] / f"{i:05d}.png"
        if not path.exists():
            Image.fromarray(image).save(path, compress_level=1)
    return len(images)


_SHAPES = ["circle", "square", "triangle", "cross", "ring", "hstripes", "vstripes", "diagonal", "dots", "diamond"]


def generated_dump(out: Path, per_class: int, seed: int) -> None:
    """A labelled stand-in for Fashion-MNIST: 32x32 colour drawings of ten shapes."""
    rng = np.random.default_rng(seed)
    for label, shape in enumerate(_SHAPES):
        folder = out / f"{label}-{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            image = Image.new("RGB", (32, 32), tuple(int(v) for v in bg))
            draw = ImageDraw.Draw(image)
            c, r = rng.integers(12, 20, 2), int(rng.integers(6, 11))
            box = [int(c[0] - r), int(c[1] - r), int(c[0] + r), int(c[1] + r)]
            color = tuple(int(v) for v in fg)
            if shape == "circle":
                draw.ellipse(box, fill=color)
            elif shape == "square":
                draw.rectangle(box, fill=color)
            elif shape == "triangle":
                draw.polygon([(box[0], box[3]), (box[2], box[3]), (int(c[0]), box[1])], fill=color)
            elif shape == "cross":
                draw.line([(box[0], box[1]), (box[2], box[3])], fill=color, width=3)
                draw.line([(box[0], box[3]), (box[2], box[1])], fill=color, width=3)
            elif shape == "ring":
                draw.ellipse(box, outline=color, width=3)
            elif shape == "hstripes":
                for y in range(0, 32, 6):
                    draw.rectangle([0, y, 31, y + 2], fill=color)
            elif shape == "vstripes":
                for x in range(0, 32, 6):
                    draw.rectangle([x, 0, x + 2, 31], fill=color)
            elif shape == "diagonal":
                for k in range(-32, 32, 8):
                    draw.line([(k, 0), (k + 31, 31)], fill=color, width=2)
            elif shape == "dots":
                for x in range(3, 32, 8):
                    for y in range(3, 32, 8):
                        draw.ellipse([x, y, x + 3, y + 3], fill=color)
            else:
                draw.polygon([(int(c[0]), box[1]), (box[2], int(c[1])), (int(c[0]), box[3]), (box[0], int(c[1]))],
                             fill=color)
            noise = rng.normal(0, 8, (32, 32, 3))
            pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:05d}.png", compress_level=1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="moco-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo", metavar="DIR", help="working folder")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="use only the first N training images (test: N/6)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--generated", action="store_true", help="use generated shapes even if Fashion-MNIST is there")
    parser.add_argument("--train-steps", type=int, default=200, metavar="N",
                        help="pretraining steps of 128 images (0: build and verify only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="moco-demo: %(message)s")
    started = time.monotonic()
    out = Path(args.out)

    have_fmnist = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file() and not args.generated
    if have_fmnist:
        data_name = "fashion-mnist"
        log.info("Fashion-MNIST found in %s", FASHION_MNIST_DIR)
    else:
        data_name = "generated-shapes"
        log.info("Fashion-MNIST not found in %s (install the Debian package dataset-fashion-mnist); "
                 "using generated shapes", FASHION_MNIST_DIR)
    root = out / data_name
    for split in ("train", "test"):
        limit = args.limit if split == "train" or args.limit is None else max(args.limit // 6, 10)
        raw = root / "raw" / split
        if have_fmnist:
            images, labels = load_fashion_mnist(FASHION_MNIST_DIR, split)
            images, labels = images[:limit], labels[:limit]
            log.info("%s: writing the raw dump (%d PNGs) to %s", split, len(images), raw)
            write_dump(images, labels, FASHION_MNIST_CLASSES, raw)
        else:
            per_class = (limit or (6000 if split == "train" else 1000)) // len(_SHAPES)
            log.info("%s: drawing %d images per class into %s", split, per_class, raw)
            generated_dump(raw, per_class, seed=0 if split == "train" else 1)
        shard_dir = root / "shards" / split
        report = build([str(raw)], shard_dir, BuildSettings(name=f"{data_name}-{split}", labels="folder"),
                       workers=args.workers)
        print(f"moco-demo: build {split}: {report.summary()}")
        print(f"moco-demo: verify {split}: {verify(shard_dir).summary()}")
        print(format_inspection(inspect(shard_dir)))
    if args.train_steps > 0:
        before, after = pretrain(root, args.train_steps)
        print(f"moco-demo: kNN top-1 on the {data_name} test images (k=200, T=0.1): "
              f"{before['top1']:.2f}% at initialisation -> {after['top1']:.2f}% after {args.train_steps} "
              f"steps of MoCo pretraining (top-5 {before['top5']:.2f}% -> {after['top5']:.2f}%)")
    print(f"moco-demo: done in {time.monotonic() - started:.0f} s; shards in {root / 'shards'}")
    return 0


def demo_config(root: Path, steps: int):
    """The demo's run: the ``small`` preset on a CPU budget.

    ResNet-18 with its standard stem on 32 px views (the stem shrinks them to 8 px
    before the blocks, so a step of 128 images takes about 0.4 s on two cores), no
    symmetric loss, a cosine schedule over one epoch; otherwise the preset (K 4096,
    m 0.99, T 0.1, lr 0.03 per 256 images, weight decay 5e-4).
    """
    from moco_dali.train.config import preset

    config = preset("small")
    config.model.small_stem, config.model.symmetric = False, False
    config.data.train = str(root / "shards" / "train")
    config.data.knn_train, config.data.knn_val = str(root / "shards" / "train"), str(root / "shards" / "test")
    config.data.batch_size = 128
    config.run.epochs, config.run.max_steps, config.run.knn_every = 1, steps, 0
    config.run.out, config.run.log_every, config.run.ckpt_every = str(root / "run"), 20, 100
    return config


def pretrain(root: Path, steps: int) -> tuple[dict, dict]:
    """kNN accuracy of the encoder at initialisation and after ``steps`` of pretraining."""
    import shutil

    import torch

    from moco_dali.train import checkpoint
    from moco_dali.train.engine import build_model, knn_accuracy, train

    config = demo_config(root, steps)
    shutil.rmtree(config.run.out, ignore_errors=True)
    device = torch.device("cpu")
    torch.manual_seed(config.run.seed)  # as the engine does: the same initial encoder
    log.info("kNN of the encoder at initialisation (features of %s and %s)", config.data.knn_train, config.data.knn_val)
    before = knn_accuracy(build_model(config, device), config, device)
    log.info("pretraining for %d steps of %d images on the CPU", steps, config.data.batch_size)
    train(config)
    model = build_model(config, device)
    model.load_state_dict(checkpoint.load(checkpoint.latest(Path(config.run.out)))["model"])
    return before, knn_accuracy(model, config, device)


if __name__ == "__main__":
    sys.exit(main())
