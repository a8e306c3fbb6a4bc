// The fused decode step reading a real CompressedCache's storage (CompressedCache::storage,
// position_codes, frontier): one decode step of an OmniKV cache (layer 0 full and exact, layers 1
// and 2 compressed, int4 latents, k = 4), against the same cache's tiled attend() on the same GPU
// (itself checked against the CPU cache in test_cuda_cache.cu). Same stored bytes on both sides, so
// what differs is rounding: the tiled path rounds rebuilt rows and rotated keys to bf16.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "fused_step_check.cuh"

namespace {

using namespace deltakv;
using namespace dkt_cuda;
namespace dec = deltakv::gpu::decode;
using bf = deltakv::cuda::bf16;

}  // namespace

TEST_CASE("fused decode on a CompressedCache's own storage equals the cache's attend (OmniKV, int4, bf16)") {
  DKT_REQUIRE_CUDA();
  const int L = 3, Hq = 8, Hkv = 2, HD = 128, DC = 128, TOPK = 64;
  Config cfg;
  cfg.model = {L, Hq, Hkv, HD};
  cfg.comp.sinks = 4;
  cfg.comp.recent = 32;
  cfg.comp.k_neighbors = 4;
  cfg.comp.latent_dim = DC;
  cfg.comp.latent_bits = 4;
  cfg.cap = {2, 700, 2};
  const OmniKVPolicy pol{{0}, TOPK, 4, 32};
  const int D = cfg.model.kv_dim(), qd = Hq * HD;
  auto codec = grid_codec(L, D, DC, 91);
  GpuHarness<bf, OmniKVPolicy> gpu(cfg, FixedStride(6), codec, pol);

  const std::vector<std::int64_t> len = {613, 290};
  std::vector<std::unique_ptr<DBuf<bf>>> xs;
  for (int s = 0; s < 2; ++s) xs.push_back(std::make_unique<DBuf<bf>>(to_bf16(grid_values(std::size_t(len[s] * D), 5 + s, -8, 8, 4.f))));
  for (int l = 0; l < L; ++l)
    for (int s = 0; s < 2; ++s) append_rows(*gpu.cache, l, s, xs[s]->p, len[s], D);
  CHECK(gpu.cache->counts().latents > 600);

  // One decode query per sequence, at its last position, the same for every layer. Near-ties at
  // the top-K boundary may swap between the fused and the tiled scores: 2 positions.
  const auto qh = to_bf16(grid_values(std::size_t(2) * qd, 44, -8, 8, 8.f));
  check_fused_step<dec::ShapeSet<dec::KernelShape<HD, Hq / Hkv>>>(gpu, cfg, pol, len, [&](int) { return qh; }, 2, 2e-2);
}
