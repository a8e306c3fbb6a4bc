// Consumer of an installed deltakv (see CMakeLists.txt next to this file): builds a small
// compressed cache with the identity codec, appends one sequence, and checks the reconstruction
// (sinks, references and the recent window bit-exact, compressed tokens to rounding) and one
// attention call; also round-trips a tiny safetensors buffer (the nlohmann_json dependency).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <span>
#include <vector>

#include <deltakv/cache.hpp>
#include <deltakv/compressor.hpp>
#include <deltakv/cpu/device.hpp>
#include <deltakv/io/safetensors.hpp>

int main() {
  using namespace deltakv;
  using Cache = CompressedCache<float, cpu::CpuDevice<float>, FixedStride, LinearEncoder<float>, LinearDecoder<float>,
                                DensePolicy>;
  Config cfg;
  cfg.model = {1, 4, 2, 8};  // kv_dim 32
  cfg.comp.sinks = 4;
  cfg.comp.recent = 16;
  cfg.comp.latent_dim = 32;  // identity codec
  cfg.cap = {1, 256, 1};
  const int D = cfg.model.kv_dim(), QD = cfg.model.n_q_heads * cfg.model.head_dim;

  const Compressor<float> codec = Compressor<float>::identity(1, D);
  const auto enc = codec.linear_encoders();
  const auto dec = codec.decoders();
  cpu::CpuDevice<float> dev;
  const auto lay = Cache::layout(cfg, FixedStride(10), DensePolicy{}, 0);
  std::vector<std::byte> storage(lay.storage_bytes), workspace(lay.workspace_bytes);
  Cache cache(dev, cfg, FixedStride(10), std::span<const LinearEncoder<float>>(enc),
              std::span<const LinearDecoder<float>>(dec), DensePolicy{}, storage, workspace);

  const std::int64_t n = 200;
  std::vector<float> x(std::size_t(n) * D);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * float(i)) + 0.1f * float(i % 7);
  std::vector<std::int64_t> pos(n);
  for (std::int64_t i = 0; i < n; ++i) pos[i] = i;
  const std::int32_t sid[1] = {0};
  const std::int32_t ip[2] = {0, std::int32_t(n)};
  cache.append(0, RaggedBatch<const float>{matrix<const float>(x.data(), n, D), sid, ip, pos});

  std::vector<float> out(x.size());
  cache.reconstruct(0, 0, pos, matrix(out.data(), n, D), false);
  int exact = 0, failures = 0;
  for (std::int64_t p = 0; p < n; ++p) {
    const bool must_be_exact = p < 4 || p >= n - 16 || cache.position_class(p) == 1;
    const float* a = out.data() + p * D;
    const float* b = x.data() + p * D;
    if (must_be_exact) {
      exact += 1;
      if (std::memcmp(a, b, sizeof(float) * D) != 0) ++failures;
    } else {
      for (int d = 0; d < D; ++d)
        if (std::fabs(a[d] - b[d]) > 1e-5f) ++failures;
    }
  }
  if (cache.counts().latents == 0) ++failures;  // the codec really ran

  std::vector<float> q(QD, 0.25f), o(QD);
  const std::vector<std::int64_t> qpos{n - 1};
  const std::int32_t qip[2] = {0, 1};
  cache.attend(0, RaggedBatch<const float>{matrix<const float>(q.data(), 1, QD), sid, qip, qpos},
               matrix(o.data(), 1, QD));
  for (float v : o)
    if (!std::isfinite(v)) ++failures;

  const std::vector<float> w{1.f, 2.f, 3.f};
  const std::vector<std::byte> wb = io::f32_bytes(w);
  const auto bytes = io::serialize_safetensors({{"w", io::StDType::F32, {3}, wb}});
  if (io::SafetensorsFile::from_bytes(bytes).read_as<float>("w") != w) ++failures;

  std::printf("deltakv consumer: %lld tokens, %d exact rows checked, %lld latents, %d failures\n",
              static_cast<long long>(n), exact, static_cast<long long>(cache.counts().latents), failures);
  return failures == 0 ? 0 : 1;
}
