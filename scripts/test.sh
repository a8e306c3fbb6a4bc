#!/usr/bin/env bash
# The one test command (also in the README and run by .ci/run): configure, build, run ctest.
# Where nvcc is installed the CUDA backend and its tests are built too (sm_80, sm_90); without a
# GPU the CUDA tests skip themselves with a message. Host code is built at -O1: the build is most
# of this command's time (the suite runs in seconds), and -O1 takes about a third less than -O3.
# It builds in build-test/, so the -O1 flags never reach the Release cache of build/ (the main job's
# and the GPU instructions' directory).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cuda=()
if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="$PATH:/usr/local/cuda/bin"
  cuda=(-DDELTAKV_ENABLE_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=80;90")
fi
cmake -S . -B build-test -G Ninja -DCMAKE_BUILD_TYPE=Release -DDELTAKV_ENABLE_TESTS=ON \
  "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG" "-DCMAKE_CUDA_FLAGS_RELEASE=-O1 -DNDEBUG" "${cuda[@]}"
cmake --build build-test -j
ctest --test-dir build-test --output-on-failure
