//! The crash-injection suite on the rig (scripts/crash-suite.sh): every scenario kills a
//! monitor or a node at a named step of the two-phase allocation or of recovery, restarts
//! it, and checks the GAT against every ART. Any violated invariant fails this test.

mod support;

#[test]
fn crash_injection_suite_keeps_every_invariant() {
    let (stdout, status) = support::run_rig_script("crash-suite.sh");
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
    assert!(ran >= 18, "only {ran} crash scenarios ran");
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
    assert!(status.success(), "the crash suite failed");
}
