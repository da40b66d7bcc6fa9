"""python/stats.py: Student's t tail against closed forms and printed table values (and scipy when
it is installed), the one-sided paired t-test, and the bootstrap CI."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from python import stats  # noqa: E402


@pytest.mark.parametrize("t", [-20.0, -3.0, -1.0, -0.2, 0.0, 0.5, 1.0, 2.5, 6.314, 12.706, 100.0])
def test_t_tail_matches_closed_forms(t):
    # df = 1 is the Cauchy distribution, df = 2 has an algebraic tail
    assert stats.t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-12, abs=1e-15)
    assert stats.t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), rel=1e-12, abs=1e-15)


# one-sided critical values of a printed t table: P(T > t) = p
TABLE = [(1, 6.314, 0.05), (1, 12.706, 0.025), (2, 2.920, 0.05), (3, 2.353, 0.05), (5, 2.015, 0.05),
         (5, 3.365, 0.01), (7, 1.895, 0.05), (7, 2.365, 0.025), (7, 2.998, 0.01), (7, 3.499, 0.005),
         (10, 1.812, 0.05), (10, 2.764, 0.01), (30, 1.697, 0.05), (30, 2.457, 0.01), (120, 1.658, 0.05)]


@pytest.mark.parametrize("df, t, p", TABLE)
def test_t_tail_matches_the_table(df, t, p):
    assert stats.t_sf(t, df) == pytest.approx(p, rel=0.01)  # the table's t has 3 decimals
    assert stats.t_sf(-t, df) == pytest.approx(1 - p, rel=0.001)


def test_t_tail_matches_scipy_where_installed():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 15, 63, 500):
        for t in np.linspace(-15, 15, 61):
            expected = float(scipy_stats.t.sf(t, df))
            assert stats.t_sf(float(t), df) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_incomplete_beta_edges_and_symmetry():
    assert stats.regularized_incomplete_beta(2.0, 3.0, 0.0) == 0.0
    assert stats.regularized_incomplete_beta(2.0, 3.0, 1.0) == 1.0
    for a, b, x in [(0.5, 0.5, 0.3), (3.5, 0.5, 0.9), (10.0, 2.0, 0.7)]:
        assert stats.regularized_incomplete_beta(a, b, x) == pytest.approx(
            1 - stats.regularized_incomplete_beta(b, a, 1 - x), rel=1e-12)
    # I_x(1, 1) = x, I_x(a, 1) = x^a
    assert stats.regularized_incomplete_beta(1.0, 1.0, 0.37) == pytest.approx(0.37, rel=1e-13)
    assert stats.regularized_incomplete_beta(3.0, 1.0, 0.6) == pytest.approx(0.216, rel=1e-13)


def test_paired_t_test():
    d = [0.10, 0.05, 0.20, -0.05, 0.15, 0.00, 0.08, 0.12]
    result = stats.paired_t_test(d)
    t = np.mean(d) / (np.std(d, ddof=1) / math.sqrt(len(d)))
    assert result["t"] == pytest.approx(t) and result["df"] == 7 and result["n"] == 8
    assert result["p_one_sided"] == pytest.approx(stats.t_sf(t, 7))
    assert stats.paired_t_test([-x for x in d])["p_one_sided"] == pytest.approx(1 - result["p_one_sided"])
    assert stats.paired_t_test([0.0] * 8)["p_one_sided"] == 0.5
    assert stats.paired_t_test([0.1] * 8)["p_one_sided"] == 0.0
    assert stats.paired_t_test([0.3])["p_one_sided"] is None
    assert stats.paired_t_test([])["mean"] is None


def test_bootstrap_ci():
    values = [0.1, 0.3, 0.2, 0.5, 0.0, 0.4, 0.25, 0.15]
    lo, hi = stats.bootstrap_mean_ci(values)
    assert min(values) < lo < np.mean(values) < hi < max(values)
    assert stats.bootstrap_mean_ci(values) == [lo, hi]  # seeded: the same every time
    assert stats.bootstrap_mean_ci([0.2] * 5) == [0.2, 0.2]
    assert stats.bootstrap_mean_ci([]) == [None, None]
