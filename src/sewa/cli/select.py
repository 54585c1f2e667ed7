"""``sewa select``: learn which checkpoints to average (SeWA by default) and write the average."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ._common import TASK_EXAMPLE, evaluating_methods, finish, formatter, task_args, wrap


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    learning = evaluating_methods()
    p = sub.add_parser(
        "select", parents=[common], formatter_class=formatter, help="run SeWA (or another learning method) and write the averaged model",
        description=wrap("Learn which checkpoints to average with SeWA (or --method), average them, recompute BatchNorm "
                         "statistics on 'train' (when the model has BatchNorm layers) and write the averaged state dict as "
                         "safetensors."),
        epilog=TASK_EXAMPLE + "\nexample:\n  sewa select --task task.py --checkpoints runs/exp1/ --top-k 10 \\\n"
               "      --out averaged/exp1-sewa.safetensors --json averaged/exp1-sewa.json")
    task_args(p, task_required=True)
    p.add_argument("--method", default="sewa", choices=learning, help="the learning method (default sewa)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="the averaged state dict (.safetensors)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="also write what was learned and the test results (JSON)")
    finish(p, learning, run)


def run(args: argparse.Namespace) -> int:
    from ..compare import check_top_k, environment, evaluate_method
    from ..io import save_state_dict
    from . import _common as c

    c.apply_run_args(args)
    method = c.build(args.method, args)
    c.check_outputs_distinct(("--out", args.out), ("--json", args.json))
    if args.out.suffix != ".safetensors":
        c.check_output(args.out, "--out", args.checkpoints, [], args.force, suffix=".safetensors")
    files = c.order(args.checkpoints)
    for flag, path in (("--out", args.out), ("--json", args.json)):
        if path is not None:
            c.check_output(path, flag, args.checkpoints, files, args.force)
    if method.top_k is not None:
        check_top_k(method.top_k, len(files))
    task, traj, split = c.load_for_task(args, files, [(args.objective, f"to select checkpoints (--objective {args.objective})")])
    evaluator = task.evaluator(args.objective, "to select checkpoints", progress=c.progress(args))
    entry, model = evaluate_method(method, traj, evaluator, task, split)
    chosen = [i for i, w in enumerate(entry["weights"]) if w > 0]
    names = c.relative_names(files)
    with c.cleanup_on_failure(args.out, args.json):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt", "sewa": json.dumps({"method": method.name, "settings": dict(method.settings), "indices": chosen,
                                                    "weights": entry["weights"], "checkpoints": [names[i] for i in chosen]})}
        save_state_dict(model.state_dict(), args.out, overwrite=args.force, metadata=meta)
        if args.json is not None:
            out = dict(entry)
            out.update({"format": "sewa.select/1", "task": task.source, "metric_name": task.metric_name if task.metric else None,
                        "split": split, "objective": args.objective, "checkpoints": [str(f) for f in files],
                        "checkpoint_steps": traj.steps, "indices": chosen, "top_k": entry.get("top_k", method.top_k),
                        "seed": method.settings.get("seed"), "out": str(args.out), "environment": environment(),
                        "argv": ["sewa", *sys.argv[1:]]})
            c.write_json(args.json, out, args.force)
    metric = "" if entry["test_metric"] is None else f", {split} metric {entry['test_metric']:.4f}"
    print(f"{method.name} chose {len(chosen)} of {len(files)} checkpoints: {[files[i].name for i in chosen]}")
    print(f"{split} loss {entry['test_loss']:.4f}{metric}; selection {entry['seconds']:.2f} s")
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json is not None else ""))
    return 0
