"""BatchNorm statistics for averaged weights.

Running means and variances of an average of weights are not the average of the running
statistics: after averaging, they must be recomputed with one pass over training data.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ._batch import bounded, forward, inputs_of, to_device

__all__ = ["has_batchnorm", "update_bn"]


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that tracks running statistics."""
    return bool(_batchnorms(model))


@torch.no_grad()
def update_bn(
    model: nn.Module | Iterable[Any],
    batches: Iterable[Any] | nn.Module,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Recomputes BatchNorm running statistics of ``model`` over ``batches``.

    The statistics become the exact average over all batches (momentum ``None``), as in
    ``torch.optim.swa_utils.update_bn``; inputs may be a tensor, a tuple of positional inputs or
    a dict of keyword inputs (Hugging Face style). torch's argument order,
    ``update_bn(loader, model)``, is accepted too: the argument that is an ``nn.Module`` is the
    model.

    Args:
        model: The model, modified in place (its train/eval mode is restored).
        batches: An iterable of ``(inputs, targets)`` pairs, or of bare inputs; read once, at
            most ``sewa._batch.MAX_BATCHES`` of them.
        device: Where to move inputs; defaults to the model's device.

    Returns:
        The model.

    Raises:
        TypeError: if neither argument is an ``nn.Module``.
        ValueError: if ``batches`` is empty (or endless) while the model has BatchNorm layers.
    """
    if isinstance(batches, nn.Module) and not isinstance(model, nn.Module):
        model, batches = batches, model  # torch's order: update_bn(loader, model)
    if not isinstance(model, nn.Module) or isinstance(batches, nn.Module):
        raise TypeError(f"update_bn takes (model, batches) or torch's (loader, model): got ({type(model).__name__}, "
                        f"{type(batches).__name__}); pass exactly one nn.Module and one iterable of batches")
    bns = _batchnorms(model)
    if not bns:
        return model
    device = torch.device(device) if device is not None else next(itertools.chain(model.parameters(), model.buffers())).device
    momenta = {bn: bn.momentum for bn in bns}
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts equally
    was_training = model.training
    model.train()
    seen = 0
    try:
        for batch in bounded(batches, "update_bn's batches"):
            forward(model, to_device(inputs_of(batch), device))
            seen += 1
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise ValueError("update_bn got no batches: pass the training batches to recompute BatchNorm statistics "
                         "(an iterator that was already used up gives none)")
    return model
