"""``moco-shards preview``: a picture of what a recipe does, before any GPU hour is spent.

Writes a PNG grid with one row per sample: the stored image, then its two views as
the DALI pipeline makes them (de-normalised), so a user can see the crops, colours,
grey, blur and flips of a preset on their own shards.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from ...common.files import unwritable
from ...pipeline import shards
from ...pipeline.config import LoaderConfig
from ...pipeline.loader import ViewLoader
from ...pipeline.recipes import AugmentConfig, v2
from . import BuildError

__all__ = ["preview"]

_PAD = 6
_HEADER = 18
MAX_COUNT = 256
"""The most samples (rows) a preview draws."""
MAX_SIZE = 1024
"""The largest view (px) a preview draws."""
MAX_GRID_PIXELS = 1 << 26
"""The largest grid a preview draws (64 Mpx, 192 MB of RGB): count x 3 tiles of size^2."""


def _fit(image: Image.Image, side: int) -> Image.Image:
    """The stored image scaled to fit the tile, up as well as down (a 28 px image beside 96 px views)."""
    scale = side / max(image.width, image.height)
    image = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
        Image.Resampling.BICUBIC,
    )
    canvas = Image.new("RGB", (side, side), (32, 32, 32))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def _denormalise(view, mean, std) -> Image.Image:
    pixels = (
        view.float().permute(1, 2, 0).cpu().numpy() * (np.array(std) * 255) + np.array(mean) * 255
    )
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def preview(
    folder: str | Path,
    out: str | Path,
    *,
    recipe: Optional[AugmentConfig] = None,
    count: int = 8,
    seed: int = 0,
    device_id: Optional[int] = None,
) -> Path:
    """Write the preview grid of ``count`` samples of ``folder`` under ``recipe`` to ``out``.

    ``recipe`` is a whole ``AugmentConfig`` (its own size; default v2 at 224 px), such as the
    one ``moco-train`` resolves from a configuration.

    Raises:
        BuildError: a count outside 1..``MAX_COUNT``, views outside 8..``MAX_SIZE`` px, a grid
            over ``MAX_GRID_PIXELS``, or an ``out`` that cannot be written (before any work).
        ShardError: ``folder`` is not a sound shard folder.
    """
    folder, out = str(folder), Path(out)  # a path, or the store's s3:// address as given
    recipe = recipe or v2()
    if count < 1:
        raise BuildError(f"--count must be at least 1, got {count}")
    if count > MAX_COUNT:
        raise BuildError(f"--count {count}: a preview draws at most {MAX_COUNT} samples")
    if recipe.size < 8:
        raise BuildError(f"data.views.size must be at least 8 px for a preview, got {recipe.size}")
    if recipe.size > MAX_SIZE:
        raise BuildError(
            f"data.views.size {recipe.size}: a preview draws views of at most {MAX_SIZE} px"
        )
    if count * 3 * recipe.size**2 > MAX_GRID_PIXELS:
        raise BuildError(
            f"--count {count} at data.views.size {recipe.size}: a grid of "
            f"{count * 3 * recipe.size**2} pixels, over the limit of {MAX_GRID_PIXELS}; lower either"
        )
    why = unwritable("--out", out, folder=False)  # before decoding anything
    if why:
        raise BuildError(why)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        _draw(folder, tmp, recipe, count, recipe.size, seed, device_id)
        os.replace(tmp, out)
    except OSError as exc:
        raise BuildError(f"--out {out}: cannot write: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _draw(
    folder: str,
    out: Path,
    recipe: AugmentConfig,
    count: int,
    size: int,
    seed: int,
    device_id: Optional[int],
) -> None:
    loader = ViewLoader(
        folder,
        recipe,
        LoaderConfig(
            batch_size=count,
            dtype="float32",
            shuffle=False,
            seed=seed,
            keys=True,
            labels=False,
            last_batch="partial",
        ),
        device_id=device_id,
    )
    batch = next(iter(loader))
    where = {
        key: (tar, offset, size)
        for tar, key, offset, size in shards.iter_members(loader.pairs, "jpg")
    }
    rows = len(batch)
    grid = Image.new(
        "RGB", (3 * size + 4 * _PAD, _HEADER + rows * (size + _PAD) + _PAD), (255, 255, 255)
    )
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(["stored image", "view q", "view k"]):
        draw.text((_PAD + col * (size + _PAD), 4), title, fill=(0, 0, 0))
    for row, key in enumerate(batch.keys):
        tar, offset, length = where[key]
        with open(tar, "rb") as f:
            f.seek(offset)
            stored = io.BytesIO(f.read(length))
        original = Image.open(stored, formats=shards.STORED_FORMATS).convert("RGB")
        tiles = [
            _fit(original, size),
            _denormalise(batch.view_q[row], recipe.mean, recipe.std),
            _denormalise(batch.view_k[row], recipe.mean, recipe.std),
        ]
        y = _HEADER + row * (size + _PAD)
        for col, tile in enumerate(tiles):
            grid.paste(tile, (_PAD + col * (size + _PAD), y))
        draw.text((_PAD + 2, y + 2), key, fill=(255, 255, 0))
    grid.save(out, format="PNG")
