"""The recorded snapshots of one model: a ring buffer stored as one ``(window, P)`` matrix.

Row ``r`` of :attr:`Trajectory.data` holds one flattened snapshot of the recorded tensors
(the floating-point parameters, plus the floating-point buffers when asked). Rows are written
in place, so recording allocates nothing per step. The chronological order of the rows is kept
separately (a :class:`sewa._ring.Ring`), so dropping the oldest snapshot never moves data.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._names import _named_tensors, canonical_name, strip_shared_prefixes
from ._ring import Ring, RingHeld, TrajectoryError, check_window
from ._storage import _dtype, free_memory

__all__ = ["Trajectory", "TrajectoryError", "all_finite", "canonical_name"]

def all_finite(row: Tensor) -> bool:
    """Whether ``row`` holds no NaN or Inf, at about the cost of one sum."""
    # NaN/Inf propagate through a sum; the exact (mask-building) test runs only if it overflowed.
    return bool(torch.isfinite(row.sum(dtype=torch.float32))) or bool(torch.isfinite(row).all())


class Trajectory(RingHeld):
    """The last ``window`` snapshots of a model, as one contiguous ``(window, P)`` matrix.

    Args:
        template: The model (or a state dict) whose tensors define the layout. Only names,
            shapes and dtypes are read from it; nothing is recorded until :meth:`push`.
        window: How many snapshots to keep (the paper's ``k``). Older ones are dropped.
        dtype: Storage dtype: ``float64``, ``float32``, ``bfloat16`` or ``float16``. Default
            (``None``): follow the model, i.e. the widest floating dtype of the recorded
            tensors, so a float64 model is stored and averaged in float64. Averages are always
            accumulated in float64.
        buffers: Also record floating-point buffers (e.g. BatchNorm running statistics).
            Non-recorded entries are copied from the newest snapshot.
        device: Where the matrix lives.
        check_finite: Refuse snapshots holding NaN or Inf, or values that the storage dtype
            cannot hold (the error names the step and the parameter). On a CUDA trajectory the
            check is deferred so that a push never waits for the GPU: a flag per row is set on
            the device, and the first read (:meth:`matrix`, :meth:`snapshot`, :meth:`subset`,
            :meth:`save`) raises naming the bad step; a non-finite row is never averaged.

    Raises:
        TypeError: if ``window`` is not an integer.
        TrajectoryError: if ``window`` is not positive, or the matrix does not fit in the free
            memory of ``device`` (the message names the bytes needed).

    Example:
        >>> traj = Trajectory(model, window=100)
        >>> traj.push(model, step=1000)
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
        _data: Tensor | None = None,
    ) -> None:
        window = check_window(window)
        recorded, aliases, others = _named_tensors(template, buffers)
        if not recorded:
            raise TrajectoryError("the template has no floating-point parameters to record")
        self.window = window
        self.buffers = buffers
        self.check_finite = check_finite
        self.names = list(recorded)
        self.shapes = [tuple(t.shape) for t in recorded.values()]
        self.dtypes = [t.dtype for t in recorded.values()]
        self.numels = [t.numel() for t in recorded.values()]
        self.aliases = aliases
        self.extras: dict[str, Tensor] = {k: v.detach().to("cpu", copy=True) for k, v in others.items()}
        self.num_params = sum(self.numels)
        storage = _dtype(dtype, recorded)
        if _data is None:
            _data = self._allocate(window, storage, torch.device(device))
        elif tuple(_data.shape) != (window, self.num_params) or _data.dtype != storage:
            raise TrajectoryError(f"storage has shape {tuple(_data.shape)} and dtype {_data.dtype}, expected {(window, self.num_params)} and {storage}")
        self.data = _data
        self._ring = Ring(window)
        self._readers = 0
        # Deferred NaN/Inf check (CUDA): a flag per row, set on the device at each push and read
        # once by the next read of the trajectory, instead of a host sync per push.
        self._defer_check = self.data.device.type == "cuda"
        self._bad_rows: Tensor | None = None
        self._unchecked = False

    def _allocate(self, window: int, storage: torch.dtype, device: torch.device) -> Tensor:
        need = window * self.num_params * storage.itemsize
        free = free_memory(device)
        if free is not None and need > free:
            raise TrajectoryError(f"a window of {window:,} snapshots of {self.num_params:,} values in {storage} needs "
                                  f"{need:,} bytes, but {device} has {free:,} free: use a smaller window, a compact "
                                  "dtype (e.g. dtype='bfloat16'), or a sewa.disk.DiskTrajectory")
        try:
            return torch.zeros(window, self.num_params, dtype=storage, device=device)
        except (RuntimeError, OverflowError) as e:
            raise TrajectoryError(f"cannot allocate a window of {window:,} snapshots ({need:,} bytes) on {device}: "
                                  f"{e}; use a smaller window or a sewa.disk.DiskTrajectory") from e

    # ----------------------------------------------------------------- inspection
    def __repr__(self) -> str:
        steps = self._ring.steps
        return (f"Trajectory(window={self.window}, held={len(self)}, params={self.num_params:,}, "
                f"dtype={str(self.dtype).removeprefix('torch.')}, steps={steps[:1] + steps[-1:]})")

    @property
    def nbytes(self) -> int:
        """Bytes held by the snapshot matrix."""
        return self.data.numel() * self.data.element_size()

    def matrix(self) -> tuple[Tensor, Tensor]:
        """The held rows and their chronological order, without copying.

        Returns:
            ``(rows, order)``: ``rows`` is ``data[:len(self)]`` (storage order) and ``order[i]``
            is the row of the i-th oldest snapshot. Weights over snapshots ``w`` (oldest first)
            become weights over rows as ``w_rows[order] = w``.

        Raises:
            TrajectoryError: if the trajectory is empty, or a deferred check found a held
                snapshot with NaN or Inf (the message names its step).
        """
        n = len(self)
        if n == 0:
            raise TrajectoryError("the trajectory holds no snapshots yet: push some first")
        self._check_rows(self._ring.slots)
        return self.data[:n], torch.tensor(self._ring.slots, dtype=torch.long)

    def check_unchanged(self) -> None:
        """Raises if rows handed out by :meth:`matrix` may have changed since (only a read-only
        :class:`~sewa.disk.DiskTrajectory` whose writer moved on can); call it after reading them."""

    def snapshot(self, index: int) -> dict[str, Tensor]:
        """The ``index``-th oldest snapshot as a state dict (``-1`` is the newest)."""
        slot = self._ring.slots[index]
        self._check_rows([slot])
        out = self.unflatten(self.data[slot])
        self.check_unchanged()
        return out

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Marks the trajectory as being read; :meth:`push` refuses to write meanwhile."""
        self._readers += 1
        try:
            yield
        finally:
            self._readers -= 1

    # ----------------------------------------------------------------- layout
    def views(self, flat: Tensor) -> list[Tensor]:
        """Splits a flat ``(..., P)`` tensor into per-tensor views of the recorded shapes."""
        lead = flat.shape[:-1]
        return [v.view(lead + torch.Size(s)) for v, s in zip(flat.split(self.numels, dim=-1), self.shapes, strict=True)]

    def unflatten(self, flat: Tensor, *, extras: bool = True) -> dict[str, Tensor]:
        """A state dict from one flat vector: recorded tensors in their original dtype,
        tied names, and (if ``extras``) the non-recorded entries of the newest snapshot."""
        out: dict[str, Tensor] = {}
        for name, view, dtype in zip(self.names, self.views(flat), self.dtypes, strict=True):
            out[name] = view.to(dtype=dtype, copy=True)
        for alias, target in self.aliases.items():
            out[alias] = out[target]
        if extras:
            out.update({k: v.clone() for k, v in self.extras.items()})
        return out

    def check_compatible(self, source: nn.Module | Mapping[str, Any], what: str = "model") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Splits ``source`` into (recorded tensors, other entries), or raises naming the first
        parameter whose name, shape or dtype differs from the trajectory's.

        Names lose a wrapper prefix shared by every name when that makes them the trajectory's
        names (see :mod:`sewa._names`). A state dict's floating-point tensors may be in another
        floating dtype: they are cast into storage.
        """
        if isinstance(source, nn.Module):
            recorded, _, others = _named_tensors(source, self.buffers)
            if not set(self.names) <= set(recorded):  # e.g. a wrapper of the template's own class
                rename = strip_shared_prefixes([*recorded, *others], expected=self.names)
                recorded = {rename[k]: t for k, t in recorded.items()}
                others = {rename[k]: t for k, t in others.items()}
        elif isinstance(source, Mapping):
            keys = [k for k, v in source.items() if isinstance(v, Tensor)]
            rename = strip_shared_prefixes(keys, expected=self.names)
            entries = {rename[k]: source[k].detach() for k in keys}
            recorded = {n: entries[n] for n in self.names if n in entries}
            others = {n: t for n, t in entries.items() if n not in recorded and n not in self.aliases}
            unknown = [n for n in others if n not in self.extras]
            if unknown:
                raise TrajectoryError(f"{what} has entry {unknown[0]!r} that the trajectory does not know; it comes from another architecture")
        else:
            raise TypeError(f"expected an nn.Module or a state dict, got {type(source).__name__}")
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            t = recorded.get(name)
            if t is None:
                hint = " (it is a buffer here: record with buffers=False)" if name in others else ""
                raise TrajectoryError(f"{what} has no parameter {name!r}{hint}; the trajectory was recorded from another architecture")
            if tuple(t.shape) != shape:
                raise TrajectoryError(f"{what} parameter {name!r} has shape {tuple(t.shape)}, the trajectory expects {shape}")
            castable = isinstance(source, Mapping) and t.is_floating_point()
            if t.dtype != dtype and not castable:
                raise TrajectoryError(f"{what} parameter {name!r} has dtype {t.dtype}, the trajectory expects {dtype}")
        if len(recorded) != len(self.names):
            extra = next(n for n in recorded if n not in set(self.names))
            raise TrajectoryError(f"{what} has parameter {extra!r} that the trajectory does not record; it comes from another architecture")
        return recorded, others

    # ----------------------------------------------------------------- recording
    def push(self, source: nn.Module | Mapping[str, Tensor], step: int, *, what: str = "model") -> None:
        """Records a snapshot, dropping the oldest when the window is full.

        Writes straight into the row that will hold it: no copy of the model is made. Every
        check runs before anything is written, so a refused push changes nothing.

        Raises:
            TrajectoryError: if ``source`` does not match the layout, holds NaN/Inf or a value
                the storage dtype turns into Inf, or ``step`` is not after the newest step.
            RuntimeError: if the trajectory is being read (e.g. by :func:`sewa.select`).

        ``what`` names ``source`` in error messages (e.g. ``"checkpoint"``).
        """
        slot, step, recorded, others = self._admit(source, step, what)
        self._write(self.data[slot], [recorded[n] for n in self.names])
        self._flag_row(slot)
        self._ring.commit(slot, step)
        self._keep_extras(others)

    def _keep_extras(self, others: Mapping[str, Tensor]) -> bool:
        """Copies the non-recorded entries of the newest snapshot; returns whether any changed."""
        changed = False
        for name, t in others.items():
            held = self.extras.get(name)
            if held is not None and held.shape == t.shape and held.dtype == t.dtype:
                if not torch.equal(held, t.to(held.device)):
                    held.copy_(t)
                    changed = True
            else:
                self.extras[name] = t.detach().to("cpu", copy=True)
                changed = True
        return changed

    def _admit(self, source: nn.Module | Mapping[str, Tensor], step: int, what: str) -> tuple[int, int, dict[str, Tensor], dict[str, Tensor]]:
        """Every check a push makes before it writes anything: returns (slot, step, recorded, others)."""
        if self._readers:
            raise RuntimeError("cannot push while the trajectory is being read (a selection is running); push after it returns")
        slot = self._ring.admit(step)
        recorded, others = self.check_compatible(source, what)
        if self.check_finite and not self._defer_check:
            self._refuse_unstorable([recorded[n] for n in self.names], int(step))
        return slot, int(step), recorded, others

    def _refuse_unstorable(self, sources: list[Tensor], step: int) -> None:
        """Raises before anything is written if a source holds NaN/Inf, or a finite value that
        the storage dtype would turn into Inf (checked after the cast): a refused push changes nothing."""
        with torch.no_grad():
            # A tensor already in the storage dtype needs only a NaN/Inf test: one sum (NaN/Inf
            # propagate; an overflowing sum sends us to the exact test below). Any other is
            # checked after the cast: its min and max overflow the storage exactly when some
            # element would. One host sync in all.
            checks: list[Tensor] = []
            for t in sources:
                if not t.numel():
                    continue
                if t.dtype == self.dtype:
                    checks.append(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))
                else:
                    checks.extend(e.to(self.dtype) for e in torch.aminmax(t))
            if not checks:
                return
            device = checks[0].device if all(c.device == checks[0].device for c in checks) else torch.device("cpu")
            if bool(torch.isfinite(torch.stack([c.to(device=device, dtype=torch.float64) for c in checks])).all()):
                return
        for name, t in zip(self.names, sources, strict=True):
            if not bool(torch.isfinite(t).all()):
                raise TrajectoryError(f"snapshot at step {step} holds NaN or Inf (first in {name!r}); it was not recorded")
            peak = t.abs().amax() if t.numel() else t.new_zeros(())
            if not bool(torch.isfinite(peak.to(self.dtype))):
                limit = torch.finfo(self.dtype).max
                storage = str(self.dtype).removeprefix("torch.")
                raise TrajectoryError(f"snapshot at step {step} overflows {storage} storage in {name!r} "
                                      f"(|value| up to {float(peak):.3g} > {limit:.4g}); it was not recorded: "
                                      "store in a wider dtype (dtype='float32', or 'float64')")

    def _write(self, row: Tensor, sources: list[Tensor]) -> None:
        dests = self.views(row)
        with torch.no_grad():
            torch._foreach_copy_(dests, [s.to(row.device) if s.device != row.device else s for s in sources])

    def _flag_row(self, slot: int) -> None:
        """Deferred check: marks on the device whether the stored row holds NaN/Inf (no sync)."""
        if not (self.check_finite and self._defer_check):
            return
        with torch.no_grad():
            if self._bad_rows is None:
                self._bad_rows = torch.zeros(self.window, dtype=torch.bool, device=self.data.device)
            low, high = torch.aminmax(self.data[slot])
            self._bad_rows[slot] = ~(torch.isfinite(low) & torch.isfinite(high))
        self._unchecked = True

    def _check_rows(self, slots: list[int]) -> None:
        """Raises naming the step if a deferred check flagged one of ``slots`` (one host sync)."""
        if not self._unchecked or self._bad_rows is None:
            return
        flags = self._bad_rows.to("cpu").tolist()
        held = dict(zip(self._ring.slots, self._ring.steps, strict=True))
        bad = [held[s] for s in self._ring.slots if flags[s]]
        if not bad:
            self._unchecked = False
            return
        wanted = [held[s] for s in slots if flags[s]]
        if wanted:
            keep = [i for i, s in enumerate(self._ring.slots) if not flags[s]]
            raise TrajectoryError(f"the snapshot at step {wanted[0]} holds NaN or Inf (bad steps: {bad}); it was recorded "
                                  "without waiting for the device and is never averaged: read the others with "
                                  f"traj.subset({keep}), or keep recording until it leaves the window")

    def subset(self, indices: list[int] | range) -> Trajectory:
        """A new trajectory (window = ``len(indices)``) holding copies of the given snapshots.

        Args:
            indices: Oldest-first positions, e.g. ``range(len(t) - 50, len(t))`` for the newest 50.
        """
        positions = self._ring.positions(indices)
        if not positions:
            raise TrajectoryError("subset needs at least one snapshot")
        slots = [self._ring.slots[i] for i in positions]
        self._check_rows(slots)
        out = Trajectory._from_layout(self._layout(), len(positions), self.data.device)
        out.check_finite = self.check_finite
        out.extras = {k: v.clone() for k, v in self.extras.items()}
        out.data.copy_(self.data[slots])
        self.check_unchanged()
        out._ring.load((i, self._ring.steps[p]) for i, p in enumerate(positions))
        return out

    @classmethod
    def _from_layout(cls, meta: dict[str, Any], window: int, device: torch.device | str) -> Trajectory:
        template = {n: torch.empty(s, dtype=getattr(torch, d), device="meta")
                    for n, s, d in zip(meta["names"], meta["shapes"], meta["dtypes"], strict=True)}
        traj = cls(template, window, dtype=meta["storage"], device=device)
        traj.buffers = meta["buffers"]
        traj.aliases = dict(meta["aliases"])
        return traj

    # ----------------------------------------------------------------- persistence
    def _layout(self) -> dict[str, Any]:
        return {
            "format": "sewa.trajectory/1",
            "window": self.window,
            "buffers": self.buffers,
            "names": self.names,
            "shapes": [list(s) for s in self.shapes],
            "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
            "aliases": self.aliases,
            "storage": str(self.dtype).removeprefix("torch."),
        }

    def save(self, path: str | Path) -> None:
        """Saves the held snapshots (oldest first) and layout to one safetensors file, atomically."""
        from safetensors.torch import save_file

        from ._atomic import atomic_write

        rows, order = self.matrix()
        tensors = {"snapshots": rows.index_select(0, order.to(rows.device)).contiguous().cpu()}
        self.check_unchanged()
        tensors.update({f"extra/{k}": v.contiguous() for k, v in self.extras.items()})
        meta = self._layout() | {"steps": self._ring.steps}
        atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"sewa": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path, *, window: int | None = None, device: torch.device | str = "cpu") -> Trajectory:
        """Loads a trajectory written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no trajectory file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["sewa"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (KeyError, json.JSONDecodeError) as e:
            raise TrajectoryError(f"{path} is not a sewa trajectory file") from e
        except Exception as e:  # safetensors raises its own error types
            raise TrajectoryError(f"cannot read {path}: {e}") from e
        snaps = tensors["snapshots"]
        traj = cls._from_layout(meta, window or meta["window"], device)
        traj.extras = {k.removeprefix("extra/"): v for k, v in tensors.items() if k.startswith("extra/")}
        n = min(len(meta["steps"]), traj.window)
        traj.data[:n].copy_(snaps[len(meta["steps"]) - n :])
        traj._ring.load((i, int(s)) for i, s in enumerate(meta["steps"][-n:]))
        return traj
