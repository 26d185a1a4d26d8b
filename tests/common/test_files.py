"""Files written whole or not at all; the one writability check."""

from __future__ import annotations

import pytest

from moco_dali.common.files import unwritable, write_atomic, write_json_atomic


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
