//! The whole two-phase page allocation on the rig: real ZooKeeper, the monitor and three
//! data nodes as separate processes on four simulated hosts with their own rxe devices.
//! `scripts/cluster.sh` runs replicated allocations (2 backups, three primaries
//! allocating at once) and checks the GAT in ZooKeeper against every node's ART: once
//! with room for all 999, once with pools too small, so backups run out of space and
//! transactions abort; then with a backup that stops answering, and with a ZooKeeper
//! write that fails (the monitor is fenced off).
//! Built only with the `rig` feature; without the rig it fails.

use std::path::PathBuf;
use std::process::Command;

fn cluster(args: &[&str]) -> String {
    let hosts = std::env::var("PMGAS_HOSTS").unwrap_or_default();
    assert!(
        hosts.split_whitespace().count() >= 4,
        "the rig must provide 4 simulated hosts (PMGAS_HOSTS={hosts:?}); run through scripts/test.sh"
    );
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    // The binaries of this build (debug under `cargo test`), next to this test's own.
    let exe = std::env::current_exe().expect("own path");
    let bin_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .to_path_buf();
    let out = Command::new("bash")
        .arg(root.join("scripts/cluster.sh"))
        .args(args)
        .env("PMGAS_BIN", &bin_dir)
        .output()
        .expect("run scripts/cluster.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the cluster run failed its check");
    stdout
}

#[test]
fn nine_hundred_ninety_nine_replicated_pages_gat_matches_every_art() {
    let out = cluster(&["--pages", "999", "--concurrency", "4", "--objects", "2000"]);
    assert!(
        out.contains("999 allocations ok"),
        "not every allocation was stored"
    );
    assert!(
        out.contains("OBJECTS DONE allocated=2000"),
        "the client API's objects did not round-trip"
    );
    assert!(
        out.contains(", 0 problems"),
        "the GAT and the ARTs disagree"
    );
}

#[test]
fn full_pools_abort_cleanly_and_leave_nothing_preallocated() {
    // 4 MiB pools hold ~60 pages of 64 KiB each: 300 pages x 3 replicas cannot fit, so
    // backups run out of space mid-way and those transactions abort.
    let out = cluster(&["--pages", "300", "--concurrency", "4", "--pool-mib", "4"]);
    assert!(
        out.contains(", 0 problems"),
        "an abort left the GAT and the ARTs inconsistent"
    );
    assert!(
        !out.contains(" 0 failed,"),
        "nothing failed although the pools were full"
    );
}

#[test]
fn an_unreachable_backup_aborts_its_transactions_and_frees_what_it_prepared() {
    // Node 3 stops (SIGSTOP) for 3 s, caught having prepared a page as a backup but not
    // yet answered: that transaction times out and aborts (as does any other still
    // preparing with it); those it had answered wait for its Commit ack. Once it runs
    // again it frees what it prepared for the aborted ones. Nothing may stay PREALLOCATED.
    let out = cluster(&[
        "--pages",
        "900",
        "--concurrency",
        "4",
        "--freeze-node3",
        "3",
    ]);
    assert!(
        out.contains(", 0 problems"),
        "the GAT and the ARTs disagree"
    );
    assert!(
        !out.contains(" 0 failed,"),
        "nothing aborted although a backup was unreachable"
    );
}

#[test]
fn a_failed_zookeeper_write_aborts_and_a_deposed_monitor_stops() {
    // A new writer fences the GAT series: the monitor's next write fails (nothing stored),
    // those transactions abort, later requests get NotLeader, the monitor drains and exits.
    let out = cluster(&[
        "--pages",
        "900",
        "--concurrency",
        "4",
        "--depose-after",
        "2",
    ]);
    assert!(
        out.contains(", 0 problems"),
        "the GAT and the ARTs disagree"
    );
    assert!(
        out.contains("cluster: monitor stopped: deposed"),
        "the deposed monitor did not stop"
    );
    assert!(
        out.contains("NotLeader"),
        "no request was refused as NotLeader"
    );
}

#[test]
fn a_node_killed_mid_run_rejoins_and_reconciles_with_the_gat() {
    // Node 3 is killed (-9) mid-run and restarted: at its join the monitor sends it its
    // part of the GAT (once no write involving it is in flight); PREALLOCATED pages the GAT
    // holds become ALLOCATED, the others FREE. Every stored mapping must then match the
    // ARTs, with nothing PREALLOCATED anywhere.
    let out = cluster(&[
        "--pages",
        "1500",
        "--concurrency",
        "4",
        "--kill-node3-after",
        "5",
    ]);
    assert!(
        out.contains(", 0 problems"),
        "the GAT and the ARTs disagree"
    );
    assert!(
        out.contains("NODE READY node3 epoch=0 reconciled:"),
        "node 3 did not come back"
    );
}

#[test]
fn a_killed_monitor_is_replaced_and_nodes_rejoin_and_reconcile() {
    // The monitor is killed (-9) mid-run; a new one reloads the GAT from ZooKeeper, the
    // nodes find it there, rejoin and reconcile what was in flight, and go on allocating.
    let out = cluster(&[
        "--pages",
        "1500",
        "--concurrency",
        "4",
        "--kill-monitor-after",
        "5",
    ]);
    assert!(
        out.contains(", 0 problems"),
        "the GAT and the ARTs disagree"
    );
    assert!(
        out.contains("all 3 nodes rejoined and reconciled"),
        "not every node rejoined the new monitor"
    );
    assert!(
        out.contains("cluster: takeover: a standby was elected"),
        "no standby took over"
    );
}
