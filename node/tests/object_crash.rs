//! Crash consistency of the object allocator (persist steps P4–P9).
//!
//! A child (`pmgas-node object-exercise`) does seeded random allocations and frees,
//! tagging every object with its own address, and prints each operation once it is
//! durable. The driver crashes it at every persist step (before the step, and torn) and
//! with `kill -9` at random times, reopens the pool, rebuilds the allocator and checks:
//! every object the log says is live is allocated and keeps its tag; every allocated
//! object is live in the log; the one operation in flight at the crash may show either
//! way (an allocation the caller never learned of is the leak window of any allocator
//! that returns addresses; a kill -9 can fall between a free's write-back and its log
//! line); no page leaks; allocations after recovery never hand out a live object.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use pmgas_layout::{ClusterId, GlobalAddr, NodeId};
use pmgas_node::art::SplitMix;
use pmgas_node::{LocalPageIds, ObjectAllocator, OnBlank, Pool, PoolIdentity};

#[path = "support/target.rs"]
mod target;
use target::Target;

const PAGE: u64 = 64 << 10;
const ID: PoolIdentity = PoolIdentity {
    cluster_id: ClusterId(0x0b1e),
    node_id: NodeId(1),
    page_size_bytes: PAGE,
};
const FILE_BYTES: u64 = 16 << 20;

/// Live objects according to the log lines.
fn replay(log: &str) -> (HashSet<u64>, u64) {
    let mut live = HashSet::new();
    let mut ops = 0;
    for line in log.lines() {
        let mut w = line.split_whitespace();
        let (Some(kind), Some(_), Some(addr)) = (
            w.next(),
            w.next(),
            w.next().and_then(|a| a.parse::<u64>().ok()),
        ) else {
            continue;
        };
        match kind {
            "A" => assert!(
                live.insert(addr),
                "the log shows {addr:#x} allocated twice while live"
            ),
            "F" => assert!(
                live.remove(&addr),
                "the log frees {addr:#x}, which was not live"
            ),
            _ => continue,
        }
        ops += 1;
    }
    (live, ops)
}

fn check(t: &Target, live: &HashSet<u64>, in_flight_free_allowed: bool, context: &str) {
    let pool = Pool::open(&t.path, None, OnBlank::Format(ID), Some(ID))
        .unwrap_or_else(|e| panic!("{context}: reopen failed: {e}"));
    assert!(
        pool.corrupt_entries().is_empty(),
        "{context}: corrupt ART entries"
    );
    let alloc = ObjectAllocator::open(Arc::new(pool), Box::new(LocalPageIds), true).unwrap();
    let allocated: HashSet<u64> = alloc
        .allocated()
        .into_iter()
        .map(|(a, _)| a.raw())
        .collect();
    // One operation may have been in flight at the crash. An injected crash stops a free
    // before its only step (P9) lands, so there a live object may never be missing; a
    // kill -9 can land after a free's write-back but before its log line.
    let missing: Vec<u64> = live.difference(&allocated).copied().collect();
    let extra: Vec<u64> = allocated.difference(live).copied().collect();
    let allowed_missing = usize::from(in_flight_free_allowed);
    assert!(
        missing.len() <= allowed_missing && extra.len() <= 1 && missing.len() + extra.len() <= 1,
        "{context}: {} live objects not allocated (such as {:x?}), {} allocated objects the log \
         does not know (such as {:x?})",
        missing.len(),
        &missing[..missing.len().min(8)],
        extra.len(),
        &extra[..extra.len().min(8)]
    );
    for &addr in live.iter().filter(|a| allocated.contains(a)) {
        let ga = GlobalAddr::from_raw(addr, PAGE).unwrap();
        let (page, off) = alloc.page_of(ga).unwrap();
        let mut tag = [0u8; 8];
        alloc.pool().read_in_page(page, off, &mut tag).unwrap();
        assert_eq!(
            u64::from_le_bytes(tag),
            addr,
            "{context}: live object {addr:#x} lost its contents"
        );
    }
    // No page leaks: every ALLOCATED page is a slab (a standalone pool's pages all belong
    // to the object allocator) and no PREALLOCATED page survives recovery.
    let art = alloc.pool().art();
    let allocated_pages = art
        .iter()
        .filter(|(_, r)| r.state == pmgas_layout::PageState::Allocated)
        .count() as u32;
    let preallocated = art
        .iter()
        .filter(|(_, r)| r.state == pmgas_layout::PageState::Preallocated)
        .count();
    assert_eq!(
        preallocated, 0,
        "{context}: PREALLOCATED pages after recovery"
    );
    assert_eq!(
        alloc.stats().slabs,
        allocated_pages,
        "{context}: ALLOCATED pages that are not slabs leaked"
    );
    // A live object whose free landed before the kill (the one `missing` allowed above)
    // is free on PM, so handing it out again is correct; every other live or allocated
    // object must never come back, and the fresh objects must be distinct.
    let mut tc = alloc.thread_cache();
    let mut fresh_seen = HashSet::new();
    for _ in 0..64 {
        let fresh = tc.alloc(16).unwrap().raw();
        let freed_at_crash = missing.contains(&fresh);
        assert!(
            !allocated.contains(&fresh) && (!live.contains(&fresh) || freed_at_crash),
            "{context}: {fresh:#x} handed out twice (allocated on PM: {}, live in the log: {})",
            allocated.contains(&fresh),
            live.contains(&fresh)
        );
        assert!(
            fresh_seen.insert(fresh),
            "{context}: {fresh:#x} handed out twice after recovery"
        );
    }
}

fn ops_per_run() -> u64 {
    if cfg!(feature = "rig") { 25 } else { 60 }
}

fn crash_every_step(mode: &str) -> u64 {
    let seed = 0x000b_1ec7;
    let ops = ops_per_run();
    let t = Target::new("ocrash", mode, FILE_BYTES);
    let mut crashes = 0;
    let mut k = 1;
    loop {
        t.wipe();
        let mut cmd = t.exercise("object-exercise", ID, seed, ops);
        cmd.env("PMGAS_CRASH_AT_PERSIST", k.to_string())
            .env("PMGAS_CRASH_MODE", mode);
        let out = cmd.output().expect("run exerciser");
        let log = String::from_utf8_lossy(&out.stdout);
        let (live, done) = replay(&log);
        if out.status.success() {
            // Step k is past the end of the workload: every step before it was crashed.
            assert_eq!(done, ops);
            break;
        }
        crashes += 1;
        check(
            &t,
            &live,
            false,
            &format!("seed {seed} crash at step {k} ({mode}) after {done} ops"),
        );
        k += 1;
    }
    eprintln!(
        "object crash test ({mode}): {crashes} crashes injected, one at every persist step of {ops} ops"
    );
    crashes
}

#[test]
fn object_crash_before_each_persist_step() {
    assert!(crash_every_step("before") > ops_per_run());
}

#[test]
fn object_torn_write_at_each_persist_step() {
    assert!(crash_every_step("torn") > ops_per_run());
}

#[test]
fn object_kill_minus_nine_at_random_times() {
    let seed: u64 = std::env::var("PMGAS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0b1e_0009);
    eprintln!("object kill -9 seed {seed} (set PMGAS_CRASH_SEED to replay)");
    let mut rng = SplitMix(seed);
    let t = Target::new("ocrash", "kill9", FILE_BYTES);
    let (mut rounds, mut ops_total) = (0, 0);
    for round in 0..10 {
        t.wipe();
        let run_seed = rng.next_u64();
        let cmd = t.exercise("object-exercise", ID, run_seed, 1_000_000);
        let log = target::kill_after_ready(cmd, Duration::from_millis(5 + rng.below(60)));
        let (live, done) = replay(&log);
        check(
            &t,
            &live,
            true,
            &format!("kill -9 round {round} seed {run_seed} after {done} ops"),
        );
        rounds += 1;
        ops_total += done;
    }
    eprintln!("object kill -9 test: {rounds} kills, {ops_total} operations before them");
    assert!(ops_total > 0);
}
