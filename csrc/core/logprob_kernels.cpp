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
  static const Impl impl{"scalar", &DtypeSwitch<ScalarOps>::forward, &DtypeSwitch<ScalarOps>::backward,
                         &DtypeSwitch<ScalarOps>::fused};
  return impl;
}

namespace {
const Impl* choose(const char* name) {
  const Impl* avx2 = avx2_impl();
  if (name && std::strcmp(name, "scalar") == 0) return &scalar_impl();
  return avx2 ? avx2 : &scalar_impl();
}
std::atomic<const Impl*>& current() {
  static std::atomic<const Impl*> impl{choose(std::getenv("FRPO_CPU_ISA"))};
  return impl;
}
}  // namespace

}  // namespace detail

const char* active_isa() { return detail::current().load()->name; }
void set_isa(const char* name) { detail::current().store(detail::choose(name)); }

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
