#!/usr/bin/env bash
# Runs a command on the RDMA test rig: N simulated hosts (10.0.0.1…N), each with its own
# Soft-RoCE device, plus emulated devdax PM at /dev/dax0.0. The command sees PMGAS_RIG=1,
# PMGAS_HOSTS, PMGAS_DEVICES and PMGAS_PM_DEVICE, and its exit code is returned.
#
# Where the host kernel can load rdma_rxe, the rig is built natively (this changes the
# host's policy routing: use a disposable machine). Otherwise — as on these CI machines —
# it boots the installed distribution kernel with virtme-ng (no KVM: TCG emulation) over
# the host's own root filesystem and builds the rig inside. A rig that cannot start is an
# error (exit 90), never a skip.
#
# --nvdimm DIR (VM only): instead of the memmap range, three file-backed NVDIMMs whose
# contents live in DIR/nvdimm{1,2,3}.img on the host (256 MiB each, created once), so PM
# survives the VM: the guest turns each into devdax (/dev/dax<r>.0, listed in
# PMGAS_PM_DEVICES; kept as it is when a previous boot already did) and may write DIR.
#
# Usage: scripts/rig.sh [--hosts N] [--vm|--native] [--nvdimm DIR] -- COMMAND [ARGS…]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
hosts=3
mode=auto
nvdimm=
while (($#)); do
  case $1 in
    --hosts) hosts=$2; shift 2 ;;
    --nvdimm) nvdimm=$2; mode=vm; shift 2 ;;
    --vm) mode=vm; shift ;;
    --native) mode=native; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
(($#)) || { echo "usage: $0 [--hosts N] [--vm|--native] -- COMMAND…" >&2; exit 2; }

if [[ $mode == auto ]]; then
  if modprobe -n rdma_rxe >/dev/null 2>&1; then mode=native; else mode=vm; fi
fi

out=$(mktemp -d /tmp/pmgas-rig.XXXXXX)
trap 'rm -rf "$out"' EXIT
{
  printf '#!/usr/bin/env bash\nset -uo pipefail\n'
  printf 'cd %q\n' "$PWD"
  printf 'if ! bash %q %q %q; then echo "rig: setup failed" >&2; echo 90 >%q/rc; exit 90; fi\n' \
    "$here/rig-guest-setup.sh" "$hosts" "${nvdimm:+nvdimm}" "$out"
  printf 'source /tmp/pmgas-rig.env\n'
  printf 'export PATH=%q\n' "$PATH"
  printf 'export HOME=%q\n' "${HOME:-/root}"
  # A test that fails keeps its logs here; they reach the host's target/rig-logs.
  printf 'export PMGAS_RIG_LOGS=%q\n' "$out/logs"
  [[ -n ${RUST_LOG:-} ]] && printf 'export RUST_LOG=%q\n' "$RUST_LOG"
  # Every PMGAS_* knob of the caller reaches the command.
  while IFS='=' read -r name _; do
    [[ $name == PMGAS_* && $name != PMGAS_RIG && $name != PMGAS_HOSTS ]] && printf 'export %s=%q\n' "$name" "${!name}"
  done < <(env)
  # Control-plane loops sleep at once when idle: the guest runs ZooKeeper, the monitor
  # and several nodes on 2 vCPUs, where spinning only steals time (measured in the
  # closing note of the allocation issue). Override with PMGAS_SPIN_US.
  printf 'export PMGAS_SPIN_US=%q\n' "${PMGAS_SPIN_US:-0}"
  # The JVM's optimising compiler and parallel GC cost ZooKeeper most of the guest's CPU
  # under TCG; C1 only and the serial GC measured 25-30% faster (override to compare).
  printf 'export PMGAS_ZK_JAVA_OPTS=%q\n' \
    "${PMGAS_ZK_JAVA_OPTS--XX:TieredStopAtLevel=1 -XX:+UseSerialGC -XX:CICompilerCount=1}"
  printf '%q ' "$@"
  printf '\nrc=$?\necho $rc >%q/rc\nexit $rc\n' "$out"
} >"$out/run.sh"

if [[ $mode == native ]]; then
  echo "rig: building $hosts simulated hosts natively"
  bash "$out/run.sh"
  exit $?
fi

command -v vng >/dev/null || { echo "rig: vng (virtme-ng) missing: run scripts/install-deps.sh" >&2; exit 90; }
kernel=$(ls -1 /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
[[ -n $kernel ]] || { echo "rig: no distribution kernel in /boot: run scripts/install-deps.sh" >&2; exit 90; }
echo "rig: booting $(basename "$kernel") under virtme-ng (TCG) for $hosts simulated hosts"
start=$(date +%s)
# Output goes through a pipe: vng writing straight to a file loses lines.
set +e
pm_opts=(--append 'memmap=1G!4G')
if [[ -n $nvdimm ]]; then
  mkdir -p "$nvdimm"
  qemu="-machine nvdimm=on -m 3G,slots=4,maxmem=8G"
  for i in 1 2 3; do
    [[ -f $nvdimm/nvdimm$i.img ]] || truncate -s 256M "$nvdimm/nvdimm$i.img"
    qemu+=" -object memory-backend-file,id=nv$i,share=on,mem-path=$nvdimm/nvdimm$i.img,size=256M"
    qemu+=" -device nvdimm,id=nvdimm$i,memdev=nv$i"
  done
  pm_opts=(--qemu-opts="$qemu" --rwdir="$nvdimm")
fi
vng --disable-kvm --run "$kernel" --cpus 2 --memory 3G "${pm_opts[@]}" \
  --rwdir="$out" --exec "bash $out/run.sh" 2>&1 | cat
vng_rc=${PIPESTATUS[0]}
set -e
echo "rig: VM ran $(($(date +%s) - start)) s"
if [[ -d $out/logs ]]; then
  rm -rf target/rig-logs && cp -r "$out/logs" target/rig-logs &&
    echo "rig: a test's logs are in target/rig-logs"
fi
if [[ ! -f $out/rc ]]; then
  echo "rig: the VM did not run the command (vng exit $vng_rc): the RDMA rig could not start" >&2
  exit 90
fi
exit "$(cat "$out/rc")"
