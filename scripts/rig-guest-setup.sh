#!/usr/bin/env bash
# Runs inside the rig VM (as root): builds N simulated hosts, each with its own address
# 10.0.0.i on a veth whose peer sits on one bridge, and its own Soft-RoCE device rxe<i>
# on that veth; then turns the reserved memmap range into devdax PM at /dev/dax0.0.
#
# Why this topology: rdma_cm over an rxe device on `lo` cannot resolve routes, and rxe
# traffic does not cross network namespaces on the 6.1 kernel. Hosts in the root
# namespace whose locally generated packets are policy-routed out of their own veth do
# give each host its own device, GID and rkeys, with packets really crossing the veths.
#
# Usage: rig-guest-setup.sh HOST_COUNT   (writes /tmp/pmgas-rig.env for callers to source)
set -euo pipefail
host_count=${1:-3}
[[ $host_count =~ ^[0-9]+$ ]] && ((host_count >= 1 && host_count <= 8)) ||
  { echo "rig-guest-setup: HOST_COUNT must be 1..8" >&2; exit 2; }

sysctl_set() { sysctl -qw "$1=$2"; }

modprobe rdma_rxe
modprobe veth
modprobe bridge 2>/dev/null || true

ip link set lo up
ip link add br-pmgas type bridge 2>/dev/null || true
ip link set br-pmgas up
sysctl_set net.ipv4.conf.all.rp_filter 0
sysctl_set net.ipv4.conf.default.rp_filter 0
sysctl_set net.ipv4.conf.all.accept_local 1
sysctl_set net.ipv4.conf.all.arp_ignore 1
sysctl_set net.ipv4.conf.all.arp_announce 2

# The local table must be consulted after the per-host rules, or every packet between two
# simulated hosts would short-cut through lo instead of crossing the veths.
if ip rule show | grep -q '^0:.*lookup local'; then
  ip rule add pref 1000 lookup local
  ip rule del pref 0 lookup local
fi

hosts=()
devices=()
for i in $(seq 1 "$host_count"); do
  a=veth${i}a b=veth${i}b ip_addr=10.0.0.$i table=$((100 + i))
  ip link add "$a" type veth peer name "$b"
  ip link set "$b" master br-pmgas
  ip link set "$b" up
  ip addr add "$ip_addr/24" dev "$a"
  ip link set "$a" up
  sysctl_set "net.ipv4.conf.$a.rp_filter" 0
  sysctl_set "net.ipv4.conf.$a.accept_local" 1
  sysctl_set "net.ipv4.conf.$a.arp_ignore" 1
  sysctl_set "net.ipv4.conf.$a.arp_announce" 2
  ip rule add pref $((10 + i)) from "$ip_addr" to "$ip_addr" lookup local
  ip rule add pref $((50 + i)) iif lo from "$ip_addr" lookup "$table"
  ip route add 10.0.0.0/24 dev "$a" src "$ip_addr" table "$table"
  rdma link add "rxe$i" type rxe netdev "$a"
  hosts+=("$ip_addr")
  devices+=("rxe$i")
done

# Permanent neighbour entries between all simulated hosts: the first ARP exchange through
# the bridge can outlast rdma_cm's address-resolution timeout under TCG emulation, and the
# rig's addresses and MACs are fixed anyway.
for i in $(seq 1 "$host_count"); do
  for j in $(seq 1 "$host_count"); do
    ((i == j)) && continue
    mac=$(cat "/sys/class/net/veth${j}a/address")
    ip neigh replace "10.0.0.$j" lladdr "$mac" dev "veth${i}a" nud permanent
  done
done

# Emulated PM: the kernel was booted with memmap=SIZE!START, which nd_e820 exposes as a
# pmem region; reconfigure its namespace as devdax so rxe can register it (fsdax cannot
# be pinned for RDMA).
pm_device=""
pm_devices=""
if [[ ${2:-} == nvdimm ]]; then
  # File-backed NVDIMMs (ACPI NFIT): one region and raw namespace each. A namespace a
  # previous boot made devdax comes back as devdax (its info block is on the NVDIMM) and
  # is left alone: the pools on it survive.
  modprobe nfit && modprobe nd_pmem && modprobe dax_pmem || { echo "rig: no NVDIMM drivers" >&2; exit 1; }
  # namespaces [MODE-TO-SKIP]: the NVDIMM namespaces, but those in that mode.
  namespaces() {
    ndctl list -N 2>/dev/null | python3 -c '
import json, sys
text = sys.stdin.read().strip()
d = json.loads(text) if text else []
d = d if isinstance(d, list) else [d]
print(" ".join(n["dev"] for n in d if n.get("mode") != sys.argv[1]))' "${1:-none}"
  }
  for _ in $(seq 1 20); do
    (($(namespaces | wc -w) >= 3)) && break
    sleep 0.5
  done
  for ns in $(namespaces devdax); do
    ndctl create-namespace -f -e "$ns" -m devdax -a 2M >/dev/null || { echo "rig: $ns cannot be devdax" >&2; exit 1; }
  done
  for _ in $(seq 1 20); do (($(ls /dev/dax*.0 2>/dev/null | wc -l) >= 3)) && break; sleep 0.5; done
  pm_devices=$(ls /dev/dax*.0 2>/dev/null | sort | tr '\n' ' ')
  (($(wc -w <<<"$pm_devices") >= 3)) || { echo "rig: expected 3 NVDIMM devdax devices, found: $pm_devices" >&2; ndctl list -RN >&2; exit 1; }
  pm_device=${pm_devices%% *}
elif modprobe nd_e820 2>/dev/null && modprobe nd_pmem && modprobe dax_pmem; then
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    ndctl list -N 2>/dev/null | grep -q namespace0.0 && break
    sleep 0.5
  done
  if ndctl list -N 2>/dev/null | grep -q namespace0.0; then
    ndctl create-namespace -f -e namespace0.0 -m devdax -a 4K >/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do [[ -e /dev/dax0.0 ]] && break; sleep 0.5; done
    [[ -e /dev/dax0.0 ]] && pm_device=/dev/dax0.0
  fi
fi

{
  echo "export PMGAS_RIG=1"
  echo "export PMGAS_HOSTS='${hosts[*]}'"
  echo "export PMGAS_DEVICES='${devices[*]}'"
  echo "export PMGAS_PM_DEVICE='$pm_device'"
  echo "export PMGAS_PM_DEVICES='$pm_devices'"
} >/tmp/pmgas-rig.env
echo "rig: hosts=${hosts[*]} devices=${devices[*]} pm=${pm_devices:-${pm_device:-none}}"
rdma link show
