// Torch-free per-token log-prob kernels: log-softmax at the target id, log-sum-exp, entropy and the
// logits gradient, one row of V logits at a time, on raw pointers (see frpo_kernels/backends/torch_reference.py).
#pragma once

#include <cstdint>
#include <string>

namespace frpo {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Logits [batch, length, vocab]: element (b, t, v) at data + b*stride_b + t*stride_t + v (elements).
struct LogitsView {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t batch = 0, length = 0, vocab = 0;
  int64_t stride_b = 0, stride_t = 0;
};

// Gradient [batch, length, vocab] of the logits' dtype; may be the logits' own storage (in place).
// streaming: write with non-temporal stores (for outputs far larger than the caches).
struct GradView {
  void* data = nullptr;
  int64_t stride_b = 0, stride_t = 0;
  bool streaming = false;
};

// Per-token inputs shared by every kernel; all [batch * length] arrays are contiguous, row r = b*length + t.
// Preconditions (checked by the caller): 0 <= ids[r] < vocab for every unmasked row, inv_temperature > 0.
struct TokenInputs {
  const int64_t* ids = nullptr;
  const bool* mask = nullptr;  // nullptr: every row counts; mask[r] false: outputs 0, gradient row 0
  float inv_temperature = 1.f;
};

// lse: two floats per row, lse[2r] + lse[2r + 1] = the row's log-sum-exp, the first its rounding to fp32, the
// second the rest (0 where lse is not finite). The backward's p = exp(z - lse) from the rounded lse alone would
// be off by up to |lse| * 6e-8 relative (1e-4 at logits of 1e4; at 1e30 even a double lse loses log sum).
struct ForwardOut {
  float* logp = nullptr;
  float* lse = nullptr;
  float* entropy = nullptr;  // nullptr: entropy not computed
};

// Backward: grad = dlogp*(onehot(id) - p)/T - dentropy*p*(log p + H)/T; entropy/dentropy may be nullptr.
struct BackwardIn {
  const float* lse = nullptr;  // [2 * rows], as ForwardOut's
  const float* dlogp = nullptr;
  const float* entropy = nullptr;
  const float* dentropy = nullptr;
};

// Fused: dlogp = coef*gate + kl_coef*(1 - exp(ref_logps - logp)); kl_coef/ref_logps both nullptr: no KL term.
// gate = 1 without old_logps; with them, a function of the log-ratio l = logp - old_logps (r = exp(l)),
// known as soon as the row's logp is (old_logps, ratio_lo, ratio_hi: all three or none; they may be +-inf),
// 0 where l is NaN, by gate_kind:
//   kGateWindow  r where ratio_lo <= l <= ratio_hi, else 0: the clipped-ratio losses' token gradient
//   kGateCapped  min(r, exp(ratio_hi)) (ratio_lo unread): cispo's detached capped ratio
//   kGateSoft    4 s (1 - s) r, s = sigmoid(ratio_lo * (r - 1)), where l <= ratio_hi, else 0: sapo's soft
//                gate (ratio_lo its temperature, ratio_hi the log-ratio past which its loss is constant)
enum GateKind : int { kGateWindow = 0, kGateCapped = 1, kGateSoft = 2 };

// entropy_coef (nullptr: no entropy term): dloss/dH per token; the gradient gains
// -entropy_coef * p * (log p + H) / T, and the row's entropy is computed for it (written to
// ForwardOut::entropy when that is given).
struct FusedIn {
  const float* coef = nullptr;
  const float* kl_coef = nullptr;
  const float* ref_logps = nullptr;
  const float* old_logps = nullptr;
  const double* ratio_lo = nullptr;  // double: compared with the log-ratio in double, as torch compares the
  const double* ratio_hi = nullptr;  // ratio with 1 + epsilon (fp32 bounds moved a clip by up to 3e-8)
  const float* entropy_coef = nullptr;
  GateKind gate_kind = kGateWindow;
};

// Each function handles rows [row_begin, row_end) of the flattened batch*length rows, so callers can
// split rows across threads. Rows are independent; outputs of different rows never overlap.
void forward_rows(const LogitsView& logits, const TokenInputs& tok, const ForwardOut& out,
                  int64_t row_begin, int64_t row_end);
void backward_rows(const LogitsView& logits, const TokenInputs& tok, const BackwardIn& in,
                   const GradView& grad, int64_t row_begin, int64_t row_end);
void fused_rows(const LogitsView& logits, const TokenInputs& tok, const FusedIn& in,
                const ForwardOut& out, const GradView& grad, int64_t row_begin, int64_t row_end);

// Which implementation runs: "avx512" (x86-64 with AVX-512 F+BW+DQ+VL), "avx2" (x86-64 with
// AVX2+FMA+F16C), both detected at run time, or "portable" (plain loops the compiler vectorises for the
// build target: SSE2, NEON, SVE, ...). "auto" (the default) picks the fastest one this CPU has.
const char* active_isa();
// Selects the implementation by name: "auto", "avx512", "avx2" or "portable" (FRPO_CPU_ISA's values;
// the core never reads the environment itself). Returns "" on success, otherwise the reason the name
// cannot be used (unknown name, or a path this CPU or build lacks), naming the choices; the current
// choice is then unchanged.
std::string set_isa(const char* name);
// Why the path "auto" picks may be slower than torch eager ("" when it is not): the portable path in a
// build that did not vectorise it, on a CPU without AVX2. Callers then prefer torch (frpo_kernels.backends.cpu).
std::string auto_slow_reason();

}  // namespace frpo
