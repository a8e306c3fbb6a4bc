// The compressed cache against independent references: exactness, causality, attention,
// policies, accounting, and the error contract.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <set>

#include "support.hpp"

using namespace deltakv;
using namespace dkt;

TEST_CASE("identity codec with d_c = kv_dim reconstructs every position exactly (f64)") {
  auto cfg = small_config();
  auto h = identity_harness<double>(cfg, FixedStride(10), DensePolicy{});
  const std::int64_t n = 300;
  auto x = structured_kv<double>(n, 32, 7);
  h.append(0, 0, x, 0, n);
  CHECK(h.cache->counts().latents > 200);  // most tokens really went through the codec
  CHECK(rel_l2(h.reconstruct(0, 0, false), x) < 1e-12);
}

TEST_CASE("sinks, recent window and references are bit-exact - latents are not stored exactly") {
  auto cfg = small_config();
  cfg.comp.latent_dim = 8;
  auto codec = random_codec<float>(2, 32, 8, 3);
  Harness<float, FixedStride, LinearEncoder<float>, DensePolicy> h(cfg, FixedStride(10), codec, DensePolicy{});
  const std::int64_t n = 250;
  auto x = structured_kv<float>(n, 32, 11);
  h.append(1, 2, x, 0, n);
  auto r = h.reconstruct(1, 2, false);
  int exact = 0, lossy = 0;
  for (std::int64_t p = 0; p < n; ++p) {
    const bool same = std::memcmp(&r[p * 32], &x[p * 32], 32 * sizeof(float)) == 0;
    const bool must_be_exact = p < 4 || p >= n - 16 || (p - 4) % 10 == 0;
    if (must_be_exact) {
      CHECK_MESSAGE(same, "position " << p);
      ++exact;
    } else {
      lossy += !same;
    }
  }
  CHECK(exact > 30);
  CHECK(lossy > 150);  // a rank-8 codec cannot reproduce 32-dim tokens bit for bit
}

TEST_CASE("references are causal, nearest by the metric, and averaged") {
  for (Metric metric : {Metric::l2, Metric::dot, Metric::cosine}) {
    auto cfg = small_config();
    cfg.comp.metric = metric;
    auto h = identity_harness<double>(cfg, FixedStride(7), DensePolicy{});
    const std::int64_t n = 260;
    auto x = randn<double>(n * 32, 5);
    h.append(0, 1, x, 0, n);
    std::int64_t got[4];
    int checked = 0;
    for (std::int64_t p = 4; p < n; ++p) {
      const int c = h.cache->references_of(0, 1, p, got);
      if (h.cache->position_class(p) != 2 || p >= h.cache->length(0, 1) - 16) continue;
      if (c == 0) continue;  // still in the window
      // brute force: score every reference at or before p
      std::vector<std::pair<double, std::int64_t>> all;
      for (std::int64_t r = 4; r < p; r += 7) {
        double dot = 0, d2 = 0, nx = 0, nr = 0;
        for (int e = 0; e < 32; ++e) {
          dot += x[p * 32 + e] * x[r * 32 + e];
          d2 += (x[p * 32 + e] - x[r * 32 + e]) * (x[p * 32 + e] - x[r * 32 + e]);
          nx += x[p * 32 + e] * x[p * 32 + e];
          nr += x[r * 32 + e] * x[r * 32 + e];
        }
        const double s = metric == Metric::l2 ? -d2 : metric == Metric::dot ? dot : dot / std::sqrt(nx * nr);
        all.push_back({-s, r});
      }
      std::sort(all.begin(), all.end());
      REQUIRE(c == std::min<int>(4, int(all.size())));
      for (int j = 0; j < c; ++j) {
        CHECK(got[j] <= p);
        CHECK(got[j] == all[j].second);
      }
      ++checked;
    }
    CHECK(checked > 150);
  }
}

TEST_CASE("the reconstruction of a latent is f_d(f_c(x) - f_c(ref)) + ref with ref the mean of its references") {
  auto cfg = small_config();
  cfg.comp.latent_dim = 8;
  auto codec = random_codec<double>(2, 32, 8, 9);
  Harness<double, FixedStride, LinearEncoder<double>, DensePolicy> h(cfg, FixedStride(10), codec, DensePolicy{});
  const std::int64_t n = 200;
  auto x = structured_kv<double>(n, 32, 2);
  h.append(0, 0, x, 0, n);
  auto r = h.reconstruct(0, 0, false);
  const auto& W = codec.layers[0].down.w;  // [8, 32]
  const auto& U = codec.layers[0].up.w;    // [32, 8]
  int checked = 0;
  for (std::int64_t p = 0; p < n; ++p) {
    std::int64_t refs[4];
    const int c = h.cache->references_of(0, 0, p, refs);
    if (c == 0) continue;
    std::vector<double> ref(32, 0.0), z(8, 0.0), want(32);
    for (int j = 0; j < c; ++j)
      for (int e = 0; e < 32; ++e) ref[e] += x[refs[j] * 32 + e] / c;
    for (int i = 0; i < 8; ++i)
      for (int e = 0; e < 32; ++e) z[i] += W[i * 32 + e] * (x[p * 32 + e] - ref[e]);
    for (int e = 0; e < 32; ++e) {
      want[e] = ref[e];
      for (int i = 0; i < 8; ++i) want[e] += U[e * 8 + i] * z[i];
    }
    std::vector<double> got(r.begin() + p * 32, r.begin() + p * 32 + 32);
    CHECK(rel_l2(got, want) < 1e-12);
    ++checked;
  }
  CHECK(checked > 100);
}

// With blocks_per_pass = 1 every block is encoded alone, so the encoder's GEMMs see the same rows
// however the appends are chunked: identical bits, whatever the block (block 1 included, where a
// one-row product takes Eigen's GEMV, which rounds differently from its GEMM). Larger passes encode
// the rows of all their blocks at once; there the bits may depend on the chunking (next test).
// append() awaits its NaN/Inf check only once the compression passes are queued (they write rows
// past the counts only): a batch that completes blocks with a NaN in its last row must still
// change nothing, the ring included, and a plan made before it stays valid.
TEST_CASE("a non-finite append that completes blocks changes nothing and an earlier plan stays valid") {
  auto cfg = small_config();
  cfg.comp.latent_dim = 8;
  cfg.comp.latent_bits = 4;
  auto codec = random_codec<float>(2, 32, 8, 4);
  using H = Harness<float, FixedStride, LinearEncoder<float>, DensePolicy>;
  H h(cfg, FixedStride(5), codec, DensePolicy{}), ref(cfg, FixedStride(5), codec, DensePolicy{});
  auto x = structured_kv<float>(300, 32, 5);
  for (H* c : {&h, &ref}) {
    c->append(0, 0, x, 0, 40);
    c->append(0, 1, x, 0, 10);
  }
  const auto before = h.reconstruct(0, 0, true);
  const auto counts = h.cache->counts();
  const std::int64_t frontier = h.cache->frontier(0, 0);
  std::vector<std::int64_t> pos1(20), pos0(200);
  std::iota(pos1.begin(), pos1.end(), 10);
  std::iota(pos0.begin(), pos0.end(), 40);
  const std::int32_t s1[1] = {1}, s0[1] = {0}, ip1[2] = {0, 20}, ip0[2] = {0, 200};
  const RaggedBatch<const float> b1{MatrixView<const float>{x.data() + 10 * 32, 20, 32, 32}, s1, ip1, pos1};
  const AppendPlan plan = h.cache->plan_append(0, b1);
  std::vector<float> bad(x.begin() + 40 * 32, x.begin() + 240 * 32);
  for (const float v : {std::nanf(""), INFINITY}) {
    bad.back() = v;
    CHECK_THROWS_AS(h.cache->append(0, RaggedBatch<const float>{MatrixView<const float>{bad.data(), 200, 32, 32}, s0, ip0, pos0}),
                    NonFiniteError);
    CHECK(h.cache->counts().tokens == counts.tokens);
    CHECK(h.cache->counts().latents == counts.latents);
    CHECK(h.cache->frontier(0, 0) == frontier);
    const auto after = h.reconstruct(0, 0, true);
    CHECK(std::memcmp(after.data(), before.data(), before.size() * sizeof(float)) == 0);
  }
  h.cache->run_append(plan, b1);  // not stale: the failed calls changed nothing
  ref.append(0, 1, x, 10, 20);
  for (H* c : {&h, &ref}) c->append(0, 0, x, 40, 200);
  CHECK(h.cache->counts().latents > counts.latents);
  for (int seq : {0, 1}) {
    const auto a = h.reconstruct(0, seq, true), b = ref.reconstruct(0, seq, true);
    CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("chunked prefill, decode steps and one-shot append store identical bits (blocks_per_pass 1)") {
  for (int block : {0, 1, 2}) {  // 0: the default, block = recent
    CAPTURE(block);
    auto cfg = small_config();
    cfg.comp.latent_dim = 8;
    cfg.comp.latent_bits = 4;
    cfg.comp.block = block;
    cfg.comp.blocks_per_pass = 1;
    auto codec = random_codec<float>(2, 32, 8, 4);
    auto make = [&] {
      return Harness<float, FixedStride, LinearEncoder<float>, DensePolicy>(cfg, FixedStride(block == 2 ? 2 : 10), codec,
                                                                            DensePolicy{});
    };
    auto a = make();
    auto b = make();
    const std::int64_t n = 333;
    auto x = structured_kv<float>(n, 32, 21);
    a.append(0, 0, x, 0, n);
    std::mt19937 rng(3);
    std::int64_t done = 0;
    while (done < n) {
      const std::int64_t c = std::min<std::int64_t>(n - done, done > 250 ? 1 : 1 + rng() % 70);
      b.append(0, 0, x, done, c);
      done += c;
    }
    auto ra = a.reconstruct(0, 0, true), rb = b.reconstruct(0, 0, true);
    CHECK(std::memcmp(ra.data(), rb.data(), ra.size() * sizeof(float)) == 0);
  }
}

// An append that completes several blocks compresses them in passes of blocks_per_pass (the ring's
// rows and the input's straight, one search and one encode per pass): the pass size, and where the
// chunks split the ring from the input, must not change a reference id, and the reconstructions
// only by the rounding of differently shaped GEMMs (a row read from the wrong place is off by O(1)).
// (With Eigen's GEMM here, blocks of >= 2 latents, they come out bit-identical; counted, not required.)
TEST_CASE("compression passes of 1 to 7 blocks store the same references and reconstructions") {
  auto cfg = small_config();
  cfg.comp.latent_dim = 8;
  cfg.comp.latent_bits = 4;
  cfg.comp.block = 12;  // ring of 28 rows: chunks of up to 90 complete several blocks
  auto codec = random_codec<float>(2, 32, 8, 5);
  const std::int64_t n = 371;
  auto x = structured_kv<float>(n, 32, 23);
  auto run = [&](int per_pass, std::uint32_t chunk_seed) {
    auto c = cfg;
    c.comp.blocks_per_pass = per_pass;
    Harness<float, FixedStride, LinearEncoder<float>, DensePolicy> h(c, FixedStride(10), codec, DensePolicy{});
    std::mt19937 rng(chunk_seed);
    for (std::int64_t done = 0; done < n;) {
      const std::int64_t k = std::min<std::int64_t>(n - done, 1 + rng() % 90);
      h.append(1, 2, x, done, k);
      done += k;
    }
    return h;
  };
  auto base = run(1, 1);
  const auto rb = base.reconstruct(1, 2, true);
  std::int64_t latents = 0;
  for (int per_pass : {2, 3, 4, 7})
    for (std::uint32_t seed : {1u, 2u, 9u}) {
      CAPTURE(per_pass);
      CAPTURE(seed);
      auto h = run(per_pass, seed);
      const auto r = h.reconstruct(1, 2, true);
      REQUIRE(r.size() == rb.size());
      double worst = 0;
      for (std::size_t i = 0; i < r.size(); ++i) worst = std::max(worst, std::fabs(double(r[i]) - rb[i]) / (1.0 + std::fabs(rb[i])));
      MESSAGE("passes of " << per_pass << " (chunking " << seed << "): max scaled difference " << worst << ", bit-identical "
                           << (std::memcmp(r.data(), rb.data(), r.size() * sizeof(float)) == 0));
      CHECK(worst < 1e-5);
      std::int64_t ia[kMaxNeighbors], ib[kMaxNeighbors], differ = 0;
      latents = 0;
      for (std::int64_t p = 0; p < n; ++p) {
        const int ka = h.cache->references_of(1, 2, p, ia), kb = base.cache->references_of(1, 2, p, ib);
        latents += kb > 0;
        differ += ka != kb || !std::equal(ia, ia + ka, ib);
      }
      CHECK(differ == 0);
    }
  // the cache compressed what it should: every position before the window but sinks and references
  CHECK(latents > 250);
  auto bad = cfg;
  bad.comp.blocks_per_pass = 0;
  CHECK_THROWS_AS(validate(bad), ConfigError);
}

TEST_CASE("dense attention over an exact cache equals naive softmax attention (f64, GQA, causal, batch)") {
  for (RopeStyle style : {RopeStyle::half, RopeStyle::interleaved}) {
    auto cfg = small_config();
    cfg.rope.style = style;
    cfg.rope.theta = 500.0;
    auto h = identity_harness<double>(cfg, FixedStride(10), DensePolicy{});
    const std::int64_t n0 = 150, n1 = 77;
    auto x0 = randn<double>(n0 * 32, 1), x1 = randn<double>(n1 * 32, 2);
    h.append(0, 0, x0, 0, n0);
    h.append(0, 1, x1, 0, n1);
    // one batch: seq 0 with 3 query rows (positions 140, 145, 149), seq 1 with one decode row
    auto q = randn<double>(4 * 32, 3);
    std::vector<std::int64_t> qpos{140, 145, 149, 76};
    const std::int32_t sid[2] = {0, 1};
    const std::int32_t ip[3] = {0, 3, 4};
    std::vector<double> out(q.size(), std::nan(""));
    h.cache->attend(0, RaggedBatch<const double>{matrix<const double>(q.data(), 4, 32), sid, ip, qpos},
                    matrix(out.data(), 4, 32));
    auto k0 = x0, k1 = x1;
    naive_rope(k0, n0, cfg.model, cfg.rope);
    naive_rope(k1, n1, cfg.model, cfg.rope);
    std::vector<double> q0(q.begin(), q.begin() + 96), q1(q.begin() + 96, q.end());
    auto w0 = naive_attention(q0, {140, 145, 149}, k0, cfg.model);
    auto w1 = naive_attention(q1, {76}, k1, cfg.model);
    std::vector<double> want(w0);
    want.insert(want.end(), w1.begin(), w1.end());
    CHECK(rel_l2(out, want) < 1e-6);
    CHECK(rel_l2(out, want) < 1e-12);  // and in fact to rounding
  }
}

TEST_CASE("OmniKV: K = all tokens equals dense - small K attends to exactly sinks + top-K + window") {
  auto cfg = small_config(4);
  cfg.comp.latent_dim = 16;
  auto codec = random_codec<double>(4, 32, 16, 8);
  const std::int64_t n = 260;
  auto x = structured_kv<double>(n, 32, 13);
  auto q = randn<double>(2 * 32, 14);
  std::vector<std::int64_t> qpos{250, 259};

  OmniKVPolicy all{{0, 2}, 100000, 4, 16};
  Harness<double, FixedStride, LinearEncoder<double>, OmniKVPolicy> ha(cfg, FixedStride(10), codec, all);
  for (int l = 0; l < 4; ++l) ha.append(l, 0, x, 0, n);
  CHECK(ha.cache->layer_plan(0).exact);
  CHECK_FALSE(ha.cache->layer_plan(1).exact);
  for (int l = 0; l < 4; ++l) {
    auto sparse = ha.attend(l, 0, q, qpos);
    auto dense = ha.attend(l, 0, q, qpos, true);
    CHECK(rel_l2(sparse, dense) < 1e-12);
  }

  OmniKVPolicy few{{0, 2}, 20, 4, 16};
  Harness<double, FixedStride, LinearEncoder<double>, OmniKVPolicy> hf(cfg, FixedStride(10), codec, few);
  for (int l = 0; l < 4; ++l) hf.append(l, 0, x, 0, n);
  hf.attend(0, 0, q, qpos);  // layer 0 is full and selects for layer 1
  // independent top-K: probabilities of layer 0 (exact, RoPE'd), max over heads and query rows
  auto k = x;
  naive_rope(k, n, cfg.model, cfg.rope);
  std::vector<std::pair<double, std::int64_t>> score;
  for (std::int64_t p = 4; p < n - 16; ++p) {
    double best = 0;
    for (std::size_t i = 0; i < qpos.size(); ++i)
      for (int hh = 0; hh < 4; ++hh) {
        double mx = -1e300;
        std::vector<double> s(qpos[i] + 1);
        for (std::int64_t t = 0; t <= qpos[i]; ++t) {
          double d = 0;
          for (int e = 0; e < 8; ++e) d += q[i * 32 + hh * 8 + e] * k[t * 32 + (hh / 2) * 8 + e];
          s[t] = d / std::sqrt(8.0);
          mx = std::max(mx, s[t]);
        }
        double z = 0;
        for (auto v : s) z += std::exp(v - mx);
        best = std::max(best, std::exp(s[p] - mx) / z);
      }
    score.push_back({-best, p});
  }
  std::sort(score.begin(), score.end());
  std::vector<std::int64_t> want_sel;
  for (int i = 0; i < 20; ++i) want_sel.push_back(score[i].second);
  std::sort(want_sel.begin(), want_sel.end());
  auto got_sel = hf.cache->selection(0);
  CHECK(std::vector<std::int64_t>(got_sel.begin(), got_sel.end()) == want_sel);
  // layer 1 attends to sinks + selection + window of its reconstructed cache
  std::vector<std::int64_t> allowed{0, 1, 2, 3};
  allowed.insert(allowed.end(), want_sel.begin(), want_sel.end());
  for (std::int64_t p = n - 16; p < n; ++p) allowed.push_back(p);
  auto rec = hf.reconstruct(1, 0, true);
  auto want = naive_attention(q, qpos, rec, cfg.model, &allowed);
  CHECK(rel_l2(hf.attend(1, 0, q, qpos), want) < 1e-12);
  CHECK(rel_l2(hf.attend(1, 0, q, qpos), hf.attend(1, 0, q, qpos, true)) > 1e-6);  // it really is sparse
}

TEST_CASE("Quest: budget = all tokens equals dense - a small budget attends the best pages by the bound") {
  auto cfg = small_config(3);
  auto codec = random_codec<double>(3, 32, 32, 8);
  cfg.comp.latent_dim = 32;
  const std::int64_t n = 203;
  auto x = randn<double>(n * 32, 31);
  auto q = randn<double>(32, 32);
  std::vector<std::int64_t> qpos{202};
  QuestPolicy all{8, 100000, 1, 0, 0};
  Harness<double, FixedStride, LinearEncoder<double>, QuestPolicy> ha(cfg, FixedStride(10), codec, all);
  for (int l = 0; l < 3; ++l) ha.append(l, 0, x, 0, n);
  for (int l = 0; l < 3; ++l) CHECK(rel_l2(ha.attend(l, 0, q, qpos), ha.attend(l, 0, q, qpos, true)) < 1e-12);

  QuestPolicy few{8, 32, 1, 0, 0};  // 4 pages
  Harness<double, FixedStride, LinearEncoder<double>, QuestPolicy> hf(cfg, FixedStride(10), codec, few);
  // appended in uneven chunks: page bounds must fold across chunk edges
  for (std::int64_t d = 0; d < n; d += 13) hf.append(2, 0, x, d, std::min<std::int64_t>(13, n - d));
  auto k = x;
  naive_rope(k, n, cfg.model, cfg.rope);
  std::vector<std::pair<double, std::int64_t>> pages;
  for (std::int64_t pg = 0; pg * 8 < n; ++pg) {
    double best = -1e300;
    for (int hh = 0; hh < 4; ++hh) {
      double s = 0;
      for (int e = 0; e < 8; ++e) {
        double mn = 1e300, mx = -1e300;
        for (std::int64_t t = pg * 8; t < std::min<std::int64_t>(n, pg * 8 + 8); ++t) {
          mn = std::min(mn, k[t * 32 + (hh / 2) * 8 + e]);
          mx = std::max(mx, k[t * 32 + (hh / 2) * 8 + e]);
        }
        s += std::max(q[hh * 8 + e] * mn, q[hh * 8 + e] * mx);
      }
      best = std::max(best, s);
    }
    pages.push_back({-best, pg});
  }
  std::sort(pages.begin(), pages.end());
  std::vector<std::int64_t> allowed;
  for (int i = 0; i < 4; ++i)
    for (std::int64_t t = pages[i].second * 8; t < std::min<std::int64_t>(n, pages[i].second * 8 + 8); ++t) allowed.push_back(t);
  std::sort(allowed.begin(), allowed.end());
  auto rec = hf.reconstruct(2, 0, true);
  CHECK(rel_l2(hf.attend(2, 0, q, qpos), naive_attention(q, qpos, rec, cfg.model, &allowed)) < 1e-12);
}

TEST_CASE("StreamingLLM attends to sinks and the window only") {
  auto cfg = small_config(1);
  auto h = identity_harness<double>(cfg, FixedStride(10), StreamingPolicy{4, 20});
  const std::int64_t n = 120;
  auto x = randn<double>(n * 32, 41);
  h.append(0, 0, x, 0, n);
  auto q = randn<double>(32, 42);
  std::vector<std::int64_t> qpos{119}, allowed{0, 1, 2, 3};
  for (std::int64_t p = 100; p < 120; ++p) allowed.push_back(p);
  auto k = x;
  naive_rope(k, n, cfg.model, cfg.rope);
  CHECK(rel_l2(h.attend(0, 0, q, qpos), naive_attention(q, qpos, k, cfg.model, &allowed)) < 1e-10);
}

TEST_CASE("dynamic stride places references at base + alpha * (pos - sinks)") {
  auto cfg = small_config(1);
  auto h = identity_harness<double>(cfg, DynamicStride(4.0, 0.05), DensePolicy{});
  std::set<std::int64_t> want;
  for (std::int64_t r = 4; r < 400; r += std::max<std::int64_t>(1, std::int64_t(std::floor(4.0 + 0.05 * double(r - 4))))) want.insert(r);
  for (std::int64_t p = 4; p < 400; ++p) CHECK((h.cache->position_class(p) == 1) == (want.count(p) == 1));
  CHECK(h.cache->max_references() == std::int64_t(want.size()));
}

TEST_CASE("latent quantization: int8 and int4 keep every value within half a step") {
  cpu::CpuDevice<float> dev;
  auto z = randn<float>(7 * 24, 5, 3.0);
  for (int bits : {8, 4}) {
    std::vector<std::uint8_t> q(7 * 24);
    std::vector<float> sm(14), back(z.size(), std::nanf(""));
    dev.quantize(QuantizeParams<float>{z.data(), 24, 7, 24, bits, q.data(), 24, sm.data()});
    dev.dequantize(DequantizeParams<float>{q.data(), 24, sm.data(), 24, bits, nullptr, 7, back.data(), 24});
    for (int i = 0; i < 7; ++i)
      for (int j = 0; j < 24; ++j) CHECK(std::abs(back[i * 24 + j] - z[i * 24 + j]) <= sm[2 * i] * 0.5f + 1e-5f);
  }
}

TEST_CASE("memory accounting matches an independent count and the paper's KR formula") {
  auto cfg = small_config(2);
  cfg.comp.latent_dim = 8;
  cfg.comp.latent_bits = 4;
  auto codec = random_codec<float>(2, 32, 8, 1);
  Harness<float, FixedStride, LinearEncoder<float>, DensePolicy> h(cfg, FixedStride(10), codec, DensePolicy{});
  const std::int64_t n = 4 + 16 + 16 * 20;  // the window holds exactly `recent` tokens
  auto x = randn<float>(n * 32, 2);
  h.append(0, 0, x, 0, n);
  h.append(1, 1, x, 0, 100);
  const auto c = h.cache->counts();
  // layer 0: positions 4..323 compressed, every 10th a reference
  std::int64_t refs = 0, lat = 0;
  for (std::int64_t p = 4; p < n - 16; ++p) ((p - 4) % 10 == 0 ? refs : lat)++;
  // layer 1: 100 tokens: 96 after sinks, compress in blocks of 16 while >= 32 pending -> 80 compressed
  std::int64_t refs1 = 0, lat1 = 0;
  for (std::int64_t p = 4; p < 84; ++p) ((p - 4) % 10 == 0 ? refs1 : lat1)++;
  CHECK(c.tokens == n + 100);
  // the projection from positions alone agrees with what appending did, for many lengths
  for (std::int64_t len : {0, 3, 4, 19, 20, 36, 37, 52, 100, 199, 340}) {
    Harness<float, FixedStride, LinearEncoder<float>, DensePolicy> p(cfg, FixedStride(10), codec, DensePolicy{});
    p.append(0, 0, x, 0, len);
    p.append(1, 0, x, 0, len);
    const auto want = p.cache->counts(), got = p.cache->projected_counts(len);
    CHECK(got.tokens == want.tokens);
    CHECK(got.sinks == want.sinks);
    CHECK(got.recent == want.recent);
    CHECK(got.references == want.references);
    CHECK(got.latents == want.latents);
  }
  CHECK(c.sinks == 8);
  CHECK(c.recent == 16 + 16);
  CHECK(c.references == refs + refs1);
  CHECK(c.latents == lat + lat1);
  const auto m = h.cache->memory(2);  // priced as bf16
  CHECK(m.latents == (lat + lat1) * 4);          // 8 int4 values
  CHECK(m.reference_ids == (lat + lat1) * 16);   // 4 int32 ids
  CHECK(m.scales == (lat + lat1) * 8);
  CHECK(m.total == m.sinks + m.recent + m.references + m.latents + m.reference_ids + m.scales);
  // KR for layer 0 alone equals exact rows + latent payloads over dense bytes
  Harness<float, FixedStride, LinearEncoder<float>, DensePolicy> one(
      [&] { auto c1 = cfg; c1.model.n_layers = 1; c1.cap.max_seqs = 1; return c1; }(), FixedStride(10),
      [&] { auto c1 = codec; c1.layers.resize(1); return c1; }(), DensePolicy{});
  one.append(0, 0, x, 0, n);
  const auto m1 = one.cache->memory(2);
  const double kr = kr_formula(n, 4, 16, 10, 32, 8, 4, 2);
  CHECK(double(m1.total - m1.reference_ids - m1.scales) / double(m1.dense) == doctest::Approx(kr).epsilon(1e-12));
}

TEST_CASE("bad input raises its typed error and leaves the cache unchanged") {
  auto cfg = small_config(2);
  cfg.cap.max_tokens = 200;
  cfg.comp.latent_dim = 8;
  cfg.comp.latent_bits = 8;
  auto codec = random_codec<float>(2, 32, 8, 6);
  Harness<float, FixedStride, LinearEncoder<float>, DensePolicy> h(cfg, FixedStride(10), codec, DensePolicy{});
  auto x = structured_kv<float>(400, 32, 3);
  h.append(0, 0, x, 0, 150);
  h.append(0, 1, x, 0, 40);
  const auto before0 = h.reconstruct(0, 0, true), before1 = h.reconstruct(0, 1, true);
  const auto counts = h.cache->counts();
  auto unchanged = [&] {
    auto a = h.reconstruct(0, 0, true), b = h.reconstruct(0, 1, true);
    CHECK(std::memcmp(a.data(), before0.data(), a.size() * 4) == 0);
    CHECK(std::memcmp(b.data(), before1.data(), b.size() * 4) == 0);
    CHECK(h.cache->counts().tokens == counts.tokens);
    CHECK(h.cache->counts().latents == counts.latents);
  };
  const std::int32_t two[2] = {1, 0};
  const std::int32_t ip2[3] = {0, 5, 10};
  std::vector<std::int64_t> pos2{40, 41, 42, 43, 44, 150, 151, 152, 153, 154};
  auto batch = [&](const float* d, std::int64_t cols, std::span<const std::int64_t> pos, std::span<const std::int32_t> sid,
                   std::span<const std::int32_t> ip) {
    return RaggedBatch<const float>{MatrixView<const float>{d, std::int64_t(pos.size()), cols, 32}, sid, ip, pos};
  };
  // shape: wrong width, inconsistent indptr, unknown sequence, duplicated sequence, wrong layer
  CHECK_THROWS_AS(h.cache->append(0, batch(x.data(), 31, pos2, two, ip2)), ShapeError);
  const std::int32_t bad_ip[3] = {0, 6, 10};
  CHECK_THROWS_AS(h.cache->append(0, batch(x.data(), 32, pos2, two, std::span<const std::int32_t>(bad_ip, 2))), ShapeError);
  const std::int32_t unknown[2] = {1, 7};
  CHECK_THROWS_AS(h.cache->append(0, batch(x.data(), 32, pos2, unknown, ip2)), ShapeError);
  const std::int32_t dup[2] = {1, 1};
  CHECK_THROWS_AS(h.cache->append(0, batch(x.data(), 32, pos2, dup, ip2)), ShapeError);
  CHECK_THROWS_AS(h.cache->append(5, batch(x.data(), 32, pos2, two, ip2)), ShapeError);
  // non-finite: a NaN in the second sequence's rows; the first sequence must not be appended either
  auto poisoned = x;
  poisoned[7 * 32 + 3] = std::nanf("");
  CHECK_THROWS_AS(h.cache->append(0, batch(poisoned.data(), 32, pos2, two, ip2)), NonFiniteError);
  poisoned[7 * 32 + 3] = INFINITY;
  CHECK_THROWS_AS(h.cache->append(0, batch(poisoned.data(), 32, pos2, two, ip2)), NonFiniteError);
  // order: a gap, a repeat
  auto gap = pos2;
  gap[8] = 160;
  CHECK_THROWS_AS(h.cache->append(0, batch(x.data(), 32, gap, two, ip2)), OrderError);
  auto repeat = pos2;
  repeat[0] = 39;
  CHECK_THROWS_AS(h.cache->append(0, batch(x.data(), 32, repeat, two, ip2)), OrderError);
  // capacity: seq 0 holds 150 of 200
  std::vector<std::int64_t> many(60);
  for (int i = 0; i < 60; ++i) many[i] = 150 + i;
  const std::int32_t s0[1] = {0};
  const std::int32_t ip60[2] = {0, 60};
  CHECK_THROWS_AS(h.cache->append(0, batch(x.data(), 32, many, s0, ip60)), CapacityError);
  // attention: query not yet cached, too many query rows, NaN query, wrong output shape
  auto q = randn<float>(9 * 32, 1);
  std::vector<std::int64_t> qp{150};
  CHECK_THROWS_AS(h.attend(0, 0, std::vector<float>(q.begin(), q.begin() + 32), qp), OrderError);
  std::vector<std::int64_t> qp9(9, 10);
  CHECK_THROWS_AS(h.attend(0, 0, q, qp9), CapacityError);
  auto qn = std::vector<float>(q.begin(), q.begin() + 32);
  qn[0] = std::nanf("");
  CHECK_THROWS_AS(h.attend(0, 0, qn, {5}), NonFiniteError);
  std::vector<std::int64_t> rp{0, 149, 150};
  std::vector<float> out(3 * 32);
  CHECK_THROWS_AS(h.cache->reconstruct(0, 0, rp, matrix(out.data(), 3, 32), false), OrderError);
  CHECK_THROWS_AS(h.cache->reconstruct(0, 0, std::span(rp).first(2), matrix(out.data(), 3, 32), false), ShapeError);
  // a stale plan is refused
  auto good = batch(x.data(), 32, pos2, two, ip2);
  auto plan = h.cache->plan_append(0, good);
  h.cache->reset(2);
  CHECK_THROWS_AS(h.cache->run_append(plan, good), OrderError);
  unchanged();
  // and the same batch, valid, goes in whole
  h.cache->append(0, good);
  CHECK(h.cache->length(0, 0) == 155);
  CHECK(h.cache->length(0, 1) == 45);
}

TEST_CASE("configuration and buffer errors are reported at construction") {
  auto cfg = small_config(2);
  auto codec = Compressor<float>::identity(2, 32);
  auto enc = codec.linear_encoders();
  auto dec = codec.decoders();
  using C = CompressedCache<float, cpu::CpuDevice<float>, FixedStride, LinearEncoder<float>, LinearDecoder<float>, DensePolicy>;
  cpu::CpuDevice<float> dev;
  auto lay = C::layout(cfg, FixedStride(10), {}, 0);
  std::vector<std::byte> st(lay.storage_bytes), ws(lay.workspace_bytes);
  CHECK_NOTHROW(C(dev, cfg, FixedStride(10), enc, dec, {}, st, ws));
  CHECK_THROWS_AS(C(dev, cfg, FixedStride(10), enc, dec, {}, std::span(st).first(st.size() - 1), ws), CapacityError);
  CHECK_THROWS_AS(C(dev, cfg, FixedStride(10), enc, dec, {}, st, std::span(ws).first(ws.size() - 1)), CapacityError);
  auto c2 = cfg;
  c2.comp.latent_dim = 16;  // codec maps to 32
  CHECK_THROWS_AS(C(dev, c2, FixedStride(10), enc, dec, {}, st, ws), ShapeError);
  auto c3 = cfg;
  c3.model.n_q_heads = 3;  // not a multiple of kv heads
  CHECK_THROWS_AS(C::layout(c3, FixedStride(10), {}, 0), ConfigError);
  CHECK_THROWS_AS(FixedStride(0), ConfigError);
  CHECK_THROWS_AS(DynamicStride(0.5, 0.1), ConfigError);
  using CO = CompressedCache<float, cpu::CpuDevice<float>, FixedStride, LinearEncoder<float>, LinearDecoder<float>, OmniKVPolicy>;
  CHECK_THROWS_AS(CO::layout(cfg, FixedStride(10), OmniKVPolicy{{1}, 10, 4, 16}, 0), ConfigError);
}

// ---- the device interface's contract ---------------------------------------------------------
namespace {
// Devices written for earlier interface revisions: one of revision 1 would ignore the `sub` fields
// of revision 2 (wrong latents), one of revision 2 with a copy_rows_batch would ignore the norms of
// revision 3 (a search reading norms never written); neither may satisfy Device.
template <class T>
struct RevisionOneDevice : DeviceArchetype<T> {
  static constexpr int device_interface = 1;
};
template <class T>
struct RevisionTwoDevice : DeviceArchetype<T> {
  static constexpr int device_interface = 2;
  void copy_rows_batch(const CopyRowsBatchParams<T>&);
};
}  // namespace
static_assert(Device<DeviceArchetype<float>, float>);
static_assert(Device<cpu::CpuDevice<float>, float> && Device<cpu::CpuDevice<double>, double>);
static_assert(!Device<RevisionOneDevice<float>, float>);
static_assert(!Device<RevisionTwoDevice<float>, float>);
static_assert(!CopiesRowBatches<cpu::CpuDevice<float>, float>);  // the CPU copies part by part

TEST_CASE("copy_rows_batch on a device without the op copies part by part, and refuses > kMaxParts") {
  cpu::CpuDevice<float> dev;
  const int dim = 5;
  std::vector<float> src(7 * dim), a(4 * dim, -1.f), b(3 * dim, -2.f);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = float(i);
  const std::int64_t rows_a[2] = {6, 1}, rows_b[3] = {12, 10, 13};  // rows_b read at base 10
  CopyRowsBatchParams<float> batch{};
  batch.part[0] = {src.data(), dim, rows_a, a.data() + dim, dim, nullptr, 2, dim};
  batch.part[1] = {src.data(), dim, rows_a, a.data(), dim, nullptr, 0, dim};  // empty: skipped
  batch.part[2] = {src.data(), dim, rows_b, b.data(), dim, nullptr, 3, dim, 10};
  batch.n_parts = 3;
  copy_rows_batch(dev, batch);
  for (int c = 0; c < dim; ++c) {
    CHECK(a[std::size_t(c)] == -1.f);  // row 0 untouched (the empty part)
    CHECK(a[std::size_t(dim + c)] == src[std::size_t(6 * dim + c)]);
    CHECK(a[std::size_t(2 * dim + c)] == src[std::size_t(dim + c)]);
    CHECK(a[std::size_t(3 * dim + c)] == -1.f);
    CHECK(b[std::size_t(c)] == src[std::size_t(2 * dim + c)]);
    CHECK(b[std::size_t(dim + c)] == src[std::size_t(c)]);
    CHECK(b[std::size_t(2 * dim + c)] == src[std::size_t(3 * dim + c)]);
  }
  batch.n_parts = CopyRowsBatchParams<float>::kMaxParts + 1;
  CHECK_THROWS_AS(copy_rows_batch(dev, batch), ShapeError);
  batch.n_parts = -1;
  CHECK_THROWS_AS(copy_rows_batch(dev, batch), ShapeError);
}

TEST_CASE("ref_search refuses m_readable below m (the CPU reads no row past m either way)") {
  cpu::CpuDevice<float> dev;
  const int dim = 4;
  std::vector<float> x(2 * dim, 0.5f), r(5 * dim);
  for (std::size_t i = 0; i < r.size(); ++i) r[i] = float(i % 7) * 0.25f;
  const std::int32_t vis[2] = {3, 3};
  std::int32_t ids[4] = {-9, -9, -9, -9}, want[4] = {-9, -9, -9, -9};
  dev.ref_search({x.data(), dim, 2, r.data(), dim, 3, vis, dim, 2, Metric::l2, want});
  dev.ref_search({x.data(), dim, 2, r.data(), dim, 3, vis, dim, 2, Metric::l2, ids, 5});  // rows 3, 4 readable: same ids
  for (int i = 0; i < 4; ++i) CHECK(ids[i] == want[i]);
  CHECK_THROWS_AS(dev.ref_search({x.data(), dim, 2, r.data(), dim, 3, vis, dim, 2, Metric::l2, ids, 2}), ShapeError);
}

TEST_CASE("copy_rows_batch on a device without the op refuses to give norms") {
  cpu::CpuDevice<float> dev;
  std::vector<float> src(8, 1.f), dst(8, 0.f), norms(2, -1.f);
  CopyRowsBatchParams<float> b{};
  b.part[0] = {src.data(), 4, nullptr, dst.data(), 4, nullptr, 2, 4};
  b.n_parts = 1;
  b.sq_norms[0] = norms.data();
  CHECK_THROWS_AS(copy_rows_batch(dev, b), ConfigError);
  CHECK(dst[0] == 0.f);  // nothing copied
  b.sq_norms[0] = nullptr;
  copy_rows_batch(dev, b);
  CHECK(dst[7] == 1.f);
}
