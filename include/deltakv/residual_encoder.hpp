#pragma once
// f_c: token (kv_dim) -> latent (d_c). The cache stores z = f_c(x) - f_c(ref); an encoder only
// maps rows, the subtraction is the cache's (so any map, linear or not, plugs in). An encoder whose
// last map is linear may also offer encode_residual (EncodesResiduals), which the cache prefers:
// that map runs once, on the difference, and its bias cancels.
#include <concepts>
#include <cstdint>

#include "deltakv/device.hpp"
#include "deltakv/error.hpp"
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

// Optional: z[n] = f_c(x) - f_c(r) for xr = [x; r] (2n rows, x above r), which encode_residual may
// overwrite; scratch as for encode() of 2n rows. The cache calls it instead of encode() wherever it
// exists, so it must compute what encode() twice and a subtraction would: a type deriving from
// LinearEncoder or SwiGLUEncoder that changes encode() must change (or delete) encode_residual too.
// (A refinement of ResidualEncoder, so it lives beside it.)
template <class E, class T>
concept EncodesResiduals = ResidualEncoder<E, T> && requires(const E& e, DeviceArchetype<T>& dev, MatrixView<T> xr,
                                                             MatrixView<T> z, T* scratch) {
  e.encode_residual(dev, xr, z, scratch);
};

namespace detail {
inline void check_residual_rows(std::int64_t xr_rows, std::int64_t z_rows) {
  if (xr_rows % 2 != 0 || z_rows != xr_rows / 2)
    throw ShapeError("encode_residual: xr must hold 2n rows (x above r) and z n rows");
}
}  // namespace detail

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
  // W x + b - (W r + b) = W (x - r): x -= r in place (rounded to T), then one product of n rows
  template <class D>
  void encode_residual(D& dev, MatrixView<T> xr, MatrixView<T> z, T*) const {
    detail::check_residual_rows(xr.rows, z.rows);
    const std::int64_t n = z.rows;
    dev.axpy_rows(AxpyRowsParams<T>{xr.data + n * xr.ld, xr.ld, xr.data, xr.ld, n, f.in, T(-1)});
    dev.linear(LinearParams<T>{xr.data, xr.ld, z.data, z.ld, n, f.w, nullptr, f.in, f.out});
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
  // w3 h_x + b - (w3 h_r + b) = w3 (h_x - h_r): w12 on all 2n rows, the SwiGLU difference of each
  // pair (swiglu's sub), then one w3 product of n rows
  template <class D>
  void encode_residual(D& dev, MatrixView<T> xr, MatrixView<T> z, T* scratch) const {
    detail::check_residual_rows(xr.rows, z.rows);
    const std::int64_t ldh = w12.out, n = z.rows;
    dev.linear(LinearParams<T>{xr.data, xr.ld, scratch, ldh, xr.rows, w12.w, w12.b, w12.in, w12.out});
    dev.swiglu(SwiGLUParams<T>{scratch, ldh, n, w3.in, scratch + n * ldh, ldh});
    dev.linear(LinearParams<T>{scratch, ldh, z.data, z.ld, n, w3.w, nullptr, w3.in, w3.out});
  }
};

static_assert(ResidualEncoder<LinearEncoder<float>, float>);
static_assert(ResidualEncoder<SwiGLUEncoder<float>, float>);
static_assert(EncodesResiduals<LinearEncoder<float>, float>);
static_assert(EncodesResiduals<SwiGLUEncoder<float>, float>);

}  // namespace deltakv
