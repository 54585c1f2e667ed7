"""Training regimes of the experiments: a learning-rate schedule, and where the window sits in it.

Every regime trains ``total`` optimizer updates (update ``i`` is the ``i``-th, from 0) and records
the window over the last ``span = window · every`` of them (updates ``total - span .. total - 1``).
The learning rate of update ``i`` is ``lr · f(i)``, with an optional linear warmup
``f(i) = (i + 1) / warmup`` for ``i < warmup`` and otherwise:

- ``constant``: ``f(i) = 1``; the window is a constant-LR tail (a warmup-stable-decay run's
  stable phase, had it not decayed yet).
- ``cosine``: ``f(i) = (1 + cos(π · (i - warmup) / (total - warmup))) / 2``, decaying to ~0 at the
  end; the window holds the end of the decay.
- ``wsd``: warmup, stable at 1, then a linear decay over exactly the window,
  ``f(i) = (total - i) / span`` for ``i >= total - span``; the window spans the whole decay.
- ``unstable-shard``: constant, but the training targets of updates ``[a, b)`` are permuted within
  each batch (a corrupted data shard: labels shuffled, or BC actions paired with the wrong
  states), where ``a = total - span + ⌊0.3 · span⌋`` and ``b = total - span + ⌊0.5 · span⌋``: the
  snapshots from 30% to 50% of the window are trained on it, and the later ones recover.

The schedule is a :class:`torch.optim.lr_scheduler.LambdaLR` over :meth:`Regime.lr_factor`,
stepped once after every optimizer update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["REGIMES", "Regime", "make_regime"]

REGIMES = ("constant", "cosine", "wsd", "unstable-shard")
# Where the corrupted stretch of ``unstable-shard`` sits, as fractions of the window.
SHARD = (0.3, 0.5)


@dataclass(frozen=True)
class Regime:
    """A learning-rate schedule over ``total`` updates and the window recorded at its end.

    Attributes:
        name: One of :data:`REGIMES`.
        total: Optimizer updates of the whole run.
        span: Updates covered by the window (``window · every``), the last ``span`` of the run.
        every: Updates between two snapshots.
        warmup: Updates of linear warmup at the start (0: none).
    """

    name: str
    total: int
    span: int
    every: int
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.name not in REGIMES:
            raise ValueError(f"unknown regime {self.name!r}: choose from {', '.join(REGIMES)}")
        if not 0 < self.span <= self.total:
            raise ValueError(f"the window's {self.span} updates do not fit in a run of {self.total}")
        if not 0 <= self.warmup < self.total - (self.span if self.name == "wsd" else 0):
            raise ValueError(f"warmup of {self.warmup} updates leaves no {self.name} phase in a run of {self.total}")

    @property
    def start(self) -> int:
        """The first update of the window (snapshot ``j`` is taken after ``start + (j + 1) · every`` updates)."""
        return self.total - self.span

    def lr_factor(self, i: int) -> float:
        """``f(i)``: the learning rate of update ``i`` over the peak learning rate."""
        if i < self.warmup:
            return (i + 1) / self.warmup
        if self.name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * (i - self.warmup) / (self.total - self.warmup)))
        if self.name == "wsd" and i >= self.start:
            return (self.total - i) / self.span
        return 1.0

    def scheduler(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        """The schedule as a torch scheduler: step it once after each ``optimizer.step()``."""
        return LambdaLR(optimizer, self.lr_factor)

    def corrupted(self) -> tuple[int, int] | None:
        """The updates ``[a, b)`` trained on corrupted targets, or ``None``."""
        if self.name != "unstable-shard":
            return None
        return self.start + int(SHARD[0] * self.span), self.start + int(SHARD[1] * self.span)

    def targets(self, i: int, y: Tensor, seed: int) -> Tensor:
        """The targets update ``i`` trains on: ``y``, or ``y`` permuted within the batch inside the corrupted stretch."""
        stretch = self.corrupted()
        if stretch is None or not stretch[0] <= i < stretch[1]:
            return y
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i))
        return y[torch.randperm(len(y), generator=g)]

    def snapshots_after(self, update: int) -> int:
        """Index in the window of the first snapshot taken after ``update`` (updates counted from 0)."""
        return max(0, (update - self.start) // self.every)

    def note(self) -> str:
        """One sentence saying where the window sits in the schedule."""
        first, last = self.lr_factor(self.start), self.lr_factor(self.total - 1)
        where = (f"the window holds updates {self.start + 1}-{self.total} of {self.total} "
                 f"(a snapshot every {self.every}), LR {100 * first:.1f}% -> {100 * last:.1f}% of its peak")
        if self.name == "constant":
            return f"constant LR: {where}: a constant-LR tail (the stable phase of warmup-stable-decay)"
        if self.name == "cosine":
            return f"cosine decay to 0 over the whole run: {where}: the end of the decay"
        if self.name == "wsd":
            return f"warmup-stable-decay, linear decay over the window only: {where}: the window spans the whole decay"
        a, b = self.corrupted() or (0, 0)
        j, k = self.snapshots_after(a), self.snapshots_after(b)
        return (f"constant LR with a corrupted shard: {where}; updates {a + 1}-{b} train on targets permuted within "
                f"each batch, so window snapshots {j}-{k - 1} (0 = oldest) are taken inside the corrupted stretch")

    def describe(self) -> dict[str, Any]:
        """JSON-ready settings, the corrupted stretch and the LR at the window's ends."""
        stretch = self.corrupted()
        return {"name": self.name, "total_updates": self.total, "window_updates": [self.start + 1, self.total],
                "warmup": self.warmup, "lr_factor_window": [self.lr_factor(self.start), self.lr_factor(self.total - 1)],
                "corrupted_updates": None if stretch is None else [stretch[0] + 1, stretch[1]],
                "corrupted_snapshots": None if stretch is None else
                [self.snapshots_after(stretch[0]), self.snapshots_after(stretch[1]) - 1]}


def make_regime(name: str, total: int, window: int, every: int, warmup: float = 0.0) -> Regime:
    """The regime ``name`` for a run of ``total`` updates recording ``window`` snapshots every
    ``every`` updates at its end; ``warmup`` is a fraction of ``total``."""
    return Regime(name, total, window * every, every, int(round(warmup * total)))
