#pragma once
// Compressor checkpoints: the DeltaKV paper layout (what the reference trainer saves) and our own
// self-describing file. Both are safetensors; both load into a host-owned Compressor<T>.
//
// Paper layout, per layer i (any prefix before "layers.{i}" is accepted, as the reference loader
// does; the usual one is "model.layers.{i}.self_attn."):
//   SwiGLU f_c:  ...compress_down.w12.weight [2h, kv_dim]  (+ .bias [2h])
//                ...compress_down.w3.weight  [d_c, h]      (+ .bias [d_c])
//   linear f_c:  ...compress_down.weight     [d_c, kv_dim] (+ .bias [d_c])
//   f_d:         ...compress_up.weight       [kv_dim, d_c] (+ .bias [kv_dim])
// Tensors named compress_down/compress_up without any "layers.{i}" are the reference code's shared
// compressor: one codec broadcast to every layer (they cannot be mixed with per-layer tensors).
// A layer without compressor tensors is an exact layer of a sparse policy: its LayerCodec stays
// empty. Other tensors (the model's own weights) are ignored.
//
// Refused: split K/V checkpoints (separate K and V compressors) -> ConfigError; the reference
// code's GELU MLP (compress_down.0/.2) and non-linear compress_up -> ConfigError (no encoder or
// decoder for them here); anything malformed -> FormatError / ShapeError naming the tensor;
// NaN/Inf weights -> NonFiniteError; integer dtypes -> DTypeError.
//
// Our format (save_compressor / load_compressor): the same tensor names, all F32, plus
// __metadata__ {"deltakv.format": "1", "kind": "linear"|"swiglu", "kv_dim", "latent_dim",
// "hidden", "n_layers"} so that a file is complete on its own (no config.json, exact layers kept).
#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "deltakv/compressor.hpp"
#include "deltakv/error.hpp"
#include "deltakv/io/safetensors.hpp"

namespace deltakv::io {

namespace detail_ckpt {

// One size the checkpoint must agree on, and who fixed it (for error messages).
struct Known {
  std::int64_t value = 0;  // 0: not known yet
  std::string origin;
  bool format_error = false;  // a mismatch with this origin is a FormatError (else ShapeError)
};

// What is known about the codec before the tensors are read (config.json, our metadata, caller).
struct Spec {
  std::optional<CodecKind> kind;
  std::string kind_origin;
  Known kv_dim, latent, hidden;
  std::optional<bool> bias;    // false: bias tensors must be absent (config compressor_linear_bias)
  std::string bias_origin;
  bool allow_no_codec = false; // our format: a compressor whose layers are all exact is valid
  bool shape_is_format = false;  // our format: every inconsistency is a FormatError
  std::string source;            // file name, for messages
};

inline const char* kind_name(CodecKind k) { return k == CodecKind::swiglu ? "swiglu" : "linear"; }

inline std::vector<std::string> split(std::string_view s, std::string_view seps) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (seps.find(c) != std::string_view::npos) {
      out.push_back(std::move(cur));
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  out.push_back(std::move(cur));
  return out;
}

inline bool all_digits(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// A compressor tensor of a split K/V checkpoint: "k_compress_down", "compress_down_v",
// "compress.k.weight", "v_compressor", ... i.e. a name mentioning compress with a "k"/"v" part.
inline bool is_split_kv_name(const std::string& name) {
  if (name.find("compress") == std::string::npos) return false;
  for (const std::string& part : split(name, "._"))
    if (part == "k" || part == "v" || part == "K" || part == "V") return true;
  return name.find("k_compress") != std::string::npos || name.find("v_compress") != std::string::npos;
}

// The position of each recognised compressor tensor in one layer ("compress_down.w12.weight" ->
// full tensor name).
using LayerNames = std::map<std::string, std::string>;

inline std::string shape_of(const TensorInfo& t) { return detail::shape_str(t.shape); }

template <class T>
class Loader {
 public:
  Loader(const SafetensorsFile& f, int n_layers, Spec spec) : f_(f), n_layers_(n_layers), s_(std::move(spec)) {}

  Compressor<T> run() {
    if (n_layers_ <= 0)
      throw ConfigError(where() + "n_layers must be >= 1, got " + std::to_string(n_layers_));
    collect();
    Compressor<T> c;
    c.layers.resize(static_cast<std::size_t>(n_layers_));
    std::optional<CodecKind> kind = s_.kind;
    std::string kind_origin = s_.kind_origin;
    bool any = false;
    for (const auto& [layer, names] : layers_) {
      c.layers[static_cast<std::size_t>(layer)] = load_layer(layer, names, kind, kind_origin);
      any = true;
    }
    if (!any && !s_.allow_no_codec)
      throw FormatError(where() + "no DeltaKV compressor tensors found (expected names like "
                        "'model.layers.{i}.self_attn.compress_down.weight' or '...compress_down.w12.weight' "
                        "with '...compress_up.weight')");
    if (!kind) throw FormatError(where() + "the codec kind is unknown (no compressor tensors and no kind given)");
    c.kind = *kind;
    c.kv_dim = static_cast<int>(s_.kv_dim.value);
    c.latent_dim = static_cast<int>(s_.latent.value);
    c.hidden = c.kind == CodecKind::swiglu ? static_cast<int>(s_.hidden.value) : 0;
    if (c.kv_dim <= 0 || c.latent_dim <= 0 || (c.kind == CodecKind::swiglu && c.hidden <= 0))
      throw FormatError(where() + "the codec sizes are unknown (no compressor tensors and no sizes given)");
    return c;
  }

 private:
  std::string where() const { return "checkpoint '" + s_.source + "': "; }

  [[noreturn]] void shape_fail(const std::string& m) const {
    if (s_.shape_is_format) throw FormatError(where() + m);
    throw ShapeError(where() + m);
  }
  [[noreturn]] void format_fail(const std::string& m) const { throw FormatError(where() + m); }

  // Sort every compressor tensor into its layer; refuse what this library cannot run.
  void collect() {
    const std::vector<std::string> all = f_.names();
    for (const std::string& name : all)
      if (is_split_kv_name(name))
        throw ConfigError(where() + "tensor '" + name +
                          "' belongs to a split K/V compressor (separate K and V codecs); split K/V "
                          "checkpoints are not supported, only unified compress_down/compress_up");
    LayerNames shared;
    for (const std::string& name : all) {
      const std::vector<std::string> parts = split(name, ".");
      std::size_t ci = parts.size();
      for (std::size_t i = 0; i < parts.size(); ++i)
        if (parts[i] == "compress_down" || parts[i] == "compress_up") {
          ci = i;
          break;
        }
      if (ci == parts.size()) {
        if (name.find("compress_down") != std::string::npos || name.find("compress_up") != std::string::npos)
          format_fail("tensor '" + name + "' mentions compress_down/compress_up but is not named '...compress_down.<param>' "
                      "or '...compress_up.<param>'");
        continue;  // not a compressor tensor: the model's own weights
      }
      const std::string comp = parts[ci];
      std::string sub;
      for (std::size_t i = ci + 1; i < parts.size(); ++i) sub += (i > ci + 1 ? "." : "") + parts[i];
      check_sub(name, comp, sub, parts, ci);
      const std::string key = comp + "." + sub;

      std::size_t li = parts.size();
      for (std::size_t i = 0; i < ci; ++i)
        if (parts[i] == "layers") li = i;
      LayerNames* dst = &shared;
      if (li != parts.size()) {
        if (li + 1 >= ci || !all_digits(parts[li + 1]))
          format_fail("tensor '" + name + "': cannot read a layer index after 'layers.'");
        const std::string& d = parts[li + 1];
        long long layer = 0;
        auto [ptr, ec] = std::from_chars(d.data(), d.data() + d.size(), layer);
        if (ec != std::errc() || ptr != d.data() + d.size() || layer >= n_layers_)
          shape_fail("tensor '" + name + "' is for layer " + d + ", but the model has " + std::to_string(n_layers_) +
                     " layers");
        dst = &layers_[static_cast<int>(layer)];
      }
      auto [it, inserted] = dst->emplace(key, name);
      if (!inserted)
        format_fail("tensors '" + it->second + "' and '" + name + "' are both " + key +
                    (dst == &shared ? std::string(" of the shared compressor") : " of one layer"));
    }
    if (!shared.empty()) {
      if (!layers_.empty())
        format_fail("the checkpoint mixes a shared compressor (e.g. '" + shared.begin()->second +
                    "') with per-layer compressors (e.g. '" + layers_.begin()->second.begin()->second + "')");
      for (int l = 0; l < n_layers_; ++l) layers_[l] = shared;
    }
  }

  void check_sub(const std::string& name, const std::string& comp, const std::string& sub,
                 const std::vector<std::string>& parts, std::size_t ci) const {
    const bool down = comp == "compress_down";
    static const char* const down_ok[] = {"weight", "bias", "w12.weight", "w12.bias", "w3.weight", "w3.bias"};
    static const char* const up_ok[] = {"weight", "bias"};
    auto in = [&](const auto& list) {
      return std::any_of(std::begin(list), std::end(list), [&](const char* s) { return sub == s; });
    };
    if (down ? in(down_ok) : in(up_ok)) return;
    const std::string head = ci + 1 < parts.size() ? parts[ci + 1] : "";
    if (down && all_digits(head))
      throw ConfigError(where() + "tensor '" + name + "' is part of a GELU MLP compress_down (nn.Sequential, the "
                        "reference code's mlp_gelu); only linear and SwiGLU (w12/w3) compressors are supported");
    if (!down && (all_digits(head) || head == "w12" || head == "w3"))
      throw ConfigError(where() + "tensor '" + name + "' is part of a non-linear compress_up; only a linear "
                        "compress_up (f_d) is supported");
    format_fail("tensor '" + name + "' is not a recognised " + comp + " parameter (expected " +
                (down ? "weight, bias, w12.weight, w12.bias, w3.weight or w3.bias" : "weight or bias") + ")");
  }

  void bind(Known& k, std::int64_t v, const char* what, const std::string& tensor, const TensorInfo& t) const {
    if (v <= 0) shape_fail("tensor '" + tensor + "' has shape " + shape_of(t) + ": " + what + " must be >= 1");
    if (v > std::numeric_limits<int>::max())
      shape_fail("tensor '" + tensor + "' has shape " + shape_of(t) + ": " + what + " does not fit in int");
    if (k.value == 0) {
      k.value = v;
      k.origin = "tensor '" + tensor + "'";
      return;
    }
    if (k.value != v) {
      const std::string m = "tensor '" + tensor + "' has shape " + shape_of(t) + ", so " + what + " = " +
                             std::to_string(v) + ", but " + k.origin + " gives " + what + " = " +
                             std::to_string(k.value);
      if (k.format_error || s_.shape_is_format) throw FormatError(where() + m);
      throw ShapeError(where() + m);
    }
  }

  const TensorInfo& matrix_info(const std::string& name) const {
    const TensorInfo& t = f_.info(name);
    if (t.shape.size() != 2)
      shape_fail("tensor '" + name + "' has shape " + shape_of(t) + ", expected a 2-D weight [out, in]");
    return t;
  }

  std::vector<T> read(const std::string& name) const {
    std::vector<T> v = f_.template read_as<T>(name);
    for (std::size_t i = 0; i < v.size(); ++i)
      if (!std::isfinite(v[i]))
        throw NonFiniteError(where() + "tensor '" + name + "' has a non-finite value (" + std::to_string(v[i]) +
                             ") at flat index " + std::to_string(i));
    return v;
  }

  // Weight [out, in] (shape already bound) plus optional bias [out].
  OwnedLinear<T> linear(const LayerNames& names, const std::string& wkey, const std::string& bkey) const {
    const std::string& wname = names.at(wkey);
    const TensorInfo& w = f_.info(wname);
    OwnedLinear<T> o;
    o.out = static_cast<int>(w.shape[0]);
    o.in = static_cast<int>(w.shape[1]);
    o.w = read(wname);
    auto bit = names.find(bkey);
    if (bit != names.end()) {
      const TensorInfo& b = f_.info(bit->second);
      if (b.shape.size() != 1 || b.shape[0] != o.out)
        shape_fail("tensor '" + bit->second + "' has shape " + shape_of(b) + ", expected [" + std::to_string(o.out) +
                   "] (the out size of '" + wname + "')");
      if (s_.bias && !*s_.bias)
        format_fail("tensor '" + bit->second + "' is a bias, but " + s_.bias_origin + " says the compressor has none");
      o.b = read(bit->second);
    }
    return o;
  }

  LayerCodec<T> load_layer(int layer, const LayerNames& names, std::optional<CodecKind>& kind,
                           std::string& kind_origin) {
    const std::string L = "layer " + std::to_string(layer);
    auto has = [&](const char* k) { return names.count(k) != 0; };
    auto any_name = [&]() { return names.begin()->second; };
    const bool lin = has("compress_down.weight"), w12 = has("compress_down.w12.weight"), w3 = has("compress_down.w3.weight");
    if (lin && (w12 || w3 || has("compress_down.w12.bias") || has("compress_down.w3.bias")))
      format_fail(L + " has both a linear compress_down ('" + names.at("compress_down.weight") +
                  "') and SwiGLU w12/w3 tensors");
    if (!lin && !w12 && !w3)
      format_fail(L + " has compressor tensors (e.g. '" + any_name() + "') but no compress_down weight "
                  "(compress_down.weight or compress_down.w12.weight + compress_down.w3.weight)");
    if (w12 != w3)
      format_fail(L + " has '" + (w12 ? names.at("compress_down.w12.weight") : names.at("compress_down.w3.weight")) +
                  "' but no matching compress_down." + (w12 ? "w3" : "w12") + ".weight");
    if (lin && has("compress_down.w12.bias")) format_fail(L + ": w12 bias without a w12 weight");
    if (!lin && has("compress_down.bias"))
      format_fail(L + ": tensor '" + names.at("compress_down.bias") + "' is a linear compress_down bias, but the layer is SwiGLU");
    if (!has("compress_up.weight"))
      format_fail(L + " has a compress_down ('" + (lin ? names.at("compress_down.weight") : names.at("compress_down.w12.weight")) +
                  "') but no compress_up.weight (f_d)");

    const CodecKind k = lin ? CodecKind::linear : CodecKind::swiglu;
    const std::string first = lin ? names.at("compress_down.weight") : names.at("compress_down.w12.weight");
    if (!kind) {
      kind = k;
      kind_origin = "tensor '" + first + "'";
    } else if (*kind != k) {
      format_fail("tensor '" + first + "' makes " + L + " a " + kind_name(k) + " compressor, but " + kind_origin +
                  " says " + kind_name(*kind));
    }

    LayerCodec<T> codec;
    if (lin) {
      const TensorInfo& d = matrix_info(first);
      bind(s_.latent, d.shape[0], "latent_dim (d_c)", first, d);
      bind(s_.kv_dim, d.shape[1], "kv_dim", first, d);
      codec.down = linear(names, "compress_down.weight", "compress_down.bias");
    } else {
      const TensorInfo& a = matrix_info(first);
      if (a.shape[0] % 2 != 0)
        shape_fail("tensor '" + first + "' has shape " + shape_of(a) + ": its out size must be even (2h: x1 | x2)");
      bind(s_.hidden, a.shape[0] / 2, "hidden (h)", first, a);
      bind(s_.kv_dim, a.shape[1], "kv_dim", first, a);
      const std::string& w3n = names.at("compress_down.w3.weight");
      const TensorInfo& b = matrix_info(w3n);
      bind(s_.hidden, b.shape[1], "hidden (h)", w3n, b);
      bind(s_.latent, b.shape[0], "latent_dim (d_c)", w3n, b);
      codec.down = linear(names, "compress_down.w12.weight", "compress_down.w12.bias");
      codec.w3 = linear(names, "compress_down.w3.weight", "compress_down.w3.bias");
    }
    const std::string& upn = names.at("compress_up.weight");
    const TensorInfo& u = matrix_info(upn);
    bind(s_.kv_dim, u.shape[0], "kv_dim", upn, u);
    bind(s_.latent, u.shape[1], "latent_dim (d_c)", upn, u);
    codec.up = linear(names, "compress_up.weight", "compress_up.bias");
    return codec;
  }

  const SafetensorsFile& f_;
  int n_layers_;
  Spec s_;
  std::map<int, LayerNames> layers_;
};

// config.json: the reference trainer's keys. Type names are normalised as the reference does
// (lower case, trimmed; "" / null / "auto" mean infer from the tensors).
inline void apply_config(const nlohmann::json& cfg, Spec& s, const std::string& src) {
  if (!cfg.is_object()) throw FormatError(src + " is JSON " + std::string(cfg.type_name()) + ", not an object");
  auto norm = [&](const char* key) -> std::string {
    if (!cfg.contains(key) || cfg[key].is_null()) return "auto";
    if (!cfg[key].is_string()) throw FormatError(src + ": '" + key + "' must be a string, got " + cfg[key].dump());
    std::string v = cfg[key].get<std::string>();
    const auto b = v.find_first_not_of(" \t\r\n"), e = v.find_last_not_of(" \t\r\n");
    v = b == std::string::npos ? std::string() : v.substr(b, e - b + 1);
    std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return v.empty() ? "auto" : v;
  };
  // Positive integer, or nullopt when absent/null (or <= 0 where the reference uses -1 for unset).
  auto size = [&](const char* key, bool nonpositive_is_unset) -> std::optional<std::int64_t> {
    if (!cfg.contains(key) || cfg[key].is_null()) return std::nullopt;
    const auto& v = cfg[key];
    if (!v.is_number_integer())
      throw FormatError(src + ": '" + key + "' must be an integer, got " + v.dump());
    const std::int64_t x = v.is_number_unsigned() ? static_cast<std::int64_t>(std::min<std::uint64_t>(
                                                        v.get<std::uint64_t>(), std::numeric_limits<std::int64_t>::max()))
                                                  : v.get<std::int64_t>();
    if (x <= 0) {
      if (nonpositive_is_unset) return std::nullopt;
      throw FormatError(src + ": '" + key + "' must be >= 1, got " + v.dump());
    }
    if (x > std::numeric_limits<int>::max()) throw FormatError(src + ": '" + key + "' is too large: " + v.dump());
    return x;
  };

  if (cfg.contains("split_kv") && !cfg["split_kv"].is_null()) {
    if (!cfg["split_kv"].is_boolean())
      throw FormatError(src + ": 'split_kv' must be a boolean, got " + cfg["split_kv"].dump());
    if (cfg["split_kv"].get<bool>())
      throw ConfigError(src + " has split_kv = true: split K/V checkpoints are not supported, only unified "
                        "compress_down/compress_up");
  }
  const std::string down = norm("compressor_down_type");
  if (down == "linear") {
    s.kind = CodecKind::linear;
  } else if (down == "swiglu" || down == "mlp_swiglu") {
    s.kind = CodecKind::swiglu;
  } else if (down == "mlp_gelu" || down == "gelu" || down == "mlp") {
    throw ConfigError(src + ": compressor_down_type '" + down + "' (GELU MLP) is not supported; use linear or mlp_swiglu");
  } else if (down != "auto") {
    throw ConfigError(src + ": unknown compressor_down_type '" + down + "' (expected linear, mlp_swiglu, swiglu or auto)");
  }
  if (s.kind) s.kind_origin = src + " compressor_down_type '" + down + "'";
  const std::string up = norm("compressor_up_type");
  if (up != "auto" && up != "linear") {
    if (up == "mlp_gelu" || up == "gelu" || up == "mlp" || up == "swiglu" || up == "mlp_swiglu")
      throw ConfigError(src + ": compressor_up_type '" + up + "' is not supported; only a linear f_d (compress_up) is");
    throw ConfigError(src + ": unknown compressor_up_type '" + up + "' (expected linear or auto)");
  }
  if (auto v = size("kv_compressed_size", false)) s.latent = {*v, src + " kv_compressed_size", false};
  // The down path's hidden size: compressor_down_intermediate_size overrides the shared one.
  std::optional<std::int64_t> h = size("compressor_down_intermediate_size", true);
  const char* hkey = "compressor_down_intermediate_size";
  if (!h) {
    h = size("compressor_intermediate_size", true);
    hkey = "compressor_intermediate_size";
  }
  // A linear f_c has no hidden size; the reference configs keep compressor_intermediate_size anyway.
  if (h && s.kind != CodecKind::linear) s.hidden = {*h, src + " " + hkey, false};
  if (cfg.contains("compressor_linear_bias") && !cfg["compressor_linear_bias"].is_null()) {
    if (!cfg["compressor_linear_bias"].is_boolean())
      throw FormatError(src + ": 'compressor_linear_bias' must be a boolean, got " + cfg["compressor_linear_bias"].dump());
    s.bias = cfg["compressor_linear_bias"].get<bool>();
    s.bias_origin = src + " compressor_linear_bias";
  }
}

inline int meta_int(const std::map<std::string, std::string>& m, const std::string& key, const std::string& src,
                    bool allow_zero) {
  auto it = m.find(key);
  if (it == m.end()) throw FormatError("'" + src + "' is not a deltakv compressor file: metadata '" + key + "' is missing");
  const std::string& s = it->second;
  int v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size() || v < 0 || (v == 0 && !allow_zero))
    throw FormatError("'" + src + "': metadata '" + key + "' = '" + s + "' is not a valid " +
                      (allow_zero ? "non-negative" : "positive") + " integer");
  return v;
}

template <class T>
void append_f32(std::vector<std::vector<std::byte>>& bufs, std::vector<TensorToWrite>& out, const std::string& name,
                const std::vector<T>& v, std::vector<std::int64_t> shape) {
  std::vector<float> f(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    f[i] = static_cast<float>(v[i]);
    if (!std::isfinite(f[i]))
      throw NonFiniteError("save_compressor: tensor '" + name + "' has a value (" + std::to_string(v[i]) +
                           ") that is not finite in F32, at flat index " + std::to_string(i));
  }
  bufs.push_back(f32_bytes(f));
  out.push_back(TensorToWrite{name, StDType::F32, std::move(shape), {}});
}

}  // namespace detail_ckpt

// ---- paper layout ------------------------------------------------------------------------------

// `config`: the checkpoint's config.json (or nullptr). expected_kv_dim: the model's 2*Hkv*d, or 0
// to accept what the tensors say. Returns n_layers codecs (empty for layers without tensors).
template <class T>
Compressor<T> load_paper_checkpoint(const SafetensorsFile& file, int n_layers, int expected_kv_dim,
                                    const nlohmann::json* config = nullptr) {
  if (expected_kv_dim < 0)
    throw ConfigError("load_paper_checkpoint: expected_kv_dim must be >= 0 (0: any), got " +
                      std::to_string(expected_kv_dim));
  detail_ckpt::Spec s;
  s.source = "<checkpoint>";
  if (expected_kv_dim > 0) s.kv_dim = {expected_kv_dim, "the caller's expected_kv_dim", false};
  if (config) detail_ckpt::apply_config(*config, s, "config.json");
  return detail_ckpt::Loader<T>(file, n_layers, std::move(s)).run();
}

// Reads `safetensors_path` and, when present, config.json in the same directory.
template <class T>
Compressor<T> load_paper_checkpoint(const std::string& safetensors_path, int n_layers, int expected_kv_dim = 0) {
  const SafetensorsFile file = SafetensorsFile::open(safetensors_path);
  const std::filesystem::path cfg_path = std::filesystem::path(safetensors_path).parent_path() / "config.json";
  std::error_code ec;
  std::optional<nlohmann::json> cfg;
  if (std::filesystem::is_regular_file(cfg_path, ec)) {
    std::ifstream in(cfg_path, std::ios::binary);
    if (!in) throw IoError("cannot open '" + cfg_path.string() + "'");
    std::stringstream ss;
    ss << in.rdbuf();
    if (in.bad()) throw IoError("failed to read '" + cfg_path.string() + "'");
    try {
      cfg = nlohmann::json::parse(ss.str());
    } catch (const nlohmann::json::exception& e) {
      throw FormatError("'" + cfg_path.string() + "' is not valid JSON: " + e.what());
    }
  }
  if (expected_kv_dim < 0)
    throw ConfigError("load_paper_checkpoint: expected_kv_dim must be >= 0 (0: any), got " +
                      std::to_string(expected_kv_dim));
  detail_ckpt::Spec s;
  s.source = safetensors_path;
  if (expected_kv_dim > 0) s.kv_dim = {expected_kv_dim, "the caller's expected_kv_dim", false};
  if (cfg) detail_ckpt::apply_config(*cfg, s, "'" + cfg_path.string() + "'");
  return detail_ckpt::Loader<T>(file, n_layers, std::move(s)).run();
}

// ---- our format --------------------------------------------------------------------------------

// Writes every present layer under the paper names, as F32 (exact for float compressors), plus the
// metadata that makes the file self-describing. Atomic (temp file + rename).
template <class T>
void save_compressor(const std::string& path, const Compressor<T>& c) {
  const int L = static_cast<int>(c.layers.size());
  const std::string kind = detail_ckpt::kind_name(c.kind);
  if (L <= 0) throw ConfigError("save_compressor: the compressor has no layers");
  if (c.kv_dim <= 0 || c.latent_dim <= 0)
    throw ShapeError("save_compressor: kv_dim and latent_dim must be >= 1 (got " + std::to_string(c.kv_dim) + ", " +
                     std::to_string(c.latent_dim) + ")");
  if (c.kind == CodecKind::swiglu ? c.hidden <= 0 : c.hidden != 0)
    throw ShapeError("save_compressor: hidden must be " +
                     std::string(c.kind == CodecKind::swiglu ? ">= 1 for a SwiGLU" : "0 for a linear") +
                     " compressor, got " + std::to_string(c.hidden));

  std::vector<std::vector<std::byte>> bufs;
  std::vector<TensorToWrite> tensors;
  auto put = [&](const std::string& name, const OwnedLinear<T>& m, int out, int in) {
    const std::string what = "save_compressor: '" + name + "'";
    if (m.empty()) throw ShapeError(what + " is missing");
    if (m.out != out || m.in != in || m.w.size() != std::size_t(out) * std::size_t(in))
      throw ShapeError(what + " maps " + std::to_string(m.in) + " -> " + std::to_string(m.out) + " with " +
                       std::to_string(m.w.size()) + " weights; the compressor needs " + std::to_string(in) + " -> " +
                       std::to_string(out));
    if (!m.b.empty() && m.b.size() != std::size_t(out))
      throw ShapeError(what + " has a bias of " + std::to_string(m.b.size()) + " values, expected " + std::to_string(out));
    detail_ckpt::append_f32(bufs, tensors, name + ".weight", m.w, {out, in});
    if (!m.b.empty()) detail_ckpt::append_f32(bufs, tensors, name + ".bias", m.b, {out});
  };
  for (int l = 0; l < L; ++l) {
    const LayerCodec<T>& lc = c.layers[static_cast<std::size_t>(l)];
    const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
    if (lc.down.empty() && lc.up.empty() && lc.w3.empty()) continue;  // exact layer
    if (lc.down.empty() || lc.up.empty())
      throw ShapeError("save_compressor: layer " + std::to_string(l) + " has only one of f_c and f_d");
    if (c.kind == CodecKind::swiglu) {
      put(p + "compress_down.w12", lc.down, 2 * c.hidden, c.kv_dim);
      put(p + "compress_down.w3", lc.w3, c.latent_dim, c.hidden);
    } else {
      if (!lc.w3.empty()) throw ShapeError("save_compressor: layer " + std::to_string(l) + " of a linear compressor has w3");
      put(p + "compress_down", lc.down, c.latent_dim, c.kv_dim);
    }
    put(p + "compress_up", lc.up, c.kv_dim, c.latent_dim);
  }
  for (std::size_t i = 0; i < tensors.size(); ++i) tensors[i].data = bufs[i];
  const std::map<std::string, std::string> meta = {
      {"deltakv.format", "1"},
      {"kind", kind},
      {"kv_dim", std::to_string(c.kv_dim)},
      {"latent_dim", std::to_string(c.latent_dim)},
      {"hidden", std::to_string(c.kind == CodecKind::swiglu ? c.hidden : 0)},
      {"n_layers", std::to_string(L)},
  };
  write_safetensors(path, tensors, meta);
}

// Reads a file written by save_compressor. Missing or inconsistent metadata -> FormatError (a paper
// checkpoint without our metadata is refused: use load_paper_checkpoint for those).
template <class T>
Compressor<T> load_compressor(const std::string& path) {
  const SafetensorsFile file = SafetensorsFile::open(path);
  const auto& m = file.metadata();
  auto fmt = m.find("deltakv.format");
  if (fmt == m.end())
    throw FormatError("'" + path + "' is not a deltakv compressor file: no 'deltakv.format' metadata (a paper "
                      "checkpoint? use load_paper_checkpoint)");
  if (fmt->second != "1")
    throw FormatError("'" + path + "': unsupported deltakv.format '" + fmt->second + "' (this build reads 1)");
  auto kit = m.find("kind");
  if (kit == m.end()) throw FormatError("'" + path + "' is not a deltakv compressor file: metadata 'kind' is missing");
  detail_ckpt::Spec s;
  s.source = path;
  s.allow_no_codec = true;
  s.shape_is_format = true;
  if (kit->second == "linear") s.kind = CodecKind::linear;
  else if (kit->second == "swiglu") s.kind = CodecKind::swiglu;
  else throw FormatError("'" + path + "': metadata kind '" + kit->second + "' is not linear or swiglu");
  s.kind_origin = "metadata kind '" + kit->second + "'";
  const int kv = detail_ckpt::meta_int(m, "kv_dim", path, false);
  const int lat = detail_ckpt::meta_int(m, "latent_dim", path, false);
  const int hid = detail_ckpt::meta_int(m, "hidden", path, true);
  const int L = detail_ckpt::meta_int(m, "n_layers", path, false);
  if ((*s.kind == CodecKind::swiglu) != (hid > 0))
    throw FormatError("'" + path + "': metadata hidden = " + std::to_string(hid) + " does not fit kind '" + kit->second +
                      "' (SwiGLU needs hidden >= 1, linear needs 0)");
  s.kv_dim = {kv, "metadata 'kv_dim'", true};
  s.latent = {lat, "metadata 'latent_dim'", true};
  if (hid > 0) s.hidden = {hid, "metadata 'hidden'", true};
  return detail_ckpt::Loader<T>(file, L, std::move(s)).run();
}

}  // namespace deltakv::io
