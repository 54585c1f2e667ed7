"""Runs one experiment seed: train, record the final stage, run every method and ablation.

Each run writes one JSON file (config, seed, git commit, data source, machine, timings,
per-method scores, ablations) under ``runs/experiments/<task>/<preset>/seed<N>.json``;
:mod:`sewa.experiments.results` turns those into ``docs/RESULTS.md``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel
from tqdm.auto import tqdm

from .. import methods as M
from .. import weights as rules
from ..average import apply
from ..compare import environment, run_compare
from ..evaluator import Evaluator
from ..methods import Method
from ..task import Task
from ..trajectory import Trajectory
from . import tasks as T

SEWA_KS = (1, 5, 10, 20, 50)
# One setting varied at a time around the defaults (SeWA K=10, annealed tau, the preset's M and steps).
GRID: dict[str, tuple[Any, ...]] = {
    "window": (10, 50, 100, 200), "tau": (0.1, 0.5, 1.0, 2.0, "annealed"), "samples": (1, 5, 10, 20),
    "steps": (25, 50, 100, 200, 400), "split": (0.1, 0.3, 1.0), "convergence": (0.25, 0.5, 0.75, 1.0),
}
QUICK_GRID: dict[str, tuple[Any, ...]] = {
    "window": (10, 20), "tau": (0.5, "annealed"), "samples": (1, 2), "steps": (10, 30), "split": (0.3, 1.0),
    "convergence": (0.5, 1.0),
}


def _optimizer(spec: T.Spec, model: nn.Module) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def _train_steps(spec: T.Spec, model: nn.Module, opt: torch.optim.Optimizer, data: T.TaskData, seed: int, epoch: int,
                 on_step: Callable[[int], None], step: int, limit: int) -> int:
    model.train()
    for x, y in T.loader(data.train, spec.batch_size, True, seed * 1000 + epoch):
        if step >= limit:
            break
        opt.zero_grad(set_to_none=True)
        spec.loss(model(x), y).backward()
        opt.step()
        step += 1
        on_step(step)
    return step


class _Scorer:
    """Test metric and loss of a weight vector's average (BatchNorm refreshed on train batches)."""

    def __init__(self, spec: T.Spec, data: T.TaskData, template: nn.Module, seed: int) -> None:
        self.spec, self.data, self.template, self.seed = spec, data, template, seed
        self.bn = [b for _, b in zip(range(spec.bn_batches), T.loader(data.train, spec.batch_size, True, 7), strict=False)]

    def model(self, model: nn.Module) -> dict[str, float]:
        test_loss, test_acc = T.evaluate(model, self.data.test, self.spec.loss, self.spec.eval_batch)
        val_loss, val_acc = T.evaluate(model, self.data.val, self.spec.loss, self.spec.eval_batch)
        out = {"test_loss": test_loss, "val_loss": val_loss}
        if self.spec.family == "bc":
            out |= T.bc_score(model, self.data, self.spec.episodes, self.seed)
            out["test_metric"] = out["normalized_score"]
        else:
            out |= {"test_metric": test_acc, "val_metric": val_acc}
        return out

    def __call__(self, trajectory: Trajectory, w: torch.Tensor) -> dict[str, float]:
        model = apply(copy.deepcopy(self.template), trajectory, w, bn_batches=self.bn)
        return self.model(model)


_COMPARE_KEYS = {"method", "settings", "weights", "seconds", "eval_seconds", "num_averaged", "probabilities", "indices",
                 "history", "chosen_steps", "config"}


def _task(spec: T.Spec, template: nn.Module, bn: list[Any], selection: list[Any]) -> Task:
    """The experiment as a :class:`sewa.task.Task`: averages load into copies of the trained
    model, BatchNorm is refreshed on ``bn`` training batches, and methods select on
    ``selection`` (scores come from the experiment's own scorer, not from a test split here)."""
    splits = {"train": bn, "val": selection}
    return Task(model=lambda: copy.deepcopy(template), batches=lambda split: splits[split], loss=spec.loss,
                metric=T.accuracy if spec.family != "bc" else None, source=f"sewa.experiments:{spec.name}",
                metric_name=spec.metric_name)


def plan(n: int, spec: T.Spec, seed: int) -> dict[str, Method]:
    """The main table: ``{label: method}`` on a window of ``n`` snapshots."""
    sewa = M.sewa(steps=spec.sel_steps, samples=spec.sel_samples, seed=seed)
    return {
        "last": M.last(), "uniform": M.uniform(), "ema": M.ema(tail="renormalize"),
        "lawa10": M.lawa(top_k=min(10, n)), f"lawa{min(100, n)}": M.lawa(top_k=min(100, n)),
        "random10": M.random_k(top_k=min(10, n), seed=seed), "greedy_soup": M.greedy_soup(),
        "twa": M.learned_soup(steps=spec.sel_steps),
    } | {f"sewa{k}": sewa.replace(top_k=k) for k in SEWA_KS if k <= n}


def _method_table(traj: Trajectory, task: Task, methods: dict[str, Method], score: _Scorer) -> dict[str, Any]:
    """Every method of the main table on one trajectory, through :func:`sewa.compare.run_compare`."""
    results = run_compare(traj, task, methods=methods, objective="val", progress=None, score=score.model)
    out: dict[str, Any] = {}
    for label, e in results["methods"].items():
        out[label] = {"method": e["method"], "top_k": e["settings"].get("top_k", 10), "seconds": e["seconds"],
                      "weights": e["weights"], "averaged": e["num_averaged"]}
        out[label] |= {k: v for k, v in e.items() if k not in _COMPARE_KEYS}  # the scorer's fields
        if e["method"] == "sewa":
            out[label] |= {"probabilities": e["probabilities"], "indices": e["indices"], "history": e["history"]}
    return out


def _ablations(traj: Trajectory, evaluator: Evaluator, score: _Scorer, full: Trajectory, data: T.TaskData, spec: T.Spec,
               seed: int) -> dict[str, list[dict[str, Any]]]:
    """SeWA(K=10) under one changed setting at a time (the reviewers' questions)."""
    base = M.sewa(top_k=10, seed=seed, steps=spec.sel_steps, samples=spec.sel_samples)

    def run(t: Trajectory, batches: Any = None, **over: Any) -> dict[str, Any]:
        method = base.replace(**over, top_k=min(over.get("top_k", 10), len(t)))
        ev = evaluator if batches is None else Evaluator(evaluator.model, evaluator.loss_fn, batches)
        res = method.weights(t, ev)
        return {"seconds": res.seconds, "indices": res.info["indices"]} | score(t, res.weights)

    def split(fraction: float, source: T.Split) -> list[T.Split]:
        x, y = source
        m = max(spec.sel_batch // 4, int(len(y) * fraction))
        return list(T.loader((x[:m], y[:m]), spec.sel_batch, False, 0))

    ab: dict[str, list[dict[str, Any]]] = {k: [] for k in ("window", "tau", "samples", "steps", "objective", "budget", "split", "convergence")}
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
    ab["objective"].append({"value": "val"} | run(traj))
    ab["objective"].append({"value": "train"} | run(traj, batches=split(n_val / max(1, len(data.train[1])), data.train)))
    for b in (True, False):
        ab["budget"].append({"value": b} | run(traj, budget=b))
    for f in grid["split"]:
        ab["split"].append({"value": f} | run(traj, batches=split(f, data.val)))
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
                   start: int, total: int, score: _Scorer) -> dict[str, Any]:
    """SWA with its own learning-rate schedule (torch.optim.swa_utils), over the final stage."""
    t0 = time.perf_counter()
    opt = _optimizer(spec, model)
    opt.load_state_dict(opt_state)
    swa = AveragedModel(model)
    sched = SWALR(opt, swa_lr=spec.lr * 0.5, anneal_epochs=max(1, (total - start) // 10), anneal_strategy="cos")
    epoch, step = 0, start

    def on_step(s: int) -> None:
        sched.step()
        if (s - start) % spec.every == 0:
            swa.update_parameters(model)

    steps_per_epoch = math.ceil(len(data.train[1]) / spec.batch_size)
    epoch = start // steps_per_epoch
    while step < total:
        step = _train_steps(spec, model, opt, data, seed + 17, epoch, on_step, step, total)
        epoch += 1
    avg = swa.module
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in avg.modules()):
        torch.optim.swa_utils.update_bn(score.bn, avg)
    return {"method": "swa_lr", "seconds": time.perf_counter() - t0, "averaged": swa.n_averaged.item()} | score.model(avg)


def run(name: str, preset: str, seed: int, out_dir: Path, data_path: str | None = None,
        ablations: bool | None = None, progress: bool = True) -> dict[str, Any]:
    """Trains one seed of experiment ``name`` and writes its JSON; returns the record."""
    spec = T.SPECS[name].with_preset(preset)
    opts = spec.options | {"data_path": data_path, "train_subset": spec.train_subset}
    data = spec.load(opts)
    if spec.eval_subset:  # smaller val/test splits keep the quick preset quick
        data.val, data.test = T._subset(data.val, spec.eval_subset, 0), T._subset(data.test, spec.eval_subset, 0)
    torch.manual_seed(seed)
    model = spec.build(data)
    opt = _optimizer(spec, model)
    steps_per_epoch = math.ceil(len(data.train[1]) / spec.batch_size)
    total = spec.epochs * steps_per_epoch
    start = total - spec.record_window * spec.every
    if start < 0:
        raise ValueError(f"{name}: {total} steps cannot hold {spec.record_window} snapshots every {spec.every} steps")
    traj = Trajectory(model, spec.record_window)
    branch: dict[str, Any] = {}

    def on_step(step: int) -> None:
        if step == start:
            branch["model"], branch["opt"] = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
        if step > start and (step - start) % spec.every == 0:
            traj.push(model, step)

    epoch_seconds, step = [], 0
    on_step(0)
    for epoch in tqdm(range(spec.epochs), desc=f"{name} seed {seed}", disable=not progress):
        t0 = time.perf_counter()
        step = _train_steps(spec, model, opt, data, seed, epoch, on_step, step, total)
        epoch_seconds.append(time.perf_counter() - t0)

    score = _Scorer(spec, data, model, seed)
    main = traj.subset(range(len(traj) - min(spec.window, len(traj)), len(traj)))
    # The selection split (SeWA, the learned soup, greedy soup alike): the validation set, or its
    # first ``sel_subset`` items where evaluating the whole of it hundreds of times would be too slow.
    x_val, y_val = T._subset(data.val, spec.sel_subset, 0) if spec.sel_subset else data.val
    sel_batches = list(T.loader((x_val, y_val), spec.sel_batch, False, 0))
    task = _task(spec, model, score.bn, sel_batches)
    methods = _method_table(main, task, plan(len(main), spec, seed), score)
    methods["swa_lr"] = _swa_lr_branch(spec, branch["model"], branch["opt"], data, seed, start, total, score)
    env = environment()
    record: dict[str, Any] = {
        "task": name, "family": spec.family, "preset": preset, "seed": seed, "config": T.describe(spec),
        "data_source": data.source, "git_commit": env["git_commit"], "dirty": env["dirty"], "machine": env,
        "metric": spec.metric_name, "window": len(main), "recorded": len(traj), "steps": main.steps,
        "compute": {"epoch_seconds": sum(epoch_seconds) / len(epoch_seconds), "train_seconds": sum(epoch_seconds),
                    "selection_seconds": methods.get("sewa10", {}).get("seconds"),
                    "trajectory_bytes": main.nbytes, "params": main.num_params,
                    "selection_forward_backward": spec.sel_steps * spec.sel_samples},
        "methods": methods,
    }
    c = record["compute"]
    if c["selection_seconds"] is not None:
        c["selection_over_epoch"] = c["selection_seconds"] / c["epoch_seconds"]
    if spec.ablations if ablations is None else ablations:
        record["ablations"] = _ablations(main, task.evaluator("val", "for the ablations"), score, traj, data, spec, seed)
    out = Path(out_dir) / name / preset / f"seed{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=float))
    tmp.replace(out)
    return record
