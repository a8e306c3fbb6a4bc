// The fused decode step (deltakv/gpu/decode_step.hpp, when present) compiled for one AMD target:
// external functions that call every host entry point, so that each of its kernels is
// instantiated for the storage types the fused path supports (bf16, f16). Nothing here is
// meant to be called; the object exists so CI compiles those kernels for AMD.
#if __has_include("deltakv/gpu/decode_step.hpp")
#include "deltakv/gpu/decode_step.hpp"

namespace deltakv::hip::decode_instances {
namespace d = deltakv::gpu::decode;
using deltakv::gpu::vendor::stream_t;

template <class T>
void all(const d::DenseDecodeParams<T>& dense, const d::CombineParams<T>& comb, const d::SparseDecodeParams<T>& sparse,
         stream_t s) {
  d::dense_partials(dense, 0, s);
  d::combine<T>(comb, s);
  d::sparse_partials(sparse, s);
}
template void all<deltakv::gpu::vendor::bf16>(const d::DenseDecodeParams<deltakv::gpu::vendor::bf16>&,
                                              const d::CombineParams<deltakv::gpu::vendor::bf16>&,
                                              const d::SparseDecodeParams<deltakv::gpu::vendor::bf16>&, stream_t);
template void all<deltakv::gpu::vendor::f16>(const d::DenseDecodeParams<deltakv::gpu::vendor::f16>&,
                                             const d::CombineParams<deltakv::gpu::vendor::f16>&,
                                             const d::SparseDecodeParams<deltakv::gpu::vendor::f16>&, stream_t);
void select(const d::SelectParams& p, stream_t s) { d::select_topk(p, 0, s); }
}  // namespace deltakv::hip::decode_instances
#endif
