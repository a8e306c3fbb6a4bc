#pragma once
// A view of one affine map's weights in device memory: y = x·W^T + b, W [out, in] row-major.
namespace deltakv {

template <class T>
struct LinearMap {
  const T* w = nullptr;  // [out, in]
  const T* b = nullptr;  // [out] or nullptr
  int in = 0;
  int out = 0;
};

}  // namespace deltakv
