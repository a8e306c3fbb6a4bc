#pragma once
// Closed-form linear codec from a sample of residuals (offline calibration, no training).
//
// With a linear f_c (W_c, b_c) the cache stores z = f_c(x) - f_c(ref) = W_c (x - ref): b_c cancels.
// With a linear f_d without bias, x̂ - x = W_d W_c r - r for the residual r = x - ref, so the
// rank-d_c codec of least mean squared error is the orthogonal projection onto the top d_c
// eigenvectors U of the (uncentered) second-moment matrix E[r r^T]: W_c = U^T, W_d = U.
//
// residuals_to_references() turns plain KV rows of one sequence into those residuals with the
// method's reference rule (FixedStride references, mean of the k nearest earlier ones), so a user
// can calibrate from KV dumped by any engine. calibrate_pca() does both for every layer.
// Everything here is offline: plain loops, double precision, no device.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <Eigen/Eigenvalues>

#include "deltakv/compressor.hpp"
#include "deltakv/config.hpp"
#include "deltakv/error.hpp"
#include "deltakv/tensor.hpp"

namespace deltakv::calibration {

struct PcaReport {
  double explained = 0;              // share of E||r||^2 the codec keeps (1 - relative MSE); 1 if r == 0
  double mean_energy = 0;            // E||r||^2 over the sample
  std::int64_t rows = 0;             // residuals the fit used
  std::vector<double> eigenvalues;   // all kv_dim eigenvalues of E[r r^T], descending
};

namespace detail_pca {

template <class T>
void check_rows(MatrixView<const T> x, const char* what) {
  if (x.rows < 0 || x.cols < 1 || x.ld < x.cols || (x.rows > 0 && x.data == nullptr))
    throw ShapeError(std::string(what) + ": need a [n, kv_dim] view with kv_dim >= 1 and row stride >= kv_dim, got [" +
                     std::to_string(x.rows) + ", " + std::to_string(x.cols) + "] with row stride " +
                     std::to_string(x.ld));
  for (std::int64_t i = 0; i < x.rows; ++i)
    for (std::int64_t j = 0; j < x.cols; ++j)
      if (!std::isfinite(static_cast<double>(x(i, j))))
        throw NonFiniteError(std::string(what) + ": row " + std::to_string(i) + " column " + std::to_string(j) +
                             " is NaN or Inf");
}

}  // namespace detail_pca

// residuals: [n, kv_dim] rows r = x - ref. Returns a linear codec (down = U^T [d_c, kv_dim],
// up = U [kv_dim, d_c], no biases). Eigenvector signs are fixed (largest-magnitude entry > 0) so
// the result is deterministic. `report` (optional) receives the captured energy share.
// weights (optional, kv_dim values > 0): minimise sum_j w_j (r_j - r̂_j)^2 instead of the plain
// squared error, e.g. weights from how much an error in each dimension moves attention outputs:
// PCA of r ⊙ sqrt(w), then W_c = U^T diag(sqrt w), W_d = diag(1/sqrt w) U.
template <class T>
LayerCodec<T> fit_pca_codec(MatrixView<const T> residuals, int latent_dim, PcaReport* report = nullptr,
                            std::span<const double> weights = {}) {
  detail_pca::check_rows(residuals, "fit_pca_codec residuals");
  const std::int64_t n = residuals.rows;
  const int D = static_cast<int>(residuals.cols);
  if (n < 1) throw ShapeError("fit_pca_codec: need at least one residual row, got 0");
  if (latent_dim < 1 || latent_dim > D)
    throw ShapeError("fit_pca_codec: latent_dim must be in [1, kv_dim = " + std::to_string(D) + "], got " +
                     std::to_string(latent_dim));

  if (!weights.empty() && static_cast<int>(weights.size()) != D)
    throw ShapeError("fit_pca_codec: " + std::to_string(weights.size()) + " weights for kv_dim " + std::to_string(D));
  std::vector<double> sw(static_cast<std::size_t>(D), 1.0);
  for (std::size_t j = 0; j < weights.size(); ++j) {
    if (!(weights[j] > 0) || !std::isfinite(weights[j]))
      throw NonFiniteError("fit_pca_codec: weight " + std::to_string(j) + " must be finite and > 0");
    sw[j] = std::sqrt(weights[j]);
  }
  // M = (1/n) sum_i r_i r_i^T, accumulated in double, a chunk of rows per GEMM.
  Eigen::MatrixXd M = Eigen::MatrixXd::Zero(D, D);
  constexpr std::int64_t kChunk = 1024;
  Eigen::MatrixXd X;
  for (std::int64_t r0 = 0; r0 < n; r0 += kChunk) {
    const std::int64_t m = std::min(kChunk, n - r0);
    X.resize(m, D);
    for (std::int64_t i = 0; i < m; ++i)
      for (int j = 0; j < D; ++j) X(i, j) = static_cast<double>(residuals(r0 + i, j)) * sw[std::size_t(j)];
    M.noalias() += X.transpose() * X;
  }
  M /= static_cast<double>(n);

  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(M);
  if (eig.info() != Eigen::Success) throw Error(ErrorCode::non_finite, "fit_pca_codec: eigen decomposition failed");
  const Eigen::VectorXd& ev = eig.eigenvalues();  // ascending
  const Eigen::MatrixXd& V = eig.eigenvectors();

  std::vector<double> desc(static_cast<std::size_t>(D));
  for (int i = 0; i < D; ++i) desc[static_cast<std::size_t>(i)] = std::max(0.0, ev(D - 1 - i));
  const double total = M.trace();
  double kept = 0;
  for (int i = 0; i < latent_dim; ++i) kept += desc[static_cast<std::size_t>(i)];

  LayerCodec<T> c;
  c.down = {std::vector<T>(std::size_t(latent_dim) * D), {}, D, latent_dim};
  c.up = {std::vector<T>(std::size_t(D) * latent_dim), {}, latent_dim, D};
  for (int i = 0; i < latent_dim; ++i) {
    Eigen::VectorXd u = V.col(D - 1 - i);
    Eigen::Index arg = 0;
    u.cwiseAbs().maxCoeff(&arg);
    if (u(arg) < 0) u = -u;
    for (int j = 0; j < D; ++j) {
      c.down.w[std::size_t(i) * D + j] = static_cast<T>(u(j) * sw[std::size_t(j)]);          // W_c = U^T diag(sqrt w)
      c.up.w[std::size_t(j) * latent_dim + i] = static_cast<T>(u(j) / sw[std::size_t(j)]);   // W_d = diag(1/sqrt w) U
    }
  }
  if (report) {
    report->explained = total > 0 ? std::min(1.0, kept / total) : 1.0;
    report->mean_energy = total;
    report->rows = n;
    report->eigenvalues = std::move(desc);
  }
  return c;
}

// x: [n, kv_dim], one sequence of one layer at positions 0..n-1. Positions < sinks are sinks;
// references are at sinks, sinks + stride, ... (FixedStride); every other position p gets
// ref = mean of its k best references at positions < p (fewer if fewer exist; l2: smallest
// ||x - r||, dot: largest x·r, cosine: largest x·r / (|x||r|); ties keep the earlier reference,
// as the CPU backend does). Returns r = x - ref for those positions, in position order,
// row-major [count, kv_dim].
template <class T>
std::vector<T> residuals_to_references(MatrixView<const T> x, int sinks, int stride, int k, Metric metric) {
  if (sinks < 0) throw ConfigError("residuals_to_references: sinks must be >= 0");
  if (stride < 1) throw ConfigError("residuals_to_references: stride must be >= 1");
  if (k < 1) throw ConfigError("residuals_to_references: k must be >= 1");
  detail_pca::check_rows(x, "residuals_to_references x");
  const std::int64_t n = x.rows;
  const int D = static_cast<int>(x.cols);
  auto is_ref = [&](std::int64_t p) { return p >= sinks && (p - sinks) % stride == 0; };
  auto dot = [&](std::int64_t a, std::int64_t b) {
    double s = 0;
    for (int d = 0; d < D; ++d) s += static_cast<double>(x(a, d)) * static_cast<double>(x(b, d));
    return s;
  };

  std::vector<T> out;
  std::vector<std::int64_t> refs;                    // reference positions seen so far, in order
  std::vector<std::pair<double, std::int64_t>> best;  // k best (score, position), best first
  std::vector<double> mean(static_cast<std::size_t>(D));
  for (std::int64_t p = sinks; p < n; ++p) {
    if (is_ref(p)) {
      refs.push_back(p);
      continue;
    }
    best.clear();
    for (std::int64_t q : refs) {
      double score = 0;
      if (metric == Metric::l2) {
        for (int d = 0; d < D; ++d) {
          const double diff = static_cast<double>(x(p, d)) - static_cast<double>(x(q, d));
          score -= diff * diff;
        }
      } else if (metric == Metric::dot) {
        score = dot(p, q);
      } else {
        score = dot(p, q) / std::max(1e-30, std::sqrt(dot(p, p)) * std::sqrt(dot(q, q)));
      }
      // Insert keeping the list sorted best first; an equal score goes after (earlier ref wins).
      auto it = best.begin();
      while (it != best.end() && it->first >= score) ++it;
      if (it - best.begin() < k) {
        best.insert(it, {score, q});
        if (static_cast<int>(best.size()) > k) best.pop_back();
      }
    }
    std::fill(mean.begin(), mean.end(), 0.0);
    for (const auto& b : best)
      for (int d = 0; d < D; ++d) mean[static_cast<std::size_t>(d)] += static_cast<double>(x(b.second, d));
    const double cnt = static_cast<double>(best.size());
    for (int d = 0; d < D; ++d) {
      const double ref = best.empty() ? 0.0 : mean[static_cast<std::size_t>(d)] / cnt;
      out.push_back(static_cast<T>(static_cast<double>(x(p, d)) - ref));
    }
  }
  return out;
}

// One [n, kv_dim] sequence per layer; fits every layer not marked exact (exact_layers: empty, or
// one flag per layer). Exact layers keep an empty codec (their view may be empty). To calibrate
// from several sequences per layer, concatenate residuals_to_references() of each and call
// fit_pca_codec(). `reports` (optional) gets one PcaReport per layer (default for exact ones).
template <class T>
Compressor<T> calibrate_pca(std::span<const MatrixView<const T>> per_layer_kv, int latent_dim, int sinks, int stride,
                            int k, Metric metric, std::span<const bool> exact_layers = {},
                            std::vector<PcaReport>* reports = nullptr,
                            const std::vector<std::vector<double>>* weights = nullptr) {
  const std::size_t L = per_layer_kv.size();
  if (weights && weights->size() != L)
    throw ShapeError("calibrate_pca: " + std::to_string(weights->size()) + " weight vectors for " + std::to_string(L) +
                     " layers");
  if (L == 0) throw ShapeError("calibrate_pca: no layers given");
  if (!exact_layers.empty() && exact_layers.size() != L)
    throw ShapeError("calibrate_pca: exact_layers has " + std::to_string(exact_layers.size()) + " flags for " +
                     std::to_string(L) + " layers");
  auto exact = [&](std::size_t l) { return !exact_layers.empty() && exact_layers[l]; };
  int D = 0;
  for (std::size_t l = 0; l < L; ++l) {
    if (exact(l)) continue;
    const int c = static_cast<int>(per_layer_kv[l].cols);
    if (D == 0) D = c;
    if (c != D)
      throw ShapeError("calibrate_pca: layer " + std::to_string(l) + " has kv_dim " + std::to_string(c) +
                       ", earlier layers have " + std::to_string(D));
  }
  if (D == 0) throw ShapeError("calibrate_pca: every layer is exact, nothing to calibrate");
  Compressor<T> comp;
  comp.kind = CodecKind::linear;
  comp.kv_dim = D;
  comp.latent_dim = latent_dim;
  comp.hidden = 0;
  comp.layers.resize(L);
  if (reports) reports->assign(L, PcaReport{});
  for (std::size_t l = 0; l < L; ++l) {
    if (exact(l)) continue;
    const std::vector<T> r = residuals_to_references(per_layer_kv[l], sinks, stride, k, metric);
    const std::int64_t rows = static_cast<std::int64_t>(r.size()) / D;
    if (rows < 1)
      throw ShapeError("calibrate_pca: layer " + std::to_string(l) + " has " + std::to_string(per_layer_kv[l].rows) +
                       " tokens, which leaves no non-sink non-reference token to fit on");
    comp.layers[l] = fit_pca_codec<T>(MatrixView<const T>{r.data(), rows, D, D}, latent_dim,
                                      reports ? &(*reports)[l] : nullptr,
                                      weights ? std::span<const double>((*weights)[l]) : std::span<const double>{});
  }
  return comp;
}

}  // namespace deltakv::calibration
