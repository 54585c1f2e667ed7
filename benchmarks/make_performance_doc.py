"""Generates ``docs/PERFORMANCE.md`` and its plots (``docs/perf/*.png``) from the benchmark output.

Run (after ``python benchmarks/selection.py``)::

    python benchmarks/make_performance_doc.py

Reads ``benchmarks/results/selection.jsonl`` (and ``selection_1thread.jsonl`` when present: the
same grid at one torch thread), every ``benchmarks/results/*.json`` holding the keys ``task``,
``epoch_seconds``, ``selection_seconds``, ``steps``, ``samples``, ``window`` (selection cost in
real terms, dropped there by the benchmark and by the experiment tasks), computes the
"scale on paper" section from the cost model, and appends the sections that
``benchmarks/distributed.py`` and ``benchmarks/threads.py`` render from their raw results
(``distributed.jsonl``, ``threads.json``). Nothing in the document is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import human_bytes, human_seconds, loglog_slope, mib, ms, read_jsonl, table  # noqa: E402
from selection import KEY, evaluate_targets, main_points, slopes, sweep  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COST_KEYS = ("task", "epoch_seconds", "selection_seconds", "steps", "samples", "window")

# Scale on paper: the hardware assumed (public datasheet figures; change them here).
GPU: dict[str, Any] = {"name": "H100 SXM 80 GB", "hbm_bytes": 80e9, "hbm_bandwidth": 3.35e12, "bf16_flops": 989e12}
HOST_LINK = 50e9  # bytes/s per GPU from pinned host memory over PCIe 5.0 x16 (64 GB/s nominal)
NVME = 7e9  # bytes/s per GPU from one PCIe 4.0 NVMe drive (memory-mapped trajectory)
PAPER: dict[str, Any] = {"k": 100, "M": 4, "tokens": 8 * 2048, "mfu": 0.4, "gpus": 8}


# --------------------------------------------------------------------------- formatting helpers
def name(r: dict[str, Any]) -> str:
    return f"k={r['k']} P={r['P']:.2g} M={r['M']} {'bf16' if r['storage'] == 'bfloat16' else 'fp32'}"


def points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return main_points(records)


def machine_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    return next((r for r in records if r.get("type") == "machine"), {})


# --------------------------------------------------------------------------- plots
def figure(*grid: int, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A matplotlib figure and its axes (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*grid, figsize=figsize)


def save(fig: Any, path: Path) -> None:
    """Lays out, writes (110 dpi) and closes a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_split(pts: list[dict[str, Any]], path: Path) -> None:
    fig, ax = figure(figsize=(max(6, 0.9 * len(pts) + 2), 4.5))
    xs = range(len(pts))
    bottom = [0.0] * len(pts)
    for key, label, color in (("t_mix", "mixing W=AΘ", "#4c72b0"), ("t_model", "model fwd+bwd", "#dd8452"),
                              ("t_gradmix", "mask gradient GΘᵀ", "#55a868"), ("t_other", "other", "#8c8c8c")):
        vals = [max(0.0, r[key]) / r["floor"] for r in pts]
        ax.bar(xs, vals, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.bar(xs, [r["t_bw"] / r["floor"] for r in pts], width=0.25, color="black", alpha=0.5,
           label="floor: bandwidth part")
    ax.axhline(1.0, color="black", lw=1, label="floor")
    ax.axhline(1.5, color="red", lw=1, ls="--", label="target 1.5x floor")
    labels = [f"k={r['k']}\nP={r['P']:.0e}\nM={r['M']}\n{'bf16' if r['storage'] == 'bfloat16' else 'fp32'}" for r in pts]
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("time / floor (medians)")
    ax.set_title("One selection step by phase, as a multiple of the cost-model floor")
    ax.legend(fontsize=7, ncol=2)
    save(fig, path)


def plot_scaling(records: list[dict[str, Any]], path: Path) -> None:
    fig, axes = figure(2, 2, figsize=(10, 7.5))
    for col, axis in enumerate(("k", "P")):
        rows = sweep(records, axis)
        xs = [r[axis] for r in rows]
        for key, label, marker in (("passes", "matrix passes (mix + grad)", "o"), ("t_step", "whole step", "s"),
                                   ("t_model", "model part", "^")):
            ys = [r["t_mix"] + r["t_gradmix"] if key == "passes" else r[key] for r in rows]
            slope = loglog_slope(xs, ys)
            axes[0][col].loglog(xs, ys, marker=marker, label=f"{label}: slope {slope:.2f}")
        axes[0][col].set_xlabel(axis)
        axes[0][col].set_ylabel("seconds (median)")
        axes[0][col].set_title(f"time vs {axis} ({', '.join(f'{a}={KEY[a]:g}' for a in ('k', 'P', 'M') if a != axis)}, fp32)")
        axes[0][col].legend(fontsize=8)
        for key, label, marker in (("peak_bytes", "peak RSS growth", "o"), ("traj_bytes", "trajectory", "s"),
                                   ("budget_bytes", "target: traj + 3 models + M vectors", "^")):
            ys = [r[key] / 2**20 for r in rows]
            slope = loglog_slope(xs, ys)
            axes[1][col].loglog(xs, ys, marker=marker, label=f"{label}: slope {slope:.2f}")
        axes[1][col].set_xlabel(axis)
        axes[1][col].set_ylabel("MiB")
        axes[1][col].set_title(f"memory vs {axis}")
        axes[1][col].legend(fontsize=8)
    save(fig, path)


def plot_naive(pts: list[dict[str, Any]], path: Path) -> None:
    rows = [r for r in pts if r.get("t_naive")]
    fig, ax = figure(figsize=(max(6, 1.1 * len(rows) + 2), 4))
    xs = list(range(len(rows)))
    ax.bar([x - 0.2 for x in xs], [r["t_naive"] for r in rows], width=0.4, label="naive peer", color="#c44e52")
    ax.bar([x + 0.2 for x in xs], [r["t_step"] for r in rows], width=0.4, label="sewa engine", color="#4c72b0")
    ax.scatter(xs, [r["floor"] for r in rows], marker="_", s=500, color="black", label="floor", zorder=3)
    for x, r in zip(xs, rows, strict=True):
        ax.text(x, r["t_naive"], f"x{r['speedup_vs_naive']:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [name(r).replace(" ", "\n") for r in rows], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per step (median)")
    ax.set_title("Against the naive peer (same run, interleaved)")
    ax.legend(fontsize=8)
    save(fig, path)


# --------------------------------------------------------------------------- sections
def section_machine(records: list[dict[str, Any]], others: dict[str, list[dict[str, Any]]]) -> str:
    m = machine_of(records)
    done = next((r for r in records if r.get("type") == "done"), {})
    lines = [
        f"- Command: `{m.get('command', '?')}` (grid `{m.get('grid', '?')}`), started {m.get('started', '?')}, "
        f"{done.get('seconds', float('nan')) / 60:.1f} minutes.",
        f"- Machine: {m.get('cpu', '?')}, {m.get('logical_cpus', '?')} logical CPUs, "
        f"{m.get('memory_bytes', 0) / 2**30:.0f} GiB RAM; {m.get('platform', '?')}; Python {m.get('python', '?')}, "
        f"torch {m.get('torch', '?')} ({m.get('cpu_capability', '?')}).",
        f"- torch threads: {m.get('threads', '?')} in every process of the grid (the candidates also at 2). The machine "
        "was shared: its 1-minute "
        f"load average was {m.get('load_average_1min', float('nan')):.1f} at the start and "
        f"{done.get('load_end', float('nan')):.1f} at the end (2 cores), so absolute times carry noise; every "
        "comparison below is between variants timed in interleaved rounds of the same process.",
    ]
    for label, recs in others.items():
        om = machine_of(recs)
        od = next((r for r in recs if r.get("type") == "done"), {})
        lines.append(f"- Also run: `{om.get('command', '?')}` ({label}; load {om.get('load_average_1min', float('nan')):.1f} "
                     f"→ {od.get('load_end', float('nan')):.1f}).")
    return "\n".join(lines)


def section_targets(records: list[dict[str, Any]], label: str) -> str:
    out = [f"{label}:", "", "```"]
    for ok, line in evaluate_targets(records):
        out.append(f"{'PASS' if ok else 'FAIL' if ok is False else 'N/A '} {line}")
    out.append("```")
    return "\n".join(out)


def section_points(pts: list[dict[str, Any]]) -> str:
    rows = []
    for r in pts:
        rows.append([
            name(r), r["hidden"], ms(r["t_step"]), ms(r["t_mix"]), ms(r["t_model"]), ms(r["t_gradmix"]), ms(r["t_other"]),
            ms(r["t_plain"]), ms(r["t_bw"]), ms(r["floor"]), f"{r['floor_ratio']:.2f}", f"{r['bw_fraction']:.0%}",
            f"{r['copy_bandwidth'] / 1e9:.1f}", ms(r.get("t_naive")),
            f"{r['speedup_vs_naive']:.1f}" if r.get("speedup_vs_naive") else "-",
        ])
    return table(["point", "h", "step", "mix", "model", "mask grad", "other", "M plain passes", "bandwidth time",
                  "floor", "step/floor", "passes / copy bw", "copy GB/s", "naive", "naive/step"], rows)


def section_points_short(pts: list[dict[str, Any]]) -> str:
    rows = [[name(r), ms(r["t_step"]), ms(r["t_mix"] + r["t_gradmix"]), ms(r["t_model"]), ms(r["floor"]),
             f"{r['floor_ratio']:.2f}", f"{r['bw_fraction']:.0%}", ms(r.get("t_naive")),
             f"{r['speedup_vs_naive']:.1f}" if r.get("speedup_vs_naive") else "-"] for r in pts]
    return table(["point", "step ms", "passes ms", "model ms", "floor ms", "step/floor", "passes / copy bw",
                  "naive ms", "naive/step"], rows)


def section_memory(records: list[dict[str, Any]]) -> str:
    rows = []
    for r in main_points(records, timed=False):
        rows.append([name(r), mib(r["traj_bytes"]), mib(r["peak_bytes"]), f"{r['peak_bytes'] / r['traj_bytes']:.2f}",
                     mib(r["budget_bytes"]), f"{r['peak_bytes'] / r['budget_bytes']:.2f}", mib(r["activation_bytes"]),
                     f"{r['peak_bytes'] / r['budget_with_activations_bytes']:.2f}"])
    return table(["point", "trajectory MiB", "peak MiB", "peak / trajectory", "target MiB (traj + 3 models + M vectors)",
                  "peak / target", "plain step's activations MiB", "peak / (target + activations)"], rows)


def section_slopes(records: list[dict[str, Any]]) -> str:
    s = slopes(records)
    labels = {
        "matrix_passes_vs_k": "matrix passes vs k", "step_vs_k": "whole step vs k", "step_vs_P": "whole step vs P",
        "matrix_passes_vs_P": "matrix passes vs P", "peak_memory_vs_k": "peak memory vs k",
        "peak_memory_vs_P": "peak memory vs P"}
    return table(["quantity", "log-log slope"], [[labels[k], f"{v:.2f}"] for k, v in s.items()])


def section_misses(records: list[dict[str, Any]]) -> str:
    """How far each missed target is, from the measurements (the why is in the text)."""
    key = next((r for r in points(records) if all(r.get(k) == v for k, v in
                                                    {**KEY, "P_target": KEY["P"]}.items() if k != "P")), None)
    if key is None:
        return "(the key point k=100, P=1e6, M=4 was not measured)"
    lines = []
    bound = key["t_naive"] / key["floor"] if key.get("t_naive") else float("nan")
    lines.append(f"- At the key point the naive peer takes {ms(key.get('t_naive'))} ms and the floor is {ms(key['floor'])} ms, "
                 f"so even a step *at* the floor would be {bound:.1f}x faster than the naive peer. The floor is mostly the "
                 f"M plain forward/backward passes ({ms(key['t_plain'])} ms of {ms(key['floor'])} ms), which the naive peer "
                 "runs too: what the engine saves is the naive peer's 2M passes over the snapshots (M forward "
                 "mixes, M backward reductions) against its own 2.")
    m16 = next((r for r in points(records) if r["k"] == 100 and r.get("P_target") == KEY["P"] and r["M"] == 16
                and r["storage"] == "float32"), None)
    if m16 is not None and m16.get("t_naive"):
        lines.append(f"- At M=16 the same bound is {m16['t_naive'] / m16['floor']:.1f}x (naive {ms(m16['t_naive'])} ms, "
                     f"floor {ms(m16['floor'])} ms, of which {ms(m16['t_plain'])} ms are the 16 plain passes).")
    by_m = sorted((r for r in points(records) if r["k"] == KEY["k"] and r.get("P_target") == KEY["P"]
                   and r["storage"] == "float32"), key=lambda r: r["M"])
    if len(by_m) > 1:
        lines.append("- The passes' share of copy bandwidth depends on M at fixed k and P: " + ", ".join(
            f"{r['bw_fraction']:.0%} at M={r['M']}" for r in by_m) + ". With one row, BLAS runs a matrix-vector "
            "product that streams Θ at memory speed; with a few rows, its matrix-matrix kernel does not (it "
            "presumably repacks the wide (k, P) operand, and runs at a few GFLOPS for so few rows). Neither chunking "
            "over P nor a transposed layout helps (candidates below). What would close it is a streaming kernel "
            "that reads each column block of Θ once into M accumulators (C++ or Triton), which stock torch "
            "does not offer on CPU.")
    bf = next((r for r in points(records) if r["k"] == KEY["k"] and r.get("P_target") == KEY["P"] and r["M"] == KEY["M"]
               and r["storage"] == "bfloat16"), None)
    if bf is not None:
        cand = {r["variant"]: r for r in records if r.get("type") == "candidate" and r.get("threads") == 1
                and r["group"].startswith("bfloat16")}
        same = ""
        f32 = cand.get("float32 storage (for comparison)")
        eng = next((r for v, r in cand.items() if v.endswith("(engine)")), None)
        if f32 and eng:
            same = f"; in one process, interleaved: {ms(eng['seconds'])} against {ms(f32['seconds'])} ms"
        lines.append(f"- bfloat16 storage halves the bytes read; the passes take {ms(bf['t_mix'] + bf['t_gradmix'])} ms "
                     f"against {ms(key['t_mix'] + key['t_gradmix'])} ms for float32 (grid{same}), not half, because the "
                     "products, not the reads, set the pace (as the M dependence above shows), and the widening into "
                     f"the float32 scratch adds its own work. Against the halved bandwidth time that is "
                     f"{bf['bw_fraction']:.0%}. Its sure gain is memory: the trajectory takes half.")
    over = key["peak_bytes"] - key["budget_bytes"]
    rest = key["peak_bytes"] - key["budget_with_activations_bytes"]
    lines.append(f"- Peak memory at the key point is {mib(key['peak_bytes'])} MiB against a target of "
                 f"{mib(key['budget_bytes'])} MiB ({mib(over)} MiB over). A plain forward/backward of this model on "
                 f"this batch needs {mib(key['activation_bytes'])} MiB beyond the model and its gradient (activations, "
                 f"workspace), which the target's 3 model copies ({mib(3 * key['param_bytes'])} MiB) do not cover; "
                 f"{mib(rest)} MiB remain beyond that (allocator and BLAS working memory; a fixed amount, so the "
                 "largest ratios are at the smallest trajectories). The engine's own state is one (M, P) buffer that "
                 "holds W and then G.")
    passes = key["t_mix"] + key["t_gradmix"]
    lines.append(f"- The two matrix passes take {ms(passes)} ms at the key point against {ms(key['t_bw'])} ms at copy "
                 f"bandwidth ({key['bw_fraction']:.0%}). With passes at copy bandwidth the step would take about "
                 f"{ms(key['t_step'] - passes + key['t_bw'])} ms = {(key['t_step'] - passes + key['t_bw']) / key['floor']:.2f}x "
                 "the floor; the rest of the gap is the model part against the plain passes "
                 f"({ms(key['t_model'])} vs {ms(key['t_plain'])} ms).")
    return "\n".join(lines)


def section_compare(records: list[dict[str, Any]]) -> str:
    rows = []
    for r in [r for r in records if r.get("type") == "compare"]:
        label = f"tiny Linear(1,10), k={r['k']} M={r['M']}" if r.get("model") == "tiny" else name(r)
        rows.append([label, ms(r["t_before"]), ms(r["t_after"]), f"{r['speedup']:.2f}",
                     f"{ms(r['t_before_mix'])} / {ms(r['t_before_model'])} / {ms(r['t_before_gradmix'])}",
                     f"{ms(r['t_after_mix'])} / {ms(r['t_after_model'])} / {ms(r['t_after_gradmix'])}",
                     f"{r['max_rel_diff']:.1e}"])
    return table(["point (threads as above)", "before ms", "after ms", "speed-up", "before mix / model / grad",
                  "after mix / model / grad", "max rel. diff of ∂loss/∂φ"], rows)


def section_memory_compare(records: list[dict[str, Any]]) -> str:
    before = [r for r in records if r.get("type") == "point" and r.get("engine") == "before"]
    rows = []
    for b in before:
        after = next((r for r in main_points(records, timed=False)
                      if all(r.get(k) == b.get(k) for k in ("k", "P", "M", "storage"))), None)
        if after is None:
            continue
        rows.append([name(b), mib(b["traj_bytes"]), mib(b["peak_bytes"]), mib(after["peak_bytes"]),
                     mib(b["peak_bytes"] - b["traj_bytes"]), mib(after["peak_bytes"] - after["traj_bytes"])])
    return table(["point", "trajectory MiB", "peak before MiB", "peak after MiB", "beyond trajectory before",
                  "beyond trajectory after"], rows)


def section_candidates(records: list[dict[str, Any]]) -> str:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("type") == "candidate":
            groups[r["group"]].append(r)
    threads = sorted({r["threads"] for r in records if r.get("type") == "candidate"}, reverse=True)
    out = []
    for group, rows in groups.items():
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        body = []
        for v in variants:
            cells = [v]
            for t in threads:
                found = [x for x in rows if x["variant"] == v and x["threads"] == t]
                cells.append(f"{ms(found[0]['seconds'])} (min {ms(found[0]['min_seconds'])})" if found else "-")
            body.append(cells)
        out.append(f"**{group}** (k={rows[0]['k']}, P={rows[0]['P']:,}, M={rows[0]['M']})\n\n"
                   + table(["variant"] + [f"{t} thread{'s' if t > 1 else ''}: ms median (min)" for t in threads], body))
    return "\n\n".join(out)


def section_threads(records: list[dict[str, Any]]) -> str:
    asides = [r for r in records if r.get("type") == "point" and r.get("aside") and "t_step" in r]
    rows = []
    for a in asides:
        main = next((r for r in main_points(records) if all(r.get(k) == a.get(k) for k in ("k", "P", "M", "storage"))), None)
        for r in [x for x in (main, a) if x is not None]:
            rows.append([name(r), r["threads"], ms(r["t_step"]), ms(r["t_plain"]), ms(r.get("t_naive")),
                         f"{r['speedup_vs_naive']:.1f}" if r.get("speedup_vs_naive") else "-", f"{r['floor_ratio']:.2f}",
                         f"{r.get('load_start', float('nan')):.1f}"])
    if not rows:
        return ""
    out = table(["point", "torch threads", "step ms", "M plain passes ms", "naive ms", "naive/step", "step/floor",
                 "load average"], rows)
    for a in asides:
        main = next((r for r in main_points(records) if all(r.get(k) == a.get(k) for k in ("k", "P", "M", "storage"))), None)
        if main is not None and main.get("t_naive") and a.get("t_naive"):
            out += (f"\n\nGoing from {main['threads']} to {a['threads']} thread(s) changed the step's time by "
                    f"x{a['t_step'] / main['t_step']:.1f}, the plain passes' by x{a['t_plain'] / main['t_plain']:.1f} and "
                    f"the naive peer's by x{a['t_naive'] / main['t_naive']:.1f}.")
    return out


def cost_rows() -> list[dict[str, Any]]:
    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for item in data if isinstance(data, list) else [data]:
            if isinstance(item, dict) and all(k in item for k in COST_KEYS):
                rows.append(item | {"file": path.name})
    return rows


def section_cost(records: list[dict[str, Any]]) -> str:
    rows = []
    for r in cost_rows() + experiment_cost_rows():
        frac = r["selection_seconds"] / r["epoch_seconds"]
        rows.append([r["task"], r["window"], r["samples"], r["steps"], human_seconds(r["epoch_seconds"]),
                     human_seconds(r["selection_seconds"]), f"{frac:.2f}", "yes" if frac <= 1 else "no", f"`{r['file']}`"])
    text = table(["task", "window k", "samples M", "steps", "one training epoch", "whole selection",
                  "selection / epoch", "<= 1 epoch", "source"], rows) if rows else "(no result files yet)"
    before = next((r for r in reversed(records) if r.get("type") == "cost" and r.get("engine") == "before"), None)
    after = next((r for r in reversed(records) if r.get("type") == "cost" and r.get("engine") == "after"), None)
    if before and after:
        text += (f"\n\nThe demo's selection with the engine before the optimisation took "
                 f"{human_seconds(before['selection_seconds'])} ({before['selection_seconds'] / before['epoch_seconds']:.2f} "
                 f"epochs), after {human_seconds(after['selection_seconds'])} "
                 f"({after['selection_seconds'] / after['epoch_seconds']:.2f} epochs); same top-{after['top_k']} chosen: "
                 f"{'yes' if before['indices'] == after['indices'] else 'no'}. Both at {after['threads']} torch thread(s), "
                 "like the demo itself; per step that is "
                 f"{human_seconds(after['selection_seconds'] / after['steps'])} for k={after['window']}, "
                 f"P={after['params']:,}, M={after['samples']}. The selection's own floor, {after['steps']} steps x "
                 f"{after['samples']} plain forward/backward passes on the val batches, is "
                 f"{human_seconds(after['selection_floor_seconds'])} = "
                 f"{after['selection_floor_seconds'] / after['epoch_seconds']:.1f} epochs: at these settings no "
                 "implementation of the method can select within one epoch, because an epoch of this task is "
                 f"{after['epoch_seconds'] / (after['selection_floor_seconds'] / (after['steps'] * after['samples'])):.0f} "
                 "such passes.")
    return text


def scale_on_paper() -> str:
    k, m, g = PAPER["k"], PAPER["M"], PAPER["gpus"]
    bw, cap = GPU["hbm_bandwidth"], GPU["hbm_bytes"]
    rows = []
    for label, p in (("1B", 1e9), ("7B", 7e9)):
        model_step = 6 * p * PAPER["tokens"] * m / (PAPER["mfu"] * GPU["bf16_flops"])
        for storage, b in (("fp32", 4), ("bf16", 2)):
            traj = k * p * b
            for gpus in (1, g):
                per_gpu_traj = traj / gpus
                # Engine state per GPU: W/G buffer (M rows, fp32) and the model in bf16 with a bf16
                # gradient, all sharded like the trajectory on several GPUs (FSDP); activations not counted.
                engine = (m * p * 4 + 2 * p * 2) / gpus
                fits = per_gpu_traj + engine <= cap
                passes = 2 * per_gpu_traj  # bytes read per GPU per step
                rows.append([label, storage, gpus, human_bytes(traj), human_bytes(per_gpu_traj + engine),
                             "yes" if fits else "no", human_bytes(passes), human_seconds(passes / bw) if fits else "-",
                             human_seconds(passes / HOST_LINK), human_seconds(passes / NVME),
                             human_seconds(model_step / gpus)])
    header = ["model", "storage", "GPUs", "trajectory (k=100)", "per-GPU: trajectory + W/G + bf16 model & grad",
              "fits in 80 GB HBM", "bytes read per GPU per step", "passes from HBM", "passes from host RAM (PCIe)",
              "passes from NVMe (mmap)", f"model part ({m} fwd+bwd, {PAPER['tokens']:,} tokens)"]
    notes = [
        f"Assumptions (constants at the top of `benchmarks/make_performance_doc.py`): {GPU['name']}, "
        f"{GPU['hbm_bandwidth'] / 1e12:.2f} TB/s HBM and {GPU['hbm_bytes'] / 1e9:.0f} GB per GPU; "
        f"{HOST_LINK / 1e9:.0f} GB/s per GPU from pinned host memory (PCIe 5.0 x16); {NVME / 1e9:.0f} GB/s per GPU from "
        f"one NVMe drive; M={m} samples; the model part is 6·P·tokens·M FLOPs at {PAPER['mfu']:.0%} of "
        f"{GPU['bf16_flops'] / 1e12:.0f} TFLOPS bf16, divided over the GPUs (data-parallel over the batch).",
        "Bytes per step are the cost model's two reads of the (k, P) matrix, 2·k·P·bytes, divided over the GPUs "
        "when the matrix is sharded along P (`sewa.distributed.ShardedTrajectory`); the all-reduce of the "
        "(M, k+1) mask gradient adds only M·(k+1)·8 bytes per step.",
    ]
    reading = []
    for label, p in (("1B", 1e9), ("7B", 7e9)):
        for storage, b in (("fp32", 4), ("bf16", 2)):
            need = k * p * b + m * p * 4 + 2 * p * 2
            min_gpus = math.ceil(need / cap)
            k_fit = {gpus: max(0, int((cap * gpus - m * p * 4 - 2 * p * 2) // (p * b))) for gpus in (1, g)}
            one = f"k <= {k_fit[1]} on one GPU" if k_fit[1] else "not on one GPU even without snapshots (W/G and model)"
            reading.append(f"{label} {storage}: needs {min_gpus} GPUs' HBM at k={k}; fits {one}, k <= {k_fit[g]} on {g}.")
    for label, p in (("1B", 1e9),):
        t_pass = 2 * k * p * 2 / g / bw
        t_model = 6 * p * PAPER["tokens"] * m / (PAPER["mfu"] * GPU["bf16_flops"]) / g
        reading.append(f"Where it fits ({label}, bf16, {g} GPUs), the two passes take {human_seconds(t_pass)} per step against "
                       f"{human_seconds(t_model)} for the model part: memory, not bandwidth, is the constraint.")
    return (table(header, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n\n"
            + "\n".join(f"- {r}" for r in reading))


def build(main: list[dict[str, Any]], others: dict[str, list[dict[str, Any]]], perf_dir: Path) -> str:
    pts = points(main)
    perf_dir.mkdir(parents=True, exist_ok=True)
    plot_split(pts, perf_dir / "step_split.png")
    plot_scaling(main, perf_dir / "scaling.png")
    plot_naive(pts, perf_dir / "naive.png")
    m = machine_of(main)
    grid_note = {
        "quick": "The default `quick` grid subsamples the full grid (k ∈ {10, 50, 100, 200}, P ∈ {1e5, 1e6, 1e7}, "
                 "M ∈ {1, 4, 16}, fp32/bf16 = 72 points) along three lines through the key point k=100, P=1e6, M=4: "
                 "k at P=1e6, M=4; P at k=100, M=4; M at k=100, P=1e6; plus bfloat16 storage at k=100, M=4. "
                 "The naive peer runs where it takes seconds, not minutes (P <= 1e6). `--grid full` runs every point "
                 "that fits in memory.",
        "full": "The full grid: every combination whose trajectory fits in 35% of RAM.",
    }.get(m.get("grid", ""), "")
    parts = [
        "# Performance of SeWA selection",
        "",
        "<!-- Generated by benchmarks/make_performance_doc.py from benchmarks/results/: do not edit by hand. -->",
        "",
        "Regenerate with `python benchmarks/selection.py && python benchmarks/make_performance_doc.py`.",
        "",
        "Measured on this project's CPU machine. The same step on one H100 (up to P=1e8, bf16) is in "
        "[GPU.md](GPU.md), generated by `benchmarks/gpu.py`.",
        "",
        "## Where and how it was measured",
        "",
        section_machine(main, others),
        "",
        grid_note,
        "",
        "## Targets",
        "",
        section_targets(main, f"Measured at {m.get('threads', '?')} torch thread(s)"),
    ]
    for label, recs in others.items():
        parts += ["", section_targets(recs, f"The same grid at {label}"), "", section_points_short(points(recs))]
    parts += [
        "",
        "### Where the misses come from",
        "",
        section_misses(main),
        "",
        "## The cost model",
        "",
        "One step reads the (k, P) snapshot matrix Θ twice, `W = AΘ` for the M mixed parameter vectors and "
        "`∂L/∂A = GΘᵀ` for the mask gradient, and runs M forward/backward passes of the model. The **floor** of a "
        "step is `2·k·P·bytes_per_element / bandwidth` plus the measured time of M plain forward/backward passes of "
        "the `nn.Module` at fixed weights on the same batch. **Bandwidth** is a 256 MiB float32 tensor copy in the "
        "same process, counted as STREAM counts it: bytes read plus bytes written per second. The step is timed "
        "from the Gumbel masks to `∂loss/∂φ` (what `sewa.select` does per step, minus the optimiser update and "
        "the budget projection). Times are medians over interleaved rounds.",
        "",
        "The model is an MLP 64-h-h-10 (ReLU) with h chosen so that its parameter count is closest to P; batch 256, "
        "cross-entropy. The naive peer builds, for each of the M samples, `w = Σ_i a_i θ_i` per parameter tensor "
        "in a Python loop over per-checkpoint state dicts under autograd, calls `torch.func.functional_call`, "
        "and backpropagates one sample at a time (one graph alive); its gradient is checked against the engine's.",
        "",
        "## Results per point",
        "",
        "Times in milliseconds.",
        "",
        section_points(pts),
        "",
        "![step split](perf/step_split.png)",
        "",
        "![naive](perf/naive.png)",
        "",
        "### Growth in k and P",
        "",
        section_slopes(main),
        "",
        "![scaling](perf/scaling.png)",
        "",
        "The whole step cannot grow linearly in k: its model part does not depend on k. The target's slope applies "
        "to the part that reads the snapshots (the matrix passes) in k, and to the whole step in P (both the "
        "passes and the MLP's compute are proportional to P).",
        "",
        "### Peak memory",
        "",
        "Peak memory is the growth of the measuring process's peak resident set size (`getrusage` `ru_maxrss`) "
        "from just before the model is built to after two steps, in a fresh process per point, after one warm-up "
        "step of every code path on a tiny problem (so torch's lazily loaded pieces are not counted). It "
        "includes the caller's model, the trajectory, the engine and the model's activations. The last column "
        "also allows the activations and workspace of one plain forward/backward of the model (measured in the "
        "same process before the trajectory is built): a model cost the target's \"3 model copies\" may not "
        "cover when the batch is large against the model.",
        "",
        section_memory(main),
        "",
        "## Making it fast",
        "",
        "What changed in `src/sewa/_engine.py`, each measured below:",
        "",
        "1. **The model's M passes run as a plain loop on CPU** (`vectorize=None` now means a loop on CPU, vmap "
        "elsewhere): the private model's parameters are pointed at the rows of W (`param.data = view`) and "
        "`loss.backward()` produces G, with no `torch.func` transform. Models that this cannot drive (recorded "
        "buffers that are used, wrapped or hooked parameters, dtypes other than W's) use `functional_call`.",
        "2. **The vmapped function is built once** instead of per step (`vmap(grad_and_value(...))`).",
        "3. **W and G share one (M, P) buffer reused across steps**: G_j is written over W_j once sample j is done; "
        "the private model copy's own parameter values are freed at construction (every pass replaces them); the "
        "1/M of the mean is applied to the (M, k) result instead of the (M, P) gradient.",
        "4. **Recorded BatchNorm statistics are left out on batch statistics** (a fix found by the tests: they "
        "were passed in with `requires_grad` and `native_batch_norm` raised).",
        "",
        "Kept as they were, after measuring the alternatives below: one matrix product per pass for float32 "
        "storage; chunked widening of compact storage into a reused float32 scratch of 4 MiB.",
        "",
        "### Before and after (same process, interleaved)",
        "",
        "'Before' is `src/sewa/_engine.py` at commit `" + "074604c" + "`, loaded from git by the benchmark.",
        "",
        section_compare(main),
        "",
        section_memory_compare(main),
        "",
        "### Threads",
        "",
        "The key point at the other thread count, in its own process (the grid above ran at "
        f"{m.get('threads', '?')}). On this shared 2-core machine an OpenMP parallel region waits until both "
        "threads are scheduled; with other processes running that can cost milliseconds per operation, whatever "
        "its size (see the tiny model's passes in the candidates at 2 threads). Times at 2 threads here measure the "
        "machine's contention more than the code, which is why the grid runs at 1 thread. The thread count "
        "`sewa.select` uses by default follows from the measurement in [Thread count](#thread-count) below.",
        "",
        section_threads(main),
        "",
        "### Candidates",
        "",
        "Each table times the variants in interleaved rounds of one process; ms, median over rounds (and the "
        "minimum, less sensitive to the machine's other load).",
        "",
        section_candidates(main),
        "",
        "## Selection cost in real terms",
        "",
        "SeWA's whole selection (all steps, default settings of each task) as a fraction of one training epoch of "
        "the same task, on the same machine. Target: at most one epoch. The benchmark writes the demo's row "
        "(`sewa.demo` defaults, one seed); experiment tasks add rows by dropping JSON files with the keys "
        f"{', '.join(f'`{k}`' for k in COST_KEYS)} into `benchmarks/results/`.",
        "",
        section_cost(main),
        "",
        "## Scale on paper",
        "",
        "What the cost model predicts for a 1B- and a 7B-parameter model with k=100 snapshots, on one GPU and on "
        "8 GPUs with the trajectory sharded along P. Computed from the formulas, not measured.",
        "",
        scale_on_paper(),
        "",
        "Rows marked \"no\" need one of: bfloat16 storage (halves the matrix), sharding over "
        "more GPUs, fewer snapshots, or keeping the matrix in host memory or on disk (`sewa.disk.DiskTrajectory` "
        "memory-maps it) and streaming it through the GPU twice per step, at the PCIe or NVMe column's cost. "
        "The engine today copies its (shard of the) matrix to the compute device once "
        "(`MixedLoss(..., device=...)`), so on GPUs it needs the HBM column to say \"yes\"; streaming from host "
        "memory or disk is a change to `Columns.mix_into`/`Columns.grad` in `src/sewa/_columns.py` (chunks are already "
        "the unit for compact storage) "
        "that these figures price.",
        "",
    ]
    return "\n".join(parts)


def experiment_cost_rows() -> list[dict[str, Any]]:
    """Selection cost of the experiment runs (``results/experiments/TASK[/REGIME]/PRESET/seed*.json``),
    one row per task, regime and preset, averaged over seeds."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    folders: dict[tuple[str, str, str], str] = {}
    for path in sorted((ROOT / "results" / "experiments").rglob("seed*.json")):
        rec = json.loads(path.read_text())
        key = (rec["task"], rec.get("regime") or "", rec["preset"])
        groups.setdefault(key, []).append(rec)
        folders[key] = path.parent.relative_to(ROOT).as_posix() + "/"
    rows = []
    for key, recs in sorted(groups.items()):
        task, regime, preset = key
        c = [r["compute"] for r in recs]
        cfg = recs[0]["config"]
        rows.append({"task": f"experiment {task}{' ' + regime if regime else ''} ({preset}, {len(recs)} seeds)",
                     "window": recs[0]["window"], "samples": cfg["sel_samples"], "steps": cfg["sel_steps"],
                     "epoch_seconds": sum(x["epoch_seconds"] for x in c) / len(c),
                     "selection_seconds": sum(x["selection_seconds"] for x in c) / len(c),
                     "file": folders[key]})
    return rows


def section_distributed() -> str:
    """Time per step and communication for 1, 2 and 4 gloo processes (benchmarks/distributed.py)."""
    path = RESULTS / "distributed.jsonl"
    if not path.exists():
        return "## Distributed selection\n\n(no `benchmarks/results/distributed.jsonl` yet: run `python benchmarks/distributed.py`)\n"
    from distributed import render

    return render(read_jsonl(path))


def section_thread_count() -> str:
    """Time of ``sewa.select`` by thread count, idle and busy (benchmarks/threads.py)."""
    path = RESULTS / "threads.json"
    if not path.exists():
        return "## Thread count\n\n(no `benchmarks/results/threads.json` yet: run `python benchmarks/threads.py`)\n"
    from threads import render

    return render(json.loads(path.read_text())) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=RESULTS / "selection.jsonl")
    parser.add_argument("--also", type=Path, nargs="*", default=None,
                        help="more JSON-lines files of the grid (default: selection_1thread.jsonl if present)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = parser.parse_args(argv)
    main_records = read_jsonl(args.input)
    also = args.also if args.also is not None else [p for p in [RESULTS / "selection_1thread.jsonl"] if p.exists()]
    others = {}
    for path in also:
        recs = read_jsonl(path)
        others[f"{machine_of(recs).get('threads', '?')} torch thread(s) (`{path.name}`)"] = recs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(build(main_records, others, args.out.parent / "perf") + "\n" + section_distributed() + "\n"
                        + section_thread_count())
    print(f"wrote {args.out} and {args.out.parent / 'perf'}/*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
