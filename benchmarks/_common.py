"""The measuring core every benchmark shares.

- Timing: :func:`interleaved` (warm-up, then one call of each variant per round, so a burst of
  load from elsewhere hits them alike; :func:`rounds` when a variant has untimed set-up or needs
  several clocks, or a shuffled order), :func:`summarize` (median, quartiles, IQR over the
  rounds) and :func:`ratios` (each variant against a baseline or the best, measured in the same
  process: the only form in which a speed figure is reported).
- Conditions: :func:`set_threads`, :func:`busy_cores` (a busy-loop process on every core for
  the duration of a block), :func:`load_average`, :func:`machine`.
- References and problems: :func:`copy_variant` (the copy-bandwidth reference), :func:`maxrss_bytes`,
  :func:`mlp` (the MLP every CPU benchmark sizes to a parameter count), :func:`run_worker` (a job in
  a fresh process, so that its peak memory and threads are its own).
- Output: :class:`JsonLines` / :func:`read_jsonl`, :func:`emit` (a JSON line on stdout),
  :func:`write_json`, :func:`table` (Markdown) and its cell formats (:func:`ms`, :func:`mib`,
  :func:`human_bytes`, :func:`human_seconds`), :func:`write_generated` (the generated section
  of a Markdown file).

A new benchmark is a short file: build the variants as zero-argument callables, time them with
:func:`interleaved`, reduce with :func:`summarize` and :func:`ratios`, write the record with
:func:`write_json` and render it with :func:`table` (``benchmarks/threads.py`` is the example).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "set_threads", "Stopwatch", "rounds", "interleaved", "median", "summarize", "ratios", "busy_cores",
    "copy_variant", "maxrss_bytes", "mlp", "run_worker", "worker_reply", "machine", "load_average",
    "load_averages", "JsonLines", "read_jsonl", "emit", "write_json", "loglog_slope", "ms", "mib",
    "human_bytes", "human_seconds", "table", "write_generated",
]


def set_threads(n: int) -> None:
    """Intra-op threads of torch (inter-op left alone: the benchmarks run one op at a time)."""
    torch.set_num_threads(int(n))


class Stopwatch:
    """Times the blocks it is entered for, on one or more clocks (wall clock by default).

    A variant of :func:`rounds` receives one and times only its ``with`` block, so set-up
    and tear-down around it stay out of the figure.
    """

    def __init__(self, clocks: Mapping[str, Callable[[], float]] | None = None) -> None:
        self.clocks = dict(clocks or {"wall": time.perf_counter})
        self.times: dict[str, list[float]] = {name: [] for name in self.clocks}
        self._start: dict[str, float] = {}

    def __enter__(self) -> Stopwatch:
        self._start = {name: clock() for name, clock in self.clocks.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        for name, clock in self.clocks.items():
            self.times[name].append(clock() - self._start[name])


def rounds(variants: Mapping[str, Callable[[Stopwatch], Any]], repeats: int, *, warmup: int = 0,
           only: Mapping[str, int] | None = None, order: random.Random | None = None,
           clocks: Mapping[str, Callable[[], float]] | None = None) -> dict[str, dict[str, list[float]]]:
    """Runs every variant once per round, for ``repeats`` rounds, each timing its own block.

    Args:
        variants: Name -> callable that takes a :class:`Stopwatch` and times its work with
            ``with stopwatch:``.
        repeats: Rounds.
        warmup: Untimed calls of each variant before the first round.
        only: Name -> number of rounds for variants timed fewer times (slow ones): they run
            in the first rounds only.
        order: Shuffles the variants' order in every round (default: the mapping's order).
        clocks: Name -> clock (default: ``{"wall": time.perf_counter}``).

    Returns:
        Name -> clock name -> the list of per-call seconds.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn(Stopwatch(clocks))
    watches = {name: Stopwatch(clocks) for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in order.sample(names, len(names)) if order is not None else names:
            if only is not None and r >= only.get(name, repeats):
                continue
            variants[name](watches[name])
    return {name: watch.times for name, watch in watches.items()}


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                only: Mapping[str, int] | None = None) -> dict[str, list[float]]:
    """Times every function once per round, for ``repeats`` rounds, after ``warmup`` untimed
    calls of each (:func:`rounds` with whole calls timed on the wall clock).

    Returns:
        Name -> the list of per-call seconds.
    """

    def whole(fn: Callable[[], Any]) -> Callable[[Stopwatch], None]:
        def run(watch: Stopwatch) -> None:
            with watch:
                fn()
        return run

    timed = rounds({name: whole(fn) for name, fn in fns.items()}, repeats, warmup=warmup, only=only)
    return {name: times["wall"] for name, times in timed.items()}


def median(xs: Iterable[float]) -> float:
    """The median (NaN for no values)."""
    values = list(xs)
    return float(statistics.median(values)) if values else float("nan")


def summarize(xs: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method), IQR, minimum and count of per-call seconds."""
    values = sorted(xs)
    if not values:
        nan = float("nan")
        return {"median": nan, "q1": nan, "q3": nan, "iqr": nan, "min": nan, "n": 0}
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": median(values), "q1": q1, "q3": q3, "iqr": q3 - q1, "min": values[0], "n": len(values)}


def ratios(medians: Mapping[str, float], baseline: str | None = None) -> dict[str, float]:
    """Each variant's time over the ``baseline`` variant's (by default the fastest one's)."""
    ref = medians[baseline] if baseline is not None else min(medians.values())
    return {name: value / ref for name, value in medians.items()}


@contextmanager
def busy_cores(n: int | None = None) -> Iterator[list[int]]:
    """Runs ``n`` (default: one per logical CPU) busy-loop processes for the block, and ends
    them, by their process ids, after it.

    Yields:
        The busy processes' ids.
    """
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(n if n is not None else os.cpu_count() or 1):
            procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        time.sleep(0.5)  # let them start and take their cores
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def copy_variant(nbytes: int = 256 << 20, device: str | torch.device = "cpu") -> tuple[Callable[[], Any], int]:
    """The memory-bandwidth reference: a copy of a float32 tensor of ``nbytes``, to be timed
    beside the variants it is the reference of.

    Returns:
        ``(copy, moved)``: the zero-argument copy (its first touch already done, so page faults
        are not bandwidth) and the bytes it moves, counted as STREAM does (read + written):
        ``moved / seconds`` is the bandwidth.
    """
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * 4


def maxrss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) * (1 if sys.platform == "darwin" else 1024)


def mlp(params: int, din: int = 64, classes: int = 10) -> nn.Module:
    """MLP ``din``-h-h-``classes`` (ReLU) with ``h`` chosen so that its parameter count is
    closest to ``params`` (``h² + (din + classes + 2)·h + classes`` parameters)."""
    b = din + classes + 2
    h = max(1, round((-b + math.sqrt(b * b + 4 * max(params - classes, 1))) / 2))
    return nn.Sequential(nn.Linear(din, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, classes))


def run_worker(script: str | os.PathLike[str], job: Mapping[str, Any], timeout: float) -> list[dict[str, Any]]:
    """Runs ``script --worker <job as JSON>`` in a fresh process at ``job["threads"]`` OpenMP/MKL
    threads and returns the records it printed as ``RESULT <json>`` lines (the script answers
    with :func:`worker_reply`); a failure or a timeout is one ``{"type": "error"}`` record.
    Each record gets the job's wall-clock seconds as ``wall_s``."""
    threads = str(job.get("threads", 1))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(script), "--worker", json.dumps(job)], capture_output=True,
                              text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [dict(job, type="error", error=f"timed out after {timeout:.0f} s")]
    found = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        return [dict(job, type="error", error=proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"])]
    for r in found:
        r["wall_s"] = time.perf_counter() - start
    return found


def worker_reply(result: Mapping[str, Any] | list[Mapping[str, Any]]) -> None:
    """Prints a worker's record(s) as the ``RESULT`` lines :func:`run_worker` reads."""
    for r in result if isinstance(result, list) else [result]:
        print("RESULT " + json.dumps(r), flush=True)


def load_average() -> float:
    """The 1-minute load average (NaN where unavailable)."""
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return float("nan")


def load_averages() -> list[float]:
    """The 1-, 5- and 15-minute load averages (empty where unavailable)."""
    try:
        return [float(x) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine() -> dict[str, Any]:
    """Facts about this machine and software, for the report."""
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_bytes": _mem_total(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_1min": load_average(),
    }


class JsonLines:
    """Appends JSON records to a file, one per line, flushed as they come."""

    def __init__(self, path: str | os.PathLike[str], fresh: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.write_text("")

    def write(self, record: Mapping[str, Any]) -> None:
        """Writes one record."""
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def emit(record: Mapping[str, Any], sink: JsonLines | None = None) -> dict[str, Any]:
    """Prints ``record`` as one JSON line (and appends it to ``sink``); returns it as a dict."""
    print(json.dumps(record, sort_keys=True), flush=True)
    if sink is not None:
        sink.write(record)
    return dict(record)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Writes ``data`` as indented JSON, creating the folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")


def mean_ci(d: Sequence[float]) -> str:
    """``mean [low, high]``: the mean of paired differences ``d`` and its 95% t interval."""
    n = len(d)
    m = sum(d) / n
    if n < 2:
        return f"{m:+.2f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}.get(n, 2.0)
    return f"{m:+.2f} [{m - t * sd / math.sqrt(n):+.2f}, {m + t * sd / math.sqrt(n):+.2f}]"


def loglog_slope(xs: Iterable[float], ys: Iterable[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (NaN with fewer than two points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return sxy / sxx if sxx > 0 else float("nan")


def ms(s: float | None) -> str:
    """Seconds as milliseconds with one decimal (``-`` for none or NaN)."""
    return "-" if s is None or (isinstance(s, float) and math.isnan(s)) else f"{s * 1e3:.1f}"


def mib(b: float) -> str:
    """Bytes as whole MiB with thousands separators."""
    return f"{b / 2**20:,.0f}"


def human_bytes(b: float) -> str:
    """Bytes in decimal units (TB, GB, MB, else B)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if b >= size:
            return f"{b / size:,.1f} {unit}"
    return f"{b:,.0f} B"


def human_seconds(s: float) -> str:
    """Seconds as ms below one second, else as seconds."""
    return f"{s * 1e3:,.1f} ms" if s < 1 else f"{s:,.2f} s"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table (cells formatted with ``str``).

    Args:
        header: Column titles.
        rows: Rows of cells.
        align: One letter per column, ``l`` or ``r`` (a ``| --- | ---: |`` rule); by default
            a plain ``|---|---|`` rule.
    """
    rule = ("| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |" if align is not None
            else "|" + "|".join("---" for _ in header) + "|")
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_generated(path: Path, section: str, begin: str, end: str, heading: str = "") -> None:
    """Replaces the text between the ``begin`` and ``end`` markers of a Markdown file with
    ``section`` (which holds both markers), or appends it (after ``heading``) if absent."""
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = (text.rstrip() + "\n\n" if text else "") + heading + section + "\n"
    path.write_text(text)
