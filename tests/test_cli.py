"""The ``sewa`` command end to end: demo, compare, select, average, report, and bad inputs.

The main flows run the installed console script in subprocesses. Every bad-input case runs
in-process through :func:`sewa.cli.main` (the same code path, minus the interpreter start-up),
and a sample of them also runs through the console script.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_task import write_checkpoints, write_task
from matplotlib.image import imread
from safetensors.torch import load_file

from sewa import Trajectory, apply
from sewa import weights as rules
from sewa.cli import main
from sewa.io import load_state_dict_file, trajectory_from_files
from sewa.task import load_task

METHODS = ("last", "uniform", "lawa", "ema", "random_k", "greedy_soup", "sewa", "auto")
PNGS = ("selection_probabilities.png", "selection_loss_tau.png", "test_metric.png")


def _command() -> list[str]:
    script = Path(sys.executable).parent / "sewa"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "sewa.cli"]


def run_sewa(*args: str | Path, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([*_command(), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_pngs(folder: Path) -> None:
    for name in PNGS:
        path = folder / name
        assert path.is_file() and path.stat().st_size > 1000, name
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
        assert float(image[..., :3].std()) > 0.01, f"{name} is blank"


def check_contract(data: dict, files: list[Path], top_k: int, seed: int, split: str, has_metric: bool) -> None:
    """The JSON contract of ``sewa compare`` from the issue, key by key."""
    assert data["checkpoints"] == [str(f) for f in files]
    assert data["top_k"] == top_k and data["seed"] == seed and data["split"] == split
    assert set(data["methods"]) == set(METHODS)
    k = len(files)
    for name, entry in data["methods"].items():
        weights = entry["weights"]
        assert isinstance(weights, list) and len(weights) == k, name
        assert all(isinstance(w, float) and w >= 0 for w in weights), name
        assert math.isclose(sum(weights), 1.0, abs_tol=1e-9), name
        assert isinstance(entry["test_loss"], float) and math.isfinite(entry["test_loss"]), name
        if has_metric:
            assert isinstance(entry["test_metric"], float) and 0.0 <= entry["test_metric"] <= 1.0, name
        else:
            assert "test_metric" in entry and entry["test_metric"] is None, name
        assert isinstance(entry["seconds"], float) and entry["seconds"] >= 0, name
    sewa = data["methods"]["sewa"]
    assert len(sewa["probabilities"]) == k and all(0.0 < p < 1.0 for p in sewa["probabilities"])
    assert len(sewa["indices"]) == top_k and sorted(set(sewa["indices"])) == sewa["indices"]
    assert all(0 <= i < k for i in sewa["indices"])
    # The weights are 1/K on the chosen indices, in checkpoint order.
    assert [i for i, w in enumerate(sewa["weights"]) if w > 0] == sewa["indices"]
    # Rules with known weights, in checkpoint order (oldest first).
    assert data["methods"]["last"]["weights"][-1] == 1.0
    assert [w > 0 for w in data["methods"]["lawa"]["weights"]] == [i >= k - top_k for i in range(k)]
    ema = data["methods"]["ema"]["weights"]
    assert ema == pytest.approx(rules.ema(k, 0.9).tolist(), abs=1e-12)  # the default decay


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A task, a BatchNorm task without test split and metric, and checkpoints of each."""
    root = tmp_path_factory.mktemp("cli")
    task = write_task(root / "tasks", "task.py")
    write_checkpoints(root / "ckpts", task, n=6, fmt="safetensors")
    bn_task = write_task(root / "tasks", "bn_task.py", bn=True, has_test=False, metric=False)
    write_checkpoints(root / "bn_ckpts", bn_task, n=5, fmt="pt")
    other = write_task(root / "tasks", "other.py", hidden=9)
    write_checkpoints(root / "other_ckpts", other, n=2)
    write_task(root / "tasks", "no_loss.py", extra="\ndel loss\n")
    write_task(root / "tasks", "marker.py", extra=f"\nopen({str(root / 'imported.marker')!r}, 'w').close()\n")
    write_task(root / "tasks", "broken.py", extra="\nthis is not python\n")
    write_task(root / "tasks", "bad_batches.py", extra="\ndef batches(split):\n    return [torch.zeros(3)]\n")
    (root / "corrupt").mkdir()
    shutil.copy(root / "ckpts" / "ckpt-3.safetensors", root / "corrupt" / "ckpt-3.safetensors")
    (root / "corrupt" / "ckpt-6.safetensors").write_bytes(b"\x00" * 40)
    (root / "not_json.json").write_text("{not json")
    (root / "no_methods.json").write_text(json.dumps({"top_k": 3}))
    (root / "exists.json").write_text("{}")
    (root / "exists.safetensors").write_text("")
    (root / "exists_dir").mkdir()
    return root


def _files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir(), key=lambda p: int(p.stem.split("-")[1]))


# --------------------------------------------------------------------------- main flows
def test_demo_fast(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run_sewa("demo", "--fast", "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for name in METHODS:
        assert name in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "demo" and len(results["runs"]) == 1
    run = results["runs"][0]
    k = results["config"]["window"]
    assert set(run["methods"]) == set(METHODS) and len(run["checkpoint_steps"]) == k
    for entry in run["methods"].values():
        assert len(entry["weights"]) == k and math.isclose(sum(entry["weights"]), 1.0, abs_tol=1e-9)
        assert 0.0 <= entry["test_metric"] <= 1.0
    assert results["sewa_fraction_of_epoch"] > 0
    report = (out / "report.md").read_text()
    for fact in ("label noise", "lr 0.1", "Machine", "torch", "selection / one epoch", *PNGS):
        assert fact in report, fact
    _check_pngs(out)


def test_compare_contract_and_report(run_dir: Path, tmp_path: Path) -> None:
    before = _hashes(run_dir / "ckpts")
    out, report = tmp_path / "res" / "compare.json", tmp_path / "report"
    proc = run_sewa("compare", "--task", run_dir / "tasks" / "task.py", "--checkpoints", run_dir / "ckpts",
                    "--top-k", "3", "--seed", "1", "--steps", "20", "--threads", "1", "--json", out, "--report", report,
                    "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    check_contract(data, _files(run_dir / "ckpts"), top_k=3, seed=1, split="test", has_metric=True)
    assert data["batchnorm_recomputed"] is False and data["checkpoint_steps"] == [3, 6, 9, 12, 15, 18]
    # test_loss is the loss of the averaged model on the test split: recompute one.
    task = load_task(str(run_dir / "tasks" / "task.py"))
    traj = trajectory_from_files(_files(run_dir / "ckpts"), task.new_model())
    model = apply(task.new_model(), traj, data["methods"]["uniform"]["weights"])
    loss, metric = task.evaluate(model, "test")
    assert math.isclose(data["methods"]["uniform"]["test_loss"], loss, rel_tol=1e-6)
    assert math.isclose(data["methods"]["uniform"]["test_metric"], metric, rel_tol=1e-6)
    _check_pngs(report)
    assert json.loads((report / "results.json").read_text()) == data
    assert _hashes(run_dir / "ckpts") == before


def test_compare_batchnorm_without_test_or_metric(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bn.json"
    proc = run_sewa("compare", "--task", run_dir / "tasks" / "bn_task.py", "--checkpoints", *_files(run_dir / "bn_ckpts"),
                    "--top-k", "2", "--steps", "10", "--threads", "1", "--json", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    check_contract(data, _files(run_dir / "bn_ckpts"), top_k=2, seed=0, split="val", has_metric=False)
    assert data["batchnorm_recomputed"] is True


def test_select_writes_average_with_recomputed_batchnorm(run_dir: Path, tmp_path: Path) -> None:
    out, js = tmp_path / "avg" / "sewa.safetensors", tmp_path / "avg" / "sewa.json"
    task_path = run_dir / "tasks" / "bn_task.py"
    proc = run_sewa("select", "--task", task_path, "--checkpoints", run_dir / "bn_ckpts", "--top-k", "2", "--steps", "10",
                    "--threads", "1", "--out", out, "--json", js, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(js.read_text())
    files = _files(run_dir / "bn_ckpts")
    for key in ("weights", "probabilities", "indices", "test_loss", "test_metric", "seconds"):
        assert key in data, key
    assert data["checkpoints"] == [str(f) for f in files] and data["top_k"] == 2 and data["split"] == "val"
    assert len(data["weights"]) == 5 and len(data["indices"]) == 2 and data["test_metric"] is None
    # The written state dict is the top-2 average with BatchNorm statistics recomputed on train.
    task = load_task(str(task_path))
    traj = trajectory_from_files(files, task.new_model())
    expected = apply(task.new_model(), traj, data["weights"], bn_batches=task.batches("train")).state_dict()
    written = load_file(str(out))
    assert set(written) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(written[name], value, atol=1e-6), name
    newest = load_state_dict_file(files[-1])
    assert not torch.allclose(written["1.running_mean"], newest["1.running_mean"])


def test_average_lawa_without_task(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lawa.safetensors"
    proc = run_sewa("average", "--checkpoints", run_dir / "ckpts", "--method", "lawa", "--top-k", "3", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = load_file(str(out))
    states = [load_file(str(f)) for f in _files(run_dir / "ckpts")[-3:]]
    for name in written:
        assert torch.allclose(written[name], sum(s[name] for s in states) / 3, atol=1e-6), name


def test_report_command(run_dir: Path, tmp_path: Path) -> None:
    js = tmp_path / "r.json"
    assert main(["compare", "--task", str(run_dir / "tasks" / "task.py"), "--checkpoints", str(run_dir / "ckpts"),
                 "--top-k", "2", "--steps", "5", "--json", str(js), "--no-progress"]) == 0
    assert main(["report", str(js)]) == 0
    _check_pngs(tmp_path / "r-report")
    text = (tmp_path / "r-report" / "report.md").read_text()
    assert "| sewa |" in text and "git commit" in text and "Machine" in text
    assert main(["report", str(js)]) == 2  # exists
    assert main(["report", str(js), "--force"]) == 0


# --------------------------------------------------------------------------- bad inputs
def _bad_cases(root: Path) -> dict[str, tuple[list[str], str]]:
    t = root / "tasks"
    ck = str(root / "ckpts")
    out = str(root / "out.json")
    compare = ["compare", "--task", str(t / "task.py"), "--checkpoints", ck, "--top-k", "2", "--steps", "2"]
    return {
        "missing checkpoint": (["compare", "--task", str(t / "task.py"), "--checkpoints", str(root / "nope.pt"), "--top-k", "2",
                                "--json", out], "no checkpoint file"),
        "missing task file": (["compare", "--task", str(root / "nope.py"), "--checkpoints", ck, "--top-k", "2", "--json", out],
                              "no task file"),
        "unimportable task module": ([*compare[:2], "no_such_sewa_task_module", *compare[3:], "--json", out], "no task module"),
        "task without loss": ([*compare[:2], str(t / "no_loss.py"), *compare[3:], "--json", out], "does not define loss()"),
        "task that fails to import": ([*compare[:2], str(t / "broken.py"), *compare[3:], "--json", out], "failed to import"),
        "task batches not pairs": ([*compare[:2], str(t / "bad_batches.py"), *compare[3:], "--json", out], "pairs"),
        "unknown method (compare)": ([*compare, "--methods", "last,swag", "--json", out], "unknown method 'swag'"),
        "unknown method (average)": (["average", "--checkpoints", ck, "--method", "swag", "--out", str(root / "a.safetensors")],
                                     "unknown method 'swag'"),
        "K larger than checkpoints": ([*compare[:-4], "--top-k", "7", "--json", out], "larger than the number of checkpoints (6)"),
        "K zero": ([*compare[:-4], "--top-k", "0", "--json", out], "at least 1"),
        "K larger (average)": (["average", "--checkpoints", ck, "--method", "lawa", "--top-k", "9", "--out",
                                str(root / "a.safetensors")], "larger than the number"),
        "mismatched checkpoints": (["average", "--checkpoints", ck, str(root / "other_ckpts"), "--method", "uniform", "--out",
                                    str(root / "a.safetensors")], "other_ckpts"),
        "checkpoints of another model": ([*compare[:2], str(t / "other.py"), *compare[3:], "--json", out], "shape"),
        "corrupt checkpoint": (["average", "--checkpoints", str(root / "corrupt"), "--method", "uniform", "--out",
                                str(root / "a.safetensors")], "ckpt-6.safetensors"),
        "json exists": ([*compare, "--json", str(root / "exists.json")], "exists; pass --force"),
        "report folder exists": ([*compare, "--json", out, "--report", str(root / "exists_dir")], "exists; pass --force"),
        "json inside checkpoint dir": ([*compare, "--json", str(root / "ckpts" / "r.json")], "never writes next to"),
        "json over an input checkpoint": (["compare", "--task", str(t / "task.py"), "--checkpoints", ck + "/ckpt-3.safetensors",
                                           ck + "/ckpt-6.safetensors", "--top-k", "1", "--json", ck + "/ckpt-3.safetensors",
                                           "--force"], "one of the input checkpoints"),
        "select out not safetensors": (["select", *compare[1:], "--out", str(root / "out.pt")], "must end in .safetensors"),
        "select out exists": (["select", *compare[1:], "--out", str(root / "exists.safetensors")], "exists; pass --force"),
        "select out beside checkpoints": (["select", *compare[1:], "--out", str(root / "ckpts" / "avg.safetensors")],
                                          "never writes next to"),
        "average sewa without task": (["average", "--checkpoints", ck, "--method", "sewa", "--top-k", "2", "--out",
                                       str(root / "a.safetensors")], "needs --task"),
        "average lawa, default K above checkpoints": (["average", "--checkpoints", ck, "--method", "lawa", "--out",
                                                       str(root / "a.safetensors")], "top-k 10 is larger than the number"),
        "missing required option": (["compare", "--task", str(t / "task.py"), "--checkpoints", ck, "--json", out], "--top-k"),
        "report missing results": (["report", str(root / "nope.json")], "no results file"),
        "report not json": (["report", str(root / "not_json.json")], "not a JSON file"),
        "report without methods": (["report", str(root / "no_methods.json")], "no 'methods'"),
        "demo out exists": (["demo", "--fast", "--out", str(root / "exists_dir")], "exists"),
        "demo K above window": (["demo", "--fast", "--top-k", "30", "--out", str(root / "d")], "--top-k"),
        "demo zero seeds": (["demo", "--seeds", "0", "--out", str(root / "d")], "--seeds"),
    }


BAD = list(_bad_cases(Path("/x")))


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line(case: str, run_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    argv, expected = _bad_cases(run_dir)[case]
    before = {p: _hashes(run_dir / p) for p in ("ckpts", "bn_ckpts")}
    code = main(argv)
    captured = capfd.readouterr()
    assert code == 2, captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("sewa"), captured.err
    assert "Traceback" not in captured.err
    assert expected in captured.err, captured.err
    assert captured.out == ""
    assert not (run_dir / "out.json").exists() and not (run_dir / "a.safetensors").exists()
    assert {p: _hashes(run_dir / p) for p in before} == before


@pytest.mark.parametrize("case", ["task without loss", "mismatched checkpoints"])
def test_bad_input_through_console_script(case: str, run_dir: Path) -> None:
    argv, expected = _bad_cases(run_dir)[case]
    proc = run_sewa(*argv)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv", [["compare", "--top-k", "30"], ["select", "--top-k", "30"]])
def test_inputs_checked_before_the_task_is_imported(argv: list[str], run_dir: Path) -> None:
    marker = run_dir / "imported.marker"
    marker.unlink(missing_ok=True)
    out = ["--json", str(run_dir / "m.json")] if argv[0] == "compare" else ["--out", str(run_dir / "m.safetensors")]
    code = main([argv[0], "--task", str(run_dir / "tasks" / "marker.py"), "--checkpoints", str(run_dir / "ckpts"), *argv[1:], *out])
    assert code == 2 and not marker.exists()


def test_unexpected_error_is_one_line_with_debug_hint(run_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    task = write_task(tmp_path, "raises.py", extra="\ndef model():\n    raise RuntimeError('boom\\nsecond line')\n")
    code = main(["compare", "--task", str(task), "--checkpoints", str(run_dir / "ckpts"), "--top-k", "2", "--json",
                 str(tmp_path / "o.json")])
    err = capfd.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "RuntimeError: boom second line" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="boom"):
        main(["compare", "--task", str(task), "--checkpoints", str(run_dir / "ckpts"), "--top-k", "2", "--json",
              str(tmp_path / "o.json"), "--debug"])


@pytest.mark.parametrize("command", ["demo", "compare", "select", "average", "report"])
def test_help_has_a_worked_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "example" in text and f"sewa {command}" in text.split("example")[-1]


def test_average_with_task_recomputes_batchnorm(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "u.safetensors"
    task_path = run_dir / "tasks" / "bn_task.py"
    assert main(["average", "--task", str(task_path), "--checkpoints", str(run_dir / "bn_ckpts"), "--method", "uniform",
                 "--out", str(out)]) == 0
    task = load_task(str(task_path))
    traj: Trajectory = trajectory_from_files(_files(run_dir / "bn_ckpts"), task.new_model())
    expected = apply(task.new_model(), traj, [0.2] * 5, bn_batches=task.batches("train")).state_dict()
    written = load_file(str(out))
    for name, value in expected.items():
        assert torch.allclose(written[name], value, atol=1e-6), name
    assert main(["average", "--checkpoints", str(run_dir / "bn_ckpts"), "--method", "uniform", "--out", str(out)]) == 2
