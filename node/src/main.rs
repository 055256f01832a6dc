//! `pmgas-node`: the data-server binary.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pmgas-node", version, about = "pmgas data server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checks that PATH can back a node's pool (devdax, or a tmpfs file in development)
    /// and prints what it is; refuses fsdax and other memory RDMA cannot register.
    CheckPm {
        #[arg(long)]
        pm: PathBuf,
        /// Create or grow a development file to this many bytes.
        #[arg(long)]
        size_bytes: Option<u64>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    match Cli::parse().command {
        Command::CheckPm { pm, size_bytes } => {
            match pmgas_node::MappedRegion::open(&pm, size_bytes) {
                Ok(region) => {
                    println!(
                        "{}: {:?}, {} bytes",
                        pm.display(),
                        region.kind(),
                        region.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pmgas-node: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
