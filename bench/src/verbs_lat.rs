//! `pmgas-bench verbs`: latency of one verb between two hosts, measured the way perftest
//! measures it so the two can stand side by side.
//!
//! - `read`, `cas`: the time from posting one request to polling its completion (a round
//!   trip), like `ib_read_lat` and `ib_atomic_lat`.
//! - `write`: a WRITE ping-pong; each side spins on the last byte of the other's write into
//!   its memory. Reported as half the round trip, like `ib_write_lat`.
//! - `send`: a SEND ping-pong against an echoing peer, half the round trip, like
//!   `ib_send_lat`.
//!
//! The work request is built once; the loop only patches its id (and, for CAS, the values).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use pmgas_verbs::peer::{MODE_ECHO, mode_private_data, pingpong_marker, pingpong_private_data};
use pmgas_verbs::{
    Access, AlignedBuf, Connection, ConnectionConfig, Connector, MemoryRegion, Opcode,
    ProtectionDomain, RemoteRegion, WorkRequest,
};

use crate::peer_proc;
use crate::report::{LatencyReport, new_histogram};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Op {
    Read,
    Write,
    Send,
    Cas,
}

#[derive(Debug, Args)]
pub struct VerbsArgs {
    #[arg(long, value_enum)]
    op: Op,
    /// Message size in bytes (CAS is always 8).
    #[arg(long, default_value_t = 8)]
    size: usize,
    #[arg(long, default_value_t = 10_000)]
    iters: u64,
    /// Iterations run before measuring.
    #[arg(long, default_value_t = 1_000)]
    warmup: u64,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
    /// Local address (picks the local device). Default: the rig's first host.
    #[arg(long)]
    local: Option<IpAddr>,
    /// Host to start the peer on. Default: the rig's second host.
    #[arg(long)]
    remote: Option<IpAddr>,
    #[arg(long, default_value_t = 19_000)]
    port: u16,
    /// Connect to an already running peer at this address instead of starting one.
    #[arg(long)]
    peer: Option<SocketAddr>,
    /// CPU to pin this process to.
    #[arg(long, default_value_t = 0)]
    cpu: usize,
    /// CPU to pin the started peer to.
    #[arg(long, default_value_t = 1)]
    peer_cpu: usize,
}

fn rig_host(index: usize) -> Option<IpAddr> {
    std::env::var("PMGAS_HOSTS")
        .ok()?
        .split_whitespace()
        .nth(index)?
        .parse()
        .ok()
}

pub fn run(args: &VerbsArgs) -> Result<(), String> {
    let size = if args.op == Op::Cas { 8 } else { args.size };
    if size == 0 || size > (16 << 20) {
        return Err(format!("--size {size} must be in 1..=16 MiB"));
    }
    if args.op == Op::Send && size > pmgas_verbs::peer::ECHO_SLOT_BYTES {
        return Err(format!(
            "send size is limited to {} bytes",
            pmgas_verbs::peer::ECHO_SLOT_BYTES
        ));
    }
    let local = args
        .local
        .or_else(|| rig_host(0))
        .ok_or("no --local address and no rig (PMGAS_HOSTS); run through scripts/rig.sh")?;
    let region_bytes = size.next_multiple_of(4096).max(65_536) * 2;
    let (_peer, peer_addr) = match args.peer {
        Some(addr) => (None, addr),
        None => {
            let remote = args
                .remote
                .or_else(|| rig_host(1))
                .ok_or("no --remote address and no rig")?;
            let addr = SocketAddr::new(remote, args.port);
            let peer =
                peer_proc::spawn(addr, &format!("anon:{region_bytes}"), Some(args.peer_cpu))?;
            (Some(peer), addr)
        }
    };
    peer_proc::pin(args.cpu);

    let route = Connector::new(Some(local), peer_addr)
        .resolve()
        .map_err(|e| e.to_string())?;
    let pd = ProtectionDomain::new(route.context()).map_err(|e| e.to_string())?;
    let mr = pd.register(
        AlignedBuf::zeroed(region_bytes).map_err(|e| e.to_string())?,
        Access::ALL_REMOTE,
    );
    let mr = mr.map_err(|e| e.to_string())?;
    let private: Vec<u8> = match args.op {
        Op::Write => pingpong_private_data(size as u32, &mr.remote()).to_vec(),
        _ => mode_private_data(MODE_ECHO).to_vec(),
    };
    let config = ConnectionConfig::default();
    let mut conn = route
        .connect(&pd, &config, &private)
        .map_err(|e| e.to_string())?;
    let remote = RemoteRegion::from_bytes(conn.remote_private_data()).map_err(|e| e.to_string())?;
    let peer_device = _peer
        .as_ref()
        .map_or_else(|| peer_addr.to_string(), |p| p.device.clone());

    let total = args.warmup + args.iters;
    let mut hist = new_histogram();
    let convention = match args.op {
        Op::Read => {
            let wr = WorkRequest::new(Opcode::Read, &mr, 0, size, Some((&remote, 0)))
                .map_err(|e| e.to_string())?;
            measure_one_sided(&mut conn, wr, total, args.warmup, &mut hist, |_, _| {})?;
            "round_trip"
        }
        Op::Cas => {
            // Learn the word's value, then make every CAS succeed: compare = current.
            let word_off = 65_536 - 8;
            conn.execute(
                Opcode::Read,
                &mr,
                0,
                8,
                Some((&remote, word_off)),
                Duration::from_secs(5),
            )
            .map_err(|e| e.to_string())?;
            let mut cur = u64::from_le_bytes(read8(&mr, 0)?);
            let wr = WorkRequest::new(
                Opcode::CompareSwap {
                    compare: 0,
                    swap: 0,
                },
                &mr,
                0,
                8,
                Some((&remote, word_off)),
            )
            .map_err(|e| e.to_string())?;
            let mut failures = 0u64;
            measure_one_sided(
                &mut conn,
                wr,
                total,
                args.warmup,
                &mut hist,
                |wr, phase| match phase {
                    Phase::Before => wr.set_compare_swap(cur, cur.wrapping_add(1)),
                    Phase::After => {
                        if read8(&mr, 0).map(u64::from_le_bytes) != Ok(cur) {
                            failures += 1;
                        }
                        cur = cur.wrapping_add(1);
                    }
                },
            )?;
            if failures > 0 {
                return Err(format!(
                    "{failures} CAS operations did not find the expected value"
                ));
            }
            "round_trip"
        }
        Op::Write => {
            measure_write_pingpong(&mut conn, &mr, &remote, size, total, args.warmup, &mut hist)?;
            "half_round_trip"
        }
        Op::Send => {
            measure_send_pingpong(&mut conn, &mr, size, total, args.warmup, &mut hist)?;
            "half_round_trip"
        }
    };
    let op = format!("{:?}", args.op).to_lowercase();
    let report = LatencyReport::from_histogram(
        &op,
        size,
        &hist,
        conn.device_name(),
        &peer_device,
        convention,
    );
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        println!("{}", report.human());
    }
    Ok(())
}

fn read8(mr: &MemoryRegion, offset: usize) -> Result<[u8; 8], String> {
    let mut b = [0u8; 8];
    mr.read_at(offset, &mut b).map_err(|e| e.to_string())?;
    Ok(b)
}

enum Phase {
    Before,
    After,
}

fn spin_completion(conn: &mut Connection, wr_id: u64) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if let Some(wc) = conn.poll().map_err(|e| e.to_string())? {
            let wc = wc.ok().map_err(|e| e.to_string())?;
            if wc.wr_id != wr_id {
                return Err(format!(
                    "unexpected completion {:#x} (waiting for {wr_id:#x})",
                    wc.wr_id
                ));
            }
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(5) {
            return Err(format!("no completion for request {wr_id} within 5 s"));
        }
    }
}

fn measure_one_sided(
    conn: &mut Connection,
    mut wr: WorkRequest,
    total: u64,
    warmup: u64,
    hist: &mut Histogram<u64>,
    mut patch: impl FnMut(&mut WorkRequest, Phase),
) -> Result<(), String> {
    for i in 0..total {
        wr.set_wr_id(i);
        patch(&mut wr, Phase::Before);
        let t0 = Instant::now();
        // SAFETY: the local buffer is only read by us after the completion is polled.
        unsafe { conn.post(&mut wr) }.map_err(|e| e.to_string())?;
        spin_completion(conn, i)?;
        let ns = t0.elapsed().as_nanos() as u64;
        patch(&mut wr, Phase::After);
        if i >= warmup {
            hist.record(ns.max(1)).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// perftest's write ping-pong: our `n`-th WRITE sets the last byte of the peer's buffer to
/// `pingpong_marker(n)`; the peer answers with a WRITE into our buffer ending in the same
/// marker. The receive area is `mr[0..size]`, the send area starts at `send_off`.
fn measure_write_pingpong(
    conn: &mut Connection,
    mr: &MemoryRegion,
    remote: &RemoteRegion,
    size: usize,
    total: u64,
    warmup: u64,
    hist: &mut Histogram<u64>,
) -> Result<(), String> {
    let send_off = size.next_multiple_of(4096);
    let mut wr = WorkRequest::new(Opcode::Write, mr, send_off, size, Some((remote, 0)))
        .map_err(|e| e.to_string())?
        .inline_if_fits(conn);
    for n in 0..total {
        let marker = pingpong_marker(n);
        mr.write_at(send_off + size - 1, &[marker])
            .map_err(|e| e.to_string())?;
        wr.set_wr_id(n);
        let t0 = Instant::now();
        // SAFETY: the send area is rewritten only after this write's completion is polled.
        unsafe { conn.post(&mut wr) }.map_err(|e| e.to_string())?;
        let spin_start = Instant::now();
        while mr.load_volatile(size - 1).map_err(|e| e.to_string())? != marker {
            if spin_start.elapsed() > Duration::from_secs(5) {
                return Err(format!("no ping-pong answer to message {n} within 5 s"));
            }
        }
        let ns = t0.elapsed().as_nanos() as u64 / 2;
        spin_completion(conn, n)?;
        if n >= warmup {
            hist.record(ns.max(1)).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// SEND ping-pong against the peer's echo: post a receive, send, wait for the echo.
fn measure_send_pingpong(
    conn: &mut Connection,
    mr: &MemoryRegion,
    size: usize,
    total: u64,
    warmup: u64,
    hist: &mut Histogram<u64>,
) -> Result<(), String> {
    const RECV_BIT: u64 = 1 << 62;
    let recv_off = size.next_multiple_of(4096);
    let mut wr = WorkRequest::new(Opcode::Send, mr, 0, size, None)
        .map_err(|e| e.to_string())?
        .inline_if_fits(conn);
    for n in 0..total {
        // SAFETY: the receive area is read only after its completion.
        unsafe { conn.post_recv(RECV_BIT | n, mr, recv_off, size) }.map_err(|e| e.to_string())?;
        wr.set_wr_id(n);
        let t0 = Instant::now();
        // SAFETY: the send area is not modified during the loop.
        unsafe { conn.post(&mut wr) }.map_err(|e| e.to_string())?;
        let (mut sent, mut received) = (false, false);
        let mut ns = 0;
        let start = Instant::now();
        while !(sent && received) {
            if let Some(wc) = conn.poll().map_err(|e| e.to_string())? {
                let wc = wc.ok().map_err(|e| e.to_string())?;
                if wc.wr_id == (RECV_BIT | n) {
                    ns = t0.elapsed().as_nanos() as u64 / 2;
                    received = true;
                } else if wc.wr_id == n {
                    sent = true;
                } else {
                    return Err(format!("unexpected completion {:#x}", wc.wr_id));
                }
            } else if start.elapsed() > Duration::from_secs(5) {
                return Err(format!("no echo of message {n} within 5 s"));
            }
        }
        if n >= warmup {
            hist.record(ns.max(1)).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
