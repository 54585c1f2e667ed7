"""Shared test set-up: deterministic seeds, and one CPU thread for the tiny test models."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch

# Lets test modules import the reference implementation (tests/reference.py) by name.
sys.path.insert(0, os.path.dirname(__file__))

# The test models are tiny: intra-op threads only add synchronisation cost, and the suite runs
# on small shared machines.
torch.set_num_threads(1)
# ... and sewa's own choice of threads (which probes the free cores) is pinned to the same.
os.environ.setdefault("SEWA_THREADS", "1")


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    """Seeds the global RNGs for every test and restores them after, so no test depends on
    another's draws (the library itself only uses explicit generators)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh generator seeded with 0."""
    return torch.Generator().manual_seed(0)
