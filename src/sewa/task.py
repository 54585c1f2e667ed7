"""The task contract: what the post-hoc commands need to know about a user's training run.

A task is a Python file path or an importable module name that defines:

- ``model() -> torch.nn.Module``: a fresh model of the checkpoints' architecture;
- ``batches(split: str)``: an iterable of ``(inputs, targets)`` pairs, for ``split`` in
  ``"train"``, ``"val"``, ``"test"`` (a task may lack ``"test"``);
- ``loss(outputs, targets) -> Tensor``: a scalar;
- optionally ``metric(outputs, targets) -> float``, higher is better, and ``METRIC_NAME``, the
  name reports give it (else the function's own name when it is more than ``metric``);
- optionally ``judge(model) -> scores``, higher is better, one per unit, the same units on every
  call (the returns of rollout episodes with fixed reset seeds), and ``JUDGE_NAME``: ``auto``
  checks its finalists with it (:class:`sewa.evaluator.Evaluator`).

Losses and metrics are averaged over batches weighted by batch size. The demo and the
experiments build a :class:`Task` in memory from the same four functions.

Every pass over a split calls ``batches(split)`` afresh, so ``batches`` must return a new
iterable on each call (a list, a ``DataLoader``, or a new generator); handing back the same
already-used iterator is refused. A pass reads at most :data:`MAX_BATCHES` batches, so an
endless iterable (``itertools.cycle``) fails with a :class:`TaskError` instead of filling memory.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._batch import MAX_BATCHES, forward

if TYPE_CHECKING:
    from .evaluator import Evaluator

__all__ = ["Task", "TaskError", "load_task", "forward", "batch_size", "REQUIRED", "SPLITS", "MAX_BATCHES"]

REQUIRED = ("model", "batches", "loss")
SPLITS = ("train", "val", "test")
# Metric function names that say nothing: reports call such a metric "metric".
_ANONYMOUS = ("metric", "<lambda>")
# What a task's batches(split) may raise to say "I have no such split".
_NO_SPLIT = (KeyError, LookupError, ValueError, NotImplementedError)
_CONTRACT = "a task defines model(), batches(split) and loss(outputs, targets), optionally metric(outputs, targets)"


class TaskError(ValueError):
    """A task file or module does not meet the task contract."""


def batch_size(targets: Any) -> int:
    """How many examples a batch holds, read from its targets (1 for a scalar target)."""
    if isinstance(targets, Tensor):
        return int(targets.shape[0]) if targets.dim() > 0 else 1
    if isinstance(targets, dict) and targets:
        return batch_size(next(iter(targets.values())))
    if isinstance(targets, (tuple, list)) and targets and isinstance(targets[0], Tensor):
        return batch_size(targets[0])
    return len(targets) if hasattr(targets, "__len__") else 1


@dataclass
class Task:
    """The four functions of the task contract, plus where they came from.

    Attributes:
        model: ``model() -> nn.Module``, a fresh model of the checkpoints' architecture.
        batches: ``batches(split) -> iterable of (inputs, targets)``.
        loss: ``loss(outputs, targets) -> scalar tensor``.
        metric: ``metric(outputs, targets) -> float`` (higher is better), or ``None``.
        source: The file or module it was loaded from (for reports).
        metric_name: How reports name the metric.
        max_batches: The most batches one pass may yield (:data:`MAX_BATCHES`).
        judge: ``judge(model) -> scores`` of whole models (see the module docstring), or ``None``.
        judge_name: How reports name the judge's score.
    """

    model: Callable[[], nn.Module]
    batches: Callable[[str], Iterable[Any]]
    loss: Callable[[Any, Any], Tensor]
    metric: Callable[[Any, Any], float] | None = None
    source: str = "<in memory>"
    metric_name: str = "metric"
    max_batches: int = MAX_BATCHES
    judge: Callable[[nn.Module], Any] | None = None
    judge_name: str = "judge"
    # The one-shot iterators batches(split) returned, per split, to refuse one handed back again.
    _seen: dict[str, list[Iterator[Any]]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def new_model(self) -> nn.Module:
        """A fresh model from ``model()``, checked to be an ``nn.Module`` with parameters."""
        net = self.model()
        if not isinstance(net, nn.Module):
            raise TaskError(f"task {self.source}: model() returned a {type(net).__name__}, expected a torch.nn.Module")
        if next(net.parameters(), None) is None:
            raise TaskError(f"task {self.source}: model() returned a module without parameters")
        return net

    def split(self, name: str) -> Iterable[Any] | None:
        """A fresh pass over ``batches(name)``, or ``None`` when the task has no such split
        (``batches`` returned ``None`` or raised ``KeyError``/``ValueError``/``NotImplementedError``).

        The pass yields at most :attr:`max_batches` batches and keeps the iterable's kind: a
        re-iterable (list, ``DataLoader``) stays re-iterable, a one-shot iterator stays one-shot.

        Raises:
            TaskError: if ``batches(name)`` returned something not iterable, or the same
                iterator it returned on an earlier call (it must return a fresh iterable).
        """
        try:
            out = self.batches(name)
        except _NO_SPLIT:
            return None
        if out is None:
            return None
        if not isinstance(out, Iterable):
            raise TaskError(f"task {self.source}: batches({name!r}) returned a {type(out).__name__}, expected an iterable of (inputs, targets) pairs")
        if isinstance(out, Iterator):  # one-shot; not iter(out), which would start a DataLoader's workers
            seen = self._seen.setdefault(name, [])
            if any(out is old for old in seen):
                raise TaskError(f"task {self.source}: batches({name!r}) returned the same {type(out).__name__} it returned before, "
                                "already (partly) used; batches(split) must return a fresh iterable on each call "
                                "(e.g. a list or a DataLoader, or a new generator)")
            seen.append(out)
            return self._bounded(out, name)
        return _Pass(self, out, name)

    def _bounded(self, batches: Iterable[Any], name: str) -> Iterator[Any]:
        """Yields ``batches``, refusing a batch past :attr:`max_batches` and a ``sys.exit``."""
        iterator = iter(batches)
        count = 0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except SystemExit as e:
                raise TaskError(f"task {self.source}: batches({name!r}) called sys.exit({e.code!r}) while being iterated; "
                                "a task must not exit the process") from None
            count += 1
            if count > self.max_batches:
                raise TaskError(f"task {self.source}: batches({name!r}) yielded more than {self.max_batches:,} batches in one pass "
                                "(sewa.task.MAX_BATCHES); is it endless (itertools.cycle)? Return a finite iterable, "
                                "e.g. one epoch of a DataLoader")
            yield batch

    def require(self, name: str, why: str) -> Iterable[Any]:
        """``batches(name)``, or a :class:`TaskError` saying the split is needed and why."""
        out = self.split(name)
        if out is None:
            raise TaskError(f"task {self.source} has no {name!r} split (batches({name!r}) gave none); it is needed {why}")
        return out

    def evaluator(self, split: str, why: str, **options: Any) -> Evaluator:
        """An :class:`~sewa.evaluator.Evaluator` over split ``split`` with this task's model, loss
        and metric (``options``: its engine settings, e.g. ``progress``)."""
        from .evaluator import Evaluator

        return Evaluator(self.new_model(), self.loss, self.require(split, why), metric=self.metric,
                         metric_name=self.metric_name, judge=self.judge, judge_name=self.judge_name, **options)

    def has_split(self, name: str) -> bool:
        """Whether ``batches(name)`` yields at least one well-formed batch (read once)."""
        out = self.split(name)
        if out is None:
            return False
        first = next(iter(out), None)
        if first is None:
            return False
        _check_pair(first, self.source, name)
        return True

    def check(self, name: str, why: str) -> None:
        """Raises a :class:`TaskError` unless split ``name`` has a well-formed first batch."""
        first = next(iter(self.require(name, why)), None)
        if first is None:
            raise TaskError(f"task {self.source}: batches({name!r}) yielded no batches; it is needed {why}")
        _check_pair(first, self.source, name)

    def eval_split(self) -> str:
        """``"test"`` when the task has it, else ``"val"``."""
        if self.has_split("test"):
            return "test"
        self.check("val", "to evaluate the averaged models when there is no 'test' split")
        return "val"

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> tuple[float, float | None]:
        """Loss and metric of ``model`` on ``split`` (eval mode), averaged over batches weighted
        by batch size. The metric is ``None`` when the task has none."""
        was_training = model.training
        model.eval()
        total_loss = total_metric = 0.0
        count = 0
        try:
            for batch in self.require(split, "for evaluation"):
                inputs, targets = _check_pair(batch, self.source, split)
                out = forward(model, inputs)
                n = batch_size(targets)
                total_loss += float(self.loss(out, targets)) * n
                if self.metric is not None:
                    total_metric += float(self.metric(out, targets)) * n
                count += n
        finally:
            model.train(was_training)
        if count == 0:
            raise TaskError(f"task {self.source}: batches({split!r}) yielded no batches")
        return total_loss / count, (total_metric / count if self.metric is not None else None)


class _Pass:
    """A re-iterable split: each iteration is one bounded pass over the task's iterable."""

    def __init__(self, task: Task, batches: Iterable[Any], name: str) -> None:
        self._task, self._batches, self._name = task, batches, name

    def __iter__(self) -> Iterator[Any]:
        return self._task._bounded(self._batches, self._name)


def _check_pair(batch: Any, source: str, split: str) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TaskError(f"task {source}: batches({split!r}) yields {type(batch).__name__} items, expected (inputs, targets) pairs")
    return batch[0], batch[1]


def _import(spec: str) -> Any:
    path = Path(spec)
    if spec.endswith(".py") or path.is_file() or "/" in spec or "\\" in spec:
        if not path.is_file():
            raise FileNotFoundError(f"no task file at {spec}")
        name = f"_sewa_task_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise TaskError(f"cannot import task file {spec}: it is not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        # Lets a task file import modules that sit beside it.
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except SystemExit as e:
            sys.modules.pop(name, None)
            raise TaskError(_exit_message(f"task file {spec}", e)) from None
        except Exception as e:
            sys.modules.pop(name, None)
            raise TaskError(f"task file {spec} failed to import: {type(e).__name__}: {_first_line(e)}") from e
        return module
    if not spec.replace(".", "").replace("_", "").isalnum():
        raise TaskError(f"task {spec!r} is neither a .py file nor an importable module name")
    try:
        return importlib.import_module(spec)
    except SystemExit as e:
        raise TaskError(_exit_message(f"task module {spec}", e)) from None
    except ModuleNotFoundError as e:
        if e.name is not None and spec.startswith(e.name):
            raise TaskError(f"no task module named {spec!r}: pass a path to a .py file or an importable module name") from e
        raise TaskError(f"task module {spec} failed to import: {_first_line(e)}") from e
    except Exception as e:
        raise TaskError(f"task module {spec} failed to import: {type(e).__name__}: {_first_line(e)}") from e


def _exit_message(what: str, e: SystemExit) -> str:
    return (f"{what} called sys.exit({e.code!r}) while being imported (argparse exits this way too); a task file "
            "must only define model(), batches(split), loss() and metric(): put script code under "
            "`if __name__ == \"__main__\":`")


def _guarded(fn: Callable[..., Any], name: str, source: str) -> Callable[..., Any]:
    """``fn``, with a ``sys.exit`` inside it turned into a :class:`TaskError` naming ``source``."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SystemExit as e:
            raise TaskError(f"task {source}: {name}() called sys.exit({e.code!r}); a task function must return or raise, "
                            "not exit the process") from None

    return call


def _metric_name(module: Any, metric: Callable[..., Any] | None, spec: str) -> str:
    """``METRIC_NAME`` if the module sets it, else the metric function's own name when it says
    more than "metric", else ``"metric"``."""
    name = getattr(module, "METRIC_NAME", None)
    if name is not None:
        if not isinstance(name, str) or not name.strip():
            raise TaskError(f"task {spec} sets METRIC_NAME to {name!r}, expected a non-empty string such as 'accuracy'")
        return name.strip()
    own = getattr(metric, "__name__", None)
    if isinstance(own, str) and own not in _ANONYMOUS and own.isidentifier():
        return own
    return "metric"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_task(spec: str) -> Task:
    """Imports a task file (``path/to/task.py``) or module (``package.task``) and checks it.

    The metric is named by the module's ``METRIC_NAME`` (e.g. ``"accuracy"``), else by the
    metric function's name unless that is ``metric`` or a lambda. A ``sys.exit`` while importing
    the module or inside its functions becomes a :class:`TaskError`; ``KeyboardInterrupt``
    propagates.

    Raises:
        FileNotFoundError: if ``spec`` names a file that does not exist.
        TaskError: if it does not import (or exits while importing), or lacks one of ``model``,
            ``batches``, ``loss`` (or defines one of them, or ``metric`` or ``judge``, as something not callable).
    """
    module = _import(spec)
    missing = [name for name in REQUIRED if not callable(getattr(module, name, None))]
    if missing:
        what = ", ".join(f"{m}()" for m in missing)
        raise TaskError(f"task {spec} does not define {what}: {_CONTRACT}")
    metric = getattr(module, "metric", None)
    if metric is not None and not callable(metric):
        raise TaskError(f"task {spec} defines metric as a {type(metric).__name__}, expected a function metric(outputs, targets) -> float")
    metric_name = _metric_name(module, metric, spec)
    judge = getattr(module, "judge", None)
    if judge is not None and not callable(judge):
        raise TaskError(f"task {spec} defines judge as a {type(judge).__name__}, expected a function judge(model) -> scores")
    judge_name = getattr(module, "JUDGE_NAME", "judge")
    if not isinstance(judge_name, str) or not judge_name.strip():
        raise TaskError(f"task {spec} sets JUDGE_NAME to {judge_name!r}, expected a non-empty string such as 'return'")
    return Task(model=_guarded(module.model, "model", spec), batches=_guarded(module.batches, "batches", spec),
                loss=_guarded(module.loss, "loss", spec), metric=None if metric is None else _guarded(metric, "metric", spec),
                source=spec, metric_name=metric_name, judge=None if judge is None else _guarded(judge, "judge", spec),
                judge_name=judge_name.strip())
