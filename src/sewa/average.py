"""One weighted average over a trajectory, and loading it into a model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .bn import has_batchnorm, update_bn
from .trajectory import Trajectory
from .weights import check_weights

__all__ = ["average", "average_flat", "apply"]

_CHUNK_ELEMENTS = 1 << 24  # rows x columns converted at once: bounds the float64 scratch memory


def average_flat(trajectory: Trajectory, weights: Tensor | Sequence[float]) -> Tensor:
    """``sum_i w_i θ_i`` as one flat vector, accumulated in float64.

    The result is float32, or float64 when the trajectory stores float64 (so a float64 model
    keeps its precision end to end).

    Args:
        trajectory: The snapshots.
        weights: ``n`` non-negative weights summing to 1, oldest snapshot first.

    Raises:
        TrajectoryError: if a row was found non-finite by a deferred check, or a read-only
            disk trajectory's writer overwrote a row while it was read.
    """
    rows, order = trajectory.matrix()
    w = check_weights(weights, len(trajectory))
    w_rows = torch.zeros(len(trajectory), dtype=torch.float64)
    w_rows[order] = w
    used = w_rows.nonzero().flatten()  # skip rows with zero weight: LAWA/top-K read only K rows
    w_used = w_rows[used].to(rows.device)
    out_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    out = torch.empty(rows.shape[1], dtype=out_dtype, device=rows.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, used.numel()))
    for start in range(0, rows.shape[1], chunk):
        block = rows[used.to(rows.device), start : start + chunk].to(torch.float64)
        out[start : start + chunk] = (w_used @ block).to(out_dtype)
    # rows read from a file another process writes (read-only DiskTrajectory): still the listed ones?
    check_unchanged = getattr(trajectory, "check_unchanged", None)  # a ShardedTrajectory has none
    if check_unchanged is not None:
        check_unchanged()
    return out


def average(trajectory: Trajectory, weights: Tensor | Sequence[float]) -> dict[str, Tensor]:
    """The weighted average of the held snapshots as a state dict.

    ``w = sum_i weights_i · θ_i``, accumulated in float64 whatever the storage dtype, cast to
    each tensor's own dtype. Entries that are not recorded (integer buffers, and buffers when
    the trajectory records parameters only) are copied from the newest snapshot: recompute
    BatchNorm statistics afterwards with :func:`sewa.update_bn` (or use :func:`sewa.apply`).

    Args:
        trajectory: The snapshots.
        weights: One weight per held snapshot, oldest first (see :mod:`sewa.weights`).
    """
    return trajectory.unflatten(average_flat(trajectory, weights))


def apply(
    model: nn.Module,
    trajectory: Trajectory,
    weights: Tensor | Sequence[float],
    *,
    bn_batches: Iterable[Any] | None | bool = None,
) -> nn.Module:
    """Loads the weighted average into ``model`` and recomputes BatchNorm statistics.

    Args:
        model: A model of the trajectory's architecture; modified in place and returned.
        trajectory: The snapshots.
        weights: One weight per held snapshot, oldest first.
        bn_batches: Training batches for :func:`sewa.update_bn`. Required when the model has
            BatchNorm layers; pass ``False`` to keep the newest snapshot's statistics.

    Raises:
        ValueError: if the model has BatchNorm layers and ``bn_batches`` is not given.
    """
    if has_batchnorm(model) and bn_batches is None:
        raise ValueError(
            "the model has BatchNorm layers, whose running statistics do not match averaged weights: "
            "pass bn_batches=<training batches> to recompute them, or bn_batches=False to keep the newest snapshot's"
        )
    trajectory.check_compatible(model)
    state = average(trajectory, weights)
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    if bn_batches not in (None, False) and has_batchnorm(model):
        update_bn(model, bn_batches)  # type: ignore[arg-type]
    return model
