// libFuzzer target: a CompressedCache<float, CpuDevice<float>, FixedStride, LinearEncoder,
// LinearDecoder, Policy> driven by a little program read from the input.
//
// Input layout (every read past the end yields 0, so any byte string is a program):
//   header  policy (Dense / OmniKV / Quest / Streaming) and its knobs, model geometry, compression
//           knobs, capacity, codec (identity or seeded random, optional bias): small and mostly
//           valid; a "raw" bit feeds some fields unsanitised so invalid configurations are tried
//   ops     append (batches with arbitrary seq ids, counts, positions, widths, strides, indptr,
//           NaN/Inf/huge values), plan+run append (fresh, stale or superseded plan),
//           reconstruct, attend, attend_dense, references_of, reset, accessor probes (length,
//           layer_plan, selection, position_class, projected_counts with any argument)
//
// The target keeps an independent model of the cache (every appended row per layer and sequence,
// which sequences have an OmniKV selection) and, before each call, predicts from the contract in
// docs/ERRORS.md which error classes the call may raise:
//   * nothing predicted -> the call must succeed;
//   * something predicted -> the call must throw a deltakv::Error whose code is predicted, and
//     the cache must be unchanged afterwards: lengths, counts(), selections and the bits of every
//     reconstructed row compared with a snapshot taken before the call.
// After successful calls: lengths and counts() match the model; sinks, references, the recent
// window and exact layers reconstruct bit-exactly; with the identity codec (no quantization) every
// position reconstructs to rounding; outputs of moderate inputs are finite; nothing is written
// outside an output view (the padding columns stay poisoned). Any other exception, a failed
// FUZZ_CHECK or a sanitizer report is a crash.
//
// -DDELTAKV_FUZZ_SKIP_OPEN_FINDINGS leaves out the checks of two findings (tests/test_regressions.cpp):
// run_append of a plan superseded by a newer plan_append, and configurations whose kv_dim does not
// fit in int. Both are fixed since ea427c1; the flag only helps bisect older trees.
// Build with -DDELTAKV_FUZZ_TRACE to print every call and its outcome (for reading a crash input).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "deltakv/cache.hpp"
#include "deltakv/compressor.hpp"
#include "deltakv/cpu/device.hpp"
#include "deltakv/error.hpp"
#include "fuzz_common.hpp"

namespace {

using namespace deltakv;
using Dev = cpu::CpuDevice<float>;

// ---- input ---------------------------------------------------------------------------------------

struct Input {
  const std::uint8_t* p;
  std::size_t n;
  std::uint8_t u8() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  std::uint16_t u16() { return static_cast<std::uint16_t>(u8() | (u8() << 8)); }
  int range(int lo, int hi) { return lo + static_cast<int>(u8() % static_cast<unsigned>(hi - lo + 1)); }  // inclusive
  bool bit() { return (u8() & 1) != 0; }
  bool empty() const { return n == 0; }
};

struct Rng {  // splitmix64
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * float(next() >> 40) / float(1 << 24); }
  std::uint64_t below(std::uint64_t n) { return n ? next() % n : 0; }
};

// ---- error prediction ----------------------------------------------------------------------------

struct Expect {
  unsigned mask = 0;
  void add(ErrorCode c) { mask |= 1u << static_cast<unsigned>(c); }
  bool has(ErrorCode c) const { return (mask >> static_cast<unsigned>(c)) & 1u; }
  bool any() const { return mask != 0; }
};

const char* code_name(ErrorCode c) { return to_string(c); }

// ---- the program -----------------------------------------------------------------------------------

constexpr int kMaxOps = 48;

template <class Pol>
class Program {
 public:
  using Cache = CompressedCache<float, Dev, FixedStride, LinearEncoder<float>, LinearDecoder<float>, Pol>;

  Program(Input& in, const Config& cfg, int stride, Pol pol, Compressor<float> codec, bool identity, int page)
      : in_(in), cfg_(cfg), sel_(stride), pol_(std::move(pol)), codec_(std::move(codec)), identity_(identity),
        page_(page) {}

  // Returns false if the cache could not be built (a typed error is fine there).
  bool build(bool short_storage, bool short_workspace) {
    enc_ = codec_.linear_encoders();
    dec_ = codec_.decoders();
    typename Cache::Layout lay;
    try {
      lay = Cache::layout(cfg_, sel_, pol_, 0);
    } catch (const Error&) {
      return false;
    }
    FUZZ_CHECK(lay.storage_bytes < (std::size_t(1) << 28) && lay.workspace_bytes < (std::size_t(1) << 28));
    storage_.assign(lay.storage_bytes - (short_storage && lay.storage_bytes ? 1 : 0), std::byte{0xA5});
    workspace_.assign(lay.workspace_bytes - (short_workspace && lay.workspace_bytes ? 1 : 0), std::byte{0x5A});
    try {
      cache_ = std::make_unique<Cache>(dev_, cfg_, sel_, std::span<const LinearEncoder<float>>(enc_),
                                       std::span<const LinearDecoder<float>>(dec_), pol_, storage_, workspace_);
    } catch (const Error&) {
      return false;
    }
    FUZZ_CHECK(!(short_storage && lay.storage_bytes) && !(short_workspace && lay.workspace_bytes));
    L_ = cfg_.model.n_layers;
    S_ = cfg_.cap.max_seqs;
    D_ = cfg_.model.kv_dim();
    QD_ = cfg_.model.n_q_heads * cfg_.model.head_dim;
    rows_.assign(std::size_t(L_) * S_, {});
    extreme_.assign(std::size_t(L_) * S_, false);
    has_sel_.assign(S_, false);
    return true;
  }

  bool all_layers_exact() const {
    for (int l = 0; l < L_; ++l)
      if (!cache_->layer_plan(l).exact) return false;
    return true;
  }

  void run() {
    check_model();
    for (int op = 0; op < kMaxOps && !in_.empty(); ++op) {
      switch (in_.u8() % 11) {
        case 0: case 1: case 2: op_append(false); break;
        case 3: op_append(true); break;
        case 4: case 5: op_reconstruct(); break;
        case 6: case 7: op_attend(false); break;
        case 8: op_attend(true); break;
        case 9: in_.bit() ? op_reset() : op_references(); break;
        case 10: op_probe(); break;
      }
    }
    check_model();
  }

 private:
  // ---- model ---------------------------------------------------------------------------------
  std::vector<float>& shadow(int l, int s) { return rows_[std::size_t(l) * S_ + s]; }
  std::int64_t len(int l, int s) const { return std::int64_t(rows_[std::size_t(l) * S_ + s].size()) / D_; }
  bool valid_layer(int l) const { return l >= 0 && l < L_; }
  bool valid_seq(int s) const { return s >= 0 && s < S_; }

  // Compressed frontier c of a compressed layer holding n tokens (see CompressedCache::run_append):
  // the ring compresses a block whenever it holds recent + block tokens.
  std::int64_t frontier(std::int64_t n) const {
    const std::int64_t S = cfg_.comp.sinks, R = cfg_.comp.recent, B = cfg_.block();
    if (n <= S) return n;
    const std::int64_t over = n - S - R;
    return over < 0 ? S : S + (over / B) * B;
  }

  // An out-of-range or in-range layer / sequence index, mostly in range.
  int pick_index(int count) {
    const std::uint8_t b = in_.u8();
    if (b < 232) return b % count;
    switch (b % 6) {
      case 0: return -1;
      case 1: return count;
      case 2: return count + 3;
      case 3: return std::numeric_limits<int>::min();
      case 4: return std::numeric_limits<int>::max();
      default: return -7;
    }
  }

  float value(Rng& r, int mode) {
    switch (mode) {
      case 0: return std::ldexp(r.uniform(-1.f, 1.f), int(r.below(60)) - 30);  // wide but finite
      case 1: {
        const float special[] = {0.f, -0.f, std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::max(),
                                 -std::numeric_limits<float>::max(), 1e30f, -1e30f, std::numeric_limits<float>::min()};
        return special[r.below(8)];
      }
      default: return r.uniform(-4.f, 4.f);
    }
  }

  // Fills a view [rows, cols] with stride ld; padding columns [cols, ld) are poisoned with NaN
  // (the cache must never read them as values).
  std::vector<float> make_rows(std::int64_t rows, std::int64_t cols, std::int64_t ld, Rng& r, int mode) {
    const std::int64_t extent = rows == 0 ? 0 : (rows - 1) * std::max(ld, cols) + cols;
    std::vector<float> v(std::size_t(std::max<std::int64_t>(extent, 0)), std::numeric_limits<float>::quiet_NaN());
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t j = 0; j < cols; ++j) v[std::size_t(i * std::max(ld, cols) + j)] = value(r, mode);
    return v;
  }

  static bool moderate(float x) { return std::isfinite(x) && std::fabs(x) <= 1e3f; }

  struct Batch {
    std::vector<float> data;
    const float* ptr = nullptr;
    std::int64_t rows = 0, cols = 0, ld = 0;
    std::vector<std::int32_t> seq_ids, indptr;
    std::vector<std::int64_t> positions;
    bool shape_ok = true;  // the structure is valid (so per-sequence checks are meaningful)
    RaggedBatch<const float> view() const {
      return RaggedBatch<const float>{MatrixView<const float>{ptr, rows, cols, ld}, seq_ids, indptr, positions};
    }
    bool finite() const {
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t j = 0; j < cols; ++j)
          if (!std::isfinite(ptr[i * ld + j])) return false;
      return true;
    }
  };

  // A ragged batch of `width` columns; per-sequence row counts and positions come from `rows_of`
  // and `pos_of`. Structural defects are drawn from the input and recorded in `e`.
  template <class RowsOf, class PosOf>
  Batch make_batch(int width, RowsOf rows_of, PosOf pos_of, Expect& e, int max_b) {
    Batch b;
    const int B = in_.range(0, max_b);
    const std::uint8_t defects = in_.u8();
    const bool defect = defects >= 200;  // ~22%: one structural defect
    const int which = defects % 8;
    // sequence ids: a rotation of 0..S-1, or arbitrary indices
    const int rot = in_.range(0, S_ - 1);
    for (int i = 0; i < B; ++i) b.seq_ids.push_back(in_.bit() ? (rot + i) % S_ : pick_index(S_));
    std::vector<std::int64_t> counts(B);
    for (int i = 0; i < B; ++i) counts[i] = rows_of(b.seq_ids[i]);
    b.indptr.push_back(0);
    for (int i = 0; i < B; ++i) b.indptr.push_back(b.indptr.back() + std::int32_t(counts[i]));
    b.rows = b.indptr.back();
    b.cols = width;
    b.ld = width + in_.range(0, 2);
    for (int i = 0; i < B; ++i)
      for (std::int64_t r = 0; r < counts[i]; ++r) b.positions.push_back(pos_of(b.seq_ids[i], r, counts[i]));
    if (defect) {
      switch (which) {
        case 0: b.cols = width + (in_.bit() ? 1 : -1); b.ld = std::max(b.ld, b.cols); break;  // wrong width
        case 1: b.ld = b.cols - 1; break;                                                      // stride < width
        case 2: if (!b.indptr.empty()) b.indptr.pop_back(); break;                            // indptr too short
        case 3: b.indptr.push_back(b.indptr.back()); break;                                   // indptr too long
        case 4: if (B >= 2) { std::swap(b.indptr[1], b.indptr[2]); } break;                  // decreasing
        case 5: b.positions.push_back(0); break;                                              // one position too many
        case 6: b.indptr[0] = 1; break;                                                        // does not start at 0
        default: b.rows += 1; break;                                                           // rows != indptr[B]
      }
    }
    // structural checks, as the contract states them
    const std::size_t nb = b.seq_ids.size();
    bool ok = b.indptr.size() == nb + 1 && b.indptr[0] == 0 && b.indptr[nb] == b.rows && b.cols == width &&
              b.ld >= b.cols && std::int64_t(b.positions.size()) == b.rows;
    if (ok)
      for (std::size_t i = 0; i < nb; ++i) {
        if (!valid_seq(b.seq_ids[i]) || b.indptr[i + 1] < b.indptr[i]) ok = false;
        for (std::size_t j = 0; j < i; ++j)
          if (b.seq_ids[j] == b.seq_ids[i]) ok = false;
      }
    b.shape_ok = ok;
    if (!ok) e.add(ErrorCode::shape);
    // the rows themselves (allocated for what the view claims, so the view is always readable)
    Rng r{in_.u16() * 0x100000001ull + 17};
    const int mode = in_.range(0, 7);
    b.data = make_rows(std::max<std::int64_t>(b.rows, 0), std::max<std::int64_t>(b.cols, 0), std::max<std::int64_t>(b.ld, 0), r,
                       mode == 0 ? 0 : mode == 1 ? 1 : 2);
    b.ptr = b.data.empty() ? nullptr : b.data.data();
    if (b.rows > 0 && b.cols > 0 && in_.u8() >= 230) {  // a NaN or Inf inside the view
      const std::int64_t i = r.below(std::uint64_t(b.rows)), j = r.below(std::uint64_t(b.cols));
      b.data[std::size_t(i * std::max(b.ld, b.cols) + j)] =
          in_.bit() ? std::numeric_limits<float>::quiet_NaN() : (in_.bit() ? 1.f : -1.f) * std::numeric_limits<float>::infinity();
    }
    if (b.rows > 0 && b.cols > 0 && in_.u8() >= 250) {  // no data at all
      b.ptr = nullptr;
      e.add(ErrorCode::shape);
      b.shape_ok = false;
    }
    return b;
  }

  // ---- snapshots -----------------------------------------------------------------------------
  struct Snapshot {
    std::vector<std::int64_t> lengths;
    TokenCounts counts;
    std::vector<std::vector<std::int64_t>> selections;
    std::vector<std::vector<float>> rows;
  };

  std::vector<float> reconstruct_all(int l, int s, bool rope) {
    const std::int64_t n = cache_->length(l, s);
    std::vector<std::int64_t> pos(n);
    for (std::int64_t i = 0; i < n; ++i) pos[i] = i;
    std::vector<float> out(std::size_t(n) * D_, std::numeric_limits<float>::quiet_NaN());
    cache_->reconstruct(l, s, pos, matrix(out.data(), n, std::int64_t(D_)), rope);
    return out;
  }

  Snapshot snapshot() {
    Snapshot sn;
    sn.counts = cache_->counts();
    for (int l = 0; l < L_; ++l)
      for (int s = 0; s < S_; ++s) {
        sn.lengths.push_back(cache_->length(l, s));
        sn.rows.push_back(reconstruct_all(l, s, l % 2 == 1));
      }
    for (int s = 0; s < S_; ++s) {
      auto sel = cache_->selection(s);
      sn.selections.emplace_back(sel.begin(), sel.end());
    }
    return sn;
  }

  static bool same_counts(const TokenCounts& a, const TokenCounts& b) {
    return a.tokens == b.tokens && a.sinks == b.sinks && a.recent == b.recent && a.references == b.references &&
           a.exact_layer == b.exact_layer && a.latents == b.latents && a.pages == b.pages;
  }

  void check_unchanged(const Snapshot& before) {
    const Snapshot now = snapshot();
    FUZZ_CHECK(now.lengths == before.lengths);
    FUZZ_CHECK(same_counts(now.counts, before.counts));
    FUZZ_CHECK(now.selections == before.selections);
    FUZZ_CHECK(now.rows.size() == before.rows.size());
    for (std::size_t i = 0; i < now.rows.size(); ++i)
      FUZZ_CHECK(now.rows[i].size() == before.rows[i].size() &&
                 (now.rows[i].empty() ||
                  std::memcmp(now.rows[i].data(), before.rows[i].data(), now.rows[i].size() * sizeof(float)) == 0));
  }

  // Runs `call` under the prediction `e`: must succeed when nothing is predicted, must throw a
  // predicted code (leaving the cache unchanged) otherwise. Returns whether it succeeded.
  template <class F>
  bool guarded(const Expect& e, F&& call, const char* what) {
    std::optional<Snapshot> before;
    if (e.any()) before = snapshot();
    try {
      call();
#ifdef DELTAKV_FUZZ_TRACE
      std::fprintf(stderr, "%s: ok (predicted mask %#x)\n", what, e.mask);
#endif
    } catch (const Error& err) {
#ifdef DELTAKV_FUZZ_TRACE
      std::fprintf(stderr, "%s: %s (predicted mask %#x)\n", what, err.what(), e.mask);
#endif
      FUZZ_CHECK_MSG(e.any(), "%s raised an unpredicted %s error: %s", what, code_name(err.code()), err.what());
      FUZZ_CHECK_MSG(e.has(err.code()), "%s raised %s, predicted mask %#x: %s", what, code_name(err.code()), e.mask,
                     err.what());
      check_unchanged(*before);
      return false;
    } catch (const std::exception& ex) {
      FUZZ_CHECK_MSG(false, "%s raised a non-deltakv exception: %s", what, ex.what());
    }
    FUZZ_CHECK_MSG(!e.any(), "%s succeeded although an error was predicted (mask %#x)", what, e.mask);
    return true;
  }

  // ---- checks after success --------------------------------------------------------------------
  void check_model() {
    TokenCounts want;
    for (int l = 0; l < L_; ++l) {
      const LayerPlan& p = cache_->layer_plan(l);
      for (int s = 0; s < S_; ++s) {
        const std::int64_t n = len(l, s);
        FUZZ_CHECK(cache_->length(l, s) == n);
        want.tokens += n;
        if (p.attend == Attend::pages && n > 0) want.pages += (n + page_ - 1) / page_;
        if (p.exact) {
          want.exact_layer += n;
          continue;
        }
        const std::int64_t c = frontier(n), S = cfg_.comp.sinks;
        want.sinks += std::min<std::int64_t>(n, S);
        want.recent += n - c;
        for (std::int64_t q = S; q < c; ++q) (cache_->position_class(q) == 1 ? want.references : want.latents) += 1;
      }
    }
    FUZZ_CHECK(same_counts(cache_->counts(), want));
    const MemoryReport m = cache_->memory();
    FUZZ_CHECK(m.tokens == want.tokens && m.total >= 0);
    for (int s = 0; s < S_; ++s) {
      const auto sel = cache_->selection(s);
      FUZZ_CHECK(std::is_sorted(sel.begin(), sel.end()));
      FUZZ_CHECK(std::adjacent_find(sel.begin(), sel.end()) == sel.end());
      for (auto q : sel) FUZZ_CHECK(q >= 0 && q < cfg_.cap.max_tokens);
    }
  }

  // Rows reconstructed (pre-RoPE) for positions `pos` of (l, s) against the model.
  void check_rows(int l, int s, std::span<const std::int64_t> pos, const float* out, std::int64_t ld) {
    const std::vector<float>& x = shadow(l, s);
    const std::int64_t n = len(l, s), c = frontier(n), S = cfg_.comp.sinks;
    const bool exact_layer = cache_->layer_plan(l).exact;
    float maxabs = 0;
    for (float v : x) maxabs = std::max(maxabs, std::fabs(v));
    const bool close = identity_ && cfg_.comp.latent_bits == 0 && !extreme_[std::size_t(l) * S_ + s];
    for (std::size_t i = 0; i < pos.size(); ++i) {
      const std::int64_t q = pos[i];
      const float* got = out + std::int64_t(i) * ld;
      const float* want = x.data() + q * D_;
      const bool exact = exact_layer || q < S || q >= c || cache_->position_class(q) == 1;
      if (exact) {
        FUZZ_CHECK_MSG(std::memcmp(got, want, sizeof(float) * D_) == 0, "layer %d seq %d position %lld not exact", l, s,
                       static_cast<long long>(q));
      } else if (close) {
        for (int d = 0; d < D_; ++d)
          FUZZ_CHECK_MSG(std::fabs(got[d] - want[d]) <= 1e-5f * (maxabs + 1.f), "layer %d seq %d position %lld dim %d: %g vs %g", l,
                         s, static_cast<long long>(q), d, double(got[d]), double(want[d]));
      } else if (!extreme_[std::size_t(l) * S_ + s]) {
        for (int d = 0; d < D_; ++d) FUZZ_CHECK(std::isfinite(got[d]));
      }
    }
  }

  void check_all_rows() {
    for (int l = 0; l < L_; ++l)
      for (int s = 0; s < S_; ++s) {
        const auto r = reconstruct_all(l, s, false);
        std::vector<std::int64_t> pos(std::size_t(len(l, s)));
        for (std::size_t i = 0; i < pos.size(); ++i) pos[i] = std::int64_t(i);
        check_rows(l, s, pos, r.data(), D_);
      }
  }

  // ---- operations ----------------------------------------------------------------------------
  void apply_append(int layer, const Batch& b) {
    for (std::size_t i = 0; i + 1 < b.indptr.size(); ++i) {
      const int s = b.seq_ids[i];
      auto& sh = shadow(layer, s);
      for (std::int64_t r = b.indptr[i]; r < b.indptr[i + 1]; ++r) {
        sh.insert(sh.end(), b.ptr + r * b.ld, b.ptr + r * b.ld + D_);
        for (int d = 0; d < D_; ++d)
          if (!moderate(b.ptr[r * b.ld + d])) extreme_[std::size_t(layer) * S_ + s] = true;
      }
    }
  }

  Batch make_append_batch(int layer, Expect& e) {
    const int cap_mode = in_.u8();
    auto rows_of = [&](int s) -> std::int64_t {
      if (cap_mode >= 240 && valid_layer(layer) && valid_seq(s))  // exactly fill, or overflow by a little
        return std::max<std::int64_t>(0, cfg_.cap.max_tokens - len(layer, s) + in_.range(0, 2));
      return in_.range(0, 20);
    };
    auto pos_of = [&](int s, std::int64_t r, std::int64_t) -> std::int64_t {
      const std::int64_t base = valid_layer(layer) && valid_seq(s) ? len(layer, s) : 0;
      if (in_.u8() < 252) return base + r;
      switch (in_.u8() % 4) {  // a gap, a repeat, a negative, a far position
        case 0: return base + r + 1;
        case 1: return base + r - 1;
        case 2: return -1;
        default: return std::int64_t(1) << 40;
      }
    };
    Batch b = make_batch(D_, rows_of, pos_of, e, S_ + 1);
    if (!valid_layer(layer)) e.add(ErrorCode::shape);
    if (!e.has(ErrorCode::shape) && !b.finite()) e.add(ErrorCode::non_finite);
    if (!e.any()) {
      for (std::size_t i = 0; i + 1 < b.indptr.size(); ++i) {
        const int s = b.seq_ids[i];
        const std::int64_t r0 = b.indptr[i], r1 = b.indptr[i + 1];
        for (std::int64_t r = r0; r < r1; ++r)
          if (b.positions[r] != len(layer, s) + (r - r0)) e.add(ErrorCode::order);
        if (len(layer, s) + (r1 - r0) > cfg_.cap.max_tokens) e.add(ErrorCode::capacity);
      }
    }
    return b;
  }

  void op_append(bool two_phase) {
    const int layer = pick_index(L_);
    Expect e;
    Batch b = make_append_batch(layer, e);
    if (!two_phase) {
      if (guarded(e, [&] { cache_->append(layer, b.view()); }, "append")) {
        apply_append(layer, b);
        check_model();
        check_all_rows();
      }
      return;
    }
    AppendPlan plan;
    if (!guarded(e, [&] { plan = cache_->plan_append(layer, b.view()); }, "plan_append")) return;
    FUZZ_CHECK(plan.layer == layer && plan.n_items == int(b.seq_ids.size()));
    const std::uint8_t between = in_.u8() % 4;
#ifdef DELTAKV_FUZZ_SKIP_OPEN_FINDINGS
    if (between == 3) {  // (the check of superseded plans is left out: run it as a fresh plan)
      cache_->run_append(plan, b.view());
      apply_append(layer, b);
      check_model();
      check_all_rows();
      return;
    }
#endif
    if (between == 0) {  // the cache changes in between: the plan is stale
      const int s = in_.range(0, S_ - 1);
      cache_->reset(s);
      reset_model(s);
      Expect stale;
      stale.add(ErrorCode::order);
      guarded(stale, [&] { cache_->run_append(plan, b.view()); }, "run_append (stale)");
    } else if (between == 3) {  // a second plan_append: if it succeeds, it supersedes this plan
      const int layer2 = pick_index(L_);
      Expect e2;
      Batch b2 = make_append_batch(layer2, e2);
      // Often make it fail late: the last sequence's first position is off by one, so the
      // sequences before it pass validation first (coverage alone does not steer towards this).
      const std::size_t nb2 = b2.seq_ids.size();
      if (in_.bit() && b2.shape_ok && nb2 >= 2 && b2.indptr[nb2] > b2.indptr[nb2 - 1]) {
        b2.positions[std::size_t(b2.indptr[nb2 - 1])] += 1;
        e2.add(ErrorCode::order);
      }
      AppendPlan plan2;
      const bool fresh2 = guarded(e2, [&] { plan2 = cache_->plan_append(layer2, b2.view()); }, "plan_append (second)");
      if (fresh2) {  // running the older plan is an OrderError; the newest plan is still good
        Expect stale;
        stale.add(ErrorCode::order);
        guarded(stale, [&] { cache_->run_append(plan, b.view()); }, "run_append (superseded)");
        cache_->run_append(plan2, b2.view());
        apply_append(layer2, b2);
      } else {  // a failed plan_append changes nothing: the first plan is still good
        cache_->run_append(plan, b.view());
        apply_append(layer, b);
      }
    } else if (between == 1) {  // a failed call in between does not change the cache: still fresh
      std::vector<std::int64_t> bad{-1};
      std::vector<float> out(D_);
      Expect o;
      o.add(ErrorCode::order);
      guarded(o, [&] { cache_->reconstruct(0, 0, bad, matrix(out.data(), 1, std::int64_t(D_)), false); }, "reconstruct");
      cache_->run_append(plan, b.view());
      apply_append(layer, b);
    } else {
      cache_->run_append(plan, b.view());
      apply_append(layer, b);
    }
    check_model();
    check_all_rows();
  }

  void op_reconstruct() {
    const int l = pick_index(L_), s = pick_index(S_);
    Expect e;
    if (!valid_layer(l) || !valid_seq(s)) e.add(ErrorCode::shape);
    const std::int64_t n = valid_layer(l) && valid_seq(s) ? len(l, s) : 0;
    const int np = in_.u8() < 200 ? in_.range(0, 12) : in_.range(0, 255) + in_.range(0, 100);  // > kTile too
    Rng r{in_.u16() + 99ull};
    std::vector<std::int64_t> pos(np);
    for (auto& q : pos) q = n > 0 ? std::int64_t(r.below(std::uint64_t(n))) : 0;
    if (np > 0 && in_.u8() >= 220) {
      const std::int64_t bad[] = {-1, n, n + 1, std::numeric_limits<std::int64_t>::min(), std::numeric_limits<std::int64_t>::max()};
      pos[r.below(std::uint64_t(np))] = bad[in_.u8() % 5];
    }
    for (auto q : pos)
      if (q < 0 || q >= n) e.add(ErrorCode::order);
    std::int64_t orows = np, ocols = D_, old = D_ + in_.range(0, 2);
    if (in_.u8() >= 230) {
      switch (in_.u8() % 3) {
        case 0: orows = np + (in_.bit() ? 1 : -1); break;
        case 1: ocols = D_ - 1; break;
        default: old = D_ - 1; break;
      }
    }
    if (orows != np || ocols != D_ || old < ocols) e.add(ErrorCode::shape);
    const bool rope = in_.bit();
    const std::int64_t stride = std::max(old, ocols);
    std::vector<float> out(std::size_t(std::max<std::int64_t>(0, orows)) * std::size_t(stride) + 1,
                           std::numeric_limits<float>::quiet_NaN());
    const bool ok = guarded(e, [&] {
      cache_->reconstruct(l, s, pos, MatrixView<float>{out.data(), orows, ocols, old}, rope);
    }, "reconstruct");
    if (!ok) return;
    for (std::int64_t i = 0; i < orows; ++i)
      for (std::int64_t j = ocols; j < stride; ++j) FUZZ_CHECK(std::isnan(out[std::size_t(i * stride + j)]));
    FUZZ_CHECK(std::isnan(out.back()));
    if (!rope) check_rows(l, s, pos, out.data(), stride);
  }

  void op_attend(bool dense) {
    const int l = pick_index(L_);
    Expect e;
    const int mq = cfg_.cap.max_query_rows;
    auto rows_of = [&](int) -> std::int64_t { return in_.u8() < 240 ? in_.range(0, mq) : mq + 1; };
    auto pos_of = [&](int s, std::int64_t, std::int64_t) -> std::int64_t {
      const std::int64_t n = valid_layer(l) && valid_seq(s) ? len(l, s) : 0;
      if (in_.u8() < 245 && n > 0) return n - 1 - in_.range(0, 255) % n;
      return in_.bit() ? n : -1;
    };
    Batch q = make_batch(QD_, rows_of, pos_of, e, S_ + 1);
    if (!valid_layer(l)) e.add(ErrorCode::shape);
    // the output view
    std::int64_t orows = q.rows, ocols = QD_, old = QD_ + in_.range(0, 1);
    if (in_.u8() >= 240) (in_.bit() ? orows : ocols) += 1;
    if (orows != q.rows || ocols != QD_ || old < ocols) e.add(ErrorCode::shape);
    if (!e.has(ErrorCode::shape) && !q.finite()) e.add(ErrorCode::non_finite);
    bool moderate_inputs = true;
    if (!e.any()) {
      for (std::size_t i = 0; i + 1 < q.indptr.size(); ++i) {
        const int s = q.seq_ids[i];
        const std::int64_t nq = q.indptr[i + 1] - q.indptr[i];
        if (nq > mq) e.add(ErrorCode::capacity);
        for (std::int64_t r = q.indptr[i]; r < q.indptr[i + 1]; ++r)
          if (q.positions[r] < 0 || q.positions[r] >= len(l, s)) e.add(ErrorCode::order);
        if (nq > 0 && !dense && cache_->layer_plan(l).attend == Attend::selected && !has_sel_[s]) e.add(ErrorCode::order);
        if (extreme_[std::size_t(l) * S_ + s]) moderate_inputs = false;
      }
      for (std::int64_t r = 0; r < q.rows; ++r)
        for (int d = 0; d < QD_; ++d) moderate_inputs = moderate_inputs && moderate(q.ptr[r * q.ld + d]);
    }
    const std::int64_t stride = std::max(old, ocols);
    std::vector<float> out(std::size_t(std::max<std::int64_t>(0, orows)) * std::size_t(stride) + 1,
                           std::numeric_limits<float>::quiet_NaN());
    const MatrixView<float> ov{out.data(), orows, ocols, old};
    const bool ok = guarded(e, [&] {
      if (dense) cache_->attend_dense(l, q.view(), ov);
      else cache_->attend(l, q.view(), ov);
    }, dense ? "attend_dense" : "attend");
    if (!ok) return;
    for (std::int64_t i = 0; i < orows; ++i) {
      for (std::int64_t j = ocols; j < stride; ++j) FUZZ_CHECK(std::isnan(out[std::size_t(i * stride + j)]));
      if (moderate_inputs)
        for (std::int64_t j = 0; j < ocols; ++j) FUZZ_CHECK(std::isfinite(out[std::size_t(i * stride + j)]));
    }
    FUZZ_CHECK(std::isnan(out.back()));
    if (!dense && cache_->layer_plan(l).select_after)
      for (std::size_t i = 0; i + 1 < q.indptr.size(); ++i)
        if (q.indptr[i + 1] > q.indptr[i]) has_sel_[q.seq_ids[i]] = true;
    check_model();
  }

  void reset_model(int s) {
    for (int l = 0; l < L_; ++l) {
      shadow(l, s).clear();
      extreme_[std::size_t(l) * S_ + s] = false;
    }
    has_sel_[s] = false;
  }

  void op_reset() {
    const int s = pick_index(S_);
    Expect e;
    if (!valid_seq(s)) e.add(ErrorCode::shape);
    if (guarded(e, [&] { cache_->reset(s); }, "reset")) {
      reset_model(s);
      FUZZ_CHECK(cache_->selection(s).empty());
      check_model();
    }
  }

  void op_references() {
    const int l = pick_index(L_), s = pick_index(S_);
    const int k = cfg_.comp.k_neighbors;
    Expect e;
    if (!valid_layer(l) || !valid_seq(s)) e.add(ErrorCode::shape);
    const std::int64_t n = valid_layer(l) && valid_seq(s) ? len(l, s) : 0;
    std::int64_t pos = in_.u8() < 240 && n > 0 ? std::int64_t(in_.u16()) % n : (in_.bit() ? n : -1);
    if (!e.any() && (pos < 0 || pos >= n)) e.add(ErrorCode::order);
    const int out_n = in_.u8() < 240 ? k + in_.range(0, 2) : in_.range(0, k);
    if (out_n < k) e.add(ErrorCode::shape);
    std::vector<std::int64_t> out(std::size_t(out_n) + 1, -42);
    int c = -1;
    if (!guarded(e, [&] { c = cache_->references_of(l, s, pos, std::span<std::int64_t>(out.data(), std::size_t(out_n))); },
                 "references_of"))
      return;
    FUZZ_CHECK(c >= 0 && c <= k);
    FUZZ_CHECK(out.back() == -42);
    const bool compressed_latent = !cache_->layer_plan(l).exact && pos >= cfg_.comp.sinks && pos < frontier(n) &&
                                   cache_->position_class(pos) == 2;
    if (!compressed_latent) FUZZ_CHECK(c == 0);
    for (int j = 0; j < c; ++j) {
      FUZZ_CHECK(out[j] >= cfg_.comp.sinks && out[j] < pos);
      FUZZ_CHECK(cache_->position_class(out[j]) == 1);
      for (int i = 0; i < j; ++i) FUZZ_CHECK(out[i] != out[j]);
    }
    if (compressed_latent && !extreme_[std::size_t(l) * S_ + s]) {
      std::int64_t visible = 0;
      for (std::int64_t q = cfg_.comp.sinks; q < pos; ++q) visible += cache_->position_class(q) == 1;
      FUZZ_CHECK(c == std::min<std::int64_t>(k, visible));
    }
  }

  // Accessors with arbitrary arguments: out of range must be a typed error, not UB or std::out_of_range.
  void op_probe() {
    const int l = pick_index(L_), s = pick_index(S_);
    Expect e;
    if (!valid_layer(l) || !valid_seq(s)) e.add(ErrorCode::shape);
    std::int64_t n = -1;
    if (guarded(e, [&] { n = cache_->length(l, s); }, "length")) FUZZ_CHECK(n == len(l, s));
    Expect el;
    if (!valid_layer(l)) el.add(ErrorCode::shape);
    guarded(el, [&] { (void)cache_->layer_plan(l); }, "layer_plan");
    Expect es;
    if (!valid_seq(s)) es.add(ErrorCode::shape);
    guarded(es, [&] { (void)cache_->selection(s); }, "selection");
    const std::int64_t pos = in_.u8() < 200 ? in_.range(0, 255) : (in_.bit() ? -1 : std::int64_t(1) << 40);
    Expect ep;
    if (pos < 0 || pos >= cfg_.cap.max_tokens) ep.add(ErrorCode::order);
    int cls = -1;
    if (guarded(ep, [&] { cls = cache_->position_class(pos); }, "position_class"))
      FUZZ_CHECK(cls >= 0 && cls <= 2 && (cls == 0) == (pos < cfg_.comp.sinks));
    // projected_counts(n): one sequence of n tokens in every layer, from positions alone
    const std::int64_t pn = in_.u8() < 240 ? in_.range(0, 255) % (cfg_.cap.max_tokens + 1) : (in_.bit() ? -1 : cfg_.cap.max_tokens + 1);
    Expect ec;
    if (pn < 0 || pn > cfg_.cap.max_tokens) ec.add(ErrorCode::capacity);
    TokenCounts got;
    if (guarded(ec, [&] { got = cache_->projected_counts(pn); }, "projected_counts")) {
      TokenCounts want;
      const std::int64_t c = frontier(pn), S = cfg_.comp.sinks;
      for (int layer = 0; layer < L_; ++layer) {
        const LayerPlan& p = cache_->layer_plan(layer);
        want.tokens += pn;
        if (p.attend == Attend::pages && pn > 0) want.pages += (pn + page_ - 1) / page_;
        if (p.exact) {
          want.exact_layer += pn;
          continue;
        }
        want.sinks += std::min(pn, S);
        want.recent += pn - c;
        for (std::int64_t q = S; q < c; ++q) (cache_->position_class(q) == 1 ? want.references : want.latents) += 1;
      }
      FUZZ_CHECK(same_counts(got, want));
    }
  }

  Input& in_;
  Config cfg_;
  FixedStride sel_;
  Pol pol_;
  Compressor<float> codec_;
  bool identity_;
  int page_;
  Dev dev_;
  std::vector<LinearEncoder<float>> enc_;
  std::vector<LinearDecoder<float>> dec_;
  std::vector<std::byte> storage_, workspace_;
  std::unique_ptr<Cache> cache_;
  int L_ = 0, S_ = 0, D_ = 0, QD_ = 0;
  std::vector<std::vector<float>> rows_;  // [L * S] appended rows, the model
  std::vector<bool> extreme_;             // [L * S] some appended value is huge (skip closeness checks)
  std::vector<bool> has_sel_;             // [S] an OmniKV filter layer has selected for the sequence
};

// ---- header --------------------------------------------------------------------------------------

Compressor<float> make_codec(Input& in, int L, int D, int dc, bool identity, bool bias, bool wrong_shape) {
  if (identity) return Compressor<float>::identity(L, D);
  Rng r{in.u16() * 7919ull + 3};
  Compressor<float> c;
  c.kv_dim = D;
  c.latent_dim = dc;
  c.layers.resize(L);
  for (auto& l : c.layers) {
    const int out = wrong_shape ? dc + 1 : dc;
    l.down.in = D;
    l.down.out = out;
    l.down.w.resize(std::size_t(out) * D);
    for (auto& w : l.down.w) w = r.uniform(-0.5f, 0.5f);
    l.up.in = dc;
    l.up.out = D;
    l.up.w.resize(std::size_t(D) * dc);
    for (auto& w : l.up.w) w = r.uniform(-0.5f, 0.5f);
    if (bias) {
      l.down.b.resize(out);
      l.up.b.resize(D);
      for (auto& b : l.down.b) b = r.uniform(-1.f, 1.f);
      for (auto& b : l.up.b) b = r.uniform(-1.f, 1.f);
    }
  }
  return c;
}

template <class Pol>
void run_program(Input& in, const Config& cfg, int stride, Pol pol, bool identity, int page, bool bias, bool wrong_codec,
                 bool short_storage, bool short_workspace) {
  using C = CompressedCache<float, Dev, FixedStride, LinearEncoder<float>, LinearDecoder<float>, Pol>;
  const std::int64_t D64 = 2 * std::int64_t{cfg.model.n_kv_heads} * cfg.model.head_dim;
  const std::int64_t QD64 = std::int64_t{cfg.model.n_q_heads} * cfg.model.head_dim;
  if (D64 > std::numeric_limits<int>::max() || QD64 > std::numeric_limits<int>::max()) {
    bool refused = false;  // sizes that do not fit in int are a ConfigError
    try {
      (void)C::layout(cfg, FixedStride(stride), pol, 0);
    } catch (const ConfigError&) {
      refused = true;
    }
    FUZZ_CHECK(refused);
    return;
  }
  const int D = cfg.model.kv_dim();
  const int dc = cfg.latent_dim();
  if (D <= 0 || D > 64 || dc <= 0 || dc > 64 || cfg.model.n_layers <= 0 || cfg.model.n_layers > 8) {
    // Geometry the codec cannot even be built for: only the configuration check is exercised.
    try {
      (void)C::layout(cfg, FixedStride(stride), pol, 0);
    } catch (const Error&) {
    }
    return;
  }
  Program<Pol> p(in, cfg, stride, std::move(pol), make_codec(in, cfg.model.n_layers, D, dc, identity, bias, wrong_codec),
                 identity, page);
  if (!p.build(short_storage, short_workspace)) return;
  if (wrong_codec) FUZZ_CHECK(p.all_layers_exact());  // codec shapes are only checked where they are used
  p.run();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Input in{data, size};
  const int policy = in.u8() % 4;
  const std::uint8_t flags = in.u8();
  const bool raw = (flags & 0x80) != 0;  // some fields unsanitised
  const bool identity = (flags & 0x01) != 0;
  const bool bias = !identity && (flags & 0x02) != 0;
  const bool wrong_codec = !identity && (flags & 0x7C) == 0x7C;
  const bool short_storage = (flags & 0x7E) == 0x40;
  const bool short_workspace = (flags & 0x7E) == 0x42;

  Config cfg;
  const int L = in.range(1, 4);
  const int hkv = in.range(1, 2);
  const int group = in.range(1, 2);
  const int hd = 2 * in.range(1, 4);
  cfg.model = {L, hkv * group, hkv, hd};
  const int D = cfg.model.kv_dim();
  cfg.comp.sinks = in.range(0, 5);
  cfg.comp.recent = in.range(0, 12);
  cfg.comp.block = in.range(0, 6);
  cfg.comp.k_neighbors = in.range(1, 4);
  cfg.comp.metric = static_cast<Metric>(in.range(0, 2));
  const int bits_pick = in.range(0, 3);
  cfg.comp.latent_bits = bits_pick == 2 ? 8 : bits_pick == 3 ? 4 : 0;
  if (identity) {
    cfg.comp.latent_dim = D;  // the identity codec needs d_c = kv_dim
  } else if (in.u8() < 40) {
    cfg.comp.latent_dim = 0;  // the default, kv_dim / 4
  } else {
    cfg.comp.latent_dim = in.range(1, D);
    if (cfg.comp.latent_bits == 4 && cfg.comp.latent_dim % 2) cfg.comp.latent_dim += cfg.comp.latent_dim < D ? 1 : -1;
  }
  cfg.rope.style = static_cast<RopeStyle>(in.range(0, 2));
  cfg.rope.theta = in.bit() ? 10000.0 : 500.0;
  cfg.rope.rot_dim = in.bit() ? 0 : 2 * in.range(1, hd / 2);
  const int stride = in.range(1, 8);
  cfg.cap.max_seqs = in.range(1, 3);
  cfg.cap.max_tokens = in.range(1, 128);
  cfg.cap.max_query_rows = in.range(1, 4);
  cfg.comp.blocks_per_pass = in.range(1, 5);
  if (raw) {  // invalid values the configuration check must refuse with a typed error
    switch (in.u8() % 11) {
      case 0: cfg.model.n_kv_heads = in.range(-1, 3); break;
      case 1: cfg.model.head_dim = in.range(-2, 3); break;
      case 2: cfg.comp.sinks = -in.range(1, 3); break;
      case 3: {  // k outside [1, kMaxNeighbors]: refused by the configuration check, up front
        cfg.comp.k_neighbors = in.bit() ? in.range(-1, 0) : kMaxNeighbors + in.range(1, 2);
        bool refused = false;
        try {
          validate(cfg);
        } catch (const ConfigError&) {
          refused = true;
        }
        FUZZ_CHECK(refused);
        break;
      }
      case 4: cfg.comp.latent_bits = in.range(0, 9); break;
      case 5: cfg.rope.rot_dim = in.range(-3, 20); break;
      case 6: cfg.rope.theta = in.bit() ? 0.0 : -1.0; break;
      case 7: cfg.cap.max_tokens = in.bit() ? 0 : -5; break;
      case 8: cfg.cap.max_query_rows = 0; cfg.cap.max_seqs = in.range(-1, 0); break;
#ifndef DELTAKV_FUZZ_SKIP_OPEN_FINDINGS
      case 9:  // sizes whose products overflow int
        cfg.model.n_kv_heads = 65536 + in.range(0, 3);
        cfg.model.n_q_heads = cfg.model.n_kv_heads * in.range(1, 2);
        cfg.model.head_dim = 32768;
        break;
#endif
      default: cfg.model.n_q_heads = in.range(0, 5); break;
    }
  }

  switch (policy) {
    case 0:
      run_program(in, cfg, stride, DensePolicy{}, identity, 1, bias, wrong_codec, short_storage, short_workspace);
      break;
    case 1: {
      OmniKVPolicy p;
      p.full_layers.clear();
      const std::uint8_t mask = in.u8();
      for (int l = 0; l < L; ++l)
        if (l == 0 ? (mask & 0x80) == 0 || raw : ((mask >> l) & 1)) p.full_layers.push_back(l);
      p.top_k = in.range(raw ? -1 : 1, 24);
      p.sinks = in.range(0, 4);
      p.window = in.range(0, 12);
      p.exact_full_layers = in.bit();
      run_program(in, cfg, stride, p, identity, 1, bias, wrong_codec, short_storage, short_workspace);
      break;
    }
    case 2: {
      QuestPolicy p;
      p.page = in.range(raw ? 0 : 1, 8);
      p.budget = in.range(raw ? -1 : 1, 40);
      p.dense_layers = in.range(0, 2);
      p.sinks = in.range(0, 4);
      p.window = in.range(0, 12);
      run_program(in, cfg, stride, p, identity, p.page, bias, wrong_codec, short_storage, short_workspace);
      break;
    }
    default: {
      StreamingPolicy p;
      p.sinks = in.range(0, 4);
      p.window = in.range(raw ? -1 : 0, 16);
      run_program(in, cfg, stride, p, identity, 1, bias, wrong_codec, short_storage, short_workspace);
      break;
    }
  }
  return 0;
}
