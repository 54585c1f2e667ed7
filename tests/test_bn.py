"""Tests of sewa.update_bn and sewa.has_batchnorm, against torch.optim.swa_utils.update_bn itself."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn as torch_update_bn

import sewa
from sewa import _batch
from sewa.bn import has_batchnorm


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2))


def bn_batches(count: int = 3) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, generator=gen) * 2 + 1, torch.zeros(8)) for _ in range(count)]


def statistics(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def assert_same_statistics(a: nn.Module, b: nn.Module) -> None:
    sa, sb = statistics(a), statistics(b)
    assert sa.keys() == sb.keys() and sa
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("torch_order", [False, True])
def test_update_bn_equals_torch_in_either_argument_order(torch_order: bool) -> None:
    """Issue 13.3: torch's order ``update_bn(loader, model)`` used to fail with AttributeError."""
    batches = bn_batches()
    ours, theirs = bn_model(), bn_model()
    out = sewa.update_bn(batches, ours) if torch_order else sewa.update_bn(ours, batches)
    assert out is ours
    torch_update_bn(batches, theirs)
    assert_same_statistics(ours, theirs)


def test_update_bn_refuses_two_models_or_no_model() -> None:
    with pytest.raises(TypeError, match=r"\(model, batches\) or torch's \(loader, model\): got \(list, list\)"):
        sewa.update_bn([], [])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got \\(Sequential, Sequential\\)"):
        sewa.update_bn(bn_model(), bn_model())


def test_update_bn_by_hand() -> None:
    # BatchNorm straight on the inputs: with equal batches, the recomputed running mean is the mean
    # of all inputs and the running variance the mean of the per-batch unbiased variances.
    model = nn.Sequential(nn.BatchNorm1d(3))
    batches = bn_batches(count=4)
    model.train()
    reference = copy.deepcopy(model)
    sewa.update_bn(model, batches)
    xs = torch.stack([x for x, _ in batches])
    torch.testing.assert_close(model[0].running_mean, xs.mean(dim=(0, 1)))
    torch.testing.assert_close(model[0].running_var, xs.var(dim=1, unbiased=True).mean(dim=0))
    assert model.training  # the mode is restored
    torch_update_bn((x for x, _ in batches), reference)
    torch.testing.assert_close(model[0].running_var, reference[0].running_var, rtol=0, atol=0)


class KeywordBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3, affine=False)  # no parameters at all: the device comes from buffers

    def forward(self, x: Tensor, shift: float = 0.0) -> Tensor:
        return self.bn(x + shift)


def test_update_bn_with_keyword_inputs() -> None:
    model = KeywordBN()
    batches = [({"x": x, "shift": 1.0}, y) for x, y in bn_batches()]
    sewa.update_bn(model, batches)
    reference = nn.BatchNorm1d(3, affine=False)
    torch_update_bn([x + 1.0 for x, _ in bn_batches()], reference)
    torch.testing.assert_close(model.bn.running_mean, reference.running_mean, rtol=0, atol=0)


def test_update_bn_needs_batches() -> None:
    with pytest.raises(ValueError, match="no batches"):
        sewa.update_bn(bn_model(), [])
    used = iter(bn_batches())
    list(used)
    with pytest.raises(ValueError, match="already used up"):
        sewa.update_bn(bn_model(), used)
    plain = nn.Linear(2, 2)
    assert sewa.update_bn(plain, []) is plain  # nothing to recompute
    assert has_batchnorm(bn_model()) and not has_batchnorm(plain)
    assert not has_batchnorm(nn.BatchNorm1d(2, track_running_stats=False))


def test_update_bn_bounds_an_endless_iterator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12.10: an endless ``batches`` fails after ``MAX_BATCHES`` instead of running forever."""
    monkeypatch.setattr(_batch, "MAX_BATCHES", 5)
    model = bn_model()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="more than 5 batches"):
        sewa.update_bn(model, itertools.cycle(bn_batches()))
    assert not model.training  # the mode is restored
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    assert before.keys() == model.state_dict().keys()
