// End to end: the same CompressedCache (int4 latents, chunked appends over many blocks) on
// CpuDevice and on CudaDevice (storage and workspace in device memory, the codec's weights
// uploaded), fed identical data: reconstructions, attention outputs and OmniKV selections must
// agree. Data and codec weights are grid-valued, so reference search, the encoder GEMMs and the
// quantization codes are exact in f32 on both devices (no rounding-boundary flips); what is left
// is the rounding of the decoder GEMM, RoPE and attention.
#include <doctest/doctest.h>

#include <memory>
#include <numeric>
#include <type_traits>

#include "gpu_harness.cuh"

using namespace deltakv;
using namespace dkt;
using namespace dkt_cuda;

namespace {

struct Shape {
  int hq, hkv, hd, dc;
};

// Two sequences of up to 700 tokens, 4 sinks, a 32-token window, int4 latents.
Config grid_cache_config(const Shape& sh, int n_layers) {
  Config cfg;
  cfg.model = {n_layers, sh.hq, sh.hkv, sh.hd};
  cfg.comp.sinks = 4;
  cfg.comp.recent = 32;
  cfg.comp.k_neighbors = 2;  // means of 1 or 2 grid values stay on the grid
  cfg.comp.latent_dim = sh.dc;
  cfg.comp.latent_bits = 4;
  cfg.cap = {2, 700, 8};
  return cfg;
}

template <class Pol>
void run_end_to_end(const Shape& sh, Pol pol, int n_layers, bool check_selection) {
  const Config cfg = grid_cache_config(sh, n_layers);
  const int D = cfg.model.kv_dim(), qd = sh.hq * sh.hd;
  auto codec = grid_codec(n_layers, D, sh.dc, 77);
  Harness<float, FixedStride, LinearEncoder<float>, Pol> cpu(cfg, FixedStride(6), codec, pol);
  GpuHarness<float, Pol> gpu(cfg, FixedStride(6), codec, pol);

  // Sequence 0: 613 tokens in uneven chunks; sequence 1: 290 tokens at once. Every layer.
  const std::int64_t n0 = 613, n1 = 290;
  auto x0 = grid_values(std::size_t(n0 * D), 5, -8, 8, 4.f), x1 = grid_values(std::size_t(n1 * D), 6, -8, 8, 4.f);
  DBuf<float> dx0(x0), dx1(x1);
  for (int l = 0; l < n_layers; ++l) {
    std::mt19937 rng(std::uint32_t(l + 1));
    for (std::int64_t done = 0; done < n0;) {
      const std::int64_t c = std::min<std::int64_t>(n0 - done, done > 560 ? 1 : 1 + std::int64_t(rng() % 97));
      cpu.append(l, 0, x0, done, c);
      append_rows(*gpu.cache, l, 0, dx0.p + done * D, c, D);
      done += c;
    }
    cpu.append(l, 1, x1, 0, n1);
    append_rows(*gpu.cache, l, 1, dx1.p, n1, D);
  }
  CHECK(gpu.cache->counts().latents == cpu.cache->counts().latents);
  CHECK(gpu.cache->counts().latents > 600);

  // reconstruct everything, with and without RoPE
  for (int l = 0; l < n_layers; ++l)
    for (int seq : {0, 1})
      for (bool rope : {false, true}) {
        const auto want = cpu.reconstruct(l, seq, rope);
        const auto got = gpu.reconstruct(l, seq, cpu.cache->length(l, seq), rope);
        const double e = rel_l2(got, want);
        MESSAGE("reconstruct layer " << l << " seq " << seq << " rope " << rope << ": rel L2 " << e);
        CHECK(all_finite_host(got));
        CHECK(e < 1e-4);
      }
  // references_of reads ids back through the device: identical
  for (std::int64_t p : {10, 100, 333, 500}) {
    std::int64_t a[4] = {-1, -1, -1, -1}, b[4] = {-1, -1, -1, -1};
    const int ca = cpu.cache->references_of(n_layers - 1, 0, p, a), cb = gpu.cache->references_of(n_layers - 1, 0, p, b);
    CHECK(ca == cb);
    for (int j = 0; j < 4; ++j) CHECK(a[j] == b[j]);
  }

  // attention: one batch with 3 query rows of seq 0 and one decode row of seq 1, layer by layer
  auto q = randn<float>(std::size_t(4 * qd), 99);
  std::vector<std::int64_t> qpos{600, 606, 612, 289};
  const std::int32_t sid[2] = {0, 1};
  const std::int32_t ip[3] = {0, 3, 4};
  DBuf<float> dq(q), dout(std::size_t(4 * qd));
  for (int l = 0; l < n_layers; ++l)
    for (bool dense : {false, true}) {
      std::vector<float> want(std::size_t(4 * qd), std::nanf(""));
      RaggedBatch<const float> hb{MatrixView<const float>{q.data(), 4, qd, qd}, sid, ip, qpos};
      RaggedBatch<const float> db{MatrixView<const float>{dq.p, 4, qd, qd}, sid, ip, qpos};
      dout.poison();
      if (dense) {
        cpu.cache->attend_dense(l, hb, matrix(want.data(), 4, qd));
        gpu.cache->attend_dense(l, db, MatrixView<float>{dout.p, 4, qd, qd});
      } else {
        cpu.cache->attend(l, hb, matrix(want.data(), 4, qd));
        gpu.cache->attend(l, db, MatrixView<float>{dout.p, 4, qd, qd});
      }
      gpu.dev.synchronize();
      const double e = rel_l2(dout.get(), want);
      MESSAGE("attend layer " << l << " dense " << dense << ": rel L2 " << e);
      CHECK(e < 1e-4);
      if (check_selection && !dense)
        for (int seq : {0, 1}) {
          auto a = cpu.cache->selection(seq), b = gpu.cache->selection(seq);
          const bool same = std::vector<std::int64_t>(a.begin(), a.end()) == std::vector<std::int64_t>(b.begin(), b.end());
          MESSAGE("selection after layer " << l << " seq " << seq << ": " << b.size() << " positions, equal " << same);
          CHECK(same);
        }
    }
}

}  // namespace

TEST_CASE("cuda end to end: dense policy cache equals the CPU cache (int4 latents, GQA 4 over 2, d 64)") {
  DKT_REQUIRE_CUDA();
  run_end_to_end(Shape{4, 2, 64, 64}, DensePolicy{}, 2, false);
}

TEST_CASE("cuda end to end: OmniKV cache equals the CPU cache, selections included (GQA 4 over 2, d 64)") {
  DKT_REQUIRE_CUDA();
  run_end_to_end(Shape{4, 2, 64, 64}, OmniKVPolicy{{0}, 64, 4, 32}, 3, true);
}

TEST_CASE("cuda end to end: OmniKV cache equals the CPU cache (GQA 32 over 8, d 128)") {
  DKT_REQUIRE_CUDA();
  run_end_to_end(Shape{32, 8, 128, 256}, OmniKVPolicy{{0, 2}, 100, 4, 32}, 3, true);
}

TEST_CASE("cuda end to end: Quest cache equals the CPU cache (GQA 4 over 2, d 64)") {
  DKT_REQUIRE_CUDA();
  run_end_to_end(Shape{4, 2, 64, 64}, QuestPolicy{16, 128, 1, 4, 32}, 2, false);
}

// append() awaits its NaN/Inf check only once the compression passes are queued on the stream:
// a batch that completes blocks with a NaN (or Inf) in its last row must leave the GPU cache as it
// was (counts, ring, stores), and the same cache then takes the good rows like a cache that never
// saw the bad ones (bit for bit); a plan made before the failing calls stays valid.
TEST_CASE("cuda cache: a non-finite append that completes blocks changes nothing") {
  DKT_REQUIRE_CUDA();
  const Config cfg = grid_cache_config(Shape{4, 2, 64, 64}, 1);
  const int D = cfg.model.kv_dim();
  auto codec = grid_codec(1, D, 64, 78);
  GpuHarness<float, DensePolicy> h(cfg, FixedStride(6), codec, DensePolicy{}), ref(cfg, FixedStride(6), codec, DensePolicy{});
  const std::int64_t n = 600;
  auto x = grid_values(std::size_t(n * D), 9, -8, 8, 4.f);
  DBuf<float> dx(x);
  auto rows_of = [](GpuHarness<float, DensePolicy>& g, int seq) {
    return g.reconstruct(0, seq, g.cache->length(0, seq), true);
  };
  for (auto* g : {&h, &ref}) {
    append_rows(*g->cache, 0, 0, dx.p, 50, D);
    append_rows(*g->cache, 0, 1, dx.p, 10, D);
  }
  const auto before = rows_of(h, 0);
  const auto counts = h.cache->counts();
  const std::int64_t frontier = h.cache->frontier(0, 0);
  std::vector<std::int64_t> pos1(20), pos0(400);
  std::iota(pos1.begin(), pos1.end(), 10);
  std::iota(pos0.begin(), pos0.end(), 50);
  const std::int32_t s1[1] = {1}, s0[1] = {0}, ip1[2] = {0, 20}, ip0[2] = {0, 400};
  const RaggedBatch<const float> b1{MatrixView<const float>{dx.p + 10 * D, 20, D, D}, s1, ip1, pos1};
  const AppendPlan plan = h.cache->plan_append(0, b1);
  std::vector<float> bad(x.begin() + 50 * D, x.begin() + 450 * D);
  for (const float v : {std::nanf(""), INFINITY}) {
    bad.back() = v;
    DBuf<float> dbad(bad);
    CHECK_THROWS_AS(h.cache->append(0, RaggedBatch<const float>{MatrixView<const float>{dbad.p, 400, D, D}, s0, ip0, pos0}),
                    NonFiniteError);
    CHECK(h.cache->counts().tokens == counts.tokens);
    CHECK(h.cache->counts().latents == counts.latents);
    CHECK(h.cache->frontier(0, 0) == frontier);
    const auto after = rows_of(h, 0);
    CHECK(same_bits(after, before));
  }
  h.cache->run_append(plan, b1);
  append_rows(*ref.cache, 0, 1, dx.p + 10 * D, 20, D);
  for (auto* g : {&h, &ref}) append_rows(*g->cache, 0, 0, dx.p + 50 * D, 400, D);
  CHECK(h.cache->counts().latents > counts.latents + 300);
  for (int seq : {0, 1}) CHECK(same_bits(rows_of(h, seq), rows_of(ref, seq)));
}

// bf16 storage (f32 arithmetic) against the f32 CPU cache on bf16-exact data and weights: the
// reference ids agree exactly; latents and outputs differ by bf16 rounding. Run twice: with the
// CUDA-core GEMM, and with linear() on tensor cores (blocks of 128 tokens, so that the encoder's
// and the decoder's GEMMs have >= 64 rows and take that path).
TEST_CASE("cuda end to end: a bf16 cache tracks the f32 CPU cache (int8 latents)") {
  DKT_REQUIRE_CUDA();
  // The CUDA-core run's outputs per layer: grid data make every GEMM sum exact in f32, so the
  // tensor-core run must give the same bits.
  std::vector<std::vector<cuda::bf16>> recon_cc(2), attend_cc(2);
  for (const bool tensor_cores : {false, true}) {
    CAPTURE(tensor_cores);
    if (tensor_cores && !deltakv::gpu::vendor::kTensorTiles) {
      MESSAGE("tensor-core linear: skipped (this build's tile product is the HIP per-lane fallback)");
      continue;
    }
    using B = cuda::bf16;
    Config cfg;
    cfg.model = {2, 4, 2, 64};
    cfg.comp.sinks = 4;
    cfg.comp.recent = 32;
    cfg.comp.k_neighbors = 2;
    cfg.comp.latent_dim = 64;
    cfg.comp.latent_bits = 8;
    cfg.cap = {1, 500, 4};
    if (tensor_cores) cfg.comp.block = 128;
    const int D = cfg.model.kv_dim(), qd = 4 * 64;
    auto codec = grid_codec(2, D, 64, 31);
    Harness<float, FixedStride, LinearEncoder<float>, DensePolicy> cpu(cfg, FixedStride(6), codec, DensePolicy{});
    GpuHarness<B, DensePolicy> gpu(cfg, FixedStride(6), codec, DensePolicy{});
    gpu.dev.set_tensor_cores(tensor_cores);
    const std::int64_t n = 450;
    auto x = grid_values(static_cast<std::size_t>(n * D), 8, -8, 8, 4.f);  // exact in bf16
    DBuf<B> dx(to_bf16(x));
    for (int l = 0; l < 2; ++l)
      for (std::int64_t done = 0; done < n;) {
        const std::int64_t c = std::min<std::int64_t>(n - done, 1 + (done * 7) % 61);
        cpu.append(l, 0, x, done, c);
        append_rows(*gpu.cache, l, 0, dx.p + done * D, c, D);
        done += c;
      }
    for (int l = 0; l < 2; ++l) {
      const auto recon = gpu.reconstruct(l, 0, n, true);
      if (!tensor_cores) recon_cc[std::size_t(l)] = recon;
      else CHECK(same_bits(recon, recon_cc[std::size_t(l)]));
      const double e = rel_l2(to_f32(recon), cpu.reconstruct(l, 0, true));
      MESSAGE("bf16 reconstruct layer " << l << ": rel L2 " << e);
      CHECK(e < 2e-2);
      for (std::int64_t p : {50, 200, 400}) {
        std::int64_t a[2] = {-1, -1}, b[2] = {-1, -1};
        CHECK(cpu.cache->references_of(l, 0, p, a) == gpu.cache->references_of(l, 0, p, b));
        CHECK((a[0] == b[0] && a[1] == b[1]));
      }
      // moderate logits: attention amplifies the keys' bf16 rounding through exp
      auto q = round_bf16(randn<float>(static_cast<std::size_t>(2 * qd), 5, 0.25));
      std::vector<std::int64_t> qpos{420, 449};
      DBuf<B> dq(to_bf16(q)), dres(static_cast<std::size_t>(2 * qd));
      dres.poison();
      const std::int32_t sid[1] = {0};
      const std::int32_t ip[2] = {0, 2};
      gpu.cache->attend(l, RaggedBatch<const B>{MatrixView<const B>{dq.p, 2, qd, qd}, sid, ip, qpos}, MatrixView<B>{dres.p, 2, qd, qd});
      gpu.dev.synchronize();
      const auto att = dres.get();
      if (!tensor_cores) attend_cc[std::size_t(l)] = att;
      else CHECK(same_bits(att, attend_cc[std::size_t(l)]));
      const double ea = rel_l2(to_f32(att), cpu.attend(l, 0, q, qpos));
      MESSAGE("bf16 attend layer " << l << ": rel L2 " << ea);
      CHECK(ea < 3e-2);
    }
  }
}

// The bench's prefill path: a bf16 cache with the paper's SwiGLU f_c on tensor cores (cuBLAS
// where the build has it), passes of several blocks gathered from the ring and the input in one
// launch, against the f32 CPU cache with the same (bf16-exact) weights; both encode paths.
TEST_CASE_TEMPLATE("cuda end to end: a bf16 SwiGLU cache tracks the f32 CPU cache (both encode paths, int4 and bf16 latents)",
                   Enc, SwiGLUEncoder<cuda::bf16>, EncodeOnly<SwiGLUEncoder<cuda::bf16>>) {
  DKT_REQUIRE_CUDA();
  using B = cuda::bf16;
  static_assert(EncodesResiduals<Enc, B> == std::is_same_v<Enc, SwiGLUEncoder<B>>);
  const int n_layers = 2, hidden = 96;
  for (const int bits : {4, 0}) {
    CAPTURE(bits);
    Config cfg;
    cfg.model = {n_layers, 4, 2, 64};  // kv_dim 256
    cfg.comp.sinks = 4;
    cfg.comp.recent = 32;
    cfg.comp.k_neighbors = 2;
    cfg.comp.latent_dim = 64;
    cfg.comp.latent_bits = bits;
    cfg.cap = {1, 900, 300};
    const int D = cfg.model.kv_dim(), dc = 64;
    Compressor<float> codec;
    codec.kind = CodecKind::swiglu;
    codec.kv_dim = D;
    codec.latent_dim = dc;
    codec.hidden = hidden;
    codec.layers.resize(std::size_t(n_layers));
    for (int l = 0; l < n_layers; ++l) {  // grid values: exact in bf16
      auto& lc = codec.layers[std::size_t(l)];
      lc.down = {grid_values(std::size_t(2 * hidden) * D, 300 + 3 * l, -8, 8, 256.f), {}, D, 2 * hidden};
      lc.w3 = {grid_values(std::size_t(dc) * hidden, 301 + 3 * l, -8, 8, 64.f), {}, hidden, dc};
      lc.up = {grid_values(std::size_t(D) * dc, 302 + 3 * l, -8, 8, 4.f), {}, dc, D};  // f_d(z) ~ x / 2
    }
    Harness<float, FixedStride, SwiGLUEncoder<float>, DensePolicy> cpu(cfg, FixedStride(6), codec, DensePolicy{});
    GpuHarness<B, DensePolicy, Enc> gpu(cfg, FixedStride(6), codec, DensePolicy{});
    gpu.dev.set_tensor_cores(true);
    const std::int64_t n = 800;
    auto x = grid_values(static_cast<std::size_t>(n * D), 9, -8, 8, 4.f);  // exact in bf16
    DBuf<B> dx(to_bf16(x));
    for (int l = 0; l < n_layers; ++l)
      for (std::int64_t done = 0; done < n;) {  // chunks of up to 280 rows: passes of 1 to 4 blocks
        const std::int64_t c = std::min<std::int64_t>(n - done, 1 + (done * 13 + 7 * l) % 280);
        cpu.append(l, 0, x, done, c);
        append_rows(*gpu.cache, l, 0, dx.p + done * D, c, D);
        done += c;
      }
    CHECK(gpu.cache->counts().latents == cpu.cache->counts().latents);
    CHECK(gpu.cache->counts().latents > 1000);
    for (int l = 0; l < n_layers; ++l) {
      const auto got = to_f32(gpu.reconstruct(l, 0, n, false));
      const auto want = cpu.reconstruct(l, 0, false);
      // Error on the decoded residual f_d(z) = x_hat - ref of the latent positions (the CPU's ref:
      // the mean of its reference rows, stored exactly), not on x_hat, where ref would dwarf it:
      // a residual that lost f_c(ref) (or took wrong rows) is off by O(1) there. bf16 noise: the
      // w12 rows and the SwiGLU difference rounded (~2^-9 each, the difference cancelling), x_hat
      // rounded; int4 adds the codes that fall across a rounding boundary (one step each).
      double diff = 0, res = 0;
      int n_lat = 0;
      for (std::int64_t p = 0; p < n; ++p) {
        std::int64_t ids[2] = {-1, -1};
        if (cpu.cache->position_class(p) != 2 || cpu.cache->references_of(l, 0, p, ids) != 2) continue;  // stored latents
        ++n_lat;
        for (int d = 0; d < D; ++d) {
          const double ref = 0.5 * (double(x[std::size_t(ids[0] * D + d)]) + double(x[std::size_t(ids[1] * D + d)]));
          const double w = want[std::size_t(p * D + d)], g = got[std::size_t(p * D + d)];
          diff += (g - w) * (g - w);
          res += (w - ref) * (w - ref);
        }
      }
      const double e = rel_l2(got, want), e_res = std::sqrt(diff / res);
      MESSAGE("SwiGLU bf16 reconstruct layer " << l << " bits " << bits << ": rel L2 " << e << ", on f_d(z) of " << n_lat
                                               << " latents " << e_res);
      CHECK(all_finite_host(got));
      CHECK(n_lat > 500);
      CHECK(e_res < (bits == 4 ? 0.1 : 0.02));  // H100: 0.035-0.038 and 0.005
      for (std::int64_t p : {50, 333, 700}) {
        std::int64_t a[2] = {-1, -1}, b[2] = {-1, -1};
        CHECK(cpu.cache->references_of(l, 0, p, a) == gpu.cache->references_of(l, 0, p, b));
        CHECK((a[0] == b[0] && a[1] == b[1]));
      }
    }
  }
}
