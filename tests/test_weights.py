"""Closed-form tests of the weight rules (sewa.weights), with hand-derived answers."""

from __future__ import annotations

import pytest
import torch

from sewa import weights


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
    # torch's recursion from a copy of the oldest: ages 2, 1, 0 -> 0.5^2, 0.5 * 0.5, 0.5.
    assert_weights(weights.ema(3, 0.5), [1 / 4, 1 / 4, 1 / 2])
    # Renormalised tail: w_i ∝ 0.5^(age): [1/4, 1/2, 1] / (7/4) -> [1, 2, 4] / 7.
    assert_weights(weights.ema(3, 0.5, tail="renormalize"), [1 / 7, 2 / 7, 4 / 7])


def test_ema_edge_cases() -> None:
    assert_weights(weights.ema(1, 0.9), [1])
    assert_weights(weights.ema(1, 0.9, tail="renormalize"), [1])
    assert_weights(weights.ema(3, 0.0), [0, 0, 1])  # no memory: the newest only
    assert_weights(weights.ema(3, 0.0, tail="renormalize"), [0, 0, 1])
    # decay 0.9 over 2: the oldest keeps 0.9, the newest gets 0.1.
    torch.testing.assert_close(weights.ema(2, 0.9), torch.tensor([0.9, 0.1], dtype=torch.float64), rtol=0, atol=1e-15)
    assert_weights(weights.ema(2, 0.9, tail="renormalize"), [0.9 / 1.9, 1 / 1.9])


def _torch_ema_weights(n: int, decay: float) -> torch.Tensor:
    """The weight torch's own EMA gives each snapshot: snapshot i is the basis vector e_i."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    holder = torch.nn.Linear(n, 1, bias=False).double()
    averaged = AveragedModel(holder, multi_avg_fn=get_ema_multi_avg_fn(decay))
    with torch.no_grad():
        for i in range(n):
            holder.weight.copy_(torch.nn.functional.one_hot(torch.tensor([i]), n).double())
            averaged.update_parameters(holder)
    return averaged.module.weight.detach().flatten()


@pytest.mark.parametrize(("n", "decay"), [(1, 0.9), (2, 0.5), (5, 0.0), (30, 0.9), (40, 0.99), (7, 0.3)])
def test_ema_equals_torch_averaged_model(n: int, decay: float) -> None:
    torch.testing.assert_close(weights.ema(n, decay), _torch_ema_weights(n, decay), rtol=0, atol=1e-6)


def test_ema_tail_option_is_checked_and_differs_from_torch() -> None:
    with pytest.raises(ValueError, match="tail must be one of 'oldest', 'renormalize', got 'first'"):
        weights.ema(3, 0.5, tail="first")
    # At decay 0.9 over 30 snapshots the conventions differ most on the oldest snapshot:
    # 0.9^29 (torch) against 0.1 * 0.9^29 / (1 - 0.9^30) (renormalised), a gap of 4.2e-2.
    torch_w, renormalized = weights.ema(30, 0.9), weights.ema(30, 0.9, tail="renormalize")
    assert float(torch_w[0]) == pytest.approx(0.9**29, abs=1e-15)
    assert float(renormalized[0]) == pytest.approx(0.1 * 0.9**29 / (1 - 0.9**30), abs=1e-15)
    assert float((torch_w - renormalized).abs().max()) == pytest.approx(0.9**29 * (1 - 0.1 / (1 - 0.9**30)), abs=1e-15)


def test_ema_decay_per_snapshot_by_hand() -> None:
    assert weights.ema_decay_per_snapshot(step_decay=0.9, every=2) == pytest.approx(0.81, abs=1e-15)
    assert weights.ema_decay_per_snapshot(step_decay=0.5, every=1) == 0.5
    assert weights.ema_decay_per_snapshot(half_life=10, every=10) == pytest.approx(0.5, abs=1e-15)
    assert weights.ema_decay_per_snapshot(half_life=20, every=10) == pytest.approx(0.5**0.5, abs=1e-15)


def test_ema_decay_per_snapshot_matches_a_per_step_ema() -> None:
    # A per-step EMA over 12 steps, its weight summed over each block of every=3 steps, is the
    # per-snapshot EMA over the 4 snapshots (taken at each block's newest step).
    d, every, blocks = 0.8, 3, 4
    per_step = _torch_ema_weights(every * blocks, d)
    summed = per_step.reshape(blocks, every).sum(1)
    decay = weights.ema_decay_per_snapshot(step_decay=d, every=every)
    torch.testing.assert_close(weights.ema(blocks, decay), summed, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0, "step_decay": 0.9}, "every must be a positive integer"),
        ({"every": 2}, "exactly one of step_decay"),
        ({"every": 2, "step_decay": 0.9, "half_life": 3}, "exactly one of step_decay"),
        ({"every": 2, "step_decay": 1.0}, "step_decay must lie in"),
        ({"every": 2, "half_life": 0}, "half_life must be a positive number"),
    ],
)
def test_ema_decay_per_snapshot_rejects(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        weights.ema_decay_per_snapshot(**kwargs)  # type: ignore[arg-type]


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


def test_greedy_soup_breaks_ties_in_its_first_cost_by_the_second() -> None:
    """A (minus accuracy, loss) cost: snapshots 0 and 1 tie on accuracy; the lower loss ranks first
    and the soup keeps the other only if it ties or helps on accuracy, then loss."""
    acc = {(0,): 0.9, (1,): 0.9, (2,): 0.5, (0, 1): 0.9, (0, 1, 2): 0.8}
    loss = {(0,): 0.4, (1,): 0.3, (2,): 0.9, (0, 1): 0.35, (0, 1, 2): 0.5}

    def cost(w: torch.Tensor) -> tuple[float, float]:
        key = tuple(w.nonzero().flatten().tolist())
        return -acc[key], loss[key]

    # Ranked 1, 0, 2 (1 ties 0 on accuracy, with the lower loss). {1}: (-0.9, 0.3);
    # {0,1}: (-0.9, 0.35), worse on the loss: dropped; {1,2}: (-0.85, 0.2), worse on accuracy
    # though lower in loss: dropped.
    acc[(1, 2)], loss[(1, 2)] = 0.85, 0.2
    assert_weights(weights.greedy_soup(3, cost), [0, 1, 0])
    loss[(0, 1)] = 0.25  # adding 0 now ties on accuracy and lowers the loss: kept; {0,1,2} is worse
    assert_weights(weights.greedy_soup(3, cost), [0.5, 0.5, 0])


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
