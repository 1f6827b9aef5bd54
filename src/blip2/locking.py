"""An advisory, non-blocking lock on a folder, for the one process allowed to write it.

``flock`` on a ``lock`` file inside the folder: the kernel drops it when its holder exits, however it
exits, so a crash never leaves the folder locked. A second holder fails at once instead of waiting.
Within one thread the lock is re-entrant (a command may take it early, then call a function that takes
it again); another thread or process is refused.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks to take
    fcntl = None


class FolderBusyError(InputError):
    """Another process (or thread) holds the folder's write lock."""


_held: dict[str, list[int]] = {}  # resolved folder -> [holding thread id, depth]
_held_guard = threading.Lock()


@contextmanager
def folder_lock(folder: str | os.PathLike, *, what: str = "folder", holder: str = "another process",
                name: str = "lock") -> Iterator[None]:  # fmt: skip
    """Hold the write lock of ``folder`` (created if missing) for the ``with`` block.

    Raises :class:`FolderBusyError`, naming the folder (a ``what``) and ``holder`` (who else takes this
    lock, e.g. "another `blip2 index`"), when someone else holds it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key, me = str(folder.resolve()), threading.get_ident()
    with _held_guard:
        mine = _held.get(key)
        reentered = mine is not None and mine[0] == me
        if reentered:
            mine[1] += 1
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                mine[1] -= 1
        return
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
                by = f"{holder} (pid {pid})" if pid.isdigit() else holder
                raise FolderBusyError(
                    f"{folder}: {what} locked: {by} is writing it; wait for it to finish ({path})"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # who holds it, for the message above
        with _held_guard:
            _held[key] = [me, 1]
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(key, None)
    finally:
        os.close(fd)  # releases the lock
