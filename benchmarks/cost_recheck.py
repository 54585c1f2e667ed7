"""auto's time against SeWA's on some of a table's seeds: as the table measured it, and as a
recheck of the same seeds measured it (run again, e.g. alone on an idle machine).

Both ratios are measured in one process (auto and the default SeWA selection run in the same
experiment), so they compare across machines and loads; what differs is what else the machine
was doing. The recheck's seed records are written by ``sewa experiment`` as usual::

    sewa experiment walker2d --preset full --regime cosine --seeds 1 --first-seed 37 \\
        --no-ablations --threads 1 --out results/cost_recheck
    python benchmarks/cost_recheck.py results/experiments/walker2d/cosine/full \\
        results/cost_recheck/walker2d/cosine/full
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

from sewa.auto import COST_LIMIT  # noqa: E402


def _timing(rec: dict[str, Any]) -> dict[str, Any]:
    auto, sewa = rec["methods"]["auto"], rec["methods"]["sewa"]
    judge = (auto.get("judge") or {}).get("seconds")
    return {"ratio": auto["seconds"] / sewa["seconds"], "auto": auto["seconds"], "sewa": sewa["seconds"], "judge": judge,
            "platform": rec["machine"]["platform"], "commit": rec.get("git_commit"), "dirty": rec.get("dirty")}


def rows(table: Path, recheck: Path) -> list[dict[str, Any]]:
    """One row per seed record in ``recheck`` that ``table`` also holds, both timings side by side."""
    out = []
    for path in sorted(recheck.glob("seed*.json"), key=lambda p: int(p.stem[4:])):
        before = table / path.name
        if before.exists():
            out.append({"seed": int(path.stem[4:]), "table": _timing(json.loads(before.read_text())),
                        "recheck": _timing(json.loads(path.read_text()))})
    return out


def render(rs: list[dict[str, Any]]) -> str:
    def s(x: float | None) -> str:
        return "—" if x is None else f"{x:.1f}"

    lines = [bench.table(
        ["seed", "auto / SeWA, table", "auto / SeWA, recheck", "judge s, table", "judge s, recheck", "SeWA s, table",
         "SeWA s, recheck", "same machine type"],
        [(r["seed"], f"{r['table']['ratio']:.2f}", f"{r['recheck']['ratio']:.2f}", s(r["table"]["judge"]), s(r["recheck"]["judge"]),
          s(r["table"]["sewa"]), s(r["recheck"]["sewa"]), "yes" if r["table"]["platform"] == r["recheck"]["platform"] else "no")
         for r in rs])]
    over = {k: sum(r[k]["ratio"] > COST_LIMIT for r in rs) for k in ("table", "recheck")}
    commits = sorted({f"{r['recheck']['commit']}"[:10] + (" (dirty)" if r["recheck"]["dirty"] else "") for r in rs})
    lines.append(f"\nOver {COST_LIMIT:g}x: {over['table']} of {len(rs)} seeds in the table, {over['recheck']} of {len(rs)} in the "
                 f"recheck (from commit {', '.join(commits)}; on {rs[0]['recheck']['platform']}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table", type=Path, help="a table's seed records, e.g. results/experiments/walker2d/cosine/full")
    ap.add_argument("recheck", type=Path, help="the recheck's seed records for some of the same seeds")
    args = ap.parse_args(argv)
    rs = rows(args.table, args.recheck)
    if not rs:
        print(f"error: no seed record in {args.recheck} that {args.table} also holds", file=sys.stderr)
        return 2
    print(render(rs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
