#pragma once
// Helpers of the CUDA test suite: the skip guard, an owning device buffer with poisoning, data
// generators (grid-valued data makes f32 sums exact, so reference search and quantization can be
// compared bit for bit), and comparisons.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "deltakv/cuda/device.hpp"
#include "support.hpp"

namespace dkt_cuda {

namespace vendor = deltakv::gpu::vendor;

inline bool available() {
  static const bool ok = vendor::device_count() > 0;
  return ok;
}

// First statement of every test case: CI machines have no GPU and must pass.
#define DKT_REQUIRE_CUDA()                         \
  do {                                             \
    if (!::dkt_cuda::available()) {                \
      MESSAGE("no CUDA device: skipped");          \
      return;                                      \
    }                                              \
  } while (0)

// Owning device buffer. Transfers are synchronous for the whole device, so a buffer may be read
// right after ops on any stream once that stream was synchronized.
template <class T>
struct DBuf {
  T* p = nullptr;
  std::size_t n = 0;
  explicit DBuf(std::size_t count) : n(count) {
    p = static_cast<T*>(vendor::malloc_device(std::max<std::size_t>(1, n) * sizeof(T)));
  }
  explicit DBuf(const std::vector<T>& h) : DBuf(h.size()) { set(h); }
  ~DBuf() { vendor::free_device(p); }
  DBuf(const DBuf&) = delete;
  DBuf& operator=(const DBuf&) = delete;
  void set(const std::vector<T>& h) {
    REQUIRE(h.size() <= n);
    vendor::memcpy_async(p, h.data(), h.size() * sizeof(T), nullptr);
    vendor::device_sync();
  }
  // every byte 0xFF: NaN for f32/bf16, -1 for ints; another byte where -1 is a valid output (ids)
  void poison(int byte = 0xFF) {
    vendor::memset_async(p, byte, n * sizeof(T), nullptr);
    vendor::device_sync();
  }
  std::vector<T> get() const {
    vendor::device_sync();
    std::vector<T> h(n);
    vendor::memcpy_async(h.data(), p, n * sizeof(T), nullptr);
    vendor::device_sync();
    return h;
  }
};

template <class T>
std::vector<T> poisoned(std::size_t n) {
  std::vector<T> v(n);
  std::memset(static_cast<void*>(v.data()), 0xFF, n * sizeof(T));
  return v;
}

// The bits of x as f16 (round to nearest even), and the value of f16 bits: the OmniKV filter's
// logits are stored so (DenseDecodeParams::logits).
inline std::uint16_t f16_bits(float x) {
  const vendor::f16 h = vendor::from_float<vendor::f16>(x);
  std::uint16_t u = 0;
  std::memcpy(&u, &h, sizeof u);
  return u;
}
inline double f16_value(std::uint16_t u) {
  vendor::f16 h;
  std::memcpy(&h, &u, sizeof u);
  return double(vendor::to_float(h));
}

// Multiples of 1/denom in [lo, hi] / denom: products and sums of a few thousand stay exact in f32.
inline std::vector<float> grid_values(std::size_t n, std::uint32_t seed, int lo, int hi, float denom) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = float(d(rng)) / denom;
  return v;
}

inline std::vector<float> uniform(std::size_t n, std::uint32_t seed, float lo, float hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Dense copy of the [rows, cols] part of a row-strided buffer.
template <class T>
std::vector<T> pack(const std::vector<T>& v, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  std::vector<T> o(std::size_t(rows * cols));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) o[std::size_t(r * cols + c)] = v[std::size_t(r * ld + c)];
  return o;
}

// The padding columns [cols, ld) of every row are still the poison bytes.
template <class T>
bool padding_untouched(const std::vector<T>& v, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  const auto poison = poisoned<T>(1);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = cols; c < ld; ++c)
      if (std::memcmp(&v[std::size_t(r * ld + c)], poison.data(), sizeof(T)) != 0) return false;
  return true;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <class T>
bool all_finite_host(const std::vector<T>& v) {
  for (const auto& x : v)
    if (!std::isfinite(double(x))) return false;
  return true;
}

// bf16 round trips on the host (round to nearest even).
inline std::vector<deltakv::cuda::bf16> to_bf16(const std::vector<float>& v) {
  std::vector<deltakv::cuda::bf16> o(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) o[i] = vendor::from_float<deltakv::cuda::bf16>(v[i]);
  return o;
}
inline std::vector<float> to_f32(const std::vector<deltakv::cuda::bf16>& v) {
  std::vector<float> o(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) o[i] = vendor::to_float(v[i]);
  return o;
}
inline std::vector<float> round_bf16(const std::vector<float>& v) { return to_f32(to_bf16(v)); }

}  // namespace dkt_cuda
