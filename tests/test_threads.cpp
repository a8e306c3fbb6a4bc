// Thread-safety of the documented sharing rules (docs/ERRORS.md, "Threads"):
//   * distinct caches, each with its own CpuDevice, used from several threads at once give
//     bit-identical results to the same work done serially;
//   * one Compressor (host weights) may be shared read-only by caches on several threads;
//   * SafetensorsFile / GgufFile objects may be read from several threads at once.
// Every test case name starts with "thread" so that `ctest -R thread` (the ThreadSanitizer build
// of scripts/sanitize.sh) runs exactly these. Assertions run on the main thread only: workers
// return their results (or their exception) and the main thread compares.
#include <doctest/doctest.h>

#include <cstring>
#include <exception>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "deltakv/io/checkpoint.hpp"
#include "deltakv/io/safetensors.hpp"
#include "support.hpp"

#if __has_include("deltakv/io/gguf.hpp")
#include "deltakv/io/gguf.hpp"
#define DELTAKV_TEST_THREADS_GGUF 1
#else
#define DELTAKV_TEST_THREADS_GGUF 0
#endif

using namespace deltakv;
using namespace dkt;

namespace {

constexpr int kThreads = 4;

Config thread_config() {
  Config cfg;
  cfg.model = {4, 4, 2, 8};  // kv_dim 32, GQA group 2
  cfg.comp.sinks = 4;
  cfg.comp.recent = 16;
  cfg.comp.block = 8;
  cfg.comp.latent_dim = 8;
  cfg.comp.latent_bits = 8;
  cfg.cap = {2, 256, 4};
  return cfg;
}

// One engine's worth of work on its own device and cache, with weights viewed from `codec` (which
// it only reads): chunked prefill then decode steps for two sequences in one batch, attention on
// every layer after every step, then every position reconstructed. Returns every output's bits.
template <class Pol>
std::vector<float> run_engine(const Config& cfg, const Pol& pol, const Compressor<float>& codec, std::uint32_t seed) {
  using Cache = CompressedCache<float, cpu::CpuDevice<float>, FixedStride, LinearEncoder<float>, LinearDecoder<float>, Pol>;
  cpu::CpuDevice<float> dev;
  const auto enc = codec.linear_encoders();
  const auto dec = codec.decoders();
  const auto lay = Cache::layout(cfg, FixedStride(10), pol, 0);
  std::vector<std::byte> storage(lay.storage_bytes), workspace(lay.workspace_bytes);
  Cache cache(dev, cfg, FixedStride(10), std::span<const LinearEncoder<float>>(enc),
              std::span<const LinearDecoder<float>>(dec), pol, storage, workspace);

  const int L = cfg.model.n_layers, D = cfg.model.kv_dim(), QD = cfg.model.n_q_heads * cfg.model.head_dim;
  const std::int64_t n0 = 180, n1 = 131;  // tokens of sequences 0 and 1
  std::vector<std::vector<float>> x;      // per layer, sequence 0 rows then sequence 1 rows
  for (int l = 0; l < L; ++l) {
    auto a = structured_kv<float>(n0, D, seed + 10 * l);
    auto b = structured_kv<float>(n1, D, seed + 10 * l + 5);
    a.insert(a.end(), b.begin(), b.end());
    x.push_back(std::move(a));
  }
  std::vector<float> result;
  std::int64_t done0 = 0, done1 = 0;
  std::uint32_t step = 0;
  while (done0 < n0 || done1 < n1) {
    const std::int64_t c0 = std::min<std::int64_t>(n0 - done0, done0 < 120 ? 37 : 1);
    const std::int64_t c1 = std::min<std::int64_t>(n1 - done1, done1 < 100 ? 29 : 1);
    const std::int32_t sid[2] = {0, 1};
    const std::int32_t ip[3] = {0, std::int32_t(c0), std::int32_t(c0 + c1)};
    std::vector<std::int64_t> pos;
    for (std::int64_t i = 0; i < c0; ++i) pos.push_back(done0 + i);
    for (std::int64_t i = 0; i < c1; ++i) pos.push_back(done1 + i);
    for (int l = 0; l < L; ++l) {
      std::vector<float> rows(x[l].begin() + done0 * D, x[l].begin() + (done0 + c0) * D);
      rows.insert(rows.end(), x[l].begin() + (n0 + done1) * D, x[l].begin() + (n0 + done1 + c1) * D);
      cache.append(l, RaggedBatch<const float>{matrix<const float>(rows.data(), c0 + c1, D), sid, ip, pos});
    }
    done0 += c0;
    done1 += c1;
    // two query rows for sequence 0 (its last two positions), one for sequence 1
    const auto q = randn<float>(3 * std::size_t(QD), seed * 1000 + step++);
    const std::vector<std::int64_t> qpos{done0 - 2, done0 - 1, done1 - 1};
    const std::int32_t qip[3] = {0, 2, 3};
    for (int l = 0; l < L; ++l) {
      std::vector<float> out(q.size());
      cache.attend(l, RaggedBatch<const float>{matrix<const float>(q.data(), 3, QD), sid, qip, qpos},
                   matrix(out.data(), 3, QD));
      result.insert(result.end(), out.begin(), out.end());
    }
  }
  for (int l = 0; l < L; ++l)
    for (int s = 0; s < 2; ++s) {
      const std::int64_t n = cache.length(l, s);
      std::vector<std::int64_t> pos(n);
      for (std::int64_t i = 0; i < n; ++i) pos[i] = i;
      std::vector<float> out(std::size_t(n) * D);
      cache.reconstruct(l, s, pos, matrix(out.data(), n, D), true);
      result.insert(result.end(), out.begin(), out.end());
    }
  const TokenCounts c = cache.counts();
  for (std::int64_t v : {c.tokens, c.sinks, c.recent, c.references, c.latents, c.exact_layer, c.pages})
    result.push_back(static_cast<float>(v));
  return result;
}

// Runs every job on its own std::thread at once; returns their results (rethrows a worker's exception).
template <class R>
std::vector<R> run_concurrently(const std::vector<std::function<R()>>& jobs) {
  std::vector<R> results(jobs.size());
  std::vector<std::exception_ptr> errors(jobs.size());
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < jobs.size(); ++i)
    threads.emplace_back([&, i] {
      try {
        results[i] = jobs[i]();
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return results;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

bool same_weights(const Compressor<float>& a, const Compressor<float>& b) {
  if (a.layers.size() != b.layers.size()) return false;
  for (std::size_t i = 0; i < a.layers.size(); ++i)
    for (auto m : {&LayerCodec<float>::down, &LayerCodec<float>::w3, &LayerCodec<float>::up}) {
      const auto &x = a.layers[i].*m, &y = b.layers[i].*m;
      if (!same_bits(x.w, y.w) || !same_bits(x.b, y.b) || x.in != y.in || x.out != y.out) return false;
    }
  return true;
}

// The four policies, each a job over its own codec and seed.
std::vector<std::function<std::vector<float>()>> policy_jobs(const Config& cfg, const Compressor<float>* shared) {
  std::vector<std::function<std::vector<float>()>> jobs;
  auto codec_for = [&](std::uint32_t seed) {
    return shared ? *shared : random_codec<float>(cfg.model.n_layers, cfg.model.kv_dim(), cfg.latent_dim(), seed);
  };
  // Capture the codec by value for private codecs, by pointer for the shared one.
  auto add = [&](auto pol, std::uint32_t seed) {
    if (shared) {
      jobs.push_back([cfg, pol, shared, seed] { return run_engine(cfg, pol, *shared, seed); });
    } else {
      jobs.push_back([cfg, pol, codec = codec_for(seed), seed] { return run_engine(cfg, pol, codec, seed); });
    }
  };
  add(DensePolicy{}, 11);
  add(OmniKVPolicy{{0, 2}, 24, 4, 16}, 12);
  add(QuestPolicy{8, 48, 1, 2, 8}, 13);
  add(StreamingPolicy{4, 32}, 14);
  return jobs;
}

}  // namespace

TEST_CASE("thread: distinct caches with their own devices on 4 threads match serial use bit for bit") {
  const Config cfg = thread_config();
  const auto jobs = policy_jobs(cfg, nullptr);
  REQUIRE(jobs.size() == kThreads);
  std::vector<std::vector<float>> serial;
  for (const auto& j : jobs) serial.push_back(j());
  for (const auto& r : serial) REQUIRE(r.size() > 1000);

  // four different engines at once
  const auto parallel = run_concurrently(jobs);
  for (int i = 0; i < kThreads; ++i) CHECK_MESSAGE(same_bits(parallel[i], serial[i]), "policy job " << i);

  // the same engine (same inputs) four times at once
  for (int which = 0; which < kThreads; ++which) {
    const auto same = run_concurrently(std::vector<std::function<std::vector<float>()>>(kThreads, jobs[which]));
    for (int i = 0; i < kThreads; ++i) CHECK_MESSAGE(same_bits(same[i], serial[which]), "job " << which << " thread " << i);
  }
}

TEST_CASE("thread: one shared Compressor serves caches on 4 threads read-only") {
  const Config cfg = thread_config();
  const Compressor<float> shared = random_codec<float>(cfg.model.n_layers, cfg.model.kv_dim(), cfg.latent_dim(), 77);
  const Compressor<float> pristine = shared;
  const auto jobs = policy_jobs(cfg, &shared);
  std::vector<std::vector<float>> serial;
  for (const auto& j : jobs) serial.push_back(j());
  const auto parallel = run_concurrently(jobs);
  for (int i = 0; i < kThreads; ++i) CHECK_MESSAGE(same_bits(parallel[i], serial[i]), "policy job " << i);
  CHECK(same_weights(shared, pristine));  // nobody wrote to the shared weights
}

TEST_CASE("thread: a SafetensorsFile is read and loaded as a checkpoint from 4 threads at once") {
  const io::SafetensorsFile file = io::SafetensorsFile::open(data_path("paper_linear.safetensors"));
  auto job = [&file]() {
    std::vector<float> all;
    for (const std::string& n : file.names()) {
      const auto v = file.read_as<float>(n);
      all.insert(all.end(), v.begin(), v.end());
    }
    const Compressor<float> c = io::load_paper_checkpoint<float>(file, 2, 0);
    for (const auto& l : c.layers)
      for (const auto* m : {&l.down, &l.w3, &l.up}) all.insert(all.end(), m->w.begin(), m->w.end());
    return all;
  };
  const std::vector<float> serial = job();
  REQUIRE(!serial.empty());
  const auto parallel = run_concurrently(std::vector<std::function<std::vector<float>()>>(kThreads, job));
  for (int i = 0; i < kThreads; ++i) CHECK(same_bits(parallel[i], serial));
}

#if DELTAKV_TEST_THREADS_GGUF
TEST_CASE("thread: a GgufFile is read and dequantized from 4 threads at once") {
  const io::GgufFile file = io::GgufFile::from_bytes(read_bytes(data_path("small.gguf")));
  auto job = [&file]() {
    std::vector<float> all;
    for (const auto& t : file.tensors()) {
      if (!io::ggml_can_dequantize(t.type)) continue;
      const auto v = file.dequantize(t.name);
      all.insert(all.end(), v.begin(), v.end());
    }
    for (const std::string& k : file.keys()) all.push_back(static_cast<float>(k.size()));
    return all;
  };
  const std::vector<float> serial = job();
  REQUIRE(!serial.empty());
  const auto parallel = run_concurrently(std::vector<std::function<std::vector<float>()>>(kThreads, job));
  for (int i = 0; i < kThreads; ++i) CHECK(same_bits(parallel[i], serial));
}
#endif
