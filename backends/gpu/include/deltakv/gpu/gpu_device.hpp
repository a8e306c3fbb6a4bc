#pragma once
// The GPU device class shared by the CUDA and HIP backends: every op of the Device concept
// (include/deltakv/device.hpp) as a kernel launch on one stream, with the CPU oracle's semantics
// (backends/cpu/.../device.hpp). The kernels live in kernels.cuh; every vendor name goes through
// vendor.hpp. The public names are deltakv::cuda::CudaDevice<T> (deltakv/cuda/device.hpp, nvcc)
// and deltakv::hip::HipDevice<T> (deltakv/hip/device.hpp, hipcc): both are this class.
//
// This class only picks launch shapes and owns a little memory:
//   - a device scratch buffer for topk (K > 4096), for reference search split across blocks and
//     for split-K partial sums of small GEMMs (at most about 2 * SMs * 64 * 64 floats).
//     It is allocated at construction with `scratch_bytes` (see scratch_bytes_for()) or grown on
//     first use; growing synchronizes the stream and allocates device memory, so pre-size it
//     where a call must not block (or be captured in a CUDA/HIP graph).
//   - one device int, one pinned host int and an event for the finite checks.
//   - with tensor cores on (16-bit T, CUDA): a cuBLAS handle on the device's stream and its
//     workspace (kBlasWorkspace bytes), made by set_tensor_cores(true), for linear() and the
//     search's scores.
// Host staging is never allocated on the op paths. to_host synchronizes the stream; to_device
// returns once the host buffer may be reused (pageable memory is staged by the runtime; pinned
// memory is waited for). all_finite synchronizes too (its answer is a host bool); start_finite_check
// + finite_check_result wait only for the check itself.
//
// T: float (accumulation f32) and vendor::bf16 / vendor::f16 (storage; all arithmetic in f32).
// The device is bound to the GPU that is current at construction. One device per thread (like
// CpuDevice); not copyable.
//
// Warp size: the kernels are instantiated for vendor::kWarpSize, fixed per build (32 on NVIDIA;
// on AMD DELTAKV_HIP_WARP_SIZE: 64 for CDNA, 32 for RDNA). The constructor refuses a GPU whose
// warp size differs, rather than running kernels built for another width.
//
// Must be compiled by nvcc (.cu) or hipcc (-x hip) with -std=c++20 (vendor.hpp refuses others).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "deltakv/device.hpp"
#include "deltakv/error.hpp"
#include "kernels.cuh"
#include "vendor.hpp"

namespace deltakv::gpu {

using stream_t = vendor::stream_t;
using bf16 = vendor::bf16;
using f16 = vendor::f16;

template <class T>
class GpuDevice {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, f16>,
                "GpuDevice<T>: T must be float, bf16 or f16");

 public:
  using A = accum_t<T>;
  static constexpr int kWarp = vendor::kWarpSize;
  static constexpr int device_interface = 3;  // deltakv/device.hpp: kDeviceInterface

  // stream: where every op is ordered; nullptr: the default stream (owned by nobody). With
  // own_stream = true the device creates a non-blocking stream and destroys it at the end.
  // scratch_bytes: device scratch allocated now (0: grown on first use).
  explicit GpuDevice(stream_t stream = nullptr, std::size_t scratch_bytes = 0, bool own_stream = false) {
    if (vendor::device_count() <= 0)
      throw ConfigError(std::string(vendor::kDeviceClass) + ": no " + vendor::kPlatform + " device available");
    device_ = vendor::current_device();
    const int warp = vendor::warp_size(device_);
    if (warp != kWarp)
      throw ConfigError(std::string(vendor::kDeviceClass) + ": the GPU's warp size is " + std::to_string(warp) +
                        " but the kernels were built for " + std::to_string(kWarp) +
                        " (HIP: build with DELTAKV_HIP_WARP_SIZE matching the target)");
    sms_ = vendor::multiprocessor_count(device_);
    stream_ = own_stream ? vendor::stream_create() : stream;
    owns_stream_ = own_stream;
    try {
      flag_ = static_cast<int*>(vendor::malloc_device(sizeof(int)));
      host_flag_ = static_cast<int*>(vendor::malloc_pinned(sizeof(int)));
      vendor::memset_async(flag_, 0, sizeof(int), stream_);  // no call's tag (tags start at 1)
      vendor::stream_sync(stream_);
      finite_done_ = vendor::event_create();
      reserve_scratch(scratch_bytes);
    } catch (...) {
      release();
      throw;
    }
  }
  ~GpuDevice() { release(); }
  GpuDevice(const GpuDevice&) = delete;
  GpuDevice& operator=(const GpuDevice&) = delete;

  // linear() and ref_search() on tensor cores (bf16/f16) where the shapes allow, instead of the
  // CUDA-core kernels: linear() without a bias and the search's scores through the vendor's GEMM
  // (cuBLAS; see vendor_gemm), otherwise linear_mma_kernel and ref_search_mma_kernel. Results differ
  // from the CUDA-core path by f32 summation order only. Off by default (the engine opts in). Turning it on for a 16-bit device on CUDA creates
  // the cuBLAS handle and allocates its workspace (once; not a call for a hot path). No effect on
  // HIP (no tensor-core tile there yet).
  void set_tensor_cores(bool on) {
    if constexpr (vendor::kHasBlas && !std::is_same_v<T, float>) {
      if (on && !blas_) {
        blas_ws_ = vendor::malloc_device(kBlasWorkspace);
        try {
          blas_ = vendor::blas_create(stream_, blas_ws_, kBlasWorkspace);
        } catch (...) {
          vendor::free_device(blas_ws_);
          blas_ws_ = nullptr;
          throw;
        }
      }
    }
    tensor_cores_ = on;
  }
  bool tensor_cores() const { return tensor_cores_; }
  // With tensor cores on, linear() and the search's scores on the vendor's GEMM (the default where
  // the build has one) or on our own tile kernels (linear_mma_kernel, ref_search_mma_kernel: for
  // comparisons; prefill takes 2.5x as long with them on the H100, docs/BENCHMARKS.md).
  void set_vendor_gemm(bool on) { vendor_gemm_ = on; }
  // Whether those calls do go to the vendor's GEMM now (asked, and its handle made).
  bool vendor_gemm() const { return vendor_gemm_ && blas_ != nullptr; }

  stream_t stream() const { return stream_; }
  int device() const { return device_; }
  void synchronize() { vendor::stream_sync(stream_); }

  // Scratch that makes every later call allocation-free: topk with k up to `topk_k`, ref_search
  // with up to `ref_rows` rows and `ref_k` ids, and any split-K GEMM (bounded by the SM count).
  // With tensor cores on (CUDA, 16-bit) the search's GEMM scores take ~32 MiB of it: ask after
  // set_tensor_cores(true).
  std::size_t scratch_bytes_for(std::int64_t topk_k, std::int64_t ref_rows = 0, int ref_k = 0) const {
    std::size_t b = topk_scratch(topk_k);
    b = std::max(b, std::size_t(gpu::kRefMaxSplits) * std::size_t(std::max<std::int64_t>(ref_rows, 0)) *
                        std::size_t(std::max(ref_k, 0)) * (sizeof(float) + sizeof(std::int32_t)) + 256);
    b = std::max(b, std::size_t(4) * std::size_t(sms_) * gpu::kLinBM * gpu::kLinBN * sizeof(float));
    b = std::max(b, std::size_t(3) * std::size_t(sms_) * gpu::kMmaBM * gpu::kMmaBN * sizeof(float));  // tensor-core split-K
    if (ref_rows >= 64 && tensor_cores_ && vendor_gemm()) b = std::max(b, ref_gemm_scratch());  // GEMM-scored search
    return b;
  }
  std::size_t scratch_capacity() const { return scratch_bytes_; }
  // Grows the scratch to at least `bytes` (synchronizes the stream first when it reallocates).
  void reserve_scratch(std::size_t bytes) {
    if (bytes <= scratch_bytes_) return;
    if (scratch_) {
      vendor::stream_sync(stream_);
      vendor::free_device(scratch_);
      scratch_ = nullptr;
      scratch_bytes_ = 0;
    }
    scratch_ = static_cast<unsigned char*>(vendor::malloc_device(bytes));
    scratch_bytes_ = bytes;
  }

  // ---- ops -------------------------------------------------------------------------------------
  // Tiled GEMM; split over the inputs (f32 partials in the scratch, reduced in order) when the
  // output tiles alone would leave most of the GPU idle.
  void linear(const LinearParams<T>& p) {
    if (p.n <= 0 || p.out <= 0) return;
    if constexpr (vendor::kHasBlas && !std::is_same_v<T, float>) {
      // Without a bias only (linear_gemm_eligible). With one (y pre-filled with the bias, beta = 1)
      // ~11% of the elements missed the tests' bound (2^-8 relative + 1e-5 of the sum of |terms|)
      // at in >= 2048 on the H100, where the bias-free calls keep it (likely split-K sums reduced
      // into the bf16 y; see vendor_ext.hpp's math mode); the encode's weights carry no bias.
      if (tensor_cores_ && vendor_gemm() && gpu::linear_gemm_eligible(p)) {
        vendor::gemm_x_wt<T, T>(blas_, p.n, p.out, p.in, p.x, p.ldx, p.w, p.in, p.y, p.ldy);
        return;
      }
    }
    if constexpr (vendor::kTensorTiles && !std::is_same_v<T, float>) {
      if (tensor_cores_ && gpu::linear_mma_eligible(p)) {  // 16-bit, >= 64 rows, 16-byte pieces
        const std::int64_t gx = (p.out + gpu::kMmaBN - 1) / gpu::kMmaBN;
        const std::int64_t gy = std::min<std::int64_t>((p.n + gpu::kMmaBM - 1) / gpu::kMmaBM, 65535);
        const std::int64_t steps = (p.in + gpu::kMmaBK - 1) / gpu::kMmaBK;
        // too few output tiles for the GPU: split K, at least 8 steps of 32 per split
        const KSplits ks = k_splits(p, gx * gy, sms_, steps, steps / 8);
        const dim3 grid{unsigned(gx), unsigned(gy), unsigned(ks.splits)};
        gpu::linear_mma_kernel<T, kWarp><<<grid, gpu::kMmaThreads, 0, stream_>>>(p, int(ks.per), ks.partial);
        launched("linear (tensor cores)");
        linear_reduce(p, ks);
        return;
      }
    }
    const std::int64_t gx = (p.out + gpu::kLinBN - 1) / gpu::kLinBN;
    const std::int64_t gy = std::min<std::int64_t>((p.n + gpu::kLinBM - 1) / gpu::kLinBM, 65535);
    // K steps of kLinBK inputs; split when the tiles fill less than two waves, 4 steps per split at least
    const std::int64_t steps = (p.in + gpu::kLinBK - 1) / gpu::kLinBK;
    const KSplits ks = k_splits(p, gx * gy, 2 * sms_, steps, p.in / (4 * gpu::kLinBK));
    const dim3 grid{unsigned(gx), unsigned(gy), unsigned(ks.splits)};
    gpu::linear_kernel<T><<<grid, gpu::kLinThreads, 0, stream_>>>(p, int(std::max<std::int64_t>(ks.per * gpu::kLinBK, 1)),
                                                                 ks.partial);
    launched("linear");
    linear_reduce(p, ks);
  }

  void swiglu(const SwiGLUParams<T>& p) {
    if (p.n <= 0 || p.hidden <= 0) return;
    constexpr int V = gpu::kPackOf<T>;
    const bool packs = p.sub ? gpu::packs_fit<T>({p.hidden, p.ldh, p.ld_sub}, {p.h, p.sub})
                             : gpu::packs_fit<T>({p.hidden, p.ldh}, {p.h});
    const auto launch = [&](auto sub) {
      constexpr bool S = decltype(sub)::value;
      if (packs)
        gpu::swiglu_kernel<T, V, S><<<grid_rows(p.n), threads_for(p.hidden / V), 0, stream_>>>(p);
      else
        gpu::swiglu_kernel<T, 1, S><<<grid_rows(p.n), threads_for(p.hidden), 0, stream_>>>(p);
    };
    if (p.sub) launch(std::true_type{});
    else launch(std::false_type{});
    launched("swiglu");
  }

  void axpy_rows(const AxpyRowsParams<T>& p) {
    if (p.n <= 0 || p.dim <= 0) return;
    gpu::axpy_rows_kernel<T><<<grid_rows(p.n), threads_for(p.dim), 0, stream_>>>(p);
    launched("axpy_rows");
  }

  // With tensor cores on and a vendor GEMM: ref_search_gemm (below). Otherwise blocks of rows x a
  // share of the references; more than one share per row block when that is needed to fill the GPU
  // (partial lists merged by a second kernel). Rows per block: 128 on tensor cores
  // (ref_search_mma_kernel, where eligible and enabled), else up to 8.
  void ref_search(const RefSearchParams<T>& p) {
    check_ref_search_readable(p);
    if (p.n <= 0 || p.k <= 0) return;
    if constexpr (vendor::kHasBlas && !std::is_same_v<T, float>) {
      if (tensor_cores_ && vendor_gemm() && gpu::ref_search_gemm_eligible(p)) {
        ref_search_gemm(p);
        return;
      }
    }
    if constexpr (vendor::kTensorTiles && !std::is_same_v<T, float>) {
      if (tensor_cores_ && gpu::ref_search_mma_eligible(p)) {
        const std::int64_t row_blocks = (p.n + gpu::kRsBM - 1) / gpu::kRsBM;
        const RefSplits sp = ref_splits(p, row_blocks, gpu::kRsBN, gpu::kRsBN);  // whole 64-reference tiles
        const auto kernel = gpu::ref_search_mma_kernel<T, kWarp>;
        const int smem = int(gpu::ref_search_mma_smem());
        if (!rs_smem_allowed_) {  // a host call: once per device object
          vendor::allow_dynamic_smem(kernel, smem);
          rs_smem_allowed_ = true;
        }
        kernel<<<dim3{unsigned(row_blocks), unsigned(sp.splits)}, gpu::kRsThreads, smem, stream_>>>(p, sp.per, sp.part_s,
                                                                                                   sp.part_i);
        launched("ref_search (tensor cores)");
        ref_merge(p, sp);
        return;
      }
    }
    constexpr int NT = 256, NW = NT / kWarp;
    constexpr std::size_t kSmemLimit = 48 * 1024;
    int rows = static_cast<int>(std::min<std::int64_t>(gpu::kRefRows, p.n));
    while (rows > 1 && gpu::ref_search_smem(rows, p.dim, p.k, NW) > kSmemLimit) --rows;
    const std::size_t smem = gpu::ref_search_smem(rows, p.dim, p.k, NW);
    if (smem > kSmemLimit)
      throw ConfigError(where("ref_search: dim ") + std::to_string(p.dim) + " with k " + std::to_string(p.k) +
                        " needs " + std::to_string(smem) + " bytes of shared memory (limit 48 KiB)");
    const std::int64_t row_blocks = (p.n + rows - 1) / rows;
    const RefSplits sp = ref_splits(p, row_blocks, 4 * NW, 1);  // each share at least 4 references per warp
    const dim3 grid{unsigned(row_blocks), unsigned(sp.splits)};
    gpu::ref_search_kernel<T, kWarp, NT><<<grid, NT, smem, stream_>>>(p, rows, sp.per, sp.part_s, sp.part_i);
    launched("ref_search");
    ref_merge(p, sp);
  }

  void gather_mean(const GatherMeanParams<T>& p) {
    if (p.n <= 0 || p.dim <= 0) return;
    constexpr int V = gpu::kPackOf<T>;
    if (gpu::packs_fit<T>({p.dim, p.ldr, p.ldo}, {p.refs, p.out}))
      gpu::gather_mean_kernel<T, V><<<grid_rows(p.n), threads_for(p.dim / V), 0, stream_>>>(p);
    else
      gpu::gather_mean_kernel<T, 1><<<grid_rows(p.n), threads_for(p.dim), 0, stream_>>>(p);
    launched("gather_mean");
  }

  void quantize(const QuantizeParams<T>& p) {
    if (p.n <= 0 || p.dim <= 0) return;
    if (p.bits != 8 && p.bits != 4) throw ConfigError(where("quantize: bits must be 8 or 4"));
    constexpr int NT = 128, V = gpu::kPackOf<T>;
    // rows of at most 4 packs per lane, 16-byte packs and whole aligned code stores: the row in
    // registers (quantize_packs_kernel); else one element at a time
    const int code_bytes = p.bits == 8 ? V : V / 2;
    const bool packs = gpu::packs_fit<T>({p.dim, p.ldz, p.sub ? p.ld_sub : 0}, {p.z, p.sub ? p.sub : p.z}) &&
                       p.ldq % code_bytes == 0 && reinterpret_cast<std::uintptr_t>(p.q) % code_bytes == 0;
    const int per_lane = (p.dim / V + kWarp - 1) / kWarp;
    const unsigned grid = unsigned(blocks(p.n, NT / kWarp));
    if (packs && per_lane == 1) gpu::quantize_packs_kernel<T, kWarp, NT, 1><<<grid, NT, 0, stream_>>>(p);
    else if (packs && per_lane == 2) gpu::quantize_packs_kernel<T, kWarp, NT, 2><<<grid, NT, 0, stream_>>>(p);
    else if (packs && per_lane <= 4) gpu::quantize_packs_kernel<T, kWarp, NT, 4><<<grid, NT, 0, stream_>>>(p);
    else gpu::quantize_kernel<T, kWarp, NT><<<grid, NT, 0, stream_>>>(p);  // a warp per row
    launched("quantize");
  }

  void dequantize(const DequantizeParams<T>& p) {
    if (p.n <= 0 || p.dim <= 0) return;
    gpu::dequantize_kernel<T><<<grid_rows(p.n), threads_for(p.dim), 0, stream_>>>(p);
    launched("dequantize");
  }

  void rope(const RopeParams<T>& p) {
    if (p.n <= 0 || p.rot_dim < 2 || p.n_heads <= 0) return;  // style none rotates like interleaved, as on the CPU
    const std::size_t smem = std::size_t(p.rot_dim / 2) * 2 * sizeof(double);
    if (smem > 48 * 1024) throw ConfigError(where("rope: rot_dim too large"));
    gpu::rope_kernel<T><<<grid_rows(p.n), 128, smem, stream_>>>(p);
    launched("rope");
  }

  void attn_tile(const AttnTileParams<T>& p) {
    if (p.nq <= 0 || p.ntile <= 0 || p.n_q_heads <= 0) return;
    if (p.nq > 65535) throw ShapeError(where("attn_tile: more than 65535 query rows in one call"));
    constexpr int NT = 128;
    const int chunk = std::min(p.ntile, gpu::kAttnMaxChunk);
    // + slack: the compiler may read the scores in pairs/quads past the last one (harmless, but
    // compute-sanitizer reports reads beyond the allocation)
    const std::size_t smem = sizeof(float) * (2 * std::size_t(p.head_dim) + (std::size_t(chunk) + 15) / 8 * 8);
    if (smem > 48 * 1024) throw ConfigError(where("attn_tile: head_dim too large"));
    const dim3 grid{unsigned(p.n_q_heads), unsigned(p.nq)};
    gpu::attn_tile_kernel<T, kWarp, NT><<<grid, NT, smem, stream_>>>(p, chunk);
    launched("attn_tile");
  }

  void attn_finish(const AttnFinishParams<T>& p) {
    const std::int64_t total = std::int64_t(p.nq) * p.n_q_heads * p.head_dim;
    if (total <= 0) return;
    gpu::attn_finish_kernel<T><<<blocks(total, 256), 256, 0, stream_>>>(p);
    launched("attn_finish");
  }

  void score_tile(const ScoreTileParams<T>& p) {
    if (p.ntile <= 0) return;
    constexpr int NT = 128;
    gpu::score_tile_kernel<T, kWarp, NT><<<grid_rows(p.ntile), NT, 0, stream_>>>(p);
    launched("score_tile");
  }

  void page_bounds(const PageBoundsParams<T>& p) {
    if (p.n <= 0 || p.dim <= 0) return;
    gpu::page_bounds_kernel<T><<<unsigned((p.dim + 127) / 128), 128, 0, stream_>>>(p);
    launched("page_bounds");
  }

  void page_score(const PageScoreParams<T>& p) {
    if (p.n_pages <= 0) return;
    constexpr int NT = 128;
    gpu::page_score_kernel<T, kWarp, NT><<<grid_rows(p.n_pages), NT, 0, stream_>>>(p);
    launched("page_score");
  }

  // One block: radix select + ordered compaction + bitonic sort (see kernels.cuh for the cost).
  void topk(const TopKParams& p) {
    if (p.n <= 0 || p.k <= 0) return;
    if (p.n > std::int64_t(0x7fffffff)) throw ShapeError(where("topk: n must fit in int32 indices"));
    const int K = static_cast<int>(std::min<std::int64_t>(p.k, p.n));
    const int P = pow2_at_least(K);
    const bool in_smem = P <= gpu::kTopkSmemMax;
    unsigned long long* gbuf = nullptr;
    if (!in_smem) {
      reserve_scratch(topk_scratch(K));
      gbuf = reinterpret_cast<unsigned long long*>(scratch_);
    }
    const std::size_t smem = in_smem ? std::size_t(P) * sizeof(unsigned long long) : 0;
    gpu::topk_kernel<kWarp, gpu::kTopkThreads><<<1, gpu::kTopkThreads, smem, stream_>>>(p, K, P, gbuf, in_smem ? 1 : 0);
    launched("topk");
  }

  // Whether ref_search scores the reference chunk that starts at j0 (a multiple of the chunk size)
  // with one GEMM over its count rounded up to 8 (enough rows past m readable: m_readable), rather
  // than a GEMM over the multiple of 8 below it and a tail. cuBLAS search path only (16-bit T).
  static bool ref_scores_rounded_up(const RefSearchParams<T>& p, std::int64_t j0) {
    const std::int64_t mc = std::min<std::int64_t>(gpu::kRsChunkRefs, p.m - j0);
    return std::max(p.m, p.m_readable) - j0 >= std::max<std::int64_t>(8, (mc + 7) / 8 * 8);
  }

  // Whether copy_rows_batch(b) runs as one launch: two or more non-empty parts, or one that asks
  // for norms, all of one row width, every row start 16-byte aligned (a compression pass's
  // gathers); else part by part (the norms then by ref_norms_kernel over the copied rows).
  static bool copy_rows_batch_fused(const CopyRowsBatchParams<T>& b) {
    check_copy_rows_batch(b);
    int dim = 0, parts = 0;
    bool norms = false;
    for (int j = 0; j < b.n_parts; ++j) {
      const CopyRowsParams<T>& p = b.part[j];
      if (p.n <= 0 || p.dim <= 0) continue;
      if (dim == 0) dim = p.dim;
      if (p.dim != dim || !gpu::packs_fit<T>({p.dim, p.lds, p.ldd}, {p.src, p.dst})) return false;
      ++parts;
      norms = norms || b.sq_norms[j];
    }
    return parts >= 2 || (parts == 1 && norms);
  }
  void copy_rows_batch(const CopyRowsBatchParams<T>& b) {
    static_assert(CopyRowsBatchParams<T>::kMaxParts == gpu::kCopyBatchParts);
    if (!copy_rows_batch_fused(b)) {
      for (int j = 0; j < b.n_parts; ++j)  // before any launch: ref_norms_kernel's thread index is 32-bit
        if (b.sq_norms[j] && b.part[j].n > (std::int64_t{1} << 26))
          throw ShapeError(where("copy_rows_batch: more than 2^26 rows with norms in one part"));
      for (int j = 0; j < b.n_parts; ++j) {
        const CopyRowsParams<T>& p = b.part[j];
        copy_rows(p);  // empty parts return at once
        if (b.sq_norms[j] && p.n > 0 && p.dim > 0) {
          launch_ref_norms(p.dst, p.ldd, int(p.n), p.dim, b.sq_norms[j]);
          launched("copy_rows_batch (norms)");
        }
      }
      return;
    }
    gpu::CopyRowsBatchArgs a{};
    std::int64_t total = 0;
    int parts = 0;
    const std::int64_t es = std::int64_t(sizeof(T));
    for (int j = 0; j < b.n_parts; ++j) {
      const CopyRowsParams<T>& p = b.part[j];
      if (p.n <= 0 || p.dim <= 0) continue;
      a.part[parts] = {reinterpret_cast<const unsigned char*>(p.src), p.lds * es, p.src_rows, p.src_row_base,
                       reinterpret_cast<unsigned char*>(p.dst), p.ldd * es, p.dst_rows, b.sq_norms[j]};
      a.units = static_cast<int>(std::size_t(p.dim) * sizeof(T) / 16);
      a.end[parts++] = total += p.n;
    }
    for (int j = parts; j < gpu::kCopyBatchParts; ++j) a.end[j] = total;
    gpu::copy_rows_batch_kernel<vendor::bytes16, T, kWarp><<<grid_rows(total), gpu::kCopyBatchThreads, 0, stream_>>>(a);
    launched("copy_rows_batch");
  }

  void copy_rows(const CopyRowsParams<T>& p) {
    if (p.n <= 0 || p.dim <= 0) return;
    const std::size_t row = std::size_t(p.dim) * sizeof(T);
    const std::size_t lds = std::size_t(p.lds) * sizeof(T), ldd = std::size_t(p.ldd) * sizeof(T);
    const auto* src = reinterpret_cast<const unsigned char*>(p.src);
    auto* dst = reinterpret_cast<unsigned char*>(p.dst);
    if (gpu::packs_fit<T>({p.dim, p.lds, p.ldd}, {p.src, p.dst})) {
      const int units = static_cast<int>(row / 16);
      gpu::copy_rows_kernel<vendor::bytes16><<<grid_rows(p.n), threads_for(units), 0, stream_>>>(
          src, std::int64_t(lds), p.src_rows, p.src_row_base, dst, std::int64_t(ldd), p.dst_rows, p.n, units);
    } else {
      gpu::copy_rows_kernel<T><<<grid_rows(p.n), threads_for(p.dim), 0, stream_>>>(
          src, std::int64_t(lds), p.src_rows, p.src_row_base, dst, std::int64_t(ldd), p.dst_rows, p.n, p.dim);
    }
    launched("copy_rows");
  }

  bool all_finite(const FiniteCheckParams<T>& p) {
    start_finite_check(p);
    return finite_check_result();
  }
  // The kernel, the flag's copy to pinned memory and an event, queued; finite_check_result() waits
  // for that event only (work queued after the start keeps the GPU busy meanwhile).
  void start_finite_check(const FiniteCheckParams<T>& p) {
    if (finite_tag_ == std::numeric_limits<int>::max()) {  // tags wrap: clear a failed check's old tag first
      vendor::memset_async(flag_, 0, sizeof(int), stream_);
      finite_tag_ = 0;
    }
    ++finite_tag_;  // never 0, the cleared flag
    finite_empty_ = p.n <= 0 || p.dim <= 0;
    if (finite_empty_) return;
    constexpr int V = gpu::kPackOf<T>;
    const std::int64_t groups = (p.n + gpu::kFiniteRows - 1) / gpu::kFiniteRows;  // a thread's rows in flight
    if (gpu::packs_fit<T>({p.dim, p.ldx}, {p.x}))
      gpu::all_finite_kernel<T, V><<<blocks(groups * (p.dim / V), threads_for(p.dim / V)), threads_for(p.dim / V), 0, stream_>>>(
          p, flag_, finite_tag_);
    else
      gpu::all_finite_kernel<T, 1><<<blocks(groups * p.dim, threads_for(p.dim)), threads_for(p.dim), 0, stream_>>>(p, flag_,
                                                                                                           finite_tag_);
    launched("all_finite");
    vendor::memcpy_async(host_flag_, flag_, sizeof(int), stream_);
    vendor::event_record(finite_done_, stream_);
  }
  bool finite_check_result() {
    if (finite_empty_) return true;
    vendor::event_sync(finite_done_);
    return *host_flag_ != finite_tag_;
  }

  void to_host(void* dst, const void* src, std::size_t bytes) {
    if (bytes == 0) return;
    vendor::memcpy_async(dst, src, bytes, stream_);
    vendor::stream_sync(stream_);
  }
  void to_device(void* dst, const void* src, std::size_t bytes) {
    if (bytes == 0) return;
    vendor::memcpy_async(dst, src, bytes, stream_);
    if (vendor::is_pinned_host(src)) vendor::stream_sync(stream_);  // the caller may reuse src at once
  }
  void fill_zero(void* p, std::size_t bytes) { vendor::memset_async(p, 0, bytes, stream_); }

 private:
  // |r|^2 of `rows` rows (ld apart) into norms: ref_norms_kernel, a warp per row
  void launch_ref_norms(const T* r, std::int64_t ld, int rows, int dim, float* norms) {
    constexpr int NT = 256, RPB = NT / kWarp;
    gpu::ref_norms_kernel<T, kWarp><<<unsigned((rows + RPB - 1) / RPB), NT, 0, stream_>>>(r, ld, rows, dim, norms);
  }
  // The search's scores as GEMMs on cuBLAS, chunk by chunk (kernels.cuh, ref_topk_rows_kernel).
  void ref_search_gemm(const RefSearchParams<T>& p) {
    if constexpr (!std::is_same_v<T, float>) {  // 16-bit only (the vendor GEMM's inputs); the float device never calls it
      reserve_scratch(ref_gemm_scratch());
      float* scores = reinterpret_cast<float*>(scratch_);
      float* norms = scores + std::size_t(gpu::kRsChunkRows) * gpu::kRsChunkRefs;
      float* list_s = norms + gpu::kRsChunkRefs;
      std::int32_t* list_i = reinterpret_cast<std::int32_t*>(list_s + std::size_t(gpu::kRsChunkRows) * gpu::kRsMaxK);
      constexpr int NT = 256, RPB = NT / kWarp;  // top-k: a block per row; tail scores: a warp per row
      // One chunk of references (a prefill pass's search): their norms once for every row chunk.
      auto norms_of = [&](const T* r, int rows) {  // |r|^2 of `rows` references into norms (l2 only)
        launch_ref_norms(r, p.ldr, rows, p.dim, norms);
        launched("ref_search (norms)");
      };
      const bool one_ref_chunk = p.m <= gpu::kRsChunkRefs;
      // norms kept since the references were stored, where the top-k's 16-byte reads may use them
      const bool norms_given = p.ref_sq_norms != nullptr && gpu::aligned16(p.ref_sq_norms) &&
                               std::max(p.m, p.m_readable) >= (p.m + 3) / 4 * 4;
      if (one_ref_chunk && p.m > 0 && p.metric == Metric::l2 && !norms_given) norms_of(p.refs, int(p.m));
      for (std::int64_t r0 = 0; r0 < p.n; r0 += gpu::kRsChunkRows) {
        const std::int64_t nr = std::min<std::int64_t>(gpu::kRsChunkRows, p.n - r0);
        const T* x = p.x + r0 * p.ldx;
        for (std::int64_t j0 = 0; j0 == 0 || j0 < p.m; j0 += gpu::kRsChunkRefs) {  // once at least: m = 0 writes -1s
          const int mc = int(std::min<std::int64_t>(gpu::kRsChunkRefs, p.m - j0));
          // the top-k kernel reads 16-byte pieces of rows; cuBLAS wants 32-byte aligned ones
          const int ld = std::max(8, (mc + 7) / 8 * 8);
          const bool last = j0 + gpu::kRsChunkRefs >= p.m;
          if (mc > 0) {
            const T* r = p.refs + j0 * p.ldr;
            // the first mc / 8 * 8 references on cuBLAS (a multiple of 8 outputs keeps it on its fast
            // kernels); a rest of < 8 as a second GEMM over the last 8 references (it rewrites a few
            // columns of the first with scores of the same precision), or, with fewer than 8 in all,
            // by ref_tail_scores_kernel (a warp per row: ~25 us per 2048 rows, the GEMM ~5). Where the
            // caller lets rows past m be read (m_readable), one GEMM over mc rounded up to 8 instead:
            // the extra columns are never considered (the top-k stops at mc).
            const int head = ref_scores_rounded_up(p, j0) ? ld : mc / 8 * 8;
            if (head > 0) vendor::gemm_x_wt<T, float>(blas_, nr, head, p.dim, x, p.ldx, r, p.ldr, scores, ld);
            if (mc > head && head > 0) {
              vendor::gemm_x_wt<T, float>(blas_, nr, 8, p.dim, x, p.ldx, r + std::int64_t(mc - 8) * p.ldr, p.ldr, scores + (mc - 8), ld);
            } else if (mc > head) {
              const T* rt = r + std::int64_t(head) * p.ldr;
              constexpr int V = gpu::kPackOf<T>;
              const unsigned grid = unsigned((nr + RPB - 1) / RPB);
              if (gpu::packs_fit<T>({p.dim, p.ldx, p.ldr}, {x, rt}))
                gpu::ref_tail_scores_kernel<T, kWarp, V><<<grid, NT, 0, stream_>>>(x, p.ldx, nr, rt, p.ldr, mc - head, p.dim, scores, ld,
                                                                                  head);
              else
                gpu::ref_tail_scores_kernel<T, kWarp, 1><<<grid, NT, 0, stream_>>>(x, p.ldx, nr, rt, p.ldr, mc - head, p.dim, scores, ld,
                                                                                  head);
              launched("ref_search (tail scores)");
            }
            if (p.metric == Metric::l2 && !one_ref_chunk && !norms_given) norms_of(r, mc);
          }
          ref_topk_launch<NT>(p.k, nr, nr, p.metric, scores, ld, norms_given ? p.ref_sq_norms + j0 : norms, j0, std::max(mc, 0),
                              p.visible + r0, j0 == 0,
                              list_s, list_i, last ? p.ids + r0 * p.k : nullptr);
          launched("ref_search (top-k)");
        }
      }
    }
  }
  // The top-k fold of `rows` rows with K = k (1..kRsMaxK; ref_search_gemm_eligible bounds k): a warp
  // per row from kRsWarpRowsMin rows on (ref_topk_warp_rows_kernel), else a block per row.
  template <int NT, int K = 1, class... Args>
  void ref_topk_launch(int k, std::int64_t rows, Args... args) {
    if constexpr (K <= gpu::kRsMaxK) {
      if (k != K) return ref_topk_launch<NT, K + 1>(k, rows, args...);
      if (rows >= gpu::kRsWarpRowsMin) {
        constexpr int WPB = NT / kWarp;
        gpu::ref_topk_warp_rows_kernel<kWarp, K, WPB><<<unsigned((rows + WPB - 1) / WPB), NT, 0, stream_>>>(args...);
      } else {
        gpu::ref_topk_rows_kernel<kWarp, K, NT><<<unsigned(rows), NT, 0, stream_>>>(args...);
      }
    }
  }
  static std::size_t ref_gemm_scratch() {
    return (std::size_t(gpu::kRsChunkRows) * gpu::kRsChunkRefs + gpu::kRsChunkRefs + 2 * std::size_t(gpu::kRsChunkRows) * gpu::kRsMaxK) *
           sizeof(float);
  }

  // Split-K of a GEMM with `tiles` output tiles and `steps` K steps: one split unless the tiles
  // number fewer than `fill`; then enough for two waves of blocks, at most `max_by_k` and 16. `per`
  // K steps per split; the f32 partials [splits, n, out] live in the scratch.
  struct KSplits {
    std::int64_t splits = 1, per = 1;
    float* partial = nullptr;
  };
  KSplits k_splits(const LinearParams<T>& p, std::int64_t tiles, std::int64_t fill, std::int64_t steps, std::int64_t max_by_k) {
    KSplits r;
    std::int64_t splits = 1;
    if (tiles < fill) splits = std::max<std::int64_t>(1, std::min<std::int64_t>({(2 * sms_ + tiles - 1) / tiles, max_by_k, 16}));
    r.per = std::max<std::int64_t>(1, (steps + splits - 1) / splits);  // in = 0: one empty split
    r.splits = std::max<std::int64_t>(1, (steps + r.per - 1) / r.per);
    if (r.splits > 1) {
      reserve_scratch(std::size_t(r.splits) * std::size_t(p.n) * std::size_t(p.out) * sizeof(float));
      r.partial = reinterpret_cast<float*>(scratch_);
    }
    return r;
  }
  void linear_reduce(const LinearParams<T>& p, const KSplits& ks) {  // partials in split order + bias
    if (ks.splits <= 1) return;
    gpu::linear_reduce_kernel<T><<<blocks(p.n * p.out, 256), 256, 0, stream_>>>(p, int(ks.splits), ks.partial);
    launched("linear (reduce)");
  }

  // How a reference search is split over the reference range: `splits` shares of `per` references
  // (a multiple of `granule`), enough blocks for two waves with at least `min_share` references
  // each; with more than one share, the partial lists [splits, n, k] live in the scratch.
  struct RefSplits {
    std::int64_t splits = 1, per = 1;
    float* part_s = nullptr;
    std::int32_t* part_i = nullptr;
  };
  RefSplits ref_splits(const RefSearchParams<T>& p, std::int64_t row_blocks, std::int64_t min_share, std::int64_t granule) {
    RefSplits r;
    std::int64_t splits = std::max<std::int64_t>(1, (2 * sms_ + row_blocks - 1) / row_blocks);
    splits = std::min<std::int64_t>({splits, std::max<std::int64_t>(1, p.m / min_share), gpu::kRefMaxSplits});
    const std::int64_t share = (p.m + splits - 1) / splits;
    r.per = std::max<std::int64_t>(1, (share + granule - 1) / granule) * granule;
    r.splits = std::max<std::int64_t>(1, (p.m + r.per - 1) / r.per);
    if (r.splits > 1) {
      const std::size_t entries = std::size_t(r.splits) * std::size_t(p.n) * std::size_t(p.k);
      reserve_scratch(entries * (sizeof(float) + sizeof(std::int32_t)) + 256);
      r.part_s = reinterpret_cast<float*>(scratch_);
      r.part_i = reinterpret_cast<std::int32_t*>(scratch_ + align256(entries * sizeof(float)));
    }
    return r;
  }
  void ref_merge(const RefSearchParams<T>& p, const RefSplits& sp) {
    if (sp.splits <= 1) return;
    gpu::ref_merge_kernel<gpu::kRefMaxSplits>
        <<<unsigned((p.n + 127) / 128), 128, 0, stream_>>>(int(sp.splits), p.n, p.k, sp.part_s, sp.part_i, p.ids);
    launched("ref_search (merge)");
  }

  // Error text "<CudaDevice|HipDevice>::<what>", built only on the error path.
  static std::string where(const char* what) { return std::string(vendor::kDeviceClass) + "::" + what; }
  // After a kernel launch: a bad launch configuration is reported at once.
  static void launched(const char* op) {
    const vendor::error_t e = vendor::last_error();
    if (e != vendor::kSuccess) vendor::raise(e, where(op).c_str());
  }

  static constexpr std::size_t align256(std::size_t x) { return (x + 255) & ~std::size_t{255}; }
  static int pow2_at_least(int x) {
    int p = 1;
    while (p < x) p <<= 1;
    return p;
  }
  static std::size_t topk_scratch(std::int64_t k) {
    if (k <= 0) return 0;
    const int P = pow2_at_least(static_cast<int>(std::min<std::int64_t>(k, 0x40000000)));
    return P <= gpu::kTopkSmemMax ? 0 : std::size_t(P) * sizeof(unsigned long long);
  }
  // Grid-stride launches: enough blocks for the work, capped (the kernels loop).
  static constexpr int kBlocksPerSm = 32;  // gpu-check: allow(blocks per SM, not lanes)
  unsigned blocks(std::int64_t work, int threads) const {
    const std::int64_t b = (work + threads - 1) / threads;
    return unsigned(std::max<std::int64_t>(1, std::min<std::int64_t>(b, std::int64_t(sms_) * kBlocksPerSm)));
  }
  static unsigned grid_rows(std::int64_t rows) { return unsigned(std::min<std::int64_t>(rows, 1 << 30)); }
  static int threads_for(int dim) { return dim >= 256 ? 256 : (dim > 64 ? 128 : 64); }

  void release() noexcept {
    (void)vendor::stream_sync_noexcept(stream_);  // nothing may still use the scratch
    vendor::blas_destroy(blas_);
    vendor::free_device(blas_ws_);
    blas_ = nullptr;
    blas_ws_ = nullptr;
    vendor::free_device(scratch_);
    vendor::free_device(flag_);
    vendor::free_pinned(host_flag_);
    if (finite_done_) vendor::event_destroy(finite_done_);
    finite_done_ = nullptr;
    if (owns_stream_) vendor::stream_destroy(stream_);
    scratch_ = nullptr;
    flag_ = nullptr;
    host_flag_ = nullptr;
    scratch_bytes_ = 0;
  }

  // cuBLAS's recommended workspace on Hopper (enough for its split-K and stream-K algorithms)
  static constexpr std::size_t kBlasWorkspace = std::size_t{1} << 25;  // 32 MiB
  stream_t stream_ = nullptr;
  bool owns_stream_ = false;
  bool tensor_cores_ = false;
  bool vendor_gemm_ = true;
  vendor::blas_t blas_ = nullptr;
  void* blas_ws_ = nullptr;
  bool rs_smem_allowed_ = false;
  int device_ = 0;
  int sms_ = 1;
  unsigned char* scratch_ = nullptr;
  std::size_t scratch_bytes_ = 0;
  int* flag_ = nullptr;
  int* host_flag_ = nullptr;
  int finite_tag_ = 0;  // the last finite check's tag
  bool finite_empty_ = true;  // the last finite check had nothing to check
  vendor::event_t finite_done_ = nullptr;  // recorded after the last finite check's flag copy
};

static_assert(Device<GpuDevice<float>, float>);
static_assert(Device<GpuDevice<bf16>, bf16>);

}  // namespace deltakv::gpu
