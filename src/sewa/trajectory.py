"""The recorded snapshots of one model: a ring buffer stored as one ``(window, P)`` matrix.

Row ``r`` of :attr:`Trajectory.data` holds one flattened snapshot of the recorded tensors
(the floating-point parameters, plus the floating-point buffers when asked). Rows are written
in place, so recording allocates nothing per step. The chronological order of the rows is kept
separately (``slots``), so dropping the oldest snapshot never moves data.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Trajectory", "TrajectoryError", "all_finite", "canonical_name"]

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def all_finite(row: Tensor) -> bool:
    """Whether ``row`` holds no NaN or Inf, at about the cost of one sum."""
    # NaN/Inf propagate through a sum; the exact (mask-building) test runs only if it overflowed.
    return bool(torch.isfinite(row.sum(dtype=torch.float32))) or bool(torch.isfinite(row).all())


class TrajectoryError(ValueError):
    """A snapshot or model does not fit the trajectory it is used with."""


def canonical_name(name: str) -> str:
    """Strips the prefixes that ``torch.compile`` (``_orig_mod.``) and DDP (``module.``) add."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
        name = name.replace("._orig_mod.", ".")
    return name


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise TrajectoryError(f"storage dtype {value} is not supported: use one of {list(_DTYPES)}")
        return value
    if value not in _DTYPES:
        raise TrajectoryError(f"storage dtype {value!r} is not supported: use one of {list(_DTYPES)}")
    return _DTYPES[value]


def _named_tensors(source: nn.Module | Mapping[str, Any], buffers: bool) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Tensor]]:
    """Splits a model or state dict into (recorded tensors, aliases, other entries).

    From a model, recorded tensors are the floating-point parameters (and floating-point
    buffers when ``buffers``); ``aliases`` maps the second name of a tied parameter to its
    first. From a state dict, every floating-point entry is recorded.
    """
    recorded: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    others: dict[str, Tensor] = {}
    if isinstance(source, nn.Module):
        seen: dict[int, str] = {}
        for name, p in source.named_parameters(remove_duplicate=False):
            name = canonical_name(name)
            if id(p) in seen:
                aliases[name] = seen[id(p)]
                continue
            seen[id(p)] = name
            (recorded if p.is_floating_point() else others)[name] = p.detach()
        for mod_name, mod in source.named_modules(remove_duplicate=False):
            for b_name, b in mod._buffers.items():
                if b is None or b_name in mod._non_persistent_buffers_set:
                    continue
                name = canonical_name(f"{mod_name}.{b_name}" if mod_name else b_name)
                (recorded if buffers and b.is_floating_point() else others)[name] = b.detach()
        return recorded, aliases, others
    if not isinstance(source, Mapping):
        raise TypeError(f"expected an nn.Module or a state dict, got {type(source).__name__}")
    for name, t in source.items():
        if isinstance(t, Tensor):
            (recorded if t.is_floating_point() else others)[canonical_name(name)] = t.detach()
    return recorded, aliases, others


class Trajectory:
    """The last ``window`` snapshots of a model, as one contiguous ``(window, P)`` matrix.

    Args:
        template: The model (or a state dict) whose tensors define the layout. Only names,
            shapes and dtypes are read from it; nothing is recorded until :meth:`push`.
        window: How many snapshots to keep (the paper's ``k``). Older ones are dropped.
        dtype: Storage dtype: ``float32``, ``bfloat16`` or ``float16``. Averages are always
            accumulated in float32 or wider.
        buffers: Also record floating-point buffers (e.g. BatchNorm running statistics).
            Non-recorded entries are copied from the newest snapshot.
        device: Where the matrix lives.
        check_finite: Refuse snapshots holding NaN or Inf (the error names the step).

    Example:
        >>> traj = Trajectory(model, window=100)
        >>> traj.push(model, step=1000)
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
        _data: Tensor | None = None,
    ) -> None:
        if not isinstance(window, int) or window < 1:
            raise TrajectoryError(f"window must be a positive integer, got {window!r}")
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
        storage = _dtype(dtype)
        if _data is None:
            _data = torch.zeros(window, self.num_params, dtype=storage, device=device)
        elif tuple(_data.shape) != (window, self.num_params) or _data.dtype != storage:
            raise TrajectoryError(f"storage has shape {tuple(_data.shape)} and dtype {_data.dtype}, expected {(window, self.num_params)} and {storage}")
        self.data = _data
        self._steps: list[int] = []
        self._slots: list[int] = []
        self._readers = 0

    # ----------------------------------------------------------------- inspection
    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype."""
        return self.data.dtype

    @property
    def steps(self) -> list[int]:
        """Training steps of the held snapshots, oldest first."""
        return list(self._steps)

    @property
    def slots(self) -> list[int]:
        """Row of :attr:`data` holding each snapshot, oldest first."""
        return list(self._slots)

    def __len__(self) -> int:
        return len(self._steps)

    def __repr__(self) -> str:
        return (f"Trajectory(window={self.window}, held={len(self)}, params={self.num_params:,}, "
                f"dtype={str(self.dtype).removeprefix('torch.')}, steps={self._steps[:1] + self._steps[-1:]})")

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
        """
        n = len(self)
        if n == 0:
            raise TrajectoryError("the trajectory holds no snapshots yet: push some first")
        return self.data[:n], torch.tensor(self._slots, dtype=torch.long)

    def snapshot(self, index: int) -> dict[str, Tensor]:
        """The ``index``-th oldest snapshot as a state dict (``-1`` is the newest)."""
        row = self.data[self._slots[index]]
        return self.unflatten(row)

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
        return [v.view(*lead, *s) for v, s in zip(flat.split(self.numels, dim=-1), self.shapes, strict=True)]

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
        parameter whose name, shape or dtype differs from the trajectory's."""
        if isinstance(source, nn.Module):
            recorded, _, others = _named_tensors(source, self.buffers)
        elif isinstance(source, Mapping):
            entries = {canonical_name(k): v.detach() for k, v in source.items() if isinstance(v, Tensor)}
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
            if t.dtype != dtype:
                raise TrajectoryError(f"{what} parameter {name!r} has dtype {t.dtype}, the trajectory expects {dtype}")
        if len(recorded) != len(self.names):
            extra = next(n for n in recorded if n not in set(self.names))
            raise TrajectoryError(f"{what} has parameter {extra!r} that the trajectory does not record; it comes from another architecture")
        return recorded, others

    # ----------------------------------------------------------------- recording
    def push(self, source: nn.Module | Mapping[str, Tensor], step: int, *, what: str = "model") -> None:
        """Records a snapshot, dropping the oldest when the window is full.

        Writes straight into the row that will hold it: no copy of the model is made.

        Raises:
            TrajectoryError: if ``source`` does not match the layout, holds NaN/Inf, or ``step``
                is not after the newest recorded step.
            RuntimeError: if the trajectory is being read (e.g. by :func:`sewa.select`).

        ``what`` names ``source`` in error messages (e.g. ``"checkpoint"``).
        """
        step, recorded, others = self._admit(source, step, what)
        slot = len(self._slots) if len(self._slots) < self.window else self._slots[0]
        row = self.data[slot]
        self._write(row, [recorded[n] for n in self.names])
        if len(self._slots) == self.window:
            self._slots.pop(0)
            self._steps.pop(0)
        self._slots.append(slot)
        self._steps.append(step)
        for name, t in others.items():
            held = self.extras.get(name)
            if held is not None and held.shape == t.shape and held.dtype == t.dtype:
                held.copy_(t)
            else:
                self.extras[name] = t.detach().to("cpu", copy=True)

    def _admit(self, source: nn.Module | Mapping[str, Tensor], step: int, what: str) -> tuple[int, dict[str, Tensor], dict[str, Tensor]]:
        """Every check a push makes before it writes anything: returns (step, recorded, others)."""
        if self._readers:
            raise RuntimeError("cannot push while the trajectory is being read (a selection is running); push after it returns")
        step = int(step)
        if self._steps and step <= self._steps[-1]:
            raise TrajectoryError(f"step {step} is not after the newest recorded step {self._steps[-1]}")
        recorded, others = self.check_compatible(source, what)
        if self.check_finite:
            self._refuse_nonfinite([recorded[n] for n in self.names], step)
        return step, recorded, others

    def _refuse_nonfinite(self, sources: list[Tensor], step: int) -> None:
        """Raises before anything is written if a source holds NaN/Inf, or a value that the
        float16 storage would turn into Inf: a refused push changes nothing."""
        with torch.no_grad():
            # One reduction per tensor and a single host sync on the fast path.
            checks = [t.sum(dtype=torch.float32) for t in sources]
            if self.dtype == torch.float16:
                inf = torch.tensor(float("inf"))
                checks += [torch.where(t.abs().amax().float().cpu() > 65504.0, inf, 0.0) for t in sources if t.numel()]
            if bool(torch.isfinite(torch.stack([c.to("cpu") for c in checks]).sum())):
                return
        for name, t in zip(self.names, sources, strict=True):
            if not bool(torch.isfinite(t).all()):
                raise TrajectoryError(f"snapshot at step {step} holds NaN or Inf (first in {name!r}); it was not recorded")
            if self.dtype == torch.float16 and float(t.abs().amax()) > 65504.0:
                raise TrajectoryError(f"snapshot at step {step} overflows float16 storage in {name!r} "
                                      "(|value| > 65504); it was not recorded: store in bfloat16 or float32")

    def _write(self, row: Tensor, sources: list[Tensor]) -> None:
        dests = self.views(row)
        with torch.no_grad():
            torch._foreach_copy_(dests, [s.to(row.device) if s.device != row.device else s for s in sources])

    def subset(self, indices: list[int] | range) -> Trajectory:
        """A new trajectory (window = ``len(indices)``) holding copies of the given snapshots.

        Args:
            indices: Oldest-first positions, e.g. ``range(len(t) - 50, len(t))`` for the newest 50.
        """
        positions = sorted({range(len(self))[i] for i in indices})
        if not positions:
            raise TrajectoryError("subset needs at least one snapshot")
        out = Trajectory._from_layout(self._layout(), len(positions), self.data.device)
        out.check_finite = self.check_finite
        out.extras = {k: v.clone() for k, v in self.extras.items()}
        out.data.copy_(self.data[[self._slots[i] for i in positions]])
        out._slots = list(range(len(positions)))
        out._steps = [self._steps[i] for i in positions]
        return out

    @classmethod
    def _from_layout(cls, meta: dict[str, Any], window: int, device: torch.device | str) -> Trajectory:
        template = {n: torch.empty(s, dtype=getattr(torch, d)) for n, s, d in zip(meta["names"], meta["shapes"], meta["dtypes"], strict=True)}
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
        """Saves the held snapshots (oldest first) and layout to one safetensors file."""
        from safetensors.torch import save_file

        rows, order = self.matrix()
        tensors = {"snapshots": rows.index_select(0, order).contiguous().cpu()}
        tensors.update({f"extra/{k}": v.contiguous() for k, v in self.extras.items()})
        meta = self._layout() | {"steps": self._steps}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"sewa": json.dumps(meta)})
        tmp.replace(path)

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
        traj._slots = list(range(n))
        traj._steps = [int(s) for s in meta["steps"][-n:]]
        return traj
