"""Process-group plumbing of :mod:`sewa.distributed`: start-up, failed collectives, byte counts."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

__all__ = ["DistributedError", "init", "collective", "comm_device", "engine_device", "shard_bounds", "CommStats",
           "is_comm_error", "all_gather_single", "reduce_scatter_single"]

_timeout: datetime.timedelta | None = None  # set by init(), quoted in error messages
# torch 2.13 renamed the tensor-in/tensor-out collectives; older versions have the old names.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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
def collective(what: str, group: dist.ProcessGroup | None) -> Iterator[None]:
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


def comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where small bookkeeping tensors must live for the group's backend (NCCL: the GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def engine_device(model: nn.Module, group: dist.ProcessGroup | None, device: torch.device | str | None) -> torch.device:
    """Where a distributed engine computes unless told: NCCL's GPU, else where the model's
    (local) parameters live, so the batches go where the model's forward expects them."""
    if device is not None:
        return torch.device(device)
    comm = comm_device(group)
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


def is_comm_error(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, dist.DistError) or any(s in text for s in ("gloo", "Connection closed", "Timed out", "NCCL"))
