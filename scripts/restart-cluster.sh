#!/usr/bin/env bash
# A whole-cluster restart across a VM reboot, on PM that survives it: the rig boots with
# three file-backed NVDIMMs (rig.sh --nvdimm: their contents are files on the host) as
# devdax, and ZooKeeper keeps its data next to them.
#
#   boot 1: ZooKeeper, a monitor and three nodes, one per NVDIMM; every node allocates
#           replicated pages (2 backups) without end, and 1.5 s into that every process
#           is killed (-9) — the whole cluster crashes mid-allocation, pages PREALLOCATED
#           and commits in flight — and the GAT and every ART are dumped; the VM ends.
#   boot 2: a new VM on the same NVDIMMs. Before anything starts, every ART must read
#           exactly as it was dumped (PM survived) and the GAT as well (ZooKeeper's data
#           did); then ZooKeeper, a monitor and the nodes start again, the nodes rejoin
#           and reconcile (committing or freeing what boot 1 left PREALLOCATED), and
#           allocate PAGES pages. The final check: every
#           mapping from boot 1 is still in the GAT, unchanged; every replica of every
#           mapping is ALLOCATED with its page id on its node; nothing PREALLOCATED, no
#           ALLOCATED page the GAT does not know; page ids never reused.
#
# Usage: scripts/restart-cluster.sh [--pages N]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
pages=150
phase=
while (($#)); do
  case $1 in
    --pages) pages=$2; shift 2 ;;
    --phase) phase=$2; shift 2 ;;
    *) echo "usage: $0 [--pages N]" >&2; exit 2 ;;
  esac
done

if [[ ${PMGAS_RIG:-} != 1 ]]; then
  [[ -n ${PMGAS_BIN:-} ]] || cargo build --release --bins --quiet
  state=$(mktemp -d /var/tmp/pmgas-restart.XXXXXX)
  trap 'rm -rf "$state"' EXIT
  export PMGAS_STATE=$state
  bash scripts/rig.sh --hosts 4 --nvdimm "$state" -- bash "$root/scripts/restart-cluster.sh" --phase 1 --pages "$pages"
  echo "restart-cluster: the first VM is gone; booting a second one on the same NVDIMMs"
  bash scripts/rig.sh --hosts 4 --nvdimm "$state" -- bash "$root/scripts/restart-cluster.sh" --phase 2 --pages "$pages"
  exit
fi

bin=${PMGAS_BIN:-$root/target/release}
state=${PMGAS_STATE:?restart-cluster: PMGAS_STATE is not set}
read -r h1 h2 h3 h4 _ <<<"$PMGAS_HOSTS"
hosts=("" "$h1" "$h2" "$h3")
read -ra devices <<<"${PMGAS_PM_DEVICES:-}"
((${#devices[@]} >= 3)) || { echo "restart-cluster: the rig has no NVDIMMs (PMGAS_PM_DEVICES='${PMGAS_PM_DEVICES:-}')" >&2; exit 1; }
cluster=restart
work=$state/boot$phase
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
ulimit -c 0

# The device of node i: in boot 1 the i-th NVDIMM (formatted then); in boot 2 the one
# whose pool header says node i.
declare -A device_of
if ((phase == 1)); then
  for i in 1 2 3; do device_of[$i]=${devices[$((i - 1))]}; done
else
  for d in "${devices[@]}"; do
    "$bin/pmgas-node" art-dump --pm "$d" --json >"$work/art-at-boot.jsonl"
    n=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["header"]["node_id"])' "$work/art-at-boot.jsonl")
    device_of[$n]=$d
    mv "$work/art-at-boot.jsonl" "$work/art$n-at-boot.jsonl"
    # PM survived the reboot: the ART reads exactly as boot 1 left it.
    cmp -s "$work/art$n-at-boot.jsonl" "$state/boot1/art$n.jsonl" ||
      { echo "restart-cluster: node $n's ART on $d changed across the reboot"; diff "$state/boot1/art$n.jsonl" "$work/art$n-at-boot.jsonl" | head; exit 1; }
  done
  echo "restart-cluster: boot 2: the three ARTs on the NVDIMMs read exactly as boot 1 left them"
fi

zk=$(bash "$root/scripts/zookeeper.sh" start --port 2181 --dir "$state/zk")
if ((phase == 2)); then
  "$bin/pmgas-monitor" gat-dump --zk "$zk" --cluster "$cluster" --json >"$work/gat-at-boot.jsonl"
  cmp -s <(tail -n +2 "$work/gat-at-boot.jsonl") <(tail -n +2 "$state/boot1/gat.jsonl") ||
    { echo "restart-cluster: the GAT changed across the reboot"; exit 1; }
  echo "restart-cluster: boot 2: the GAT in ZooKeeper reads as boot 1 left it ($(($(wc -l <"$work/gat-at-boot.jsonl") - 1)) mappings)"
fi
"$bin/pmgas-monitor" serve --zk "$zk" --cluster "$cluster" --cluster-id 7 --page-size 65536 \
  --listen "$h4:7000" --session-timeout-ms 2000 >"$work/monitor.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do grep -q "MONITOR READY\|pmgas-monitor:" "$work/monitor.log" && break; sleep 0.1; done
grep "MONITOR READY" "$work/monitor.log" | sed 's/^/restart-cluster: /' | grep . || { cat "$work/monitor.log"; exit 1; }
per_node=$(((pages + 2) / 3))
((phase == 1)) && per_node=1000000
for i in 1 2 3; do
  "$bin/pmgas-node" serve --pm "${device_of[$i]}" --cluster-id 7 --node-id "$i" --page-size 65536 \
    --zk "$zk" --cluster "$cluster" --bind "${hosts[$i]}" --alloc-pages "$per_node" --backups 2 \
    --concurrency 4 --start-delay-ms 3000 --retry-ms 60000 >"$work/node$i.log" 2>&1 &
  pids+=($!)
done
if ((phase == 1)); then
  for i in 1 2 3; do
    for _ in $(seq 1 600); do grep -q "NODE READY\|pmgas-node:" "$work/node$i.log" && break; sleep 0.1; done
    grep -q "NODE READY" "$work/node$i.log" || { echo "restart-cluster: node $i did not start"; tail -20 "$work/node$i.log"; exit 1; }
  done
  sleep 4.5 # 3 s start delay, then 1.5 s of allocations
  echo "restart-cluster: boot 1: kill -9 the whole cluster mid-allocation"
fi
for i in 1 2 3; do
  ((phase == 1)) && break
  for _ in $(seq 1 1200); do grep -q "ALLOC DONE\|pmgas-node:" "$work/node$i.log" && break; sleep 0.1; done
  grep -q "ALLOC DONE" "$work/node$i.log" || { echo "restart-cluster: node $i did not finish"; tail -20 "$work/node$i.log" "$work/monitor.log"; exit 1; }
  echo "restart-cluster: boot $phase node$i on ${device_of[$i]}: $(grep "NODE READY" "$work/node$i.log" | head -1)"
  echo "restart-cluster: boot $phase node$i: $(grep "ALLOC DONE" "$work/node$i.log")"
done
# The whole cluster crashes: monitor and nodes killed at once, no clean shutdown.
for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
pids=()
"$bin/pmgas-monitor" gat-dump --zk "$zk" --cluster "$cluster" --json >"$work/gat.jsonl"
for i in 1 2 3; do "$bin/pmgas-node" art-dump --pm "${device_of[$i]}" --json >"$work/art$i.jsonl"; done
bash "$root/scripts/zookeeper.sh" stop --dir "$state/zk" >/dev/null 2>&1 || true
python3 - "$state" "$phase" <<'PY'
import json, sys
state, phase = sys.argv[1], int(sys.argv[2])
work = f"{state}/boot{phase}"
gat = [json.loads(l) for l in open(f"{work}/gat.jsonl")][1:]
by_id = {m["page_id"]: m for m in gat}
errors = []
ok = sum(int(l.split("ok=")[1].split()[0]) for i in (1, 2, 3) for l in open(f"{work}/node{i}.log") if "ALLOC DONE" in l)
before = [json.loads(l) for l in open(f"{state}/boot1/gat.jsonl")][1:] if phase == 2 else []
for m in before:
    if by_id.get(m["page_id"]) != m: errors.append(f"page {m['page_id']}: {m} became {by_id.get(m['page_id'])}")
old_max = max((m["page_id"] for m in before), default=0)
new = [m for m in gat if m["page_id"] > old_max]
if len(gat) != len(by_id): errors.append("a page id stored twice")
if len(gat) != len(before) + len(new): errors.append("mappings from boot 1 lost or page ids reused")
if phase == 2 and len(new) != ok: errors.append(f"{len(new)} new mappings but {ok} allocations succeeded in boot {phase}")
art = {}
for i in (1, 2, 3):
    for l in list(open(f"{work}/art{i}.jsonl"))[1:]:
        e = json.loads(l)
        art[(i, e["page_index"])] = e
claimed = set()
for m in gat:
    if len(m["replicas"]) != 3: errors.append(f"page {m['page_id']}: {len(m['replicas'])} replicas")
    for r in m["replicas"]:
        k = (r["node"], r["page_index"])
        claimed.add(k)
        e = art.get(k)
        # Crashed mid-commit (boot 1): a replica may still be PREALLOCATED.
        if phase == 1 and e and e["state"] == "PREALLOCATED": continue
        if not e or e["state"] != "ALLOCATED" or e["page_id"] != m["page_id"]: errors.append(f"page {m['page_id']}: replica {k} is {e}")
prealloc = sum(e["state"] == "PREALLOCATED" for e in art.values())
for k, e in art.items():
    if e["state"] == "PREALLOCATED" and phase == 2: errors.append(f"{k} left PREALLOCATED")
    if e["state"] == "ALLOCATED" and k not in claimed: errors.append(f"{k} ALLOCATED but not in the GAT")
print(f"restart-cluster: boot {phase} check: {len(gat)} mappings ({len(before)} from boot 1, all unchanged; {len(new)} new, ids above {old_max}), "
      f"{len(art) - prealloc} ALLOCATED and {prealloc} PREALLOCATED ART entries on 3 NVDIMMs, {len(errors)} problems")
for e in errors[:20]: print("  " + e)
sys.exit(1 if errors else 0)
PY
