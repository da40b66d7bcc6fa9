// Internals shared by the scalar and AVX2 implementations: element conversions, a branch-free
// polynomial exp, and the per-row algorithm written once over an "inner loops" policy (Ops).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "logprob_kernels.h"

namespace frpo {
namespace detail {

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float bf16_to_f32(uint16_t h) { return bits_float(uint32_t(h) << 16); }
inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float v = float(mant) * 5.9604644775390625e-8f;
    return bits_float(float_bits(v) | sign);
  }
  if (exp == 31) return bits_float(sign | 0x7F800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}
inline uint16_t f32_to_f16(float f) {  // round to nearest even, with subnormals, inf and NaN
  const uint32_t u = float_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return uint16_t(sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (a >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u)  // below 2^-14: a multiple of 2^-24; scaling by 2^24 is exact
    return uint16_t(sign | uint32_t(std::nearbyint(bits_float(a) * 16777216.f)));
  return uint16_t(sign | ((a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13));
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
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // n*kLn2Hi is exact for |n| < 2^8
constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
// minimax coefficients of (exp(r) - 1 - r) / r^2 on [-ln2/2, ln2/2] (about 1 ulp)
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

inline float clamp_exp_arg(float x) {
  x = x < kExpLo ? kExpLo : x;
  return x > kExpHi ? kExpHi : x;
}
// exp of an argument already in [kExpLo, kExpHi]; branch-free so compilers can vectorise it.
inline float exp_poly(float x) {
  const float t = x * kLog2e + kRoundMagic;
  const float n = t - kRoundMagic;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kP0;
  p = p * r + kP1; p = p * r + kP2; p = p * r + kP3; p = p * r + kP4; p = p * r + kP5;
  const float e = (p * r) * r + r + 1.f;
  const float scale = bits_float((float_bits(t) + 127u) << 23);  // 2^n; 0 for n = -127
  return e * scale;
}

constexpr int64_t kChunk = 4096;  // elements per max/sum-exp chunk: 16 KiB of fp32 stays in L1

struct RowStats { float logp, lse, entropy; };

inline int64_t row_offset(int64_t r, int64_t length, int64_t stride_b, int64_t stride_t) {
  return (r / length) * stride_b + (r % length) * stride_t;
}

// The per-row algorithm. Ops supplies the inner loops over a span of one row:
//   max_raw<E>(x, n) -> float                      max of the raw logits (-inf if all are -inf)
//   sum_exp<E, Ent>(x, n, inv_t, m, &s, &t)        s = sum e, t = sum e*d, d = max(x*inv_t - m, lo), e = exp(d)
//   grad_span<E, Ent>(x, g, n, inv_t, lse, a, b, streaming)   g = p*(a + b*d), d = x*inv_t - lse, p = exp(d)
//   zero_span<E>(g, n, streaming)
//   fence()                                          after streaming stores
template <class Ops, class E>
struct Row {
  using T = typename E::T;

  // One pass over the row: chunk max then the chunk's exps while it is in L1 (one exp per logit).
  static RowStats forward(const T* x, int64_t vocab, int64_t id, float inv_t, bool with_entropy) {
    float m = -std::numeric_limits<float>::infinity();
    double s = 0.0, t = 0.0;  // sum exp(z - m), sum exp(z - m) * (z - m)
    for (int64_t c = 0; c < vocab; c += kChunk) {
      const int64_t n = vocab - c < kChunk ? vocab - c : kChunk;
      const float cm = Ops::template max_raw<E>(x + c, n) * inv_t;
      const float m_new = cm > m ? cm : m;
      if (m_new == -std::numeric_limits<float>::infinity()) continue;  // all -inf so far
      float cs = 0.f, ct = 0.f;
      if (with_entropy) Ops::template sum_exp<E, true>(x + c, n, inv_t, m_new, &cs, &ct);
      else Ops::template sum_exp<E, false>(x + c, n, inv_t, m_new, &cs, &ct);
      if (m_new != m && s > 0.0) {  // rescale the running sums to the new max
        const double shift = double(m) - double(m_new), scale = std::exp(shift);
        t = scale * (t + shift * s);
        s *= scale;
      }
      s += cs;
      t += ct;
      m = m_new;
    }
    const double log_s = std::log(s);
    RowStats st;
    st.lse = float(double(m) + log_s);
    st.logp = float((double(E::load(x + id) * inv_t) - double(m)) - log_s);
    st.entropy = with_entropy ? float(log_s - t / s) : 0.f;
    return st;
  }

  // grad = dlogp*(onehot(id) - p)/T - dentropy*p*(log p + H)/T over the whole row, one write per logit.
  static void gradient(const T* x, T* g, int64_t vocab, int64_t id, float inv_t, float lse, float dlogp,
                       bool with_entropy, float entropy, float dentropy, bool streaming) {
    const float xid = E::load(x + id);  // read before the (possibly in-place) writes
    const float a = (-dlogp - (with_entropy ? dentropy * entropy : 0.f)) * inv_t;
    const float b = with_entropy ? -dentropy * inv_t : 0.f;
    if (with_entropy) {
      Ops::template grad_span<E, true>(x, g, id, inv_t, lse, a, b, streaming);
      Ops::template grad_span<E, true>(x + id + 1, g + id + 1, vocab - id - 1, inv_t, lse, a, b, streaming);
    } else {
      Ops::template grad_span<E, false>(x, g, id, inv_t, lse, a, b, streaming);
      Ops::template grad_span<E, false>(x + id + 1, g + id + 1, vocab - id - 1, inv_t, lse, a, b, streaming);
    }
    // the target logit: (1 - p) computed directly, no cancellation against dlogp
    const double d = clamp_exp_arg(xid * inv_t - lse);
    const double p = std::exp(d);
    double gid = double(dlogp) * (1.0 - p);
    if (with_entropy) gid -= double(dentropy) * p * (d + double(entropy));
    g[id] = E::from(float(gid * inv_t));
  }
};

template <class Ops, class E>
void forward_rows_t(const LogitsView& L, const TokenInputs& tok, const ForwardOut& out, int64_t r0, int64_t r1) {
  const auto* base = static_cast<const typename E::T*>(L.data);
  for (int64_t r = r0; r < r1; ++r) {
    if (tok.mask && !tok.mask[r]) {
      out.logp[r] = out.lse[r] = 0.f;
      if (out.entropy) out.entropy[r] = 0.f;
      continue;
    }
    const auto* x = base + row_offset(r, L.length, L.stride_b, L.stride_t);
    const RowStats st = Row<Ops, E>::forward(x, L.vocab, tok.ids[r], tok.inv_temperature, out.entropy != nullptr);
    out.logp[r] = st.logp;
    out.lse[r] = st.lse;
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
    Row<Ops, E>::gradient(x, g, L.vocab, tok.ids[r], tok.inv_temperature, in.lse[r], in.dlogp[r], with_entropy,
                          with_entropy ? in.entropy[r] : 0.f, with_entropy ? in.dentropy[r] : 0.f, G.streaming);
  }
  if (G.streaming) Ops::fence();
}

template <class Ops, class E>
void fused_rows_t(const LogitsView& L, const TokenInputs& tok, const FusedIn& in, const ForwardOut& out,
                  const GradView& G, int64_t r0, int64_t r1) {
  const auto* base = static_cast<const typename E::T*>(L.data);
  auto* gbase = static_cast<typename E::T*>(G.data);
  const bool with_kl = in.kl_coef != nullptr && in.ref_logps != nullptr;
  for (int64_t r = r0; r < r1; ++r) {
    auto* g = gbase + row_offset(r, L.length, G.stride_b, G.stride_t);
    if (tok.mask && !tok.mask[r]) {
      out.logp[r] = out.lse[r] = 0.f;
      if (out.entropy) out.entropy[r] = 0.f;
      Ops::template zero_span<E>(g, L.vocab, G.streaming);
      continue;
    }
    const auto* x = base + row_offset(r, L.length, L.stride_b, L.stride_t);
    const float inv_t = tok.inv_temperature;
    const RowStats st = Row<Ops, E>::forward(x, L.vocab, tok.ids[r], inv_t, out.entropy != nullptr);
    out.logp[r] = st.logp;
    out.lse[r] = st.lse;
    if (out.entropy) out.entropy[r] = st.entropy;
    float dlogp = in.coef[r];
    if (with_kl) dlogp += float(double(in.kl_coef[r]) * (1.0 - std::exp(double(in.ref_logps[r]) - st.logp)));
    Row<Ops, E>::gradient(x, g, L.vocab, tok.ids[r], inv_t, st.lse, dlogp, false, 0.f, 0.f, G.streaming);
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

const Impl& scalar_impl();
const Impl* avx2_impl();  // nullptr when not built for x86-64 or the CPU lacks AVX2/FMA/F16C

}  // namespace detail
}  // namespace frpo
