"""The ring-buffer bookkeeping shared by every trajectory kind (sewa._ring)."""

from __future__ import annotations

import pytest

from sewa._ring import Ring, TrajectoryError, check_window


def test_fills_then_reuses_the_oldest_row() -> None:
    ring = Ring(3)
    for step in (10, 20, 30, 40, 50):
        ring.commit(ring.admit(step), step)
    assert ring.steps == [30, 40, 50] and ring.slots == [2, 0, 1] and ring.full
    assert ring.next_slot() == 2


def test_admit_changes_nothing_and_checks_the_step() -> None:
    ring = Ring(2)
    ring.commit(ring.admit(5), 5)
    before = ring.state()
    with pytest.raises(TrajectoryError, match="step 5 is not after the newest recorded step 5"):
        ring.admit(5)
    with pytest.raises(TypeError, match="step must be an integer"):
        ring.admit(True)
    assert ring.admit(6) == 1 and ring.state() == before


def test_restore_load_and_holes() -> None:
    ring = Ring(4)
    ring.load([(1, 3), (3, 7), (2, 9)])  # a crash left row 0 free
    assert ring.holes() == [(0, 3)]
    ring.move(0, 3)
    assert ring.slots == [1, 0, 2] and ring.holes() == []
    state = ring.state()
    ring.drop_oldest()
    ring.restore(state)
    assert ring.steps == [3, 7, 9]
    with pytest.raises(TrajectoryError, match="invalid ring entries"):
        ring.load([(0, 2), (0, 3)])
    with pytest.raises(TrajectoryError, match="invalid ring entries"):
        ring.load([(0, 3), (1, 2)])


def test_positions_and_window() -> None:
    ring = Ring(3)
    for step in (1, 2, 3):
        ring.commit(ring.admit(step), step)
    assert ring.positions([2, 0, -1]) == [0, 2]
    with pytest.raises(IndexError):
        ring.positions([3])
    assert check_window(4) == 4
    with pytest.raises(TypeError):
        check_window(True)
    with pytest.raises(TrajectoryError, match="got -1"):
        check_window(-1)

