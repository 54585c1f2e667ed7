"""The disk-backed trajectory: same behaviour as the in-memory one, and nothing lost to a crash."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import sewa
from sewa import Trajectory, TrajectoryError
from sewa.disk import DATA, EXTRAS, MANIFEST, DiskTrajectory

WINDOW = 5


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))


def _state(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    """A deterministic state dict for ``step``: what the worker records and the test recomputes."""
    g = torch.Generator().manual_seed(step)
    out = {}
    for name, t in model.state_dict().items():
        out[name] = torch.randn(t.shape, generator=g) if t.is_floating_point() else torch.full(t.shape, step)
    return out


def _check_listed(traj: Trajectory, model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    for i, step in enumerate(traj.steps):
        want = _state(model, step)
        got = traj.snapshot(i)
        for name in traj.names:
            assert torch.equal(got[name], want[name].to(dtype).float()), (step, name)


def test_matches_in_memory_trajectory(tmp_path: Path) -> None:
    model = _net()
    mem = Trajectory(model, WINDOW, dtype="bfloat16")
    disk = DiskTrajectory(tmp_path / "t", model, WINDOW, dtype="bfloat16")
    for step in range(1, 13):
        sd = _state(model, step)
        mem.push(sd, step)
        disk.push(sd, step)
        rows_m, order_m = mem.matrix()
        rows_d, order_d = disk.matrix()
        assert torch.equal(rows_m, rows_d) and torch.equal(order_m, order_d)
    assert disk.steps == mem.steps == list(range(8, 13))
    assert torch.equal(disk.extras["1.num_batches_tracked"], torch.tensor(12))
    w = sewa.weights.uniform(len(disk))
    for name, t in sewa.average(disk, w).items():
        assert torch.equal(t, sewa.average(mem, w)[name])
    disk.close()
    again = DiskTrajectory.open(tmp_path / "t")
    assert again.steps == mem.steps and again.names == mem.names and again.buffers is False
    assert torch.equal(again.matrix()[0], mem.matrix()[0])
    assert torch.equal(again.extras["1.num_batches_tracked"], torch.tensor(12))
    assert json.loads((tmp_path / "t" / MANIFEST).read_text())["entries"][-1][:2] == [again.slots[-1], 12]


def test_resume_with_the_model_and_refuse_another(tmp_path: Path) -> None:
    model = _net()
    with DiskTrajectory(tmp_path, model, WINDOW) as traj:
        for step in (10, 20):
            traj.push(_state(model, step), step)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = nn.Sequential(nn.Linear(16, 33), nn.BatchNorm1d(33), nn.ReLU(), nn.Linear(33, 8))
    for bad, message in ((lambda: DiskTrajectory(tmp_path, other, WINDOW), "'0.weight' has shape"),
                         (lambda: DiskTrajectory(tmp_path, model, WINDOW + 1), "window=5"),
                         (lambda: DiskTrajectory(tmp_path, model, WINDOW, dtype="float16"), "storage"),
                         (lambda: DiskTrajectory(tmp_path, model, WINDOW, buffers=True), "buffers")):
        with pytest.raises(TrajectoryError, match=message) as info:
            bad()
        assert "another model" in str(info.value) and str(tmp_path) in str(info.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # never overwritten
    with DiskTrajectory(tmp_path, model, WINDOW) as traj:
        assert traj.steps == [10, 20]
        with pytest.raises(TrajectoryError, match="not after"):
            traj.push(_state(model, 15), 15)
        traj.push(_state(model, 30), 30)
        _check_listed(traj, model)


def test_one_writer_and_read_only_opening(tmp_path: Path) -> None:
    model = _net()
    traj = DiskTrajectory(tmp_path, model, WINDOW)
    traj.push(_state(model, 1), 1)
    with pytest.raises(RuntimeError, match="open for writing"):
        DiskTrajectory(tmp_path, model, WINDOW)
    reader = DiskTrajectory.open(tmp_path, readonly=True)
    assert reader.steps == [1]
    reader.data.zero_()  # copy-on-write: the file is not touched
    with pytest.raises(RuntimeError, match="read-only"):
        reader.push(_state(model, 2), 2)
    traj.close()
    with pytest.raises(RuntimeError, match="closed"):
        traj.push(_state(model, 2), 2)
    _check_listed(DiskTrajectory.open(tmp_path), model)
    with pytest.raises(FileNotFoundError, match="no sewa disk trajectory"):
        DiskTrajectory.open(tmp_path / "elsewhere")


def test_nan_snapshot_is_not_listed(tmp_path: Path) -> None:
    model = _net()
    traj = DiskTrajectory(tmp_path, model, 2)
    for step in (1, 2):
        traj.push(_state(model, step), step)
    bad = _state(model, 3)
    bad["3.bias"][0] = float("nan")
    with pytest.raises(TrajectoryError, match="NaN"):
        traj.push(bad, 3)
    traj.close()
    again = DiskTrajectory.open(tmp_path)
    assert again.steps == [1, 2]  # a refused push changes nothing, on disk as in memory
    _check_listed(again, model)
    again.push(_state(model, 4), 4)
    _check_listed(again, model)


def test_huge_but_finite_snapshot_is_recorded(tmp_path: Path) -> None:
    """The fast NaN/Inf check (one sum) overflows here; the exact check must then accept."""
    model = _net()
    traj = DiskTrajectory(tmp_path, model, 2)
    big = _state(model, 1)
    big["0.weight"].fill_(3e38)
    traj.push(big, 1)
    assert traj.steps == [1] and torch.equal(traj.snapshot(0)["0.weight"], big["0.weight"])


def test_damaged_directories_are_reported(tmp_path: Path) -> None:
    model = _net()
    DiskTrajectory(tmp_path, model, WINDOW).close()
    (tmp_path / DATA).write_bytes(b"short")
    with pytest.raises(TrajectoryError, match="damaged"):
        DiskTrajectory.open(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(TrajectoryError, match="not valid JSON"):
        DiskTrajectory(tmp_path, model, WINDOW)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(TrajectoryError, match="not a sewa disk trajectory"):
        DiskTrajectory.open(tmp_path)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("phase", ["before_row", "mid_row", "before_extras", "mid_manifest", "before_listing"])
def test_crash_at_each_phase_of_a_full_ring_push(tmp_path: Path, phase: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A simulated crash at each point of the write protocol leaves every listed snapshot intact."""

    model = _net()
    traj = DiskTrajectory(tmp_path, model, WINDOW)
    for step in range(1, WINDOW + 1):
        traj.push(_state(model, step), step)
    real_write, real_install = DiskTrajectory._write, DiskTrajectory._install

    def write(self: DiskTrajectory, row: torch.Tensor, sources: list[torch.Tensor]) -> None:
        if phase == "before_row":
            raise _Crash
        real_write(self, row, sources)
        if phase == "mid_row":
            row[row.numel() // 2 :] = float("nan")  # what a half-written row looks like
            raise _Crash

    def install(self: DiskTrajectory, tmp: Path, name: str) -> None:
        if phase == "before_extras" and name == EXTRAS:
            raise _Crash
        if phase == "mid_manifest" and name == MANIFEST:
            tmp.write_text('{"format": "sewa.disk/1", "entr')  # a torn temporary file, left behind
            raise _Crash
        if phase == "before_listing" and name == MANIFEST:
            raise _Crash
        real_install(self, tmp, name)

    monkeypatch.setattr(DiskTrajectory, "_write", write)
    monkeypatch.setattr(DiskTrajectory, "_install", install)
    monkeypatch.setattr(DiskTrajectory, "_recover", lambda *a: None)  # a killed process recovers nothing
    with pytest.raises(_Crash):
        traj.push(_state(model, WINDOW + 1), WINDOW + 1)
    monkeypatch.undo()
    traj._unlock()  # the crashed "process" is gone
    again = DiskTrajectory(tmp_path, model, WINDOW)
    assert again.steps == list(range(2, WINDOW + 1))  # the oldest was unlisted first; nothing else lost
    assert set(again.slots) == set(range(len(again)))  # the hole left by the crash was filled
    _check_listed(again, model)
    assert not list(tmp_path.glob(".*.tmp"))
    again.push(_state(model, 10), 10)
    again.push(_state(model, 11), 11)
    assert again.steps == [3, 4, 5, 10, 11]
    _check_listed(again, model)
    _check_listed(DiskTrajectory.open(tmp_path, readonly=True), model)


# --------------------------------------------------------------------------- the kill test
def _worker(directory: str, sync: bool, dtype: str) -> None:
    """Records deterministic snapshots forever, resuming after the newest listed step."""
    torch.set_num_threads(1)
    model = _net()
    traj = DiskTrajectory(directory, model, WINDOW, dtype=dtype, sync=sync)
    step = traj.steps[-1] + 1 if len(traj) else 1
    while True:
        model.load_state_dict(_state(model, step))
        traj.push(model, step)
        step += 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork() to start workers quickly")
def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    """>= 20 workers SIGKILLed at random moments: each reopened directory is consistent,
    every listed snapshot is bit-identical to what was recorded, and recording resumes."""
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    model = _net()
    trials, holes, newest, directory = 24, 0, 0, tmp_path
    started = time.monotonic()
    for trial in range(trials):
        if trial % 8 == 0:  # a fresh directory now and then: kills during creation too
            directory, newest = tmp_path / f"run{trial}", 0
        dtype = "bfloat16" if trial >= 16 else "float32"
        worker = ctx.Process(target=_worker, args=(str(directory), trial % 2 == 0, dtype), daemon=True)
        worker.start()
        time.sleep(rng.uniform(0.05, 0.35))
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        assert worker.exitcode == -signal.SIGKILL, "the worker died before it was killed"
        if not (directory / MANIFEST).exists():
            continue  # killed before the directory was created: nothing was promised
        manifest = json.loads((directory / MANIFEST).read_text())  # valid JSON, never torn
        assert manifest["window"] == WINDOW and len(manifest["entries"]) <= WINDOW
        reader = DiskTrajectory.open(directory, readonly=True)
        steps = reader.steps
        _check_listed(reader, model, getattr(torch, dtype))
        # snapshots are pushed one step apart: only the one being written can be missing
        if steps:
            assert steps == list(range(steps[0], steps[0] + len(steps)))
        if steps and steps[0] > 1:
            assert len(steps) >= WINDOW - 1
            holes += len(steps) == WINDOW - 1
        assert not steps or steps[-1] >= newest  # resuming never lost a listed snapshot
        newest = steps[-1] if steps else newest
    # the last directory resumes in this process too
    traj = DiskTrajectory(directory, model, WINDOW, dtype="bfloat16")
    before = traj.steps
    traj.push(_state(model, before[-1] + 1), before[-1] + 1)
    assert traj.steps == (before + [before[-1] + 1])[-WINDOW:]
    _check_listed(traj, model, torch.bfloat16)
    assert newest > 3 * WINDOW, "the workers made too little progress for the test to mean much"
    print(f"{trials} kills in {time.monotonic() - started:.1f}s; {holes} caught between unlisting and listing")
