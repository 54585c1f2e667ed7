"""The task contract: what the post-hoc commands need to know about a user's training run.

A task is a Python file path or an importable module name that defines:

- ``model() -> torch.nn.Module``: a fresh model of the checkpoints' architecture;
- ``batches(split: str)``: an iterable of ``(inputs, targets)`` pairs, for ``split`` in
  ``"train"``, ``"val"``, ``"test"`` (a task may lack ``"test"``);
- ``loss(outputs, targets) -> Tensor``: a scalar;
- optionally ``metric(outputs, targets) -> float``, higher is better.

Losses and metrics are averaged over batches weighted by batch size. The demo and the
experiments build a :class:`Task` in memory from the same four functions.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Task", "TaskError", "load_task", "forward", "batch_size", "REQUIRED", "SPLITS"]

REQUIRED = ("model", "batches", "loss")
SPLITS = ("train", "val", "test")
# What a task's batches(split) may raise to say "I have no such split".
_NO_SPLIT = (KeyError, LookupError, ValueError, NotImplementedError)
_CONTRACT = "a task defines model(), batches(split) and loss(outputs, targets), optionally metric(outputs, targets)"


class TaskError(ValueError):
    """A task file or module does not meet the task contract."""


def forward(model: nn.Module, inputs: Any) -> Any:
    """Calls ``model`` on a tensor, a tuple of positional inputs, or a dict of keyword inputs
    (the same conventions as :func:`sewa.select`)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


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
    """

    model: Callable[[], nn.Module]
    batches: Callable[[str], Iterable[Any]]
    loss: Callable[[Any, Any], Tensor]
    metric: Callable[[Any, Any], float] | None = None
    source: str = "<in memory>"
    metric_name: str = "metric"

    def new_model(self) -> nn.Module:
        """A fresh model from ``model()``, checked to be an ``nn.Module`` with parameters."""
        net = self.model()
        if not isinstance(net, nn.Module):
            raise TaskError(f"task {self.source}: model() returned a {type(net).__name__}, expected a torch.nn.Module")
        if next(net.parameters(), None) is None:
            raise TaskError(f"task {self.source}: model() returned a module without parameters")
        return net

    def split(self, name: str) -> Iterable[Any] | None:
        """``batches(name)``, or ``None`` when the task has no such split (``batches`` returned
        ``None`` or raised ``KeyError``/``ValueError``/``NotImplementedError``)."""
        try:
            out = self.batches(name)
        except _NO_SPLIT:
            return None
        if out is None:
            return None
        if not isinstance(out, Iterable):
            raise TaskError(f"task {self.source}: batches({name!r}) returned a {type(out).__name__}, expected an iterable of (inputs, targets) pairs")
        return out

    def require(self, name: str, why: str) -> Iterable[Any]:
        """``batches(name)``, or a :class:`TaskError` saying the split is needed and why."""
        out = self.split(name)
        if out is None:
            raise TaskError(f"task {self.source} has no {name!r} split (batches({name!r}) gave none); it is needed {why}")
        return out

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
        except Exception as e:
            sys.modules.pop(name, None)
            raise TaskError(f"task file {spec} failed to import: {type(e).__name__}: {_first_line(e)}") from e
        return module
    if not spec.replace(".", "").replace("_", "").isalnum():
        raise TaskError(f"task {spec!r} is neither a .py file nor an importable module name")
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name is not None and spec.startswith(e.name):
            raise TaskError(f"no task module named {spec!r}: pass a path to a .py file or an importable module name") from e
        raise TaskError(f"task module {spec} failed to import: {_first_line(e)}") from e
    except Exception as e:
        raise TaskError(f"task module {spec} failed to import: {type(e).__name__}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_task(spec: str) -> Task:
    """Imports a task file (``path/to/task.py``) or module (``package.task``) and checks it.

    Raises:
        FileNotFoundError: if ``spec`` names a file that does not exist.
        TaskError: if it does not import, or lacks one of ``model``, ``batches``, ``loss``
            (or defines one of them, or ``metric``, as something not callable).
    """
    module = _import(spec)
    missing = [name for name in REQUIRED if not callable(getattr(module, name, None))]
    if missing:
        what = ", ".join(f"{m}()" for m in missing)
        raise TaskError(f"task {spec} does not define {what}: {_CONTRACT}")
    metric = getattr(module, "metric", None)
    if metric is not None and not callable(metric):
        raise TaskError(f"task {spec} defines metric as a {type(metric).__name__}, expected a function metric(outputs, targets) -> float")
    return Task(model=module.model, batches=module.batches, loss=module.loss, metric=metric, source=spec,
                metric_name="metric")
