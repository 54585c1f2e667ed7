"""Tests of the selection engine (sewa._engine, sewa._columns, sewa._batch): the fast paths
against the slow float64 reference of tests/reference.py, and the batch plumbing."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import reference as ref
import torch
from torch import Tensor, nn

import sewa
from sewa import _batch
from sewa._columns import Columns
from sewa._engine import MixedLoss, batch_statistics, restore_statistics

KINDS = ["mlp", "cnn_bn", "tied"]


def fast_logit_grad(engine: MixedLoss, logits: Tensor, noise: Tensor, tau: float, batch: ref.Batch) -> Tensor:
    """∂loss/∂φ of one step through the fast path: the relaxation exactly as ``select`` writes it,
    then ``MixedLoss`` for ∂loss/∂mix, then autograd back through the masks only."""
    return fast_step(engine, logits, noise, tau, batch)[1]


def fast_step(engine: MixedLoss, logits: Tensor, noise: Tensor, tau: float, batch: ref.Batch) -> tuple[float, Tensor]:
    """(loss, ∂loss/∂φ) of one step through ``MixedLoss.__call__``."""
    phi = logits.clone().requires_grad_(True)
    mix = torch.softmax(nn.functional.logsigmoid((phi + noise) / tau), dim=1)
    loss, grad_mix = engine(mix.detach(), batch)
    mix.backward(grad_mix.to(mix.dtype))
    assert phi.grad is not None
    return loss, phi.grad


def fast_step_float64(traj: sewa.Trajectory, model: nn.Module, logits: Tensor, noise: Tensor, tau: float,
                      batch: ref.Batch) -> tuple[float, Tensor]:
    """(loss, ∂loss/∂φ) of one step through the engine computing in float64 (``model`` is float64)."""
    engine = MixedLoss(traj, model, ref.cross_entropy, dtype=torch.float64)
    return fast_step(engine, logits, noise, tau, batch)


def spread_logits(n: int, top_k: int) -> Tensor:
    """Logits away from the symmetric start, so every snapshot gets a different mask."""
    return ref.initial_logits(n, top_k) + torch.linspace(-1.0, 1.0, n, dtype=torch.float64)


# ----------------------------------------------------------------- reference semantics
@pytest.mark.parametrize("kind", KINDS)
def test_reference_loss_of_one_snapshot_is_the_model_loss(kind: str) -> None:
    """The reference mixes like loading a state dict: a one-hot mask gives the loss of a real
    model loaded with that snapshot (train mode: BatchNorm on batch statistics)."""
    model, traj, batches = ref.make_problem(kind, n=4)
    x, y = batches[0]
    net = ref.reference_model(model)
    snaps = ref.snapshots(traj)
    for i in range(len(traj)):
        loaded = ref.MODELS[kind]().double()
        loaded.load_state_dict(traj.snapshot(i))
        loaded.train()
        expected = ref.cross_entropy(loaded(ref.as_float64(x)), y)
        a = torch.zeros(1, len(traj), dtype=torch.float64)
        a[0, i] = 1.0
        got = ref.mixed_loss(a, snaps, net, ref.cross_entropy, (ref.as_float64(x), y), traj.aliases)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- fast path == reference
@pytest.mark.parametrize("kind", KINDS)
def test_step_gradient_matches_reference_float32(kind: str) -> None:
    """End to end through ``MixedLoss.__call__`` (which computes in float32) against the
    float64 reference on the same stored snapshots."""
    model, traj, batches = ref.make_problem(kind, n=5)
    samples, tau = 3, 0.7
    noise = ref.noise_stream(0, samples, len(traj))()
    logits = spread_logits(len(traj), 2)
    engine = MixedLoss(traj, model, ref.cross_entropy)
    x, y = batches[0]
    fast = fast_logit_grad(engine, logits, noise, tau, (x, y))
    _, slow = ref.step_grad(logits, noise, tau, ref.snapshots(traj), ref.reference_model(model),
                            ref.cross_entropy, (ref.as_float64(x), y), traj.aliases)
    assert float(slow.abs().max()) > 1e-3  # a gradient worth comparing
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_step_gradient_matches_reference_float64(kind: str) -> None:
    """The engine in float64 against the float64 reference, within 1e-5 (see fast_step_float64)."""
    model, traj, batches = ref.make_problem(kind, n=5, model_dtype=torch.float64)
    samples, tau = 3, 0.7
    noise = ref.noise_stream(1, samples, len(traj))()
    logits = spread_logits(len(traj), 2)
    fast_loss, fast = fast_step_float64(traj, model, logits, noise, tau, batches[0])
    loss, slow = ref.step_grad(logits, noise, tau, ref.snapshots(traj), ref.reference_model(model),
                               ref.cross_entropy, batches[0], traj.aliases)
    assert fast_loss == pytest.approx(loss, rel=1e-12)
    assert float(slow.abs().max()) > 1e-3
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-12)  # in fact far tighter


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_compact_storage_in_chunks_matches_reference(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compact storage is widened chunk by chunk; the chunks must add up to the whole."""
    monkeypatch.setattr("sewa._columns._CHUNK_BYTES", 1)  # 1024 columns per chunk: 3 chunks here
    model, traj, batches = ref.make_problem("wide_mlp", n=4, storage=storage)
    assert traj.num_params == 2703
    samples, tau = 2, 0.5
    noise = ref.noise_stream(2, samples, len(traj))()
    logits = spread_logits(len(traj), 2)
    engine = MixedLoss(traj, model, ref.cross_entropy)
    assert len(list(engine.columns.chunks())) == 3
    x, y = batches[0]
    fast = fast_logit_grad(engine, logits, noise, tau, (x, y))
    _, slow = ref.step_grad(logits, noise, tau, ref.snapshots(traj), ref.reference_model(model),
                            ref.cross_entropy, (ref.as_float64(x), y), traj.aliases)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_every_way_to_run_the_samples_agrees(kind: str) -> None:
    """vmap, the direct loop (CPU default) and the functional loop give the same gradient."""
    model, traj, batches = ref.make_problem(kind, n=5)
    noise = ref.noise_stream(0, 3, len(traj))()
    logits = spread_logits(len(traj), 2)
    grads = {}
    for way in ("vmap", "direct", "functional"):
        engine = MixedLoss(traj, model, ref.cross_entropy, vectorize=way == "vmap")
        if way == "functional":  # the fallback for models the direct loop cannot drive
            engine.passes._direct_checked, engine.passes._direct = True, None
        grads[way] = fast_logit_grad(engine, logits, noise, 0.7, batches[0])
        # A second call reuses the engine's buffers: same inputs, same answer.
        torch.testing.assert_close(fast_logit_grad(engine, logits, noise, 0.7, batches[0]), grads[way], rtol=0, atol=0)
    torch.testing.assert_close(grads["vmap"], grads["direct"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads["functional"], grads["direct"], rtol=1e-5, atol=1e-7)


def test_recorded_batchnorm_statistics_are_not_used_on_batch_statistics() -> None:
    """A trajectory that records buffers (``buffers=True``) holds BatchNorm running statistics.

    Under batch statistics (the default) they must play no part, and they are never
    differentiated (``native_batch_norm`` refuses running statistics that require grad).
    """
    model, traj, batches = ref.make_problem("cnn_bn", n=5, buffers=True)
    assert {"bn.running_mean", "bn1.running_var"} <= set(traj.names)
    noise = ref.noise_stream(0, 3, len(traj))()
    logits = spread_logits(len(traj), 2)
    x, y = batches[0]
    fast = fast_logit_grad(MixedLoss(traj, model, ref.cross_entropy), logits, noise, 0.7, (x, y))
    snaps = ref.snapshots(traj, skip=ref.bn_statistics(model))
    _, slow = ref.step_grad(logits, noise, 0.7, snaps, ref.reference_model(model), ref.cross_entropy,
                            (ref.as_float64(x), y), traj.aliases)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    sel = sewa.select(traj, model, ref.cross_entropy, batches, top_k=2, samples=2, steps=3)
    assert len(sel.indices) == 2


def test_mix_weights_and_loss_of_give_the_averaged_models_loss() -> None:
    """What the evaluator uses: the average's flat vector, its outputs and its loss equal those
    of a model loaded with ``sewa.average`` (eval mode, no BatchNorm here)."""
    model, traj, batches = ref.make_problem("mlp", n=3)
    engine = MixedLoss(traj, model, ref.cross_entropy)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    flat = engine.mix_weights(w)
    loaded = ref.MLP()
    loaded.load_state_dict(sewa.average(traj, w))
    x, y = batches[0]
    torch.testing.assert_close(engine.loss_of(flat, x, y), ref.cross_entropy(loaded(x), y), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(engine.outputs_of(flat, x), loaded(x), rtol=1e-6, atol=1e-6)


def test_columns_of_no_width_give_zero_gradients() -> None:
    """A rank may hold no columns (more ranks than parameters): both products still have shape."""
    cols = Columns(torch.zeros(3, 0), torch.tensor([2, 0, 1]))
    a = torch.softmax(torch.randn(2, 3), dim=1)
    assert cols.mix(cols.to_rows(a)).shape == (2, 0)
    assert torch.equal(cols.grad(torch.zeros(2, 0)), torch.zeros(2, 3))


def test_columns_put_weights_on_rows_in_slot_order() -> None:
    """``order[i]`` is the row of the i-th oldest snapshot: A Θ must weigh each row by its
    snapshot's weight, and G Θᵀ come back oldest first."""
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # slots 0, 1, 2
    cols = Columns(rows, torch.tensor([2, 0, 1]))  # oldest in slot 2, then 0, then 1
    a = torch.tensor([[1.0, 0.0, 0.0]])  # all weight on the oldest
    torch.testing.assert_close(cols.mix(cols.to_rows(a)), torch.tensor([[1.0, 1.0]]))
    g = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(cols.to_oldest(cols.grad(g), a), torch.tensor([[3.0, 1.0, 2.0]]))


# ----------------------------------------------------------------- batch plumbing
class Keywords(nn.Module):
    def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
        return x * scale


def test_forward_conventions() -> None:
    x = torch.ones(2)
    assert torch.equal(_batch.forward(Keywords(), x), x)
    assert torch.equal(_batch.forward(Keywords(), (x, 3.0)), 3 * x)
    assert torch.equal(_batch.forward(Keywords(), {"x": x, "scale": 2.0}), 2 * x)
    assert _batch.inputs_of((x, 0)) is x and _batch.inputs_of(x) is x
    moved = _batch.to_device({"a": [x, (x,)], "b": 3}, torch.device("cpu"))
    assert torch.equal(moved["a"][1][0], x) and moved["b"] == 3


def test_split_batch_names_what_it_got() -> None:
    assert _batch.split_batch([1, 2]) == (1, 2)
    with pytest.raises(ValueError, match=r"\(inputs, targets\) pair, got tuple"):
        _batch.split_batch((1, 2, 3))


def test_cycle_batches_reads_an_iterator_once_and_keeps_it() -> None:
    reads = []

    def gen() -> Iterator[int]:
        for i in range(3):
            reads.append(i)
            yield i

    assert list(itertools.islice(_batch.cycle_batches(gen()), 7)) == [0, 1, 2, 0, 1, 2, 0]
    assert reads == [0, 1, 2]


def test_cycle_batches_takes_from_an_endless_iterator_without_storing_it_all() -> None:
    """``itertools.cycle`` is an endless one-shot iterator: it is used lazily, never listed."""
    endless = itertools.cycle([1, 2])
    assert list(itertools.islice(_batch.cycle_batches(endless), 5)) == [1, 2, 1, 2, 1]


def test_cycle_batches_bounds_what_it_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_batch, "MAX_BATCHES", 4)
    feed = _batch.cycle_batches(itertools.count())
    with pytest.raises(ValueError, match=r"more than 4 batches.*not an endless one such as itertools.cycle"):
        list(itertools.islice(feed, 10))


def test_cycle_batches_refuses_an_empty_pass() -> None:
    used = iter([1, 2])
    list(used)  # something else already read it
    with pytest.raises(ValueError, match="iterator given is empty \\(or was already used up\\)"):
        next(_batch.cycle_batches(used))
    with pytest.raises(ValueError, match="has no batches"):
        next(_batch.cycle_batches([]))


def test_non_finite_loss_surfaces_from_the_engine() -> None:
    """The engine hands a NaN loss through (select decides what to do): no exception, no
    silent replacement."""
    model, traj, batches = ref.make_problem("mlp", n=3)
    engine = MixedLoss(traj, model, lambda out, y: ref.cross_entropy(out, y) * math.nan)
    loss, grad = engine(torch.full((1, 3), 1 / 3, dtype=torch.float64), batches[0])
    assert math.isnan(loss) and bool(grad.isnan().any())


def test_batch_statistics_are_put_back_as_they_were() -> None:
    """The FSDP engine borrows the user's model: BatchNorm goes on batch statistics for the
    selection and comes back with the very same running tensors."""
    model = ref.ConvBN()
    before = {n: b for n, b in model.named_buffers()}
    saved = batch_statistics(model)
    assert model.bn.running_mean is None and not model.bn1.track_running_stats
    assert dict(model.named_buffers()) == {}
    restore_statistics(saved)
    assert model.bn.track_running_stats and all(b is before[n] for n, b in model.named_buffers())
    assert before.keys() == dict(model.named_buffers()).keys()
