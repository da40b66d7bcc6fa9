// C++ tests of the torch-free core against a double-precision scalar reference, for every ISA the
// machine has: dtypes, odd V, row strides, -inf entries, masks, temperature, entropy, in-place, int64 offsets.
#include <sys/mman.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../core/detail.h"
#include "../core/logprob_kernels.h"

using namespace frpo;

static int g_failures = 0;
static char g_case[256] = "";
#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      ++g_failures;                                        \
      if (g_failures < 20) {                               \
        std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
        std::fprintf(stderr, __VA_ARGS__);                 \
        std::fprintf(stderr, " [%s]\n", g_case);          \
      }                                                    \
    }                                                      \
  } while (0)

static const float kInf = std::numeric_limits<float>::infinity();

// Storage of one dtype holding values already rounded to it; value(i) is the exact float it holds.
struct Buffer {
  DType dtype;
  std::vector<float> f32;
  std::vector<uint16_t> u16;
  Buffer(DType d, size_t n) : dtype(d) { if (d == DType::F32) f32.assign(n, 0.f); else u16.assign(n, 0); }
  void* data() { return dtype == DType::F32 ? static_cast<void*>(f32.data()) : static_cast<void*>(u16.data()); }
  void set(size_t i, float v) {
    if (dtype == DType::F32) f32[i] = v;
    else if (dtype == DType::BF16) u16[i] = detail::f32_to_bf16(v);
    else u16[i] = detail::f32_to_f16(v);
  }
  float value(size_t i) const {
    if (dtype == DType::F32) return f32[i];
    return dtype == DType::BF16 ? detail::bf16_to_f32(u16[i]) : detail::f16_to_f32(u16[i]);
  }
};

struct RefRow { double logp, lse, entropy; std::vector<double> p, logp_all; };

static RefRow reference_row(const std::vector<double>& z, int64_t id) {  // z = logits / T
  RefRow r;
  double m = -INFINITY;
  for (double v : z) m = std::max(m, v);
  double s = 0;
  for (double v : z) s += std::exp(v - m);
  r.lse = m + std::log(s);
  r.logp = z[id] - r.lse;
  r.entropy = 0;
  for (double v : z) {
    const double lp = v - r.lse, p = std::exp(lp);
    r.p.push_back(p);
    r.logp_all.push_back(p > 0 ? lp : 0.0);
    r.entropy -= p > 0 ? p * lp : 0.0;
  }
  return r;
}

struct Case {
  DType dtype;
  int64_t batch, length, vocab;
  int64_t pad;          // extra elements between rows (row stride = vocab + pad)
  double ninf_frac;     // fraction of -inf logits
  bool leading_ninf;    // first 5000 logits of row 0 are -inf (a whole chunk of -inf)
  float temperature;
  bool mask, entropy, inplace, streaming, kl;
};

static double tol(DType d) { return d == DType::F32 ? 2e-5 : (d == DType::BF16 ? 1.6e-2 : 2e-3); }

static void run_case(const Case& c, uint32_t seed) {
  std::snprintf(g_case, sizeof g_case, "dtype %d V %lld pad %lld ninf %.1f lead %d T %.1f mask %d ent %d inplace %d stream %d kl %d seed %u",
                int(c.dtype), (long long)c.vocab, (long long)c.pad, c.ninf_frac, c.leading_ninf, c.temperature, c.mask,
                c.entropy, c.inplace, c.streaming, c.kl, seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 3.f);
  std::uniform_real_distribution<double> unif(0, 1);
  const int64_t rows = c.batch * c.length, stride_t = c.vocab + c.pad, stride_b = stride_t * c.length + 3;
  const size_t total = size_t(stride_b * c.batch);
  Buffer logits(c.dtype, total);
  for (size_t i = 0; i < total; ++i) logits.set(i, normal(rng));
  std::vector<int64_t> ids(rows);
  std::vector<uint8_t> maskv(rows, 1);
  for (int64_t r = 0; r < rows; ++r) {
    ids[r] = int64_t(unif(rng) * c.vocab) % c.vocab;
    const int64_t off = (r / c.length) * stride_b + (r % c.length) * stride_t;
    for (int64_t v = 0; v < c.vocab; ++v)
      if (v != ids[r] && unif(rng) < c.ninf_frac) logits.set(off + v, -kInf);
    if (r == 0 && c.leading_ninf)
      for (int64_t v = 0; v < std::min<int64_t>(5000, c.vocab); ++v) if (v != ids[r]) logits.set(off + v, -kInf);
    if (c.mask && r % 3 == 1) {
      maskv[r] = 0;
      if (r == 1) for (int64_t v = 0; v < c.vocab; ++v) logits.set(off + v, -kInf);  // masked all -inf row
      if (r == 4) ids[r] = 0;
    }
  }
  std::vector<bool> dummy;
  bool* mask_ptr = nullptr;
  std::vector<char> mask_bytes(rows);
  for (int64_t r = 0; r < rows; ++r) mask_bytes[r] = maskv[r];
  if (c.mask) mask_ptr = reinterpret_cast<bool*>(mask_bytes.data());

  LogitsView L{logits.data(), c.dtype, c.batch, c.length, c.vocab, stride_b, stride_t};
  TokenInputs tok{ids.data(), mask_ptr, 1.f / c.temperature};
  std::vector<float> logp(rows, 7.f), ent(rows, 7.f);
  std::vector<float> lse(2 * rows, 7.f);  // hi, lo per row
  ForwardOut fo{logp.data(), lse.data(), c.entropy ? ent.data() : nullptr};

  // expected values, from the exact stored inputs
  std::vector<RefRow> ref(rows);
  for (int64_t r = 0; r < rows; ++r) {
    if (!maskv[r]) continue;
    const int64_t off = (r / c.length) * stride_b + (r % c.length) * stride_t;
    std::vector<double> z(c.vocab);
    for (int64_t v = 0; v < c.vocab; ++v) z[v] = double(logits.value(off + v) * tok.inv_temperature);
    ref[r] = reference_row(z, ids[r]);
  }
  std::vector<float> coef(rows), kl(rows), refl(rows), dlogp(rows), dent(rows), old(rows);
  std::vector<double> lo(rows), hi(rows);  // the gate's bounds are double (FusedIn)
  for (int64_t r = 0; r < rows; ++r) {
    coef[r] = float(unif(rng) - 0.5);
    kl[r] = float(unif(rng));
    refl[r] = maskv[r] ? float(ref[r].logp + 0.3 * (unif(rng) - 0.5)) : 0.f;
    dlogp[r] = float(unif(rng) - 0.5);
    dent[r] = float(unif(rng) - 0.5);
    // an importance ratio exp(logp - old) within e^+-0.4 of 1, against bounds that gate about half the rows
    old[r] = maskv[r] ? float(ref[r].logp + 0.8 * (unif(rng) - 0.5)) : 0.f;
    lo[r] = r % 4 == 0 ? -kInf : -0.2 * unif(rng);
    hi[r] = r % 4 == 1 ? kInf : 0.2 * unif(rng);
  }

  // fused (or backward) gradient target
  Buffer gbuf(c.dtype, c.inplace ? 0 : size_t(rows * c.vocab));
  GradView G{c.inplace ? logits.data() : gbuf.data(), c.inplace ? stride_b : c.length * c.vocab,
             c.inplace ? stride_t : c.vocab, c.streaming};
  auto gval = [&](int64_t r, int64_t v) {
    const int64_t off = (r / c.length) * G.stride_b + (r % c.length) * G.stride_t + v;
    return c.inplace ? logits.value(off) : gbuf.value(off);
  };
  const double t = tol(c.dtype);
  const bool fused = c.kl || (seed % 2 == 0);
  const bool gated = fused && seed % 3 == 0;  // the clipped-ratio gate (old_logps given)
  // the fused entropy term (entropy_coef = dent), now and then without the entropy output
  const bool fused_ent = fused && c.entropy && seed % 5 != 0;
  if (fused_ent && seed % 7 == 3) fo.entropy = nullptr;
  if (fused) {
    FusedIn fi{coef.data(), c.kl ? kl.data() : nullptr, c.kl ? refl.data() : nullptr};
    if (gated) fi.old_logps = old.data(), fi.ratio_lo = lo.data(), fi.ratio_hi = hi.data();
    if (fused_ent) fi.entropy_coef = dent.data();
    fused_rows(L, tok, fi, fo, G, 0, rows);
  } else {
    forward_rows(L, tok, fo, 0, rows);
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (!maskv[r]) {
      CHECK(logp[r] == 0.f && lse[2 * r] == 0.f && lse[2 * r + 1] == 0.f && (!fo.entropy || ent[r] == 0.f), "masked row %lld not zero", (long long)r);
      continue;
    }
    const double scale = std::max(1.0, std::fabs(ref[r].lse));
    CHECK(std::fabs(logp[r] - ref[r].logp) <= 2e-6 * scale + 2e-6 * std::fabs(ref[r].logp),
          "logp row %lld: %.9g vs %.9g", (long long)r, logp[r], ref[r].logp);
    const double lse_r = double(lse[2 * r]) + lse[2 * r + 1];
    CHECK(std::fabs(lse_r - ref[r].lse) <= 2e-6 * scale, "lse row %lld: %.9g vs %.9g", (long long)r, lse_r, ref[r].lse);
    if (fo.entropy)
      CHECK(std::fabs(ent[r] - ref[r].entropy) <= 1e-5 * std::max(1.0, ref[r].entropy), "entropy row %lld: %.9g vs %.9g",
            (long long)r, ent[r], ref[r].entropy);
  }
  if (!fused) {  // the two-phase path: backward from the forward's lse
    BackwardIn bi{lse.data(), dlogp.data(), c.entropy ? ent.data() : nullptr, c.entropy ? dent.data() : nullptr};
    backward_rows(L, tok, bi, G, 0, rows);
  }
  for (int64_t r = 0; r < rows; ++r) {
    double dl = fused ? coef[r] : dlogp[r];
    if (gated && maskv[r]) {
      const double log_ratio = double(logp[r]) - double(old[r]);
      dl = log_ratio >= lo[r] && log_ratio <= hi[r] ? dl * std::exp(log_ratio) : 0.0;
    }
    if (fused && c.kl && maskv[r]) dl += kl[r] * (1.0 - std::exp(double(refl[r]) - double(logp[r])));
    const bool with_ent = fused ? fused_ent : c.entropy;
    // gradient scale: |dlogp|/T (the largest a gradient entry can be, and the size of fp32 rounding in 1 - p)
    double gmax = std::fabs(dl) / c.temperature + (with_ent ? std::fabs(dent[r]) / c.temperature : 0.0);
    std::vector<double> want(c.vocab, 0.0);
    if (maskv[r]) {
      for (int64_t v = 0; v < c.vocab; ++v) {
        const double p = ref[r].p[v];
        double gv = dl * ((v == ids[r]) - p);
        if (with_ent) gv -= dent[r] * p * (ref[r].logp_all[v] + ref[r].entropy);
        want[v] = gv / c.temperature;
        gmax = std::max(gmax, std::fabs(want[v]));
      }
    }
    for (int64_t v = 0; v < c.vocab; ++v) {
      const double got = gval(r, v);
      // fp16 outputs below 2^-14 are subnormal: absolute spacing 2^-24
      const double atol = c.dtype == DType::F16 ? 5.97e-8 : 1e-30;
      // with the entropy term: plus |dentropy| * p * the entropy's own tolerance (checked above)
      const double ent_err = with_ent && maskv[r] ? std::fabs(dent[r]) * ref[r].p[v] * 1e-5 * std::max(1.0, ref[r].entropy) : 0.0;
      CHECK(std::fabs(got - want[v]) <= t * std::fabs(want[v]) + 1e-6 * gmax + ent_err + atol,
            "grad row %lld v %lld: %.9g vs %.9g (isa %s, dtype %d)", (long long)r, (long long)v, got, want[v],
            active_isa(), int(c.dtype));
      if (!maskv[r]) CHECK(got == 0.0, "masked grad row %lld not zero", (long long)r);
    }
  }
  if (!c.inplace) {  // padding between rows untouched (only checkable when not in place)
  } else {
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t tt = 0; tt < c.length; ++tt)
        for (int64_t v = c.vocab; v < stride_t; ++v) {
          (void)v;  // padding values are random; they must simply not be NaN (never written)
          CHECK(!std::isnan(logits.value(b * stride_b + tt * stride_t + v)), "padding written");
        }
  }
}

// Rows more than 2^31 elements apart, in a sparse mapping: offsets must be computed in int64.
static void run_large_offset_case() {
  const int64_t vocab = 1000, stride_b = (int64_t(1) << 31) + 512;
  const size_t bytes = size_t(stride_b + vocab) * 2;
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) { std::printf("skip large-offset case (mmap failed)\n"); return; }
  auto* x = static_cast<uint16_t*>(mem);
  for (int64_t v = 0; v < vocab; ++v) {
    x[v] = detail::f32_to_bf16(0.01f * float(v));
    x[stride_b + v] = detail::f32_to_bf16(-0.02f * float(v));
  }
  int64_t ids[2] = {3, 999};
  float logp[2];
  float lse[4];
  std::vector<uint16_t> g(2 * vocab);
  LogitsView L{x, DType::BF16, 2, 1, vocab, stride_b, vocab};
  TokenInputs tok{ids, nullptr, 1.f};
  fused_rows(L, tok, FusedIn{nullptr, nullptr, nullptr}, ForwardOut{logp, lse, nullptr},
             GradView{g.data(), vocab, vocab, false}, 0, 0);  // empty range is a no-op
  float coef[2] = {1.f, -1.f};
  fused_rows(L, tok, FusedIn{coef, nullptr, nullptr}, ForwardOut{logp, lse, nullptr},
             GradView{g.data(), vocab, vocab, false}, 0, 2);
  for (int b = 0; b < 2; ++b) {
    std::vector<double> z(vocab);
    for (int64_t v = 0; v < vocab; ++v) z[v] = detail::bf16_to_f32(x[b * stride_b + v]);
    const RefRow ref = reference_row(z, ids[b]);
    CHECK(std::fabs(logp[b] - ref.logp) < 1e-5, "large offset logp %d: %g vs %g", b, logp[b], ref.logp);
  }
  munmap(mem, bytes);
}

static void run_conversion_checks() {
  // fp16/bf16 round-trips and rounding of halfway cases
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = detail::f16_to_f32(uint16_t(h));
    if (!std::isnan(f)) CHECK(detail::f32_to_f16(f) == h, "f16 round trip %x", h);
    const float b = detail::bf16_to_f32(uint16_t(h));
    if (!std::isnan(b)) CHECK(detail::f32_to_bf16(b) == h, "bf16 round trip %x", h);
  }
  // fp32 -> fp16 / bf16 of values between the representable ones: the nearest, ties to even, checked
  // against the neighbours (independent of how the conversion is written: bits on x86, fcvt on aarch64)
  for (uint64_t u = 0; u < 0x100000000ull; u += 0x3F1Bull) {
    const float f = detail::bits_float(uint32_t(u));
    if (std::isnan(f)) {
      CHECK(std::isnan(detail::f16_to_f32(detail::f32_to_f16(f))), "f16 NaN %08x", uint32_t(u));
      CHECK(std::isnan(detail::bf16_to_f32(detail::f32_to_bf16(f))), "bf16 NaN %08x", uint32_t(u));
      continue;
    }
    const double a = std::fabs(double(f));
    for (int kind = 0; kind < 2; ++kind) {  // 0: fp16, 1: bf16
      const uint16_t h = kind ? detail::f32_to_bf16(f) : detail::f32_to_f16(f);
      auto val = [&](uint32_t m) { return std::fabs(double(kind ? detail::bf16_to_f32(uint16_t(m)) : detail::f16_to_f32(uint16_t(m)))); };
      const uint32_t mag = h & 0x7FFFu, inf_bits = kind ? 0x7F80u : 0x7C00u;
      CHECK(((h & 0x8000u) != 0) == std::signbit(f), "%s sign of %08x", kind ? "bf16" : "f16", uint32_t(u));
      if (mag == inf_bits) {  // overflow: f at least halfway past the largest finite value
        const double top = val(inf_bits - 1), half = top + (top - val(inf_bits - 2)) / 2;
        CHECK(a >= half, "%s inf for %g", kind ? "bf16" : "f16", f);
        continue;
      }
      const double got = val(mag), below = mag ? val(mag - 1) : -1.0, above = val(mag + 1);
      const double err = std::fabs(got - a);
      CHECK(err <= std::fabs(above - a) && (mag == 0 || err <= std::fabs(below - a)), "%s not nearest for %g (%04x)",
            kind ? "bf16" : "f16", f, h);
      const bool tie = err == std::fabs(above - a) || (mag && err == std::fabs(below - a));
      CHECK(!tie || err == 0.0 || (mag & 1u) == 0, "%s tie not even for %g (%04x)", kind ? "bf16" : "f16", f, h);
    }
  }
  CHECK(detail::f32_to_bf16(1.00390625f) == 0x3F80, "bf16 ties to even");   // 1 + 2^-8: halfway, even down
  CHECK(detail::f32_to_f16(65520.f) == 0x7C00, "f16 overflow to inf");
  CHECK(detail::f32_to_f16(5.96046448e-8f) == 0x0001, "f16 smallest subnormal");
  // polynomial exp: relative error and exact zero at the low clamp. The degree-5 polynomial is good to
  // 1.7e-7; the one-constant reduction x - n*ln2 adds |n| * 1.9e-9, which matters only far from 0
  // (exp(x) < 1e-13 or > 1e13), so the bound is tight where the sums and gradients live and looser outside.
  double worst = 0, worst_near = 0;
  for (float x = -87.f; x <= 88.f; x += 0.00731f) {
    const double e = detail::exp_poly(x), want = std::exp(double(x));
    const double rel = std::fabs(e - want) / want;
    worst = std::max(worst, rel);
    if (x >= -30.f && x <= 1.f) worst_near = std::max(worst_near, rel);
  }
  CHECK(worst_near < 2.5e-7, "exp_poly rel error on [-30, 1] %g", worst_near);
  CHECK(worst < 4.5e-7, "exp_poly rel error on [-87, 88] %g", worst);
  CHECK(detail::exp_poly(detail::clamp_exp_arg(-kInf)) == 0.f, "exp(-inf) must be 0");
}

// NaN / +inf as torch gives them (tests/test_cpu_nan.py checks every pattern against torch_reference.py): a NaN
// anywhere makes logp, lse, entropy and the whole gradient row NaN; a +inf gives lse = +inf, logp = NaN.
static void run_nonfinite_checks() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (DType d : {DType::F32, DType::BF16, DType::F16})
    for (int64_t vocab : {13, 4141}) {
      for (int64_t pos : {int64_t(0), vocab / 2, vocab - 3, vocab - 1}) {
        for (float bad : {nan, kInf}) {
          std::snprintf(g_case, sizeof g_case, "nonfinite dtype %d V %lld pos %lld value %g isa %s", int(d),
                        (long long)vocab, (long long)pos, bad, active_isa());
          Buffer x(d, size_t(vocab)), g(d, size_t(vocab));
          for (int64_t v = 0; v < vocab; ++v) x.set(size_t(v), 0.01f * float(v % 97));
          x.set(size_t(pos), bad);
          int64_t id = 1;
          float logp = 0, ent = 0, coef = 0.5f;
        float lse[2] = {0.f, 0.f};
          LogitsView L{x.data(), d, 1, 1, vocab, vocab, vocab};
          TokenInputs tok{&id, nullptr, 1.f};
          fused_rows(L, tok, FusedIn{&coef, nullptr, nullptr}, ForwardOut{&logp, lse, &ent}, GradView{g.data(), vocab, vocab, false}, 0, 1);
          // with the entropy term (H is NaN) every gradient entry is NaN, as torch's p * (log p + H)
          float ecoef = 0.25f;
          FusedIn with_ent{&coef, nullptr, nullptr};
          with_ent.entropy_coef = &ecoef;
          Buffer g2(d, size_t(vocab));
          fused_rows(L, tok, with_ent, ForwardOut{&logp, lse, nullptr}, GradView{g2.data(), vocab, vocab, false}, 0, 1);
          for (int64_t v = 0; v < vocab; ++v) CHECK(std::isnan(g2.value(size_t(v))), "entropy grad %lld not NaN", (long long)v);
          const bool is_nan = bad != bad;
          CHECK(std::isnan(logp) && std::isnan(ent), "logp %g entropy %g must be NaN", logp, ent);
          CHECK((is_nan ? std::isnan(lse[0]) : lse[0] == kInf) && lse[1] == 0.f, "lse %g %g", lse[0], lse[1]);
          for (int64_t v = 0; v < vocab; ++v) {
            const double gv = g.value(size_t(v));
            // +inf row: p = 0 except at the +inf entry (inf - inf = NaN); the target keeps coef*(1 - 0)
            const bool want_nan = is_nan || v == pos;
            CHECK(want_nan ? std::isnan(gv) : gv == (v == id ? 0.5 : 0.0),
                  "grad %lld: %g", (long long)v, gv);
          }
        }
      }
    }
}

// A logit far above the max of the chunks before it: summed against that stale max, its chunk must be
// redone against its own max (Row::forward); below the redo threshold it is kept. Spikes on both sides
// of the threshold (~44) and of the exp clamp (88), fused and forward, with the target on the spike or not.
static void run_stale_max_checks() {
  for (DType d : {DType::F32, DType::BF16, DType::F16})
    for (float spike : {10.f, 43.f, 45.f, 60.f, 87.f, 89.f, 120.f, 1000.f})
      for (int64_t id : {int64_t(7), int64_t(6001)}) {
        std::snprintf(g_case, sizeof g_case, "stale max dtype %d spike %g id %lld isa %s", int(d), spike, (long long)id,
                      active_isa());
        const int64_t vocab = 9001;  // 5 chunks: the spike sits in the 4th
        Buffer x(d, size_t(vocab)), g(d, size_t(vocab));
        for (int64_t v = 0; v < vocab; ++v) x.set(size_t(v), 0.37f * float((v * 7919) % 23) - 4.f);
        x.set(6001, spike);
        std::vector<double> z(vocab);
        for (int64_t v = 0; v < vocab; ++v) z[v] = x.value(size_t(v));
        const RefRow ref = reference_row(z, id);
        float logp = 0, ent = 0, coef = 0.5f;
        float lse[2] = {0.f, 0.f};
        LogitsView L{x.data(), d, 1, 1, vocab, vocab, vocab};
        TokenInputs tok{&id, nullptr, 1.f};
        fused_rows(L, tok, FusedIn{&coef, nullptr, nullptr}, ForwardOut{&logp, lse, &ent}, GradView{g.data(), vocab, vocab, false}, 0, 1);
        const double scale = std::max(1.0, std::fabs(ref.lse));
        CHECK(std::fabs(double(lse[0]) + lse[1] - ref.lse) <= 2e-6 * scale, "lse %.9g + %.9g vs %.9g", lse[0], lse[1],
              ref.lse);
        CHECK(std::fabs(logp - ref.logp) <= 2e-6 * scale + 2e-6 * std::fabs(ref.logp), "logp %.9g vs %.9g", logp, ref.logp);
        CHECK(std::fabs(ent - ref.entropy) <= 1e-5 * std::max(1.0, ref.entropy), "entropy %.9g vs %.9g", ent, ref.entropy);
        for (int64_t v = 0; v < vocab; ++v) {
          const double want = 0.5 * ((v == id) - ref.p[v]);
          // the target's 1 - p carries the sum's own error: a chunk kept after summing against a stale max
          // has exps up to e^44, which the portable exp without FMA gets to 2.6e-6 relative (detail.h)
          const double sum_err = v == id ? 3e-6 * 0.5 : 0.0;
          CHECK(std::fabs(g.value(size_t(v)) - want) <=
                    tol(d) * std::fabs(want) + 1e-6 * 0.5 + sum_err + (d == DType::F16 ? 6e-8 : 0.0),
                "grad %lld: %.9g vs %.9g", (long long)v, g.value(size_t(v)), want);
        }
        // the entropy term on the same row: chunk maxima redone or kept, each chunk's exps rescaled
        float ecoef = -0.75f;
        FusedIn with_ent{&coef, nullptr, nullptr};
        with_ent.entropy_coef = &ecoef;
        float logp_e = 0;
        float lse_e[2];
        fused_rows(L, tok, with_ent, ForwardOut{&logp_e, lse_e, nullptr}, GradView{g.data(), vocab, vocab, false}, 0, 1);
        double gmax = 0.5;
        std::vector<double> want_ent(vocab);
        for (int64_t v = 0; v < vocab; ++v) {
          want_ent[v] = 0.5 * ((v == id) - ref.p[v]) - ecoef * ref.p[v] * (ref.logp_all[v] + ref.entropy);
          gmax = std::max(gmax, std::fabs(want_ent[v]));
        }
        // the entropy's own error (up to 1e-5 nats, checked above: a spike summed against a stale max rounds
        // its e * d terms at |d| ~ 40) enters each entry as |entropy_coef| * p * error
        const double ent_err = 1e-5 * std::max(1.0, ref.entropy) * std::fabs(ecoef);
        for (int64_t v = 0; v < vocab; ++v)
          CHECK(std::fabs(g.value(size_t(v)) - want_ent[v]) <= tol(d) * std::fabs(want_ent[v]) + 1e-6 * gmax +
                    ent_err * ref.p[v] + (d == DType::F16 ? 6e-8 : 0.0),
                "entropy grad %lld: %.9g vs %.9g", (long long)v, g.value(size_t(v)), want_ent[v]);
        float logp2 = 0;
        float lse2[2];
        forward_rows(L, tok, ForwardOut{&logp2, lse2, nullptr}, 0, 1);
        CHECK(logp2 == logp && lse2[0] == lse[0] && lse2[1] == lse[1], "forward %.9g %.9g vs fused %.9g %.9g", logp2,
              lse2[0], logp, lse[0]);
      }
}

// Whether the avx512 path must run here, found independently of the core's own detection.
static bool expect_avx512() {
#if defined(FRPO_AVX512_SIMDE)
  return true;  // the AVX-512 file built on SIMDe (tests/test_csrc_avx512_simde.py)
#elif defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

static void run_isa_choice_checks() {
  CHECK(set_isa("auto").empty(), "auto must always be accepted");
  const std::string best = active_isa();
  if (expect_avx512()) CHECK(best == "avx512", "auto chose %s on a CPU with AVX-512", best.c_str());
  const std::string typo = set_isa("avx3");
  CHECK(typo.find("not one of: auto, avx512, avx2, portable") != std::string::npos, "unknown isa: %s", typo.c_str());
  CHECK(active_isa() == best, "a rejected name must not change the choice");
  const std::string avx512 = set_isa("avx512");
  if (expect_avx512()) {
    CHECK(avx512.empty() && std::string(active_isa()) == "avx512", "avx512: %s", avx512.c_str());
  } else {
    CHECK(avx512.find("needs an x86-64 CPU with AVX-512") != std::string::npos && active_isa() == best, "avx512: %s",
          avx512.c_str());
  }
  CHECK(set_isa("portable").empty() && std::string(active_isa()) == "portable", "portable must always run");
  CHECK(auto_slow_reason().empty(), "an optimised build must vectorise the portable loops: %s", auto_slow_reason().c_str());
  set_isa("auto");
}

int main() {
  run_conversion_checks();
  run_isa_choice_checks();
  const char* isas[] = {"portable", "avx2", "avx512"};
  uint32_t seed = 1;
  for (const char* isa : isas) {
    const std::string why = set_isa(isa);
    if (!why.empty()) {
      std::printf("isa %s not available here (%s), skipped\n", isa, why.c_str());
      continue;
    }
    CHECK(std::string(active_isa()) == isa, "set_isa(%s) runs %s", isa, active_isa());
    run_nonfinite_checks();
    run_stale_max_checks();
    for (DType d : {DType::F32, DType::BF16, DType::F16})
      for (int64_t vocab : {1, 7, 33, 257, 4097, 9001})
        for (int variant = 0; variant < 4; ++variant) {
          Case c{d, 2, 3, vocab, variant % 2 ? 5 : 0, variant >= 2 ? 0.3 : 0.0, variant == 3, variant == 1 ? 0.7f : 1.f,
                 variant >= 1, variant % 2 == 0, variant == 2, variant != 1, variant == 3};
          run_case(c, seed++);
          run_case(c, seed++);
        }
    run_large_offset_case();
    std::printf("isa %s: done\n", isa);
  }
  if (g_failures) { std::printf("%d failures\n", g_failures); return 1; }
  std::printf("all passed\n");
  return 0;
}
