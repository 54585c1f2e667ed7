"""The CUDA code paths against the CPU ones. Skipped without a CUDA device (CI has none); run
on a GPU machine with ``pytest tests/test_cuda.py tests/test_recording.py -k cuda``."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_distributed import OPTIONS, WINDOW, _problem
from torch import nn

import sewa
from sewa._engine import MixedLoss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cpu_trajectory() -> tuple[nn.Module, sewa.Trajectory, list[tuple[torch.Tensor, torch.Tensor]]]:
    model, snaps, batches = _problem()
    traj = sewa.Trajectory(model, window=WINDOW)
    for step, state in enumerate(snaps):
        model.load_state_dict(state)
        traj.push(model, step)
    return model, traj, batches


@pytest.mark.parametrize("vectorize", [True, False])
def test_engine_on_cuda_matches_cpu_in_float64(vectorize: bool) -> None:
    model, traj, batches = _cpu_trajectory()
    x, y = batches[0]
    mix = torch.softmax(torch.randn(4, len(traj), generator=torch.Generator().manual_seed(0), dtype=torch.float64), 1)
    ref_loss, ref_grad = MixedLoss(traj, model, F.cross_entropy, dtype=torch.float64)(mix, (x.double(), y))
    engine = MixedLoss(traj, model, F.cross_entropy, dtype=torch.float64, device="cuda", vectorize=vectorize)
    loss, grad = engine(mix, (x.double(), y))  # a CPU mix and a CPU batch: the engine moves them
    assert grad.device == mix.device
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_select_on_cuda_from_a_cpu_trajectory_matches_cpu() -> None:
    model, traj, batches = _cpu_trajectory()
    on_cpu = sewa.select(traj, model, F.cross_entropy, batches, **OPTIONS)
    on_gpu = sewa.select(traj, model, F.cross_entropy, batches, device="cuda", **OPTIONS)
    assert on_gpu.indices == on_cpu.indices
    torch.testing.assert_close(on_gpu.probabilities, on_cpu.probabilities, rtol=0, atol=1e-4)


def test_fsdp2_on_cuda_with_nccl_matches_one_process(tmp_path: Path) -> None:
    """One rank, NCCL, an FSDP2 model on the GPU, CPU batches: the engine computes where the
    model's shards live and moves the batches there."""
    from torch.distributed.fsdp import fully_shard

    from sewa import distributed as sd

    model, traj, batches = _cpu_trajectory()
    expected = sewa.select(traj, model, F.cross_entropy, batches, **OPTIONS)
    _, snaps, _ = _problem()
    sd.init("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
            timeout=datetime.timedelta(seconds=60))
    try:
        sharded = fully_shard(_problem()[0].cuda())
        straj = sd.ShardedTrajectory(sharded, WINDOW)
        for step, state in enumerate(snaps):
            with torch.no_grad():
                for name, p in sharded.named_parameters():
                    p.to_local().copy_(state[name])
            straj.push(sharded, step)
        sel = sd.select(straj, sharded, F.cross_entropy, batches, **OPTIONS)
        assert sel.config["distributed"]["mode"] == "fsdp"
        assert sel.indices == expected.indices
        torch.testing.assert_close(sel.probabilities.cpu(), expected.probabilities, rtol=0, atol=1e-4)
    finally:
        torch.distributed.destroy_process_group()


def test_recording_a_cuda_model_reports_a_non_finite_snapshot_at_synchronize() -> None:
    model = nn.Sequential(nn.Linear(4, 3)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    traj = sewa.Trajectory(model, window=4)
    rec = sewa.record(traj, opt, model, every=1)
    assert rec.asynchronous
    x = torch.randn(8, 4, device="cuda")
    for poison in (False, True):
        opt.zero_grad()
        model(x).sum().backward()
        if poison:
            model[0].weight.grad.fill_(float("nan"))
        opt.step()
    with pytest.raises(sewa.TrajectoryError, match="step 2"):
        rec.synchronize()  # the background push of step 2 refused it
    rec.remove()
    assert traj.steps == [1]


def test_a_gpu_trajectory_defers_its_finite_check_to_the_next_read() -> None:
    """A push into a GPU trajectory does not wait for the GPU; the next read names the bad step."""
    model = nn.Linear(3, 2).cuda()
    traj = sewa.Trajectory(model, 3, device="cuda")
    traj.push(model, 1)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    traj.push(model, 2)  # no error yet: the check is on the device
    with pytest.raises(sewa.TrajectoryError, match="step 2"):
        traj.matrix()
