"""Distributed selection (sewa.distributed) on gloo: ranks are spawned processes on this machine.

Every multi-rank test compares against single-process :func:`sewa.select` and
:class:`sewa.Trajectory` computed here, on the same snapshots, batches and seed.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sewa
from sewa import distributed as sd
from sewa.select import SelectionError

pytestmark = pytest.mark.distributed

WINDOW = 8
SNAPSHOTS = 11  # more than WINDOW: the ring wraps
OPTIONS = dict(top_k=3, samples=4, steps=25, lr=0.1, seed=3, tau_start=1.0, tau_end=0.2)
JOIN_SECONDS = 120  # a hung rank fails the test instead of the suite


def _problem() -> tuple[nn.Module, list[dict[str, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """A tiny classifier, its snapshots along a short SGD run, and selection batches.

    P = 113 (prime, so slices are uneven over 2 and 4 ranks); batches of 10 samples split 5/5 and
    3/3/2/2.
    """
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 11), nn.Tanh(), nn.Linear(11, 3))
    x = torch.randn(40, 6, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    snaps = []
    for i in range(SNAPSHOTS):
        idx = torch.arange(i % 4 * 10, i % 4 * 10 + 10)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
    return model, snaps, batches


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target)


def _shard_like(model: nn.Module, state: dict[str, torch.Tensor], rank: int, world: int) -> None:
    """Writes full tensors into an FSDP2 model's local shards (what a training step would do)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            lo, hi = sd.shard_bounds(p.shape[0], world, rank)
            p.to_local().copy_(state[name][lo:hi])


def _worker(rank: int, world: int, scenario: str, out: str) -> None:
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    try:
        sd.init("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world,
                timeout=datetime.timedelta(seconds=20))
        model, snaps, batches = _problem()
        if scenario == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))  # gloo on CPU, also where CUDA is present
            fully_shard(model[0], mesh=mesh)
            fully_shard(model[2], mesh=mesh)
            fully_shard(model, mesh=mesh)
        # A stuck rank is only noticed by the timeout: a group with a short one keeps the test quick.
        group = torch.distributed.new_group(timeout=datetime.timedelta(seconds=5)) if scenario == "hang" else None
        traj = sd.ShardedTrajectory(model, WINDOW, group=group)
        for step, state in enumerate(snaps):
            if scenario == "fsdp":
                _shard_like(model, state, rank, world)
            else:
                model.load_state_dict(state)
            traj.push(model, step)
        if scenario == "nan":
            # A NaN in the last rank's columns only: every rank must refuse the snapshot.
            try:
                traj.push(_nan_snapshot(snaps), 100)
            except sewa.TrajectoryError as e:
                result["nan_error"] = str(e)
            result["steps_after_nan"] = traj.steps
        loss_fn = _loss
        if scenario in ("die", "hang"):
            calls = [0]

            def loss_fn(out_: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                calls[0] += 1
                if rank == world - 1 and calls[0] == 5:
                    if scenario == "die":
                        os._exit(3)  # dies mid-selection, without a word to the others
                    time.sleep(8)  # stuck past the group's 5 s timeout, but alive
                return _loss(out_, target)

        before = [p.to_local().clone() for p in model.parameters()] if scenario == "fsdp" else None
        # A one-shot iterator of batches is read once and cycled, as by sewa.select.
        given = iter(batches) if scenario == "replicated" else batches
        started = time.monotonic()
        try:
            sel = sd.select(traj, model, loss_fn, given, **OPTIONS)
        finally:
            result["select_seconds"] = time.monotonic() - started
        result.update(probabilities=sel.probabilities, indices=sel.indices, loss=sel.history["loss"],
                      distributed=sel.config["distributed"], local_params=traj.local_params)
        if before is not None:
            result["model_unchanged"] = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters(), strict=True))
        full = traj.to_trajectory(0)
        if full is not None:
            rows, order = full.matrix()
            result.update(rows=rows[order].clone(), steps=full.steps)
        if scenario == "fsdp":
            sd.save_average(traj, sel.weights, f"{out}/avg_dcp", format="dcp")
        else:
            sd.save_average(traj, sel.weights, f"{out}/avg.safetensors")
        if scenario == "nan":
            # A loss that turns NaN on the last rank only: the reduced loss is NaN on every rank,
            # and every rank stops with the same SelectionError.
            def nan_loss(out_: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return _loss(out_, target) * (float("nan") if rank == world - 1 else 1.0)

            try:
                sd.select(traj, model, nan_loss, batches, **OPTIONS)
            except SelectionError as e:
                result["selection_error"] = str(e)
        torch.distributed.destroy_process_group()
    except BaseException as e:  # reported to the test through the result file
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    torch.save(result, f"{out}/rank{rank}.pt")


def _run(world: int, scenario: str, tmp_path: Path) -> tuple[list[dict[str, Any]], list[int | None], float]:
    """Spawns ``world`` ranks and waits for them with a wall-clock bound."""
    # A fork server imports torch once; each rank is then a cheap fork of a process that never
    # started a thread or a process group (plain fork from pytest would inherit both).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed.fsdp", "sewa.distributed", __name__])
    procs = [ctx.Process(target=_worker, args=(r, world, scenario, str(tmp_path)), daemon=True) for r in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=max(1.0, JOIN_SECONDS - (time.monotonic() - start)))
    elapsed = time.monotonic() - start
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    assert not hung, f"ranks {hung} still running after {JOIN_SECONDS}s: a collective hung"
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) if (tmp_path / f"rank{r}.pt").exists() else {}
               for r in range(world)]
    return results, [p.exitcode for p in procs], elapsed


def _nan_snapshot(snaps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The newest snapshot with a NaN in the last parameter: in the last rank's columns only."""
    bad = {k: v.clone() for k, v in snaps[-1].items()}
    bad["2.bias"][-1] = float("nan")
    return bad


def _reference() -> tuple[sewa.Trajectory, sewa.Selection]:
    torch.set_num_threads(1)
    model, snaps, batches = _problem()
    traj = sewa.Trajectory(model, WINDOW)
    for step, state in enumerate(snaps):
        model.load_state_dict(state)
        traj.push(model, step)
    return traj, sewa.select(traj, model, _loss, batches, **OPTIONS)  # type: ignore[arg-type]


def _check_against_reference(results: list[dict[str, Any]]) -> tuple[sewa.Trajectory, sewa.Selection]:
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}: {res.get('traceback', res)}"
    traj, ref = _reference()
    for res in results:
        # Identical decisions on every rank (bit for bit), equal to one process up to float32 noise.
        assert torch.equal(res["probabilities"], results[0]["probabilities"])
        assert res["indices"] == results[0]["indices"]
    got = results[0]
    diff = float((got["probabilities"] - ref.probabilities).abs().max())
    assert diff < 1e-5, f"probabilities differ from single-process select by {diff:.2e}"
    assert got["indices"] == ref.indices
    assert max(abs(a - b) for a, b in zip(got["loss"], ref.history["loss"], strict=True)) < 1e-5
    # The recording, gathered, equals the single-process recording bit for bit.
    rows, order = traj.matrix()
    assert got["steps"] == traj.steps
    assert torch.equal(got["rows"], rows[order])
    return traj, ref


def test_shard_bounds_cover_the_vector_once() -> None:
    for p in (1, 5, 113, 128):
        for world in (1, 2, 3, 4, 7):
            bounds = [sd.shard_bounds(p, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == p
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            sizes = [hi - lo for lo, hi in bounds]
            assert sizes == [len(c) for c in torch.arange(p).chunk(world)] + [0] * (world - len(torch.arange(p).chunk(world)))


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    results, codes, _ = _run(2, "nan", tmp_path)
    traj, ref = _check_against_reference(results)
    assert codes == [0, 0]
    # A NaN loss on rank 1 only stopped the selection on both ranks, at the first step.
    assert all(r["selection_error"].startswith("selection step 1 of 25: the loss") for r in results)
    # The NaN was in rank 1's columns only; both ranks refused the snapshot, which changed nothing.
    assert "'2.bias'" in results[1]["nan_error"] and "another rank" in results[0]["nan_error"]
    assert results[0]["steps_after_nan"] == results[1]["steps_after_nan"] == traj.steps
    assert [r["local_params"] for r in results] == [57, 56]
    # rank 0 gathered and wrote the average; it equals the single-process average.
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "avg.safetensors"))
    expected = sewa.average(traj, ref.weights)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    # Communication per step: all_gather and reduce_scatter of (M, R·ceil(P/R)) float32, and
    # the all_reduce of (M, k+1) float64.
    m, k, width = OPTIONS["samples"], WINDOW, 57
    assert results[0]["distributed"]["comm_bytes_per_step"] == {
        "all_gather": m * 2 * width * 4, "reduce_scatter": m * 2 * width * 4, "all_reduce": m * (k + 1) * 8}


def test_four_ranks_match_one_process(tmp_path: Path) -> None:
    results, codes, _ = _run(4, "replicated", tmp_path)
    _check_against_reference(results)
    assert codes == [0, 0, 0, 0]
    assert [r["local_params"] for r in results] == [29, 29, 29, 26]


def test_fsdp2_records_local_shards_and_matches_one_process(tmp_path: Path) -> None:
    results, codes, _ = _run(2, "fsdp", tmp_path)
    traj, ref = _check_against_reference(results)
    assert codes == [0, 0]
    assert all(r["model_unchanged"] for r in results)
    assert results[0]["distributed"]["mode"] == "fsdp"
    assert results[0]["distributed"]["comm_bytes_per_step"]["all_gather"] == 0
    # Each rank wrote its own shards with torch.distributed.checkpoint.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(tmp_path / "avg_dcp", tmp_path / "avg.pt")
    saved = torch.load(tmp_path / "avg.pt", weights_only=True)
    expected = sewa.average(traj, ref.weights)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_a_dead_rank_makes_the_others_fail_fast(tmp_path: Path) -> None:
    results, codes, elapsed = _run(2, "die", tmp_path)
    assert codes[1] == 3  # the rank that died
    error = results[0].get("error", "")
    assert error.startswith("DistributedError") and "another rank died" in error, results[0]
    assert "rank 0 of 2" in error
    assert elapsed < JOIN_SECONDS


def test_a_stuck_rank_makes_the_others_fail_after_the_timeout(tmp_path: Path) -> None:
    results, codes, elapsed = _run(2, "hang", tmp_path)
    error = results[0].get("error", "")
    assert error.startswith("DistributedError") and "rank 0 of 2" in error, results[0]
    # rank 0 gave up on the group's 5 s timeout, not on the other rank's return.
    assert results[0]["select_seconds"] < 8
    assert elapsed < JOIN_SECONDS
