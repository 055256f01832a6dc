//! The client's side of the coherent block cache (`node/CACHE.md`), for [`crate::space`]:
//! the blocks ([`BlockCache`]) and the invalidation connections, one per primary, which
//! a thread of their own answers at once, whatever the application's threads are doing.
//!
//! - C1: before its first fill from a primary, the client opens an invalidation
//!   connection to it and announces its token (`CacheListen`); fills register under that
//!   token ([`Coherence::listen`]).
//! - C2a: the same thread renews, on the same connections, the leases of blocks in use
//!   before they end ([`Coherence::renew`]).
//! - C3: the thread ([`Coherence::serve`]) drops each block a primary invalidates and
//!   answers `Invalidated`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pmgas_layout::wire::{Body, ErrorCode, MAX_CACHE_BLOCKS, Message};
use pmgas_layout::{Epoch, NodeId, PageId};
use pmgas_verbs::msg::{Endpoint, Incoming};
use pmgas_verbs::wait::Notifier;
use pmgas_verbs::{ConnectionConfig, Connector, ProtectionDomain};

use crate::blockcache::{BlockCache, BlockKey, CacheConfig, CacheStats, FillTicket};
use crate::data::data_msg_config;
use crate::space::CLIENT_SENDER;

/// How long the invalidation thread sleeps at most between looks at its connections.
const IDLE: Duration = Duration::from_millis(50);

/// Renewals in flight: (primary, request id) -> (the ticket taken before sending, when
/// it was sent).
type Renewals = HashMap<(NodeId, u64), (FillTicket, u64)>;

/// One client's cache and invalidation connections (see the module head).
pub(crate) struct Coherence {
    /// What this client registers under at every primary (random per handle: a restarted
    /// client is a new sharer, and starts cold).
    pub(crate) token: u64,
    /// The blocks' configuration (fixed; read without the blocks' lock on every hit).
    config: CacheConfig,
    blocks: Mutex<BlockCache>,
    /// Invalidation connections by primary (with the protection domain each was made on).
    listeners: Mutex<HashMap<NodeId, (Endpoint, ProtectionDomain)>>,
    notifier: Notifier,
    stop: AtomicBool,
    clock: Instant,
    /// The last lease a primary granted (0: none yet), and where each cached page's
    /// primary was when it was filled: for renewals.
    lease_ns: AtomicU64,
    owners: Mutex<HashMap<PageId, NodeId>>,
    /// Fault injection for the rig's tests (`PMGAS_FAULT_CACHE_DEAF=1`): invalidations
    /// are neither applied nor answered, as if their connection hung, so that only the
    /// leases keep the cache coherent.
    deaf: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Coherence {
    /// A cold cache and its invalidation thread.
    pub(crate) fn start(config: CacheConfig) -> Result<Arc<Self>, String> {
        let token = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            h.finish()
        };
        let me = Arc::new(Self {
            token,
            config,
            blocks: Mutex::new(BlockCache::new(config)),
            listeners: Mutex::new(HashMap::new()),
            notifier: Notifier::new().map_err(|e| e.to_string())?,
            stop: AtomicBool::new(false),
            clock: Instant::now(),
            lease_ns: AtomicU64::new(0),
            owners: Mutex::new(HashMap::new()),
            deaf: std::env::var_os("PMGAS_FAULT_CACHE_DEAF").is_some_and(|v| v == "1"),
        });
        if me.deaf {
            tracing::warn!("PMGAS_FAULT_CACHE_DEAF: invalidations are ignored");
        }
        let serving = Arc::clone(&me);
        std::thread::Builder::new()
            .name("pmgas-cache".into())
            .spawn(move || serving.serve())
            .map_err(|e| e.to_string())?;
        Ok(me)
    }

    /// Ends the invalidation thread (the handle is gone).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.notifier.notify();
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    pub(crate) fn block_bytes(&self) -> usize {
        self.config.block_bytes
    }

    pub(crate) fn margin_ns(&self) -> u64 {
        self.config.margin_ns
    }

    pub(crate) fn stats(&self) -> CacheStats {
        lock(&self.blocks).stats()
    }

    /// C2: a hit copies the bytes into `out`.
    pub(crate) fn get(&self, key: BlockKey, offset: usize, out: &mut [u8], epoch: Epoch) -> bool {
        let now = self.now_ns();
        lock(&self.blocks).get(key, offset, out, epoch, now)
    }

    pub(crate) fn begin_fill(&self) -> FillTicket {
        lock(&self.blocks).begin_fill()
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn end_fill(
        &self,
        ticket: FillTicket,
        key: BlockKey,
        bytes: Option<&[u8]>,
        epoch: Epoch,
        requested_ns: u64,
        lease_ns: u64,
        primary: NodeId,
    ) -> bool {
        let installed =
            lock(&self.blocks).end_fill(ticket, key, bytes, epoch, requested_ns, lease_ns);
        if installed {
            self.lease_ns.store(lease_ns, Ordering::Relaxed);
            let mut owners = lock(&self.owners);
            if owners.len() >= 1 << 16 {
                owners.clear();
            }
            owners.insert(key.0, primary);
        }
        installed
    }

    /// This client is about to update `len` bytes at `offset` of `page`: its own copies
    /// of those blocks go first (C3).
    pub(crate) fn forget(&self, page: pmgas_layout::PageId, offset: u64, len: u64) {
        let bs = self.config.block_bytes as u64;
        let (first, last) = (offset / bs, (offset + len.max(1) - 1) / bs);
        let mut b = lock(&self.blocks);
        for block in first..=last {
            b.forget((page, block as u32));
        }
    }

    pub(crate) fn drop_page(&self, page: pmgas_layout::PageId) {
        lock(&self.blocks).drop_page(page);
    }

    /// C4: the epoch moved.
    pub(crate) fn drop_older_than(&self, epoch: Epoch) {
        lock(&self.blocks).drop_older_than(epoch);
    }

    /// C1: makes sure `node` (at `addr`) knows where to send this client's invalidations
    /// before the client registers as a sharer there.
    pub(crate) fn listen(
        &self,
        node: NodeId,
        bind: Option<IpAddr>,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<(), String> {
        if lock(&self.listeners).contains_key(&node) {
            return Ok(());
        }
        let route = Connector::new(bind, addr)
            .resolve()
            .map_err(|e| e.to_string())?;
        let pd = ProtectionDomain::new(route.context()).map_err(|e| e.to_string())?;
        let mut ep = route
            .connect_endpoint(&pd, &ConnectionConfig::default(), &[], data_msg_config())
            .map_err(|e| e.to_string())?;
        let hello = Message::new(
            Epoch(0),
            CLIENT_SENDER,
            0,
            Body::CacheListen { client: self.token },
        )
        .encode();
        let answer = ep.call(&hello, timeout).map_err(|e| e.to_string())?;
        match Message::decode(&answer).map(|m| m.body) {
            Ok(Body::CacheListen { client }) if client == self.token => {}
            other => return Err(format!("{node} answered CacheListen with {other:?}")),
        }
        lock(&self.listeners).insert(node, (ep, pd));
        self.notifier.notify();
        Ok(())
    }

    /// The primary `node` no longer knows this client's invalidation connection: the next
    /// fill opens another.
    pub(crate) fn drop_listener(&self, node: NodeId) {
        if lock(&self.listeners).remove(&node).is_some() {
            tracing::info!(%node, "invalidation connection dropped: the primary no longer knows it");
        }
    }

    /// C3, the invalidation thread: answers every primary's Invalidate as soon as it
    /// arrives, until the handle is dropped.
    fn serve(self: Arc<Self>) {
        let mut renewing = Renewals::new();
        let mut last_renewal = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            let mut fds = vec![self.notifier.fd()];
            let mut again = false;
            {
                let mut listeners = lock(&self.listeners);
                let lease_ns = self.lease_ns.load(Ordering::Relaxed);
                if lease_ns > 0 && last_renewal.elapsed() >= Duration::from_nanos(lease_ns / 4) {
                    last_renewal = Instant::now();
                    self.renew(&mut listeners, &mut renewing, lease_ns);
                }
                let mut gone = vec![];
                for (node, (ep, _)) in listeners.iter_mut() {
                    loop {
                        match ep.poll() {
                            Ok(Some(Incoming::Request {
                                request_id,
                                payload,
                            })) => {
                                if self.deaf {
                                    continue;
                                }
                                let answer = self.on_request(&payload);
                                if ep.respond(request_id, &answer).is_err() {
                                    gone.push(*node);
                                    break;
                                }
                            }
                            Ok(Some(Incoming::Response {
                                request_id,
                                payload,
                            })) => {
                                if let Some(r) = renewing.remove(&(*node, request_id)) {
                                    self.renewed(r, &payload);
                                }
                            }
                            Ok(Some(Incoming::TimedOut { request_id })) => {
                                if let Some(r) = renewing.remove(&(*node, request_id)) {
                                    self.renewed(r, &[]);
                                }
                            }
                            Ok(None) => {
                                if ep.connection().peer_disconnected().unwrap_or(true) {
                                    gone.push(*node);
                                }
                                break;
                            }
                            Err(_) => {
                                gone.push(*node);
                                break;
                            }
                        }
                    }
                }
                for node in gone {
                    // The primary can no longer reach this client: it waits for the leases
                    // of the blocks it would invalidate, which end here first.
                    tracing::info!(%node, "invalidation connection lost");
                    listeners.remove(&node);
                    let lost: Vec<(NodeId, u64)> =
                        renewing.keys().filter(|k| k.0 == node).copied().collect();
                    for k in lost {
                        if let Some(r) = renewing.remove(&k) {
                            self.renewed(r, &[]);
                        }
                    }
                }
                for (ep, _) in listeners.values_mut() {
                    match ep.arm() {
                        Ok(true) => {
                            fds.push(ep.connection().cq_event_fd());
                            fds.push(ep.connection().cm_event_fd());
                        }
                        _ => again = true,
                    }
                }
            }
            if !again {
                let _ = pmgas_verbs::wait::wait_readable(&fds, IDLE);
            }
            self.notifier.drain();
        }
    }

    /// C2a: sends each primary a renewal of the blocks in use whose leases end within
    /// half a lease (at most [`MAX_CACHE_BLOCKS`] per message).
    fn renew(
        &self,
        listeners: &mut HashMap<NodeId, (Endpoint, ProtectionDomain)>,
        renewing: &mut Renewals,
        lease_ns: u64,
    ) {
        let now = self.now_ns();
        let due = lock(&self.blocks).due_for_renewal(now, lease_ns / 2);
        let block_bytes = self.config.block_bytes;
        if due.is_empty() {
            return;
        }
        let mut by_node: HashMap<NodeId, Vec<BlockKey>> = HashMap::new();
        {
            let owners = lock(&self.owners);
            for key in due {
                if let Some(&node) = owners.get(&key.0) {
                    by_node.entry(node).or_default().push(key);
                }
            }
        }
        for (node, keys) in by_node {
            let Some((ep, _)) = listeners.get_mut(&node) else {
                continue;
            };
            for chunk in keys.chunks(MAX_CACHE_BLOCKS) {
                let ticket = self.begin_fill();
                let sent_ns = self.now_ns();
                let body = Body::CacheRenew {
                    client: self.token,
                    block_bytes: block_bytes as u32,
                    blocks: chunk.to_vec(),
                };
                let msg = Message::new(Epoch(0), CLIENT_SENDER, 0, body).encode();
                let timeout = Duration::from_nanos(lease_ns);
                match ep.request(&msg, timeout) {
                    Ok(id) => {
                        renewing.insert((node, id), (ticket, sent_ns));
                    }
                    Err(_) => self.renewed((ticket, sent_ns), &[]),
                }
            }
        }
    }

    /// C2a: a primary's answer to a renewal (empty: none, the ticket just ends).
    fn renewed(&self, (ticket, sent_ns): (FillTicket, u64), payload: &[u8]) {
        let (keys, lease_ns) = match Message::decode(payload).map(|m| m.body) {
            Ok(Body::Renewed { lease_ms, blocks }) => (blocks, u64::from(lease_ms) * 1_000_000),
            _ => (vec![], 0),
        };
        lock(&self.blocks).end_renewal(ticket, &keys, sent_ns, lease_ns);
    }

    fn on_request(&self, payload: &[u8]) -> Vec<u8> {
        let body = match Message::decode(payload).map(|m| m.body) {
            Ok(Body::Invalidate { page_id, block }) => {
                lock(&self.blocks).invalidate((page_id, block));
                Body::Invalidated { page_id, block }
            }
            Ok(other) => Body::Error {
                code: ErrorCode::Malformed,
                detail: format!("{} is not a request to a cache", other.name()),
            },
            Err(e) => Body::Error {
                code: ErrorCode::Malformed,
                detail: e.to_string(),
            },
        };
        Message::new(Epoch(0), CLIENT_SENDER, 0, body).encode()
    }
}
