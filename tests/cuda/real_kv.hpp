#pragma once
// Reader of the real-KV dump written by `deltakv dump-kv` (examples/deltakv.cpp): rows of the KV
// cache the example llama engine produced on a real text, for tests that compare backends on real
// data. Host code only (no CUDA), so CPU tests may use it too.
//
// Format (version 1, little-endian, no padding):
//   char[8] "DKVREAL\0"   u32 version = 1   u32 name_len, char[name_len] model name
//   i32 model_layers       i32 L (layers in the file), i32 layer_id[L]       i64 n_tokens
//   i32 n_q_heads, n_kv_heads, head_dim, rot_dim                          f64 rope_theta
//   i32 rope_style (deltakv::RopeStyle: 0 none, 1 half, 2 interleaved)     u32 flags
//   (bit 0: rows are bf16 values; bit 1: query/output rows present)
//   then per file layer, in layer_id order: f32 rows [n_tokens, 2 * n_kv_heads * head_dim]
//   (x = [pre-RoPE K of all kv heads | V of all kv heads], read back from the exact cache); with
//   bit 1, f32 query [n_q_heads * head_dim] (post-RoPE, position n_tokens - 1) and f32 output
//   [n_q_heads * head_dim] (the engine's exact attention of that query over all positions).
//
// Regenerate the default dump with scripts/dump-real-kv.sh (models/smollm2-kv.bin).
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "deltakv/config.hpp"

namespace dkt_real {

struct RealKv {
  std::string model;
  int model_layers = 0;
  std::vector<int> layer_ids;  // model layer of each file layer
  std::int64_t n_tokens = 0;
  int n_q_heads = 0, n_kv_heads = 0, head_dim = 0, rot_dim = 0;
  double rope_theta = 0;
  deltakv::RopeStyle rope_style = deltakv::RopeStyle::none;
  std::uint32_t flags = 0;
  std::vector<std::vector<float>> rows;  // [file layer] [n_tokens, kv_dim]
  std::vector<std::vector<float>> query;  // [file layer] [q_dim] (empty without flag bit 1)
  std::vector<std::vector<float>> out;    // [file layer] [q_dim] (empty without flag bit 1)

  static constexpr std::uint32_t kBf16Rows = 1, kHasQuery = 2;
  int kv_dim() const { return 2 * n_kv_heads * head_dim; }
  int q_dim() const { return n_q_heads * head_dim; }
  int n_layers() const { return int(layer_ids.size()); }
  bool has_query() const { return (flags & kHasQuery) != 0; }
  deltakv::ModelShape shape(int n_cache_layers) const { return {n_cache_layers, n_q_heads, n_kv_heads, head_dim}; }
  deltakv::RopeConfig rope() const {
    deltakv::RopeConfig r;
    r.style = rope_style;
    r.theta = rope_theta;
    r.rot_dim = rot_dim == head_dim ? 0 : rot_dim;
    return r;
  }
};

struct RealKvError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
inline constexpr char kMagic[8] = {'D', 'K', 'V', 'R', 'E', 'A', 'L', '\0'};

class Cursor {
 public:
  Cursor(const std::string& b, const std::string& what) : b_(b), what_(what) {}
  template <class V>
  V get(const char* field) {
    if (b_.size() - off_ < sizeof(V))
      throw RealKvError(what_ + ": truncated at " + field + " (byte " + std::to_string(off_) + " of " +
                        std::to_string(b_.size()) + ")");
    V v;
    std::memcpy(&v, b_.data() + off_, sizeof(V));
    off_ += sizeof(V);
    return v;
  }
  std::string bytes(std::size_t n, const char* field) {
    if (b_.size() - off_ < n) throw RealKvError(what_ + ": truncated at " + field);
    std::string s = b_.substr(off_, n);
    off_ += n;
    return s;
  }
  std::size_t offset() const { return off_; }

 private:
  const std::string& b_;
  std::string what_;
  std::size_t off_ = 0;
};
}  // namespace detail

// Parses a whole file image; `what` names it in errors. Throws RealKvError on a bad magic, an
// unknown version, an implausible header or a size that does not match the header.
inline RealKv parse_real_kv(const std::string& bytes, const std::string& what = "real KV dump") {
  static_assert(std::endian::native == std::endian::little, "the dump is little-endian");
  if (bytes.size() < 8 || std::memcmp(bytes.data(), detail::kMagic, 8) != 0)
    throw RealKvError(what + ": not a deltakv real-KV dump (bad magic)");
  detail::Cursor c(bytes, what);
  c.bytes(8, "magic");
  RealKv r;
  const auto version = c.get<std::uint32_t>("version");
  if (version != 1) throw RealKvError(what + ": version " + std::to_string(version) + " (this reader knows 1)");
  const auto name_len = c.get<std::uint32_t>("name length");
  if (name_len > 4096) throw RealKvError(what + ": model name of " + std::to_string(name_len) + " bytes");
  r.model = c.bytes(name_len, "model name");
  r.model_layers = c.get<std::int32_t>("model layers");
  const auto L = c.get<std::int32_t>("layer count");
  if (r.model_layers < 1 || r.model_layers > 4096 || L < 1 || L > r.model_layers)
    throw RealKvError(what + ": " + std::to_string(L) + " layers of a " + std::to_string(r.model_layers) +
                      "-layer model");
  for (int i = 0; i < L; ++i) {
    const auto id = c.get<std::int32_t>("layer id");
    if (id < 0 || id >= r.model_layers) throw RealKvError(what + ": layer id " + std::to_string(id) + " out of range");
    r.layer_ids.push_back(id);
  }
  r.n_tokens = c.get<std::int64_t>("token count");
  r.n_q_heads = c.get<std::int32_t>("q heads");
  r.n_kv_heads = c.get<std::int32_t>("kv heads");
  r.head_dim = c.get<std::int32_t>("head_dim");
  r.rot_dim = c.get<std::int32_t>("rot_dim");
  r.rope_theta = c.get<double>("rope theta");
  const auto style = c.get<std::int32_t>("rope style");
  r.flags = c.get<std::uint32_t>("flags");
  if (r.n_tokens < 1 || r.n_tokens > (std::int64_t(1) << 24) || r.n_q_heads < 1 || r.n_kv_heads < 1 ||
      r.n_q_heads % r.n_kv_heads != 0 || r.head_dim < 1 || r.head_dim > 1024 || r.n_q_heads > 1024 ||
      r.n_kv_heads > 1024 || r.rot_dim < 0 || r.rot_dim > r.head_dim || r.rot_dim % 2 != 0 || style < 0 || style > 2 ||
      !(r.rope_theta > 0) || !std::isfinite(r.rope_theta) || (r.flags & ~3u) != 0)
    throw RealKvError(what + ": implausible header (tokens " + std::to_string(r.n_tokens) + ", heads " +
                      std::to_string(r.n_q_heads) + "/" + std::to_string(r.n_kv_heads) + ", head_dim " +
                      std::to_string(r.head_dim) + ", rot_dim " + std::to_string(r.rot_dim) + ", style " +
                      std::to_string(style) + ", flags " + std::to_string(r.flags) + ")");
  r.rope_style = static_cast<deltakv::RopeStyle>(style);
  const std::size_t per_layer =
      std::size_t(r.n_tokens) * std::size_t(r.kv_dim()) + (r.has_query() ? 2 * std::size_t(r.q_dim()) : 0);
  const std::size_t want = c.offset() + std::size_t(L) * per_layer * sizeof(float);
  if (bytes.size() != want)
    throw RealKvError(what + ": " + std::to_string(bytes.size()) + " bytes, the header describes " + std::to_string(want));
  auto floats = [&](std::size_t n) {
    std::vector<float> v(n);
    std::memcpy(v.data(), bytes.data() + c.offset(), n * sizeof(float));
    c.bytes(n * sizeof(float), "rows");
    return v;
  };
  for (int i = 0; i < L; ++i) {
    r.rows.push_back(floats(std::size_t(r.n_tokens) * std::size_t(r.kv_dim())));
    r.query.push_back(r.has_query() ? floats(std::size_t(r.q_dim())) : std::vector<float>{});
    r.out.push_back(r.has_query() ? floats(std::size_t(r.q_dim())) : std::vector<float>{});
    for (float v : r.rows.back())
      if (!std::isfinite(v)) throw RealKvError(what + ": layer " + std::to_string(r.layer_ids[std::size_t(i)]) + " has NaN/Inf rows");
  }
  return r;
}

// The file image of a dump (what `deltakv dump-kv` writes), for round-trip and corruption tests.
inline std::string serialize_real_kv(const RealKv& r) {
  std::string b(detail::kMagic, 8);
  auto put = [&](const auto& v) { b.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
  put(std::uint32_t{1});
  put(std::uint32_t(r.model.size()));
  b += r.model;
  put(std::int32_t(r.model_layers));
  put(std::int32_t(r.layer_ids.size()));
  for (int id : r.layer_ids) put(std::int32_t(id));
  put(std::int64_t(r.n_tokens));
  put(std::int32_t(r.n_q_heads));
  put(std::int32_t(r.n_kv_heads));
  put(std::int32_t(r.head_dim));
  put(std::int32_t(r.rot_dim));
  put(double(r.rope_theta));
  put(std::int32_t(r.rope_style));
  put(std::uint32_t(r.flags));
  for (std::size_t i = 0; i < r.layer_ids.size(); ++i) {
    b.append(reinterpret_cast<const char*>(r.rows[i].data()), r.rows[i].size() * sizeof(float));
    if (r.has_query()) {
      b.append(reinterpret_cast<const char*>(r.query[i].data()), r.query[i].size() * sizeof(float));
      b.append(reinterpret_cast<const char*>(r.out[i].data()), r.out[i].size() * sizeof(float));
    }
  }
  return b;
}

inline RealKv read_real_kv(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw RealKvError("cannot open " + path);
  std::stringstream s;
  s << f.rdbuf();
  return parse_real_kv(s.str(), path);
}

// Where the tests look for the dump: $DELTAKV_REAL_KV, else models/smollm2-kv.bin of the source
// tree (DELTAKV_TEST_DATA_DIR is <source>/tests/data), else of the working directory.
inline std::string real_kv_path() {
  if (const char* e = std::getenv("DELTAKV_REAL_KV"); e && *e) return e;
#ifdef DELTAKV_TEST_DATA_DIR
  return std::string(DELTAKV_TEST_DATA_DIR) + "/../../models/smollm2-kv.bin";
#else
  return "models/smollm2-kv.bin";
#endif
}

inline bool file_exists(const std::string& path) { return std::ifstream(path, std::ios::binary).good(); }

}  // namespace dkt_real
