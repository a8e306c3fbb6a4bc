#pragma once
// Which cached tokens each layer attends to, and which layers stay exact. A policy is a small
// value type answering per layer; the cache provides the mechanisms (dense attention, top-K from
// a filter layer's attention scores, Quest page bounds, sink + window) and the policy picks.
#include <algorithm>
#include <concepts>
#include <string>
#include <vector>

#include "deltakv/error.hpp"

namespace deltakv {

enum class Attend {
  all,       // every cached token at or before the query
  selected,  // sinks + the top-K chosen by the last filter layer + the recent window
  window,    // sinks + the recent window (StreamingLLM)
  pages,     // sinks + the top pages by Quest's bound + the recent window
};

struct LayerPlan {
  bool exact = false;        // store this layer uncompressed (OmniKV's full layers)
  Attend attend = Attend::all;
  bool select_after = false; // after attending (all), pick top-K tokens for the following layers
  int budget = 0;            // tokens picked (selected) or token budget in pages (pages)
  int sinks = 0;             // always-attended first tokens (selected, window, pages)
  int window = 0;            // always-attended last tokens (selected, window, pages)
};

template <class P>
concept SparsePolicy = requires(const P& p, int layer, int n_layers) {
  { p.plan_layer(layer, n_layers) } -> std::same_as<LayerPlan>;
  { p.page_size() } -> std::convertible_to<int>;  // > 0 only when some layer uses Attend::pages
};

// Every layer compressed, every layer attends to everything.
struct DensePolicy {
  LayerPlan plan_layer(int, int) const { return {}; }
  int page_size() const { return 0; }
};

// StreamingLLM: sinks + a recent window only; older tokens are still stored but never read.
struct StreamingPolicy {
  int sinks = 8;
  int window = 1024;
  LayerPlan plan_layer(int, int) const { return {false, Attend::window, false, 0, sinks, window}; }
  int page_size() const { return 0; }
};

// OmniKV: full layers attend to everything and stay exact; the last full layer before a run of
// sparse layers picks top-K tokens (max over heads of its attention probabilities) that those
// sparse layers share.
struct OmniKVPolicy {
  std::vector<int> full_layers{0, 1, 2, 8, 18};
  int top_k = 2048;
  int sinks = 8;
  int window = 128;
  bool exact_full_layers = true;

  bool is_full(int l) const { return std::find(full_layers.begin(), full_layers.end(), l) != full_layers.end(); }
  LayerPlan plan_layer(int l, int n_layers) const {
    if (!is_full(0)) throw ConfigError("OmniKV: layer 0 must be a full layer (it feeds the first selection)");
    if (top_k <= 0) throw ConfigError("OmniKV: top_k must be > 0");
    if (is_full(l)) {
      const bool next_sparse = l + 1 < n_layers && !is_full(l + 1);
      return {exact_full_layers, Attend::all, next_sparse, top_k, sinks, window};
    }
    return {false, Attend::selected, false, top_k, sinks, window};
  }
  int page_size() const { return 0; }
};

// Quest: per page of keys keep element-wise min/max; a query scores each page by the upper bound
// sum_d max(q_d min_d, q_d max_d) (max over heads here, so heads share one set) and attends to the
// best pages within the token budget. The first `dense_layers` layers attend to everything.
struct QuestPolicy {
  int page = 16;
  int budget = 2048;
  int dense_layers = 2;
  int sinks = 0;
  int window = 0;
  LayerPlan plan_layer(int l, int) const {
    if (page <= 0 || budget <= 0) throw ConfigError("Quest: page size and budget must be > 0");
    if (l < dense_layers) return {};
    return {false, Attend::pages, false, budget, sinks, window};
  }
  int page_size() const { return page; }
};

static_assert(SparsePolicy<DensePolicy> && SparsePolicy<StreamingPolicy> &&
              SparsePolicy<OmniKVPolicy> && SparsePolicy<QuestPolicy>);

}  // namespace deltakv
