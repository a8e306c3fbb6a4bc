// CPU benchmark of one layer of the compressed cache, on the per-layer shapes of SmolLM2-135M and
// Llama-3.1-8B, at 4K and 32K cached tokens. Every "ours" number is printed next to a peer measured
// in the same run: a plain uncompressed float KV array (post-RoPE K, the usual engine layout) with
// straightforward Eigen attention.
//
//   append  : 128 new tokens into the compressed layer, which compresses one 128-token block
//             (reference search over ~depth/10 references + encode + quantize for b4); the cache
//             goes from N-1024 to N tokens over exactly 8 timed appends.
//             Peer: copying the same 128 rows into a float array.
//   decode  : one query token at position N-1 over the N-token layer.
//             dense_b4/b0  attend over the compressed layer: every token is reconstructed
//                          (dequantize, f_d, + reference mean, RoPE), then attention.
//             rows_*       parts of the above without the attention: reconstructing all N rows
//                          the way attention reads them, with and without RoPE on K.
//             dense_exact  the cache's attention on an exact (uncompressed) layer: isolates the
//                          cost of RoPE-on-read + the reference attention kernel.
//             filter       OmniKV filter layer (exact, dense attention + top-2048 selection).
//             sparse_b4    OmniKV sparse layer (compressed): sinks 8 + selected 2048 + window 128.
//             Peers: dense Eigen attention; the same + top-2048; the same over the same positions.
//
// Caches are built once per (shape, N) on first use and reused; the build time is printed.
// Everything runs on one thread; the summary table uses CPU time per call (robust to other
// processes on a shared machine); Google Benchmark's own output above it shows wall time too.
//
// Options (besides the usual --benchmark_* flags, e.g. --benchmark_filter=smollm2):
//   --shapes=smollm2,llama31   --contexts=4096,32768   --variants=b4,b0
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <numeric>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "deltakv/cache.hpp"
#include "deltakv/cpu/device.hpp"

namespace {

namespace dk = deltakv;
using Dev = dk::cpu::CpuDevice<float>;
using Enc = dk::LinearEncoder<float>;
using Dec = dk::LinearDecoder<float>;
using Clock = std::chrono::steady_clock;

constexpr std::int64_t kBlock = 128;              // tokens per append in the append benchmark
constexpr std::int64_t kHeadroom = 8 * kBlock;    // appended by the timed append benchmark
constexpr int kTopK = 2048;
constexpr int kSinks = 8;
constexpr int kWindow = 128;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
double process_cpu_seconds() {  // the process is single-threaded: its CPU time is this thread's
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

struct Shape {
  std::string name;
  int n_q_heads, n_kv_heads, head_dim;
  double rope_theta;
  int kv_dim() const { return 2 * n_kv_heads * head_dim; }
  int k_dim() const { return n_kv_heads * head_dim; }
  int q_dim() const { return n_q_heads * head_dim; }
};

// ---------------------------------------------------------------------------------------------
// Synthetic pre-RoPE KV rows. Each token mixes two of a few fixed directions, chosen by position
// and changing every few dozen tokens, so tokens near each other resemble each other (what the
// reference search exploits); small noise on top; every 16th K channel carries a large constant
// offset, like the outlier channels of real keys. Values do not change the speed of anything
// measured here; the structure only keeps the data plausible. Must be read sequentially.
// ---------------------------------------------------------------------------------------------
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}
  float uniform() {  // splitmix64 -> [0, 1)
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return float(z >> 40) * (1.0f / 16777216.0f);
  }
  float gauss() {  // sum of four uniforms, rescaled to unit variance: cheap and good enough here
    return (uniform() + uniform() + uniform() + uniform() - 2.0f) * 1.7320508f;
  }

 private:
  std::uint64_t state_;
};

class SyntheticKv {
 public:
  SyntheticKv(int dim, int k_dim, std::uint64_t seed) : dim_(dim), k_dim_(k_dim), rng_(seed) {
    dirs_.resize(std::size_t(kDirs) * dim);
    for (auto& x : dirs_) x = rng_.gauss();
  }
  void rows(std::int64_t n, float* out) {
    for (std::int64_t i = 0; i < n; ++i, ++pos_) {
      const float* a = dirs_.data() + std::size_t((pos_ / 41) % kDirs) * dim_;
      const float* b = dirs_.data() + std::size_t((pos_ / 97 + 3) % kDirs) * dim_;
      float* o = out + i * dim_;
      for (int d = 0; d < dim_; ++d)
        o[d] = 0.8f * a[d] + 0.4f * b[d] + 0.15f * rng_.gauss() + (d < k_dim_ && d % 16 == 5 ? 4.0f : 0.0f);
    }
  }

 private:
  static constexpr int kDirs = 8;
  int dim_, k_dim_;
  Rng rng_;
  std::int64_t pos_ = 0;
  std::vector<float> dirs_;
};

constexpr std::uint64_t kDataSeed = 20240611;

// ---------------------------------------------------------------------------------------------
// The peer: an uncompressed float cache [N, K | V] with K stored after RoPE, and plain GQA
// attention written with Eigen (one GEMV-like product per KV head for the scores, one for the
// output), exact softmax in two passes.
// ---------------------------------------------------------------------------------------------
using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using StridedRows = Eigen::Map<const RowMat, 0, Eigen::OuterStride<>>;

// NeoX/HF "rotate half" RoPE of the K part of rows [n, kv_dim] at positions pos0.., in place.
void rope_keys(float* rows, std::int64_t n, std::int64_t pos0, const Shape& s) {
  const int half = s.head_dim / 2;
  std::vector<double> inv_freq(half);
  for (int f = 0; f < half; ++f) inv_freq[f] = std::pow(s.rope_theta, -2.0 * f / s.head_dim);
  std::vector<double> c(half), sn(half);
  for (std::int64_t i = 0; i < n; ++i) {
    for (int f = 0; f < half; ++f) {
      const double ang = double(pos0 + i) * inv_freq[f];
      c[f] = std::cos(ang);
      sn[f] = std::sin(ang);
    }
    for (int h = 0; h < s.n_kv_heads; ++h) {
      float* x = rows + i * s.kv_dim() + std::int64_t(h) * s.head_dim;
      for (int f = 0; f < half; ++f) {
        const double x1 = x[f], x2 = x[f + half];
        x[f] = float(x1 * c[f] - x2 * sn[f]);
        x[f + half] = float(x2 * c[f] + x1 * sn[f]);
      }
    }
  }
}

class PlainAttention {
 public:
  explicit PlainAttention(const Shape& s) : s_(s) {}

  // out[q_dim] = softmax(q K^T / sqrt(d)) V over rows kv[0..n) (all visible). If prob_max is
  // given, prob_max[t] = max over query heads of the softmax probability of row t.
  void run(const float* kv, std::int64_t n, std::int64_t ld, const float* q, float* out, float* prob_max) {
    const int g = s_.n_q_heads / s_.n_kv_heads, hd = s_.head_dim, kd = s_.k_dim();
    const float scale = 1.0f / std::sqrt(float(hd));
    if (scores_.size() < std::size_t(n) * g) scores_.resize(std::size_t(n) * g);
    if (prob_max) std::fill(prob_max, prob_max + n, 0.0f);
    for (int h = 0; h < s_.n_kv_heads; ++h) {
      StridedRows K(kv + std::int64_t(h) * hd, n, hd, Eigen::OuterStride<>(ld));
      StridedRows V(kv + kd + std::int64_t(h) * hd, n, hd, Eigen::OuterStride<>(ld));
      Eigen::Map<const RowMat> Q(q + std::int64_t(h) * g * hd, g, hd);
      Eigen::Map<Eigen::MatrixXf> S(scores_.data(), n, g);  // column j: scores of query head h*g+j
      S.noalias() = K * Q.transpose();
      float z[64];
      for (int j = 0; j < g; ++j) {
        auto col = S.col(j).array();
        const float m = col.maxCoeff();
        col = ((col - m) * scale).exp();
        z[j] = col.sum();
      }
      Eigen::Map<RowMat> O(out + std::int64_t(h) * g * hd, g, hd);
      O.noalias() = S.transpose() * V;
      for (int j = 0; j < g; ++j) O.row(j) /= z[j];
      if (prob_max)
        for (int j = 0; j < g; ++j) {
          const float iz = 1.0f / z[j];
          const float* c = scores_.data() + std::int64_t(j) * n;
          for (std::int64_t t = 0; t < n; ++t) prob_max[t] = std::max(prob_max[t], c[t] * iz);
        }
    }
  }

 private:
  Shape s_;
  std::vector<float> scores_;
};

struct Peer {
  std::vector<float> kv;         // [N, kv_dim], K post-RoPE
  std::vector<float> append_to;  // [kHeadroom, kv_dim]: destination of the append peer
  std::vector<float> out, gathered, prob;
  std::vector<std::int32_t> idx;
  double build_s = 0;
};

// ---------------------------------------------------------------------------------------------
// One compressed cache with its buffers (the engine's job in real use).
// ---------------------------------------------------------------------------------------------
template <class Pol>
struct CacheBox {
  using Cache = dk::CompressedCache<float, Dev, dk::FixedStride, Enc, Dec, Pol>;
  Dev dev;
  std::vector<float> w_down, w_up;  // random linear codec (d_c x kv_dim, kv_dim x d_c)
  std::vector<Enc> enc;
  std::vector<Dec> dec;
  std::vector<std::byte> storage, workspace;
  std::unique_ptr<Cache> cache;
  std::vector<float> tail;            // pre-RoPE rows of positions [N - kHeadroom, N)
  std::vector<std::int64_t> tail_pos;
  int comp_layer = 0;                 // the compressed layer
  std::int64_t N = 0;
  double build_s = 0;                 // wall: data generation + appends, to N - kHeadroom tokens
  double comp_append_cpu_s = 0;       // CPU time of the appends into the compressed layer
  std::vector<float> out;

  void append(int layer, const float* rows, std::int64_t n, const std::int64_t* pos) {
    const int D = cache->config().model.kv_dim();
    const std::int32_t sid[1] = {0};
    const std::int32_t ip[2] = {0, std::int32_t(n)};
    cache->append(layer, dk::RaggedBatch<const float>{dk::MatrixView<const float>{rows, n, D, D}, sid, ip,
                                                      std::span<const std::int64_t>(pos, std::size_t(n))});
  }
  // Bring the compressed layer to N tokens (if the append benchmark did not).
  void ensure_full() {
    const std::int64_t have = cache->length(comp_layer, 0);
    if (have == N) return;
    const std::int64_t from = have - (N - kHeadroom);
    if (from < 0 || from % kBlock != 0) throw std::runtime_error("cache in an unexpected state");
    const int D = cache->config().model.kv_dim();
    append(comp_layer, tail.data() + from * D, kHeadroom - from, tail_pos.data() + from);
  }
  void attend(int layer, const float* q, std::int64_t pos, bool dense) {
    const int qd = cache->config().model.n_q_heads * cache->config().model.head_dim;
    const std::int32_t sid[1] = {0};
    const std::int32_t ip[2] = {0, 1};
    const std::int64_t qp[1] = {pos};
    out.resize(qd);
    dk::RaggedBatch<const float> b{dk::MatrixView<const float>{q, 1, qd, qd}, sid, ip, qp};
    if (dense) cache->attend_dense(layer, b, dk::matrix(out.data(), 1, qd));
    else cache->attend(layer, b, dk::matrix(out.data(), 1, qd));
  }
  // Compressed layer only: bytes at bf16 pricing vs the same tokens as dense bf16.
  std::pair<std::int64_t, std::int64_t> layer_bytes_bf16() const {
    const auto r = cache->memory(2);
    return {r.total - r.exact_layers, r.dense - r.exact_layers};
  }
};

// b4: OmniKV over two layers: layer 0 full (exact, picks the top-2048), layer 1 compressed with
// int4 latents and attending to the selection. b0: one compressed layer, raw f32 latents, dense.
template <class Pol>
std::unique_ptr<CacheBox<Pol>> build_cache(const Shape& s, std::int64_t N, Pol pol, int n_layers, int comp_layer,
                                           int latent_bits) {
  const auto t0 = Clock::now();
  auto box = std::make_unique<CacheBox<Pol>>();
  box->N = N;
  box->comp_layer = comp_layer;
  dk::Config cfg;
  cfg.model = dk::ModelShape{n_layers, s.n_q_heads, s.n_kv_heads, s.head_dim};
  cfg.rope = dk::RopeConfig{dk::RopeStyle::half, s.rope_theta, 0};
  cfg.comp = dk::CompressionConfig{};  // paper defaults: sinks 8, recent 128, block 128, k 4, d_c = kv_dim/4
  cfg.comp.latent_bits = latent_bits;
  cfg.cap = dk::Capacity{1, N, 1};
  const int D = s.kv_dim(), dc = cfg.latent_dim();

  // A random linear codec of the right size (f_d = f_c^T); its weights do not change the speed.
  Rng wr(7);
  box->w_down.resize(std::size_t(dc) * D);
  box->w_up.resize(std::size_t(D) * dc);
  for (auto& w : box->w_down) w = wr.gauss() / std::sqrt(float(D));
  for (int r = 0; r < D; ++r)
    for (int c = 0; c < dc; ++c) box->w_up[std::size_t(r) * dc + c] = box->w_down[std::size_t(c) * D + r];
  for (int l = 0; l < n_layers; ++l) {
    const bool comp = l == comp_layer;
    box->enc.push_back(Enc{dk::LinearMap<float>{comp ? box->w_down.data() : nullptr, nullptr, comp ? D : 0, comp ? dc : 0}});
    box->dec.push_back(Dec{dk::LinearMap<float>{comp ? box->w_up.data() : nullptr, nullptr, comp ? dc : 0, comp ? D : 0}});
  }
  const dk::FixedStride sel(10);
  const auto lay = CacheBox<Pol>::Cache::layout(cfg, sel, pol, 0);
  box->storage.resize(lay.storage_bytes);
  box->workspace.resize(lay.workspace_bytes);
  box->cache = std::make_unique<typename CacheBox<Pol>::Cache>(box->dev, cfg, sel, std::span<const Enc>(box->enc),
                                                              std::span<const Dec>(box->dec), pol, box->storage,
                                                              box->workspace);

  SyntheticKv gen(D, s.k_dim(), kDataSeed);
  constexpr std::int64_t kChunk = 1024;
  std::vector<float> rows(std::size_t(kChunk) * D);
  std::vector<std::int64_t> pos(kChunk);
  const std::int64_t stop = N - kHeadroom;
  for (std::int64_t p0 = 0; p0 < stop; p0 += kChunk) {
    const std::int64_t n = std::min(kChunk, stop - p0);
    gen.rows(n, rows.data());
    std::iota(pos.begin(), pos.begin() + n, p0);
    for (int l = 0; l < n_layers; ++l) {
      const double ta = process_cpu_seconds();
      box->append(l, rows.data(), n, pos.data());
      if (l == comp_layer) box->comp_append_cpu_s += process_cpu_seconds() - ta;
    }
  }
  box->tail.resize(std::size_t(kHeadroom) * D);
  gen.rows(kHeadroom, box->tail.data());
  box->tail_pos.resize(kHeadroom);
  std::iota(box->tail_pos.begin(), box->tail_pos.end(), stop);
  // Exact layers are filled to N right away; only the compressed layer waits for the tail.
  for (int l = 0; l < n_layers; ++l)
    if (l != comp_layer) box->append(l, box->tail.data(), kHeadroom, box->tail_pos.data());
  box->build_s = seconds_since(t0);
  return box;
}

struct Scenario {
  Shape shape;
  std::int64_t N = 0;
  std::vector<float> q;  // one post-RoPE query row at position N-1
  std::unique_ptr<Peer> peer_;
  std::unique_ptr<CacheBox<dk::OmniKVPolicy>> b4_;
  std::unique_ptr<CacheBox<dk::DensePolicy>> b0_;
  bool b4_selected = false;
  double check_exact_vs_peer = -1;  // rel. L2 difference, cache exact layer vs peer (same math)

  Scenario(Shape s, std::int64_t n) : shape(std::move(s)), N(n) {
    SyntheticKv qgen(shape.q_dim(), 0, 99 + std::uint64_t(n));
    q.resize(shape.q_dim());
    qgen.rows(1, q.data());
    for (auto& x : q) x *= 0.5f;
  }

  Peer& peer() {
    if (!peer_) {
      const auto t0 = Clock::now();
      peer_ = std::make_unique<Peer>();
      const int D = shape.kv_dim();
      peer_->kv.resize(std::size_t(N) * D);
      SyntheticKv gen(D, shape.k_dim(), kDataSeed);
      gen.rows(N, peer_->kv.data());
      rope_keys(peer_->kv.data(), N, 0, shape);
      peer_->append_to.assign(std::size_t(kHeadroom) * D, 0.0f);
      peer_->out.resize(shape.q_dim());
      peer_->build_s = seconds_since(t0);
    }
    return *peer_;
  }
  CacheBox<dk::OmniKVPolicy>& b4() {
    if (!b4_) {
      dk::OmniKVPolicy pol;
      pol.full_layers = {0};
      pol.top_k = kTopK;
      pol.sinks = kSinks;
      pol.window = kWindow;
      pol.exact_full_layers = true;
      b4_ = build_cache(shape, N, pol, 2, 1, 4);
    }
    return *b4_;
  }
  CacheBox<dk::DensePolicy>& b0() {
    if (!b0_) b0_ = build_cache(shape, N, dk::DensePolicy{}, 1, 0, 0);
    return *b0_;
  }
  // b4 at N tokens in both layers, with layer 0's top-K selection made for the query.
  CacheBox<dk::OmniKVPolicy>& b4_full() {
    auto& b = b4();
    b.ensure_full();
    if (!b4_selected) {
      b.attend(0, q.data(), N - 1, false);
      b4_selected = true;
    }
    return b;
  }
  // Positions the OmniKV sparse layer attends: sinks, selection (middle only), window.
  std::vector<std::int64_t> sparse_positions() {
    auto& b = b4_full();
    std::vector<std::int64_t> p;
    const std::int64_t w0 = N - kWindow;
    for (std::int64_t i = 0; i < kSinks; ++i) p.push_back(i);
    for (auto x : b.cache->selection(0))
      if (x >= kSinks && x < w0) p.push_back(x);
    for (std::int64_t i = w0; i < N; ++i) p.push_back(i);
    return p;
  }
};

// ---------------------------------------------------------------------------------------------
// Benchmarks
// ---------------------------------------------------------------------------------------------
template <class Box>
void bm_append(benchmark::State& state, Box& box) {
  const int D = box.cache->config().model.kv_dim();
  if (box.cache->length(box.comp_layer, 0) != box.N - kHeadroom) {
    state.SkipWithError("the append benchmark runs once per process (the cache is no longer at N-1024)");
    return;
  }
  std::int64_t i = 0;
  for (auto _ : state) {
    box.append(box.comp_layer, box.tail.data() + i * kBlock * D, kBlock, box.tail_pos.data() + i * kBlock);
    ++i;
  }
  state.SetItemsProcessed(state.iterations() * kBlock);
}

// The same 128 tokens (positions N-1024.., as stored by an engine: post-RoPE) copied into a
// plain float array, cycling over 8 block slots like the timed appends of the cache.
void bm_append_peer(benchmark::State& state, Scenario& sc) {
  Peer& p = sc.peer();
  const std::int64_t D = sc.shape.kv_dim();
  const float* src = p.kv.data() + (sc.N - kHeadroom) * D;
  std::int64_t i = 0;
  for (auto _ : state) {
    const std::int64_t slot = i % (kHeadroom / kBlock);
    std::memcpy(p.append_to.data() + slot * kBlock * D, src + slot * kBlock * D, sizeof(float) * kBlock * D);
    benchmark::ClobberMemory();
    ++i;
  }
  state.SetItemsProcessed(state.iterations() * kBlock);
}

void bm_dense_peer(benchmark::State& state, Scenario& sc) {
  Peer& p = sc.peer();
  const int D = sc.shape.kv_dim();
  PlainAttention att(sc.shape);
  for (auto _ : state) {
    att.run(p.kv.data(), sc.N, D, sc.q.data(), p.out.data(), nullptr);
    benchmark::DoNotOptimize(p.out.data());
  }
}

void bm_filter_peer(benchmark::State& state, Scenario& sc) {
  Peer& p = sc.peer();
  const int D = sc.shape.kv_dim();
  PlainAttention att(sc.shape);
  p.prob.resize(sc.N);
  const std::int64_t c0 = kSinks, c1 = sc.N - kWindow, nc = c1 - c0;
  const int k = int(std::min<std::int64_t>(kTopK, nc));
  p.idx.resize(nc);
  for (auto _ : state) {
    att.run(p.kv.data(), sc.N, D, sc.q.data(), p.out.data(), p.prob.data());
    std::iota(p.idx.begin(), p.idx.end(), std::int32_t(c0));
    const float* pr = p.prob.data();
    std::nth_element(p.idx.begin(), p.idx.begin() + k, p.idx.end(),
                     [pr](std::int32_t a, std::int32_t b) { return pr[a] > pr[b] || (pr[a] == pr[b] && a < b); });
    std::sort(p.idx.begin(), p.idx.begin() + k);
    benchmark::DoNotOptimize(p.idx.data());
  }
}

void bm_sparse_peer(benchmark::State& state, Scenario& sc) {
  Peer& p = sc.peer();
  const auto pos = sc.sparse_positions();
  const int D = sc.shape.kv_dim();
  const std::int64_t n = std::int64_t(pos.size());
  p.gathered.resize(std::size_t(n) * D);
  PlainAttention att(sc.shape);
  for (auto _ : state) {
    for (std::int64_t i = 0; i < n; ++i)
      std::memcpy(p.gathered.data() + i * D, p.kv.data() + pos[i] * D, sizeof(float) * D);
    att.run(p.gathered.data(), n, D, sc.q.data(), p.out.data(), nullptr);
    benchmark::DoNotOptimize(p.out.data());
  }
  state.counters["attended"] = double(n);
}

enum class Ours { dense_b4, dense_b0, dense_exact, filter, sparse_b4 };

// Parts of a dense decode: rows of all N positions as attention reads them (128 at a time),
// without the attention itself; with or without RoPE on K.
void bm_rows(benchmark::State& state, Scenario& sc, int layer, bool rope) {
  auto& b = sc.b4_full();
  const int D = sc.shape.kv_dim();
  constexpr std::int64_t kTile = 128;
  std::vector<float> tile(std::size_t(kTile) * D);
  std::vector<std::int64_t> pos(sc.N);
  std::iota(pos.begin(), pos.end(), std::int64_t{0});
  for (auto _ : state) {
    for (std::int64_t t = 0; t < sc.N; t += kTile) {
      const std::int64_t n = std::min(kTile, sc.N - t);
      b.cache->reconstruct(layer, 0, std::span<const std::int64_t>(pos.data() + t, std::size_t(n)),
                           dk::matrix(tile.data(), n, D), rope);
    }
    benchmark::DoNotOptimize(tile.data());
  }
}

void bm_decode(benchmark::State& state, Scenario& sc, Ours which) {
  switch (which) {
    case Ours::dense_b0: {
      auto& b = sc.b0();
      b.ensure_full();
      for (auto _ : state) b.attend(0, sc.q.data(), sc.N - 1, false);
      break;
    }
    case Ours::dense_b4: {
      auto& b = sc.b4_full();
      for (auto _ : state) b.attend(1, sc.q.data(), sc.N - 1, true);
      break;
    }
    case Ours::dense_exact: {
      auto& b = sc.b4_full();
      for (auto _ : state) b.attend(0, sc.q.data(), sc.N - 1, true);
      // Same math as the peer on exact data: the outputs must agree to float rounding.
      Peer& p = sc.peer();
      PlainAttention att(sc.shape);
      att.run(p.kv.data(), sc.N, sc.shape.kv_dim(), sc.q.data(), p.out.data(), nullptr);
      double e = 0, nn = 0;
      for (std::size_t i = 0; i < p.out.size(); ++i) {
        e += (double(b.out[i]) - p.out[i]) * (double(b.out[i]) - p.out[i]);
        nn += double(p.out[i]) * p.out[i];
      }
      sc.check_exact_vs_peer = std::sqrt(e / std::max(nn, 1e-300));
      break;
    }
    case Ours::filter: {
      auto& b = sc.b4_full();
      for (auto _ : state) b.attend(0, sc.q.data(), sc.N - 1, false);
      break;
    }
    case Ours::sparse_b4: {
      auto& b = sc.b4_full();
      for (auto _ : state) b.attend(1, sc.q.data(), sc.N - 1, false);
      state.counters["attended"] = double(sc.sparse_positions().size());
      break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Result collection and the summary table
// ---------------------------------------------------------------------------------------------
struct Measured {
  double real_s = 0, cpu_s = 0;  // per iteration
  std::int64_t iters = 0;
};
std::map<std::string, Measured> g_results;

class CollectingReporter : public benchmark::ConsoleReporter {
 public:
  explicit CollectingReporter(OutputOptions o) : ConsoleReporter(o) {}
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs) {
      if (r.error_occurred || r.run_type != Run::RT_Iteration || r.iterations <= 0) continue;
      auto& m = g_results[r.run_name.function_name];
      // Repetitions: keep the running mean over all iterations.
      const double it = double(r.iterations);
      m.real_s = (m.real_s * double(m.iters) + r.real_accumulated_time) / (double(m.iters) + it);
      m.cpu_s = (m.cpu_s * double(m.iters) + r.cpu_accumulated_time) / (double(m.iters) + it);
      m.iters += r.iterations;
    }
    ConsoleReporter::ReportRuns(runs);
  }
};

std::string fmt_time(double s) {
  char b[32];
  if (s >= 1.0) std::snprintf(b, sizeof b, "%.3f s", s);
  else if (s >= 1e-3) std::snprintf(b, sizeof b, "%.3f ms", s * 1e3);
  else std::snprintf(b, sizeof b, "%.1f us", s * 1e6);
  return b;
}
std::string fmt_bytes(double x) {
  char b[32];
  if (x >= 1 << 20) std::snprintf(b, sizeof b, "%.2f MiB", x / double(1 << 20));
  else std::snprintf(b, sizeof b, "%.1f KiB", x / 1024.0);
  return b;
}
std::string fmt_rate(double tok_per_s) {
  char b[32];
  if (tok_per_s >= 1e6) std::snprintf(b, sizeof b, "%.1fM tok/s", tok_per_s / 1e6);
  else if (tok_per_s >= 1e3) std::snprintf(b, sizeof b, "%.1fk tok/s", tok_per_s / 1e3);
  else std::snprintf(b, sizeof b, "%.0f tok/s", tok_per_s);
  return b;
}

std::string name_of(const Scenario& sc, const std::string& op) {
  return sc.shape.name + "/N=" + std::to_string(sc.N) + "/" + op;
}

void print_table(const std::vector<std::unique_ptr<Scenario>>& scenarios) {
  struct Row {
    const char* label;
    const char* ours;
    const char* peer;
    bool append;
  };
  const Row rows[] = {
      {"append 128 tok + compress, int4 latents", "append_b4", "append_peer", true},
      {"append 128 tok + compress, f32 latents", "append_b0", "append_peer", true},
      {"decode, dense over compressed layer (int4)", "dense_b4", "dense_peer", false},
      {"decode, dense over compressed layer (f32)", "dense_b0", "dense_peer", false},
      {"  part: reconstruct N rows, no RoPE (int4)", "rows_b4", "dense_peer", false},
      {"  part: reconstruct N rows + RoPE on K (int4)", "rows_b4_rope", "dense_peer", false},
      {"decode, dense over exact layer (cache kernel)", "dense_exact", "dense_peer", false},
      {"  part: read N exact rows + RoPE on K", "rows_exact_rope", "dense_peer", false},
      {"decode, OmniKV filter layer (exact, +top-2048)", "filter", "filter_peer", false},
      {"decode, OmniKV sparse layer (int4) vs same positions", "sparse_b4", "sparse_peer", false},
      {"decode, OmniKV sparse layer (int4) vs dense peer", "sparse_b4", "dense_peer", false},
  };
  std::printf("\n== deltakv CPU summary: CPU time per call (single thread), ours vs peer measured in this run ==\n");
  std::printf("peer = plain float KV array (K post-RoPE) with Eigen attention; ratio = ours / peer (>1: ours slower)\n\n");
  std::printf("%-14s %6s  %-52s %11s %11s %8s  %s\n", "shape", "N", "op", "ours", "peer", "ratio", "note");
  for (const auto& sc : scenarios)
    for (const auto& r : rows) {
      const auto o = g_results.find(name_of(*sc, r.ours));
      const auto p = g_results.find(name_of(*sc, r.peer));
      if (o == g_results.end() || p == g_results.end()) continue;
      std::string note;
      if (r.append)
        note = "ours " + fmt_rate(double(kBlock) / o->second.cpu_s) + ", peer " +
               fmt_rate(double(kBlock) / p->second.cpu_s) + "; depth N-1024..N";
      std::printf("%-14s %6lld  %-52s %11s %11s %7.1fx  %s\n", sc->shape.name.c_str(), (long long)sc->N, r.label,
                  fmt_time(o->second.cpu_s).c_str(), fmt_time(p->second.cpu_s).c_str(),
                  o->second.cpu_s / p->second.cpu_s, note.c_str());
    }

  std::printf("\n== compressed layer memory at N tokens (cache.memory(2): exact rows and f32-latent payload priced as bf16) ==\n\n");
  std::printf("%-14s %6s  %-8s %12s %12s %7s  %s\n", "shape", "N", "latents", "ours", "bf16 dense", "ratio",
              "build (untimed setup; to N-1024 tokens)");
  auto mem_row = [](const Scenario& sc, const char* what, auto& box) {
    box.ensure_full();
    const auto [ours, dense] = box.layer_bytes_bf16();
    const std::int64_t built = sc.N - kHeadroom;
    char note[160];
    std::snprintf(note, sizeof note, "%.2f s wall (data gen + all layers); compressed-layer appends %.2f s CPU = %s",
                  box.build_s, box.comp_append_cpu_s, fmt_rate(double(built) / box.comp_append_cpu_s).c_str());
    std::printf("%-14s %6lld  %-8s %12s %12s %6.3f   %s\n", sc.shape.name.c_str(), (long long)sc.N, what,
                fmt_bytes(double(ours)).c_str(), fmt_bytes(double(dense)).c_str(), double(ours) / double(dense), note);
  };
  for (const auto& sc : scenarios) {
    if (sc->b4_) mem_row(*sc, "int4", *sc->b4_);
    if (sc->b0_) mem_row(*sc, "f32", *sc->b0_);
  }
  bool any_check = false;
  for (const auto& sc : scenarios)
    if (sc->check_exact_vs_peer >= 0) {
      if (!any_check) std::printf("\n== check: cache exact-layer output vs peer output (rel. L2; same math, float rounding only) ==\n\n");
      any_check = true;
      std::printf("%-14s %6lld  %.2e\n", sc->shape.name.c_str(), (long long)sc->N, sc->check_exact_vs_peer);
    }
  std::printf("\n");
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  std::string x;
  while (std::getline(ss, x, ','))
    if (!x.empty()) v.push_back(x);
  return v;
}

bool wanted(const std::vector<std::string>& list, const std::string& x) {
  return std::any_of(list.begin(), list.end(), [&](const std::string& w) { return x.find(w) != std::string::npos; });
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  std::vector<std::string> shapes{"smollm2", "llama31"}, variants{"b4", "b0"};
  std::vector<std::int64_t> contexts{4096, 32768};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&](const char* key) { return a.rfind(key, 0) == 0 ? a.substr(std::strlen(key)) : std::string(); };
    if (a.rfind("--shapes=", 0) == 0) shapes = split(val("--shapes="));
    else if (a.rfind("--variants=", 0) == 0) variants = split(val("--variants="));
    else if (a.rfind("--contexts=", 0) == 0) {
      contexts.clear();
      for (const auto& c : split(val("--contexts="))) contexts.push_back(std::stoll(c));
    } else {
      std::fprintf(stderr, "unknown argument %s\n(options: --shapes=smollm2,llama31 --contexts=4096,32768 "
                           "--variants=b4,b0, plus --benchmark_*)\n", a.c_str());
      return 2;
    }
  }
  for (auto c : contexts)
    if (c < kHeadroom + 1024 || c % kBlock != 0) {
      std::fprintf(stderr, "contexts must be multiples of %lld and >= %lld\n", (long long)kBlock,
                   (long long)(kHeadroom + 1024));
      return 2;
    }

  const std::vector<Shape> all_shapes{
      {"smollm2-135m", 9, 3, 64, 100000.0},   // per layer: 3 KV heads x 64, 9 query heads
      {"llama31-8b", 32, 8, 128, 500000.0},   // per layer: 8 KV heads x 128, 32 query heads
  };
  std::vector<std::unique_ptr<Scenario>> scenarios;
  for (const auto& s : all_shapes) {
    if (!wanted(shapes, s.name)) continue;
    for (auto N : contexts) scenarios.push_back(std::make_unique<Scenario>(s, N));
  }

  const bool b4 = wanted(variants, "b4"), b0 = wanted(variants, "b0");
  for (auto& up : scenarios) {
    Scenario* sc = up.get();
    auto reg = [&](const std::string& op, auto fn) {
      return benchmark::RegisterBenchmark(name_of(*sc, op).c_str(), fn)->Unit(benchmark::kMillisecond);
    };
    if (b4) reg("append_b4", [sc](benchmark::State& st) { bm_append(st, sc->b4()); })->Iterations(kHeadroom / kBlock);
    if (b0) reg("append_b0", [sc](benchmark::State& st) { bm_append(st, sc->b0()); })->Iterations(kHeadroom / kBlock);
    reg("append_peer", [sc](benchmark::State& st) { bm_append_peer(st, *sc); })->Unit(benchmark::kMicrosecond);
    reg("dense_peer", [sc](benchmark::State& st) { bm_dense_peer(st, *sc); });
    if (b4) {
      reg("dense_b4", [sc](benchmark::State& st) { bm_decode(st, *sc, Ours::dense_b4); });
      reg("rows_b4", [sc](benchmark::State& st) { bm_rows(st, *sc, 1, false); });
      reg("rows_b4_rope", [sc](benchmark::State& st) { bm_rows(st, *sc, 1, true); });
      reg("dense_exact", [sc](benchmark::State& st) { bm_decode(st, *sc, Ours::dense_exact); });
      reg("rows_exact_rope", [sc](benchmark::State& st) { bm_rows(st, *sc, 0, true); });
      reg("filter_peer", [sc](benchmark::State& st) { bm_filter_peer(st, *sc); });
      reg("filter", [sc](benchmark::State& st) { bm_decode(st, *sc, Ours::filter); });
      reg("sparse_peer", [sc](benchmark::State& st) { bm_sparse_peer(st, *sc); });
      reg("sparse_b4", [sc](benchmark::State& st) { bm_decode(st, *sc, Ours::sparse_b4); });
    }
    if (b0) reg("dense_b0", [sc](benchmark::State& st) { bm_decode(st, *sc, Ours::dense_b0); });
  }

  // A custom display reporter skips Google Benchmark's colour auto-detection: colour only on a tty.
  CollectingReporter reporter(isatty(fileno(stdout)) ? benchmark::ConsoleReporter::OO_ColorTabular
                                                     : benchmark::ConsoleReporter::OO_Tabular);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  print_table(scenarios);
  return 0;
}
