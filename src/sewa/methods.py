"""Averaging methods as small frozen objects, and the registry that names them.

A method is made by a constructor that owns its settings and their defaults, in the style of
optax's transforms::

    m = sewa.methods.lawa(top_k=10)
    result = m.weights(trajectory)                   # MethodResult: weights, seconds, info
    m = sewa.methods.sewa(top_k=10, steps=200)
    result = m.weights(trajectory, Evaluator(model, loss_fn, val_batches))

Every method gives mixing weights over the held snapshots (oldest first) followed by one
weighted average (:func:`sewa.average`). The rules themselves are the pure functions of
:mod:`sewa.weights`; SeWA and the learned soup run the engine of :mod:`sewa.select`.

The registry :data:`METHODS` maps a name to its constructor. The command line builds its flags
and their help from the constructors' signatures and docstrings (:func:`settings_of`), and the
callbacks and experiments build methods through the same constructors: a default lives in one
place. Adding a rule is one constructor plus one :func:`register` call.
"""

from __future__ import annotations

import inspect
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor

from . import weights as rules
from .evaluator import EvaluationError, Evaluator, make_evaluator
from .select import select, trainable_average
from .trajectory import Trajectory

__all__ = [
    "Method", "MethodResult", "MethodError", "Evaluator", "EvaluationError", "Setting", "METHODS", "ALIASES", "DEFAULT_METHODS",
    "register", "create", "canonical", "settings_of", "make_evaluator",
    "last", "uniform", "lawa", "ema", "random_k", "greedy_soup", "learned_soup", "sewa",
]

Rule = Callable[[Trajectory, "Evaluator | None", Mapping[str, Any]], "tuple[Tensor, dict[str, Any]]"]


class MethodError(ValueError):
    """A method cannot run as asked (an unknown name, a bad setting, a missing selection split)."""


@dataclass
class MethodResult:
    """Weights chosen by one method, how long it took, and what it learned.

    Attributes:
        name: The method's registry name.
        weights: Mixing weights over the snapshots, oldest first (non-negative, sum 1).
        seconds: Wall-clock time of the method itself (not of evaluating its average).
        info: JSON-ready details: the settings, and e.g. SeWA's ``probabilities`` and ``indices``.
    """

    name: str
    weights: Tensor
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """An averaging method: its name, its settings, and the rule that gives its weights.

    Made by a constructor (:func:`lawa`, :func:`sewa`, ...); :meth:`replace` makes a changed copy.

    Attributes:
        name: The registry name (``"lawa"``, ``"sewa"``, ...).
        settings: The settings, read-only (``{"top_k": 10}``).
        evaluates: Whether it scores averages on a selection split (needs an :class:`Evaluator`).
        rule: ``rule(trajectory, evaluator, settings) -> (weights, info)``.
    """

    name: str
    settings: Mapping[str, Any]
    rule: Rule = field(repr=False, compare=False)
    evaluates: bool = False

    @property
    def top_k(self) -> int | None:
        """``K`` when the method averages a chosen ``K`` snapshots, else ``None``."""
        value = self.settings.get("top_k")
        return None if value is None else int(value)

    @property
    def label(self) -> str:
        """A short display name, e.g. ``lawa(top_k=10)``."""
        inner = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{self.name}({inner})"

    def replace(self, **changes: Any) -> Method:
        """The same method with some settings changed (checked by its constructor)."""
        unknown = sorted(set(changes) - set(self.settings))
        if unknown:
            raise MethodError(f"method {self.name!r} has no setting {', '.join(unknown)}: its settings are "
                              f"{', '.join(self.settings) or 'none'}")
        return create(self.name, **({**self.settings, **changes}))

    def weights(self, trajectory: Trajectory, evaluator: Evaluator | None = None) -> MethodResult:
        """Runs the method on ``trajectory``.

        Args:
            trajectory: The snapshots.
            evaluator: The selection split; required when :attr:`evaluates`.

        Returns:
            The :class:`MethodResult`, whose ``info`` holds the settings and what was learned.
        """
        n = len(trajectory)
        if n == 0:
            raise MethodError(f"method {self.name!r}: the trajectory holds no snapshots")
        if self.top_k is not None and self.top_k > n:
            raise MethodError(f"method {self.name!r}: top_k={self.top_k} is larger than the number of snapshots ({n}): "
                              "pass a smaller top_k or record more snapshots")
        if self.evaluates and evaluator is None:
            raise MethodError(f"method {self.name!r} evaluates averaged models: it needs a model, a loss and selection "
                              "batches (an Evaluator, or a task file on the command line)")
        start = time.perf_counter()
        w, info = self.rule(trajectory, evaluator, self.settings)
        seconds = time.perf_counter() - start
        return MethodResult(self.name, rules.check_weights(w, n), seconds, dict(self.settings) | info)


# --------------------------------------------------------------------------- registry
METHODS: dict[str, Callable[..., Method]] = {}
ALIASES: dict[str, str] = {}
_DEPRECATED: dict[str, str] = {}
DEFAULT_METHODS = ("last", "uniform", "lawa", "ema", "random_k", "greedy_soup", "sewa", "auto")


def register(name: str, constructor: Callable[..., Method], *, aliases: Iterable[str] = (),
             deprecated: Iterable[str] = ()) -> Callable[..., Method]:
    """Registers ``constructor`` under ``name``; ``aliases`` name it too, ``deprecated`` names
    still work with a :class:`DeprecationWarning`. Returns the constructor."""
    METHODS[name] = constructor
    for alias in aliases:
        ALIASES[alias] = name
    for old in deprecated:
        ALIASES[old] = name
        _DEPRECATED[old] = name
    return constructor


def canonical(name: str) -> str:
    """The registry name for ``name`` (an alias or an old name), or a ``ValueError``."""
    if name in METHODS:
        return name
    if name in ALIASES:
        if name in _DEPRECATED:
            warnings.warn(f"method name {name!r} is deprecated: use {ALIASES[name]!r}", DeprecationWarning, stacklevel=3)
        return ALIASES[name]
    raise MethodError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")


def create(name: str, **settings: Any) -> Method:
    """The method registered as ``name`` with the given settings; settings it does not take are
    ignored, so one set of options (e.g. the CLI's) can build any method."""
    constructor = METHODS[canonical(name)]
    accepted = settings_of(constructor)
    return constructor(**{k: v for k, v in settings.items() if k in accepted and v is not None})


@dataclass(frozen=True)
class Setting:
    """One setting of a method constructor: its default, its type and its help line."""

    name: str
    default: Any
    type: type
    help: str


def settings_of(constructor: Callable[..., Any]) -> dict[str, Setting]:
    """The settings a constructor takes, read from its signature (defaults, types) and the
    ``Args:`` section of its docstring (help)."""
    source = getattr(constructor, "settings_source", constructor)
    helps = _arg_help(inspect.getdoc(source) or "")
    out: dict[str, Setting] = {}
    skip = getattr(constructor, "settings_skip", ())
    for p in inspect.signature(source).parameters.values():
        if p.kind is not p.KEYWORD_ONLY and p.kind is not p.POSITIONAL_OR_KEYWORD or p.default is p.empty or p.name in skip:
            continue
        out[p.name] = Setting(p.name, p.default, type(p.default), helps.get(p.name, ""))
    return out


def _arg_help(doc: str) -> dict[str, str]:
    """``{argument: first sentence}`` from a Google-style ``Args:`` section."""
    section = re.split(r"^\s*Args:\s*$", doc, maxsplit=1, flags=re.M)
    if len(section) < 2:
        return {}
    out: dict[str, str] = {}
    current = None
    for line in section[1].splitlines():
        if re.match(r"^\S", line) or re.match(r"^\s*(Returns|Raises|Yields|Example|Attributes):", line):
            break
        m = re.match(r"^\s{2,8}(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2)
        elif current and line.strip():
            out[current] += " " + line.strip()
    return {k: v.strip() for k, v in out.items()}


def _positive_int(name: str, method: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MethodError(f"{method}: {name} must be a positive integer, got {value!r}")
    return value


def _frozen(settings: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(settings))


# --------------------------------------------------------------------------- constructors
def last() -> Method:
    """The newest snapshot alone: no averaging."""
    return Method("last", _frozen({}), lambda t, e, s: (rules.last(len(t)), {}))


def uniform() -> Method:
    """``1/k`` on every snapshot of the window: SWA (Izmailov et al. 2018). Also named ``swa``."""
    return Method("uniform", _frozen({}), lambda t, e, s: (rules.uniform(len(t)), {}))


def lawa(top_k: int = 10) -> Method:
    """``1/K`` on the newest ``K`` snapshots: latest weight averaging (Kaddour 2022).

    Args:
        top_k: K, the number of snapshots averaged (LAWA, random-K, SeWA).
    """
    _positive_int("top_k", "lawa", top_k)
    return Method("lawa", _frozen({"top_k": top_k}), lambda t, e, s: (rules.lawa(len(t), s["top_k"]), {}))


def ema(decay: float = 0.9, tail: str = "oldest") -> Method:
    """Exponential moving average over the snapshots, by default exactly torch's
    ``AveragedModel`` recursion (see :func:`sewa.weights.ema`).

    Args:
        decay: EMA decay per recorded snapshot (not per optimizer step), in [0, 1); see
            sewa.weights.ema_decay_per_snapshot to convert a per-step decay or a half-life.
        tail: EMA's oldest weight: "oldest" keeps decay^(n-1) on it, as torch; "renormalize"
            rescales the truncated series instead.
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise MethodError(f"ema: decay must lie in [0, 1), got {decay!r}")
    if tail not in rules.EMA_TAILS:
        raise MethodError(f"ema: tail must be one of {rules.EMA_TAILS}, got {tail!r}")
    return Method("ema", _frozen({"decay": float(decay), "tail": tail}),
                  lambda t, e, s: (rules.ema(len(t), s["decay"], tail=s["tail"]), {}))


def random_k(top_k: int = 10, seed: int = 0) -> Method:
    """``1/K`` on ``K`` snapshots drawn at random without replacement.

    Args:
        top_k: K, the number of snapshots averaged (LAWA, random-K, SeWA).
        seed: Seed of the random draws (random-K) and of SeWA's mask noise.
    """
    _positive_int("top_k", "random_k", top_k)
    return Method("random_k", _frozen({"top_k": top_k, "seed": seed}),
                  lambda t, e, s: (rules.random_k(len(t), s["top_k"], s["seed"]), {}))


def greedy_soup(by: str = "loss") -> Method:
    """Greedy soup (Wortsman et al. 2022): snapshots ranked by their own selection score are
    added one by one while the average's selection score improves.

    Args:
        by: What greedy soup ranks and accepts by: "loss" (the selection loss) or "metric" (the
            task's metric, as model soups use held-out accuracy; ties broken by the loss).
    """
    if by not in ("loss", "metric"):
        raise MethodError(f"greedy_soup: by must be 'loss' or 'metric', got {by!r}")

    def rule(t: Trajectory, e: Evaluator | None, s: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        assert e is not None
        if s["by"] == "metric":
            if e.metric is None:
                raise MethodError("greedy_soup(by='metric') needs a metric: the task defines none")

            def cost(v: Tensor) -> tuple[float, float]:
                scores = e.per_batch(t, v)  # higher metric first, then lower loss
                return -scores.mean("metric"), scores.mean("loss")
        else:
            def cost(v: Tensor) -> tuple[float, float]:
                return e.loss(t, v), 0.0

        w = rules.greedy_soup(len(t), cost)
        return w, {"indices": w.nonzero().flatten().tolist()}

    return Method("greedy_soup", _frozen({"by": by}), rule, evaluates=True)


def _learner(name: str, fn: Callable[..., Any], result: Callable[[Any], tuple[Tensor, dict[str, Any]]]) -> Callable[..., Method]:
    """A constructor for a method that runs ``fn(trajectory, model, loss_fn, batches, **settings)``
    on the selection split: its settings and their defaults are ``fn``'s keyword arguments,
    declared there once (less the engine options, which come from the :class:`Evaluator`)."""

    def make(**settings: Any) -> Method:
        accepted = settings_of(make)
        unknown = sorted(set(settings) - set(accepted))
        if unknown:
            raise MethodError(f"{name} has no setting {', '.join(unknown)}: its settings are {', '.join(accepted)}")
        full = {key: settings.get(key, s.default) for key, s in accepted.items()}
        for key in ("top_k", "samples", "steps"):
            if key in full:
                _positive_int(key, name, full[key])

        def rule(t: Trajectory, e: Evaluator | None, s: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
            assert e is not None
            return result(fn(t, e.model, e.loss_fn, e.batches, **s, **e.engine_options()))

        return Method(name, _frozen(full), rule, evaluates=True)

    make.settings_source = fn  # type: ignore[attr-defined]
    make.settings_skip = ("batch_stats", "vectorize", "device", "progress")  # type: ignore[attr-defined]
    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"The ``{name}`` method; its settings are those of :func:`sewa.{fn.__name__}`."
    return make


learned_soup = _learner("learned_soup", trainable_average, lambda w: (w, {}))
learned_soup.__doc__ = """Dense convex weights ``softmax(α)`` learned on the selection split (a learned soup, in the
spirit of TWA). Its settings and defaults are those of :func:`sewa.trainable_average` (``steps``, ``lr``)."""

sewa = _learner("sewa", select, lambda sel: (sel.weights, {
    "probabilities": sel.probabilities.tolist(), "indices": sel.indices, "chosen_steps": sel.steps,
    "history": sel.history, "config": sel.config, "steps_run": sel.config["steps_run"]}))
sewa.__doc__ = """SeWA (Wang et al. 2025): learned selection probabilities, then the top-K averaged uniformly.
Its settings and defaults are those of :func:`sewa.select` (``top_k``, ``samples``, ``steps``,
``tau_start``, ``tau_end``, ``lr``, ``optimizer``, ``budget``, ``seed``)."""

register("last", last)
register("uniform", uniform, aliases=("swa",))
register("lawa", lawa)
register("ema", ema)
register("random_k", random_k, deprecated=("random",))
register("greedy_soup", greedy_soup)
register("learned_soup", learned_soup, deprecated=("twa",))
register("sewa", sewa)
from . import auto as _auto  # noqa: E402,F401  (registers "auto")
