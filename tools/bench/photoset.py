"""An ImageNet-like set of real photographs for benchmarks, made without a network.

Benchmarks of decoding must run on photographs: noise decodes at a very different
speed. Debian ships real photographs as desktop backgrounds (``mate-backgrounds``,
``plasma-workspace-wallpapers``); this module crops them into many distinct
ImageNet-sized JPEGs (500x375 or 375x500, baseline 4:2:0) at the quality that brings
the mean file size closest to a target.
"""

from __future__ import annotations

import glob
import logging
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import simplejpeg
from PIL import Image

from ...common.commandline import Parser, add_flags, from_flags
from ...common.files import write_json_atomic
from ...common.options import OptionError, option

__all__ = ["DEBIAN_PHOTOS", "fetch_debian_photos", "make_photoset"]

log = logging.getLogger(__name__)

# Photographs only: the packages also hold drawings and abstract renders.
DEBIAN_PHOTOS = {
    "mate-backgrounds": ["usr/share/backgrounds/mate/nature/*.jpg"],
    "plasma-workspace-wallpapers": [
        f"usr/share/wallpapers/{name}/contents/images/*.jpg"
        for name in (
            "BytheWater",
            "ColdRipple",
            "ColorfulCups",
            "DarkestHour",
            "EveningGlow",
            "FallenLeaf",
            "Kite",
            "OneStandsOut",
            "Path",
            "Volna",
            "summer_1am",
        )
    ],
}


def fetch_debian_photos(out: Path) -> list[Path]:
    """Download the packages with ``apt-get download`` (no root) and copy their photos to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["apt-get", "download", *DEBIAN_PHOTOS], cwd=tmp, check=True, capture_output=True
        )
        for deb in glob.glob(f"{tmp}/*.deb"):
            subprocess.run(["dpkg-deb", "-x", deb, f"{tmp}/x"], check=True)
        for _package, patterns in DEBIAN_PHOTOS.items():
            for pattern in patterns:
                files = sorted(glob.glob(f"{tmp}/x/{pattern}"), key=os.path.getsize)
                if "wallpapers" in pattern:
                    files = files[-1:]  # the largest rendition of each wallpaper
                for f in files:
                    name = (
                        f.split("/wallpapers/")[-1].split("/")[0]
                        if "wallpapers" in pattern
                        else Path(f).stem
                    )
                    shutil.copyfile(f, out / f"{name}.jpg")
    return sorted(out.glob("*.jpg"))


_sources: list[np.ndarray] = []


def _load_sources(paths: list[str]) -> None:
    global _sources
    # JPEG only: no Pillow plugin that hands a file to a program (EPS: Ghostscript) is reached.
    _sources = [np.asarray(Image.open(p, formats=["JPEG"]).convert("RGB")) for p in paths]


def _crop(seed: int) -> np.ndarray:
    rng = random.Random(seed)
    source = _sources[seed % len(_sources)]
    height, width = source.shape[:2]
    portrait = rng.random() < 0.25
    out_w, out_h = (375, 500) if portrait else (500, 375)
    # Downscale by at most 2x so crops keep a photo's fine detail, as ImageNet's do.
    factor = min(rng.uniform(1.0, 2.0), width / out_w, height / out_h)
    w, h = int(out_w * factor), int(out_h * factor)
    x, y = rng.randint(0, width - w), rng.randint(0, height - h)
    crop = Image.fromarray(source[y : y + h, x : x + w]).resize(
        (out_w, out_h), Image.Resampling.BICUBIC
    )
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)


def _write(job: tuple[int, int, str]) -> int:
    seed, quality, path = job
    data = simplejpeg.encode_jpeg(_crop(seed), quality, "RGB", "420")
    Path(path).write_bytes(data)
    return len(data)


def _calibrate(target_kb: float) -> int:
    sample = [_crop(10_000_000 + i) for i in range(48)]
    best = None
    for quality in range(80, 99):
        mean_kb = (
            np.mean([len(simplejpeg.encode_jpeg(a, quality, "RGB", "420")) for a in sample]) / 1000
        )
        if best is None or abs(mean_kb - target_kb) < abs(best[1] - target_kb):
            best = (quality, mean_kb)
    return best[0]


def make_photoset(
    sources: Sequence[Path],
    out: Path,
    count: int,
    *,
    target_kb: float = 110.0,
    quality: Optional[int] = None,
    workers: Optional[int] = None,
) -> dict:
    """Write ``count`` photo crops to ``out``; return what was made (quality, mean size).

    The JPEG quality is ``quality`` if given, else the one of 80..98 whose mean file
    size on a calibration sample comes closest to ``target_kb``.
    """
    paths = [str(p) for p in sources]
    if not paths:
        raise ValueError("no source photographs")
    out.mkdir(parents=True, exist_ok=True)
    _load_sources(paths)
    quality = quality or _calibrate(target_kb)
    jobs = [(i, quality, str(out / f"{i:06d}.jpg")) for i in range(count)]
    with multiprocessing.get_context("fork").Pool(workers or os.cpu_count()) as pool:
        sizes = pool.map(_write, jobs, chunksize=16)
    info = {
        "count": count,
        "quality": quality,
        "mean_kb": round(float(np.mean(sizes)) / 1000, 1),
        "sources": len(paths),
        "size": "500x375 (75%) / 375x500 (25%)",
        "subsampling": "4:2:0",
    }
    log.info("photo set: %s", info)
    return info


@dataclass
class PhotosetOptions:
    out: Path = option(required=True)
    """Folder to write photos/ and photoset.json into."""
    count: int = 2000
    """Photographs to make."""
    src: Optional[Path] = None
    """Folder of source photographs (default: fetch Debian's)."""
    target_kb: float = 110.0
    """Mean file size sought, in KB."""
    quality: Optional[int] = None
    """A fixed JPEG quality instead of --target-kb."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = Parser(
        prog="python -m moco_dali.tools.bench.photoset", description=__doc__.split("\n\n")[0]
    )
    add_flags(parser, PhotosetOptions)
    try:
        opts = from_flags(PhotosetOptions, parser.parse_args(argv))
    except OptionError as exc:
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO)
    sources = (
        sorted(opts.src.glob("*.jpg")) if opts.src else fetch_debian_photos(opts.out / "_sources")
    )
    info = make_photoset(
        sources, opts.out / "photos", opts.count, target_kb=opts.target_kb, quality=opts.quality
    )
    write_json_atomic(opts.out / "photoset.json", info)
    print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
