#pragma once
// The compressed KV cache an engine calls per layer: append (prefill chunk or decode token, for a
// batch of sequences), reconstruct positions, attend. Storage and workspace are caller-provided
// device memory sized by CompressedCache::layout(); after construction nothing is allocated.
//
// Per layer and sequence, a compressed layer holds:
//   sinks   [S, kv_dim]          exact, positions 0..S-1
//   ring    [R + B, kv_dim]      exact, positions not yet compressed (slot = (pos - S) % (R + B))
//   refs    [max_refs, kv_dim]   exact reference tokens, in position order (room for max_refs
//                                rounded up to 8 rows: the search may read whole groups of 8)
//   latents [max_lat, payload]   z = f_c(x) - f_c(mean of k refs), raw or int8/int4 + scale/min
//   ids     [max_lat, k]         the k reference indices of each latent (-1 where fewer existed)
// An exact layer (policy) holds rows [max_tokens, kv_dim]. Everything is pre-RoPE; RoPE is
// applied to the K half when rows are read for attention.
//
// Which positions are sinks, references or latents depends on position only, so one host table
// (built at construction) serves all layers and sequences.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "deltakv/config.hpp"
#include "deltakv/device.hpp"
#include "deltakv/error.hpp"
#include "deltakv/latent_decoder.hpp"
#include "deltakv/layer_storage.hpp"
#include "deltakv/memory.hpp"
#include "deltakv/reference_selector.hpp"
#include "deltakv/residual_encoder.hpp"
#include "deltakv/sparse_policy.hpp"
#include "deltakv/tensor.hpp"

namespace deltakv {

namespace detail {
// Byte arithmetic of CompressedCache::layout(): a size that does not fit in size_t is refused as
// a ConfigError (an absurd geometry), never wrapped into a small buffer.
[[noreturn]] inline void layout_overflow() {
  throw ConfigError("cache layout: buffer sizes overflow size_t (absurd geometry or capacity)");
}
inline std::size_t bytes_mul(std::size_t a) { return a; }
template <class... Rest>
std::size_t bytes_mul(std::size_t a, std::size_t b, Rest... rest) {
  if (a != 0 && b > std::numeric_limits<std::size_t>::max() / a) layout_overflow();
  return bytes_mul(a * b, static_cast<std::size_t>(rest)...);
}
inline std::size_t bytes_add(std::size_t a, std::size_t b) {
  if (b > std::numeric_limits<std::size_t>::max() - a) layout_overflow();
  return a + b;
}
// A count that must be >= 0 (a negative one is a configuration error, not a huge size_t).
inline std::size_t count_of(std::int64_t n) {
  if (n < 0) throw ConfigError("cache layout: negative element count " + std::to_string(n));
  return static_cast<std::size_t>(n);
}
// Saturating byte arithmetic for lower bounds: SIZE_MAX stands for "does not fit in size_t" (a real
// layout is a sum of 256-byte-aligned regions, so it is never SIZE_MAX itself).
inline std::size_t sat_mul(std::size_t a, std::size_t b) {
  return a != 0 && b > std::numeric_limits<std::size_t>::max() / a ? std::numeric_limits<std::size_t>::max() : a * b;
}
inline std::size_t sat_add(std::size_t a, std::size_t b) {
  return b > std::numeric_limits<std::size_t>::max() - a ? std::numeric_limits<std::size_t>::max() : a + b;
}
}  // namespace detail

// Largest Capacity::max_tokens a CompressedCache accepts (layout() and the constructor refuse more
// with a ConfigError; validate() alone allows up to 2^31 - 1). Positions are coded as
// (row << 2) | class in int32 (CompressedCache::position_codes(), read by the GPU kernels), and the
// cache keeps host tables of about 9 bytes per position (and, where a layer is compressed, device
// tables of about 20 bytes per position at the front of the storage buffer).
inline constexpr std::int64_t kMaxCacheTokens = (std::int64_t{1} << 29) - 1;

// Host decisions of one append() call; valid until the cache changes (generation), and only for
// the cache that made it (`items` points into that cache's own array, which identifies it).
struct AppendPlan {
  struct Item {
    std::int32_t seq;
    std::int64_t row_begin;  // first row of this sequence in the batch
    std::int64_t count;      // rows
    std::int64_t start_pos;  // position of the first row
  };
  int layer = 0;
  int n_items = 0;
  const Item* items = nullptr;  // owned by the cache that made the plan, n_items entries
  std::uint64_t generation = 0;
};

template <class T, class Dev, ReferenceSelector Sel, class Enc, class Dec, SparsePolicy Pol>
  requires Device<Dev, T> && ResidualEncoder<Enc, T> && LatentDecoder<Dec, T>
class CompressedCache {
 public:
  static constexpr int kTile = 128;  // rows reconstructed at once for attention and reconstruct

  struct Layout {
    std::size_t storage_bytes = 0;    // resident cache
    std::size_t workspace_bytes = 0;  // scratch for one call at a time
  };

  // Bytes the caller must provide. `max_encoder_scratch` is the largest
  // Enc::scratch_elems(cfg.compress_rows()).
  // Every check the Config decides alone (validate(), max_tokens <= kMaxCacheTokens, the workspace
  // bytes, a lower bound of the storage bytes) runs before the O(max_tokens) position tables.
  static Layout layout(const Config& cfg, const Sel& sel, const Pol& pol, std::int64_t max_encoder_scratch) {
    (void)preflight(cfg);
    Layout l;
    l.workspace_bytes = workspace_plan(cfg, max_encoder_scratch).total;
    Geometry g = plan_layers(cfg, pol);
    build_tables(cfg, sel, g);
    l.storage_bytes = g.storage_bytes;
    return l;
  }

  // Not copyable: a copy would share the caller's storage and workspace with the original and the
  // two would overwrite each other. (Moving is fine: the moved-from cache is not used again.)
  CompressedCache(const CompressedCache&) = delete;
  CompressedCache& operator=(const CompressedCache&) = delete;
  CompressedCache(CompressedCache&&) = default;
  CompressedCache& operator=(CompressedCache&&) = delete;

  // encoders/decoders: one per layer (entries of exact layers are not used; they may be empty maps).
  CompressedCache(Dev& dev, Config cfg, Sel sel, std::span<const Enc> encoders, std::span<const Dec> decoders,
                  Pol pol, std::span<std::byte> storage, std::span<std::byte> workspace)
      : dev_(dev), cfg_(std::move(cfg)), sel_(std::move(sel)), pol_(std::move(pol)) {
    // The checks that need no O(max_tokens) memory come first, the caller's buffers included (a
    // lower bound for the storage here, the exact size once the tables exist).
    const std::size_t min_storage = preflight(cfg_);
    const int L = cfg_.model.n_layers;
    if (static_cast<int>(encoders.size()) != L || static_cast<int>(decoders.size()) != L)
      throw ConfigError("need one encoder and one decoder per layer (" + std::to_string(L) + ")");
    g_ = plan_layers(cfg_, pol_);
    std::int64_t scratch = 0;
    for (int l = 0; l < L; ++l) {
      if (g_.plans[l].exact) continue;
      const auto& e = encoders[l];
      const auto& d = decoders[l];
      if (e.input_dim() != cfg_.model.kv_dim() || e.latent_dim() != cfg_.latent_dim() ||
          d.latent_dim() != cfg_.latent_dim() || d.output_dim() != cfg_.model.kv_dim())
        throw ShapeError("layer " + std::to_string(l) + ": codec maps " + std::to_string(e.input_dim()) + "->" +
                         std::to_string(e.latent_dim()) + "->" + std::to_string(d.output_dim()) +
                         ", config needs " + std::to_string(cfg_.model.kv_dim()) + "->" +
                         std::to_string(cfg_.latent_dim()) + "->" + std::to_string(cfg_.model.kv_dim()));
      scratch = std::max(scratch, e.scratch_elems(cfg_.compress_rows()));
    }
    ws_ = workspace_plan(cfg_, scratch);
    if (storage.size() < min_storage)
      throw CapacityError("storage buffer has " + std::to_string(storage.size()) + " bytes, layout needs at least " +
                          std::to_string(min_storage) + " (CompressedCache::layout() gives the exact size)");
    if (workspace.size() < ws_.total)
      throw CapacityError("workspace has " + std::to_string(workspace.size()) + " bytes, layout needs " +
                          std::to_string(ws_.total));
    build_tables(cfg_, sel_, g_);
    if (storage.size() < g_.storage_bytes)
      throw CapacityError("storage buffer has " + std::to_string(storage.size()) + " bytes, layout needs " +
                          std::to_string(g_.storage_bytes));
    enc_.assign(encoders.begin(), encoders.end());
    dec_.assign(decoders.begin(), decoders.end());
    store_ = storage.data();
    work_ = workspace.data();
    st_.assign(static_cast<std::size_t>(L) * cfg_.cap.max_seqs, LayerSeq{});
    selection_.assign(static_cast<std::size_t>(cfg_.cap.max_seqs) * g_.max_select, 0);
    sel_count_.assign(cfg_.cap.max_seqs, -1);
    items_.resize(cfg_.cap.max_seqs);
    append_items_.resize(cfg_.cap.max_seqs);
    pending_.resize(cfg_.cap.max_seqs);
    h_pos_.resize(kTile);
    h_rows_.resize(kTile);
    h_rows2_.resize(kTile);
    h_list_.resize(cfg_.cap.max_tokens);
    h_topk_.resize(cfg_.cap.max_tokens);
    upload_pass_tables();
  }

  const Config& config() const { return cfg_; }
  const LayerPlan& layer_plan(int layer) const {
    check_layer(layer);
    return g_.plans[layer];
  }
  std::int64_t length(int layer, int seq) const {
    check_layer(layer);
    check_seq(seq);
    return at(layer, seq).n;
  }
  std::int64_t max_references() const { return g_.max_refs; }
  // Position class of the shared table: 0 sink, 1 reference, 2 latent (once compressed).
  int position_class(std::int64_t pos) const {
    if (pos < 0 || pos >= cfg_.cap.max_tokens)
      throw OrderError("position_class: position " + std::to_string(pos) + " not in [0, max_tokens)");
    return g_.cls[pos];
  }

  // ---- direct access (kernels that read the cache's storage themselves) ----------------------
  // The layout of one layer in the storage buffer (layer_storage.hpp).
  LayerStorage storage(int layer) const {
    check_layer(layer);
    LayerStorage s;
    s.base = store_ + g_.layer_off[layer];
    s.seq_bytes = g_.seq_bytes[layer];
    s.exact = g_.plans[layer].exact;
    const auto& r = g_.reg[layer];
    s.rows = r[int(Region::rows)];
    s.sinks = r[int(Region::sinks)];
    s.ring = r[int(Region::ring)];
    s.refs = r[int(Region::refs)];
    s.lat = r[int(Region::lat)];
    s.scale = r[int(Region::scale)];
    s.ids = r[int(Region::ids)];
    s.n_sinks = cfg_.comp.sinks;
    s.ring_rows = static_cast<int>(g_.ring);
    s.kv_dim = kv();
    s.latent_dim = cfg_.latent_dim();
    s.latent_bits = cfg_.comp.latent_bits;
    s.k = cfg_.comp.k_neighbors;
    s.lat_ld = g_.lat_ld;
    return s;
  }
  // Per position p < max_tokens: (row << 2) | class, class 1 = reference (row in refs), 2 = latent
  // (row in lat), 0 = sink. Depends on positions only: one table serves every layer and sequence.
  std::vector<std::int32_t> position_codes() const {
    // (row << 2) fits int32: preflight() refused max_tokens above kMaxCacheTokens at construction.
    static_assert(kMaxCacheTokens < (std::int64_t(1) << 29), "position codes are (row << 2) | class in int32");
    std::vector<std::int32_t> code(std::size_t(cfg_.cap.max_tokens));
    for (std::size_t p = 0; p < code.size(); ++p)
      code[p] = g_.cls[p] == 0 ? 0 : (g_.row_of[p] << 2) | g_.cls[p];
    return code;
  }
  // Compressed frontier of a sequence in a layer: positions in [sinks, frontier) are references or
  // latents, [frontier, length) are still exact in the ring (exact layers: the length).
  std::int64_t frontier(int layer, int seq) const {
    check_layer(layer);
    check_seq(seq);
    return g_.plans[layer].exact ? at(layer, seq).n : at(layer, seq).c;
  }

  // Forget a sequence in every layer (its slot can take a new sequence).
  void reset(int seq) {
    check_seq(seq);
    for (int l = 0; l < cfg_.model.n_layers; ++l) at(l, seq) = LayerSeq{};
    sel_count_[seq] = -1;
    ++generation_;
  }

  // ---- append ------------------------------------------------------------------------------
  // x: rows [n, kv_dim] of pre-RoPE K (all kv heads) then V (all kv heads); positions must continue
  // each sequence exactly. Everything is checked before anything changes.
  AppendPlan plan_append(int layer, const RaggedBatch<const T>& x) {
    const int B = check_append(layer, x, items_.data(), false);
    // The items live in one cache-owned array: a newer plan overwrites them, so it makes older
    // plans stale (a plan is run once, right after it is made).
    ++generation_;
    return AppendPlan{layer, B, items_.data(), generation_};
  }

  void run_append(const AppendPlan& p, const RaggedBatch<const T>& x) {
    // Generations count per cache, so a plan of another cache can carry this cache's generation:
    // the items pointer says whose plan it is (the array moves with the cache; copies get their own).
    if (p.items != items_.data()) throw OrderError("append plan was made by another cache");
    if (p.generation != generation_) throw OrderError("stale append plan: the cache changed since plan_append");
    run_items(p.layer, p.items, p.n_items, x, false);
  }

  // plan_append + run_append in one call, with the same checks and errors, but the NaN/Inf check's
  // answer is awaited only after the compression passes are queued (they write nothing a reader can
  // see), so the GPU is not left idle while the host waits for it. An outstanding plan of
  // plan_append stays valid when this call fails. (One difference: a device error raised while the
  // passes are queued is reported even if the batch also holds NaN/Inf.)
  void append(int layer, const RaggedBatch<const T>& x) {
    const int B = check_append(layer, x, append_items_.data(), true);
    run_items(layer, append_items_.data(), B, x, true);
  }
  // ---- reconstruct -------------------------------------------------------------------------
  // out[i] = x̂ at positions[i] (device memory, [n, kv_dim]); with rope, K is rotated to its position.
  void reconstruct(int layer, int seq, std::span<const std::int64_t> positions, MatrixView<T> out, bool rope) {
    check_layer(layer);
    check_seq(seq);
    check_matrix(out, static_cast<std::int64_t>(positions.size()), kv(), "reconstruct out");
    const LayerSeq& s = at(layer, seq);
    for (auto p : positions)
      if (p < 0 || p >= s.n)
        throw OrderError("reconstruct: position " + std::to_string(p) + " not in [0, " + std::to_string(s.n) + ")");
    for (std::size_t i = 0; i < positions.size(); i += kTile) {
      const int n = static_cast<int>(std::min<std::size_t>(kTile, positions.size() - i));
      gather_tile(layer, seq, positions.data() + i, n, out.row(static_cast<std::int64_t>(i)), out.ld, rope);
    }
  }

  // ---- attention ---------------------------------------------------------------------------
  // q: rows [n, n_q_heads*head_dim], post-RoPE, positions < the sequence's length in this layer.
  // out: [n, n_q_heads*head_dim]. Follows the policy; attend_dense ignores it (all tokens).
  void attend(int layer, const RaggedBatch<const T>& q, MatrixView<T> out) { attend_impl(layer, q, out, false); }
  void attend_dense(int layer, const RaggedBatch<const T>& q, MatrixView<T> out) { attend_impl(layer, q, out, true); }

  // Positions the last filter layer chose for `seq` (sorted), empty if none yet.
  std::span<const std::int64_t> selection(int seq) const {
    check_seq(seq);
    const auto c = sel_count_[seq];
    return c < 0 ? std::span<const std::int64_t>{}
                 : std::span<const std::int64_t>(selection_.data() + std::size_t(seq) * g_.max_select, std::size_t(c));
  }

  // Positions of the references a compressed token was encoded against (best first); returns how
  // many (0 for sinks, references, tokens still in the window, and exact layers). out: >= k entries.
  int references_of(int layer, int seq, std::int64_t pos, std::span<std::int64_t> out) const {
    check_layer(layer);
    check_seq(seq);
    const LayerSeq& s = at(layer, seq);
    if (pos < 0 || pos >= s.n) throw OrderError("references_of: position " + std::to_string(pos) + " not cached");
    const int k = cfg_.comp.k_neighbors;  // <= kMaxNeighbors: validate() ran in the constructor
    if (static_cast<int>(out.size()) < k) throw ShapeError("references_of: out needs k_neighbors entries");
    if (g_.plans[layer].exact || pos < cfg_.comp.sinks || pos >= s.c || g_.cls[pos] != 2) return 0;
    std::int32_t ids[kMaxNeighbors];
    dev_.to_host(ids, reinterpret_cast<const std::int32_t*>(region_bytes(layer, seq, Region::ids)) + std::int64_t(g_.row_of[pos]) * k,
                 sizeof(std::int32_t) * k);
    int c = 0;
    for (int j = 0; j < k; ++j)
      if (ids[j] >= 0) out[c++] = g_.ref_pos[ids[j]];
    return c;
  }

  // ---- accounting --------------------------------------------------------------------------
  TokenCounts counts() const {
    TokenCounts c;
    for (int l = 0; l < cfg_.model.n_layers; ++l)
      for (int b = 0; b < cfg_.cap.max_seqs; ++b) {
        const LayerSeq& s = at(l, b);
        c.tokens += s.n;
        if (g_.plans[l].exact) {
          c.exact_layer += s.n;
        } else {
          c.sinks += std::min<std::int64_t>(s.n, cfg_.comp.sinks);
          c.recent += s.n - s.c;
          c.references += s.n_refs;
          c.latents += s.n_lat;
        }
        if (g_.plans[l].attend == Attend::pages && s.n > 0) c.pages += (s.n + g_.page - 1) / g_.page;
      }
    return c;
  }
  // What one sequence of n tokens appended from empty would hold in every layer (the classification
  // depends on positions only): for capacity planning and for memory at a given context.
  TokenCounts projected_counts(std::int64_t n) const {
    if (n < 0 || n > cfg_.cap.max_tokens) throw CapacityError("projected_counts: n exceeds max_tokens");
    TokenCounts c;
    const std::int64_t S = cfg_.comp.sinks, B = cfg_.block(), R = cfg_.comp.recent;
    const std::int64_t frontier = n <= S ? n : S + B * std::max<std::int64_t>(0, (n - S - R) / B);
    const std::int64_t refs = frontier > S ? g_.refs_upto[frontier - 1] : 0;
    for (int l = 0; l < cfg_.model.n_layers; ++l) {
      c.tokens += n;
      if (g_.plans[l].exact) {
        c.exact_layer += n;
      } else {
        c.sinks += std::min(n, S);
        c.recent += n - frontier;
        c.references += refs;
        c.latents += frontier - std::min(n, S) - refs;
      }
      if (g_.plans[l].attend == Attend::pages && n > 0) c.pages += (n + g_.page - 1) / g_.page;
    }
    return c;
  }

  ByteModel byte_model(int value_bytes = sizeof(T)) const {
    ByteModel m;
    m.kv_dim = kv();
    m.k_dim = cfg_.model.k_dim();
    m.value_bytes = value_bytes;
    m.latent_dim = cfg_.latent_dim();
    m.latent_bits = cfg_.comp.latent_bits;
    m.k_neighbors = cfg_.comp.k_neighbors;
    m.id_bytes = sizeof(std::int32_t);
    m.scale_bytes = 2 * sizeof(float);
    m.index_bytes = 0;  // the position table is shared by all layers and sequences
    m.ref_norm_bytes = g_.ref_norms ? int(sizeof(float)) : 0;
    return m;
  }
  // value_bytes: price exact rows (and raw latents) at this element size (2 projects to bf16).
  MemoryReport memory(int value_bytes = sizeof(T)) const { return price(counts(), byte_model(value_bytes)); }

 private:
  enum class Region { rows, sinks, ring, refs, lat, scale, ids, pmin, pmax, norms, count_ };
  // Whether compressed layers keep each reference's |r|^2 (Region::norms, float per reference row)
  // for the l2 search: a device whose copy_rows_batch computes them while storing the references
  // (no pass over the store for each search; a search path that does not read them, e.g. the
  // GPU's without tensor cores, leaves them unused).
  static constexpr bool kDeviceKeepsNorms = CopiesRowBatches<Dev, T>;

  struct LayerSeq {
    std::int64_t n = 0;      // tokens appended
    std::int64_t c = 0;      // compressed frontier: [S, c) compressed or references, [c, n) in the ring
    std::int64_t n_refs = 0;
    std::int64_t n_lat = 0;
  };

  struct Geometry {
    std::vector<LayerPlan> plans;
    std::vector<std::uint8_t> cls;          // [max_tokens] 0 sink, 1 reference, 2 latent
    std::vector<std::int32_t> row_of;       // [max_tokens] index within its class store
    std::vector<std::int32_t> refs_upto;    // [max_tokens] references at positions <= p
    std::vector<std::int64_t> ref_pos;      // [max_refs] position of each reference
    std::vector<std::int64_t> lat_pos;      // [max_lat] position of each latent (freed once uploaded)
    // Device copies at the front of the storage buffer, for the compression passes' gathers (no
    // per-pass uploads): int64 ref_pos, ring slot of each reference, lat_pos, ring slot of each
    // latent, then int32 references visible to each latent. Byte offsets; tables_bytes in all.
    std::size_t tab_ref_pos = 0, tab_ref_slot = 0, tab_lat_pos = 0, tab_lat_slot = 0, tab_lat_vis = 0, tables_bytes = 0;
    bool ref_norms = false;                 // Region::norms in compressed layers (kDeviceKeepsNorms, l2)
    std::int64_t max_refs = 0, refs_rows = 0, max_lat = 0, ring = 0, page = 0, max_pages = 0, max_select = 0;
    std::int64_t lat_ld = 0;                // bytes per stored latent
    std::vector<std::size_t> layer_off;     // [L] byte offset of layer's first sequence
    std::vector<std::size_t> seq_bytes;     // [L] bytes per sequence in that layer
    std::vector<std::array<std::size_t, static_cast<int>(Region::count_)>> reg;  // [L] region offsets in a sequence
    std::size_t storage_bytes = 0;
  };

  struct Workspace {
    std::size_t tile_a, tile_b, tile_z, tile_pos, tile_rows, tile_rows2;
    std::size_t blk_x, blk_zx, blk_enc;
    std::size_t att_rows, att_m, att_l, att_acc, att_qpos, scores, topk;
    std::size_t total;
  };

  static std::size_t align(std::size_t x) { return detail::bytes_add(x, 255) & ~std::size_t{255}; }

  // Bytes per stored latent: raw in T, or int8/int4 codes.
  static std::int64_t latent_row_bytes(const Config& cfg) {
    const int bits = cfg.comp.latent_bits;
    return bits == 0 ? std::int64_t(cfg.latent_dim()) * std::int64_t(sizeof(T)) : (std::int64_t(cfg.latent_dim()) * bits + 7) / 8;
  }

  // What the Config decides alone, before anything of size O(max_tokens) is built: validate(), the
  // token limit, and a lower bound of the storage bytes whatever the selector and policy do (every
  // position past the sinks is a reference row or a latent with its scale and ids; a layer is
  // exact or not), which must itself fit in size_t. Returns that bound.
  static std::size_t preflight(const Config& cfg) {
    validate(cfg);
    if (cfg.cap.max_tokens > kMaxCacheTokens)
      throw ConfigError("max_tokens " + std::to_string(cfg.cap.max_tokens) + " is above the cache's limit of " +
                        std::to_string(kMaxCacheTokens) +
                        " (2^29 - 1: positions are coded as (row << 2) | class in int32, and the host position "
                        "tables take about 9 bytes per token)");
    using detail::sat_add;
    using detail::sat_mul;
    const std::size_t N = std::size_t(cfg.cap.max_tokens), S = std::min(std::size_t(cfg.comp.sinks), N);
    const std::size_t row = sat_mul(std::size_t(cfg.model.kv_dim()), sizeof(T));
    const std::size_t ring = std::size_t(cfg.comp.recent) + std::size_t(cfg.block());
    const std::size_t per_latent =
        sat_add(sat_add(std::size_t(latent_row_bytes(cfg)), cfg.comp.latent_bits == 0 ? 0 : 2 * sizeof(float)),
                sat_mul(std::size_t(cfg.comp.k_neighbors), sizeof(std::int32_t)));
    const std::size_t exact = sat_mul(N, row);
    const std::size_t compressed = sat_add(sat_mul(S + ring, row), sat_mul(N - S, std::min(row, per_latent)));
    const std::size_t bound =
        sat_mul(sat_mul(std::min(exact, compressed), std::size_t(cfg.model.n_layers)), std::size_t(cfg.cap.max_seqs));
    if (bound == std::numeric_limits<std::size_t>::max()) detail::layout_overflow();
    return bound;
  }

  // Layer plans and the sizes that follow from them: O(n_layers), no position tables yet.
  static Geometry plan_layers(const Config& cfg, const Pol& pol) {
    Geometry g;
    const int L = cfg.model.n_layers;
    const std::int64_t N = cfg.cap.max_tokens;
    g.plans.resize(L);
    bool any_pages = false;
    for (int l = 0; l < L; ++l) {
      g.plans[l] = pol.plan_layer(l, L);
      const auto& p = g.plans[l];
      if (p.budget < 0 || p.sinks < 0 || p.window < 0) throw ConfigError("policy: negative budget, sinks or window");
      if (p.select_after && p.attend != Attend::all) throw ConfigError("policy: a filter layer must attend to all tokens");
      if (p.attend == Attend::pages) any_pages = true;
      if (p.select_after) g.max_select = std::max<std::int64_t>(g.max_select, p.budget);
    }
    for (int l = 0; l < L; ++l)
      if (g.plans[l].attend == Attend::selected) {
        bool fed = false;
        for (int j = 0; j < l; ++j) fed = fed || g.plans[j].select_after;
        if (!fed) throw ConfigError("policy: layer " + std::to_string(l) + " attends a selection but no earlier layer selects");
      }
    g.page = any_pages ? pol.page_size() : 0;
    if (any_pages && g.page <= 0) throw ConfigError("policy uses pages but page_size() <= 0");
    g.max_pages = any_pages ? (N + g.page - 1) / g.page : 0;
    g.max_select = std::min<std::int64_t>(g.max_select, N);
    g.ring = std::int64_t(cfg.comp.recent) + cfg.block();
    g.lat_ld = latent_row_bytes(cfg);
    return g;
  }

  // The position tables (O(max_tokens): after preflight() and plan_layers()) and the storage layout.
  static void build_tables(const Config& cfg, const Sel& sel, Geometry& g) {
    const int L = cfg.model.n_layers;
    const std::int64_t N = cfg.cap.max_tokens;
    const int S = cfg.comp.sinks;
    g.cls.assign(N, 2);
    g.row_of.assign(N, 0);
    g.refs_upto.assign(N, 0);
    std::int64_t next = sel.next_reference(-1, S), refs = 0;
    for (std::int64_t p = 0; p < N; ++p) {
      if (p < S) {
        g.cls[p] = 0;
        g.row_of[p] = static_cast<std::int32_t>(p);
      } else if (p == next) {
        g.cls[p] = 1;
        g.row_of[p] = static_cast<std::int32_t>(refs++);
        g.ref_pos.push_back(p);
        const std::int64_t nx = sel.next_reference(p, S);
        if (nx <= p) throw ConfigError("reference selector must return increasing positions");
        next = nx;
      } else {
        if (next < p) throw ConfigError("reference selector skipped backwards");
        g.row_of[p] = static_cast<std::int32_t>(p - S - refs);
        g.lat_pos.push_back(p);
      }
      g.refs_upto[p] = static_cast<std::int32_t>(refs);
    }
    g.max_refs = refs;
    g.refs_rows = (refs + 7) / 8 * 8;  // whole groups of 8 rows: a search may score them at once (m_readable)
    g.ref_norms = kDeviceKeepsNorms && cfg.comp.metric == Metric::l2;
    g.max_lat = std::max<std::int64_t>(0, N - S - refs);
    const int bits = cfg.comp.latent_bits;

    using detail::bytes_mul;
    const std::size_t row = bytes_mul(std::size_t(cfg.model.kv_dim()), sizeof(T));
    std::size_t off = 0;
    bool any_compressed = false;
    for (const auto& pl : g.plans) any_compressed = any_compressed || !pl.exact;
    if (any_compressed) {  // the passes' position tables
      auto put = [&](std::size_t& at, std::size_t bytes) {
        at = off;
        off = detail::bytes_add(off, align(bytes));
      };
      put(g.tab_ref_pos, bytes_mul(std::size_t(g.max_refs), sizeof(std::int64_t)));
      put(g.tab_ref_slot, bytes_mul(std::size_t(g.max_refs), sizeof(std::int64_t)));
      put(g.tab_lat_pos, bytes_mul(std::size_t(g.max_lat), sizeof(std::int64_t)));
      put(g.tab_lat_slot, bytes_mul(std::size_t(g.max_lat), sizeof(std::int64_t)));
      put(g.tab_lat_vis, bytes_mul(std::size_t(g.max_lat), sizeof(std::int32_t)));
      g.tables_bytes = off;
    }
    g.layer_off.resize(L);
    g.seq_bytes.resize(L);
    g.reg.resize(L);
    for (int l = 0; l < L; ++l) {
      auto& r = g.reg[l];
      r.fill(0);
      std::size_t o = 0;
      auto put = [&](Region which, std::size_t bytes) {
        r[static_cast<int>(which)] = o;
        o = detail::bytes_add(o, align(bytes));
      };
      if (g.plans[l].exact) {
        put(Region::rows, bytes_mul(std::size_t(N), row));
      } else {
        put(Region::sinks, bytes_mul(std::size_t(std::min<std::int64_t>(S, N)), row));
        put(Region::ring, bytes_mul(std::size_t(g.ring), row));
        put(Region::refs, bytes_mul(std::size_t(g.refs_rows), row));
        put(Region::lat, bytes_mul(std::size_t(g.max_lat), std::size_t(g.lat_ld)));
        put(Region::scale, bits == 0 ? 0 : bytes_mul(std::size_t(g.max_lat), 2 * sizeof(float)));
        put(Region::ids, bytes_mul(std::size_t(g.max_lat), std::size_t(cfg.comp.k_neighbors), sizeof(std::int32_t)));
        put(Region::norms, g.ref_norms ? bytes_mul(std::size_t(g.refs_rows), sizeof(float)) : 0);
      }
      if (g.plans[l].attend == Attend::pages) {
        put(Region::pmin, bytes_mul(std::size_t(g.max_pages), std::size_t(cfg.model.k_dim()), sizeof(T)));
        put(Region::pmax, bytes_mul(std::size_t(g.max_pages), std::size_t(cfg.model.k_dim()), sizeof(T)));
      }
      g.layer_off[l] = off;
      g.seq_bytes[l] = o;
      off = detail::bytes_add(off, bytes_mul(o, std::size_t(cfg.cap.max_seqs)));
    }
    g.storage_bytes = off;
  }

  // Decided by the Config alone (and the encoder's scratch).
  static Workspace workspace_plan(const Config& cfg, std::int64_t enc_scratch) {
    Workspace w{};
    std::size_t o = 0;
    auto put = [&](std::size_t& at, std::size_t bytes) {
      at = o;
      o = detail::bytes_add(o, align(bytes));
    };
    using detail::bytes_mul;
    // All of these are positive ints (validate()) except the encoder's scratch, an int64.
    // B: a pass's positions; its latents and their reference means are encoded together (2B rows)
    const std::size_t D = cfg.model.kv_dim(), dc = cfg.latent_dim(), B = std::size_t(cfg.pass_tokens());
    const std::size_t hq = std::size_t(cfg.model.n_q_heads), hd = cfg.model.head_dim, mq = cfg.cap.max_query_rows;
    const std::size_t tile = kTile;
    put(w.tile_a, bytes_mul(tile, D, sizeof(T)));
    put(w.tile_b, bytes_mul(tile, D, sizeof(T)));
    put(w.tile_z, bytes_mul(tile, dc, sizeof(T)));
    put(w.tile_pos, bytes_mul(tile, sizeof(std::int64_t)));
    put(w.tile_rows, bytes_mul(tile, sizeof(std::int64_t)));
    put(w.tile_rows2, bytes_mul(tile, sizeof(std::int64_t)));
    put(w.blk_x, bytes_mul(2 * B, D, sizeof(T)));
    put(w.blk_zx, bytes_mul(2 * B, dc, sizeof(T)));
    put(w.blk_enc, bytes_mul(detail::count_of(enc_scratch), sizeof(T)));
    put(w.att_rows, bytes_mul(tile, D, sizeof(T)));
    put(w.att_m, bytes_mul(mq, hq, sizeof(accum_t<T>)));
    put(w.att_l, bytes_mul(mq, hq, sizeof(accum_t<T>)));
    put(w.att_acc, bytes_mul(mq, hq, hd, sizeof(accum_t<T>)));
    put(w.att_qpos, bytes_mul(mq, sizeof(std::int64_t)));
    // token scores, or page scores (ceil(max_tokens / page) <= max_tokens pages)
    put(w.scores, bytes_mul(std::size_t(cfg.cap.max_tokens), sizeof(float)));
    put(w.topk, bytes_mul(std::size_t(cfg.cap.max_tokens), sizeof(std::int32_t)));
    w.total = o;
    return w;
  }

  int kv() const { return cfg_.model.kv_dim(); }
  LayerSeq& at(int l, int s) { return st_[std::size_t(l) * cfg_.cap.max_seqs + s]; }
  const LayerSeq& at(int l, int s) const { return st_[std::size_t(l) * cfg_.cap.max_seqs + s]; }

  std::byte* region_bytes(int l, int s, Region r) const {
    return store_ + g_.layer_off[l] + g_.seq_bytes[l] * std::size_t(s) + g_.reg[l][static_cast<int>(r)];
  }
  T* region(int l, int s, Region r) const { return reinterpret_cast<T*>(region_bytes(l, s, r)); }
  template <class U>
  U* ws(std::size_t off) const { return reinterpret_cast<U*>(work_ + off); }

  void check_layer(int layer) const {
    if (layer < 0 || layer >= cfg_.model.n_layers)
      throw ShapeError("layer " + std::to_string(layer) + " not in [0, " + std::to_string(cfg_.model.n_layers) + ")");
  }
  void check_seq(int seq) const {
    if (seq < 0 || seq >= cfg_.cap.max_seqs)
      throw ShapeError("sequence " + std::to_string(seq) + " not in [0, " + std::to_string(cfg_.cap.max_seqs) + ")");
  }
  void check_batch(const RaggedBatch<const T>& x, std::int64_t cols, const char* what) const {
    const std::size_t B = x.seq_ids.size();
    if (x.indptr.size() != B + 1) throw ShapeError(std::string(what) + ": indptr must have seq_ids.size() + 1 entries");
    if (x.indptr[0] != 0 || x.indptr[B] != x.rows.rows)
      throw ShapeError(std::string(what) + ": indptr must start at 0 and end at the row count");
    check_matrix(x.rows, x.rows.rows, cols, what);
    if (x.rows.cols != cols) throw ShapeError(std::string(what) + ": wrong row width");
    if (static_cast<std::int64_t>(x.positions.size()) != x.rows.rows)
      throw ShapeError(std::string(what) + ": one position per row needed");
    for (std::size_t b = 0; b < B; ++b) {
      check_seq(x.seq_ids[b]);
      if (x.indptr[b + 1] < x.indptr[b]) throw ShapeError(std::string(what) + ": indptr must not decrease");
      for (std::size_t j = 0; j < b; ++j)
        if (x.seq_ids[j] == x.seq_ids[b]) throw ShapeError(std::string(what) + ": a sequence appears twice in one batch");
    }
  }

  void copy_contiguous(const T* src, std::int64_t lds, T* dst, std::int64_t n) {
    if (n > 0) dev_.copy_rows(CopyRowsParams<T>{src, lds, nullptr, dst, kv(), nullptr, n, kv()});
  }
  template <class U>
  void upload(std::size_t ws_off, const U* host, std::size_t n) {
    if (n > 0) dev_.to_device(work_ + ws_off, host, n * sizeof(U));
  }

  static NonFiniteError non_finite_append(int layer) {
    return NonFiniteError("append x (layer " + std::to_string(layer) + ") contains NaN or Inf");
  }
  // The checks of an append batch: shapes, then values (NonFiniteError), then positions and
  // capacity, sequence by sequence; the items go to `out` only once all have passed. With
  // finite_later the value check is only started here: run_items() awaits it (a failing host check
  // awaits it first, so the errors keep their order).
  int check_append(int layer, const RaggedBatch<const T>& x, AppendPlan::Item* out, bool finite_later) {
    check_layer(layer);
    check_batch(x, cfg_.model.kv_dim(), "append x");
    const FiniteCheckParams<T> fin{x.rows.data, x.rows.ld, x.rows.rows, static_cast<int>(x.rows.cols)};
    if (finite_later) dev_.start_finite_check(fin);
    else if (!dev_.all_finite(fin)) throw non_finite_append(layer);
    const int B = static_cast<int>(x.seq_ids.size());
    try {
      for (int b = 0; b < B; ++b) {
        const int seq = x.seq_ids[b];
        const std::int64_t r0 = x.indptr[b], r1 = x.indptr[b + 1];
        const LayerSeq& s = at(layer, seq);
        for (std::int64_t r = r0; r < r1; ++r)
          if (x.positions[r] != s.n + (r - r0))
            throw OrderError("layer " + std::to_string(layer) + " seq " + std::to_string(seq) + ": row " +
                             std::to_string(r) + " has position " + std::to_string(x.positions[r]) +
                             ", expected " + std::to_string(s.n + (r - r0)) + " (positions must continue the sequence)");
        if (s.n + (r1 - r0) > cfg_.cap.max_tokens)
          throw CapacityError("seq " + std::to_string(seq) + " would hold " + std::to_string(s.n + (r1 - r0)) +
                              " tokens, capacity is " + std::to_string(cfg_.cap.max_tokens));
      }
    } catch (...) {
      if (finite_later && !dev_.finite_check_result()) throw non_finite_append(layer);
      throw;
    }
    // Only a batch that passed every check may overwrite the items (a failed call changes nothing).
    for (int b = 0; b < B; ++b)
      out[b] = AppendPlan::Item{x.seq_ids[b], x.indptr[b], x.indptr[b + 1] - x.indptr[b], at(layer, x.seq_ids[b]).n};
    return B;
  }

  // Two phases. First what only writes rows past each sequence's counts (invisible until the counts
  // move) or the workspace: exact rows, sinks, the compression passes (on copies of the counts).
  // Then, once an awaited finite check has passed, what overwrites live data (page bounds, the
  // ring's slots) and the counts. A failure before the second phase changes nothing.
  void run_items(int layer, const AppendPlan::Item* items, int n_items, const RaggedBatch<const T>& x, bool finite_pending) {
    const LayerPlan& lp = g_.plans[layer];
    const int S = cfg_.comp.sinks;
    const std::int64_t ring = g_.ring, Bk = cfg_.block(), R = cfg_.comp.recent;
    for (int i = 0; i < n_items; ++i) {
      const auto& it = items[i];
      LayerSeq& s = pending_[i];
      s = at(layer, it.seq);
      const T* src = x.rows.row(it.row_begin);
      if (lp.exact) {
        copy_contiguous(src, x.rows.ld, region(layer, it.seq, Region::rows) + it.start_pos * kv(), it.count);
        continue;
      }
      std::int64_t done = 0;
      if (s.n < S) {  // sinks first
        const std::int64_t take = std::min<std::int64_t>(S - s.n, it.count);
        copy_contiguous(src, x.rows.ld, region(layer, it.seq, Region::sinks) + s.n * kv(), take);
        s.n += take;
        done += take;
        s.c = s.n;
      }
      // The blocks this append completes leave the window now: compressed from the ring (positions
      // before n0) and straight from the input (the rest), passes of up to blocks_per_pass blocks;
      // then (second phase) the positions that stay exact enter the ring. Positions the passes take
      // never touch it.
      const std::int64_t n0 = s.n, n1 = s.n + (it.count - done);
      const std::int64_t blocks = n1 - s.c >= ring ? (n1 - s.c - R) / Bk : 0;
      const T* in = src + done * x.rows.ld;  // the row of position n0
      for (std::int64_t b = 0; b < blocks; b += cfg_.comp.blocks_per_pass)
        compress_pass(layer, it.seq, s, std::min<std::int64_t>(cfg_.comp.blocks_per_pass, blocks - b), in, x.rows.ld, n0);
    }
    if (finite_pending && !dev_.finite_check_result()) throw non_finite_append(layer);
    for (int i = 0; i < n_items; ++i) {
      const auto& it = items[i];
      LayerSeq& s = pending_[i];
      const T* src = x.rows.row(it.row_begin);
      if (lp.attend == Attend::pages) update_pages(layer, it.seq, src, x.rows.ld, it.count, it.start_pos);
      const std::int64_t n1 = it.start_pos + it.count;
      if (!lp.exact) {
        // The passes read the ring before these writes (stream order); n1 - c < ring, so the kept
        // positions take distinct slots, in at most two contiguous pieces.
        const std::int64_t n0 = std::max<std::int64_t>(it.start_pos, std::min<std::int64_t>(S, n1));  // first non-sink row
        const T* in = src + (n0 - it.start_pos) * x.rows.ld;
        CopyRowsBatchParams<T> pieces{};  // at most two (above); kMaxParts >= 4 (compress_pass)
        for (std::int64_t q = std::max(s.c, n0); q < n1;) {
          const std::int64_t slot = (q - S) % ring, piece = std::min(n1 - q, ring - slot);
          pieces.part[pieces.n_parts++] = CopyRowsParams<T>{in + (q - n0) * x.rows.ld, x.rows.ld, nullptr,
                                                            region(layer, it.seq, Region::ring) + slot * kv(), kv(), nullptr,
                                                            piece, kv()};
          q += piece;
        }
        copy_rows_batch(dev_, pieces);
      }
      s.n = n1;
      at(layer, it.seq) = s;
    }
    ++generation_;
  }

  // The position tables the passes gather with, into the front of the storage buffer (once).
  void upload_pass_tables() {
    if (g_.tables_bytes == 0) {  // no compressed layer: no tables
      std::vector<std::int64_t>().swap(g_.lat_pos);
      return;
    }
    const std::int64_t S = cfg_.comp.sinks, ring = g_.ring;
    auto put_slots = [&](std::size_t off, const std::vector<std::int64_t>& pos) {  // ring slot of each position
      std::vector<std::int64_t> slot(pos.size());
      for (std::size_t i = 0; i < pos.size(); ++i) slot[i] = (pos[i] - S) % ring;
      dev_.to_device(store_ + off, slot.data(), slot.size() * sizeof(std::int64_t));
    };
    dev_.to_device(store_ + g_.tab_ref_pos, g_.ref_pos.data(), g_.ref_pos.size() * sizeof(std::int64_t));
    put_slots(g_.tab_ref_slot, g_.ref_pos);
    dev_.to_device(store_ + g_.tab_lat_pos, g_.lat_pos.data(), g_.lat_pos.size() * sizeof(std::int64_t));
    put_slots(g_.tab_lat_slot, g_.lat_pos);
    std::vector<std::int32_t> vis(g_.lat_pos.size());
    for (std::size_t j = 0; j < vis.size(); ++j) vis[j] = g_.refs_upto[g_.lat_pos[j]];
    dev_.to_device(store_ + g_.tab_lat_vis, vis.data(), vis.size() * sizeof(std::int32_t));
    std::vector<std::int64_t>().swap(g_.lat_pos);  // the device copy is the one used
  }
  template <class U>
  const U* table(std::size_t off) const { return reinterpret_cast<const U*>(store_ + off); }

  // The oldest `nblk` blocks of the window leave it (positions [c, c + nblk * block)): references
  // are copied to the reference store, every other token is encoded against the mean of its k
  // nearest earlier references. A position p < n0 is read from the ring (slot (p - S) % ring), a
  // later one from `in` (row p - n0, rows ldi apart). References and latents are stored in position
  // order, and the ring's positions come before the input's, so each store is written in two
  // contiguous pieces. The row lists are slices of the storage's position tables: no host lists,
  // no uploads.
  // s: the sequence's counts, advanced here (run_items() commits them).
  void compress_pass(int l, int seq, LayerSeq& s, std::int64_t nblk, const T* in, std::int64_t ldi, std::int64_t n0) {
    const std::int64_t a = s.c, e = a + nblk * cfg_.block();
    const int D = kv(), dc = cfg_.latent_dim(), k = cfg_.comp.k_neighbors;
    const std::int64_t mid = std::clamp(n0, a, e);  // [a, mid) in the ring, [mid, e) in the input
    T* ring_p = region(l, seq, Region::ring);
    T* refs_p = region(l, seq, Region::refs);
    // references at positions < p (a >= S: the sinks are never in a pass)
    auto refs_before = [&](std::int64_t p) -> std::int64_t { return p > 0 ? g_.refs_upto[p - 1] : 0; };
    const std::int64_t nr = refs_before(e) - refs_before(a), nr_ring = refs_before(mid) - refs_before(a);
    const std::int64_t u = (e - a) - nr, u_ring = (mid - a) - nr_ring;
    // rows [0, n) of the class store from `first` on: the first n_ring from the ring, the rest from
    // the input; the pass's gathers go to the device as one op (one launch on a GPU)
    static_assert(CopyRowsBatchParams<T>::kMaxParts >= 4, "a pass gathers two classes from two sources");
    CopyRowsBatchParams<T> gathers{};
    // (norms: where the rows' |x|^2 go, nullptr for none)
    auto gather = [&](std::size_t pos_tab, std::size_t slot_tab, std::int64_t first, std::int64_t n_ring, std::int64_t n,
                      T* dst, float* norms) {
      if (n_ring > 0) {
        gathers.sq_norms[gathers.n_parts] = norms;
        gathers.part[gathers.n_parts++] =
            CopyRowsParams<T>{ring_p, D, table<std::int64_t>(slot_tab) + first, dst, D, nullptr, n_ring, D};
      }
      if (n > n_ring) {
        gathers.sq_norms[gathers.n_parts] = norms ? norms + n_ring : nullptr;
        gathers.part[gathers.n_parts++] = CopyRowsParams<T>{
            in, ldi, table<std::int64_t>(pos_tab) + first + n_ring, dst + n_ring * D, D, nullptr, n - n_ring, D, n0};
      }
    };
    // 1. references (rows s.n_refs, s.n_refs + 1, ...; their norms kept where the device gives
    // them); 2. the others, in position order, into X (their latent rows are s.n_lat, ...)
    // (kept whatever path the device's search takes now: it may switch paths between passes, e.g.
    // set_tensor_cores, and a path that reads them must find every reference's)
    float* norms_p = g_.ref_norms ? reinterpret_cast<float*>(region_bytes(l, seq, Region::norms)) : nullptr;
    gather(g_.tab_ref_pos, g_.tab_ref_slot, s.n_refs, nr_ring, nr, refs_p + s.n_refs * D, norms_p ? norms_p + s.n_refs : nullptr);
    T* X = ws<T>(ws_.blk_x);
    if (u > 0) gather(g_.tab_lat_pos, g_.tab_lat_slot, s.n_lat, u_ring, u, X, nullptr);
    copy_rows_batch(dev_, gathers);
    const std::int64_t m = s.n_refs + nr;
    if (u > 0) {
      const std::int64_t lat0 = s.n_lat;
      // X (u rows) and the reference means below it, encoded in one call; the latents into Zx (the
      // generic path: f_c(x) into Zx, the means' f_c into Zr below it)
      T* Rm = X + u * D;
      T* Zx = ws<T>(ws_.blk_zx);
      T* Zr = Zx + u * dc;
      auto* ids = reinterpret_cast<std::int32_t*>(region_bytes(l, seq, Region::ids)) + lat0 * k;
      dev_.ref_search(RefSearchParams<T>{X, D, u, refs_p, D, m, table<std::int32_t>(g_.tab_lat_vis) + lat0, D, k,
                                         cfg_.comp.metric, ids, g_.refs_rows, norms_p});
      dev_.gather_mean(GatherMeanParams<T>{ids, k, u, nullptr, refs_p, D, D, Rm, D});
      const int bits = cfg_.comp.latent_bits;
      // where the u latents go: rows of T (bits 0), or codes and their scale / min
      auto lat = [&] { return region(l, seq, Region::lat) + lat0 * dc; };
      auto quantize = [&](const T* sub) {
        auto* q = reinterpret_cast<std::uint8_t*>(region_bytes(l, seq, Region::lat)) + lat0 * g_.lat_ld;
        auto* sm = reinterpret_cast<float*>(region_bytes(l, seq, Region::scale)) + lat0 * 2;
        dev_.quantize(QuantizeParams<T>{Zx, dc, u, dc, bits, q, g_.lat_ld, sm, sub, sub ? dc : 0});
      };
      if constexpr (EncodesResiduals<Enc, T>) {  // z = f_c(x) - f_c(ref) in one call, the last map once
        enc_[l].encode_residual(dev_, MatrixView<T>{X, 2 * u, D, D}, MatrixView<T>{bits == 0 ? lat() : Zx, u, dc, dc},
                                ws<T>(ws_.blk_enc));
        if (bits != 0) quantize(nullptr);
      } else {
        enc_[l].encode(dev_, MatrixView<const T>{X, 2 * u, D, D}, MatrixView<T>{Zx, 2 * u, dc, dc}, ws<T>(ws_.blk_enc));
        if (bits == 0) {
          dev_.axpy_rows(AxpyRowsParams<T>{Zr, dc, Zx, dc, u, dc, T(-1)});
          dev_.copy_rows(CopyRowsParams<T>{Zx, dc, nullptr, lat(), dc, nullptr, u, dc});
        } else {  // z = Zx - Zr, rounded as axpy_rows would, quantized in the same pass
          quantize(Zr);
        }
      }
    }
    s.c = e;
    s.n_refs = m;
    s.n_lat += u;
  }

  // Rows for positions pos[0..n) (host list, n <= kTile) into out [n, kv_dim] (device).
  void gather_tile(int l, int seq, const std::int64_t* pos, int n, T* out, std::int64_t ldo, bool rope) {
    const LayerSeq& s = at(l, seq);
    const int D = kv(), S = cfg_.comp.sinks;
    if (g_.plans[l].exact) {
      upload(ws_.tile_rows, pos, n);
      dev_.copy_rows(CopyRowsParams<T>{region(l, seq, Region::rows), D, ws<std::int64_t>(ws_.tile_rows), out, ldo,
                                       nullptr, n, D});
    } else {
      // One pass per storage class: source rows and destination rows.
      auto pass = [&](auto pick, Region r) {
        int c = 0;
        for (int i = 0; i < n; ++i) {
          const std::int64_t src = pick(pos[i]);
          if (src < 0) continue;
          h_rows_[c] = src;
          h_rows2_[c] = i;
          ++c;
        }
        if (c == 0) return 0;
        upload(ws_.tile_rows, h_rows_.data(), c);
        upload(ws_.tile_rows2, h_rows2_.data(), c);
        if (r != Region::lat)
          dev_.copy_rows(CopyRowsParams<T>{region(l, seq, r), D, ws<std::int64_t>(ws_.tile_rows), out, ldo,
                                           ws<std::int64_t>(ws_.tile_rows2), c, D});
        return c;
      };
      pass([&](std::int64_t p) -> std::int64_t { return p < S ? p : -1; }, Region::sinks);
      pass([&](std::int64_t p) -> std::int64_t { return p >= s.c && p >= S ? (p - S) % g_.ring : -1; }, Region::ring);
      pass([&](std::int64_t p) -> std::int64_t { return p >= S && p < s.c && g_.cls[p] == 1 ? g_.row_of[p] : -1; },
           Region::refs);
      const int c = pass([&](std::int64_t p) -> std::int64_t { return p >= S && p < s.c && g_.cls[p] == 2 ? g_.row_of[p] : -1; },
                         Region::lat);
      if (c > 0) decode_latents(l, seq, c, out, ldo);
    }
    if (rope && cfg_.rope.style != RopeStyle::none) {
      upload(ws_.tile_pos, pos, n);
      dev_.rope(RopeParams<T>{out, ldo, n, ws<std::int64_t>(ws_.tile_pos), cfg_.model.n_kv_heads, cfg_.model.head_dim,
                              cfg_.rot_dim(), cfg_.rope.style, cfg_.rope.theta});
    }
  }

  // Latent rows listed in tile_rows (c of them) -> x̂ = f_d(z) + mean(refs) into out rows tile_rows2.
  void decode_latents(int l, int seq, int c, T* out, std::int64_t ldo) {
    const int D = kv(), dc = cfg_.latent_dim(), k = cfg_.comp.k_neighbors;
    T* Z = ws<T>(ws_.tile_z);
    T* A = ws<T>(ws_.tile_a);
    T* Bm = ws<T>(ws_.tile_b);
    const auto* lat_rows = ws<std::int64_t>(ws_.tile_rows);
    if (cfg_.comp.latent_bits == 0) {
      dev_.copy_rows(CopyRowsParams<T>{region(l, seq, Region::lat), dc, lat_rows, Z, dc, nullptr, c, dc});
    } else {
      dev_.dequantize(DequantizeParams<T>{reinterpret_cast<const std::uint8_t*>(region_bytes(l, seq, Region::lat)),
                                          g_.lat_ld, reinterpret_cast<const float*>(region_bytes(l, seq, Region::scale)),
                                          dc, cfg_.comp.latent_bits, lat_rows, c, Z, dc});
    }
    dec_[l].decode(dev_, MatrixView<const T>{Z, c, dc, dc}, MatrixView<T>{A, c, D, D});
    dev_.gather_mean(GatherMeanParams<T>{reinterpret_cast<const std::int32_t*>(region_bytes(l, seq, Region::ids)), k, c,
                                         lat_rows, region(l, seq, Region::refs), D, D, Bm, D});
    dev_.axpy_rows(AxpyRowsParams<T>{Bm, D, A, D, c, D, T(1)});
    dev_.copy_rows(CopyRowsParams<T>{A, D, nullptr, out, ldo, ws<std::int64_t>(ws_.tile_rows2), c, D});
  }

  // Quest metadata: fold the post-RoPE keys of newly appended rows into their pages.
  void update_pages(int l, int seq, const T* src, std::int64_t lds, std::int64_t count, std::int64_t start) {
    const int D = kv();
    for (std::int64_t i = 0; i < count; i += kTile) {
      const int n = static_cast<int>(std::min<std::int64_t>(kTile, count - i));
      for (int j = 0; j < n; ++j) h_pos_[j] = start + i + j;
      T* A = ws<T>(ws_.tile_a);
      copy_contiguous(src + i * lds, lds, A, n);
      upload(ws_.tile_pos, h_pos_.data(), n);
      if (cfg_.rope.style != RopeStyle::none)
        dev_.rope(RopeParams<T>{A, D, n, ws<std::int64_t>(ws_.tile_pos), cfg_.model.n_kv_heads, cfg_.model.head_dim,
                                cfg_.rot_dim(), cfg_.rope.style, cfg_.rope.theta});
      dev_.page_bounds(PageBoundsParams<T>{A, D, n, ws<std::int64_t>(ws_.tile_pos), static_cast<int>(g_.page),
                                           cfg_.model.k_dim(), region(l, seq, Region::pmin), region(l, seq, Region::pmax)});
    }
  }

  // The attended positions of one sequence for a non-dense plan, sorted, into h_list_.
  std::int64_t attended_positions(int l, int seq, const LayerPlan& p, const RaggedBatch<const T>& q, std::int64_t r0,
                                  std::int64_t nq, std::int64_t n) {
    std::int64_t c = 0;
    std::vector<std::int64_t>& list = h_list_;
    const std::int64_t s_end = std::min<std::int64_t>(p.sinks, n), w_begin = std::max<std::int64_t>(s_end, n - p.window);
    for (std::int64_t i = 0; i < s_end; ++i) list[c++] = i;
    if (p.attend == Attend::selected) {
      if (sel_count_[seq] < 0)
        throw OrderError("layer " + std::to_string(l) + " attends a selection, but no filter layer has run for seq " +
                         std::to_string(seq));
      for (auto pos : selection(seq))
        if (pos >= s_end && pos < w_begin) list[c++] = pos;
    } else if (p.attend == Attend::pages) {
      const std::int64_t n_pages = (n + g_.page - 1) / g_.page;
      dev_.page_score(PageScoreParams<T>{q.rows.row(r0), q.rows.ld, static_cast<int>(nq), region(l, seq, Region::pmin),
                                         region(l, seq, Region::pmax), n_pages, cfg_.model.n_q_heads,
                                         cfg_.model.n_kv_heads, cfg_.model.head_dim, ws<float>(ws_.scores)});
      const int kp = static_cast<int>(std::min<std::int64_t>(n_pages, std::max<std::int64_t>(1, p.budget / g_.page)));
      dev_.topk(TopKParams{ws<float>(ws_.scores), n_pages, kp, ws<std::int32_t>(ws_.topk)});
      dev_.to_host(h_topk_.data(), ws<std::int32_t>(ws_.topk), kp * sizeof(std::int32_t));
      std::sort(h_topk_.begin(), h_topk_.begin() + kp);
      for (int i = 0; i < kp; ++i)
        for (std::int64_t pos = std::int64_t(h_topk_[i]) * g_.page; pos < std::min<std::int64_t>(n, (h_topk_[i] + 1) * g_.page); ++pos)
          if (pos >= s_end && pos < w_begin) list[c++] = pos;
    }
    for (std::int64_t i = w_begin; i < n; ++i) list[c++] = i;
    return c;
  }

  void attend_impl(int l, const RaggedBatch<const T>& q, MatrixView<T> out, bool force_dense) {
    check_layer(l);
    const int hq = cfg_.model.n_q_heads, hd = cfg_.model.head_dim, qd = hq * hd;
    check_batch(q, qd, "attend q");
    check_matrix(out, q.rows.rows, qd, "attend out");
    if (!dev_.all_finite(FiniteCheckParams<T>{q.rows.data, q.rows.ld, q.rows.rows, qd}))
      throw NonFiniteError("attend q (layer " + std::to_string(l) + ") contains NaN or Inf");
    for (std::size_t b = 0; b < q.seq_ids.size(); ++b) {
      const std::int64_t nq = q.indptr[b + 1] - q.indptr[b];
      if (nq > cfg_.cap.max_query_rows)
        throw CapacityError("attend: " + std::to_string(nq) + " query rows for one sequence, max_query_rows is " +
                            std::to_string(cfg_.cap.max_query_rows));
      const std::int64_t n = at(l, q.seq_ids[b]).n;
      for (std::int64_t r = q.indptr[b]; r < q.indptr[b + 1]; ++r)
        if (q.positions[r] < 0 || q.positions[r] >= n)
          throw OrderError("attend: query position " + std::to_string(q.positions[r]) + " of seq " +
                           std::to_string(q.seq_ids[b]) + " is not cached in layer " + std::to_string(l) +
                           " (append its K/V first)");
    }
    const LayerPlan& p = g_.plans[l];
    const double scale = 1.0 / std::sqrt(double(hd));
    const int D = kv(), kd = cfg_.model.k_dim();
    using A = accum_t<T>;
    for (std::size_t b = 0; b < q.seq_ids.size(); ++b) {
      const int seq = q.seq_ids[b];
      const std::int64_t r0 = q.indptr[b], nq = q.indptr[b + 1] - r0;
      if (nq == 0) continue;
      const std::int64_t n = at(l, seq).n;
      std::int64_t qmax = 0;
      for (std::int64_t r = r0; r < r0 + nq; ++r) qmax = std::max(qmax, q.positions[r]);
      const bool dense = force_dense || p.attend == Attend::all;
      const std::int64_t n_att = dense ? qmax + 1 : attended_positions(l, seq, p, q, r0, nq, qmax + 1);
      upload(ws_.att_qpos, q.positions.data() + r0, nq);
      dev_.fill_zero(ws<A>(ws_.att_m), nq * hq * sizeof(A));
      dev_.fill_zero(ws<A>(ws_.att_l), nq * hq * sizeof(A));
      dev_.fill_zero(ws<A>(ws_.att_acc), nq * hq * hd * sizeof(A));
      for (std::int64_t t = 0; t < n_att; t += kTile) {
        const int nt = static_cast<int>(std::min<std::int64_t>(kTile, n_att - t));
        for (int j = 0; j < nt; ++j) h_pos_[j] = dense ? t + j : h_list_[t + j];
        T* rows = attn_rows();
        gather_tile(l, seq, h_pos_.data(), nt, rows, D, true);
        upload(ws_.tile_pos, h_pos_.data(), nt);  // gather_tile uploads them only when RoPE runs
        dev_.attn_tile(AttnTileParams<T>{q.rows.row(r0), q.rows.ld, static_cast<int>(nq), ws<std::int64_t>(ws_.att_qpos),
                                         rows, rows + kd, D, nt, ws<std::int64_t>(ws_.tile_pos), hq,
                                         cfg_.model.n_kv_heads, hd, scale, ws<A>(ws_.att_m), ws<A>(ws_.att_l),
                                         ws<A>(ws_.att_acc)});
      }
      dev_.attn_finish(AttnFinishParams<T>{ws<A>(ws_.att_l), ws<A>(ws_.att_acc), static_cast<int>(nq), hq, hd,
                                           out.row(r0), out.ld});
      if (p.select_after && !force_dense) select_top(l, seq, p, q, r0, nq, n);
    }
  }

  T* attn_rows() { return ws<T>(ws_.att_rows); }

  // OmniKV filter: score the middle tokens (not sinks, not window) by the softmax probability the
  // queries give them (max over heads and rows) and keep the top budget.
  void select_top(int l, int seq, const LayerPlan& p, const RaggedBatch<const T>& q, std::int64_t r0, std::int64_t nq,
                  std::int64_t n) {
    const int hq = cfg_.model.n_q_heads, hd = cfg_.model.head_dim, D = kv();
    const std::int64_t s_end = std::min<std::int64_t>(p.sinks, n), w_begin = std::max<std::int64_t>(s_end, n - p.window);
    const std::int64_t n_cand = w_begin - s_end;
    std::int64_t* dst = selection_.data() + std::size_t(seq) * g_.max_select;
    const int kk = static_cast<int>(std::min<std::int64_t>(p.budget, n_cand));
    if (kk <= 0) {
      sel_count_[seq] = 0;
      return;
    }
    using A = accum_t<T>;
    float* scores = ws<float>(ws_.scores);
    for (std::int64_t t = 0; t < n_cand; t += kTile) {
      const int nt = static_cast<int>(std::min<std::int64_t>(kTile, n_cand - t));
      for (int j = 0; j < nt; ++j) h_pos_[j] = s_end + t + j;
      T* rows = attn_rows();
      gather_tile(l, seq, h_pos_.data(), nt, rows, D, true);
      upload(ws_.tile_pos, h_pos_.data(), nt);
      dev_.score_tile(ScoreTileParams<T>{q.rows.row(r0), q.rows.ld, static_cast<int>(nq), ws<std::int64_t>(ws_.att_qpos),
                                         rows, D, nt, ws<std::int64_t>(ws_.tile_pos), hq, cfg_.model.n_kv_heads, hd,
                                         1.0 / std::sqrt(double(hd)), ws<A>(ws_.att_m), ws<A>(ws_.att_l), scores + t});
    }
    dev_.topk(TopKParams{scores, n_cand, kk, ws<std::int32_t>(ws_.topk)});
    dev_.to_host(h_topk_.data(), ws<std::int32_t>(ws_.topk), kk * sizeof(std::int32_t));
    for (int i = 0; i < kk; ++i) dst[i] = s_end + h_topk_[i];
    std::sort(dst, dst + kk);
    sel_count_[seq] = kk;
  }

  Dev& dev_;  // not owned; const methods may still read device memory through it
  Config cfg_;
  Sel sel_;
  Pol pol_;
  std::vector<Enc> enc_;
  std::vector<Dec> dec_;
  Geometry g_;
  Workspace ws_{};
  std::byte* store_ = nullptr;
  std::byte* work_ = nullptr;
  std::vector<LayerSeq> st_;
  std::vector<std::int64_t> selection_;  // [max_seqs, max_select]
  std::vector<std::int64_t> sel_count_;  // [max_seqs], -1: none yet
  std::vector<AppendPlan::Item> items_, append_items_;  // plan_append's, append()'s
  std::vector<LayerSeq> pending_;                        // run_items' counts before they are committed
  // host staging, sized at construction
  std::vector<std::int64_t> h_pos_, h_rows_, h_rows2_, h_list_;
  std::vector<std::int32_t> h_topk_;
  std::uint64_t generation_ = 1;
};

}  // namespace deltakv
