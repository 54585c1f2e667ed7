"""A trajectory kept in a directory on disk, for windows that do not fit in memory.

The directory holds:

* ``snapshots.bin``: the ``(window, P)`` snapshot matrix in the storage dtype, memory-mapped,
  so :attr:`DiskTrajectory.data` is an ordinary tensor and averaging/selection work unchanged.
  Its space is reserved when it is created (``posix_fallocate``), so a full disk is reported
  then, never as a crash (SIGBUS) in the middle of recording;
* ``manifest.json``: the layout (names, shapes, dtypes, aliases, storage dtype, window) and the
  ``(row, step, generation)`` entries of the complete snapshots, oldest first. ``generation``
  counts the rows ever written, so every written row has an entry no other write shares;
* ``extras.safetensors``: the entries that are not recorded (e.g. BatchNorm counters), newest.

**Crash safety.** The manifest is the only commit point, and it is replaced atomically
(write a temporary file, fsync, ``os.replace``, fsync the directory). A snapshot enters the
manifest only after its row is fully written and flushed (``msync``). When the ring is full,
the manifest first drops the oldest entry, and only then is its row overwritten. So after a
``kill -9`` (or a power loss, with ``sync=True``) at any moment, reopening the directory gives
back every snapshot the manifest lists, bit for bit, and recording resumes after the newest.
A crash can leave the extras one push newer than the newest listed snapshot.

**A refused push changes nothing.** Everything a push writes that takes disk space (the new
manifest and extras, as temporary files) is written before the oldest snapshot is unlisted;
after that only the row (in space reserved at creation) and renames remain. So a full disk
(``ENOSPC``) makes the push raise with memory and the directory as they were.

**Readers.** ``DiskTrajectory.open(dir, readonly=True)`` maps the file without a lock while a
writer records into it. A reader does not copy the rows it listed (that would cost the whole
window in memory); it detects instead: every read (:meth:`~DiskTrajectory.matrix`,
:meth:`~sewa.Trajectory.snapshot`, :func:`sewa.average`) checks that the manifest still lists
each of its entries with the same row and generation, and raises :class:`TrajectoryError`
naming the steps the writer has dropped since, so a reader never averages overwritten rows.

Example:
    >>> traj = DiskTrajectory("run/traj", model, window=500, dtype="bfloat16")
    >>> traj.push(model, step=100)      # same API as Trajectory
    >>> traj = DiskTrajectory.open("run/traj")   # later, or in another process
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._atomic import _fsync_dir, atomic_write, fsync_file
from ._disk_files import (
    _LAYOUT_KEYS,
    DATA,
    EXTRAS,
    FORMAT,
    LOCK,
    MANIFEST,
    _difference,
    _entry,
    _layout_of,
    _load_manifest,
    _reserve,
    disk_free,
)
from .trajectory import Trajectory, TrajectoryError, _dtype, _named_tensors, check_window

__all__ = ["DiskTrajectory"]

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, one writer per directory is then up to the user
    fcntl = None  # type: ignore[assignment]


class DiskTrajectory(Trajectory):
    """A :class:`Trajectory` whose snapshot matrix is a memory-mapped file in ``directory``.

    Creates the directory's files when it holds no trajectory, otherwise reopens it and
    resumes: every snapshot listed in its manifest is back, and :meth:`push` continues after
    the newest. One process at a time may open a directory for writing (an advisory lock).

    Args:
        directory: Where the trajectory lives (created if missing).
        template: The model (or state dict) that defines the layout, as for :class:`Trajectory`.
        window: Snapshots to keep; the file holds ``window × P`` values of the storage dtype.
        dtype: Storage dtype: ``float64``, ``float32``, ``bfloat16`` or ``float16``. Default:
            the existing directory's, else the model's widest floating dtype.
        buffers: Also record floating-point buffers.
        check_finite: Refuse snapshots holding NaN or Inf (or values the storage cannot hold).
        sync: Flush each snapshot and manifest to the disk (``msync``/``fsync``) before moving
            on, so that a power loss cannot lose a listed snapshot. ``False`` is faster and
            still safe against the process being killed (the page cache outlives it).

    Raises:
        TrajectoryError: if the directory holds the trajectory of another model (or another
            window or storage dtype): it is never overwritten; use another directory. Also
            when the file does not fit on the disk (the message names the bytes needed).
        RuntimeError: if another process has the directory open for writing.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        template: nn.Module | Mapping[str, Tensor],
        window: int,
        *,
        dtype: torch.dtype | str | None = None,
        buffers: bool = False,
        check_finite: bool = True,
        sync: bool = True,
        _readonly: bool = False,
        _manifest: dict[str, Any] | None = None,
    ) -> None:
        window = check_window(window)
        self.directory = Path(directory)
        self.sync = sync
        self.readonly = _readonly
        self._lock_fd: int | None = None
        self._mmap: mmap.mmap | None = None
        self._gens: dict[int, int] = {}  # row -> generation of the snapshot it holds
        self._generation = 0
        self._listed: list[tuple[int, int, int | None]] = []  # a reader's entries, as read
        created = not self.directory.exists()
        if not self.readonly:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock()
        try:
            manifest = _manifest if _manifest is not None else self._read_manifest()
            if dtype is None and manifest is not None:
                dtype = manifest["storage"]
            storage = _dtype(dtype, _named_tensors(template, buffers)[0] if dtype is None else None)
            layout = _layout_of(template, window, storage, buffers) if _manifest is None else {k: _manifest[k] for k in _LAYOUT_KEYS}
            num_params = sum(int(torch.Size(s).numel()) for s in layout["shapes"])
            if manifest is not None:
                why = _difference({k: manifest[k] for k in _LAYOUT_KEYS}, layout)
                if why is not None:
                    raise TrajectoryError(f"{self.directory} holds the trajectory of another model: {why}. "
                                          "It is left untouched; record into another directory, or reopen it "
                                          "with DiskTrajectory.open() to read it")
            data = self._map(window, num_params, storage, create=manifest is None)
            super().__init__(template, window, dtype=storage, buffers=buffers, check_finite=check_finite, _data=data)
            if manifest is None:
                self._publish()  # an empty manifest: the directory now belongs to this layout
            else:
                # a layout read from the manifest: restore what a state-dict template cannot carry
                self.buffers = bool(manifest["buffers"])
                self.aliases = dict(manifest["aliases"])
                self._restore(manifest)
        except BaseException:
            self._unlock()
            if created and not self.readonly:  # leave no half-made directory behind
                for name in (DATA, MANIFEST, LOCK):
                    (self.directory / name).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.directory.rmdir()
            raise

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, readonly: bool = False, check_finite: bool = True,
             sync: bool = True) -> DiskTrajectory:
        """Opens an existing directory, reading the layout from its manifest (no model needed).

        Args:
            directory: A directory written by :class:`DiskTrajectory`.
            readonly: Map the file copy-on-write and take no lock: nothing in the directory is
                ever modified, and :meth:`push` is refused. Another process may be recording
                into it: the snapshots seen are those listed when it was opened, and a read
                raises :class:`TrajectoryError` once the writer has dropped one of them (see
                the module docstring); reopen to see the current ones.
            check_finite: As for :class:`Trajectory`.
            sync: As for :class:`DiskTrajectory`.
        """
        directory = Path(directory)
        manifest = _load_manifest(directory)
        if manifest is None:
            raise FileNotFoundError(f"{directory} holds no sewa disk trajectory (no {MANIFEST})")
        template = {n: torch.empty(s, dtype=getattr(torch, d), device="meta")
                    for n, s, d in zip(manifest["names"], manifest["shapes"], manifest["dtypes"], strict=True)}
        return cls(directory, template, manifest["window"], dtype=manifest["storage"], buffers=True,
                   check_finite=check_finite, sync=sync, _readonly=readonly, _manifest=manifest)

    # ------------------------------------------------------------------ files
    def _lock(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(f"{self.directory} is open for writing by another DiskTrajectory (another process, "
                               "or an object in this one not yet closed); close it first, or open this one with "
                               "DiskTrajectory.open(..., readonly=True)") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _read_manifest(self) -> dict[str, Any] | None:
        for name in (MANIFEST, EXTRAS):
            for stale in self.directory.glob(f".{name}.*.tmp"):  # left by a process killed mid-write
                if not self.readonly:
                    stale.unlink(missing_ok=True)
        return _load_manifest(self.directory)

    def _map(self, window: int, num_params: int, storage: torch.dtype, create: bool) -> Tensor:
        path = self.directory / DATA
        size = window * num_params * storage.itemsize
        if create:
            free = disk_free(self.directory)
            if size > free:
                raise TrajectoryError(f"a window of {window:,} snapshots of {num_params:,} values in {storage} needs "
                                      f"{size:,} bytes in {path}, but the disk has {free:,} free: use a smaller "
                                      "window, a compact dtype (dtype='bfloat16'), or another disk")
            with open(path, "wb") as f:
                _reserve(f.fileno(), size, path)
                if self.sync:
                    os.fsync(f.fileno())
        elif not path.is_file() or path.stat().st_size != size:
            found = path.stat().st_size if path.is_file() else "no file"
            raise TrajectoryError(f"{path} should hold {size} bytes for this manifest but has {found}; the directory is damaged")
        elif not self.readonly:
            with open(path, "r+b") as f:  # a file made sparse by an older version: reserve it now
                _reserve(f.fileno(), size, path)
        with open(path, "rb" if self.readonly else "r+b") as f:
            # copy-on-write when read-only: the tensor is writable, the file never changes
            self._mmap = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY if self.readonly else mmap.ACCESS_WRITE)
        return torch.frombuffer(self._mmap, dtype=storage, count=window * num_params).view(window, num_params)

    def _flush_row(self, slot: int) -> None:
        if not self.sync or self._mmap is None:
            return
        row_bytes = self.num_params * self.data.element_size()
        start = slot * row_bytes
        aligned = start - start % mmap.ALLOCATIONGRANULARITY  # msync needs a page-aligned start
        self._mmap.flush(aligned, start + row_bytes - aligned)

    def _manifest(self) -> dict[str, Any]:
        layout = self._layout()
        entries = [[slot, step, self._gens.get(slot, 0)] for slot, step in zip(self._ring.slots, self._ring.steps, strict=True)]
        return {"format": FORMAT, **{k: layout[k] for k in _LAYOUT_KEYS}, "generation": self._generation, "entries": entries}

    def _publish(self) -> None:
        """Makes the in-memory entries the directory's committed state (atomically)."""
        if self.readonly:
            return
        text = json.dumps(self._manifest())
        atomic_write(self.directory / MANIFEST, lambda tmp: tmp.write_text(text), sync=self.sync)

    def _restore(self, manifest: Mapping[str, Any]) -> None:
        """Loads the listed entries, then makes the held rows ``0..n-1`` again (see below)."""
        entries = [_entry(e) for e in manifest["entries"]]
        try:
            self._ring.load((slot, step) for slot, step, _ in entries)
        except TrajectoryError:
            raise TrajectoryError(f"{self.directory / MANIFEST} lists invalid entries {manifest['entries']}; "
                                  "the directory is damaged") from None
        self._listed = entries
        self._gens = {slot: gen or 0 for slot, _, gen in entries}
        self._generation = max([int(manifest.get("generation", 0)), *self._gens.values()])
        extras_path = self.directory / EXTRAS
        if extras_path.is_file():
            from safetensors.torch import load_file

            self.extras.update(load_file(str(extras_path)))
        # A crash after the oldest entry was dropped leaves a hole: held rows are then not
        # 0..n-1, which Trajectory.matrix() relies on. Move the highest held row into the hole,
        # flush, publish; a crash in between leaves the previous (valid) manifest in force.
        for hole, moved in self._ring.holes():
            self.data[hole].copy_(self.data[moved])
            self._flush_row(hole)
            self._ring.move(hole, moved)
            self._generation += 1
            self._gens[hole] = self._generation
            self._publish()

    # ------------------------------------------------------------------ reading
    def matrix(self) -> tuple[Tensor, Tensor]:
        """As :meth:`Trajectory.matrix`; a read-only view first checks that its rows are still listed."""
        self.check_unchanged()
        return super().matrix()

    def check_unchanged(self) -> None:
        """For a read-only view: raises if the writer has dropped or moved a snapshot this view
        lists, whose row may then hold another snapshot. Nothing to check for a writer."""
        if not self.readonly or not self._listed:
            return
        manifest = _load_manifest(self.directory)
        now = [_entry(e) for e in manifest["entries"]] if manifest is not None else []
        keys = {(s, t, g) for s, t, g in now} | {(s, t, None) for s, t, _ in now}
        gone = [step for slot, step, gen in self._listed if (slot, step, gen) not in keys]
        if gone:
            raise TrajectoryError(f"{self.directory} was opened read-only with steps {[t for _, t, _ in self._listed]}; the "
                                  f"writer has since dropped or moved steps {gone}, whose rows may now hold other "
                                  "snapshots. Open it again (DiskTrajectory.open(..., readonly=True)) to read the current ones")

    # ------------------------------------------------------------------ recording
    def push(self, source: nn.Module | Mapping[str, Tensor], step: int, *, what: str = "model") -> None:
        """Records a snapshot durably; see the module docstring for the order of writes.

        Everything that takes disk space (the new manifest and extras, as temporary files) is
        written before any listed snapshot is touched, so a push that raises for a full disk
        (or a refused snapshot) leaves the directory and this object as they were.

        Raises:
            TrajectoryError: as :meth:`Trajectory.push`.
            RuntimeError: if the trajectory was opened read-only or closed, or is being read.
            OSError: if a write fails; nothing is changed then.
        """
        if self.readonly:
            raise RuntimeError(f"{self.directory} was opened read-only; open it with DiskTrajectory.open(path) to record")
        if self._lock_fd is None and fcntl is not None:
            raise RuntimeError(f"{self.directory} was closed; open it again to record")
        slot, step, recorded, others = self._admit(source, step, what)
        before = (self._ring.state(), dict(self._gens), self._generation, {k: v.clone() for k, v in self.extras.items()})
        staged: dict[str, Path] = {}
        try:
            if self._keep_extras(others) and self.extras:
                from safetensors.torch import save_file

                tensors = {k: v.contiguous() for k, v in self.extras.items()}
                staged[EXTRAS] = self._stage(EXTRAS, lambda tmp: save_file(tensors, str(tmp)))
            full = self._ring.full
            if full:
                self._ring.drop_oldest()
            unlisted = json.dumps(self._manifest())
            self._generation += 1
            self._gens[slot] = self._generation
            self._ring.commit(slot, step)
            listed = json.dumps(self._manifest())
            staged[MANIFEST] = self._stage(MANIFEST, lambda tmp: tmp.write_text(listed))
            if full:
                # 1. unlist the oldest snapshot before its row is overwritten
                atomic_write(self.directory / MANIFEST, lambda tmp: tmp.write_text(unlisted), sync=self.sync)
        except BaseException:
            self._ring.restore(before[0])
            self._gens, self._generation, self.extras = before[1], before[2], before[3]
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)
            raise
        # From here on nothing needs disk space: the row's blocks are reserved, the rest are renames.
        try:
            # 2. write the row and flush it
            self._write(self.data[slot], [recorded[n] for n in self.names])
            self._flush_row(slot)
            if EXTRAS in staged:
                self._install(staged[EXTRAS], EXTRAS)
            # 3. list it
            self._install(staged[MANIFEST], MANIFEST)
        except BaseException:
            self._recover(staged)
            raise

    def _stage(self, name: str, write: Callable[[Path], object]) -> Path:
        """Writes (and with ``sync`` fsyncs) a temporary file that :meth:`_install` renames over ``name``."""
        tmp = self.directory / f".{name}.{os.getpid()}.staged.tmp"
        try:
            write(tmp)
            if self.sync:
                fsync_file(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _install(self, tmp: Path, name: str) -> None:
        os.replace(tmp, self.directory / name)
        if self.sync:
            _fsync_dir(self.directory)

    def _recover(self, staged: Mapping[str, Path]) -> None:
        """After an I/O error past the point of no return (not a full disk: an EIO, say), takes
        the directory's committed state back into memory; at worst the oldest snapshot is gone."""
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            manifest = _load_manifest(self.directory)
            if manifest is not None:
                self._restore(manifest)

    def close(self) -> None:
        """Flushes the file and releases the directory for other writers."""
        if self._mmap is not None and not self.readonly:
            with contextlib.suppress(ValueError):
                self._mmap.flush()
        self._unlock()

    def __enter__(self) -> DiskTrajectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._unlock()

    def __repr__(self) -> str:
        return f"Disk{super().__repr__()[:-1]}, directory={str(self.directory)!r})"
