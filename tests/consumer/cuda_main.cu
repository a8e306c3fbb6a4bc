// CUDA consumer of an installed deltakv (see CMakeLists.txt next to this file): the same small
// cache as main.cpp, on deltakv::cuda::CudaDevice with storage, workspace, weights and rows in
// device memory. Compiling and linking it is the point (the installed deltakv::cuda target must
// carry the headers, C++20 and CUDA::cudart); it needs no GPU to build. Run without a CUDA device
// it says so and exits 0; with one, it checks that sinks, references and the recent window come
// back bit-exact and compressed tokens to rounding (identity codec).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <span>
#include <vector>

#include <cuda_runtime.h>

#include <deltakv/cache.hpp>
#include <deltakv/compressor.hpp>
#include <deltakv/cuda/device.hpp>

namespace {

template <class T>
T* upload(const std::vector<T>& h) {
  void* p = nullptr;
  if (cudaMalloc(&p, std::max<std::size_t>(1, h.size()) * sizeof(T)) != cudaSuccess) return nullptr;
  if (!h.empty()) cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  return static_cast<T*>(p);
}

}  // namespace

int main() {
  using namespace deltakv;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("deltakv CUDA consumer: built; no CUDA device here, not run\n");
    return 0;
  }
  using Dev = cuda::CudaDevice<float>;
  using Cache = CompressedCache<float, Dev, FixedStride, LinearEncoder<float>, LinearDecoder<float>, DensePolicy>;
  Config cfg;
  cfg.model = {1, 4, 2, 8};  // kv_dim 32
  cfg.comp.sinks = 4;
  cfg.comp.recent = 16;
  cfg.comp.latent_dim = 32;  // identity codec
  cfg.cap = {1, 256, 1};
  const int D = cfg.model.kv_dim();

  const Compressor<float> codec = Compressor<float>::identity(1, D);
  float* w_down = upload(codec.layers[0].down.w);
  float* w_up = upload(codec.layers[0].up.w);
  const std::vector<LinearEncoder<float>> enc{{LinearMap<float>{w_down, nullptr, D, D}}};
  const std::vector<LinearDecoder<float>> dec{{LinearMap<float>{w_up, nullptr, D, D}}};
  Dev dev;
  const auto lay = Cache::layout(cfg, FixedStride(10), DensePolicy{}, 0);
  std::byte* storage = upload(std::vector<std::byte>(lay.storage_bytes));
  std::byte* workspace = upload(std::vector<std::byte>(lay.workspace_bytes));
  int failures = 0;
  {
    Cache cache(dev, cfg, FixedStride(10), std::span<const LinearEncoder<float>>(enc),
                std::span<const LinearDecoder<float>>(dec), DensePolicy{}, std::span<std::byte>(storage, lay.storage_bytes),
                std::span<std::byte>(workspace, lay.workspace_bytes));
    const std::int64_t n = 200;
    std::vector<float> x(std::size_t(n) * D);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * float(i)) + 0.1f * float(i % 7);
    float* dx = upload(x);
    std::vector<std::int64_t> pos(n);
    for (std::int64_t i = 0; i < n; ++i) pos[i] = i;
    const std::int32_t sid[1] = {0};
    const std::int32_t ip[2] = {0, std::int32_t(n)};
    cache.append(0, RaggedBatch<const float>{matrix<const float>(dx, n, D), sid, ip, pos});
    float* dout = upload(std::vector<float>(x.size()));
    cache.reconstruct(0, 0, pos, matrix(dout, n, D), false);
    dev.synchronize();
    std::vector<float> out(x.size());
    cudaMemcpy(out.data(), dout, out.size() * sizeof(float), cudaMemcpyDeviceToHost);
    for (std::int64_t p = 0; p < n; ++p) {
      const bool must_be_exact = p < 4 || p >= n - 16 || cache.position_class(p) == 1;
      const float* a = out.data() + p * D;
      const float* b = x.data() + p * D;
      if (must_be_exact) {
        if (std::memcmp(a, b, sizeof(float) * D) != 0) ++failures;
      } else {
        for (int d = 0; d < D; ++d)
          if (!(std::fabs(a[d] - b[d]) <= 1e-4f)) ++failures;
      }
    }
    if (cache.counts().latents == 0) ++failures;
    std::printf("deltakv CUDA consumer: %lld tokens, %lld latents, %d failures\n", static_cast<long long>(n),
                static_cast<long long>(cache.counts().latents), failures);
    cudaFree(dx);
    cudaFree(dout);
  }
  cudaFree(storage);
  cudaFree(workspace);
  cudaFree(w_down);
  cudaFree(w_up);
  return failures == 0 ? 0 : 1;
}
