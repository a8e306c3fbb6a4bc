#pragma once
// Where one layer of a CompressedCache lives in the caller's storage buffer, for kernels that read
// the cache directly (the fused GPU decode step: deltakv/gpu/decode_step.hpp). Plain data.
//
// Sequence s of the layer starts at base + s * seq_bytes; each region at its byte offset in that
// block. Exact layers use `rows` only ([max_tokens, kv_dim] of T, row = position). Compressed
// layers use the others:
//   sinks [min(S, max_tokens), kv_dim] T      ring [ring_rows, kv_dim] T, slot (p - S) % ring_rows
//   refs  [max_refs, kv_dim] T (room for max_refs rounded up to 8 rows)
//   lat   [max_lat, lat_ld bytes] (raw T or int8/int4 codes)
//   scale [max_lat, 2] f32 (scale, min)       ids  [max_lat, k] int32 (-1: fewer references)
// Positions below the compressed frontier (CompressedCache::frontier) and past the sinks are in refs
// or lat as CompressedCache::position_codes says; positions at or past it are in the ring.
#include <cstddef>
#include <cstdint>

namespace deltakv {

struct LayerStorage {
  const std::byte* base = nullptr;
  std::size_t seq_bytes = 0;
  bool exact = false;
  std::size_t rows = 0, sinks = 0, ring = 0, refs = 0, lat = 0, scale = 0, ids = 0;  // byte offsets
  int n_sinks = 0, ring_rows = 0, kv_dim = 0, latent_dim = 0, latent_bits = 0, k = 0;
  std::int64_t lat_ld = 0;  // bytes per stored latent
};

}  // namespace deltakv
