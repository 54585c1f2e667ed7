"""One rule for the wrapper prefixes that DDP, ``torch.compile`` and Lightning add to names.

* From a **model**, a prefix is removed only where a wrapper module really is:
  ``DistributedDataParallel`` adds ``module.``, ``torch.compile``'s ``OptimizedModule`` adds
  ``_orig_mod.`` (also below a compiled submodule, e.g. ``encoder._orig_mod.fc.weight``). A
  user's own submodule that happens to be called ``module`` keeps its name.
* From a **state dict** (a checkpoint file), a prefix (``module.``, ``model.``, ``_orig_mod.``)
  is removed only when every key carries it, and, when the names the target model expects are
  known, only while the keys do not already match them. Removing a prefix shared by every key
  cannot make two keys collide. Without expected names (no model), :func:`strip_shared_prefixes`
  is only applied on request, so averaging files without a model keeps their keys.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["STATE_DICT_PREFIXES", "canonical_name", "model_names", "named_parameters", "strip_shared_prefixes"]

# What wrappers prepend to every key of a saved state dict: Lightning (``model.``), DDP
# (``module.``) and torch.compile (``_orig_mod.``).
STATE_DICT_PREFIXES = ("model.", "module.", "_orig_mod.")
_MODEL_WRAPPER_ATTRS = ("_orig_mod.", "module.")


def canonical_name(name: str) -> str:
    """Strips the prefixes that ``torch.compile`` (``_orig_mod.``) and DDP (``module.``) add to one name.

    A single name carries no context, so this may over-strip a submodule really called
    ``module``; for a whole model use :func:`model_names`, which removes a prefix only where a
    wrapper module is.
    """
    changed = True
    while changed:
        changed = False
        for prefix in _MODEL_WRAPPER_ATTRS:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
        name = name.replace("._orig_mod.", ".")
    return name


def _wrapper_segments(model: nn.Module) -> list[str]:
    """``"<path>.<attr>."`` of every wrapper in ``model``, deepest first."""
    segments = []
    for path, module in model.named_modules(remove_duplicate=False):
        attr = None
        if isinstance(module, nn.parallel.DistributedDataParallel):
            attr = "module"
        elif type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module):
            attr = "_orig_mod"
        if attr is not None:
            segments.append(f"{path}.{attr}." if path else f"{attr}.")
    return sorted(set(segments), key=len, reverse=True)


def model_names(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Maps each raw name of ``model`` (from ``named_parameters``/``named_buffers``) to its
    name without the wrappers' segments.

    Raises:
        ValueError: if two names become one (which removing real wrappers cannot cause).
    """
    segments = _wrapper_segments(model)
    out: dict[str, str] = {}
    for raw in names:
        name = raw
        for seg in segments:
            outer = seg[: seg.rstrip(".").rfind(".") + 1]  # "<path>." before the wrapper's attribute
            if name.startswith(seg):
                name = outer + name[len(seg) :]
        out[raw] = name
    _refuse_collision(out)
    return out


def named_parameters(model: nn.Module, expected: Collection[str] | None = None) -> dict[str, nn.Parameter]:
    """``model.named_parameters()`` under the names a :class:`~sewa.Trajectory` records.

    Wrappers' segments are removed by :func:`model_names`; when ``expected`` (e.g. a
    trajectory's ``names``) is given and still not matched, a prefix shared by every name is
    removed too (a wrapper of the user's own, such as Lightning's ``model.``).
    """
    params = list(model.named_parameters())
    names = model_names(model, [n for n, _ in params])
    if expected is not None and not set(expected) <= set(names.values()):
        again = strip_shared_prefixes(names.values(), expected)
        names = {raw: again[name] for raw, name in names.items()}
    return {names[raw]: p for raw, p in params}


def strip_shared_prefixes(keys: Iterable[str], expected: Collection[str] | None = None) -> dict[str, str]:
    """Maps each key to its name without the wrapper prefixes shared by every key.

    Args:
        keys: State-dict keys.
        expected: Names the target model has. When given, a prefix is removed only while
            ``expected`` is not yet a subset of the keys, so a model whose submodule really is
            called ``model`` keeps its names; a compiled submodule's ``._orig_mod.`` segment is
            removed too when that alone makes the keys match.
    """
    raw = list(keys)
    current = list(raw)
    want = set(expected) if expected is not None else None

    def matches(names: list[str]) -> bool:
        return want is not None and want <= set(names)

    while not matches(current):
        prefix = next((p for p in STATE_DICT_PREFIXES if current and all(k.startswith(p) for k in current)), None)
        if prefix is None:
            break
        current = [k[len(prefix) :] for k in current]
    if want is not None and not matches(current):
        inner = [k.replace("._orig_mod.", ".") for k in current]
        if matches(inner) and len(set(inner)) == len(inner):
            current = inner
    out = dict(zip(raw, current, strict=True))
    _refuse_collision(out)
    return out


def _refuse_collision(mapping: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    for raw, name in mapping.items():
        if name in seen:
            raise ValueError(f"{seen[name]!r} and {raw!r} would both be called {name!r} once the wrapper prefix "
                             "is removed; rename one of them")
        seen[name] = raw


def _named_tensors(source: nn.Module | Mapping[str, Any], buffers: bool) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Tensor]]:
    """Splits a model or state dict into (recorded tensors, aliases, other entries).

    From a model, recorded tensors are the floating-point parameters (and floating-point
    buffers when ``buffers``), named without the wrappers' prefixes (:mod:`sewa._names`);
    ``aliases`` maps the second name of a tied parameter to its first. From a state dict,
    every floating-point entry is recorded under its own key.
    """
    recorded: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    others: dict[str, Tensor] = {}
    if isinstance(source, nn.Module):
        params = list(source.named_parameters(remove_duplicate=False))
        bufs = [(f"{m}.{b}" if m else b, t, m_obj) for m, m_obj in source.named_modules(remove_duplicate=False)
                for b, t in m_obj._buffers.items() if t is not None and b not in m_obj._non_persistent_buffers_set]
        names = model_names(source, [n for n, _ in params] + [n for n, _, _ in bufs])
        seen: dict[int, str] = {}
        for raw, p in params:
            name = names[raw]
            if id(p) in seen:
                aliases[name] = seen[id(p)]
                continue
            seen[id(p)] = name
            (recorded if p.is_floating_point() else others)[name] = p.detach()
        for raw, b, _ in bufs:
            (recorded if buffers and b.is_floating_point() else others)[names[raw]] = b.detach()
        return recorded, aliases, others
    if not isinstance(source, Mapping):
        raise TypeError(f"expected an nn.Module or a state dict, got {type(source).__name__}")
    for name, t in source.items():
        if isinstance(t, Tensor):
            (recorded if t.is_floating_point() else others)[str(name)] = t.detach()
    return recorded, aliases, others
