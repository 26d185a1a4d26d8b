"""Files written whole or not at all; the one writability check; files read with bounded cost."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from typing import Annotated

import msgspec
import pytest

from moco_dali.common.files import read_json, unwritable, write_atomic, write_json_atomic
from moco_dali.common.options import MAX_CONFIG_BYTES, OptionError, load_file


def test_json_is_written_atomically_with_sorted_keys(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "m.json").read_text().startswith('{\n "a"')
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_write_atomic_makes_the_folder_and_leaves_no_temporary_file_when_it_fails(tmp_path):
    write_atomic(tmp_path / "new" / "file", lambda f: f.write(b"x"))
    assert (tmp_path / "new" / "file").read_bytes() == b"x"
    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError):
        write_atomic(tmp_path / "folder", lambda f: f.write(b"x" * 1000))
    with pytest.raises(ZeroDivisionError):
        write_atomic(tmp_path / "file", lambda f: f.write(b"x") / 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "new"]


def test_unwritable_names_the_option_and_why(tmp_path):
    (tmp_path / "a-file").write_text("")
    assert unwritable("--out", tmp_path / "a-file", folder=True).endswith("a file, not a folder")
    assert unwritable("--json", tmp_path, folder=False).endswith("a folder, not a file")
    assert unwritable("--out", tmp_path / "a-file" / "x", folder=True).startswith("--out ")
    assert unwritable("--out", tmp_path / "new" / "deep", folder=True) is None
    assert not (tmp_path / "new").exists()  # nothing made by the check
    assert unwritable("--json", tmp_path / "x.json", folder=False) is None


def test_a_100000_deep_json_array_is_refused_in_one_line_naming_the_file_and_limit(tmp_path):
    """The old variant: json.loads ended in RecursionError (moco-bench --compare)."""
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=f"^{path}: record nested deeper than 32 levels$"):
        read_json(path, "record", max_bytes=1 << 20)
    path.write_text(json.dumps({"a": [[[[1]]]]}))
    assert read_json(path, "record", max_bytes=1 << 20) == {"a": [[[[1]]]]}
    with pytest.raises(ValueError, match="nested deeper than 3 levels"):
        read_json(path, "record", max_bytes=1 << 20, max_depth=3)


def test_read_json_caps_the_bytes_read_and_reads_regular_files_only(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(["x" * 1000]))
    with pytest.raises(ValueError, match=f"^{path}: record of 1004 bytes, over the limit of 1000"):
        read_json(path, "record", max_bytes=1000)
    os.mkfifo(tmp_path / "fifo.json")  # would block a reader that opened it
    with pytest.raises(ValueError, match="fifo.json: not a regular file"):
        read_json(tmp_path / "fifo.json", "record", max_bytes=1000)
    (tmp_path / "bad.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match="bad.json: unreadable record: Invalid UTF-8"):
        read_json(tmp_path / "bad.json", "record", max_bytes=1000)


class Entry(msgspec.Struct):
    count: Annotated[int, msgspec.Meta(ge=0, le=10)]


class Listing(msgspec.Struct):
    entries: list[Entry]


def test_a_schema_refusal_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"entries": [{"count": 1}, {"count": 10**30}]}))
    with pytest.raises(
        ValueError,
        match=re.escape(f"{path}: malformed list: entries[1].count: expected `int` <= 10"),
    ):
        read_json(path, "list", max_bytes=1000, schema=Listing)


# Nine levels of nine aliases under one key: a few hundred bytes whose value, shown in the old
# refusal ("expected int, got [...]"), spelled out 9**9 strings (4 GB).
LAUGHS = "run:\n  seed:\n    - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"    - &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
)


def _limited():
    # moco-train's configuration path takes about 150 MB of address space; the old refusal's
    # spelled-out value (2.3 GB and more) fails here rather than filling the host.
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def test_a_billion_laughs_config_ends_at_once_in_one_line_naming_the_file(tmp_path):
    """The old variant: moco-train --config expanded it until the process was killed (4 GB)."""
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "moco_dali.train", "--config", str(path), "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limited,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    )
    assert time.monotonic() - started < 30
    assert result.returncode == 2, result.stderr[-500:]
    assert result.stderr.strip() == (
        f"moco-train: error: --config {path}: line 3: YAML anchors and aliases (&name, *name) "
        "are not read"
    )


def test_a_configuration_file_is_read_with_its_size_and_depth_capped(tmp_path):
    deep = tmp_path / "deep.toml"
    deep.write_text("[data]\nx = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(OptionError, match=f"^--config {deep}: nested deeper than 32 levels$"):
        load_file(deep)
    flow = tmp_path / "deep.yaml"
    flow.write_text("data:\n  x: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(OptionError, match="line 2: nested deeper than 32 levels"):
        load_file(flow)
    big = tmp_path / "big.yaml"
    big.write_text("data:\n  note: " + "x" * MAX_CONFIG_BYTES + "\n")
    size = big.stat().st_size
    with pytest.raises(
        OptionError, match=f"configuration of {size} bytes, over the limit of {MAX_CONFIG_BYTES}"
    ):
        load_file(big)
    (tmp_path / "ok.yml").write_text("data:\n  batch_size: 8\n")
    assert load_file(tmp_path / "ok.yml") == {"data": {"batch_size": 8}}
