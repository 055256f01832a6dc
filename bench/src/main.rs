//! `pmgas-bench`: the latency harness.
#![deny(unsafe_code)]

mod alloc_page;
mod cache;
#[allow(unsafe_code)] // RDTSC; the block carries its SAFETY argument
mod clock;
mod data;
mod data_probe;
mod lincheck;
#[allow(unsafe_code)] // FFI to libpmemobj and malloc; each block carries its SAFETY argument
mod objects;
mod peer_proc;
mod recovery;
mod report;
mod rereplicate;
mod takeover;
#[allow(unsafe_code)] // posting work requests; each block carries its SAFETY argument
mod verbs_lat;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pmgas-bench", version, about = "pmgas latency harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Latency of one verb against a peer process on another host, with hdrhistogram.
    Verbs(verbs_lat::VerbsArgs),
    /// The object allocator against libpmemobj and malloc: throughput, latency, scaling.
    Objects(objects::ObjectsArgs),
    /// Replicated page allocation through the client API at several concurrency levels,
    /// side by side with a plain ZooKeeper create of the same payload on the same server.
    AllocPage(alloc_page::AllocPageArgs),
    /// The data path through the client API: reads, durable writes, CAS and FAA with 0, 1
    /// and 2 backups, batches with 16 in flight (scripts/bench-data.sh: beside perftest).
    Data(data::DataArgs),
    /// The coherent block cache: hits, misses, writes with sharers, YCSB-B with and without it.
    Cache(cache::CacheArgs),
    /// How long a starting monitor takes to reload GATs of several sizes from ZooKeeper.
    Recovery(recovery::RecoveryArgs),
    /// Foreground write latency before, during and after a re-replication
    /// (scripts/bench-rereplicate.sh drives the node loss and times the copy).
    Rereplicate(rereplicate::RereplicateArgs),
    /// Lists RDMA devices, their ports and RoCE v2 GIDs; with --gid-for, prints just the
    /// GID index for that address (the value perftest's -x wants).
    Devices {
        #[arg(long)]
        device: Option<String>,
        #[arg(long, requires = "device")]
        gid_for: Option<IpAddr>,
    },
    /// Checks a recorded history (JSON lines) for linearizability, per address.
    CheckHistory {
        /// The history, one JSON record per line.
        path: PathBuf,
        /// One JSON object per address, then one with the totals.
        #[arg(long)]
        json: bool,
        /// Search steps allowed per address before its verdict is "undecided".
        #[arg(long, default_value_t = lincheck::DEFAULT_MAX_STEPS)]
        max_steps: u64,
    },
    /// Sends a live data node malformed and misdirected requests; each must be refused
    /// clearly and change nothing (rig tests).
    #[command(hide = true)]
    DataProbe(data_probe::ProbeArgs),
    /// The peer that `verbs` starts on the remote host (internal).
    #[command(hide = true)]
    VerbsPeer {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        region: String,
        #[arg(long)]
        cpu: Option<usize>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let result = match Cli::parse().command {
        Command::Verbs(args) => verbs_lat::run(&args),
        Command::Objects(args) => objects::run(&args),
        Command::AllocPage(args) => alloc_page::run(&args),
        Command::Recovery(args) => recovery::run(&args),
        Command::Data(args) => data::run(&args),
        Command::Cache(args) => cache::run(&args),
        Command::Rereplicate(args) => rereplicate::run(&args),
        Command::DataProbe(args) => data_probe::run(&args),
        Command::Devices { device, gid_for } => devices(device.as_deref(), gid_for),
        Command::CheckHistory {
            path,
            json,
            max_steps,
        } => lincheck::run(&path, json, max_steps),
        Command::VerbsPeer { bind, region, cpu } => peer_proc::serve(bind, &region, cpu),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pmgas-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn devices(only: Option<&str>, gid_for: Option<IpAddr>) -> Result<(), String> {
    let names = pmgas_verbs::device_names().map_err(|e| e.to_string())?;
    if let (Some(dev), Some(ip)) = (only, gid_for) {
        let ctx = pmgas_verbs::Context::open(dev).map_err(|e| e.to_string())?;
        let index = ctx.gid_index_for(1, ip, None).map_err(|e| e.to_string())?;
        println!("{index}");
        return Ok(());
    }
    if names.is_empty() {
        return Err("no RDMA devices (on a machine without rxe, use scripts/rig.sh)".into());
    }
    for name in names
        .iter()
        .filter(|n| only.is_none_or(|o| o == n.as_str()))
    {
        let ctx = pmgas_verbs::Context::open(name).map_err(|e| e.to_string())?;
        let port = ctx.query_port(1).map_err(|e| e.to_string())?;
        println!(
            "{name}: port 1 state {} mtu {} link_layer {}",
            port.state, port.active_mtu_bytes, port.link_layer
        );
        for gid in ctx.gid_table(1).map_err(|e| e.to_string())? {
            let ip = gid
                .ipv4()
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into());
            println!("  gid[{}] {:?} ipv4 {ip}", gid.index, gid.gid_type);
        }
    }
    Ok(())
}
