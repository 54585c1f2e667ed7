"""Weight rules: pure functions that give mixing weights over the ``n`` held snapshots.

Every averaging method in sewa is a rule followed by one weighted average
(:func:`sewa.average`). Snapshots are indexed oldest first: index ``n - 1`` is the newest.
Every rule returns a float64 vector of length ``n``, non-negative, summing to 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["last", "uniform", "lawa", "ema", "ema_decay_per_snapshot", "EMA_TAILS", "random_k", "greedy_soup",
           "from_indices", "check_weights"]

# What :func:`ema` does with the mass of the tail before the window.
EMA_TAILS = ("oldest", "renormalize")


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"need at least one snapshot, got n={n!r}")


def _check_top_k(n: int, top_k: int) -> None:
    _check_n(n)
    if not isinstance(top_k, int) or not 1 <= top_k <= n:
        raise ValueError(f"top_k must be an integer in [1, {n}] (the number of snapshots held), got {top_k!r}")


def from_indices(n: int, indices: Sequence[int] | Tensor) -> Tensor:
    """``1/K`` on each of the ``K`` distinct ``indices``, 0 elsewhere."""
    _check_n(n)
    idx = torch.as_tensor(indices, dtype=torch.long).flatten().unique()
    if idx.numel() == 0:
        raise ValueError("need at least one index")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"indices must lie in [0, {n}), got {idx.tolist()}")
    w = torch.zeros(n, dtype=torch.float64)
    w[idx] = 1.0 / idx.numel()
    return w


def last(n: int) -> Tensor:
    """One-hot on the newest snapshot: no averaging."""
    _check_n(n)
    return from_indices(n, [n - 1])


def uniform(n: int) -> Tensor:
    """``1/n`` on every snapshot: SWA over the window (Izmailov et al. 2018)."""
    _check_n(n)
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def lawa(n: int, top_k: int) -> Tensor:
    """``1/K`` on the newest ``K`` snapshots: latest weight averaging (Kaddour 2022)."""
    _check_top_k(n, top_k)
    return from_indices(n, range(n - top_k, n))


def ema(n: int, decay: float = 0.9, *, tail: str = "oldest") -> Tensor:
    """Exponential moving average over the snapshots, as torch's ``AveragedModel`` computes it.

    The recursion ``e_1 = θ_1``, ``e_t = decay · e_(t-1) + (1 - decay) · θ_t`` (torch's
    ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))`` updated once per recorded
    snapshot) gives, with age ``a_i = n - 1 - i`` (the newest snapshot has age 0)::

        w_i = decay^(n-1)                  for the oldest snapshot (i = 0)
        w_i = (1 - decay) · decay^(a_i)     for the others

    The oldest snapshot carries the mass of the whole tail before the window. With
    ``tail="renormalize"`` that mass is dropped instead and the rest rescaled to sum to 1:
    ``w_i ∝ (1 - decay) · decay^(a_i)`` for every ``i``. See docs/EMA.md for how these compare
    with other libraries, and :func:`ema_decay_per_snapshot` to convert a per-step decay.

    Args:
        n: Number of snapshots.
        decay: Decay per recorded snapshot, in ``[0, 1)``.
        tail: ``"oldest"`` (torch's recursion, the default) or ``"renormalize"``.
    """
    _check_n(n)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
    if tail not in EMA_TAILS:
        raise ValueError(f"tail must be one of {', '.join(map(repr, EMA_TAILS))}, got {tail!r}")
    age = torch.arange(n - 1, -1, -1, dtype=torch.float64)
    w = (1.0 - decay) * decay**age
    if tail == "renormalize":
        return w / w.sum()
    # The recursion starts from a copy of the oldest snapshot: it keeps decay^(n-1).
    w[0] = float(decay) ** (n - 1)
    return w


def ema_decay_per_snapshot(*, every: int, step_decay: float | None = None, half_life: float | None = None) -> float:
    """The per-snapshot decay that matches an EMA over optimizer steps, for snapshots every ``every`` steps.

    An EMA updated every optimizer step with decay ``d`` gives the ``every`` steps between two
    snapshots the total weight ``Σ_(a=j·every)^((j+1)·every-1) (1-d)·d^a = (1-D)·D^j`` with
    ``D = d^every``: :func:`ema` with ``decay=D`` gives each snapshot the weight of the steps it
    stands for. A half-life ``h`` in optimizer steps means ``d = 0.5^(1/h)``, so ``D = 0.5^(every/h)``.

    Args:
        every: Optimizer steps between two recorded snapshots (a positive integer).
        step_decay: Decay per optimizer step ``d``, in ``[0, 1)``.
        half_life: Half-life in optimizer steps ``h > 0`` (give this or ``step_decay``).

    Returns:
        The decay per snapshot ``D``, for :func:`ema`.
    """
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive integer (optimizer steps between snapshots), got {every!r}")
    if (step_decay is None) == (half_life is None):
        raise ValueError("give exactly one of step_decay (decay per optimizer step) or half_life (in optimizer steps)")
    if step_decay is not None:
        if not 0.0 <= step_decay < 1.0:
            raise ValueError(f"step_decay must lie in [0, 1), got {step_decay!r}")
        return float(step_decay) ** every
    if half_life is None or not half_life > 0 or not math.isfinite(half_life):
        raise ValueError(f"half_life must be a positive number of optimizer steps, got {half_life!r}")
    return 0.5 ** (every / float(half_life))


def random_k(n: int, top_k: int, seed: int = 0) -> Tensor:
    """``1/K`` on ``K`` snapshots drawn uniformly without replacement with ``seed``."""
    _check_top_k(n, top_k)
    g = torch.Generator().manual_seed(int(seed))
    return from_indices(n, torch.randperm(n, generator=g)[:top_k])


def greedy_soup(n: int, evaluate: Callable[[Tensor], Any]) -> Tensor:
    """Greedy soup (Wortsman et al. 2022) over the snapshots.

    Ingredients are ranked by their own score, best first; each is kept if the uniform
    average of the soup with it scores no worse than without it.

    Args:
        n: Number of snapshots.
        evaluate: Maps a weight vector to a cost on the selection split (lower is better): a
            number, or a tuple compared in order (e.g. minus the accuracy, then the loss).
    """
    _check_n(n)
    scores = [evaluate(from_indices(n, [i])) for i in range(n)]
    ranked = sorted(range(n), key=lambda i: (scores[i], -i))
    soup = [ranked[0]]
    best = scores[ranked[0]]
    for i in ranked[1:]:
        score = evaluate(from_indices(n, soup + [i]))
        if score <= best:
            soup.append(i)
            best = score
    return from_indices(n, soup)


def check_weights(weights: Tensor | Sequence[float], n: int) -> Tensor:
    """Validates a weight vector over ``n`` snapshots and returns it as float64."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != n:
        raise ValueError(f"got {w.numel()} weights for {n} snapshots")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    total = float(w.sum())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to 1, they sum to {total:.6g}")
    return w
