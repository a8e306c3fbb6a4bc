// HIP-specific checks, linked into deltakv_hip_tests_<target> next to the cross-backend tests of
// tests/cuda (compiled by hipcc unchanged: there, CudaDevice is the same class as HipDevice).
// Without an AMD GPU (CI) the device cases skip with a message.
#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "deltakv/hip/device.hpp"

namespace {
namespace hip = deltakv::hip;
namespace vendor = deltakv::gpu::vendor;

static_assert(deltakv::Device<hip::HipDevice<float>, float>);
static_assert(deltakv::Device<hip::HipDevice<hip::bf16>, hip::bf16>);
static_assert(deltakv::Device<hip::HipDevice<hip::f16>, hip::f16>);
static_assert(hip::HipDevice<float>::kWarp == DELTAKV_HIP_WARP_SIZE);

bool have_gpu() { return vendor::device_count() > 0; }
}  // namespace

TEST_CASE("hip: the build's warp size matches the GPU; a device constructs and copies") {
  if (!have_gpu()) {
    MESSAGE("no HIP device: skipped");
    return;
  }
  CHECK(vendor::warp_size(vendor::current_device()) == hip::kWarpSize);
  hip::HipDevice<float> dev(nullptr, 0, true);
  std::vector<float> h{1.f, -2.f, 3.5f, 0.f};
  float* d = static_cast<float*>(vendor::malloc_device(h.size() * sizeof(float)));
  dev.to_device(d, h.data(), h.size() * sizeof(float));
  CHECK(dev.all_finite(deltakv::FiniteCheckParams<float>{d, 4, 1, 4}));
  std::vector<float> back(h.size(), -1.f);
  dev.to_host(back.data(), d, back.size() * sizeof(float));
  CHECK(back == h);
  vendor::free_device(d);
}
