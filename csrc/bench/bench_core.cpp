// Microbenchmark of the torch-free core (OpenMP over rows, one contiguous block per thread): the memcpy
// floor vs forward / fused (new gradient buffer) / fused with the entropy term (entropy_coef) / fused in
// place / backward. Each round runs all of
// them in turn, the copy included (interleaved, so slow phases of a shared machine hit every kernel
// alike); the best round of each is reported.
// Floors in units of one copy (read + write of the logits): forward 0.5 (read once), fused 1.0 (read
// once + write once), two-phase forward + backward 1.5 (read twice + write once). Also timed: a
// read-only sweep (a vectorised sum of the logits' bytes, no other work), the speed reading alone
// reaches here, next to the forward (on the 2-core VM this was written on it took 1.35-1.45x half a copy).
// Usage: [FRPO_CPU_ISA=auto|avx512|avx2|portable] bench_core [rows] [vocab] [f32|bf16|f16] [stream 0/1] [rounds]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../core/detail.h"
#include "../core/logprob_kernels.h"

using namespace frpo;

// The read-only sweep: integer sums of n 8-byte words into 8 independent lanes (1-cycle adds, so the
// loads, not an add chain, set the pace; vectorised at -O3).
static uint64_t read_sweep(const uint64_t* x, int64_t n) {
  uint64_t lane[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += x[i + j];
  uint64_t s = 0;
  for (; i < n; ++i) s += x[i];
  for (int j = 0; j < 8; ++j) s += lane[j];
  return s;
}

template <class F>
static double seconds(F f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

static std::string cpu_model() {
  std::FILE* f = std::fopen("/proc/cpuinfo", "r");
  if (!f) return "unknown CPU";
  char line[512];
  std::string model = "unknown CPU";
  while (std::fgets(line, sizeof line, f)) {
    const std::string l = line;
    if (l.rfind("model name", 0) == 0 && l.find(':') != std::string::npos) {
      model = l.substr(l.find(':') + 2);
      if (!model.empty() && model.back() == '\n') model.pop_back();
      break;
    }
  }
  std::fclose(f);
  return model;
}

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? std::atoll(argv[1]) : 2048, vocab = argc > 2 ? std::atoll(argv[2]) : 49152;
  const std::string dt = argc > 3 ? argv[3] : "f32";
  const bool stream = argc > 4 ? std::atoi(argv[4]) != 0 : true;
  const int reps = argc > 5 ? std::atoi(argv[5]) : 7;
  if (const char* isa = std::getenv("FRPO_CPU_ISA")) {
    const std::string why = set_isa(*isa ? isa : "auto");
    if (!why.empty()) {
      std::fprintf(stderr, "FRPO_CPU_ISA=%s: %s\n", isa, why.c_str());
      return 2;
    }
  }
  const DType dtype = dt == "bf16" ? DType::BF16 : dt == "f16" ? DType::F16 : DType::F32;
  const size_t esize = dtype == DType::F32 ? 4 : 2, n = size_t(rows * vocab), bytes = n * esize;
  char* x = static_cast<char*>(std::aligned_alloc(64, bytes));
  char* g = static_cast<char*>(std::aligned_alloc(64, bytes));
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 2.f);
#pragma omp parallel for
  for (int64_t i = 0; i < int64_t(n); ++i) {
    const float v = float((i * 2654435761u) % 1000) * 0.004f - 2.f;
    if (dtype == DType::F32) reinterpret_cast<float*>(x)[i] = v;
    else if (dtype == DType::BF16) reinterpret_cast<uint16_t*>(x)[i] = detail::f32_to_bf16(v);
    else reinterpret_cast<uint16_t*>(x)[i] = detail::f32_to_f16(v);
  }
  std::memset(g, 0, bytes);
  std::vector<int64_t> ids(rows);
  std::vector<float> logp(rows), ent(rows), coef(rows, 0.1f), ecoef(rows, -0.01f);
  std::vector<float> lse(2 * rows);
  for (auto& id : ids) id = int64_t(rng() % vocab);
  LogitsView L{x, dtype, 1, rows, vocab, rows * vocab, vocab};
  TokenInputs tok{ids.data(), nullptr, 1.f};
  GradView G{g, rows * vocab, vocab, stream};
  ForwardOut fo{logp.data(), lse.data(), nullptr};
  auto par = [&](auto fn) {
#pragma omp parallel
    {
      const int nt = omp_get_num_threads(), t = omp_get_thread_num();
      const int64_t r0 = rows * t / nt, r1 = rows * (t + 1) / nt;
      fn(r0, r1);
    }
  };
  auto copy = [&] {
    par([&](int64_t r0, int64_t r1) { std::memcpy(g + r0 * vocab * esize, x + r0 * vocab * esize, size_t(r1 - r0) * vocab * esize); });
  };
  LogitsView Li = L;  // in place: the gradient overwrites a copy of the logits (refreshed, untimed, first)
  Li.data = g;
  GradView Gi{g, rows * vocab, vocab, false};
  double tc = 1e30, tf = 1e30, tfu = 1e30, tfe = 1e30, tb = 1e30, tip = 1e30, tr = 1e30;
  FusedIn fe{coef.data(), nullptr, nullptr};
  fe.entropy_coef = ecoef.data();
  const ForwardOut foe{logp.data(), lse.data(), ent.data()};
  volatile uint64_t sink = 0;
  for (int i = 0; i < reps; ++i) {
    tc = std::min(tc, seconds(copy));
    tr = std::min(tr, seconds([&] {
      uint64_t total = 0;
#pragma omp parallel reduction(+ : total)
      {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t words = int64_t(bytes / 8), w0 = words * t / nt, w1 = words * (t + 1) / nt;
        total += read_sweep(reinterpret_cast<const uint64_t*>(x) + w0, w1 - w0);
      }
      sink = total;
    }));
    tf = std::min(tf, seconds([&] { par([&](int64_t r0, int64_t r1) { forward_rows(L, tok, fo, r0, r1); }); }));
    tfu = std::min(tfu, seconds([&] { par([&](int64_t r0, int64_t r1) { fused_rows(L, tok, FusedIn{coef.data(), nullptr, nullptr}, fo, G, r0, r1); }); }));
    tfe = std::min(tfe, seconds([&] { par([&](int64_t r0, int64_t r1) { fused_rows(L, tok, fe, foe, G, r0, r1); }); }));
    tb = std::min(tb, seconds([&] { par([&](int64_t r0, int64_t r1) { backward_rows(L, tok, BackwardIn{lse.data(), coef.data(), nullptr, nullptr}, G, r0, r1); }); }));
    copy();
    tip = std::min(tip, seconds([&] { par([&](int64_t r0, int64_t r1) { fused_rows(Li, tok, FusedIn{coef.data(), nullptr, nullptr}, fo, Gi, r0, r1); }); }));
  }
  std::printf("%s %lldx%lld %s stream=%d threads=%d rounds=%d: copy %.3f ms (%.1f GB/s r+w) | time/floor: fwd %.3f ms %.2fx | "
              "fused %.3f ms %.2fx | fused_inplace %.3f ms %.2fx | fwd+bwd %.3f ms %.2fx (bwd alone %.3f ms)\n",
              active_isa(), (long long)rows, (long long)vocab, dt.c_str(), stream, omp_get_max_threads(), reps, tc * 1e3,
              2 * bytes / tc / 1e9, tf * 1e3, tf / (0.5 * tc), tfu * 1e3, tfu / tc, tip * 1e3, tip / tc,
              (tf + tb) * 1e3, (tf + tb) / (1.5 * tc), tb * 1e3);
  const double ns = 1e9 / double(n);  // per logit, all threads together
  std::printf("  ns/logit: copy %.3f  fwd %.3f  fused %.3f  fused_inplace %.3f  bwd %.3f  read %.3f\n", tc * ns, tf * ns,
              tfu * ns, tip * ns, tb * ns, tr * ns);
  std::printf("  fused with entropy_coef %.3f ms %.2fx (%.3f ns/logit) = %.2fx fused without\n", tfe * 1e3, tfe / tc,
              tfe * ns, tfe / tfu);
  std::printf("  read-only sweep %.3f ms (%.1f GB/s) = %.2fx half a copy; forward / read-only sweep %.2fx\n", tr * 1e3,
              bytes / tr / 1e9, tr / (0.5 * tc), tf / tr);
  std::printf("  cpu: %s\n", cpu_model().c_str());
  std::free(x);
  std::free(g);
  return 0;
}
