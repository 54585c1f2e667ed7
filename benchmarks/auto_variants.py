"""Variants of ``auto`` against the table's SeWA and learned soup on development seeds (issue 15).

Each seed of a classification experiment is trained once, exactly as ``sewa experiment`` trains
it (same spec, regime and selection split); then every ``--variant`` of ``auto`` (its settings
over the runner's) runs on that trajectory, next to the table's SeWA(K=10) and learned soup, and
each average is scored on the test split. It prints, per variant, the mean test metric and the
paired difference to the first variant (95% t interval), and writes every seed's figures to
``--out``. Use it on development seeds only (BBC News and AG News: 10-19): the results tables
are judged on seeds 0-9 and 20 on::

    python benchmarks/auto_variants.py bbc_news --regime unstable-shard --seeds 10-19 \\
        --variant 'default={}' --variant 'fraction 0.1={"sewa_fraction": 0.1}' --out results/auto_dev/variants.json

``--doc RECORD...`` renders recorded runs' tables into docs/AUTO.md instead (no training).

Behaviour cloning is not supported: its test metric comes from rollouts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

from sewa import methods as M  # noqa: E402
from sewa.compare import environment  # noqa: E402
from sewa.experiments import runner  # noqa: E402
from sewa.experiments import tasks as T  # noqa: E402
from sewa.experiments.results import _seed_list  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "AUTO.md"
BEGIN = "<!-- auto_variants: begin (python benchmarks/auto_variants.py --doc RECORD...) -->"
END = "<!-- auto_variants: end -->"


def trained(task: str, regime: str, seed: int) -> dict[str, Any]:
    """The window, the selection split's evaluator and the scorer of one seed, trained by the
    experiment runner itself (:func:`sewa.experiments.runner.train`)."""
    t = runner.train(task, "full", seed, regime=regime, progress=False)
    return {"traj": t.main, "ev": t.task.evaluator("val", "for auto's variants"), "spec": t.spec, "score": t.score}


def methods(t: dict[str, Any], seed: int, variants: dict[str, dict[str, Any]]) -> dict[str, M.Method]:
    """auto's variants, each the runner's auto with some settings changed, and the table's SeWA
    and learned soup, all as the runner makes them."""
    table, _ = runner.plan(len(t["traj"]), t["spec"], seed, t["ev"], t["traj"])
    out = {name: table["auto"].replace(**over) for name, over in variants.items()}
    return out | {"table sewa": table["sewa"], "table learned_soup": table["learned_soup"]}


def seeds_of(text: str) -> list[int]:
    """``"10-19"`` or ``"10,12,15"``."""
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def table_of(record: dict[str, Any], source: str) -> str:
    """A recorded comparison as Markdown: each method's mean test metric, its paired difference to
    the first variant (95% t interval) and its mean seconds, under a line naming the runs."""
    seeds = list(record["seeds"].values())
    names = list(seeds[0])
    first = names[0]
    rows = []
    for name in names:
        diffs = [r[name]["test"] - r[first]["test"] for r in seeds]
        rows.append([name, f"{sum(r[name]['test'] for r in seeds) / len(seeds):.2f}", "—" if name == first else bench.mean_ci(diffs),
                     f"{sum(r[name]['seconds'] for r in seeds) / len(seeds):.1f}"])
    settings = "; ".join(f"{n}: `{json.dumps(v)}`" for n, v in record["variants"].items())
    head = (f"{record['task']} — {record['regime']}, seeds {_seed_list(sorted(int(k) for k in record['seeds']))} (commit {record['git_commit'][:10]}"
            f"{', dirty' if record['dirty'] else ''}; `{source}`). auto's settings over the runner's: {settings}.")
    return (head + "\n\n" + bench.table(["method", "test (mean)", f"vs {first}", "seconds"], rows) + by_choice(seeds, first, names)
            + changed_picks(seeds, first, names))


def by_choice(seeds: list[dict[str, Any]], first: str, names: list[str]) -> str:
    """The first variant's seeds grouped by what it chose (a SeWA set by its K, else the
    candidate's family), each group's mean test difference to the table's methods."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in seeds:
        chosen = r[first]["chosen"] or "?"
        groups.setdefault(chosen if chosen.startswith("sewa_top") else chosen.split("(")[0], []).append(r)
    tables = [n for n in names if n.startswith("table ")]
    parts = [f"{c} on {len(rs)}: " + ", ".join(f"{sum(r[first]['test'] - r[t]['test'] for r in rs) / len(rs):+.2f} vs {t}" for t in tables)
             for c, rs in sorted(groups.items(), key=lambda g: -len(g[1]))]
    return f"\n\nBy {first}'s choice (seeds; mean test difference): " + "; ".join(parts) + "."


def changed_picks(seeds: list[dict[str, Any]], first: str, names: list[str]) -> str:
    """For each other variant, on how many seeds it chose differently from the first, and the
    range of its test differences on those seeds."""
    parts = []
    for name in names[1:]:
        if name.startswith("table "):
            continue
        diffs = [r[name]["test"] - r[first]["test"] for r in seeds if r[name]["chosen"] != r[first]["chosen"]]
        span = f" (test difference {min(diffs):+.2f} to {max(diffs):+.2f})" if diffs else ""
        parts.append(f"{name} on {len(diffs)} of {len(seeds)}{span}")
    return f"\n\nPicks that differ from {first}'s: " + "; ".join(parts) + "." if parts else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("task", nargs="?", choices=[n for n, s in T.SPECS.items() if s.family != "bc"])
    p.add_argument("--regime", default="constant")
    p.add_argument("--seeds", help="development seeds: 10-19 or 10,12,15")
    p.add_argument("--variant", action="append", metavar="NAME=JSON",
                   help="auto's settings over the runner's, e.g. 'fraction 0.1={\"sewa_fraction\": 0.1}' (first: the reference)")
    p.add_argument("--out")
    p.add_argument("--doc", nargs="+", metavar="RECORD", help="write these records' tables into docs/AUTO.md, and train nothing")
    args = p.parse_args()
    if args.doc:
        tables = [table_of(json.loads(Path(f).read_text()), f) for f in args.doc]
        bench.write_generated(DOC, "\n\n".join([BEGIN] + tables + [END]), BEGIN, END)
        return
    if not (args.task and args.seeds and args.variant and args.out):
        p.error("a task, --seeds, --variant and --out are needed to train (or --doc RECORD... to render)")
    bench.set_threads(1)
    variants = {}
    for v in args.variant:
        name, _, settings = v.partition("=")
        try:
            variants[name] = json.loads(settings or "{}")
        except json.JSONDecodeError as e:
            p.error(f"--variant {v!r}: the settings after the first '=' must be a JSON object ({e}); names hold no '='")
        if not isinstance(variants[name], dict):
            p.error(f"--variant {v!r}: the settings must be a JSON object, e.g. {{\"sewa_fraction\": 0.1}}")
    env = environment()
    record: dict[str, Any] = {"task": args.task, "regime": args.regime, "variants": variants, "git_commit": env["git_commit"],
                              "dirty": env["dirty"], "machine": bench.machine(), "seeds": {}}
    for seed in seeds_of(args.seeds):
        t = trained(args.task, args.regime, seed)
        row = {}
        for name, method in methods(t, seed, variants).items():
            start = time.perf_counter()
            result = method.weights(t["traj"], t["ev"])
            row[name] = {"test": 100 * t["score"].average(t["traj"], result.weights)["test_metric"],
                         "seconds": time.perf_counter() - start, "chosen": result.info.get("chosen")}
        record["seeds"][seed] = row
        print(seed, json.dumps({k: (round(v["test"], 2), v["chosen"]) for k, v in row.items()}), flush=True)
        bench.write_json(args.out, record)
    print("\n" + table_of(json.loads(Path(args.out).read_text()), args.out))


if __name__ == "__main__":
    main()
