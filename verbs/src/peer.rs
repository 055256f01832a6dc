//! A verbs peer: the far end that integration tests and the latency harness connect to.
//!
//! It listens on one address (which picks its device), exposes one region (anonymous
//! memory, a devdax device or a tmpfs file) for one-sided access, and serves each
//! connection in the mode the client asks for in its connect private data:
//! [`MODE_ECHO`] sends every received message straight back (SEND/RECV ping-pong; the
//! immediate value of a WRITE_WITH_IMM comes back as a 4-byte message);
//! [`MODE_MSG`] runs a message-layer [`Endpoint`] that answers each request with its
//! payload reversed, except requests starting with `ignore`, which it leaves unanswered so
//! that timeouts and back-pressure can be exercised.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cm::{Connection, ConnectionConfig, Listener};
use crate::error::{Error, Result};
use crate::mr::{Access, AlignedBuf, MemoryRegion, ProtectionDomain};
use crate::msg::{Endpoint, Incoming, MsgConfig};
use crate::qp::{Opcode, WorkRequest};
use crate::region::MappedRegion;

pub const MODE_ECHO: u8 = 1;
pub const MODE_MSG: u8 = 2;
/// Bytes at each end of the region that the peer fills with [`pattern_byte`] at start.
pub const PATTERN_BYTES: usize = 64 << 10;
/// Receive slots and their size in echo mode.
pub const ECHO_SLOTS: usize = 16;
pub const ECHO_SLOT_BYTES: usize = 64 << 10;
const SEND_BIT: u64 = 1 << 63;

/// The byte the peer writes at `offset` of its region (first and last [`PATTERN_BYTES`]).
pub fn pattern_byte(offset: u64) -> u8 {
    ((offset.wrapping_mul(131).wrapping_add(7)) % 251) as u8
}

/// Connect private data asking for a mode.
pub fn mode_private_data(mode: u8) -> [u8; 8] {
    [mode, 0, 0, 0, 0, 0, 0, 0]
}

#[derive(Debug, Clone)]
pub enum RegionSpec {
    Anonymous {
        len: usize,
    },
    Mapped {
        path: PathBuf,
        file_len: Option<u64>,
    },
}

impl std::str::FromStr for RegionSpec {
    type Err = String;
    /// `anon:BYTES` or a path (devdax or tmpfs file), optionally `PATH:BYTES` for a new file.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some(len) = s.strip_prefix("anon:") {
            let len = len.parse().map_err(|_| format!("bad length in {s:?}"))?;
            return Ok(Self::Anonymous { len });
        }
        match s.rsplit_once(':') {
            Some((path, len)) if len.chars().all(|c| c.is_ascii_digit()) && !len.is_empty() => {
                let file_len = len.parse().map_err(|_| format!("bad length in {s:?}"))?;
                Ok(Self::Mapped {
                    path: path.into(),
                    file_len: Some(file_len),
                })
            }
            _ => Ok(Self::Mapped {
                path: s.into(),
                file_len: None,
            }),
        }
    }
}

/// The served region; the MR drops before the mapping it covers.
struct ServedRegion {
    mr: MemoryRegion,
    _map: Option<MappedRegion>,
}

fn fill_pattern(mr: &MemoryRegion) -> Result<()> {
    let len = mr.len();
    let head = PATTERN_BYTES.min(len);
    let tail_start = len.saturating_sub(PATTERN_BYTES);
    for start in [0, tail_start] {
        let end = if start == 0 { head } else { len };
        let bytes: Vec<u8> = (start..end).map(|o| pattern_byte(o as u64)).collect();
        mr.write_at(start, &bytes)?;
    }
    Ok(())
}

fn open_region(pd: &ProtectionDomain, spec: &RegionSpec) -> Result<ServedRegion> {
    let region = match spec {
        RegionSpec::Anonymous { len } => ServedRegion {
            mr: pd.register(AlignedBuf::zeroed(*len)?, Access::ALL_REMOTE)?,
            _map: None,
        },
        RegionSpec::Mapped { path, file_len } => {
            let map = MappedRegion::open(path, *file_len)?;
            // SAFETY: the mapping lives in the same ServedRegion and drops after the MR.
            let mr = unsafe { pd.register_raw(map.as_ptr(), map.len(), Access::ALL_REMOTE) }?;
            ServedRegion {
                mr,
                _map: Some(map),
            }
        }
    };
    fill_pattern(&region.mr)?;
    Ok(region)
}

/// Serves forever (until an error on the listener). Prints one `PEER READY …` line on
/// stdout once it accepts connections.
pub fn serve(bind: SocketAddr, spec: &RegionSpec, config: &ConnectionConfig) -> Result<()> {
    let listener = Listener::bind(bind, 64)?;
    let pd = ProtectionDomain::new(listener.context())?;
    let region = Arc::new(open_region(&pd, spec)?);
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "PEER READY bind={bind} device={} region_bytes={} rkey={:#x}",
            listener.context().name(),
            region.mr.len(),
            region.mr.rkey()
        );
        let _ = out.flush();
    }
    loop {
        let Some(request) = listener.next_request(Duration::from_secs(1))? else {
            continue;
        };
        let mode = request.private_data().first().copied().unwrap_or(0);
        if mode != MODE_ECHO && mode != MODE_MSG {
            tracing::warn!(mode, "rejecting connection with unknown mode");
            let _ = request.reject(b"unknown mode");
            continue;
        }
        let conn = match request.accept(&pd, config, &region.mr.remote().to_bytes()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let region = Arc::clone(&region);
        std::thread::spawn(move || {
            let peer = conn.peer();
            let result = if mode == MODE_ECHO {
                serve_echo(conn)
            } else {
                serve_msg(conn)
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "connection ended");
            }
            drop(region);
        });
    }
}

/// Spins while traffic flows; once idle for a while, yields and checks for disconnect so
/// that an idle peer does not hold a core.
struct IdlePolicy {
    idle_since: Option<Instant>,
}

impl IdlePolicy {
    fn busy(&mut self) {
        self.idle_since = None;
    }

    /// Returns true when the connection should be checked for a disconnect.
    fn idle(&mut self) -> bool {
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        let idle = since.elapsed();
        if idle > Duration::from_millis(100) {
            std::thread::sleep(Duration::from_micros(200));
            true
        } else {
            if idle > Duration::from_millis(1) {
                std::thread::yield_now();
            }
            false
        }
    }
}

fn serve_echo(mut conn: Connection) -> Result<()> {
    let bufs = conn.pd().register(
        AlignedBuf::zeroed(ECHO_SLOTS * ECHO_SLOT_BYTES)?,
        Access::LOCAL,
    )?;
    for slot in 0..ECHO_SLOTS {
        // SAFETY: each slot is read only after its receive completes and reposted only
        // after the echo that reads it completes.
        unsafe { conn.post_recv(slot as u64, &bufs, slot * ECHO_SLOT_BYTES, ECHO_SLOT_BYTES) }?;
    }
    let mut idle = IdlePolicy { idle_since: None };
    loop {
        let Some(wc) = conn.poll()? else {
            if idle.idle() && conn.peer_disconnected()? {
                return Ok(());
            }
            continue;
        };
        idle.busy();
        if !wc.is_success() {
            return Err(Error::Disconnected);
        }
        let slot = (wc.wr_id & !SEND_BIT) as usize;
        if wc.wr_id & SEND_BIT != 0 {
            // SAFETY: the echo from this slot has completed; the slot is free again.
            unsafe { conn.post_recv(slot as u64, &bufs, slot * ECHO_SLOT_BYTES, ECHO_SLOT_BYTES) }?;
            continue;
        }
        // A WRITE_WITH_IMM lands in the region; what arrives here is only its immediate
        // value, which is echoed back as a 4-byte message.
        let len = match wc.imm {
            Some(imm) if wc.opcode == rdma_sys::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => {
                bufs.write_at(slot * ECHO_SLOT_BYTES, &imm.to_le_bytes())?;
                4
            }
            _ => wc.byte_len as usize,
        };
        let mut wr = WorkRequest::new(Opcode::Send, &bufs, slot * ECHO_SLOT_BYTES, len, None)?
            .inline_if_fits(&conn);
        wr.set_wr_id(SEND_BIT | slot as u64);
        // SAFETY: the slot is not reposted for receive until this send completes.
        unsafe { conn.post(&mut wr) }?;
    }
}

fn serve_msg(conn: Connection) -> Result<()> {
    let mut ep = Endpoint::new(conn, MsgConfig::default())?;
    let mut idle = IdlePolicy { idle_since: None };
    loop {
        match ep.poll()? {
            Some(Incoming::Request {
                request_id,
                payload,
            }) => {
                idle.busy();
                if payload.starts_with(b"ignore") {
                    continue;
                }
                let reply: Vec<u8> = payload.iter().rev().copied().collect();
                ep.respond(request_id, &reply)?;
            }
            Some(_) => idle.busy(),
            None => {
                if idle.idle() && ep.connection().peer_disconnected()? {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_spec_parses() {
        assert!(matches!(
            "anon:4096".parse::<RegionSpec>(),
            Ok(RegionSpec::Anonymous { len: 4096 })
        ));
        match "/dev/dax0.0".parse::<RegionSpec>().unwrap() {
            RegionSpec::Mapped { path, file_len } => {
                assert_eq!(path, PathBuf::from("/dev/dax0.0"));
                assert_eq!(file_len, None);
            }
            other => panic!("{other:?}"),
        }
        match "/dev/shm/x:1048576".parse::<RegionSpec>().unwrap() {
            RegionSpec::Mapped { file_len, .. } => assert_eq!(file_len, Some(1 << 20)),
            other => panic!("{other:?}"),
        }
        assert!("anon:lots".parse::<RegionSpec>().is_err());
    }

    #[test]
    fn pattern_is_not_constant() {
        let distinct: std::collections::HashSet<u8> = (0..1000).map(pattern_byte).collect();
        assert!(distinct.len() > 200);
    }
}
