"""The thread-count context manager of the selection engine (no timing here)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from sewa import _threads
from sewa._threads import ENV, compute_threads, free_cores, resolve_threads


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No user choice in the environment, torch at the count sewa found, no reused probe."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_threads, "_last", None)
    previous = torch.get_num_threads()
    torch.set_num_threads(_threads._TORCH_DEFAULT)
    yield
    torch.set_num_threads(previous)


def test_explicit_count_is_used_and_previous_restored() -> None:
    before = torch.get_num_threads()
    with compute_threads(1) as n:
        assert n == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_restored_after_an_exception() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"), compute_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_restored_when_the_block_changes_the_count() -> None:
    before = torch.get_num_threads()
    with compute_threads(1):
        torch.set_num_threads(3)
    assert torch.get_num_threads() == before


def test_environment_variable_wins_over_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "3")
    monkeypatch.setattr(_threads, "free_cores", lambda probe: pytest.fail("probed despite SEWA_THREADS"))
    with compute_threads() as n:
        assert n == 3 == torch.get_num_threads()


def test_argument_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "3")
    assert resolve_threads(2) == 2


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_bad_environment_value_is_an_error(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(ENV, bad)
    with pytest.raises(ValueError, match=ENV):
        resolve_threads()


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_argument_is_an_error(bad: object) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        resolve_threads(bad)  # type: ignore[arg-type]


def test_count_set_through_torch_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_threads, "_TORCH_DEFAULT", 4)  # torch's count (1 or 2 here) differs from it
    monkeypatch.setattr(_threads, "free_cores", lambda probe: pytest.fail("probed despite a user's count"))
    mine = torch.get_num_threads()
    with compute_threads() as n:
        assert n == mine


def test_omp_num_threads_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(_threads, "free_cores", lambda probe: pytest.fail("probed despite OMP_NUM_THREADS"))
    assert resolve_threads() == torch.get_num_threads()


@pytest.mark.parametrize(("free", "expected"), [(0.0, 1), (0.4, 1), (1.6, 2), (3.4, 3), (9.0, 4)])
def test_free_cores_are_rounded_and_bounded(monkeypatch: pytest.MonkeyPatch, free: float, expected: int) -> None:
    monkeypatch.setattr(_threads, "_TORCH_DEFAULT", 4)
    torch.set_num_threads(4)
    monkeypatch.setattr(_threads, "free_cores", lambda probe: free)
    with compute_threads() as n:
        assert n == expected == torch.get_num_threads()


def test_probe_is_reused_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_threads, "_TORCH_DEFAULT", 4)
    torch.set_num_threads(4)
    calls: list[float] = []
    monkeypatch.setattr(_threads, "free_cores", lambda probe: calls.append(probe) or 2.0)
    assert resolve_threads() == resolve_threads() == 2
    assert len(calls) == 1


def test_free_cores_lies_within_the_cpu_set() -> None:
    free = free_cores(probe=0.01)
    assert 0.0 <= free <= len(_threads._cpus())
