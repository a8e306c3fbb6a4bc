#!/usr/bin/env bash
# The one test command (also in the README and run by .ci/run): configure, build, run ctest.
# Where nvcc is installed the CUDA backend and its tests are built too (sm_80, sm_90); without a
# GPU the CUDA tests skip themselves with a message.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cuda=()
if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="$PATH:/usr/local/cuda/bin"
  cuda=(-DDELTAKV_ENABLE_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=80;90")
fi
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DDELTAKV_ENABLE_TESTS=ON "${cuda[@]}"
cmake --build build -j
ctest --test-dir build --output-on-failure
