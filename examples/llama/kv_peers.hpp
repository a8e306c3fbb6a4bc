#pragma once
// The KV caches DeltaKV is compared with in `deltakv eval`, behind the same interface the engine
// uses for a deltakv cache (config, length, reset, append, attend):
//   BlockQuantKv : llama.cpp-style q8_0 / q4_0 KV (blocks of 32 values, one f16 scale each; K is
//                  quantized after RoPE, as llama.cpp stores it).
//   Bf16Kv<C>    : wraps any cache, rounds K/V rows to bf16 before they are stored (so every
//                  configuration sees the KV a bf16 model would produce), and can record the rows
//                  (calibration and analysis read real KV through it).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "deltakv/config.hpp"
#include "deltakv/cpu/device.hpp"
#include "deltakv/error.hpp"
#include "deltakv/tensor.hpp"

namespace llama {

inline float round_bf16(float x) {  // round to nearest even on the upper 16 bits
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

inline float round_f16(float x) {  // value of x stored as IEEE half (round to nearest), for scales
  if (x == 0.f || !std::isfinite(x)) return x;
  int e;
  std::frexp(x, &e);  // x = m * 2^e, 0.5 <= |m| < 1
  const int bits = e - 1 < -14 ? 10 - (-14 - (e - 1)) : 10;  // subnormals keep fewer bits
  if (bits < 0) return 0.f;
  const float q = std::ldexp(1.f, e - 1 - bits);
  return std::nearbyint(x / q) * q;
}

class BlockQuantKv {
 public:
  static constexpr int kBlock = 32;

  // bits: 8 (q8_0) or 4 (q4_0). kv_dim must be a multiple of 32 (head_dim is, for every llama).
  BlockQuantKv(const deltakv::Config& cfg, int bits) : cfg_(cfg), bits_(bits) {
    deltakv::validate(cfg_);
    if (bits != 8 && bits != 4) throw deltakv::ConfigError("BlockQuantKv: bits must be 8 or 4");
    const int D = cfg_.model.kv_dim();
    if (D % kBlock != 0) throw deltakv::ConfigError("BlockQuantKv: kv_dim must be a multiple of 32");
    row_bytes_ = std::size_t(D / kBlock) * (2 + kBlock * bits / 8);
    const std::size_t slots = std::size_t(cfg_.model.n_layers) * cfg_.cap.max_seqs;
    data_.assign(slots * std::size_t(cfg_.cap.max_tokens) * row_bytes_, 0);
    len_.assign(slots, 0);
    tile_.resize(std::size_t(kTile) * D);
    tpos_.resize(kTile);
    m_.resize(std::size_t(cfg_.cap.max_query_rows) * cfg_.model.n_q_heads);
    l_.resize(m_.size());
    acc_.resize(m_.size() * cfg_.model.head_dim);
  }

  const deltakv::Config& config() const { return cfg_; }
  std::int64_t length(int layer, int seq) const { return len_[slot(layer, seq)]; }
  void reset(int seq) {
    for (int l = 0; l < cfg_.model.n_layers; ++l) len_[slot(l, seq)] = 0;
  }
  // Bytes per stored value, for the memory column: q8_0 34/32, q4_0 18/32.
  double bytes_per_value() const { return double(row_bytes_) / cfg_.model.kv_dim(); }

  void append(int layer, const deltakv::RaggedBatch<const float>& x) {
    const int D = cfg_.model.kv_dim();
    for (std::size_t b = 0; b < x.seq_ids.size(); ++b) {
      const int seq = x.seq_ids[b];
      auto& n = len_[slot(layer, seq)];
      const std::int64_t r0 = x.indptr[b], r1 = x.indptr[b + 1];
      if (n + (r1 - r0) > cfg_.cap.max_tokens) throw deltakv::CapacityError("BlockQuantKv: sequence full");
      for (std::int64_t r = r0; r < r1; ++r) {
        if (x.positions[r] != n) throw deltakv::OrderError("BlockQuantKv: positions must continue the sequence");
        std::memcpy(tile_.data(), x.rows.row(r), sizeof(float) * D);
        rope(tile_.data(), &x.positions[r], 1);
        quantize_row(tile_.data(), row(layer, seq, n));
        ++n;
      }
    }
  }

  void attend(int layer, const deltakv::RaggedBatch<const float>& q, deltakv::MatrixView<float> out) {
    const auto& m = cfg_.model;
    const int D = m.kv_dim(), qd = m.n_q_heads * m.head_dim;
    for (std::size_t b = 0; b < q.seq_ids.size(); ++b) {
      const int seq = q.seq_ids[b];
      const std::int64_t r0 = q.indptr[b], nq = q.indptr[b + 1] - r0;
      if (nq == 0) continue;
      std::int64_t qmax = 0;
      for (std::int64_t r = r0; r < r0 + nq; ++r) qmax = std::max(qmax, q.positions[r]);
      std::fill(m_.begin(), m_.end(), 0.f);
      std::fill(l_.begin(), l_.end(), 0.f);
      std::fill(acc_.begin(), acc_.end(), 0.f);
      for (std::int64_t t = 0; t <= qmax; t += kTile) {
        const int nt = int(std::min<std::int64_t>(kTile, qmax + 1 - t));
        for (int j = 0; j < nt; ++j) {
          dequantize_row(row(layer, seq, t + j), tile_.data() + std::size_t(j) * D);
          tpos_[j] = t + j;
        }
        dev_.attn_tile(deltakv::AttnTileParams<float>{q.rows.row(r0), q.rows.ld, int(nq), q.positions.data() + r0,
                                                      tile_.data(), tile_.data() + m.k_dim(), D, nt, tpos_.data(),
                                                      m.n_q_heads, m.n_kv_heads, m.head_dim,
                                                      1.0 / std::sqrt(double(m.head_dim)), m_.data(), l_.data(), acc_.data()});
      }
      dev_.attn_finish(deltakv::AttnFinishParams<float>{l_.data(), acc_.data(), int(nq), m.n_q_heads, m.head_dim,
                                                        out.row(r0), out.ld});
      (void)qd;
    }
  }

 private:
  static constexpr int kTile = 128;
  std::size_t slot(int layer, int seq) const { return std::size_t(layer) * cfg_.cap.max_seqs + seq; }
  std::uint8_t* row(int layer, int seq, std::int64_t pos) {
    return data_.data() + (slot(layer, seq) * std::size_t(cfg_.cap.max_tokens) + std::size_t(pos)) * row_bytes_;
  }
  void rope(float* x, const std::int64_t* pos, std::int64_t n) {
    dev_.rope(deltakv::RopeParams<float>{x, cfg_.model.kv_dim(), n, pos, cfg_.model.n_kv_heads, cfg_.model.head_dim,
                                         cfg_.rot_dim(), cfg_.rope.style, cfg_.rope.theta});
  }
  // Block: f16 scale d (stored here as the f32 value of that half) then codes.
  void quantize_row(const float* x, std::uint8_t* dst) {
    const int D = cfg_.model.kv_dim(), cb = kBlock * bits_ / 8;
    for (int b0 = 0; b0 < D; b0 += kBlock) {
      const float* v = x + b0;
      std::uint8_t* blk = dst + std::size_t(b0 / kBlock) * (2 + cb);
      float d;
      if (bits_ == 8) {
        float amax = 0;
        for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
        d = round_f16(amax / 127.f);
      } else {  // q4_0: the value of largest magnitude maps to -8
        float mx = 0;
        for (int i = 0; i < kBlock; ++i)
          if (std::fabs(v[i]) > std::fabs(mx)) mx = v[i];
        d = round_f16(mx / -8.f);
      }
      const float id = d != 0.f ? 1.f / d : 0.f;
      std::uint16_t h = f16_bits(d);
      std::memcpy(blk, &h, 2);
      std::uint8_t* c = blk + 2;
      if (bits_ == 8) {
        for (int i = 0; i < kBlock; ++i) c[i] = std::uint8_t(std::int8_t(std::lround(std::clamp(v[i] * id, -127.f, 127.f))));
      } else {
        for (int i = 0; i < kBlock / 2; ++i) {
          const int a = std::min(15, int(v[i] * id + 8.5f)), bq = std::min(15, int(v[i + kBlock / 2] * id + 8.5f));
          c[i] = std::uint8_t(std::max(0, a) | (std::max(0, bq) << 4));
        }
      }
    }
  }
  void dequantize_row(const std::uint8_t* src, float* x) const {
    const int D = cfg_.model.kv_dim(), cb = kBlock * bits_ / 8;
    for (int b0 = 0; b0 < D; b0 += kBlock) {
      const std::uint8_t* blk = src + std::size_t(b0 / kBlock) * (2 + cb);
      std::uint16_t h;
      std::memcpy(&h, blk, 2);
      const float d = half_value(h);
      const std::uint8_t* c = blk + 2;
      if (bits_ == 8) {
        for (int i = 0; i < kBlock; ++i) x[b0 + i] = d * float(std::int8_t(c[i]));
      } else {
        for (int i = 0; i < kBlock / 2; ++i) {
          x[b0 + i] = d * float(int(c[i] & 0xF) - 8);
          x[b0 + i + kBlock / 2] = d * float(int(c[i] >> 4) - 8);
        }
      }
    }
  }
  // f16 bits of a value already representable as half (round_f16 made it so).
  static std::uint16_t f16_bits(float v) {
    if (v == 0.f) return std::signbit(v) ? 0x8000 : 0;
    std::uint16_t s = std::signbit(v) ? 0x8000 : 0;
    float a = std::fabs(v);
    int e;
    const float m = std::frexp(a, &e);  // a = m 2^e
    int exp = e - 1 + 15;
    if (exp <= 0) return std::uint16_t(s | std::uint16_t(std::lround(a / std::ldexp(1.f, -24))));
    return std::uint16_t(s | (exp << 10) | (std::lround((m * 2.f - 1.f) * 1024.f) & 0x3ff));
  }
  static float half_value(std::uint16_t h) {
    const float s = (h & 0x8000) ? -1.f : 1.f;
    const int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) return s * std::ldexp(float(man), -24);
    return s * std::ldexp(1.f + float(man) / 1024.f, exp - 15);
  }

  deltakv::Config cfg_;
  int bits_;
  std::size_t row_bytes_ = 0;
  std::vector<std::uint8_t> data_;
  std::vector<std::int64_t> len_;
  std::vector<float> tile_, m_, l_, acc_;
  std::vector<std::int64_t> tpos_;
  deltakv::cpu::CpuDevice<float> dev_;
};

// Rounds appended K/V to bf16 (and optionally records them per layer, sequence 0) before the
// wrapped cache stores them.
template <class C>
class Bf16Kv {
 public:
  explicit Bf16Kv(C& inner, bool record = false) : c_(inner), record_(record) {
    const auto& cfg = c_.config();
    buf_.resize(std::size_t(cfg.cap.max_query_rows) * cfg.model.kv_dim());
    if (record_) {
      rec_.resize(cfg.model.n_layers);
      q_sq_.assign(cfg.model.n_layers, std::vector<double>(std::size_t(cfg.model.n_q_heads) * cfg.model.head_dim, 0.0));
      q_rows_.assign(cfg.model.n_layers, 0);
    }
  }
  const deltakv::Config& config() const { return c_.config(); }
  std::int64_t length(int layer, int seq) const { return c_.length(layer, seq); }
  void reset(int seq) { c_.reset(seq); }
  void append(int layer, const deltakv::RaggedBatch<const float>& x) {
    const std::int64_t D = x.rows.cols;
    if (std::size_t(x.rows.rows * D) > buf_.size()) buf_.resize(std::size_t(x.rows.rows * D));
    for (std::int64_t r = 0; r < x.rows.rows; ++r)
      for (std::int64_t j = 0; j < D; ++j) buf_[r * D + j] = round_bf16(x.rows(r, j));
    if (record_) rec_[layer].insert(rec_[layer].end(), buf_.begin(), buf_.begin() + x.rows.rows * D);
    c_.append(layer, deltakv::RaggedBatch<const float>{{buf_.data(), x.rows.rows, D, D}, x.seq_ids, x.indptr, x.positions});
  }
  void attend(int layer, const deltakv::RaggedBatch<const float>& q, deltakv::MatrixView<float> out) {
    if (record_) {
      auto& acc = q_sq_[layer];
      for (std::int64_t r = 0; r < q.rows.rows; ++r)
        for (std::size_t j = 0; j < acc.size(); ++j) acc[j] += double(q.rows(r, std::int64_t(j))) * q.rows(r, std::int64_t(j));
      q_rows_[layer] += q.rows.rows;
    }
    c_.attend(layer, q, out);
  }
  // Recorded pre-RoPE K|V rows of one layer, [tokens, kv_dim].
  const std::vector<float>& recorded(int layer) const { return rec_.at(layer); }
  // Mean squared query value per dimension (post-RoPE: a rotation keeps each pair's energy).
  std::vector<double> query_energy(int layer) const {
    auto e = q_sq_.at(layer);
    for (auto& v : e) v /= double(std::max<std::int64_t>(1, q_rows_[layer]));
    return e;
  }

 private:
  C& c_;
  bool record_;
  std::vector<float> buf_;
  std::vector<std::vector<float>> rec_;
  std::vector<std::vector<double>> q_sq_;
  std::vector<std::int64_t> q_rows_;
};

}  // namespace llama
