#pragma once
// The CPU backend: the correctness oracle for every other backend. Plain loops where clarity is
// the point, Eigen where a GEMM is the point (linear maps, reference search). T = float for
// engines, T = double for tests that need 1e-12-level agreement.
//
// The device keeps one scratch vector that grows to the largest request it has seen (reference
// search scores, top-k indices); in steady state it allocates nothing. One device per thread.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "deltakv/device.hpp"

namespace deltakv::cpu {

template <class T>
class CpuDevice {
 public:
  static constexpr int device_interface = 3;  // deltakv/device.hpp: kDeviceInterface
  using A = accum_t<T>;
  using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using CMap = Eigen::Map<const RowMat, 0, Eigen::OuterStride<>>;
  using MMap = Eigen::Map<RowMat, 0, Eigen::OuterStride<>>;

  void linear(const LinearParams<T>& p) {
    if (p.n == 0) return;
    CMap x(p.x, p.n, p.in, Eigen::OuterStride<>(p.ldx));
    CMap w(p.w, p.out, p.in, Eigen::OuterStride<>(p.in));
    MMap y(p.y, p.n, p.out, Eigen::OuterStride<>(p.ldy));
    y.noalias() = x * w.transpose();
    if (p.b) {
      Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> b(p.b, p.out);
      y.rowwise() += b;
    }
  }

  void swiglu(const SwiGLUParams<T>& p) {
    for (std::int64_t i = 0; i < p.n; ++i) {
      T* h = p.h + i * p.ldh;
      const T* r = p.sub ? p.sub + i * p.ld_sub : nullptr;
      auto swiglu_value = [](A g, A u) { return g / (A(1) + std::exp(-g)) * u; };
      for (int j = 0; j < p.hidden; ++j) {
        A v = swiglu_value(A(h[j]), A(h[p.hidden + j]));
        if (r) v -= swiglu_value(A(r[j]), A(r[p.hidden + j]));
        h[j] = static_cast<T>(v);
      }
    }
  }

  void axpy_rows(const AxpyRowsParams<T>& p) {
    for (std::int64_t i = 0; i < p.n; ++i)
      for (int j = 0; j < p.dim; ++j) p.y[i * p.ldy + j] += p.alpha * p.x[i * p.ldx + j];
  }

  // Scores in chunks of references through one GEMM each; a per-row insertion list keeps the k best.
  void ref_search(const RefSearchParams<T>& p) {
    check_ref_search_readable(p);  // rows past m are never read here
    if (p.n == 0) return;
    constexpr std::int64_t kChunk = 256;
    grow(scratch_, std::size_t(p.n) * kChunk + kChunk);
    grow(best_, std::size_t(p.n) * p.k);
    for (std::int64_t i = 0; i < p.n * p.k; ++i) best_[i] = {-std::numeric_limits<A>::infinity(), -1};
    CMap x(p.x, p.n, p.dim, Eigen::OuterStride<>(p.ldx));
    std::vector<A> xnorm;  // only for cosine; small (n)
    if (p.metric == Metric::cosine) {
      xnorm.resize(p.n);
      for (std::int64_t i = 0; i < p.n; ++i) xnorm[i] = std::sqrt(A(x.row(i).squaredNorm()));
    }
    std::int32_t max_vis = 0;
    for (std::int64_t i = 0; i < p.n; ++i) max_vis = std::max(max_vis, p.visible[i]);
    for (std::int64_t j0 = 0; j0 < max_vis; j0 += kChunk) {
      const std::int64_t mc = std::min<std::int64_t>(kChunk, max_vis - j0);
      CMap r(p.refs + j0 * p.ldr, mc, p.dim, Eigen::OuterStride<>(p.ldr));
      Eigen::Map<RowMat> s(scratch_.data(), p.n, mc);
      s.noalias() = x * r.transpose();
      T* rn = scratch_.data() + p.n * mc;
      for (std::int64_t j = 0; j < mc; ++j) rn[j] = r.row(j).squaredNorm();
      for (std::int64_t i = 0; i < p.n; ++i) {
        auto* best = best_.data() + i * p.k;
        const std::int64_t lim = std::min<std::int64_t>(mc, p.visible[i] - j0);
        for (std::int64_t j = 0; j < lim; ++j) {
          A sc = s(i, j);
          if (p.metric == Metric::l2) sc = A(2) * sc - A(rn[j]);
          else if (p.metric == Metric::cosine) sc = sc / std::max(A(1e-30), xnorm[i] * std::sqrt(A(rn[j])));
          if (!(sc > best[p.k - 1].first)) continue;  // ties keep the earlier reference
          int q = p.k - 1;
          while (q > 0 && sc > best[q - 1].first) {
            best[q] = best[q - 1];
            --q;
          }
          best[q] = {sc, static_cast<std::int32_t>(j0 + j)};
        }
      }
    }
    for (std::int64_t i = 0; i < p.n * p.k; ++i) p.ids[i] = best_[i].second;
  }

  void gather_mean(const GatherMeanParams<T>& p) {
    for (std::int64_t i = 0; i < p.n; ++i) {
      const std::int64_t r = p.id_rows ? p.id_rows[i] : i;
      const std::int32_t* ids = p.ids + r * p.k;
      T* o = p.out + i * p.ldo;
      int c = 0;
      for (int j = 0; j < p.k; ++j) c += ids[j] >= 0;
      for (int d = 0; d < p.dim; ++d) {
        A acc = 0;
        for (int j = 0; j < p.k; ++j)
          if (ids[j] >= 0) acc += A(p.refs[std::int64_t(ids[j]) * p.ldr + d]);
        o[d] = c ? static_cast<T>(acc / A(c)) : T(0);
      }
    }
  }

  void quantize(const QuantizeParams<T>& p) {
    const int levels = (1 << p.bits) - 1;
    for (std::int64_t i = 0; i < p.n; ++i) {
      const T* z = p.z + i * p.ldz;
      if (p.sub) {  // the row z - sub, through axpy_rows(alpha = -1) itself
        grow(diff_, std::size_t(p.dim));
        std::copy(z, z + p.dim, diff_.begin());
        axpy_rows(AxpyRowsParams<T>{p.sub + i * p.ld_sub, p.ld_sub, diff_.data(), p.dim, 1, p.dim, T(-1)});
        z = diff_.data();
      }
      float lo = float(z[0]), hi = float(z[0]);
      for (int j = 1; j < p.dim; ++j) {
        lo = std::min(lo, float(z[j]));
        hi = std::max(hi, float(z[j]));
      }
      float scale = (hi - lo) / float(levels);
      if (!(scale > 0)) scale = 1.0f;  // constant row: every code 0 decodes to lo exactly
      p.scale_min[2 * i] = scale;
      p.scale_min[2 * i + 1] = lo;
      std::uint8_t* q = p.q + i * p.ldq;
      if (p.bits == 4) std::memset(q, 0, std::size_t(p.dim + 1) / 2);
      for (int j = 0; j < p.dim; ++j) {
        const int c = std::clamp(int(std::lround((float(z[j]) - lo) / scale)), 0, levels);
        if (p.bits == 8) q[j] = std::uint8_t(c);
        else q[j / 2] |= std::uint8_t(c << (4 * (j & 1)));
      }
    }
  }

  void dequantize(const DequantizeParams<T>& p) {
    for (std::int64_t i = 0; i < p.n; ++i) {
      const std::int64_t r = p.rows ? p.rows[i] : i;
      const std::uint8_t* q = p.q + r * p.ldq;
      const float scale = p.scale_min[2 * r], lo = p.scale_min[2 * r + 1];
      for (int j = 0; j < p.dim; ++j) {
        const int c = p.bits == 8 ? q[j] : (q[j / 2] >> (4 * (j & 1))) & 0xF;
        p.z[i * p.ldz + j] = static_cast<T>(float(c) * scale + lo);
      }
    }
  }

  void rope(const RopeParams<T>& p) {
    // Angles depend on (position, frequency) only: one sin/cos per pair, shared by all heads.
    const int half = p.rot_dim / 2;
    grow(rope_, std::size_t(3 * half));
    double* inv = rope_.data();
    double* cs = inv + half;
    double* sn = cs + half;
    for (int f = 0; f < half; ++f) inv[f] = std::pow(p.theta, -2.0 * f / p.rot_dim);
    for (std::int64_t i = 0; i < p.n; ++i) {
      for (int f = 0; f < half; ++f) {
        const double ang = double(p.pos[i]) * inv[f];
        cs[f] = std::cos(ang);
        sn[f] = std::sin(ang);
      }
      for (int h = 0; h < p.n_heads; ++h) {
        T* x = p.x + i * p.ldx + std::int64_t(h) * p.head_dim;
        for (int f = 0; f < half; ++f) {
          const int a = p.style == RopeStyle::half ? f : 2 * f;
          const int b = p.style == RopeStyle::half ? f + half : 2 * f + 1;
          const double x1 = x[a], x2 = x[b];
          x[a] = static_cast<T>(x1 * cs[f] - x2 * sn[f]);
          x[b] = static_cast<T>(x2 * cs[f] + x1 * sn[f]);
        }
      }
    }
  }

  // Per kv head: scores of all its query rows against the tile in one GEMM, the online-softmax
  // update row by row, then probabilities x V in a second GEMM.
  void attn_tile(const AttnTileParams<T>& p) {
    static_assert(std::is_same_v<A, T>, "the CPU backend computes in its storage type");
    if (p.nq == 0 || p.ntile == 0) return;
    const int group = p.n_q_heads / p.n_kv_heads, d = p.head_dim, rows = p.nq * group;
    grow(scratch_, std::size_t(rows) * (d + 2 * std::size_t(p.ntile) + d));
    T* qg = scratch_.data();
    T* sc = qg + std::size_t(rows) * d;
    T* pv = sc + std::size_t(rows) * p.ntile;
    constexpr A kNegInf = -std::numeric_limits<A>::infinity();
    for (int g = 0; g < p.n_kv_heads; ++g) {
      for (int i = 0; i < p.nq; ++i)
        for (int hh = 0; hh < group; ++hh)
          std::memcpy(qg + (std::size_t(i) * group + hh) * d, p.q + std::int64_t(i) * p.ldq + std::int64_t(g * group + hh) * d,
                      sizeof(T) * d);
      Eigen::Map<const RowMat> Q(qg, rows, d);
      CMap K(p.k + std::int64_t(g) * d, p.ntile, d, Eigen::OuterStride<>(p.ldkv));
      CMap V(p.v + std::int64_t(g) * d, p.ntile, d, Eigen::OuterStride<>(p.ldkv));
      Eigen::Map<RowMat> S(sc, rows, p.ntile);
      S.noalias() = (Q * K.transpose()) * T(p.scale);
      bool any = false;
      for (int r = 0; r < rows; ++r) {
        const int i = r / group, h = g * group + r % group;
        T* s = sc + std::size_t(r) * p.ntile;
        A mt = kNegInf;
        for (int j = 0; j < p.ntile; ++j) {
          if (p.kv_pos[j] > p.q_pos[i]) s[j] = kNegInf;
          else mt = std::max(mt, A(s[j]));
        }
        const std::int64_t st = std::int64_t(i) * p.n_q_heads + h;
        if (mt == kNegInf) {  // nothing visible in this tile: probabilities 0, state untouched
          std::fill(s, s + p.ntile, T(0));
          continue;
        }
        any = true;
        A& m = p.m[st];
        A& l = p.l[st];
        const A m_new = l == A(0) ? mt : std::max(m, mt);
        const A corr = l == A(0) ? A(0) : std::exp(m - m_new);
        A sum = 0;
        for (int j = 0; j < p.ntile; ++j) {
          const A w = s[j] == kNegInf ? A(0) : std::exp(A(s[j]) - m_new);
          s[j] = T(w);
          sum += w;
        }
        l = l * corr + sum;
        m = m_new;
        A* acc = p.acc + st * d;
        for (int e = 0; e < d; ++e) acc[e] *= corr;
      }
      if (!any) continue;
      Eigen::Map<RowMat> PV(pv, rows, d);
      PV.noalias() = S * V;
      for (int r = 0; r < rows; ++r) {
        const int i = r / group, h = g * group + r % group;
        A* acc = p.acc + (std::int64_t(i) * p.n_q_heads + h) * d;
        for (int e = 0; e < d; ++e) acc[e] += pv[std::size_t(r) * d + e];
      }
    }
  }

  void attn_finish(const AttnFinishParams<T>& p) {
    for (int i = 0; i < p.nq; ++i)
      for (int h = 0; h < p.n_q_heads; ++h) {
        const std::int64_t st = std::int64_t(i) * p.n_q_heads + h;
        for (int e = 0; e < p.head_dim; ++e)
          p.out[std::int64_t(i) * p.ldo + std::int64_t(h) * p.head_dim + e] =
              p.l[st] > A(0) ? static_cast<T>(p.acc[st * p.head_dim + e] / p.l[st]) : T(0);
      }
  }

  void score_tile(const ScoreTileParams<T>& p) {
    const int group = p.n_q_heads / p.n_kv_heads;
    for (int j = 0; j < p.ntile; ++j) {
      A best = 0;
      for (int i = 0; i < p.nq; ++i) {
        if (p.kv_pos[j] > p.q_pos[i]) continue;
        for (int h = 0; h < p.n_q_heads; ++h) {
          const std::int64_t st = std::int64_t(i) * p.n_q_heads + h;
          if (!(p.l[st] > A(0))) continue;
          const T* q = p.q + std::int64_t(i) * p.ldq + std::int64_t(h) * p.head_dim;
          const T* k = p.k + std::int64_t(j) * p.ldk + std::int64_t(h / group) * p.head_dim;
          A d = 0;
          for (int e = 0; e < p.head_dim; ++e) d += A(q[e]) * A(k[e]);
          best = std::max(best, std::exp(d * A(p.scale) - p.m[st]) / p.l[st]);
        }
      }
      p.scores[j] = static_cast<float>(best);
    }
  }

  void page_bounds(const PageBoundsParams<T>& p) {
    for (std::int64_t i = 0; i < p.n; ++i) {
      const std::int64_t page = p.pos[i] / p.page_size;
      const T* k = p.k + i * p.ldk;
      T* mn = p.kmin + page * p.dim;
      T* mx = p.kmax + page * p.dim;
      const bool first = p.pos[i] % p.page_size == 0;
      for (int d = 0; d < p.dim; ++d) {
        mn[d] = first ? k[d] : std::min(mn[d], k[d]);
        mx[d] = first ? k[d] : std::max(mx[d], k[d]);
      }
    }
  }

  void page_score(const PageScoreParams<T>& p) {
    const int group = p.n_q_heads / p.n_kv_heads;
    const int kd = p.n_kv_heads * p.head_dim;
    for (std::int64_t pg = 0; pg < p.n_pages; ++pg) {
      A best = -std::numeric_limits<A>::infinity();
      for (int i = 0; i < p.nq; ++i)
        for (int h = 0; h < p.n_q_heads; ++h) {
          const T* q = p.q + std::int64_t(i) * p.ldq + std::int64_t(h) * p.head_dim;
          const std::int64_t off = pg * kd + std::int64_t(h / group) * p.head_dim;
          A sum = 0;
          for (int e = 0; e < p.head_dim; ++e)
            sum += std::max(A(q[e]) * A(p.kmin[off + e]), A(q[e]) * A(p.kmax[off + e]));
          best = std::max(best, sum);
        }
      p.scores[pg] = static_cast<float>(best);
    }
  }

  void topk(const TopKParams& p) {
    grow(idx_, std::size_t(p.n));
    std::iota(idx_.begin(), idx_.begin() + p.n, 0);
    const int k = static_cast<int>(std::min<std::int64_t>(p.k, p.n));
    std::partial_sort(idx_.begin(), idx_.begin() + k, idx_.begin() + p.n, [&](std::int32_t a, std::int32_t b) {
      return p.scores[a] > p.scores[b] || (p.scores[a] == p.scores[b] && a < b);
    });
    std::copy(idx_.begin(), idx_.begin() + k, p.idx);
  }

  void copy_rows(const CopyRowsParams<T>& p) {
    for (std::int64_t i = 0; i < p.n; ++i) {
      const std::int64_t s = p.src_rows ? p.src_rows[i] - p.src_row_base : i;
      const std::int64_t d = p.dst_rows ? p.dst_rows[i] : i;
      std::memmove(p.dst + d * p.ldd, p.src + s * p.lds, sizeof(T) * std::size_t(p.dim));
    }
  }

  bool all_finite(const FiniteCheckParams<T>& p) {
    for (std::int64_t i = 0; i < p.n; ++i)
      for (int j = 0; j < p.dim; ++j)
        if (!std::isfinite(p.x[i * p.ldx + j])) return false;
    return true;
  }
  // Synchronous here: the answer is ready at once.
  void start_finite_check(const FiniteCheckParams<T>& p) { finite_ok_ = all_finite(p); }
  bool finite_check_result() const { return finite_ok_; }

  void to_host(void* dst, const void* src, std::size_t bytes) { if (bytes) std::memcpy(dst, src, bytes); }
  void to_device(void* dst, const void* src, std::size_t bytes) { if (bytes) std::memcpy(dst, src, bytes); }
  void fill_zero(void* p, std::size_t bytes) { if (bytes) std::memset(p, 0, bytes); }

 private:
  bool finite_ok_ = true;  // start_finite_check's answer
  template <class V>
  static void grow(V& v, std::size_t n) {
    if (v.size() < n) v.resize(n);
  }
  std::vector<T> scratch_, diff_;  // diff_: quantize's z - sub row
  std::vector<std::pair<A, std::int32_t>> best_;
  std::vector<std::int32_t> idx_;
  std::vector<double> rope_;
};

static_assert(Device<CpuDevice<float>, float> && Device<CpuDevice<double>, double>);

}  // namespace deltakv::cpu
