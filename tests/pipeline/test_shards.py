"""The shard folder contract as a reader holds it: index lines, names, the manifest's schema."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from moco_dali.pipeline import shards
from moco_dali.pipeline.shards import ShardError
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from tests.conftest import baseline_jpeg, write_files


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty index"),
        ("v1.1 1\njpg 512 3 a.jpg\n", "expected 'v1.2 N'"),
        ("v1.2 2\njpg 512 3 a.jpg\n", "header says 2 samples, index lists 1"),
        ("v1.2 1\njpg 512 a.jpg\n", "line 2: expected groups"),
        ("v1.2 1\njpg x 3 a.jpg\n", "line 2: offset and size must be integers"),
    ],
)
def test_malformed_indexes_are_named(tmp_path, text, message):
    (tmp_path / "bad.idx").write_text(text)
    with pytest.raises(ShardError, match=message):
        shards.read_index(tmp_path / "bad.idx")


def test_names():
    assert shards.shard_stem("imagenet", 7) == "imagenet-000007"
    assert shards.shard_stem("imagenet", 7, part=3) == "imagenet-part0003-000007"
    assert shards.part_manifest_name(3, 8) == "manifest.part-0003-of-0008.json"
    assert shards.PART_MANIFEST_RE.match(shards.part_manifest_name(3, 8))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A labelled shard folder of 3 shards, built once; tests damage copies of it."""
    root = tmp_path_factory.mktemp("built")
    for c, name in enumerate(["cat", "dog"]):
        write_files(
            root / "dump" / name,
            {f"{i}.jpg": baseline_jpeg(32, 24, seed=10 * c + i) for i in range(4)},
        )
    build(
        [str(root / "dump")],
        root / "out",
        BuildSettings(labels="folder", max_count=3),
        workers=0,
        progress=False,
    )
    return root / "out"


@pytest.fixture
def folder(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "shards"))


def _edit_manifest(folder: Path, edit) -> Path:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))
    return path


def _with(data: dict, **fields) -> dict:
    return {**data, **fields}


def _shard0(data: dict, **fields) -> dict:
    return {**data, "shards": [{**data["shards"][0], **fields}, *data["shards"][1:]]}


# Hand-damaged manifests (the old variants: AttributeError, KeyError, OverflowError, ValueError
# without the file, TypeError) and the field each one line names.
DAMAGED = [
    ("a JSON list", lambda d: [d], "not a moco-dali-shards manifest"),
    (
        "a shard entry without index_sha256",
        lambda d: {
            **d,
            "shards": [{k: v for k, v in d["shards"][0].items() if k != "index_sha256"}],
        },
        "malformed manifest: shards[0]: object missing required field `index_sha256`",
    ),
    (
        "samples 10**30",
        lambda d: _with(d, samples=10**30),
        "samples: expected `int` <= 1099511627776",
    ),
    ("samples -5", lambda d: _with(d, samples=-5), "samples: expected `int` >= 0"),
    (
        "a shard of -5 samples",
        lambda d: _shard0(d, samples=-5),
        "shards[0].samples: expected `int` >= 0",
    ),
    (
        "a tar that is a number",
        lambda d: _shard0(d, tar=7),
        "shards[0].tar: expected `str`, got `int`",
    ),
    (
        "classes not a list",
        lambda d: _with(d, classes="cat,dog"),
        "classes: expected `array | null`, got `str`",
    ),
    ("a NUL in a tar", lambda d: _shard0(d, tar="a\0b.tar"), "shards[0]: a NUL character"),
    ("nested 100000 deep", None, "manifest nested deeper than 32 levels"),
]


@pytest.mark.parametrize("edit, message", [d[1:] for d in DAMAGED], ids=[d[0] for d in DAMAGED])
def test_a_hand_damaged_manifest_is_one_line_naming_the_file_and_field(folder, edit, message):
    path = folder / "manifest.json"
    if edit is None:
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        _edit_manifest(folder, edit)
    with pytest.raises(ShardError) as refused:
        shards.load_manifest(folder)
    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_every_command_reading_a_manifest_that_is_a_json_list_exits_2_in_one_line(
    folder, tmp_path, capsys
):
    """The old variant: AttributeError tracebacks (moco-bench --shards among them)."""
    from moco_dali.tools.bench.cli import main as moco_bench
    from moco_dali.tools.shards.cli import main as moco_shards
    from moco_dali.train.cli import main as moco_train
    from tests.train.runs import TINY

    path = _edit_manifest(folder, lambda d: [d])
    said = f"{path}: not a moco-dali-shards manifest"
    for main, argv in (
        (moco_shards, ["verify", str(folder), "--no-progress"]),
        (moco_shards, ["inspect", str(folder)]),
        (moco_shards, ["preview", str(folder), "--out", str(tmp_path / "p.png")]),
        (moco_bench, ["pipeline", "--shards", str(folder), "--device", "cpu"]),
        (moco_train, [*TINY, "--data.train", str(folder), "--run.out", str(tmp_path / "run")]),
    ):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code in (1, 2) and said in err and "\n" not in err, (argv[0], err)
        assert code == (1 if argv[0] == "verify" else 2)  # verify: the check failed


def _index_with(folder: Path, transform) -> Path:
    idx = sorted(folder.glob("*.idx"))[0]
    idx.write_bytes(transform(idx.read_bytes()))
    return idx


# Damaged DALI index files (the old variants: UnicodeDecodeError, a header of Arabic-Indic digits
# taken as a count, an OSError from a seek before the tar's start, a member past the tar's end)
# and the one line each ends in; ``read_index`` (verify, inspect) says the same where it can.
DAMAGED_INDEXES = [
    ("a non-UTF-8 byte", b".jpg", b".\xffpg", "line 2: not UTF-8 text", True),
    ("a Unicode digit", b"v1.2 3", "v1.2 \u0663".encode(), "line 1: expected 'v1.2 N'", True),
    ("a first offset of 0", b" 512 ", b" 0 ", "line 2: offset 0 is inside the tar's first", True),
    ("an offset past the end", b" 512 ", b" 99999999999 ", "past the end of its shard", False),
]


@pytest.mark.parametrize(
    "old, new, message, in_read_index",
    [d[1:] for d in DAMAGED_INDEXES],
    ids=[d[0] for d in DAMAGED_INDEXES],
)
def test_a_damaged_index_is_one_shard_error_naming_it(folder, old, new, message, in_read_index):
    idx = sorted(folder.glob("*.idx"))[0]
    idx.write_bytes(idx.read_bytes().replace(old, new, 1))
    manifest = shards.load_manifest(folder)
    with pytest.raises(ShardError, match=re.escape(message)) as refused:
        shards.open_shard(manifest, manifest.entry(0))  # what moco-train and moco-eval open
    assert str(refused.value).startswith(f"{idx}: ")
    if in_read_index:
        with pytest.raises(ShardError, match=re.escape(message)) as refused:
            shards.read_index(idx)
        assert str(refused.value).startswith(f"{idx}: ")


def _pad_first_tar(folder: Path, extra: bytes) -> Path:
    """What other writers leave after the last member (tarfile pads to 10 KiB records)."""
    tar = sorted(folder.glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes() + extra)
    return tar


def test_a_padded_tar_is_stale_to_a_built_manifest_and_fine_to_an_indexed_one(folder):
    tar = _pad_first_tar(folder, bytes(8192))
    size = tar.stat().st_size
    _edit_manifest(folder, lambda d: _shard0(d, bytes=size))
    manifest = shards.load_manifest(folder)
    with pytest.raises(ShardError, match="stale index"):  # a built tar's size is its index's
        shards.open_shard(manifest, manifest.entry(0))
    _edit_manifest(folder, lambda d: _with(d, version=shards.INDEXED_VERSION, indexed=True))
    manifest = shards.load_manifest(folder)
    assert manifest.indexed
    assert shards.open_shard(manifest, manifest.entry(0))[0] == tar
    assert len(shards.discover(folder)[1]) == 3


def test_an_indexed_tar_changed_after_indexing_is_refused_in_one_line(folder):
    _edit_manifest(folder, lambda d: _with(d, version=shards.INDEXED_VERSION, indexed=True))
    tar = _pad_first_tar(folder, b"x")
    manifest = shards.load_manifest(folder)
    with pytest.raises(ShardError) as refused:
        shards.open_shard(manifest, manifest.entry(0))
    assert str(refused.value) == (
        f"{tar}: {tar.stat().st_size} bytes, the manifest says {tar.stat().st_size - 1}; "
        "the shard changed after the indexing"
    )
    # The same size with other bytes where the last member's header was: its header is checked.
    tar.write_bytes(tar.read_bytes()[:-1])
    last = shards.read_index(folder / manifest.entry(0).index)[-1][-1]
    data = bytearray(tar.read_bytes())
    data[last[1] - 512 : last[1] - 500] = b"renamed.jpg\0"
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="stale index or changed shard"):
        shards.open_shard(manifest, manifest.entry(0))


def test_an_indexed_tar_may_lie_outside_the_manifest_folder(folder, tmp_path):
    """``moco-shards index`` names a tar relative to the manifest, ``../`` and all."""
    elsewhere = tmp_path / "data"
    elsewhere.mkdir()
    tar = sorted(folder.glob("*.tar"))[0]
    moved = tar.rename(elsewhere / tar.name)
    _edit_manifest(
        folder,
        lambda d: _shard0(
            _with(d, version=shards.INDEXED_VERSION, indexed=True), tar=f"../data/{tar.name}"
        ),
    )
    manifest = shards.load_manifest(folder)
    assert shards.open_shard(manifest, manifest.entry(0))[0].resolve() == moved.resolve()
