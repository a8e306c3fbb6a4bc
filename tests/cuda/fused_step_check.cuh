#pragma once
// One decode step of every layer of a bf16 OmniKV CompressedCache through the fused path
// (decode_step.hpp) on the cache's own storage (storage, position_codes, frontier), checked against
// the same cache's tiled attend(): exact layers run dense_partials + combine + select_topk (the
// fused selection must share all but `sel_slack` positions with the cache's, in position order),
// compressed layers sparse_partials + combine over the cache's own selection. Both sides read the
// same stored bytes, so what differs is rounding: rel L2 < `bound` per layer.
// Shared by test_decode_cache.cu (grid data) and test_real_kv.cu (real KV).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <set>
#include <string>
#include <vector>

#include "deltakv/gpu/decode_step.hpp"
#include "gpu_harness.cuh"

namespace dkt_cuda {

// query(l): the host bf16 queries [2, Hq * head_dim] of layer l, one decode row per sequence at
// position len[s] - 1. Two sequences, 0 and 1, of lengths len. Shapes: the decode shape set to build
// (the caller's model shape: see decode_step.hpp).
template <class Shapes, class Query>
void check_fused_step(GpuHarness<cuda::bf16, OmniKVPolicy>& gpu, const Config& cfg, const OmniKVPolicy& pol,
                      const std::vector<std::int64_t>& len, Query&& query, std::size_t sel_slack, double bound) {
  namespace dec = deltakv::gpu::decode;
  using bf = cuda::bf16;
  const int L = cfg.model.n_layers, Hq = cfg.model.n_q_heads, Hkv = cfg.model.n_kv_heads, HD = cfg.model.head_dim;
  const int qd = Hq * HD, TOPK = pol.top_k, sparse_splits = 4;
  DBuf<std::int32_t> codes(gpu.cache->position_codes());
  auto rt = dec::rope_table(cfg.rope.theta, cfg.rot_dim(), cfg.cap.max_tokens);
  DBuf<float> hi(rt.hi), lo(rt.lo), freq(rt.freq);
  // with freq: the sparse layers compute their keys' cos/sin, as the bench's step does
  const dec::RopeTableView rope{hi.p, lo.p, rt.half, rt.max_pos, freq.p};
  const float scale = float(1.0 / std::sqrt(double(HD)));
  const std::int64_t max_n = cfg.cap.max_tokens;
  const auto sp = dec::dense_splits(max_n, 2, Hkv, 132);
  DBuf<float> part(dec::partials_floats(2, Hq, std::max(sp.n_splits, sparse_splits + 2), HD)), lse(std::size_t(2) * Hq);
  DBuf<std::uint16_t> logits(std::size_t(2) * Hq * max_n);  // f16 bits
  DBuf<std::uint32_t> keys(std::size_t(2) * max_n), select_work(dec::select_work_words(2, max_n));
  DBuf<std::int32_t> sel(std::size_t(2) * TOPK), sel_count(2), dn(std::vector<std::int32_t>{int(len[0]), int(len[1])});
  DBuf<bf> want(std::size_t(2) * qd), got(std::size_t(2) * qd);
  const std::int32_t sid[2] = {0, 1}, ip[3] = {0, 1, 2};
  const std::vector<std::int64_t> qpos = {len[0] - 1, len[1] - 1};

  for (int l = 0; l < L; ++l) {
    CAPTURE(l);
    DBuf<bf> dq(query(l));
    const RaggedBatch<const bf> qb{MatrixView<const bf>{dq.p, 2, qd, qd}, sid, ip, qpos};
    want.poison();
    gpu.cache->attend(l, qb, MatrixView<bf>{want.p, 2, qd, qd});
    gpu.dev.synchronize();
    got.poison();
    const LayerStorage st = gpu.cache->storage(l);
    DBuf<std::int32_t> dc(std::vector<std::int32_t>{int(gpu.cache->frontier(l, 0)), int(gpu.cache->frontier(l, 1))});
    if (st.exact) {
      std::int64_t stride = 0;
      const bf* rows = dec::exact_rows<bf>(st, &stride);
      part.poison(0x7F);  // finite and huge: a slot left unwritten dominates the merge (NaN would be skipped)
      logits.poison();
      dec::dense_partials<Shapes>(dec::DenseDecodeParams<bf>{dq.p, qd, rows, stride, dn.p, 2, Hq, Hkv, HD, scale, rope,
                                                             cfg.rope.style, sp.split_len, sp.n_splits, part.p, logits.p, max_n},
                                  max_n, nullptr);
      dec::combine(dec::CombineParams<bf>{part.p, sp.n_splits, 2, Hq, HD, got.p, qd, lse.p}, nullptr);
      sel.poison();
      dec::SelectParams selp{logits.p, max_n, lse.p, dn.p, 2, Hq, pol.sinks, pol.window, TOPK, keys.p, max_n,
                             sel.p, TOPK, sel_count.p};
      selp.work = select_work.p;  // the multi-block selection (test_decode.cu checks both paths)
      select_work.poison();
      dec::select_topk(selp, max_n, nullptr);
      const auto gs = sel.get();
      const auto gc = sel_count.get();
      for (int s = 0; s < 2; ++s) {
        auto cs = gpu.cache->selection(s);
        REQUIRE(gc[s] == int(cs.size()));
        std::set<std::int64_t> a(cs.begin(), cs.end()), b(gs.begin() + s * TOPK, gs.begin() + s * TOPK + gc[s]);
        std::vector<std::int64_t> common;
        std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(common));
        MESSAGE("seq " << s << ": fused and tiled selections share " << common.size() << " of " << a.size());
        CHECK(common.size() + sel_slack >= a.size());
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
      part.poison(0x7F);  // finite and huge: a slot left unwritten dominates the merge (NaN would be skipped)
      dec::SparseDecodeParams<bf> sparse{dq.p, qd, view, dn.p, dc.p, csel.p, TOPK, ccnt.p, 2, Hq, Hkv, HD,
                                     scale, rope, cfg.rope.style, pol.sinks, pol.window, sparse_splits, part.p};
      sparse.exact_blocks = l % 2;  // odd layers: the sinks and the ring's window on an exact block (the bench's step),
      sparse.exact_parts = 2;       // each pair's cut in two
      dec::sparse_partials<Shapes>(sparse, nullptr);
      dec::combine(dec::CombineParams<bf>{part.p, dec::sparse_partial_slots(sparse), 2, Hq, HD, got.p, qd, nullptr}, nullptr);
    }
    const double e = dkt::rel_l2(to_f32(got.get()), to_f32(want.get()));  // NaN (poison) fails the check
    MESSAGE("layer " << l << std::string(st.exact ? " (exact, dense)" : " (compressed, sparse)") << ": rel L2 " << e);
    CHECK(e < bound);
  }
}

}  // namespace dkt_cuda
