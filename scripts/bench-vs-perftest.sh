#!/usr/bin/env bash
# pmgas verbs latency side by side with perftest, on the same rxe devices, sizes and CPU
# pinning, in one rig boot. Prints a table: perftest's typical (median) and 99th
# percentile, pmgas's p50 and p99 (hdrhistogram), and the p50 ratio pmgas/perftest.
#
# Conventions match perftest: read and cas report the operation's round trip; write and
# send are ping-pongs reported as half the round trip.
#
# The emulated rig is noisy (a TCG guest on a shared 2-core host), so each pair is run in
# --rounds rounds, alternating which tool goes first; the table shows the median over the
# rounds of each tool's p50 (perftest: t_typical) and p99, and the ratio of the medians.
#
# Usage: scripts/bench-vs-perftest.sh [--iters N] [--rounds R] [--sizes 8,64,4096]
#                                     [--ops read,write,send,cas]
set -euo pipefail
cd "$(dirname "$0")/.."
iters=10000
rounds=3
sizes=8,64,4096
ops=read,write,send,cas
out_json=""
while (($#)); do
  case $1 in
    --iters) iters=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --sizes) sizes=$2; shift 2 ;;
    --ops) ops=$2; shift 2 ;;
    --json-out) out_json=$2; shift 2 ;;
    *) echo "usage: $0 [--iters N] [--rounds R] [--sizes LIST] [--ops LIST] [--json-out FILE]" >&2; exit 2 ;;
  esac
done

if [[ ${PMGAS_RIG:-} != 1 ]]; then
  bash scripts/install-deps.sh
  cargo build --release -p pmgas-bench --quiet
  args=(--iters "$iters" --rounds "$rounds" --sizes "$sizes" --ops "$ops")
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

pmgas() {
  local op=$1 size=$2
  port=$((port + 1))
  "$bench" verbs --op "$op" --size "$size" --iters "$iters" --json \
    --local "$h1" --remote "$h2" --port "$port" --cpu 0 --peer-cpu 1
}

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

echo "bench: $iters iterations per run, $rounds rounds per pair, medians shown"
printf '%-6s %7s | %14s %14s | %12s %12s | %s\n' op bytes "perftest typ" "perftest p99" "pmgas p50" "pmgas p99" "p50 ratio"
IFS=, read -ra op_list <<<"$ops"
IFS=, read -ra size_list <<<"$sizes"
for op in "${op_list[@]}"; do
  for size in "${size_list[@]}"; do
    [[ $op == cas && $size != "${size_list[0]}" ]] && continue
    psize=$size
    [[ $op == cas ]] && psize=8
    p_typs="" p_99s="" m50s="" m99s="" detail=""
    for r in $(seq 1 "$rounds"); do
      order=(perftest pmgas)
      ((r % 2 == 0)) && order=(pmgas perftest)
      for tool in "${order[@]}"; do
        if [[ $tool == perftest ]]; then
          read -r p_typ p_99 < <(perftest "$op" "$psize") || { echo "perftest $op $psize failed" >&2; exit 1; }
          # perftest now and then prints "inf" for a latency; measure that round again.
          if ! [[ $p_typ =~ ^[0-9.]+$ && $p_99 =~ ^[0-9.]+$ ]]; then
            echo "bench: perftest printed typical=$p_typ p99=$p_99; running it again" >&2
            read -r p_typ p_99 < <(perftest "$op" "$psize") || { echo "perftest $op $psize failed" >&2; exit 1; }
          fi
          p_typs+=" $p_typ" p_99s+=" $p_99"
        else
          json=$(pmgas "$op" "$psize") || { echo "pmgas-bench $op $psize failed" >&2; exit 1; }
          read -r m50 m99 < <(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["p50_ns"]/1000, r["p99_ns"]/1000)' "$json")
          m50s+=" $m50" m99s+=" $m99"
          [[ -n $out_json ]] && echo "$json" >>"$out_json"
        fi
      done
      detail+=" r$r: perftest ${p_typ} / pmgas ${m50};"
    done
    p_typ=$(median <<<"$p_typs") p_99=$(median <<<"$p_99s") m50=$(median <<<"$m50s") m99=$(median <<<"$m99s")
    ratio=$(python3 -c "print(f'{$m50/$p_typ:.3f}')")
    printf '%-6s %7s | %11.2f us %11.2f us | %9.2f us %9.2f us | %s\n' "$op" "$psize" "$p_typ" "$p_99" "$m50" "$m99" "$ratio"
    echo "         p50 per round (us):$detail"
  done
done
