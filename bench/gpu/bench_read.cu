// bench_read: the device's read ceiling by access pattern, the reference that bench_decode's "% of read
// floor" column divides by. Each pattern reads the same 4 GiB buffer once per launch (best of five
// launches after a warm-up, best over the launch shapes listed); the table gives TB/s and the ratio
// to the grid-stride loads, which bench_decode's read_probe uses:
//   grid-stride loads   16-byte loads, 8 in flight per thread, consecutive threads consecutive pieces
//   block spans         each block one contiguous span, U loads in flight per thread
//   bulk copies         TMA (cp.async.bulk, sm_90): thread 0 streams the block's span through S stages of
//                       CH bytes of shared memory (bench_decode's read_probe_bulk is the 4 x 16 KB case)
//   dense pattern       one kv head's 256-byte piece of every 4 KB token row (Llama's K of one head;
//                       lanes 0-15 one row, 16-31 the next), the way the dense pass reads
// docs/BENCHMARKS.md (thirteenth session) has the H100's numbers.
#include <algorithm>
#include <cstdio>
#include <vector>

#include "deltakv/gpu/vendor.hpp"
#include "deltakv/gpu/vendor_ext.hpp"
#include "read_probes.cuh"

namespace vendor = deltakv::gpu::vendor;

namespace {

using deltakv::bench::kReadNever;
using deltakv::bench::read_probe;
using deltakv::bench::read_probe_bulk;
using deltakv::bench::read_rate;

template <int U>
__global__ void block_span(const uint4* p, std::size_t n, unsigned* out) {
  const std::size_t per = (n + gridDim.x - 1) / gridDim.x, b0 = blockIdx.x * per, b1 = b0 + per < n ? b0 + per : n;
  unsigned acc = 0;
  for (std::size_t base = b0; base < b1; base += std::size_t(U) * blockDim.x) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const std::size_t i = base + u * blockDim.x + threadIdx.x;
      v[u] = i < b1 ? p[i] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == kReadNever) out[blockIdx.x] = acc;
}

// rows of 4 KB = 256 pieces of 16 bytes; a block reads piece group `head` (16 pieces = 256 bytes) of its rows
template <int W, int U>
__global__ void head_rows(const uint4* p, std::size_t rows, unsigned* out) {
  constexpr int kHeads = 16;  // 256-byte pieces per 4 KB row
  const int head = int(blockIdx.x % kHeads), nb = int(gridDim.x / kHeads), rb = int(blockIdx.x / kHeads);
  const std::size_t per = (rows + nb - 1) / nb, r0 = rb * per, r1 = r0 + per < rows ? r0 + per : rows;
  const int warp = int(threadIdx.x) / W, lane = int(threadIdx.x) % W, nw = int(blockDim.x) / W;
  constexpr int RPW = W / 16;  // rows per warp instruction (16 lanes per 256-byte piece)
  unsigned acc = 0;
  for (std::size_t r = r0 + RPW * warp + lane / 16; r < r1; r += std::size_t(RPW * nw) * U) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const std::size_t rr = r + std::size_t(RPW * nw) * u;
      v[u] = rr < r1 ? p[rr * 256 + head * 16 + lane % 16] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == kReadNever) out[blockIdx.x] = acc;
}

}  // namespace

int main() {
  if (vendor::device_count() <= 0) {
    std::printf("bench_read: no GPU; nothing measured\n");
    return 0;
  }
  const int dev = vendor::current_device();
  const int sms = vendor::multiprocessor_count(dev);
  constexpr int W = vendor::kWarpSize;
  const std::size_t bytes = std::size_t(4) << 30, n = bytes / 16;
  unsigned char* buf = static_cast<unsigned char*>(vendor::malloc_device(bytes));
  unsigned* out = static_cast<unsigned*>(vendor::malloc_device(std::size_t(1) << 20));
  vendor::stream_t s = vendor::stream_create();
  vendor::memset_async(buf, 1, bytes, s);
  const auto* p = reinterpret_cast<const uint4*>(buf);
  struct Row {
    const char* name;
    double tb;
  };
  std::vector<Row> rows;
  auto best_of = [&](const char* name, std::initializer_list<int> per_sm, auto launch_with_blocks) {
    double best = 0;
    for (int b : per_sm) best = std::max(best, read_rate([&] { launch_with_blocks(sms * b); }, double(bytes), s) / 1e12);
    vendor::check_launch(name);
    rows.push_back({name, best});
  };
  best_of("grid-stride 16-byte loads, 8 in flight (bench_decode's read_probe)", {2, 4, 8},
          [&](int g) { read_probe<8><<<g, 512, 0, s>>>(p, n, out); });
  best_of("block spans, 4 loads in flight", {1, 2, 4, 8}, [&](int g) { block_span<4><<<g, 512, 0, s>>>(p, n, out); });
  best_of("block spans, 8 loads in flight", {1, 2, 4, 8}, [&](int g) { block_span<8><<<g, 512, 0, s>>>(p, n, out); });
  best_of("dense pattern: one head's 256 bytes of each 4 KB row, 8 in flight", {2, 4, 8},
          [&](int g) { head_rows<W, 8><<<(g + 15) / 16 * 16, 512, 0, s>>>(p, bytes / 4096, out); });
  auto k1 = read_probe_bulk<4, 16384>;
  auto k2 = read_probe_bulk<8, 16384>;
  auto k3 = read_probe_bulk<4, 32768>;
  if (vendor::cluster_launch_ok(k1, dev)) {  // sm_90 code on an sm_90 device: the bulk-copy engine
    vendor::allow_dynamic_smem(k1, 4 * 16384);
    vendor::allow_dynamic_smem(k2, 8 * 16384);
    vendor::allow_dynamic_smem(k3, 4 * 32768);
    best_of("bulk copies (TMA), 4 stages x 16 KB (bench_decode's read_probe_bulk)", {1, 2, 3},
            [&](int g) { k1<<<g, 128, 4 * 16384, s>>>(buf, bytes, out); });
    best_of("bulk copies (TMA), 8 stages x 16 KB", {1, 2}, [&](int g) { k2<<<g, 128, 8 * 16384, s>>>(buf, bytes, out); });
    best_of("bulk copies (TMA), 4 stages x 32 KB", {1}, [&](int g) { k3<<<g, 128, 4 * 32768, s>>>(buf, bytes, out); });
  } else {
    std::printf("(bulk copies: not on this device or build; sm_90 only)\n");
  }
  std::printf("| read pattern (4 GiB, best launch shape) | TB/s | vs grid-stride loads |\n|---|---|---|\n");
  for (const Row& r : rows) std::printf("| %s | %.3f | %.3f |\n", r.name, r.tb, r.tb / rows[0].tb);
  vendor::stream_destroy(s);
  vendor::free_device(out);
  vendor::free_device(buf);
  return 0;
}
