"""Small statistics for honest numbers: means with Student-t confidence intervals, win rates.

Used by ``rlhf-jax evaluate`` (a win rate with its interval) and by the reports. No SciPy: the
Student-t quantile is found by bisection on its CDF, written with the regularised incomplete beta
function of ``jax.scipy.special``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Estimate", "mean_ci", "t_quantile", "win_rate"]


def _t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    from jax.scipy.special import betainc

    x = df / (df + t * t)
    tail = 0.5 * float(betainc(df / 2.0, 0.5, x))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``0 < p < 1``)."""
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
