// Every member of the CUDA device class instantiated for each storage type, as the HIP backend's
// instantiate.hip does for AMD: a member that only compiles for some T (the vendor-GEMM search is
// 16-bit only) must keep compiling for all of them, whether or not a test calls it.
#include "deltakv/cuda/device.hpp"

namespace deltakv::gpu {
template class GpuDevice<float>;
template class GpuDevice<vendor::bf16>;
template class GpuDevice<vendor::f16>;
}  // namespace deltakv::gpu
