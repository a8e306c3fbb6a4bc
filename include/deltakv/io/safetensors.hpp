#pragma once
// Strict reader and atomic writer for the safetensors format:
//   [u64 little-endian header length N][N bytes of JSON header][data buffer]
// The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets are
// relative to the data buffer) plus an optional "__metadata__" object of string -> string.
// The reader validates everything before handing out a byte, so a corrupt or hostile checkpoint
// becomes a FormatError/DTypeError instead of an out-of-bounds read. All multi-byte values are
// assembled as little-endian explicitly, so the code does not depend on host byte order.
#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "deltakv/error.hpp"
#include "deltakv/io/bytes.hpp"

#if __has_include(<unistd.h>) && __has_include(<fcntl.h>)
#include <fcntl.h>
#include <unistd.h>
#define DELTAKV_SAFETENSORS_POSIX 1
#else
#define DELTAKV_SAFETENSORS_POSIX 0
#endif

namespace deltakv::io {

enum class StDType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

inline std::size_t dtype_size(StDType t) {
  switch (t) {
    case StDType::F64: case StDType::I64: return 8;
    case StDType::F32: case StDType::I32: return 4;
    case StDType::F16: case StDType::BF16: case StDType::I16: return 2;
    case StDType::I8: case StDType::U8: case StDType::BOOL: return 1;
  }
  throw DTypeError("invalid StDType value " + std::to_string(static_cast<int>(t)));
}

inline const char* dtype_name(StDType t) {
  switch (t) {
    case StDType::F64: return "F64";
    case StDType::F32: return "F32";
    case StDType::F16: return "F16";
    case StDType::BF16: return "BF16";
    case StDType::I64: return "I64";
    case StDType::I32: return "I32";
    case StDType::I16: return "I16";
    case StDType::I8: return "I8";
    case StDType::U8: return "U8";
    case StDType::BOOL: return "BOOL";
  }
  throw DTypeError("invalid StDType value " + std::to_string(static_cast<int>(t)));
}

// Exact, case-sensitive names as the format spells them; anything else (including valid
// safetensors dtypes this library does not support, e.g. F8_E4M3 or U32) is a DTypeError.
inline StDType dtype_from_name(std::string_view s) {
  static constexpr StDType all[] = {StDType::F64, StDType::F32, StDType::F16, StDType::BF16,
                                    StDType::I64, StDType::I32, StDType::I16, StDType::I8,
                                    StDType::U8,  StDType::BOOL};
  for (StDType t : all)
    if (s == dtype_name(t)) return t;
  throw DTypeError("unsupported safetensors dtype '" + std::string(s) + "'");
}

// Little-endian bytes of a float array, the layout safetensors stores for F32.
inline std::vector<std::byte> f32_bytes(std::span<const float> values) {
  std::vector<std::byte> out(values.size() * 4);
  for (std::size_t i = 0; i < values.size(); ++i) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(values[i]);
    for (std::size_t k = 0; k < 4; ++k) out[i * 4 + k] = static_cast<std::byte>((u >> (8 * k)) & 0xFFu);
  }
  return out;
}

struct TensorInfo {
  std::string name;
  StDType dtype;
  std::vector<std::int64_t> shape;
  std::size_t offset;  // relative to the start of the data buffer
  std::size_t nbytes;
};

struct TensorToWrite {
  std::string name;
  StDType dtype;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> data;  // little-endian element bytes, exactly product(shape)*size
};

namespace detail {

// Same cap as the reference implementation: a larger header is almost surely corruption and
// would otherwise let a 1 KB file make us allocate gigabytes.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

// product(shape) * elem_size, or false on overflow. A zero dimension makes the result 0 even if
// the other dimensions would overflow, so check for it first.
inline bool checked_nbytes(const std::vector<std::int64_t>& shape, std::size_t elem_size,
                           std::uint64_t& out) {
  for (std::int64_t d : shape)
    if (d == 0) { out = 0; return true; }
  std::uint64_t n = elem_size;
  for (std::int64_t d : shape) {
    const auto ud = static_cast<std::uint64_t>(d);
    if (n > std::numeric_limits<std::uint64_t>::max() / ud) return false;
    n *= ud;
  }
  out = n;
  return true;
}

inline std::string shape_str(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// The header layout both serialize_safetensors and write_safetensors use: the padded header
// bytes, and the order in which tensor data follows it.
struct WritePlan {
  std::string header;             // JSON, space-padded so that 8 + size is a multiple of 8
  std::vector<std::size_t> order; // indices into the input, in data-buffer order
  std::uint64_t data_bytes = 0;
};

inline WritePlan plan_write(const std::vector<TensorToWrite>& tensors,
                            const std::map<std::string, std::string>& metadata) {
  std::set<std::string_view> seen;
  for (const TensorToWrite& t : tensors) {
    if (t.name == "__metadata__")
      throw FormatError("safetensors writer: '__metadata__' is reserved and cannot name a tensor");
    if (!seen.insert(t.name).second)
      throw FormatError("safetensors writer: duplicate tensor name '" + t.name + "'");
    for (std::int64_t d : t.shape)
      if (d < 0)
        throw ShapeError("safetensors writer: tensor '" + t.name + "' has negative dimension in shape " +
                         shape_str(t.shape));
    std::uint64_t expect = 0;
    if (!checked_nbytes(t.shape, dtype_size(t.dtype), expect))
      throw ShapeError("safetensors writer: tensor '" + t.name + "' shape " + shape_str(t.shape) +
                       " overflows the byte count");
    if (expect != t.data.size())
      throw ShapeError("safetensors writer: tensor '" + t.name + "' of dtype " + dtype_name(t.dtype) +
                       " and shape " + shape_str(t.shape) + " needs " + std::to_string(expect) +
                       " bytes but " + std::to_string(t.data.size()) + " were given");
  }

  // Largest elements first (then by name, for deterministic output): with the 8-aligned data
  // start this keeps every tensor aligned to its element size, as the reference writer does.
  WritePlan plan;
  plan.order.resize(tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) plan.order[i] = i;
  std::sort(plan.order.begin(), plan.order.end(), [&](std::size_t a, std::size_t b) {
    const std::size_t sa = dtype_size(tensors[a].dtype), sb = dtype_size(tensors[b].dtype);
    if (sa != sb) return sa > sb;
    return tensors[a].name < tensors[b].name;
  });

  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) {
    nlohmann::json meta = nlohmann::json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  std::uint64_t offset = 0;
  for (std::size_t i : plan.order) {
    const TensorToWrite& t = tensors[i];
    const std::uint64_t end = offset + t.data.size();
    header[t.name] = {{"dtype", dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, end}}};
    offset = end;
  }
  plan.data_bytes = offset;

  try {
    // strict: invalid UTF-8 in a name or metadata string would make a file readers reject.
    plan.header = header.dump(-1, ' ', false, nlohmann::json::error_handler_t::strict);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(std::string("safetensors writer: cannot encode header (names and metadata must be "
                                  "valid UTF-8): ") + e.what());
  }
  plan.header.append((8 - plan.header.size() % 8) % 8, ' ');
  return plan;
}

inline void put_u64_le(std::byte* p, std::uint64_t v) {
  for (int k = 0; k < 8; ++k) p[k] = static_cast<std::byte>((v >> (8 * k)) & 0xFFu);
}

}  // namespace detail

class SafetensorsFile {
 public:
  // Reads the whole file into memory, then validates it (see from_bytes).
  static SafetensorsFile open(const std::string& path) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec))
      throw IoError("cannot open safetensors file '" + path + "': " +
                    (ec ? ec.message() : std::string("not a regular file or does not exist")));
    const std::uintmax_t size = std::filesystem::file_size(path, ec);
    if (ec) throw IoError("cannot stat safetensors file '" + path + "': " + ec.message());
    std::ifstream in(path, std::ios::binary);
    if (!in) throw IoError("cannot open safetensors file '" + path + "'");
    std::vector<std::byte> bytes(static_cast<std::size_t>(size));
    in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (static_cast<std::uintmax_t>(in.gcount()) != size || in.bad())
      throw IoError("failed to read safetensors file '" + path + "' (" + std::to_string(in.gcount()) +
                    " of " + std::to_string(size) + " bytes read)");
    return SafetensorsFile(std::move(bytes), path);
  }

  static SafetensorsFile from_bytes(std::vector<std::byte> bytes) {
    return SafetensorsFile(std::move(bytes), "<memory>");
  }

  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& kv : tensors_) out.push_back(kv.first);  // std::map: already sorted
    return out;
  }

  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  const TensorInfo& info(const std::string& name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end())
      throw FormatError("tensor '" + name + "' not found in safetensors file '" + source_ + "'");
    return it->second;
  }

  // Little-endian element bytes of one tensor; valid while this object is alive.
  std::span<const std::byte> raw(const std::string& name) const {
    const TensorInfo& t = info(name);
    return std::span<const std::byte>(bytes_.data() + data_start_ + t.offset, t.nbytes);
  }

  // Floating tensors widened (exactly) to T. F64 read as float is rounded to nearest, the only
  // lossy case. Integer and bool tensors are refused rather than silently reinterpreted.
  template <class T>
  std::vector<T> read_as(const std::string& name) const {
    static_assert(std::same_as<T, float> || std::same_as<T, double>,
                  "SafetensorsFile::read_as supports float and double only");
    const TensorInfo& t = info(name);
    const std::byte* p = bytes_.data() + data_start_ + t.offset;
    const std::size_t n = t.nbytes / dtype_size(t.dtype);
    std::vector<T> out(n);
    switch (t.dtype) {
      case StDType::F64:
        for (std::size_t i = 0; i < n; ++i)
          out[i] = static_cast<T>(std::bit_cast<double>(load_le<std::uint64_t>(p + 8 * i)));
        break;
      case StDType::F32:
        for (std::size_t i = 0; i < n; ++i)
          out[i] = static_cast<T>(std::bit_cast<float>(load_le<std::uint32_t>(p + 4 * i)));
        break;
      case StDType::F16:
        for (std::size_t i = 0; i < n; ++i)
          out[i] = static_cast<T>(f16_bits_to_float(load_le<std::uint16_t>(p + 2 * i)));
        break;
      case StDType::BF16:
        for (std::size_t i = 0; i < n; ++i)
          out[i] = static_cast<T>(bf16_bits_to_float(load_le<std::uint16_t>(p + 2 * i)));
        break;
      default:
        throw DTypeError("tensor '" + name + "' in safetensors file '" + source_ + "' has dtype " +
                         dtype_name(t.dtype) + ", not a floating type; cannot read it as " +
                         (std::same_as<T, float> ? "float" : "double"));
    }
    return out;
  }

 private:
  SafetensorsFile(std::vector<std::byte> bytes, std::string source)
      : bytes_(std::move(bytes)), source_(std::move(source)) {
    parse();
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw FormatError("safetensors file '" + source_ + "': " + what);
  }

  void parse() {
    if (bytes_.size() < 8)
      fail("file is " + std::to_string(bytes_.size()) + " bytes, shorter than the 8-byte header length");
    const std::uint64_t n = load_le<std::uint64_t>(bytes_.data());
    if (n > detail::kMaxHeaderBytes)
      fail("header length " + std::to_string(n) + " exceeds the 100000000-byte limit");
    if (n > bytes_.size() - 8)
      fail("header length " + std::to_string(n) + " is larger than the " +
           std::to_string(bytes_.size() - 8) + " bytes that follow it");
    data_start_ = 8 + static_cast<std::size_t>(n);
    const std::size_t buffer_size = bytes_.size() - data_start_;

    const char* first = reinterpret_cast<const char*>(bytes_.data() + 8);
    const char* last = first + n;
    nlohmann::json header;
    // nlohmann keeps the last of duplicate keys silently; a strict reader must not guess which
    // definition was meant, so record duplicates per object while parsing.
    std::vector<std::set<std::string>> open_objects;
    std::string duplicate;
    auto cb = [&](int, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
      using E = nlohmann::json::parse_event_t;
      if (ev == E::object_start) {
        open_objects.emplace_back();
      } else if (ev == E::object_end) {
        if (!open_objects.empty()) open_objects.pop_back();
      } else if (ev == E::key && !open_objects.empty() && parsed.is_string()) {
        const auto& key = parsed.get_ref<const std::string&>();
        if (!open_objects.back().insert(key).second && duplicate.empty()) duplicate = key;
      }
      return true;
    };
    try {
      header = nlohmann::json::parse(first, last, cb);
    } catch (const nlohmann::json::exception& e) {
      fail(std::string("header is not valid JSON: ") + e.what());
    }
    if (!duplicate.empty()) fail("header has duplicate key '" + duplicate + "'");
    if (!header.is_object()) fail(std::string("header is JSON ") + header.type_name() + ", not an object");

    struct Span { std::uint64_t begin, end; const std::string* name; };
    std::vector<Span> spans;
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& key = it.key();
      const nlohmann::json& v = it.value();
      if (key == "__metadata__") {
        parse_metadata(v);
        continue;
      }
      TensorInfo t = parse_entry(key, v, buffer_size);
      auto [pos, inserted] = tensors_.emplace(key, std::move(t));
      (void)inserted;  // keys of a parsed object are unique
      spans.push_back({pos->second.offset, pos->second.offset + pos->second.nbytes, &pos->first});
    }

    // Empty tensors occupy no bytes and cannot overlap anything; among the rest, sorted by begin,
    // each must start at or after the furthest end seen so far.
    std::sort(spans.begin(), spans.end(),
              [](const Span& a, const Span& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
    const Span* prev = nullptr;
    for (const Span& s : spans) {
      if (s.begin == s.end) continue;
      if (prev && s.begin < prev->end)
        fail("tensors '" + *prev->name + "' [" + std::to_string(prev->begin) + ", " +
             std::to_string(prev->end) + ") and '" + *s.name + "' [" + std::to_string(s.begin) + ", " +
             std::to_string(s.end) + ") overlap");
      if (!prev || s.end > prev->end) prev = &s;
    }
  }

  void parse_metadata(const nlohmann::json& v) {
    if (!v.is_object()) fail(std::string("'__metadata__' is JSON ") + v.type_name() + ", not an object");
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (!it.value().is_string())
        fail("metadata value for key '" + it.key() + "' is JSON " + it.value().type_name() +
             ", not a string");
      metadata_.emplace(it.key(), it.value().get<std::string>());
    }
  }

  TensorInfo parse_entry(const std::string& name, const nlohmann::json& v, std::size_t buffer_size) const {
    const std::string where = "tensor '" + name + "': ";
    if (!v.is_object()) fail(where + "entry is JSON " + v.type_name() + ", not an object");
    for (auto it = v.begin(); it != v.end(); ++it)
      if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets")
        fail(where + "unknown field '" + it.key() + "'");
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!v.contains(field)) fail(where + "missing field '" + field + "'");

    const nlohmann::json& jd = v["dtype"];
    if (!jd.is_string()) fail(where + "'dtype' is JSON " + jd.type_name() + ", not a string");
    TensorInfo t;
    t.name = name;
    try {
      t.dtype = dtype_from_name(jd.get_ref<const std::string&>());
    } catch (const DTypeError&) {
      throw DTypeError("safetensors file '" + source_ + "': " + where + "unsupported dtype '" +
                       jd.get<std::string>() + "'");
    }

    const nlohmann::json& js = v["shape"];
    if (!js.is_array()) fail(where + "'shape' is JSON " + js.type_name() + ", not an array");
    for (const nlohmann::json& d : js) {
      if (d.is_number_unsigned()) {
        if (d.get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
          fail(where + "dimension " + d.dump() + " does not fit in int64");
        t.shape.push_back(d.get<std::int64_t>());
      } else if (d.is_number_integer()) {  // signed and not unsigned: negative
        fail(where + "negative dimension " + d.dump() + " in shape");
      } else {
        fail(where + "shape entry " + d.dump() + " is not an integer");
      }
    }

    const nlohmann::json& jo = v["data_offsets"];
    if (!jo.is_array() || jo.size() != 2)
      fail(where + "'data_offsets' must be an array of two integers, got " + jo.dump());
    for (const nlohmann::json& o : jo)
      if (!o.is_number_unsigned())
        fail(where + "'data_offsets' entry " + o.dump() + " is not a non-negative integer");
    const auto begin = jo[0].get<std::uint64_t>();
    const auto end = jo[1].get<std::uint64_t>();
    if (begin > end)
      fail(where + "data_offsets begin " + std::to_string(begin) + " is after end " + std::to_string(end));
    if (end > buffer_size)
      fail(where + "data_offsets end " + std::to_string(end) + " is beyond the " +
           std::to_string(buffer_size) + "-byte data buffer");

    std::uint64_t expect = 0;
    if (!detail::checked_nbytes(t.shape, dtype_size(t.dtype), expect))
      fail(where + "byte size of shape " + detail::shape_str(t.shape) + " overflows 64 bits");
    if (expect != end - begin)
      fail(where + "dtype " + dtype_name(t.dtype) + " with shape " + detail::shape_str(t.shape) +
           " needs " + std::to_string(expect) + " bytes but data_offsets span " +
           std::to_string(end - begin));
    // Both fit in size_t: end <= buffer_size, which is a size_t.
    t.offset = static_cast<std::size_t>(begin);
    t.nbytes = static_cast<std::size_t>(end - begin);
    return t;
  }

  std::vector<std::byte> bytes_;
  std::string source_;  // path, or "<memory>", for error messages
  std::size_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

inline std::vector<std::byte> serialize_safetensors(const std::vector<TensorToWrite>& tensors,
                                                    const std::map<std::string, std::string>& metadata = {}) {
  const detail::WritePlan plan = detail::plan_write(tensors, metadata);
  std::vector<std::byte> out(8 + plan.header.size() + static_cast<std::size_t>(plan.data_bytes));
  detail::put_u64_le(out.data(), plan.header.size());
  std::byte* p = out.data() + 8;
  for (char c : plan.header) *p++ = static_cast<std::byte>(c);
  for (std::size_t i : plan.order) {
    const auto& d = tensors[i].data;
    if (!d.empty()) std::copy(d.begin(), d.end(), p);
    p += d.size();
  }
  return out;
}

namespace detail {

// Writes to a uniquely named sibling temp file, flushes it to disk, then renames it over `path`:
// readers (and a crash at any point) see either the old file or the complete new one.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::string path) : path_(std::move(path)) {
    std::random_device rd;
    for (int attempt = 0; attempt < 16; ++attempt) {
      char suffix[32];
      std::snprintf(suffix, sizeof suffix, ".tmp%08x%08x", rd(), rd());
      tmp_ = path_ + suffix;
#if DELTAKV_SAFETENSORS_POSIX
      fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
      if (fd_ >= 0) return;
      if (errno != EEXIST) break;
#else
      if (std::filesystem::exists(tmp_)) continue;
      out_.open(tmp_, std::ios::binary | std::ios::trunc);
      if (out_) return;
      break;
#endif
    }
    throw IoError("cannot create temporary file '" + tmp_ + "' to write '" + path_ + "': " + last_error());
  }
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  ~AtomicFileWriter() {
    if (committed_) return;
#if DELTAKV_SAFETENSORS_POSIX
    if (fd_ >= 0) ::close(fd_);
#else
    out_.close();
#endif
    std::error_code ec;
    std::filesystem::remove(tmp_, ec);  // best effort; never throw from a destructor
  }

  void write(const std::byte* data, std::size_t n) {
#if DELTAKV_SAFETENSORS_POSIX
    while (n > 0) {
      const ::ssize_t w = ::write(fd_, data, std::min<std::size_t>(n, std::size_t{1} << 30));
      if (w < 0) {
        if (errno == EINTR) continue;
        throw IoError("failed writing '" + tmp_ + "': " + last_error());
      }
      data += w;
      n -= static_cast<std::size_t>(w);
    }
#else
    out_.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(n));
    if (!out_) throw IoError("failed writing '" + tmp_ + "'");
#endif
  }

  void commit() {
#if DELTAKV_SAFETENSORS_POSIX
    if (::fsync(fd_) != 0) throw IoError("failed to flush '" + tmp_ + "': " + last_error());
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) throw IoError("failed to close '" + tmp_ + "': " + last_error());
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0)
      throw IoError("failed to rename '" + tmp_ + "' to '" + path_ + "': " + last_error());
    committed_ = true;
    // Persist the rename itself; failure here leaves a complete file, so it is not fatal.
    std::string dir = std::filesystem::path(path_).parent_path().string();
    if (dir.empty()) dir = ".";
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)::fsync(dfd);
      ::close(dfd);
    }
#else
    out_.flush();
    out_.close();
    if (!out_) throw IoError("failed to flush '" + tmp_ + "'");
    std::error_code ec;
    std::filesystem::rename(tmp_, path_, ec);
    if (ec) throw IoError("failed to rename '" + tmp_ + "' to '" + path_ + "': " + ec.message());
    committed_ = true;
#endif
  }

 private:
  static std::string last_error() { return std::generic_category().message(errno); }

  std::string path_, tmp_;
  bool committed_ = false;
#if DELTAKV_SAFETENSORS_POSIX
  int fd_ = -1;
#else
  std::ofstream out_;
#endif
};

}  // namespace detail

// Streams the header and each tensor straight from the caller's spans (no full in-memory copy of
// the checkpoint) into a temp file that replaces `path` only once completely written.
inline void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  const detail::WritePlan plan = detail::plan_write(tensors, metadata);
  detail::AtomicFileWriter w(path);
  std::byte len[8];
  detail::put_u64_le(len, plan.header.size());
  w.write(len, 8);
  w.write(reinterpret_cast<const std::byte*>(plan.header.data()), plan.header.size());
  for (std::size_t i : plan.order) w.write(tensors[i].data.data(), tensors[i].data.size());
  w.commit();
}

}  // namespace deltakv::io
