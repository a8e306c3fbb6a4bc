#pragma once
// The CUDA backend: deltakv::cuda::CudaDevice<T>, every op of the Device concept
// (include/deltakv/device.hpp) as kernel launches on one CUDA stream. The class is shared with
// the HIP backend: it is deltakv::gpu::GpuDevice<T> (deltakv/gpu/gpu_device.hpp), whose kernels
// (deltakv/gpu/kernels.cuh) reach CUDA only through deltakv/gpu/vendor.hpp. See that header for
// the memory, stream and synchronization contract.
//
// T: float, bf16 (__nv_bfloat16) or f16 (__half). Must be compiled by nvcc (.cu) with -std=c++20.
// Under hipcc this header compiles too (the name then denotes the HIP build of the same class), so
// that the cross-backend tests in tests/cuda build for AMD targets unchanged; HIP code should
// include deltakv/hip/device.hpp and say HipDevice.
#if !defined(__CUDACC__) && !defined(__HIPCC__)
#error "deltakv/cuda/device.hpp must be compiled as CUDA (nvcc, .cu) or HIP (hipcc)"
#endif

#include "deltakv/gpu/gpu_device.hpp"

namespace deltakv::cuda {

namespace vendor = deltakv::gpu::vendor;
using stream_t = vendor::stream_t;
using bf16 = vendor::bf16;
using f16 = vendor::f16;

template <class T>
using CudaDevice = gpu::GpuDevice<T>;

}  // namespace deltakv::cuda
