"""The ``sewa`` command: ``demo``, ``compare``, ``select``, ``average``, ``report``, ``experiment``.

Each command is one module of this package with ``add_parser(subparsers, common)`` and
``run(args)``; :data:`COMMANDS` lists them. Every command checks its inputs before any long
work starts, refuses to write over or next to the input checkpoints, and reports a bad input as
one line on stderr (``sewa: error: ...``, exit status 2). ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ._common import CliError, Parser, formatter, wrap

__all__ = ["main", "build_parser", "CliError", "COMMANDS"]

COMMANDS = ("demo", "compare", "select", "average", "report")
# Optional dependencies and the extra that installs each.
_EXTRAS = {"matplotlib": "cli", "tqdm": "cli", "lightning": "lightning", "transformers": "transformers",
           "gymnasium": "experiments", "mujoco": "experiments", "sklearn": "cli"}


def build_parser() -> argparse.ArgumentParser:
    """The ``sewa`` argument parser with its sub-commands."""
    from .. import __version__

    parser = Parser(prog="sewa", formatter_class=formatter,
                    description=wrap("Selective Weight Averaging: pick which checkpoints of a training run are worth averaging, and average them."),
                    epilog="examples:\n  sewa demo                       # a finished demo report in sewa-report/\n"
                           "  sewa compare --help             # every method on your own checkpoints")
    parser.add_argument("--version", action="version", version=f"sewa {__version__}")
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub, common)
    try:  # the experiments are optional: the other commands must keep working without them
        from ..experiments.command import add_parser
    except Exception:  # noqa: BLE001
        pass
    else:
        add_parser(sub)
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {e.filename}"
    return text or type(e).__name__


def _distribution() -> str:
    """The name this package was installed under (for install hints)."""
    from importlib.metadata import packages_distributions

    return next(iter(packages_distributions().get("sewa", [])), "torch-sewa")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``sewa`` command; returns the exit status (0 ok, 2 bad input, 1 unexpected error,
    130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors (already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    logging.basicConfig(format="sewa: %(message)s", level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("sewa: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if debug:
            raise
        root = (e.name or "").split(".")[0]
        if root in _EXTRAS:
            print(f"sewa: error: this command needs {root}, which is not installed: "
                  f"pip install \"{_distribution()}[{_EXTRAS[root]}]\"", file=sys.stderr)
            return 2
        print(f"sewa: error: unexpected ModuleNotFoundError: {_one_line(e)} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # bad inputs: CliError, TaskError, CheckpointError, TrajectoryError, missing files
        if debug:
            raise
        print(f"sewa: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(f"sewa: error: unexpected {type(e).__name__}: {_one_line(e)} (run again with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
