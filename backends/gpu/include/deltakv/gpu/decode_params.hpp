#pragma once
// Plain-data parameters of the fused decode-step kernels (deltakv/gpu/decode_kernels.cuh): one
// query token per sequence, a batch of sequences, one layer per launch. Host code (an engine, the
// cache, tests) fills them; nothing here needs a GPU compiler.
//
// Storage is the cache's own (include/deltakv/cache.hpp): pre-RoPE rows x = [K of all kv heads |
// V of all kv heads] (kv_dim = 2 * Hkv * D elements, row-major), RoPE applied to K on chip.
// All pointers are device pointers. Shapes are in the comments; B = batch, Hq / Hkv = query /
// kv heads, D = head_dim, G = Hq / Hkv.
#include <cstddef>
#include <cstdint>

#include "deltakv/config.hpp"

namespace deltakv::gpu::decode {

// cos/sin of angle p * inv_f by angle addition of two small tables, so that every position up to
// 64 * hi_rows costs (hi_rows + 64) * half entries (L2-resident) and no transcendental on chip:
//   hi[((p >> 6) * half + f) * 2 + {0,1}] = cos, sin of (p & ~63) * inv_f
//   lo[((p & 63) * half + f) * 2 + {0,1}] = cos, sin of (p & 63) * inv_f
// inv_f = theta^(-2f / rot_dim); the tables are computed in double on the host (rope_table() in
// decode_step.hpp). The sparse kernels compute their keys' cos/sin instead where freq is given.
struct RopeTableView {
  const float* hi = nullptr;
  const float* lo = nullptr;
  int half = 0;                // rot_dim / 2 (the fused kernels need rot_dim == head_dim)
  std::int64_t max_pos = 0;    // positions < max_pos are covered
  // Optional: freq[2 f], freq[2 f + 1] = inv_f / (2 pi) as a float pair (hi + lo, rope_table's freq):
  // 2 * half floats, 16-byte aligned. With it the sparse kernels compute their keys' cos/sin (reduced
  // in turns, __sincosf; positions below 2^24) instead of reading the tables, whose rows of scattered
  // positions miss the sparse kernel's small L1 (rope_sincos in decode_kernels.cuh).
  const float* freq = nullptr;
};

// Scratch of one split-KV pass, read by the combine kernel: [B, Hq, n_splits, D + 2] floats,
// per (sequence, q head, split): the unnormalized accumulator (D), the running max m and sum l.
inline std::size_t partials_floats(int batch, int n_q_heads, int n_splits, int head_dim) {
  return std::size_t(batch) * n_q_heads * n_splits * (head_dim + 2);
}

// Dense decode attention over exact rows (a full layer): sequence b's row p (position p) is at
// kv + b * seq_stride + p * kv_dim. Attends positions [0, n[b]). Optionally writes every logit
// (scale * q . RoPE(k)) for the OmniKV filter: logits[(b * Hq + h) * ld_logits + p], as IEEE binary16
// (f16) bits: 11 significant bits (a relative rounding of at most 2^-11), values beyond +-65504
// saturated. Why not f32: at Llama 128K x 8 the filter layer writes and the selection reads 134 MB of
// them, and half of that took 0.038 ms (20%) off the filter layer's extra time (H100); the selection
// only ranks them, and its ties go to the lower position either way.
template <class T>
struct DenseDecodeParams {
  const T* q = nullptr; std::int64_t ldq = 0;      // [B, Hq * D], post-RoPE
  const T* kv = nullptr; std::int64_t seq_stride = 0;  // elements between sequences
  const std::int32_t* n = nullptr;                 // [B] tokens (the query's own token included)
  int batch = 0, n_q_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 0.f;
  RopeTableView rope{}; RopeStyle style = RopeStyle::half;
  int split_len = 0, n_splits = 0;                 // tokens per split; n_splits * split_len >= max n
  float* part = nullptr;                           // partials_floats(B, Hq, n_splits, D)
  std::uint16_t* logits = nullptr; std::int64_t ld_logits = 0;  // optional [B, Hq, ld_logits] f16 bits
  // Kernel: tensor cores (dense_mma.cuh) where the vendor has them, the split length is a multiple
  // of 64, and kv, q, seq_stride and ldq keep 16-byte alignment (dense_mma_fits); otherwise, or with
  // lane_kernel set (tests, timing comparisons), the CUDA-core lane kernel. Same partials either way.
  bool lane_kernel = false;
};

// Merge the splits: out[b, h*D + d] = sum_s acc e^(m_s - M) / sum_s l_s e^(m_s - M); lse[b*Hq+h]
// = M + log(L) when lse is not null. A head that saw nothing gives zeros (and lse = -inf).
template <class T>
struct CombineParams {
  const float* part = nullptr; int n_splits = 0;
  int batch = 0, n_q_heads = 0, head_dim = 0;
  T* out = nullptr; std::int64_t ldo = 0;          // [B, Hq * D]
  float* lse = nullptr;                            // [B, Hq] or nullptr
};

// How select_topk runs (see SelectParams::path): one_block = score_keys + one block per sequence;
// multi_block = (chunks, B) blocks over SelectParams::work; cluster = one launch of a cluster of
// blocks per sequence, keys never leaving shared memory (CUDA sm_90).
enum class SelectPath : int { automatic = 0, one_block, multi_block, cluster };

// OmniKV filter: score the middle positions [sinks, n - window) of each sequence by the largest
// softmax probability any query head gives them, exp(logit - lse), and keep the k best (ties to
// the lower position), written in ascending position order.
struct SelectParams {
  const std::uint16_t* logits = nullptr; std::int64_t ld_logits = 0;  // f16 bits, from DenseDecodeParams
  const float* lse = nullptr;                                 // from CombineParams
  const std::int32_t* n = nullptr;
  int batch = 0, n_q_heads = 0, sinks = 0, window = 0, k = 0;
  std::uint32_t* keys = nullptr; std::int64_t ld_keys = 0;     // scratch [B, ld_keys >= max n]
  std::int32_t* sel = nullptr; std::int64_t ld_sel = 0;        // out [B, ld_sel >= k]
  std::int32_t* sel_count = nullptr;                           // out [B]
  // Optional scratch of select_work_words(batch, max n) words: with it (and path automatic or
  // multi_block) the selection runs over (chunks, B) blocks (five small launches and a memset).
  std::uint32_t* work = nullptr;
  // Which kernels run (all give the same selection). automatic: multi_block where work is given,
  // else cluster where the device and build have clusters (sm_90) and the sequence fits (keys kept
  // in the cluster's shared memory, about 56K positions per block), else one_block.
  SelectPath path = SelectPath::automatic;
  int cluster = 0;  // blocks per sequence on the cluster path: 0 = automatic (16 up to batch 4 where
                    // the device runs that many such clusters at once, else 8); above 8 is non-portable
};

// One compressed layer of the cache, all sequences: sequence b's regions start at
// base + b * seq_bytes, each at its byte offset (the layout CompressedCache::layout() sizes; the
// cache does not hand out this view yet, so the tests and the benchmark build it themselves):
//   sinks [sinks, kv_dim] T   ring [ring, kv_dim] T (slot (p - sinks) % ring)   refs [., kv_dim] T
//   lat [., lat_ld bytes] (latent_bits 0: T values; 8 / 4: codes, int4 low nibble first)
//   scale [., 2] f32 (scale, min; latent_bits > 0)   ids [., k] int32 (-1: fewer references)
// pos_code[p] (shared by all sequences and layers) classifies a compressed position p:
// (row << 2) | cls with cls 1 = reference (row in refs), 2 = latent (row in lat).
// Positions p >= c[b] (the compressed frontier) are still in the ring.
template <class T>
struct CompressedLayerView {
  const std::byte* base = nullptr; std::size_t seq_bytes = 0;
  std::size_t off_sinks = 0, off_ring = 0, off_refs = 0, off_lat = 0, off_scale = 0, off_ids = 0;
  int sinks = 0, ring = 0, latent_dim = 0, latent_bits = 0, k = 0;
  std::int64_t lat_ld = 0;
  const std::int32_t* pos_code = nullptr;
  const T* w_dec = nullptr;                        // f_d weight [kv_dim, latent_dim]
  const T* b_dec = nullptr;                        // f_d bias [kv_dim] or nullptr
};

// Sparse decode attention over one compressed layer: positions [0, sinks) + sel[b][0, sel_count[b])
// + [n - window, n), each rebuilt on chip (latents: x = f_d(z) + mean of its references; K gets
// RoPE). V is never rebuilt per token: sum_t p_t (W_v z_t) = W_v (sum_t p_t z_t).
template <class T>
struct SparseDecodeParams {
  const T* q = nullptr; std::int64_t ldq = 0;      // [B, Hq * D], post-RoPE
  CompressedLayerView<T> layer{};
  const std::int32_t* n = nullptr;                 // [B] tokens in this layer
  const std::int32_t* c = nullptr;                 // [B] compressed frontier in this layer
  const std::int32_t* sel = nullptr; std::int64_t ld_sel = 0; const std::int32_t* sel_count = nullptr;
  int batch = 0, n_q_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 0.f;
  RopeTableView rope{}; RopeStyle style = RopeStyle::half;
  int sinks = 0, window = 0;                       // the policy's attended sinks and recent window
  int n_splits = 0;                                // blocks per (sequence, kv head)
  float* part = nullptr;                           // partials_floats(B, Hq, n_splits, D)
  unsigned long long* profile = nullptr;           // optional [9] cycles per phase, summed over blocks
  bool weights_from_l2 = false;                    // read W_k,h from global/L2 instead of holding it in
                                                   // shared memory (smaller blocks: 2 per SM, fits an A100)
  int block_threads = 0;                           // fused kernel's block: 0 = the default for the
                                                   // shape (sparse_block_threads), or 256 / 512 (tuning)
  // Two-pass path only (sparse_partials_two_pass): scratch [B, Hq, ld_scores] f32 for the logits of
  // the attended items, ld_scores >= sinks + ld_sel + window.
  float* scores = nullptr; std::int64_t ld_scores = 0;
  // Fused path only: 0, or blocks launched after the splits that attend every (sequence, kv head)
  // pair's sinks and recent window held in exact rows, so that the splits walk the selection alone.
  // At Llama 128K x 8 the 128 split blocks leave 4 of the H100's 132 multiprocessors idle; the sinks
  // + window (136 of 2184 items, 4.25 tiles) cost the longest split 3 of its 35 tiles. Each pair's
  // exact items are cut into exact_parts ranges, a warp each (batch 1 has few pairs and short
  // splits: one warp per pair outlasted them). The partials then hold n_splits + exact_parts slots
  // per head (sparse_partial_slots; combine over that many); sparse_plan picks the counts.
  int exact_blocks = 0;
  int exact_parts = 1;
};

}  // namespace deltakv::gpu::decode
