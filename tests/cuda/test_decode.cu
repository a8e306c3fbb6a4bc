// The fused decode-step kernels (deltakv/gpu/decode_step.hpp) against naive float64 references
// written here from the method's definition: dense attention with RoPE, the OmniKV selection, and
// sparse attention over a compressed layer (x = f_d(z) + mean of references). Outputs are
// poisoned (0xFF bytes: NaN) before every launch.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "cuda_test_util.cuh"
#include "deltakv/gpu/decode_step.hpp"

namespace {

using namespace deltakv;
using namespace dkt_cuda;
namespace dec = deltakv::gpu::decode;
using bf = deltakv::cuda::bf16;

template <class T>
std::vector<double> f64(const std::vector<T>& v) {
  std::vector<double> o(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) o[i] = vendor::to_float(v[i]);
  return o;
}

// bf16 values drawn uniformly in [lo, hi), and their exact f64 values.
struct Bf16Data {
  std::vector<bf> b;
  std::vector<double> d;
};
Bf16Data random_bf16(std::size_t n, std::uint32_t seed, float lo, float hi) {
  Bf16Data r;
  r.b = to_bf16(uniform(n, seed, lo, hi));
  r.d = f64(r.b);
  return r;
}
// The same for 16-bit storage T (bf16 or f16): values rounded to T, and their exact f64 values.
template <class T>
struct Data16 {
  std::vector<T> b;
  std::vector<double> d;
};
template <class T>
Data16<T> random_16(std::size_t n, std::uint32_t seed, float lo, float hi) {
  Data16<T> r;
  const auto u = uniform(n, seed, lo, hi);
  r.b.resize(n);
  for (std::size_t i = 0; i < n; ++i) r.b[i] = vendor::from_float<T>(u[i]);
  r.d = f64(r.b);
  return r;
}

// RoPE of one head (f64), the CPU oracle's convention: pairs (f, f + D/2) or (2f, 2f + 1).
void rope_head(double* x, int D, std::int64_t pos, RopeStyle style, double theta) {
  if (style == RopeStyle::none) return;
  const int half = D / 2;
  for (int f = 0; f < half; ++f) {
    const double a = double(pos) * std::pow(theta, -2.0 * f / D);
    const int i = style == RopeStyle::half ? f : 2 * f, j = style == RopeStyle::half ? f + half : 2 * f + 1;
    const double x1 = x[i], x2 = x[j];
    x[i] = x1 * std::cos(a) - x2 * std::sin(a);
    x[j] = x2 * std::cos(a) + x1 * std::sin(a);
  }
}

struct Shape {
  int Hq, Hkv, D;
  RopeStyle style;
};

// Naive decode attention for one sequence over rows x[p] (p in `pos`), post-RoPE q (f64).
// Returns out [Hq*D]; logits [Hq][pos.size()] (scaled) and lse [Hq] on request.
std::vector<double> naive_attend(const Shape& s, const double* q, const std::vector<std::vector<double>>& rows,
                                 const std::vector<std::int64_t>& pos, double theta, double scale,
                                 std::vector<double>* logits = nullptr, std::vector<double>* lse = nullptr) {
  const int G = s.Hq / s.Hkv, D = s.D;
  std::vector<double> out(std::size_t(s.Hq) * D, 0.0);
  if (logits) logits->assign(std::size_t(s.Hq) * pos.size(), 0.0);
  if (lse) lse->assign(s.Hq, -INFINITY);
  for (int h = 0; h < s.Hkv; ++h) {
    std::vector<std::vector<double>> K(pos.size());
    for (std::size_t t = 0; t < pos.size(); ++t) {
      K[t].assign(rows[t].begin() + h * D, rows[t].begin() + (h + 1) * D);
      rope_head(K[t].data(), D, pos[t], s.style, theta);
    }
    for (int g = 0; g < G; ++g) {
      const int hq = h * G + g;
      std::vector<double> sc(pos.size());
      double m = -INFINITY;
      for (std::size_t t = 0; t < pos.size(); ++t) {
        double d = 0;
        for (int e = 0; e < D; ++e) d += q[hq * D + e] * K[t][e];
        sc[t] = d * scale;
        m = std::max(m, sc[t]);
        if (logits) (*logits)[hq * pos.size() + t] = sc[t];
      }
      if (pos.empty()) continue;
      double l = 0;
      for (std::size_t t = 0; t < pos.size(); ++t) {
        const double pr = std::exp(sc[t] - m);
        l += pr;
        for (int e = 0; e < D; ++e) out[hq * D + e] += pr * rows[t][(s.Hkv + h) * D + e];
      }
      for (int e = 0; e < D; ++e) out[hq * D + e] /= l;
      if (lse) (*lse)[hq] = m + std::log(l);
    }
  }
  return out;
}

struct RopeDev {
  DBuf<float> hi, lo, freq;
  dec::RopeTableView view;
  RopeDev(double theta, int D, std::int64_t max_pos)
      : RopeDev(dec::rope_table(theta, D, max_pos)) {}
  explicit RopeDev(const dec::RopeTableHost& t) : hi(t.hi), lo(t.lo), freq(t.freq) {
    view = dec::RopeTableView{hi.p, lo.p, t.half, t.max_pos, freq.p};
  }
};

}  // namespace

namespace {
// One dense pass + combine over random 16-bit (T: bf16, or f16 with the shape set Shapes) KV of
// sequences of lengths n, against float64 attention.
// lane_kernel: the CUDA-core kernel instead of the tensor-core one (dense_mma.cuh); with_logits:
// the filter's variant (logits written as f16; the tensor-core kernel computes ~16 bits of them), else
// only the attention (the tensor-core kernel rounds the rotated K to bf16). split_len > 0: that split
// length instead of dense_splits' (one that is not a multiple of 64 must fall back to the lane kernel).
// max_n: the longest sequence allowed, which the RoPE table covers exactly when a multiple of 64.
// scale_mul > 1: the softmax scale that many times larger, so that logits pass f16's +-65504: they must
// be stored saturated there (finite), and only the logits are checked (the attention is one-hot).
template <class T = bf, class Shapes = dec::AllShapes>
void run_dense_case(const Shape& s, const std::vector<std::int32_t>& n, bool lane_kernel, bool with_logits = true,
                    int split_len = 0, std::int64_t max_n = 2500, double scale_mul = 1.0) {
  CAPTURE(lane_kernel);
  CAPTURE(with_logits);
  CAPTURE(s.D);
  CAPTURE(s.Hq);
  CAPTURE(s.Hkv);
  const double theta = 10000.0;
  const int B = int(n.size()), kvd = 2 * s.Hkv * s.D, qd = s.Hq * s.D;
  const std::int64_t stride = max_n * kvd;
  auto kv = random_16<T>(std::size_t(B) * stride, 11 + s.D, -1.f, 1.f);
  // rows past a sequence's end are never attended: NaN there must not reach the output (the
  // kernels copy whole stages and mask the rows past the end)
  for (int b = 0; b < B; ++b)
    for (std::int64_t i = std::int64_t(n[b]) * kvd; i < stride; ++i)
      kv.b[std::size_t(b) * stride + i] = vendor::from_float<T>(std::numeric_limits<float>::quiet_NaN());
  auto q = random_16<T>(std::size_t(B) * qd, 12 + s.D, -1.f, 1.f);
  const double scale = scale_mul / std::sqrt(double(s.D));
  RopeDev rope(theta, s.D, max_n);
  DBuf<T> dkv(kv.b), dq(q.b), dout(std::size_t(B) * qd);
  DBuf<std::int32_t> dn(n);
  auto sp = dec::dense_splits(max_n, B, s.Hkv, 132);
  if (split_len > 0) sp = dec::SplitPlan{split_len, int((max_n + split_len - 1) / split_len)};
  DBuf<std::uint16_t> logits(std::size_t(B) * s.Hq * max_n);  // f16 bits
  DBuf<float> part(dec::partials_floats(B, s.Hq, sp.n_splits, s.D)),
      lse(std::size_t(B) * s.Hq);
  dout.poison();
  part.poison(0x7F);  // finite and huge: a split left unwritten dominates the merge (NaN would be skipped)
  logits.poison();
  lse.poison();
  dec::DenseDecodeParams<T> p{dq.p, qd, dkv.p, stride, dn.p, B, s.Hq, s.Hkv, s.D, float(scale), rope.view, s.style,
                              sp.split_len, sp.n_splits, part.p, logits.p, max_n};
  p.lane_kernel = lane_kernel;
  if (!with_logits) p.logits = nullptr;
  CHECK(dec::dense_mma_fits(p) == (vendor::kTensorTiles && sp.split_len % 64 == 0));
  dec::dense_partials<Shapes>(p, max_n, nullptr);
  dec::combine(dec::CombineParams<T>{part.p, sp.n_splits, B, s.Hq, s.D, dout.p, qd, lse.p}, nullptr);
  const auto got = f64(dout.get());
  const auto got_logits = logits.get();
  const auto got_lse = lse.get();
  for (int b = 0; b < B; ++b) {
    std::vector<std::vector<double>> rows(n[b]);
    std::vector<std::int64_t> pos(n[b]);
    for (int t = 0; t < n[b]; ++t) {
      rows[t].assign(kv.d.begin() + b * stride + std::int64_t(t) * kvd, kv.d.begin() + b * stride + std::int64_t(t + 1) * kvd);
      pos[t] = t;
    }
    std::vector<double> wl, wlse;
    const auto want = naive_attend(s, q.d.data() + b * qd, rows, pos, theta, scale, &wl, &wlse);
    const std::vector<double> g(got.begin() + b * qd, got.begin() + (b + 1) * qd);
    if (scale_mul == 1.0) {
      CHECK(dkt::rel_l2(g, want) < 1e-2);  // bf16 output rounding (2^-9) dominates (f16: 2^-12)
      for (int h = 0; h < s.Hq; ++h) CHECK(std::abs(got_lse[b * s.Hq + h] - wlse[h]) < (with_logits ? 1e-4 : 1e-3));
    }
    if (!with_logits) continue;
    std::vector<double> gl;
    int saturated = 0, past = 0, not_finite = 0;
    for (int h = 0; h < s.Hq; ++h)
      for (int t = 0; t < n[b]; ++t) {
        const double x = f16_value(got_logits[(std::size_t(b) * s.Hq + h) * max_n + t]);
        not_finite += !std::isfinite(x);
        saturated += std::abs(x) == 65504.0;
        gl.push_back(x);
      }
    CHECK(not_finite == 0);
    // f16 storage rounds each logit by at most 2^-11 (4.9e-4) of itself; the product keeps ~16 bits.
    // Beyond +-65504 the stored value is the bound itself.
    for (auto& x : wl) {
      past += std::abs(x) > 65504.0 * (1 + 1e-3);
      x = std::clamp(x, -65504.0, 65504.0);
    }
    CHECK(saturated >= past);
    if (scale_mul > 1.0) CHECK(past > 0);  // the case reaches the bound
    CHECK(dkt::rel_l2(gl, wl) < 5.5e-4);
  }
}
}  // namespace

// Host only (runs without a GPU, in CI too): the split plan's invariants over many shapes.
TEST_CASE("dense_splits: splits cover the sequence in 64-multiples within max_len, none empty, balanced") {
  for (const int sms : {108, 132})
    for (const int batch : {1, 3, 8, 32})
      for (const int hkv : {1, 4, 8})
        for (const std::int64_t n : {std::int64_t(1), std::int64_t(63), std::int64_t(1000), std::int64_t(4096),
                                     std::int64_t(32768), std::int64_t(100000), std::int64_t(131072), std::int64_t(1) << 20})
          for (const int max_len : {4096, 16384})
            for (const int per_sm : {2, 8}) {
              CAPTURE(sms);
              CAPTURE(batch);
              CAPTURE(hkv);
              CAPTURE(n);
              CAPTURE(max_len);
              CAPTURE(per_sm);
              const auto sp = dec::dense_splits(n, batch, hkv, sms, per_sm, max_len);
              CHECK(sp.split_len % 64 == 0);
              CHECK(sp.split_len >= 256);
              CHECK(sp.split_len <= max_len);
              CHECK(std::int64_t(sp.split_len) * sp.n_splits >= n);        // covers the sequence
              CHECK(std::int64_t(sp.split_len) * (sp.n_splits - 1) < n);   // no split left empty
              // balanced: 64 tokens less per split would not cover n in that many splits (e.g. 4 x 8192
              // for 32768 tokens, never 4 x 10048 with a nearly empty last split)
              if (sp.split_len > 256) CHECK(std::int64_t(sp.split_len - 64) * sp.n_splits < n);
            }
}

// Host only: sparse_plan gives a warp per (sequence, kv head) pair to the exact blocks and keeps
// splits + exact blocks in one wave wherever a split per pair leaves room for them.
TEST_CASE("sparse_plan: exact blocks hold a warp per pair, and the splits leave them room in one wave") {
  for (const int sms : {16, 108, 132})
    for (const int batch : {1, 2, 8, 32})
      for (const int hkv : {1, 4, 8})
        for (const int threads : {256, 512})
          for (const std::int64_t sel : {std::int64_t(1), std::int64_t(100), std::int64_t(2048)}) {
            CAPTURE(sms);
            CAPTURE(batch);
            CAPTURE(hkv);
            CAPTURE(threads);
            CAPTURE(sel);
            const auto pl = dec::sparse_plan(sel, batch, hkv, sms, threads);
            const int pairs = batch * hkv, warps = threads / vendor::kWarpSize;
            CHECK(pl.exact_blocks * warps >= pairs);
            CHECK(pl.exact_parts >= 1);
            CHECK(pl.exact_parts <= dec::kSparseMaxExactParts);
            CHECK((pl.exact_parts == 1 || pl.exact_parts * pairs <= pl.exact_blocks * warps));  // a warp per part
            CHECK(pl.exact_blocks <= std::max((pairs + warps - 1) / warps, (pairs * dec::kSparseMaxExactParts + warps - 1) / warps));
            CHECK(pl.n_splits >= 1);
            CHECK(pl.n_splits <= std::max<std::int64_t>(1, (sel + dec::kSparseTile - 1) / dec::kSparseTile));
            if (pairs + (pairs + warps - 1) / warps <= sms) CHECK(pl.n_splits * pairs + pl.exact_blocks <= sms);  // one wave
            else CHECK(pl.exact_blocks * warps < pairs + warps);  // no more exact blocks than a warp per pair needs
          }
  // the H100 (132 SMs, 512 threads of 32-lane warps): Llama 128K x 8 (64 pairs) 2 splits + 4 exact
  // blocks, a part per pair; batch 1 (8 pairs) 16 splits + 4 exact blocks, 8 parts per pair
  if (vendor::kWarpSize == 32) {
    const auto llama = dec::sparse_plan(2048, 8, 8, 132, 512);
    CHECK(llama.n_splits == 2);
    CHECK(llama.exact_blocks == 4);
    CHECK(llama.exact_parts == 1);
    const auto one = dec::sparse_plan(2048, 1, 8, 132, 512);
    CHECK(one.n_splits == 16);
    CHECK(one.exact_blocks == 4);
    CHECK(one.exact_parts == 8);
  }
}

__global__ void rope_both_kernel(dec::RopeTableView t, const std::int64_t* pos, int n, float* cs_tab, float* cs_fun) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n * (t.half / 4)) return;
  const int k = i / (t.half / 4), f0 = (i % (t.half / 4)) * 4;
  float c[4], s[4];
  dec::rope_cs<4>(t, pos[k], f0, c, s);
  for (int j = 0; j < 4; ++j) {
    cs_tab[(std::int64_t(k) * t.half + f0 + j) * 2] = c[j];
    cs_tab[(std::int64_t(k) * t.half + f0 + j) * 2 + 1] = s[j];
  }
  dec::rope_sincos<4>(t.freq, pos[k], f0, c, s);
  for (int j = 0; j < 4; ++j) {
    cs_fun[(std::int64_t(k) * t.half + f0 + j) * 2] = c[j];
    cs_fun[(std::int64_t(k) * t.half + f0 + j) * 2 + 1] = s[j];
  }
}

TEST_CASE("RoPE cos/sin from the frequencies (rope_sincos) and from the tables (rope_cs) against float64") {
  DKT_REQUIRE_CUDA();
  // every frequency of head_dim 128 (theta 500000, Llama 3.1's) and 64 (theta 10000), positions up to 2^24
  // (freq's limit)
  struct Case { double theta; int D; };
  for (const Case cs : {Case{500000.0, 128}, Case{10000.0, 64}}) {
    const double theta = cs.theta;
    const int D = cs.D;
    const std::int64_t max_pos = std::int64_t(1) << 24;
    RopeDev rope(theta, D, max_pos);
    std::vector<std::int64_t> pos = {0,      1,      63,          64,          65,      1000,         4095,
                                     4096,   65535,  131071,      131072,      500000,  (1 << 20) - 1, 1 << 20,
                                     9999991, max_pos - 64, max_pos - 1};
    std::mt19937 rng(3);
    for (int i = 0; i < 200; ++i) pos.push_back(std::int64_t(rng() % std::uint32_t(max_pos)));
    const int n = int(pos.size()), half = D / 2;
    DBuf<std::int64_t> dpos(pos);
    DBuf<float> tab(std::size_t(n) * half * 2), fun(std::size_t(n) * half * 2);
    tab.poison();
    fun.poison();
    rope_both_kernel<<<(n * half / 4 + 127) / 128, 128>>>(rope.view, dpos.p, n, tab.p, fun.p);
    vendor::check_launch("rope_both_kernel");
    const auto t = tab.get(), u = fun.get();
    double worst_tab = 0, worst_fun = 0;
    for (int k = 0; k < n; ++k)
      for (int f = 0; f < half; ++f) {
        const double a = double(pos[std::size_t(k)]) * std::pow(theta, -2.0 * f / D);
        const std::size_t i = (std::size_t(k) * half + f) * 2;
        // (written so that a NaN, e.g. the poison, makes the worst NaN and the checks below fail)
        for (const double err : {std::abs(t[i] - std::cos(a)), std::abs(t[i + 1] - std::sin(a))})
          if (!(err <= worst_tab)) worst_tab = err;
        for (const double err : {std::abs(u[i] - std::cos(a)), std::abs(u[i + 1] - std::sin(a))})
          if (!(err <= worst_fun)) worst_fun = err;
      }
    MESSAGE("D " << D << ": worst |cos/sin error| tables " << worst_tab << ", computed " << worst_fun);
    CHECK(worst_tab < 1e-6);
    CHECK(worst_fun < 2e-6);
  }
}

TEST_CASE("fused dense decode: attention, logits and lse against float64 RoPE attention") {
  DKT_REQUIRE_CUDA();
  for (const Shape s : {Shape{8, 2, 128, RopeStyle::half}, Shape{9, 3, 64, RopeStyle::interleaved},
                        Shape{7, 1, 128, RopeStyle::half}, Shape{8, 1, 64, RopeStyle::none}, Shape{2, 2, 128, RopeStyle::half}})
    for (const bool lane : {false, true})
      for (const bool with_logits : {true, false}) run_dense_case(s, {1, 777, 2500}, lane, with_logits);
  // sequence ends inside a stage of 8 tokens, split length 320 (not a power of two)
  for (const bool lane : {false, true}) run_dense_case(Shape{8, 2, 128, RopeStyle::half}, {5, 1000, 2499}, lane, true, 320);
  // a split length the tensor-core kernel cannot take (not a multiple of 64): the lane kernel serves it
  run_dense_case(Shape{8, 2, 128, RopeStyle::half}, {1, 777, 2500}, false, true, 200);
  run_dense_case(Shape{8, 2, 128, RopeStyle::half}, {1, 777, 2500}, false, true, 320);
  // an odd logits row (ld_logits = 2501): every other row starts off a 4-byte boundary, so the
  // tensor-core kernel stores its f16 logits one by one instead of in pairs
  for (const bool lane : {false, true}) run_dense_case(Shape{8, 2, 128, RopeStyle::half}, {1, 777, 2501}, lane, true, 0, 2501);
  // logits beyond f16's range (a softmax scale 1e5 times the usual: |logit| up to ~1.3e5, a few
  // percent of them past 65504) are stored saturated, in pairs (even row) and one by one (odd row)
  for (const bool lane : {false, true})
    for (const std::int64_t max_n : {2500, 2501}) {
      CAPTURE(max_n);
      run_dense_case(Shape{8, 2, 128, RopeStyle::half}, {777, int(max_n)}, lane, true, 0, max_n, 1e5);
    }
  // A sequence as long as the RoPE table, split into 200s: a 16-lane group of the lane kernel whose
  // tokens all lie past the end starts at position 2368, one past the table (it read the table
  // there until the fix; memcheck over this case is what sees such a read).
  run_dense_case(Shape{8, 2, 128, RopeStyle::half}, {2368}, true, true, 200, 2368);
  // f16 storage (one shape): both kernels, with and without logits
  using F16Shapes = dec::ShapeSet<dec::KernelShape<128, 4>>;
  for (const bool lane : {false, true})
    for (const bool with_logits : {true, false})
      run_dense_case<vendor::f16, F16Shapes>(Shape{8, 2, 128, RopeStyle::half}, {1, 777, 2500}, lane, with_logits);
}

namespace {
// Selection over random logits of sequences of lengths n (row length ld), with a block of 100
// exact ties starting at position tie0 of sequence 0 (the first 30 of them sure winners), against a
// stable sort on the host, on the given path (SelectParams::path; cluster: blocks per sequence on
// the cluster path, 0 = its default).
// extra >= 0: sequence 0 also gets a sure winner at that position (one above the tied block).
void run_select_case(const std::vector<std::int32_t>& n, std::int64_t ld, int tie0, dec::SelectPath path, int window = 32,
                     int extra = -1, int cluster = 0) {
  CAPTURE(int(path));
  CAPTURE(cluster);
  CAPTURE(ld);
  CAPTURE(window);
  const int Hq = 4, B = int(n.size()), K = 64, sinks = 4;
  std::vector<float> lg(std::size_t(B) * Hq * ld, 0.f), lse(std::size_t(B) * Hq);
  std::mt19937 rng(5 + unsigned(ld));
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& x : lg) x = nd(rng);
  for (int i = 0; i < B * Hq; ++i) lse[i] = 3.f + 0.1f * i;
  // a block of exact ties in sequence 0 straddling the threshold: equal logits in every head
  for (int t = tie0; t < tie0 + 100; ++t)
    for (int h = 0; h < Hq; ++h) lg[(std::size_t(0) * Hq + h) * ld + t] = (h == 0 ? 6.f : -50.f);
  for (int t = tie0; t < tie0 + 30; ++t) lg[t] = 9.f;  // 30 sure winners (head 0)
  if (extra >= 0) lg[extra] = 12.f;
  // stored as f16 (SelectParams::logits), and the host's ranking takes the same rounded values
  std::vector<std::uint16_t> lg16(lg.size());
  for (std::size_t i = 0; i < lg.size(); ++i) {
    lg16[i] = f16_bits(lg[i]);
    lg[i] = float(f16_value(lg16[i]));
  }
  DBuf<std::uint16_t> dl(lg16);
  DBuf<float> dlse(lse);
  DBuf<std::int32_t> dn(n), sel(std::size_t(B) * K), cnt(B);
  DBuf<std::uint32_t> keys(std::size_t(B) * ld), scratch(dec::select_work_words(B, ld));
  sel.poison();
  cnt.poison();
  scratch.poison();
  dec::SelectParams p{dl.p, ld, dlse.p, dn.p, B, Hq, sinks, window, K, keys.p, ld, sel.p, K, cnt.p};
  p.path = path;
  p.cluster = cluster;
  if (path == dec::SelectPath::multi_block) p.work = scratch.p;
  // the host decisions once (plan_select), then launches only; the plan names the path asked for
  const dec::SelectPlan plan = dec::plan_select(p, ld);
  CHECK(plan.path == path);
  CHECK(plan.max_n == ld);
  if (path == dec::SelectPath::cluster && cluster > 0) CHECK(plan.cluster == cluster);
  if (path == dec::SelectPath::cluster && cluster == 0) CHECK((plan.cluster == 8 || (B <= 4 && plan.cluster == 16)));
  dec::select_topk(p, plan, nullptr);
  const auto gs = sel.get();
  const auto gc = cnt.get();
  for (int b = 0; b < B; ++b) {
    CAPTURE(b);
    const int s_end = std::min(sinks, n[b]), w_begin = std::max(s_end, n[b] - window);
    std::vector<std::pair<float, int>> sc;
    for (int t = s_end; t < w_begin; ++t) {
      float best = 0.f;
      for (int h = 0; h < Hq; ++h) best = std::max(best, std::exp(lg[(std::size_t(b) * Hq + h) * ld + t] - lse[b * Hq + h]));
      sc.push_back({best, t});
    }
    std::stable_sort(sc.begin(), sc.end(), [](auto& a, auto& c) { return a.first > c.first; });
    const int kk = std::min<int>(K, int(sc.size()));
    std::vector<int> want;
    for (int i = 0; i < kk; ++i) want.push_back(sc[i].second);
    std::sort(want.begin(), want.end());
    REQUIRE(gc[b] == kk);
    std::vector<int> got(gs.begin() + b * K, gs.begin() + b * K + kk);
    CHECK(got == want);
  }
  // sequence 0: the 30 sure winners and then the lowest-positioned of the tied block (and the extra winner last)
  const int from_block = extra >= 0 ? K - 1 : K;
  for (int i = 0; i < from_block; ++i) CHECK(gs[i] == tie0 + i);
  if (extra >= 0) CHECK(gs[K - 1] == extra);
}
}  // namespace

TEST_CASE("fused OmniKV selection: the k most attended middle positions, in order, ties to the lower") {
  DKT_REQUIRE_CUDA();
  using P = dec::SelectPath;
  std::vector<P> paths{P::one_block, P::multi_block};
  // the cluster path where the device has clusters (sm_90); elsewhere select_topk refuses it
  const bool clusters = dec::select_cluster_supported();
  if (clusters) {
    paths.push_back(P::cluster);
  } else {
    MESSAGE("no thread-block clusters on this device: the cluster selection path is not tested");
    CHECK_THROWS_AS(run_select_case({3000}, 3000, 1000, P::cluster), deltakv::ConfigError);
  }
  // many candidates / fewer than k / none
  for (P path : paths) run_select_case({3000, 90, 20}, 3000, 1000, path);
  // several 4096-position chunks of the multi-block path, the tied block across a chunk boundary
  for (P path : paths) run_select_case({20000, 9000, 4100, 90, 20}, 20000, 4080, path);
  // rows of an odd length: sequences 1-3's keys are not 16-byte aligned (the one-block path's scalar
  // loads); sequence 0's row is, its length is not a multiple of 4 and, with a one-position window, a
  // winner sits in the last n % 4 keys (the vector loads' scalar tail; on the cluster path the
  // logits' scalar loads, as the rows are not 16-byte multiples)
  for (P path : paths) run_select_case({3003, 2999, 90, 21}, 3003, 1000, path, 1, 3001);
  if (clusters) {
    // the cluster path's blocks: the tied block across the boundary of blocks 0 and 1 (2500 positions
    // each at 8 per cluster), other cluster sizes (1, an odd 3, the non-portable 16), and the
    // winners spread over the blocks of a 16-block cluster
    run_select_case({20000, 9000, 4100, 90, 20}, 20000, 2460, P::cluster);
    for (int c : {1, 3, 16}) run_select_case({20000, 9000, 4100, 90, 20}, 20000, 2460, P::cluster, 32, -1, c);
    run_select_case({20000, 3003}, 20000, 1000, P::cluster, 1, 19990, 16);
  }
}

TEST_CASE("OmniKV selection plan: made once, launched for new logits, the same as planning each call, misuse refused") {
  DKT_REQUIRE_CUDA();
  const int Hq = 4, B = 2, K = 64;
  const std::int64_t ld = 3000;
  const std::vector<std::int32_t> n{3000, 900};
  std::vector<float> lse(std::size_t(B) * Hq, 2.f);
  DBuf<std::uint16_t> dl(std::size_t(B) * Hq * ld);
  DBuf<float> dlse(lse);
  DBuf<std::int32_t> dn(n), sel(std::size_t(B) * K), cnt(B), sel2(std::size_t(B) * K), cnt2(B);
  DBuf<std::uint32_t> keys(std::size_t(B) * ld), scratch(dec::select_work_words(B, ld));
  dec::SelectParams p{dl.p, ld, dlse.p, dn.p, B, Hq, 4, 32, K, keys.p, ld, sel.p, K, cnt.p};
  const dec::SelectPlan plan = dec::plan_select(p, ld);  // automatic: the cluster path where the device has clusters
  CHECK(plan.path == (dec::select_cluster_supported() ? dec::SelectPath::cluster : dec::SelectPath::one_block));
  for (std::uint32_t seed : {1u, 2u}) {  // new logits each time, the same plan
    CAPTURE(seed);
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.f, 2.f);
    std::vector<std::uint16_t> lg(std::size_t(B) * Hq * ld);
    for (auto& x : lg) x = f16_bits(nd(rng));
    vendor::memcpy_async(dl.p, lg.data(), lg.size() * sizeof(std::uint16_t), nullptr);
    sel.poison();
    sel2.poison();
    dec::select_topk(p, plan, nullptr);
    dec::SelectParams p2 = p;
    p2.sel = sel2.p;
    p2.sel_count = cnt2.p;
    dec::select_topk(p2, ld, nullptr);  // planned in the call
    CHECK(sel.get() == sel2.get());
    CHECK(cnt.get() == cnt2.get());
  }
  // a plan is checked against the parameters it launches with
  p.work = scratch.p;
  p.path = dec::SelectPath::multi_block;
  const dec::SelectPlan multi = dec::plan_select(p, ld);
  CHECK(multi.path == dec::SelectPath::multi_block);
  p.work = nullptr;
  CHECK_THROWS_AS(dec::select_topk(p, multi, nullptr), deltakv::ConfigError);
  p.work = scratch.p;
  p.ld_keys = ld - 1;
  CHECK_THROWS_AS(dec::select_topk(p, multi, nullptr), deltakv::ShapeError);
}

namespace {

// A compressed layer built on the host in the cache's layout (decode_params.hpp), its device copy,
// and the float64 value of every position's reconstruction x = f_d(z) + mean(refs).
struct CompressedFixture {
  Shape s;
  int B, S, ring, stride, DC, bits, k;
  std::vector<std::int32_t> n, c;
  std::vector<std::int32_t> code;  // pos_code
  std::size_t seq_bytes = 0, off_sinks = 0, off_ring = 0, off_refs = 0, off_lat = 0, off_scale = 0, off_ids = 0;
  std::int64_t lat_ld = 0, max_refs = 0, max_lat = 0;
  std::vector<unsigned char> store;
  std::vector<bf> w, bias;
  std::vector<std::vector<std::vector<double>>> x;  // [b][p] reconstructed pre-RoPE row (f64)

  static std::size_t al(std::size_t v) { return (v + 255) / 256 * 256; }

  CompressedFixture(Shape sh, std::vector<std::int32_t> ns, int latent_bits, std::uint32_t seed, int dc = 0)
      : s(sh), B(int(ns.size())), S(4), ring(48), stride(10), DC(dc > 0 ? dc : (sh.D == 128 ? 64 : 32)), bits(latent_bits), k(4),
        n(ns) {
    const int kvd = 2 * s.Hkv * s.D;
    const std::int64_t max_n = *std::max_element(n.begin(), n.end());
    code.assign(max_n, 0);
    std::vector<std::int32_t> refs_upto(max_n, 0);
    std::int64_t refs = 0;
    for (std::int64_t p = S; p < max_n; ++p) {
      if ((p - S) % stride == 0) {
        code[p] = std::int32_t(refs << 2 | 1);
        ++refs;
      } else {
        code[p] = std::int32_t((p - S - refs) << 2 | 2);
      }
      refs_upto[p] = std::int32_t(refs);
    }
    max_refs = refs;
    max_lat = std::max<std::int64_t>(1, max_n - S - refs);
    lat_ld = bits == 0 ? DC * 2 : DC * bits / 8;
    std::size_t o = 0;
    off_sinks = o; o += al(std::size_t(S) * kvd * 2);
    off_ring = o; o += al(std::size_t(ring) * kvd * 2);
    off_refs = o; o += al(std::size_t(max_refs) * kvd * 2);
    off_lat = o; o += al(std::size_t(max_lat) * lat_ld);
    off_scale = o; o += al(std::size_t(max_lat) * 8);
    off_ids = o; o += al(std::size_t(max_lat) * k * 4);
    seq_bytes = o;
    store.assign(seq_bytes * B, 0);
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    auto rnd_bf = [&](float sc) { return vendor::from_float<bf>(u(rng) * sc); };
    w.resize(std::size_t(kvd) * DC);
    for (auto& v : w) v = rnd_bf(1.f / std::sqrt(float(DC)));
    bias.resize(kvd);
    for (auto& v : bias) v = rnd_bf(0.2f);
    x.resize(B);
    for (int b = 0; b < B; ++b) {
      unsigned char* base = store.data() + seq_bytes * b;
      auto row_ptr = [&](std::size_t off, std::int64_t r) { return reinterpret_cast<bf*>(base + off) + r * kvd; };
      // compressed frontier: a multiple of 32 past the sinks, leaving 16..47 tokens in the ring
      const int cf = n[b] <= S + ring ? std::min<int>(n[b], S) : S + ((n[b] - S - 16) / 32) * 32;
      c.push_back(cf);
      x[b].assign(n[b], std::vector<double>(kvd, 0.0));
      auto fill_exact = [&](bf* dst, std::vector<double>& xv) {
        for (int e = 0; e < kvd; ++e) {
          dst[e] = rnd_bf(1.f);
          xv[e] = vendor::to_float(dst[e]);
        }
      };
      for (int p = 0; p < n[b]; ++p) {
        if (p < S) {
          fill_exact(row_ptr(off_sinks, p), x[b][p]);
        } else if (p >= cf) {
          fill_exact(row_ptr(off_ring, (p - S) % ring), x[b][p]);
        } else if ((code[p] & 3) == 1) {
          fill_exact(row_ptr(off_refs, code[p] >> 2), x[b][p]);
        }
      }
      for (int p = S; p < cf; ++p) {
        if ((code[p] & 3) != 2) continue;
        const std::int64_t r = code[p] >> 2;
        // references: k random among those visible (a -1 now and then)
        auto* id = reinterpret_cast<std::int32_t*>(base + off_ids) + r * k;
        std::vector<double> mean(kvd, 0.0);
        int cnt = 0;
        for (int j = 0; j < k; ++j) {
          const int vis = refs_upto[p];
          id[j] = (j == 3 && p % 7 == 0) ? -1 : int(rng() % std::uint32_t(vis));
          if (id[j] < 0) continue;
          const int rp = S + id[j] * stride;
          for (int e = 0; e < kvd; ++e) mean[e] += x[b][rp][e];
          ++cnt;
        }
        for (auto& m : mean) m /= cnt;
        std::vector<double> z(DC);
        if (bits == 0) {
          bf* zr = reinterpret_cast<bf*>(base + off_lat + r * lat_ld);
          for (int e = 0; e < DC; ++e) {
            zr[e] = rnd_bf(1.f);
            z[e] = vendor::to_float(zr[e]);
          }
        } else {
          auto* q = base + off_lat + r * lat_ld;
          auto* sm = reinterpret_cast<float*>(base + off_scale) + 2 * r;
          sm[0] = 0.05f + 0.1f * (u(rng) + 1.f);
          sm[1] = -0.5f + 0.2f * u(rng);
          const int levels = (1 << bits) - 1;
          for (int e = 0; e < DC; ++e) {
            const int code_e = int(rng() % std::uint32_t(levels + 1));
            if (bits == 8) q[e] = std::uint8_t(code_e);
            else q[e / 2] = std::uint8_t((e % 2 == 0) ? code_e : (q[e / 2] | (code_e << 4)));
            // the kernels round the dequantized value to the storage type, as CudaDevice<bf16> does
            z[e] = vendor::to_float(vendor::from_float<bf>(float(code_e) * sm[0] + sm[1]));
          }
        }
        for (int o2 = 0; o2 < kvd; ++o2) {
          double acc = vendor::to_float(bias[o2]);
          for (int e = 0; e < DC; ++e) acc += double(vendor::to_float(w[std::size_t(o2) * DC + e])) * z[e];
          x[b][p][o2] = acc + mean[o2];
        }
      }
    }
  }
};

// The two-pass path is opt-in and slower (docs/BENCHMARKS.md): built for the shapes its cases use only.
using TwoPassShapes = dec::ShapeSet<dec::KernelShape<128, 4>, dec::KernelShape<64, 3>, dec::KernelShape<128, 7>>;
enum class SparsePath { fused, fused_256, fused_w_l2, two_pass };  // fused: the default block (512 threads at head_dim 128)

// rope_tables: the keys' cos/sin read from the RoPE tables (RopeTableView::freq null) instead of
// computed from the frequencies. exact_blocks, exact_parts: SparseDecodeParams' (the sinks and the
// ring's window positions on blocks of their own, each pair's cut into parts). sinks, window: the
// policy's; by default it attends fewer sinks than the cache keeps (4), and its window of 24 reaches
// compressed positions where the ring holds fewer tokens (the fixture leaves 16 to 47: e.g. n 600, 90,
// 3000 and 2200 leave 20-22; the cases with window 40 reach them at every n).
void run_sparse_case(const Shape& s, int bits, const std::vector<std::int32_t>& n, int n_select, int n_splits,
                     SparsePath path = SparsePath::fused, int latent_dim = 0, bool rope_tables = false, int exact_blocks = 0,
                     int sinks = 3, int window = 24, int exact_parts = 1) {
  CompressedFixture fx(s, n, bits, 77 + bits, latent_dim);
  const int B = fx.B, qd = s.Hq * s.D, kvd = 2 * s.Hkv * s.D;
  const double theta = 500000.0, scale = 1.0 / std::sqrt(double(s.D));
  auto q = random_bf16(std::size_t(B) * qd, 31, -1.f, 1.f);
  // selection: random middle positions, sorted, n_select or fewer per sequence
  std::mt19937 rng(9);
  const int ld_sel = std::max(1, n_select);
  std::vector<std::int32_t> sel(std::size_t(B) * ld_sel, -1), cnt(B);
  std::vector<std::vector<std::int64_t>> attended(B);
  for (int b = 0; b < B; ++b) {
    const int s_end = std::min(sinks, n[b]), w_begin = std::max(s_end, n[b] - window);
    std::vector<std::int32_t> mid(w_begin - s_end);
    std::iota(mid.begin(), mid.end(), s_end);
    std::shuffle(mid.begin(), mid.end(), rng);
    mid.resize(std::min<std::size_t>(mid.size(), n_select));
    std::sort(mid.begin(), mid.end());
    cnt[b] = int(mid.size());
    std::copy(mid.begin(), mid.end(), sel.begin() + b * ld_sel);
    for (int p = 0; p < s_end; ++p) attended[b].push_back(p);
    for (auto p : mid) attended[b].push_back(p);
    for (int p = w_begin; p < n[b]; ++p) attended[b].push_back(p);
  }
  RopeDev rope(theta, s.D, 8192);
  DBuf<unsigned char> store(fx.store);
  DBuf<bf> dw(fx.w), dbias(fx.bias), dq(q.b), dout(std::size_t(B) * qd);
  DBuf<std::int32_t> dcode(fx.code), dn(n), dc(fx.c), dsel(sel), dcnt(cnt);
  const int slots = n_splits + (exact_blocks > 0 ? exact_parts : 0);
  DBuf<float> part(dec::partials_floats(B, s.Hq, slots, s.D));
  dout.poison();
  // partials poisoned finite and huge (0x7F bytes: m = l = acc = 3.4e38), not NaN: combine skips a NaN
  // slot (fmaxf ignores it, l > 0 is false), but a huge m and l > 0 would dominate any slot a pass failed
  // to write, as stale partials of an earlier layer would
  part.poison(0x7F);
  dec::CompressedLayerView<bf> view{reinterpret_cast<const std::byte*>(store.p), fx.seq_bytes, fx.off_sinks, fx.off_ring,
                                    fx.off_refs, fx.off_lat, fx.off_scale, fx.off_ids, fx.S, fx.ring, fx.DC, bits, fx.k,
                                    fx.lat_ld, dcode.p, dw.p, dbias.p};
  dec::SparseDecodeParams<bf> p{dq.p, qd, view, dn.p, dc.p, dsel.p, ld_sel, dcnt.p, B, s.Hq, s.Hkv, s.D,
                                float(scale), rope.view, s.style, sinks, window, n_splits, part.p};
  p.weights_from_l2 = path == SparsePath::fused_w_l2;
  if (path == SparsePath::fused_256) p.block_threads = 256;
  if (rope_tables) p.rope.freq = nullptr;
  p.exact_blocks = exact_blocks;
  p.exact_parts = exact_parts;
  REQUIRE(dec::sparse_partial_slots(p) == slots);
  const std::int64_t ld_scores = sinks + ld_sel + window + 5;  // the two-pass path's logits scratch
  DBuf<float> scores(std::size_t(B) * s.Hq * ld_scores);
  scores.poison();
  p.scores = scores.p;
  p.ld_scores = ld_scores;
  if (path == SparsePath::two_pass) {
    REQUIRE(dec::two_pass_max_items(p) <= ld_scores);
    dec::sparse_partials_two_pass<TwoPassShapes>(p, nullptr);
  } else {
    dec::sparse_partials(p, nullptr);
  }
  dec::combine(dec::CombineParams<bf>{part.p, slots, B, s.Hq, s.D, dout.p, qd, nullptr}, nullptr);
  const auto got = f64(dout.get());
  for (int b = 0; b < B; ++b) {
    CAPTURE(b);
    std::vector<std::vector<double>> rows;
    for (auto pp : attended[b]) rows.push_back(fx.x[b][pp]);
    const auto want = naive_attend(s, q.d.data() + b * qd, rows, attended[b], theta, scale);
    const std::vector<double> g(got.begin() + b * qd, got.begin() + (b + 1) * qd);
    CHECK(dkt::rel_l2(g, want) < 1e-2);
  }
  (void)kvd;
}

}  // namespace

TEST_CASE("fused sparse decode over a compressed layer: sinks + selection + window, rebuilt on chip") {
  DKT_REQUIRE_CUDA();
  for (int bits : {4, 8, 0}) {
    CAPTURE(bits);
    run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, bits, {700, 1, 130, 1500}, 200, 3);
  }
  SUBCASE("head_dim 64, interleaved RoPE, GQA 3, one split") {
    run_sparse_case(Shape{9, 3, 64, RopeStyle::interleaved}, 4, {600, 333}, 100, 1);
  }
  SUBCASE("GQA 7, many splits, empty selection") {
    run_sparse_case(Shape{7, 1, 128, RopeStyle::half}, 4, {900, 64}, 0, 8);
  }
  SUBCASE("long selections: a block walks several chunks of 256 items") {
    // up to ~1800 items per block (one split) down to a few hundred (seven), short sequences beside
    // long ones; ~10% of the selected positions are references (stride 10), exact rows among latents
    for (int splits : {1, 2, 7}) {
      CAPTURE(splits);
      run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, 4, {3000, 2200, 40, 700}, 1800, splits);
      run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, 4, {3000, 2200, 40, 700}, 1800, splits, SparsePath::fused_256);
    }
    run_sparse_case(Shape{9, 3, 64, RopeStyle::interleaved}, 8, {2600, 1000}, 1500, 1);
    run_sparse_case(Shape{32, 8, 128, RopeStyle::half}, 4, {3000, 2500}, 2048, 2, SparsePath::fused, 512);
    run_sparse_case(Shape{32, 8, 128, RopeStyle::half}, 4, {3000, 2500}, 2048, 2, SparsePath::two_pass, 512);
    if (deltakv::gpu::vendor::kTensorTiles)
      run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, 4, {3000, 2200, 40, 700}, 1800, 2, SparsePath::fused_w_l2);
  }
  SUBCASE("two passes: scores of every item, then values per split (sparse_partials_two_pass)") {
    for (int bits : {4, 8, 0}) {
      CAPTURE(bits);
      run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, bits, {700, 1, 130, 1500}, 200, 3, SparsePath::two_pass);
    }
    run_sparse_case(Shape{9, 3, 64, RopeStyle::interleaved}, 4, {600, 333}, 100, 1, SparsePath::two_pass);
    run_sparse_case(Shape{7, 1, 128, RopeStyle::half}, 4, {900, 64}, 0, 8, SparsePath::two_pass);
    // Llama-3.1-8B's layer shape (d_c = kv_dim / 4 = 512: eight W_k,h chunks through shared memory)
    run_sparse_case(Shape{32, 8, 128, RopeStyle::half}, 4, {1500, 1200}, 400, 5, SparsePath::two_pass, 512);
    run_sparse_case(Shape{32, 8, 128, RopeStyle::half}, 4, {1500, 1200}, 400, 5, SparsePath::fused, 512);
    run_sparse_case(Shape{28, 4, 128, RopeStyle::half}, 8, {1200}, 300, 2, SparsePath::two_pass, 256);
  }
  SUBCASE("256-thread blocks at head_dim 128 (block_threads; the default there is 512)") {
    for (int bits : {4, 8, 0}) {
      CAPTURE(bits);
      run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, bits, {700, 1, 130, 1500}, 200, 3, SparsePath::fused_256);
    }
    run_sparse_case(Shape{7, 1, 128, RopeStyle::half}, 4, {900, 64}, 0, 8, SparsePath::fused_256);
    run_sparse_case(Shape{32, 8, 128, RopeStyle::half}, 4, {1500, 1200}, 400, 5, SparsePath::fused_256, 512);
  }
  SUBCASE("keys' cos/sin read from the RoPE tables (no freq)") {
    for (int bits : {4, 0}) {
      CAPTURE(bits);
      run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, bits, {700, 1, 130, 1500}, 200, 3, SparsePath::fused, 0, true);
    }
    run_sparse_case(Shape{9, 3, 64, RopeStyle::interleaved}, 4, {600, 333}, 100, 1, SparsePath::fused, 0, true);
    run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, 4, {700, 1, 130, 1500}, 200, 3, SparsePath::fused_256, 0, true);
    run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, 4, {700, 1, 130, 1500}, 200, 3, SparsePath::two_pass, 0, true);
  }
  SUBCASE("exact blocks: the sinks and the ring's window on blocks of their own (exact_blocks)") {
    // 8 (sequence, kv head) pairs: one 16-warp block holds them all; three leave two idle
    for (int bits : {4, 8, 0}) {
      CAPTURE(bits);
      for (int eb : {1, 3}) {
        CAPTURE(eb);
        run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, bits, {700, 1, 130, 1500}, 200, 3, SparsePath::fused, 0, false, eb);
      }
    }
    run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, 4, {700, 1, 130, 1500}, 200, 3, SparsePath::fused_256, 0, false, 1);
    run_sparse_case(Shape{9, 3, 64, RopeStyle::interleaved}, 4, {600, 333}, 100, 1, SparsePath::fused, 0, false, 1);
    // each pair's exact items cut into parts (a warp each; more parts than items leave some empty)
    for (int parts : {2, 3, 8}) {
      CAPTURE(parts);
      run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, 4, {700, 1, 130, 1500}, 200, 3, SparsePath::fused, 0, false, 2, 3, 24, parts);
      run_sparse_case(Shape{7, 1, 128, RopeStyle::half}, 8, {900, 64, 5}, 100, 2, SparsePath::fused, 0, false, 1, 6, 40, parts);
    }
    run_sparse_case(Shape{9, 3, 64, RopeStyle::interleaved}, 0, {600, 333}, 100, 1, SparsePath::fused_256, 0, false, 4, 3, 24, 5);
    // no RoPE (a layer without rotary positions), with and without exact blocks
    for (int eb : {0, 1}) {
      CAPTURE(eb);
      run_sparse_case(Shape{8, 2, 64, RopeStyle::none}, 4, {700, 130}, 200, 2, SparsePath::fused, 0, false, eb, 3, 24, 2);
    }
    run_sparse_case(Shape{7, 1, 128, RopeStyle::half}, 4, {900, 64}, 0, 8, SparsePath::fused, 0, false, 2);
    run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, 4, {700, 1, 130, 1500}, 200, 3, SparsePath::fused, 0, true, 1);
    // the policy's sinks beyond the 4 stored ones and a window of 40 past the ring's 16 to 47 tokens:
    // those positions are compressed rows and stay with the splits
    run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, 4, {700, 3, 5, 130, 1500}, 200, 3, SparsePath::fused, 0, false, 1, 6, 40);
    run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, 4, {700, 3, 5, 130, 1500}, 200, 3, SparsePath::fused, 0, false, 0, 6, 40);
    // Llama-3.1-8B's layer shape, long selections (several 256-item chunks per split)
    run_sparse_case(Shape{32, 8, 128, RopeStyle::half}, 4, {3000, 2500}, 2048, 2, SparsePath::fused, 512, false, 1);
    if (deltakv::gpu::vendor::kTensorTiles)
      run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, 4, {3000, 2200, 40, 700}, 1800, 2, SparsePath::fused_w_l2, 0, false, 1);
  }
  SUBCASE("W_k,h read from global memory (weights_from_l2: two blocks per SM)") {
    if (!deltakv::gpu::vendor::kTensorTiles) {
      MESSAGE("skipped: weights_from_l2 is built for CUDA only");
      return;
    }
    for (int bits : {4, 8, 0}) {
      CAPTURE(bits);
      run_sparse_case(Shape{8, 2, 128, RopeStyle::half}, bits, {700, 1, 130, 1500}, 200, 3, SparsePath::fused_w_l2);
    }
    run_sparse_case(Shape{9, 3, 64, RopeStyle::interleaved}, 4, {600, 333}, 100, 1, SparsePath::fused_w_l2);
    run_sparse_case(Shape{7, 1, 128, RopeStyle::half}, 4, {900, 64}, 0, 8, SparsePath::fused_w_l2);
  }
}

// This file builds the fused kernels for every supported shape (the other GPU tests and the
// benchmark build only their models' shapes): each one runs once here, dense and sparse.
TEST_CASE("fused decode: every supported shape (head_dim 64 and 128, 1 to 8 q heads per kv head)") {
  DKT_REQUIRE_CUDA();
  for (int D : {64, 128})
    for (int G = 1; G <= 8; ++G) {
      const Shape s{2 * G, 2, D, D == 64 ? RopeStyle::interleaved : RopeStyle::half};
      for (const bool lane : {false, true})
        for (const bool with_logits : {true, false}) run_dense_case(s, {300, 41}, lane, with_logits);
      run_sparse_case(s, 4, {400, 90}, 60, 2);
      run_sparse_case(s, 4, {400, 90}, 60, 2, SparsePath::fused, 0, false, 1);
      if (D == 128) run_sparse_case(s, 4, {400, 90}, 60, 2, SparsePath::fused_256);
    }
}

TEST_CASE("fused decode: unsupported shapes are refused with ConfigError") {
  DKT_REQUIRE_CUDA();
  dec::DenseDecodeParams<bf> p{};
  p.head_dim = 96;
  p.n_q_heads = 4;
  p.n_kv_heads = 1;
  CHECK_THROWS_AS(dec::dense_partials(p, 10, nullptr), ConfigError);
  p.head_dim = 128;
  p.n_q_heads = 12;
  p.n_kv_heads = 1;  // group 12
  CHECK_THROWS_AS(dec::dense_partials(p, 10, nullptr), ConfigError);
  // a supported shape outside the caller's shape set (built for 128 x 4 only)
  p.n_q_heads = 2;
  p.batch = 1;
  p.split_len = 64;
  p.n_splits = 1;
  p.style = RopeStyle::none;
  using Only128x4 = dec::ShapeSet<dec::KernelShape<128, 4>>;
  CHECK_THROWS_AS(dec::dense_partials<Only128x4>(p, 10, nullptr), ConfigError);
  dec::SparseDecodeParams<bf> sp{};
  sp.head_dim = 128;
  sp.n_q_heads = 4;
  sp.n_kv_heads = 1;
  sp.layer.latent_dim = 40;
  CHECK_THROWS_AS(dec::sparse_partials(sp, nullptr), ConfigError);
  // block sizes other than 256, or 512 at head_dim 128 (batch 0: valid parameters return before
  // any launch, so only the block size can make these throw)
  DBuf<bf> w(1);
  DBuf<std::int32_t> codes(1);
  auto int4_layer = [&](int dc) {  // a packed int4 layer view of latent_dim dc, k 4
    dec::CompressedLayerView<bf> l{};
    l.latent_dim = dc;
    l.latent_bits = 4;
    l.lat_ld = dc / 2;
    l.k = 4;
    l.w_dec = w.p;
    l.pos_code = codes.p;
    return l;
  };
  sp.layer = int4_layer(64);
  sp.n_splits = 1;
  sp.style = RopeStyle::none;
  sp.block_threads = 256;
  CHECK_NOTHROW(dec::sparse_partials(sp, nullptr));
  sp.block_threads = 512;
  if (vendor::kTensorTiles) {
    CHECK_NOTHROW(dec::sparse_partials(sp, nullptr));
  } else {
    CHECK_THROWS_AS(dec::sparse_partials(sp, nullptr), ConfigError);  // HIP builds 256 only
  }
  sp.block_threads = 300;
  CHECK_THROWS_AS(dec::sparse_partials(sp, nullptr), ConfigError);
  sp.head_dim = 64;
  sp.block_threads = 512;
  CHECK_THROWS_AS(dec::sparse_partials(sp, nullptr), ConfigError);
  sp.head_dim = 128;
  sp.block_threads = 0;
  // exact blocks: none or a positive count, and the fused kernel's only
  sp.exact_blocks = -1;
  CHECK_THROWS_AS(dec::sparse_partials(sp, nullptr), ConfigError);
  sp.exact_blocks = 1;
  CHECK_NOTHROW(dec::sparse_partials(sp, nullptr));
  {  // the two-pass path refuses exact blocks (with its scores scratch given, nothing else would throw)
    DBuf<float> scr(64);
    sp.scores = scr.p;
    sp.ld_scores = 64;
    sp.exact_blocks = 0;
    CHECK_NOTHROW(dec::sparse_partials_two_pass<TwoPassShapes>(sp, nullptr));
    sp.exact_blocks = 1;
    CHECK_THROWS_AS(dec::sparse_partials_two_pass<TwoPassShapes>(sp, nullptr), ConfigError);
    sp.scores = nullptr;
    sp.ld_scores = 0;
  }
  sp.exact_parts = 1 << 30;  // n_splits + exact_parts overflows the kernels' int slot count
  sp.n_splits = 1 << 30;
  CHECK_THROWS_AS(dec::sparse_partials(sp, nullptr), ConfigError);
  sp.n_splits = 1;
  sp.exact_parts = 0;
  CHECK_THROWS_AS(dec::sparse_partials(sp, nullptr), ConfigError);
  sp.exact_parts = 1;
  sp.exact_blocks = 0;
  // a valid shape whose W_k,h and tiles do not fit in one block's shared memory (d_c 768: ~250 KB)
  sp.batch = 1;  // n_splits 1, no RoPE: as above
  sp.layer = int4_layer(768);
  CHECK(dec::sparse_smem(128, 4, 1, 768, 4) > std::size_t(vendor::max_smem_per_block(vendor::current_device())));
  CHECK_THROWS_AS(dec::sparse_partials(sp, nullptr), CapacityError);
}
