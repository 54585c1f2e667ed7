"""``sewa average``: average checkpoints with one method and write the state dict."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ..methods import METHODS
from ._common import CliError, evaluating_methods, finish, formatter, task_args, wrap

log = logging.getLogger("sewa")


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    learning = evaluating_methods()
    plain = [m for m in METHODS if m not in learning]
    p = sub.add_parser(
        "average", parents=[common], formatter_class=formatter, help="average checkpoints with one method",
        description=wrap(f"Average checkpoints with one method and write the state dict as safetensors. {', '.join(plain)} "
                         f"need no task; {', '.join(learning)} evaluate averages and need --task. With --task, BatchNorm "
                         "statistics are recomputed on 'train'; without it they are averaged like the weights."),
        epilog="examples:\n  sewa average --checkpoints runs/exp1/ --method lawa --top-k 5 --out averaged/exp1-lawa5.safetensors\n"
               "  sewa average --checkpoints runs/exp1/*.pt --method uniform --out averaged/exp1-swa.safetensors\n"
               "  sewa average --task task.py --checkpoints runs/exp1/ --method greedy_soup --out averaged/soup.safetensors")
    task_args(p, task_required=False)
    p.add_argument("--method", required=True, metavar="NAME", help=", ".join(METHODS))
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="the averaged state dict (.safetensors)")
    finish(p, list(METHODS), run, force='overwrite an existing --out')


def run(args: argparse.Namespace) -> int:
    from ..average import average
    from ..compare import averaged_model, check_top_k
    from ..io import save_state_dict, trajectory_from_files
    from . import _common as c

    method = c.build(args.method, args)
    c.apply_run_args(args)
    if method.evaluates and args.task is None:
        plain = [m for m in METHODS if m not in evaluating_methods()]
        raise CliError(f"method {method.name!r} evaluates averaged models and needs --task; "
                       f"the methods that need no task are {', '.join(plain)}")
    c.check_output(args.out, "--out", args.checkpoints, [], args.force, suffix=".safetensors")
    files = c.order(args.checkpoints)
    c.check_output(args.out, "--out", args.checkpoints, files, args.force)
    if method.top_k is not None:
        check_top_k(method.top_k, len(files))
    if args.task is not None:
        needs = [(args.objective, "to select checkpoints")] if method.evaluates else []
        task, traj, _ = c.load_for_task(args, files, needs)
        evaluator = task.evaluator(args.objective, "to select checkpoints", progress=c.progress(args)) if method.evaluates else None
        result = method.weights(traj, evaluator)
        state = averaged_model(task, traj, result.weights).state_dict()
    else:
        traj = trajectory_from_files(files)
        result = method.weights(traj)
        state = average(traj, result.weights)
        if any(name.endswith(("running_mean", "running_var")) for name in state):
            log.warning("note: BatchNorm statistics were averaged like the weights; pass --task to recompute them on 'train'")
    chosen = [i for i, w in enumerate(result.weights.tolist()) if w > 0]
    meta = {"format": "pt", "sewa": json.dumps({"method": method.name, "settings": dict(method.settings),
                                                "weights": result.weights.tolist(), "checkpoints": c.relative_names(files)})}
    with c.cleanup_on_failure(args.out):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_state_dict(state, args.out, overwrite=args.force, metadata=meta)
    print(f"{method.name}: averaged {len(chosen)} of {len(files)} checkpoints (steps {[traj.steps[i] for i in chosen]})")
    print(f"wrote {args.out}")
    return 0
