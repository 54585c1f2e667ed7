"""The ``sewa`` command: ``demo``, ``compare``, ``select``, ``average`` and ``report``.

Every command checks its inputs before any long work starts, refuses to write over or next to
the input checkpoints, and reports a bad input as one line on stderr (``sewa: error: ...``,
exit status 2). ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "build_parser", "CliError"]

NO_TASK_METHODS = ("last", "uniform", "lawa", "ema", "random")
TOP_K_METHODS = ("lawa", "random", "sewa")

TASK_EXAMPLE = """\
A task file (the contract every post-hoc command uses):

  # task.py
  import torch
  from mytraining import Net, loaders          # your own code
  def model():                                 # a fresh model of the checkpoints' architecture
      return Net()
  def batches(split):                          # "train", "val", "test" ("test" is optional)
      return loaders[split]                    # an iterable of (inputs, targets) pairs
  def loss(outputs, targets):                  # a scalar tensor
      return torch.nn.functional.cross_entropy(outputs, targets)
  def metric(outputs, targets):                # optional, higher is better
      return (outputs.argmax(1) == targets).float().mean().item()
"""


class CliError(ValueError):
    """A bad command-line input."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other sewa error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=90)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``sewa`` argument parser with its five sub-commands."""
    from . import __version__

    parser = _Parser(prog="sewa", formatter_class=_formatter,
                     description=_wrap("Selective Weight Averaging: pick which checkpoints of a training run are worth averaging, and average them."),
                     epilog="examples:\n  sewa demo                       # a finished demo report in sewa-report/\n"
                            "  sewa compare --help             # every method on your own checkpoints")
    parser.add_argument("--version", action="version", version=f"sewa {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser(
        "demo", parents=[common], formatter_class=_formatter, help="train a small model on noisy digits and compare every method",
        description=_wrap("Train an MLP on scikit-learn's digits with label noise and a high constant learning rate, record the final "
                    "stage of training, run every averaging method on it, and write a report folder."),
        epilog="example:\n  sewa demo --seeds 3 --out sewa-report      # under a minute on 2 CPU cores\n"
               "  sewa demo --fast --out /tmp/quick --force  # about 15 s, for a smoke test")
    demo.add_argument("--seeds", type=int, default=None, metavar="N", help="runs with seeds 0..N-1, reported as mean ± std (default 3; 1 with --fast)")
    demo.add_argument("--out", type=Path, default=Path("sewa-report"), metavar="DIR", help="report folder (default: sewa-report)")
    demo.add_argument("--force", action="store_true", help="overwrite the report files of an existing --out folder")
    demo.add_argument("--fast", action="store_true", help="shorter training and selection (for tests)")
    demo.add_argument("--top-k", type=int, default=None, metavar="K", help="K: checkpoints averaged by LAWA, random-K and SeWA (default 10; 5 with --fast)")
    demo.add_argument("--window", type=int, default=None, metavar="k", help="k: snapshots recorded at the end of training (default 60; 20 with --fast)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    compare = sub.add_parser(
        "compare", parents=[common], formatter_class=_formatter, help="run every method on your checkpoints and evaluate each",
        description=_wrap("Run every registered averaging method (last, uniform, lawa, ema, random, greedy_soup, sewa) on the given "
                    "checkpoints, evaluate each averaged model on 'test' (or 'val' when the task has no test split), and write "
                    "the results as JSON. BatchNorm statistics are recomputed on 'train' for every averaged model."),
        epilog=TASK_EXAMPLE + "\nexample:\n  sewa compare --task task.py --checkpoints runs/exp1/ --top-k 10 \\\n"
               "      --json results/exp1.json --report results/exp1-report")
    _task_args(compare, task_required=True)
    compare.add_argument("--top-k", type=int, required=True, metavar="K", help="K: checkpoints averaged by LAWA, random-K and SeWA")
    _select_args(compare)
    compare.add_argument("--methods", default=None, metavar="A,B,...", help="comma-separated subset of methods (default: all registered defaults)")
    compare.add_argument("--json", type=Path, required=True, metavar="OUT.json", help="where to write the results (JSON)")
    compare.add_argument("--report", type=Path, default=None, metavar="DIR", help="also write a report folder (report.md and plots)")
    compare.add_argument("--force", action="store_true", help="overwrite existing outputs")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")
    compare.set_defaults(func=cmd_compare)

    select = sub.add_parser(
        "select", parents=[common], formatter_class=_formatter, help="run SeWA and write the averaged model",
        description=_wrap("Learn which checkpoints to average with SeWA, average the top-K, recompute BatchNorm statistics on 'train' "
                    "(when the model has BatchNorm layers) and write the averaged state dict as safetensors."),
        epilog=TASK_EXAMPLE + "\nexample:\n  sewa select --task task.py --checkpoints runs/exp1/ --top-k 10 \\\n"
               "      --out averaged/exp1-sewa.safetensors --json averaged/exp1-sewa.json")
    _task_args(select, task_required=True)
    select.add_argument("--top-k", type=int, required=True, metavar="K", help="K: checkpoints to average")
    _select_args(select)
    select.add_argument("--out", type=Path, required=True, metavar="FILE", help="the averaged state dict (.safetensors)")
    select.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="also write SeWA's probabilities, indices and test results (JSON)")
    select.add_argument("--force", action="store_true", help="overwrite existing outputs")
    select.add_argument("--no-progress", action="store_true", help="no progress bar")
    select.set_defaults(func=cmd_select)

    average = sub.add_parser(
        "average", parents=[common], formatter_class=_formatter, help="average checkpoints with one rule",
        description=_wrap("Average checkpoints with one method and write the state dict as safetensors. last, uniform, lawa, ema "
                    "and random need no task; greedy_soup, sewa and twa evaluate averages and need --task. With --task, "
                    "BatchNorm statistics are recomputed on 'train'; without it they are averaged like the weights."),
        epilog="examples:\n  sewa average --checkpoints runs/exp1/ --method lawa --top-k 5 --out averaged/exp1-lawa5.safetensors\n"
               "  sewa average --checkpoints runs/exp1/*.pt --method uniform --out averaged/exp1-swa.safetensors\n"
               "  sewa average --task task.py --checkpoints runs/exp1/ --method greedy_soup --out averaged/soup.safetensors")
    _task_args(average, task_required=False)
    average.add_argument("--method", required=True, metavar="NAME", help="last, uniform, lawa, ema, random, greedy_soup, sewa or twa")
    average.add_argument("--top-k", type=int, default=None, metavar="K", help="K for lawa, random and sewa")
    _select_args(average)
    average.add_argument("--out", type=Path, required=True, metavar="FILE", help="the averaged state dict (.safetensors)")
    average.add_argument("--force", action="store_true", help="overwrite an existing --out")
    average.set_defaults(func=cmd_average)

    report = sub.add_parser(
        "report", parents=[common], formatter_class=_formatter, help="turn a results JSON into report.md and plots",
        description=_wrap("Write report.md, results.json and PNG plots from a results file of sewa compare (or sewa demo)."),
        epilog="example:\n  sewa report results/exp1.json --out results/exp1-report")
    report.add_argument("results", type=Path, help="a results file written by sewa compare --json")
    report.add_argument("--out", type=Path, default=None, metavar="DIR", help="report folder (default: RESULTS without .json, plus -report)")
    report.add_argument("--force", action="store_true", help="overwrite the report files of an existing folder")
    report.set_defaults(func=cmd_report)
    _add_experiment(sub)
    return parser


def _add_experiment(sub: Any) -> None:
    """Registers ``sewa experiment`` from :mod:`sewa.experiments.command` when it imports."""
    try:
        from .experiments.command import add_parser
    except Exception:  # the experiments are optional: the other commands must keep working
        return
    add_parser(sub)


def _task_args(p: argparse.ArgumentParser, task_required: bool) -> None:
    p.add_argument("--task", required=task_required, default=None,
                   help="task file (path/to/task.py) or importable module defining model(), batches(split), loss() [, metric()]")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="FILE_OR_DIR",
                   help="checkpoint files (.safetensors/.pt/.pth/.bin) or directories of them, in any order")


def _select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of SeWA's mask noise and of random-K (default 0)")
    p.add_argument("--samples", type=int, default=4, metavar="M", help="SeWA mask samples per step, M (default 4)")
    p.add_argument("--steps", type=int, default=200, metavar="N", help="SeWA selection steps (default 200)")
    p.add_argument("--objective", choices=("val", "train"), default="val", help="split SeWA and greedy soup select on (default val)")
    p.add_argument("--ema-decay", type=float, default=0.9, metavar="D", help="EMA decay per checkpoint (default 0.9)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch (default: torch's choice)")


# --------------------------------------------------------------------------- input checks
def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise CliError(f"{flag} must be at least 1, got {value}")


def _check_select_args(args: argparse.Namespace) -> None:
    _positive(args.samples, "--samples")
    _positive(args.steps, "--steps")
    if not 0.0 <= args.ema_decay < 1.0:
        raise CliError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")
    if getattr(args, "top_k", None) is not None:
        _positive(args.top_k, "--top-k")
    _positive(args.threads, "--threads")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def _input_dirs(raw: Sequence[str], files: Sequence[Path] = ()) -> list[Path]:
    """Directories holding input checkpoints: given directories and the folders of given files."""
    dirs = {Path(p).resolve() if Path(p).is_dir() else Path(p).resolve().parent for p in raw}
    dirs |= {f.resolve().parent for f in files}
    return sorted(dirs)


def _check_inputs_exist(raw: Sequence[str]) -> None:
    for p in raw:
        if not Path(p).exists():
            raise FileNotFoundError(f"no checkpoint file or directory at {p}")


def _check_output(path: Path, flag: str, raw: Sequence[str], files: Sequence[Path], force: bool, *, folder: bool = False,
                  suffix: str | None = None) -> None:
    """Refuses an output over or beside the input checkpoints, an existing one without
    ``--force``, and one whose parent is not a directory."""
    target = path.resolve()
    inputs = {Path(p).resolve() for p in raw} | {f.resolve() for f in files}
    if target in inputs:
        raise CliError(f"{flag} {path} is one of the input checkpoints: sewa never writes over its inputs; choose another path")
    for d in _input_dirs(raw, files):
        if target == d or d in target.parents:
            raise CliError(f"{flag} {path} lies in the checkpoint directory {d}: sewa never writes next to the input "
                           "checkpoints; choose a path outside it")
    if suffix is not None and path.suffix != suffix:
        raise CliError(f"{flag} {path} must end in {suffix}")
    if path.exists():
        if folder and not path.is_dir():
            raise CliError(f"{flag} {path} exists and is a file, not a folder")
        if not folder and path.is_dir():
            raise CliError(f"{flag} {path} is a directory; give a file name")
        if not force:
            raise CliError(f"{flag} {path} exists; pass --force to overwrite it")
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CliError(f"{flag} {path}: {parent} is a file, not a directory")


def _check_outputs_distinct(*outputs: tuple[str, Path | None]) -> None:
    seen: dict[Path, str] = {}
    for flag, path in outputs:
        if path is None:
            continue
        key = path.resolve()
        if key in seen:
            raise CliError(f"{flag} and {seen[key]} are the same path {path}; give them different paths")
        seen[key] = flag


def _order(raw: Sequence[str]) -> list[Path]:
    from .io import order_checkpoints

    _check_inputs_exist(raw)
    return order_checkpoints(raw)


def _methods(spec: str | None) -> list[str]:
    from .compare import check_methods
    from .methods import DEFAULT_METHODS

    if spec is None:
        return list(DEFAULT_METHODS)
    return check_methods([m.strip() for m in spec.split(",") if m.strip()])


def _write_json(path: Path, data: dict[str, Any], force: bool) -> None:
    from .io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"), overwrite=force)


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False)


def _load_for_task(args: argparse.Namespace, files: list[Path], needs: Sequence[tuple[str, str]]) -> tuple[Any, Any, Any]:
    """Task, template model and trajectory, checked in order of cost (task, splits, checkpoints)."""
    from .bn import has_batchnorm
    from .io import trajectory_from_files
    from .task import load_task

    task = load_task(args.task)
    model = task.new_model()
    for split, why in needs:
        task.check(split, why)
    if has_batchnorm(model):
        task.check("train", "to recompute BatchNorm statistics of the averaged models")
    split = task.eval_split()
    traj = trajectory_from_files(files, model)
    traj.check_compatible(model)
    return task, traj, split


# --------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    """``sewa demo``."""
    from .demo import DemoConfig, run_demo
    from .report import format_table, write_report

    changes = {k: v for k, v in (("seeds", args.seeds), ("top_k", args.top_k), ("window", args.window)) if v is not None}
    config = DemoConfig.fast(**changes) if args.fast else DemoConfig(**changes)
    config.check()
    if args.out.exists() and not args.force:
        raise CliError(f"report folder {args.out} exists; pass --force to overwrite its report files, or choose another --out")
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out} exists and is a file, not a folder")
    start = time.perf_counter()
    results = run_demo(config, progress=_progress(args))
    results["argv"] = ["sewa", *sys.argv[1:]] if Path(sys.argv[0]).name == "sewa" else ["sewa", "demo", *_demo_argv(args)]
    write_report(results, args.out, force=True)
    print(format_table(results))
    print(f"\nSeWA selection took {results['sewa_fraction_of_epoch']:.1f}x the time of one training epoch "
          f"({results['selection_time']['SeWA selection seconds (mean over runs)']:.2f} s).")
    print(f"report: {args.out / 'report.md'} (demo took {time.perf_counter() - start:.0f} s)")
    return 0


def _demo_argv(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, value in (("--seeds", args.seeds), ("--top-k", args.top_k), ("--window", args.window)):
        if value is not None:
            out += [flag, str(value)]
    if args.fast:
        out.append("--fast")
    return out + ["--out", str(args.out)]


def cmd_compare(args: argparse.Namespace) -> int:
    """``sewa compare``."""
    from .compare import check_top_k, run_compare
    from .report import format_table, write_report

    _check_select_args(args)
    methods = _methods(args.methods)
    _check_inputs_exist(args.checkpoints)
    _check_outputs_distinct(("--json", args.json), ("--report", args.report))
    _check_output(args.json, "--json", args.checkpoints, [], args.force)
    if args.report is not None:
        _check_output(args.report, "--report", args.checkpoints, [], args.force, folder=True)
    files = _order(args.checkpoints)
    _check_output(args.json, "--json", args.checkpoints, files, args.force)
    if args.report is not None:
        _check_output(args.report, "--report", args.checkpoints, files, args.force, folder=True)
    check_top_k(args.top_k, len(files))
    task, traj, _ = _load_for_task(args, files, [(args.objective, f"to select checkpoints (--objective {args.objective})")])
    results = run_compare(traj, task, methods=methods, top_k=args.top_k, seed=args.seed, objective=args.objective,
                          samples=args.samples, steps=args.steps, ema_decay=args.ema_decay,
                          checkpoints=[str(f) for f in files], progress=_progress(args))
    results["command"] = "compare"
    results["argv"] = ["sewa", *sys.argv[1:]]
    _write_json(args.json, results, args.force)
    if args.report is not None:
        write_report(results, args.report, force=args.force, results_path=None)
    print(format_table(results))
    print(f"results: {args.json}" + (f"; report: {args.report / 'report.md'}" if args.report is not None else ""))
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    """``sewa select``."""
    from .compare import check_top_k, environment, evaluate_method
    from .io import save_state_dict
    from .methods import Context

    _check_select_args(args)
    _check_inputs_exist(args.checkpoints)
    _check_outputs_distinct(("--out", args.out), ("--json", args.json))
    for flag, path, suffix in (("--out", args.out, ".safetensors"), ("--json", args.json, None)):
        if path is not None:
            _check_output(path, flag, args.checkpoints, [], args.force, suffix=suffix)
    files = _order(args.checkpoints)
    for flag, path in (("--out", args.out), ("--json", args.json)):
        if path is not None:
            _check_output(path, flag, args.checkpoints, files, args.force)
    check_top_k(args.top_k, len(files))
    task, traj, split = _load_for_task(args, files, [(args.objective, f"to select checkpoints (--objective {args.objective})")])
    ctx = Context(traj, top_k=args.top_k, seed=args.seed, ema_decay=args.ema_decay, model=task.new_model(), loss_fn=task.loss,
                  batches=list(task.require(args.objective, "to select checkpoints")),
                  select_options={"samples": args.samples, "steps": args.steps, "progress": _progress(args)})
    entry, model = evaluate_method("sewa", ctx, task, split)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"sewa": json.dumps({"method": "sewa", "indices": entry["indices"], "checkpoints": [str(files[i]) for i in entry["indices"]]})}
    save_state_dict(model.state_dict(), args.out, overwrite=args.force, metadata=meta)
    if args.json is not None:
        out = dict(entry)
        out.update({"format": "sewa.select/1", "task": task.source, "metric_name": task.metric_name if task.metric else None,
                    "split": split, "objective": args.objective, "checkpoints": [str(f) for f in files],
                    "checkpoint_steps": traj.steps, "top_k": args.top_k, "seed": args.seed, "samples": args.samples,
                    "steps": args.steps, "out": str(args.out), "environment": environment(), "argv": ["sewa", *sys.argv[1:]]})
        _write_json(args.json, out, args.force)
    metric = "" if entry["test_metric"] is None else f", {split} metric {entry['test_metric']:.4f}"
    print(f"SeWA chose {len(entry['indices'])} of {len(files)} checkpoints: {[files[i].name for i in entry['indices']]}")
    print(f"{split} loss {entry['test_loss']:.4f}{metric}; selection {entry['seconds']:.2f} s")
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json is not None else ""))
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    """``sewa average``."""
    from .compare import averaged_model, check_top_k
    from .io import save_state_dict, trajectory_from_files
    from .methods import METHODS, NEEDS_EVALUATION, Context, run_method

    if args.method not in METHODS:
        raise CliError(f"unknown method {args.method!r}: choose from {', '.join(METHODS)}")
    _check_select_args(args)
    if args.method in TOP_K_METHODS and args.top_k is None:
        raise CliError(f"method {args.method!r} needs --top-k")
    if args.method in NEEDS_EVALUATION and args.task is None:
        raise CliError(f"method {args.method!r} evaluates averaged models and needs --task; "
                       f"the methods that need no task are {', '.join(NO_TASK_METHODS)}")
    _check_inputs_exist(args.checkpoints)
    _check_output(args.out, "--out", args.checkpoints, [], args.force, suffix=".safetensors")
    files = _order(args.checkpoints)
    _check_output(args.out, "--out", args.checkpoints, files, args.force)
    if args.top_k is not None:
        check_top_k(args.top_k, len(files))
    top_k = args.top_k if args.top_k is not None else 1
    if args.task is not None:
        task, traj, _ = _load_for_task(args, files, [(args.objective, "to select checkpoints")] if args.method in NEEDS_EVALUATION else [])
        ctx = Context(traj, top_k=top_k, seed=args.seed, ema_decay=args.ema_decay, model=task.new_model(), loss_fn=task.loss,
                      batches=list(task.require(args.objective, "to select checkpoints")) if args.method in NEEDS_EVALUATION else None,
                      select_options={"samples": args.samples, "steps": args.steps})
        result = run_method(args.method, ctx)
        state = averaged_model(task, traj, result.weights).state_dict()
    else:
        from .average import average

        traj = trajectory_from_files(files)
        result = run_method(args.method, Context(traj, top_k=top_k, seed=args.seed, ema_decay=args.ema_decay))
        state = average(traj, result.weights)
        if any(name.endswith(("running_mean", "running_var")) for name in state):
            print("sewa: note: BatchNorm statistics were averaged like the weights; pass --task to recompute them on 'train'",
                  file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    chosen = [i for i, w in enumerate(result.weights.tolist()) if w > 0]
    meta = {"sewa": json.dumps({"method": args.method, "weights": result.weights.tolist(), "checkpoints": [str(f) for f in files]})}
    save_state_dict(state, args.out, overwrite=args.force, metadata=meta)
    print(f"{args.method}: averaged {len(chosen)} of {len(files)} checkpoints (steps {[traj.steps[i] for i in chosen]})")
    print(f"wrote {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``sewa report``."""
    from .report import format_table, load_results, write_report

    results = load_results(args.results)
    out = args.out if args.out is not None else args.results.with_name(args.results.stem + "-report")
    write_report(results, out, force=args.force, results_path=args.results)
    print(format_table(results))
    print(f"report: {out / 'report.md'}")
    return 0


# --------------------------------------------------------------------------- entry point
def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {e.filename}"
    return text or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``sewa`` command; returns the exit status (0 ok, 2 bad input, 1 unexpected error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors (already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("sewa: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # bad inputs: CliError, TaskError, CheckpointError, TrajectoryError, missing files
        if getattr(args, "debug", False):
            raise
        print(f"sewa: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        print(f"sewa: error: unexpected {type(e).__name__}: {_one_line(e)} (run again with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
