"""Regression tests for the storage and checkpoint-file findings of issue 12 (one test or more per finding)."""

from __future__ import annotations

import errno
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import sewa
import sewa.disk as disk
import sewa.trajectory as trajectory
from sewa import Trajectory, TrajectoryError, weights
from sewa.disk import DATA, EXTRAS, MANIFEST, DiskTrajectory
from sewa.io import (
    CheckpointError,
    atomic_write,
    load_state_dict_file,
    save_state_dict,
    trajectory_from_files,
)


def _net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(dtype)


def _fill(model: nn.Module, value: float) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- 3: 0-dim parameters
class _Scaled(nn.Module):
    """A learned temperature, as CLIP's ``logit_scale``: a 0-dim float parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))


def test_zero_dim_parameter_is_recorded_everywhere(tmp_path: Path) -> None:
    model = _Scaled()
    mem = Trajectory(model, 2)
    on_disk = DiskTrajectory(tmp_path / "d", model, 2)
    for step in (1, 2):
        with torch.no_grad():
            model.logit_scale.fill_(float(step))
        mem.push(model, step)
        on_disk.push(model, step)
        torch.save({"state_dict": model.state_dict(), "step": step}, tmp_path / f"c{step}.pt")
    from_files = trajectory_from_files([tmp_path / "c1.pt", tmp_path / "c2.pt"], _Scaled())
    for traj in (mem, on_disk, from_files):
        avg = sewa.average(traj, weights.uniform(2))
        assert avg["logit_scale"].shape == () and float(avg["logit_scale"]) == 1.5


# --------------------------------------------------------------------------- 4a: a refused push changes nothing
@pytest.mark.parametrize("failing", ["unlisting", MANIFEST, EXTRAS])
def test_disk_full_during_a_push_leaves_memory_and_disk_as_they_were(tmp_path: Path, failing: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while unlisting the oldest, or while writing the new manifest or extras."""
    model = _net()
    traj = DiskTrajectory(tmp_path, model, 2)
    for step in (1, 2):
        model[1].num_batches_tracked.fill_(step)
        traj.push(_fill(model, float(step)), step)
    files, steps, slots = _files(tmp_path), traj.steps, traj.slots
    rows, extras = traj.data.clone(), {k: v.clone() for k, v in traj.extras.items()}
    real_atomic, real_stage = disk.atomic_write, DiskTrajectory._stage

    def atomic(path: Path, write, **kw) -> None:  # type: ignore[no-untyped-def]
        if failing == "unlisting":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_atomic(path, write, **kw)

    def stage(self: DiskTrajectory, name: str, write) -> Path:  # type: ignore[no-untyped-def]
        def cut_short(tmp: Path) -> None:
            write(tmp)  # the temporary file is written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        return real_stage(self, name, cut_short if name == failing else write)

    monkeypatch.setattr(disk, "atomic_write", atomic)
    monkeypatch.setattr(DiskTrajectory, "_stage", stage)
    model[1].num_batches_tracked.fill_(3)
    with pytest.raises(OSError, match="No space"):
        traj.push(_fill(model, 3.0), 3)
    monkeypatch.undo()
    assert traj.steps == steps and traj.slots == slots and torch.equal(traj.data, rows)
    assert all(torch.equal(traj.extras[k], v) for k, v in extras.items())
    assert _files(tmp_path) == files
    traj.push(_fill(model, 4.0), 4)  # pushing again overwrites no listed row
    traj.close()
    again = DiskTrajectory.open(tmp_path)
    assert again.steps == [2, 4]
    assert [float(again.snapshot(i)["0.bias"][0]) for i in range(2)] == [2.0, 4.0]


# --------------------------------------------------------------------------- 4b: space is checked and reserved
def test_a_window_that_does_not_fit_in_memory_is_refused_naming_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trajectory, "free_memory", lambda device: 1000)
    with pytest.raises(TrajectoryError, match=r"needs 1,024 bytes.*has 1,000 free"):
        Trajectory(nn.Linear(3, 2), 32)  # 32 rows x 8 values x 4 bytes
    assert Trajectory(nn.Linear(3, 2), 31).nbytes == 992
    monkeypatch.undo()
    with pytest.raises(ValueError, match="bytes"):  # not OverflowError
        Trajectory(nn.Linear(3, 2), 2**62)


def test_a_window_that_does_not_fit_on_the_disk_is_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk, "disk_free", lambda directory: 1000)
    with pytest.raises(TrajectoryError, match=r"needs 1,024 bytes.*1,000 free"):
        DiskTrajectory(tmp_path / "t", nn.Linear(3, 2), 32)
    assert not (tmp_path / "t").exists()  # nothing left behind
    monkeypatch.undo()
    traj = DiskTrajectory(tmp_path / "t", nn.Linear(3, 2), 500)
    st = os.stat(tmp_path / "t" / DATA)
    if hasattr(os, "posix_fallocate"):  # reserved, not sparse: a full disk cannot SIGBUS a push
        assert st.st_blocks * 512 >= st.st_size == 500 * 8 * 4
    traj.close()


# --------------------------------------------------------------------------- 2: reader isolation
def test_a_reader_never_averages_rows_the_writer_overwrote(tmp_path: Path) -> None:
    model = _net()
    writer = DiskTrajectory(tmp_path, model, 3)
    for step in (1, 2):
        writer.push(_fill(model, float(step)), step)
    reader = DiskTrajectory.open(tmp_path, readonly=True)
    writer.push(_fill(model, 3.0), 3)  # fills the ring without overwriting: the reader is fine
    assert float(sewa.average(reader, weights.uniform(2))["0.bias"][0]) == 1.5
    writer.push(_fill(model, 4.0), 4)  # overwrites step 1's row
    with pytest.raises(TrajectoryError, match=r"dropped or moved steps \[1\]"):
        sewa.average(reader, weights.uniform(2))
    with pytest.raises(TrajectoryError, match="dropped or moved"):
        reader.snapshot(0)
    fresh = DiskTrajectory.open(tmp_path, readonly=True)
    assert fresh.steps == [2, 3, 4] and float(sewa.average(fresh, weights.uniform(3))["0.bias"][0]) == 3.0


# --------------------------------------------------------------------------- 5: duplicate files
def test_the_same_checkpoint_under_another_spelling_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        torch.save(_fill(_net(), float(step)).state_dict(), run / f"ckpt-{step}.pt")
    (tmp_path / "link.pt").symlink_to(run / "ckpt-1.pt")
    os.link(run / "ckpt-2.pt", tmp_path / "hard.pt")
    for spelling in ([run, run / ".." / "run" / "ckpt-2.pt"], [run / "ckpt-1.pt", (run / "ckpt-1.pt").absolute()],
                     [tmp_path / "link.pt", run / "ckpt-2.pt", run / "ckpt-1.pt"], [str(run), f"{run}/"],
                     [tmp_path / "hard.pt", run / "ckpt-2.pt"]):
        with pytest.raises(ValueError, match="same file as.*listed twice"):
            trajectory_from_files(spelling, _net())
    assert trajectory_from_files([run / "ckpt-2.pt", run / "ckpt-1.pt"], _net()).steps == [1, 2]


# --------------------------------------------------------------------------- 6: crafted zip
def test_a_storage_larger_than_its_zip_record_is_a_checkpoint_error(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"a": torch.arange(8.0), "b": torch.full((4,), 7.0)}, good)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():  # the pickle still claims 8 floats for data/0; keep 4
            data = src.read(info.filename)
            dst.writestr(info, data[:16] if info.filename.endswith("/data/0") else data)
    with pytest.raises(CheckpointError, match="bad.pt is corrupt"):
        load_state_dict_file(bad)
    with pytest.raises(CheckpointError, match="bad.pt is corrupt"):
        trajectory_from_files([good, bad])


# --------------------------------------------------------------------------- 7: --force and special files
def test_overwrite_replaces_only_regular_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    (tmp_path / "to_fifo").symlink_to(fifo)
    for path, kind in ((fifo, "a FIFO"), (tmp_path / "dir", "a directory"), (tmp_path / "to_fifo", "a FIFO")):
        with pytest.raises(ValueError, match=f"is {kind}, not a regular file"):
            atomic_write(path, lambda tmp: tmp.write_text("x"), overwrite=True)
    assert fifo.is_fifo() and (tmp_path / "dir").is_dir()
    plain = tmp_path / "plain.json"
    plain.write_text("old")
    atomic_write(plain, lambda tmp: tmp.write_text("new"), overwrite=True)
    assert plain.read_text() == "new"


# --------------------------------------------------------------------------- 11: wrapper prefixes
class _Clash(nn.Module):
    """A top-level ``weight`` and a submodule really called ``module``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2))
        self.module = nn.Linear(2, 2, bias=False)


def test_a_submodule_called_module_keeps_its_name() -> None:
    model = _Clash()
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.module.weight.fill_(2.0)
    traj = Trajectory(model, 2)
    assert traj.names == ["weight", "module.weight"]
    traj.push(model, 1)
    target = _Clash()
    sewa.apply(target, traj, [1.0])
    assert torch.equal(target.weight, torch.ones(2)) and torch.equal(target.module.weight, torch.full((2, 2), 2.0))


def test_real_wrappers_are_stripped_and_files_without_a_model_keep_their_keys(tmp_path: Path) -> None:
    inner = _fill(_net(), 1.0)
    compiled = torch.compile(inner)  # an OptimizedModule: names "_orig_mod.*" (nothing compiles until called)
    assert Trajectory(compiled, 1).names == Trajectory(inner, 1).names
    wrapped = {f"module.{k}": v for k, v in inner.state_dict().items()}
    for step in (1, 2):
        save_state_dict(wrapped, tmp_path / f"c{step}.safetensors")
    no_model = trajectory_from_files(tmp_path)
    assert set(sewa.average(no_model, weights.uniform(2))) == set(wrapped)  # loads where the inputs did
    with_model = trajectory_from_files(tmp_path, _net())
    assert set(sewa.average(with_model, weights.uniform(2))) == set(inner.state_dict())


# --------------------------------------------------------------------------- 12 and 13: precision
def test_float64_is_stored_and_averaged_in_float64(tmp_path: Path) -> None:
    model = _net(torch.float64)
    traj = Trajectory(model, 2)
    assert traj.dtype == torch.float64
    values = (1000.0 + 1e-9, 1000.0 + 3e-9)
    for step, v in enumerate(values, start=1):
        traj.push(_fill(model, v), step)
        save_state_dict(model.state_dict(), tmp_path / f"c{step}.safetensors")
    exact = (values[0] + values[1]) / 2
    for t in (traj, trajectory_from_files(tmp_path), trajectory_from_files(tmp_path, _net(torch.float64)),
              DiskTrajectory(tmp_path / "d", model, 1)):
        if len(t) == 0:
            t.push(_fill(model, exact), 1)
        avg = sewa.average(t, weights.uniform(len(t)))["0.bias"]
        assert t.dtype == torch.float64 and avg.dtype == torch.float64 and float(avg[0]) == exact
    assert Trajectory(_net(), 1).dtype == torch.float32
    assert Trajectory(_net(torch.bfloat16), 1).dtype == torch.bfloat16
    assert Trajectory(model, 1, dtype="float32").dtype == torch.float32  # a compact dtype on request


@pytest.mark.parametrize(("source", "storage", "value"), [(torch.float64, "float32", 1e300),
                                                         (torch.float32, "bfloat16", 3.4e38),
                                                         (torch.float32, "float16", 7e4)])
def test_a_finite_value_that_overflows_storage_is_refused_naming_it(source: torch.dtype, storage: str, value: float) -> None:
    model = _net(source)
    traj = Trajectory(model, 1, dtype=storage)
    traj.push(model, 1)
    with torch.no_grad():
        model[2].bias[1] = value
    with pytest.raises(TrajectoryError, match=rf"step 2 overflows {storage} storage in '2\.bias'"):
        traj.push(model, 2)
    assert traj.steps == [1] and bool(torch.isfinite(traj.data).all())


# --------------------------------------------------------------------------- 14: smaller findings
def test_a_corrupt_file_outside_the_window_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "ckpt-1.pt").write_bytes(b"PK\x03\x04 truncated")
    for step in (2, 3):
        torch.save({"model": _fill(_net(), float(step)).state_dict(), "step": step}, tmp_path / f"ckpt-{step}.pt")
    assert trajectory_from_files(tmp_path, _net(), window=2).steps == [2, 3]
    with pytest.raises(CheckpointError, match="ckpt-1.pt"):
        trajectory_from_files(tmp_path, _net(), window=3)


def test_a_tensor_in_another_floating_dtype_is_cast(tmp_path: Path) -> None:
    first = _fill(_net(), 1.0).state_dict()
    first["0.weight"] = first["0.weight"].half()
    torch.save(first, tmp_path / "c1.pt")
    torch.save(_fill(_net(), 3.0).state_dict(), tmp_path / "c2.pt")
    for model in (None, _net()):
        avg = sewa.average(trajectory_from_files(tmp_path, model), weights.uniform(2))
        assert torch.equal(avg["0.weight"].float(), torch.full((4, 3), 2.0))


def test_window_arguments_give_clear_errors(tmp_path: Path) -> None:
    torch.save(_net().state_dict(), tmp_path / "c1.pt")
    for bad in (True, 2.0, "3"):
        with pytest.raises(TypeError, match="window must be a positive integer"):
            trajectory_from_files(tmp_path, window=bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="window must be a positive integer"):
            Trajectory(_net(), bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window must be a positive integer, got 0"):
        trajectory_from_files(tmp_path, window=0)
    assert trajectory_from_files(tmp_path, window=2**62).window == 1  # never more rows than files


# --------------------------------------------------------------------------- 15: deferred NaN check
def test_deferred_check_never_lets_a_non_finite_row_be_read() -> None:
    """The CUDA path, forced on the CPU: no sync at push, the next read names the bad step."""
    model = _net()
    traj = Trajectory(model, 3)
    traj._defer_check = True
    traj.push(_fill(model, 1.0), 1)
    traj.push(_fill(model, float("nan")), 2)  # accepted without a host sync...
    traj.push(_fill(model, 3.0), 3)
    for read in (traj.matrix, lambda: traj.snapshot(1), lambda: sewa.average(traj, weights.uniform(3)), lambda: traj.subset([0, 1])):
        with pytest.raises(TrajectoryError, match=r"step 2 holds NaN or Inf"):  # ...but never read
            read()
    assert float(traj.snapshot(0)["0.bias"][0]) == 1.0  # the others can be read
    good = traj.subset([0, 2])
    assert float(sewa.average(good, weights.uniform(2))["0.bias"][0]) == 2.0
    traj.push(_fill(model, 4.0), 4)
    traj.push(_fill(model, 5.0), 5)  # step 2 has left the window
    assert float(sewa.average(traj, weights.uniform(3))["0.bias"][0]) == 4.0
    assert not traj._unchecked  # one check per read while nothing new was pushed


def test_manifest_records_a_generation_per_row(tmp_path: Path) -> None:
    model = _net()
    with DiskTrajectory(tmp_path, model, 2) as traj:
        for step in (1, 2, 3):
            traj.push(model, step)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["generation"] == 3 and [e[2] for e in manifest["entries"]] == [2, 3]
