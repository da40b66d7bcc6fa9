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
// z - c with z = x/T rounded to fp32 (x * inv_t: the logit the max and the target's logp use; see
// simd_ops.h's shifted for why not fma(x, inv_t, -c)), with Unit (T = 1, the usual temperature) as
// x - c: the same value, one multiply fewer. The build without FMA takes it: there the loops are bound
// by their dependency chain, which the multiply lengthens by a tenth (in cache, SSE2 fp32: fused 1.18 ->
// 1.14, backward 0.91 -> 0.85 ns/logit). With FMA, x - c is not on the FMA ports (Zen: the add ports):
// Always takes it there too, for the bf16 loops (bf16 forward 0.510 -> 0.491 ns/logit in cache, 4-lane
// FMA; measured when T != 1 was one fma). Not for the fp32 and fp16 loops: taking it in every loop made
// the fp32 forward 7x slower in that build (not investigated).
template <bool Unit>
inline float shifted(float x, float inv_t, float c) { return Unit ? x - c : x * inv_t - c; }
template <bool Always = false, class F>
inline void with_unit_temperature(float inv_t, F&& run) {
  if constexpr (!kFma || Always) {
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
// The bf16 sums test the largest exp argument of a chunk against kExpHi once, after the loop, instead of
// each exp (a compare and a select per vector, both on the FMA ports on Zen): a max per vector. On x86
// the max is of the floats (one maxps: GCC 12 makes it of the select); elsewhere it is of their bits as
// signed integers, which order the floats above 0 as floats (those below 0 are negative integers, and a
// +NaN counts as above kExpHi: harmless, its exp makes the sum NaN anyway). GCC 12 makes the float
// select on aarch64 NaN-aware compares and selects, 9 instructions per 8 logits and a spill of the
// running max, against NEON's 2 smax (66 instructions per 8 logits in the loop instead of 73).
#if defined(__SSE2__)
using ArgKey = float;
inline ArgKey arg_key(float d) { return d; }
#else
using ArgKey = int32_t;
inline ArgKey arg_key(float d) { return int32_t(float_bits(d)); }
#endif
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
// and stream_copy moves it. Only fp32 gradients stream: the fp16 sweeps are bound by their conversions
// (3-5x their floor), and for bf16 the buffer's extra pass measured slower than the reads it saves,
// before and after its loops were made cheaper (csrc/bench/README.md). Elsewhere plain stores: Arm cores switch to a write-streaming mode without the read on runs
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

// Which gradients stream (where kStreamStores): fp32 only, see above. Callers pass streaming &&
// kStreams<E>, a constant false for bf16 and fp16 (as a test inside write_blocks, sizeof(T) == 4,
// GCC 12 made the bf16 backward 3% slower: 0.640 -> 0.662 ns/logit in cache, 4-lane FMA).
template <class E>
constexpr bool kStreams = std::is_same<E, F32>::value;

// Writes g[0, n) in blocks of at most kBlock elements: emit(out, i0, i1) writes the values of elements
// i0..i1-1 to out[0, i1 - i0). Streaming fp32, each block goes to an L1 buffer and then to g with
// streaming stores (after a first short block up to g's first 16-byte boundary, written directly);
// otherwise emit writes g itself.
template <class T, class Emit>
inline void write_blocks(T* g, int64_t n, bool streaming, Emit&& emit) {
  const bool stream = kStreamStores && streaming && reinterpret_cast<uintptr_t>(g) % sizeof(T) == 0;
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

// bf16 in pairs. A bf16 is the top half of an fp32, so a 32-bit word holding two of them gives both as
// fp32 with one operation each (the first in memory: the word shifted up 16; the second: the word with
// its low half cleared), and two rounded results go back into one word with one shift, one mask and an
// or. Element by element, GCC widens the 16-bit loads (x86: two zero-extends, a byte shift and two
// shifts per 8) and narrows the results with masks and packs (x86, 4 lanes: 27 operations to round
// and store 8 results, 17 in pairs). So the bf16 loops run over words of two logits, the kept exps of
// the fused kernel in the matching order (sum_exp_pairs).
#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
constexpr bool kLittleEndian = false;
#else
constexpr bool kLittleEndian = true;
#endif
inline uint32_t load_pair(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}
inline void store_pair(uint16_t* p, uint32_t w) { std::memcpy(p, &w, 4); }
inline float pair_first(uint32_t w) { return bits_float(kLittleEndian ? w << 16 : w & 0xFFFF0000u); }
inline float pair_second(uint32_t w) { return bits_float(kLittleEndian ? w & 0xFFFF0000u : w << 16); }
inline uint32_t merge_pair(uint32_t a, uint32_t b) {  // the top halves of a and b
  return kLittleEndian ? (a >> 16) | (b & 0xFFFF0000u) : (a & 0xFFFF0000u) | (b >> 16);
}
inline uint32_t make_pair(float first, float second) {  // both rounded as f32_to_bf16 rounds
  return merge_pair(bf16_round_bits(first), bf16_round_bits(second));
}
inline uint32_t make_pair_finite(float first, float second) {  // the same, for values that are not NaN
  return merge_pair(bf16_round_bits_finite(first), bf16_round_bits_finite(second));
}
template <class E>
constexpr bool kPairs = std::is_same<E, BF16>::value;

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
    if constexpr (kPairs<E>) return sum_exp_pairs<Ent, Store>(x, n, inv_t, m, s_out, t_out, pf, e_out);
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

  // bf16, one chunk by pairs of logits. Store: the exps are kept pair-major, the chunk's first logits of
  // the pairs then its second ones (e_out[j] for logit 2j, e_out[h + j] for logit 2j + 1, h = n/2; an
  // odd n's last logit at e_out[n - 1]), the layout scale_span<BF16> reads: gradient_from_exps hands it
  // the same chunks (e + c, n) that forward() summed.
  template <bool Ent, bool Store>
  static void sum_exp_pairs(const uint16_t* x, int64_t n, float inv_t, float m, float* s_out, float* t_out,
                            int64_t pf, float* e_out) {
    const int64_t h = n / 2;
    with_unit_temperature<true>(inv_t, [&](auto unit) {
      constexpr bool kUnit = decltype(unit)::value;
      float s = 0.f, t = 0.f;
      ArgKey kmax = arg_key(-std::numeric_limits<float>::infinity());
      for (int64_t b = 0; b < h; b += kBlock / 2) {
        const int64_t end = h - b < kBlock / 2 ? h : b + kBlock / 2;
        if (pf) prefetch_span(x + 2 * b + pf, 2 * (end - b));
        float bs = 0.f, bt = 0.f;
#pragma omp simd reduction(+ : bs, bt) reduction(max : kmax)
        for (int64_t j = b; j < end; ++j) {
          const uint32_t w = load_pair(x + 2 * j);
          const float d0 = shifted<kUnit>(pair_first(w), inv_t, m), d1 = shifted<kUnit>(pair_second(w), inv_t, m);
          const float e0 = zero_below(d0, exp_one(d0)), e1 = zero_below(d1, exp_one(d1));
          const ArgKey k0 = arg_key(d0), k1 = arg_key(d1), k01 = k0 > k1 ? k0 : k1;
          kmax = k01 > kmax ? k01 : kmax;
          if (Store) {
            e_out[j] = e0;
            e_out[h + j] = e1;
          }
          bs += e0 + e1;
          if (Ent) bt += zero_below(d0, e0 * d0) + zero_below(d1, e1 * d1);
        }
        s += bs;
        t += bt;
      }
      if (n & 1) {
        const float d = shifted<kUnit>(BF16::load(x + n - 1), inv_t, m), e = exp_masked(d);
        if (Store) e_out[n - 1] = e;
        s += e;
        if (Ent) t += zero_below(d, e * d);
      }
      // an argument above kExpHi (its exp not computed right): the sum made +inf, which forward() redoes
      // against the chunk's own max (a NaN sum stays NaN, also redone)
      if (kmax > arg_key(kExpHi)) s += std::numeric_limits<float>::infinity();
      *s_out = s;
      *t_out = t;
    });
  }

  template <class E>
  static void scale_span(const float* e, typename E::T* g, int64_t n, float f, bool streaming) {
    if constexpr (kPairs<E>) {  // e: pair-major (sum_exp_pairs)
      const int64_t h = n / 2;
      // The kept exps are finite (forward() redid any chunk with an inf or NaN, and a NaN logit would
      // have made lse NaN: no scale_span), so a NaN result needs a NaN or infinite f (0 * inf):
      // for a finite f the rounding skips its NaN test (23 -> 17 instructions per 8 logits, SSE4.1).
      const bool finite = std::isfinite(f);
      auto at = [&](int64_t i) { return i == 2 * h ? e[i] : e[(i & 1) ? h + i / 2 : i / 2]; };
      write_blocks(g, n, streaming && kStreams<E>, [&](uint16_t* out, int64_t i0, int64_t i1) {
        int64_t i = i0;
        if (i & 1) out[i++ - i0] = BF16::from(at(i0) * f);  // only after a short first block (streaming)
        uint16_t* o = out + (i - i0);
        const int64_t j0 = i / 2, j1 = i1 / 2 < h ? i1 / 2 : h;
        if (finite) {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) store_pair(o + 2 * (j - j0), make_pair_finite(e[j] * f, e[h + j] * f));
        } else {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) store_pair(o + 2 * (j - j0), make_pair(e[j] * f, e[h + j] * f));
        }
        if (2 * j1 < i1) out[i1 - 1 - i0] = BF16::from(at(i1 - 1) * f);
      });
      return;
    }
    write_blocks(g, n, streaming && kStreams<E>, [&](typename E::T* out, int64_t i0, int64_t i1) {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) out[i - i0] = E::from(e[i] * f);
    });
  }

  // The fused gradient with the entropy term: g = e * (fa + fb * d), d = x/T - lse (log p, clamped below as in
  // grad_span: -inf logits have e = 0 and must not give 0 * -inf). x is read before g is written (in place).
  // One loop per dtype, no T = 1 variant: more instantiations in this file pushed GCC 12 past its inlining
  // budget (inline-unit-growth), and it then left loops elsewhere in the file scalar.
  template <class E>
  static void scale_ent_span(const float* e, const typename E::T* x, typename E::T* g, int64_t n, float fa, float fb,
                             float inv_t, float lse, bool streaming) {
    if constexpr (kPairs<E>) {  // e pair-major (sum_exp_pairs); x and g by pairs (bf16 gradients never stream)
      const int64_t h = n / 2;
      write_blocks(g, n, false, [=](uint16_t* out, int64_t i0, int64_t i1) {
        // blocks start at even i0 (kBlock is even; no streaming head): pairs j of the whole span
        const int64_t j0 = i0 / 2, j1 = i1 / 2 < h ? i1 / 2 : h;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {  // in place: the pair is read before it is written
          const uint32_t w = load_pair(x + 2 * j);
          const float d0 = clamp_lo(shifted<false>(pair_first(w), inv_t, lse)),
                      d1 = clamp_lo(shifted<false>(pair_second(w), inv_t, lse));
          store_pair(out + 2 * (j - j0), make_pair(e[j] * mul_add(fb, d0, fa), e[h + j] * mul_add(fb, d1, fa)));
        }
        if (2 * j1 < i1) {  // an odd n's last logit (its exp at e[n - 1])
          const float d = clamp_lo(shifted<false>(BF16::load(x + i1 - 1), inv_t, lse));
          out[i1 - 1 - i0] = BF16::from(e[i1 - 1] * mul_add(fb, d, fa));
        }
      });
      return;
    }
    write_blocks(g, n, streaming && kStreams<E>, [=](typename E::T* out, int64_t i0, int64_t i1) {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) {  // in place (g == x): each out element written after its x is read
        const float d = clamp_lo(shifted<false>(E::load(x + i), inv_t, lse));
        out[i - i0] = E::from(e[i] * mul_add(fb, d, fa));
      }
    });
  }

  template <class E, bool Ent>
  static void grad_span(const typename E::T* x, typename E::T* g, int64_t n, float inv_t, float lse_hi, float a,
                        float b, bool streaming, int64_t pf) {
    with_unit_temperature<kPairs<E>>(inv_t, [&](auto unit) {
      constexpr bool kUnit = decltype(unit)::value;
      // by value: where emit is not inlined (it was not while bf16 gradients streamed: write_blocks then
      // calls it twice), values read through a reference could alias out and GCC left the loop scalar
      // (bf16 backward 0.84 -> 2.29 ns/logit)
      const auto grad = [=](float v) {
        const float d = shifted<kUnit>(v, inv_t, lse_hi);  // <= 0 up to rounding
        const float p = zero_below(d, exp_one(d));     // then times a: a NaN a (dlogp) still gives NaN
        return Ent ? p * mul_add(b, clamp_lo(d), a) : p * a;
      };
      // bf16: the gradients of a block go to an fp32 L1 buffer, then a second loop rounds them. In one
      // loop the rounding's operations wait on the exp's long chain and take the scheduler's places
      // (4-lane FMA, in cache: backward 0.83 -> 0.64 ns/logit; 0.54 with no rounding at all).
      if constexpr (kPairs<E>) {
        write_blocks(g, n, streaming && kStreams<E>, [&, grad](uint16_t* out, int64_t i0, int64_t i1) {
          if (pf) prefetch_span(x + i0 + pf, i1 - i0);
          const uint16_t* xb = x + i0;
          const int64_t np = (i1 - i0) / 2;
          alignas(64) float g0[kBlock / 2], g1[kBlock / 2];
#pragma omp simd
          for (int64_t j = 0; j < np; ++j) {
            const uint32_t w = load_pair(xb + 2 * j);
            g0[j] = grad(pair_first(w));
            g1[j] = grad(pair_second(w));
          }
#pragma omp simd
          for (int64_t j = 0; j < np; ++j) store_pair(out + 2 * j, make_pair(g0[j], g1[j]));  // in place: x read above
          if ((i1 - i0) & 1) out[i1 - 1 - i0] = BF16::from(grad(BF16::load(x + i1 - 1)));
        });
        return;
      }
      write_blocks(g, n, streaming && kStreams<E>, [&](typename E::T* out, int64_t i0, int64_t i1) {
        if (pf) prefetch_span(x + i0 + pf, i1 - i0);
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) {  // in place (g == x): each out element written after its x is read
          const float d = shifted<decltype(unit)::value>(E::load(x + i), inv_t, lse_hi);  // <= 0 up to rounding
          const float p = zero_below(d, exp_one(d));  // then times a: a NaN a (dlogp) still gives NaN
          out[i - i0] = E::from(Ent ? p * mul_add(b, clamp_lo(d), a) : p * a);
        }
      });
    });
  }

  template <class E>
  static void zero_span(typename E::T* g, int64_t n, bool streaming) {
    write_blocks(g, n, streaming && kStreams<E>, [](typename E::T* out, int64_t i0, int64_t i1) {
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
