"""results/summary.json on synthetic format-2 runs (issue 14, item 9)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sewa.experiments import results, summary

COMMIT = "a" * 40
# Per-seed test accuracy (fractions) of each method: sewa sits 5 points above uniform on every seed.
SCORES = {"last": [0.80, 0.82, 0.78], "uniform": [0.84, 0.85, 0.83], "swa_lr": [0.84, 0.84, 0.84],
          "lawa": [0.83, 0.84, 0.82], "ema": [0.84, 0.86, 0.83], "suffix": [0.84, 0.85, 0.84],
          "greedy_soup": [0.85, 0.85, 0.85], "learned_soup": [0.85, 0.86, 0.84],
          "sewa": [0.89, 0.901, 0.879], "auto": [0.89, 0.901, 0.879]}


def fake_run(seed: int, commit: str = COMMIT, regime: str = "unstable-spikes") -> dict[str, Any]:
    """A tiny run in format 2 with every field the renderer reads."""
    methods = {m: {"method": m, "settings": {}, "weights": [0.5, 0.5, 0.0, 0.0] if m != "swa_lr" else None,
                   "test_metric": s[seed], "val_metric": s[seed] - 0.01, "test_loss": 0.4, "val_loss": 0.5,
                   "seconds": 1.0 + seed, "selected_on": "val" if m in ("sewa", "auto") else None,
                   "choice_by": "metric" if m in ("sewa", "auto") else None} for m, s in SCORES.items()}
    methods["auto"].update(chosen="uniform", chosen_family="tail", objective="metric", fell_back=True, crossfit=True,
                           folds_used=5, gain_vs_uniform={"mean": 0.0, "se": 0.001}, gain_vs_last={"mean": 0.05, "se": 0.01},
                           forward_passes=400, sewa_default_passes={"forward": 800, "backward": 800})
    return {"format": "sewa.experiment/2", "task": "tiny", "family": "text", "regime": regime, "preset": "quick",
            "seed": seed, "git_commit": commit, "dirty": False,
            "machine": {"platform": "test", "cpus": 1, "torch": "x"},
            "config": {"every": 2, "episodes": None}, "data_source": "synthetic", "metric": "accuracy",
            "window": 4, "steps": [2, 4, 6, 8], "window_note": "a loss spike inside the window",
            "reference": {"name": "multinomial naive Bayes", "test_metric": 0.874, "val_metric": 0.87},
            "methods": methods,
            "per_snapshot": {"val_metric": [0.8] * 4, "test_metric": [0.8] * 4, "val_loss": [0.5] * 4, "test_loss": [0.5] * 4},
            "random_k": {"k": 2, "draws": 4, "test_metric": [0.80, 0.84, 0.88, 0.90], "val_metric": [0.8] * 4},
            "k_curves": {"Ks": [1, 2, 4], "measure": "test_metric", "random_k_draws": [4, 4, 4], "lawa": [0.8, 0.82, 0.84], "random_k_mean": [0.8, 0.81, 0.84],
                         "sewa": [0.85, 0.89, 0.84], "oracle": [0.9, 0.91, 0.84]},
            "compute": {"epoch_seconds": 1.0, "train_seconds": 3.0, "selection_seconds": 2.0,
                        "trajectory_bytes": 2**20, "params": 10}}


def write_runs(root: Path, runs: list[dict[str, Any]]) -> None:
    for r in runs:
        path = root / r["task"] / r["regime"] / r["preset"] / f"seed{r['seed']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))


def test_the_best_trajectory_baseline_leaves_out_the_swalr_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SCORES, "swa_lr", [0.95, 0.95, 0.95])  # the separately trained branch is best on test
    entry = summary.task_entry(("tiny", "unstable-spikes", "quick"), [fake_run(s) for s in range(3)])
    assert entry["best_baseline"] == "swa_lr" and entry["best_trajectory_baseline"] == "sewa"
    found = {c["claim"].split(" (")[0]: c["comparisons"] for c in summary.claims([entry])}
    assert [x["vs"] for x in found["auto is never worse than the best baseline"]] == ["swa_lr"]
    assert found["auto is never worse than the best baseline it could have chosen"] == [
        {"where": "tiny/unstable-spikes", "vs": "sewa", "verdict": "equivalent"}]


def test_summary_schema_on_three_synthetic_runs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_runs(runs, [fake_run(s) for s in range(3)])
    out = tmp_path / "summary.json"
    results.render(runs, tmp_path / "docs", out)
    doc = json.loads(out.read_text())
    assert '"seeds": [0, 1, 2],' in out.read_text()  # per-seed lists stay on one line
    assert doc["schema"] == "sewa.summary/1" and len(doc["tasks"]) == 1
    t = doc["tasks"][0]
    assert {"task", "family", "regime", "commit", "dirty", "seeds", "reference", "methods", "random_k", "verdicts"} <= set(t)
    assert (t["task"], t["family"], t["commit"], t["dirty"], t["seeds"]) == ("tiny", "text", COMMIT, False, [0, 1, 2])
    assert "unstable" in t["regime"]
    assert t["reference"]["name"] == "multinomial naive Bayes" and t["reference"]["test_metric"] == pytest.approx(87.4)
    assert list(t["methods"]) == list(summary.MAIN)
    assert t["methods"]["sewa"]["test_metric"] == pytest.approx([89.0, 90.1, 87.9])
    assert set(t["methods"]["last"]) >= {"test_metric", "val_metric", "seconds"}
    assert t["methods"]["last"]["seconds"] == [1.0, 2.0, 3.0] and t["methods"]["last"]["averaged"] == [2, 2, 2]
    assert t["random_k"]["k"] == 2 and t["random_k"]["test_metric_mean"] == pytest.approx([85.5] * 3)
    assert t["random_k"]["percentiles"]["sewa"][0] == pytest.approx(75.0)  # 0.89 beats 0.80, 0.84, 0.88 of 4 draws
    others = [m for m in summary.MAIN if m not in ("sewa", "auto")]
    assert set(t["verdicts"]) == {f"sewa vs {x}" for x in others} | {f"auto vs {x}" for x in others + ["sewa"]}
    up = t["verdicts"]["sewa vs uniform"]
    assert up["verdict"] == "better" and up["diff"] == pytest.approx(5.0) and up["ci"][0] > 0.3
    assert up["p_holm"] >= up["p"]
    same = t["verdicts"]["auto vs sewa"]
    assert same["diff"] == 0.0 and same["verdict"] == "equivalent"
    assert t["best_baseline"] == t["best_trajectory_baseline"] == "sewa" and t["ranks"]["last"] == [10.0, 10.0, 10.0]
    assert t["k_curves"]["oracle"] == pytest.approx([90.0, 91.0, 84.0])
    assert t["selection_check"] == {"score": "val_metric", "methods": 10, "best_on_selection": "sewa", "its_test_rank": 1,
                                    "best_on_test": "sewa", "its_selection_rank": 1}
    assert t["auto"]["fell_back"] == [True] * 3 and t["auto"]["forward_passes_over_sewa"] == [0.5] * 3
    assert t["auto"]["gain_vs_last"] == [0.05] * 3 and t["auto"]["chosen"] == ["uniform"] * 3
    claims = {c["claim"].split(" (")[0]: c for c in doc["claims"]}
    assert claims["auto is never worse than the best baseline"]["comparisons"] == [
        {"where": "tiny/unstable-spikes", "vs": "sewa", "verdict": "equivalent"}]
    assert claims["auto beats uniform and the last iterate where checkpoints differ in quality"]["counts"]["better"] == 2
    md = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "reference: multinomial naive Bayes | 87.40 ± 0.00" in md
    assert "| sewa vs uniform | +5.00 |" in md and "**better**" in md
    assert "| tiny — unstable-spikes (quick) | simple | uniform, uniform, uniform | 3 of 3 | 3 of 3 | — | +0.00 ± 0.10 (metric) | +5.00 | 0.50 |" in md
    assert "auto is never worse than the best baseline" in md and "1 equivalent" in md
    assert (tmp_path / "docs" / "ranks.png").is_file() and (tmp_path / "docs" / "k_curves.png").is_file()


def test_behaviour_cloning_scores_random_k_and_k_curves_by_the_test_loss(tmp_path: Path) -> None:
    runs = []
    for seed in range(2):
        r = fake_run(seed)
        r.update(family="bc", metric="normalized_score", regime="constant")
        for m, row in r["methods"].items():
            row.update(test_metric=40.0 + seed, val_metric=None, test_loss=0.02 if m == "sewa" else 0.05,
                       val_loss=0.01 if m == "sewa" else 0.04)
        r["random_k"] = {"k": 2, "draws": 4, "test_metric": [None] * 4, "test_loss": [0.01, 0.03, 0.04, 0.06]}
        r["k_curves"] = {"Ks": [1, 2], "measure": "test_loss", "random_k_draws": [4, 4], "lawa": [0.05, 0.04],
                         "sewa": [None, 0.03]}
        runs.append(r)
    write_runs(tmp_path / "runs", runs)
    md = results.render(tmp_path / "runs", tmp_path / "docs", tmp_path / "s.json").read_text()
    t = json.loads((tmp_path / "s.json").read_text())["tasks"][0]
    assert t["random_k"]["measure"] == "test_loss" and t["random_k"]["test_metric_mean"] == [None, None]
    assert t["random_k"]["percentiles"]["sewa"] == [75.0, 75.0] and t["random_k"]["percentiles"]["last"] == [25.0, 25.0]
    assert t["k_curves"] == {"Ks": [1, 2], "measure": "test_loss", "lawa": [0.05, 0.04], "sewa": [None, 0.03]}
    assert t["methods"]["last"]["test_metric"] == [40.0, 41.0] and t["margin"] == 2.0
    assert t["selection_check"]["score"] == "val_loss" and t["selection_check"]["best_on_selection"] == "sewa"
    assert "scored by the test loss (lower is better)" in md and "Best K per curve: lawa: K=2, sewa: K=2." in md


def test_mixed_commits_are_refused_unless_allowed(tmp_path: Path) -> None:
    write_runs(tmp_path, [fake_run(0), fake_run(1, commit="b" * 40), fake_run(2)])
    with pytest.raises(ValueError, match=f"mixes runs of 2 versions of src/.*{'a' * 40}.*{'b' * 40}.*--allow-mixed"):
        summary.write(tmp_path, tmp_path / "s.json")
    doc = json.loads(summary.write(tmp_path, tmp_path / "s.json", allow_mixed=True).read_text())
    assert doc["tasks"][0]["mixed_commits"] is True and doc["tasks"][0]["commit"] == COMMIT


def test_commits_with_the_same_source_tree_are_one_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit that changes only results or docs between seeds does not mix code versions."""
    write_runs(tmp_path, [fake_run(0), fake_run(1, commit="b" * 40), fake_run(2)])
    monkeypatch.setattr(summary, "code_version", lambda commit: "the same src tree")
    doc = json.loads(summary.write(tmp_path, tmp_path / "s.json").read_text())
    assert doc["tasks"][0]["mixed_commits"] is False and doc["tasks"][0]["commits"] == ["a" * 40, "b" * 40]


def test_one_entry_per_task_and_regime_preferring_the_full_preset(tmp_path: Path) -> None:
    full = [dict(fake_run(s, regime="cosine"), preset="full") for s in range(2)]
    write_runs(tmp_path, [fake_run(s) for s in range(2)] + [fake_run(s, regime="cosine") for s in range(2)] + full)
    doc = summary.build(summary.entries(summary.load_runs(tmp_path)))
    assert [(t["regime"], t["preset"]) for t in doc["tasks"]] == [("cosine", "full"), ("unstable-spikes", "quick")]


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="sewa.experiment/3"):
        summary.normalize({"format": "sewa.experiment/3"})


def test_the_auto_table_counts_the_judges_moves(tmp_path: Path) -> None:
    runs = [fake_run(s) for s in range(3)]
    for r, moved in zip(runs, (True, False, True), strict=True):
        r["methods"]["auto"]["judge"] = {"moved": moved, "seconds": 2.0}
    entry = summary.task_entry(("tiny", "unstable-spikes", "quick"), runs)
    assert entry["auto"]["judge_moved"] == [True, False, True] and entry["auto"]["judge_seconds"] == [2.0] * 3
    assert "| 3 of 3 | 3 of 3 | 2 of 3 | +0.00 ± 0.10 (metric) |" in "\n".join(results.auto_table({("tiny", "unstable-spikes", "quick"): entry}))


def test_runs_with_changed_settings_stay_out_of_the_tables(tmp_path: Path) -> None:
    run = fake_run(0) | {"overrides": {"judge_episodes": 30}, "preset": "full"}
    write_runs(tmp_path, [run])
    with pytest.raises(ValueError, match=r"ran with changed settings .*move the run out"):
        summary.load_runs(tmp_path)


def test_experiment_settings_are_changed_by_field_with_its_type() -> None:
    from sewa.experiments.command import parse_overrides
    from sewa.experiments.tasks import SPECS

    spec = SPECS["hopper"]
    assert parse_overrides(spec, ["judge_episodes=30", "lr=0.01", "ablations=true"]) == {
        "judge_episodes": 30, "lr": 0.01, "ablations": True}
    for bad, message in (("judge_episodes", "expected FIELD=VALUE"), ("nope=1", "expected FIELD=VALUE"),
                         ("judge_episodes=many", "takes a int"), ("ablations=maybe", "takes a bool")):
        with pytest.raises(ValueError, match=message):
            parse_overrides(spec, [bad])


def _ablated(seed: int) -> dict[str, Any]:
    """A run with ablations: the default selects snapshots [1, 2]; knots=5 selects others and scores
    1 point higher on every seed (plus a seed-dependent wobble); window=4 (the run's) selects the default's snapshots,
    window=2 the same positions of a shorter window."""
    run = fake_run(seed)
    wobble = 0.001 * seed

    def row(value: Any, metric: float, indices: list[int]) -> dict[str, Any]:
        return {"value": value, "indices": indices, "test_metric": metric, "val_metric": metric, "seconds": 1.0 + seed}

    base = 0.85 + 0.01 * seed
    run["ablations"] = {
        "objective": [row("val", base, [1, 2]), row("train", base - 0.02 - wobble, [0, 1])],
        "window": [row(2, base - 0.01, [1, 2]), row(4, base, [1, 2])],
        "knots": [row(0, base, [1, 2]), row(5, base + 0.01 + wobble, [2, 3])],
        "convergence": [{"value": 0.5, "step": 4, "last": 0.5, "uniform": 0.5, "lawa10": 0.5, "sewa10": 0.5}],
        "choice_by": [{"value": f"ema by {by}", "test_metric": base + (0.003 if by == "loss" else 0.0) + wobble}
                      for by in ("metric", "loss")]}
    return run


def test_ablations_are_paired_against_the_default_selection() -> None:
    recs = [_ablated(0), _ablated(1), fake_run(2)]  # the last seed ran no ablations
    entry = summary.task_entry(("tiny", "unstable-spikes", "quick"), recs)
    ab = entry["ablation_verdicts"]
    assert ab["seeds"] == [0, 1]
    # window=4 selects the default's snapshots on every seed: left out; convergence is not a contrast
    assert list(ab["verdicts"]) == ["objective=train vs default", "window=2 vs default", "knots=5 vs default",
                                    "ema by loss vs by metric"]
    knots = ab["verdicts"]["knots=5 vs default"]
    assert knots["n"] == 2 and knots["diff"] == pytest.approx(1.05) and knots["ci"][0] > 0
    assert ab["verdicts"]["objective=train vs default"]["diff"] == pytest.approx(-2.05)
    assert ab["verdicts"]["ema by loss vs by metric"]["diff"] == pytest.approx(0.3)
    lines = results.ablation_tables({("tiny", "unstable-spikes", "quick"): entry})
    assert lines[0] == "### Ablations against the default: tiny — unstable-spikes (quick), seeds 0–1"
    assert any(line.startswith("| knots=5 vs default | +1.05 |") for line in lines)
    claim = results.ablation_claim([entry])[0]
    assert "tiny/unstable-spikes (seeds 0–1): " in claim and " of 4 (" in claim and "worse: objective=train vs default (-2.05)" in claim
    plain = summary.task_entry(("tiny", "unstable-spikes", "quick"), [fake_run(s) for s in range(3)])
    assert plain["ablation_verdicts"] is None and results.ablation_claim([plain]) == []
