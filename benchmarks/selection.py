"""Speed and memory of one SeWA selection step, against the cost-model floor and a naive peer.

Run::

    python benchmarks/selection.py                      # quick grid + candidates + demo cost
    python benchmarks/selection.py --grid full          # every point of the grid (long)
    python benchmarks/make_performance_doc.py           # docs/PERFORMANCE.md and docs/perf/*.png

Writes JSON lines to ``benchmarks/results/selection.jsonl`` (fresh each run) and the demo's
selection cost to ``benchmarks/results/cost_demo.json``; prints PASS/FAIL lines for the targets.

Grid: snapshots ``k``, parameters ``P`` (an MLP 64-h-h-10 with ``h`` chosen so that its
parameter count is closest to ``P``), mask samples ``M``, storage dtype; batch 256. Each point
runs in its own process (so its peak resident memory is its own) and reports, with every
variant timed in interleaved rounds (median over rounds):

- the step: ``∂loss/∂φ`` for one batch (Gumbel masks, ``W = AΘ``, M forward/backward passes,
  ``GΘᵀ``, back through the masks), split into mixing / model / mask gradient;
- the *naive peer*: the same step written as the paper reads: per-checkpoint state dicts
  mixed tensor by tensor in a Python loop under autograd, ``functional_call``, backward;
- the *floor*: the two matrix passes at the copy bandwidth measured in the same process, plus
  M plain forward/backward passes of the ``nn.Module`` at fixed weights on the same batch;
- peak memory: growth of the process's peak RSS (``ru_maxrss``) from before the model was
  built to after two steps, against the trajectory's own size.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import (  # noqa: E402
    JsonLines,
    copy_variant,
    interleaved,
    load_average,
    loglog_slope,
    machine,
    maxrss_bytes,
    median,
    mlp,
    ratios,
    read_jsonl,
    run_worker,
    set_threads,
    worker_reply,
)
from torch import Tensor, nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

import sewa  # noqa: E402
import sewa._columns as columns_module  # noqa: E402
import sewa._engine as engine_module  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BEFORE_REV = "074604c"  # the commit whose src/sewa/_engine.py is the "before" of the optimisation
BATCH, DIN, CLASSES = 256, 64, 10
TAU = 0.5

# Targets of issue 5.
FLOOR_RATIO, NAIVE_M4, NAIVE_M16, BW_FRACTION, SLOPE_TOL = 1.5, 5.0, 10.0, 0.5, 0.15
KEY = dict(k=100, P=1_000_000, M=4, storage="float32")


# --------------------------------------------------------------------------- problem set-up
def make_model(kind: str, p: int) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """A model and one batch: ``mlp`` (sized to ``p``), ``tiny`` (Linear(1, 10): 20
    parameters) or ``resnet8`` (32x32 RGB, BatchNorm, batch 64)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "mlp":
        model, x = mlp(p, DIN, CLASSES), torch.randn(BATCH, DIN, generator=gen)
    elif kind == "tiny":
        model, x = nn.Sequential(nn.Linear(1, CLASSES)), torch.randn(BATCH, 1, generator=gen)
    elif kind == "resnet8":
        from sewa.experiments.models import resnet8

        model, x = resnet8(CLASSES), torch.randn(64, 3, 32, 32, generator=gen)
    else:
        raise ValueError(f"unknown model kind {kind!r}: use mlp, tiny or resnet8")
    return model, (x, torch.randint(0, CLASSES, (x.shape[0],), generator=gen))


def build_trajectory(model: nn.Module, k: int, storage: str) -> sewa.Trajectory:
    """``k`` snapshots of ``model``, each rescaled in place (the timings do not depend on the
    values; rescaling needs no P-sized temporaries that would pollute the peak memory)."""
    traj = sewa.Trajectory(model, window=k, dtype=storage)
    for i in range(k):
        traj.push(model, step=i)
        with torch.no_grad():
            traj.data[traj.slots[-1]].mul_(1.0 + 0.05 * math.sin(i))
    return traj


def load_before_engine(rev: str = BEFORE_REV) -> ModuleType | None:
    """The engine module as it was at commit ``rev`` (``None`` without git or that commit)."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:src/sewa/_engine.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("sewa._engine_before", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "sewa"
    exec(compile(source, f"{rev}:src/sewa/_engine.py", "exec"), module.__dict__)
    return module


def engine_class(which: str) -> type:
    """``MixedLoss`` of the working tree (``after``) or of :data:`BEFORE_REV` (``before``)."""
    if which == "after":
        return engine_module.MixedLoss
    before = load_before_engine()
    if before is None:
        raise RuntimeError(f"cannot read src/sewa/_engine.py at {BEFORE_REV} with git")
    return before.MixedLoss


def masks_input(k: int, m: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Logits spread around ``logit(10/k)`` and one draw of Logistic noise (M, k)."""
    gen = torch.Generator().manual_seed(seed)
    top = min(10, k - 1) / k
    logits = math.log(top) - math.log1p(-top) + torch.linspace(-1, 1, k, dtype=torch.float64)
    u = torch.rand(m, k, generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    return logits, u.log() - (-u).log1p()


def relaxed_mix(phi: Tensor, noise: Tensor) -> Tensor:
    """``a_j = m_j / Σ m_j``, ``m = sigmoid((φ + noise)/τ)``, as :func:`sewa.select` writes it."""
    return torch.softmax(nn.functional.logsigmoid((phi + noise) / TAU), dim=1)


class FastStep:
    """One step through the engine; with ``split`` the engine's three phases are timed."""

    # Phase -> where __call__ finds it: (component, method); the working tree's engine holds
    # ``columns`` and ``passes``, the engine before the optimisation had the methods itself.
    PHASES = {"mix": (("columns", "mix_into"), ("", "_mix_into"), ("", "mix")),
              "model": (("passes", "model_grad"), ("", "_model_grad"), ("", "model_grad")),
              "gradmix": (("columns", "grad"), ("", "grad_mix"))}

    def __init__(self, engine: Any, logits: Tensor, noise: Tensor, batch: tuple[Tensor, Tensor], split: bool) -> None:
        self.engine, self.logits, self.noise, self.batch = engine, logits, noise, batch
        self.parts: dict[str, list[float]] = {name: [] for name in self.PHASES}
        self._now: dict[str, float] = {}
        if split:
            for phase, candidates in self.PHASES.items():
                owner, attr = next((o, attr) for part, attr in candidates
                                   if (o := getattr(engine, part, None) if part else engine) is not None and hasattr(o, attr))
                setattr(owner, attr, self._timed(phase, getattr(owner, attr)))

    def _timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self._now[phase] = self._now.get(phase, 0.0) + time.perf_counter() - start
            return out

        return wrapper

    def __call__(self) -> Tensor:
        self._now = {}
        phi = self.logits.clone().requires_grad_(True)
        mix = relaxed_mix(phi, self.noise)
        _, grad = self.engine(mix.detach(), self.batch)
        mix.backward(grad.to(mix.dtype))
        for phase in self.parts:
            self.parts[phase].append(self._now.get(phase, float("nan")))
        assert phi.grad is not None
        return phi.grad


class NaiveStep:
    """The paper's step written directly: for each of the M samples, ``w = Σ_i a_i θ_i`` per
    parameter tensor as a Python loop over per-checkpoint state dicts under autograd, a
    functional forward, the loss, backward (one sample at a time, so one graph is alive)."""

    def __init__(self, traj: sewa.Trajectory, model: nn.Module, logits: Tensor, noise: Tensor,
                 batch: tuple[Tensor, Tensor]) -> None:
        # Per-checkpoint state dicts, oldest first: views of the stored rows (no copies);
        # compact storage is widened to float32 where it is used, as a plain loop would.
        self.state_dicts = [dict(zip(traj.names, traj.views(traj.data[slot]), strict=True)) for slot in traj.slots]
        self.widen = traj.dtype != torch.float32
        self.device = traj.data.device
        self.net = engine_module.selection_model(model, True, self.device)
        self.logits, self.noise, self.batch = logits, noise, batch

    def __call__(self) -> Tensor:
        phi = self.logits.clone().requires_grad_(True)
        mix = relaxed_mix(phi, self.noise)
        a = mix.detach().to(self.device, torch.float32).requires_grad_(True)
        x, y = self.batch
        m = a.shape[0]
        for j in range(m):
            weights = a[j].unbind()
            params = {}
            for name in self.state_dicts[0]:
                tensors = [sd[name].float() if self.widen else sd[name] for sd in self.state_dicts]
                total = weights[0] * tensors[0]
                for w, t in zip(weights[1:], tensors[1:], strict=True):
                    total = total + w * t
                params[name] = total
            loss = nn.functional.cross_entropy(functional_call(self.net, params, (x,)), y) / m
            loss.backward()
        assert a.grad is not None
        mix.backward(a.grad.to(mix.device, mix.dtype))
        assert phi.grad is not None
        return phi.grad


def _warm_runtime(engine_cls: type) -> None:
    """One small step of every code path before the memory baseline, so that torch's lazily
    loaded pieces (autograd engine, BLAS and oneDNN kernels, functorch) are not counted as the
    benchmark's memory."""
    model, batch = make_model("tiny", 0)
    traj = build_trajectory(model, 4, "float32")
    logits, noise = masks_input(4, 2)
    FastStep(engine_cls(traj, model, nn.functional.cross_entropy), logits, noise, batch, split=False)()
    NaiveStep(traj, model, logits, noise, batch)()
    torch.randn(4, 8).bfloat16().float()


# --------------------------------------------------------------------------- workers
def run_point(cfg: dict[str, Any]) -> dict[str, Any]:
    """One grid point: memory of two steps, then interleaved timings of the step, its floor
    and (if asked) the naive peer."""
    set_threads(cfg["threads"])
    k, m, storage, kind = cfg["k"], cfg["M"], cfg["storage"], cfg.get("model", "mlp")
    engine_cls = engine_class(cfg.get("engine", "after"))
    _warm_runtime(engine_cls)
    rss0 = maxrss_bytes()
    model, batch = make_model(kind, cfg["P"])
    p = sum(t.numel() for t in model.parameters())
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()  # a plain training step's memory
    model.zero_grad(set_to_none=True)
    rss_plain = maxrss_bytes()
    traj = build_trajectory(model, k, storage)
    rss_traj = maxrss_bytes()
    logits, noise = masks_input(k, m)
    engine = engine_cls(traj, model, nn.functional.cross_entropy)
    fast = FastStep(engine, logits, noise, batch, split=True)
    start = time.perf_counter()
    fast_grad = fast()
    first_step = time.perf_counter() - start
    fast()
    rss_fast = maxrss_bytes()
    out: dict[str, Any] = dict(cfg, type="point", P=p, P_target=cfg["P"], hidden=getattr(list(model.children())[2], "in_features", None)
                               if kind == "mlp" else None, batch=int(batch[0].shape[0]), traj_bytes=traj.nbytes,
                               param_bytes=4 * p, mixed_bytes=4 * m * p, peak_bytes=rss_fast - rss0,
                               plain_step_bytes=rss_plain - rss0,
                               traj_build_peak_bytes=rss_traj - rss0, first_step_s=first_step,
                               vectorize=getattr(getattr(engine, "passes", engine), "vectorize", None), load_start=load_average())
    out["budget_bytes"] = traj.nbytes + 3 * out["param_bytes"] + out["mixed_bytes"]
    # The same, plus what a plain forward/backward needs beyond the model and its gradient
    # (activations, workspace): the model's own cost, which "3 model copies" may not cover.
    out["activation_bytes"] = max(0, out["plain_step_bytes"] - 2 * out["param_bytes"])
    out["budget_with_activations_bytes"] = out["budget_bytes"] + out["activation_bytes"]
    if not cfg.get("timing", True):
        return out
    fast.parts = {name: [] for name in fast.parts}
    copy, copy_bytes = copy_variant(cfg.get("copy_bytes", 256 << 20))

    def plain() -> None:
        x, y = batch
        for _ in range(m):
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()

    fns: dict[str, Callable[[], Any]] = {"copy": copy, "plain": plain, "step": fast}
    only: dict[str, int] = {}
    naive = None
    if cfg.get("naive"):
        naive = NaiveStep(traj, model, logits, noise, batch)
        naive_grad = naive()
        fns["naive"] = naive
        only["naive"] = cfg.get("naive_repeats", cfg["repeats"])
        scale = float(fast_grad.abs().max())
        out["naive_max_rel_diff"] = float((naive_grad - fast_grad).abs().max()) / scale if scale > 0 else 0.0
    plain()  # warm-up; the step ran twice above, the naive peer once
    times = interleaved(fns, cfg["repeats"], warmup=0, only=only)
    bw = copy_bytes / median(times["copy"])
    matrix_bytes = 2 * k * p * traj.data.element_size()
    t = {name: median(v) for name, v in times.items()}
    parts = {name: median(v) for name, v in fast.parts.items()}
    out.update(
        times=times, parts_times=fast.parts, copy_bandwidth=bw, matrix_bytes=matrix_bytes,
        t_step=t["step"], t_plain=t["plain"], t_mix=parts["mix"], t_model=parts["model"], t_gradmix=parts["gradmix"],
        t_naive=t.get("naive"), load_end=load_average(),
    )
    out["t_other"] = out["t_step"] - parts["mix"] - parts["model"] - parts["gradmix"]
    out["t_bw"] = matrix_bytes / bw
    out["floor"] = out["t_bw"] + out["t_plain"]
    out["floor_ratio"] = out["t_step"] / out["floor"]
    out["bw_fraction"] = matrix_bytes / (parts["mix"] + parts["gradmix"]) / bw
    if out["t_naive"] is not None:
        out["speedup_vs_naive"] = out["t_naive"] / out["t_step"]
    return out


def run_compare(cfg: dict[str, Any]) -> dict[str, Any]:
    """The engine at :data:`BEFORE_REV` against the working tree's, interleaved on one
    trajectory: step time and its phases."""
    set_threads(cfg["threads"])
    model, batch = make_model(cfg.get("model", "mlp"), cfg["P"])
    traj = build_trajectory(model, cfg["k"], cfg["storage"])
    logits, noise = masks_input(cfg["k"], cfg["M"])
    steps = {}
    for which in ("before", "after"):
        engine = engine_class(which)(traj, model, nn.functional.cross_entropy)
        steps[which] = FastStep(engine, logits, noise, batch, split=True)
    grads = {which: step() for which, step in steps.items()}
    for step in steps.values():
        step.parts = {name: [] for name in step.parts}
    times = interleaved(steps, cfg["repeats"])
    out = dict(cfg, type="compare", P=sum(t.numel() for t in model.parameters()), times=times,
               max_rel_diff=float((grads["before"] - grads["after"]).abs().max() / grads["before"].abs().max()))
    for which, step in steps.items():
        out[f"t_{which}"] = median(times[which])
        for phase, values in step.parts.items():
            out[f"t_{which}_{phase}"] = median(values)
    out["speedup"] = out["t_before"] / out["t_after"]
    return out


def _matrix_candidates(k: int, p: int, m: int, reps: int) -> dict[str, dict[str, list[float]]]:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(k, p, generator=gen)
    a = torch.softmax(torch.randn(m, k, generator=gen), 1)
    g = torch.randn(m, p, generator=gen)
    w = torch.empty(m, p)

    def chunked_mix(cols: int) -> Callable[[], None]:
        def run() -> None:
            for s in range(0, p, cols):
                w[:, s : s + cols] = a @ rows[:, s : s + cols]
        return run

    def chunked_grad(cols: int) -> Callable[[], Tensor]:
        def run() -> Tensor:
            out = torch.zeros(m, k)
            for s in range(0, p, cols):
                out.addmm_(g[:, s : s + cols], rows[:, s : s + cols].T)
            return out
        return run

    return {
        "mix W=AΘ, float32": interleaved({
            "one mm into a reused buffer": lambda: torch.mm(a, rows, out=w),
            "one mm, new output each step": lambda: torch.mm(a, rows),
            "chunks of 131072 columns": chunked_mix(131072),
        }, reps),
        "mask gradient GΘᵀ, float32": interleaved({
            "one mm": lambda: torch.mm(g, rows.T),
            "chunks of 131072 columns": chunked_grad(131072),
        }, reps),
    }


def _bf16_candidates(model: nn.Module, k: int, m: int, reps: int) -> dict[str, list[float]]:
    """The engine's two passes over bfloat16 storage (chunked widening into a reused float32
    scratch, by scratch size), float32 storage, and a bfloat16 matmul for reference."""
    gen = torch.Generator().manual_seed(0)
    traj = build_trajectory(model, k, "bfloat16")
    eng = engine_module.MixedLoss(traj, model, nn.functional.cross_entropy).columns
    ef = engine_module.MixedLoss(build_trajectory(model, k, "float32"), model, nn.functional.cross_entropy).columns
    p = traj.num_params
    a = torch.softmax(torch.randn(m, k, generator=gen), 1)
    g = torch.randn(m, p, generator=gen)
    w = torch.empty(m, p)
    original = columns_module._CHUNK_BYTES

    def widened(chunk_bytes: int) -> Callable[[], None]:
        def run() -> None:
            columns_module._CHUNK_BYTES = chunk_bytes
            if eng._scratch is not None and eng._scratch.shape[1] != next(eng.chunks()).stop:
                eng._scratch = None  # a scratch of this variant's own width
            try:
                eng.mix_into(a, w)
                eng.grad(g)
            finally:
                columns_module._CHUNK_BYTES = original
        return run

    variants: dict[str, Callable[[], Any]] = {
        "float32 storage (for comparison)": lambda: (ef.mix_into(a, w), ef.grad(g))}
    for size in (original, 16 << 20, 64 << 20):
        variants[f"chunked widening, {size >> 20} MiB scratch" + (" (engine)" if size == original else "")] = widened(size)
    variants["bfloat16 mm (bfloat16 output: reference only, loses precision)"] = lambda: (
        torch.mm(a.bfloat16(), traj.data), torch.mm(g.bfloat16(), traj.data.T))
    return interleaved(variants, reps)


def _model_candidates(kind: str, p: int, m: int, reps: int) -> tuple[int, int, dict[str, list[float]]]:
    """The M forward/backward passes by every path of the engine, and plain passes."""
    net, (x, y) = make_model(kind, p)
    pk = sum(t.numel() for t in net.parameters())
    traj = build_trajectory(net, 10, "float32")
    engines = {v: engine_module.MixedLoss(traj, net, nn.functional.cross_entropy, vectorize=v) for v in (True, False)}
    gen = torch.Generator().manual_seed(0)
    mixed = engines[False].mix(torch.softmax(torch.randn(m, 10, generator=gen), 1)).clone()
    functional = engine_module.MixedLoss(traj, net, nn.functional.cross_entropy, vectorize=False)
    functional.passes._direct_checked, functional.passes._direct = True, None  # force the functional_call loop

    def vmap_rebuilt() -> Any:
        engines[True].passes._vmapped = None  # what the engine did before: a new vmap(grad_and_value(...)) per call
        return engines[True].model_grad(mixed, x, y)

    def plain() -> None:
        for _ in range(m):
            net.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()

    return pk, int(x.shape[0]), interleaved({
        "plain nn.Module passes (floor)": plain,
        "direct loop (param.data = view)": lambda: engines[False].model_grad(mixed, x, y),
        "functional_call loop": lambda: functional.model_grad(mixed, x, y),
        "vmap, cached transform": lambda: engines[True].model_grad(mixed, x, y),
        "vmap, rebuilt per call": vmap_rebuilt,
    }, reps)


def run_candidates(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Micro-measurements of the implementation choices, at one size and thread count."""
    set_threads(cfg["threads"])
    k, m, reps = cfg["k"], cfg["M"], cfg["repeats"]
    records: list[dict[str, Any]] = []

    def emit(group: str, times: dict[str, list[float]], **extra: Any) -> None:
        rel = ratios({name: median(v) for name, v in times.items()})
        for name, v in times.items():
            records.append(dict(type="candidate", group=group, variant=name, threads=cfg["threads"], k=k, M=m,
                                seconds=median(v), min_seconds=min(v), times=v, relative_to_best=rel[name], **extra))

    model, (x, y) = make_model("mlp", cfg["P"])
    p = sum(t.numel() for t in model.parameters())
    for group, times in _matrix_candidates(k, p, m, reps).items():
        emit(group, times, P=p)
    emit("bfloat16 storage: both matrix passes", _bf16_candidates(model, k, m, reps), P=p)
    for kind in ("tiny", "mlp", "resnet8"):
        pk, batch, times = _model_candidates(kind, cfg["P"], m, reps)
        emit(f"model: M={m} forward/backward passes, {kind} ({pk:,} parameters, batch {batch})", times, P=pk, model=kind)
    # A smaller selection batch: the model part scales with it.
    eng = engine_module.MixedLoss(build_trajectory(model, 10, "float32"), model, nn.functional.cross_entropy)
    gen = torch.Generator().manual_seed(0)
    mixed = eng.mix(torch.softmax(torch.randn(m, 10, generator=gen), 1)).clone()
    def batch_of(b: int) -> Callable[[], Any]:
        return lambda: eng.model_grad(mixed, x[:b], y[:b])

    emit("selection batch size (model part, direct loop)",
         interleaved({f"batch {b}": batch_of(b) for b in (64, 128, 256)}, reps), P=p)
    return records


def run_cost(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The demo's training epoch against SeWA's whole selection at the demo's settings, with
    the engine before and after."""
    from sewa.demo import DemoConfig, demo_task, digits, make_model, train_run

    set_threads(cfg["threads"])  # the demo itself runs on one thread
    config = DemoConfig.fast() if cfg.get("smoke") else DemoConfig()
    data = digits(config.label_noise, config.data_seed, config.val_size, config.test_size)
    traj, facts = train_run(data, config, seed=0)
    val = list(demo_task(data, config).require("val", "for selection"))
    select_module = importlib.import_module("sewa.select")
    # The selection's own floor: steps x M plain forward/backward passes on the val batches.
    net = make_model(config.hidden)

    def plain_pass(batch: tuple[Tensor, Tensor]) -> None:
        net.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(batch[0]), batch[1]).backward()

    per_batch = [median(interleaved({"plain": partial(plain_pass, b)}, 20)["plain"]) for b in val]
    floor = config.select_steps * config.samples * sum(per_batch) / len(per_batch)
    records = []
    for which in ("after", "before", "after"):  # after twice: the first run pays one-off warm-up
        select_module.MixedLoss = engine_class(which)  # type: ignore[attr-defined]
        try:
            sel = sewa.select(traj, make_model(config.hidden), nn.functional.cross_entropy, val,
                              top_k=config.top_k, samples=config.samples, steps=config.select_steps, seed=0)
        finally:
            select_module.MixedLoss = engine_module.MixedLoss  # type: ignore[attr-defined]
        records.append(dict(type="cost", engine=which, task="demo (digits MLP, sewa.demo defaults)",
                            epoch_seconds=facts["epoch_seconds"], selection_seconds=sel.seconds,
                            steps=config.select_steps, samples=config.samples, window=len(traj),
                            top_k=config.top_k, params=traj.num_params, threads=cfg["threads"],
                            val_batches=len(val), indices=sel.indices, selection_floor_seconds=floor))
    return records[1:]


# --------------------------------------------------------------------------- the grid
def grid(name: str, threads: int, mem_limit: float) -> list[dict[str, Any]]:
    """The points of the ``quick`` or ``full`` grid, as worker configs."""
    points: list[dict[str, Any]] = []

    def add(k: int, p: float, m: int, storage: str, naive: bool, repeats: int) -> None:
        cfg = dict(kind="point", k=k, P=int(p), M=m, storage=storage, naive=naive, threads=threads, repeats=repeats)
        if naive and m >= 16:
            cfg["naive_repeats"] = 3
        if k * p * (4 if storage == "float32" else 2) > mem_limit:
            print(f"skipping k={k} P={p:.0e} {storage}: its trajectory exceeds --mem-limit", file=sys.stderr)
            return
        if cfg not in points:
            points.append(cfg)

    if name == "quick":
        for k in (10, 50, 100, 200):  # growth in k
            add(k, 1e6, 4, "float32", naive=k <= 100, repeats=5)
        for p in (1e5, 1e7):  # growth in P (1e6 above)
            add(100, p, 4, "float32", naive=p < 1e7, repeats=5 if p < 1e7 else 3)
        for m in (1, 16):  # growth in M (4 above)
            add(100, 1e6, m, "float32", naive=True, repeats=5)
        for p in (1e6, 1e7):  # compact storage
            add(100, p, 4, "bfloat16", naive=p < 1e7, repeats=5 if p < 1e7 else 3)
    elif name == "smoke":  # seconds: checks that every part runs, measures nothing worth reading
        for k in (4, 8):
            add(k, 2e4, 2, "float32", naive=True, repeats=2)
        add(8, 5e4, 2, "float32", naive=True, repeats=2)
        add(8, 2e4, 2, "bfloat16", naive=True, repeats=2)
    elif name == "full":
        for storage in ("float32", "bfloat16"):
            for p in (1e5, 1e6, 1e7):
                for k in (10, 50, 100, 200):
                    for m in (1, 4, 16):
                        add(k, p, m, storage, naive=p <= 1e6, repeats=5)
    else:
        raise ValueError(f"unknown grid {name!r}: use quick or full")
    return points


def extra_jobs(threads: int, grid_name: str) -> list[dict[str, Any]]:
    """The optimisation section's jobs: before/after comparisons, the engine before's memory,
    candidates at both thread counts, and the demo's cost."""
    reps = {"quick": 3, "smoke": 2}.get(grid_name, 5)
    key = dict(KEY, P=20_000, k=8) if grid_name == "smoke" else dict(KEY)
    jobs: list[dict[str, Any]] = []
    for point in (key, {**key, "M": 16}, {**key, "storage": "bfloat16"}, {**key, "model": "tiny", "P": 20}):
        jobs.append(dict(point, kind="compare", threads=threads, repeats=reps))
    for point in (key, {**key, "M": 16}):
        jobs.append(dict(point, kind="point", engine="before", timing=False, threads=threads, repeats=1))
    for t in sorted({threads, 1, 2}):
        jobs.append(dict(kind="candidates", k=key["k"], P=key["P"], M=4, threads=t, repeats=reps if t == 1 else 2))
    for t in sorted({1, 2} - {threads}):  # the key point at the other thread count, beside the grid
        jobs.append(dict(key, kind="point", naive=True, threads=t, repeats=2, naive_repeats=1, aside=True))
    jobs.append(dict(kind="cost", threads=1, smoke=grid_name == "smoke"))
    return jobs


# --------------------------------------------------------------------------- targets
def main_points(records: list[dict[str, Any]], timed: bool = True) -> list[dict[str, Any]]:
    """The grid's points measured with the working tree's engine (not the asides)."""
    return [r for r in records if r.get("type") == "point" and r.get("engine", "after") == "after"
            and not r.get("aside") and ("t_step" in r or not timed)]


def _find(records: list[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    for r in main_points(records):
        if all(r.get("P_target" if key == "P" else key) == value for key, value in want.items()):
            return r
    return None


def sweep(records: list[dict[str, Any]], axis: str, storage: str = "float32", **fixed: Any) -> list[dict[str, Any]]:
    """Points of the timed grid along ``axis`` with the other sizes at ``fixed`` (by default the
    key point's), sorted by ``axis``."""
    base = {key: value for key, value in KEY.items() if key not in ("storage", axis)} | fixed
    rows = [r for r in main_points(records) if r["storage"] == storage and all(r.get("P_target" if key == "P" else key) == value
                                                for key, value in base.items())]
    return sorted(rows, key=lambda r: r["P" if axis == "P" else axis])


def slopes(records: list[dict[str, Any]]) -> dict[str, float]:
    """Fitted log-log slopes of time and memory against k and P (float32, the key point's other
    sizes)."""
    ks, ps = sweep(records, "k"), sweep(records, "P")
    return {
        "matrix_passes_vs_k": loglog_slope([r["k"] for r in ks], [r["t_mix"] + r["t_gradmix"] for r in ks]),
        "step_vs_k": loglog_slope([r["k"] for r in ks], [r["t_step"] for r in ks]),
        "step_vs_P": loglog_slope([r["P"] for r in ps], [r["t_step"] for r in ps]),
        "matrix_passes_vs_P": loglog_slope([r["P"] for r in ps], [r["t_mix"] + r["t_gradmix"] for r in ps]),
        "peak_memory_vs_k": loglog_slope([r["k"] for r in ks], [r["peak_bytes"] for r in ks]),
        "peak_memory_vs_P": loglog_slope([r["P"] for r in ps], [r["peak_bytes"] for r in ps]),
    }


def evaluate_targets(records: list[dict[str, Any]]) -> list[tuple[bool | None, str]]:
    """The targets of issue 5 as ``(passed, line)``; ``passed`` is ``None`` when not measured."""
    points = main_points(records)
    lines: list[tuple[bool | None, str]] = []

    def point_name(r: dict[str, Any]) -> str:
        return f"k={r['k']} P={r['P']:.2g} M={r['M']} {r['storage']}"

    if points:
        worst = max(points, key=lambda r: r["floor_ratio"])
        ok = sum(r["floor_ratio"] <= FLOOR_RATIO for r in points)
        lines.append((ok == len(points), f"step <= {FLOOR_RATIO}x floor: {ok}/{len(points)} points; worst "
                      f"{worst['floor_ratio']:.2f}x at {point_name(worst)}"))
        key = _find(records, **KEY)
        if key is not None:
            lines.append((key["floor_ratio"] <= FLOOR_RATIO, f"step <= {FLOOR_RATIO}x floor at the key point "
                          f"{point_name(key)}: {key['floor_ratio']:.2f}x ({key['t_step']:.3f} s vs floor {key['floor']:.3f} s)"))
    for m, need in ((4, NAIVE_M4), (16, NAIVE_M16)):
        r = _find(records, **{**KEY, "M": m})
        if r is None or r.get("speedup_vs_naive") is None:
            lines.append((None, f">= {need:g}x faster than naive at k=100 P=1e6 M={m}: not measured"))
        else:
            lines.append((r["speedup_vs_naive"] >= need, f">= {need:g}x faster than naive at k=100 P=1e6 M={m}: "
                          f"{r['speedup_vs_naive']:.1f}x ({r['t_naive']:.3f} s vs {r['t_step']:.3f} s)"))
    big = [r for r in points if r["P"] >= 900_000]
    if big:
        worst = min(big, key=lambda r: r["bw_fraction"])
        ok = sum(r["bw_fraction"] >= BW_FRACTION for r in big)
        lines.append((ok == len(big), f"matrix passes >= {BW_FRACTION:.0%} of copy bandwidth for P >= 1e6: {ok}/{len(big)} "
                      f"points; lowest {worst['bw_fraction']:.0%} at {point_name(worst)}"))
    mem = main_points(records, timed=False)
    if mem:
        worst = max(mem, key=lambda r: r["peak_bytes"] / r["budget_bytes"])
        ok = sum(r["peak_bytes"] <= r["budget_bytes"] for r in mem)
        lines.append((ok == len(mem), f"peak memory <= trajectory + 3 models + M mixed vectors: {ok}/{len(mem)} points; "
                      f"worst {worst['peak_bytes'] / worst['budget_bytes']:.2f}x of it at {point_name(worst)}"))
    s = slopes(records)
    for name, label in (("matrix_passes_vs_k", "matrix-pass time vs k"), ("step_vs_P", "step time vs P")):
        value = s[name]
        if math.isnan(value):
            lines.append((None, f"{label}: slope 1 +- {SLOPE_TOL}: not measured"))
        else:
            lines.append((abs(value - 1) <= SLOPE_TOL, f"{label}: log-log slope {value:.2f} (target 1 +- {SLOPE_TOL})"))
    return lines


def print_targets(records: list[dict[str, Any]]) -> None:
    """Prints the PASS/FAIL lines."""
    for ok, line in evaluate_targets(records):
        print(f"{'PASS' if ok else 'FAIL' if ok is False else 'N/A '} {line}")


# --------------------------------------------------------------------------- driver
WORKERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "point": run_point, "compare": run_compare, "candidates": run_candidates, "cost": run_cost}


def _describe(r: dict[str, Any]) -> str:
    if r["type"] == "point" and "t_step" in r:
        naive = f" naive x{r['speedup_vs_naive']:.1f}" if r.get("speedup_vs_naive") else ""
        return (f"k={r['k']:>3} P={r['P']:.2g} M={r['M']:>2} {r['storage']:<8} step {r['t_step']:.3f}s "
                f"(mix {r['t_mix']:.3f} model {r['t_model']:.3f} grad {r['t_gradmix']:.3f}) floor {r['floor']:.3f}s "
                f"x{r['floor_ratio']:.2f} bw {r['bw_fraction']:.0%}{naive} peak/traj {r['peak_bytes'] / r['traj_bytes']:.2f}")
    if r["type"] == "point":
        return f"memory only ({r.get('engine')}) k={r['k']} P={r['P']:.2g} M={r['M']}: peak {r['peak_bytes'] / 2**20:.0f} MiB"
    if r["type"] == "compare":
        return (f"before/after k={r['k']} P={r['P']:.2g} M={r['M']} {r['storage']}: {r['t_before']:.4f}s -> "
                f"{r['t_after']:.4f}s (x{r['speedup']:.2f})")
    if r["type"] == "candidate":
        return f"[{r['threads']} thr] {r['group']}: {r['variant']}: {r['seconds']:.4f}s"
    if r["type"] == "cost":
        return (f"demo cost ({r['engine']}): selection {r['selection_seconds']:.2f}s = "
                f"{r['selection_seconds'] / r['epoch_seconds']:.1f} epochs of {r['epoch_seconds']:.3f}s")
    return json.dumps(r)[:200]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=("quick", "full", "smoke"), default="quick")
    parser.add_argument("--parts", default="grid,extra", help="comma-separated: grid, extra (before/after, candidates, demo cost)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in every worker (default 1: on a shared machine, OpenMP "
                             "barrier stalls dominate multi-threaded timings; the candidates run at 1 and 2)")
    parser.add_argument("--out", type=Path, default=RESULTS / "selection.jsonl")
    parser.add_argument("--mem-limit", type=float, default=None,
                        help="skip points whose trajectory exceeds this many bytes (default: 35%% of RAM)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        worker_reply(WORKERS[job["kind"]](job))
        return 0

    info = machine() | {"threads": args.threads}
    mem_limit = args.mem_limit if args.mem_limit is not None else 0.35 * (info["memory_bytes"] or 8 << 30)
    parts = set(args.parts.split(","))
    jobs = grid(args.grid, args.threads, mem_limit) if "grid" in parts else []
    if "extra" in parts:
        jobs += extra_jobs(args.threads, args.grid)
    out = JsonLines(args.out, fresh=True)
    start = time.perf_counter()
    out.write(dict(type="machine", grid=args.grid, command=" ".join([Path(sys.executable).name, *sys.argv]),
                   started=time.strftime("%Y-%m-%d %H:%M:%S"), **info))
    records: list[dict[str, Any]] = []
    for i, job in enumerate(jobs, 1):
        for r in run_worker(__file__, job, args.timeout):
            records.append(r)
            out.write(r)
            print(f"[{i}/{len(jobs)} {time.perf_counter() - start:6.0f}s] {_describe(r)}", flush=True)
            if r["type"] == "cost" and r["engine"] == "after":
                keys = ("task", "epoch_seconds", "selection_seconds", "steps", "samples", "window")
                (args.out.parent / "cost_demo.json").write_text(json.dumps({key: r[key] for key in keys} | {
                    "source": "benchmarks/selection.py", "threads": r["threads"]}, indent=1) + "\n")
    out.write(dict(type="done", seconds=time.perf_counter() - start, load_end=load_average()))
    print(f"\n{len(jobs)} jobs in {time.perf_counter() - start:.0f} s on {info['cpu']} "
          f"({info['logical_cpus']} logical CPUs, {args.threads} torch threads); results in {args.out}")
    print_targets(read_jsonl(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
