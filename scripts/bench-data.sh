#!/usr/bin/env bash
# The data path beside perftest, in one rig boot, on the same devices and CPUs: a cluster
# (ZooKeeper, one monitor on host 4, data nodes on hosts 1-3; the primary, node 1, pinned
# to CPU 1) and `pmgas-bench data` on host 4 pinned to CPU 0; then perftest between the
# same two devices (server on host 1, CPU 1; client on host 4, CPU 0): ib_read_lat,
# ib_write_lat, ib_send_lat (8 B and 4 KiB), ib_atomic_lat (CAS), ib_read_bw (4 KiB, 16
# outstanding); and librpma 1.2's write + flush (bench/c/rpma_write_lat.c, the same
# hosts and CPUs; its flush is a READ after the WRITE, APM: not durability on rxe).
# Then the coherent block cache (`pmgas-bench cache`, #12) in the same boot: hits next to a
# DRAM copy, misses next to ib_read_lat, writes with 0-2 other sharers (on hosts 2 and 3)
# next to a round trip (2 x ib_send_lat), YCSB-B with and without the cache.
# Prints every measurement and the ratios the issues' targets name:
#
#   read p50 / ib_read_lat typical                (target <= 1.05)
#   CAS, 0 backups / ib_atomic_lat                (target <= 1.05)
#   durable write, 0 backups / 2 x ib_send_lat    (target <= 1.1: one SEND round trip)
#   write with 1 or 2 backups / with 0            (target <= 2)
#   batched 4 KiB reads ops/s / ib_read_bw msg/s  (target >= 0.8)
#   cache miss / ib_read_lat, 64 B and 4 KiB       (target <= 1.1)
#   write with k sharers - with 0 / a round trip  (target <= 1, k = 1, 2)
#   YCSB-B ops/s with the cache / without          (target >= 5)
#
# Latencies on the emulated rig are a TCG guest's; the ratios are what this is for.
# Usage: scripts/bench-data.sh [--iters N] [--json-out FILE] [--cache-only]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
iters=2000
out_json=
cache_only=
args=("$@")
while (($#)); do
  case $1 in
    --iters) iters=$2; shift 2 ;;
    --json-out) out_json=$2; shift 2 ;;
    --cache-only) cache_only=1; shift ;;
    *) echo "usage: $0 [--iters N] [--json-out FILE] [--cache-only]" >&2; exit 2 ;;
  esac
done
if [[ ${PMGAS_RIG:-} != 1 ]]; then
  bash scripts/install-deps.sh
  cargo build --release --bins --quiet
  gcc -O2 -Wall -o target/release/rpma-write-lat bench/c/rpma_write_lat.c -lrpma -libverbs
  exec bash scripts/rig.sh --hosts 4 -- bash "$root/scripts/bench-data.sh" "${args[@]}"
fi

bin=${PMGAS_BIN:-$root/target/release}
read -r h1 h2 h3 h4 _ <<<"$PMGAS_HOSTS"
read -r d1 _ _ d4 _ <<<"$PMGAS_DEVICES"
work=$(mktemp -d /tmp/pmgas-bench-data.XXXXXX)
cluster=b$$
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  bash "$root/scripts/zookeeper.sh" stop --dir "$work/zk" >/dev/null 2>&1 || true
  rm -f /dev/shm/pmgas-"$cluster"-node*
}
trap cleanup EXIT
wait_line() {
  local until=$((SECONDS + $3))
  while ((SECONDS < until)); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "bench-data: no '$2' in $1:"; tail -n 20 "$1"; return 1
}

zk=$(bash "$root/scripts/zookeeper.sh" start --port 2181 --dir "$work/zk")
"$bin/pmgas-monitor" serve --zk "$zk" --cluster "$cluster" --cluster-id 7 --page-size 65536 \
  --listen "$h4:7000" --session-timeout-ms 2000 >"$work/monitor.log" 2>&1 &
pids+=($!)
wait_line "$work/monitor.log" "MONITOR READY" 120
i=0
for h in $h1 $h2 $h3; do
  i=$((i + 1))
  pin=()
  ((i == 1)) && pin=(taskset -c 1)
  "${pin[@]}" "$bin/pmgas-node" serve --pm "/dev/shm/pmgas-$cluster-node$i" --size-bytes $((16 << 20)) \
    --cluster-id 7 --node-id $i --page-size 65536 --zk "$zk" --cluster "$cluster" --bind "$h" >"$work/node$i.log" 2>&1 &
  pids+=($!)
done
for i in 1 2 3; do wait_line "$work/node$i.log" "NODE READY" 120; done

echo "bench-data: pmgas client on $h4 ($d4, cpu 0) -> primary node 1 on $h1 ($d1, cpu 1); backups on $h2 $h3"
: >"$work/pmgas.jsonl"
if [[ -z $cache_only ]]; then
  "$bin/pmgas-bench" data --zk "$zk" --cluster "$cluster" --bind "$h4" --primary 1 --cpu 0 \
    --iters "$iters" --json >"$work/pmgas.jsonl"
fi
echo "bench-data: the block cache: client on $h4 (cpu 0), other sharers on $h2 $h3"
"$bin/pmgas-bench" cache --zk "$zk" --cluster "$cluster" --bind "$h4" --sharer-binds "$h2,$h3" \
  --primary 1 --cpu 0 --iters "$iters" --json >>"$work/pmgas.jsonl"
# The same YCSB-B over 1,000 records: a working set that a client rereads within a lease.
"$bin/pmgas-bench" cache --zk "$zk" --cluster "$cluster" --bind "$h4" --primary 1 --cpu 0 \
  --ops ycsb --ycsb-records 1000 --ycsb-ops 10000 --ycsb-warmup 5000 --json >>"$work/pmgas.jsonl"
cat "$work/pmgas.jsonl"
[[ -n $out_json ]] && cp "$work/pmgas.jsonl" "$out_json"

gid1=$("$bin/pmgas-bench" devices --device "$d1" --gid-for "$h1")
gid4=$("$bin/pmgas-bench" devices --device "$d4" --gid-for "$h4")
port=18700
wait_listen() {
  for _ in $(seq 1 100); do ss -ltn 2>/dev/null | grep -q ":$1 " && return 0; sleep 0.1; done
  return 1
}
# perftest TOOL SIZE EXTRA...: the client's report lines (server on h1/cpu 1, client h4/cpu 0).
perftest() {
  local tool=$1 size=$2; shift 2
  port=$((port + 1))
  taskset -c 1 "$tool" -d "$d1" -x "$gid1" -s "$size" -n "$iters" -F -p "$port" "$@" >"$work/srv.log" 2>&1 &
  local srv=$!
  wait_listen "$port" || { echo "bench-data: $tool server did not listen" >&2; kill $srv; return 1; }
  taskset -c 0 "$tool" -d "$d4" -x "$gid4" -s "$size" -n "$iters" -F -p "$port" "$@" "$h1" >"$work/cli.log" 2>&1 ||
    { cat "$work/cli.log" >&2; wait $srv || true; return 1; }
  wait $srv || true
  cat "$work/cli.log"
}
: >"$work/perftest.txt"
# lat TOOL SIZE: "tool size typical_us p99_us"; perftest now and then prints "inf" for a
# latency, and that run is made again (up to 3 times).
lat() {
  local line
  for _ in 1 2 3; do
    # perftest prints: #bytes #iterations t_min t_max t_typical t_avg t_stdev p99 p99.9 (usec)
    line=$(perftest "$@" | awk -v t="$1" -v s="$2" '$1 == s && NF >= 9 {print t, s, $5, $8; exit}')
    [[ $line =~ ^[a-z_]+\ [0-9]+\ [0-9.]+\ [0-9.]+$ ]] && break
    echo "bench-data: $1 $2 printed '$line'; running it again" >&2
  done
  echo "$line"
}
for size in 8 4096; do
  for tool in ib_read_lat ib_write_lat ib_send_lat; do
    lat "$tool" "$size" >>"$work/perftest.txt"
  done
done
lat ib_read_lat 64 >>"$work/perftest.txt"
lat ib_atomic_lat 8 -A CMP_AND_SWAP >>"$work/perftest.txt"
# librpma write + flush: server on h1/cpu 1, client on h4/cpu 0, as perftest. librpma's
# client cannot bind a source address, and the rig routes by source (a packet from no
# simulated host to a local address goes through lo, which has no RDMA device): while it
# runs, locally generated packets to h1 with no host's source take h4's veth and device.
taskset -c 1 "$bin/rpma-write-lat" server "$h1" 18690 >"$work/rpma-srv.log" 2>&1 &
rpma_srv=$!
pids+=($rpma_srv)
wait_line "$work/rpma-srv.log" "RPMA SERVER READY" 30
ip rule add pref 900 iif lo to "$h1" lookup $((100 + ${h4##*.}))
for size in 8 4096; do
  taskset -c 0 "$bin/rpma-write-lat" client "$h1" 18690 "$size" "$iters" 200 >"$work/rpma-cli.log" 2>&1 ||
    { echo "bench-data: librpma client failed:"; cat "$work/rpma-cli.log"; }
  awk -v s="$size" '/^RPMA op=write_flush/ {
      for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      print "rpma_write_flush", s, v["p50_ns"] / 1000, v["p99_ns"] / 1000 }' "$work/rpma-cli.log" >>"$work/perftest.txt"
done
ip rule del pref 900
kill "$rpma_srv" 2>/dev/null || true
# ib_read_bw prints: #bytes #iterations BW_peak BW_average MsgRate[Mpps]
perftest ib_read_bw 4096 -o 16 | awk '$1 == 4096 && NF >= 5 {print "ib_read_bw", 4096, $5 * 1e6, 0; exit}' >>"$work/perftest.txt"
echo "bench-data: perftest and librpma (tool bytes typical_us p99_us, librpma: p50; ib_read_bw: msgs/s)"
cat "$work/perftest.txt"

python3 - "$work/pmgas.jsonl" "$work/perftest.txt" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
pt = {}
for line in open(sys.argv[2]):
    f = line.split()
    if len(f) != 4:
        continue
    t, s, typ, p99 = f
    pt[(t, int(s))] = (float(typ), float(p99))
def p(op, size, backups, **kw):
    for r in rows:
        if r["op"] == op and r["size_bytes"] == size and r["backups"] == backups and all(r.get(k) == v for k, v in kw.items()):
            return r
    return None
def us(r):
    return r["p50_ns"] / 1000
print()
print(f"{'measure':<44} {'pmgas p50':>10} {'peer':>10} {'ratio':>7}  target")
def line(name, mine, peer, target, fmt="us"):
    if mine is None or peer is None or peer in (0, float("inf")):
        print(f"{name:<44} {'-':>10} {'-':>10} {'-':>7}  {target}")
        return
    ratio = mine / peer
    print(f"{name:<44} {mine:>10.2f} {peer:>10.2f} {ratio:>7.3f}  {target}")
for size in (8, 4096):
    r = p("read", size, 2)
    rl = pt.get(("ib_read_lat", size))
    line(f"read {size} B vs ib_read_lat (us)", r and us(r), rl and rl[0], "<= 1.05")
r = p("cas", 8, 0)
al = pt.get(("ib_atomic_lat", 8))
line("CAS, 0 backups vs ib_atomic_lat (us)", r and us(r), al and al[0], "<= 1.05")
for size in (8, 4096):
    r = p("write", size, 0)
    sl = pt.get(("ib_send_lat", size))
    line(f"write {size} B, 0 backups vs 2 x ib_send_lat (us)", r and us(r), sl and 2 * sl[0], "<= 1.1")
    wl = pt.get(("ib_write_lat", size))
    line(f"  (ib_write_lat {size} B, half round trip, for reference)", r and us(r), wl and wl[0], "-")
    rp = pt.get(("rpma_write_flush", size))
    line(f"  (librpma write+flush {size} B, APM: not durable on rxe)", r and us(r), rp and rp[0], "-")
    for b in (1, 2):
        rb = p("write", size, b)
        line(f"write {size} B, {b} backups vs 0 backups (us)", rb and us(rb), r and us(r), "<= 2")
r = p("cas", 8, 2)
r0 = p("cas", 8, 0)
line("CAS, 2 backups vs 0 backups (us)", r and us(r), r0 and us(r0), "<= 2")
r = p("batch-read", 4096, 2)
bw = pt.get(("ib_read_bw", 4096))
if r and bw:
    print(f"{'batched 4 KiB reads, 16 in flight (ops/s)':<44} {r['ops_per_s']:>10.0f} {bw[0]:>10.0f} {r['ops_per_s'] / bw[0]:>7.3f}  >= 0.8")
for b in (0, 2):
    r = p("batch-write", 4096, b)
    if r:
        print(f"{f'batched 4 KiB writes, {b} backups (ops/s)':<44} {r['ops_per_s']:>10.0f}")
print()
print("the coherent block cache (pmgas-bench cache)")
for size in (64, 4096):
    r = p("hit", size, 0)
    d = p("dram-copy", size, 0)
    line(f"cache hit {size} B vs a DRAM copy in-process (us)", r and us(r), d and us(d), "-")
for size in (64, 4096):
    r = p("miss", size, 0)
    rl = pt.get(("ib_read_lat", size))
    line(f"cache miss {size} B vs ib_read_lat (us)", r and us(r), rl and rl[0], "<= 1.1")
    u = p("read-uncached", size, 0)
    line(f"  (uncached read {size} B vs ib_read_lat)", u and us(u), rl and rl[0], "-")
w0 = p("write", 8, 0, sharers=0)
rtt = pt.get(("ib_send_lat", 8))
for k in (1, 2):
    wk = p("write", 8, 0, sharers=k)
    line(f"write 8 B, {k} sharer(s): extra over 0 vs a round trip (us)", wk and w0 and us(wk) - us(w0), rtt and 2 * rtt[0], "<= 1")
    line(f"  (write 8 B, {k} sharer(s) vs 0 sharers)", wk and us(wk), w0 and us(w0), "-")
for n in sorted({r["records"] for r in rows if r["op"] == "ycsb-b"}, reverse=True):
    yu = [r for r in rows if r["op"] == "ycsb-b" and r["records"] == n and not r["cached"]]
    yc = [r for r in rows if r["op"] == "ycsb-b" and r["records"] == n and r["cached"]]
    if not (yu and yc):
        continue
    yu, yc = yu[0], yc[0]
    target = ">= 5" if n == 100000 else "-"
    print(f"{f'YCSB-B, {n} records, ops/s: cache vs none':<44} {yc['ops_per_s']:>10.0f} {yu['ops_per_s']:>10.0f} {yc['ops_per_s'] / yu['ops_per_s']:>7.3f}  {target}")
    print(f"{f'  p99 (us): cache vs none':<44} {yc['p99_ns'] / 1000:>10.2f} {yu['p99_ns'] / 1000:>10.2f} {yc['p99_ns'] / yu['p99_ns']:>7.3f}  -")
    print(f"{f'  p50 (us): cache vs none':<44} {yc['p50_ns'] / 1000:>10.2f} {yu['p50_ns'] / 1000:>10.2f} {yc['p50_ns'] / yu['p50_ns']:>7.3f}  -")
    print(f"  cache hits {yc['hits']} misses {yc['misses']} (timed part, 4 clients)")
print("persist_mode: cpu (every node's CPU stores and writes back each byte before it acknowledges)")
print("librpma write+flush: RPMA_FLUSH_TYPE_VISIBILITY (a READ after the WRITE); on rxe the responder's CPU copies the bytes, so it is not durability, printed for reference")
PY
