"""Atomic file writes: a temp file in the target's folder, fsync'ed, then ``os.replace``d over it.

A reader of ``path`` sees the old file or the complete new one, never a partial one: a failure
(or a crash) before the rename leaves the old file as it was, and a failure removes the temp
file. The temp file sits in the target's folder (a rename is atomic only within one file
system) and is named after its writer, ``.<name>.<host>.<pid>.<token>.tmp`` (token: 16 random
hex digits, so two writers in one process, or a reused pid, never share a name): whoever finds a
leftover can tell a dead writer's temp from a live one's (collect.store removes them on that rule).
New files get the mode a plain ``open(path, "w")`` gives (0666 less the umask).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterable

__all__ = ["atomic_write_bytes", "atomic_write_files", "atomic_write_text", "fsync_folder", "host_tag",
           "process_alive", "stage_file", "temp_path", "write_atomically"]


def host_tag() -> str:
    """This host's name with anything but letters, digits and '-' replaced (a file-name part)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def process_alive(pid: int) -> bool:
    """False only when no process ``pid`` runs on this host; True when it does or when that
    cannot be told (another user's process, a non-POSIX system): callers keep its files."""
    if pid == os.getpid():
        return True
    if os.name != "posix" or pid <= 0:  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's; anything else: do not guess
        return True
    return True


def temp_path(path: os.PathLike) -> Path:
    """A fresh temp-file name beside ``path``: ``.<name>.<host>.<pid>.<token>.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{host_tag()}.{os.getpid()}.{secrets.token_hex(8)}.tmp")


def stage_file(path: os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write a temp file beside ``path`` with ``write(handle)``, flush and fsync it; return its
    path (the caller renames it into place). If anything fails the temp file is removed."""
    tmp = temp_path(path)
    # O_EXCL: never write into someone else's file; mode 0666 & ~umask, as a plain open() gives
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        handle = os.fdopen(fd, "wb")  # owns (and closes) fd from here, whatever fails next
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def fsync_folder(folder: os.PathLike) -> None:
    """Make renames in ``folder`` durable where the platform allows (a no-op elsewhere)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` by what ``write(handle)`` writes to a binary file handle, atomically:
    the old file stays whole until the complete new one is renamed over it."""
    path = Path(path)
    tmp = stage_file(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_folder(path.parent)


def atomic_write_files(files: Dict[os.PathLike, bytes], remove: Iterable[os.PathLike] = ()) -> None:
    """Write several files as one step: every temp file first, then the renames, back to back.

    Missing parent folders are created. ``remove`` lists files to delete once every temp file
    is written (stale outputs), just before the renames. If staging any file fails, no output
    is touched and every temp file is removed. (Each rename is atomic; only a crash between
    them can leave a mix.)
    """
    staged = []
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            staged.append((stage_file(path, lambda handle, data=data: handle.write(data)), path))
        for path in remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        folders = {path.parent for _, path in staged}
        while staged:
            tmp, path = staged[0]
            os.replace(tmp, path)
            staged.pop(0)
        for folder in folders:
            fsync_folder(folder)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()


def atomic_write_bytes(path: os.PathLike, data: bytes) -> None:
    """Write bytes to ``path`` via a temp file in the same folder and an atomic rename."""
    atomic_write_files({Path(path): data})


def atomic_write_text(path: os.PathLike, text: str) -> None:
    """Write text (UTF-8) to ``path`` via a temp file in the same folder and an atomic rename."""
    atomic_write_bytes(path, text.encode("utf-8"))
