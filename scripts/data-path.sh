#!/usr/bin/env bash
# The data path on the rig (#11): ZooKeeper, three monitors on host 4 (one active), three
# data nodes on hosts 1-3 (PM pools on tmpfs), and `pmgas` client processes without PM.
#
#   1. Bad input against live processes: reads and writes past the page, an unaligned
#      CAS, an unknown page through the client; garbage, truncated, out-of-bounds and
#      misdirected requests sent straight to the data ports (pmgas-bench data-probe);
#      each must fail with a clear error and change nothing.
#   C. The coherent block cache (#12): every register client caches blocks (pmgas --cache)
#      in C1 (no faults, all registers in one block), C2 (read-mostly: 16 registers in 16
#      blocks, 95 % reads; client p2 ignores invalidations, PMGAS_FAULT_CACHE_DEAF, so only
#      its leases keep it coherent; the counters must show more hits than misses), C4 (a
#      client stopped by SIGSTOP mid-run, continued later) and phases 2 and 3 below (a
#      client SIGKILLed at its crash point, the primary killed). C3: a deaf sharer caches a
#      register and is stopped; a write is acknowledged elsewhere; continued, the sharer
#      must read the new value, never its block.
#   2. Registers, a client killed: two client processes (hosts 4 and 1), two threads each,
#      on 8 registers of a page with 2 backups, and a third (host 2) that kills itself at
#      crash point client.update-sent (an update applied, its answer never seen); every
#      operation recorded in one JSON-lines history, checked for linearizability
#      (pmgas-bench check-history); then the page's three replicas compared byte for byte.
#   3. Registers, the primary killed: the same workload again; once the history holds
#      --ops records, node 1 (the primary) is armed to kill itself at crash point
#      node.data-replicating (an update sent to the backups, not yet acknowledged nor
#      stored on the primary). The monitor declares it dead (4 s node timeout), its backup
#      is promoted and first copies the page to the other backup, the clients go on; the
#      history must still be linearizable (operations whose answer was lost are "unknown":
#      maybe applied) and the two surviving replicas identical.
#   4. Registers, a backup killed: node 3 (now the page's only backup) kills itself at
#      node.data-backup-stored (bytes stored, no ack sent); updates wait until it is
#      declared dead, then go on with node 2 alone; the history must be linearizable.
#      Then node 1 comes back: it rejoins, is in no mapping of the page and refuses to
#      order its updates (its stale replica is never served); its reconciliation frees
#      the replicas its declaration as dead dropped from the GAT.
#   5. Freeing pages (nodes 1 and 2): pmgas-bench data-probe --freed frees a page that
#      another handle has cached, checks that the freed id is refused everywhere, that the
#      page taking its place reads zeros, and that the stale handle's reads, writes, CAS and
#      batched read get PageFreed and never touch the new page. Then the active monitor is
#      armed to die at monitor.tombstone-written (the tombstone stored, no replica told):
#      `pmgas free-page` must still succeed (against the next monitor), and both replicas
#      must go FREE through the nodes' reconciliation with the new monitor. The register
#      workload runs meanwhile (on the registers' page, node 2 its only replica now): its
#      history across the monitor's death must be linearizable.
#   7. Re-replication (#13): node 3 comes back; a register page and four pages with one
#      backup each, primaries on node 2, hold known bytes; then node 4 joins empty (on
#      host 4), armed to die at its first stored copy chunk (node.rereplicate-target).
#      The register workload runs on one of the pages while node 2 is killed (kill -9).
#      Once it is declared dead, the monitor copies every page that lost its replica:
#      first to node 4 (the emptiest), which dies mid-copy and must hold nothing
#      committed, then to the node among 1 and 3 that holds none (REREPLICATED). The
#      history must be linearizable and every page must end with two byte-identical
#      replicas (gat-dump, page-digest). Then node 1, an original survivor, is killed too:
#      every page (the registers' final values, the known bytes) must still read the same,
#      from the new replicas alone. Last, node 2 comes back: it frees its dropped replicas
#      of the phase's pages, and the GAT equals the ARTs of nodes 2 and 3.
#   6. The persistence audit of every node (binaries built with the `persist-audit`
#      feature record every store, write-back and acknowledgement): every acknowledged byte
#      was written back after it was last stored, before the acknowledgement.
#
# Exit status 0 when every check passes. PMGAS_ZK=host:port uses that ZooKeeper.
# Usage (outside the rig it re-runs itself inside): scripts/data-path.sh [--ops N]
set -eEuo pipefail
cd "$(dirname "$0")/.."
root=$PWD
ops=500
args=("$@")
while (($#)); do
  case $1 in
    --ops) ops=$2; shift 2 ;;
    *) echo "usage: $0 [--ops N]" >&2; exit 2 ;;
  esac
done
if [[ ${PMGAS_RIG:-} != 1 ]]; then
  cargo build --release --bins --quiet --features pmgas-node/persist-audit
  exec bash scripts/rig.sh --hosts 4 -- bash "$root/scripts/data-path.sh" "${args[@]}"
fi

bin=${PMGAS_BIN:-$root/target/release}
for b in pmgas pmgas-node pmgas-monitor pmgas-bench; do
  [[ -x $bin/$b ]] || { echo "data-path: no $b in $bin" >&2; exit 1; }
done
read -r h1 h2 h3 h4 _ <<<"$PMGAS_HOSTS"
work=$(mktemp -d /tmp/pmgas-data.XXXXXX)
cluster=d$$
pids=()  # pids[1..3]: the nodes
mpids=() # the monitors
cleanup() {
  # Every background job: a register client waiting for its --until file too.
  for p in "${pids[@]}" "${mpids[@]}" $(jobs -p); do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ -n ${PMGAS_ZK:-} ]] || bash "$root/scripts/zookeeper.sh" stop --dir "$work/zk" >/dev/null 2>&1 || true
  rm -f /dev/shm/pmgas-"$cluster"-node*
}
trap cleanup EXIT
ulimit -c 0
# A failure keeps the processes' logs where the host can read them (the rig's /tmp is the
# VM's own; rig.sh copies PMGAS_RIG_LOGS to target/rig-logs).
fail() {
  echo "data-path: FAILED: $*"
  if [[ -n ${PMGAS_RIG_LOGS:-} ]]; then
    mkdir -p "$PMGAS_RIG_LOGS/data-path" && cp "$work"/*.log "$PMGAS_RIG_LOGS/data-path/" 2>/dev/null || true
  fi
  exit 1
}
trap 'fail "line $LINENO: a command failed"' ERR
# wait_line FILE PATTERN SECONDS: waits until FILE has a line matching PATTERN.
wait_line() {
  local until=$((SECONDS + $3))
  while ((SECONDS < until)); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "data-path: no '$2' in $1 within $3 s:"; tail -n 20 "$1"; return 1
}

if [[ -n ${PMGAS_ZK:-} ]]; then
  zk=$PMGAS_ZK
else
  zk=$(bash "$root/scripts/zookeeper.sh" start --port 2181 --dir "$work/zk")
fi
echo "data-path: ZooKeeper at $zk; monitors on $h4; nodes on $h1 $h2 $h3; clients on $h4 and $h1"
for m in 1 2 3; do
  # Monitor 1 (the active one) dies at its first tombstone once phase 5 arms it.
  env PMGAS_CRASH_AT=monitor.tombstone-written PMGAS_CRASH_ARMED_BY="$work/arm-monitor$m" \
    "$bin/pmgas-monitor" serve --zk "$zk" --cluster "$cluster" --cluster-id 7 --page-size 65536 \
    --listen "$h4:$((6999 + m))" --session-timeout-ms 2000 --node-timeout-ms 4000 \
    --heartbeat-timeout-ms 2000 >"$work/monitor$m.log" 2>&1 &
  mpids+=($!)
  ((m == 1)) && wait_line "$work/monitor1.log" "MONITOR READY" 120
done
start_node() { # start_node I HOST [ENV...]
  local i=$1 h=$2; shift 2
  env PMGAS_PERSIST_AUDIT="$work/audit-node$i.log" "$@" \
    "$bin/pmgas-node" serve --pm "/dev/shm/pmgas-$cluster-node$i" --size-bytes $((8 << 20)) --cluster-id 7 \
    --node-id "$i" --page-size 65536 --zk "$zk" --cluster "$cluster" --bind "$h" >>"$work/node$i.log" 2>&1 &
  pids[$i]=$!
}
# Crash points armed later (PMGAS_CRASH_ARMED_BY): they count only once their phase starts.
start_node 1 "$h1" PMGAS_CRASH_AT=node.data-replicating:60 PMGAS_CRASH_ARMED_BY="$work/arm-node1"
start_node 2 "$h2"
start_node 3 "$h3" PMGAS_CRASH_AT=node.data-backup-stored:60 PMGAS_CRASH_ARMED_BY="$work/arm-node3"
for i in 1 2 3; do wait_line "$work/node$i.log" "NODE READY" 120; done

cli() { "$bin/pmgas" --zk "$zk" --cluster "$cluster" --bind "$h4" "$@"; }
cli nodes
page=$(cli alloc-page --backups 2 --on 1)
echo "data-path: registers on $page"
pid=$(sed -n 's/.*page_id=\([0-9]*\).*/\1/p' <<<"$page")
[[ $(sed -n 's/.*replicas=\(node[0-9]*\).*/\1/p' <<<"$page") == node1 ]] || fail "the page's primary is not node 1: $page"
base=$((pid << 32))

# --- 1. bad input: each must fail, say why, and change nothing.
cli write $((base + 8)) --u64 777
expect_refusal() { # expect_refusal WHAT PATTERN CMD...
  local what=$1 pattern=$2; shift 2
  local out
  if out=$(cli "$@" 2>&1); then fail "$what was accepted: $out"; fi
  grep -qi "$pattern" <<<"$out" || fail "$what: unclear error: $out"
  echo "data-path: refused as expected ($what): $out"
}
expect_refusal "read past the page" "cross" read $((base + 65536 - 4)) --len 8
expect_refusal "write crossing the page end" "cross" write $((base + 65535)) 0102
expect_refusal "unaligned CAS" "aligned" cas $((base + 12)) 0 1
expect_refusal "unaligned FAA" "aligned" faa $((base + 4)) 1
expect_refusal "offset past the page" "offset\|page" read $((base + 70000))
expect_refusal "unknown page" "UnknownPage\|not mapped" read $(((pid + 1000) << 32))
[[ $(cli read $((base + 8)) --u64) == 777 ]] || fail "a refused request changed the register"
# ... and from a peer that bypasses the client's checks: raw requests to the data ports.
"$bin/pmgas-bench" data-probe --zk "$zk" --cluster "$cluster" --bind "$h4" --page-id "$pid" \
  --primary 1 --backup 2 || fail "a data node mishandled a malformed or misdirected request"
cli write $((base + 8)) --u64 0

# The next register phase's pmgas options (--cache), registers options (layout, mix) and
# environment of client p2.
gflags=()
rflags=()
p2env=()
registers() { # registers PHASE [--crash-client | --until FILE]: two client processes, two threads each
  local phase=$1 crash_client=${2:-} n=$ops more=("${rflags[@]}")
  if [[ $crash_client == --until ]]; then
    n=1000000 more+=(--until-file "$3") crash_client=
  fi
  # The checker starts every register at 0: set them so before any client of the phase
  # runs, and start its history empty.
  cli registers --page-id "$pid" --init "${rflags[@]}"
  : >"$work/history$phase.jsonl"
  r3=
  if [[ $crash_client == --crash-client ]]; then
    PMGAS_CRASH_AT=client.update-sent:40 "$bin/pmgas" --zk "$zk" --cluster "$cluster" --bind "$h2" "${gflags[@]}" registers \
      --page-id "$pid" "${rflags[@]}" --threads 1 --ops "$ops" --client p3 --seed "$((phase + 200))" \
      --history "$work/history$phase.jsonl" >"$work/reg$phase-3.log" 2>&1 &
    r3=$!
  fi
  "$bin/pmgas" --zk "$zk" --cluster "$cluster" --bind "$h4" "${gflags[@]}" registers --page-id "$pid" --threads 2 \
    --ops "$n" "${more[@]}" --client "p1" --seed "$phase" --history "$work/history$phase.jsonl" >"$work/reg$phase-1.log" 2>&1 &
  r1=$!
  env "${p2env[@]}" "$bin/pmgas" --zk "$zk" --cluster "$cluster" --bind "$h1" "${gflags[@]}" registers --page-id "$pid" --threads 2 \
    --ops "$n" "${more[@]}" --client "p2" --seed "$((phase + 100))" --history "$work/history$phase.jsonl" >"$work/reg$phase-2.log" 2>&1 &
  r2=$!
}
finish_registers() { # finish_registers PHASE
  local rc=0
  wait "$r1" || rc=1
  wait "$r2" || rc=1
  if [[ -n $r3 ]]; then
    local rc3=0
    wait "$r3" || rc3=$?
    grep -q "CRASH POINT client.update-sent" "$work/reg$1-3.log" && ((rc3 == 137)) ||
      fail "client p3 did not die at its crash point (exit $rc3): $(tail -n 3 "$work/reg$1-3.log")"
    echo "data-path: client p3 killed itself at client.update-sent (its last update applied, answer unseen)"
  fi
  grep -h "REGISTERS DONE\|CACHE STATS" "$work/reg$1-1.log" "$work/reg$1-2.log" || true
  grep -h "outcome unknown\|failed:" "$work/reg$1-1.log" "$work/reg$1-2.log" | head -n 6 || true
  ((rc == 0)) || fail "a register process failed: $(tail -n 5 "$work/reg$1-1.log" "$work/reg$1-2.log")"
  echo "data-path: checking history $1 ($(wc -l <"$work/history$1.jsonl") records)"
  "$bin/pmgas-bench" check-history "$work/history$1.jsonl" || fail "history $1 is not linearizable"
}
digests() { # digests NODE...: the page's digest on each node must be the same
  local i d first=
  for i in "$@"; do
    d=$("$bin/pmgas-node" page-digest --pm "/dev/shm/pmgas-$cluster-node$i" --page-id "$pid")
    echo "data-path: node$i $d"
    [[ $d == *state=Allocated* ]] || fail "node $i holds no allocated replica of page $pid"
    d=${d##*fnv=}
    [[ -z $first || $d == "$first" ]] || fail "replicas of page $pid differ"
    first=$d
  done
}

# wait_records PHASE N: waits until the phase's history holds N records.
wait_records() {
  local h=$work/history$1.jsonl
  for _ in $(seq 1 2400); do
    (($(wc -l <"$h") >= $2)) && return 0
    sleep 0.05
  done
  fail "phase $1 never reached $2 records"
}
# arm_when PHASE NODE: once the phase's history holds --ops records, arms node NODE's
# crash point and waits for the node to die there and to be declared dead.
arm_when() {
  local h=$work/history$1.jsonl n=$2
  wait_records "$1" "$ops"
  touch "$work/arm-node$n"
  echo "data-path: armed node $n's crash point after $(wc -l <"$h") history records"
  wait_line "$work/node$n.log" "CRASH POINT" 120 || fail "node $n never reached its crash point"
  echo "data-path: node $n: $(grep -a "CRASH POINT" "$work/node$n.log")"
  wait_line "$work/monitor1.log" "NODE DEAD node=$n" 60 || fail "node $n was not declared dead"
}

# cache_counter PHASE NAME: the sum of counter NAME over the phase's two register processes.
cache_counter() {
  grep -ho "CACHE STATS.* $2=[0-9]*" "$work/reg$1-1.log" "$work/reg$1-2.log" |
    sed "s/.* $2=//" | awk '{s += $1} END {print s + 0}'
}

# --- C. the coherent block cache (#12): every register client caches from here to phase 3.
gflags=(--cache)
# C1. no faults, all registers in one block (every update invalidates it everywhere).
registers 11
finish_registers 11
# C2. read-mostly: 95 % reads of 16 registers, one per 4 KiB block: hits must dominate.
# Client p2 ignores invalidations (PMGAS_FAULT_CACHE_DEAF): the others' writes of blocks it
# caches wait for its lease, and it must serve nothing after its lease ended.
rflags=(--count 16 --stride 4096 --read-percent 95)
p2env=(PMGAS_FAULT_CACHE_DEAF=1)
registers 12
finish_registers 12
p2env=()
hits=$(cache_counter 12 hits) misses=$(cache_counter 12 misses) inval=$(cache_counter 12 invalidations)
echo "data-path: read-mostly cache counters: hits=$hits misses=$misses invalidations=$inval"
((hits > misses && inval > 0)) || fail "the read-mostly run did not exercise the cache (hits=$hits misses=$misses invalidations=$inval)"
rflags=()
# C3. a hung sharer: a process caches a register and is stopped (SIGSTOP); its
# invalidations are ignored too (PMGAS_FAULT_CACHE_DEAF: only its lease protects the
# block). A write of the register, from a process connected beforehand, is acknowledged
# elsewhere; then the sharer is continued and reads again: it must return the new value,
# never its block. (A primary that did not wait for the sharer's lease, or a sharer that
# served an expired block, would return 1111: the write is quicker than the lease.)
hung_addr=$((base + 8192))
cli write "$hung_addr" --u64 1111
cli write "$hung_addr" --u64 2222 --after-file "$work/go-write" >"$work/hung-writer.log" 2>"$work/hung-writer.err" &
writer=$!
PMGAS_FAULT_CACHE_DEAF=1 "$bin/pmgas" --zk "$zk" --cluster "$cluster" --bind "$h1" --cache read \
  "$hung_addr" --u64 --again-after "$work/go-hung" >"$work/hung.log" 2>"$work/hung.err" &
hung=$!
wait_line "$work/hung.log" "^1111$" 60 || fail "the sharer never cached the register"
kill -STOP "$hung"
touch "$work/go-write"
wait "$writer" || fail "the write beside a hung sharer failed: $(cat "$work/hung-writer.log")"
kill -CONT "$hung"
touch "$work/go-hung"
wait "$hung" || fail "the hung sharer failed: $(cat "$work/hung.log" "$work/hung.err")"
again=$(grep -v "CACHE STATS" "$work/hung.log" | sed -n 2p)
[[ $again == 2222 ]] || fail "the hung sharer returned $again after a write of 2222 was acknowledged elsewhere"
echo "data-path: HUNG SHARER ok: cached 1111, stopped and deaf; the write of 2222 was acknowledged ($(cat "$work/hung-writer.log")); continued, it read 2222 ($(grep "CACHE STATS" "$work/hung.log"))"
# C4. a sharer hung by SIGSTOP under the register workload: the others go on (writers wait
# at most its lease), and once continued it serves nothing it cached before.
registers 13
wait_records 13 "$ops"
kill -STOP "$r2"
at=$(wc -l <"$work/history13.jsonl")
wait_records 13 $((at + 200))
echo "data-path: client p2 stopped (SIGSTOP) at $at records; the others went on to $(wc -l <"$work/history13.jsonl")"
kill -CONT "$r2"
finish_registers 13

# --- 2. registers, a client killed at its crash point (caching: a sharer killed by SIGKILL).
registers 1 --crash-client
finish_registers 1
digests 1 2 3

# --- 3. registers, the primary killed at node.data-replicating (caching).
registers 2
arm_when 2 1
finish_registers 2
digests 2 3
gflags=()

# --- 4. registers, the (only) backup killed at node.data-backup-stored.
registers 3
arm_when 3 3
finish_registers 3
digests 2

# --- 4b. node 1 comes back (its pool holds its old, stale replica of the page): it rejoins,
# but no longer appears in the page's mapping and refuses to order the page's updates.
mv "$work/node1.log" "$work/node1-first.log"
start_node 1 "$h1"
wait_line "$work/node1.log" "NODE READY" 120 || fail "node 1 did not rejoin"
"$bin/pmgas-bench" data-probe --zk "$zk" --cluster "$cluster" --bind "$h4" --page-id "$pid" \
  --returned 1 || fail "node 1, back after being declared dead, served its stale replica"
# Its reconciliation told it to free the replica its declaration dropped (#13, item 3).
wait_line "$work/node1.log" "REPLICA FREED node=1 page_id=$pid " 60 ||
  fail "node 1 kept the replica of page $pid that the GAT dropped"
d=$("$bin/pmgas-node" page-digest --pm "/dev/shm/pmgas-$cluster-node1" --page-id "$pid")
[[ $d == *missing* ]] || fail "node 1 still holds page $pid: $d"
echo "data-path: RETURNED node 1 freed its dropped replica of page $pid"

# --- 5. freeing pages, a stale cached mapping, and the monitor dying after a tombstone.
"$bin/pmgas-bench" data-probe --zk "$zk" --cluster "$cluster" --bind "$h4" --page-id "$pid" \
  --primary 1 --backup 2 --freed || fail "freeing a page, or a stale mapping after it"
z=$(cli alloc-page --backups 1 --on 2)
zid=$(sed -n 's/.*page_id=\([0-9]*\).*/\1/p' <<<"$z")
cli write $((zid << 32)) --u64 5
registers 4 --until "$work/stop4"
wait_records 4 $((ops / 4))
touch "$work/arm-monitor1"
out=$(cli free-page "$zid" 2>&1) || fail "free-page across the monitor's crash: $out"
echo "data-path: $out"
grep -aq "CRASH POINT monitor.tombstone-written" "$work/monitor1.log" ||
  fail "monitor 1 did not die at monitor.tombstone-written"
for i in 1 2; do
  wait_line "$work/node$i.log" "REPLICA FREED node=$i page_id=$zid page=" 60 ||
    fail "node $i did not free its replica of page $zid after the monitor's crash"
  d=$("$bin/pmgas-node" page-digest --pm "/dev/shm/pmgas-$cluster-node$i" --page-id "$zid")
  [[ $d == *missing* ]] || fail "node $i still holds page $zid: $d"
done
expect_refusal "a read of a freed page" "PageFreed" read $((zid << 32)) --u64
echo "data-path: page $zid freed across the active monitor's crash; both replicas FREE"
# The workload went on across the failover: more records after it, then it stops.
at=$(wc -l <"$work/history4.jsonl")
wait_records 4 $((at + 200))
touch "$work/stop4"
echo "data-path: registers ran on across the monitor's crash ($at records when the new monitor had freed the page)"
finish_registers 4
digests 2

# --- 7. re-replication: node 2 dies under a write workload; its pages get a new replica;
# then node 1 dies too and every page must still read the same.
# wait_after FILE FIRST PATTERN SECONDS: waits for a line matching PATTERN after one
# matching FIRST.
wait_after() {
  local until=$((SECONDS + $4))
  while ((SECONDS < until)); do
    awk -v a="$2" -v p="$3" 'f && $0 ~ p {found = 1; exit} $0 ~ a {f = 1} END {exit !found}' "$1" && return 0
    sleep 0.1
  done
  echo "data-path: no '$3' after '$2' in $1 within $4 s:"; tail -n 20 "$1"; return 1
}
mlog=
for m in 2 3; do grep -q "MONITOR READY" "$work/monitor$m.log" && mlog=$work/monitor$m.log; done
[[ -n $mlog ]] || fail "no monitor took over from monitor 1"
mv "$work/node3.log" "$work/node3-first.log"
start_node 3 "$h3"
wait_line "$work/node3.log" "NODE READY" 120 || fail "node 3 did not rejoin"
rpage=$(cli alloc-page --backups 1 --on 2)
pid=$(sed -n 's/.*page_id=\([0-9]*\).*/\1/p' <<<"$rpage")
rbase=$((pid << 32))
echo "data-path: re-replication: registers on $rpage"
bulk=() bytes=()
for k in 0 1 2 3; do
  b=$(cli alloc-page --backups 1 --on 2)
  bid=$(sed -n 's/.*page_id=\([0-9]*\).*/\1/p' <<<"$b")
  # 32 bytes across a 4 KiB boundary (two copy chunks), different on every page.
  hex=$(for i in $(seq 1 32); do printf '%02x' $(((k * 32 + i) % 256)); done)
  cli write $(((bid << 32) + k * 16384 + 4080)) "$hex" >/dev/null
  bulk+=("$bid") bytes+=("$hex")
  echo "data-path: re-replication: $b"
done
# Node 4 (on host 4) joins empty: the emptiest node, it is every copy's first target, and
# once armed it kills itself at its first stored chunk (node.rereplicate-target): the
# copies to it fail and go to another node; none of them may be committed on it. (It
# first takes, unarmed, a replica of the registers' first page, short since phase 4.)
start_node 4 "$h4" PMGAS_CRASH_AT=node.rereplicate-target PMGAS_CRASH_ARMED_BY="$work/arm-node4"
wait_line "$work/node4.log" "NODE READY" 120 || fail "node 4 did not join"
registers 5 --until "$work/stop5"
wait_records 5 $((ops / 4))
touch "$work/arm-node4"
kill -9 "${pids[2]}"
echo "data-path: killed node 2 (kill -9) after $(wc -l <"$work/history5.jsonl") history records"
wait_line "$mlog" "NODE DEAD node=2" 60 || fail "node 2 was not declared dead"
# (The registers' first page, short since phase 4, may wait for a node: node 4 holds it.)
wait_after "$mlog" "NODE DEAD node=2" "REREPLICATED .* waiting_for_a_node=[01] " 120 ||
  fail "the monitor did not restore the replicas"
grep "REREPLICATE" "$mlog" | tail -n 4
wait_line "$work/node4.log" "CRASH POINT node.rereplicate-target" 5 || fail "node 4 was not a target, or did not die mid-copy"
"$bin/pmgas-node" art-dump --json --pm "/dev/shm/pmgas-$cluster-node4" >"$work/art4.jsonl"
for p in "$pid" "${bulk[@]}"; do
  ! grep -q "\"ALLOCATED\",\"page_id\":$p," "$work/art4.jsonl" ||
    fail "node 4, killed mid-copy, holds page $p committed: $(grep "\"page_id\":$p," "$work/art4.jsonl")"
done
echo "data-path: TARGET KILLED mid-copy: node 4 died at node.rereplicate-target; its pool: $(grep -c '"PREALLOCATED"' "$work/art4.jsonl") pages PREALLOCATED (freed at its next reconciliation), none of the phase's pages ALLOCATED"
at=$(wc -l <"$work/history5.jsonl")
wait_records 5 $((at + 100))
touch "$work/stop5"
finish_registers 5
"$bin/pmgas-monitor" gat-dump --zk "$zk" --cluster "$cluster" --json >"$work/gat7.jsonl"
# Every page of the phase has two replicas, none on node 2; print "page node node".
python3 - "$work/gat7.jsonl" "$pid" "${bulk[@]}" >"$work/replicas7.txt" <<'PY' || fail "a page did not get its replica back: $(cat "$work/replicas7.txt")"
import json, sys
want = {int(p) for p in sys.argv[2:]}
ok = True
for line in open(sys.argv[1]).read().splitlines()[1:]:
    m = json.loads(line)
    if m["page_id"] not in want:
        continue
    want.discard(m["page_id"])
    nodes = [r["node"] for r in m["replicas"]]
    print(m["page_id"], *nodes)
    if len(nodes) != 2 or 2 in nodes or m["dropped"] or m["freed"]:
        ok = False
sys.exit(0 if ok and not want else 1)
PY
keep=$pid
while read -r p n1 n2; do
  pid=$p
  digests "$n1" "$n2"
done <"$work/replicas7.txt"
pid=$keep
grep -q " 1 \| 1$" "$work/replicas7.txt" || fail "no page of the phase is on node 1: the second kill proves nothing"
echo "data-path: REREPLICATED every page back to 2 identical replicas: $(tr '\n' ';' <"$work/replicas7.txt")"
regs=$(cli read "$rbase" --len 64)
kill -9 "${pids[1]}"
echo "data-path: killed node 1 (kill -9), a survivor of node 2's pages"
wait_line "$mlog" "NODE DEAD node=1" 60 || fail "node 1 was not declared dead"
[[ $(cli read "$rbase" --len 64) == "$regs" ]] || fail "the registers changed or were lost with node 1"
for k in 0 1 2 3; do
  got=$(cli read $(((${bulk[k]} << 32) + k * 16384 + 4080)) --len 32) ||
    fail "page ${bulk[k]} is not readable after the second node's death: $got"
  [[ $got == "${bytes[k]}" ]] || fail "page ${bulk[k]} lost its bytes: $got, not ${bytes[k]}"
done
echo "data-path: SECOND LOSS ok: with nodes 1 and 2 dead, every page reads what was acknowledged"
# Node 2 comes back: it frees the replicas its declaration dropped (the phase's pages were
# re-replicated without it) and the GAT then equals every live node's ART.
mv "$work/node2.log" "$work/node2-first.log"
start_node 2 "$h2"
wait_line "$work/node2.log" "NODE READY" 120 || fail "node 2 did not rejoin"
for p in "$pid" "${bulk[@]}"; do
  wait_line "$work/node2.log" "REPLICA FREED node=2 page_id=$p " 30 || fail "node 2 kept its dropped replica of page $p"
done
"$bin/pmgas-monitor" gat-dump --zk "$zk" --cluster "$cluster" --json >"$work/gat7b.jsonl"
for i in 2 3; do "$bin/pmgas-node" art-dump --json --pm "/dev/shm/pmgas-$cluster-node$i" >"$work/art7-$i.jsonl"; done
# Every replica the GAT names on nodes 2 and 3 is ALLOCATED there under its id, and every
# page ALLOCATED there is in the GAT (a lost page's last copy is kept: its id is listed
# with no replica).
python3 - "$work/gat7b.jsonl" "$work/art7-2.jsonl" "$work/art7-3.jsonl" <<'PY' || fail "the GAT and the ARTs of nodes 2 and 3 disagree"
import json, sys
maps = [json.loads(l) for l in open(sys.argv[1]).read().splitlines()[1:]]
art = {}
for i, f in ((2, sys.argv[2]), (3, sys.argv[3])):
    for l in open(f).read().splitlines()[1:]:
        e = json.loads(l)
        art[(i, e["page_index"])] = e
lost = {m["page_id"] for m in maps if not m["replicas"] and not m["freed"]}
errors, named = [], set()
for m in maps:
    if m["freed"]:
        continue
    for r in m["replicas"]:
        k = (r["node"], r["page_index"])
        if r["node"] not in (2, 3):
            continue
        named.add(k)
        e = art.get(k)
        if not e or e["state"] != "ALLOCATED" or e["page_id"] != m["page_id"]:
            errors.append(f"page {m['page_id']}: replica {k} is {e}")
for k, e in art.items():
    if e["state"] == "PREALLOCATED":
        errors.append(f"{k} left PREALLOCATED")
    if e["state"] == "ALLOCATED" and k not in named and e["page_id"] not in lost:
        errors.append(f"{k} ALLOCATED (page {e['page_id']}) but not in the GAT")
print(f"GAT vs ARTs of nodes 2 and 3: {len(named)} replicas named, {len(art)} ART entries, {len(errors)} disagreements")
for e in errors[:10]:
    print("  " + e)
sys.exit(1 if errors else 0)
PY
echo "data-path: RETURNED node 2 freed its dropped replicas of pages $pid ${bulk[*]}; the GAT equals the ARTs of nodes 2 and 3"

# --- 6. the persistence audit: no acknowledgement of bytes not yet written back.
for i in 1 2 3; do
  [[ -s $work/audit-node$i.log ]] || fail "node $i wrote no persistence audit (build with --features pmgas-node/persist-audit)"
  out=$("$bin/pmgas-node" audit-check --file "$work/audit-node$i.log" 2>&1) || fail "node $i: $out"
  [[ $out != *" acks=0"* ]] || fail "node $i acknowledged nothing: $out"
  echo "data-path: node$i $out"
done
echo "data-path: ok"
