//! A verbs peer: the far end that integration tests and the latency harness connect to.
//!
//! It listens on one address (which picks its device), exposes one region (anonymous
//! memory, a devdax device or a tmpfs file) for one-sided access, and serves each
//! connection in the mode the client asks for in its connect private data:
//! [`MODE_ECHO`] sends every received message straight back (SEND/RECV ping-pong; the
//! immediate value of a WRITE_WITH_IMM comes back as a 4-byte message);
//! [`MODE_MSG`] runs a message-layer [`Endpoint`] that answers each request with its
//! payload reversed, except requests starting with `ignore`, which it leaves unanswered so
//! that timeouts and back-pressure can be exercised; [`MODE_WRITE_PINGPONG`] plays the
//! far side of perftest's `ib_write_lat`: it spins on the last byte of the client's write
//! into its region and answers with an RDMA WRITE of the same size into the client's.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use crate::cm::{Connection, ConnectionConfig, Listener};
use crate::error::{Error, Result};
use crate::mr::{Access, AlignedBuf, MemoryRegion, ProtectionDomain, RemoteRegion};
use crate::msg::{Endpoint, Incoming, MsgConfig};
use crate::qp::{Opcode, WorkRequest};
use crate::region::MappedRegion;
use crate::spin::IdleBackoff;

pub const MODE_ECHO: u8 = 1;
pub const MODE_MSG: u8 = 2;
pub const MODE_WRITE_PINGPONG: u8 = 3;
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

/// Connect private data for [`MODE_WRITE_PINGPONG`]: mode, message size, and the client's
/// region that the peer writes its answers into.
pub fn pingpong_private_data(size_bytes: u32, client: &RemoteRegion) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[0] = MODE_WRITE_PINGPONG;
    out[4..8].copy_from_slice(&size_bytes.to_le_bytes());
    out[8..32].copy_from_slice(&client.to_bytes());
    out
}

fn parse_pingpong(private_data: &[u8]) -> Result<(usize, RemoteRegion)> {
    let size = private_data
        .get(4..8)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| Error::Malformed {
            reason: "ping-pong private data too short".into(),
        })?;
    let client = RemoteRegion::from_bytes(private_data.get(8..32).unwrap_or(&[]))?;
    if size == 0 || size as u64 > client.len {
        return Err(Error::Malformed {
            reason: format!("ping-pong size {size} does not fit the client region"),
        });
    }
    Ok((size, client))
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
        let pingpong = if mode == MODE_WRITE_PINGPONG {
            parse_pingpong(request.private_data())
        } else {
            Ok((0, RemoteRegion::default()))
        };
        let pingpong = match pingpong {
            Ok(p) if p.0 as u64 <= region.mr.len() as u64 => p,
            Ok(_) | Err(_) => {
                tracing::warn!("rejecting ping-pong connection with bad parameters");
                let _ = request.reject(b"bad ping-pong parameters");
                continue;
            }
        };
        if ![MODE_ECHO, MODE_MSG, MODE_WRITE_PINGPONG].contains(&mode) {
            tracing::warn!(mode, "rejecting connection with unknown mode");
            let _ = request.reject(b"unknown mode");
            continue;
        }
        // Receives are posted before accepting: a client's first message never meets an
        // empty receive queue (an RNR NAK would cost it 655 ms).
        let private = region.mr.remote().to_bytes();
        let accepted = match mode {
            MODE_ECHO => request
                .accept_prepared(&pd, config, &private, post_echo_receives)
                .map(|(conn, bufs)| Accepted::Echo(conn, bufs)),
            MODE_MSG => request
                .accept_endpoint(&pd, config, &private, MsgConfig::default())
                .map(Accepted::Msg),
            _ => request.accept(&pd, config, &private).map(Accepted::Write),
        };
        let accepted = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let region = Arc::clone(&region);
        std::thread::spawn(move || {
            let (peer, result) = match accepted {
                Accepted::Echo(conn, bufs) => (conn.peer(), serve_echo(bufs, conn)),
                Accepted::Msg(ep) => (ep.connection().peer(), serve_msg(ep)),
                Accepted::Write(conn) => (
                    conn.peer(),
                    serve_write_pingpong(conn, &region.mr, pingpong.0, pingpong.1),
                ),
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "connection ended");
            }
            drop(region);
        });
    }
}

/// A connection accepted in one of the peer's modes.
enum Accepted {
    /// With its receive slots (posted before the accept).
    Echo(Connection, MemoryRegion),
    Msg(Endpoint),
    Write(Connection),
}

/// The echo mode's receive slots, posted on a connection not yet accepted.
fn post_echo_receives(conn: &mut Connection) -> Result<MemoryRegion> {
    let bufs = conn.pd().register(
        AlignedBuf::zeroed(ECHO_SLOTS * ECHO_SLOT_BYTES)?,
        Access::LOCAL,
    )?;
    for slot in 0..ECHO_SLOTS {
        // SAFETY: each slot is read only after its receive completes and reposted only
        // after the echo that reads it completes; the caller keeps `bufs` for as long as
        // the connection lives.
        unsafe { conn.post_recv(slot as u64, &bufs, slot * ECHO_SLOT_BYTES, ECHO_SLOT_BYTES) }?;
    }
    Ok(bufs)
}

// (Parameters drop in reverse order: the connection, with the receives posted into
// `bufs`, goes first.)
fn serve_echo(bufs: MemoryRegion, mut conn: Connection) -> Result<()> {
    let mut idle = IdleBackoff::default();
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

/// The far side of a WRITE ping-pong: wait until the last byte of the client's `n`-th
/// message reads [`pingpong_marker`]`(n)`, then write the same bytes back.
fn serve_write_pingpong(
    mut conn: Connection,
    region: &MemoryRegion,
    size: usize,
    client: RemoteRegion,
) -> Result<()> {
    let mut wr =
        WorkRequest::new(Opcode::Write, region, 0, size, Some((&client, 0)))?.inline_if_fits(&conn);
    let mut idle = IdleBackoff::default();
    let mut n: u64 = 0;
    loop {
        let want = pingpong_marker(n);
        if region.load_volatile(size - 1)? != want {
            if idle.idle() && conn.peer_disconnected()? {
                return Ok(());
            }
            continue;
        }
        idle.busy();
        wr.set_wr_id(n);
        // SAFETY: the region is the peer's own registered memory, alive for the serve loop;
        // its bytes are only rewritten by the client after our write has landed.
        unsafe { conn.post(&mut wr) }?;
        // Reap the completion so the send queue never fills; on rxe this costs nothing on
        // the client's critical path, which is spinning on its own memory meanwhile.
        loop {
            if let Some(wc) = conn.poll()? {
                wc.ok()?;
                break;
            }
        }
        n += 1;
    }
}

/// The last byte of the `n`-th ping-pong message: never zero, so a zeroed buffer never
/// looks like an arrival, and different for consecutive messages.
pub fn pingpong_marker(n: u64) -> u8 {
    (n % 255) as u8 + 1
}

fn serve_msg(mut ep: Endpoint) -> Result<()> {
    let mut idle = IdleBackoff::default();
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

/// A peer running as a child process (a `serve` behind some binary); killed on drop.
pub struct PeerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// The device the peer listens on, from its ready line.
    pub device: String,
}

impl PeerProcess {
    /// Starts `cmd` (which must end up calling [`serve`] on `addr`) and waits up to
    /// `ready_timeout` for its `PEER READY` line.
    pub fn spawn(mut cmd: Command, addr: SocketAddr, ready_timeout: Duration) -> Result<Self> {
        let fail = |reason: String| Error::InvalidArgument(format!("peer on {addr}: {reason}"));
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| fail(format!("cannot start: {e}")))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| fail("no stdout".into()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if line.starts_with("PEER READY") {
                    let _ = tx.send(line);
                }
            }
        });
        let Ok(line) = rx.recv_timeout(ready_timeout) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(format!(
                "not ready within {} s",
                ready_timeout.as_secs()
            )));
        };
        let device = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("device="))
            .unwrap_or("?")
            .to_owned();
        Ok(Self {
            child,
            addr,
            device,
        })
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
