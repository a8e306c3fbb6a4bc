#pragma once
// The second (and last) place that names a GPU vendor's API, for what the fused decode path needs
// beyond vendor.hpp: a 16x16x16 tensor-core tile product, events for timing and stream capture
// into graphs.
//
// Tile product (mma16): C[16x16] (f32) += A[16x16] (16-bit, row-major) * B[16x16] (16-bit,
// column-major, i.e. B[k][n] at b[n * ldb + k]), all in shared memory, computed by one warp.
// CUDA: nvcuda::wmma (tensor cores, sm_80+). HIP: Debian's HIP has no rocWMMA, so the same
// contract is met by a plain per-lane loop: correct on any wavefront size, not fast (the MFMA
// path is future work and is said so in the README's support table).
#include "vendor.hpp"

#if defined(__CUDACC__) && !defined(__HIPCC__)
#include <cublas_v2.h>
#include <mma.h>
#endif

// Launch bounds with a minimum of resident blocks per multiprocessor (CUDA's second argument;
// HIP's second argument means something else, so it is left out there).
#if defined(__HIPCC__)
#define DELTAKV_LAUNCH_BOUNDS_MIN(threads, blocks) __launch_bounds__(threads)
#else
#define DELTAKV_LAUNCH_BOUNDS_MIN(threads, blocks) __launch_bounds__(threads, blocks)
#endif

namespace deltakv::gpu::vendor {

// Whether mma16 runs on tensor cores (CUDA) or is the per-lane fallback (HIP): callers choose a
// tiled tensor-core kernel only where it is one.
#if defined(__CUDACC__) && !defined(__HIPCC__)
inline constexpr bool kTensorTiles = true;
DELTAKV_GPU_D void warp_sync() { __syncwarp(); }  // lanes of a warp exchange through shared memory
#else
inline constexpr bool kTensorTiles = false;
DELTAKV_GPU_D void warp_sync() { __builtin_amdgcn_wave_barrier(); }
#endif

#if defined(__CUDACC__) && !defined(__HIPCC__)
template <class T>
struct mma16 {
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, f16>, "tensor-core tiles take bf16 or f16");
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c;
  DELTAKV_GPU_D void zero() { nvcuda::wmma::fill_fragment(c, 0.0f); }
  // lda / ldb in elements, multiples of 8; pointers 32-byte aligned.
  DELTAKV_GPU_D void mac(const T* a, int lda, const T* b, int ldb) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major> fa;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major> fb;
    nvcuda::wmma::load_matrix_sync(fa, a, lda);
    nvcuda::wmma::load_matrix_sync(fb, b, ldb);
    nvcuda::wmma::mma_sync(c, fa, fb, c);
  }
  // this += A0 B and other += A1 B, loading B once (two independent accumulation chains).
  DELTAKV_GPU_D void mac_pair(mma16& other, const T* a0, const T* a1, int lda, const T* b, int ldb) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major> fa0, fa1;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major> fb;
    nvcuda::wmma::load_matrix_sync(fb, b, ldb);
    nvcuda::wmma::load_matrix_sync(fa0, a0, lda);
    nvcuda::wmma::load_matrix_sync(fa1, a1, lda);
    nvcuda::wmma::mma_sync(c, fa0, fb, c);
    nvcuda::wmma::mma_sync(other.c, fa1, fb, other.c);
  }
  // 2 x 2 block: this += A0 B0, c01 += A0 B1, c10 += A1 B0, c11 += A1 B1; each fragment loaded once.
  DELTAKV_GPU_D void mac_2x2(mma16& c01, mma16& c10, mma16& c11, const T* a0, const T* a1, int lda, const T* b0,
                             const T* b1, int ldb) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major> fa0, fa1;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major> fb0, fb1;
    nvcuda::wmma::load_matrix_sync(fa0, a0, lda);
    nvcuda::wmma::load_matrix_sync(fa1, a1, lda);
    nvcuda::wmma::load_matrix_sync(fb0, b0, ldb);
    nvcuda::wmma::load_matrix_sync(fb1, b1, ldb);
    nvcuda::wmma::mma_sync(c, fa0, fb0, c);
    nvcuda::wmma::mma_sync(c01.c, fa0, fb1, c01.c);
    nvcuda::wmma::mma_sync(c10.c, fa1, fb0, c10.c);
    nvcuda::wmma::mma_sync(c11.c, fa1, fb1, c11.c);
  }
  DELTAKV_GPU_D void add(const mma16& o) {  // same fragment layout: elementwise
    for (int i = 0; i < c.num_elements; ++i) c.x[i] += o.c.x[i];
  }
  // C row-major at out (ldo in floats, a multiple of 4; 32-byte aligned).
  DELTAKV_GPU_D void store(float* out, int ldo) const {
    nvcuda::wmma::store_matrix_sync(out, c, ldo, nvcuda::wmma::mem_row_major);
  }
};
#else
template <class T>
struct mma16 {  // lane-parallel fallback: each lane owns 256 / warp-size entries of C
  static constexpr int kPer = 256 / kWarpSize;
  float c[kPer];
  DELTAKV_GPU_D void zero() {
    for (int e = 0; e < kPer; ++e) c[e] = 0.f;
  }
  DELTAKV_GPU_D void mac(const T* a, int lda, const T* b, int ldb) {
    const int lane = threadIdx.x % kWarpSize;
    for (int e = 0; e < kPer; ++e) {
      const int idx = lane * kPer + e, r = idx / 16, n = idx % 16;
      float s = c[e];
      for (int k = 0; k < 16; ++k) s += to_float(a[r * lda + k]) * to_float(b[n * ldb + k]);
      c[e] = s;
    }
  }
  DELTAKV_GPU_D void mac_pair(mma16& other, const T* a0, const T* a1, int lda, const T* b, int ldb) {
    mac(a0, lda, b, ldb);
    other.mac(a1, lda, b, ldb);
  }
  DELTAKV_GPU_D void add(const mma16& o) {
    for (int e = 0; e < kPer; ++e) c[e] += o.c[e];
  }
  DELTAKV_GPU_D void mac_2x2(mma16& c01, mma16& c10, mma16& c11, const T* a0, const T* a1, int lda, const T* b0,
                             const T* b1, int ldb) {
    mac(a0, lda, b0, ldb);
    c01.mac(a0, lda, b1, ldb);
    c10.mac(a1, lda, b0, ldb);
    c11.mac(a1, lda, b1, ldb);
  }
  DELTAKV_GPU_D void store(float* out, int ldo) const {
    const int lane = threadIdx.x % kWarpSize;
    for (int e = 0; e < kPer; ++e) {
      const int idx = lane * kPer + e;
      out[(idx / 16) * ldo + idx % 16] = c[e];
    }
  }
};
#endif

// A float for an f16 store: beyond +-65504 it would round to infinity, so it saturates there; NaN
// stays NaN (both comparisons fail, where fminf / fmaxf would drop it).
DELTAKV_GPU_D float saturate_f16(float x) { return x > 65504.f ? 65504.f : (x < -65504.f ? -65504.f : x); }

// ---- register-fragment tensor-core products (dense_mma.cuh; the fused sparse kernel) ---------
// PTX mma.sync on 16-bit T (bf16 or f16), f32 accumulators, operands in registers in PTX's
// fragment layouts (g = lane / 4, c = lane % 4; each unsigned holds two T, the lower column first):
//   m16n8k16: A regs {(g, 2c..2c+1), (g+8, 2c..), (g, 2c+8..), (g+8, 2c+8..)}, B regs {(k 2c.., n g),
//             (k 2c+8.., n g)}, C {(g, 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1)}
//   m16n8k8:  A regs {(g, 2c..), (g+8, 2c..)}, B reg (k 2c.., n g), C as above
// transpose8x8: an 8x8 16-bit matrix held one unsigned per lane as (row g, cols 2c..2c+1) comes
// back transposed in the same layout. CUDA only: kTensorTiles says whether they exist; on HIP they
// fail to instantiate, and the callers are only instantiated behind kTensorTiles.
#if defined(__CUDACC__) && !defined(__HIPCC__)
// The 32-bit shared-memory address (the .shared state space) of a generic pointer into shared
// memory: the operand form of ldmatrix, cp.async, mbarrier, bulk copies and mapa.
DELTAKV_GPU_D unsigned smem_u32(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
template <class T>
DELTAKV_GPU_D unsigned pack2(float lo, float hi) {  // round to nearest even
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, f16>, "pack2: bf16 or f16");
  if constexpr (std::is_same_v<T, bf16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&v);
  }
}
template <class T>
DELTAKV_GPU_D void mma_16816(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  if constexpr (std::is_same_v<T, bf16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, f16>, "mma_16816: bf16 or f16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}
template <class T>
DELTAKV_GPU_D void mma_1688(float (&d)[4], unsigned a0, unsigned a1, unsigned b) {
  if constexpr (std::is_same_v<T, bf16>) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(b));
  } else {
    static_assert(std::is_same_v<T, f16>, "mma_1688: bf16 or f16");
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(b));
  }
}
template <class T>
DELTAKV_GPU_D unsigned transpose8x8(unsigned x) {
  unsigned y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}
// Four 8x8 16-bit matrices from shared memory (ldmatrix .x4): lane l gives the address of row l % 8
// of matrix l / 8 (16 contiguous bytes, 16-byte aligned); r[i] is matrix i in the (row g, cols
// 2c..2c+1) layout, or with Trans its transpose, (rows 2c..2c+1, col g): an m16n8k16 B fragment
// from a row-major [k][n] tile.
template <bool Trans = false>
DELTAKV_GPU_D void ldmatrix_x4(unsigned (&r)[4], const void* smem_row) {
  const unsigned a = smem_u32(smem_row);
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
// Asynchronous 16-byte global -> shared copies (cp.async, L1 bypassed), in groups: commit closes
// a group, wait<N> returns once at most N of this thread's groups are still in flight.
DELTAKV_GPU_D void cp_async16(void* smem, const void* gmem) {
  const unsigned s = smem_u32(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
// L2 cache policies (createpolicy) for the hinted copy and store below: evict first for data read
// once (a dense pass's K and V), evict last for what the next kernel reads (the filter's logits).
DELTAKV_GPU_D unsigned long long l2_evict_first_policy() {
  unsigned long long pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}
DELTAKV_GPU_D unsigned long long l2_evict_last_policy() {
  unsigned long long pol;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}
DELTAKV_GPU_D void cp_async16_hint(void* smem, const void* gmem, unsigned long long pol) {
  const unsigned s = smem_u32(smem);
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "l"(pol) : "memory");
}
DELTAKV_GPU_D void st_u32_hint(void* gmem, unsigned v, unsigned long long pol) {
  asm volatile("st.global.L2::cache_hint.b32 [%0], %1, %2;\n" ::"l"(gmem), "r"(v), "l"(pol) : "memory");
}
// Two floats as f16 (lo in the low half), rounded to nearest even, saturated to +-65504 (satfinite:
// no infinity; NaN stays NaN), in one conversion.
DELTAKV_GPU_D unsigned pack2_f16_satfinite(float lo, float hi) {
  unsigned d;
  asm("cvt.rn.satfinite.f16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}
DELTAKV_GPU_D void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
DELTAKV_GPU_D void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#else
// Synchronous stand-ins with the same meaning.
DELTAKV_GPU_D void cp_async16(void* smem, const void* gmem) {
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
}
DELTAKV_GPU_D unsigned long long l2_evict_first_policy() { return 0; }
DELTAKV_GPU_D unsigned long long l2_evict_last_policy() { return 0; }
DELTAKV_GPU_D void cp_async16_hint(void* smem, const void* gmem, unsigned long long) { cp_async16(smem, gmem); }
DELTAKV_GPU_D void st_u32_hint(void* gmem, unsigned v, unsigned long long) { *reinterpret_cast<unsigned*>(gmem) = v; }
DELTAKV_GPU_D unsigned pack2_f16_satfinite(float lo, float hi) {
  const f16 h[2] = {from_float<f16>(saturate_f16(lo)), from_float<f16>(saturate_f16(hi))};
  unsigned d;
  __builtin_memcpy(&d, h, sizeof d);
  return d;
}
DELTAKV_GPU_D void cp_async_commit() {}
template <int N>
DELTAKV_GPU_D void cp_async_wait() {}
template <class T>
inline constexpr bool kNoRegisterMma = false;  // dependent false: an error only where instantiated
template <class T>
DELTAKV_GPU_D unsigned pack2(float, float) {
  static_assert(kNoRegisterMma<T>, "register-fragment mma is CUDA only (vendor::kTensorTiles)");
  return 0;
}
template <class T>
DELTAKV_GPU_D void mma_16816(float (&)[4], unsigned, unsigned, unsigned, unsigned, unsigned, unsigned) {
  static_assert(kNoRegisterMma<T>, "register-fragment mma is CUDA only (vendor::kTensorTiles)");
}
template <class T>
DELTAKV_GPU_D void mma_1688(float (&)[4], unsigned, unsigned, unsigned) {
  static_assert(kNoRegisterMma<T>, "register-fragment mma is CUDA only (vendor::kTensorTiles)");
}
template <class T>
DELTAKV_GPU_D unsigned transpose8x8(unsigned) {
  static_assert(kNoRegisterMma<T>, "register-fragment mma is CUDA only (vendor::kTensorTiles)");
  return 0;
}
template <bool Trans = false>
DELTAKV_GPU_D void ldmatrix_x4(unsigned (&)[4], const void*) {
  static_assert(kNoRegisterMma<std::integral_constant<bool, Trans>>, "ldmatrix is CUDA only (vendor::kTensorTiles)");
}
#endif

// ---- thread-block clusters (sm_90: the OmniKV selection's one-launch path) -------------------
// A cluster's blocks run at once on one GPC and read each other's shared memory. kClusters says
// whether the API exists (CUDA); cluster_launch_ok(kernel) whether this device and this binary's
// code of `kernel` have them (sm_90+ code: an sm_80 build running on an H100 has not). The device
// functions trap where the code was compiled for an older architecture (never launched there).
// HIP has no clusters: the stubs trap, and the callers are only instantiated behind kClusters.
#if defined(__CUDACC__) && !defined(__HIPCC__)
inline constexpr bool kClusters = true;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define DELTAKV_NO_CLUSTER_CODE 1
#endif
// Every thread of every block of the cluster: the blocks' earlier shared-memory writes are
// visible to the others' later reads.
DELTAKV_GPU_D void cluster_sync() {
#ifdef DELTAKV_NO_CLUSTER_CODE
  __trap();
#else
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}
// The shared::cluster address of `p` (this block's shared memory) in the copy of block `rank`.
DELTAKV_GPU_D unsigned cluster_address(const void* p, unsigned rank) {
#ifdef DELTAKV_NO_CLUSTER_CODE
  (void)p;
  (void)rank;
  __trap();
  return 0u;
#else
  const auto local = smem_u32(p);
  unsigned remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  return remote;
#endif
}
// The 32-bit value at `p` (this block's shared memory) in the copy of block `rank` of the cluster.
DELTAKV_GPU_D int cluster_load(const int* p, unsigned rank) {
  const unsigned remote = cluster_address(p, rank);
  int v = 0;
#ifndef DELTAKV_NO_CLUSTER_CODE
  asm volatile("ld.shared::cluster.s32 %0, [%1];" : "=r"(v) : "r"(remote) : "memory");
#endif
  return v;
}
// 16 bytes at `p` (this block's shared memory, 16-byte aligned) in the copy of block `rank`.
DELTAKV_GPU_D uint4 cluster_load16(const void* p, unsigned rank) {
  const unsigned remote = cluster_address(p, rank);
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
#ifndef DELTAKV_NO_CLUSTER_CODE
  asm volatile("ld.shared::cluster.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(remote)
               : "memory");
#else
  (void)remote;
#endif
  return v;
}
// This block's rank in its cluster.
DELTAKV_GPU_D unsigned cluster_rank() {
#ifdef DELTAKV_NO_CLUSTER_CODE
  __trap();
  return 0u;
#else
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
#endif
}
// Bulk copies (TMA, sm_90): one thread copies `bytes` (a multiple of 16, both ends 16-byte
// aligned) from global to this block's shared memory; completion is counted on an mbarrier in
// shared memory: mbar_init once (one arrival per phase), then per phase mbar_expect_tx (the
// arrival, with the bytes to come) and the copies by the same thread, mbar_wait(parity) by the
// readers. Used by the benches' read-ceiling probes (bench/gpu/read_probes.cuh); sm_90 code only
// (traps elsewhere).
DELTAKV_GPU_D void mbar_init(unsigned long long* bar) {
#ifdef DELTAKV_NO_CLUSTER_CODE
  (void)bar;
  __trap();
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n\tfence.mbarrier_init.release.cluster;" ::"r"(smem_u32(bar)) : "memory");
#endif
}
DELTAKV_GPU_D void mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
#ifdef DELTAKV_NO_CLUSTER_CODE
  (void)bar;
  (void)bytes;
  __trap();
#else
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
#endif
}
DELTAKV_GPU_D void bulk_copy_g2s(void* smem, const void* gmem, unsigned bytes, unsigned long long* bar) {
#ifdef DELTAKV_NO_CLUSTER_CODE
  (void)smem;
  (void)gmem;
  (void)bytes;
  (void)bar;
  __trap();
#else
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_u32(smem)),
               "l"(gmem), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
#endif
}
DELTAKV_GPU_D void mbar_wait(unsigned long long* bar, unsigned parity) {
#ifdef DELTAKV_NO_CLUSTER_CODE
  (void)bar;
  (void)parity;
  __trap();
#else
  asm volatile("{\n\t.reg .pred q;\nDK_MBAR_WAIT_%=:\n\tmbarrier.try_wait.parity.shared::cta.b64 q, [%0], %1;\n\t@!q bra DK_MBAR_WAIT_%=;\n}" ::"r"(
                   smem_u32(bar)),
               "r"(parity)
               : "memory");
#endif
}
#undef DELTAKV_NO_CLUSTER_CODE
// Lanes of the warp holding the same value as this one (a bit per lane): aggregated atomics.
template <int W>
DELTAKV_GPU_D lane_mask_t<W> match_any(unsigned v) {
  return __match_any_sync(full_lane_mask<W>(), v);
}
template <class Kernel>
inline bool cluster_launch_ok(Kernel kernel, int device) {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrClusterLaunch, device) != cudaSuccess || v == 0) return false;
  cudaFuncAttributes a{};
  check(cudaFuncGetAttributes(&a, kernel), "cudaFuncGetAttributes");
  return a.binaryVersion >= 90;
}
// A launch configuration in clusters of cluster_x blocks along x (cfg.attrs points into this
// object, so it is used where it is built, never copied).
struct ClusterLaunchConfig {
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute at[1]{};
  ClusterLaunchConfig(dim3 grid, dim3 block, std::size_t smem, stream_t s, unsigned cluster_x) {
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    at[0].id = cudaLaunchAttributeClusterDimension;
    at[0].val.clusterDim.x = cluster_x;
    at[0].val.clusterDim.y = 1;
    at[0].val.clusterDim.z = 1;
    cfg.attrs = at;
    cfg.numAttrs = 1;
  }
  ClusterLaunchConfig(const ClusterLaunchConfig&) = delete;
  ClusterLaunchConfig& operator=(const ClusterLaunchConfig&) = delete;
};
// How many clusters of cluster_x blocks (block threads, smem dynamic bytes each) can run at once
// on this device (0: none, e.g. a non-portable size the device does not offer).
template <class Kernel>
inline int max_active_clusters(Kernel kernel, int block, std::size_t smem, unsigned cluster_x) {
  if (cluster_x > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  const ClusterLaunchConfig c(dim3(cluster_x), dim3(unsigned(block)), smem, nullptr, cluster_x);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &c.cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}
// Launches kernel(args...) on grid in clusters of cluster_x blocks along x (gridDim.x a multiple of it).
template <class... Params, class... Args>
inline void launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, stream_t s,
                           unsigned cluster_x, Args... args) {
  if (cluster_x > 8) check(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1), "cudaFuncSetAttribute");
  const ClusterLaunchConfig c(grid, block, smem, s, cluster_x);
  check(cudaLaunchKernelEx(&c.cfg, kernel, static_cast<Params>(args)...), "cudaLaunchKernelEx (cluster)");
}
#else
inline constexpr bool kClusters = false;
DELTAKV_GPU_D void cluster_sync() { __builtin_trap(); }
DELTAKV_GPU_D int cluster_load(const int*, unsigned) {
  __builtin_trap();
  return 0;
}
DELTAKV_GPU_D uint4 cluster_load16(const void*, unsigned) {
  __builtin_trap();
  return make_uint4(0u, 0u, 0u, 0u);
}
DELTAKV_GPU_D unsigned cluster_rank() {
  __builtin_trap();
  return 0u;
}
// No bulk-copy engine here either (the benches launch their bulk probes only where cluster_launch_ok).
DELTAKV_GPU_D void mbar_init(unsigned long long*) { __builtin_trap(); }
DELTAKV_GPU_D void mbar_expect_tx(unsigned long long*, unsigned) { __builtin_trap(); }
DELTAKV_GPU_D void bulk_copy_g2s(void*, const void*, unsigned, unsigned long long*) { __builtin_trap(); }
DELTAKV_GPU_D void mbar_wait(unsigned long long*, unsigned) { __builtin_trap(); }
template <int W>
DELTAKV_GPU_D lane_mask_t<W> match_any(unsigned) {  // no match instruction: each lane alone (still correct)
  return lane_mask_t<W>(1) << (threadIdx.x % W);
}
template <class Kernel>
inline bool cluster_launch_ok(Kernel, int) {
  return false;
}
template <class Kernel>
inline int max_active_clusters(Kernel, int, std::size_t, unsigned) {
  return 0;
}
template <class... Params, class... Args>
inline void launch_cluster(void (*)(Params...), dim3, dim3, std::size_t, stream_t, unsigned, Args...) {
  raise(hipErrorNotSupported, "launch_cluster: HIP has no thread-block clusters");
}
#endif

// ---- events and graphs (benchmarks and engines that replay a decode step) -------------------
#if defined(__HIPCC__)
using event_t = hipEvent_t;
using graph_exec_t = hipGraphExec_t;
inline event_t event_create() {
  event_t e;
  check(hipEventCreate(&e), "hipEventCreate");
  return e;
}
inline void event_destroy(event_t e) noexcept { (void)hipEventDestroy(e); }
inline void event_record(event_t e, stream_t s) { check(hipEventRecord(e, s), "hipEventRecord"); }
inline void event_sync(event_t e) { check(hipEventSynchronize(e), "hipEventSynchronize"); }
inline float event_ms(event_t a, event_t b) {
  float ms = 0;
  check(hipEventSynchronize(b), "hipEventSynchronize");
  check(hipEventElapsedTime(&ms, a, b), "hipEventElapsedTime");
  return ms;
}
inline void capture_begin(stream_t s) { check(hipStreamBeginCapture(s, hipStreamCaptureModeThreadLocal), "hipStreamBeginCapture"); }
inline graph_exec_t capture_end(stream_t s) {
  hipGraph_t g;
  check(hipStreamEndCapture(s, &g), "hipStreamEndCapture");
  graph_exec_t x;
  check(hipGraphInstantiate(&x, g, nullptr, nullptr, 0), "hipGraphInstantiate");
  (void)hipGraphDestroy(g);
  return x;
}
inline void graph_launch(graph_exec_t x, stream_t s) { check(hipGraphLaunch(x, s), "hipGraphLaunch"); }
// Largest dynamic shared memory one block may ask for on this device.
inline int max_smem_per_block(int device) {
  int v = 0;
  check(hipDeviceGetAttribute(&v, hipDeviceAttributeMaxSharedMemoryPerBlock, device), "hipDeviceGetAttribute");
  return v;
}
inline void graph_destroy(graph_exec_t x) noexcept { (void)hipGraphExecDestroy(x); }
inline void memcpy_d2d_async(void* dst, const void* src, std::size_t bytes, stream_t s) {
  check(hipMemcpyAsync(dst, src, bytes, hipMemcpyDeviceToDevice, s), "hipMemcpyAsync");
}
#else
using event_t = cudaEvent_t;
using graph_exec_t = cudaGraphExec_t;
inline event_t event_create() {
  event_t e;
  check(cudaEventCreate(&e), "cudaEventCreate");
  return e;
}
inline void event_destroy(event_t e) noexcept { (void)cudaEventDestroy(e); }
inline void event_record(event_t e, stream_t s) { check(cudaEventRecord(e, s), "cudaEventRecord"); }
inline void event_sync(event_t e) { check(cudaEventSynchronize(e), "cudaEventSynchronize"); }
inline float event_ms(event_t a, event_t b) {
  float ms = 0;
  check(cudaEventSynchronize(b), "cudaEventSynchronize");
  check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
  return ms;
}
inline void capture_begin(stream_t s) { check(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture"); }
inline graph_exec_t capture_end(stream_t s) {
  cudaGraph_t g;
  check(cudaStreamEndCapture(s, &g), "cudaStreamEndCapture");
  graph_exec_t x;
  check(cudaGraphInstantiate(&x, g, 0), "cudaGraphInstantiate");
  (void)cudaGraphDestroy(g);
  return x;
}
inline void graph_launch(graph_exec_t x, stream_t s) { check(cudaGraphLaunch(x, s), "cudaGraphLaunch"); }
// Largest dynamic shared memory one block may opt in to on this device (227 KB on H100, 163 KB on A100).
inline int max_smem_per_block(int device) {
  int v = 0;
  check(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  return v;
}
inline void graph_destroy(graph_exec_t x) noexcept { (void)cudaGraphExecDestroy(x); }
inline void memcpy_d2d_async(void* dst, const void* src, std::size_t bytes, stream_t s) {
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s), "cudaMemcpyAsync");
}
#endif

// ---- the vendor's GEMM (GpuDevice::linear and ref_search on 16-bit storage) ------------------
// y[n, out] = x[n, in] W^T with W [out, in] row-major (rows ldw apart), 16-bit inputs, f32
// accumulation, output T or f32, on a handle bound to one stream and to a workspace the caller
// owns (so that no call allocates and the calls can be captured in a graph). Math mode: the
// default with CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION, so that split-K partial sums are
// reduced in f32, not in T, whatever kernel cuBLAS picks for a shape (the f32 accumulation this
// header promises; prefill timing unchanged on the H100, docs/BENCHMARKS.md eighteenth section).
// CUDA: cuBLAS, part of the toolkit: prefill's
// encode is big GEMMs (4096 x 6144 x 2048 at Llama's shape), where cuBLAS runs near the device's
// tensor-core rate and our own tile kernel (linear_mma_kernel) at about a fifth of it. HIP: none
// (kHasBlas false; the caller keeps its own kernels).
inline constexpr std::int64_t kBlasMaxInt = 0x7fffffff;  // the vendor GEMM takes int sizes and strides
#if defined(__CUDACC__) && !defined(__HIPCC__)
inline constexpr bool kHasBlas = true;
using blas_t = cublasHandle_t;
inline void blas_check(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return;
  const std::string msg = std::string(what) + ": " + cublasGetStatusString(st);
  if (st == CUBLAS_STATUS_ALLOC_FAILED) throw CapacityError(msg);
  throw ConfigError(msg);
}
inline blas_t blas_create(stream_t s, void* workspace, std::size_t bytes) {
  cublasHandle_t h = nullptr;
  blas_check(cublasCreate(&h), "cublasCreate");
  try {
    blas_check(cublasSetStream(h, s), "cublasSetStream");
    blas_check(cublasSetWorkspace(h, workspace, bytes), "cublasSetWorkspace");
    blas_check(cublasSetMathMode(h, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
               "cublasSetMathMode");
  } catch (...) {
    (void)cublasDestroy(h);
    throw;
  }
  return h;
}
inline void blas_destroy(blas_t h) noexcept {
  if (h) (void)cublasDestroy(h);
}
// Y = T (rounded once) or float (the f32 sums: ref_search's scores); w's rows ldw apart.
template <class T, class Y>
void gemm_x_wt(blas_t h, std::int64_t n, int out, int in, const T* x, std::int64_t ldx, const T* w, std::int64_t ldw, Y* y,
               std::int64_t ldy) {
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, f16>, "gemm_x_wt: 16-bit storage");
  static_assert(std::is_same_v<Y, T> || std::is_same_v<Y, float>, "gemm_x_wt: output T or f32");
  constexpr cudaDataType_t ty = std::is_same_v<T, bf16> ? CUDA_R_16BF : CUDA_R_16F;
  constexpr cudaDataType_t tout = std::is_same_v<Y, float> ? CUDA_R_32F : ty;
  const float alpha = 1.f, beta = 0.f;
  // Column-major view: y^T [out x n] = W [out x in] (W's rows are the stored [in x out] transposed) x^T [in x n].
  // An `out` that is not a multiple of 8 sent cuBLAS 13 to a Turing-era split-K kernel at 80-210
  // TFLOP/s on the H100 (the search's score GEMMs, 2048 rows x 919..3277 references x 2048), where
  // the multiple of 8 below it ran at 500-660: so the first out / 8 * 8 outputs, then the rest.
  const int head = out > 8 ? out / 8 * 8 : out;
  for (int o0 = 0; o0 < out; o0 += head) {
    const int m = o0 == 0 ? head : out - head;
    blas_check(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, int(n), in, &alpha, w + std::int64_t(o0) * ldw, ty, int(ldw), x, ty,
                            int(ldx), &beta, y + o0, tout, int(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx");
  }
}
#else
inline constexpr bool kHasBlas = false;
using blas_t = void*;
inline blas_t blas_create(stream_t, void*, std::size_t) { return nullptr; }
inline void blas_destroy(blas_t) noexcept {}
template <class T, class Y>
void gemm_x_wt(blas_t, std::int64_t, int, int, const T*, std::int64_t, const T*, std::int64_t, Y*, std::int64_t) {
  throw ConfigError("gemm_x_wt: no vendor GEMM in this build (HIP)");
}
#endif

}  // namespace deltakv::gpu::vendor
