"""Where a result came from: the machine, the software, and the exact source tree.

Every results file (``sewa compare --json``, ``sewa demo``, the experiments) records
:func:`environment`; the experiments refuse to start from a source tree with uncommitted
changes unless told otherwise (:func:`git_state`), so that a result names the code behind it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "git_state"]


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()


def git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the sewa source tree this runs from: the full commit hash, and
    whether ``src/`` has uncommitted changes. ``(None, None)`` outside a git checkout of sewa
    (an installed copy inside some other repository must not report that repository)."""
    here = Path(__file__).resolve().parent
    try:
        top = Path(_git("rev-parse", "--show-toplevel", cwd=here)).resolve()
        if top / "src" / "sewa" != here:
            return None, None
        commit = _git("rev-parse", "HEAD", cwd=here)
        dirty = bool(_git("status", "--porcelain", "--", str(top / "src"), cwd=here))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, dirty


def environment() -> dict[str, Any]:
    """The machine and software a result was produced on (for reports)."""
    from . import __version__

    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    commit, dirty = git_state()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "sewa": __version__,
        "git_commit": commit,
        "dirty": dirty,
    }
