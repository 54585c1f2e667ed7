"""Recording during training: the hook records exactly what hand-made state_dict copies hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sewa import Trajectory
from sewa.recording import Recorder, record, resolve_start

STEPS = 30


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> dict[int, dict[str, torch.Tensor]]:
    """Trains and returns hand-made ``state_dict`` copies after every optimizer step."""
    g = torch.Generator().manual_seed(seed)
    copies = {}
    for step in range(1, steps + 1):
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        copies[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return copies


def _check(traj: Trajectory, copies: dict[int, dict[str, torch.Tensor]], expected_steps: list[int]) -> None:
    assert traj.steps == expected_steps
    for i, step in enumerate(expected_steps):
        snap = traj.snapshot(i)
        for name in traj.names:
            assert torch.equal(snap[name], copies[step][name]), (step, name)


@pytest.mark.parametrize("start,total,expected", [
    (0, None, list(range(3, STEPS + 1, 3))),
    (7, None, [9, 12, 15, 18, 21, 24, 27, 30]),
    (0.5, STEPS, [15, 18, 21, 24, 27, 30]),
    (0.55, STEPS, [18, 21, 24, 27, 30]),  # ceil(16.5) = 17, first multiple of 3 is 18
])
@pytest.mark.parametrize("buffers", [False, True])
def test_hook_equals_hand_copies(start: int | float, total: int | None, expected: list[int], buffers: bool) -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    traj = Trajectory(model, window=STEPS, buffers=buffers)
    rec = record(traj, opt, model, every=3, start=start, total_steps=total)
    copies = _train(model, opt, STEPS)
    rec.remove()
    assert rec.step == STEPS and rec.recorded == len(expected)
    _check(traj, copies, expected)
    assert ("1.running_mean" in traj.names) == buffers
    # non-recorded entries (here the BatchNorm counters) come from the newest snapshot
    assert torch.equal(traj.extras["1.num_batches_tracked"], copies[STEPS]["1.num_batches_tracked"])


def test_ring_keeps_the_newest_and_remove_stops_recording() -> None:
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    traj = Trajectory(model, window=4, dtype="bfloat16")
    with record(traj, opt, model, every=2) as rec:
        copies = _train(model, opt, 20)
    assert traj.steps == [14, 16, 18, 20] and rec.recorded == 10
    for i, step in enumerate(traj.steps):
        for name in traj.names:
            assert torch.equal(traj.snapshot(i)[name], copies[step][name].bfloat16().float())
    _train(model, opt, 5)  # detached: nothing more is recorded
    assert traj.steps == [14, 16, 18, 20]


def test_explicit_maybe_push_equals_hook() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    traj = Trajectory(model, window=STEPS)
    rec = Recorder(traj, model, every=5, start=10)
    g = torch.Generator().manual_seed(1)
    copies = {}
    for step in range(1, STEPS + 1):
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        copies[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        assert rec.maybe_push(step) == (step >= 10 and step % 5 == 0)
    _check(traj, copies, [10, 15, 20, 25, 30])


def test_deferred_push_path_on_cpu() -> None:
    """The asynchronous path's bookkeeping (staging, deferred push, finishing) without CUDA."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    traj = Trajectory(model, window=5, buffers=True)
    rec = record(traj, opt, model, every=3, asynchronous=True)
    copies = _train(model, opt, 20)
    rec.synchronize()
    _check(traj, copies, [6, 9, 12, 15, 18])
    rec.synchronize()  # nothing in flight: no-op
    assert traj.steps == [6, 9, 12, 15, 18]
    copies.update(_train(model, opt, 1))  # step 21: due, staged
    rec.remove()  # remove finishes it
    assert traj.steps[-1] == 21


class _Wrapper(nn.Module):
    """Holds the model under the attribute name DDP uses."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.module(x)


def test_wrapped_models_record_under_plain_names() -> None:
    model = _net()
    wrapped = _Wrapper(_Wrapper(model))
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    traj = Trajectory(model, window=10)  # template: the bare model
    rec = record(traj, opt, wrapped, every=2)
    copies = _train(wrapped, opt, 6)
    rec.remove()
    assert traj.names[0] == "0.weight"
    assert traj.steps == [2, 4, 6]
    for i, step in enumerate(traj.steps):
        for name in traj.names:
            assert torch.equal(traj.snapshot(i)[name], copies[step][f"module.module.{name}"])


def test_ddp_model_records_under_plain_names(tmp_path: Path) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        traj = Trajectory(ddp, window=10)
        assert traj.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
        with record(traj, opt, ddp, every=1):
            copies = _train(ddp, opt, 3)
        _check(traj, {s: {k.removeprefix("module."): v for k, v in c.items()} for s, c in copies.items()}, [1, 2, 3])
    finally:
        dist.destroy_process_group()


def test_torch_compiled_model_records_under_plain_names() -> None:
    model = _net()
    compiled = torch.compile(model, backend="eager")  # eager backend: no C compiler needed
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    traj = Trajectory(compiled, window=10)
    assert traj.names == [n for n, _ in model.named_parameters()]
    with record(traj, opt, compiled, every=2):
        copies = _train(compiled, opt, 4)
    _check(traj, {s: {k.removeprefix("_orig_mod."): v for k, v in c.items()} for s, c in copies.items()}, [2, 4])


def test_arguments_and_resume_checks() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    traj = Trajectory(model, window=10)
    with pytest.raises(ValueError, match="total_steps"):
        record(traj, opt, model, start=0.5)
    with pytest.raises(ValueError, match="fraction"):
        record(traj, opt, model, start=1.5, total_steps=10)
    with pytest.raises(ValueError, match="every"):
        record(traj, opt, model, every=0)
    with pytest.raises(TypeError, match="start"):
        resolve_start(True, 10)
    assert resolve_start(0.25, 10) == 3 and resolve_start(1.0, 10) == 10 and resolve_start(4, None) == 4
    with record(traj, opt, model, every=2):
        _train(model, opt, 4)
    assert traj.steps == [2, 4]
    with pytest.raises(ValueError, match="initial_step"):
        record(traj, opt, model, every=2)  # counting from 0 again would record step 2 twice
    with record(traj, opt, model, every=2, initial_step=4):
        _train(model, opt, 2)
    assert traj.steps == [2, 4, 6]
    rec = Recorder(traj, model)
    rec.attach(opt, initial_step=6)
    with pytest.raises(RuntimeError, match="already attached"):
        rec.attach(opt)
    rec.remove()
    with pytest.raises(Exception, match="another architecture|shape"):
        Recorder(traj, nn.Linear(4, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_model_cpu_trajectory_pinned_side_stream(dtype: torch.dtype) -> None:
    model = _net().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    traj = Trajectory(model, window=STEPS, dtype=dtype, buffers=True)
    rec = record(traj, opt, model, every=3)
    assert rec.asynchronous
    g = torch.Generator().manual_seed(1)
    copies = {}
    for step in range(1, STEPS + 1):
        x, y = torch.randn(16, 4, generator=g).cuda(), torch.randint(0, 3, (16,), generator=g).cuda()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        copies[step] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    rec.remove()
    assert rec._copy is not None and rec._copy.staging["0.weight"].is_pinned()
    assert traj.steps == list(range(3, STEPS + 1, 3))
    for i, step in enumerate(traj.steps):
        for name in traj.names:
            assert torch.equal(traj.snapshot(i)[name], copies[step][name].to(dtype).float()), (step, name)
