"""Stratified splits and mini-batching shared by the experiment data loaders."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

Split = tuple[torch.Tensor, torch.Tensor]


def stratified_split(labels: Sequence[int] | np.ndarray, sizes: Sequence[int],
                     seed: int = 0) -> list[np.ndarray]:
    """Split indices into consecutive parts with the class mix of ``labels`` kept in each part.

    Each class is shuffled with ``seed``; item ``r`` of a class of size ``c`` gets the key
    ``(r + 0.5) / c`` and all items are sorted by key (random tie-break), so every prefix of the
    order has each class in proportion (within one item). The parts are consecutive slices.

    Args:
        labels: Class label per item.
        sizes: Size of each part; their sum must not exceed ``len(labels)``.
        seed: Seed of the shuffle.

    Returns:
        One sorted int64 index array per part.
    """
    labels = np.asarray(labels)
    if sum(sizes) > len(labels) or min(sizes, default=0) < 0:
        raise ValueError(f"split sizes {list(sizes)} do not fit {len(labels)} items")
    rng = np.random.default_rng(seed)
    key = np.empty(len(labels))
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        key[members] = (np.arange(len(members)) + 0.5) / len(members)
    order = np.lexsort((rng.random(len(labels)), key))
    bounds = np.cumsum([0, *sizes])
    return [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _split_named(items, labels: torch.Tensor, sizes: dict[str, int], seed: int) -> dict:
    """``{name: (items[idx], labels[idx])}`` over a stratified split; ``items`` a tensor or list."""
    idxs = stratified_split(labels.numpy(), list(sizes.values()), seed)
    return {name: (items[idx] if isinstance(items, torch.Tensor) else [items[i] for i in idx],
                   labels[idx]) for name, idx in zip(sizes, idxs, strict=True)}


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
            seed: int = 0, drop_last: bool = False) -> Iterator[Split]:
    """Yield ``(inputs, targets)`` mini-batches over the first dimension.

    Args:
        x: Inputs, first dimension N.
        y: Targets, first dimension N.
        batch_size: Items per batch.
        shuffle: Visit items in a random order drawn from ``seed`` (else in order).
        seed: Seed of the order; pass e.g. ``base_seed + epoch`` for a new order per epoch.
        drop_last: Skip a final batch smaller than ``batch_size``.
    """
    if len(x) != len(y):
        raise ValueError(f"inputs have {len(x)} rows but targets have {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(x)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]
