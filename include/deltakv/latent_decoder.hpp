#pragma once
// f_d: latent (d_c) -> token residual (kv_dim). Reconstruction is x̂ = f_d(z) + ref; the decoder
// only maps rows, the cache adds the reference mean.
#include <concepts>
#include <cstdint>

#include "deltakv/device.hpp"
#include "deltakv/linear_map.hpp"
#include "deltakv/tensor.hpp"

namespace deltakv {

template <class Dc, class T>
concept LatentDecoder = requires(const Dc& d, DeviceArchetype<T>& dev, MatrixView<const T> z,
                                 MatrixView<T> y) {
  { d.latent_dim() } -> std::convertible_to<int>;
  { d.output_dim() } -> std::convertible_to<int>;
  d.decode(dev, z, y);  // y[n, kv_dim] = f_d(z[n, d_c])
};

template <class T>
struct LinearDecoder {
  LinearMap<T> f;  // [kv_dim, d_c]
  int latent_dim() const { return f.in; }
  int output_dim() const { return f.out; }
  template <class D>
  void decode(D& dev, MatrixView<const T> z, MatrixView<T> y) const {
    dev.linear(LinearParams<T>{z.data, z.ld, y.data, y.ld, z.rows, f.w, f.b, f.in, f.out});
  }
};

static_assert(LatentDecoder<LinearDecoder<float>, float>);

}  // namespace deltakv
