"""What a rerun of a results table changed: its seed records now against the same files at an
earlier commit.

A table is rerun whole when auto's defaults change (every seed from one clean commit). On the
machine type that ran a seed before, training is deterministic (``--threads 1``), so every
method but auto reproduces its test metric to the bit and auto's change is the new defaults'
alone; on another machine type the floating-point reductions differ, the trajectory is a new
sample and only the table as a whole compares. This script says which case each seed is in and
gives auto's paired difference (95% t interval) on the seeds where the others reproduced::

    python benchmarks/rerun_diff.py results/experiments/walker2d/constant/full --before 2b5a1d6

``--land SRC`` first puts a rerun in place: SRC holds the new seed records (``sewa experiment
... --out DIR`` writes them to DIR/TASK/REGIME/PRESET), the same seeds as the table, all from one
clean commit without ``--set`` overrides; they replace the table's files, and the comparison is
against ``--before`` (default HEAD, the table as committed)::

    for s in $(seq 0 9) $(seq 20 29); do sewa experiment hopper --preset full --regime cosine --seeds 1 \
        --first-seed $s --no-ablations --out /tmp/rerun; done  # every seed of the table
    python benchmarks/rerun_diff.py results/experiments/hopper/cosine/full --land /tmp/rerun/hopper/cosine/full
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

from sewa.experiments.stats import t_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _before(path: Path, commit: str, root: Path) -> dict[str, Any] | None:
    rel = path.resolve().relative_to(root.resolve()).as_posix()
    shown = subprocess.run(["git", "-C", str(root), "show", f"{commit}:{rel}"], capture_output=True, text=True)
    return json.loads(shown.stdout) if shown.returncode == 0 else None


def rows(folder: Path, commit: str, root: Path = ROOT) -> list[dict[str, Any]]:
    """One row per seed record in ``folder`` that also exists at ``commit`` in the repository at ``root``."""
    out = []
    for path in sorted(folder.glob("seed*.json"), key=lambda p: int(p.stem[4:])):
        old, new = _before(path, commit, root), json.loads(path.read_text())
        if old is None:
            continue
        moved = sorted(m for m in old["methods"] if m != "auto" and old["methods"][m].get("test_metric") != new["methods"].get(m, {}).get("test_metric"))
        out.append({"seed": new["seed"], "same_machine": old["machine"]["platform"] == new["machine"]["platform"], "moved": moved,
                    "auto": (old["methods"]["auto"]["test_metric"], new["methods"]["auto"]["test_metric"]),
                    "chosen": (old["methods"]["auto"].get("chosen"), new["methods"]["auto"].get("chosen"))})
    return out


def land(src: Path, folder: Path) -> str:
    """Copy a rerun's seed records over the table's, after checking that they can replace it whole:
    the same seeds and task-regime, one clean commit, no overrides. Returns that commit; raises
    ValueError naming what is wrong (nothing is copied then)."""
    def seeds(d: Path) -> dict[str, Path]:
        return {p.name: p for p in d.glob("seed*.json")}

    new, old = seeds(src), seeds(folder)
    if not new or new.keys() != old.keys():
        raise ValueError(f"{src} must hold the same seed records as {folder} (a rerun replaces the table whole); "
                         f"only in the rerun: {sorted(new.keys() - old.keys())}, only in the table: {sorted(old.keys() - new.keys())}")
    recs = {n: json.loads(p.read_text()) for n, p in new.items()}
    commits = {r.get("git_commit") for r in recs.values()}
    bad = sorted(n for n, r in recs.items() if r.get("dirty") is not False or r.get("overrides"))
    if len(commits) != 1 or bad:
        raise ValueError(f"a rerun must come from one clean commit without --set overrides: commits {sorted(map(str, commits))}, "
                         f"dirty or overridden: {bad}")
    for n, r in recs.items():
        was = json.loads(old[n].read_text())
        if (r["task"], r["regime"], r["preset"]) != (was["task"], was["regime"], was["preset"]):
            raise ValueError(f"{n}: the rerun is {r['task']}/{r['regime']}/{r['preset']}, the table "
                             f"{was['task']}/{was['regime']}/{was['preset']}")
    for n, p in new.items():
        shutil.copyfile(p, old[n])
    return str(commits.pop())


def render(rs: list[dict[str, Any]], scale: float) -> str:
    lines = [bench.table(["seed", "machine type", "other methods", "auto before", "auto now", "chosen before", "chosen now"],
                         [(r["seed"], "same" if r["same_machine"] else "other", f"{len(r['moved'])} moved" if r["moved"] else "identical",
                           f"{scale * r['auto'][0]:.2f}", f"{scale * r['auto'][1]:.2f}", r["chosen"][0], r["chosen"][1]) for r in rs])]
    paired = [scale * (r["auto"][1] - r["auto"][0]) for r in rs if not r["moved"]]
    if len(paired) >= 2:
        lo, hi = t_interval(paired)
        lines.append(f"\nAuto now minus before, on the {len(paired)} seeds whose other methods reproduced: "
                     f"{sum(paired) / len(paired):+.2f} [{lo:+.2f}, {hi:+.2f}] (95% t interval); "
                     f"{sum(d != 0 for d in paired)} of {len(paired)} seeds changed.")
    else:
        lines.append(f"\n{len(paired)} seeds reproduced the other methods: too few for a paired difference.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a table's seed records, e.g. results/experiments/hopper/cosine/full")
    ap.add_argument("--before", help="the commit whose version of those files to compare with (default with --land: HEAD)")
    ap.add_argument("--land", type=Path, metavar="SRC", help="first replace the table's seed records with a rerun's, from SRC")
    args = ap.parse_args(argv)
    before = args.before or ("HEAD" if args.land else None)
    if before is None:
        ap.error("--before is required without --land")
    if args.land:
        try:
            commit = land(args.land, args.folder)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"Landed {len(list(args.folder.glob('seed*.json')))} seed records from commit {commit[:10]}; "
              "regenerate the tables with `python -m sewa.experiments.results` and `python benchmarks/make_performance_doc.py`.\n")
    rs = rows(args.folder, before)
    if not rs:
        print(f"error: no seed records in {args.folder} that also exist at {before}", file=sys.stderr)
        return 2
    metric = json.loads(next(args.folder.glob("seed*.json")).read_text())["metric"]
    print(render(rs, 100.0 if metric == "accuracy" else 1.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
