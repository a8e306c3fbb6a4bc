#!/usr/bin/env bash
# The one test command (also in the README and run by .ci/run): configure, build, run ctest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DDELTAKV_ENABLE_TESTS=ON && cmake --build build -j && ctest --test-dir build --output-on-failure
