#!/usr/bin/env bash
# Idempotent installer for everything pmgas needs to build, test and benchmark on a fresh
# Debian 12 machine: rdma-core (libibverbs/librdmacm + rxe provider), perftest, ndctl,
# ZooKeeper, QEMU + a distribution kernel for the Soft-RoCE VM, virtme-ng, the build
# tools the binding crates need, and librpma (the data benchmark's write + flush peer). Safe to run repeatedly; it only installs what is missing.
set -euo pipefail

APT_PACKAGES=(
  rdma-core ibverbs-utils ibverbs-providers libibverbs-dev librdmacm-dev rdmacm-utils
  perftest ndctl daxctl iproute2 kmod
  zookeeper libslf4j-java
  qemu-system-x86 linux-image-amd64 busybox-static
  libclang-dev clang pkg-config cmake build-essential
  libpmemobj-dev librpma-dev
  python3-pip
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  echo "install-deps: apt installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# virtme-ng boots the distribution kernel over the host's own root filesystem.
if ! command -v vng >/dev/null 2>&1; then
  echo "install-deps: pip installing virtme-ng"
  python3 -m pip install -q virtme-ng
fi
command -v vng >/dev/null 2>&1 || { echo "install-deps: vng not on PATH after install" >&2; exit 1; }

# The Rust toolchain pieces CI uses.
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
fi
echo "install-deps: ok"
