#pragma once
// Non-owning views. The library never owns the engine's tensors: it reads and writes through these.
#include <array>
#include <cstdint>
#include <span>
#include <string>

#include "deltakv/error.hpp"

namespace deltakv {

// Row-major matrix view with a row stride (elements). Rows are tokens, columns features.
template <class T>
struct MatrixView {
  T* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t ld = 0;  // elements between consecutive rows (>= cols)

  T* row(std::int64_t r) const { return data + r * ld; }
  T& operator()(std::int64_t r, std::int64_t c) const { return data[r * ld + c]; }
  operator MatrixView<const T>() const { return {data, rows, cols, ld}; }
};

template <class T>
MatrixView<T> matrix(T* p, std::int64_t rows, std::int64_t cols) { return {p, rows, cols, cols}; }

template <class T>
void check_matrix(const MatrixView<T>& v, std::int64_t rows, std::int64_t cols, const char* what) {
  if (v.rows != rows || v.cols != cols || v.ld < v.cols || (v.data == nullptr && rows * cols > 0))
    throw ShapeError(std::string(what) + ": expected [" + std::to_string(rows) + ", " +
                     std::to_string(cols) + "], got [" + std::to_string(v.rows) + ", " +
                     std::to_string(v.cols) + "] with row stride " + std::to_string(v.ld));
}

// A batch of sequences packed row-wise (FlashInfer's indptr layout): rows indptr[b]..indptr[b+1]
// belong to sequence seq_ids[b], at positions positions[indptr[b]..indptr[b+1]).
template <class T>
struct RaggedBatch {
  MatrixView<T> rows;
  std::span<const std::int32_t> seq_ids;    // [B]
  std::span<const std::int32_t> indptr;     // [B + 1], indptr[0] == 0, indptr[B] == rows.rows
  std::span<const std::int64_t> positions;  // [rows.rows]
};

}  // namespace deltakv
