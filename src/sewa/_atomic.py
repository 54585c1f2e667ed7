"""Atomic file writes: readers see the old file or the complete new one, never a torn one."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "fsync_file"]


def fsync_file(path: Path) -> None:
    """Flushes ``path``'s data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object], *, overwrite: bool = True, sync: bool = True) -> None:
    """Writes ``path`` so that readers see either the old file or the complete new one.

    ``write(tmp)`` fills a temporary file in the same directory, which is fsynced and then
    renamed over ``path`` (or hard-linked to it when ``overwrite`` is false, which fails if
    ``path`` exists); the directory is fsynced so the rename survives a power loss. With
    ``sync=False`` the fsyncs are skipped: still atomic if the process dies, not if power fails.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is false.
        ValueError: if ``path`` exists and is not a regular file (a directory, FIFO, device or
            socket, also through a symlink): ``overwrite`` replaces only regular files, so
            ``--force`` can never turn ``/dev/null`` into a file.
    """
    with contextlib.suppress(FileNotFoundError):
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a character device"
                    if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "not a regular file")
            raise ValueError(f"{path} is {kind}, not a regular file: sewa writes and replaces only regular files; "
                             "give the path of a file")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if sync:
            fsync_file(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and refuses an existing path
            except FileExistsError:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
            except OSError:  # filesystems without hard links
                if path.exists():
                    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
                os.replace(tmp, path)
        if sync:
            _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
