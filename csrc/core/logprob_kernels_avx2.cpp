// AVX2+FMA+F16C inner loops (8 logits per vector; the loops themselves are simd_ops.h), compiled with
// per-function target attributes so this file builds with default flags; avx2_impl() returns them only
// if the CPU has them.
#include "detail.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define FRPO_SIMD __attribute__((target("avx2,fma,f16c")))
#define FRPO_SIMD_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

#include "x86_horizontal.h"

namespace frpo {
namespace detail {
namespace {

// The vector policy of simd_ops.h: 8 fp32 lanes.
struct Avx2 {
  using F = __m256;
  static constexpr int64_t kWidth = 8;
  static FRPO_SIMD_INLINE F set1(float f) { return _mm256_set1_ps(f); }
  static FRPO_SIMD_INLINE F zero() { return _mm256_setzero_ps(); }
  static FRPO_SIMD_INLINE F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static FRPO_SIMD_INLINE void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  static FRPO_SIMD_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
  static FRPO_SIMD_INLINE F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static FRPO_SIMD_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static FRPO_SIMD_INLINE F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static FRPO_SIMD_INLINE F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static FRPO_SIMD_INLINE F max(F a, F b) { return _mm256_max_ps(a, b); }
  static FRPO_SIMD_INLINE F min(F a, F b) { return _mm256_min_ps(a, b); }
  static FRPO_SIMD_INLINE F pow2(F t) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)); }
  static FRPO_SIMD_INLINE float hsum(F v) { return horizontal8<false>(v); }
  static FRPO_SIMD_INLINE float hmax(F v) { return horizontal8<true>(v); }
  template <class E> struct Elem;
};

// Loads 8 logits as fp32; stores 8 (put) or 16 (put2) fp32 results in the element type, with plain or
// streaming (non-temporal: p aligned to kAlign) stores.
template <> struct Avx2::Elem<F32> {
  static FRPO_SIMD_INLINE __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  template <bool Stream>
  static FRPO_SIMD_INLINE void put(float* p, __m256 v) {
    if (Stream) _mm256_stream_ps(p, v); else _mm256_storeu_ps(p, v);
  }
  template <bool Stream>
  static FRPO_SIMD_INLINE void put2(float* p, __m256 a, __m256 b) { put<Stream>(p, a); put<Stream>(p + 8, b); }
  static constexpr uintptr_t kAlign = 32;
};
// bf16 results are rounded ties-away-from-zero: half an ulp added to the magnitude bits, the top 16 kept.
// That has the same error bound as nearest-even (the two differ only in the direction of exact ties)
// and costs 3 vector ops per 8 instead of 8: the bf16 gradient sweeps were op-bound on the rounding
// (scale sweep 0.137 -> 0.073 ns/logit in cache, fp32's is 0.049; csrc/bench/README.md). The scalar
// remainders (f32_to_bf16) round to nearest even. NaN stays NaN for every NaN arithmetic makes here
// (a bf16 NaN's payload has 16 zero low bits), inf stays inf, overflow rounds to inf.
template <> struct Avx2::Elem<BF16> {
  static FRPO_SIMD_INLINE __m256 load(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static FRPO_SIMD_INLINE __m256i round(__m256 v) {  // bf16 in the top 16 bits of each 32-bit lane
    return _mm256_add_epi32(_mm256_castps_si256(v), _mm256_set1_epi32(0x8000));
  }
  static FRPO_SIMD_INLINE __m128i pack(__m256 v) {
    const __m256i r = _mm256_srli_epi32(round(v), 16);
    const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: [a0..a3 a0..a3 | a4..a7 a4..a7]
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  }
  static FRPO_SIMD_INLINE __m256i pack2(__m256 a, __m256 b) {  // 16 results: blend, one in-lane and one cross-lane shuffle
    const __m256i w = _mm256_blend_epi16(_mm256_srli_epi32(round(a), 16), round(b), 0xAA);  // 32-bit lane k: a_k | b_k << 16
    const __m256i order = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                           0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    return _mm256_permute4x64_epi64(_mm256_shuffle_epi8(w, order), 0xD8);  // [a0..a3 b0..b3 | a4..a7 b4..b7] -> a, b
  }
  template <bool Stream>
  static FRPO_SIMD_INLINE void put(uint16_t* p, __m256 v) {
    auto* q = reinterpret_cast<__m128i*>(p);
    if (Stream) _mm_stream_si128(q, pack(v)); else _mm_storeu_si128(q, pack(v));
  }
  template <bool Stream>
  static FRPO_SIMD_INLINE void put2(uint16_t* p, __m256 a, __m256 b) {
    auto* q = reinterpret_cast<__m256i*>(p);
    if (Stream) _mm256_stream_si256(q, pack2(a, b)); else _mm256_storeu_si256(q, pack2(a, b));
  }
  static constexpr uintptr_t kAlign = 32;
};
template <> struct Avx2::Elem<F16> {
  static FRPO_SIMD_INLINE __m256 load(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static FRPO_SIMD_INLINE __m128i pack(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  template <bool Stream>
  static FRPO_SIMD_INLINE void put(uint16_t* p, __m256 v) {
    auto* q = reinterpret_cast<__m128i*>(p);
    if (Stream) _mm_stream_si128(q, pack(v)); else _mm_storeu_si128(q, pack(v));
  }
  template <bool Stream>
  static FRPO_SIMD_INLINE void put2(uint16_t* p, __m256 a, __m256 b) { put<Stream>(p, a); put<Stream>(p + 8, b); }
  static constexpr uintptr_t kAlign = 16;
};

}  // namespace
}  // namespace detail
}  // namespace frpo

#include "simd_ops.h"

namespace frpo {
namespace detail {
namespace {

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

}  // namespace

const Impl* avx2_impl() {
  using Ops = SimdOps<Avx2>;
  static const Impl impl{"avx2", &DtypeSwitch<Ops>::forward, &DtypeSwitch<Ops>::backward, &DtypeSwitch<Ops>::fused};
  static const bool ok = cpu_has_avx2();
  return ok ? &impl : nullptr;
}

}  // namespace detail
}  // namespace frpo

#else  // not x86-64 GCC / Clang: no AVX2 path

namespace frpo {
namespace detail {
const Impl* avx2_impl() { return nullptr; }
}  // namespace detail
}  // namespace frpo

#endif
