#pragma once
// The HIP backend (AMD GPUs): deltakv::hip::HipDevice<T>, every op of the Device concept
// (include/deltakv/device.hpp) as kernel launches on one HIP stream. It is the CUDA backend's
// class, deltakv::gpu::GpuDevice<T> (deltakv/gpu/gpu_device.hpp), compiled by hipcc: the kernels
// (deltakv/gpu/kernels.cuh) are the same source, and only deltakv/gpu/vendor.hpp differs per
// vendor. See gpu_device.hpp for the memory, stream and synchronization contract.
//
// Must be compiled by hipcc (-x hip, -std=c++20) for AMD targets, with DELTAKV_HIP_WARP_SIZE equal
// to the targets' wavefront size: 64 for CDNA/GCN (gfx90a, gfx940; the default), 32 for RDNA
// (gfx1030). The constructor refuses a GPU whose warp size differs from the build's.
// T: float, bf16 (hip_bfloat16) or f16 (__half).
//
// Status: compiled in CI for gfx90a, gfx940 and gfx1030 with Debian's HIP 5.2; not yet run on AMD
// hardware.
#if !defined(__HIPCC__)
#error "deltakv/hip/device.hpp must be compiled by hipcc (HIP, AMD targets)"
#endif
#if defined(__HIP_PLATFORM_NVIDIA__) || defined(__HIP_PLATFORM_NVCC__)
#error "deltakv's HIP backend targets AMD GPUs only; use deltakv/cuda/device.hpp (nvcc) for NVIDIA"
#endif

#include "deltakv/gpu/gpu_device.hpp"

namespace deltakv::hip {

namespace vendor = deltakv::gpu::vendor;
using stream_t = vendor::stream_t;
using bf16 = vendor::bf16;
using f16 = vendor::f16;

template <class T>
using HipDevice = gpu::GpuDevice<T>;

inline constexpr int kWarpSize = vendor::kWarpSize;

}  // namespace deltakv::hip
