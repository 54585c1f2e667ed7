"""The quick presets end to end: train, record, every method, JSON record, RESULTS.md."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from sewa.experiments import results, runner


def _available(name: str) -> None:
    if name in ("hopper",):
        pytest.importorskip("mujoco")
        pytest.importorskip("gymnasium")
    try:
        from sewa.experiments.tasks import SPECS

        SPECS[name].load(SPECS[name].with_preset("quick").options | {"train_subset": 10})
    except (FileNotFoundError, ImportError, ModuleNotFoundError) as e:
        pytest.skip(f"{name} data not available here: {e}")


@pytest.mark.parametrize("name,ablations", [("ag_news", True), ("hopper", False), ("fashion_mnist", False)])
def test_quick_preset_runs_and_renders(tmp_path: Path, name: str, ablations: bool) -> None:
    _available(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = runner.run(name, "quick", 0, tmp_path, ablations=ablations, progress=False)
    saved = json.loads((tmp_path / name / "quick" / "seed0.json").read_text())
    assert saved["task"] == name and saved["seed"] == 0 and saved["data_source"]
    methods = saved["methods"]
    for key in ("last", "uniform", "swa_lr", "ema", "lawa10", "random10", "greedy_soup", "twa", "sewa1", "sewa10"):
        assert key in methods, key
    for key, m in methods.items():
        if "weights" in m:
            assert abs(sum(m["weights"]) - 1) < 1e-6, key
    assert sorted(methods["sewa10"]["indices"]) == methods["sewa10"]["indices"] and len(methods["sewa10"]["indices"]) == 10
    assert methods["last"]["weights"][-1] == 1.0
    assert rec["compute"]["selection_seconds"] > 0 and rec["compute"]["epoch_seconds"] > 0
    if ablations:
        assert {"window", "tau", "samples", "steps", "objective", "budget", "split", "convergence"} <= set(saved["ablations"])
    doc = results.render(tmp_path, tmp_path / "docs")
    text = doc.read_text()
    assert name in text and "sewa10 minus" in text and "## Compute" in text
