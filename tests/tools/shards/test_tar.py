"""The builder's tar encoding: what tarfile and webdataset read, byte for byte tarfile's headers."""

from __future__ import annotations

import tarfile

import pytest
import webdataset

from moco_dali.pipeline import shards
from moco_dali.tools.shards.tar import encode_sample, ustar_header


def write_shard(path, samples):
    blob = bytearray()
    lines = []
    for key, files in samples:
        encoded, members = encode_sample(key, files)
        lines.append(shards.index_line((e, len(blob) + o, s, n) for e, o, s, n in members))
        blob += encoded
    blob += shards.TAR_END
    path.write_bytes(bytes(blob))
    path.with_suffix(".idx").write_text(shards.index_header(len(lines)) + "".join(lines))


def test_encoded_samples_are_a_tar_that_tarfile_and_webdataset_read(tmp_path):
    samples = [
        ("0000000001", [("jpg", b"x" * 700), ("cls", b"3")]),
        ("0000000002", [("jpg", b"y" * 512)]),
    ]
    write_shard(tmp_path / "a.tar", samples)
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["0000000001.jpg", "0000000001.cls", "0000000002.jpg"]
        assert tar.extractfile(members[1]).read() == b"3"
        assert all(m.mtime == 0 and m.mode == 0o444 for m in members)
    index = shards.read_index(tmp_path / "a.idx")
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert [(m.name, m.offset_data, m.size) for m in tar] == [
            (n, o, s) for sample in index for _, o, s, n in sample
        ]
    assert shards.tar_size_for_index(index) == (tmp_path / "a.tar").stat().st_size
    read = list(webdataset.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert [(r["__key__"], r["jpg"][:1]) for r in read] == [
        ("0000000001", b"x"),
        ("0000000002", b"y"),
    ]


def test_keys_with_dots_or_slashes_are_refused():
    with pytest.raises(ValueError, match="must not contain"):
        encode_sample("a.b", [("jpg", b"")])
    with pytest.raises(ValueError, match="must not contain"):
        encode_sample("a/b", [("jpg", b"")])


@pytest.mark.parametrize(
    "name, size",
    [
        ("0000000001.jpg", 0),
        ("0000000001.jpg", 12345),
        ("k.json", 8**11 - 1),
        ("x" * 95 + ".json", 511),
    ],
)
def test_ustar_header_is_what_tarfile_writes(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    assert ustar_header(name, size) == info.tobuf(
        format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict"
    )


def test_ustar_header_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        ustar_header("x" * 101, 1)
    with pytest.raises(ValueError, match="does not fit"):
        ustar_header("a.jpg", 8**11)
