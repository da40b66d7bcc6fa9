// The run-time choice between the implementations (portable, AVX2, AVX-512) and the entry points that dispatch to it.
#include "logprob_kernels.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "detail.h"

namespace frpo {
namespace detail {
namespace {
// The fastest implementation this CPU runs.
const Impl* best() {
  if (const Impl* impl = avx512_impl()) return impl;
  if (const Impl* impl = avx2_impl()) return impl;
  return &portable_impl();
}
std::atomic<const Impl*>& current() {
  static std::atomic<const Impl*> impl{best()};
  return impl;
}
}  // namespace

}  // namespace detail

const char* active_isa() { return detail::current().load()->name; }

std::string set_isa(const char* name) {
  const std::string n = name ? name : "";
  const detail::Impl* avx512 = detail::avx512_impl();
  const detail::Impl* avx2 = detail::avx2_impl();
  const std::string here = std::string("this CPU runs: ") + (avx512 ? "avx512, " : "") + (avx2 ? "avx2, " : "") +
                           "portable";
  const detail::Impl* pick = nullptr;
  if (n == "auto") pick = detail::best();
  else if (n == "portable") pick = &detail::portable_impl();
  else if (n == "avx2") {
    if (!avx2) return "CPU ISA 'avx2' needs an x86-64 CPU with AVX2, FMA and F16C (" + here + ")";
    pick = avx2;
  } else if (n == "avx512") {
    if (!avx512) return "CPU ISA 'avx512' needs an x86-64 CPU with AVX-512 F, BW, DQ and VL (" + here + ")";
    pick = avx512;
  } else {
    return "CPU ISA '" + n + "' is not one of: auto, avx512, avx2, portable (" + here + ")";
  }
  detail::current().store(pick);
  return "";
}

std::string auto_slow_reason() {
  if (detail::avx512_impl() || detail::avx2_impl()) return "";
  return detail::portable_slow_reason();
}

void forward_rows(const LogitsView& logits, const TokenInputs& tok, const ForwardOut& out, int64_t row_begin,
                  int64_t row_end) {
  detail::current().load()->forward(logits, tok, out, row_begin, row_end);
}
void backward_rows(const LogitsView& logits, const TokenInputs& tok, const BackwardIn& in, const GradView& grad,
                   int64_t row_begin, int64_t row_end) {
  detail::current().load()->backward(logits, tok, in, grad, row_begin, row_end);
}
void fused_rows(const LogitsView& logits, const TokenInputs& tok, const FusedIn& in, const ForwardOut& out,
                const GradView& grad, int64_t row_begin, int64_t row_end) {
  detail::current().load()->fused(logits, tok, in, out, grad, row_begin, row_end);
}

}  // namespace frpo
