"""Training-framework callbacks: record a trajectory during training, average it at the end.

Each framework has its own module, imported on demand, so ``import sewa`` imports neither::

    from sewa.integrations.lightning import SeWACallback      # PyTorch Lightning
    from sewa.integrations.transformers import SeWACallback   # Hugging Face Trainer

What they share lives here, free of any framework import: a :class:`sewa.Recorder` (every ``every``
optimizer steps, from ``start`` on) and what to do when training ends (choose weights with a
method object of :mod:`sewa.methods`, SeWA by default, load the average into the model,
recompute BatchNorm statistics).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..average import apply
from ..bn import has_batchnorm, update_bn
from ..methods import Evaluator, Method, MethodResult, create
from ..recording import Recorder
from ..select import Selection
from ..trajectory import Trajectory

__all__ = ["AveragingCallbackBase", "MappedBatches"]

Batches = Iterable[Any]
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
    """What the framework callbacks share: a :class:`sewa.Recorder` on the trajectory, and the
    end-of-training average chosen by a method object.

    A framework callback calls :meth:`_begin` when training starts, :meth:`_record` after every
    optimizer step, and :meth:`_finish` when training ends.

    Args:
        window: Snapshots kept (paper's ``k``); older ones are dropped.
        method: What to do at the end: a method object (``sewa.methods.sewa(top_k=5, steps=100)``,
            ``sewa.methods.lawa(top_k=10)``, ...), a registry name for its defaults (``"sewa"``,
            ``"uniform"``, ``"ema"``, ...), or ``None`` to only record. A ``top_k`` above the
            number of snapshots recorded is lowered to it, with a warning.
        every: Record every ``every`` optimizer steps.
        start: First step to record: a step (int), or a fraction of training (float in
            ``[0, 1]``) of the optimizer steps the framework plans.
        dtype: Storage dtype of the trajectory (``float32``, ``bfloat16``, ``float16``); default:
            the model's floating dtype.
        buffers: Also record floating-point buffers.
        device: Where the trajectory lives (and where the selection computes).
        load: Load the average into the model (else only :attr:`result` is set).
        bn: Recompute BatchNorm statistics after loading, when the model has BatchNorm.
        bn_max_batches: Use at most this many training batches for that (default: all).
        trajectory: Record into this trajectory instead of a new one per run (e.g. to keep
            recording across several runs).
        vectorize: Run the selection's mask samples with ``vmap`` (see :func:`sewa.select`).
        progress: Show the selection's progress bar (``None``: only on a terminal).
    """

    def __init__(
        self,
        window: int = 20,
        *,
        method: Method | str | None = "sewa",
        every: int = 1,
        start: int | float = 0,
        dtype: torch.dtype | str | None = None,
        buffers: bool = False,
        device: torch.device | str = "cpu",
        load: bool = True,
        bn: bool = True,
        bn_max_batches: int | None = None,
        trajectory: Trajectory | None = None,
        vectorize: bool | None = None,
        progress: bool | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer (record every N optimizer steps), got {every!r}")
        if isinstance(start, bool) or not isinstance(start, (int, float)):
            raise TypeError(f"start must be a step (int) or a fraction of training (float in [0, 1]), got {start!r}")
        if isinstance(start, float) and not 0.0 <= start <= 1.0:
            raise ValueError(f"start as a fraction of training must lie in [0, 1], got {start}; pass an int for a step")
        if isinstance(start, int) and start < 0:
            raise ValueError(f"start must be a non-negative step, got {start}")
        self.method: Method | None = create(method) if isinstance(method, str) else method
        if self.method is not None and not isinstance(self.method, Method):
            raise TypeError(f"method must be a method object (e.g. sewa.methods.lawa(top_k=5)), a method name, or None "
                            f"to only record; got {type(method).__name__}")
        self.window = window
        self.every = every
        self.start = start
        self.dtype = dtype
        self.buffers = buffers
        self.device = device
        self.load = load
        self.bn = bn
        self.bn_max_batches = bn_max_batches
        self.vectorize = vectorize
        self.progress = progress
        self.trajectory: Trajectory | None = trajectory
        self._own_trajectory = trajectory is None
        self.recorder: Recorder | None = None
        self.selection: Selection | None = None
        self.result: MethodResult | None = None

    @property
    def start_step(self) -> int | None:
        """The first step that may be recorded (known once training has started)."""
        return None if self.recorder is None else self.recorder.start

    @property
    def needs_evaluation(self) -> bool:
        """Whether the end-of-training method evaluates averaged models (needs a loss and data)."""
        return self.method is not None and self.method.evaluates

    # ----------------------------------------------------------------- recording
    def _begin(self, model: nn.Module, total_steps: Callable[[], float | int | None]) -> None:
        """Creates (or checks) the trajectory and the recorder that fills it."""
        total: Any = None
        if isinstance(self.start, float):
            total = total_steps()
            if total is None or total <= 0 or total == float("inf"):
                raise ValueError(f"start={self.start} is a fraction of training, but the number of optimizer steps is unknown "
                                 f"({total}): pass start as a step (int)")
            total = int(total)
        # Each run records afresh into a trajectory of its own; a trajectory given by the user
        # keeps its snapshots (to record across runs, or into storage the user chose).
        if self._own_trajectory:
            self.trajectory = Trajectory(model, self.window, dtype=self.dtype, buffers=self.buffers, device=self.device)
        assert self.trajectory is not None
        self.recorder = Recorder(self.trajectory, model, every=self.every, start=self.start, total_steps=total,
                                 asynchronous=False)
        self.selection = None
        self.result = None

    def _record(self, model: nn.Module, step: int) -> bool:
        """Pushes a snapshot if ``step`` (optimizer steps done) is due; returns whether it did."""
        assert self.recorder is not None, "_begin was not called"
        return self.recorder.maybe_push(step)

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
        traj, method = self.trajectory, self.method
        if method is None or traj is None:
            return None
        if len(traj) == 0:
            warnings.warn(f"sewa: no snapshot was recorded (start step {self.start_step}, every {self.every}): "
                          "nothing to average; the model keeps its final weights", stacklevel=2)
            return None
        if method.top_k is not None and method.top_k > len(traj):
            warnings.warn(f"sewa: top_k={method.top_k} but only {len(traj)} snapshots were recorded: using top_k={len(traj)}",
                          stacklevel=2)
            method = method.replace(top_k=len(traj))
        weights = _from_rank_zero(lambda: self._weights(method, traj, model, loss_fn, selection_batches))
        if self.load:
            apply(model, traj, weights, bn_batches=False)
            if self.bn and has_batchnorm(model):
                recompute_bn(model, bn_batches(), self.bn_max_batches)
        return self.result

    def _weights(self, method: Method, traj: Trajectory, model: nn.Module, loss_fn: Callable[[], LossFn],
                 selection_batches: Callable[[], Batches]) -> Tensor:
        evaluator = None
        if method.evaluates:
            evaluator = Evaluator(model, loss_fn(), selection_batches(), vectorize=self.vectorize, progress=self.progress)
        self.result = method.weights(traj, evaluator)
        if method.name == "sewa":
            info = self.result.info
            self.selection = Selection(indices=info["indices"], probabilities=torch.tensor(info["probabilities"]),
                                       weights=self.result.weights, steps=info["chosen_steps"], history=info["history"],
                                       seconds=self.result.seconds, config=info["config"])
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
