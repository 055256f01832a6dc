//! `pmgas-bench recovery`: how long a starting monitor takes to reload the GAT from
//! ZooKeeper (a new session, the epoch, every chunk and delta read concurrently and
//! validated, the page-id counter resumed above the largest id), for GATs of several
//! sizes written as a running monitor leaves them (full chunks and a tail of deltas, over
//! several worker series).
//!
//! With `--takeover-trials N` (on the rig: it starts real monitors and nodes, see
//! [`crate::takeover`]) it then measures takeover after `kill -9` of the active monitor
//! and each node's reconciliation with the new one.

use std::time::{Duration, Instant};

use pmgas_layout::gat::{Mapping, chunk_capacity};
use pmgas_layout::wire::Replica;
use pmgas_layout::{NodeId, PageId, PageIndex};
use pmgas_monitor::{Coordinator, GatWriter, Store, Timeouts};
use serde::Serialize;

#[derive(clap::Args)]
pub struct RecoveryArgs {
    /// ZooKeeper connect string (start one with scripts/zookeeper.sh).
    #[arg(long)]
    zk: String,
    /// GAT sizes to measure, in mappings.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    mappings: Vec<u32>,
    /// Replicas per mapping (primary + backups).
    #[arg(long, default_value_t = 3)]
    replicas: u32,
    /// Worker series the GAT is spread over.
    #[arg(long, default_value_t = 4)]
    workers: u32,
    /// Reloads timed per size (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long)]
    json: bool,
    /// Kill the active monitor this many times (0: reload only). Needs RDMA devices:
    /// run inside the rig (scripts/bench-recovery.sh).
    #[arg(long, default_value_t = 0)]
    takeover_trials: usize,
    /// Address the three monitors listen on (an RDMA device's).
    #[arg(long, default_value = "10.0.0.4")]
    listen_ip: String,
    /// Addresses of the data nodes to start (one each).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10.0.0.1,10.0.0.2,10.0.0.3"
    )]
    node_hosts: Vec<String>,
    /// The monitors' ZooKeeper session timeout.
    #[arg(long, default_value_t = 600)]
    session_timeout_ms: u64,
}

#[derive(Serialize)]
struct Reload {
    mappings: u32,
    znodes: usize,
    write_s: f64,
    reload_ms_median: f64,
    reload_ms_all: Vec<f64>,
}

fn mapping(id: u32, replicas: u32) -> Mapping {
    Mapping {
        page_id: PageId(id),
        replicas: (0..replicas)
            .map(|r| Replica {
                node: NodeId(r + 1 + id % 5),
                page: PageIndex(id / 5),
            })
            .collect(),
        freed: false,
        revision: 0,
    }
}

async fn fill(store: &Store, n: u32, replicas: u32, workers: u32) -> Result<(), String> {
    let per_chunk = chunk_capacity(replicas as usize) as u32;
    let mut writers = vec![];
    for w in 0..workers {
        writers.push(GatWriter::open(store, w).await.map_err(|e| e.to_string())?);
    }
    let mut id = 1;
    let mut w = 0;
    while id <= n {
        // Mostly full chunks; the last 100 mappings of each worker as small group commits
        // (deltas), as a monitor that stopped mid-run leaves them.
        let (left, tail) = (n - id + 1, 100 * workers);
        let batch = if left > tail {
            per_chunk.min(left - tail)
        } else {
            1
        };
        let end = (id + batch).min(n + 1);
        let maps: Vec<Mapping> = (id..end).map(|i| mapping(i, replicas)).collect();
        let k = w as usize % writers.len();
        writers[k].append(&maps).await.map_err(|e| e.to_string())?;
        id = end;
        w += 1;
    }
    Ok(())
}

pub fn run(args: &RecoveryArgs) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut out = vec![];
    for &n in &args.mappings {
        let cluster = format!("reload{}-{n}", std::process::id());
        let connect = |c: String| {
            let zk = args.zk.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(20),
                    Store::connect(&zk, &c, Duration::from_secs(6)),
                )
                .await
                .map_err(|_| "ZooKeeper did not answer within 20 s".to_string())?
                .map_err(|e| e.to_string())
            }
        };
        let written = Instant::now();
        rt.block_on(async {
            let store = connect(cluster.clone()).await?;
            fill(&store, n, args.replicas, args.workers).await
        })?;
        let write_s = written.elapsed().as_secs_f64();
        let mut times = vec![];
        let mut znodes = 0;
        for _ in 0..args.rounds.max(1) {
            let t = Instant::now();
            let (loaded, coord) = rt.block_on(async {
                let store = connect(cluster.clone()).await?;
                let epoch = store.epoch().await.map_err(|e| e.to_string())?;
                let gat = store.load_gat().await.map_err(|e| e.to_string())?;
                let coord = Coordinator::new(epoch, gat.max_page_id, Timeouts::default());
                Ok::<_, String>((gat, coord))
            })?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            if loaded.mappings.len() != n as usize || coord.next_page_id() != n + 1 {
                return Err(format!(
                    "reloaded {} mappings (next id {}), wrote {n}",
                    loaded.mappings.len(),
                    coord.next_page_id()
                ));
            }
            znodes = loaded.chunks;
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let r = Reload {
            mappings: n,
            znodes,
            write_s,
            reload_ms_median: sorted[sorted.len() / 2],
            reload_ms_all: times,
        };
        println!(
            "monitor reload: {:>8} mappings in {:>4} znodes: median {:>8.1} ms over {} reloads \
             (all {:?} ms; writing them took {:.1} s)",
            r.mappings,
            r.znodes,
            r.reload_ms_median,
            r.reload_ms_all.len(),
            r.reload_ms_all
                .iter()
                .map(|t| (t * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            r.write_s
        );
        out.push(r);
    }
    let takeover = if args.takeover_trials > 0 {
        crate::takeover::run(&crate::takeover::TakeoverConfig {
            zk: &args.zk,
            listen_ip: &args.listen_ip,
            node_hosts: &args.node_hosts,
            trials: args.takeover_trials,
            session_timeout_ms: args.session_timeout_ms,
        })?
    } else {
        serde_json::Value::Null
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "reload": out, "takeover": takeover })
        );
    }
    Ok(())
}
