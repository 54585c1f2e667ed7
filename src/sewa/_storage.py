"""Storage dtypes and the free memory a trajectory's matrix must fit in."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

import torch
from torch import Tensor

from ._ring import TrajectoryError

__all__ = ["free_memory"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(value: torch.dtype | str | None, recorded: Mapping[str, Tensor] | None = None) -> torch.dtype:
    """The storage dtype: ``value``, or (``None``) the widest floating dtype of ``recorded``."""
    if value is None:
        found = [t.dtype for t in (recorded or {}).values()]
        widest = found[0] if found else torch.float32
        for d in found[1:]:
            widest = torch.promote_types(widest, d)
        return widest if widest in _DTYPES.values() else torch.float32
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise TrajectoryError(f"storage dtype {value} is not supported: use one of {list(_DTYPES)}")
        return value
    if value not in _DTYPES:
        raise TrajectoryError(f"storage dtype {value!r} is not supported: use one of {list(_DTYPES)}")
    return _DTYPES[value]


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``, or ``None`` when unknown (cheap)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    return None
