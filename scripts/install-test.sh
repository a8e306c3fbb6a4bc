#!/usr/bin/env bash
# Install test: `cmake --install` deltakv into a temporary prefix, then configure, build and run
# the consumer project in tests/consumer, which finds the installed package with
# find_package(deltakv) (nothing from the source tree) and checks a small cache's reconstruction.
# Where nvcc is installed (PATH or /usr/local/cuda/bin), deltakv is installed with its CUDA backend
# and the consumer also builds a CUDA program against deltakv::cuda (find_package(deltakv
# COMPONENTS cuda), sm_90 only, to stay quick); building needs no GPU, and without a CUDA device
# the program only reports that it was not run.
# Everything happens in a temporary directory, removed at exit (KEEP_INSTALL_TEST=1 keeps it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/deltakv-install-test.XXXXXX")
if [[ "${KEEP_INSTALL_TEST:-0}" == 1 ]]; then
  echo "install-test: keeping $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi
PREFIX="$WORK/prefix"

cuda_install=() cuda_consumer=()
if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="$PATH:/usr/local/cuda/bin"
  NVCC=$(command -v nvcc)
  cuda_install=(-DDELTAKV_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 "-DCMAKE_CUDA_COMPILER=$NVCC")
  cuda_consumer=(-DDELTAKV_CONSUMER_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 "-DCMAKE_CUDA_COMPILER=$NVCC")
  echo "== install-test: nvcc found ($NVCC): the CUDA backend and consumer are included"
else
  echo "== install-test: no nvcc: CPU package and consumer only"
fi

echo "== install-test: configure + install deltakv into $PREFIX"
cmake -S "$ROOT" -B "$WORK/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$PREFIX" \
  -DDELTAKV_INSTALL=ON -DDELTAKV_ENABLE_TESTS=OFF -DDELTAKV_ENABLE_EXAMPLES=OFF -DDELTAKV_ENABLE_BENCHMARKS=OFF \
  "${cuda_install[@]}" >/dev/null
cmake --build "$WORK/build" >/dev/null
cmake --install "$WORK/build" >/dev/null

# The package must be complete on its own: headers of the core, the I/O readers and the CPU
# backend, the config, version and targets files, and no path back into the source tree.
for f in include/deltakv/cache.hpp include/deltakv/io/safetensors.hpp include/deltakv/cpu/device.hpp; do
  [[ -f "$PREFIX/$f" ]] || { echo "install-test: $f was not installed" >&2; exit 1; }
done
cfg_dir=$(dirname "$(find "$PREFIX" -name deltakvConfig.cmake | head -1)")
for f in deltakvConfig.cmake deltakvConfigVersion.cmake deltakvTargets.cmake; do
  [[ -f "$cfg_dir/$f" ]] || { echo "install-test: $f was not installed" >&2; exit 1; }
done
if [[ ${#cuda_install[@]} -gt 0 ]]; then
  for f in include/deltakv/cuda/device.hpp include/deltakv/gpu/gpu_device.hpp include/deltakv/gpu/kernels.cuh include/deltakv/gpu/decode_step.hpp \
           include/deltakv/gpu/vendor.hpp "${cfg_dir#"$PREFIX/"}/deltakvCudaTargets.cmake"; do
    [[ -f "$PREFIX/$f" ]] || { echo "install-test: $f was not installed" >&2; exit 1; }
  done
  grep -q 'deltakv::cuda' "$cfg_dir/deltakvCudaTargets.cmake" ||
    { echo "install-test: deltakvCudaTargets.cmake does not define deltakv::cuda" >&2; exit 1; }
  # the shared GPU headers have generic names (vendor.hpp, kernels.cuh): consumers reach them as
  # <deltakv/gpu/...>, never through an include directory of their own
  if grep -q 'deltakv/gpu' "$cfg_dir/deltakvCudaTargets.cmake"; then
    echo "install-test: deltakv::cuda puts include/deltakv/gpu on its consumers' include path" >&2
    exit 1
  fi
fi
if grep -rqF "$ROOT" "$cfg_dir"; then
  echo "install-test: the installed package refers to the source tree:" >&2
  grep -rnF "$ROOT" "$cfg_dir" >&2
  exit 1
fi

echo "== install-test: build tests/consumer against the installed package"
cmake -S "$ROOT/tests/consumer" -B "$WORK/consumer" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_FIND_PACKAGE_PREFER_CONFIG=ON "${cuda_consumer[@]}" >/dev/null
cmake --build "$WORK/consumer"
"$WORK/consumer/deltakv_consumer"
if [[ ${#cuda_consumer[@]} -gt 0 ]]; then
  # Without a CUDA device (or driver) it prints that it was not run and exits 0.
  "$WORK/consumer/deltakv_consumer_cuda"
fi
echo "== install-test: ok"
