"""Statistics of runs: Student-t intervals, Welch's comparison (against SciPy), curve bands."""

import numpy as np
import pytest

from rlhf_jax.stats import curve_band, mean_ci, t_quantile, welch, win_rate

scipy_stats = pytest.importorskip("scipy.stats")


def test_t_quantile_and_mean_ci_match_scipy():
    for df in (1, 2.5, 4, 30):
        assert t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-6)
    x = [0.81, 0.93, 0.88, 0.9, 0.79]
    est = mean_ci(x)
    low, high = scipy_stats.t.interval(0.95, 4, loc=np.mean(x), scale=scipy_stats.sem(x))
    assert (est.low, est.high) == (pytest.approx(low, rel=1e-6), pytest.approx(high, rel=1e-6))
    assert mean_ci([2.0]).half_width == 0.0


def test_welch_matches_scipy_and_says_so_in_a_sentence():
    a = [0.91, 0.95, 0.93, 0.9, 0.94]
    b = [0.84, 0.88, 0.8, 0.86]
    cmp = welch(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert cmp.t == pytest.approx(ref.statistic, rel=1e-9)
    assert cmp.p == pytest.approx(ref.pvalue, rel=1e-5)
    ci = ref.confidence_interval(0.95)
    assert (cmp.low, cmp.high) == (
        pytest.approx(ci.low, rel=1e-5),
        pytest.approx(ci.high, rel=1e-5),
    )
    assert cmp.diff == pytest.approx(np.mean(a) - np.mean(b)) and cmp.significant
    text = cmp.sentence("gold win rate", "beta=0.05", "beta=0.1")
    assert "beta=0.05 is higher, significant at the 5% level" in text
    assert f"p={cmp.p:.3g}" in text and "difference +0.081" in text
    same = welch([1.0, 2.0, 3.0], [1.5, 2.5, 2.0])
    assert not same.significant and "not significant" in same.sentence("x")
    assert welch([1.0, 1.0], [1.0, 1.0]).p == 1.0
    with pytest.raises(ValueError, match="at least 2 values per group"):
        welch([1.0], [1.0, 2.0])


def test_curve_band_is_pointwise_mean_ci_and_win_rate_counts_ties_half():
    curves = [[0.0, 1.0, 2.0], [0.2, 1.4, 2.0], [0.1, 0.9, 2.0]]
    mean, low, high = curve_band(curves)
    np.testing.assert_allclose(mean, [0.1, 1.1, 2.0])
    est = mean_ci([1.0, 1.4, 0.9])
    assert (low[1], high[1]) == (pytest.approx(est.low), pytest.approx(est.high))
    assert low[2] == high[2] == 2.0  # no spread, no width
    assert win_rate([1.0, 2.0, 3.0, 1.0], [0.0, 2.0, 4.0, 0.0]).mean == pytest.approx(0.625)
