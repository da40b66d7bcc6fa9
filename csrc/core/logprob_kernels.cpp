// Portable implementation (any CPU, any compiler) and the run-time choice between it and AVX2.
#include "logprob_kernels.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "detail.h"

namespace frpo {
namespace detail {
namespace {

// Plain loops over the branch-free exp_poly; compilers may auto-vectorise them (e.g. NEON).
struct ScalarOps {
  template <class E>
  static float max_raw(const typename E::T* x, int64_t n) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) {
      const float v = E::load(x + i);
      m = v > m ? v : m;
    }
    return m;
  }
  template <class E, bool Ent, bool Store>
  static void sum_exp(const typename E::T* x, int64_t n, float inv_t, float m, float* s_out, float* t_out,
                      int64_t /*pf*/, float* e_out) {
    double s = 0.0, t = 0.0;  // one running sum over a whole chunk: fp32 would lose ~n ulps
    for (int64_t i = 0; i < n; ++i) {
      const float d = clamp_exp_arg(E::load(x + i) * inv_t - m);
      const float e = exp_poly(d);
      if (Store) e_out[i] = e;
      s += e;
      if (Ent) t += double(e) * d;
    }
    *s_out = float(s);
    *t_out = float(t);
  }
  template <class E>
  static void scale_span(const float* e, typename E::T* g, int64_t n, float f, bool /*streaming*/,
                         const typename E::T* /*pf*/) {
    for (int64_t i = 0; i < n; ++i) g[i] = E::from(e[i] * f);
  }
  template <class E, bool Ent>
  static void grad_span(const typename E::T* x, typename E::T* g, int64_t n, float inv_t, float lse, float a,
                        float b, bool /*streaming*/, int64_t /*pf*/) {
    for (int64_t i = 0; i < n; ++i) {
      const float d = clamp_exp_arg(E::load(x + i) * inv_t - lse);
      const float p = exp_poly(d);
      g[i] = E::from(Ent ? p * (a + b * d) : p * a);
    }
  }
  template <class E>
  static void zero_span(typename E::T* g, int64_t n, bool /*streaming*/) {
    std::memset(static_cast<void*>(g), 0, size_t(n) * sizeof(typename E::T));
  }
  static void fence() {}
};

}  // namespace

const Impl& scalar_impl() {
  static const Impl impl{"portable", &DtypeSwitch<ScalarOps>::forward, &DtypeSwitch<ScalarOps>::backward,
                         &DtypeSwitch<ScalarOps>::fused};
  return impl;
}

namespace {
std::atomic<const Impl*>& current() {
  static std::atomic<const Impl*> impl{avx2_impl() ? avx2_impl() : &scalar_impl()};
  return impl;
}
}  // namespace

}  // namespace detail

const char* active_isa() { return detail::current().load()->name; }

std::string set_isa(const char* name) {
  const std::string n = name ? name : "";
  const detail::Impl* avx2 = detail::avx2_impl();
  const std::string here = std::string("this CPU runs: ") + (avx2 ? "avx2, portable" : "portable");
  const detail::Impl* pick = nullptr;
  if (n == "auto") pick = avx2 ? avx2 : &detail::scalar_impl();
  else if (n == "portable") pick = &detail::scalar_impl();
  else if (n == "avx2") {
    if (!avx2) return "CPU ISA 'avx2' needs an x86-64 CPU with AVX2, FMA and F16C (" + here + ")";
    pick = avx2;
  } else if (n == "avx512") {
    if (!detail::cpu_has_avx512())
      return "CPU ISA 'avx512' needs a CPU with AVX-512 F, BW, DQ and VL; this one lacks it (" + here + ")";
    return "CPU ISA 'avx512': this build has no AVX-512 kernels yet (" + here + ")";
  } else {
    return "CPU ISA '" + n + "' is not one of: auto, avx512, avx2, portable (" + here + ")";
  }
  detail::current().store(pick);
  return "";
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
