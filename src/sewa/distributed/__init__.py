"""SeWA across processes with ``torch.distributed``: the snapshot matrix sharded along P.

The cost of selection is the ``(k, P)`` snapshot matrix ``Θ``. Here each rank holds only its
columns ``Θ_r`` (k, S_r), for every snapshot, the way FSDP shards parameters:

- **replicated / DDP models**: rank ``r`` stores the contiguous slice ``[lo_r, hi_r)`` of the
  flattened parameter vector (:func:`shard_bounds`), copied from the parameter views that
  overlap it;
- **FSDP2 models** (``torch.distributed.fsdp.fully_shard``): rank ``r`` stores exactly its local
  shards (``DTensor.to_local()``), so recording communicates nothing.

One selection step then reads, with ``A`` (M, k) the mixing weights of the M mask samples:

    W_r = A Θ_r                          each rank mixes its columns (one matrix product)
    W   = [W_0 | … | W_{R-1}]            replicated: one all_gather of the (M, S_r) blocks;
                                         FSDP2: W_r are the sharded parameters themselves
    G   = ∂L/∂W                          forward/backward on this rank's share of the batch;
                                         gradients reduced so that rank r holds G_r (M, S_r)
    ∂L/∂A = Σ_r G_r Θ_rᵀ                 one all_reduce of an (M, k+1) tensor (the loss rides
                                         along in the last column)

and every rank takes the same step on ``φ`` (same seed, same reduced values). Under FSDP2 the
all-gather of ``W`` and the reduce-scatter of ``G`` are the model's own forward/backward
collectives, so the all_reduce of (M, k+1) numbers is the only extra communication. With a
replicated model there is no such free lunch: the all_gather of ``W`` and the reduce-scatter of
``G`` are each ``O(M·P)`` per step (still ``k`` times less than moving ``Θ``); see
:class:`CommStats`.

Every collective runs under the process group's timeout, so a rank that dies makes the others
raise :class:`DistributedError` instead of hanging: start with :func:`init`, which sets a finite
timeout.

Example (under ``torchrun --nproc_per_node=2``)::

    rank, world = sewa.distributed.init()
    traj = sewa.distributed.ShardedTrajectory(model, window=50)
    ...  # traj.push(model, step) on every rank, at the same steps
    sel = sewa.distributed.select(traj, model, loss_fn, val_batches, top_k=10)
    sewa.distributed.save_average(traj, sel.weights, "averaged.safetensors")

The package: :mod:`._comm` (process group, failed collectives, byte counts),
:mod:`.trajectory` (:class:`ShardedTrajectory`), :mod:`.engines` (the two engines, built from
the single-process engine's parts), :mod:`.api` (select, average, save).
"""

from __future__ import annotations

from ._comm import CommStats, DistributedError, init, shard_bounds
from .api import DistributedContext, apply, average, average_flat, save_average, select
from .trajectory import ShardedTrajectory

__all__ = [
    "init",
    "shard_bounds",
    "ShardedTrajectory",
    "DistributedContext",
    "DistributedError",
    "CommStats",
    "select",
    "average_flat",
    "average",
    "apply",
    "save_average",
]
