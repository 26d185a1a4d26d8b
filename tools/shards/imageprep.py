"""Turn one input file into the JPEG a shard stores, or into a reason to reject it.

Every stored image is a baseline, 8-bit, three-component (YCbCr) JPEG, the kind the
GPU's hardware JPEG decoder accepts. A source that already is one, needs no resize
and no EXIF rotation is stored byte for byte once it has decoded cleanly; everything
else is decoded, rotated, converted to RGB, shrunk if asked and re-encoded.

JPEG decoding and encoding go through simplejpeg (libjpeg-turbo) rather than Pillow:
its strict mode turns libjpeg's "corrupt data" warnings into errors (Pillow stores
such images with grey blocks), and on ImageNet-like photos its decode plus encode
costs about half of Pillow's open/convert/save. Pillow handles the other formats of
``READ_FORMATS`` (only those: no plugin that hands a file to a program), CMYK JPEGs and resizing.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from ...common.options import option
from ...pipeline import shards

__all__ = [
    "READ_FORMATS",
    "Rejected",
    "PrepSettings",
    "Prepared",
    "JpegInfo",
    "parse_jpeg_header",
    "target_size",
    "prepare",
    "sample_metadata",
]

DEFAULT_MAX_PIXELS = shards.MAX_PIXELS
READ_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
"""The formats Pillow may open an input as: decoders that run in this process and interpret no
program. Never EPS or PS (Pillow hands them to Ghostscript, which runs the file's PostScript),
PDF, or a plugin whose decoding is delegated to a handler or an external program (WMF, the
BUFR/GRIB/HDF5/FITS stubs); nor the rarely used in-process parsers. Others are rejected with
their format named."""

# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SOF_BASELINE = 0xC0
# Luma sampling factors of 4:4:4, 4:2:2, 4:4:0 and 4:2:0 with unsubsampled chroma, the
# layouts nvJPEG's hardware path decodes.
_HW_LUMA_SAMPLING = {(1, 1), (2, 1), (1, 2), (2, 2)}


class Rejected(Exception):
    """An input that cannot become a shard sample; ``str()`` is the reason."""


@dataclass(frozen=True)
class PrepSettings:
    """How inputs are normalised into stored JPEGs."""

    quality: int = 90
    """JPEG quality (1-100) when re-encoding."""
    max_side: Optional[int] = option(None, metavar="PX")
    """Shrink (never enlarge) so the longer side is at most PX."""
    short_side: Optional[int] = option(None, metavar="PX")
    """Shrink (never enlarge) so the shorter side is PX."""
    max_pixels: int = option(DEFAULT_MAX_PIXELS, metavar="N")
    """Reject larger images as decompression bombs (default: Pillow's limit)."""
    reencode: str = option("auto", choices=["auto", "always"])
    """'auto' stores clean baseline JPEGs byte for byte; 'always' re-encodes every input."""

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")
        for name in ("max_side", "short_side"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a positive number of px, got {value}"
                )
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be positive, got {self.max_pixels}")
        if self.reencode not in ("auto", "always"):
            raise ValueError(f"--reencode must be 'auto' or 'always', got {self.reencode!r}")


@dataclass(frozen=True)
class Prepared:
    """The stored JPEG and what became of the source."""

    jpeg: bytes
    width: int
    height: int
    source_width: int
    source_height: int
    copied: bool


@dataclass(frozen=True)
class JpegInfo:
    sof: int
    precision: int
    width: int
    height: int
    components: tuple[tuple[int, int, int], ...]  # (id, h, v) per component
    adobe_transform: Optional[int]
    orientation: int


def parse_jpeg_header(data: bytes) -> JpegInfo:
    """Read the frame header, Adobe and EXIF orientation markers up to the first scan.

    Raises:
        Rejected: the marker structure is broken before the scan starts.
    """
    n = len(data)
    pos = 2
    sof = None
    adobe = None
    orientation = 1
    while True:
        while pos < n and data[pos] != 0xFF:
            pos += 1  # tolerate stray bytes between segments, as libjpeg does
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise Rejected("truncated JPEG: no image data")
        marker = data[pos]
        pos += 1
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue
        if marker == 0xD9:
            raise Rejected("corrupt JPEG: end of image before any scan")
        if pos + 2 > n:
            raise Rejected("truncated JPEG header")
        length = int.from_bytes(data[pos : pos + 2], "big")
        segment = data[pos + 2 : pos + length]
        if length < 2 or len(segment) != length - 2:
            raise Rejected("truncated JPEG header")
        if marker in _SOF_MARKERS:
            if len(segment) < 6 or len(segment) < 6 + 3 * segment[5]:
                raise Rejected("corrupt JPEG frame header")
            comps = tuple(
                (segment[6 + 3 * i], segment[7 + 3 * i] >> 4, segment[7 + 3 * i] & 15)
                for i in range(segment[5])
            )
            sof = (
                marker,
                segment[0],
                int.from_bytes(segment[3:5], "big"),
                int.from_bytes(segment[1:3], "big"),
                comps,
            )
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe = segment[11]
        elif marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            try:
                exif = Image.Exif()
                exif.load(segment)
                orientation = int(exif.get(0x0112, 1))
            except Exception:  # a broken EXIF block is no reason to lose the image
                orientation = 1
        elif marker == 0xDA:
            if sof is None:
                raise Rejected("corrupt JPEG: scan before frame header")
            marker, precision, width, height, comps = sof
            if width == 0 or height == 0:
                raise Rejected("unsupported JPEG: zero width or height in frame header")
            return JpegInfo(
                marker,
                precision,
                width,
                height,
                comps,
                adobe,
                orientation if orientation in _ORIENTATION else 1,
            )
        pos += length


def target_size(width: int, height: int, settings: PrepSettings) -> tuple[int, int]:
    """The stored size: shrunk to ``short_side`` / ``max_side``, never enlarged."""
    scale = 1.0
    if settings.short_side and min(width, height) > settings.short_side:
        scale = settings.short_side / min(width, height)
    if settings.max_side and max(width, height) * scale > settings.max_side:
        scale = settings.max_side / max(width, height)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _check_pixels(width: int, height: int, settings: PrepSettings) -> None:
    if width * height > settings.max_pixels:
        raise Rejected(
            f"decompression bomb: {width}x{height} = {width * height} pixels over the limit of {settings.max_pixels}"
        )


def _check_stored(size: tuple[int, int]) -> None:
    """What is stored stays within what readers decode (a ``--max-pixels`` above it, unshrunk)."""
    if size[0] * size[1] > shards.MAX_PIXELS:
        raise Rejected(
            f"too large to store: {size[0]}x{size[1]} = {size[0] * size[1]} pixels over the "
            f"readers' limit of {shards.MAX_PIXELS}; shrink with --max-side or --short-side"
        )


def _unread_format(data: bytes) -> Optional[str]:
    """The format Pillow would take ``data`` for, among those it may not open, by its signature
    alone (the plugins' ``accept`` tests of the first bytes, which decode nothing)."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        try:
            if name not in READ_FORMATS and accept is not None and accept(data[:16]):
                return name
        except Exception:  # noqa: BLE001 - a signature test that fails names nothing
            continue
    return None


def _encode(rgb: np.ndarray, settings: PrepSettings) -> bytes:
    # 4:2:0 baseline: what libjpeg, Pillow and cameras write by default, and the
    # cheapest layout for nvJPEG.
    return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), settings.quality, "RGB", "420")


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _is_hardware_friendly(info: JpegInfo) -> bool:
    if info.sof != _SOF_BASELINE or info.precision != 8 or len(info.components) != 3:
        return False
    ids = bytes(c[0] for c in info.components)
    if info.adobe_transform == 0 or (info.adobe_transform is None and ids == b"RGB"):
        return False  # RGB-coded JPEG, no colour transform: decoders disagree on these
    luma, *chroma = info.components
    return (luma[1], luma[2]) in _HW_LUMA_SAMPLING and all((c[1], c[2]) == (1, 1) for c in chroma)


def _prepare_jpeg(data: bytes, info: JpegInfo, settings: PrepSettings) -> Prepared:
    if info.precision != 8:
        raise Rejected(f"unsupported JPEG: {info.precision}-bit samples")
    _check_pixels(info.width, info.height, settings)
    transposed = info.orientation in (5, 6, 7, 8)
    width, height = (info.height, info.width) if transposed else (info.width, info.height)
    size = target_size(width, height, settings)
    _check_stored(size)
    if (
        settings.reencode == "auto"
        and size == (width, height)
        and info.orientation == 1
        and _is_hardware_friendly(info)
    ):
        try:
            # A 1/8-scale decode still entropy-decodes every block, which is where
            # truncation and corrupt data show, at a fraction of a full decode's cost.
            simplejpeg.decode_jpeg(data, "GRAY", min_factor=8, strict=True)
        except ValueError as exc:
            raise Rejected(f"corrupt JPEG data: {exc}") from None
        return Prepared(data, width, height, width, height, copied=True)
    # Let libjpeg shrink in the DCT domain (by up to 8x) towards the target first.
    stored_target = (size[1], size[0]) if transposed else size
    try:
        rgb = simplejpeg.decode_jpeg(
            data,
            "RGB",
            strict=True,
            min_width=stored_target[0] if size != (width, height) else 0,
            min_height=stored_target[1] if size != (width, height) else 0,
        )
    except ValueError as exc:
        raise Rejected(f"corrupt JPEG data: {exc}") from None
    if info.orientation != 1 or rgb.shape[1::-1] != stored_target:
        image = Image.fromarray(rgb)
        if info.orientation != 1:
            image = image.transpose(_ORIENTATION[info.orientation])
        rgb = np.asarray(_resize(image, size))
    return Prepared(_encode(rgb, settings), size[0], size[1], width, height, copied=False)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit sources span 0..65535; 32-bit integer and float ones are taken as
        # already in 0..255 unless their values say otherwise.
        if mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if (
        mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (mode == "P" and "transparency" in image.info)
        or (mode in ("L", "RGB") and "transparency" in image.info)
    ):
        # Transparent pixels often hide arbitrary colours; show them on white, as a
        # viewer would.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _prepare_other(data: bytes, settings: PrepSettings) -> Prepared:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=READ_FORMATS)
        except UnidentifiedImageError:
            found = _unread_format(data)
            if found:
                raise Rejected(
                    f"format not read: {found} (read: {', '.join(READ_FORMATS)})"
                ) from None
            raise Rejected("not an image") from None
        except Image.DecompressionBombError as exc:
            raise Rejected(f"decompression bomb: {exc}") from None
        except Exception as exc:
            raise Rejected(f"corrupt image header: {exc}") from None
        _check_pixels(*image.size, settings)
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
        except Image.DecompressionBombError as exc:
            raise Rejected(f"decompression bomb: {exc}") from None
        except Exception as exc:
            raise Rejected(f"truncated or corrupt {image.format or 'image'}: {exc}") from None
    source_size = rgb.size
    size = target_size(*source_size, settings)
    _check_stored(size)
    return Prepared(
        _encode(np.asarray(_resize(rgb, size)), settings),
        size[0],
        size[1],
        *source_size,
        copied=False,
    )


def prepare(data: bytes, settings: PrepSettings) -> Prepared:
    """Normalise one input's bytes into a stored JPEG.

    Raises:
        Rejected: with a short reason (empty, not an image, truncated, corrupt,
            decompression bomb, unsupported JPEG).
    """
    if not data:
        raise Rejected("empty file")
    if data[:3] == b"\xff\xd8\xff":
        info = parse_jpeg_header(data)
        if len(info.components) in (1, 3):
            return _prepare_jpeg(data, info, settings)
        _check_pixels(info.width, info.height, settings)  # CMYK and others: through Pillow
    return _prepare_other(data, settings)


def sample_metadata(source: str, prepared: Prepared, src: Optional[int] = None) -> bytes:
    """The ``KEY.json`` member: where the sample came from (its name within its source, and
    the source's position among the build's ``src``) and its sizes.

    Byte for byte what ``json.dumps(..., sort_keys=True, separators=(",", ":"))``
    writes, at a third of its cost (it runs once per image).
    """
    position = "" if src is None else f',"src":{src:d}'
    return (
        f'{{"size":[{prepared.width},{prepared.height}],"source":{json.dumps(source)},'
        f'"source_size":[{prepared.source_width},{prepared.source_height}]{position}}}'
    ).encode()
