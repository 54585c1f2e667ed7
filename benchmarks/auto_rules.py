"""How other choice rules would have done, from experiment runs whose auto candidates carry test
scores (issue 15).

Runs made from commit 4ee04d6 on score every candidate ``auto`` considered on the test split,
after the choice. This script re-applies choice rules to each run's record (the candidates'
scores on the selection split, their paired gaps to the best and their fold scores), looks up
the test metric of the candidate each rule picks, and compares it with the table's methods on
the same runs. Use it on development seeds, not on the seeds a results table is judged on::

    sewa experiment bbc_news --regime unstable-shard --first-seed 10 --seeds 10 --no-ablations \\
        --out results/auto_dev
    python benchmarks/auto_rules.py results/auto_dev/bbc_news/unstable-shard/full

It prints a Markdown table and, with ``--doc``, writes it into docs/AUTO.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "AUTO.md"
BEGIN, END = "<!-- auto_rules: begin (python benchmarks/auto_rules.py DIR --doc) -->", "<!-- auto_rules: end -->"
TABLE = ("last", "uniform", "suffix", "sewa", "learned_soup", "greedy_soup")


FITTED = ("sewa", "greedy_soup", "learned_soup", "shrunk")


def pick(info: dict[str, Any], rule: str, multiple: float = 1.0, prefer: str = "simple") -> dict[str, Any]:
    """The candidate a rule picks: "best" (highest score), "paired"/"classic" one-SE rules within
    ``multiple`` SEs, "fixed"/"learned" (the best of the fixed rules, or of the fitted ones).
    ``prefer`` orders the candidates within noise: "simple" and "fitted" as ``sewa.auto``'s
    settings of those names (without the loss tie-break), "fitted + loss tie-break" as its
    default, "fitted, uniform at 0.5 SE" (uniform kept only within 0.5 SE of the best) and
    "fitted first" (the best fitted candidate within noise even when uniform is too)."""
    cands = info["candidates"]
    best = max(cands, key=lambda c: c["score"])
    if rule == "best":
        return best
    if rule in ("fixed", "learned"):
        pool = [c for c in cands if (c["family"] in ("tail", "ema")) == (rule == "fixed")]
        return max(pool or cands, key=lambda c: c["score"])

    def within(c: dict[str, Any]) -> bool:
        if c is best:
            return True
        if rule == "paired":
            se = c["gap_to_best"]["se"]
            return se is not None and c["gap_to_best"]["mean"] <= multiple * se
        gap = sum(b - x for b, x in zip(best["fold_scores"], c["fold_scores"], strict=True)) / len(c["fold_scores"])
        return best["se"] is not None and gap <= multiple * best["se"]

    ok = [c for c in cands if within(c)]
    fitted = [c for c in ok if c["family"] in FITTED]
    kept = any(c["name"] == "uniform" for c in ok)
    if prefer == "fitted + loss tie-break" and kept:  # sewa.auto's loss_tie_break=True
        gaps = [c.get("loss_gap_to_uniform") or {"mean": 0.0, "se": None} for c in fitted]  # recorded on a metric objective
        kept = not any(g["se"] is not None and g["mean"] > multiple * g["se"] for g in gaps)
    elif prefer == "fitted, uniform at 0.5 SE" and kept:  # uniform kept only within 0.5 SE of the best
        u = next(c for c in ok if c["name"] == "uniform")
        kept = u is best or u["gap_to_best"]["mean"] <= 0.5 * u["gap_to_best"]["se"]
    elif prefer == "fitted first":  # uniform gets no precedence
        kept = False
    if prefer != "simple" and fitted and not kept:
        return max(fitted, key=lambda c: c["score"])
    return min(ok, key=lambda c: (c["complexity"], -c["score"]))


def study(folder: Path) -> dict[str, Any]:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("seed*.json"))]
    runs = [r for r in runs if all("test" in c for c in r["methods"]["auto"].get("candidates", [{}]))]
    if not runs:
        raise SystemExit(f"no runs with scored auto candidates under {folder} (they come from commit 4ee04d6 on)")
    rules = {"classic 1 SE": ("classic", 1.0, "simple"), "paired 1 SE": ("paired", 1.0, "simple"),
             "paired 1.5 SE": ("paired", 1.5, "simple"), "paired 2 SE": ("paired", 2.0, "simple"),
             "paired 1.5 SE, prefer fitted (no loss tie-break)": ("paired", 1.5, "fitted"),
             "paired 1.5 SE, fitted first (uniform not preferred)": ("paired", 1.5, "fitted first"),
             "paired 1.5 SE, fitted, uniform kept within 0.5 SE": ("paired", 1.5, "fitted, uniform at 0.5 SE"),
             "best score": ("best", 0.0, "simple"),
             "best fixed rule": ("fixed", 0.0, "simple"), "best fitted candidate": ("learned", 0.0, "simple")}
    scale = 100.0 if runs[0]["family"] != "bc" else 1.0
    if all("uniform_kept" in r["methods"]["auto"] for r in runs):  # from commit bc9f008 on
        rules["paired 1.5 SE, fitted + loss tie-break (default)"] = ("paired", 1.5, "fitted + loss tie-break")
    rows = {}
    for label, (rule, mult, prefer) in rules.items():
        got = [pick(r["methods"]["auto"], rule, mult, prefer)["test"]["test_metric"] * scale for r in runs]
        rows[label] = {"test": got}
    rows["oracle candidate"] = {"test": [max(c["test"]["test_metric"] for c in r["methods"]["auto"]["candidates"]) * scale
                                         for r in runs]}
    if all("refit" in r["methods"]["auto"].get("settings", {}) for r in runs):
        # auto as it ran: a fitted choice refitted on the whole split (the rows above use the
        # candidates' half fits)
        rows["auto as run (with its refit)"] = {"test": [r["methods"]["auto"]["test_metric"] * scale for r in runs]}
    table = {m: [r["methods"][m]["test_metric"] * scale for r in runs] for m in TABLE}
    return {"folder": str(folder), "task": runs[0]["task"], "regime": runs[0]["regime"], "seeds": [r["seed"] for r in runs],
            "commits": sorted({r["git_commit"][:10] for r in runs}), "rules": rows, "table": table}


def render(data: dict[str, Any]) -> str:
    head = ["rule", "test (mean)", *(f"vs {m}" for m in ("uniform", "sewa", "learned_soup"))]
    lines = [BEGIN, "", f"{data['task']} — {data['regime']}, seeds {data['seeds'][0]}–{data['seeds'][-1]} "
             f"(commit {', '.join(data['commits'])}; `{data['folder']}`): the test metric of the candidate each rule "
             "picks (a fitted candidate as scored: the mean of its two half fits), and its paired difference to the "
             "table's methods on the same runs (95% t interval).", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, row in data["rules"].items():
        t = row["test"]
        diffs = [bench.mean_ci([a - b for a, b in zip(t, data["table"][m], strict=True)]) for m in ("uniform", "sewa", "learned_soup")]
        lines.append(f"| {label} | {sum(t) / len(t):.2f} | " + " | ".join(diffs) + " |")
    for m, t in data["table"].items():
        lines.append(f"| table: {m} | {sum(t) / len(t):.2f} | | | |")
    return "\n".join(lines + ["", END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a folder of seed*.json runs (one task-regime)")
    parser.add_argument("--doc", action="store_true", help="write the table into docs/AUTO.md")
    args = parser.parse_args()
    data = study(args.folder)
    text = render(data)
    print(text)
    if args.doc:
        bench.write_generated(DOC, text, BEGIN, END, heading="\n## Choice rules on development seeds\n\n")


if __name__ == "__main__":
    main()
