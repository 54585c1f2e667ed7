"""Tests of sewa.Trajectory: the ring buffer, layout checks, bad snapshots, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference import Tied
from torch import nn

import sewa
from sewa import TrajectoryError, weights
from sewa._names import canonical_name


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def filled(model: nn.Module, value: float) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def test_layout_and_push() -> None:
    model = mlp()
    traj = sewa.Trajectory(model, window=3)
    assert traj.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert traj.shapes == [(4, 3), (4,), (2, 4), (2,)]
    assert traj.numels == [12, 4, 8, 2] and traj.num_params == 26
    assert traj.data.shape == (3, 26) and traj.nbytes == 3 * 26 * 4
    assert len(traj) == 0 and traj.steps == []
    traj.push(filled(model, 1.0), step=5)
    traj.push(filled(model, 2.0), step=9)
    assert len(traj) == 2 and traj.steps == [5, 9] and traj.slots == [0, 1]
    rows, order = traj.matrix()
    assert rows.shape == (2, 26) and order.tolist() == [0, 1]
    assert torch.equal(rows[1], torch.full((26,), 2.0))
    snap = traj.snapshot(0)
    assert set(snap) == set(model.state_dict())
    assert torch.equal(snap["2.weight"], torch.full((2, 4), 1.0))
    assert torch.equal(traj.snapshot(-1)["0.bias"], torch.full((4,), 2.0))


def test_push_copies_the_values() -> None:
    model = filled(mlp(), 1.0)
    traj = sewa.Trajectory(model, window=2)
    traj.push(model, step=1)
    filled(model, 7.0)  # training goes on: the recorded snapshot must not move
    assert torch.equal(traj.snapshot(0)["0.weight"], torch.ones(4, 3))


def test_ring_buffer_drops_the_oldest() -> None:
    model = mlp()
    traj = sewa.Trajectory(model, window=3)
    for step in range(1, 6):
        traj.push(filled(model, float(step)), step=step)
    assert len(traj) == 3
    assert traj.steps == [3, 4, 5]
    assert traj.slots == [2, 0, 1]  # steps 4 and 5 reused the rows of steps 1 and 2
    assert [float(traj.snapshot(i)["0.bias"][0]) for i in range(3)] == [3.0, 4.0, 5.0]
    _, order = traj.matrix()
    assert order.tolist() == [2, 0, 1]


def test_steps_must_increase() -> None:
    model = mlp()
    traj = sewa.Trajectory(model, window=3)
    traj.push(model, step=10)
    with pytest.raises(TrajectoryError, match="step 10 is not after the newest recorded step 10"):
        traj.push(model, step=10)


def test_storage_dtypes() -> None:
    model = filled(mlp(), 1 / 3)
    for name, dtype in [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)]:
        traj = sewa.Trajectory(model, window=2, dtype=name)
        traj.push(model, step=0)
        assert traj.dtype == dtype and traj.nbytes == 2 * 26 * dtype.itemsize
        # Stored rounded; handed back in the parameter's own dtype.
        snap = traj.snapshot(0)["0.weight"]
        assert snap.dtype == torch.float32
        assert torch.equal(snap, torch.full((4, 3), 1 / 3).to(dtype).float())
    with pytest.raises(TrajectoryError, match="int8.*not supported"):
        sewa.Trajectory(model, window=2, dtype=torch.int8)
    with pytest.raises(TrajectoryError, match="'int8' is not supported"):
        sewa.Trajectory(model, window=2, dtype="int8")


def test_bad_window_and_empty_template() -> None:
    with pytest.raises(TrajectoryError, match="window must be a positive integer, got 0"):
        sewa.Trajectory(mlp(), window=0)
    with pytest.raises(TrajectoryError, match="no floating-point parameters"):
        sewa.Trajectory({"n": torch.tensor(3)}, window=2)
    with pytest.raises(TrajectoryError, match="no snapshots yet"):
        sewa.Trajectory(mlp(), window=2).matrix()


def test_tied_parameters_are_recorded_once() -> None:
    model = Tied()
    traj = sewa.Trajectory(model, window=2)
    assert traj.names == ["embed.weight", "mid.weight", "mid.bias"]
    assert traj.aliases["head.weight"] == "embed.weight"
    traj.push(model, step=1)
    snap = traj.snapshot(0)
    assert snap["head.weight"] is snap["embed.weight"]
    assert torch.equal(snap["embed.weight"], model.embed.weight.detach())
    # A state dict (where the tied weight appears under both names) is accepted too.
    traj.push(model.state_dict(), step=2)


def test_wrapper_prefixes_are_canonical() -> None:
    assert canonical_name("_orig_mod.module.fc.weight") == "fc.weight"
    assert canonical_name("module._orig_mod.fc.weight") == "fc.weight"
    assert canonical_name("encoder._orig_mod.fc.weight") == "encoder.fc.weight"
    model = filled(mlp(), 2.0)
    traj = sewa.Trajectory(model, window=2)
    traj.push({f"module.{k}": v for k, v in model.state_dict().items()}, step=1)
    assert torch.equal(traj.snapshot(0)["0.weight"], torch.full((4, 3), 2.0))


# ----------------------------------------------------------------- mismatches name the parameter
def test_mismatched_shape_names_the_first_parameter() -> None:
    traj = sewa.Trajectory(mlp(), window=2)
    other = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))  # 0.weight is the first to differ
    with pytest.raises(TrajectoryError, match=r"parameter '0.weight' has shape \(5, 3\).*expects \(4, 3\)"):
        traj.push(other, step=1)
    with pytest.raises(TrajectoryError, match=r"'0.weight' has shape \(5, 3\)"):
        traj.push(other.state_dict(), step=1)
    assert len(traj) == 0


def test_mismatched_dtype_names_the_parameter() -> None:
    traj = sewa.Trajectory(mlp(), window=2)
    model = mlp()
    model[2].double()
    with pytest.raises(TrajectoryError, match=r"'2.weight' has dtype torch.float64.*expects torch.float32"):
        traj.push(model, step=1)


def test_mismatched_names() -> None:
    traj = sewa.Trajectory(mlp(), window=2)
    renamed = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # second layer is "1.", not "2."
    with pytest.raises(TrajectoryError, match="no parameter '2.weight'"):
        traj.push(renamed, step=1)
    bigger = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2))
    with pytest.raises(TrajectoryError, match="parameter '3.weight' that the trajectory does not record"):
        traj.push(bigger, step=1)
    extra = mlp().state_dict() | {"3.weight": torch.zeros(2, 2)}
    with pytest.raises(TrajectoryError, match="entry '3.weight' that the trajectory does not know"):
        traj.push(extra, step=1)
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        traj.push([torch.zeros(3)], step=1)  # type: ignore[arg-type]


# ----------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_snapshot_is_refused_naming_the_step(bad: float) -> None:
    model = mlp()
    traj = sewa.Trajectory(model, window=3)
    traj.push(model, step=1)
    with torch.no_grad():
        model[2].bias[1] = bad
    with pytest.raises(TrajectoryError, match=r"step 2 holds NaN or Inf.*'2\.bias'"):
        traj.push(model, step=2)
    assert traj.steps == [1]
    assert bool(torch.isfinite(traj.matrix()[0]).all())


def test_float16_overflow_is_refused_naming_step_and_parameter() -> None:
    """A value finite in float32 but beyond float16's range becomes Inf in storage: refused with
    a clear error (the source itself is finite, so the bad tensor is found in the stored row)."""
    model = mlp()
    traj = sewa.Trajectory(model, window=2, dtype="float16")
    traj.push(model, step=1)
    with torch.no_grad():
        model[0].bias[0] = 1e6
    with pytest.raises(TrajectoryError, match=r"step 3 .*'0\.bias'"):
        traj.push(model, step=3)
    assert traj.steps == [1]


def test_check_finite_false_records_anyway() -> None:
    model = filled(mlp(), float("nan"))
    traj = sewa.Trajectory(model, window=2, check_finite=False)
    traj.push(model, step=1)
    assert traj.steps == [1]


def test_refused_snapshot_in_a_full_window_keeps_the_trajectory_consistent() -> None:
    """A refused push into a full window must not corrupt the snapshots that remain.

    The refused snapshot may cost the oldest (its row was written over), but the held rows must
    stay readable and averageable, and the next push must not reuse the newest snapshot's row.
    """
    model = mlp()
    traj = sewa.Trajectory(model, window=3)
    for step in (1, 2, 3):
        traj.push(filled(model, float(step)), step=step)
    with pytest.raises(TrajectoryError, match="step 4 holds NaN"):
        traj.push(filled(model, float("nan")), step=4)
    held = traj.steps
    assert held == [1, 2, 3]  # every check runs before the write: the oldest is kept
    # Whatever is held must read back as what was pushed, and average without error.
    assert [float(traj.snapshot(i)["0.bias"][0]) for i in range(len(traj))] == [float(s) for s in held]
    assert float(sewa.average(traj, weights.uniform(len(traj)))["0.bias"][0]) == sum(held) / len(held)
    traj.push(filled(model, 5.0), step=5)
    assert traj.steps == (held + [5])[-3:]
    assert [float(traj.snapshot(i)["0.bias"][0]) for i in range(len(traj))] == [float(s) for s in traj.steps]
    assert len(set(traj.slots)) == len(traj)


# ----------------------------------------------------------------- reading
def test_push_refused_while_reading() -> None:
    model = mlp()
    traj = sewa.Trajectory(model, window=2)
    traj.push(model, step=1)
    with traj.reading():
        with pytest.raises(RuntimeError, match="cannot push while the trajectory is being read"):
            traj.push(model, step=2)
        with traj.reading():  # readers nest
            pass
        with pytest.raises(RuntimeError, match="being read"):
            traj.push(model, step=2)
    traj.push(model, step=2)
    assert traj.steps == [1, 2]


def test_reading_ends_on_error() -> None:
    traj = sewa.Trajectory(mlp(), window=2)
    with pytest.raises(KeyError), traj.reading():
        raise KeyError("boom")
    traj.push(mlp(), step=1)


# ----------------------------------------------------------------- save / load
@pytest.mark.parametrize(("storage", "buffers"), [("float32", False), ("bfloat16", False), ("float32", True)])
def test_save_load_round_trip(tmp_path: Path, storage: str, buffers: bool) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    traj = sewa.Trajectory(model, window=3, dtype=storage, buffers=buffers)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 6):  # wraps: rows are out of chronological order
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            model[1].num_batches_tracked.fill_(step)
            model[1].running_mean.fill_(step)
        traj.push(model, step=10 * step)
    path = tmp_path / "traj.safetensors"
    traj.save(path)
    back = sewa.Trajectory.load(path)
    assert back.steps == [30, 40, 50]
    assert back.names == traj.names and back.shapes == traj.shapes and back.dtypes == traj.dtypes
    assert back.window == 3 and back.dtype == traj.dtype and back.buffers is buffers
    for i in range(3):
        for name, value in traj.snapshot(i).items():
            assert torch.equal(back.snapshot(i)[name], value), name
    assert int(back.extras["1.num_batches_tracked"]) == 5
    w = weights.ema(3, 0.5)
    for name, value in sewa.average(traj, w).items():
        assert torch.equal(sewa.average(back, w)[name], value), name
    back.push(model, step=60)  # a loaded trajectory keeps recording
    assert back.steps == [40, 50, 60]


def test_subset_copies_the_chosen_snapshots() -> None:
    model = mlp()
    traj = sewa.Trajectory(model, window=3)
    for step in range(1, 6):  # held: 3, 4, 5 in rows 2, 0, 1
        traj.push(filled(model, float(step)), step=step)
    sub = traj.subset([2, 0, -1])  # duplicates and negative positions count once
    assert sub.steps == [3, 5] and sub.window == 2 and sub.names == traj.names
    assert [float(sub.snapshot(i)["0.bias"][0]) for i in range(2)] == [3.0, 5.0]
    sub.data.zero_()  # a copy: the original is untouched
    assert float(traj.snapshot(-1)["0.bias"][0]) == 5.0
    with pytest.raises(TrajectoryError, match="at least one snapshot"):
        traj.subset([])


def test_load_keeps_tied_names_and_a_smaller_window(tmp_path: Path) -> None:
    model = Tied()
    traj = sewa.Trajectory(model, window=4)
    for step in range(3):
        traj.push(model, step=step)
    traj.save(tmp_path / "t.safetensors")
    back = sewa.Trajectory.load(tmp_path / "t.safetensors", window=2)
    assert back.steps == [1, 2] and back.window == 2
    assert back.aliases == traj.aliases
    snap = back.snapshot(-1)
    assert snap["head.weight"] is snap["embed.weight"]
    Tied().load_state_dict(snap)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no trajectory file"):
        sewa.Trajectory.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(TrajectoryError, match="cannot read"):
        sewa.Trajectory.load(junk)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(TrajectoryError, match="not a sewa trajectory file"):
        sewa.Trajectory.load(foreign)
