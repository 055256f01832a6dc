//! The application's handle on the global address space from any process, with or
//! without PM of its own: [`Space`].
//!
//! A `Space` finds the active monitor through ZooKeeper, keeps the mapping-table cache
//! (page id -> replicas, per config epoch), and connects to data nodes over rdma_cm on
//! demand: one RC connection per node, shared by the handle's threads. Reads are one-sided
//! RDMA READs of the page's primary; updates (write, compare-and-swap, fetch-and-add) go to
//! the primary's CPU, which orders them, replicates them and answers once they are durable
//! on every live replica (`node/DATAPATH.md`). Pages are allocated by asking a data node to
//! be their primary.
//!
//! Caching (opt-in, [`SpaceConfig::cache`]): reads are served from a coherent block cache
//! in DRAM; a miss is a fill (one-sided READs of the block, the page's version word and
//! ART entry, posted with a registration at the primary); every update invalidates the
//! block at every other client that caches it before it is acknowledged, and a cached
//! block is a lease that ends on its own when a client cannot be told (`node/CACHE.md`).
//!
//! Failures: an update whose answer was lost (the primary died, the connection broke) is
//! reported as [`SpaceError::Unknown`] and never sent again by this handle, so it takes
//! effect at most once. Refusals that applied nothing (a stale mapping, a primary that is
//! not one any more) are retried against a fresh mapping. Reads are retried until
//! [`SpaceConfig::op_timeout`], riding out the time until a failed primary is declared dead
//! and its backup promoted.
//!
//! ```no_run
//! use pmgas_node::space::{Space, SpaceConfig};
//! let space = Space::connect(SpaceConfig::new("10.0.0.4:2181", "demo")).unwrap();
//! let page = space.alloc_page(2, None).unwrap();         // a primary + 2 backups
//! let addr = space.addr(page.page_id, 64).unwrap();
//! space.write(addr, b"hello").unwrap();                  // durable on all 3 replicas
//! let mut buf = [0u8; 5];
//! space.read(addr, &mut buf).unwrap();
//! let old = space.compare_and_swap(space.addr(page.page_id, 0).unwrap(), 0, 7).unwrap();
//! assert_eq!(old, 0);
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pmgas_layout::gat::Mapping;
use pmgas_layout::pool::art_entry_at;
use pmgas_layout::wire::{Body, ErrorCode, MAX_UPDATE_BYTES, Message, NodeInfo, Replica, UpdateOp};
use pmgas_layout::{Epoch, GlobalAddr, NodeId, PageId, PageIndex};
use pmgas_verbs::fault;
use pmgas_verbs::msg::{Endpoint, MsgConfig};
use pmgas_verbs::{
    Access, AlignedBuf, ConnectionConfig, Connector, MemoryRegion, OneSided, Opcode,
    ProtectionDomain, RemoteRegion,
};

use crate::blockcache::{CacheConfig, CacheStats, FillOutcome, FillReads, judge_fill};
use crate::cache::MappingCache;
use crate::coherence::Coherence;
use crate::data::{data_msg_config, node_addrs};
use crate::service::MonitorFinder;

/// The sender id a client without a node id uses on the wire.
pub const CLIENT_SENDER: NodeId = NodeId(u32::MAX - 1);
/// Bytes one READ brings at most (a longer read is several).
const READ_CHUNK_BYTES: usize = 1 << 16;
/// ART entries one group of READs checks at most (in the buffer after the data).
const ART_SLOTS: usize = 64;
const ART_ENTRY: usize = pmgas_layout::pool::ART_ENTRY_BYTES as usize;

/// Whether an ART entry, READ from page `page`'s node right after data of the page (same
/// QP: an RC QP executes READs in order), proves that the page held `page_id` when the
/// data was read: ALLOCATED under that id now, and ids are never reused, so it was then.
/// Otherwise the page was freed (and maybe handed out again): the bytes are not `page_id`'s.
fn art_holds(entry: &[u8], page: PageIndex, page_id: PageId) -> Result<(), String> {
    match pmgas_layout::ArtRecord::decode_entry(entry, page) {
        Ok(r) if r.holds(page_id) => Ok(()),
        Ok(r) => Err(format!(
            "page {} there is {} under id {}, not page id {}: the mapping is stale",
            page.0,
            r.state.name(),
            r.page_id.0,
            page_id.0
        )),
        Err(e) => Err(format!("page {}'s ART entry: {e}", page.0)),
    }
}

#[derive(Debug, Clone)]
pub struct SpaceConfig {
    pub zk: String,
    pub cluster: String,
    /// The local address to connect from (picks the RDMA device); `None`: the route's.
    pub bind: Option<IpAddr>,
    /// How long one request may go unanswered.
    pub request_timeout: Duration,
    /// How long an operation keeps retrying what is safe to retry (reads, refusals that
    /// applied nothing) before it fails.
    pub op_timeout: Duration,
    /// The coherent block cache (`None`: off). Reads use it unless asked not to
    /// ([`Space::read_with`]).
    pub cache: Option<CacheConfig>,
}

impl SpaceConfig {
    pub fn new(zk: &str, cluster: &str) -> Self {
        Self {
            zk: zk.to_owned(),
            cluster: cluster.to_owned(),
            bind: None,
            // Longer than a primary may hold an update for a failed backup until the
            // monitor declares it dead (the node timeout): an answer that takes that long
            // is not lost.
            request_timeout: Duration::from_secs(15),
            op_timeout: Duration::from_secs(30),
            cache: None,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SpaceError {
    /// Refused with nothing applied: `UnknownPage` (never mapped), `PageFreed`, `PageLost`,
    /// `BadAddress`, `NoSpace`, `NotEnoughNodes`, ...
    #[error("refused: {code:?}: {detail}")]
    Refused { code: ErrorCode, detail: String },
    /// The caller's address or length is not valid for the page (nothing was sent).
    #[error("bad address: {0}")]
    BadAddress(String),
    /// The update was sent and its answer lost (the primary failed, the connection broke):
    /// it may or may not have taken effect. It is not sent again.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// Nothing could be reached within the operation's time (nothing was applied).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The handle's configuration does not fit the cluster (a cache block larger than a
    /// page, say).
    #[error("configuration: {0}")]
    Config(String),
}

/// One data node's connection: its endpoint, where its pages are, a local buffer for
/// READs.
struct NodeConn {
    /// Set once an operation on the connection failed: threads that were waiting for it
    /// send nothing more on it (they ask for a new one).
    broken: bool,
    ep: Endpoint,
    pages: RemoteRegion,
    /// The node's header and ART (read-only): entry `i` at `art_entry_at(i)`.
    art: RemoteRegion,
    page_size_bytes: u64,
    /// The pages' version words (`node/CACHE.md` C1), read-only.
    versions: RemoteRegion,
    /// READ_CHUNK_BYTES of data, then ART_SLOTS ART entries (or, for a fill, one ART
    /// entry and the two version words).
    buf: MemoryRegion,
}

struct Monitor {
    finder: MonitorFinder,
    ep: Option<Endpoint>,
    /// The device's PD (kept: registering on a new one per connection is wasted work).
    pd: Option<ProtectionDomain>,
}

struct Inner {
    config: SpaceConfig,
    monitor: Mutex<Monitor>,
    nodes: Mutex<HashMap<NodeId, Arc<Mutex<NodeConn>>>>,
    addrs: RwLock<HashMap<NodeId, NodeInfo>>,
    cache: MappingCache,
    epoch: AtomicU64,
    page_size_bytes: AtomicU64,
    next_wire_id: AtomicU64,
    coherence: Option<Arc<Coherence>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(c) = &self.coherence {
            c.stop();
        }
    }
}

/// The application's handle; cheap to clone, shared by threads.
#[derive(Clone)]
pub struct Space {
    inner: Arc<Inner>,
}

/// What a failed request on a connection means for a retry.
enum Failure {
    /// Nothing was applied and the mapping may have moved: look it up again and retry.
    Moved(String),
    /// Final: give it to the caller.
    Final(SpaceError),
    /// The connection failed: for an update, the outcome is unknown.
    Transport(String),
}

impl Space {
    /// Finds the active monitor (waiting up to the operation timeout for one) and connects
    /// to it. Data nodes are connected on first use.
    pub fn connect(config: SpaceConfig) -> Result<Self, SpaceError> {
        let finder =
            MonitorFinder::new(&config.zk, &config.cluster).map_err(SpaceError::Unavailable)?;
        if let Some(c) = config.cache
            && c.block_bytes > READ_CHUNK_BYTES
        {
            return Err(SpaceError::Config(format!(
                "cache blocks of {} bytes: at most {READ_CHUNK_BYTES}",
                c.block_bytes
            )));
        }
        let coherence = match config.cache {
            Some(c) => Some(Coherence::start(c).map_err(SpaceError::Unavailable)?),
            None => None,
        };
        let space = Self {
            inner: Arc::new(Inner {
                monitor: Mutex::new(Monitor {
                    finder,
                    ep: None,
                    pd: None,
                }),
                nodes: Mutex::new(HashMap::new()),
                addrs: RwLock::new(HashMap::new()),
                cache: MappingCache::default(),
                epoch: AtomicU64::new(0),
                page_size_bytes: AtomicU64::new(0),
                next_wire_id: AtomicU64::new(1),
                coherence,
                config,
            }),
        };
        space.nodes()?;
        if let Some(c) = space.inner.config.cache {
            c.validate(space.page_size_bytes()?)
                .map_err(SpaceError::Config)?;
        }
        Ok(space)
    }

    /// The block cache's counters (None: caching is off).
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.inner.coherence.as_ref().map(|c| c.stats())
    }

    /// The cluster's page size (learned from the first data node connected).
    pub fn page_size_bytes(&self) -> Result<u64, SpaceError> {
        let known = self.inner.page_size_bytes.load(Ordering::Acquire);
        if known != 0 {
            return Ok(known);
        }
        let nodes = self.nodes()?;
        let first = nodes
            .first()
            .ok_or_else(|| SpaceError::Unavailable("no live data node".into()))?;
        let conn = self.node(first.node)?;
        let size = lock(&conn).page_size_bytes;
        Ok(size)
    }

    /// The global address of byte `offset` of page `page_id`.
    pub fn addr(&self, page_id: PageId, offset: u64) -> Result<GlobalAddr, SpaceError> {
        GlobalAddr::new(page_id, offset, self.page_size_bytes()?)
            .map_err(|e| SpaceError::BadAddress(e.to_string()))
    }

    /// The config epoch this handle last heard of.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.inner.epoch.load(Ordering::Acquire))
    }

    /// The live data nodes, where they serve and how much room they have (from the
    /// monitor).
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, SpaceError> {
        match self.monitor_call(Body::NodesQuery)? {
            Body::NodeList { nodes } => {
                let mut addrs = self.inner.addrs.write().unwrap_or_else(|p| p.into_inner());
                addrs.clear();
                addrs.extend(nodes.iter().map(|n| (n.node, *n)));
                Ok(nodes)
            }
            other => Err(unexpected("NodesQuery", &other)),
        }
    }

    /// Where page `page_id` lives (primary first): from the cache when it holds the page
    /// in the current epoch, else from the monitor.
    pub fn lookup(&self, page_id: PageId) -> Result<Mapping, SpaceError> {
        let epoch = self.epoch();
        if let Some(m) = self.inner.cache.get(page_id, epoch) {
            return Ok(m);
        }
        match self.monitor_call(Body::MappingLookup { page_id })? {
            Body::Mapping {
                page_id: got,
                replicas,
            } if got == page_id => {
                self.inner.cache.insert(page_id, self.epoch(), &replicas);
                Ok(Mapping::new(page_id, replicas))
            }
            other => Err(unexpected("MappingLookup", &other)),
        }
    }

    /// Drops a page's cached mapping.
    pub fn invalidate(&self, page_id: PageId) {
        self.inner.cache.remove(page_id);
    }

    /// Allocates a page with `backups` backups; its primary is `on`, or the live node with
    /// the most free pages.
    pub fn alloc_page(&self, backups: u8, on: Option<NodeId>) -> Result<Mapping, SpaceError> {
        let node = match on {
            Some(n) => n,
            None => self
                .nodes()?
                .iter()
                .filter(|n| n.port != 0)
                .max_by_key(|n| (n.free_pages, std::cmp::Reverse(n.node)))
                .map(|n| n.node)
                .ok_or_else(|| {
                    SpaceError::Unavailable("no live data node serves the data path".into())
                })?,
        };
        let body = Body::DataAlloc {
            backups_wanted: backups,
        };
        // An allocation whose answer is lost leaves its page to the node's reconciliation.
        match self.node_call(node, body, Duration::from_secs(60)) {
            Ok(Body::Mapping { page_id, replicas }) => {
                self.inner.cache.insert(page_id, self.epoch(), &replicas);
                Ok(Mapping::new(page_id, replicas))
            }
            Ok(other) => Err(unexpected("DataAlloc", &other)),
            Err(Failure::Final(e)) => Err(e),
            Err(Failure::Moved(e)) => Err(SpaceError::Unavailable(e)),
            Err(Failure::Transport(e)) => Err(SpaceError::Unknown(e)),
        }
    }

    /// Frees page `page_id`: the monitor stores its tombstone in the GAT (the id is never
    /// handed out again), then every replica on a live node goes FREE, zeroed (a node that
    /// is away frees its replica when it rejoins). Returns how many replicas went FREE.
    ///
    /// From then on every operation on the page, from any handle, is refused
    /// [`ErrorCode::PageFreed`]; a handle that still caches the page's mapping never reads
    /// or writes the bytes of a page that reuses its place (reads check the page's ART
    /// entry, READ after the data; the primary checks updates against its ART). Freeing a
    /// freed page is refused `PageFreed`, an id never allocated `UnknownPage`; if the
    /// monitor failed under the request and the page is freed when asked again, the free
    /// took effect (this call's or another's) and `Ok(0)` is returned.
    pub fn free_page(&self, page_id: PageId) -> Result<u32, SpaceError> {
        let mut attempts = 0;
        let answer = self.monitor_call_counting(&Body::FreePage { page_id }, &mut attempts)?;
        self.invalidate(page_id);
        if let Some(c) = &self.inner.coherence {
            c.drop_page(page_id);
        }
        match answer {
            Body::Freed { count } => Ok(count),
            Body::Error {
                code: ErrorCode::PageFreed,
                ..
            } if attempts > 1 => Ok(0),
            other => Err(unexpected("FreePage", &other)),
        }
    }

    /// A batch of operations to post together and wait for together ([`Batch::quiet`]).
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            space: self,
            ops: vec![],
        }
    }

    /// Reads `out.len()` bytes at `addr` (within one page): the latest update
    /// acknowledged to any client. With caching on, from the block cache (each block as
    /// of one moment), else from the page's primary with one-sided READs.
    pub fn read(&self, addr: GlobalAddr, out: &mut [u8]) -> Result<(), SpaceError> {
        self.read_with(addr, out, true)
    }

    /// [`Self::read`], with the cache (`cached`, if the handle has one) or without it (a
    /// READ of the primary, which neither uses nor fills the cache).
    pub fn read_with(
        &self,
        addr: GlobalAddr,
        out: &mut [u8],
        cached: bool,
    ) -> Result<(), SpaceError> {
        self.check(addr, out.len())?;
        let coherence = self.inner.coherence.as_ref().filter(|_| cached);
        // The clock is read only once something failed: a cache hit reads it once, in
        // the cache.
        let mut deadline: Option<Instant> = None;
        loop {
            let once = match coherence {
                Some(c) => self.read_cached_once(c, addr, out),
                None => self.read_once(addr, out),
            };
            match once {
                Ok(()) => return Ok(()),
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Moved(e) | Failure::Transport(e)) => {
                    let end = *deadline
                        .get_or_insert_with(|| Instant::now() + self.inner.config.op_timeout);
                    if Instant::now() >= end {
                        return Err(SpaceError::Unavailable(format!(
                            "read of page {}: {e}",
                            addr.page().0
                        )));
                    }
                    self.invalidate(addr.page());
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Reads the aligned 8-byte word at `addr`.
    pub fn read_u64(&self, addr: GlobalAddr) -> Result<u64, SpaceError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// The connection to a page's primary for one-sided READs, when the handle is still in
    /// `epoch` (the mapping was looked up in it).
    fn read_conn(&self, primary: Replica, epoch: Epoch) -> Result<Arc<Mutex<NodeConn>>, Failure> {
        // A primary that cannot be reached may be dead and about to be replaced: asked
        // again (a read is safe to repeat).
        let conn = self.node(primary.node).map_err(|e| match e {
            SpaceError::Unavailable(e) => Failure::Transport(e),
            other => Failure::Final(other),
        })?;
        if self.epoch() != epoch {
            // Connecting taught this handle a newer epoch: the mapping is looked up again.
            return Err(Failure::Moved(format!("the epoch moved past {}", epoch.0)));
        }
        if lock(&conn).broken {
            self.drop_node(primary.node);
            return Err(Failure::Transport(format!(
                "connection to {} lost",
                primary.node
            )));
        }
        Ok(conn)
    }

    /// C2 and C1 of `node/CACHE.md`: each block `out` covers from the cache, or filled.
    fn read_cached_once(
        &self,
        co: &Coherence,
        addr: GlobalAddr,
        out: &mut [u8],
    ) -> Result<(), Failure> {
        let bs = co.block_bytes();
        let mut done = 0usize;
        while done < out.len() {
            let at = addr.offset() as usize + done;
            let (block, off) = ((at / bs) as u32, at % bs);
            let n = (out.len() - done).min(bs - off);
            let part = &mut out[done..done + n];
            if !co.get((addr.page(), block), off, part, self.epoch()) {
                let bytes = self.fill(co, addr.page(), block)?;
                part.copy_from_slice(&bytes[off..off + n]);
            }
            done += n;
        }
        Ok(())
    }

    /// C1: fills block `block` of `page_id` and returns its bytes (a linearizable read
    /// whether or not they could be cached).
    fn fill(&self, co: &Coherence, page_id: PageId, block: u32) -> Result<Vec<u8>, Failure> {
        let key = (page_id, block);
        for _ in 0..8 {
            let epoch = self.epoch();
            let primary = self.primary(page_id)?;
            let addr = self.node_addr(primary.node).map_err(|e| match e {
                SpaceError::Unavailable(e) => Failure::Transport(e),
                other => Failure::Final(other),
            })?;
            let timeout = self.inner.config.request_timeout;
            co.listen(primary.node, self.inner.config.bind, addr, timeout)
                .map_err(Failure::Transport)?;
            let conn = self.read_conn(primary, epoch)?;
            let ticket = co.begin_fill();
            let requested_ns = co.now_ns();
            let reads = self.fill_reads(&conn, co, primary, page_id, block);
            let (bytes, reads) = match reads {
                Ok(r) => r,
                Err(f) => {
                    co.end_fill(ticket, key, None, epoch, 0, 0, primary.node);
                    return Err(f);
                }
            };
            // Every ticket ends here; only an Install hands the bytes to the cache.
            let outcome = judge_fill(&reads);
            let keep = (outcome == FillOutcome::Install).then_some(&bytes[..]);
            co.end_fill(
                ticket,
                key,
                keep,
                epoch,
                requested_ns,
                reads.lease_ns,
                primary.node,
            );
            match outcome {
                FillOutcome::Install | FillOutcome::ReadOnly => return Ok(bytes),
                FillOutcome::Retry => {}
                FillOutcome::Stale => {
                    return Err(Failure::Moved(format!(
                        "page {} no longer holds page id {}",
                        primary.page.0, page_id.0
                    )));
                }
            }
        }
        Err(Failure::Moved(format!(
            "page {} kept changing under its fill",
            page_id.0
        )))
    }

    /// C1's messages and READs, posted together on the primary's connection: the
    /// registration, then READs of the version word, the block, the version word again and
    /// the ART entry (an RC QP executes the READs in order).
    fn fill_reads(
        &self,
        conn: &Mutex<NodeConn>,
        co: &Coherence,
        primary: Replica,
        page_id: PageId,
        block: u32,
    ) -> Result<(Vec<u8>, FillReads), Failure> {
        let bs = co.block_bytes();
        let body = Body::CacheFill {
            page_id,
            block,
            block_bytes: bs as u32,
            client: co.token,
        };
        let wire_id = self.inner.next_wire_id.fetch_add(1, Ordering::Relaxed);
        let msg = Message::new(self.epoch(), CLIENT_SENDER, wire_id, body).encode();
        let timeout = self.inner.config.request_timeout;
        let mut guard = lock(conn);
        let c = &mut *guard;
        let lost = |c: &mut NodeConn, e: pmgas_verbs::Error| {
            c.broken = true;
            Failure::Transport(format!("fill from {}: {e}", primary.node))
        };
        let request_id = match c.ep.request(&msg, timeout) {
            Ok(id) => id,
            Err(e) => return Err(lost(c, e)),
        };
        let version_at = primary.page.0 as u64 * 8;
        let (art_local, before_local, after_local) = (
            READ_CHUNK_BYTES,
            READ_CHUNK_BYTES + ART_ENTRY,
            READ_CHUNK_BYTES + ART_ENTRY + 8,
        );
        let ops = [
            OneSided {
                local_offset: before_local,
                remote: &c.versions,
                remote_offset: version_at,
                len: 8,
            },
            OneSided {
                local_offset: 0,
                remote: &c.pages,
                remote_offset: u64::from(primary.page.0) * c.page_size_bytes
                    + u64::from(block) * bs as u64,
                len: bs,
            },
            OneSided {
                local_offset: after_local,
                remote: &c.versions,
                remote_offset: version_at,
                len: 8,
            },
            OneSided {
                local_offset: art_local,
                remote: &c.art,
                remote_offset: art_entry_at(primary.page.0),
                len: ART_ENTRY,
            },
        ];
        let posted = c.ep.one_sided_batch(Opcode::Read, &c.buf, &ops, timeout);
        if let Err(e) = posted {
            return Err(lost(c, e));
        }
        let answer = match c.ep.wait_response(request_id, timeout) {
            Ok(a) => a,
            Err(e) => return Err(lost(c, e)),
        };
        let mut bytes = vec![0u8; bs];
        let (mut entry, mut before, mut after) = ([0u8; ART_ENTRY], [0u8; 8], [0u8; 8]);
        let copied = c
            .buf
            .read_at(0, &mut bytes)
            .and_then(|()| c.buf.read_at(art_local, &mut entry))
            .and_then(|()| c.buf.read_at(before_local, &mut before))
            .and_then(|()| c.buf.read_at(after_local, &mut after));
        copied.map_err(|e| Failure::Final(SpaceError::Unavailable(e.to_string())))?;
        drop(guard);
        let m = Message::decode(&answer)
            .map_err(|e| Failure::Transport(format!("{} answered: {e}", primary.node)))?;
        self.adopt(m.header.epoch);
        let (lease_ms, registered_version) = match m.body {
            Body::Leased { lease_ms, version } => (lease_ms, version),
            Body::Error {
                code: ErrorCode::NotPrimary | ErrorCode::StaleEpoch,
                detail,
            } => return Err(Failure::Moved(detail)),
            Body::Error {
                code: ErrorCode::NotListening,
                detail,
            } => {
                // The primary lost this client's invalidation connection: a new one.
                co.drop_listener(primary.node);
                return Err(Failure::Moved(detail));
            }
            Body::Error {
                code: ErrorCode::PageFreed,
                detail,
            } => {
                co.drop_page(page_id);
                self.invalidate(page_id);
                return Err(Failure::Final(SpaceError::Refused {
                    code: ErrorCode::PageFreed,
                    detail,
                }));
            }
            other => return Err(Failure::Final(unexpected("CacheFill", &other))),
        };
        let lease_ns = u64::from(lease_ms) * 1_000_000;
        let reads = FillReads {
            lease_ns: if lease_ns > co.margin_ns() {
                lease_ns
            } else {
                0
            },
            registered_version,
            version_before: u64::from_le_bytes(before),
            version_after: u64::from_le_bytes(after),
            art_holds: art_holds(&entry, primary.page, page_id).is_ok(),
        };
        Ok((bytes, reads))
    }

    fn read_once(&self, addr: GlobalAddr, out: &mut [u8]) -> Result<(), Failure> {
        let epoch = self.epoch();
        let primary = self.primary(addr.page())?;
        let conn = self.read_conn(primary, epoch)?;
        let mut c = lock(&conn);
        let base = u64::from(primary.page.0) * c.page_size_bytes + addr.offset();
        let entry_at = art_entry_at(primary.page.0);
        let mut done = 0usize;
        let mut entry = [0u8; ART_ENTRY];
        while done < out.len() {
            let n = (out.len() - done).min(READ_CHUNK_BYTES);
            let NodeConn {
                ep,
                pages,
                art,
                buf,
                broken,
                ..
            } = &mut *c;
            // The data, then the page's ART entry that proves it (see `art_holds`).
            let ops = [
                OneSided {
                    local_offset: 0,
                    remote: pages,
                    remote_offset: base + done as u64,
                    len: n,
                },
                OneSided {
                    local_offset: READ_CHUNK_BYTES,
                    remote: art,
                    remote_offset: entry_at,
                    len: ART_ENTRY,
                },
            ];
            let timeout = self.inner.config.request_timeout;
            if let Err(e) = ep.one_sided_batch(Opcode::Read, buf, &ops, timeout) {
                *broken = true;
                drop(c);
                self.drop_node(primary.node);
                return Err(Failure::Transport(format!(
                    "READ from {}: {e}",
                    primary.node
                )));
            }
            let copied = buf
                .read_at(0, &mut out[done..done + n])
                .and_then(|()| buf.read_at(READ_CHUNK_BYTES, &mut entry));
            copied.map_err(|e| Failure::Final(SpaceError::Unavailable(e.to_string())))?;
            // A stale mapping: looked up again (a freed page's lookup is refused).
            art_holds(&entry, primary.page, addr.page()).map_err(Failure::Moved)?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `addr` (within one page); returns once durable on every live
    /// replica. Writes longer than one message are several updates, each atomic per
    /// aligned 8-byte word.
    pub fn write(&self, addr: GlobalAddr, data: &[u8]) -> Result<(), SpaceError> {
        self.check(addr, data.len())?;
        for (i, chunk) in data.chunks(MAX_UPDATE_BYTES).enumerate() {
            let offset = addr.offset() + (i * MAX_UPDATE_BYTES) as u64;
            self.update(addr.page(), offset, UpdateOp::Write(chunk.to_vec()))?;
        }
        Ok(())
    }

    /// Stores `new` in the aligned 8-byte word at `addr` if it holds `expected`; returns
    /// the word found (equal to `expected` iff the swap happened).
    pub fn compare_and_swap(
        &self,
        addr: GlobalAddr,
        expected: u64,
        new: u64,
    ) -> Result<u64, SpaceError> {
        self.check(addr, 8)?;
        self.update(
            addr.page(),
            addr.offset(),
            UpdateOp::CompareAndSwap { expected, new },
        )
    }

    /// Adds `delta` (wrapping) to the aligned 8-byte word at `addr`; returns the old word.
    pub fn fetch_add(&self, addr: GlobalAddr, delta: u64) -> Result<u64, SpaceError> {
        self.check(addr, 8)?;
        self.update(addr.page(), addr.offset(), UpdateOp::FetchAdd { delta })
    }

    fn check(&self, addr: GlobalAddr, len: usize) -> Result<(), SpaceError> {
        let page_size = self.page_size_bytes()?;
        if addr
            .offset()
            .checked_add(len as u64)
            .is_none_or(|end| end > page_size)
        {
            return Err(SpaceError::BadAddress(format!(
                "{len} bytes at offset {} cross the end of a {page_size}-byte page",
                addr.offset()
            )));
        }
        Ok(())
    }

    fn update(&self, page_id: PageId, offset: u64, op: UpdateOp) -> Result<u64, SpaceError> {
        let deadline = Instant::now() + self.inner.config.op_timeout;
        let offset = u32::try_from(offset)
            .map_err(|_| SpaceError::BadAddress(format!("offset {offset}")))?;
        self.forget_blocks(page_id, u64::from(offset), &op);
        loop {
            let primary = match self.primary(page_id) {
                Ok(p) => p,
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Moved(e) | Failure::Transport(e)) => {
                    if Instant::now() >= deadline {
                        return Err(SpaceError::Unavailable(e));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            let body = Body::Update {
                page_id,
                offset,
                op: op.clone(),
            };
            match self.node_call(primary.node, body, self.inner.config.request_timeout) {
                Ok(Body::UpdateAck { old }) => return Ok(old),
                Ok(other) => return Err(unexpected("Update", &other)),
                Err(Failure::Final(
                    e @ SpaceError::Refused {
                        code: ErrorCode::PageFreed,
                        ..
                    },
                )) => {
                    self.invalidate(page_id);
                    if let Some(c) = &self.inner.coherence {
                        c.drop_page(page_id);
                    }
                    return Err(e);
                }
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Transport(e)) => return Err(SpaceError::Unknown(e)),
                Err(Failure::Moved(e)) => {
                    // Nothing was applied: the mapping changed under us.
                    self.invalidate(page_id);
                    if Instant::now() >= deadline {
                        return Err(SpaceError::Unavailable(e));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// C3: this handle's own cached copies of the blocks an update touches go before it is
    /// sent (the primary invalidates the others').
    fn forget_blocks(&self, page_id: PageId, offset: u64, op: &UpdateOp) {
        if let Some(c) = &self.inner.coherence {
            let len = match op {
                UpdateOp::Write(d) => d.len() as u64,
                _ => 8,
            };
            c.forget(page_id, offset, len);
        }
    }

    fn primary(&self, page_id: PageId) -> Result<Replica, Failure> {
        match self.lookup(page_id) {
            Ok(m) => m.replicas.first().copied().ok_or_else(|| {
                Failure::Final(SpaceError::Refused {
                    code: ErrorCode::PageLost,
                    detail: format!("page {} has no replica", page_id.0),
                })
            }),
            Err(SpaceError::Unavailable(e)) => Err(Failure::Transport(e)),
            Err(e) => Err(Failure::Final(e)),
        }
    }

    /// Sends one request to a data node and waits for its answer.
    fn node_call(&self, node: NodeId, body: Body, timeout: Duration) -> Result<Body, Failure> {
        let conn = self.node(node).map_err(|e| match e {
            SpaceError::Unavailable(e) => Failure::Moved(e),
            other => Failure::Final(other),
        })?;
        let wire_id = self.inner.next_wire_id.fetch_add(1, Ordering::Relaxed);
        let msg = Message::new(self.epoch(), CLIENT_SENDER, wire_id, body).encode();
        let answer = {
            let mut c = lock(&conn);
            if c.broken {
                // Nothing was sent on it: ask again on a new connection.
                drop(c);
                self.drop_node(node);
                return Err(Failure::Moved(format!("connection to {node} lost")));
            }
            let answer = c.ep.call(&msg, timeout);
            c.broken = answer.is_err();
            answer
        };
        fault::point("client.update-sent");
        let payload = match answer {
            Ok(p) => p,
            Err(e) => {
                self.drop_node(node);
                return Err(Failure::Transport(format!("{node}: {e}")));
            }
        };
        let m = Message::decode(&payload)
            .map_err(|e| Failure::Transport(format!("{node} answered: {e}")))?;
        self.adopt(m.header.epoch);
        match m.body {
            Body::Error {
                code: ErrorCode::NotPrimary | ErrorCode::StaleEpoch,
                detail,
            } => Err(Failure::Moved(detail)),
            Body::Error { code, detail } => {
                Err(Failure::Final(SpaceError::Refused { code, detail }))
            }
            other => Ok(other),
        }
    }

    /// A newer epoch: every cached mapping is from an older one and is looked up again.
    fn adopt(&self, epoch: Epoch) {
        if self.inner.epoch.fetch_max(epoch.0, Ordering::AcqRel) < epoch.0 {
            self.inner.cache.drop_older_than(epoch);
            // C4: a page may have a new primary, whose directory knows no sharer.
            if let Some(c) = &self.inner.coherence {
                c.drop_older_than(epoch);
            }
        }
    }

    fn drop_node(&self, node: NodeId) {
        self.inner
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
    }

    /// The connection to `node`, made on first use.
    fn node(&self, node: NodeId) -> Result<Arc<Mutex<NodeConn>>, SpaceError> {
        if let Some(c) = self
            .inner
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
        {
            return Ok(Arc::clone(c));
        }
        let addr = self.node_addr(node)?;
        let conn = self.connect_node(node, addr)?;
        self.inner
            .page_size_bytes
            .store(conn.page_size_bytes, Ordering::Release);
        let conn = Arc::new(Mutex::new(conn));
        self.inner
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, Arc::clone(&conn));
        Ok(conn)
    }

    /// Where `node` serves the data path (the monitor's node list, asked again if it is
    /// not known).
    fn node_addr(&self, node: NodeId) -> Result<SocketAddr, SpaceError> {
        let info = self
            .inner
            .addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied();
        let info = match info {
            Some(i) => i,
            None => self
                .nodes()?
                .into_iter()
                .find(|n| n.node == node)
                .ok_or_else(|| SpaceError::Unavailable(format!("{node} is not live")))?,
        };
        node_addrs(&[info])
            .remove(&node)
            .ok_or_else(|| SpaceError::Unavailable(format!("{node} serves no data path")))
    }

    fn connect_node(&self, node: NodeId, addr: SocketAddr) -> Result<NodeConn, SpaceError> {
        let unavailable =
            |e: pmgas_verbs::Error| SpaceError::Unavailable(format!("{node} at {addr}: {e}"));
        let route = Connector::new(self.inner.config.bind, addr)
            .resolve()
            .map_err(unavailable)?;
        let pd = ProtectionDomain::new(route.context()).map_err(unavailable)?;
        let mut ep = route
            .connect_endpoint(&pd, &ConnectionConfig::default(), &[], data_msg_config())
            .map_err(unavailable)?;
        let wire_id = self.inner.next_wire_id.fetch_add(1, Ordering::Relaxed);
        let hello = Message::new(self.epoch(), CLIENT_SENDER, wire_id, Body::DataHello).encode();
        let answer = ep
            .call(&hello, self.inner.config.request_timeout)
            .map_err(unavailable)?;
        let answer = Message::decode(&answer);
        // A node (re)connected to says which epoch it is in: a node that came back after
        // being declared dead is in a newer one than this handle's cached mappings, which
        // may still name it (its stale replicas must not be read).
        if let Ok(m) = &answer {
            self.adopt(m.header.epoch);
        }
        match answer.map(|m| m.body) {
            Ok(Body::DataHelloAck {
                page_size_bytes,
                data_addr,
                art_addr,
                rkey,
                art_rkey,
                page_count,
                version_rkey,
                version_addr,
            }) => {
                let buf = AlignedBuf::zeroed(READ_CHUNK_BYTES + ART_SLOTS * ART_ENTRY)
                    .map_err(unavailable)?;
                let buf = pd.register(buf, Access::LOCAL).map_err(unavailable)?;
                Ok(NodeConn {
                    broken: false,
                    ep,
                    pages: RemoteRegion {
                        addr: data_addr,
                        len: u64::from(page_count) * page_size_bytes,
                        rkey,
                    },
                    art: RemoteRegion {
                        addr: art_addr,
                        len: art_entry_at(page_count),
                        rkey: art_rkey,
                    },
                    page_size_bytes,
                    versions: RemoteRegion {
                        addr: version_addr,
                        len: u64::from(page_count) * 8,
                        rkey: version_rkey,
                    },
                    buf,
                })
            }
            other => Err(SpaceError::Unavailable(format!(
                "{node} answered DataHello with {other:?}"
            ))),
        }
    }

    /// One request to the active monitor; a lost connection is made again (finding the
    /// monitor anew in ZooKeeper) until the operation timeout.
    fn monitor_call(&self, body: Body) -> Result<Body, SpaceError> {
        self.monitor_call_counting(&body, &mut 0)
    }

    /// [`Self::monitor_call`], counting in `attempts` how many times the request was tried.
    fn monitor_call_counting(&self, body: &Body, attempts: &mut u32) -> Result<Body, SpaceError> {
        let deadline = Instant::now() + self.inner.config.op_timeout;
        let mut m = self.inner.monitor.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            *attempts += 1;
            let attempt = self.monitor_once(&mut m, body);
            match attempt {
                Ok(b) => return Ok(b),
                Err(e) if Instant::now() >= deadline => return Err(SpaceError::Unavailable(e)),
                Err(e) => {
                    tracing::debug!(error = %e, "monitor request failed; looking for the monitor again");
                    m.ep = None;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn monitor_once(&self, m: &mut Monitor, body: &Body) -> Result<Body, String> {
        if m.ep.is_none() {
            let addr = m.finder.find()?;
            let route = Connector::new(self.inner.config.bind, addr)
                .resolve()
                .map_err(|e| e.to_string())?;
            let pd = match m.pd.take() {
                Some(pd) if pd.context().same_device(route.context()) => pd,
                _ => ProtectionDomain::new(route.context()).map_err(|e| e.to_string())?,
            };
            let ep = route
                .connect_endpoint(&pd, &ConnectionConfig::default(), &[], MsgConfig::default())
                .map_err(|e| format!("monitor at {addr}: {e}"));
            m.pd = Some(pd);
            m.ep = Some(ep?);
        }
        let ep = m.ep.as_mut().ok_or("no monitor connection")?;
        let wire_id = self.inner.next_wire_id.fetch_add(1, Ordering::Relaxed);
        let msg = Message::new(self.epoch(), CLIENT_SENDER, wire_id, body.clone()).encode();
        let payload = ep
            .call(&msg, self.inner.config.request_timeout)
            .map_err(|e| e.to_string())?;
        let answer = Message::decode(&payload).map_err(|e| e.to_string())?;
        self.adopt(answer.header.epoch);
        match answer.body {
            // Asked again (of the monitor found anew): a deposed monitor, or one that could
            // not answer now.
            Body::Error {
                code: code @ (ErrorCode::NotLeader | ErrorCode::Internal),
                detail,
            } => Err(format!("{code:?}: {detail}")),
            // Every other answer, refusals included, is the caller's.
            other => Ok(other),
        }
    }
}

/// One operation of a [`Batch`].
#[derive(Debug, Clone)]
enum BatchOp {
    Read { addr: GlobalAddr, len: usize },
    Update { addr: GlobalAddr, op: UpdateOp },
}

/// What one operation of a [`Batch`] returned, in the order they were added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchResult {
    /// The bytes a read returned.
    Read(Vec<u8>),
    /// An update's old word (0 for a write).
    Updated(u64),
}

/// Operations posted together and waited for together ([`Batch::quiet`]), as OpenSHMEM's
/// `_nbi` calls and `shmem_quiet`: reads of one node go out as back-to-back one-sided
/// READs on its connection, updates of one node as pipelined requests (up to the
/// connection's request limit in flight). Operations on different addresses are not
/// ordered against each other; two updates of one page are ordered by its primary in the
/// order they arrive there.
pub struct Batch<'a> {
    space: &'a Space,
    ops: Vec<BatchOp>,
}

impl Batch<'_> {
    /// Adds a read of `len` bytes at `addr` (within a page, at most 64 KiB).
    pub fn read(&mut self, addr: GlobalAddr, len: usize) -> &mut Self {
        self.ops.push(BatchOp::Read { addr, len });
        self
    }

    /// Adds a write of at most [`MAX_UPDATE_BYTES`] bytes.
    pub fn write(&mut self, addr: GlobalAddr, data: &[u8]) -> &mut Self {
        let op = UpdateOp::Write(data.to_vec());
        self.ops.push(BatchOp::Update { addr, op });
        self
    }

    pub fn compare_and_swap(&mut self, addr: GlobalAddr, expected: u64, new: u64) -> &mut Self {
        let op = UpdateOp::CompareAndSwap { expected, new };
        self.ops.push(BatchOp::Update { addr, op });
        self
    }

    pub fn fetch_add(&mut self, addr: GlobalAddr, delta: u64) -> &mut Self {
        let op = UpdateOp::FetchAdd { delta };
        self.ops.push(BatchOp::Update { addr, op });
        self
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Carries out every operation and waits until all are complete (updates durable on
    /// every live replica). One result per operation, in order. An operation that failed
    /// does not stop the others.
    pub fn quiet(self) -> Vec<Result<BatchResult, SpaceError>> {
        let mut results: Vec<Option<Result<BatchResult, SpaceError>>> = vec![None; self.ops.len()];
        let mut reads: HashMap<NodeId, Vec<(usize, u64, usize)>> = HashMap::new();
        let mut updates: HashMap<NodeId, Vec<usize>> = HashMap::new();
        for (i, op) in self.ops.iter().enumerate() {
            let (addr, len) = match op {
                BatchOp::Read { addr, len } => (*addr, *len),
                BatchOp::Update {
                    addr,
                    op: UpdateOp::Write(d),
                } => (*addr, d.len()),
                BatchOp::Update { addr, .. } => (*addr, 8),
            };
            let placed = self.space.check(addr, len).and_then(|()| {
                self.space.primary(addr.page()).map_err(|f| match f {
                    Failure::Final(e) => e,
                    Failure::Moved(e) | Failure::Transport(e) => SpaceError::Unavailable(e),
                })
            });
            match (placed, op) {
                (Err(e), _) => results[i] = Some(Err(e)),
                (Ok(_), BatchOp::Read { len, .. }) if *len > READ_CHUNK_BYTES => {
                    results[i] = Some(Err(SpaceError::BadAddress(format!(
                        "a batched read of {len} bytes (at most {READ_CHUNK_BYTES})"
                    ))))
                }
                (Ok(p), BatchOp::Read { len, .. }) => {
                    reads
                        .entry(p.node)
                        .or_default()
                        .push((i, u64::from(p.page.0), *len));
                }
                (Ok(p), BatchOp::Update { .. }) => updates.entry(p.node).or_default().push(i),
            }
        }
        for (node, list) in reads {
            self.reads_on(node, &list, &mut results);
        }
        for (node, list) in updates {
            self.updates_on(node, &list, &mut results);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(SpaceError::Unavailable("not carried out".into()))))
            .collect()
    }

    /// The reads of one node: as many as fit the connection's READ buffer go out back to
    /// back, then the next group. A read that fails falls back to [`Space::read`] (which
    /// retries across a failover).
    fn reads_on(
        &self,
        node: NodeId,
        list: &[(usize, u64, usize)],
        results: &mut [Option<Result<BatchResult, SpaceError>>],
    ) {
        let addr_of = |i: usize| match &self.ops[i] {
            BatchOp::Read { addr, .. } | BatchOp::Update { addr, .. } => *addr,
        };
        let conn = self.space.node(node);
        let mut group: Vec<(usize, u64, usize)> = vec![];
        let flush = |group: &mut Vec<(usize, u64, usize)>, results: &mut [Option<_>]| {
            if group.is_empty() {
                return;
            }
            // The pages the group reads, each proven by its ART entry READ after the data.
            let mut checked: Vec<(u64, PageId)> = group
                .iter()
                .map(|&(i, page, _)| (page, addr_of(i).page()))
                .collect();
            checked.sort_unstable();
            checked.dedup();
            let done = conn.as_ref().ok().and_then(|conn| {
                let mut c = lock(conn);
                if c.broken {
                    return None;
                }
                let NodeConn {
                    ep,
                    pages,
                    art,
                    buf,
                    page_size_bytes,
                    broken,
                    ..
                } = &mut *c;
                let mut at = 0usize;
                let mut ops: Vec<OneSided<'_>> = group
                    .iter()
                    .map(|&(i, page, len)| {
                        let local_offset = at;
                        at += len;
                        OneSided {
                            local_offset,
                            remote: &*pages,
                            remote_offset: page * *page_size_bytes + addr_of(i).offset(),
                            len,
                        }
                    })
                    .collect();
                ops.extend(checked.iter().enumerate().map(|(k, &(page, _))| OneSided {
                    local_offset: READ_CHUNK_BYTES + k * ART_ENTRY,
                    remote: &*art,
                    remote_offset: art_entry_at(page as u32),
                    len: ART_ENTRY,
                }));
                let timeout = self.space.inner.config.request_timeout;
                let sent = ep.one_sided_batch(Opcode::Read, buf, &ops, timeout);
                *broken = sent.is_err();
                sent.ok()?;
                let mut out = vec![];
                for (&(_, _, len), op) in group.iter().zip(&ops) {
                    let mut bytes = vec![0u8; len];
                    buf.read_at(op.local_offset, &mut bytes).ok()?;
                    out.push(bytes);
                }
                let mut held = vec![];
                for (k, &(page, page_id)) in checked.iter().enumerate() {
                    let mut entry = [0u8; ART_ENTRY];
                    buf.read_at(READ_CHUNK_BYTES + k * ART_ENTRY, &mut entry)
                        .ok()?;
                    if art_holds(&entry, PageIndex(page as u32), page_id).is_ok() {
                        held.push(page_id);
                    }
                }
                Some((out, held))
            });
            let read_again = |i: usize, len: usize| {
                let mut bytes = vec![0u8; len];
                self.space
                    .read(addr_of(i), &mut bytes)
                    .map(|()| BatchResult::Read(bytes))
            };
            match done {
                Some((out, held)) => {
                    for (&(i, _, len), bytes) in group.iter().zip(out) {
                        // A page that failed its check: read again (with a fresh mapping).
                        results[i] = Some(if held.contains(&addr_of(i).page()) {
                            Ok(BatchResult::Read(bytes))
                        } else {
                            self.space.invalidate(addr_of(i).page());
                            read_again(i, len)
                        });
                    }
                }
                None => {
                    self.space.drop_node(node);
                    for &(i, _, len) in group.iter() {
                        results[i] = Some(read_again(i, len));
                    }
                }
            }
            group.clear();
        };
        let mut used = 0usize;
        let mut pages: Vec<u64> = vec![];
        for &(i, page, len) in list {
            if !pages.contains(&page) {
                pages.push(page);
            }
            if used + len > READ_CHUNK_BYTES || pages.len() > ART_SLOTS {
                flush(&mut group, results);
                used = 0;
                pages.clear();
                pages.push(page);
            }
            group.push((i, page, len));
            used += len;
        }
        flush(&mut group, results);
    }

    /// The updates of one node, pipelined: up to the connection's request limit in flight.
    /// Refusals that applied nothing go through [`Space::update`] again, one by one; an
    /// update whose answer is lost is [`SpaceError::Unknown`].
    fn updates_on(
        &self,
        node: NodeId,
        list: &[usize],
        results: &mut [Option<Result<BatchResult, SpaceError>>],
    ) {
        let space = self.space;
        let mut again: Vec<usize> = vec![];
        match space.node(node) {
            Err(_) => again.extend_from_slice(list),
            Ok(conn) => {
                let mut c = lock(&conn);
                if c.broken {
                    // Nothing was sent on it: every update goes again, one by one.
                    drop(c);
                    space.drop_node(node);
                    return self.retry(list, results);
                }
                let timeout = space.inner.config.request_timeout;
                let mut next = 0usize;
                let mut in_flight: HashMap<u64, usize> = HashMap::new();
                let mut broken: Option<String> = None;
                while (next < list.len() || !in_flight.is_empty()) && broken.is_none() {
                    while next < list.len() && in_flight.len() < c.ep.request_limit() {
                        let i = list[next];
                        let BatchOp::Update { addr, op } = &self.ops[i] else {
                            next += 1;
                            continue;
                        };
                        let Ok(offset) = u32::try_from(addr.offset()) else {
                            results[i] = Some(Err(SpaceError::BadAddress(format!("{addr:?}"))));
                            next += 1;
                            continue;
                        };
                        space.forget_blocks(addr.page(), addr.offset(), op);
                        let body = Body::Update {
                            page_id: addr.page(),
                            offset,
                            op: op.clone(),
                        };
                        let wire_id = space.inner.next_wire_id.fetch_add(1, Ordering::Relaxed);
                        let msg =
                            Message::new(space.epoch(), CLIENT_SENDER, wire_id, body).encode();
                        match c.ep.request(&msg, timeout) {
                            Ok(id) => {
                                in_flight.insert(id, i);
                                next += 1;
                            }
                            Err(e) => {
                                broken = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    match c.ep.poll() {
                        Ok(Some(pmgas_verbs::Incoming::Response {
                            request_id,
                            payload,
                        })) => {
                            let Some(i) = in_flight.remove(&request_id) else {
                                continue;
                            };
                            match Message::decode(&payload) {
                                Ok(m) => {
                                    space.adopt(m.header.epoch);
                                    match m.body {
                                        Body::UpdateAck { old } => {
                                            results[i] = Some(Ok(BatchResult::Updated(old)))
                                        }
                                        Body::Error {
                                            code: ErrorCode::NotPrimary | ErrorCode::StaleEpoch,
                                            ..
                                        } => again.push(i),
                                        other => {
                                            results[i] = Some(Err(unexpected("Update", &other)))
                                        }
                                    }
                                }
                                Err(e) => {
                                    results[i] = Some(Err(SpaceError::Unknown(e.to_string())))
                                }
                            }
                        }
                        Ok(Some(pmgas_verbs::Incoming::TimedOut { request_id })) => {
                            if let Some(i) = in_flight.remove(&request_id) {
                                results[i] = Some(Err(SpaceError::Unknown(format!(
                                    "{node} did not answer within {timeout:?}"
                                ))));
                            }
                        }
                        Ok(_) => {}
                        Err(e) => broken = Some(e.to_string()),
                    }
                }
                if let Some(why) = broken {
                    c.broken = true;
                    drop(c);
                    space.drop_node(node);
                    for (_, i) in in_flight.drain() {
                        results[i] = Some(Err(SpaceError::Unknown(format!("{node}: {why}"))));
                    }
                    again.extend_from_slice(&list[next..]);
                }
            }
        }
        self.retry(&again, results);
    }

    /// Updates that were refused without being applied, or never sent: one by one through
    /// [`Space::update`] (which looks the mapping up again).
    fn retry(&self, again: &[usize], results: &mut [Option<Result<BatchResult, SpaceError>>]) {
        for &i in again {
            if let BatchOp::Update { addr, op } = &self.ops[i] {
                results[i] = Some(
                    self.space
                        .update(addr.page(), addr.offset(), op.clone())
                        .map(BatchResult::Updated),
                );
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unexpected(what: &str, body: &Body) -> SpaceError {
    match body {
        Body::Error { code, detail } => SpaceError::Refused {
            code: *code,
            detail: detail.clone(),
        },
        other => SpaceError::Refused {
            code: ErrorCode::Malformed,
            detail: format!("unexpected answer to {what}: {}", other.name()),
        },
    }
}
