// Tests for the example llama engine (examples/llama): it keeps its KV in a deltakv cache through
// the public API only.
//  * A tiny random llama (built in memory, no file needed) against a naive float64 forward pass
//    written here: single chunk, chunked prefill, token-by-token decode, several sequences in one
//    batch, partial RoPE, and a cache that really compresses (identity codec: still exact).
//  * The real model (models/SmolLM2-135M-Instruct.Q4_1.gguf or $DELTAKV_MODEL; skipped with a
//    message when absent) against the committed output of tests/llama_reference.py, an independent
//    numpy float64 implementation using the gguf package's dequantization.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "llama/engine.hpp"
#include "llama/model.hpp"

using namespace deltakv;

namespace {

// ---- a tiny random model and a naive reference ---------------------------------------------

llama::LlamaWeights tiny_model(std::uint32_t seed, bool tied, int rope_dim) {
  llama::LlamaWeights w;
  auto& hp = w.hp;
  hp.n_layers = 2;
  hp.hidden = 32;
  hp.n_q_heads = 4;
  hp.n_kv_heads = 2;
  hp.head_dim = 8;
  hp.ffn = 48;
  hp.vocab = 61;
  hp.rope_dim = rope_dim;
  hp.rope_theta = 10000.0;
  hp.rms_eps = 1e-5;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  auto mat = [&](int rows, int cols) {
    std::vector<float> v(std::size_t(rows) * cols);
    for (auto& x : v) x = nd(rng) / std::sqrt(float(cols));
    return v;
  };
  auto gain = [&](int n) {
    std::vector<float> v(n);
    for (auto& x : v) x = 1.0f + 0.2f * nd(rng);
    return v;
  };
  w.token_embd = mat(hp.vocab, hp.hidden);
  for (auto& x : w.token_embd) x *= std::sqrt(float(hp.hidden));  // unit-scale embeddings
  w.layers.resize(hp.n_layers);
  for (auto& L : w.layers) {
    L.attn_norm = gain(hp.hidden);
    L.wq = mat(hp.q_dim(), hp.hidden);
    for (auto& x : L.wq) x *= 3.0f;  // sharper attention
    L.wk = mat(hp.k_dim(), hp.hidden);
    L.wv = mat(hp.k_dim(), hp.hidden);
    L.wo = mat(hp.hidden, hp.q_dim());
    L.ffn_norm = gain(hp.hidden);
    L.w_gate = mat(hp.ffn, hp.hidden);
    L.w_up = mat(hp.ffn, hp.hidden);
    L.w_down = mat(hp.hidden, hp.ffn);
  }
  w.output_norm = gain(hp.hidden);
  w.tied_output = tied;
  if (!tied) w.output = mat(hp.vocab, hp.hidden);
  return w;
}

// Whole-sequence forward in double: logits [T, vocab].
std::vector<double> naive_logits(const llama::LlamaWeights& w, const std::vector<std::int32_t>& tok) {
  const auto& hp = w.hp;
  const int T = int(tok.size()), H = hp.hidden, hd = hp.head_dim, nq = hp.n_q_heads, nkv = hp.n_kv_heads;
  const int qd = nq * hd, kd = nkv * hd, F = hp.ffn, V = hp.vocab, g = nq / nkv;
  auto matvec = [](const std::vector<float>& W, const std::vector<double>& x, int out, int in) {
    std::vector<double> y(out, 0.0);
    for (int o = 0; o < out; ++o)
      for (int i = 0; i < in; ++i) y[o] += double(W[std::size_t(o) * in + i]) * x[i];
    return y;
  };
  auto norm = [&](const std::vector<double>& x, const std::vector<float>& gn) {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double s = 1.0 / std::sqrt(ss / H + hp.rms_eps);
    std::vector<double> y(H);
    for (int i = 0; i < H; ++i) y[i] = x[i] * s * gn[i];
    return y;
  };
  auto rope = [&](std::vector<double>& v, int heads, int pos) {  // interleaved pairs (2i, 2i+1)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < hp.rope_dim / 2; ++i) {
        const double ang = pos * std::pow(hp.rope_theta, -2.0 * i / hp.rope_dim);
        double& a = v[h * hd + 2 * i];
        double& b = v[h * hd + 2 * i + 1];
        const double a0 = a, b0 = b;
        a = a0 * std::cos(ang) - b0 * std::sin(ang);
        b = b0 * std::cos(ang) + a0 * std::sin(ang);
      }
  };
  std::vector<std::vector<double>> x(T, std::vector<double>(H));
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < H; ++i) x[t][i] = w.token_embd[std::size_t(tok[t]) * H + i];
  for (const auto& L : w.layers) {
    std::vector<std::vector<double>> q(T), k(T), v(T);
    for (int t = 0; t < T; ++t) {
      const auto h = norm(x[t], L.attn_norm);
      q[t] = matvec(L.wq, h, qd, H);
      k[t] = matvec(L.wk, h, kd, H);
      v[t] = matvec(L.wv, h, kd, H);
      rope(q[t], nq, t);
      rope(k[t], nkv, t);
    }
    for (int t = 0; t < T; ++t) {
      std::vector<double> att(qd, 0.0);
      for (int h = 0; h < nq; ++h) {
        const int kh = h / g;
        std::vector<double> s(t + 1);
        double mx = -1e300;
        for (int j = 0; j <= t; ++j) {
          double d = 0;
          for (int e = 0; e < hd; ++e) d += q[t][h * hd + e] * k[j][kh * hd + e];
          s[j] = d / std::sqrt(double(hd));
          mx = std::max(mx, s[j]);
        }
        double z = 0;
        for (auto& e : s) z += (e = std::exp(e - mx));
        for (int j = 0; j <= t; ++j)
          for (int e = 0; e < hd; ++e) att[h * hd + e] += s[j] / z * v[j][kh * hd + e];
      }
      const auto o = matvec(L.wo, att, H, qd);
      for (int i = 0; i < H; ++i) x[t][i] += o[i];
      const auto h2 = norm(x[t], L.ffn_norm);
      const auto gt = matvec(L.w_gate, h2, F, H);
      const auto up = matvec(L.w_up, h2, F, H);
      std::vector<double> a(F);
      for (int i = 0; i < F; ++i) a[i] = gt[i] / (1.0 + std::exp(-gt[i])) * up[i];
      const auto d = matvec(L.w_down, a, H, F);
      for (int i = 0; i < H; ++i) x[t][i] += d[i];
    }
  }
  const std::vector<float>& out = w.tied_output ? w.token_embd : w.output;
  std::vector<double> logits(std::size_t(T) * V);
  for (int t = 0; t < T; ++t) {
    const auto h = norm(x[t], w.output_norm);
    const auto z = matvec(out, h, V, H);
    std::copy(z.begin(), z.end(), logits.begin() + std::size_t(t) * V);
  }
  return logits;
}

double max_abs_diff(const float* got, const double* want, std::size_t n) {
  double m = 0;
  for (std::size_t i = 0; i < n; ++i) m = std::max(m, std::abs(double(got[i]) - want[i]));
  return m;
}

std::vector<std::int32_t> random_tokens(int n, int vocab, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = std::int32_t(rng() % std::uint32_t(vocab));
  return t;
}

// Runs `tok` through a fresh sequence in chunks of `chunk`, all logits.
template <class Engine>
std::vector<float> run_chunked(Engine& eng, int seq, const std::vector<std::int32_t>& tok, int chunk) {
  const int V = eng.hparams().vocab;
  std::vector<float> logits(tok.size() * std::size_t(V));
  eng.reset(seq);
  eng.prefill(seq, tok, chunk, logits.data(), llama::LogitRows::all);
  return logits;
}

// ---- the real model -------------------------------------------------------------------------

std::string model_path() {
  const char* env = std::getenv("DELTAKV_MODEL");
  return env && *env ? env : std::string(DELTAKV_TEST_DATA_DIR) + "/../../models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

// Loaded once for all test cases; nullptr (with a message) when the file is absent.
const llama::LlamaWeights* real_model() {
  static std::unique_ptr<llama::LlamaWeights> w;
  static bool tried = false;
  if (!tried) {
    tried = true;
    if (std::filesystem::exists(model_path())) w = std::make_unique<llama::LlamaWeights>(llama::LlamaWeights::load(model_path()));
  }
  if (!w)
    MESSAGE("SKIPPED: model file not found at " << model_path()
                                                << " (set DELTAKV_MODEL or copy SmolLM2-135M-Instruct.Q4_1.gguf into models/)");
  return w.get();
}

struct Expected {
  std::vector<std::int32_t> tokens, columns, argmax;
  std::vector<double> logsumexp, next_logit, max_logit;
  double mean_nll = 0;
  int vocab = 0;
  std::vector<float> sampled;   // [rows, columns]
  std::vector<float> last_row;  // [vocab]
  std::uint64_t model_bytes = 0;
};

Expected load_expected() {
  const std::string base = std::string(DELTAKV_TEST_DATA_DIR) + "/llama_expected";
  std::ifstream js(base + ".json");
  REQUIRE_MESSAGE(js.good(), "missing " << base << ".json (run tests/llama_reference.py)");
  const auto j = nlohmann::json::parse(js);
  Expected e;
  e.tokens = j["tokens"].get<std::vector<std::int32_t>>();
  e.columns = j["columns"].get<std::vector<std::int32_t>>();
  e.argmax = j["argmax"].get<std::vector<std::int32_t>>();
  e.logsumexp = j["logsumexp"].get<std::vector<double>>();
  e.next_logit = j["next_token_logit"].get<std::vector<double>>();
  e.max_logit = j["max_logit"].get<std::vector<double>>();
  e.mean_nll = j["mean_nll"];
  e.vocab = j["vocab"];
  e.model_bytes = j["model_bytes"];
  std::ifstream bin(base + ".bin", std::ios::binary);
  REQUIRE(bin.good());
  std::vector<char> raw((std::istreambuf_iterator<char>(bin)), std::istreambuf_iterator<char>());
  const std::size_t ns = e.tokens.size() * e.columns.size();
  REQUIRE(raw.size() == 4 * (ns + std::size_t(e.vocab)));
  std::vector<float> all(raw.size() / 4);
  for (std::size_t i = 0; i < all.size(); ++i) {
    std::uint32_t u = 0;
    for (int k = 0; k < 4; ++k) u |= std::uint32_t(static_cast<unsigned char>(raw[4 * i + k])) << (8 * k);
    all[i] = std::bit_cast<float>(u);
  }
  e.sampled.assign(all.begin(), all.begin() + std::ptrdiff_t(ns));
  e.last_row.assign(all.begin() + std::ptrdiff_t(ns), all.end());
  return e;
}

struct Agreement {
  double max_abs = 0, rel_l2 = 0, max_lse = 0, nll = 0, nll_diff = 0;
  int top1_mismatch = 0;  // rows whose reference top-1 is not (within 1e-3) the engine's top-1
  bool last_top1_equal = false;
};

Agreement compare(const Expected& e, const std::vector<float>& z) {
  const std::size_t T = e.tokens.size(), V = std::size_t(e.vocab), C = e.columns.size();
  Agreement a;
  double num = 0, den = 0;
  auto acc = [&](float got, double want) {
    const double d = double(got) - want;
    a.max_abs = std::max(a.max_abs, std::abs(d));
    num += d * d;
    den += want * want;
  };
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t c = 0; c < C; ++c) acc(z[t * V + std::size_t(e.columns[c])], e.sampled[t * C + c]);
  for (std::size_t v = 0; v < V; ++v) acc(z[(T - 1) * V + v], e.last_row[v]);
  a.rel_l2 = std::sqrt(num / den);
  double nll = 0;
  for (std::size_t t = 0; t < T; ++t) {
    const float* row = z.data() + t * V;
    const float mx = *std::max_element(row, row + V);
    double s = 0;
    for (std::size_t v = 0; v < V; ++v) s += std::exp(double(row[v]) - mx);
    const double lse = mx + std::log(s);
    a.max_lse = std::max(a.max_lse, std::abs(lse - e.logsumexp[t]));
    if (double(row[e.argmax[t]]) < double(mx) - 1e-3) ++a.top1_mismatch;
    if (t + 1 < T) nll += lse - row[e.tokens[t + 1]];
  }
  a.nll = nll / double(T - 1);
  a.nll_diff = std::abs(a.nll - e.mean_nll);
  const float* last = z.data() + (T - 1) * V;
  a.last_top1_equal = llama::argmax(std::span<const float>(last, V)) == e.argmax[T - 1];
  return a;
}

}  // namespace

TEST_CASE("llama engine: tiny model matches a naive float64 forward pass (exact cache)") {
  for (bool tied : {true, false})
    for (int rope_dim : {8, 4}) {
      CAPTURE(tied);
      CAPTURE(rope_dim);
      const auto w = tiny_model(11 + unsigned(rope_dim) + (tied ? 100u : 0u), tied, rope_dim);
      const auto tok = random_tokens(23, w.hp.vocab, 5);
      const auto want = naive_logits(w, tok);
      auto kv = llama::make_exact_cache(w.hp, 64, 16, 2);
      CHECK(kv.cache().config().rope.style == RopeStyle::interleaved);
      llama::LlamaEngine eng(w, kv.cache(), 16);
      for (int chunk : {16, 5, 1}) {
        CAPTURE(chunk);
        const auto got = run_chunked(eng, 1, tok, chunk);
        CHECK(max_abs_diff(got.data(), want.data(), want.size()) < 2e-4);
        CHECK(eng.position(1) == 23);
      }
      // last-row logits only
      eng.reset(0);
      std::vector<float> last(std::size_t(w.hp.vocab));
      eng.prefill(0, tok, 7, last.data(), llama::LogitRows::last);
      CHECK(max_abs_diff(last.data(), want.data() + std::size_t(22) * w.hp.vocab, last.size()) < 2e-4);
    }
}

TEST_CASE("llama engine: several sequences in one ragged batch") {
  const auto w = tiny_model(3, true, 8);
  const int V = w.hp.vocab;
  const auto a = random_tokens(13, V, 1), b = random_tokens(9, V, 2);
  const auto want_a = naive_logits(w, a), want_b = naive_logits(w, b);
  auto kv = llama::make_exact_cache(w.hp, 32, 16, 3);
  llama::LlamaEngine eng(w, kv.cache(), 16);
  // Prefill: a[0..8) as sequence 2 and b[0..5) as sequence 0, one batch.
  std::vector<std::int32_t> rows(a.begin(), a.begin() + 8);
  rows.insert(rows.end(), b.begin(), b.begin() + 5);
  const std::int32_t seqs[2] = {2, 0};
  const std::int32_t ip[3] = {0, 8, 13};
  std::vector<float> z(13 * std::size_t(V));
  eng.forward(llama::TokenBatch{rows, seqs, ip}, matrix(z.data(), 13, V), llama::LogitRows::all);
  CHECK(max_abs_diff(z.data(), want_a.data(), 8 * std::size_t(V)) < 2e-4);
  CHECK(max_abs_diff(z.data() + 8 * std::size_t(V), want_b.data(), 5 * std::size_t(V)) < 2e-4);
  // Decode both, one row each, last-row logits [2, V].
  for (int step = 0; step < 4; ++step) {
    const std::int32_t two[2] = {a[8 + step], b[5 + step]};
    const std::int32_t ip2[3] = {0, 1, 2};
    std::vector<float> z2(2 * std::size_t(V));
    eng.forward(llama::TokenBatch{two, seqs, ip2}, matrix(z2.data(), 2, V), llama::LogitRows::last);
    CHECK(max_abs_diff(z2.data(), want_a.data() + std::size_t(8 + step) * V, std::size_t(V)) < 2e-4);
    CHECK(max_abs_diff(z2.data() + V, want_b.data() + std::size_t(5 + step) * V, std::size_t(V)) < 2e-4);
  }
  CHECK(eng.position(2) == 12);
  CHECK(eng.position(0) == 9);
  CHECK(eng.position(1) == 0);
  // Errors are typed: too many rows, a bad token id, logits of the wrong shape.
  std::vector<std::int32_t> many(17, 1);
  CHECK_THROWS_AS(eng.forward(1, many, {}, llama::LogitRows::none), CapacityError);
  const std::int32_t bad[1] = {V};
  CHECK_THROWS_AS(eng.forward(1, bad, {}, llama::LogitRows::none), ShapeError);
  std::vector<float> small(static_cast<std::size_t>(V));
  const std::int32_t ok[2] = {1, 2};
  CHECK_THROWS_AS(eng.forward(1, ok, matrix(small.data(), 1, V), llama::LogitRows::all), ShapeError);
  CHECK_THROWS_AS(eng.forward(3, ok, {}, llama::LogitRows::none), ShapeError);  // no such sequence slot
  CHECK_THROWS_AS(eng.forward(-1, ok, {}, llama::LogitRows::none), ShapeError);
  CHECK_THROWS_AS((void)eng.position(3), ShapeError);
  {
    auto kv2 = llama::make_exact_cache(w.hp, 32, 4);  // the cache takes 4 query rows per sequence
    llama::LlamaEngine eng2(w, kv2.cache(), 16);
    const std::int32_t five[5] = {1, 2, 3, 4, 5};
    CHECK_THROWS_AS(eng2.forward(0, five, {}, llama::LogitRows::none), CapacityError);
    CHECK(kv2.cache().length(0, 0) == 0);
    CHECK(kv2.cache().length(1, 0) == 0);
  }
  CHECK(eng.position(1) == 0);  // rejected before anything was appended
}

TEST_CASE("llama engine: a compressing cache with the identity codec stays exact") {
  const auto w = tiny_model(21, false, 8);
  const auto tok = random_tokens(40, w.hp.vocab, 9);
  const auto want = naive_logits(w, tok);
  CompressionConfig comp;
  comp.sinks = 2;
  comp.recent = 4;
  comp.block = 3;
  comp.k_neighbors = 2;
  comp.latent_dim = 2 * w.hp.k_dim();
  const Config cfg = llama::make_config(w.hp, comp, Capacity{1, 64, 8});
  llama::CpuKvCache<> kv(cfg, Compressor<float>::identity(w.hp.n_layers, cfg.model.kv_dim()), FixedStride(5));
  llama::LlamaEngine eng(w, kv.cache(), 8);
  const auto got = run_chunked(eng, 0, tok, 8);
  CHECK(kv.cache().counts().latents > 0);  // it really compressed
  CHECK(max_abs_diff(got.data(), want.data(), want.size()) < 5e-4);
}

TEST_CASE("llama engine: config from the model and mismatch checks") {
  const auto w = tiny_model(1, true, 8);
  const Config c = llama::make_exact_config(w.hp, 16, 4);
  CHECK(c.model.kv_dim() == 2 * 2 * 8);
  CHECK(c.rope.style == RopeStyle::interleaved);
  CHECK(c.rope.theta == 10000.0);
  CHECK(c.rot_dim() == 8);
  auto other = w;
  other.hp.rope_theta = 500000.0;
  auto kv = llama::make_exact_cache(w.hp, 16, 4);
  CHECK_THROWS_AS(llama::LlamaEngine(other, kv.cache(), 4), ConfigError);
  other = w;
  other.hp.n_kv_heads = 4;
  CHECK_THROWS_AS(llama::LlamaEngine(other, kv.cache(), 4), ConfigError);
}

TEST_CASE("llama engine: SmolLM2-135M logits match the numpy reference (exact cache)") {
  const llama::LlamaWeights* w = real_model();
  if (!w) return;
  const Expected e = load_expected();
  REQUIRE(w->hp.vocab == e.vocab);
  if (std::filesystem::file_size(model_path()) != e.model_bytes)
    MESSAGE("note: the model file differs in size from the one the reference was computed with");
  CHECK(w->tied_output);
  CHECK(w->hp.n_layers == 30);
  CHECK(w->hp.head_dim == 64);
  CHECK(w->hp.rope_theta == 100000.0);
  const int T = int(e.tokens.size()), V = e.vocab;
  auto kv = llama::make_exact_cache(w->hp, 64, T);
  llama::LlamaEngine eng(*w, kv.cache(), T);

  // Bounds (f32 engine vs float64 reference; |logits| reach ~30): max |diff| < 1e-3 over the
  // compared logits, relative L2 < 1e-4, logsumexp per row < 1e-3, mean NLL < 1e-4, same top-1.
  // Measured on x86-64 (g++ 12, Eigen 3.4): max |diff| 7.8e-5, rel L2 2.6e-6.
  auto check = [&](const std::vector<float>& z, const char* what) {
    const Agreement a = compare(e, z);
    MESSAGE(std::string(what) << ": max|diff| " << a.max_abs << ", rel L2 " << a.rel_l2 << ", max |logsumexp diff| " << a.max_lse
                 << ", mean NLL " << a.nll << " (reference " << e.mean_nll << ", |diff| " << a.nll_diff << ")");
    CHECK(a.max_abs < 1e-3);
    CHECK(a.rel_l2 < 1e-4);
    CHECK(a.max_lse < 1e-3);
    CHECK(a.nll_diff < 1e-4);
    CHECK(a.top1_mismatch == 0);
    CHECK(a.last_top1_equal);
  };
  check(run_chunked(eng, 0, e.tokens, T), "one chunk of 40");
  check(run_chunked(eng, 0, e.tokens, 16), "chunks of 16");
  {  // prefill 32 in chunks of 8, then decode the last 8 one token at a time
    std::vector<float> z(std::size_t(T) * V);
    eng.reset(0);
    eng.prefill(0, std::span<const std::int32_t>(e.tokens).first(32), 8, z.data(), llama::LogitRows::all);
    for (int t = 32; t < T; ++t)
      eng.forward(0, std::span<const std::int32_t>(e.tokens).subspan(std::size_t(t), 1), matrix(z.data() + std::size_t(t) * V, 1, V),
                  llama::LogitRows::last);
    check(z, "prefill 32 + decode 8");
  }
  CHECK(e.argmax[T - 1] == 28030);  // " Madrid" after "The capital of Spain is"
}

TEST_CASE("llama engine: SmolLM2-135M through a compressing cache (identity codec) stays on the reference") {
  const llama::LlamaWeights* w = real_model();
  if (!w) return;
  const Expected e = load_expected();
  CompressionConfig comp;
  comp.sinks = 4;
  comp.recent = 8;
  comp.block = 4;
  comp.latent_dim = 2 * w->hp.k_dim();
  const Config cfg = llama::make_config(w->hp, comp, Capacity{1, 64, 16});
  llama::CpuKvCache<> kv(cfg, Compressor<float>::identity(w->hp.n_layers, cfg.model.kv_dim()));
  llama::LlamaEngine eng(*w, kv.cache(), 16);
  const auto z = run_chunked(eng, 0, e.tokens, 16);
  CHECK(kv.cache().counts().latents > 0);
  const Agreement a = compare(e, z);
  MESSAGE("compressing cache: max|diff| " << a.max_abs << ", rel L2 " << a.rel_l2 << ", mean NLL " << a.nll);
  CHECK(a.max_abs < 1e-3);
  CHECK(a.rel_l2 < 1e-4);
  CHECK(a.last_top1_equal);
}
