"""Statistics for comparisons over seeds: means with t-based 95% intervals, the paired t-test, and the
area under a curve. Small pure functions on plain sequences, so tests check them against hand computation.

With n seeds the interval is mean +- t_{0.975, n-1} x sd / sqrt(n) (sample sd, n - 1 in the denominator).
Two ablations run on the same seeds are compared by the paired test on the per-seed differences, which
removes the seed-to-seed variation they share (the same questions, the same initial sampling noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class PairedComparison:
    diff: Interval  # of (treatment - baseline) per seed
    p_value: float  # two-sided paired t-test; NaN with fewer than 2 pairs

    @property
    def significant(self) -> bool:
        """At the 5% level: equivalently, the 95% interval of the difference excludes 0."""
        return self.p_value < 0.05


def paired_test(treatment: Sequence[float], baseline: Sequence[float]) -> PairedComparison:
    """Two-sided paired t-test of treatment vs baseline over the same seeds (given in the same order)."""
    if len(treatment) != len(baseline):
        raise ValueError(f"paired test needs one baseline value per seed ({len(treatment)} vs {len(baseline)})")
    diffs = [a - b for a, b in zip(treatment, baseline)]
    interval = t_interval(diffs)
    if len(diffs) < 2:
        return PairedComparison(interval, math.nan)
    mean, sd = interval.mean, interval.sd
    if sd == 0:  # identical differences: certain if nonzero, no evidence if zero
        return PairedComparison(interval, 1.0 if mean == 0 else 0.0)
    t = mean / (sd / math.sqrt(len(diffs)))
    return PairedComparison(interval, float(2 * _scipy.t.sf(abs(t), len(diffs) - 1)))


def normalized_auc(steps: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under values(step) divided by the step range: the curve's average height."""
    if len(steps) != len(values) or not steps:
        raise ValueError("normalized_auc needs one value per step, at least one")
    if len(steps) == 1:
        return float(values[0])
    area = sum((steps[i + 1] - steps[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])
