//! The data path on the rig (scripts/data-path.sh): three monitors, three data nodes and
//! client processes without PM. Bad input is refused and changes nothing; a register
//! workload is recorded and checked for linearizability with a client, then the page's
//! primary, then its backup killed at crash points, then the active monitor (killed right
//! after storing a freed page's tombstone); replicas are compared byte for byte after
//! each; freeing a page under a stale cached mapping is probed; and every node's
//! persistence audit is checked. With every client caching blocks (#12): the workload
//! without faults, read-mostly (the cache's counters must show hits), with a sharer
//! stopped by SIGSTOP and continued, with a sharer killed and with the primary killed; and
//! a stopped sharer must read a write acknowledged elsewhere meanwhile, never its block.
//! Re-replication (#13): a node killed under the register workload; its pages get a new
//! replica (the first target dies mid-copy and holds nothing committed), byte-identical;
//! then a second node dies and every page still reads what was acknowledged.

mod support;

#[test]
fn data_path_is_linearizable_durable_and_survives_crashes() {
    let (stdout, status) = support::run_rig_script("data-path.sh");
    let failures: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("FAILED") || l.contains("NOT linearizable"))
        .collect();
    assert!(
        status.success() && stdout.contains("data-path: ok"),
        "the data-path run failed:\n{}",
        failures.join("\n")
    );
    // Every history was checked, and every crash point was reached.
    assert_eq!(stdout.matches("data-path: checking history").count(), 8);
    for point in [
        "client.update-sent",
        "node 1: CRASH POINT node.data-replicating",
        "node 3: CRASH POINT node.data-backup-stored",
        "freed across the active monitor's crash",
        "registers ran on across the monitor's crash",
    ] {
        assert!(stdout.contains(point), "crash point {point} not reached");
    }
    assert_eq!(stdout.matches("AUDIT ok").count(), 3);
    assert!(
        stdout.contains("PROBE ok returned node1"),
        "the returned node was not probed"
    );
    assert!(
        stdout.contains("RETURNED node 1 freed its dropped replica"),
        "the returned node kept the replica the GAT dropped"
    );
    assert!(
        stdout.contains("PROBE ok freed"),
        "freeing under a stale mapping was not probed"
    );
    // The coherent block cache (#12): a hung sharer never serves its stale block, a
    // stopped one does not hold the others up, and the read-mostly run hits.
    for line in [
        "TARGET KILLED mid-copy",
        "REREPLICATED every page back to 2 identical replicas",
        "SECOND LOSS ok",
        "RETURNED node 2 freed its dropped replicas",
        "HUNG SHARER ok",
        "client p2 stopped (SIGSTOP)",
        "read-mostly cache counters",
    ] {
        assert!(stdout.contains(line), "{line}: not reached");
    }
}
