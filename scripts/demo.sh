#!/usr/bin/env bash
# Configures and builds deltakv with examples on, then runs the synthetic demo.
# Extra arguments are passed to the demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ! -f examples/synthetic_demo.cpp ]]; then
  echo "demo: examples/synthetic_demo.cpp does not exist" >&2
  exit 1
fi

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DDELTAKV_ENABLE_EXAMPLES=ON
cmake --build build -j --target example_synthetic_demo
exec ./build/examples/synthetic_demo "$@"
