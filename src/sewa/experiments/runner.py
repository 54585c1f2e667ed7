"""Runs one experiment seed: train under a regime, record the window, run every method, write a v2 record.

Each run writes one JSON file in the format ``sewa.experiment/2`` under
``results/experiments/<task>/<regime>/<preset>/seed<N>.json``: config, regime and where the window
sits, git commit and whether src/ was dirty, data source, machine, timings, and

- ``methods``: the main table, run through :func:`sewa.compare.run_compare` on one selection
  split (the validation set): last, uniform (SWA), swa_lr (its own branch), LAWA(10), EMA and the
  uniform suffix with their decay and start chosen on validation, greedy soup by the validation
  metric, the learned soup, SeWA(10), and ``auto`` when registered; each says ``selected_on`` and
  ``choice_by``;
- ``per_snapshot``: validation and test metric and loss of every snapshot of the window;
- ``random_k``: the test and validation scores of ``draws`` random K=10 averages;
- ``k_curves``: LAWA-K, the random-K mean, SeWA-K (top-K of one SeWA run's probabilities) and the
  oracle best-K (top-K snapshots by their own test score), for K in 1, 5, 10, 20, 50.

For behaviour cloning the test metric is a rollout return: the main table rolls out every method,
but the per-snapshot scores, random-K and K-curves use the test *loss* on held-out episodes
(``measure``), since rolling out hundreds of averages would be too slow.
:mod:`sewa.experiments.results` turns the records into ``docs/RESULTS.md``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import SWALR, AveragedModel
from tqdm.auto import tqdm

from .. import methods as M
from .. import weights as rules
from ..average import apply
from ..compare import environment, run_compare
from ..evaluator import Evaluator
from ..methods import Method
from ..select import select_settings
from ..task import Task
from ..trajectory import Trajectory
from . import tasks as T
from .evidence import MAIN_K, choose_ema_and_suffix, distributions
from .schedules import Regime, make_regime

FORMAT = "sewa.experiment/2"
# One setting varied at a time around the defaults (SeWA K=10, annealed tau, the preset's M and steps).
GRID: dict[str, tuple[Any, ...]] = {
    "window": (10, 50, 100, 200), "tau": (0.1, 0.5, 1.0, 2.0, "annealed"), "samples": (1, 5, 10, 20),
    "steps": (25, 50, 100, 200, 400), "split": (0.1, 0.3, 1.0), "convergence": (0.25, 0.5, 0.75, 1.0),
    "noise": ("independent", "antithetic"), "patience": (0, 10, 25), "knots": (0, 5, 10, 20),
    "per_step": ("one batch", "whole split"),
}
QUICK_GRID: dict[str, tuple[Any, ...]] = {
    "window": (10, 20), "tau": (0.5, "annealed"), "samples": (1, 2), "steps": (10, 30), "split": (0.3, 1.0),
    "convergence": (0.5, 1.0), "noise": ("independent", "antithetic"), "patience": (0, 5), "knots": (0, 4),
    "per_step": ("one batch", "whole split"),
}


def _optimizer(spec: T.Spec, model: nn.Module) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def _train_steps(spec: T.Spec, model: nn.Module, opt: torch.optim.Optimizer, data: T.TaskData, seed: int, epoch: int,
                 on_step: Callable[[int], None], step: int, limit: int, regime: Regime,
                 sched: torch.optim.lr_scheduler.LRScheduler | None) -> int:
    """One epoch (or what is left of ``limit`` updates); update ``step`` trains on ``regime.targets``."""
    model.train()
    for x, y in T.loader(data.train, spec.batch_size, True, seed * 1000 + epoch):
        if step >= limit:
            break
        opt.zero_grad(set_to_none=True)
        spec.loss(model(x), regime.targets(step, y, seed)).backward()
        opt.step()
        if sched is not None:
            sched.step()
        step += 1
        on_step(step)
    return step


class _Scorer:
    """Scores of a model, or of a weight vector's average (BatchNorm refreshed on train batches)."""

    def __init__(self, spec: T.Spec, data: T.TaskData, template: nn.Module, seed: int) -> None:
        self.spec, self.data, self.template, self.seed = spec, data, template, seed
        self.bn = [b for _, b in zip(range(spec.bn_batches), T.loader(data.train, spec.batch_size, True, 7), strict=False)]
        self.work = copy.deepcopy(template)

    def losses(self, model: nn.Module) -> dict[str, float | None]:
        """Validation and test loss and metric, without rollouts (BC: metrics ``None``)."""
        test_loss, test_acc = T.evaluate(model, self.data.test, self.spec.loss, self.spec.eval_batch)
        val_loss, val_acc = T.evaluate(model, self.data.val, self.spec.loss, self.spec.eval_batch)
        bc = self.spec.family == "bc"
        return {"test_loss": test_loss, "val_loss": val_loss, "test_metric": None if bc else test_acc,
                "val_metric": None if bc else val_acc}

    def model(self, model: nn.Module) -> dict[str, Any]:
        """The main table's scores: :meth:`losses`, plus the rollout score for BC."""
        out: dict[str, Any] = self.losses(model)
        if self.spec.family == "bc":
            out |= T.bc_score(model, self.data, self.spec.episodes, self.seed)
            out["test_metric"] = out["normalized_score"]
        return out

    def average(self, trajectory: Trajectory, w: Tensor) -> dict[str, float | None]:
        """:meth:`losses` of the average with weights ``w``."""
        return self.losses(apply(self.work, trajectory, w, bn_batches=self.bn))

    def __call__(self, trajectory: Trajectory, w: torch.Tensor) -> dict[str, float]:
        return self.model(apply(copy.deepcopy(self.template), trajectory, w, bn_batches=self.bn))


def _task(spec: T.Spec, template: nn.Module, bn: list[Any], selection: list[Any], data: T.TaskData, seed: int) -> Task:
    """The experiment as a :class:`sewa.task.Task`: averages load into copies of the trained
    model, BatchNorm is refreshed on ``bn`` training batches, and methods select on
    ``selection`` (scores come from the experiment's own scorer, not from a test split here).
    For BC, ``auto``'s judge is the return of ``spec.judge_episodes`` validation rollouts."""
    splits = {"train": bn, "val": selection}
    bc = spec.family == "bc"
    return Task(model=lambda: copy.deepcopy(template), batches=lambda split: splits[split], loss=spec.loss,
                metric=None if bc else T.accuracy, source=f"sewa.experiments:{spec.name}", metric_name=spec.metric_name,
                judge=T.bc_judge(data, spec.judge_episodes, seed) if bc and spec.judge_episodes > 0 else None,
                judge_name="normalized return (validation rollouts)")


def plan(n: int, spec: T.Spec, seed: int, ev: Evaluator, traj: Trajectory) -> tuple[dict[str, Method], dict[str, dict[str, Any]]]:
    """The main table, ``{label: method}``, on a window of ``n`` snapshots, and the choices made
    on the selection split for EMA's decay and the suffix's start (with their sweeps and cost)."""
    by = "metric" if ev.metric is not None else "loss"
    choices = choose_ema_and_suffix(ev, traj, spec.every, by)
    methods: dict[str, Method] = {
        "last": M.last(), "uniform": M.uniform(), "lawa": M.lawa(top_k=min(MAIN_K, n)),
        "ema": M.ema(decay=choices["ema"]["decay"]), "suffix": M.lawa(top_k=choices["suffix"]["tail"]),
        "greedy_soup": M.greedy_soup(by=by), "learned_soup": M.learned_soup(steps=spec.sel_steps),
        "sewa": M.sewa(top_k=min(MAIN_K, n), steps=spec.sel_steps, samples=spec.sel_samples, seed=seed),
    }
    if "auto" in M.METHODS:
        # auto plans within 1.25x the passes of the table's SeWA (pass_budget is in units of a
        # default select): its two cross-fitted SeWA fits and learned soups take a fifth of the
        # table's steps each, and the refit of the chosen family on the whole split two fifths.
        defaults = select_settings()[1]
        budget = spec.sel_steps * spec.sel_samples / (defaults["steps"] * defaults["samples"])
        fifth = max(1, spec.sel_steps // 5)
        methods["auto"] = M.create("auto", seed=seed, sewa_steps=fifth, sewa_samples=spec.sel_samples, soup_steps=fifth,
                                   pass_budget=1.25 * budget, judge_finalists=spec.judge_finalists)
    return methods, choices


_SELECTED = {"last": None, "uniform": None, "lawa": None, "ema": "by", "suffix": "by", "greedy_soup": "by",
             "learned_soup": "loss", "sewa": "loss", "auto": "by"}


def _method_table(traj: Trajectory, task: Task, spec: T.Spec, seed: int, score: _Scorer) -> dict[str, Any]:
    """Every method of the main table on one trajectory, through :func:`sewa.compare.run_compare`."""
    ev = task.evaluator("val", "to choose EMA's decay and the suffix's start")
    methods, choices = plan(len(traj), spec, seed, ev, traj)
    by = "metric" if ev.metric is not None else "loss"
    results = run_compare(traj, task, methods=methods, objective="val", progress=None, on_error="record", score=score.model)
    out: dict[str, Any] = {}
    for label, e in results["methods"].items():
        choice_by = _SELECTED.get(label, "by")
        entry = dict(e) | {"selected_on": None if choice_by is None else "val",
                           "choice_by": e.get("objective", by) if choice_by == "by" else choice_by}
        if label in choices:
            entry |= choices[label]
            entry["seconds"] = (entry.get("seconds") or 0.0) + choices[label]["choice_seconds"]
        if label == "auto" and entry.get("candidates"):
            # Every candidate's test scores, after the choice (they never reach it): any choice rule
            # can then be studied on the testbed from the raw runs, without training again. The
            # judge's finalists (BC) are rolled out on the test episodes too.
            finalists = {f["name"] for f in (entry.get("judge") or {}).get("finalists", [])}
            for c in entry["candidates"]:
                w = torch.tensor(c["weights"], dtype=torch.float64)
                c["test"] = score(traj, w) if c["name"] in finalists else score.average(traj, w)
        out[label] = entry
    return out


def _selection_split(spec: T.Spec, data: T.TaskData) -> T.Split:
    """The split every method selects on: the validation set, or its ``sel_subset`` items (seed 0)."""
    return T._subset(data.val, spec.sel_subset, 0) if spec.sel_subset else data.val


def _ablations(traj: Trajectory, evaluator: Evaluator, score: _Scorer, full: Trajectory, data: T.TaskData, spec: T.Spec,
               seed: int) -> dict[str, list[dict[str, Any]]]:
    """SeWA(K=10) under one changed setting at a time (the reviewers' questions), and the choices on
    the selection split made by the metric or by the loss (``choice_by``)."""
    base = M.sewa(top_k=10, seed=seed, steps=spec.sel_steps, samples=spec.sel_samples)

    done: dict[str, dict[str, Any]] = {}  # the default setting recurs in many rows: select it once

    def run(t: Trajectory, batches: Any = None, **over: Any) -> dict[str, Any]:
        method = base.replace(**over, top_k=min(over.get("top_k", 10), len(t)))
        key = repr(sorted(method.settings.items())) if t is traj and batches is None else None
        if key in done:
            return dict(done[key])
        ev = evaluator if batches is None else Evaluator(evaluator.model, evaluator.loss_fn, batches)
        res = method.weights(t, ev)
        row = {"seconds": res.seconds, "indices": res.info["indices"], "steps_run": res.info.get("steps_run")} | score(t, res.weights)
        if key is not None:
            done[key] = row
        return dict(row)

    def split(fraction: float, source: T.Split) -> list[T.Split]:
        x, y = source
        m = max(spec.sel_batch // 4, int(len(y) * fraction))
        return list(T.loader((x[:m], y[:m]), spec.sel_batch, False, 0))

    ab: dict[str, list[dict[str, Any]]] = {k: [] for k in ("window", "tau", "samples", "steps", "objective", "budget", "split",
                                                         "convergence", "choice_by", "noise", "patience",
                                                         "knots", "per_step")}
    grid = QUICK_GRID if spec.options.get("quick") else GRID
    n_val = len(data.val[1])
    k_all = len(full)
    for k in grid["window"]:
        if k <= k_all:
            ab["window"].append({"value": k} | run(full.subset(range(k_all - k, k_all))))
    for tau in grid["tau"]:
        over = {} if tau == "annealed" else {"tau_start": tau, "tau_end": tau}
        ab["tau"].append({"value": tau} | run(traj, **over))
    for m in grid["samples"]:
        ab["samples"].append({"value": m} | run(traj, samples=m))
    for s in grid["steps"]:
        ab["steps"].append({"value": s} | run(traj, steps=s))
    for noise in grid["noise"] if spec.sel_samples % 2 == 0 else ():
        ab["noise"].append({"value": noise} | run(traj, noise=noise))
    for patience in grid["patience"]:
        ab["patience"].append({"value": patience} | run(traj, patience=patience))
    for knots in grid["knots"]:
        ab["knots"].append({"value": knots} | run(traj, knots=knots))
    # Each step on one batch of the selection split (the default, cycling), or on all of it at once.
    x_sel, y_sel = _selection_split(spec, data)
    for per_step in grid["per_step"]:
        whole = list(T.loader((x_sel, y_sel), len(y_sel), False, 0)) if per_step == "whole split" else None
        ab["per_step"].append({"value": per_step} | run(traj, batches=whole))
    ab["objective"].append({"value": "val"} | run(traj))
    ab["objective"].append({"value": "train"} | run(traj, batches=split(n_val / max(1, len(data.train[1])), data.train)))
    for b in (True, False):
        ab["budget"].append({"value": b} | run(traj, budget=b))
    for f in grid["split"]:
        ab["split"].append({"value": f} | run(traj, batches=split(f, data.val)))
    # Metric or loss as what a choice on the selection split maximises (greedy soup, EMA's decay, the suffix's start).
    for by in ("metric", "loss") if evaluator.metric is not None else ():
        picked = choose_ema_and_suffix(evaluator, traj, spec.every, by)
        soup = M.greedy_soup(by=by).weights(traj, evaluator).weights
        ab["choice_by"] += [
            {"value": f"greedy_soup by {by}", "size": int((soup > 0).sum())} | score(traj, soup),
            {"value": f"ema by {by}", "half_life_updates": picked["ema"]["half_life_updates"]}
            | score(traj, rules.ema(len(traj), picked["ema"]["decay"])),
            {"value": f"suffix by {by}", "tail": picked["suffix"]["tail"]} | score(traj, rules.lawa(len(traj), picked["suffix"]["tail"]))]
    # Convergence: average at earlier points of training, from the snapshots recorded so far.
    span = max(10, k_all // 4)
    for frac in grid["convergence"]:
        end = max(span, int(round(frac * k_all)))
        sub = full.subset(range(end - span, end))
        row: dict[str, Any] = {"value": frac, "step": sub.steps[-1]}
        for label, w in (("last", rules.last(span)), ("uniform", rules.uniform(span)), ("lawa10", rules.lawa(span, min(10, span)))):
            row[label] = score(sub, w)["test_metric"]
        row["sewa10"] = run(sub)["test_metric"]
        ab["convergence"].append(row)
    return ab


def _swa_lr_branch(spec: T.Spec, model: nn.Module, opt_state: dict[str, Any], data: T.TaskData, seed: int,
                   start: int, total: int, regime: Regime, score: _Scorer) -> dict[str, Any]:
    """SWA with its own learning-rate schedule (torch.optim.swa_utils), over the recorded stage."""
    t0 = time.perf_counter()
    opt = _optimizer(spec, model)
    opt.load_state_dict(opt_state)
    swa = AveragedModel(model)
    anneal = max(1, (total - start) // 10)
    sched = SWALR(opt, swa_lr=spec.lr * 0.5, anneal_epochs=anneal, anneal_strategy="cos")
    step = start

    def on_step(s: int) -> None:
        if (s - start) % spec.every == 0:
            swa.update_parameters(model)

    steps_per_epoch = math.ceil(len(data.train[1]) / spec.batch_size)
    epoch = start // steps_per_epoch
    while step < total:
        step = _train_steps(spec, model, opt, data, seed + 17, epoch, on_step, step, total, regime, sched)
        epoch += 1
    avg = swa.module
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in avg.modules()):
        torch.optim.swa_utils.update_bn(score.bn, avg)
    note = (f"its own branch from update {start} to {total} (the recorded stage, {(total - start) // spec.every} snapshots): "
            f"SWALR anneals the LR to {spec.lr * 0.5:g} (half the peak) over {anneal} updates (cosine) and holds it, "
            f"averaging every {spec.every} updates; the regime's own schedule does not apply there")
    return {"method": "swa_lr", "settings": {"swa_lr": spec.lr * 0.5, "anneal_updates": anneal, "every": spec.every},
            "weights": None, "seconds": time.perf_counter() - t0, "num_averaged": int(swa.n_averaged.item()),
            "window_note": note, "selected_on": None, "choice_by": None} | score.model(avg)


def _reference(spec: T.Spec, data: T.TaskData, seed: int) -> dict[str, Any] | None:
    if spec.reference is not None:
        return spec.reference(spec, data, seed)
    ref = data.info.get("reference")
    return dict(ref) if ref is not None else None


@dataclass
class Trained:
    """One trained seed, before any method runs (:func:`train`): the window ``main`` (the last
    ``spec.window`` snapshots of ``full``), the selection split's task, the test scorer, and what
    the record needs of the training (the SWA-LR branch's start, the regime, epoch times)."""

    spec: T.Spec
    data: T.TaskData
    full: Trajectory
    main: Trajectory
    task: Task
    score: _Scorer
    branch: dict[str, Any]
    regime: Regime
    start: int
    total: int
    epoch_seconds: list[float]
    selection_items: int
    selection_batches: int


def train(name: str, preset: str, seed: int, data_path: str | None = None, progress: bool = True, regime: str = "constant",
          overrides: Mapping[str, Any] | None = None, device: str = "cpu") -> Trained:
    """Trains one seed of experiment ``name`` under ``regime``, as :func:`run` does, and stops
    before the methods: for studies of methods on the runner's own trajectories (e.g.
    benchmarks/auto_variants.py). The arguments are :func:`run`'s."""
    spec = T.SPECS[name].with_preset(preset)
    if overrides:
        spec = replace(spec, **overrides)
    opts = spec.options | {"data_path": data_path, "train_subset": spec.train_subset}
    if spec.family == "bc" and torch.device(device).type != "cpu":
        raise ValueError(f"{name}: behaviour cloning runs on the CPU (its policies are rolled out there), not on {device}")
    data = spec.load(opts)
    if spec.eval_subset:  # smaller val/test splits keep the quick preset quick
        data.val, data.test = T._subset(data.val, spec.eval_subset, 0), T._subset(data.test, spec.eval_subset, 0)
    data.train, data.val, data.test = ((x.to(device), y.to(device)) for x, y in (data.train, data.val, data.test))
    torch.manual_seed(seed)
    model = spec.build(data).to(device)
    opt = _optimizer(spec, model)
    steps_per_epoch = math.ceil(len(data.train[1]) / spec.batch_size)
    total = spec.epochs * steps_per_epoch
    start = total - spec.record_window * spec.every
    if start < 0:
        raise ValueError(f"{name}: {total} steps cannot hold {spec.record_window} snapshots every {spec.every} steps")
    reg = make_regime(regime, total, min(spec.window, spec.record_window), spec.every, spec.warmup)
    sched = reg.scheduler(opt)
    traj = Trajectory(model, spec.record_window, device=device)
    branch: dict[str, Any] = {}

    def on_step(step: int) -> None:
        if step == start:
            branch["model"], branch["opt"] = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
        if step > start and (step - start) % spec.every == 0:
            traj.push(model, step)

    epoch_seconds, step = [], 0
    on_step(0)
    for epoch in tqdm(range(spec.epochs), desc=f"{name} {regime} seed {seed}", disable=not progress):
        t0 = time.perf_counter()
        step = _train_steps(spec, model, opt, data, seed, epoch, on_step, step, total, reg, sched)
        epoch_seconds.append(time.perf_counter() - t0)

    score = _Scorer(spec, data, model, seed)
    main = traj.subset(range(len(traj) - min(spec.window, len(traj)), len(traj)))
    # The selection split (every method that chooses): the validation set, or its first
    # ``sel_subset`` items where evaluating the whole of it hundreds of times would be too slow.
    x_val, y_val = _selection_split(spec, data)
    sel_batches = list(T.loader((x_val, y_val), spec.sel_batch, False, 0))
    task = _task(spec, model, score.bn, sel_batches, data, seed)
    return Trained(spec, data, traj, main, task, score, branch, reg, start, total, epoch_seconds,
                   int(len(y_val)), len(sel_batches))


def run(name: str, preset: str, seed: int, out_dir: Path, data_path: str | None = None,
        ablations: bool | None = None, progress: bool = True, regime: str = "constant",
        overrides: Mapping[str, Any] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Trains one seed of experiment ``name`` under ``regime`` and writes its v2 record; returns it.

    Args:
        name: A key of :data:`sewa.experiments.tasks.SPECS`.
        preset: ``"quick"`` or ``"full"``.
        seed: Seed of the initialisation, the data order and the methods.
        out_dir: Root of the raw runs (``<out_dir>/<name>/<regime>/<preset>/seed<N>.json``).
        data_path: Local path to the original data.
        ablations: Run the ablations (default: the spec's setting, in the constant regime and for
            seeds below ``spec.ablation_seeds`` only: they cost about 25 SeWA selections per seed).
        progress: Progress bars.
        regime: One of :data:`sewa.experiments.schedules.REGIMES`.
        overrides: Spec fields changed after the preset (e.g. a smaller window in tests).
        device: Where to train and evaluate (``"cuda"`` for the image family where a GPU is
            lent; behaviour cloning rolls out on the CPU and stays there).
    """
    t = train(name, preset, seed, data_path, progress, regime, overrides, device)
    spec, data, main, traj, task, score, reg = t.spec, t.data, t.main, t.full, t.task, t.score, t.regime
    methods = _method_table(main, task, spec, seed, score)
    methods["swa_lr"] = _swa_lr_branch(spec, t.branch["model"], t.branch["opt"], data, seed, t.start, t.total, reg, score)
    dist = distributions(main, score, seed, methods.get("sewa"), spec)
    env = environment()
    sewa_seconds = methods.get("sewa", {}).get("seconds")
    record: dict[str, Any] = {
        "format": FORMAT, "task": name, "family": spec.family, "regime": regime, "preset": preset, "seed": seed,
        "git_commit": env["git_commit"], "dirty": env["dirty"], "machine": env, "config": T.describe(spec),
        "overrides": {k: v if isinstance(v, (int, float, str, bool, type(None))) else getattr(v, "__name__", repr(v))
                      for k, v in (overrides or {}).items()},
        "data_source": data.source, "metric": spec.metric_name, "window": len(main), "recorded": len(traj),
        "steps": main.steps, "window_note": reg.note(), "schedule": reg.describe(),
        "selection_split": {"name": "val", "items": t.selection_items, "batches": t.selection_batches}, "device": str(device),
        "reference": _reference(spec, data, seed), "methods": methods,
        "per_snapshot": dist["per_snapshot"], "random_k": dist["random_k"], "k_curves": dist["k_curves"],
        "compute": {"epoch_seconds": sum(t.epoch_seconds) / len(t.epoch_seconds), "train_seconds": sum(t.epoch_seconds),
                    "selection_seconds": sewa_seconds, "trajectory_bytes": main.nbytes, "params": main.num_params,
                    "selection_forward_backward": spec.sel_steps * spec.sel_samples} | dist["seconds"],
    }
    if spec.family == "bc":
        seeds = methods["last"].get("rollout_seeds")
        record["measure_note"] = (f"test_metric is the D4RL-normalised return of {spec.episodes} rollouts (reset seeds "
                                  f"{seeds}) in the main table only; per_snapshot, "
                                  "random_k and k_curves use the MSE test loss on held-out episodes (rollouts of hundreds "
                                  "of averages would be too slow)")
    c = record["compute"]
    if c["selection_seconds"] is not None:
        c["selection_over_epoch"] = c["selection_seconds"] / c["epoch_seconds"]
    if spec.ablations and regime == "constant" and seed < spec.ablation_seeds if ablations is None else ablations:
        record["ablations"] = _ablations(main, task.evaluator("val", "for the ablations"), score, traj, data, spec, seed)
    out = Path(out_dir) / name / regime / preset / f"seed{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=float))
    tmp.replace(out)
    return record
