//! `pmgas-bench rereplicate`: the foreground side of the re-replication benchmark (#13,
//! `scripts/bench-rereplicate.sh`). Writes 64 bytes, durably, to a page again and again
//! and puts each latency in one of three hdrhistograms by what the cluster is doing when
//! the write starts, as the script signals with files: `before` (no copy), `during` (a
//! node was declared dead and its pages are being copied: `--copy-start` exists,
//! `--copy-end` not yet), `after`. It stops once `--stop` exists and prints one JSON line
//! per phase (p50/p99 from the histograms).

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use pmgas_layout::PageId;

use crate::data::DataReport;
use crate::report::new_histogram;

#[derive(Args)]
pub struct RereplicateArgs {
    #[arg(long)]
    zk: String,
    #[arg(long)]
    cluster: String,
    #[arg(long)]
    bind: Option<std::net::IpAddr>,
    /// The page written to (allocated beforehand; its replicas should live on the nodes
    /// that copy).
    #[arg(long)]
    page_id: u32,
    #[arg(long)]
    copy_start: PathBuf,
    #[arg(long)]
    copy_end: PathBuf,
    #[arg(long)]
    stop: PathBuf,
    /// Printed once the first writes are done (the script waits for it).
    #[arg(long)]
    ready: PathBuf,
    #[arg(long)]
    cpu: Option<usize>,
}

pub fn run(args: &RereplicateArgs) -> Result<(), String> {
    crate::data::pin(args.cpu)?;
    let space = crate::data::connect(&args.zk, &args.cluster, args.bind)?;
    let addr = space
        .addr(PageId(args.page_id), 0)
        .map_err(|e| e.to_string())?;
    let data = [7u8; 64];
    let mut hists = [new_histogram(), new_histogram(), new_histogram()];
    let mut counts = [0u64; 3];
    let mut secs = [0f64; 3];
    let mut failed = 0u64;
    let exists = |p: &Path| p.exists();
    let mut phase = 0usize;
    let mut last_check = Instant::now();
    let mut n = 0u64;
    loop {
        // The files are looked at every 10 ms (a stat per write would cost more than one).
        if n == 0 || last_check.elapsed().as_millis() >= 10 {
            last_check = Instant::now();
            if exists(&args.stop) {
                break;
            }
            phase = match (exists(&args.copy_start), exists(&args.copy_end)) {
                (false, _) => 0,
                (true, false) => 1,
                (true, true) => 2,
            };
        }
        let t = Instant::now();
        match space.write(addr, &data) {
            Ok(()) => {
                let ns = (t.elapsed().as_nanos() as u64).max(1);
                let _ = hists[phase].record(ns);
                counts[phase] += 1;
                secs[phase] += ns as f64 / 1e9;
            }
            // A write waiting out the dead node's declaration may time out; it is not
            // a latency sample.
            Err(_) => failed += 1,
        }
        n += 1;
        if n == 100 {
            std::fs::write(&args.ready, b"").map_err(|e| e.to_string())?;
        }
    }
    for (i, name) in ["write before", "write during copy", "write after"]
        .iter()
        .enumerate()
    {
        if counts[i] == 0 {
            continue;
        }
        let r = DataReport::of(name, 64, 1, 1, &hists[i], counts[i], secs[i]);
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
    }
    eprintln!("rereplicate: {n} writes, {failed} failed");
    Ok(())
}
