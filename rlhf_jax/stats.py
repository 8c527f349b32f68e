"""Small statistics for honest numbers: means with Student-t confidence intervals, win rates,
Welch's comparison of two groups of runs, and confidence bands of learning curves.

Used by ``rlhf-jax evaluate`` (a win rate with its interval) and by the reports of sweeps
(``rlhf-jax report`` on a sweep: :mod:`rlhf_jax.report`). No SciPy: the
Student-t quantile is found by bisection on its CDF, written with the regularised incomplete beta
function of ``jax.scipy.special``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "Comparison",
    "Estimate",
    "curve_band",
    "mean_ci",
    "t_quantile",
    "welch",
    "win_rate",
]


def _t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    from jax.scipy.special import betainc

    x = df / (df + t * t)
    tail = 0.5 * float(betainc(df / 2.0, 0.5, x))
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``0 < p < 1``).

    Cached: a curve band asks for the same quantile at every point (100 bisection steps each)."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = -1e3, 1e3
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean and its two-sided confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return 0.5 * (self.high - self.low)

    def __str__(self) -> str:
        return (
            f"{self.mean:.4g} ± {self.half_width:.2g} "
            f"({self.level:.0%} CI {self.low:.4g} to {self.high:.4g}, n={self.n})"
        )


def mean_ci(values: Sequence[float], level: float = 0.95) -> Estimate:
    """The mean of ``values`` with a Student-t interval: ``mean ± t_{(1+level)/2, n-1} s/√n``.

    One value gives a zero-width interval at that value (nothing to estimate a spread from).
    """
    x = np.asarray(values, np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return Estimate(mean, mean, mean, 1, level)
    half = t_quantile(0.5 + level / 2.0, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Estimate(mean, mean - half, mean + half, int(x.size), level)


def win_rate(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Estimate:
    """How often ``a`` beats ``b`` item by item (ties count 1/2), with a t interval over items."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win_rate: {a.shape} scores against {b.shape}")
    return mean_ci((a > b) + 0.5 * (a == b), level)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Welch's comparison of two groups (e.g. the final gold score of the seeds of two configs).

    ``diff = mean(a) - mean(b)`` with its two-sided ``level`` interval ``[low, high]``, Welch's
    ``t`` and Welch-Satterthwaite ``df``, and the two-sided p-value ``p``.
    """

    a: Estimate
    b: Estimate
    diff: float
    low: float
    high: float
    t: float
    df: float
    p: float
    level: float = 0.95

    @property
    def significant(self) -> bool:
        """Whether the interval of the difference excludes 0 (``p < 1 - level``)."""
        return self.p < 1.0 - self.level

    def sentence(self, metric: str, name_a: str = "A", name_b: str = "B") -> str:
        """The comparison as one sentence with its numbers."""
        verdict = (
            f"{name_a} is {'higher' if self.diff > 0 else 'lower'}, significant"
            if self.significant
            else "not significant"
        )
        return (
            f"{metric}: {name_a} {self.a.mean:.4g} ± {self.a.half_width:.2g} (n={self.a.n}) vs "
            f"{name_b} {self.b.mean:.4g} ± {self.b.half_width:.2g} (n={self.b.n}); difference "
            f"{self.diff:+.4g}, {self.level:.0%} CI {self.low:+.4g} to {self.high:+.4g} (Welch "
            f"t={self.t:.3g}, df={self.df:.3g}, p={self.p:.3g}): {verdict} at the "
            f"{1 - self.level:.0%} level"
        )


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Comparison:
    """Welch's two-sample comparison of the means of ``a`` and ``b`` (unequal variances).

    ``se = sqrt(s_a^2/n_a + s_b^2/n_b)``, ``t = (mean_a - mean_b) / se``, Welch-Satterthwaite
    ``df = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))``, the interval
    ``diff ± t_{(1+level)/2, df} se`` and the two-sided p-value ``2 P(T_df >= |t|)``
    (Welch 1947; ``scipy.stats.ttest_ind(equal_var=False)`` computes the same).
    """
    x = np.asarray(a, np.float64).reshape(-1)
    y = np.asarray(b, np.float64).reshape(-1)
    if x.size < 2 or y.size < 2:
        raise ValueError(
            f"welch needs at least 2 values per group (got {x.size} and {y.size}): run more seeds"
        )
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    diff = float(x.mean() - y.mean())
    se = math.sqrt(va + vb)
    if se == 0.0:  # both groups constant: the difference is exact
        df = float(x.size + y.size - 2)
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        p = 1.0 if diff == 0 else 0.0
        low = high = diff
    else:
        df = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
        t = diff / se
        p = min(1.0, 2.0 * (1.0 - _t_cdf(abs(t), df)))
        half = t_quantile(0.5 + level / 2.0, df) * se
        low, high = diff - half, diff + half
    return Comparison(mean_ci(x, level), mean_ci(y, level), diff, low, high, t, df, p, level)


def curve_band(
    curves: Sequence[Sequence[float]], level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, low, high)`` ``[T]`` of ``curves`` ``[n, T]`` (one row per seed): the pointwise
    mean and its Student-t interval over the rows (zero width for one row)."""
    c = np.asarray(curves, np.float64)
    if c.ndim != 2 or c.shape[0] < 1:
        raise ValueError(f"curve_band takes [n, T] curves, got shape {c.shape}")
    est = [mean_ci(c[:, t], level) for t in range(c.shape[1])]
    return (
        np.array([e.mean for e in est]),
        np.array([e.low for e in est]),
        np.array([e.high for e in est]),
    )
