"""Reports from results files: a Markdown summary, a results table and three plots.

A results file is what ``sewa compare --json`` writes (one run: a top-level ``"methods"``
object), what ``sewa demo`` and the experiments write (``"runs"``: a list of such runs, one
per seed), or what ``sewa select --json`` writes (format ``"sewa.select/1"``: one method's
entry with the run's set-up beside it; read as a run with that one method). Multi-run numbers
are reported as mean ± sample standard deviation over runs. The metric is called by the name
the task gave it (``metric_name``).

Plots (PNG, drawn with matplotlib's Agg canvas, so no display and no global backend change):

- ``selection_probabilities.png``: SeWA's learned probability of every checkpoint against its
  step, with the chosen top-K marked;
- ``selection_loss_tau.png``: the selection loss and the temperature tau per selection step;
- ``test_metric.png``: the test metric (and loss) of every method, bars with error bars over runs
  (not drawn for a selection file, which holds one method).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._report_auto import auto_markdown, plot_auto_weights, steps_of

__all__ = ["load_results", "runs_of", "is_selection", "summarise", "format_table", "markdown", "write_report", "PLOTS",
           "SELECTION_FORMAT"]

# The "format" of what `sewa select --json` writes.
SELECTION_FORMAT = "sewa.select/1"

PLOTS = {
    "selection_probabilities.png": "SeWA's selection probability of each checkpoint (chosen top-K marked)",
    "selection_loss_tau.png": "Selection loss and temperature tau per selection step",
    "test_metric.png": "Test metric and loss of every method (mean ± std over runs)",
    "auto_weights.png": "The weights auto chose over the window (first run)",
}


# --------------------------------------------------------------------------- reading
def load_results(path: str | Path) -> dict[str, Any]:
    """Reads and checks a results file written by ``sewa compare``, ``sewa demo``, ``sewa select
    --json`` or an experiment."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    try:
        results = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a JSON file ({e})") from e
    if not isinstance(results, dict):
        raise ValueError(f"{path} holds a JSON {type(results).__name__}, not a results object")
    runs_of(results, str(path))
    return results


def is_selection(results: dict[str, Any]) -> bool:
    """Whether ``results`` is what ``sewa select --json`` wrote (one method, no ``"methods"``)."""
    return str(results.get("format", "")).startswith("sewa.select/")


def runs_of(results: dict[str, Any], source: str = "results") -> list[dict[str, Any]]:
    """The runs of a results dict: its ``"runs"`` list, or the dict itself for one run. A
    selection file is one run whose ``"methods"`` hold its one method."""
    if is_selection(results):
        if results["format"] != SELECTION_FORMAT:
            raise ValueError(f"{source} has format {results['format']!r}; this sewa reads {SELECTION_FORMAT!r}: "
                             "render it with the sewa version that wrote it")
        runs = [{**results, "methods": {str(results.get("method") or "sewa"): results}}]
    else:
        runs = results.get("runs", [results])
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{source} has an empty 'runs' list")
    for i, run in enumerate(runs):
        methods = run.get("methods") if isinstance(run, dict) else None
        if not isinstance(methods, dict) or not methods:
            where = f"run {i} of {source}" if "runs" in results else source
            raise ValueError(f"{where} has no 'methods' object: it is not a results file from sewa compare, sewa demo "
                             "or sewa select --json")
        for name, entry in methods.items():
            # A method that failed has null scores and an "error"; one with its own training run
            # (the experiments' swa_lr) has no weights over this window.
            if not isinstance(entry, dict) or "test_loss" not in entry:
                raise ValueError(f"method {name!r} in {source} lacks 'test_loss'")
    return runs


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def summarise(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method (in the order of the first run): mean and std over runs of the test metric,
    test loss, number of checkpoints averaged and the method's seconds."""
    runs = runs_of(results)
    out: dict[str, dict[str, Any]] = {}
    for name in runs[0]["methods"]:
        entries = [run["methods"][name] for run in runs if name in run["methods"]]
        row: dict[str, Any] = {"runs": len(entries)}
        for key in ("test_metric", "test_loss", "num_averaged", "seconds"):
            values = [e.get(key) if key != "num_averaged" else e.get(key, _count(e)) for e in entries]
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(values)
        out[name] = row
    return out


def _count(entry: dict[str, Any]) -> int | None:
    weights = entry.get("weights")
    return None if weights is None else sum(1 for w in weights if w > 0)


# --------------------------------------------------------------------------- tables
def _fmt(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "n/a"
    text = f"{mean:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _metric_name(results: dict[str, Any]) -> str | None:
    run = runs_of(results)[0]
    if all(e.get("test_metric") is None for e in run["methods"].values()):
        return None
    return results.get("metric_name") or run.get("metric_name") or "metric"


def _split(results: dict[str, Any]) -> str:
    return str(results.get("split") or runs_of(results)[0].get("split") or "test")


def _rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    metric = _metric_name(results)
    split = _split(results)
    header = ["method"] + ([f"{split} {metric}"] if metric else []) + [f"{split} loss", "# averaged", "selection s"]
    rows = []
    for name, row in summarise(results).items():
        cells = [name]
        if metric:
            cells.append(_fmt(row["test_metric_mean"], row["test_metric_std"]))
        cells.append(_fmt(row["test_loss_mean"], row["test_loss_std"]))
        averaged = row["num_averaged_mean"]
        cells.append("n/a" if averaged is None else f"{averaged:g}" if row["num_averaged_std"] in (None, 0.0) else f"{averaged:.1f}")
        cells.append(_seconds(row["seconds_mean"]))
        rows.append(cells)
    return header, rows


def format_table(results: dict[str, Any]) -> str:
    """The results table as aligned plain text (for the terminal)."""
    header, rows = _rows(results)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    runs = runs_of(results)
    if len(runs) > 1:
        lines.append(f"(mean ± std over {len(runs)} runs)")
    return "\n".join(lines)


def _markdown_table(results: dict[str, Any]) -> str:
    header, rows = _rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _bullets(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [f"- {k}: {v}" for k, v in value.items()]
    if isinstance(value, list):
        return [f"- {v}" for v in value]
    return [f"- {value}"]


def markdown(results: dict[str, Any], images: Sequence[str] = ()) -> str:
    """The Markdown report: set-up, results table, SeWA's choice, machine, plots."""
    runs = runs_of(results)
    first = runs[0]
    command = results.get("command") or ("select" if is_selection(results) else "compare")
    title = results.get("title") or f"sewa {command}: {results.get('task', first.get('task', ''))}".rstrip(": ")
    out = [f"# {title}", ""]
    if results.get("description"):
        out += [str(results["description"]), ""]
    out += ["## Set-up", ""]
    if results.get("data") is not None:
        out += ["**Data**", "", *_bullets(results["data"]), ""]
    if results.get("training") is not None:
        out += ["**Training**", "", *_bullets(results["training"]), ""]
    if results.get("notes"):
        out += ["**Why these settings**", "", *_bullets(results["notes"]), ""]
    steps = first.get("checkpoint_steps") or []
    seeds = [run.get("seed") for run in runs]
    setup = {
        "task": results.get("task", first.get("task")),
        "checkpoints (k)": f"{len(first.get('checkpoints', steps))}" + (f", steps {steps[0]} to {steps[-1]}" if steps else ""),
        "top-K": first.get("top_k"),
        "seeds": ", ".join(str(s) for s in seeds),
        "selection": f"on {first.get('objective', 'val')!r}, {_setting(first, 'samples')} mask samples x {_setting(first, 'steps')} steps",
        "evaluated on": repr(_split(results)),
        "BatchNorm statistics": "recomputed on 'train' for every averaged model" if first.get("batchnorm_recomputed") else "the model has no BatchNorm layers",
    }
    out += ["**Averaging**", "", *_bullets({k: v for k, v in setup.items() if v is not None}), ""]
    out += ["## Results", "", _markdown_table(results), ""]
    if len(runs) > 1:
        out += [f"Mean ± sample standard deviation over {len(runs)} runs (seeds {setup['seeds']}).", ""]
    out += ["`selection s` is the time the method took to choose its weights (evaluation of the averaged model excluded).", ""]
    for run in runs:
        for name, entry in run["methods"].items():
            if "indices" not in entry or (name != "sewa" and not is_selection(results)):
                continue
            steps = run.get("checkpoint_steps") or []
            chosen = [steps[i] for i in entry["indices"]] if len(steps) == len(entry.get("weights") or []) else entry["indices"]
            label = "SeWA" if name == "sewa" else name
            out.append(f"- {label} (seed {run.get('seed')}) chose the checkpoints at steps {chosen}.")
    out.append("")
    for run in runs:
        out += auto_markdown(run)
    if results.get("selection_time"):
        out += ["**Selection time**", "", *_bullets(results["selection_time"]), ""]
    env = results.get("environment") or first.get("environment") or {}
    if env:
        machine = {
            "platform": env.get("platform"),
            "CPUs": f"{env.get('cpu_count')} ({env.get('usable_cpus')} usable, torch threads {env.get('torch_threads')})",
            "python / torch / sewa": f"{env.get('python')} / {env.get('torch')} / {env.get('sewa')}",
            "git commit": env.get("git_commit") or "not available",
        }
        out += ["## Machine", "", *_bullets(machine), ""]
    if results.get("argv"):
        out += ["## Reproduce", "", "```", " ".join(results["argv"]), "```", ""]
    if images:
        out += ["## Plots", ""]
        for name in images:
            caption = _caption(name, results)
            out += [f"![{caption}]({name})", "", f"*{caption}.*", ""]
    return "\n".join(out).rstrip() + "\n"


def _setting(run: dict[str, Any], key: str) -> Any:
    """A selection setting from the run, else from SeWA's own settings (a selection file)."""
    if run.get(key) is not None:
        return run[key]
    return ((run["methods"].get("sewa") or {}).get("settings") or {}).get(key)


def _caption(image: str, results: dict[str, Any]) -> str:
    """The plot's caption, with the metric called by its name."""
    if image != "test_metric.png":
        return PLOTS.get(image, image)
    metric = _metric_name(results)
    what = f"{_split(results).capitalize()} {metric} and loss" if metric else f"{_split(results).capitalize()} loss"
    return f"{what} of every method (mean ± std over runs)"


# --------------------------------------------------------------------------- plots
def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_selection(run: dict[str, Any], path: Path) -> bool:
    """SeWA's probabilities against checkpoint step, top-K marked. ``False`` if no SeWA entry."""
    sewa = run["methods"].get("sewa")
    if not sewa or "probabilities" not in sewa:
        return False
    probs = sewa["probabilities"]
    steps = steps_of(run, len(probs))
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(steps, probs, "o-", color="tab:blue", ms=3, lw=1, label="selection probability s")
    chosen = sewa.get("indices", [])
    ax.scatter([steps[i] for i in chosen], [probs[i] for i in chosen], s=60, facecolors="none",
               edgecolors="tab:red", linewidths=1.5, zorder=3, label=f"chosen top-{len(chosen)}")
    top_k = run.get("top_k") or len(chosen)
    if probs:
        ax.axhline(top_k / len(probs), color="gray", ls="--", lw=1, label=f"start K/k = {top_k}/{len(probs)}")
    ax.set_xlabel("training step of the checkpoint")
    ax.set_ylabel("selection probability")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"SeWA selection (seed {run.get('seed')})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_history(run: dict[str, Any], path: Path) -> bool:
    """Selection loss (raw and smoothed) and tau per step. ``False`` without a history."""
    history = (run["methods"].get("sewa") or {}).get("history") or {}
    loss, tau = history.get("loss") or [], history.get("tau") or []
    if not loss:
        return False
    fig = _figure()
    ax = fig.add_subplot()
    x = list(range(1, len(loss) + 1))
    ax.plot(x, loss, color="tab:blue", alpha=0.35, lw=1, label="loss (per step)")
    width = max(1, len(loss) // 20)
    smooth = [statistics.fmean(loss[max(0, i - width + 1) : i + 1]) for i in range(len(loss))]
    ax.plot(x, smooth, color="tab:blue", lw=2, label=f"loss (mean of last {width})")
    ax.set_xlabel("selection step")
    ax.set_ylabel(f"selection loss (on {run.get('objective', 'val')!r})", color="tab:blue")
    lines, labels = ax.get_legend_handles_labels()
    if tau:
        ax2 = ax.twinx()
        ax2.plot(list(range(1, len(tau) + 1)), tau, color="tab:orange", lw=1.5, label="tau")
        ax2.set_ylabel("temperature tau", color="tab:orange")
        more = ax2.get_legend_handles_labels()
        lines, labels = lines + more[0], labels + more[1]
    ax.legend(lines, labels, loc="upper right", fontsize=8)
    ax.set_title(f"SeWA selection loss and temperature (seed {run.get('seed')})")
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_methods(results: dict[str, Any], path: Path) -> bool:
    """Bars of the test metric (if any) and test loss per method, error bars over runs."""
    summary = summarise(results)
    names = list(summary)
    metric = _metric_name(results)
    split = _split(results)
    panels = ([("test_metric", f"{split} {metric} (higher is better)")] if metric else []) + [("test_loss", f"{split} loss (lower is better)")]
    fig = _figure(max(6.0, 1.0 + 0.8 * len(names)) * (1 if len(panels) == 1 else 1.6), 4.0)
    runs = len(runs_of(results))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        means = [summary[n][f"{key}_mean"] for n in names]
        stds = [summary[n][f"{key}_std"] or 0.0 for n in names]
        keep = [j for j, m in enumerate(means) if m is not None and math.isfinite(m)]
        xs = list(range(len(keep)))
        colors = ["tab:red" if names[j] == "sewa" else "tab:gray" for j in keep]
        ax.bar(xs, [means[j] for j in keep], yerr=[stds[j] for j in keep] if runs > 1 else None,
               color=colors, capsize=4, edgecolor="black", linewidth=0.5)
        ax.set_xticks(xs)
        ax.set_xticklabels([names[j] for j in keep], rotation=30, ha="right")
        if keep:
            # Differences between methods are small next to the values: zoom in, and say so.
            lo = min(means[j] - stds[j] for j in keep)
            hi = max(means[j] + stds[j] for j in keep)
            pad = 0.15 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-3
            ax.set_ylim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
        ax.set_ylabel(label + ("" if ax.get_ylim()[0] == 0 else ", axis not from 0"), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Averaging methods" + (f" (mean ± std over {runs} runs)" if runs > 1 else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return True


# --------------------------------------------------------------------------- writing
def write_report(results: dict[str, Any], out_dir: str | Path, *, force: bool = False,
                 results_path: str | Path | None = None) -> list[Path]:
    """Writes ``report.md``, ``results.json`` and the PNG plots into ``out_dir``.

    Args:
        results: A results dict (one run or ``"runs"``).
        out_dir: The report folder; created. An existing folder is an error unless ``force``
            (then its report files are overwritten; nothing else in it is touched).
        force: Overwrite the report files of an existing folder.
        results_path: Where the results were read from: not rewritten when it is
            ``out_dir/results.json``.

    Returns:
        The files written.
    """
    runs = runs_of(results)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"report folder {out} exists and is a file: choose another --out")
    if out.exists() and not force:
        raise FileExistsError(f"report folder {out} exists; pass --force to overwrite its report files, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    target = out / "results.json"
    if results_path is None or Path(results_path).resolve() != target.resolve():
        _write_text(target, json.dumps(results, indent=1) + "\n")
        written.append(target)
    images = []
    drawers = {
        "selection_probabilities.png": lambda p: plot_selection(runs[0], p),
        "selection_loss_tau.png": lambda p: plot_history(runs[0], p),
        "test_metric.png": lambda p: not is_selection(results) and plot_methods(results, p),
        "auto_weights.png": lambda p: plot_auto_weights(runs[0], p, _figure),
    }
    for name, draw in drawers.items():
        if draw(out / name):
            images.append(name)
            written.append(out / name)
    report = out / "report.md"
    _write_text(report, markdown(results, images))
    written.append(report)
    return written


def _write_text(path: Path, text: str) -> None:
    from .io import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(text))
