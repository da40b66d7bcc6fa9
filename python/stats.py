"""The sweep's primary test without scipy: Student's t distribution (through the regularized
incomplete beta function, by its continued fraction), a one-sided paired t-test over seeds, and a
percentile bootstrap CI of a mean over seeds.
"""
from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_REPLICATES = 10_000


def _beta_continued_fraction(a: float, b: float, x: float, eps: float = 1e-15, max_terms: int = 1000) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), good for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_terms):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def paired_t_test(differences) -> dict:
    """One-sided paired t-test of H1: mean difference > 0, over the given per-seed differences.
    {"n", "mean", "sd", "t", "df", "p_one_sided"}; p is None with fewer than two differences (the
    mean too with none). All
    differences equal: t is +-inf (p 0 or 1), or 0 when they are all 0 (p 0.5)."""
    d = np.asarray(differences, dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else None
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "t": None, "df": None, "p_one_sided": None}
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / (sd / math.sqrt(n))
    return {"n": n, "mean": mean, "sd": sd, "t": t, "df": n - 1, "p_one_sided": t_sf(t, n - 1)}


def bootstrap_mean_ci(values, replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap CI [lo, hi] of the mean of values (resampled with replacement); [None,
    None] for no values."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return [None, None]
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(replicates, len(v)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]
