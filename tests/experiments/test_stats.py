"""Closed-form checks of the paired statistics (issue 14, item 6).

With 2 degrees of freedom Student's t has the closed form ``F(t) = 1/2 + t / (2 √(2 + t²))`` and the
quantile ``t_p = (2p - 1) / √(2p(1 - p))``, so three paired seeds give hand-derivable answers.
"""

from __future__ import annotations

import math

import pytest

from sewa.experiments import stats


def _cdf_df2(t: float) -> float:
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def test_paired_t_on_three_seeds_matches_the_closed_form() -> None:
    # d = (1, 2, 3): mean 2, s = 1, se = 1/√3, t = 2√3, p = 1 - t/√(2 + t²) = 1 - √(6/7).
    d = [1.0, 2.0, 3.0]
    assert stats.t_test(d) == pytest.approx(1 - math.sqrt(6 / 7), rel=1e-9)
    q = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t_{0.975, 2}
    lo, hi = stats.t_interval(d)
    assert (lo, hi) == pytest.approx((2 - q / math.sqrt(3), 2 + q / math.sqrt(3)), rel=1e-9)
    p = stats.paired([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], margin=0.5)
    assert p.n == 3 and p.diff == 2.0 and p.ci == pytest.approx((lo, hi)) and p.p == pytest.approx(stats.t_test(d))


def test_constant_differences_are_decided_without_dividing_by_zero() -> None:
    assert stats.t_test([0.0, 0.0, 0.0]) == 1.0
    assert stats.t_test([0.5, 0.5]) == 0.0
    assert stats.tost([0.001, 0.001], margin=0.003) == 0.0
    assert stats.tost([0.005, 0.005], margin=0.003) == 1.0


def test_holm_on_a_hand_example() -> None:
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06.
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "one seed": None})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "one seed": None})
    assert list(adjusted) == ["a", "b", "c", "one seed"]
    assert stats.holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}


def test_tost_inside_and_outside_the_margin() -> None:
    d = [0.1, 0.2, 0.3]  # mean 0.2, se = 0.1/√3
    se = 0.1 / math.sqrt(3)
    inside = stats.tost(d, margin=1.0)  # p = max(1 - F((0.2 + 1)/se), F((0.2 - 1)/se))
    assert inside == pytest.approx(max(1 - _cdf_df2(1.2 / se), _cdf_df2(-0.8 / se)), rel=1e-9)
    assert inside < stats.ALPHA
    outside = stats.tost(d, margin=0.1)  # the upper one-sided test fails: F(0.1/se) = 0.887
    assert outside == pytest.approx(_cdf_df2(0.1 / se), rel=1e-9)
    assert outside > 0.5


def test_wilcoxon_exact_on_five_positive_differences() -> None:
    # All 2^5 sign patterns equally likely under H0; all positive is the most extreme: p = 2/32.
    assert stats.wilcoxon([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)
    assert stats.wilcoxon([0.0, 0.0]) == 1.0


def test_the_four_verdicts() -> None:
    assert stats.verdict(0.5, p_holm=0.01, p_tost_holm=0.9) == "better"
    assert stats.verdict(-0.5, p_holm=0.01, p_tost_holm=0.9) == "worse"
    assert stats.verdict(0.0001, p_holm=0.9, p_tost_holm=0.01) == "equivalent"
    assert stats.verdict(0.5, p_holm=0.2, p_tost_holm=0.4) == "inconclusive"
    assert stats.verdict(0.5, p_holm=None, p_tost_holm=None) == "inconclusive"


def test_compare_gives_each_verdict_on_paired_seeds() -> None:
    base = [0.70, 0.72, 0.74, 0.71, 0.73, 0.75, 0.69, 0.72, 0.70, 0.74]
    noise = [0.004, -0.003, 0.002, -0.001, 0.003, -0.004, 0.001, -0.002, 0.0, 0.002]
    wide = [0.05, -0.04, 0.06, -0.05, 0.03, -0.02, 0.04, -0.06, 0.05, -0.03]
    pairs = {
        "up": ([b + 0.05 + n for b, n in zip(base, noise, strict=True)], base),
        "down": ([b - 0.05 + n for b, n in zip(base, noise, strict=True)], base),
        "same": ([b + n / 10 for b, n in zip(base, noise, strict=True)], base),
        "wide": ([b + w for b, w in zip(base, wide, strict=True)], base),
    }
    out = stats.compare(pairs, margin=stats.MARGINS["accuracy"])
    assert {k: v.verdict for k, v in out.items()} == {
        "up": "better", "down": "worse", "same": "equivalent", "wide": "inconclusive"}
    wide_ci = out["wide"].stats.ci
    assert wide_ci is not None and wide_ci[0] < -0.003 and wide_ci[1] > 0.003  # wide: never called a tie
    assert out["up"].p_holm is not None and out["up"].stats.p is not None and out["up"].p_holm >= out["up"].stats.p


def test_one_seed_is_inconclusive() -> None:
    out = stats.compare({"x": ([0.9], [0.1])}, margin=0.003)["x"]
    assert out.verdict == "inconclusive" and out.stats.ci is None and out.stats.diff == pytest.approx(0.8)


def test_ranks_average_ties_and_percentile_counts_ties_half() -> None:
    r = stats.ranks({"a": [3.0, 1.0], "b": [2.0, 2.0], "c": [2.0, 3.0]})
    assert r == {"a": [1.0, 3.0], "b": [2.5, 2.0], "c": [2.5, 1.0]}
    assert stats.percentile(0.5, [0.1, 0.5, 0.9, 0.2]) == pytest.approx(62.5)
    assert stats.percentile(0.5, [0.1, 0.5, 0.9, 0.2], higher=False) == pytest.approx(37.5)  # a loss: beats only 0.9
    with pytest.raises(ValueError, match="same, non-zero length"):
        stats.differences([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no equivalence margin"):
        stats.margin_for("bleu")
    assert stats.margin_for("normalized_score") == 2.0
