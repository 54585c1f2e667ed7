"""``sewa compare``: run every method on your checkpoints and evaluate each."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..methods import DEFAULT_METHODS, METHODS
from ._common import TASK_EXAMPLE, finish, formatter, task_args, wrap


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "compare", parents=[common], formatter_class=formatter, help="run every method on your checkpoints and evaluate each",
        description=wrap(f"Run averaging methods (default: {', '.join(DEFAULT_METHODS)}; all: {', '.join(METHODS)}) on the "
                         "given checkpoints, evaluate each averaged model on 'test' (or 'val' when the task has no test split), "
                         "and write the results as JSON. BatchNorm statistics are recomputed on 'train' for every averaged model."),
        epilog=TASK_EXAMPLE + "\nexample:\n  sewa compare --task task.py --checkpoints runs/exp1/ --top-k 10 \\\n"
               "      --json results/exp1.json --report results/exp1-report")
    task_args(p, task_required=True)
    p.add_argument("--methods", default=None, metavar="A,B,...", help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--json", type=Path, required=True, metavar="OUT.json", help="where to write the results (JSON)")
    p.add_argument("--report", type=Path, default=None, metavar="DIR", help="also write a report folder (report.md and plots)")
    finish(p, list(METHODS), run)


def run(args: argparse.Namespace) -> int:
    from ..compare import build_methods, check_methods, check_top_k, run_compare
    from ..report import format_table, write_report
    from . import _common as c

    c.apply_run_args(args)
    names = check_methods([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else DEFAULT_METHODS)
    settings = c.method_settings(args, names)
    c.check_outputs_distinct(("--json", args.json), ("--report", args.report))
    files = c.order(args.checkpoints)
    c.check_output(args.json, "--json", args.checkpoints, files, args.force)
    if args.report is not None:
        c.check_output(args.report, "--report", args.checkpoints, files, args.force, folder=True)
    methods = build_methods(names, **settings)
    for m in methods.values():
        if m.top_k is not None:
            check_top_k(m.top_k, len(files))
    task, traj, _ = c.load_for_task(args, files, [(args.objective, f"to select checkpoints (--objective {args.objective})")]
                                  if any(m.evaluates for m in methods.values()) else [])
    with c.cleanup_on_failure(args.json, args.report):
        results = run_compare(traj, task, methods=methods, objective=args.objective, checkpoints=[str(f) for f in files],
                              progress=c.progress(args), on_error="record")
        results["command"] = "compare"
        results["argv"] = ["sewa", *sys.argv[1:]]
        c.write_json(args.json, results, args.force)
        if args.report is not None:
            write_report(results, args.report, force=args.force, results_path=None)
    print(format_table(results))
    print(f"results: {args.json}" + (f"; report: {args.report / 'report.md'}" if args.report is not None else ""))
    failed = {label: e["error"] for label, e in results["methods"].items() if e.get("error")}
    for label, error in failed.items():
        print(f"sewa: error: method {label} failed: {error}", file=sys.stderr)
    return 1 if failed else 0
