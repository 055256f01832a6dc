#!/usr/bin/env bash
# The main job: installs what is missing, builds, then
#  1. brings up the Soft-RoCE rig and runs the verbs latency benchmark side by side with
#     perftest (arguments are passed to scripts/bench-vs-perftest.sh);
#  2. runs the object-allocator benchmark against libpmemobj and malloc on tmpfs pools,
#     and times the allocator's rebuild of a full 1 GiB pool;
#  3. runs a local cluster on the rig (ZooKeeper, three monitors — one active, two
#     standbys — and three data nodes on their own simulated hosts) that allocates 999 replicated pages and 2000 objects through
#     the client API, prints the start of the GAT and checks it against every node's ART
#     (scripts/cluster.sh);
#  4. runs the allocation benchmark: replicated pages at concurrency 1, 4 and 16 next
#     to a plain ZooKeeper create on the same server (scripts/bench-alloc.sh);
#  5. runs the recovery benchmark: GAT reload time, takeover after kill -9 of the active
#     monitor, per-node reconciliation (scripts/bench-recovery.sh);
#  6. runs the data-path benchmark beside perftest: reads, durable writes, CAS with 0-2
#     backups, batches (scripts/bench-data.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bench-vs-perftest.sh "$@"
echo
cargo build --release -p pmgas-bench --quiet
./target/release/pmgas-bench objects --rebuild
echo
bash scripts/cluster.sh --pages 999 --concurrency 4 --objects 2000 --print-gat
echo
bash scripts/bench-alloc.sh --backups 2 --concurrency 1,4,16
echo
bash scripts/bench-recovery.sh --mappings 10000,100000 --trials 10
echo
bash scripts/bench-data.sh
