// Torch binding of the core kernels: input validation, outputs, row-parallel launch, and the
// frpo_kernels::token_logprobs_* operator schemas (CPU implementations).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "core/logprob_kernels.h"

namespace {

using at::Tensor;

// Enough logits per task that threads do not fight over tiny rows.
int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(vocab, 1)); }

// Outputs bigger than this bypass the caches with streaming stores (they would evict everything anyway).
constexpr int64_t kStreamingBytes = int64_t(8) << 20;

frpo::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return frpo::DType::F32;
    case at::kBFloat16: return frpo::DType::BF16;
    case at::kHalf: return frpo::DType::F16;
    default: TORCH_CHECK(false, "frpo_kernels: logits must be float32, bfloat16 or float16, got ", t);
  }
  return frpo::DType::F32;
}

struct Prepared {
  frpo::LogitsView view;
  Tensor ids, mask;  // contiguous int64 / bool (mask undefined: no mask)
  frpo::TokenInputs tok;
  int64_t rows = 0;
};

// Checks logits/ids/mask/temperature and returns the raw views; nothing is read before this passes.
Prepared prepare(const Tensor& logits, const Tensor& ids, const std::optional<Tensor>& mask, double temperature) {
  TORCH_CHECK(logits.device().is_cpu(), "frpo_kernels: logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 3, "frpo_kernels: logits must have shape [B, T, V], got ", logits.sizes());
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  TORCH_CHECK(V > 0, "frpo_kernels: logits has V = 0 (shape ", logits.sizes(), "); nothing to normalise");
  TORCH_CHECK(V <= (int64_t(1) << 31) - 1, "frpo_kernels: V = ", V, " is too large (at most 2^31 - 1)");
  TORCH_CHECK(logits.stride(2) == 1 || V == 1, "frpo_kernels: logits must have stride 1 in the last dimension, "
              "got strides ", logits.strides(), "; call .contiguous() first");
  TORCH_CHECK(logits.stride(0) >= 0 && logits.stride(1) >= 0, "frpo_kernels: logits has negative strides ", logits.strides());
  Prepared p;
  p.view.dtype = to_dtype(logits.scalar_type());
  TORCH_CHECK(ids.device().is_cpu(), "frpo_kernels: ids must be a CPU tensor, got ", ids.device());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "frpo_kernels: ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B && ids.size(1) == T, "frpo_kernels: ids must have shape [", B, ", ",
              T, "] (logits' [B, T]), got ", ids.sizes());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "frpo_kernels: temperature must be finite and > 0, got ",
              temperature);
  p.ids = ids.contiguous();
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->device().is_cpu(), "frpo_kernels: mask must be a CPU tensor, got ", mask->device());
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == T, "frpo_kernels: mask must have shape [", B,
                ", ", T, "], got ", mask->sizes());
    p.mask = (mask->scalar_type() == at::kBool ? *mask : (*mask != 0)).contiguous();
  }
  if (B * T > 0) {  // only rows that are computed need a valid id
    const Tensor checked = p.mask.defined() ? p.ids.masked_select(p.mask) : p.ids;
    if (checked.numel() > 0) {
      const int64_t lo = checked.min().item<int64_t>(), hi = checked.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < V, "frpo_kernels: ids has entries outside [0, ", V, ") (V = logits.shape[-1]): min ",
                  lo, ", max ", hi);
    }
  }
  p.view.data = logits.data_ptr();
  p.view.batch = B;
  p.view.length = T;
  p.view.vocab = V;
  p.view.stride_b = logits.stride(0);
  p.view.stride_t = logits.stride(1);
  p.tok.ids = p.ids.data_ptr<int64_t>();
  p.tok.mask = p.mask.defined() ? p.mask.data_ptr<bool>() : nullptr;
  p.tok.inv_temperature = float(1.0 / temperature);
  p.rows = B * T;
  return p;
}

// A [B, T] per-token input as contiguous float32 (null pointer when absent).
Tensor token_input(const char* name, const std::optional<Tensor>& t, const Tensor& logits, bool required,
                   at::ScalarType dtype = at::kFloat) {
  if (!t.has_value() || !t->defined()) {
    TORCH_CHECK(!required, "frpo_kernels: ", name, " is required");
    return Tensor();
  }
  TORCH_CHECK(t->device().is_cpu(), "frpo_kernels: ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(t->is_floating_point(), "frpo_kernels: ", name, " must be a floating-point tensor, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 2 && t->size(0) == logits.size(0) && t->size(1) == logits.size(1), "frpo_kernels: ", name,
              " must have shape [", logits.size(0), ", ", logits.size(1), "] (logits' [B, T]), got ", t->sizes());
  return t->to(dtype).contiguous();
}

// The forward's lse, [B, T, 2] float32: each row's log-sum-exp as hi + lo (frpo::ForwardOut).
Tensor lse_output(const Tensor& logits) {
  return at::empty({logits.size(0), logits.size(1), 2}, logits.options().dtype(at::kFloat));
}

Tensor lse_input(const Tensor& lse, const Tensor& logits) {
  TORCH_CHECK(lse.device().is_cpu(), "frpo_kernels: lse must be a CPU tensor, got ", lse.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == logits.size(0) &&
              lse.size(1) == logits.size(1) && lse.size(2) == 2,
              "frpo_kernels: lse must be the forward's float32 [", logits.size(0), ", ", logits.size(1),
              ", 2] (hi, lo parts), got ", lse.scalar_type(), " ", lse.sizes());
  return lse.contiguous();
}

const float* ptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
const double* ptr64(const Tensor& t) { return t.defined() ? t.data_ptr<double>() : nullptr; }

Tensor token_output(const Tensor& logits) {
  return at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(at::kFloat));
}

frpo::GradView grad_view(const Tensor& grad, bool inplace) {
  frpo::GradView g;
  g.data = grad.data_ptr();
  g.stride_b = grad.stride(0);
  g.stride_t = grad.stride(1);
  // in place the row was just read, so its lines are in cache already; otherwise stream big outputs
  g.streaming = !inplace && grad.numel() * int64_t(grad.element_size()) >= kStreamingBytes;
  return g;
}

// Large gradients (>= 32 MiB) are 2 MiB aligned and madvise'd to transparent huge pages, and the
// most recently freed one is kept for the next call that needs the same size. First-touch page faults
// (the kernel zeroing fresh pages) cost as much as the fused kernel itself: 2048 x 49152 fp32 fused
// fwd+bwd through loss() took 107-117 ms with a fresh buffer vs 56 ms writing into cached pages.
// A training step frees its logits' gradient before the next step asks for one of the same size, so
// one slot is enough; a request of another size frees the slot. The cost: one gradient's memory stays
// allocated between steps. FRPO_CPU_GRAD_CACHE=0 turns the cache off, FRPO_CPU_HUGEPAGES=0 both.
bool env_enabled(const char* name) {
  const char* e = std::getenv(name);
  return !(e && std::string(e) == "0");
}

struct GradCache {
  std::mutex mu;
  void* ptr = nullptr;
  size_t len = 0;
};
GradCache& grad_cache() {
  static GradCache* c = new GradCache;  // never destroyed: tensor deleters may run during exit
  return *c;
}
void* take_cached_grad(size_t len) {
  GradCache& c = grad_cache();
  void* stale = nullptr;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.ptr && c.len == len) {
      void* p = c.ptr;
      c.ptr = nullptr;
      return p;
    }
    stale = c.ptr;  // another size: do not keep it around
    c.ptr = nullptr;
  }
  std::free(stale);
  return nullptr;
}
void release_grad(void* p, size_t len) {
  static const bool enabled = env_enabled("FRPO_CPU_GRAD_CACHE");
  if (enabled) {
    GradCache& c = grad_cache();
    std::lock_guard<std::mutex> lock(c.mu);
    if (!c.ptr) {
      c.ptr = p;
      c.len = len;
      return;
    }
  }
  std::free(p);
}

// A new [B, T, V] gradient (every element is written by the kernels, so reused memory needs no clearing).
Tensor new_grad(const Tensor& logits) {
  const auto opts = logits.options().memory_format(at::MemoryFormat::Contiguous);
#ifdef __linux__
  static const bool enabled = env_enabled("FRPO_CPU_HUGEPAGES");
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = size_t(logits.numel()) * logits.element_size();
  if (enabled && bytes >= 16 * kHuge) {
    const size_t len = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = take_cached_grad(len);
    if (!p && posix_memalign(&p, kHuge, len) == 0) madvise(p, len, MADV_HUGEPAGE);  // advisory
    if (p) return at::from_blob(p, logits.sizes(), [len](void* q) { release_grad(q, len); },
                                opts.dtype(logits.scalar_type()));
  }
#endif
  return at::empty(logits.sizes(), opts);
}

void check_writable_logits(const Tensor& logits) {
  TORCH_CHECK(at::has_internal_overlap(logits) != at::MemOverlap::Yes,
              "frpo_kernels: in-place gradient needs logits whose elements do not overlap (got strides ",
              logits.strides(), "); pass inplace=False");
}

std::tuple<Tensor, Tensor, Tensor> fwd(const Tensor& logits, const Tensor& ids, const std::optional<Tensor>& mask,
                                       double temperature, bool with_entropy) {
  Prepared p = prepare(logits, ids, mask, temperature);
  Tensor logp = token_output(logits), lse = lse_output(logits);
  Tensor entropy = with_entropy ? token_output(logits) : at::empty({0}, logits.options().dtype(at::kFloat));
  frpo::ForwardOut out{logp.data_ptr<float>(), lse.data_ptr<float>(), with_entropy ? entropy.data_ptr<float>() : nullptr};
  at::parallel_for(0, p.rows, grain_rows(p.view.vocab), [&](int64_t r0, int64_t r1) {
    frpo::forward_rows(p.view, p.tok, out, r0, r1);
  });
  return {logp, lse, entropy};
}

void bwd_into(const Tensor& grad, bool inplace, const Tensor& logits, const Tensor& ids, const std::optional<Tensor>& mask,
              const Tensor& lse, const Tensor& dlogp, const std::optional<Tensor>& entropy,
              const std::optional<Tensor>& dentropy, double temperature) {
  Prepared p = prepare(logits, ids, mask, temperature);
  Tensor lse_c = lse_input(lse, logits), dlogp_c = token_input("dlogp", dlogp, logits, true);
  Tensor ent_c = token_input("entropy", entropy, logits, false), dent_c = token_input("dentropy", dentropy, logits, false);
  TORCH_CHECK(ent_c.defined() == dent_c.defined(), "frpo_kernels: pass both entropy and dentropy, or neither");
  frpo::BackwardIn in{ptr(lse_c), ptr(dlogp_c), ptr(ent_c), ptr(dent_c)};
  const frpo::GradView g = grad_view(grad, inplace);
  at::parallel_for(0, p.rows, grain_rows(p.view.vocab), [&](int64_t r0, int64_t r1) {
    frpo::backward_rows(p.view, p.tok, in, g, r0, r1);
  });
}

Tensor bwd(const Tensor& logits, const Tensor& ids, const std::optional<Tensor>& mask, const Tensor& lse,
           const Tensor& dlogp, const std::optional<Tensor>& entropy, const std::optional<Tensor>& dentropy,
           double temperature) {
  Tensor grad = new_grad(logits);
  bwd_into(grad, false, logits, ids, mask, lse, dlogp, entropy, dentropy, temperature);
  return grad;
}

void bwd_inplace(const Tensor& logits, const Tensor& ids, const std::optional<Tensor>& mask, const Tensor& lse,
                 const Tensor& dlogp, const std::optional<Tensor>& entropy, const std::optional<Tensor>& dentropy,
                 double temperature) {
  check_writable_logits(logits);
  bwd_into(logits, true, logits, ids, mask, lse, dlogp, entropy, dentropy, temperature);
}

std::tuple<Tensor, Tensor, Tensor> fused_into(const Tensor& grad, bool inplace, const Tensor& logits, const Tensor& ids,
                                              const std::optional<Tensor>& mask, double temperature, const Tensor& coef,
                                              const std::optional<Tensor>& kl_coef,
                                              const std::optional<Tensor>& ref_logps, bool with_entropy,
                                              const std::optional<Tensor>& old_logps,
                                              const std::optional<Tensor>& ratio_lo,
                                              const std::optional<Tensor>& ratio_hi,
                                              const std::optional<Tensor>& entropy_coef, int64_t gate_kind) {
  Prepared p = prepare(logits, ids, mask, temperature);
  Tensor coef_c = token_input("coef", coef, logits, true);
  Tensor kl_c = token_input("kl_coef", kl_coef, logits, false), ref_c = token_input("ref_logps", ref_logps, logits, false);
  TORCH_CHECK(!kl_c.defined() || ref_c.defined(), "frpo_kernels: kl_coef needs ref_logps");
  Tensor old_c = token_input("old_logps", old_logps, logits, false);
  // the gate's bounds in double (frpo::FusedIn)
  Tensor lo_c = token_input("ratio_lo", ratio_lo, logits, false, at::kDouble);
  Tensor hi_c = token_input("ratio_hi", ratio_hi, logits, false, at::kDouble);
  TORCH_CHECK(old_c.defined() == lo_c.defined() && old_c.defined() == hi_c.defined(),
              "frpo_kernels: pass old_logps, ratio_lo and ratio_hi together, or none of them");
  TORCH_CHECK(gate_kind >= frpo::kGateWindow && gate_kind <= frpo::kGateSoft,
              "frpo_kernels: gate_kind must be 0 (window), 1 (capped) or 2 (soft), got ", gate_kind);
  Tensor ent_coef_c = token_input("entropy_coef", entropy_coef, logits, false);
  with_entropy = with_entropy || ent_coef_c.defined();  // the entropy term needs H: it is returned too
  Tensor logp = token_output(logits), lse = lse_output(logits);
  Tensor entropy = with_entropy ? token_output(logits) : at::empty({0}, logits.options().dtype(at::kFloat));
  frpo::FusedIn in{ptr(coef_c), ptr(kl_c), kl_c.defined() ? ptr(ref_c) : nullptr, ptr(old_c), ptr64(lo_c), ptr64(hi_c),
                   ptr(ent_coef_c), static_cast<frpo::GateKind>(gate_kind)};
  frpo::ForwardOut out{logp.data_ptr<float>(), lse.data_ptr<float>(), with_entropy ? entropy.data_ptr<float>() : nullptr};
  const frpo::GradView g = grad_view(grad, inplace);
  at::parallel_for(0, p.rows, grain_rows(p.view.vocab), [&](int64_t r0, int64_t r1) {
    frpo::fused_rows(p.view, p.tok, in, out, g, r0, r1);
  });
  return {logp, lse, entropy};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused(const Tensor& logits, const Tensor& ids,
                                                 const std::optional<Tensor>& mask, double temperature,
                                                 const Tensor& coef, const std::optional<Tensor>& kl_coef,
                                                 const std::optional<Tensor>& ref_logps, bool with_entropy,
                                                 const std::optional<Tensor>& old_logps,
                                                 const std::optional<Tensor>& ratio_lo,
                                                 const std::optional<Tensor>& ratio_hi,
                                                 const std::optional<Tensor>& entropy_coef, int64_t gate_kind) {
  Tensor grad = new_grad(logits);
  auto [logp, lse, entropy] = fused_into(grad, false, logits, ids, mask, temperature, coef, kl_coef, ref_logps,
                                         with_entropy, old_logps, ratio_lo, ratio_hi, entropy_coef, gate_kind);
  return {logp, lse, entropy, grad};
}

std::tuple<Tensor, Tensor, Tensor> fused_inplace(const Tensor& logits, const Tensor& ids,
                                                 const std::optional<Tensor>& mask, double temperature,
                                                 const Tensor& coef, const std::optional<Tensor>& kl_coef,
                                                 const std::optional<Tensor>& ref_logps, bool with_entropy,
                                                 const std::optional<Tensor>& old_logps,
                                                 const std::optional<Tensor>& ratio_lo,
                                                 const std::optional<Tensor>& ratio_hi,
                                                 const std::optional<Tensor>& entropy_coef, int64_t gate_kind) {
  check_writable_logits(logits);
  return fused_into(logits, true, logits, ids, mask, temperature, coef, kl_coef, ref_logps, with_entropy,
                    old_logps, ratio_lo, ratio_hi, entropy_coef, gate_kind);
}

std::string isa() { return frpo::active_isa(); }

// Selects the inner loops ("auto", "avx512", "avx2", "portable"); an unusable name is an error naming the
// choices. Returns the name now running.
std::string set_isa(const std::string& name) {
  const std::string why = frpo::set_isa(name.c_str());
  TORCH_CHECK(why.empty(), "frpo_kernels: ", why);
  return frpo::active_isa();
}

}  // namespace

// Schemas: entropy outputs are empty ([0]) tensors when with_entropy is false (and the fused ops have no
// entropy_coef: with one they compute and return the entropy). The _inplace ops write the gradient into
// `logits` and return nothing for it.
TORCH_LIBRARY(frpo_kernels, m) {
  m.def("token_logprobs_fwd(Tensor logits, Tensor ids, Tensor? mask, float temperature, bool with_entropy)"
        " -> (Tensor logp, Tensor lse, Tensor entropy)");
  m.def("token_logprobs_bwd(Tensor logits, Tensor ids, Tensor? mask, Tensor lse, Tensor dlogp, Tensor? entropy,"
        " Tensor? dentropy, float temperature) -> Tensor");
  m.def("token_logprobs_bwd_inplace(Tensor(a!) logits, Tensor ids, Tensor? mask, Tensor lse, Tensor dlogp,"
        " Tensor? entropy, Tensor? dentropy, float temperature) -> ()");
  m.def("token_logprobs_fused(Tensor logits, Tensor ids, Tensor? mask, float temperature, Tensor coef,"
        " Tensor? kl_coef, Tensor? ref_logps, bool with_entropy, Tensor? old_logps=None, Tensor? ratio_lo=None,"
        " Tensor? ratio_hi=None, Tensor? entropy_coef=None, int gate_kind=0)"
        " -> (Tensor logp, Tensor lse, Tensor entropy, Tensor grad)");
  m.def("token_logprobs_fused_inplace(Tensor(a!) logits, Tensor ids, Tensor? mask, float temperature, Tensor coef,"
        " Tensor? kl_coef, Tensor? ref_logps, bool with_entropy, Tensor? old_logps=None, Tensor? ratio_lo=None,"
        " Tensor? ratio_hi=None, Tensor? entropy_coef=None, int gate_kind=0) -> (Tensor logp, Tensor lse, Tensor entropy)");
  m.def("cpu_isa() -> str", &isa);
  m.def("cpu_set_isa(str name) -> str", &set_isa);
  m.def("cpu_auto_slow_reason() -> str", &frpo::auto_slow_reason);
}

TORCH_LIBRARY_IMPL(frpo_kernels, CPU, m) {
  m.impl("token_logprobs_fwd", &fwd);
  m.impl("token_logprobs_bwd", &bwd);
  m.impl("token_logprobs_bwd_inplace", &bwd_inplace);
  m.impl("token_logprobs_fused", &fused);
  m.impl("token_logprobs_fused_inplace", &fused_inplace);
}

// Importing frpo_kernels._C registers the ops above (static initialisers); the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "frpo_kernels CPU kernels (ops in torch.ops.frpo_kernels)",
                            -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
