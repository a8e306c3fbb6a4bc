#!/usr/bin/env bash
# CI step for the HIP backend: the shared-GPU-source check (and its self-test), then the HIP
# backend built with Debian's hipcc for AMD gfx90a, gfx940 and gfx1030 (objects with every kernel
# instantiated) plus its tests for gfx90a and gfx1030. Nothing runs: CI has no AMD GPU.
#   JOBS=<n>       parallel compile jobs (default: the number of cores)
#   BUILD_DIR=...  build directory (default: build-hip)
#   HIP_TEST_ARCHS="gfx90a;gfx1030"  targets the tests and GPU benchmarks are built for (fewer: faster)
#   HIP_OPT=-O1    optimization of the AMD objects (default -O1: this is a compile check, nothing runs;
#                  -O2 for binaries meant to run on an AMD GPU)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The check's verdict is reported at the end, after the build, so one run shows both.
check=0
scripts/check-gpu-source.sh || check=1
scripts/check-gpu-source.sh --self-test || check=1

if ! command -v hipcc >/dev/null 2>&1; then
  echo "build-hip: hipcc not found (scripts/install-deps.sh installs it)" >&2
  exit 1
fi
export HIP_PLATFORM=amd  # never NVIDIA: HIP's NVIDIA headers do not compile with CUDA 13
jobs="${JOBS:-$(nproc)}"
dir="${BUILD_DIR:-build-hip}"
start=$(date +%s)
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDELTAKV_ENABLE_HIP=ON -DDELTAKV_ENABLE_TESTS=ON \
  -DDELTAKV_ENABLE_EXAMPLES=OFF -DDELTAKV_INSTALL=OFF -DDELTAKV_HIP_BUILD_JOBS="$jobs" \
  -DDELTAKV_HIP_TEST_ARCHITECTURES="${HIP_TEST_ARCHS:-gfx90a;gfx1030}" -DDELTAKV_HIP_OPT="${HIP_OPT:--O1}"
cmake --build "$dir" --target deltakv_hip_build
echo "build-hip: built in $(( $(date +%s) - start )) s with $jobs job(s):"
ls "$dir/backends/hip/hipcc"/deltakv_hip_tests_* "$dir/backends/hip/hipcc"/bench_* 2>/dev/null || true
find "$dir/backends/hip/hipcc" -name '*.hip.o' | sort
if [[ $check -ne 0 ]]; then
  echo "build-hip: FAILED: scripts/check-gpu-source.sh found problems (see its output above)" >&2
  exit 1
fi
