"""How many finalists and rollouts ``auto``'s judge needs, and when it should move the choice, from
behaviour-cloning development runs that judged every candidate (issue 15).

Run the development seeds with every candidate judged on 30 validation rollouts; each candidate
the judge saw is also rolled out on the test episodes, after the choice::

    sewa experiment hopper --preset full --first-seed 10 --seeds 5 --no-ablations \\
        --set judge_finalists=99 --set judge_episodes=30 --out results/judge_dev
    python benchmarks/judge_rules.py results/judge_dev/hopper/constant/full [more folders] [--doc]

This script replays the judge on each run's record with fewer finalists (taken in auto's order:
the split's choice, uniform, the last iterate, then the candidates within noise by score, then the
others) and fewer rollouts (the first E of the 30), and two rules for moving the choice: beyond
1.5 paired SEs (auto's ``se_multiple``) or to the best mean. It prints the test return of the
candidate each setting picks, its paired difference to the table's methods, and the judge's
estimated seconds next to the table's SeWA selection.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

TABLE = ("last", "uniform", "sewa", "learned_soup", "greedy_soup")
DOC = Path(__file__).resolve().parents[1] / "docs" / "AUTO.md"
BEGIN, END = "<!-- judge_rules: begin (python benchmarks/judge_rules.py DIR ... --doc) -->", "<!-- judge_rules: end -->"


def finalists(info: dict[str, Any], count: int, policy: str = "auto") -> list[str]:
    """The first ``count`` finalists in auto's order ("auto"), or with the best of each family
    first after the split's choice, uniform and the last iterate ("families")."""
    ranked = sorted(info["candidates"], key=lambda c: (not c["within_one_se"], -c["score"]))
    order = [info["judge"]["split_choice"], "uniform", "last"]
    if policy == "families":
        order += [next(c["name"] for c in ranked if c["family"] == f) for f in dict.fromkeys(c["family"] for c in ranked)]
    order += [c["name"] for c in ranked]
    names = {c["name"] for c in info["candidates"]}
    return [n for n in dict.fromkeys(order) if n in names][:count]


def pick(info: dict[str, Any], count: int, episodes: int, multiple: float, policy: str = "auto") -> str:
    """The judge's choice with ``count`` finalists on the first ``episodes`` units."""
    scores = {f["name"]: f["scores"][:episodes] for f in info["judge"]["finalists"]}
    names = [n for n in finalists(info, count, policy) if n in scores]
    first = info["judge"]["split_choice"]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    top = max(names, key=lambda n: mean(scores[n]))
    d = [a - b for a, b in zip(scores[top], scores[first], strict=True)]
    se = math.sqrt(sum((x - mean(d)) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else None
    return top if top != first and se is not None and mean(d) > multiple * se else first


def halving(info: dict[str, Any], budget: int, units: int) -> tuple[str, int]:
    """Successive halving over every candidate the judge scored (Karnin et al. 2013): ``ceil(log2 n)``
    rounds share ``budget`` unit evaluations; each round scores the survivors on new units, then
    keeps the better half by mean so far (ties: the split's score). Returns the choice and the
    units spent."""
    scores = {f["name"]: f["scores"] for f in info["judge"]["finalists"]}
    split = {c["name"]: c["score"] for c in info["candidates"]}
    alive = sorted(scores, key=lambda n: -split[n])
    rounds = max(1, math.ceil(math.log2(len(alive))))
    seen, spent = 0, 0
    for _ in range(rounds):
        more = max(1, budget // (rounds * len(alive)))
        more = min(more, units - seen)
        if more <= 0:
            break
        seen += more
        spent += more * len(alive)
        alive = sorted(alive, key=lambda n: (-sum(scores[n][:seen]) / seen, -split[n]))[:max(1, math.ceil(len(alive) / 2))]
    return alive[0], spent


def study(folder: Path) -> dict[str, Any]:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("seed*.json"))]
    runs = [r for r in runs if (r["methods"]["auto"].get("judge") or {}).get("finalists")
            and len(r["methods"]["auto"]["judge"]["finalists"]) == len(r["methods"]["auto"]["candidates"])]
    if not runs:
        raise SystemExit(f"no runs under {folder} whose judge scored every candidate (--set judge_finalists=99)")
    units = min(r["methods"]["auto"]["judge"]["units"] for r in runs)
    test = [{c["name"]: c["test"]["test_metric"] for c in r["methods"]["auto"]["candidates"]} for r in runs]
    per_episode = [r["methods"]["auto"]["judge"]["seconds"] / (len(r["methods"]["auto"]["judge"]["finalists"]) * r["methods"]["auto"]["judge"]["units"])
                   for r in runs]
    base = [r["methods"]["auto"]["seconds"] - r["methods"]["auto"]["judge"]["seconds"] for r in runs]
    sewa = [r["methods"]["sewa"]["seconds"] for r in runs]
    rows: dict[str, dict[str, Any]] = {"split's choice (no judge)": {
        "test": [t[r["methods"]["auto"]["judge"]["split_choice"]] for t, r in zip(test, runs, strict=True)], "cost": 0.0}}
    def judged(label: str, count: int, episodes: int, multiple: float, policy: str = "auto") -> None:
        got = [t[pick(r["methods"]["auto"], count, episodes, multiple, policy)] for t, r in zip(test, runs, strict=True)]
        n = [min(count, len(r["methods"]["auto"]["candidates"])) for r in runs]
        rows[label] = {"test": got, "cost": sum(s * k * episodes for s, k in zip(per_episode, n, strict=True)) / len(runs)}

    judged("6 finalists, 10 rollouts, beyond 1.5 SE", 6, 10, 1.5)
    for count in (3, 4, 6, 99):
        for episodes in sorted({6, 8, 10, units}):
            judged(f"{'all' if count == 99 else count} finalists, {episodes} rollouts, best mean"
                   + {(4, 8): " (the default)", (6, 10): " (the default before 4 x 8)"}.get((count, episodes), ""),
                   count, episodes, 0.0)
    judged("6 finalists by family, 10 rollouts, best mean", 6, 10, 0.0, "families")
    for budget in (60, 90):
        picks = [halving(r["methods"]["auto"], budget, units) for r in runs]
        got = [t[name] for t, (name, _) in zip(test, picks, strict=True)]
        cost = sum(s * spent for s, (_, spent) in zip(per_episode, picks, strict=True)) / len(runs)
        rows[f"successive halving, all candidates, {budget} rollouts"] = {"test": got, "cost": cost}
    rows["oracle candidate (test)"] = {"test": [max(t.values()) for t in test], "cost": None}
    table = {m: [r["methods"][m]["test_metric"] for r in runs] for m in TABLE}
    best = max(table, key=lambda m: sum(table[m]))
    return {"folder": str(folder), "task": runs[0]["task"], "regime": runs[0]["regime"], "seeds": [r["seed"] for r in runs],
            "commits": sorted({r["git_commit"][:10] for r in runs}), "rows": rows, "table": table, "best": best,
            "auto_without_judge_s": sum(base) / len(base), "sewa_s": sum(sewa) / len(sewa)}


def render(data: dict[str, Any]) -> str:
    vs = ("uniform", "last", data["best"])
    head = ["judge", "test (mean)", *(f"vs {m}" for m in vs), "auto s / SeWA's"]
    lines = [f"{data['task']} — {data['regime']}, seeds {data['seeds'][0]}–{data['seeds'][-1]} (commit "
             f"{', '.join(data['commits'])}; `{data['folder']}`): the test return (D4RL-normalised) of the candidate each "
             f"setting picks, its paired difference to the table's methods (95% t interval; {data['best']} is the best of "
             f"them here), and auto's time with that judge (auto without it: {data['auto_without_judge_s']:.1f} s; "
             f"SeWA: {data['sewa_s']:.1f} s).", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, row in data["rows"].items():
        t = row["test"]
        diffs = [bench.mean_ci([a - b for a, b in zip(t, data["table"][m], strict=True)]) for m in vs]
        ratio = "" if row["cost"] is None else f"{(data['auto_without_judge_s'] + row['cost']) / data['sewa_s']:.2f}"
        lines.append(f"| {label} | {sum(t) / len(t):.2f} | " + " | ".join(diffs) + f" | {ratio} |")
    for m, t in data["table"].items():
        lines.append(f"| table: {m} | {sum(t) / len(t):.2f} | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="folders of seed*.json runs (one task-regime each)")
    parser.add_argument("--doc", action="store_true", help="write the tables into docs/AUTO.md")
    args = parser.parse_args()
    text = "\n\n".join(render(study(folder)) for folder in args.folders)
    print(text)
    if args.doc:
        bench.write_generated(DOC, "\n".join([BEGIN, "", text, "", END]), BEGIN, END,
                              heading="\n## The judge on behaviour-cloning development seeds\n\n")


if __name__ == "__main__":
    main()
