#!/usr/bin/env bash
# Writes models/smollm2-kv.bin: real KV rows of the default model (SmolLM2-135M, layers 0, 1, 15
# and 29, the first 1024 tokens of the GPL-3 text; about 6.3 MB) that tests/cuda/test_real_kv.cu
# compares the GPU backend on. Uses a built `deltakv` example (BUILD_DIR, default build) and the
# model from scripts/fetch-model.sh. Deterministic; models/ is not committed.
#   scripts/dump-real-kv.sh [extra dump-kv arguments, e.g. --tokens 2048 --out other.bin]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

build=${BUILD_DIR:-build}
exe=$build/examples/deltakv
if [[ ! -x $exe ]]; then
  echo "dump-real-kv: $exe not found; build it first: cmake --build $build --target example_deltakv" >&2
  exit 1
fi
[[ -s models/SmolLM2-135M-Instruct.Q4_1.gguf ]] || scripts/fetch-model.sh
"$exe" dump-kv --model models/SmolLM2-135M-Instruct.Q4_1.gguf --text /usr/share/common-licenses/GPL-3 \
  --tokens 1024 --layers 0,1,15,29 --out models/smollm2-kv.bin "$@"
