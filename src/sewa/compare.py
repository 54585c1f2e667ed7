"""Run every averaging method on one trajectory and evaluate each averaged model.

The shared runner behind ``sewa demo``, ``sewa compare``, ``sewa select`` and the experiments:
each method gives weights over the snapshots (:mod:`sewa.methods`), the weighted average is
loaded into a fresh model, BatchNorm statistics are recomputed on ``"train"`` when the model has
BatchNorm layers, and the model is evaluated on ``"test"`` (``"val"`` when the task has no test
split). The result is a JSON-ready dict in the format ``sewa compare --json`` writes.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .average import apply
from .bn import has_batchnorm
from .methods import DEFAULT_METHODS, METHODS, Context, run_method
from .task import Task
from .trajectory import Trajectory

__all__ = ["FORMAT", "averaged_model", "evaluate_method", "run_compare", "environment", "check_top_k", "check_methods"]

FORMAT = "sewa.results/1"
OBJECTIVES = ("val", "train")


def check_methods(methods: Sequence[str]) -> list[str]:
    """The method names, or a ``ValueError`` naming the first unknown one."""
    names = list(methods)
    if not names:
        raise ValueError("no methods to run: name at least one")
    for name in names:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"method list {names} names a method twice")
    return names


def check_top_k(top_k: int, n: int) -> None:
    """Raises unless ``1 <= top_k <= n`` (``n`` checkpoints)."""
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    if top_k > n:
        raise ValueError(f"--top-k {top_k} is larger than the number of checkpoints ({n}): pass a smaller K or more checkpoints")


def averaged_model(task: Task, trajectory: Trajectory, weights: Tensor | Sequence[float]) -> nn.Module:
    """A fresh model from the task holding the weighted average, with BatchNorm statistics
    recomputed on the task's ``"train"`` split when the model has BatchNorm layers."""
    model = task.new_model()
    bn_batches: Any = None
    if has_batchnorm(model):
        bn_batches = task.require("train", "to recompute BatchNorm statistics of averaged models")
    return apply(model, trajectory, weights, bn_batches=bn_batches)


def evaluate_method(name: str, ctx: Context, task: Task, split: str) -> tuple[dict[str, Any], nn.Module]:
    """Runs one method, evaluates its averaged model on ``split``.

    Returns:
        The JSON-ready entry (``weights`` oldest first, ``test_loss``, ``test_metric``,
        ``seconds`` of the method itself, ``eval_seconds``, ``num_averaged``, plus the method's
        own details such as SeWA's ``probabilities`` and ``indices``) and the averaged model.
    """
    result = run_method(name, ctx)
    start = time.perf_counter()
    model = averaged_model(task, ctx.trajectory, result.weights)
    loss, metric = task.evaluate(model, split)
    entry: dict[str, Any] = {
        "weights": result.weights.tolist(),
        "test_loss": loss,
        "test_metric": metric,
        "seconds": result.seconds,
        "eval_seconds": time.perf_counter() - start,
        "num_averaged": int((result.weights > 0).sum()),
    }
    for key, value in result.info.items():
        entry.setdefault(key, value)
    return entry, model


def run_compare(
    trajectory: Trajectory,
    task: Task,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    top_k: int = 10,
    seed: int = 0,
    objective: str = "val",
    samples: int = 4,
    steps: int = 200,
    ema_decay: float = 0.9,
    select_options: dict[str, Any] | None = None,
    checkpoints: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Runs ``methods`` on ``trajectory`` and evaluates each averaged model.

    Args:
        trajectory: The snapshots, oldest first (the order of ``checkpoints``).
        task: Model, batches, loss and optional metric.
        methods: Method names from :data:`sewa.METHODS`.
        top_k: ``K`` for LAWA, random-K and SeWA.
        seed: Seed of random-K and of SeWA's mask noise.
        objective: The split SeWA and greedy soup select on: ``"val"`` or ``"train"``.
        samples: SeWA's mask samples per step (``M``).
        steps: SeWA's selection steps.
        ema_decay: EMA decay per snapshot.
        select_options: More keyword arguments for :func:`sewa.select`.
        checkpoints: One label per snapshot (file paths); default ``"step N"``.
        progress: Show progress bars.

    Returns:
        The results dict: ``methods`` (one entry per method, see :func:`evaluate_method`),
        ``checkpoints``, ``checkpoint_steps``, ``top_k``, ``seed``, ``split``, ``objective`` and
        the settings and machine used.
    """
    names = check_methods(methods)
    n = len(trajectory)
    check_top_k(top_k, n)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    labels = [f"step {s}" for s in trajectory.steps] if checkpoints is None else [str(c) for c in checkpoints]
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} checkpoint labels for {n} snapshots")
    split = task.eval_split()
    model = task.new_model()
    trajectory.check_compatible(model)
    selection_batches = list(task.require(objective, f"to select checkpoints (--objective {objective})"))
    options = {"samples": samples, "steps": steps, "progress": progress} | dict(select_options or {})
    ctx = Context(trajectory, top_k=top_k, seed=seed, ema_decay=ema_decay, model=model, loss_fn=task.loss,
                  batches=selection_batches, select_options=options)
    start = time.perf_counter()
    entries: dict[str, Any] = {}
    for name in _bar(names, progress):
        entries[name], _ = evaluate_method(name, ctx, task, split)
    return {
        "format": FORMAT,
        "task": task.source,
        "metric_name": task.metric_name if task.metric is not None else None,
        "split": split,
        "objective": objective,
        "checkpoints": labels,
        "checkpoint_steps": trajectory.steps,
        "top_k": top_k,
        "seed": seed,
        "samples": samples,
        "steps": steps,
        "ema_decay": ema_decay,
        "batchnorm_recomputed": has_batchnorm(model),
        "methods": entries,
        "seconds": time.perf_counter() - start,
        "environment": environment(),
    }


def _bar(names: list[str], enabled: bool) -> Any:
    if not enabled:
        return names
    from tqdm.auto import tqdm

    return tqdm(names, desc="methods", leave=False)


def _git_commit() -> str | None:
    """The commit of the sewa source tree this runs from, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        # An installed copy inside some other repository must not report that repository's commit.
        if Path(top).resolve() / "src" / "sewa" != here:
            return None
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=here,
                             capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    """The machine and software a result was produced on (for reports)."""
    from . import __version__

    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "sewa": __version__,
        "git_commit": _git_commit(),
    }
