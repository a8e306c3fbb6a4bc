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

#include "decode_step.hpp"
#include "gpu_harness.cuh"

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

  // One decode query per sequence, at its last position.
  auto qh = to_bf16(grid_values(std::size_t(2) * qd, 44, -8, 8, 8.f));
  DBuf<bf> dq(qh), want(std::size_t(2) * qd), got(std::size_t(2) * qd);
  const std::int32_t sid[2] = {0, 1}, ip[3] = {0, 1, 2};
  const std::vector<std::int64_t> qpos = {len[0] - 1, len[1] - 1};
  RaggedBatch<const bf> qb{MatrixView<const bf>{dq.p, 2, qd, qd}, sid, ip, qpos};

  // fused-path inputs from the cache
  DBuf<std::int32_t> codes(gpu.cache->position_codes());
  auto rt = dec::rope_table(cfg.rope.theta, cfg.rot_dim(), cfg.cap.max_tokens);
  DBuf<float> hi(rt.hi), lo(rt.lo);
  const dec::RopeTableView rope{hi.p, lo.p, rt.half, rt.max_pos};
  const float scale = float(1.0 / std::sqrt(double(HD)));
  const std::int64_t max_n = cfg.cap.max_tokens;
  const auto sp = dec::dense_splits(max_n, 2, Hkv, 132);
  DBuf<float> part(dec::partials_floats(2, Hq, std::max(sp.n_splits, 4), HD)), logits(std::size_t(2) * Hq * max_n),
      lse(std::size_t(2) * Hq);
  DBuf<std::uint32_t> keys(std::size_t(2) * max_n);
  DBuf<std::int32_t> sel(std::size_t(2) * TOPK), sel_count(2), dn(std::vector<std::int32_t>{int(len[0]), int(len[1])});

  for (int l = 0; l < L; ++l) {
    CAPTURE(l);
    want.poison();
    gpu.cache->attend(l, qb, MatrixView<bf>{want.p, 2, qd, qd});
    gpu.dev.synchronize();
    got.poison();
    const LayerStorage st = gpu.cache->storage(l);
    std::vector<std::int32_t> front = {int(gpu.cache->frontier(l, 0)), int(gpu.cache->frontier(l, 1))};
    DBuf<std::int32_t> dc(front);
    if (st.exact) {
      std::int64_t stride = 0;
      const bf* rows = dec::exact_rows<bf>(st, &stride);
      part.poison();
      logits.poison();
      dec::dense_partials(dec::DenseDecodeParams<bf>{dq.p, qd, rows, stride, dn.p, 2, Hq, Hkv, HD, scale, rope, cfg.rope.style,
                                                     sp.split_len, sp.n_splits, part.p, logits.p, max_n},
                          max_n, nullptr);
      dec::combine(dec::CombineParams<bf>{part.p, sp.n_splits, 2, Hq, HD, got.p, qd, lse.p}, nullptr);
      sel.poison();
      dec::select_topk(dec::SelectParams{logits.p, max_n, lse.p, dn.p, 2, Hq, pol.sinks, pol.window, TOPK, keys.p, max_n,
                                         sel.p, TOPK, sel_count.p},
                       max_n, nullptr);
      // the fused selection against the cache's own (scores differ by rounding: near-ties may swap)
      const auto gs = sel.get();
      const auto gc = sel_count.get();
      for (int s = 0; s < 2; ++s) {
        auto cs = gpu.cache->selection(s);
        REQUIRE(gc[s] == int(cs.size()));
        std::set<std::int64_t> a(cs.begin(), cs.end()), b(gs.begin() + s * TOPK, gs.begin() + s * TOPK + gc[s]);
        std::vector<std::int64_t> common;
        std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(common));
        MESSAGE("seq " << s << ": fused and tiled selections share " << common.size() << " of " << a.size());
        CHECK(common.size() + 2 >= a.size());
        CHECK(std::is_sorted(gs.begin() + s * TOPK, gs.begin() + s * TOPK + gc[s]));
      }
    } else {
      // the sparse layer attends the cache's own selection (the one its attend() used)
      std::vector<std::int32_t> hs(std::size_t(2) * TOPK, -1), hc(2);
      for (int s = 0; s < 2; ++s) {
        auto cs = gpu.cache->selection(s);
        hc[s] = int(cs.size());
        std::copy(cs.begin(), cs.end(), hs.begin() + s * TOPK);
      }
      DBuf<std::int32_t> csel(hs), ccnt(hc);
      const auto& dw = gpu.dec[std::size_t(l)].f;
      const auto view = dec::compressed_view<bf>(st, codes.p, dw.w, dw.b);
      part.poison();
      dec::sparse_partials(dec::SparseDecodeParams<bf>{dq.p, qd, view, dn.p, dc.p, csel.p, TOPK, ccnt.p, 2, Hq, Hkv, HD, scale,
                                                       rope, cfg.rope.style, pol.sinks, pol.window, 4, part.p},
                           nullptr);
      dec::combine(dec::CombineParams<bf>{part.p, 4, 2, Hq, HD, got.p, qd, nullptr}, nullptr);
    }
    const double e = dkt::rel_l2(to_f32(got.get()), to_f32(want.get()));  // NaN (poison) fails the check
    MESSAGE("layer " << l << std::string(st.exact ? " (exact, dense)" : " (compressed, sparse)") << ": rel L2 " << e);
    CHECK(e < 2e-2);
  }
}
