"""The shared runner: every method on one trajectory, each averaged model evaluated."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _tiny_task import write_checkpoints, write_task

from sewa.compare import averaged_model, check_methods, check_top_k, environment, run_compare
from sewa.io import trajectory_from_files
from sewa.methods import DEFAULT_METHODS
from sewa.task import load_task


@pytest.fixture(scope="module")
def bn_setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("cmp")
    task_path = write_task(root, "bn.py", bn=True)
    files = write_checkpoints(root / "ckpts", task_path, n=5)
    task = load_task(str(task_path))
    return task, trajectory_from_files(files, task.new_model())


def test_run_compare_evaluates_every_method(bn_setup) -> None:  # type: ignore[no-untyped-def]
    task, traj = bn_setup
    results = run_compare(traj, task, top_k=2, seed=3, steps=5, samples=2)
    assert list(results["methods"]) == list(DEFAULT_METHODS)
    assert results["split"] == "test" and results["seed"] == 3 and results["batchnorm_recomputed"] is True
    assert results["checkpoints"] == [f"step {s}" for s in traj.steps]
    for name, entry in results["methods"].items():
        # Each test loss is that of a fresh model holding the average, BatchNorm recomputed on train.
        model = averaged_model(task, traj, entry["weights"])
        loss, metric = task.evaluate(model, "test")
        assert math.isclose(entry["test_loss"], loss, rel_tol=1e-6), name
        assert math.isclose(entry["test_metric"], metric, rel_tol=1e-6), name
        assert entry["num_averaged"] == sum(w > 0 for w in entry["weights"])


def test_averaged_model_recomputes_batchnorm(bn_setup) -> None:  # type: ignore[no-untyped-def]
    task, traj = bn_setup
    model = averaged_model(task, traj, [0.2] * 5)
    bn = model[1]
    # One pass over train with momentum=None (cumulative average) gives the batch-mean average.
    batch_means = torch.stack([model[0](xb).mean(0) for xb, _ in task.batches("train")])
    assert torch.allclose(bn.running_mean, batch_means.mean(0), atol=1e-5)


def test_checks() -> None:
    assert check_methods(["sewa", "last"]) == ["sewa", "last"]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        check_methods(["nope"])
    with pytest.raises(ValueError, match="twice"):
        check_methods(["last", "last"])
    with pytest.raises(ValueError, match="larger than the number of checkpoints"):
        check_top_k(4, 3)


def test_run_compare_rejects_bad_settings(bn_setup) -> None:  # type: ignore[no-untyped-def]
    task, traj = bn_setup
    with pytest.raises(ValueError, match="objective"):
        run_compare(traj, task, top_k=2, objective="test")
    with pytest.raises(ValueError, match="labels"):
        run_compare(traj, task, top_k=2, checkpoints=["a"])


def test_environment_names_the_machine(tmp_path: Path) -> None:
    env = environment()
    assert env["cpu_count"] and env["torch"] == torch.__version__ and env["platform"]
    assert "git_commit" in env
