#!/usr/bin/env bash
# Inside the rig: runs each RDMA test binary listed in $1 (one path per line), serially,
# with output shown, and fails if any fails or if none ran.
set -uo pipefail
list=$1
[[ -s $list ]] || { echo "rig-tests: no rig test binaries listed in $list" >&2; exit 1; }
echo "rig-tests: devices $(rdma link show | awk '{print $2"("$8")"}' | tr '\n' ' ')"
rc=0
while read -r bin; do
  [[ -n $bin ]] || continue
  echo "rig-tests: running $(basename "$bin")"
  "$bin" --test-threads=1 --nocapture || rc=1
done <"$list"
exit $rc
