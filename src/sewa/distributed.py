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
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from ._engine import MixedLoss, _forward, selection_model, to_device
from .average import average_flat as _average_flat
from .bn import has_batchnorm
from .select import Selection, refuse_nonfinite_rows
from .select import select as _select
from .trajectory import Trajectory, TrajectoryError, _named_tensors, canonical_name

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

_timeout: datetime.timedelta | None = None  # set by init(), quoted in error messages
# torch 2.13 renamed the tensor-in/tensor-out collectives; older versions have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class DistributedError(RuntimeError):
    """A collective failed: most often another rank died or stopped participating."""


def init(
    backend: str | None = None,
    *,
    timeout: datetime.timedelta = datetime.timedelta(minutes=5),
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[int, int]:
    """Starts the default process group with a finite ``timeout``, unless one is running.

    Under ``torchrun`` no argument is needed (rank and world size come from the environment).

    Args:
        backend: ``"gloo"`` (CPU) or ``"nccl"``; default: ``"nccl"`` if CUDA is available. With
            NCCL the process's current CUDA device is set to ``LOCAL_RANK`` (under torchrun).
        timeout: How long a collective waits for the other ranks before failing. Finite, so
            that a dead rank makes the others raise instead of hanging; it must exceed the
            longest gap between two collectives (one forward/backward of M mixed models).
        init_method: Passed to ``torch.distributed.init_process_group`` (e.g. ``"file://…"``).
        rank: This process's rank, when not launched by ``torchrun``.
        world_size: Number of processes, when not launched by ``torchrun``.

    Returns:
        ``(rank, world_size)``.
    """
    global _timeout
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": timeout}
        if init_method is not None:
            kwargs["init_method"] = init_method
        if rank is not None:
            kwargs["rank"] = rank
        if world_size is not None:
            kwargs["world_size"] = world_size
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":  # one GPU per process: torchrun's LOCAL_RANK, else the global rank
            local = os.environ.get("LOCAL_RANK")
            torch.cuda.set_device(int(local) if local is not None else (rank or 0) % torch.cuda.device_count())
        dist.init_process_group(backend, **kwargs)
        _timeout = timeout
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def _collective(what: str, group: dist.ProcessGroup | None) -> Iterator[None]:
    """Turns a failed collective into a :class:`DistributedError` that names the likely cause."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, dist.DistError) as e:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if _timeout is not None and group is None:
            limit = f"after {_timeout} (the timeout given to sewa.distributed.init)"
        else:
            limit = "after the process group's timeout (sewa.distributed.init(timeout=...) sets a finite one)"
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"sewa.distributed: {what} failed on rank {rank} of {world} ({detail}). The likely cause is that "
            "another rank died (crash, out of memory, killed) or stopped calling the same collectives (an "
            "exception on that rank only, or different steps, options or batches); see the other ranks' logs. "
            f"Collectives give up {limit}."
        ) from e


def _comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where small bookkeeping tensors must live for the group's backend (NCCL: the GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _engine_device(model: nn.Module, group: dist.ProcessGroup | None, device: torch.device | str | None) -> torch.device:
    """Where a distributed engine computes unless told: NCCL's GPU, else where the model's
    (local) parameters live, so the batches go where the model's forward expects them."""
    if device is not None:
        return torch.device(device)
    comm = _comm_device(group)
    param = next(iter(model.parameters()), None)
    if comm.type == "cuda" or param is None:
        return comm
    return (param.to_local() if isinstance(param, DTensor) else param).device


def shard_bounds(num_params: int, world_size: int, rank: int) -> tuple[int, int]:
    """The slice ``[lo, hi)`` of a length-``num_params`` vector held by ``rank``.

    Slices have ``ceil(P / R)`` entries (the last ones fewer, possibly none): the layout of
    ``torch.chunk`` and of a ``Shard(0)`` DTensor.
    """
    chunk = -(-num_params // world_size)
    lo = min(num_params, rank * chunk)
    return lo, min(num_params, lo + chunk)


@dataclass(frozen=True)
class _Piece:
    """One contiguous run of the flattened parameters held by this rank."""

    index: int  # which recorded tensor
    start: int  # offset inside that tensor's flattened global values
    length: int
    dst: int  # offset inside this rank's local vector


class ShardedTrajectory:
    """A :class:`sewa.Trajectory` whose ``(window, P)`` matrix is split along P over the ranks.

    Each rank stores ``(window, S_r)``: its columns of every snapshot, with the same ring
    bookkeeping (``steps``, ``slots``) on every rank. It reads like a trajectory for
    :func:`sewa.select` (``matrix()`` returns the local columns); use :func:`select`,
    :func:`average` and :func:`save_average` from this module on it.

    Args:
        template: The model (or state dict) to record. A model with ``DTensor`` parameters
            sharded by ``fully_shard`` (FSDP2, one mesh dimension, ``Shard(0)``) is recorded
            shard by shard; any other model is taken as replicated (plain or DDP) and rank
            ``r`` keeps :func:`shard_bounds` of the flattened vector.
        window: How many snapshots to keep (``k``).
        dtype: Storage dtype, as for :class:`sewa.Trajectory`.
        buffers: Also record floating-point buffers (replicated models only).
        device: Where the local matrix lives.
        check_finite: Refuse snapshots holding NaN or Inf. All ranks must agree, so this costs
            one all_reduce of one number per :meth:`push`; ``False`` makes recording free of
            communication.
        group: The process group (default: the world; FSDP2 models use their mesh's group).

    Raises:
        RuntimeError: if no process group is running.
        TrajectoryError: for an FSDP2 layout other than ``Shard(0)`` on a 1-D mesh, or an
            FSDP2 model with parameters that are not sharded.
    """

    def __init__(
        self,
        template: nn.Module | Mapping[str, Tensor],
        window: int,
        *,
        dtype: torch.dtype | str = torch.float32,
        buffers: bool = False,
        device: torch.device | str = "cpu",
        check_finite: bool = True,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("no process group is running: call sewa.distributed.init() first (under torchrun)")
        if not isinstance(window, int) or window < 1:
            raise TrajectoryError(f"window must be a positive integer, got {window!r}")
        # The layout (names, shapes, views, unflatten, compatibility checks) is a Trajectory's
        # own; on the meta device it allocates nothing.
        self.layout = Trajectory(template, 1, dtype=dtype, buffers=buffers, device="meta", check_finite=False)
        recorded, _, _ = _named_tensors(template, buffers)
        sharded = [isinstance(t, DTensor) for t in recorded.values()]
        self.mode = "fsdp" if any(sharded) else "replicated"
        if self.mode == "fsdp":
            if not all(sharded):
                plain = next(n for n, s in zip(recorded, sharded, strict=True) if not s)
                raise TrajectoryError(f"{plain!r} is not a sharded (DTensor) tensor while others are: fully_shard "
                                      "the root module too, and record with buffers=False")
            group = cast(DTensor, next(iter(recorded.values()))).device_mesh.get_group()
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.window = window
        self.check_finite = check_finite
        self.pieces = self._fsdp_pieces(recorded) if self.mode == "fsdp" else self._slice_pieces()
        self.local_params = sum(p.length for p in self.pieces)
        if self.mode == "replicated":
            self.lo, self.hi = shard_bounds(self.num_params, self.world_size, self.rank)
        self.data = torch.zeros(window, self.local_params, dtype=self.layout.dtype, device=device)
        self._steps: list[int] = []
        self._slots: list[int] = []
        self._readers = 0
        self._offsets = [0]
        for n in self.layout.numels:
            self._offsets.append(self._offsets[-1] + n)
        self._all_pieces: list[list[tuple[int, int, int]]] | None = None

    def _slice_pieces(self) -> list[_Piece]:
        lo, hi = shard_bounds(self.layout.num_params, self.world_size, self.rank)
        pieces, offset = [], 0
        for i, n in enumerate(self.layout.numels):
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                pieces.append(_Piece(i, a - offset, b - a, a - lo))
            offset += n
        return pieces

    def _fsdp_pieces(self, recorded: dict[str, Tensor]) -> list[_Piece]:
        pieces, dst = [], 0
        self._specs: list[tuple[Any, Any, torch.Size, tuple[int, ...], torch.Size, torch.dtype]] = []
        for i, (name, t) in enumerate(recorded.items()):
            t = cast(DTensor, t)
            if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
                raise TrajectoryError(f"{name!r} is laid out as {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh; "
                                      "only fully_shard's default (Shard(0) on a 1-D mesh) is supported")
            rows, per_row = t.shape[0], math.prod(t.shape[1:])
            first, last = shard_bounds(rows, t.device_mesh.size(), t.device_mesh.get_local_rank())
            local = t.to_local()
            if local.shape[0] != last - first:
                raise TrajectoryError(f"{name!r} has {local.shape[0]} local rows, expected {last - first} "
                                      "(torch.chunk layout of Shard(0)); this FSDP layout is not supported")
            pieces.append(_Piece(i, first * per_row, local.numel(), dst))
            self._specs.append((t.device_mesh, t.placements, t.shape, t.stride(), local.shape, t.dtype))
            dst += local.numel()
        return pieces

    # ----------------------------------------------------------------- like a Trajectory
    @property
    def names(self) -> list[str]:
        """Recorded tensor names (the full model's)."""
        return self.layout.names

    @property
    def num_params(self) -> int:
        """P: the length of the full flattened parameter vector (all ranks together)."""
        return self.layout.num_params

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype."""
        return self.data.dtype

    @property
    def steps(self) -> list[int]:
        """Training steps of the held snapshots, oldest first (the same on every rank)."""
        return list(self._steps)

    @property
    def slots(self) -> list[int]:
        """Row of :attr:`data` holding each snapshot, oldest first."""
        return list(self._slots)

    @property
    def nbytes(self) -> int:
        """Bytes of the local matrix on this rank."""
        return self.data.numel() * self.data.element_size()

    def __len__(self) -> int:
        return len(self._steps)

    def __repr__(self) -> str:
        return (f"ShardedTrajectory(mode={self.mode}, rank={self.rank}/{self.world_size}, window={self.window}, "
                f"held={len(self)}, params={self.local_params:,} of {self.num_params:,})")

    def matrix(self) -> tuple[Tensor, Tensor]:
        """This rank's held columns ``(rows (n, S_r), order)``, as :meth:`sewa.Trajectory.matrix`."""
        n = len(self)
        if n == 0:
            raise TrajectoryError("the trajectory holds no snapshots yet: push some first")
        return self.data[:n], torch.tensor(self._slots, dtype=torch.long)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Marks the trajectory as being read; :meth:`push` refuses to write meanwhile."""
        self._readers += 1
        try:
            yield
        finally:
            self._readers -= 1

    # ----------------------------------------------------------------- recording
    def push(self, source: nn.Module | Mapping[str, Tensor], step: int) -> None:
        """Records this rank's columns of a snapshot; call it on every rank at the same steps.

        Replicated models: copies the parameter views that overlap ``[lo, hi)``, without
        building the full vector. FSDP2 models: copies the local shards, with no all-gather.

        Raises:
            TrajectoryError: as :meth:`sewa.Trajectory.push`; a NaN/Inf on any rank makes every
                rank refuse the snapshot.
        """
        if self._readers:
            raise RuntimeError("cannot push while the trajectory is being read (a selection is running); push after it returns")
        step = int(step)
        if self._steps and step <= self._steps[-1]:
            raise TrajectoryError(f"step {step} is not after the newest recorded step {self._steps[-1]}")
        recorded, others = self.layout.check_compatible(source)
        tensors = [recorded[n] for n in self.names]
        if self.mode == "fsdp":
            sources = [cast(DTensor, tensors[p.index]).to_local().reshape(-1) for p in self.pieces]
            if any(s.numel() != p.length for s, p in zip(sources, self.pieces, strict=True)):
                raise TrajectoryError("the model's local shards differ from the template's: record the model the trajectory was built from")
        else:
            if any(isinstance(t, DTensor) for t in tensors):
                raise TrajectoryError("the trajectory was built for a replicated model, got sharded (DTensor) parameters")
            sources = [tensors[p.index].reshape(-1)[p.start : p.start + p.length] for p in self.pieces]
        if self.check_finite:
            self._agree_storable(sources, step)  # before writing: a refused snapshot changes nothing
        slot = len(self._slots) if len(self._slots) < self.window else self._slots[0]
        row = self.data[slot]
        with torch.no_grad():
            dests = [row[p.dst : p.dst + p.length] for p in self.pieces]
            torch._foreach_copy_(dests, [s.to(row.device) for s in sources])
        if len(self._slots) == self.window:
            self._slots.pop(0)
            self._steps.pop(0)
        self._slots.append(slot)
        self._steps.append(step)
        extras = self.layout.extras
        for name, t in others.items():
            held = extras.get(name)
            if held is not None and held.shape == t.shape and held.dtype == t.dtype:
                held.copy_(t)
            else:
                extras[name] = t.detach().to("cpu", copy=True)

    def _agree_storable(self, sources: list[Tensor], step: int) -> None:
        """Every rank refuses the snapshot if any rank's columns hold NaN/Inf, or values that
        overflow float16 storage."""
        limit = torch.finfo(torch.float16).max if self.dtype == torch.float16 else math.inf

        def storable(s: Tensor) -> bool:
            if s.numel() == 0:
                return True
            if limit == math.inf:
                return bool(torch.isfinite(s).all())
            return float(s.abs().amax()) <= limit  # NaN fails the comparison too

        bad = next((p for p, s in zip(self.pieces, sources, strict=True) if not storable(s)), None)
        ok = torch.tensor([int(bad is None)], device=_comm_device(self.group))
        with _collective(f"agreeing on the snapshot at step {step}", self.group):
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)
        if bool(ok):
            return
        where = "another rank's columns" if bad is None else repr(self.names[bad.index])
        what = "NaN or Inf" if limit == math.inf else "NaN, Inf or values beyond float16's range"
        raise TrajectoryError(f"snapshot at step {step} holds {what} (in {where}); it was not recorded")

    # ----------------------------------------------------------------- gathering
    def _layout_of_ranks(self) -> list[list[tuple[int, int, int]]]:
        """Every rank's pieces as (global start, length, local offset); one collective, cached."""
        if self._all_pieces is None:
            mine = [(self._offsets[p.index] + p.start, p.length, p.dst) for p in self.pieces]
            gathered: list[Any] = [None] * self.world_size
            with _collective("exchanging the shard layout", self.group):
                dist.all_gather_object(gathered, mine, group=self.group)
            self._all_pieces = gathered
        return self._all_pieces

    def gather(self, local: Tensor, dst: int | None = 0) -> Tensor | None:
        """Assembles full vectors ``(..., P)`` from every rank's ``(..., S_r)`` columns.

        Args:
            local: This rank's columns (e.g. an average from :func:`average_flat`).
            dst: The rank that receives the result (the others get ``None``); ``None``: all.
        """
        layout = self._layout_of_ranks()
        widest = max(sum(n for _, n, _ in pieces) for pieces in layout)
        lead = tuple(local.shape[:-1])
        padded = torch.zeros(*lead, widest, dtype=local.dtype, device=_comm_device(self.group))
        padded[..., : local.shape[-1]] = local
        receive = dst is None or self.rank == dst
        parts = [torch.empty_like(padded) for _ in range(self.world_size)] if receive else None
        with _collective("gathering the shards", self.group):
            if dst is None:
                dist.all_gather(cast(list[Tensor], parts), padded, group=self.group)
            else:
                dist.gather(padded, parts, dst=dst if self.group is None else dist.get_global_rank(self.group, dst), group=self.group)
        if parts is None:
            return None
        full = local.new_empty(*lead, self.num_params)  # on the caller's device
        for part, pieces in zip(parts, layout, strict=True):
            for start, n, off in pieces:
                full[..., start : start + n] = part[..., off : off + n].to(full.device)
        return full

    def to_trajectory(self, dst: int = 0) -> Trajectory | None:
        """The whole trajectory as a plain :class:`sewa.Trajectory` on rank ``dst`` (``None``
        elsewhere). It holds all ``k × P`` values: for tests and models that fit one host."""
        rows, order = self.matrix()
        full = self.gather(rows.index_select(0, order.to(rows.device)), dst)
        if full is None:
            return None
        traj = Trajectory({n: torch.empty(s, dtype=d) for n, s, d in zip(self.names, self.layout.shapes, self.layout.dtypes, strict=True)},
                          self.window, dtype=self.dtype, buffers=True, device=self.data.device, check_finite=False)
        traj.buffers = self.layout.buffers
        traj.aliases = dict(self.layout.aliases)  # before pushing: unflatten() adds the tied names
        for values, step in zip(full, self._steps, strict=True):
            traj.push(self.layout.unflatten(values, extras=False), step)
        traj.extras = {k: v.clone() for k, v in self.layout.extras.items()}
        return traj


# --------------------------------------------------------------------------- communication stats
@dataclass
class CommStats:
    """Bytes moved by the collectives the selection engine issues, summed over steps.

    Each figure is the size of the collective's full tensor (e.g. the gathered ``(M, P)``
    for all_gather, the ``(M, P)`` input of reduce_scatter); a ring algorithm sends about
    ``(R-1)/R`` of it per rank (twice that for all_reduce). Under FSDP2 the model's own
    all-gathers and reduce-scatters in forward/backward are not counted here.
    """

    steps: int = 0
    bytes: dict[str, int] = field(default_factory=lambda: {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0})

    def add(self, kind: str, t: Tensor) -> None:
        self.bytes[kind] += t.numel() * t.element_size()

    def per_step(self) -> dict[str, float]:
        """Mean bytes per selection step, by collective."""
        return {k: v / max(1, self.steps) for k, v in self.bytes.items()}


# --------------------------------------------------------------------------- batches
@dataclass
class _Share:
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


class _ShardedBatches:
    """Re-iterable view of the batches giving this rank its share of each."""

    def __init__(self, batches: Iterable[Any], ctx: DistributedContext) -> None:
        self.batches = list(batches) if iter(batches) is batches else batches  # a one-shot iterator is cached
        self.ctx = ctx

    def __iter__(self) -> Iterator[_Share]:
        for batch in self.batches:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}")
            inputs, targets = batch
            if not self.ctx.splitting:
                yield _Share(inputs, targets, 1.0, -1, -1)
                continue
            first = _first_tensor(inputs)
            if first is None or first.dim() == 0:
                raise ValueError("cannot split a batch whose inputs hold no batched tensor: pass split_batches=False")
            size, parts, rank = first.shape[0], self.ctx.world_size, self.ctx.rank
            count = size // parts + int(rank < size % parts)  # torch.tensor_split's sizes
            yield _Share(_split(inputs, parts, rank, size), _split(targets, parts, rank, size), count / size, count, size)


# --------------------------------------------------------------------------- engines
def _is_comm_error(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, dist.DistError) or any(s in text for s in ("gloo", "Connection closed", "Timed out", "NCCL"))


class _LocalColumns(MixedLoss):
    """:class:`~sewa._engine.MixedLoss`'s chunked products ``A Θ_r`` and ``G_r Θ_rᵀ`` over this
    rank's columns ``Θ_r`` (k, S_r)."""

    def __init__(self, trajectory: ShardedTrajectory, device: torch.device | str | None) -> None:
        # MixedLoss.__init__ expects the full (k, P) matrix and is not called: this sets the
        # attributes that its mix(), grad_mix() and model_grad() read.
        rows, order = trajectory.matrix()
        self.device = torch.device(device) if device is not None else rows.device
        self.rows = rows.to(self.device)
        self.order = order.to(self.device)
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(len(order), device=self.device)
        self.names = trajectory.names
        self.views = trajectory.layout.views
        self.vectorize: bool | None = None
        self._checked = False
        self._mixed: Tensor | None = None
        self._scratch: Tensor | None = None
        self.trajectory = trajectory
        self.group = trajectory.group

    def mix_local(self, a_rows: Tensor) -> Tensor:
        """``W_r = A Θ_r`` (M, S_r) in float32."""
        if self.rows.shape[1] == 0:
            return torch.zeros(a_rows.shape[0], 0, device=self.device)
        return self.mix(a_rows)

    def grad_local(self, g: Tensor) -> Tensor:
        """``G_r Θ_rᵀ`` (M, k), this rank's term of ``∂L/∂A``."""
        if self.rows.shape[1] == 0:
            return torch.zeros(g.shape[0], self.rows.shape[0], device=self.device)
        return self.grad_mix(g)

    def reduce(self, ctx: DistributedContext, partial: Tensor, losses: Tensor, mix: Tensor) -> tuple[float, Tensor]:
        """One all_reduce of ``[G_r Θ_rᵀ | weighted losses]`` (M, k+1) in float64."""
        k = partial.shape[1]
        packed = torch.empty(partial.shape[0], k + 1, dtype=torch.float64, device=self.device)
        packed[:, :k] = partial
        packed[:, k] = losses
        with _collective("all_reduce of the mask gradient", self.group):
            dist.all_reduce(packed, group=self.group)
        ctx.comm.add("all_reduce", packed)
        ctx.comm.steps += 1
        return float(packed[:, k].mean()), packed[:, :k][:, self.order].to(mix.device, mix.dtype)


class _ReplicatedEngine(_LocalColumns):
    """Replicated model: all_gather ``W``, data-parallel forward/backward, reduce_scatter ``G``."""

    def __init__(self, ctx: DistributedContext, trajectory: ShardedTrajectory, model: nn.Module,
                 loss_fn: Callable[[Any, Any], Tensor], *, batch_stats: bool, vectorize: bool | None,
                 device: torch.device | str | None) -> None:
        trajectory.layout.check_compatible(model)
        super().__init__(trajectory, _engine_device(model, trajectory.group, device))
        self.ctx = ctx
        self.model = selection_model(_unwrap(model), batch_stats, self.device)
        self.loss_fn = loss_fn
        self.vectorize = vectorize
        self.width = -(-trajectory.num_params // trajectory.world_size)  # every rank's padded slice

    def __call__(self, mix: Tensor, share: _Share) -> tuple[float, Tensor]:
        ranks, width, p = self.trajectory.world_size, self.width, self.trajectory.num_params
        lo, hi = self.trajectory.lo, self.trajectory.hi
        m = mix.shape[0]
        a_rows = mix.to(self.device, torch.float32)[:, self.inverse]
        send = torch.zeros(m, width, device=self.device)
        send[:, : hi - lo] = self.mix_local(a_rows)
        gathered = torch.empty(ranks * m, width, device=self.device)
        with _collective("all_gather of the mixed parameters", self.group):
            _all_gather_single(gathered, send, group=self.group)
        self.ctx.comm.add("all_gather", gathered)
        mixed = gathered.view(ranks, m, width).transpose(0, 1).reshape(m, ranks * width)[:, :p]
        if share.count == 0:  # fewer samples than ranks: this rank only relays
            losses, grads = torch.zeros(m, device=self.device), torch.zeros(m, p, device=self.device)
        else:
            inputs, targets = to_device(share.inputs, self.device), to_device(share.targets, self.device)
            losses, grads = self.model_grad(mixed, inputs, targets)
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
            with _collective("reduce_scatter of the parameter gradients", self.group):
                _reduce_scatter_single(g_block, blocks.view(ranks * m, width), group=self.group)
            self.ctx.comm.add("reduce_scatter", blocks)
            g_local = g_block[:, : hi - lo]
            losses = losses * share.weight
        return self.reduce(self.ctx, self.grad_local(g_local), losses, mix)


class _FSDPEngine(_LocalColumns):
    """FSDP2 model: ``W_r`` is written into the local shards and the model runs as usual (its
    own all-gathers and reduce-scatters); the model is left as it was after every call."""

    def __init__(self, ctx: DistributedContext, trajectory: ShardedTrajectory, model: nn.Module,
                 loss_fn: Callable[[Any, Any], Tensor], *, batch_stats: bool, vectorize: bool | None,
                 device: torch.device | str | None) -> None:
        trajectory.layout.check_compatible(model)
        super().__init__(trajectory, _engine_device(model, trajectory.group, device))
        self.ctx = ctx
        named = {canonical_name(n): p for n, p in model.named_parameters()}
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
        """Eval mode, gradients on every parameter, BatchNorm on batch statistics; all undone after."""
        model, params = self.model, self.params
        training, grads, wanted = model.training, [p.grad for p in params], [p.requires_grad for p in params]
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if self.batch_stats else []
        stats = [(m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked) for m in norms]
        model.eval()
        for p in params:
            p.requires_grad_(True)
        for m in norms:
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value, grad, want in zip(params, self.original, grads, wanted, strict=True):
                    cast(DTensor, p).to_local().copy_(value)
                    p.grad = grad
                    p.requires_grad_(want)
            for m, (track, mean, var, count) in zip(norms, stats, strict=True):
                m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = track, mean, var, count
            model.train(training)

    def __call__(self, mix: Tensor, share: _Share) -> tuple[float, Tensor]:
        m, ranks = mix.shape[0], self.trajectory.world_size
        if 0 <= share.size < ranks:
            raise ValueError(f"a batch of {share.size} samples cannot be split over {ranks} FSDP ranks (each must run the "
                             "forward pass): use batches of at least as many samples as ranks")
        mixed = self.mix_local(mix.to(self.device, torch.float32)[:, self.inverse])
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
                    loss = self.loss_fn(_forward(self.model, inputs), targets)
                    (loss * scale).backward()
                except Exception as e:
                    if not _is_comm_error(e):
                        raise
                    with _collective("the FSDP model's forward/backward", self.group):
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
        return self.reduce(self.ctx, self.grad_local(grads), losses, mix)


# --------------------------------------------------------------------------- selection
class DistributedContext:
    """The ``distributed=`` hook of :func:`sewa.select`: an engine whose values are reduced
    over ranks, and this rank's share of the batches. :func:`select` makes one for you.

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

    def engine(self, trajectory: Any, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], *,
               batch_stats: bool = True, vectorize: bool | None = None,
               device: torch.device | str | None = None) -> Callable[[Tensor, Any], tuple[float, Tensor]]:
        """The selection engine for ``trajectory`` (a :class:`ShardedTrajectory`)."""
        if not isinstance(trajectory, ShardedTrajectory):
            raise TypeError(f"distributed selection needs a sewa.distributed.ShardedTrajectory, got {type(trajectory).__name__}")
        self.rank, self.world_size = trajectory.rank, trajectory.world_size
        if self.split_batches is None:
            self.splitting = not (batch_stats and has_batchnorm(model))
        cls = _FSDPEngine if trajectory.mode == "fsdp" else _ReplicatedEngine
        return cls(self, trajectory, model, loss_fn, batch_stats=batch_stats, vectorize=vectorize, device=device)

    def shard_batches(self, batches: Iterable[Any]) -> Iterable[Any]:
        """This rank's share of every batch (read lazily, one per selection step)."""
        return _ShardedBatches(batches, self)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP and ``torch.compile`` wrappers, whose names are the recorded ones."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


def _agree(trajectory: ShardedTrajectory, options: dict[str, Any]) -> None:
    """Raises the same error on every rank if the ranks hold different snapshots or options."""
    summary = {"steps": trajectory.steps, "num_params": trajectory.num_params, "mode": trajectory.mode,
               "options": sorted((k, repr(v)) for k, v in options.items() if k != "progress")}
    gathered: list[Any] = [None] * trajectory.world_size
    with _collective("comparing the ranks' settings", trajectory.group):
        dist.all_gather_object(gathered, summary, group=trajectory.group)
    for rank, other in enumerate(gathered):
        for key in summary:
            if other[key] != gathered[0][key]:
                raise ValueError(f"rank {rank} has {key}={other[key]!r} but rank 0 has {gathered[0][key]!r}: every rank must "
                                 "record the same steps and call select with the same options")
    if len(trajectory) == 0:
        return
    rows, order = trajectory.matrix()
    finite = torch.isfinite(rows).all(dim=1).to(_comm_device(trajectory.group), torch.int32)
    with _collective("checking the snapshots", trajectory.group):
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
    if "distributed" in options:
        raise TypeError("select() here makes its own distributed context; call sewa.select for a custom one")
    _agree(trajectory, options)
    if trajectory.rank != 0:
        options["progress"] = False
    ctx = DistributedContext(split_batches=split_batches)
    sel = _select(cast(Trajectory, trajectory), model, loss_fn, batches, distributed=ctx, **options)
    sel.config["distributed"] = {
        "world_size": trajectory.world_size,
        "mode": trajectory.mode,
        "split_batches": ctx.splitting,
        "comm_bytes_per_step": ctx.comm.per_step(),
        "snapshot_bytes": len(trajectory) * trajectory.num_params * trajectory.data.element_size(),
    }
    return sel


# --------------------------------------------------------------------------- averaging and saving
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
        named = {canonical_name(n): p for n, p in model.named_parameters()}
        with torch.no_grad():
            for piece in trajectory.pieces:
                shard = cast(DTensor, named[trajectory.names[piece.index]]).to_local()
                shard.view(-1).copy_(local[piece.dst : piece.dst + piece.length])
        return model
    state = trajectory.layout.unflatten(cast(Tensor, trajectory.gather(local, None)))
    inner = _unwrap(model)
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

        with _collective("writing the sharded checkpoint", trajectory.group):
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
    with _collective("waiting for the average to be written", trajectory.group):
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
