"""Reports: summaries over runs, tables, Markdown, plots that decode, and folder safety."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

from sewa.report import (
    PLOTS,
    format_table,
    load_results,
    markdown,
    runs_of,
    summarise,
    write_report,
)


def _run(seed: int, metric: float | None, loss: float, k: int = 6) -> dict[str, Any]:
    """A results run shaped like ``sewa compare``'s output (values chosen by the test)."""
    uniform = [1.0 / k] * k
    sewa_w = [0.0] * (k - 2) + [0.5, 0.5]
    return {
        "seed": seed, "top_k": 2, "split": "test", "objective": "val", "samples": 4, "steps": 5,
        "checkpoints": [f"c{i}.pt" for i in range(k)], "checkpoint_steps": [10 * (i + 1) for i in range(k)],
        "metric_name": "accuracy" if metric is not None else None,
        "methods": {
            "uniform": {"weights": uniform, "test_loss": loss + 0.1, "test_metric": None if metric is None else metric - 0.01,
                        "seconds": 0.0, "num_averaged": k},
            "sewa": {"weights": sewa_w, "test_loss": loss, "test_metric": metric, "seconds": 1.0 + seed, "num_averaged": 2,
                     "probabilities": [0.1, 0.2, 0.1, 0.2, 0.7, 0.7][:k], "indices": [k - 2, k - 1],
                     "history": {"loss": [1.0, 0.9, 0.8, 0.85, 0.7], "tau": [1.0, 0.6, 0.4, 0.2, 0.1], "entropy": [1] * 5}},
        },
    }


def test_summary_is_mean_and_sample_std_over_runs() -> None:
    results = {"runs": [_run(0, 0.8, 0.5), _run(1, 0.9, 0.3), _run(2, 0.85, 0.4)], "metric_name": "accuracy"}
    row = summarise(results)["sewa"]
    assert math.isclose(row["test_metric_mean"], 0.85) and math.isclose(row["test_metric_std"], statistics.stdev([0.8, 0.9, 0.85]))
    assert math.isclose(row["test_loss_mean"], 0.4) and math.isclose(row["seconds_mean"], 2.0)
    assert row["num_averaged_mean"] == 2 and row["runs"] == 3
    single = summarise(_run(0, 0.8, 0.5))["uniform"]
    assert single["test_metric_std"] is None and math.isclose(single["test_metric_mean"], 0.79)
    table = format_table(results)
    assert "0.8500 ± 0.0500" in table and "test accuracy" in table and "over 3 runs" in table


def test_table_without_metric_has_no_metric_column() -> None:
    table = format_table(_run(0, None, 0.5))
    assert "metric" not in table.splitlines()[0] and "test loss" in table and "n/a" not in table


def test_markdown_states_the_setup() -> None:
    results = _run(3, 0.8, 0.5) | {"task": "task.py", "environment": {"platform": "Linux-x", "cpu_count": 2, "torch": "2.x",
                                                                       "git_commit": "abc123"}}
    text = markdown(results, list(PLOTS))
    for fact in ("task.py", "Linux-x", "abc123", "| sewa |", "steps [50, 60]", "seeds: 3", "(selection_probabilities.png)"):
        assert fact in text, fact


@pytest.mark.parametrize("multi", [False, True])
def test_write_report_plots_decode(tmp_path: Path, multi: bool) -> None:
    results: dict[str, Any] = {"runs": [_run(0, 0.8, 0.5), _run(1, 0.9, 0.3)]} if multi else _run(0, None, 0.5)
    written = write_report(results, tmp_path / "r")
    names = {p.name for p in written}
    drawn = set(PLOTS) - {"auto_weights.png"}  # no auto entry here
    assert names == {"report.md", "results.json", *drawn}
    for name in drawn:
        path = tmp_path / "r" / name
        assert path.stat().st_size > 1000
        image = imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and float(image[..., :3].std()) > 0.01
    assert json.loads((tmp_path / "r" / "results.json").read_text()) == results


def test_report_without_sewa_skips_its_plots(tmp_path: Path) -> None:
    run = _run(0, 0.8, 0.5)
    del run["methods"]["sewa"]
    names = {p.name for p in write_report(run, tmp_path / "r")}
    assert names == {"report.md", "results.json", "test_metric.png"}
    assert "selection_probabilities.png" not in (tmp_path / "r" / "report.md").read_text()


def test_existing_folder_needs_force_and_keeps_other_files(tmp_path: Path) -> None:
    out = tmp_path / "r"
    write_report(_run(0, 0.8, 0.5), out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        write_report(_run(0, 0.8, 0.5), out)
    write_report(_run(1, 0.7, 0.5), out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "results.json").read_text())["seed"] == 1
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="is a file"):
        write_report(_run(0, 0.8, 0.5), tmp_path / "file", force=True)


def test_regenerating_in_place_keeps_the_results_file(tmp_path: Path) -> None:
    out = tmp_path / "r"
    write_report(_run(0, 0.8, 0.5), out)
    source = out / "results.json"
    before = source.read_bytes()
    written = write_report(load_results(source), out, force=True, results_path=source)
    assert source not in written and source.read_bytes() == before


def test_load_results_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "empty_runs.json").write_text(json.dumps({"runs": []}))
    (tmp_path / "bad_method.json").write_text(json.dumps({"methods": {"sewa": {"weights": [1.0]}}}))
    with pytest.raises(ValueError, match="not a results object"):
        load_results(tmp_path / "list.json")
    with pytest.raises(ValueError, match="empty 'runs'"):
        load_results(tmp_path / "empty_runs.json")
    with pytest.raises(ValueError, match="lacks 'test_loss'"):
        load_results(tmp_path / "bad_method.json")
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "absent.json")
    assert len(runs_of({"runs": [_run(0, 0.8, 0.5)] * 2})) == 2


# ----------------------------------------------------------------- a selection file (sewa select --json)
def _selection(format: str = "sewa.select/1") -> dict[str, Any]:
    """Shaped like what ``sewa select --json`` writes: one method's entry and the run's set-up."""
    entry = _run(4, 0.9, 0.3)["methods"]["sewa"]
    return entry | {"method": "sewa", "settings": {"top_k": 2, "samples": 4, "steps": 5, "seed": 4}, "format": format,
                    "task": "task.py", "metric_name": "accuracy", "split": "test", "objective": "val",
                    "checkpoints": [f"c{i}.pt" for i in range(6)], "checkpoint_steps": [10 * (i + 1) for i in range(6)],
                    "top_k": 2, "seed": 4, "out": "avg.safetensors", "argv": ["sewa", "select", "--json", "s.json"]}


def test_a_selection_file_renders(tmp_path: Path) -> None:
    source = tmp_path / "s.json"
    source.write_text(json.dumps(_selection()))
    results = load_results(source)  # refused before: "has no 'methods' object"
    written = {p.name for p in write_report(results, tmp_path / "r", results_path=source)}
    assert written == {"report.md", "results.json", "selection_probabilities.png", "selection_loss_tau.png"}
    text = (tmp_path / "r" / "report.md").read_text()
    for fact in ("# sewa select: task.py", "chose the checkpoints at steps [50, 60]", "| test accuracy |",
                 "4 mask samples x 5 steps", "(selection_loss_tau.png)"):
        assert fact in text, fact
    assert json.loads((tmp_path / "r" / "results.json").read_text()) == _selection()  # kept as written
    assert "sewa" in format_table(results)


def test_a_selection_file_from_a_newer_sewa_is_refused() -> None:
    with pytest.raises(ValueError, match=r"format 'sewa\.select/2'; this sewa reads 'sewa\.select/1'"):
        runs_of(_selection("sewa.select/2"))


# ----------------------------------------------------------------- the metric's name (issue 13.9)
def test_reports_call_the_metric_by_its_name(tmp_path: Path) -> None:
    results = _run(0, 0.8, 0.5)  # metric_name "accuracy"
    write_report(results, tmp_path / "r")
    text = (tmp_path / "r" / "report.md").read_text()
    assert "*Test accuracy and loss of every method" in text and "| test accuracy |" in text
    assert "test metric" not in text.lower().replace("test_metric.png", "")
    unnamed = _run(0, 0.8, 0.5) | {"metric_name": None}
    assert "*Test metric and loss of every method" in markdown(unnamed, list(PLOTS))
    assert "*Test loss of every method" in markdown(_run(0, None, 0.5), list(PLOTS))


def test_sewa_report_renders_what_sewa_select_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from _tiny_task import write_checkpoints, write_task

    from sewa.cli import main

    task = write_task(tmp_path, "task.py", extra="\nMETRIC_NAME = 'accuracy'\n")
    write_checkpoints(tmp_path / "ckpts", task, n=4)
    out = tmp_path / "out"
    assert main(["select", "--task", str(task), "--checkpoints", str(tmp_path / "ckpts"), "--top-k", "2", "--steps", "3",
                 "--samples", "2", "--out", str(out / "avg.safetensors"), "--json", str(out / "s.json"), "--quiet"]) == 0
    assert main(["report", str(out / "s.json"), "--out", str(out / "report")]) == 0, capsys.readouterr().err
    text = (out / "report" / "report.md").read_text()
    assert "# sewa select:" in text and "| test accuracy |" in text and "chose the checkpoints at steps" in text
    assert (out / "report" / "selection_probabilities.png").stat().st_size > 1000


def test_a_failed_method_and_one_without_weights_render(tmp_path: Path) -> None:
    """A method recorded as failed (null scores plus its error) and one trained on its own run
    (no weights over this window, as the experiments' swa_lr) still give a report."""
    run = _run(0, 0.8, 0.5)
    run["methods"]["greedy_soup"] = {"method": "greedy_soup", "weights": None, "test_loss": None, "test_metric": None,
                                     "error": "the selection loss of an average (snapshots [0]) is nan"}
    run["methods"]["swa_lr"] = {"test_loss": 0.45, "test_metric": 0.81, "seconds": 3.0}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(run, allow_nan=False))
    results = load_results(path)
    table = format_table(results)
    assert "greedy_soup" in table and "swa_lr" in table and "0.8100" in table
    write_report(results, tmp_path / "rep", force=False, results_path=path)
    assert (tmp_path / "rep" / "report.md").is_file()


def test_auto_explains_its_choice(tmp_path: Path) -> None:
    """The report of a run with ``auto`` shows its candidates' fold scores, the chosen one, the
    estimated gains and a plot of the chosen weights (issue 15, "explain the choice")."""
    import reference as ref

    from sewa.methods import Evaluator, create

    model, traj, batches = ref.make_problem("mlp", n=6)
    result = create("auto", sewa_steps=4, soup_steps=4).weights(traj, Evaluator(model, ref.cross_entropy, batches))
    run = _run(0, 0.8, 0.5, k=6)
    run["methods"]["auto"] = {"weights": result.weights.tolist(), "test_loss": 0.4, "test_metric": 0.82, **result.info}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(run, allow_nan=False))
    written = write_report(load_results(path), tmp_path / "rep", results_path=path)
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "How `auto` chose" in text and f"`{result.info['chosen']}`" in text and "estimated gain over uniform" in text
    assert text.count("| uniform") >= 1 and "(chosen)" in text
    png = tmp_path / "rep" / "auto_weights.png"
    assert png in written and imread(png).shape[0] > 100


def test_the_report_says_what_the_judge_did(tmp_path: Path) -> None:
    """With a judge, the report names the split's choice, the judge's finalists and whether it moved."""
    import reference as ref

    from sewa.methods import Evaluator, create

    model, traj, batches = ref.make_problem("mlp", n=6)
    newest = traj.snapshot(5)

    def judge(m: Any) -> list[float]:  # prefers the newest snapshot, on 8 units
        gap = sum(float((p.detach() - newest[name]).pow(2).sum()) for name, p in m.named_parameters())
        return [-gap - 0.01 * u for u in range(8)]

    ev = Evaluator(model, ref.cross_entropy, batches, judge=judge, judge_name="closeness")
    result = create("auto", sewa_steps=4, soup_steps=4).weights(traj, ev)
    assert result.info["judge"]["moved"] and result.info["chosen"] == "last"
    run = _run(0, 0.8, 0.5, k=6)
    run["methods"]["auto"] = {"weights": result.weights.tolist(), "test_loss": 0.4, "test_metric": 0.82, **result.info}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(run, allow_nan=False))
    write_report(load_results(path), tmp_path / "rep", results_path=path)
    text = (tmp_path / "rep" / "report.md").read_text()
    split_choice = result.info["judge"]["split_choice"]
    assert f"it chose `{split_choice}`" in text and "The judge (closeness) then scored" in text
    assert "moved to `last`, which beat it on the mean" in text and "| finalist | closeness (mean ± SE) |" in text and "| last (chosen) |" in text
