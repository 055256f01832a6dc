//! A small request/response message layer on SEND/RECV for the control plane.
//!
//! Each side pre-posts a ring of `ring_slots` receive buffers. A side may have at most
//! `ring_slots / 2` requests outstanding; since it answers only requests it received, the
//! messages in flight towards a side never exceed its ring (its peer's requests plus the
//! responses to its own), so a receive buffer is always posted when a message lands.
//! A request beyond that limit is refused with [`Error::Backpressure`] instead of waiting.
//! Each request has a deadline; a response that comes after it is dropped and counted.
//!
//! Frame header (16 bytes, little endian): magic `0x504d` (u16), version (u8), kind (u8:
//! 1 request, 2 response), payload length (u32), request id (u64). The payload is opaque
//! here; pmgas's protocol messages (crate `pmgas-layout`) validate themselves.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::cm::Connection;
use crate::error::{Error, Result};
use crate::mr::{Access, AlignedBuf, MemoryRegion};
use crate::qp::{Opcode, WorkRequest};
use crate::spin::CLOCK_EVERY;

pub const FRAME_MAGIC: u16 = 0x504d;
pub const FRAME_VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 16;
const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;
/// Send work requests carry this bit in their wr_id; receives do not.
const SEND_BIT: u64 = 1 << 63;
/// One-sided operations posted by [`Endpoint::one_sided`] carry this bit too (and SEND_BIT: they
/// take a send slot while in flight, so the send queue never overflows).
const ONE_SIDED_BIT: u64 = 1 << 62;

#[derive(Debug, Clone)]
pub struct MsgConfig {
    /// Receive buffers posted, and send buffers kept; at most half may be requests in flight.
    pub ring_slots: usize,
    pub max_payload_bytes: usize,
}

impl Default for MsgConfig {
    fn default() -> Self {
        Self {
            ring_slots: 32,
            max_payload_bytes: 4096 - HEADER_BYTES,
        }
    }
}

/// What [`Endpoint::poll`] hands back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Request {
        request_id: u64,
        payload: Vec<u8>,
    },
    Response {
        request_id: u64,
        payload: Vec<u8>,
    },
    /// The request's deadline passed with no response; a late response will be dropped.
    TimedOut {
        request_id: u64,
    },
}

/// One operation of [`Endpoint::one_sided_batch`]: `len` bytes between `local_offset` of
/// the local region and `remote_offset` of `remote`.
#[derive(Debug, Clone, Copy)]
pub struct OneSided<'a> {
    pub local_offset: usize,
    pub remote: &'a crate::mr::RemoteRegion,
    pub remote_offset: u64,
    pub len: usize,
}

/// Counters an operator can read; nothing here is reset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MsgStats {
    pub requests_sent: u64,
    pub responses_sent: u64,
    pub received: u64,
    pub malformed_frames: u64,
    pub late_responses: u64,
    pub timeouts: u64,
    /// One-sided READs and WRITEs completed ([`Endpoint::one_sided`]).
    pub reads: u64,
}

/// Parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub len: u32,
    pub request_id: u64,
}

impl FrameHeader {
    pub fn encode(self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..2].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        out[2] = FRAME_VERSION;
        out[3] = self.kind;
        out[4..8].copy_from_slice(&self.len.to_le_bytes());
        out[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        out
    }

    /// Parses and validates a received frame of `frame.len()` bytes.
    pub fn decode(frame: &[u8], max_payload_bytes: usize) -> Result<Self> {
        let malformed = |reason: String| Error::Malformed { reason };
        if frame.len() < HEADER_BYTES {
            return Err(malformed(format!(
                "frame of {} bytes is shorter than its header",
                frame.len()
            )));
        }
        let magic = u16::from_le_bytes([frame[0], frame[1]]);
        if magic != FRAME_MAGIC {
            return Err(malformed(format!("bad magic {magic:#06x}")));
        }
        if frame[2] != FRAME_VERSION {
            return Err(malformed(format!("unsupported frame version {}", frame[2])));
        }
        let kind = frame[3];
        if kind != KIND_REQUEST && kind != KIND_RESPONSE {
            return Err(malformed(format!("unknown frame kind {kind}")));
        }
        let len = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        if len as usize > max_payload_bytes || HEADER_BYTES + len as usize != frame.len() {
            return Err(malformed(format!(
                "payload length {len} does not match frame of {} bytes (max payload {max_payload_bytes})",
                frame.len()
            )));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&frame[8..16]);
        Ok(Self {
            kind,
            len,
            request_id: u64::from_le_bytes(id),
        })
    }
}

/// One side of a message connection.
pub struct Endpoint {
    // `bufs` holds an Arc to the PD, so the PD outlives it whatever the drop order.
    conn: Connection,
    bufs: MemoryRegion,
    config: MsgConfig,
    slot_bytes: usize,
    free_send_slots: Vec<usize>,
    next_request_id: u64,
    /// Outstanding requests and their deadlines; at most `ring_slots / 2`.
    pending: HashMap<u64, Instant>,
    /// Messages received while `call` waited for its own response.
    deferred: VecDeque<Incoming>,
    /// One-sided operations ([`Self::one_sided_batch`]) completed so far.
    one_sided_completed: u64,
    stats: MsgStats,
}

impl Endpoint {
    pub fn new(conn: Connection, config: MsgConfig) -> Result<Self> {
        if config.ring_slots < 2 || config.ring_slots > 4096 {
            return Err(Error::InvalidArgument(format!(
                "ring_slots {} not in 2..=4096",
                config.ring_slots
            )));
        }
        let slot_bytes = (HEADER_BYTES + config.max_payload_bytes).next_multiple_of(64);
        let buf = AlignedBuf::zeroed(slot_bytes * config.ring_slots * 2)?;
        let bufs = conn.pd().register(buf, Access::LOCAL)?;
        let mut ep = Self {
            conn,
            bufs,
            slot_bytes,
            free_send_slots: (0..config.ring_slots).rev().collect(),
            next_request_id: 1,
            pending: HashMap::new(),
            deferred: VecDeque::new(),
            one_sided_completed: 0,
            stats: MsgStats::default(),
            config,
        };
        for slot in 0..ep.config.ring_slots {
            ep.post_recv_slot(slot)?;
        }
        Ok(ep)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn connection_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub fn stats(&self) -> &MsgStats {
        &self.stats
    }

    /// The most requests this side may have in flight.
    pub fn request_limit(&self) -> usize {
        self.config.ring_slots / 2
    }

    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    fn post_recv_slot(&mut self, slot: usize) -> Result<()> {
        // SAFETY: receive slots are only read after their completion is polled, and are
        // reposted only after the payload was copied out.
        unsafe {
            self.conn.post_recv(
                slot as u64,
                &self.bufs,
                slot * self.slot_bytes,
                self.slot_bytes,
            )
        }
    }

    fn send_frame(
        &mut self,
        kind: u8,
        request_id: u64,
        payload: &[u8],
        deadline: Instant,
    ) -> Result<()> {
        if payload.len() > self.config.max_payload_bytes {
            return Err(Error::TooLarge {
                what: "message payload",
                len_bytes: payload.len(),
                max_bytes: self.config.max_payload_bytes,
            });
        }
        let slot = loop {
            if let Some(slot) = self.free_send_slots.pop() {
                break slot;
            }
            // Every send slot is in flight: reap completions until one frees.
            if !self.progress()? && Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "a free send slot".into(),
                    timeout_ms: 0,
                });
            }
        };
        let offset = (self.config.ring_slots + slot) * self.slot_bytes;
        let header = FrameHeader {
            kind,
            len: payload.len() as u32,
            request_id,
        }
        .encode();
        self.bufs.write_at(offset, &header)?;
        self.bufs.write_at(offset + HEADER_BYTES, payload)?;
        let len = HEADER_BYTES + payload.len();
        let mut wr = WorkRequest::new(Opcode::Send, &self.bufs, offset, len, None)?
            .inline_if_fits(&self.conn);
        wr.set_wr_id(SEND_BIT | slot as u64);
        // SAFETY: the send slot is not reused until its completion returns it to the free list.
        if let Err(e) = unsafe { self.conn.post(&mut wr) } {
            self.free_send_slots.push(slot);
            return Err(e);
        }
        Ok(())
    }

    /// Sends a request; returns its id. Refuses with [`Error::Backpressure`] when
    /// `request_limit()` requests are already in flight.
    pub fn request(&mut self, payload: &[u8], timeout: Duration) -> Result<u64> {
        if self.pending.len() >= self.request_limit() {
            return Err(Error::Backpressure {
                limit: self.request_limit(),
            });
        }
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let deadline = Instant::now() + timeout;
        self.send_frame(KIND_REQUEST, request_id, payload, deadline)?;
        self.pending.insert(request_id, deadline);
        self.stats.requests_sent += 1;
        Ok(request_id)
    }

    /// Answers a request received earlier.
    pub fn respond(&mut self, request_id: u64, payload: &[u8]) -> Result<()> {
        self.send_frame(
            KIND_RESPONSE,
            request_id,
            payload,
            Instant::now() + Duration::from_secs(5),
        )?;
        self.stats.responses_sent += 1;
        Ok(())
    }

    /// Handles at most one completion. Returns whether it found one; a received message is
    /// appended to `deferred`.
    fn progress(&mut self) -> Result<bool> {
        let Some(wc) = self.conn.poll()? else {
            return Ok(false);
        };
        if !wc.is_success() {
            // A flushed or failed request means the QP is in error: the peer is gone.
            tracing::debug!(?wc, "message connection completion failed");
            return Err(Error::Disconnected);
        }
        if wc.wr_id & SEND_BIT != 0 {
            if wc.wr_id & ONE_SIDED_BIT != 0 {
                self.one_sided_completed += 1;
            }
            self.free_send_slots
                .push((wc.wr_id & !(SEND_BIT | ONE_SIDED_BIT)) as usize);
            return Ok(true);
        }
        let slot = wc.wr_id as usize;
        if slot >= self.config.ring_slots {
            return Err(Error::InvalidArgument(format!(
                "receive completion for unknown slot {slot}"
            )));
        }
        let offset = slot * self.slot_bytes;
        let mut frame = vec![0u8; (wc.byte_len as usize).min(self.slot_bytes)];
        self.bufs.read_at(offset, &mut frame)?;
        self.post_recv_slot(slot)?;
        self.stats.received += 1;
        match FrameHeader::decode(&frame, self.config.max_payload_bytes) {
            Err(e) => {
                self.stats.malformed_frames += 1;
                tracing::warn!(error = %e, peer = %self.conn.peer(), "dropped malformed frame");
            }
            Ok(h) => {
                let payload = frame.split_off(HEADER_BYTES);
                if h.kind == KIND_REQUEST {
                    self.deferred.push_back(Incoming::Request {
                        request_id: h.request_id,
                        payload,
                    });
                } else if self.pending.remove(&h.request_id).is_some() {
                    self.deferred.push_back(Incoming::Response {
                        request_id: h.request_id,
                        payload,
                    });
                } else {
                    self.stats.late_responses += 1;
                    tracing::debug!(
                        request_id = h.request_id,
                        "dropped response to an expired or unknown request"
                    );
                }
            }
        }
        Ok(true)
    }

    fn expire(&mut self) -> Option<Incoming> {
        if self.pending.is_empty() {
            return None;
        }
        let now = Instant::now();
        let request_id = self
            .pending
            .iter()
            .find(|(_, d)| **d <= now)
            .map(|(id, _)| *id)?;
        self.pending.remove(&request_id);
        self.stats.timeouts += 1;
        Some(Incoming::TimedOut { request_id })
    }

    /// Prepares to sleep on [`Connection::cq_event_fd`]: arms the CQ, then looks once
    /// more. Returns `false` if something is ready now (poll instead of sleeping).
    pub fn arm(&mut self) -> Result<bool> {
        if !self.deferred.is_empty() {
            return Ok(false);
        }
        self.conn.cq.arm()?;
        if self.progress()? || !self.deferred.is_empty() {
            return Ok(false);
        }
        Ok(true)
    }

    /// The earliest deadline of an outstanding request: a sleeper must wake by then.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().min().copied()
    }

    /// Returns the next message or timeout, without blocking.
    pub fn poll(&mut self) -> Result<Option<Incoming>> {
        if let Some(m) = self.deferred.pop_front() {
            return Ok(Some(m));
        }
        while self.progress()? {
            if let Some(m) = self.deferred.pop_front() {
                return Ok(Some(m));
            }
        }
        Ok(self.expire())
    }

    /// One-sided RDMA on this connection: `Opcode::Read` copies `len` bytes at `offset` of
    /// the peer's `region` into `local` at `local_offset`; `Opcode::Write` copies them
    /// the other way (complete when the data reached the peer's NIC; durability on PM is
    /// the peer's business). Waits for the completion; messages that arrive meanwhile are
    /// kept for [`Endpoint::poll`]. An access the peer's region does not allow (a bad
    /// rkey, a read-only region, out of bounds) fails the connection, as any remote
    /// access error does on RC.
    pub fn one_sided(
        &mut self,
        opcode: Opcode,
        local: &MemoryRegion,
        local_offset: usize,
        (region, offset): (&crate::mr::RemoteRegion, u64),
        len: usize,
        timeout: Duration,
    ) -> Result<()> {
        let op = OneSided {
            local_offset,
            remote: region,
            remote_offset: offset,
            len,
        };
        self.one_sided_batch(opcode, local, &[op], timeout)
    }

    /// Several one-sided operations of one kind, posted back to back (as many in flight
    /// as there are free send slots) and waited for together, each on a remote region of
    /// its own (a data READ, then a READ of the record that proves it, say). An RC QP
    /// executes them in the order they were posted; the call returns once every one
    /// completed. Failures are as for [`Self::one_sided`].
    pub fn one_sided_batch(
        &mut self,
        opcode: Opcode,
        local: &MemoryRegion,
        ops: &[OneSided<'_>],
        timeout: Duration,
    ) -> Result<()> {
        if !matches!(opcode, Opcode::Read | Opcode::Write) {
            return Err(Error::InvalidArgument(format!(
                "{opcode:?} is not a one-sided READ or WRITE"
            )));
        }
        let deadline = Instant::now() + timeout;
        let target = self.one_sided_completed + ops.len() as u64;
        let mut spins = 0u32;
        for op in ops {
            while self.free_send_slots.is_empty() {
                if !self.progress()? && Instant::now() >= deadline {
                    return Err(Error::Timeout {
                        what: format!(
                            "a send slot for a one-sided {opcode:?} with {}",
                            self.conn.peer()
                        ),
                        timeout_ms: timeout.as_millis() as u64,
                    });
                }
            }
            let Some(slot) = self.free_send_slots.pop() else {
                unreachable!("a free send slot was just seen");
            };
            let remote = Some((op.remote, op.remote_offset));
            let mut wr = WorkRequest::new(opcode, local, op.local_offset, op.len, remote)
                .inspect_err(|_| self.free_send_slots.push(slot))?;
            wr.set_wr_id(SEND_BIT | ONE_SIDED_BIT | slot as u64);
            // SAFETY: `local` is borrowed until every operation completes below (or the
            // connection fails, which flushes them).
            if let Err(e) = unsafe { self.conn.post(&mut wr) } {
                self.free_send_slots.push(slot);
                return Err(e);
            }
        }
        while self.one_sided_completed < target {
            self.progress()?;
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(CLOCK_EVERY) && self.conn.peer_disconnected()? {
                return Err(Error::Disconnected);
            }
            if spins.is_multiple_of(CLOCK_EVERY) && Instant::now() >= deadline {
                // The operations may still land later: the caller must drop the connection
                // (its QP) before reusing `local`.
                return Err(Error::Timeout {
                    what: format!("{} RDMA {opcode:?}s with {}", ops.len(), self.conn.peer()),
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
        }
        self.stats.reads += ops.len() as u64;
        Ok(())
    }

    /// Sends a request and waits for its response. Requests that arrive meanwhile are kept
    /// for later [`Endpoint::poll`] calls.
    pub fn call(&mut self, payload: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        let request_id = self.request(payload, timeout)?;
        self.wait_response(request_id, timeout)
    }

    /// Waits for the response to `request_id` (sent with [`Endpoint::request`] and
    /// `timeout`), as [`Endpoint::call`] does: for a request posted together with other
    /// work (one-sided operations) on the connection. Requests that arrive meanwhile are
    /// kept for later [`Endpoint::poll`] calls.
    pub fn wait_response(&mut self, request_id: u64, timeout: Duration) -> Result<Vec<u8>> {
        // The response may have come in already (kept while other work was waited for).
        let mut scanned = 0;
        let mut spins = 0u32;
        loop {
            spins = spins.wrapping_add(1);
            self.progress()?;
            // Only look at what arrived since the last scan.
            while scanned < self.deferred.len() {
                let ours = matches!(
                    self.deferred.get(scanned),
                    Some(Incoming::Response { request_id: id, .. }) if *id == request_id
                );
                if ours
                    && let Some(Incoming::Response { payload, .. }) = self.deferred.remove(scanned)
                {
                    return Ok(payload);
                }
                scanned += 1;
            }
            if !spins.is_multiple_of(CLOCK_EVERY) {
                continue;
            }
            // A peer that died answers nothing: its disconnect ends the wait at once.
            if self.conn.peer_disconnected()? {
                self.pending.remove(&request_id);
                return Err(Error::Disconnected);
            }
            let deadline = self.pending.get(&request_id).copied();
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.pending.remove(&request_id);
                self.stats.timeouts += 1;
                return Err(Error::Timeout {
                    what: format!("response to request {request_id} from {}", self.conn.peer()),
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(h: FrameHeader, payload: &[u8]) -> Vec<u8> {
        let mut f = h.encode().to_vec();
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn header_round_trips() {
        let h = FrameHeader {
            kind: KIND_REQUEST,
            len: 3,
            request_id: 0x0102_0304_0506_0708,
        };
        let f = frame(h, b"abc");
        assert_eq!(FrameHeader::decode(&f, 100).unwrap(), h);
        assert_eq!(&f[..4], &[0x4d, 0x50, 1, 1]);
    }

    #[test]
    fn header_rejects_malformed_frames() {
        let good = FrameHeader {
            kind: KIND_RESPONSE,
            len: 2,
            request_id: 9,
        };
        let f = frame(good, b"hi");
        assert!(FrameHeader::decode(&f[..10], 100).is_err(), "short");
        assert!(
            FrameHeader::decode(&f[..17], 100).is_err(),
            "truncated payload"
        );
        assert!(FrameHeader::decode(&f, 1).is_err(), "payload over limit");
        for (i, v) in [(0usize, 0u8), (2, 9), (3, 7)] {
            let mut bad = f.clone();
            bad[i] = v;
            assert!(FrameHeader::decode(&bad, 100).is_err(), "byte {i} = {v}");
        }
        let mut long = f.clone();
        long.push(0);
        assert!(FrameHeader::decode(&long, 100).is_err(), "trailing bytes");
    }

    #[test]
    fn decode_never_panics_on_arbitrary_bytes() {
        // A deterministic sweep of short byte strings and mutated headers.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for n in 0..20_000usize {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = n % 40;
            let mut bytes: Vec<u8> = (0..len).map(|i| (seed >> ((i % 8) * 8)) as u8).collect();
            if len >= 4 && n % 2 == 0 {
                bytes[0..4].copy_from_slice(&[0x4d, 0x50, 1, 1 + (n % 2) as u8]);
            }
            let _ = FrameHeader::decode(&bytes, 32);
        }
    }
}
