"""Hypothesis property tests of the weight rules, the average and the top-K selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import sewa
from sewa import weights

FAST = settings(max_examples=40, deadline=None)
SLOW = settings(max_examples=15, deadline=None)  # each example runs a (tiny) selection

# Storage dtypes and the magnitudes each can hold.
LIMITS = {"float32": 2.0**100, "bfloat16": 2.0**100, "float16": 6e4}


def snapshot_arrays(n: int, p: int, limit: float) -> st.SearchStrategy[np.ndarray]:
    """``n`` snapshots of ``p`` float32 values in ``[-limit, limit]`` (subnormals included)."""
    elements = st.floats(-limit, limit, width=32, allow_nan=False, allow_infinity=False)
    return arrays(np.float32, (n, p), elements=elements)


@st.composite
def convex_weights(draw: st.DrawFn, n: int) -> torch.Tensor:
    """Non-negative weights summing to 1, some of them possibly zero."""
    raw = draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))
    raw[draw(st.integers(0, n - 1))] = 1.0  # at least one positive weight
    w = torch.tensor(raw, dtype=torch.float64)
    return w / w.sum()


@st.composite
def trajectories(draw: st.DrawFn, storage: str | None = None) -> tuple[sewa.Trajectory, np.ndarray]:
    """A trajectory over a two-tensor "model" and the float32 values pushed into it."""
    storage = storage or draw(st.sampled_from(sorted(LIMITS)))
    n = draw(st.integers(1, 6))
    values = draw(snapshot_arrays(n, 5, LIMITS[storage]))
    template = {"a": torch.zeros(2, 2), "b": torch.zeros(1)}
    window = draw(st.integers(n, n + 2))
    traj = sewa.Trajectory(template, window=window, dtype=storage)
    for i, row in enumerate(values):
        flat = torch.from_numpy(row.copy())
        traj.push({"a": flat[:4].view(2, 2), "b": flat[4:]}, step=i)
    return traj, values


def stored(traj: sewa.Trajectory) -> torch.Tensor:
    """The held snapshots as stored (after rounding to the storage dtype), oldest first, float32."""
    rows, order = traj.matrix()
    return rows[order].float()


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state["a"].flatten(), state["b"].flatten()])


# ----------------------------------------------------------------- weight rules
@FAST
@given(n=st.integers(1, 60), data=st.data())
def test_every_rule_gives_a_distribution(n: int, data: st.DataObject) -> None:
    top_k = data.draw(st.integers(1, n))
    decay = data.draw(st.floats(0.0, 0.999))
    seed = data.draw(st.integers(0, 2**31 - 1))
    indices = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n))
    scores = torch.tensor(data.draw(st.lists(st.floats(-1e3, 1e3), min_size=n, max_size=n)), dtype=torch.float64)
    rules = {
        "last": weights.last(n),
        "uniform": weights.uniform(n),
        "lawa": weights.lawa(n, top_k),
        "ema": weights.ema(n, decay),
        "random_k": weights.random_k(n, top_k, seed),
        "from_indices": weights.from_indices(n, indices),
        "greedy_soup": weights.greedy_soup(n, lambda w: float((w @ scores) ** 2)),
    }
    for name, w in rules.items():
        assert w.dtype == torch.float64 and w.shape == (n,), name
        assert bool((w >= 0).all()), name
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12), name
        weights.check_weights(w, n)


@FAST
@given(n=st.integers(1, 60), data=st.data())
def test_top_k_rules_have_exactly_k_distinct_indices(n: int, data: st.DataObject) -> None:
    top_k = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**31 - 1))
    for w in (weights.lawa(n, top_k), weights.random_k(n, top_k, seed)):
        support = w.nonzero().flatten()
        assert support.numel() == top_k
        assert torch.equal(w[support], torch.full((top_k,), 1.0 / top_k, dtype=torch.float64))
    assert weights.lawa(n, top_k).nonzero().flatten().tolist() == list(range(n - top_k, n))


# ----------------------------------------------------------------- the average
@FAST
@given(storage=st.sampled_from(sorted(LIMITS)), data=st.data())
def test_averaging_identical_snapshots_gives_the_snapshot_back(storage: str, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 6))
    row = data.draw(snapshot_arrays(1, 5, LIMITS[storage]))[0]
    traj = sewa.Trajectory({"a": torch.zeros(2, 2), "b": torch.zeros(1)}, window=n, dtype=storage)
    for step in range(n):
        x = torch.from_numpy(row.copy())
        traj.push({"a": x[:4].view(2, 2), "b": x[4:]}, step=step)
    w = data.draw(convex_weights(n))
    out = flat(sewa.average(traj, w))
    assert torch.equal(out, stored(traj)[0])
    if storage == "float32":
        assert torch.equal(out, torch.from_numpy(row))


@FAST
@given(data=st.data())
def test_uniform_average_ignores_order(data: st.DataObject) -> None:
    storage = data.draw(st.sampled_from(sorted(LIMITS)))
    n = data.draw(st.integers(1, 6))
    values = data.draw(snapshot_arrays(n, 5, LIMITS[storage]))
    perm = data.draw(st.permutations(range(n)))
    averages = []
    for order in (range(n), perm):
        traj = sewa.Trajectory({"a": torch.zeros(2, 2), "b": torch.zeros(1)}, window=n, dtype=storage)
        for step, i in enumerate(order):
            x = torch.from_numpy(values[i].copy())
            traj.push({"a": x[:4].view(2, 2), "b": x[4:]}, step=step)
        averages.append(flat(sewa.average(traj, weights.uniform(n))))
    # Accumulated in float64, so the order changes the float32 result by an ulp at most.
    scale = float(np.abs(values).max())
    torch.testing.assert_close(averages[0], averages[1], rtol=1e-6, atol=1e-6 * scale)


@FAST
@given(traj_values=trajectories(), data=st.data())
def test_average_lies_within_the_elementwise_range(traj_values, data: st.DataObject) -> None:
    traj, _ = traj_values
    w = data.draw(convex_weights(len(traj)))
    out = flat(sewa.average(traj, w))
    inputs = stored(traj)
    assert bool((out >= inputs.min(dim=0).values).all())
    assert bool((out <= inputs.max(dim=0).values).all())


@FAST
@given(data=st.data())
def test_bfloat16_average_is_within_rounding_of_float32(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 6))
    values = torch.from_numpy(data.draw(snapshot_arrays(n, 5, 2.0**100)))
    w = data.draw(convex_weights(n))
    out = {}
    for storage in ("float32", "bfloat16"):
        traj = sewa.Trajectory({"a": torch.zeros(2, 2), "b": torch.zeros(1)}, window=n, dtype=storage)
        for i in range(n):
            traj.push({"a": values[i, :4].view(2, 2), "b": values[i, 4:]}, step=i)
        out[storage] = flat(sewa.average(traj, w)).double()
    # Each stored value is off by at most 2^-8 of itself (bfloat16 keeps 8 significant bits);
    # the two float32 results add half an ulp each, and subnormals an absolute 2^-133.
    bound = (2.0**-8) * (w @ values.double().abs()) + (2.0**-24) * (out["float32"].abs() + out["bfloat16"].abs())
    assert bool(((out["bfloat16"] - out["float32"]).abs() <= bound + 2.0**-133).all())


# ----------------------------------------------------------------- the selection
@SLOW
@given(n=st.integers(2, 7), data=st.data())
def test_select_returns_exactly_k_distinct_indices(n: int, data: st.DataObject) -> None:
    top_k = data.draw(st.integers(1, n))
    identical = data.draw(st.booleans())  # all snapshots equal: s (nearly) never moves, ties
    seed = data.draw(st.integers(0, 1000))
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(3, 1)
    traj = sewa.Trajectory(model, window=n)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(n):
        scale = 0.0 if identical else 1.0
        traj.push({k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base.items()}, step=i)
    x = torch.randn(8, 3, generator=gen)
    sel = sewa.select(traj, model, nn.functional.mse_loss, [(x, x.sum(1, keepdim=True))], top_k=top_k,
                      samples=data.draw(st.integers(1, 2)), steps=data.draw(st.integers(1, 3)), seed=seed)
    assert len(sel.indices) == top_k == len(set(sel.indices))
    assert sel.indices == sorted(sel.indices) and all(0 <= i < n for i in sel.indices)
    assert torch.equal(sel.weights.nonzero().flatten(), torch.tensor(sel.indices))


# ----------------------------------------------------------------- the ring buffer
@FAST
@given(window=st.integers(1, 5), steps=st.lists(st.integers(0, 30), max_size=25))
def test_ring_keeps_the_newest_window_of_accepted_steps_in_rows_0_to_n(window: int, steps: list[int]) -> None:
    """Whatever the pushes (some refused for a step that does not increase), the held snapshots
    are the newest ``window`` accepted ones, oldest first, in rows ``0..n-1``, each row its own."""
    traj = sewa.Trajectory({"x": torch.zeros(1)}, window=window)
    accepted: list[int] = []
    for step in steps:
        if accepted and step <= accepted[-1]:
            with pytest.raises(sewa.TrajectoryError, match="not after"):
                traj.push({"x": torch.tensor([float(step)])}, step=step)
            continue
        traj.push({"x": torch.tensor([float(step)])}, step=step)
        accepted.append(step)
    assert traj.steps == accepted[-window:]
    assert sorted(traj.slots) == list(range(len(traj)))
    if accepted:
        assert stored(traj).flatten().tolist() == [float(s) for s in traj.steps]
