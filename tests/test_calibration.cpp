// Tests for deltakv/calibration/pca.hpp: the PCA codec recovers a planted residual subspace, the
// reference rule reproduces hand-computed residuals, and a calibrated codec beats a random one of
// the same size inside a CompressedCache.
#include <doctest/doctest.h>

#include <Eigen/Dense>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <vector>

#include "deltakv/cache.hpp"
#include "deltakv/calibration/pca.hpp"
#include "deltakv/compressor.hpp"
#include "deltakv/cpu/device.hpp"

using namespace deltakv;
using namespace deltakv::calibration;

namespace {

using Mat = Eigen::MatrixXd;

// A random [rows, cols] matrix with orthonormal columns.
Mat random_orthonormal(int rows, int cols, std::mt19937& rng) {
  std::normal_distribution<double> nd;
  Mat g(rows, cols);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) g(i, j) = nd(rng);
  Eigen::HouseholderQR<Mat> qr(g);
  return qr.householderQ() * Mat::Identity(rows, cols);
}

// r = B c + sigma * noise, row-major [n, D]; c_j ~ N(0, scale_j^2).
std::vector<double> planted(const Mat& B, const std::vector<double>& scale, double sigma, int n, std::mt19937& rng) {
  std::normal_distribution<double> nd;
  const int D = static_cast<int>(B.rows()), r = static_cast<int>(B.cols());
  std::vector<double> out(std::size_t(n) * D);
  Eigen::VectorXd c(r);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < r; ++j) c(j) = scale[j] * nd(rng);
    const Eigen::VectorXd v = B * c;
    for (int d = 0; d < D; ++d) out[std::size_t(i) * D + d] = v(d) + sigma * nd(rng);
  }
  return out;
}

template <class T>
Mat up_matrix(const LayerCodec<T>& c) {  // W_d as [kv_dim, d_c]
  Mat U(c.up.out, c.up.in);
  for (int i = 0; i < c.up.out; ++i)
    for (int j = 0; j < c.up.in; ++j) U(i, j) = c.up.w[std::size_t(i) * c.up.in + j];
  return U;
}

// Mean of ||W_d W_c r - r||^2 over the rows.
template <class T>
double codec_mse(const LayerCodec<T>& c, const std::vector<double>& r, int D) {
  const int dc = c.down.out;
  const std::size_t n = r.size() / D;
  double e = 0;
  std::vector<double> z(dc);
  for (std::size_t i = 0; i < n; ++i) {
    const double* x = r.data() + i * D;
    for (int a = 0; a < dc; ++a) {
      z[a] = 0;
      for (int d = 0; d < D; ++d) z[a] += c.down.w[std::size_t(a) * D + d] * x[d];
    }
    for (int d = 0; d < D; ++d) {
      double y = 0;
      for (int a = 0; a < dc; ++a) y += c.up.w[std::size_t(d) * dc + a] * z[a];
      e += (y - x[d]) * (y - x[d]);
    }
  }
  return e / double(n);
}

}  // namespace

TEST_CASE("fit_pca_codec recovers a planted low-rank residual subspace") {
  const int D = 32, rank = 6, n = 2000;
  const double sigma = 0.01;
  std::mt19937 rng(42);
  const Mat B = random_orthonormal(D, rank, rng);
  const std::vector<double> scale = {3.0, 2.5, 2.0, 1.5, 1.0, 0.7};
  const std::vector<double> r = planted(B, scale, sigma, n, rng);
  const std::vector<double> fresh = planted(B, scale, sigma, 500, rng);

  PcaReport rep6;
  const LayerCodec<double> c6 = fit_pca_codec<double>(matrix<const double>(r.data(), n, D), rank, &rep6);
  REQUIRE(c6.down.in == D);
  REQUIRE(c6.down.out == rank);
  REQUIRE(c6.up.in == rank);
  REQUIRE(c6.up.out == D);
  CHECK(c6.down.b.empty());
  CHECK(c6.up.b.empty());
  CHECK(c6.w3.empty());
  CHECK(c6.present());
  // W_c = W_d^T, orthonormal columns.
  for (int i = 0; i < rank; ++i)
    for (int d = 0; d < D; ++d) REQUIRE(c6.down.w[std::size_t(i) * D + d] == c6.up.w[std::size_t(d) * rank + i]);
  const Mat U = up_matrix(c6);
  CHECK((U.transpose() * U - Mat::Identity(rank, rank)).norm() < 1e-10);

  // Small principal angles between span(U) and span(B).
  const double off = ((Mat::Identity(D, D) - U * U.transpose()) * B).norm();
  CAPTURE(off);
  CHECK(off < 0.05);

  // Fresh samples reconstruct at the noise level: the noise outside the subspace remains.
  const double noise_floor = sigma * sigma * (D - rank);
  const double mse6 = codec_mse(c6, fresh, D);
  CAPTURE(mse6);
  CHECK(mse6 < 1.5 * noise_floor);
  CHECK(mse6 > 0.5 * noise_floor);

  CHECK(rep6.rows == n);
  CHECK(rep6.explained > 0.999);
  CHECK(rep6.explained <= 1.0);
  REQUIRE(rep6.eigenvalues.size() == std::size_t(D));
  for (int i = 1; i < D; ++i) CHECK(rep6.eigenvalues[i] <= rep6.eigenvalues[i - 1]);
  double energy = 0;
  for (double v : r) energy += v * v;
  CHECK(rep6.mean_energy == doctest::Approx(energy / n).epsilon(1e-12));

  // Fewer dimensions capture less; the error grows accordingly.
  PcaReport rep3;
  const LayerCodec<double> c3 = fit_pca_codec<double>(matrix<const double>(r.data(), n, D), 3, &rep3);
  CHECK(rep3.explained < rep6.explained);
  CHECK(rep3.explained > 0.5);
  CHECK(codec_mse(c3, fresh, D) > 10 * mse6);
  // The rank-3 codec is the leading part of the rank-6 one.
  const Mat U3 = up_matrix(c3);
  CHECK((U3 - U.leftCols(3)).norm() < 1e-8);

  // float input: the same subspace.
  const std::vector<float> rf(r.begin(), r.end());
  const LayerCodec<float> cf = fit_pca_codec<float>(matrix<const float>(rf.data(), n, D), rank);
  const Mat Uf = up_matrix(cf);
  CHECK(((Mat::Identity(D, D) - Uf * Uf.transpose()) * B).norm() < 0.05);
}

TEST_CASE("fit_pca_codec: degenerate input and errors") {
  const int D = 4;
  std::vector<double> r(std::size_t(10) * D, 0.0);
  PcaReport rep;
  const auto c = fit_pca_codec<double>(matrix<const double>(r.data(), 10, D), 2, &rep);
  CHECK(rep.explained == 1.0);  // nothing to capture
  CHECK(rep.mean_energy == 0.0);
  CHECK(c.present());

  CHECK_THROWS_AS(fit_pca_codec<double>(matrix<const double>(r.data(), 0, D), 2), ShapeError);
  CHECK_THROWS_AS(fit_pca_codec<double>(matrix<const double>(r.data(), 10, D), 5), ShapeError);
  CHECK_THROWS_AS(fit_pca_codec<double>(matrix<const double>(r.data(), 10, D), 0), ShapeError);
  CHECK_THROWS_AS(fit_pca_codec<double>(MatrixView<const double>{r.data(), 10, D, D - 1}, 2), ShapeError);
  r[7] = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_AS(fit_pca_codec<double>(matrix<const double>(r.data(), 10, D), 2), NonFiniteError);
  r[7] = -std::numeric_limits<double>::infinity();
  CHECK_THROWS_AS(fit_pca_codec<double>(matrix<const double>(r.data(), 10, D), 2), NonFiniteError);
}

TEST_CASE("residuals_to_references matches a hand-computed case") {
  // sinks 1, stride 3: sink 0, references A = x1, B = x4, C = x7; latents 2, 3, 5, 6, 8, 9.
  const std::vector<double> x = {100, 100,  // 0 sink
                                 0,   0,    // 1 ref A
                                 1,   0,    // 2: only A visible
                                 0,   2,    // 3: only A
                                 10,  0,    // 4 ref B
                                 9,   1,    // 5: A, B
                                 2,   2,    // 6: A, B
                                 0,   10,   // 7 ref C
                                 1,   9,    // 8
                                 9,   2};   // 9
  const auto v = matrix<const double>(x.data(), 10, 2);

  SUBCASE("l2, k = 2") {
    // 8: nearest C (d^2 2), A (82) -> mean (0, 5); 9: B (5), A (85) -> mean (5, 0).
    const std::vector<double> want = {1, 0, 0, 2, 4, 1, -3, 2, 1, 4, 4, 2};
    CHECK(residuals_to_references<double>(v, 1, 3, 2, Metric::l2) == want);
  }
  SUBCASE("dot, k = 2") {
    // 8: C (90), B (10) -> (5, 5); 9: B (90), C (20) -> (5, 5).
    const std::vector<double> want = {1, 0, 0, 2, 4, 1, -3, 2, -4, 4, 4, -3};
    CHECK(residuals_to_references<double>(v, 1, 3, 2, Metric::dot) == want);
  }
  SUBCASE("cosine, k = 1 (a zero reference has cosine 0)") {
    const std::vector<double> want = {1, 0, 0, 2, -1, 1, -8, 2, 1, -1, -1, 2};
    CHECK(residuals_to_references<double>(v, 1, 3, 1, Metric::cosine) == want);
  }
  SUBCASE("ties keep the earlier reference") {
    // sinks 0, stride 2: refs x0 = (0,0), x2 = (2,0); x3 = (1,0) is equidistant.
    const std::vector<double> t = {0, 0, 5, 5, 2, 0, 1, 0};
    CHECK(residuals_to_references<double>(matrix<const double>(t.data(), 4, 2), 0, 2, 1, Metric::l2) ==
          std::vector<double>{5, 5, 1, 0});
  }
  SUBCASE("one row per non-sink non-reference token") {
    std::mt19937 rng(3);
    std::normal_distribution<float> nd;
    std::vector<float> big(100 * 6);
    for (auto& f : big) f = nd(rng);
    // sinks 4, stride 10: references 4, 14, ..., 94 -> 100 - 4 - 10 = 86 rows.
    CHECK(residuals_to_references<float>(matrix<const float>(big.data(), 100, 6), 4, 10, 4, Metric::l2).size() == 86u * 6);
    CHECK(residuals_to_references<float>(matrix<const float>(big.data(), 4, 6), 4, 10, 4, Metric::l2).empty());
    CHECK(residuals_to_references<float>(matrix<const float>(big.data(), 5, 6), 4, 10, 4, Metric::l2).empty());
    CHECK(residuals_to_references<float>(matrix<const float>(big.data(), 6, 6), 4, 10, 4, Metric::l2).size() == 6u);
  }
  SUBCASE("errors") {
    CHECK_THROWS_AS(residuals_to_references<double>(v, 1, 0, 2, Metric::l2), ConfigError);
    CHECK_THROWS_AS(residuals_to_references<double>(v, -1, 3, 2, Metric::l2), ConfigError);
    CHECK_THROWS_AS(residuals_to_references<double>(v, 1, 3, 0, Metric::l2), ConfigError);
    std::vector<double> bad = x;
    bad[13] = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_AS(residuals_to_references<double>(matrix<const double>(bad.data(), 10, 2), 1, 3, 2, Metric::l2),
                    NonFiniteError);
  }
}

namespace {

// Clustered KV of one layer: x_t = centre[random] + A u_t + noise.
struct KvModel {
  std::vector<Eigen::VectorXd> centres;
  Mat A;
  double noise = 0.02;
  KvModel(int D, int n_centres, int n_dirs, std::mt19937& rng) {
    std::normal_distribution<double> nd;
    for (int c = 0; c < n_centres; ++c) {
      Eigen::VectorXd v(D);
      for (int d = 0; d < D; ++d) v(d) = 2.0 * nd(rng);
      centres.push_back(v);
    }
    A.resize(D, n_dirs);
    for (int d = 0; d < D; ++d)
      for (int j = 0; j < n_dirs; ++j) A(d, j) = 0.5 * nd(rng);
  }
  std::vector<double> sample(int n, std::mt19937& rng) const {
    std::normal_distribution<double> nd;
    std::uniform_int_distribution<int> pick(0, static_cast<int>(centres.size()) - 1);
    const int D = static_cast<int>(A.rows());
    std::vector<double> out(std::size_t(n) * D);
    Eigen::VectorXd u(A.cols());
    for (int t = 0; t < n; ++t) {
      for (int j = 0; j < u.size(); ++j) u(j) = nd(rng);
      const Eigen::VectorXd v = centres[pick(rng)] + A * u;
      for (int d = 0; d < D; ++d) out[std::size_t(t) * D + d] = v(d) + noise * nd(rng);
    }
    return out;
  }
};

// Relative L2 error of the cache's reconstruction of `seqs[l]` (appended to layer l) over the
// latent positions, with the given linear codec.
double cache_error(const Config& cfg, int stride, const Compressor<double>& comp,
                   const std::vector<std::vector<double>>& seqs) {
  using C = CompressedCache<double, cpu::CpuDevice<double>, FixedStride, LinearEncoder<double>, LinearDecoder<double>,
                            DensePolicy>;
  const auto encs = comp.linear_encoders();
  const auto decs = comp.decoders();
  const auto lay = C::layout(cfg, FixedStride(stride), DensePolicy{}, 0);
  std::vector<std::byte> storage(lay.storage_bytes), work(lay.workspace_bytes);
  cpu::CpuDevice<double> dev;
  C cache(dev, cfg, FixedStride(stride), std::span<const LinearEncoder<double>>(encs),
          std::span<const LinearDecoder<double>>(decs), DensePolicy{}, storage, work);
  const int D = cfg.model.kv_dim();
  double err = 0, norm = 0;
  std::int64_t latents = 0;
  for (int l = 0; l < cfg.model.n_layers; ++l) {
    const int n = static_cast<int>(seqs[l].size() / D);
    std::vector<std::int64_t> pos(n);
    for (int i = 0; i < n; ++i) pos[i] = i;
    const std::int32_t sid[] = {0};
    const std::int32_t ip[] = {0, n};
    cache.append(l, RaggedBatch<const double>{matrix<const double>(seqs[l].data(), n, D), sid, ip, pos});
    std::vector<double> out(std::size_t(n) * D);
    cache.reconstruct(l, 0, pos, matrix(out.data(), n, D), false);
    for (int p = 0; p < n; ++p) {
      if (p < cfg.comp.sinks || cache.position_class(p) != 2) continue;
      double e = 0, x2 = 0;
      for (int d = 0; d < D; ++d) {
        const double x = seqs[l][std::size_t(p) * D + d];
        e += (out[std::size_t(p) * D + d] - x) * (out[std::size_t(p) * D + d] - x);
        x2 += x * x;
      }
      if (e == 0) continue;  // still in the exact recent ring
      err += e;
      norm += x2;
      ++latents;
    }
  }
  REQUIRE(latents > 100);
  return std::sqrt(err / norm);
}

}  // namespace

TEST_CASE("calibrate_pca on clustered KV beats a random orthonormal codec in the cache") {
  Config cfg;
  cfg.model = {2, 2, 2, 8};  // kv_dim 32
  cfg.comp.sinks = 4;
  cfg.comp.recent = 16;
  cfg.comp.k_neighbors = 4;
  cfg.comp.latent_dim = 0;  // kv_dim / 4 = 8
  cfg.comp.metric = Metric::l2;
  cfg.cap = {1, 400, 1};
  const int D = cfg.model.kv_dim(), dc = cfg.latent_dim(), stride = 10;
  REQUIRE(dc == 8);

  std::mt19937 rng(2026);
  const KvModel m0(D, 4, 3, rng), m1(D, 3, 4, rng);
  const std::vector<double> cal0 = m0.sample(600, rng), cal1 = m1.sample(600, rng);
  const std::vector<MatrixView<const double>> views = {matrix<const double>(cal0.data(), 600, D),
                                                       matrix<const double>(cal1.data(), 600, D)};
  std::vector<PcaReport> reps;
  const Compressor<double> pca =
      calibrate_pca<double>(views, dc, cfg.comp.sinks, stride, cfg.comp.k_neighbors, cfg.comp.metric, {}, &reps);
  CHECK(pca.kind == CodecKind::linear);
  CHECK(pca.kv_dim == D);
  CHECK(pca.latent_dim == dc);
  CHECK(pca.hidden == 0);
  REQUIRE(pca.layers.size() == 2);
  REQUIRE(reps.size() == 2);
  CHECK(reps[0].explained > 0.95);
  CHECK(reps[1].explained > 0.95);
  CHECK(reps[0].rows == 600 - 4 - 60);

  // Same as doing the two steps by hand.
  const std::vector<double> r0 = residuals_to_references<double>(views[0], cfg.comp.sinks, stride, 4, Metric::l2);
  const LayerCodec<double> by_hand = fit_pca_codec<double>(matrix<const double>(r0.data(), std::int64_t(r0.size()) / D, D), dc);
  CHECK(by_hand.up.w == pca.layers[0].up.w);

  Compressor<double> rnd = pca;
  for (auto& l : rnd.layers) {
    const Mat Q = random_orthonormal(D, dc, rng);
    for (int i = 0; i < dc; ++i)
      for (int d = 0; d < D; ++d) {
        l.down.w[std::size_t(i) * D + d] = Q(d, i);
        l.up.w[std::size_t(d) * dc + i] = Q(d, i);
      }
  }

  const std::vector<std::vector<double>> eval = {m0.sample(300, rng), m1.sample(300, rng)};
  const double e_pca = cache_error(cfg, stride, pca, eval);
  const double e_rnd = cache_error(cfg, stride, rnd, eval);
  MESSAGE("rel L2 error on latent tokens: PCA " << e_pca << ", random orthonormal " << e_rnd);
  CHECK(e_pca * 3 < e_rnd);
  CHECK(e_pca < 0.05);
}

TEST_CASE("calibrate_pca: exact layers and errors") {
  const int D = 8;
  std::mt19937 rng(5);
  std::normal_distribution<double> nd;
  std::vector<double> a(std::size_t(40) * D), b(std::size_t(40) * D);
  for (auto& v : a) v = nd(rng);
  for (auto& v : b) v = nd(rng);
  const std::vector<MatrixView<const double>> views = {matrix<const double>(a.data(), 40, D), MatrixView<const double>{},
                                                       matrix<const double>(b.data(), 40, D)};
  const std::array<bool, 3> exact = {false, true, false};
  const Compressor<double> c = calibrate_pca<double>(views, 2, 2, 5, 2, Metric::dot, exact);
  REQUIRE(c.layers.size() == 3);
  CHECK(c.layers[0].present());
  CHECK_FALSE(c.layers[1].present());
  CHECK(c.layers[1].down.empty());
  CHECK(c.layers[2].present());
  CHECK(c.kv_dim == D);
  CHECK(c.latent_dim == 2);

  // Without the flag, the empty view of layer 1 is an error.
  CHECK_THROWS_AS(calibrate_pca<double>(views, 2, 2, 5, 2, Metric::dot), ShapeError);
  const std::array<bool, 2> short_flags = {false, true};
  CHECK_THROWS_AS(calibrate_pca<double>(views, 2, 2, 5, 2, Metric::dot, short_flags), ShapeError);
  const std::array<bool, 3> all_exact = {true, true, true};
  CHECK_THROWS_AS(calibrate_pca<double>(views, 2, 2, 5, 2, Metric::dot, all_exact), ShapeError);
  // kv_dim differs between layers.
  const std::vector<MatrixView<const double>> mixed = {matrix<const double>(a.data(), 40, D),
                                                       matrix<const double>(b.data(), 80, D / 2)};
  CHECK_THROWS_AS(calibrate_pca<double>(mixed, 2, 2, 5, 2, Metric::l2), ShapeError);
  // Too short to leave a latent token.
  const std::vector<MatrixView<const double>> tiny = {matrix<const double>(a.data(), 3, D)};
  CHECK_THROWS_AS(calibrate_pca<double>(tiny, 2, 2, 5, 2, Metric::l2), ShapeError);
  // latent_dim > kv_dim.
  CHECK_THROWS_AS(calibrate_pca<double>(std::span<const MatrixView<const double>>(views.data(), 1), 9, 2, 5, 2,
                                        Metric::l2),
                  ShapeError);
}

TEST_CASE("weighted PCA minimises the weighted error and stays exact at full rank") {
  const int D = 12, n = 600;
  std::mt19937 rng(5);
  std::normal_distribution<double> nd;
  std::vector<double> r(std::size_t(n) * D), w(D);
  for (int j = 0; j < D; ++j) w[j] = j < 6 ? 0.05 : 20.0;  // the second half matters far more
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < D; ++j) r[std::size_t(i) * D + j] = nd(rng) * (j < 6 ? 3.0 : 1.0);  // but has less energy
  const deltakv::MatrixView<const double> view{r.data(), n, D, D};
  auto werr = [&](const deltakv::LayerCodec<double>& c, int dc) {
    double e = 0;
    for (int i = 0; i < n; ++i) {
      std::vector<double> z(dc, 0.0);
      for (int a = 0; a < dc; ++a)
        for (int j = 0; j < D; ++j) z[a] += c.down.w[std::size_t(a) * D + j] * r[std::size_t(i) * D + j];
      for (int j = 0; j < D; ++j) {
        double y = 0;
        for (int a = 0; a < dc; ++a) y += c.up.w[std::size_t(j) * dc + a] * z[a];
        e += w[j] * (y - r[std::size_t(i) * D + j]) * (y - r[std::size_t(i) * D + j]);
      }
    }
    return e / n;
  };
  const auto plain = deltakv::calibration::fit_pca_codec<double>(view, 6);
  const auto weighted = deltakv::calibration::fit_pca_codec<double>(view, 6, nullptr, w);
  CHECK(werr(weighted, 6) < 0.2 * werr(plain, 6));  // plain PCA spends its 6 directions on the loud half
  CHECK(werr(deltakv::calibration::fit_pca_codec<double>(view, D, nullptr, w), D) < 1e-20 * n);
  std::vector<double> bad(w);
  bad[3] = 0.0;
  CHECK_THROWS_AS(deltakv::calibration::fit_pca_codec<double>(view, 6, nullptr, bad), deltakv::NonFiniteError);
  CHECK_THROWS_AS(deltakv::calibration::fit_pca_codec<double>(view, 6, nullptr, std::span<const double>(w).first(5)),
                  deltakv::ShapeError);
}
