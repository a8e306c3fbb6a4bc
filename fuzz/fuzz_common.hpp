#pragma once
// Shared helpers of the libFuzzer targets in fuzz/. A violated invariant aborts (libFuzzer
// reports it as a crash, with the input that caused it); an escaping exception terminates,
// which libFuzzer reports the same way. Only deltakv::Error is ever caught by the targets.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define FUZZ_CHECK(cond)                                                                      \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      std::fprintf(stderr, "FUZZ_CHECK failed at %s:%d: %s\n", __FILE__, __LINE__, #cond);   \
      std::abort();                                                                           \
    }                                                                                         \
  } while (0)

#define FUZZ_CHECK_MSG(cond, ...)                                                             \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      std::fprintf(stderr, "FUZZ_CHECK failed at %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
      std::fprintf(stderr, __VA_ARGS__);                                                      \
      std::fputc('\n', stderr);                                                               \
      std::abort();                                                                           \
    }                                                                                         \
  } while (0)

namespace fuzz {

inline std::vector<std::byte> to_bytes(const std::uint8_t* data, std::size_t size) {
  std::vector<std::byte> v(size);
  if (size) std::memcpy(v.data(), data, size);
  return v;
}

}  // namespace fuzz
