"""Selection, averaging and saving over a :class:`ShardedTrajectory`; call each on every rank."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .._batch import cycle_batches
from .._names import named_parameters
from ..average import average_flat as _average_flat
from ..bn import has_batchnorm
from ..select import Engine, Selection, refuse_nonfinite_rows, run_selection, select_settings
from ..trajectory import Trajectory
from ._comm import CommStats, collective, comm_device
from .engines import FSDPEngine, ReplicatedEngine, Share, share_of, unwrap
from .trajectory import ShardedTrajectory

__all__ = ["DistributedContext", "select", "average_flat", "average", "apply", "save_average"]


class DistributedContext:
    """How :func:`select` runs over a :class:`ShardedTrajectory`: the engine, whose values are
    reduced over ranks, and this rank's feed of batch shares, for :func:`sewa.select.run_selection`.
    :func:`select` makes one for you.

    Args:
        split_batches: Split every batch along its first dimension over the ranks (data
            parallel; the loss is weighted by sample counts, so it equals the whole batch's
            mean when ``loss_fn`` averages over samples). ``False``: every rank runs whole
            batches (no gradient reduce-scatter; needed when a batch cannot be split).
            ``None``: split unless the model has BatchNorm evaluated on batch statistics
            (statistics of a part of a batch differ from the whole batch's).

    Attributes:
        comm: The bytes moved by the engine's collectives (:class:`CommStats`).
        splitting: Whether batches are split (decided when the engine is made).
    """

    def __init__(self, *, split_batches: bool | None = None) -> None:
        self.split_batches = split_batches
        self.splitting = bool(split_batches) if split_batches is not None else True
        self.comm = CommStats()
        self.rank, self.world_size = 0, 1

    def engine(self, trajectory: ShardedTrajectory, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], *,
               batch_stats: bool = True, vectorize: bool | None = None,
               device: torch.device | str | None = None) -> Engine:
        """The selection engine for ``trajectory``."""
        if not isinstance(trajectory, ShardedTrajectory):
            raise TypeError(f"distributed selection needs a sewa.distributed.ShardedTrajectory, got {type(trajectory).__name__}")
        self.rank, self.world_size = trajectory.rank, trajectory.world_size
        if self.split_batches is None:
            self.splitting = not (batch_stats and has_batchnorm(model))
        cls = FSDPEngine if trajectory.mode == "fsdp" else ReplicatedEngine
        return cls(self.comm, trajectory, model, loss_fn, batch_stats=batch_stats, vectorize=vectorize, device=device)

    def feed(self, batches: Iterable[Any]) -> Iterator[Share]:
        """This rank's share of every batch, cycled (one per selection step)."""
        for batch in cycle_batches(batches):
            yield share_of(batch, self.splitting, self.rank, self.world_size)


def _agree(trajectory: ShardedTrajectory, options: dict[str, Any]) -> None:
    """Raises the same error on every rank if the ranks hold different snapshots or options."""
    summary = {"steps": trajectory.steps, "num_params": trajectory.num_params, "mode": trajectory.mode,
               "options": sorted((k, repr(v)) for k, v in options.items() if k != "progress")}
    gathered: list[Any] = [None] * trajectory.world_size
    with collective("comparing the ranks' settings", trajectory.group):
        dist.all_gather_object(gathered, summary, group=trajectory.group)
    for rank, other in enumerate(gathered):
        for key in summary:
            if other[key] != gathered[0][key]:
                raise ValueError(f"rank {rank} has {key}={other[key]!r} but rank 0 has {gathered[0][key]!r}: every rank must "
                                 "record the same steps and call select with the same options")
    if len(trajectory) == 0:
        return
    rows, order = trajectory.matrix()
    finite = torch.isfinite(rows).all(dim=1).to(comm_device(trajectory.group), torch.int32)
    with collective("checking the snapshots", trajectory.group):
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=trajectory.group)
    refuse_nonfinite_rows(finite.cpu(), order, trajectory.steps)


def select(
    trajectory: ShardedTrajectory,
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batches: Iterable[Any],
    *,
    split_batches: bool | None = None,
    **options: Any,
) -> Selection:
    """:func:`sewa.select` over a :class:`ShardedTrajectory`; call it on every rank.

    Every rank gets the same :class:`~sewa.Selection` (same seed, same reduced values). The
    communication per step is listed in ``selection.config["distributed"]``.

    Args:
        trajectory: The sharded snapshots.
        model: The model: the replicated one (copied, never modified) or the FSDP2 one (used in
            place and left as it was).
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch's samples.
        batches: The selection batches, the same on every rank (each is split over the ranks).
        split_batches: See :class:`DistributedContext`.
        **options: Passed to :func:`sewa.select` (``top_k``, ``samples``, ``steps``, ``seed``…);
            they must be equal on every rank.

    Raises:
        ValueError: if the ranks hold different steps or were given different options.
        DistributedError: if a collective fails (another rank died or stopped).
    """
    engine_options, settings = select_settings(**options)
    _agree(trajectory, engine_options | settings)
    if trajectory.rank != 0:
        settings["progress"] = False
    ctx = DistributedContext(split_batches=split_batches)
    with trajectory.reading():
        engine = ctx.engine(trajectory, model, loss_fn, **engine_options)
        sel = run_selection(engine, ctx.feed(batches), trajectory.steps, config={"batch_stats": engine_options["batch_stats"]},
                            **settings)
    sel.config["distributed"] = {
        "world_size": trajectory.world_size,
        "mode": trajectory.mode,
        "split_batches": ctx.splitting,
        "comm_bytes_per_step": ctx.comm.per_step(),
        "snapshot_bytes": len(trajectory) * trajectory.num_params * trajectory.data.element_size(),
    }
    return sel


def average_flat(trajectory: ShardedTrajectory, weights: Tensor | Sequence[float]) -> Tensor:
    """This rank's columns of ``Σ_i w_i θ_i`` (float32, accumulated in float64); no communication."""
    return _average_flat(cast(Trajectory, trajectory), weights)


def average(trajectory: ShardedTrajectory, weights: Tensor | Sequence[float], *, dst: int | None = 0) -> dict[str, Tensor] | None:
    """The weighted average as a full state dict on rank ``dst`` (``None``: on every rank).

    Ranks that do not receive it get ``None``. Non-recorded entries come from the newest
    snapshot, as in :func:`sewa.average`.
    """
    full = trajectory.gather(average_flat(trajectory, weights), dst)
    return None if full is None else trajectory.layout.unflatten(full)


def apply(model: nn.Module, trajectory: ShardedTrajectory, weights: Tensor | Sequence[float]) -> nn.Module:
    """Loads the weighted average into ``model`` on every rank and returns it.

    FSDP2 models receive their local shards (no communication); replicated models the full
    average (one all_gather). Recompute BatchNorm statistics afterwards with
    :func:`sewa.update_bn` if the model has any.
    """
    trajectory.layout.check_compatible(model)
    local = average_flat(trajectory, weights)
    if trajectory.mode == "fsdp":
        named = named_parameters(model, expected=trajectory.names)
        with torch.no_grad():
            for piece in trajectory.pieces:
                shard = cast(DTensor, named[trajectory.names[piece.index]]).to_local()
                shard.view(-1).copy_(local[piece.dst : piece.dst + piece.length])
        return model
    state = trajectory.layout.unflatten(cast(Tensor, trajectory.gather(local, None)))
    inner = unwrap(model)
    device = next(inner.parameters()).device
    inner.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    return model


def save_average(
    trajectory: ShardedTrajectory,
    weights: Tensor | Sequence[float],
    path: str | Path,
    *,
    format: str = "safetensors",
    dst: int = 0,
) -> Path:
    """Saves the weighted average; call it on every rank.

    Args:
        trajectory: The sharded snapshots.
        weights: One weight per held snapshot, oldest first.
        path: A ``.safetensors`` file, or a directory for ``format="dcp"``.
        format: ``"safetensors"``: rank ``dst`` gathers the full average (P values) and writes
            one file (tied names are stored once; the ``sewa`` metadata lists them).
            ``"dcp"`` (FSDP2 trajectories): every rank writes its own shards with
            ``torch.distributed.checkpoint``, nothing is gathered; load it with ``dcp.load``
            into the sharded model, or ``dcp_to_torch_save`` for one file.
        dst: The writing rank for ``"safetensors"``.

    Returns:
        ``path``, once every rank is done.
    """
    path = Path(path)
    if format == "dcp":
        if trajectory.mode != "fsdp":
            raise ValueError("format='dcp' writes FSDP2 shards; a replicated trajectory saves with format='safetensors'")
        import torch.distributed.checkpoint as dcp

        with collective("writing the sharded checkpoint", trajectory.group):
            dcp.save(_sharded_state(trajectory, average_flat(trajectory, weights)), checkpoint_id=str(path))
        return path
    if format != "safetensors":
        raise ValueError(f"unknown format {format!r}: use 'safetensors' or 'dcp'")
    state = average(trajectory, weights, dst=dst)
    if state is not None:
        from safetensors.torch import save_file

        aliases = trajectory.layout.aliases
        tensors = {k: v.contiguous() for k, v in state.items() if k not in aliases}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"sewa": json.dumps({"aliases": aliases, "steps": trajectory.steps})})
        tmp.replace(path)
    with collective("waiting for the average to be written", trajectory.group):
        dist.barrier(group=trajectory.group)
    return path


def _sharded_state(trajectory: ShardedTrajectory, local: Tensor) -> dict[str, Any]:
    """The local average as the FSDP2 model's state dict of DTensors (plus the extras)."""
    state: dict[str, Any] = {}
    for piece, (mesh, placements, shape, stride, local_shape, dtype) in zip(trajectory.pieces, trajectory._specs, strict=True):
        values = local[piece.dst : piece.dst + piece.length].view(local_shape).to(dtype)
        state[trajectory.names[piece.index]] = DTensor.from_local(values, mesh, placements, shape=shape, stride=stride,
                                                                  run_check=False)
    state.update({k: v.clone() for k, v in trajectory.layout.extras.items()})
    return state
