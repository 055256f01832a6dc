#!/usr/bin/env bash
# Recovery benchmark (`pmgas-bench recovery`) on the rig: the monitor's GAT reload time
# for 10^4…10^6 mappings, then takeover after kill -9 of the active monitor (three
# monitors, three nodes) and each node's reconciliation time. ZooKeeper: standalone,
# tickTime 200 ms, in the same guest.
#
# Usage: scripts/bench-recovery.sh [--mappings LIST] [--trials N] [--session-timeout-ms MS]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
mappings=10000,100000,1000000
trials=10
session=600
args=("$@")
while (($#)); do
  case $1 in
    --mappings) mappings=$2; shift 2 ;;
    --trials) trials=$2; shift 2 ;;
    --session-timeout-ms) session=$2; shift 2 ;;
    *) echo "usage: $0 [--mappings LIST] [--trials N] [--session-timeout-ms MS]" >&2; exit 2 ;;
  esac
done
if [[ ${PMGAS_RIG:-} != 1 ]]; then
  cargo build --release --bins --quiet
  exec bash scripts/rig.sh --hosts 4 -- bash "$root/scripts/bench-recovery.sh" "${args[@]}"
fi
bin=${PMGAS_BIN:-$root/target/release}
read -r h1 h2 h3 h4 _ <<<"$PMGAS_HOSTS"
work=$(mktemp -d /tmp/pmgas-bench-recovery.XXXXXX)
trap 'bash "$root/scripts/zookeeper.sh" stop --dir "$work/zk" >/dev/null 2>&1 || true' EXIT
zk=$(bash "$root/scripts/zookeeper.sh" start --port 2181 --dir "$work/zk")
echo "bench-recovery: ZooKeeper at $zk (tickTime 200 ms); monitors on $h4; nodes on $h1 $h2 $h3"
"$bin/pmgas-bench" recovery --zk "$zk" --mappings "$mappings" --takeover-trials "$trials" \
  --session-timeout-ms "$session" --listen-ip "$h4" --node-hosts "$h1,$h2,$h3"
