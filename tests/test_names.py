"""The one wrapper-prefix rule (sewa._names): real wrappers and shared prefixes only, never a collision."""

from __future__ import annotations

import torch
from torch import nn

import sewa
from sewa._names import model_names, named_parameters, strip_shared_prefixes


def test_named_parameters_follow_the_trajectory_names() -> None:
    class Holder(nn.Module):  # a wrapper of the user's own: every name under "model."
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.model = inner

    inner = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    names = sewa.Trajectory(inner, 1).names
    assert list(named_parameters(inner)) == names
    assert list(named_parameters(Holder(inner))) == [f"model.{n}" for n in names]
    assert list(named_parameters(Holder(inner), expected=names)) == names



def test_nested_wrappers_and_state_dict_prefixes() -> None:
    inner = nn.Sequential(nn.Linear(2, 3))
    outer = nn.Sequential()
    outer.add_module("encoder", torch.compile(inner))  # a compiled submodule: "encoder._orig_mod.0.weight"
    raw = [n for n, _ in outer.named_parameters()]
    assert list(model_names(outer, raw).values()) == ["encoder.0.weight", "encoder.0.bias"]
    keys = ["module.model.a", "module.model.b"]
    assert list(strip_shared_prefixes(keys).values()) == ["a", "b"]
    assert list(strip_shared_prefixes(keys, expected=["model.a"]).values()) == ["model.a", "model.b"]
    assert list(strip_shared_prefixes(["module.a", "b"]).values()) == ["module.a", "b"]  # not shared: kept
    # "._orig_mod." is dropped only when that alone makes the keys match, and never merges two keys
    assert list(strip_shared_prefixes(["x._orig_mod.a"], expected=["x.a"]).values()) == ["x.a"]
    assert list(strip_shared_prefixes(["x._orig_mod.a", "x.a"], expected=["x.a", "x.b"]).values()) == ["x._orig_mod.a", "x.a"]
