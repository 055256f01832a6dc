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
use std::time::Duration;

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use pmgas_verbs::peer::{MODE_ECHO, mode_private_data, pingpong_marker, pingpong_private_data};
use pmgas_verbs::spin::SpinDeadline;
use pmgas_verbs::{
    Access, AlignedBuf, Connection, ConnectionConfig, Connector, MemoryRegion, Opcode,
    ProtectionDomain, RemoteRegion, WorkRequest,
};

use crate::clock::{CycleClock, cycles};
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
    let (peer_proc_handle, peer_addr) = match args.peer {
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
    let peer_device = peer_proc_handle
        .as_ref()
        .map_or_else(|| peer_addr.to_string(), |p| p.device.clone());

    let mut sampler = Sampler {
        clock: CycleClock::calibrate(Duration::from_millis(200)),
        warmup: args.warmup,
        total: args.warmup + args.iters,
        hist: new_histogram(),
    };
    tracing::debug!(ghz = sampler.clock.ghz(), "cycle clock calibrated");
    let convention = match args.op {
        Op::Read => {
            let wr =
                WorkRequest::new(Opcode::Read, &mr, 0, size, Some((&remote, 0))).map_err(err)?;
            measure_one_sided(&mut sampler, &mut conn, wr, |_, _| {})?;
            "round_trip"
        }
        Op::Cas => {
            // Learn the word's value, then make every CAS succeed: compare = current.
            let word_off = 65_536 - 8;
            let five_s = Duration::from_secs(5);
            conn.execute(Opcode::Read, &mr, 0, 8, Some((&remote, word_off)), five_s)
                .map_err(err)?;
            let mut cur = u64::from_le_bytes(read8(&mr, 0)?);
            let cas = Opcode::CompareSwap {
                compare: 0,
                swap: 0,
            };
            let wr = WorkRequest::new(cas, &mr, 0, 8, Some((&remote, word_off))).map_err(err)?;
            let mut failures = 0u64;
            measure_one_sided(&mut sampler, &mut conn, wr, |wr, phase| match phase {
                Phase::Before => wr.set_compare_swap(cur, cur.wrapping_add(1)),
                Phase::After => {
                    if read8(&mr, 0).map(u64::from_le_bytes) != Ok(cur) {
                        failures += 1;
                    }
                    cur = cur.wrapping_add(1);
                }
            })?;
            if failures > 0 {
                return Err(format!(
                    "{failures} CAS operations did not find the expected value"
                ));
            }
            "round_trip"
        }
        Op::Write => {
            measure_write_pingpong(&mut sampler, &mut conn, &mr, &remote, size)?;
            "half_round_trip"
        }
        Op::Send => {
            measure_send_pingpong(&mut sampler, &mut conn, &mr, size)?;
            "half_round_trip"
        }
    };
    let op = format!("{:?}", args.op).to_lowercase();
    let device = conn.device_name();
    let report =
        LatencyReport::from_histogram(&op, size, &sampler.hist, device, &peer_device, convention);
    if args.json {
        println!("{}", serde_json::to_string(&report).map_err(err)?);
    } else {
        println!("{}", report.human());
    }
    Ok(())
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn read8(mr: &MemoryRegion, offset: usize) -> Result<[u8; 8], String> {
    let mut b = [0u8; 8];
    mr.read_at(offset, &mut b).map_err(err)?;
    Ok(b)
}

/// Iteration bookkeeping: the clock, how many iterations, which ones are warm-up.
struct Sampler {
    clock: CycleClock,
    warmup: u64,
    total: u64,
    hist: Histogram<u64>,
}

impl Sampler {
    fn record(&mut self, iteration: u64, ns: u64) -> Result<(), String> {
        if iteration >= self.warmup {
            self.hist.record(ns.max(1)).map_err(err)?;
        }
        Ok(())
    }
}

enum Phase {
    Before,
    After,
}

/// Polls until the completion of `wr_id` (the only one outstanding).
fn spin_completion(conn: &mut Connection, wr_id: u64) -> Result<(), String> {
    conn.wait_for(wr_id, Duration::from_secs(5))
        .map(|_| ())
        .map_err(err)
}

fn measure_one_sided(
    s: &mut Sampler,
    conn: &mut Connection,
    mut wr: WorkRequest,
    mut patch: impl FnMut(&mut WorkRequest, Phase),
) -> Result<(), String> {
    for i in 0..s.total {
        wr.set_wr_id(i);
        patch(&mut wr, Phase::Before);
        let t0 = cycles();
        // SAFETY: the local buffer is only read by us after the completion is polled.
        unsafe { conn.post(&mut wr) }.map_err(err)?;
        spin_completion(conn, i)?;
        let ns = s.clock.ns_between(t0, cycles());
        patch(&mut wr, Phase::After);
        s.record(i, ns)?;
    }
    Ok(())
}

/// perftest's write ping-pong: our `n`-th WRITE sets the last byte of the peer's buffer to
/// `pingpong_marker(n)`; the peer answers with a WRITE into our buffer ending in the same
/// marker. The receive area is `mr[0..size]`, the send area starts at `send_off`.
fn measure_write_pingpong(
    s: &mut Sampler,
    conn: &mut Connection,
    mr: &MemoryRegion,
    remote: &RemoteRegion,
    size: usize,
) -> Result<(), String> {
    let send_off = size.next_multiple_of(4096);
    let mut wr = WorkRequest::new(Opcode::Write, mr, send_off, size, Some((remote, 0)))
        .map_err(err)?
        .inline_if_fits(conn);
    for n in 0..s.total {
        let marker = pingpong_marker(n);
        mr.write_at(send_off + size - 1, &[marker]).map_err(err)?;
        wr.set_wr_id(n);
        let t0 = cycles();
        // SAFETY: the send area is rewritten only after this write's completion is polled.
        unsafe { conn.post(&mut wr) }.map_err(err)?;
        let mut deadline = SpinDeadline::new(Duration::from_secs(5));
        while mr.load_volatile(size - 1).map_err(err)? != marker {
            if deadline.expired() {
                return Err(format!("no ping-pong answer to message {n} within 5 s"));
            }
        }
        let ns = s.clock.ns_between(t0, cycles()) / 2;
        spin_completion(conn, n)?;
        s.record(n, ns)?;
    }
    Ok(())
}

/// SEND ping-pong against the peer's echo: post a receive, send, wait for the echo.
fn measure_send_pingpong(
    s: &mut Sampler,
    conn: &mut Connection,
    mr: &MemoryRegion,
    size: usize,
) -> Result<(), String> {
    const RECV_BIT: u64 = 1 << 62;
    let recv_off = size.next_multiple_of(4096);
    let mut wr = WorkRequest::new(Opcode::Send, mr, 0, size, None)
        .map_err(err)?
        .inline_if_fits(conn);
    for n in 0..s.total {
        // SAFETY: the receive area is read only after its completion.
        unsafe { conn.post_recv(RECV_BIT | n, mr, recv_off, size) }.map_err(err)?;
        wr.set_wr_id(n);
        let t0 = cycles();
        // SAFETY: the send area is not modified during the loop.
        unsafe { conn.post(&mut wr) }.map_err(err)?;
        let (mut sent, mut received) = (false, false);
        let mut ns = 0;
        let mut deadline = SpinDeadline::new(Duration::from_secs(5));
        while !(sent && received) {
            if let Some(wc) = conn.poll().map_err(err)? {
                let wc = wc.ok().map_err(err)?;
                if wc.wr_id == (RECV_BIT | n) {
                    ns = s.clock.ns_between(t0, cycles()) / 2;
                    received = true;
                } else if wc.wr_id == n {
                    sent = true;
                } else {
                    return Err(format!("unexpected completion {:#x}", wc.wr_id));
                }
            } else if deadline.expired() {
                return Err(format!("no echo of message {n} within 5 s"));
            }
        }
        s.record(n, ns)?;
    }
    Ok(())
}
