#pragma once
// Exact memory accounting: what the cache holds, by class, in bytes. Counts come from the cache;
// the byte model says what one item of each class costs, so the same counts can be priced at the
// cache's own element size or projected to bf16 storage.
#include <cstdint>

namespace deltakv {

struct TokenCounts {  // summed over layers and sequences
  std::int64_t tokens = 0;        // token-layers appended
  std::int64_t sinks = 0;         // exact: first tokens
  std::int64_t recent = 0;        // exact: not yet compressed (window + pending block)
  std::int64_t references = 0;    // exact: reference tokens
  std::int64_t exact_layer = 0;   // exact: tokens of layers the policy keeps uncompressed
  std::int64_t latents = 0;       // compressed tokens
  std::int64_t pages = 0;         // Quest pages with min/max metadata
};

struct ByteModel {
  int kv_dim = 0;
  int k_dim = 0;             // page bounds cover K only
  int value_bytes = 2;       // exact K/V element (2: bf16)
  int latent_dim = 0;
  int latent_bits = 0;       // 0: latents stored as value_bytes elements
  int k_neighbors = 4;
  int id_bytes = 4;          // one reference id
  int scale_bytes = 8;       // per quantized latent: scale + min (2 x f32)
  int index_bytes = 4;       // per token: where its row lives
  int ref_norm_bytes = 0;    // per reference: its |r|^2, where the cache keeps it (GPU caches, l2 search)

  std::int64_t latent_payload() const {
    return latent_bits == 0 ? std::int64_t{latent_dim} * value_bytes
                            : (std::int64_t{latent_dim} * latent_bits + 7) / 8;
  }
};

struct MemoryReport {
  std::int64_t tokens = 0;
  std::int64_t sinks = 0, recent = 0, references = 0, exact_layers = 0;  // bytes of exact rows
  std::int64_t latents = 0, reference_ids = 0, scales = 0;               // bytes of compressed tokens
  std::int64_t reference_norms = 0;                                      // bytes of the references' norms
  std::int64_t page_metadata = 0, index = 0;
  std::int64_t total = 0;
  std::int64_t dense = 0;  // the same tokens stored uncompressed at value_bytes
  double ratio() const { return dense > 0 ? static_cast<double>(total) / static_cast<double>(dense) : 0.0; }
};

inline MemoryReport price(const TokenCounts& c, const ByteModel& m) {
  MemoryReport r;
  const std::int64_t row = std::int64_t{m.kv_dim} * m.value_bytes;
  r.tokens = c.tokens;
  r.sinks = c.sinks * row;
  r.recent = c.recent * row;
  r.references = c.references * row;
  r.exact_layers = c.exact_layer * row;
  r.latents = c.latents * m.latent_payload();
  r.reference_ids = c.latents * std::int64_t{m.k_neighbors} * m.id_bytes;
  r.scales = m.latent_bits == 0 ? 0 : c.latents * m.scale_bytes;
  r.page_metadata = c.pages * 2 * std::int64_t{m.k_dim} * m.value_bytes;
  r.index = c.tokens * m.index_bytes;
  r.reference_norms = c.references * m.ref_norm_bytes;
  r.total = r.sinks + r.recent + r.references + r.exact_layers + r.latents + r.reference_ids +
            r.scales + r.page_metadata + r.index + r.reference_norms;
  r.dense = c.tokens * row;
  return r;
}

// The paper's KR for one compressed layer of n tokens, fixed stride s: the share of dense bytes kept,
// counting exact rows and latent payloads only (ids, scales and indexes are what price() adds).
inline double kr_formula(std::int64_t n, int sinks, int recent, int stride, int kv_dim, int latent_dim,
                         int latent_bits, int value_bytes) {
  if (n <= 0) return 0.0;
  const std::int64_t exact_tail = n - sinks < recent ? (n > sinks ? n - sinks : 0) : recent;
  const std::int64_t middle = n > sinks ? n - sinks - exact_tail : 0;
  const std::int64_t refs = (middle + stride - 1) / stride;
  const double exact = static_cast<double>((n < sinks ? n : sinks) + exact_tail + refs);
  const double lat_bytes = latent_bits == 0 ? double(latent_dim) * value_bytes : latent_dim * latent_bits / 8.0;
  return (exact * kv_dim * value_bytes + double(middle - refs) * lat_bytes) /
         (double(n) * kv_dim * value_bytes);
}

}  // namespace deltakv
