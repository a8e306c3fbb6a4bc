#pragma once
// The one place that names a GPU vendor's API. Everything else in backends/gpu and the CUDA/HIP
// device classes goes through these names: runtime calls (memory, copies, streams, errors),
// the 16-bit float types and their conversions, warp shuffles (with the full lane mask that
// belongs to the warp size) and a few function attributes.
//
// CUDA (nvcc) is built and tested on NVIDIA GPUs. The HIP branch (hipcc, AMD GPUs only: HIP's
// NVIDIA-platform headers do not compile with CUDA 13) is compiled in CI for gfx90a, gfx940 and
// gfx1030 (scripts/build-hip.sh) but has not run on AMD hardware.
//
// scripts/check-gpu-source.sh keeps the rest of backends/gpu free of vendor API, warp
// intrinsics and 32-lane assumptions: add what a kernel needs here, not there.
#if defined(__HIPCC__)
#include <hip/hip_bfloat16.h>
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
#elif defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#else
#error "deltakv/gpu/vendor.hpp needs a GPU compiler (nvcc for CUDA, hipcc for HIP)"
#endif

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "deltakv/error.hpp"

// Function attributes used by the kernels.
#define DELTAKV_GPU_HD __host__ __device__ __forceinline__
#define DELTAKV_GPU_D __device__ __forceinline__
#define DELTAKV_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)

// Warp (wavefront) size the kernels are instantiated for. NVIDIA: 32. AMD: 64 on CDNA (the
// default here), 32 on RDNA: a HIP build for RDNA defines DELTAKV_HIP_WARP_SIZE=32. One build
// has one warp size (the host code picks the instantiation), so an AMD build covers either CDNA
// or RDNA targets; the device pass checks the value against the target's wavefront size.
#if defined(__HIPCC__)
#ifndef DELTAKV_HIP_WARP_SIZE
#define DELTAKV_HIP_WARP_SIZE 64
#endif
#if defined(__HIP_DEVICE_COMPILE__) && defined(__AMDGCN_WAVEFRONT_SIZE)
static_assert(DELTAKV_HIP_WARP_SIZE == __AMDGCN_WAVEFRONT_SIZE,
              "DELTAKV_HIP_WARP_SIZE must equal the offload target's wavefront size "
              "(64: gfx9 CDNA/GCN; 32: gfx10/gfx11 RDNA in their default wave32 mode)");
#endif
#endif

namespace deltakv::gpu::vendor {

#if defined(__HIPCC__)
using stream_t = hipStream_t;
using error_t = hipError_t;
using bf16 = hip_bfloat16;
using f16 = __half;
inline constexpr int kWarpSize = DELTAKV_HIP_WARP_SIZE;
inline constexpr error_t kSuccess = hipSuccess;
inline constexpr error_t kOutOfMemory = hipErrorOutOfMemory;
inline constexpr const char* kPlatform = "HIP";
inline constexpr const char* kDeviceClass = "HipDevice";
#else
using stream_t = cudaStream_t;
using error_t = cudaError_t;
using bf16 = __nv_bfloat16;
using f16 = __half;
inline constexpr int kWarpSize = 32;
inline constexpr error_t kSuccess = cudaSuccess;
inline constexpr error_t kOutOfMemory = cudaErrorMemoryAllocation;
inline constexpr const char* kPlatform = "CUDA";
inline constexpr const char* kDeviceClass = "CudaDevice";
#endif

// ---- errors ----------------------------------------------------------------------------------
inline const char* error_string(error_t e) noexcept {
#if defined(__HIPCC__)
  return hipGetErrorString(e);
#else
  return cudaGetErrorString(e);
#endif
}

// Out of memory is a CapacityError; everything else the runtime reports (no device, a failed
// launch, an illegal address seen at a later synchronization) is a ConfigError.
[[noreturn]] inline void raise(error_t e, const char* what) {
  const std::string msg = std::string(what) + ": " + error_string(e);
  if (e == kOutOfMemory) throw CapacityError(msg);
  throw ConfigError(msg);
}
inline void check(error_t e, const char* what) {
  if (e != kSuccess) raise(e, what);
}

// The last launch/runtime error, cleared. After a kernel launch it reports a bad launch
// configuration at once (not the kernel's own faults, which surface at the next synchronizing call).
inline error_t last_error() noexcept {
#if defined(__HIPCC__)
  return hipGetLastError();
#else
  return cudaGetLastError();
#endif
}
inline void check_launch(const char* what) { check(last_error(), what); }

// ---- devices, memory, streams ----------------------------------------------------------------
// Number of visible devices; 0 when the runtime reports an error (no driver, no device).
inline int device_count() noexcept {
  int n = 0;
#if defined(__HIPCC__)
  if (hipGetDeviceCount(&n) != hipSuccess) {
    (void)hipGetLastError();
    return 0;
  }
#else
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
#endif
  return n;
}

inline int current_device() {
  int d = 0;
#if defined(__HIPCC__)
  check(hipGetDevice(&d), "hipGetDevice");
#else
  check(cudaGetDevice(&d), "cudaGetDevice");
#endif
  return d;
}

inline int multiprocessor_count(int device) {
  int n = 0;
#if defined(__HIPCC__)
  check(hipDeviceGetAttribute(&n, hipDeviceAttributeMultiprocessorCount, device), "hipDeviceGetAttribute");
#else
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
#endif
  return n;
}

// Lanes per warp (wavefront) of `device`, as the runtime reports it.
inline int warp_size(int device) {
  int n = 0;
#if defined(__HIPCC__)
  check(hipDeviceGetAttribute(&n, hipDeviceAttributeWarpSize, device), "hipDeviceGetAttribute");
#else
  check(cudaDeviceGetAttribute(&n, cudaDevAttrWarpSize, device), "cudaDeviceGetAttribute");
#endif
  return n;
}

inline void* malloc_device(std::size_t bytes) {
  void* p = nullptr;
  if (bytes == 0) return nullptr;
#if defined(__HIPCC__)
  check(hipMalloc(&p, bytes), "hipMalloc");
#else
  check(cudaMalloc(&p, bytes), "cudaMalloc");
#endif
  return p;
}
inline void free_device(void* p) noexcept {
  if (!p) return;
#if defined(__HIPCC__)
  (void)hipFree(p);
#else
  (void)cudaFree(p);
#endif
}

inline void* malloc_pinned(std::size_t bytes) {
  void* p = nullptr;
#if defined(__HIPCC__)
  check(hipHostMalloc(&p, bytes, hipHostMallocDefault), "hipHostMalloc");
#else
  check(cudaMallocHost(&p, bytes), "cudaMallocHost");
#endif
  return p;
}
inline void free_pinned(void* p) noexcept {
  if (!p) return;
#if defined(__HIPCC__)
  (void)hipHostFree(p);
#else
  (void)cudaFreeHost(p);
#endif
}

// True for page-locked host memory (a copy from it may still be running after the async call
// returns); false for pageable host memory and for device memory.
inline bool is_pinned_host(const void* p) {
#if defined(__HIPCC__)
  hipPointerAttribute_t a{};
  if (hipPointerGetAttributes(&a, p) != hipSuccess) {
    (void)hipGetLastError();
    return false;
  }
#if HIP_VERSION_MAJOR >= 6
  return a.type == hipMemoryTypeHost;
#else
  return a.memoryType == hipMemoryTypeHost;  // HIP 5 (Debian 12): no `type` member yet
#endif
#else
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeHost;
#endif
}

// Any direction (unified addressing decides), ordered on `s`.
inline void memcpy_async(void* dst, const void* src, std::size_t bytes, stream_t s) {
  if (bytes == 0) return;
#if defined(__HIPCC__)
  check(hipMemcpyAsync(dst, src, bytes, hipMemcpyDefault, s), "hipMemcpyAsync");
#else
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s), "cudaMemcpyAsync");
#endif
}

inline void memset_async(void* p, int byte, std::size_t bytes, stream_t s) {
  if (bytes == 0) return;
#if defined(__HIPCC__)
  check(hipMemsetAsync(p, byte, bytes, s), "hipMemsetAsync");
#else
  check(cudaMemsetAsync(p, byte, bytes, s), "cudaMemsetAsync");
#endif
}

inline void stream_sync(stream_t s) {
#if defined(__HIPCC__)
  check(hipStreamSynchronize(s), "hipStreamSynchronize");
#else
  check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
#endif
}

inline bool stream_sync_noexcept(stream_t s) noexcept {  // for destructors
#if defined(__HIPCC__)
  return hipStreamSynchronize(s) == hipSuccess;
#else
  return cudaStreamSynchronize(s) == cudaSuccess;
#endif
}

inline stream_t stream_create() {
  stream_t s{};
#if defined(__HIPCC__)
  check(hipStreamCreateWithFlags(&s, hipStreamNonBlocking), "hipStreamCreate");
#else
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
#endif
  return s;
}
inline void stream_destroy(stream_t s) noexcept {
  if (!s) return;
#if defined(__HIPCC__)
  (void)hipStreamDestroy(s);
#else
  (void)cudaStreamDestroy(s);
#endif
}

inline void device_sync() {
#if defined(__HIPCC__)
  check(hipDeviceSynchronize(), "hipDeviceSynchronize");
#else
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
#endif
}

// Lets `kernel` use more than the default 48 KiB of dynamic shared memory.
template <class Kernel>
inline void allow_dynamic_smem(Kernel kernel, int bytes) {
#if defined(__HIPCC__)
  check(hipFuncSetAttribute(reinterpret_cast<const void*>(kernel), hipFuncAttributeMaxDynamicSharedMemorySize, bytes),
        "hipFuncSetAttribute");
#else
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), "cudaFuncSetAttribute");
#endif
}

// ---- element types ---------------------------------------------------------------------------
template <class T>
DELTAKV_GPU_HD float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, f16>) {
    return __half2float(v);
  } else {
#if defined(__HIPCC__)
    return static_cast<float>(v);
#else
    return __bfloat162float(v);
#endif
  }
}

template <class T>
DELTAKV_GPU_HD T from_float(float v) {  // round to nearest even
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, f16>) {
    return __float2half_rn(v);
  } else {
#if defined(__HIPCC__)
    return T(v);
#else
    return __float2bfloat16_rn(v);
#endif
  }
}

// A 16-byte plain-data unit for vectorized copies.
using bytes16 = uint4;

// ---- device intrinsics -----------------------------------------------------------------------
// Rounded multiply / add that the compiler must not fuse into an FMA: where the CPU oracle
// computes a*b + c in two roundings, these give its bits exactly.
DELTAKV_GPU_D float mul_rn(float a, float b) { return __fmul_rn(a, b); }
DELTAKV_GPU_D float add_rn(float a, float b) { return __fadd_rn(a, b); }
DELTAKV_GPU_D unsigned float_bits(float v) { return __float_as_uint(v); }

// Butterfly / prefix shuffles over a warp of W lanes, all lanes participating.
#if defined(__HIPCC__)
template <int W, class V>
DELTAKV_GPU_D V shfl_xor(V v, int lane_mask) {
  static_assert(W == kWarpSize, "kernels must be instantiated for the device's warp size");
  return __shfl_xor(v, lane_mask, W);
}
template <int W, class V>
DELTAKV_GPU_D V shfl_up(V v, unsigned delta) {
  static_assert(W == kWarpSize, "kernels must be instantiated for the device's warp size");
  return __shfl_up(v, delta, W);
}
template <int W, class V>
DELTAKV_GPU_D V shfl(V v, int src_lane) {
  static_assert(W == kWarpSize, "kernels must be instantiated for the device's warp size");
  return __shfl(v, src_lane, W);
}
// One bit per lane: lanes whose predicate holds.
template <int W>
using lane_mask_t = unsigned long long;
template <int W>
DELTAKV_GPU_D lane_mask_t<W> ballot(bool pred) {
  static_assert(W == kWarpSize, "kernels must be instantiated for the device's warp size");
  return __ballot(pred);
}
DELTAKV_GPU_D int popcount(unsigned long long m) { return __popcll(m); }
DELTAKV_GPU_D int first_lane(unsigned long long m) { return __ffsll(static_cast<long long>(m)) - 1; }
#else
template <int W>
DELTAKV_GPU_HD constexpr unsigned full_lane_mask() {
  static_assert(W == 32, "NVIDIA warps have 32 lanes");
  return 0xffffffffu;
}
template <int W, class V>
DELTAKV_GPU_D V shfl_xor(V v, int lane_mask) {
  return __shfl_xor_sync(full_lane_mask<W>(), v, lane_mask, W);
}
template <int W, class V>
DELTAKV_GPU_D V shfl_up(V v, unsigned delta) {
  return __shfl_up_sync(full_lane_mask<W>(), v, delta, W);
}
template <int W, class V>
DELTAKV_GPU_D V shfl(V v, int src_lane) {
  return __shfl_sync(full_lane_mask<W>(), v, src_lane, W);
}
// One bit per lane: lanes whose predicate holds.
template <int W>
using lane_mask_t = unsigned;
template <int W>
DELTAKV_GPU_D lane_mask_t<W> ballot(bool pred) {
  return __ballot_sync(full_lane_mask<W>(), pred);
}
DELTAKV_GPU_D int popcount(unsigned m) { return __popc(m); }
DELTAKV_GPU_D int first_lane(unsigned m) { return __ffs(static_cast<int>(m)) - 1; }
#endif

}  // namespace deltakv::gpu::vendor

// Dynamic shared memory of a kernel as an array of U (128-byte aligned: tensor-core tiles placed
// relative to it need 32).
#define DELTAKV_DYNAMIC_SMEM(U, name)                          \
  extern __shared__ __align__(128) unsigned char dk_smem_raw_[]; \
  U* name = reinterpret_cast<U*>(dk_smem_raw_)
