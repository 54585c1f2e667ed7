"""The part of a report that explains ``auto``'s choice: the candidates' fold scores, the chosen
one with its window or K, the estimated gains over uniform and over the last iterate, and the
chosen weights over the window (issue 15's "explain the choice")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["auto_entry", "auto_markdown", "plot_auto_weights", "steps_of"]


_PREFER = {"simple": "the simplest", "fitted": "uniform if kept, else the best fitted candidate, else the simplest"}


def steps_of(run: dict[str, Any], n: int) -> list[Any]:
    """The training steps of a run's ``n`` checkpoints, or their positions when not recorded."""
    steps = run.get("checkpoint_steps") or []
    return list(steps) if len(steps) == n else list(range(n))


def auto_entry(run: dict[str, Any]) -> dict[str, Any] | None:
    """The run's ``auto`` entry when it holds the choice record, else ``None``."""
    entry = run["methods"].get("auto")
    return entry if entry and entry.get("candidates") else None


def _pm(value: dict[str, Any] | None, digits: int = 4) -> str:
    if not value or value.get("mean") is None:
        return "n/a"
    se = value.get("se")
    return f"{value['mean']:+.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def auto_markdown(run: dict[str, Any]) -> list[str]:
    """Markdown lines for the ``auto`` entry of one run (empty without one)."""
    entry = auto_entry(run)
    if entry is None:
        return []
    objective = entry.get("objective", "loss")
    score = "metric" if objective == "metric" else "minus the loss"
    judge = entry.get("judge")
    first = judge["split_choice"] if judge else entry.get("chosen")
    out = [f"### How `auto` chose (seed {run.get('seed')})", "",
           f"`auto` scored {len(entry['candidates'])} candidate averages on the selection split by {score} "
           f"(higher is better), over {entry.get('folds_used', '?')} folds"
           + (", cross-fitted (what learns on one half is scored on the other)" if entry.get("crossfit") else "") + ". "
           f"The best was `{entry.get('best')}`; it chose `{first}`"
           + (" among the candidates within noise of the best (" + _PREFER.get(entry.get("prefer", "simple"), "") + ")"
              if first != entry.get("best") else "") + "."
           + (" Uniform was within noise, but a fitted candidate within noise had a lower loss beyond noise, so "
              "the loss broke the tie." if entry.get("uniform_kept") is False and any(
                  c["name"] == "uniform" and c.get("within_one_se") for c in entry["candidates"]) else "")
           + (f" It then fitted `{entry['refitted']['of']}` again on the whole split." if entry.get("refitted") else "")
           + _judge_sentence(judge), "",
           f"- estimated gain over uniform: {_pm(entry.get('gain_vs_uniform'))}; over the last iterate: "
           f"{_pm(entry.get('gain_vs_last'))} (selection-split {score}, mean ± standard error over folds)",
           f"- chosen: {entry.get('chosen_params') or entry.get('chosen_window') or {}}",
           f"- forward / backward passes: {entry.get('forward_passes')} / {entry.get('backward_passes')}"
           + (f" (a default SeWA selection: {entry['sewa_default_passes']['forward']} / "
              f"{entry['sewa_default_passes']['backward']})" if entry.get("sewa_default_passes") else ""), "",
           "| candidate | score | fold scores | gap to best | within 1 SE |", "|---|---|---|---|---|"]
    for c in entry["candidates"]:
        folds = ", ".join(f"{v:.4f}" for v in c.get("fold_scores") or [])
        mark = " (chosen)" if c["name"] == entry.get("chosen") else ""
        out.append(f"| {c['name']}{mark} | {c['score']:.4f} ± {c.get('se') or 0:.4f} | {folds} | "
                   f"{_pm(c.get('gap_to_best'))} | {'yes' if c.get('within_one_se') else 'no'} |")
    if judge:
        out += ["", f"| finalist | {judge['name']} (mean ± SE) | gap to `{first}` |", "|---|---|---|"]
        out += [f"| {f['name']}{' (chosen)' if f['name'] == entry.get('chosen') else ''} | {f['mean']:.4g} ± {f.get('se') or 0:.2g} | "
                f"{_pm(f.get('gap_to_split_choice'), 3)} |" for f in judge["finalists"]]
    if entry.get("skipped"):
        out += ["", "Skipped: " + "; ".join(str(s) for s in entry["skipped"])]
    return out + [""]


def _judge_sentence(judge: dict[str, Any] | None) -> str:
    if not judge:
        return ""
    margin = judge.get("multiple") or 0
    rule = f"by more than {margin:g} paired SEs" if margin else "on the mean"
    verdict = (f"moved to `{judge['chosen']}`, which beat it {rule}" if judge["moved"]
               else f"kept it: no finalist beat it {rule}")
    return (f" The judge ({judge['name']}) then scored {len(judge['finalists'])} finalists on {judge['units']} units each "
            f"({judge['seconds']:.1f} s) and {verdict}; gain over uniform on the judge {_pm(judge.get('gain_vs_uniform'), 3)}, "
            f"over the last iterate {_pm(judge.get('gain_vs_last'), 3)}. The weights judged are returned as they are.")


def plot_auto_weights(run: dict[str, Any], path: Path, figure: Any) -> bool:
    """``auto``'s chosen weights against checkpoint step. ``False`` without an ``auto`` entry."""
    entry = auto_entry(run)
    if entry is None or not entry.get("weights"):
        return False
    w = entry["weights"]
    steps = steps_of(run, len(w))
    fig = figure()
    ax = fig.add_subplot()
    ax.bar(steps, w, width=max(1.0, (steps[-1] - steps[0]) / max(1, len(steps) - 1)) * 0.8, color="tab:purple")
    ax.set_xlabel("training step of the checkpoint")
    ax.set_ylabel("weight in the average")
    ax.set_title(f"auto chose {entry.get('chosen')} (seed {run.get('seed')})")
    fig.tight_layout()
    fig.savefig(path)
    return True
