#pragma once
// Shared by the GPU cache tests: a grid-valued codec, a CompressedCache on CudaDevice with its
// storage, workspace and codec weights in device memory, and a single-sequence append.
#include <algorithm>
#include <memory>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

#include "cuda_test_util.cuh"

namespace dkt_cuda {

using namespace deltakv;
using namespace dkt;

inline Compressor<float> grid_codec(int n_layers, int kv_dim, int dc, std::uint32_t seed) {
  Compressor<float> c;
  c.kv_dim = kv_dim;
  c.latent_dim = dc;
  c.layers.resize(static_cast<std::size_t>(n_layers));
  for (int l = 0; l < n_layers; ++l) {
    c.layers[std::size_t(l)].down = {grid_values(std::size_t(dc) * kv_dim, seed + 2 * l, -8, 8, 16.f), {}, kv_dim, dc};
    c.layers[std::size_t(l)].up = {grid_values(std::size_t(kv_dim) * dc, seed + 2 * l + 1, -4, 4, 16.f), {}, dc, kv_dim};
  }
  return c;
}

template <class T>
std::vector<T> convert(const std::vector<float>& v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return to_bf16(v);
}

// The GPU twin of dkt::Harness: device buffers for storage, workspace and the codec's weights.
// Enc: LinearEncoder<T> (a linear codec), SwiGLUEncoder<T> or a type made from one (a SwiGLU
// codec's w12 and w3).
template <class T, class Pol, class Enc = LinearEncoder<T>>
struct GpuHarness {
  using Dev = cuda::CudaDevice<T>;
  using Cache = CompressedCache<T, Dev, FixedStride, Enc, LinearDecoder<T>, Pol>;
  Dev dev{nullptr, 0, true};  // its own stream: results are read after dev.synchronize()
  std::vector<std::unique_ptr<DBuf<T>>> weights;
  std::vector<Enc> enc;
  std::vector<LinearDecoder<T>> dec;
  std::unique_ptr<DBuf<std::byte>> storage, workspace;
  std::unique_ptr<Cache> cache;

  GpuHarness(const Config& cfg, FixedStride sel, const Compressor<float>& codec, Pol pol) {
    auto up = [&](const OwnedLinear<float>& o) {
      LinearMap<T> m{nullptr, nullptr, o.in, o.out};
      if (o.empty()) return m;
      weights.push_back(std::make_unique<DBuf<T>>(convert<T>(o.w)));
      m.w = weights.back()->p;
      if (!o.b.empty()) {
        weights.push_back(std::make_unique<DBuf<T>>(convert<T>(o.b)));
        m.b = weights.back()->p;
      }
      return m;
    };
    for (const auto& l : codec.layers) {
      if constexpr (std::is_same_v<Enc, LinearEncoder<T>>) enc.push_back({up(l.down)});
      else enc.push_back(Enc{SwiGLUEncoder<T>{up(l.down), up(l.w3)}});
      dec.push_back({up(l.up)});
    }
    std::int64_t scratch = 0;
    for (const auto& e : enc) scratch = std::max(scratch, e.scratch_elems(cfg.compress_rows()));
    auto lay = Cache::layout(cfg, sel, pol, scratch);
    storage = std::make_unique<DBuf<std::byte>>(lay.storage_bytes);
    workspace = std::make_unique<DBuf<std::byte>>(lay.workspace_bytes);
    storage->poison();
    workspace->poison();
    cache = std::make_unique<Cache>(dev, cfg, sel, std::span<const Enc>(enc),
                                    std::span<const LinearDecoder<T>>(dec), pol,
                                    std::span<std::byte>(storage->p, storage->n), std::span<std::byte>(workspace->p, workspace->n));
  }

  // x̂ of positions [0, n) of (layer, seq), with or without RoPE, on the host (the device output
  // poisoned first), as dkt::Harness::reconstruct gives the CPU's
  std::vector<T> reconstruct(int layer, int seq, std::int64_t n, bool rope) {
    const int D = cache->config().model.kv_dim();
    std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
    std::iota(pos.begin(), pos.end(), 0);
    DBuf<T> dout(static_cast<std::size_t>(n * D));
    dout.poison();
    cache->reconstruct(layer, seq, pos, MatrixView<T>{dout.p, n, D, D}, rope);
    dev.synchronize();
    return dout.get();
  }
};

template <class Cache, class T>
void append_rows(Cache& cache, int layer, int seq, const T* rows, std::int64_t count, int D) {
  std::vector<std::int64_t> pos(static_cast<std::size_t>(count));
  for (std::int64_t i = 0; i < count; ++i) pos[std::size_t(i)] = cache.length(layer, seq) + i;
  const std::int32_t sid[1] = {seq};
  const std::int32_t ip[2] = {0, std::int32_t(count)};
  cache.append(layer, RaggedBatch<const T>{MatrixView<const T>{rows, count, D, D}, sid, ip, pos});
}

}  // namespace dkt_cuda
