"""SeWA: learn which snapshots to average (Wang et al. 2025, arXiv 2502.10119).

Each held snapshot ``θ_i`` gets a selection probability ``s_i = sigmoid(φ_i)``. A relaxed
binary mask is drawn with the binary Gumbel-softmax

    m_i = exp((log s_i + g_i1)/τ) / (exp((log s_i + g_i1)/τ) + exp((log(1-s_i) + g_i0)/τ))
        = sigmoid((φ_i + g_i1 - g_i0) / τ),        g ~ Gumbel(0, 1),

and the masked average is ``w(m) = Σ_i m_i θ_i / Σ_i m_i``. ``φ`` descends the Monte-Carlo
estimate ``(1/M) Σ_j L(w(m_j))`` over ``M`` mask samples per step while ``τ`` anneals from
``tau_start`` to ``tau_end``. By default ``s`` is projected after every step onto the budget
``{0 < s_i < 1, Σ_i s_i = K}``; at the end the top-``K`` snapshots by ``s`` are averaged.

The step is fast by construction: with ``a_j = m_j / Σ m_j`` stacked into ``A`` (M, k) and the
snapshot matrix ``Θ`` (k, P), the mixed parameters are one product ``W = A Θ``. The model's
forward and backward give ``G = ∂L/∂W`` (M, P), and ``∂L/∂A = G Θᵀ`` is one more product: no
autograd graph ever spans the snapshots. See :mod:`sewa._engine`.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ._batch import cycle_batches
from ._engine import MixedLoss
from ._threads import compute_threads
from .trajectory import Trajectory, TrajectoryError
from .weights import from_indices

__all__ = ["Selection", "SelectionError", "Engine", "select", "select_settings", "run_selection", "trainable_average", "project_budget",
           "tau_schedule"]

_log = logging.getLogger(__name__)


class SelectionError(ValueError):
    """The selection cannot go on: its loss or the loss's gradient is not finite."""


class Engine(Protocol):
    """What :func:`run_selection` needs from an engine (:class:`~sewa._engine.MixedLoss`, or a
    distributed one whose values are reduced over ranks)."""

    def __call__(self, mix: Tensor, batch: Any, /) -> tuple[float, Tensor]:
        """``(loss, ∂loss/∂mix)`` of the mixing weights ``mix`` (M, k), oldest snapshot first,
        on one ``batch``: the mean loss over the M mixed models, and a tensor like ``mix``."""
        ...


@dataclass
class Selection:
    """What :func:`select` learned.

    Attributes:
        indices: Positions (oldest first, 0-based) of the chosen top-K snapshots, ascending.
        probabilities: The learned selection probabilities ``s`` (length k).
        weights: ``1/K`` on the chosen snapshots: pass to :func:`sewa.average`.
        steps: Training steps of the chosen snapshots.
        history: Per selection step: ``loss``, ``tau`` and ``entropy`` (of ``s``, in nats).
        seconds: Wall-clock time of the selection.
        config: The settings used.
    """

    indices: list[int]
    probabilities: Tensor
    weights: Tensor
    steps: list[int]
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "indices": self.indices,
            "probabilities": self.probabilities.tolist(),
            "weights": self.weights.tolist(),
            "steps": self.steps,
            "history": self.history,
            "seconds": self.seconds,
            "config": self.config,
        }


def tau_schedule(step: int, steps: int, tau_start: float, tau_end: float) -> float:
    """Exponential annealing ``τ_t = τ_start · (τ_end/τ_start)^(t/(T-1))``."""
    if steps <= 1 or tau_start == tau_end:
        return float(tau_end)
    return float(tau_start * (tau_end / tau_start) ** (step / (steps - 1)))


@torch.no_grad()
def project_budget(logits: Tensor, budget: float, iters: int = 60) -> Tensor:
    """Shifts ``logits`` in place so that ``Σ sigmoid(logits) = budget``.

    The sum is increasing in the shift ``c``, so ``c`` is found by bisection; one shift keeps
    the order of ``s`` and every ``0 < s_i < 1``.
    """
    return logits.add_(budget_shift(logits, budget, iters))


@torch.no_grad()
def budget_shift(logits: Tensor, budget: float, iters: int = 60) -> float:
    """The shift ``c`` with ``Σ sigmoid(logits + c) = budget`` (bisection; see :func:`project_budget`)."""
    k = logits.numel()
    if not 0 < budget < k:
        raise ValueError(f"budget must lie in (0, {k}), got {budget}")
    # The logits live on the CPU (k numbers): plain floats beat tensor ops here.
    x = logits.detach().double()
    lo, hi = -float(x.max()) - 40.0, -float(x.min()) + 40.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float(torch.sigmoid(x + mid).sum()) < budget:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def knot_basis(n: int, knots: int) -> Tensor | None:
    """``n × B`` hat functions of linear interpolation between ``B = knots`` evenly spaced knots
    over ``n`` positions (each row sums to 1); None (one free logit per position) for ``knots``
    0 or ``>= n``."""
    if knots == 0 or knots >= n:
        return None
    x = torch.arange(n, dtype=torch.float64) * (knots - 1) / max(n - 1, 1)
    return (1 - (x[:, None] - torch.arange(knots, dtype=torch.float64)).abs()).clamp(min=0)


def _entropy(s: Tensor) -> float:
    s = s.clamp(1e-12, 1 - 1e-12)
    return float(-(s * s.log() + (1 - s) * (1 - s).log()).sum())


def check_settings(n: int, top_k: int, steps: int, samples: int) -> None:
    """Raises if the settings do not fit ``n`` held snapshots."""
    if n == 0:
        raise TrajectoryError("the trajectory holds no snapshots: record some before selecting")
    if not isinstance(top_k, int) or not 1 <= top_k <= n:
        raise ValueError(f"top_k must be an integer in [1, {n}] (the number of snapshots held), got {top_k!r}")
    if steps < 1 or samples < 1:
        raise ValueError(f"steps and samples must be >= 1, got steps={steps}, samples={samples}")


def refuse_nonfinite_snapshots(trajectory: Trajectory) -> None:
    """Raises naming the step of the first held snapshot holding NaN or Inf."""
    rows, order = trajectory.matrix()
    refuse_nonfinite_rows(torch.isfinite(rows).all(dim=1), order, trajectory.steps)


def refuse_nonfinite_rows(finite: Tensor, order: Tensor, steps: list[int]) -> None:
    """Raises naming the step of the first row whose ``finite`` flag is false."""
    if not bool(finite.bool().all()):
        bad_row = int((~finite.bool()).nonzero()[0])
        step = steps[order.tolist().index(bad_row)]
        raise TrajectoryError(f"the snapshot at step {step} holds NaN or Inf: drop it before selecting")


def select(
    trajectory: Trajectory,
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batches: Iterable[Any],
    *,
    top_k: int = 10,
    samples: int = 4,
    steps: int = 200,
    tau_start: float = 1.0,
    tau_end: float = 0.1,
    lr: float = 0.05,
    optimizer: str = "adam",
    budget: bool = True,
    seed: int = 0,
    noise: str = "independent",
    patience: int = 0,
    knots: int = 0,
    batch_stats: bool = True,
    vectorize: bool | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> Selection:
    """Learns selection probabilities over the held snapshots and picks the top ``K``.

    Args:
        trajectory: The recorded snapshots (the window, paper's ``k``).
        model: A model of the trajectory's architecture; only its structure is used (it is
            copied, never modified).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar tensor.
        batches: ``(inputs, targets)`` pairs of the selection split, cycled one per step. A
            validation split is the usual choice; a training split also works. A one-shot
            iterator (a generator) is read once, from where it stands, and its batches kept (at
            most ``sewa._batch.MAX_BATCHES``): pass a fresh one, or a list.
        top_k: How many snapshots to average at the end (paper's ``K``).
        samples: Monte-Carlo mask samples per step (paper's ``M``).
        steps: Gradient steps on ``φ = logit(s)``.
        tau_start: Gumbel-softmax temperature at the first step.
        tau_end: Temperature at the last step (annealed exponentially; equal values fix τ).
        lr: Learning rate for ``φ``.
        optimizer: ``"adam"`` or ``"sgd"``.
        budget: Project ``s`` onto ``Σ s_i = K`` after every step (recommended). Without it,
            ``s`` saturates and the top-K is close to arbitrary.
        seed: Seeds the mask noise: the same seed gives the same selection.
        noise: ``"independent"`` (the paper): ``M`` independent Gumbel pairs per step.
            ``"antithetic"``: the masks come in pairs whose logistic noises are opposite
            (``g`` and ``-g``), a lower-variance gradient for the same ``M`` (``M`` even).
        patience: Early stopping: end once the top-``K`` set has stayed the same for this many
            consecutive steps (``0``: run every step, as the paper). τ follows the schedule
            planned for ``steps``, so a stopped run ends at a higher τ;
            ``Selection.config["steps_run"]`` records where it stopped.
        knots: Masks structured over time: ``φ`` is piecewise linear in the snapshot's position,
            learned at this many evenly spaced knots instead of one free logit per snapshot
            (``0``: ``k`` free logits, the paper). Neighbouring snapshots are nearly identical,
            so a few knots share their evidence; each mask still draws its own noise.
        batch_stats: Evaluate BatchNorm layers with batch statistics (their running statistics
            do not match mixed weights). With ``False`` the newest snapshot's are used.
        vectorize: Run the ``M`` forward passes with ``torch.func.vmap`` (``True``) or a loop
            (``False``). ``None``: a loop on CPU (measured faster there); elsewhere vmap when the
            model supports it.
        device: Where to compute; defaults to the trajectory's device.
        progress: A progress bar: ``None`` shows one only on a terminal, ``True`` always,
            ``False`` never.

    Returns:
        The :class:`Selection`.

    Raises:
        SelectionError: if the loss or its gradient is not finite at some step (no result).
    """
    check_settings(len(trajectory), top_k, steps, samples)
    refuse_nonfinite_snapshots(trajectory)
    with trajectory.reading(), compute_threads():
        engine = MixedLoss(trajectory, model, loss_fn, batch_stats=batch_stats, vectorize=vectorize, device=device)
        selection = run_selection(engine, cycle_batches(batches), trajectory.steps, top_k=top_k, samples=samples,
                                  steps=steps, tau_start=tau_start, tau_end=tau_end, lr=lr, optimizer=optimizer,
                                  budget=budget, seed=seed, noise=noise, patience=patience, knots=knots, progress=progress,
                                  config={"batch_stats": batch_stats})
        trajectory.check_unchanged()  # a read-only disk reader whose writer overwrote the rows read raises
    return selection


_ENGINE_OPTIONS = ("batch_stats", "vectorize", "device")


def select_settings(**options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`select`'s keyword arguments, its defaults (declared once, in its signature)
    updated by ``options``, as ``(engine options, loop settings)``: ``batch_stats``,
    ``vectorize`` and ``device`` for the engine; the rest for :func:`run_selection`.

    Raises:
        TypeError: for a name that :func:`select` does not take.
    """
    defaults = {name: p.default for name, p in inspect.signature(select).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"select() got unexpected keyword arguments {unknown}; it takes {sorted(defaults)}")
    settings = defaults | options
    engine = {name: settings.pop(name) for name in _ENGINE_OPTIONS}
    return engine, settings


def run_selection(
    engine: Engine,
    feed: Iterator[Any],
    held_steps: Sequence[int],
    *,
    top_k: int,
    samples: int,
    steps: int,
    tau_start: float,
    tau_end: float,
    lr: float,
    optimizer: str,
    budget: bool,
    seed: int,
    noise: str,
    patience: int,
    knots: int,
    progress: bool | None,
    config: dict[str, Any] | None = None,
) -> Selection:
    """The SeWA loop of :func:`select` over any :class:`Engine` and batch ``feed``.

    Args:
        engine: ``(mix, batch) -> (loss, ∂loss/∂mix)``.
        feed: One batch per step (e.g. :func:`sewa._batch.cycle_batches`).
        held_steps: Training steps of the held snapshots, oldest first (``k`` of them).
        config: Extra settings recorded in :attr:`Selection.config`.

    The other arguments are :func:`select`'s, without defaults: :func:`select_settings` fills
    them in from :func:`select`'s signature, where they are declared once.
    """
    n = len(held_steps)
    check_settings(n, top_k, steps, samples)
    if noise not in ("independent", "antithetic"):
        raise ValueError(f"noise must be 'independent' or 'antithetic', got {noise!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ValueError(f"patience must be a non-negative integer (0: no early stopping), got {patience!r}")
    if isinstance(knots, bool) or not isinstance(knots, int) or knots < 0 or knots == 1:
        raise ValueError(f"knots must be 0 (one logit per snapshot) or an integer >= 2, got {knots!r}")
    if noise == "antithetic" and samples % 2:
        raise ValueError(f"noise='antithetic' pairs the masks: samples must be even, got {samples}")
    if budget and top_k == n:
        budget = False  # Σ s = k has no interior point; every snapshot is chosen anyway
    config = dict(top_k=top_k, samples=samples, steps=steps, tau_start=tau_start, tau_end=tau_end,
                  lr=lr, optimizer=optimizer, budget=budget, seed=seed, noise=noise, patience=patience,
                  knots=knots) | (config or {})
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    basis = knot_basis(n, knots)
    phi = torch.full((n if basis is None else basis.shape[1],), math.log(top_k / n) - math.log1p(-top_k / n) if top_k < n else 0.0,
                     dtype=torch.float64, requires_grad=True)
    opt = _optimizer(optimizer, phi, lr)

    def logits_of() -> Tensor:  # φ itself, or interpolated between the knots
        return phi if basis is None else basis @ phi

    history: dict[str, list[float]] = {"loss": [], "tau": [], "entropy": []}
    order = torch.arange(n, dtype=torch.float64) * 1e-12  # ties: newer snapshots first
    top: list[int] = []
    same = 0
    for t in _progress(range(steps), progress, "selecting"):
        tau = tau_schedule(t, steps, tau_start, tau_end)
        # g_1 - g_0 of two Gumbel(0,1) draws is Logistic(0,1): log u - log(1-u).
        half = samples // 2 if noise == "antithetic" else samples
        u = torch.rand(half, n, generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
        g = u.log() - (-u).log1p()
        if noise == "antithetic":
            g = torch.cat([g, -g])
        log_m = nn.functional.logsigmoid((logits_of() + g) / tau)
        mix = torch.softmax(log_m, dim=1)  # a_j = m_j / Σ_i m_ij, computed in log space
        loss, grad_mix = engine(mix.detach(), next(feed))
        _refuse_nonfinite(loss, grad_mix, t, steps, "selection")
        opt.zero_grad()
        mix.backward(grad_mix.to(mix.dtype))
        opt.step()
        with torch.no_grad():
            if budget:  # every row of the basis sums to 1: a shift of the knots shifts every logit
                phi.add_(budget_shift(logits_of(), float(top_k)))
            s = torch.sigmoid(logits_of())
        history["loss"].append(loss)
        history["tau"].append(tau)
        history["entropy"].append(_entropy(s))
        if patience:
            now = sorted(torch.topk(s.double() + order, top_k).indices.tolist())
            same = same + 1 if now == top else 0
            top = now
            if same >= patience:
                break
    config["steps_run"] = len(history["loss"])
    with torch.no_grad():
        probs = torch.sigmoid(logits_of()).float()
    # Ties (e.g. steps too few to move s) break towards newer snapshots.
    key = probs.double() + order
    indices = sorted(torch.topk(key, top_k).indices.tolist())
    seconds = time.perf_counter() - start
    chosen = [held_steps[i] for i in indices]
    _log.info("selected steps %s of %d snapshots in %.1fs (final loss %.4g)", chosen, n, seconds, history["loss"][-1])
    return Selection(indices=indices, probabilities=probs, weights=from_indices(n, indices), steps=chosen,
                     history=history, seconds=seconds, config=config)


def _refuse_nonfinite(loss: float, grad: Tensor, t: int, steps: int, what: str) -> None:
    """Stops a learning loop at the first step whose loss or gradient is NaN or Inf: a result
    learned from them would look normal and mean nothing."""
    if not math.isfinite(loss):
        raise SelectionError(f"{what} step {t + 1} of {steps}: the loss on the selection split is {loss} (not finite); "
                             "check loss_fn and the selection batches (no result was produced)")
    if not bool(torch.isfinite(grad).all()):
        raise SelectionError(f"{what} step {t + 1} of {steps}: the loss is finite ({loss:.6g}) but its gradient w.r.t. "
                             "the mixing weights holds NaN or Inf; check loss_fn and the model (no result was produced)")


def trainable_average(
    trajectory: Trajectory,
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batches: Iterable[Any],
    *,
    steps: int = 200,
    lr: float = 0.05,
    batch_stats: bool = True,
    vectorize: bool | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> Tensor:
    """Dense averaging weights ``softmax(α)`` learned on ``batches`` (in the spirit of TWA).

    A baseline for SeWA: the same engine and selection split, but every snapshot keeps a
    learned weight instead of a hard top-K choice. Returns the weights, oldest first.

    Args:
        trajectory: The recorded snapshots.
        model: A model of the trajectory's architecture (only its structure is used).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar tensor.
        batches: ``(inputs, targets)`` pairs of the selection split, cycled one per step.
        steps: Adam steps on the logits ``α`` of the learned weights.
        lr: Learning rate for ``α``.
        batch_stats: As in :func:`select`.
        vectorize: As in :func:`select`.
        device: As in :func:`select`.
        progress: As in :func:`select`.

    Raises:
        SelectionError: if the loss or its gradient is not finite at some step (no result).
    """
    check_settings(len(trajectory), 1, steps, 1)
    refuse_nonfinite_snapshots(trajectory)
    n = len(trajectory)
    alpha = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    with trajectory.reading(), compute_threads():
        engine = MixedLoss(trajectory, model, loss_fn, batch_stats=batch_stats, vectorize=vectorize, device=device)
        feed = cycle_batches(batches)
        for t in _progress(range(steps), progress, "trainable average"):
            mix = torch.softmax(alpha, dim=0)[None]
            loss, grad_mix = engine(mix.detach(), next(feed))
            _refuse_nonfinite(loss, grad_mix, t, steps, "trainable average")
            opt.zero_grad()
            mix.backward(grad_mix.to(mix.dtype))
            opt.step()
        trajectory.check_unchanged()
    return torch.softmax(alpha.detach(), dim=0)


def _optimizer(name: str, param: Tensor, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam([param], lr=lr)
    if name == "sgd":
        return torch.optim.SGD([param], lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: use 'adam' or 'sgd'")


def _progress(it: Iterable[int], enabled: bool | None, desc: str) -> Iterable[int]:
    """A tqdm bar over ``it``: ``None`` lets tqdm show it only on a terminal (``disable=None``)."""
    if enabled is False:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False, disable=None if enabled is None else False)
