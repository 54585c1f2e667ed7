"""A trajectory kept in a directory on disk, for windows that do not fit in memory.

The directory holds:

* ``snapshots.bin``: the ``(window, P)`` snapshot matrix in the storage dtype, memory-mapped,
  so :attr:`DiskTrajectory.data` is an ordinary tensor and averaging/selection work unchanged;
* ``manifest.json``: the layout (names, shapes, dtypes, aliases, storage dtype, window) and the
  ``(row, step)`` entries of the complete snapshots, oldest first;
* ``extras.safetensors``: the entries that are not recorded (e.g. BatchNorm counters), newest.

**Crash safety.** The manifest is the only commit point, and it is replaced atomically
(write a temporary file, fsync, ``os.replace``, fsync the directory). A snapshot enters the
manifest only after its row is fully written and flushed (``msync``). When the ring is full,
the manifest first drops the oldest entry, and only then is its row overwritten. So after a
``kill -9`` (or a power loss, with ``sync=True``) at any moment, reopening the directory gives
back every snapshot the manifest lists, bit for bit, and recording resumes after the newest.
A crash can leave the extras one push newer than the newest listed snapshot.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .io import atomic_write
from .trajectory import Trajectory, TrajectoryError, _dtype, _named_tensors

__all__ = ["DiskTrajectory"]

FORMAT = "sewa.disk/1"
MANIFEST = "manifest.json"
DATA = "snapshots.bin"
EXTRAS = "extras.safetensors"
LOCK = ".lock"
_LAYOUT_KEYS = ("window", "buffers", "names", "shapes", "dtypes", "aliases", "storage")

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, one writer per directory is then up to the user
    fcntl = None  # type: ignore[assignment]


def _layout_of(template: nn.Module | Mapping[str, Tensor], window: int, storage: torch.dtype, buffers: bool) -> dict[str, Any]:
    """The layout a :class:`Trajectory` built from ``template`` would have, without allocating it."""
    recorded, aliases, _ = _named_tensors(template, buffers)
    return {
        "window": window,
        "buffers": buffers,
        "names": list(recorded),
        "shapes": [list(t.shape) for t in recorded.values()],
        "dtypes": [str(t.dtype).removeprefix("torch.") for t in recorded.values()],
        "aliases": aliases,
        "storage": str(storage).removeprefix("torch."),
    }


def _difference(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    """The first layout difference in words, or ``None``."""
    for key in ("window", "storage", "buffers"):
        if found[key] != wanted[key]:
            return f"it was created with {key}={found[key]!r}, not {wanted[key]!r}"
    have = dict(zip(found["names"], zip(found["shapes"], found["dtypes"], strict=True), strict=True))
    want = dict(zip(wanted["names"], zip(wanted["shapes"], wanted["dtypes"], strict=True), strict=True))
    for name, (shape, dtype) in want.items():
        if name not in have:
            return f"it has no parameter {name!r}"
        if have[name] != (shape, dtype):
            return f"parameter {name!r} has shape {have[name][0]} and dtype {have[name][1]} there, {shape} and {dtype} here"
    extra = [n for n in have if n not in want]
    if extra:
        return f"it records parameter {extra[0]!r}, which this model does not have"
    if found["names"] != wanted["names"] or found["aliases"] != wanted["aliases"]:
        return "its parameters are in another order or tied differently"
    return None


class DiskTrajectory(Trajectory):
    """A :class:`Trajectory` whose snapshot matrix is a memory-mapped file in ``directory``.

    Creates the directory's files when it holds no trajectory, otherwise reopens it and
    resumes: every snapshot listed in its manifest is back, and :meth:`push` continues after
    the newest. One process at a time may open a directory for writing (an advisory lock).

    Args:
        directory: Where the trajectory lives (created if missing).
        template: The model (or state dict) that defines the layout, as for :class:`Trajectory`.
        window: Snapshots to keep; the file holds ``window × P`` values of the storage dtype.
        dtype: Storage dtype: ``float32``, ``bfloat16`` or ``float16``.
        buffers: Also record floating-point buffers.
        check_finite: Refuse snapshots holding NaN or Inf.
        sync: Flush each snapshot and manifest to the disk (``msync``/``fsync``) before moving
            on, so that a power loss cannot lose a listed snapshot. ``False`` is faster and
            still safe against the process being killed (the page cache outlives it).

    Raises:
        TrajectoryError: if the directory holds the trajectory of another model (or another
            window or storage dtype): it is never overwritten; use another directory.
        RuntimeError: if another process has the directory open for writing.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        template: nn.Module | Mapping[str, Tensor],
        window: int,
        *,
        dtype: torch.dtype | str = torch.float32,
        buffers: bool = False,
        check_finite: bool = True,
        sync: bool = True,
        _readonly: bool = False,
        _manifest: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(window, int) or window < 1:
            raise TrajectoryError(f"window must be a positive integer, got {window!r}")
        self.directory = Path(directory)
        self.sync = sync
        self.readonly = _readonly
        self._lock_fd: int | None = None
        self._mmap: mmap.mmap | None = None
        storage = _dtype(dtype)
        layout = _layout_of(template, window, storage, buffers) if _manifest is None else {k: _manifest[k] for k in _LAYOUT_KEYS}
        num_params = sum(int(torch.Size(s).numel()) for s in layout["shapes"])
        if not self.readonly:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock()
        try:
            manifest = _manifest if _manifest is not None else self._read_manifest()
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
            raise

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, readonly: bool = False, check_finite: bool = True,
             sync: bool = True) -> DiskTrajectory:
        """Opens an existing directory, reading the layout from its manifest (no model needed).

        Args:
            directory: A directory written by :class:`DiskTrajectory`.
            readonly: Map the file copy-on-write and take no lock: nothing in the directory is
                ever modified, and :meth:`push` is refused. Another process may be recording
                into it; the snapshots seen are those listed when it was opened.
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
        for stale in self.directory.glob(f".{MANIFEST}.*.tmp"):  # left by a process killed mid-write
            if not self.readonly:
                stale.unlink(missing_ok=True)
        return _load_manifest(self.directory)

    def _map(self, window: int, num_params: int, storage: torch.dtype, create: bool) -> Tensor:
        path = self.directory / DATA
        size = window * num_params * torch.empty((), dtype=storage).element_size()
        if create:
            with open(path, "wb") as f:  # sparse: the disk fills as snapshots are written
                f.truncate(size)
                if self.sync:
                    os.fsync(f.fileno())
        elif not path.is_file() or path.stat().st_size != size:
            found = path.stat().st_size if path.is_file() else "no file"
            raise TrajectoryError(f"{path} should hold {size} bytes for this manifest but has {found}; the directory is damaged")
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
        return {"format": FORMAT, **{k: layout[k] for k in _LAYOUT_KEYS},
                "entries": [[slot, step] for slot, step in zip(self._slots, self._steps, strict=True)]}

    def _publish(self) -> None:
        """Makes the in-memory entries the directory's committed state (atomically)."""
        if self.readonly:
            return
        text = json.dumps(self._manifest())
        atomic_write(self.directory / MANIFEST, lambda tmp: tmp.write_text(text), sync=self.sync)

    def _save_extras(self) -> None:
        if self.readonly or not self.extras:
            return
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in self.extras.items()}
        atomic_write(self.directory / EXTRAS, lambda tmp: save_file(tensors, str(tmp)), sync=self.sync)

    def _restore(self, manifest: Mapping[str, Any]) -> None:
        """Loads the listed entries, then makes the held rows ``0..n-1`` again (see below)."""
        entries = [(int(slot), int(step)) for slot, step in manifest["entries"]]
        slots = [s for s, _ in entries]
        steps = [t for _, t in entries]
        if (len(set(slots)) != len(slots) or any(not 0 <= s < self.window for s in slots)
                or any(a >= b for a, b in zip(steps, steps[1:], strict=False))):
            raise TrajectoryError(f"{self.directory / MANIFEST} lists invalid entries {entries}; the directory is damaged")
        self._slots, self._steps = slots, steps
        extras_path = self.directory / EXTRAS
        if extras_path.is_file():
            from safetensors.torch import load_file

            self.extras.update(load_file(str(extras_path)))
        # A crash after the oldest entry was dropped leaves a hole: held rows are then not
        # 0..n-1, which Trajectory.matrix() relies on. Move the highest held row into the hole,
        # flush, publish; a crash in between leaves the previous (valid) manifest in force.
        n = len(slots)
        while set(self._slots) != set(range(n)):
            hole = min(set(range(n)) - set(self._slots))
            moved = max(self._slots)
            self.data[hole].copy_(self.data[moved])
            self._flush_row(hole)
            self._slots[self._slots.index(moved)] = hole
            self._publish()

    # ------------------------------------------------------------------ recording
    def push(self, source: nn.Module | Mapping[str, Tensor], step: int, *, what: str = "model") -> None:
        """Records a snapshot durably; see the module docstring for the order of writes.

        Raises:
            TrajectoryError: as :meth:`Trajectory.push`.
            RuntimeError: if the trajectory was opened read-only or closed, or is being read.
        """
        if self.readonly:
            raise RuntimeError(f"{self.directory} was opened read-only; open it with DiskTrajectory.open(path) to record")
        if self._lock_fd is None and fcntl is not None:
            raise RuntimeError(f"{self.directory} was closed; open it again to record")
        step, recorded, others = self._admit(source, step, what)
        if len(self._slots) == self.window:
            # 1. unlist the oldest snapshot before its row is overwritten
            slot = self._slots.pop(0)
            self._steps.pop(0)
            self._publish()
        else:
            slot = len(self._slots)
        # 2. write the row and flush it
        row = self.data[slot]
        self._write(row, [recorded[n] for n in self.names])
        self._flush_row(slot)
        changed = False
        for name, t in others.items():
            held = self.extras.get(name)
            if held is not None and held.shape == t.shape and held.dtype == t.dtype:
                if not torch.equal(held, t.to(held.device)):
                    held.copy_(t)
                    changed = True
            else:
                self.extras[name] = t.detach().to("cpu", copy=True)
                changed = True
        if changed:
            self._save_extras()
        # 3. list it
        self._slots.append(slot)
        self._steps.append(step)
        self._publish()

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


def _load_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrajectoryError(f"{path} is not valid JSON ({e}); it was not written by sewa or the directory is damaged") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TrajectoryError(f"{path} is not a sewa disk trajectory manifest (format {FORMAT!r} expected)")
    missing = [k for k in (*_LAYOUT_KEYS, "entries") if k not in manifest]
    if missing:
        raise TrajectoryError(f"{path} lacks {missing}; the directory is damaged")
    return manifest
