//! The data path on the rig (scripts/data-path.sh): three monitors, three data nodes and
//! client processes without PM. Bad input is refused and changes nothing; a register
//! workload is recorded and checked for linearizability with a client, then the page's
//! primary, then its backup killed at crash points; replicas are compared byte for byte
//! after each, and every node's persistence audit is checked.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn data_path_is_linearizable_durable_and_survives_crashes() {
    let hosts = std::env::var("PMGAS_HOSTS").unwrap_or_default();
    assert!(
        hosts.split_whitespace().count() >= 4,
        "the rig must provide 4 simulated hosts (PMGAS_HOSTS={hosts:?}); run through scripts/test.sh"
    );
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = std::env::current_exe()
        .expect("own path")
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .to_path_buf();
    let out = Command::new("bash")
        .arg(root.join("scripts/data-path.sh"))
        .env("PMGAS_BIN", &bin_dir)
        .output()
        .expect("run scripts/data-path.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let failures: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("FAILED") || l.contains("NOT linearizable"))
        .collect();
    assert!(
        out.status.success() && stdout.contains("data-path: ok"),
        "the data-path run failed:\n{}",
        failures.join("\n")
    );
    // Every history was checked, and every crash point was reached.
    assert_eq!(stdout.matches("data-path: checking history").count(), 3);
    for point in [
        "client.update-sent",
        "node 1: CRASH POINT node.data-replicating",
        "node 3: CRASH POINT node.data-backup-stored",
    ] {
        assert!(stdout.contains(point), "crash point {point} not reached");
    }
    assert_eq!(stdout.matches("AUDIT ok").count(), 3);
}
