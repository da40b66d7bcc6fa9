"""Triton kernels for per-token log-probs over [B, T, V] logits: forward, backward and fused.

Each program owns ROWS rows (ROWS > 1 only where V is small) and walks V in BLOCK_V tiles with an
online max / sum-exp in fp32; the contract they implement is frpo_kernels/backends/torch_reference.py.
"""
import triton
import triton.language as tl

from frpo_kernels.backends.triton.compat import fix_interpreter_index

fix_interpreter_index()  # triton <= 3.6's interpreter with numpy >= 2.4: see compat.py


@triton.jit
def _rows(first, N, T, stride_b, stride_t, mask_ptr, HAS_MASK: tl.constexpr, ROWS: tl.constexpr):
    """Rows first .. first + ROWS - 1: indices, which are live (in range, not masked), and each
    row's element offset. (b, t) become int64 before they meet a stride: B*T*V may exceed 2**31."""
    row = first + tl.arange(0, ROWS)
    live = row < N
    if HAS_MASK:
        live = live & (tl.load(mask_ptr + row, mask=live, other=0) != 0)
    return row, live, _row_offset(row, T, stride_b, stride_t)


@triton.jit
def _row_offset(row, T, stride_b, stride_t):
    return (row // T).to(tl.int64) * stride_b + (row % T).to(tl.int64) * stride_t


@triton.jit
def _log_sum_exp(logits_ptr, offset, live, V, inv_temperature,
                 WITH_ENTROPY: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """(m, log s, entropy) of softmax(z = logits * inv_temperature) per row, one read of each row:
    lse = m + log s, kept in its parts so that z - lse is taken as (z - m) - log s (a rounded lse would
    cost |lse| * 6e-8 relative in logp and p).

    Online: running max m, s = sum exp(z - m), a = sum exp(z - m) * (z - m); entropy = log s - a / s
    (taken relative to the max so that a large lse does not cancel a small entropy).
    """
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    a = tl.zeros([ROWS], tl.float32)
    # Programs whose rows are all masked read nothing.
    v_end = tl.where(tl.max(live.to(tl.int32), axis=0) > 0, V, 0)
    for v0 in range(0, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = live[:, None] & (cols < V)[None, :]
        z = tl.load(logits_ptr + offset[:, None] + cols[None, :], mask=ok, other=float("-inf"))
        z = z.to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # While a row has seen only -inf, shift by 0 instead: exp(-inf - -inf) would be NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - shift)
        e = tl.exp(z - shift[:, None])
        s_tile = tl.sum(e, axis=1)
        if WITH_ENTROPY:
            # 0 * -inf is NaN: -inf logits contribute nothing to the entropy.
            a_tile = tl.sum(tl.where(e > 0, e * (z - shift[:, None]), 0.0), axis=1)
            step = tl.where(s > 0, m - shift, 0.0)
            a = rescale * (a + s * step) + a_tile
        s = s * rescale + s_tile
        m = shift
    log_s = tl.log(s)
    entropy = log_s - a / s
    return m, log_s, entropy


@triton.jit
def _gradient_sweep(logits_ptr, offset, grad_ptr, grad_offset, in_range, live, target, m, log_s, dlogp,
                    entropy, dentropy, V, inv_temperature, WITH_ENTROPY_GRAD: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """grad = (dlogp * (onehot - p) - dentropy * p * (log p + H)) / T over each row in range, log p =
    (z - m) - log_s (lse = m + log_s); rows that are not live (masked) get 0 and are not read.

    Every tile is loaded before it is stored, so grad_ptr may alias logits_ptr (in-place)."""
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        in_row = (cols < V)[None, :]
        z = tl.load(logits_ptr + offset[:, None] + cols[None, :], mask=live[:, None] & in_row,
                    other=float("-inf"))
        log_p = (z.to(tl.float32) * inv_temperature - m[:, None]) - log_s[:, None]
        p = tl.exp(log_p)
        g = tl.where(cols[None, :] == target[:, None], dlogp[:, None], 0.0) - dlogp[:, None] * p
        if WITH_ENTROPY_GRAD:
            g -= dentropy[:, None] * p * (tl.where(p > 0, log_p, 0.0) + entropy[:, None])
        g = tl.where(live[:, None], g * inv_temperature, 0.0)
        tl.store(grad_ptr + grad_offset[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty),
                 mask=in_range[:, None] & in_row)


@triton.jit
def _store_lse(lse_ptr, row, live, in_range, m, log_s):
    """lse = m + log s as the contract's two fp32 parts (hi, lo) at lse_ptr + 2 row: hi the sum rounded to
    fp32, lo the rest (in fp64: m - hi is exact there), 0 where lse is not finite. The backward's
    (z - hi) - lo is then as exact as (z - m) - log s; hi alone would cost |lse| * 6e-8 relative in p."""
    hi = m + log_s
    finite = (hi - hi) == 0.0
    lo = tl.where(finite, (m.to(tl.float64) - hi.to(tl.float64)) + log_s.to(tl.float64), 0.0).to(tl.float32)
    tl.store(lse_ptr + 2 * row, tl.where(live, hi, 0.0), mask=in_range)
    tl.store(lse_ptr + 2 * row + 1, tl.where(live, lo, 0.0), mask=in_range)


@triton.jit
def forward_kernel(logits_ptr, stride_b, stride_t, ids_ptr, mask_ptr, logp_ptr, lse_ptr,
                   entropy_ptr, N, T, V, inv_temperature, HAS_MASK: tl.constexpr,
                   WITH_ENTROPY: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """(logp, lse[, entropy]) per row; masked rows get 0."""
    row, live, offset = _rows(tl.program_id(0) * ROWS, N, T, stride_b, stride_t, mask_ptr, HAS_MASK, ROWS)
    m, log_s, entropy = _log_sum_exp(logits_ptr, offset, live, V, inv_temperature, WITH_ENTROPY, ROWS,
                                     BLOCK_V)
    target = tl.load(ids_ptr + row, mask=live, other=0)
    z_target = tl.load(logits_ptr + offset + target, mask=live, other=0.0).to(tl.float32)
    in_range = row < N
    tl.store(logp_ptr + row, tl.where(live, (z_target * inv_temperature - m) - log_s, 0.0), mask=in_range)
    _store_lse(lse_ptr, row, live, in_range, m, log_s)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(live, entropy, 0.0), mask=in_range)


@triton.jit
def backward_kernel(logits_ptr, stride_b, stride_t, ids_ptr, mask_ptr, lse_ptr, dlogp_ptr,
                    entropy_ptr, dentropy_ptr, grad_ptr, grad_stride_b, grad_stride_t, N, T, V,
                    inv_temperature, HAS_MASK: tl.constexpr, WITH_ENTROPY_GRAD: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """grad_logits from the saved lse (and entropy) and the upstream dlogp (and dentropy)."""
    row, live, offset = _rows(tl.program_id(0) * ROWS, N, T, stride_b, stride_t, mask_ptr, HAS_MASK, ROWS)
    grad_offset = _row_offset(row, T, grad_stride_b, grad_stride_t)
    target = tl.load(ids_ptr + row, mask=live, other=0)
    lse_hi = tl.load(lse_ptr + 2 * row, mask=live, other=0.0)
    lse_lo = tl.load(lse_ptr + 2 * row + 1, mask=live, other=0.0)
    dlogp = tl.load(dlogp_ptr + row, mask=live, other=0.0)
    entropy = dlogp
    dentropy = dlogp
    if WITH_ENTROPY_GRAD:
        entropy = tl.load(entropy_ptr + row, mask=live, other=0.0)
        dentropy = tl.load(dentropy_ptr + row, mask=live, other=0.0)
    # log p = (z - lse_hi) - lse_lo, as the forward's (z - m) - log s
    _gradient_sweep(logits_ptr, offset, grad_ptr, grad_offset, row < N, live, target, lse_hi, lse_lo,
                    dlogp, entropy, dentropy, V, inv_temperature, WITH_ENTROPY_GRAD, ROWS, BLOCK_V)


@triton.jit
def _ratio_gated(coef, log_ratio, lo, hi, live, GATE_KIND: tl.constexpr):
    """coef times the importance-ratio gate of GATE_KIND (fused_kernel's docstring); 0 where the log-ratio
    is NaN (every comparison with it is false). log_ratio, lo and hi are float64: the bounds rounded to fp32
    would move a clip by up to 3e-8 from torch's."""
    if GATE_KIND == 1:
        inside = log_ratio == log_ratio
        gate = tl.exp(tl.where(inside, tl.minimum(log_ratio, hi), 0.0).to(tl.float32))
    else:
        inside = log_ratio <= hi
        if GATE_KIND == 0:
            inside = inside & (log_ratio >= lo)
        gate = tl.exp(tl.where(inside, log_ratio, 0.0).to(tl.float32))
        if GATE_KIND == 2:  # s (1 - s) = e / (1 + e)^2, e = exp(-|x|): no cancellation where s rounds to 1
            e = tl.exp(-tl.abs(lo.to(tl.float32) * (gate - 1.0)))
            gate = 4.0 * e / ((1.0 + e) * (1.0 + e)) * gate
    return tl.where(inside & live, coef * gate, 0.0)


@triton.jit
def fused_kernel(logits_ptr, stride_b, stride_t, ids_ptr, mask_ptr, coef_ptr, kl_coef_ptr, ref_ptr,
                 old_ptr, ratio_lo_ptr, ratio_hi_ptr, entropy_coef_ptr,
                 logp_ptr, lse_ptr, entropy_ptr, grad_ptr, grad_stride_b, grad_stride_t, N, T, V,
                 inv_temperature, HAS_MASK: tl.constexpr, HAS_KL: tl.constexpr, HAS_GATE: tl.constexpr,
                 WITH_ENTROPY: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_V: tl.constexpr, GATE_KIND: tl.constexpr = 0):
    """Forward, then dlogp = coef * gate + kl_coef * (1 - exp(ref - logp)), then the gradient sweep
    (gate, with HAS_GATE: GATE_KIND's function of l = logp - old, torch_reference.py's contract: 0, the
    window exp(l) where ratio_lo <= l <= ratio_hi; 1, exp(min(l, ratio_hi)); 2, sapo's
    4 s (1 - s) exp(l), s = sigmoid(ratio_lo (exp(l) - 1)), where l <= ratio_hi; else 0).
    HAS_ENTROPY_GRAD (needs WITH_ENTROPY: the sweep uses the row's entropy): the sweep also adds
    -entropy_coef * p * (log p + H) / T, the entropy term of the loss.

    The sweep re-reads the rows this program has just read. They are still in L2 only if few rows
    are in flight: L2 must hold (programs in flight) x (rows' bytes), so the launcher starts a
    bounded number of programs and each walks row tiles pid, pid + programs, ... (persistent)."""
    for first in range(tl.program_id(0) * ROWS, N, tl.num_programs(0) * ROWS):
        row, live, offset = _rows(first, N, T, stride_b, stride_t, mask_ptr, HAS_MASK, ROWS)
        m, log_s, entropy = _log_sum_exp(logits_ptr, offset, live, V, inv_temperature, WITH_ENTROPY,
                                         ROWS, BLOCK_V)
        target = tl.load(ids_ptr + row, mask=live, other=0)
        # The target logit before the sweep: with grad_ptr == logits_ptr the sweep overwrites it.
        z_target = tl.load(logits_ptr + offset + target, mask=live, other=0.0).to(tl.float32)
        logp = tl.where(live, (z_target * inv_temperature - m) - log_s, 0.0)
        dlogp = tl.load(coef_ptr + row, mask=live, other=0.0)
        if HAS_GATE:
            old = tl.load(old_ptr + row, mask=live, other=0.0)
            dlogp = _ratio_gated(dlogp, logp.to(tl.float64) - old.to(tl.float64),
                                 tl.load(ratio_lo_ptr + row, mask=live, other=0.0),
                                 tl.load(ratio_hi_ptr + row, mask=live, other=0.0), live, GATE_KIND)
        if HAS_KL:
            kl_coef = tl.load(kl_coef_ptr + row, mask=live, other=0.0)
            ref = tl.load(ref_ptr + row, mask=live, other=0.0)
            dlogp += tl.where(live, kl_coef * (1.0 - tl.exp(ref - logp)), 0.0)
        in_range = row < N
        tl.store(logp_ptr + row, logp, mask=in_range)
        _store_lse(lse_ptr, row, live, in_range, m, log_s)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, tl.where(live, entropy, 0.0), mask=in_range)
        grad_offset = _row_offset(row, T, grad_stride_b, grad_stride_t)
        if HAS_ENTROPY_GRAD:
            tl.static_assert(WITH_ENTROPY, "HAS_ENTROPY_GRAD needs WITH_ENTROPY")
            entropy_coef = tl.load(entropy_coef_ptr + row, mask=live, other=0.0)
            _gradient_sweep(logits_ptr, offset, grad_ptr, grad_offset, in_range, live, target, m, log_s,
                            dlogp, entropy, entropy_coef, V, inv_temperature, True, ROWS, BLOCK_V)
        else:
            _gradient_sweep(logits_ptr, offset, grad_ptr, grad_offset, in_range, live, target, m, log_s,
                            dlogp, m, m, V, inv_temperature, False, ROWS, BLOCK_V)
