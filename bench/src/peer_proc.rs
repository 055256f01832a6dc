//! Starting, pinning and stopping the peer process the benchmarks talk to.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use pmgas_verbs::ConnectionConfig;
use pmgas_verbs::peer::{PeerProcess, RegionSpec};

/// Pins the calling thread to `cpu`; a missing CPU is reported, not fatal.
pub fn pin(cpu: usize) -> bool {
    let ok = core_affinity::get_core_ids()
        .and_then(|ids| ids.into_iter().find(|c| c.id == cpu))
        .is_some_and(core_affinity::set_for_current);
    if !ok {
        eprintln!("pmgas-bench: could not pin to cpu {cpu}; running unpinned");
    }
    ok
}

/// The peer entry point (`pmgas-bench verbs-peer`).
pub fn serve(bind: SocketAddr, region: &str, cpu: Option<usize>) -> Result<(), String> {
    if let Some(cpu) = cpu {
        pin(cpu);
    }
    let spec: RegionSpec = region.parse()?;
    pmgas_verbs::peer::serve(bind, &spec, &ConnectionConfig::default()).map_err(|e| e.to_string())
}

/// Starts this binary's `verbs-peer` on `bind`.
pub fn spawn(bind: SocketAddr, region: &str, cpu: Option<usize>) -> Result<PeerProcess, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "verbs-peer",
        "--bind",
        &bind.to_string(),
        "--region",
        region,
    ]);
    if let Some(cpu) = cpu {
        cmd.args(["--cpu", &cpu.to_string()]);
    }
    PeerProcess::spawn(cmd, bind, Duration::from_secs(60)).map_err(|e| e.to_string())
}
