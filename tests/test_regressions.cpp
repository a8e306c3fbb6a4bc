// Regression tests for defects found by the fuzz targets in fuzz/ (scripts/fuzz.sh) and by review
// while writing them. Each test states the contract (docs/ERRORS.md) the defect broke; the input
// is the smallest one that shows it.
#include <doctest/doctest.h>

#include <cstdint>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/resource.h>
#include <unistd.h>
#endif

#include "support.hpp"

using namespace deltakv;
using namespace dkt;


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

// Review of cache.hpp (third session, noticed and left): n_layers had no bound, so the per-layer host
// vectors of an absurd count failed an allocation instead of raising a typed error, and storage()
// cast the ring's row count (recent + block, summed in 64 bits) to int unchecked.
TEST_CASE("regression: validate() bounds n_layers and the ring's row count") {
  Config cfg;
  cfg.model = {kMaxLayers, 2, 1, 8};
  cfg.comp.recent = 4;
  cfg.comp.sinks = 0;
  cfg.cap = {1, 16, 1};
  validate(cfg);  // the limit itself is valid
  cfg.model.n_layers = kMaxLayers + 1;
  CHECK_THROWS_AS(validate(cfg), ConfigError);
  cfg.model.n_layers = std::numeric_limits<int>::max();
  CHECK_THROWS_AS(validate(cfg), ConfigError);
  cfg.model.n_layers = 2;
  cfg.comp.recent = std::numeric_limits<int>::max() - 8;
  cfg.comp.block = 8;
  validate(cfg);  // recent + block = INT_MAX fits
  cfg.comp.block = 9;
  CHECK_THROWS_AS(validate(cfg), ConfigError);
  cfg.comp.block = 0;  // block defaults to recent: 2 * recent overflows int
  CHECK_THROWS_AS(validate(cfg), ConfigError);
}

// Review of the layout arithmetic. geometry() and workspace_plan() multiplied and summed byte
// counts in size_t without checks: a geometry that validate() accepts (every size fits in int)
// but whose buffers do not fit in size_t wrapped around, and layout() returned a small size
// (here storage ~2^38 bytes per sequence times 2^31 - 1 sequences; the attention accumulator
// (2^31 - 1 query rows) x (2^31 - 4 q-head dims) x 4 bytes). The constructor would then have
// accepted a small buffer and written far beyond it. Sizes that overflow are a ConfigError.
TEST_CASE("regression: layout() of a geometry whose byte counts overflow size_t is a ConfigError") {
  using C = CompressedCache<float, cpu::CpuDevice<float>, FixedStride, LinearEncoder<float>, LinearDecoder<float>,
                            DensePolicy>;
  const int hd = (1 << 30) - 2;  // kv_dim = 2^31 - 4, n_q_heads * head_dim = 2^31 - 4: both fit in int
  Config cfg = identity_config({1, 2, 1, hd}, 2, 4, {1, 64, 1});
  cfg.comp.latent_dim = 16;
  cfg.rope.style = RopeStyle::none;
  validate(cfg);  // a valid configuration ...
  const auto one = C::layout(cfg, FixedStride(3), DensePolicy{}, 0);
  const std::size_t row = std::size_t(cfg.model.kv_dim()) * sizeof(float);
  CHECK(one.storage_bytes >= (2 + 8) * row);  // ... whose sizes are still representable: sinks + ring rows at least

  Config seqs = cfg;  // storage: per-sequence bytes times max_seqs
  seqs.cap.max_seqs = std::numeric_limits<int>::max();
  CHECK_THROWS_AS((void)C::layout(seqs, FixedStride(3), DensePolicy{}, 0), ConfigError);
  seqs.cap.max_seqs = 2;
  const std::size_t per_seq = C::layout(seqs, FixedStride(3), DensePolicy{}, 0).storage_bytes - one.storage_bytes;
  CHECK(per_seq >= (2 + 8) * row);
  seqs.cap.max_seqs = 1000;  // large but representable: no error, and exactly 999 more sequences' worth (the
                             // position tables at the front are shared)
  CHECK(C::layout(seqs, FixedStride(3), DensePolicy{}, 0).storage_bytes == one.storage_bytes + 999 * per_seq);

  Config queries = cfg;  // workspace: query rows x q heads x head_dim x accumulator bytes
  queries.cap.max_query_rows = std::numeric_limits<int>::max();
  CHECK_THROWS_AS((void)C::layout(queries, FixedStride(3), DensePolicy{}, 0), ConfigError);

  // the encoder's scratch size comes from the caller: overflowing or negative is refused too
  CHECK_THROWS_AS((void)C::layout(cfg, FixedStride(3), DensePolicy{}, std::numeric_limits<std::int64_t>::max()),
                  ConfigError);
  CHECK_THROWS_AS((void)C::layout(cfg, FixedStride(3), DensePolicy{}, -1), ConfigError);
}

// Review of run_append. A plan was checked only by its generation, which every cache counts
// from 1: the newest plan of cache A, made when A and B had seen the same number of changes,
// was accepted by B.run_append and run against B's sequences (here it copied 50 rows of a
// 50-row batch planned for A into B, whose own newest plan was for 2 rows). A plan belongs
// to the cache that made it.
TEST_CASE("regression: run_append refuses a plan made by another cache") {
  auto a = identity_harness<float>(tiny_config(), FixedStride(3), DensePolicy{});
  auto b = identity_harness<float>(tiny_config(), FixedStride(3), DensePolicy{});
  const int D = 8;
  std::vector<float> xa(50 * D, 1.f), xb(2 * D, 2.f);
  std::vector<std::int64_t> pa(50), pb{0, 1};
  for (int i = 0; i < 50; ++i) pa[i] = i;
  const std::int32_t sid[1] = {0};
  const std::int32_t ipa[2] = {0, 50}, ipb[2] = {0, 2};
  const RaggedBatch<const float> ba{matrix<const float>(xa.data(), 50, D), sid, ipa, pa};
  const RaggedBatch<const float> bb{matrix<const float>(xb.data(), 2, D), sid, ipb, pb};
  const AppendPlan plan_a = a.cache->plan_append(0, ba);
  const AppendPlan plan_b = b.cache->plan_append(0, bb);
  REQUIRE(plan_a.generation == plan_b.generation);  // the situation the generation alone cannot tell apart
  CHECK_THROWS_AS(b.cache->run_append(plan_a, ba), OrderError);
  CHECK_THROWS_AS(a.cache->run_append(plan_b, bb), OrderError);
  CHECK_THROWS_AS(b.cache->run_append(AppendPlan{}, bb), OrderError);  // a default plan belongs to no cache
  CHECK(a.cache->length(0, 0) == 0);
  CHECK(b.cache->length(0, 0) == 0);
  // the refusals changed nothing: each cache's own plan still runs
  b.cache->run_append(plan_b, bb);
  a.cache->run_append(plan_a, ba);
  CHECK(a.cache->length(0, 0) == 50);
  CHECK(b.cache->length(0, 0) == 2);
  std::vector<float> out(2 * D);
  b.cache->reconstruct(0, 0, pb, matrix(out.data(), 2, D), false);
  CHECK(out == xb);
}

// Review of references_of. k_neighbors above 64 passed validate(), the constructor and every
// append, and only references_of refused it (ConfigError, from a reader, long after the cache
// had been built and filled). The limit is part of the configuration check now.
TEST_CASE("regression: k_neighbors above kMaxNeighbors is refused by validate(), up front") {
  using C = CompressedCache<float, cpu::CpuDevice<float>, FixedStride, LinearEncoder<float>, LinearDecoder<float>,
                            DensePolicy>;
  Config cfg = tiny_config();
  cfg.comp.k_neighbors = kMaxNeighbors + 1;
  CHECK_THROWS_AS(validate(cfg), ConfigError);
  CHECK_THROWS_AS((void)C::layout(cfg, FixedStride(3), DensePolicy{}, 0), ConfigError);
  CHECK_THROWS_AS((void)identity_harness<float>(cfg, FixedStride(3), DensePolicy{}), ConfigError);

  // the largest accepted k works end to end, references_of included
  cfg.comp.k_neighbors = kMaxNeighbors;
  auto h = identity_harness<float>(cfg, FixedStride(3), DensePolicy{});
  const auto x = structured_kv<float>(64, 8, 3);
  h.append(0, 0, x, 0, 64);
  std::vector<std::int64_t> refs(kMaxNeighbors);
  int latents = 0;
  for (std::int64_t p = 0; p < 64; ++p) {
    const int c = h.cache->references_of(0, 0, p, refs);
    if (c == 0) continue;
    ++latents;
    std::int64_t earlier = 0;  // every earlier reference is among the k = 64 nearest
    for (std::int64_t q = cfg.comp.sinks; q < p; ++q) earlier += h.cache->position_class(q) == 1;
    CHECK(c == earlier);
    for (int j = 0; j < c; ++j) CHECK(h.cache->position_class(refs[j]) == 1);
  }
  CHECK(latents > 20);
}

// A copied cache would share the caller's storage and workspace with the original (the two would
// overwrite each other's rows): copying does not compile; moving does.
TEST_CASE("regression: CompressedCache cannot be copied, only moved") {
  using Cache = Harness<double, FixedStride, LinearEncoder<double>, DensePolicy>::Cache;
  static_assert(!std::is_copy_constructible_v<Cache>);
  static_assert(!std::is_copy_assignable_v<Cache>);
  static_assert(std::is_move_constructible_v<Cache>);
  auto h = identity_harness<double>(identity_config({1, 2, 1, 8}, 2, 4, {1, 64, 4}), FixedStride(4), DensePolicy{});
  Cache moved(std::move(*h.cache));
  CHECK(moved.length(0, 0) == 0);
  CHECK(moved.config().model.head_dim == 8);
}

// While alive, caps this process's address space at its current size plus `headroom` bytes, so a
// call that tries to allocate gigabytes fails with std::bad_alloc (a test failure) instead of
// taking the machine's memory. Does nothing under AddressSanitizer/ThreadSanitizer (they reserve
// terabytes of shadow memory) or outside Linux.
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define DKT_NO_ADDRESS_SPACE_CAP 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || !defined(__linux__)
#define DKT_NO_ADDRESS_SPACE_CAP 1
#endif
struct AddressSpaceCap {
#ifndef DKT_NO_ADDRESS_SPACE_CAP
  rlimit old{};
  bool set = false;
  explicit AddressSpaceCap(std::size_t headroom) {
    std::ifstream statm("/proc/self/statm");
    std::size_t pages = 0;
    if (!(statm >> pages) || getrlimit(RLIMIT_AS, &old) != 0) return;
    rlimit cap = old;
    const std::size_t want = pages * std::size_t(sysconf(_SC_PAGESIZE)) + headroom;
    if (old.rlim_cur != RLIM_INFINITY && old.rlim_cur <= want) return;  // already tighter
    cap.rlim_cur = want;
    set = setrlimit(RLIMIT_AS, &cap) == 0;
  }
  ~AddressSpaceCap() {
    if (set) setrlimit(RLIMIT_AS, &old);
  }
#else
  explicit AddressSpaceCap(std::size_t) {}
#endif
  AddressSpaceCap(const AddressSpaceCap&) = delete;
  AddressSpaceCap& operator=(const AddressSpaceCap&) = delete;
};

// Review of layout() and the constructor. Both built the host position tables (class, row and
// reference count per position: 9 bytes per token, plus the reference positions) for max_tokens
// positions before any size check: validate() accepts max_tokens up to 2^31 - 1, so layout() of
// such a config tried to allocate about 18 GB of host memory (bad_alloc, or the OOM killer) and,
// where that succeeded, returned a layout instead of an error; a config whose byte counts overflow
// size_t built gigabytes of tables before the overflow was refused; and the constructor did the
// same before looking at the caller's buffers. Now: max_tokens above kMaxCacheTokens (2^29 - 1,
// what the int32 (row << 2) | class position codes of the GPU path can address) is a ConfigError,
// every byte count the Config alone decides (the workspace, a lower bound of the storage) is
// checked first, and the constructor refuses short buffers before building any table.
TEST_CASE("regression: an absurd max_tokens is a typed error before any O(max_tokens) allocation") {
  using C = CompressedCache<float, cpu::CpuDevice<float>, FixedStride, LinearEncoder<float>, LinearDecoder<float>,
                            DensePolicy>;
  const AddressSpaceCap cap(std::size_t(1) << 30);  // 1 GiB more than now: the old tables took 4.5 to 18 GB
  const auto codec = Compressor<float>::identity(1, 8);
  const auto enc = codec.linear_encoders();
  const auto dec = codec.decoders();
  cpu::CpuDevice<float> dev;
  auto construct = [&](const Config& c, std::span<std::byte> storage, std::span<std::byte> workspace) {
    C cache(dev, c, FixedStride(3), std::span<const LinearEncoder<float>>(enc),
            std::span<const LinearDecoder<float>>(dec), DensePolicy{}, storage, workspace);
  };

  // max_tokens that validate() accepts but no cache can hold: layout() and the constructor say so
  Config big = identity_config({1, 2, 1, 4}, 2, 4, {1, 0, 1});
  for (const std::int64_t n : {(std::int64_t{1} << 31) - 1, std::int64_t{1} << 30, kMaxCacheTokens + 1}) {
    CAPTURE(n);
    big.cap.max_tokens = n;
    validate(big);
    try {
      (void)C::layout(big, FixedStride(3), DensePolicy{}, 0);
      FAIL("layout() accepted max_tokens ", n);
    } catch (const ConfigError& e) {
      CHECK(std::string(e.what()).find("max_tokens") != std::string::npos);
    }
    CHECK_THROWS_AS(construct(big, {}, {}), ConfigError);
  }
  static_assert(kMaxCacheTokens < (std::int64_t{1} << 29));  // position_codes(): (row << 2) | class in int32

  // Within the limit, but the byte counts overflow size_t (2^29 - 1 tokens x 2^31 - 1 sequences x
  // at least a kB per token): refused before the tables (4.5 GB of them) are built
  Config wide = identity_config({1, 2, 1, 512}, 2, 4, {std::numeric_limits<int>::max(), kMaxCacheTokens, 1});
  wide.comp.latent_dim = 0;  // kv_dim / 4
  validate(wide);
  CHECK_THROWS_AS((void)C::layout(wide, FixedStride(3), DensePolicy{}, 0), ConfigError);

  // A valid config at the limit (storage and workspace of gigabytes) with buffers far too small:
  // the constructor says so before it builds its tables
  Config most = identity_config({1, 2, 1, 4}, 2, 4, {1, kMaxCacheTokens, 1});
  std::vector<std::byte> small(4096);
  CHECK_THROWS_AS(construct(most, {}, {}), CapacityError);
  CHECK_THROWS_AS(construct(most, small, small), CapacityError);

  // an ordinary capacity still works with the exact layout
  Config ok = identity_config({1, 2, 1, 4}, 2, 4, {2, 4096, 1});
  const auto lay = C::layout(ok, FixedStride(3), DensePolicy{}, 0);
  std::vector<std::byte> storage(lay.storage_bytes), workspace(lay.workspace_bytes);
  construct(ok, storage, workspace);
  CHECK_THROWS_AS(construct(ok, std::span<std::byte>(storage).first(lay.storage_bytes - 1), workspace), CapacityError);
}
