// The x86 vector inner loops (the Ops policy of detail.h), written once over a vector policy V:
// AVX2 (8 fp32 lanes, logprob_kernels_avx2.cpp) and AVX-512 (16 lanes, logprob_kernels_avx512.cpp).
// Each of those files defines its V and FRPO_SIMD / FRPO_SIMD_INLINE (its target attribute) and then
// includes this file, once; everything here is in an unnamed namespace, so each gets its own copy.
//
// V supplies, for its vector type F of V::kWidth floats:
//   set1(f), zero(), loadu(p), storeu(p, v), add(a, b), sub(a, b), mul(a, b), fmadd(a, b, c) = a*b + c,
//   fnmadd(a, b, c) = c - a*b, max(a, b) / min(a, b) with the x86 rule (b when either is NaN),
//   pow2(t) (the float whose bits are t's bits << 23), hsum(v), hmax(v),
//   Elem<E>: load(p) (kWidth logits as fp32), put<Stream>(p, v) (kWidth results in E's type),
//            put2<Stream>(p, a, b) (2 * kWidth results), kAlign (what streaming stores need).
#include "detail.h"

namespace frpo {
namespace detail {
namespace {

// Range reduction shared by exp_v and exp_times: d = n*ln2 + r; returns r, and t holds n in its low
// mantissa bits (with the exponent bias folded into kRoundMagic) for the 2^n scale.
template <class V>
FRPO_SIMD_INLINE typename V::F reduce(typename V::F d, typename V::F* t) {
  *t = V::fmadd(d, V::set1(kLog2e), V::set1(kRoundMagic));
  const typename V::F n = V::sub(*t, V::set1(kRoundMagic));
  // one constant: the two-constant (Cody-Waite) reduction measured 10% slower (csrc/bench/README.md)
  return V::fnmadd(n, V::set1(kLn2), d);
}

// exp of d already clamped to [kExpLo, kExpHi]; same algorithm and rounding as exp_poly.
// 9 ops on the FMA/multiply ports + 2 on the others per vector. (An exp2-domain variant, y = d*log2e,
// f = y - round(y), one FMA-port op fewer, measured 2% faster and loses the rounding of y: not used.)
template <class V>
FRPO_SIMD_INLINE typename V::F exp_v(typename V::F d) {
  typename V::F t;
  const typename V::F r = reduce<V>(d, &t);
  typename V::F p = V::fmadd(V::set1(kE5), r, V::set1(kE4));
  p = V::fmadd(p, r, V::set1(kE3));
  p = V::fmadd(p, r, V::set1(kE2));
  p = V::fmadd(p, r, V::set1(kE1));
  p = V::fmadd(p, r, V::set1(1.f));
  return V::mul(p, V::pow2(t));
}

// a * exp(d) with a folded into the polynomial's coefficients c = a * (kE5, kE4, kE3, kE2, kE1, 1):
// one multiply per vector fewer than exp_v(d) * a (the backward sweep's g = p * a).
template <class V>
FRPO_SIMD_INLINE typename V::F exp_times(typename V::F d, const typename V::F* c) {
  typename V::F t;
  const typename V::F r = reduce<V>(d, &t);
  typename V::F p = V::fmadd(c[0], r, c[1]);
  p = V::fmadd(p, r, c[2]);
  p = V::fmadd(p, r, c[3]);
  p = V::fmadd(p, r, c[4]);
  p = V::fmadd(p, r, c[5]);
  return V::mul(p, V::pow2(t));
}

// T0: the prefetch hints T0 / T1 / NTA measured within noise of each other (csrc/bench/README.md).
template <class T>
FRPO_SIMD_INLINE void prefetch(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}
// Prefetches the cache lines of `elements` elements from p (a step of the loops below: 1 to 4 lines).
template <class T, int64_t elements>
FRPO_SIMD_INLINE void prefetch_step(const T* p) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t k = 0; k < elements; k += kLine) prefetch(p + k);
}

// Gradient arguments are x/T - lse, at most a rounding error above 0: only the low clamp is needed
// (-inf logits and NaN-free underflow to exactly 0; an upper clamp there cost 3-5%). max returns its
// second operand when either is NaN, so the argument goes second: a NaN logit stays NaN (torch's NaN
// propagation).
template <class V>
FRPO_SIMD_INLINE typename V::F clamp_lo(typename V::F d) { return V::max(V::set1(kExpLo), d); }
// The sums' arguments are against a running max that may be below the chunk's (Row::forward): clamped
// above too, so every exp is finite (min also returns its second operand for NaN).
template <class V>
FRPO_SIMD_INLINE typename V::F clamp_both(typename V::F d) { return V::min(V::set1(kExpHi), clamp_lo<V>(d)); }

// The value as computed: the empty asm stops the compiler from fusing a product into the add that uses
// it (GCC's C++ default, -ffp-contract=fast, does that also across intrinsics). Not a compiler flag:
// -ffp-contract=off made the bf16 forward 10% slower (csrc/bench/README.md).
template <class F>
FRPO_SIMD_INLINE F rounded(F v) {
#if defined(FRPO_AVX512_SIMDE)
  asm("" : "+m"(v));  // SIMDe's emulated vectors are structs (the sanitizer test build): through memory
#else
  asm("" : "+x"(v));
#endif
  return v;
}
inline float rounded(float v) {  // the scalar tails (also in lambdas, which have no target attribute)
  asm("" : "+x"(v));
  return v;
}

// z - c with z = x/T rounded to fp32 (x * inv_t), the logit every sweep, the max and the target's logp
// use: an fmadd(x, vt, vnc) would subtract c from the exact product, so the row's largest logit would get
// exp(residual) instead of exactly 1 (entropy noise of ~|x/T| * 6e-8 on rows that are certain, and a
// logp above 0 for a lone logit, once T != 1). At T = 1 (the usual temperature) z = x: one add.
template <class V, bool Unit>
FRPO_SIMD_INLINE typename V::F shifted(typename V::F x, typename V::F vt, typename V::F vnc) {
  return Unit ? V::add(x, vnc) : V::add(rounded(V::mul(x, vt)), vnc);
}

template <class V>
struct SimdOps {
  using F = typename V::F;
  static constexpr int64_t W = V::kWidth;
  static constexpr int64_t kStep = 4 * W;  // elements per unrolled step: four vectors

  template <class E>
  static FRPO_SIMD float max_raw(const typename E::T* x, int64_t n) {
    const F ninf = V::set1(-std::numeric_limits<float>::infinity());
    F m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
    int64_t i = 0;
    // max(x, m) returns m when x is NaN: the max ignores NaN (forward() finds NaN through the sums)
    for (; i + kStep <= n; i += kStep) {
      m0 = V::max(V::template Elem<E>::load(x + i), m0);
      m1 = V::max(V::template Elem<E>::load(x + i + W), m1);
      m2 = V::max(V::template Elem<E>::load(x + i + 2 * W), m2);
      m3 = V::max(V::template Elem<E>::load(x + i + 3 * W), m3);
    }
    for (; i + W <= n; i += W) m0 = V::max(V::template Elem<E>::load(x + i), m0);
    float m = V::hmax(V::max(V::max(m0, m1), V::max(m2, m3)));
    for (; i < n; ++i) {
      const float v = E::load(x + i);
      m = v > m ? v : m;
    }
    return m;
  }

  template <class E, bool Ent, bool Store>
  static FRPO_SIMD void sum_exp(const typename E::T* x, int64_t n, float inv_t, float m, float* s_out,
                                float* t_out, int64_t pf, float* e_out) {
    if (inv_t == 1.f) return sum_exp_at<E, Ent, Store, true>(x, n, inv_t, m, s_out, t_out, pf, e_out);
    sum_exp_at<E, Ent, Store, false>(x, n, inv_t, m, s_out, t_out, pf, e_out);
  }
  template <class E, bool Ent, bool Store, bool Unit>
  static FRPO_SIMD_INLINE void sum_exp_at(const typename E::T* x, int64_t n, float inv_t, float m, float* s_out,
                                          float* t_out, int64_t pf, float* e_out) {
    const F vt = V::set1(inv_t), vnm = V::set1(-m);
    F s0 = V::zero(), s1 = s0, s2 = s0, s3 = s0, t0 = s0, t1 = s0, t2 = s0, t3 = s0;
    int64_t i = 0;
#define FRPO_SUM_STEP(k, s, t)                                                                  \
  {                                                                                             \
    const F d = clamp_both<V>(shifted<V, Unit>(V::template Elem<E>::load(x + i + (k) * W), vt, vnm)); \
    const F e = exp_v<V>(d);                                                                    \
    if (Store) V::storeu(e_out + i + (k) * W, e);                                               \
    s = V::add(s, e);                                                                           \
    if (Ent) t = V::fmadd(e, d, t);                                                             \
  }
#define FRPO_SUM_4 FRPO_SUM_STEP(0, s0, t0) FRPO_SUM_STEP(1, s1, t1) FRPO_SUM_STEP(2, s2, t2) FRPO_SUM_STEP(3, s3, t3)
    if (pf) {
      for (; i + kStep <= n; i += kStep) {
        prefetch_step<typename E::T, kStep>(x + i + pf);
        FRPO_SUM_4
      }
    }
    for (; i + kStep <= n; i += kStep) {
      FRPO_SUM_4
    }
    for (; i + W <= n; i += W) FRPO_SUM_STEP(0, s0, t0)
#undef FRPO_SUM_4
#undef FRPO_SUM_STEP
    float s = V::hsum(V::add(V::add(s0, s1), V::add(s2, s3)));
    float t = Ent ? V::hsum(V::add(V::add(t0, t1), V::add(t2, t3))) : 0.f;
    for (; i < n; ++i) {
      const float d = clamp_exp_arg(rounded(E::load(x + i) * inv_t) - m);  // z - m, as shifted()
      const float e = exp_poly(d);
      if (Store) e_out[i] = e;
      s += e;
      if (Ent) t += e * d;
    }
    *s_out = s;
    *t_out = t;
  }

  template <class E, bool Ent, bool Stream, bool Unit>
  static FRPO_SIMD_INLINE int64_t grad_body(const typename E::T* x, typename E::T* g, int64_t n, F vt, F vnl, F va,
                                            F vb, int64_t pf) {
    int64_t i = 0;
    const F ca[6] = {V::mul(va, V::set1(kE5)), V::mul(va, V::set1(kE4)), V::mul(va, V::set1(kE3)),
                     V::mul(va, V::set1(kE2)), V::mul(va, V::set1(kE1)), va};
#define FRPO_GRAD_STEP(k)                                                                         \
  const F d##k = clamp_lo<V>(shifted<V, Unit>(V::template Elem<E>::load(x + i + (k) * W), vt, vnl)); \
  const F v##k = Ent ? V::mul(exp_v<V>(d##k), V::fmadd(vb, d##k, va)) : exp_times<V>(d##k, ca);
#define FRPO_GRAD_4                                                          \
  {                                                                          \
    FRPO_GRAD_STEP(0) FRPO_GRAD_STEP(1) FRPO_GRAD_STEP(2) FRPO_GRAD_STEP(3)  \
    V::template Elem<E>::template put2<Stream>(g + i, v0, v1);               \
    V::template Elem<E>::template put2<Stream>(g + i + 2 * W, v2, v3);       \
  }
    if (pf) {
      for (; i + kStep <= n; i += kStep) {
        prefetch_step<typename E::T, kStep>(x + i + pf);
        FRPO_GRAD_4
      }
    }
    for (; i + kStep <= n; i += kStep) FRPO_GRAD_4
    for (; i + W <= n; i += W) {
      FRPO_GRAD_STEP(0)
      V::template Elem<E>::template put<Stream>(g + i, v0);
    }
#undef FRPO_GRAD_4
#undef FRPO_GRAD_STEP
    return i;
  }

  template <class E, bool Ent>
  static FRPO_SIMD void grad_span(const typename E::T* x, typename E::T* g, int64_t n, float inv_t, float lse_hi,
                                  float a, float b, bool streaming, int64_t pf) {
    auto scalar = [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const float d = clamp_exp_arg(rounded(E::load(x + i) * inv_t) - lse_hi);
        const float p = exp_poly(d);
        g[i] = E::from(Ent ? p * (a + b * d) : p * a);
      }
    };
    const F vt = V::set1(inv_t), vnl = V::set1(-lse_hi), va = V::set1(a), vb = V::set1(b);
    const bool unit = inv_t == 1.f;
    constexpr uintptr_t kAlign = V::template Elem<E>::kAlign;
    if (streaming) {  // non-temporal stores need aligned addresses: peel up to one vector
      const uintptr_t mis = reinterpret_cast<uintptr_t>(g) & (kAlign - 1);
      if (mis % sizeof(typename E::T) == 0) {
        int64_t head = mis ? int64_t((kAlign - mis) / sizeof(typename E::T)) : 0;
        head = head < n ? head : n;
        scalar(0, head);
        const int64_t done = unit ? grad_body<E, Ent, true, true>(x + head, g + head, n - head, vt, vnl, va, vb, pf)
                                  : grad_body<E, Ent, true, false>(x + head, g + head, n - head, vt, vnl, va, vb, pf);
        scalar(head + done, n);
        return;
      }
    }
    scalar(unit ? grad_body<E, Ent, false, true>(x, g, n, vt, vnl, va, vb, pf)
                : grad_body<E, Ent, false, false>(x, g, n, vt, vnl, va, vb, pf), n);
  }

  // g = e*f from the fp32 exps scratch (L1/L2-resident): load, multiply, store -- no exp.
  template <class E, bool Stream>
  static FRPO_SIMD_INLINE int64_t scale_body(const float* e, typename E::T* g, int64_t n, F vf) {
    int64_t i = 0;
    for (; i + kStep <= n; i += kStep) {
      V::template Elem<E>::template put2<Stream>(g + i, V::mul(V::loadu(e + i), vf), V::mul(V::loadu(e + i + W), vf));
      V::template Elem<E>::template put2<Stream>(g + i + 2 * W, V::mul(V::loadu(e + i + 2 * W), vf),
                                                 V::mul(V::loadu(e + i + 3 * W), vf));
    }
    for (; i + W <= n; i += W) V::template Elem<E>::template put<Stream>(g + i, V::mul(V::loadu(e + i), vf));
    return i;
  }
  template <class E>
  static FRPO_SIMD void scale_span(const float* e, typename E::T* g, int64_t n, float f, bool streaming) {
    const F vf = V::set1(f);
    constexpr uintptr_t kAlign = V::template Elem<E>::kAlign;
    int64_t i = 0;
    if (streaming && (reinterpret_cast<uintptr_t>(g) % sizeof(typename E::T)) == 0) {
      while (i < n && (reinterpret_cast<uintptr_t>(g + i) & (kAlign - 1)) != 0) { g[i] = E::from(e[i] * f); ++i; }
      i += scale_body<E, true>(e + i, g + i, n - i, vf);
    } else {
      i = scale_body<E, false>(e, g, n, vf);
    }
    for (; i < n; ++i) g[i] = E::from(e[i] * f);
  }

  // The fused gradient with the entropy term: g = e*(fa + fb*d), d = max(x*inv_t - lse, kExpLo) (log p; -inf
  // logits have e = 0, and the clamp keeps 0 * -inf out). A step loads its x vectors before it stores (in place).
  template <class E, bool Stream>
  static FRPO_SIMD_INLINE int64_t scale_ent_body(const float* e, const typename E::T* x, typename E::T* g, int64_t n,
                                                 F vfa, F vfb, F vt, F vnl) {
    int64_t i = 0;
#define FRPO_ENT_TERM(k)                                                                                         \
  V::mul(V::loadu(e + i + (k) * W),                                                                             \
         V::fmadd(vfb, clamp_lo<V>(shifted<V, false>(V::template Elem<E>::load(x + i + (k) * W), vt, vnl)), vfa))
    for (; i + kStep <= n; i += kStep) {
      const F v0 = FRPO_ENT_TERM(0), v1 = FRPO_ENT_TERM(1), v2 = FRPO_ENT_TERM(2), v3 = FRPO_ENT_TERM(3);
      V::template Elem<E>::template put2<Stream>(g + i, v0, v1);
      V::template Elem<E>::template put2<Stream>(g + i + 2 * W, v2, v3);
    }
    for (; i + W <= n; i += W) V::template Elem<E>::template put<Stream>(g + i, FRPO_ENT_TERM(0));
#undef FRPO_ENT_TERM
    return i;
  }
  template <class E>
  static FRPO_SIMD void scale_ent_span(const float* e, const typename E::T* x, typename E::T* g, int64_t n, float fa,
                                       float fb, float inv_t, float lse, bool streaming) {
    auto scalar = [&](int64_t i) {
      float d = rounded(E::load(x + i) * inv_t) - lse;
      d = d < kExpLo ? kExpLo : d;
      g[i] = E::from(e[i] * (fa + fb * d));
    };
    const F vfa = V::set1(fa), vfb = V::set1(fb), vt = V::set1(inv_t), vnl = V::set1(-lse);
    constexpr uintptr_t kAlign = V::template Elem<E>::kAlign;
    int64_t i = 0;
    if (streaming && (reinterpret_cast<uintptr_t>(g) % sizeof(typename E::T)) == 0) {
      while (i < n && (reinterpret_cast<uintptr_t>(g + i) & (kAlign - 1)) != 0) scalar(i++);
      i += scale_ent_body<E, true>(e + i, x + i, g + i, n - i, vfa, vfb, vt, vnl);
    } else {
      i = scale_ent_body<E, false>(e, x, g, n, vfa, vfb, vt, vnl);
    }
    for (; i < n; ++i) scalar(i);
  }

  template <class E>
  static FRPO_SIMD void zero_span(typename E::T* g, int64_t n, bool streaming) {
    constexpr uintptr_t kAlign = V::template Elem<E>::kAlign;
    int64_t i = 0;
    if (streaming) {
      while (i < n && (reinterpret_cast<uintptr_t>(g + i) & (kAlign - 1)) != 0) g[i++] = E::from(0.f);
      for (; i + W <= n; i += W) V::template Elem<E>::template put<true>(g + i, V::zero());
    }
    for (; i < n; ++i) g[i] = E::from(0.f);
  }

  static FRPO_SIMD void fence() { _mm_sfence(); }
};

}  // namespace
}  // namespace detail
}  // namespace frpo
