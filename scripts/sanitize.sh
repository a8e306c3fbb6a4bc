#!/usr/bin/env bash
# Sanitizer runs of the test suite, each in its own build directory (never touches build/):
#   1. build-asan: Debug (assertions on, compiled at -O1 so the model-sized tests stay fast),
#      AddressSanitizer + UndefinedBehaviorSanitizer (no recovery: the first report fails the
#      test), the whole ctest suite;
#   2. build-tsan: RelWithDebInfo, ThreadSanitizer, only the thread tests (ctest -R thread).
# Both must be clean. Environment: CXX picks the compiler (default: cmake's choice), JOBS the
# build/test parallelism (default: nproc), SANITIZE_ONLY=asan|tsan runs just one of the two.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

JOBS=${JOBS:-$(nproc)}
ONLY=${SANITIZE_ONLY:-}
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi
COMMON=(-DDELTAKV_ENABLE_TESTS=ON -DDELTAKV_ENABLE_EXAMPLES=OFF -DDELTAKV_ENABLE_BENCHMARKS=OFF -DDELTAKV_INSTALL=OFF)

if [[ -z "$ONLY" || "$ONLY" == asan ]]; then
  echo "== sanitize: ASan + UBSan (build-asan, Debug, full ctest)"
  cmake -S . -B build-asan "${GEN[@]}" "${COMMON[@]}" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-g -O1" \
    -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
  cmake --build build-asan -j "$JOBS" --target deltakv_tests
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1:strict_init_order=1:check_initialization_order=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan --output-on-failure --no-tests=error -j "$JOBS"
fi

if [[ -z "$ONLY" || "$ONLY" == tsan ]]; then
  echo "== sanitize: TSan (build-tsan, RelWithDebInfo, ctest -R thread)"
  cmake -S . -B build-tsan "${GEN[@]}" "${COMMON[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer"
  cmake --build build-tsan -j "$JOBS" --target deltakv_tests
  TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:history_size=4 \
    ctest --test-dir build-tsan --output-on-failure --no-tests=error -R thread
fi
echo "== sanitize: clean"
