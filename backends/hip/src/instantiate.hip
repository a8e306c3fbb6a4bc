// The HIP backend's object for one AMD target: every op of HipDevice<T> instantiated (and so
// every kernel of deltakv/gpu/kernels.cuh compiled for the target), for each storage type.
// Built per target by backends/hip/hipcc/CMakeLists.txt with DELTAKV_HIP_WARP_SIZE matching it.
#include "deltakv/hip/device.hpp"

namespace deltakv::gpu {
template class GpuDevice<float>;
template class GpuDevice<vendor::bf16>;
template class GpuDevice<vendor::f16>;
}  // namespace deltakv::gpu

static_assert(deltakv::Device<deltakv::hip::HipDevice<float>, float>);
static_assert(deltakv::Device<deltakv::hip::HipDevice<deltakv::hip::bf16>, deltakv::hip::bf16>);
static_assert(deltakv::Device<deltakv::hip::HipDevice<deltakv::hip::f16>, deltakv::hip::f16>);
static_assert(deltakv::hip::HipDevice<float>::kWarp == DELTAKV_HIP_WARP_SIZE);
