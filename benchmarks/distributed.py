"""Time per selection step and communication per step of sewa.distributed, on gloo processes.

Run (about 2-4 minutes on a 2-core machine)::

    python benchmarks/distributed.py
    python benchmarks/distributed.py --params 100000 1000000 --worlds 1 2 4 --modes replicated fsdp

For every model size P, every mode (``replicated``: a DDP-style model, the snapshot matrix
sharded along P; ``fsdp``: a ``fully_shard`` model recording its local shards) and every world
size R, R processes on this machine record the same k snapshots and run
:func:`sewa.distributed.select`; single-process :func:`sewa.select` on the same snapshots is the
baseline, measured in the same run. Each process uses one thread, so R processes need R cores to
speed anything up: on a 2-core machine expect no gain beyond 2 and the point of the figures is
the communication. The engine's communication per step is read from the engine's own counters
(``sewa.distributed.CommStats``): the all_reduce of (M, k+1) float64 does not depend on P; the
replicated mode's all_gather of W and reduce_scatter of G are O(M·P); FSDP2's own all-gathers
and reduce-scatters inside forward/backward are the model's usual cost and are not counted.

Output: JSON lines on stdout and in ``benchmarks/results/distributed.jsonl`` (rewritten). The
first line is ``{"kind": "machine", ...}``; then one ``{"kind": "result", ...}`` per run, with
``seconds_per_step`` (median over repeats) and ``ratio_to_single_process`` (this run's
seconds per step over the baseline's of the same P; below 1 is faster).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import JsonLines, emit, human_bytes, machine, median, mlp, ms, table  # noqa: E402

import sewa  # noqa: E402
from sewa import distributed as sd  # noqa: E402
from sewa.trajectory import canonical_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.jsonl"


def make_model(params: int) -> nn.Module:
    """An MLP 64 → H → H → 10 with about ``params`` parameters (seeded)."""
    torch.manual_seed(0)
    return mlp(params)


def snapshots(model: nn.Module, window: int) -> list[dict[str, torch.Tensor]]:
    """``window`` deterministic perturbations of the model's weights (the same on every rank)."""
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    for i in range(window):
        gen = torch.Generator().manual_seed(1000 + i)
        out.append({k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in base.items()})
    return out


def batches(batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(batch, 64, generator=gen), torch.randint(0, 10, (batch,), generator=gen)) for _ in range(4)]


def _time_selection(run: Any, steps: int, repeats: int) -> tuple[list[float], Any]:
    run(2)  # warm-up: first-call costs (allocation, checks) are not per-step costs
    times, sel = [], None
    for _ in range(repeats):
        sel = run(steps)
        times.append(sel.seconds / steps)
    return times, sel


def worker(rank: int, world: int, mode: str, cfg: dict[str, Any], out: str) -> None:
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    try:
        model = make_model(cfg["params"])
        snaps, data = snapshots(model, cfg["window"]), batches(cfg["batch"])
        options = dict(top_k=cfg["window"] // 4, samples=cfg["samples"], seed=0)
        if mode == "single_process":
            traj = sewa.Trajectory(model, cfg["window"])
            start = time.perf_counter()
            for step, state in enumerate(snaps):
                traj.push(state, step)
            push = (time.perf_counter() - start) / len(snaps)

            def run(steps: int) -> Any:
                return sewa.select(traj, model, F.cross_entropy, data, steps=steps, **options)

            times, _ = _time_selection(run, cfg["steps"], cfg["repeats"])
            result.update(seconds_per_step_runs=times, push_seconds=push, local_snapshot_bytes=traj.nbytes)
        else:
            sd.init("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
            if mode == "fsdp":
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                mesh = init_device_mesh("cpu", (world,))
                for layer in model:
                    if isinstance(layer, nn.Linear):
                        fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
            traj_r = sd.ShardedTrajectory(model, cfg["window"])
            names = {canonical_name(n): p for n, p in model.named_parameters()}
            start = time.perf_counter()
            for step, state in enumerate(snaps):
                if mode == "fsdp":  # what a training step leaves in the local shards
                    with torch.no_grad():
                        for name, p in names.items():
                            lo, hi = sd.shard_bounds(p.shape[0], world, rank)
                            p.to_local().copy_(state[name][lo:hi])
                    traj_r.push(model, step)
                else:
                    traj_r.push(state, step)
            push = (time.perf_counter() - start) / len(snaps)

            def run(steps: int) -> Any:
                return sd.select(traj_r, model, F.cross_entropy, data, steps=steps, **options)

            times, sel = _time_selection(run, cfg["steps"], cfg["repeats"])
            result.update(seconds_per_step_runs=times, push_seconds=push, local_snapshot_bytes=traj_r.nbytes,
                          comm_bytes_per_step=sel.config["distributed"]["comm_bytes_per_step"],
                          params=traj_r.num_params)
            torch.distributed.destroy_process_group()
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    if rank == 0:
        Path(out, "result.json").write_text(json.dumps(result))


def launch(world: int, mode: str, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("forkserver")
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=worker, args=(r, world, mode, cfg, out), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        path = Path(out, "result.json")
        result = json.loads(path.read_text()) if path.exists() else {"error": f"no result within {timeout:.0f}s"}
    if "error" in result:
        raise RuntimeError(f"{mode} with {world} processes failed: {result['error']}")
    return result


def render(records: list[dict[str, Any]]) -> str:
    """The "Distributed selection" section of docs/PERFORMANCE.md from this benchmark's records."""
    recs = [r for r in records if r.get("kind") == "result"]
    rows = [[r["mode"], r["world_size"], f"{r['params']:,}", r["window"], r["samples"], ms(r["seconds_per_step"]),
             f"{r['ratio_to_single_process']:.2f}", human_bytes(r["snapshot_matrix_bytes"]), human_bytes(r["local_snapshot_bytes"]),
             f"{r['all_reduce_bytes_per_step']:,.0f}", human_bytes(r["comm_bytes_per_step_total"]), f"{r['comm_over_snapshot_matrix']:.2e}"]
            for r in recs]
    return "\n".join([
        "## Distributed selection", "",
        "`python benchmarks/distributed.py` (gloo, one thread per process, on the machine above; 2 cores, so no speed-up "
        "is expected). The point is the communication: the all-reduce of the (M, k+1) mask gradient is the same number "
        "of bytes whatever P is. The replicated (DDP) mode also all-gathers the mixed weights and reduce-scatters their "
        "gradients, O(M·P); under FSDP2 those are FSDP's own collectives inside forward/backward.", "",
        table(["mode", "ranks", "P", "k", "M", "ms / step", "vs 1 process", "snapshot matrix", "per rank",
               "all-reduce bytes / step", "engine comm / step", "comm / matrix"], rows), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000], help="model sizes P")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="process counts")
    parser.add_argument("--modes", nargs="+", default=["replicated", "fsdp"], choices=["replicated", "fsdp"])
    parser.add_argument("--window", type=int, default=32, help="snapshots k")
    parser.add_argument("--samples", type=int, default=4, help="mask samples M")
    parser.add_argument("--batch", type=int, default=64, help="samples per selection batch")
    parser.add_argument("--steps", type=int, default=8, help="selection steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (the median is kept)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per launch")
    parser.add_argument("--out", default=str(RESULTS), help="JSON-lines file (rewritten)")
    args = parser.parse_args()
    mp.get_context("forkserver").set_forkserver_preload(["__main__", "torch", "torch.distributed.fsdp", "sewa.distributed"])

    sink = JsonLines(args.out, fresh=True)
    emit({"kind": "machine", "benchmark": "distributed", **machine()}, sink)
    for params in args.params:
        actual = sum(p.numel() for p in make_model(params).parameters())
        cfg = dict(params=params, window=args.window, samples=args.samples, batch=args.batch,
                   steps=args.steps, repeats=args.repeats)
        snapshot_bytes = args.window * actual * 4
        runs = [(1, "single_process")] + [(w, m) for m in args.modes for w in args.worlds]
        baseline = None
        for world, mode in runs:
            res = launch(world, mode, cfg, args.timeout)
            per_step = median(res["seconds_per_step_runs"])
            baseline = per_step if mode == "single_process" else baseline
            comm = res.get("comm_bytes_per_step", {})
            total = sum(comm.values())
            emit({
                "kind": "result", "benchmark": "distributed", "mode": mode, "world_size": world,
                "params": actual, "window": args.window, "samples": args.samples, "batch": args.batch,
                "steps": args.steps, "seconds_per_step": per_step, "seconds_per_step_runs": res["seconds_per_step_runs"],
                "ratio_to_single_process": per_step / baseline if baseline else None,
                "push_seconds": res["push_seconds"],
                "snapshot_matrix_bytes": snapshot_bytes, "local_snapshot_bytes": res["local_snapshot_bytes"],
                "comm_bytes_per_step": comm, "comm_bytes_per_step_total": total,
                "all_reduce_bytes_per_step": comm.get("all_reduce", 0),
                "comm_over_snapshot_matrix": total / snapshot_bytes,
                "load_average_1min": machine()["load_average_1min"],
            }, sink)


if __name__ == "__main__":
    main()
