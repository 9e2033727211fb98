"""stats.py against hand computation (Student t tables, exact enumeration) and scipy where scipy has the same test."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sp

import stats

# differences as eval success rates make them: multiples of 1/256, often tied, sometimes zero
success_diffs = st.lists(st.integers(-40, 40).map(lambda k: k / 256), min_size=2, max_size=9)


def test_t_interval_matches_hand_computation():
    values = [0.42, 0.47, 0.39, 0.45]
    mean = sum(values) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    t975_df3 = 3.182446305284263  # Student t table, 97.5th percentile, 3 degrees of freedom
    iv = stats.t_interval(values)
    assert iv.mean == pytest.approx(mean) and iv.n == 4
    assert iv.half_width == pytest.approx(t975_df3 * sd / 2, rel=1e-9)
    assert iv.low == pytest.approx(mean - iv.half_width)
    one = stats.t_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.half_width)
    assert math.isnan(stats.t_interval([]).mean)


def test_ratio_interval_is_the_t_interval_of_the_logs_mapped_back():
    ratios = [2.0, 1.5, 2.5]
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2)
    geo, low, high = stats.ratio_interval(ratios)
    assert geo == pytest.approx((2.0 * 1.5 * 2.5) ** (1 / 3))
    assert (low, high) == pytest.approx((math.exp(mean - half), math.exp(mean + half)))
    assert low < geo < high
    one = stats.ratio_interval([1.7])
    assert one[0] == pytest.approx(1.7) and math.isnan(one[1]) and math.isnan(one[2])
    with pytest.raises(ValueError, match="positive"):
        stats.ratio_interval([1.0, 0.0])


def test_paired_test_matches_hand_computation():
    treatment, baseline = [0.50, 0.46, 0.52], [0.45, 0.44, 0.46]
    d = [a - b for a, b in zip(treatment, baseline)]  # 0.05, 0.02, 0.06
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))  # = 3.6056...
    cmp = stats.paired_test(treatment, baseline)
    assert cmp.n == 3 and cmp.diff.mean == pytest.approx(mean)
    assert cmp.diff.half_width == pytest.approx(4.302652729911275 * sd / math.sqrt(3), rel=1e-9)  # t(0.975, 2)
    # two-sided p for t with 2 df, from the closed form of the t CDF at 2 df: p = 1 - t / sqrt(t^2 + 2)
    assert cmp.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert cmp.significant == (cmp.p_value < 0.05)
    assert (cmp.diff.low > 0) == cmp.significant  # the interval excludes 0 exactly when p < 0.05
    assert cmp.p_sign == 0.25 and cmp.p_wilcoxon == 0.25  # all 3 positive: 2 x (1/2)^3
    with pytest.raises(ValueError, match="one baseline value per seed"):
        stats.paired_test([1.0], [1.0, 2.0])


def test_identical_differences_are_no_certainty():
    # the same gain on every seed (float noise included: 0.5 - 0.4 != 0.4 - 0.3 in binary): no p = 0, no zero width
    for n in (2, 3, 5):
        cmp = stats.paired_test([0.4 + 0.1 * i for i in range(n)], [0.3 + 0.1 * i for i in range(n)])
        assert math.isnan(cmp.p_value) and math.isnan(cmp.diff.half_width) and cmp.diff.sd == 0
        assert cmp.diff.mean == pytest.approx(0.1) and not cmp.significant
        assert cmp.p_sign == pytest.approx(stats.exact_p_floor(n)) and cmp.p_wilcoxon == pytest.approx(stats.exact_p_floor(n))
    none = stats.paired_test([0.3, 0.4], [0.3, 0.4])
    assert none.p_value == 1.0 and none.p_sign == 1.0 and none.p_wilcoxon == 1.0 and math.isnan(none.mdd80)
    assert math.isnan(stats.paired_test([0.5], [0.4]).p_value)


@settings(max_examples=300, deadline=None)
@given(success_diffs, st.lists(st.integers(0, 256).map(lambda k: k / 256), min_size=9, max_size=9))
def test_paired_t_matches_scipy(diffs, base):
    base = base[: len(diffs)]
    treat = [b + d for b, d in zip(base, diffs)]
    cmp = stats.paired_test(treat, base)
    ref = sp.ttest_rel(treat, base)
    if len(set(diffs)) == 1:  # scipy gives p = 0 (or NaN) here; we give NaN unless every difference is 0
        assert math.isnan(cmp.p_value) or (cmp.p_value == 1.0 and diffs[0] == 0)
    else:
        assert cmp.p_value == pytest.approx(float(ref.pvalue), rel=1e-6, abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(success_diffs)
def test_sign_test_matches_scipy_binomtest(diffs):
    nonzero = [d for d in diffs if d != 0]
    expected = 1.0 if not nonzero else sp.binomtest(sum(d > 0 for d in nonzero), len(nonzero), 0.5).pvalue
    assert stats.sign_test_p(diffs) == pytest.approx(expected, rel=1e-12)


def brute_force_wilcoxon(diffs: list[float]) -> float:
    """Every sign assignment of the ranks of the nonzero |d|, counted: the definition itself."""
    nonzero = [d for d in diffs if d != 0]
    if not nonzero:
        return 1.0
    ranks = sp.rankdata([abs(d) for d in nonzero])  # average ranks for ties
    observed = sum(r for r, d in zip(ranks, nonzero) if d > 0)
    sums = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(nonzero))]
    low = sum(s <= observed + 1e-9 for s in sums) / len(sums)
    high = sum(s >= observed - 1e-9 for s in sums) / len(sums)
    return min(1.0, 2 * min(low, high))


@settings(max_examples=300, deadline=None)
@given(success_diffs)
def test_wilcoxon_matches_exact_enumeration_with_ties_and_zeros(diffs):
    assert stats.wilcoxon_exact_p(diffs) == pytest.approx(brute_force_wilcoxon(diffs), rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.001, 1.0), min_size=2, max_size=12, unique=True), st.lists(st.booleans(), min_size=12,
                                                                                          max_size=12))
def test_wilcoxon_matches_scipy_exact_without_ties(magnitudes, signs):
    diffs = [m if s else -m for m, s in zip(magnitudes, signs)]
    expected = sp.wilcoxon(diffs, method="exact").pvalue
    assert stats.wilcoxon_exact_p(diffs) == pytest.approx(expected, rel=1e-9)


def test_exact_tests_cannot_reach_5_percent_below_6_pairs():
    assert [stats.exact_p_floor(n) for n in (3, 4, 5, 6)] == [0.25, 0.125, 0.0625, 0.03125]
    # the one significant result of the softmax comparison, at 4 seeds: the exact tests' floor is 0.125
    assert stats.sign_test_p([-0.01, -0.02, -0.05, -0.03]) == 0.125
    assert stats.wilcoxon_exact_p([-0.01, -0.02, -0.05, -0.03]) == 0.125


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04: 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; 1 x 0.04 = 0.04 -> monotone: 0.06
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adj = stats.holm([0.2, math.nan, 0.01])  # NaN is not in the family: m = 2
    assert adj[0] == pytest.approx(0.2) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)
    assert stats.holm([0.6, 0.7]) == [1.0, 1.0] and stats.holm([0.03]) == [0.03] and stats.holm([]) == []


def test_min_detectable_difference_against_hand_computation():
    # t tables: t_{0.975,19} = 2.093024, t_{0.80,19} = 0.860951; at 20 pairs the approximation
    # (t_{1-a/2,n-1} + t_{power,n-1}) sd / sqrt(n) and the noncentral-t solution agree to 0.1%
    sd = 0.03
    hand = (2.093024 + 0.860951) * sd / math.sqrt(20)
    assert stats.min_detectable_difference(sd, 20) == pytest.approx(hand, rel=1e-3)
    # at 4 pairs the approximation understates it: t_{0.975,3} = 3.182446, t_{0.80,3} = 0.978472
    approx4 = (3.182446 + 0.978472) * sd / 2
    mdd4 = stats.min_detectable_difference(sd, 4)
    assert approx4 < mdd4 < 1.05 * approx4
    # and at the returned difference the test's power is 80% (scipy's noncentral t as the oracle; the wrong-sided
    # rejections P(T' < -crit) are below 1e-6 here, and scipy returns NaN for some of them)
    for n in (2, 3, 4, 6, 10):
        mdd, crit = stats.min_detectable_difference(sd, n), sp.t.ppf(0.975, n - 1)
        assert sp.nct.sf(crit, n - 1, mdd / sd * math.sqrt(n)) == pytest.approx(0.8, abs=2e-6)
    assert stats.min_detectable_difference(2 * sd, 5) == pytest.approx(2 * stats.min_detectable_difference(sd, 5))
    assert math.isnan(stats.min_detectable_difference(sd, 1)) and math.isnan(stats.min_detectable_difference(0.0, 5))
    cmp = stats.paired_test([0.50, 0.46, 0.52, 0.47], [0.45, 0.44, 0.46, 0.47])
    assert cmp.mdd80 == pytest.approx(stats.min_detectable_difference(cmp.diff.sd, 4))


def test_normalized_auc_is_the_average_height_in_step_order():
    assert stats.normalized_auc([0, 10, 20], [0.0, 1.0, 1.0]) == pytest.approx((5 + 10) / 20)
    assert stats.normalized_auc([20, 0, 10], [1.0, 0.0, 1.0]) == pytest.approx((5 + 10) / 20)  # unsorted input
    assert stats.normalized_auc([0, 25, 50, 100], [0.2] * 4) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="at least two distinct steps"):
        stats.normalized_auc([5], [0.3])
    with pytest.raises(ValueError, match="step appears twice"):
        stats.normalized_auc([0, 5, 5], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one value per step"):
        stats.normalized_auc([0, 5], [0.1])
