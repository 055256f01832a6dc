//! Named crash points for the crash-injection suite (`scripts/crash-suite.sh`).
//!
//! `PMGAS_CRASH_AT=<point>[:<n>]` makes the process kill itself with SIGKILL the `n`-th
//! time (default: the first) it passes `point`: no destructor, no flush, no unwinding, as
//! `kill -9` from outside, but at a chosen step of the protocol. `PMGAS_STOP_AT` (same
//! form) stops it there instead (SIGSTOP, every thread, as `kill -STOP` from outside)
//! until someone sends SIGCONT: a hung process, caught at a chosen step. Unset
//! (production), a crash point costs one relaxed atomic load.
//!
//! The points are named `<process>.<step>`; the list is in [`POINTS`] and every one is
//! exercised by the suite.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Every crash point in the code, with the step it stands for.
pub const POINTS: &[(&str, &str)] = &[
    (
        "monitor.prepare-sent",
        "Prepare sent to a backup, before its answer",
    ),
    (
        "monitor.persist-queued",
        "all replicas prepared, the mapping handed to the GAT writer",
    ),
    (
        "monitor.gat-written",
        "the GAT write acknowledged by ZooKeeper, nothing committed yet",
    ),
    (
        "monitor.commit-sent",
        "a Commit sent (to a backup or the primary)",
    ),
    ("monitor.abort-sent", "an Abort sent"),
    (
        "monitor.node-declared-dead",
        "a data server's death and the new epoch stored, before the nodes hear of it",
    ),
    (
        "monitor.elected",
        "won the election, before reloading the GAT",
    ),
    (
        "monitor.reconcile-sent",
        "recovery: part of a node's GAT sent for reconciliation",
    ),
    (
        "node.preallocated",
        "primary: page PREALLOCATED durably, AllocPage sent",
    ),
    (
        "node.prepared",
        "backup: page PREALLOCATED durably, before answering Prepared",
    ),
    (
        "node.backup-committed",
        "backup: page ALLOCATED durably, before the CommitAck",
    ),
    (
        "node.primary-committed",
        "primary: page ALLOCATED durably, before the caller is answered",
    ),
    (
        "node.reconciling",
        "recovery: one ART page changed to agree with the GAT, the rest not yet",
    ),
    (
        "node.reconciled",
        "recovery: the ART reconciled with the GAT, before answering",
    ),
];

struct Plan {
    point: String,
    at: u64,
    seen: AtomicU64,
    /// SIGSTOP (PMGAS_STOP_AT) rather than SIGKILL (PMGAS_CRASH_AT).
    stop: bool,
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let (spec, stop) = match std::env::var("PMGAS_CRASH_AT") {
            Ok(spec) => (spec, false),
            Err(_) => (std::env::var("PMGAS_STOP_AT").ok()?, true),
        };
        let (point, at) = match spec.rsplit_once(':') {
            Some((p, n)) => (p.to_owned(), n.parse().ok()?),
            None => (spec, 1),
        };
        Some(Plan {
            point,
            at,
            seen: AtomicU64::new(0),
            stop,
        })
    })
    .as_ref()
}

/// Milliseconds since the Unix epoch: the `unix_ms=` of log lines whose times are
/// compared across processes (crash points, monitor election and readiness).
pub fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Kills this process (SIGKILL) if it was told to crash at `point` and this is the time;
/// or stops it (SIGSTOP) if it was told to stop there, and goes on once continued.
pub fn point(name: &str) {
    let Some(p) = plan() else { return };
    if p.point != name || p.seen.fetch_add(1, Ordering::Relaxed) + 1 != p.at {
        return;
    }
    let (what, signal) = if p.stop {
        ("STOP", libc::SIGSTOP)
    } else {
        ("CRASH", libc::SIGKILL)
    };
    eprintln!(
        "{what} POINT {name} pid={} unix_ms={}",
        std::process::id(),
        unix_ms()
    );
    // SAFETY: a plain syscall on our own pid; either signal acts on every thread.
    unsafe {
        libc::kill(libc::getpid(), signal);
    }
    if p.stop {
        eprintln!("CONTINUED at {name} unix_ms={}", unix_ms());
        return;
    }
    std::process::abort();
}
