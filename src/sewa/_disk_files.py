"""The files of a :class:`~sewa.disk.DiskTrajectory` directory: names, manifest, layout, space."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._names import _named_tensors
from ._ring import TrajectoryError

FORMAT = "sewa.disk/1"
MANIFEST = "manifest.json"
DATA = "snapshots.bin"
EXTRAS = "extras.safetensors"
LOCK = ".lock"
_LAYOUT_KEYS = ("window", "buffers", "names", "shapes", "dtypes", "aliases", "storage")


def disk_free(directory: Path) -> int:
    """Free bytes on the filesystem holding ``directory`` (or its nearest existing parent)."""
    path = directory.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _reserve(fd: int, size: int, path: Path) -> None:
    """Allocates ``size`` bytes for the file (a sparse file where the filesystem cannot)."""
    if hasattr(os, "posix_fallocate") and size:
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise TrajectoryError(f"{path} needs {size:,} bytes and the disk is full: free space, "
                                      "or use a smaller window or a compact dtype (dtype='bfloat16')") from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, size)


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


def _entry(item: Any) -> tuple[int, int, int | None]:
    """``(slot, step, generation)`` of a manifest entry (generation is absent in older manifests)."""
    return int(item[0]), int(item[1]), (int(item[2]) if len(item) > 2 else None)


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
