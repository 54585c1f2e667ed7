"""How ``auto`` scores its candidates (:mod:`sewa.auto`): per batch and per slice of each batch,
out of fold for the candidates that learn, and the fold and paired statistics of the choice."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .evaluator import EvaluationError, Evaluator, Scores
from .trajectory import Trajectory

# Each batch's examples are also scored in up to this many slices: the paired standard error
# then rests on hundreds of units however the split was batched.
GROUPS = 64

Units = tuple[Tensor, Tensor | None, Tensor]  # loss, metric and examples of each slice of the split


@dataclass
class Candidate:
    """One candidate weight vector and its per-batch scores (out-of-fold when it learns)."""

    name: str
    family: str
    complexity: tuple[int, float]
    weights: Tensor
    params: dict[str, Any]
    loss: Tensor
    metric: Tensor | None
    units: Units
    fits: tuple[Tensor, Tensor] | None = None  # the fits on each half, when cross-fitted


def fold_ids(num_batches: int, folds: int, seed: int) -> Tensor:
    """Fold of each batch: position in a ``seed``-ed permutation, modulo ``min(folds, num_batches)``."""
    perm = torch.randperm(num_batches, generator=torch.Generator().manual_seed(int(seed)))
    out = torch.empty(num_batches, dtype=torch.long)
    out[perm] = torch.arange(num_batches) % max(1, min(folds, num_batches))
    return out


def balanced_halves(sizes: Tensor, seed: int) -> Tensor:
    """Half (0 or 1) of each batch, the two halves as equal in examples as whole batches allow:
    in a ``seed``-ed order, largest batch first, each batch joins the half with fewer examples."""
    order = torch.randperm(sizes.numel(), generator=torch.Generator().manual_seed(int(seed) + 1))
    order = order[torch.argsort(sizes[order], descending=True, stable=True)]
    half = torch.zeros(sizes.numel(), dtype=torch.long)
    held = [0.0, 0.0]
    for i in order.tolist():
        side = 0 if held[0] <= held[1] else 1
        half[i] = side
        held[side] += float(sizes[i])
    return half


class Scorer:
    """Scores weight vectors on the split once each (cached by weights), counting batch passes."""

    def __init__(self, evaluator: Evaluator, trajectory: Trajectory) -> None:
        self.evaluator, self.trajectory = evaluator, trajectory
        self.cache: dict[tuple[bool, tuple[float, ...]], Scores | None] = {}
        self.forward = 0

    def __call__(self, w: Tensor, sliced: bool = True) -> Scores | None:
        """Scores of weights ``w``; with ``sliced`` also per slice of each batch (for standard
        errors; greedy soup's many trial soups need only the batch means)."""
        key = (sliced, tuple(round(v, 12) for v in w.tolist()))
        if key not in self.cache:
            try:
                self.cache[key] = self.evaluator.per_batch(self.trajectory, w, groups=GROUPS if sliced else 0)
            except EvaluationError:  # a non-finite average is no candidate
                self.cache[key] = None
            self.forward += self.evaluator.num_batches(self.trajectory)
        return self.cache[key]


def fold_means(values: Tensor, sizes: Tensor, ids: Tensor, folds: int) -> Tensor:
    return torch.stack([(values[ids == f] * sizes[ids == f]).sum() / sizes[ids == f].sum() for f in range(folds)])


def mean_se(d: Tensor) -> dict[str, Any]:
    se = float(d.std(unbiased=True) / math.sqrt(d.numel())) if d.numel() > 1 else None
    return {"mean": float(d.mean()), "se": se}


def paired_gap(d: Tensor, sizes: Tensor) -> dict[str, Any]:
    """Size-weighted mean of per-batch differences ``d`` and its standard error over the batches."""
    p = sizes / sizes.sum()
    mean = (p * d).sum()
    b = d.numel()
    se = float(((p * (d - mean)) ** 2).sum().mul(b / (b - 1)).sqrt()) if b > 1 else None
    return {"mean": float(mean), "se": se}


def greedy_cost(scorer: Scorer, objective: str) -> Callable[[Tensor], tuple[float, float]]:
    """Greedy soup's yardstick on the scorer's batches: minus the metric, then the loss (for
    ties); or the loss."""

    def cost(w: Tensor) -> tuple[float, float]:
        s = scorer(w, sliced=False)
        if s is None:
            return math.inf, math.inf
        if objective == "loss" or s.metric is None:
            return s.mean("loss"), 0.0
        return -s.mean("metric"), s.mean("loss")

    return cost


def units_of(groups: list[Units | None], loss: Tensor, metric: Tensor | None, sizes: Tensor) -> Units:
    """The slices of every batch, in batch order; the batches themselves when one cannot be sliced."""
    if any(g is None for g in groups):
        return loss, metric, sizes
    parts = [g for g in groups if g is not None]
    return (torch.cat([g[0] for g in parts]), None if metric is None else torch.cat([g[1] for g in parts if g[1] is not None]),
            torch.cat([g[2] for g in parts]))


def scored_of(scores: Scores | None) -> tuple[Tensor, Tensor | None, Units] | None:
    if scores is None:
        return None
    return scores.loss, scores.metric, units_of(scores.groups or [None], scores.loss, scores.metric, scores.sizes)


def crossfitted(halves: tuple[Scorer, Scorer], where: tuple[Tensor, Tensor], fits: tuple[Tensor, Tensor],
                 num: int) -> tuple[Tensor, Tensor | None, Units] | None:
    """Per-batch loss and metric over the whole split (``num`` batches), and its slices, each half
    scored by the fit on the other: ``fits[h]`` was fitted on ``halves[h]``, whose batches sit at ``where[h]``."""
    scored = [halves[h](fits[1 - h]) for h in (0, 1)]
    if scored[0] is None or scored[1] is None:
        return None
    loss = torch.empty(num, dtype=torch.float64)
    sizes = torch.empty(num, dtype=torch.float64)
    metric = None if scored[0].metric is None else torch.empty(num, dtype=torch.float64)
    groups: list[Units | None] = [None] * num
    for h, sc in enumerate(scored):
        assert sc is not None
        loss[where[h]], sizes[where[h]] = sc.loss, sc.sizes
        if metric is not None and sc.metric is not None:
            metric[where[h]] = sc.metric
        for j, i in enumerate(where[h].tolist()):
            groups[i] = sc.groups[j] if sc.groups else None
    return loss, metric, units_of(groups, loss, metric, sizes)


def statistics(candidates: list[Candidate], sizes: Tensor, ids: Tensor, folds: int,
               objective: str) -> dict[str, dict[str, Any]]:
    """Scores of every candidate (batch sizes ``sizes``): the size-weighted mean of the objective
    (and of the loss, for ties) over the split, its fold means, and its values per slice."""
    out = {}

    def mean(v: Tensor) -> float:
        return float((v * sizes).sum() / sizes.sum())

    for c in candidates:
        u = c.metric if objective == "metric" and c.metric is not None else -c.loss
        unit_u = c.units[1] if objective == "metric" and c.units[1] is not None else -c.units[0]
        out[c.name] = {"fold": fold_means(u, sizes, ids, folds), "unit": unit_u, "unit_loss": c.units[0],
                       "key": (mean(u), -mean(c.loss)),
                       "loss": mean(c.loss), "metric": None if c.metric is None else mean(c.metric)}
    return out
