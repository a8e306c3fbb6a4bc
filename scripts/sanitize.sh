#!/usr/bin/env bash
# Sanitizer runs, each in its own build directory (never touches build/). Run by .ci/run.
#   1. build-asan: the whole test suite (every TEST_CASE, one ctest test each, real-model tests
#      included) under AddressSanitizer + UndefinedBehaviorSanitizer, no recovery: the first
#      report fails its test. Only the CPU test binary is built (no examples, benchmarks, CUDA or
#      header check). Debug build type, so assertions (deltakv's and Eigen's) stay on.
#   2. build-tsan: ThreadSanitizer on tests/test_threads.cpp only (the "thread: ..." cases, the
#      documented sharing rules of docs/ERRORS.md), compiled directly from its two sources: the
#      rest of the suite is single-threaded and would only cost compile time under TSan.
# Both must be clean.
#
# Where the time goes (2 cores; measured for this script): compiling is nearly all of it. The test
# translation units instantiate the cache, the CPU device and Eigen for float and double; with
# `-g` (full debug info) under ASan+UBSan each of test_calibration/test_checkpoint/test_cache
# took 1.5-2x as long as without. So: -O1 (ASan's recommended level; -O0 makes the model-sized
# engine tests several times slower) and line tables only (file:line in reports, no variable
# info). Clang, where present: it compiles these units faster than g++ with the same sanitizers
# and its runtimes are what scripts/fuzz.sh needs anyway. Running the suite takes about a minute:
# the two SmolLM2 engine tests are the slowest (tens of seconds under ASan) and are kept.
#
# Environment:
#   SANITIZE_ONLY   asan | tsan: run just one of the two
#   SANITIZE_CXX    compiler (default: clang++, else clang++-14, else c++)
#   SANITIZE_DEBUG  debug-info flag (default: -gline-tables-only for clang, -g1 for g++)
#   JOBS            build and ctest parallelism (default: nproc)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

JOBS=${JOBS:-$(nproc)}
ONLY=${SANITIZE_ONLY:-}
CXX_SAN=${SANITIZE_CXX:-}
if [[ -z "$CXX_SAN" ]]; then
  for c in clang++ clang++-14 c++; do
    if command -v "$c" >/dev/null 2>&1; then CXX_SAN=$(command -v "$c"); break; fi
  done
fi
if "$CXX_SAN" --version 2>/dev/null | grep -qi clang; then
  DBG=${SANITIZE_DEBUG:--gline-tables-only}
else
  DBG=${SANITIZE_DEBUG:--g1}
fi
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi

now() { date +%s; }

if [[ -z "$ONLY" || "$ONLY" == asan ]]; then
  echo "== sanitize: ASan + UBSan, whole suite (build-asan, $CXX_SAN -O1 $DBG)"
  t0=$(now)
  cmake -S . -B build-asan "${GEN[@]}" -DCMAKE_CXX_COMPILER="$CXX_SAN" -DCMAKE_BUILD_TYPE=Debug \
    -DCMAKE_CXX_FLAGS_DEBUG="-O1 $DBG" \
    -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" \
    -DDELTAKV_ENABLE_TESTS=ON -DDELTAKV_ENABLE_EXAMPLES=OFF -DDELTAKV_ENABLE_BENCHMARKS=OFF \
    -DDELTAKV_ENABLE_CUDA=OFF -DDELTAKV_ENABLE_HIP=OFF -DDELTAKV_INSTALL=OFF >/dev/null
  cmake --build build-asan -j "$JOBS" --target deltakv_tests
  t1=$(now)
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1:strict_init_order=1:check_initialization_order=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan --output-on-failure --no-tests=error -j "$JOBS"
  t2=$(now)
  echo "== sanitize: ASan + UBSan clean (build $((t1 - t0)) s, tests $((t2 - t1)) s)"
fi

if [[ -z "$ONLY" || "$ONLY" == tsan ]]; then
  echo "== sanitize: TSan, thread tests (build-tsan, $CXX_SAN -O1 $DBG)"
  t0=$(now)
  EIGEN_INC=/usr/include/eigen3
  if [[ ! -f "$EIGEN_INC/Eigen/Core" ]] && command -v pkg-config >/dev/null 2>&1 && pkg-config --exists eigen3; then
    EIGEN_INC=$(pkg-config --cflags-only-I eigen3 | sed 's/^ *-I//; s/ .*//')
  fi
  mkdir -p build-tsan
  TSAN_FLAGS=(-std=c++20 -O1 "$DBG" -fsanitize=thread -fno-omit-frame-pointer -pthread
    "-DDELTAKV_TEST_DATA_DIR=\"$ROOT/tests/data\"" -I include -I backends/cpu/include -isystem "$EIGEN_INC")
  # Two translation units, compiled side by side, then linked.
  "$CXX_SAN" "${TSAN_FLAGS[@]}" -c tests/main.cpp -o build-tsan/main.o &
  main_pid=$!
  "$CXX_SAN" "${TSAN_FLAGS[@]}" -c tests/test_threads.cpp -o build-tsan/test_threads.o
  wait "$main_pid"
  "$CXX_SAN" -fsanitize=thread -pthread build-tsan/main.o build-tsan/test_threads.o -o build-tsan/deltakv_thread_tests
  t1=$(now)
  # doctest exits non-zero on a failed check; TSan on its first report (halt_on_error). doctest
  # also exits 0 when the filter matches nothing, so require that the thread cases really ran.
  TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
    build-tsan/deltakv_thread_tests --test-case='thread*' --duration=true 2>&1 | tee build-tsan/thread_tests.log
  grep -Eq '^\[doctest\] test cases: +[1-9][0-9]* \| +[1-9][0-9]* passed \| +0 failed' build-tsan/thread_tests.log || {
    echo "sanitize: the TSan thread tests did not all run and pass" >&2
    exit 1
  }
  t2=$(now)
  echo "== sanitize: TSan clean (build $((t1 - t0)) s, tests $((t2 - t1)) s)"
fi
echo "== sanitize: clean"
