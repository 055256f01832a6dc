//! `pmgas-monitor`: the global monitor binary. So far it can inspect the metadata in
//! ZooKeeper (`gat-dump`); serving allocations arrives with the RDMA shell.
#![forbid(unsafe_code)]

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
    /// Runs the monitor (not implemented yet: it says so and fails).
    Serve,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let result = match Cli::parse().command {
        Command::GatDump { zk, cluster, json } => gat_dump(&zk, &cluster, json),
        Command::Serve => Err(
            "serving is not implemented yet (the RDMA shell of the two-phase allocation)".into(),
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

fn gat_dump(zk: &str, cluster: &str, json: bool) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let connect = tokio::time::timeout(Duration::from_secs(10), Store::connect(zk, cluster, Duration::from_secs(6)));
        let store = connect.await.map_err(|_| format!("ZooKeeper at {zk} did not answer within 10 s"))?.map_err(|e| e.to_string())?;
        let epoch = store.epoch().await.map_err(|e| e.to_string())?;
        let nodes = store.live_nodes().await.map_err(|e| e.to_string())?;
        let gat = store.load_gat().await.map_err(|e| e.to_string())?;
        if json {
            println!("{}", serde_json::json!({"epoch": epoch.0, "nodes": nodes, "chunks": gat.chunks, "mappings": gat.mappings.len()}));
            for m in &gat.mappings {
                let replicas: Vec<_> =
                    m.replicas.iter().map(|r| serde_json::json!({"node": r.node.0, "page_index": r.page.0})).collect();
                println!("{}", serde_json::json!({"page_id": m.page_id.0, "replicas": replicas}));
            }
        } else {
            println!("cluster {cluster}: epoch {} nodes {:?} mappings {} in {} chunks", epoch.0, nodes, gat.mappings.len(), gat.chunks);
            for m in &gat.mappings {
                let replicas: Vec<String> = m.replicas.iter().map(|r| format!("node{}:{}", r.node.0, r.page.0)).collect();
                println!("page {:>10} -> {}", m.page_id.0, replicas.join(" "));
            }
        }
        Ok(())
    })
}
