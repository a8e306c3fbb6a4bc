#pragma once
// Read-ceiling probes shared by bench_decode (its "% of read floor" column) and bench_read (the
// ceiling by access pattern). Each kernel folds what it reads into a word written only if it matches
// an impossible value, so the loads are kept.
#include <cstddef>

#include "deltakv/gpu/vendor.hpp"
#include "deltakv/gpu/vendor_ext.hpp"

namespace deltakv::bench {

inline constexpr unsigned kReadNever = 0x9e3779b9u;

// Grid-stride 16-byte loads, U in flight per thread, consecutive threads consecutive pieces.
template <int U>
__global__ void read_probe(const uint4* p, std::size_t n, unsigned* out) {
  unsigned acc = 0;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = i + u * stride < n ? p[i + u * stride] : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == kReadNever) out[blockIdx.x] = acc;
}

// The same by bulk copies (TMA, sm_90): thread 0 streams the block's span into S stages of CH bytes
// of shared memory (dynamic, S * CH bytes), every thread folds one word of each chunk. On the H100
// this reads ~2% faster than read_probe (docs/BENCHMARKS.md, thirteenth session).
template <int S, int CH>
__global__ void read_probe_bulk(const unsigned char* p, std::size_t bytes, unsigned* out) {
  namespace vendor = deltakv::gpu::vendor;
  DELTAKV_DYNAMIC_SMEM(unsigned char, sm);
  __shared__ unsigned long long bar[S];
  const std::size_t chunks = bytes / CH, per = (chunks + gridDim.x - 1) / gridDim.x, c0 = blockIdx.x * per;
  const std::size_t c1 = c0 + per < chunks ? c0 + per : chunks;
  if (threadIdx.x == 0)
    for (int st = 0; st < S; ++st) vendor::mbar_init(bar + st);
  __syncthreads();
  auto issue = [&](std::size_t c, int st) {
    vendor::mbar_expect_tx(bar + st, CH);
    vendor::bulk_copy_g2s(sm + st * CH, p + c * CH, CH, bar + st);
  };
  if (threadIdx.x == 0)
    for (int st = 0; st < S && c0 + st < c1; ++st) issue(c0 + st, st);
  unsigned acc = 0, phase = 0;
  for (std::size_t c = c0; c < c1; ++c) {
    const int st = int((c - c0) % S);
    vendor::mbar_wait(bar + st, (phase >> st) & 1u);
    phase ^= 1u << st;
    acc ^= reinterpret_cast<const unsigned*>(sm + st * CH)[threadIdx.x];
    __syncthreads();  // every thread has read the stage before it is refilled
    if (threadIdx.x == 0 && c + S < c1) issue(c + S, st);
  }
  if (acc == kReadNever) out[blockIdx.x] = acc;
}

// Bytes per second of launch() reading `bytes` each time: one warm-up launch, then five timed.
template <class Launch>
double read_rate(Launch launch, double bytes, deltakv::gpu::vendor::stream_t s) {
  namespace vendor = deltakv::gpu::vendor;
  auto e0 = vendor::event_create(), e1 = vendor::event_create();
  launch();
  vendor::event_record(e0, s);
  for (int i = 0; i < 5; ++i) launch();
  vendor::event_record(e1, s);
  const double ms = vendor::event_ms(e0, e1);
  vendor::event_destroy(e0);
  vendor::event_destroy(e1);
  return 5.0 * bytes / (ms * 1e-3);
}

}  // namespace deltakv::bench
