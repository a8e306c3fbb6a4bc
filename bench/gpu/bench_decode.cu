// GPU decode-step benchmark: one decode step (one new token per sequence, every layer) of
//   - our dense kernel over bf16 KV in all layers, and
//   - DeltaKV + OmniKV: full layers dense over exact bf16 rows (the filter layers also score and
//     select the top-K), the other layers sparse over the compressed cache (int4 latents),
// for the model shapes and contexts of issue 5. Prints one JSON object per configuration (the
// driver bench/gpu/run_bench.py adds torch SDPA, measured in the same run, and prints the table).
//
// The cache contents are synthetic (random values, random references among the visible ones):
// time and bytes do not depend on the values. The step is captured into a graph and replayed.
// Bytes "the step must read" count what the kernels cannot avoid: every attended exact row's
// K and V slices, every selected latent (codes, scale/min, reference ids), each distinct
// reference row once, the decoder weights, q and the outputs.
//
// usage: bench_decode [--quick | --prefill | --only MODEL CTX BATCH]
//   --quick: small contexts (smoke run); --prefill: the prefill compression rows only;
//   --only: one decode configuration, no prefill (profiling)
// It also prints the device's streaming-read bandwidth (read_probe: the ceiling of a pass that only
// reads, like the dense layers) besides the copy bandwidth the byte floors use.
// Tuning knobs (environment): DELTAKV_DENSE_SPLIT_LEN (tokens per dense split, a multiple of 64 for
// the tensor-core kernel), DELTAKV_SPARSE, DELTAKV_SELECT_PATH, DELTAKV_PHASES (see below);
// DELTAKV_PREFILL_OPS: each prefill row also prints its GPU time per kind of device op
// (timed_device.hpp) and the GPU's busy time against the wall time; DELTAKV_BLOCKS_PER_PASS sets the
// prefill cache's pass size; DELTAKV_PREFILL_MODE=0|1|2 runs that prefill row only (profiling).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "deltakv/gpu/decode_step.hpp"
#include "deltakv/cache.hpp"
#include "deltakv/gpu/gpu_device.hpp"
#include "deltakv/gpu/vendor.hpp"
#include "deltakv/gpu/vendor_ext.hpp"
#include "read_probes.cuh"
#include "timed_device.hpp"

namespace {

namespace dec = deltakv::gpu::decode;
// The fused kernels of the two benchmarked models only: Llama-3.1-8B (head_dim 128, 4 q heads per kv
// head) and Qwen2.5-7B (128, 7).
using Shapes = dec::ShapeSet<dec::KernelShape<128, 4>, dec::KernelShape<128, 7>>;
namespace vendor = deltakv::gpu::vendor;
using bf = vendor::bf16;

struct Model {
  const char* name;
  int layers, hq, hkv, d;
  std::vector<int> full;
};

std::uint32_t hash3(std::uint64_t a, std::uint64_t b, std::uint64_t c) {
  std::uint64_t x = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull) * 0xC2B2AE3D27D4EB4Full ^ c * 0x165667B19E3779F9ull;
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  return std::uint32_t(x);
}

__global__ void fill_bf16(bf* p, std::size_t n, std::uint32_t seed, float amp) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x) {
    std::uint32_t x = std::uint32_t(i) * 2654435761u ^ seed * 2246822519u ^ std::uint32_t(i >> 32);
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    p[i] = vendor::from_float<bf>(amp * (float(x & 0xFFFF) / 32768.f - 1.f));
  }
}
__global__ void fill_bytes(std::uint8_t* p, std::size_t n, std::uint32_t seed) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x)
    p[i] = std::uint8_t((std::uint32_t(i) * 2654435761u ^ seed) >> 13);
}
__global__ void fill_scale(float* p, std::size_t rows) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < rows; i += std::size_t(gridDim.x) * blockDim.x) {
    p[2 * i] = 0.01f;
    p[2 * i + 1] = -0.075f;
  }
}

struct Dev {
  void* p = nullptr;
  explicit Dev(std::size_t bytes) { p = vendor::malloc_device(std::max<std::size_t>(bytes, 16)); }
  ~Dev() { vendor::free_device(p); }
  Dev(const Dev&) = delete;
  template <class T>
  T* as() const { return static_cast<T*>(p); }
};

std::size_t al(std::size_t v) { return (v + 255) / 256 * 256; }

using deltakv::bench::read_probe;
using deltakv::bench::read_probe_bulk;
using deltakv::bench::read_rate;
// The best read-only bandwidth of a few launch shapes (bytes read per second, 4 GiB buffer): 16-byte
// loads, and bulk copies where this binary has sm_90 code for them and the device runs it.
double read_bandwidth(vendor::stream_t s, int sms) {
  const std::size_t bytes = std::size_t(4) << 30;
  Dev a(bytes), o(1 << 20);
  vendor::memset_async(a.p, 1, bytes, s);
  double best = 0;
  constexpr int kStages = 4, kChunk = 16384;
  auto bulk = read_probe_bulk<kStages, kChunk>;
  if (vendor::cluster_launch_ok(bulk, vendor::current_device())) {
    vendor::allow_dynamic_smem(bulk, kStages * kChunk);
    for (int bps : {1, 2})
      best = std::max(best, read_rate([&] { bulk<<<sms * bps, 128, kStages * kChunk, s>>>(a.as<unsigned char>(), bytes, o.as<unsigned>()); },
                                      double(bytes), s));
    vendor::check_launch("read_probe_bulk");
  }
  for (int bps : {2, 4, 8})
    for (int u : {4, 8})
      best = std::max(best, read_rate(
                                [&] {
                                  if (u == 4) read_probe<4><<<sms * bps, 512, 0, s>>>(a.as<uint4>(), bytes / 16, o.as<unsigned>());
                                  else read_probe<8><<<sms * bps, 512, 0, s>>>(a.as<uint4>(), bytes / 16, o.as<unsigned>());
                                },
                                double(bytes), s));
  return best;
}

double copy_bandwidth(vendor::stream_t s) {  // bytes read + written per second, 2 GiB copies
  const std::size_t bytes = std::size_t(2) << 30;
  Dev a(bytes), b(bytes);
  vendor::memset_async(a.p, 1, bytes, s);
  auto e0 = vendor::event_create(), e1 = vendor::event_create();
  for (int i = 0; i < 2; ++i) vendor::memcpy_d2d_async(b.p, a.p, bytes, s);
  vendor::event_record(e0, s);
  const int reps = 10;
  for (int i = 0; i < reps; ++i) vendor::memcpy_d2d_async(b.p, a.p, bytes, s);
  vendor::event_record(e1, s);
  const double ms = vendor::event_ms(e0, e1);
  vendor::event_destroy(e0);
  vendor::event_destroy(e1);
  return 2.0 * bytes * reps / (ms * 1e-3);
}

struct Result {
  double dense_ms = 0, deltakv_ms = 0, dense_bytes = 0, deltakv_bytes = 0, resident_bytes = 0, bf16_bytes = 0;
  double dense_layer_ms = 0, sparse_layer_ms = 0, select_ms = 0, full_layer_ms = 0, topk_ms = 0, topk1_ms = 0, topkc_ms = 0,
         topkc16_ms = 0, combine_ms = 0, sparse_l2_ms = 0, sparse_2p_ms = 0, sparse_256_ms = 0, full_lane_ms = 0;
};

template <class F>
double time_graph(F&& body, vendor::stream_t s, int reps) {
  vendor::capture_begin(s);
  body();
  auto g = vendor::capture_end(s);
  for (int i = 0; i < 2; ++i) vendor::graph_launch(g, s);
  auto e0 = vendor::event_create(), e1 = vendor::event_create();
  vendor::event_record(e0, s);
  for (int i = 0; i < reps; ++i) vendor::graph_launch(g, s);
  vendor::event_record(e1, s);
  const double ms = vendor::event_ms(e0, e1) / reps;
  vendor::event_destroy(e0);
  vendor::event_destroy(e1);
  vendor::graph_destroy(g);
  return ms;
}

Result run(const Model& m, std::int64_t N, int B, int sms, vendor::stream_t s) {
  const int D = m.d, Hq = m.hq, Hkv = m.hkv, kvd = 2 * Hkv * D, qd = Hq * D;
  const int DC = kvd / 4, bits = 4, K_REF = 4, STRIDE = 10, SINKS = 8, RECENT = 128, BLOCK = 128, TOPK = 2048;
  const int RING = RECENT + BLOCK;
  const float scale = 1.f / std::sqrt(float(D));
  std::vector<char> is_full(m.layers, 0);
  for (int l : m.full) is_full[l] = 1;
  // position table (shared): references every STRIDE-th token after the sinks
  std::vector<std::int32_t> code(N, 0), refs_upto(N, 0);
  std::int64_t refs = 0;
  for (std::int64_t p = SINKS; p < N; ++p) {
    if ((p - SINKS) % STRIDE == 0) code[p] = std::int32_t(refs++ << 2 | 1);
    else code[p] = std::int32_t((p - SINKS - refs) << 2 | 2);
    refs_upto[p] = std::int32_t(refs);
  }
  const std::int64_t lat_total = N - SINKS - refs;
  // everything up to N - RING is compressed (a multiple of BLOCK past the sinks)
  const std::int64_t cfront = SINKS + std::max<std::int64_t>(0, (N - SINKS - RECENT) / BLOCK * BLOCK);
  const std::int64_t lat_ld = DC * bits / 8;
  std::size_t o = 0;
  const std::size_t off_sinks = o; o += al(std::size_t(SINKS) * kvd * 2);
  const std::size_t off_ring = o; o += al(std::size_t(RING) * kvd * 2);
  const std::size_t off_refs = o; o += al(std::size_t(refs) * kvd * 2);
  const std::size_t off_lat = o; o += al(std::size_t(lat_total) * lat_ld);
  const std::size_t off_scale = o; o += al(std::size_t(lat_total) * 8);
  const std::size_t off_ids = o; o += al(std::size_t(lat_total) * K_REF * 4);
  const std::size_t seq_bytes = o;

  Result r;
  r.bf16_bytes = double(m.layers) * B * N * kvd * 2;
  const std::size_t exact_layer = std::size_t(B) * N * kvd * 2;
  std::vector<Dev*> full_buf, comp_buf, wdec;
  for (int l = 0; l < m.layers; ++l) {
    if (is_full[l]) {
      full_buf.push_back(new Dev(exact_layer));
      fill_bf16<<<1024, 256, 0, s>>>(full_buf.back()->as<bf>(), exact_layer / 2, 100 + l, 1.f);
      r.resident_bytes += exact_layer;
    } else {
      comp_buf.push_back(new Dev(seq_bytes * B));
      auto* base = comp_buf.back()->as<std::uint8_t>();
      wdec.push_back(new Dev(std::size_t(kvd) * DC * 2));
      fill_bf16<<<1024, 256, 0, s>>>(wdec.back()->as<bf>(), std::size_t(kvd) * DC, 300 + l, 0.05f);
      std::vector<std::int32_t> ids(std::size_t(lat_total) * K_REF);
      for (int b = 0; b < B; ++b) {
        std::uint8_t* sb = base + seq_bytes * b;
        fill_bf16<<<1024, 256, 0, s>>>(reinterpret_cast<bf*>(sb), (off_lat - off_sinks) / 2, 200 + l * 64 + b, 1.f);
        fill_bytes<<<1024, 256, 0, s>>>(sb + off_lat, std::size_t(lat_total) * lat_ld, 7 + l * 64 + b);
        fill_scale<<<256, 256, 0, s>>>(reinterpret_cast<float*>(sb + off_scale), std::size_t(lat_total));
        for (std::int64_t p = SINKS; p < cfront; ++p)
          if ((code[p] & 3) == 2)
            for (int j = 0; j < K_REF; ++j)
              ids[std::size_t(code[p] >> 2) * K_REF + j] = std::int32_t(hash3(l, b * N + p, j) % std::uint32_t(refs_upto[p]));
        vendor::memcpy_async(sb + off_ids, ids.data(), ids.size() * 4, s);
        vendor::stream_sync(s);
      }
      const std::int64_t nref_now = cfront > SINKS ? refs_upto[cfront - 1] : 0;
      const std::int64_t nlat_now = (cfront - SINKS) - nref_now;
      r.resident_bytes += double(B) * (std::min<std::int64_t>(SINKS, N) * kvd * 2.0 + std::min<std::int64_t>(N - cfront, RING) * kvd * 2.0 +
                                       nref_now * kvd * 2.0 + nlat_now * (lat_ld + 8.0 + K_REF * 4.0));
    }
  }
  Dev code_d(N * 4);
  vendor::memcpy_async(code_d.p, code.data(), N * 4, s);
  auto rt = dec::rope_table(500000.0, D, N + 1);
  Dev hi(rt.hi.size() * 4), lo(rt.lo.size() * 4);
  vendor::memcpy_async(hi.p, rt.hi.data(), rt.hi.size() * 4, s);
  vendor::memcpy_async(lo.p, rt.lo.data(), rt.lo.size() * 4, s);
  Dev freq(rt.freq.size() * 4);
  vendor::memcpy_async(freq.p, rt.freq.data(), rt.freq.size() * 4, s);
  // the sparse kernel's keys' cos/sin computed from freq (default) or read from the tables
  // (DELTAKV_ROPE_TABLES=1, A/B)
  const bool rope_tables = std::getenv("DELTAKV_ROPE_TABLES") != nullptr;
  const dec::RopeTableView rope{hi.as<float>(), lo.as<float>(), rt.half, rt.max_pos, rope_tables ? nullptr : freq.as<float>()};
  Dev q(std::size_t(B) * qd * 2), out(std::size_t(B) * qd * 2);
  fill_bf16<<<64, 256, 0, s>>>(q.as<bf>(), std::size_t(B) * qd, 9, 1.f);
  std::vector<std::int32_t> nh(B, std::int32_t(N)), ch(B, std::int32_t(cfront));
  Dev n_d(B * 4), c_d(B * 4);
  vendor::memcpy_async(n_d.p, nh.data(), B * 4, s);
  vendor::memcpy_async(c_d.p, ch.data(), B * 4, s);
  auto sp = dec::dense_splits(N, B, Hkv, sms);
  const char* split_env = std::getenv("DELTAKV_DENSE_SPLIT_LEN");  // tuning: tokens per dense split
  if (const int len = split_env ? std::atoi(split_env) : 0; len > 0) {
    sp.split_len = len;
    sp.n_splits = int((N + len - 1) / len);
  }
  const auto sp_lane = dec::dense_splits(N, B, Hkv, sms, dec::kDenseLaneBlocksPerSm, dec::kDenseLaneMaxSplitLen);  // the lane kernel's own
  const int attended_max = SINKS + TOPK + RECENT;
  const int ssplits = dec::sparse_splits(attended_max, B, Hkv, sms);  // without exact blocks (and W from L2)
  // the fused step's sparse pass: the sinks and window on exact blocks, the splits over the selection
  // (DELTAKV_EXACT_BLOCKS=0: splits over the whole list, as before, for A/B in one binary)
  const dec::SparsePlan splan = dec::sparse_plan(TOPK, B, Hkv, sms, dec::sparse_block_threads(D)),
                        splan256 = dec::sparse_plan(TOPK, B, Hkv, sms, 256);
  const int tsplits = dec::two_pass_splits(attended_max, B, Hkv, sms);  // the two-pass path's values splits
  const int max_slots = std::max({sp.n_splits, sp_lane.n_splits, ssplits, tsplits, splan.n_splits + splan.exact_parts,
                                  splan256.n_splits + splan256.exact_parts});
  Dev part(dec::partials_floats(B, Hq, max_slots, D) * 4);
  Dev scores(std::size_t(B) * Hq * attended_max * 4);                  // the two-pass path's logits
  Dev logits(std::size_t(B) * Hq * N * 2), lse(std::size_t(B) * Hq * 4), keys(std::size_t(B) * N * 4);
  Dev select_work(dec::select_work_words(B, N) * 4);  // the multi-block selection's scratch
  std::vector<Dev*> sel;  // one selection per run of sparse layers (owned by its filter layer)
  for (int l = 0; l < m.layers; ++l) sel.push_back(nullptr);
  Dev sel_count_all(std::size_t(m.layers) * B * 4);
  vendor::stream_sync(s);

  const char* select_env_c = std::getenv("DELTAKV_SELECT_PATH");
  const std::string select_env = select_env_c ? select_env_c : "";
  std::optional<dec::SelectPlan> select_plan;  // every filter layer selects over the same shape
  auto dense_layer = [&](const bf* kv, bool filter, int l, bool lane_kernel = false) {
    const dec::SplitPlan& pl = lane_kernel ? sp_lane : sp;
    dec::DenseDecodeParams<bf> p{q.as<bf>(), qd, kv, std::int64_t(N) * kvd, n_d.as<std::int32_t>(), B, Hq, Hkv, D, scale,
                                 rope, deltakv::RopeStyle::half, pl.split_len, pl.n_splits, part.as<float>(),
                                 filter ? logits.as<std::uint16_t>() : nullptr, N};
    p.lane_kernel = lane_kernel;
    dec::dense_partials<Shapes>(p, N, s);
    dec::combine(dec::CombineParams<bf>{part.as<float>(), pl.n_splits, B, Hq, D, out.as<bf>(), qd, filter ? lse.as<float>() : nullptr}, s);
    if (filter) {
      if (!sel[l]) sel[l] = new Dev(std::size_t(B) * TOPK * 4);
      dec::SelectParams sp_{logits.as<std::uint16_t>(), N, lse.as<float>(), n_d.as<std::int32_t>(), B, Hq, SINKS, RECENT,
                            TOPK, keys.as<std::uint32_t>(), N, sel[l]->as<std::int32_t>(), TOPK,
                            sel_count_all.as<std::int32_t>() + l * B};
      // DELTAKV_SELECT_PATH=multi / one_block / cluster16 for A/B; else the automatic path (the cluster one on sm_90)
      if (select_env == "multi") sp_.work = select_work.as<std::uint32_t>();
      if (select_env == "one_block") sp_.path = dec::SelectPath::one_block;
      if (select_env == "cluster16") sp_.cluster = 16;
      if (!select_plan) select_plan = dec::plan_select(sp_, N);  // the host decisions once, as an engine keeps them
      dec::select_topk(sp_, *select_plan, s);
    }
  };
  // The step's sparse path: DELTAKV_SPARSE=l2 (fused, W_k,h read from L2), =two_pass, =t256 (fused,
  // 256-thread blocks), else the fused default.
  const char* sparse_env = std::getenv("DELTAKV_SPARSE");
  const std::string senv = sparse_env ? sparse_env : "";
  enum class SparseRun { fused, weights_l2, two_pass, fused_256 };  // the fused default and the variants it is timed against
  const SparseRun step_path = senv == "l2"         ? SparseRun::weights_l2
                              : senv == "two_pass" ? SparseRun::two_pass
                              : senv == "t256"     ? SparseRun::fused_256
                                                   : SparseRun::fused;
  // DELTAKV_EXACT_BLOCKS=0: the fused passes split the whole list, as before exact blocks (A/B)
  const char* exact_env = std::getenv("DELTAKV_EXACT_BLOCKS");
  const bool exact_blocks = !(exact_env && std::string(exact_env) == "0");
  int sparse_slots = 0;  // partial slots of the last sparse pass (the combine's n_splits)
  auto sparse_layer = [&](int ci, int filter_layer, unsigned long long* profile = nullptr, SparseRun path = SparseRun::fused) {
    dec::CompressedLayerView<bf> v{reinterpret_cast<const std::byte*>(comp_buf[ci]->p), seq_bytes, off_sinks, off_ring, off_refs,
                                   off_lat, off_scale, off_ids, SINKS, RING, DC, bits, K_REF, lat_ld, code_d.as<std::int32_t>(),
                                   wdec[ci]->as<bf>(), nullptr};
    dec::SparseDecodeParams<bf> p{q.as<bf>(), qd, v, n_d.as<std::int32_t>(), c_d.as<std::int32_t>(),
                                  sel[filter_layer]->as<std::int32_t>(), TOPK,
                                  sel_count_all.as<std::int32_t>() + filter_layer * B, B, Hq, Hkv, D, scale, rope,
                                  deltakv::RopeStyle::half, SINKS, RECENT, ssplits, part.as<float>(), profile};
    p.weights_from_l2 = path == SparseRun::weights_l2;
    if (path == SparseRun::fused_256) p.block_threads = 256;
    if (exact_blocks && (path == SparseRun::fused || path == SparseRun::fused_256)) {
      const dec::SparsePlan& pl = path == SparseRun::fused ? splan : splan256;
      p.n_splits = pl.n_splits;
      p.exact_blocks = pl.exact_blocks;
      p.exact_parts = pl.exact_parts;
    }
    if (path == SparseRun::two_pass) {
      p.n_splits = tsplits;
      p.scores = scores.as<float>();
      p.ld_scores = attended_max;
      dec::sparse_partials_two_pass<Shapes>(p, s);
    } else {
      dec::sparse_partials<Shapes>(p, s);
    }
    sparse_slots = dec::sparse_partial_slots(p);
    dec::combine(dec::CombineParams<bf>{part.as<float>(), sparse_slots, B, Hq, D, out.as<bf>(), qd, nullptr}, s);
  };
  // filter layer of each sparse layer: the last full layer before it
  std::vector<int> filter_of(m.layers, -1);
  for (int l = 0, last = -1; l < m.layers; ++l) {
    if (is_full[l]) last = l;
    else filter_of[l] = last;
  }
  std::vector<char> is_filter(m.layers, 0);
  for (int l = 0; l < m.layers; ++l)
    if (filter_of[l] >= 0) is_filter[filter_of[l]] = 1;
  // warm the selections (the graph body reads them)
  for (int l = 0, fi = 0; l < m.layers; ++l)
    if (is_full[l]) dense_layer(full_buf[fi++]->as<bf>(), is_filter[l], l);
  vendor::stream_sync(s);

  const int reps = N * B >= 1000000 ? 5 : 20;
  r.deltakv_ms = time_graph([&] {
    for (int l = 0, fi = 0, ci = 0; l < m.layers; ++l) {
      if (is_full[l]) dense_layer(full_buf[fi++]->as<bf>(), is_filter[l], l);
      else sparse_layer(ci++, filter_of[l], nullptr, step_path);
    }
  }, s, reps);
  r.dense_ms = time_graph([&] {
    for (int l = 0; l < m.layers; ++l) dense_layer(full_buf[l % full_buf.size()]->as<bf>(), false, l);
  }, s, reps);
  // per-kind layer times (same kernels, one layer each, many replays)
  r.full_layer_ms = time_graph([&] { dense_layer(full_buf[0]->as<bf>(), false, 0); }, s, reps * 4);
  // the same layer with the CUDA-core lane kernel (the default before the tensor-core one)
  r.full_lane_ms = time_graph([&] { dense_layer(full_buf[0]->as<bf>(), false, 0, true); }, s, reps * 4);
  const int f0 = filter_of[m.layers - 1];
  r.select_ms = time_graph([&] { dense_layer(full_buf[0]->as<bf>(), true, f0); }, s, reps * 4) - r.full_layer_ms;
  // scores + top-K alone, from the logits and lse left by the warm-up, on each path: multi-block
  // (topk_ms), one block per sequence (topk1_ms), clusters of 8 and 16 blocks per sequence
  // (topkc_ms, topkc16_ms; 0 where the device has no clusters). The step takes the automatic path.
  auto topk = [&](dec::SelectPath path, int cluster = 0) {
    dec::SelectParams p{logits.as<std::uint16_t>(), N, lse.as<float>(), n_d.as<std::int32_t>(), B, Hq, SINKS, RECENT,
                        TOPK, keys.as<std::uint32_t>(), N, sel[f0]->as<std::int32_t>(), TOPK,
                        sel_count_all.as<std::int32_t>() + f0 * B};
    p.path = path;
    p.cluster = cluster;
    if (path == dec::SelectPath::multi_block) p.work = select_work.as<std::uint32_t>();
    dec::select_topk(p, N, s);
  };
  r.topk_ms = time_graph([&] { topk(dec::SelectPath::multi_block); }, s, reps * 4);
  r.topk1_ms = time_graph([&] { topk(dec::SelectPath::one_block); }, s, reps * 4);
  const bool clusters = dec::select_cluster_supported();
  r.topkc_ms = clusters ? time_graph([&] { topk(dec::SelectPath::cluster, 8); }, s, reps * 4) : 0.0;
  r.topkc16_ms = clusters ? time_graph([&] { topk(dec::SelectPath::cluster, 16); }, s, reps * 4) : 0.0;
  int first_sparse = 0;
  while (is_full[first_sparse]) ++first_sparse;
  r.sparse_layer_ms = time_graph([&] { sparse_layer(0, filter_of[first_sparse]); }, s, reps * 4);
  // the sparse layer's split merge alone (a separate launch after every layer's partials)
  const int default_slots = sparse_slots;
  r.combine_ms = time_graph([&] {
    dec::combine(dec::CombineParams<bf>{part.as<float>(), default_slots, B, Hq, D, out.as<bf>(), qd, nullptr}, s);
  }, s, reps * 4);
  r.sparse_l2_ms = time_graph([&] { sparse_layer(0, filter_of[first_sparse], nullptr, SparseRun::weights_l2); }, s, reps * 4);
  r.sparse_2p_ms = time_graph([&] { sparse_layer(0, filter_of[first_sparse], nullptr, SparseRun::two_pass); }, s, reps * 4);
  r.sparse_256_ms = time_graph([&] { sparse_layer(0, filter_of[first_sparse], nullptr, SparseRun::fused_256); }, s, reps * 4);

  if (std::getenv("DELTAKV_PHASES")) {  // where a sparse layer's block time goes (cycles per phase)
    Dev prof(9 * 8);
    vendor::memset_async(prof.p, 0, 9 * 8, s);
    sparse_layer(0, filter_of[first_sparse], prof.as<unsigned long long>());
    unsigned long long h[9];
    vendor::memcpy_async(h, prof.p, sizeof h, s);
    vendor::stream_sync(s);
    double tot = 0;
    for (auto v : h) tot += double(v);
    const int split_blocks = B * Hkv * (exact_blocks ? splan.n_splits : ssplits);  // (exact blocks do not count)
    std::printf("{\"phases\": \"%s %lldK x %d\", \"blocks\": %d, \"cycles_per_block\": %.0f, \"share\": [", m.name,
                (long long)(N / 1024), B, split_blocks, tot / split_blocks);
    const char* names[9] = {"start", "resolve", "dequant", "mma", "gather", "logits", "softmax", "accumulate", "final"};
    for (int i = 0; i < 9; ++i) std::printf("%s\"%s %.1f%%\"", i ? ", " : "", names[i], 100.0 * double(h[i]) / tot);
    std::printf("]}\n");
  }
  // bytes the step must read
  const double dense_layer_bytes = double(B) * N * kvd * 2 + 2.0 * B * qd * 2;
  r.dense_bytes = m.layers * dense_layer_bytes;
  r.deltakv_bytes = 0;
  std::vector<std::int32_t> hsel(std::size_t(B) * TOPK), hcnt(B);
  for (int l = 0; l < m.layers; ++l) {
    if (is_full[l]) {
      r.deltakv_bytes += dense_layer_bytes + (is_filter[l] ? double(B) * Hq * N * 4 * 2 + double(B) * N * 4 * 6 : 0.0);
      continue;
    }
    const int f = filter_of[l];
    vendor::memcpy_async(hsel.data(), sel[f]->p, hsel.size() * 4, s);
    vendor::memcpy_async(hcnt.data(), sel_count_all.as<std::int32_t>() + f * B, B * 4, s);
    vendor::stream_sync(s);
    double bytes = double(kvd) * DC * 2 + 2.0 * B * qd * 2;  // decoder weights, q, out
    for (int b = 0; b < B; ++b) {
      std::set<std::int64_t> uniq;
      std::int64_t exact = std::min<std::int64_t>(SINKS, N) + std::min<std::int64_t>(RECENT, N - SINKS), lat = 0;
      for (int i = 0; i < hcnt[b]; ++i) {
        const std::int64_t p = hsel[std::size_t(b) * TOPK + i];
        if (p >= cfront || (code[p] & 3) == 1) { ++exact; continue; }
        ++lat;
        for (int j = 0; j < K_REF; ++j) uniq.insert(hash3(l, b * N + p, j) % std::uint32_t(refs_upto[p]));
      }
      // exact rows and references: K and V slices of every kv head = the whole row
      bytes += double(exact + std::int64_t(uniq.size())) * kvd * 2 + double(lat) * (lat_ld + 8 + K_REF * 4);
    }
    r.deltakv_bytes += bytes;
  }
  for (auto* p : full_buf) delete p;
  for (auto* p : comp_buf) delete p;
  for (auto* p : wdec) delete p;
  for (auto* p : sel) delete p;
  return r;
}

// ---- prefill compression ---------------------------------------------------------------------
// One compressed layer of the model shape, one sequence: N tokens appended in chunks of `chunk`
// through the cache (FixedStride 10, k = 4, SwiGLU f_c with hidden 3072, d_c = kv_dim / 4, int4
// latents, blocks of 1024 tokens compressed as they leave the 128-token window), timed end to end
// (host planning and uploads included). Tensor-core work per latent token: f_c on x and on its
// reference mean (two w12 products, one w3 product on their SwiGLU difference: encode_residual)
// and the L2 search over every visible reference; the floor is that count at the GEMM rate
// measured in the same run (run_bench.py: torch bf16 matmul). Also the encode and the search
// alone, to say where the time goes. Enc: the cache's encoder (EncodeTwice: the generic path, for
// comparison: DELTAKV_ENCODE_TWICE=1).
struct PrefillResult {
  double ms = 0, tokens = 0, latents = 0, flops = 0, encode_tflops = 0, search_tflops = 0, encode_share = 0;
  int blocks_per_pass = 0;
};

// SwiGLUEncoder without encode_residual: the cache encodes x and its reference mean as rows of one
// call (both maps on both) and subtracts, the path before encode_residual. (A template: nvcc warns
// (#177) about the member a concept check instantiates for DeviceArchetype in a plain class of this
// unnamed namespace, never about a class template's.)
template <class E = deltakv::SwiGLUEncoder<bf>>
struct EncodeTwiceOf {
  E e;
  int input_dim() const { return e.input_dim(); }
  int latent_dim() const { return e.latent_dim(); }
  std::int64_t scratch_elems(std::int64_t n) const { return e.scratch_elems(n); }
  template <class D>
  void encode(D& dev, deltakv::MatrixView<const bf> x, deltakv::MatrixView<bf> z, bf* scratch) const {
    e.encode(dev, x, z, scratch);
  }
};
using EncodeTwice = EncodeTwiceOf<>;

template <class Enc>
PrefillResult run_prefill(const Model& m, std::int64_t N, std::int64_t chunk, bool tensor_cores, bool vendor_gemm,
                          vendor::stream_t s) {
  using namespace deltakv;
  using GDev = gpu::GpuDevice<bf>;
  const int kvd = 2 * m.hkv * m.d, dc = kvd / 4, hidden = 3072, block = 1024;
  Config cfg;
  cfg.model = {1, m.hq, m.hkv, m.d};
  cfg.comp.sinks = 8;
  cfg.comp.recent = 128;
  cfg.comp.block = block;
  cfg.comp.k_neighbors = 4;
  cfg.comp.latent_dim = dc;
  cfg.comp.latent_bits = 4;
  cfg.cap = {1, N, int(chunk)};
  // blocks one compression pass takes (default 4: a chunk's four blocks); DELTAKV_BLOCKS_PER_PASS=1
  // is the block-at-a-time cache of the fifteenth session, for comparison
  if (const char* e = std::getenv("DELTAKV_BLOCKS_PER_PASS")) cfg.comp.blocks_per_pass = std::max(1, std::atoi(e));
  const FixedStride sel(10);
  const DensePolicy pol{};
  GDev dev(s, 0);
  dev.set_tensor_cores(tensor_cores);
  dev.set_vendor_gemm(vendor_gemm);
  const auto fill = [&](bf* p, std::size_t n, std::uint32_t seed, float amp) {
    fill_bf16<<<1024, 256, 0, s>>>(p, n, seed, amp);
  };
  Dev w12(std::size_t(2) * hidden * kvd * 2), w3(std::size_t(dc) * hidden * 2), wd(std::size_t(kvd) * dc * 2);
  fill(w12.as<bf>(), std::size_t(2) * hidden * kvd, 11, std::sqrt(3.f / kvd));
  fill(w3.as<bf>(), std::size_t(dc) * hidden, 12, std::sqrt(3.f / hidden));
  fill(wd.as<bf>(), std::size_t(kvd) * dc, 13, std::sqrt(3.f / dc));
  const SwiGLUEncoder<bf> enc{{w12.as<bf>(), nullptr, kvd, 2 * hidden}, {w3.as<bf>(), nullptr, hidden, dc}};
  const LinearDecoder<bf> decd{{wd.as<bf>(), nullptr, dc, kvd}};
  const Enc cenc{enc};
  using Cache = CompressedCache<bf, GDev, FixedStride, Enc, LinearDecoder<bf>, DensePolicy>;
  const auto lay = Cache::layout(cfg, sel, pol, enc.scratch_elems(cfg.compress_rows()));
  Dev storage(lay.storage_bytes), workspace(lay.workspace_bytes), x(std::size_t(N) * kvd * 2);
  fill(x.as<bf>(), std::size_t(N) * kvd, 21, 1.f);
  dev.reserve_scratch(dev.scratch_bytes_for(0, cfg.pass_tokens(), 4));
  // the cache's inputs (also those of the op-timing rerun's cache below)
  const std::span<const Enc> encs(&cenc, 1);
  const std::span<const LinearDecoder<bf>> decs(&decd, 1);
  const std::span<std::byte> store(static_cast<std::byte*>(storage.p), lay.storage_bytes),
      work(static_cast<std::byte*>(workspace.p), lay.workspace_bytes);
  Cache cache(dev, cfg, sel, encs, decs, pol, store, work);
  std::vector<std::int64_t> pos(static_cast<std::size_t>(chunk));
  const std::int32_t sid[1] = {0};
  auto prefill_on = [&](auto& c_) {
    c_.reset(0);
    for (std::int64_t t0 = 0; t0 < N; t0 += chunk) {
      const std::int64_t c = std::min(chunk, N - t0);
      for (std::int64_t i = 0; i < c; ++i) pos[std::size_t(i)] = t0 + i;
      const std::int32_t ip[2] = {0, std::int32_t(c)};
      c_.append(0, RaggedBatch<const bf>{MatrixView<const bf>{x.as<bf>() + t0 * kvd, c, kvd, kvd}, sid, ip,
                                         std::span<const std::int64_t>(pos.data(), std::size_t(c))});
    }
  };
  auto prefill = [&] { prefill_on(cache); };
  PrefillResult r;
  r.tokens = double(N);
  r.blocks_per_pass = cfg.comp.blocks_per_pass;
  prefill();  // warm-up (first launches, scratch)
  vendor::stream_sync(s);
  auto e0 = vendor::event_create(), e1 = vendor::event_create();
  vendor::event_record(e0, s);
  prefill();
  vendor::event_record(e1, s);
  r.ms = vendor::event_ms(e0, e1);
  // DELTAKV_PREFILL_OPS: the same prefill once more through a cache on a TimedDevice, for the GPU time
  // of each kind of op and, against that run's wall time, how long the GPU sat idle
  if (std::getenv("DELTAKV_PREFILL_OPS")) {
    using TDev = bench::TimedDevice<GDev, bf>;
    static_assert(Device<TDev, bf>);
    TDev td(dev);
    using TCache = CompressedCache<bf, TDev, FixedStride, Enc, LinearDecoder<bf>, DensePolicy>;
    TCache tcache(td, cfg, sel, encs, decs, pol, store, work);
    prefill_on(tcache);  // warm-up (the event pool grows here)
    vendor::stream_sync(s);
    td.clear();
    vendor::event_record(e0, s);
    prefill_on(tcache);
    vendor::event_record(e1, s);
    const double wall = vendor::event_ms(e0, e1);
    double busy = 0;
    std::string ops;
    for (const auto& o : td.report()) {
      busy += o.ms;
      ops += (ops.empty() ? "" : ", ") + std::string("{\"op\": \"") + o.op + "\", \"ms\": " + std::to_string(o.ms) +
             ", \"calls\": " + std::to_string(o.calls) + "}";
    }
    std::printf("{\"prefill_ops\": \"%s\", \"tensor_cores\": %d, \"vendor_gemm\": %d, \"wall_ms\": %.4f, \"gpu_busy_ms\": %.4f, "
                "\"ops\": [%s]}\n",
                m.name, int(tensor_cores), int(vendor_gemm), wall, busy, ops.c_str());
    std::fflush(stdout);
  }
  const auto counts = cache.counts();
  r.latents = double(counts.latents);
  // tensor-core work per latent token, as the cache's algorithm does it: f_c's first map (w12) on x and
  // on its reference mean, its last map (w3, linear) once, on their SwiGLU difference
  // (encode_residual), and the search over the references before it. (Not a bound of the method:
  // e.g. w12 of a mean is the mean of the references' w12, computable once per reference.)
  const double w12_flops = 2.0 * double(kvd) * 2 * hidden, w3_flops = 2.0 * double(hidden) * dc;
  const double enc_flops = 2 * w12_flops + w3_flops;  // per latent
  // what Enc's path runs per latent (the generic path: both maps on both rows)
  const double path_flops = EncodesResiduals<Enc, bf> ? enc_flops : 2 * (w12_flops + w3_flops);
  double search = 0;
  {
    std::int64_t refs = 0;
    // compressed positions: whole blocks that have left the window
    const std::int64_t end = cfg.comp.sinks + (N - cfg.comp.sinks - cfg.comp.recent) / block * block;
    for (std::int64_t p = 0; p < end; ++p) {  // FixedStride(10): references at 8, 18, 28, ...
      if (p < cfg.comp.sinks) continue;
      if ((p - cfg.comp.sinks) % 10 == 0) { ++refs; continue; }
      search += 2.0 * kvd * double(refs);
    }
  }
  r.flops = r.latents * enc_flops + search;
  // the encode alone, as the cache runs it: 4096 latents (8192 rows: encode_residual, which leaves
  // SwiGLU's rows as they are, or the generic path's encode of all of them), 10 times
  {
    const std::int64_t n = 4096;
    Dev xz(std::size_t(2 * n) * dc * 2), scratch(std::size_t(enc.scratch_elems(2 * n)) * 2);
    const MatrixView<bf> xr{x.as<bf>(), 2 * n, kvd, kvd};
    auto once = [&] {
      if constexpr (EncodesResiduals<Enc, bf>)
        cenc.encode_residual(dev, xr, MatrixView<bf>{xz.as<bf>(), n, dc, dc}, scratch.as<bf>());
      else
        cenc.encode(dev, MatrixView<const bf>{xr.data, xr.rows, xr.cols, xr.ld}, MatrixView<bf>{xz.as<bf>(), 2 * n, dc, dc},
                    scratch.as<bf>());
    };
    once();
    vendor::event_record(e0, s);
    for (int i = 0; i < 10; ++i) once();
    vendor::event_record(e1, s);
    const double ms = vendor::event_ms(e0, e1) / 10;
    r.encode_tflops = double(n) * path_flops / (ms * 1e-3) / 1e12;
    r.encode_share = (r.latents * path_flops / (r.encode_tflops * 1e12)) * 1e3 / r.ms;
  }
  // the search alone: one block's latents (~920) against N / 10 references, all visible
  {
    const std::int64_t n = block - block / 10, mref = N / 10;
    Dev ids(std::size_t(n) * 4 * 4), vis(std::size_t(n) * 4);
    std::vector<std::int32_t> hv(static_cast<std::size_t>(n), std::int32_t(mref));
    vendor::memcpy_async(vis.p, hv.data(), hv.size() * 4, s);
    vendor::stream_sync(s);
    dev.reserve_scratch(dev.scratch_bytes_for(0, n, 4));
    const RefSearchParams<bf> rp{x.as<bf>(), kvd, n, x.as<bf>() + std::int64_t(block) * kvd, kvd, mref, vis.as<std::int32_t>(),
                                 kvd, 4, Metric::l2, ids.as<std::int32_t>()};
    dev.ref_search(rp);
    vendor::event_record(e0, s);
    for (int i = 0; i < 5; ++i) dev.ref_search(rp);
    vendor::event_record(e1, s);
    const double ms = vendor::event_ms(e0, e1) / 5;
    r.search_tflops = 2.0 * kvd * double(n) * double(mref) / (ms * 1e-3) / 1e12;
  }
  vendor::event_destroy(e0);
  vendor::event_destroy(e1);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const bool prefill_only = argc > 1 && std::strcmp(argv[1], "--prefill") == 0;
  if (vendor::device_count() <= 0) {
    std::printf("{\"skipped\": \"no GPU\"}\n");
    return 0;
  }
  const int sms = vendor::multiprocessor_count(vendor::current_device());
  vendor::stream_t s = vendor::stream_create();
  const double bw = copy_bandwidth(s);
  std::printf("{\"copy_bandwidth\": %.4e}\n", bw);
  std::printf("{\"read_bandwidth\": %.4e}\n", read_bandwidth(s, sms));
  std::fflush(stdout);
  const std::vector<Model> models = {{"Llama-3.1-8B", 32, 32, 8, 128, {0, 1, 2, 8, 18}},
                                     {"Qwen2.5-7B", 28, 28, 4, 128, {0, 1, 2, 4, 7, 14}}};
  std::vector<std::int64_t> ctxs = quick ? std::vector<std::int64_t>{4096} : std::vector<std::int64_t>{32768, 131072};
  std::vector<int> batches = {1, 8};
  std::size_t m_begin = 0, m_end = models.size();
  if (argc > 4 && std::strcmp(argv[1], "--only") == 0) {  // --only MODEL_INDEX CTX BATCH (profiling)
    m_begin = std::min<std::size_t>(std::size_t(std::atoi(argv[2])), models.size() - 1);
    m_end = m_begin + 1;
    ctxs = {std::atoll(argv[3])};
    batches = {std::atoi(argv[4])};
  }
  if (argc <= 4 || std::strcmp(argv[1], "--only") != 0)
    for (const Model& m : models) {
      const std::int64_t N = quick ? 8192 : 32768;
      // the CUDA-core kernels, the tensor-core ones with our own GEMM tile kernel, and the default
      // tensor-core path (GEMMs on cuBLAS)
      const char* only_mode = std::getenv("DELTAKV_PREFILL_MODE");  // 0, 1 or 2: that row only (profiling)
      for (const int mode : {0, 1, 2}) {
        if (only_mode && std::atoi(only_mode) != mode) continue;
        const bool twice = std::getenv("DELTAKV_ENCODE_TWICE") != nullptr;  // the generic encode path (comparison)
        // tokens per append (a prefill chunk; engines' defaults range from 2K to 16K): 4096 unless
        // DELTAKV_PREFILL_CHUNK says otherwise (with DELTAKV_BLOCKS_PER_PASS = chunk / 1024, one pass
        // per append)
        const char* chunk_env = std::getenv("DELTAKV_PREFILL_CHUNK");
        const std::int64_t chunk = chunk_env ? std::clamp<std::int64_t>(std::atoll(chunk_env), 1, N) : 4096;
        const PrefillResult r = twice ? run_prefill<EncodeTwice>(m, N, chunk, mode > 0, mode == 2, s)
                                      : run_prefill<deltakv::SwiGLUEncoder<bf>>(m, N, chunk, mode > 0, mode == 2, s);
        const char* gemm = mode == 0 ? "CUDA cores" : (mode == 1 ? "tensor cores, own GEMM" : "tensor cores, cuBLAS GEMM");
        std::printf("{\"prefill\": \"%s\", \"gemm\": \"%s\", \"tokens\": %.0f, \"latents\": %.0f, \"ms\": %.4f, \"flops\": %.6e, "
                    "\"encode_tflops\": %.2f, \"search_tflops\": %.2f, \"encode_share\": %.3f, \"blocks_per_pass\": %d, \"encode_path\": \"%s\", "
                    "\"chunk\": %lld}\n",
                    m.name, gemm, r.tokens, r.latents, r.ms, r.flops, r.encode_tflops, r.search_tflops, r.encode_share,
                    r.blocks_per_pass, twice ? "twice" : "residual", static_cast<long long>(chunk));
        std::fflush(stdout);
      }
    }
  if (prefill_only) m_end = m_begin;
  for (std::size_t mi = m_begin; mi < m_end; ++mi)
    for (auto N : ctxs)
      for (int B : batches) {
        const Model& m = models[mi];
        const Result r = run(m, N, B, sms, s);
        std::printf("{\"model\": \"%s\", \"ctx\": %lld, \"batch\": %d, \"dense_ms\": %.5f, \"deltakv_ms\": %.5f, "
                    "\"dense_bytes\": %.6e, \"deltakv_bytes\": %.6e, \"resident_bytes\": %.6e, \"bf16_bytes\": %.6e, "
                    "\"full_layer_ms\": %.5f, \"sparse_layer_ms\": %.5f,  \"sparse_l2_ms\": %.5f, \"sparse_2p_ms\": %.5f, \"sparse_256_ms\": %.5f, \"select_ms\": %.5f, \"topk_ms\": %.5f, \"topk1_ms\": %.5f, \"topkc_ms\": %.5f, \"topkc16_ms\": %.5f, \"combine_ms\": %.5f, \"full_lane_ms\": %.5f, \"layers\": %d, \"copy_bw\": %.4e}\n",
                    m.name, (long long)N, B, r.dense_ms, r.deltakv_ms, r.dense_bytes, r.deltakv_bytes, r.resident_bytes,
                    r.bf16_bytes, r.full_layer_ms, r.sparse_layer_ms, r.sparse_l2_ms, r.sparse_2p_ms, r.sparse_256_ms, r.select_ms, r.topk_ms, r.topk1_ms, r.topkc_ms, r.topkc16_ms, r.combine_ms, r.full_lane_ms, m.layers, bw);
        std::fflush(stdout);
      }
  vendor::stream_destroy(s);
  return 0;
}
