"""A registry of averaging methods by name, for the CLI and the experiments.

A method maps a :class:`Context` to weights over the held snapshots (plus JSON-ready details).
Rules that need no evaluation ignore the model, loss and batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import weights as rules
from ._engine import MixedLoss, to_device
from .select import select, trainable_average
from .trajectory import Trajectory

__all__ = ["Context", "MethodResult", "METHODS", "DEFAULT_METHODS", "NEEDS_EVALUATION", "register", "run_method", "make_evaluator"]


@dataclass
class Context:
    """Everything a method may use.

    Attributes:
        trajectory: The snapshots.
        top_k: ``K`` for LAWA, random-K and SeWA.
        seed: Seed for random-K and SeWA.
        ema_decay: Decay per snapshot for EMA.
        model: A model of the trajectory's architecture (needed by evaluating methods).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batches: The selection split (validation by default), ``(inputs, targets)`` pairs.
        select_options: Extra keyword arguments for :func:`sewa.select`.
    """

    trajectory: Trajectory
    top_k: int = 10
    seed: int = 0
    ema_decay: float = 0.9
    model: nn.Module | None = None
    loss_fn: Callable[[Any, Any], Tensor] | None = None
    batches: Iterable[Any] | None = None
    select_options: dict[str, Any] = field(default_factory=dict)
    _evaluate: Callable[[Tensor], float] | None = None

    def require_evaluation(self, method: str) -> None:
        if self.model is None or self.loss_fn is None or self.batches is None:
            raise ValueError(f"method {method!r} evaluates averaged models: it needs a model, a loss and selection batches (a task)")

    def evaluate(self, w: Tensor) -> float:
        """Loss of the average with weights ``w`` on the selection split."""
        if self._evaluate is None:
            self.require_evaluation("evaluate")
            self._evaluate = make_evaluator(self.trajectory, self.model, self.loss_fn, self.batches)  # type: ignore[arg-type]
        return self._evaluate(w)


@dataclass
class MethodResult:
    """Weights chosen by one method, how long it took, and method-specific details."""

    name: str
    weights: Tensor
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


Method = Callable[[Context], "tuple[Tensor, dict[str, Any]]"]
METHODS: dict[str, Method] = {}
NEEDS_EVALUATION: set[str] = set()
DEFAULT_METHODS = ("last", "uniform", "lawa", "ema", "random", "greedy_soup", "sewa")


def register(name: str, *, evaluates: bool = False) -> Callable[[Method], Method]:
    """Registers a method under ``name`` (``evaluates``: it needs a model, loss and batches)."""

    def deco(fn: Method) -> Method:
        METHODS[name] = fn
        if evaluates:
            NEEDS_EVALUATION.add(name)
        return fn

    return deco


def run_method(name: str, ctx: Context) -> MethodResult:
    """Runs the method registered as ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    if name in NEEDS_EVALUATION:
        ctx.require_evaluation(name)
    start = time.perf_counter()
    w, info = METHODS[name](ctx)
    return MethodResult(name, rules.check_weights(w, len(ctx.trajectory)), time.perf_counter() - start, info)


def make_evaluator(
    trajectory: Trajectory, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], batches: Iterable[Any], *, batch_stats: bool = True
) -> Callable[[Tensor], float]:
    """``weights -> mean loss over batches`` of the averaged model (weighted by batch size),
    evaluated exactly as :func:`sewa.select` evaluates (the same engine: eval mode, BatchNorm on
    batch statistics)."""
    engine = MixedLoss(trajectory, model, loss_fn, batch_stats=batch_stats)
    held = [(to_device(x, engine.device), to_device(y, engine.device)) for x, y in batches]
    if not held:
        raise ValueError("the selection split has no batches")

    @torch.no_grad()
    def evaluate(w: Tensor) -> float:
        mix = rules.check_weights(w, len(trajectory))[None]
        flat = engine.mix(mix[:, engine.inverse].to(engine.device, torch.float32))[0]
        total, count = 0.0, 0
        for x, y in held:
            size = len(y) if hasattr(y, "__len__") else 1
            total += float(engine._loss(flat, x, y)) * size
            count += size
        return total / count

    return evaluate


@register("last")
def _last(ctx: Context) -> tuple[Tensor, dict[str, Any]]:
    return rules.last(len(ctx.trajectory)), {}


@register("uniform")
def _uniform(ctx: Context) -> tuple[Tensor, dict[str, Any]]:
    return rules.uniform(len(ctx.trajectory)), {}


@register("lawa")
def _lawa(ctx: Context) -> tuple[Tensor, dict[str, Any]]:
    return rules.lawa(len(ctx.trajectory), ctx.top_k), {"top_k": ctx.top_k}


@register("ema")
def _ema(ctx: Context) -> tuple[Tensor, dict[str, Any]]:
    return rules.ema(len(ctx.trajectory), ctx.ema_decay), {"decay": ctx.ema_decay}


@register("random")
def _random(ctx: Context) -> tuple[Tensor, dict[str, Any]]:
    return rules.random_k(len(ctx.trajectory), ctx.top_k, ctx.seed), {"top_k": ctx.top_k, "seed": ctx.seed}


@register("greedy_soup", evaluates=True)
def _greedy_soup(ctx: Context) -> tuple[Tensor, dict[str, Any]]:
    w = rules.greedy_soup(len(ctx.trajectory), ctx.evaluate)
    return w, {"indices": w.nonzero().flatten().tolist()}


@register("sewa", evaluates=True)
def _sewa(ctx: Context) -> tuple[Tensor, dict[str, Any]]:
    options = {"top_k": ctx.top_k, "seed": ctx.seed} | ctx.select_options
    sel = select(ctx.trajectory, ctx.model, ctx.loss_fn, ctx.batches, **options)  # type: ignore[arg-type]
    info = {"probabilities": sel.probabilities.tolist(), "indices": sel.indices, "history": sel.history, "config": sel.config}
    return sel.weights, info


@register("twa", evaluates=True)
def _twa(ctx: Context) -> tuple[Tensor, dict[str, Any]]:
    keep = {k: v for k, v in ctx.select_options.items() if k in ("steps", "lr", "batch_stats", "vectorize", "device", "progress")}
    w = trainable_average(ctx.trajectory, ctx.model, ctx.loss_fn, ctx.batches, **keep)  # type: ignore[arg-type]
    return w, {}
