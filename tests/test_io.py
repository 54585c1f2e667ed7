"""Checkpoint files: formats, wrappers, ordering, bad files, and that inputs are never written."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sewa import Trajectory, TrajectoryError
from sewa.io import (
    CheckpointError,
    load_state_dict_file,
    order_checkpoints,
    save_state_dict,
    step_of,
    trajectory_from_files,
    unwrap_state_dict,
)


def _net(seed: int = 0, hidden: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 2))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


class _Lit(nn.Module):  # what a LightningModule holding ``self.model`` saves: keys "model.*"
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.model = inner


class _DDP(nn.Module):  # DDP's attribute name: keys "module.*"
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


WRAPPERS = {
    "plain": lambda m: m.state_dict(),
    "state_dict_key": lambda m: {"state_dict": m.state_dict(), "epoch": 3},
    "model_key": lambda m: {"model": m.state_dict(), "optimizer": {"lr": 0.1}},
    "module_key": lambda m: {"module": m.state_dict()},
    "lightning": lambda m: {"state_dict": _Lit(m).state_dict(), "global_step": 7},
    "ddp": lambda m: _DDP(m).state_dict(),
    "compiled": lambda m: {f"_orig_mod.{k}": v for k, v in m.state_dict().items()},
    "ddp_of_compiled": lambda m: {f"module._orig_mod.{k}": v for k, v in m.state_dict().items()},
}


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors", "legacy.pt"])
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_round_trip_each_format_and_wrapper(tmp_path: Path, suffix: str, wrapper: str) -> None:
    model = _net()
    obj = WRAPPERS[wrapper](model)
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        if wrapper not in ("plain", "ddp", "compiled", "ddp_of_compiled"):
            pytest.skip("safetensors files hold a flat mapping of tensors only")
        save_file(obj, str(path))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=suffix != "legacy.pt")
    before = _sha(path)
    _same(load_state_dict_file(path), model.state_dict())
    assert _sha(path) == before


def test_unwrap_keeps_a_real_submodule_called_model() -> None:
    inner = _net()
    outer = _Lit(inner)  # the user's own architecture has a submodule named "model"
    names = [k for k, v in outer.state_dict().items() if v.is_floating_point()]
    got = unwrap_state_dict({"state_dict": outer.state_dict()}, expected=names)
    assert set(got) == set(outer.state_dict())
    assert set(unwrap_state_dict({"state_dict": outer.state_dict()})) == set(inner.state_dict())


def test_unwrap_errors_name_the_source() -> None:
    with pytest.raises(CheckpointError, match="my.pt holds no tensors"):
        unwrap_state_dict({"epoch": 1}, source="my.pt")
    with pytest.raises(CheckpointError, match="my.pt holds a list"):
        unwrap_state_dict([1, 2], source="my.pt")


def test_step_of(tmp_path: Path) -> None:
    a = tmp_path / "a.pt"
    torch.save({"state_dict": _net().state_dict(), "global_step": torch.tensor(12)}, a)
    b = tmp_path / "b.safetensors"
    save_state_dict(_net().state_dict(), b, metadata={"step": "40"})
    c = tmp_path / "c.pt"
    torch.save(_net().state_dict(), c)
    assert step_of(a) == 12 and step_of(b) == 40 and step_of(c) is None
    assert step_of("x", {"iteration": 5.0}) == 5 and step_of("x", {"step": True}) is None


def test_order_natural_sort_and_stored_steps(tmp_path: Path) -> None:
    sd = _net().state_dict()
    for n in (10, 2, 1):
        torch.save(sd, tmp_path / f"ckpt-{n}.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert [p.name for p in order_checkpoints(tmp_path)] == ["ckpt-1.pt", "ckpt-2.pt", "ckpt-10.pt"]
    # stored steps win over names
    d = tmp_path / "stored"
    d.mkdir()
    for name, step in (("a", 300), ("b", 100), ("c", 200)):
        torch.save({"model": sd, "step": step}, d / f"{name}.pt")
    assert [p.name for p in order_checkpoints(d)] == ["b.pt", "c.pt", "a.pt"]
    # transformers layout: checkpoint-N/model.safetensors
    h = tmp_path / "hf"
    for n in (500, 1000, 50):
        (h / f"checkpoint-{n}").mkdir(parents=True)
        save_state_dict(sd, h / f"checkpoint-{n}" / "model.safetensors")
    assert [p.parent.name for p in order_checkpoints(h)] == ["checkpoint-50", "checkpoint-500", "checkpoint-1000"]
    traj = trajectory_from_files(h)
    assert traj.steps == [50, 500, 1000]


def test_order_refuses_duplicate_steps_and_missing_paths(tmp_path: Path) -> None:
    sd = _net().state_dict()
    torch.save({"model": sd, "step": 5}, tmp_path / "a.pt")
    torch.save({"model": sd, "step": 5}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="both hold step 5"):
        order_checkpoints(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        order_checkpoints([tmp_path / "nowhere.pt"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint files"):
        order_checkpoints(empty)


def _training_files(tmp_path: Path, steps: list[int], fmt: str) -> list[dict[str, torch.Tensor]]:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    states = []
    for step in steps:
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(8, 3)).pow(2).mean().backward()
            opt.step()
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        states.append(sd)
        if fmt == "safetensors":
            save_state_dict(sd, tmp_path / f"step_{step}.safetensors", metadata={"step": str(step)})
        else:
            torch.save({"state_dict": sd, "global_step": step}, tmp_path / f"step_{step}.pt")
    return states


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_trajectory_from_files_matches_pushing_by_hand(tmp_path: Path, fmt: str) -> None:
    steps = [3, 6, 9, 12, 15]
    states = _training_files(tmp_path, steps, fmt)
    before = _hashes(tmp_path)
    for model in (None, _net(seed=1)):
        traj = trajectory_from_files(tmp_path, model, window=3)
        ref = Trajectory(_net() if model is not None else states[0], window=3)
        for step, sd in zip(steps, states, strict=True):
            ref.push(sd, step)
        assert traj.steps == ref.steps == [9, 12, 15]
        assert set(traj.names) == set(ref.names)  # safetensors stores names sorted
        for i in range(3):
            _same(traj.snapshot(i), ref.snapshot(i))
    # without a template model every floating entry is recorded, BatchNorm statistics included
    assert "1.running_mean" in trajectory_from_files(tmp_path).names
    assert "1.running_mean" not in trajectory_from_files(tmp_path, _net()).names
    traj16 = trajectory_from_files(tmp_path, _net(), dtype="bfloat16")
    assert traj16.dtype == torch.bfloat16 and len(traj16) == 5
    assert _hashes(tmp_path) == before


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.safetensors"
    save_state_dict(_net().state_dict(), good)
    data = good.read_bytes()
    files = {"truncated_safetensors": tmp_path / "trunc.safetensors",
             "random_pt": tmp_path / "random.pt",
             "truncated_pt": tmp_path / "trunc.pt",
             "pickled_object": tmp_path / "object.pt",
             "pickled_code": tmp_path / "code.pt",
             "wrong_arch": tmp_path / "wide.pt"}
    files["truncated_safetensors"].write_bytes(data[: len(data) // 2])
    files["random_pt"].write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.uint8).numpy().tobytes())
    torch.save(_net().state_dict(), files["truncated_pt"])
    files["truncated_pt"].write_bytes(files["truncated_pt"].read_bytes()[:300])
    torch.save({"state_dict": _net().state_dict(), "config": _Config()}, files["pickled_object"])
    torch.save({"state_dict": _net().state_dict(), "config": _Unsafe()}, files["pickled_code"])
    torch.save(_net(hidden=7).state_dict(), files["wrong_arch"])
    return files


class _Config:  # an ordinary custom class, as training scripts often pickle into checkpoints
    def __init__(self) -> None:
        self.lr = 0.1


class _Unsafe:
    def __reduce__(self) -> tuple[object, tuple[str]]:  # what a malicious file would do on load
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("case,error,message", [
    ("truncated_safetensors", CheckpointError, "not a valid safetensors file"),
    ("random_pt", CheckpointError, "corrupt or in another format"),
    ("truncated_pt", CheckpointError, "corrupt or truncated"),
    ("pickled_object", CheckpointError, "_Config.*weights_only=True"),
    ("pickled_code", CheckpointError, "system.*weights_only=True"),
    ("wrong_arch", TrajectoryError, "shape"),
])
def test_bad_files_name_the_file_and_are_left_untouched(tmp_path: Path, case: str, error: type, message: str) -> None:
    files = _bad_files(tmp_path)
    before = _hashes(tmp_path)
    bad = files[case]
    good = tmp_path / "good.safetensors"
    with pytest.raises(error, match=message) as info:
        trajectory_from_files([good, bad], _net())
    assert str(bad) in str(info.value)
    if case != "wrong_arch":
        with pytest.raises(CheckpointError) as info:
            load_state_dict_file(bad)
        assert str(bad) in str(info.value)
    assert _hashes(tmp_path) == before


def test_wrong_architecture_without_template_names_the_file(tmp_path: Path) -> None:
    a, b = tmp_path / "ckpt-1.pt", tmp_path / "ckpt-2.pt"
    torch.save(_net().state_dict(), a)
    sd = _net().state_dict()
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, b)
    with pytest.raises(TrajectoryError, match="ckpt-2.pt.*extra.weight"):
        trajectory_from_files(tmp_path)


def test_save_state_dict_ties_atomicity_and_overwrite(tmp_path: Path) -> None:
    emb = nn.Embedding(4, 3)
    head = nn.Linear(3, 4, bias=False)
    head.weight = emb.weight  # tied: one storage, two names
    state = {"emb.weight": emb.weight, "head.weight": head.weight, "rows": torch.arange(6.0).view(2, 3)[1]}
    path = save_state_dict(state, tmp_path / "tied.safetensors")
    got = load_state_dict_file(path)
    _same(got, {k: v.detach() for k, v in state.items()})
    assert [p.name for p in tmp_path.iterdir()] == ["tied.safetensors"]  # no temporary left behind
    before = _sha(path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_state_dict({"a": torch.ones(2)}, path)
    assert _sha(path) == before
    save_state_dict({"a": torch.ones(2)}, path, overwrite=True)
    assert set(load_state_dict_file(path)) == {"a"}
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_state_dict({"a": torch.ones(2)}, tmp_path / "x.pt")
    with pytest.raises(TypeError, match="'lr'"):
        save_state_dict({"lr": 0.1}, tmp_path / "y.safetensors")  # type: ignore[dict-item]
