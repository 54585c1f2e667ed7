"""``auto`` on synthetic trajectories whose best average is known: a damaged stretch of snapshots,
a window past the optimum, a flat plateau, and a metric that disagrees with the loss.

The model is a linear regression ``y = x·θ`` whose snapshots are set by hand around the optimum
``θ* = 0`` (or along a line), scored by an :class:`~sewa.evaluator.Evaluator` over fixed batches.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _tiny_task import write_checkpoints, write_task
from torch import Tensor, nn

import sewa
from sewa import _auto_scores
from sewa import auto as auto_module
from sewa.compare import run_compare
from sewa.io import trajectory_from_files
from sewa.methods import METHODS, Evaluator, MethodError, create, settings_of
from sewa.task import load_task

D = 8  # features
K = 12  # snapshots in the window
FAST = {"sewa_steps": 20}  # auto's two SeWA fits: enough for these problems, fast in tests


def _mse(out: Tensor, y: Tensor) -> Tensor:
    target = y[:, 0] if y.ndim == 2 else y
    return ((out.squeeze(-1) - target) ** 2).mean()


def _problem(thetas: Tensor, *, seed: int = 0, batches: int = 10, size: int = 16, star: Tensor | None = None,
             metric: Callable[[Tensor, Tensor], float] | None = None, extra: Tensor | None = None,
             ) -> tuple[sewa.Trajectory, Evaluator]:
    """A trajectory holding ``thetas`` (oldest first) and an evaluator on ``y = x·θ* + noise``.

    With ``extra`` the targets carry a second column ``x·extra`` (for a metric of its own).
    """
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(D, 1, bias=False)
    traj = sewa.Trajectory(model, window=thetas.shape[0])
    with torch.no_grad():
        for i, theta in enumerate(thetas):
            model.weight.copy_(theta[None])
            traj.push(model, step=10 * (i + 1))
    star = torch.zeros(D) if star is None else star
    pairs = []
    for _ in range(batches):
        x = torch.randn(size, D, generator=g)
        y = x @ star + 0.5 * torch.randn(size, generator=g)
        pairs.append((x, y if extra is None else torch.stack([y, x @ extra], dim=1)))
    return traj, Evaluator(model, _mse, pairs, metric=metric)


def _damaged(seed: int) -> tuple[sewa.Trajectory, Evaluator]:
    """Snapshots 7-9 of 12 are far from the optimum; the others are close to it."""
    g = torch.Generator().manual_seed(100 + seed)
    thetas = 0.3 * torch.randn(K, D, generator=g)
    thetas[7:10] += 2.0 * torch.randn(3, D, generator=g)
    return _problem(thetas, seed=seed)


def _past_optimum(seed: int) -> tuple[sewa.Trajectory, Evaluator]:
    """The snapshots drift away from the optimum: the oldest are the best."""
    g = torch.Generator().manual_seed(100 + seed)
    v = torch.randn(D, generator=g)
    thetas = torch.arange(K)[:, None] / (K - 1) * 1.5 * v / v.norm() + 0.1 * torch.randn(K, D, generator=g)
    return _problem(thetas, seed=seed)


def _plateau(seed: int) -> tuple[sewa.Trajectory, Evaluator]:
    """Every snapshot is equally close to the optimum, up to small noise."""
    g = torch.Generator().manual_seed(100 + seed)
    return _problem(0.05 * torch.randn(K, D, generator=g), seed=seed)


def _candidate(info: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in info["candidates"] if c["name"] == name)


def test_folds_are_balanced_and_seeded() -> None:
    ids = auto_module.fold_ids(12, 5, seed=0)
    assert sorted(torch.bincount(ids).tolist()) == [2, 2, 2, 3, 3]
    assert torch.equal(ids, auto_module.fold_ids(12, 5, seed=0))
    assert not torch.equal(ids, auto_module.fold_ids(12, 5, seed=1))
    assert auto_module.fold_ids(3, 5, seed=0).sort().values.tolist() == [0, 1, 2]  # at most one fold per batch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_avoids_a_damaged_stretch_and_beats_uniform(seed: int) -> None:
    traj, ev = _damaged(seed)
    result = create("auto", **FAST).weights(traj, ev)
    assert float(result.weights[7:10].sum()) < 0.05  # no or tiny mass on the damaged snapshots
    assert result.info["chosen_family"] not in ("tail", "ema")  # a selection
    assert ev.loss(traj, result.weights) < ev.loss(traj, sewa.weights.uniform(K))
    gain = result.info["gain_vs_uniform"]
    assert gain["mean"] > 2 * gain["se"] > 0  # reported, and beyond noise


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_picks_older_snapshots_when_the_window_is_past_the_optimum(seed: int) -> None:
    traj, ev = _past_optimum(seed)
    result = create("auto", **FAST).weights(traj, ev)
    centre = float((result.weights * torch.arange(K)).sum())
    assert centre < K / 4  # mass on the oldest snapshots
    assert result.info["chosen_family"] != "tail" and float(result.weights[-1]) == 0.0
    assert result.info["gain_vs_last"]["mean"] > result.info["gain_vs_uniform"]["mean"] > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_falls_back_to_uniform_on_a_plateau(seed: int) -> None:
    traj, ev = _plateau(seed)
    result = create("auto", **FAST).weights(traj, ev)
    assert result.info["chosen"] == "uniform" and torch.equal(result.weights, sewa.weights.uniform(K))
    eager = create("auto", one_se=False, **FAST).weights(traj, ev)
    if result.info["fell_back"]:  # some other candidate scored best on the split, within noise
        assert eager.info["chosen"] == result.info["best"] != "uniform"
    assert _candidate(result.info, "uniform")["within_one_se"]


def test_the_one_se_rule_moves_the_choice_on_a_plateau() -> None:
    """On the plateaus above, the best split score belongs to another candidate at least once."""
    moved = [create("auto", **FAST).weights(*_plateau(seed)).info["fell_back"] for seed in range(3)]
    assert any(moved)


def _expected_choice(info: dict[str, Any], prefer: str) -> str:
    within = [c for c in info["candidates"] if c["within_one_se"]]
    # A fitted candidate is eligible up to fitted_multiple SEs (2.5 by default), the others within se_multiple.
    fitted = [c for c in info["candidates"] if c["eligible"] and c["family"] in ("sewa", "greedy_soup", "learned_soup", "shrunk")]
    if prefer == "fitted":
        if info["uniform_kept"]:
            return "uniform"
        if fitted:
            return max(fitted, key=lambda c: c["score"])["name"]
    return min(within, key=lambda c: (c["complexity"], -c["score"]))["name"]


@pytest.mark.parametrize(("rule", "info_multiple", "prefer", "case"),
                         [("best", 1.0, "fitted", _plateau), ("paired", 2.0, "fitted", _plateau), ("paired", 1.0, "fitted", _plateau),
                          ("paired", 1.5, "fitted", _damaged), ("paired", 1.5, "simple", _damaged)])
def test_the_choice_follows_the_one_se_rule_from_the_record(rule: str, info_multiple: float, prefer: str,
                                                            case: Callable[[int], Any]) -> None:
    """Within noise means a mean gap to the best of at most ``se_multiple`` SEs (the best's fold
    SE, or the gap's own over batches). ``prefer="simple"`` chooses the simplest candidate within
    noise; ``"fitted"`` uniform if it is kept (within noise, on a loss objective), else the best
    fitted candidate within noise, else the simplest."""
    info = create("auto", se_rule=rule, se_multiple=info_multiple, prefer=prefer, **FAST).weights(*case(1)).info
    for c in info["candidates"]:
        se = info["best_se"] if rule == "best" else c["gap_to_best"]["se"]
        assert c["within_one_se"] == (c["name"] == info["best"] or c["gap_to_best"]["mean"] <= info_multiple * se)
        wide = c["family"] in ("sewa", "greedy_soup", "learned_soup", "shrunk") and c["gap_to_best"]["mean"] <= 2.5 * se
        assert c["eligible"] == (c["within_one_se"] or wide)
    assert info["uniform_kept"] == _candidate(info, "uniform")["within_one_se"]  # the objective is the loss
    assert info["chosen"] == _expected_choice(info, prefer)
    assert info["fell_back"] == (info["chosen"] != info["best"])


@pytest.mark.parametrize(("prefer", "tie_break"), [("fitted", True), ("fitted", False), ("simple", True)])
def test_the_loss_breaks_a_tie_on_the_metric_against_uniform(prefer: str, tie_break: bool) -> None:
    """A metric that cannot tell the snapshots apart puts every candidate within noise; under
    ``prefer="fitted"`` uniform keeps its precedence unless a fitted candidate within noise beats
    its loss beyond noise ("simple" always keeps it)."""
    traj, ev = _damaged(0)
    ev = dataclasses.replace(ev, metric=lambda out, y: 0.5)
    info = create("auto", prefer=prefer, loss_tie_break=tie_break, **FAST).weights(traj, ev).info
    tie_break = tie_break and prefer == "fitted"
    assert info["objective"] == "metric" and all(c["within_one_se"] for c in info["candidates"])
    beats = [c["name"] for c in info["candidates"] if c["family"] in ("sewa", "greedy_soup", "learned_soup", "shrunk")
             and c["loss_gap_to_uniform"]["mean"] > 1.5 * c["loss_gap_to_uniform"]["se"]]
    assert beats  # the damaged stretch costs uniform loss, not (this) metric
    assert info["uniform_kept"] is not tie_break
    assert info["chosen"] == (_expected_choice(info, "fitted") if tie_break else "uniform")
    assert (info["chosen"] != "uniform") is tie_break


def test_auto_chooses_on_the_metric_when_the_task_has_one() -> None:
    """The loss prefers the newest snapshots, the metric the oldest: auto follows the metric."""
    g = torch.Generator().manual_seed(7)
    old, new = torch.randn(D, generator=g), torch.randn(D, generator=g)
    thetas = torch.stack([old + (new - old) * i / (K - 1) for i in range(K)]) + 0.05 * torch.randn(K, D, generator=g)

    def metric(out: Tensor, y: Tensor) -> float:  # closeness to x·old, higher is better
        return -float(((out.squeeze(-1) - y[:, 1]) ** 2).mean())

    by_loss = create("auto", **FAST).weights(*_problem(thetas, star=new, extra=old))
    by_metric = create("auto", **FAST).weights(*_problem(thetas, star=new, extra=old, metric=metric))
    assert by_loss.info["objective"] == "loss" and by_metric.info["objective"] == "metric"
    index = torch.arange(K, dtype=torch.float64)
    assert float((by_metric.weights * index).sum()) < K / 4 < 3 * K / 4 < float((by_loss.weights * index).sum())


def test_auto_is_deterministic_and_its_record_is_strict_json() -> None:
    traj, ev = _damaged(0)
    method = create("auto", seed=4, **FAST)
    first, second = method.weights(traj, ev), method.weights(traj, ev)
    assert torch.equal(first.weights, second.weights) and first.info == second.info
    info = json.loads(json.dumps(first.info, allow_nan=False))
    assert info["objective"] == "loss" and info["chosen"] in {c["name"] for c in info["candidates"]}
    assert len(info["candidates"]) <= 30
    for c in info["candidates"]:
        assert len(c["fold_scores"]) == info["folds_used"] == 5 and c["se"] > 0
        assert c["score"] == pytest.approx(sum(c["fold_scores"]) / 5)
    # Two SeWA sets (K = 3, 2 of 12), greedy soup, the learned soup and the shrunk selection.
    assert [c["crossfit"] for c in info["candidates"] if c["family"] not in ("tail", "ema")] == [True] * 5
    # Two SeWA fits (steps x samples) and two learned soups, then the chosen family once more
    # on the whole split with both halves' steps.
    refit = {"tail": 0, "ema": 0, "greedy_soup": 0, "sewa": 2 * 20 * 4, "learned_soup": 2 * (20 * 4 + 30)}
    family = info["chosen_family"] if info["chosen_family"] != "shrunk" else _candidate(info, info["chosen_params"]["of"])["family"]
    assert info["backward_passes"] == 2 * (20 * 4 + 30) + refit[family]
    assert (info["forward_passes"] - info["backward_passes"]) % 10 == 0  # whole passes over 10 batches
    assert set(info["gain_vs_uniform"]) == set(info["gain_vs_last"]) == {"mean", "se"}


@pytest.mark.parametrize("seed", [0, 1])
def test_the_chosen_family_is_fitted_again_on_the_whole_split(seed: int) -> None:
    """Cross-fitting chooses; the weights returned are the chosen family refitted on all batches
    (with ``refit=False``, the mean of the halves' fits that were scored)."""
    traj, ev = _damaged(seed)
    result = create("auto", **FAST).weights(traj, ev)
    info = result.info
    assert info["chosen_family"] in ("sewa", "greedy_soup", "learned_soup", "shrunk")
    assert info["refitted"]["of"] == info["chosen"] and result.weights.tolist() == info["refitted"]["weights"]
    assert float(result.weights[7:10].sum()) < 0.05 and info["indices"] == result.weights.nonzero().flatten().tolist()
    halves = create("auto", refit=False, **FAST).weights(traj, ev)
    assert "refitted" not in halves.info and halves.info["chosen"] == info["chosen"]
    assert halves.weights.tolist() == _candidate(info, info["chosen"])["weights"]
    assert halves.info["forward_passes"] < info["forward_passes"]  # the refit's passes (greedy soup: forward only)


def test_the_halves_hold_equal_examples_as_far_as_whole_batches_allow() -> None:
    sizes = torch.tensor([256.0, 59.0, 64.0, 64.0, 128.0])
    half = _auto_scores.balanced_halves(sizes, seed=0)
    held = [float(sizes[half == h].sum()) for h in (0, 1)]
    assert sorted(held) == [256.0, 315.0]  # 256 alone, the rest together
    even = _auto_scores.balanced_halves(torch.full((10,), 16.0), seed=3)
    assert torch.bincount(even).tolist() == [5, 5]
    assert torch.equal(even, _auto_scores.balanced_halves(torch.full((10,), 16.0), seed=3))


def test_auto_on_a_one_batch_split_scores_in_sample_with_standard_errors_over_its_examples() -> None:
    traj, ev = _damaged(0)
    one = Evaluator(ev.model, ev.loss_fn, [list(ev.batches)[0]])
    info = create("auto", **FAST).weights(traj, one).info
    assert not info["crossfit"] and info["folds_used"] == 1
    assert info["se_units"] == 16 and info["gain_vs_uniform"]["se"] > 0  # the batch's 16 examples are the units
    json.dumps(info, allow_nan=False)


def test_the_paired_standard_error_is_over_examples_however_the_split_is_batched() -> None:
    """The same 160 examples in 10 batches or in 2 give the same units: one per example."""
    traj, ev = _damaged(1)
    pairs = list(ev.batches)
    merged = [(torch.cat([x for x, _ in pairs[i:i + 5]]), torch.cat([y for _, y in pairs[i:i + 5]])) for i in (0, 5)]
    w = sewa.weights.lawa(K, 5)
    units = [_auto_scores.scored_of(Evaluator(ev.model, ev.loss_fn, b).per_batch(traj, w, groups=80)) for b in (pairs, merged)]
    for part in (0, 2):  # each unit's loss and size
        a, b = units[0][2][part], units[1][2][part]  # type: ignore[index]
        assert a is not None and b is not None and a.numel() == 160 and torch.allclose(a, b, rtol=1e-5)
    info = create("auto", sewa_steps=5, greedy=False, soup_steps=0).weights(traj, Evaluator(ev.model, ev.loss_fn, merged)).info
    assert info["se_units"] == 2 * 64  # at most 64 slices per batch


def test_auto_skips_candidates_whose_loss_is_not_finite() -> None:
    """The oldest snapshot overflows the loss: every average holding it (uniform, the EMAs, the
    SeWA fits) is skipped, and auto chooses among the rest (tails, greedy soup)."""
    g = torch.Generator().manual_seed(3)
    thetas = 0.3 * torch.randn(K, D, generator=g)
    thetas[0] = 1e30
    result = create("auto", **FAST).weights(*_problem(thetas))
    info = result.info
    assert float(result.weights[0]) == 0.0 and info["chosen"] in {c["name"] for c in info["candidates"]}
    assert {"uniform", "ema(0.8909)"} & {c["name"] for c in info["candidates"]} == set()
    assert any(s.startswith("uniform: a loss or metric is not finite") for s in info["skipped"])
    assert any(s.startswith("sewa: ") for s in info["skipped"]) and info["gain_vs_uniform"] is None
    json.dumps(info, allow_nan=False)


def test_a_small_pass_budget_skips_greedy_soup_and_scores_a_subset_of_batches() -> None:
    traj, ev = _damaged(0)
    info = create("auto", pass_budget=0.58, **FAST).weights(traj, ev).info
    assert "greedy_soup: over the pass budget" in info["skipped"] and info["scored_batches"] < 10
    assert "greedy_soup" not in {c["name"] for c in info["candidates"]}
    # Batch passes spent (a forward and backward counts three) within the budget.
    spent = info["forward_passes"] + 2 * info["backward_passes"]
    assert spent <= info["planned_passes"] <= 0.58 * 3 * info["sewa_default_passes"]["backward"]
    full = create("auto", **FAST).weights(traj, ev).info
    assert full["scored_batches"] == 10 and "greedy_soup" in {c["name"] for c in full["candidates"]}


def test_auto_is_registered_with_documented_plain_settings() -> None:
    assert METHODS["auto"] is auto_module.auto and create("auto").evaluates
    settings = settings_of(auto_module.auto)
    assert all(s.help and type(s.default) in (int, float, str, bool) for s in settings.values())
    assert "top_k" not in settings  # auto chooses K itself
    for bad in ({"folds": 0}, {"shrink": 1.0}, {"sewa_fraction": 0.0}, {"se_rule": "nope"}, {"pass_budget": 0.0}, {"prefer": "x"},
                {"judge_finalists": -1}, {"judge_multiple": -1.0}):
        with pytest.raises(ValueError, match="auto"):
            auto_module.auto(**bad)


def test_auto_runs_through_run_compare(tmp_path) -> None:  # type: ignore[no-untyped-def]
    task_path = write_task(tmp_path, "task.py")
    files = write_checkpoints(tmp_path / "ckpts", task_path, n=6)
    task = load_task(str(task_path))
    traj = trajectory_from_files(files, task.new_model())
    res = run_compare(traj, task, methods=[create("auto", sewa_steps=4), "uniform"])
    entry = res["methods"]["auto"]
    assert entry["objective"] == "metric" and entry["chosen"] and len(entry["weights"]) == 6
    assert entry["test_loss"] is not None and entry["forward_passes"] > 0
    json.dumps(res, allow_nan=False)


def test_greedy_soup_must_fit_the_mix_budget_too() -> None:
    """A split of two batches leaves room in the pass budget, but greedy soup's ~2k trial soups
    would each mix the whole window: over half a default selection's mixes, it is left out."""
    s = auto_module.auto(sewa_steps=25, soup_steps=25, pass_budget=0.5, refit=False).settings
    plan = auto_module._plan(100, 2, s)
    assert not plan["greedy"] and plan["planned_mixes"] <= 0.5 * plan["sewa_default_mixes"]
    assert auto_module._plan(12, 2, s)["greedy"]  # a small window's greedy soup fits


def test_greedy_thin_runs_greedy_soup_over_every_mth_snapshot_when_the_whole_window_does_not_fit() -> None:
    s = auto_module.auto(sewa_steps=25, soup_steps=25, pass_budget=0.5, refit=False, greedy_thin=True).settings
    plan = auto_module._plan(100, 2, s)
    assert plan["greedy"] and plan["greedy_stride"] == 2 and plan["planned_mixes"] <= 0.5 * plan["sewa_default_mixes"]
    assert auto_module._pool(10, 4) == [1, 5, 9]  # the newest always in
    # A budget that would fit a pool of one snapshot (the last iterate under another name) but not of two: no greedy soup.
    tight = auto_module.auto(sewa_steps=25, soup_steps=25, pass_budget=0.338, refit=False, greedy_thin=True,
                             top_k_max=0.75).settings  # four SeWA sets: the budget left is a pool of one
    assert not auto_module._plan(100, 2, tight)["greedy"]
    traj, ev = _damaged(0)
    info = create("auto", pass_budget=0.7, greedy_thin=True, **FAST).weights(traj, ev).info
    greedy = [c for c in info["candidates"] if c["family"] == "greedy_soup"]
    assert [c["name"] for c in greedy] == ["greedy_soup(every 4)"] and not info["skipped"]
    assert set(greedy[0]["params"]["indices"]) <= {3, 7, 11}
    spent = info["forward_passes"] + 2 * info["backward_passes"]
    assert spent <= info["planned_passes"] <= 0.7 * 3 * info["sewa_default_passes"]["backward"]
    # Off by default: the same budget leaves greedy soup out.
    assert "greedy_soup: over the pass budget" in create("auto", pass_budget=0.7, **FAST).weights(traj, ev).info["skipped"]


def _closeness_judge(target: Tensor, units: int = 20) -> Callable[[nn.Module], Tensor]:
    """A judge whose units are fixed random directions: unit u scores -(v_u·(θ - target))²."""
    v = torch.randn(units, D, generator=torch.Generator().manual_seed(3))

    def judge(model: nn.Module) -> Tensor:
        return -((v @ (model.weight.detach()[0] - target)) ** 2)

    return judge


def test_the_judge_moves_the_choice_when_it_tells_the_finalists_apart_beyond_noise() -> None:
    """On a plateau the split keeps uniform; a judge that wants the newest snapshot moves auto to
    the last iterate, and the weights returned are the ones it judged."""
    traj, ev = _plateau(0)
    ev = dataclasses.replace(ev, judge=_closeness_judge(traj.snapshot(K - 1)["weight"][0]), judge_name="closeness")
    result = create("auto", **FAST).weights(traj, ev)
    judge = result.info["judge"]
    assert judge["split_choice"] == "uniform" and judge["moved"] and judge["chosen"] == result.info["chosen"] == "last"
    assert torch.equal(result.weights, sewa.weights.last(K)) and judge["name"] == "closeness" and judge["units"] == 20
    names = [f["name"] for f in judge["finalists"]]
    ranked = [c["name"] for c in sorted(result.info["candidates"], key=lambda c: (not c["within_one_se"], -c["score"]))]
    assert names == ["uniform", "last", *[n for n in ranked if n not in ("uniform", "last")][:2]]  # 4 finalists by default
    assert len(create("auto", judge_finalists=99, **FAST).weights(traj, ev).info["judge"]["finalists"]) == len(ranked)
    strict = create("auto", judge_multiple=1e9, **FAST).weights(traj, ev)  # a margin no finalist clears
    assert not strict.info["judge"]["moved"] and strict.info["chosen"] == "uniform"
    assert judge["gain_vs_uniform"]["mean"] > 1.5 * judge["gain_vs_uniform"]["se"] > 0
    scores = {c["name"]: c["score"] for c in result.info["candidates"]}  # the split's gain is now the last iterate's
    assert result.info["gain_vs_uniform"]["mean"] == pytest.approx(scores["last"] - scores["uniform"], abs=1e-9)
    json.dumps(result.info, allow_nan=False)


def test_a_judge_that_cannot_tell_the_finalists_apart_keeps_the_splits_choice_unrefitted() -> None:
    traj, ev = _damaged(0)
    noise = torch.randn(15, generator=torch.Generator().manual_seed(5))
    plain = create("auto", **FAST).weights(traj, ev)
    judged = create("auto", judge_finalists=4, **FAST).weights(traj, dataclasses.replace(ev, judge=lambda model: noise))
    judge = judged.info["judge"]
    assert not judge["moved"] and judged.info["chosen"] == plain.info["chosen"] == judge["split_choice"]
    assert len(judge["finalists"]) == 4 and all(f["gap_to_split_choice"]["mean"] == 0.0 for f in judge["finalists"])
    assert "refitted" in plain.info and "refitted" not in judged.info  # the judged weights are returned
    assert torch.equal(judged.weights, torch.tensor(_candidate(judged.info, judged.info["chosen"])["weights"], dtype=torch.float64))
    off = create("auto", judge_finalists=0, **FAST).weights(traj, dataclasses.replace(ev, judge=lambda model: noise))
    assert "judge" not in off.info and torch.equal(off.weights, plain.weights)


def test_a_judge_must_score_the_same_units_on_every_call() -> None:
    traj, ev = _plateau(0)
    calls = iter(range(1, 100))
    with pytest.raises(ValueError, match="same units"):
        create("auto", **FAST).weights(traj, dataclasses.replace(ev, judge=lambda model: torch.zeros(next(calls))))
    with pytest.raises(ValueError, match="one finite score per unit"):
        create("auto", **FAST).weights(traj, dataclasses.replace(ev, judge=lambda model: [float("nan")]))


def test_a_sewa_refit_runs_at_the_chosen_sets_size_and_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``refit_at_k`` the refit of a SeWA set of size K (or of the set under a learned soup)
    is SeWA(K), not a top-K of auto's shared budget, and runs ``refit_steps`` steps."""
    calls: list[dict[str, Any]] = []
    select = auto_module.select

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return select(*args, **kwargs)

    monkeypatch.setattr(auto_module, "select", recording)
    traj, ev = _damaged(0)
    info = create("auto", refit_at_k=True, refit_steps=33, sewa_fraction=0.5, greedy=False, **FAST).weights(traj, ev).info
    assert info["chosen_family"] in ("sewa", "learned_soup") and "refitted" in info
    under = info["chosen"] if info["chosen_family"] == "sewa" else info["chosen_params"]["on"]
    k = _candidate(info, under)["params"]["top_k"]
    assert [c["top_k"] for c in calls[:2]] == [round(K * 0.5)] * 2 and [c["steps"] for c in calls[:2]] == [20, 20]  # the halves
    assert calls[-1]["top_k"] == k and calls[-1]["steps"] == 33


def test_top_k_max_bounds_the_sewa_sets_and_fitted_multiple_widens_only_the_fitted() -> None:
    traj, ev = _damaged(1)
    info = create("auto", top_k_max=0.25, **FAST).weights(traj, ev).info
    assert sorted(c["params"]["top_k"] for c in info["candidates"] if c["family"] == "sewa") == [2, 3]  # K/8, K/4 of 12
    with pytest.raises(MethodError, match="top_k_max"):
        create("auto", top_k_max=1.0)
    # On plateau seed 0 a fixed rule (an EMA) scores best. se_multiple=0 leaves only it within
    # noise, so it is chosen; fitted_multiple=1000 makes every fitted candidate eligible, so the
    # best-scoring fitted one is chosen instead.
    narrow = create("auto", se_multiple=0.0, fitted_multiple=0.0, **FAST).weights(*_plateau(0)).info
    assert narrow["best"].startswith("ema") and narrow["chosen"] == narrow["best"]
    info = create("auto", se_multiple=0.0, fitted_multiple=1000.0, **FAST).weights(*_plateau(0)).info
    fitted = [c for c in info["candidates"] if c["family"] in ("sewa", "greedy_soup", "learned_soup", "shrunk")]
    assert info["chosen"] == max(fitted, key=lambda c: c["score"])["name"] != info["best"]
    assert [c["name"] for c in info["candidates"] if c["within_one_se"]] == [info["best"]]
    assert [c["name"] for c in info["candidates"] if c["eligible"]] == [info["best"]] + [c["name"] for c in fitted]
    # shrunk_wide=False keeps the shrunk selection out of the wider margin, and only it.
    assert any(c["family"] == "shrunk" for c in fitted)
    kept = create("auto", se_multiple=0.0, fitted_multiple=1000.0, shrunk_wide=False, **FAST).weights(*_plateau(0)).info
    assert [c["name"] for c in kept["candidates"] if c["eligible"]] == [info["best"]] + [
        c["name"] for c in fitted if c["family"] != "shrunk"]
