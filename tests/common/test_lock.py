"""One writer per folder: the lock every command holds on what it writes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from moco_dali.common.lock import FolderInUse, FolderLock


def test_a_second_holder_is_refused_naming_the_folder_and_the_first(tmp_path):
    path = tmp_path / "out" / ".job.lock"
    with FolderLock(path, "job", "--out", create=True):
        assert path.read_text().split()[0] == str(os.getpid())
        with pytest.raises(FolderInUse) as refused:
            FolderLock(path, "job", "--out").acquire()
        assert str(refused.value) == (
            f"{tmp_path / 'out'}: in use by another job (process {os.getpid()} on "
            f"{socket.gethostname()} holds .job.lock); wait for it to end or use another --out"
        )
    assert not path.exists()
    assert not (tmp_path / "out").exists()  # made for the lock alone, so removed with it
    with FolderLock(path, "job", "--out", create=True):
        (tmp_path / "out" / "result").write_text("kept")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["result"]


def test_a_holder_that_dies_leaves_the_folder_free(tmp_path):
    path = tmp_path / ".job.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from moco_dali.common.lock import FolderLock; "
            f"FolderLock({str(path)!r}, 'job', '--out').acquire(); print(flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        holder.stdout.readline()  # it holds the lock now
        with pytest.raises(FolderInUse, match=f"process {holder.pid} "):
            FolderLock(path, "job", "--out").acquire()
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(path, "job", "--out"):  # a kill left the file, not the lock
        pass
