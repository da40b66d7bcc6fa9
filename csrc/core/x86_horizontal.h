// The last steps of a horizontal sum or max on x86: 8 fp32 lanes to one float, shared by the AVX2 and
// AVX-512 vector policies. Included by those files after <immintrin.h> (or its SIMDe stand-in) and
// their FRPO_SIMD_INLINE.
#pragma once

namespace frpo {
namespace detail {
namespace {

template <bool Max>
FRPO_SIMD_INLINE __m128 combine4(__m128 a, __m128 b) { return Max ? _mm_max_ps(a, b) : _mm_add_ps(a, b); }

// Max: the x86 max (second operand when either is NaN), like the lane-wise max before it.
template <bool Max>
FRPO_SIMD_INLINE float horizontal8(__m256 v) {
  __m128 s = combine4<Max>(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = combine4<Max>(s, _mm_movehl_ps(s, s));
  s = Max ? _mm_max_ss(s, _mm_movehdup_ps(s)) : _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace
}  // namespace detail
}  // namespace frpo
