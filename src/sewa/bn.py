"""BatchNorm statistics for averaged weights.

Running means and variances of an average of weights are not the average of the running
statistics: after averaging, they must be recomputed with one pass over training data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import update_bn as _torch_update_bn

__all__ = ["has_batchnorm", "update_bn"]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that tracks running statistics."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def update_bn(model: nn.Module, batches: Iterable[Any], device: torch.device | str | None = None) -> nn.Module:
    """Recomputes BatchNorm running statistics of ``model`` over ``batches``.

    Args:
        model: The model, modified in place (its train/eval mode is restored).
        batches: An iterable of inputs or of ``(inputs, targets)`` pairs.
        device: Where to move inputs; defaults to the model's device.

    Raises:
        ValueError: if ``batches`` is empty while the model has BatchNorm layers.
    """
    if not has_batchnorm(model):
        return model
    if device is None:
        device = next(model.parameters()).device
    seen = 0

    def counted() -> Iterable[Any]:
        nonlocal seen
        for batch in batches:
            seen += 1
            yield batch

    _torch_update_bn(counted(), model, torch.device(device))
    if seen == 0:
        raise ValueError("update_bn got no batches: pass the training batches to recompute BatchNorm statistics")
    return model
