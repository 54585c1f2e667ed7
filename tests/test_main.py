"""``python -m sewa`` is the ``sewa`` command."""

from __future__ import annotations

import subprocess
import sys

import sewa


def test_python_dash_m_sewa_runs_the_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "sewa", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sewa.__version__ in done.stdout
    bad = subprocess.run([sys.executable, "-m", "sewa", "no-such-command"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no-such-command" in bad.stderr


def test_the_distribution_is_torch_sewa_and_imports_as_sewa() -> None:
    # `sewa` on the package index is an unrelated project (issue 13.1).
    from importlib.metadata import packages_distributions, version

    assert version("torch-sewa") == sewa.__version__
    assert "torch-sewa" in packages_distributions()["sewa"]
