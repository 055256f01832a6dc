//! Completion queues (the basic `ibv_poll_cq` kind: on rxe the extended-CQ API costs ~3x
//! the latency of a plain poll, so the datapath uses this one).

use std::ptr::NonNull;

use rdma_sys as sys;

use crate::device::Context;
use crate::error::{Error, Result};

/// One polled work completion, reduced to what callers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkCompletion {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: u32,
    pub byte_len: u32,
    pub vendor_err: u32,
    /// Immediate data (host order) for RECV / RECV_RDMA_WITH_IMM completions that carry it.
    pub imm: Option<u32>,
}

impl WorkCompletion {
    pub fn is_success(&self) -> bool {
        self.status == sys::ibv_wc_status::IBV_WC_SUCCESS
    }

    pub fn is_recv(&self) -> bool {
        self.opcode & sys::ibv_wc_opcode::IBV_WC_RECV != 0
    }

    /// Turns a failed completion into an error naming the status.
    pub fn ok(self) -> Result<Self> {
        if self.is_success() {
            return Ok(self);
        }
        // SAFETY: ibv_wc_status_str returns a static string for any value.
        let text = unsafe { std::ffi::CStr::from_ptr(sys::ibv_wc_status_str(self.status)) };
        Err(Error::WorkCompletion {
            wr_id: self.wr_id,
            opcode: opcode_name(self.opcode),
            status: self.status,
            status_text: text.to_string_lossy().into_owned(),
            vendor_err: self.vendor_err,
        })
    }
}

pub fn opcode_name(opcode: u32) -> &'static str {
    use sys::ibv_wc_opcode::*;
    match opcode {
        IBV_WC_SEND => "SEND",
        IBV_WC_RDMA_WRITE => "RDMA_WRITE",
        IBV_WC_RDMA_READ => "RDMA_READ",
        IBV_WC_COMP_SWAP => "COMP_SWAP",
        IBV_WC_FETCH_ADD => "FETCH_ADD",
        IBV_WC_RECV => "RECV",
        IBV_WC_RECV_RDMA_WITH_IMM => "RECV_RDMA_WITH_IMM",
        _ => "other",
    }
}

/// A completion queue; owned by one connection and polled by one thread at a time.
///
/// It has a completion channel, so that an idle control-plane loop can sleep in `poll(2)`
/// on [`Self::event_fd`] after [`Self::arm`] instead of spinning (the datapath never arms
/// it and pays nothing for it).
pub struct CompletionQueue {
    ptr: NonNull<sys::ibv_cq>,
    channel: NonNull<sys::ibv_comp_channel>,
    _context: Context,
    depth: u32,
}

// SAFETY: a CQ may be moved to another thread; polling needs `&mut self` here, so it is
// never polled from two threads at once through this handle.
unsafe impl Send for CompletionQueue {}

impl CompletionQueue {
    pub fn new(context: &Context, depth: u32) -> Result<Self> {
        // SAFETY: the context is valid.
        let channel = unsafe { sys::ibv_create_comp_channel(context.as_ptr()) };
        let channel = NonNull::new(channel).ok_or_else(|| {
            Error::last_os("ibv_create_comp_channel", format!("on {}", context.name()))
        })?;
        // SAFETY: the channel is valid; its fd is ours to make non-blocking.
        let fd = unsafe { (*channel.as_ptr()).fd };
        // SAFETY: fcntl on a valid fd.
        unsafe {
            libc::fcntl(
                fd,
                libc::F_SETFL,
                libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
            )
        };
        // SAFETY: the context and channel are valid; vector 0.
        let ptr = unsafe {
            sys::ibv_create_cq(
                context.as_ptr(),
                depth as i32,
                std::ptr::null_mut(),
                channel.as_ptr(),
                0,
            )
        };
        let Some(ptr) = NonNull::new(ptr) else {
            let err = Error::last_os(
                "ibv_create_cq",
                format!("{} entries on {}", depth, context.name()),
            );
            // SAFETY: the channel is valid and has no CQ.
            unsafe { sys::ibv_destroy_comp_channel(channel.as_ptr()) };
            return Err(err);
        };
        Ok(Self {
            ptr,
            channel,
            _context: context.clone(),
            depth,
        })
    }

    /// The file descriptor that becomes readable when an armed CQ gets a completion.
    pub fn event_fd(&self) -> i32 {
        // SAFETY: the channel is valid until drop.
        unsafe { (*self.channel.as_ptr()).fd }
    }

    /// Acknowledges any delivered events, then asks for an event on the next completion.
    /// Completions that arrived before arming raise no event: poll the CQ once more after
    /// arming, before sleeping on [`Self::event_fd`].
    pub fn arm(&mut self) -> Result<()> {
        loop {
            let mut cq: *mut sys::ibv_cq = std::ptr::null_mut();
            let mut ctx: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: valid channel; the fd is non-blocking, so this returns -1 when empty.
            if unsafe { sys::ibv_get_cq_event(self.channel.as_ptr(), &mut cq, &mut ctx) } != 0 {
                break;
            }
            // SAFETY: one event was taken from this CQ.
            unsafe { sys::ibv_ack_cq_events(self.as_ptr(), 1) };
        }
        // SAFETY: valid CQ; 0 = any completion.
        let ret = unsafe { sys::ibv_req_notify_cq(self.as_ptr(), 0) };
        if ret != 0 {
            return Err(Error::from_ret("ibv_req_notify_cq", "", ret));
        }
        Ok(())
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_cq {
        self.ptr.as_ptr()
    }

    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Polls once without blocking; returns `None` when the queue is empty.
    #[inline]
    pub fn poll_one(&mut self) -> Result<Option<WorkCompletion>> {
        // SAFETY: ibv_wc is plain old data.
        let mut wc: sys::ibv_wc = unsafe { std::mem::zeroed() };
        // SAFETY: the CQ is valid and `wc` has room for one entry.
        let n = unsafe { sys::ibv_poll_cq(self.as_ptr(), 1, &mut wc) };
        if n < 0 {
            return Err(Error::from_ret("ibv_poll_cq", "", n));
        }
        if n == 0 {
            return Ok(None);
        }
        let with_imm = wc.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
        Ok(Some(WorkCompletion {
            wr_id: wc.wr_id,
            status: wc.status,
            opcode: wc.opcode,
            byte_len: wc.byte_len,
            vendor_err: wc.vendor_err,
            // SAFETY: with IBV_WC_WITH_IMM set, the union holds immediate data.
            imm: with_imm
                .then(|| u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })),
        }))
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: the owning connection destroys its QP before its CQ drops.
        let ret = unsafe { sys::ibv_destroy_cq(self.as_ptr()) };
        if ret != 0 {
            tracing::warn!(ret, "ibv_destroy_cq failed");
        }
        // SAFETY: its only CQ is gone (events are acknowledged as they are taken).
        unsafe { sys::ibv_destroy_comp_channel(self.channel.as_ptr()) };
    }
}
