//! Crash consistency of the ART (persist steps P1–P3), sled/TigerBeetle style.
//!
//! A child process (`pmgas-node crash-exercise`) formats a pool and performs a seeded
//! random sequence of ART transitions, printing `DONE i` after each one is durable. The
//! driver crashes it — at every persist step in turn through the fault counter, both
//! before the step's bytes land and with the step torn, and with `kill -9` at random
//! times — then reopens the pool and checks every ART entry against a model replayed from
//! the same seed: the pool must equal the model after the completed operations, or after
//! one more (the operation in flight), and nothing else. The seed is printed on failure.
//!
//! Set `PMGAS_CRASH_PM` to run against another device (the rig runs this on /dev/dax0.0).

use std::io::{BufRead, BufReader};
use std::time::Duration;

use pmgas_layout::{ArtRecord, ClusterId, Epoch, NodeId, PoolHeader};
use pmgas_node::art::{SplitMix, random_op};
use pmgas_node::{ArtState, OnBlank, Pool, PoolIdentity};

#[path = "support/target.rs"]
mod target;
use target::Target;

const ID: PoolIdentity = PoolIdentity {
    cluster_id: ClusterId(0xc4a5),
    node_id: NodeId(1),
    page_size_bytes: 2 << 20,
};
const FILE_BYTES: u64 = 64 << 20;

/// The ART the model predicts after `done` operations.
fn model(page_count: u32, seed: u64, done: u64) -> ArtState {
    let mut art = ArtState::from_entries(vec![Some(ArtRecord::FRESH); page_count as usize]);
    let mut rng = SplitMix(seed);
    for i in 0..done {
        let (page, to, page_id) = random_op(&art, &mut rng, i);
        let (_, rec) = art
            .plan(page, to, page_id, Epoch(1))
            .expect("model op is legal");
        art.apply(page, rec);
    }
    art
}

fn same(a: &ArtState, b: &ArtState) -> bool {
    a.iter().eq(b.iter())
}

/// Reopens the pool after a crash and checks it against the model; returns the number of
/// completed operations the pool reflects.
fn check_recovered(t: &Target, seed: u64, done: u64, context: &str) -> u64 {
    let pool = Pool::open(&t.path, None, OnBlank::Format(ID), Some(ID))
        .unwrap_or_else(|e| panic!("seed {seed} {context}: reopen failed: {e}"));
    assert!(
        pool.corrupt_entries().is_empty(),
        "seed {seed} {context}: corrupt entries {:?}",
        pool.corrupt_entries()
    );
    let page_count = pool.header().page_count;
    let expect_count = PoolHeader::plan(
        ID.cluster_id,
        ID.node_id,
        ID.page_size_bytes,
        t.pool_bytes(),
    )
    .unwrap()
    .page_count;
    assert_eq!(page_count, expect_count, "seed {seed} {context}");
    let got = pool.art();
    if same(&got, &model(page_count, seed, done)) {
        return done;
    }
    if same(&got, &model(page_count, seed, done + 1)) {
        return done + 1;
    }
    let diff: Vec<_> = got
        .iter()
        .zip(model(page_count, seed, done).iter())
        .filter(|(a, b)| a != b)
        .take(4)
        .collect();
    panic!(
        "seed {seed} {context}: pool matches neither {done} nor {} completed ops; first differences {diff:?}",
        done + 1
    );
}

fn last_done(stdout: impl std::io::Read) -> Option<u64> {
    BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            l.strip_prefix("DONE ")
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        })
        .last()
}

fn crash_at_every_step(mode: &str) -> u64 {
    let seed = 0x5eed_0001;
    let ops = 40;
    let t = Target::new("crash", mode, FILE_BYTES);
    // Persist steps of one run: the format's P1 (one per MiB of ART), P2 and P3, then one
    // P4 per operation.
    t.wipe();
    let page_count = PoolHeader::plan(
        ID.cluster_id,
        ID.node_id,
        ID.page_size_bytes,
        t.pool_bytes(),
    )
    .unwrap()
    .page_count;
    let format_steps = (page_count as u64 * 64).div_ceil(1 << 20) + 2;
    let total = format_steps + ops;
    let mut crashes = 0;
    for k in 1..=total {
        t.wipe();
        let mut cmd = t.exercise("crash-exercise", ID, seed, ops);
        cmd.env("PMGAS_CRASH_AT_PERSIST", k.to_string())
            .env("PMGAS_CRASH_MODE", mode);
        let out = cmd.output().expect("run exerciser");
        assert!(
            !out.status.success(),
            "seed {seed}: no crash at persist step {k} of {total} ({mode})"
        );
        crashes += 1;
        let done = last_done(&out.stdout[..]).map_or(0, |d| d + 1);
        let reflected = check_recovered(&t, seed, done, &format!("crash at step {k} ({mode})"));
        // An injected crash stops its step before the publishing bytes land, so the
        // operation in flight never takes effect.
        assert_eq!(
            reflected, done,
            "seed {seed} step {k} ({mode}): a crashed step must not take effect"
        );
    }
    eprintln!(
        "crash test ({mode}): {crashes} crashes injected over {total} persist steps, all recovered"
    );
    crashes
}

#[test]
fn crash_before_each_persist_step() {
    assert!(crash_at_every_step("before") > 40);
}

#[test]
fn torn_write_at_each_persist_step() {
    assert!(crash_at_every_step("torn") > 40);
}

#[test]
fn kill_minus_nine_at_random_times() {
    let seed: u64 = std::env::var("PMGAS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xdead_beef);
    eprintln!("kill -9 test seed {seed} (set PMGAS_CRASH_SEED to replay)");
    let mut rng = SplitMix(seed);
    let t = Target::new("crash", "kill9", FILE_BYTES);
    let rounds = 12;
    let mut completed_total = 0;
    for round in 0..rounds {
        let run_seed = rng.next_u64();
        t.wipe();
        let cmd = t.exercise("crash-exercise", ID, run_seed, 1_000_000);
        let log = target::kill_after_ready(cmd, Duration::from_millis(5 + rng.below(60)));
        let done = last_done(log.as_bytes()).map_or(0, |d| d + 1);
        let reflected = check_recovered(&t, run_seed, done, &format!("kill -9 round {round}"));
        completed_total += reflected;
    }
    eprintln!("kill -9 test: {rounds} kills, {completed_total} operations recovered in total");
    assert!(
        completed_total > 0,
        "the exerciser never completed an operation before being killed"
    );
}

#[test]
fn a_recovered_pool_keeps_working() {
    let t = Target::new("crash", "continue", FILE_BYTES);
    t.wipe();
    let mut cmd = t.exercise("crash-exercise", ID, 7, 30);
    cmd.env("PMGAS_CRASH_AT_PERSIST", "20")
        .env("PMGAS_CRASH_MODE", "torn");
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let pool = Pool::open(&t.path, None, OnBlank::Refuse, Some(ID)).unwrap();
    let art = pool.art();
    // Every page still accepts its legal transitions after the crash.
    for (page, rec) in art.iter().take(8) {
        let to = match rec.state {
            pmgas_layout::PageState::Free => pmgas_layout::PageState::Preallocated,
            _ => pmgas_layout::PageState::Free,
        };
        pool.transition(page, to, pmgas_layout::PageId(0), Epoch(1))
            .unwrap();
    }
}
