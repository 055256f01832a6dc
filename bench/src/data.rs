//! `pmgas-bench data`: latency and throughput of the data path through the client API
//! ([`pmgas_node::space::Space`]) against a running cluster: reads (one-sided READs of the
//! primary), durable writes, CAS and FAA with 0, 1 and 2 backups, and batches of 4 KiB
//! reads and writes with 16 in flight. Every line names the persistence mode (`cpu`: the
//! nodes' CPUs store and write back every byte before acknowledging, `node/DATAPATH.md`).
//! `scripts/bench-data.sh` runs it beside perftest and librpma in one rig boot.

use std::time::{Duration, Instant};

use clap::Args;
use pmgas_layout::{GlobalAddr, NodeId, PageId};
use pmgas_node::space::{BatchResult, Space, SpaceConfig};
use serde::Serialize;

use crate::report::new_histogram;

#[derive(Args)]
pub struct DataArgs {
    #[arg(long)]
    zk: String,
    #[arg(long)]
    cluster: String,
    /// The client's address (picks its RDMA device).
    #[arg(long)]
    bind: Option<std::net::IpAddr>,
    /// The node that is primary of every measured page.
    #[arg(long, default_value_t = 1)]
    primary: u32,
    /// Timed operations per measurement (batches: per batch).
    #[arg(long, default_value_t = 2000)]
    iters: u64,
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Operations in flight in the batched measurements.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Pin the client to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Which measurements (comma-separated: read, write, cas, faa, batch-read, batch-write).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "read,write,cas,faa,batch-read,batch-write"
    )]
    ops: Vec<String>,
    /// Backup counts to measure updates with.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    backups: Vec<u8>,
    /// One JSON object per line instead of the table.
    #[arg(long)]
    json: bool,
}

/// One measurement, as `--json` prints it.
#[derive(Debug, Serialize)]
pub(crate) struct DataReport {
    pub(crate) op: String,
    pub(crate) size_bytes: usize,
    pub(crate) backups: u8,
    pub(crate) persist_mode: &'static str,
    pub(crate) in_flight: usize,
    pub(crate) iters: u64,
    pub(crate) p50_ns: u64,
    pub(crate) p99_ns: u64,
    pub(crate) p999_ns: u64,
    pub(crate) max_ns: u64,
    pub(crate) ops_per_s: f64,
}

impl DataReport {
    /// A report of the latencies in `hist`, `ops` operations in `secs`.
    pub(crate) fn of(
        name: &str,
        size: usize,
        backups: u8,
        in_flight: usize,
        hist: &hdrhistogram::Histogram<u64>,
        ops: u64,
        secs: f64,
    ) -> Self {
        Self {
            op: name.to_owned(),
            size_bytes: size,
            backups,
            persist_mode: "cpu",
            in_flight,
            iters: hist.len(),
            p50_ns: hist.value_at_quantile(0.50),
            p99_ns: hist.value_at_quantile(0.99),
            p999_ns: hist.value_at_quantile(0.999),
            max_ns: hist.max(),
            ops_per_s: ops as f64 / secs.max(1e-9),
        }
    }
}

/// Pins the calling thread to `cpu`, if given (every client-side benchmark does).
pub(crate) fn pin(cpu: Option<usize>) -> Result<(), String> {
    if let Some(cpu) = cpu
        && !core_affinity::set_for_current(core_affinity::CoreId { id: cpu })
    {
        return Err(format!("could not pin to cpu {cpu}"));
    }
    Ok(())
}

/// A handle on the cluster's address space, from `bind` (which picks the RDMA device).
pub(crate) fn connect(
    zk: &str,
    cluster: &str,
    bind: Option<std::net::IpAddr>,
) -> Result<Space, String> {
    let mut config = SpaceConfig::new(zk, cluster);
    config.bind = bind;
    Space::connect(config).map_err(|e| e.to_string())
}

pub fn run(args: &DataArgs) -> Result<(), String> {
    pin(args.cpu)?;
    let space = connect(&args.zk, &args.cluster, args.bind)?;
    let primary = NodeId(args.primary);
    let mut pages: Vec<(u8, PageId)> = vec![];
    for &b in &args.backups {
        let m = space
            .alloc_page(b, Some(primary))
            .map_err(|e| format!("allocating a page with {b} backups on {primary}: {e}"))?;
        pages.push((b, m.page_id));
    }
    let page_of = |b: u8| pages.iter().find(|(n, _)| *n == b).map(|(_, p)| *p);
    let read_page = pages.last().map(|(_, p)| *p).ok_or("no page to read")?;
    if !args.json {
        println!(
            "data: client {} -> primary {primary}; persist_mode=cpu; {} iterations per line",
            args.bind.map_or("(route)".to_string(), |b| b.to_string()),
            args.iters
        );
    }
    let want = |op: &str| args.ops.iter().any(|o| o == op);
    let show = |r: DataReport| {
        if args.json {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
        } else {
            println!(
                "{:<11} {:>5} B  backups {}  in flight {:>2}: p50 {:>9.2} us  p99 {:>9.2} us  p999 {:>9.2} us  {:>10.0} ops/s",
                r.op,
                r.size_bytes,
                r.backups,
                r.in_flight,
                r.p50_ns as f64 / 1e3,
                r.p99_ns as f64 / 1e3,
                r.p999_ns as f64 / 1e3,
                r.ops_per_s
            );
        }
    };
    let addr = |page: PageId, offset: u64| space.addr(page, offset).map_err(|e| e.to_string());
    let backups_of_read = pages.last().map_or(0, |(b, _)| *b);
    // Every update page is written once first: a page's first update per primary process
    // also copies it to its backups (D2a), which is not what is measured.
    for (_, p) in &pages {
        space
            .write(addr(*p, 0)?, &[0u8; 8])
            .map_err(|e| e.to_string())?;
    }
    if want("read") {
        for size in [8usize, 4096] {
            let a = addr(read_page, 0)?;
            let mut buf = vec![0u8; size];
            show(measure("read", size, backups_of_read, 1, args, || {
                space.read(a, &mut buf).map_err(|e| e.to_string())
            })?);
        }
    }
    for &b in &args.backups {
        let Some(page) = page_of(b) else { continue };
        if want("write") {
            for size in [8usize, 4096] {
                let a = addr(page, 4096)?;
                let data = vec![0x5au8; size];
                show(measure("write", size, b, 1, args, || {
                    space.write(a, &data).map_err(|e| e.to_string())
                })?);
            }
        }
        if want("cas") {
            let a = addr(page, 8)?;
            let mut current = space.read_u64(a).map_err(|e| e.to_string())?;
            show(measure("cas", 8, b, 1, args, || {
                let old = space
                    .compare_and_swap(a, current, current + 1)
                    .map_err(|e| e.to_string())?;
                if old != current {
                    return Err(format!("CAS found {old}, expected {current}"));
                }
                current += 1;
                Ok(())
            })?);
        }
        if want("faa") {
            let a = addr(page, 16)?;
            show(measure("faa", 8, b, 1, args, || {
                space.fetch_add(a, 1).map(|_| ()).map_err(|e| e.to_string())
            })?);
        }
    }
    if want("batch-read") {
        let addrs: Vec<GlobalAddr> = (0..args.batch as u64)
            .map(|i| {
                addr(
                    read_page,
                    (i * 4096) % (space.page_size_bytes().unwrap_or(65536)),
                )
            })
            .collect::<Result<_, _>>()?;
        show(measure(
            "batch-read",
            4096,
            backups_of_read,
            args.batch,
            args,
            || {
                let mut b = space.batch();
                for a in &addrs {
                    b.read(*a, 4096);
                }
                check_batch(b.quiet())
            },
        )?);
    }
    if want("batch-write") {
        for &bk in &args.backups {
            let Some(page) = page_of(bk) else { continue };
            let data = vec![0xa5u8; 4096];
            let page_bytes = space.page_size_bytes().map_err(|e| e.to_string())?;
            let addrs: Vec<GlobalAddr> = (0..args.batch as u64)
                .map(|i| addr(page, (i * 4096) % page_bytes))
                .collect::<Result<_, _>>()?;
            show(measure("batch-write", 4096, bk, args.batch, args, || {
                let mut b = space.batch();
                for a in &addrs {
                    b.write(*a, &data);
                }
                check_batch(b.quiet())
            })?);
        }
    }
    Ok(())
}

fn check_batch(
    results: Vec<Result<BatchResult, pmgas_node::space::SpaceError>>,
) -> Result<(), String> {
    results
        .into_iter()
        .try_for_each(|r| r.map(|_| ()).map_err(|e| e.to_string()))
}

/// Runs `op` for the warm-up and then `iters` timed calls; `in_flight` operations per
/// call. Latency is per call; throughput counts operations.
fn measure(
    name: &str,
    size: usize,
    backups: u8,
    in_flight: usize,
    args: &DataArgs,
    op: impl FnMut() -> Result<(), String>,
) -> Result<DataReport, String> {
    timed(name, size, backups, in_flight, args.iters, args.warmup, op)
}

/// `iters` timed calls of `op` after `warmup` untimed ones; `in_flight` operations per
/// call. Latency is per call; throughput counts operations.
pub(crate) fn timed(
    name: &str,
    size: usize,
    backups: u8,
    in_flight: usize,
    iters: u64,
    warmup: u64,
    mut op: impl FnMut() -> Result<(), String>,
) -> Result<DataReport, String> {
    for _ in 0..warmup {
        op()?;
    }
    let mut hist = new_histogram();
    let start = Instant::now();
    for _ in 0..iters {
        let t = Instant::now();
        op()?;
        let _ = hist.record((t.elapsed().as_nanos() as u64).max(1));
    }
    let secs = start.elapsed().max(Duration::from_nanos(1)).as_secs_f64();
    Ok(DataReport::of(
        name,
        size,
        backups,
        in_flight,
        &hist,
        iters * in_flight as u64,
        secs,
    ))
}
