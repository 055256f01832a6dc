//! `pmgas-monitor`: the global monitor binary: `serve` (the active monitor) and
//! `gat-dump` (inspect the metadata in ZooKeeper).
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pmgas_monitor::Store;

#[derive(Parser)]
#[command(name = "pmgas-monitor", version, about = "pmgas global monitor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prints the epoch, the live nodes and every mapping stored in ZooKeeper.
    GatDump {
        /// ZooKeeper connect string (host:port[,host:port…]).
        #[arg(long)]
        zk: String,
        #[arg(long)]
        cluster: String,
        /// One JSON object per line: epoch and nodes first, then one per mapping.
        #[arg(long)]
        json: bool,
    },
    /// Runs a monitor: stands for election in ZooKeeper and waits as a standby; once it
    /// leads, reloads the GAT, fences off its predecessor, accepts data nodes over rdma_cm
    /// on --listen and serves two-phase page allocations, persisting the GAT in ZooKeeper.
    /// Run three (one active, two standbys) for high availability.
    Serve {
        #[arg(long)]
        zk: String,
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        cluster_id: u64,
        #[arg(long, default_value_t = 2 << 20)]
        page_size: u64,
        /// rdma_cm address to accept nodes on (an address of an RDMA device).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Most mappings per ZooKeeper write; 1 turns group commit off (to measure it).
        #[arg(long, default_value_t = usize::MAX)]
        max_batch: usize,
        /// ZooKeeper session timeout: how long after this monitor dies a standby takes
        /// over. ZooKeeper clamps it to [2, 20] × its tickTime (scripts/zookeeper.sh:
        /// tickTime 200 ms).
        #[arg(long, default_value_t = 600)]
        session_timeout_ms: u64,
        /// How long a data server may stay disconnected before it is declared dead: the
        /// epoch moves on, it leaves the live list and its replicas leave the GAT (the
        /// first surviving replica of each page is its primary). A node back within it
        /// just rejoins. Also counted from this monitor's start for nodes listed live.
        #[arg(long, default_value_t = 10_000)]
        node_timeout_ms: u64,
        /// A joined data server that answers nothing for this long (the monitor sends a
        /// heartbeat every 500 ms while it is otherwise silent) is disconnected, and then
        /// declared dead after --node-timeout-ms unless it rejoins: a hung or partitioned
        /// node is caught, not only one whose connection fails.
        #[arg(long, default_value_t = 5_000)]
        heartbeat_timeout_ms: u64,
        /// After a data server is declared dead, how many pages are copied to new
        /// replicas at once (monitor/REREPLICATION.md).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
        rereplicate_concurrency: u32,
        /// The re-replication's copy bandwidth in MB/s (pages start no faster); 0: no
        /// limit.
        #[arg(long, default_value_t = 0)]
        rereplicate_mb_s: u32,
    },
    /// Opens a GAT writer series as a new active monitor would, fencing off its current
    /// writer (internal: the deposed-monitor and ZooKeeper-write-failure tests).
    #[command(hide = true)]
    FenceGat {
        #[arg(long)]
        zk: String,
        #[arg(long)]
        cluster: String,
        #[arg(long, default_value_t = 0)]
        worker: u32,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Warnings and errors unless RUST_LOG says otherwise: failures of peers, nodes
        // declared dead and replicas lost must reach an operator by default.
        .with_env_filter(
            tracing_subscriber::EnvFilter::builder()
                .with_default_directive(tracing_subscriber::filter::LevelFilter::WARN.into())
                .from_env_lossy(),
        )
        .init();
    let result = match Cli::parse().command {
        Command::GatDump { zk, cluster, json } => gat_dump(&zk, &cluster, json),
        Command::FenceGat {
            zk,
            cluster,
            worker,
        } => fence_gat(&zk, &cluster, worker),
        Command::Serve {
            zk,
            cluster,
            cluster_id,
            page_size,
            listen,
            max_batch,
            session_timeout_ms,
            node_timeout_ms,
            heartbeat_timeout_ms,
            rereplicate_concurrency,
            rereplicate_mb_s,
        } => serve(
            &zk,
            &cluster,
            pmgas_monitor::server::ServerConfig {
                listen,
                cluster_id: pmgas_layout::ClusterId(cluster_id),
                page_size_bytes: page_size,
                max_batch,
                node_timeout: Duration::from_millis(node_timeout_ms),
                heartbeat_timeout: Duration::from_millis(heartbeat_timeout_ms),
                rereplicate_concurrency: rereplicate_concurrency as usize,
                rereplicate_mb_s,
            },
            Duration::from_millis(session_timeout_ms),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pmgas-monitor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn fence_gat(zk: &str, cluster: &str, worker: u32) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let connect = Store::connect(zk, cluster, Duration::from_secs(6));
        let store = tokio::time::timeout(Duration::from_secs(20), connect)
            .await
            .map_err(|_| format!("ZooKeeper at {zk} did not answer within 20 s"))?
            .map_err(|e| e.to_string())?;
        let w = pmgas_monitor::GatWriter::open(&store, worker)
            .await
            .map_err(|e| e.to_string())?;
        println!(
            "FENCED worker {worker} ({} deltas pending)",
            w.pending_deltas()
        );
        Ok(())
    })
}

fn gat_dump(zk: &str, cluster: &str, json: bool) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (epoch, nodes, gat) = rt.block_on(async {
        let connect = tokio::time::timeout(
            Duration::from_secs(10),
            Store::connect(zk, cluster, Duration::from_secs(6)),
        );
        let store = connect
            .await
            .map_err(|_| format!("ZooKeeper at {zk} did not answer within 10 s"))?
            .map_err(|e| e.to_string())?;
        let epoch = store.epoch().await.map_err(|e| e.to_string())?;
        let nodes = store.live_nodes().await.map_err(|e| e.to_string())?;
        let gat = store.load_gat().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((epoch, nodes, gat))
    })?;
    // Per page, the replicas declarations dropped and no re-replication replaced yet.
    let short = |id: u32| {
        gat.short
            .get(&pmgas_layout::PageId(id))
            .copied()
            .unwrap_or(0)
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = (|| -> std::io::Result<()> {
        if json {
            let dead: serde_json::Map<String, serde_json::Value> = gat
                .dead
                .0
                .iter()
                .map(|(n, d)| {
                    (
                        n.0.to_string(),
                        serde_json::json!({"epoch": d.epoch.0, "max_page_id": d.max_page_id}),
                    )
                })
                .collect();
            writeln!(
                out,
                "{}",
                serde_json::json!({"epoch": epoch.0, "nodes": nodes, "dead": dead, "chunks": gat.chunks, "mappings": gat.mappings.len(), "dropped_replicas": gat.dropped_replicas})
            )?;
            for m in &gat.mappings {
                let replicas: Vec<_> = m
                    .replicas
                    .iter()
                    .map(|r| serde_json::json!({"node": r.node.0, "page_index": r.page.0}))
                    .collect();
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"page_id": m.page_id.0, "replicas": replicas, "replica_count": replicas.len(), "dropped": short(m.page_id.0), "freed": m.freed})
                )?;
            }
        } else {
            writeln!(
                out,
                "cluster {cluster}: epoch {} nodes {:?} mappings {} in {} chunks",
                epoch.0,
                nodes,
                gat.mappings.len(),
                gat.chunks
            )?;
            for (n, d) in &gat.dead.0 {
                writeln!(
                    out,
                    "dead {n}: declared in epoch {}, its replicas of pages up to {} dropped",
                    d.epoch.0, d.max_page_id
                )?;
            }
            for m in &gat.mappings {
                let replicas: Vec<String> = m
                    .replicas
                    .iter()
                    .map(|r| format!("node{}:{}", r.node.0, r.page.0))
                    .collect();
                let state = match (m.freed, short(m.page_id.0)) {
                    (true, _) => " (freed)".to_string(),
                    (false, 0) => String::new(),
                    (false, k) => format!(" (short: {k} dropped with dead nodes)"),
                };
                writeln!(
                    out,
                    "page {:>10} -> [{}] {}{state}",
                    m.page_id.0,
                    replicas.len(),
                    replicas.join(" ")
                )?;
            }
        }
        out.flush()
    })();
    match written {
        // A reader that stopped early (`gat-dump | head`) is not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| format!("writing the dump: {e}")),
    }
}

fn serve(
    zk: &str,
    cluster: &str,
    config: pmgas_monitor::server::ServerConfig,
    session_timeout: Duration,
) -> Result<(), String> {
    // A worker thread keeps the ZooKeeper session alive (pings) while the RDMA loop,
    // which never yields, runs on this thread.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // The store's election znode is deleted in the background when it is dropped (a
    // monitor that stops hands over at once): that needs the runtime's context, which
    // this guard keeps until after the store is gone.
    let _context = rt.enter();
    // With a short session the client's per-request timeout is short too (2/5 of it): a
    // ZooKeeper still warming up can miss it. Connect again until 20 s have passed.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let store = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let attempt = rt.block_on(async {
            tokio::time::timeout(left, Store::connect(zk, cluster, session_timeout)).await
        });
        match attempt {
            Ok(Ok(store)) => break store,
            Ok(Err(e)) if std::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "connecting to ZooKeeper failed; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("ZooKeeper at {zk} did not answer within 20 s")),
        }
    };
    let listen = config.listen.to_string();
    println!("MONITOR STANDBY listen={listen} (waiting to lead)");
    let waited = std::time::Instant::now();
    // Standing for election survives a lost connection (the recipe finds its znode
    // again); other failures are tried again a few times.
    let mut tries = 0;
    while let Err(e) = rt.block_on(store.campaign(&listen)) {
        tries += 1;
        if tries >= 10 {
            return Err(format!("election failed: {e}"));
        }
        tracing::warn!(error = %e, "standing for election failed; retrying");
        std::thread::sleep(Duration::from_millis(200));
    }
    pmgas_verbs::fault::point("monitor.elected");
    // The time since the predecessor's election znode vanished is not known here; what a
    // takeover measurement needs is this line's timestamp.
    println!(
        "MONITOR ELECTED listen={listen} after {} ms as standby (unix_ms={})",
        waited.elapsed().as_millis(),
        pmgas_verbs::fault::unix_ms()
    );
    pmgas_monitor::server::serve(&config, &store, &rt)
}
