"""``sewa report``: turn a results JSON into report.md and plots."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import formatter, wrap


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "report", parents=[common], formatter_class=formatter, help="turn a results JSON into report.md and plots",
        description=wrap("Write report.md, results.json and PNG plots from a results file of sewa compare, sewa demo or "
                         "sewa select --json."),
        epilog="example:\n  sewa report results/exp1.json --out results/exp1-report")
    p.add_argument("results", type=Path, help="a results file written by sewa compare --json (or sewa select --json)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="report folder (default: RESULTS without .json, plus -report)")
    p.add_argument("--force", action="store_true", help="overwrite the report files of an existing folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report import format_table, load_results, write_report
    from ._common import cleanup_on_failure

    results = load_results(args.results)
    out = args.out if args.out is not None else args.results.with_name(args.results.stem + "-report")
    with cleanup_on_failure(out):
        write_report(results, out, force=args.force, results_path=args.results)
    print(format_table(results))
    print(f"report: {out / 'report.md'}")
    return 0
