"""Per-image normalisation: what is stored, what is converted, what is rejected."""

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from moco_dali.tools.shards.imageprep import (
    PrepSettings,
    Rejected,
    parse_jpeg_header,
    prepare,
    target_size,
)
from tests.conftest import (
    awkward_inputs,
    baseline_jpeg,
    broken_inputs,
    encode,
    exif_jpeg,
    photo_like,
)

DEFAULT = PrepSettings()


def assert_stored_jpeg(data: bytes, width: int, height: int) -> None:
    """The shard contract: baseline, 8-bit, 3 components, the stated size, decodable."""
    info = parse_jpeg_header(data)
    assert (info.sof, info.precision, len(info.components)) == (0xC0, 8, 3)
    assert (info.width, info.height) == (width, height)
    assert simplejpeg.decode_jpeg(data, "RGB", strict=True).shape == (height, width, 3)


def test_clean_baseline_jpeg_is_stored_byte_for_byte():
    data = baseline_jpeg(64, 48)
    out = prepare(data, DEFAULT)
    assert out.copied and out.jpeg == data
    assert (out.width, out.height) == (64, 48)


def test_reencode_always_rewrites_even_clean_jpegs():
    data = baseline_jpeg(64, 48)
    out = prepare(data, PrepSettings(reencode="always", quality=70))
    assert not out.copied and out.jpeg != data
    assert_stored_jpeg(out.jpeg, 64, 48)


@pytest.mark.parametrize("name", sorted(awkward_inputs()))
def test_every_accepted_kind_becomes_a_baseline_rgb_jpeg(name):
    data = awkward_inputs()[name]
    out = prepare(data, DEFAULT)
    expected = (30, 40) if name == "rotated.jpg" else (40, 30)
    assert (out.width, out.height) == expected
    assert_stored_jpeg(out.jpeg, *expected)
    assert out.copied == (name == "baseline.jpg")


def test_exif_orientation_is_applied():
    # Left half red, right half blue; orientation 6 means "rotate 90 degrees clockwise
    # to view", so red ends up on top.
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :40, 0] = 255
    image[:, 40:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    out = prepare(encode(image, "JPEG", quality=95, exif=exif.tobytes()), DEFAULT)
    pixels = simplejpeg.decode_jpeg(out.jpeg, "RGB")
    assert pixels.shape == (80, 40, 3)
    assert pixels[10, 20, 0] > 200 and pixels[10, 20, 2] < 50  # top: red
    assert pixels[70, 20, 2] > 200 and pixels[70, 20, 0] < 50  # bottom: blue


def test_transparent_pixels_become_white():
    rgba = np.zeros((16, 16, 4), np.uint8)  # fully transparent black
    out = prepare(encode(Image.fromarray(rgba), "PNG"), DEFAULT)
    assert simplejpeg.decode_jpeg(out.jpeg, "RGB").min() > 245


def test_16_bit_values_are_scaled_not_clipped():
    gray16 = np.full((16, 16), 32896, np.uint16)  # 50% of 65535
    out = prepare(encode(Image.fromarray(gray16), "PNG"), DEFAULT)
    assert abs(int(simplejpeg.decode_jpeg(out.jpeg, "RGB").mean()) - 128) <= 2


def test_cmyk_colours_survive():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 220  # red
    out = prepare(encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), DEFAULT)
    r, g, b = simplejpeg.decode_jpeg(out.jpeg, "RGB").reshape(-1, 3).mean(axis=0)
    assert r > 180 and g < 60 and b < 60


@pytest.mark.parametrize(
    "name, reason",
    [
        ("empty.jpg", "empty file"),
        ("notes.jpg", "not an image"),
        ("truncated.jpg", "corrupt JPEG data"),
        ("corrupt.jpg", "corrupt JPEG data"),
        ("truncated.png", "truncated or corrupt PNG"),
        ("bomb.png", "decompression bomb"),
    ],
)
def test_broken_inputs_are_rejected_with_a_reason(name, reason):
    with pytest.raises(Rejected, match=reason):
        prepare(broken_inputs()[name], DEFAULT)


def test_pixel_limit_is_settable():
    with pytest.raises(Rejected, match="decompression bomb: 64x48"):
        prepare(baseline_jpeg(64, 48), PrepSettings(max_pixels=64 * 48 - 1))
    assert prepare(baseline_jpeg(64, 48), PrepSettings(max_pixels=64 * 48)).copied


@pytest.mark.parametrize(
    "size, settings, expected",
    [
        ((500, 375), PrepSettings(max_side=250), (250, 188)),
        ((375, 500), PrepSettings(max_side=250), (188, 250)),
        ((500, 375), PrepSettings(short_side=256), (341, 256)),
        ((500, 375), PrepSettings(short_side=1000), (500, 375)),  # never enlarged
        ((500, 375), PrepSettings(max_side=2000), (500, 375)),
        ((1000, 200), PrepSettings(short_side=100, max_side=400), (400, 80)),
    ],
)
def test_target_size(size, settings, expected):
    assert target_size(*size, settings) == expected


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_shrinking_resizes_and_reencodes(fmt):
    data = (
        encode(photo_like(400, 300), fmt, quality=90)
        if fmt == "JPEG"
        else encode(photo_like(400, 300), fmt)
    )
    out = prepare(data, PrepSettings(short_side=100))
    assert not out.copied
    assert (out.width, out.height, out.source_width, out.source_height) == (133, 100, 400, 300)
    assert_stored_jpeg(out.jpeg, 133, 100)
    # Shrunk, not cropped: the colour layout matches the source's.
    small = np.asarray(
        Image.fromarray(photo_like(400, 300)).resize((133, 100), Image.Resampling.BICUBIC), float
    )
    stored = simplejpeg.decode_jpeg(out.jpeg, "RGB").astype(float)
    assert np.abs(small - stored).mean() < 12


def test_settings_reject_nonsense():
    with pytest.raises(ValueError, match="--quality"):
        PrepSettings(quality=0)
    with pytest.raises(ValueError, match="--max-side"):
        PrepSettings(max_side=0)
    with pytest.raises(ValueError, match="--reencode"):
        PrepSettings(reencode="sometimes")


def test_header_parser_reads_orientation_and_sampling():
    info = parse_jpeg_header(exif_jpeg(8, 32, 16))
    assert info.orientation == 8 and (info.width, info.height) == (32, 16)
    progressive = parse_jpeg_header(encode(photo_like(32, 16), "JPEG", progressive=True))
    assert progressive.sof == 0xC2
    assert parse_jpeg_header(baseline_jpeg()).components[0][1:] == (2, 2)  # 4:2:0 luma
    with pytest.raises(Rejected):
        parse_jpeg_header(b"\xff\xd8\xff\xe0\x00")
    with pytest.raises(Rejected):
        parse_jpeg_header(b"\xff\xd8\xff")


def test_sample_metadata_is_the_sorted_compact_json_of_its_fields():
    import json

    from moco_dali.tools.shards.imageprep import Prepared, sample_metadata

    prepared = Prepared(b"", 640, 480, 1280, 960, False)
    for source in [
        "dump/cat/1.jpg",
        'odd "quoted" \\ name.jpg',
        "caf\\xe9.jpg",
        "ü/ß.jpg",
        "tab\there.jpg",
    ]:
        expected = json.dumps(
            {"source": source, "size": [640, 480], "source_size": [1280, 960]},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        assert sample_metadata(source, prepared) == expected


# A tiny PostScript program: Ghostscript would run it (print a marker; a loop would hang).
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n(GHOSTSCRIPT RAN) print flush\nshowpage\n"


def _never(*args, **kwargs):
    raise AssertionError(f"an external program was reached: {args[:1]}")


@pytest.mark.parametrize(
    "fmt, data",
    [
        ("EPS", EPS),  # Pillow's plugin hands the file to Ghostscript
        ("EPS", b"\xc5\xd0\xd3\xc6" + b"\0" * 28),  # the DOS EPS binary header, same plugin
        ("WMF", b"\xd7\xcd\xc6\x9a\x00\x00" + b"\0" * 40),  # decoded by a registered handler
    ],
)
def test_formats_whose_decoders_run_programs_are_refused_by_name_unopened(fmt, data, monkeypatch):
    """The old variant: Pillow opened whatever it recognised; an EPS went to Ghostscript."""
    import subprocess

    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", _never)
    monkeypatch.setattr(subprocess, "check_call", _never)
    monkeypatch.setattr(subprocess, "Popen", _never)
    with pytest.raises(Rejected, match=f"^format not read: {fmt} \\(read: JPEG, PNG, WEBP"):
        prepare(data, DEFAULT)


def test_the_formats_read_run_no_program(monkeypatch):
    import subprocess

    from moco_dali.tools.shards.imageprep import READ_FORMATS

    monkeypatch.setattr(subprocess, "check_call", _never)
    monkeypatch.setattr(subprocess, "Popen", _never)
    assert {"EPS", "PDF", "WMF", "FITS", "GRIB", "BUFR", "HDF5"}.isdisjoint(READ_FORMATS)
    for name, data in awkward_inputs().items():  # every accepted kind still converts
        assert prepare(data, DEFAULT).width > 0, name


def test_nothing_is_stored_larger_than_the_readers_decode(monkeypatch):
    """A ``--max-pixels`` above the readers' limit, unshrunk, would store what training refuses."""
    from moco_dali.pipeline import shards

    monkeypatch.setattr(shards, "MAX_PIXELS", 64 * 48 - 1)
    for data in (baseline_jpeg(64, 48), encode(photo_like(64, 48), "PNG")):
        with pytest.raises(Rejected, match="too large to store: 64x48 = 3072 pixels over"):
            prepare(data, PrepSettings(max_pixels=10**9))
        assert prepare(data, PrepSettings(max_pixels=10**9, max_side=32)).width == 32
