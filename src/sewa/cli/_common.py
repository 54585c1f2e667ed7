"""What the ``sewa`` commands share: argument groups built from the method registry, input and
output checks, and writing results.

Every check runs before any long work starts. Outputs are never written over or next to the
input checkpoints, ``--force`` replaces only regular files, and a failed command removes the
folders it created.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from ..methods import METHODS, Method, canonical, create, settings_of

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
  METRIC_NAME = "accuracy"                     # optional: how reports name the metric
"""


class CliError(ValueError):
    """A bad command-line input."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other sewa error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def wrap(text: str) -> str:
    return textwrap.fill(text, width=90)


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def evaluating_methods() -> list[str]:
    """Registry names of the methods that score averages on a selection split."""
    return [name for name, make in METHODS.items() if make().evaluates]


# --------------------------------------------------------------------------- argument groups
def task_args(p: argparse.ArgumentParser, task_required: bool) -> None:
    p.add_argument("--task", required=task_required, default=None,
                   help="task file (path/to/task.py) or importable module defining model(), batches(split), loss() [, metric()]")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="FILE_OR_DIR",
                   help="checkpoint files (.safetensors/.pt/.pth/.bin) or directories of them, in any order")
    p.add_argument("--safe-globals", nargs="+", default=None, metavar="MODULE.NAME",
                   help="classes or functions a .pt checkpoint may hold besides tensors (e.g. argparse.Namespace); "
                        "each is allowed by name, never the whole file")


def method_args(p: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """One flag per setting of the methods ``names`` (``top_k`` gives ``--top-k``), with the
    help and default of the first method that has it. Flags default to ``None``: a method
    built from them keeps its own default for every flag not given."""
    seen: dict[str, Any] = {}
    for name in sorted(names, key=lambda n: n != "sewa"):  # SeWA's help for the flags it shares
        for s in settings_of(METHODS[name]).values():
            seen.setdefault(s.name, s)
    group = p.add_argument_group("method settings (each passed to the methods that take it)")
    for s in seen.values():
        flag = "--" + s.name.replace("_", "-")
        text = f"{s.help} (default {s.default})".replace("``", "")
        if s.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, type=s.type, default=None, metavar=s.name.upper(), help=text.replace("%", "%%"))


def run_args(p: argparse.ArgumentParser, *, objective: bool = True, progress: bool = True) -> None:
    if objective:
        p.add_argument("--objective", choices=("val", "train"), default="val",
                       help="split the learning methods select on (default val)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch (default: torch's choice)")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bars (default: bars only on a terminal)")
        p.add_argument("--quiet", action="store_true", help="no progress bars and no messages but errors and results")


def finish(p: argparse.ArgumentParser, names: Sequence[str], run: Any, force: str = "overwrite existing outputs") -> None:
    """The arguments every command that runs methods ends with: ``--force``, the run options,
    one flag per setting of the methods ``names``; and the function that runs the command."""
    p.add_argument("--force", action="store_true", help=force)
    run_args(p)
    method_args(p, names)
    p.set_defaults(func=run)


def method_settings(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The method settings given on the command line (flags left out are not included)."""
    keys = {s for name in names for s in settings_of(METHODS[name])}
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def build(name: str, args: argparse.Namespace) -> Method:
    """Method ``name`` with the settings given on the command line."""
    name = canonical(name)
    return create(name, **method_settings(args, [name]))


def progress(args: argparse.Namespace) -> bool | None:
    """``False`` with ``--no-progress``/``--quiet``, else ``None`` (bars only on a terminal)."""
    return False if getattr(args, "no_progress", False) or getattr(args, "quiet", False) else None


def apply_run_args(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise CliError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    top_k = getattr(args, "top_k", None)
    if top_k is not None and top_k < 1:
        raise CliError(f"--top-k must be at least 1, got {top_k}")
    names = getattr(args, "safe_globals", None)
    if names:
        allow_globals(names)


def allow_globals(names: Sequence[str]) -> None:
    """Adds each ``module.Name`` to torch's allowed globals for ``weights_only`` loading."""
    import importlib

    import torch

    found = []
    for dotted in names:
        module, _, attr = dotted.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), attr) if module else None
        except (ImportError, AttributeError):
            obj = None
        if obj is None:
            raise CliError(f"--safe-globals {dotted}: no such importable name; give MODULE.NAME, e.g. argparse.Namespace")
        found.append(obj)
    torch.serialization.add_safe_globals(found)


# --------------------------------------------------------------------------- inputs and outputs
def check_inputs_exist(raw: Sequence[str]) -> None:
    for p in raw:
        if not Path(p).exists():
            raise FileNotFoundError(f"no checkpoint file or directory at {p}")


def order(raw: Sequence[str]) -> list[Path]:
    from ..io import order_checkpoints

    check_inputs_exist(raw)
    return order_checkpoints(raw)


def _input_dirs(raw: Sequence[str], files: Sequence[Path] = ()) -> list[Path]:
    """Directories holding input checkpoints: given directories and the folders of given files."""
    dirs = {Path(p).resolve() if Path(p).is_dir() else Path(p).resolve().parent for p in raw}
    dirs |= {f.resolve().parent for f in files}
    return sorted(dirs)


def check_output(path: Path, flag: str, raw: Sequence[str], files: Sequence[Path], force: bool, *, folder: bool = False,
                 suffix: str | None = None) -> None:
    """Refuses an output over or beside the input checkpoints, an existing one without
    ``--force``, anything but a regular file (or folder) to replace, and a place that cannot be
    written."""
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
    if path.exists() or path.is_symlink():
        if folder and not path.is_dir():
            raise CliError(f"{flag} {path} exists and is not a folder")
        if not folder and path.is_dir():
            raise CliError(f"{flag} {path} is a directory; give a file name")
        if not folder and not path.is_file():
            raise CliError(f"{flag} {path} exists and is not a regular file (a device, FIFO or socket): sewa replaces only "
                           "regular files; choose another path")
        if not force:
            raise CliError(f"{flag} {path} exists; pass --force to overwrite it")
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CliError(f"{flag} {path}: {parent} is a file, not a directory")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{flag} {path}: the folder {parent} is not writable; choose another path")


def check_outputs_distinct(*outputs: tuple[str, Path | None]) -> None:
    seen: dict[Path, str] = {}
    for flag, path in outputs:
        if path is None:
            continue
        key = path.resolve()
        if key in seen:
            raise CliError(f"{flag} and {seen[key]} are the same path {path}; give them different paths")
        seen[key] = flag


@contextmanager
def cleanup_on_failure(*paths: Path | None) -> Iterator[None]:
    """Removes, if the block fails, the folders it created on the way to ``paths`` (empty ones
    only: a file sewa wrote atomically is either complete or absent)."""
    created: list[Path] = []
    for path in paths:
        if path is None:
            continue
        for p in [path.resolve(), *path.resolve().parents]:
            if p.exists():
                break
            created.append(p)
    try:
        yield
    except BaseException:
        for p in sorted(created, key=lambda q: len(q.parts), reverse=True):
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise


def write_json(path: Path, data: dict[str, Any], force: bool) -> None:
    from ..io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n"), overwrite=force)


def relative_names(files: Sequence[Path]) -> list[str]:
    """Checkpoint names relative to their common folder, for output metadata."""
    if not files:
        return []
    resolved = [f.resolve() for f in files]
    base = Path(os.path.commonpath([str(f.parent) for f in resolved]))
    return [str(f.relative_to(base)) for f in resolved]


def load_for_task(args: argparse.Namespace, files: list[Path], needs: Sequence[tuple[str, str]]) -> tuple[Any, Any, Any]:
    """Task, trajectory and evaluation split, checked in order of cost (task, splits, checkpoints)."""
    from ..bn import has_batchnorm
    from ..io import trajectory_from_files
    from ..task import load_task

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
