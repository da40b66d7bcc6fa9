// Internals shared by the portable, AVX2 and AVX-512 implementations: element conversions, a branch-free
// polynomial exp, and the per-row algorithm written once over an "inner loops" policy (Ops).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>

#include "logprob_kernels.h"

namespace frpo {
namespace detail {

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// Conversions are branch-free (selects, no early returns) so that loops over them vectorise.
inline float bf16_to_f32(uint16_t h) { return bits_float(uint32_t(h) << 16); }
// f's bits with the bf16 result in their top 16 bits (the low 16 are left as they fall): round to
// nearest even, NaN stays NaN (quietened). The portable path's bf16 stores merge two of these per
// 32-bit word (logprob_kernels_portable.cpp), so the shift to the low half is left to the caller.
// bf16_round_bits_finite: the same for f known not to be NaN (a NaN with high payload bits could carry
// into the sign bit here).
inline uint32_t bf16_round_bits_finite(float f) {
  const uint32_t u = float_bits(f);
  return u + 0x7FFFu + ((u >> 16) & 1u);
}
inline uint32_t bf16_round_bits(float f) {
  // NaN tested as a float compare: one vector op (as integers, three on x86 without AVX-512)
  return f != f ? float_bits(f) | 0x00400000u : bf16_round_bits_finite(f);
}
inline uint16_t f32_to_bf16(float f) { return uint16_t(bf16_round_bits(f) >> 16); }
#if defined(__aarch64__)
// AArch64 converts fp16 to fp32 in one instruction (fcvtl when vectorised), with the same results as
// the bit manipulation below. (The other way, GCC 12 does not vectorise fcvtn: f32_to_f16 uses bits.)
inline float f16_to_f32(uint16_t h) {
  __fp16 v;
  std::memcpy(&v, &h, 2);
  return float(v);
}
#else
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, em = h & 0x7FFFu;  // em: exponent and mantissa
  const uint32_t normal = (em << 13) + 0x38000000u;                       // rebias 15 -> 127
  const uint32_t special = (em << 13) | 0x7F800000u;                      // exponent 31: inf, NaN
  const uint32_t tiny = float_bits(float(int32_t(em)) * 5.9604644775390625e-8f);  // 0, subnormal: em * 2^-24, exact
  uint32_t r = em >= 0x7C00u ? special : normal;
  r = em < 0x0400u ? tiny : r;
  return bits_float(r | sign);
}
#endif
inline uint16_t f32_to_f16(float f) {  // round to nearest even, with subnormals, inf and NaN
  const uint32_t u = float_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  // normal results: rebias and round the 13 dropped mantissa bits to nearest even
  uint32_t r = (a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
  // below 2^-14 the result is a multiple of 2^-24, the spacing of fp32 in [0.5, 1): adding 0.5 rounds
  // |f| to that grid (nearest even) and leaves the multiple in the low bits
  const uint32_t sub = float_bits(bits_float(a) + 0.5f) - 0x3F000000u;
  r = a < 0x38800000u ? sub : r;
  r = a >= 0x477FF000u ? 0x7C00u : r;  // >= 65520 rounds to inf
  r = a > 0x7F800000u ? 0x7E00u : r;   // NaN
  return uint16_t(sign | r);
}

struct F32 {
  using T = float;
  static float load(const T* p) { return *p; }
  static T from(float v) { return v; }
};
struct BF16 {
  using T = uint16_t;
  static float load(const T* p) { return bf16_to_f32(*p); }
  static T from(float v) { return f32_to_bf16(v); }
};
struct F16 {
  using T = uint16_t;
  static float load(const T* p) { return f16_to_f32(*p); }
  static T from(float v) { return f32_to_f16(v); }
};

// exp(x) arguments are clamped to [kExpLo, kExpHi]; at kExpLo the result is exactly 0, so -inf
// logits give p = 0 and (clamped x) * p = 0 instead of NaN.
constexpr float kExpLo = -88.0f, kExpHi = 88.3f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
// Adding kRoundMagic (1.5 * 2^23 + 127) rounds x*log2e to an integer n and leaves n + 127, the
// exponent field of 2^n, in the low mantissa bits, so 2^n is one shift of the sum's bits.
constexpr float kRoundMagic = 12583039.f;
// exp(r) ~ 1 + r*(kE1 + r*(kE2 + r*(kE3 + r*(kE4 + r*kE5)))) on |r| <= ln2/2: a relative-error
// minimax fit (Lawson iterations, fp32 coefficients), max error 1.7e-7 evaluated in fp32 Horner form.
// Degree 5 instead of 7 and a one-constant reduction r = x - n*ln2 (the fp32 rounding of ln2 adds
// |n| * 2.7e-9 relative: 3e-8 for the terms that dominate a sum, 3.4e-7 at n = -127, where exp(x) is
// below 1e-38) -- 9 FMA-port ops per 8 exps instead of 12 (see csrc/bench/README.md for the numbers).
constexpr float kE1 = 0.9999997019767761f, kE2 = 0.4999915063381195f, kE3 = 0.1666763573884964f,
                kE4 = 0.04189793020486832f, kE5 = 0.008290315046906471f;

// NaN stays NaN (both comparisons are false): a NaN logit must reach the sums and the gradient.
inline float clamp_exp_arg(float x) {
  x = x < kExpLo ? kExpLo : x;
  return x > kExpHi ? kExpHi : x;
}
// exp of an argument already in [kExpLo, kExpHi], with fused multiply-adds: where FMA is in hardware
// (the AVX2 file's scalar tails, aarch64, -mfma builds). Branch-free, so loops over it vectorise; the
// same operations in the same order as the AVX2 exp8, so both round alike.
inline float exp_poly(float x) {
  const float t = std::fma(x, kLog2e, kRoundMagic);
  const float n = t - kRoundMagic;
  const float r = std::fma(-n, kLn2, x);
  float p = std::fma(kE5, r, kE4);
  p = std::fma(p, r, kE3);
  p = std::fma(p, r, kE2);
  p = std::fma(p, r, kE1);
  p = std::fma(p, r, 1.f);
  const float scale = bits_float(float_bits(t) << 23);  // 2^n; 0 for n = -127
  return p * scale;
}
// The same without FMA (x86-64 baseline: std::fma would be a slow library call), in the exp2 domain:
// y = x*log2e rounded, n = round(y), 2^(y - n) from the polynomial above with its coefficients
// scaled by ln2^k (y - n is exact). The rounding of y costs |y| * 2^-24 * ln2 relative (4e-6 at
// x = -87, 2.5e-7 on [-1, 0], where the terms that dominate a sum are), against the two-constant
// (Cody-Waite) reduction's 4 more operations, a fifth of the exp. The polynomial is in Estrin's form:
// SSE2 loops are bound by the chain of dependent operations (Horner: 10 in a row), not their count.
// Both measured: fp32 fused 1.48 -> 1.20 ns/logit in cache, 1 thread (csrc/bench/README.md). With FMA
// the loops are bound by the count, and Estrin's 2 more multiplies measured slower (exp_poly, exp_v).
constexpr double kLn2d = 0.693147180559945309;
constexpr float kP1 = float(kE1 * kLn2d), kP2 = float(kE2 * kLn2d * kLn2d),
                kP3 = float(kE3 * kLn2d * kLn2d * kLn2d), kP4 = float(kE4 * kLn2d * kLn2d * kLn2d * kLn2d),
                kP5 = float(kE5 * kLn2d * kLn2d * kLn2d * kLn2d * kLn2d);
inline float exp_poly_nofma(float x) {
  const float y = x * kLog2e;
  const float t = y + kRoundMagic;
  const float f = y - (t - kRoundMagic);
  const float f2 = f * f, f4 = f2 * f2;
  const float p = ((kP1 * f + 1.f) + f2 * (kP3 * f + kP2)) + f4 * (kP5 * f + kP4);
  return p * bits_float(float_bits(t) << 23);
}

// Elements per sum-exp chunk (one chunk max, one kept-exp scale factor each). While one chunk is summed
// the next one is prefetched, so two chunks must fit in L1 (32 KiB): 2048 fp32 (8 KiB); 2048..8192
// measured within noise of each other, 1024 slower (csrc/bench/README.md, when every chunk had a max sweep).
constexpr int64_t kChunk = 2048;
// Backward-only sweeps (nothing of the row is cached) prefetch this many elements ahead.
constexpr int64_t kBwdPrefetch = 2048;
// The fused kernel prefetches only the next row's first chunk, from this row's last exp sweep:
// prefetching the whole next row during the gradient sweep measured slower (1.91x vs 1.54x a copy).

// m, log_s: lse = m + log_s in parts (m the row's largest z = x/T), for the fused gradient: p = exp(z - lse)
// from lse rounded to fp32 is off by up to |lse| * 6e-8 relative (1e-4 at logits of 1e4; at 1e38 even a
// double lse loses log_s), where p = exp((z - m) - log_s) is as exact as torch's. Set for finite lse only.
struct RowStats {
  float logp; double lse; float entropy, m; double log_s;
  // lse as hi + lo, ForwardOut's pair: hi rounded to fp32, lo the rest (0 where lse is not finite)
  float lse_hi() const { return float(lse); }
  float lse_lo() const { return std::isfinite(lse) ? float((double(m) - double(lse_hi())) + log_s) : 0.f; }
};

// A chunk summed against a stale max (see Row::forward) is redone above this sum: e^44, so every
// logit was at most ~44 above the max used, its exp and the sum stay far from fp32 overflow, and
// the chunk's terms keep full relative precision (the sums are rescaled in double).
constexpr float kStaleSum = 1.2e19f;

// Whether x[0, n) holds a NaN: for the rare non-finite paths, never in a hot loop.
template <class E>
bool any_nan(const typename E::T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = E::load(x + i);
    if (v != v) return true;
  }
  return false;
}

inline int64_t row_offset(int64_t r, int64_t length, int64_t stride_b, int64_t stride_t) {
  return (r / length) * stride_b + (r % length) * stride_t;
}

// The per-row algorithm. Ops supplies the inner loops over a span of one row:
//   max_raw<E>(x, n) -> float                      max of the raw logits, NaN ignored (-inf if none is larger)
//   sum_exp<E, Ent, Store>(x, n, inv_t, m, &s, &t, pf, e_out)
//                                                  s = sum e, t = sum e*d, d = clamp(x*inv_t - m, lo, hi), e = exp(d)
//                                                  (m may be below the chunk's max: d up to kExpHi);
//                                                  Store: also e_out[i] = e (fp32 scratch)
//   scale_span<E>(e, g, n, f, streaming)           g = e*f (e: fp32 scratch)
//   scale_ent_span<E>(e, x, g, n, fa, fb, inv_t, lse, streaming)
//                                                  g = e*(fa + fb*d), d = max(x*inv_t - lse, kExpLo)
//                                                  (e: fp32 scratch as scale_span reads it; x read before
//                                                  g is written, so g may be x: in place)
//   grad_span<E, Ent>(x, g, n, inv_t, lse_hi, a, b, streaming, pf)   g = e*(a + b*d), d = x*inv_t - lse_hi,
//                                                  e = exp(d) (lse's lo part folded into a, b: Row::gradient)
//   (pf: a hint -- prefetch x[i + pf] while x[i] is processed; 0 = none. Prefetches never fault, so
//   pf may point past the row or the buffer.)
//   zero_span<E>(g, n, streaming)
//   fence()                                          after streaming stores
template <class Ops, class E>
struct Row {
  using T = typename E::T;

  // One pass over the row: chunk max then the chunk's exps while it is in L1 (one exp per logit).
  // The exp sweep of a chunk prefetches the next chunk (the last one: next_row, the start of the row
  // that comes next, 0 if unknown), so DRAM reads overlap the exp arithmetic.
  // e_out/chunk_m (fused): the exps are kept, e_out[i] = exp(x_i/T - chunk_m[c]) for i in chunk c,
  // chunk_m[c] = -inf where the chunk was skipped (all -inf so far: e_out not written).
  static RowStats forward(const T* x, int64_t vocab, int64_t id, float inv_t, bool with_entropy,
                          int64_t next_row = 0, float* e_out = nullptr, float* chunk_m = nullptr) {
    constexpr float kInf = std::numeric_limits<float>::infinity();
    float m = -kInf;
    double s = 0.0, t = 0.0;  // sum exp(z - m), sum exp(z - m) * (z - m)
    bool nan_seen = false;
    for (int64_t c = 0; c < vocab; c += kChunk) {
      const int64_t n = vocab - c < kChunk ? vocab - c : kChunk;
      const int64_t pf = c + kChunk < vocab ? kChunk : (next_row ? next_row - c : 0);
      float* e = e_out ? e_out + c : nullptr;
      float cs = 0.f, ct = 0.f, m_new = m;
      // Once m is finite a chunk is summed against it, without a max sweep: exp arguments are clamped
      // to kExpHi (finite exps), and a chunk sum above kStaleSum (a logit more than ~44 above m, or NaN
      // or inf) sends the chunk through the max sweep below and sums it again (rare).
      const bool stale = m > -kInf && m < kInf;
      if (stale) sum_chunk(x + c, n, inv_t, m, with_entropy, pf, e, &cs, &ct);
      if (!stale || !(cs <= kStaleSum)) {
        // max_raw ignores NaN; a NaN elsewhere reaches the sums through exp(NaN) = NaN (the exp
        // arguments' clamps keep NaN), so only chunks skipped here need looking at for NaN
        const float cm = Ops::template max_raw<E>(x + c, n) * inv_t;
        m_new = cm > m ? cm : m;
        if (m_new == -kInf) {  // all -inf so far (rare): nothing to sum, but a NaN here must not be lost
          if (chunk_m) chunk_m[c / kChunk] = m_new;
          nan_seen = nan_seen || any_nan<E>(x + c, n);
          continue;
        }
        sum_chunk(x + c, n, inv_t, m_new, with_entropy, pf, e, &cs, &ct);
      }
      if (chunk_m) chunk_m[c / kChunk] = m_new;
      if (m_new != m && s > 0.0) {  // rescale the running sums to the new max
        const double shift = double(m) - double(m_new), scale = std::exp(shift);
        t = scale * (t + shift * s);
        s *= scale;
      }
      s += cs;
      t += ct;
      m = m_new;
    }
    RowStats st;
    // Non-finite rows, as torch's log_softmax / logsumexp give them: any NaN makes everything NaN;
    // otherwise a +inf logit gives lse = +inf and logp = entropy = NaN (inf - inf). Both leave s NaN,
    // so they are told apart by a look for NaN, on this rare path only.
    if (nan_seen || (m == kInf && any_nan<E>(x, vocab))) {
      st.logp = st.lse = st.entropy = std::numeric_limits<float>::quiet_NaN();
      return st;
    }
    if (m == kInf) {
      st.lse = kInf;
      st.logp = st.entropy = std::numeric_limits<float>::quiet_NaN();
      return st;
    }
    // all -inf (m = -inf, s = 0): lse = -inf, logp = entropy = NaN, as torch gives, from the formulas
    const double log_s = std::log(s);
    st.lse = double(m) + log_s;
    st.m = m;
    st.log_s = log_s;
    st.logp = float((double(E::load(x + id) * inv_t) - double(m)) - log_s);
    st.entropy = with_entropy ? float(log_s - t / s) : 0.f;
    return st;
  }

  // cs = sum e, ct = sum e*d, e = exp(d), d = clamp(x/T - m) over one chunk; e_out (fused): keeps e.
  static void sum_chunk(const T* x, int64_t n, float inv_t, float m, bool with_entropy, int64_t pf, float* e_out,
                        float* cs, float* ct) {
    if (e_out) {
      if (with_entropy) Ops::template sum_exp<E, true, true>(x, n, inv_t, m, cs, ct, pf, e_out);
      else Ops::template sum_exp<E, false, true>(x, n, inv_t, m, cs, ct, pf, e_out);
    } else {
      if (with_entropy) Ops::template sum_exp<E, true, false>(x, n, inv_t, m, cs, ct, pf, nullptr);
      else Ops::template sum_exp<E, false, false>(x, n, inv_t, m, cs, ct, pf, nullptr);
    }
  }

  // grad = dlogp*(onehot(id) - p)/T - dentropy*p*(log p + H)/T over the whole row, one write per logit.
  // pf: prefetch distance in elements (the backward kernel's kBwdPrefetch; the fused kernel uses
  // gradient_from_exps instead).
  // lse comes as hi + lo (ForwardOut): with d = z - hi, p = exp(d) e^-lo and log p = d - lo, so
  // p (a + b log p) = exp(d) (a' + b' d) with a' = e^-lo (a - b lo), b' = e^-lo b. z - hi is exact wherever
  // p is not negligible, so p is as exact as the forward's, at any logit size and at no cost per logit.
  static void gradient(const T* x, T* g, int64_t vocab, int64_t id, float inv_t, float hi, float lo, float dlogp,
                       bool with_entropy, float entropy, float dentropy, bool streaming, int64_t pf) {
    const float xid = E::load(x + id);  // read before the (possibly in-place) writes
    const double fold = std::exp(-double(lo));
    const double a0 = (-double(dlogp) - (with_entropy ? double(dentropy) * double(entropy) : 0.0)) * inv_t;
    const double b0 = with_entropy ? -double(dentropy) * inv_t : 0.0;
    const float a = float(fold * (a0 - b0 * lo)), b = float(fold * b0);
    if (with_entropy) {
      Ops::template grad_span<E, true>(x, g, id, inv_t, hi, a, b, streaming, pf);
      Ops::template grad_span<E, true>(x + id + 1, g + id + 1, vocab - id - 1, inv_t, hi, a, b, streaming, pf);
    } else {
      Ops::template grad_span<E, false>(x, g, id, inv_t, hi, a, b, streaming, pf);
      Ops::template grad_span<E, false>(x + id + 1, g + id + 1, vocab - id - 1, inv_t, hi, a, b, streaming, pf);
    }
    // the target logit: (1 - p) computed directly, no cancellation against dlogp
    double d = (double(xid * inv_t) - double(hi)) - double(lo);
    d = d < kExpLo ? kExpLo : d > kExpHi ? kExpHi : d;  // NaN stays NaN
    const double p = std::exp(d);
    double gid = double(dlogp) * (1.0 - p);
    if (with_entropy) gid -= double(dentropy) * p * (d + double(entropy));
    g[id] = E::from(float(gid * inv_t));
  }
};

// The fused kernel's gradient sweep, from the exps forward() kept (e, chunk_m): g = e * dlogp-scaled
// exp(chunk max - lse) per chunk, one multiply per logit instead of a second exp; the target logit
// as in gradient(). lse comes as m + log_s (RowStats). xid: the target logit, read before any write (in
// place, g may be the logits). With the entropy term (with_entropy: dentropy = the entropy coefficient,
// entropy = the row's H), each logit's p*(a + b*log p) needs log p: the sweep reads the logits row again (from L2 when
// it stayed there) next to the kept exps -- a fused multiply-add and a multiply more per logit, still
// no second exp (scale_ent_span).
template <class Ops, class E>
void gradient_from_exps(const float* e, const float* chunk_m, const typename E::T* x, typename E::T* g,
                        int64_t vocab, int64_t id, float xid, float inv_t, float m, double log_s, float dlogp,
                        bool with_entropy, float entropy, float dentropy, bool streaming) {
  // grad = p * (a + b * log p), as in Row::gradient
  const double a = (-double(dlogp) - (with_entropy ? double(dentropy) * double(entropy) : 0.0)) * inv_t;
  const double b = with_entropy ? -double(dentropy) * inv_t : 0.0;
  for (int64_t c = 0; c < vocab; c += kChunk) {
    const int64_t n = vocab - c < kChunk ? vocab - c : kChunk;
    const float mc = chunk_m[c / kChunk];
    if (mc == -std::numeric_limits<float>::infinity()) {
      Ops::template zero_span<E>(g + c, n, streaming);
      continue;
    }
    const double scale = std::exp((double(mc) - double(m)) - log_s);  // p = e * scale in this chunk
    // log p = (z - m) - log_s: the sweep subtracts m, and the term b * scale * log_s joins the constant one
    if (with_entropy)
      Ops::template scale_ent_span<E>(e + c, x + c, g + c, n, float((a - b * log_s) * scale), float(b * scale),
                                      inv_t, m, streaming);
    else
      Ops::template scale_span<E>(e + c, g + c, n, float(a * scale), streaming);
  }
  // the target logit: (1 - p) computed directly, no cancellation against dlogp
  double d = (double(xid * inv_t) - double(m)) - log_s;
  d = d < kExpLo ? kExpLo : d > kExpHi ? kExpHi : d;  // NaN stays NaN
  const double p = std::exp(d);
  double gid = double(dlogp) * (1.0 - p);
  if (with_entropy) gid -= double(dentropy) * p * (d + double(entropy));
  g[id] = E::from(float(gid * inv_t));
}

template <class Ops, class E>
void forward_rows_t(const LogitsView& L, const TokenInputs& tok, const ForwardOut& out, int64_t r0, int64_t r1) {
  const auto* base = static_cast<const typename E::T*>(L.data);
  for (int64_t r = r0; r < r1; ++r) {
    if (tok.mask && !tok.mask[r]) {
      out.logp[r] = 0.f;
      out.lse[2 * r] = out.lse[2 * r + 1] = 0.f;
      if (out.entropy) out.entropy[r] = 0.f;
      continue;
    }
    const auto* x = base + row_offset(r, L.length, L.stride_b, L.stride_t);
    const int64_t next = r + 1 < r1 ? row_offset(r + 1, L.length, L.stride_b, L.stride_t) - (x - base) : 0;
    const RowStats st = Row<Ops, E>::forward(x, L.vocab, tok.ids[r], tok.inv_temperature, out.entropy != nullptr, next);
    out.logp[r] = st.logp;
    out.lse[2 * r] = st.lse_hi();
    out.lse[2 * r + 1] = st.lse_lo();
    if (out.entropy) out.entropy[r] = st.entropy;
  }
}

template <class Ops, class E>
void backward_rows_t(const LogitsView& L, const TokenInputs& tok, const BackwardIn& in, const GradView& G,
                     int64_t r0, int64_t r1) {
  const auto* base = static_cast<const typename E::T*>(L.data);
  auto* gbase = static_cast<typename E::T*>(G.data);
  const bool with_entropy = in.entropy != nullptr && in.dentropy != nullptr;
  for (int64_t r = r0; r < r1; ++r) {
    auto* g = gbase + row_offset(r, L.length, G.stride_b, G.stride_t);
    if (tok.mask && !tok.mask[r]) {
      Ops::template zero_span<E>(g, L.vocab, G.streaming);
      continue;
    }
    const auto* x = base + row_offset(r, L.length, L.stride_b, L.stride_t);
    Row<Ops, E>::gradient(x, g, L.vocab, tok.ids[r], tok.inv_temperature, in.lse[2 * r], in.lse[2 * r + 1], in.dlogp[r], with_entropy,
                          with_entropy ? in.entropy[r] : 0.f, with_entropy ? in.dentropy[r] : 0.f, G.streaming,
                          kBwdPrefetch);
  }
  if (G.streaming) Ops::fence();
}

// coef times the gate of `kind` (logprob_kernels.h) of the log-ratio logp - old, in double; a NaN log-ratio
// gives 0 (the row's NaN lse still makes its gradient NaN, as torch's).
inline float ratio_gated(GateKind kind, float coef, float logp, float old, double lo, double hi) {
  const double log_ratio = double(logp) - double(old);
  if (std::isnan(log_ratio)) return 0.f;
  if (kind == kGateCapped) return float(double(coef) * std::exp(std::min(log_ratio, hi)));
  if (log_ratio > hi || (kind == kGateWindow && log_ratio < lo)) return 0.f;
  const double ratio = std::exp(log_ratio);
  if (kind == kGateWindow) return float(double(coef) * ratio);
  const double e = std::exp(-std::abs(lo * (ratio - 1.0)));  // s (1 - s) = e / (1 + e)^2, s = sigmoid
  return float(double(coef) * 4.0 * e / ((1.0 + e) * (1.0 + e)) * ratio);
}

template <class Ops, class E>
void fused_rows_t(const LogitsView& L, const TokenInputs& tok, const FusedIn& in, const ForwardOut& out,
                  const GradView& G, int64_t r0, int64_t r1) {
  const auto* base = static_cast<const typename E::T*>(L.data);
  auto* gbase = static_cast<typename E::T*>(G.data);
  const bool with_ent_grad = in.entropy_coef != nullptr;
  if (with_ent_grad && !out.entropy && r0 < r1) {
    // The entropy term needs each row's H: computed into scratch when the caller does not want it. (A
    // separate call rather than `out.entropy || with_ent_grad` in the forward call below: that made GCC 12
    // leave one of the portable fp16 sum loops scalar.)
    std::unique_ptr<float[]> entropy(new float[size_t(r1)]);
    ForwardOut with_entropy = out;
    with_entropy.entropy = entropy.get();
    return fused_rows_t<Ops, E>(L, tok, in, with_entropy, G, r0, r1);
  }
  const bool with_kl = in.kl_coef != nullptr && in.ref_logps != nullptr;
  // Scratch for one row's exps (fp32) and chunk maxima: it stays in L2 between the two sweeps, and
  // the logits row need not (the gradient sweep reads only the scratch).
  const int64_t nchunks = (L.vocab + kChunk - 1) / kChunk;
  std::unique_ptr<float[]> scratch(new float[size_t(L.vocab + nchunks)]);
  float* e = scratch.get();
  float* chunk_m = e + L.vocab;
  for (int64_t r = r0; r < r1; ++r) {
    auto* g = gbase + row_offset(r, L.length, G.stride_b, G.stride_t);
    if (tok.mask && !tok.mask[r]) {
      out.logp[r] = 0.f;
      out.lse[2 * r] = out.lse[2 * r + 1] = 0.f;
      if (out.entropy) out.entropy[r] = 0.f;
      Ops::template zero_span<E>(g, L.vocab, G.streaming);
      continue;
    }
    const auto* x = base + row_offset(r, L.length, L.stride_b, L.stride_t);
    const float inv_t = tok.inv_temperature;
    const int64_t id = tok.ids[r];
    const float xid = E::load(x + id);  // before the (possibly in-place) writes
    // the next row's first chunk is prefetched by this row's last chunk (see the note under kBwdPrefetch)
    const int64_t next = r + 1 < r1 ? row_offset(r + 1, L.length, L.stride_b, L.stride_t) - (x - base) : 0;
    const RowStats st = Row<Ops, E>::forward(x, L.vocab, id, inv_t, out.entropy != nullptr, next, e, chunk_m);
    out.logp[r] = st.logp;
    out.lse[2 * r] = st.lse_hi();
    out.lse[2 * r + 1] = st.lse_lo();
    if (out.entropy) out.entropy[r] = st.entropy;
    float dlogp = in.coef[r];
    if (in.old_logps) dlogp = ratio_gated(in.gate_kind, dlogp, st.logp, in.old_logps[r], in.ratio_lo[r],
                                                in.ratio_hi[r]);
    if (with_kl) dlogp += float(double(in.kl_coef[r]) * (1.0 - std::exp(double(in.ref_logps[r]) - st.logp)));
    const float ecoef = with_ent_grad ? in.entropy_coef[r] : 0.f;
    if (std::isfinite(st.lse)) {
      gradient_from_exps<Ops, E>(e, chunk_m, x, g, L.vocab, id, xid, inv_t, st.m, st.log_s, dlogp, with_ent_grad, st.entropy,
                                 ecoef, G.streaming);
    } else {  // NaN / +inf / all -inf row (rare): the kept exps hold NaN; the plain sweep gives torch's pattern
      Row<Ops, E>::gradient(x, g, L.vocab, id, inv_t, st.lse_hi(), 0.f, dlogp, with_ent_grad, st.entropy, ecoef, G.streaming,
                            kBwdPrefetch);
    }
  }
  if (G.streaming) Ops::fence();
}

// A complete implementation for one instruction set: the three entry points.
struct Impl {
  const char* name;
  void (*forward)(const LogitsView&, const TokenInputs&, const ForwardOut&, int64_t, int64_t);
  void (*backward)(const LogitsView&, const TokenInputs&, const BackwardIn&, const GradView&, int64_t, int64_t);
  void (*fused)(const LogitsView&, const TokenInputs&, const FusedIn&, const ForwardOut&, const GradView&,
                int64_t, int64_t);
};

template <class Ops>
struct DtypeSwitch {
  static void forward(const LogitsView& L, const TokenInputs& tok, const ForwardOut& o, int64_t r0, int64_t r1) {
    switch (L.dtype) {
      case DType::F32: return forward_rows_t<Ops, F32>(L, tok, o, r0, r1);
      case DType::BF16: return forward_rows_t<Ops, BF16>(L, tok, o, r0, r1);
      case DType::F16: return forward_rows_t<Ops, F16>(L, tok, o, r0, r1);
    }
  }
  static void backward(const LogitsView& L, const TokenInputs& tok, const BackwardIn& in, const GradView& G,
                       int64_t r0, int64_t r1) {
    switch (L.dtype) {
      case DType::F32: return backward_rows_t<Ops, F32>(L, tok, in, G, r0, r1);
      case DType::BF16: return backward_rows_t<Ops, BF16>(L, tok, in, G, r0, r1);
      case DType::F16: return backward_rows_t<Ops, F16>(L, tok, in, G, r0, r1);
    }
  }
  static void fused(const LogitsView& L, const TokenInputs& tok, const FusedIn& in, const ForwardOut& o,
                    const GradView& G, int64_t r0, int64_t r1) {
    switch (L.dtype) {
      case DType::F32: return fused_rows_t<Ops, F32>(L, tok, in, o, G, r0, r1);
      case DType::BF16: return fused_rows_t<Ops, BF16>(L, tok, in, o, G, r0, r1);
      case DType::F16: return fused_rows_t<Ops, F16>(L, tok, in, o, G, r0, r1);
    }
  }
};

const Impl& portable_impl();
const char* portable_slow_reason();  // "" when the portable loops are vector code in this build
const Impl* avx2_impl();    // nullptr when not built for x86-64 or the CPU lacks AVX2/FMA/F16C
const Impl* avx512_impl();  // nullptr when not built for x86-64 or the CPU lacks AVX-512 F/BW/DQ/VL

}  // namespace detail
}  // namespace frpo
