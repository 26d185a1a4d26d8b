"""Generated ImageNet-like JPEGs for benchmarks when no photographs are at hand (``moco-bench --synthetic``).

Decoding speed depends on what is in the file: noise is nearly incompressible and
decodes several times slower per pixel than a photograph, flat colour much faster.
These images are built to be photograph-like where it matters for a JPEG decoder:
500x375 or 375x500 (ImageNet's commonest sizes), 4:2:0, a 1/f amplitude spectrum
(the statistics of natural images) under a few hard-edged shapes and a colour
gradient, and a quality searched per image so that files land near ImageNet's mean
of about 110 KB. Deterministic for a seed; no network.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import simplejpeg

from ...common.commandline import Parser, add_flags, from_flags
from ...common.options import OptionError, option

__all__ = ["photo_like", "encode_near", "generate"]


def _pink(rng: np.random.Generator, height: int, width: int, alpha: float) -> np.ndarray:
    """A field with amplitude spectrum 1/f^alpha, scaled to unit standard deviation."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f**alpha
    spectrum[0, 0] = 0
    field = np.fft.irfft2(spectrum, s=(height, width))
    return field / field.std()


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> np.ndarray:
    """One HxWx3 uint8 image: gradient sky/ground, textured shapes, 1/f texture everywhere."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    top, bottom = rng.uniform(40, 220, 3), rng.uniform(20, 200, 3)
    horizon = rng.uniform(0.3, 0.7) * height
    t = 1 / (1 + np.exp(-(y - horizon) / rng.uniform(5, 40)))
    image = top[None, None, :] * (1 - t[..., None]) + bottom[None, None, :] * t[..., None]
    for _ in range(rng.integers(3, 9)):  # objects: ellipses with their own colour and texture
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(20, width / 2.5), rng.uniform(20, height / 2.5)
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
        colour = rng.uniform(0, 255, 3)
        shade = 1 + 0.25 * _pink(rng, height, width, 1.6)[..., None]
        image = np.where(inside[..., None], colour[None, None, :] * shade, image)
    luminance = _pink(rng, height, width, rng.uniform(0.9, 1.2))
    chroma = np.stack([_pink(rng, height, width, 1.6) for _ in range(3)], axis=-1)
    image = image + rng.uniform(28, 40) * luminance[..., None] + 8 * chroma
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_near(
    image: np.ndarray, target_bytes: int, low: int = 60, high: int = 97
) -> tuple[bytes, int]:
    """Baseline 4:2:0 JPEG with the quality in [low, high] whose size comes closest to ``target_bytes``."""
    best: Optional[tuple[int, bytes, int]] = None
    while low <= high:
        quality = (low + high) // 2
        data = simplejpeg.encode_jpeg(image, quality, "RGB", "420")
        if best is None or abs(len(data) - target_bytes) < best[0]:
            best = (abs(len(data) - target_bytes), data, quality)
        if len(data) < target_bytes:
            low = quality + 1
        else:
            high = quality - 1
    return best[1], best[2]


def generate(out: Path, count: int, seed: int = 0, target_kb: float = 110.0) -> dict:
    """Write ``count`` JPEGs as ``out/NNNNNNN.jpg``; return what was made (sizes, bytes, qualities)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes, qualities = [], []
    for i in range(count):
        width, height = (500, 375) if rng.uniform() < 0.75 else (375, 500)
        data, quality = encode_near(photo_like(rng, width, height), int(target_kb * 1000))
        (out / f"{i:07d}.jpg").write_bytes(data)
        sizes.append(len(data))
        qualities.append(quality)
    return {
        "count": count,
        "seed": seed,
        "generator": "moco_dali.tools.bench.synthetic (1/f texture, shapes, gradient)",
        "mean_KB": float(np.mean(sizes)) / 1000 if sizes else 0.0,
        "median_quality": float(np.median(qualities)) if qualities else None,
        "folder": str(out),
    }


@dataclass
class SyntheticOptions:
    out: Path = option(required=True)
    """Folder to write the JPEGs into."""
    count: int = option(required=True)
    """JPEGs to make."""
    seed: int = 0
    """Seed of the images."""
    target_kb: float = 110.0
    """Mean file size sought, in KB (the quality is searched per image)."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = Parser(
        prog="python -m moco_dali.tools.bench.synthetic", description=__doc__.split("\n\n")[0]
    )
    add_flags(parser, SyntheticOptions)
    try:
        opts = from_flags(SyntheticOptions, parser.parse_args(argv))
    except OptionError as exc:
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return 2
    info = generate(opts.out, opts.count, opts.seed, opts.target_kb)
    print(
        f"{info['count']} JPEGs in {opts.out}, mean {info['mean_KB']:.1f} KB, median quality "
        f"{info['median_quality']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
