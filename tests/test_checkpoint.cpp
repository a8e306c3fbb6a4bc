// Tests for deltakv/io/checkpoint.hpp: paper-layout checkpoints written by the Python safetensors
// package (tests/data/make_paper_checkpoint.py) must reproduce numpy's codec outputs through the
// CPU device and through a CompressedCache; malformed checkpoints must fail with the right typed
// error; our own format must round-trip bit-exactly.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "deltakv/cache.hpp"
#include "deltakv/compressor.hpp"
#include "deltakv/cpu/device.hpp"
#include "deltakv/io/checkpoint.hpp"
#include "deltakv/io/safetensors.hpp"
#include "support.hpp"
#include "support_io.hpp"

#ifndef DELTAKV_TEST_DATA_DIR
#error "DELTAKV_TEST_DATA_DIR must name tests/data"
#endif

using namespace deltakv;
using namespace deltakv::io;

using dkt::data_path;
using dkt::TempDir;
using dkt::write_text;

namespace {

// A tensor to write as F32.
struct W {
  std::string name;
  std::vector<std::int64_t> shape;
  std::vector<float> v;
};

void write_f32(const std::string& path, const std::vector<W>& ws, const std::map<std::string, std::string>& meta = {}) {
  std::vector<std::vector<std::byte>> bytes;
  for (const W& w : ws) bytes.push_back(f32_bytes(w.v));
  std::vector<TensorToWrite> t;
  for (std::size_t i = 0; i < ws.size(); ++i) t.push_back({ws[i].name, StDType::F32, ws[i].shape, bytes[i]});
  write_safetensors(path, t, meta);
}

// Every tensor of a float checkpoint, as F32 (to write modified copies).
std::vector<W> read_all(const std::string& path) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  std::vector<W> out;
  for (const std::string& n : f.names()) out.push_back({n, f.info(n).shape, f.read_as<float>(n)});
  return out;
}

W* find_w(std::vector<W>& ws, const std::string& name) {
  for (W& w : ws)
    if (w.name == name) return &w;
  FAIL("no tensor " << name);
  return nullptr;
}

void erase_w(std::vector<W>& ws, const std::string& name) {
  const auto n = ws.size();
  ws.erase(std::remove_if(ws.begin(), ws.end(), [&](const W& w) { return w.name == name; }), ws.end());
  REQUIRE(ws.size() + 1 == n);
}

W randw(const std::string& name, std::vector<std::int64_t> shape, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.3f);
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  W w{name, std::move(shape), std::vector<float>(static_cast<std::size_t>(n))};
  for (float& x : w.v) x = nd(rng);
  return w;
}

// A 2-layer linear checkpoint with kv_dim D and latent dc per layer (dc1 for layer 1).
std::vector<W> linear_ckpt(int D, int dc0, int dc1) {
  std::vector<W> ws;
  const int dcs[2] = {dc0, dc1};
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
    ws.push_back(randw(p + "compress_down.weight", {dcs[l], D}, 10 + l));
    ws.push_back(randw(p + "compress_up.weight", {D, dcs[l]}, 20 + l));
  }
  return ws;
}

double rel_l2(const std::vector<double>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  double e = 0, n = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    e += (got[i] - want[i]) * (got[i] - want[i]);
    n += want[i] * want[i];
  }
  return std::sqrt(e / n);
}

template <class T>
std::vector<double> widen(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// Z = f_c(X) - f_c(REF) and XHAT = f_d(Z) + REF, through the CPU device and the library's
// encoder/decoder types: Z by two encoder calls and a subtraction, or (residual) by one
// encode_residual call over [X; REF], the path the cache takes.
template <class T, class Enc>
void run_codec(const Enc& e, const LinearDecoder<T>& d, const std::vector<T>& X, const std::vector<T>& R, int n,
               std::vector<T>& Z, std::vector<T>& XHAT, bool residual) {
  cpu::CpuDevice<T> dev;
  const int D = e.input_dim(), dc = e.latent_dim();
  std::vector<T> zr(std::size_t(n) * dc), scratch(std::max<std::int64_t>(1, e.scratch_elems(2 * n)));
  Z.assign(std::size_t(n) * dc, std::numeric_limits<T>::quiet_NaN());  // poisoned: every value must be written
  XHAT.assign(std::size_t(n) * D, T(0));
  if (residual) {
    std::vector<T> xr(X);
    xr.insert(xr.end(), R.begin(), R.end());
    e.encode_residual(dev, matrix(xr.data(), 2 * n, D), matrix(Z.data(), n, dc), scratch.data());
  } else {
    e.encode(dev, matrix<const T>(X.data(), n, D), matrix(Z.data(), n, dc), scratch.data());
    e.encode(dev, matrix<const T>(R.data(), n, D), matrix(zr.data(), n, dc), scratch.data());
    dev.axpy_rows(AxpyRowsParams<T>{zr.data(), dc, Z.data(), dc, n, dc, T(-1)});
  }
  d.decode(dev, matrix<const T>(Z.data(), n, dc), matrix(XHAT.data(), n, D));
  dev.axpy_rows(AxpyRowsParams<T>{R.data(), D, XHAT.data(), D, n, D, T(1)});
}

template <class T>
constexpr double tol() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}

template <class T>
void check_against_numpy(const Compressor<T>& c, const std::string& expected_file, const std::vector<int>& layers) {
  const SafetensorsFile ex = SafetensorsFile::open(data_path(expected_file));
  const std::vector<T> X = ex.read_as<T>("X"), R = ex.read_as<T>("REF");
  const int n = static_cast<int>(ex.info("X").shape[0]);
  for (int l : layers)
    for (const bool residual : {false, true}) {
      CAPTURE(l);
      CAPTURE(residual);
      std::vector<T> Z, XHAT;
      with_encoders(c, [&](const auto& encs) { run_codec<T>(encs[l], c.decoders()[l], X, R, n, Z, XHAT, residual); });
      const double ez = rel_l2(widen(Z), ex.read_as<double>("Z." + std::to_string(l)));
      const double ex_hat = rel_l2(widen(XHAT), ex.read_as<double>("XHAT." + std::to_string(l)));
      CHECK(ez < tol<T>());
      CHECK(ex_hat < tol<T>());
    }
}

template <class E, class F>
void check_throws_with(F&& f, const std::string& needle) {
  bool thrown = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    CAPTURE(e.what());
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
  }
  CHECK_MESSAGE(thrown, "expected exception not thrown");
}

}  // namespace

// ---- paper layout vs numpy -----------------------------------------------------------------------

TEST_CASE_TEMPLATE("paper SwiGLU checkpoint reproduces numpy's codec outputs", T, float, double) {
  const Compressor<T> c = load_paper_checkpoint<T>(data_path("paper_swiglu.safetensors"), 3, 16);
  CHECK(c.kind == CodecKind::swiglu);
  CHECK(c.kv_dim == 16);
  CHECK(c.latent_dim == 4);
  CHECK(c.hidden == 12);
  REQUIRE(c.layers.size() == 3);
  CHECK(c.layers[0].present());
  CHECK_FALSE(c.layers[1].present());
  CHECK(c.layers[1].down.empty());
  CHECK(c.layers[1].w3.empty());
  CHECK(c.layers[1].up.empty());
  CHECK(c.layers[2].present());
  for (int l : {0, 2}) {
    const auto& lc = c.layers[l];
    CHECK(lc.down.in == 16);
    CHECK(lc.down.out == 24);
    CHECK(lc.down.b.size() == 24);
    CHECK(lc.w3.in == 12);
    CHECK(lc.w3.out == 4);
    CHECK(lc.w3.b.size() == 4);
    CHECK(lc.up.in == 4);
    CHECK(lc.up.out == 16);
    CHECK(lc.up.b.size() == 16);
  }
  check_against_numpy(c, "paper_swiglu_expected.safetensors", {0, 2});
  CHECK_THROWS_AS(c.linear_encoders(), ConfigError);

  // expected_kv_dim 0 (default) accepts what the file says.
  const Compressor<T> c2 = load_paper_checkpoint<T>(data_path("paper_swiglu.safetensors"), 3);
  CHECK(c2.layers[2].up.w == c.layers[2].up.w);
}

TEST_CASE_TEMPLATE("paper linear checkpoint (sizes inferred, F32 + F16 layers) reproduces numpy", T, float, double) {
  const Compressor<T> c = load_paper_checkpoint<T>(data_path("paper_linear.safetensors"), 2);
  CHECK(c.kind == CodecKind::linear);
  CHECK(c.kv_dim == 16);
  CHECK(c.latent_dim == 4);
  CHECK(c.hidden == 0);
  REQUIRE(c.layers.size() == 2);
  CHECK(c.layers[0].down.b.size() == 4);
  CHECK(c.layers[0].up.b.size() == 16);
  CHECK(c.layers[1].down.b.empty());
  CHECK(c.layers[1].up.b.empty());
  CHECK(c.layers[1].w3.empty());
  check_against_numpy(c, "paper_linear_expected.safetensors", {0, 1});
}

TEST_CASE("paper checkpoint: SafetensorsFile overload with an in-memory config") {
  const SafetensorsFile f = SafetensorsFile::open(data_path("paper_swiglu.safetensors"));
  const nlohmann::json ok = {{"compressor_down_type", "MLP_SwiGLU "},  // normalised like the reference
                             {"compressor_up_type", "linear"},
                             {"kv_compressed_size", 4},
                             {"compressor_intermediate_size", 2048},  // overridden by the down size
                             {"compressor_down_intermediate_size", 12},
                             {"compressor_up_intermediate_size", -1},
                             {"compressor_linear_bias", true},
                             {"split_kv", false},
                             {"use_nonlinear_compressor", true}};
  const Compressor<double> c = load_paper_checkpoint<double>(f, 3, 16, &ok);
  CHECK(c.hidden == 12);
  check_against_numpy(c, "paper_swiglu_expected.safetensors", {0, 2});

  const nlohmann::json bad_h = {{"compressor_intermediate_size", 2048}};
  check_throws_with<ShapeError>([&] { (void)load_paper_checkpoint<double>(f, 3, 16, &bad_h); },
                                "compressor_intermediate_size");
  const nlohmann::json not_obj = nlohmann::json::array({1, 2});
  CHECK_THROWS_AS((void)load_paper_checkpoint<double>(f, 3, 16, &not_obj), FormatError);
  CHECK_THROWS_AS((void)load_paper_checkpoint<double>(f, 3, -1), ConfigError);

  // A linear checkpoint with the reference's symmetric defaults (intermediate size is meaningless
  // for a linear f_c and must not be checked against anything).
  const SafetensorsFile fl = SafetensorsFile::open(data_path("paper_linear.safetensors"));
  const nlohmann::json lin = {{"compressor_down_type", "linear"}, {"compressor_intermediate_size", 2048},
                              {"kv_compressed_size", 4}};
  CHECK(load_paper_checkpoint<float>(fl, 2, 16, &lin).latent_dim == 4);
}

// ---- through the compressed cache ----------------------------------------------------------------

namespace {

// Layer 1 exact (it has no codec in the checkpoint), layers 0 and 2 compressed, dense attention.
struct MiddleExactPolicy {
  LayerPlan plan_layer(int l, int) const {
    LayerPlan p;
    p.exact = l == 1;
    return p;
  }
  int page_size() const { return 0; }
};

}  // namespace

// Both of the cache's encode paths: encode_residual (SwiGLUEncoder's own) and encode + subtraction
// (an encoder without encode_residual).
TEST_CASE_TEMPLATE("paper SwiGLU checkpoint in a CompressedCache: latents decode to f_d(f_c(x) - f_c(ref)) + ref", Enc,
                   SwiGLUEncoder<double>, dkt::EncodeOnly<SwiGLUEncoder<double>>) {
  using T = double;
  static_assert(EncodesResiduals<Enc, T> == std::is_same_v<Enc, SwiGLUEncoder<T>>);
  const Compressor<T> comp = load_paper_checkpoint<T>(data_path("paper_swiglu.safetensors"), 3, 16);
  Config cfg;
  cfg.model = {3, 2, 2, 4};  // kv_dim = 2 * 2 * 4 = 16
  cfg.comp.sinks = 2;
  cfg.comp.recent = 8;
  cfg.comp.k_neighbors = 2;
  cfg.comp.latent_dim = 4;
  cfg.comp.metric = Metric::l2;
  cfg.cap = {1, 64, 1};
  const int S = 2, stride = 3, k = 2, D = 16;
  std::vector<Enc> encs;
  for (const auto& e : comp.swiglu_encoders()) encs.push_back(Enc{e});
  const auto decs = comp.decoders();
  using C = CompressedCache<T, cpu::CpuDevice<T>, FixedStride, Enc, LinearDecoder<T>, MiddleExactPolicy>;
  const auto lay = C::layout(cfg, FixedStride(stride), MiddleExactPolicy{}, encs[0].scratch_elems(cfg.compress_rows()));
  std::vector<std::byte> storage(lay.storage_bytes), work(lay.workspace_bytes);
  cpu::CpuDevice<T> dev;
  C cache(dev, cfg, FixedStride(stride), std::span<const Enc>(encs), std::span<const LinearDecoder<T>>(decs),
          MiddleExactPolicy{}, storage, work);

  const int N = 50;
  std::mt19937 rng(7);
  std::normal_distribution<double> nd;
  std::vector<T> x(std::size_t(N) * D);
  for (auto& v : x) v = nd(rng);
  // Append in uneven chunks (the ring wraps inside a chunk), the same rows to every layer.
  const int chunks[] = {7, 1, 20, 22};
  int at = 0;
  for (int len : chunks) {
    std::vector<std::int64_t> pos(len);
    for (int i = 0; i < len; ++i) pos[i] = at + i;
    const std::int32_t sid[] = {0};
    const std::int32_t ip[] = {0, len};
    RaggedBatch<const T> b{matrix<const T>(x.data() + std::size_t(at) * D, len, D), sid, ip, pos};
    for (int l = 0; l < 3; ++l) cache.append(l, b);
    at += len;
  }
  REQUIRE(at == N);

  // Compressed frontier: everything before it that is not a sink or reference is a latent.
  const TokenCounts counts = cache.counts();
  const std::int64_t c_front = N - counts.recent / 2;  // two compressed layers
  std::int64_t n_lat = 0;
  for (std::int64_t p = S; p < c_front; ++p) n_lat += (p - S) % stride != 0;
  REQUIRE(n_lat > 10);
  CHECK(counts.latents == 2 * n_lat);
  CHECK(counts.exact_layer == N);

  // f_c and f_d by hand (plain loops, double), from the loaded weights.
  auto lin = [](const OwnedLinear<T>& m, const std::vector<double>& in) {
    std::vector<double> out(static_cast<std::size_t>(m.out));
    for (int o = 0; o < m.out; ++o) {
      double s = m.b.empty() ? 0.0 : m.b[o];
      for (int i = 0; i < m.in; ++i) s += m.w[std::size_t(o) * m.in + i] * in[i];
      out[o] = s;
    }
    return out;
  };
  auto f_c = [&](const LayerCodec<T>& lc, const std::vector<double>& v) {
    std::vector<double> h = lin(lc.down, v);
    const int H = lc.w3.in;
    std::vector<double> g(static_cast<std::size_t>(H));
    for (int j = 0; j < H; ++j) g[j] = h[j] / (1.0 + std::exp(-h[j])) * h[H + j];
    return lin(lc.w3, g);
  };

  std::vector<std::int64_t> all(N);
  for (int i = 0; i < N; ++i) all[i] = i;
  for (int l = 0; l < 3; ++l) {
    CAPTURE(l);
    std::vector<T> out(std::size_t(N) * D, std::numeric_limits<T>::quiet_NaN());
    cache.reconstruct(l, 0, all, matrix(out.data(), N, D), false);
    double err = 0, norm = 0, lossy = 0;
    for (std::int64_t p = 0; p < N; ++p) {
      const T* got = out.data() + p * D;
      const T* xp = x.data() + p * D;
      const bool latent = l != 1 && p >= S && p < c_front && (p - S) % stride != 0;
      if (l != 1 && p >= S) CHECK(cache.position_class(p) == ((p - S) % stride == 0 ? 1 : 2));
      if (!latent) {  // sinks, references, the recent ring and the exact layer: stored exactly
        for (int d = 0; d < D; ++d) REQUIRE(got[d] == xp[d]);
        continue;
      }
      // The k nearest earlier references by L2 (ties keep the earlier one), averaged.
      std::vector<std::pair<double, std::int64_t>> best;
      for (std::int64_t q = S; q < p; q += stride) {
        double d2 = 0;
        for (int d = 0; d < D; ++d) d2 += (xp[d] - x[q * D + d]) * (xp[d] - x[q * D + d]);
        best.push_back({d2, q});
      }
      std::stable_sort(best.begin(), best.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      best.resize(std::min<std::size_t>(best.size(), k));
      std::vector<double> ref(D, 0.0), xv(xp, xp + D);
      for (const auto& b : best)
        for (int d = 0; d < D; ++d) ref[d] += x[b.second * D + d] / double(best.size());
      const std::vector<double> zx = f_c(comp.layers[l], xv), zr = f_c(comp.layers[l], ref);
      std::vector<double> z(4);
      for (int j = 0; j < 4; ++j) z[j] = zx[j] - zr[j];
      const std::vector<double> y = lin(comp.layers[l].up, z);
      for (int d = 0; d < D; ++d) {
        const double want = y[d] + ref[d];
        err += (got[d] - want) * (got[d] - want);
        norm += want * want;
        lossy += (got[d] - xp[d]) * (got[d] - xp[d]);
      }
    }
    if (l != 1) {
      CHECK(std::sqrt(err / norm) < 1e-12);
      CHECK(std::sqrt(lossy / norm) > 1e-2);  // the check above is not vacuous: the codec is lossy
    }
  }
}

// ---- malformed paper checkpoints -----------------------------------------------------------------

TEST_CASE("paper checkpoint: truncated file -> FormatError") {
  TempDir tmp;
  std::ifstream in(data_path("paper_swiglu.safetensors"), std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  REQUIRE(bytes.size() > 200);
  for (std::size_t keep : {bytes.size() - 100, std::size_t(200), std::size_t(5)}) {
    CAPTURE(keep);
    write_text(tmp.file("trunc.safetensors"), bytes.substr(0, keep));
    CHECK_THROWS_AS((void)load_paper_checkpoint<float>(tmp.file("trunc.safetensors"), 3), FormatError);
  }
  CHECK_THROWS_AS((void)load_paper_checkpoint<float>(tmp.file("missing.safetensors"), 3), IoError);
}

TEST_CASE("paper checkpoint: split K/V compressors -> ConfigError") {
  TempDir tmp;
  const std::string f = tmp.file("split.safetensors");
  for (const char* down : {"model.layers.0.self_attn.k_compress_down.weight", "model.layers.0.self_attn.compress_down_k.weight",
                           "model.layers.0.self_attn.v_compress_up.weight", "model.layers.0.self_attn.compress_up_v.weight",
                           "model.layers.0.self_attn.compress_down.k.weight"}) {
    CAPTURE(down);
    std::vector<W> ws = linear_ckpt(16, 4, 4);
    ws.push_back(randw(down, {4, 8}, 3));
    write_f32(f, ws);
    check_throws_with<ConfigError>([&] { (void)load_paper_checkpoint<float>(f, 2); }, "split K/V");
  }
  // config.json says split_kv.
  write_f32(f, linear_ckpt(16, 4, 4));
  write_text(tmp.file("config.json"), R"({"split_kv": true})");
  check_throws_with<ConfigError>([&] { (void)load_paper_checkpoint<float>(f, 2); }, "split K/V");
}

TEST_CASE("paper checkpoint: inconsistent shapes and sizes") {
  TempDir tmp;
  const std::string f = tmp.file("ckpt.safetensors");

  SUBCASE("layers disagree on d_c -> ShapeError naming the tensor") {
    write_f32(f, linear_ckpt(16, 4, 3));
    check_throws_with<ShapeError>([&] { (void)load_paper_checkpoint<float>(f, 2); },
                                  "model.layers.1.self_attn.compress_down.weight");
  }
  SUBCASE("down and up of one layer disagree -> ShapeError") {
    std::vector<W> ws = linear_ckpt(16, 4, 4);
    *find_w(ws, "model.layers.1.self_attn.compress_up.weight") = randw("model.layers.1.self_attn.compress_up.weight", {16, 5}, 1);
    write_f32(f, ws);
    check_throws_with<ShapeError>([&] { (void)load_paper_checkpoint<float>(f, 2); },
                                  "model.layers.1.self_attn.compress_up.weight");
  }
  SUBCASE("kv_dim differs from the caller's -> ShapeError") {
    check_throws_with<ShapeError>([&] { (void)load_paper_checkpoint<float>(data_path("paper_swiglu.safetensors"), 3, 32); },
                                  "expected_kv_dim");
  }
  SUBCASE("odd w12 rows -> ShapeError") {
    std::vector<W> ws = read_all(data_path("paper_swiglu.safetensors"));
    const std::string n = "model.layers.2.self_attn.compress_down.w12.weight";
    *find_w(ws, n) = randw(n, {23, 16}, 1);
    erase_w(ws, "model.layers.2.self_attn.compress_down.w12.bias");
    write_f32(f, ws);
    check_throws_with<ShapeError>([&] { (void)load_paper_checkpoint<float>(f, 3); }, n);
  }
  SUBCASE("wrong bias length -> ShapeError") {
    std::vector<W> ws = read_all(data_path("paper_swiglu.safetensors"));
    const std::string n = "model.layers.0.self_attn.compress_up.bias";
    *find_w(ws, n) = randw(n, {15}, 1);
    write_f32(f, ws);
    check_throws_with<ShapeError>([&] { (void)load_paper_checkpoint<float>(f, 3); }, n);
  }
  SUBCASE("1-D weight -> ShapeError") {
    std::vector<W> ws = linear_ckpt(16, 4, 4);
    find_w(ws, "model.layers.0.self_attn.compress_down.weight")->shape = {64};
    write_f32(f, ws);
    CHECK_THROWS_AS((void)load_paper_checkpoint<float>(f, 2), ShapeError);
  }
  SUBCASE("a layer beyond n_layers -> ShapeError; n_layers 0 -> ConfigError") {
    check_throws_with<ShapeError>([&] { (void)load_paper_checkpoint<float>(data_path("paper_swiglu.safetensors"), 2); },
                                  "layer 2");
    CHECK_THROWS_AS((void)load_paper_checkpoint<float>(data_path("paper_swiglu.safetensors"), 0), ConfigError);
  }
  SUBCASE("linear and SwiGLU layers mixed -> FormatError") {
    std::vector<W> ws = read_all(data_path("paper_swiglu.safetensors"));
    for (const char* s : {"w12.weight", "w12.bias", "w3.weight", "w3.bias"})
      erase_w(ws, std::string("model.layers.2.self_attn.compress_down.") + s);
    ws.push_back(randw("model.layers.2.self_attn.compress_down.weight", {4, 16}, 1));
    write_f32(f, ws);
    check_throws_with<FormatError>([&] { (void)load_paper_checkpoint<float>(f, 3); }, "linear");
  }
}

TEST_CASE("paper checkpoint: non-finite weights -> NonFiniteError") {
  TempDir tmp;
  const std::string f = tmp.file("nan.safetensors");
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<W> ws = read_all(data_path("paper_swiglu.safetensors"));
    find_w(ws, "model.layers.2.self_attn.compress_down.w3.weight")->v[5] = bad;
    write_f32(f, ws);
    check_throws_with<NonFiniteError>([&] { (void)load_paper_checkpoint<double>(f, 3); },
                                      "model.layers.2.self_attn.compress_down.w3.weight");
  }
  // A finite F64 weight that overflows float is Inf once read as float.
  const std::vector<double> big = {1e300, 0, 0, 0};
  std::vector<std::byte> b(32);
  for (std::size_t i = 0; i < 4; ++i) {
    const auto u = std::bit_cast<std::uint64_t>(big[i]);
    for (int j = 0; j < 8; ++j) b[i * 8 + j] = static_cast<std::byte>((u >> (8 * j)) & 0xFF);
  }
  const std::vector<float> up = {1, 2, 3, 4};
  const auto ub = f32_bytes(up);
  write_safetensors(f, {{"model.layers.0.self_attn.compress_down.weight", StDType::F64, {1, 4}, b},
                        {"model.layers.0.self_attn.compress_up.weight", StDType::F32, {4, 1}, ub}});
  CHECK_THROWS_AS((void)load_paper_checkpoint<float>(f, 1), NonFiniteError);
  CHECK(load_paper_checkpoint<double>(f, 1).layers[0].down.w[0] == 1e300);
}

TEST_CASE("paper checkpoint: incomplete or unrecognised tensors -> FormatError / ConfigError") {
  TempDir tmp;
  const std::string f = tmp.file("ckpt.safetensors");
  const std::string p2 = "model.layers.2.self_attn.";

  SUBCASE("down weight without up weight") {
    std::vector<W> ws = read_all(data_path("paper_swiglu.safetensors"));
    erase_w(ws, p2 + "compress_up.weight");
    erase_w(ws, p2 + "compress_up.bias");
    write_f32(f, ws);
    check_throws_with<FormatError>([&] { (void)load_paper_checkpoint<float>(f, 3); }, "compress_up.weight");
  }
  SUBCASE("up weight without down weight") {
    std::vector<W> ws = linear_ckpt(16, 4, 4);
    erase_w(ws, "model.layers.1.self_attn.compress_down.weight");
    write_f32(f, ws);
    check_throws_with<FormatError>([&] { (void)load_paper_checkpoint<float>(f, 2); }, "layer 1");
  }
  SUBCASE("w12 without w3") {
    std::vector<W> ws = read_all(data_path("paper_swiglu.safetensors"));
    erase_w(ws, p2 + "compress_down.w3.weight");
    erase_w(ws, p2 + "compress_down.w3.bias");
    write_f32(f, ws);
    check_throws_with<FormatError>([&] { (void)load_paper_checkpoint<float>(f, 3); }, "w3");
  }
  SUBCASE("bias without weight") {
    std::vector<W> ws = linear_ckpt(16, 4, 4);
    ws.push_back(randw("model.layers.0.self_attn.compress_down.w3.bias", {4}, 1));
    write_f32(f, ws);
    CHECK_THROWS_AS((void)load_paper_checkpoint<float>(f, 2), FormatError);
  }
  SUBCASE("unknown compressor parameter") {
    std::vector<W> ws = linear_ckpt(16, 4, 4);
    ws.push_back(randw("model.layers.0.self_attn.compress_down.w4.weight", {4, 4}, 1));
    write_f32(f, ws);
    check_throws_with<FormatError>([&] { (void)load_paper_checkpoint<float>(f, 2); }, "w4");
  }
  SUBCASE("no compressor tensors at all") {
    write_f32(f, {randw("model.embed_tokens.weight", {4, 4}, 1)});
    CHECK_THROWS_AS((void)load_paper_checkpoint<float>(f, 2), FormatError);
  }
  SUBCASE("GELU MLP compressor (nn.Sequential) -> ConfigError") {
    write_f32(f, {randw("model.layers.0.self_attn.compress_down.0.weight", {8, 16}, 1),
                  randw("model.layers.0.self_attn.compress_down.2.weight", {4, 8}, 2),
                  randw("model.layers.0.self_attn.compress_up.weight", {16, 4}, 3)});
    check_throws_with<ConfigError>([&] { (void)load_paper_checkpoint<float>(f, 1); }, "GELU");
  }
  SUBCASE("non-linear compress_up -> ConfigError") {
    write_f32(f, {randw("model.layers.0.self_attn.compress_down.weight", {4, 16}, 1),
                  randw("model.layers.0.self_attn.compress_up.w12.weight", {8, 4}, 2),
                  randw("model.layers.0.self_attn.compress_up.w3.weight", {16, 4}, 3)});
    CHECK_THROWS_AS((void)load_paper_checkpoint<float>(f, 1), ConfigError);
  }
  SUBCASE("two tensors for the same parameter of a layer") {
    std::vector<W> ws = linear_ckpt(16, 4, 4);
    ws.push_back(randw("base.model.layers.0.self_attn.compress_down.weight", {4, 16}, 1));
    write_f32(f, ws);
    CHECK_THROWS_AS((void)load_paper_checkpoint<float>(f, 2), FormatError);
  }
  SUBCASE("integer dtype -> DTypeError") {
    const std::vector<std::byte> ib(4 * 16 * 4);
    const std::vector<float> up(64, 0.5f);
    const auto ub = f32_bytes(up);
    write_safetensors(f, {{"model.layers.0.self_attn.compress_down.weight", StDType::I32, {4, 16}, ib},
                          {"model.layers.0.self_attn.compress_up.weight", StDType::F32, {16, 4}, ub}});
    CHECK_THROWS_AS((void)load_paper_checkpoint<float>(f, 1), DTypeError);
  }
}

TEST_CASE("paper checkpoint: shared compressor (no layer index) is broadcast to every layer") {
  TempDir tmp;
  const std::string f = tmp.file("shared.safetensors");
  write_f32(f, {randw("compress_down.weight", {4, 16}, 1), randw("compress_up.weight", {16, 4}, 2)});
  const Compressor<float> c = load_paper_checkpoint<float>(f, 3, 16);
  REQUIRE(c.layers.size() == 3);
  for (const auto& l : c.layers) {
    CHECK(l.present());
    CHECK(l.down.w == c.layers[0].down.w);
  }
  write_f32(f, {randw("compress_down.weight", {4, 16}, 1), randw("compress_up.weight", {16, 4}, 2),
                randw("model.layers.1.self_attn.compress_down.weight", {4, 16}, 1),
                randw("model.layers.1.self_attn.compress_up.weight", {16, 4}, 2)});
  CHECK_THROWS_AS((void)load_paper_checkpoint<float>(f, 3), FormatError);
}

TEST_CASE("paper checkpoint: BF16 and F64 tensors are widened exactly") {
  TempDir tmp;
  const std::string f = tmp.file("bf16.safetensors");
  // bf16 = the upper 16 bits of a float; these values are exact in bf16.
  std::vector<float> down(4 * 8);
  std::vector<std::byte> db;
  for (std::size_t i = 0; i < down.size(); ++i) {
    down[i] = static_cast<float>(static_cast<int>(i) - 16) * 0.125f;
    const std::uint16_t h = static_cast<std::uint16_t>(std::bit_cast<std::uint32_t>(down[i]) >> 16);
    db.push_back(static_cast<std::byte>(h & 0xFF));
    db.push_back(static_cast<std::byte>(h >> 8));
  }
  std::vector<double> up(8 * 4);
  std::vector<std::byte> ub;
  for (std::size_t i = 0; i < up.size(); ++i) {
    up[i] = 0.1 * static_cast<double>(i) - 1.0;
    const auto u = std::bit_cast<std::uint64_t>(up[i]);
    for (int j = 0; j < 8; ++j) ub.push_back(static_cast<std::byte>((u >> (8 * j)) & 0xFF));
  }
  write_safetensors(f, {{"model.layers.0.self_attn.compress_down.weight", StDType::BF16, {4, 8}, db},
                        {"model.layers.0.self_attn.compress_up.weight", StDType::F64, {8, 4}, ub}});
  const Compressor<double> c = load_paper_checkpoint<double>(f, 1, 8);
  CHECK(c.layers[0].down.w == std::vector<double>(down.begin(), down.end()));
  CHECK(c.layers[0].up.w == up);
  const Compressor<float> cf = load_paper_checkpoint<float>(f, 1, 8);
  CHECK(cf.layers[0].down.w == down);
  CHECK(cf.layers[0].up.w[3] == static_cast<float>(up[3]));
}

TEST_CASE("paper checkpoint: config.json beside the file") {
  TempDir tmp;
  const std::string f = tmp.file("model.safetensors");
  std::filesystem::copy_file(data_path("paper_swiglu.safetensors"), f);
  const std::string cfg = tmp.file("config.json");
  auto load = [&] { return load_paper_checkpoint<double>(f, 3, 16); };

  SUBCASE("consistent config loads") {
    write_text(cfg, R"({"compressor_down_type": "mlp_swiglu", "compressor_up_type": "linear",
                        "kv_compressed_size": 4, "compressor_intermediate_size": 12, "split_kv": false,
                        "num_hidden_layers": 3, "other_model_field": [1, 2, 3]})");
    check_against_numpy(load(), "paper_swiglu_expected.safetensors", {0, 2});
  }
  SUBCASE("auto type and null values infer from the tensors") {
    write_text(cfg, R"({"compressor_down_type": "auto", "compressor_up_type": null, "kv_compressed_size": null})");
    CHECK(load().kind == CodecKind::swiglu);
  }
  SUBCASE("latent size contradicts the tensors -> ShapeError") {
    write_text(cfg, R"({"kv_compressed_size": 8})");
    check_throws_with<ShapeError>(load, "kv_compressed_size");
  }
  SUBCASE("hidden size contradicts the tensors -> ShapeError") {
    write_text(cfg, R"({"compressor_down_type": "swiglu", "compressor_intermediate_size": 10})");
    check_throws_with<ShapeError>(load, "compressor_intermediate_size");
  }
  SUBCASE("kind contradicts the tensors -> FormatError") {
    write_text(cfg, R"({"compressor_down_type": "linear"})");
    check_throws_with<FormatError>(load, "compressor_down_type");
  }
  SUBCASE("biases present although compressor_linear_bias is false -> FormatError") {
    write_text(cfg, R"({"compressor_linear_bias": false})");
    check_throws_with<FormatError>(load, "compressor_linear_bias");
  }
  SUBCASE("unsupported types -> ConfigError") {
    for (const char* text : {R"({"compressor_down_type": "mlp_gelu"})", R"({"compressor_up_type": "mlp_swiglu"})",
                             R"({"compressor_down_type": "conv"})"}) {
      CAPTURE(text);
      write_text(cfg, text);
      CHECK_THROWS_AS(load(), ConfigError);
    }
  }
  SUBCASE("malformed config -> FormatError") {
    for (const char* text : {"{not json", R"({"kv_compressed_size": "4"})", R"({"kv_compressed_size": 0})",
                             R"({"split_kv": "no"})", R"({"compressor_down_type": 3})", "[1]"}) {
      CAPTURE(text);
      write_text(cfg, text);
      CHECK_THROWS_AS(load(), FormatError);
    }
  }
}

// ---- our format ----------------------------------------------------------------------------------

namespace {

template <class A, class B>
void check_same_bits(const Compressor<A>& a, const Compressor<B>& b) {
  CHECK(a.kind == b.kind);
  CHECK(a.kv_dim == b.kv_dim);
  CHECK(a.latent_dim == b.latent_dim);
  CHECK(a.hidden == b.hidden);
  REQUIRE(a.layers.size() == b.layers.size());
  auto same = [](const OwnedLinear<A>& x, const OwnedLinear<B>& y) {
    CHECK(x.in == y.in);
    CHECK(x.out == y.out);
    REQUIRE(x.w.size() == y.w.size());
    REQUIRE(x.b.size() == y.b.size());
    for (std::size_t i = 0; i < x.w.size(); ++i) REQUIRE(static_cast<B>(x.w[i]) == y.w[i]);
    for (std::size_t i = 0; i < x.b.size(); ++i) REQUIRE(static_cast<B>(x.b[i]) == y.b[i]);
    if constexpr (std::is_same_v<A, B>) {
      if (!x.w.empty()) CHECK(std::memcmp(x.w.data(), y.w.data(), x.w.size() * sizeof(A)) == 0);
      if (!x.b.empty()) CHECK(std::memcmp(x.b.data(), y.b.data(), x.b.size() * sizeof(A)) == 0);
    }
  };
  for (std::size_t l = 0; l < a.layers.size(); ++l) {
    CAPTURE(l);
    same(a.layers[l].down, b.layers[l].down);
    same(a.layers[l].w3, b.layers[l].w3);
    same(a.layers[l].up, b.layers[l].up);
  }
}

// Rewrites a file with the same tensors and new metadata.
void rewrite_meta(const std::string& src, const std::string& dst, const std::map<std::string, std::string>& meta) {
  const SafetensorsFile f = SafetensorsFile::open(src);
  std::vector<TensorToWrite> t;
  for (const std::string& n : f.names()) t.push_back({n, f.info(n).dtype, f.info(n).shape, f.raw(n)});
  write_safetensors(dst, t, meta);
}

}  // namespace

TEST_CASE("save_compressor / load_compressor round trip is bit-exact") {
  TempDir tmp;
  const std::string f = tmp.file("ours.safetensors");
  for (const char* src : {"paper_swiglu.safetensors", "paper_linear.safetensors"}) {
    CAPTURE(src);
    const int L = std::string(src) == "paper_swiglu.safetensors" ? 3 : 2;
    const Compressor<float> c = load_paper_checkpoint<float>(data_path(src), L);
    save_compressor(f, c);
    const SafetensorsFile file = SafetensorsFile::open(f);
    CHECK(file.metadata().at("deltakv.format") == "1");
    CHECK(file.metadata().at("n_layers") == std::to_string(L));
    for (const std::string& n : file.names()) CHECK(file.info(n).dtype == StDType::F32);
    check_same_bits(c, load_compressor<float>(f));
    check_same_bits(c, load_compressor<double>(f));  // float -> double is exact
    // The saved file is also a valid paper checkpoint.
    check_same_bits(c, load_paper_checkpoint<float>(f, L));
  }
  // A compressor without any codec (all layers exact) survives too: the metadata carries it.
  Compressor<float> empty;
  empty.kind = CodecKind::swiglu;
  empty.kv_dim = 16;
  empty.latent_dim = 4;
  empty.hidden = 12;
  empty.layers.resize(2);
  save_compressor(f, empty);
  check_same_bits(empty, load_compressor<float>(f));
  // Identity (linear, d_c = kv_dim) from the library.
  const auto id = Compressor<float>::identity(2, 8);
  save_compressor(f, id);
  check_same_bits(id, load_compressor<float>(f));
}

TEST_CASE("load_compressor refuses files without consistent metadata") {
  TempDir tmp;
  const std::string ours = tmp.file("ours.safetensors"), bad = tmp.file("bad.safetensors");
  save_compressor(ours, load_paper_checkpoint<float>(data_path("paper_swiglu.safetensors"), 3));
  const std::map<std::string, std::string> good = {{"deltakv.format", "1"}, {"kind", "swiglu"}, {"kv_dim", "16"},
                                                   {"latent_dim", "4"},     {"hidden", "12"},    {"n_layers", "3"}};
  rewrite_meta(ours, bad, good);
  CHECK(load_compressor<float>(bad).hidden == 12);

  check_throws_with<FormatError>([&] { (void)load_compressor<float>(data_path("paper_swiglu.safetensors")); },
                                 "deltakv.format");
  auto with = [&](const std::string& key, const char* value) {
    auto m = good;
    if (value) m[key] = value;
    else m.erase(key);
    return m;
  };
  const std::vector<std::map<std::string, std::string>> cases = {
      with("deltakv.format", "2"), with("kind", nullptr),    with("kind", "mlp_gelu"), with("kind", "linear"),
      with("kv_dim", "32"),        with("kv_dim", "16x"),    with("latent_dim", "5"),  with("latent_dim", nullptr),
      with("hidden", "11"),        with("hidden", "0"),      with("n_layers", "2"),    with("n_layers", "-3"),
      with("n_layers", ""),
  };
  for (const auto& m : cases) {
    std::string desc;
    for (const auto& [k, v] : m) desc += k + "=" + v + " ";
    CAPTURE(desc);
    rewrite_meta(ours, bad, m);
    CHECK_THROWS_AS((void)load_compressor<float>(bad), FormatError);
  }
}

TEST_CASE("save_compressor refuses inconsistent or non-finite compressors") {
  TempDir tmp;
  const std::string f = tmp.file("x.safetensors");
  Compressor<double> c = load_paper_checkpoint<double>(data_path("paper_swiglu.safetensors"), 3);
  SUBCASE("NaN") {
    c.layers[0].up.w[0] = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_AS(save_compressor(f, c), NonFiniteError);
  }
  SUBCASE("does not fit F32") {
    c.layers[0].up.b[0] = 1e300;
    CHECK_THROWS_AS(save_compressor(f, c), NonFiniteError);
  }
  SUBCASE("layer sizes disagree with the header") {
    c.latent_dim = 5;
    CHECK_THROWS_AS(save_compressor(f, c), ShapeError);
  }
  SUBCASE("half a codec") {
    c.layers[1].up = c.layers[0].up;
    CHECK_THROWS_AS(save_compressor(f, c), ShapeError);
  }
  SUBCASE("wrong bias length") {
    c.layers[2].w3.b.pop_back();
    CHECK_THROWS_AS(save_compressor(f, c), ShapeError);
  }
  CHECK_FALSE(std::filesystem::exists(f));  // nothing written on failure
}
