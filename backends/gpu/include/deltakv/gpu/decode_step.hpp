#pragma once
// Host side of the fused decode step (kernels: decode_kernels.cuh, parameters: decode_params.hpp):
// the RoPE tables, launch shapes, shape checks, and the one place where runtime shapes (head_dim,
// GQA group) become template arguments. Every launch goes to the given stream and allocates
// nothing, so a whole decode step can be captured into a graph and replayed.
//
// Supported by the fused path: T = bf16 or f16; head_dim 64 or 128; 1 to 8 q heads per kv head;
// RoPE over the whole head (rot_dim == head_dim); latent_dim a multiple of 16 with the latent
// rows 16-byte aligned (latent_bits 4, 8 or 0). Other shapes raise ConfigError (the cache's tiled
// path serves them).
//
// Each (head_dim, group) pair is its own set of kernel instantiations. The entry points take an
// optional shape set first, dense_partials<ShapeSet<KernelShape<128, 4>>>(p, ...), so an engine that
// serves one model compiles only its kernels; other shapes then raise ConfigError. Default: all.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numbers>
#include <string>
#include <type_traits>
#include <vector>

#include "decode_kernels.cuh"
#include "decode_params.hpp"
#include "dense_mma.cuh"
#include "sparse_two_pass.cuh"
#include "deltakv/error.hpp"
#include "deltakv/layer_storage.hpp"
#include "vendor.hpp"

namespace deltakv::gpu::decode {

inline constexpr int kDenseThreads = 128;
inline constexpr int kSelectThreads = 1024;

// The two RoPE tables (host, f32 pairs), covering positions < max_pos, and the frequencies in
// turns as float pairs (freq); see RopeTableView.
struct RopeTableHost {
  std::vector<float> hi, lo, freq;
  int half = 0;
  std::int64_t max_pos = 0;
};
inline RopeTableHost rope_table(double theta, int rot_dim, std::int64_t max_pos) {
  if (rot_dim <= 0 || rot_dim % 2 != 0) throw ConfigError("rope_table: rot_dim must be even and positive");
  RopeTableHost t;
  t.half = rot_dim / 2;
  t.max_pos = (max_pos + 63) / 64 * 64;
  const std::int64_t rows = t.max_pos / 64;
  t.hi.resize(std::size_t(rows) * t.half * 2);
  t.lo.resize(std::size_t(64) * t.half * 2);
  t.freq.resize(std::size_t(t.half) * 2);
  for (int f = 0; f < t.half; ++f) {
    const double inv = std::pow(theta, -2.0 * f / rot_dim);
    const double turns = inv / (2.0 * std::numbers::pi);
    t.freq[2 * f] = float(turns);
    t.freq[2 * f + 1] = float(turns - double(t.freq[2 * f]));
    for (std::int64_t r = 0; r < rows; ++r) {
      const double a = double(r * 64) * inv;
      t.hi[(r * t.half + f) * 2] = float(std::cos(a));
      t.hi[(r * t.half + f) * 2 + 1] = float(std::sin(a));
    }
    for (int r = 0; r < 64; ++r) {
      const double a = double(r) * inv;
      t.lo[(r * t.half + f) * 2] = float(std::cos(a));
      t.lo[(r * t.half + f) * 2 + 1] = float(std::sin(a));
    }
  }
  return t;
}

// Blocks per multiprocessor the dense splits aim at: one wave of the tensor-core kernel (two
// resident per SM; on the H100 this took a layer at Llama 128K x 1 from 0.27 to 0.21 ms and at
// 32K x 1 from 0.126 to 0.069, batch 8 unchanged), several waves of the lane kernel, which HIP
// runs (a caller forcing the lane kernel on CUDA passes kDenseLaneBlocksPerSm itself).
inline constexpr int kDenseLaneBlocksPerSm = 8;
inline constexpr int kDenseBlocksPerSm = vendor::kTensorTiles ? 2 : kDenseLaneBlocksPerSm;

// Longest dense split: a longer split pays its block's start (q, the first copies) and its merge
// less often. Measured on the H100 (same run): Llama 128K x 8, 8 splits of 16384 1.446 ms per layer
// against 33 of 4032 1.471 (one wave of 4 x 32768: 1.461, some SMs then hold one block); Qwen 128K
// x 8 0.733 against 0.748. The lane kernel keeps 4096 (not measured longer).
inline constexpr int kDenseMaxSplitLen = vendor::kTensorTiles ? 16384 : 4096;
inline constexpr int kDenseLaneMaxSplitLen = 4096;

// Splits for the dense pass: tokens per split (a multiple of 64, 256 to max_len) and how many, about
// blocks_per_sm blocks per multiprocessor. Within a quarter of that length either way, the count
// whose blocks fill their last wave best (ties to fewer splits), then the shortest length that
// covers max_n in that many (balanced: the longest in the window could leave the last split nearly
// empty, e.g. 4 x 10048 for 32768 tokens). With 4096 at most, 33 splits of 4032 at Llama 128K x 8
// were 8 whole waves where 32 of 4096 left the last one a quarter empty (1.496 -> 1.488 ms).
struct SplitPlan { int split_len = 0, n_splits = 0; };
inline SplitPlan dense_splits(std::int64_t max_n, int batch, int n_kv_heads, int sms, int blocks_per_sm = kDenseBlocksPerSm,
                              int max_len = kDenseMaxSplitLen) {
  const std::int64_t wave = std::int64_t(std::max(1, sms)) * std::max(1, blocks_per_sm);
  const std::int64_t pairs = std::max<std::int64_t>(1, std::int64_t(batch) * n_kv_heads);
  const std::int64_t hi = std::max(256, max_len / 64 * 64);
  const auto round64 = [hi](std::int64_t x) { return std::clamp<std::int64_t>((x + 63) / 64 * 64, 256, hi); };
  const std::int64_t len0 = round64((max_n * pairs + wave - 1) / wave);
  SplitPlan s;
  double best = -1.0;
  for (std::int64_t len = round64(len0 * 5 / 4); len >= round64(len0 * 3 / 4); len -= 64) {
    const std::int64_t n = std::max<std::int64_t>(1, (max_n + len - 1) / len), blocks = pairs * n;
    const double fill = double(blocks) / double((blocks + wave - 1) / wave * wave);
    if (fill > best + 1e-9) {
      best = fill;
      s.n_splits = int(n);
    }
  }
  s.split_len = int(round64((max_n + s.n_splits - 1) / s.n_splits));  // balanced
  s.n_splits = int(std::max<std::int64_t>(1, (max_n + s.split_len - 1) / s.split_len));
  return s;
}
// Splits for the sparse pass: about one block per multiprocessor (each holds W_k,h in shared
// memory), at least one tile of work per block.
inline int sparse_splits(std::int64_t max_attended, int batch, int n_kv_heads, int sms) {
  const std::int64_t pairs = std::max<std::int64_t>(1, std::int64_t(batch) * n_kv_heads);
  const std::int64_t by_sms = std::max<std::int64_t>(1, sms / pairs);  // one wave, no ragged second
  const std::int64_t by_work = std::max<std::int64_t>(1, (max_attended + kSparseTile - 1) / kSparseTile);
  return int(std::min(by_sms, by_work));
}
// The fused sparse pass with exact blocks (SparseDecodeParams::exact_blocks / exact_parts): at
// least a warp per (sequence, kv head) pair at `block_threads` (sparse_block_threads' choice), the
// splits of the selection (max_selected items) on the multiprocessors left, the exact blocks on
// all that the splits leave free, and each pair's exact items cut into as many parts (at most
// kSparseMaxExactParts) as those blocks have warps per pair: all in one wave. H100 (132): Llama
// 128K x 8 2 splits x 64 pairs + 4 exact blocks, one part; batch 1 16 x 8 + 4, 8 parts.
inline constexpr int kSparseMaxExactParts = 8;
struct SparsePlan {
  int n_splits = 1, exact_blocks = 0, exact_parts = 1;
};
inline SparsePlan sparse_plan(std::int64_t max_selected, int batch, int n_kv_heads, int sms, int block_threads) {
  const std::int64_t pairs = std::max<std::int64_t>(1, std::int64_t(batch) * n_kv_heads);
  const int warps = std::max(1, block_threads / vendor::kWarpSize);
  const std::int64_t needed = (pairs + warps - 1) / warps;
  SparsePlan s;
  s.n_splits = sparse_splits(max_selected, batch, n_kv_heads, int(std::max<std::int64_t>(1, sms - needed)));
  const std::int64_t useful = (pairs * kSparseMaxExactParts + warps - 1) / warps;  // a warp for every part
  s.exact_blocks = int(std::max(needed, std::min(useful, std::int64_t(sms) - s.n_splits * pairs)));
  s.exact_parts = int(std::clamp<std::int64_t>(std::int64_t(s.exact_blocks) * warps / pairs, 1, kSparseMaxExactParts));
  return s;
}

// The (head_dim, group) pairs a build instantiates (see the header comment).
template <int HeadDim, int Group>
struct KernelShape {};
template <class... S>
struct ShapeSet {
  template <int D, int G>
  static constexpr bool has = (std::is_same_v<S, KernelShape<D, G>> || ...);
};
struct AllShapes {  // head_dim 64 or 128, 1 to 8 q heads per kv head
  template <int D, int G>
  static constexpr bool has = true;
};

namespace detail {
inline void check_shape(int head_dim, int n_q_heads, int n_kv_heads, const char* what) {
  if (head_dim != 64 && head_dim != 128)
    throw ConfigError(std::string(what) + ": the fused path supports head_dim 64 or 128, not " + std::to_string(head_dim));
  if (n_kv_heads <= 0 || n_q_heads % n_kv_heads != 0 || n_q_heads / n_kv_heads > 8)
    throw ConfigError(std::string(what) + ": the fused path supports 1 to 8 q heads per kv head");
}
inline void check_rope(const RopeTableView& r, RopeStyle style, int head_dim, std::int64_t max_n, const char* what) {
  if (style == RopeStyle::none) return;
  if (!r.hi || !r.lo || r.half * 2 != head_dim)
    throw ConfigError(std::string(what) + ": the RoPE table must cover the whole head (rot_dim == head_dim)");
  if (max_n > r.max_pos) throw CapacityError(std::string(what) + ": positions exceed the RoPE table");
}

// Runtime (head_dim, group) -> template arguments, in one place; shapes outside Shapes are refused.
template <class Shapes, class F>
void dispatch(int head_dim, int group, F&& f) {
  auto call = [&](auto d, auto g) {
    if constexpr (Shapes::template has<decltype(d)::value, decltype(g)::value>) {
      return f(d, g);
    } else {
      throw ConfigError("fused decode: head_dim " + std::to_string(head_dim) + " with " + std::to_string(group) +
                        " q heads per kv head is not in this build's shape set");
    }
  };
  auto by_group = [&](auto d) {
    switch (group) {
      case 1: return call(d, std::integral_constant<int, 1>{});
      case 2: return call(d, std::integral_constant<int, 2>{});
      case 3: return call(d, std::integral_constant<int, 3>{});
      case 4: return call(d, std::integral_constant<int, 4>{});
      case 5: return call(d, std::integral_constant<int, 5>{});
      case 6: return call(d, std::integral_constant<int, 6>{});
      case 7: return call(d, std::integral_constant<int, 7>{});
      case 8: return call(d, std::integral_constant<int, 8>{});
      default: throw ConfigError("fused decode: group size out of range");
    }
  };
  if (head_dim == 64) return by_group(std::integral_constant<int, 64>{});
  return by_group(std::integral_constant<int, 128>{});
}
}  // namespace detail

// Views of a CompressedCache's own storage (CompressedCache::storage(layer)).
// Exact layer: its rows and the elements between sequences.
template <class T>
const T* exact_rows(const LayerStorage& s, std::int64_t* seq_stride) {
  if (!s.exact) throw ConfigError("exact_rows: the layer is compressed");
  if (s.seq_bytes % sizeof(T) != 0 || s.rows % sizeof(T) != 0) throw ConfigError("exact_rows: storage not aligned to T");
  *seq_stride = std::int64_t(s.seq_bytes / sizeof(T));
  return reinterpret_cast<const T*>(s.base + s.rows);
}
// Compressed layer: pos_code is the device copy of CompressedCache::position_codes(); w_dec / b_dec
// the layer's decoder weight [kv_dim, latent_dim] and bias (or nullptr) in device memory.
template <class T>
CompressedLayerView<T> compressed_view(const LayerStorage& s, const std::int32_t* pos_code, const T* w_dec, const T* b_dec) {
  if (s.exact) throw ConfigError("compressed_view: the layer is exact");
  return CompressedLayerView<T>{s.base, s.seq_bytes, s.sinks, s.ring, s.refs, s.lat, s.scale, s.ids, s.n_sinks,
                                s.ring_rows, s.latent_dim, s.latent_bits, s.k, s.lat_ld, pos_code, w_dec, b_dec};
}

// Dense split-KV pass (partials in p.part). max_n: an upper bound of p.n[] (host-known).
template <class Shapes = AllShapes, class T>
void dense_partials(const DenseDecodeParams<T>& p, std::int64_t max_n, vendor::stream_t stream) {
  detail::check_shape(p.head_dim, p.n_q_heads, p.n_kv_heads, "dense_decode");
  detail::check_rope(p.rope, p.style, p.head_dim, max_n, "dense_decode");
  if (std::int64_t(p.split_len) * p.n_splits < max_n || p.split_len <= 0)
    throw ConfigError("dense_decode: n_splits * split_len must cover the longest sequence");
  if (p.logits && p.ld_logits < max_n) throw ShapeError("dense_decode: ld_logits < longest sequence");
  if (p.batch == 0) return;
  constexpr int W = vendor::kWarpSize;
  const dim3 grid(p.n_kv_heads, p.n_splits, p.batch);
  if constexpr (vendor::kTensorTiles) {
    if (!p.lane_kernel && dense_mma_fits(p)) {
      detail::dispatch<Shapes>(p.head_dim, p.n_q_heads / p.n_kv_heads, [&](auto d, auto g) {
        const std::size_t smem = dense_mma_smem_bytes(p.head_dim);
        auto launch = [&](auto kernel) {
          vendor::allow_dynamic_smem(kernel, int(smem));
          kernel<<<grid, kDenseMmaThreads, smem, stream>>>(p);
        };
        constexpr int Dv = decltype(d)::value, Gv = decltype(g)::value;
        if (p.logits)  // the filter's logits are computed to ~16 bits before their f16 store (see dense_mma.cuh)
          launch(dense_mma_kernel<T, Dv, Gv, true>);
        else
          launch(dense_mma_kernel<T, Dv, Gv, false>);
      });
      vendor::check_launch("dense_mma_kernel");
      return;
    }
  }
  detail::dispatch<Shapes>(p.head_dim, p.n_q_heads / p.n_kv_heads, [&](auto d, auto g) {
    dense_decode_kernel<T, decltype(d)::value, decltype(g)::value, W, kDenseThreads><<<grid, kDenseThreads, 0, stream>>>(p);
  });
  vendor::check_launch("dense_decode_kernel");
}

template <class T>
void combine(const CombineParams<T>& p, vendor::stream_t stream) {
  if (p.batch == 0) return;
  constexpr int W = vendor::kWarpSize;
  const int threads = (p.head_dim + W - 1) / W * W;
  if (threads > kCombineMaxWarps * W) throw ConfigError("combine: head_dim above " + std::to_string(kCombineMaxWarps * W));
  combine_kernel<T, W><<<p.batch * p.n_q_heads, threads, 0, stream>>>(p);
  vendor::check_launch("combine_kernel");
}

// Scratch words of the multi-block selection (SelectParams::work) for batch sequences of at most
// max_n positions: histograms, per-sequence state and per-chunk counts (see select_write_kernel).
inline std::size_t select_work_words(int batch, std::int64_t max_n) {
  const std::int64_t chunks = std::max<std::int64_t>(1, (max_n + kSelectChunk - 1) / kSelectChunk);
  return std::size_t(batch) * (4 * 256 + 4 + 2 * std::size_t(chunks));
}

// Whether select_topk's cluster path can run here: the current device has thread-block clusters
// and this build holds sm_90 code of its kernel (vendor::cluster_launch_ok).
inline bool select_cluster_supported() {
  return vendor::cluster_launch_ok(select_cluster_kernel<vendor::kWarpSize, kSelectClusterThreads>, vendor::current_device());
}

// What select_topk runs for a shape: plan_select makes the host decisions once (the path, and on the
// cluster path the cluster size, from device queries: cluster support, the kernel's binary, the
// active-cluster occupancy, and the shared-memory attribute it sets), so that select_topk with a
// plan only launches kernels: nothing to ask the device per step, whether captured in a graph or
// run eagerly.
struct SelectPlan {
  SelectPath path = SelectPath::one_block;  // resolved: one_block, multi_block or cluster
  int cluster = 0;                          // cluster path: blocks per sequence
  std::int64_t per = 0;                     // cluster path: positions (keys) per block
  std::int64_t max_n = 0;                   // the longest sequence the plan was made for
};

namespace detail {
// The checks plan_select and select_topk share: p against the path and the longest sequence.
inline void check_select(const SelectParams& p, std::int64_t max_n, SelectPath path) {
  if (p.k <= 0) throw ConfigError("select_topk: k must be positive");
  if (p.ld_sel < p.k) throw ShapeError("select_topk: ld_sel < k");
  if (p.ld_keys < max_n) throw ShapeError("select_topk: ld_keys < longest sequence");
  if (path == SelectPath::multi_block && !p.work) throw ConfigError("select_topk: the multi-block path needs SelectParams::work");
}

// The cluster path's shape, or path != cluster where it cannot run (no clusters on this device or
// in this build's code, too many heads, no or too long a max_n for the cluster's shared memory).
inline SelectPlan plan_cluster(const SelectParams& p, std::int64_t max_n) {
  SelectPlan plan;
  plan.max_n = max_n;
  if constexpr (vendor::kClusters) {
    if (p.cluster < 0 || p.cluster > 16) throw ConfigError("select_topk: cluster must be 0 (automatic) or 1 to 16 blocks per sequence");
    if (max_n <= 0 || p.n_q_heads > kSelectMaxHeads || !select_cluster_supported()) return plan;
    constexpr int NT = kSelectClusterThreads;
    const auto kernel = select_cluster_kernel<vendor::kWarpSize, NT>;
    const int dev = vendor::current_device();
    const auto smem_of = [&](int c) { return ((max_n + c - 1) / c + 3) / 4 * 4 * 4; };  // keys of one block
    // Automatic size: 16 blocks per sequence up to batch 4, where the device runs enough such
    // clusters at once (the H100 at 128K x 1: 0.046 ms against 0.065 with 8); 8 above (at batch 8,
    // clusters of 16 did not all fit at once: 0.108 ms against 0.084).
    int C = p.cluster;
    const std::int64_t smem_max = vendor::max_smem_per_block(dev) - 8 * 1024;  // 8 KiB: the kernel's static arrays
    if (C == 0) {
      C = 8;
      if (p.batch <= 4 && smem_of(16) <= smem_max) {
        vendor::allow_dynamic_smem(kernel, int(smem_of(16)));
        if (vendor::max_active_clusters(kernel, NT, std::size_t(smem_of(16)), 16) >= p.batch) C = 16;
      }
    }
    if (smem_of(C) > smem_max) return plan;
    vendor::allow_dynamic_smem(kernel, int(smem_of(C)));
    plan.path = SelectPath::cluster;
    plan.cluster = C;
    plan.per = smem_of(C) / 4;
  }
  return plan;
}
}  // namespace detail

// The plan for select_topk over p's shape (batch, heads, k, cluster, path, work) and sequences of at
// most max_n positions (0 = unknown: the cluster path, which sizes its shared memory from it, is then
// not taken). Checks p as select_topk does; host calls only, no launch.
inline SelectPlan plan_select(const SelectParams& p, std::int64_t max_n) {
  const SelectPath path = p.path != SelectPath::automatic ? p.path : (p.work ? SelectPath::multi_block : SelectPath::cluster);
  detail::check_select(p, max_n, path);
  SelectPlan plan;
  plan.max_n = max_n;
  if (path == SelectPath::cluster) {
    plan = detail::plan_cluster(p, max_n);
    if (plan.path != SelectPath::cluster && p.path == SelectPath::cluster)
      throw ConfigError("select_topk: the cluster path needs thread-block clusters (sm_90 code and device), at most " +
                        std::to_string(kSelectMaxHeads) + " query heads and a max_n whose keys fit one cluster's shared memory");
  } else {
    plan.path = path;
  }
  return plan;
}

// OmniKV selection from the logits and lse of a dense pass over the filter layer, as plan_select
// decided; the same result on every path. Only launches (graph-capturable); p must keep the shape
// the plan was made for (its sequences at most plan.max_n long).
// Measured at Llama 128K x 8 (docs/BENCHMARKS.md): multi_block 0.25 ms, one_block 0.135, cluster 0.086.
inline void select_topk(const SelectParams& p, const SelectPlan& plan, vendor::stream_t stream) {
  detail::check_select(p, plan.max_n, plan.path);
  if (plan.path == SelectPath::cluster && p.n_q_heads > kSelectMaxHeads)
    throw ConfigError("select_topk: the plan's cluster path takes at most " + std::to_string(kSelectMaxHeads) + " query heads");
  if (p.batch == 0) return;
  const std::int64_t max_n = plan.max_n;
  if (plan.path == SelectPath::cluster) {
    if constexpr (vendor::kClusters) {
      constexpr int NT = kSelectClusterThreads;
      vendor::launch_cluster(select_cluster_kernel<vendor::kWarpSize, NT>, dim3(unsigned(plan.cluster), unsigned(p.batch)), dim3(NT),
                             std::size_t(plan.per) * 4, stream, unsigned(plan.cluster), p, int(plan.per));
      return;
    } else {
      throw ConfigError("select_topk: the cluster path is not built here");
    }
  }
  if (plan.path == SelectPath::multi_block) {
    constexpr int NT = 256;
    const int chunks = int(std::max<std::int64_t>(1, (max_n + kSelectChunk - 1) / kSelectChunk));
    const SelectWork w = select_work(p.work, p.batch, chunks);
    vendor::memset_async(w.hist, 0, std::size_t(p.batch) * 4 * 256 * sizeof(std::uint32_t), stream);
    const dim3 grid(unsigned(chunks), unsigned(p.batch));
    select_keys_kernel<NT><<<grid, NT, 0, stream>>>(p, w);
    vendor::check_launch("select_keys_kernel");
    for (int d = 0; d < 4; ++d) {
      if (d > 0) {
        select_hist_kernel<NT><<<grid, NT, 0, stream>>>(p, w, d);
        vendor::check_launch("select_hist_kernel");
      }
      select_pick_kernel<NT><<<p.batch, NT, 0, stream>>>(p, w, d);
      vendor::check_launch("select_pick_kernel");
    }
    select_count_kernel<NT><<<grid, NT, 0, stream>>>(p, w);
    vendor::check_launch("select_count_kernel");
    select_write_kernel<vendor::kWarpSize, NT><<<grid, NT, 0, stream>>>(p, w);
    vendor::check_launch("select_write_kernel");
    return;
  }
  const int chunks = int(std::min<std::int64_t>(1024, (max_n + 255) / 256));
  score_keys_kernel<256><<<dim3(std::max(1, chunks), p.batch), 256, 0, stream>>>(p);
  vendor::check_launch("score_keys_kernel");
  select_kernel<vendor::kWarpSize, kSelectThreads><<<p.batch, kSelectThreads, 0, stream>>>(p);
  vendor::check_launch("select_kernel");
}

// plan_select + select_topk in one call: the host decisions each call (a few host queries on the
// cluster path). Engines that step repeatedly keep a plan instead.
inline void select_topk(const SelectParams& p, std::int64_t max_n, vendor::stream_t stream) {
  select_topk(p, plan_select(p, max_n), stream);
}

// Bytes of dynamic shared memory the sparse kernel needs for this layer shape.
inline std::size_t sparse_smem(int head_dim, int n_q_heads, int n_kv_heads, int latent_dim, int k, bool weights_from_l2 = false) {
  return sparse_smem_bytes(head_dim, n_q_heads / n_kv_heads, latent_dim, k, !weights_from_l2);
}
// The exact blocks' shared memory (sparse_exact_role): each warp's q heads as f32.
inline std::size_t sparse_exact_smem_bytes(int head_dim, int group, int block_threads) {
  return std::size_t(block_threads / vendor::kWarpSize) * group * (head_dim + 4) * 4;
}

namespace detail {
// The checks both sparse paths share.
template <class T>
void check_sparse(const SparseDecodeParams<T>& p, const char* what) {
  const std::string w = what;
  check_shape(p.head_dim, p.n_q_heads, p.n_kv_heads, what);
  const auto& L = p.layer;
  if (L.latent_dim <= 0 || L.latent_dim % 16 != 0) throw ConfigError(w + ": latent_dim must be a positive multiple of 16");
  if (L.latent_bits != 0 && L.latent_bits != 4 && L.latent_bits != 8) throw ConfigError(w + ": latent_bits must be 0, 4 or 8");
  if (L.k < 1 || L.k > 4) throw ConfigError(w + ": 1 to 4 references per latent (the paper uses 4)");
  if (L.lat_ld % 16 != 0 || L.lat_ld * 8 != std::int64_t(L.latent_dim) * (L.latent_bits == 0 ? 8 * int(sizeof(T)) : L.latent_bits) ||
      L.lat_ld / 16 * kSparseTile > kSparseMaxTilePieces)
    throw ConfigError(w + ": latent rows must be packed, a multiple of 16 bytes and at most 8 KiB per 32 tokens");
  if (!L.w_dec || !L.pos_code) throw ConfigError(w + ": decoder weight and position table are required");
  // rope_sincos converts positions to float, exactly below 2^24 (the table's max_pos bounds them, as
  // for the tables themselves: the caller's positions are not checked against it here)
  if (p.style != RopeStyle::none && p.rope.freq && p.rope.max_pos > (std::int64_t(1) << 24))
    throw ConfigError(w + ": RoPE freq takes positions below 2^24 (max_pos above it)");
  if (p.n_splits <= 0) throw ConfigError(w + ": n_splits must be positive");
  if (p.exact_blocks < 0) throw ConfigError(w + ": exact_blocks must be 0 (none) or positive");
  if (p.exact_parts < 1) throw ConfigError(w + ": exact_parts must be positive");
  // the kernels' int indices: grid blocks, the exact warps' stride and work items, partial slots
  constexpr std::int64_t kIntMax = 0x7fffffff;
  if (std::int64_t(p.n_splits) * p.n_kv_heads * p.batch + p.exact_blocks > kIntMax || std::int64_t(p.exact_blocks) * 1024 > kIntMax ||
      std::int64_t(p.batch) * p.n_kv_heads * p.exact_parts > kIntMax || std::int64_t(p.n_splits) + p.exact_parts > kIntMax)
    throw ConfigError(w + ": n_splits, exact_blocks or exact_parts too large for the kernels' 32-bit indices");
  if (p.block_threads != 0 && !sparse_block_threads_valid(p.head_dim, p.block_threads))
    throw ConfigError(w + ": block_threads must be 0 (default), 256, or 512 with head_dim 128 (CUDA)");
  check_rope(p.rope, p.style, p.head_dim, 0, what);
}
}  // namespace detail

// The fused sparse pass over one compressed layer: partials_floats(B, Hq, sparse_partial_slots(p), D)
// floats at p.part, merged by combine() with n_splits = sparse_partial_slots(p).
template <class Shapes = AllShapes, class T>
void sparse_partials(const SparseDecodeParams<T>& p, vendor::stream_t stream) {
  static_assert(!std::is_same_v<T, float>, "the fused sparse path stores 16-bit values (bf16 / f16)");
  detail::check_sparse(p, "sparse_decode");
  const auto& L = p.layer;
  if (p.batch == 0) return;
  const int threads = p.weights_from_l2 ? 256 : sparse_block_threads(p.head_dim, p.block_threads);
  std::size_t smem = sparse_smem(p.head_dim, p.n_q_heads, p.n_kv_heads, L.latent_dim, L.k, p.weights_from_l2);
  if (p.exact_blocks > 0) smem = std::max(smem, sparse_exact_smem_bytes(p.head_dim, p.n_q_heads / p.n_kv_heads, threads));
  const int smem_max = vendor::max_smem_per_block(vendor::current_device());
  if (smem > std::size_t(smem_max))
    throw CapacityError("sparse_decode: this shape needs " + std::to_string(smem) + " bytes of shared memory per block (W_k,h of " +
                        "head_dim x latent_dim and the tiles); the device allows " + std::to_string(smem_max) +
                        " (weights_from_l2 or a smaller latent_dim fits; the cache's tiled attend() serves any shape)");
  constexpr int W = vendor::kWarpSize;
  // one dimension: the splits' blocks (split fastest, then kv head, then sequence), then the exact ones
  const unsigned grid = unsigned(std::int64_t(p.n_splits) * p.n_kv_heads * p.batch + p.exact_blocks);
  detail::dispatch<Shapes>(p.head_dim, p.n_q_heads / p.n_kv_heads, [&](auto d, auto g) {
    constexpr int Dv = decltype(d)::value, Gv = decltype(g)::value;
    auto launch = [&](auto kernel, int nt) {
      vendor::allow_dynamic_smem(kernel, int(smem));
      kernel<<<grid, nt, smem, stream>>>(p);
    };
    // The weights-from-L2 variant exists for the tensor-core build only: on HIP the tile product is
    // the per-lane fallback and AMD's 64 KB of LDS per block fits neither variant.
    if constexpr (vendor::kTensorTiles) {
      if (p.weights_from_l2) {
        launch(sparse_decode_kernel<T, Dv, Gv, W, 256, true>, 256);
        return;
      }
    } else {
      if (p.weights_from_l2) throw ConfigError("sparse_decode: weights_from_l2 is built for CUDA (tensor-core tiles) only");
    }
    if constexpr (Dv == 128 && vendor::kTensorTiles) {
      if (threads == 512) {
        launch(sparse_decode_kernel<T, Dv, Gv, W, 512, false>, 512);
        return;
      }
    }
    launch(sparse_decode_kernel<T, Dv, Gv, W, 256, false>, 256);
  });
  vendor::check_launch("sparse_decode_kernel");
}

// ---- the two-pass sparse path (sparse_two_pass.cuh) ----------------------------------------
// Attended items per sequence are at most sinks + ld_sel + window: the scores scratch's row length.
template <class T>
std::int64_t two_pass_max_items(const SparseDecodeParams<T>& p) {
  return std::int64_t(p.sinks) + (p.sel_count ? p.ld_sel : 0) + p.window;
}
// Splits of the values pass: about sixteen blocks per multiprocessor (short item walks per block),
// at least 64 items each.
inline int two_pass_splits(std::int64_t max_items, int batch, int n_kv_heads, int sms) {
  const std::int64_t pairs = std::max<std::int64_t>(1, std::int64_t(batch) * n_kv_heads);
  const std::int64_t by_sms = std::max<std::int64_t>(1, (16 * std::int64_t(sms) + pairs - 1) / pairs);
  const std::int64_t by_work = std::max<std::int64_t>(1, (max_items + 63) / 64);
  return int(std::min(by_sms, by_work));
}

// The same partials as sparse_partials (combine them with combine()), in two launches: scores of
// every attended item into p.scores, then the values per split. Tested against the float64 reference
// (tests/cuda/test_decode.cu); on the H100 it is slower than the fused kernel (docs/BENCHMARKS.md).
template <class Shapes = AllShapes, class T>
void sparse_partials_two_pass(const SparseDecodeParams<T>& p, vendor::stream_t stream) {
  static_assert(!std::is_same_v<T, float>, "the sparse path stores 16-bit values (bf16 / f16)");
  detail::check_sparse(p, "sparse_decode (two pass)");
  if (p.exact_blocks != 0) throw ConfigError("sparse_decode (two pass): exact_blocks is the fused kernel's (set it to 0)");
  const auto& L = p.layer;
  if (L.latent_dim > kTwoPassMaxLatent)
    throw ConfigError("sparse_decode (two pass): latent_dim above " + std::to_string(kTwoPassMaxLatent));
  const std::int64_t items = two_pass_max_items(p);
  if (!p.scores) throw ConfigError("sparse_decode (two pass): the scores scratch is required");
  if (p.ld_scores < items)
    throw ShapeError("sparse_decode (two pass): ld_scores " + std::to_string(p.ld_scores) + " < sinks + ld_sel + window = " +
                     std::to_string(items));
  if (p.batch == 0) return;
  const int G = p.n_q_heads / p.n_kv_heads;
  const std::size_t s1 = sparse_scores_smem(p.head_dim, G, L.latent_dim), s2 = sparse_values_smem(p.head_dim, G, L.latent_dim);
  const int smem_max = vendor::max_smem_per_block(vendor::current_device());
  if (std::max(s1, s2) > std::size_t(smem_max))
    throw CapacityError("sparse_decode (two pass): needs " + std::to_string(std::max(s1, s2)) +
                        " bytes of shared memory per block; the device allows " + std::to_string(smem_max));
  const unsigned tiles = unsigned(std::max<std::int64_t>(1, (items + kTwoPassTile - 1) / kTwoPassTile));
  constexpr int W = vendor::kWarpSize;
  detail::dispatch<Shapes>(p.head_dim, G, [&](auto d, auto g) {
    constexpr int Dv = decltype(d)::value, Gv = decltype(g)::value;
    auto k1 = sparse_scores_kernel<T, Dv, Gv, W, kTwoPassThreads>;
    vendor::allow_dynamic_smem(k1, int(s1));
    k1<<<dim3(tiles, p.n_kv_heads, p.batch), kTwoPassThreads, s1, stream>>>(p);
    vendor::check_launch("sparse_scores_kernel");
    auto k2 = sparse_values_kernel<T, Dv, Gv, W, kTwoPassThreads>;
    vendor::allow_dynamic_smem(k2, int(s2));
    k2<<<dim3(p.n_splits, p.n_kv_heads, p.batch), kTwoPassThreads, s2, stream>>>(p);
    vendor::check_launch("sparse_values_kernel");
  });
}

}  // namespace deltakv::gpu::decode
