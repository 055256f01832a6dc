#!/usr/bin/env bash
# Runs every pmgas test: formatting and lints, host unit tests, then the RDMA integration
# tests on the Soft-RoCE rig (a VM where the host kernel has no rdma_rxe). Installs what
# is missing first. Fails — never skips — when the rig cannot start.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
logs=$(mktemp -d /tmp/pmgas-test.XXXXXX)
start=$(date +%s)

bash scripts/install-deps.sh

echo "== fmt and clippy"
cargo fmt --all --check
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings

echo "== host tests"
cargo test --workspace 2>&1 | tee "$logs/host.log"

echo "== building rig tests"
cargo test --workspace --all-features --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and t.get("name", "").startswith("rig") and "test" in t.get("kind", []):
        print(m["executable"])
' >"$logs/rig-bins.txt"
cargo build --workspace --all-features --bins --quiet
echo "rig test binaries: $(wc -l <"$logs/rig-bins.txt")"

echo "== rig tests (Soft-RoCE)"
set +e
bash scripts/rig.sh --hosts 4 -- bash "$root/scripts/rig-tests.sh" "$logs/rig-bins.txt" 2>&1 | tee "$logs/rig.log"
rig_rc=${PIPESTATUS[0]}
set -e

echo "== whole-cluster restart across a VM reboot (file-backed NVDIMMs)"
set +e
PMGAS_BIN=$root/target/debug bash scripts/restart-cluster.sh 2>&1 | tee "$logs/restart.log"
restart_rc=${PIPESTATUS[0]}
set -e

echo
echo "== summary ($(($(date +%s) - start)) s)"
python3 - "$logs/host.log" "$logs/rig.log" "$rig_rc" "$restart_rc" <<'PY'
import re, sys
host, rig, rig_rc = open(sys.argv[1]).read(), open(sys.argv[2]).read(), int(sys.argv[3])
restart_ok = int(sys.argv[4]) == 0
def results(text):
    return re.findall(r"^test result: \w+\. (\d+) passed; (\d+) failed.*$", text, re.M)
lines = re.findall(r"^test result: .*$", host, re.M) + re.findall(r"^test result: .*$", rig, re.M)
h, r = results(host), results(rig)
passed = sum(int(p) for p, _ in h + r)
failed = sum(int(f) for _, f in h + r)
rig_passed = sum(int(p) for p, _ in r)
for line in lines:
    print(line)
# What failed, again at the very end (a CI log is often cut in the middle).
for line in re.findall(r"^thread '.*' panicked at .*$|^crash-suite: (?:FAILED|RETRIED) .*$", host + rig, re.M):
    print(line[:800])
print(f"host: {sum(int(p) for p, _ in h)} passed; rig (rxe): {rig_passed} passed")
if rig_rc != 0 or rig_passed == 0:
    failed = max(failed, 1)
    print(f"rig: FAILED (exit {rig_rc}, {rig_passed} rxe tests passed)")
print(f"whole-cluster restart across a VM reboot (scripts/restart-cluster.sh): {'ok' if restart_ok else 'FAILED'}")
passed += restart_ok
failed += not restart_ok
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
