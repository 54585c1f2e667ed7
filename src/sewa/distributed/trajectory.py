"""The sharded trajectory: each rank holds its columns of every snapshot."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from .._ring import Ring, RingHeld, check_window
from ..trajectory import Trajectory, TrajectoryError, _named_tensors
from ._comm import collective, comm_device, shard_bounds

__all__ = ["ShardedTrajectory"]


@dataclass(frozen=True)
class _Piece:
    """One contiguous run of the flattened parameters held by this rank."""

    index: int  # which recorded tensor
    start: int  # offset inside that tensor's flattened global values
    length: int
    dst: int  # offset inside this rank's local vector


class ShardedTrajectory(RingHeld):
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
        dtype: torch.dtype | str | None = None,
        buffers: bool = False,
        device: torch.device | str = "cpu",
        check_finite: bool = True,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("no process group is running: call sewa.distributed.init() first (under torchrun)")
        window = check_window(window)
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
        self._ring = Ring(window)  # which row holds which step: the same on every rank
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
    def nbytes(self) -> int:
        """Bytes of the local matrix on this rank."""
        return self.data.numel() * self.data.element_size()

    def __repr__(self) -> str:
        return (f"ShardedTrajectory(mode={self.mode}, rank={self.rank}/{self.world_size}, window={self.window}, "
                f"held={len(self)}, params={self.local_params:,} of {self.num_params:,})")

    def matrix(self) -> tuple[Tensor, Tensor]:
        """This rank's held columns ``(rows (n, S_r), order)``, as :meth:`sewa.Trajectory.matrix`."""
        n = len(self)
        if n == 0:
            raise TrajectoryError("the trajectory holds no snapshots yet: push some first")
        return self.data[:n], torch.tensor(self._ring.slots, dtype=torch.long)

    def check_unchanged(self) -> None:
        """Does nothing: no other process writes this rank's rows (as a read-only
        :class:`~sewa.disk.DiskTrajectory` may), and :meth:`push` refuses while reading."""

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
        slot = self._ring.admit(step)  # validates the step; nothing changes until commit
        step = int(step)
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
        row = self.data[slot]
        with torch.no_grad():
            dests = [row[p.dst : p.dst + p.length] for p in self.pieces]
            torch._foreach_copy_(dests, [s.to(row.device) for s in sources])
        self._ring.commit(slot, step)
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
        ok = torch.tensor([int(bad is None)], device=comm_device(self.group))
        with collective(f"agreeing on the snapshot at step {step}", self.group):
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
            with collective("exchanging the shard layout", self.group):
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
        padded = torch.zeros(*lead, widest, dtype=local.dtype, device=comm_device(self.group))
        padded[..., : local.shape[-1]] = local
        receive = dst is None or self.rank == dst
        parts = [torch.empty_like(padded) for _ in range(self.world_size)] if receive else None
        with collective("gathering the shards", self.group):
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
        for values, step in zip(full, self._ring.steps, strict=True):
            traj.push(self.layout.unflatten(values, extras=False), step)
        traj.extras = {k: v.clone() for k, v in self.layout.extras.items()}
        return traj
