#pragma once
// Test helpers: independent naive references (RoPE, softmax attention), data generators, and a
// small owner of a cache's buffers, small cache configurations; file/byte helpers come from
// support_io.hpp. Nothing here calls the code under test's math.
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "deltakv/cache.hpp"
#include "deltakv/compressor.hpp"
#include "deltakv/cpu/device.hpp"
#include "support_io.hpp"

namespace dkt {

using namespace deltakv;

// A small cache configuration for the identity codec (latent_dim = kv_dim), used by the cache and
// regression tests; tests change the fields they are about.
inline Config identity_config(ModelShape model, int sinks, int recent, Capacity cap) {
  Config cfg;
  cfg.model = model;
  cfg.comp.sinks = sinks;
  cfg.comp.recent = recent;
  cfg.comp.latent_dim = model.kv_dim();
  cfg.cap = cap;
  return cfg;
}
// kv_dim 32 (GQA group 2), 4 sinks, a 16-token window, 3 sequences of up to 400 tokens.
inline Config small_config(int layers = 2) { return identity_config({layers, 4, 2, 8}, 4, 16, {3, 400, 8}); }
// kv_dim 8, 2 layers, 2 sinks, a 4-token window, 2 sequences of up to 64 tokens.
inline Config tiny_config() { return identity_config({2, 2, 1, 4}, 2, 4, {2, 64, 1}); }

template <class T>
double rel_l2(const std::vector<T>& got, const std::vector<T>& want) {
  double e = 0, n = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double d = double(got[i]) - double(want[i]);
    e += d * d;
    n += double(want[i]) * double(want[i]);
  }
  return std::sqrt(e / std::max(n, 1e-300));
}

template <class T>
std::vector<T> randn(std::size_t n, std::uint32_t seed, double sd = 1.0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, sd);
  std::vector<T> v(n);
  for (auto& x : v) x = T(nd(rng));
  return v;
}

// Structured KV: a few slowly drifting directions plus noise, so nearby tokens are similar (what
// makes references useful), with outliers in K like real models.
template <class T>
std::vector<T> structured_kv(std::int64_t n, int dim, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  const int centres = 6;
  std::vector<double> c(std::size_t(centres) * dim);
  for (auto& x : c) x = nd(rng);
  std::vector<T> v(std::size_t(n) * dim);
  for (std::int64_t t = 0; t < n; ++t) {
    const int a = int((t / 37) % centres), b = int((t / 53) % centres);
    for (int d = 0; d < dim; ++d)
      v[std::size_t(t) * dim + d] = T(0.7 * c[std::size_t(a) * dim + d] + 0.5 * c[std::size_t(b) * dim + d] + 0.1 * nd(rng) +
                                      (d % 17 == 3 ? 3.0 : 0.0));
  }
  return v;
}

// Naive RoPE on the K half of rows [n, kv_dim] (positions 0..n-1 + offset), its own code.
template <class T>
void naive_rope(std::vector<T>& x, std::int64_t n, const ModelShape& m, const RopeConfig& r, std::int64_t pos0 = 0) {
  if (r.style == RopeStyle::none) return;
  const int rot = r.rot_dim > 0 ? r.rot_dim : m.head_dim;
  for (std::int64_t t = 0; t < n; ++t)
    for (int h = 0; h < m.n_kv_heads; ++h) {
      T* p = x.data() + t * m.kv_dim() + std::int64_t(h) * m.head_dim;
      std::vector<double> o(p, p + m.head_dim);
      for (int i = 0; i < rot; ++i) {
        const int f = r.style == RopeStyle::half ? i % (rot / 2) : i / 2;
        const double ang = double(t + pos0) / std::pow(r.theta, 2.0 * f / rot);
        const bool first = r.style == RopeStyle::half ? i < rot / 2 : i % 2 == 0;
        const int partner = r.style == RopeStyle::half ? (first ? i + rot / 2 : i - rot / 2) : (first ? i + 1 : i - 1);
        p[i] = T(first ? o[i] * std::cos(ang) - o[partner] * std::sin(ang) : o[i] * std::cos(ang) + o[partner] * std::sin(ang));
      }
    }
}

// Naive causal GQA attention of query rows (positions qpos) over keys/values kv [n, kv_dim]
// (post-RoPE K), restricted to `allowed` positions when given.
template <class T>
std::vector<T> naive_attention(const std::vector<T>& q, const std::vector<std::int64_t>& qpos, const std::vector<T>& kv,
                               const ModelShape& m, const std::vector<std::int64_t>* allowed = nullptr) {
  const int hq = m.n_q_heads, hd = m.head_dim, g = hq / m.n_kv_heads, D = m.kv_dim(), kd = m.k_dim();
  std::vector<T> out(q.size(), T(0));
  for (std::size_t i = 0; i < qpos.size(); ++i)
    for (int h = 0; h < hq; ++h) {
      std::vector<std::int64_t> keys;
      if (allowed) {
        for (auto p : *allowed)
          if (p <= qpos[i]) keys.push_back(p);
      } else {
        for (std::int64_t p = 0; p <= qpos[i]; ++p) keys.push_back(p);
      }
      std::vector<double> s;
      double mx = -1e300;
      for (auto p : keys) {
        double d = 0;
        for (int e = 0; e < hd; ++e) d += double(q[i * hq * hd + h * hd + e]) * double(kv[p * D + (h / g) * hd + e]);
        s.push_back(d / std::sqrt(double(hd)));
        mx = std::max(mx, s.back());
      }
      double z = 0;
      for (auto& v : s) z += (v = std::exp(v - mx));
      for (std::size_t j = 0; j < keys.size(); ++j)
        for (int e = 0; e < hd; ++e)
          out[i * hq * hd + h * hd + e] += T(s[j] / z * double(kv[keys[j] * D + kd + (h / g) * hd + e]));
    }
  return out;
}

// An encoder offering encode() only, not encode_residual: a CompressedCache takes its generic path
// with it (x and its reference mean encoded as rows, the latent their difference).
template <class E>
struct EncodeOnly {
  E e;
  int input_dim() const { return e.input_dim(); }
  int latent_dim() const { return e.latent_dim(); }
  std::int64_t scratch_elems(std::int64_t n) const { return e.scratch_elems(n); }
  template <class D, class T>
  void encode(D& dev, MatrixView<const T> x, MatrixView<T> z, T* scratch) const {
    e.encode(dev, x, z, scratch);
  }
};

// Owns the buffers of one cache (the engine's job in real use).
template <class T, class Sel, class Enc, class Pol>
struct Harness {
  using Cache = CompressedCache<T, cpu::CpuDevice<T>, Sel, Enc, LinearDecoder<T>, Pol>;
  cpu::CpuDevice<T> dev;
  Compressor<T> codec;  // owns the weights the encoders/decoders point into
  std::vector<Enc> enc;
  std::vector<LinearDecoder<T>> dec;
  std::vector<std::byte> storage, workspace;
  std::unique_ptr<Cache> cache;

  Harness(const Config& cfg, Sel sel, Compressor<T> c, Pol pol) : codec(std::move(c)) {
    if constexpr (std::is_same_v<Enc, LinearEncoder<T>>) enc = codec.linear_encoders();
    else enc = codec.swiglu_encoders();
    dec = codec.decoders();
    std::int64_t scratch = 0;
    for (auto& x : enc) scratch = std::max(scratch, x.scratch_elems(cfg.compress_rows()));
    auto lay = Cache::layout(cfg, sel, pol, scratch);
    storage.resize(lay.storage_bytes);
    workspace.resize(lay.workspace_bytes);
    cache = std::make_unique<Cache>(dev, cfg, sel, std::span<const Enc>(enc), std::span<const LinearDecoder<T>>(dec), pol,
                                    storage, workspace);
  }

  // Append rows [n, kv_dim] of one sequence at its next positions.
  void append(int layer, int seq, const std::vector<T>& rows, std::int64_t begin, std::int64_t count) {
    const int D = cache->config().model.kv_dim();
    std::vector<std::int64_t> pos(count);
    for (std::int64_t i = 0; i < count; ++i) pos[i] = cache->length(layer, seq) + i;
    const std::int32_t sid[1] = {seq};
    const std::int32_t ip[2] = {0, std::int32_t(count)};
    cache->append(layer, RaggedBatch<const T>{MatrixView<const T>{rows.data() + begin * D, count, D, D}, sid, ip, pos});
  }

  std::vector<T> reconstruct(int layer, int seq, bool rope) {
    const int D = cache->config().model.kv_dim();
    const std::int64_t n = cache->length(layer, seq);
    std::vector<std::int64_t> pos(n);
    for (std::int64_t i = 0; i < n; ++i) pos[i] = i;
    std::vector<T> out(std::size_t(n) * D, std::numeric_limits<T>::quiet_NaN());  // poisoned first
    cache->reconstruct(layer, seq, pos, matrix(out.data(), n, D), rope);
    return out;
  }

  // Query rows for one sequence at given positions.
  std::vector<T> attend(int layer, int seq, const std::vector<T>& q, const std::vector<std::int64_t>& qpos, bool dense = false) {
    const int qd = cache->config().model.n_q_heads * cache->config().model.head_dim;
    const std::int64_t n = std::int64_t(qpos.size());
    const std::int32_t sid[1] = {seq};
    const std::int32_t ip[2] = {0, std::int32_t(n)};
    std::vector<T> out(q.size(), std::numeric_limits<T>::quiet_NaN());
    RaggedBatch<const T> b{MatrixView<const T>{q.data(), n, qd, qd}, sid, ip, qpos};
    if (dense) cache->attend_dense(layer, b, matrix(out.data(), n, qd));
    else cache->attend(layer, b, matrix(out.data(), n, qd));
    return out;
  }
};

template <class T, class Sel, class Pol>
auto identity_harness(const Config& cfg, Sel sel, Pol pol) {
  return Harness<T, Sel, LinearEncoder<T>, Pol>(cfg, sel, Compressor<T>::identity(cfg.model.n_layers, cfg.model.kv_dim()), pol);
}

// A random orthonormal-ish linear codec of latent size dc (not the identity: loses information).
template <class T>
Compressor<T> random_codec(int n_layers, int kv_dim, int dc, std::uint32_t seed) {
  Compressor<T> c;
  c.kv_dim = kv_dim;
  c.latent_dim = dc;
  c.layers.resize(n_layers);
  for (int l = 0; l < n_layers; ++l) {
    auto w = randn<T>(std::size_t(dc) * kv_dim, seed + l, 1.0 / std::sqrt(double(kv_dim)));
    c.layers[l].down = {w, {}, kv_dim, dc};
    std::vector<T> wt(std::size_t(kv_dim) * dc);
    for (int i = 0; i < dc; ++i)
      for (int j = 0; j < kv_dim; ++j) wt[std::size_t(j) * dc + i] = w[std::size_t(i) * kv_dim + j];
    c.layers[l].up = {wt, {}, dc, kv_dim};
  }
  return c;
}

}  // namespace dkt
