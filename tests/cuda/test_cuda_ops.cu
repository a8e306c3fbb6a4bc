// Every op of CudaDevice against the CPU oracle (CpuDevice<float>) on fresh random inputs:
// several sizes (including non-multiples of the block and tile sizes), GQA 4/2 and 32/8 heads,
// head_dim 64 and 128. Device outputs are poisoned (0xFF bytes) before each call. Bounds are
// relative L2 per op; ids, top-k, quantized bytes and pure data movement must match exactly.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <numeric>
#include <tuple>

#include "cuda_test_util.cuh"

using namespace deltakv;
using namespace dkt;
using namespace dkt_cuda;

namespace {

struct Heads {
  int hq, hkv, hd;
};
constexpr Heads kHeads[] = {{4, 2, 64}, {32, 8, 128}};

}  // namespace

// The tensor-core kernels exist where the tile product runs on tensor cores (CUDA); a HIP build
// says so and skips.
static bool tensor_tiles_built() {
  if (gpu::vendor::kTensorTiles) return true;
  MESSAGE("skipped: this build's tile product is the per-lane fallback (HIP), not tensor cores");
  return false;
}

TEST_CASE("cuda linear matches the CPU GEMM") {
  DKT_REQUIRE_CUDA();
  cuda::CudaDevice<float> dev;
  cpu::CpuDevice<float> ref;
  struct S {
    std::int64_t n;
    int in, out;
    bool bias;
    int padx, pady;
  };
  std::uint32_t seed = 100;
  for (S s : {S{1, 64, 16, false, 0, 0}, S{2, 5, 3, true, 0, 0}, S{37, 256, 64, true, 3, 5}, S{128, 2048, 512, true, 0, 0},
              S{300, 130, 77, false, 1, 0}, S{64, 512, 2048, true, 0, 0}}) {
    const std::int64_t ldx = s.in + s.padx, ldy = s.out + s.pady;
    auto x = randn<float>(std::size_t(s.n * ldx), ++seed);
    auto w = randn<float>(std::size_t(s.out) * s.in, ++seed, 1.0 / std::sqrt(double(s.in)));
    auto b = randn<float>(std::size_t(s.out), ++seed);
    DBuf<float> dx(x), dw(w), db(b), dy(std::size_t(s.n * ldy));
    dy.poison();
    dev.linear({dx.p, ldx, dy.p, ldy, s.n, dw.p, s.bias ? db.p : nullptr, s.in, s.out});
    auto want = poisoned<float>(std::size_t(s.n * ldy));
    ref.linear({x.data(), ldx, want.data(), ldy, s.n, w.data(), s.bias ? b.data() : nullptr, s.in, s.out});
    const auto got = dy.get();
    const double e = rel_l2(pack(got, s.n, s.out, ldy), pack(want, s.n, s.out, ldy));
    MESSAGE("linear n=" << s.n << " in=" << s.in << " out=" << s.out << " bias=" << s.bias << ": rel L2 " << e);
    CHECK(e < 1e-5);
    CHECK(padding_untouched(got, s.n, s.out, ldy));
  }
}

TEST_CASE("cuda bf16 linear on tensor cores matches a float64 GEMM (edges, bias, strides)") {
  // Both tensor-core paths: cuBLAS (the default; any shape without a bias: with one, linear() takes
  // the next path, so those cases check that choice) and our tile kernel (set_vendor_gemm false;
  // >= 64 rows, in % 8 == 0, ldx % 8 == 0: linear_mma_eligible). Inputs are bf16 values, so
  // the float64 product of the same values is the exact answer; both accumulate in f32 and round
  // once to bf16 (at most 2^-8 relative per element), the bias included before that rounding.
  DKT_REQUIRE_CUDA();
  if (!tensor_tiles_built()) return;
  using B = cuda::bf16;
  cuda::CudaDevice<B> dev;
  dev.set_tensor_cores(true);
  CHECK(dev.vendor_gemm());
  struct S {
    std::int64_t n;
    int in, out;
    bool bias;
    int padx, pady;
  };
  std::uint32_t seed = 1500;
  // (922, 3072 -> 512) and (64, 1024 -> 256) have too few output tiles for the GPU: split-K in our
  // kernel. (5, 40 -> 24), (3, 7 -> 9) and (1, 13 -> 5) only cuBLAS takes (few rows, odd widths and
  // strides).
  for (const bool vendor : {true, false})
  for (S s : {S{64, 8, 1, false, 0, 0}, S{77, 200, 130, true, 8, 3}, S{300, 2048, 512, true, 0, 0},
              S{1000, 3072, 200, false, 0, 0}, S{257, 2048, 640, true, 16, 0}, S{922, 3072, 512, true, 0, 0},
              S{64, 1024, 256, false, 0, 0}, S{5, 40, 24, false, 0, 2}, S{3, 7, 9, false, 1, 1},
              S{1, 13, 5, false, 3, 1}, S{129, 2048, 1536, false, 8, 8}}) {
    CAPTURE(vendor);
    dev.set_vendor_gemm(vendor);
    CHECK(dev.vendor_gemm() == vendor);  // the handle exists where asked for
    const std::int64_t ldx = s.in + s.padx, ldy = s.out + s.pady;
    auto x = round_bf16(randn<float>(std::size_t(s.n * ldx), ++seed));
    auto w = round_bf16(randn<float>(std::size_t(s.out) * s.in, ++seed, 1.0 / std::sqrt(double(s.in))));
    auto b = round_bf16(randn<float>(std::size_t(s.out), ++seed));
    DBuf<B> dx(to_bf16(x)), dw(to_bf16(w)), db(to_bf16(b)), dy(std::size_t(s.n * ldy));
    dy.poison();
    const LinearParams<B> lp{dx.p, ldx, dy.p, ldy, s.n, dw.p, s.bias ? db.p : nullptr, s.in, s.out};
    if (!vendor && !gpu::linear_mma_eligible(lp)) continue;  // the CUDA-core kernel's shape (tested above)
    const bool blas = dev.vendor_gemm() && gpu::linear_gemm_eligible(lp);  // the path linear() takes
    CHECK(blas == (vendor && !s.bias));
    dev.linear(lp);
    // per element: one bf16 rounding (2^-8 relative at most) plus f32 summation error, bounded by
    // 1e-5 of the sum of |terms|; and the whole output: rel L2 < 4e-3
    std::vector<float> want(std::size_t(s.n) * s.out), mag(want.size());
    for (std::int64_t r = 0; r < s.n; ++r)
      for (int o = 0; o < s.out; ++o) {
        double a = s.bias ? double(b[std::size_t(o)]) : 0.0, m = std::abs(a);
        for (int i = 0; i < s.in; ++i) {
          const double t = double(x[std::size_t(r * ldx + i)]) * double(w[std::size_t(o) * s.in + i]);
          a += t;
          m += std::abs(t);
        }
        want[std::size_t(r * s.out + o)] = float(a);
        mag[std::size_t(r * s.out + o)] = float(m);
      }
    const auto raw = dy.get();
    const auto got = pack(to_f32(raw), s.n, s.out, ldy);
    std::int64_t bad = 0;
    for (std::size_t i = 0; i < got.size(); ++i)
      bad += !(std::abs(double(got[i]) - want[i]) <= std::ldexp(std::abs(double(want[i])), -8) + 1e-5 * mag[i]);
    const double e = rel_l2(got, want);
    MESSAGE("tensor-core linear (" << std::string(blas ? "cuBLAS" : "own kernel") << ") n=" << s.n << " in=" << s.in
                                    << " out=" << s.out << ": rel L2 " << e << ", " << bad
                                    << " elements outside their bound");
    CHECK(bad == 0);
    CHECK(e < 4e-3);
    CHECK(padding_untouched(raw, s.n, s.out, ldy));
  }
}

TEST_CASE("cuda swiglu and axpy_rows match the CPU") {
  DKT_REQUIRE_CUDA();
  cuda::CudaDevice<float> dev;
  cpu::CpuDevice<float> ref;
  std::uint32_t seed = 200;
  for (auto [n, hidden, pad] : {std::tuple{1, 7, 0}, {37, 300, 5}, {128, 1536, 0}}) {
    const std::int64_t ldh = 2 * hidden + pad;
    auto h = randn<float>(std::size_t(n * ldh), ++seed, 2.0);
    DBuf<float> dh(h);
    dev.swiglu({dh.p, ldh, n, hidden});
    ref.swiglu({h.data(), ldh, n, hidden});
    const auto got = dh.get();
    const double e = rel_l2(got, h);
    MESSAGE("swiglu n=" << n << " hidden=" << hidden << ": rel L2 " << e);
    CHECK(e < 1e-6);
  }
  {  // bf16: 16-byte packs (hidden, ldh multiples of 8) and the element path (odd ldh); the CPU in
     // f32 on the same bf16 inputs, one bf16 rounding apart
    cuda::CudaDevice<cuda::bf16> dev16;
    for (auto [n, hidden, pad] : {std::tuple{3, 8, 0}, {129, 3072, 8}, {40, 24, 3}}) {
      const std::int64_t ldh = 2 * hidden + pad;
      auto h = round_bf16(randn<float>(std::size_t(n * ldh), ++seed, 2.0));
      DBuf<cuda::bf16> dh(to_bf16(h));
      dev16.swiglu({dh.p, ldh, n, hidden});
      ref.swiglu({h.data(), ldh, n, hidden});
      const auto got = to_f32(dh.get());
      const double e = rel_l2(got, h);
      std::int64_t outside = 0;  // each element within one bf16 rounding (2^-8 relative)
      for (std::size_t i = 0; i < h.size(); ++i) outside += std::fabs(got[i] - h[i]) > std::ldexp(std::fabs(h[i]), -8) * 1.0001 + 1e-30;
      MESSAGE("swiglu bf16 n=" << n << " hidden=" << hidden << " ldh=" << ldh << ": rel L2 " << e << ", " << outside
                               << " elements outside one rounding");
      CHECK(outside == 0);
    }
  }
  // sub (a residual encoder's hidden rows): swiglu(h) - swiglu(sub), with sub the rows below h's in
  // the same buffer (the cache's layout) or rows of another (own ld); f32 and bf16, packs and not
  // (the last: a separate sub buffer whose rows are 16-byte packs too)
  for (const auto& c : {std::tuple{1, 7, 0, true, 0}, {37, 300, 5, false, 11}, {129, 3072, 8, true, 0},
                        {40, 24, 3, false, 7}, {33, 256, 8, false, 16}}) {
    // (no structured bindings: doctest's CAPTURE cannot name one under clang)
    const int n = std::get<0>(c), hidden = std::get<1>(c), pad = std::get<2>(c), sub_pad = std::get<4>(c);
    const bool below = std::get<3>(c);
    CAPTURE(n);
    CAPTURE(hidden);
    const std::int64_t ldh = 2 * hidden + pad, lds = below ? ldh : 2 * hidden + sub_pad;
    auto h = round_bf16(randn<float>(std::size_t(2 * n * ldh), ++seed, 2.0));
    auto other = round_bf16(randn<float>(std::size_t(n * lds), ++seed, 2.0));
    std::vector<float> want = h;
    ref.swiglu({want.data(), ldh, n, hidden, below ? want.data() + n * ldh : other.data(), lds});
    {
      DBuf<float> dh(h), dother(other);
      dev.swiglu({dh.p, ldh, n, hidden, below ? dh.p + n * ldh : dother.p, lds});
      const double e = rel_l2(dh.get(), want);
      MESSAGE("swiglu - sub f32 n=" << n << " hidden=" << hidden << ": rel L2 " << e);
      CHECK(e < 1e-6);
    }
    cuda::CudaDevice<cuda::bf16> dev16;
    DBuf<cuda::bf16> dh(to_bf16(h)), dother(to_bf16(other));
    dev16.swiglu({dh.p, ldh, n, hidden, below ? dh.p + n * ldh : dother.p, lds});
    const auto got = to_f32(dh.get());
    std::int64_t outside = 0;  // one bf16 rounding of the f32 result, plus f32 slack for cancellation
    for (std::size_t i = 0; i < h.size(); ++i) outside += std::fabs(got[i] - want[i]) > std::ldexp(std::fabs(want[i]), -8) * 1.0001 + 1e-5;
    MESSAGE("swiglu - sub bf16 n=" << n << " hidden=" << hidden << ": " << outside << " elements outside one rounding");
    CHECK(outside == 0);
  }
  for (auto [n, dim, alpha] : {std::tuple{1, 3, -1.0f}, {77, 256, 1.0f}, {130, 1000, 0.37f}}) {
    const std::int64_t ldx = dim + 3, ldy = dim + 1;
    auto x = randn<float>(std::size_t(n * ldx), ++seed);
    auto y = randn<float>(std::size_t(n * ldy), ++seed);
    DBuf<float> dx(x), dy(y);
    dev.axpy_rows({dx.p, ldx, dy.p, ldy, n, dim, alpha});
    ref.axpy_rows({x.data(), ldx, y.data(), ldy, n, dim, alpha});
    const bool exact = same_bits(dy.get(), y);
    MESSAGE("axpy_rows n=" << n << " dim=" << dim << ": bit-exact " << exact);
    CHECK(exact);
  }
}

namespace {

// A reference-search problem on the host: x [n, ldx], refs [m, ldr], visible counts per row.
struct RefProblem {
  std::int64_t n, m, ldx, ldr;
  int dim, k;
  std::vector<float> x, r;
  std::vector<std::int32_t> vis;
};

// Grid values (small multiples of 1/2: exact in bf16, every score exact in f32, many exact ties) with
// random visibility, rows 0 and 1 seeing none and all.
RefProblem grid_ref_problem(std::int64_t n, std::int64_t m, int dim, int k, int padx, int padr, std::uint32_t& seed) {
  RefProblem p{n, m, dim + padx, dim + padr, dim, k, {}, {}, {}};
  p.x = grid_values(std::size_t(n * p.ldx), ++seed, -2, 2, 2.f);
  p.r = grid_values(std::size_t(std::max<std::int64_t>(m, 1) * p.ldr), ++seed, -2, 2, 2.f);
  p.vis.resize(std::size_t(n));
  std::mt19937 rng(++seed);
  for (auto& v : p.vis) v = std::int32_t(rng() % std::uint32_t(m + 1));
  if (n > 2) p.vis[0] = 0, p.vis[1] = std::int32_t(m);
  return p;
}

// Gaussian values (rounded to T's precision), row i seeing m - n + i references.
template <class T>
RefProblem gaussian_ref_problem(std::int64_t n, std::int64_t m, int dim, int k, std::uint32_t& seed) {
  RefProblem p{n, m, dim, dim, dim, k, randn<float>(std::size_t(n * dim), ++seed), randn<float>(std::size_t(m * dim), ++seed), {}};
  if constexpr (!std::is_same_v<T, float>) {
    p.x = round_bf16(p.x);
    p.r = round_bf16(p.r);
  }
  for (std::int64_t i = 0; i < n; ++i) p.vis.push_back(std::int32_t(m - n + i));
  return p;
}

// The device's ids (poisoned first) and the CPU oracle's for one problem and metric.
// Rows past the m references that the device may read (m_readable = m + rows): NaN, or rows that
// would win for every query row if they were ever considered (zero L2 distance to some x rows, the
// largest dot products): they must never be chosen, nor spoil a score.
struct ReadableExtra {
  std::int64_t rows = 0;
  bool winning = false;  // false: NaN
};
template <class T>
std::pair<std::vector<std::int32_t>, std::vector<std::int32_t>> ref_search_both(cuda::CudaDevice<T>& dev, const RefProblem& q,
                                                                                Metric metric, bool* tensor_path = nullptr,
                                                                                ReadableExtra extra = {}) {
  auto up = [](const std::vector<float>& v) {
    if constexpr (std::is_same_v<T, float>) return DBuf<float>(v);
    else return DBuf<T>(to_bf16(v));
  };
  auto dx = up(q.x);
  std::vector<float> r_ext(q.r);
  r_ext.resize(q.r.size() + std::size_t(extra.rows * q.ldr), std::numeric_limits<float>::quiet_NaN());
  for (std::int64_t e = 0; extra.winning && e < extra.rows; ++e)  // 4x (dot) or a copy of (l2) x row e % n: exact in bf16
    for (int d = 0; d < q.dim; ++d)
      r_ext[std::size_t((q.m + e) * q.ldr + d)] = (metric == Metric::dot ? 4.f : 1.f) * q.x[std::size_t((e % q.n) * q.ldx + d)];
  auto dr = up(r_ext);
  DBuf<std::int32_t> dvis(q.vis), dids(std::size_t(q.n * q.k));
  dids.poison(0x5A);  // not -1: "no reference" is a valid id, and every one must be written
  const RefSearchParams<T> rp{dx.p, q.ldx, q.n, dr.p, q.ldr, q.m, dvis.p, q.dim, q.k, metric, dids.p,
                              extra.rows > 0 ? q.m + extra.rows : 0};
  if (tensor_path)
    *tensor_path = dev.tensor_cores() && (dev.vendor_gemm() ? gpu::ref_search_gemm_eligible(rp) : gpu::ref_search_mma_eligible(rp));
  dev.ref_search(rp);
  std::vector<std::int32_t> want(std::size_t(q.n * q.k), -7);
  cpu::CpuDevice<float> ref;
  ref.ref_search({q.x.data(), q.ldx, q.n, q.r.data(), q.ldr, q.m, q.vis.data(), q.dim, q.k, metric, want.data()});
  return {dids.get(), want};
}

std::int64_t ids_differing(const std::pair<std::vector<std::int32_t>, std::vector<std::int32_t>>& gw) {
  std::int64_t diff = 0;
  for (std::size_t i = 0; i < gw.first.size(); ++i) diff += gw.first[i] != gw.second[i];
  return diff;
}

int rows_differing(const std::pair<std::vector<std::int32_t>, std::vector<std::int32_t>>& gw, std::int64_t n, int k) {
  int rows = 0;
  for (std::int64_t i = 0; i < n; ++i)
    rows += !std::equal(gw.first.begin() + i * k, gw.first.begin() + (i + 1) * k, gw.second.begin() + i * k);
  return rows;
}

struct RefShape {
  std::int64_t n, m;
  int dim, k;
};

}  // namespace

TEST_CASE("cuda ref_search picks the same references as the CPU, ties included") {
  DKT_REQUIRE_CUDA();
  cuda::CudaDevice<float> dev;
  std::uint32_t seed = 300;
  // Grid-valued data: every score is exact in f32, so ids must agree bit for bit, and the many
  // exact ties (small integer range) exercise "ties keep the earlier reference".
  for (Metric metric : {Metric::l2, Metric::dot, Metric::cosine}) {
    for (RefShape s : {RefShape{1, 0, 64, 4}, {5, 3, 32, 4}, {37, 50, 64, 4}, {128, 300, 256, 4}, {200, 1000, 256, 1},
                       {130, 700, 2048, 8}, {64, 2000, 128, 16}}) {
      const RefProblem q = grid_ref_problem(s.n, s.m, s.dim, s.k, 2, 6, seed);
      const std::int64_t diff = ids_differing(ref_search_both(dev, q, metric));
      MESSAGE("ref_search metric=" << int(metric) << " n=" << s.n << " m=" << s.m << " dim=" << s.dim << " k=" << s.k
                                   << ": " << diff << " differing ids");
      CHECK(diff == 0);
    }
  }
  // Gaussian data: scores round differently, so only near-ties may differ (expect none).
  for (Metric metric : {Metric::l2, Metric::dot, Metric::cosine}) {
    const RefProblem q = gaussian_ref_problem<float>(128, 900, 256, 4, seed);
    const int rows = rows_differing(ref_search_both(dev, q, metric), q.n, q.k);
    MESSAGE("ref_search gaussian metric=" << int(metric) << ": " << rows << " of " << q.n << " rows differ");
    CHECK(rows <= 1);
  }
}

TEST_CASE("cuda bf16 ref_search on tensor cores picks the same references as the CPU, ties included") {
  // Grid values are exact in bf16, and every product and partial sum of them is exact in f32, so
  // the tensor-core scores equal the CPU's bit for bit: ids must agree, ties to the earlier
  // reference included. k <= 8, metric l2 / dot and >= 64 rows take the tensor-core paths (checked
  // below): the scores as cuBLAS GEMMs (the default; chunks of 4096 rows x 4096 references, so the
  // 4200-row and 4097- / 5000-reference shapes cross chunk boundaries; chunks of >= 2048 rows, as the
  // 2100 / 4200-row shapes make, fold their top-k with a warp per row, smaller ones with a block per
  // row) or ref_search_mma_kernel (set_vendor_gemm false); the other shapes fall back to the
  // CUDA-core kernel and are checked too.
  DKT_REQUIRE_CUDA();
  if (!tensor_tiles_built()) return;
  cuda::CudaDevice<cuda::bf16> dev;
  dev.set_tensor_cores(true);
  std::uint32_t seed = 1700;
  for (const bool vendor : {true, false})
  for (Metric metric : {Metric::l2, Metric::dot, Metric::cosine}) {
    dev.set_vendor_gemm(vendor);
    for (RefShape s : {RefShape{1, 0, 64, 4}, {5, 3, 32, 4}, {37, 50, 64, 4}, {128, 300, 256, 4}, {200, 1000, 256, 1},
                       {130, 700, 2048, 8}, {300, 3000, 128, 4}, {64, 2000, 200, 2}, {64, 500, 128, 16}, {64, 0, 64, 4},
                       {70, 4097, 32, 8}, {130, 5000, 128, 4}, {2100, 300, 64, 4}, {4200, 300, 64, 4}}) {
      const RefProblem q = grid_ref_problem(s.n, s.m, s.dim, s.k, 8, 16, seed);  // strides: multiples of 8
      bool tc = false;
      const std::int64_t diff = ids_differing(ref_search_both(dev, q, metric, &tc));
      MESSAGE("bf16 ref_search (" << std::string(tc ? (vendor ? "cuBLAS scores" : "tensor cores") : "CUDA cores") << ") metric=" << int(metric) << " n=" << s.n
                                  << " m=" << s.m << " dim=" << s.dim << " k=" << s.k << ": " << diff << " differing ids");
      CHECK(tc == (metric != Metric::cosine && s.k <= 8 && s.n >= 64));
      CHECK(diff == 0);
    }
  }
  // The GEMM path also takes what the mma kernel refuses (odd widths, strides off 16-byte pieces),
  // one shape crosses both chunk sizes at once (rows carried over 4096-reference chunks), and the
  // top-k kernel is instantiated per k: k 5, 6 and 7 (with reference counts off multiples of 8, so
  // the scores come from two GEMMs) only run here.
  dev.set_vendor_gemm(true);
  REQUIRE(dev.vendor_gemm());
  for (Metric metric : {Metric::l2, Metric::dot})
    for (RefShape s : {RefShape{96, 500, 61, 4}, {2100, 4100, 16, 3}, {4200, 4100, 16, 3}, {100, 901, 64, 5}, {150, 4103, 40, 6}, {80, 1299, 96, 7}}) {
      const RefProblem q = grid_ref_problem(s.n, s.m, s.dim, s.k, 3, 5, seed);  // strides dim + 3, dim + 5
      bool tc = false;
      const std::int64_t diff = ids_differing(ref_search_both(dev, q, metric, &tc));
      MESSAGE("bf16 ref_search (cuBLAS scores, odd strides) metric=" << int(metric) << " n=" << s.n << " m=" << s.m
                                                                   << " dim=" << s.dim << " k=" << s.k << ": " << diff
                                                                   << " differing ids");
      CHECK(tc);
      CHECK(diff == 0);
    }
  // m_readable past m (the cache's reference store holds whole groups of 8 rows): the scores of a
  // reference count off a multiple of 8 come from one GEMM over the rounded-up count; the extra rows
  // (NaN, or rows that would win) must never be chosen. Counts below 8, off 8 in the second
  // 4096-reference chunk, and one with too few readable rows to round up (1299 needs 5, has 2).
  struct ReadableShape {
    RefShape s;
    std::int64_t extra;
    bool rounds;  // the last chunk's scores from one rounded-up GEMM
  };
  for (Metric metric : {Metric::l2, Metric::dot})
    for (const bool winning : {false, true})
      for (const ReadableShape rs : {ReadableShape{{96, 5, 64, 4}, 3, true}, {{100, 901, 64, 4}, 7, true}, {{150, 4103, 40, 6}, 8, true},
                                     {{80, 1299, 96, 7}, 2, false}, {{2100, 300, 64, 4}, 4, true}}) {
        const RefShape s = rs.s;
        const RefProblem q = grid_ref_problem(s.n, s.m, s.dim, s.k, 8, 16, seed);
        const RefSearchParams<cuda::bf16> shape{nullptr, q.ldx, q.n, nullptr, q.ldr, q.m, nullptr, q.dim, q.k, metric, nullptr,
                                                q.m + rs.extra};
        CHECK(cuda::CudaDevice<cuda::bf16>::ref_scores_rounded_up(shape, (q.m - 1) / gpu::kRsChunkRefs * gpu::kRsChunkRefs) ==
              rs.rounds);
        bool tc = false;
        const std::int64_t diff = ids_differing(ref_search_both(dev, q, metric, &tc, ReadableExtra{rs.extra, winning}));
        MESSAGE("bf16 ref_search (cuBLAS scores, m_readable m + " << rs.extra << std::string(winning ? ", winning rows" : ", NaN rows")
                                                                  << ") metric=" << int(metric) << " n=" << s.n << " m=" << s.m
                                                                  << " k=" << s.k << ": " << diff << " differing ids");
        CHECK(tc);
        CHECK(diff == 0);
      }
  // ref_sq_norms: the cache's kept norms (m_readable = m rounded up to 8 entries, as the cache
  // gives them). Right ones give the CPU's l2 ids; zeros turn the l2 scores into -2 x.r, so the ids
  // become the dot metric's: the kernel reads them, not its own (4103 references: two chunks, the
  // second read at offset 4096). Zeros the top-k could not read whole (no readable rows past
  // m = 1001) or not 16-byte aligned are ignored: the l2 ids again.
  enum class Given { right, zeros, zeros_short, zeros_misaligned };
  for (const std::int64_t m : {std::int64_t{1001}, std::int64_t{4103}})
    for (const Given given : {Given::right, Given::zeros, Given::zeros_short, Given::zeros_misaligned}) {
      const bool zeros = given != Given::right, readable = given != Given::zeros_short;
      const RefProblem q = grid_ref_problem(300, m, 64, 4, 8, 16, seed);
      const std::int64_t rows = readable ? (q.m + 7) / 8 * 8 : q.m, off = given == Given::zeros_misaligned ? 1 : 0;
      std::vector<float> norms(std::size_t(rows + off), 0.f), r_ext(q.r);
      r_ext.resize(std::size_t(rows * q.ldr), 0.f);
      for (std::int64_t j = 0; !zeros && j < q.m; ++j)
        for (int d = 0; d < q.dim; ++d) norms[std::size_t(j)] += q.r[std::size_t(j * q.ldr + d)] * q.r[std::size_t(j * q.ldr + d)];
      DBuf<cuda::bf16> dx(to_bf16(q.x)), dr(to_bf16(r_ext));
      DBuf<std::int32_t> dvis(q.vis), dids(std::size_t(q.n * q.k));
      DBuf<float> dn(norms);
      dids.poison(0x5A);
      dev.ref_search({dx.p, q.ldx, q.n, dr.p, q.ldr, q.m, dvis.p, q.dim, q.k, Metric::l2, dids.p, readable ? rows : 0, dn.p + off});
      std::vector<std::int32_t> want(std::size_t(q.n * q.k), -7);
      cpu::CpuDevice<float> cpu_ref;
      const Metric as = given == Given::zeros ? Metric::dot : Metric::l2;
      cpu_ref.ref_search({q.x.data(), q.ldx, q.n, q.r.data(), q.ldr, q.m, q.vis.data(), q.dim, q.k, as, want.data()});
      const std::int64_t diff = ids_differing({dids.get(), want});
      MESSAGE("bf16 ref_search with given norms, m " << q.m << " ("
              << std::string(given == Given::right ? "right ones"
                             : given == Given::zeros ? "zeros: the dot metric's ids"
                             : given == Given::zeros_short ? "zeros, not readable whole: ignored"
                                                           : "zeros, misaligned: ignored")
              << "): " << diff << " differing ids");
      CHECK(diff == 0);
    }
  {
    const RefProblem q = grid_ref_problem(70, 20, 64, 4, 8, 16, seed);
    DBuf<cuda::bf16> dx(to_bf16(q.x)), dr(to_bf16(q.r));
    DBuf<std::int32_t> dvis(q.vis), dids(std::size_t(q.n * q.k));
    CHECK_THROWS_AS(dev.ref_search({dx.p, q.ldx, q.n, dr.p, q.ldr, q.m, dvis.p, q.dim, q.k, Metric::l2, dids.p, q.m - 1}),
                    ShapeError);
  }
  // Gaussian bf16 data: the f32 sums round in a different order than the CPU's, so a near-tie
  // may swap; expect at most one row of 128 to differ, as for the f32 kernel.
  for (const bool vendor : {true, false})
  for (Metric metric : {Metric::l2, Metric::dot}) {
    dev.set_vendor_gemm(vendor);
    CAPTURE(vendor);
    const RefProblem q = gaussian_ref_problem<cuda::bf16>(128, 900, 256, 4, seed);
    bool tc = false;
    const int rows = rows_differing(ref_search_both(dev, q, metric, &tc), q.n, q.k);
    MESSAGE("bf16 ref_search gaussian metric=" << int(metric) << ": " << rows << " of " << q.n << " rows differ");
    CHECK(tc);
    CHECK(rows <= 1);
  }
}

TEST_CASE("cuda gather_mean is bit-exact") {
  DKT_REQUIRE_CUDA();
  cuda::CudaDevice<float> dev;
  cpu::CpuDevice<float> ref;
  std::uint32_t seed = 400;
  // packed: strides that let the kernel take 16-byte packs (dim % 8 == 0 here; 130 never does)
  for (const bool packed : {false, true})
  for (auto [n, m, dim, k, with_rows] : {std::tuple{1, 1, 32, 1, false}, {37, 20, 256, 4, true}, {128, 500, 2048, 4, false},
                                        {300, 77, 130, 8, true}}) {
    CAPTURE(packed);
    const std::int64_t ldr = packed ? dim + 8 : dim + 4, ldo = packed ? dim + 8 : dim + 2;
    const std::int64_t idrows = n + 5;
    auto r = randn<float>(std::size_t(m * ldr), ++seed);
    std::mt19937 rng(++seed);
    std::vector<std::int32_t> ids(std::size_t(idrows * k));
    for (auto& v : ids) v = std::int32_t(rng() % std::uint32_t(m + 1)) - 1;  // -1: missing
    for (int j = 0; j < k; ++j) ids[std::size_t(j)] = -1;                     // a row without any
    std::vector<std::int64_t> rows(static_cast<std::size_t>(n));
    for (auto& v : rows) v = std::int64_t(rng() % std::uint32_t(idrows));
    DBuf<float> dr(r), dout(std::size_t(n * ldo));
    DBuf<std::int32_t> dids(ids);
    DBuf<std::int64_t> drows(rows);
    dout.poison();
    dev.gather_mean({dids.p, k, n, with_rows ? drows.p : nullptr, dr.p, ldr, dim, dout.p, ldo});
    auto want = poisoned<float>(std::size_t(n * ldo));
    ref.gather_mean({ids.data(), k, n, with_rows ? rows.data() : nullptr, r.data(), ldr, dim, want.data(), ldo});
    const bool exact = same_bits(dout.get(), want);
    MESSAGE("gather_mean n=" << n << " dim=" << dim << " k=" << k << " packed=" << packed << ": bit-exact " << exact);
    CHECK(exact);
    // bf16 storage: the same f32 sums and division, one rounding: the CPU's f32 result rounded
    cuda::CudaDevice<cuda::bf16> dev16;
    const auto r16 = round_bf16(r);
    DBuf<cuda::bf16> dr16(to_bf16(r16)), dout16(std::size_t(n * ldo));
    dout16.poison();
    dev16.gather_mean({dids.p, k, n, with_rows ? drows.p : nullptr, dr16.p, ldr, dim, dout16.p, ldo});
    auto want16 = poisoned<float>(std::size_t(n * ldo));
    ref.gather_mean({ids.data(), k, n, with_rows ? rows.data() : nullptr, r16.data(), ldr, dim, want16.data(), ldo});
    const auto got16 = to_f32(dout16.get());
    const auto want16r = round_bf16(want16);
    std::int64_t differ = 0;
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t d = 0; d < dim; ++d)
        differ += std::memcmp(&want16r[std::size_t(i * ldo + d)], &got16[std::size_t(i * ldo + d)], sizeof(float)) != 0;
    MESSAGE("gather_mean bf16 n=" << n << " dim=" << dim << " packed=" << packed << ": " << differ << " values off the rounded CPU mean");
    CHECK(differ == 0);
  }
}

// bf16: quantize(z, sub) in one pass gives the bits of axpy_rows(z, sub, -1) then quantize (both on
// the GPU: the difference is rounded to bf16 in between either way).
TEST_CASE("cuda bf16 quantize of z - sub equals axpy_rows then quantize") {
  DKT_REQUIRE_CUDA();
  cuda::CudaDevice<cuda::bf16> dev;
  for (int bits : {8, 4})
    for (const auto& shape : {std::pair{5, 64}, {3686, 512}, {17, 129}, {9, 1024}}) {
      const int n = shape.first, dim = shape.second;  // (doctest's CAPTURE may not name a structured binding under clang)
      CAPTURE(bits);
      CAPTURE(n);
      const std::int64_t bytes = bits == 8 ? dim : (dim + 1) / 2, ldq = bytes + 3;
      const auto z0 = to_bf16(randn<float>(std::size_t(n * dim), 71, 3.0));
      DBuf<cuda::bf16> dz(z0), dsub(to_bf16(randn<float>(std::size_t(n * dim), 72, 3.0)));
      DBuf<std::uint8_t> q1(std::size_t(n * ldq)), q2(std::size_t(n * ldq));
      DBuf<float> s1(std::size_t(2 * n)), s2(std::size_t(2 * n));
      q1.poison();
      q2.poison();
      dev.quantize({dz.p, dim, n, int(dim), bits, q1.p, ldq, s1.p, dsub.p, dim});
      dev.axpy_rows({dsub.p, dim, dz.p, dim, n, int(dim), cuda::bf16(-1.f)});
      dev.quantize({dz.p, dim, n, int(dim), bits, q2.p, ldq, s2.p});
      CHECK(q1.get() == q2.get());
      CHECK(s1.get() == s2.get());
      // 16-byte code rows (ldq a multiple of 16) take quantize_packs_kernel where dim % 8 == 0 (1, 2
      // and 4 packs per lane here); the odd ldq above took the element kernel: the same codes and
      // scales, of z - sub quantized in one pass (its bf16 rounding of each difference) and of the
      // axpy_rows result
      const std::int64_t ldq16 = (bytes + 15) / 16 * 16;
      const auto same_rows = [&](const std::vector<std::uint8_t>& a, const std::vector<std::uint8_t>& c) {
        bool same = true;
        for (int i = 0; i < n; ++i)
          same = same && std::equal(a.begin() + std::ptrdiff_t(i) * ldq, a.begin() + std::ptrdiff_t(i) * ldq + bytes,
                                    c.begin() + std::ptrdiff_t(i) * ldq16);
        return same;
      };
      DBuf<std::uint8_t> q3(std::size_t(n * ldq16)), q4(std::size_t(n * ldq16));
      DBuf<float> s3(std::size_t(2 * n)), s4(std::size_t(2 * n));
      q3.poison();
      s3.poison();
      q4.poison();
      s4.poison();
      dev.quantize({dz.p, dim, n, int(dim), bits, q3.p, ldq16, s3.p});  // dz holds z - sub now
      DBuf<cuda::bf16> dz0(z0);
      dev.quantize({dz0.p, dim, n, int(dim), bits, q4.p, ldq16, s4.p, dsub.p, dim});
      CHECK(same_rows(q2.get(), q3.get()));
      CHECK(s3.get() == s2.get());
      CHECK(same_rows(q1.get(), q4.get()));
      CHECK(s4.get() == s1.get());
    }
}

TEST_CASE("cuda quantize and dequantize are bit-exact, int8 and int4") {
  DKT_REQUIRE_CUDA();
  cuda::CudaDevice<float> dev;
  cpu::CpuDevice<float> ref;
  std::uint32_t seed = 500;
  // padded: odd strides, one element at a time (quantize_kernel); aligned: 16-byte rows and whole
  // code stores, the row in registers (quantize_packs_kernel, 1, 2 or 4 packs per lane; 1024 falls
  // back to the element kernel)
  for (int bits : {8, 4})
  for (const bool aligned : {false, true}) {
    CAPTURE(aligned);
    for (auto [n, dim] : {std::pair{1, 24}, {7, 255}, {128, 256}, {300, 512}, {33, 64}, {65, 400}, {9, 1024}}) {
      if (aligned && dim % 4 != 0) continue;
      const std::int64_t ldz = aligned ? dim + 4 : dim + 3;
      const std::int64_t bytes = bits == 8 ? dim : (dim + 1) / 2;
      const std::int64_t ldq = aligned ? (bytes + 15) / 16 * 16 + 16 : bytes + 5;
      auto z = randn<float>(std::size_t(n * ldz), ++seed, 3.0);
      for (int j = 0; j < dim; ++j) z[std::size_t(j)] = 1.25f;  // a constant row: scale 1
      DBuf<float> dz(z);
      DBuf<std::uint8_t> dq(std::size_t(n * ldq));
      DBuf<float> dsm(std::size_t(2 * n));
      dq.poison();
      dsm.poison();
      dev.quantize({dz.p, ldz, n, dim, bits, dq.p, ldq, dsm.p});
      auto q = poisoned<std::uint8_t>(std::size_t(n * ldq));
      std::vector<float> sm(std::size_t(2 * n), -1.f);
      ref.quantize({z.data(), ldz, n, dim, bits, q.data(), ldq, sm.data()});
      const auto gq = dq.get();
      const auto gsm = dsm.get();
      const bool codes = pack(gq, n, bytes, ldq) == pack(q, n, bytes, ldq);
      const bool scales = gsm == sm;
      MESSAGE("quantize bits=" << bits << " n=" << n << " dim=" << dim << ": codes exact " << codes << ", scale/min exact "
                               << scales);
      CHECK(codes);
      CHECK(scales);
      CHECK(padding_untouched(gq, n, bytes, ldq));
      {  // z - sub quantized in one pass: the codes and scales of quantizing axpy_rows(z, sub, -1) (CPU)
        const std::int64_t lds = aligned ? dim + 8 : dim + 1;
        auto sub = randn<float>(std::size_t(n * lds), ++seed, 2.0);
        for (int j = 0; j < dim; ++j) sub[std::size_t(j)] = 0.5f;  // row 0 stays constant
        DBuf<float> dsub(sub);
        dq.poison();
        dsm.poison();
        dev.quantize({dz.p, ldz, n, dim, bits, dq.p, ldq, dsm.p, dsub.p, lds});
        auto d = z;
        ref.axpy_rows({sub.data(), lds, d.data(), ldz, n, dim, -1.f});
        auto q2 = poisoned<std::uint8_t>(std::size_t(n * ldq));
        std::vector<float> sm2(std::size_t(2 * n), -1.f);
        ref.quantize({d.data(), ldz, n, dim, bits, q2.data(), ldq, sm2.data()});
        CHECK(pack(dq.get(), n, bytes, ldq) == pack(q2, n, bytes, ldq));
        CHECK(dsm.get() == sm2);
        auto q3 = poisoned<std::uint8_t>(std::size_t(n * ldq));  // the CPU's own fused pass agrees
        std::vector<float> sm3(std::size_t(2 * n), -1.f);
        ref.quantize({z.data(), ldz, n, dim, bits, q3.data(), ldq, sm3.data(), sub.data(), lds});
        CHECK(pack(q3, n, bytes, ldq) == pack(q2, n, bytes, ldq));
        CHECK(sm3 == sm2);
      }

      // dequantize a permuted subset of the stored rows from the CPU's codes
      std::vector<std::int64_t> rows(static_cast<std::size_t>(n));
      std::iota(rows.begin(), rows.end(), 0);
      std::shuffle(rows.begin(), rows.end(), std::mt19937(++seed));
      const std::int64_t nr = std::max<std::int64_t>(1, n - 2), ldo = dim + 1;
      DBuf<std::uint8_t> dq2(q);
      DBuf<float> dsm2(sm), dout(std::size_t(nr * ldo));
      DBuf<std::int64_t> drows(rows);
      for (bool with_rows : {false, true}) {
        dout.poison();
        dev.dequantize({dq2.p, ldq, dsm2.p, dim, bits, with_rows ? drows.p : nullptr, nr, dout.p, ldo});
        auto want = poisoned<float>(std::size_t(nr * ldo));
        ref.dequantize({q.data(), ldq, sm.data(), dim, bits, with_rows ? rows.data() : nullptr, nr, want.data(), ldo});
        const bool exact = same_bits(dout.get(), want);
        MESSAGE("dequantize bits=" << bits << " n=" << nr << " dim=" << dim << " rows=" << with_rows << ": bit-exact " << exact);
        CHECK(exact);
      }
    }
  }
}

TEST_CASE("cuda rope matches the CPU, half and interleaved, partial rotation") {
  DKT_REQUIRE_CUDA();
  cuda::CudaDevice<float> dev;
  cpu::CpuDevice<float> ref;
  std::uint32_t seed = 600;
  for (RopeStyle style : {RopeStyle::half, RopeStyle::interleaved})
    for (const Heads& hh : kHeads)
      for (int rot : {hh.hd, hh.hd / 2})
        for (std::int64_t n : {1, 37, 128}) {
          const int heads = hh.hkv;
          const std::int64_t ldx = std::int64_t(heads) * hh.hd + 7;
          auto x = randn<float>(std::size_t(n * ldx), ++seed);
          std::mt19937 rng(++seed);
          std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
          for (auto& p : pos) p = std::int64_t(rng() % 131072);
          const double theta = rot == hh.hd ? 10000.0 : 500000.0;
          DBuf<float> dx(x);
          DBuf<std::int64_t> dpos(pos);
          dev.rope({dx.p, ldx, n, dpos.p, heads, hh.hd, rot, style, theta});
          ref.rope({x.data(), ldx, n, pos.data(), heads, hh.hd, rot, style, theta});
          const double e = rel_l2(dx.get(), x);
          MESSAGE("rope style=" << int(style) << " heads=" << heads << " d=" << hh.hd << " rot=" << rot << " n=" << n
                                << ": rel L2 " << e);
          CHECK(e < 1e-6);
        }
}

namespace {

// Several attn_tile calls (tiles of keys at increasing positions) then attn_finish, on both
// devices; compares the running statistics and the output. Returns the final m, l for score_tile.
struct AttnCase {
  Heads h;
  int nq;
  std::vector<int> tiles;  // keys per call
};

}  // namespace

TEST_CASE("cuda attn_tile, attn_finish and score_tile match the CPU (GQA, causal, empty rows)") {
  DKT_REQUIRE_CUDA();
  cuda::CudaDevice<float> dev;
  cpu::CpuDevice<float> ref;
  std::uint32_t seed = 700;
  const AttnCase cases[] = {{kHeads[0], 1, {128}},        {kHeads[0], 5, {128, 128, 7}}, {kHeads[0], 3, {300, 1}},
                            {kHeads[1], 1, {128, 100}},   {kHeads[1], 8, {77, 128, 300}},
                            {kHeads[0], 2, {5000, 64}}};  // a tile longer than the kernel's chunk
  for (const auto& c : cases) {
    const int hq = c.h.hq, hkv = c.h.hkv, hd = c.h.hd;
    const std::int64_t qd = std::int64_t(hq) * hd, kd = std::int64_t(hkv) * hd, D = 2 * kd;
    const std::int64_t ldq = qd + 3, ldkv = D + 5;
    std::int64_t total = 0;
    for (int t : c.tiles) total += t;
    auto q = randn<float>(std::size_t(c.nq * ldq), ++seed);
    // query positions: the last row sees everything, the first (when nq > 1) nothing at all
    std::vector<std::int64_t> qpos(std::size_t(c.nq));
    std::mt19937 rng(++seed);
    for (int i = 0; i < c.nq; ++i) qpos[std::size_t(i)] = std::int64_t(rng() % std::uint32_t(total + 10)) + 3;
    qpos.back() = total + 2;
    if (c.nq > 1) qpos[0] = 0;
    const double scale = 1.0 / std::sqrt(double(hd));
    const std::size_t st = std::size_t(c.nq) * hq;
    std::vector<float> m(st, 0.f), l(st, 0.f), acc(st * hd, 0.f);
    DBuf<float> dq(q), dm(m), dl(l), dacc(acc);
    DBuf<std::int64_t> dqpos(qpos);
    std::int64_t pos0 = 3;  // keys at positions 3, 4, ...
    std::vector<float> last_kv;
    std::vector<std::int64_t> last_pos;
    for (int nt : c.tiles) {
      auto kv = randn<float>(std::size_t(nt * ldkv), ++seed);
      std::vector<std::int64_t> kvpos(static_cast<std::size_t>(nt));
      for (int j = 0; j < nt; ++j) kvpos[std::size_t(j)] = pos0 + j;
      pos0 += nt;
      DBuf<float> dkv(kv);
      DBuf<std::int64_t> dkvpos(kvpos);
      dev.attn_tile({dq.p, ldq, c.nq, dqpos.p, dkv.p, dkv.p + kd, ldkv, nt, dkvpos.p, hq, hkv, hd, scale, dm.p, dl.p, dacc.p});
      ref.attn_tile({q.data(), ldq, c.nq, qpos.data(), kv.data(), kv.data() + kd, ldkv, nt, kvpos.data(), hq, hkv, hd, scale,
                     m.data(), l.data(), acc.data()});
      last_kv = kv;
      last_pos = kvpos;
    }
    const double em = rel_l2(dm.get(), m), el = rel_l2(dl.get(), l), ea = rel_l2(dacc.get(), acc);
    const std::int64_t ldo = qd + 1;
    DBuf<float> dout(std::size_t(c.nq * ldo));
    dout.poison();
    dev.attn_finish({dl.p, dacc.p, c.nq, hq, hd, dout.p, ldo});
    auto out = poisoned<float>(std::size_t(c.nq * ldo));
    ref.attn_finish({l.data(), acc.data(), c.nq, hq, hd, out.data(), ldo});
    const auto gout = dout.get();
    const double eo = rel_l2(pack(gout, c.nq, qd, ldo), pack(out, c.nq, qd, ldo));
    MESSAGE("attn hq=" << hq << " hkv=" << hkv << " d=" << hd << " nq=" << c.nq << " keys=" << total << ": rel L2 m " << em
                       << ", l " << el << ", acc " << ea << ", out " << eo);
    CHECK(em < 1e-5);
    CHECK(el < 1e-5);
    CHECK(ea < 1e-5);
    CHECK(eo < 1e-5);
    CHECK(padding_untouched(gout, c.nq, qd, ldo));
    if (c.nq > 1) {  // row 0 saw nothing: exact zeros
      bool zeros = true;
      for (std::int64_t e = 0; e < qd; ++e) zeros = zeros && gout[std::size_t(e)] == 0.f;
      CHECK(zeros);
    }

    // score_tile over the last tile with the final statistics (CPU's, given to both)
    const int nt = static_cast<int>(last_pos.size());
    DBuf<float> dkv(last_kv), dm2(m), dl2(l), dscores(std::size_t(nt) + 3);
    DBuf<std::int64_t> dkvpos(last_pos);
    dscores.poison();
    dev.score_tile({dq.p, ldq, c.nq, dqpos.p, dkv.p, ldkv, nt, dkvpos.p, hq, hkv, hd, scale, dm2.p, dl2.p, dscores.p});
    std::vector<float> scores(static_cast<std::size_t>(nt));
    ref.score_tile({q.data(), ldq, c.nq, qpos.data(), last_kv.data(), ldkv, nt, last_pos.data(), hq, hkv, hd, scale, m.data(),
                    l.data(), scores.data()});
    auto gs = dscores.get();
    const bool tail = padding_untouched(gs, 1, nt, nt + 3);
    gs.resize(static_cast<std::size_t>(nt));
    const double es = rel_l2(gs, scores);
    MESSAGE("score_tile keys=" << nt << ": rel L2 " << es);
    CHECK(es < 1e-5);
    CHECK(tail);
  }
}

TEST_CASE("cuda page_bounds is exact across calls and page_score matches the CPU") {
  DKT_REQUIRE_CUDA();
  cuda::CudaDevice<float> dev;
  cpu::CpuDevice<float> ref;
  std::uint32_t seed = 800;
  for (const Heads& hh : kHeads)
    for (int page : {16, 5}) {
      const int dim = hh.hkv * hh.hd;
      const std::int64_t ldk = 2 * dim;
      const std::int64_t chunks[] = {37, 128, 1, 90};
      std::int64_t total = 0;
      for (auto c : chunks) total += c;
      const std::int64_t pages = (total + page - 1) / page + 2;
      DBuf<float> dmin(std::size_t(pages * dim)), dmax(std::size_t(pages * dim));
      dmin.poison();
      dmax.poison();
      auto kmin = poisoned<float>(std::size_t(pages * dim)), kmax = poisoned<float>(std::size_t(pages * dim));
      std::int64_t pos0 = 0;
      for (auto n : chunks) {
        auto k = randn<float>(std::size_t(n * ldk), ++seed);
        std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
        std::iota(pos.begin(), pos.end(), pos0);
        pos0 += n;
        DBuf<float> dk(k);
        DBuf<std::int64_t> dpos(pos);
        dev.page_bounds({dk.p, ldk, n, dpos.p, page, dim, dmin.p, dmax.p});
        ref.page_bounds({k.data(), ldk, n, pos.data(), page, dim, kmin.data(), kmax.data()});
      }
      const bool exact = same_bits(dmin.get(), kmin) && same_bits(dmax.get(), kmax);
      MESSAGE("page_bounds dim=" << dim << " page=" << page << " tokens=" << total << ": bit-exact " << exact);
      CHECK(exact);

      const std::int64_t n_pages = (total + page - 1) / page;
      for (int nq : {1, 4}) {
        const std::int64_t ldq = std::int64_t(hh.hq) * hh.hd + 2;
        auto q = randn<float>(std::size_t(nq * ldq), ++seed);
        DBuf<float> dq(q), dscores(static_cast<std::size_t>(n_pages));
        dscores.poison();
        dev.page_score({dq.p, ldq, nq, dmin.p, dmax.p, n_pages, hh.hq, hh.hkv, hh.hd, dscores.p});
        std::vector<float> scores(static_cast<std::size_t>(n_pages));
        ref.page_score({q.data(), ldq, nq, kmin.data(), kmax.data(), n_pages, hh.hq, hh.hkv, hh.hd, scores.data()});
        const double e = rel_l2(dscores.get(), scores);
        MESSAGE("page_score hq=" << hh.hq << " d=" << hh.hd << " nq=" << nq << " pages=" << n_pages << ": rel L2 " << e);
        CHECK(e < 1e-5);
      }
    }
  // many pages (grid-stride path)
  {
    const Heads hh = kHeads[0];
    const int dim = hh.hkv * hh.hd;
    const std::int64_t n_pages = 70000;
    auto a = randn<float>(std::size_t(n_pages * dim), 9), b = randn<float>(std::size_t(n_pages * dim), 10);
    auto q = randn<float>(std::size_t(hh.hq * hh.hd), 11);
    DBuf<float> da(a), db(b), dq(q), dscores(static_cast<std::size_t>(n_pages));
    dscores.poison();
    dev.page_score({dq.p, hh.hq * hh.hd, 1, da.p, db.p, n_pages, hh.hq, hh.hkv, hh.hd, dscores.p});
    std::vector<float> scores(static_cast<std::size_t>(n_pages));
    ref.page_score({q.data(), hh.hq * hh.hd, 1, a.data(), b.data(), n_pages, hh.hq, hh.hkv, hh.hd, scores.data()});
    const double e = rel_l2(dscores.get(), scores);
    MESSAGE("page_score pages=" << n_pages << ": rel L2 " << e);
    CHECK(e < 1e-5);
  }
}

TEST_CASE("cuda topk equals the CPU exactly, ties to the lower index") {
  DKT_REQUIRE_CUDA();
  cuda::CudaDevice<float> dev;
  cpu::CpuDevice<float> ref;
  std::uint32_t seed = 900;
  enum Kind { distinct, ties, zeros_and_negatives, probabilities };
  struct S {
    std::int64_t n;
    int k;
    Kind kind;
  };
  for (S s : {S{1, 1, distinct}, S{5, 9, distinct}, S{100, 17, ties}, S{1000, 1000, ties}, S{5000, 64, zeros_and_negatives},
              S{131072, 2048, distinct}, S{200003, 2048, ties}, S{200003, 5000, distinct}, S{70000, 9000, ties},
              S{4097, 4096, distinct}, S{3, 2, zeros_and_negatives}, S{131072, 2048, probabilities},
              S{300001, 100, probabilities}, S{20000, 6000, probabilities}}) {
    std::vector<float> sc(std::size_t(s.n));
    std::mt19937 rng(++seed);
    if (s.kind == distinct) {
      for (std::int64_t i = 0; i < s.n; ++i) sc[std::size_t(i)] = float(i) * 0.25f - 1000.f;
      std::shuffle(sc.begin(), sc.end(), rng);
    } else if (s.kind == ties) {
      for (auto& v : sc) v = float(rng() % 10);
    } else if (s.kind == probabilities) {  // what score_tile produces: few exponents, some ties
      for (auto& v : sc) v = float(rng() % 100000) * 1e-7f;
    } else {
      const float vals[] = {0.f, -0.f, -1.5f, 2.f, -1e30f, 1e-30f};
      for (auto& v : sc) v = vals[rng() % 6];
    }
    DBuf<float> dsc(sc);
    DBuf<std::int32_t> didx(std::size_t(s.k));
    didx.poison();
    dev.topk({dsc.p, s.n, s.k, didx.p});
    std::vector<std::int32_t> want(std::size_t(s.k), -1);
    ref.topk({sc.data(), s.n, s.k, want.data()});
    const auto got = didx.get();
    const bool exact = got == want;  // entries past min(k, n) stay -1 (poison) on both
    MESSAGE("topk n=" << s.n << " k=" << s.k << " kind=" << int(s.kind) << ": exact " << exact);
    CHECK(exact);
  }
}

TEST_CASE("cuda copy_rows is exact with and without row lists") {
  DKT_REQUIRE_CUDA();
  cuda::CudaDevice<float> dev;
  cpu::CpuDevice<float> ref;
  std::uint32_t seed = 1000;
  for (auto [n, dim, lds, ldd] : {std::tuple{1, 64, 64, 64}, {37, 256, 260, 256}, {128, 33, 40, 33}, {300, 2048, 2048, 2052},
                                  {5, 3, 7, 5}}) {
    const std::int64_t src_n = n + 11, dst_n = n + 7;
    auto src = randn<float>(std::size_t(src_n * lds), ++seed);
    std::mt19937 rng(++seed);
    std::vector<std::int64_t> srows(static_cast<std::size_t>(n)), drows(static_cast<std::size_t>(dst_n));
    for (auto& v : srows) v = std::int64_t(rng() % std::uint32_t(src_n));
    std::iota(drows.begin(), drows.end(), 0);
    std::shuffle(drows.begin(), drows.end(), rng);  // distinct destinations
    drows.resize(static_cast<std::size_t>(n));
    for (bool lists : {false, true}) {
      DBuf<float> ds(src), dd(std::size_t(dst_n * ldd));
      DBuf<std::int64_t> dsr(srows), ddr(drows);
      dd.poison();
      dev.copy_rows({ds.p, lds, lists ? dsr.p : nullptr, dd.p, ldd, lists ? ddr.p : nullptr, n, dim});
      auto want = poisoned<float>(std::size_t(dst_n * ldd));
      ref.copy_rows({src.data(), lds, lists ? srows.data() : nullptr, want.data(), ldd, lists ? drows.data() : nullptr, n, dim});
      const bool exact = same_bits(dd.get(), want);
      MESSAGE("copy_rows n=" << n << " dim=" << dim << " lds=" << lds << " ldd=" << ldd << " lists=" << lists << ": exact "
                             << exact);
      CHECK(exact);
    }
    {  // listed source rows read at an offset (src_row_base): the same copy as the plain list
      const std::int64_t base = 1000;
      std::vector<std::int64_t> shifted(srows);
      for (auto& v : shifted) v += base;
      DBuf<float> ds(src), dd(std::size_t(dst_n * ldd));
      DBuf<std::int64_t> dsr(shifted), ddr(drows);
      dd.poison();
      dev.copy_rows({ds.p, lds, dsr.p, dd.p, ldd, ddr.p, n, dim, base});
      auto want = poisoned<float>(std::size_t(dst_n * ldd));
      ref.copy_rows({src.data(), lds, srows.data(), want.data(), ldd, drows.data(), n, dim});
      CHECK(same_bits(dd.get(), want));
      auto cpu_base = poisoned<float>(std::size_t(dst_n * ldd));
      ref.copy_rows({src.data(), lds, shifted.data(), cpu_base.data(), ldd, drows.data(), n, dim, base});
      CHECK(same_bits(cpu_base, want));
    }
  }
}

TEST_CASE("cuda copy_rows_batch is exact, in one launch and part by part") {
  DKT_REQUIRE_CUDA();
  cuda::CudaDevice<float> dev;
  cpu::CpuDevice<float> ref;
  using Dev = cuda::CudaDevice<float>;
  // A compression pass's four gathers: a store and a workspace, each filled from a ring (slot
  // lists) and from an input (position lists read at an offset).
  const int dim = 256;
  const std::int64_t ring_n = 40, in_n = 700, base = 5000, store_n = 64;
  std::uint32_t seed = 4000;
  const auto ring = randn<float>(std::size_t(ring_n * dim), ++seed);
  struct Shape {
    std::int64_t ldi;  // the input's row stride (dim + 3: rows not 16-byte aligned, part by part)
    int last_dim;      // the workspace's input part's row width (not dim: part by part)
    std::int64_t n2;   // the workspace's ring part's rows (0: an empty part, skipped)
    bool fused;
  };
  for (const Shape sh : {Shape{dim, dim, 17, true}, Shape{dim + 8, dim, 0, true}, Shape{dim + 3, dim, 17, false},
                         Shape{dim, dim - 4, 17, false}}) {
    const auto input = randn<float>(std::size_t(in_n * sh.ldi), ++seed);
    std::mt19937 rng(++seed);
    auto pick = [&](std::int64_t n, std::int64_t range, std::int64_t off) {
      std::vector<std::int64_t> v(static_cast<std::size_t>(n));
      for (auto& x : v) x = off + std::int64_t(rng() % std::uint32_t(range));
      return v;
    };
    const std::int64_t n[4] = {9, 31, sh.n2, 600};
    const auto l0 = pick(n[0], ring_n, 0), l1 = pick(n[1], in_n, base), l2 = pick(n[2], ring_n, 0), l3 = pick(n[3], in_n, base);
    const std::int64_t ws_n = n[2] + n[3];
    // the same batch over device or host buffers (store rows from 3 on, as a pass writes past n_refs)
    auto batch = [&](const float* rp, const float* ip, const std::int64_t* s0, const std::int64_t* s1, const std::int64_t* s2,
                     const std::int64_t* s3, float* st, float* ws) {
      CopyRowsBatchParams<float> b{};
      b.part[0] = {rp, dim, s0, st + 3 * dim, dim, nullptr, n[0], dim};
      b.part[1] = {ip, sh.ldi, s1, st + (3 + n[0]) * dim, dim, nullptr, n[1], dim, base};
      b.part[2] = {rp, dim, s2, ws, dim, nullptr, n[2], dim};
      b.part[3] = {ip, sh.ldi, s3, ws + n[2] * dim, dim, nullptr, n[3], sh.last_dim, base};
      b.n_parts = 4;
      return b;
    };
    DBuf<float> dring(ring), din(input), dstore(std::size_t(store_n * dim)), dws(std::size_t(ws_n * dim));
    DBuf<std::int64_t> d0(l0), d1(l1), d2(l2), d3(l3);
    dstore.poison();
    dws.poison();
    auto b = batch(dring.p, din.p, d0.p, d1.p, d2.p, d3.p, dstore.p, dws.p);
    // the store parts' norms (the cache's reference norms), poisoned first: both launch paths
    DBuf<float> dnorms(std::size_t(n[0] + n[1]));
    dnorms.poison();
    b.sq_norms[0] = dnorms.p;
    b.sq_norms[1] = dnorms.p + n[0];
    CHECK(Dev::copy_rows_batch_fused(b) == sh.fused);
    copy_rows_batch(dev, b);
    auto want_store = poisoned<float>(std::size_t(store_n * dim)), want_ws = poisoned<float>(std::size_t(ws_n * dim));
    const auto c = batch(ring.data(), input.data(), l0.data(), l1.data(), l2.data(), l3.data(), want_store.data(), want_ws.data());
    for (int j = 0; j < c.n_parts; ++j) ref.copy_rows(c.part[j]);
    const bool exact = same_bits(dstore.get(), want_store) && same_bits(dws.get(), want_ws);
    double worst = 0;  // the norms against float64 sums of the copied rows
    const auto got_norms = dnorms.get();
    for (std::int64_t i = 0; i < n[0] + n[1]; ++i) {
      double sq = 0;
      for (int d = 0; d < dim; ++d) sq += double(want_store[std::size_t((3 + i) * dim + d)]) * want_store[std::size_t((3 + i) * dim + d)];
      worst = std::max(worst, std::abs(got_norms[std::size_t(i)] - sq) / sq);
      if (!std::isfinite(got_norms[std::size_t(i)])) worst = 1e30;
    }
    MESSAGE("copy_rows_batch ldi=" << sh.ldi << " last dim=" << sh.last_dim << " n2=" << sh.n2 << " fused=" << sh.fused
                                   << ": exact " << exact << ", norms' worst relative error " << worst);
    CHECK(exact);
    CHECK(worst < 1e-5);  // float sums of 256 squares
  }
  {  // bf16 rows (the cache's type): 8 values per 16-byte unit summed into the norms
    cuda::CudaDevice<cuda::bf16> dev16;
    const int d16 = 2048;
    const std::int64_t na = 5, nb = 40;
    const auto src = round_bf16(randn<float>(std::size_t((na + nb) * d16), 4321));
    DBuf<cuda::bf16> dsrc(to_bf16(src)), ddst(std::size_t((na + nb) * d16));
    DBuf<float> dn(std::size_t(na + nb));
    dn.poison();
    CopyRowsBatchParams<cuda::bf16> b16{};
    b16.part[0] = {dsrc.p, d16, nullptr, ddst.p, d16, nullptr, na, d16};
    b16.part[1] = {dsrc.p + na * d16, d16, nullptr, ddst.p + na * d16, d16, nullptr, nb, d16};
    b16.n_parts = 2;
    b16.sq_norms[0] = dn.p;
    b16.sq_norms[1] = dn.p + na;
    CHECK(cuda::CudaDevice<cuda::bf16>::copy_rows_batch_fused(b16));
    copy_rows_batch(dev16, b16);
    const auto got = dn.get();
    double worst = 0;
    for (std::int64_t i = 0; i < na + nb; ++i) {
      double sq = 0;
      for (int d = 0; d < d16; ++d) sq += double(src[std::size_t(i * d16 + d)]) * src[std::size_t(i * d16 + d)];
      worst = std::isfinite(got[std::size_t(i)]) ? std::max(worst, std::abs(got[std::size_t(i)] - sq) / sq) : 1e30;
    }
    MESSAGE("copy_rows_batch bf16 norms: worst relative error " << worst);
    CHECK(worst < 1e-5);
    CHECK(same_bits(to_f32(ddst.get()), src));
  }
  {  // no parts, one part (a plain copy_rows), empty parts only, more than kMaxParts (refused)
    DBuf<float> d(16);
    d.poison();
    CopyRowsBatchParams<float> b{};
    dev.copy_rows_batch(b);
    b.part[0] = {d.p, 4, nullptr, d.p + 8, 4, nullptr, 0, 4};
    b.part[1] = b.part[0];
    b.n_parts = 2;
    CHECK_FALSE(Dev::copy_rows_batch_fused(b));
    copy_rows_batch(dev, b);
    CHECK(same_bits(d.get(), poisoned<float>(16)));
    b.part[0].n = 2;  // rows 0, 1 -> 2, 3: one non-empty part, a plain copy_rows
    CHECK_FALSE(Dev::copy_rows_batch_fused(b));
    std::vector<float> src16(16);
    for (int i = 0; i < 16; ++i) src16[std::size_t(i)] = float(i);
    d.set(src16);
    copy_rows_batch(dev, b);
    auto want = src16;
    for (int i = 0; i < 8; ++i) want[std::size_t(8 + i)] = src16[std::size_t(i)];
    CHECK(same_bits(d.get(), want));
    {  // one part asking for norms: one launch
      DBuf<float> nrm(2);
      nrm.poison();
      CopyRowsBatchParams<float> one = b;
      one.sq_norms[0] = nrm.p;
      CHECK(Dev::copy_rows_batch_fused(one));
      copy_rows_batch(dev, one);
      const auto g = nrm.get();
      CHECK(g[0] == 0.f + 1.f + 4.f + 9.f);  // row 0: 0, 1, 2, 3 (exact in float)
      CHECK(g[1] == 16.f + 25.f + 36.f + 49.f);
      one.part[0].dst_rows = reinterpret_cast<const std::int64_t*>(d.p);  // norms need contiguous rows (refused before any copy)
      CHECK_THROWS_AS(copy_rows_batch(dev, one), ShapeError);
    }
    b.n_parts = 5;
    CHECK_THROWS_AS(copy_rows_batch(dev, b), ShapeError);
    CHECK_THROWS_AS(dev.copy_rows_batch(b), ShapeError);  // the member checks too
  }
}

TEST_CASE("cuda all_finite, to_host, to_device and fill_zero") {
  DKT_REQUIRE_CUDA();
  cuda::CudaDevice<float> dev;
  cpu::CpuDevice<float> ref;
  const std::int64_t n = 300, dim = 129, ld = 133;
  auto x = randn<float>(std::size_t(n * ld), 1);
  for (std::int64_t r = 0; r < n; ++r) x[std::size_t(r * ld + dim + 1)] = std::nanf("");  // padding is not checked
  DBuf<float> dx(x);
  CHECK(dev.all_finite({dx.p, ld, n, int(dim)}) == ref.all_finite({x.data(), ld, n, int(dim)}));
  CHECK(dev.all_finite({dx.p, ld, n, int(dim)}));
  for (float bad : {std::nanf(""), INFINITY, -INFINITY}) {
    auto y = x;
    y[std::size_t((n - 1) * ld + dim - 1)] = bad;
    DBuf<float> dy(y);
    CHECK_FALSE(dev.all_finite({dy.p, ld, n, int(dim)}));
    CHECK_FALSE(ref.all_finite({y.data(), ld, n, int(dim)}));
  }
  CHECK(dev.all_finite({dx.p, ld, 0, int(dim)}));
  {  // 16-byte packs (rows a multiple of 8 bf16 / 4 floats): a bad value at each place of a pack
    cuda::CudaDevice<cuda::bf16> dev16;
    const std::int64_t rows = 70, cols = 2048, ldp = 2056;
    auto v = randn<float>(std::size_t(rows * ldp), 5);
    for (std::int64_t r = 0; r < rows; ++r) v[std::size_t(r * ldp + cols + 3)] = INFINITY;  // padding
    DBuf<cuda::bf16> dv(to_bf16(v));
    DBuf<float> dvf(v);
    CHECK(dev16.all_finite({dv.p, ldp, rows, int(cols)}));
    CHECK(dev.all_finite({dvf.p, ldp, rows, int(cols)}));
    for (std::int64_t at : {std::int64_t(0), std::int64_t(7), std::int64_t(13 * ldp + 1029), (rows - 1) * ldp + cols - 1}) {
      auto w = v;
      w[std::size_t(at)] = std::nanf("");
      DBuf<cuda::bf16> dw(to_bf16(w));
      DBuf<float> dwf(w);
      CHECK_FALSE(dev16.all_finite({dw.p, ldp, rows, int(cols)}));
      CHECK_FALSE(dev.all_finite({dwf.p, ldp, rows, int(cols)}));
    }
    CHECK(dev16.all_finite({dv.p, ldp, rows, int(cols)}));  // a clean call right after failing ones
    CHECK(dev.all_finite({dvf.p, ldp, rows, int(cols)}));
  }
  {  // more rows than the grid has blocks: each thread's later rows (bf16, 16-byte packs)
    cuda::CudaDevice<cuda::bf16> dev16;
    const std::int64_t rows = 9000, cols = 1024;
    auto v = randn<float>(std::size_t(rows * cols), 6);
    DBuf<cuda::bf16> dv(to_bf16(v));
    CHECK(dev16.all_finite({dv.p, cols, rows, int(cols)}));
    for (std::int64_t r : {std::int64_t(4300), std::int64_t(8447), rows - 1}) {
      auto w = v;
      w[std::size_t(r * cols + 517)] = INFINITY;
      DBuf<cuda::bf16> dw(to_bf16(w));
      CHECK_FALSE(dev16.all_finite({dw.p, cols, rows, int(cols)}));
      CHECK(dev16.all_finite({dv.p, cols, rows, int(cols)}));
    }
  }

  std::vector<float> h(1000);
  std::iota(h.begin(), h.end(), 0.f);
  DBuf<float> d(1000);
  dev.to_device(d.p, h.data(), h.size() * sizeof(float));
  std::vector<float> back(1000, -1.f);
  dev.to_host(back.data(), d.p, back.size() * sizeof(float));
  CHECK(back == h);
  dev.fill_zero(d.p + 10, 100 * sizeof(float));
  dev.to_host(back.data(), d.p, back.size() * sizeof(float));
  for (int i = 0; i < 1000; ++i) CHECK(back[std::size_t(i)] == (i >= 10 && i < 110 ? 0.f : float(i)));

  // a device on its own stream orders everything on it
  cuda::CudaDevice<float> own(nullptr, 1 << 20, true);
  CHECK(own.scratch_capacity() >= (1u << 20));
  own.fill_zero(d.p, 1000 * sizeof(float));
  own.to_device(d.p + 500, h.data(), 500 * sizeof(float));
  own.to_host(back.data(), d.p, back.size() * sizeof(float));
  for (int i = 0; i < 1000; ++i) CHECK(back[std::size_t(i)] == (i < 500 ? 0.f : float(i - 500)));

  // Uploads from one pageable buffer rewritten right after each call (to_device returns once the
  // caller may reuse it), queued behind other work on the stream, small and large: each lands intact.
  {
    cuda::CudaDevice<float> up;
    const std::size_t n = 20000, big = 100000;  // 80 KB, 400 KB
    std::vector<float> src(big);
    DBuf<float> many(n * 11), large(big);
    DBuf<float> busy(std::size_t(1) << 22);
    for (int r = 0; r < 11; ++r) {
      if (r % 4 == 0) up.fill_zero(busy.p, busy.n * sizeof(float));  // queued work ahead of the copies
      for (std::size_t i = 0; i < n; ++i) src[i] = float(r * 100000 + int(i));
      up.to_device(many.p + std::size_t(r) * n, src.data(), n * sizeof(float));
    }
    for (std::size_t i = 0; i < big; ++i) src[i] = -float(i);
    up.to_device(large.p, src.data(), big * sizeof(float));
    std::fill(src.begin(), src.end(), 7.f);  // the caller reuses its buffer at once
    const auto got = many.get(), got_large = large.get();
    std::int64_t wrong = 0;
    for (int r = 0; r < 11; ++r)
      for (std::size_t i = 0; i < n; ++i) wrong += got[std::size_t(r) * n + i] != float(r * 100000 + int(i));
    for (std::size_t i = 0; i < big; ++i) wrong += got_large[i] != -float(i);
    CHECK(wrong == 0);
  }
}

// bf16 storage with f32 arithmetic: against the CPU oracle on the same (bf16-rounded) inputs.
TEST_CASE("cuda bf16 hot ops match the f32 CPU oracle to bf16 rounding") {
  DKT_REQUIRE_CUDA();
  using B = cuda::bf16;
  cuda::CudaDevice<B> dev;
  cpu::CpuDevice<float> ref;
  const double bound = 1e-2;  // bf16 keeps 8 significant bits: about 2e-3 per element
  std::uint32_t seed = 1100;
  {  // linear
    const std::int64_t n = 77;
    const int in = 256, out = 96;
    auto x = round_bf16(randn<float>(std::size_t(n * in), ++seed));
    auto w = round_bf16(randn<float>(std::size_t(out * in), ++seed, 0.0625));
    auto b = round_bf16(randn<float>(std::size_t(out), ++seed));
    DBuf<B> dx(to_bf16(x)), dw(to_bf16(w)), db(to_bf16(b)), dy(std::size_t(n * out));
    dy.poison();
    dev.linear({dx.p, in, dy.p, out, n, dw.p, db.p, in, out});
    std::vector<float> y(std::size_t(n * out));
    ref.linear({x.data(), in, y.data(), out, n, w.data(), b.data(), in, out});
    const double e = rel_l2(to_f32(dy.get()), y);
    MESSAGE("bf16 linear: rel L2 " << e);
    CHECK(e < bound);
  }
  {  // copy_rows (exact), gather_mean, dequantize
    const std::int64_t n = 50, m = 30;
    const int dim = 130, k = 4;
    auto r = round_bf16(randn<float>(std::size_t(m * dim), ++seed));
    std::vector<std::int64_t> rows(static_cast<std::size_t>(n));
    std::vector<std::int32_t> ids(std::size_t(n * k));
    std::mt19937 rng(++seed);
    for (auto& v : rows) v = std::int64_t(rng() % m);
    for (auto& v : ids) v = std::int32_t(rng() % (m + 1)) - 1;
    DBuf<B> dr(to_bf16(r)), dcopy(std::size_t(n * dim)), dmean(std::size_t(n * dim));
    DBuf<std::int64_t> drows(rows);
    DBuf<std::int32_t> dids(ids);
    dcopy.poison();
    dmean.poison();
    dev.copy_rows({dr.p, dim, drows.p, dcopy.p, dim, nullptr, n, dim});
    std::vector<float> copy(std::size_t(n * dim));
    ref.copy_rows({r.data(), dim, rows.data(), copy.data(), dim, nullptr, n, dim});
    CHECK(to_f32(dcopy.get()) == copy);
    dev.gather_mean({dids.p, k, n, nullptr, dr.p, dim, dim, dmean.p, dim});
    std::vector<float> mean(std::size_t(n * dim));
    ref.gather_mean({ids.data(), k, n, nullptr, r.data(), dim, dim, mean.data(), dim});
    const double e = rel_l2(to_f32(dmean.get()), mean);
    MESSAGE("bf16 gather_mean: rel L2 " << e);
    CHECK(e < bound);

    std::vector<std::uint8_t> q(std::size_t(n * dim));
    for (auto& v : q) v = std::uint8_t(rng());
    auto sm = uniform(std::size_t(2 * n), ++seed, 0.01f, 0.1f);
    DBuf<std::uint8_t> dq(q);
    DBuf<float> dsm(sm);
    for (int bits : {8, 4}) {
      DBuf<B> dz(std::size_t(n * dim));
      dz.poison();
      dev.dequantize({dq.p, dim, dsm.p, dim, bits, drows.p, n, dz.p, dim});
      std::vector<float> z(std::size_t(n * dim));
      ref.dequantize({q.data(), dim, sm.data(), dim, bits, rows.data(), n, z.data(), dim});
      const double ez = rel_l2(to_f32(dz.get()), z);
      MESSAGE("bf16 dequantize bits=" << bits << ": rel L2 " << ez);
      CHECK(ez < bound);
    }
  }
  for (const Heads& hh : kHeads) {  // rope, attention
    const std::int64_t n = 100;
    const int nq = 3;
    const std::int64_t kd = std::int64_t(hh.hkv) * hh.hd, D = 2 * kd, qd = std::int64_t(hh.hq) * hh.hd;
    auto kv = round_bf16(randn<float>(std::size_t(n * D), ++seed));
    std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
    std::iota(pos.begin(), pos.end(), 1000);
    DBuf<B> dkv(to_bf16(kv));
    DBuf<std::int64_t> dpos(pos);
    dev.rope({dkv.p, D, n, dpos.p, hh.hkv, hh.hd, hh.hd, RopeStyle::half, 10000.0});
    auto kv_rot = kv;
    ref.rope({kv_rot.data(), D, n, pos.data(), hh.hkv, hh.hd, hh.hd, RopeStyle::half, 10000.0});
    const auto gkv = to_f32(dkv.get());
    const double er = rel_l2(gkv, kv_rot);
    MESSAGE("bf16 rope d=" << hh.hd << ": rel L2 " << er);
    CHECK(er < bound);

    auto q = round_bf16(randn<float>(std::size_t(nq * qd), ++seed));
    std::vector<std::int64_t> qpos{1050, 1099, 1200};
    DBuf<B> dq(to_bf16(q)), dout(std::size_t(nq * qd));
    DBuf<std::int64_t> dqpos(qpos);
    const std::size_t st = std::size_t(nq) * hh.hq;
    DBuf<float> dm(std::vector<float>(st, 0.f)), dl(std::vector<float>(st, 0.f)), dacc(std::vector<float>(st * hh.hd, 0.f));
    dout.poison();
    // attend over the device's own rotated keys (bf16) on both sides
    dev.attn_tile({dq.p, qd, nq, dqpos.p, dkv.p, dkv.p + kd, D, int(n), dpos.p, hh.hq, hh.hkv, hh.hd, 1.0 / std::sqrt(double(hh.hd)),
                   dm.p, dl.p, dacc.p});
    dev.attn_finish({dl.p, dacc.p, nq, hh.hq, hh.hd, dout.p, qd});
    std::vector<float> m(st, 0.f), l(st, 0.f), acc(st * hh.hd, 0.f), out(std::size_t(nq * qd));
    ref.attn_tile({q.data(), qd, nq, qpos.data(), gkv.data(), gkv.data() + kd, D, int(n), pos.data(), hh.hq, hh.hkv, hh.hd,
                   1.0 / std::sqrt(double(hh.hd)), m.data(), l.data(), acc.data()});
    ref.attn_finish({l.data(), acc.data(), nq, hh.hq, hh.hd, out.data(), qd});
    const double ea = rel_l2(to_f32(dout.get()), out);
    MESSAGE("bf16 attention hq=" << hh.hq << " d=" << hh.hd << ": rel L2 " << ea);
    CHECK(ea < bound);
  }
}

// Not a check: rough per-call times of the main ops (Llama-3.1-8B-like shapes), for the record.
// Skipped by default; run with --no-skip --test-case="cuda op timings*".
TEST_CASE("cuda op timings" * doctest::skip(true)) {
  DKT_REQUIRE_CUDA();
  cuda::CudaDevice<float> dev;
  auto time_us = [&](auto&& f) {
    f();
    dev.synchronize();
    const int reps = 50;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f();
    dev.synchronize();
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / reps;
  };
  const int hq = 32, hkv = 8, hd = 128, D = 2 * hkv * hd, dc = 512, tile = 128;
  const std::int64_t m = 2000;
  DBuf<float> x(std::vector<float>(std::size_t(tile) * D, 0.5f)), w(std::vector<float>(std::size_t(dc) * D, 0.01f));
  DBuf<float> y(std::size_t(tile) * D), refs(randn<float>(std::size_t(m) * D, 3)), z(std::size_t(tile) * dc);
  DBuf<float> q(randn<float>(std::size_t(hq) * hd, 4));
  DBuf<std::int32_t> vis(std::vector<std::int32_t>(tile, std::int32_t(m))), ids(std::size_t(tile) * 4);
  std::vector<std::int64_t> pos(tile);
  std::iota(pos.begin(), pos.end(), 100000);
  DBuf<std::int64_t> dpos(pos), qpos(std::vector<std::int64_t>{200000});
  DBuf<float> mm(std::vector<float>(hq, 0.f)), ll(std::vector<float>(hq, 0.f)), acc(std::vector<float>(std::size_t(hq) * hd, 0.f));
  DBuf<std::uint8_t> qbytes(std::size_t(tile) * dc);
  DBuf<float> sm(std::size_t(2 * tile)), scores(randn<float>(131072, 5));
  DBuf<std::int32_t> top(4096);
  MESSAGE("linear 128x2048 -> 512: " << time_us([&] { dev.linear({x.p, D, z.p, dc, tile, w.p, nullptr, D, dc}); }) << " us");
  MESSAGE("linear 128x512 -> 2048: " << time_us([&] { dev.linear({z.p, dc, y.p, D, tile, w.p, nullptr, dc, D}); }) << " us");
  MESSAGE("ref_search 128 rows x 2000 refs, dim 2048, k 4: "
          << time_us([&] { dev.ref_search({x.p, D, tile, refs.p, D, m, vis.p, D, 4, Metric::l2, ids.p}); }) << " us");
  MESSAGE("gather_mean 128 x 2048, k 4: " << time_us([&] { dev.gather_mean({ids.p, 4, tile, nullptr, refs.p, D, D, y.p, D}); })
                                          << " us");
  MESSAGE("quantize int4 128 x 512: " << time_us([&] { dev.quantize({z.p, dc, tile, dc, 4, qbytes.p, dc, sm.p}); }) << " us");
  MESSAGE("dequantize int4 128 x 512: " << time_us([&] { dev.dequantize({qbytes.p, dc, sm.p, dc, 4, nullptr, tile, z.p, dc}); })
                                        << " us");
  MESSAGE("rope 128 rows x 8 heads x 128: "
          << time_us([&] { dev.rope({y.p, D, tile, dpos.p, hkv, hd, hd, RopeStyle::half, 500000.0}); }) << " us");
  MESSAGE("copy_rows 128 x 2048: " << time_us([&] { dev.copy_rows({refs.p, D, nullptr, y.p, D, nullptr, tile, D}); }) << " us");
  MESSAGE("attn_tile 1 query x 32 heads x 128 keys: " << time_us([&] {
            dev.attn_tile({q.p, hq * hd, 1, qpos.p, y.p, y.p + hkv * hd, D, tile, dpos.p, hq, hkv, hd, 0.088, mm.p, ll.p, acc.p});
          }) << " us");
  MESSAGE("score_tile 1 query x 32 heads x 128 keys: " << time_us([&] {
            dev.score_tile({q.p, hq * hd, 1, qpos.p, y.p, D, tile, dpos.p, hq, hkv, hd, 0.088, mm.p, ll.p, scores.p});
          }) << " us");
  for (std::int64_t n : {8192, 32768, 131072})
    MESSAGE("topk n=" << n << " k=2048: " << time_us([&] { dev.topk({scores.p, n, 2048, top.p}); }) << " us");
  MESSAGE("all_finite 128 x 2048 (syncs): " << time_us([&] { (void)dev.all_finite({y.p, D, tile, D}); }) << " us");
}
