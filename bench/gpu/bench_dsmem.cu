// bench_dsmem: what the exchanges of docs/GPU.md's two-SM cluster plan for the sparse kernel would
// cost per tile, measured before anyone writes that kernel. In the plan, the two blocks of a
// cluster each hold half of W_k,h's latent range; per 32-item tile each block publishes the partial
// K product rows of the peer's 16 items (16 x 128 f32 = 8 KB), then the 16 x G logits of its own
// items, and 2 KB of value rows; the peer reads them through distributed shared memory (DSMEM).
//
// Every variant runs 36 tiles (a block's share at Llama 128K x 8) in 128 blocks of 512 threads,
// one per SM (each asks for 150 KB of dynamic shared memory it does not use, as W_k,h would), and reports cycles per tile (clock64 around the tile loop, averaged over blocks):
//   local    the peer's role played by this block's own shared memory: __syncthreads + 8 KB read
//            (the peer this is compared with: what the exchange costs inside one SM today)
//   barrier  one cluster barrier per tile, nothing read
//   k8       cluster barrier + the 8 KB partial read from the peer
//   full     k8, then the logits (16 x 4 floats) and 2 KB of value rows through a second cluster
//            barrier: the plan's whole per-tile exchange
// Buffers are double-buffered by tile parity (a block overwrites a slot only after the barrier
// that follows the peer's last read of it). The table's last column relates each variant to the
// ~13.4K cycles a tile of the fused sparse kernel takes now (docs/BENCHMARKS.md, ninth session).
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "deltakv/gpu/vendor.hpp"
#include "deltakv/gpu/vendor_ext.hpp"

namespace vendor = deltakv::gpu::vendor;

namespace {

constexpr int kThreads = 512, kTiles = 36, kBlocks = 128;
constexpr int kPartialBytes = 16 * 128 * 4;     // 16 items x 128 dims, f32
constexpr int kLogits = 16 * 4;                 // 16 items x G 4
constexpr int kValueBytes = 2048;               // the peer's value rows for this block's dims
constexpr double kSparseTileCycles = 13400.0;   // today's fused sparse tile (ninth session)
constexpr int kHoldSmem = 150 * 1024;           // one block per SM

enum Variant : int { local = 0, barrier = 1, k8 = 2, full = 3 };

__global__ void __launch_bounds__(kThreads) exchange_kernel(int variant, unsigned long long* cycles, unsigned* sink) {
  __shared__ __align__(16) unsigned char part[2][kPartialBytes];
  __shared__ __align__(16) float logits[2][kLogits];
  __shared__ __align__(16) unsigned char values[2][kValueBytes];
  const unsigned peer = variant == local ? 0u : vendor::cluster_rank() ^ 1u;
  const int t = threadIdx.x;
  unsigned acc = 0;
  if (variant != local) vendor::cluster_sync();  // both blocks are running before any remote read
  const long long t0 = clock64();
  for (int tile = 0; tile < kTiles; ++tile) {
    const int slot = tile & 1;
    // produce: this block's partial rows for the peer (one 16-byte piece per thread)
    reinterpret_cast<uint4*>(part[slot])[t] = make_uint4(unsigned(tile), unsigned(t), acc, 1u);
    if (variant == local) {
      __syncthreads();
      const uint4 v = reinterpret_cast<const uint4*>(part[slot])[(t + 32) % kThreads];
      acc += v.x ^ v.y ^ v.z;
      continue;
    }
    vendor::cluster_sync();
    if (variant == barrier) continue;
    const uint4 v = vendor::cluster_load16(reinterpret_cast<const uint4*>(part[slot]) + t, peer);
    acc += v.x ^ v.y ^ v.z;
    if (variant == full) {
      if (t < kLogits) logits[slot][t] = float(acc & 255u);
      if (t < kValueBytes / 16) reinterpret_cast<uint4*>(values[slot])[t] = make_uint4(acc, 2u, 3u, 4u);
      vendor::cluster_sync();
      if (t < kLogits / 4) {
        const uint4 l = vendor::cluster_load16(reinterpret_cast<const uint4*>(logits[slot]) + t, peer);
        acc += l.x;
      }
      if (t < kValueBytes / 16) {
        const uint4 w = vendor::cluster_load16(reinterpret_cast<const uint4*>(values[slot]) + t, peer);
        acc += w.x ^ w.w;
      }
    }
  }
  if (variant != local) vendor::cluster_sync();  // no block leaves while its peer may still read it
  const long long t1 = clock64();
  if (t == 0) atomicAdd(cycles, static_cast<unsigned long long>(t1 - t0));
  if (acc == 0xdeadbeefu) *sink = acc;  // keeps the reads
}

}  // namespace

int main() {
  if (vendor::device_count() <= 0) {
    std::printf("bench_dsmem: no GPU: skipped\n");
    return 0;
  }
  const int dev = vendor::current_device();
  if (!vendor::cluster_launch_ok(exchange_kernel, dev)) {
    std::printf("bench_dsmem: this device or build has no thread-block clusters (sm_90): skipped\n");
    return 0;
  }
  vendor::allow_dynamic_smem(exchange_kernel, kHoldSmem);
  unsigned long long* cycles = static_cast<unsigned long long*>(vendor::malloc_device(sizeof(unsigned long long)));
  unsigned* sink = static_cast<unsigned*>(vendor::malloc_device(sizeof(unsigned)));
  vendor::stream_t s = vendor::stream_create();
  const char* names[] = {"local (peer: one SM)", "cluster barrier", "barrier + 8 KB DSMEM read", "full plan exchange"};
  std::printf("| variant | cycles per tile | ratio to local | share of a %.0f-cycle sparse tile |\n|---|---|---|---|\n",
              kSparseTileCycles);
  double local_cycles = 0;
  for (int v = local; v <= full; ++v) {
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {  // the fastest of five launches (the first warms up)
      vendor::memset_async(cycles, 0, sizeof(unsigned long long), s);
      if (v == local)
        exchange_kernel<<<kBlocks, kThreads, kHoldSmem, s>>>(v, cycles, sink);
      else
        vendor::launch_cluster(exchange_kernel, dim3(kBlocks), dim3(kThreads), kHoldSmem, s, 2u, v, cycles, sink);
      vendor::check_launch("exchange_kernel");
      unsigned long long h = 0;
      vendor::memcpy_async(&h, cycles, sizeof h, s);
      vendor::stream_sync(s);
      const double per = double(h) / kBlocks / kTiles;
      if (rep > 0 && per < best) best = per;
    }
    if (v == local) local_cycles = best;
    std::printf("| %s | %.0f | %.2f | %.1f%% |\n", names[v], best, best / local_cycles, 100.0 * best / kSparseTileCycles);
  }
  vendor::stream_destroy(s);
  vendor::free_device(cycles);
  vendor::free_device(sink);
  return 0;
}
