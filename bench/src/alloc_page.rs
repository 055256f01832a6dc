//! `pmgas-bench alloc-page`: replicated page allocation through the client API, at several
//! concurrency levels, side by side with a plain ZooKeeper create of the same payload on
//! the same server (the floor: every allocation makes its mapping durable in ZooKeeper
//! before anything is committed).
//!
//! This process is a data node (the primary of every page it allocates); the monitor and
//! the backup nodes run as their own processes (`scripts/bench-alloc.sh` starts them).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pmgas_layout::gat::{Mapping, encode_chunk};
use pmgas_layout::wire::Replica;
use pmgas_layout::{ClusterId, NodeId, PageId, PageIndex};
use pmgas_node::{Client, ClientConfig, OnBlank, Pool, PoolIdentity};
use serde::Serialize;
use zookeeper_client as zk;

use crate::report::new_histogram;

#[derive(clap::Args)]
pub struct AllocPageArgs {
    /// ZooKeeper connect string; the active monitor is found there.
    #[arg(long)]
    zk: String,
    #[arg(long)]
    cluster: String,
    #[arg(long, default_value_t = 7)]
    cluster_id: u64,
    #[arg(long, default_value_t = 1)]
    node_id: u32,
    /// This node's address (picks its RDMA device).
    #[arg(long)]
    bind: IpAddr,
    /// This node's pool (a tmpfs file, or devdax).
    #[arg(long, default_value = "/dev/shm/pmgas-bench-alloc")]
    pm: std::path::PathBuf,
    #[arg(long, default_value_t = 256)]
    pool_mib: u64,
    #[arg(long, default_value_t = 65536)]
    page_size: u64,
    #[arg(long, default_value_t = 2)]
    backups: u8,
    /// Allocations in flight at once (one thread each), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Allocations measured per concurrency level.
    #[arg(long, default_value_t = 300)]
    count: u64,
    /// ZooKeeper creates measured for the baseline (half before, half after).
    #[arg(long, default_value_t = 300)]
    zk_creates: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Level {
    concurrency: usize,
    allocations: u64,
    failed: u64,
    p50_us: f64,
    p99_us: f64,
    per_s: f64,
    /// p50 over the plain ZooKeeper create p50.
    p50_vs_zk_create: f64,
    /// Throughput over throughput at the first level.
    speedup: f64,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// The delta znode one allocation writes: one mapping with `replicas` replicas.
fn payload(replicas: usize) -> Vec<u8> {
    let m = Mapping {
        page_id: PageId(1),
        replicas: (0..replicas as u32)
            .map(|n| Replica {
                node: NodeId(n + 1),
                page: PageIndex(n),
            })
            .collect(),
        freed: false,
        revision: 0,
    };
    encode_chunk(&[m]).expect("one mapping fits a chunk")
}

/// Sequential creates of `data` under a scratch znode: (plain create, the fenced multi-op
/// {check version, create} that a GAT delta write is).
async fn zk_creates(
    client: &zk::Client,
    dir: &str,
    data: &[u8],
    n: u64,
    plain: &mut Histogram<u64>,
    fenced: &mut Histogram<u64>,
) -> Result<(), String> {
    let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let stat = client
        .check_stat(dir)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("scratch znode vanished")?;
    for i in 0..n {
        let path = format!("{dir}/p{i:010}-{}", plain.len());
        let t = Instant::now();
        client
            .create(&path, data, &options)
            .await
            .map_err(|e| format!("create {path}: {e}"))?;
        plain.record(t.elapsed().as_nanos() as u64).ok();
        let path = format!("{dir}/f{i:010}-{}", fenced.len());
        let t = Instant::now();
        let mut multi = client.new_multi_writer();
        multi
            .add_check_version(dir, stat.version)
            .and_then(|()| multi.add_create(&path, data, &options))
            .map_err(|e| e.to_string())?;
        multi
            .commit()
            .await
            .map_err(|e| format!("multi create {path}: {e}"))?;
        fenced.record(t.elapsed().as_nanos() as u64).ok();
    }
    Ok(())
}

pub fn run(args: &AllocPageArgs) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let zk_client = rt.block_on(async {
        let connect = zk::Client::connector()
            .with_session_timeout(Duration::from_secs(6))
            .connect(&args.zk);
        tokio::time::timeout(Duration::from_secs(20), connect)
            .await
            .map_err(|_| format!("ZooKeeper at {} did not answer within 20 s", args.zk))?
            .map_err(|e| format!("ZooKeeper at {}: {e}", args.zk))
    })?;
    let leader = format!("/pmgas/{}/leader", args.cluster);
    let (addr, _) = rt
        .block_on(zk_client.get_data(&leader))
        .map_err(|e| format!("no active monitor ({leader}: {e})"))?;
    let monitor: SocketAddr = String::from_utf8_lossy(&addr)
        .parse()
        .map_err(|_| format!("{leader} does not hold an address"))?;
    let data = payload(args.backups as usize + 1);
    let scratch = format!("/pmgas-bench-{}", std::process::id());
    let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    rt.block_on(zk_client.create(&scratch, b"", &options))
        .map_err(|e| format!("create {scratch}: {e}"))?;
    let mut plain = new_histogram();
    let mut fenced = new_histogram();
    let half = args.zk_creates.div_ceil(2);
    rt.block_on(zk_creates(
        &zk_client,
        &scratch,
        &data,
        half,
        &mut plain,
        &mut fenced,
    ))?;

    let id = PoolIdentity {
        cluster_id: ClusterId(args.cluster_id),
        node_id: NodeId(args.node_id),
        page_size_bytes: args.page_size,
    };
    let _ = std::fs::remove_file(&args.pm);
    let pool = Pool::open(
        &args.pm,
        Some(args.pool_mib << 20),
        OnBlank::Format(id),
        Some(id),
    )
    .map_err(|e| e.to_string())?;
    let client = Client::connect(
        ClientConfig::new(NodeId(args.node_id), args.bind, monitor),
        Arc::new(pool),
    )
    .map_err(|e| e.to_string())?;
    // Warm up the connections and the monitor.
    for _ in 0..10 {
        client
            .alloc_page(args.backups)
            .map_err(|e| format!("warm-up allocation: {e}"))?;
    }
    let mut measured = vec![];
    for &c in &args.concurrency {
        let c = c.max(1);
        let next = AtomicU64::new(0);
        let failed = AtomicU64::new(0);
        let start = Instant::now();
        let hists: Vec<Histogram<u64>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..c)
                .map(|_| {
                    s.spawn(|| {
                        let mut h = new_histogram();
                        while next.fetch_add(1, Ordering::Relaxed) < args.count {
                            let t = Instant::now();
                            match client.alloc_page(args.backups) {
                                Ok(_) => {
                                    h.record(t.elapsed().as_nanos() as u64).ok();
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "allocation failed");
                                    failed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        h
                    })
                })
                .collect();
            workers.into_iter().filter_map(|w| w.join().ok()).collect()
        });
        let secs = start.elapsed().as_secs_f64();
        let mut h = new_histogram();
        for x in &hists {
            h.add(x).map_err(|e| e.to_string())?;
        }
        measured.push((c, h, secs, failed.load(Ordering::Relaxed)));
    }
    rt.block_on(zk_creates(
        &zk_client,
        &scratch,
        &data,
        args.zk_creates - half,
        &mut plain,
        &mut fenced,
    ))?;

    let zk_p50 = plain.value_at_quantile(0.5);
    let first_rate = measured
        .first()
        .map(|(_, h, secs, _)| h.len() as f64 / secs)
        .unwrap_or(1.0);
    let levels: Vec<Level> = measured
        .iter()
        .map(|(c, h, secs, failed)| {
            let per_s = h.len() as f64 / secs;
            Level {
                concurrency: *c,
                allocations: h.len(),
                failed: *failed,
                p50_us: us(h.value_at_quantile(0.5)),
                p99_us: us(h.value_at_quantile(0.99)),
                per_s,
                p50_vs_zk_create: h.value_at_quantile(0.5) as f64 / zk_p50.max(1) as f64,
                speedup: per_s / first_rate,
            }
        })
        .collect();
    println!(
        "zookeeper create {} B ({} creates, same server): p50 {:.1} us  p99 {:.1} us; \
         fenced multi {{check, create}}: p50 {:.1} us  p99 {:.1} us",
        data.len(),
        plain.len(),
        us(zk_p50),
        us(plain.value_at_quantile(0.99)),
        us(fenced.value_at_quantile(0.5)),
        us(fenced.value_at_quantile(0.99)),
    );
    for l in &levels {
        println!(
            "alloc-page backups={} concurrency {:>3}: {:>5} ok {:>3} failed  p50 {:>9.1} us  \
             p99 {:>9.1} us  {:>8.1} pages/s  p50/zk-create {:.2}  throughput x{:.2}",
            args.backups,
            l.concurrency,
            l.allocations,
            l.failed,
            l.p50_us,
            l.p99_us,
            l.per_s,
            l.p50_vs_zk_create,
            l.speedup
        );
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "zk_create_p50_us": us(zk_p50),
                "zk_create_p99_us": us(plain.value_at_quantile(0.99)),
                "zk_fenced_create_p50_us": us(fenced.value_at_quantile(0.5)),
                "payload_bytes": data.len(),
                "backups": args.backups,
                "levels": levels,
            })
        );
    }
    let _ = std::fs::remove_file(&args.pm);
    Ok(())
}
