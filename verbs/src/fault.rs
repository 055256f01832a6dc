//! Named crash points for the crash-injection suite (`scripts/crash-suite.sh`).
//!
//! `PMGAS_CRASH_AT=<point>[:<n>]` makes the process kill itself with SIGKILL the `n`-th
//! time (default: the first) it passes `point`: no destructor, no flush, no unwinding, as
//! `kill -9` from outside, but at a chosen step of the protocol. `PMGAS_STOP_AT` (same
//! form) stops it there instead (SIGSTOP, every thread, as `kill -STOP` from outside)
//! until someone sends SIGCONT: a hung process, caught at a chosen step. Unset
//! (production), a crash point costs one relaxed atomic load.
//!
//! `PMGAS_CRASH_ARMED_BY=<file>` counts passes only once that file exists: a script arms
//! a long-running process at the moment its scenario starts (the data-path test arms a
//! node's crash point when the phase that must see it begins), whatever the process did
//! before.
//!
//! The points are named `<process>.<step>`; the list is in [`POINTS`]. The allocation and
//! recovery points are exercised by the crash suite (`scripts/crash-suite.sh`), the data
//! path's by `scripts/data-path.sh` (`client.update-sent`, `node.data-replicating`,
//! `node.data-backup-stored`, `monitor.tombstone-written`; `node.data-applied`,
//! `monitor.free-sent` and `node.replica-freed` by none yet), re-replication's by both
//! (`monitor.rereplicate-copying` and `-mapped` by the suite, `node.rereplicate-target` by
//! the data-path test; the others by none yet).

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
        "monitor.tombstone-written",
        "free: the page's tombstone stored in ZooKeeper, no replica told yet",
    ),
    (
        "monitor.free-sent",
        "free: FreeReplicas sent to one replica, before its answer",
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
    (
        "node.data-replicating",
        "primary: an update's Replicates sent to its backups, before their acks",
    ),
    (
        "node.data-backup-stored",
        "backup: a Replicate's bytes stored durably, before the ack",
    ),
    (
        "node.data-applied",
        "primary: an update stored durably in its own copy, before the client is answered",
    ),
    (
        "node.replica-freed",
        "free: a replica zeroed and FREE durably, before the monitor is answered",
    ),
    (
        "monitor.rereplicate-prepared",
        "re-replication: the target prepared a page, AddReplica not yet sent",
    ),
    (
        "monitor.rereplicate-copying",
        "re-replication: AddReplica sent to the page's primary, the copy under way",
    ),
    (
        "monitor.rereplicate-persist-queued",
        "re-replication: the copy acknowledged, the mapping with the target handed to the GAT writer",
    ),
    (
        "monitor.rereplicate-mapped",
        "re-replication: the mapping with the target stored in ZooKeeper, the target not committed",
    ),
    (
        "monitor.rereplicate-committed",
        "re-replication: the target committed, the primary not yet told",
    ),
    (
        "node.rereplicate-prepared",
        "re-replication target: a page PREALLOCATED durably for the copy, before answering",
    ),
    (
        "node.rereplicate-copying",
        "re-replication source (primary): the copy's first chunk acknowledged by the target",
    ),
    (
        "node.rereplicate-target",
        "re-replication target: a chunk of the copy stored in its prepared page, before the ack",
    ),
    (
        "client.update-sent",
        "client: an update sent and answered, before the caller learns the answer",
    ),
];

struct Plan {
    point: String,
    at: u64,
    seen: AtomicU64,
    /// SIGSTOP (PMGAS_STOP_AT) rather than SIGKILL (PMGAS_CRASH_AT).
    stop: bool,
    /// PMGAS_CRASH_ARMED_BY: passes count once this file exists.
    armed_by: Option<std::path::PathBuf>,
    armed: std::sync::atomic::AtomicBool,
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
        let armed_by = std::env::var_os("PMGAS_CRASH_ARMED_BY").map(Into::into);
        Some(Plan {
            point,
            at,
            seen: AtomicU64::new(0),
            stop,
            armed: std::sync::atomic::AtomicBool::new(armed_by.is_none()),
            armed_by,
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
    if p.point != name {
        return;
    }
    if !p.armed.load(Ordering::Relaxed) {
        if !p.armed_by.as_ref().is_some_and(|f| f.exists()) {
            return;
        }
        p.armed.store(true, Ordering::Relaxed);
        eprintln!("ARMED POINT {name} unix_ms={}", unix_ms());
    }
    if p.seen.fetch_add(1, Ordering::Relaxed) + 1 != p.at {
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
