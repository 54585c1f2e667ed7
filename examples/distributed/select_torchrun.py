"""SeWA under torchrun: record a sharded trajectory while training, select, save the average.

    torchrun --nproc_per_node=2 examples/distributed/select_torchrun.py --out averaged.safetensors
    torchrun --nproc_per_node=2 examples/distributed/select_torchrun.py --fsdp --out averaged_dcp

Each rank keeps only its slice of the ``(window, P)`` snapshot matrix. With DDP (the default) a
rank records its slice of the flattened parameters; with ``--fsdp`` (FSDP2 ``fully_shard``) it
records its local shards. The data are synthetic, so the script needs no download.
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import sewa
from sewa import distributed as sd


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy 4-class problem on 20 features (the same on every rank for a given seed)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 20, generator=torch.Generator().manual_seed(0)) * 1.5
    y = torch.randint(0, 4, (n,), generator=gen)
    return centers[y] + torch.randn(n, 20, generator=gen) * 2.0, y


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return sum(float(F.cross_entropy(model(x), y)) for x, y in batches) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 instead of DDP")
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--every", type=int, default=10, help="record a snapshot every this many steps")
    parser.add_argument("--window", type=int, default=40, help="snapshots kept (k)")
    parser.add_argument("--top-k", type=int, default=10, help="snapshots averaged (K)")
    parser.add_argument("--select-steps", type=int, default=100, help="selection steps")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a collective waits for the other ranks")
    parser.add_argument("--out", default="averaged.safetensors", help="file (or directory with --fsdp)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    rank, world = sd.init(timeout=datetime.timedelta(seconds=args.timeout))  # NCCL where CUDA is
    cuda = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)).to(device)
    if args.fsdp:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        trained: nn.Module = fully_shard(model)
    else:
        trained = DistributedDataParallel(model, device_ids=[device] if cuda else None)
    opt = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9)

    x, y = (t.to(device) for t in make_data(4096, seed=1))
    x, y = x[rank::world], y[rank::world]  # data parallel training: each rank its own samples
    traj = sd.ShardedTrajectory(trained, window=args.window)
    gen = torch.Generator().manual_seed(rank)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=gen).to(device)
        opt.zero_grad()
        F.cross_entropy(trained(x[idx]), y[idx]).backward()
        opt.step()
        if step % args.every == 0:
            traj.push(trained, step)  # no communication but one flag (check_finite)

    # The selection split is the same on every rank; select splits each batch over the ranks.
    xv, yv = (t.to(device) for t in make_data(1024, seed=2))
    val = [(xv[i : i + 128], yv[i : i + 128]) for i in range(0, len(xv), 128)]
    sel = sd.select(traj, trained, F.cross_entropy, val, top_k=args.top_k, steps=args.select_steps, seed=0)

    losses = {}
    for name, weights in [("last", sewa.weights.last(len(traj))), ("uniform", sewa.weights.uniform(len(traj))),
                          ("sewa", sel.weights)]:
        sd.apply(trained, traj, weights)
        losses[name] = mean_loss(trained, val)
    sd.save_average(traj, sel.weights, args.out, format="dcp" if args.fsdp else "safetensors")
    if rank == 0:
        info = sel.config["distributed"]
        print(f"{world} ranks ({info['mode']}), P = {traj.num_params:,}, this rank holds {traj.local_params:,} "
              f"columns of {len(traj)} snapshots ({traj.nbytes / 2**20:.2f} MiB)")
        print(f"selected steps {sel.steps} in {sel.seconds:.1f}s")
        print("validation loss: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        print(f"engine communication per step (bytes): {info['comm_bytes_per_step']}, "
              f"snapshot matrix: {info['snapshot_bytes']:,} bytes")
        print(f"saved the SeWA average to {args.out}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
