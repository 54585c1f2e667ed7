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


@pytest.mark.parametrize("name,ablations,regime", [("ag_news", True, "unstable-shard"), ("hopper", False, "wsd"),
                                                   ("fashion_mnist", False, "constant")])
def test_quick_preset_runs_and_renders(tmp_path: Path, name: str, ablations: bool, regime: str) -> None:
    _available(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Fewer selection steps and random draws than even the quick preset, and no text reference (~30 s).
        small = {"sel_steps": 10, "draws": 5, "curve_draws": 1, "window": 12, "record_window": 12} | (
            {"reference": None} if name == "ag_news" else {})
        rec = runner.run(name, "quick", 0, tmp_path, ablations=ablations, progress=False, regime=regime, overrides=small)
    saved = json.loads((tmp_path / name / regime / "quick" / "seed0.json").read_text())
    assert saved["task"] == name and saved["seed"] == 0 and saved["data_source"] and saved["regime"] == regime
    methods = saved["methods"]
    for key in ("last", "uniform", "swa_lr", "ema", "suffix", "lawa", "greedy_soup", "learned_soup", "sewa"):
        assert key in methods and methods[key].get("error") is None, key
        assert methods[key]["test_metric"] is not None, key
    for key, m in methods.items():
        if m["weights"] is not None:
            assert abs(sum(m["weights"]) - 1) < 1e-6, key
    assert sorted(methods["sewa"]["indices"]) == methods["sewa"]["indices"] and len(methods["sewa"]["indices"]) == 10
    assert methods["last"]["weights"][-1] == 1.0
    bc = saved["family"] == "bc"
    judge = methods["auto"].get("judge")  # BC: auto checks its finalists on validation rollouts
    assert (judge is not None) == bc and (not bc or (judge["units"] == 2 and len(judge["finalists"]) >= 3))
    finalists = {f["name"] for f in judge["finalists"]} if judge else set()
    for c in methods["auto"]["candidates"]:  # every candidate scored on test after the choice, for offline study
        assert c["test"]["test_loss"] is not None and (c["test"]["test_metric"] is None) == (bc and c["name"] not in finalists)
    assert saved["k_curves"]["measure"] == ("test_loss" if bc else "test_metric")
    # BC: the medium policy; images: logistic regression on pixels (text's is switched off above)
    assert (saved["reference"] is not None) == (name != "ag_news") and ("measure_note" in saved) == bc
    if name == "fashion_mnist":
        assert saved["reference"]["name"] == "logistic regression on pixels" and 0.5 < saved["reference"]["test_metric"] <= 1
    assert len(saved["per_snapshot"]["test_loss"]) == saved["window"]
    assert rec["compute"]["selection_seconds"] > 0 and rec["compute"]["epoch_seconds"] > 0
    if ablations:
        assert {"window", "tau", "samples", "steps", "objective", "budget", "split", "convergence", "choice_by", "noise", "patience", "knots",
                "per_step"} <= set(saved["ablations"])
        assert [r["value"].split(" by ")[1] for r in saved["ablations"]["choice_by"]] == ["metric"] * 3 + ["loss"] * 3
    doc = results.render(tmp_path, tmp_path / "docs")
    text = doc.read_text()
    assert name in text and "## Compute" in text
