"""The selection split, and how an average of snapshots is scored on it.

Methods that learn (greedy soup, the learned soup, SeWA, ``auto``) share one :class:`Evaluator`:
it holds the model, the loss, the optional metric and the selection batches, and scores any
weight vector exactly as :func:`sewa.select` computes its loss (the same engine: eval mode,
BatchNorm on batch statistics). Scores are batch-size-weighted means; :meth:`Evaluator.per_batch`
gives them batch by batch, for methods that cross-fit over folds of the split.

A *judge* scores what the split's batches cannot: the whole averaged model, one score per unit
(the return of each of a fixed set of rollout episodes, for a policy). It is costly, so ``auto``
calls it only on a few finalists (:meth:`Evaluator.judged`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import weights as rules
from ._batch import bounded, split_batch, to_device
from ._engine import MixedLoss
from .average import apply
from .bn import has_batchnorm
from .task import batch_size
from .trajectory import Trajectory

__all__ = ["Evaluator", "EvaluationError", "Scores", "make_evaluator"]


class EvaluationError(ValueError):
    """An average cannot be scored: an empty split, or a loss or metric that is not finite."""


@dataclass(frozen=True)
class Scores:
    """Per-batch scores of one average on the selection split.

    Attributes:
        loss: Mean loss of each batch (B,), float64.
        metric: Mean metric of each batch (B,), or ``None`` without a metric.
        sizes: Examples per batch (B,), float64.
        groups: With ``per_batch(..., groups=G)``: for each batch, ``(loss, metric, sizes)`` of up
            to ``G`` consecutive groups of its examples (``None`` where a batch's outputs and
            targets cannot be sliced along their first dimension). Scores at this grain give
            standard errors that do not depend on how the split was batched.
    """

    loss: Tensor
    metric: Tensor | None
    sizes: Tensor
    groups: list[tuple[Tensor, Tensor | None, Tensor] | None] | None = None

    def mean(self, which: str = "loss", batches: Tensor | None = None) -> float:
        """The size-weighted mean of ``"loss"`` or ``"metric"`` over all batches, or over the
        batch indices ``batches`` (a fold)."""
        values = self.loss if which == "loss" else self.metric
        if values is None:
            raise EvaluationError("this evaluator has no metric: pass metric= to score by it")
        sizes = self.sizes
        if batches is not None:
            values, sizes = values[batches], sizes[batches]
        return float((values * sizes).sum() / sizes.sum())


def _grouped(loss_fn: Callable[[Any, Any], Tensor], metric: Callable[[Any, Any], float] | None, out: Any, y: Any,
             groups: int) -> tuple[Tensor, Tensor | None, Tensor] | None:
    """Loss and metric of up to ``groups`` consecutive slices of one batch's examples, or ``None``
    when the outputs and targets are not tensors sharing their first dimension."""
    if not (isinstance(out, Tensor) and isinstance(y, Tensor) and out.dim() > 0 and y.dim() > 0 and out.shape[0] == y.shape[0]):
        return None
    bounds = torch.linspace(0, y.shape[0], min(groups, y.shape[0]) + 1).round().long().tolist()
    parts = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    loss = torch.tensor([float(loss_fn(out[a:b], y[a:b])) for a, b in parts], dtype=torch.float64)
    met = None if metric is None else torch.tensor([float(metric(out[a:b], y[a:b])) for a, b in parts], dtype=torch.float64)
    return loss, met, torch.tensor([float(b - a) for a, b in parts], dtype=torch.float64)


@dataclass(eq=False)
class Evaluator:
    """The selection split and how an average is scored on it.

    Args:
        model: A model of the trajectory's architecture (only its structure is used).
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``.
        batches: ``(inputs, targets)`` pairs of the selection split: a re-iterable (a list, a
            DataLoader) is streamed by the learning methods; scoring holds the batches in memory.
        metric: Optional ``metric(outputs, targets) -> float``, higher is better (accuracy).
        metric_name: How reports name the metric.
        batch_stats: Evaluate BatchNorm with batch statistics (see :func:`sewa.select`).
        vectorize: Passed to the engine (see :func:`sewa.select`).
        device: Where to compute; defaults to the trajectory's device.
        progress: Progress bars for the long methods (``None``: only on a terminal).
        judge: Optional ``judge(model) -> scores``, higher is better, one per unit (e.g. the
            return of each rollout episode): the task's real metric where the batches' metric
            cannot measure it. It must score the same units in the same order on every call (fixed
            reset seeds), so that two models' scores pair up.
        judge_name: How reports name the judge's score.
    """

    model: nn.Module
    loss_fn: Callable[[Any, Any], Tensor]
    batches: Iterable[Any]
    metric: Callable[[Any, Any], float] | None = field(default=None, kw_only=True)
    metric_name: str = field(default="metric", kw_only=True)
    batch_stats: bool = field(default=True, kw_only=True)
    vectorize: bool | None = field(default=None, kw_only=True)
    device: torch.device | str | None = field(default=None, kw_only=True)
    progress: bool | None = field(default=False, kw_only=True)
    judge: Callable[[nn.Module], Any] | None = field(default=None, kw_only=True)
    judge_name: str = field(default="judge", kw_only=True)

    def __post_init__(self) -> None:
        # A one-shot iterator is read once here; a re-iterable (a list, a DataLoader) is kept as
        # it is, so that the selection streams it instead of holding it in memory.
        if iter(self.batches) is self.batches:
            self.batches = list(bounded(self.batches, "the selection split"))
        if isinstance(self.batches, list) and not self.batches:
            raise EvaluationError("the selection split has no batches")
        self._held: tuple[Trajectory, MixedLoss, list[tuple[Any, Any]]] | None = None

    def engine_options(self) -> dict[str, Any]:
        """The keyword arguments every engine-based method passes on."""
        return {"batch_stats": self.batch_stats, "vectorize": self.vectorize, "device": self.device, "progress": self.progress}

    def _engine(self, trajectory: Trajectory) -> tuple[MixedLoss, list[tuple[Any, Any]]]:
        if self._held is None or self._held[0] is not trajectory:  # one engine, for the latest trajectory
            engine = MixedLoss(trajectory, self.model, self.loss_fn, batch_stats=self.batch_stats, device=self.device)
            pairs = [to_device(split_batch(b), engine.device) for b in bounded(self.batches, "the selection split")]
            if not pairs:
                raise EvaluationError("the selection split has no batches")
            self._held = (trajectory, engine, pairs)
        return self._held[1], self._held[2]

    def num_batches(self, trajectory: Trajectory) -> int:
        """How many batches the selection split holds."""
        return len(self._engine(trajectory)[1])

    @torch.no_grad()
    def per_batch(self, trajectory: Trajectory, w: Tensor, groups: int = 0) -> Scores:
        """Loss (and metric) of the average of ``trajectory`` with weights ``w``, batch by batch,
        and with ``groups > 0`` also for up to ``groups`` slices of each batch (:attr:`Scores.groups`).

        Raises:
            EvaluationError: if a loss or metric is not finite.
        """
        engine, pairs = self._engine(trajectory)
        flat = engine.mix_weights(rules.check_weights(w, len(trajectory)))
        losses, metrics, sizes = [], [], []
        grouped: list[tuple[Tensor, Tensor | None, Tensor] | None] = []
        for x, y in pairs:
            out = engine.outputs_of(flat, x)
            losses.append(float(self.loss_fn(out, y)))
            if self.metric is not None:
                metrics.append(float(self.metric(out, y)))
            sizes.append(batch_size(y))
            if groups > 0:
                grouped.append(_grouped(self.loss_fn, self.metric, out, y, groups))
        scores = Scores(torch.tensor(losses, dtype=torch.float64),
                        torch.tensor(metrics, dtype=torch.float64) if self.metric is not None else None,
                        torch.tensor(sizes, dtype=torch.float64), grouped if groups > 0 else None)
        bad = [name for name, v in (("loss", scores.loss), ("metric", scores.metric)) if v is not None and not bool(v.isfinite().all())]
        if bad:
            chosen = [i for i, v in enumerate(w.tolist()) if v > 0]
            value = scores.mean(bad[0]) if bad[0] == "loss" else float("nan")
            raise EvaluationError(f"the selection {bad[0]} of an average (snapshots {chosen}) is {value}: the task's "
                                  f"{bad[0]} is not finite on the selection split; check the {bad[0]} function and the data")
        return scores

    def judged(self, trajectory: Trajectory, w: Tensor) -> Tensor:
        """The judge's scores (float64, one per unit) of the average of ``trajectory`` with
        weights ``w``, loaded into a copy of the model in eval mode (BatchNorm statistics
        recomputed on the selection split).

        Raises:
            EvaluationError: without a judge, or when it returns no scores or one that is not finite.
        """
        if self.judge is None:
            raise EvaluationError("this evaluator has no judge: pass judge= to score whole models")
        model = copy.deepcopy(self.model)
        bn = list(bounded(self.batches, "the selection split")) if has_batchnorm(model) else None
        with torch.no_grad():
            scores = torch.as_tensor(self.judge(apply(model, trajectory, w, bn_batches=bn).eval()), dtype=torch.float64).flatten()
        if scores.numel() == 0 or not bool(scores.isfinite().all()):
            chosen = [i for i, v in enumerate(w.tolist()) if v > 0]
            raise EvaluationError(f"the judge ({self.judge_name}) gave {scores.tolist()} for an average (snapshots {chosen}): "
                                  "it must return one finite score per unit, e.g. the return of each rollout episode")
        return scores

    def loss(self, trajectory: Trajectory, w: Tensor) -> float:
        """Mean selection loss of the average of ``trajectory`` with weights ``w``."""
        return self.per_batch(trajectory, w).mean("loss")



def make_evaluator(trajectory: Trajectory, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], batches: Iterable[Any],
                   *, batch_stats: bool = True) -> Callable[[Tensor], float]:
    """``weights -> mean selection loss`` of the average (greedy soup's yardstick)."""
    ev = Evaluator(model, loss_fn, batches, batch_stats=batch_stats)
    return lambda w: ev.loss(trajectory, w)
