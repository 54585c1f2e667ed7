"""Batch plumbing shared by the engine, BatchNorm updates and distributed selection.

A batch is an ``(inputs, targets)`` pair. Inputs are a tensor (``model(x)``), a tuple or list
of positional inputs (``model(*x)``) or a dict of keyword inputs (``model(**x)``, Hugging Face
style); tensors nested in them are moved to the compute device.

Passes over batches are bounded: a one-shot iterator is read once and kept (at most
:data:`MAX_BATCHES` batches), so an endless iterator such as ``itertools.cycle`` fails with a
clear error instead of filling memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["MAX_BATCHES", "forward", "functional_forward", "to_device", "split_batch", "inputs_of", "cycle_batches"]

MAX_BATCHES = 100_000
"""The most batches one pass reads from a one-shot iterator (or one BatchNorm pass reads)."""


def forward(model: nn.Module, inputs: Any) -> Any:
    """Calls ``model`` on a tensor, a tuple of positional inputs, or a dict of keyword inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def functional_forward(model: nn.Module, params: dict[str, Tensor], inputs: Any) -> Any:
    """:func:`forward` with ``params`` in place of the model's own (``torch.func.functional_call``)."""
    if isinstance(inputs, dict):
        return functional_call(model, params, (), inputs)
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, params, tuple(inputs))
    return functional_call(model, params, (inputs,))


def to_device(x: Any, device: torch.device) -> Any:
    """Moves tensors nested in tuples, lists and dicts to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch.

    Raises:
        ValueError: if ``batch`` is not a pair.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}")
    return batch[0], batch[1]


def inputs_of(batch: Any) -> Any:
    """The inputs of an ``(inputs, targets)`` pair, or a bare input (as torch's ``update_bn``)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def is_one_shot(batches: Iterable[Any]) -> bool:
    """Whether ``batches`` is an iterator (a generator, ``iter(x)``): it can be read only once."""
    return isinstance(batches, Iterator)


def bounded(batches: Iterable[Any], what: str) -> Iterator[Any]:
    """Yields ``batches``, raising once more than :data:`MAX_BATCHES` came."""
    for count, batch in enumerate(batches, 1):
        if count > MAX_BATCHES:
            raise ValueError(f"{what} gave more than {MAX_BATCHES:,} batches (sewa._batch.MAX_BATCHES) in one pass: "
                             "pass a finite iterable (a list or a DataLoader), not an endless one such as itertools.cycle")
        yield batch


def cycle_batches(batches: Iterable[Any], what: str = "the selection split") -> Iterator[Any]:
    """Yields batches forever, in order, re-reading ``batches`` after each pass.

    A one-shot iterator is read lazily and kept as it is read, so an endless one is used
    without ever being cycled, and at most :data:`MAX_BATCHES` of its batches are kept.

    Raises:
        ValueError: if a pass gives no batch (an empty iterable, or an iterator that something
            else already used up), or a one-shot iterator gives more than :data:`MAX_BATCHES`.
    """
    if is_one_shot(batches):
        kept: list[Any] = []
        for batch in bounded(batches, what):
            kept.append(batch)
            yield batch
        if not kept:
            raise ValueError(f"{what} has no batches: the iterator given is empty (or was already used up); "
                             "pass a non-empty list of (inputs, targets) pairs, or a fresh iterator")
        batches = kept
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"{what} has no batches: pass a non-empty iterable of (inputs, targets) pairs")
