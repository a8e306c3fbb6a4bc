#pragma once
// deltakv GPU kernels, one source for CUDA and HIP (vendor names only through vendor.hpp).
//
// Every kernel implements one op of the Device concept (include/deltakv/device.hpp) with the
// semantics of the CPU oracle (backends/cpu/include/deltakv/cpu/device.hpp), including its tie
// rules. T is the storage type (float, bf16, f16); all arithmetic is f32. Kernels that use warp
// shuffles take the warp size W as a template parameter and NT (threads per block) as another;
// they assume blockDim.x == NT, NT % W == 0 and NT / W <= W.
//
// Where the CPU computes a value in a fixed order with separate roundings (gather_mean's sums,
// dequantize, axpy_rows, quantize codes), the kernel does the same, so the results are
// bit-identical in f32; reductions whose order differs (GEMM, dot products, softmax sums) agree to
// rounding.
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "deltakv/device.hpp"
#include "vendor.hpp"
#include "vendor_ext.hpp"

namespace deltakv::gpu {

using vendor::from_float;
using vendor::to_float;

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Host-side launch checks: a base address that 16-byte loads may start at.
inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// ---- reductions ------------------------------------------------------------------------------
template <int W>
DELTAKV_GPU_D float warp_sum(float v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v += vendor::shfl_xor<W>(v, o);
  return v;
}

template <int W>
DELTAKV_GPU_D float warp_max(float v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v = fmaxf(v, vendor::shfl_xor<W>(v, o));
  return v;
}

// The block shapes every warp-level kernel assumes (see the top of this file). W is the warp
// size the kernels are instantiated for (vendor::kWarpSize: 32 NVIDIA and RDNA, 64 CDNA).
template <int W, int NT>
inline constexpr bool kWarpBlockShapeOk = W > 0 && (W & (W - 1)) == 0 && NT % W == 0 && NT / W <= W;

// Block-wide sum / max; every thread gets the result. red: >= NT / W floats of shared memory.
// Starts with a barrier, so red may be reused by consecutive calls.
template <int W, int NT, bool Max>
DELTAKV_GPU_D float block_reduce(float v, float* red) {
  static_assert(kWarpBlockShapeOk<W, NT>, "NT must be a multiple of W and NT / W <= W");
  constexpr int NW = NT / W;
  const int lane = threadIdx.x % W, warp = threadIdx.x / W;
  v = Max ? warp_max<W>(v) : warp_sum<W>(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  const float r = lane < NW ? red[lane] : (Max ? kNegInf : 0.f);
  return Max ? warp_max<W>(r) : warp_sum<W>(r);
}

template <int W, int NT>
DELTAKV_GPU_D float block_sum(float v, float* red) {
  return block_reduce<W, NT, false>(v, red);
}

template <int W, int NT>
DELTAKV_GPU_D float block_max(float v, float* red) {
  return block_reduce<W, NT, true>(v, red);
}

// Exclusive prefix sum over the block in thread order; `total` gets the block's sum.
// red: >= NT / W ints of shared memory. Starts with a barrier.
template <int W, int NT>
DELTAKV_GPU_D int block_exclusive_scan(int v, int* red, int& total) {
  static_assert(kWarpBlockShapeOk<W, NT>, "NT must be a multiple of W and NT / W <= W");
  constexpr int NW = NT / W;
  const int lane = threadIdx.x % W, warp = threadIdx.x / W;
  int x = v;
#pragma unroll
  for (int o = 1; o < W; o <<= 1) {
    const int y = vendor::shfl_up<W>(x, static_cast<unsigned>(o));
    if (lane >= o) x += y;
  }
  __syncthreads();
  if (lane == W - 1) red[warp] = x;
  __syncthreads();
  int before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < NW; ++w) {
    const int t = red[w];
    before += w < warp ? t : 0;
    all += t;
  }
  total = all;
  return before + x - v;
}

// std::min / std::max exactly: (b < a) ? b : a and (a < b) ? b : a (first argument on ties).
DELTAKV_GPU_HD float std_min(float a, float b) { return b < a ? b : a; }
DELTAKV_GPU_HD float std_max(float a, float b) { return a < b ? b : a; }

// =============================================================================================
// linear: y[n, out] = x[n, in] · W^T + b. Shared-memory tiled GEMM, BM x BN outputs per block,
// TM x TN per thread (strided by the thread grid so shared reads and global writes coalesce).
// Split-K when the output grid alone cannot fill the GPU: blockIdx.z takes `k_split` inputs and
// writes f32 partial sums [splits, n, out]; linear_reduce_kernel adds them in split order (so the
// result is deterministic) plus the bias.
// =============================================================================================
inline constexpr int kLinBM = 64, kLinBN = 64, kLinBK = 16, kLinTM = 4, kLinTN = 4;
inline constexpr int kLinThreads = (kLinBM / kLinTM) * (kLinBN / kLinTN);

template <class T>
__global__ void DELTAKV_LAUNCH_BOUNDS(kLinThreads) linear_kernel(LinearParams<T> p, int k_split, float* partial) {
  constexpr int BM = kLinBM, BN = kLinBN, BK = kLinBK, TM = kLinTM, TN = kLinTN;
  constexpr int TX = BN / TN, TY = BM / TM, NT = kLinThreads;
  __shared__ float xs[BK][BM + 1];
  __shared__ float ws[BK][BN + 1];
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  const int n0 = blockIdx.x * BN;
  const int k_begin = blockIdx.z * k_split;
  const int k_end = k_begin + k_split < p.in ? k_begin + k_split : p.in;
  for (std::int64_t m0 = std::int64_t(blockIdx.y) * BM; m0 < p.n; m0 += std::int64_t(gridDim.y) * BM) {
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
      for (int idx = tid; idx < BM * BK; idx += NT) {
        const int mm = idx / BK, kk = idx % BK;
        const std::int64_t row = m0 + mm;
        const int col = k0 + kk;
        xs[kk][mm] = (row < p.n && col < k_end) ? to_float(p.x[row * p.ldx + col]) : 0.f;
      }
      for (int idx = tid; idx < BN * BK; idx += NT) {
        const int nn = idx / BK, kk = idx % BK;
        const int o = n0 + nn, col = k0 + kk;
        ws[kk][nn] = (o < p.out && col < k_end) ? to_float(p.w[std::int64_t(o) * p.in + col]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        float a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = xs[kk][ty + i * TY];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = ws[kk][tx + j * TX];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const std::int64_t row = m0 + ty + i * TY;
      if (row >= p.n) continue;
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int o = n0 + tx + j * TX;
        if (o >= p.out) continue;
        if (partial) {
          partial[(std::int64_t(blockIdx.z) * p.n + row) * p.out + o] = acc[i][j];
        } else {
          float v = acc[i][j];
          if (p.b) v += to_float(p.b[o]);
          p.y[row * p.ldy + o] = from_float<T>(v);
        }
      }
    }
  }
}

template <class T>
__global__ void linear_reduce_kernel(LinearParams<T> p, int splits, const float* partial) {
  const std::int64_t total = p.n * p.out, step = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t t = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += step) {
    const std::int64_t row = t / p.out;
    const int o = static_cast<int>(t % p.out);
    float v = 0.f;
    for (int z = 0; z < splits; ++z) v += partial[std::int64_t(z) * total + t];
    if (p.b) v += to_float(p.b[o]);
    p.y[row * p.ldy + o] = from_float<T>(v);
  }
}

// =============================================================================================
// linear_mma_kernel: the same GEMM on tensor cores (16-bit T only; prefill's encode is almost all
// of its time here). Block tile 128 x 128 outputs, K step 32, 8 warps of 64 x 32 (4 x 2 tiles of
// 16 x 16). The next K step's 16-byte pieces are loaded into registers while the current one is
// multiplied from shared memory (two buffers, one barrier per step). Requires in % 8 == 0,
// ldx % 8 == 0 and 16-byte aligned x and w (linear_mma_eligible); edges are zero-filled.
// Split-K like linear_kernel when the output tiles alone cannot fill the GPU: blockIdx.z takes
// `steps_per_split` K steps and writes f32 partials [splits, n, out] for linear_reduce_kernel.
// =============================================================================================
inline constexpr int kMmaBM = 128, kMmaBN = 128, kMmaBK = 32, kMmaThreads = 256;  // gpu-check: allow(K step, not lanes)
inline constexpr int kMmaLd = kMmaBK + 8;  // 16-bit elements per shared row: 80 bytes, rows spread over banks

// Whether the vendor GEMM takes p (with tensor cores on): 16-bit T, a vendor GEMM in the build, no
// bias (see GpuDevice::linear), sizes and strides it takes.
template <class T>
bool linear_gemm_eligible(const LinearParams<T>& p) {
  if constexpr (!vendor::kHasBlas || std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return false;
  } else {
    constexpr std::int64_t kMax = vendor::kBlasMaxInt;
    return !p.b && p.in > 0 && p.n <= kMax && p.ldx <= kMax && p.ldy <= kMax;
  }
}

template <class T>
bool linear_mma_eligible(const LinearParams<T>& p) {
  if constexpr (!vendor::kTensorTiles || std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return false;
  } else {
    return p.n >= 64 && p.in >= 8 && p.in % 8 == 0 && p.ldx % 8 == 0 && aligned16(p.x) && aligned16(p.w);
  }
}

template <class T, int W>
__global__ void DELTAKV_LAUNCH_BOUNDS_MIN(kMmaThreads, 2) linear_mma_kernel(LinearParams<T> p, int steps_per_split, float* partial) {
  constexpr int BM = kMmaBM, BN = kMmaBN, BK = kMmaBK, LD = kMmaLd, NT = kMmaThreads;
  constexpr int PIECES = BK / 8;                       // 16-byte pieces per tile row
  constexpr int LOADS = BM * PIECES / NT;              // pieces per thread per operand
  static_assert(BM == BN && LOADS * NT == BM * PIECES && NT / W == 8, "linear_mma_kernel: 8 warps");
  __shared__ __align__(32) T as[2][BM * LD];  // gpu-check: allow(tile loads need 32-byte alignment)
  __shared__ __align__(32) T bs[2][BN * LD];  // gpu-check: allow(tile loads need 32-byte alignment)
  const int warp = threadIdx.x / W, lane = threadIdx.x % W;
  constexpr int WTM = BM / 2, WTN = BN / 4;              // warp tile: 2 x 4 warps
  const int wm = (warp / 4) * WTM, wn = (warp % 4) * WTN;  // the warp's corner of the tile
  static_assert(WTM == 4 * 16 && WTN == 2 * 16, "each warp holds 4 x 2 accumulator tiles");
  const int n0 = blockIdx.x * BN;
  const int all_steps = (p.in + BK - 1) / BK, s_begin = blockIdx.z * steps_per_split;
  const int ksteps = (all_steps - s_begin < steps_per_split ? all_steps - s_begin : steps_per_split);  // this split's
  const int k_first = s_begin * BK;
  for (std::int64_t m0 = std::int64_t(blockIdx.y) * BM; m0 < p.n; m0 += std::int64_t(gridDim.y) * BM) {
    uint4 ra[LOADS], rb[LOADS];
    auto load = [&](int k0) {
#pragma unroll
      for (int j = 0; j < LOADS; ++j) {
        const int task = threadIdx.x + j * NT, r = task / PIECES, c = k0 + (task % PIECES) * 8;
        const std::int64_t row = m0 + r;
        const int o = n0 + r;
        ra[j] = (row < p.n && c < p.in) ? *reinterpret_cast<const uint4*>(p.x + row * p.ldx + c) : make_uint4(0u, 0u, 0u, 0u);
        rb[j] = (o < p.out && c < p.in) ? *reinterpret_cast<const uint4*>(p.w + std::int64_t(o) * p.in + c)
                                        : make_uint4(0u, 0u, 0u, 0u);
      }
    };
    auto stash = [&](int buf) {
#pragma unroll
      for (int j = 0; j < LOADS; ++j) {
        const int task = threadIdx.x + j * NT, r = task / PIECES, c = (task % PIECES) * 8;
        *reinterpret_cast<uint4*>(&as[buf][r * LD + c]) = ra[j];
        *reinterpret_cast<uint4*>(&bs[buf][r * LD + c]) = rb[j];
      }
    };
    vendor::mma16<T> acc[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) acc[i][j].zero();
    __syncthreads();  // the previous row block's epilogue is done with as[0]
    load(k_first);
    stash(0);
    __syncthreads();
    for (int ks = 0; ks < ksteps; ++ks) {
      const int buf = ks & 1;
      if (ks + 1 < ksteps) load(k_first + (ks + 1) * BK);  // in flight during this step's products
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
#pragma unroll
        for (int i = 0; i < 4; i += 2)
          acc[i][0].mac_2x2(acc[i][1], acc[i + 1][0], acc[i + 1][1], &as[buf][(wm + i * 16) * LD + kk],
                            &as[buf][(wm + i * 16 + 16) * LD + kk], LD, &bs[buf][wn * LD + kk], &bs[buf][(wn + 16) * LD + kk],
                            LD);
      }
      if (ks + 1 < ksteps) stash(buf ^ 1);
      __syncthreads();
    }
    // epilogue: each warp stages one 16 x 16 tile at a time in its own 1 KiB of as[0]
    float* stage = reinterpret_cast<float*>(&as[0][0]) + warp * 256;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        acc[i][j].store(stage, 16);
        vendor::warp_sync();
        for (int e = lane; e < 256; e += W) {
          const std::int64_t row = m0 + wm + i * 16 + e / 16;
          const int o = n0 + wn + j * 16 + e % 16;
          if (row < p.n && o < p.out) {
            if (partial) {
              partial[(std::int64_t(blockIdx.z) * p.n + row) * p.out + o] = stage[e];
            } else {
              float v = stage[e];
              if (p.b) v += to_float(p.b[o]);
              p.y[row * p.ldy + o] = from_float<T>(v);
            }
          }
        }
        vendor::warp_sync();
      }
  }
}

// =============================================================================================
// swiglu, axpy_rows, copy_rows, all_finite: row-wise. A block per row (blocks loop over rows),
// threads over the row's columns: no 64-bit division per element. Where every row start is
// 16-byte aligned the host picks V = 16 / sizeof(T) elements per thread (one 16-byte load each),
// else V = 1.
// =============================================================================================
// Elements of T in one 16-byte pack, and whether a row-wise kernel may take such packs: every
// count and stride (in elements) a multiple of it, every base 16-byte aligned (the host's choice
// between a kernel's <T, kPackOf<T>> and <T, 1> instances).
template <class T>
inline constexpr int kPackOf = 16 / int(sizeof(T));
template <class T>
bool packs_fit(std::initializer_list<std::int64_t> elems, std::initializer_list<const void*> bases) {
  for (const std::int64_t e : elems)
    if (e % kPackOf<T> != 0) return false;
  for (const void* b : bases)
    if (!aligned16(b)) return false;
  return true;
}

template <class T, int V>
struct Pack {  // V elements, loaded and stored as one unit when V > 1
  T v[V];
};
template <class T, int V>
DELTAKV_GPU_D Pack<T, V> load_pack(const T* p) {
  Pack<T, V> r;
  if constexpr (V * sizeof(T) == 16) {
    const vendor::bytes16 u = *reinterpret_cast<const vendor::bytes16*>(p);
    static_assert(sizeof(u) == sizeof(r));
    __builtin_memcpy(&r, &u, 16);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) r.v[i] = p[i];
  }
  return r;
}
template <class T, int V>
DELTAKV_GPU_D void store_pack(T* p, const Pack<T, V>& r) {
  if constexpr (V * sizeof(T) == 16) {
    vendor::bytes16 u;
    __builtin_memcpy(&u, &r, 16);
    *reinterpret_cast<vendor::bytes16*>(p) = u;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = r.v[i];
  }
}

// silu(g) * u, one element of a SwiGLU row (g and u in float)
DELTAKV_GPU_D float swiglu_value(float g, float u) { return g / (1.f + expf(-g)) * u; }

// h[:, :hidden] = silu(h[:, :hidden]) * h[:, hidden:], minus the same of sub's rows where Sub;
// hidden % V == 0, ldh % V == 0 (and ld_sub % V == 0 where Sub).
template <class T, int V, bool Sub>
__global__ void swiglu_kernel(SwiGLUParams<T> p) {
  const int packs = p.hidden / V;
  for (std::int64_t i = blockIdx.x; i < p.n; i += gridDim.x) {
    T* h = p.h + i * p.ldh;
    const T* r = Sub ? p.sub + i * p.ld_sub : nullptr;
    for (int j = threadIdx.x; j < packs; j += blockDim.x) {
      Pack<T, V> a = load_pack<T, V>(h + std::int64_t(j) * V);
      const Pack<T, V> b = load_pack<T, V>(h + p.hidden + std::int64_t(j) * V);
      Pack<T, V> c, d;
      if constexpr (Sub) {
        c = load_pack<T, V>(r + std::int64_t(j) * V);
        d = load_pack<T, V>(r + p.hidden + std::int64_t(j) * V);
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        float v = swiglu_value(to_float(a.v[e]), to_float(b.v[e]));
        if constexpr (Sub) v -= swiglu_value(to_float(c.v[e]), to_float(d.v[e]));
        a.v[e] = from_float<T>(v);
      }
      store_pack<T, V>(h + std::int64_t(j) * V, a);
    }
  }
}

template <class T>
__global__ void axpy_rows_kernel(AxpyRowsParams<T> p) {
  const float alpha = to_float(p.alpha);
  for (std::int64_t i = blockIdx.x; i < p.n; i += gridDim.x)
    for (int j = threadIdx.x; j < p.dim; j += blockDim.x) {
      T& y = p.y[i * p.ldy + j];
      // y + alpha * x in two roundings, like the CPU (no FMA).
      y = from_float<T>(vendor::add_rn(to_float(y), vendor::mul_rn(alpha, to_float(p.x[i * p.ldx + j]))));
    }
}

// =============================================================================================
// ref_search: per block, `rows` (<= kRefRows) query tokens held in shared memory (f32) against a
// contiguous range of references (blockIdx.y splits the reference range). Each warp scores
// kRefPerWarp references at a time against all rows (lane-strided dot products, butterfly
// sums); lane r keeps row r's k best of that warp in shared memory. The warp lists are then
// merged per row into the block's list: either the final ids (one split) or a partial list in
// scratch for ref_merge_kernel. Order everywhere: score descending, then reference index ascending (the CPU's
// "ties keep the earlier reference").
// =============================================================================================
inline constexpr int kRefRows = 8;
inline constexpr int kRefPerWarp = 4;  // references a warp scores at once
inline constexpr int kRefMaxSplits = 32;  // gpu-check: allow(a cap on reference-range splits, not lanes)

DELTAKV_GPU_HD bool ranks_before(float s1, int i1, float s2, int i2) {
  return s1 > s2 || (s1 == s2 && i1 < i2);
}

// Bytes of dynamic shared memory for ref_search_kernel.
inline std::size_t ref_search_smem(int rows, int dim, int k, int n_warps) {
  return sizeof(float) * (std::size_t(rows) * dim + kRefRows) + std::size_t(n_warps) * rows * k * (sizeof(float) + sizeof(int));
}

template <class T, int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT)
    ref_search_kernel(RefSearchParams<T> p, int rows, std::int64_t refs_per_split, float* part_s, std::int32_t* part_i) {
  static_assert(kWarpBlockShapeOk<W, NT>, "NT must be a multiple of W and NT / W <= W");
  constexpr int NW = NT / W;
  static_assert(kRefRows <= W, "one lane per row");
  const int lane = threadIdx.x % W, warp = threadIdx.x / W, tid = threadIdx.x;
  const int dim = p.dim, k = p.k;
  DELTAKV_DYNAMIC_SMEM(float, xs);          // [rows, dim]
  float* xn = xs + std::size_t(rows) * dim;  // [kRefRows]
  float* ls = xn + kRefRows;                 // [NW, rows, k]
  int* li = reinterpret_cast<int*>(ls + NW * rows * k);  // [NW, rows, k]
  __shared__ int s_vis[kRefRows];

  const std::int64_t r0 = std::int64_t(blockIdx.x) * rows;
  const int nr = static_cast<int>(p.n - r0 < rows ? p.n - r0 : rows);
  for (int idx = tid; idx < nr * dim; idx += NT) {
    const int rr = idx / dim, d = idx % dim;
    xs[idx] = to_float(p.x[(r0 + rr) * p.ldx + d]);
  }
  for (int idx = tid; idx < NW * rows * k; idx += NT) {
    ls[idx] = kNegInf;
    li[idx] = -1;
  }
  if (tid < kRefRows) s_vis[tid] = tid < nr ? p.visible[r0 + tid] : 0;
  __syncthreads();
  if (p.metric == Metric::cosine) {
    for (int rr = warp; rr < nr; rr += NW) {
      float s = 0.f;
      for (int d = lane; d < dim; d += W) s += xs[rr * dim + d] * xs[rr * dim + d];
      s = warp_sum<W>(s);
      if (lane == 0) xn[rr] = sqrtf(s);
    }
  }
  int vis_max = 0;
  for (int rr = 0; rr < nr; ++rr) vis_max = s_vis[rr] > vis_max ? s_vis[rr] : vis_max;
  const std::int64_t j_begin = std::int64_t(blockIdx.y) * refs_per_split;
  std::int64_t j_end = j_begin + refs_per_split;
  if (j_end > vis_max) j_end = vis_max;
  if (j_end > p.m) j_end = p.m;
  __syncthreads();

  // Each warp scores kRefPerWarp references at once against all rows: one shared-memory load
  // of x feeds kRefPerWarp FMAs. Lane r then inserts row r's scores into the warp's list.
  for (std::int64_t j0 = j_begin + std::int64_t(warp) * kRefPerWarp; j0 < j_end; j0 += std::int64_t(NW) * kRefPerWarp) {
    const T* r[kRefPerWarp];
#pragma unroll
    for (int u = 0; u < kRefPerWarp; ++u) r[u] = p.refs + (j0 + u < j_end ? j0 + u : j0) * p.ldr;
    float acc[kRefRows][kRefPerWarp];
    float rn[kRefPerWarp];
#pragma unroll
    for (int u = 0; u < kRefPerWarp; ++u) {
      rn[u] = 0.f;
#pragma unroll
      for (int rr = 0; rr < kRefRows; ++rr) acc[rr][u] = 0.f;
    }
    for (int d = lane; d < dim; d += W) {
      float rv[kRefPerWarp];
#pragma unroll
      for (int u = 0; u < kRefPerWarp; ++u) {
        rv[u] = to_float(r[u][d]);
        rn[u] += rv[u] * rv[u];
      }
#pragma unroll
      for (int rr = 0; rr < kRefRows; ++rr) {
        if (rr < nr) {
          const float xv = xs[rr * dim + d];
#pragma unroll
          for (int u = 0; u < kRefPerWarp; ++u) acc[rr][u] += xv * rv[u];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kRefPerWarp; ++u) {
      const std::int64_t j = j0 + u;
      if (j >= j_end) break;  // uniform over the warp
      const float rnu = warp_sum<W>(rn[u]);
      float dot = 0.f;
#pragma unroll
      for (int rr = 0; rr < kRefRows; ++rr) {
        if (rr < nr) {  // uniform over the warp
          const float s = warp_sum<W>(acc[rr][u]);
          if (lane == rr) dot = s;
        }
      }
      if (lane < nr && j < s_vis[lane]) {
        float sc = dot;
        if (p.metric == Metric::l2) sc = 2.f * sc - rnu;
        else if (p.metric == Metric::cosine) sc = sc / std_max(1e-30f, xn[lane] * sqrtf(rnu));
        float* bs = ls + (warp * rows + lane) * k;
        int* bi = li + (warp * rows + lane) * k;
        const int jj = static_cast<int>(j);
        if (ranks_before(sc, jj, bs[k - 1], bi[k - 1])) {
          int q = k - 1;
          while (q > 0 && ranks_before(sc, jj, bs[q - 1], bi[q - 1])) {
            bs[q] = bs[q - 1];
            bi[q] = bi[q - 1];
            --q;
          }
          bs[q] = sc;
          bi[q] = jj;
        }
      }
    }
  }
  __syncthreads();

  if (tid < nr) {  // merge the NW sorted warp lists of row `tid`
    int head[NW];
#pragma unroll
    for (int w = 0; w < NW; ++w) head[w] = 0;
    const std::int64_t row = r0 + tid;
    for (int q = 0; q < k; ++q) {
      int bw = -1;
      float bs = kNegInf;
      int bi = -1;
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        if (head[w] >= k) continue;
        const int at = (w * rows + tid) * k + head[w];
        if (bw < 0 || ranks_before(ls[at], li[at], bs, bi)) {
          bw = w;
          bs = ls[at];
          bi = li[at];
        }
      }
      ++head[bw];
      if (part_s) {
        const std::int64_t o = (std::int64_t(blockIdx.y) * p.n + row) * k + q;
        part_s[o] = bs;
        part_i[o] = bi;
      } else {
        p.ids[row * k + q] = bi;
      }
    }
  }
}

// Merges `splits` (<= MaxSplits) partial lists [splits, n, k] per row into ids [n, k]. One thread
// per row. (A template, like every kernel here, so that the header can be in many TUs.)
template <int MaxSplits>
__global__ void ref_merge_kernel(int splits, std::int64_t n, int k, const float* part_s, const std::int32_t* part_i,
                                 std::int32_t* ids) {
  const std::int64_t row = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  int head[MaxSplits];
  for (int s = 0; s < splits; ++s) head[s] = 0;
  for (int q = 0; q < k; ++q) {
    int b = -1;
    float bs = kNegInf;
    int bi = -1;
    for (int s = 0; s < splits; ++s) {
      if (head[s] >= k) continue;
      const std::int64_t at = (std::int64_t(s) * n + row) * k + head[s];
      if (b < 0 || ranks_before(part_s[at], part_i[at], bs, bi)) {
        b = s;
        bs = part_s[at];
        bi = part_i[at];
      }
    }
    ++head[b];
    ids[row * k + q] = bi;
  }
}

// =============================================================================================
// ref_search_mma_kernel: the same search with the scores on tensor cores (16-bit T, metric l2 or
// dot, k <= kRsMaxK; prefill's search is a GEMM of the block's tokens against every earlier
// reference). A block takes 128 query rows and its split of the references, 64 at a time:
//   S[128 x 64] = X R^T  (K steps of 32, 8 warps of 32 x 32, next step loaded into registers
//   during the current one), |r|^2 of the 64 references from the same shared tiles, then one
//   thread per row scores 2 s - |r|^2 (or s) and inserts into its row's k best (shared memory).
// The lists go out as ids (one split) or as partials for ref_merge_kernel, like ref_search_kernel.
// Requires dim, ldx, ldr multiples of 8 and 16-byte aligned x and refs (ref_search_mma_eligible).
// =============================================================================================
inline constexpr int kRsBM = 128, kRsBN = 64, kRsBK = 32, kRsThreads = 256, kRsMaxK = 8;  // gpu-check: allow(K step, not lanes)
inline constexpr int kRsLd = kRsBK + 8, kRsLdS = kRsBN + 4;

inline std::size_t ref_search_mma_smem() {
  return std::size_t(2) * (kRsBM + kRsBN) * kRsLd * 2    // A and B tiles, two buffers, 16-bit
         + std::size_t(kRsBM) * kRsLdS * 4                  // scores
         + std::size_t(kRsBN) * 4                           // |r|^2
         + std::size_t(kRsBM) * kRsMaxK * 8                 // lists: score, id
         + std::size_t(kRsBM) * 4;                          // visible per row
}

template <class T>
bool ref_search_mma_eligible(const RefSearchParams<T>& p) {
  if constexpr (!vendor::kTensorTiles || std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return false;
  } else {
    // >= 64 rows: below that the CUDA-core kernel is faster (measured on the H100)
    return p.n >= 64 && p.metric != Metric::cosine && p.k <= kRsMaxK && p.dim % 8 == 0 && p.ldx % 8 == 0 &&
           p.ldr % 8 == 0 && aligned16(p.x) && aligned16(p.refs);
  }
}

template <class T, int W>
__global__ void DELTAKV_LAUNCH_BOUNDS_MIN(kRsThreads, 2)
    ref_search_mma_kernel(RefSearchParams<T> p, std::int64_t refs_per_split, float* part_s, std::int32_t* part_i) {
  constexpr int BM = kRsBM, BN = kRsBN, BK = kRsBK, LD = kRsLd, LDS = kRsLdS, NT = kRsThreads, MK = kRsMaxK;
  constexpr int PIECES = BK / 8, LA = BM * PIECES / NT, LB = BN * PIECES / NT;
  constexpr int WTM = BM / 4, WTN = BN / 2;  // 4 x 2 warps
  static_assert(NT / W == 8 && LA * NT == BM * PIECES && LB * NT == BN * PIECES, "ref_search_mma_kernel: 8 warps");
  static_assert(WTM == 2 * 16 && WTN == 2 * 16, "each warp holds 2 x 2 accumulator tiles");
  static_assert(NT == BN * PIECES, "one 16-byte piece of a B row per thread for the norms");
  DELTAKV_DYNAMIC_SMEM(unsigned char, raw);
  T* as = reinterpret_cast<T*>(raw);                               // [2][BM * LD]
  T* bs = as + 2 * BM * LD;                                        // [2][BN * LD]
  float* sc = reinterpret_cast<float*>(bs + 2 * BN * LD);         // [BM][LDS]
  float* rn = sc + BM * LDS;                                       // [BN]
  float* ls = rn + BN;                                             // [BM][MK]
  std::int32_t* li = reinterpret_cast<std::int32_t*>(ls + BM * MK);  // [BM][MK]
  std::int32_t* vis = li + BM * MK;                                // [BM]
  const int tid = threadIdx.x, warp = tid / W, k = p.k;
  const int wm = (warp / 2) * WTM, wn = (warp % 2) * WTN;
  const std::int64_t r0 = std::int64_t(blockIdx.x) * BM;
  const int nr = static_cast<int>(p.n - r0 < BM ? p.n - r0 : BM);
  for (int i = tid; i < BM; i += NT) vis[i] = i < nr ? p.visible[r0 + i] : 0;
  for (int i = tid; i < BM * MK; i += NT) {
    ls[i] = kNegInf;
    li[i] = -1;
  }
  __syncthreads();
  int vis_max = 0;
  for (int i = 0; i < nr; ++i) vis_max = vis[i] > vis_max ? vis[i] : vis_max;
  const std::int64_t j_begin = std::int64_t(blockIdx.y) * refs_per_split;
  std::int64_t j_end = j_begin + refs_per_split;
  if (j_end > vis_max) j_end = vis_max;
  if (j_end > p.m) j_end = p.m;
  const int ksteps = (p.dim + BK - 1) / BK;

  uint4 ra[LA], rb[LB];
  for (std::int64_t j0 = j_begin; j0 < j_end; j0 += BN) {
    auto load = [&](int k0) {
#pragma unroll
      for (int t = 0; t < LA; ++t) {
        const int task = tid + t * NT, r = task / PIECES, c = k0 + (task % PIECES) * 8;
        ra[t] = (r < nr && c < p.dim) ? *reinterpret_cast<const uint4*>(p.x + (r0 + r) * p.ldx + c) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int t = 0; t < LB; ++t) {
        const int task = tid + t * NT, r = task / PIECES, c = k0 + (task % PIECES) * 8;
        rb[t] = (j0 + r < j_end && c < p.dim) ? *reinterpret_cast<const uint4*>(p.refs + (j0 + r) * p.ldr + c)
                                              : make_uint4(0u, 0u, 0u, 0u);
      }
    };
    auto stash = [&](int buf) {
#pragma unroll
      for (int t = 0; t < LA; ++t) {
        const int task = tid + t * NT;
        *reinterpret_cast<uint4*>(as + buf * BM * LD + (task / PIECES) * LD + (task % PIECES) * 8) = ra[t];
      }
#pragma unroll
      for (int t = 0; t < LB; ++t) {
        const int task = tid + t * NT;
        *reinterpret_cast<uint4*>(bs + buf * BN * LD + (task / PIECES) * LD + (task % PIECES) * 8) = rb[t];
      }
    };
    vendor::mma16<T> c00, c01, c10, c11;
    c00.zero();
    c01.zero();
    c10.zero();
    c11.zero();
    float norm = 0.f;  // this thread's piece of |r|^2 for reference tid / PIECES
    load(0);
    stash(0);
    __syncthreads();
    for (int ks = 0; ks < ksteps; ++ks) {
      const int buf = ks & 1;
      if (ks + 1 < ksteps) load((ks + 1) * BK);
      const T* a = as + buf * BM * LD;
      const T* b = bs + buf * BN * LD;
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16)
        c00.mac_2x2(c01, c10, c11, a + wm * LD + kk, a + (wm + 16) * LD + kk, LD, b + wn * LD + kk, b + (wn + 16) * LD + kk, LD);
      {
        const T* e = b + (tid / PIECES) * LD + (tid % PIECES) * 8;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const float v = to_float(e[q]);
          norm += v * v;
        }
      }
      if (ks + 1 < ksteps) stash(buf ^ 1);
      __syncthreads();
    }
    // the tile's scores and norms into shared memory
    c00.store(sc + wm * LDS + wn, LDS);
    c01.store(sc + wm * LDS + wn + 16, LDS);
    c10.store(sc + (wm + 16) * LDS + wn, LDS);
    c11.store(sc + (wm + 16) * LDS + wn + 16, LDS);
#pragma unroll
    for (int o = PIECES / 2; o > 0; o >>= 1) norm += vendor::shfl_xor<W>(norm, o);
    if (tid % PIECES == 0) rn[tid / PIECES] = norm;
    __syncthreads();
    if (tid < nr) {  // one thread per row: its k best so far
      float* bsc = ls + tid * MK;
      std::int32_t* bid = li + tid * MK;
      const std::int64_t lim = (vis[tid] < j_end ? vis[tid] : j_end) - j0;
      for (int c = 0; c < BN && c < lim; ++c) {
        float s = sc[tid * LDS + c];
        if (p.metric == Metric::l2) s = 2.f * s - rn[c];
        const int jj = static_cast<int>(j0 + c);
        if (!ranks_before(s, jj, bsc[k - 1], bid[k - 1])) continue;
        int q = k - 1;
        while (q > 0 && ranks_before(s, jj, bsc[q - 1], bid[q - 1])) {
          bsc[q] = bsc[q - 1];
          bid[q] = bid[q - 1];
          --q;
        }
        bsc[q] = s;
        bid[q] = jj;
      }
    }
    __syncthreads();  // scores, norms and tiles are reused by the next reference tile
  }
  if (tid < nr) {
    const std::int64_t row = r0 + tid;
    for (int q = 0; q < k; ++q) {
      if (part_s) {
        const std::int64_t o = (std::int64_t(blockIdx.y) * p.n + row) * k + q;
        part_s[o] = ls[tid * MK + q];
        part_i[o] = li[tid * MK + q];
      } else {
        p.ids[row * k + q] = li[tid * MK + q];
      }
    }
  }
}

// =============================================================================================
// The search with its scores from the vendor's GEMM (GpuDevice::ref_search with tensor cores on,
// where the build has one): per chunk of at most kRsChunkRows rows x kRsChunkRefs references,
// S = X R^T in f32 (scratch), |r|^2 of the chunk's references (RefSearchParams::ref_sq_norms where
// given and readable, else ref_norms_kernel), then
// ref_topk_rows_kernel folds the chunk into each row's k best (list_s / list_i, carried from chunk
// to chunk in reference order, so that ties keep going to the lower id) and writes the ids after
// the last chunk. Scores as in ref_search_mma_kernel: 2 s - |r|^2 (l2) or s (dot). The chunk sizes
// are fixed, so the GEMM shapes, and with them the f32 sums, do not depend on the scratch's size.
// 4096 rows (64 MB of scores): a 4-block prefill pass (~3.7K rows) is one GEMM and one top-k
// (H100, Llama prefill: 3.82-3.85 ms against 3.96-4.00 with 2048-row chunks).
// =============================================================================================
inline constexpr int kRsChunkRows = 4096, kRsChunkRefs = 4096;
// From this many rows of a chunk on, the top-k fold takes a warp per row (16 warps per SM on a
// 128-SM device); fewer rows keep a block per row, so that small passes still fill the SMs.
inline constexpr std::int64_t kRsWarpRowsMin = 2048;

// Whether the vendor-GEMM search takes p (with tensor cores on): 16-bit T, a vendor GEMM in the
// build, >= 64 rows (as for ref_search_mma_kernel), l2 or dot, k <= kRsMaxK, strides cuBLAS takes.
template <class T>
bool ref_search_gemm_eligible(const RefSearchParams<T>& p) {
  if constexpr (!vendor::kHasBlas || std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return false;
  } else {
    constexpr std::int64_t kMax = vendor::kBlasMaxInt;
    return p.n >= 64 && p.metric != Metric::cosine && p.k >= 1 && p.k <= kRsMaxK && p.dim >= 1 && p.ldx <= kMax && p.ldr <= kMax &&
           p.m <= kMax;
  }
}

template <class T, int W>
__global__ void ref_norms_kernel(const T* refs, std::int64_t ldr, int rows, int dim, float* norms) {
  const int r = (blockIdx.x * blockDim.x + threadIdx.x) / W, lane = threadIdx.x % W;
  if (r >= rows) return;  // whole warps
  float a = 0.f;
  for (int d = lane; d < dim; d += W) {
    const float v = to_float(refs[std::int64_t(r) * ldr + d]);
    a += v * v;
  }
  for (int o = W / 2; o > 0; o >>= 1) a += vendor::shfl_xor<W>(a, o);
  if (lane == 0) norms[r] = a;
}

// The scores of a chunk's last `tail` (< 8) references, whose GEMM cuBLAS runs on a slow kernel
// (~16 us for 2048 rows on the H100, as long as the aligned part): a warp per row, x read once,
// lanes over the dimension in packs of V (16 bytes where dim, ldx, ldr and the bases allow, else
// 1), f32 sums. scores[row * ld + col0 + t] = x_row . r_t for t < tail.
inline constexpr int kRsTailMax = 7;
template <class T, int W, int V>
__global__ void ref_tail_scores_kernel(const T* x, std::int64_t ldx, std::int64_t n, const T* refs, std::int64_t ldr, int tail,
                                       int dim, float* scores, int ld_scores, int col0) {
  const int lane = threadIdx.x % W;
  const std::int64_t warps = std::int64_t(gridDim.x) * (blockDim.x / W);
  for (std::int64_t row = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / W; row < n; row += warps) {
    float acc[kRsTailMax];
#pragma unroll
    for (int t = 0; t < kRsTailMax; ++t) acc[t] = 0.f;
    const T* a = x + row * ldx;
    for (int d = lane * V; d < dim; d += W * V) {
      const Pack<T, V> xa = load_pack<T, V>(a + d);
#pragma unroll
      for (int t = 0; t < kRsTailMax; ++t)
        if (t < tail) {
          const Pack<T, V> rb = load_pack<T, V>(refs + std::int64_t(t) * ldr + d);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[t] += to_float(xa.v[e]) * to_float(rb.v[e]);
        }
    }
#pragma unroll
    for (int t = 0; t < kRsTailMax; ++t)
      if (t < tail) {  // tail is the same on every lane
        const float v = warp_sum<W>(acc[t]);
        if (lane == 0) scores[row * ld_scores + col0 + t] = v;
      }
  }
}

// k rounds of a warp-wide pick of the best list head (ties, which only empty heads make, to the
// lower lane): out(q, score, id) receives the warp's q-th best on every lane. Each lane's list
// (bs, bi) is sorted best first; the picked heads are popped.
template <int W, int MK, class Out>
DELTAKV_GPU_D void warp_pick_k(float (&bs)[MK], int (&bi)[MK], int k, int lane, Out out) {
  for (int q = 0; q < k; ++q) {
    float s = bs[0];
    int i = bi[0], l = lane;
    for (int o = W / 2; o > 0; o >>= 1) {
      const float os = vendor::shfl_xor<W>(s, o);
      const int oi = vendor::shfl_xor<W>(i, o), ol = vendor::shfl_xor<W>(l, o);
      if (ranks_before(os, oi, s, i) || (!ranks_before(s, i, os, oi) && ol < l)) {
        s = os;
        i = oi;
        l = ol;
      }
    }
    if (lane == l) {
#pragma unroll
      for (int t = 0; t + 1 < MK; ++t) {
        bs[t] = bs[t + 1];
        bi[t] = bi[t + 1];
      }
      bs[MK - 1] = kNegInf;
      bi[MK - 1] = -1;
    }
    out(q, s, i);
  }
}

// The top-k folds' per-thread list (ref_topk_rows_kernel, ref_topk_warp_rows_kernel), K best of the
// columns a thread meets, sorted best first. K is the k of the search, a template parameter so that
// the list stays in registers with constant indices (the host dispatches k). A thread meets its columns
// in increasing id order, after every id already in its list (those of earlier chunks included), so a
// column enters the list exactly when its score is strictly above the list's last: one compare per
// column. (NaN scores never enter, as with ranks_before.)
template <int K>
DELTAKV_GPU_D void topk_start(float (&bs)[K], int (&bi)[K], bool carry, const float* list_s, const std::int32_t* list_i,
                              std::int64_t row) {  // carry: from the row's list so far, else empty
#pragma unroll
  for (int q = 0; q < K; ++q) {
    bs[q] = carry ? list_s[row * K + q] : kNegInf;
    bi[q] = carry ? list_i[row * K + q] : -1;
  }
}
template <int K>
DELTAKV_GPU_D void topk_consider(float (&bs)[K], int (&bi)[K], float sc, int id) {
  if (!(sc > bs[K - 1])) return;
  // insertion from the bottom, each place from the old list above it (constant indices, no exits:
  // an early return kept the list out of registers)
#pragma unroll
  for (int q = K - 1; q >= 0; --q) {
    const bool up = q > 0 && sc > bs[q > 0 ? q - 1 : 0];
    if (up) {
      bs[q] = bs[q - 1];
      bi[q] = bi[q - 1];
    } else if (sc > bs[q]) {
      bs[q] = sc;
      bi[q] = id;
    }
  }
}
// Columns c .. c + 3 of a row: one 16-byte load each of scores and norms (norms for l2 only).
struct TopkCols4 {
  float4 v, nr;
};
DELTAKV_GPU_D TopkCols4 topk_load4(const float* srow, const float* norms, bool l2, std::int64_t c) {
  TopkCols4 r{*reinterpret_cast<const float4*>(srow + c), make_float4(0.f, 0.f, 0.f, 0.f)};
  if (l2) r.nr = *reinterpret_cast<const float4*>(norms + c);
  return r;
}
// Those four (the ones below lim) into the list: l2 scores 2 s - |r|^2, dot scores s, ids j0 + c on.
template <int K>
DELTAKV_GPU_D void topk_consider4(float (&bs)[K], int (&bi)[K], const TopkCols4& a, bool l2, std::int64_t c,
                                  std::int64_t lim, std::int64_t j0) {
  const float4 v = a.v, nr = a.nr;
  const int id = static_cast<int>(j0 + c);
  topk_consider<K>(bs, bi, l2 ? 2.f * v.x - nr.x : v.x, id);
  if (c + 1 < lim) topk_consider<K>(bs, bi, l2 ? 2.f * v.y - nr.y : v.y, id + 1);
  if (c + 2 < lim) topk_consider<K>(bs, bi, l2 ? 2.f * v.z - nr.z : v.z, id + 2);
  if (c + 3 < lim) topk_consider<K>(bs, bi, l2 ? 2.f * v.w - nr.w : v.w, id + 3);
}
// A row's q-th best: its id after the last chunk (ids), else into the carried list.
template <int K>
DELTAKV_GPU_D void topk_store(std::int64_t row, int q, float sc, int id, float* list_s, std::int32_t* list_i,
                              std::int32_t* ids) {
  if (ids) {
    ids[row * K + q] = id;
  } else {
    list_s[row * K + q] = sc;
    list_i[row * K + q] = id;
  }
}

// A block of NT threads per row: each thread keeps the K best of the columns it scans (thread 0
// starts from the row's list so far), each warp picks its K best (warp_pick_k) into shared
// memory, and the first warp, one warp list per lane, picks the row's K best from those. (One
// warp per row left an SM ~7 warps at a block's 920 rows.)
// scores: rows ld_scores apart, a multiple of 4, 16-byte aligned; norms: 16-byte aligned, readable
// up to cols rounded up to 4.
template <int W, int K, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) ref_topk_rows_kernel(std::int64_t n, Metric metric, const float* scores,
                                                               int ld_scores, const float* norms, std::int64_t j0, int cols,
                                                               const std::int32_t* visible, bool first, float* list_s,
                                                               std::int32_t* list_i, std::int32_t* ids) {
  constexpr int NW = NT / W;
  static_assert(NW <= W, "one warp list per lane of the first warp");
  __shared__ float w_s[NW][K];
  __shared__ std::int32_t w_i[NW][K];
  const int lane = threadIdx.x % W, warp = threadIdx.x / W;
  for (std::int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    float bs[K];
    int bi[K];
    topk_start<K>(bs, bi, !first && threadIdx.x == 0, list_s, list_i, row);
    const std::int64_t vis_left = std::int64_t(visible[row]) - j0, lim = vis_left < cols ? vis_left : cols;
    const float* srow = scores + row * ld_scores;
    const bool l2 = metric == Metric::l2;
    for (std::int64_t c = 4 * threadIdx.x; c < lim; c += 4 * NT)
      topk_consider4<K>(bs, bi, topk_load4(srow, norms, l2, c), l2, c, lim, j0);
    warp_pick_k<W, K>(bs, bi, K, lane, [&](int q, float sc, int id) {
      if (lane == 0) {
        w_s[warp][q] = sc;
        w_i[warp][q] = id;
      }
    });
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int q = 0; q < K; ++q) {
        const bool has = lane < NW;
        bs[q] = has ? w_s[has ? lane : 0][q] : kNegInf;
        bi[q] = has ? w_i[has ? lane : 0][q] : -1;
      }
      warp_pick_k<W, K>(bs, bi, K, lane, [&](int q, float sc, int id) {
        if (lane == 0) topk_store<K>(row, q, sc, id, list_s, list_i, ids);
      });
    }
    __syncthreads();  // w_s / w_i are rewritten for the next row
  }
}

// The same fold with a warp per row (WPB rows per block, grid-stride): each lane keeps the K best of
// the columns it scans (lane 0 starts from the row's list so far), one warp_pick_k merges the lanes'
// lists, no block barrier. For passes of many rows (a 4-block prefill pass has ~3.7K, i.e. ~28 warps
// per H100 SM): the block-per-row kernel spends most of a row's time in its two picks and two
// barriers, over ~13 columns per thread. Same order argument as above, so the same ids.
template <int W, int K, int WPB>
__global__ void DELTAKV_LAUNCH_BOUNDS(W * WPB) ref_topk_warp_rows_kernel(std::int64_t n, Metric metric, const float* scores,
                                                                         int ld_scores, const float* norms, std::int64_t j0,
                                                                         int cols, const std::int32_t* visible, bool first,
                                                                         float* list_s, std::int32_t* list_i, std::int32_t* ids) {
  const int lane = threadIdx.x % W;
  const bool l2 = metric == Metric::l2;
  for (std::int64_t row = std::int64_t(blockIdx.x) * WPB + threadIdx.x / W; row < n; row += std::int64_t(gridDim.x) * WPB) {
    float bs[K];
    int bi[K];
    topk_start<K>(bs, bi, !first && lane == 0, list_s, list_i, row);
    const std::int64_t vis_left = std::int64_t(visible[row]) - j0, lim = vis_left < cols ? vis_left : cols;
    const float* srow = scores + row * ld_scores;
    // Two lane steps of four columns per iteration, both steps' loads issued before any compare.
    for (std::int64_t c = 4 * lane; c < lim; c += 8 * W) {
      const std::int64_t c2 = c + 4 * W;
      const TopkCols4 a = topk_load4(srow, norms, l2, c);
      const TopkCols4 a2 = c2 < lim ? topk_load4(srow, norms, l2, c2) : TopkCols4{};
      topk_consider4<K>(bs, bi, a, l2, c, lim, j0);
      if (c2 < lim) topk_consider4<K>(bs, bi, a2, l2, c2, lim, j0);
    }
    warp_pick_k<W, K>(bs, bi, K, lane, [&](int q, float sc, int id) {
      if (lane == 0) topk_store<K>(row, q, sc, id, list_s, list_i, ids);
    });
  }
}

// =============================================================================================
// gather_mean: one block per output row (grid-stride), threads over features in packs of V (16
// bytes where dim, ldr, ldo and the bases allow; else 1). Sums in id order then one division, like
// the CPU: bit-identical in f32.
// =============================================================================================
template <class T, int V>
__global__ void gather_mean_kernel(GatherMeanParams<T> p) {
  const int packs = p.dim / V;
  for (std::int64_t i = blockIdx.x; i < p.n; i += gridDim.x) {
    const std::int64_t r = p.id_rows ? p.id_rows[i] : i;
    const std::int32_t* ids = p.ids + r * p.k;
    int c = 0;
    for (int j = 0; j < p.k; ++j) c += ids[j] >= 0;
    for (int d = threadIdx.x; d < packs; d += blockDim.x) {
      float acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = 0.f;
      for (int j = 0; j < p.k; ++j) {
        const std::int32_t id = ids[j];
        if (id < 0) continue;
        const Pack<T, V> a = load_pack<T, V>(p.refs + std::int64_t(id) * p.ldr + std::int64_t(d) * V);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] += to_float(a.v[e]);
      }
      Pack<T, V> o;
#pragma unroll
      for (int e = 0; e < V; ++e) o.v[e] = c ? from_float<T>(acc[e] / float(c)) : from_float<T>(0.f);
      store_pack<T, V>(p.out + i * p.ldo + std::int64_t(d) * V, o);
    }
  }
}

// =============================================================================================
// quantize: a warp per row: min/max by warp reductions, then codes (int4: one lane per byte, low
// nibble first). With sub, the row is z - sub, each difference rounded to T as axpy_rows stores it
// (ncu, 3686 x 512 bf16 rows: 13.6 us with sub, where axpy_rows + the block-per-row quantize took
// 8.6 + 12.9). Bit-identical to the CPU.
// dequantize: one block per row, threads over features; c * scale + min in two roundings.
// =============================================================================================
// Both quantize kernels' per-element and per-row steps (their bits must agree with each other and the CPU):
// z - s as axpy_rows(alpha = -1) stores it (two roundings, then T)
template <class T>
DELTAKV_GPU_D float residual_value(T z, T s) {
  return to_float(from_float<T>(vendor::add_rn(to_float(z), vendor::mul_rn(-1.f, to_float(s)))));
}
// the warp's min (lo, returned through it) and max of row i, its scale (1 for a constant row: every
// code 0 decodes to lo exactly), written with lo to scale_min by lane 0
template <class T, int W>
DELTAKV_GPU_D float quantize_row_scale(const QuantizeParams<T>& p, std::int64_t i, int lane, int levels, float& lo,
                                       float hi) {
  for (int o = W / 2; o > 0; o >>= 1) {
    lo = fminf(lo, vendor::shfl_xor<W>(lo, o));
    hi = fmaxf(hi, vendor::shfl_xor<W>(hi, o));
  }
  float scale = (hi - lo) / float(levels);
  if (!(scale > 0.f)) scale = 1.0f;
  if (lane == 0) {
    p.scale_min[2 * i] = scale;
    p.scale_min[2 * i + 1] = lo;
  }
  return scale;
}
DELTAKV_GPU_D int quantize_code(float v, float lo, float scale, int levels) {
  const int c = static_cast<int>(lroundf((v - lo) / scale));
  return c < 0 ? 0 : (c > levels ? levels : c);
}

template <class T, int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) quantize_kernel(QuantizeParams<T> p) {
  const int levels = (1 << p.bits) - 1;
  const int lane = threadIdx.x % W;
  const std::int64_t warps = std::int64_t(gridDim.x) * (NT / W);
  for (std::int64_t i = (std::int64_t(blockIdx.x) * NT + threadIdx.x) / W; i < p.n; i += warps) {
    const T* z = p.z + i * p.ldz;
    const T* sb = p.sub ? p.sub + i * p.ld_sub : nullptr;
    auto val = [&](int j) { return sb ? residual_value<T>(z[j], sb[j]) : to_float(z[j]); };
    float lo = -kNegInf, hi = kNegInf;
    for (int j = lane; j < p.dim; j += W) {
      const float v = val(j);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    const float scale = quantize_row_scale<T, W>(p, i, lane, levels, lo, hi);
    std::uint8_t* q = p.q + i * p.ldq;
    auto code = [&](int j) { return quantize_code(val(j), lo, scale, levels); };
    if (p.bits == 8) {
      for (int j = lane; j < p.dim; j += W) q[j] = static_cast<std::uint8_t>(code(j));
    } else {
      for (int b = lane; b < (p.dim + 1) / 2; b += W) {
        const int c0 = code(2 * b), c1 = 2 * b + 1 < p.dim ? code(2 * b + 1) : 0;
        q[b] = static_cast<std::uint8_t>(c0 | (c1 << 4));
      }
    }
  }
}

// N code bytes (2, 4, 8 or 16; dst aligned to N) as one store, first byte lowest (little endian)
template <int N>
DELTAKV_GPU_D void store_code_bytes(std::uint8_t* dst, const std::uint8_t (&c)[N]) {
  if constexpr (N == 16) {
    vendor::bytes16 u;
    __builtin_memcpy(&u, c, 16);
    *reinterpret_cast<vendor::bytes16*>(dst) = u;
  } else {
    using U = std::conditional_t<N == 8, std::uint64_t, std::conditional_t<N == 4, std::uint32_t, std::uint16_t>>;
    static_assert(sizeof(U) == N, "2, 4, 8 or 16 bytes");
    U u = 0;
#pragma unroll
    for (int e = 0; e < N; ++e) u |= U(c[e]) << (8 * e);
    *reinterpret_cast<U*>(dst) = u;
  }
}

// The same, with the row held in registers: P packs of V values per lane (row dim <= P * V * W,
// dim % V == 0, 16-byte aligned rows), all loads issued before the reductions, and each pack's
// codes written as one store (int4: V / 2 bytes, int8: V bytes; the caller checks their
// alignment). The scalar kernel above walked the row twice, one element per load (ncu: ~10 us for
// 3.6K rows of 512 bf16, 11% of the copy bandwidth). Same arithmetic per element: same bits.
template <class T, int W, int NT, int P>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) quantize_packs_kernel(QuantizeParams<T> p) {
  constexpr int V = kPackOf<T>;
  static_assert(V >= 4 && V % 2 == 0, "whole int4 bytes per pack, stores of 2 bytes or more");
  const int levels = (1 << p.bits) - 1, packs = p.dim / V;
  const int lane = threadIdx.x % W;
  const std::int64_t warps = std::int64_t(gridDim.x) * (NT / W);
  for (std::int64_t i = (std::int64_t(blockIdx.x) * NT + threadIdx.x) / W; i < p.n; i += warps) {
    Pack<T, V> a[P], b[P];
#pragma unroll
    for (int u = 0; u < P; ++u) {
      const int pk = lane + u * W;
      if (pk < packs) {
        a[u] = load_pack<T, V>(p.z + i * p.ldz + std::int64_t(pk) * V);
        if (p.sub) b[u] = load_pack<T, V>(p.sub + i * p.ld_sub + std::int64_t(pk) * V);
      }
    }
    float v[P][V];
    float lo = -kNegInf, hi = kNegInf;
#pragma unroll
    for (int u = 0; u < P; ++u) {
      const bool here = lane + u * W < packs;  // (a pack past the row's end was never loaded)
#pragma unroll
      for (int e = 0; e < V; ++e) {
        v[u][e] = 0.f;
        if (!here) continue;
        v[u][e] = p.sub ? residual_value<T>(a[u].v[e], b[u].v[e]) : to_float(a[u].v[e]);
        lo = fminf(lo, v[u][e]);
        hi = fmaxf(hi, v[u][e]);
      }
    }
    const float scale = quantize_row_scale<T, W>(p, i, lane, levels, lo, hi);
    std::uint8_t* q = p.q + i * p.ldq;
#pragma unroll
    for (int u = 0; u < P; ++u) {
      const int pk = lane + u * W;
      if (pk >= packs) continue;
      std::uint8_t c[V];
#pragma unroll
      for (int e = 0; e < V; ++e) c[e] = static_cast<std::uint8_t>(quantize_code(v[u][e], lo, scale, levels));
      if (p.bits == 8) {
        store_code_bytes<V>(q + std::int64_t(pk) * V, c);
      } else {
        std::uint8_t c2[V / 2];
#pragma unroll
        for (int e = 0; e < V / 2; ++e) c2[e] = static_cast<std::uint8_t>(c[2 * e] | (c[2 * e + 1] << 4));
        store_code_bytes<V / 2>(q + std::int64_t(pk) * (V / 2), c2);
      }
    }
  }
}

template <class T>
__global__ void dequantize_kernel(DequantizeParams<T> p) {
  for (std::int64_t i = blockIdx.x; i < p.n; i += gridDim.x) {
    const std::int64_t r = p.rows ? p.rows[i] : i;
    const std::uint8_t* q = p.q + r * p.ldq;
    const float scale = p.scale_min[2 * r], lo = p.scale_min[2 * r + 1];
    for (int j = threadIdx.x; j < p.dim; j += blockDim.x) {
      const int c = p.bits == 8 ? q[j] : (q[j / 2] >> (4 * (j & 1))) & 0xF;
      p.z[i * p.ldz + j] = from_float<T>(vendor::add_rn(vendor::mul_rn(float(c), scale), lo));
    }
  }
}

// =============================================================================================
// rope: one block per row; cos/sin per frequency once (f64, like the CPU), shared by all heads.
// Dynamic shared memory: 2 * (rot_dim / 2) doubles.
// =============================================================================================
template <class T>
__global__ void rope_kernel(RopeParams<T> p) {
  DELTAKV_DYNAMIC_SMEM(double, cs);
  const int half = p.rot_dim / 2;
  double* sn = cs + half;
  for (std::int64_t i = blockIdx.x; i < p.n; i += gridDim.x) {
    const double pos = double(p.pos[i]);
    for (int f = threadIdx.x; f < half; f += blockDim.x) {
      const double inv = pow(p.theta, -2.0 * f / p.rot_dim);
      double s, c;
      sincos(pos * inv, &s, &c);
      cs[f] = c;
      sn[f] = s;
    }
    __syncthreads();
    for (int t = threadIdx.x; t < p.n_heads * half; t += blockDim.x) {
      const int h = t / half, f = t % half;
      T* x = p.x + i * p.ldx + std::int64_t(h) * p.head_dim;
      const int a = p.style == RopeStyle::half ? f : 2 * f;
      const int b = p.style == RopeStyle::half ? f + half : 2 * f + 1;
      const double x1 = to_float(x[a]), x2 = to_float(x[b]);
      x[a] = from_float<T>(static_cast<float>(x1 * cs[f] - x2 * sn[f]));
      x[b] = from_float<T>(static_cast<float>(x2 * cs[f] + x1 * sn[f]));
    }
    __syncthreads();
  }
}

// =============================================================================================
// attn_tile: one block per (query row, q head). Like the CPU, one online-softmax update of m, l,
// acc per tile: scores by warps (kAttnKeysPerWarp keys per warp, lanes over head_dim), the tile
// max, probabilities, then acc * corr + sum_j p_j v_j. Tiles longer than `chunk` (host:
// min(ntile, kAttnMaxChunk)) are taken as consecutive chunks, one update each (the same softmax,
// rounding apart). l == 0 means "nothing seen yet"; a chunk with no visible key changes nothing.
// Dynamic shared memory: 2 * head_dim + chunk (+ up to 15 of slack) floats.
// =============================================================================================
inline constexpr int kAttnMaxChunk = 4096;
inline constexpr int kAttnKeysPerWarp = 4;

template <class T, int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) attn_tile_kernel(AttnTileParams<T> p, int chunk) {
  constexpr int NW = NT / W;
  __shared__ float red[NW];
  DELTAKV_DYNAMIC_SMEM(float, qs);  // [head_dim]
  const int hd = p.head_dim;
  float* accs = qs + hd;            // [head_dim]
  float* s = accs + hd;             // [chunk]
  const int lane = threadIdx.x % W, warp = threadIdx.x / W, tid = threadIdx.x;
  const int h = blockIdx.x, i = blockIdx.y;
  const int group = p.n_q_heads / p.n_kv_heads;
  const std::int64_t koff = std::int64_t(h / group) * hd;
  const std::int64_t st = std::int64_t(i) * p.n_q_heads + h;
  const std::int64_t qpos = p.q_pos[i];
  const float scale = static_cast<float>(p.scale);
  for (int e = tid; e < hd; e += NT) {
    qs[e] = to_float(p.q[std::int64_t(i) * p.ldq + std::int64_t(h) * hd + e]);
    accs[e] = p.acc[st * hd + e];
  }
  float m = p.m[st], l = p.l[st];
  __syncthreads();
  for (int t0 = 0; t0 < p.ntile; t0 += chunk) {
    const int nt = p.ntile - t0 < chunk ? p.ntile - t0 : chunk;
    // scores: each warp takes kAttnKeysPerWarp consecutive keys at once (independent loads in
    // flight); masked keys read a valid row and are dropped
    for (int jj0 = warp * kAttnKeysPerWarp; jj0 < nt; jj0 += NW * kAttnKeysPerWarp) {
      float d[kAttnKeysPerWarp];
      bool vis[kAttnKeysPerWarp];
      const T* kr[kAttnKeysPerWarp];
#pragma unroll
      for (int u = 0; u < kAttnKeysPerWarp; ++u) {
        const int jj = jj0 + u;
        vis[u] = jj < nt && p.kv_pos[t0 + jj] <= qpos;
        kr[u] = p.k + std::int64_t(t0 + (jj < nt ? jj : 0)) * p.ldkv + koff;
        d[u] = 0.f;
      }
      for (int e = lane; e < hd; e += W) {
        const float qe = qs[e];
#pragma unroll
        for (int u = 0; u < kAttnKeysPerWarp; ++u) d[u] += qe * to_float(kr[u][e]);
      }
#pragma unroll
      for (int u = 0; u < kAttnKeysPerWarp; ++u) {
        d[u] = warp_sum<W>(d[u]);
        if (lane == 0 && jj0 + u < nt) s[jj0 + u] = vis[u] ? d[u] * scale : kNegInf;
      }
    }
    __syncthreads();
    float mt = kNegInf;
    for (int jj = tid; jj < nt; jj += NT) mt = fmaxf(mt, s[jj]);
    mt = block_max<W, NT>(mt, red);
    if (mt == kNegInf) continue;  // uniform: nothing visible in this chunk
    const float m_new = l == 0.f ? mt : std_max(m, mt);
    const float corr = l == 0.f ? 0.f : expf(m - m_new);
    float part = 0.f;
    for (int jj = tid; jj < nt; jj += NT) {
      const float w = s[jj] == kNegInf ? 0.f : expf(s[jj] - m_new);
      s[jj] = w;
      part += w;
    }
    l = l * corr + block_sum<W, NT>(part, red);  // block_sum's barriers also publish s
    for (int e = tid; e < hd; e += NT) {  // masked keys (w == 0) add nothing, as on the CPU
      float pv = 0.f;
      const T* vcol = p.v + std::int64_t(t0) * p.ldkv + koff + e;
#pragma unroll 8
      for (int jj = 0; jj < nt; ++jj) {
        const float w = s[jj];
        const float v = to_float(vcol[std::int64_t(jj) * p.ldkv]);
        pv += w != 0.f ? w * v : 0.f;
      }
      accs[e] = accs[e] * corr + pv;
    }
    m = m_new;
    __syncthreads();  // s is rewritten by the next chunk
  }
  for (int e = tid; e < hd; e += NT) p.acc[st * hd + e] = accs[e];
  if (tid == 0) {
    p.m[st] = m;
    p.l[st] = l;
  }
}

// attn_finish: out = acc / l, 0 where l == 0. Grid-stride over [nq, Hq, d].
template <class T>
__global__ void attn_finish_kernel(AttnFinishParams<T> p) {
  const std::int64_t total = std::int64_t(p.nq) * p.n_q_heads * p.head_dim;
  for (std::int64_t t = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t st = t / p.head_dim;
    const int e = static_cast<int>(t % p.head_dim);
    const std::int64_t i = st / p.n_q_heads;
    const int h = static_cast<int>(st % p.n_q_heads);
    const float l = p.l[st];
    p.out[i * p.ldo + std::int64_t(h) * p.head_dim + e] = l > 0.f ? from_float<T>(p.acc[t] / l) : from_float<T>(0.f);
  }
}

// =============================================================================================
// score_tile: one block per key; warps over (query row, head) pairs; max of softmax probability
// exp(q·k * scale - m) / l over visible pairs with l > 0 (0 if none).
// =============================================================================================
template <class T, int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) score_tile_kernel(ScoreTileParams<T> p) {
  constexpr int NW = NT / W;
  __shared__ float red[NW];
  const int lane = threadIdx.x % W, warp = threadIdx.x / W;
  const int group = p.n_q_heads / p.n_kv_heads, hd = p.head_dim;
  const float scale = static_cast<float>(p.scale);
  for (std::int64_t j = blockIdx.x; j < p.ntile; j += gridDim.x) {
    float best = 0.f;
    const std::int64_t kp = p.kv_pos[j];
    for (int pair = warp; pair < p.nq * p.n_q_heads; pair += NW) {
      const int i = pair / p.n_q_heads, h = pair % p.n_q_heads;
      if (kp > p.q_pos[i]) continue;
      const std::int64_t st = std::int64_t(i) * p.n_q_heads + h;
      const float l = p.l[st];
      if (!(l > 0.f)) continue;
      const T* q = p.q + std::int64_t(i) * p.ldq + std::int64_t(h) * hd;
      const T* k = p.k + j * p.ldk + std::int64_t(h / group) * hd;
      float d = 0.f;
      for (int e = lane; e < hd; e += W) d += to_float(q[e]) * to_float(k[e]);
      d = warp_sum<W>(d);
      best = std_max(best, expf(d * scale - p.m[st]) / l);
    }
    best = block_max<W, NT>(best, red);
    if (threadIdx.x == 0) p.scores[j] = best;
  }
}

// =============================================================================================
// page_bounds: one thread per feature, rows in order (a page may span rows of one call and
// continue a page of an earlier call). Exact.
// =============================================================================================
template <class T>
__global__ void page_bounds_kernel(PageBoundsParams<T> p) {
  for (int d = blockIdx.x * blockDim.x + threadIdx.x; d < p.dim; d += gridDim.x * blockDim.x) {
    for (std::int64_t i = 0; i < p.n; ++i) {
      const std::int64_t pos = p.pos[i];
      const std::int64_t at = (pos / p.page_size) * p.dim + d;
      const T k = p.k[i * p.ldk + d];
      if (pos % p.page_size == 0) {
        p.kmin[at] = k;
        p.kmax[at] = k;
      } else {
        const float kv = to_float(k);
        if (kv < to_float(p.kmin[at])) p.kmin[at] = k;  // std::min(mn, k)
        if (to_float(p.kmax[at]) < kv) p.kmax[at] = k;  // std::max(mx, k)
      }
    }
  }
}

// page_score: one block per page; warps over (row, head); the bound sum_d max(q min, q max).
template <class T, int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) page_score_kernel(PageScoreParams<T> p) {
  constexpr int NW = NT / W;
  __shared__ float red[NW];
  const int lane = threadIdx.x % W, warp = threadIdx.x / W;
  const int group = p.n_q_heads / p.n_kv_heads, hd = p.head_dim;
  const std::int64_t kd = std::int64_t(p.n_kv_heads) * hd;
  for (std::int64_t pg = blockIdx.x; pg < p.n_pages; pg += gridDim.x) {
    float best = kNegInf;
    for (int pair = warp; pair < p.nq * p.n_q_heads; pair += NW) {
      const int i = pair / p.n_q_heads, h = pair % p.n_q_heads;
      const T* q = p.q + std::int64_t(i) * p.ldq + std::int64_t(h) * hd;
      const std::int64_t off = pg * kd + std::int64_t(h / group) * hd;
      float sum = 0.f;
      for (int e = lane; e < hd; e += W) {
        const float qv = to_float(q[e]);
        sum += std_max(qv * to_float(p.kmin[off + e]), qv * to_float(p.kmax[off + e]));
      }
      sum = warp_sum<W>(sum);
      best = std_max(best, sum);
    }
    best = block_max<W, NT>(best, red);
    if (threadIdx.x == 0) p.scores[pg] = best;
  }
}

// =============================================================================================
// topk: one block. Scores become order-preserving u32 keys (-0 folded into +0, so they tie like
// the CPU's comparison). (1) MSB-first radix select, 4 passes of 8 bits over all n (histogram
// atomics aggregated per warp: scores cluster in few bins), finds the key T of the K-th largest
// and how many keys equal to T to take; (2) each thread owns a contiguous segment of indices:
// one sweep counts, two block scans give each thread its output offset and how many of its keys
// equal to T it takes (the lowest indices win ties), a second sweep writes (key, ~index) words;
// (3) a bitonic sort (descending) of the K words, in shared memory when the padded K fits
// (kTopkSmemMax), else in the caller's global scratch.
// Cost: 6 reads of n by one block, O(n / NT) steps per thread, plus O(K log^2 K / NT) for the
// sort. NaN scores have no defined order.
// =============================================================================================
inline constexpr int kTopkThreads = 1024;
inline constexpr int kTopkSmemMax = 4096;  // padded K sorted in shared memory (32 KiB)
inline constexpr int kTopkUnroll = 8;      // loads in flight per thread

// Keys are 32-bit (unsigned); a sort word is (key << kKeyBits) | (kKeyOnes - index), so that
// equal keys sort by ascending index in the descending sort. Nothing here is a lane mask.
inline constexpr int kKeyBits = std::numeric_limits<unsigned>::digits;
inline constexpr unsigned kKeyOnes = std::numeric_limits<unsigned>::max();
inline constexpr unsigned kKeySign = kKeyOnes ^ (kKeyOnes >> 1);
static_assert(sizeof(unsigned long long) * 8 >= 2 * kKeyBits, "a sort word holds a key and an index");

DELTAKV_GPU_D unsigned order_key(float f) {
  if (f == 0.f) f = 0.f;  // -0 -> +0
  const unsigned u = vendor::float_bits(f);
  return u ^ ((u & kKeySign) ? kKeyOnes : kKeySign);
}

template <int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT)
    topk_kernel(TopKParams p, int K, int P, unsigned long long* gbuf, int use_smem) {
  __shared__ int hist[256];
  __shared__ int ired[NT / W];
  __shared__ unsigned s_prefix;
  __shared__ int s_remaining;
  DELTAKV_DYNAMIC_SMEM(unsigned long long, sbuf);
  unsigned long long* buf = use_smem ? sbuf : gbuf;
  const int tid = threadIdx.x, lane = tid % W;

  // (1) radix select
  unsigned prefix = 0, mask = 0;
  int remaining = K;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += NT) hist[b] = 0;
    __syncthreads();
    // kTopkUnroll independent loads in flight per thread; uniform trip count (ballots below)
    for (std::int64_t base = 0; base < p.n; base += std::int64_t(NT) * kTopkUnroll) {
      unsigned keys[kTopkUnroll];
#pragma unroll
      for (int u = 0; u < kTopkUnroll; ++u) {
        const std::int64_t i = base + std::int64_t(u) * NT + tid;
        keys[u] = i < p.n ? order_key(p.scores[i]) : 0u;
      }
#pragma unroll
      for (int u = 0; u < kTopkUnroll; ++u) {
        const std::int64_t i = base + std::int64_t(u) * NT + tid;
        bool has = i < p.n && (keys[u] & mask) == prefix;
        const unsigned bin = (keys[u] >> shift) & 255u;
        auto pending = vendor::ballot<W>(has);
        while (pending) {  // one atomic per distinct bin in the warp
          const int leader = vendor::first_lane(pending);
          const unsigned lb = vendor::shfl<W>(bin, leader);
          const auto same = vendor::ballot<W>(has && bin == lb);
          if (lane == leader) atomicAdd(&hist[lb], vendor::popcount(same));
          if (has && bin == lb) has = false;
          pending &= ~same;
        }
      }
    }
    __syncthreads();
    if (tid == 0) {
      int cum = 0, d = 255;
      for (; d > 0; --d) {
        if (cum + hist[d] >= remaining) break;
        cum += hist[d];
      }
      s_prefix = prefix | (unsigned(d) << shift);
      s_remaining = remaining - cum;
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 255u << shift;
  }
  const unsigned thr = prefix;
  const int need_eq = remaining;

  // (2) compaction by contiguous segments
  const std::int64_t seg = (p.n + NT - 1) / NT;
  const std::int64_t lo = std::int64_t(tid) * seg;
  const std::int64_t hi = lo + seg < p.n ? lo + seg : p.n;
  int gt_c = 0, eq_c = 0;
  for (std::int64_t i0 = lo; i0 < hi; i0 += kTopkUnroll) {
    unsigned keys[kTopkUnroll];
#pragma unroll
    for (int u = 0; u < kTopkUnroll; ++u) keys[u] = i0 + u < hi ? order_key(p.scores[i0 + u]) : 0u;
#pragma unroll
    for (int u = 0; u < kTopkUnroll; ++u) {
      gt_c += i0 + u < hi && keys[u] > thr;
      eq_c += i0 + u < hi && keys[u] == thr;
    }
  }
  int total = 0;
  const int eq_before = block_exclusive_scan<W, NT>(eq_c, ired, total);
  int eq_take = need_eq - eq_before;
  eq_take = eq_take < 0 ? 0 : (eq_take > eq_c ? eq_c : eq_take);
  int at = block_exclusive_scan<W, NT>(gt_c + eq_take, ired, total);
  for (std::int64_t i0 = lo; i0 < hi; i0 += kTopkUnroll) {
    unsigned keys[kTopkUnroll];
#pragma unroll
    for (int u = 0; u < kTopkUnroll; ++u) keys[u] = i0 + u < hi ? order_key(p.scores[i0 + u]) : 0u;
#pragma unroll
    for (int u = 0; u < kTopkUnroll; ++u) {
      const std::int64_t i = i0 + u;
      if (i < hi) {  // (not `break`: a loop with two exits is not fully unrolled by clang)
        const bool take = keys[u] > thr || (keys[u] == thr && eq_take > 0);
        if (keys[u] == thr && eq_take > 0) --eq_take;
        if (take)
          buf[at++] = (static_cast<unsigned long long>(keys[u]) << kKeyBits) | (kKeyOnes - static_cast<unsigned>(i));
      }
    }
  }
  for (int i = K + tid; i < P; i += NT) buf[i] = 0ull;  // below every real word
  __syncthreads();

  // (3) bitonic sort, descending
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int t = tid; t < P / 2; t += NT) {
        const int a = 2 * t - (t & (stride - 1));
        const int b = a + stride;
        const bool up = (a & size) == 0;
        const unsigned long long x = buf[a], y = buf[b];
        if ((x < y) == up) {
          buf[a] = y;
          buf[b] = x;
        }
      }
      __syncthreads();
    }
  }
  for (int q = tid; q < K; q += NT)
    p.idx[q] = static_cast<std::int32_t>(kKeyOnes - static_cast<unsigned>(buf[q] & kKeyOnes));
}

// copy_rows: a block per row (source row src_rows[i] - src_base), threads over its units (U: 16
// bytes where every row start is 16-byte aligned, else T; the host picks). Source and destination
// must not overlap.
struct CopyRowsPart {  // byte strides; row i: source src_rows[i] - src_base, destination dst_rows[i]
  const unsigned char* src; std::int64_t lds; const std::int64_t* src_rows; std::int64_t src_base;
  unsigned char* dst; std::int64_t ldd; const std::int64_t* dst_rows;
  float* sq_norms;  // copy_rows_batch only: |row i|^2 into sq_norms[i] (nullptr: none)
};
// Row i of the part by the calling block's threads; returns this thread's share of the row's sum of
// squares as T elements (T void: none, 0).
template <class U, class T = void>
DELTAKV_GPU_D float copy_one_row(const CopyRowsPart& p, std::int64_t i, int units) {
  const std::int64_t s = p.src_rows ? p.src_rows[i] - p.src_base : i;
  const std::int64_t d = p.dst_rows ? p.dst_rows[i] : i;
  const U* from = reinterpret_cast<const U*>(p.src + s * p.lds);
  U* to = reinterpret_cast<U*>(p.dst + d * p.ldd);
  float sq = 0.f;
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    const U v = from[u];
    to[u] = v;
    if constexpr (!std::is_void_v<T>) {
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int k = 0; k < int(sizeof(U) / sizeof(T)); ++k) {
        const float f = to_float(e[k]);
        sq += f * f;
      }
    }
  }
  return sq;
}
template <class U>
__global__ void copy_rows_kernel(const unsigned char* src, std::int64_t lds_bytes, const std::int64_t* src_rows,
                                 std::int64_t src_base, unsigned char* dst, std::int64_t ldd_bytes, const std::int64_t* dst_rows,
                                 std::int64_t n, int units) {
  const CopyRowsPart p{src, lds_bytes, src_rows, src_base, dst, ldd_bytes, dst_rows, nullptr};
  for (std::int64_t i = blockIdx.x; i < n; i += gridDim.x) copy_one_row<U>(p, i, units);
}

// copy_rows_batch: the parts of CopyRowsBatchParams as one grid over their rows laid end to end
// (a block per row, as copy_rows_kernel), every part with the same row width and 16-byte row starts
// (the host checks; otherwise it copies part by part). Part j holds rows [end[j - 1], end[j]).
// A part with sq_norms also gets its rows' sums of squares of T values (each thread's units in
// order, then a block sum): the references' norms for the search, with no launch of their own.
inline constexpr int kCopyBatchParts = 4, kCopyBatchThreads = 256;
struct CopyRowsBatchArgs {
  CopyRowsPart part[kCopyBatchParts];
  std::int64_t end[kCopyBatchParts];  // running row counts; unused parts repeat the total
  int units;                          // units of U per row
};
template <class U, class T, int W>
__global__ void copy_rows_batch_kernel(CopyRowsBatchArgs a) {
  constexpr int NT = kCopyBatchThreads;
  __shared__ float red[NT / W];
  const std::int64_t total = a.end[kCopyBatchParts - 1];
  for (std::int64_t i = blockIdx.x; i < total; i += gridDim.x) {
    // the row's part, chosen by selects over the parameters (indexing the parameter array with a
    // variable would copy it to local memory)
    CopyRowsPart p = a.part[0];
    std::int64_t r = i;
#pragma unroll
    for (int j = 1; j < kCopyBatchParts; ++j)
      if (i >= a.end[j - 1]) {
        p = a.part[j];
        r = i - a.end[j - 1];
      }
    if (p.sq_norms == nullptr) {
      copy_one_row<U>(p, r, a.units);
    } else {  // the row's part is the whole block's: every thread reaches the block sum
      const float sq = block_sum<W, NT>(copy_one_row<U, T>(p, r, a.units), red);
      if (threadIdx.x == 0) p.sq_norms[r] = sq;
    }
  }
}

// all_finite: sets *flag = tag when any element is NaN or Inf (a tag per call, so the flag needs no
// clearing); dim % V == 0 and ldx % V == 0. Each thread issues the loads of R rows before testing
// any; the host sizes the grid for n / R rows.
inline constexpr int kFiniteRows = 4;
template <class T, int V>
__global__ void all_finite_kernel(FiniteCheckParams<T> p, int* flag, int tag) {
  constexpr int R = kFiniteRows;
  const int packs = p.dim / V;
  const std::int64_t step = gridDim.x;
  bool bad = false;
  for (std::int64_t i0 = blockIdx.x; i0 < p.n; i0 += step * R)
    for (int j = threadIdx.x; j < packs; j += blockDim.x) {
      Pack<T, V> a[R];
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (i0 + r * step < p.n) a[r] = load_pack<T, V>(p.x + (i0 + r * step) * p.ldx + std::int64_t(j) * V);
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (i0 + r * step < p.n)
#pragma unroll
          for (int e = 0; e < V; ++e) bad |= !isfinite(to_float(a[r].v[e]));
    }
  if (bad) *flag = tag;
}

}  // namespace deltakv::gpu
