"""What a rerun of a results table changed: its seed records now against the same files at an
earlier commit.

A table is rerun whole when auto's defaults change (every seed from one clean commit). On the
machine type that ran a seed before, training is deterministic (``--threads 1``), so every
method but auto reproduces its test metric to the bit and auto's change is the new defaults'
alone; on another machine type the floating-point reductions differ, the trajectory is a new
sample and only the table as a whole compares. This script says which case each seed is in and
gives auto's paired difference (95% t interval) on the seeds where the others reproduced::

    python benchmarks/rerun_diff.py results/experiments/walker2d/constant/full --before 2b5a1d6
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--before", required=True, help="the commit whose version of those files to compare with")
    args = ap.parse_args(argv)
    rs = rows(args.folder, args.before)
    if not rs:
        print(f"error: no seed records in {args.folder} that also exist at {args.before}", file=sys.stderr)
        return 2
    metric = json.loads(next(args.folder.glob("seed*.json")).read_text())["metric"]
    print(render(rs, 100.0 if metric == "accuracy" else 1.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
