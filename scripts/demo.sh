#!/usr/bin/env bash
# The main job: build the `deltakv` tool, fetch the embedded default model (SmolLM2-135M-Instruct)
# and run `deltakv eval` on the default text. Extra arguments go to `deltakv eval`
# (e.g. --context 512 for a quick run, --configs deltakv-4-int4,q4_0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DDELTAKV_ENABLE_EXAMPLES=ON
cmake --build build -j --target example_deltakv
scripts/fetch-model.sh
exec ./build/examples/deltakv eval --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --text /usr/share/common-licenses/GPL-3 "$@"
