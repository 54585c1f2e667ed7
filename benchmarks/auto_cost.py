"""Cost of ``auto`` against one default SeWA selection on the same trajectory and split (issue 15).

Run (about two minutes on a 2-core machine)::

    python benchmarks/auto_cost.py                  # writes benchmarks/results/auto_cost.json
    python benchmarks/auto_cost.py --study 20       # choice quality: benchmarks/results/auto_study.json

The trajectory is 50 snapshots of an MLP 64-h-h-10 (about ``--params`` parameters) trained with
SGD on a synthetic 10-class problem; the selection split is a few hundred examples in batches
of 64. ``sewa.methods.sewa()`` (its defaults: 200 steps of 4 masks, K=10) and
``sewa.methods.auto()`` (its defaults) are timed in interleaved rounds after one warm-up call
each, on one torch thread. Each split size gives one JSON line: the medians, the ratio
auto/SeWA (the target is at most 1.5), and the batch-level forward and backward passes of each
(a SeWA step runs ``samples`` forward and backward passes on one batch; each of auto's
candidates one forward pass over every batch of the split). ``auto(one_se=False)`` is timed
too: it takes the best-scoring candidate, a fitted one here, so its refit on the whole split
runs, auto's costliest path.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402
import auto_rules  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import sewa  # noqa: E402
from sewa.auto import COST_LIMIT  # noqa: E402
from sewa.methods import Evaluator  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "auto_cost.json"
DOC = Path(__file__).resolve().parents[1] / "docs" / "AUTO.md"
COST_BEGIN, COST_END = "<!-- auto_cost: begin (python benchmarks/auto_cost.py) -->", "<!-- auto_cost: end -->"
BEGIN, END = "<!-- auto_study: begin (python benchmarks/auto_cost.py --study N) -->", "<!-- auto_study: end -->"
LIMIT = COST_LIMIT
WINDOW = 50
BATCH = 64


def _data(n: int, g: torch.Generator, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 64, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)
    return x, y


def build(params: int, seed: int = 0) -> tuple[nn.Module, sewa.Trajectory, tuple[torch.Tensor, torch.Tensor]]:
    """The model, a 50-snapshot trajectory recorded every 5 SGD steps, and a pool of held-out data."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = bench.mlp(params)
    w = torch.randn(64, 10, generator=g)
    x, y = _data(2048, g, w)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    traj = sewa.Trajectory(model, window=WINDOW)
    for step in range(5 * WINDOW * 2):
        i = torch.randint(0, len(y), (BATCH,), generator=g)
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 4:
            traj.push(model, step=step + 1)
    return model, traj, _data(1024, g, w)


def accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    return float((out.argmax(1) == y).float().mean())


def measure(model: nn.Module, traj: sewa.Trajectory, pool: tuple[torch.Tensor, torch.Tensor], examples: int,
            repeats: int) -> dict[str, Any]:
    """Times default SeWA and default auto on a split of ``examples`` examples; their ratio and pass counts."""
    x, y = pool
    batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, examples, BATCH)]
    ev = Evaluator(model, nn.functional.cross_entropy, batches, metric=accuracy)
    # "auto_eager" has no one-SE rule: the best-scoring candidate wins, on this trajectory a
    # fitted one, so its refit on the whole split runs (auto's costliest path).
    methods = {"sewa": sewa.methods.sewa(), "auto": sewa.methods.create("auto"), "auto_eager": sewa.methods.create("auto", one_se=False)}
    sewa_method = methods["sewa"]
    last: dict[str, Any] = {}

    def runner(name: str) -> Any:
        def run() -> None:
            last[name] = methods[name].weights(traj, ev)
        return run

    load_before = bench.load_averages()
    times = bench.interleaved({name: runner(name) for name in methods}, repeats, warmup=1)
    stats = {name: bench.summarize(t) for name, t in times.items()}
    rel = bench.ratios({name: s["median"] for name, s in stats.items()}, baseline="sewa")
    info, eager = last["auto"].info, last["auto_eager"].info
    steps, samples = sewa_method.settings["steps"], sewa_method.settings["samples"]
    return {
        "examples": examples, "batches": len(batches), "window": WINDOW, "params": sum(p.numel() for p in model.parameters()),
        "repeats": repeats, "seconds": stats, "ratio_auto_over_sewa": rel["auto"], "limit": LIMIT,
        "ratio_refitting_auto_over_sewa": rel["auto_eager"], "pass": max(rel["auto"], rel["auto_eager"]) <= LIMIT,
        "refitting_auto": {"chosen": eager["chosen"], "refitted": "refitted" in eager,
                           "forward": eager["forward_passes"], "backward": eager["backward_passes"]},
        "passes": {"sewa": {"forward": steps * samples, "backward": steps * samples},
                   "auto": {"forward": info["forward_passes"], "backward": info["backward_passes"]}},
        "auto_candidates": len(info["candidates"]), "auto_skipped": info["skipped"], "auto_scored_batches": info["scored_batches"],
        "auto_chosen": info["chosen"], "auto_fell_back": info["fell_back"],
        "load_before": load_before, "load_after": bench.load_averages(),
    }


def _excess(traj: sewa.Trajectory, w: list[float], star: torch.Tensor) -> float:
    """Excess test loss of the average in closed form: x ~ N(0, I) gives E loss = |θ - θ*|² + σ²."""
    rows = torch.stack([traj.snapshot(i)["weight"].flatten().double() for i in range(len(traj))])
    return float(((torch.tensor(w, dtype=torch.float64) @ rows - star.double()) ** 2).sum())


RULES = {"classic 1-SE": ("classic", 1.0, "simple"), "paired 1 SE": ("paired", 1.0, "simple"),
         "paired 1.5 SE, simple order": ("paired", 1.5, "simple"), "paired 2 SE": ("paired", 2.0, "simple"),
         "paired 1.5 SE, prefer fitted (default), half fits": ("paired", 1.5, "fitted"), "no 1-SE": ("best", 0.0, "simple")}


def _rule(info: dict[str, Any], rule: str, multiple: float, prefer: str) -> str:
    """The candidate a rule picks from the record (:func:`auto_rules.pick`)."""
    return str(auto_rules.pick(info, rule, multiple, prefer)["name"])


def study(seeds: int) -> list[dict[str, Any]]:
    """Choice quality on linear regressions with known optimum θ* = 0 (the cases of tests/test_auto.py):
    excess test loss of each choice rule, uniform, last and SeWA(K=k/2), and how often the one-SE rule moves."""
    d, k = 8, 12
    out = []
    for case in ("damaged", "past_optimum", "plateau"):
        rows: dict[str, list[float]] = {}
        moved = {label: 0 for label in RULES if label != "no 1-SE"}
        for seed in range(seeds):
            g = torch.Generator().manual_seed(100 + seed)
            if case == "damaged":
                th = 0.3 * torch.randn(k, d, generator=g)
                th[7:10] += 2.0 * torch.randn(3, d, generator=g)
            elif case == "past_optimum":
                v = torch.randn(d, generator=g)
                th = torch.arange(k)[:, None] / (k - 1) * 1.5 * v / v.norm() + 0.1 * torch.randn(k, d, generator=g)
            else:
                th = 0.05 * torch.randn(k, d, generator=g)
            model = nn.Linear(d, 1, bias=False)
            traj = sewa.Trajectory(model, window=k)
            with torch.no_grad():
                for i in range(k):
                    model.weight.copy_(th[i][None])
                    traj.push(model, step=i + 1)
            gd = torch.Generator().manual_seed(seed)
            batches = []
            for _ in range(10):
                x = torch.randn(16, d, generator=gd)
                batches.append((x, 0.5 * torch.randn(16, generator=gd)))
            ev = Evaluator(model, lambda o, y: ((o.squeeze(-1) - y) ** 2).mean(), batches)
            result = sewa.methods.create("auto").weights(traj, ev)
            info = result.info
            weights = {c["name"]: c["weights"] for c in info["candidates"]}
            star = torch.zeros(d)
            for label, (rule, multiple, prefer) in RULES.items():
                name = _rule(info, rule, multiple, prefer)
                rows.setdefault(f"auto ({label})", []).append(_excess(traj, weights[name], star))
                if rule != "best":
                    moved[label] += name != info["best"]
            rows.setdefault("auto as returned (refitted when fitted)", []).append(_excess(traj, result.weights.tolist(), star))
            rows.setdefault("oracle candidate", []).append(min(_excess(traj, w, star) for w in weights.values()))
            for name in ("uniform", "last"):
                rows.setdefault(name, []).append(_excess(traj, weights[name], star))
            sel = sewa.methods.sewa(top_k=k // 2).weights(traj, ev).weights.tolist()
            rows.setdefault("sewa(K=k/2)", []).append(_excess(traj, sel, star))
        out.append(bench.emit({"case": case, "seeds": seeds, "mean_excess_test_loss": {n: sum(v) / len(v) for n, v in rows.items()},
                         "fallback_rate": {r: m / seeds for r, m in moved.items()}}))
    return out


def render_cost(data: dict[str, Any]) -> str:
    """The cost benchmark as Markdown: auto/SeWA time and passes per split size."""
    lines = [COST_BEGIN, "", "| selection split | auto / SeWA time | passes, SeWA (fwd / bwd) | passes, auto (fwd / bwd) | candidates | "
             "refitting auto / SeWA time | its passes (fwd / bwd) | 1-min load before |", "|---|---|---|---|---|---|---|---|"]
    for r in data["records"]:
        p = r["passes"]
        greedy = "greedy soup over budget" if any(x.startswith("greedy_soup") for x in r["auto_skipped"]) else "with greedy soup"
        lines.append(f"| {r['examples']} examples ({r['batches']} batches) | {r['ratio_auto_over_sewa']:.2f} | "
                     f"{p['sewa']['forward']} / {p['sewa']['backward']} | {p['auto']['forward']} / {p['auto']['backward']} | "
                     f"{r['auto_candidates']} ({greedy}) | {r['ratio_refitting_auto_over_sewa']:.2f} ({r['refitting_auto']['chosen']}) | "
                     f"{r['refitting_auto']['forward']} / {r['refitting_auto']['backward']} | {r['load_before'][0]:.1f} |")
    return "\n".join(lines + ["", COST_END])


def render(data: dict[str, Any]) -> str:
    """The study as Markdown: mean excess test loss of each choice rule and reference, per case."""
    records = data["records"]
    names = list(records[0]["mean_excess_test_loss"])
    lines = [BEGIN, "", f"`{data['command']}`: mean excess test loss over {records[0]['seeds']} seeds (lower is better), "
             "and how often each one-SE rule moved the choice away from the best-scoring candidate.", "",
             "| rule or reference | " + " | ".join(r["case"] for r in records) + " |", "|---" * (len(records) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{r['mean_excess_test_loss'][n]:.4g}" for r in records) + " |")
    for label in records[0]["fallback_rate"]:
        lines.append(f"| fallback rate, {label} | " + " | ".join(f"{r['fallback_rate'][label]:.0%}" for r in records) + " |")
    return "\n".join(lines + ["", END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=20_000, help="MLP parameters (default 20000)")
    parser.add_argument("--examples", type=int, nargs="+", default=[256, 512, 1024], help="selection split sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--study", type=int, default=0, metavar="SEEDS",
                        help="instead: choice quality on the synthetic cases over SEEDS seeds (writes auto_study.json)")
    args = parser.parse_args()
    bench.set_threads(1)
    if args.study:
        data = {"benchmark": "auto_study", "records": study(args.study), "command": f"python benchmarks/auto_cost.py --study {args.study}",
                "machine": bench.machine()}
        bench.write_json(RESULTS.with_name("auto_study.json"), data)
        bench.write_generated(DOC, render(data), BEGIN, END)
        return
    start = time.perf_counter()
    model, traj, pool = build(args.params)
    records = [bench.emit(measure(model, traj, pool, n, args.repeats)) for n in args.examples]
    bench.write_json(args.out, {"benchmark": "auto_cost", "command": "python benchmarks/auto_cost.py", "records": records,
                          "machine": bench.machine(), "seconds": time.perf_counter() - start})
    bench.write_generated(DOC, render_cost({"records": records}), COST_BEGIN, COST_END)
    for r in records:
        print(f"{'PASS' if r['pass'] else 'FAIL'} auto/SeWA = {r['ratio_auto_over_sewa']:.2f}, refitting auto/SeWA = "
              f"{r['ratio_refitting_auto_over_sewa']:.2f} (limit {LIMIT}) on {r['examples']} selection examples")


if __name__ == "__main__":
    main()
