#pragma once
// The abstract device interface: the few ops the cache needs, each taking one plain-data parameter
// struct (pointers, strides, sizes; shapes in the comments). A backend is any type that provides
// them (checked by the Device concept). All pointers are device pointers of that backend; the
// cache never dereferences them on the host except through these ops and copy_to_host.
//
// Conventions: row-major, ld = elements between rows; T is the storage type, accum_t<T> the type
// of running sums (f32 for f32/bf16/f16, f64 for the f64 test path).
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "deltakv/config.hpp"
#include "deltakv/error.hpp"

namespace deltakv {

template <class T>
using accum_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T>
struct LinearParams {  // y[n, out] = x[n, in] · W^T + b
  const T* x; std::int64_t ldx;
  T* y; std::int64_t ldy;
  std::int64_t n;
  const T* w;  // [out, in] row-major (torch nn.Linear layout)
  const T* b;  // [out] or nullptr
  int in; int out;
};

template <class T>
struct SwiGLUParams {  // h[:, :hidden] = silu(h[:, :hidden]) * h[:, hidden:2*hidden]
  T* h; std::int64_t ldh; std::int64_t n; int hidden;
  // optional: h[:, :hidden] = swiglu(h) - swiglu(sub) instead (sub [n, 2*hidden], the same layout),
  // the difference taken in the accumulation type (float on GPUs) and rounded to T once: a residual
  // encoder's hidden rows, whose linear last map then runs once on the difference
  // (SwiGLUEncoder::encode_residual). Interface revision 2 (kDeviceInterface).
  const T* sub = nullptr; std::int64_t ld_sub = 0;
};

template <class T>
struct AxpyRowsParams {  // y[n, dim] = alpha * x[n, dim] + y
  const T* x; std::int64_t ldx; T* y; std::int64_t ldy; std::int64_t n; int dim; T alpha;
};

template <class T>
struct RefSearchParams {  // ids[i, :k]: the k best of refs[0 .. visible[i]) for x[i], best first
  const T* x; std::int64_t ldx; std::int64_t n;          // x [n, dim]
  const T* refs; std::int64_t ldr; std::int64_t m;       // refs [m, dim], in position order
  const std::int32_t* visible;                           // [n], <= m: causal prefix of refs
  int dim; int k; Metric metric;
  std::int32_t* ids;                                     // [n, k], -1 where fewer than k visible
  // optional: rows of refs that may be read (>= m; 0: m). Rows past m are never chosen; a device
  // may score them with the rest (a GEMM over whole groups of 8 references) and ignore the result.
  std::int64_t m_readable = 0;
  // optional (l2): |refs[j]|^2 for j < m as float sums of squares (CopyRowsBatchParams::sq_norms
  // kept them when the references were stored), max(m, m_readable) entries readable (those past m
  // ignored); a device may use them instead of computing them (the GPU: where they are 16-byte
  // aligned and reach m rounded up to 4, as its top-k reads them four at a time)
  const float* ref_sq_norms = nullptr;
};
template <class T>
void check_ref_search_readable(const RefSearchParams<T>& p) {
  if (p.m_readable != 0 && p.m_readable < p.m)
    throw ShapeError("ref_search: m_readable " + std::to_string(p.m_readable) + " < m " + std::to_string(p.m));
}

template <class T>
struct GatherMeanParams {  // out[i] = mean_j refs[ids[r_i, j]] over ids >= 0 (zeros if none)
  const std::int32_t* ids; int k; std::int64_t n;        // ids [rows, k]
  const std::int64_t* id_rows;                           // [n]: r_i; nullptr: r_i = i
  const T* refs; std::int64_t ldr; int dim;              // refs [m, dim]
  T* out; std::int64_t ldo;                              // out [n, dim]
};

template <class T>
struct QuantizeParams {  // token-wise asymmetric: q = round((z - min) / scale), 2^bits levels
  const T* z; std::int64_t ldz; std::int64_t n; int dim; int bits;  // z [n, dim]; bits 8 or 4
  std::uint8_t* q; std::int64_t ldq;                                 // [n, ldq bytes]; int4 packs 2/byte, low nibble first
  float* scale_min;                                                  // [n, 2]: scale, min
  // optional: quantize z - sub instead (sub [n, dim]), each difference rounded to T first, exactly
  // as axpy_rows(alpha = -1) would store it (the latent residual f_c(x) - f_c(ref) in one pass).
  // Interface revision 2 (kDeviceInterface).
  const T* sub = nullptr; std::int64_t ld_sub = 0;
};

template <class T>
struct DequantizeParams {  // z[i] = q[i] * scale + min, for rows rows[i] of the packed store
  const std::uint8_t* q; std::int64_t ldq; const float* scale_min; int dim; int bits;
  const std::int64_t* rows; std::int64_t n;   // which stored rows; nullptr: 0..n-1
  T* z; std::int64_t ldz;                     // out [n, dim]
};

template <class T>
struct RopeParams {  // rotate the first rot_dim dims of each head of x[n, n_heads*head_dim] in place
  T* x; std::int64_t ldx; std::int64_t n;
  const std::int64_t* pos;                    // [n]
  int n_heads; int head_dim; int rot_dim; RopeStyle style; double theta;
};

template <class T>
struct AttnTileParams {  // online-softmax update of queries against one tile of keys/values
  const T* q; std::int64_t ldq; int nq;       // q [nq, n_q_heads*head_dim], post-RoPE
  const std::int64_t* q_pos;                  // [nq]: key j is visible iff kv_pos[j] <= q_pos[i]
  const T* k; const T* v; std::int64_t ldkv; int ntile;  // k, v [ntile, n_kv_heads*head_dim]
  const std::int64_t* kv_pos;                 // [ntile]
  int n_q_heads; int n_kv_heads; int head_dim; double scale;
  accum_t<T>* m; accum_t<T>* l; accum_t<T>* acc;  // running max, sum [nq, Hq]; acc [nq, Hq, d]
};

template <class T>
struct AttnFinishParams {  // out = acc / l (rows with l == 0, i.e. nothing visible, give 0)
  const accum_t<T>* l; const accum_t<T>* acc; int nq; int n_q_heads; int head_dim;
  T* out; std::int64_t ldo;
};

template <class T>
struct ScoreTileParams {  // scores[j] = max over query rows and heads of softmax probability of key j
  const T* q; std::int64_t ldq; int nq; const std::int64_t* q_pos;
  const T* k; std::int64_t ldk; int ntile; const std::int64_t* kv_pos;
  int n_q_heads; int n_kv_heads; int head_dim; double scale;
  const accum_t<T>* m; const accum_t<T>* l;   // final softmax statistics of the attention pass
  float* scores;                              // [ntile]
};

template <class T>
struct PageBoundsParams {  // fold keys k[n, Hkv*d] (post-RoPE) into per-page min/max
  const T* k; std::int64_t ldk; std::int64_t n; const std::int64_t* pos;
  int page_size; int dim;                     // dim = Hkv*d
  T* kmin; T* kmax;                           // [pages, dim]; page p covers positions [p*P, (p+1)*P)
};

template <class T>
struct PageScoreParams {  // scores[p] = max over rows/heads of sum_d max(q_d*min_d, q_d*max_d)
  const T* q; std::int64_t ldq; int nq;
  const T* kmin; const T* kmax; std::int64_t n_pages;
  int n_q_heads; int n_kv_heads; int head_dim;
  float* scores;                              // [n_pages]
};

struct TopKParams {  // idx[0..k): indices of the k largest scores[0..n), descending, ties to lower index
  const float* scores; std::int64_t n; int k; std::int32_t* idx;
};

template <class T>
struct CopyRowsParams {  // dst[dst_rows[i]] = src[src_rows[i] - src_row_base] (nullptr row lists: identity)
  const T* src; std::int64_t lds; const std::int64_t* src_rows;
  T* dst; std::int64_t ldd; const std::int64_t* dst_rows;
  std::int64_t n; int dim;
  std::int64_t src_row_base = 0;  // subtracted from listed source rows (a table of positions read at an offset)
};

// Up to kMaxParts independent row copies as one op (a compression pass gathers its references and
// its other tokens, each from the ring and from the input: four copies a GPU runs in one launch).
// Parts with n <= 0 are skipped; no part's destination may overlap another part's source or
// destination. Optional for a device: copy_rows_batch(dev, b) below falls back to copy_rows.
template <class T>
struct CopyRowsBatchParams {
  static constexpr int kMaxParts = 4;
  CopyRowsParams<T> part[kMaxParts];  // parts [0, n_parts) are copied, each as copy_rows would
  int n_parts = 0;                    // in [0, kMaxParts] (check_copy_rows_batch)
  // optional, per part: sq_norms[j][i] = |row i of part j|^2, the sum of its squares in float (the
  // norms an l2 search needs: RefSearchParams::ref_sq_norms). Only a device with copy_rows_batch
  // computes them (the part-by-part fallback refuses them); the part's rows must be contiguous
  // (dst_rows nullptr).
  float* sq_norms[kMaxParts] = {};
};
template <class T>
void check_copy_rows_batch(const CopyRowsBatchParams<T>& b) {
  if (b.n_parts < 0 || b.n_parts > CopyRowsBatchParams<T>::kMaxParts)
    throw ShapeError("copy_rows_batch: n_parts " + std::to_string(b.n_parts) + " not in [0, " +
                     std::to_string(CopyRowsBatchParams<T>::kMaxParts) + "]");
  for (int j = 0; j < b.n_parts; ++j)
    if (b.sq_norms[j] && b.part[j].dst_rows)
      throw ShapeError("copy_rows_batch: part " + std::to_string(j) + " asks for norms with a destination row list");
}

template <class T>
struct FiniteCheckParams { const T* x; std::int64_t ldx; std::int64_t n; int dim; };

// The interface's revision: it grows when an op's parameters gain a field that every device must
// honour (a device written before it would compile, ignore the field and compute something else).
// A device states the revision it implements, as a number (not as kDeviceInterface, which would
// follow every bump unread), and stops satisfying Device when the interface moves past it.
//   1: the ops as first written
//   2: QuantizeParams::sub and SwiGLUParams::sub (a residual computed in the op)
//   3: CopyRowsBatchParams::sq_norms (a device's copy_rows_batch computes the rows' norms)
inline constexpr int kDeviceInterface = 3;

// A backend D for element type T.
template <class D, class T>
concept Device = requires(D& d, std::size_t bytes, void* p, const void* cp) {
  requires D::device_interface == kDeviceInterface;
  { d.linear(LinearParams<T>{}) };
  { d.swiglu(SwiGLUParams<T>{}) };
  { d.axpy_rows(AxpyRowsParams<T>{}) };
  { d.ref_search(RefSearchParams<T>{}) };
  { d.gather_mean(GatherMeanParams<T>{}) };
  { d.quantize(QuantizeParams<T>{}) };
  { d.dequantize(DequantizeParams<T>{}) };
  { d.rope(RopeParams<T>{}) };
  { d.attn_tile(AttnTileParams<T>{}) };
  { d.attn_finish(AttnFinishParams<T>{}) };
  { d.score_tile(ScoreTileParams<T>{}) };
  { d.page_bounds(PageBoundsParams<T>{}) };
  { d.page_score(PageScoreParams<T>{}) };
  { d.topk(TopKParams{}) };
  { d.copy_rows(CopyRowsParams<T>{}) };
  { d.all_finite(FiniteCheckParams<T>{}) } -> std::convertible_to<bool>;  // waits for its answer
  // The same check started in the device's order and answered later (work queued in between runs
  // meanwhile); one check at a time: a new start replaces an unanswered one.
  { d.start_finite_check(FiniteCheckParams<T>{}) };
  { d.finite_check_result() } -> std::convertible_to<bool>;
  { d.to_host(p, cp, bytes) };     // device -> host
  { d.to_device(p, cp, bytes) };   // host -> device
  { d.fill_zero(p, bytes) };
};

// Optional ops: a device offers them or the cache does the same work with the ops above.
template <class D, class T>
concept CopiesRowBatches = requires(D& d) { d.copy_rows_batch(CopyRowsBatchParams<T>{}); };

template <class T, class D>
void copy_rows_batch(D& dev, const CopyRowsBatchParams<T>& b) {
  check_copy_rows_batch(b);
  if constexpr (CopiesRowBatches<D, T>) {
    dev.copy_rows_batch(b);
  } else {
    for (int i = 0; i < b.n_parts; ++i)
      if (b.sq_norms[i] && b.part[i].n > 0)
        throw ConfigError("copy_rows_batch: this device has no copy_rows_batch, so it cannot give the rows' norms");
    for (int i = 0; i < b.n_parts; ++i)
      if (b.part[i].n > 0) dev.copy_rows(b.part[i]);
  }
}

// A device that only declares the ops: lets component concepts be checked without a backend.
template <class T>
struct DeviceArchetype {
  static constexpr int device_interface = 3;
  void linear(const LinearParams<T>&);
  void swiglu(const SwiGLUParams<T>&);
  void axpy_rows(const AxpyRowsParams<T>&);
  void ref_search(const RefSearchParams<T>&);
  void gather_mean(const GatherMeanParams<T>&);
  void quantize(const QuantizeParams<T>&);
  void dequantize(const DequantizeParams<T>&);
  void rope(const RopeParams<T>&);
  void attn_tile(const AttnTileParams<T>&);
  void attn_finish(const AttnFinishParams<T>&);
  void score_tile(const ScoreTileParams<T>&);
  void page_bounds(const PageBoundsParams<T>&);
  void page_score(const PageScoreParams<T>&);
  void topk(const TopKParams&);
  void copy_rows(const CopyRowsParams<T>&);
  bool all_finite(const FiniteCheckParams<T>&);
  void start_finite_check(const FiniteCheckParams<T>&);
  bool finite_check_result();
  void to_host(void*, const void*, std::size_t);
  void to_device(void*, const void*, std::size_t);
  void fill_zero(void*, std::size_t);
};
static_assert(Device<DeviceArchetype<float>, float>);

}  // namespace deltakv
