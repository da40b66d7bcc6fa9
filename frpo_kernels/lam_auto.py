"""lam="auto": FRPO's temperature per group from a KL radius rho, the maximiser of the inner problem's dual
  max_{lam > 0}  -lam * log mean_{i in g} exp(-A_i / lam) - lam * rho.

Its stationary point is where the tilted distribution q_i = exp(-A_i / lam) / sum_j exp(-A_j / lam) over the
group's valid rows has KL(q || uniform) = log n_g + sum_i q_i log q_i = rho. That KL falls monotonically in lam
(d KL / d log lam = -Var_q(A / lam)) from log(n_g / #argmin A) to 0, so each group's root is bracketed and
solved by safeguarded Newton on log lam, all groups at once, in float64, clamped to [LAM_MIN, LAM_MAX].
"""
from __future__ import annotations

import math

import torch

from frpo_kernels.groups import Groups

LAM_MIN, LAM_MAX = 1e-2, 1e2
_LOG_TOL = 1e-11       # Newton / bisection step in log lam at which a group counts as solved
_MAX_STEPS = 100       # rtsafe halves the step at least every second iteration: 9.2 -> 1e-11 in < 90


def tilted_kl(advantages, valid, groups: Groups, lams):
    """(KL(q || uniform) [num], d KL / d log lam [num]) of each group at lams [num] (float64).

    Shifted by the group's largest exponent z = -A / lam and formed as E_q[d] - log mean exp(d) with d <= 0
    and log1p, so lam = 1e-2 with |A| ~ 1e3 stays finite and a nearly uniform q keeps its digits."""
    adv = advantages.double()
    z = -adv / groups.broadcast(lams)
    top = torch.full((groups.num,), -math.inf, dtype=z.dtype, device=z.device).scatter_reduce(
        0, groups.index, torch.where(valid, z, -math.inf), "amax", include_self=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    d = torch.where(valid, z - groups.broadcast(top), torch.zeros_like(z))
    e = torch.where(valid, torch.exp(d), torch.zeros_like(z))
    n = groups.sum(valid.double()).clamp_min(1)
    total = groups.sum(e).clamp_min(1e-300)
    mean_d = groups.sum(e * d) / total
    log_mean = torch.log1p(groups.sum(torch.where(valid, torch.expm1(d), torch.zeros_like(d))) / n)
    kl = (mean_d - log_mean).clamp_min(0)
    variance = (groups.sum(e * d * d) / total - mean_d ** 2).clamp_min(0)
    return kl, -variance


@torch.compiler.disable  # an eager loop with an early exit: unrolled by a compiler it would take minutes to build
@torch.no_grad()
def solve_group_lams(advantages, valid, groups: Groups, kl_radius: float):
    """lam_g [num] (float64) with KL(q_g || uniform) = kl_radius, to ~1e-11 relative in lam. A group whose
    KL at LAM_MIN is already <= kl_radius (no reward spread, a single or no valid row, kl_radius >= the largest
    reachable KL) gets LAM_MIN; one whose KL at LAM_MAX is still > kl_radius gets LAM_MAX."""
    device = advantages.device
    full = lambda value: torch.full((groups.num,), value, dtype=torch.float64, device=device)  # noqa: E731
    lo, hi = full(math.log(LAM_MIN)), full(math.log(LAM_MAX))
    kl_lo, _ = tilted_kl(advantages, valid, groups, lo.exp())
    kl_hi, _ = tilted_kl(advantages, valid, groups, hi.exp())
    at_min, at_max = kl_lo <= kl_radius, kl_hi > kl_radius
    done = at_min | at_max
    x = (lo + hi) / 2
    step_before = step = hi - lo
    for _ in range(_MAX_STEPS):
        f, df = tilted_kl(advantages, valid, groups, x.exp())
        f = f - kl_radius
        lo, hi = torch.where(f > 0, x, lo), torch.where(f > 0, hi, x)  # KL falls as lam grows
        newton_step = f / torch.where(df < 0, df, -1.0)
        converged = (df < 0) & (newton_step.abs() < _LOG_TOL)  # this last step leaves x at the root
        newton = x - newton_step
        bisect = (df >= 0) | (newton <= lo) | (newton >= hi) | (2 * f.abs() > (step_before * df).abs())
        step_before = step
        new_x = torch.where(bisect, (lo + hi) / 2, newton)
        step = (new_x - x).abs()
        x = torch.where(done, x, torch.where(converged, newton, new_x))
        done = done | converged | (step < _LOG_TOL) | (hi - lo < _LOG_TOL)
        if bool(done.all()):
            break
    lams = x.exp()
    return torch.where(at_min, LAM_MIN, torch.where(at_max, LAM_MAX, lams))


def resolve_group_lams(cfg, advantages, valid, groups: Groups):
    """FRPO's lam of each group [num] (float64), resolved once per batch and then only read: solved from
    kl_radius (lam="auto") over the rows with valid True, or cfg.lam for every group. None for a loss type
    without group terms. The objective uses lam_g in w_i = exp(-A_i / lam_g) and scales the group's term by
    lam_scale(lams)."""
    if not cfg.kind.group_coupled:
        return None
    if cfg.auto_lam:
        return solve_group_lams(advantages, valid, groups, cfg.kl_radius)
    return torch.full((groups.num,), cfg.lam, dtype=torch.float64, device=advantages.device)


def lam_scale(lams):
    """max(lam_g, 1) [num]: the factor of each group's term inside FRPO's mean over groups."""
    return lams.clamp_min(1.0)
