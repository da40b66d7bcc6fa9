// AVX-512 (F, BW, DQ, VL) inner loops: 16 logits per vector, the loops of simd_ops.h. Compiled with
// per-function target attributes like the AVX2 file, so this file builds with default flags;
// avx512_impl() returns the loops only if the CPU (and OS) has AVX-512 F, BW, DQ and VL.
//
// With FRPO_AVX512_SIMDE defined the same code is built on SIMDe's portable implementations of the
// intrinsics instead (tests/test_csrc_avx512_simde.py): that is how a machine without AVX-512, and CI,
// run these loops against the float64 reference.
#include "detail.h"

#if defined(FRPO_AVX512_SIMDE)
#include "avx512_simde.h"  // csrc/tests: SIMDe, plus the few intrinsics it lacks
#define FRPO_SIMD
#define FRPO_SIMD_INLINE inline
#define FRPO_HAVE_AVX512_TU 1
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FRPO_SIMD __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define FRPO_SIMD_INLINE __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"), always_inline)) inline
#define FRPO_HAVE_AVX512_TU 1
#endif

#ifdef FRPO_HAVE_AVX512_TU
#include "x86_horizontal.h"

// GCC 12's _mm512_max_ps, _mm512_extractf32x8_ps, ... pass an _mm512_undefined_*() value through a
// mask they never use, and -W(maybe-)uninitialized reports it at every inlined call.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace frpo {
namespace detail {
namespace {

// The vector policy of simd_ops.h: 16 fp32 lanes.
struct Avx512 {
  using F = __m512;
  static constexpr int64_t kWidth = 16;
  static FRPO_SIMD_INLINE F set1(float f) { return _mm512_set1_ps(f); }
  static FRPO_SIMD_INLINE F zero() { return _mm512_setzero_ps(); }
  static FRPO_SIMD_INLINE F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static FRPO_SIMD_INLINE void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  static FRPO_SIMD_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
  static FRPO_SIMD_INLINE F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static FRPO_SIMD_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static FRPO_SIMD_INLINE F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static FRPO_SIMD_INLINE F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static FRPO_SIMD_INLINE F max(F a, F b) { return _mm512_max_ps(a, b); }
  static FRPO_SIMD_INLINE F min(F a, F b) { return _mm512_min_ps(a, b); }
  static FRPO_SIMD_INLINE F pow2(F t) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23)); }
  static FRPO_SIMD_INLINE float hsum(F v) {
    return horizontal8<false>(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
  }
  static FRPO_SIMD_INLINE float hmax(F v) {
    return horizontal8<true>(_mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
  }
  template <class E> struct Elem;
};

// Loads 16 logits as fp32; stores 16 (put) or 32 (put2) fp32 results in the element type, with plain or
// streaming (non-temporal: p aligned to kAlign) stores.
template <> struct Avx512::Elem<F32> {
  static FRPO_SIMD_INLINE __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  template <bool Stream>
  static FRPO_SIMD_INLINE void put(float* p, __m512 v) {
    if (Stream) _mm512_stream_ps(p, v); else _mm512_storeu_ps(p, v);
  }
  template <bool Stream>
  static FRPO_SIMD_INLINE void put2(float* p, __m512 a, __m512 b) { put<Stream>(p, a); put<Stream>(p + 16, b); }
  static constexpr uintptr_t kAlign = 64;
};
// bf16 results are rounded as in the AVX2 file (ties away from zero: half an ulp added to the bits,
// the top 16 kept; see there for why and for NaN / inf), then one word permute gathers the top halves:
// 16 results per vpermw, 32 per vpermt2w. (avx512_bf16's vcvtne2ps2bf16 would round ties to even in
// one instruction; it is not used: this build keeps one bf16 rounding for every x86 path.)
template <> struct Avx512::Elem<BF16> {
  static FRPO_SIMD_INLINE __m512 load(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static FRPO_SIMD_INLINE __m512i round(__m512 v) {  // bf16 in the top 16 bits of each 32-bit lane
    return _mm512_add_epi32(_mm512_castps_si512(v), _mm512_set1_epi32(0x8000));
  }
  static FRPO_SIMD_INLINE __m512i odd_words() {  // word j <- word 2j + 1: the top halves, a's then b's
    return _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21,
                            19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  }
  template <bool Stream>
  static FRPO_SIMD_INLINE void put(uint16_t* p, __m512 v) {
    const __m256i r = _mm512_castsi512_si256(_mm512_permutexvar_epi16(odd_words(), round(v)));
    auto* q = reinterpret_cast<__m256i*>(p);
    if (Stream) _mm256_stream_si256(q, r); else _mm256_storeu_si256(q, r);
  }
  template <bool Stream>
  static FRPO_SIMD_INLINE void put2(uint16_t* p, __m512 a, __m512 b) {
    const __m512i r = _mm512_permutex2var_epi16(round(a), odd_words(), round(b));
    auto* q = reinterpret_cast<__m512i*>(p);
    if (Stream) _mm512_stream_si512(q, r); else _mm512_storeu_si512(q, r);
  }
  static constexpr uintptr_t kAlign = 64;
};
template <> struct Avx512::Elem<F16> {
  static FRPO_SIMD_INLINE __m512 load(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  template <bool Stream>
  static FRPO_SIMD_INLINE void put(uint16_t* p, __m512 v) {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    auto* q = reinterpret_cast<__m256i*>(p);
    if (Stream) _mm256_stream_si256(q, h); else _mm256_storeu_si256(q, h);
  }
  template <bool Stream>
  static FRPO_SIMD_INLINE void put2(uint16_t* p, __m512 a, __m512 b) { put<Stream>(p, a); put<Stream>(p + 16, b); }
  static constexpr uintptr_t kAlign = 32;
};

}  // namespace
}  // namespace detail
}  // namespace frpo

#include "simd_ops.h"

namespace frpo {
namespace detail {
namespace {

bool cpu_has_avx512() {
#if defined(FRPO_AVX512_SIMDE)
  return true;  // emulated: runs anywhere
#else
  __builtin_cpu_init();  // also checks that the OS saves the AVX-512 registers
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
}

}  // namespace

const Impl* avx512_impl() {
  using Ops = SimdOps<Avx512>;
  static const Impl impl{"avx512", &DtypeSwitch<Ops>::forward, &DtypeSwitch<Ops>::backward, &DtypeSwitch<Ops>::fused};
  static const bool ok = cpu_has_avx512();
  return ok ? &impl : nullptr;
}

}  // namespace detail
}  // namespace frpo

#else  // not x86-64 GCC / Clang: no AVX-512 path

namespace frpo {
namespace detail {
const Impl* avx512_impl() { return nullptr; }
}  // namespace detail
}  // namespace frpo

#endif
