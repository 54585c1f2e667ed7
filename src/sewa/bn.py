"""BatchNorm statistics for averaged weights.

Running means and variances of an average of weights are not the average of the running
statistics: after averaging, they must be recomputed with one pass over training data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["has_batchnorm", "update_bn"]


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that tracks running statistics."""
    return bool(_batchnorms(model))


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


@torch.no_grad()
def update_bn(model: nn.Module, batches: Iterable[Any], device: torch.device | str | None = None) -> nn.Module:
    """Recomputes BatchNorm running statistics of ``model`` over ``batches``.

    The statistics become the exact average over all batches (momentum ``None``), as in
    ``torch.optim.swa_utils.update_bn``; inputs may be a tensor, a tuple of positional inputs or
    a dict of keyword inputs (Hugging Face style).

    Args:
        model: The model, modified in place (its train/eval mode is restored).
        batches: An iterable of ``(inputs, targets)`` pairs, or of bare input tensors.
        device: Where to move inputs; defaults to the model's device.

    Raises:
        ValueError: if ``batches`` is empty while the model has BatchNorm layers.
    """
    bns = _batchnorms(model)
    if not bns:
        return model
    device = torch.device(device) if device is not None else next(model.parameters()).device
    momenta = {bn: bn.momentum for bn in bns}
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts equally
    was_training = model.training
    model.train()
    seen = 0
    try:
        for batch in batches:
            inputs = _to(batch[0] if isinstance(batch, (tuple, list)) else batch, device)
            if isinstance(inputs, dict):
                model(**inputs)
            elif isinstance(inputs, (tuple, list)):
                model(*inputs)
            else:
                model(inputs)
            seen += 1
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise ValueError("update_bn got no batches: pass the training batches to recompute BatchNorm statistics")
    return model
