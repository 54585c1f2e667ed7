"""Training-framework callbacks: record a trajectory during training, average it at the end.

Each framework has its own module, imported on demand, so ``import sewa`` imports neither::

    from sewa.integrations.lightning import SeWACallback      # PyTorch Lightning
    from sewa.integrations.transformers import SeWACallback   # Hugging Face Trainer

What they share lives here, free of any framework import: when to record (every ``every``
optimizer steps, from ``start`` on) and what to do when training ends (choose weights with SeWA
or a baseline rule from :mod:`sewa.methods`, load the average into the model, recompute
BatchNorm statistics).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..average import apply
from ..bn import has_batchnorm, update_bn
from ..methods import METHODS, NEEDS_EVALUATION, Context, MethodResult, run_method
from ..select import Selection, select
from ..trajectory import Trajectory

__all__ = ["AveragingCallbackBase", "MappedBatches"]

Batches = Iterable[Any]
_USES_TOP_K = ("sewa", "lawa", "random")
LossFn = Callable[[Any, Any], Tensor]


class MappedBatches:
    """A re-iterable view of ``batches`` with ``fn`` applied to each batch.

    Unlike a generator it can be iterated many times (the selection cycles its batches), and
    it never holds more than one batch.
    """

    def __init__(self, batches: Batches, fn: Callable[[Any], Any]) -> None:
        self.batches = batches
        self.fn = fn

    def __iter__(self) -> Iterator[Any]:
        return map(self.fn, self.batches)


def recompute_bn(model: nn.Module, pairs: Batches, max_batches: int | None = None) -> None:
    """:func:`sewa.update_bn` over the inputs of ``(inputs, targets)`` pairs, whatever their
    structure (a tensor, a tuple of positional inputs, or a dict of keyword inputs)."""
    update_bn(model, itertools.islice(pairs, max_batches))


class AveragingCallbackBase:
    """What the framework callbacks share: the recording schedule and the end-of-training average.

    A framework callback calls :meth:`_begin` when training starts, :meth:`_record` after every
    optimizer step, and :meth:`_finish` when training ends. See the framework modules for the
    arguments.
    """

    def __init__(
        self,
        window: int = 20,
        *,
        top_k: int = 5,
        every: int = 1,
        start: int | float = 0,
        dtype: torch.dtype | str = torch.float32,
        buffers: bool = False,
        device: torch.device | str = "cpu",
        method: str | None = "sewa",
        seed: int = 0,
        ema_decay: float = 0.9,
        select_options: dict[str, Any] | None = None,
        load: bool = True,
        bn: bool = True,
        bn_max_batches: int | None = None,
        trajectory: Trajectory | None = None,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer (record every N optimizer steps), got {every!r}")
        if isinstance(start, bool) or not isinstance(start, (int, float)):
            raise TypeError(f"start must be a step (int) or a fraction of training (float in [0, 1)), got {start!r}")
        if isinstance(start, float) and not 0.0 <= start < 1.0:
            raise ValueError(f"start as a fraction of training must lie in [0, 1), got {start}; pass an int for a step")
        if isinstance(start, int) and start < 0:
            raise ValueError(f"start must be a non-negative step, got {start}")
        if method is not None and method not in METHODS:
            raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}, or None to only record")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if select_options and ("top_k" in select_options or "seed" in select_options):
            raise ValueError("pass top_k and seed as arguments of the callback, not in select_options")
        self.window = window
        self.top_k = top_k
        self.every = every
        self.start = start
        self.dtype = dtype
        self.buffers = buffers
        self.device = device
        self.method = method
        self.seed = seed
        self.ema_decay = ema_decay
        self.select_options = dict(select_options or {})
        self.load = load
        self.bn = bn
        self.bn_max_batches = bn_max_batches
        self.trajectory: Trajectory | None = trajectory
        self._own_trajectory = trajectory is None
        self.start_step: int | None = None
        self.selection: Selection | None = None
        self.result: MethodResult | None = None

    @property
    def needs_evaluation(self) -> bool:
        """Whether the end-of-training method evaluates averaged models (needs a loss and data)."""
        return self.method == "sewa" or self.method in NEEDS_EVALUATION

    # ----------------------------------------------------------------- recording
    def _begin(self, model: nn.Module, total_steps: Callable[[], float | int | None]) -> None:
        """Resolves the start step and creates (or checks) the trajectory."""
        if isinstance(self.start, float):
            total = total_steps()
            if total is None or not math.isfinite(total) or total <= 0:
                raise ValueError(f"start={self.start} is a fraction of training, but the number of optimizer steps is unknown "
                                 f"({total}): pass start as a step (int)")
            self.start_step = math.ceil(self.start * total)
        else:
            self.start_step = self.start
        # Each run records afresh into a trajectory of its own; a trajectory given by the user
        # keeps its snapshots (to record across runs, or into storage the user chose).
        if self._own_trajectory:
            self.trajectory = Trajectory(model, self.window, dtype=self.dtype, buffers=self.buffers, device=self.device)
        else:
            assert self.trajectory is not None
            self.trajectory.check_compatible(model)
        self.selection = None
        self.result = None

    def _record(self, model: nn.Module, step: int) -> bool:
        """Pushes a snapshot if ``step`` (optimizer steps done) is due; returns whether it did."""
        assert self.trajectory is not None and self.start_step is not None, "_begin was not called"
        if step < self.start_step or step % self.every:
            return False
        self.trajectory.push(model, step)
        return True

    # ----------------------------------------------------------------- end of training
    def _finish(
        self,
        model: nn.Module,
        *,
        loss_fn: Callable[[], LossFn],
        selection_batches: Callable[[], Batches],
        bn_batches: Callable[[], Batches],
    ) -> MethodResult | None:
        """Chooses weights with :attr:`method`, loads the average and recomputes BatchNorm.

        The three callables are only called when needed: the loss and selection split when the
        method evaluates, the training batches when the model has BatchNorm.
        """
        traj = self.trajectory
        if self.method is None or traj is None:
            return None
        if len(traj) == 0:
            warnings.warn(f"sewa: no snapshot was recorded (start step {self.start_step}, every {self.every}): "
                          "nothing to average; the model keeps its final weights", stacklevel=2)
            return None
        top_k = min(self.top_k, len(traj))
        if top_k < self.top_k and self.method in _USES_TOP_K:
            warnings.warn(f"sewa: top_k={self.top_k} but only {len(traj)} snapshots were recorded: using top_k={top_k}",
                          stacklevel=2)
        weights = _from_rank_zero(lambda: self._weights(traj, model, top_k, loss_fn, selection_batches))
        if self.load:
            apply(model, traj, weights, bn_batches=False)
            if self.bn and has_batchnorm(model):
                recompute_bn(model, bn_batches(), self.bn_max_batches)
        return self.result

    def _weights(self, traj: Trajectory, model: nn.Module, top_k: int, loss_fn: Callable[[], LossFn],
                 selection_batches: Callable[[], Batches]) -> Tensor:
        loss, batches = (loss_fn(), selection_batches()) if self.needs_evaluation else (None, None)
        if self.method == "sewa":
            assert loss is not None and batches is not None
            self.selection = select(traj, model, loss, batches, top_k=top_k, seed=self.seed, **self.select_options)
            sel = self.selection
            self.result = MethodResult("sewa", sel.weights, sel.seconds,
                                       {"indices": sel.indices, "steps": sel.steps, "probabilities": sel.probabilities.tolist()})
        else:
            ctx = Context(traj, top_k=top_k, seed=self.seed, ema_decay=self.ema_decay, model=model, loss_fn=loss,
                          batches=batches, select_options=self.select_options)
            self.result = run_method(str(self.method), ctx)
        return self.result.weights


def _from_rank_zero(compute: Callable[[], Tensor]) -> Tensor:
    """Runs ``compute`` on rank 0 only and hands its result to every rank, so that all ranks load
    the same average (each rank sees a different shard of the selection split)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()
    box: list[Any] = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
