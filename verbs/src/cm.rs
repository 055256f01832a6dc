//! Connection setup with rdma_cm: listen / accept / connect by `ip:port`, with private data
//! (typically a [`crate::RemoteRegion`]) carried in both directions.
//!
//! Setup is a typestate: [`Connector::resolve`] yields a [`ResolvedRoute`] (address and
//! route resolved, device known, so the caller can create its protection domain and
//! register memory on the right device), whose [`ResolvedRoute::connect`] yields a
//! [`Connection`] in RTS. On the passive side [`Listener::accept`] goes from a connect
//! request to an established [`Connection`] the same way.

use std::net::{IpAddr, SocketAddr};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use rdma_sys as sys;

use crate::cq::CompletionQueue;
use crate::device::Context;
use crate::error::{Error, Result};
use crate::mr::ProtectionDomain;
use crate::msg::{Endpoint, MsgConfig};

/// Largest private data rdma_cm carries on a connect request (RC, IB CM): 56 bytes.
pub const MAX_CONNECT_PRIVATE_DATA_BYTES: usize = 56;
/// Largest private data on an accept (IB CM REP): 196 bytes.
pub const MAX_ACCEPT_PRIVATE_DATA_BYTES: usize = 196;

/// Sizes and limits of one connection's queue pair.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_inline_bytes: u32,
    /// Outstanding RDMA READs / atomics in each direction.
    pub max_rd_atomic: u8,
    pub timeout_ms: u64,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            max_send_wr: 128,
            max_recv_wr: 128,
            max_inline_bytes: 64,
            max_rd_atomic: 16,
            timeout_ms: 5000,
        }
    }
}

pub(crate) fn to_sockaddr(addr: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
        }
    }
    storage
}

/// An rdma_cm event channel; every id here has its own, so events never interleave.
struct EventChannel {
    ptr: NonNull<sys::rdma_event_channel>,
}

impl EventChannel {
    fn new() -> Result<Self> {
        // SAFETY: plain constructor.
        let ptr = unsafe { sys::rdma_create_event_channel() };
        let ptr =
            NonNull::new(ptr).ok_or_else(|| Error::last_os("rdma_create_event_channel", ""))?;
        Ok(Self { ptr })
    }

    fn fd(&self) -> i32 {
        // SAFETY: the channel is valid until drop.
        unsafe { (*self.ptr.as_ptr()).fd }
    }

    /// Waits up to `timeout` for the next event. `Ok(None)` on timeout.
    fn next(&self, timeout: Duration) -> Result<Option<CmEvent>> {
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(Error::Verb {
                verb: "poll",
                context: " (rdma_cm channel)".into(),
                source: err,
            });
        }
        if ready == 0 {
            return Ok(None);
        }
        let mut event: *mut sys::rdma_cm_event = std::ptr::null_mut();
        // SAFETY: the channel is readable, so this does not block; `event` is an out-pointer.
        let ret = unsafe { sys::rdma_get_cm_event(self.ptr.as_ptr(), &mut event) };
        if ret != 0 || event.is_null() {
            return Err(Error::last_os("rdma_get_cm_event", ""));
        }
        // SAFETY: the event is valid until acked; everything needed is copied out first.
        let out = unsafe {
            let e = &*event;
            let conn = e.param.conn;
            let private_data = if conn.private_data.is_null() || conn.private_data_len == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(
                    conn.private_data.cast::<u8>(),
                    conn.private_data_len as usize,
                )
                .to_vec()
            };
            CmEvent {
                kind: e.event,
                status: e.status,
                id: e.id,
                private_data,
            }
        };
        // SAFETY: acked exactly once.
        unsafe { sys::rdma_ack_cm_event(event) };
        Ok(Some(out))
    }

    /// Waits for an event of kind `expected` (skipping none), failing on anything else.
    fn expect(&self, expected: u32, addr: &SocketAddr, timeout_ms: u64) -> Result<CmEvent> {
        let event = self
            .next(Duration::from_millis(timeout_ms))?
            .ok_or_else(|| Error::Timeout {
                what: format!("{} from {addr}", event_name(expected)),
                timeout_ms,
            })?;
        if event.kind == expected {
            return Ok(event);
        }
        if event.kind == sys::rdma_cm_event_type::RDMA_CM_EVENT_REJECTED {
            return Err(Error::Rejected {
                addr: addr.to_string(),
                status: event.status,
            });
        }
        Err(Error::CmEvent {
            addr: addr.to_string(),
            expected: event_name(expected),
            got: event_name(event.kind).to_owned(),
            status: event.status,
        })
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id on the channel was destroyed first (owners drop ids before
        // their channel field).
        unsafe { sys::rdma_destroy_event_channel(self.ptr.as_ptr()) };
    }
}

struct CmEvent {
    kind: u32,
    status: i32,
    id: *mut sys::rdma_cm_id,
    private_data: Vec<u8>,
}

fn event_name(kind: u32) -> &'static str {
    use sys::rdma_cm_event_type::*;
    match kind {
        RDMA_CM_EVENT_ADDR_RESOLVED => "ADDR_RESOLVED",
        RDMA_CM_EVENT_ADDR_ERROR => "ADDR_ERROR",
        RDMA_CM_EVENT_ROUTE_RESOLVED => "ROUTE_RESOLVED",
        RDMA_CM_EVENT_ROUTE_ERROR => "ROUTE_ERROR",
        RDMA_CM_EVENT_CONNECT_REQUEST => "CONNECT_REQUEST",
        RDMA_CM_EVENT_CONNECT_RESPONSE => "CONNECT_RESPONSE",
        RDMA_CM_EVENT_CONNECT_ERROR => "CONNECT_ERROR",
        RDMA_CM_EVENT_UNREACHABLE => "UNREACHABLE",
        RDMA_CM_EVENT_REJECTED => "REJECTED",
        RDMA_CM_EVENT_ESTABLISHED => "ESTABLISHED",
        RDMA_CM_EVENT_DISCONNECTED => "DISCONNECTED",
        RDMA_CM_EVENT_DEVICE_REMOVAL => "DEVICE_REMOVAL",
        RDMA_CM_EVENT_TIMEWAIT_EXIT => "TIMEWAIT_EXIT",
        _ => "other rdma_cm event",
    }
}

/// An rdma_cm id together with the channel its events arrive on. Dropping destroys the
/// QP (if any), then the id, then the channel.
struct CmId {
    id: NonNull<sys::rdma_cm_id>,
    channel: EventChannel,
}

// SAFETY: rdma_cm ids may be used from any thread; this wrapper is owned by one object.
unsafe impl Send for CmId {}

impl CmId {
    fn new(channel: EventChannel) -> Result<Self> {
        let mut id = std::ptr::null_mut();
        // SAFETY: valid channel, `id` is an out-pointer; RC needs the TCP port space.
        let ret = unsafe {
            sys::rdma_create_id(
                channel.ptr.as_ptr(),
                &mut id,
                std::ptr::null_mut(),
                sys::rdma_port_space::RDMA_PS_TCP,
            )
        };
        match NonNull::new(id) {
            Some(id) if ret == 0 => Ok(Self { id, channel }),
            _ => Err(Error::last_os("rdma_create_id", "")),
        }
    }

    fn as_ptr(&self) -> *mut sys::rdma_cm_id {
        self.id.as_ptr()
    }

    fn context(&self) -> Result<Context> {
        // SAFETY: the id is valid; `verbs` is set once an address is bound or resolved.
        Context::from_raw(unsafe { (*self.as_ptr()).verbs })
    }

    fn port_num(&self) -> u8 {
        // SAFETY: the id is valid.
        unsafe { (*self.as_ptr()).port_num }
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: the id is valid; a QP created on it (if any) is destroyed first, and
        // rdma_destroy_qp tolerates ids without a QP only if we check.
        unsafe {
            if !(*self.as_ptr()).qp.is_null() {
                sys::rdma_destroy_qp(self.as_ptr());
            }
            sys::rdma_destroy_id(self.as_ptr());
        }
    }
}

/// Active side, step 1: where to connect from and to.
#[derive(Debug, Clone)]
pub struct Connector {
    pub src: Option<IpAddr>,
    pub dst: SocketAddr,
    pub timeout_ms: u64,
}

/// Active side, step 2: the route is resolved and the device is known.
pub struct ResolvedRoute {
    id: CmId,
    context: Context,
    dst: SocketAddr,
    timeout_ms: u64,
}

impl Connector {
    pub fn new(src: Option<IpAddr>, dst: SocketAddr) -> Self {
        Self {
            src,
            dst,
            timeout_ms: 5000,
        }
    }

    /// Resolves address and route. Binding to `src` makes the connection use the device
    /// that owns that address (on the rig: the simulated host's own rxe device).
    pub fn resolve(&self) -> Result<ResolvedRoute> {
        let id = CmId::new(EventChannel::new()?)?;
        let mut dst = to_sockaddr(self.dst);
        let mut src = self.src.map(|ip| to_sockaddr(SocketAddr::new(ip, 0)));
        let src_ptr = src.as_mut().map_or(std::ptr::null_mut(), |s| {
            (s as *mut libc::sockaddr_storage).cast()
        });
        let timeout = self.timeout_ms.min(i32::MAX as u64) as i32;
        // SAFETY: valid id; the sockaddrs live across the call.
        let ret =
            unsafe { sys::rdma_resolve_addr(id.as_ptr(), src_ptr, (&raw mut dst).cast(), timeout) };
        if ret != 0 {
            return Err(Error::last_os(
                "rdma_resolve_addr",
                format!("{:?} -> {}", self.src, self.dst),
            ));
        }
        id.channel.expect(
            sys::rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED,
            &self.dst,
            self.timeout_ms,
        )?;
        // SAFETY: valid id with a resolved address.
        if unsafe { sys::rdma_resolve_route(id.as_ptr(), timeout) } != 0 {
            return Err(Error::last_os("rdma_resolve_route", self.dst.to_string()));
        }
        id.channel.expect(
            sys::rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED,
            &self.dst,
            self.timeout_ms,
        )?;
        let context = id.context()?;
        Ok(ResolvedRoute {
            id,
            context,
            dst: self.dst,
            timeout_ms: self.timeout_ms,
        })
    }
}

impl ResolvedRoute {
    /// The device the route goes through: create the PD and MRs on this context.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// Creates the QP on `pd` and connects, sending `private_data` (at most 56 bytes).
    pub fn connect(
        self,
        pd: &ProtectionDomain,
        config: &ConnectionConfig,
        private_data: &[u8],
    ) -> Result<Connection> {
        self.connect_into(pd, config, private_data, Ok, |c| c)
    }

    /// [`ResolvedRoute::connect`] for a message [`Endpoint`]: its receive ring is posted
    /// while the QP is still in INIT, before the peer can send. (Posting it after the
    /// connection is up races the peer's first SEND: the responder answers RNR NAK, and
    /// the kernel's rdma_cm sets `min_rnr_timer` 0, which is the longest RNR wait,
    /// 655 ms, before the sender tries again.)
    pub fn connect_endpoint(
        self,
        pd: &ProtectionDomain,
        config: &ConnectionConfig,
        private_data: &[u8],
        msg: MsgConfig,
    ) -> Result<Endpoint> {
        self.connect_into(
            pd,
            config,
            private_data,
            |conn| Endpoint::new(conn, msg),
            Endpoint::connection_mut,
        )
    }

    /// Creates the QP, wraps the connection with `build` while the QP is in INIT (the
    /// wrapper may post receives), then connects the wrapped connection.
    fn connect_into<W>(
        self,
        pd: &ProtectionDomain,
        config: &ConnectionConfig,
        private_data: &[u8],
        build: impl FnOnce(Connection) -> Result<W>,
        conn: impl FnOnce(&mut W) -> &mut Connection,
    ) -> Result<W> {
        fits(
            "connect private data",
            private_data,
            MAX_CONNECT_PRIVATE_DATA_BYTES,
        )?;
        let mut wrapped = build(Connection::create_qp(self.id, pd, config, self.dst)?)?;
        conn(&mut wrapped).finish_connect(config, private_data, self.timeout_ms)?;
        Ok(wrapped)
    }
}

/// Private data longer than the CM message carries is refused before anything is sent.
fn fits(what: &'static str, private_data: &[u8], max_bytes: usize) -> Result<()> {
    if private_data.len() > max_bytes {
        return Err(Error::TooLarge {
            what,
            len_bytes: private_data.len(),
            max_bytes,
        });
    }
    Ok(())
}

fn conn_param(config: &ConnectionConfig, private_data: &[u8]) -> sys::rdma_conn_param {
    sys::rdma_conn_param {
        private_data: private_data.as_ptr().cast(),
        private_data_len: private_data.len() as u8,
        responder_resources: config.max_rd_atomic,
        initiator_depth: config.max_rd_atomic,
        flow_control: 1,
        retry_count: 7,
        // 7 = retry forever on receiver-not-ready: the message layer's credits keep the
        // peer's ring from overflowing, so an RNR is only ever a slow consumer.
        rnr_retry_count: 7,
        srq: 0,
        qp_num: 0,
    }
}

/// Passive side: a bound, listening rdma_cm id.
pub struct Listener {
    id: CmId,
    context: Context,
    addr: SocketAddr,
}

impl Listener {
    /// Binds to a specific address (not a wildcard: the address picks the device) and
    /// listens.
    pub fn bind(addr: SocketAddr, backlog: i32) -> Result<Self> {
        if addr.ip().is_unspecified() {
            return Err(Error::InvalidArgument(format!(
                "listen address {addr} is a wildcard; bind to the address of an RDMA device"
            )));
        }
        let id = CmId::new(EventChannel::new()?)?;
        let mut sa = to_sockaddr(addr);
        // SAFETY: valid id and sockaddr.
        if unsafe { sys::rdma_bind_addr(id.as_ptr(), (&raw mut sa).cast()) } != 0 {
            return Err(Error::last_os("rdma_bind_addr", addr.to_string()));
        }
        // SAFETY: valid bound id.
        if unsafe { sys::rdma_listen(id.as_ptr(), backlog) } != 0 {
            return Err(Error::last_os("rdma_listen", addr.to_string()));
        }
        let context = id.context()?;
        // Port 0 asks for any free port: learn which one was bound.
        // SAFETY: valid bound id.
        let port = u16::from_be(unsafe { sys::rdma_get_src_port(id.as_ptr()) });
        let addr = SocketAddr::new(addr.ip(), port);
        Ok(Self { id, context, addr })
    }

    pub fn context(&self) -> &Context {
        &self.context
    }

    /// Readable when a connect request (or another rdma_cm event) is waiting.
    pub fn event_fd(&self) -> i32 {
        self.id.channel.fd()
    }

    /// The bound address, with the port the kernel chose when asked for port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for one connect request. `Ok(None)` when `timeout` passes without one.
    pub fn next_request(&self, timeout: Duration) -> Result<Option<ConnectRequest>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(event) = self.id.channel.next(left)? else {
                return Ok(None);
            };
            if event.kind != sys::rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST {
                tracing::debug!(event = event_name(event.kind), "listener ignored event");
                continue;
            }
            let Some(raw) = NonNull::new(event.id) else {
                continue;
            };
            // Give the new id a channel of its own so its later events (ESTABLISHED,
            // DISCONNECTED) never mix with other connections' or the listener's.
            let channel = EventChannel::new()?;
            // SAFETY: the request event was acked, so the id may migrate.
            if unsafe { sys::rdma_migrate_id(raw.as_ptr(), channel.ptr.as_ptr()) } != 0 {
                let err = Error::last_os("rdma_migrate_id", "");
                // SAFETY: the id is ours and not otherwise owned yet.
                unsafe { sys::rdma_reject(raw.as_ptr(), std::ptr::null(), 0) };
                // SAFETY: as above.
                unsafe { sys::rdma_destroy_id(raw.as_ptr()) };
                return Err(err);
            }
            let id = CmId { id: raw, channel };
            return Ok(Some(ConnectRequest {
                id,
                private_data: event.private_data,
                listen_addr: self.addr,
            }));
        }
    }
}

/// Passive side, a pending connection: read the peer's private data, then accept or reject.
pub struct ConnectRequest {
    id: CmId,
    private_data: Vec<u8>,
    listen_addr: SocketAddr,
}

impl ConnectRequest {
    pub fn private_data(&self) -> &[u8] {
        &self.private_data
    }

    pub fn context(&self) -> Result<Context> {
        self.id.context()
    }

    pub fn accept(
        self,
        pd: &ProtectionDomain,
        config: &ConnectionConfig,
        private_data: &[u8],
    ) -> Result<Connection> {
        self.accept_into(pd, config, private_data, Ok, |c| c)
    }

    /// [`ConnectRequest::accept`], running `prepare` on the new connection first: its QP
    /// is in INIT, so receives posted there are in place before the peer can send (see
    /// [`ResolvedRoute::connect_endpoint`]). What `prepare` returns (the buffers those
    /// receives point into) must outlive the connection; the pair drops the connection
    /// first.
    pub fn accept_prepared<T>(
        self,
        pd: &ProtectionDomain,
        config: &ConnectionConfig,
        private_data: &[u8],
        prepare: impl FnOnce(&mut Connection) -> Result<T>,
    ) -> Result<(Connection, T)> {
        self.accept_into(
            pd,
            config,
            private_data,
            |mut conn| {
                let prepared = prepare(&mut conn)?;
                Ok((conn, prepared))
            },
            |(conn, _)| conn,
        )
    }

    /// [`ConnectRequest::accept`] for a message [`Endpoint`]: its receive ring is posted
    /// before the connection is accepted, so the peer's first SEND never meets an empty
    /// receive queue (see [`ResolvedRoute::connect_endpoint`]).
    pub fn accept_endpoint(
        self,
        pd: &ProtectionDomain,
        config: &ConnectionConfig,
        private_data: &[u8],
        msg: MsgConfig,
    ) -> Result<Endpoint> {
        self.accept_into(
            pd,
            config,
            private_data,
            |conn| Endpoint::new(conn, msg),
            Endpoint::connection_mut,
        )
    }

    /// Creates the QP, wraps the connection with `build` while the QP is in INIT (the
    /// wrapper may post receives), then accepts on the wrapped connection. On failure the
    /// wrapper drops, its connection (and with it any posted receive) first.
    fn accept_into<W>(
        self,
        pd: &ProtectionDomain,
        config: &ConnectionConfig,
        private_data: &[u8],
        build: impl FnOnce(Connection) -> Result<W>,
        conn: impl FnOnce(&mut W) -> &mut Connection,
    ) -> Result<W> {
        fits(
            "accept private data",
            private_data,
            MAX_ACCEPT_PRIVATE_DATA_BYTES,
        )?;
        let remote = self.private_data;
        let mut wrapped = build(Connection::create_qp(
            self.id,
            pd,
            config,
            self.listen_addr,
        )?)?;
        conn(&mut wrapped).finish_accept(config, private_data, remote)?;
        Ok(wrapped)
    }

    /// Refuses the connection, telling the peer why in the reject private data.
    pub fn reject(self, reason: &[u8]) -> Result<()> {
        let len = reason.len().min(148);
        // SAFETY: valid id; the reason buffer lives across the call.
        if unsafe { sys::rdma_reject(self.id.as_ptr(), reason.as_ptr().cast(), len as u8) } != 0 {
            return Err(Error::last_os("rdma_reject", self.listen_addr.to_string()));
        }
        Ok(())
    }
}

/// An established RC connection: the QP, its completion queue and the peer's private data.
/// Posting work requests lives in `qp.rs`.
pub struct Connection {
    // Field order is drop order: the id (and with it the QP) goes before the CQ and PD.
    id: CmId,
    pub(crate) cq: CompletionQueue,
    pub(crate) pd: ProtectionDomain,
    pub(crate) qp: NonNull<sys::ibv_qp>,
    pub(crate) max_inline_bytes: u32,
    remote_private_data: Vec<u8>,
    peer: SocketAddr,
}

// SAFETY: the QP, CQ and id are owned by this value alone; posting is thread-safe in
// rdma-core and polling needs `&mut self`.
unsafe impl Send for Connection {}

impl Connection {
    fn create_qp(
        id: CmId,
        pd: &ProtectionDomain,
        config: &ConnectionConfig,
        peer: SocketAddr,
    ) -> Result<Self> {
        let route_ctx = id.context()?;
        if route_ctx.as_ptr() != pd.context().as_ptr() {
            return Err(Error::DeviceMismatch {
                pd_device: pd.context().name().to_owned(),
                route_device: route_ctx.name().to_owned(),
            });
        }
        let cq = CompletionQueue::new(&route_ctx, config.max_send_wr + config.max_recv_wr)?;
        // SAFETY: ibv_qp_init_attr is plain old data.
        let mut attr: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = cq.as_ptr();
        attr.recv_cq = cq.as_ptr();
        attr.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 0;
        attr.cap.max_send_wr = config.max_send_wr;
        attr.cap.max_recv_wr = config.max_recv_wr;
        attr.cap.max_send_sge = 1;
        attr.cap.max_recv_sge = 1;
        attr.cap.max_inline_data = config.max_inline_bytes;
        // SAFETY: the id, PD and CQ are valid and on the same device.
        if unsafe { sys::rdma_create_qp(id.as_ptr(), pd.as_ptr(), &mut attr) } != 0 {
            return Err(Error::last_os(
                "rdma_create_qp",
                format!("on {}", route_ctx.name()),
            ));
        }
        // SAFETY: rdma_create_qp succeeded, so id->qp is set.
        let qp = NonNull::new(unsafe { (*id.as_ptr()).qp })
            .ok_or_else(|| Error::InvalidArgument("rdma_create_qp left no QP".into()))?;
        Ok(Self {
            id,
            cq,
            pd: pd.clone(),
            qp,
            max_inline_bytes: attr.cap.max_inline_data,
            remote_private_data: Vec::new(),
            peer,
        })
    }

    /// Active side, after [`Connection::create_qp`]: connects and waits until established.
    fn finish_connect(
        &mut self,
        config: &ConnectionConfig,
        private_data: &[u8],
        timeout_ms: u64,
    ) -> Result<()> {
        let mut param = conn_param(config, private_data);
        // SAFETY: the id has a QP; param points at live private data.
        if unsafe { sys::rdma_connect(self.id.as_ptr(), &mut param) } != 0 {
            return Err(Error::last_os("rdma_connect", self.peer.to_string()));
        }
        let event = self.id.channel.expect(
            sys::rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
            &self.peer,
            timeout_ms,
        )?;
        self.remote_private_data = event.private_data;
        Ok(())
    }

    /// Passive side, after [`Connection::create_qp`]: accepts and waits until established.
    /// `remote` is the private data of the connect request.
    fn finish_accept(
        &mut self,
        config: &ConnectionConfig,
        private_data: &[u8],
        remote: Vec<u8>,
    ) -> Result<()> {
        let mut param = conn_param(config, private_data);
        // SAFETY: the id has a QP; param points at live private data.
        if unsafe { sys::rdma_accept(self.id.as_ptr(), &mut param) } != 0 {
            return Err(Error::last_os("rdma_accept", self.peer.to_string()));
        }
        self.id.channel.expect(
            sys::rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
            &self.peer,
            config.timeout_ms,
        )?;
        self.remote_private_data = remote;
        Ok(())
    }

    /// The private data the peer sent with its connect request or accept.
    pub fn remote_private_data(&self) -> &[u8] {
        &self.remote_private_data
    }

    pub fn pd(&self) -> &ProtectionDomain {
        &self.pd
    }

    pub fn device_name(&self) -> &str {
        self.pd.context().name()
    }

    pub fn port_num(&self) -> u8 {
        self.id.port_num()
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn qp_num(&self) -> u32 {
        // SAFETY: the QP is valid while the connection lives.
        unsafe { (*self.qp.as_ptr()).qp_num }
    }

    /// Readable when the CQ (once armed) has a completion: see [`crate::wait`].
    pub fn cq_event_fd(&self) -> i32 {
        self.cq.event_fd()
    }

    /// Readable when an rdma_cm event (such as the peer's disconnect) is waiting.
    pub fn cm_event_fd(&self) -> i32 {
        self.id.channel.fd()
    }

    /// Checks, without blocking, whether the peer has disconnected.
    pub fn peer_disconnected(&self) -> Result<bool> {
        match self.id.channel.next(Duration::ZERO)? {
            Some(e) => Ok(matches!(
                e.kind,
                sys::rdma_cm_event_type::RDMA_CM_EVENT_DISCONNECTED
                    | sys::rdma_cm_event_type::RDMA_CM_EVENT_DEVICE_REMOVAL
            )),
            None => Ok(false),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: valid id; disconnecting an already disconnected id only returns an error.
        unsafe { sys::rdma_disconnect(self.id.as_ptr()) };
    }
}
