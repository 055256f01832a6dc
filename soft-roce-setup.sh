#!/usr/bin/env bash
# Creates a Soft-RoCE (rxe) device on a network interface and prints it. Idempotent: an
# rxe device already bound to that interface is reused.
#
# Usage: ./soft-roce-setup.sh [NETDEV] [RXE_NAME]
#   NETDEV    interface to bind (default: the interface of the default route, else the
#             first non-loopback interface that is up). rdma_cm cannot resolve routes over
#             an rxe device on `lo`, so lo is never the default.
#   RXE_NAME  name for a new device (default rxe0).
#
# For tests and benchmarks you normally do not call this: scripts/rig.sh builds a whole
# multi-host rig (and boots a VM when the host kernel lacks rxe).
set -euo pipefail

netdev=${1:-}
name=${2:-rxe0}

if ! modprobe rdma_rxe 2>/dev/null; then
  cat >&2 <<MSG
soft-roce-setup: this kernel ($(uname -r)) cannot load rdma_rxe, so no Soft-RoCE device
can be created on this host. Options:
  - run the tests and benchmarks through scripts/rig.sh, which boots a Debian kernel
    that has rxe in a virtme-ng VM over this filesystem (scripts/install-deps.sh
    installs what it needs);
  - or boot a kernel built with CONFIG_RDMA_RXE=m (Debian's linux-image-amd64 has it).
MSG
  exit 1
fi
command -v rdma >/dev/null || { echo "soft-roce-setup: 'rdma' (iproute2) missing; run scripts/install-deps.sh" >&2; exit 1; }

if [[ -z $netdev ]]; then
  netdev=$(ip -o route show default 2>/dev/null | awk '{for (i=1;i<NF;i++) if ($i=="dev") {print $(i+1); exit}}')
fi
if [[ -z $netdev ]]; then
  netdev=$(ip -o link show up | awk -F': ' '$2 != "lo" {sub(/@.*/, "", $2); print $2; exit}')
fi
[[ -n $netdev ]] || { echo "soft-roce-setup: no network interface to bind; give one" >&2; exit 1; }
ip link show "$netdev" >/dev/null 2>&1 || { echo "soft-roce-setup: no interface $netdev" >&2; exit 1; }

existing=$(rdma link show | awk -v nd="$netdev" '$NF == nd || $(NF-1) == "netdev" && $NF == nd {split($2, a, "/"); print a[1]; exit}')
if [[ -n $existing ]]; then
  echo "soft-roce-setup: $existing already on $netdev"
else
  rdma link add "$name" type rxe netdev "$netdev"
  echo "soft-roce-setup: created $name on $netdev"
fi
rdma link show | grep -w "$netdev"
