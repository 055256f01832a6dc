//! `pmgas-bench cache`: the coherent block cache (#12, `node/CACHE.md`) against a running
//! cluster, through the client API:
//!
//! - `hit`: a cached read of 64 B and 4 KiB, next to a copy of as many bytes from DRAM in
//!   this process (`dram-copy`);
//! - `miss`: a fill of a 64 B and a 4 KiB block (the registration SEND with READs of the
//!   version word, the block, the version word and the ART entry), next to an uncached
//!   read of as many bytes (`read-uncached`); `scripts/bench-data.sh` puts `ib_read_lat`
//!   beside it;
//! - `write`: an 8-byte write of a block that 0, 1 or 2 other handles cache (each with its
//!   own cache and invalidation thread, filled again before every timed write);
//! - `ycsb-b`: 95 % reads and 5 % writes of 64-byte records, zipfian (0.99, scrambled)
//!   over 10^5 records, by 4 client handles on 4 threads, without the cache and with it:
//!   throughput and per-operation p50/p99.

use std::net::IpAddr;
use std::sync::Barrier;
use std::time::Instant;

use clap::Args;
use pmgas_layout::{GlobalAddr, NodeId, PageId};
use pmgas_node::blockcache::CacheConfig;
use pmgas_node::space::{Space, SpaceConfig};
use rand::SeedableRng;
use rand_distr::{Distribution, Zipf};
use serde::Serialize;

use crate::data::DataReport;
use crate::report::new_histogram;

#[derive(Args)]
pub struct CacheArgs {
    #[arg(long)]
    zk: String,
    #[arg(long)]
    cluster: String,
    /// The measuring client's address (picks its RDMA device).
    #[arg(long)]
    bind: Option<IpAddr>,
    /// The other sharers' addresses, one handle each (the write measurement uses up to 2).
    #[arg(long, value_delimiter = ',')]
    sharer_binds: Vec<IpAddr>,
    /// The primary of the measured pages (hit, miss, write).
    #[arg(long, default_value_t = 1)]
    primary: u32,
    #[arg(long, default_value_t = 2000)]
    iters: u64,
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Pin the measuring thread to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Which measurements (comma-separated: hit, miss, write, ycsb).
    #[arg(long, value_delimiter = ',', default_value = "hit,miss,write,ycsb")]
    ops: Vec<String>,
    /// YCSB-B: records (one cache block each).
    #[arg(long, default_value_t = 100_000)]
    ycsb_records: u64,
    #[arg(long, default_value_t = 64)]
    ycsb_record_bytes: usize,
    #[arg(long, default_value_t = 4)]
    ycsb_clients: usize,
    /// Timed operations per client.
    #[arg(long, default_value_t = 20000)]
    ycsb_ops: u64,
    /// Operations per client before the timed ones (the caches warm up).
    #[arg(long, default_value_t = 20000)]
    ycsb_warmup: u64,
    #[arg(long, default_value_t = 0.99)]
    ycsb_theta: f64,
    /// Backups of the records' pages.
    #[arg(long, default_value_t = 1)]
    ycsb_backups: u8,
    /// One JSON object per line instead of the table.
    #[arg(long)]
    json: bool,
}

/// One measurement, as `--json` prints it.
#[derive(Debug, Serialize)]
struct CacheReport {
    #[serde(flatten)]
    base: DataReport,
    /// Other handles caching the written block (write).
    sharers: usize,
    cached: bool,
    /// The cache's hits and misses over the measurement (all clients).
    hits: u64,
    misses: u64,
    /// YCSB: how many records the keys are drawn from.
    records: u64,
}

fn cache_config(block_bytes: usize, budget_bytes: usize) -> CacheConfig {
    CacheConfig {
        block_bytes,
        budget_bytes,
        ..CacheConfig::default()
    }
}

pub fn run(args: &CacheArgs) -> Result<(), String> {
    crate::data::pin(args.cpu)?;
    let handle = |bind: Option<IpAddr>, cache: Option<CacheConfig>| {
        let mut config = SpaceConfig::new(&args.zk, &args.cluster);
        config.bind = bind;
        config.cache = cache;
        Space::connect(config).map_err(|e| e.to_string())
    };
    let e = |e: pmgas_node::space::SpaceError| e.to_string();
    let plain = handle(args.bind, None)?;
    let primary = NodeId(args.primary);
    let page = plain.alloc_page(0, Some(primary)).map_err(e)?.page_id;
    let addr = |p: PageId, offset: u64| plain.addr(p, offset).map_err(e);
    plain.write(addr(page, 0)?, &[7u8; 4096]).map_err(e)?;
    let want = |op: &str| args.ops.iter().any(|o| o == op);
    let show = |r: CacheReport| {
        if args.json {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
        } else {
            println!(
                "{:<14} {:>5} B  sharers {}  cached {:<5}: p50 {:>9.2} us  p99 {:>9.2} us  {:>10.0} ops/s  hits {} misses {}",
                r.base.op,
                r.base.size_bytes,
                r.sharers,
                r.cached,
                r.base.p50_ns as f64 / 1e3,
                r.base.p99_ns as f64 / 1e3,
                r.base.ops_per_s,
                r.hits,
                r.misses
            );
        }
    };
    let report = |base: DataReport, sharers: usize, cached: bool, stats: (u64, u64)| {
        show(CacheReport {
            base,
            sharers,
            cached,
            hits: stats.0,
            misses: stats.1,
            records: 0,
        })
    };
    let counters = |s: &Space| s.cache_stats().map_or((0, 0), |c| (c.hits, c.misses));
    let delta = |a: (u64, u64), b: (u64, u64)| (b.0 - a.0, b.1 - a.1);

    if want("hit") {
        let cached = handle(args.bind, Some(CacheConfig::default()))?;
        for size in [64usize, 4096] {
            let a = addr(page, 0)?;
            let mut buf = vec![0u8; size];
            cached.read(a, &mut buf).map_err(e)?;
            let before = counters(&cached);
            let r = timed("hit", size, args, || cached.read(a, &mut buf).map_err(e))?;
            report(r, 0, true, delta(before, counters(&cached)));
            let src = vec![7u8; size];
            let r = timed("dram-copy", size, args, || {
                buf.copy_from_slice(std::hint::black_box(&src));
                std::hint::black_box(&buf);
                Ok(())
            })?;
            report(r, 0, false, (0, 0));
        }
    }
    if want("miss") {
        for size in [64usize, 4096] {
            // A budget of one block, two blocks read in turn: every read is a fill.
            let cached = handle(args.bind, Some(cache_config(size, size)))?;
            let blocks = [addr(page, 0)?, addr(page, size as u64)?];
            let mut buf = vec![0u8; size];
            let mut turn = 0usize;
            let before = counters(&cached);
            let r = timed("miss", size, args, || {
                turn += 1;
                cached.read(blocks[turn % 2], &mut buf).map_err(e)
            })?;
            report(r, 0, true, delta(before, counters(&cached)));
            let r = timed("read-uncached", size, args, || {
                cached.read_with(blocks[0], &mut buf, false).map_err(e)
            })?;
            report(r, 0, false, (0, 0));
        }
    }
    if want("write") {
        let sharers: Vec<Space> = args
            .sharer_binds
            .iter()
            .take(2)
            .map(|b| handle(Some(*b), Some(CacheConfig::default())))
            .collect::<Result<_, _>>()?;
        let a = addr(page, 8192)?;
        for k in 0..=sharers.len() {
            let mut hist = new_histogram();
            let mut word = [0u8; 8];
            let mut fills = (0u64, 0u64);
            for i in 0..args.warmup + args.iters {
                // Every sharer caches the block again (the last write invalidated it).
                for s in &sharers[..k] {
                    let b = counters(s);
                    s.read(a, &mut word).map_err(e)?;
                    let d = delta(b, counters(s));
                    fills = (fills.0 + d.0, fills.1 + d.1);
                }
                let t = Instant::now();
                plain.write(a, &i.to_le_bytes()).map_err(e)?;
                if i >= args.warmup {
                    let _ = hist.record((t.elapsed().as_nanos() as u64).max(1));
                }
            }
            let secs = hist.mean() * hist.len() as f64 / 1e9;
            let r = DataReport::of("write", 8, 0, 1, &hist, hist.len(), secs);
            report(r, k, false, fills);
        }
    }
    if want("ycsb") {
        ycsb(args, &handle, &show)?;
    }
    Ok(())
}

/// `iters` timed calls of `op` after `warmup` untimed ones.
fn timed(
    name: &str,
    size: usize,
    args: &CacheArgs,
    op: impl FnMut() -> Result<(), String>,
) -> Result<DataReport, String> {
    crate::data::timed(name, size, 0, 1, args.iters, args.warmup, op)
}

/// YCSB-B without and with the cache.
fn ycsb(
    args: &CacheArgs,
    handle: &dyn Fn(Option<IpAddr>, Option<CacheConfig>) -> Result<Space, String>,
    show: &dyn Fn(CacheReport),
) -> Result<(), String> {
    let e = |e: pmgas_node::space::SpaceError| e.to_string();
    let setup = handle(args.bind, None)?;
    let page_bytes = setup.page_size_bytes().map_err(e)?;
    let record = args.ycsb_record_bytes as u64;
    let per_page = page_bytes / record;
    let pages_needed = args.ycsb_records.div_ceil(per_page);
    let mut pages = vec![];
    for _ in 0..pages_needed {
        pages.push(
            setup
                .alloc_page(args.ycsb_backups, None)
                .map_err(e)?
                .page_id,
        );
    }
    let record_addr = |s: &Space, i: u64| -> Result<GlobalAddr, String> {
        s.addr(pages[(i / per_page) as usize], (i % per_page) * record)
            .map_err(e)
    };
    let zipf = Zipf::new(args.ycsb_records as f64, args.ycsb_theta).map_err(|e| e.to_string())?;
    for cached in [false, true] {
        let cache = cached.then(|| cache_config(args.ycsb_record_bytes, 64 << 20));
        let clients: Vec<Space> = (0..args.ycsb_clients)
            .map(|_| handle(args.bind, cache))
            .collect::<Result<_, _>>()?;
        // Warm-up done, then timed part started: the counters are read in between.
        let (warmed, go) = (
            Barrier::new(clients.len() + 1),
            Barrier::new(clients.len() + 1),
        );
        let stats = || {
            clients
                .iter()
                .filter_map(Space::cache_stats)
                .fold((0, 0), |a, c| (a.0 + c.hits, a.1 + c.misses))
        };
        let mut warm = (0, 0);
        let (hists, secs) = std::thread::scope(|scope| -> Result<_, String> {
            let workers: Vec<_> = clients
                .iter()
                .enumerate()
                .map(|(t, space)| {
                    let (warmed, go) = (&warmed, &go);
                    let record_addr = &record_addr;
                    let zipf = &zipf;
                    scope.spawn(move || -> Result<_, String> {
                        let mut rng = rand::rngs::SmallRng::seed_from_u64(t as u64 + 1);
                        let mut buf = vec![0u8; args.ycsb_record_bytes];
                        let value = vec![t as u8; args.ycsb_record_bytes];
                        let mut hist = new_histogram();
                        let mut op = |timed: bool, hist: &mut hdrhistogram::Histogram<u64>| {
                            let rank = zipf.sample(&mut rng) as u64;
                            // Scrambled, as YCSB's: the hot records are spread over pages.
                            let i = pmgas_node::fnv1a(&rank.to_le_bytes()) % args.ycsb_records;
                            let a = record_addr(space, i)?;
                            let t0 = Instant::now();
                            if rand::RngExt::random_range(&mut rng, 0..100) < 95 {
                                space.read(a, &mut buf).map_err(e)?;
                            } else {
                                space.write(a, &value).map_err(e)?;
                            }
                            if timed {
                                let _ = hist.record((t0.elapsed().as_nanos() as u64).max(1));
                            }
                            Ok::<(), String>(())
                        };
                        for _ in 0..args.ycsb_warmup {
                            op(false, &mut hist)?;
                        }
                        warmed.wait();
                        go.wait();
                        for _ in 0..args.ycsb_ops {
                            op(true, &mut hist)?;
                        }
                        Ok(hist)
                    })
                })
                .collect();
            warmed.wait();
            warm = stats();
            let start = Instant::now();
            go.wait();
            let mut hists = vec![];
            for w in workers {
                hists.push(w.join().map_err(|_| "a YCSB client panicked")??);
            }
            Ok((hists, start.elapsed().as_secs_f64()))
        })?;
        let mut all = new_histogram();
        for h in &hists {
            all.add(h).map_err(|e| e.to_string())?;
        }
        // The counters of the timed part only.
        let (hits, misses) = stats();
        let (hits, misses) = (hits - warm.0, misses - warm.1);
        let ops = args.ycsb_ops * clients.len() as u64;
        let base = DataReport::of(
            "ycsb-b",
            args.ycsb_record_bytes,
            args.ycsb_backups,
            clients.len(),
            &all,
            ops,
            secs,
        );
        show(CacheReport {
            base,
            sharers: 0,
            cached,
            hits,
            misses,
            records: args.ycsb_records,
        });
    }
    Ok(())
}
