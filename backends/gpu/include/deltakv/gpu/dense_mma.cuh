#pragma once
// dense_mma_kernel: the dense decode pass (DenseDecodeParams, same partials as dense_decode_kernel)
// with both products on tensor cores, operands straight from registers (vendor_ext.hpp's
// mma_16816 / mma_1688 / transpose8x8; CUDA only, behind vendor::kTensorTiles).
//
// Why: the lane kernel spends ~150 warp instructions per (token, kv head) on 16-lane dot products,
// shuffles and per-lane softmax, and is issue-bound at 75% of its byte floor (ncu). Here a warp
// takes 8 tokens at a time:
//   S[16 x 8] = Q[16 x D] K^T  (m16n8k16; rows = the G q heads, zero-padded to 16). Lane (g, c)
//     holds 16-byte chunks d = 8c + 32i .. +7 (i < D/32) of token g's K row. Because a dot product
//     may take its terms in any order, those chunks are fed as the k16 slices as they are (Q's
//     fragment uses the same order), and RoPE partners (d, d + D/2, or d, d + 1) sit in one lane.
//   O^T[D x 8] += V^T[D x 8] P^T  (m16n8k8; columns = the q heads). S's accumulator layout is
//     P^T's operand layout, and V's row chunks become V^T's operand by one movmatrix each.
// Precision: the rotated K enters the product rounded to T, as a cache of post-RoPE rows would hold
// it. Where the logits are written (the OmniKV filter layers, Split = true) it enters as two T parts,
// rounded value + rounding error, so the logits keep about 16 bits like the f32 lane kernel's before
// they are stored as f16 (11 bits: the storage's rounding, not the product's, is what the selection
// sees). The split costs no time measurably: the pass is bound by reading K and V.
// Rows are copied to shared memory by each warp for itself (cp.async, two stages per warp), so no
// block barrier is needed until the merge: each copy instruction takes whole 128-byte lines (a
// token's K and V rows, lanes 0-15 and 16-31 at head_dim 128), and a __syncwarp hands the lanes each
// other's copies. Copying by the reading lane's own chunks instead (no warp sync, but 8 rows x 64
// bytes per instruction: 8 half lines where there are 4 whole ones now) was slower: on the H100
// (same run) the layer at Llama 128K x 8 took 1.448 -> 1.416 ms, Qwen 128K x 8 0.738 -> 0.723.
// Each lane's position mod 64 stays fixed (8 warps x 8 tokens = 64 positions per step, splits start
// at multiples of 64), so the small RoPE table's entries a lane reads never change (L1 hits) and
// the large table's row is the same for the whole block step.
// f16 storage: a rotated K above 65504 / sqrt(2) in magnitude overflows its f16 parts (the f32 lane
// kernel does not); bf16 has the range of f32.
#include <cstddef>
#include <cstdint>

#include "decode_kernels.cuh"
#include "decode_params.hpp"
#include "vendor.hpp"
#include "vendor_ext.hpp"

namespace deltakv::gpu::decode {

inline constexpr int kDenseMmaThreads = 256;  // 8 warps of 32: the RoPE scheme above needs exactly 8
inline constexpr int kDenseMmaChunkStride = 4 * 8;  // elements between a lane's chunks: 4 lanes x 8 values
// Stages per warp: one computed on while the next is copied. Three (the code takes any count >= 2)
// measured slower on the H100: the full layer at Llama 128K x 8 1.444 ms against 1.398.
inline constexpr int kDenseMmaStages = 2;
inline constexpr int kDenseMmaQPad = 64 / 2;  // elements after each row of Q in shared memory (see below)

// Dynamic shared memory of one block: per warp kDenseMmaStages stages of 8 K rows and 8 V rows of
// 16-bit values, unpadded; the final merge reuses it.
// Layout: a row's 16-byte chunk j sits at j ^ 4 in odd rows (j in place in even ones). Why: the
// reads (8 lanes = 2 rows x 4 chunks per shared-memory phase) then fall on 8 distinct bank groups
// without padding, and every 128-byte line of a row copied from global memory lands in one 128-byte
// line of shared memory. With rows padded by 64 bytes instead (the earlier layout) every other
// row straddled two shared-memory lines and the copies reached L2 as 6 requests per 4 lines
// (2.65 sectors each; ncu, Llama 128K x 8), against 4 whole-line requests for plain loads.
// After the stages: Q as 8 rows (the G q heads, zero past G) of head_dim + 32 values (the 64-byte
// padding puts the 8 lanes of a read phase on distinct banks), read from there at every step
// rather than held in 16 registers: at 128 registers a thread, those spilled.
inline std::size_t dense_mma_smem_bytes(int head_dim) {
  return (std::size_t(kDenseMmaThreads / vendor::kWarpSize) * kDenseMmaStages * 16 * head_dim + 8 * (head_dim + kDenseMmaQPad)) * 2;
}

// Whether dense_mma_kernel can take p: tensor cores, 64-aligned splits, 16-byte aligned rows.
template <class T>
inline bool dense_mma_fits(const DenseDecodeParams<T>& p) {
  if constexpr (!vendor::kTensorTiles) {
    return false;
  } else {
    const auto al16 = [](const void* x) { return reinterpret_cast<std::uintptr_t>(x) % 16 == 0; };
    return p.split_len > 0 && p.split_len % 64 == 0 && al16(p.kv) && al16(p.q) && p.seq_stride % 8 == 0 && p.ldq % 8 == 0;
  }
}

namespace mma_detail {
union Chunk {  // 8 16-bit values = 4 words = 16 bytes
  uint4 v;
  unsigned w[4];
};
// Round 4 floats to T as 2 words (hi), and the rounding error as 2 more (lo).
template <class T>
DELTAKV_GPU_D void pack4_split(const float* f, unsigned* hi, unsigned* lo) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    hi[j] = vendor::pack2<T>(f[2 * j], f[2 * j + 1]);
    const T* e = reinterpret_cast<const T*>(&hi[j]);
    lo[j] = vendor::pack2<T>(f[2 * j] - to_float(e[0]), f[2 * j + 1] - to_float(e[1]));
  }
}
}  // namespace mma_detail

// grid (Hkv, n_splits, B), kDenseMmaThreads threads, dense_mma_smem_bytes(D) of dynamic shared
// memory. Warp w takes tokens t0 + 64k + 8w .. +7; it copies the next 8 rows into its other stage
// (cp.async, whole lines per instruction) while it computes on this one, so no block barrier is
// needed until the merge.
template <class T, int D, int G, bool Split>
__global__ void DELTAKV_LAUNCH_BOUNDS_MIN(kDenseMmaThreads, 2) dense_mma_kernel(DenseDecodeParams<T> p) {
  using mma_detail::Chunk;
  constexpr int NT = kDenseMmaThreads, W = vendor::kWarpSize, NW = NT / W, CS = kDenseMmaChunkStride, NC = D / CS,
                MB = D / 16, RS = D, NS = kDenseMmaStages, SS = 16 * RS;  // row and stage strides (elements)
  static_assert(!vendor::kTensorTiles || W == 4 * 8, "the mma fragment layouts are for 32-lane warps");
  static_assert(NW == 8 && G <= 8 && (D == 64 || D == 128), "dense_mma_kernel: 8 warps, G <= 8, D 64 or 128");
  static_assert(sizeof(T) == 2, "16-bit storage (dense_mma_smem_bytes)");
  static_assert((NW * G * D + 2 * NW * G) * sizeof(float) <= NW * NS * SS * sizeof(T), "the merge fits the stages");
  static_assert(NS >= 2, "one stage computed on, at least one in flight");
  extern __shared__ uint4 dense_mma_smem[];
  const int h = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / W, lane = threadIdx.x % W, g = lane / 4, c = lane % 4;
  const bool half = p.style != RopeStyle::interleaved, rope = p.style != RopeStyle::none;
  const int n = p.n[b];
  const int t0 = split * p.split_len, t1 = min(n, t0 + p.split_len);
  const int Hq = p.n_q_heads, ld = 2 * p.n_kv_heads * D;

  // Q (the A operand) into shared memory: row r = a q head of the group, zero past G.
  constexpr int RQ = D + kDenseMmaQPad;
  T* const s_q = reinterpret_cast<T*>(dense_mma_smem) + NW * NS * SS;
  if (threadIdx.x < D) {  // 8 rows x D/8 chunks
    const int r = threadIdx.x / (D / 8), k = threadIdx.x % (D / 8);
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < G) v = *reinterpret_cast<const uint4*>(p.q + b * p.ldq + (h * G + r) * D + 8 * k);
    *reinterpret_cast<uint4*>(s_q + r * RQ + 8 * k) = v;
  }
  __syncthreads();
  const T* const my_q = s_q + g * RQ + 8 * c;  // this lane's chunks: row g, c + 4i
  float m = kNegInf, l = 0.f;  // head g's running max (same in the 4 lanes of g) and this lane's sum
  float o[MB][4];              // O^T blocks: rows d (see below), columns heads 2c, 2c + 1
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) o[mb][0] = o[mb][1] = o[mb][2] = o[mb][3] = 0.f;
  const T* base = p.kv + b * p.seq_stride;
  // This lane's slots in the warp's stages: K row g at row g, V row g at row 8 + g. Its chunk
  // c + 4i sits at c + 4(i ^ (g & 1)) (the layout above), i.e. i's offset moves by +-sw.
  T* const my_stage = reinterpret_cast<T*>(dense_mma_smem) + warp * NS * SS + g * RS + 8 * c;
  const int sw = (g & 1) ? CS : 0;
  auto chunk_at = [&](int i) { return CS * i + (i % 2 == 0 ? sw : -sw); };
  // The copies: PR = D / 8 16-byte pieces per row; one instruction takes RI = 128 / D tokens' K and
  // V rows (32 pieces); lane -> (token RI-offset, K or V, piece).
  constexpr int PR = D / 8, RI = 128 / D;
  static_assert(!vendor::kTensorTiles || 2 * PR * RI == W, "a copy instruction takes 32 pieces: RI tokens' K and V rows");
  const int c_piece = lane % PR, c_kv = (lane / PR) % 2, c_tok = RI == 1 ? 0 : lane / (2 * PR);
  // Row 8 c_kv + c_tok + j of a stage; its parity is that of c_tok + j (j steps by RI).
  T* const copy_stage = reinterpret_cast<T*>(dense_mma_smem) + warp * NS * SS + (8 * c_kv + c_tok) * RS;
  const int piece_even = 8 * (c_piece ^ (4 * (c_tok & 1))), piece_odd = 8 * (c_piece ^ (4 * ((c_tok + 1) & 1)));
  // L2 policies: K and V are read once per step (evict first), the logits are read by the selection
  // right after this pass (evict last). Measured on the H100 at Llama 128K x 8: the layer 1.496 ->
  // 1.482 ms, the filter layer's extra 0.183 -> 0.172.
  const unsigned long long read_once = vendor::l2_evict_first_policy(), read_next = vendor::l2_evict_last_policy();
  auto issue = [&](int tb, int st) {  // rows past t1 copy a valid row (t0), masked later
    T* dst = copy_stage + st * SS;
#pragma unroll
    for (int j = 0; j < 8; j += RI) {
      const int row = tb + j + c_tok < t1 ? tb + j + c_tok : t0;
      vendor::cp_async16_hint(dst + j * RS + (j % 2 == 0 ? piece_even : piece_odd),
                              base + std::int64_t(row) * ld + (c_kv * p.n_kv_heads + h) * D + 8 * c_piece, read_once);
    }
  };
  const bool pair_store = p.ld_logits % 2 == 0 && reinterpret_cast<std::uintptr_t>(p.logits) % 4 == 0;  // f16 logit pairs
#pragma unroll
  for (int k = 0; k < NS - 1; ++k) {  // the first NS - 1 stages in flight
    if (t0 + 8 * warp + 64 * k < t1) issue(t0 + 8 * warp + 64 * k, k);
    vendor::cp_async_commit();
  }

  int st = 0;
  for (int tb = t0 + 8 * warp; tb < t1; tb += 64, st = st == NS - 1 ? 0 : st + 1) {  // warp-uniform bound
    const T* sk = my_stage + st * SS;
    vendor::warp_sync();  // every lane is done reading the stage the next copies overwrite
    if (tb + 64 * (NS - 1) < t1) issue(tb + 64 * (NS - 1), st == 0 ? NS - 1 : st - 1);
    vendor::cp_async_commit();
    vendor::cp_async_wait<NS - 1>();  // this lane's copies of this stage have landed
    vendor::warp_sync();              // and the other lanes'
    Chunk kc[NC];
#pragma unroll
    for (int i = 0; i < NC; ++i) kc[i].v = *reinterpret_cast<const uint4*>(sk + chunk_at(i));
    // Two accumulators, slice parity alternating (and the split's error part in the second), halve
    // the chain of dependent products per step.
    float sacc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    // k16 slice (i, hh) = chunk i's words 2hh, 2hh + 1, for Q and K alike. RoPE is applied one
    // slice at a time (4 values per chunk) to keep the temporaries small.
    auto qk = [&](int i, int hh, unsigned k0, unsigned k1, int acc) {
      const uint2 qw = reinterpret_cast<const uint2*>(my_q + CS * i)[hh];
      vendor::mma_16816<T>(sacc[acc], qw.x, 0u, qw.y, 0u, k0, k1);
    };
    auto unpack4 = [&](const Chunk& x, int hh, float* f) {
      const T* e = reinterpret_cast<const T*>(&x.w[2 * hh]);
#pragma unroll
      for (int j = 0; j < 4; ++j) f[j] = to_float(e[j]);
    };
    // Both 16-bit halves of 4 rotated values (rounded, then the rounding error) into the product.
    auto qk_split = [&](int i, int hh, const float* f) {
      unsigned hw[2], lw[2];
      mma_detail::pack4_split<T>(f, hw, lw);
      if constexpr (Split) {
        qk(i, hh, hw[0], hw[1], 0);
        qk(i, hh, lw[0], lw[1], 1);
      } else {
        qk(i, hh, hw[0], hw[1], hh);
      }
    };
    if (!rope) {
#pragma unroll
      for (int i = 0; i < NC; ++i)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) qk(i, hh, kc[i].w[2 * hh], kc[i].w[2 * hh + 1], hh);
    } else {
      const std::int64_t pos = tb + g;  // (tb + g) & 63 = 8 warp + g: this lane's small-table rows never change
      if (half) {  // chunk i (i < NC/2) and chunk i + NC/2 are partners: frequencies 8c + CS i + j
#pragma unroll
        for (int i = 0; i < NC / 2; ++i)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            float cs[4], sn[4], x1[4], x2[4];
            rope_cs<4>(p.rope, pos, 8 * c + CS * i + 4 * hh, cs, sn);
            unpack4(kc[i], hh, x1);
            unpack4(kc[i + NC / 2], hh, x2);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const float a = x1[j], bb = x2[j];
              x1[j] = a * cs[j] - bb * sn[j];
              x2[j] = bb * cs[j] + a * sn[j];
            }
            qk_split(i, hh, x1);
            qk_split(i + NC / 2, hh, x2);
          }
      } else {  // interleaved: pairs (2e, 2e + 1) of chunk i, frequencies 4c + (CS / 2) i + 2hh + e
#pragma unroll
        for (int i = 0; i < NC; ++i)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            float cs[2], sn[2], x[4];
            rope_cs<2>(p.rope, pos, 4 * c + (CS / 2) * i + 2 * hh, cs, sn);
            unpack4(kc[i], hh, x);
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float a = x[2 * e], bb = x[2 * e + 1];
              x[2 * e] = a * cs[e] - bb * sn[e];
              x[2 * e + 1] = bb * cs[e] + a * sn[e];
            }
            qk_split(i, hh, x);
          }
      }
    }
    // sacc[.][0..1]: head g, tokens tb + 2c, tb + 2c + 1 ([2..3]: padding rows).
    const bool ok0 = tb + 2 * c < t1, ok1 = tb + 2 * c + 1 < t1;
    const float s0 = ok0 ? (sacc[0][0] + sacc[1][0]) * p.scale : kNegInf,
                s1 = ok1 ? (sacc[0][1] + sacc[1][1]) * p.scale : kNegInf;
    if (Split && p.logits && g < G) {  // dispatch pairs logits with Split (their ~16 bits)
      // f16 (see DenseDecodeParams::logits): one 4-byte store per token pair where rows keep the
      // alignment (tb + 2c is even)
      vendor::f16* lg = reinterpret_cast<vendor::f16*>(p.logits) + (std::int64_t(b) * Hq + h * G + g) * p.ld_logits + tb + 2 * c;
      if (ok1 && pair_store) {
        vendor::st_u32_hint(lg, vendor::pack2_f16_satfinite(s0, s1), read_next);
      } else {
        if (ok0) lg[0] = from_float<vendor::f16>(saturate_f16(s0));
        if (ok1) lg[1] = from_float<vendor::f16>(saturate_f16(s1));
      }
    }
    float mx = fmaxf(s0, s1);
    mx = fmaxf(mx, vendor::shfl_xor<W>(mx, 1));
    mx = fmaxf(mx, vendor::shfl_xor<W>(mx, 2));
    const float mn = fmaxf(m, mx);
    const float alpha = mn == kNegInf ? 1.f : __expf(m - mn);  // m = -inf: 0 (nothing to rescale)
    const float p0 = ok0 ? __expf(s0 - mn) : 0.f, p1 = ok1 ? __expf(s1 - mn) : 0.f;
    m = mn;
    l = l * alpha + p0 + p1;
    // O^T's columns are heads 2c and 2c + 1, whose alphas live in lanes 8c and 8c + 4.
    const float a0 = vendor::shfl<W>(alpha, 8 * c), a1 = vendor::shfl<W>(alpha, 8 * c + 4);
    const unsigned pb = vendor::pack2<T>(p0, p1);  // P^T operand: tokens 2c, 2c + 1, head g
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      Chunk vc;
      vc.v = *reinterpret_cast<const uint4*>(sk + 8 * RS + chunk_at(i));
#pragma unroll
      for (int e = 0; e < 4; e += 2) {
        float(&acc)[4] = o[2 * i + e / 2];
        acc[0] *= a0;
        acc[1] *= a1;
        acc[2] *= a0;
        acc[3] *= a1;
        vendor::mma_1688<T>(acc, vendor::transpose8x8<T>(vc.w[e]), vendor::transpose8x8<T>(vc.w[e + 1]), pb);
      }
    }
  }
  vendor::cp_async_wait<0>();
  l += vendor::shfl_xor<W>(l, 1);
  l += vendor::shfl_xor<W>(l, 2);
  __syncthreads();  // every warp is done with its stages: the merge reuses the memory
  auto s_acc = reinterpret_cast<float(*)[G][D]>(dense_mma_smem);      // [NW][G][D]
  auto s_m = reinterpret_cast<float(*)[G]>(reinterpret_cast<float*>(dense_mma_smem) + NW * G * D);  // [NW][G]
  auto s_l = s_m + NW;                                                // [NW][G]
  // O^T block 2i + e/2: row j (= g) of word e maps to d = 8(j/2) + CS i + 2e + j%2 (rows 0-7), of
  // word e + 1 to the same plus 2 (rows 8-15).
#pragma unroll
  for (int i = 0; i < NC; ++i)
#pragma unroll
    for (int e = 0; e < 4; e += 2) {
      const int dx = 8 * (g / 2) + CS * i + 2 * e + g % 2, dy = dx + 2;
      const float(&acc)[4] = o[2 * i + e / 2];
      if (2 * c < G) {
        s_acc[warp][2 * c][dx] = acc[0];
        s_acc[warp][2 * c][dy] = acc[2];
      }
      if (2 * c + 1 < G) {
        s_acc[warp][2 * c + 1][dx] = acc[1];
        s_acc[warp][2 * c + 1][dy] = acc[3];
      }
    }
  if (c == 0 && g < G) {
    s_m[warp][g] = m;
    s_l[warp][g] = l;
  }
  __syncthreads();
  write_dense_partial<T, D, G, NW, NT>(p, b, h, split, s_acc, s_m, s_l);
}

}  // namespace deltakv::gpu::decode
