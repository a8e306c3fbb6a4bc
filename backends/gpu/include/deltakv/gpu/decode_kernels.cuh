#pragma once
// Fused decode-step kernels, one source for CUDA and HIP (vendor names only via vendor*.hpp).
// Parameters and storage layouts: decode_params.hpp. Launch shapes: decode_step.hpp.
//
//   dense_decode_kernel   split-KV (flash-decoding) attention of one query token per sequence over
//                         exact pre-RoPE rows; RoPE on chip from a two-level table; optionally
//                         writes the logits the OmniKV filter scores. On CUDA the tensor-core
//                         dense_mma_kernel (dense_mma.cuh) is the default; this one serves HIP and
//                         the shapes that kernel does not take (DenseDecodeParams::lane_kernel).
//   combine_kernel        merges the splits (shared by the dense and the sparse kernel).
//   score_keys_kernel     OmniKV score per middle position, as an order-preserving 32-bit key.
//   select_kernel         radix select of the k largest keys per sequence, one block each,
//                         written in position order (ties to the lower position).
//   select_cluster_kernel the same selection in one launch: scores + radix passes on a cluster of
//                         blocks per sequence (sm_90; the default where clusters exist).
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

using vendor::saturate_f16;  // (the logits' f16 store, DenseDecodeParams::logits)

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

// N consecutive f32 in shared memory (16-byte aligned for N >= 4, 8-byte for N == 2) <-> registers,
// as 16- or 8-byte accesses: one scalar access per value had 4- to 8-way bank conflicts.
template <int N>
DELTAKV_GPU_D void ld_f32(const float* src, float* out) {
  static_assert(N == 2 || N % 4 == 0, "ld_f32: 2 or a multiple of 4 values");
  if constexpr (N == 2) {
    const float2 v = *reinterpret_cast<const float2*>(src);
    out[0] = v.x;
    out[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 v = *reinterpret_cast<const float4*>(src + i);
      out[i] = v.x;
      out[i + 1] = v.y;
      out[i + 2] = v.z;
      out[i + 3] = v.w;
    }
  }
}
template <int N>
DELTAKV_GPU_D void st_f32(float* dst, const float* in) {
  static_assert(N == 2 || N % 4 == 0, "st_f32: 2 or a multiple of 4 values");
  if constexpr (N == 2) {
    *reinterpret_cast<float2*>(dst) = make_float2(in[0], in[1]);
  } else {
#pragma unroll
    for (int i = 0; i < N; i += 4) *reinterpret_cast<float4*>(dst + i) = make_float4(in[i], in[i + 1], in[i + 2], in[i + 3]);
  }
}
// One lane's E values of an f32 head row (row 16-byte aligned), in load_head's register order.
template <int D>
DELTAKV_GPU_D void load_head_f32(const float* row, int lane, bool half, float* x) {
  constexpr int E = D / 16, H = E / 2;
  if (half) {
    ld_f32<H>(row + lane * H, x);
    ld_f32<H>(row + D / 2 + lane * H, x + H);
  } else {
    float t[E];
    ld_f32<E>(row + lane * E, t);
#pragma unroll
    for (int i = 0; i < H; ++i) {
      x[i] = t[2 * i];
      x[i + H] = t[2 * i + 1];
    }
  }
}

// The same E values as load_head, kept packed (16-bit) until used: half the registers, so twice
// the tokens can be in flight.
template <class T, int D>
using RawHead = std::conditional_t<D / 16 * sizeof(T) == 16, uint4, uint2>;

template <class T, int D>
DELTAKV_GPU_D RawHead<T, D> load_head_raw(const T* head, int lane, bool half) {
  constexpr int E = D / 16, H = E / 2;
  using R = RawHead<T, D>;
  static_assert(sizeof(R) == E * sizeof(T), "RawHead holds one lane's E values");
  using P = std::conditional_t<sizeof(R) == 16, uint2, unsigned>;  // half of R
  R r;
  P* pr = reinterpret_cast<P*>(&r);
  if (half) {
    pr[0] = *reinterpret_cast<const P*>(head + lane * H);
    pr[1] = *reinterpret_cast<const P*>(head + D / 2 + lane * H);
  } else {
    r = *reinterpret_cast<const R*>(head + lane * E);
  }
  return r;
}

template <class T, int D>
DELTAKV_GPU_D void unpack_head(const RawHead<T, D>& r, bool half, float* x) {
  constexpr int E = D / 16, H = E / 2;
  const T* e = reinterpret_cast<const T*>(&r);
  if (half) {
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < H; ++i) {
      x[i] = to_float(e[2 * i]);
      x[i + H] = to_float(e[2 * i + 1]);
    }
  }
}

// cos, sin of position p for frequencies f0 .. f0 + H - 1 (H a multiple of 2 or 1).
// H even: the table entries of a lane are 16-byte aligned (f0 = lane * H), read as float4.
template <int H>
DELTAKV_GPU_D void rope_cs(const RopeTableView& t, std::int64_t p, int f0, float* c, float* s) {
  static_assert(H % 2 == 0, "rope_cs: pairs of frequencies per load");
  const float4* hi = reinterpret_cast<const float4*>(t.hi + ((p >> 6) * t.half + f0) * 2);
  const float4* lo = reinterpret_cast<const float4*>(t.lo + ((p & 63) * t.half + f0) * 2);
#pragma unroll
  for (int i = 0; i < H / 2; ++i) {
    const float4 a = hi[i], b = lo[i];
    c[2 * i] = a.x * b.x - a.y * b.y;
    s[2 * i] = a.y * b.x + a.x * b.y;
    c[2 * i + 1] = a.z * b.z - a.w * b.w;
    s[2 * i + 1] = a.w * b.z + a.z * b.w;
  }
}

// cos, sin of position p for frequencies f0 .. f0 + H - 1 (H even, f0 = lane * H) computed from the
// frequencies in turns (RopeTableView::freq, a float pair a = hi + lo each): p * a - rint(p * hi) by
// two explicit fmas (the first exact up to its rounding; written as fmas so that no compiler's
// contraction can count the product's rounding twice, which clang's default contraction did to a
// separate error term on HIP), reduced once more into [-1/2, 1/2] turns, then __sincosf: ~5e-7
// absolute against the tables' ~1e-7, no table row read (p < 2^24).
template <int H>
DELTAKV_GPU_D void rope_sincos(const float* freq, std::int64_t p, int f0, float* c, float* s) {
  static_assert(H % 2 == 0, "rope_sincos: pairs of frequencies per load");
  const float pf = float(p);
  const float4* fq = reinterpret_cast<const float4*>(freq + 2 * f0);
#pragma unroll
  for (int i = 0; i < H / 2; ++i) {
    const float4 a = fq[i];
    const float hi[2] = {a.x, a.z}, lo[2] = {a.y, a.w};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float n = rintf(pf * hi[j]);
      float turns = fmaf(pf, lo[j], fmaf(pf, hi[j], -n));
      turns -= rintf(turns);  // exact; |turns| could reach ~0.63 at p near 2^24 before it
      __sincosf(turns * 6.28318530717958647692f, &s[2 * i + j], &c[2 * i + j]);
    }
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

// G rounded up to a power of two (at most 16): the heads group16_multi_sum carries per lane.
template <int G>
inline constexpr int kPow2Heads = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : G <= 8 ? 8 : 16;

// G per-lane partial sums (one per q head) reduced over each 16-lane group at once: each round halves
// the heads a lane carries (it sends one half to its partner and keeps the other), so G = 4 takes 5
// shuffles instead of 16 and G = 7 (padded to 8) 8 instead of 28. Returns the total of head `head`;
// the lanes with lane16 % (16 / kPow2Heads<G>) == 0 hold distinct heads.
template <int W, int G>
DELTAKV_GPU_D float group16_multi_sum(const float (&d)[G], int lane16, int& head) {
  static_assert(W >= 16 && G >= 1 && G <= 16, "group16_multi_sum: 1 to 16 heads, 16-lane groups");
  constexpr int P = kPow2Heads<G>;
  float v[P];
#pragma unroll
  for (int g = 0; g < P; ++g) v[g] = g < G ? d[g] : 0.f;
  int h = 0;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int off = 8 >> r, n = P >> r;
    if (n > 1) {
      const bool up = (lane16 & off) != 0;
#pragma unroll
      for (int k = 0; k < n / 2; ++k) {
        const float send = up ? v[k] : v[k + n / 2], keep = up ? v[k + n / 2] : v[k];
        v[k] = keep + vendor::shfl_xor<W>(send, off);
      }
      if (up) h += n / 2;
    } else {
      v[0] += vendor::shfl_xor<W>(v[0], off);
    }
  }
  head = h;
  return v[0];
}

// A dense block's partial for its split: its R row groups' (acc, m, l) per q head of the group,
// merged under their common max, written as [acc (D) | M | L] (partials_floats' layout). Shared by
// the lane kernel and dense_mma_kernel; called after the barrier that publishes the row groups.
template <class T, int D, int G, int R, int NT>
DELTAKV_GPU_D void write_dense_partial(const DenseDecodeParams<T>& p, int b, int h, int split, const float (*s_acc)[G][D],
                                       const float (*s_m)[G], const float (*s_l)[G]) {
  float* part = p.part + ((std::int64_t(b) * p.n_q_heads + h * G) * p.n_splits + split) * (D + 2);
  const std::int64_t head_stride = std::int64_t(p.n_splits) * (D + 2);
  for (int i = threadIdx.x; i < G * D; i += NT) {
    const int g = i / D, d = i % D;
    float M = kNegInf;
    for (int r = 0; r < R; ++r) M = fmaxf(M, s_m[r][g]);
    float a = 0.f, L = 0.f;
    if (M != kNegInf)
      for (int r = 0; r < R; ++r) {
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
// dense_decode_kernel<T, D, G, W, NT>: grid (Hkv, n_splits, B), NT threads = NT/16 token groups.
// Each group streams U tokens at a time of its block's split (K and V slices of kv head h), keeps
// an online softmax per q head of the GQA group, and the groups merge in shared memory at the end.
// =============================================================================================
template <class T, int D, int G, int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS_MIN(NT, (G <= 4 ? 3 : 2)) dense_decode_kernel(DenseDecodeParams<T> p) {
  constexpr int E = D / 16, H = E / 2, NG = NT / 16, U = 8;
  __shared__ float s_acc[NG][G][D];
  __shared__ float s_m[NG][G], s_l[NG][G];
  // kv head fastest: the blocks of one token range run together and share whole rows.
  const int h = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
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
  float step_c[H], step_s[H];  // rotation by one position, per frequency of this lane
  if (rope) rope_cs<H>(p.rope, 1, lane * H, step_c, step_s);
  const T* base = p.kv + b * p.seq_stride;
  // The loop bound is the warp's (its first group's), so every lane of a warp runs the same
  // iterations and the group shuffles never diverge; tokens past t1 are masked.
  const int gw = grp % (W / 16);
  for (int tw = t0 + (grp - gw) * U; tw < t1; tw += NG * U) {
    const int t = tw + gw * U;
    RawHead<T, D> kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      // Rows past t1 re-read the split's first row (always valid) and are masked below.
      const T* row = base + std::int64_t(t + u < t1 ? t + u : t0) * ld;
      kr[u] = load_head_raw<T, D>(row + h * D, lane, half);
      vr[u] = load_head_raw<T, D>(row + (p.n_kv_heads + h) * D, lane, half);
    }
    float sc[U][G];
    // cos/sin at t from the tables, then stepped one position at a time (angle addition with the
    // one-position rotation): U consecutive tokens cost one table read.
    float rc[H], rs[H];
    // (a group whose tokens all lie past t1 reads the table at t1 - 1: its t may be max_pos)
    if (rope) rope_cs<H>(p.rope, t < t1 ? t : t1 - 1, lane * H, rc, rs);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float k[E];
      unpack_head<T, D>(kr[u], half, k);
      if (rope) {
        rotate<E>(k, rc, rs);
#pragma unroll
        for (int i = 0; i < H; ++i) {
          const float c = rc[i] * step_c[i] - rs[i] * step_s[i];
          rs[i] = rs[i] * step_c[i] + rc[i] * step_s[i];
          rc[i] = c;
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) d += q[g][e] * k[e];
        sc[u][g] = group16_sum<W>(d);
      }
    }
    if (p.logits && lane < G) {
#pragma unroll
      for (int g = 0; g < G; ++g)
        if (g == lane)
#pragma unroll
          for (int u = 0; u < U; ++u)
            if (t + u < t1)
              reinterpret_cast<vendor::f16*>(p.logits)[(std::int64_t(b) * Hq + h * G + g) * p.ld_logits + t + u] =
                  from_float<vendor::f16>(saturate_f16(sc[u][g]));
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (t + u < t1) mx = fmaxf(mx, sc[u][g]);
      // First tokens: m = -inf gives alpha = 0; a fully masked step (mx = -inf) changes nothing.
      const float alpha = mx == kNegInf ? 1.f : __expf(m[g] - mx);
      m[g] = mx;
      l[g] *= alpha;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][e] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) sc[u][g] = t + u < t1 ? __expf(sc[u][g] - mx) : 0.f;  // now p
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float v[E];
      unpack_head<T, D>(vr[u], half, v);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        l[g] += sc[u][g];
#pragma unroll
        for (int e = 0; e < E; ++e) acc[g][e] += sc[u][g] * v[e];
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
  write_dense_partial<T, D, G, NG, NT>(p, b, h, split, s_acc, s_m, s_l);
}

// =============================================================================================
// combine_kernel<T, W>: one block per (sequence, q head), threads over head_dim (rounded up to whole
// warps). The splits' maxima and sums are taken a split per thread and reduced across the block (every
// thread walking every split was a chain of load latencies: ~n_splits / 4 round trips twice over, at
// batch 1 with tens of splits); the output columns then walk the splits with 8 loads in flight.
// =============================================================================================
inline constexpr int kCombineMaxWarps = 32;  // gpu-check: allow(warps per block, not lanes)

template <int W, class Op>
DELTAKV_GPU_D float block_reduce(float v, float* red, Op op) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v = op(v, vendor::shfl_xor<W>(v, o));
  __syncthreads();  // red may still be read by an earlier reduction
  if (threadIdx.x % W == 0) red[threadIdx.x / W] = v;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < int(blockDim.x) / W; ++w) r = op(r, red[w]);
  return r;
}

template <class T, int W>
__global__ void combine_kernel(CombineParams<T> p) {
  __shared__ float red[kCombineMaxWarps];
  const int bh = blockIdx.x, D = p.head_dim, S = p.n_splits, tid = threadIdx.x, nt = blockDim.x;
  const float* part = p.part + std::int64_t(bh) * S * (D + 2);
  float m = kNegInf;
  for (int s = tid; s < S; s += nt) m = fmaxf(m, part[std::int64_t(s) * (D + 2) + D]);
  const float M = block_reduce<W>(m, red, [](float a, float c) { return fmaxf(a, c); });
  float l = 0.f;
  if (M != kNegInf)
    for (int s = tid; s < S; s += nt) {
      const float* ps = part + std::int64_t(s) * (D + 2);
      if (ps[D + 1] > 0.f) l += ps[D + 1] * expf(ps[D] - M);
    }
  const float L = block_reduce<W>(l, red, [](float a, float c) { return a + c; });
  const int b = bh / p.n_q_heads, h = bh % p.n_q_heads;
  for (int d = tid; d < D; d += nt) {
    float a = 0.f;
    if (L > 0.f) {
#pragma unroll 8
      for (int s = 0; s < S; ++s) {
        const float* ps = part + std::int64_t(s) * (D + 2);
        if (ps[D + 1] > 0.f) a += ps[d] * expf(ps[D] - M);
      }
    }
    p.out[b * p.ldo + h * D + d] = from_float<T>(L > 0.f ? a / L : 0.f);
  }
  if (p.lse && tid == 0) p.lse[bh] = L > 0.f ? M + logf(L) : kNegInf;
}

// =============================================================================================
// score_keys_kernel: grid (chunks, B); key = float bits of max_h exp(logit - lse_h) plus one for
// middle positions (probabilities are >= 0, so the bits order like the values), 0 elsewhere.
// =============================================================================================
// The middle positions of sequence b: [s_end, w_begin).
struct SelectBounds {
  int n, s_end, w_begin;
};
DELTAKV_GPU_D SelectBounds select_bounds(const SelectParams& p, int b) {
  SelectBounds r;
  r.n = p.n[b];
  r.s_end = min(p.sinks, r.n);
  r.w_begin = max(r.s_end, r.n - p.window);
  return r;
}

// The key of a middle position from the largest logit - lse over the heads: exp is increasing, so
// max_h exp(x_h) = exp(max_h x_h), one exp per position instead of one per head (the cluster
// path's scoring was bound by the exps: 32 per position at Llama's shape).
DELTAKV_GPU_D std::uint32_t select_key_of(float best_x) {
  return vendor::float_bits(fmaxf(0.f, expf(best_x))) + 1u;
}

// Logit i of the f16 logits (DenseDecodeParams::logits) as f32.
DELTAKV_GPU_D float logit_at(const SelectParams& p, std::int64_t i) {
  return to_float(reinterpret_cast<const vendor::f16*>(p.logits)[i]);
}

// The key of position t of sequence b (also used by select_keys_kernel).
DELTAKV_GPU_D std::uint32_t select_key(const SelectParams& p, const SelectBounds& sb, int b, int t) {
  if (t < sb.s_end || t >= sb.w_begin) return 0u;
  float best = kNegInf;
  for (int h = 0; h < p.n_q_heads; ++h) {
    const float lse = p.lse[b * p.n_q_heads + h];
    const float lg = logit_at(p, (std::int64_t(b) * p.n_q_heads + h) * p.ld_logits + t);
    best = fmaxf(best, lg - lse);
  }
  return select_key_of(best);
}

// A template (of the block size) so that the header can be included by several translation units.
template <int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) score_keys_kernel(SelectParams p) {
  const int b = blockIdx.y;
  const SelectBounds sb = select_bounds(p, b);
  for (int t = blockIdx.x * NT + threadIdx.x; t < sb.n; t += gridDim.x * NT) p.keys[b * p.ld_keys + t] = select_key(p, sb, b, t);
}

// The ordered write of a selection over keys [a, e) of sequence b, key t at keys_a[t - a] (global
// or shared memory; every thread of the block calls it): every key > thresh, and of the keys ==
// thresh those whose rank among them (eq_base + their rank in [a, e)) is below need_eq, in position
// order, from sel[sel_base]. eq_base / sel_base: keys
// == thresh / positions selected before a (0 for a whole sequence). Each warp walks one contiguous
// segment W keys at a time (coalesced loads; a thread walking its own segment waited on
// uncoalesced loads: 65% of select_kernel's time in ncu at 128K x 8), counting with ballots; one
// exchange of the warps' counts gives each warp its offsets. Scratch: 2 NT / W ints.
template <int W, int NT>
DELTAKV_GPU_D void write_selected(const SelectParams& p, int b, const std::uint32_t* keys_a, int a, int e, std::uint32_t thresh,
                                  int need_eq, int eq_base, int sel_base, int* scratch) {
  constexpr int NW = NT / W, U = 16;  // U: loads in flight per lane
  const int lane = threadIdx.x % W, warp = threadIdx.x / W;
  const std::uint32_t* keys = keys_a - a;  // indexed by position (only [a, e) is read)
  const int per = ((e - a + NW - 1) / NW + W - 1) / W * W;
  const int wa = min(e, a + warp * per), we = min(e, wa + per);
  const vendor::lane_mask_t<W> one = 1, below = (one << lane) - one;  // lanes before this one
  // The warp's next U * W keys from t0 (0 past the segment's end), U loads in flight per lane.
  auto load_keys = [&](int t0, std::uint32_t (&key)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = t0 + u * W + lane;
      key[u] = t < we ? keys[t] : 0u;
    }
  };
  // pass 1: the warp's keys above / equal to the threshold
  int gt = 0, eq = 0;
  for (int t0 = wa; t0 < we; t0 += U * W) {
    std::uint32_t key[U];
    load_keys(t0, key);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      gt += vendor::popcount(vendor::ballot<W>(key[u] > thresh));
      eq += vendor::popcount(vendor::ballot<W>(key[u] != 0u && key[u] == thresh));
    }
  }
  __syncthreads();  // scratch may still be read by an earlier use
  if (lane == 0) {
    scratch[warp] = gt;
    scratch[NW + warp] = eq;
  }
  __syncthreads();
  int g_run = 0, q_run = 0;  // keys above / equal before the warp's next W keys, from a
  for (int w = 0; w < warp; ++w) {
    g_run += scratch[w];
    q_run += scratch[NW + w];
  }
  const int cap = max(0, need_eq - eq_base);  // keys == thresh that [a, e) may take
  std::int32_t* out = p.sel + b * p.ld_sel + sel_base;
  // pass 2: a key's index = keys above before it + min(keys equal before it, cap)
  for (int t0 = wa; t0 < we; t0 += U * W) {
    std::uint32_t key[U];
    load_keys(t0, key);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool above = key[u] > thresh, equal = key[u] != 0u && key[u] == thresh;
      const auto bg = vendor::ballot<W>(above), bq = vendor::ballot<W>(equal);
      const int g = g_run + vendor::popcount(bg & below), q = q_run + vendor::popcount(bq & below);
      if (above) out[g + min(q, cap)] = t0 + u * W + lane;
      else if (equal && q < cap) out[g + q] = t0 + u * W + lane;
      g_run += vendor::popcount(bg);
      q_run += vendor::popcount(bq);
    }
  }
}

// One radix pass's digit, from its 256 bins: the highest bin whose count, summed from the top,
// reaches `remaining` (bin 0 if none does), and in *above the count of the bins above it. Called by
// every lane of one warp; every lane gets the result. Lane l holds bins 255 - l PER .. (the
// highest first), a prefix sum over the lanes finds the lane, that lane walks its bins.
template <int W, class Bin>
DELTAKV_GPU_D int radix_digit(const Bin* hist, int remaining, int* above) {
  constexpr int PER = (256 + W - 1) / W;  // bins per lane
  const int lane = threadIdx.x % W;
  int cnt[PER], mine = 0;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int bin = 255 - (lane * PER + j);
    cnt[j] = bin >= 0 ? int(hist[bin]) : 0;
    mine += cnt[j];
  }
  int incl = mine;  // inclusive prefix over the lanes (higher bins first)
  for (int o = 1; o < W; o <<= 1) {
    const int v = vendor::shfl_up<W>(incl, unsigned(o));
    if (lane >= o) incl += v;
  }
  const auto hit = vendor::ballot<W>(incl >= remaining);
  const int src = hit ? vendor::first_lane(hit) : W - 1;  // (the bins always hold >= remaining)
  int ab = incl - mine, dg = 0;
  for (int j = 0; j < PER; ++j) {  // every lane walks its bins; the source lane's result is taken
    const int bin = 255 - (lane * PER + j);
    if (bin < 0) break;
    dg = bin;
    if (bin == 0 || ab + cnt[j] >= remaining) break;
    ab += cnt[j];
  }
  *above = vendor::shfl<W>(ab, src);
  return vendor::shfl<W>(dg, src);
}

// =============================================================================================
// select_kernel<W, NT>: one block per sequence. Radix select (four 8-bit digits, most significant
// first) finds the k-th largest key T and how many keys equal to T to take; one ordered pass
// writes every key > T and the first of those == T, in position order.
// =============================================================================================
template <int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) select_kernel(SelectParams p) {
  __shared__ int hist[256];
  __shared__ int scratch[2 * NT / W];
  __shared__ std::uint32_t s_prefix;
  __shared__ int s_remaining;
  const int b = blockIdx.x;
  const std::uint32_t* keys = p.keys + b * p.ld_keys;
  const bool vec = reinterpret_cast<std::uintptr_t>(keys) % 16 == 0;  // the same for every thread
  // how many candidates (middle positions)
  const SelectBounds sb = select_bounds(p, b);
  const int n = sb.n, cand = sb.w_begin - sb.s_end;
  const int kk = min(p.k, cand);
  std::uint32_t thresh = 1u;  // take every candidate when there are no more than k
  int need_eq = 0x7fffffff;
  if (kk > 0 && kk < cand) {
    std::uint32_t prefix = 0, mask = 0;
    int remaining = kk;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += NT) hist[i] = 0;
      __syncthreads();
      // One block walks the whole sequence: keep 8 loads in flight per thread (latency, not
      // bandwidth, bounds a single block), of four keys each where the row is 16-byte aligned.
      auto count = [&](std::uint32_t key) {
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
      };
      int t = threadIdx.x;
      if (vec) {
        const uint4* keys4 = reinterpret_cast<const uint4*>(keys);
#pragma unroll 8
        for (int t4 = threadIdx.x; t4 < n / 4; t4 += NT) {
          const uint4 k4 = keys4[t4];
          count(k4.x);
          count(k4.y);
          count(k4.z);
          count(k4.w);
        }
        t = n / 4 * 4 + threadIdx.x;  // the last n % 4 keys
      }
#pragma unroll 8
      for (; t < n; t += NT) count(keys[t]);
      __syncthreads();
      if (threadIdx.x < W) {
        int above;
        const int d = radix_digit<W>(hist, remaining, &above);
        if (threadIdx.x == 0) {
          s_prefix = prefix | (std::uint32_t(d) << shift);
          s_remaining = remaining - above;
        }
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
  if (kk > 0) write_selected<W, NT>(p, b, keys, 0, n, thresh, need_eq, 0, 0, scratch);
  if (threadIdx.x == 0) p.sel_count[b] = kk > 0 ? kk : 0;
}

// =============================================================================================
// The same selection over (chunks, B) blocks (SelectParams::work, see select_work_words): one block
// per sequence walked 131072 keys five times at 128K x 8 (0.2 ms, latency-bound on 8 SMs).
//   select_keys_kernel      keys of a chunk (as score_keys_kernel) + the histogram of their top digit
//   select_pick_kernel      one block per sequence: the digit of the k-th largest key (as in
//                           select_kernel), or "take every candidate" / "none"
//   select_hist_kernel      histogram of the next digit over the keys that match the prefix
//   select_count_kernel     per chunk: keys above the threshold, keys equal to it
//   select_write_kernel     per chunk: its offset from the earlier chunks' counts, then the ordered
//                           write of select_kernel within the chunk
// Work layout (32-bit words): hist [B][4][256] (zeroed by select_topk), state [B][4] = prefix,
// remaining, kk, mode (0 radix, 1 every candidate, 2 none), counts [B][chunks][2].
// =============================================================================================
inline constexpr int kSelectChunk = 4096;  // positions per block

struct SelectWork {
  std::uint32_t* hist;
  std::int32_t* state;
  std::int32_t* counts;
  int chunks;
};
DELTAKV_GPU_HD SelectWork select_work(std::uint32_t* w, int batch, int chunks) {
  SelectWork r;
  r.hist = w;
  r.state = reinterpret_cast<std::int32_t*>(w + std::size_t(batch) * 4 * 256);
  r.counts = r.state + std::size_t(batch) * 4;
  r.chunks = chunks;
  return r;
}

// Adds a block's shared histogram into the global one (non-zero bins only).
template <int NT>
DELTAKV_GPU_D void flush_hist(const int* s_hist, std::uint32_t* g_hist) {
  for (int i = threadIdx.x; i < 256; i += NT)
    if (s_hist[i]) atomicAdd(g_hist + i, std::uint32_t(s_hist[i]));
}

template <int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) select_keys_kernel(SelectParams p, SelectWork w) {
  __shared__ int hist[256];
  const int b = blockIdx.y, c = blockIdx.x;
  const SelectBounds sb = select_bounds(p, b);
  for (int i = threadIdx.x; i < 256; i += NT) hist[i] = 0;
  __syncthreads();
  const int t1 = min(sb.n, (c + 1) * kSelectChunk);
  for (int t = c * kSelectChunk + threadIdx.x; t < t1; t += NT) {
    const std::uint32_t key = select_key(p, sb, b, t);
    p.keys[b * p.ld_keys + t] = key;
    atomicAdd(&hist[key >> 24], 1);
  }
  __syncthreads();
  flush_hist<NT>(hist, w.hist + std::size_t(b) * 4 * 256);
}

// pass d (0..3): the digit at bits 24 - 8d of the kk-th largest key, from hist [b][d]. Launched with
// NT threads: the bins go to shared memory first (thread 0 alone reading 256 bins from global memory
// waited on each load in turn: measured 0.27 ms for the whole selection at 128K x 8 against 0.25 for
// the one-block path, and 0.26 against 0.08 at 32K x 1); one warp then picks the digit (radix_digit).
template <int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) select_pick_kernel(SelectParams p, SelectWork w, int d) {
  __shared__ std::uint32_t hist[256];
  const int b = blockIdx.x;
  const std::uint32_t* g_hist = w.hist + (std::size_t(b) * 4 + d) * 256;
  for (int i = threadIdx.x; i < 256; i += NT) hist[i] = g_hist[i];
  __syncthreads();
  constexpr int W = vendor::kWarpSize;
  if (threadIdx.x >= W) return;  // one warp picks the digit
  std::int32_t* st = w.state + b * 4;
  if (d == 0 && threadIdx.x == 0) {
    const SelectBounds sb = select_bounds(p, b);
    const int cand = sb.w_begin - sb.s_end, kk = min(p.k, cand);
    st[0] = 0;
    st[1] = kk;
    st[2] = kk;
    st[3] = kk <= 0 ? 2 : (kk >= cand ? 1 : 0);
  }
  vendor::warp_sync();  // lane 0's state is visible to the warp
  if (st[3] != 0) return;
  const int shift = 24 - 8 * d, remaining = st[1];
  int above;
  const int dg = radix_digit<W>(hist, remaining, &above);
  if (threadIdx.x == 0) {
    st[0] = int(std::uint32_t(st[0]) | (std::uint32_t(dg) << shift));
    st[1] = remaining - above;
  }
}

// pass d (1..3): histogram of the digit at bits 24 - 8d over the keys whose higher digits match.
template <int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) select_hist_kernel(SelectParams p, SelectWork w, int d) {
  __shared__ int hist[256];
  const int b = blockIdx.y, c = blockIdx.x;
  if (w.state[b * 4 + 3] != 0) return;
  const SelectBounds sb = select_bounds(p, b);
  const int shift = 24 - 8 * d;
  const std::uint32_t prefix = std::uint32_t(w.state[b * 4]), mask = ~0u << (shift + 8);  // gpu-check: allow(radix digits, not lanes)
  for (int i = threadIdx.x; i < 256; i += NT) hist[i] = 0;
  __syncthreads();
  const std::uint32_t* keys = p.keys + b * p.ld_keys;
  const int t1 = min(sb.n, (c + 1) * kSelectChunk);
#pragma unroll 4
  for (int t = c * kSelectChunk + threadIdx.x; t < t1; t += NT) {
    const std::uint32_t key = keys[t];
    if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
  }
  __syncthreads();
  flush_hist<NT>(hist, w.hist + (std::size_t(b) * 4 + d) * 256);
}

// The threshold and how many keys equal to it to take (mode 1: every candidate, as select_kernel).
DELTAKV_GPU_D void select_threshold(const SelectWork& w, int b, std::uint32_t* thresh, int* need_eq) {
  const std::int32_t* st = w.state + b * 4;
  *thresh = st[3] == 0 ? std::uint32_t(st[0]) : 1u;
  *need_eq = st[3] == 0 ? st[1] : 0x7fffffff;
}

template <int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) select_count_kernel(SelectParams p, SelectWork w) {
  __shared__ int s_gt, s_eq;
  const int b = blockIdx.y, c = blockIdx.x;
  if (threadIdx.x == 0) s_gt = s_eq = 0;
  __syncthreads();
  std::uint32_t thresh;
  int need_eq;
  select_threshold(w, b, &thresh, &need_eq);
  const int n = p.n[b], t1 = min(n, (c + 1) * kSelectChunk);
  const std::uint32_t* keys = p.keys + b * p.ld_keys;
  int gt = 0, eq = 0;
#pragma unroll 4
  for (int t = c * kSelectChunk + threadIdx.x; t < t1; t += NT) {
    const std::uint32_t key = keys[t];
    gt += key > thresh;
    eq += key != 0u && key == thresh;
  }
  if (gt) atomicAdd(&s_gt, gt);
  if (eq) atomicAdd(&s_eq, eq);
  __syncthreads();
  if (threadIdx.x == 0) {
    w.counts[(std::size_t(b) * w.chunks + c) * 2] = s_gt;
    w.counts[(std::size_t(b) * w.chunks + c) * 2 + 1] = s_eq;
  }
}

template <int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) select_write_kernel(SelectParams p, SelectWork w) {
  __shared__ int scratch[2 * NT / W];
  __shared__ int s_before[2];
  const int b = blockIdx.y, c = blockIdx.x;
  const int mode = w.state[b * 4 + 3], kk = w.state[b * 4 + 2];
  if (c == 0 && threadIdx.x == 0) p.sel_count[b] = kk > 0 ? kk : 0;
  if (mode == 2) return;
  std::uint32_t thresh;
  int need_eq;
  select_threshold(w, b, &thresh, &need_eq);
  if (threadIdx.x == 0) {  // keys above the threshold, and equal to it, in the earlier chunks
    int gt = 0, eq = 0;
    for (int j = 0; j < c; ++j) {
      gt += w.counts[(std::size_t(b) * w.chunks + j) * 2];
      eq += w.counts[(std::size_t(b) * w.chunks + j) * 2 + 1];
    }
    s_before[0] = gt;
    s_before[1] = eq;
  }
  __syncthreads();
  const int n = p.n[b], c0 = c * kSelectChunk, c1 = min(n, c0 + kSelectChunk);
  write_selected<W, NT>(p, b, p.keys + b * p.ld_keys + c0, c0, c1, thresh, need_eq, s_before[1],
                        s_before[0] + min(s_before[1], need_eq), scratch);
}

// =============================================================================================
// select_cluster_kernel<W, NT>: grid (C, B) in clusters of C blocks along x (vendor::
// launch_cluster), one cluster per sequence, one launch for the whole selection. Block r scores
// positions [r per, r per + per) straight into shared memory (keys as select_key; the logits are
// the only global reads), then the four radix passes of select_kernel run on the cluster's
// histograms: each block counts its keys into its own bins, and after one cluster barrier every
// block sums all C blocks' bins (distributed shared memory) and picks the same digit. The bins are
// double-buffered, so one barrier per pass suffices: the buffer a pass zeroes was last read by the
// peers before they arrived at that pass's barrier. Last, each block takes the keys above / equal to
// the threshold in the blocks before it and writes its own in order (write_selected).
// Why: the one-block path walks a sequence's 131072 keys five times on 8 SMs at 128K x 8 (latency-
// bound), the multi-block path pays ten launches; here the keys never leave shared memory.
// Dynamic shared memory: per keys (per a multiple of 4; select_topk sizes it from the longest
// sequence).
// =============================================================================================
inline constexpr int kSelectClusterThreads = 1024;
inline constexpr int kSelectMaxHeads = 256;  // lse values staged in shared memory

template <int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS(NT) select_cluster_kernel(SelectParams p, int per) {
  static_assert(NT % 256 == 0, "a whole number of threads per histogram bin");
  DELTAKV_DYNAMIC_SMEM(std::uint32_t, s_keys);  // [per]: key of position a + i
  __shared__ int hist[2][256];
  __shared__ int total[256];
  __shared__ float s_lse[kSelectMaxHeads];
  __shared__ int scratch[2 * NT / W];
  __shared__ int s_counts[2];  // this block's keys above / equal to the threshold (read by the later blocks)
  __shared__ std::uint32_t s_prefix;
  __shared__ int s_remaining;
  const int r = blockIdx.x, C = gridDim.x, b = blockIdx.y;
  const int lane = threadIdx.x % W, warp = threadIdx.x / W;
  const SelectBounds sb = select_bounds(p, b);
  const int a = min(sb.n, r * per), e = min(sb.n, a + per);
  const int cand = sb.w_begin - sb.s_end, kk = min(p.k, cand);  // the same in every block of the cluster
  const int Hq = p.n_q_heads;
  if (kk <= 0) {  // nothing to select: no block touches another's memory
    if (r == 0 && threadIdx.x == 0) p.sel_count[b] = 0;
    return;
  }
  for (int i = threadIdx.x; i < Hq; i += NT) s_lse[i] = p.lse[b * Hq + i];
  for (int i = threadIdx.x; i < 2 * 256; i += NT) hist[i / 256][i % 256] = 0;
  __syncthreads();
  // 1. keys: four positions per thread step, 8-byte loads of four f16 logits where rows allow
  const std::int64_t row0 = std::int64_t(b) * Hq * p.ld_logits;
  const bool vec = reinterpret_cast<std::uintptr_t>(p.logits) % 8 == 0 && p.ld_logits % 4 == 0 && a % 4 == 0;
  for (int t = a + 4 * threadIdx.x; t < e; t += 4 * NT) {
    float best[4] = {kNegInf, kNegInf, kNegInf, kNegInf};  // largest logit - lse (see select_key)
    if (vec && t + 4 <= e) {
#pragma unroll 8
      for (int h = 0; h < Hq; ++h) {
        const uint2 raw = *reinterpret_cast<const uint2*>(p.logits + row0 + std::int64_t(h) * p.ld_logits + t);  // 4 f16
        const vendor::f16* v = reinterpret_cast<const vendor::f16*>(&raw);
        const float l = s_lse[h];
#pragma unroll
        for (int j = 0; j < 4; ++j) best[j] = fmaxf(best[j], to_float(v[j]) - l);
      }
    } else {
      for (int h = 0; h < Hq; ++h)
        for (int j = 0; j < 4 && t + j < e; ++j) best[j] = fmaxf(best[j], logit_at(p, row0 + std::int64_t(h) * p.ld_logits + t + j) - s_lse[h]);
    }
    for (int j = 0; j < 4 && t + j < e; ++j) {
      const bool middle = t + j >= sb.s_end && t + j < sb.w_begin;
      s_keys[t + j - a] = middle ? select_key_of(best[j]) : 0u;
    }
  }
  __syncthreads();
  // 2. radix passes over the cluster (skipped when every candidate is taken)
  std::uint32_t thresh = 1u;
  int need_eq = 0x7fffffff;
  if (kk < cand) {
    std::uint32_t prefix = 0, mask = 0;
    int remaining = kk;
    for (int d = 0; d < 4; ++d) {
      const int shift = 24 - 8 * d;
      int* h = hist[d & 1];
      for (int i0 = 0; i0 < e - a; i0 += NT) {  // block-uniform trip count: match_any needs whole warps
        const int i = i0 + int(threadIdx.x);
        const std::uint32_t key = i < e - a ? s_keys[i] : 0u;
        const bool in = i < e - a && (key & mask) == prefix;
        const unsigned bin = in ? (key >> shift) & 255u : 256u;
        const auto same = vendor::match_any<W>(bin);  // lanes of this bin: one atomic per bin per warp
        if (in && vendor::first_lane(same) == lane) atomicAdd(&h[bin], vendor::popcount(same));
      }
      vendor::cluster_sync();  // every block's bins of pass d are complete
      // the cluster's bins: NT / 256 threads per bin, each summing every (NT / 256)-th block's count
      // (a few remote loads per thread instead of C in a row)
      for (int i = threadIdx.x; i < 256; i += NT) {
        total[i] = 0;
        hist[(d + 1) & 1][i] = 0;  // the next pass's bins (the peers read them last in pass d - 1)
      }
      __syncthreads();
      {
        constexpr int PB = NT >= 256 ? NT / 256 : 1;  // threads per bin
        const int bin = int(threadIdx.x) % 256, q0 = int(threadIdx.x) / 256;
        if (q0 < PB) {
          int sum = 0;
          for (int q = q0; q < C; q += PB) sum += vendor::cluster_load(&h[bin], unsigned(q));
          if (sum) atomicAdd(&total[bin], sum);
        }
      }
      __syncthreads();
      if (warp == 0) {  // the digit of this pass (the same in every block: the same bins)
        int above;
        const int dg = radix_digit<W>(total, remaining, &above);
        if (lane == 0) {
          s_prefix = prefix | (std::uint32_t(dg) << shift);
          s_remaining = remaining - above;
        }
      }
      __syncthreads();
      prefix = s_prefix;
      remaining = s_remaining;
      mask |= 255u << shift;
    }
    thresh = prefix;
    need_eq = remaining;
  }
  // 3. this block's keys above / equal to the threshold, then the earlier blocks' (before the write)
  {
    int gt = 0, eq = 0;
    for (int i = threadIdx.x; i < e - a; i += NT) {
      const std::uint32_t key = s_keys[i];
      gt += key > thresh;
      eq += key != 0u && key == thresh;
    }
    for (int o = W / 2; o > 0; o >>= 1) {
      gt += vendor::shfl_xor<W>(gt, o);
      eq += vendor::shfl_xor<W>(eq, o);
    }
    if (threadIdx.x == 0) s_counts[0] = s_counts[1] = 0;
    __syncthreads();
    if (lane == 0) {
      atomicAdd(&s_counts[0], gt);
      atomicAdd(&s_counts[1], eq);
    }
  }
  vendor::cluster_sync();  // every block's counts are final
  __shared__ int s_before[2];
  if (warp == 0) {
    int gt = 0, eq = 0;
    for (int q = lane; q < r; q += W) {
      gt += vendor::cluster_load(&s_counts[0], unsigned(q));
      eq += vendor::cluster_load(&s_counts[1], unsigned(q));
    }
    for (int o = W / 2; o > 0; o >>= 1) {
      gt += vendor::shfl_xor<W>(gt, o);
      eq += vendor::shfl_xor<W>(eq, o);
    }
    if (lane == 0) {
      s_before[0] = gt;
      s_before[1] = eq;
    }
  }
  vendor::cluster_sync();  // no block reads another's shared memory after this: each may finish
  if (r == 0 && threadIdx.x == 0) p.sel_count[b] = kk;
  if (a < e) write_selected<W, NT>(p, b, s_keys, a, e, thresh, need_eq, s_before[1], s_before[0] + min(s_before[1], need_eq), scratch);
}

// =============================================================================================
// sparse_decode_kernel<T, D, G, W, NT>: grid (n_splits, Hkv, B). The block keeps W_k,h (f_d's K
// rows of kv head h) in shared memory and walks its share of the attended list:
//   per chunk of NT items: resolve positions to storage rows, one item per thread (sink / ring /
//     reference: one exact row; latent: its code row and its k references)
//   per tile of 32 items:
//     1. dequantize the latents into shared memory (zeros for exact items)
//     2. K_tile = Z W_k,h^T on tensor cores; with 512 threads the warps without a product unit
//        build V_tile = mean of the references' V (the exact V) meanwhile
//     3. K += mean of the references' K (the exact row for exact items) + bias; RoPE; the logits
//        q.K from registers (a 16-lane sum per q head). With 256 threads V_tile is built in this
//        pass too, its loads in flight with the K loads
//     4. online softmax per q head (a warp per head)
//     5. acc_z += p Z; acc_v += p V_tile; mass += p over latent items
//   and at the end writes acc_v + W_v,h acc_z + mass * b_v as its split's partial.
// WL2 (SparseDecodeParams::weights_from_l2): W_k,h's fragments come from global memory (L2) instead,
// so a block needs ~90 KB less shared memory and two fit per SM (at 128 registers; ptxas reports
// ~0.3 KB of spills for d 128 / GQA 4). Measured slower than the default on the H100 (0.65 vs 0.47 ms
// per layer at Llama 128K x 8); kept opt-in for devices whose shared memory fits only this one.
// Dynamic shared memory: sparse_smem_bytes().
// =============================================================================================
inline constexpr int kSparseTile = 32;  // gpu-check: allow(tokens per tile, not lanes)
inline constexpr int kSparseMaxTilePieces = 2048;   // 16-byte pieces of latent rows per tile (8 KiB)
inline constexpr int kSparseChunk = 256;             // items resolved per chunk (one per thread)
// Threads per block of the fused sparse kernel: twice the warps for head_dim 128 (one block per SM
// either way: W_k,h takes most of the shared memory), so that more loads and products are in
// flight; head_dim 64 has too few V tasks per tile for 512. `requested` (SparseDecodeParams::
// block_threads) overrides where valid; 0 = the default. HIP builds 256 only: AMD's 64 KB of LDS
// per block fits no fused sparse block, so the kernel is compiled there but never launched.
inline bool sparse_block_threads_valid(int head_dim, int threads) {
  return threads == 256 || (threads == 512 && head_dim == 128 && vendor::kTensorTiles);
}
inline int sparse_block_threads(int head_dim, int requested = 0) {
  if (requested != 0 && sparse_block_threads_valid(head_dim, requested)) return requested;
  return head_dim == 128 && vendor::kTensorTiles ? 512 : 256;
}

// weights_in_smem = false: the variant that reads W_k,h's tensor-core fragments from global
// memory (L2-resident: 1 MiB for all heads) instead of holding them, so that two blocks fit per SM.
inline std::size_t sparse_smem_bytes(int head_dim, int group, int latent_dim, int k, bool weights_in_smem = true) {
  const std::size_t ldz = std::size_t(latent_dim) + 8;  // 16-bit elements
  const std::size_t NT = kSparseChunk;  // the per-chunk arrays (the same for every block size)
  std::size_t b = 0;
  if (weights_in_smem) b += std::size_t(head_dim) * ldz * 2;  // W_k,h
  b += std::size_t(kSparseTile) * ldz * 2;               // Z tile
  b += 2 * std::size_t(kSparseTile) * (head_dim + 4) * 4;  // K and V tiles (f32)
  b += std::size_t(group) * latent_dim * 4;              // acc_z
  b += std::size_t(group) * head_dim * 4;                // acc_v
  b += std::size_t(group) * (head_dim + 4) * 4;          // q (scaled)
  b += std::size_t(group) * kSparseTile * 4;             // probabilities
  b += NT * (std::size_t(k) + 3) * 4;                    // chunk: row codes, pos, latent row, nref
  b += NT * 2 * 4;                                       // chunk: scale, min
  b += std::size_t(group) * 4 * 4;                       // m, l, alpha, mass
  b += std::size_t(kSparseTile) * (head_dim + 8) * 2;    // value tile as T, built during the K product
  b += std::size_t(head_dim) * 4;                        // K bias (f32)
  return b + 64;
}

// Where attended item i of a sequence lives (shared by the fused and the two-pass sparse kernels):
// pos -1 = not attended (a selected position outside the middle); rows[j] = row * 4 + region
// (0 sinks, 1 ring, 2 references), nref of them; lrow = latent row or -1; sc, mn its scale, min.
struct ItemLoc {
  int pos = -1, lrow = -1, nref = 0;
  std::int32_t rows[4] = {0, 0, 0, 0};
  float sc = 0.f, mn = 0.f;
};

// Partial slots per (sequence, q head) a sparse pass writes: its splits, plus the exact blocks' parts
// (host and device: the kernels index the partials with it).
template <class T>
DELTAKV_GPU_HD int sparse_partial_slots(const SparseDecodeParams<T>& p) {
  return p.n_splits + (p.exact_blocks > 0 ? p.exact_parts : 0);
}

// The list the split blocks walk: sink positions [s_first, s_end), the selection, window positions
// [w_begin, w_end): total items. Without exact blocks s_first = 0 and w_end = n. With them
// (SparseDecodeParams::exact_blocks) the exact blocks take the sinks held in the sinks store
// ([0, s_first)) and the window from the compressed frontier on ([w_end, n): ring rows, or sinks-store
// rows in a sequence shorter than the stored sinks); the policy's other sinks and window positions
// (compressed rows, or exact rows of short sequences) stay in the list, which resolve_item serves.
template <class T>
struct SeqView {  // one sequence of the layer, and its attended list's bounds
  const T* sinks; const T* ring; const T* refs;
  const std::uint8_t* lat; const float* scl; const std::int32_t* ids;
  int n, cfront, s_first, s_end, n_sel, w_begin, w_end, total;
};

template <class T>
DELTAKV_GPU_D SeqView<T> seq_view(const SparseDecodeParams<T>& p, int b) {
  const auto& L = p.layer;
  const std::byte* seq = L.base + std::size_t(b) * L.seq_bytes;
  SeqView<T> v;
  v.sinks = reinterpret_cast<const T*>(seq + L.off_sinks);
  v.ring = reinterpret_cast<const T*>(seq + L.off_ring);
  v.refs = reinterpret_cast<const T*>(seq + L.off_refs);
  v.lat = reinterpret_cast<const std::uint8_t*>(seq + L.off_lat);
  v.scl = reinterpret_cast<const float*>(seq + L.off_scale);
  v.ids = reinterpret_cast<const std::int32_t*>(seq + L.off_ids);
  v.n = p.n[b];
  v.cfront = p.c[b];
  v.s_end = min(p.sinks, v.n);
  v.w_begin = max(v.s_end, v.n - p.window);
  v.n_sel = p.sel_count ? p.sel_count[b] : 0;
  const bool exact = p.exact_blocks > 0;
  v.s_first = exact ? min(v.s_end, p.layer.sinks) : 0;
  v.w_end = exact ? max(v.w_begin, min(v.n, v.cfront)) : v.n;
  v.total = (v.s_end - v.s_first) + v.n_sel + (v.w_end - v.w_begin);
  return v;
}

template <class T>
DELTAKV_GPU_D ItemLoc resolve_item(const SparseDecodeParams<T>& p, const SeqView<T>& v, int b, int i) {
  const auto& L = p.layer;
  ItemLoc r;
  if (i < 0 || i >= v.total) return r;
  int pos;
  const int ns = v.s_end - v.s_first;
  if (i < ns) {
    pos = v.s_first + i;
  } else if (i < ns + v.n_sel) {
    pos = p.sel[b * p.ld_sel + (i - ns)];
    if (pos < v.s_end || pos >= v.w_begin) return r;  // not a middle position: ignored
  } else {
    pos = v.w_begin + (i - ns - v.n_sel);
  }
  r.pos = pos;
  if (pos < L.sinks) {
    r.rows[0] = pos * 4 + 0;
    r.nref = 1;
  } else if (pos >= v.cfront) {
    r.rows[0] = ((pos - L.sinks) % L.ring) * 4 + 1;
    r.nref = 1;
  } else {
    const std::int32_t code = L.pos_code[pos];
    const int row = code >> 2;
    if ((code & 3) == 1) {
      r.rows[0] = row * 4 + 2;
      r.nref = 1;
    } else {
      r.lrow = row;
      // Every load first (ids, scale, min), then the valid ids compacted by selects: a loop that
      // tested each id before loading the next was a chain of k dependent latencies, and its
      // run-time index into rows put them in local memory.
      std::int32_t id[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) id[j] = j < L.k ? v.ids[std::int64_t(row) * L.k + j] : -1;
      if (L.latent_bits > 0) {
        r.sc = v.scl[2 * std::int64_t(row)];
        r.mn = v.scl[2 * std::int64_t(row) + 1];
      }
      int n = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int o = 0; o <= j; ++o)
          if (id[j] >= 0 && n == o) r.rows[o] = id[j] * 4 + 2;
        n += id[j] >= 0 ? 1 : 0;
      }
      r.nref = n;
    }
  }
  return r;
}

template <class T>
DELTAKV_GPU_D const T* item_row(const SeqView<T>& v, std::int32_t code, int kvd) {
  const int r = code & 3;
  return (r == 0 ? v.sinks : (r == 1 ? v.ring : v.refs)) + std::int64_t(code >> 2) * kvd;
}

// One 16-lane group's E dims of a rebuilt key, RoPE applied: the K product (prod, plus prod2 when
// the product was computed in two halves, Halves; rows indexed by head dim) + the mean of the item's nref
// reference slices (the exact row for exact items, nref 1) + the bias for latents; refs[j] for
// j >= nref are ignored (they were loaded from a dummy row so that every load is unconditional).
// bias: the K bias of the head as T (global memory), or as f32 (B = float: a copy in shared memory,
// read as two vector loads instead of E scalar global loads in the rebuild's critical path).
template <class T, int D, bool Halves, class B = T>
DELTAKV_GPU_D void finish_key(const RawHead<T, D> (&refs)[4], int nref, bool latent, int pos, int lane, bool half, bool rope,
                              const float* prod, const float* prod2, const B* bias, const RopeTableView& rt, float* x) {
  constexpr int E = D / 16, H = E / 2;
  const float inv = nref > 0 ? 1.f / float(nref) : 0.f;
  float sum[E];
#pragma unroll
  for (int e = 0; e < E; ++e) sum[e] = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    unpack_head<T, D>(refs[j], half, x);
    const float w = j < nref ? 1.f : 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) sum[e] += w * x[e];
  }
  float pr[E], pr2[E], bv[E];
  load_head_f32<D>(prod, lane, half, pr);
  if constexpr (Halves) load_head_f32<D>(prod2, lane, half, pr2);
  const bool add_bias = latent && bias;
  if constexpr (std::is_same_v<B, float>) {
    if (add_bias) load_head_f32<D>(bias, lane, half, bv);
  }
#pragma unroll
  for (int e = 0; e < E; ++e) {
    float v = Halves ? pr[e] + pr2[e] + sum[e] * inv : pr[e] + sum[e] * inv;
    if constexpr (std::is_same_v<B, float>) {
      if (add_bias) v += bv[e];
    } else {
      if (add_bias) v += to_float(bias[head_dim_of<D>(lane, half, e)]);
    }
    x[e] = v;
  }
  if (rope && pos >= 0) {
    float c[H], s[H];
    if (rt.freq)
      rope_sincos<H>(rt.freq, pos, lane * H, c, s);
    else
      rope_cs<H>(rt, pos, lane * H, c, s);
    rotate<E>(x, c, s);
  }
}

// 16 bytes of one latent row's storage into 16-bit values at dst (8 raw values, or 16 int8 / 32 int4
// codes as c * scale + min in two roundings, like the CPU's dequantize); dst 16-byte aligned.
template <class T>
DELTAKV_GPU_D void dequant16(const uint4& raw, int bits, float sc, float mn, T* dst) {
  if (bits == 0) {
    *reinterpret_cast<uint4*>(dst) = raw;
    return;
  }
  const unsigned w4[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int part = 0; part < 4; ++part) {  // 8 values (int4) or 4 values (int8) per word
    if (bits == 4) {
      T zt[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) zt[e] = from_float<T>(vendor::add_rn(vendor::mul_rn(float((w4[part] >> (4 * e)) & 0xFu), sc), mn));
      *reinterpret_cast<uint4*>(dst + part * 8) = *reinterpret_cast<const uint4*>(zt);
    } else {
      T zt[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) zt[e] = from_float<T>(vendor::add_rn(vendor::mul_rn(float((w4[part] >> (8 * e)) & 0xFFu), sc), mn));
      *reinterpret_cast<uint2*>(dst + part * 4) = *reinterpret_cast<const uint2*>(zt);
    }
  }
}

// A sparse block's partial for its split, per head g of the group: acc_v + W_v,h acc_z + mass * b_v,
// then m and l. stat: [G][4] = m, l, (the kernel's own), mass. A warp takes RW rows of W_v,h at a
// time, its lanes 16-byte pieces of them (8 latent columns), all of a row group's loads issued
// before any product: with one 2-byte load per lane and four rows per warp step this phase was a
// chain of L2 latencies, 34% of the block's time at batch 1 (5.5% at batch 8). Shared by the fused
// and the two-pass kernels.
template <class T, int D, int G, int W, int NT>
DELTAKV_GPU_D void write_sparse_partial(const SparseDecodeParams<T>& p, int b, int h, int split, const float* s_accz,
                                        const float* s_accv, const float* s_stat) {
  // RW rows per warp step (at most 8, and RW * G sums in registers <= 32: more spilled at 128
  // registers); one 16-byte piece per lane per step (two spilled too)
  constexpr int NW = NT / W, RW0 = G <= 4 ? 8 : (G <= 8 ? 4 : 2), RW = D / NW < RW0 ? D / NW : RW0;
  static_assert(RW >= 1 && D % (RW * NW) == 0, "whole row groups per warp step");
  const auto& L = p.layer;
  const int DC = L.latent_dim, P8 = DC / 8, Hkv = p.n_kv_heads, warp = threadIdx.x / W, lane_w = threadIdx.x % W;
  const int slots = sparse_partial_slots(p);
  float* part = p.part + ((std::int64_t(b) * p.n_q_heads + h * G) * slots + split) * (D + 2);
  const std::int64_t head_stride = std::int64_t(slots) * (D + 2);
  for (int d0 = warp * RW; d0 < D; d0 += NW * RW) {
    const T* wrow = L.w_dec + std::int64_t(Hkv * D + h * D + d0) * DC;  // W_v,h row d0 (rows DC apart)
    float dot[RW][G];
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
      for (int g = 0; g < G; ++g) dot[r][g] = 0.f;
    for (int c0 = lane_w; c0 < P8; c0 += W) {  // piece c0: latent columns 8 c0 .. 8 c0 + 7
      uint4 w[RW];
#pragma unroll
      for (int r = 0; r < RW; ++r) w[r] = *reinterpret_cast<const uint4*>(wrow + std::int64_t(r) * DC + c0 * 8);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float a[8];
        ld_f32<8>(s_accz + g * DC + c0 * 8, a);
#pragma unroll
        for (int r = 0; r < RW; ++r) {
          const T* wv = reinterpret_cast<const T*>(&w[r]);
#pragma unroll
          for (int e = 0; e < 8; ++e) dot[r][g] += to_float(wv[e]) * a[e];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float v = dot[r][g];
#pragma unroll
        for (int o = W / 2; o > 0; o >>= 1) v += vendor::shfl_xor<W>(v, o);
        if (lane_w == 0) {
          const int d = d0 + r;
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

// The exact blocks' work (SparseDecodeParams::exact_blocks; block e of them): the items of every
// (sequence, kv head) pair that live in exact rows outside the split blocks' list (SeqView: the
// stored sinks [0, s_first) and the ring's window positions [w_end, n)), cut into exact_parts
// ranges; a warp per (pair, part) attends its range and writes the pair's partial slot
// n_splits + part. Each 16-lane group of the warp takes every (W / 16)-th item (the lane layout of
// load_head: RoPE partners in one lane) with its own online softmax per q head; the groups merge at
// the end. s_q: [NT / W][G][D + 4] floats of shared memory (sparse_exact_smem_bytes).
template <class T, int D, int G, int W, int NT>
DELTAKV_GPU_D void sparse_exact_role(const SparseDecodeParams<T>& p, float* s_q, int e) {
  constexpr int E = D / 16, H = E / 2, NW = NT / W, GR = W / 16;  // 16-lane groups per warp
  // q heads per walk over the items: G x E accumulators per lane for G 7 or 8 spilled the split
  // blocks' registers too (the role is inlined: a call would copy the parameters to the stack)
  constexpr int GC = G < 4 ? G : 4;
  constexpr int PF = 2;  // items in flight per 16-lane group
  static_assert(W % 16 == 0, "whole 16-lane groups");
  const int warp = threadIdx.x / W, lane_w = threadIdx.x % W, grp = lane_w / 16, lane = lane_w % 16;
  const bool half = p.style != RopeStyle::interleaved, rope = p.style != RopeStyle::none;
  const auto& L = p.layer;
  const int Hkv = p.n_kv_heads, kvd = 2 * Hkv * D, parts = p.exact_parts, slots = sparse_partial_slots(p);
  const std::int64_t work = std::int64_t(p.batch) * Hkv * parts;
  float* qs = s_q + warp * G * (D + 4);
  for (std::int64_t wi = std::int64_t(e) * NW + warp; wi < work; wi += std::int64_t(p.exact_blocks) * NW) {  // uniform over the warp
    const int pr = int(wi / parts), part = int(wi % parts), b = pr / Hkv, h = pr % Hkv;
    const SeqView<T> v = seq_view(p, b);
    const int n1 = v.s_first, cnt = n1 + (v.n - v.w_end);  // items [0, n1) are sinks, the rest the window's tail
    const int ta = int(std::int64_t(part) * cnt / parts), tb = int(std::int64_t(part + 1) * cnt / parts);  // this part's items
    vendor::warp_sync();  // the previous pair's reads of qs are done
    for (int i = lane_w; i < G * D; i += W) qs[(i / D) * (D + 4) + i % D] = to_float(p.q[b * p.ldq + (h * G) * D + i]) * p.scale;
    vendor::warp_sync();
    auto pos_of = [&](int t) { return t < n1 ? t : v.w_end + (t - n1); };
    // item t's exact row: the sinks store below L.sinks, else the ring; past the part's end ring row
    // 0 (a load that is never used, as the split blocks' dummy loads)
    auto load = [&](int t, RawHead<T, D>& kr, RawHead<T, D>& vr) {
      const int pos = pos_of(t);
      const T* row = t >= tb ? v.ring
                     : pos < L.sinks ? v.sinks + std::int64_t(pos) * kvd
                                     : v.ring + std::int64_t((pos - L.sinks) % L.ring) * kvd;
      kr = load_head_raw<T, D>(row + h * D, lane, half);
      vr = load_head_raw<T, D>(row + (Hkv + h) * D, lane, half);
    };
    for (int g0 = 0; g0 < G; g0 += GC) {
      float m[GC], l[GC], acc[GC][E];
#pragma unroll
      for (int g = 0; g < GC; ++g) {
        m[g] = kNegInf;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < E; ++i) acc[g][i] = 0.f;
      }
      // PF items per group in flight (slot j holds the group's item t0 + j GR + grp): one at a time, each
      // item waited for its row (L2 / DRAM latency), which made a warp's ~70 items longer than a
      // batch-1 split block
      RawHead<T, D> kb[PF], vb[PF];
#pragma unroll
      for (int j = 0; j < PF; ++j) load(ta + grp + j * GR, kb[j], vb[j]);
      for (int t0 = ta; t0 < tb; t0 += PF * GR) {  // uniform over the warp: its shuffles need every lane
#pragma unroll
        for (int j = 0; j < PF; ++j) {
          const int t = t0 + j * GR + grp;
          const bool valid = t < tb;
          float x[E], vv[E];
          unpack_head<T, D>(kb[j], half, x);
          unpack_head<T, D>(vb[j], half, vv);
          load(t + PF * GR, kb[j], vb[j]);  // the slot's next item
          if (rope) {
            const int pos = valid ? pos_of(t) : 0;
            float c[H], sn[H];
            if (p.rope.freq)
              rope_sincos<H>(p.rope.freq, pos, lane * H, c, sn);
            else
              rope_cs<H>(p.rope, pos, lane * H, c, sn);
            rotate<E>(x, c, sn);
          }
#pragma unroll
          for (int g = 0; g < GC; ++g) {
            if (g0 + g >= G) break;  // (uniform)
            float qv[E];
            load_head_f32<D>(qs + (g0 + g) * (D + 4), lane, half, qv);
            float d = 0.f;
#pragma unroll
            for (int i = 0; i < E; ++i) d += qv[i] * x[i];
            d = group16_sum<W>(d);
            if (valid) {  // (m = -inf: alpha 0; both -inf, only from non-finite rows: nothing added)
              const float mn = fmaxf(m[g], d), alpha = mn == kNegInf ? 1.f : expf(m[g] - mn), pe = mn == kNegInf ? 0.f : expf(d - mn);
              l[g] = l[g] * alpha + pe;
#pragma unroll
              for (int i = 0; i < E; ++i) acc[g][i] = acc[g][i] * alpha + pe * vv[i];
              m[g] = mn;
            }
          }
        }
      }
      // merge the groups' softmax states (every group ends with the warp's)
#pragma unroll
      for (int o = 16; o < W; o *= 2)
#pragma unroll
        for (int g = 0; g < GC; ++g) {
          const float mo = vendor::shfl_xor<W>(m[g], o), lo = vendor::shfl_xor<W>(l[g], o), mn = fmaxf(m[g], mo);
          const float a = mn == kNegInf ? 0.f : expf(m[g] - mn), ao = mn == kNegInf ? 0.f : expf(mo - mn);
          l[g] = l[g] * a + lo * ao;
#pragma unroll
          for (int i = 0; i < E; ++i) acc[g][i] = acc[g][i] * a + vendor::shfl_xor<W>(acc[g][i], o) * ao;
          m[g] = mn;
        }
      if (grp == 0) {
#pragma unroll
        for (int g = 0; g < GC; ++g) {
          if (g0 + g >= G) break;
          float* out = p.part + ((std::int64_t(b) * p.n_q_heads + h * G + g0 + g) * slots + p.n_splits + part) * (D + 2);
#pragma unroll
          for (int i = 0; i < E; ++i) out[head_dim_of<D>(lane, half, i)] = acc[g][i];
          if (lane == 0) {
            out[D] = m[g];
            out[D + 1] = l[g];
          }
        }
      }
    }
  }
}

template <class T, int D, int G, int W, int NT, bool WL2 = false>
__global__ void DELTAKV_LAUNCH_BOUNDS_MIN(NT, WL2 ? 2 : 1) sparse_decode_kernel(SparseDecodeParams<T> p) {
  constexpr int TT = kSparseTile, NW = NT / W, E = D / 16, CH = kSparseChunk;
  constexpr int KT = TT * 16 / NT, VT = TT * (D / 8) / NT;  // K / V tasks per thread
  // Register-fragment tensor-core products (CUDA; W_k,h in shared memory): the K product by
  // ldmatrix + mma.sync, and the accumulation (acc += P^T [Z | V]) on tensor cores too, with the
  // value tile kept as T. Otherwise (HIP, WL2) the mma16 tiles and the CUDA-core accumulation.
  constexpr bool kRegMma = vendor::kTensorTiles && !WL2 && W == 32;  // gpu-check: allow(fragment layouts are for 32 lanes)
  constexpr int ldvb = D + 8;  // the value tile as T (kRegMma): in s_vt, or over s_v
  // The K product runs on KU = D / 16 warps. Where the block has more (512 threads, CUDA register
  // path), the others build the tile's value rows meanwhile (mean of the references' V, loaded
  // then rather than a tile ahead) into s_vt: the V tasks used to be a phase of their own after
  // the K tasks, with the 8 spare warps idle at the barrier that ends the product.
  constexpr int KU = D / 16;
  constexpr bool kVOverlap = kRegMma && NW > KU;
  // The logits' 16-lane sums of all G heads at once (group16_multi_sum) where its G live partial
  // sums fit: G <= 4, or 256-thread blocks. The 512-thread block at G 7 spilled and was 4% slower.
  constexpr bool kMultiSum = G <= 4 || NT == 256;
  constexpr int VTH = kVOverlap ? (NW - KU) * W : 1;  // spare threads (1 where there are none: no division by 0)
  constexpr int VTO = kVOverlap ? TT * (D / 8) / VTH : 1;  // V tasks per spare thread
  static_assert(!kVOverlap || (VTO >= 1 && TT * (D / 8) % VTH == 0), "whole V tasks per spare thread");
  static_assert((NT == 256 || NT == 512) && KT >= 1 && VT >= 1 && NT % W == 0 && NT >= CH, "sparse_decode_kernel: shape");
  const auto& L = p.layer;
  const int DC = L.latent_dim, K = L.k, ldz = DC + 8, ldk = D + 4;
  const int Hkv = p.n_kv_heads, kvd = 2 * Hkv * D;
  DELTAKV_DYNAMIC_SMEM(unsigned char, smem_raw);
  // blocks [0, n_splits * Hkv * B): split fastest, then kv head, then sequence; the exact blocks
  // after them (the hardware dispatches blocks in index order in practice, so they land on the
  // multiprocessors the splits leave free; correctness does not depend on it)
  const int per_seq = p.n_splits * Hkv;
  if (int(blockIdx.x) >= per_seq * p.batch) {
    sparse_exact_role<T, D, G, W, NT>(p, reinterpret_cast<float*>(smem_raw), int(blockIdx.x) - per_seq * p.batch);
    return;
  }
  const int split = int(blockIdx.x) % p.n_splits, h = (int(blockIdx.x) / p.n_splits) % Hkv, b = int(blockIdx.x) / per_seq;
  const bool half = p.style != RopeStyle::interleaved, rope = p.style != RopeStyle::none;
  const int warp = threadIdx.x / W, lane_w = threadIdx.x % W;

  T* s_w = reinterpret_cast<T*>(smem_raw);                             // [D][ldz] (none if WL2)
  T* s_z = s_w + (WL2 ? 0 : std::size_t(D) * ldz);                      // [TT][ldz]
  float* s_k = reinterpret_cast<float*>(s_z + std::size_t(TT) * ldz);  // [TT][ldk]
  float* s_v = s_k + TT * ldk;                                          // [TT][ldk]
  float* s_accz = s_v + TT * ldk;                                       // [G][DC]
  float* s_accv = s_accz + G * DC;                                      // [G][D]
  float* s_q = s_accv + G * D;                                          // [G][D + 4]
  float* s_p = s_q + G * (D + 4);                                       // [G][TT]
  std::int32_t* s_row = reinterpret_cast<std::int32_t*>(s_p + G * TT);  // [CH][K]: row * 4 + region
  std::int32_t* s_pos = s_row + CH * K;                                 // [CH]
  std::int32_t* s_lrow = s_pos + CH;                                    // [CH] latent row or -1
  std::int32_t* s_nref = s_lrow + CH;                                   // [CH]
  float* s_sm = reinterpret_cast<float*>(s_nref + CH);                  // [CH][2]
  float* s_stat = s_sm + 2 * CH;                                        // [G][4]: m, l, alpha, mass
  T* s_vt = reinterpret_cast<T*>(s_stat + G * 4);                       // [TT][ldvb] (kVOverlap)
  float* s_kb = reinterpret_cast<float*>(s_vt + TT * ldvb);             // [D] K bias of head h, f32

  // Optional per-phase cycle counters (p.profile, for tuning): thread 0 adds the cycles since the
  // previous mark, right after a barrier, so each phase's count is the block's time in it.
  const bool profiling = p.profile != nullptr && threadIdx.x == 0;  // one register test per mark
  long long last_mark = profiling ? clock64() : 0;
  auto mark = [&](int phase) {
    if (profiling) {
      const long long now = clock64();
      atomicAdd(p.profile + phase, static_cast<unsigned long long>(now - last_mark));
      last_mark = now;
    }
  };
  const SeqView<T> v = seq_view(p, b);
  const int per = ((v.total + p.n_splits - 1) / p.n_splits + TT - 1) / TT * TT;
  const int i0 = split * per, i1 = min(v.total, i0 + per);

  // W_k,h into shared memory ([D][DC] -> ld ldz), 8 loads in flight per thread.
  if constexpr (!WL2) {
    const int chunks = D * DC / 8;
#pragma unroll 8
    for (int i = threadIdx.x; i < chunks; i += NT) {
      const int r = i / (DC / 8), c8 = (i % (DC / 8)) * 8;
      *reinterpret_cast<uint4*>(s_w + r * ldz + c8) =
          *reinterpret_cast<const uint4*>(L.w_dec + std::int64_t(h * D + r) * DC + c8);
    }
  }
  for (int i = threadIdx.x; i < G * DC; i += NT) s_accz[i] = 0.f;
  if constexpr (!WL2)  // (WL2 reads the bias from global memory)
    for (int i = threadIdx.x; i < D; i += NT) s_kb[i] = L.b_dec ? to_float(L.b_dec[h * D + i]) : 0.f;
  for (int i = threadIdx.x; i < G * D; i += NT) {
    s_accv[i] = 0.f;
    const int g = i / D, d = i % D;
    s_q[g * (D + 4) + d] = to_float(p.q[b * p.ldq + (h * G + g) * D + d]) * p.scale;
  }
  if (threadIdx.x < G) {
    s_stat[threadIdx.x * 4 + 0] = kNegInf;
    s_stat[threadIdx.x * 4 + 1] = 0.f;
    s_stat[threadIdx.x * 4 + 3] = 0.f;
  }

  // Reference rows of one tile, loaded ahead into registers: K slices (packed) and V slices, up to
  // four references per item; a missing reference reads ring row 0 and gets weight 0, so every
  // load is unconditional and all of them are in flight together.
  RawHead<T, D> g_k[KT][4];
  uint4 g_v[VT][4];
  // The first kZPrefetch 16-byte pieces per thread of a tile's latent codes (all of them for int4
  // at d_c <= 512), loaded ahead like the references.
  constexpr int kZPrefetch = 512 / NT;
  uint4 z_pf[kZPrefetch];
  auto z_issue = [&](int c0) {
    const int pieces = int(L.lat_ld / 16), tasks = TT * pieces;
#pragma unroll
    for (int j = 0; j < kZPrefetch; ++j) {
      const int task = threadIdx.x + j * NT;
      z_pf[j] = make_uint4(0u, 0u, 0u, 0u);
      if (task < tasks) {
        const int r = s_lrow[c0 + task / pieces];
        if (r >= 0) z_pf[j] = *reinterpret_cast<const uint4*>(v.lat + std::int64_t(r) * L.lat_ld + (task % pieces) * 16);
      }
    }
  };
  // The four reference V slices (dims d8 .. d8 + 7 of kv head h) of chunk item ci; a missing
  // reference reads ring row 0 (weight 0 later), so every load is unconditional. Returns nref.
  auto load_v_refs = [&](int ci, int d8, uint4 (&r)[4]) {
    const int nref = s_nref[ci];
#pragma unroll
    for (int j = 0; j < 4; ++j)
      r[j] = *reinterpret_cast<const uint4*>(item_row(v, j < nref ? s_row[ci * K + j] : 1, kvd) + (Hkv + h) * D + d8);
    return nref;
  };
  auto gather_issue = [&](int c0) {
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      const int task = threadIdx.x + kt * NT, ci = c0 + task / 16, lane = task % 16;
      const int nref = s_nref[ci];
#pragma unroll
      for (int j = 0; j < 4; ++j)
        g_k[kt][j] = load_head_raw<T, D>(item_row(v, j < nref ? s_row[ci * K + j] : 1, kvd) + h * D, lane, half);
    }
    if constexpr (!kVOverlap) {
#pragma unroll
      for (int vt = 0; vt < VT; ++vt) {
        const int task = threadIdx.x + vt * NT;
        load_v_refs(c0 + task / (D / 8), (task % (D / 8)) * 8, g_v[vt]);
      }
    }
  };
  // Mean of an item's reference V slices (8 dims; refs[j] for j >= nref ignored): as f32 in mean,
  // or as T at dst (v_mean).
  auto v_mean_f32 = [&](const uint4 (&refs)[4], int nref, float (&mean)[8]) {
    const float inv = nref > 0 ? 1.f / float(nref) : 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) mean[e] = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const T* ev = reinterpret_cast<const T*>(&refs[j]);
      const float w = j < nref ? 1.f : 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) mean[e] += w * to_float(ev[e]);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) mean[e] *= inv;
  };
  auto v_mean = [&](const uint4 (&refs)[4], int nref, T* dst) {
    float mean[8];
    v_mean_f32(refs, nref, mean);
    T vb[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) vb[e] = from_float<T>(mean[e]);
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(vb);
  };

  for (int chunk = i0; chunk < i1; chunk += CH) {
    __syncthreads();  // the previous chunk's tiles are done with s_row ...
    mark(0);
    if (threadIdx.x < CH) {  // resolve: one item per thread
      const int i = chunk + threadIdx.x;
      const ItemLoc it = i < i1 ? resolve_item(p, v, b, i) : ItemLoc{};
#pragma unroll
      for (int j = 0; j < 4; ++j)  // constant indices: it.rows stays in registers
        if (j < it.nref) s_row[threadIdx.x * K + j] = it.rows[j];
      if (it.lrow >= 0 && L.latent_bits > 0) {
        s_sm[2 * threadIdx.x] = it.sc;
        s_sm[2 * threadIdx.x + 1] = it.mn;
      }
      s_pos[threadIdx.x] = it.pos;
      s_lrow[threadIdx.x] = it.lrow;
      s_nref[threadIdx.x] = it.nref;
    }
    __syncthreads();
    mark(1);
    const int chunk_end = min(i1, chunk + CH);
    for (int tile = chunk; tile < chunk_end; tile += TT) {
      const int c0 = tile - chunk;  // first item of the tile within the chunk
      // 1. dequantize: 16-byte pieces of latent rows, every load of the tile issued before any use
      {
        constexpr int MAXL = kSparseMaxTilePieces / NT;  // pieces per thread
        const int pieces = int(L.lat_ld / 16), tasks = TT * pieces;
        const int vals = L.latent_bits == 0 ? 8 : (L.latent_bits == 8 ? 16 : 32);  // gpu-check: allow(int4 values per 16 bytes, not lanes)
        if (tile == chunk) z_issue(c0);
        uint4 raw[MAXL];
#pragma unroll
        for (int j = 0; j < MAXL; ++j) {
          if (j < kZPrefetch) {  // loaded ahead (z_issue)
            raw[j] = z_pf[j];
            continue;
          }
          const int task = threadIdx.x + j * NT;
          raw[j] = make_uint4(0u, 0u, 0u, 0u);
          if (task < tasks) {
            const int r = s_lrow[c0 + task / pieces];
            if (r >= 0) raw[j] = *reinterpret_cast<const uint4*>(v.lat + std::int64_t(r) * L.lat_ld + (task % pieces) * 16);
          }
        }
#pragma unroll
        for (int j = 0; j < MAXL; ++j) {
          const int task = threadIdx.x + j * NT;
          if (task >= tasks) continue;
          const int i = task / pieces, ci = c0 + i, col = (task % pieces) * vals;
          T* dst = s_z + i * ldz + col;
          const bool scaled = L.latent_bits > 0 && s_lrow[ci] >= 0;  // raw latents have no scale / min
          dequant16<T>(raw[j], L.latent_bits, scaled ? s_sm[2 * ci] : 0.f, scaled ? s_sm[2 * ci + 1] : 0.f, dst);
        }
      }
      __syncthreads();
      mark(2);
      // 2. K tile on tensor cores: [TT x DC] x [DC x D]
      {
        static_assert(TT == 2 * 16, "two row tiles per column tile");
        // Work unit = (pair of column tiles, half of the latent dimension): 2 x 2 output tiles per
        // warp, so each k-step loads 2 A + 2 B fragments for 4 products (shared-memory reads are what
        // bounds this phase: with 512 threads, one column tile per warp over all 16 warps was
        // measured slower than this with 8 of them). The second half's partial sums go to s_v (free
        // until step 3), and step 3 adds them.
        const int half_k = (DC / 16 / 2) * 16;
        constexpr int pairs = D / 16 / 2, units = 2 * pairs;  // pairs of 16-column tiles
        if constexpr (kRegMma) {
          // Register fragments: ldmatrix from explicit shared addresses and mma.sync m16n8k16.
          // (wmma's loads took generic 32-bit loads and 64-bit address arithmetic: two loads and
          // ~3 address instructions per tensor-core product, measured by ncu at 4800 cycles a tile.)
          // Lane l's ldmatrix rows: A (Z) row l % 16, k offset 8 (l / 16); B (W_k,h rows = output
          // columns) column l % 8 + 8 (l / 16), k offset 8 ((l / 8) % 2).
          const T* a_row = s_z + (lane_w % 16) * ldz + 8 * (lane_w / 16);
          for (int u = warp; u < units; u += NW) {
            const int cp = u % pairs, kh = u / pairs;
            const int k0 = kh == 0 ? 0 : half_k, k1 = kh == 0 ? half_k : DC;
            const T* b_row = s_w + (2 * cp * 16 + lane_w % 8 + 8 * (lane_w / 16)) * ldz + 8 * ((lane_w / 8) % 2);
            float acc[2][4][4];  // [row tile][8-column tile][fragment]
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
              for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[r][j][e] = 0.f;
#pragma unroll 2
            for (int kk = k0; kk < k1; kk += 16) {
              unsigned a[2][4], b[2][4];
              vendor::ldmatrix_x4(a[0], a_row + kk);
              vendor::ldmatrix_x4(a[1], a_row + 16 * ldz + kk);
              vendor::ldmatrix_x4(b[0], b_row + kk);
              vendor::ldmatrix_x4(b[1], b_row + 16 * ldz + kk);
#pragma unroll
              for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                  vendor::mma_16816<T>(acc[r][j], a[r][0], a[r][1], a[r][2], a[r][3], b[j / 2][2 * (j % 2)],
                                       b[j / 2][2 * (j % 2) + 1]);
            }
            float* out = kh == 0 ? s_k : s_v;
            const int g = lane_w / 4, c = lane_w % 4;
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                float* o = out + (16 * r + g) * ldk + 2 * cp * 16 + 8 * j + 2 * c;
                *reinterpret_cast<float2*>(o) = make_float2(acc[r][j][0], acc[r][j][1]);
                *reinterpret_cast<float2*>(o + 8 * ldk) = make_float2(acc[r][j][2], acc[r][j][3]);
              }
          }
          if constexpr (kVOverlap) {
            if (warp >= KU) {  // the value rows of this tile, every load issued before any use
              const int vtid = (warp - KU) * W + lane_w;
              uint4 r[VTO][4];
              int nrefs[VTO];
#pragma unroll
              for (int o = 0; o < VTO; ++o) {
                const int task = vtid + o * (NW - KU) * W;
                nrefs[o] = load_v_refs(c0 + task / (D / 8), (task % (D / 8)) * 8, r[o]);
              }
#pragma unroll
              for (int o = 0; o < VTO; ++o) {
                const int task = vtid + o * (NW - KU) * W;
                v_mean(r[o], nrefs[o], s_vt + (task / (D / 8)) * ldvb + (task % (D / 8)) * 8);
              }
            }
          }
        } else
        for (int u = warp; u < units; u += NW) {
          const int cp = u % pairs, kh = u / pairs;
          const int k0 = kh == 0 ? 0 : half_k, k1 = kh == 0 ? half_k : DC;
          vendor::mma16<T> a00, a01, a10, a11;  // [row tile][column tile]
          a00.zero();
          a01.zero();
          a10.zero();
          a11.zero();
          // W_k,h rows of the column tiles: shared memory, or global (row-major [D][DC] is the
          // column-major B the tile product takes, ld DC)
          const int ldw = WL2 ? DC : ldz;
          const T* w0 = WL2 ? L.w_dec + std::int64_t(h * D + 2 * cp * 16) * DC : s_w + (2 * cp) * 16 * ldz;
          const T* w1 = w0 + 16 * ldw;
#pragma unroll 4
          for (int kk = k0; kk < k1; kk += 16) {
            a00.mac_2x2(a01, a10, a11, s_z + kk, s_z + 16 * ldz + kk, ldz, w0 + kk, w1 + kk, ldw);
          }
          float* out = kh == 0 ? s_k : s_v;
          a00.store(out + (2 * cp) * 16, ldk);
          a01.store(out + (2 * cp + 1) * 16, ldk);
          a10.store(out + 16 * ldk + (2 * cp) * 16, ldk);
          a11.store(out + 16 * ldk + (2 * cp + 1) * 16, ldk);
        }
      }
      __syncthreads();
      mark(3);
      // 3. K: + reference mean (+ bias for latents), RoPE; V: reference mean (unless built during
      //    the product). The loads were issued ahead (prefetch, below) unless this is the first
      //    tile of its chunk.
      if (tile == chunk) gather_issue(c0);
      {
#pragma unroll
        for (int kt = 0; kt < KT; ++kt) {
          const int task = threadIdx.x + kt * NT, i = task / 16, ci = c0 + i, lane = task % 16;
          float x[E];
          // The K bias from its f32 copy in shared memory; WL2 reads it from global memory as T (the
          // copy's vector loads took registers that variant spills: measured 10% slower at Qwen).
          if constexpr (WL2)
            finish_key<T, D, true>(g_k[kt], s_nref[ci], s_lrow[ci] >= 0, s_pos[ci], lane, half, rope, s_k + i * ldk,
                                   s_v + i * ldk, L.b_dec ? L.b_dec + h * D : nullptr, p.rope, x);
          else
            finish_key<T, D, true>(g_k[kt], s_nref[ci], s_lrow[ci] >= 0, s_pos[ci], lane, half, rope, s_k + i * ldk,
                                   s_v + i * ldk, L.b_dec ? s_kb : nullptr, p.rope, x);
          // 4. logits of the rebuilt key, straight from registers: per q head, the lane's E dims of
          //    q (s_q, head-dim order) and a 16-lane sum. The key is never written to shared memory.
          const bool attended = s_pos[ci] >= 0;
          if constexpr (kMultiSum) {
            float dg[G];
#pragma unroll
            for (int g = 0; g < G; ++g) {
              float qv[E];
              load_head_f32<D>(s_q + g * (D + 4), lane, half, qv);
              dg[g] = 0.f;
#pragma unroll
              for (int e = 0; e < E; ++e) dg[g] += qv[e] * x[e];
            }
            int hg;
            const float tot = group16_multi_sum<W, G>(dg, lane, hg);
            if (lane % (16 / kPow2Heads<G>) == 0 && hg < G) s_p[i * G + hg] = attended ? tot : kNegInf;
          } else {
#pragma unroll
            for (int g = 0; g < G; ++g) {
              float qv[E];
              load_head_f32<D>(s_q + g * (D + 4), lane, half, qv);
              float d = 0.f;
#pragma unroll
              for (int e = 0; e < E; ++e) d += qv[e] * x[e];
              d = group16_sum<W>(d);
              if (lane == 0) s_p[i * G + g] = attended ? d : kNegInf;
            }
          }
        }
        if constexpr (!kVOverlap) {
          __syncthreads();  // every K task has read its half of the product from s_v
#pragma unroll
          for (int vt = 0; vt < VT; ++vt) {
            const int task = threadIdx.x + vt * NT, i = task / (D / 8), ci = c0 + i, d8 = (task % (D / 8)) * 8;
            if constexpr (kRegMma) {
              v_mean(g_v[vt], s_nref[ci], reinterpret_cast<T*>(s_v) + i * ldvb + d8);
            } else {
              float mean[8];
              v_mean_f32(g_v[vt], s_nref[ci], mean);
              st_f32<8>(s_v + i * ldk + d8, mean);
            }
          }
        }
      }
      // The next tile of this chunk: issue its reference loads now, so that they are in flight
      // during this tile's logits, softmax, accumulation, dequantization and K product.
      if (tile + TT < chunk_end) {
        gather_issue(c0 + TT);
        z_issue(c0 + TT);
      }
      __syncthreads();
      mark(4);
      mark(5);  // (the logits are computed in step 3 now: this phase is empty)
      // softmax: a warp per head
      for (int g = warp; g < G; g += NW) {
        float* st = s_stat + g * 4;
        const float sc = lane_w < TT ? s_p[lane_w * G + g] : kNegInf;
        float mx = sc;
#pragma unroll
        for (int o = W / 2; o > 0; o >>= 1) mx = fmaxf(mx, vendor::shfl_xor<W>(mx, o));
        mx = fmaxf(mx, st[0]);
        const float pr = mx == kNegInf ? 0.f : expf(sc - mx);
        float sum = pr, mass = lane_w < TT && s_lrow[c0 + lane_w] >= 0 ? pr : 0.f;
#pragma unroll
        for (int o = W / 2; o > 0; o >>= 1) {
          sum += vendor::shfl_xor<W>(sum, o);
          mass += vendor::shfl_xor<W>(mass, o);
        }
        if (lane_w < TT) s_p[lane_w * G + g] = pr;
        if (lane_w == 0) {
          const float alpha = mx == kNegInf ? 1.f : expf(st[0] - mx);
          st[0] = mx;
          st[1] = st[1] * alpha + sum;
          st[2] = alpha;
          st[3] = st[3] * alpha + mass;
        }
      }
      __syncthreads();
      mark(6);
      // 5. accumulate: acc_z = alpha acc_z + P^T Z, acc_v = alpha acc_v + P^T V
      if constexpr (kRegMma) {
        // On tensor cores: A = P^T (rows = q heads g < G, the rest zero; k = the tile's 32 items)
        // as T, B = 8-column slices of Z / V (ldmatrix .trans of the row-major [item][column]
        // tiles). A warp per 8-column slice; lane (g, c) owns acc[g][n0 + 2c, +1].
        static_assert(G <= 8 && TT == 32, "one 8-row half of the A fragment holds the group; two k-steps");  // gpu-check: allow(32 items per tile)
        const int g = lane_w / 4, c = lane_w % 4;
        unsigned a[2][2];  // [k-step][a0, a2]
#pragma unroll
        for (int ks = 0; ks < 2; ++ks)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int i = 16 * ks + 8 * hf + 2 * c;
            a[ks][hf] = g < G ? vendor::pack2<T>(s_p[i * G + g], s_p[(i + 1) * G + g]) : 0u;
          }
        const float alpha = g < G ? s_stat[g * 4 + 2] : 0.f;
        const T* s_vb = kVOverlap ? s_vt : reinterpret_cast<const T*>(s_v);
        // Three slices per warp at a time, all loads before any product: one slice at a time was
        // a serial chain of shared-memory and tensor-core latencies.
        constexpr int S = 3;
        const int nt = DC / 8 + D / 8;
        for (int t0 = warp; t0 < nt; t0 += S * NW) {
          unsigned bf[S][4];
          float2 o[S];
          float2* acc[S];
#pragma unroll
          for (int j = 0; j < S; ++j) {
            // Past the end: the last slice's B again (read only; its product is not stored), and no
            // read of the accumulator, which another warp writes.
            const int t = min(t0 + j * NW, nt - 1);
            const bool lat = t < DC / 8;
            const int n0 = (lat ? t : t - DC / 8) * 8;
            vendor::ldmatrix_x4<true>(bf[j], lat ? s_z + lane_w * ldz + n0 : s_vb + lane_w * ldvb + n0);
            acc[j] = reinterpret_cast<float2*>((lat ? s_accz + (g % G) * DC : s_accv + (g % G) * D) + n0 + 2 * c);
            o[j] = g < G && t0 + j * NW < nt ? *acc[j] : make_float2(0.f, 0.f);
          }
#pragma unroll
          for (int j = 0; j < S; ++j) {
            float d[4] = {0.f, 0.f, 0.f, 0.f};
            vendor::mma_16816<T>(d, a[0][0], 0u, a[0][1], 0u, bf[j][0], bf[j][1]);
            vendor::mma_16816<T>(d, a[1][0], 0u, a[1][1], 0u, bf[j][2], bf[j][3]);
            if (g < G && t0 + j * NW < nt) *acc[j] = make_float2(o[j].x * alpha + d[0], o[j].y * alpha + d[1]);
          }
        }
      } else
      // two columns of every head per thread (one z load feeds 2G FMAs): tasks [0, DC/2) are
      // latent column pairs, then [DC/2, DC/2 + D/2) value column pairs
      for (int task = threadIdx.x; task < DC / 2 + D / 2; task += NT) {
        const bool lat = task < DC / 2;
        const int cp = lat ? task : task - DC / 2;
        float* acc = lat ? s_accz + 2 * cp : s_accv + 2 * cp;
        const int lda = lat ? DC : D;
        float a0[G], a1[G];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float alpha = s_stat[g * 4 + 2];
          a0[g] = acc[g * lda] * alpha;
          a1[g] = acc[g * lda + 1] * alpha;
        }
        if (lat) {
#pragma unroll 4
          for (int i = 0; i < TT; ++i) {
            const unsigned zz = *reinterpret_cast<const unsigned*>(s_z + i * ldz + 2 * cp);
            const T* zp = reinterpret_cast<const T*>(&zz);
            const float z0 = to_float(zp[0]), z1 = to_float(zp[1]);
#pragma unroll
            for (int g = 0; g < G; ++g) {
              const float pg = s_p[i * G + g];
              a0[g] += pg * z0;
              a1[g] += pg * z1;
            }
          }
        } else {
#pragma unroll 4
          for (int i = 0; i < TT; ++i) {
            const float v0 = s_v[i * ldk + 2 * cp], v1 = s_v[i * ldk + 2 * cp + 1];
#pragma unroll
            for (int g = 0; g < G; ++g) {
              const float pg = s_p[i * G + g];
              a0[g] += pg * v0;
              a1[g] += pg * v1;
            }
          }
        }
#pragma unroll
        for (int g = 0; g < G; ++g) {
          acc[g * lda] = a0[g];
          acc[g * lda + 1] = a1[g];
        }
      }
      __syncthreads();
      mark(7);
    }
  }
  __syncthreads();
  write_sparse_partial<T, D, G, W, NT>(p, b, h, split, s_accz, s_accv, s_stat);
  if (p.profile) {
    __syncthreads();
    mark(8);
  }
}

}  // namespace deltakv::gpu::decode
