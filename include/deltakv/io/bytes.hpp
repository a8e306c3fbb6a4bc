#pragma once
// Reading little-endian file bytes: what the safetensors and GGUF readers share.
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace deltakv::io {

// An integer of type T from sizeof(T) little-endian bytes, whatever the host's byte order.
template <class T>
T load_le(const std::byte* p) {
  std::uint64_t v = 0;
  for (std::size_t k = 0; k < sizeof(T); ++k) v |= static_cast<std::uint64_t>(p[k]) << (8 * k);
  return static_cast<T>(v);
}

// IEEE binary16 bits -> float. Every half value is exactly representable as a float, including
// subnormals; NaN payloads are kept (shifted into the float mantissa).
inline float f16_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h >> 15) << 31;
  const std::uint32_t exp = (h >> 10) & 0x1Fu;
  const std::uint32_t mant = h & 0x3FFu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24, exact in float (needs at most 10 significant bits).
    const float mag = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -mag : mag;
  }
  if (exp == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (mant << 13));  // inf / NaN
  return std::bit_cast<float>(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

// bfloat16 is the upper half of a float, so widening is a shift (exact for every class).
inline float bf16_bits_to_float(std::uint16_t b) { return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16); }

}  // namespace deltakv::io
