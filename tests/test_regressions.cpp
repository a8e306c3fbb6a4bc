// Regression tests for defects found by the fuzz targets in fuzz/ (scripts/fuzz.sh) and by review
// while writing them. Each test states the contract (docs/ERRORS.md) the defect broke; the input
// is the smallest one that shows it.
#include <doctest/doctest.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "support.hpp"

using namespace deltakv;
using namespace dkt;

namespace {

Config tiny_config() {
  Config cfg;
  cfg.model = {2, 2, 1, 4};  // kv_dim 8
  cfg.comp.sinks = 2;
  cfg.comp.recent = 4;
  cfg.comp.latent_dim = 8;
  cfg.cap = {2, 64, 1};
  return cfg;
}

}  // namespace

// fuzz_cache (plan + run append with a second plan_append in between). plan_append writes the
// plan's items into one cache-owned array without changing the generation, so an older plan still
// passes the staleness check but now describes the newer batch: run_append copied 50 rows out of a
// 2-row buffer (heap-buffer-overflow under ASan; silent corruption without). A newer plan_append
// must make the older plan stale. (Fixed in ea427c1.)
TEST_CASE("regression: run_append of a plan superseded by a newer plan_append is an OrderError") {
  auto h = identity_harness<float>(tiny_config(), FixedStride(3), DensePolicy{});
  const int D = 8;
  std::vector<float> x1(2 * D, 1.f), x2(50 * D, 2.f);
  std::vector<std::int64_t> p1{0, 1}, p2(50);
  for (int i = 0; i < 50; ++i) p2[i] = i;
  const std::int32_t sid[1] = {0};
  const std::int32_t ip1[2] = {0, 2}, ip2[2] = {0, 50};
  const RaggedBatch<const float> b1{matrix<const float>(x1.data(), 2, D), sid, ip1, p1};
  const RaggedBatch<const float> b2{matrix<const float>(x2.data(), 50, D), sid, ip2, p2};
  const AppendPlan older = h.cache->plan_append(0, b1);
  const AppendPlan newer = h.cache->plan_append(0, b2);
  CHECK_THROWS_AS(h.cache->run_append(older, b1), OrderError);
  CHECK(h.cache->length(0, 0) == 0);
  h.cache->run_append(newer, b2);  // the newest plan is still valid
  CHECK(h.cache->length(0, 0) == 50);
}

// Follow-up of the previous one (found reviewing its fix): plan_append wrote each sequence's item
// while validating the batch, so a plan_append that failed on a later sequence had already
// overwritten the first items of the older plan, which stayed fresh (the generation only moves
// on success): running it copied 50 rows out of a 2-row buffer. A failed call changes nothing,
// so the older plan must still run exactly as planned.
TEST_CASE("regression: a plan_append that fails leaves the previous plan intact") {
  auto h = identity_harness<float>(tiny_config(), FixedStride(3), DensePolicy{});
  const int D = 8;
  std::vector<float> x1(2 * D, 1.f), x2(51 * D, 2.f);
  std::vector<std::int64_t> p1{0, 1}, p2(51);
  for (int i = 0; i < 50; ++i) p2[i] = i;
  p2[50] = 7;  // sequence 1 must start at 0: the second batch fails on its second sequence
  const std::int32_t s1[1] = {0}, s2[2] = {0, 1};
  const std::int32_t ip1[2] = {0, 2}, ip2[3] = {0, 50, 51};
  const RaggedBatch<const float> b1{matrix<const float>(x1.data(), 2, D), s1, ip1, p1};
  const RaggedBatch<const float> b2{matrix<const float>(x2.data(), 51, D), s2, ip2, p2};
  const AppendPlan plan = h.cache->plan_append(0, b1);
  CHECK_THROWS_AS((void)h.cache->plan_append(0, b2), OrderError);
  h.cache->run_append(plan, b1);
  CHECK(h.cache->length(0, 0) == 2);
  CHECK(h.cache->length(0, 1) == 0);
  std::vector<float> out(2 * D);
  const std::vector<std::int64_t> pos{0, 1};
  h.cache->reconstruct(0, 0, pos, matrix(out.data(), 2, D), false);
  CHECK(out == x1);
}

// fuzz_cache (accessor probes). The accessors indexed host tables without checking their argument:
// length() read outside st_ (undefined behaviour; ASan: heap-buffer-overflow), layer_plan(),
// selection() and position_class() used .at() and threw std::out_of_range, which is not a
// deltakv::Error. Out-of-range indices are ShapeErrors, out-of-range positions OrderErrors.
// (Fixed in 853194d.)
TEST_CASE("regression: length() with an out-of-range layer or sequence is a ShapeError") {
  auto h = identity_harness<float>(tiny_config(), FixedStride(3), DensePolicy{});
  CHECK_THROWS_AS((void)h.cache->length(0, 2), ShapeError);
  CHECK_THROWS_AS((void)h.cache->length(2, 0), ShapeError);
  CHECK_THROWS_AS((void)h.cache->length(-1, 0), ShapeError);
  CHECK_THROWS_AS((void)h.cache->length(0, -1), ShapeError);
}

TEST_CASE("regression: layer_plan() with an out-of-range layer is a ShapeError") {
  auto h = identity_harness<float>(tiny_config(), FixedStride(3), DensePolicy{});
  CHECK_THROWS_AS((void)h.cache->layer_plan(2), ShapeError);
  CHECK_THROWS_AS((void)h.cache->layer_plan(-1), ShapeError);
}

TEST_CASE("regression: selection() with an out-of-range sequence is a ShapeError") {
  auto h = identity_harness<float>(tiny_config(), FixedStride(3), DensePolicy{});
  CHECK_THROWS_AS((void)h.cache->selection(2), ShapeError);
  CHECK_THROWS_AS((void)h.cache->selection(-1), ShapeError);
}

TEST_CASE("regression: position_class() of a position outside 0 to max_tokens - 1 is an OrderError") {
  auto h = identity_harness<float>(tiny_config(), FixedStride(3), DensePolicy{});
  CHECK(h.cache->position_class(0) == 0);
  CHECK(h.cache->position_class(63) >= 1);
  CHECK_THROWS_AS((void)h.cache->position_class(64), OrderError);
  CHECK_THROWS_AS((void)h.cache->position_class(-1), OrderError);
}

// Review of the configuration check. ModelShape::kv_dim() = 2 * n_kv_heads * head_dim is computed
// in int: validate() accepts a geometry whose kv_dim overflows (undefined behaviour; here it wraps
// to 65536 while n_kv_heads * head_dim wraps negative), and the cache would then size its buffers
// with the wrapped value. Geometry whose sizes do not fit in int must be a ConfigError.
// (Fixed in ea427c1.)
TEST_CASE("regression: validate() refuses a model whose kv_dim does not fit in int") {
  Config cfg;
  cfg.model = {1, 65537, 65537, 32768};  // 2 * 65537 * 32768 = 2^32 + 2^16
  cfg.comp.recent = 1;
  cfg.comp.sinks = 0;
  cfg.cap = {1, 16, 1};
  CHECK_THROWS_AS(validate(cfg), ConfigError);
}
