"""The v2 experiment record, the regimes' schedules (closed forms) and the unstable regime's corrupted stretch."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sewa import methods as M
from sewa.experiments import runner, schedules
from sewa.experiments import tasks as T
from sewa.experiments.tasks import SPECS


def test_schedules_follow_their_closed_forms() -> None:
    total, window, every = 200, 10, 4
    span = window * every
    const = schedules.make_regime("constant", total, window, every)
    cos = schedules.make_regime("cosine", total, window, every)
    wsd = schedules.make_regime("wsd", total, window, every, warmup=0.1)
    for i in range(total):
        assert const.lr_factor(i) == 1.0
        assert cos.lr_factor(i) == pytest.approx(0.5 * (1 + math.cos(math.pi * i / total)))
        expected = (i + 1) / 20 if i < 20 else 1.0 if i < total - span else (total - i) / span
        assert wsd.lr_factor(i) == pytest.approx(expected)
    assert cos.lr_factor(total - 1) < 1e-3 and wsd.lr_factor(total - 1) == pytest.approx(1 / span)
    # The torch scheduler gives update i the learning rate lr * f(i), and cosine agrees with torch's own.
    p = nn.Parameter(torch.zeros(1))
    opt, ref_opt = torch.optim.SGD([p], lr=0.3), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.3)
    sched, ref = cos.scheduler(opt), torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=total)
    for i in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.3 * cos.lr_factor(i))
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], abs=1e-9)
        opt.step()
        ref_opt.step()
        sched.step()
        ref.step()
    with pytest.raises(ValueError, match="unknown regime"):
        schedules.make_regime("linear", total, window, every)
    with pytest.raises(ValueError, match="do not fit"):
        schedules.make_regime("constant", 30, window, every)


def test_unstable_shard_corrupts_exactly_the_stretch_its_note_names() -> None:
    total, window, every = 300, 20, 5
    reg = schedules.make_regime("unstable-shard", total, window, every)
    a, b = reg.corrupted() or (0, 0)
    assert (a, b) == (200 + 30, 200 + 50)  # 30% to 50% of the window's 100 updates
    info = reg.describe()
    assert info["corrupted_updates"] == [a + 1, b] and info["corrupted_snapshots"] == [6, 9]
    assert f"updates {a + 1}-{b}" in reg.note() and "snapshots 6-9" in reg.note()
    # Snapshot j is taken after start + (j + 1) * every updates: 6..9 are the ones whose last update lies in [a, b).
    last_update = [reg.start + (j + 1) * every - 1 for j in range(window)]
    assert [j for j in range(window) if a <= last_update[j] < b] == [6, 7, 8, 9]
    y = torch.arange(16)
    for i in range(total):
        changed = not torch.equal(reg.targets(i, y, seed=3), y)
        assert changed == (a <= i < b), i
    assert torch.equal(reg.targets(a, y, 3), reg.targets(a, y, 3))
    assert sorted(reg.targets(a, y, 3).tolist()) == y.tolist()
    assert schedules.make_regime("constant", total, window, every).corrupted() is None


def test_training_loop_feeds_the_corrupted_targets_only_inside_the_stretch() -> None:
    reg = schedules.make_regime("unstable-shard", 40, 10, 2)
    seen: list[torch.Tensor] = []

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(y.clone())
        return F.cross_entropy(out, y % 4)

    spec = SimpleNamespace(batch_size=8, loss=loss)
    x, y = torch.randn(320, 3), torch.arange(320)
    data = SimpleNamespace(train=(x, y))
    model = nn.Linear(3, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = runner._train_steps(spec, model, opt, data, 1, 0, lambda s: None, 0, 40, reg, reg.scheduler(opt))  # type: ignore[arg-type]
    assert step == 40 and len(seen) == 40
    a, b = reg.corrupted() or (0, 0)
    batches = [b for _, b in T.loader(data.train, 8, True, 1 * 1000 + 0)]  # the loop's data order (seed 1, epoch 0)
    shuffled = [i for i, t in enumerate(seen) if not torch.equal(t, batches[i])]
    assert all(sorted(seen[i].tolist()) == sorted(batches[i].tolist()) for i in shuffled)
    assert shuffled == list(range(a, b))


def _needs_ag_news() -> None:
    try:
        SPECS["ag_news"].load(SPECS["ag_news"].with_preset("quick").options | {"train_subset": 10})
    except (FileNotFoundError, ImportError, ModuleNotFoundError) as e:
        pytest.skip(f"ag_news data not available here: {e}")


def test_v2_record_of_a_quick_text_run(tmp_path: Path) -> None:
    _needs_ag_news()
    calls: list[int] = []

    def reference(spec: object, data: object, seed: int) -> dict[str, object]:
        calls.append(seed)
        return {"name": "planted", "test_metric": 0.5, "val_metric": 0.4}

    over = {"window": 12, "record_window": 12, "sel_steps": 5, "draws": 7, "curve_draws": 2, "reference": reference}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = runner.run("ag_news", "quick", 0, tmp_path, ablations=False, progress=False, regime="cosine", overrides=over)
    saved = json.loads((tmp_path / "ag_news" / "cosine" / "quick" / "seed0.json").read_text())
    assert saved == json.loads(json.dumps(rec, default=float))
    assert saved["format"] == "sewa.experiment/2" and saved["regime"] == "cosine" and saved["family"] == "text"
    assert len(saved["git_commit"]) == 40 and isinstance(saved["dirty"], bool)
    assert saved["reference"] == {"name": "planted", "test_metric": 0.5, "val_metric": 0.4} and calls == [0]
    assert "end of the decay" in saved["window_note"] and saved["schedule"]["lr_factor_window"][1] < 0.01
    n = saved["window"]
    assert n == 12 and len(saved["steps"]) == n
    labels = {"last", "uniform", "swa_lr", "lawa", "ema", "suffix", "greedy_soup", "learned_soup", "sewa"}
    assert set(saved["methods"]) == labels | ({"auto"} if "auto" in M.METHODS else set())
    for label, m in saved["methods"].items():
        assert {"method", "settings", "weights", "test_metric", "val_metric", "test_loss", "val_loss", "seconds",
                "selected_on", "choice_by"} <= set(m), label
        if label != "swa_lr":
            assert len(m["weights"]) == n and abs(sum(m["weights"]) - 1) < 1e-6, label
    methods = saved["methods"]
    assert methods["swa_lr"]["weights"] is None and "branch" in methods["swa_lr"]["window_note"]
    assert methods["last"]["selected_on"] is None and methods["greedy_soup"]["choice_by"] == "metric"
    assert methods["greedy_soup"]["settings"] == {"by": "metric"} and methods["sewa"]["settings"]["top_k"] == 10
    for label, key in (("ema", "half_life_updates"), ("suffix", "tail")):
        best = max(methods[label]["sweep"], key=lambda r: (r["val_metric"], -r["val_loss"]))
        assert methods[label][key] == best[key] and methods[label]["selected_on"] == "val"
    assert methods["suffix"]["weights"] == [0.0] * (n - methods["suffix"]["tail"]) + [1 / methods["suffix"]["tail"]] * methods["suffix"]["tail"]
    per = saved["per_snapshot"]
    assert all(len(per[key]) == n for key in ("val_metric", "test_metric", "val_loss", "test_loss"))
    assert per["test_metric"][-1] == pytest.approx(methods["last"]["test_metric"])
    rk = saved["random_k"]
    assert rk["k"] == 10 and rk["draws"] == 7 and all(len(rk[key]) == 7 for key in ("test_metric", "val_metric"))
    curves = saved["k_curves"]
    assert curves["Ks"] == [1, 5, 10] and curves["measure"] == "test_metric"
    for key in ("lawa", "random_k_mean", "sewa", "oracle", "random_k_draws"):
        assert len(curves[key]) == 3, key
    assert curves["oracle"][0] == pytest.approx(max(per["test_metric"]))
    assert curves["lawa"][2] == pytest.approx(methods["lawa"]["test_metric"])
    assert curves["random_k_mean"][2] == pytest.approx(sum(rk["test_metric"]) / 7)
    assert curves["random_k_draws"] == [2, 2, 7]
    top = sorted(range(n), key=lambda i: (methods["sewa"]["probabilities"][i], i))[-10:]
    assert sorted(top) == methods["sewa"]["indices"]  # SeWA-K at K=10 is the table's SeWA
    assert curves["sewa"][2] == pytest.approx(methods["sewa"]["test_metric"])
    assert saved["compute"]["random_k_seconds"] > 0 and saved["compute"]["per_snapshot_seconds"] > 0


def test_full_presets_meet_the_seed_and_draw_counts() -> None:
    for name, spec in SPECS.items():
        assert spec.draws >= 100, name
        assert spec.seeds >= (5 if spec.family == "image" else 10), name
        assert not spec.options.get("label_noise"), name
        assert set(spec.regimes) <= set(schedules.REGIMES) and {"constant", "cosine"} <= set(spec.regimes), name
    assert any("unstable-shard" in s.regimes for s in SPECS.values())
    assert all(s.episodes >= 50 for s in SPECS.values() if s.family == "bc")
    assert all(s.reference is not None for s in SPECS.values() if s.family in ("text", "bc"))


def test_experiment_command_takes_a_regime_and_refuses_a_dirty_tree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sewa.cli import build_parser
    from sewa.experiments import command

    args = build_parser().parse_args(["experiment", "ag_news", "--regime", "wsd", "--out", str(tmp_path)])
    assert args.regime == "wsd" and args.device == "cpu"
    assert build_parser().parse_args(["experiment", "ag_news"]).regime == "constant"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["experiment", "ag_news", "--regime", "linear"])
    monkeypatch.setattr("sewa.provenance.git_state", lambda: ("0" * 40, True))
    with pytest.raises(ValueError, match="uncommitted"):
        command.run(args)


def test_train_stops_before_the_methods_with_the_runs_window_and_split() -> None:
    """runner.train trains as run does and hands back the window and the selection split, so a
    study of methods (benchmarks/auto_variants.py) runs on the runner's own trajectories."""
    try:  # Fashion-MNIST: the Debian package .ci/run installs
        SPECS["fashion_mnist"].load(SPECS["fashion_mnist"].with_preset("quick").options | {"train_subset": 10})
    except (FileNotFoundError, ImportError, ModuleNotFoundError) as e:
        pytest.skip(f"fashion_mnist data not available here: {e}")
    over = {"window": 8, "record_window": 10, "sel_steps": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = runner.train("fashion_mnist", "quick", 0, progress=False, regime="cosine", overrides=over)
    assert len(t.full) == 10 and len(t.main) == 8 and t.main.steps == t.full.steps[-8:]
    ev = t.task.evaluator("val", "in a test")
    assert ev.num_batches(t.main) == t.selection_batches >= 1 and t.selection_items > 0
    scores = t.score.average(t.main, torch.full((8,), 1 / 8, dtype=torch.float64))
    assert 0.0 <= scores["test_metric"] <= 1.0
