"""Statistics for paired, per-seed comparisons of averaging methods (issue 14, item 6).

Every comparison pairs two methods on the same training runs: seed ``i`` gives one difference
``d_i = a_i - b_i`` (method minus the method it is compared with; higher metrics are better). From
the ``n`` differences:

- mean ``d̄``, sample standard deviation ``s`` and standard error ``se = s / √n``;
- a two-sided t interval ``d̄ ± t_{1-α/2, n-1} · se`` and the paired t-test p-value
  ``2 · (1 - T_{n-1}(|d̄| / se))``;
- Holm's step-down correction over a task-regime's family of comparisons;
- TOST equivalence against a margin ``δ`` declared here, up front (:data:`MARGINS`):
  ``p = max(1 - T_{n-1}((d̄ + δ) / se), T_{n-1}((d̄ - δ) / se))``, i.e. the ``1 - 2α`` interval
  lies inside ``(-δ, δ)`` exactly when ``p < α``;
- a Wilcoxon signed-rank p-value as a distribution-free check, and per-seed ranks.

Verdicts (:func:`verdict`) are "better", "equivalent", "worse" or "inconclusive"; a wide interval
is inconclusive, never a tie.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as _scipy

ALPHA = 0.05
"""Family-wise error rate for the difference tests and for the equivalence tests."""

MARGINS: dict[str, float] = {"accuracy": 0.003, "normalized_score": 2.0}
"""Equivalence margins in the runs' raw units, fixed before any run was looked at: 0.3 accuracy
points (a fraction of 0.003) for classification, 2 D4RL-normalised points for behaviour cloning."""

VERDICTS = ("better", "equivalent", "worse", "inconclusive")


def margin_for(metric: str) -> float:
    """The declared equivalence margin of a metric (raw units).

    Raises:
        ValueError: for a metric without a declared margin.
    """
    if metric not in MARGINS:
        raise ValueError(f"no equivalence margin declared for metric {metric!r}; known: {sorted(MARGINS)}")
    return MARGINS[metric]


@dataclass(frozen=True)
class Paired:
    """One paired comparison over seeds (``a - b``), before multiple-testing correction.

    Attributes:
        n: number of paired seeds.
        diff: mean difference ``d̄``.
        ci: two-sided ``1 - α`` t interval of the mean difference (``None`` below 2 seeds).
        p: two-sided paired t-test p-value (``None`` below 2 seeds).
        p_tost: TOST equivalence p-value for the margin (``None`` below 2 seeds).
        p_wilcoxon: two-sided Wilcoxon signed-rank p-value (``None`` below 2 seeds).
        margin: the equivalence margin used.
    """

    n: int
    diff: float
    ci: tuple[float, float] | None
    p: float | None
    p_tost: float | None
    p_wilcoxon: float | None
    margin: float


def differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-seed differences ``a_i - b_i``.

    Raises:
        ValueError: when the two series are not paired (different lengths) or empty.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired series need the same, non-zero length; got {len(a)} and {len(b)}")
    return [float(x) - float(y) for x, y in zip(a, b, strict=True)]


def _mean_se(d: Sequence[float]) -> tuple[float, float]:
    n = len(d)
    m = math.fsum(d) / n
    s = math.sqrt(math.fsum((x - m) ** 2 for x in d) / (n - 1))
    return m, s / math.sqrt(n)


def t_interval(d: Sequence[float], level: float = 1 - ALPHA) -> tuple[float, float]:
    """Two-sided t confidence interval ``d̄ ± t_{(1+level)/2, n-1} · s/√n`` of the mean difference."""
    if len(d) < 2:
        raise ValueError(f"a t interval needs at least 2 paired seeds, got {len(d)}")
    m, se = _mean_se(d)
    half = float(_scipy.t.ppf(0.5 + level / 2, len(d) - 1)) * se
    return m - half, m + half


def t_test(d: Sequence[float]) -> float:
    """Two-sided paired t-test p-value of ``H0: E[d] = 0``.

    Identical differences (``s = 0``) give ``p = 1`` when they are all zero and ``p = 0`` otherwise.
    """
    if len(d) < 2:
        raise ValueError(f"a t-test needs at least 2 paired seeds, got {len(d)}")
    m, se = _mean_se(d)
    if se == 0.0:
        return 1.0 if m == 0.0 else 0.0
    return float(2 * _scipy.t.sf(abs(m) / se, len(d) - 1))


def tost(d: Sequence[float], margin: float) -> float:
    """TOST equivalence p-value for ``H0: |E[d]| >= margin`` (the larger of two one-sided p-values).

    ``p_low = P(T > (d̄ + δ)/se)`` tests ``E[d] <= -δ``; ``p_high = P(T < (d̄ - δ)/se)`` tests
    ``E[d] >= δ``. Identical differences give 0 inside the margin and 1 on or outside it.
    """
    if margin <= 0:
        raise ValueError(f"the equivalence margin must be positive, got {margin}")
    if len(d) < 2:
        raise ValueError(f"TOST needs at least 2 paired seeds, got {len(d)}")
    m, se = _mean_se(d)
    if se == 0.0:
        return 0.0 if abs(m) < margin else 1.0
    df = len(d) - 1
    p_low = float(_scipy.t.sf((m + margin) / se, df))
    p_high = float(_scipy.t.cdf((m - margin) / se, df))
    return max(p_low, p_high)


def wilcoxon(d: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value (zero differences dropped; all zero gives 1)."""
    nonzero = [x for x in d if x != 0.0]
    if not nonzero:
        return 1.0
    return float(_scipy.wilcoxon(nonzero, alternative="two-sided").pvalue)


def paired(a: Sequence[float], b: Sequence[float], margin: float) -> Paired:
    """All the per-comparison statistics of ``a - b`` over paired seeds."""
    d = differences(a, b)
    diff = math.fsum(d) / len(d)
    if len(d) < 2:
        return Paired(len(d), diff, None, None, None, None, margin)
    return Paired(len(d), diff, t_interval(d), t_test(d), tost(d, margin), wilcoxon(d), margin)


def holm(pvalues: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm step-down adjusted p-values over one family (``None`` entries are left out and kept).

    With the ``m`` p-values sorted ``p_(1) <= ... <= p_(m)``, the adjusted value is
    ``p̃_(i) = min(1, max_{j<=i} (m - j + 1) · p_(j))``; rejecting ``p̃ < α`` controls the
    family-wise error rate at ``α``.
    """
    present = sorted((p, name) for name, p in pvalues.items() if p is not None)
    m = len(present)
    adjusted: dict[str, float | None] = {name: None for name, p in pvalues.items() if p is None}
    running = 0.0
    for i, (p, name) in enumerate(present):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[name] = running
    return {name: adjusted[name] for name in pvalues}


def verdict(diff: float, p_holm: float | None, p_tost_holm: float | None, alpha: float = ALPHA) -> str:
    """The verdict of one comparison after Holm correction.

    - "equivalent": the TOST p-value (Holm-adjusted) is below ``alpha``: the difference is shown to be
      inside the declared margin (a significant difference smaller than the margin is negligible by
      that declaration, so it counts as equivalent too);
    - "better" / "worse": otherwise, the Holm-adjusted t-test p-value is below ``alpha``; the sign of
      ``diff`` says which;
    - "inconclusive": neither (including fewer than 2 seeds).
    """
    if p_tost_holm is not None and p_tost_holm < alpha:
        return "equivalent"
    if p_holm is not None and p_holm < alpha and diff != 0.0:
        return "better" if diff > 0 else "worse"
    return "inconclusive"


@dataclass(frozen=True)
class Comparison:
    """A paired comparison with its family-corrected p-values and verdict."""

    stats: Paired
    p_holm: float | None
    p_tost_holm: float | None
    verdict: str


def compare(pairs: Mapping[str, tuple[Sequence[float], Sequence[float]]], margin: float,
            alpha: float = ALPHA) -> dict[str, Comparison]:
    """Verdicts for one family of comparisons (one task-regime), Holm-corrected together.

    Args:
        pairs: comparison name (e.g. ``"sewa vs uniform"``) to the per-seed metrics ``(a, b)``.
        margin: equivalence margin in the metric's units.
        alpha: family-wise error rate.

    Returns:
        comparison name to its :class:`Comparison`, in the order given.
    """
    raw = {name: paired(a, b, margin) for name, (a, b) in pairs.items()}
    p_holm = holm({name: s.p for name, s in raw.items()})
    p_tost = holm({name: s.p_tost for name, s in raw.items()})
    return {name: Comparison(s, p_holm[name], p_tost[name], verdict(s.diff, p_holm[name], p_tost[name], alpha))
            for name, s in raw.items()}


def ranks(scores: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """Per-seed ranks of methods by their metric (1 = best; ties share their average rank).

    Args:
        scores: method to its per-seed metric, all of one length.
    """
    names = list(scores)
    lengths = {len(scores[n]) for n in names}
    if len(lengths) > 1:
        raise ValueError(f"every method needs one score per seed; got lengths {sorted(lengths)}")
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(lengths.pop() if lengths else 0):
        col = [float(scores[n][i]) for n in names]
        for n, x in zip(names, col, strict=True):
            better = sum(1 for y in col if y > x)
            equal = sum(1 for y in col if y == x)
            out[n].append(better + (equal + 1) / 2)
    return out


def percentile(value: float, draws: Sequence[float], higher: bool = True) -> float:
    """Share (0-100) of ``draws`` that ``value`` beats, ties counting half (mid-rank).

    Args:
        value: the method's score.
        draws: the distribution (e.g. random-K averages).
        higher: whether higher scores are better (a metric); ``False`` for a loss.
    """
    if not draws:
        raise ValueError("percentile of an empty distribution")
    beaten = sum(1 for x in draws if (x < value if higher else x > value))
    equal = sum(1 for x in draws if x == value)
    return 100.0 * (beaten + 0.5 * equal) / len(draws)
