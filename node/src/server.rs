//! The data node's RDMA shell: registers the whole pool for one-sided access, connects to
//! the monitor over rdma_cm, joins, and then serves the monitor's Prepare / Commit /
//! Abort requests through the [`Participant`] while (optionally) allocating pages as a
//! primary itself — the load generator of the tests, the local cluster and the benchmark.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use pmgas_layout::wire::{Body, ErrorCode, Join, Message};
use pmgas_layout::{Epoch, NodeId, PageIndex};
use pmgas_verbs::msg::{Endpoint, Incoming, MsgConfig};
use pmgas_verbs::{Access, ConnectionConfig, Connector, MemoryRegion, ProtectionDomain};

use crate::participant::{Participant, primary_finish, primary_prepare};
use crate::pool::Pool;

pub struct NodeConfig {
    pub node_id: NodeId,
    pub bind: IpAddr,
    pub monitor: SocketAddr,
    /// Pages to allocate as a primary (0: serve only).
    pub alloc_pages: u64,
    pub backups: u8,
    /// Allocations in flight at once.
    pub concurrency: usize,
    /// Serve only, for this long after joining, before allocating (lets the other nodes
    /// of a starting cluster join, so that backups exist).
    pub start_delay: Duration,
}

/// Registers the pool's whole mapping (header, ART and pages) for one-sided access.
#[allow(unsafe_code)]
fn register_pool(pd: &ProtectionDomain, pool: &Pool) -> Result<MemoryRegion, String> {
    let region = pool.region();
    // SAFETY: the mapping belongs to `pool`, which the caller keeps alive (and mapped)
    // for as long as the returned region: `serve` owns both and drops the region first.
    unsafe { pd.register_raw(region.as_ptr(), region.len(), Access::ALL_REMOTE) }
        .map_err(|e| e.to_string())
}

struct Primary {
    page: PageIndex,
    started: Instant,
    wire_id: u64,
}

/// Sends (or resends: the wire id stays the same, so the monitor answers it once) a
/// primary's AllocPage and tracks it under the message layer's request id.
fn send_alloc(
    ep: &mut Endpoint,
    primaries: &mut HashMap<u64, Primary>,
    p: Primary,
    epoch: Epoch,
    me: NodeId,
    backups: u8,
) -> Result<(), String> {
    let body = Body::AllocPage {
        primary_page: p.page,
        backups_wanted: backups,
    };
    let msg = Message::new(epoch, me, p.wire_id, body);
    let id = ep
        .request(&msg.encode(), Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    primaries.insert(id, p);
    Ok(())
}

/// Latency and outcome counts of this node's own allocations.
#[derive(Debug, Default)]
pub struct AllocReport {
    pub ok: u64,
    pub failed: u64,
    /// Failures by the monitor's error code.
    pub failures: std::collections::BTreeMap<String, u64>,
    pub latencies_us: Vec<u64>,
    pub elapsed: Duration,
}

pub fn serve(
    config: &NodeConfig,
    pool: &Pool,
    mut on_done: impl FnMut(&AllocReport),
) -> Result<(), String> {
    let header = *pool.header();
    let route = Connector::new(Some(config.bind), config.monitor)
        .resolve()
        .map_err(|e| e.to_string())?;
    let pd = ProtectionDomain::new(route.context()).map_err(|e| e.to_string())?;
    let mr = register_pool(&pd, pool)?;
    let conn = route
        .connect(&pd, &ConnectionConfig::default(), &[])
        .map_err(|e| e.to_string())?;
    let mut ep = Endpoint::new(conn, MsgConfig::default()).map_err(|e| e.to_string())?;
    let me = config.node_id;
    let ip = match config.bind {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(_) => [0; 4],
    };
    let join = Join {
        cluster_id: header.cluster_id,
        page_size_bytes: header.page_size_bytes,
        page_count: header.page_count,
        free_pages: pool.art().free_count(),
        region_addr: mr.addr(),
        region_len: mr.len() as u64,
        rkey: mr.rkey(),
        cm_ip: ip,
        cm_port: 0,
    };
    let reply = ep
        .call(
            &Message::new(Epoch(0), me, 1, Body::Join(join)).encode(),
            Duration::from_secs(10),
        )
        .map_err(|e| e.to_string())?;
    let reply = Message::decode(&reply).map_err(|e| e.to_string())?;
    let epoch = match reply.body {
        Body::JoinAck { live_nodes } => {
            println!(
                "NODE READY {me} live_nodes={live_nodes} epoch={} device={}",
                reply.header.epoch.0,
                ep.connection().device_name()
            );
            reply.header.epoch
        }
        Body::Error { code, detail } => {
            return Err(format!("the monitor refused the join: {code:?}: {detail}"));
        }
        other => return Err(format!("unexpected answer to Join: {}", other.name())),
    };
    let mut participant = Participant::new(me);
    let mut table = pool;
    let mut primaries: HashMap<u64, Primary> = HashMap::new(); // msg-layer id -> request
    let mut next_wire_id = 2u64;
    let mut report = AllocReport::default();
    let mut remaining = config.alloc_pages;
    let start = Instant::now();
    let mut done_reported = config.alloc_pages == 0;
    // Spin while messages flow, nap when idle: several nodes and the monitor may share
    // few cores (the rig has two).
    let mut idle = pmgas_verbs::spin::IdleBackoff::default();
    loop {
        // Keep `concurrency` allocations in flight.
        while remaining > 0
            && start.elapsed() >= config.start_delay
            && primaries.len() < config.concurrency
            && ep.outstanding() < ep.request_limit()
        {
            let page = match primary_prepare(&mut table) {
                Ok(p) => p,
                Err(code) => {
                    report.failed += remaining;
                    remaining = 0;
                    tracing::warn!(?code, "no local page left to allocate");
                    break;
                }
            };
            let p = Primary {
                page,
                started: Instant::now(),
                wire_id: next_wire_id,
            };
            next_wire_id += 1;
            send_alloc(&mut ep, &mut primaries, p, epoch, me, config.backups)?;
            remaining -= 1;
        }
        let incoming = match ep.poll() {
            Ok(Some(m)) => m,
            Ok(None) => {
                idle.idle();
                if !done_reported && remaining == 0 && primaries.is_empty() {
                    report.elapsed = start.elapsed().saturating_sub(config.start_delay);
                    on_done(&report);
                    done_reported = true;
                }
                continue;
            }
            Err(e) => return Err(format!("monitor connection lost: {e}")),
        };
        idle.busy();
        match incoming {
            Incoming::Request {
                request_id,
                payload,
            } => {
                let body = match Message::decode(&payload) {
                    Err(e) => Body::Error {
                        code: ErrorCode::Malformed,
                        detail: e.to_string(),
                    },
                    Ok(m) if m.header.epoch != epoch => Body::Error {
                        code: ErrorCode::StaleEpoch,
                        detail: format!("epoch {} is not {}", m.header.epoch.0, epoch.0),
                    },
                    Ok(m) => match m.body {
                        Body::Prepare { txn_id } => match participant.prepare(&mut table, txn_id) {
                            Ok(page) => Body::Prepared { txn_id, page },
                            Err(code) => Body::Error {
                                code,
                                detail: format!("prepare {txn_id}"),
                            },
                        },
                        Body::Commit {
                            txn_id,
                            page_id,
                            replicas,
                        } => {
                            match participant.commit(&mut table, txn_id, page_id, epoch, &replicas)
                            {
                                Ok(()) => Body::CommitAck { txn_id, page_id },
                                Err(code) => Body::Error {
                                    code,
                                    detail: format!("commit {txn_id}"),
                                },
                            }
                        }
                        Body::Abort { txn_id } => match participant.abort(&mut table, txn_id) {
                            Ok(()) => Body::AbortAck { txn_id },
                            Err(code) => Body::Error {
                                code,
                                detail: format!("abort {txn_id}"),
                            },
                        },
                        other => Body::Error {
                            code: ErrorCode::Malformed,
                            detail: format!("{} is not a request to a node", other.name()),
                        },
                    },
                };
                let _ = ep.respond(request_id, &Message::new(epoch, me, 0, body).encode());
            }
            Incoming::Response {
                request_id,
                payload,
            } => {
                let Some(p) = primaries.remove(&request_id) else {
                    continue;
                };
                let answer = Message::decode(&payload).map(|m| m.body);
                let result = match &answer {
                    Ok(Body::Commit {
                        page_id, replicas, ..
                    }) => primary_finish(&mut table, p.page, epoch, Ok((*page_id, replicas))),
                    Ok(Body::Error { code, .. }) => {
                        primary_finish(&mut table, p.page, epoch, Err(*code)).and(Err(*code))
                    }
                    _ => primary_finish(&mut table, p.page, epoch, Err(ErrorCode::Malformed))
                        .and(Err(ErrorCode::Malformed)),
                };
                match result {
                    Ok(()) => {
                        report.ok += 1;
                        report
                            .latencies_us
                            .push(p.started.elapsed().as_micros() as u64);
                    }
                    Err(code) => {
                        report.failed += 1;
                        *report.failures.entry(format!("{code:?}")).or_default() += 1;
                        tracing::debug!(wire_id = p.wire_id, ?code, "allocation failed");
                    }
                }
            }
            Incoming::TimedOut { request_id } => {
                // Retry with the same wire request id: the monitor answers it once.
                if let Some(p) = primaries.remove(&request_id) {
                    send_alloc(&mut ep, &mut primaries, p, epoch, me, config.backups)?;
                }
            }
        }
    }
}
