#pragma once
// Sparse decode attention over one compressed layer in two passes: the same result as
// sparse_decode_kernel (decode_kernels.cuh), with the work cut so that each block is small:
//
//   sparse_scores_kernel   grid (tiles of 64 attended items, Hkv, B). Rebuilds the tile's keys on
//                          chip: dequantize Z, K = Z W_k,h^T on tensor cores with W_k,h streamed
//                          through shared memory 64 latent columns at a time, + mean of the
//                          references (or the exact row) + bias, RoPE; writes the G heads' logits
//                          to a scratch row per (sequence, q head). Keys never leave the chip.
//   sparse_values_kernel   grid (splits, Hkv, B). Softmax statistics of its split's logits, then
//                          acc_z = sum p z and acc_v = sum p (reference-mean V or exact V), and the
//                          split's partial acc_v + W_v,h acc_z + mass b_v for combine_kernel.
//
// Why: the fused kernel keeps W_k,h (128 KiB at d 128, d_c 512) in shared memory, so one block
// runs per multiprocessor and its phases run one after another; here a scores block needs ~110 KB
// and a values block ~50 KB, so two or more run per multiprocessor and hide each other's latency.
// Launch shapes and checks: sparse_partials_two_pass (decode_step.hpp). Parameters: decode_params.hpp.
#include "decode_kernels.cuh"

namespace deltakv::gpu::decode {

inline constexpr int kTwoPassTile = 64;      // attended items per scores block
inline constexpr int kTwoPassThreads = 256;
inline constexpr int kTwoPassChunk = 64;     // latent columns of W_k,h per shared-memory chunk
inline constexpr int kTwoPassMaxLatent = 1024;  // values pass: two column pairs per thread at most

// The stored bits of latent columns c, c + 1 (c even): 4 bytes (raw 16-bit values), 2 (int8) or
// the byte holding both nibbles (int4, low nibble first), loaded ahead of their use.
template <class T>
DELTAKV_GPU_D unsigned latent_raw(const std::uint8_t* row, int bits, int c) {
  if (bits == 0) return *reinterpret_cast<const unsigned*>(row + std::size_t(c) * sizeof(T));
  if (bits == 8) return *reinterpret_cast<const unsigned short*>(row + c);
  return row[c / 2];
}

// Those two values, dequantized and rounded to T like the fused kernel's shared Z tile, as f32.
template <class T>
DELTAKV_GPU_D void latent_pair(unsigned raw, int bits, float sc, float mn, float& z0, float& z1) {
  if (bits == 0) {
    const T* e = reinterpret_cast<const T*>(&raw);
    z0 = to_float(e[0]);
    z1 = to_float(e[1]);
    return;
  }
  const unsigned q0 = bits == 4 ? (raw & 0xFu) : (raw & 0xFFu), q1 = bits == 4 ? (raw >> 4) & 0xFu : (raw >> 8) & 0xFFu;
  z0 = to_float(from_float<T>(vendor::add_rn(vendor::mul_rn(float(q0), sc), mn)));
  z1 = to_float(from_float<T>(vendor::add_rn(vendor::mul_rn(float(q1), sc), mn)));
}

// ---- pass 1 ------------------------------------------------------------------------------------
inline std::size_t sparse_scores_smem(int head_dim, int group, int latent_dim) {
  const std::size_t TT = kTwoPassTile;
  const std::size_t zs = TT * (std::size_t(latent_dim) + 8) * 2;             // Z tile, 16-bit
  const std::size_t ws = 2 * std::size_t(head_dim) * (kTwoPassChunk + 8) * 2;  // W chunks, two buffers
  const std::size_t ks = TT * (std::size_t(head_dim) + 4) * 4;                 // K tile (f32), aliases W
  return zs + (ws > ks ? ws : ks) + std::size_t(group) * head_dim * 4  // q (scaled)
         + TT * 7 * 4 + TT * 2 * 4 + 64;                                  // rows[4], pos, lrow, nref; sc, mn
}

template <class T, int D, int G, int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS_MIN(NT, 2) sparse_scores_kernel(SparseDecodeParams<T> p) {
  constexpr int TT = kTwoPassTile, CK = kTwoPassChunk, E = D / 16;
  constexpr int WPIECES = CK / 8, WLOADS = D * WPIECES / NT;  // W chunk: 16-byte pieces per thread
  constexpr int KT = TT * 16 / NT;                              // (item, 16-lane group) tasks per thread
  constexpr int WT = 2 * 16;                                    // a warp tile: 2 x 2 tiles of 16 x 16
  constexpr int WN = D / WT, UNITS = 2 * WN;                    // warp tiles: 2 (items) x WN (dims)
  constexpr int NW = NT / W, UPW = (UNITS + NW - 1) / NW;       // warps, units per warp
  static_assert(NT == kTwoPassThreads && NT % W == 0 && WLOADS * NT == D * WPIECES && KT * NT == TT * 16,
                "sparse_scores_kernel: shape");
  static_assert(TT == 2 * WT, "two warp tiles of items per block tile");
  const auto& L = p.layer;
  const int DC = L.latent_dim, ldz = DC + 8, ldw = CK + 8, ldk = D + 4;
  const int h = blockIdx.y, b = blockIdx.z, Hkv = p.n_kv_heads, kvd = 2 * Hkv * D;
  const SeqView<T> v = seq_view(p, b);
  const int i0 = blockIdx.x * TT;
  if (i0 >= v.total) return;  // uniform over the block
  const bool half = p.style != RopeStyle::interleaved, rope = p.style != RopeStyle::none;
  const int warp = threadIdx.x / W, tid = threadIdx.x;

  DELTAKV_DYNAMIC_SMEM(unsigned char, smem_raw);
  T* s_z = reinterpret_cast<T*>(smem_raw);                                   // [TT][ldz]
  unsigned char* wk_raw = smem_raw + std::size_t(TT) * ldz * 2;
  T* s_w = reinterpret_cast<T*>(wk_raw);                                     // [2][D][ldw]
  float* s_k = reinterpret_cast<float*>(wk_raw);                             // [TT][ldk], after the product
  const std::size_t w_bytes = std::size_t(2) * D * ldw * 2, k_bytes = std::size_t(TT) * ldk * 4;
  const std::size_t wk_bytes = w_bytes > k_bytes ? w_bytes : k_bytes;
  float* s_q = reinterpret_cast<float*>(wk_raw + wk_bytes);                  // [G][D]
  std::int32_t* s_row = reinterpret_cast<std::int32_t*>(s_q + G * D);       // [TT][4]
  std::int32_t* s_pos = s_row + TT * 4;                                      // [TT]
  std::int32_t* s_lrow = s_pos + TT;                                         // [TT]
  std::int32_t* s_nref = s_lrow + TT;                                        // [TT]
  float* s_sm = reinterpret_cast<float*>(s_nref + TT);                       // [TT][2]

  // W_k,h chunk c (latent columns [c CK, c CK + CK)) into registers; columns past DC read as 0.
  uint4 wr[WLOADS];
  auto w_load = [&](int c) {
#pragma unroll
    for (int j = 0; j < WLOADS; ++j) {
      const int task = tid + j * NT, r = task / WPIECES, col = c * CK + (task % WPIECES) * 8;
      wr[j] = col < DC ? *reinterpret_cast<const uint4*>(L.w_dec + std::int64_t(h * D + r) * DC + col) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  auto w_stash = [&](int buf) {
#pragma unroll
    for (int j = 0; j < WLOADS; ++j) {
      const int task = tid + j * NT;
      *reinterpret_cast<uint4*>(s_w + (buf * D + task / WPIECES) * ldw + (task % WPIECES) * 8) = wr[j];
    }
  };
  w_load(0);  // in flight during the resolve and the dequantization

  // resolve the tile's items; q (scaled) for the G heads of kv head h
  if (tid < TT) {
    const ItemLoc it = resolve_item(p, v, b, i0 + tid);
#pragma unroll
    for (int j = 0; j < 4; ++j) s_row[tid * 4 + j] = it.rows[j];
    s_pos[tid] = it.pos;
    s_lrow[tid] = it.lrow;
    s_nref[tid] = it.nref;
    s_sm[2 * tid] = it.sc;
    s_sm[2 * tid + 1] = it.mn;
  }
  for (int i = tid; i < G * D; i += NT) s_q[i] = to_float(p.q[b * p.ldq + (h * G) * D + i]) * p.scale;
  __syncthreads();

  // dequantize Z (zeros for exact items and items past the list)
  {
    const int pieces = int(L.lat_ld / 16), tasks = TT * pieces;
    const int vals = L.latent_bits == 0 ? 8 : (L.latent_bits == 8 ? 16 : 32);  // gpu-check: allow(int4 values per 16 bytes, not lanes)
    for (int task = tid; task < tasks; task += NT) {
      const int i = task / pieces, col = (task % pieces) * vals, r = s_lrow[i];
      const uint4 raw = r >= 0 ? *reinterpret_cast<const uint4*>(v.lat + std::int64_t(r) * L.lat_ld + (task % pieces) * 16)
                               : make_uint4(0u, 0u, 0u, 0u);
      dequant16<T>(raw, L.latent_bits, r >= 0 ? s_sm[2 * i] : 0.f, r >= 0 ? s_sm[2 * i + 1] : 0.f, s_z + i * ldz + col);
    }
  }
  w_stash(0);
  __syncthreads();

  // K tile = Z W_k,h^T: unit u < UNITS is items [32 (u / WN), +32) x dims [32 (u % WN), +32); warp w
  // takes units w, w + NW, ... (one each with 8 warps of 32 lanes; two each on wave64)
  {
    vendor::mma16<T> acc[UPW][4];
#pragma unroll
    for (int q = 0; q < UPW; ++q)
#pragma unroll
      for (int t = 0; t < 4; ++t) acc[q][t].zero();
    const int chunks = (DC + CK - 1) / CK;
    for (int c = 0; c < chunks; ++c) {
      const int buf = c & 1;
      if (c + 1 < chunks) w_load(c + 1);
      const int kend = min(CK, DC - c * CK);  // a multiple of 16 (DC is)
#pragma unroll
      for (int q = 0; q < UPW; ++q) {
        const int u = warp + q * NW;
        if (u >= UNITS) continue;  // uniform over the warp
        const T* a0 = s_z + (u / WN) * WT * ldz + c * CK;
        const T* b0 = s_w + (buf * D + (u % WN) * WT) * ldw;
        for (int kk = 0; kk < kend; kk += 16)
          acc[q][0].mac_2x2(acc[q][1], acc[q][2], acc[q][3], a0 + kk, a0 + 16 * ldz + kk, ldz, b0 + kk, b0 + 16 * ldw + kk, ldw);
      }
      if (c + 1 < chunks) w_stash(buf ^ 1);
      __syncthreads();
    }
    // s_k aliases s_w: every warp is past its last product (barrier above)
#pragma unroll
    for (int q = 0; q < UPW; ++q) {
      const int u = warp + q * NW;
      if (u >= UNITS) continue;
      const int wi = (u / WN) * WT, wd = (u % WN) * WT;
      acc[q][0].store(s_k + wi * ldk + wd, ldk);
      acc[q][1].store(s_k + wi * ldk + wd + 16, ldk);
      acc[q][2].store(s_k + (wi + 16) * ldk + wd, ldk);
      acc[q][3].store(s_k + (wi + 16) * ldk + wd + 16, ldk);
    }
  }
  __syncthreads();

  // + references' mean (exact row for exact items) + bias, RoPE, logits of the G heads; a 16-lane
  // group per item, all reference loads of the thread's items issued first.
  RawHead<T, D> g[KT][4];
#pragma unroll
  for (int kt = 0; kt < KT; ++kt) {
    const int task = tid + kt * NT, i = task / 16, lane = task % 16, nref = s_nref[i];
#pragma unroll
    for (int j = 0; j < 4; ++j)
      g[kt][j] = load_head_raw<T, D>(item_row(v, j < nref ? s_row[i * 4 + j] : 1, kvd) + h * D, lane, half);
  }
  float* out = p.scores + (std::int64_t(b) * p.n_q_heads + h * G) * p.ld_scores;
#pragma unroll
  for (int kt = 0; kt < KT; ++kt) {
    const int task = tid + kt * NT, i = task / 16, lane = task % 16;
    const int pos = s_pos[i];
    float x[E];
    finish_key<T, D, false>(g[kt], s_nref[i], s_lrow[i] >= 0, pos, lane, half, rope, s_k + i * ldk, nullptr,
                     L.b_dec ? L.b_dec + h * D : nullptr, p.rope, x);
#pragma unroll
    for (int gg = 0; gg < G; ++gg) {
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) dot += s_q[gg * D + head_dim_of<D>(lane, half, e)] * x[e];
      dot = group16_sum<W>(dot);  // every lane of the warp takes part (no early exit above)
      if (lane == 0 && i0 + i < v.total) out[std::int64_t(gg) * p.ld_scores + i0 + i] = pos >= 0 ? dot : kNegInf;
    }
  }
}

// ---- pass 2 ------------------------------------------------------------------------------------
inline std::size_t sparse_values_smem(int head_dim, int group, int latent_dim) {
  const std::size_t NT = kTwoPassThreads;
  const std::size_t resolve = NT * 7 * 4 + NT * 2 * 4 + NT * std::size_t(group) * 4;  // items, sc/mn, p
  const std::size_t slots = NT / (std::size_t(head_dim) / 2);                         // V reference slots
  const std::size_t fin = std::size_t(group) * latent_dim * 4 + slots * group * head_dim * 4;
  return (resolve > fin ? resolve : fin) + std::size_t(group) * 4 * 4 + 64;  // + m, l, mass, scratch
}

template <class T, int D, int G, int W, int NT>
__global__ void DELTAKV_LAUNCH_BOUNDS_MIN(NT, 2) sparse_values_kernel(SparseDecodeParams<T> p) {
  constexpr int NW = NT / W, DP = D / 2, SLOTS = NT / DP;  // V: a dim pair and a reference slot per thread
  constexpr int CPM = kTwoPassMaxLatent / 2 / NT;           // latent column pairs per thread, at most
  static_assert(NT == kTwoPassThreads && NT % DP == 0 && SLOTS >= 1 && CPM >= 1, "sparse_values_kernel: shape");
  const auto& L = p.layer;
  const int DC = L.latent_dim;
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z, Hkv = p.n_kv_heads, kvd = 2 * Hkv * D;
  const int tid = threadIdx.x, warp = tid / W, lane_w = tid % W;
  const SeqView<T> v = seq_view(p, b);
  const int per = (v.total + p.n_splits - 1) / p.n_splits;
  const int i0 = split * per, i1 = min(v.total, i0 + per);
  const float* sc_row = p.scores + (std::int64_t(b) * p.n_q_heads + h * G) * p.ld_scores;

  DELTAKV_DYNAMIC_SMEM(unsigned char, smem_raw);
  std::int32_t* s_row = reinterpret_cast<std::int32_t*>(smem_raw);  // [NT][4]
  std::int32_t* s_lrow = s_row + NT * 4;                              // [NT]
  std::int32_t* s_nref = s_lrow + NT;                                 // [NT]
  std::int32_t* s_pos = s_nref + NT;                                  // [NT] (unused but for clarity of layout)
  float* s_sm = reinterpret_cast<float*>(s_pos + NT);                 // [NT][2]
  float* s_p = s_sm + 2 * NT;                                         // [NT][G]
  float* s_accz = reinterpret_cast<float*>(smem_raw);                 // [G][DC], after the loop (aliases)
  float* s_accv = s_accz + G * DC;                                    // [SLOTS][G][D], after the loop
  const std::size_t table_bytes = std::size_t(NT) * 7 * 4 + std::size_t(NT) * 2 * 4 + std::size_t(NT) * G * 4;
  const std::size_t acc_bytes = std::size_t(G) * DC * 4 + std::size_t(SLOTS) * G * D * 4;
  const std::size_t main_bytes = table_bytes > acc_bytes ? table_bytes : acc_bytes;
  float* s_stat = reinterpret_cast<float*>(smem_raw + main_bytes);    // [G][4]: m, l, -, mass

  // 1. the split's softmax max per head (then l and the mass in the item loop)
  for (int g = warp; g < G; g += NW) {
    float m = kNegInf;
    for (int i = i0 + lane_w; i < i1; i += W) m = fmaxf(m, sc_row[std::int64_t(g) * p.ld_scores + i]);
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) m = fmaxf(m, vendor::shfl_xor<W>(m, o));
    if (lane_w == 0) {
      s_stat[g * 4 + 0] = m;
      s_stat[g * 4 + 1] = 0.f;
      s_stat[g * 4 + 3] = 0.f;
    }
  }
  __syncthreads();
  float mg[G];
#pragma unroll
  for (int g = 0; g < G; ++g) mg[g] = s_stat[g * 4 + 0];

  float az[CPM][2][G];
#pragma unroll
  for (int cp = 0; cp < CPM; ++cp)
#pragma unroll
    for (int g = 0; g < G; ++g) az[cp][0][g] = az[cp][1][g] = 0.f;
  float av[2][G];
#pragma unroll
  for (int g = 0; g < G; ++g) av[0][g] = av[1][g] = 0.f;
  float lsum[G], mass[G];  // the resolving thread's own items
#pragma unroll
  for (int g = 0; g < G; ++g) lsum[g] = mass[g] = 0.f;
  const int dp = tid % DP, slot = tid / DP;  // V: dims 2 dp, 2 dp + 1 of reference slot `slot`

  for (int chunk = i0; chunk < i1; chunk += NT) {
    __syncthreads();  // the previous chunk is done with the shared item table
    {  // resolve: one item per thread, and its probabilities
      const int i = chunk + tid;
      const ItemLoc it = i < i1 ? resolve_item(p, v, b, i) : ItemLoc{};
#pragma unroll
      for (int j = 0; j < 4; ++j) s_row[tid * 4 + j] = it.rows[j];
      s_lrow[tid] = it.pos >= 0 ? it.lrow : -1;
      s_nref[tid] = it.pos >= 0 ? it.nref : 0;
      s_pos[tid] = it.pos;
      s_sm[2 * tid] = it.sc;
      s_sm[2 * tid + 1] = it.mn;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float s = it.pos >= 0 ? sc_row[std::int64_t(g) * p.ld_scores + i] : kNegInf;
        const float pr = (s == kNegInf || mg[g] == kNegInf) ? 0.f : expf(s - mg[g]);
        s_p[tid * G + g] = pr;
        lsum[g] += pr;
        if (it.lrow >= 0 && it.pos >= 0) mass[g] += pr;
      }
    }
    __syncthreads();
    const int n_items = min(NT, i1 - chunk);
    // U items at a time: every load of the U items (latent bits, V words) issued before any use
    constexpr int U = 8;
    for (int c0 = 0; c0 < n_items; c0 += U) {
      unsigned zr[U][CPM], vr[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int ci = c0 + u;
        const int lrow = ci < n_items ? s_lrow[ci] : -1, nref = ci < n_items ? s_nref[ci] : 0;
#pragma unroll
        for (int cp = 0; cp < CPM; ++cp) {
          const int c = 2 * (tid + cp * NT);
          zr[u][cp] = lrow >= 0 && c < DC ? latent_raw<T>(v.lat + std::int64_t(lrow) * L.lat_ld, L.latent_bits, c) : 0u;
        }
        vr[u] = slot < nref ? *reinterpret_cast<const unsigned*>(item_row(v, s_row[ci * 4 + slot], kvd) + (Hkv + h) * D + 2 * dp)
                            : 0u;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int ci = c0 + u;
        if (ci >= n_items) break;  // uniform over the block
        const int lrow = s_lrow[ci], nref = s_nref[ci];
        float pg[G];
#pragma unroll
        for (int g = 0; g < G; ++g) pg[g] = s_p[ci * G + g];
        if (lrow >= 0) {  // acc_z += p z over latent items (uniform branch)
          const float sc = s_sm[2 * ci], mn = s_sm[2 * ci + 1];
#pragma unroll
          for (int cp = 0; cp < CPM; ++cp) {
            if (2 * (tid + cp * NT) >= DC) break;
            float z0, z1;
            latent_pair<T>(zr[u][cp], L.latent_bits, sc, mn, z0, z1);
#pragma unroll
            for (int g = 0; g < G; ++g) {
              az[cp][0][g] += pg[g] * z0;
              az[cp][1][g] += pg[g] * z1;
            }
          }
        }
        if (slot < nref) {  // acc_v += p V_slot / nref (the exact V for exact items: nref 1)
          const T* e = reinterpret_cast<const T*>(&vr[u]);
          const float inv = 1.f / float(nref), v0 = to_float(e[0]) * inv, v1 = to_float(e[1]) * inv;
#pragma unroll
          for (int g = 0; g < G; ++g) {
            av[0][g] += pg[g] * v0;
            av[1][g] += pg[g] * v1;
          }
        }
      }
    }
  }
  __syncthreads();  // the item table is dead: its memory becomes s_accz / s_accv

  // 2. l and mass per head (block sums), acc_z and acc_v into shared memory
  for (int g = 0; g < G; ++g) {
    float a = lsum[g], m = mass[g];
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) {
      a += vendor::shfl_xor<W>(a, o);
      m += vendor::shfl_xor<W>(m, o);
    }
    if (lane_w == 0) {
      atomicAdd(s_stat + g * 4 + 1, a);
      atomicAdd(s_stat + g * 4 + 3, m);
    }
  }
#pragma unroll
  for (int cp = 0; cp < CPM; ++cp) {
    const int c = 2 * (tid + cp * NT);
    if (c >= DC) break;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      s_accz[g * DC + c] = az[cp][0][g];
      s_accz[g * DC + c + 1] = az[cp][1][g];
    }
  }
  if (slot < SLOTS) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      s_accv[(slot * G + g) * D + 2 * dp] = av[0][g];
      s_accv[(slot * G + g) * D + 2 * dp + 1] = av[1][g];
    }
  }
  __syncthreads();
  for (int i = tid; i < G * D; i += NT) {  // sum the reference slots into slot 0
    float a = 0.f;
    for (int s = 0; s < SLOTS; ++s) a += s_accv[s * G * D + i];
    s_accv[i] = a;
  }
  __syncthreads();

  // 3. the split's partial (mass in stat[g][3], like the fused kernel)
  write_sparse_partial<T, D, G, W, NT>(p, b, h, split, s_accz, s_accv, s_stat);
}

}  // namespace deltakv::gpu::decode
