"""One writer per output folder: an exclusive ``flock`` held for the writer's whole life.

A build, a training run, a linear probe, an export and the demo each hold one on a lock file in
the folder (or beside the file) they write, so a second one started into the same place is
refused at once instead of mixing its files with the first's. The lock file names its holder
(process id and host) for the refusal; the kernel lets the lock go when the holder dies, however
it dies, so a killed run never leaves a folder locked.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Optional

__all__ = ["FolderInUse", "FolderLock"]


class FolderInUse(ValueError):
    """Another process holds the lock; the message names the folder, the holder and what to do."""


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``path`` (a lock file) while the ``with`` lasts.

    Args:
        path: the lock file; its folder is the one locked (made, with its parents, when
            ``create``, and removed again at the end when it was made here and is left empty).
        holder: what holds it, for the refusal (``"moco-train run"``).
        option: the option that chose the folder, for the refusal's advice (``"run.out"``).
    """

    def __init__(self, path: str | os.PathLike, holder: str, option: str, create: bool = False):
        self.path, self.holder, self.option, self.create = Path(path), holder, option, create
        self.fd: Optional[int] = None
        self._made = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def acquire(self) -> "FolderLock":
        """Take the lock now (held until ``release()``), or raise ``FolderInUse``."""
        folder = self.path.parent
        if self.create and not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            self._made = True
        try:
            self._lock()
        except BaseException:
            self._remove_folder()
            raise
        return self

    def _lock(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held_by = _read_holder(fd)
                os.close(fd)
                raise FolderInUse(
                    f"{self.path.parent}: in use by another {self.holder} ({held_by} holds "
                    f"{self.path.name}); wait for it to end or use another {self.option}"
                ) from None
            try:  # the holder before us may have removed the file between our open and our lock
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                    _write_holder(fd)
                    return
            except FileNotFoundError:
                pass
            os.close(fd)

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Let the lock go (once): the file is removed while still ours, then closed."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        self._remove_folder()

    def _remove_folder(self) -> None:
        if self._made:
            self._made = False
            try:
                self.path.parent.rmdir()  # only when nothing was written into it
            except OSError:
                pass


def _write_holder(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same, only its note is missing


def _read_holder(fd: int) -> str:
    """``"process 123 on HOST"`` as the holder wrote it, or ``"it"`` when it wrote nothing yet."""
    try:
        pid, _, host = os.pread(fd, 256, 0).decode("utf-8", "replace").strip().partition(" ")
    except OSError:
        return "it"
    if not pid.isdigit():
        return "it"
    return f"process {pid}{f' on {host}' if host else ''}"
