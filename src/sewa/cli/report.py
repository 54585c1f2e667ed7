"""``sewa report``: turn a results JSON into report.md and plots."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import formatter, wrap


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "report", parents=[common], formatter_class=formatter, help="turn a results JSON into report.md and plots",
        description=wrap("Write report.md, results.json and PNG plots from a results file of sewa compare, sewa demo, "
                         "sewa select --json or one experiment run; or, given a folder of experiment runs, the results "
                         "document with its statistics (RESULTS.md, plots and summary.json, as docs/RESULTS.md is made)."),
        epilog="examples:\n  sewa report results/exp1.json --out results/exp1-report\n"
               "  sewa report results/experiments --out /tmp/results    # RESULTS.md, plots, summary.json")
    p.add_argument("results", type=Path, help="a results file (sewa compare --json, sewa select --json, an experiment run) "
                                              "or a folder of experiment runs")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="report folder (default: RESULTS without .json, plus -report)")
    p.add_argument("--force", action="store_true", help="overwrite the report files of an existing folder")
    p.add_argument("--allow-mixed", action="store_true", help="(a folder of runs) render task-regimes whose runs come "
                                                             "from several commits, flagged")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report import format_table, load_results, write_report
    from ._common import cleanup_on_failure

    out = args.out if args.out is not None else args.results.with_name(args.results.stem + "-report")
    if args.results.is_dir():
        return _runs_folder(args, out)
    results = load_results(args.results)
    with cleanup_on_failure(out):
        write_report(results, out, force=args.force, results_path=args.results)
    print(format_table(results))
    print(f"report: {out / 'report.md'}")
    return 0


def _runs_folder(args: argparse.Namespace, out: Path) -> int:
    """The results document of a folder of experiment runs (what docs/RESULTS.md is made by)."""
    from ..experiments.results import render
    from ._common import CliError, cleanup_on_failure

    if out.exists() and not args.force:
        raise CliError(f"report folder {out} exists; pass --force to overwrite its report files, or choose another --out")
    with cleanup_on_failure(out):
        path = render(args.results, out, out / "summary.json", args.allow_mixed)
    print(f"report: {path}; summary: {out / 'summary.json'}")
    return 0
