//! Posting work requests and polling their completions on a [`Connection`].
//!
//! A [`WorkRequest`] is built once (opcode, local buffer, remote address, flags) and can be
//! posted many times; the hot loop only patches the fields that change (eRPC's habit).
//! Posting is `unsafe` for one reason, stated once here:
//!
//! # Safety (every `post*` function)
//!
//! The local bytes a request names must stay registered and must not be read or written by
//! the CPU in a way that races the device until the request's completion has been polled
//! (or the connection is dropped). Bounds are checked before posting; lifetimes are not,
//! because a completion arrives asynchronously.

use std::time::Duration;

use rdma_sys as sys;

use crate::cm::Connection;
use crate::cq::WorkCompletion;
use crate::error::{Error, Result};
use crate::mr::{MemoryRegion, RemoteRegion};
use crate::spin::SpinDeadline;

/// What a work request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Send,
    Write,
    WriteWithImm(u32),
    Read,
    /// Compare-and-swap on 8 remote bytes; the old value lands in the local buffer.
    CompareSwap {
        compare: u64,
        swap: u64,
    },
    /// Fetch-and-add on 8 remote bytes; the old value lands in the local buffer.
    FetchAdd {
        add: u64,
    },
}

/// A prepared send-queue work request.
pub struct WorkRequest {
    wr: sys::ibv_send_wr,
    sge: sys::ibv_sge,
}

// SAFETY: the raw pointers inside point at our own `sge` (re-linked before each post) or
// are null; moving the value between threads is fine.
unsafe impl Send for WorkRequest {}

impl WorkRequest {
    /// Builds a request over `local[offset..offset+len]` and, for one-sided opcodes,
    /// `remote[remote_offset..+len]`. Bounds and atomic alignment are checked here.
    pub fn new(
        opcode: Opcode,
        local: &MemoryRegion,
        offset: usize,
        len: usize,
        remote: Option<(&RemoteRegion, u64)>,
    ) -> Result<Self> {
        local.check_range(offset, len)?;
        // SAFETY: ibv_send_wr and ibv_sge are plain old data; zero is valid for both.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        let sge = sys::ibv_sge {
            addr: local.addr() + offset as u64,
            length: len as u32,
            lkey: local.lkey(),
        };
        let remote_addr = |len: u64| -> Result<(u64, u32)> {
            let (region, roff) = remote.ok_or_else(|| {
                Error::InvalidArgument(format!("{opcode:?} needs a remote region"))
            })?;
            Ok((region.addr_of(roff, len)?, region.rkey))
        };
        use sys::ibv_wr_opcode::*;
        match opcode {
            Opcode::Send => wr.opcode = IBV_WR_SEND,
            Opcode::Write | Opcode::WriteWithImm(_) | Opcode::Read => {
                let (addr, rkey) = remote_addr(len as u64)?;
                wr.opcode = match opcode {
                    Opcode::Write => IBV_WR_RDMA_WRITE,
                    Opcode::Read => IBV_WR_RDMA_READ,
                    _ => IBV_WR_RDMA_WRITE_WITH_IMM,
                };
                if let Opcode::WriteWithImm(imm) = opcode {
                    wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                }
                wr.wr.rdma = sys::rdma_t {
                    remote_addr: addr,
                    rkey,
                };
            }
            Opcode::CompareSwap { .. } | Opcode::FetchAdd { .. } => {
                if len != 8 {
                    return Err(Error::InvalidArgument(format!(
                        "atomics are 8 bytes, not {len}"
                    )));
                }
                let (addr, rkey) = remote_addr(8)?;
                if !addr.is_multiple_of(8) || !sge.addr.is_multiple_of(8) {
                    return Err(Error::InvalidArgument(format!(
                        "atomic addresses must be 8-byte aligned (remote {addr:#x}, local {:#x})",
                        sge.addr
                    )));
                }
                let (op, compare_add, swap) = match opcode {
                    Opcode::CompareSwap { compare, swap } => {
                        (IBV_WR_ATOMIC_CMP_AND_SWP, compare, swap)
                    }
                    Opcode::FetchAdd { add } => (IBV_WR_ATOMIC_FETCH_AND_ADD, add, 0),
                    _ => unreachable!("matched above"),
                };
                wr.opcode = op;
                wr.wr.atomic = sys::atomic_t {
                    remote_addr: addr,
                    compare_add,
                    swap,
                    rkey,
                };
            }
        }
        wr.num_sge = 1;
        wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        Ok(Self { wr, sge })
    }

    /// Sends small payloads inline (the CPU copies them at post time, saving the device a
    /// DMA read). Only SEND and WRITE may be inline, up to the QP's inline limit.
    pub fn inline_if_fits(mut self, conn: &Connection) -> Self {
        use sys::ibv_wr_opcode::*;
        let inlinable = matches!(
            self.wr.opcode,
            IBV_WR_SEND | IBV_WR_RDMA_WRITE | IBV_WR_RDMA_WRITE_WITH_IMM
        );
        if inlinable && self.sge.length <= conn.max_inline_bytes {
            self.wr.send_flags |= sys::ibv_send_flags::IBV_SEND_INLINE.0;
        }
        self
    }

    /// Leaves the request unsignaled (no completion unless it fails).
    pub fn unsignaled(mut self) -> Self {
        self.wr.send_flags &= !sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        self
    }

    pub fn set_wr_id(&mut self, wr_id: u64) {
        self.wr.wr_id = wr_id;
    }

    /// Patches compare and swap values of a CAS request (hot loop).
    pub fn set_compare_swap(&mut self, compare: u64, swap: u64) {
        // Writing Copy fields of a union is safe; CAS reads the atomic arm.
        self.wr.wr.atomic.compare_add = compare;
        self.wr.wr.atomic.swap = swap;
    }
}

impl Connection {
    /// Posts a prepared request.
    ///
    /// # Safety
    ///
    /// See the module documentation: the local bytes must stay untouched and registered
    /// until the completion is polled.
    #[inline]
    pub unsafe fn post(&self, wr: &mut WorkRequest) -> Result<()> {
        wr.wr.sg_list = &mut wr.sge;
        wr.wr.next = std::ptr::null_mut();
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is valid; `wr` and its SGE live across the call; the caller
        // upholds the buffer contract.
        let ret = unsafe { sys::ibv_post_send(self.qp.as_ptr(), &mut wr.wr, &mut bad) };
        if ret != 0 {
            return Err(Error::from_ret(
                "ibv_post_send",
                self.peer().to_string(),
                ret,
            ));
        }
        Ok(())
    }

    /// Posts a receive of up to `len` bytes into `local[offset..]`.
    ///
    /// # Safety
    ///
    /// As for [`Connection::post`]: the buffer belongs to the device until the receive
    /// completes.
    pub unsafe fn post_recv(
        &self,
        wr_id: u64,
        local: &MemoryRegion,
        offset: usize,
        len: usize,
    ) -> Result<()> {
        local.check_range(offset, len)?;
        let mut sge = sys::ibv_sge {
            addr: local.addr() + offset as u64,
            length: len as u32,
            lkey: local.lkey(),
        };
        let mut wr = sys::ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is valid; `wr` and `sge` live across the call.
        let ret = unsafe { sys::ibv_post_recv(self.qp.as_ptr(), &mut wr, &mut bad) };
        if ret != 0 {
            return Err(Error::from_ret(
                "ibv_post_recv",
                self.peer().to_string(),
                ret,
            ));
        }
        Ok(())
    }

    /// Polls the connection's completion queue once.
    #[inline]
    pub fn poll(&mut self) -> Result<Option<WorkCompletion>> {
        self.cq.poll_one()
    }

    /// Busy-polls until the completion of `wr_id` arrives (failing on an error status or
    /// on any other completion, which a synchronous caller cannot have asked for).
    pub fn wait_for(&mut self, wr_id: u64, timeout: Duration) -> Result<WorkCompletion> {
        let mut deadline = SpinDeadline::new(timeout);
        loop {
            if let Some(wc) = self.cq.poll_one()? {
                let wc = wc.ok()?;
                if wc.wr_id == wr_id {
                    return Ok(wc);
                }
                return Err(Error::InvalidArgument(format!(
                    "completion for wr_id {:#x} while waiting for {wr_id:#x}",
                    wc.wr_id
                )));
            }
            if deadline.expired() {
                return Err(Error::Timeout {
                    what: format!("completion of wr_id {wr_id:#x}"),
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
        }
    }

    /// Builds, posts and waits for one request: the synchronous form of every one-sided
    /// operation. Returns the completion.
    pub fn execute(
        &mut self,
        opcode: Opcode,
        local: &MemoryRegion,
        offset: usize,
        len: usize,
        remote: Option<(&RemoteRegion, u64)>,
        timeout: Duration,
    ) -> Result<WorkCompletion> {
        const SYNC_WR_ID: u64 = u64::MAX;
        let mut wr = WorkRequest::new(opcode, local, offset, len, remote)?.inline_if_fits(self);
        wr.set_wr_id(SYNC_WR_ID);
        // SAFETY: we hold `local` borrowed until the completion is polled below (or the
        // wait fails, after which the connection is unusable for this buffer only in the
        // sense that a late completion may still write it — callers treat it as garbage).
        unsafe { self.post(&mut wr) }?;
        self.wait_for(SYNC_WR_ID, timeout)
    }
}
