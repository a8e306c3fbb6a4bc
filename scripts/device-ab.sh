#!/usr/bin/env bash
# A/B timing of GPU kernel variants, the way docs/BENCHMARKS.md's comparisons are made: every variant
# is built from its own copy of the source tree and all of them are timed in one run, passes
# interleaved (instances differ by several percent, so only same-run numbers compare).
#
# Two modes:
#   scripts/device-ab.sh --export REF DIR
#       (here, in a git checkout) writes the GPU headers of commit REF
#       (backends/gpu/include/deltakv/gpu/*) into DIR, e.g. .devtools/base (git-ignored), so that
#       they travel to the device machine with the working tree.
#   scripts/device-ab.sh [--tests] [--passes N] [--only "M CTX B" ...] NAME=SPEC ...
#       (on the device machine, from the repository root) builds and times the variants. SPEC is
#       "." (the working tree), a header directory made by --export (copied over the tree's GPU
#       headers), either one followed by ":FLAGS" for extra CUDA flags (-D switches), e.g.
#         base=.devtools/base  new=.  noswitch=.:-DMY_SWITCH=0
#       --only takes bench_decode's "MODEL_INDEX CTX BATCH" (0 Llama-3.1-8B, 1 Qwen2.5-7B); the
#       default is "0 131072 8". --tests also builds the working tree's GPU tests and runs them once.
# CUDA flags passed with -D do take effect; header directories passed with -I in CMAKE_CUDA_FLAGS
# would not (the target's own include directories come first), hence the copies.
# Output: one line per (configuration, variant, pass) with the step, full-layer, sparse-layer and
# select times (ms), then the GPU tests' summary. Logs in $OUT (default /tmp/device-ab).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

if [[ ${1:-} == --export ]]; then
  [[ $# -eq 3 ]] || { echo "usage: $0 --export REF DIR" >&2; exit 2; }
  mkdir -p "$3"
  for f in $(git ls-tree --name-only "$2" backends/gpu/include/deltakv/gpu/); do
    git show "$2:$f" > "$3/$(basename "$f")" || exit 1
  done
  echo "device-ab: the GPU headers of $(git rev-parse --short "$2") are in $3"
  exit 0
fi

OUT=${OUT:-/tmp/device-ab}
mkdir -p "$OUT"
passes=2 tests=0 configs=() variants=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --tests) tests=1 ;;
    --passes) passes=$2; shift ;;
    --only) configs+=("$2"); shift ;;
    *=*) variants+=("$1") ;;
    *) echo "device-ab: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[[ ${#variants[@]} -gt 0 ]] || { echo "usage: see the header of $0" >&2; exit 2; }
[[ ${#configs[@]} -gt 0 ]] || configs=("0 131072 8")
src=$PWD

build() {  # build NAME SPEC TARGETS...
  local name=$1 spec=$2; shift 2
  local dir=${spec%%:*} flags="" tree=/tmp/device-ab-src-$name b=/tmp/device-ab-build-$name
  [[ $spec == *:* ]] && flags=${spec#*:}
  rm -rf "$tree"; mkdir -p "$tree"
  (cd "$src" && tar --exclude=./.git --exclude=./models --exclude='./build*' -cf - .) | tar -xf - -C "$tree"
  if [[ $dir != . ]]; then
    [[ $dir == /* ]] || dir=$src/$dir
    [[ -d $dir ]] || { echo "device-ab: $name: no header directory $dir" >&2; return 1; }
    cp "$dir"/* "$tree/backends/gpu/include/deltakv/gpu/"
  fi
  cmake -S "$tree" -B "$b" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDELTAKV_ENABLE_CUDA=ON -DDELTAKV_ENABLE_TESTS=ON \
    -DDELTAKV_ENABLE_BENCHMARKS=ON -DCMAKE_CUDA_ARCHITECTURES=90a "-DCMAKE_CUDA_FLAGS=$flags" >"$OUT/configure-$name.log" 2>&1 ||
    { tail -5 "$OUT/configure-$name.log"; return 1; }
  cmake --build "$b" -j8 --target "$@" >"$OUT/build-$name.log" 2>&1 || { grep -m10 -i error "$OUT/build-$name.log"; return 1; }
  echo "device-ab: built $name ($SECONDS s)"
}

cat >"$OUT/summary.py" <<'PY'
import json, sys
name, npass = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    if not line.startswith('{"model"'):
        continue
    r = json.loads(line)
    print(f"{name:>8} pass {npass}  {r['model']} {r['ctx'] // 1024}K x {r['batch']}: step {r['deltakv_ms']:.3f}  "
          f"full layer {r['full_layer_ms']:.4f}  sparse layer {r['sparse_layer_ms']:.4f}  select {r['select_ms']:.4f}")
PY

pids=()
for v in "${variants[@]}"; do
  name=${v%%=*} spec=${v#*=}
  targets=(deltakv_bench_decode)
  [[ $tests -eq 1 && $spec == . ]] && targets+=(deltakv_cuda_tests)
  build "$name" "$spec" "${targets[@]}" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || exit 1; done

for cfg in "${configs[@]}"; do
  for ((i = 1; i <= passes; ++i)); do
    for v in "${variants[@]}"; do
      name=${v%%=*}
      # shellcheck disable=SC2086  # cfg is three words on purpose
      /tmp/device-ab-build-$name/bench/deltakv_bench_decode --only $cfg 2>&1 | tee -a "$OUT/bench-$name.log" |
        python3 "$OUT/summary.py" "$name" "$i"
    done
  done
done

if [[ $tests -eq 1 ]]; then
  for v in "${variants[@]}"; do
    name=${v%%=*} spec=${v#*=}
    [[ $spec == . ]] || continue
    t=$(find "/tmp/device-ab-build-$name" -maxdepth 3 -name deltakv_cuda_tests -type f | head -1)
    echo "device-ab: GPU tests of $name (real-KV cases need models/smollm2-kv.bin carried)"
    DELTAKV_REAL_KV=${DELTAKV_REAL_KV:-$src/models/smollm2-kv.bin} "$t" >"$OUT/tests-$name.log" 2>&1
    echo "device-ab: tests rc $?"; tail -3 "$OUT/tests-$name.log"
  done
fi
echo "device-ab: done ($SECONDS s)"
