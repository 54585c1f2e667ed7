"""Run every averaging method on one trajectory and evaluate each averaged model.

The shared runner behind ``sewa demo``, ``sewa compare``, ``sewa select`` and the experiments:
each method gives weights over the snapshots (:mod:`sewa.methods`), the weighted average is
loaded into a fresh model, BatchNorm statistics are recomputed on ``"train"`` when the model has
BatchNorm layers, and the model is evaluated on ``"test"`` (``"val"`` when the task has no test
split). The result is a JSON-ready dict in the format ``sewa compare --json`` writes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from .average import apply
from .bn import has_batchnorm
from .methods import DEFAULT_METHODS, Evaluator, Method, MethodError, canonical, create
from .provenance import environment
from .task import Task
from .trajectory import Trajectory

__all__ = ["FORMAT", "averaged_model", "evaluate_method", "run_compare", "environment", "check_top_k", "check_methods",
           "build_methods"]

FORMAT = "sewa.results/1"
OBJECTIVES = ("val", "train")
MethodSpec = Method | str


def check_methods(methods: Sequence[str]) -> list[str]:
    """The registry names of ``methods`` (aliases resolved), or a ``ValueError`` naming the
    first unknown one or a repeated one."""
    names = [canonical(m) for m in methods]
    if not names:
        raise ValueError("no methods to run: name at least one")
    if len(set(names)) != len(names):
        raise ValueError(f"method list {list(methods)} names a method twice")
    return names


def check_top_k(top_k: int, n: int) -> None:
    """Raises unless ``1 <= top_k <= n`` (``n`` checkpoints)."""
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    if top_k > n:
        raise ValueError(f"--top-k {top_k} is larger than the number of checkpoints ({n}): pass a smaller K or more checkpoints")


def build_methods(methods: Sequence[MethodSpec] | Mapping[str, MethodSpec], **settings: Any) -> dict[str, Method]:
    """``{label: method}`` from method objects or registry names; a name is built with the
    ``settings`` its constructor takes (e.g. one ``top_k`` for every method that has one)."""
    items = list(methods.items()) if isinstance(methods, Mapping) else [
        (m.name if isinstance(m, Method) else canonical(m), m) for m in methods]
    if not items:
        raise ValueError("no methods to run: name at least one")
    out: dict[str, Method] = {}
    for label, m in items:
        if label in out:
            raise ValueError(f"method list names {label!r} twice; give each method its own label")
        out[label] = m if isinstance(m, Method) else create(m, **settings)
    return out


def averaged_model(task: Task, trajectory: Trajectory, weights: Tensor | Sequence[float]) -> nn.Module:
    """A fresh model from the task holding the weighted average, with BatchNorm statistics
    recomputed on the task's ``"train"`` split when the model has BatchNorm layers."""
    model = task.new_model()
    bn_batches: Any = None
    if has_batchnorm(model):
        bn_batches = task.require("train", "to recompute BatchNorm statistics of averaged models")
    return apply(model, trajectory, weights, bn_batches=bn_batches)


Score = Callable[[nn.Module], Mapping[str, Any]]


def evaluate_method(method: Method, trajectory: Trajectory, evaluator: Evaluator | None, task: Task,
                    split: str, score: Score | None = None) -> tuple[dict[str, Any], nn.Module]:
    """Runs one method, evaluates its averaged model on ``split``.

    ``score(model)``, when given, replaces the task's evaluation: it returns the entry's scores
    (at least ``test_loss`` and ``test_metric``; the experiments add validation scores and
    behaviour-cloning returns).

    Returns:
        The JSON-ready entry (``method``, ``settings``, ``weights`` oldest first, ``test_loss``,
        ``test_metric``, ``seconds`` of the method itself, ``eval_seconds``, ``num_averaged``,
        plus what the method learned, such as SeWA's ``probabilities`` and ``indices``) and the
        averaged model.
    """
    result = method.weights(trajectory, evaluator)
    start = time.perf_counter()
    model = averaged_model(task, trajectory, result.weights)
    if score is None:
        loss, metric = task.evaluate(model, split)
        scores: Mapping[str, Any] = {"test_loss": loss, "test_metric": metric}
    else:
        scores = score(model)
    bad = {k: v for k, v in scores.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise MethodError(f"the averaged model of {method.label} has non-finite scores {bad}: check the task's loss and metric")
    entry: dict[str, Any] = {
        "method": method.name,
        "settings": dict(method.settings),
        "weights": result.weights.tolist(),
        **scores,
        "seconds": result.seconds,
        "eval_seconds": time.perf_counter() - start,
        "num_averaged": int((result.weights > 0).sum()),
    }
    for key, value in result.info.items():
        if key not in method.settings:
            entry.setdefault(key, value)
    return entry, model


def run_compare(
    trajectory: Trajectory,
    task: Task,
    *,
    methods: Sequence[MethodSpec] | Mapping[str, MethodSpec] = DEFAULT_METHODS,
    objective: str = "val",
    checkpoints: Sequence[str] | None = None,
    progress: bool | None = False,
    on_error: str = "raise",
    score: Score | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Runs ``methods`` on ``trajectory`` and evaluates each averaged model.

    Args:
        trajectory: The snapshots, oldest first (the order of ``checkpoints``).
        task: Model, batches, loss and optional metric.
        methods: Method objects (``sewa.methods.lawa(top_k=5)``), registry names, or a
            ``{label: method}`` mapping.
        objective: The split the learning methods select on: ``"val"`` or ``"train"``.
        checkpoints: One label per snapshot (file paths); default ``"step N"``.
        progress: Progress bars (``None``: only on a terminal).
        on_error: ``"raise"``: a method that fails (e.g. on a non-finite loss) stops the run;
            ``"record"``: its entry gets ``null`` scores and an ``error`` message, and the others run.
        score: ``score(model) -> {"test_loss": ..., "test_metric": ..., ...}`` in place of the
            task's evaluation on its test split (see :func:`evaluate_method`).
        **settings: Settings for the methods given by name (e.g. ``top_k=10, seed=0``), each
            passed to the constructors that take it.

    Returns:
        The results dict: ``methods`` (one entry per label, see :func:`evaluate_method`),
        ``checkpoints``, ``checkpoint_steps``, ``split``, ``objective``, ``top_k`` and ``seed``
        (when the methods share one) and the machine used.
    """
    chosen = build_methods(methods, **settings)
    n = len(trajectory)
    for m in chosen.values():
        if m.top_k is not None:
            check_top_k(m.top_k, n)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    labels = [f"step {s}" for s in trajectory.steps] if checkpoints is None else [str(c) for c in checkpoints]
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} checkpoint labels for {n} snapshots")
    split = task.eval_split()
    model = task.new_model()
    trajectory.check_compatible(model)
    evaluator = None
    if any(m.evaluates for m in chosen.values()):
        evaluator = task.evaluator(objective, f"to select checkpoints (--objective {objective})", progress=progress)
    start = time.perf_counter()
    entries: dict[str, Any] = {}
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    for label, m in _bar(chosen.items(), progress):
        try:
            entries[label], _ = evaluate_method(m, trajectory, evaluator, task, split, score)
        except ValueError as e:
            if on_error == "raise":
                raise
            entries[label] = {"method": m.name, "settings": dict(m.settings), "weights": None, "test_loss": None,
                              "test_metric": None, "error": str(e)}
    return {
        "format": FORMAT,
        "task": task.source,
        "metric_name": task.metric_name if task.metric is not None else None,
        "split": split,
        "objective": objective,
        "checkpoints": labels,
        "checkpoint_steps": trajectory.steps,
        "top_k": _shared(chosen, "top_k"),
        "seed": _shared(chosen, "seed"),
        "batchnorm_recomputed": has_batchnorm(model),
        "methods": entries,
        "seconds": time.perf_counter() - start,
        "environment": environment(),
    }


def _shared(methods: Mapping[str, Method], key: str) -> Any:
    """The value of setting ``key`` when every method that has it agrees, else ``None``."""
    values = {repr(m.settings[key]): m.settings[key] for m in methods.values() if key in m.settings}
    return next(iter(values.values())) if len(values) == 1 else None


def _bar(items: Any, enabled: bool | None) -> Any:
    if enabled is False:
        return items
    from tqdm.auto import tqdm

    return tqdm(list(items), desc="methods", leave=False, disable=None if enabled is None else not enabled)
