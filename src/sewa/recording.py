"""Recording a model into a trajectory while it trains.

Two lines in a plain PyTorch loop::

    traj = sewa.Trajectory(model, window=100)
    sewa.record(traj, optimizer, model, every=10, start=0.5, total_steps=10_000)

**Hook or explicit push?** In a hand-written loop either works:

* :func:`record` (an optimizer step hook) needs no change inside the loop and counts real
  optimizer steps, so steps skipped by a ``GradScaler`` or gradient accumulation are not
  counted. Use it when you cannot or do not want to edit the loop, or when the step counter
  should be the optimizer's.
* ``traj.push(model, step)`` (or :meth:`Recorder.maybe_push`) inside the loop is explicit: the
  recorded step is your own counter, and nothing happens behind your back. Prefer it when the
  loop already has a ``step`` variable you report against (logs, learning-rate schedule).

Both write straight into the trajectory's preallocated row (``torch._foreach_copy_`` into
views of one ``(window, P)`` matrix): nothing the size of the model is allocated per step.

When the model is on a GPU and the trajectory in CPU memory, :class:`Recorder` copies
asynchronously: the tensors go to one pinned staging buffer on a side CUDA stream, and the
host waits for that copy only when the snapshot is needed: at the next recording, or on
:meth:`Recorder.synchronize` / :meth:`Recorder.remove`, which push it into the trajectory.
**Call one of them before reading the trajectory**; until then its newest snapshot is in
flight. With the hook attached, the optimizer's next update waits on the GPU (not the host)
for the copy to finish, so the copy overlaps the next forward and backward passes.

``torch.compile``'d models (``_orig_mod.`` names) and DDP-wrapped models (``module.``)
are recorded under the plain parameter names, so either the wrapper or the bare model can be
passed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .trajectory import Trajectory

__all__ = ["Recorder", "record"]


def resolve_start(start: int | float, total_steps: int | None) -> int:
    """The first step that may be recorded, from an int step or a float fraction of training."""
    if isinstance(start, bool):
        raise TypeError(f"start must be an int step or a float fraction, got {start!r}")
    if isinstance(start, float):
        if not 0.0 <= start <= 1.0:
            raise ValueError(f"start={start} is a float, so it is read as a fraction of training and must lie in [0, 1]; pass an int for a step number")
        if total_steps is None or total_steps < 1:
            raise ValueError(f"start={start} is a fraction of training: also pass total_steps (a positive int), got {total_steps!r}")
        return math.ceil(start * total_steps)
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int step or a float fraction in [0, 1], got {start!r}")
    return start


class _AsyncCopy:
    """Snapshots a model into a staging buffer now and pushes it into the trajectory later.

    On CUDA: pinned host buffers, filled by non-blocking copies on a side stream; ``finish``
    waits on the copy's event and pushes. Elsewhere (used by the tests) the copy is
    synchronous and only the push is deferred.
    """

    def __init__(self, trajectory: Trajectory, model: nn.Module) -> None:
        self.trajectory = trajectory
        recorded, others = trajectory.check_compatible(model)
        sources = {**recorded, **others}
        self.device = next(iter(recorded.values())).device
        self.cuda = self.device.type == "cuda"
        self.names = list(sources)
        # Parameter dtype (not storage dtype): the push converts on the CPU, so the GPU does no
        # extra work and the staged copy can be checked like any state dict.
        self.staging = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda) for n, t in sources.items()}
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.event: Any = None
        self.pending: int | None = None

    def start(self, model: nn.Module, step: int, *, wait_on_gpu: bool) -> None:
        self.finish()
        recorded, others = self.trajectory.check_compatible(model)
        sources = {**recorded, **others}
        if list(sources) != self.names:
            raise RuntimeError("the model's tensors changed since recording started; start a new Recorder")
        dests = [self.staging[n] for n in self.names]
        srcs = [sources[n] for n in self.names]
        with torch.no_grad():
            if self.stream is not None:
                current = torch.cuda.current_stream(self.device)
                self.stream.wait_stream(current)  # the copy sees the finished optimizer update
                with torch.cuda.stream(self.stream):
                    for dest, src in zip(dests, srcs, strict=True):  # device -> pinned host, asynchronous
                        dest.copy_(src, non_blocking=True)
                    self.event = torch.cuda.Event()
                    self.event.record(self.stream)
                if wait_on_gpu:  # later kernels on the training stream must not modify params mid-copy
                    current.wait_event(self.event)
            else:
                torch._foreach_copy_(dests, srcs)
        self.pending = step

    def before_update(self) -> None:
        if self.event is not None and self.pending is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)

    def finish(self) -> None:
        if self.pending is None:
            return
        step, self.pending = self.pending, None
        if self.event is not None:
            self.event.synchronize()  # normally long done: a whole training step has passed
        self.trajectory.push(self.staging, step)


class Recorder:
    """Records ``model`` into ``trajectory`` at steps ``start, …`` that are multiples of ``every``.

    Step ``s`` is recorded when ``s >= start`` and ``s % every == 0`` (step ``s`` is the model
    after ``s`` optimizer updates). Use :meth:`maybe_push` from a loop, or :meth:`attach` (or
    :func:`record`) to count optimizer steps with a hook.

    Args:
        trajectory: Where snapshots go (a :class:`sewa.Trajectory` or a disk-backed one).
        model: The model, possibly wrapped by ``torch.compile`` or DDP.
        every: Record every ``every`` steps.
        start: First step that may be recorded: an int step, or a float in ``[0, 1]`` read as
            a fraction of ``total_steps`` (e.g. ``0.5`` records the second half of training).
        total_steps: Length of training; needed only for a fractional ``start``.
        asynchronous: Copy through pinned memory on a side stream and defer the push until the
            snapshot is needed. Default: on when the model is on CUDA and the trajectory is not.
            A snapshot in flight is finished by the next recording, :meth:`synchronize` and
            :meth:`remove`.
    """

    def __init__(self, trajectory: Trajectory, model: nn.Module, *, every: int = 1, start: int | float = 0,
                 total_steps: int | None = None, asynchronous: bool | None = None) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        trajectory.check_compatible(model)  # fail now, not inside the training loop
        self.trajectory = trajectory
        self.model = model
        self.every = every
        self.start = resolve_start(start, total_steps)
        if asynchronous is None:
            param = next(model.parameters())
            asynchronous = param.is_cuda and not trajectory.data.is_cuda and torch.cuda.is_available()
        self.asynchronous = asynchronous
        self._copy: _AsyncCopy | None = None
        self._handles: list[Any] = []
        self.step = 0
        self.recorded = 0

    def __repr__(self) -> str:
        return (f"Recorder(every={self.every}, start={self.start}, step={self.step}, recorded={self.recorded}, "
                f"asynchronous={self.asynchronous}, attached={bool(self._handles)})")

    def due(self, step: int) -> bool:
        """Whether ``step`` is one to record."""
        return step >= self.start and step % self.every == 0

    def maybe_push(self, step: int) -> bool:
        """Records the model as step ``step`` if :meth:`due`; returns whether it did."""
        if not self.due(step):
            return False
        self.push(step)
        return True

    def push(self, step: int) -> None:
        """Records the model now as step ``step``."""
        if self.asynchronous:
            if self._copy is None:
                self._copy = _AsyncCopy(self.trajectory, self.model)
            self._copy.start(self.model, step, wait_on_gpu=not self._handles)
        else:
            self.trajectory.push(self.model, step)
        self.recorded += 1

    def synchronize(self) -> None:
        """Waits for an asynchronous snapshot still in flight and pushes it into the trajectory."""
        if self._copy is not None:
            self._copy.finish()

    # ------------------------------------------------------------------ optimizer hook
    def attach(self, optimizer: torch.optim.Optimizer, *, initial_step: int = 0) -> Recorder:
        """Counts ``optimizer.step()`` calls with a step hook and records on the due steps.

        Args:
            optimizer: The optimizer updating ``model``.
            initial_step: Optimizer steps already taken (when resuming training).

        Returns:
            ``self``; call :meth:`remove` to detach.
        """
        if self._handles:
            raise RuntimeError("this Recorder is already attached to an optimizer; call remove() first")
        self.step = int(initial_step)
        held = self.trajectory.steps
        first = self._next_due(self.step + 1)
        if held and first <= held[-1]:
            raise ValueError(f"the trajectory already holds step {held[-1]} but counting starts at step "
                             f"{self.step}; pass initial_step= the optimizer steps already taken (>= {held[-1]})")
        self._handles.append(optimizer.register_step_post_hook(self._after_step))
        if self.asynchronous:
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        return self

    def _next_due(self, step: int) -> int:
        step = max(step, self.start)
        return step + (-step) % self.every

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._copy is not None:
            self._copy.before_update()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        self.maybe_push(self.step)

    def remove(self) -> None:
        """Detaches from the optimizer and finishes a snapshot still in flight."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.synchronize()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def record(trajectory: Trajectory, optimizer: torch.optim.Optimizer, model: nn.Module, *, every: int = 1,
           start: int | float = 0, total_steps: int | None = None, initial_step: int = 0,
           asynchronous: bool | None = None) -> Recorder:
    """Records ``model`` into ``trajectory`` after every ``every``-th ``optimizer.step()``.

    Step ``s`` (the model after ``s`` optimizer updates) is recorded when ``s >= start`` and
    ``s % every == 0``. See the module docstring for when to prefer explicit ``push`` calls.

    Args:
        trajectory: Where snapshots go.
        optimizer: The optimizer whose ``step()`` calls are counted.
        model: The model it updates (a ``torch.compile`` or DDP wrapper is fine).
        every: Record every ``every`` optimizer steps.
        start: First step that may be recorded (int), or a fraction of ``total_steps`` (float).
        total_steps: Length of training, for a fractional ``start``.
        initial_step: Optimizer steps already taken, when resuming.
        asynchronous: See :class:`Recorder`.

    Returns:
        The attached :class:`Recorder`; ``.remove()`` detaches it (also usable as a context
        manager), ``.synchronize()`` finishes an asynchronous copy in flight.

    Example:
        >>> traj = Trajectory(model, window=50)
        >>> rec = record(traj, optimizer, model, every=10, start=0.75, total_steps=len(loader) * epochs)
    """
    recorder = Recorder(trajectory, model, every=every, start=start, total_steps=total_steps, asynchronous=asynchronous)
    return recorder.attach(optimizer, initial_step=initial_step)

