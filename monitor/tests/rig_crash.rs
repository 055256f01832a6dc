//! The crash-injection suite on the rig (scripts/crash-suite.sh): every scenario kills a
//! monitor or a node at a named step of the two-phase allocation or of recovery, restarts
//! it, and checks the GAT against every ART. Any violated invariant fails this test.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn crash_injection_suite_keeps_every_invariant() {
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
        .arg(root.join("scripts/crash-suite.sh"))
        .env("PMGAS_BIN", &bin_dir)
        .output()
        .expect("run scripts/crash-suite.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.contains("scenarios executed"))
        .expect("the suite printed no summary");
    let number = |after: &str| -> u32 {
        let i = summary.find(after).expect("summary field") + after.len();
        summary[i..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a count")
    };
    let ran = number("crash-suite: ");
    let failed = summary
        .split(", ")
        .find_map(|p| p.strip_suffix(" failed"))
        .and_then(|n| n.parse::<u32>().ok())
        .expect("failed count");
    assert!(ran >= 16, "only {ran} crash scenarios ran");
    let which: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("crash-suite: FAILED "))
        .collect();
    assert_eq!(
        failed,
        0,
        "crash scenarios violated an invariant: {summary}\n{}",
        which.join("\n")
    );
    assert!(out.status.success(), "the crash suite failed");
}
