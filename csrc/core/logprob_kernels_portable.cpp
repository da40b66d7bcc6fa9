// Portable implementation, for any CPU and compiler: plain loops over fixed-width blocks of logits with
// the branch-free exp and conversions of detail.h, which optimising compilers vectorise for the build's
// target (x86-64 baseline: SSE2; aarch64: NEON; -march builds: AVX2, AVX-512, SVE). No intrinsics in the
// arithmetic; the one x86 instruction used by name is SSE2's streaming store (see stream_copy).
#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "detail.h"

namespace frpo {
namespace detail {
namespace {

// With FMA in hardware the exp is the AVX2 one, operation for operation; without it (x86-64 baseline)
// std::fma would be a library call per element, so products and sums are rounded separately and the
// exp is exp_poly_nofma (exp2 domain, Estrin's form).
#if defined(__FP_FAST_FMAF) || defined(__FMA__) || defined(__ARM_FEATURE_FMA)
constexpr bool kFma = true;
inline float mul_add(float a, float b, float c) { return std::fma(a, b, c); }
inline float exp_one(float x) { return exp_poly(x); }
#else
constexpr bool kFma = false;
inline float mul_add(float a, float b, float c) { return a * b + c; }
inline float exp_one(float x) { return exp_poly_nofma(x); }
#endif
// x/T - c, with Unit (T = 1, the usual temperature) as x - c: the same value, one multiply fewer. Only
// the build without FMA takes it: there the loops are bound by their dependency chain, which the
// multiply lengthens by a tenth (in cache, SSE2 fp32: fused 1.18 -> 1.14, backward 0.91 -> 0.85 ns/logit).
template <bool Unit>
inline float shifted(float x, float inv_t, float c) { return Unit ? x - c : mul_add(x, inv_t, -c); }
template <class F>
inline void with_unit_temperature(float inv_t, F&& run) {
  if constexpr (!kFma) {
    if (inv_t == 1.f) return run(std::true_type{});
  }
  run(std::false_type{});
}

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

// Streaming (non-temporal) stores for gradients written to memory nobody reads soon. On x86 a plain
// store to a line that is not cached first reads the line: 4 more bytes of DRAM traffic per fp32
// logit, half again the fused kernel's floor (read x, write g: 8 bytes). x86-64's baseline has
// streaming stores (SSE2's movntdq), so every x86 build uses them. Compilers do not emit them from
// plain loops (GCC has no portable non-temporal store), so the loops write a block to an L1 buffer
// and stream_copy moves it. Only fp32 gradients stream: the bf16 and fp16 sweeps are bound by their
// conversions (3-5x their floor), where the buffer's extra pass measured slower than the reads it
// saves. Elsewhere plain stores: Arm cores switch to a write-streaming mode without the read on runs
// of whole-line writes (not measured here).
#if defined(__SSE2__)
constexpr bool kStreamStores = true;
// dst: 16-byte aligned; bytes: a multiple of 16.
inline void stream_copy(void* dst, const void* src, size_t bytes) {
  auto* d = static_cast<__m128i*>(dst);
  const auto* s = static_cast<const __m128i*>(src);
  for (size_t i = 0; i < bytes / 16; ++i) _mm_stream_si128(d + i, _mm_load_si128(s + i));
}
inline void stream_fence() { _mm_sfence(); }
#else
constexpr bool kStreamStores = false;
inline void stream_copy(void*, const void*, size_t) {}
inline void stream_fence() {}
#endif

// Writes g[0, n) in blocks of at most kBlock elements: emit(out, i0, i1) writes the values of elements
// i0..i1-1 to out[0, i1 - i0). Streaming fp32, each block goes to an L1 buffer and then to g with
// streaming stores (after a first short block up to g's first 16-byte boundary, written directly);
// otherwise emit writes g itself.
template <class T, class Emit>
inline void write_blocks(T* g, int64_t n, bool streaming, Emit&& emit) {
  const bool stream = kStreamStores && sizeof(T) == 4 && streaming && reinterpret_cast<uintptr_t>(g) % 4 == 0;
  int64_t i = 0;
  if (stream) {
    const uintptr_t mis = reinterpret_cast<uintptr_t>(g) & 15;
    i = mis ? std::min<int64_t>(n, int64_t((16 - mis) / sizeof(T))) : 0;
    if (i) emit(g, 0, i);
  }
  alignas(64) T buf[kBlock];
  for (; i < n;) {
    const int64_t end = n - i < kBlock ? n : i + kBlock;
    if (stream) {
      emit(buf, i, end);
      const size_t bytes = size_t(end - i) * sizeof(T), whole = bytes & ~size_t(15);
      stream_copy(g + i, buf, whole);
      std::memcpy(reinterpret_cast<char*>(g + i) + whole, reinterpret_cast<const char*>(buf) + whole, bytes - whole);
    } else {
      emit(g + i, i, end);
    }
    i = end;
  }
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
    with_unit_temperature(inv_t, [&](auto unit) {
      float s = 0.f, t = 0.f;
      for (int64_t b = 0; b < n; b += kBlock) {
        const int64_t end = n - b < kBlock ? n : b + kBlock;
        if (pf) prefetch_span(x + b + pf, end - b);
        float bs = 0.f, bt = 0.f;
#pragma omp simd reduction(+ : bs, bt)
        for (int64_t i = b; i < end; ++i) {
          const float d = shifted<decltype(unit)::value>(E::load(x + i), inv_t, m);  // m may be stale: d above 0
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
    });
  }

  template <class E>
  static void scale_span(const float* e, typename E::T* g, int64_t n, float f, bool streaming) {
    write_blocks(g, n, streaming, [&](typename E::T* out, int64_t i0, int64_t i1) {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) out[i - i0] = E::from(e[i] * f);
    });
  }

  template <class E, bool Ent>
  static void grad_span(const typename E::T* x, typename E::T* g, int64_t n, float inv_t, float lse, float a,
                        float b, bool streaming, int64_t pf) {
    with_unit_temperature(inv_t, [&](auto unit) {
      write_blocks(g, n, streaming, [&](typename E::T* out, int64_t i0, int64_t i1) {
        if (pf) prefetch_span(x + i0 + pf, i1 - i0);
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) {  // in place (g == x): each out element written after its x is read
          const float d = shifted<decltype(unit)::value>(E::load(x + i), inv_t, lse);  // <= 0 up to rounding
          const float p = zero_below(d, exp_one(d));  // then times a: a NaN a (dlogp) still gives NaN
          out[i - i0] = E::from(Ent ? p * mul_add(b, clamp_lo(d), a) : p * a);
        }
      });
    });
  }

  template <class E>
  static void zero_span(typename E::T* g, int64_t n, bool streaming) {
    write_blocks(g, n, streaming, [](typename E::T* out, int64_t i0, int64_t i1) {
      std::memset(static_cast<void*>(out), 0, size_t(i1 - i0) * sizeof(typename E::T));
    });
  }
  static void fence() { stream_fence(); }
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
