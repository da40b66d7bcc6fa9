// Portable implementation, for any CPU and compiler: plain loops over fixed-width blocks of logits with
// the branch-free exp and conversions of detail.h, which optimising compilers vectorise for the build's
// target (x86-64 baseline: SSE2; aarch64: NEON; -march builds: AVX2, AVX-512, SVE). No intrinsics.
#include <cstring>

#include "detail.h"

namespace frpo {
namespace detail {
namespace {

// With FMA in hardware the exp is the AVX2 one, operation for operation; without it (x86-64 baseline)
// std::fma would be a library call per element, so products and sums are rounded separately and the
// reduction takes ln2 in two parts (see exp_poly_nofma).
#if defined(__FP_FAST_FMAF) || defined(__FMA__) || defined(__ARM_FEATURE_FMA)
inline float mul_add(float a, float b, float c) { return std::fma(a, b, c); }
inline float exp_one(float x) { return exp_poly(x); }
#else
inline float mul_add(float a, float b, float c) { return a * b + c; }
inline float exp_one(float x) { return exp_poly_nofma(x); }
#endif

// The loops are `#pragma omp simd` (compiled with -fopenmp-simd, which enables these pragmas and no
// OpenMP runtime): that lets the compiler reorder the sums into vector lanes (fp reassociation it may
// not do on its own) and vectorise in place (g == x) without an overlap check. Without the flag they
// are plain loops, with the same results up to summation order. Flat loops, because GCC's loop
// vectoriser takes them on x86-64 and aarch64 alike; fixed 16-lane blocks written op by op (so the
// lanes' serial polynomial chains interleave) measured 10% faster on SSE2 but GCC 12 leaves them
// scalar on aarch64. The sweeps run in blocks of kBlock logits, each first prefetching the block pf
// elements ahead (the next chunk, for the row algorithm of detail.h): a prefetch inside the vector
// loop body would stop its vectorisation.
constexpr int64_t kBlock = 256;

// The exp arguments are masked after the exp rather than clamped before it: GCC 12 turned a clamp
// before the exp into selects after it anyway (exp(kExpLo) folds to 0), with three compares and seven
// logic ops per vector. v: exp(d) or e * d, 0 where d < kExpLo (exp underflows to 0; also for
// d = -inf, where v may be NaN); NaN d stays NaN (the compare is false).
inline float zero_below(float d, float v) { return d < kExpLo ? 0.f : v; }
inline float clamp_lo(float d) { return d < kExpLo ? kExpLo : d; }  // NaN stays NaN (see clamp_exp_arg)
// exp(d) for d in [kExpLo, kExpHi], 0 below, +inf above (a sum against a stale max then fails the
// kStaleSum check and is redone, as with the clamp's exp(kExpHi)); NaN stays NaN.
inline float exp_masked(float d) {
  const float e = d > kExpHi ? std::numeric_limits<float>::infinity() : exp_one(d);
  return zero_below(d, e);
}

template <class T>
inline void prefetch_span(const T* p, int64_t n) {
#if defined(__GNUC__)
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < n; i += kLine) __builtin_prefetch(p + i);
#else
  (void)p;
  (void)n;
#endif
}

struct PortableOps {
  // The max may or may not skip a NaN (the lane order of the reduction is the compiler's): either is
  // fine, forward() finds NaN through the sums or, in a chunk it skips as all -inf, by looking.
  template <class E>
  static float max_raw(const typename E::T* x, int64_t n) {
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; ++i) {
      const float v = E::load(x + i);
      m = v > m ? v : m;
    }
    return m;
  }

  template <class E, bool Ent, bool Store>
  static void sum_exp(const typename E::T* x, int64_t n, float inv_t, float m, float* s_out, float* t_out,
                      int64_t pf, float* e_out) {
    float s = 0.f, t = 0.f;
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t end = n - b < kBlock ? n : b + kBlock;
      if (pf) prefetch_span(x + b + pf, end - b);
      float bs = 0.f, bt = 0.f;
#pragma omp simd reduction(+ : bs, bt)
      for (int64_t i = b; i < end; ++i) {
        const float d = mul_add(E::load(x + i), inv_t, -m);  // m may be stale: d above 0
        const float e = exp_masked(d);
        if (Store) e_out[i] = e;
        bs += e;
        if (Ent) bt += zero_below(d, e * d);
      }
      s += bs;
      t += bt;
    }
    *s_out = s;
    *t_out = t;
  }

  template <class E>
  static void scale_span(const float* e, typename E::T* g, int64_t n, float f, bool /*streaming*/) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) g[i] = E::from(e[i] * f);
  }

  template <class E, bool Ent>
  static void grad_span(const typename E::T* x, typename E::T* g, int64_t n, float inv_t, float lse, float a,
                        float b, bool /*streaming*/, int64_t pf) {
    for (int64_t k = 0; k < n; k += kBlock) {
      const int64_t end = n - k < kBlock ? n : k + kBlock;
      if (pf) prefetch_span(x + k + pf, end - k);
#pragma omp simd
      for (int64_t i = k; i < end; ++i) {  // in place g == x: each g[i] is written after its x[i] is read
        const float d = mul_add(E::load(x + i), inv_t, -lse);  // <= 0 up to rounding
        const float p = zero_below(d, exp_one(d));  // then times a: a NaN a (dlogp) still gives NaN
        g[i] = E::from(Ent ? p * mul_add(b, clamp_lo(d), a) : p * a);
      }
    }
  }

  template <class E>
  static void zero_span(typename E::T* g, int64_t n, bool /*streaming*/) {
    std::memset(static_cast<void*>(g), 0, size_t(n) * sizeof(typename E::T));
  }
  static void fence() {}
};

}  // namespace

// Why the loops above are not vector code in this build ("" when they are): compiled without
// optimisation, or for a target with no SIMD unit the compiler vectorises for. Scalar, they run at
// torch eager's speed or below (the scalar loops this file replaced: 27 vs 4.6 ns/logit, 1 core).
const char* portable_slow_reason() {
#if !defined(__OPTIMIZE__)
  return "the portable kernels were compiled without optimisation";
#elif defined(__SSE2__) || defined(__ARM_NEON) || defined(__ARM_FEATURE_SVE) || defined(__ALTIVEC__) || \
    defined(__VSX__) || defined(__riscv_vector) || defined(__loongarch_sx) || defined(__wasm_simd128__) ||  \
    defined(__VEC__)
  return "";
#else
  return "the portable kernels were compiled for a target without a SIMD unit the compiler vectorises for";
#endif
}

const Impl& portable_impl() {
  static const Impl impl{"portable", &DtypeSwitch<PortableOps>::forward, &DtypeSwitch<PortableOps>::backward,
                         &DtypeSwitch<PortableOps>::fused};
  return impl;
}

}  // namespace detail
}  // namespace frpo
