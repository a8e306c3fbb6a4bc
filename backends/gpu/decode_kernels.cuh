#pragma once
// Fused decode-step kernels, one source for CUDA and HIP (vendor names only via vendor*.hpp).
// Parameters and storage layouts: decode_params.hpp. Launch shapes: decode_step.hpp.
//
//   dense_decode_kernel   split-KV (flash-decoding) attention of one query token per sequence over
//                         exact pre-RoPE rows; RoPE on chip from a two-level table; optionally
//                         writes the logits the OmniKV filter scores.
//   combine_kernel        merges the splits (shared by the dense and the sparse kernel).
//   score_keys_kernel     OmniKV score per middle position, as an order-preserving 32-bit key.
//   select_kernel         radix select of the k largest keys per sequence, one block each,
//                         written in position order (ties to the lower position).
//   sparse_decode_kernel  attention over sinks + selection + window of a compressed layer: each
//                         token rebuilt on chip (dequantize z, f_d's K rows on tensor cores, mean
//                         of its references, RoPE); V through W_v (sum p z), never per token.
//
// Warp size W and threads per block NT are template parameters; lane groups of 16 (one token per
// group in the dense kernel) work on any W >= 16. Storage T is bf16 or f16; arithmetic is f32.
#include <cstdint>
#include <limits>
#include <type_traits>

#include "decode_params.hpp"
#include "vendor.hpp"
#include "vendor_ext.hpp"

namespace deltakv::gpu::decode {

using vendor::from_float;
using vendor::to_float;

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// N consecutive 16-bit values (4, 8 or 16 bytes, aligned) as floats.
template <class T, int N>
DELTAKV_GPU_D void load_vec(const T* src, float* out) {
  constexpr int bytes = N * int(sizeof(T));
  static_assert(bytes == 4 || bytes == 8 || bytes == 16, "load_vec: 4, 8 or 16 bytes");
  using U = std::conditional_t<bytes == 16, uint4, std::conditional_t<bytes == 8, uint2, unsigned>>;
  const U raw = *reinterpret_cast<const U*>(src);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(e[i]);
}

// Lane `lane` of a 16-lane group holds E = D/16 dims of a head, ordered so that registers i and
// i + E/2 are RoPE partners with frequency lane * E/2 + i:
//   half style:        i -> lane*E/2 + i,      i + E/2 -> D/2 + lane*E/2 + i
//   interleaved style: i -> lane*E + 2i,       i + E/2 -> lane*E + 2i + 1
template <class T, int D>
DELTAKV_GPU_D void load_head(const T* head, int lane, bool half, float* x) {
  constexpr int E = D / 16, H = E / 2;
  if (half) {
    load_vec<T, H>(head + lane * H, x);
    load_vec<T, H>(head + D / 2 + lane * H, x + H);
  } else {
    float t[E];
    load_vec<T, E>(head + lane * E, t);
#pragma unroll
    for (int i = 0; i < H; ++i) {
      x[i] = t[2 * i];
      x[i + H] = t[2 * i + 1];
    }
  }
}

template <int D>
DELTAKV_GPU_D int head_dim_of(int lane, bool half, int reg) {
  constexpr int E = D / 16, H = E / 2;
  const int i = reg % H, hi = reg / H;
  return half ? hi * (D / 2) + lane * H + i : lane * E + 2 * i + hi;
}

// cos, sin of position p for frequencies f0 .. f0 + H - 1 (H a multiple of 2 or 1).
template <int H>
DELTAKV_GPU_D void rope_cs(const RopeTableView& t, std::int64_t p, int f0, float* c, float* s) {
  const float* hi = t.hi + ((p >> 6) * t.half + f0) * 2;
  const float* lo = t.lo + ((p & 63) * t.half + f0) * 2;
#pragma unroll
  for (int i = 0; i < H; ++i) {
    const float ca = hi[2 * i], sa = hi[2 * i + 1], cb = lo[2 * i], sb = lo[2 * i + 1];
    c[i] = ca * cb - sa * sb;
    s[i] = sa * cb + ca * sb;
  }
}

template <int E>
DELTAKV_GPU_D void rotate(float* x, const float* c, const float* s) {
  constexpr int H = E / 2;
#pragma unroll
  for (int i = 0; i < H; ++i) {
    const float x1 = x[i], x2 = x[i + H];
    x[i] = x1 * c[i] - x2 * s[i];
    x[i + H] = x2 * c[i] + x1 * s[i];
  }
}

template <int W>
DELTAKV_GPU_D float group16_sum(float v) {
  static_assert(W >= 16, "16-lane groups need a warp of at least 16 lanes");
  v += vendor::shfl_xor<W>(v, 8);
  v += vendor::shfl_xor<W>(v, 4);
  v += vendor::shfl_xor<W>(v, 2);
  v += vendor::shfl_xor<W>(v, 1);
  return v;
}

// =============================================================================================
// dense_decode_kernel<T, D, G, W, NT>: grid (n_splits, Hkv, B), NT threads = NT/16 token groups.
// Each group streams U tokens at a time of its block's split (K and V slices of kv head h), keeps
// an online softmax per q head of the GQA group, and the groups merge in shared memory at the end.
// =============================================================================================
template <class T, int D, int G, int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) dense_decode_kernel(DenseDecodeParams<T> p) {
  constexpr int E = D / 16, H = E / 2, NG = NT / 16, U = 4;
  __shared__ float s_acc[NG][G][D];
  __shared__ float s_m[NG][G], s_l[NG][G];
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int grp = threadIdx.x / 16, lane = threadIdx.x % 16;
  const bool half = p.style != RopeStyle::interleaved, rope = p.style != RopeStyle::none;
  const int n = p.n[b];
  const int t0 = split * p.split_len, t1 = min(n, t0 + p.split_len);
  const int Hq = p.n_q_heads, ld = 2 * p.n_kv_heads * D;

  float q[G][E];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    load_head<T, D>(p.q + b * p.ldq + (h * G + g) * D, lane, half, q[g]);
#pragma unroll
    for (int e = 0; e < E; ++e) q[g][e] *= p.scale;
  }
  float m[G], l[G], acc[G][E];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = kNegInf;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[g][e] = 0.f;
  }
  const T* base = p.kv + b * p.seq_stride;
  // The loop bound is the warp's (its first group's), so every lane of a warp runs the same
  // iterations and the group shuffles never diverge; tokens past t1 are masked.
  const int gw = grp % (W / 16);
  for (int tw = t0 + (grp - gw) * U; tw < t1; tw += NG * U) {
    const int t = tw + gw * U;
    float k[U][E], v[U][E];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (t + u < t1) {
        const T* row = base + std::int64_t(t + u) * ld;
        load_head<T, D>(row + h * D, lane, half, k[u]);
        load_head<T, D>(row + (p.n_kv_heads + h) * D, lane, half, v[u]);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) k[u][e] = v[u][e] = 0.f;
      }
    }
    if (rope) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float c[H], s[H];
        rope_cs<H>(p.rope, t + u, lane * H, c, s);
        rotate<E>(k[u], c, s);
      }
    }
    float sc[U][G];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) d += q[g][e] * k[u][e];
        sc[u][g] = group16_sum<W>(d);
      }
    if (p.logits && lane < G) {
#pragma unroll
      for (int g = 0; g < G; ++g)
        if (g == lane)
#pragma unroll
          for (int u = 0; u < U; ++u)
            if (t + u < t1) p.logits[(std::int64_t(b) * Hq + h * G + g) * p.ld_logits + t + u] = sc[u][g];
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (t + u < t1) mx = fmaxf(mx, sc[u][g]);
      const float alpha = expf(m[g] - mx);  // m = -inf on the first tile: alpha = 0
      m[g] = mx;
      l[g] *= alpha;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][e] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float pu = t + u < t1 ? expf(sc[u][g] - mx) : 0.f;
        l[g] += pu;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[g][e] += pu * v[u][e];
      }
    }
  }
  // merge the groups
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int e = 0; e < E; ++e) s_acc[grp][g][head_dim_of<D>(lane, half, e)] = acc[g][e];
    if (lane == 0) {
      s_m[grp][g] = m[g];
      s_l[grp][g] = l[g];
    }
  }
  __syncthreads();
  float* part = p.part + ((std::int64_t(b) * Hq + h * G) * p.n_splits + split) * (D + 2);
  const std::int64_t head_stride = std::int64_t(p.n_splits) * (D + 2);
  for (int i = threadIdx.x; i < G * D; i += NT) {
    const int g = i / D, d = i % D;
    float M = kNegInf;
    for (int r = 0; r < NG; ++r) M = fmaxf(M, s_m[r][g]);
    float a = 0.f, L = 0.f;
    if (M != kNegInf)
      for (int r = 0; r < NG; ++r) {
        const float w = expf(s_m[r][g] - M);
        a += s_acc[r][g][d] * w;
        L += s_l[r][g] * w;
      }
    float* out = part + g * head_stride;
    out[d] = a;
    if (d == 0) {
      out[D] = M;
      out[D + 1] = L;
    }
  }
}

// =============================================================================================
// combine_kernel<T>: one block per (sequence, q head), threads over head_dim.
// =============================================================================================
template <class T>
__global__ void combine_kernel(CombineParams<T> p) {
  const int bh = blockIdx.x, D = p.head_dim;
  const float* part = p.part + std::int64_t(bh) * p.n_splits * (D + 2);
  float M = kNegInf;
  for (int s = 0; s < p.n_splits; ++s) M = fmaxf(M, part[s * (D + 2) + D]);
  const int b = bh / p.n_q_heads, h = bh % p.n_q_heads;
  float L = 0.f;
  if (M != kNegInf)
    for (int s = 0; s < p.n_splits; ++s) {
      const float* ps = part + s * (D + 2);
      if (ps[D + 1] > 0.f) L += ps[D + 1] * expf(ps[D] - M);
    }
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.f;
    if (L > 0.f)
      for (int s = 0; s < p.n_splits; ++s) {
        const float* ps = part + s * (D + 2);
        if (ps[D + 1] > 0.f) a += ps[d] * expf(ps[D] - M);
      }
    p.out[b * p.ldo + h * D + d] = from_float<T>(L > 0.f ? a / L : 0.f);
  }
  if (p.lse && threadIdx.x == 0) p.lse[bh] = L > 0.f ? M + logf(L) : kNegInf;
}

// =============================================================================================
// score_keys_kernel: grid (chunks, B); key = float bits of max_h exp(logit - lse_h) plus one for
// middle positions (probabilities are >= 0, so the bits order like the values), 0 elsewhere.
// =============================================================================================
__global__ void score_keys_kernel(SelectParams p) {
  const int b = blockIdx.y, n = p.n[b];
  const int s_end = min(p.sinks, n), w_begin = max(s_end, n - p.window);
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < n; t += gridDim.x * blockDim.x) {
    std::uint32_t key = 0;
    if (t >= s_end && t < w_begin) {
      float best = 0.f;
      for (int h = 0; h < p.n_q_heads; ++h) {
        const float lse = p.lse[b * p.n_q_heads + h];
        const float lg = p.logits[(std::int64_t(b) * p.n_q_heads + h) * p.ld_logits + t];
        best = fmaxf(best, expf(lg - lse));
      }
      key = vendor::float_bits(best) + 1u;
    }
    p.keys[b * p.ld_keys + t] = key;
  }
}

// Block-wide exclusive prefix sum of v (ints); total in *total. Scratch: NT / W ints.
template <int W, int NT>
DELTAKV_GPU_D int block_exclusive_scan(int v, int* scratch, int* total) {
  constexpr int NW = NT / W;
  static_assert(NW <= W, "block scan: warps per block must not exceed the warp size");
  const int lane = threadIdx.x % W, warp = threadIdx.x / W;
  int x = v;
#pragma unroll
  for (int o = 1; o < W; o <<= 1) {
    const int y = vendor::shfl_up<W>(x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();
  if (lane == W - 1) scratch[warp] = x;
  __syncthreads();
  int before = 0, all = 0;
  for (int w = 0; w < NW; ++w) {
    const int s = scratch[w];
    if (w < warp) before += s;
    all += s;
  }
  *total = all;
  return before + x - v;
}

// =============================================================================================
// select_kernel<W, NT>: one block per sequence. Radix select (four 8-bit digits, most significant
// first) finds the k-th largest key T and how many keys equal to T to take; one ordered pass
// writes every key > T and the first of those == T, in position order.
// =============================================================================================
template <int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) select_kernel(SelectParams p) {
  __shared__ int hist[256];
  __shared__ int scratch[NT / W];
  __shared__ std::uint32_t s_prefix;
  __shared__ int s_remaining;
  const int b = blockIdx.x, n = p.n[b];
  const std::uint32_t* keys = p.keys + b * p.ld_keys;
  // how many candidates (middle positions)
  const int s_end = min(p.sinks, n), w_begin = max(s_end, n - p.window);
  const int cand = w_begin - s_end;
  const int kk = min(p.k, cand);
  std::uint32_t thresh = 1u;  // take every candidate when there are no more than k
  int need_eq = 0x7fffffff;
  if (kk > 0 && kk < cand) {
    std::uint32_t prefix = 0, mask = 0;
    int remaining = kk;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += NT) hist[i] = 0;
      __syncthreads();
      for (int t = threadIdx.x; t < n; t += NT) {
        const std::uint32_t key = keys[t];
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int above = 0, d = 255;
        for (; d > 0; --d) {
          if (above + hist[d] >= remaining) break;
          above += hist[d];
        }
        s_prefix = prefix | (std::uint32_t(d) << shift);
        s_remaining = remaining - above;
      }
      __syncthreads();
      prefix = s_prefix;
      remaining = s_remaining;
      mask |= 255u << shift;
      __syncthreads();
    }
    thresh = prefix;
    need_eq = remaining;
  }
  int written = 0, eq_seen = 0;
  for (int start = 0; start < n && kk > 0; start += NT) {
    const int t = start + threadIdx.x;
    const std::uint32_t key = t < n ? keys[t] : 0u;
    const bool eq = key != 0u && key == thresh;
    int eq_total = 0;
    const int eq_rank = eq_seen + block_exclusive_scan<W, NT>(eq ? 1 : 0, scratch, &eq_total);
    const bool take = key != 0u && (key > thresh || (eq && eq_rank < need_eq));
    int take_total = 0;
    const int at = written + block_exclusive_scan<W, NT>(take ? 1 : 0, scratch, &take_total);
    if (take) p.sel[b * p.ld_sel + at] = t;
    written += take_total;
    eq_seen += eq_total;
  }
  if (threadIdx.x == 0) p.sel_count[b] = kk > 0 ? kk : 0;
}

// =============================================================================================
// sparse_decode_kernel<T, D, G, W, NT>: grid (n_splits, Hkv, B). The block walks its share of the
// attended list in tiles of 32 tokens:
//   1. resolve positions to storage rows (sink / ring / reference: exact; latent: z + references)
//   2. dequantize the latents of the tile into shared memory (zeros for exact tokens)
//   3. K_tile = Z W_k,h^T on tensor cores (W_k,h kept in shared memory for the whole block)
//   4. K += mean of the references' K (the exact row for exact tokens) + bias; RoPE
//   5. logits, online softmax per q head
//   6. acc_z += p Z; acc_v += p (mean of references' V, or the exact V)
// and at the end writes acc_v + W_v,h acc_z + mass * b_v as its split's partial.
// Dynamic shared memory: see sparse_smem_bytes().
// =============================================================================================
inline constexpr int kSparseTile = 32;

inline std::size_t sparse_smem_bytes(int head_dim, int group, int latent_dim, int k) {
  const std::size_t ldz = std::size_t(latent_dim) + 8;        // 16-bit elements
  std::size_t b = 0;
  b += std::size_t(head_dim) * ldz * 2;                        // W_k,h
  b += std::size_t(kSparseTile) * ldz * 2;                     // Z tile
  b += std::size_t(kSparseTile) * (head_dim + 4) * 4;          // K / V tile (f32)
  b += std::size_t(group) * latent_dim * 4;                    // acc_z
  b += std::size_t(group) * head_dim * 4;                      // acc_v
  b += std::size_t(group) * (head_dim + 2) * 4;                // q (scaled)
  b += std::size_t(group) * kSparseTile * 4;                   // probabilities
  b += std::size_t(kSparseTile) * (k + 1) * 8;                 // row offsets per token
  b += std::size_t(kSparseTile) * 4 * 4;                       // pos, latent row, nref, -
  b += std::size_t(kSparseTile) * 2 * 4;                       // scale, min
  b += std::size_t(group) * 4 * 4;                             // m, l, alpha, mass
  return b + 64;
}

template <class T, int D, int G, int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) sparse_decode_kernel(SparseDecodeParams<T> p) {
  constexpr int TT = kSparseTile, NW = NT / W;
  static_assert(NT >= TT * 4 && NT % W == 0, "sparse_decode_kernel: at least 128 threads");
  const auto& L = p.layer;
  const int DC = L.latent_dim, K = L.k, ldz = DC + 8, ldk = D + 4;
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int Hkv = p.n_kv_heads, kvd = 2 * Hkv * D;
  const bool half = p.style != RopeStyle::interleaved, rope = p.style != RopeStyle::none;

  DELTAKV_DYNAMIC_SMEM(unsigned char, smem_raw);
  T* s_w = reinterpret_cast<T*>(smem_raw);                      // [D][ldz]
  T* s_z = s_w + std::size_t(D) * ldz;                           // [TT][ldz]
  float* s_kv = reinterpret_cast<float*>(s_z + std::size_t(TT) * ldz);  // [TT][ldk]
  float* s_accz = s_kv + TT * ldk;                               // [G][DC]
  float* s_accv = s_accz + G * DC;                               // [G][D]
  float* s_q = s_accv + G * D;                                   // [G][D + 2]
  float* s_p = s_q + G * (D + 2);                                // [G][TT]
  std::int64_t* s_off = reinterpret_cast<std::int64_t*>(s_p + G * TT);  // [TT][K + 1] element offsets
  std::int32_t* s_pos = reinterpret_cast<std::int32_t*>(s_off + TT * (K + 1));  // [TT]
  std::int32_t* s_lrow = s_pos + TT;                             // [TT] latent row or -1
  std::int32_t* s_nref = s_lrow + TT;                            // [TT]
  std::int32_t* s_pad = s_nref + TT;                             // [TT]
  float* s_sm = reinterpret_cast<float*>(s_pad + TT);            // [TT][2]
  float* s_stat = s_sm + 2 * TT;                                 // [G][4]: m, l, alpha, mass
  (void)s_pad;

  const int n = p.n[b], cfront = p.c[b];
  const int s_end = min(p.sinks, n), w_begin = max(s_end, n - p.window);
  const int n_sel = p.sel_count ? p.sel_count[b] : 0;
  const int total = s_end + n_sel + (n - w_begin);
  const int per = ((total + p.n_splits - 1) / p.n_splits + TT - 1) / TT * TT;
  const int i0 = split * per, i1 = min(total, i0 + per);

  const std::byte* seq = L.base + std::size_t(b) * L.seq_bytes;
  const T* sinks = reinterpret_cast<const T*>(seq + L.off_sinks);
  const T* ring = reinterpret_cast<const T*>(seq + L.off_ring);
  const T* refs = reinterpret_cast<const T*>(seq + L.off_refs);
  const std::uint8_t* lat = reinterpret_cast<const std::uint8_t*>(seq + L.off_lat);
  const float* scl = reinterpret_cast<const float*>(seq + L.off_scale);
  const std::int32_t* ids = reinterpret_cast<const std::int32_t*>(seq + L.off_ids);
  // Offsets are in elements from `sinks`, so one base serves every region.
  const std::int64_t ring0 = reinterpret_cast<const T*>(ring) - sinks;
  const std::int64_t refs0 = reinterpret_cast<const T*>(refs) - sinks;

  // W_k,h into shared memory: rows h*D .. h*D + D - 1 of f_d's weight, [D][DC] -> ld ldz.
  for (int i = threadIdx.x; i < D * DC / 8; i += NT) {
    const int r = i / (DC / 8), c8 = (i % (DC / 8)) * 8;
    *reinterpret_cast<uint4*>(s_w + r * ldz + c8) =
        *reinterpret_cast<const uint4*>(L.w_dec + std::int64_t(h * D + r) * DC + c8);
  }
  for (int i = threadIdx.x; i < G * DC; i += NT) s_accz[i] = 0.f;
  for (int i = threadIdx.x; i < G * D; i += NT) {
    s_accv[i] = 0.f;
    const int g = i / D, d = i % D;
    s_q[g * (D + 2) + d] = to_float(p.q[b * p.ldq + (h * G + g) * D + d]) * p.scale;
  }
  if (threadIdx.x < G) {
    s_stat[threadIdx.x * 4 + 0] = kNegInf;
    s_stat[threadIdx.x * 4 + 1] = 0.f;
    s_stat[threadIdx.x * 4 + 3] = 0.f;
  }
  __syncthreads();

  for (int tile = i0; tile < i1; tile += TT) {
    // 1. resolve
    if (threadIdx.x < TT) {
      const int i = tile + threadIdx.x;
      int pos = -1, lrow = -1, nref = 0;
      if (i < i1) {
        if (i < s_end) {
          pos = i;
        } else if (i < s_end + n_sel) {
          pos = p.sel[b * p.ld_sel + (i - s_end)];
          if (pos < s_end || pos >= w_begin) pos = -1;  // not a middle position: ignored
        } else {
          pos = w_begin + (i - s_end - n_sel);
        }
      }
      std::int64_t* off = s_off + threadIdx.x * (K + 1);
      if (pos >= 0) {
        if (pos < L.sinks) {
          off[0] = std::int64_t(pos) * kvd;
          nref = 1;
        } else if (pos >= cfront) {
          off[0] = ring0 + std::int64_t((pos - L.sinks) % L.ring) * kvd;
          nref = 1;
        } else {
          const std::int32_t code = L.pos_code[pos];
          const int row = code >> 2;
          if ((code & 3) == 1) {
            off[0] = refs0 + std::int64_t(row) * kvd;
            nref = 1;
          } else {
            lrow = row;
            for (int j = 0; j < K; ++j) {
              const std::int32_t r = ids[std::int64_t(row) * K + j];
              if (r >= 0) off[nref++] = refs0 + std::int64_t(r) * kvd;
            }
            if (L.latent_bits > 0) {
              s_sm[2 * threadIdx.x] = scl[2 * std::int64_t(row)];
              s_sm[2 * threadIdx.x + 1] = scl[2 * std::int64_t(row) + 1];
            }
          }
        }
      }
      s_pos[threadIdx.x] = pos;
      s_lrow[threadIdx.x] = lrow;
      s_nref[threadIdx.x] = nref;
    }
    __syncthreads();
    // 2. dequantize: 8 values per task
    for (int task = threadIdx.x; task < TT * DC / 8; task += NT) {
      const int i = task / (DC / 8), c8 = (task % (DC / 8)) * 8;
      const int r = s_lrow[i];
      float z[8];
      if (r < 0) {
#pragma unroll
        for (int e = 0; e < 8; ++e) z[e] = 0.f;
      } else if (L.latent_bits == 0) {
        load_vec<T, 8>(reinterpret_cast<const T*>(lat + std::int64_t(r) * L.lat_ld) + c8, z);
      } else {
        const float sc = s_sm[2 * i], mn = s_sm[2 * i + 1];
        const std::uint8_t* q = lat + std::int64_t(r) * L.lat_ld;
        if (L.latent_bits == 8) {
          const uint2 raw = *reinterpret_cast<const uint2*>(q + c8);
          const std::uint8_t* c = reinterpret_cast<const std::uint8_t*>(&raw);
#pragma unroll
          for (int e = 0; e < 8; ++e) z[e] = vendor::add_rn(vendor::mul_rn(float(c[e]), sc), mn);
        } else {
          const unsigned raw = *reinterpret_cast<const unsigned*>(q + c8 / 2);
#pragma unroll
          for (int e = 0; e < 8; ++e) z[e] = vendor::add_rn(vendor::mul_rn(float((raw >> (4 * e)) & 0xFu), sc), mn);
        }
      }
      T zt[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) zt[e] = from_float<T>(z[e]);
      *reinterpret_cast<uint4*>(s_z + i * ldz + c8) = *reinterpret_cast<const uint4*>(zt);
    }
    __syncthreads();
    // 3. K tile on tensor cores: [TT x DC] x [DC x D]
    {
      const int warp = threadIdx.x / W;
      constexpr int tiles = (TT / 16) * (D / 16);
      for (int t = warp; t < tiles; t += NW) {
        const int tr = t / (D / 16), tc = t % (D / 16);
        vendor::mma16<T> acc;
        acc.zero();
        for (int kk = 0; kk < DC; kk += 16) acc.mac(s_z + tr * 16 * ldz + kk, ldz, s_w + tc * 16 * ldz + kk, ldz);
        acc.store(s_kv + tr * 16 * ldk + tc * 16, ldk);
      }
    }
    __syncthreads();
    // 4. K += reference mean (+ bias for latents); RoPE. Task: (token, lane of 16) -> E dims.
    {
      constexpr int E = D / 16, H = E / 2;
      for (int task = threadIdx.x; task < TT * 16; task += NT) {
        const int i = task / 16, lane = task % 16;
        const int nref = s_nref[i];
        float x[E], sum[E];
#pragma unroll
        for (int e = 0; e < E; ++e) sum[e] = 0.f;
        for (int j = 0; j < nref; ++j) {
          load_head<T, D>(sinks + s_off[i * (K + 1) + j] + h * D, lane, half, x);
#pragma unroll
          for (int e = 0; e < E; ++e) sum[e] += x[e];
        }
        const float inv = nref > 0 ? 1.f / float(nref) : 0.f;
        const bool latent = s_lrow[i] >= 0;
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int d = head_dim_of<D>(lane, half, e);
          float v = s_kv[i * ldk + d] + sum[e] * inv;
          if (latent && L.b_dec) v += to_float(L.b_dec[h * D + d]);
          x[e] = v;
        }
        if (rope && s_pos[i] >= 0) {
          float c[H], s[H];
          rope_cs<H>(p.rope, s_pos[i], lane * H, c, s);
          rotate<E>(x, c, s);
        }
#pragma unroll
        for (int e = 0; e < E; ++e) s_kv[i * ldk + head_dim_of<D>(lane, half, e)] = x[e];
      }
    }
    __syncthreads();
    // 5. logits: (token, head) pairs, 4 threads each
    for (int task = threadIdx.x; task < TT * G * 4; task += NT) {
      const int i = task / (G * 4), g = (task / 4) % G, part = task % 4;
      float d = 0.f;
      for (int e = part; e < D; e += 4) d += s_q[g * (D + 2) + e] * s_kv[i * ldk + e];
      d += vendor::shfl_xor<W>(d, 1);
      d += vendor::shfl_xor<W>(d, 2);
      if (part == 0) s_p[g * TT + i] = s_pos[i] >= 0 ? d : kNegInf;
    }
    __syncthreads();
    //    online softmax: one thread per head (TT values)
    if (threadIdx.x < G) {
      const int g = threadIdx.x;
      float* st = s_stat + g * 4;
      float mx = st[0];
      for (int i = 0; i < TT; ++i) mx = fmaxf(mx, s_p[g * TT + i]);
      if (mx == kNegInf) {
        st[2] = 1.f;
        for (int i = 0; i < TT; ++i) s_p[g * TT + i] = 0.f;
      } else {
        const float alpha = expf(st[0] - mx);
        float sum = 0.f, mass = 0.f;
        for (int i = 0; i < TT; ++i) {
          const float pr = expf(s_p[g * TT + i] - mx);
          s_p[g * TT + i] = pr;
          sum += pr;
          if (s_lrow[i] >= 0) mass += pr;
        }
        st[0] = mx;
        st[1] = st[1] * alpha + sum;
        st[2] = alpha;
        st[3] = st[3] * alpha + mass;
      }
    }
    // 6a. V tile: mean of references' V (exact V for exact tokens), 8 dims per task (s_kv reused)
    __syncthreads();
    for (int task = threadIdx.x; task < TT * (D / 8); task += NT) {
      const int i = task / (D / 8), d8 = (task % (D / 8)) * 8;
      const int nref = s_nref[i];
      float sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, x[8];
      for (int j = 0; j < nref; ++j) {
        load_vec<T, 8>(sinks + s_off[i * (K + 1) + j] + (Hkv + h) * D + d8, x);
#pragma unroll
        for (int e = 0; e < 8; ++e) sum[e] += x[e];
      }
      const float inv = nref > 0 ? 1.f / float(nref) : 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) s_kv[i * ldk + d8 + e] = sum[e] * inv;
    }
    __syncthreads();
    // 6b. accumulate
    for (int e = threadIdx.x; e < G * DC; e += NT) {
      const int g = e / DC, c = e % DC;
      float a = s_accz[e] * s_stat[g * 4 + 2];
      for (int i = 0; i < TT; ++i) a += s_p[g * TT + i] * to_float(s_z[i * ldz + c]);
      s_accz[e] = a;
    }
    for (int e = threadIdx.x; e < G * D; e += NT) {
      const int g = e / D, d = e % D;
      float a = s_accv[e] * s_stat[g * 4 + 2];
      for (int i = 0; i < TT; ++i) a += s_p[g * TT + i] * s_kv[i * ldk + d];
      s_accv[e] = a;
    }
    __syncthreads();
  }
  // partial: acc_v + W_v,h acc_z + mass * b_v; a warp per output dim d, lanes over DC
  float* part = p.part + ((std::int64_t(b) * p.n_q_heads + h * G) * p.n_splits + split) * (D + 2);
  const std::int64_t head_stride = std::int64_t(p.n_splits) * (D + 2);
  const int warp = threadIdx.x / W, lane = threadIdx.x % W;
  for (int d = warp; d < D; d += NW) {
    const T* wrow = L.w_dec + std::int64_t(Hkv * D + h * D + d) * DC;
    float dot[G];
#pragma unroll
    for (int g = 0; g < G; ++g) dot[g] = 0.f;
    for (int c = lane; c < DC; c += W) {
      const float w = to_float(wrow[c]);
#pragma unroll
      for (int g = 0; g < G; ++g) dot[g] += w * s_accz[g * DC + c];
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float v = dot[g];
#pragma unroll
      for (int o = W / 2; o > 0; o >>= 1) v += vendor::shfl_xor<W>(v, o);
      if (lane == 0) {
        const float bias = L.b_dec ? to_float(L.b_dec[(Hkv + h) * D + d]) : 0.f;
        part[g * head_stride + d] = s_accv[g * D + d] + v + s_stat[g * 4 + 3] * bias;
      }
    }
  }
  if (threadIdx.x < G) {
    part[threadIdx.x * head_stride + D] = s_stat[threadIdx.x * 4 + 0];
    part[threadIdx.x * head_stride + D + 1] = s_stat[threadIdx.x * 4 + 1];
  }
}

}  // namespace deltakv::gpu::decode
