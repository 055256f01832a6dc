//! `pmgas-monitor`: the global monitor binary (not functional yet: it says so and fails).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "pmgas-monitor",
    version,
    about = "pmgas global monitor (not implemented yet)"
)]
struct Cli {}

fn main() -> ExitCode {
    let _ = Cli::parse();
    eprintln!(
        "pmgas-monitor: the monitor is not implemented yet (see the two-phase allocation issue)"
    );
    ExitCode::FAILURE
}
