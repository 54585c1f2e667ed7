"""Method objects and their registry: one conformance test over every registered method, the
settings schema the CLI is built from, and a rule registered from outside the package."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import pytest
import reference as ref
import torch
from _tiny_task import write_checkpoints, write_task

import sewa
from sewa import methods, weights
from sewa.compare import run_compare
from sewa.io import trajectory_from_files
from sewa.methods import DEFAULT_METHODS, METHODS, Evaluator, Method, create, register, settings_of
from sewa.task import load_task


def _problem(n: int = 6):  # type: ignore[no-untyped-def]
    model, traj, batches = ref.make_problem("cnn_bn", n=n)
    return traj, Evaluator(model, ref.cross_entropy, batches)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_returns_valid_weights(name: str) -> None:
    traj, ev = _problem()
    method = create(name, top_k=2, seed=3, decay=0.5, steps=4, samples=2, sewa_steps=4, soup_steps=4)
    result = method.weights(traj, ev)
    w = result.weights
    assert result.name == name and result.seconds >= 0 and method.name == name
    assert w.dtype == torch.float64 and w.shape == (6,)
    assert bool((w >= 0).all()) and float(w.sum()) == pytest.approx(1.0, abs=1e-9)
    if method.top_k is not None:
        assert int((w > 0).sum()) == 2 and torch.equal(w, weights.from_indices(6, w.nonzero().flatten()))
    assert {k: result.info[k] for k in method.settings} == dict(method.settings)  # what it ran with
    json.dumps(result.info)  # details are JSON-ready for reports
    # The same method gives the same weights: every method is deterministic given its seed.
    assert torch.equal(method.weights(traj, ev).weights, w)


def test_methods_are_frozen_and_replace_checks_settings() -> None:
    m = methods.lawa(top_k=5)
    with pytest.raises(AttributeError):
        m.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        m.settings["top_k"] = 3  # type: ignore[index]
    assert m.replace(top_k=3).top_k == 3 and m.top_k == 5 and m.label == "lawa(top_k=5)"
    with pytest.raises(ValueError, match="'lawa' has no setting decay"):
        m.replace(decay=0.5)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        methods.lawa(top_k=0)
    with pytest.raises(ValueError, match="decay must lie in"):
        methods.ema(decay=1.0)
    with pytest.raises(ValueError, match="sewa has no setting windw"):
        methods.sewa(windw=3)


def test_a_method_says_what_it_needs() -> None:
    traj, ev = _problem(3)
    assert {"greedy_soup", "learned_soup", "sewa"} <= {n for n in METHODS if create(n).evaluates}
    assert not {"last", "uniform", "lawa", "ema", "random_k"} & {n for n in METHODS if create(n).evaluates}
    with pytest.raises(ValueError, match="'sewa' evaluates averaged models"):
        methods.sewa(top_k=2).weights(traj)
    with pytest.raises(ValueError, match="top_k=10 is larger than the number of snapshots"):
        methods.lawa().weights(traj)
    assert torch.equal(methods.ema(decay=0.5).weights(traj).weights, weights.ema(3, 0.5))


def test_sewa_defaults_are_selects_defaults() -> None:
    """SeWA's defaults are declared once, on :func:`sewa.select`."""
    params = inspect.signature(sewa.select).parameters
    made = methods.sewa()
    assert made.settings and all(made.settings[k] == params[k].default for k in made.settings)
    assert set(settings_of(methods.sewa)) == set(made.settings)
    assert all(s.help for s in settings_of(methods.sewa).values())  # the CLI's help text


def test_names_aliases_and_deprecations() -> None:
    assert set(DEFAULT_METHODS) <= set(METHODS)
    assert create("swa").name == "uniform"
    with pytest.warns(DeprecationWarning, match="'random' is deprecated: use 'random_k'"):
        assert create("random").name == "random_k"
    with pytest.warns(DeprecationWarning, match="'twa' is deprecated: use 'learned_soup'"):
        assert create("twa").name == "learned_soup"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create("uniform")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        create("nope")


def test_non_finite_selection_loss_stops_greedy_soup() -> None:
    model, traj, batches = ref.make_problem("mlp", n=4)
    ev = Evaluator(model, lambda out, y: ref.cross_entropy(out, y) * float("nan"), batches)
    with pytest.raises(ValueError, match="selection loss of an average .* is nan"):
        methods.greedy_soup().weights(traj, ev)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("methods")
    task_path = write_task(root, "task.py")
    files = write_checkpoints(root / "ckpts", task_path, n=5)
    return root, task_path, files


def _tail_half() -> Method:
    """Uniform over the newer half of the window (a rule registered from outside sewa)."""
    return Method("tail_half", {}, lambda t, e, s: (weights.lawa(len(t), max(1, len(t) // 2)), {"kept": len(t) // 2}))


def test_a_rule_registered_from_outside_runs_through_the_cli_compare_path(tiny_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from sewa.cli import main

    root, task_path, _ = tiny_run
    register("tail_half", _tail_half)
    try:
        out = tmp_path / "r.json"
        assert main(["compare", "--task", str(task_path), "--checkpoints", str(root / "ckpts"), "--methods",
                     "last,tail_half", "--top-k", "2", "--json", str(out), "--no-progress"]) == 0
        entry = json.loads(out.read_text())["methods"]["tail_half"]
        assert entry["weights"] == [0.0, 0.0, 0.0, 0.5, 0.5] and entry["kept"] == 2
    finally:
        METHODS.pop("tail_half")


def test_run_compare_records_a_failing_method_as_null_with_its_error(tiny_run) -> None:  # type: ignore[no-untyped-def]
    _, task_path, files = tiny_run
    task = load_task(str(task_path))
    good_loss = task.loss
    task.loss = lambda out, y: good_loss(out, y) * float("nan")
    traj = trajectory_from_files(files, task.new_model())
    with pytest.raises(ValueError, match="is nan"):
        run_compare(traj, task, methods=["greedy_soup"])
    res = run_compare(traj, task, methods=[methods.last(), methods.greedy_soup()], on_error="record")
    for name in ("last", "greedy_soup"):  # last's own test loss is NaN too
        entry = res["methods"][name]
        assert entry["test_loss"] is None and entry["weights"] is None and "nan" in entry["error"]
    json.dumps(res, allow_nan=False)  # strict JSON: NaN is never written
