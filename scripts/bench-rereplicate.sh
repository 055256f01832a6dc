#!/usr/bin/env bash
# Re-replication's benchmark (#13) in one rig boot: ZooKeeper and one monitor on host 4,
# data nodes 1-3 on hosts 1-3 (node 1 pinned to CPU 1). N pages of S bytes, primaries on
# node 1, one backup each: those whose backup is node 2 are the ones node 2's loss leaves
# short. A foreground writer (`pmgas-bench rereplicate`, host 4, CPU 0) writes 64 B
# durably, again and again, to a page on nodes 1 and 3, all along. Node 2 is killed
# (kill -9); the monitor declares it dead and copies every short page from node 1 to
# node 3; its REREPLICATED line gives the bytes and the time. Then, in the same boot,
# ib_read_bw between node 1's and node 3's devices (server on host 1, CPU 1; client on
# host 3), the same direction as the copy. Prints:
#
#   restore: pages, bytes, ms, MB/s; ib_read_bw MB/s; ratio     (target >= 0.8)
#   foreground write p50/p99 before, during and after the copy  (during / before: the cost)
#
# Usage: scripts/bench-rereplicate.sh [--pages N] [--page-size S] [--concurrency C] [--mb-s M]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
pages=32
page_size=$((256 << 10))
concurrency=4
mb_s=0
args=("$@")
while (($#)); do
  case $1 in
    --pages) pages=$2; shift 2 ;;
    --page-size) page_size=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --mb-s) mb_s=$2; shift 2 ;;
    *) echo "usage: $0 [--pages N] [--page-size S] [--concurrency C] [--mb-s M]" >&2; exit 2 ;;
  esac
done
if [[ ${PMGAS_RIG:-} != 1 ]]; then
  bash scripts/install-deps.sh
  cargo build --release --bins --quiet
  exec bash scripts/rig.sh --hosts 4 -- bash "$root/scripts/bench-rereplicate.sh" "${args[@]}"
fi

bin=${PMGAS_BIN:-$root/target/release}
read -r h1 h2 h3 h4 _ <<<"$PMGAS_HOSTS"
read -r d1 _ d3 _ _ <<<"$PMGAS_DEVICES"
work=$(mktemp -d /tmp/pmgas-bench-rerep.XXXXXX)
cluster=r$$
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  bash "$root/scripts/zookeeper.sh" stop --dir "$work/zk" >/dev/null 2>&1 || true
  rm -f /dev/shm/pmgas-"$cluster"-node*
}
trap cleanup EXIT
fail() { echo "bench-rereplicate: FAILED: $*"; exit 1; }
wait_line() {
  local until=$((SECONDS + $3))
  while ((SECONDS < until)); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "bench-rereplicate: no '$2' in $1:"; tail -n 20 "$1"; return 1
}

zk=$(bash "$root/scripts/zookeeper.sh" start --port 2181 --dir "$work/zk")
"$bin/pmgas-monitor" serve --zk "$zk" --cluster "$cluster" --cluster-id 7 --page-size "$page_size" \
  --listen "$h4:7000" --session-timeout-ms 2000 --node-timeout-ms 2000 --heartbeat-timeout-ms 1000 \
  --rereplicate-concurrency "$concurrency" --rereplicate-mb-s "$mb_s" >"$work/monitor.log" 2>&1 &
pids+=($!)
wait_line "$work/monitor.log" "MONITOR READY" 120
pool=$(((pages + 8) * page_size * 2 + (8 << 20)))
i=0
declare -A npid
for h in $h1 $h2 $h3; do
  i=$((i + 1))
  pin=()
  ((i == 1)) && pin=(taskset -c 1)
  "${pin[@]}" "$bin/pmgas-node" serve --pm "/dev/shm/pmgas-$cluster-node$i" --size-bytes "$pool" \
    --cluster-id 7 --node-id $i --page-size "$page_size" --zk "$zk" --cluster "$cluster" --bind "$h" >"$work/node$i.log" 2>&1 &
  npid[$i]=$!
  pids+=($!)
done
for i in 1 2 3; do wait_line "$work/node$i.log" "NODE READY" 120; done
cli() { "$bin/pmgas" --zk "$zk" --cluster "$cluster" --bind "$h4" "$@"; }

# N pages on node 1 with one backup each, and the foreground page on nodes 1 and 3.
fg=
short=0
for _ in $(seq 1 "$pages"); do
  m=$(cli alloc-page --backups 1 --on 1)
  [[ $m == *node2:* ]] && short=$((short + 1))
  [[ -z $fg && $m == *node3:* ]] && fg=$(sed -n 's/.*page_id=\([0-9]*\).*/\1/p' <<<"$m")
done
[[ -n $fg ]] || fail "no page on nodes 1 and 3 for the foreground writer"
echo "bench-rereplicate: $pages pages of $page_size B on node 1, $short with their backup on node 2; foreground writes to page $fg (nodes 1 and 3)"

taskset -c 0 "$bin/pmgas-bench" rereplicate --zk "$zk" --cluster "$cluster" --bind "$h4" --page-id "$fg" \
  --copy-start "$work/copy-start" --copy-end "$work/copy-end" --stop "$work/stop" --ready "$work/ready" \
  >"$work/fg.jsonl" 2>"$work/fg.err" &
fgpid=$!
for _ in $(seq 1 600); do [[ -f $work/ready ]] && break; sleep 0.1; done
[[ -f $work/ready ]] || fail "the foreground writer did not start: $(cat "$work/fg.err")"
sleep 3
kill -9 "${npid[2]}"
wait_line "$work/monitor.log" "^NODE DEAD node=2" 60 || fail "node 2 was not declared dead"
touch "$work/copy-start"
wait_line "$work/monitor.log" "^REREPLICATED .*waiting_for_a_node=0" 600 || fail "the copy did not finish"
touch "$work/copy-end"
sleep 3
touch "$work/stop"
wait "$fgpid" || fail "the foreground writer failed: $(cat "$work/fg.err")"
grep "^REREPLICATE" "$work/monitor.log" | tail -n 3
done_line=$(grep "^REREPLICATED" "$work/monitor.log" | tail -n 1)
bytes=$(sed -n 's/.* bytes=\([0-9]*\).*/\1/p' <<<"$done_line")
ms=$(sed -n 's/.* ms=\([0-9]*\).*/\1/p' <<<"$done_line")
copied=$(sed -n 's/^REREPLICATED pages=\([0-9]*\).*/\1/p' <<<"$done_line")

gid1=$("$bin/pmgas-bench" devices --device "$d1" --gid-for "$h1")
gid3=$("$bin/pmgas-bench" devices --device "$d3" --gid-for "$h3")
port=18800
bw() { # bw SIZE: ib_read_bw's average MB/s, client on h3 reading node 1's device
  port=$((port + 1))
  # 16 reads outstanding, as bench-data.sh (rxe fails runs with perftest's default 128).
  taskset -c 1 ib_read_bw -d "$d1" -x "$gid1" -s "$1" -n 2000 -o 16 -F -p "$port" >"$work/srv.log" 2>&1 &
  local srv=$!
  for _ in $(seq 1 100); do ss -ltn 2>/dev/null | grep -q ":$port " && break; sleep 0.1; done
  ib_read_bw -d "$d3" -x "$gid3" -s "$1" -n 2000 -o 16 -F -p "$port" "$h1" >"$work/bw.log" 2>&1 ||
    { cat "$work/bw.log" >&2; kill "$srv" 2>/dev/null; return 1; }
  wait "$srv" || true
  # #bytes #iterations BW peak[MB/sec] BW average[MB/sec] MsgRate[Mpps]
  awk -v s="$1" '$1 == s && NF >= 5 {print $4; exit}' "$work/bw.log"
}
bw4k=$(bw 4096) || fail "ib_read_bw 4 KiB"
bw64k=$(bw 65536) || fail "ib_read_bw 64 KiB"
python3 - "$work/fg.jsonl" "$copied" "$bytes" "$ms" "$bw4k" "$bw64k" "$short" <<'PY'
import json, sys
fg = {r["op"]: r for r in map(json.loads, open(sys.argv[1]))}
pages, nbytes, ms = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
bw4k, bw64k, short = float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
rate = nbytes / max(ms, 1) / 1e3  # MB/s
print(f"restore: {pages} pages ({short} short after the loss), {nbytes} B in {ms} ms: {rate:.2f} MB/s")
print(f"ib_read_bw (node 1's device -> node 3's, same boot): 4 KiB {bw4k:.1f} MB/s, 64 KiB {bw64k:.1f} MB/s")
print(f"ratio restore / ib_read_bw 64 KiB: {rate / bw64k:.3f} (target >= 0.8); / 4 KiB: {rate / bw4k:.3f}")
for name in ("write before", "write during copy", "write after"):
    r = fg.get(name)
    if r:
        print(f"{name:<18}: p50 {r['p50_ns'] / 1e3:9.1f} us  p99 {r['p99_ns'] / 1e3:9.1f} us  ({r['iters']} writes)")
b, d = fg.get("write before"), fg.get("write during copy")
if b and d:
    print(f"foreground write p99 during the copy / before: {d['p99_ns'] / b['p99_ns']:.2f}x (p50 {d['p50_ns'] / b['p50_ns']:.2f}x)")
PY
