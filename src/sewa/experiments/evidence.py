"""The evidence a run records beyond its main table: EMA's decay and the suffix's start chosen on
the selection split, per-snapshot scores, the random-K distribution and the K-curves (issue 14
item 3). ``score`` is the runner's scorer: ``score.average(trajectory, weights)`` returns the
validation and test metric and loss of one average."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import weights as rules
from ..evaluator import Evaluator
from ..trajectory import Trajectory
from . import tasks as T

__all__ = ["SEWA_KS", "MAIN_K", "EMA_HALF_LIVES", "choose_ema_and_suffix", "distributions"]

SEWA_KS = (1, 5, 10, 20, 50)
MAIN_K = 10
# EMA half-lives swept on validation, as fractions of the window's span in optimizer updates.
EMA_HALF_LIVES = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)


def _choose(ev: Evaluator, traj: Trajectory, candidates: Mapping[Any, Tensor], by: str) -> tuple[Any, list[dict[str, Any]]]:
    """The candidate weight vector with the best selection score (the metric, ties broken by the
    loss; or the loss), and every candidate's scores."""
    rows = []
    for value, w in candidates.items():
        s = ev.per_batch(traj, w)
        rows.append({"value": value, "val_loss": s.mean("loss"), "val_metric": s.mean("metric") if s.metric is not None else None})
    best = max(rows, key=lambda r: (r["val_metric"], -r["val_loss"]) if by == "metric" else -r["val_loss"])
    return best["value"], rows


def choose_ema_and_suffix(ev: Evaluator, traj: Trajectory, every: int, by: str) -> dict[str, dict[str, Any]]:
    """EMA's decay (from half-lives of :data:`EMA_HALF_LIVES` times the window's span, through
    :func:`sewa.weights.ema_decay_per_snapshot`) and the suffix's start (uniform tails of 1, 2, 5
    and 10%..100% of the window), each chosen on the selection split ``by`` its metric or loss."""
    n = len(traj)
    t0 = time.perf_counter()
    decays = {h * n * every: rules.ema_decay_per_snapshot(half_life=h * n * every, every=every) for h in EMA_HALF_LIVES}
    half_life, ema_sweep = _choose(ev, traj, {h: rules.ema(n, d) for h, d in decays.items()}, by)
    t1 = time.perf_counter()
    sizes = sorted({1, 2, 5} | {max(1, round(n * f / 10)) for f in range(1, 11)})
    tail, suffix_sweep = _choose(ev, traj, {k: rules.lawa(n, k) for k in sizes if k <= n}, by)
    return {
        "ema": {"choice_seconds": t1 - t0, "half_life_updates": half_life, "decay": decays[half_life], "sweep": [
            {"half_life_updates": r["value"], "decay": decays[r["value"]], "val_metric": r["val_metric"],
             "val_loss": r["val_loss"]} for r in ema_sweep]},
        "suffix": {"choice_seconds": time.perf_counter() - t1, "tail": tail, "start": n - tail, "sweep": [
            {"tail": r["value"], "start": n - r["value"], "val_metric": r["val_metric"], "val_loss": r["val_loss"]}
            for r in suffix_sweep]},
    }


def _top(values: list[float], k: int, higher: bool) -> Tensor:
    """Uniform weights on the ``k`` best of ``values`` (ties: the newer snapshot)."""
    n = len(values)
    order = sorted(range(n), key=lambda i: (values[i] if higher else -values[i], i), reverse=True)
    return rules.from_indices(n, order[:k])


def distributions(traj: Trajectory, score: Any, seed: int, sewa: Mapping[str, Any] | None,
                  spec: T.Spec) -> dict[str, Any]:
    """Per-snapshot scores, the random-K distribution and the K-curves, with their timings."""
    n = len(traj)
    measure = "test_loss" if spec.family == "bc" else "test_metric"
    higher = measure == "test_metric"
    t0 = time.perf_counter()
    snaps = [score.average(traj, rules.from_indices(n, [i])) for i in range(n)]
    per_snapshot = {key: [s[key] for s in snaps] for key in ("val_metric", "test_metric", "val_loss", "test_loss")}
    t1 = time.perf_counter()

    def draws(k: int, count: int) -> list[dict[str, Any]]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        return [score.average(traj, rules.from_indices(n, torch.randperm(n, generator=g)[:k])) for _ in range(count)]

    k_main = min(MAIN_K, n)
    main = draws(k_main, spec.draws)
    random_k = {"k": k_main, "draws": len(main), "seed": seed * 1_000_003 + k_main} | {
        key: [d[key] for d in main] for key in ("test_metric", "val_metric", "test_loss", "val_loss")}
    t2 = time.perf_counter()
    ks = [k for k in SEWA_KS if k <= n]
    curves: dict[str, Any] = {"Ks": ks, "measure": measure, "lawa": [], "random_k_mean": [], "random_k_draws": [],
                              "sewa": [], "oracle": []}
    probs = None if sewa is None or sewa.get("probabilities") is None else list(sewa["probabilities"])
    own = [float(v) for v in per_snapshot[measure] if v is not None]
    for k in ks:
        curves["lawa"].append(score.average(traj, rules.lawa(n, k))[measure])
        rand = [d[measure] for d in (main if k == k_main else draws(k, spec.curve_draws))]
        curves["random_k_mean"].append(sum(rand) / len(rand))
        curves["random_k_draws"].append(len(rand))
        curves["sewa"].append(None if probs is None else score.average(traj, _top(probs, k, True))[measure])
        curves["oracle"].append(score.average(traj, _top(own, k, higher))[measure])
    seconds = {"per_snapshot_seconds": t1 - t0, "random_k_seconds": t2 - t1, "k_curve_seconds": time.perf_counter() - t2}
    return {"per_snapshot": per_snapshot, "random_k": random_k, "k_curves": curves, "seconds": seconds}
