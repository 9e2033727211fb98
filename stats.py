"""Statistics for comparisons over seeds: means with t-based 95% intervals, the paired t-test beside two exact
distribution-free tests, Holm's correction, the minimum detectable difference, and the area under a curve.
Small pure functions on plain sequences, so tests check them against hand computation and scipy.

With n seeds the interval is mean +- t_{0.975, n-1} x sd / sqrt(n) (sample sd, n - 1 in the denominator).
Two ablations run on the same seeds are compared by the paired test on the per-seed differences, which
removes the seed-to-seed variation they share (the same questions, the same initial sampling noise).
The t-test assumes the differences are normal, which 2-5 pairs cannot check; the exact sign test and the exact
Wilcoxon signed-rank test do not assume it, but with n pairs neither can give a two-sided p below 2 / 2^n
(0.125 at 4 pairs, 0.0625 at 5), so below 6 pairs no difference is established by them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import optimize as _optimize
from scipy import stats as _scipy


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float  # NaN with fewer than 2 values
    n: int
    sd: float = math.nan  # sample standard deviation (n - 1)

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and the half-width of the t-based confidence interval over independent values (seeds)."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, 0)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, float(_scipy.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n), n, sd)


def ratio_interval(ratios: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Geometric mean of positive ratios (e.g. paired timings a_i / b_i) and its t-based interval, computed
    on their logs (a ratio's error is multiplicative): (mean, low, high), low and high NaN below 2 ratios."""
    if any(r <= 0 for r in ratios):
        raise ValueError(f"ratios must be positive, got {list(ratios)}")
    logs = t_interval([math.log(r) for r in ratios], confidence)
    return math.exp(logs.mean), math.exp(logs.low), math.exp(logs.high)


# ---------------------------------------------------------------------------- exact tests on paired differences


def sign_test_p(diffs: Sequence[float]) -> float:
    """Exact two-sided sign test: zeros dropped, k positive of m nonzero under Binomial(m, 1/2),
    p = min(1, 2 min(P(K <= k), P(K >= k))). 1.0 when every difference is zero."""
    nonzero = [d for d in diffs if d != 0]
    m, k = len(nonzero), sum(d > 0 for d in nonzero)
    if m == 0:
        return 1.0
    tail = min(_scipy.binom.cdf(k, m, 0.5), _scipy.binom.sf(k - 1, m, 0.5))
    return float(min(1.0, 2 * tail))


def _average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of `values`, tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def wilcoxon_exact_p(diffs: Sequence[float]) -> float:
    """Exact two-sided Wilcoxon signed-rank test (Wilcoxon 1945): zeros dropped, |d| ranked (ties share their
    mean rank), W+ = the sum of the positive differences' ranks; under H0 each of the 2^m sign assignments is
    equally likely, and p = min(1, 2 min(P(W+ <= w), P(W+ >= w))) from the exact distribution of W+ (counted
    by dynamic programming over doubled, hence integer, ranks). 1.0 when every difference is zero."""
    nonzero = [d for d in diffs if d != 0]
    if not nonzero:
        return 1.0
    ranks2 = [round(2 * r) for r in _average_ranks([abs(d) for d in nonzero])]
    counts = [1] + [0] * sum(ranks2)  # counts[s]: sign assignments whose positive ranks sum to s (doubled)
    for r in ranks2:
        counts = [c + (counts[s - r] if s >= r else 0) for s, c in enumerate(counts)]
    w = sum(r for r, d in zip(ranks2, nonzero) if d > 0)
    total = 2 ** len(nonzero)
    tail = min(sum(counts[: w + 1]), sum(counts[w:])) / total
    return float(min(1.0, 2 * tail))


def exact_p_floor(n: int) -> float:
    """The smallest two-sided p the sign test (and the tie-free Wilcoxon test) can give at n pairs: 2 / 2^n."""
    return min(1.0, 2.0 / 2 ** n) if n >= 1 else 1.0


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979) of a family of p-values, in their order: the i-th smallest of
    the m non-NaN values becomes max over j <= i of min(1, (m - j + 1) p_(j)). NaN stays NaN and does not count
    toward m (a comparison that was not tested is not in the family)."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    out = [math.nan] * len(p_values)
    running, m = 0.0, len(tested)
    for j, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - j) * p))
        out[i] = running
    return out


def min_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test at level `alpha` over n pairs detects with
    probability `power`, given the SD of the paired differences: delta = d x sd, where d solves
    P(|T'| > t_{1-alpha/2, n-1}) = power for T' noncentral t with n - 1 degrees of freedom and noncentrality
    d sqrt(n) (Cohen 1988, ch. 2). The textbook approximation (t_{1-alpha/2,n-1} + t_{power,n-1}) sd / sqrt(n)
    is within 0.5% from 8 pairs on and understates it below (by 5% at 3 pairs). NaN below 2 pairs or without
    spread (sd NaN or 0: no observed variation to size an effect against)."""
    if n < 2 or not math.isfinite(sd) or sd <= 0:
        return math.nan
    df, crit = n - 1, float(_scipy.t.ppf(1 - alpha / 2, n - 1))

    def power_at(d: float) -> float:
        nc = d * math.sqrt(n)
        lower = _scipy.nct.cdf(-crit, df, nc)  # the wrong-sided rejections; NaN far out in the tail, where it is 0
        return float(_scipy.nct.sf(crit, df, nc) + (0.0 if math.isnan(lower) else lower))

    approx = (crit + float(_scipy.t.ppf(power, df))) / math.sqrt(n)
    hi = 2 * approx
    while power_at(hi) < power:  # never more than once or twice: the approximation is within 20% at n = 2
        hi *= 2
    return float(_optimize.brentq(lambda d: power_at(d) - power, 0.0, hi, xtol=1e-12)) * sd


# ---------------------------------------------------------------------------- the paired comparison


@dataclass(frozen=True)
class PairedComparison:
    diff: Interval  # of (treatment - baseline) per seed; half-width NaN when every difference is the same
    p_value: float  # two-sided paired t-test; NaN below 2 pairs or when every difference is the same nonzero value
    p_sign: float = math.nan  # exact two-sided sign test
    p_wilcoxon: float = math.nan  # exact two-sided Wilcoxon signed-rank test
    mdd80: float = math.nan  # min_detectable_difference at 80% power, alpha 0.05, these pairs' SD

    @property
    def n(self) -> int:
        return self.diff.n

    @property
    def significant(self) -> bool:
        """At the 5% level: equivalently, the 95% interval of the difference excludes 0."""
        return self.p_value < 0.05


def _clean_differences(diffs: list[float]) -> list[float]:
    """Differences rounded to 12 decimals relative to the largest, so float noise (0.5 - 0.4 vs 0.4 - 0.3) makes
    no spread, no sign and no rank: equal success rates give equal differences, exactly."""
    scale = max((abs(d) for d in diffs), default=0.0)
    return [round(d / scale, 12) * scale for d in diffs] if scale > 0 else list(diffs)


def paired_test(treatment: Sequence[float], baseline: Sequence[float]) -> PairedComparison:
    """Two-sided paired t-test of treatment vs baseline over the same seeds (given in the same order), with the
    exact sign and Wilcoxon p-values and the minimum detectable difference beside it.

    When every difference is the same the t statistic is undefined (sd 0): a nonzero difference then gets p and
    interval NaN (not p = 0 and a zero-width interval: 2 or 3 identical values are no evidence of certainty);
    all-zero differences get p = 1 and an interval of NaN half-width."""
    if len(treatment) != len(baseline):
        raise ValueError(f"paired test needs one baseline value per seed ({len(treatment)} vs {len(baseline)})")
    diffs = _clean_differences([a - b for a, b in zip(treatment, baseline)])
    interval = t_interval(diffs)
    if len(diffs) < 2:
        return PairedComparison(interval, math.nan)
    exact = dict(p_sign=sign_test_p(diffs), p_wilcoxon=wilcoxon_exact_p(diffs))
    mean, sd = interval.mean, interval.sd
    if sd == 0:
        undefined = Interval(mean, math.nan, interval.n, 0.0)
        return PairedComparison(undefined, 1.0 if mean == 0 else math.nan, **exact)
    t = mean / (sd / math.sqrt(len(diffs)))
    return PairedComparison(interval, float(2 * _scipy.t.sf(abs(t), len(diffs) - 1)), **exact,
                            mdd80=min_detectable_difference(sd, len(diffs)))


def normalized_auc(steps: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under values(step), the points taken in step order, divided by the step range: the
    curve's average height. Needs at least two distinct steps and no step twice."""
    if len(steps) != len(values) or not steps:
        raise ValueError(f"normalized_auc needs one value per step (got {len(steps)} steps, {len(values)} values)")
    points = sorted(zip(steps, values))
    xs = [s for s, _ in points]
    if len(set(xs)) != len(xs):
        raise ValueError(f"normalized_auc: a step appears twice in {xs}")
    if len(xs) < 2:
        raise ValueError(f"normalized_auc needs at least two distinct steps to span a range (got {xs})")
    area = sum((xs[i + 1] - xs[i]) * (points[i][1] + points[i + 1][1]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])
