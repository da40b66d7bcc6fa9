// AVX2+FMA+F16C inner loops (8 logits per vector, polynomial exp), compiled with per-function target
// attributes so this file builds with default flags; avx2_impl() returns it only if the CPU has them.
#include "detail.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FRPO_HAVE_AVX2_TU 1
#endif

namespace frpo {
namespace detail {

#ifdef FRPO_HAVE_AVX2_TU
#define FRPO_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FRPO_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

namespace {

// Loads 8 logits as fp32; stores 8 (put) or 16 (put2) fp32 results in the element type, with plain or
// streaming (non-temporal: p aligned to kAlign) stores.
template <class E> struct Vec;
template <> struct Vec<F32> {
  static FRPO_AVX2_INLINE __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  template <bool Stream>
  static FRPO_AVX2_INLINE void put(float* p, __m256 v) {
    if (Stream) _mm256_stream_ps(p, v); else _mm256_storeu_ps(p, v);
  }
  template <bool Stream>
  static FRPO_AVX2_INLINE void put2(float* p, __m256 a, __m256 b) { put<Stream>(p, a); put<Stream>(p + 8, b); }
  static constexpr uintptr_t kAlign = 32;
};
// bf16 results are rounded ties-away-from-zero: half an ulp added to the magnitude bits, the top 16 kept.
// That has the same error bound as nearest-even (the two differ only in the direction of exact ties)
// and costs 3 vector ops per 8 instead of 8: the bf16 gradient sweeps were op-bound on the rounding
// (scale sweep 0.137 -> 0.073 ns/logit in cache, fp32's is 0.049; csrc/bench/README.md). The scalar
// remainders (f32_to_bf16) round to nearest even. NaN stays NaN for every NaN arithmetic makes here
// (a bf16 NaN's payload has 16 zero low bits), inf stays inf, overflow rounds to inf.
template <> struct Vec<BF16> {
  static FRPO_AVX2_INLINE __m256 load(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static FRPO_AVX2_INLINE __m256i round(__m256 v) {  // bf16 in the top 16 bits of each 32-bit lane
    return _mm256_add_epi32(_mm256_castps_si256(v), _mm256_set1_epi32(0x8000));
  }
  static FRPO_AVX2_INLINE __m128i pack(__m256 v) {
    const __m256i r = _mm256_srli_epi32(round(v), 16);
    const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: [a0..a3 a0..a3 | a4..a7 a4..a7]
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  }
  static FRPO_AVX2_INLINE __m256i pack2(__m256 a, __m256 b) {  // 16 results: blend, one in-lane and one cross-lane shuffle
    const __m256i w = _mm256_blend_epi16(_mm256_srli_epi32(round(a), 16), round(b), 0xAA);  // 32-bit lane k: a_k | b_k << 16
    const __m256i order = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                           0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    return _mm256_permute4x64_epi64(_mm256_shuffle_epi8(w, order), 0xD8);  // [a0..a3 b0..b3 | a4..a7 b4..b7] -> a, b
  }
  template <bool Stream>
  static FRPO_AVX2_INLINE void put(uint16_t* p, __m256 v) {
    auto* q = reinterpret_cast<__m128i*>(p);
    if (Stream) _mm_stream_si128(q, pack(v)); else _mm_storeu_si128(q, pack(v));
  }
  template <bool Stream>
  static FRPO_AVX2_INLINE void put2(uint16_t* p, __m256 a, __m256 b) {
    auto* q = reinterpret_cast<__m256i*>(p);
    if (Stream) _mm256_stream_si256(q, pack2(a, b)); else _mm256_storeu_si256(q, pack2(a, b));
  }
  static constexpr uintptr_t kAlign = 32;
};
template <> struct Vec<F16> {
  static FRPO_AVX2_INLINE __m256 load(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static FRPO_AVX2_INLINE __m128i pack(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  template <bool Stream>
  static FRPO_AVX2_INLINE void put(uint16_t* p, __m256 v) {
    auto* q = reinterpret_cast<__m128i*>(p);
    if (Stream) _mm_stream_si128(q, pack(v)); else _mm_storeu_si128(q, pack(v));
  }
  template <bool Stream>
  static FRPO_AVX2_INLINE void put2(uint16_t* p, __m256 a, __m256 b) { put<Stream>(p, a); put<Stream>(p + 8, b); }
  static constexpr uintptr_t kAlign = 16;
};

// Range reduction shared by exp8 and exp8_times: d = n*ln2 + r; returns r, and t holds n in its low
// mantissa bits (with the exponent bias folded into kRoundMagic) for the 2^n scale.
FRPO_AVX2_INLINE __m256 reduce8(__m256 d, __m256* t) {
  *t = _mm256_fmadd_ps(d, _mm256_set1_ps(kLog2e), _mm256_set1_ps(kRoundMagic));
  const __m256 n = _mm256_sub_ps(*t, _mm256_set1_ps(kRoundMagic));
  // one constant: the two-constant (Cody-Waite) reduction measured 10% slower (csrc/bench/README.md)
  return _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2), d);
}

// exp of d already clamped to [kExpLo, kExpHi]; same algorithm and rounding as exp_poly.
// 9 ops on the FMA/multiply ports + 2 on the others per 8 exps. (An exp2-domain variant, y = d*log2e,
// f = y - round(y), one FMA-port op fewer, measured 2% faster and loses the rounding of y: not used.)
FRPO_AVX2_INLINE __m256 exp8(__m256 d) {
  __m256 t;
  const __m256 r = reduce8(d, &t);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kE5), r, _mm256_set1_ps(kE4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kE3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kE2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kE1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i scale = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// a * exp(d) with a folded into the polynomial's coefficients c = a * (kE5, kE4, kE3, kE2, kE1, 1):
// one multiply per vector fewer than exp8(d) * a (the backward sweep's g = p * a).
FRPO_AVX2_INLINE __m256 exp8_times(__m256 d, const __m256* c) {
  __m256 t;
  const __m256 r = reduce8(d, &t);
  __m256 p = _mm256_fmadd_ps(c[0], r, c[1]);
  p = _mm256_fmadd_ps(p, r, c[2]);
  p = _mm256_fmadd_ps(p, r, c[3]);
  p = _mm256_fmadd_ps(p, r, c[4]);
  p = _mm256_fmadd_ps(p, r, c[5]);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
}

// T0: the prefetch hints T0 / T1 / NTA measured within noise of each other (csrc/bench/README.md).
template <class T>
FRPO_AVX2_INLINE void prefetch(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

// Gradient arguments are x/T - lse, at most a rounding error above 0: only the low clamp is needed
// (-inf logits and NaN-free underflow to exactly 0; an upper clamp there cost 3-5%). maxps returns its
// second operand when either is NaN, so the argument goes second: a NaN logit stays NaN (torch's NaN
// propagation).
FRPO_AVX2_INLINE __m256 clamp8(__m256 d) { return _mm256_max_ps(_mm256_set1_ps(kExpLo), d); }
// The sums' arguments are against a running max that may be below the chunk's (Row::forward): clamped
// above too, so every exp is finite (minps also returns its second operand for NaN).
FRPO_AVX2_INLINE __m256 clamp8_both(__m256 d) { return _mm256_min_ps(_mm256_set1_ps(kExpHi), clamp8(d)); }

FRPO_AVX2_INLINE float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
FRPO_AVX2_INLINE float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Avx2Ops {
  template <class E>
  static FRPO_AVX2 float max_raw(const typename E::T* x, int64_t n) {
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
    int64_t i = 0;
    // maxps(x, m) returns m when x is NaN: the max ignores NaN (forward() finds NaN through the sums)
    for (; i + 32 <= n; i += 32) {
      m0 = _mm256_max_ps(Vec<E>::load(x + i), m0);
      m1 = _mm256_max_ps(Vec<E>::load(x + i + 8), m1);
      m2 = _mm256_max_ps(Vec<E>::load(x + i + 16), m2);
      m3 = _mm256_max_ps(Vec<E>::load(x + i + 24), m3);
    }
    for (; i + 8 <= n; i += 8) m0 = _mm256_max_ps(Vec<E>::load(x + i), m0);
    float m = hmax8(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
    for (; i < n; ++i) {
      const float v = E::load(x + i);
      m = v > m ? v : m;
    }
    return m;
  }

  template <class E, bool Ent, bool Store>
  static FRPO_AVX2 void sum_exp(const typename E::T* x, int64_t n, float inv_t, float m, float* s_out,
                                float* t_out, int64_t pf, float* e_out) {
    const __m256 vt = _mm256_set1_ps(inv_t), vnm = _mm256_set1_ps(-m);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, t0 = s0, t1 = s0, t2 = s0, t3 = s0;
    int64_t i = 0;
#define FRPO_SUM_STEP(k, s, t)                                                   \
  {                                                                              \
    const __m256 d = clamp8_both(_mm256_fmadd_ps(Vec<E>::load(x + i + k), vt, vnm));  \
    const __m256 e = exp8(d);                                                    \
    if (Store) _mm256_storeu_ps(e_out + i + k, e);                               \
    s = _mm256_add_ps(s, e);                                                     \
    if (Ent) t = _mm256_fmadd_ps(e, d, t);                                       \
  }
    // 32 elements per step: 128 bytes of fp32 (two lines, prefetched both), 64 of 16-bit types (one)
    constexpr int64_t kLine = 64 / sizeof(typename E::T);
    if (pf) {
      for (; i + 32 <= n; i += 32) {
        prefetch(x + i + pf);
        if (kLine < 32) prefetch(x + i + pf + kLine);
        FRPO_SUM_STEP(0, s0, t0) FRPO_SUM_STEP(8, s1, t1) FRPO_SUM_STEP(16, s2, t2) FRPO_SUM_STEP(24, s3, t3)
      }
    }
    for (; i + 32 <= n; i += 32) {
      FRPO_SUM_STEP(0, s0, t0) FRPO_SUM_STEP(8, s1, t1) FRPO_SUM_STEP(16, s2, t2) FRPO_SUM_STEP(24, s3, t3)
    }
    for (; i + 8 <= n; i += 8) FRPO_SUM_STEP(0, s0, t0)
#undef FRPO_SUM_STEP
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    float t = Ent ? hsum8(_mm256_add_ps(_mm256_add_ps(t0, t1), _mm256_add_ps(t2, t3))) : 0.f;
    for (; i < n; ++i) {
      const float d = clamp_exp_arg(std::fma(E::load(x + i), inv_t, -m));
      const float e = exp_poly(d);
      if (Store) e_out[i] = e;
      s += e;
      if (Ent) t += e * d;
    }
    *s_out = s;
    *t_out = t;
  }

  template <class E, bool Ent, bool Stream>
  static FRPO_AVX2_INLINE void grad_body(const typename E::T* x, typename E::T* g, int64_t n, __m256 vt, __m256 vnl,
                                         __m256 va, __m256 vb, int64_t pf, int64_t* done) {
    int64_t i = 0;
    const __m256 ca[6] = {_mm256_mul_ps(va, _mm256_set1_ps(kE5)), _mm256_mul_ps(va, _mm256_set1_ps(kE4)),
                          _mm256_mul_ps(va, _mm256_set1_ps(kE3)), _mm256_mul_ps(va, _mm256_set1_ps(kE2)),
                          _mm256_mul_ps(va, _mm256_set1_ps(kE1)), va};
#define FRPO_GRAD_STEP(k)                                                         \
  const __m256 d##k = clamp8(_mm256_fmadd_ps(Vec<E>::load(x + i + k), vt, vnl));  \
  const __m256 v##k = Ent ? _mm256_mul_ps(exp8(d##k), _mm256_fmadd_ps(vb, d##k, va)) : exp8_times(d##k, ca);
#define FRPO_GRAD_32                                                                                     \
  {                                                                                                      \
    FRPO_GRAD_STEP(0) FRPO_GRAD_STEP(8) FRPO_GRAD_STEP(16) FRPO_GRAD_STEP(24)                            \
    Vec<E>::template put2<Stream>(g + i, v0, v8);                                                        \
    Vec<E>::template put2<Stream>(g + i + 16, v16, v24);                                                 \
  }
    constexpr int64_t kLine = 64 / sizeof(typename E::T);
    if (pf) {
      for (; i + 32 <= n; i += 32) {
        prefetch(x + i + pf);
        if (kLine < 32) prefetch(x + i + pf + kLine);
        FRPO_GRAD_32
      }
    }
    for (; i + 32 <= n; i += 32) FRPO_GRAD_32
    for (; i + 8 <= n; i += 8) {
      FRPO_GRAD_STEP(0)
      Vec<E>::template put<Stream>(g + i, v0);
    }
#undef FRPO_GRAD_32
#undef FRPO_GRAD_STEP
    *done = i;
  }

  template <class E, bool Ent>
  static FRPO_AVX2 void grad_span(const typename E::T* x, typename E::T* g, int64_t n, float inv_t, float lse,
                                  float a, float b, bool streaming, int64_t pf) {
    auto scalar = [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const float d = clamp_exp_arg(E::load(x + i) * inv_t - lse);
        const float p = exp_poly(d);
        g[i] = E::from(Ent ? p * (a + b * d) : p * a);
      }
    };
    const __m256 vt = _mm256_set1_ps(inv_t), vnl = _mm256_set1_ps(-lse), va = _mm256_set1_ps(a),
                 vb = _mm256_set1_ps(b);
    int64_t head = 0, done = 0;
    if (streaming) {  // non-temporal stores need aligned addresses: peel up to one vector
      const uintptr_t mis = reinterpret_cast<uintptr_t>(g) & (Vec<E>::kAlign - 1);
      if (mis % sizeof(typename E::T) == 0) {
        head = mis ? int64_t((Vec<E>::kAlign - mis) / sizeof(typename E::T)) : 0;
        head = head < n ? head : n;
        scalar(0, head);
        grad_body<E, Ent, true>(x + head, g + head, n - head, vt, vnl, va, vb, pf, &done);
        scalar(head + done, n);
        return;
      }
    }
    grad_body<E, Ent, false>(x, g, n, vt, vnl, va, vb, pf, &done);
    scalar(done, n);
  }

  // g = e*f from the fp32 exps scratch (L1/L2-resident): load, multiply, store -- no exp.
  template <class E, bool Stream>
  static FRPO_AVX2_INLINE int64_t scale_body(const float* e, typename E::T* g, int64_t n, __m256 vf) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      Vec<E>::template put2<Stream>(g + i, _mm256_mul_ps(_mm256_loadu_ps(e + i), vf),
                                    _mm256_mul_ps(_mm256_loadu_ps(e + i + 8), vf));
      Vec<E>::template put2<Stream>(g + i + 16, _mm256_mul_ps(_mm256_loadu_ps(e + i + 16), vf),
                                    _mm256_mul_ps(_mm256_loadu_ps(e + i + 24), vf));
    }
    for (; i + 8 <= n; i += 8) Vec<E>::template put<Stream>(g + i, _mm256_mul_ps(_mm256_loadu_ps(e + i), vf));
    return i;
  }
  template <class E>
  static FRPO_AVX2 void scale_span(const float* e, typename E::T* g, int64_t n, float f, bool streaming) {
    const __m256 vf = _mm256_set1_ps(f);
    int64_t i = 0;
    if (streaming && (reinterpret_cast<uintptr_t>(g) % sizeof(typename E::T)) == 0) {
      while (i < n && (reinterpret_cast<uintptr_t>(g + i) & (Vec<E>::kAlign - 1)) != 0) { g[i] = E::from(e[i] * f); ++i; }
      i += scale_body<E, true>(e + i, g + i, n - i, vf);
    } else {
      i = scale_body<E, false>(e, g, n, vf);
    }
    for (; i < n; ++i) g[i] = E::from(e[i] * f);
  }

  template <class E>
  static FRPO_AVX2 void zero_span(typename E::T* g, int64_t n, bool streaming) {
    int64_t i = 0;
    if (streaming) {
      while (i < n && (reinterpret_cast<uintptr_t>(g + i) & (Vec<E>::kAlign - 1)) != 0) g[i++] = E::from(0.f);
      for (; i + 8 <= n; i += 8) Vec<E>::template put<true>(g + i, _mm256_setzero_ps());
    }
    for (; i < n; ++i) g[i] = E::from(0.f);
  }

  static FRPO_AVX2 void fence() { _mm_sfence(); }
};

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

}  // namespace

const Impl* avx2_impl() {
  static const Impl impl{"avx2", &DtypeSwitch<Avx2Ops>::forward, &DtypeSwitch<Avx2Ops>::backward,
                         &DtypeSwitch<Avx2Ops>::fused};
  static const bool ok = cpu_has_avx2();
  return ok ? &impl : nullptr;
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

#else
const Impl* avx2_impl() { return nullptr; }
bool cpu_has_avx512() { return false; }
#endif

}  // namespace detail
}  // namespace frpo
