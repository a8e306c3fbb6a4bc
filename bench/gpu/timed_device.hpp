#pragma once
// TimedDevice<D, T>: a Device (include/deltakv/device.hpp) that forwards every op to a GPU device D
// and brackets it with two events on D's stream, so that a run through the cache can say how much
// GPU time each kind of op took and, against the run's wall time, how long the GPU sat idle (host
// planning, synchronizing checks, launch gaps). The events are only read in report(), after the
// run: the ops themselves get no extra synchronization. Benchmarks only (bench_decode's
// DELTAKV_PREFILL_OPS).
#include <algorithm>
#include <cstddef>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "deltakv/device.hpp"
#include "deltakv/gpu/vendor.hpp"
#include "deltakv/gpu/vendor_ext.hpp"

namespace deltakv::bench {

template <class D, class T>
class TimedDevice {
 public:
  static constexpr int device_interface = D::device_interface;  // a pass-through: D's revision
  struct OpTime {
    std::string op;
    double ms = 0;  // summed GPU time between the op's two events
    long calls = 0;
  };

  explicit TimedDevice(D& d) : d_(d) {}
  ~TimedDevice() {
    for (auto e : pool_) gpu::vendor::event_destroy(e);
  }
  TimedDevice(const TimedDevice&) = delete;
  TimedDevice& operator=(const TimedDevice&) = delete;

  void linear(const LinearParams<T>& p) { timed("linear", [&] { d_.linear(p); }); }
  void swiglu(const SwiGLUParams<T>& p) { timed("swiglu", [&] { d_.swiglu(p); }); }
  void axpy_rows(const AxpyRowsParams<T>& p) { timed("axpy_rows", [&] { d_.axpy_rows(p); }); }
  void ref_search(const RefSearchParams<T>& p) { timed("ref_search", [&] { d_.ref_search(p); }); }
  void gather_mean(const GatherMeanParams<T>& p) { timed("gather_mean", [&] { d_.gather_mean(p); }); }
  void quantize(const QuantizeParams<T>& p) { timed("quantize", [&] { d_.quantize(p); }); }
  void dequantize(const DequantizeParams<T>& p) { timed("dequantize", [&] { d_.dequantize(p); }); }
  void rope(const RopeParams<T>& p) { timed("rope", [&] { d_.rope(p); }); }
  void attn_tile(const AttnTileParams<T>& p) { timed("attn_tile", [&] { d_.attn_tile(p); }); }
  void attn_finish(const AttnFinishParams<T>& p) { timed("attn_finish", [&] { d_.attn_finish(p); }); }
  void score_tile(const ScoreTileParams<T>& p) { timed("score_tile", [&] { d_.score_tile(p); }); }
  void page_bounds(const PageBoundsParams<T>& p) { timed("page_bounds", [&] { d_.page_bounds(p); }); }
  void page_score(const PageScoreParams<T>& p) { timed("page_score", [&] { d_.page_score(p); }); }
  void topk(const TopKParams& p) { timed("topk", [&] { d_.topk(p); }); }
  void copy_rows(const CopyRowsParams<T>& p) { timed("copy_rows", [&] { d_.copy_rows(p); }); }
  void copy_rows_batch(const CopyRowsBatchParams<T>& p) { timed("copy_rows_batch", [&] { deltakv::copy_rows_batch(d_, p); }); }
  bool all_finite(const FiniteCheckParams<T>& p) {
    bool r = true;
    timed("all_finite", [&] { r = d_.all_finite(p); });
    return r;
  }
  void start_finite_check(const FiniteCheckParams<T>& p) { timed("all_finite", [&] { d_.start_finite_check(p); }); }
  bool finite_check_result() { return d_.finite_check_result(); }
  void to_host(void* dst, const void* src, std::size_t bytes) { timed("to_host", [&] { d_.to_host(dst, src, bytes); }); }
  void to_device(void* dst, const void* src, std::size_t bytes) { timed("to_device", [&] { d_.to_device(dst, src, bytes); }); }
  void fill_zero(void* p, std::size_t bytes) { timed("fill_zero", [&] { d_.fill_zero(p, bytes); }); }

  // Forget the calls so far (their events go back to the pool).
  void clear() {
    recs_.clear();
    next_ = 0;
  }
  // GPU time per kind of op since the last clear(), largest first (synchronizes the stream).
  std::vector<OpTime> report() {
    d_.synchronize();
    std::map<std::string, OpTime> by;
    for (const Rec& r : recs_) {
      OpTime& t = by[r.op];
      t.op = r.op;
      t.ms += gpu::vendor::event_ms(pool_[r.a], pool_[r.a + 1]);
      ++t.calls;
    }
    std::vector<OpTime> out;
    for (auto& [name, t] : by) out.push_back(t);
    std::sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) { return a.ms > b.ms; });
    return out;
  }

 private:
  struct Rec {
    const char* op;
    std::size_t a;  // pool_[a], pool_[a + 1]: before and after
  };
  template <class F>
  void timed(const char* op, F&& f) {
    if (next_ + 2 > pool_.size()) {  // grows outside any timed op (a host call; benchmarks only)
      pool_.push_back(gpu::vendor::event_create());
      pool_.push_back(gpu::vendor::event_create());
    }
    const std::size_t a = next_;
    next_ += 2;
    gpu::vendor::event_record(pool_[a], d_.stream());
    f();
    gpu::vendor::event_record(pool_[a + 1], d_.stream());
    recs_.push_back(Rec{op, a});
  }

  D& d_;
  std::vector<gpu::vendor::event_t> pool_;
  std::size_t next_ = 0;
  std::vector<Rec> recs_;
};

}  // namespace deltakv::bench
