"""Closed-form tests of the weight rules (sewa.weights), with hand-derived answers."""

from __future__ import annotations

import json

import pytest
import reference as ref
import torch

from sewa import weights
from sewa.methods import DEFAULT_METHODS, METHODS, Context, run_method


def assert_weights(w: torch.Tensor, expected: list[float]) -> None:
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


def test_last() -> None:
    assert_weights(weights.last(4), [0, 0, 0, 1])
    assert_weights(weights.last(1), [1])


def test_uniform() -> None:
    assert_weights(weights.uniform(4), [0.25] * 4)
    assert_weights(weights.uniform(1), [1])


def test_lawa_takes_the_newest_k() -> None:
    assert_weights(weights.lawa(5, 2), [0, 0, 0, 0.5, 0.5])
    assert_weights(weights.lawa(3, 1), [0, 0, 1])
    assert_weights(weights.lawa(3, 3), [1 / 3] * 3)


def test_ema_decay_half_over_three() -> None:
    # w_i ∝ 0.5^(age): ages 2, 1, 0 -> 1/4, 1/2, 1 -> [1, 2, 4] / 7.
    assert_weights(weights.ema(3, 0.5), [1 / 7, 2 / 7, 4 / 7])


def test_ema_edge_cases() -> None:
    assert_weights(weights.ema(1, 0.9), [1])
    assert_weights(weights.ema(3, 0.0), [0, 0, 1])  # no memory: the newest only
    # decay 0.9 over 2: ages 1, 0 -> 0.9, 1 -> [0.9, 1] / 1.9
    assert_weights(weights.ema(2, 0.9), [0.9 / 1.9, 1 / 1.9])


def test_random_k_is_deterministic_and_has_k_support() -> None:
    a = weights.random_k(10, 3, seed=7)
    assert torch.equal(a, weights.random_k(10, 3, seed=7))
    support = a.nonzero().flatten()
    assert support.numel() == 3
    assert torch.all(a[support] == 1 / 3)
    assert float(a.sum()) == pytest.approx(1.0, abs=1e-15)


def test_random_k_depends_on_the_seed_and_covers_the_window() -> None:
    supports = {tuple(weights.random_k(6, 2, seed=s).nonzero().flatten().tolist()) for s in range(30)}
    assert len(supports) > 1
    assert set().union(*supports) == set(range(6))
    assert_weights(weights.random_k(4, 4, seed=3), [0.25] * 4)


def test_from_indices() -> None:
    assert_weights(weights.from_indices(5, [1, 3]), [0, 0.5, 0, 0.5, 0])
    assert_weights(weights.from_indices(5, [3, 1, 3]), [0, 0.5, 0, 0.5, 0])  # duplicates count once
    assert_weights(weights.from_indices(3, torch.tensor([2])), [0, 0, 1])


def test_greedy_soup_by_hand() -> None:
    # Four one-number-pair "models"; the loss of an average is its squared norm.
    thetas = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [3.0, 3.0]], dtype=torch.float64)
    calls: list[list[int]] = []

    def evaluate(w: torch.Tensor) -> float:
        calls.append(w.nonzero().flatten().tolist())
        return float((w @ thetas).pow(2).sum())

    w = weights.greedy_soup(4, evaluate)
    # Own scores: 1, 1, 1, 18. Ties rank the newer first: 2, 1, 0, 3.
    # {2}: 1 -> {2,1}: |(-1/2, 1/2)|^2 = 1/2 (kept) -> {2,1,0}: |(0, 1/3)|^2 = 1/9 (kept)
    # -> {2,1,0,3}: |(3/4, 1)|^2 = 25/16 (dropped).
    assert_weights(w, [1 / 3, 1 / 3, 1 / 3, 0])
    assert calls == [[0], [1], [2], [3], [1, 2], [0, 1, 2], [0, 1, 2, 3]]


def test_greedy_soup_keeps_the_best_alone_when_nothing_helps() -> None:
    thetas = torch.tensor([4.0, 0.5, -3.0], dtype=torch.float64)
    w = weights.greedy_soup(3, lambda w: float((w @ thetas) ** 2))
    # Best alone: index 1 (0.25). With 2: -1.25 -> 1.5625; with 0: 2.25 -> 5.06. Both dropped.
    assert_weights(w, [0, 1, 0])


def test_check_weights_accepts_and_converts() -> None:
    assert_weights(weights.check_weights([0.5, 0.5], 2), [0.5, 0.5])


@pytest.mark.parametrize(
    ("w", "n", "message"),
    [
        ([0.5, 0.5], 3, "2 weights for 3 snapshots"),
        ([1.5, -0.5], 2, "non-negative"),
        ([float("nan"), 1.0], 2, "finite"),
        ([0.5, 0.4], 2, "sum to 1"),
    ],
)
def test_check_weights_rejects(w: list[float], n: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        weights.check_weights(w, n)


@pytest.mark.parametrize("top_k", [0, 5, -1])
def test_top_k_out_of_range(top_k: int) -> None:
    for rule in (lambda: weights.lawa(4, top_k), lambda: weights.random_k(4, top_k, seed=0)):
        with pytest.raises(ValueError, match=rf"top_k must be an integer in \[1, 4\].*got {top_k}"):
            rule()


def test_bad_arguments_name_the_problem() -> None:
    with pytest.raises(ValueError, match="n=0"):
        weights.uniform(0)
    with pytest.raises(ValueError, match="decay must lie in"):
        weights.ema(3, 1.0)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\)"):
        weights.from_indices(3, [3])
    with pytest.raises(ValueError, match="at least one index"):
        weights.from_indices(3, [])


# ----------------------------------------------------------------- the registry, every method
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_returns_valid_weights(name: str) -> None:
    model, traj, batches = ref.make_problem("cnn_bn", n=6)
    ctx = Context(traj, top_k=2, seed=3, ema_decay=0.5, model=model, loss_fn=ref.cross_entropy,
                  batches=batches, select_options={"steps": 4, "samples": 2})
    result = run_method(name, ctx)
    w = result.weights
    assert result.name == name and result.seconds >= 0
    assert w.dtype == torch.float64 and w.shape == (6,)
    assert bool((w >= 0).all()) and float(w.sum()) == pytest.approx(1.0, abs=1e-9)
    if name in ("lawa", "random", "sewa"):
        assert int((w > 0).sum()) == 2 and torch.equal(w, weights.from_indices(6, w.nonzero().flatten()))
    json.dumps(result.info)  # details are JSON-ready for reports
    # The same context gives the same weights: every method is deterministic given its seed.
    assert torch.equal(run_method(name, ctx).weights, w)


def test_registry_names() -> None:
    assert set(DEFAULT_METHODS) <= set(METHODS)
    traj = ref.make_problem("mlp", n=3)[1]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        run_method("nope", Context(traj))
    with pytest.raises(ValueError, match="'sewa' evaluates averaged models.*needs a model"):
        run_method("sewa", Context(traj))
    assert torch.equal(run_method("ema", Context(traj, ema_decay=0.5)).weights, weights.ema(3, 0.5))
