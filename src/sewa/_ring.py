"""The bookkeeping of a ring buffer of snapshots, shared by every trajectory kind.

A trajectory stores ``window`` rows; :class:`Ring` says which row holds which training step,
oldest first, and which row the next snapshot goes to. It holds no tensors: the in-memory
:class:`~sewa.Trajectory`, the on-disk :class:`~sewa.disk.DiskTrajectory` and the sharded
trajectory of :mod:`sewa.distributed` keep their own storage and ask the ring where to write.

A push is two calls, so that a refused write changes nothing::

    slot = ring.admit(step)      # validates the step; the row to write (nothing changes yet)
    ...write row `slot`...
    ring.commit(slot, step)      # now the snapshot is listed (the oldest is dropped if full)

Held rows are always ``0..len-1`` while the ring fills, and a full ring reuses the oldest's
row, so ``data[:len]`` holds exactly the listed snapshots.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["Ring", "RingHeld", "TrajectoryError", "check_window"]


class TrajectoryError(ValueError):
    """A snapshot or model does not fit the trajectory it is used with."""


def check_window(window: object, name: str = "window") -> int:
    """``window`` as a positive int, or a clear error (``True`` is not a window size).

    Raises:
        TypeError: if ``window`` is not an integer (``bool`` included).
        TrajectoryError: if it is not positive.
    """
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"{name} must be a positive integer, got {window!r} ({type(window).__name__})")
    if window < 1:
        raise TrajectoryError(f"{name} must be a positive integer, got {window!r}")
    return window


class Ring:
    """Which row holds which step, oldest first, for a ring of ``window`` rows.

    Args:
        window: Number of rows (the paper's ``k``).

    Attributes:
        window: Number of rows.
        slots: Row of each held snapshot, oldest first.
        steps: Training step of each held snapshot, oldest first (strictly increasing).
    """

    def __init__(self, window: int) -> None:
        self.window = check_window(window)
        self.slots: list[int] = []
        self.steps: list[int] = []

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def full(self) -> bool:
        """Whether the next push drops the oldest snapshot."""
        return len(self.slots) == self.window

    def next_slot(self) -> int:
        """The row the next snapshot is written to: the next free one, else the oldest's."""
        return self.slots[0] if self.full else len(self.slots)

    def admit(self, step: object) -> int:
        """Checks that ``step`` may be pushed now and returns the row to write; changes nothing.

        Raises:
            TypeError: if ``step`` is not an integer.
            TrajectoryError: if ``step`` is not after the newest held step.
        """
        if isinstance(step, bool):
            raise TypeError(f"step must be an integer, got {step!r}")
        try:
            value = int(step)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise TypeError(f"step must be an integer, got {step!r} ({type(step).__name__})") from None
        if self.steps and value <= self.steps[-1]:
            raise TrajectoryError(f"step {value} is not after the newest recorded step {self.steps[-1]}")
        return self.next_slot()

    def commit(self, slot: int, step: int) -> None:
        """Lists ``step`` in ``slot`` (the row :meth:`admit` gave), dropping the oldest if full."""
        if self.full:
            self.drop_oldest()
        self.slots.append(slot)
        self.steps.append(int(step))

    def drop_oldest(self) -> tuple[int, int]:
        """Unlists the oldest snapshot and returns its ``(slot, step)``."""
        return self.slots.pop(0), self.steps.pop(0)

    def state(self) -> tuple[list[int], list[int]]:
        """A copy of ``(slots, steps)``, to :meth:`restore` if a write fails."""
        return list(self.slots), list(self.steps)

    def restore(self, state: tuple[list[int], list[int]]) -> None:
        """Puts back a :meth:`state`."""
        self.slots, self.steps = list(state[0]), list(state[1])

    def load(self, entries: Iterable[tuple[int, int]]) -> None:
        """Replaces the held entries by ``(slot, step)`` pairs, oldest first, after checking them.

        Raises:
            TrajectoryError: for a repeated or out-of-range slot, or steps that do not increase.
        """
        pairs = [(int(slot), int(step)) for slot, step in entries]
        slots = [s for s, _ in pairs]
        steps = [t for _, t in pairs]
        if (len(set(slots)) != len(slots) or len(slots) > self.window or any(not 0 <= s < self.window for s in slots)
                or any(a >= b for a, b in zip(steps, steps[1:], strict=False))):
            raise TrajectoryError(f"invalid ring entries {pairs} for a window of {self.window}")
        self.slots, self.steps = slots, steps

    def holes(self) -> list[tuple[int, int]]:
        """``(hole, moved)`` row moves that make the held rows ``0..len-1`` again.

        A crash between unlisting the oldest snapshot and listing the new one leaves a row
        free below the highest held row; moving the highest held rows into the free ones
        restores the invariant that :meth:`positions`' users rely on.
        """
        n = len(self.slots)
        free = sorted(set(range(n)) - set(self.slots))
        high = sorted((s for s in self.slots if s >= n), reverse=True)
        return list(zip(free, high, strict=True))

    def move(self, hole: int, moved: int) -> None:
        """Records that the snapshot in row ``moved`` now lives in row ``hole``."""
        self.slots[self.slots.index(moved)] = hole

    def positions(self, indices: Iterable[int]) -> list[int]:
        """Sorted distinct oldest-first positions from ``indices`` (negative ones count from the
        newest), for taking a subset in chronological order.

        Raises:
            IndexError: for a position outside ``0..len-1``.
        """
        held = range(len(self))
        return sorted({held[i] for i in indices})


class RingHeld:
    """What a trajectory that keeps its rows in ``data`` and its bookkeeping in a :class:`Ring`
    says about the snapshots it holds (shared by :class:`sewa.Trajectory` and
    :class:`sewa.distributed.ShardedTrajectory`)."""

    _ring: Ring
    data: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype."""
        return self.data.dtype

    @property
    def steps(self) -> list[int]:
        """Training steps of the held snapshots, oldest first."""
        return list(self._ring.steps)

    @property
    def slots(self) -> list[int]:
        """Row of :attr:`data` holding each snapshot, oldest first."""
        return list(self._ring.slots)

    def __len__(self) -> int:
        return len(self._ring)
