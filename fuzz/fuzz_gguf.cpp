// libFuzzer target: the GGUF reader on arbitrary bytes.
//
//   * GgufFile::from_bytes;
//   * every metadata key read through the getter of its type (and through a wrong one, which must
//     be a FormatError), every array read as strings / integers / numbers as its element type
//     allows (a mismatch must be a FormatError);
//   * every tensor: tensor(name) / tensor_data(name) consistent with ne, type and the file size,
//     and dequantize(name) for tensors of at most kMaxElements elements (a type without a
//     dequantizer must be a DTypeError), agreeing with dequantize_row on the raw bytes.
// Only deltakv::Error is caught; anything else, a failed FUZZ_CHECK or a sanitizer report is a crash.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "deltakv/error.hpp"
#include "deltakv/io/gguf.hpp"
#include "fuzz_common.hpp"

namespace {

using namespace deltakv;
using namespace deltakv::io;

constexpr std::int64_t kMaxElements = std::int64_t{1} << 22;  // 16 MiB of floats per tensor

template <class F>
bool throws_format(F&& f) {
  try {
    f();
  } catch (const FormatError&) {
    return true;
  }
  return false;
}

bool is_int(GgufValueType t) {
  switch (t) {
    case GgufValueType::UINT8: case GgufValueType::INT8: case GgufValueType::UINT16: case GgufValueType::INT16:
    case GgufValueType::UINT32: case GgufValueType::INT32: case GgufValueType::UINT64: case GgufValueType::INT64:
      return true;
    default: return false;
  }
}
bool is_float(GgufValueType t) { return t == GgufValueType::FLOAT32 || t == GgufValueType::FLOAT64; }

void read_metadata(const GgufFile& f) {
  std::uint64_t seen_bytes = 0;
  for (const std::string& key : f.keys()) {
    FUZZ_CHECK(f.has(key));
    const GgufValueType t = f.type_of(key);
    switch (t) {
      case GgufValueType::STRING: {
        const std::string s = f.get_string(key);
        seen_bytes += s.size();
        FUZZ_CHECK(throws_format([&] { (void)f.get_int(key); }));
        break;
      }
      case GgufValueType::BOOL:
        (void)f.get_bool(key);
        FUZZ_CHECK(throws_format([&] { (void)f.get_string(key); }));
        break;
      case GgufValueType::ARRAY: {
        const GgufValueType et = f.array_type_of(key);
        const std::uint64_t n = f.array_size(key);
        FUZZ_CHECK(n <= f.file_size());  // every element takes at least one byte
        FUZZ_CHECK(throws_format([&] { (void)f.get_float(key); }));
        if (et == GgufValueType::STRING) {
          const auto v = f.get_string_array(key);
          FUZZ_CHECK(v.size() == n);
          for (const auto& s : v) seen_bytes += s.size();
        } else {
          FUZZ_CHECK(throws_format([&] { (void)f.get_string_array(key); }));
        }
        if (is_int(et)) {
          // A u64 element beyond int64 is a FormatError; otherwise all elements come back.
          try {
            FUZZ_CHECK(f.get_int_array(key).size() == n);
          } catch (const FormatError&) {
            FUZZ_CHECK(et == GgufValueType::UINT64);
          }
        } else {
          FUZZ_CHECK(throws_format([&] { (void)f.get_int_array(key); }));
        }
        if (is_int(et) || is_float(et)) {
          FUZZ_CHECK(f.get_float_array(key).size() == n);
        } else {
          FUZZ_CHECK(throws_format([&] { (void)f.get_float_array(key); }));
        }
        break;
      }
      default:
        if (is_int(t)) {
          try {
            (void)f.get_int(key);
          } catch (const FormatError&) {
            FUZZ_CHECK(t == GgufValueType::UINT64);
          }
          (void)f.get_float(key);
        } else {
          FUZZ_CHECK(is_float(t));
          (void)f.get_float(key);
          FUZZ_CHECK(throws_format([&] { (void)f.get_int(key); }));
        }
        FUZZ_CHECK(throws_format([&] { (void)f.get_bool(key); }) == (t != GgufValueType::BOOL));
        FUZZ_CHECK(throws_format([&] { (void)f.get_string_array(key); }));
        break;
    }
    FUZZ_CHECK(seen_bytes <= f.file_size());
  }
  if (!f.has("\x01missing")) FUZZ_CHECK(throws_format([&] { (void)f.get_string("\x01missing"); }));
}

void read_tensors(const GgufFile& f) {
  std::uint64_t total = 0;
  FUZZ_CHECK(f.data_offset() <= f.file_size() || f.tensors().empty());
  for (const GgufTensorInfo& t : f.tensors()) {
    FUZZ_CHECK(f.has_tensor(t.name));
    const GgufTensorInfo& again = f.tensor(t.name);
    FUZZ_CHECK(&again == &t);
    FUZZ_CHECK(!t.ne.empty() && t.ne.size() <= 4);
    for (auto d : t.ne) FUZZ_CHECK(d >= 1);
    const std::int64_t n = t.n_elements();
    FUZZ_CHECK(n >= 1);
    FUZZ_CHECK(ggml_row_bytes(t.type, n) == t.nbytes);
    FUZZ_CHECK(t.offset % f.alignment() == 0);
    const auto data = f.tensor_data(t.name);
    FUZZ_CHECK(data.size() == t.nbytes);
    FUZZ_CHECK(f.data_offset() + t.offset + t.nbytes <= f.file_size());
    total += t.nbytes;
    FUZZ_CHECK(total <= f.file_size());  // no overlaps
    if (n > kMaxElements) continue;
    if (!ggml_can_dequantize(t.type)) {
      bool threw = false;
      try {
        (void)f.dequantize(t.name);
      } catch (const DTypeError&) {
        threw = true;
      }
      FUZZ_CHECK(threw);
      continue;
    }
    const std::vector<float> v = f.dequantize(t.name);
    FUZZ_CHECK(static_cast<std::int64_t>(v.size()) == n);
    std::vector<float> w(v.size());
    dequantize_row(t.type, data.data(), w.data(), n);
    FUZZ_CHECK(std::memcmp(v.data(), w.data(), v.size() * sizeof(float)) == 0);
  }
  if (!f.has_tensor("\x01missing")) FUZZ_CHECK(throws_format([&] { (void)f.tensor("\x01missing"); }));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > (1u << 20)) return 0;
  std::optional<GgufFile> parsed;
  try {
    parsed.emplace(GgufFile::from_bytes(fuzz::to_bytes(data, size)));
  } catch (const Error& e) {
    FUZZ_CHECK(e.code() == ErrorCode::format || e.code() == ErrorCode::dtype);
    return 0;
  }
  const GgufFile& f = *parsed;
  FUZZ_CHECK(f.version() == 2 || f.version() == 3);
  FUZZ_CHECK(f.file_size() == size);
  FUZZ_CHECK(f.alignment() >= 1 && (f.alignment() & (f.alignment() - 1)) == 0);
  read_metadata(f);
  read_tensors(f);
  const GgufFile copy = f;  // copies share the bytes
  FUZZ_CHECK(copy.tensors().size() == f.tensors().size());
  return 0;
}
