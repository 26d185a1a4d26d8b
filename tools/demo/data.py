"""The demo's data: Fashion-MNIST as a raw image dump, or drawn shapes where it is absent.

Unpacks Fashion-MNIST (Debian package ``dataset-fashion-mnist``) into a raw image
dump, one PNG per image in one folder per class, as users' own dumps look; where
the package is absent it draws a small labelled set of shapes instead.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "load_fashion_mnist",
    "write_dump",
    "generated_dump",
    "subset_list",
]

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
# Numbered so that sorted folder names give the data set's own label order.
FASHION_MNIST_CLASSES = [
    "0-tshirt-top",
    "1-trouser",
    "2-pullover",
    "3-dress",
    "4-coat",
    "5-sandal",
    "6-shirt",
    "7-sneaker",
    "8-bag",
    "9-ankle-boot",
]
_SPLITS = {"train": "train", "test": "t10k"}


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format): big-endian dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(
    root: Path = FASHION_MNIST_DIR, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of one split ("train" or "test")."""
    prefix = _SPLITS[split]
    return (
        _read_idx(root / f"{prefix}-images-idx3-ubyte.gz"),
        _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz"),
    )


def write_dump(images: np.ndarray, labels: np.ndarray, classes: list[str], out: Path) -> int:
    """Write ``out/CLASS/NNNNN.png`` for each image; return how many were written."""
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        path = out / classes[label] / f"{i:05d}.png"
        if not path.exists():
            Image.fromarray(image).save(path, compress_level=1)
    return len(images)


_SHAPES = [
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "hstripes",
    "vstripes",
    "diagonal",
    "dots",
    "diamond",
]


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
                draw.polygon(
                    [
                        (int(c[0]), box[1]),
                        (box[2], int(c[1])),
                        (int(c[0]), box[3]),
                        (box[0], int(c[1])),
                    ],
                    fill=color,
                )
            noise = rng.normal(0, 8, (32, 32, 3))
            pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:05d}.png", compress_level=1)


def subset_list(dump: Path, count: int, out: Path) -> Optional[Path]:
    """A list file of ``count`` images spread evenly over a dump's sorted files (all classes), or None if it has fewer."""
    # Paths relative to the list's own folder, as moco-shards build reads them.
    files = sorted(os.path.relpath(p, out.parent) for p in dump.rglob("*.png"))
    if len(files) <= count:
        return None
    out.write_text("".join(f"{files[i * len(files) // count]}\n" for i in range(count)))
    return out
