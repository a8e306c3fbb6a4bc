#pragma once
// Llama-architecture weights from a GGUF file, dequantized to f32 at load (the embedded default is
// SmolLM2-135M-Instruct, ~0.5 GB as f32), plus the deltakv Config for the model's KV geometry.
//
// GGUF stores a matrix with ne = [in, out] (ne[0] fastest), i.e. as a row-major [out, in] matrix:
// exactly the W of y = x·W^T, so the dequantized buffers are used as they come.
//
// RoPE: llama.cpp's converter permutes the Q/K weights of arch "llama" so that the GGUF weights are
// meant for the interleaved rotation (GPT-J style, pairs (2i, 2i+1); llama.cpp's "normal" rope),
// not HF's rotate_half. The Config below says so (RopeStyle::interleaved).
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "deltakv/config.hpp"
#include "deltakv/error.hpp"
#include "deltakv/io/gguf.hpp"

namespace llama {

struct LlamaHParams {
  std::string arch = "llama";
  int n_layers = 0;
  int hidden = 0;
  int n_q_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int ffn = 0;
  int vocab = 0;
  int rope_dim = 0;           // rotated dims per head (== head_dim for SmolLM2)
  double rope_theta = 10000.0;
  double rms_eps = 1e-5;
  std::int64_t context_length = 0;

  int q_dim() const { return n_q_heads * head_dim; }
  int k_dim() const { return n_kv_heads * head_dim; }
};

namespace detail {

inline std::int64_t int_or(const deltakv::io::GgufFile& f, const std::string& key, std::int64_t fallback) {
  return f.has(key) ? f.get_int(key) : fallback;
}

inline int positive_int(std::int64_t v, const std::string& what) {
  if (v <= 0 || v > (std::int64_t{1} << 30)) throw deltakv::FormatError("GGUF " + what + " = " + std::to_string(v) + " is not a sane positive size");
  return static_cast<int>(v);
}

}  // namespace detail

// Hyperparameters from the GGUF metadata ({arch}.block_count etc.). Only arch "llama" is supported.
inline LlamaHParams read_hparams(const deltakv::io::GgufFile& f) {
  LlamaHParams hp;
  hp.arch = f.get_string("general.architecture");
  if (hp.arch != "llama")
    throw deltakv::ConfigError("llama example engine: architecture '" + hp.arch + "' is not supported (only 'llama')");
  const std::string a = hp.arch + ".";
  hp.n_layers = detail::positive_int(f.get_int(a + "block_count"), a + "block_count");
  hp.hidden = detail::positive_int(f.get_int(a + "embedding_length"), a + "embedding_length");
  hp.ffn = detail::positive_int(f.get_int(a + "feed_forward_length"), a + "feed_forward_length");
  hp.n_q_heads = detail::positive_int(f.get_int(a + "attention.head_count"), a + "attention.head_count");
  hp.n_kv_heads = detail::positive_int(detail::int_or(f, a + "attention.head_count_kv", hp.n_q_heads), a + "attention.head_count_kv");
  if (hp.hidden % hp.n_q_heads != 0 && !f.has(a + "attention.key_length"))
    throw deltakv::FormatError("GGUF: embedding_length is not a multiple of head_count and no key_length is given");
  hp.head_dim = detail::positive_int(detail::int_or(f, a + "attention.key_length", hp.hidden / hp.n_q_heads), a + "attention.key_length");
  if (detail::int_or(f, a + "attention.value_length", hp.head_dim) != hp.head_dim)
    throw deltakv::ConfigError("llama example engine: value_length != key_length is not supported");
  if (hp.n_q_heads % hp.n_kv_heads != 0) throw deltakv::FormatError("GGUF: head_count is not a multiple of head_count_kv");
  hp.rope_dim = detail::positive_int(detail::int_or(f, a + "rope.dimension_count", hp.head_dim), a + "rope.dimension_count");
  if (hp.rope_dim > hp.head_dim || hp.rope_dim % 2 != 0)
    throw deltakv::FormatError("GGUF: rope.dimension_count must be even and <= the head size");
  hp.rope_theta = f.has(a + "rope.freq_base") ? f.get_float(a + "rope.freq_base") : 10000.0;
  hp.rms_eps = f.get_float(a + "attention.layer_norm_rms_epsilon");
  if (!(hp.rope_theta > 0) || !(hp.rms_eps > 0) || !std::isfinite(hp.rope_theta) || !std::isfinite(hp.rms_eps))
    throw deltakv::FormatError("GGUF: rope.freq_base and layer_norm_rms_epsilon must be positive");
  if (f.has(a + "rope.scaling.type")) {
    const std::string t = f.get_string(a + "rope.scaling.type");
    if (t != "none") throw deltakv::ConfigError("llama example engine: rope scaling '" + t + "' is not supported");
  }
  hp.context_length = detail::int_or(f, a + "context_length", 0);
  const auto& emb = f.tensor("token_embd.weight");
  if (emb.ne.size() != 2) throw deltakv::ShapeError("token_embd.weight must be 2-D");
  hp.vocab = detail::positive_int(detail::int_or(f, a + "vocab_size", emb.ne[1]), a + "vocab_size");
  return hp;
}

// The deltakv Config of this model: geometry from the hyperparameters, interleaved RoPE with the
// model's base (the cache rotates K itself), and the caller's compression knobs and capacity.
inline deltakv::Config make_config(const LlamaHParams& hp, const deltakv::CompressionConfig& comp,
                                   const deltakv::Capacity& cap) {
  deltakv::Config c;
  c.model = {hp.n_layers, hp.n_q_heads, hp.n_kv_heads, hp.head_dim};
  c.rope.style = deltakv::RopeStyle::interleaved;
  c.rope.theta = hp.rope_theta;
  c.rope.rot_dim = hp.rope_dim == hp.head_dim ? 0 : hp.rope_dim;
  c.comp = comp;
  c.cap = cap;
  deltakv::validate(c);
  return c;
}

inline deltakv::Config make_config(const deltakv::io::GgufFile& f, const deltakv::CompressionConfig& comp,
                                   const deltakv::Capacity& cap) {
  return make_config(read_hparams(f), comp, cap);
}

// A configuration that never compresses (the recent window covers the whole capacity) and uses a
// latent of the full kv_dim, for the identity codec (Compressor<float>::identity): attention over
// the cache is then exact, which is what reference comparisons need.
inline deltakv::Config make_exact_config(const LlamaHParams& hp, std::int64_t max_tokens, int max_query_rows,
                                         int max_seqs = 1) {
  deltakv::CompressionConfig comp;
  comp.sinks = 0;
  comp.recent = static_cast<int>(max_tokens);
  comp.block = 1;
  comp.latent_dim = 2 * hp.k_dim();
  return make_config(hp, comp, deltakv::Capacity{max_seqs, max_tokens, max_query_rows});
}

struct LlamaLayer {
  std::vector<float> attn_norm;  // [hidden]
  std::vector<float> wq;         // [n_q*hd, hidden]
  std::vector<float> wk;         // [n_kv*hd, hidden]
  std::vector<float> wv;         // [n_kv*hd, hidden]
  std::vector<float> wo;         // [hidden, n_q*hd]
  std::vector<float> ffn_norm;   // [hidden]
  std::vector<float> w_gate;     // [ffn, hidden]
  std::vector<float> w_up;       // [ffn, hidden]
  std::vector<float> w_down;     // [hidden, ffn]
};

struct LlamaWeights {
  LlamaHParams hp;
  std::vector<float> token_embd;   // [vocab, hidden]
  std::vector<LlamaLayer> layers;  // [n_layers]
  std::vector<float> output_norm;  // [hidden]
  std::vector<float> output;       // [vocab, hidden]; empty when tied to token_embd
  bool tied_output = false;

  // The LM head [vocab, hidden] (token_embd when output.weight is absent).
  const float* output_weight() const { return tied_output ? token_embd.data() : output.data(); }

  static LlamaWeights load(const deltakv::io::GgufFile& f) {
    LlamaWeights w;
    w.hp = read_hparams(f);
    const auto& hp = w.hp;
    w.token_embd = matrix(f, "token_embd.weight", hp.vocab, hp.hidden);
    w.layers.resize(hp.n_layers);
    for (int l = 0; l < hp.n_layers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      LlamaLayer& L = w.layers[l];
      L.attn_norm = vector(f, p + "attn_norm.weight", hp.hidden);
      L.wq = matrix(f, p + "attn_q.weight", hp.q_dim(), hp.hidden);
      L.wk = matrix(f, p + "attn_k.weight", hp.k_dim(), hp.hidden);
      L.wv = matrix(f, p + "attn_v.weight", hp.k_dim(), hp.hidden);
      L.wo = matrix(f, p + "attn_output.weight", hp.hidden, hp.q_dim());
      L.ffn_norm = vector(f, p + "ffn_norm.weight", hp.hidden);
      L.w_gate = matrix(f, p + "ffn_gate.weight", hp.ffn, hp.hidden);
      L.w_up = matrix(f, p + "ffn_up.weight", hp.ffn, hp.hidden);
      L.w_down = matrix(f, p + "ffn_down.weight", hp.hidden, hp.ffn);
    }
    w.output_norm = vector(f, "output_norm.weight", hp.hidden);
    w.tied_output = !f.has_tensor("output.weight");
    if (!w.tied_output) w.output = matrix(f, "output.weight", hp.vocab, hp.hidden);
    return w;
  }

  static LlamaWeights load(const std::string& path) { return load(deltakv::io::GgufFile::open(path)); }

 private:
  static std::string shape_str(const std::vector<std::int64_t>& ne) {
    std::string s = "[";
    for (std::size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
    return s + "]";
  }
  // A row-major [rows, cols] matrix stored with ne = [cols, rows].
  static std::vector<float> matrix(const deltakv::io::GgufFile& f, const std::string& name, int rows, int cols) {
    const auto& t = f.tensor(name);
    if (t.ne != std::vector<std::int64_t>{cols, rows})
      throw deltakv::ShapeError("GGUF tensor '" + name + "' has ne " + shape_str(t.ne) + ", expected [" +
                                std::to_string(cols) + ", " + std::to_string(rows) + "]");
    return f.dequantize(name);
  }
  static std::vector<float> vector(const deltakv::io::GgufFile& f, const std::string& name, int n) {
    const auto& t = f.tensor(name);
    if (t.ne != std::vector<std::int64_t>{n})
      throw deltakv::ShapeError("GGUF tensor '" + name + "' has ne " + shape_str(t.ne) + ", expected [" + std::to_string(n) + "]");
    return f.dequantize(name);
  }
};

}  // namespace llama
