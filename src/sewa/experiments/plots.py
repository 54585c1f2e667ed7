"""The plots of docs/RESULTS.md: per-task ranks, K-curves and the ablations (written as PNGs;
each function returns the Markdown that shows its figure)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import summary
from .summary import Key

__all__ = ["rank_plot", "k_curve_plot", "ablation_plots", "mean_std"]


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = math.fsum(xs) / len(xs)
    return m, (math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def _on(measure: str) -> str:
    """How a measure reads in the text."""
    return "test metric" if measure == "test_metric" else measure.replace("_", " ") + " (lower is better)"


def _title(key: Key) -> str:
    return f"{key[0]} — {key[1]} ({key[2]})"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int) -> tuple[Any, list[Any]]:
    plt = _pyplot()
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def rank_plot(entries: dict[Key, dict[str, Any]], out: Path) -> list[str]:
    """One panel per task-regime: each method's per-seed rank (dots) and mean rank (bar)."""
    shown = {k: e for k, e in sorted(entries.items()) if e["ranks"]}
    if not shown:
        return []
    fig, axes = _grid(len(shown))
    for ax, (key, e) in zip(axes, shown.items(), strict=False):
        names = list(e["ranks"])
        for i, n in enumerate(names):
            r = e["ranks"][n]
            ax.bar(i, mean_std(r)[0], color="tab:orange" if n in summary.CLAIMANTS else "tab:gray", alpha=0.5)
            ax.scatter([i + 0.08 * (j - len(r) / 2) / max(1, len(r)) for j in range(len(r))], r, s=8, color="k")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(len(names) + 0.5, 0.5)
        ax.set_ylabel("rank on test (1 = best)")
        ax.set_title(_title(key), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "ranks.png", dpi=80)
    _pyplot().close(fig)
    return ["Per-seed ranks on the test metric (dots) and mean rank (bars); SeWA and auto in orange.", "", "![ranks](ranks.png)", ""]


def k_curve_plot(entries: dict[Key, dict[str, Any]], out: Path) -> list[str]:
    """One panel per task-regime with K-curves: mean test metric against K."""
    shown = {k: e for k, e in sorted(entries.items()) if e["k_curves"] and len(e["k_curves"]["Ks"]) > 1}
    if not shown:
        return []
    fig, axes = _grid(len(shown))
    for ax, (key, e) in zip(axes, shown.items(), strict=False):
        kc = e["k_curves"]
        for s in (s for s in kc if s not in ("Ks", "measure")):
            pts = [(k, v) for k, v in zip(kc["Ks"], kc[s], strict=True) if v is not None]
            ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=s)
        ax.set_xscale("log")
        ax.set_xlabel("K (snapshots averaged)")
        ax.set_ylabel(_on(kc["measure"]))
        ax.set_title(_title(key), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "k_curves.png", dpi=80)
    _pyplot().close(fig)
    return ["![K-curves](k_curves.png)", ""]


def ablation_plots(groups: dict[Key, list[dict[str, Any]]], out: Path) -> list[str]:
    """One figure per task-regime with ablations; returns Markdown lines (summaries + images)."""
    plt = _pyplot()
    lines: list[str] = []
    for key, recs in sorted(groups.items()):
        recs = [r for r in recs if r.get("ablations")]
        if not recs:
            continue
        k = summary.UNITS[recs[0]["metric"]][1]
        ab = recs[0]["ablations"]
        fig, axes = _grid(len(ab))
        lines += [f"### Ablations: {_title(key)}, {len(recs)} seeds, SeWA K=10 unless varied", ""]
        for ax, name in zip(axes, ab, strict=False):
            rows = ab[name]
            labels = [str(row["value"]) for row in rows]
            if name == "convergence":
                series = [s for s in rows[0] if s not in ("value", "step")]
                steps = [row["step"] for row in rows]
                means = {s: [mean_std([r["ablations"][name][i][s] * k for r in recs])[0] for i in range(len(rows))] for s in series}
                for s in series:
                    ax.plot(steps, means[s], marker="o", label=s)
                ax.set_xlabel("training step at which averaging happens")
                ax.legend(fontsize=7)
                lines.append(f"- **{name}**: " + " · ".join(f"step {st}: " + ", ".join(f"{s} {means[s][i]:.2f}" for s in series)
                                                           for i, st in enumerate(steps)))
            else:
                ms = [mean_std([r["ablations"][name][i]["test_metric"] * k for r in recs]) for i in range(len(rows))]
                ax.errorbar(range(len(rows)), [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3)
                ax.set_xticks(range(len(rows)), labels)
                ax.set_xlabel(name)
                ran = [[r["ablations"][name][i].get("steps_run") for r in recs] for i in range(len(rows))]
                runs = [f" ({sum(x) / len(x):.0f} steps run)" if name == "patience" and None not in x else "" for x in ran]
                lines.append(f"- **{name}**: " + ", ".join(f"{lab} → {m:.2f} ± {s:.2f}{run}"
                                                           for lab, (m, s), run in zip(labels, ms, runs, strict=True)))
            ax.set_title(name)
            ax.set_ylabel(recs[0]["metric"])
        fig.suptitle(f"{_title(key)}: SeWA ablations, mean ± std over {len(recs)} seeds")
        fig.tight_layout()
        png = "ablations_" + "_".join(key) + ".png"
        fig.savefig(out / png, dpi=90)
        plt.close(fig)
        lines += ["", f"![ablations {key[0]}]({png})", ""]
    return lines or ["No run in these tables carries ablations yet: `sewa experiment NAME --regime constant --ablations` "
                     "adds them (window size, where the window sits, tau, M, steps, objective, budget, split size, noise, patience, knots, "
                     "one batch or the whole split per step, "
                     "choice by metric or loss).", ""]
