#pragma once
// f_c: token (kv_dim) -> latent (d_c). The cache stores z = f_c(x) - f_c(ref); an encoder only
// maps rows, the subtraction is the cache's (so any map, linear or not, plugs in).
#include <concepts>
#include <cstdint>

#include "deltakv/device.hpp"
#include "deltakv/linear_map.hpp"
#include "deltakv/tensor.hpp"

namespace deltakv {

template <class E, class T>
concept ResidualEncoder = requires(const E& e, DeviceArchetype<T>& dev, MatrixView<const T> x,
                                   MatrixView<T> z, T* scratch, std::int64_t n) {
  { e.input_dim() } -> std::convertible_to<int>;
  { e.latent_dim() } -> std::convertible_to<int>;
  { e.scratch_elems(n) } -> std::convertible_to<std::int64_t>;  // T elements encode() may use for n rows
  e.encode(dev, x, z, scratch);                                 // z[n, d_c] = f_c(x[n, kv_dim])
};

template <class T>
struct LinearEncoder {
  LinearMap<T> f;
  int input_dim() const { return f.in; }
  int latent_dim() const { return f.out; }
  std::int64_t scratch_elems(std::int64_t) const { return 0; }
  template <class D>
  void encode(D& dev, MatrixView<const T> x, MatrixView<T> z, T*) const {
    dev.linear(LinearParams<T>{x.data, x.ld, z.data, z.ld, x.rows, f.w, f.b, f.in, f.out});
  }
};

// The paper's nonlinear f_c: w3(silu(x1) * x2) with [x1 | x2] = w12(x), hidden h (paper 3072).
template <class T>
struct SwiGLUEncoder {
  LinearMap<T> w12;  // [2h, kv_dim]
  LinearMap<T> w3;   // [d_c, h]
  int input_dim() const { return w12.in; }
  int latent_dim() const { return w3.out; }
  std::int64_t scratch_elems(std::int64_t n) const { return n * w12.out; }
  template <class D>
  void encode(D& dev, MatrixView<const T> x, MatrixView<T> z, T* scratch) const {
    const std::int64_t ldh = w12.out;
    dev.linear(LinearParams<T>{x.data, x.ld, scratch, ldh, x.rows, w12.w, w12.b, w12.in, w12.out});
    dev.swiglu(SwiGLUParams<T>{scratch, ldh, x.rows, w3.in});
    dev.linear(LinearParams<T>{scratch, ldh, z.data, z.ld, x.rows, w3.w, w3.b, w3.in, w3.out});
  }
};

static_assert(ResidualEncoder<LinearEncoder<float>, float>);
static_assert(ResidualEncoder<SwiGLUEncoder<float>, float>);

}  // namespace deltakv
