// The `deltakv` command-line tool: measure DeltaKV on a real model's real KV cache.
//
//   deltakv eval      --model M --text FILE [--context N] [--chunk C] [--configs a,b,...]
//                     [--calib-text FILE] [--calib-tokens N]
//   deltakv calibrate --model M --text FILE --out CKPT [--latent-dim D] [--tokens N]
//   deltakv inspect   (--model M | --checkpoint CKPT) [--context N]
//   deltakv analyze   --model M --text FILE [--tokens N]
//   deltakv dump-kv   --model M --text FILE --out FILE [--tokens N] [--layers a,b,...]
//
// eval runs the text through the example llama engine once per KV configuration, all in lockstep
// chunk by chunk (so the full-precision distribution of every position is at hand without storing
// it), and prints one table: bytes per token (% of bf16, everything counted), perplexity, its change,
// mean KL divergence of the next-token distribution against full, top-1 agreement, time.
//
// dump-kv writes real KV for the GPU tests (tests/cuda/test_real_kv.cu, reader in
// tests/cuda/real_kv.hpp): the exact engine runs over the first N tokens of the text, and for the
// chosen layers every position's cached row x = [pre-RoPE K of all kv heads | V of all kv heads]
// is read back from the exact cache, plus the post-RoPE query of the last position and the
// engine's attention output for it. Rows are rounded to bf16 before the cache stores them, as in
// eval. Format (version 1, little-endian, no padding):
//   char[8] "DKVREAL\0"   u32 version = 1   u32 name_len, char[name_len] model name
//   i32 model_layers       i32 L (layers in the file), i32 layer_id[L]       i64 n_tokens
//   i32 n_q_heads, n_kv_heads, head_dim, rot_dim                          f64 rope_theta
//   i32 rope_style (deltakv::RopeStyle: 0 none, 1 half, 2 interleaved)     u32 flags
//   (bit 0: rows are bf16 values; bit 1: query/output rows present)
//   then per file layer, in layer_id order: f32 rows [n_tokens, 2 * n_kv_heads * head_dim];
//   with bit 1, f32 query [n_q_heads * head_dim] (post-RoPE, position n_tokens - 1) and f32
//   output [n_q_heads * head_dim] (exact attention of that query over positions 0..n_tokens - 1).
#include <fmt/core.h>

#include <Eigen/Dense>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "deltakv/calibration/pca.hpp"
#include "deltakv/io/checkpoint.hpp"
#include "deltakv/io/gguf.hpp"
#include "llama/engine.hpp"
#include "llama/kv_peers.hpp"
#include "llama/model.hpp"
#include "llama/tokenizer.hpp"

using namespace deltakv;

namespace {

using Clock = std::chrono::steady_clock;

struct Args {
  std::string cmd;
  std::map<std::string, std::string> kv;
  std::string get(const std::string& k, const std::string& def = "") const {
    auto it = kv.find(k);
    return it == kv.end() ? def : it->second;
  }
  long long num(const std::string& k, long long def) const {
    auto it = kv.find(k);
    return it == kv.end() ? def : std::stoll(it->second);
  }
};

const char* kUsage =
    "usage:\n"
    "  deltakv eval      --model M --text FILE [--context N] [--chunk C] [--configs a,b,...]\n"
    "                    [--calib-text FILE] [--calib-tokens N] [--threads T] [--k N]\n"
    "                    [--codec-weights mse|attention]\n"
    "  deltakv calibrate --model M --text FILE --out CKPT [--latent-dim D] [--tokens N]\n"
    "  deltakv inspect   (--model M | --checkpoint CKPT) [--context N]\n"
    "  deltakv analyze   --model M --text FILE [--tokens N]\n"
    "  deltakv dump-kv   --model M --text FILE --out FILE [--tokens N] [--layers a,b,...]\n"
    "                    (real KV rows for tests/cuda/test_real_kv.cu; defaults: --tokens 1024,\n"
    "                    --layers 0,1,15,29, --text /usr/share/common-licenses/GPL-3)\n"
    "configs: full, q8_0, q4_0, streaming, omnikv, deltakv-4, deltakv-8, deltakv-4-int4, deltakv-8-int4,\n"
    "         deltakv-4-int4+omnikv (default: all). deltakv-*: PCA codec calibrated on --calib-text;\n"
    "         --codec-weights attention weights each K|V dimension by its first-order effect on the\n"
    "         attention output (default mse: plain PCA); --k N neighbours per token (default 4)\n";

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw IoError("cannot read " + path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

llama::Tokenizer load_tokenizer(const io::GgufFile& f) {
  std::vector<std::int32_t> types;
  if (f.has("tokenizer.ggml.token_type"))
    for (auto t : f.get_int_array("tokenizer.ggml.token_type")) types.push_back(std::int32_t(t));
  return llama::Tokenizer(f.get_string_array("tokenizer.ggml.tokens"), f.get_string_array("tokenizer.ggml.merges"),
                          std::move(types));
}

std::vector<std::int32_t> tokens_of(const llama::Tokenizer& tok, const std::string& path, std::int64_t max_tokens) {
  auto ids = tok.encode_ordinary(read_file(path));
  if (std::int64_t(ids.size()) > max_tokens) ids.resize(std::size_t(max_tokens));
  return ids;
}

// ---- one KV configuration behind a common face ------------------------------------------------
struct Runner {
  std::string name;
  double seconds = 0;
  virtual ~Runner() = default;
  virtual void forward(std::span<const std::int32_t> chunk, MatrixView<float> logits) = 0;
  virtual double kv_percent() const = 0;  // of bf16, at the current length
};

template <class C>
struct CacheRunner : Runner {
  std::unique_ptr<C> owned;
  llama::Bf16Kv<C> kv;
  llama::LlamaEngine<llama::Bf16Kv<C>> engine;
  std::function<double(const C&)> percent;
  CacheRunner(std::string n, std::unique_ptr<C> c, const llama::LlamaWeights& w, int chunk, std::function<double(const C&)> pct)
      : owned(std::move(c)), kv(*owned), engine(w, kv, chunk), percent(std::move(pct)) {
    name = std::move(n);
  }
  void forward(std::span<const std::int32_t> chunk, MatrixView<float> logits) override {
    const auto t0 = Clock::now();
    engine.forward(0, chunk, logits, llama::LogitRows::all);
    seconds += std::chrono::duration<double>(Clock::now() - t0).count();
  }
  double kv_percent() const override { return percent(*owned); }
};

// A deltakv cache (CpuKvCache) with its own .config()/.length()/... forwarded.
template <class Pol>
struct DkvCache {
  llama::CpuKvCache<FixedStride, LinearEncoder<float>, Pol> c;
  DkvCache(const Config& cfg, Compressor<float> codec, Pol pol) : c(cfg, std::move(codec), FixedStride(10), std::move(pol)) {}
  const Config& config() const { return c.cache().config(); }
  std::int64_t length(int l, int s) const { return c.cache().length(l, s); }
  void reset(int s) { c.cache().reset(s); }
  void append(int l, const RaggedBatch<const float>& x) { c.cache().append(l, x); }
  void attend(int l, const RaggedBatch<const float>& q, MatrixView<float> o) { c.cache().attend(l, q, o); }
  double percent() const { return 100.0 * c.cache().memory(2).ratio(); }
};

struct Setup {
  llama::LlamaHParams hp;
  std::int64_t context = 0;
  int chunk = 32;
  std::vector<Compressor<float>> pca;  // [0]: d_c = kv/4, [1]: kv/8
  std::vector<int> full_layers;
  int top_k = 0;
  double stream_percent = 0;
  int k = 4;  // references averaged per token
};

CompressionConfig deltakv_comp(int dc, int bits) {
  CompressionConfig c;  // paper defaults: sinks 8, recent 128, stride 10, k 4
  c.latent_dim = dc;
  c.latent_bits = bits;
  return c;
}

std::unique_ptr<Runner> make_runner(const std::string& name, const Setup& s, const llama::LlamaWeights& w) {
  const Capacity cap{1, s.context, s.chunk};
  const int D = 2 * s.hp.k_dim();
  auto exact_cfg = llama::make_exact_config(s.hp, s.context, s.chunk);
  auto identity = [&] { return Compressor<float>::identity(s.hp.n_layers, D); };
  auto pct_exact = [](const auto&) { return 100.0; };
  if (name == "full") {
    using C = DkvCache<DensePolicy>;
    return std::make_unique<CacheRunner<C>>(name, std::make_unique<C>(exact_cfg, identity(), DensePolicy{}), w, s.chunk, pct_exact);
  }
  if (name == "q8_0" || name == "q4_0") {
    const int bits = name == "q8_0" ? 8 : 4;
    auto c = std::make_unique<llama::BlockQuantKv>(exact_cfg, bits);
    return std::make_unique<CacheRunner<llama::BlockQuantKv>>(name, std::move(c), w, s.chunk, [](const llama::BlockQuantKv& q) {
      return 100.0 * q.bytes_per_value() / 2.0;
    });
  }
  if (name == "streaming") {  // sinks + window holding the same bytes as deltakv-4-int4
    using C = DkvCache<StreamingPolicy>;
    const int sinks = 8;
    const int window = std::max(1, int(s.stream_percent / 100.0 * double(s.context)) - sinks);
    auto c = std::make_unique<C>(exact_cfg, identity(), StreamingPolicy{sinks, window});
    const std::int64_t ctx = s.context;
    return std::make_unique<CacheRunner<C>>(fmt::format("streaming (8 + {})", window), std::move(c), w, s.chunk,
                                            [sinks, window, ctx](const C& c) {
                                              const double n = double(std::max<std::int64_t>(1, c.length(0, 0)));
                                              return 100.0 * std::min(n, double(sinks + window)) / n;
                                              (void)ctx;
                                            });
  }
  const OmniKVPolicy omni{s.full_layers, s.top_k, 8, 128};
  if (name == "omnikv") {
    using C = DkvCache<OmniKVPolicy>;
    return std::make_unique<CacheRunner<C>>(fmt::format("omnikv (top-{})", s.top_k), std::make_unique<C>(exact_cfg, identity(), omni),
                                            w, s.chunk, pct_exact);
  }
  struct V { const char* n; int which; int bits; bool omni; };
  for (V v : {V{"deltakv-4", 0, 0, false}, V{"deltakv-8", 1, 0, false}, V{"deltakv-4-int4", 0, 4, false},
              V{"deltakv-8-int4", 1, 4, false}, V{"deltakv-4-int4+omnikv", 0, 4, true}}) {
    if (name != v.n) continue;
    const int dc = v.which == 1 ? D / 8 : D / 4;
    auto comp = deltakv_comp(dc, v.bits);
    comp.k_neighbors = s.k;
    const auto cfg = llama::make_config(s.hp, comp, cap);
    if (v.omni) {
      using C = DkvCache<OmniKVPolicy>;
      return std::make_unique<CacheRunner<C>>(name, std::make_unique<C>(cfg, s.pca[v.which], omni), w, s.chunk,
                                              [](const C& c) { return c.percent(); });
    }
    using C = DkvCache<DensePolicy>;
    return std::make_unique<CacheRunner<C>>(name, std::make_unique<C>(cfg, s.pca[v.which], DensePolicy{}), w, s.chunk,
                                            [](const C& c) { return c.percent(); });
  }
  throw ConfigError("unknown configuration '" + name + "'\n" + kUsage);
}

// Per-dimension weights for a layer's codec: how much an error in each K|V dimension moves the
// attention output after W_o, to first order. An error δv in V dim j of kv head g moves the output
// of every q head h in g by W_o[:, h·d + j]·δv (attention weights sum to 1): weight sum_h |W_o col|².
// An error δk in K moves the logit by q·δk/√d, which moves the output by δs·W_o(v - o): weight
// E[q_pair²]/d (per RoPE pair: rotation keeps its energy) times E|W_o(v - v̄)|² of that group.
std::vector<double> attention_weights(const llama::LlamaWeights& w, int layer, const std::vector<float>& kv,
                                      const std::vector<double>& q_energy) {
  const auto& hp = w.hp;
  const int d = hp.head_dim, G = hp.n_kv_heads, grp = hp.n_q_heads / G, kd = hp.k_dim(), D = 2 * kd, qd = hp.q_dim();
  const auto& wo = w.layers[layer].wo;  // [hidden, q_dim]
  const std::int64_t n = std::int64_t(kv.size() / D);
  std::vector<double> wt(D, 0.0);
  for (int g = 0; g < G; ++g) {
    // Gram of W_o's columns for the group's heads: G_h = W_h^T W_h, summed over the group
    Eigen::MatrixXd gram = Eigen::MatrixXd::Zero(d, d);
    for (int h = g * grp; h < (g + 1) * grp; ++h) {
      Eigen::MatrixXd Wh(hp.hidden, d);
      for (int r = 0; r < hp.hidden; ++r)
        for (int j = 0; j < d; ++j) Wh(r, j) = wo[std::size_t(r) * qd + h * d + j];
      gram += Wh.transpose() * Wh;
    }
    // V covariance of the group
    Eigen::VectorXd mean = Eigen::VectorXd::Zero(d);
    for (std::int64_t t = 0; t < n; ++t)
      for (int j = 0; j < d; ++j) mean(j) += kv[std::size_t(t) * D + kd + g * d + j];
    mean /= double(std::max<std::int64_t>(1, n));
    Eigen::MatrixXd cov = Eigen::MatrixXd::Zero(d, d);
    Eigen::VectorXd u(d);
    for (std::int64_t t = 0; t < n; ++t) {
      for (int j = 0; j < d; ++j) u(j) = kv[std::size_t(t) * D + kd + g * d + j] - mean(j);
      cov.noalias() += u * u.transpose();
    }
    cov /= double(std::max<std::int64_t>(1, n));
    const double v_spread = (gram * cov).trace() / grp;  // per q head
    for (int j = 0; j < d; ++j) {
      double qe = 0;  // pair energy of the group's queries at this dimension's RoPE pair (interleaved)
      const int a = j & ~1;
      for (int h = g * grp; h < (g + 1) * grp; ++h) qe += (q_energy[h * d + a] + q_energy[h * d + a + 1]) / 2;
      wt[g * d + j] = std::max(1e-12, qe / d * v_spread);
      wt[kd + g * d + j] = std::max(1e-12, gram(j, j));
    }
  }
  return wt;
}

struct RecordedKv {
  std::vector<std::vector<float>> kv;        // [layer] rows [tokens, kv_dim]
  std::vector<std::vector<double>> weights;  // [layer] attention_weights
};

// Real KV of a text: run the exact engine and record the (bf16-rounded, pre-RoPE) rows per layer.
RecordedKv record_kv_and_weights(const llama::LlamaWeights& w, const std::vector<std::int32_t>& toks, int chunk);
// The engine's KV interface forwarded to an exact cache held by reference, so that a wrapper
// (llama::Bf16Kv, a tap) can sit in front of a cache the caller keeps reading afterwards.
template <class Exact>
struct ExactCacheRef {
  Exact& c;
  const Config& config() const { return c.cache().config(); }
  std::int64_t length(int l, int s) const { return c.cache().length(l, s); }
  void reset(int s) { c.cache().reset(s); }
  void append(int l, const RaggedBatch<const float>& x) { c.cache().append(l, x); }
  void attend(int l, const RaggedBatch<const float>& q, MatrixView<float> o) { c.cache().attend(l, q, o); }
};

std::vector<std::vector<float>> record_kv(const llama::LlamaWeights& w, const std::vector<std::int32_t>& toks, int chunk) {
  return record_kv_and_weights(w, toks, chunk).kv;
}
RecordedKv record_kv_and_weights(const llama::LlamaWeights& w, const std::vector<std::int32_t>& toks, int chunk) {
  const std::int64_t n = std::int64_t(toks.size());
  auto exact = llama::make_exact_cache(w.hp, n, chunk);
  using Fwd = ExactCacheRef<decltype(exact)>;
  Fwd fwd{exact};
  llama::Bf16Kv<Fwd> rec(fwd, true);
  llama::LlamaEngine<llama::Bf16Kv<Fwd>> engine(w, rec, chunk);
  engine.prefill(0, toks, chunk, nullptr, llama::LogitRows::none);
  RecordedKv out;
  out.kv.resize(w.hp.n_layers);
  for (int l = 0; l < w.hp.n_layers; ++l) {
    out.kv[l] = rec.recorded(l);
    out.weights.push_back(attention_weights(w, l, out.kv[l], rec.query_energy(l)));
  }
  return out;
}

// weights: nullptr for plain PCA (MSE of K|V), or attention_weights per layer.
Compressor<float> calibrate(const std::vector<std::vector<float>>& kv, int D, int dc, std::vector<calibration::PcaReport>* rep,
                            const std::vector<std::vector<double>>* weights = nullptr, int k = 4) {
  std::vector<MatrixView<const float>> views;
  for (const auto& v : kv) views.push_back({v.data(), std::int64_t(v.size() / D), D, D});
  return calibration::calibrate_pca<float>(views, dc, 8, 10, k, Metric::l2, {}, rep, weights);
}

// log-softmax of one row into out (double for stable sums).
void log_softmax(const float* x, int n, std::vector<double>& out) {
  double mx = x[0];
  for (int i = 1; i < n; ++i) mx = std::max(mx, double(x[i]));
  double z = 0;
  for (int i = 0; i < n; ++i) z += std::exp(double(x[i]) - mx);
  const double lz = mx + std::log(z);
  out.resize(n);
  for (int i = 0; i < n; ++i) out[i] = double(x[i]) - lz;
}

int cmd_eval(const Args& a) {
  const std::string model = a.get("--model", "models/SmolLM2-135M-Instruct.Q4_1.gguf");
  const std::string text = a.get("--text", "/usr/share/common-licenses/GPL-3");
  const std::string calib_text = a.get("--calib-text", "/usr/share/common-licenses/Apache-2.0");
  Setup s;
  s.chunk = int(a.num("--chunk", 32));
  s.k = int(a.num("--k", 4));
  const auto t_load = Clock::now();
  const auto gguf = io::GgufFile::open(model);
  const auto w = llama::LlamaWeights::load(gguf);
  const auto tok = load_tokenizer(gguf);
  s.hp = w.hp;
  const auto toks = tokens_of(tok, text, a.num("--context", 2048));
  s.context = std::int64_t(toks.size());
  if (s.context < 2) throw ConfigError("the text has fewer than 2 tokens");
  const int D = 2 * s.hp.k_dim();
  s.full_layers = {0, 1, 2, 8, 18};
  s.top_k = int(std::max<std::int64_t>(64, s.context / 4));
  fmt::print("model {}: {} layers, {} q / {} kv heads x {}, kv_dim {}; loaded in {:.1f} s\n", model, s.hp.n_layers,
             s.hp.n_q_heads, s.hp.n_kv_heads, s.hp.head_dim, D,
             std::chrono::duration<double>(Clock::now() - t_load).count());
  fmt::print("eval text {}: {} tokens, chunks of {}; KV rounded to bf16 before every cache\n", text, s.context, s.chunk);

  std::vector<std::string> names = {"full", "q8_0", "q4_0", "streaming", "omnikv", "deltakv-4", "deltakv-8",
                                    "deltakv-4-int4", "deltakv-8-int4", "deltakv-4-int4+omnikv"};
  if (a.kv.count("--configs")) {
    names = {"full"};
    std::stringstream ss(a.get("--configs"));
    for (std::string n; std::getline(ss, n, ',');)
      if (!n.empty() && n != "full") names.push_back(n);
  }
  bool need_pca = false;
  for (auto& n : names) need_pca = need_pca || n.rfind("deltakv", 0) == 0 || n == "streaming";
  if (need_pca) {
    const auto t0 = Clock::now();
    const auto ctoks = tokens_of(tok, calib_text, a.num("--calib-tokens", 2048));
    const auto rec = record_kv_and_weights(w, ctoks, s.chunk);
    fmt::print(stderr, "calibration KV recorded in {:.1f} s\n", std::chrono::duration<double>(Clock::now() - t0).count());
    const bool weighted = a.get("--codec-weights", "mse") == "attention";
    // residuals once per layer, then one fit per latent size
    std::vector<calibration::PcaReport> r4(s.hp.n_layers), r8(s.hp.n_layers);
    for (int div : {4, 8}) {
      Compressor<float> c;
      c.kv_dim = D;
      c.latent_dim = D / div;
      c.layers.resize(s.hp.n_layers);
      s.pca.push_back(std::move(c));
    }
    for (int l = 0; l < s.hp.n_layers; ++l) {
      const auto& kv = rec.kv[l];
      const auto r = calibration::residuals_to_references<float>({kv.data(), std::int64_t(kv.size() / D), D, D}, 8, 10,
                                                                 s.k, Metric::l2);
      const MatrixView<const float> rv{r.data(), std::int64_t(r.size() / D), D, D};
      const std::span<const double> wts = weighted ? std::span<const double>(rec.weights[l]) : std::span<const double>{};
      s.pca[0].layers[l] = calibration::fit_pca_codec<float>(rv, D / 4, &r4[l], wts);
      s.pca[1].layers[l] = calibration::fit_pca_codec<float>(rv, D / 8, &r8[l], wts);
    }
    auto mean_kept = [](const std::vector<calibration::PcaReport>& r) {
      double e = 0;
      for (auto& x : r) e += x.explained / double(r.size());
      return 100 * e;
    };
    fmt::print("calibration text {}: {} tokens (a different text), {:.1f} s; PCA ({}) keeps {:.1f}% of the residual "
               "energy at d_c={}, {:.1f}% at d_c={}\n",
               calib_text, ctoks.size(), std::chrono::duration<double>(Clock::now() - t0).count(),
               weighted ? "attention-weighted" : "plain MSE", mean_kept(r4), D / 4, mean_kept(r8), D / 8);
    // the StreamingLLM row gets the memory deltakv-4-int4 takes at this context (from positions alone)
    auto probe_comp = deltakv_comp(D / 4, 4);
    probe_comp.k_neighbors = s.k;
    const auto probe = llama::make_config(s.hp, probe_comp, Capacity{1, s.context, s.chunk});
    DkvCache<DensePolicy> sizing(probe, s.pca[0], DensePolicy{});
    s.stream_percent = 100.0 * price(sizing.c.cache().projected_counts(s.context), sizing.c.cache().byte_model(2)).ratio();
  }
  std::vector<std::unique_ptr<Runner>> runners;
  for (auto& n : names) runners.push_back(make_runner(n, s, w));

  const int V = s.hp.vocab;
  const std::size_t R = runners.size();
  std::vector<std::vector<float>> logits(R, std::vector<float>(std::size_t(s.chunk) * V));
  std::vector<double> nll(R, 0), kl(R, 0), agree(R, 0);
  std::int64_t counted = 0;
  std::vector<double> lp_full, lp;
  const unsigned threads = unsigned(std::max<long long>(1, a.num("--threads", std::max(1u, std::thread::hardware_concurrency()))));
  const auto t_run = Clock::now();
  for (std::int64_t i = 0; i < s.context; i += s.chunk) {
    const auto c = std::min<std::int64_t>(s.chunk, s.context - i);
    const auto part = std::span(toks).subspan(std::size_t(i), std::size_t(c));
    // configurations are independent (own engine, cache, device; shared read-only weights)
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        for (std::size_t r = t; r < R; r += threads) runners[r]->forward(part, {logits[r].data(), c, V, V});
      });
    for (auto& th : pool) th.join();
    for (std::int64_t j = 0; j < c; ++j) {
      const std::int64_t p = i + j;  // logits of position p predict token p + 1
      if (p + 1 >= s.context) break;
      const std::int32_t next = toks[std::size_t(p + 1)];
      log_softmax(logits[0].data() + j * V, V, lp_full);
      const auto top_full = llama::argmax(std::span<const float>(logits[0].data() + j * V, std::size_t(V)));
      for (std::size_t r = 0; r < R; ++r) {
        const float* row = logits[r].data() + j * V;
        log_softmax(row, V, lp);
        nll[r] -= lp[std::size_t(next)];
        double d = 0;
        for (int v = 0; v < V; ++v) d += std::exp(lp_full[v]) * (lp_full[v] - lp[v]);
        kl[r] += d;
        agree[r] += llama::argmax(std::span<const float>(row, std::size_t(V))) == top_full;
      }
      ++counted;
    }
    const double el = std::chrono::duration<double>(Clock::now() - t_run).count();
    fmt::print(stderr, "\r  {} / {} tokens, {} configurations, {:.0f} s", i + c, s.context, R, el);
  }
  fmt::print(stderr, "\n");
  const double ppl_full = std::exp(nll[0] / double(counted));
  fmt::print("\n{:<24} {:>10} {:>10} {:>9} {:>11} {:>8} {:>8}\n", "configuration", "KV % bf16", "perplexity", "Δppl %",
             "KL vs full", "top-1 %", "time s");
  for (std::size_t r = 0; r < R; ++r) {
    const double ppl = std::exp(nll[r] / double(counted));
    fmt::print("{:<24} {:>9.1f}% {:>10.3f} {:>+8.2f}% {:>11.5f} {:>7.1f}% {:>8.1f}\n", runners[r]->name,
               runners[r]->kv_percent(), ppl, 100.0 * (ppl / ppl_full - 1.0), kl[r] / double(counted),
               100.0 * agree[r] / double(counted), runners[r]->seconds);
  }
  fmt::print("\n{} predicted tokens. KV % of bf16 counts everything a configuration stores at {} tokens (deltakv: sinks,\n"
             "window, references, latents, reference ids, quantization scales); q8_0/q4_0: 34/18 bytes per 32 values;\n"
             "streaming: what an evicting StreamingLLM keeps. OmniKV: full layers 0,1,2,8,18, top-K chosen per chunk of {}.\n",
             counted, s.context, s.chunk);
  return 0;
}

int cmd_calibrate(const Args& a) {
  const auto gguf = io::GgufFile::open(a.get("--model", "models/SmolLM2-135M-Instruct.Q4_1.gguf"));
  const auto w = llama::LlamaWeights::load(gguf);
  const auto tok = load_tokenizer(gguf);
  const std::string out = a.get("--out");
  if (out.empty()) throw ConfigError(std::string("calibrate needs --out\n") + kUsage);
  const auto toks = tokens_of(tok, a.get("--text", "/usr/share/common-licenses/Apache-2.0"), a.num("--tokens", 2048));
  const int D = 2 * w.hp.k_dim();
  const int dc = int(a.num("--latent-dim", D / 4));
  std::vector<calibration::PcaReport> rep;
  const auto codec = calibrate(record_kv(w, toks, 32), D, dc, &rep);
  io::save_compressor(out, codec);
  for (std::size_t l = 0; l < rep.size(); ++l)
    fmt::print("layer {:>2}: residual energy kept {:.1f}% ({} residual rows)\n", l, 100 * rep[l].explained, rep[l].rows);
  fmt::print("wrote {} (linear PCA codec, kv_dim {} -> d_c {}, {} layers, {} calibration tokens)\n", out, D, dc,
             rep.size(), toks.size());
  return 0;
}

int cmd_inspect(const Args& a) {
  const std::int64_t n = a.num("--context", 32768);
  if (a.kv.count("--checkpoint")) {
    const auto c = io::load_compressor<float>(a.get("--checkpoint"));
    int present = 0;
    for (auto& l : c.layers) present += l.present();
    fmt::print("checkpoint {}: {} codec, kv_dim {} -> d_c {}{}, {} layers ({} with a codec)\n", a.get("--checkpoint"),
               c.kind == CodecKind::linear ? "linear" : "SwiGLU", c.kv_dim, c.latent_dim,
               c.kind == CodecKind::swiglu ? fmt::format(" (hidden {})", c.hidden) : "", c.layers.size(), present);
    return 0;
  }
  const auto gguf = io::GgufFile::open(a.get("--model", "models/SmolLM2-135M-Instruct.Q4_1.gguf"));
  const auto hp = llama::read_hparams(gguf);
  const int D = 2 * hp.k_dim();
  fmt::print("model: {} layers, {} q heads, {} kv heads x {}; kv_dim {} (K|V per token per layer)\n", hp.n_layers,
             hp.n_q_heads, hp.n_kv_heads, hp.head_dim, D);
  const double dense = double(n) * D * 2 * hp.n_layers;
  fmt::print("bf16 KV at {} tokens: {:.1f} MiB\n\n{:<26} {:>10} {:>12}\n", n, dense / 1048576.0, "configuration",
             "% of bf16", "MiB");
  auto row = [&](const std::string& name, double pct) { fmt::print("{:<26} {:>9.1f}% {:>12.1f}\n", name, pct, pct / 100 * dense / 1048576.0); };
  row("q8_0", 100.0 * 34 / 64);
  row("q4_0", 100.0 * 18 / 64);
  for (int div : {4, 8})
    for (int bits : {0, 8, 4}) {
      const int dc = D / div;
      const double kr = kr_formula(n, 8, 128, 10, D, dc, bits, 2);
      ByteModel m{D, hp.k_dim(), 2, dc, bits, 4, 4, 8, 0};
      // ids and scales for the compressed tokens on top of the paper's KR
      const double lat = double(n - 8 - 128) * 0.9;
      const double extra = lat * (4.0 * 4 + (bits ? 8.0 : 0.0)) / (double(n) * D * 2);
      (void)m;
      row(fmt::format("deltakv d_c={} {}", dc, bits ? fmt::format("int{}", bits) : "bf16"), 100.0 * (kr + extra));
    }
  return 0;
}

int cmd_analyze(const Args& a) {
  const auto gguf = io::GgufFile::open(a.get("--model", "models/SmolLM2-135M-Instruct.Q4_1.gguf"));
  const auto w = llama::LlamaWeights::load(gguf);
  const auto tok = load_tokenizer(gguf);
  const auto toks = tokens_of(tok, a.get("--text", "/usr/share/common-licenses/GPL-3"), a.num("--tokens", 1024));
  const int D = 2 * w.hp.k_dim();
  const auto kv = record_kv(w, toks, 32);
  const std::int64_t n = std::int64_t(toks.size());
  fmt::print("{} tokens of real KV (pre-RoPE K|V, kv_dim {}).\nfar: share of tokens whose most similar earlier token "
             "(L2) lies > 16 positions back (paper Fig. 2);\nenergy in the top d_c={} / {} singular directions: raw "
             "KV, residual to the best reference (stride 10), residual to a random earlier reference\n\n",
             n, D, D / 8, D / 4);
  fmt::print("{:>5} {:>7} | {:>9} {:>9} | {:>9} {:>9} | {:>9} {:>9} | {:>10} {:>10}\n", "layer", "far %", "raw /8", "raw /4",
             "best /8", "best /4", "rand /8", "rand /4", "|best|²/|x|²", "|rand|²/|x|²");
  std::mt19937 rng(1);
  for (int l = 0; l < w.hp.n_layers; ++l) {
    const float* x = kv[l].data();
    auto dist = [&](std::int64_t i, std::int64_t j) {
      double d = 0;
      for (int e = 0; e < D; ++e) d += double(x[i * D + e] - x[j * D + e]) * double(x[i * D + e] - x[j * D + e]);
      return d;
    };
    std::int64_t far = 0, cnt = 0;
    for (std::int64_t i = 1; i < n; ++i) {
      std::int64_t best = 0;
      double bd = 1e300;
      for (std::int64_t j = 0; j < i; ++j) {
        const double d = dist(i, j);
        if (d < bd) bd = d, best = j;
      }
      far += (i - best) > 16;
      ++cnt;
    }
    // residuals: best of the strided references before i, and a random one
    Eigen::MatrixXd raw(n, D), rb(n, D), rr(n, D);
    std::int64_t m = 0;
    for (std::int64_t i = 8; i < n; ++i) {
      if ((i - 8) % 10 == 0) continue;
      std::int64_t best = 8;
      double bd = 1e300;
      for (std::int64_t r = 8; r < i; r += 10) {
        const double d = dist(i, r);
        if (d < bd) bd = d, best = r;
      }
      const std::int64_t nref = (i - 8 + 9) / 10;
      const std::int64_t rnd = 8 + 10 * std::int64_t(rng() % std::uint64_t(nref));
      for (int e = 0; e < D; ++e) {
        raw(m, e) = x[i * D + e];
        rb(m, e) = x[i * D + e] - x[best * D + e];
        rr(m, e) = x[i * D + e] - x[rnd * D + e];
      }
      ++m;
    }
    auto energy = [&](const Eigen::MatrixXd& M, int k) {
      Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(M.topRows(m).transpose() * M.topRows(m));
      const auto ev = es.eigenvalues();  // ascending
      double top = 0, all = 0;
      for (int i = 0; i < D; ++i) {
        all += ev(i);
        if (i >= D - k) top += ev(i);
      }
      return 100.0 * top / all;
    };
    const double ex = raw.topRows(m).squaredNorm();
    fmt::print("{:>5} {:>6.1f}% | {:>8.1f}% {:>8.1f}% | {:>8.1f}% {:>8.1f}% | {:>8.1f}% {:>8.1f}% | {:>9.1f}% {:>9.1f}%\n", l,
               100.0 * far / cnt, energy(raw, D / 8), energy(raw, D / 4), energy(rb, D / 8), energy(rb, D / 4),
               energy(rr, D / 8), energy(rr, D / 4), 100.0 * rb.topRows(m).squaredNorm() / ex,
               100.0 * rr.topRows(m).squaredNorm() / ex);
  }
  return 0;
}

// ---- dump-kv ---------------------------------------------------------------------------------
// Forwards a cache and keeps, for the chosen layers, the query row of one position and the
// attention output the cache gave it (the engine has rotated the query already).
template <class C>
struct LastQueryTap {
  C& c;
  std::int64_t pos;          // the position whose query is kept
  std::vector<char> keep;    // [model layer]
  std::vector<std::vector<float>> q, out;  // [model layer] [q_dim], empty until seen
  const Config& config() const { return c.config(); }
  std::int64_t length(int l, int s) const { return c.length(l, s); }
  void reset(int s) { c.reset(s); }
  void append(int l, const RaggedBatch<const float>& x) { c.append(l, x); }
  void attend(int l, const RaggedBatch<const float>& qb, MatrixView<float> o) {
    c.attend(l, qb, o);
    if (!keep[std::size_t(l)]) return;
    for (std::int64_t r = 0; r < qb.rows.rows; ++r) {
      if (qb.positions[std::size_t(r)] != pos) continue;
      q[std::size_t(l)].assign(qb.rows.row(r), qb.rows.row(r) + qb.rows.cols);
      out[std::size_t(l)].assign(o.row(r), o.row(r) + o.cols);
    }
  }
};

std::vector<int> parse_layers(const std::string& s, int n_layers) {
  std::vector<int> out;
  std::set<int> seen;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) {
    std::size_t used = 0;
    int v = -1;
    try {
      v = std::stoi(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size())
      throw ConfigError("--layers: '" + item + "' is not a layer number (expected a list like 0,1,15,29)");
    if (v < 0 || v >= n_layers)
      throw ConfigError("--layers: layer " + std::to_string(v) + " not in [0, " + std::to_string(n_layers) +
                        ") (the model has " + std::to_string(n_layers) + " layers)");
    if (!seen.insert(v).second) throw ConfigError("--layers: layer " + std::to_string(v) + " is listed twice");
    out.push_back(v);
  }
  if (out.empty()) throw ConfigError("--layers: no layer given");
  return out;
}

int cmd_dump_kv(const Args& a) {
  static_assert(std::endian::native == std::endian::little, "dump-kv writes the host's bytes: little-endian only");
  const std::string model = a.get("--model", "models/SmolLM2-135M-Instruct.Q4_1.gguf");
  const std::string text = a.get("--text", "/usr/share/common-licenses/GPL-3");
  const std::string out_path = a.get("--out");
  if (out_path.empty()) throw ConfigError(std::string("dump-kv needs --out FILE\n") + kUsage);
  const std::string tok_arg = a.get("--tokens", "1024");
  std::size_t used = 0;
  long long want_tokens = 0;
  try {
    want_tokens = std::stoll(tok_arg, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != tok_arg.size() || tok_arg.empty() || want_tokens < 2 || want_tokens > (1LL << 24))
    throw ConfigError("--tokens: '" + tok_arg + "' is not a token count in [2, 2^24]");
  const int chunk = 32;
  // Written to OUT.part (opened now, so a bad path fails before the engine runs), renamed at the end.
  const std::string part = out_path + ".part";
  std::ofstream file(part, std::ios::binary | std::ios::trunc);
  if (!file) throw IoError("dump-kv: cannot write " + part);
  struct RemovePart {
    const std::string& path;
    bool keep = false;
    ~RemovePart() {
      if (!keep) std::remove(path.c_str());
    }
  } cleanup{part};

  const auto gguf = io::GgufFile::open(model);
  const auto w = llama::LlamaWeights::load(gguf);
  const auto tok = load_tokenizer(gguf);
  const auto& hp = w.hp;
  const auto layers = parse_layers(a.get("--layers", "0,1,15,29"), hp.n_layers);
  const auto toks = tokens_of(tok, text, want_tokens);
  const std::int64_t n = std::int64_t(toks.size());
  if (n < want_tokens)
    throw ConfigError("--tokens " + std::to_string(want_tokens) + ": the text " + text + " has only " + std::to_string(n) +
                      " tokens");
  const std::string name = gguf.has("general.name") ? gguf.get_string("general.name")
                                                     : model.substr(model.find_last_of('/') == std::string::npos ? 0 : model.find_last_of('/') + 1);

  // engine -> tap (last query) -> bf16 rounding (records what it appends) -> exact cache
  auto exact = llama::make_exact_cache(hp, n, chunk);
  using Fwd = ExactCacheRef<decltype(exact)>;
  Fwd fwd{exact};
  llama::Bf16Kv<Fwd> rounded(fwd, true);
  LastQueryTap<llama::Bf16Kv<Fwd>> tap{rounded, n - 1, std::vector<char>(std::size_t(hp.n_layers), 0),
                                       std::vector<std::vector<float>>(std::size_t(hp.n_layers)),
                                       std::vector<std::vector<float>>(std::size_t(hp.n_layers))};
  for (int l : layers) tap.keep[std::size_t(l)] = 1;
  llama::LlamaEngine<LastQueryTap<llama::Bf16Kv<Fwd>>> engine(w, tap, chunk);
  const auto t0 = Clock::now();
  engine.prefill(0, toks, chunk, nullptr, llama::LogitRows::none);
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();

  const Config& cfg = exact.cache().config();
  const int D = cfg.model.kv_dim(), qd = hp.q_dim();
  std::string buf;
  auto put = [&](const auto& v) { buf.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
  buf.append("DKVREAL\0", 8);
  put(std::uint32_t{1});
  put(std::uint32_t(name.size()));
  buf += name;
  put(std::int32_t(hp.n_layers));
  put(std::int32_t(layers.size()));
  for (int l : layers) put(std::int32_t(l));
  put(std::int64_t(n));
  put(std::int32_t(hp.n_q_heads));
  put(std::int32_t(hp.n_kv_heads));
  put(std::int32_t(hp.head_dim));
  put(std::int32_t(cfg.rot_dim()));
  put(double(cfg.rope.theta));
  put(std::int32_t(cfg.rope.style));
  put(std::uint32_t(3));  // bf16 rows, query/output present
  std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) pos[std::size_t(i)] = i;
  std::vector<float> rows(std::size_t(n) * D);
  for (int l : layers) {
    std::fill(rows.begin(), rows.end(), std::nanf(""));
    exact.cache().reconstruct(l, 0, pos, MatrixView<float>{rows.data(), n, D, D}, false);  // the stored rows
    const auto& appended = rounded.recorded(l);
    if (appended.size() != rows.size() || std::memcmp(appended.data(), rows.data(), rows.size() * sizeof(float)) != 0)
      throw Error(ErrorCode::shape, "dump-kv: layer " + std::to_string(l) +
                                        ": the exact cache returned rows that differ from the ones appended");
    const auto& q = tap.q[std::size_t(l)];
    const auto& o = tap.out[std::size_t(l)];
    if (q.size() != std::size_t(qd) || o.size() != std::size_t(qd))
      throw Error(ErrorCode::shape, "dump-kv: layer " + std::to_string(l) + ": the last position's query was not seen");
    buf.append(reinterpret_cast<const char*>(rows.data()), rows.size() * sizeof(float));
    buf.append(reinterpret_cast<const char*>(q.data()), q.size() * sizeof(float));
    buf.append(reinterpret_cast<const char*>(o.data()), o.size() * sizeof(float));
  }
  file.write(buf.data(), std::streamsize(buf.size()));
  file.close();
  if (!file) throw IoError("dump-kv: writing " + part + " failed");
  if (std::rename(part.c_str(), out_path.c_str()) != 0) throw IoError("dump-kv: cannot rename " + part + " to " + out_path);
  cleanup.keep = true;
  std::string ids;
  for (int l : layers) ids += (ids.empty() ? "" : ",") + std::to_string(l);
  fmt::print("wrote {} ({} bytes): model {}, layers {} of {}, {} tokens of {}, kv_dim {} ({} q / {} kv heads x {}), "
             "RoPE {} theta {}; engine ran in {:.1f} s\n",
             out_path, buf.size(), name, ids, hp.n_layers, n, text, D, hp.n_q_heads, hp.n_kv_heads, hp.head_dim,
             cfg.rope.style == RopeStyle::interleaved ? "interleaved" : cfg.rope.style == RopeStyle::half ? "half" : "none",
             cfg.rope.theta, secs);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    fmt::print(stderr, "{}", kUsage);
    return 2;
  }
  Args a;
  a.cmd = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string k = argv[i];
    if (k.rfind("--", 0) != 0 || i + 1 >= argc) {
      fmt::print(stderr, "bad argument '{}'\n{}", k, kUsage);
      return 2;
    }
    a.kv[k] = argv[++i];
  }
  try {
    if (a.cmd == "eval") return cmd_eval(a);
    if (a.cmd == "calibrate") return cmd_calibrate(a);
    if (a.cmd == "inspect") return cmd_inspect(a);
    if (a.cmd == "analyze") return cmd_analyze(a);
    if (a.cmd == "dump-kv") return cmd_dump_kv(a);
    fmt::print(stderr, "unknown command '{}'\n{}", a.cmd, kUsage);
    return 2;
  } catch (const std::exception& e) {
    fmt::print(stderr, "deltakv {}: {}\n", a.cmd, e.what());
    return 1;
  }
}
