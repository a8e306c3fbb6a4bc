#pragma once
// A compact CPU llama forward pass whose KV lives in a deltakv cache, used only through the
// library's public API (append pre-RoPE K|V rows per layer, attend with post-RoPE queries). It is
// the proof that an engine can embed the library; it is not tuned beyond using Eigen GEMMs (through
// the CPU backend's linear op) for every projection.
//
// One forward() call takes a ragged batch (rows of several sequences packed row-wise, FlashInfer
// style, each sequence continuing at its cached length): a prefill chunk, or a decode step (one row
// per sequence). Per layer: RMSNorm -> Q/K/V projections -> append K|V to the cache -> RoPE on Q
// (the cache's rope op and settings, so Q and K rotate alike) -> cache.attend (causal by position)
// -> output projection + residual -> RMSNorm -> SwiGLU FFN + residual; then the final norm and the
// LM head for the requested rows. Activation buffers are sized once for `max_rows`; the steady
// state allocates nothing of its own (Eigen's GEMM may use its internal blocking buffers).
//
// If a call throws (a cache capacity/order error, a bad token id), layers may have appended
// different numbers of rows: reset() the affected sequences before reusing them.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "deltakv/cache.hpp"
#include "deltakv/compressor.hpp"
#include "deltakv/config.hpp"
#include "deltakv/cpu/device.hpp"
#include "deltakv/error.hpp"
#include "deltakv/reference_selector.hpp"
#include "deltakv/sparse_policy.hpp"
#include "deltakv/tensor.hpp"
#include "llama/model.hpp"

namespace llama {

// A deltakv cache on the CPU backend (f32) together with everything it points into: the device,
// the codec weights, the per-layer encoder/decoder views, the storage and the workspace.
// Movable (the device and the cache live on the heap, vector buffers keep their addresses).
template <class Sel = deltakv::FixedStride, class Enc = deltakv::LinearEncoder<float>, class Pol = deltakv::DensePolicy>
class CpuKvCache {
 public:
  using Device = deltakv::cpu::CpuDevice<float>;
  using Cache = deltakv::CompressedCache<float, Device, Sel, Enc, deltakv::LinearDecoder<float>, Pol>;

  CpuKvCache(const deltakv::Config& cfg, deltakv::Compressor<float> codec, Sel sel = Sel(), Pol pol = Pol())
      : dev_(std::make_unique<Device>()), codec_(std::move(codec)) {
    if constexpr (std::is_same_v<Enc, deltakv::LinearEncoder<float>>) enc_ = codec_.linear_encoders();
    else enc_ = codec_.swiglu_encoders();
    dec_ = codec_.decoders();
    std::int64_t scratch = 0;
    for (const auto& e : enc_) scratch = std::max(scratch, e.scratch_elems(cfg.compress_rows()));
    const auto lay = Cache::layout(cfg, sel, pol, scratch);
    storage_.resize(lay.storage_bytes);
    workspace_.resize(lay.workspace_bytes);
    cache_ = std::make_unique<Cache>(*dev_, cfg, std::move(sel), std::span<const Enc>(enc_),
                                     std::span<const deltakv::LinearDecoder<float>>(dec_), std::move(pol), storage_, workspace_);
  }

  Cache& cache() { return *cache_; }
  const Cache& cache() const { return *cache_; }
  std::size_t storage_bytes() const { return storage_.size(); }

 private:
  std::unique_ptr<Device> dev_;
  deltakv::Compressor<float> codec_;
  std::vector<Enc> enc_;
  std::vector<deltakv::LinearDecoder<float>> dec_;
  std::vector<std::byte> storage_, workspace_;
  std::unique_ptr<Cache> cache_;
};

// An exact cache for the model (identity codec, window covering the capacity): attention is exact.
inline CpuKvCache<> make_exact_cache(const LlamaHParams& hp, std::int64_t max_tokens, int max_query_rows, int max_seqs = 1) {
  const deltakv::Config cfg = make_exact_config(hp, max_tokens, max_query_rows, max_seqs);
  return CpuKvCache<>(cfg, deltakv::Compressor<float>::identity(hp.n_layers, cfg.model.kv_dim()));
}

// Which rows of a forward() get logits.
enum class LogitRows {
  all,   // every row: logits [rows, vocab] (perplexity, scoring)
  last,  // the last row of each sequence: logits [n_seqs, vocab] (generation)
  none,  // no LM head (prefill chunks whose logits are not needed)
};

// Rows of several sequences packed row-wise: rows indptr[b]..indptr[b+1] are the next tokens of
// sequence seq_ids[b].
struct TokenBatch {
  std::span<const std::int32_t> tokens;   // [rows]
  std::span<const std::int32_t> seq_ids;  // [B]
  std::span<const std::int32_t> indptr;   // [B + 1]
};

// Cache: a deltakv::CompressedCache (e.g. CpuKvCache<...>::Cache) or anything with the same calls:
// config() (a deltakv::Config), length(layer, seq), reset(seq), append(layer, RaggedBatch<const float>)
// and attend(layer, RaggedBatch<const float>, MatrixView<float>), with host-accessible f32 rows.
template <class Cache>
class LlamaEngine {
 public:
  // `w` and `cache` must outlive the engine. max_rows: the most rows of one forward() call.
  LlamaEngine(const LlamaWeights& w, Cache& cache, int max_rows) : w_(w), cache_(cache), max_rows_(max_rows) {
    const auto& hp = w_.hp;
    const auto& c = cache_.config();
    if (c.model.n_layers != hp.n_layers || c.model.n_q_heads != hp.n_q_heads || c.model.n_kv_heads != hp.n_kv_heads ||
        c.model.head_dim != hp.head_dim)
      throw deltakv::ConfigError("llama engine: the cache's model shape does not match the weights");
    if (c.rope.style == deltakv::RopeStyle::none || c.rot_dim() != hp.rope_dim || c.rope.theta != hp.rope_theta)
      throw deltakv::ConfigError("llama engine: the cache's RoPE settings do not match the model (use make_config)");
    if (max_rows <= 0) throw deltakv::ConfigError("llama engine: max_rows must be > 0");
    if (static_cast<int>(w_.layers.size()) != hp.n_layers) throw deltakv::ShapeError("llama engine: weights have the wrong layer count");
    qkv_ld_ = hp.q_dim() + 2 * hp.k_dim();
    const std::size_t R = static_cast<std::size_t>(max_rows);
    x_.assign(R * hp.hidden, 0.f);
    h_.assign(R * hp.hidden, 0.f);
    qkv_.assign(R * qkv_ld_, 0.f);
    att_.assign(R * hp.q_dim(), 0.f);
    gu_.assign(R * 2 * hp.ffn, 0.f);
    pos_.assign(R, 0);
    one_seq_.assign(1, 0);
    one_indptr_.assign(2, 0);
  }

  const LlamaHParams& hparams() const { return w_.hp; }
  Cache& cache() { return cache_; }
  int max_rows() const { return max_rows_; }
  // Tokens the cache holds for a sequence (= the position of its next token).
  std::int64_t position(int seq) const {
    check_seq(seq);
    return cache_.length(0, seq);
  }
  void reset(int seq) { cache_.reset(seq); }

  // logits: [rows, vocab] for LogitRows::all, [B, vocab] for last, ignored for none.
  void forward(const TokenBatch& b, deltakv::MatrixView<float> logits, LogitRows which = LogitRows::all) {
    const auto& hp = w_.hp;
    const std::int64_t n = static_cast<std::int64_t>(b.tokens.size());
    const std::size_t B = b.seq_ids.size();
    if (n == 0) return;
    if (n > max_rows_)
      throw deltakv::CapacityError("llama engine: " + std::to_string(n) + " rows in one forward, max_rows is " +
                                   std::to_string(max_rows_));
    if (b.indptr.size() != B + 1 || b.indptr[0] != 0 || b.indptr[B] != n)
      throw deltakv::ShapeError("llama engine: indptr must have B + 1 entries from 0 to the row count");
    for (std::size_t i = 0; i < B; ++i) {
      if (b.indptr[i + 1] < b.indptr[i]) throw deltakv::ShapeError("llama engine: indptr must not decrease");
      check_seq(b.seq_ids[i]);
      if (b.indptr[i + 1] - b.indptr[i] > cache_.config().cap.max_query_rows)  // checked here, not at layer 0's attend
        throw deltakv::CapacityError("llama engine: " + std::to_string(b.indptr[i + 1] - b.indptr[i]) +
                                     " rows of one sequence, the cache's max_query_rows is " +
                                     std::to_string(cache_.config().cap.max_query_rows));
    }
    if (which == LogitRows::all) deltakv::check_matrix(logits, n, hp.vocab, "llama engine logits");
    if (which == LogitRows::last) {
      if (B > static_cast<std::size_t>(max_rows_)) throw deltakv::CapacityError("llama engine: more sequences than max_rows");
      deltakv::check_matrix(logits, static_cast<std::int64_t>(B), hp.vocab, "llama engine logits");
    }
    for (std::int64_t r = 0; r < n; ++r)
      if (b.tokens[r] < 0 || b.tokens[r] >= hp.vocab)
        throw deltakv::ShapeError("llama engine: token id " + std::to_string(b.tokens[r]) + " not in [0, " +
                                  std::to_string(hp.vocab) + ")");
    for (std::size_t i = 0; i < B; ++i) {
      const std::int64_t p0 = cache_.length(0, b.seq_ids[i]);
      for (std::int64_t r = b.indptr[i]; r < b.indptr[i + 1]; ++r) pos_[r] = p0 + (r - b.indptr[i]);
    }

    const int H = hp.hidden, qd = hp.q_dim(), kd = hp.k_dim(), F = hp.ffn;
    const std::span<const std::int64_t> pos(pos_.data(), static_cast<std::size_t>(n));
    const deltakv::RaggedBatch<const float> kv_batch{{qkv_.data() + qd, n, 2 * kd, qkv_ld_}, b.seq_ids, b.indptr, pos};
    const deltakv::RaggedBatch<const float> q_batch{{qkv_.data(), n, qd, qkv_ld_}, b.seq_ids, b.indptr, pos};
    const auto& rc = cache_.config();

    for (std::int64_t r = 0; r < n; ++r)
      std::copy_n(w_.token_embd.data() + std::size_t(b.tokens[r]) * H, H, x_.data() + r * H);

    for (int l = 0; l < hp.n_layers; ++l) {
      const LlamaLayer& L = w_.layers[l];
      rms_norm(x_.data(), h_.data(), n, L.attn_norm.data());
      linear(h_.data(), H, qkv_.data(), qkv_ld_, n, L.wq.data(), H, qd);
      linear(h_.data(), H, qkv_.data() + qd, qkv_ld_, n, L.wk.data(), H, kd);
      linear(h_.data(), H, qkv_.data() + qd + kd, qkv_ld_, n, L.wv.data(), H, kd);
      cache_.append(l, kv_batch);  // pre-RoPE K | V; the cache rotates K when it reads it
      dev_.rope(deltakv::RopeParams<float>{qkv_.data(), qkv_ld_, n, pos_.data(), hp.n_q_heads, hp.head_dim, rc.rot_dim(),
                                           rc.rope.style, rc.rope.theta});
      cache_.attend(l, q_batch, deltakv::MatrixView<float>{att_.data(), n, qd, qd});
      linear(att_.data(), qd, h_.data(), H, n, L.wo.data(), qd, H);
      dev_.axpy_rows(deltakv::AxpyRowsParams<float>{h_.data(), H, x_.data(), H, n, H, 1.0f});
      rms_norm(x_.data(), h_.data(), n, L.ffn_norm.data());
      linear(h_.data(), H, gu_.data(), 2 * F, n, L.w_gate.data(), H, F);
      linear(h_.data(), H, gu_.data() + F, 2 * F, n, L.w_up.data(), H, F);
      dev_.swiglu(deltakv::SwiGLUParams<float>{gu_.data(), 2 * static_cast<std::int64_t>(F), n, F});
      linear(gu_.data(), 2 * F, h_.data(), H, n, L.w_down.data(), F, H);
      dev_.axpy_rows(deltakv::AxpyRowsParams<float>{h_.data(), H, x_.data(), H, n, H, 1.0f});
    }

    if (which == LogitRows::none) return;
    std::int64_t m = n;
    if (which == LogitRows::last) {  // the last row of each sequence (empty sequences: zero logits)
      m = static_cast<std::int64_t>(B);
      for (std::size_t i = 0; i < B; ++i) {
        if (b.indptr[i + 1] > b.indptr[i]) rms_norm(x_.data() + std::int64_t(b.indptr[i + 1] - 1) * H, h_.data() + i * H, 1, w_.output_norm.data());
        else std::fill_n(h_.data() + i * H, H, 0.f);
      }
    } else {
      rms_norm(x_.data(), h_.data(), n, w_.output_norm.data());
    }
    linear(h_.data(), H, logits.data, logits.ld, m, w_.output_weight(), H, hp.vocab);
  }

  // One sequence: the next tokens of `seq`; logits [tokens, vocab] (all) or [1, vocab] (last).
  void forward(int seq, std::span<const std::int32_t> tokens, deltakv::MatrixView<float> logits,
               LogitRows which = LogitRows::all) {
    one_seq_[0] = seq;
    one_indptr_[1] = static_cast<std::int32_t>(tokens.size());
    forward(TokenBatch{tokens, one_seq_, one_indptr_}, logits, which);
  }

  // Chunked prefill of one sequence. logits: nullptr, or [tokens, vocab] (all) / [vocab] (last).
  void prefill(int seq, std::span<const std::int32_t> tokens, int chunk, float* logits, LogitRows which) {
    if (chunk <= 0 || chunk > max_rows_) throw deltakv::ConfigError("llama engine: chunk must be in [1, max_rows]");
    if (logits == nullptr) which = LogitRows::none;
    const int V = w_.hp.vocab;
    for (std::size_t i = 0; i < tokens.size(); i += static_cast<std::size_t>(chunk)) {
      const std::size_t c = std::min<std::size_t>(static_cast<std::size_t>(chunk), tokens.size() - i);
      const bool last_chunk = i + c == tokens.size();
      const auto part = tokens.subspan(i, c);
      if (which == LogitRows::all)
        forward(seq, part, deltakv::MatrixView<float>{logits + i * V, static_cast<std::int64_t>(c), V, V}, LogitRows::all);
      else if (which == LogitRows::last && last_chunk)
        forward(seq, part, deltakv::MatrixView<float>{logits, 1, V, V}, LogitRows::last);
      else
        forward(seq, part, {}, LogitRows::none);
    }
  }

 private:
  // y[n, out] = x[n, in] · W^T, W [out, in] row-major: the backend's Eigen GEMM.
  void linear(const float* x, std::int64_t ldx, float* y, std::int64_t ldy, std::int64_t n, const float* w, int in, int out) {
    dev_.linear(deltakv::LinearParams<float>{x, ldx, y, ldy, n, w, nullptr, in, out});
  }

  void check_seq(int seq) const {
    if (seq < 0 || seq >= cache_.config().cap.max_seqs)
      throw deltakv::ShapeError("llama engine: sequence " + std::to_string(seq) + " not in [0, " +
                                std::to_string(cache_.config().cap.max_seqs) + ")");
  }

  void rms_norm(const float* x, float* y, std::int64_t n, const float* g) const {
    const int H = w_.hp.hidden;
    for (std::int64_t r = 0; r < n; ++r) {
      const float* a = x + r * H;
      float* o = y + r * H;
      double ss = 0;
      for (int i = 0; i < H; ++i) ss += double(a[i]) * double(a[i]);
      const float s = static_cast<float>(1.0 / std::sqrt(ss / H + w_.hp.rms_eps));
      for (int i = 0; i < H; ++i) o[i] = a[i] * s * g[i];
    }
  }

  const LlamaWeights& w_;
  Cache& cache_;
  int max_rows_;
  deltakv::cpu::CpuDevice<float> dev_;  // the engine's own ops (projections, RoPE on Q, SwiGLU)
  std::int64_t qkv_ld_ = 0;
  std::vector<float> x_, h_, qkv_, att_, gu_;
  std::vector<std::int64_t> pos_;
  std::vector<std::int32_t> one_seq_, one_indptr_;
};

// Index of the largest value (first on ties).
inline std::int32_t argmax(std::span<const float> v) {
  return static_cast<std::int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

}  // namespace llama
