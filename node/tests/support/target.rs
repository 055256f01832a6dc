//! Where a crash test's pool lives: the rig's devdax PM when built into the rig's test
//! binary (and failing without it), otherwise a tmpfs file (or `PMGAS_CRASH_PM`).
#![allow(dead_code)] // each test binary that includes this uses a subset

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use pmgas_node::PoolIdentity;

pub struct Target {
    pub path: PathBuf,
    /// Tmpfs files are created (and removed) by the test; devices are wiped before use.
    pub file: bool,
    file_bytes: u64,
}

impl Target {
    pub fn new(prefix: &str, tag: &str, file_bytes: u64) -> Self {
        let device = if cfg!(feature = "rig") {
            let dev = std::env::var("PMGAS_PM_DEVICE").unwrap_or_default();
            assert!(
                !dev.is_empty(),
                "the rig provided no devdax device (PMGAS_PM_DEVICE is empty)"
            );
            Some(dev)
        } else {
            std::env::var("PMGAS_CRASH_PM")
                .ok()
                .filter(|d| !d.is_empty())
        };
        match device {
            Some(dev) => Target {
                path: dev.into(),
                file: false,
                file_bytes,
            },
            None => Target {
                path: format!("/dev/shm/pmgas-{prefix}-{tag}-{}", std::process::id()).into(),
                file: true,
                file_bytes,
            },
        }
    }

    /// `--size-bytes` for the exerciser: only a development file needs one.
    pub fn size_arg(&self) -> Option<u64> {
        self.file.then_some(self.file_bytes)
    }

    /// Makes the pool blank (zero header area), as a first start finds it.
    pub fn wipe(&self) {
        if self.file {
            let _ = std::fs::remove_file(&self.path);
        } else {
            // devdax supports only mmap, not write(2).
            let region = pmgas_node::MappedRegion::open(&self.path, None).expect("map device");
            pmgas_node::pmem::Pmem::new(region).zero("test wipe", 0, 4096);
        }
    }

    /// The `pmgas-node` exerciser `subcommand` on this pool, stdout piped.
    pub fn exercise(&self, subcommand: &str, id: PoolIdentity, seed: u64, ops: u64) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pmgas-node"));
        cmd.arg(subcommand).arg("--pm").arg(&self.path);
        cmd.args([
            "--cluster-id",
            &id.cluster_id.0.to_string(),
            "--node-id",
            &id.node_id.0.to_string(),
        ]);
        cmd.args(["--page-size", &id.page_size_bytes.to_string()]);
        cmd.args(["--seed", &seed.to_string(), "--ops", &ops.to_string()]);
        if let Some(size) = self.size_arg() {
            cmd.args(["--size-bytes", &size.to_string()]);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        cmd
    }

    pub fn pool_bytes(&self) -> u64 {
        if self.file {
            self.file_bytes
        } else {
            pmgas_node::MappedRegion::open(&self.path, None)
                .expect("map device")
                .len() as u64
        }
    }
}

/// Runs an exerciser, waits for its `READY` line (the pool is open: opening a devdax pool
/// in the emulated rig takes longer than any kill window), lets it work for `delay`,
/// kills it with SIGKILL and returns everything it printed.
pub fn kill_after_ready(mut cmd: Command, delay: Duration) -> String {
    let mut child = cmd.spawn().expect("spawn exerciser");
    let stdout = child.stdout.take().expect("exerciser stdout is piped");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line == "READY" {
                let _ = ready_tx.send(());
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    let _ = ready_rx.recv_timeout(Duration::from_secs(60));
    std::thread::sleep(delay);
    child.kill().expect("kill -9");
    child.wait().expect("reap the exerciser");
    reader.join().expect("stdout reader")
}

impl Drop for Target {
    fn drop(&mut self) {
        if self.file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
