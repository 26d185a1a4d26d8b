"""What the tests share: data made on the spot (images of every kind the shard builder must handle),
the seeding that makes each test independent of the ones before it, a full disk on demand."""

from __future__ import annotations

import contextlib
import io
import random
import resource
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from moco_dali.pipeline.config import LoaderConfig, ReadConfig

# The S3 endpoint (moto's server behind a fault-injecting proxy): the fixtures moto_server, s3.
pytest_plugins = ["tests.store_server"]

try:
    import torch

    HAS_GPU = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a dependency
    HAS_GPU = False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Every test starts from generators seeded by its own name, before its fixtures are made.

    So no test draws what the tests before it left: the suite gives the same results in any
    order (``-p randomly`` shuffles it, and reseeds ``random`` and numpy by its
    ``--randomly-seed`` on top; torch's generator it leaves to this).
    """
    seed = zlib.crc32(item.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(
    params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
)
def device(request):
    """The device a test runs on: the CPU always, and the same assertions on a CUDA GPU where one is present.

    On the GPU, cuDNN's TF32 convolutions are off for the test, so that a float32
    comparison compares float32 arithmetic.
    """
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    with torch.backends.cudnn.flags(
        enabled=True, benchmark=False, deterministic=False, allow_tf32=False
    ):
        matmul_tf32, torch.backends.cuda.matmul.allow_tf32 = (
            torch.backends.cuda.matmul.allow_tf32,
            False,
        )
        try:
            yield torch.device("cuda", 0)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (a rendezvous, a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forked_ranks(fn, args: tuple, nprocs: int) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)``: ``fn(rank, *args)`` in a process of its
    own for each rank, a rank's exception raised here. The ranks are forked from one forkserver
    for the session, a fresh interpreter that has loaded torch and torchvision and started no
    thread, not spawned: a spawned rank spends 5-10 s importing them on two cores."""
    import torch.multiprocessing as mp

    mp.get_context("forkserver").set_forkserver_preload(["moco_dali.model.moco"])
    mp.start_processes(fn, args=args, nprocs=nprocs, start_method="forkserver")


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, textured RGB image (decodes like a photo, unlike noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
        channels.append(127 + 100 * np.sin(x * fx + y * fy + phase))
    image = np.stack(channels, axis=-1) + rng.normal(0, 6, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str, **kwargs) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def baseline_jpeg(width: int = 64, height: int = 48, seed: int = 0, quality: int = 90) -> bytes:
    return simplejpeg.encode_jpeg(photo_like(width, height, seed), quality, "RGB", "420")


def exif_jpeg(orientation: int, width: int = 64, height: int = 48) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo_like(width, height), "JPEG", quality=90, exif=exif.tobytes())


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def awkward_inputs() -> dict[str, bytes]:
    """Every accepted kind of input the builder must convert, by file name."""
    rgb = photo_like(40, 30, seed=3)
    rgba = np.dstack([rgb, np.full((30, 40), 128, np.uint8)])
    gray16 = np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50
    return {
        "baseline.jpg": baseline_jpeg(40, 30),
        "progressive.jpg": encode(rgb, "JPEG", quality=90, progressive=True),
        "cmyk.jpg": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90),
        "gray.jpg": encode(Image.fromarray(rgb).convert("L"), "JPEG", quality=90),
        "rotated.jpg": exif_jpeg(6, 40, 30),
        "palette.png": encode(Image.fromarray(rgb).convert("P"), "PNG"),
        "alpha.png": encode(Image.fromarray(rgba), "PNG"),
        "gray16.png": encode(Image.fromarray(gray16), "PNG"),
        "image.webp": encode(rgb, "WEBP"),
        "image.gif": encode(Image.fromarray(rgb).convert("P"), "GIF"),
        "image.bmp": encode(rgb, "BMP"),
        "image.tiff": encode(rgb, "TIFF"),
    }


def broken_inputs() -> dict[str, bytes]:
    """Every kind of input the builder must reject, by file name."""
    good = baseline_jpeg(64, 48)
    corrupt = bytearray(good)
    corrupt[len(good) // 2 : len(good) // 2 + 40] = b"\xff\x00" * 20  # garbage entropy data
    png = encode(photo_like(64, 48), "PNG")
    return {
        "empty.jpg": b"",
        "notes.jpg": b"this is not an image, just text\n" * 10,
        "truncated.jpg": good[: len(good) // 2],
        "corrupt.jpg": bytes(corrupt),
        "truncated.png": png[: len(png) // 2],
        "bomb.png": png_with_size(20000, 20000),
    }


def write_files(folder: Path, files: dict[str, bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


@pytest.fixture
def labelled_dump(tmp_path: Path) -> Path:
    """``dump/CLASS/*.jpg``: three classes of small baseline JPEGs of varied sizes."""
    root = tmp_path / "dump"
    for c, name in enumerate(["cat", "dog", "emu"]):
        write_files(
            root / name,
            {
                f"{i:03d}.jpg": baseline_jpeg(32 + 8 * i, 24 + 4 * c, seed=10 * c + i)
                for i in range(7)
            },
        )
    return root


_READ = {name for name in ReadConfig.__dataclass_fields__}


def loader_config(**settings) -> LoaderConfig:
    """A ``LoaderConfig`` from one flat set of keywords, the reading ones going to its ``read``."""
    read = {key: settings.pop(key) for key in list(settings) if key in _READ}
    return LoaderConfig(**settings, read=ReadConfig(**read))


@contextlib.contextmanager
def small_disk(max_bytes: int):
    """Files over ``max_bytes`` cannot be written by this process, as on a full disk (Python
    ignores SIGXFSZ: the write fails with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
