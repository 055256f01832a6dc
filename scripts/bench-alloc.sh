#!/usr/bin/env bash
# The allocation benchmark on the rig: ZooKeeper, the monitor (host 4) and two backup
# nodes (hosts 2, 3) as their own processes; `pmgas-bench alloc-page` is the primary on
# host 1 and measures replicated page allocations at each concurrency level, next to a
# plain ZooKeeper create of the same payload on the same server, from the same machine.
#
# PMGAS_MAX_BATCH=1 turns the monitor's group commit off (one ZooKeeper write per mapping).
#
# Usage (outside the rig it re-runs itself inside):
#   scripts/bench-alloc.sh [--concurrency 1,4,16] [--count N] [--backups B] [--json]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bench_args=("$@")

if [[ ${PMGAS_RIG:-} != 1 ]]; then
  cargo build --release --bins --quiet
  exec bash scripts/rig.sh --hosts 4 -- bash "$root/scripts/bench-alloc.sh" "${bench_args[@]}"
fi

bin=${PMGAS_BIN:-$root/target/release}
read -r h1 h2 h3 h4 _ <<<"$PMGAS_HOSTS"
work=$(mktemp -d /tmp/pmgas-bench-alloc.XXXXXX)
cluster=b$$
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  bash "$root/scripts/zookeeper.sh" stop --dir "$work/zk" >/dev/null 2>&1 || true
  rm -f /dev/shm/pmgas-"$cluster"-node*
}
trap cleanup EXIT
wait_for() { # file pattern
  for _ in $(seq 1 600); do grep -q "$2" "$1" && return 0; sleep 0.1; done
  echo "bench-alloc: no '$2' in $1:"; cat "$1"; return 1
}

zk=$(bash "$root/scripts/zookeeper.sh" start --port 2181 --dir "$work/zk")
RUST_LOG=${RUST_LOG:-pmgas_monitor=info} "$bin/pmgas-monitor" serve --zk "$zk" --cluster "$cluster" --cluster-id 7 --page-size 65536 \
  --listen "$h4:7000" --max-batch "${PMGAS_MAX_BATCH:-18446744073709551615}" >"$work/monitor.log" 2>&1 &
pids+=($!)
wait_for "$work/monitor.log" "MONITOR READY"
i=1
for h in $h2 $h3; do
  i=$((i + 1))
  "$bin/pmgas-node" serve --pm "/dev/shm/pmgas-$cluster-node$i" --size-bytes $((256 << 20)) \
    --cluster-id 7 --node-id $i --page-size 65536 --zk "$zk" --cluster "$cluster" --bind "$h" \
    >"$work/node$i.log" 2>&1 &
  pids+=($!)
  wait_for "$work/node$i.log" "NODE READY"
done
echo "bench-alloc: ZooKeeper $zk (in this machine), monitor on $h4, backups on $h2 $h3, primary on $h1"
cpu() { awk '/^cpu /{print $2+$3, $4, $5+$6, $7+$8}' /proc/stat; } # user sys idle+iowait irq+softirq
procs() { for p in "${pids[@]}" $(cat "$work"/zk/server*/pid 2>/dev/null); do awk '{printf "%s ", $14+$15}' "/proc/$p/stat" 2>/dev/null; done; }
before=$(cpu) pbefore=$(procs)
"$bin/pmgas-bench" alloc-page --zk "$zk" --cluster "$cluster" --bind "$h1" --node-id 1 \
  --pm "/dev/shm/pmgas-$cluster-node1" "${bench_args[@]}"
after=$(cpu) pafter=$(procs)
python3 - "$before" "$after" "$pbefore" "$pafter" <<'PY'
import sys
b, a = [list(map(int, x.split())) for x in sys.argv[1:3]]
d = [y - x for x, y in zip(b, a)]
t = sum(d) or 1
print("bench-alloc: guest CPU during the run: user %.0f%%, system %.0f%%, idle %.0f%%, irq %.0f%%" % tuple(100 * x / t for x in d))
pb, pa = [list(map(int, x.split())) for x in sys.argv[3:5]]
names = ["monitor", "node2", "node3", "zookeeper"]
print("bench-alloc: CPU ticks per process:", ", ".join(f"{n} {y - x}" for n, x, y in zip(names, pb, pa)))
PY
echo "bench-alloc: the monitor's group commits during the run:"
grep "group commits" "$work/monitor.log" | sed 's/^.*group commits/  /' || true
