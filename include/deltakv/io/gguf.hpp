#pragma once
// Strict reader for GGUF (the llama.cpp model format), versions 2 and 3, little-endian:
//   "GGUF" | u32 version | u64 tensor_count | u64 kv_count
//   kv_count x  { string key | u32 value type | value }
//   tensor_count x { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset }
//   padding to `general.alignment` (default 32) | data section (tensor offsets are relative to it)
// where string = u64 length + bytes, and an array value = u32 element type | u64 count | elements
// (arrays may nest). The file is memory-mapped read-only and everything (every string and array
// bound, tensor shapes, byte sizes, alignment, bounds, overlaps) is validated when it is opened,
// so a corrupt or hostile file becomes a FormatError / DTypeError instead of an out-of-bounds
// read. Every count is checked against the bytes that remain before anything is allocated or
// iterated, so a small file cannot make the reader allocate or loop much more than its size.
//
// Dequantization is implemented for F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (block
// layouts as documented in ggml: 32 elements per block; low nibbles hold elements 0..15, high
// nibbles 16..31; Q5 keeps the fifth bits in a little-endian u32). Other known types can be
// opened and read as raw bytes; dequantizing them is a DTypeError. Multi-byte values are
// assembled as little-endian explicitly, so the code does not depend on host byte order.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "deltakv/error.hpp"
#include "deltakv/io/bytes.hpp"

#if __has_include(<unistd.h>) && __has_include(<fcntl.h>) && __has_include(<sys/mman.h>) && \
    __has_include(<sys/stat.h>)
#include <cerrno>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define DELTAKV_GGUF_MMAP 1
#else
#include <fstream>
#define DELTAKV_GGUF_MMAP 0
#endif

namespace deltakv::io {

// ggml tensor types by their on-disk value (gaps are types ggml has removed).
enum class GgmlType : std::uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23,
  I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30,
  TQ1_0 = 34, TQ2_0 = 35, MXFP4 = 39,
};

// GGUF metadata value types.
enum class GgufValueType : std::uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};

namespace detail_gguf {

struct GgmlTraits {
  const char* name;
  std::int64_t block;     // elements per block
  std::size_t type_size;  // bytes per block
};

// Block geometry of every type that can be stored in a file. Q8_1 is omitted on purpose: it is an
// intermediate type of ggml's matmul kernels whose block size changed over time, never a storage type.
inline bool ggml_traits(GgmlType t, GgmlTraits& out) {
  switch (t) {
    case GgmlType::F32: out = {"F32", 1, 4}; return true;
    case GgmlType::F16: out = {"F16", 1, 2}; return true;
    case GgmlType::Q4_0: out = {"Q4_0", 32, 18}; return true;
    case GgmlType::Q4_1: out = {"Q4_1", 32, 20}; return true;
    case GgmlType::Q5_0: out = {"Q5_0", 32, 22}; return true;
    case GgmlType::Q5_1: out = {"Q5_1", 32, 24}; return true;
    case GgmlType::Q8_0: out = {"Q8_0", 32, 34}; return true;
    case GgmlType::Q8_1: return false;
    case GgmlType::Q2_K: out = {"Q2_K", 256, 84}; return true;
    case GgmlType::Q3_K: out = {"Q3_K", 256, 110}; return true;
    case GgmlType::Q4_K: out = {"Q4_K", 256, 144}; return true;
    case GgmlType::Q5_K: out = {"Q5_K", 256, 176}; return true;
    case GgmlType::Q6_K: out = {"Q6_K", 256, 210}; return true;
    case GgmlType::Q8_K: out = {"Q8_K", 256, 292}; return true;
    case GgmlType::IQ2_XXS: out = {"IQ2_XXS", 256, 66}; return true;
    case GgmlType::IQ2_XS: out = {"IQ2_XS", 256, 74}; return true;
    case GgmlType::IQ3_XXS: out = {"IQ3_XXS", 256, 98}; return true;
    case GgmlType::IQ1_S: out = {"IQ1_S", 256, 50}; return true;
    case GgmlType::IQ4_NL: out = {"IQ4_NL", 32, 18}; return true;
    case GgmlType::IQ3_S: out = {"IQ3_S", 256, 110}; return true;
    case GgmlType::IQ2_S: out = {"IQ2_S", 256, 82}; return true;
    case GgmlType::IQ4_XS: out = {"IQ4_XS", 256, 136}; return true;
    case GgmlType::I8: out = {"I8", 1, 1}; return true;
    case GgmlType::I16: out = {"I16", 1, 2}; return true;
    case GgmlType::I32: out = {"I32", 1, 4}; return true;
    case GgmlType::I64: out = {"I64", 1, 8}; return true;
    case GgmlType::F64: out = {"F64", 1, 8}; return true;
    case GgmlType::IQ1_M: out = {"IQ1_M", 256, 56}; return true;
    case GgmlType::BF16: out = {"BF16", 1, 2}; return true;
    case GgmlType::TQ1_0: out = {"TQ1_0", 256, 54}; return true;
    case GgmlType::TQ2_0: out = {"TQ2_0", 256, 66}; return true;
    case GgmlType::MXFP4: out = {"MXFP4", 32, 17}; return true;
  }
  return false;
}

inline GgmlTraits ggml_traits_or_throw(GgmlType t) {
  GgmlTraits tr{};
  if (!ggml_traits(t, tr))
    throw DTypeError("unsupported ggml tensor type " + std::to_string(static_cast<std::uint32_t>(t)) +
                     (t == GgmlType::Q8_1 ? " (Q8_1 is not a storage type)" : ""));
  return tr;
}

inline float half_at(const std::byte* p) { return f16_bits_to_float(load_le<std::uint16_t>(p)); }

inline int nib(const std::byte* qs, int j) { return static_cast<int>(std::to_integer<unsigned>(qs[j % 16]) >> (j < 16 ? 0 : 4)) & 0xF; }

// Owner of the file bytes (a mapping or a vector), shared by copies of a GgufFile.
struct GgufBytes {
  const std::byte* data = nullptr;
  std::size_t size = 0;
  std::vector<std::byte> owned;
#if DELTAKV_GGUF_MMAP
  void* map = nullptr;
  std::size_t map_size = 0;
#endif
  GgufBytes() = default;
  GgufBytes(const GgufBytes&) = delete;
  GgufBytes& operator=(const GgufBytes&) = delete;
  ~GgufBytes() {
#if DELTAKV_GGUF_MMAP
    if (map) ::munmap(map, map_size);
#endif
  }
};

// Bounds-checked little-endian reader over the file bytes.
class GgufCursor {
 public:
  GgufCursor(const std::byte* d, std::size_t n) : d_(d), n_(n) {}
  std::size_t pos() const { return pos_; }
  std::size_t remaining() const { return n_ - pos_; }

  void need(std::size_t bytes, const char* what) const {
    if (bytes > remaining())
      throw FormatError("GGUF truncated: " + std::string(what) + " needs " + std::to_string(bytes) +
                        " bytes at offset " + std::to_string(pos_) + ", file has " + std::to_string(remaining()) +
                        " left");
  }
  template <class T>
  T get(const char* what) {
    need(sizeof(T), what);
    const T v = load_le<T>(d_ + pos_);
    pos_ += sizeof(T);
    return v;
  }
  void skip(std::size_t bytes, const char* what) {
    need(bytes, what);
    pos_ += bytes;
  }
  std::string_view string(const char* what) {
    const auto len = get<std::uint64_t>(what);
    if (len > remaining())
      throw FormatError("GGUF: " + std::string(what) + " has length " + std::to_string(len) + " at offset " +
                        std::to_string(pos_ - 8) + ", beyond the end of the file (" + std::to_string(remaining()) +
                        " bytes left)");
    std::string_view s(reinterpret_cast<const char*>(d_ + pos_), static_cast<std::size_t>(len));
    pos_ += static_cast<std::size_t>(len);
    return s;
  }

 private:
  const std::byte* d_;
  std::size_t n_;
  std::size_t pos_ = 0;
};

inline std::size_t gguf_scalar_size(GgufValueType t) {
  switch (t) {
    case GgufValueType::UINT8: case GgufValueType::INT8: case GgufValueType::BOOL: return 1;
    case GgufValueType::UINT16: case GgufValueType::INT16: return 2;
    case GgufValueType::UINT32: case GgufValueType::INT32: case GgufValueType::FLOAT32: return 4;
    case GgufValueType::UINT64: case GgufValueType::INT64: case GgufValueType::FLOAT64: return 8;
    default: return 0;  // string, array: variable
  }
}

inline bool gguf_is_int(GgufValueType t) {
  switch (t) {
    case GgufValueType::UINT8: case GgufValueType::INT8: case GgufValueType::UINT16: case GgufValueType::INT16:
    case GgufValueType::UINT32: case GgufValueType::INT32: case GgufValueType::UINT64: case GgufValueType::INT64:
      return true;
    default: return false;
  }
}
inline bool gguf_is_float(GgufValueType t) { return t == GgufValueType::FLOAT32 || t == GgufValueType::FLOAT64; }

inline const char* gguf_value_type_name(GgufValueType t) {
  switch (t) {
    case GgufValueType::UINT8: return "u8";
    case GgufValueType::INT8: return "i8";
    case GgufValueType::UINT16: return "u16";
    case GgufValueType::INT16: return "i16";
    case GgufValueType::UINT32: return "u32";
    case GgufValueType::INT32: return "i32";
    case GgufValueType::FLOAT32: return "f32";
    case GgufValueType::BOOL: return "bool";
    case GgufValueType::STRING: return "string";
    case GgufValueType::ARRAY: return "array";
    case GgufValueType::UINT64: return "u64";
    case GgufValueType::INT64: return "i64";
    case GgufValueType::FLOAT64: return "f64";
  }
  return "unknown";
}

inline bool gguf_valid_value_type(std::uint32_t t) { return t <= static_cast<std::uint32_t>(GgufValueType::FLOAT64); }

// Kinds of integer conversions a scalar can take part in. `what` names the key for messages.
inline std::int64_t gguf_int_at(const std::byte* p, GgufValueType t, const std::string& what) {
  switch (t) {
    case GgufValueType::UINT8: return load_le<std::uint8_t>(p);
    case GgufValueType::INT8: return load_le<std::int8_t>(p);
    case GgufValueType::UINT16: return load_le<std::uint16_t>(p);
    case GgufValueType::INT16: return load_le<std::int16_t>(p);
    case GgufValueType::UINT32: return load_le<std::uint32_t>(p);
    case GgufValueType::INT32: return load_le<std::int32_t>(p);
    case GgufValueType::INT64: return load_le<std::int64_t>(p);
    case GgufValueType::UINT64: {
      const auto u = load_le<std::uint64_t>(p);
      if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        throw FormatError("GGUF key '" + what + "': u64 value " + std::to_string(u) + " does not fit in int64");
      return static_cast<std::int64_t>(u);
    }
    default: break;
  }
  throw FormatError("GGUF key '" + what + "' is " + gguf_value_type_name(t) + ", not an integer");
}

inline double gguf_float_at(const std::byte* p, GgufValueType t, const std::string& what) {
  if (t == GgufValueType::FLOAT32) return std::bit_cast<float>(load_le<std::uint32_t>(p));
  if (t == GgufValueType::FLOAT64) return std::bit_cast<double>(load_le<std::uint64_t>(p));
  if (t == GgufValueType::UINT64) return static_cast<double>(load_le<std::uint64_t>(p));
  if (gguf_is_int(t)) return static_cast<double>(gguf_int_at(p, t, what));
  throw FormatError("GGUF key '" + what + "' is " + gguf_value_type_name(t) + ", not a number");
}

}  // namespace detail_gguf

inline const char* ggml_type_name(GgmlType t) {
  detail_gguf::GgmlTraits tr{};
  if (detail_gguf::ggml_traits(t, tr)) return tr.name;
  return t == GgmlType::Q8_1 ? "Q8_1" : "unknown";
}

// Elements per block of a type (1 for plain types). DTypeError for unknown types.
inline std::int64_t ggml_block_size(GgmlType t) { return detail_gguf::ggml_traits_or_throw(t).block; }

// Whether dequantize_row supports the type.
inline bool ggml_can_dequantize(GgmlType t) {
  switch (t) {
    case GgmlType::F32: case GgmlType::F16: case GgmlType::BF16: case GgmlType::Q4_0: case GgmlType::Q4_1:
    case GgmlType::Q5_0: case GgmlType::Q5_1: case GgmlType::Q8_0:
      return true;
    default: return false;
  }
}

// Bytes of n elements of type t. DTypeError for unknown types, ShapeError if n < 0 or is not a
// multiple of the block size, or the byte count overflows.
inline std::size_t ggml_row_bytes(GgmlType t, std::int64_t n) {
  const auto tr = detail_gguf::ggml_traits_or_throw(t);
  if (n < 0 || n % tr.block != 0)
    throw ShapeError(std::string("ggml_row_bytes: ") + std::to_string(n) + " elements of " + tr.name +
                     " (must be a non-negative multiple of the block size " + std::to_string(tr.block) + ")");
  const auto blocks = static_cast<std::uint64_t>(n / tr.block);
  if (blocks > std::numeric_limits<std::size_t>::max() / tr.type_size)
    throw ShapeError("ggml_row_bytes: byte count overflows");
  return static_cast<std::size_t>(blocks) * tr.type_size;
}

// dst[0..n) = the n elements stored at src (ggml_row_bytes(t, n) bytes). DTypeError for types
// without a dequantizer, ShapeError if n is not a multiple of the block size.
inline void dequantize_row(GgmlType t, const std::byte* src, float* dst, std::int64_t n) {
  if (!ggml_can_dequantize(t))
    throw DTypeError(std::string("dequantization of ggml type ") + ggml_type_name(t) + " (" +
                     std::to_string(static_cast<std::uint32_t>(t)) + ") is not supported");
  (void)ggml_row_bytes(t, n);  // validates n
  using detail_gguf::half_at;
  using detail_gguf::nib;
  switch (t) {
    case GgmlType::F32:
      for (std::int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(load_le<std::uint32_t>(src + 4 * i));
      return;
    case GgmlType::F16:
      for (std::int64_t i = 0; i < n; ++i) dst[i] = half_at(src + 2 * i);
      return;
    case GgmlType::BF16:
      for (std::int64_t i = 0; i < n; ++i)
        dst[i] = std::bit_cast<float>(static_cast<std::uint32_t>(load_le<std::uint16_t>(src + 2 * i)) << 16);
      return;
    default: break;
  }
  const std::int64_t nb = n / 32;
  for (std::int64_t b = 0; b < nb; ++b) {
    float* y = dst + 32 * b;
    switch (t) {
      case GgmlType::Q4_0: {  // f16 d | 16 B nibbles; x = d * (q - 8)
        const std::byte* p = src + 18 * b;
        const float d = half_at(p);
        for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(nib(p + 2, j) - 8);
        break;
      }
      case GgmlType::Q4_1: {  // f16 d | f16 m | 16 B nibbles; x = d * q + m
        const std::byte* p = src + 20 * b;
        const float d = half_at(p), m = half_at(p + 2);
        for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(nib(p + 4, j)) + m;
        break;
      }
      case GgmlType::Q5_0: {  // f16 d | u32 fifth bits | 16 B nibbles; x = d * (q - 16)
        const std::byte* p = src + 22 * b;
        const float d = half_at(p);
        const auto qh = load_le<std::uint32_t>(p + 2);
        for (int j = 0; j < 32; ++j)
          y[j] = d * static_cast<float>((nib(p + 6, j) | static_cast<int>(((qh >> j) & 1u) << 4)) - 16);
        break;
      }
      case GgmlType::Q5_1: {  // f16 d | f16 m | u32 fifth bits | 16 B nibbles; x = d * q + m
        const std::byte* p = src + 24 * b;
        const float d = half_at(p), m = half_at(p + 2);
        const auto qh = load_le<std::uint32_t>(p + 4);
        for (int j = 0; j < 32; ++j)
          y[j] = d * static_cast<float>(nib(p + 8, j) | static_cast<int>(((qh >> j) & 1u) << 4)) + m;
        break;
      }
      case GgmlType::Q8_0: {  // f16 d | 32 x i8; x = d * q
        const std::byte* p = src + 34 * b;
        const float d = half_at(p);
        for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(static_cast<std::int8_t>(std::to_integer<std::uint8_t>(p[2 + j])));
        break;
      }
      default: break;  // unreachable: ggml_can_dequantize
    }
  }
}

struct GgufTensorInfo {
  std::string name;
  std::vector<std::int64_t> ne;  // ggml order: ne[0] is the fastest-varying (row length)
  GgmlType type = GgmlType::F32;
  std::uint64_t offset = 0;      // from the start of the data section
  std::size_t nbytes = 0;

  std::int64_t n_elements() const {
    std::int64_t n = 1;
    for (auto d : ne) n *= d;  // validated not to overflow when the file was opened
    return n;
  }
};

class GgufFile {
 public:
  // Hard limits beyond the format's: deeper array nesting is certainly corruption (and would
  // otherwise let a file drive unbounded recursion).
  static constexpr int kMaxArrayDepth = 8;
  static constexpr int kMaxDims = 4;

  static GgufFile open(const std::string& path) {
    auto bytes = std::make_shared<detail_gguf::GgufBytes>();
#if DELTAKV_GGUF_MMAP
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw IoError("cannot open GGUF file '" + path + "': " + std::strerror(errno));
    struct ::stat st {};
    if (::fstat(fd, &st) != 0) {
      const int e = errno;
      ::close(fd);
      throw IoError("cannot stat GGUF file '" + path + "': " + std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw IoError("GGUF path '" + path + "' is not a regular file");
    }
    const auto size = static_cast<std::uint64_t>(st.st_size);
    if (size > std::numeric_limits<std::size_t>::max()) {
      ::close(fd);
      throw IoError("GGUF file '" + path + "' is too large to map");
    }
    if (size > 0) {
      void* m = ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ, MAP_PRIVATE, fd, 0);
      if (m == MAP_FAILED) {
        const int e = errno;
        ::close(fd);
        throw IoError("cannot mmap GGUF file '" + path + "': " + std::strerror(e));
      }
      bytes->map = m;
      bytes->map_size = static_cast<std::size_t>(size);
      bytes->data = static_cast<const std::byte*>(m);
      bytes->size = static_cast<std::size_t>(size);
    }
    ::close(fd);  // the mapping stays valid
#else
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) throw IoError("cannot open GGUF file '" + path + "'");
    const auto size = static_cast<std::size_t>(in.tellg());
    in.seekg(0);
    bytes->owned.resize(size);
    if (size > 0 && !in.read(reinterpret_cast<char*>(bytes->owned.data()), static_cast<std::streamsize>(size)))
      throw IoError("failed to read GGUF file '" + path + "'");
    bytes->data = bytes->owned.data();
    bytes->size = size;
#endif
    try {
      return GgufFile(std::move(bytes));
    } catch (const FormatError& e) {
      throw FormatError(std::string(e.what()) + " [file '" + path + "']");
    } catch (const DTypeError& e) {
      throw DTypeError(std::string(e.what()) + " [file '" + path + "']");
    }
  }

  static GgufFile from_bytes(std::vector<std::byte> v) {
    auto bytes = std::make_shared<detail_gguf::GgufBytes>();
    bytes->owned = std::move(v);
    bytes->data = bytes->owned.data();
    bytes->size = bytes->owned.size();
    return GgufFile(std::move(bytes));
  }

  std::uint32_t version() const { return version_; }
  std::size_t alignment() const { return alignment_; }
  std::size_t data_offset() const { return data_off_; }  // start of the data section in the file
  std::size_t file_size() const { return bytes_->size; }

  // ---- metadata ----------------------------------------------------------------------------
  bool has(const std::string& key) const { return kv_.count(key) != 0; }
  const std::vector<std::string>& keys() const { return key_order_; }  // in file order
  GgufValueType type_of(const std::string& key) const { return find(key).type; }
  // Element type of an array value (FormatError if the value is not an array).
  GgufValueType array_type_of(const std::string& key) const { return array(key).elem; }
  std::uint64_t array_size(const std::string& key) const { return array(key).count; }

  std::string get_string(const std::string& key) const {
    const Value& v = find(key);
    if (v.type != GgufValueType::STRING) throw wrong_type(key, v.type, "a string");
    return std::string(reinterpret_cast<const char*>(bytes_->data + v.off), static_cast<std::size_t>(v.count));
  }
  std::int64_t get_int(const std::string& key) const {
    const Value& v = find(key);
    if (!detail_gguf::gguf_is_int(v.type)) throw wrong_type(key, v.type, "an integer");
    return detail_gguf::gguf_int_at(bytes_->data + v.off, v.type, key);
  }
  double get_float(const std::string& key) const {
    const Value& v = find(key);
    if (!detail_gguf::gguf_is_int(v.type) && !detail_gguf::gguf_is_float(v.type)) throw wrong_type(key, v.type, "a number");
    return detail_gguf::gguf_float_at(bytes_->data + v.off, v.type, key);
  }
  bool get_bool(const std::string& key) const {
    const Value& v = find(key);
    if (v.type != GgufValueType::BOOL) throw wrong_type(key, v.type, "a bool");
    return std::to_integer<std::uint8_t>(bytes_->data[v.off]) != 0;
  }
  std::vector<std::string> get_string_array(const std::string& key) const {
    const Value& v = array(key);
    if (v.elem != GgufValueType::STRING) throw wrong_elem(key, v.elem, "strings");
    std::vector<std::string> out;
    out.reserve(static_cast<std::size_t>(v.count));  // bounded by the file size (validated)
    detail_gguf::GgufCursor c(bytes_->data + v.off, bytes_->size - v.off);
    for (std::uint64_t i = 0; i < v.count; ++i) out.emplace_back(c.string("array string"));
    return out;
  }
  std::vector<std::int64_t> get_int_array(const std::string& key) const {
    const Value& v = array(key);
    if (!detail_gguf::gguf_is_int(v.elem)) throw wrong_elem(key, v.elem, "integers");
    const std::size_t es = detail_gguf::gguf_scalar_size(v.elem);
    std::vector<std::int64_t> out(static_cast<std::size_t>(v.count));
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = detail_gguf::gguf_int_at(bytes_->data + v.off + i * es, v.elem, key);
    return out;
  }
  std::vector<double> get_float_array(const std::string& key) const {
    const Value& v = array(key);
    if (!detail_gguf::gguf_is_int(v.elem) && !detail_gguf::gguf_is_float(v.elem)) throw wrong_elem(key, v.elem, "numbers");
    const std::size_t es = detail_gguf::gguf_scalar_size(v.elem);
    std::vector<double> out(static_cast<std::size_t>(v.count));
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = detail_gguf::gguf_float_at(bytes_->data + v.off + i * es, v.elem, key);
    return out;
  }

  // ---- tensors -----------------------------------------------------------------------------
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  bool has_tensor(const std::string& name) const { return by_name_.count(name) != 0; }
  const GgufTensorInfo& tensor(const std::string& name) const {
    auto it = by_name_.find(name);
    if (it == by_name_.end()) throw FormatError("GGUF has no tensor named '" + name + "'");
    return tensors_[it->second];
  }
  std::span<const std::byte> tensor_data(const std::string& name) const {
    const GgufTensorInfo& t = tensor(name);
    return {bytes_->data + data_off_ + t.offset, t.nbytes};
  }
  // All elements as float, ne[0] fastest. DTypeError if the type has no dequantizer.
  std::vector<float> dequantize(const std::string& name) const {
    const GgufTensorInfo& t = tensor(name);
    if (!ggml_can_dequantize(t.type))
      throw DTypeError("GGUF tensor '" + name + "' has type " + ggml_type_name(t.type) +
                       ", which this reader cannot dequantize");
    std::vector<float> out(static_cast<std::size_t>(t.n_elements()));
    dequantize_row(t.type, bytes_->data + data_off_ + t.offset, out.data(), t.n_elements());
    return out;
  }

 private:
  struct Value {
    GgufValueType type = GgufValueType::UINT8;
    GgufValueType elem = GgufValueType::UINT8;  // arrays
    std::size_t off = 0;                        // scalar: its bytes; string: its chars; array: first element
    std::uint64_t count = 0;                    // string: length; array: elements
  };

  explicit GgufFile(std::shared_ptr<detail_gguf::GgufBytes> b) : bytes_(std::move(b)) { parse(); }

  const Value& find(const std::string& key) const {
    auto it = kv_.find(key);
    if (it == kv_.end()) throw FormatError("GGUF metadata has no key '" + key + "'");
    return it->second;
  }
  const Value& array(const std::string& key) const {
    const Value& v = find(key);
    if (v.type != GgufValueType::ARRAY) throw wrong_type(key, v.type, "an array");
    return v;
  }
  static FormatError wrong_type(const std::string& key, GgufValueType t, const char* want) {
    return FormatError("GGUF key '" + key + "' is " + detail_gguf::gguf_value_type_name(t) + ", not " + want);
  }
  static FormatError wrong_elem(const std::string& key, GgufValueType t, const char* want) {
    return FormatError("GGUF key '" + key + "' is an array of " + detail_gguf::gguf_value_type_name(t) +
                       (t == GgufValueType::ARRAY ? " (nested)" : "") + ", not of " + want);
  }

  // Skips one value of type t, checking every bound; depth counts array nesting.
  static void skip_value(detail_gguf::GgufCursor& c, GgufValueType t, int depth) {
    if (const std::size_t s = detail_gguf::gguf_scalar_size(t)) {
      c.skip(s, "metadata value");
      return;
    }
    if (t == GgufValueType::STRING) {
      (void)c.string("metadata string");
      return;
    }
    // array
    if (depth >= kMaxArrayDepth) throw FormatError("GGUF: metadata arrays nested deeper than " + std::to_string(kMaxArrayDepth));
    const auto et = c.get<std::uint32_t>("array element type");
    if (!detail_gguf::gguf_valid_value_type(et))
      throw FormatError("GGUF: invalid array element type " + std::to_string(et) + " at offset " + std::to_string(c.pos() - 4));
    const auto n = c.get<std::uint64_t>("array length");
    skip_array_elems(c, static_cast<GgufValueType>(et), n, depth);
  }

  static void skip_array_elems(detail_gguf::GgufCursor& c, GgufValueType et, std::uint64_t n, int depth) {
    // Smallest encoding of one element: guards the count before iterating.
    const std::size_t es = detail_gguf::gguf_scalar_size(et);
    const std::size_t min_elem = es ? es : (et == GgufValueType::STRING ? 8 : 12);
    if (n > c.remaining() / min_elem)
      throw FormatError("GGUF: array of " + std::to_string(n) + " " + detail_gguf::gguf_value_type_name(et) +
                        " elements at offset " + std::to_string(c.pos()) + " cannot fit in the " +
                        std::to_string(c.remaining()) + " bytes left");
    if (es) {
      c.skip(static_cast<std::size_t>(n) * es, "array data");
      return;
    }
    for (std::uint64_t i = 0; i < n; ++i) skip_value(c, et, depth + 1);
  }

  void parse() {
    const std::byte* d = bytes_->data;
    const std::size_t n = bytes_->size;
    detail_gguf::GgufCursor c(d, n);
    c.need(4, "magic");
    if (std::memcmp(d, "GGUF", 4) != 0) throw FormatError("not a GGUF file (bad magic)");
    c.skip(4, "magic");
    version_ = c.get<std::uint32_t>("version");
    if (version_ == 1) throw FormatError("GGUF version 1 is not supported (only 2 and 3)");
    if (version_ != 2 && version_ != 3) {
      const std::uint32_t sw = (version_ >> 24) | ((version_ >> 8) & 0xFF00u) | ((version_ << 8) & 0xFF0000u) | (version_ << 24);
      const bool swapped = sw == 2 || sw == 3;
      throw FormatError("unsupported GGUF version " + std::to_string(version_) +
                        (swapped ? " (a big-endian GGUF file; only little-endian is supported)" : ""));
    }
    const auto n_tensors = c.get<std::uint64_t>("tensor count");
    const auto n_kv = c.get<std::uint64_t>("metadata count");
    // Minimal encodings: kv = key length (8) + type (4) + 1-byte value; tensor info = name
    // length (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
    if (n_kv > c.remaining() / 13)
      throw FormatError("GGUF metadata count " + std::to_string(n_kv) + " cannot fit in a " + std::to_string(n) + "-byte file");
    if (n_tensors > c.remaining() / 32)
      throw FormatError("GGUF tensor count " + std::to_string(n_tensors) + " cannot fit in a " + std::to_string(n) +
                        "-byte file");

    key_order_.reserve(static_cast<std::size_t>(n_kv));
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      std::string key(c.string("metadata key"));
      const auto t = c.get<std::uint32_t>("metadata value type");
      if (!detail_gguf::gguf_valid_value_type(t))
        throw FormatError("GGUF key '" + key + "' has invalid value type " + std::to_string(t));
      Value v;
      v.type = static_cast<GgufValueType>(t);
      if (v.type == GgufValueType::STRING) {
        const auto len = c.get<std::uint64_t>("metadata string length");
        if (len > c.remaining())
          throw FormatError("GGUF key '" + key + "': string length " + std::to_string(len) + " beyond the end of the file");
        v.off = c.pos();
        v.count = len;
        c.skip(static_cast<std::size_t>(len), "metadata string");
      } else if (v.type == GgufValueType::ARRAY) {
        const auto et = c.get<std::uint32_t>("array element type");
        if (!detail_gguf::gguf_valid_value_type(et))
          throw FormatError("GGUF key '" + key + "': invalid array element type " + std::to_string(et));
        v.elem = static_cast<GgufValueType>(et);
        v.count = c.get<std::uint64_t>("array length");
        v.off = c.pos();
        try {
          skip_array_elems(c, v.elem, v.count, 1);
        } catch (const FormatError& e) {
          throw FormatError(std::string(e.what()) + " (in key '" + key + "')");
        }
      } else {
        v.off = c.pos();
        c.skip(detail_gguf::gguf_scalar_size(v.type), "metadata value");
      }
      if (!kv_.emplace(key, v).second) throw FormatError("GGUF: duplicate metadata key '" + key + "'");
      key_order_.push_back(std::move(key));
    }

    alignment_ = 32;
    if (has("general.alignment")) {
      const Value& a = find("general.alignment");
      if (!detail_gguf::gguf_is_int(a.type)) throw FormatError("GGUF general.alignment must be an integer");
      const std::int64_t al = get_int("general.alignment");
      if (al <= 0 || (al & (al - 1)) != 0 || al > (std::int64_t{1} << 30))
        throw FormatError("GGUF general.alignment " + std::to_string(al) + " is not a power of two in [1, 2^30]");
      alignment_ = static_cast<std::size_t>(al);
    }

    tensors_.reserve(static_cast<std::size_t>(n_tensors));
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      GgufTensorInfo t;
      t.name = std::string(c.string("tensor name"));
      const auto nd = c.get<std::uint32_t>("tensor n_dims");
      if (nd < 1 || nd > static_cast<std::uint32_t>(kMaxDims))
        throw FormatError("GGUF tensor '" + t.name + "' has " + std::to_string(nd) + " dimensions (1.." +
                          std::to_string(kMaxDims) + " supported)");
      std::uint64_t elems = 1;
      for (std::uint32_t k = 0; k < nd; ++k) {
        const auto e = c.get<std::uint64_t>("tensor dimension");
        if (e == 0 || e > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
          throw FormatError("GGUF tensor '" + t.name + "' has dimension " + std::to_string(k) + " = " + std::to_string(e) +
                            " (must be in [1, 2^63))");
        if (elems > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / e)
          throw FormatError("GGUF tensor '" + t.name + "': element count overflows");
        elems *= e;
        t.ne.push_back(static_cast<std::int64_t>(e));
      }
      const auto ty = c.get<std::uint32_t>("tensor type");
      t.type = static_cast<GgmlType>(ty);
      detail_gguf::GgmlTraits tr{};
      if (!detail_gguf::ggml_traits(t.type, tr))
        throw DTypeError("GGUF tensor '" + t.name + "' has unsupported ggml type " + std::to_string(ty));
      if (t.ne[0] % tr.block != 0)
        throw FormatError("GGUF tensor '" + t.name + "' of type " + tr.name + " has row length " + std::to_string(t.ne[0]) +
                          ", not a multiple of its block size " + std::to_string(tr.block));
      const std::uint64_t blocks = elems / static_cast<std::uint64_t>(tr.block);
      if (blocks > std::numeric_limits<std::uint64_t>::max() / tr.type_size ||
          blocks * tr.type_size > std::numeric_limits<std::size_t>::max())
        throw FormatError("GGUF tensor '" + t.name + "': byte size overflows");
      t.nbytes = static_cast<std::size_t>(blocks * tr.type_size);
      t.offset = c.get<std::uint64_t>("tensor offset");
      if (t.offset % alignment_ != 0)
        throw FormatError("GGUF tensor '" + t.name + "' offset " + std::to_string(t.offset) + " is not aligned to " +
                          std::to_string(alignment_));
      if (!by_name_.emplace(t.name, tensors_.size()).second)
        throw FormatError("GGUF: duplicate tensor name '" + t.name + "'");
      tensors_.push_back(std::move(t));
    }

    // Data section: aligned start, every tensor inside it, no two tensors sharing bytes.
    const std::size_t p = c.pos();
    const std::size_t rem = p % alignment_;
    const std::uint64_t start = static_cast<std::uint64_t>(p) + (rem ? alignment_ - rem : 0);
    if (tensors_.empty()) {
      data_off_ = static_cast<std::size_t>(std::min<std::uint64_t>(start, n));
      return;
    }
    if (start > n) throw FormatError("GGUF truncated: the data section would start at " + std::to_string(start) + ", beyond the end");
    data_off_ = static_cast<std::size_t>(start);
    const std::uint64_t data_size = n - data_off_;
    for (const auto& t : tensors_)
      if (t.offset > data_size || t.nbytes > data_size - t.offset)
        throw FormatError("GGUF tensor '" + t.name + "' (" + std::to_string(t.nbytes) + " bytes at data offset " +
                          std::to_string(t.offset) + ") extends beyond the end of the file (data section " +
                          std::to_string(data_size) + " bytes)");
    std::vector<std::size_t> order(tensors_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return tensors_[a].offset < tensors_[b].offset; });
    for (std::size_t i = 1; i < order.size(); ++i) {
      const auto& a = tensors_[order[i - 1]];
      const auto& b = tensors_[order[i]];
      if (b.offset < a.offset + a.nbytes)
        throw FormatError("GGUF tensors '" + a.name + "' and '" + b.name + "' overlap in the data section");
    }
  }

  std::shared_ptr<detail_gguf::GgufBytes> bytes_;
  std::uint32_t version_ = 0;
  std::size_t alignment_ = 32;
  std::size_t data_off_ = 0;
  std::unordered_map<std::string, Value> kv_;
  std::vector<std::string> key_order_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, std::size_t> by_name_;
};

}  // namespace deltakv::io
