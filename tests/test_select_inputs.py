"""Tests of sewa.select on bad input: settings, batches, losses and gradients that are not
finite, one-shot and endless iterators; and its progress bar and log."""

from __future__ import annotations

import io
import itertools
import logging
import math
import sys
from collections.abc import Callable, Iterator

import pytest
import reference as ref
import torch
from torch import Tensor, nn

import sewa
from sewa import TrajectoryError
from sewa.select import SelectionError


# ----------------------------------------------------------------- bad input
@pytest.fixture
def problem() -> tuple[nn.Module, sewa.Trajectory, list[ref.Batch]]:
    return ref.make_problem("mlp", n=4)


@pytest.mark.parametrize("top_k", [0, 5, -2])
def test_top_k_out_of_range(problem, top_k: int) -> None:
    model, traj, batches = problem
    with pytest.raises(ValueError, match=rf"top_k must be an integer in \[1, 4\].*got {top_k}"):
        sewa.select(traj, model, ref.cross_entropy, batches, top_k=top_k)


def test_bad_settings(problem) -> None:
    model, traj, batches = problem
    with pytest.raises(ValueError, match="steps and samples must be >= 1"):
        sewa.select(traj, model, ref.cross_entropy, batches, top_k=2, steps=0)
    with pytest.raises(ValueError, match="samples=0"):
        sewa.select(traj, model, ref.cross_entropy, batches, top_k=2, samples=0)
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        sewa.select(traj, model, ref.cross_entropy, batches, top_k=2, optimizer="lbfgs")


def test_empty_trajectory() -> None:
    model = ref.MLP()
    with pytest.raises(TrajectoryError, match="holds no snapshots"):
        sewa.select(sewa.Trajectory(model, window=3), model, ref.cross_entropy, [], top_k=1)


@pytest.mark.parametrize("empty", [[], (), "generator"])
def test_empty_batches(problem, empty) -> None:
    model, traj, _ = problem
    batches = (b for b in []) if empty == "generator" else empty
    with pytest.raises(ValueError, match="selection split has no batches"):
        sewa.select(traj, model, ref.cross_entropy, batches, top_k=2, steps=2)
    traj.push(model, step=1000)  # the failed selection released the trajectory


def test_batches_must_be_pairs(problem) -> None:
    model, traj, batches = problem
    with pytest.raises(ValueError, match=r"\(inputs, targets\) pair, got Tensor"):
        sewa.select(traj, model, ref.cross_entropy, [batches[0][0]], top_k=2, steps=1)


def test_one_shot_iterator_is_cycled(problem) -> None:
    model, traj, batches = problem

    def gen() -> Iterator[ref.Batch]:
        yield from batches

    sel = sewa.select(traj, model, ref.cross_entropy, gen(), top_k=2, samples=2, steps=5)
    assert len(sel.history["loss"]) == 5


def test_non_finite_snapshot_names_the_step() -> None:
    model = ref.MLP()
    traj = sewa.Trajectory(model, window=4, check_finite=False)
    for step in (10, 20, 30):
        with torch.no_grad():
            model.fc2.bias.fill_(math.nan if step == 20 else 0.0)
        traj.push(model, step=step)
    batches = [(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(TrajectoryError, match="snapshot at step 20 holds NaN or Inf"):
        sewa.select(traj, model, ref.cross_entropy, batches, top_k=1)


def test_mismatched_model_names_the_parameter(problem) -> None:
    _, traj, batches = problem
    other = ref.MLP()
    other.fc2 = nn.Linear(8, 4)
    with pytest.raises(TrajectoryError, match=r"'fc2.weight' has shape \(4, 8\).*expects \(3, 8\)"):
        sewa.select(traj, other, ref.cross_entropy, batches, top_k=2)
    with pytest.raises(TrajectoryError, match=r"'fc1.weight' has dtype torch.float64"):
        sewa.select(traj, ref.MLP().double(), ref.cross_entropy, batches, top_k=2)


def test_non_scalar_loss(problem) -> None:
    model, traj, batches = problem

    def per_sample(out: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(out, y, reduction="none")

    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor, got \(6,\)"):
        sewa.select(traj, model, per_sample, batches, top_k=2, steps=2)


def test_push_from_the_loss_during_select_is_refused(problem) -> None:
    model, traj, batches = problem
    step = iter(range(1000, 2000))

    def meddling(out: Tensor, y: Tensor) -> Tensor:
        traj.push(model, step=next(step))
        return ref.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="cannot push while the trajectory is being read"):
        sewa.select(traj, model, meddling, batches, top_k=2, steps=2)
    assert len(traj) == 4
    traj.push(model, step=5000)


# ----------------------------------------------------------------- non-finite losses
def nan_after(calls: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Cross-entropy that turns NaN from its ``calls + 1``-th call on."""
    count = [0]

    def loss(out: Tensor, y: Tensor) -> Tensor:
        count[0] += 1
        value = ref.cross_entropy(out, y)
        return value * math.nan if count[0] > calls else value

    return loss


def nan_gradient(out: Tensor, y: Tensor) -> Tensor:
    """A finite loss (``sqrt(0) = 0`` is added) whose gradient is infinite (``d sqrt/dx`` at 0)."""
    return ref.cross_entropy(out, y) + torch.sqrt((out - out.detach()).sum())


def test_nan_loss_stops_select_naming_the_step(problem) -> None:
    """Issue 12.1: a NaN selection loss used to give NaN probabilities and arbitrary indices."""
    model, traj, batches = problem
    # One check call, then 2 samples per step: calls 2..7 are steps 1-3, call 8 is in step 4.
    with pytest.raises(SelectionError, match=r"selection step 4 of 10: the loss .* is nan"):
        sewa.select(traj, model, nan_after(7), batches, top_k=2, samples=2, steps=10)
    traj.push(model, step=1000)  # the failed selection released the trajectory


def test_nan_gradient_stops_select(problem) -> None:
    model, traj, batches = problem
    with pytest.raises(ValueError, match=r"selection step 1 of 5: the loss is finite .* but its gradient"):
        sewa.select(traj, model, nan_gradient, batches, top_k=2, samples=2, steps=5)


def test_nan_loss_stops_the_trainable_average(problem) -> None:
    model, traj, batches = problem
    with pytest.raises(SelectionError, match=r"trainable average step 3 of 6: the loss"):
        sewa.trainable_average(traj, model, nan_after(3), batches, steps=6)  # check + 1 call per step
    with pytest.raises(SelectionError, match="its gradient"):
        sewa.trainable_average(traj, model, nan_gradient, batches, steps=6)


# ----------------------------------------------------------------- batches, progress, logging
def test_endless_iterator_of_batches_is_used_lazily(problem) -> None:
    """Issue 12.10: ``itertools.cycle`` used to be listed until memory ran out."""
    model, traj, batches = problem
    options = dict(top_k=2, samples=2, steps=5)
    endless = sewa.select(traj, model, ref.cross_entropy, itertools.cycle(batches), **options)
    listed = sewa.select(traj, model, ref.cross_entropy, batches, **options)
    assert torch.equal(endless.probabilities, listed.probabilities)


def test_progress_bar_only_when_asked_or_on_a_terminal(problem, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13.5: ``progress=None`` (the default) is tqdm's ``disable=None``: no bar off a
    terminal (as here); ``True`` always shows one."""
    model, traj, batches = problem
    sewa.select(traj, model, ref.cross_entropy, batches, top_k=2, samples=1, steps=2)
    assert "selecting" not in capsys.readouterr().err
    sewa.select(traj, model, ref.cross_entropy, batches, top_k=2, samples=1, steps=2, progress=True)
    assert "selecting" in capsys.readouterr().err


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_by_default_on_a_terminal(problem, monkeypatch: pytest.MonkeyPatch) -> None:
    model, traj, batches = problem
    monkeypatch.setattr(sys, "stderr", Terminal())
    sewa.select(traj, model, ref.cross_entropy, batches, top_k=2, samples=1, steps=2)
    assert "selecting" in sys.stderr.getvalue()
    sewa.trainable_average(traj, model, ref.cross_entropy, batches, steps=2)
    assert "trainable average" in sys.stderr.getvalue()


def test_select_logs_its_result(problem, caplog: pytest.LogCaptureFixture) -> None:
    model, traj, batches = problem
    with caplog.at_level(logging.INFO, logger="sewa"):
        sel = sewa.select(traj, model, ref.cross_entropy, batches, top_k=2, samples=1, steps=2)
    assert f"selected steps {sel.steps}" in caplog.text
