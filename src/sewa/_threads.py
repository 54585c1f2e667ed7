"""How many torch threads the selection engine's passes use.

torch's default, one intra-op thread per core, is the fastest on an idle machine and the
slowest on a busy one: an OpenMP parallel region waits until all its threads are scheduled,
so with other processes on every core each of the engine's many small operations stalls.
``benchmarks/threads.py`` measured it (docs/PERFORMANCE.md, "Thread count"): no fixed count
is within 1.5x of the best both on an idle and on a busy machine, a count that follows the
cores left free by other processes is.

So, unless the user chose a count, :func:`compute_threads` uses the cores that other
processes left idle over a short probe (50 ms, reused for 2 s so that back-to-back calls pay
it once), between 1 and torch's default. The user chose a
count when they pass one, set ``SEWA_THREADS``, set ``OMP_NUM_THREADS``, or changed
torch's count (``torch.set_num_threads``) after sewa was imported. A count set equal to
torch's default cannot be told apart from none: ``SEWA_THREADS`` pins it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["ENV", "compute_threads", "free_cores", "resolve_threads"]

ENV = "SEWA_THREADS"
PROBE_SECONDS = 0.05
REUSE_SECONDS = 2.0
_last: tuple[float, int] | None = None  # (time.monotonic() of the last probe, its choice)
# torch's count as sewa found it: a different count later means the user set one.
_TORCH_DEFAULT = torch.get_num_threads()


def _cpus() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _cpu_jiffies(cpus: list[int]) -> tuple[int, int] | None:
    """``(busy, total)`` jiffies of ``cpus`` from ``/proc/stat`` (``None`` off Linux)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cpus}
    busy = total = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            total += sum(values)
            busy += sum(values) - values[3] - values[4]
    return (busy, total) if total else None


def free_cores(probe: float = PROBE_SECONDS) -> float:
    """Cores of this process's CPU set that other processes leave idle.

    ``free = cores · (1 - busy/total) + own``: the idle share of the CPUs over ``probe``
    seconds (``/proc/stat``), plus what this process itself used meanwhile (its own threads
    are not competition). Off Linux: ``cores - loadavg(1 min)``, which counts this process
    too; without either, all cores.

    Args:
        probe: Seconds to sample ``/proc/stat`` over.

    Returns:
        Free cores, between 0 and the number of CPUs this process may use.
    """
    cpus = _cpus()
    before, own_before, start = _cpu_jiffies(cpus), time.process_time(), time.perf_counter()
    if before is not None:
        time.sleep(probe)
        after = _cpu_jiffies(cpus)
        own = (time.process_time() - own_before) / (time.perf_counter() - start)
        if after is not None and after[1] > before[1]:
            busy = (after[0] - before[0]) / (after[1] - before[1])
            return min(float(len(cpus)), max(0.0, len(cpus) * (1 - busy) + own))
    try:
        return max(0.0, len(cpus) - os.getloadavg()[0])
    except (AttributeError, OSError):
        return float(len(cpus))


def _explicit() -> int | None:
    """The count the user chose outside sewa (``None``: they chose none)."""
    raw = os.environ.get(ENV, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{ENV} must be a positive integer, got {raw!r}") from None
        if n < 1:
            raise ValueError(f"{ENV} must be a positive integer, got {raw!r}")
        return n
    if os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads() != _TORCH_DEFAULT:
        return torch.get_num_threads()
    return None


def resolve_threads(n: int | None = None, probe: float = PROBE_SECONDS) -> int:
    """The thread count :func:`compute_threads` would use now.

    Args:
        n: An explicit count (wins over everything else).
        probe: Seconds of the free-core probe, when it runs.

    Returns:
        ``n``; else ``SEWA_THREADS``; else torch's count if the user set one; else the free
        cores rounded to the nearest integer, between 1 and torch's default (a probe less
        than ``REUSE_SECONDS`` old is reused).

    Raises:
        ValueError: If ``n`` or ``SEWA_THREADS`` is not a positive integer.
    """
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"threads must be a positive integer or None, got {n!r}")
        return n
    chosen = _explicit()
    if chosen is not None:
        return chosen
    if _TORCH_DEFAULT <= 1:
        return 1
    global _last
    now = time.monotonic()
    if _last is None or now - _last[0] > REUSE_SECONDS:
        _last = (now, max(1, min(_TORCH_DEFAULT, int(free_cores(probe) + 0.5))))
    return _last[1]


@contextmanager
def compute_threads(n: int | None = None, probe: float = PROBE_SECONDS) -> Iterator[int]:
    """Sets torch's intra-op thread count for a block and restores the previous one after.

    Args:
        n: Threads to use; ``None`` lets :func:`resolve_threads` choose.
        probe: Seconds of the free-core probe, when it runs.

    Yields:
        The thread count in force inside the block.

    Example:
        >>> with compute_threads() as threads:  # doctest: +SKIP
        ...     run_the_passes()
    """
    previous = torch.get_num_threads()
    chosen = resolve_threads(n, probe)
    if chosen != previous:
        torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
