#pragma once
// Model geometry and DeltaKV knobs, with the paper's defaults. Plain data; validate() is the one
// place that decides whether a combination is usable.
#include <cstdint>
#include <string>

#include "deltakv/error.hpp"

namespace deltakv {

struct ModelShape {
  int n_layers = 0;
  int n_q_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  // One token of one layer is x = [K (all kv heads, pre-RoPE) | V (all kv heads)].
  constexpr int kv_dim() const { return 2 * n_kv_heads * head_dim; }
  constexpr int k_dim() const { return n_kv_heads * head_dim; }
};

// half: HF / NeoX rotate_half (pairs i, i+rot/2); interleaved: GPT-J / GGUF pairs (2i, 2i+1).
enum class RopeStyle { none, half, interleaved };

struct RopeConfig {
  RopeStyle style = RopeStyle::half;
  double theta = 10000.0;
  int rot_dim = 0;  // 0: the whole head
};

enum class Metric { l2, dot, cosine };

// Largest k_neighbors a cache accepts (validate() refuses more): the reference ids of one token are
// read back into a fixed-size host array, and k beyond a few dozen only costs id bytes.
inline constexpr int kMaxNeighbors = 64;
// Layers a cache serves: the cache keeps host tables per layer (plans, offsets, per-sequence state),
// so an absurd count is refused up front rather than failing an allocation (real models: < 200).
inline constexpr int kMaxLayers = 4096;

struct CompressionConfig {
  int sinks = 8;         // first tokens kept exact
  int recent = 128;      // last tokens kept exact (at least this many)
  int block = 0;         // tokens compressed at once when they leave the window; 0: = recent
  int k_neighbors = 4;   // references averaged per token, in [1, kMaxNeighbors]
  int latent_dim = 0;    // d_c; 0: kv_dim / 4
  int latent_bits = 0;   // 0 (store latents in the cache's element type), 8 or 4: token-wise min/scale
  Metric metric = Metric::l2;
  // Blocks one compression pass searches and encodes together when an append completes several (a
  // prefill chunk): larger GEMMs and fewer launches for workspace of that many blocks' rows. The
  // encoder's GEMMs then see a pass's rows at once, so their rounding (and the stored latents' bits)
  // can depend on how appends group the blocks; 1 encodes block by block, the same bits however
  // the appends are chunked.
  int blocks_per_pass = 4;
};

struct Capacity {
  int max_seqs = 1;
  std::int64_t max_tokens = 0;    // per sequence
  int max_query_rows = 1;         // query tokens of one sequence in one attend() call
};

struct Config {
  ModelShape model;
  RopeConfig rope;
  CompressionConfig comp;
  Capacity cap;

  int latent_dim() const { return comp.latent_dim > 0 ? comp.latent_dim : model.kv_dim() / 4; }
  int block() const { return comp.block > 0 ? comp.block : (comp.recent > 0 ? comp.recent : 1); }
  int rot_dim() const { return rope.rot_dim > 0 ? rope.rot_dim : model.head_dim; }
  // Positions one compression pass takes at most: block * blocks_per_pass, at most max_tokens.
  std::int64_t pass_tokens() const {
    const std::int64_t r = std::int64_t(block()) * (comp.blocks_per_pass > 0 ? comp.blocks_per_pass : 1);
    return cap.max_tokens > 0 && cap.max_tokens < r ? cap.max_tokens : r;
  }
  // Rows one pass encodes at most, in one call: its latents and, below them, their reference means
  // (the workspace holds them; an encoder's scratch is scratch_elems(compress_rows())).
  std::int64_t compress_rows() const { return 2 * pass_tokens(); }
};

inline void validate(const Config& c) {
  auto bad = [](const std::string& m) { throw ConfigError(m); };
  const auto& m = c.model;
  if (m.n_layers <= 0 || m.n_q_heads <= 0 || m.n_kv_heads <= 0 || m.head_dim <= 0)
    bad("model shape needs positive n_layers, n_q_heads, n_kv_heads, head_dim");
  if (m.n_layers > kMaxLayers) bad("n_layers " + std::to_string(m.n_layers) + " is above " + std::to_string(kMaxLayers));
  if (m.n_q_heads % m.n_kv_heads != 0) bad("n_q_heads must be a multiple of n_kv_heads (GQA)");
  constexpr std::int64_t kIntMax = 2147483647;
  if (2 * std::int64_t(m.n_kv_heads) * m.head_dim > kIntMax || std::int64_t(m.n_q_heads) * m.head_dim > kIntMax)
    bad("model shape too large: kv_dim and n_q_heads * head_dim must fit in int");
  if (c.comp.sinks < 0 || c.comp.recent < 0) bad("sinks and recent must be >= 0");
  // the ring holds recent + block rows, counted in int (LayerStorage::ring_rows)
  if (std::int64_t(c.comp.recent) + c.block() > kIntMax) bad("recent + block must fit in int");
  if (c.comp.k_neighbors <= 0 || c.comp.k_neighbors > kMaxNeighbors)
    bad("k_neighbors must be in [1, " + std::to_string(kMaxNeighbors) + "]");
  if (c.latent_dim() <= 0) bad("latent_dim must be >= 1");
  if (c.comp.blocks_per_pass <= 0) bad("blocks_per_pass must be >= 1");
  if (c.comp.latent_bits != 0 && c.comp.latent_bits != 8 && c.comp.latent_bits != 4)
    bad("latent_bits must be 0, 8 or 4");
  if (c.comp.latent_bits == 4 && c.latent_dim() % 2 != 0) bad("int4 latents need an even latent_dim");
  if (c.rope.style != RopeStyle::none && (c.rot_dim() % 2 != 0 || c.rot_dim() > m.head_dim))
    bad("rot_dim must be even and <= head_dim");
  if (c.rope.theta <= 0) bad("rope theta must be > 0");
  if (c.cap.max_seqs <= 0 || c.cap.max_tokens <= 0 || c.cap.max_query_rows <= 0)
    bad("capacity needs max_seqs, max_tokens, max_query_rows > 0");
  if (c.cap.max_tokens > (std::int64_t{1} << 31) - 1) bad("max_tokens must fit in int32 ids");
}

}  // namespace deltakv
