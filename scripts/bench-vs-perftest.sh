#!/usr/bin/env bash
# pmgas verbs latency side by side with perftest, on the same rxe devices, sizes and CPU
# pinning, in one rig boot. Prints a table: perftest's typical (median) and 99th
# percentile, pmgas's p50 and p99 (hdrhistogram), and the p50 ratio pmgas/perftest.
#
# Conventions match perftest: read and cas report the operation's round trip; write and
# send are ping-pongs reported as half the round trip.
#
# Usage: scripts/bench-vs-perftest.sh [--iters N] [--sizes 8,64,4096] [--ops read,write,send,cas]
set -euo pipefail
cd "$(dirname "$0")/.."
iters=10000
sizes=8,64,4096
ops=read,write,send,cas
out_json=""
while (($#)); do
  case $1 in
    --iters) iters=$2; shift 2 ;;
    --sizes) sizes=$2; shift 2 ;;
    --ops) ops=$2; shift 2 ;;
    --json-out) out_json=$2; shift 2 ;;
    *) echo "usage: $0 [--iters N] [--sizes LIST] [--ops LIST] [--json-out FILE]" >&2; exit 2 ;;
  esac
done

if [[ ${PMGAS_RIG:-} != 1 ]]; then
  bash scripts/install-deps.sh
  cargo build --release -p pmgas-bench --quiet
  args=(--iters "$iters" --sizes "$sizes" --ops "$ops")
  bash scripts/rig.sh --hosts 2 -- bash "$PWD/scripts/bench-vs-perftest.sh" "${args[@]}"
  exit $?
fi

# --- inside the rig ---
bench=$PWD/target/release/pmgas-bench
read -r h1 h2 _ <<<"$PMGAS_HOSTS"
read -r d1 d2 _ <<<"$PMGAS_DEVICES"
gid1=$("$bench" devices --device "$d1" --gid-for "$h1")
gid2=$("$bench" devices --device "$d2" --gid-for "$h2")
echo "bench: client $d1 ($h1, gid $gid1) -> server $d2 ($h2, gid $gid2); client on cpu 0, server on cpu 1"
tmp=$(mktemp -d)
port=18600

wait_listen() {
  for _ in $(seq 1 100); do
    ss -ltn 2>/dev/null | grep -q ":$1 " && return 0
    sleep 0.1
  done
  return 1
}

# perftest prints: #bytes #iterations t_min t_max t_typical t_avg t_stdev p99 p99.9 (usec)
perftest() {
  local op=$1 size=$2 tool extra=()
  case $op in
    read|write|send) tool=ib_${op}_lat ;;
    cas) tool=ib_atomic_lat; extra=(-A CMP_AND_SWAP) ;;
  esac
  port=$((port + 1))
  taskset -c 1 "$tool" -d "$d2" -x "$gid2" -s "$size" -n "$iters" -F -p "$port" "${extra[@]}" >"$tmp/srv.log" 2>&1 &
  local srv=$!
  wait_listen "$port" || { echo "perftest server did not listen" >&2; kill $srv; return 1; }
  if ! taskset -c 0 "$tool" -d "$d1" -x "$gid1" -s "$size" -n "$iters" -F -p "$port" "${extra[@]}" "$h2" >"$tmp/cli.log" 2>&1; then
    cat "$tmp/cli.log" >&2
    wait $srv || true
    return 1
  fi
  wait $srv || true
  awk -v s="$size" '$1 == s && NF >= 9 {print $5, $8; exit}' "$tmp/cli.log"
}

printf '%-6s %7s | %14s %14s | %12s %12s | %s\n' op bytes "perftest typ" "perftest p99" "pmgas p50" "pmgas p99" "p50 ratio"
IFS=, read -ra op_list <<<"$ops"
IFS=, read -ra size_list <<<"$sizes"
for op in "${op_list[@]}"; do
  for size in "${size_list[@]}"; do
    [[ $op == cas && $size != "${size_list[0]}" ]] && continue
    psize=$size
    [[ $op == cas ]] && psize=8
    read -r p_typ p_99 < <(perftest "$op" "$psize") || { echo "perftest $op $psize failed" >&2; exit 1; }
    port=$((port + 1))
    json=$("$bench" verbs --op "$op" --size "$psize" --iters "$iters" --json \
      --local "$h1" --remote "$h2" --port "$port" --cpu 0 --peer-cpu 1)
    read -r m50 m99 < <(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["p50_ns"]/1000, r["p99_ns"]/1000)' "$json")
    ratio=$(python3 -c "print(f'{$m50/$p_typ:.3f}')")
    printf '%-6s %7s | %11.2f us %11.2f us | %9.2f us %9.2f us | %s\n' "$op" "$psize" "$p_typ" "$p_99" "$m50" "$m99" "$ratio"
    if [[ -n $out_json ]]; then
      python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["perftest_typical_us"]=float(sys.argv[2]); r["perftest_p99_us"]=float(sys.argv[3]); print(json.dumps(r))' \
        "$json" "$p_typ" "$p_99" >>"$out_json" 2>/dev/null || true
    fi
  done
done
