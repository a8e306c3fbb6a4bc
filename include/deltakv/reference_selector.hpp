#pragma once
// Which positions are reference tokens (kept exact, used as bases for the others). A selector is a
// pure function of positions: next_reference(prev) gives the first reference after `prev` (or the
// first one when prev < 0). Nearest-reference search itself is a device op (metric in the config).
#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>

#include "deltakv/error.hpp"

namespace deltakv {

template <class S>
concept ReferenceSelector = requires(const S& s, std::int64_t prev, int sinks) {
  { s.next_reference(prev, sinks) } -> std::convertible_to<std::int64_t>;
};

// Every `stride`-th token after the sinks (paper: stride 10).
struct FixedStride {
  int stride = 10;
  explicit FixedStride(int s = 10) : stride(s) {
    if (s <= 0) throw ConfigError("FixedStride: stride must be >= 1");
  }
  std::int64_t next_reference(std::int64_t prev, int sinks) const {
    return prev < sinks ? sinks : prev + stride;
  }
};

// Stride grows with distance from the sinks: base + alpha * (pos - sinks), as in the reference
// code's dynamic clustering: far history gets sparser references.
struct DynamicStride {
  double base = 10.0;
  double alpha = 0.0;
  DynamicStride(double b, double a) : base(b), alpha(a) {
    if (!(b >= 1.0) || !(a >= 0.0) || !std::isfinite(b) || !std::isfinite(a))
      throw ConfigError("DynamicStride: need base >= 1 and alpha >= 0");
  }
  std::int64_t next_reference(std::int64_t prev, int sinks) const {
    if (prev < sinks) return sinks;
    const double step = std::floor(base + alpha * static_cast<double>(prev - sinks));
    return prev + std::max<std::int64_t>(1, static_cast<std::int64_t>(step));
  }
};

}  // namespace deltakv
