"""The distributed selection engines and this rank's share of each batch.

Both engines hold a :class:`RankColumns`: a :class:`~sewa._columns.Columns` over this rank's
columns ``Θ_r`` (the products ``W_r = A Θ_r`` and ``G_r Θ_rᵀ``) and the all_reduce that
completes ``∂L/∂A``; they differ in how ``W`` meets the model:

- :class:`ReplicatedEngine`: all_gather ``W``, run :class:`~sewa._engine.ModelPasses` (the
  single-process passes) on this rank's share of the batch, reduce_scatter ``G``;
- :class:`FSDPEngine`: write ``W_r`` into the FSDP2 model's local shards and let the model's own
  collectives run.

Both follow the :class:`sewa.select.Engine` protocol: ``engine(mix, share) -> (loss, grad)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .._batch import forward, split_batch, to_device
from .._columns import Columns
from .._engine import ModelPasses, batch_statistics, restore_statistics, selection_model
from .._names import named_parameters
from ..trajectory import TrajectoryError
from ._comm import (
    CommStats,
    all_gather_single,
    collective,
    engine_device,
    is_comm_error,
    reduce_scatter_single,
)
from .trajectory import ShardedTrajectory

__all__ = ["Share", "share_of", "unwrap", "RankColumns", "ReplicatedEngine", "FSDPEngine"]


@dataclass
class Share:
    """This rank's part of one batch: ``weight`` is its share of the batch's mean loss."""

    inputs: Any
    targets: Any
    weight: float
    count: int  # samples here; -1 when every rank runs whole batches
    size: int  # samples in the whole batch; -1 when not split


def _first_tensor(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _split(x: Any, parts: int, index: int, size: int) -> Any:
    if isinstance(x, Tensor):
        if x.dim() == 0 or x.shape[0] != size:
            raise ValueError(f"cannot split a batch across ranks: a tensor has leading size {tuple(x.shape)[:1]}, "
                             f"the batch has {size} samples; pass split_batches=False to give every rank whole batches")
        return torch.tensor_split(x, parts)[index]
    if isinstance(x, (tuple, list)):
        return type(x)(_split(v, parts, index, size) for v in x)
    if isinstance(x, dict):
        return {k: _split(v, parts, index, size) for k, v in x.items()}
    return x


def share_of(batch: Any, splitting: bool, rank: int, world_size: int) -> Share:
    """This rank's :class:`Share` of ``batch``: split along the first dimension
    (``torch.tensor_split``'s sizes) when ``splitting``, else the whole batch."""
    inputs, targets = split_batch(batch)
    if not splitting:
        return Share(inputs, targets, 1.0, -1, -1)
    first = _first_tensor(inputs)
    if first is None or first.dim() == 0:
        raise ValueError("cannot split a batch whose inputs hold no batched tensor: pass split_batches=False")
    size = first.shape[0]
    count = size // world_size + int(rank < size % world_size)
    return Share(_split(inputs, world_size, rank, size), _split(targets, world_size, rank, size), count / size, count, size)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP and ``torch.compile`` wrappers, whose names are the recorded ones."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


class RankColumns:
    """What both engines hold: this rank's columns ``Θ_r`` as a :class:`~sewa._columns.Columns`,
    and the all_reduce that completes ``∂L/∂A``.

    Args:
        comm: Where the bytes moved are counted.
        trajectory: This rank's columns.
        model: The model to select with (checked against the trajectory's layout).
        device: Compute device (default: see :func:`~sewa.distributed._comm.engine_device`).
    """

    def __init__(self, comm: CommStats, trajectory: ShardedTrajectory, model: nn.Module,
                 device: torch.device | str | None) -> None:
        trajectory.layout.check_compatible(model)
        self.device = engine_device(model, trajectory.group, device)
        rows, order = trajectory.matrix()
        self.columns = Columns(rows, order, device=self.device)
        self.comm = comm
        self.trajectory = trajectory
        self.group = trajectory.group

    def mix(self, mix: Tensor) -> Tensor:
        """``W_r = A Θ_r`` (M, S_r) for ``mix`` (M, k) oldest first."""
        return self.columns.mix(self.columns.to_rows(mix))

    def reduce(self, g_local: Tensor, losses: Tensor, mix: Tensor) -> tuple[float, Tensor]:
        """``∂L/∂A = Σ_r G_r Θ_rᵀ`` and the loss: one all_reduce of ``[G_r Θ_rᵀ | weighted
        losses]`` (M, k+1) in float64; returns the mean loss and ``∂L/∂A`` oldest first, like
        ``mix``."""
        partial = self.columns.grad(g_local)
        k = partial.shape[1]
        packed = torch.empty(partial.shape[0], k + 1, dtype=torch.float64, device=self.device)
        packed[:, :k] = partial
        packed[:, k] = losses
        with collective("all_reduce of the mask gradient", self.group):
            dist.all_reduce(packed, group=self.group)
        self.comm.add("all_reduce", packed)
        self.comm.steps += 1
        return float(packed[:, k].mean()), self.columns.to_oldest(packed[:, :k], mix)


class ReplicatedEngine:
    """Replicated model: all_gather ``W``, data-parallel forward/backward, reduce_scatter ``G``.

    Args:
        comm: Where the bytes moved are counted.
        trajectory: This rank's columns.
        model: The replicated model (plain, DDP or compiled); copied.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batch_stats: BatchNorm on batch statistics.
        vectorize: See :class:`~sewa._engine.ModelPasses`.
        device: Compute device (default: see :func:`~sewa.distributed._comm.engine_device`).
    """

    def __init__(self, comm: CommStats, trajectory: ShardedTrajectory, model: nn.Module,
                 loss_fn: Callable[[Any, Any], Tensor], *, batch_stats: bool, vectorize: bool | None,
                 device: torch.device | str | None) -> None:
        self.local = RankColumns(comm, trajectory, model, device)
        self.device, self.group = self.local.device, trajectory.group
        self.passes = ModelPasses(selection_model(unwrap(model), batch_stats, self.device), trajectory.names,
                                  trajectory.layout.views, loss_fn, vectorize)
        self.trajectory = trajectory
        self.width = -(-trajectory.num_params // trajectory.world_size)  # every rank's padded slice

    def __call__(self, mix: Tensor, share: Share) -> tuple[float, Tensor]:
        ranks, width, p = self.trajectory.world_size, self.width, self.trajectory.num_params
        lo, hi = self.trajectory.lo, self.trajectory.hi
        m = mix.shape[0]
        send = torch.zeros(m, width, device=self.device)
        send[:, : hi - lo] = self.local.mix(mix)
        gathered = torch.empty(ranks * m, width, device=self.device)
        with collective("all_gather of the mixed parameters", self.group):
            all_gather_single(gathered, send, group=self.group)
        self.local.comm.add("all_gather", gathered)
        mixed = gathered.view(ranks, m, width).transpose(0, 1).reshape(m, ranks * width)[:, :p]
        if share.count == 0:  # fewer samples than ranks: this rank only relays
            losses, grads = torch.zeros(m, device=self.device), torch.zeros(m, p, device=self.device)
        else:
            inputs, targets = to_device(share.inputs, self.device), to_device(share.targets, self.device)
            losses, grads = self.passes.model_grad(mixed, inputs, targets)
        if share.count < 0:  # whole batches on every rank: G is complete here, nothing to reduce
            g_local = grads[:, lo:hi] / m
            losses = losses if self.trajectory.rank == 0 else torch.zeros_like(losses)
        else:
            # L = Σ_r (n_r/N) L_r is the mean over the whole batch; 1/M averages the samples.
            grads.mul_(share.weight / m)
            padded = grads.new_zeros(m, ranks * width)
            padded[:, :p] = grads
            blocks = padded.view(m, ranks, width).transpose(0, 1).contiguous()
            g_block = torch.empty(m, width, device=self.device)
            with collective("reduce_scatter of the parameter gradients", self.group):
                reduce_scatter_single(g_block, blocks.view(ranks * m, width), group=self.group)
            self.local.comm.add("reduce_scatter", blocks)
            g_local = g_block[:, : hi - lo]
            losses = losses * share.weight
        return self.local.reduce(g_local, losses, mix)


class FSDPEngine:
    """FSDP2 model: ``W_r`` is written into the local shards and the model runs as usual (its
    own all-gathers and reduce-scatters); the model is left as it was after every call.

    Args: as :class:`ReplicatedEngine`, with ``model`` the FSDP2 model itself (used in place);
    ``vectorize`` is ignored (FSDP drives the parameters, one sample after another).
    """

    def __init__(self, comm: CommStats, trajectory: ShardedTrajectory, model: nn.Module,
                 loss_fn: Callable[[Any, Any], Tensor], *, batch_stats: bool, vectorize: bool | None,
                 device: torch.device | str | None) -> None:
        self.local = RankColumns(comm, trajectory, model, device)
        self.device, self.group = self.local.device, trajectory.group
        self.trajectory = trajectory
        named = named_parameters(model, expected=trajectory.names)
        self.params = [named[n] for n in trajectory.names]
        for piece, param in zip(trajectory.pieces, self.params, strict=True):
            local = cast(DTensor, param).to_local()
            if local.numel() != piece.length or not local.is_contiguous():
                raise TrajectoryError(f"{trajectory.names[piece.index]!r}: the model's local shard does not match the "
                                      "trajectory's; select with the model the trajectory was recorded from")
        self.model = model
        self.loss_fn = loss_fn
        self.batch_stats = batch_stats
        self.original = [cast(DTensor, p).to_local().detach().clone() for p in self.params]

    @contextlib.contextmanager
    def _borrowed(self) -> Iterator[None]:
        """Eval mode, gradients on every parameter, BatchNorm on batch statistics (as
        :func:`~sewa._engine.selection_model`); all undone after."""
        model, params = self.model, self.params
        training, grads, wanted = model.training, [p.grad for p in params], [p.requires_grad for p in params]
        model.eval()
        for p in params:
            p.requires_grad_(True)
        saved = batch_statistics(model) if self.batch_stats else []
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value, grad, want in zip(params, self.original, grads, wanted, strict=True):
                    cast(DTensor, p).to_local().copy_(value)
                    p.grad = grad
                    p.requires_grad_(want)
            restore_statistics(saved)
            model.train(training)

    def __call__(self, mix: Tensor, share: Share) -> tuple[float, Tensor]:
        m, ranks = mix.shape[0], self.trajectory.world_size
        if 0 <= share.size < ranks:
            raise ValueError(f"a batch of {share.size} samples cannot be split over {ranks} FSDP ranks (each must run the "
                             "forward pass): use batches of at least as many samples as ranks")
        mixed = self.local.mix(mix)
        grads = torch.zeros_like(mixed)
        losses = torch.zeros(m, device=self.device)
        # FSDP2 averages gradients over ranks: scaling by R makes the reduced gradient Σ_r w_r ∂L_r.
        scale = share.weight * ranks if share.count >= 0 else 1.0
        inputs, targets = to_device(share.inputs, self.device), to_device(share.targets, self.device)
        pieces = self.trajectory.pieces
        with self._borrowed():
            for j in range(m):
                with torch.no_grad():
                    for piece, p in zip(pieces, self.params, strict=True):
                        cast(DTensor, p).to_local().view(-1).copy_(mixed[j, piece.dst : piece.dst + piece.length])
                        p.grad = None
                try:
                    loss = self.loss_fn(forward(self.model, inputs), targets)
                    (loss * scale).backward()
                except Exception as e:
                    if not is_comm_error(e):
                        raise
                    with collective("the FSDP model's forward/backward", self.group):
                        raise
                losses[j] = loss.detach()
                with torch.no_grad():
                    for piece, p in zip(pieces, self.params, strict=True):
                        if p.grad is not None:
                            grads[j, piece.dst : piece.dst + piece.length] = cast(DTensor, p.grad).to_local().reshape(-1)
        grads.div_(m)
        if share.count < 0:
            losses = losses if self.trajectory.rank == 0 else torch.zeros_like(losses)
        else:
            losses = losses * share.weight
        return self.local.reduce(grads, losses, mix)
