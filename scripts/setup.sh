#!/usr/bin/env bash
# Installs moev's Debian dependencies when they are missing, then configures and
# builds into build/ (Release, ccache, precompiled headers). Safe to re-run: a
# rebuild after a one-file change only recompiles that file.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(build-essential cmake ccache pkg-config git
      libtorch-dev libgloo-dev libopenblas0-openmp
      dataset-fashion-mnist
      libgtest-dev libgmock-dev libbenchmark-dev
      nlohmann-json3-dev libtomlplusplus-dev libcli11-dev
      libstb-dev zlib1g-dev libgoogle-perftools-dev libgoogle-glog-dev
      python3-torch python3-torchvision)  # the Python side: checkpoint-compatibility test, bench reference, AutoAugment reference
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

BUILD_TYPE="${MOEV_BUILD_TYPE:-Release}"
cmake -S . -B build -DCMAKE_BUILD_TYPE="$BUILD_TYPE" ${MOEV_CMAKE_ARGS:-} >/dev/null
cmake --build build -j"$(nproc)"
