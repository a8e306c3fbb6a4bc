#pragma once
// Host-owned compressor weights for all layers (what a checkpoint or calibration produces), and
// the one place where the runtime codec kind becomes a compile-time encoder type.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "deltakv/error.hpp"
#include "deltakv/latent_decoder.hpp"
#include "deltakv/linear_map.hpp"
#include "deltakv/residual_encoder.hpp"

namespace deltakv {

enum class CodecKind { linear, swiglu };

template <class T>
struct OwnedLinear {
  std::vector<T> w;  // [out, in]
  std::vector<T> b;  // [out] or empty
  int in = 0;
  int out = 0;
  bool empty() const { return w.empty(); }
  LinearMap<T> map() const { return {w.empty() ? nullptr : w.data(), b.empty() ? nullptr : b.data(), in, out}; }
};

template <class T>
struct LayerCodec {
  OwnedLinear<T> down;  // linear f_c [d_c, kv_dim], or SwiGLU's w12 [2h, kv_dim]
  OwnedLinear<T> w3;    // SwiGLU only: [d_c, h]
  OwnedLinear<T> up;    // f_d [kv_dim, d_c]
  bool present() const { return !down.empty() && !up.empty(); }
};

template <class T>
struct Compressor {
  CodecKind kind = CodecKind::linear;
  int kv_dim = 0;
  int latent_dim = 0;
  int hidden = 0;  // SwiGLU intermediate size h
  std::vector<LayerCodec<T>> layers;  // layers without a codec (exact layers) have empty weights

  std::vector<LinearDecoder<T>> decoders() const {
    std::vector<LinearDecoder<T>> d;
    for (const auto& l : layers) d.push_back({l.up.map()});
    return d;
  }
  std::vector<LinearEncoder<T>> linear_encoders() const {
    if (kind != CodecKind::linear) throw ConfigError("compressor is SwiGLU, not linear");
    std::vector<LinearEncoder<T>> e;
    for (const auto& l : layers) e.push_back({l.down.map()});
    return e;
  }
  std::vector<SwiGLUEncoder<T>> swiglu_encoders() const {
    if (kind != CodecKind::swiglu) throw ConfigError("compressor is linear, not SwiGLU");
    std::vector<SwiGLUEncoder<T>> e;
    for (const auto& l : layers) e.push_back({l.down.map(), l.w3.map()});
    return e;
  }

  // f_c = f_d = identity (d_c = kv_dim): the codec that must reconstruct exactly.
  static Compressor identity(int n_layers, int kv_dim) {
    Compressor c;
    c.kv_dim = c.latent_dim = kv_dim;
    c.layers.resize(n_layers);
    for (auto& l : c.layers) {
      l.down = {std::vector<T>(std::size_t(kv_dim) * kv_dim, T(0)), {}, kv_dim, kv_dim};
      for (int i = 0; i < kv_dim; ++i) l.down.w[std::size_t(i) * kv_dim + i] = T(1);
      l.up = l.down;
    }
    return c;
  }
};

// Runtime kind -> encoder type: f(encoders) is called with a vector of the matching encoder type.
template <class T, class F>
decltype(auto) with_encoders(const Compressor<T>& c, F&& f) {
  if (c.kind == CodecKind::swiglu) return std::forward<F>(f)(c.swiglu_encoders());
  return std::forward<F>(f)(c.linear_encoders());
}

}  // namespace deltakv
