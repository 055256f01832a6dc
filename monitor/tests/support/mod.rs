//! What the rig tests that drive a script share: the rig check and the run.

use std::path::PathBuf;
use std::process::{Command, ExitStatus};

/// Runs `scripts/<script>` on the rig with the test binaries' directory as `PMGAS_BIN`;
/// prints its output (shown when the test fails) and returns stdout and the exit status.
pub fn run_rig_script(script: &str) -> (String, ExitStatus) {
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
        .arg(root.join("scripts").join(script))
        .env("PMGAS_BIN", &bin_dir)
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (stdout, out.status)
}
