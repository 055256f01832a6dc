//! The verbs peer as a process: `pmgas-verbs-peer --bind IP:PORT --region SPEC`.
//! SPEC is `anon:BYTES`, a devdax device, or a tmpfs file (`PATH` or `PATH:BYTES`).

use std::process::ExitCode;

use pmgas_verbs::ConnectionConfig;
use pmgas_verbs::peer::{RegionSpec, serve};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let (Some(bind), Some(region)) = (arg("--bind"), arg("--region")) else {
        eprintln!("usage: pmgas-verbs-peer --bind IP:PORT --region anon:BYTES|PATH[:BYTES]");
        return ExitCode::from(2);
    };
    let bind = match bind.parse() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("pmgas-verbs-peer: bad --bind {bind:?}: {e}");
            return ExitCode::from(2);
        }
    };
    let spec: RegionSpec = match region.parse() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pmgas-verbs-peer: bad --region: {e}");
            return ExitCode::from(2);
        }
    };
    match serve(bind, &spec, &ConnectionConfig::default()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pmgas-verbs-peer: {e}");
            ExitCode::FAILURE
        }
    }
}
