#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ with clang (ASan + UBSan, no recovery) into build-fuzz/
# and runs each for FUZZ_SECONDS on a temporary copy of its seed corpus (fuzz/corpus/<name>/ is
# never modified). Fails on any crash, sanitizer report, leak, timeout or out-of-memory; the input
# that caused it is kept in build-fuzz/artifacts/<target>/ and the command to replay it is printed.
#
# Environment:
#   FUZZ_SECONDS   seconds per target (default 60)
#   FUZZ_TARGETS   space-separated subset of: safetensors gguf cache (default: all available)
#   FUZZ_CXX       clang++ to use (default: clang++, else clang++-14)
#   FUZZ_CXXFLAGS  extra compile flags (e.g. -DDELTAKV_FUZZ_SKIP_OPEN_FINDINGS)
#   FUZZ_ARGS      extra libFuzzer flags (e.g. -use_value_profile=1)
#   FUZZ_JOBS      targets run at once (default: nproc)
# Needs clang with libFuzzer: on Debian 12, apt-get install clang libclang-rt-14-dev.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

SECONDS_PER_TARGET=${FUZZ_SECONDS:-60}
CXX_FUZZ=${FUZZ_CXX:-}
if [[ -z "$CXX_FUZZ" ]]; then
  for c in clang++ clang++-14; do
    if command -v "$c" >/dev/null 2>&1; then CXX_FUZZ=$c; break; fi
  done
fi
if [[ -z "$CXX_FUZZ" ]]; then
  echo "fuzz: no clang++ found (apt-get install clang libclang-rt-14-dev)" >&2
  exit 2
fi

EIGEN_INC=/usr/include/eigen3
if [[ ! -f "$EIGEN_INC/Eigen/Core" ]] && command -v pkg-config >/dev/null 2>&1 && pkg-config --exists eigen3; then
  EIGEN_INC=$(pkg-config --cflags-only-I eigen3 | sed 's/^ *-I//; s/ .*//')
fi

targets=(${FUZZ_TARGETS:-safetensors gguf cache})
# The GGUF target is built only where the reader exists.
if [[ ! -f include/deltakv/io/gguf.hpp ]]; then
  filtered=()
  for t in "${targets[@]}"; do
    if [[ "$t" == gguf ]]; then echo "fuzz: include/deltakv/io/gguf.hpp not present, skipping fuzz_gguf"; else filtered+=("$t"); fi
  done
  targets=("${filtered[@]}")
fi

OUT=build-fuzz
mkdir -p "$OUT"
# Line tables only: file:line in reports, at a fraction of the compile time of full debug info.
CXXFLAGS_FUZZ=(-std=c++20 -gline-tables-only -O1 -fno-omit-frame-pointer
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
  -I include -I backends/cpu/include -I "$EIGEN_INC" ${FUZZ_CXXFLAGS:-})

echo "== fuzz: building ${targets[*]} with $CXX_FUZZ"
build_start=$(date +%s)
pids=()
for t in "${targets[@]}"; do
  "$CXX_FUZZ" "${CXXFLAGS_FUZZ[@]}" "fuzz/fuzz_$t.cpp" -o "$OUT/fuzz_$t" >"$OUT/build_$t.log" 2>&1 &
  pids+=($!)
done
build_failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "fuzz: building fuzz_${targets[$i]} failed:" >&2
    cat "$OUT/build_${targets[$i]}.log" >&2
    build_failed=1
  fi
done
[[ $build_failed -eq 0 ]] || exit 1
echo "== fuzz: built in $(( $(date +%s) - build_start )) s"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/deltakv-fuzz.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# One target: its corpus copy, its own temp dir and artifacts; the exit status goes to $WORK/rc_<t>.
run_one() {
  local t=$1
  local corpus="$WORK/corpus_$t" tmp="$WORK/tmp_$t" artifacts="$ROOT/$OUT/artifacts/$t"
  mkdir -p "$corpus" "$tmp"
  if [[ -d "fuzz/corpus/$t" ]]; then cp -R "fuzz/corpus/$t/." "$corpus/"; fi
  find "$corpus" -name '*.py' -delete
  rm -rf "$artifacts"
  mkdir -p "$artifacts"
  local rc=0
  (cd "$tmp" && TMPDIR="$tmp" "$ROOT/$OUT/fuzz_$t" "$corpus" \
      -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 -detect_leaks=1 \
      -print_final_stats=1 -artifact_prefix="$artifacts/" ${FUZZ_ARGS:-}) >"$OUT/fuzz_$t.log" 2>&1 || rc=$?
  echo "$rc" >"$WORK/rc_$t"
}

# Targets run FUZZ_JOBS at a time (default: one per core; each fuzzer is single-threaded), each for
# the full FUZZ_SECONDS.
JOBS_FUZZ=${FUZZ_JOBS:-$(nproc)}
running=0
for t in "${targets[@]}"; do
  if [[ $running -ge $JOBS_FUZZ ]]; then
    wait -n || true
    running=$((running - 1))
  fi
  echo "== fuzz: fuzz_$t for ${SECONDS_PER_TARGET} s (log: $OUT/fuzz_$t.log)"
  run_one "$t" &
  running=$((running + 1))
done
wait

failed=()
for t in "${targets[@]}"; do
  log="$OUT/fuzz_$t.log"
  rc=$(cat "$WORK/rc_$t" 2>/dev/null || echo 99)
  echo "== fuzz: fuzz_$t: exit $rc"
  grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" | tr '\n' ' ' || true
  echo
  if [[ $rc -ne 0 ]]; then
    echo "fuzz: fuzz_$t FAILED (exit $rc)" >&2
    grep -E 'ERROR|FUZZ_CHECK|runtime error|SUMMARY|Test unit written|terminate called|what\(\)' "$log" | head -20 >&2 || true
    for a in "$ROOT/$OUT/artifacts/$t"/*; do
      [[ -e "$a" ]] && echo "fuzz: replay with: $OUT/fuzz_$t $a" >&2
    done
    failed+=("$t")
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "== fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "== fuzz: all targets clean"
