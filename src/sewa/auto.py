"""``auto``: choose the average of a run's snapshots for the user, and say why (issue 15).

No fixed rule wins everywhere: uniform (SWA) loses when some snapshots are bad, SeWA and greedy
soup can over-fit a small selection split, the newest tail loses when the window sits past the
optimum. ``auto`` scores a bounded family of candidate weight vectors on the selection split and
keeps one that is not worse than the best beyond noise (uniform first, then a fitted selection):

1. **Candidates** (oldest snapshot first): uniform tails of length ``k, k/2, k/4, ..., 1``
   (LAWA-K / suffix averaging: this chooses the window, from uniform to the last iterate); EMA
   for half-lives ``k/16 .. k/2`` snapshots (torch's recursion, :func:`sewa.weights.ema`);
   SeWA top-K for ``K = k/8, k/4`` (up to ``top_k_max``) from the ranking of one SeWA budget
   ``K = k/8`` (``sewa_fraction``: a ranking is sharp only up to its budget); greedy soup
   (by the metric when the task has one), when it fits the pass budget; a learned convex soup on
   the best SeWA set's support; the best selection shrunk towards uniform,
   ``w = a·w_sel + (1 - a)·1/k``.
2. **Scores.** Each candidate costs one weighted average and one forward pass over the split
   (:meth:`sewa.evaluator.Evaluator.per_batch`). The batches fall into ``F`` folds (a seeded
   permutation, position mod ``F``); a candidate's score is the mean of its ``F`` fold scores
   of the objective: the task's metric when it has one (the loss breaks ties), else minus the
   loss.
3. **Cross-fitting.** Candidates that learn from the split (SeWA, greedy soup, learned soup,
   shrinkage) are fitted twice, on each half of the batches (the halves as equal in examples as
   whole batches allow), and every batch is scored by the fit that did not see it. Fixed rules
   learn nothing. Cross-fitting serves the choice only: with ``refit`` (the default) the chosen
   family is fitted once more on the whole split, with both halves' steps, and that fit is
   returned (on BBC News's unstable shard the half fits, on 256 or 59 examples, scored below the
   table's SeWA fitted on all of them: docs/AUTO.md). Without it, the two halves' fits are
   averaged (SeWA's probability vectors; the mean of the two soups).
4. **One-standard-error rule** (Breiman et al. 1984). With ``d`` the best candidate's score
   minus candidate ``c``'s, ``c`` is within noise when ``mean(d) <= se_multiple * SE``. By default
   (``se_rule="paired"``) ``d`` is taken on slices of each batch (up to 64 per batch: single
   examples for batches of at most 64) and SE is the standard error of its size-weighted mean
   over the slices. Every candidate is scored on the same examples, so the difficulty noise they
   share cancels, so the choice goes back to a damaged uniform average less often (it still did
   on 3 of 10 AG News unstable-shard seeds, whose 1000-example split barely sees the damage). The best of some twenty candidates scores high partly by luck (the winner's
   curse), so the paired rule allows ``se_multiple=1.5`` SEs: a trade between a plateau, where
   a narrower set is chosen by luck more often at 1 SE, and a damaged window, where the damaged
   uniform average falls within 2 SEs on a split of a few hundred examples (measured in
   docs/AUTO.md). ``se_rule="best", se_multiple=1`` is
   the classic rule, the SE of the best candidate's ``F`` fold scores, ``std/sqrt(F)``: with a split of
   2-4 batches it rests on 2-4 numbers (on the AG News unstable shard it fell back on 10 of 10
   seeds, twice to the damaged uniform).
   Slicing needs outputs and targets that are tensors sharing their first dimension; otherwise
   the batches are the units. Among the candidates within noise, ``prefer="fitted"`` (the
   default) takes uniform over the window if it is *kept*; else the best-scoring fitted candidate
   within noise (its score is out of fold, so over-fitting needs no simplicity penalty, and it
   comes from a half fit, so it understates the refit, so a fitted candidate counts as within
   noise up to ``fitted_multiple=2.5`` SEs: ``info["candidates"][i]["eligible"]``); else the
   simplest fixed rule. Uniform is
   kept when it is within noise, unless the objective is a metric and a fitted candidate within
   noise has a lower loss beyond noise (``se_multiple`` paired SEs): the loss breaks the metric's
   tie (``loss_tie_break``). On AG News unstable-shard development seeds the damaged uniform
   average was within noise on the accuracy of the thousand-example split on 3 of 10 seeds,
   while the fitted sets' losses beat it by 9-12 SEs (docs/AUTO.md).
   ``prefer="simple"`` takes the simplest: uniform over the window, then narrower tails, EMA,
   SeWA sets, greedy soup, the learned soup, and last the shrunk selection.
5. **Cost.** The two SeWA fits run ``sewa_steps`` steps of ``sewa_samples`` masks each, and the
   refit twice that; with the learned soups, the defaults plan three quarters of one default
   :func:`sewa.select`'s model passes for the fits. Candidates are
   added while the planned batch passes, and the planned weight mixes (a weighted sum over the
   window, which dominates on a split of a batch or two), fit ``pass_budget`` default
   selections; a split too large for that is scored on a seeded subset of its batches
   (recorded as ``scored_batches``).
6. **Judge.** When the evaluator has a judge (:class:`sewa.evaluator.Evaluator`: a score of the
   whole averaged model, one per unit, such as the normalised return of each of a fixed set of
   validation rollouts), the split's choice is checked on it: the judge scores up to
   ``judge_finalists`` finalists (the split's choice, uniform, the last iterate, then the
   best-scoring candidates within noise on the split, then the others), and auto moves to the
   judge's best finalist (with ``judge_multiple > 0``, only when it beats the split's choice by
   that many paired SEs over the judge's units). The weights judged are the weights returned
   (no refit). For behaviour
   cloning the split's MSE tracks the return poorly: on hopper (constant LR, seed 0) the last
   iterate had 1.5x uniform's validation MSE and the higher test return. The judge's calls are
   not model passes over the split: they are timed and recorded in ``info["judge"]``. Their
   cost is the judge's (``judge_finalists`` calls), outside ``pass_budget``: size the judge so
   that the whole stays within the cost bound (the BC experiments: 4 finalists x 8 rollouts,
   docs/AUTO.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from . import weights as rules
from ._auto_scores import (
    Candidate,
    Scorer,
    balanced_halves,
    crossfitted,
    fold_ids,
    greedy_cost,
    mean_se,
    paired_gap,
    scored_of,
    statistics,
)
from ._batch import split_batch
from .evaluator import Evaluator
from .methods import Method, MethodError, _frozen, _positive_int, register
from .select import SelectionError, select, select_settings, trainable_average
from .task import batch_size
from .trajectory import Trajectory

__all__ = ["auto", "fold_ids"]

# Model passes of one batch: a forward and backward costs about three forwards.
_BACKWARD_COST = 2
def _fixed(n: int) -> list[tuple[str, str, tuple[int, float], Tensor, dict[str, Any]]]:
    """Uniform tails (widest first) and EMAs (longest half-life first): rules that learn nothing."""
    out = []
    lengths = sorted({max(1, round(n / 2**j)) for j in range(int(math.log2(n)) + 2)}, reverse=True)
    for length in lengths:
        name = "uniform" if length == n else "last" if length == 1 else f"tail({length})"
        out.append((name, "tail", (0 if length == n else 1, n - length), rules.lawa(n, length),
                    {"first": n - length, "length": length}))
    for frac in (2, 4, 8, 16):
        half_life = n / frac
        decay = 0.5 ** (1.0 / half_life)
        out.append((f"ema({decay:.4g})", "ema", (2, frac), rules.ema(n, decay), {"decay": decay, "half_life": half_life}))
    return out


def _top(probabilities: Tensor, k: int) -> Tensor:
    n = probabilities.numel()
    key = probabilities.double() + torch.arange(n, dtype=torch.float64) * 1e-12  # ties: newer first, as select
    return rules.from_indices(n, torch.topk(key, k).indices)


def _plan(n: int, batches: int, s: Mapping[str, Any]) -> dict[str, Any]:
    """Batch passes and weight mixes of the parts of ``auto``, against one default SeWA selection's.

    Two costs are budgeted: batch passes (a forward and backward counts ``1 + _BACKWARD_COST``
    forwards) and mixes (one ``k``-snapshot weighted sum of the parameters, or its transpose for
    a gradient), which dominate when the split is a batch or two and the model is large.
    """
    defaults = select_settings()[1]
    unit = 1 + _BACKWARD_COST
    sewa_default = defaults["steps"] * defaults["samples"] * unit
    # The two half fits, and (with ``refit``) the chosen fitted family once more on the whole
    # split with both halves' steps: planned in full, though it runs only when a fitted family wins.
    half = s["sewa_steps"] * s["sewa_samples"] + s["soup_steps"]
    fits = 2 * half + ((_refit_steps(s) * s["sewa_samples"] + 2 * s["soup_steps"]) if s["refit"] else 0)
    sewa_own = fits * unit
    mixes_default = 2 * defaults["steps"] * defaults["samples"]  # a mix and a gradient mix per sample
    mixes_own = 2 * fits
    # Cross-fitted candidates score each half once: one pass over the split each, and two mixes.
    core = len(_fixed(n)) + len(_top_ks(n, s["top_k_max"])) + (1 if s["shrink"] > 0 else 0) + (1 if s["soup_steps"] > 0 else 0)
    budget = s["pass_budget"] * sewa_default - sewa_own
    mix_budget = s["pass_budget"] * mixes_default - mixes_own - 2 * core
    scored = batches if core * batches <= budget else min(batches, max(2, int(budget // max(core, 1))))

    def greedy_cost(stride: int) -> int:
        pool = len(_pool(n, stride))
        cost = pool + (pool - 1) + 1  # singles and additions on each half, then each half's soup on the other
        return 2 * cost if s["refit"] else cost  # and once more on the whole split

    # The whole window if greedy soup fits; with ``greedy_thin``, else every 2nd, 4th, ... snapshot.
    # Strides stop while the pool still holds two snapshots (a pool of one is the last iterate).
    strides = [1] + ([2 ** j for j in range(1, max(1, n - 1).bit_length())] if s["greedy_thin"] else [])
    fits = [m for m in strides if (core + greedy_cost(m)) * scored <= budget and 2 * greedy_cost(m) <= mix_budget]
    with_greedy = bool(s["greedy"] and fits)
    stride = fits[0] if with_greedy else 1
    greedy = greedy_cost(stride)
    return {"sewa_default_passes": sewa_default, "scored_batches": scored, "greedy": with_greedy, "greedy_stride": stride,
            "planned_passes": sewa_own + (core + (greedy if with_greedy else 0)) * scored,
            "planned_mixes": mixes_own + 2 * core + (2 * greedy if with_greedy else 0), "sewa_default_mixes": mixes_default}


def _refit_steps(s: Mapping[str, Any]) -> int:
    """Steps of the SeWA refit on the whole split: ``refit_steps``, or both halves' (0)."""
    return int(s["refit_steps"]) or 2 * int(s["sewa_steps"])


def _pool(n: int, stride: int) -> list[int]:
    """Every ``stride``-th snapshot, oldest first, the newest always in (stride 1: all of them)."""
    return list(range(n - 1, -1, -stride))[::-1]


def _greedy(n: int, stride: int, cost: Callable[[Tensor], Any]) -> Tensor:
    """Greedy soup (:func:`sewa.weights.greedy_soup`) over the snapshots of ``_pool(n, stride)``."""
    pool = _pool(n, stride)

    def full(w: Tensor) -> Tensor:
        out = torch.zeros(n, dtype=w.dtype)
        out[pool] = w
        return out

    return full(rules.greedy_soup(len(pool), lambda w: cost(full(w))))


def _top_ks(n: int, largest: float) -> list[int]:
    """The sizes K of the SeWA sets: ``k/8, k/4, k/2, 3k/4`` up to ``largest * k``."""
    return sorted({k for k in (round(n * f) for f in (0.75, 0.5, 0.25, 0.125) if f <= largest) if 1 <= k < n}, reverse=True)


def _rule(trajectory: Trajectory, ev: Evaluator | None, s: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    assert ev is not None
    n = len(trajectory)
    objective = "metric" if ev.metric is not None else "loss"
    all_batches = list(ev.batches)
    plan = _plan(n, len(all_batches), s)
    if plan["scored_batches"] < len(all_batches):  # a seeded subset keeps the cost bound on a large split
        g = torch.Generator().manual_seed(int(s["seed"]))
        keep = sorted(torch.randperm(len(all_batches), generator=g)[:plan["scored_batches"]].tolist())
        all_batches = [all_batches[i] for i in keep]
        ev = _subset(ev, all_batches)
    scorer = Scorer(ev, trajectory)
    num = ev.num_batches(trajectory)
    ids = fold_ids(num, s["folds"], s["seed"])
    folds = int(ids.max()) + 1
    sizes = torch.tensor([float(batch_size(split_batch(b)[1])) for b in all_batches], dtype=torch.float64)
    half = balanced_halves(sizes, s["seed"])
    crossfit = folds >= 2
    parts = [[b for b, h in zip(all_batches, half.tolist(), strict=True) if h == side] for side in (0, 1)] if crossfit else [all_batches]
    halves = (Scorer(_subset(ev, parts[0]), trajectory), Scorer(_subset(ev, parts[-1]), trajectory)) if crossfit else (scorer, scorer)
    where = ((half == 0).nonzero().flatten(), (half == 1).nonzero().flatten())
    backward = 0
    candidates: list[Candidate] = []
    skipped: list[str] = []

    def add(name: str, family: str, complexity: tuple[int, float], w: Tensor, params: dict[str, Any],
            fits: tuple[Tensor, Tensor] | None = None) -> None:
        if any(torch.equal(c.weights, w) and (c.family == family or fits is None) for c in candidates):
            return  # the same weights by a simpler name
        if fits is None or not crossfit:
            scored = scored_of(scorer(w))
        else:
            scored = crossfitted(halves, where, fits, num)
        if scored is None:
            skipped.append(f"{name}: a loss or metric is not finite")
            return
        candidates.append(Candidate(name, family, complexity, w, params, scored[0], scored[1], scored[2], fits if crossfit else None))

    for name, family, complexity, w, params in _fixed(n):
        add(name, family, complexity, w, params)

    # SeWA: one budget K, fitted on each half; each K's top-K set comes from the same ranking.
    budget_k = min(n - 1, max(1, round(n * s["sewa_fraction"]))) if n > 1 else 1
    sizes_k = _top_ks(n, s["top_k_max"])
    probs: list[Tensor] = []
    steps = s["sewa_steps"] if crossfit else 2 * s["sewa_steps"]

    def sewa_fit(batches: list[Any], steps: int, seed: int, k: int) -> Tensor:
        nonlocal backward
        backward += steps * s["sewa_samples"]
        with _quiet("sewa.select"):  # auto's inner runs are not the user's selection: no "selected steps" lines
            return select(trajectory, ev.model, ev.loss_fn, batches, top_k=k, samples=s["sewa_samples"],
                          steps=steps, seed=seed, **ev.engine_options()).probabilities.double()

    try:
        for side, part in enumerate(parts if sizes_k else []):
            probs.append(sewa_fit(part, steps, s["seed"] + side, budget_k))
    except SelectionError as e:  # e.g. a snapshot whose loss overflows: the rules that avoid it remain
        skipped.append(f"sewa: {e}")
        probs = []
    for k in sizes_k if probs else []:
        w = _top(torch.stack(probs).mean(0), k)  # the ranking of both halves
        add(f"sewa_top({k})", "sewa", (4, n - k), w, {"top_k": k, "indices": w.nonzero().flatten().tolist()},
            (_top(probs[0], k), _top(probs[-1], k)))

    def refit(c: Candidate) -> Tensor:
        """Candidate ``c``'s family fitted on the whole (scored) split."""
        nonlocal backward
        named = {d.name: d for d in candidates}
        if c.family == "sewa":
            k = int(c.params["top_k"])
            return _top(sewa_fit(all_batches, _refit_steps(s), s["seed"] + 2, k if s["refit_at_k"] else budget_k), k)
        if c.family == "greedy_soup":
            return _greedy(n, int(c.params["stride"]), greedy_cost(scorer, objective))
        if c.family == "learned_soup":
            backward += 2 * s["soup_steps"]
            return _learned(trajectory, ev, all_batches, refit(named[c.params["on"]]), 2 * s["soup_steps"])
        assert c.family == "shrunk"
        a, u = float(c.params["a"]), rules.uniform(n)
        return a * refit(named[c.params["of"]]) + (1 - a) * u

    if plan["greedy"]:
        # Greedy soup on each half; the weights returned are the mean of the two soups.
        stride = plan["greedy_stride"]
        soups = (_greedy(n, stride, greedy_cost(halves[0], objective)), _greedy(n, stride, greedy_cost(halves[1], objective)))
        w = (soups[0] + soups[1]) / 2
        add("greedy_soup" if stride == 1 else f"greedy_soup(every {stride})", "greedy_soup", (5, 0), w,
            {"by": objective, "stride": stride, "indices": w.nonzero().flatten().tolist()}, soups)
    elif s["greedy"]:
        skipped.append("greedy_soup: over the pass budget")

    stats = statistics(candidates, sizes, ids, folds, objective)
    sets = [c for c in candidates if c.family == "sewa" and c.fits is not None]
    if s["soup_steps"] > 0 and sets and hasattr(trajectory, "subset"):
        # A learned convex soup on the best SeWA set's support, fitted on each half.
        base = max(sets, key=lambda c: stats[c.name]["key"])
        assert base.fits is not None
        backward += 2 * s["soup_steps"]
        try:
            soups = (_learned(trajectory, ev, parts[0], base.fits[0], s["soup_steps"]),
                     _learned(trajectory, ev, parts[1], base.fits[1], s["soup_steps"]))
            w = (soups[0] + soups[1]) / 2
            add(f"learned_soup({base.name})", "learned_soup", (6, 0), w, {"on": base.name, "indices": w.nonzero().flatten().tolist()},
                soups)
            stats = statistics(candidates, sizes, ids, folds, objective)
        except SelectionError as e:
            skipped.append(f"learned_soup: {e}")
    elif s["soup_steps"] > 0 and crossfit:
        skipped.append("learned_soup: needs a cross-fitted SeWA set and a trajectory with subset()")
    selected = [c for c in candidates if c.family in ("sewa", "greedy_soup", "learned_soup")]
    if s["shrink"] > 0 and selected and crossfit:
        base = max(selected, key=lambda c: stats[c.name]["key"])
        a = float(s["shrink"])
        u = rules.uniform(n)
        fits = None if base.fits is None else (a * base.fits[0] + (1 - a) * u, a * base.fits[1] + (1 - a) * u)
        add(f"shrunk({base.name}, {a:g})", "shrunk", (7, a), a * base.weights + (1 - a) * u, {"of": base.name, "a": a}, fits)
        stats = statistics(candidates, sizes, ids, folds, objective)
    chosen, info = _choose(candidates, stats, s, objective, folds, plan, skipped, crossfit)
    judged = ev.judge is not None and s["judge_finalists"] > 0
    if judged:
        # The judge's finalists are scored as they stand, so the weights returned are those it
        # judged: no refit.
        split_choice = chosen
        chosen, info["judge"] = _judge(trajectory, ev, candidates, chosen, info["candidates"], s)
        if chosen is not split_choice:
            best = next(c for c in candidates if c.name == info["best"])
            _describe(info, chosen, best, lambda name: _split_gain(stats, chosen, name, s, best.units[2]))
    weights = chosen.weights
    if s["refit"] and chosen.fits is not None and not judged:
        # Cross-fitting chose the family; the weights returned are that family fitted once more,
        # on the whole split with both halves' steps (the halves' mean when the refit fails).
        try:
            weights = refit(chosen)
            info["refitted"] = {"of": chosen.name, "weights": weights.tolist(), "indices": weights.nonzero().flatten().tolist()}
        except SelectionError as e:
            skipped.append(f"refit of {chosen.name}: {e}")
    info["indices"] = weights.nonzero().flatten().tolist()
    forward = scorer.forward + (halves[0].forward + halves[1].forward if crossfit else 0)
    info.update({"forward_passes": forward + backward, "backward_passes": backward})
    return weights, info


def _learned(trajectory: Trajectory, ev: Evaluator, batches: list[Any], support: Tensor, steps: int) -> Tensor:
    """Dense convex weights learned on ``batches`` over the snapshots where ``support > 0``
    (:func:`sewa.trainable_average` on that subset), zero elsewhere."""
    idx = support.nonzero().flatten().tolist()
    learned = trainable_average(trajectory.subset(idx), ev.model, ev.loss_fn, batches, steps=steps, **ev.engine_options())
    w = torch.zeros(len(trajectory), dtype=torch.float64)
    w[idx] = learned.double()
    return w / w.sum()


def _subset(ev: Evaluator, batches: list[Any]) -> Evaluator:
    """An evaluator like ``ev`` over some of its batches."""
    return dataclasses.replace(ev, batches=batches)


def _choose(candidates: list[Candidate], stats: dict[str, dict[str, Any]], s: Mapping[str, Any], objective: str,
            folds: int, plan: dict[str, Any], skipped: list[str], crossfit: bool) -> tuple[Candidate, dict[str, Any]]:
    if not candidates:
        raise MethodError("auto: no candidate average has a finite loss on the selection split; check the snapshots")
    best = max(candidates, key=lambda c: stats[c.name]["key"])
    best_se = mean_se(stats[best.name]["fold"])["se"]
    sizes = best.units[2]
    records, eligible = [], []
    for c in candidates:
        fold = stats[c.name]["fold"]
        if s["se_rule"] == "paired":
            gap = paired_gap(stats[best.name]["unit"] - stats[c.name]["unit"], sizes)
            se = gap["se"]
        else:
            gap, se = mean_se(stats[best.name]["fold"] - fold), best_se
        within = c is best or (s["one_se"] and se is not None and gap["mean"] <= s["se_multiple"] * se)
        # A fitted candidate's score is out of fold from a half fit, so it understates the refit
        # returned: with ``fitted_multiple`` it may trail the best by that many SEs.
        wide = (s["fitted_multiple"] > 0 and c.family in _FITTED and (s["shrunk_wide"] or c.family != "shrunk")
                and s["one_se"] and se is not None and gap["mean"] <= s["fitted_multiple"] * se)
        if within or wide:
            eligible.append(c)
        records.append({"name": c.name, "family": c.family, "params": c.params, "weights": c.weights.tolist(),
                        "complexity": list(c.complexity),
                        "score": stats[c.name]["key"][0], "fold_scores": fold.tolist(), "se": mean_se(fold)["se"],
                        "loss": stats[c.name]["loss"], "metric": stats[c.name]["metric"], "gap_to_best": gap,
                        "within_one_se": within, "eligible": within or wide, "crossfit": c.fits is not None})
    uniform_kept = any(c.name == "uniform" for c in eligible)
    if objective == "metric" and uniform_kept:
        # The loss breaks the metric's tie: under prefer="fitted", uniform loses its precedence to
        # a fitted candidate within noise whose loss is lower beyond noise. The gaps are recorded
        # whatever the settings, so other rules can be replayed on the record.
        for c, r in zip(candidates, records, strict=True):
            r["loss_gap_to_uniform"] = paired_gap(stats["uniform"]["unit_loss"] - stats[c.name]["unit_loss"], sizes)
        uniform_kept = not (s["prefer"] == "fitted" and s["loss_tie_break"] and any(
            r["within_one_se"] and r["family"] in _FITTED and r["loss_gap_to_uniform"]["se"] is not None
            and r["loss_gap_to_uniform"]["mean"] > s["se_multiple"] * r["loss_gap_to_uniform"]["se"] for r in records))
    chosen = min(eligible, key=lambda c: _preference(c, s["prefer"], stats[c.name]["key"][0], uniform_kept))

    def gain(name: str) -> dict[str, Any] | None:
        return _split_gain(stats, chosen, name, s, sizes)

    info: dict[str, Any] = {
        "objective": objective, "folds_used": folds, "crossfit": crossfit, "candidates": records,
        "best": best.name, "best_se": best_se, "uniform_kept": uniform_kept, "skipped": skipped,
        "sewa_default_passes": {"forward": plan["sewa_default_passes"] // (1 + _BACKWARD_COST),
                                "backward": plan["sewa_default_passes"] // (1 + _BACKWARD_COST)},
        "scored_batches": plan["scored_batches"], "planned_passes": plan["planned_passes"],
        "planned_mixes": plan["planned_mixes"], "sewa_default_mixes": plan["sewa_default_mixes"], "se_units": int(sizes.numel()),
    }
    _describe(info, chosen, best, gain)
    return chosen, info


def _describe(info: dict[str, Any], chosen: Candidate, best: Candidate, gain: Callable[[str], dict[str, Any] | None]) -> None:
    """The chosen candidate's entries of ``info``: its name, weights' support, window or K, and
    its estimated gains on the split over uniform and the last iterate."""
    for key in ("chosen_window", "top_k"):
        info.pop(key, None)
    info.update({"chosen": chosen.name, "chosen_family": chosen.family, "chosen_params": chosen.params,
                 "indices": chosen.weights.nonzero().flatten().tolist(), "fell_back": chosen is not best,
                 "gain_vs_uniform": gain("uniform"), "gain_vs_last": gain("last")})
    if chosen.family == "tail":
        info["chosen_window"] = chosen.params
    if "top_k" in chosen.params:
        info["top_k"] = chosen.params["top_k"]


def _judge(trajectory: Trajectory, ev: Evaluator, candidates: list[Candidate], chosen: Candidate,
           records: list[dict[str, Any]], s: Mapping[str, Any]) -> tuple[Candidate, dict[str, Any]]:
    """The judge's check of the split's choice: it scores the finalists (the choice, uniform, the
    last iterate, then the best-scoring candidates within noise on the split, then the others by
    score, ``judge_finalists`` in all) and moves to its best finalist when that beats the split's
    choice by more than ``judge_multiple`` paired standard errors over the judge's units (0: by
    any margin)."""
    named = {c.name: c for c in candidates}
    ranked = sorted(records, key=lambda r: (not r["within_one_se"], -r["score"]))  # within noise first, best first
    order = [chosen.name, "uniform", "last"] + [r["name"] for r in ranked]
    finalists = [n for n in dict.fromkeys(order) if n in named][: s["judge_finalists"]]
    start = time.perf_counter()
    scores = {n: ev.judged(trajectory, named[n].weights) for n in finalists}
    counts = {n: v.numel() for n, v in scores.items()}
    if len(set(counts.values())) > 1:
        raise MethodError(f"auto: the judge ({ev.judge_name}) scored different numbers of units: {counts}; it must score "
                          "the same units (e.g. the same reset seeds) on every call")
    ones = torch.ones(next(iter(counts.values())), dtype=torch.float64)

    def gap(a: str, b: str) -> dict[str, Any]:
        return paired_gap(scores[a] - scores[b], ones)

    top = max(finalists, key=lambda n: float(scores[n].mean()))
    lead = gap(top, chosen.name)
    multiple = s["judge_multiple"]
    moved = top != chosen.name and lead["mean"] > 0 and (multiple == 0 or (lead["se"] is not None and lead["mean"] > multiple * lead["se"]))
    final = top if moved else chosen.name
    return named[final], {
        "name": ev.judge_name, "units": int(ones.numel()), "seconds": time.perf_counter() - start,
        "finalists": [{"name": n, "mean": float(scores[n].mean()), "se": mean_se(scores[n])["se"],
                       "gap_to_split_choice": gap(n, chosen.name), "scores": scores[n].tolist()} for n in finalists],
        "split_choice": chosen.name, "chosen": final, "moved": moved, "multiple": multiple,
        "gain_vs_uniform": gap(final, "uniform") if "uniform" in scores else None,
        "gain_vs_last": gap(final, "last") if "last" in scores else None,
    }


COST_LIMIT = 1.5  # issue 15: auto may take at most this many default SeWA selections' time

_FITTED = ("sewa", "greedy_soup", "learned_soup", "shrunk")


def _split_gain(stats: dict[str, dict[str, Any]], chosen: Candidate, name: str, s: Mapping[str, Any],
                sizes: Tensor) -> dict[str, Any] | None:
    """The chosen candidate's score on the split minus candidate ``name``'s, with its standard error."""
    if name not in stats:
        return None
    if s["se_rule"] == "paired":
        return paired_gap(stats[chosen.name]["unit"] - stats[name]["unit"], sizes)
    return mean_se(stats[chosen.name]["fold"] - stats[name]["fold"])


def _preference(c: Candidate, prefer: str, score: float, uniform_kept: bool) -> tuple[float, float, float]:
    """Order of preference among the candidates within noise (the first is chosen).

    ``"simple"``: by complexity (uniform, narrower tails, EMA, SeWA sets, greedy soup, the
    learned soup, the shrunk set), the higher score first among equals. ``"fitted"``: uniform
    first if it is kept (within noise, and no fitted candidate within noise beats its loss beyond
    noise when the objective is a metric); then the best-scoring fitted
    candidate, whose score is out of fold, so it needs no simplicity penalty (and comes from a
    fit on half the split, so it understates the refit); then the fixed rules by complexity.
    """
    if prefer == "fitted":
        if c.name == "uniform":  # first if kept, else the widest of the tails after the fitted candidates
            return (-1.0, 0.0, 0.0) if uniform_kept else (1.0, 0.0, -score)
        if c.family in _FITTED:
            return (0.5, -score, 0.0)
    return (float(c.complexity[0]), float(c.complexity[1]), -score)


def auto(folds: int = 5, seed: int = 0, one_se: bool = True, sewa_steps: int = 30, sewa_samples: int = 4,
         sewa_fraction: float = 0.125, shrink: float = 0.5, greedy: bool = True, greedy_thin: bool = False, pass_budget: float = 1.25,
         se_rule: str = "paired", se_multiple: float = 1.5, soup_steps: int = 30, refit: bool = True,
         prefer: str = "fitted", loss_tie_break: bool = True, judge_finalists: int = 4,
         judge_multiple: float = 0.0, refit_at_k: bool = True, fitted_multiple: float = 2.5,
         refit_steps: int = 0, top_k_max: float = 0.25, shrunk_wide: bool = True) -> Method:
    """Chooses the average for the user among uniform tails, EMAs, SeWA top-K sets, a shrunk
    selection and greedy soup, cross-fitted over folds of the selection split, with a
    one-standard-error rule towards the simplest (see :mod:`sewa.auto`).

    Args:
        folds: Folds of the selection split's batches (F) for the candidates' scores and standard errors.
        seed: Seed of the fold assignment and of SeWA's mask noise.
        one_se: Choose the simplest candidate within one standard error of the best (else the best).
        sewa_steps: Steps of each of auto's two cross-fitted SeWA runs (one per half of the folds).
        sewa_samples: Mask samples per step of auto's SeWA runs (paper's M).
        sewa_fraction: SeWA's budget K as a fraction of the window in auto's runs; their ranking gives every top-K.
        shrink: Shrinkage a of the best selected set towards uniform, a*selected + (1-a)*uniform (0: none).
        greedy: Include greedy soup (by the metric when the task has one) when it fits the pass and mix budgets.
        greedy_thin: When greedy soup over the whole window does not fit, run it over every 2nd,
            4th, ... snapshot (the newest always in), the densest that fits (candidate
            ``greedy_soup(every m)``). Off by default: not yet compared on the testbed.
        pass_budget: Model passes and weight mixes auto may plan, in units of one default SeWA selection's.
        se_rule: The standard error of the one-SE rule: "paired" (of each candidate's per-example
            differences to the best) or "best" (of the best candidate's fold scores, the classic rule).
        se_multiple: How many standard errors below the best still count as within noise (1: the
            classic one-SE rule; 2 allows for the best of many candidates being lucky).
        soup_steps: Steps of the learned convex soup on the best SeWA set's support, per half (0: none).
        refit: Fit the chosen family (a SeWA set, greedy soup, the learned soup or the shrunk
            selection) once more on the whole split, with both halves' steps, and return that fit;
            cross-fitting then serves only the choice. Else the two halves' fits are averaged.
        prefer: Which candidate within noise of the best is chosen: "fitted" (uniform if it is
            kept, else the best-scoring fitted candidate, else the simplest fixed rule) or "simple"
            (the simplest by complexity: uniform, tails, EMA, SeWA sets, soups).
        loss_tie_break: With ``prefer="fitted"`` and a metric objective, uniform loses its
            precedence to a fitted candidate within noise on the metric whose loss is lower than
            uniform's by more than ``se_multiple`` paired SEs (False: the order before this setting).
        judge_finalists: When the evaluator has a judge (a score of whole models, such as the
            returns of rollout episodes), how many finalists it scores: the split's choice,
            uniform, the last iterate, then the best candidates within noise, then the others.
            auto returns the weights judged (no refit). 0: the judge is not used.
        judge_multiple: How many paired SEs (over the judge's units) the judge's best finalist
            must beat the split's choice by for auto to move to it. 0 (the default): the best
            mean wins, since the judge's scores are independent of the split and of the fits.
        refit_at_k: The refit of a chosen SeWA set of size K runs SeWA with budget K (the
            paper's SeWA(K)), not auto's shared budget ``sewa_fraction * k``, whose top-K for a
            smaller K comes from probabilities that saturate near 1 over the larger budget
            (False: the behaviour before commit 0901a4c).
        fitted_multiple: With ``prefer="fitted"``, a fitted candidate may be chosen when it trails
            the best by up to this many paired SEs (0: ``se_multiple``, like every candidate):
            its score comes from a half fit, scored out of fold, and understates the refit
            returned. The loss tie-break against uniform still uses ``se_multiple``.
        refit_steps: Steps of the SeWA refit on the whole split (0: ``2 * sewa_steps``, both
            halves' steps). Planned in the pass budget.
        top_k_max: The largest SeWA set as a fraction of the window (of ``k/8, k/4, k/2, 3k/4``);
            wide averages are also covered by the uniform tails and EMAs. On BBC News's unstable
            shard (development seeds 10-19) the set of k/2 mixed 18-30 snapshots from before
            the corrupted stretch with those after it, and scored 88.8 on test (mean) against
            91.3 for the table's SeWA(10); on the 315-example split it was often within noise
            of the best and was chosen (docs/AUTO.md).
        shrunk_wide: The shrunk selection gets ``fitted_multiple``'s wider margin like the other
            fitted candidates (False: only ``se_multiple``'s). Shrinking towards uniform brings
            back every snapshot, the damaged ones too.
    """
    for name, value in (("folds", folds), ("sewa_steps", sewa_steps), ("sewa_samples", sewa_samples)):
        _positive_int(name, "auto", value)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MethodError(f"auto: seed must be an integer, got {seed!r}")
    if not 0.0 < sewa_fraction < 1.0:
        raise MethodError(f"auto: sewa_fraction must lie in (0, 1), got {sewa_fraction!r}")
    if not 0.0 <= shrink < 1.0:
        raise MethodError(f"auto: shrink must lie in [0, 1), got {shrink!r}")
    if not (isinstance(se_multiple, (int, float)) and not isinstance(se_multiple, bool) and se_multiple >= 0):
        raise MethodError(f"auto: se_multiple must be a non-negative number, got {se_multiple!r}")
    if not (isinstance(fitted_multiple, (int, float)) and not isinstance(fitted_multiple, bool) and fitted_multiple >= 0):
        raise MethodError(f"auto: fitted_multiple must be a non-negative number, got {fitted_multiple!r}")
    if not 0.125 <= top_k_max < 1.0:
        raise MethodError(f"auto: top_k_max must lie in [0.125, 1), got {top_k_max!r}")
    if not pass_budget > 0:
        raise MethodError(f"auto: pass_budget must be positive, got {pass_budget!r}")
    for name, value in (("soup_steps", soup_steps), ("judge_finalists", judge_finalists), ("refit_steps", refit_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MethodError(f"auto: {name} must be a non-negative integer, got {value!r}")
    if not (isinstance(judge_multiple, (int, float)) and not isinstance(judge_multiple, bool) and judge_multiple >= 0):
        raise MethodError(f"auto: judge_multiple must be a non-negative number, got {judge_multiple!r}")
    if prefer not in ("fitted", "simple"):
        raise MethodError(f"auto: prefer must be 'fitted' or 'simple', got {prefer!r}")
    if se_rule not in ("best", "paired"):
        raise MethodError(f"auto: se_rule must be 'best' or 'paired', got {se_rule!r}")
    settings = {"folds": folds, "seed": seed, "one_se": bool(one_se), "sewa_steps": sewa_steps, "sewa_samples": sewa_samples,
                "sewa_fraction": float(sewa_fraction), "shrink": float(shrink), "greedy": bool(greedy), "greedy_thin": bool(greedy_thin),
                "pass_budget": float(pass_budget), "se_rule": se_rule, "se_multiple": float(se_multiple),
                "soup_steps": soup_steps, "refit": bool(refit), "prefer": prefer,
                "loss_tie_break": bool(loss_tie_break), "judge_finalists": judge_finalists,
                "judge_multiple": float(judge_multiple), "refit_at_k": bool(refit_at_k),
                "fitted_multiple": float(fitted_multiple), "refit_steps": refit_steps,
                "top_k_max": float(top_k_max), "shrunk_wide": bool(shrunk_wide)}
    return Method("auto", _frozen(settings), _rule, evaluates=True)


register("auto", auto)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silences logger ``name`` below warnings for a block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
