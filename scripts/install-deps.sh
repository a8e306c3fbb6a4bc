#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages needed to build and test deltakv. Idempotent: does nothing
# (and needs neither root nor network) when everything is already installed.
set -euo pipefail

packages=(
  build-essential
  cmake
  ninja-build
  libeigen3-dev
  libfmt-dev
  doctest-dev
  libbenchmark-dev
  nlohmann-json3-dev
  python3
  python3-pip
  clang                # libFuzzer targets and the sanitizer builds
  libclang-rt-14-dev   # clang's sanitizer and libFuzzer runtimes
  hipcc                # HIP backend (compiled for AMD targets; no AMD GPU needed to build)
  librocprim-dev
  rocm-cmake
)

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  if [[ "$status" != "installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all packages already installed"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
if [[ $(id -u) -eq 0 ]]; then
  SUDO=()
else
  SUDO=(sudo)
fi
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y --no-install-recommends "${packages[@]}"
