"""Tests of sewa.select: whole selections against the slow reference, learning, determinism, errors."""

from __future__ import annotations

import itertools
import json

import pytest
import reference as ref
import torch
from torch import Tensor, nn

import sewa
from sewa import TrajectoryError
from sewa._batch import cycle_batches
from sewa._engine import MixedLoss
from sewa.select import knot_basis, project_budget, run_selection, select_settings, tau_schedule

KINDS = ["mlp", "cnn_bn", "tied"]


@pytest.mark.parametrize("kind", KINDS)
def test_one_select_step_matches_reference(kind: str) -> None:
    """One plain-SGD step of ``select`` with lr 1 and no budget moves φ by -∂loss/∂φ."""
    model, traj, batches = ref.make_problem(kind, n=5)
    n, top_k, samples, tau = len(traj), 2, 3, 0.6
    sel = sewa.select(traj, model, ref.cross_entropy, batches, top_k=top_k, samples=samples, steps=1,
                      tau_start=tau, tau_end=tau, lr=1.0, optimizer="sgd", budget=False, seed=5)
    logits = ref.initial_logits(n, top_k)
    noise = ref.noise_stream(5, samples, n)()
    x, y = batches[0]
    loss, grad = ref.step_grad(logits, noise, tau, ref.snapshots(traj), ref.reference_model(model),
                               ref.cross_entropy, (ref.as_float64(x), y), traj.aliases)
    assert sel.history["loss"][0] == pytest.approx(loss, rel=1e-5)
    assert sel.history["tau"] == [tau]
    torch.testing.assert_close(sel.probabilities.double(), torch.sigmoid(logits - grad), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_multi_step_select_matches_reference(kind: str) -> None:
    """Adam, the annealed τ and the budget projection over 12 steps, cycling 3 batches."""
    model, traj, batches = ref.make_problem(kind, n=6, num_batches=3)
    options = dict(top_k=2, samples=3, steps=12, seed=4)
    sel = sewa.select(traj, model, ref.cross_entropy, batches, **options)
    indices, probs = ref.reference_select(traj, model, ref.cross_entropy, batches, **options)
    assert float(probs.max() - probs.min()) > 0.05  # the steps moved s
    torch.testing.assert_close(sel.probabilities.double(), probs, rtol=0, atol=1e-5)
    assert sel.indices == indices


def test_multi_step_select_without_budget_matches_reference() -> None:
    model, traj, batches = ref.make_problem("mlp", n=6, num_batches=3)
    options = dict(top_k=2, samples=3, steps=12, seed=4, budget=False, tau_start=0.5, tau_end=0.5)
    sel = sewa.select(traj, model, ref.cross_entropy, batches, **options)
    indices, probs = ref.reference_select(traj, model, ref.cross_entropy, batches, **options)
    torch.testing.assert_close(sel.probabilities.double(), probs, rtol=0, atol=1e-5)
    assert sel.indices == indices


def test_evaluator_ignores_recorded_batchnorm_statistics() -> None:
    """``make_evaluator`` (greedy soup's yardstick) evaluates on batch statistics like ``select``,
    also when the trajectory records buffers: the averaged running statistics play no part."""
    model, traj, batches = ref.make_problem("cnn_bn", n=4, buffers=True)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    got = sewa.methods.make_evaluator(traj, model, ref.cross_entropy, batches[:1])(w)
    x, y = batches[0]
    expected = ref.mixed_loss(w[None], ref.snapshots(traj, skip=ref.bn_statistics(model)), ref.reference_model(model),
                              ref.cross_entropy, (ref.as_float64(x), y), traj.aliases)
    assert got == pytest.approx(float(expected), rel=1e-5)


# ----------------------------------------------------------------- the Selection
def test_selection_fields_and_budget() -> None:
    model, traj, batches = ref.make_problem("mlp", n=6)
    sel = sewa.select(traj, model, ref.cross_entropy, batches, top_k=3, samples=2, steps=10,
                      tau_start=2.0, tau_end=0.5)
    assert len(sel.indices) == 3 and sel.indices == sorted(set(sel.indices))
    assert torch.equal(sel.weights, sewa.weights.from_indices(6, sel.indices))
    assert sel.steps == [traj.steps[i] for i in sel.indices]
    top = torch.topk(sel.probabilities, 3).indices.tolist()
    assert sorted(top) == sel.indices
    assert float(sel.probabilities.double().sum()) == pytest.approx(3.0, abs=1e-5)  # the budget
    assert bool(((sel.probabilities > 0) & (sel.probabilities < 1)).all())
    assert {k: len(v) for k, v in sel.history.items()} == {"loss": 10, "tau": 10, "entropy": 10}
    assert sel.history["tau"][0] == 2.0 and sel.history["tau"][-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(sel.history["tau"][:-1], sel.history["tau"][1:], strict=True))
    assert sel.config["top_k"] == 3 and sel.config["budget"] is True and sel.seconds > 0
    json.dumps(sel.to_dict())


def test_tau_schedule_closed_form() -> None:
    assert tau_schedule(0, 5, 1.0, 0.0625) == 1.0
    assert tau_schedule(2, 5, 1.0, 0.0625) == pytest.approx(0.25)  # (1/16)^(2/4)
    assert tau_schedule(4, 5, 1.0, 0.0625) == pytest.approx(0.0625)
    assert tau_schedule(3, 5, 0.3, 0.3) == 0.3
    assert tau_schedule(0, 1, 1.0, 0.1) == 0.1


def test_project_budget() -> None:
    logits = torch.tensor([-3.0, 0.0, 2.0, 5.0], dtype=torch.float64)
    before = logits.clone()
    project_budget(logits, 1.5)
    assert float(torch.sigmoid(logits).sum()) == pytest.approx(1.5, abs=1e-9)
    shift = logits - before
    torch.testing.assert_close(shift, shift[0].expand(4))  # one common shift keeps the order
    with pytest.raises(ValueError, match=r"budget must lie in \(0, 4\), got 4"):
        project_budget(logits, 4)


def test_budget_off_when_every_snapshot_is_chosen() -> None:
    model, traj, batches = ref.make_problem("mlp", n=3)
    sel = sewa.select(traj, model, ref.cross_entropy, batches, top_k=3, samples=2, steps=2)
    assert sel.indices == [0, 1, 2] and sel.config["budget"] is False


def test_exact_ties_break_towards_the_newest() -> None:
    model, traj, batches = ref.make_problem("mlp", n=5)
    sel = sewa.select(traj, model, ref.cross_entropy, batches, top_k=2, samples=2, steps=3, lr=0.0)
    assert torch.equal(sel.probabilities, torch.full((5,), 0.4))
    assert sel.indices == [3, 4]


def test_compact_storage_select_runs() -> None:
    model, traj, batches = ref.make_problem("mlp", n=5, storage="bfloat16")
    sel = sewa.select(traj, model, ref.cross_entropy, batches, top_k=2, samples=2, steps=5)
    assert len(sel.indices) == 2


# ----------------------------------------------------------------- determinism
def test_same_seed_same_selection() -> None:
    model, traj, batches = ref.make_problem("cnn_bn", n=6)
    options = dict(top_k=2, samples=3, steps=15)
    a = sewa.select(traj, model, ref.cross_entropy, batches, seed=11, **options)
    b = sewa.select(traj, model, ref.cross_entropy, batches, seed=11, **options)
    assert torch.equal(a.probabilities, b.probabilities)  # bitwise
    assert a.indices == b.indices and a.history == b.history
    c = sewa.select(traj, model, ref.cross_entropy, batches, seed=12, **options)
    assert not torch.equal(a.probabilities, c.probabilities)  # other noise, other path


def test_select_leaves_the_model_and_trajectory_alone() -> None:
    model, traj, batches = ref.make_problem("cnn_bn", n=4)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = traj.data.clone()
    sewa.select(traj, model, ref.cross_entropy, batches, top_k=2, samples=2, steps=3)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(traj.data, data)
    traj.push(model, step=1000)  # the read is over


# ----------------------------------------------------------------- learning
def planted_regression(d: int = 8, n: int = 40, planted: tuple[int, ...] = (3, 12, 20, 29, 37),
                       spread: float = 0.3) -> tuple[nn.Module, sewa.Trajectory, list[ref.Batch]]:
    """Linear regression whose exact solution is ``planted`` snapshots; the rest are perturbed."""
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(1, d, generator=gen)
    model = nn.Linear(d, 1, bias=False)
    traj = sewa.Trajectory(model, window=n)
    for i in range(n):
        w = w_star if i in planted else w_star + spread * torch.randn(1, d, generator=gen)
        traj.push({"weight": w}, step=100 * i)
    batches = []
    for _ in range(4):
        x = torch.randn(16, d, generator=gen)
        batches.append((x, x @ w_star.T))
    return model, traj, batches


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_exact_solutions_are_found(seed: int) -> None:
    model, traj, batches = planted_regression()
    sel = sewa.select(traj, model, ref.mse, batches, top_k=5, seed=seed)  # default settings
    assert sel.indices == [3, 12, 20, 29, 37]


def half_bad_problem(seed: int, n: int = 12) -> tuple[nn.Module, sewa.Trajectory, list[ref.Batch], list[int]]:
    """A teacher MLP; odd snapshots are near it, even ones far (their loss is clearly higher)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        teacher = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    base = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    bad = list(range(0, n, 2))
    traj = sewa.Trajectory(teacher, window=n)
    for i in range(n):
        spread = 0.6 if i in bad else 0.05
        traj.push({k: v + spread * torch.randn(v.shape, generator=gen) for k, v in base.items()}, step=i)
    batches = []
    for _ in range(3):
        x = torch.randn(32, 4, generator=gen)
        with torch.no_grad():
            batches.append((x, teacher(x)))
    return teacher, traj, batches, bad


def test_clearly_bad_half_is_left_out() -> None:
    model, traj, batches, bad = half_bad_problem(seed=0)
    evaluate = sewa.methods.make_evaluator(traj, model, ref.mse, batches)
    own = [evaluate(sewa.weights.from_indices(len(traj), [i])) for i in range(len(traj))]
    good = [i for i in range(len(traj)) if i not in bad]
    assert min(own[i] for i in bad) > 3 * max(own[i] for i in good)  # the premise: clearly worse
    sel = sewa.select(traj, model, ref.mse, batches, top_k=len(good), steps=100)
    assert not set(sel.indices) & set(bad)


# ----------------------------------------------------------------- the engine interface
class LinearEngine:
    """A toy :class:`sewa.select.Engine`: loss ``(1/M) Σ_j Σ_i a_ji c_i`` for fixed costs ``c``,
    so snapshots with low cost should win; no model and no batches behind it."""

    def __init__(self, costs: Tensor) -> None:
        self.costs = costs.double()

    def __call__(self, mix: Tensor, batch: object) -> tuple[float, Tensor]:
        m = mix.shape[0]
        return float((mix @ self.costs).mean()), self.costs.expand(m, -1) / m


def test_run_selection_takes_any_engine() -> None:
    costs = torch.tensor([3.0, 0.0, 2.0, 0.1, 5.0, 0.2])
    _, settings = select_settings(top_k=3, steps=60)
    sel = run_selection(LinearEngine(costs), itertools.repeat(None), [10, 20, 30, 40, 50, 60], **settings)
    assert sel.indices == [1, 3, 5] and sel.steps == [20, 40, 60]


def test_select_is_run_selection_over_the_mixed_loss() -> None:
    model, traj, batches = ref.make_problem("mlp", n=4)
    options = dict(top_k=2, samples=2, steps=4, seed=3)
    engine = MixedLoss(traj, model, ref.cross_entropy)
    _, settings = select_settings(**options)
    by_hand = run_selection(engine, cycle_batches(batches), traj.steps, **settings)
    assert torch.equal(by_hand.probabilities, sewa.select(traj, model, ref.cross_entropy, batches, **options).probabilities)


def test_select_on_a_read_only_view_refuses_rows_its_writer_overwrote(tmp_path) -> None:
    """Issue 12.2 for selections: a read-only DiskTrajectory whose writer wraps the ring during
    the selection must not return a selection learned partly on other snapshots."""
    model, _, batches = ref.make_problem("mlp", n=2)
    writer = sewa.DiskTrajectory(tmp_path, model, window=2, sync=False)
    writer.push(model, step=1)
    writer.push(model, step=2)
    reader = sewa.DiskTrajectory.open(tmp_path, readonly=True)

    def meddling(out: Tensor, y: Tensor) -> Tensor:
        if writer.steps[-1] < 4:
            writer.push(model, step=writer.steps[-1] + 1)
        return ref.cross_entropy(out, y)

    with pytest.raises(TrajectoryError, match=r"writer has since dropped or moved steps \[1, 2\]"):
        sewa.select(reader, model, meddling, batches, top_k=1, samples=1, steps=3)
    with pytest.raises(TrajectoryError, match="dropped or moved"):
        sewa.trainable_average(reader, model, ref.cross_entropy, batches, steps=1)


def test_select_settings_are_selects_defaults() -> None:
    engine, settings = select_settings(top_k=3, device="cpu")
    assert engine == {"batch_stats": True, "vectorize": None, "device": "cpu"}
    assert settings["top_k"] == 3 and settings["steps"] == 200 and settings["progress"] is None
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['topk'\]"):
        select_settings(topk=3)


def _one_step_gradient(noise: str, seed: int, samples: int = 4) -> Tensor:
    """The gradient on φ of one SeWA step (SGD, lr 1, no budget) on a fixed quadratic in the mix."""
    target = torch.linspace(1.0, 0.0, 6, dtype=torch.float64)
    target = target / target.sum()

    def engine(mix: Tensor, batch: object) -> tuple[float, Tensor]:
        diff = mix - target
        return float((diff ** 2).sum(1).mean()), 2 * diff / mix.shape[0]

    sel = run_selection(engine, itertools.repeat(None), list(range(6)), top_k=3, samples=samples, steps=1, tau_start=1.0,
                        tau_end=1.0, lr=1.0, optimizer="sgd", budget=False, seed=seed, progress=False, noise=noise, patience=0,
                        knots=0)
    start = torch.zeros(6, dtype=torch.float64)  # logit(3/6)
    return start - torch.logit(sel.probabilities.double())


def test_antithetic_noise_lowers_the_gradients_variance_for_the_same_samples() -> None:
    grads = {noise: torch.stack([_one_step_gradient(noise, seed) for seed in range(1000)]) for noise in ("independent", "antithetic")}
    var = {noise: float(g.var(0).sum()) for noise, g in grads.items()}
    assert var["antithetic"] < 0.85 * var["independent"]  # measured 0.72 at 300 seeds
    mean_gap = (grads["antithetic"].mean(0) - grads["independent"].mean(0)).abs().max()
    assert float(mean_gap) < 4 * (var["independent"] / 1000) ** 0.5  # the same expected gradient


def test_antithetic_noise_needs_an_even_number_of_samples() -> None:
    with pytest.raises(ValueError, match="samples must be even"):
        _one_step_gradient("antithetic", 0, samples=3)
    with pytest.raises(ValueError, match="noise must be"):
        _one_step_gradient("gaussian", 0)


def _quadratic_selection(patience: int, steps: int = 300, knots: int = 0) -> sewa.Selection:
    """SeWA (budget K=3 of 6) on a fixed quadratic whose best mix favours the three oldest snapshots."""
    target = torch.tensor([0.4, 0.35, 0.25, 0.0, 0.0, 0.0], dtype=torch.float64)

    def engine(mix: Tensor, batch: object) -> tuple[float, Tensor]:
        diff = mix - target
        return float((diff ** 2).sum(1).mean()), 2 * diff / mix.shape[0]

    return run_selection(engine, itertools.repeat(None), list(range(6)), top_k=3, samples=4, steps=steps, tau_start=1.0,
                         tau_end=0.1, lr=0.05, optimizer="adam", budget=True, seed=0, progress=False, noise="independent",
                         patience=patience, knots=knots)


def test_patience_stops_once_the_top_k_set_is_stable_and_keeps_the_choice() -> None:
    full, early = _quadratic_selection(0), _quadratic_selection(20)
    assert full.config["steps_run"] == 300 == len(full.history["loss"])
    assert 20 < early.config["steps_run"] < 300 and len(early.history["loss"]) == early.config["steps_run"]
    assert early.indices == full.indices == [0, 1, 2]
    with pytest.raises(ValueError, match="patience must be a non-negative integer"):
        _quadratic_selection(-1)


def test_knots_make_the_logits_piecewise_linear_and_keep_the_budget() -> None:
    """12 snapshots whose best mix is the newest third: 4 knots learn a logit that is linear
    between knots, sums to the budget and still picks the newest snapshots."""
    n, k = 12, 4
    target = torch.cat([torch.zeros(8), torch.full((4,), 0.25)]).double()

    def engine(mix: Tensor, batch: object) -> tuple[float, Tensor]:
        diff = mix - target
        return float((diff ** 2).sum(1).mean()), 2 * diff / mix.shape[0]

    def run(knots: int) -> sewa.Selection:
        return run_selection(engine, itertools.repeat(None), list(range(n)), top_k=k, samples=4, steps=150, tau_start=1.0,
                             tau_end=0.1, lr=0.05, optimizer="adam", budget=True, seed=0, progress=False,
                             noise="independent", patience=0, knots=knots)

    sel = run(4)
    assert sel.indices == [8, 9, 10, 11] and sel.config["knots"] == 4
    phi = torch.logit(sel.probabilities.double())
    assert float(torch.sigmoid(phi).sum()) == pytest.approx(k, abs=1e-4)
    # Knots at positions 0, 11/3, 22/3, 11: within each segment the logit is linear in position.
    basis = knot_basis(n, 4)
    assert basis is not None and basis.shape == (n, 4)
    torch.testing.assert_close(basis.sum(1), torch.ones(n, dtype=torch.float64))
    knots_phi = torch.linalg.lstsq(basis, phi[:, None]).solution
    torch.testing.assert_close(basis @ knots_phi, phi[:, None], rtol=0, atol=1e-4)
    assert float(phi[-1] - phi[0]) > 1.0  # it learned something
    # 0 and at least n knots are the paper's free logits, bit for bit.
    assert knot_basis(n, 0) is None and knot_basis(n, n) is None
    torch.testing.assert_close(run(n).probabilities, run(0).probabilities, rtol=0, atol=0)
    for bad in (1, -2, 2.5, True):
        with pytest.raises(ValueError, match="knots must be 0"):
            run(bad)  # type: ignore[arg-type]
