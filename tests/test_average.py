"""Closed-form tests of sewa.average / average_flat / apply and of BatchNorm recomputation."""

from __future__ import annotations

import pytest
import torch
from reference import Tied
from torch import nn
from torch.optim.swa_utils import update_bn as torch_update_bn

import sewa
from sewa import weights
from sewa.average import average_flat


def state(w: list[float], b: float, count: int = 0) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w, dtype=torch.float32), "b": torch.tensor([b], dtype=torch.float32),
            "count": torch.tensor(count)}


def test_two_snapshots_by_hand() -> None:
    traj = sewa.Trajectory(state([0, 0], 0), window=3)
    traj.push(state([1.0, 2.0], 4.0, count=1), step=1)
    traj.push(state([3.0, -2.0], 8.0, count=2), step=2)
    out = sewa.average(traj, [0.25, 0.75])
    # w: 0.25 (1, 2) + 0.75 (3, -2) = (2.5, -1); b: 0.25·4 + 0.75·8 = 7
    torch.testing.assert_close(out["w"], torch.tensor([2.5, -1.0]), rtol=0, atol=0)
    torch.testing.assert_close(out["b"], torch.tensor([7.0]), rtol=0, atol=0)
    assert out["w"].dtype == torch.float32
    # Non-float entries come from the newest snapshot.
    assert out["count"].dtype == torch.int64 and int(out["count"]) == 2
    torch.testing.assert_close(average_flat(traj, [0.25, 0.75]), torch.tensor([2.5, -1.0, 7.0]), rtol=0, atol=0)


def test_three_snapshots_rules_by_hand() -> None:
    traj = sewa.Trajectory(state([0, 0], 0), window=3)
    for step, v in enumerate([1.0, 2.0, 6.0], start=1):
        traj.push(state([v, -v], 10 * v), step=step)
    uniform = sewa.average(traj, weights.uniform(3))
    torch.testing.assert_close(uniform["w"], torch.tensor([3.0, -3.0]))  # (1 + 2 + 6) / 3
    lawa = sewa.average(traj, weights.lawa(3, 2))
    torch.testing.assert_close(lawa["w"], torch.tensor([4.0, -4.0]))  # (2 + 6) / 2
    ema = sewa.average(traj, weights.ema(3, 0.5))
    torch.testing.assert_close(ema["b"], torch.tensor([0.25 * 10 + 0.25 * 20 + 0.5 * 60]))  # torch AveragedModel EMA
    last = sewa.average(traj, weights.last(3))
    torch.testing.assert_close(last["w"], torch.tensor([6.0, -6.0]), rtol=0, atol=0)


def test_ring_buffer_that_wrapped() -> None:
    traj = sewa.Trajectory(state([0, 0], 0), window=2)
    for step, v in [(1, 1.0), (2, 2.0), (3, 5.0)]:
        traj.push(state([v, v], v), step=step)
    assert traj.steps == [2, 3]
    assert traj.slots == [1, 0]  # step 3 overwrote row 0, where step 1 lived
    torch.testing.assert_close(sewa.average(traj, [1.0, 0.0])["w"], torch.tensor([2.0, 2.0]), rtol=0, atol=0)
    torch.testing.assert_close(sewa.average(traj, [0.0, 1.0])["w"], torch.tensor([5.0, 5.0]), rtol=0, atol=0)
    # 0.75 · 2 + 0.25 · 5 = 2.75: the weights follow the chronological order, not the rows.
    torch.testing.assert_close(sewa.average(traj, [0.75, 0.25])["b"], torch.tensor([2.75]), rtol=0, atol=0)


def test_bfloat16_storage_by_hand() -> None:
    traj = sewa.Trajectory(state([0, 0], 0), window=2, dtype="bfloat16")
    # 1/3 is not a bfloat16 number: it is stored as 0.333984375 (0x3EAB).
    traj.push(state([1.5, 1 / 3], 2.25), step=1)
    traj.push(state([-0.5, 1.0], 0.25), step=2)
    assert traj.data.dtype == torch.bfloat16
    out = sewa.average(traj, [0.5, 0.5])
    assert out["w"].dtype == torch.float32  # the recorded tensor's own dtype, not the storage's
    stored_third = 0.333984375
    assert float(torch.tensor(1 / 3).bfloat16()) == stored_third
    torch.testing.assert_close(out["w"], torch.tensor([0.5, (stored_third + 1.0) / 2]), rtol=0, atol=0)
    torch.testing.assert_close(out["b"], torch.tensor([1.25]), rtol=0, atol=0)


def test_average_accumulates_wider_than_the_storage() -> None:
    # x_i = 1 + i/1024 are float16 numbers; their mean 1 + 19.5/1024 is not, and summing x_i/40
    # in float16 would round at every step. The float32 result must be exact.
    traj = sewa.Trajectory({"w": torch.zeros(1)}, window=40, dtype="float16")
    for i in range(40):
        traj.push({"w": torch.tensor([1 + i / 1024])}, step=i)
    assert torch.equal(traj.data.float()[:, 0], 1 + torch.arange(40) / 1024)
    assert float(sewa.average(traj, weights.uniform(40))["w"]) == 1 + 19.5 / 1024


def test_model_average_copies_buffers_from_the_newest_snapshot() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    traj = sewa.Trajectory(model, window=2)
    for step, v in [(1, 1.0), (2, 3.0)]:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(v)
            model[1].running_mean.fill_(10 * v)
            model[1].num_batches_tracked.fill_(int(v))
        traj.push(model, step=step)
    out = sewa.average(traj, weights.uniform(2))
    torch.testing.assert_close(out["0.weight"], torch.full((2, 2), 2.0), rtol=0, atol=0)
    torch.testing.assert_close(out["1.running_mean"], torch.full((2,), 30.0), rtol=0, atol=0)
    assert int(out["1.num_batches_tracked"]) == 3
    assert set(out) == set(model.state_dict())


def test_recorded_buffers_are_averaged() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    traj = sewa.Trajectory(model, window=2, buffers=True)
    assert "1.running_mean" in traj.names and "1.num_batches_tracked" not in traj.names
    for step, v in [(1, 1.0), (2, 3.0)]:
        with torch.no_grad():
            model[1].running_mean.fill_(10 * v)
        traj.push(model, step=step)
    out = sewa.average(traj, weights.uniform(2))
    torch.testing.assert_close(out["1.running_mean"], torch.full((2,), 20.0), rtol=0, atol=0)


def test_tied_parameters_alias_one_tensor() -> None:
    model = Tied()
    traj = sewa.Trajectory(model, window=2)
    assert traj.aliases == {"again.weight": "mid.weight", "again.bias": "mid.bias", "head.weight": "embed.weight"}
    for step, v in [(1, 1.0), (2, 2.0)]:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(v)
        traj.push(model, step=step)
    out = sewa.average(traj, [0.5, 0.5])
    assert out["head.weight"] is out["embed.weight"]
    assert out["again.bias"] is out["mid.bias"]
    torch.testing.assert_close(out["head.weight"], torch.full((7, 4), 1.5), rtol=0, atol=0)
    fresh = Tied()
    fresh.load_state_dict(out)
    assert fresh.head.weight is fresh.embed.weight
    torch.testing.assert_close(fresh.embed.weight, torch.full((7, 4), 1.5), rtol=0, atol=0)


def test_average_rejects_bad_weights() -> None:
    traj = sewa.Trajectory(state([0, 0], 0), window=3)
    traj.push(state([1, 1], 1), step=1)
    traj.push(state([2, 2], 2), step=2)
    with pytest.raises(ValueError, match="3 weights for 2 snapshots"):
        sewa.average(traj, weights.uniform(3))
    with pytest.raises(ValueError, match="sum to 1"):
        sewa.average(traj, [0.5, 0.6])


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def _bn_batches(gen: torch.Generator, count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(8, 3, generator=gen) * 2 + 1, torch.zeros(8)) for _ in range(count)]


def _bn_trajectory(model: nn.Module, gen: torch.Generator) -> sewa.Trajectory:
    traj = sewa.Trajectory(model, window=3)
    with torch.no_grad():
        for step in range(3):
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            model[1].running_mean.fill_(100.0)  # stale statistics that must not survive apply()
            traj.push(model, step=step)
    return traj


def test_apply_raises_for_batchnorm_without_batches(gen: torch.Generator) -> None:
    model = _bn_model()
    traj = _bn_trajectory(model, gen)
    with pytest.raises(ValueError, match="BatchNorm.*bn_batches"):
        sewa.apply(model, traj, weights.uniform(3))


def test_apply_without_recomputation_keeps_the_newest_statistics(gen: torch.Generator) -> None:
    model = _bn_model()
    traj = _bn_trajectory(model, gen)
    target = _bn_model()
    sewa.apply(target, traj, weights.uniform(3), bn_batches=False)
    torch.testing.assert_close(target[1].running_mean, torch.full((4,), 100.0), rtol=0, atol=0)
    torch.testing.assert_close(target[0].weight, sewa.average(traj, weights.uniform(3))["0.weight"], rtol=0, atol=0)


def test_apply_recomputes_statistics_like_torch(gen: torch.Generator) -> None:
    model = _bn_model()
    traj = _bn_trajectory(model, gen)
    batches = _bn_batches(gen)
    ours = sewa.apply(_bn_model(), traj, weights.uniform(3), bn_batches=batches)
    theirs = _bn_model()
    theirs.load_state_dict(sewa.average(traj, weights.uniform(3)))
    torch_update_bn([x for x, _ in batches], theirs)
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert float(ours[1].running_mean.abs().max()) < 50  # the stale 100s are gone
