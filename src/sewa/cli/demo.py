"""``sewa demo``: train a small model on noisy digits and compare every method."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ._common import CliError, formatter, wrap


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo", parents=[common], formatter_class=formatter, help="train a small model on noisy digits and compare every method",
        description=wrap("Train an MLP on scikit-learn's digits with label noise and a high constant learning rate, record the final "
                         "stage of training, run every averaging method on it, and write a report folder."),
        epilog="example:\n  sewa demo --seeds 3 --out sewa-report      # under a minute on 2 CPU cores\n"
               "  sewa demo --fast --out /tmp/quick --force  # about 15 s, for a smoke test")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="runs with seeds 0..N-1, reported as mean ± std (default 3; 1 with --fast)")
    p.add_argument("--out", type=Path, default=Path("sewa-report"), metavar="DIR", help="report folder (default: sewa-report)")
    p.add_argument("--force", action="store_true", help="overwrite the report files of an existing --out folder")
    p.add_argument("--fast", action="store_true", help="shorter training and selection (for tests)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="K: checkpoints averaged by LAWA, random-K and SeWA (default 10; 5 with --fast)")
    p.add_argument("--window", type=int, default=None, metavar="k", help="k: snapshots recorded at the end of training (default 60; 20 with --fast)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: bars only on a terminal)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo
    from ..report import format_table, write_report
    from ._common import cleanup_on_failure, progress

    changes = {k: v for k, v in (("seeds", args.seeds), ("top_k", args.top_k), ("window", args.window)) if v is not None}
    config = DemoConfig.fast(**changes) if args.fast else DemoConfig(**changes)
    config.check()
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out} exists and is a file, not a folder")
    if args.out.exists() and not args.force:
        raise CliError(f"report folder {args.out} exists; pass --force to overwrite its report files, or choose another --out")
    start = time.perf_counter()
    results = run_demo(config, progress=progress(args))
    results["argv"] = ["sewa", *sys.argv[1:]] if Path(sys.argv[0]).name == "sewa" else ["sewa", "demo", *_argv(args)]
    with cleanup_on_failure(args.out):
        write_report(results, args.out, force=True)
    print(format_table(results))
    print(f"\nSeWA selection took {results['sewa_fraction_of_epoch']:.1f}x the time of one training epoch "
          f"({results['selection_time']['SeWA selection seconds (mean over runs)']:.2f} s).")
    print(f"report: {args.out / 'report.md'} (demo took {time.perf_counter() - start:.0f} s)")
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, value in (("--seeds", args.seeds), ("--top-k", args.top_k), ("--window", args.window)):
        if value is not None:
            out += [flag, str(value)]
    if args.fast:
        out.append("--fast")
    return out + ["--out", str(args.out)]
