// AVX-512 intrinsics on SIMDe's portable implementations (pip install simde-py), for building
// csrc/core/logprob_kernels_avx512.cpp with FRPO_AVX512_SIMDE on a CPU without AVX-512
// (tests/test_csrc_avx512_simde.py). SIMDe 0.8.2 lacks the three intrinsics (and the one rounding flag) defined below; they are
// written here from the semantics in Intel's intrinsics guide, with the streaming stores' alignment
// requirement checked (a misaligned non-temporal store faults on real hardware).
#pragma once

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>

#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif

#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace frpo_simde {
inline void require_aligned(const void* p, uintptr_t align, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    std::fprintf(stderr, "%s: address %p is not %u-byte aligned\n", what, p, unsigned(align));
    std::abort();
  }
}
}  // namespace frpo_simde

inline void _mm512_stream_ps(float* p, __m512 v) {
  frpo_simde::require_aligned(p, 64, "_mm512_stream_ps");
  _mm512_storeu_ps(p, v);
}
inline void _mm512_stream_si512(void* p, __m512i v) {
  frpo_simde::require_aligned(p, 64, "_mm512_stream_si512");
  _mm512_storeu_si512(p, v);
}
// vcvtps2ph: 16 floats to fp16, the two 8-lane halves through SIMDe's F16C conversion
#define _mm512_cvtps_ph(v, rounding)                                                         \
  _mm256_set_m128i(_mm256_cvtps_ph(_mm512_extractf32x8_ps((v), 1), (rounding)),              \
                   _mm256_cvtps_ph(_mm512_castps512_ps256(v), (rounding)))
