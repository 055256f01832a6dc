//! The data node's data path: a thread that accepts data-path connections (clients, and
//! primaries of pages this node backs) and orders every update of the pages it is primary
//! of. `node/DATAPATH.md` gives the design and its costs; the steps, in this file:
//!
//! - D1 [`DataServer::hello`]: a new connection learns where the pages are (address and
//!   rkey of the pages' region, read-only rkey of the ART) for one-sided READs.
//! - D2 [`DataServer::update`]: a client's Update reaches the page's primary; it checks the
//!   address, that it is the primary in its epoch, and that its ART holds the page under
//!   that page id; the update joins the page's queue (one update per page in flight).
//! - D2a (in [`DataServer::update`]): the first update of a page in this process and
//!   epoch is preceded by a copy of the whole page to its backups, so that an update in
//!   flight when the previous primary died reaches every replica or none.
//! - D3 [`DataServer::start_next`]: the primary computes the update's bytes against its
//!   own copy (the latest acknowledged value: nothing else writes the page), answers a
//!   CAS that does not match at once (it changes nothing), and sends the absolute bytes to
//!   every backup in one Replicate each, in parallel.
//! - D4 [`DataServer::replicate`] (on each backup): the bytes are stored through the one
//!   persistence function, then acknowledged.
//! - D5 [`DataServer::finish`]: once every live backup acknowledged, the primary stores
//!   the bytes in its own copy (persisted), and only then answers the client. One-sided
//!   READs go to the primary, so a value becomes readable only once it is durable on every
//!   replica.
//! - D6 [`DataServer::tick`]: an update waiting on a backup that failed is sent again once
//!   the backup is reachable, or completed without it once the monitor has declared it
//!   dead (it then no longer appears in the page's mapping in the new epoch).
//!
//! The coherent block cache's primary side (`node/CACHE.md`) is here too:
//! - C1 [`DataServer::cache_fill`]: a client registers as a sharer of a block (its READs
//!   of the block and of the page's version word travel with the registration);
//!   [`DataServer::cache_listen`] takes the connection its invalidations go to.
//! - C2a [`DataServer::cache_renew`]: a client extends the leases of blocks it uses.
//! - C3 [`DataServer::invalidate_sharers`]: before D5 stores an update, every sharer of
//!   the blocks it touches is told to drop them, in parallel; D5 waits for each answer or
//!   the sharer's lease, and stores with the page's version word odd.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pmgas_layout::wire::{
    Body, ErrorCode, MAX_MESSAGE_BYTES, MAX_UPDATE_BYTES, Message, NodeInfo, Replica, UpdateOp,
};
use pmgas_layout::{Epoch, NodeId, PageId, PageIndex};
use pmgas_verbs::fault;
use pmgas_verbs::msg::{Endpoint, Incoming, MsgConfig};
use pmgas_verbs::{
    Access, AlignedBuf, ConnectionConfig, Connector, Listener, MemoryRegion, ProtectionDomain,
};

use crate::client::ClientError;
use crate::directory::{Directory, Round, Sharer};
use crate::pool::{Pool, PoolError};
use crate::service::{Command, PoolRegions, Registered, Shared, register_pool};

/// Message slots of a data-path connection: big enough for an Update of
/// [`MAX_UPDATE_BYTES`].
pub fn data_msg_config() -> MsgConfig {
    MsgConfig {
        ring_slots: 64,
        max_payload_bytes: MAX_MESSAGE_BYTES.next_multiple_of(64),
    }
}

/// The connection key of updates nobody waits for (D2a's copies).
const NO_CLIENT: u64 = 0;
/// How long a Replicate may go unanswered before it is sent again.
const REPLICATE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often waiting updates are looked at again (D6).
const TICK: Duration = Duration::from_millis(50);
/// How often the directory forgets ended leases.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Least time between two connection attempts to one backup.
const RECONNECT_EVERY: Duration = Duration::from_millis(200);

/// The lease a primary grants a cached block unless configured otherwise.
pub const DEFAULT_CACHE_LEASE: Duration = Duration::from_millis(500);

/// Per page id, until when blocks of it may be cached by some client (the latest lease
/// granted), and the pages being freed here, for which no lease is granted (C5). Shared by
/// the data path, which grants leases, and the node's service, which frees replicas.
#[derive(Debug, Default)]
pub(crate) struct PageLeases {
    ends: HashMap<PageId, Instant>,
    freeing: HashSet<PageId>,
}

impl PageLeases {
    /// Whether a lease of `lease` from `now` may be granted on a block of `page_id` (not
    /// while it is being freed); records it.
    fn grant(&mut self, page_id: PageId, now: Instant, lease: Duration) -> bool {
        if self.freeing.contains(&page_id) {
            return false;
        }
        if self.ends.len() >= 4096 {
            self.ends.retain(|_, end| *end > now);
        }
        let end = self.ends.entry(page_id).or_insert(now);
        *end = (*end).max(now + lease);
        true
    }

    /// `page_id` is about to be freed here: no lease is granted on it any more. Returns
    /// how long the last lease granted still runs (the free waits that long).
    pub(crate) fn freeing(&mut self, page_id: PageId) -> Duration {
        self.freeing.insert(page_id);
        self.ends.remove(&page_id).map_or(Duration::ZERO, |end| {
            end.saturating_duration_since(Instant::now())
        })
    }

    /// The free is done: the page's ART entry no longer holds the id, so a fill of it is
    /// refused by the client's own check (`judge_fill`), and the entry can go.
    pub(crate) fn freed(&mut self, page_id: PageId) {
        self.freeing.remove(&page_id);
    }
}

/// A client's request, queued until its page is free to order it.
struct Queued {
    conn: u64,
    request_id: u64,
    wire_id: u64,
    page: PageIndex,
    offset: u32,
    op: UpdateOp,
    backups: Vec<Replica>,
    /// D2a: copy this many bytes of the primary's own copy at `offset` (read when the copy
    /// starts, so it includes every update ordered before it); `op` is ignored.
    copy_len: Option<usize>,
    /// R4: the last chunk of re-replication `txn`'s copy (its target has the whole page
    /// once this is acknowledged).
    ends_copy: Option<u64>,
}

/// The copy of a whole page to `backups` through its queue, in [`MAX_UPDATE_BYTES`]
/// chunks (D2a; R3, whose last chunk ends the join's copy: `ends_copy`).
fn copy_chunks(
    page: PageIndex,
    page_size: u64,
    backups: &[Replica],
    ends_copy: Option<u64>,
) -> Vec<Queued> {
    let chunks = page_size.div_ceil(MAX_UPDATE_BYTES as u64);
    (0..chunks)
        .map(|chunk| {
            let offset = chunk * MAX_UPDATE_BYTES as u64;
            Queued {
                conn: NO_CLIENT,
                request_id: 0,
                wire_id: 0,
                page,
                offset: offset as u32,
                op: UpdateOp::Write(vec![]),
                backups: backups.to_vec(),
                copy_len: Some((page_size - offset).min(MAX_UPDATE_BYTES as u64) as usize),
                ends_copy: ends_copy.filter(|_| chunk + 1 == chunks),
            }
        })
        .collect()
}

/// A re-replication's target joining a page this node is the primary of
/// (`monitor/REREPLICATION.md` R3, R4): every update of the page queued from the join on
/// goes to the target too, after a copy of the whole page through the page's queue.
#[derive(Debug, Clone, Copy)]
struct Join {
    txn_id: u64,
    target: Replica,
    /// The copy is acknowledged and the monitor told: from now on only the monitor ends
    /// the join (a mapping notice, or a new monitor), never a refusal by the target, whose
    /// page the GAT may list already.
    added: bool,
    /// When it started: a target that cannot be reached fails the join only after
    /// [`JOIN_PATIENCE`] (its address may just have changed).
    since: Instant,
}

/// How long a join's target may stay unreachable before the join fails.
const JOIN_PATIENCE: Duration = Duration::from_secs(5);

/// The update of a page in flight (D3-D5).
struct InFlight {
    q: Queued,
    bytes: Vec<u8>,
    old: u64,
    /// Backups that have not acknowledged yet, with the request id of the Replicate in
    /// flight to each (None: to be sent again).
    waiting: BTreeMap<NodeId, Option<u64>>,
    /// C3: the invalidation round, once every backup acknowledged.
    round: Option<Round>,
}

#[derive(Default)]
struct PageOrder {
    queue: VecDeque<Queued>,
    in_flight: Option<InFlight>,
}

/// An outgoing connection to another data node (this node as a primary).
struct PeerLink {
    ep: Endpoint,
    /// Replicate request id -> page id.
    sent: HashMap<u64, PageId>,
}

type AllocAnswer = (u64, u64, Body);
type LinkMade = (NodeId, Result<Endpoint, String>);
type LinksMade = (mpsc::Sender<LinkMade>, mpsc::Receiver<LinkMade>);

pub(crate) struct DataServer {
    me: NodeId,
    bind: IpAddr,
    pool: Arc<Pool>,
    /// The node's service (mapping lookups, epoch, allocations); set by [`Self::run`].
    shared: Option<Arc<Shared>>,
    listener: Listener,
    pd: ProtectionDomain,
    regions: Arc<PoolRegions>,
    conns: HashMap<u64, Endpoint>,
    next_conn: u64,
    links: HashMap<NodeId, PeerLink>,
    /// Links being connected on helper threads ([`Self::link`]), and their outcomes.
    connecting: HashSet<NodeId>,
    links_made: LinksMade,
    last_attempt: HashMap<NodeId, Instant>,
    addrs: HashMap<NodeId, SocketAddr>,
    pages: HashMap<PageId, PageOrder>,
    /// Pages whose backups this process has made equal to its own copy, and in which
    /// epoch (D2a).
    synced: HashMap<PageId, Epoch>,
    /// Answers of allocations run on helper threads: (connection, request id, answer).
    allocs: (mpsc::Sender<AllocAnswer>, mpsc::Receiver<AllocAnswer>),
    notifier: Arc<pmgas_verbs::wait::Notifier>,
    last_tick: Instant,
    /// Page `i`'s version word at byte `8 * i`, read-only to peers (C1): even while the
    /// page is quiet, odd while D5 stores into it.
    versions: MemoryRegion,
    directory: Directory,
    /// Clients' invalidation connections, by the token they announced (CacheListen).
    listeners: HashMap<Sharer, u64>,
    /// Invalidates in flight: (connection, request id) -> (page id, sharer).
    invalidating: HashMap<(u64, u64), (PageId, Sharer)>,
    /// The origin of the directory's clock.
    clock: Instant,
    /// C4: no update is stored before this: every lease an earlier process of this node
    /// granted has ended by then.
    serving_from: Instant,
    last_prune: Instant,
    /// Re-replication joins by page (R3), and the monitor connection they belong to
    /// (`Rereplica::generation`).
    joins: HashMap<PageId, Join>,
    generation: u64,
}

fn error(code: ErrorCode, detail: String) -> Body {
    Body::Error { code, detail }
}

impl DataServer {
    /// Binds the data-path listener (before the node joins, so the Join can name its
    /// port) and registers the pool for one-sided access on its device.
    pub(crate) fn bind(
        me: NodeId,
        addr: SocketAddr,
        pool: Arc<Pool>,
        lease: Duration,
    ) -> Result<Self, String> {
        let listener = Listener::bind(addr, 64).map_err(|e| format!("data listener: {e}"))?;
        let pd = ProtectionDomain::new(listener.context()).map_err(|e| e.to_string())?;
        let regions = Arc::new(register_pool(&pd, &pool)?);
        let words = pool.header().page_count as usize * 8;
        let versions = AlignedBuf::zeroed(words)
            .and_then(|b| pd.register(b, Access::REMOTE_READ))
            .map_err(|e| format!("registering the version words: {e}"))?;
        Ok(Self {
            me,
            bind: addr.ip(),
            pool,
            shared: None,
            listener,
            pd,
            regions,
            conns: HashMap::new(),
            next_conn: 1,
            links: HashMap::new(),
            connecting: HashSet::new(),
            links_made: mpsc::channel(),
            last_attempt: HashMap::new(),
            addrs: HashMap::new(),
            pages: HashMap::new(),
            synced: HashMap::new(),
            allocs: mpsc::channel(),
            notifier: Arc::new(pmgas_verbs::wait::Notifier::new().map_err(|e| e.to_string())?),
            last_tick: Instant::now(),
            versions,
            directory: Directory::new(lease.as_nanos() as u64),
            listeners: HashMap::new(),
            invalidating: HashMap::new(),
            clock: Instant::now(),
            serving_from: Instant::now() + lease,
            last_prune: Instant::now(),
            joins: HashMap::new(),
            generation: 0,
        })
    }

    /// The protection domain and pool registration, for the node's service to share.
    pub(crate) fn registered(&self) -> Registered {
        (self.pd.clone(), Arc::clone(&self.regions))
    }

    pub(crate) fn port(&self) -> u16 {
        self.listener.local_addr().port()
    }

    /// Serves until the node's service stops.
    pub(crate) fn run(mut self, shared: Arc<Shared>) {
        shared.rereplica.set_data_wake(Arc::clone(&self.notifier));
        self.generation = shared.rereplica.generation();
        self.shared = Some(shared);
        let mut spin = pmgas_verbs::spin::SpinThenSleep::default();
        tracing::info!(node = %self.me, port = self.port(), persist_mode = "cpu", "data path serving");
        while !self
            .shared()
            .stopped
            .load(std::sync::atomic::Ordering::Acquire)
        {
            let mut busy = self.accept();
            busy |= self.poll_conns();
            busy |= self.poll_links();
            while let Ok((conn, request_id, body)) = self.allocs.1.try_recv() {
                busy = true;
                self.respond(conn, request_id, 0, body);
            }
            busy |= self.poll_rereplica();
            busy |= self.collect_links();
            if self.last_tick.elapsed() >= TICK {
                self.last_tick = Instant::now();
                self.tick();
            }
            if busy {
                spin.busy();
            } else if spin.should_sleep() {
                spin.busy();
                self.sleep();
            }
        }
    }

    fn accept(&mut self) -> bool {
        match self.listener.next_request(Duration::ZERO) {
            Ok(Some(req)) => {
                match req.accept_endpoint(
                    &self.pd,
                    &ConnectionConfig::default(),
                    &[],
                    data_msg_config(),
                ) {
                    Ok(ep) => {
                        self.conns.insert(self.next_conn, ep);
                        self.next_conn += 1;
                    }
                    Err(e) => tracing::warn!(error = %e, "data-path accept failed"),
                }
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "data-path listener");
                false
            }
        }
    }

    fn sleep(&mut self) {
        let mut fds = vec![self.listener.event_fd(), self.notifier.fd()];
        for ep in self
            .conns
            .values_mut()
            .chain(self.links.values_mut().map(|l| &mut l.ep))
        {
            match ep.arm() {
                Ok(true) => {
                    fds.push(ep.connection().cq_event_fd());
                    fds.push(ep.connection().cm_event_fd());
                }
                // Something is waiting already, or the connection failed: poll again.
                _ => return,
            }
        }
        let _ = pmgas_verbs::wait::wait_readable(&fds, TICK);
        self.notifier.drain();
    }

    /// Requests from clients and primaries on accepted connections.
    fn poll_conns(&mut self) -> bool {
        let mut busy = false;
        let keys: Vec<u64> = self.conns.keys().copied().collect();
        for key in keys {
            while let Some(ep) = self.conns.get_mut(&key) {
                let incoming = match ep.poll() {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        if ep.connection().peer_disconnected().unwrap_or(true) {
                            self.conn_closed(key);
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "data-path connection closed");
                        self.conn_closed(key);
                        break;
                    }
                };
                busy = true;
                match incoming {
                    Incoming::Request {
                        request_id,
                        payload,
                    } => self.request(key, request_id, &payload),
                    Incoming::Response {
                        request_id,
                        payload,
                    } => self.invalidated(key, request_id, &payload),
                    Incoming::TimedOut { request_id } => {
                        // The round ends with the sharer's lease.
                        self.invalidating.remove(&(key, request_id));
                    }
                }
            }
        }
        busy
    }

    fn respond(&mut self, conn: u64, request_id: u64, wire_id: u64, body: Body) {
        let epoch = self.epoch();
        if let Some(ep) = self.conns.get_mut(&conn) {
            let _ = ep.respond(
                request_id,
                &Message::new(epoch, self.me, wire_id, body).encode(),
            );
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        self.shared
            .as_ref()
            .expect("run() sets the service before serving")
    }

    fn epoch(&self) -> Epoch {
        Epoch(
            self.shared()
                .epoch
                .load(std::sync::atomic::Ordering::Acquire),
        )
    }

    /// One request on an accepted connection. Nothing a peer sends can stop the thread: a
    /// malformed message gets an error answer.
    fn request(&mut self, conn: u64, request_id: u64, payload: &[u8]) {
        let m = match Message::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                return self.respond(
                    conn,
                    request_id,
                    0,
                    error(ErrorCode::Malformed, e.to_string()),
                );
            }
        };
        let wire_id = m.header.request_id;
        let answer = match m.body {
            Body::DataHello => Some(self.hello()),
            Body::Update {
                page_id,
                offset,
                op,
            } => self.update(conn, request_id, wire_id, page_id, offset, op),
            Body::Replicate {
                page_id,
                page,
                offset,
                data,
            } => Some(self.replicate(m.header.epoch, page_id, page, offset, &data)),
            Body::DataAlloc { backups_wanted } => {
                self.alloc(conn, request_id, wire_id, backups_wanted);
                None
            }
            Body::CacheFill {
                page_id,
                block,
                block_bytes,
                client,
            } => Some(self.cache_fill(page_id, block, block_bytes, client)),
            Body::CacheListen { client } => Some(self.cache_listen(conn, client)),
            Body::CacheRenew {
                client,
                block_bytes,
                blocks,
            } => Some(self.cache_renew(client, block_bytes, &blocks)),
            other => Some(error(
                ErrorCode::Malformed,
                format!("{} is not a data-path request", other.name()),
            )),
        };
        if let Some(body) = answer {
            self.respond(conn, request_id, wire_id, body);
        }
    }

    /// D1.
    fn hello(&self) -> Body {
        let h = self.pool.header();
        Body::DataHelloAck {
            page_size_bytes: h.page_size_bytes,
            data_addr: self.regions.data.addr(),
            art_addr: self.regions.art.addr(),
            rkey: self.regions.data.rkey(),
            art_rkey: self.regions.art.rkey(),
            page_count: h.page_count,
            version_rkey: self.versions.rkey(),
            version_addr: self.versions.addr(),
        }
    }

    fn now_ns(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    fn version(&self, page: PageIndex) -> u64 {
        let mut w = [0u8; 8];
        let _ = self.versions.read_at(page.0 as usize * 8, &mut w);
        u64::from_le_bytes(w)
    }

    fn set_version(&self, page: PageIndex, v: u64) {
        let _ = self
            .versions
            .write_at(page.0 as usize * 8, &v.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// The connection `conn` is gone: a client's invalidations can no longer reach it (its
    /// blocks in a round are waited for until their leases end).
    fn conn_closed(&mut self, conn: u64) {
        self.conns.remove(&conn);
        self.listeners.retain(|client, c| {
            if *c == conn {
                tracing::info!(client = %format!("{client:#x}"), "a client's invalidation connection closed");
            }
            *c != conn
        });
        self.invalidating.retain(|(c, _), _| *c != conn);
    }

    /// C1, the client's invalidation connection: Invalidates for `client` go on `conn`.
    fn cache_listen(&mut self, conn: u64, client: Sharer) -> Body {
        self.listeners.insert(client, conn);
        Body::CacheListen { client }
    }

    /// C1: registers `client` as a sharer of the block and answers the lease and the
    /// page's version word now. Not cacheable (lease 0) while an invalidation round of an
    /// update of the block is open or the page is being freed; refused NotListening while
    /// the client's invalidation connection is not known.
    fn cache_fill(
        &mut self,
        page_id: PageId,
        block: u32,
        block_bytes: u32,
        client: Sharer,
    ) -> Body {
        let page_size = self.pool.header().page_size_bytes;
        if (u64::from(block) + 1) * u64::from(block_bytes) > page_size {
            return error(
                ErrorCode::BadAddress,
                format!("block {block} of {block_bytes} bytes in a {page_size}-byte page"),
            );
        }
        let page = match self.primary_page(page_id) {
            Ok((page, _)) => page,
            Err(b) => return b,
        };
        if !self.listeners.contains_key(&client) {
            return error(
                ErrorCode::NotListening,
                format!(
                    "no invalidation connection of client {client:#x} on {}",
                    self.me
                ),
            );
        }
        let version = self.version(page);
        let lease = Duration::from_nanos(self.directory.lease_ns());
        let granted = self.may_lease(page_id, block, block_bytes);
        let lease_ms = if granted {
            let now = self.now_ns();
            self.directory
                .register(page_id, block_bytes, block, client, now);
            lease.as_millis() as u32
        } else {
            0
        };
        Body::Leased { lease_ms, version }
    }

    /// Whether a lease on block `block` (of `block_bytes`) of `page_id` may be granted or
    /// extended now (and, if so, it is recorded for a free to wait for): not while an
    /// invalidation round of an update that overlaps the block is open (it was built
    /// without this sharer: the block must not be cached until the update is stored), nor
    /// while the page is being freed.
    fn may_lease(&mut self, page_id: PageId, block: u32, block_bytes: u32) -> bool {
        let (start, end) = (
            u64::from(block) * u64::from(block_bytes),
            (u64::from(block) + 1) * u64::from(block_bytes),
        );
        let round_open = self
            .pages
            .get(&page_id)
            .and_then(|o| o.in_flight.as_ref())
            .is_some_and(|f| {
                let at = u64::from(f.q.offset);
                f.round.is_some() && at < end && start < at + f.bytes.len() as u64
            });
        let lease = Duration::from_nanos(self.directory.lease_ns());
        !round_open
            && self
                .shared()
                .leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .grant(page_id, Instant::now(), lease)
    }

    /// C2a: extends the leases of the blocks `client` still holds under a registration no
    /// update has taken (see `Directory::renew`), on pages this node is still the primary
    /// of and holds.
    fn cache_renew(&mut self, client: Sharer, block_bytes: u32, blocks: &[(PageId, u32)]) -> Body {
        let mut renewed = vec![];
        for &(page_id, block) in blocks {
            let held = self.primary_page(page_id).is_ok();
            if held && self.may_lease(page_id, block, block_bytes) {
                let now = self.now_ns();
                if self
                    .directory
                    .renew(page_id, block_bytes, block, client, now)
                {
                    renewed.push((page_id, block));
                }
            }
        }
        Body::Renewed {
            lease_ms: (self.directory.lease_ns() / 1_000_000) as u32,
            blocks: renewed,
        }
    }

    /// C3: the round of the in-flight update of `page_id`, which has every backup's
    /// acknowledgement: every sharer of a block it touches is sent Invalidate, all at
    /// once (a sharer without an invalidation connection is waited for until its lease
    /// ends).
    fn invalidate_sharers(&mut self, page_id: PageId) {
        let now = self.now_ns();
        let Some(f) = self.pages.get(&page_id).and_then(|o| o.in_flight.as_ref()) else {
            return;
        };
        let mut round = if f.q.copy_len.is_some() {
            // D2a's copy changes no byte of the primary's.
            Round::default()
        } else {
            self.directory
                .invalidate(page_id, u64::from(f.q.offset), f.bytes.len() as u64, now)
        };
        let epoch = self.epoch();
        for (sharer, page, block) in round.messages() {
            let sent = self.listeners.get(&sharer).copied().and_then(|conn| {
                let ep = self.conns.get_mut(&conn)?;
                let msg = Message::new(
                    epoch,
                    self.me,
                    0,
                    Body::Invalidate {
                        page_id: page,
                        block,
                    },
                )
                .encode();
                let timeout = Duration::from_nanos(self.directory.lease_ns());
                ep.request(&msg, timeout).ok().map(|id| (conn, id))
            });
            match sent {
                Some(key) => {
                    self.invalidating.insert(key, (page_id, sharer));
                }
                None => round.unreachable(sharer),
            }
        }
        if let Some(f) = self
            .pages
            .get_mut(&page_id)
            .and_then(|o| o.in_flight.as_mut())
        {
            f.round = Some(round);
        }
    }

    /// C3: a sharer's answer to an Invalidate.
    fn invalidated(&mut self, conn: u64, request_id: u64, payload: &[u8]) {
        let Some((page_id, sharer)) = self.invalidating.remove(&(conn, request_id)) else {
            return;
        };
        if !matches!(
            Message::decode(payload).map(|m| m.body),
            Ok(Body::Invalidated { .. })
        ) {
            // Not an answer: the sharer is waited for until its lease ends.
            return;
        }
        if let Some(round) = self
            .pages
            .get_mut(&page_id)
            .and_then(|o| o.in_flight.as_mut())
            .and_then(|f| f.round.as_mut())
        {
            round.acked(sharer);
        }
        if self.finish_if_done(page_id) {
            self.start_next(page_id);
        }
    }

    /// A page allocated with this node as primary, for a client without PM: the node's
    /// service runs the two-phase allocation on another thread (it takes a monitor round
    /// trip and ZooKeeper writes), and the answer comes back through `allocs`.
    fn alloc(&mut self, conn: u64, request_id: u64, wire_id: u64, backups: u8) {
        let shared = Arc::clone(self.shared());
        let tx = self.allocs.0.clone();
        let notifier = Arc::clone(&self.notifier);
        let spawned = std::thread::Builder::new()
            .name("pmgas-data-alloc".into())
            .spawn(move || {
                let result = shared.call(|reply| Command::AllocPage {
                    backups,
                    prepared: None,
                    reply,
                });
                let body = match result {
                    Ok(g) => Body::Mapping {
                        page_id: g.page_id,
                        replicas: g.replicas,
                    },
                    Err(ClientError::Refused { code, detail }) => error(code, detail),
                    Err(ClientError::NoLocalSpace) => {
                        error(ErrorCode::NoSpace, "no free page on this node".into())
                    }
                    Err(e) => error(ErrorCode::Internal, e.to_string()),
                };
                let _ = tx.send((conn, request_id, body));
                notifier.notify();
            });
        if let Err(e) = spawned {
            self.respond(
                conn,
                request_id,
                wire_id,
                error(ErrorCode::Internal, e.to_string()),
            );
        }
    }

    /// Where `page_id` lives in this node's current epoch (cache, or the monitor).
    fn mapping(&self, page_id: PageId) -> Result<Vec<Replica>, Body> {
        self.shared()
            .lookup(page_id)
            .map(|m| m.replicas)
            .map_err(|e| match e {
                ClientError::Refused { code, detail } => error(code, detail),
                other => error(ErrorCode::Internal, other.to_string()),
            })
    }

    /// This node's page holding `page_id`, checked against its own ART. A page that does
    /// not hold it was freed here (mapped pages never move, and ids are never reused).
    fn local_page(&self, page_id: PageId, page: PageIndex) -> Result<PageIndex, Body> {
        match self.pool.record(page) {
            Ok(r) if r.holds(page_id) => Ok(page),
            Ok(r) => Err(error(
                ErrorCode::PageFreed,
                format!(
                    "page {} of {} is {:?} under id {}, not page id {}",
                    page.0, self.me, r.state, r.page_id.0, page_id.0
                ),
            )),
            Err(e) => Err(error(ErrorCode::UnknownPage, e.to_string())),
        }
    }

    /// This node's page holding `page_id` and the page's replicas (primary first), if this
    /// node is its primary in its epoch and its ART holds the page under that id.
    fn primary_page(&self, page_id: PageId) -> Result<(PageIndex, Vec<Replica>), Body> {
        let replicas = self.mapping(page_id)?;
        let Some(primary) = replicas.first().filter(|r| r.node == self.me) else {
            return Err(error(
                ErrorCode::NotPrimary,
                format!(
                    "{} is not the primary of page {} in epoch {}",
                    self.me,
                    page_id.0,
                    self.epoch().0
                ),
            ));
        };
        let page = self.local_page(page_id, primary.page)?;
        Ok((page, replicas))
    }

    fn check_range(&self, offset: u32, op: &UpdateOp) -> Result<(), Body> {
        let page_size = self.pool.header().page_size_bytes;
        let len = match op {
            UpdateOp::Write(d) => d.len() as u64,
            _ => 8,
        };
        if !matches!(op, UpdateOp::Write(_)) && !offset.is_multiple_of(8) {
            return Err(error(
                ErrorCode::BadAddress,
                format!("an 8-byte operation at offset {offset}: not 8-byte aligned"),
            ));
        }
        if u64::from(offset) + len > page_size {
            return Err(error(
                ErrorCode::BadAddress,
                format!("{len} bytes at offset {offset} cross the end of a {page_size}-byte page"),
            ));
        }
        Ok(())
    }

    /// D2.
    fn update(
        &mut self,
        conn: u64,
        request_id: u64,
        wire_id: u64,
        page_id: PageId,
        offset: u32,
        op: UpdateOp,
    ) -> Option<Body> {
        if let Err(b) = self.check_range(offset, &op) {
            return Some(b);
        }
        let (page, replicas) = match self.primary_page(page_id) {
            Ok(p) => p,
            Err(b) => return Some(b),
        };
        let q = Queued {
            conn,
            request_id,
            wire_id,
            page,
            offset,
            op,
            backups: self.backups_of(page_id, &replicas),
            copy_len: None,
            ends_copy: None,
        };
        let epoch = self.epoch();
        let resync = self.synced.insert(page_id, epoch) != Some(epoch);
        let page_size = self.pool.header().page_size_bytes;
        let order = self.pages.entry(page_id).or_default();
        if resync && !q.backups.is_empty() {
            // D2a: the first update of a page in this process and epoch is preceded by a
            // copy of the whole page to its backups, through the same queue. An update in
            // flight when the previous primary died (or this process restarted) may have
            // reached some backups and not others; this primary's copy is the truth
            // (nothing was readable before every replica had it), so the replicas agree
            // again before anything new is ordered.
            order
                .queue
                .extend(copy_chunks(page, page_size, &q.backups, None));
            tracing::debug!(
                page_id = page_id.0,
                epoch = epoch.0,
                "page copied to its backups before its first update"
            );
        }
        order.queue.push_back(q);
        if order.in_flight.is_none() {
            self.start_next(page_id);
        }
        None
    }

    /// D3: takes the page's next queued update and sends it to the backups (or finishes it
    /// at once: a CAS that fails, a page without backups).
    fn start_next(&mut self, page_id: PageId) {
        loop {
            let Some(order) = self.pages.get_mut(&page_id) else {
                return;
            };
            if order.in_flight.is_some() {
                return;
            }
            let Some(q) = order.queue.pop_front() else {
                self.pages.remove(&page_id);
                return;
            };
            // Freed while it waited: refused, in order.
            if let Err(b) = self.local_page(page_id, q.page) {
                self.respond(q.conn, q.request_id, q.wire_id, b);
                continue;
            }
            let mut word = [0u8; 8];
            let mut copy = vec![0u8; q.copy_len.unwrap_or(0)];
            let current = match &q.op {
                _ if q.copy_len.is_some() => self
                    .pool
                    .read_in_page(q.page, u64::from(q.offset), &mut copy)
                    .map(|()| 0),
                UpdateOp::Write(_) => Ok(0),
                _ => self
                    .pool
                    .read_in_page(q.page, u64::from(q.offset), &mut word)
                    .map(|()| u64::from_le_bytes(word)),
            };
            let old = match current {
                Ok(v) => v,
                Err(e) => {
                    let (c, r, w) = (q.conn, q.request_id, q.wire_id);
                    self.respond(c, r, w, error(ErrorCode::Internal, e.to_string()));
                    continue;
                }
            };
            let bytes = match &q.op {
                _ if q.copy_len.is_some() => copy,
                UpdateOp::Write(d) => d.clone(),
                UpdateOp::CompareAndSwap { expected, new } => {
                    if old != *expected {
                        // Changes nothing: answered now, in order with the page's updates.
                        let (c, r, w) = (q.conn, q.request_id, q.wire_id);
                        self.respond(c, r, w, Body::UpdateAck { old });
                        continue;
                    }
                    new.to_le_bytes().to_vec()
                }
                UpdateOp::FetchAdd { delta } => old.wrapping_add(*delta).to_le_bytes().to_vec(),
            };
            let waiting = q.backups.iter().map(|r| (r.node, None)).collect();
            let order = self.pages.entry(page_id).or_default();
            order.in_flight = Some(InFlight {
                q,
                bytes,
                old,
                waiting,
                round: None,
            });
            self.send_replicates(page_id);
            if self.finish_if_done(page_id) {
                continue;
            }
            return;
        }
    }

    /// Sends the in-flight update of `page_id` to every backup that has none in flight.
    fn send_replicates(&mut self, page_id: PageId) {
        let Some(f) = self.pages.get(&page_id).and_then(|o| o.in_flight.as_ref()) else {
            return;
        };
        let to_send: Vec<(NodeId, Body)> = f
            .waiting
            .iter()
            .filter(|(_, sent)| sent.is_none())
            .filter_map(|(node, _)| {
                let r = f.q.backups.iter().find(|r| r.node == *node)?;
                Some((
                    *node,
                    Body::Replicate {
                        page_id,
                        page: r.page,
                        offset: f.q.offset,
                        data: f.bytes.clone(),
                    },
                ))
            })
            .collect();
        let epoch = self.epoch();
        for (node, body) in to_send {
            let msg = Message::new(epoch, self.me, 0, body).encode();
            let Some(link) = self.link(node) else {
                if self.joins.get(&page_id).is_some_and(|j| {
                    j.target.node == node && !j.added && j.since.elapsed() >= JOIN_PATIENCE
                }) {
                    self.fail_join(page_id, "the target cannot be reached");
                }
                continue;
            };
            match link.ep.request(&msg, REPLICATE_TIMEOUT) {
                Ok(id) => {
                    link.sent.insert(id, page_id);
                    if let Some(w) = self
                        .pages
                        .get_mut(&page_id)
                        .and_then(|o| o.in_flight.as_mut())
                        .and_then(|f| f.waiting.get_mut(&node))
                    {
                        *w = Some(id);
                    }
                }
                Err(e) => {
                    tracing::warn!(%node, error = %e, "sending Replicate failed; dropping the link");
                    self.links.remove(&node);
                }
            }
        }
        fault::point("node.data-replicating");
    }

    /// The outgoing connection to `node`, if it is up. Otherwise one is started on a
    /// helper thread (its address from the monitor's node list), at most one attempt per
    /// [`RECONNECT_EVERY`], and [`Self::collect_links`] takes it when it is made: a
    /// connect on this thread would stop it accepting, and two primaries connecting to each
    /// other would each wait for the other's accept until both timed out.
    fn link(&mut self, node: NodeId) -> Option<&mut PeerLink> {
        if !self.links.contains_key(&node) {
            if self.connecting.contains(&node)
                || self
                    .last_attempt
                    .get(&node)
                    .is_some_and(|t| t.elapsed() < RECONNECT_EVERY)
            {
                return None;
            }
            self.last_attempt.insert(node, Instant::now());
            let addr = match self.addrs.get(&node) {
                Some(a) => *a,
                None => {
                    let nodes = self
                        .shared()
                        .call(|reply| Command::Nodes { reply })
                        .map_err(|e| tracing::warn!(error = %e, "node list"))
                        .ok()?;
                    self.addrs = node_addrs(&nodes);
                    *self.addrs.get(&node)?
                }
            };
            let (bind, pd, done) = (self.bind, self.pd.clone(), self.links_made.0.clone());
            let wake = Arc::clone(&self.notifier);
            let spawned = std::thread::Builder::new()
                .name(format!("pmgas-link-{}", node.0))
                .spawn(move || {
                    let ep = Connector::new(Some(bind), addr)
                        .resolve()
                        .and_then(|route| {
                            route.connect_endpoint(
                                &pd,
                                &ConnectionConfig::default(),
                                &[],
                                data_msg_config(),
                            )
                        })
                        .map_err(|e| format!("{addr}: {e}"));
                    let _ = done.send((node, ep));
                    wake.notify();
                });
            match spawned {
                Ok(_) => {
                    self.connecting.insert(node);
                }
                Err(e) => tracing::warn!(%node, error = %e, "cannot start a connection"),
            }
            return None;
        }
        self.links.get_mut(&node)
    }

    /// Connections [`Self::link`] started that are made (or failed): a new link carries
    /// the Replicates waiting for it at once. Returns whether there were any.
    fn collect_links(&mut self) -> bool {
        let mut any = false;
        while let Ok((node, ep)) = self.links_made.1.try_recv() {
            any = true;
            self.connecting.remove(&node);
            match ep {
                Ok(ep) => {
                    self.links.insert(
                        node,
                        PeerLink {
                            ep,
                            sent: HashMap::new(),
                        },
                    );
                    let waiting: Vec<PageId> = self
                        .pages
                        .iter()
                        .filter(|(_, o)| {
                            o.in_flight
                                .as_ref()
                                .is_some_and(|f| f.waiting.get(&node) == Some(&None))
                        })
                        .map(|(id, _)| *id)
                        .collect();
                    for page_id in waiting {
                        self.send_replicates(page_id);
                    }
                }
                Err(e) => {
                    tracing::warn!(%node, error = %e, "cannot reach a backup");
                    // Its address may have changed (a restart): ask again next time.
                    self.addrs.remove(&node);
                }
            }
        }
        any
    }

    /// Answers from backups on outgoing links.
    fn poll_links(&mut self) -> bool {
        let mut busy = false;
        let (epoch, me) = (self.epoch(), self.me);
        let nodes: Vec<NodeId> = self.links.keys().copied().collect();
        for node in nodes {
            while let Some(link) = self.links.get_mut(&node) {
                let incoming = match link.ep.poll() {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        // A backup that died (and maybe came back elsewhere) is noticed
                        // here, not only when a send to it fails.
                        if link.ep.connection().peer_disconnected().unwrap_or(true) {
                            tracing::warn!(%node, "link to a backup disconnected");
                            self.lose_link(node);
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(%node, error = %e, "link to a backup lost");
                        self.lose_link(node);
                        break;
                    }
                };
                busy = true;
                match incoming {
                    Incoming::Response {
                        request_id,
                        payload,
                    } => {
                        let Some(page_id) = link.sent.remove(&request_id) else {
                            continue;
                        };
                        self.replicate_answer(node, page_id, request_id, &payload);
                    }
                    Incoming::TimedOut { request_id } => {
                        // No answer in time: the link may lead to a process that is gone
                        // (its node restarted elsewhere); the Replicate goes again on a
                        // new one (D6).
                        if let Some(page_id) = link.sent.remove(&request_id) {
                            tracing::warn!(%node, "a Replicate timed out; reconnecting");
                            self.forget_sent(node, page_id, request_id);
                            self.lose_link(node);
                            break;
                        }
                    }
                    Incoming::Request { request_id, .. } => {
                        let body = error(ErrorCode::Malformed, "not a request to a primary".into());
                        let msg = Message::new(epoch, me, 0, body).encode();
                        let _ = link.ep.respond(request_id, &msg);
                    }
                }
            }
        }
        busy
    }

    /// A link failed: every Replicate in flight on it is to be sent again (D6); joins of
    /// that node whose copy is not done fail.
    fn lose_link(&mut self, node: NodeId) {
        if let Some(link) = self.links.remove(&node) {
            for (id, page_id) in link.sent {
                self.forget_sent(node, page_id, id);
            }
        }
        self.addrs.remove(&node);
        let failed: Vec<PageId> = self
            .joins
            .iter()
            .filter(|(_, j)| j.target.node == node && !j.added)
            .map(|(p, _)| *p)
            .collect();
        // Advanced by the caller's page (poll_links's answers) or the next tick.
        for page_id in failed {
            self.fail_join(page_id, "the link to the target was lost");
        }
    }

    fn forget_sent(&mut self, node: NodeId, page_id: PageId, request_id: u64) {
        if let Some(w) = self
            .pages
            .get_mut(&page_id)
            .and_then(|o| o.in_flight.as_mut())
            .and_then(|f| f.waiting.get_mut(&node))
            && *w == Some(request_id)
        {
            *w = None;
        }
    }

    fn replicate_answer(&mut self, node: NodeId, page_id: PageId, request_id: u64, payload: &[u8]) {
        let body = Message::decode(payload).map(|m| m.body);
        if !matches!(body, Ok(Body::ReplicateAck { .. }))
            && let Some(j) = self.joins.get(&page_id).filter(|j| j.target.node == node)
        {
            // A joining target refused (its page was aborted, or freed by its
            // reconciliation): before the copy is done the join fails; after it, the
            // update waits (the GAT may list the target) until the monitor ends the join.
            if j.added {
                self.forget_sent(node, page_id, request_id);
            } else {
                self.fail_join(
                    page_id,
                    &format!("the target refused a Replicate: {body:?}"),
                );
                self.advance(page_id);
            }
            return;
        }
        match body {
            Ok(Body::ReplicateAck { page_id: got }) if got == page_id => {
                let Some(f) = self
                    .pages
                    .get_mut(&page_id)
                    .and_then(|o| o.in_flight.as_mut())
                else {
                    return;
                };
                if f.waiting.get(&node) == Some(&Some(request_id)) {
                    f.waiting.remove(&node);
                }
                if self.finish_if_done(page_id) {
                    self.start_next(page_id);
                }
            }
            Ok(Body::Error {
                code: ErrorCode::PageFreed,
                detail,
            }) => {
                // The page was freed (the backup went first: this primary was away when
                // it was freed): nothing more of it is ordered here.
                tracing::warn!(%node, page_id = page_id.0, %detail, "page freed under an update");
                self.refuse_page(page_id, &detail);
            }
            other => {
                // A refusal (a stale epoch on either side): sent again after the next
                // mapping check (D6).
                tracing::warn!(%node, page_id = page_id.0, answer = ?other, "Replicate refused");
                self.forget_sent(node, page_id, request_id);
            }
        }
    }

    /// D5: once no backup is waited for, and then no sharer of the blocks the update
    /// touches (C3), the primary's copy is updated and the client answered. Returns
    /// whether the page's in-flight update finished.
    fn finish_if_done(&mut self, page_id: PageId) -> bool {
        let (acked, round_started) = self
            .pages
            .get(&page_id)
            .and_then(|o| o.in_flight.as_ref())
            .map_or((false, false), |f| {
                (f.waiting.is_empty(), f.round.is_some())
            });
        if !acked {
            return false;
        }
        let copy = self
            .pages
            .get(&page_id)
            .and_then(|o| o.in_flight.as_ref())
            .is_some_and(|f| f.q.copy_len.is_some());
        if copy {
            // A copy (D2a, R3) changes nothing here: no sharer is invalidated, nothing
            // stored.
            let f = self
                .pages
                .get_mut(&page_id)
                .and_then(|o| o.in_flight.take());
            if let Some(f) = f {
                self.copied(page_id, &f.q);
            }
            return true;
        }
        if !round_started {
            self.invalidate_sharers(page_id);
        }
        let now = self.now_ns();
        let settled = Instant::now() >= self.serving_from;
        let done = self
            .pages
            .get_mut(&page_id)
            .and_then(|o| o.in_flight.as_mut())
            .and_then(|f| f.round.as_mut())
            .is_some_and(|r| r.done(now));
        if !(done && settled) {
            return false;
        }
        let Some(f) = self
            .pages
            .get_mut(&page_id)
            .and_then(|o| o.in_flight.take())
        else {
            return false;
        };
        self.finish(page_id, f);
        true
    }

    fn finish(&mut self, page_id: PageId, f: InFlight) {
        let q = &f.q;
        // The version word is odd while the bytes change: a fill's READs that overlap the
        // store see it (C1).
        let version = self.version(q.page);
        self.set_version(q.page, version | 1);
        let stored = self
            .pool
            .store_in_page_as(q.page, page_id, u64::from(q.offset), &f.bytes);
        self.set_version(q.page, (version | 1) + 1);
        let body = match stored {
            Ok(()) => {
                self.audit_ack(q.page, q.offset, f.bytes.len());
                fault::point("node.data-applied");
                Body::UpdateAck { old: f.old }
            }
            Err(e @ PoolError::NotHeld { .. }) => error(ErrorCode::PageFreed, e.to_string()),
            Err(e) => error(ErrorCode::Internal, e.to_string()),
        };
        self.respond(q.conn, q.request_id, q.wire_id, body);
    }

    /// The page was freed: its update in flight and every queued one are answered
    /// PageFreed (none of them was applied here; what reached a backup is in a page that
    /// is freed and zeroed there).
    fn refuse_page(&mut self, page_id: PageId, detail: &str) {
        let Some(order) = self.pages.remove(&page_id) else {
            return;
        };
        self.synced.remove(&page_id);
        let why = format!("page {} was freed ({detail})", page_id.0);
        for q in order.in_flight.map(|f| f.q).into_iter().chain(order.queue) {
            let body = error(ErrorCode::PageFreed, why.clone());
            self.respond(q.conn, q.request_id, q.wire_id, body);
        }
    }

    /// Records, for the persistence audit, that bytes of `page` are acknowledged now.
    fn audit_ack(&self, page: PageIndex, offset: u32, len: usize) {
        if let Some(base) = self.pool.header().page_offset(page) {
            crate::audit::record('A', base + u64::from(offset), len as u64);
        }
    }

    /// D4, on a backup.
    fn replicate(
        &self,
        epoch: Epoch,
        page_id: PageId,
        page: PageIndex,
        offset: u32,
        data: &[u8],
    ) -> Body {
        let mine = self.epoch();
        if epoch < mine {
            return error(
                ErrorCode::StaleEpoch,
                format!("epoch {} is older than {}", epoch.0, mine.0),
            );
        }
        if data.len() > MAX_UPDATE_BYTES {
            return error(ErrorCode::Malformed, format!("{} bytes", data.len()));
        }
        let stored =
            self.shared()
                .rereplica
                .store_copy(&self.pool, page, page_id, u64::from(offset), data);
        match stored {
            Ok(()) => {
                self.audit_ack(page, offset, data.len());
                fault::point("node.data-backup-stored");
                Body::ReplicateAck { page_id }
            }
            Err(e @ PoolError::NotHeld { .. }) => error(ErrorCode::PageFreed, e.to_string()),
            Err(e) => error(ErrorCode::BadAddress, e.to_string()),
        }
    }

    /// The backups an update of `page_id` goes to: the mapping's, and a joining target
    /// (R3). A join whose target the mapping lists now ends: it is a backup like the
    /// others.
    fn backups_of(&mut self, page_id: PageId, replicas: &[Replica]) -> Vec<Replica> {
        let mut backups = replicas[1..].to_vec();
        if let Some(j) = self.joins.get(&page_id) {
            if replicas.iter().any(|r| r.node == j.target.node) {
                self.joins.remove(&page_id);
            } else {
                backups.push(j.target);
            }
        }
        backups
    }

    /// The service's re-replication business: a new monitor connection ends every join
    /// (the new monitor knows nothing of them: the GAT it loaded lists the target or not,
    /// and the page's next update looks the mapping up again); mapping notices end the
    /// joins of their pages; AddReplica requests start joins. Returns whether there was
    /// anything.
    fn poll_rereplica(&mut self) -> bool {
        let generation = self.shared().rereplica.generation();
        let mut busy = false;
        if generation != self.generation {
            self.generation = generation;
            let pages: Vec<PageId> = self.joins.keys().copied().collect();
            for page_id in pages {
                self.shared().cache.remove(page_id);
                self.fail_join(page_id, "this node joined another monitor");
                self.advance(page_id);
            }
            busy = true;
        }
        for (page_id, replicas) in self.shared().rereplica.take_notices() {
            busy = true;
            if let Some(j) = self.joins.remove(&page_id) {
                let kept = replicas.iter().any(|r| r.node == j.target.node);
                tracing::info!(page_id = page_id.0, target = %j.target.node, kept, "join ended by the monitor");
            }
        }
        for add in self.shared().rereplica.take_asked() {
            busy = true;
            self.start_join(add);
        }
        busy
    }

    /// R3: `add.target` joins the page: the page is copied to it through the page's
    /// queue, chunk by chunk (each read when it starts, so it holds every update ordered
    /// before it), and every update queued from now on goes to it too.
    fn start_join(&mut self, add: crate::rereplica::AddReplica) {
        let crate::rereplica::AddReplica {
            txn_id,
            page_id,
            target,
        } = add;
        let refuse = |s: &Self, body: Body| {
            s.shared().rereplica.answer(txn_id, body);
            s.shared().notifier.notify();
        };
        let (page, replicas) = match self.primary_page(page_id) {
            Ok(p) => p,
            Err(b) => return refuse(self, b),
        };
        if replicas.iter().any(|r| r.node == target.node) {
            let detail = format!(
                "{} holds a replica of page {} already",
                target.node, page_id.0
            );
            return refuse(self, error(ErrorCode::Malformed, detail));
        }
        if let Some(old) = self.joins.get(&page_id).copied() {
            if old.txn_id == txn_id {
                return; // asked again: the copy is under way
            }
            self.fail_join(page_id, "another re-replication of the page started");
        }
        self.joins.insert(
            page_id,
            Join {
                txn_id,
                target,
                added: false,
                since: Instant::now(),
            },
        );
        let page_size = self.pool.header().page_size_bytes;
        let order = self.pages.entry(page_id).or_default();
        order
            .queue
            .extend(copy_chunks(page, page_size, &[target], Some(txn_id)));
        tracing::info!(page_id = page_id.0, target = %target.node, txn_id, "copying a page to a new replica");
        if order.in_flight.is_none() {
            self.start_next(page_id);
        }
    }

    /// A copy chunk (D2a, R3) was acknowledged by every backup it went to; the last one
    /// of a join's copy tells the monitor (R4).
    fn copied(&mut self, page_id: PageId, q: &Queued) {
        if q.offset == 0 && self.joins.contains_key(&page_id) {
            fault::point("node.rereplicate-copying");
        }
        let Some(txn_id) = q.ends_copy else {
            return;
        };
        let Some(j) = self.joins.get_mut(&page_id).filter(|j| j.txn_id == txn_id) else {
            return;
        };
        j.added = true;
        let bytes = self.pool.header().page_size_bytes;
        println!(
            "REPLICA COPIED page_id={} target={} bytes={bytes} unix_ms={}",
            page_id.0,
            j.target.node.0,
            fault::unix_ms()
        );
        let shared = self.shared();
        shared.rereplica.answer(
            txn_id,
            Body::ReplicaAdded {
                txn_id,
                page_id,
                bytes,
            },
        );
        shared.notifier.notify();
    }

    /// The join of `page_id` fails before its copy is done (the target refused or cannot
    /// be reached, or the monitor changed): the target leaves the page's updates, in flight
    /// and queued, and the monitor hears why (it rolls back and chooses again). The caller
    /// advances the page ([`Self::advance`]) unless it is about to.
    fn fail_join(&mut self, page_id: PageId, why: &str) {
        let Some(j) = self.joins.remove(&page_id) else {
            return;
        };
        tracing::warn!(page_id = page_id.0, target = %j.target.node, txn_id = j.txn_id, why, "re-replication join failed");
        if !j.added {
            let shared = self.shared();
            let detail = format!("copying page {} to {}: {why}", page_id.0, j.target.node);
            shared
                .rereplica
                .answer(j.txn_id, error(ErrorCode::Internal, detail));
            shared.notifier.notify();
        }
        if let Some(order) = self.pages.get_mut(&page_id) {
            for q in order.queue.iter_mut() {
                q.backups.retain(|r| r.node != j.target.node);
            }
            if let Some(f) = order.in_flight.as_mut() {
                f.q.backups.retain(|r| r.node != j.target.node);
                f.waiting.remove(&j.target.node);
            }
        }
    }

    /// Finishes the page's update in flight if nothing is waited for any more, and
    /// starts the next.
    fn advance(&mut self, page_id: PageId) {
        if self.finish_if_done(page_id) {
            self.start_next(page_id);
        }
    }

    /// D6: updates waiting on a backup with nothing in flight: if the backup left the
    /// page's mapping (declared dead, new epoch), it is no longer waited for; otherwise the
    /// Replicate is sent again (reconnecting if needed).
    fn tick(&mut self) {
        if self.last_prune.elapsed() >= PRUNE_EVERY {
            self.last_prune = Instant::now();
            let now = self.now_ns();
            self.directory.prune(now);
        }
        // C3: rounds that wait for a lease to end (or C4's start).
        let rounds: Vec<PageId> = self
            .pages
            .iter()
            .filter(|(_, o)| o.in_flight.as_ref().is_some_and(|f| f.waiting.is_empty()))
            .map(|(id, _)| *id)
            .collect();
        for page_id in rounds {
            if self.finish_if_done(page_id) {
                self.start_next(page_id);
            }
        }
        let stuck: Vec<PageId> = self
            .pages
            .iter()
            .filter(|(_, o)| {
                o.in_flight
                    .as_ref()
                    .is_some_and(|f| f.waiting.values().any(Option::is_none))
            })
            .map(|(id, _)| *id)
            .collect();
        for page_id in stuck {
            let held = self
                .pages
                .get(&page_id)
                .and_then(|o| o.in_flight.as_ref())
                .map(|f| self.local_page(page_id, f.q.page));
            if let Some(Err(Body::Error { detail, .. })) = held {
                self.refuse_page(page_id, &detail);
                continue;
            }
            if let Ok(replicas) = self.mapping(page_id)
                && let Some(f) = self
                    .pages
                    .get_mut(&page_id)
                    .and_then(|o| o.in_flight.as_mut())
            {
                let before = f.waiting.len();
                let joining = self.joins.get(&page_id).map(|j| j.target.node);
                f.waiting
                    .retain(|n, _| replicas.iter().any(|r| r.node == *n) || joining == Some(*n));
                if f.waiting.len() < before {
                    tracing::warn!(
                        page_id = page_id.0,
                        dropped = before - f.waiting.len(),
                        "update completes without backups that left the mapping"
                    );
                }
            }
            self.send_replicates(page_id);
            if self.finish_if_done(page_id) {
                self.start_next(page_id);
            }
        }
    }
}

/// Data-path addresses by node, from the monitor's node list.
pub fn node_addrs(nodes: &[NodeInfo]) -> HashMap<NodeId, SocketAddr> {
    nodes
        .iter()
        .filter(|n| n.port != 0)
        .map(|n| (n.node, SocketAddr::from((n.ip, n.port))))
        .collect()
}
