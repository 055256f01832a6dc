//! The monitor's RDMA shell: accepts data nodes over rdma_cm, speaks the wire protocol
//! over the verbs message layer, feeds the [`Coordinator`] and carries out its actions,
//! persisting mappings to ZooKeeper in group commits (every Persist action produced by
//! one pass of the loop goes into one write).
//!
//! One thread runs the whole loop; ZooKeeper writes block it (a write takes about a
//! millisecond; requests arriving meanwhile join the next group commit).
//!
//! Where things live:
//! - [`serve`] restores the GAT, the epoch and the away/dead nodes from ZooKeeper, starts
//!   the GAT writer thread (`persister`), binds the listener and announces this monitor.
//! - `Monitor` owns the loop's state: the in-memory GAT (`mappings`: what ZooKeeper holds,
//!   freed pages as tombstones), the coordinator, the frees in progress (`freer`, see
//!   [`crate::freeing`]), the node connections (`peers`, the joined ones indexed by
//!   `by_node`), AllocPage requests awaiting the coordinator's answer (`replies`), mappings
//!   being written (`writing`), away and dead nodes (`failures`), and whether it was
//!   `deposed`.
//! - `Monitor::run_loop` runs passes of these steps, in this order:
//!   1. `stop_if_session_lost`: a monitor without its ZooKeeper session no longer leads.
//!   2. `accept_new_connection`: an rdma_cm connect request becomes a peer.
//!   3. `collect_persisted`: the writer's reports; stored mappings and tombstones enter the
//!      in-memory GAT.
//!   4. `poll_peers`: each connection's messages. Requests go to `handle_peer_request`
//!      (the wire requests in `handle_request`, one arm each; a join is recorded in
//!      ZooKeeper there), responses to `handle_peer_response` (a node's reconciliation
//!      completes after the one-sided ART check, `check_art`; two-phase answers go to the
//!      coordinator); timed-out reconciliation requests start it over.
//!   5. `tick`, every 10 ms: gone and silent connections dropped, heartbeats, and
//!      `declare_overdue_node` (`declare_dead`, in a new epoch).
//!   6. `drive_reconciliations` sends joined nodes their GAT entries (the tombstones' first);
//!      `drive_frees` tells replicas of freed pages to free them (`free_page` takes the
//!      request); `spin_or_sleep`.
//!   7. `run_coordinator`: the coordinator's actions, each in `carry_out`; the pass's
//!      Persist actions go to the writer thread as one group commit.
//!   8. `stop_if_deposed`: a fenced monitor stops once its transactions have finished.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pmgas_layout::gat::Mapping;
use pmgas_layout::wire::{Body, ErrorCode, MAX_RECONCILE_ENTRIES, Message};
use pmgas_layout::{ClusterId, Epoch, NodeId, PageId, PageIndex};
use pmgas_verbs::fault;
use pmgas_verbs::msg::{Endpoint, Incoming, MsgConfig};
use pmgas_verbs::wait::Notifier;
use pmgas_verbs::{ConnectionConfig, Listener, ProtectionDomain, RemoteRegion};

mod rereplicate;

use crate::coordinator::{Action, Coordinator, Input, NodeView, Timeouts};
use crate::freeing::{FreeAction, Freer, NodeState};
use crate::store::{GatWriter, Store, StoreError};

/// The monitor's own sender id on the wire.
pub const MONITOR_SENDER: NodeId = NodeId(u32::MAX);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on one ZooKeeper request (requests issued while disconnected wait otherwise).
const ZK_TIMEOUT: Duration = Duration::from_secs(2);
const UNKNOWN_GIVE_UP: Duration = Duration::from_secs(30);

pub struct ServerConfig {
    pub listen: SocketAddr,
    pub cluster_id: ClusterId,
    pub page_size_bytes: u64,
    /// Most mappings in one ZooKeeper write (`usize::MAX`: all that are ready).
    pub max_batch: usize,
    /// A node disconnected this long is declared dead (see `Monitor::declare_dead`).
    pub node_timeout: Duration,
    /// A joined node silent this long (heartbeats unanswered) is disconnected.
    pub heartbeat_timeout: Duration,
    /// Re-replication: pages copied at once, and the copy bandwidth in MB/s (0: no
    /// limit).
    pub rereplicate_concurrency: usize,
    pub rereplicate_mb_s: u32,
}

/// What an outstanding monitor → node request was for.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Prepare(u64),
    Reconcile {
        last: bool,
    },
    Commit,
    Abort,
    EpochNotice,
    Heartbeat,
    /// FreeReplicas for one freed page ([`crate::freeing`]'s attempt).
    Free {
        page_id: PageId,
        attempt: u64,
    },
    /// A re-replication's request (`rereplicate`).
    Rere(rereplicate::ReSent),
}

/// A client waiting for its FreePage's answer: the connection (by serial: indices move),
/// the msg-layer id to answer and the wire request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiter {
    serial: u64,
    msg_id: u64,
    rid: u64,
}

struct Peer {
    ep: Endpoint,
    /// Names the connection while it lasts (its index in `peers` moves).
    serial: u64,
    node: Option<NodeId>,
    /// Msg-layer request id -> what we asked.
    sent: HashMap<u64, Sent>,
    /// Set from the join until the node has reconciled its ART with the GAT; only then
    /// does it take part in transactions.
    reconcile: Option<Reconciling>,
    /// The node's ART as it exports it (read-only), from its Join: (region, page count).
    art: Option<(RemoteRegion, u32)>,
    /// Where the node serves the data path (from its Join; clients ask [`Body::NodesQuery`]).
    data_addr: Option<([u8; 4], u16)>,
    /// When the node last answered or asked anything, and when it was last sent a
    /// heartbeat.
    heard: Instant,
    pinged: Instant,
}

/// How often an idle joined node is sent a heartbeat.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);

/// The GAT's replicas on `node`: (its page, the page id), of live pages (`freed` false) or
/// of freed pages' tombstones (`freed` true).
fn replicas_on(
    mappings: &HashMap<PageId, Mapping>,
    node: NodeId,
    freed: bool,
) -> impl Iterator<Item = (PageIndex, PageId)> + '_ {
    mappings
        .values()
        .filter(move |m| m.freed == freed)
        .flat_map(move |m| {
            m.replicas
                .iter()
                .filter(move |r| r.node == node)
                .map(|r| (r.page, m.page_id))
        })
}

/// What a joining node's reconciliation sends it, in order: FreeReplicas for the replicas
/// on it of freed pages (a node that was away when the page was freed, or crashed while
/// freeing it) and for the replicas its declaration as dead dropped from the GAT (`dropped`:
/// it came back; the pages live on elsewhere), then Reconcile with its live replicas, the
/// last one flagged `last`. A dropped replica of a page that has no replica left (lost) is
/// kept, not freed: it is the last copy of the bytes.
fn reconcile_messages(
    mappings: &HashMap<PageId, Mapping>,
    node: NodeId,
    dropped: Option<&std::collections::BTreeSet<(PageIndex, PageId)>>,
) -> Vec<Body> {
    let sorted = |freed| {
        let mut v: Vec<(PageIndex, PageId)> = replicas_on(mappings, node, freed).collect();
        v.sort_unstable();
        v
    };
    let mut to_free = sorted(true);
    let mut kept = vec![];
    for &(page, page_id) in dropped.into_iter().flatten() {
        match mappings.get(&page_id) {
            Some(m) if !m.freed && m.replicas.is_empty() => kept.push(page_id.0),
            _ => to_free.push((page, page_id)),
        }
    }
    to_free.sort_unstable();
    to_free.dedup();
    if let Some(d) = dropped {
        tracing::info!(
            %node,
            dropped = d.len(),
            kept_lost = kept.len(),
            first_kept = ?&kept[..kept.len().min(8)],
            "a node declared dead came back: it frees the replicas its declaration dropped"
        );
    }
    let mut messages: Vec<Body> = to_free
        .chunks(MAX_RECONCILE_ENTRIES)
        .map(|c| Body::FreeReplicas {
            entries: c.to_vec(),
        })
        .collect();
    let live = sorted(false);
    let chunks: Vec<&[(PageIndex, PageId)]> = if live.is_empty() {
        vec![&[]]
    } else {
        live.chunks(MAX_RECONCILE_ENTRIES).collect()
    };
    let n = chunks.len();
    messages.extend(
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| Body::Reconcile {
                last: i + 1 == n,
                entries: c.to_vec(),
            }),
    );
    messages
}

/// Most bytes of ART one READ fetches.
const ART_READ_CHUNK: usize = 1 << 20;

/// What the one-sided read of a node's ART found, against the GAT.
#[derive(Debug, Default)]
struct ArtCheck {
    entries: u32,
    /// GAT replicas on the node that are ALLOCATED there under their page id.
    confirmed: u32,
    /// GAT replicas on the node that are not (any state, or another page id).
    mismatched: u32,
    unknown_allocated: u32,
    preallocated: u32,
    corrupt: u32,
    first_mismatches: Vec<String>,
}

/// Reads the whole ART of a node that has just reconciled, with one-sided RDMA READs over
/// its message connection (the node exports it read-only), and checks it against the
/// GAT: every replica the GAT places on the node must be ALLOCATED there with its page id.
/// A READ the node's region refuses fails the connection (the caller drops it).
fn check_art(
    ep: &mut Endpoint,
    node: NodeId,
    region: &RemoteRegion,
    page_count: u32,
    mappings: &HashMap<PageId, Mapping>,
) -> Result<ArtCheck, String> {
    use pmgas_layout::pool::{ART_ENTRY_BYTES, ART_OFFSET};
    let total = page_count as usize * ART_ENTRY_BYTES as usize;
    let chunk = total.clamp(ART_ENTRY_BYTES as usize, ART_READ_CHUNK);
    let local = ep
        .connection()
        .pd()
        .register(
            pmgas_verbs::AlignedBuf::zeroed(chunk).map_err(|e| e.to_string())?,
            pmgas_verbs::Access::LOCAL,
        )
        .map_err(|e| e.to_string())?;
    let expected: HashMap<PageIndex, PageId> = replicas_on(mappings, node, false).collect();
    let mut check = ArtCheck::default();
    let mut bytes = vec![0u8; chunk];
    let mut offset = 0usize;
    while offset < total {
        let n = chunk.min(total - offset);
        ep.one_sided(
            pmgas_verbs::Opcode::Read,
            &local,
            0,
            (region, ART_OFFSET + offset as u64),
            n,
            Duration::from_secs(5),
        )
        .map_err(|e| format!("reading the ART of {node}: {e}"))?;
        local
            .read_at(0, &mut bytes[..n])
            .map_err(|e| e.to_string())?;
        for (i, entry) in bytes[..n]
            .chunks_exact(ART_ENTRY_BYTES as usize)
            .enumerate()
        {
            let page = PageIndex(((offset / ART_ENTRY_BYTES as usize) + i) as u32);
            check.entries += 1;
            let want = expected.get(&page).copied();
            match pmgas_layout::ArtRecord::decode_entry(entry, page) {
                Err(_) => check.corrupt += 1,
                Ok(rec) => {
                    let state = rec.state;
                    match (want, state) {
                        (Some(id), _) if rec.holds(id) => check.confirmed += 1,
                        (Some(id), _) => {
                            check.mismatched += 1;
                            if check.first_mismatches.len() < 8 {
                                check.first_mismatches.push(format!(
                                    "page {} (GAT: id {}): {state:?} id {}",
                                    page.0, id.0, rec.page_id.0
                                ));
                            }
                        }
                        (None, pmgas_layout::PageState::Allocated) => check.unknown_allocated += 1,
                        (None, pmgas_layout::PageState::Preallocated) => check.preallocated += 1,
                        (None, _) => {}
                    }
                }
            }
        }
        offset += n;
    }
    Ok(check)
}

/// A joined node's reconciliation: the GAT's entries for it, sent in FreeReplicas messages
/// (freed pages' replicas on it) and then Reconcile messages (its live replicas).
struct Reconciling {
    view: NodeView,
    /// Filled when sending starts: not while a GAT write involving the node is in flight,
    /// whose outcome the list must include.
    messages: Option<Vec<Body>>,
    next: usize,
    sent_last: bool,
    started: Instant,
}

pub fn serve(
    config: &ServerConfig,
    store: &Store,
    rt: &tokio::runtime::Runtime,
) -> Result<(), String> {
    // A short session (a fast takeover) also means a short per-request connection
    // timeout in the client (2/5 of it): a ZooKeeper slow to answer right after the
    // leader change loses the connection, not the session. Reads and the writer's open
    // are asked again; a fenced open is final.
    let gat = with_retries(|| rt.block_on(store.load_gat()))?;
    let epoch = with_retries(|| rt.block_on(store.epoch()))?;
    // Nodes listed live must rejoin within the node timeout, counted from now.
    let listed = with_retries(|| rt.block_on(store.live_nodes()))?;
    let missing: BTreeMap<NodeId, Instant> = listed
        .iter()
        .filter_map(|n| n.strip_prefix("node")?.parse().ok())
        .map(|n| (NodeId(n), Instant::now()))
        .collect();
    if gat.dropped_replicas > 0 {
        tracing::warn!(
            dead = ?gat.dead.0.keys().collect::<Vec<_>>(),
            dropped = gat.dropped_replicas,
            "replicas on nodes declared dead are not in the GAT's view"
        );
    }
    let short = gat.short;
    let dead = Failures {
        dead: gat.dead,
        missing,
        dropped: gat.dropped,
    };
    let mappings: HashMap<PageId, Mapping> =
        gat.mappings.into_iter().map(|m| (m.page_id, m)).collect();
    let live = mappings.values().filter(|m| !m.freed).count();
    let coord = Coordinator::new(epoch, gat.max_page_id, Timeouts::default());
    let writer = with_retries(|| rt.block_on(GatWriter::open(store, 0)))?;
    let (to_persister, batches) = mpsc::channel::<Batch>();
    let (persisted_tx, persisted) = mpsc::channel::<PersistReport>();
    let wake = Notifier::new().map_err(|e| e.to_string())?;
    // A monitor whose ZooKeeper session ended no longer leads (its election znode is gone
    // and a standby may lead already): the loop stops at once, and every write it might
    // still try is fenced.
    let session_lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let mut watcher = store.state_watcher();
        let lost = session_lost.clone();
        rt.spawn(async move {
            loop {
                let state = watcher.changed().await;
                if state.is_terminated() {
                    tracing::error!(?state, "ZooKeeper session ended");
                    lost.store(true, std::sync::atomic::Ordering::Release);
                    return;
                }
            }
        });
    }
    std::thread::scope(|scope| {
        let wake = &wake;
        let max_batch = config.max_batch;
        std::thread::Builder::new()
            .name("pmgas-gat-writer".into())
            .spawn_scoped(scope, move || {
                persister(writer, rt, &batches, &persisted_tx, wake, max_batch)
            })
            .map_err(|e| e.to_string())?;
        let listener = Listener::bind(config.listen, 64).map_err(|e| e.to_string())?;
        let pd = ProtectionDomain::new(listener.context()).map_err(|e| e.to_string())?;
        // Announced only now that the GAT is loaded and the listener bound: nodes that look
        // the monitor up connect at once.
        announce(store, rt, &config.listen.to_string())?;
        println!(
            "MONITOR READY listen={} device={} epoch={} mappings={} freed={} max_page_id={} \
             unix_ms={}",
            config.listen,
            listener.context().name(),
            epoch.0,
            live,
            mappings.len() - live,
            coord.next_page_id() - 1,
            fault::unix_ms()
        );
        // Dropping `to_persister` (when the loop ends) stops the writer thread.
        let mut monitor = Monitor {
            config,
            store,
            rt,
            epoch,
            coordinator: coord,
            freer: Freer::new(REQUEST_TIMEOUT.as_nanos() as u64),
            rereplication: rereplicate::Rereplication::new(
                config.rereplicate_concurrency,
                config.rereplicate_mb_s,
                config.page_size_bytes,
            ),
            mappings,
            failures: dead,
            writing: HashMap::new(),
            deposed: None,
            replies: HashMap::new(),
            peers: vec![],
            next_serial: 0,
            by_node: BTreeMap::new(),
            pd,
            listener,
            to_persister,
            persisted: &persisted,
            wake,
            session_lost: &session_lost,
            start: Instant::now(),
            last_tick: Instant::now(),
            last_accept: Instant::now() - Duration::from_secs(1),
            spin: pmgas_verbs::spin::SpinThenSleep::default(),
            last_request: Instant::now(),
        };
        monitor.rereplicate_loaded(short);
        monitor.run_loop()
    })
}

fn report_art_check(node: NodeId, c: &ArtCheck, took: Duration) {
    println!(
        "ART CHECK node={} entries={} confirmed={} mismatched={} unknown_allocated={} \
         preallocated={} corrupt={} us={}",
        node.0,
        c.entries,
        c.confirmed,
        c.mismatched,
        c.unknown_allocated,
        c.preallocated,
        c.corrupt,
        took.as_micros()
    );
    if c.mismatched + c.corrupt > 0 {
        tracing::error!(
            %node, mismatched = c.mismatched, corrupt = c.corrupt, first = ?c.first_mismatches,
            "the node's ART, read one-sided, disagrees with the GAT"
        );
    }
}

/// Data servers away (since when) and those declared dead.
struct Failures {
    dead: pmgas_layout::gat::DeadNodes,
    missing: BTreeMap<NodeId, Instant>,
    /// Replicas the declarations dropped from the GAT's view, by node (page index there,
    /// page id): a node declared dead that comes back still holds them ALLOCATED, and its
    /// reconciliation tells it to free them.
    dropped: Dropped,
}

type Dropped = BTreeMap<NodeId, std::collections::BTreeSet<(PageIndex, PageId)>>;

impl Failures {
    /// Drops `m`'s replicas on dead nodes from the view, remembering them.
    fn drop_dead(&mut self, m: &mut Mapping) -> usize {
        let gone = self.dead.apply_dropping(m);
        for r in &gone {
            self.dropped
                .entry(r.node)
                .or_default()
                .insert((r.page, m.page_id));
        }
        gone.len()
    }
}

/// The RDMA loop's state, owned by one thread; ZooKeeper writes of the GAT run on the writer
/// thread meanwhile. Each step of a pass is one method, called in order by
/// [`Monitor::run_loop`] (the module's head comment lists them).
///
/// Fields drop in declaration order: the connections before their protection domain and
/// listener, and all of them before `to_persister`, whose drop stops the writer thread.
struct Monitor<'a> {
    config: &'a ServerConfig,
    store: &'a Store,
    rt: &'a tokio::runtime::Runtime,
    epoch: Epoch,
    coordinator: Coordinator,
    /// Pages being freed (steps F1-F4).
    freer: Freer<Waiter>,
    /// Pages being given back their replicas (R1-R7, [`rereplicate`]).
    rereplication: rereplicate::Rereplication,
    /// The in-memory GAT: what ZooKeeper holds (see [`Monitor::collect_persisted`]),
    /// freed pages as their tombstones.
    mappings: HashMap<PageId, Mapping>,
    failures: Failures,
    /// Mappings handed to the GAT writer, by transaction, until it reports (tombstones are
    /// sent back in the writer's report).
    writing: HashMap<u64, Mapping>,
    /// Set once a GAT write was fenced: finish what was started, then stop.
    deposed: Option<String>,
    /// (node, wire request id) -> msg-layer id to answer, for AllocPage replies.
    replies: HashMap<(NodeId, u64), u64>,
    /// The connections, joined or not; `by_node` indexes the joined ones.
    peers: Vec<Peer>,
    next_serial: u64,
    by_node: BTreeMap<NodeId, usize>,
    pd: ProtectionDomain,
    listener: Listener,
    to_persister: mpsc::Sender<Batch>,
    persisted: &'a mpsc::Receiver<PersistReport>,
    wake: &'a Notifier,
    session_lost: &'a std::sync::atomic::AtomicBool,
    start: Instant,
    last_tick: Instant,
    last_accept: Instant,
    /// When a node last sent a request (a deposed monitor waits until they stop).
    last_request: Instant,
    spin: pmgas_verbs::spin::SpinThenSleep,
}

/// Whether a node's connection survives what it just delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connection {
    Keep,
    /// It failed: the loop drops it once every connection has been polled.
    Close,
}

/// A request's reply body, or the error code and detail that refuse it.
type Answer = Result<Body, (ErrorCode, String)>;

/// The refusal of a request that needs the active monitor, from a deposed one.
fn deposed() -> (ErrorCode, String) {
    (
        ErrorCode::NotLeader,
        "this monitor was deposed; ask the active one".into(),
    )
}

impl Monitor<'_> {
    /// The RDMA loop: one pass after another until the monitor must stop (it returns why).
    fn run_loop(mut self) -> Result<(), String> {
        loop {
            self.stop_if_session_lost()?;
            self.accept_new_connection()?;
            let now_ns = self.start.elapsed().as_nanos() as u64;
            let mut inputs: Vec<Input> = vec![];
            self.collect_persisted(&mut inputs)?;
            self.poll_peers(&mut inputs);
            self.tick(&mut inputs);
            // Spin briefly while messages flow, then sleep until a completion, an rdma_cm
            // event (a connect request, a disconnect) or the next tick.
            let idle_pass = inputs.iter().all(|i| matches!(i, Input::Tick));
            let reconciling = self.drive_reconciliations();
            let freeing = self.drive_frees();
            let rereplicating = self.drive_rereplication();
            self.spin_or_sleep(idle_pass && !reconciling && !freeing && !rereplicating)?;
            self.run_coordinator(inputs, now_ns)?;
            self.stop_if_deposed()?;
        }
    }

    fn stop_if_session_lost(&self) -> Result<(), String> {
        if self.session_lost.load(std::sync::atomic::Ordering::Acquire) {
            return Err(format!(
                "lost the ZooKeeper session, and with it the leadership ({} transactions in \
                 flight are left to the next monitor's reconciliation)",
                self.coordinator.in_flight()
            ));
        }
        Ok(())
    }

    /// Takes one rdma_cm connect request, if any, at most every 2 ms; the node becomes a
    /// peer that has not joined yet.
    fn accept_new_connection(&mut self) -> Result<(), String> {
        if self.last_accept.elapsed() < Duration::from_millis(2) {
            return Ok(());
        }
        self.last_accept = Instant::now();
        let Some(req) = self
            .listener
            .next_request(Duration::ZERO)
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        // The receive ring is posted before accepting: the node's Join never
        // waits out an RNR back-off.
        match req.accept_endpoint(
            &self.pd,
            &ConnectionConfig::default(),
            &[],
            MsgConfig::default(),
        ) {
            Ok(ep) => {
                self.next_serial += 1;
                self.peers.push(Peer {
                    ep,
                    serial: self.next_serial,
                    node: None,
                    sent: HashMap::new(),
                    reconcile: None,
                    art: None,
                    data_addr: None,
                    heard: Instant::now(),
                    pinged: Instant::now(),
                })
            }
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
        Ok(())
    }

    /// Takes the GAT writer's reports: stored mappings enter the in-memory GAT, and the
    /// coordinator hears [`Input::Persisted`] or [`Input::PersistFailed`]; a fenced write
    /// deposes this monitor. A report that the writer had to stop ends the loop.
    fn collect_persisted(&mut self, inputs: &mut Vec<Input>) -> Result<(), String> {
        while let Ok(report) = self.persisted.try_recv() {
            let (items, outcome) = report?;
            let mut txn_ids = vec![];
            let mut rereplicated = vec![];
            // The GAT in memory is what ZooKeeper holds: a mapping enters it once its write
            // is acknowledged (reconciliations of rejoining nodes are cut from it).
            for (txn, tombstone) in items {
                let Some(t) = txn else {
                    self.tombstone_persisted(tombstone, &outcome);
                    continue;
                };
                if self.rereplication.owns(t) {
                    rereplicated.push(t);
                } else {
                    txn_ids.push(t);
                }
                if let Some(mut m) = self.writing.remove(&t)
                    && matches!(outcome, Persisted::Stored)
                {
                    // Written with a replica on a node declared dead meanwhile: the
                    // declaration covers its id (assigned before), so the view drops it.
                    self.failures.drop_dead(&mut m);
                    self.mappings.insert(m.page_id, m);
                }
            }
            for t in rereplicated {
                self.rereplica_persisted(t, matches!(outcome, Persisted::Stored));
            }
            inputs.push(match outcome {
                Persisted::Stored => Input::Persisted { txn_ids },
                Persisted::NotStored => Input::PersistFailed { txn_ids },
                Persisted::Fenced(e) => {
                    tracing::error!(error = %e, "deposed: another monitor writes the GAT now");
                    self.deposed.get_or_insert(e);
                    Input::PersistFailed { txn_ids }
                }
            });
        }
        Ok(())
    }

    /// F2: the writer's outcome for a tombstone: stored, it replaces the page's mapping in
    /// the in-memory GAT (lookups answer PageFreed from now on) and its replicas are freed
    /// next; not stored, the free fails and nothing changed.
    fn tombstone_persisted(&mut self, mut tombstone: Mapping, outcome: &Persisted) {
        let page_id = tombstone.page_id;
        let stored = match outcome {
            Persisted::Stored => {
                self.failures.drop_dead(&mut tombstone);
                self.mappings.insert(page_id, tombstone);
                fault::point("monitor.tombstone-written");
                Ok(())
            }
            Persisted::NotStored => Err((
                ErrorCode::Internal,
                format!("page {}: the tombstone was not stored", page_id.0),
            )),
            Persisted::Fenced(e) => Err((ErrorCode::NotLeader, e.clone())),
        };
        let actions = self.freer.persisted(page_id, stored);
        self.carry_out_frees(actions);
    }

    /// Handles everything each connection has delivered: requests, responses and requests
    /// that timed out. Connections that failed are dropped after the last one is polled.
    fn poll_peers(&mut self, inputs: &mut Vec<Input>) {
        let mut dead = vec![];
        for i in 0..self.peers.len() {
            loop {
                let peer = &mut self.peers[i];
                let incoming = match peer.ep.poll() {
                    Ok(Some(m)) => {
                        if !matches!(m, Incoming::TimedOut { .. }) {
                            peer.heard = Instant::now();
                        }
                        m
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(node = ?peer.node, error = %e, "node connection lost");
                        dead.push(i);
                        break;
                    }
                };
                match incoming {
                    Incoming::Request {
                        request_id,
                        payload,
                    } => self.handle_peer_request(i, request_id, &payload, inputs),
                    Incoming::Response {
                        request_id,
                        payload,
                    } => {
                        if self.handle_peer_response(i, request_id, &payload, inputs)
                            == Connection::Close
                        {
                            dead.push(i);
                            break;
                        }
                    }
                    Incoming::TimedOut { request_id } => {
                        // The coordinator's own timers retry or abort; a reconciliation
                        // starts over (the node's side is idempotent); a re-replication
                        // hears of it.
                        let peer = &mut self.peers[i];
                        match peer.sent.remove(&request_id) {
                            Some(Sent::Reconcile { .. }) => {
                                if let Some(r) = peer.reconcile.as_mut() {
                                    r.messages = None;
                                    r.next = 0;
                                    r.sent_last = false;
                                }
                            }
                            Some(Sent::Rere(sent)) => {
                                if let Some(node) = peer.node {
                                    self.rereplicate_answer(node, sent, None);
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        for i in dead.into_iter().rev() {
            self.remove_peer(i, inputs);
        }
    }

    /// A request from connection `i`: answered through [`Monitor::handle_request`]; a
    /// join it accepts is recorded in ZooKeeper before the node hears so.
    fn handle_peer_request(
        &mut self,
        i: usize,
        request_id: u64,
        payload: &[u8],
        inputs: &mut Vec<Input>,
    ) {
        self.last_request = Instant::now();
        let Some(mut reply) = self.handle_request(i, request_id, payload, inputs) else {
            return;
        };
        if let (Body::JoinAck { .. }, Some(node)) = (&reply.body, self.peers[i].node) {
            match record_join(self.store, self.rt, node, self.epoch) {
                Ok(()) => {
                    if let Some(since) = self.failures.missing.remove(&node) {
                        tracing::info!(
                            %node,
                            away_ms = since.elapsed().as_millis() as u64,
                            "node back within the node timeout"
                        );
                    }
                }
                Err(e) => {
                    // Not live until recorded: undo the join, refuse it.
                    tracing::warn!(%node, error = %e, "join not recorded in ZooKeeper");
                    let peer = &mut self.peers[i];
                    peer.node = None;
                    peer.reconcile = None;
                    self.by_node.remove(&node);
                    reply.body = Body::Error {
                        code: ErrorCode::Internal,
                        detail: format!("the join could not be recorded: {e}"),
                    };
                }
            }
        }
        let _ = self.peers[i].ep.respond(request_id, &reply.encode());
    }

    /// Answers one wire request from connection `i` (`msg_id` is its msg-layer id): the
    /// reply to send now, or `None` when the coordinator answers later ([`Action::Reply`]).
    ///
    /// A new request is one more arm. Arms below the two guards serve only a node that
    /// has joined as the sender and speaks the current epoch; an arm longer than a few
    /// lines gets a method that returns an [`Answer`].
    fn handle_request(
        &mut self,
        i: usize,
        msg_id: u64,
        payload: &[u8],
        inputs: &mut Vec<Input>,
    ) -> Option<Message> {
        let msg = match Message::decode(payload) {
            Ok(m) => m,
            Err(e) => return Some(self.reply(0, Err((ErrorCode::Malformed, e.to_string())))),
        };
        let rid = msg.header.request_id;
        let answer = match msg.body {
            Body::Join(j) => self.join(i, msg.header.sender, &j),
            // Clients (any process, joined or not, in any epoch: the answer carries the
            // current one) find the data nodes and look mappings up.
            Body::NodesQuery => Ok(self.node_list()),
            Body::MappingLookup { page_id } if self.peers[i].node.is_none() => {
                self.lookup_mapping(page_id)
            }
            Body::FreePage { page_id } => {
                let waiter = Waiter {
                    serial: self.peers[i].serial,
                    msg_id,
                    rid,
                };
                self.free_page(page_id, waiter)?
            }
            _ if self.peers[i].node != Some(msg.header.sender) => Err((
                ErrorCode::Malformed,
                "join first, as the node you are".into(),
            )),
            _ if msg.header.epoch != self.epoch => Err((
                ErrorCode::StaleEpoch,
                format!("epoch {} is not {}", msg.header.epoch.0, self.epoch.0),
            )),
            Body::AllocPage { .. } if self.deposed.is_some() => Err(deposed()),
            Body::AllocPage {
                primary_page,
                backups_wanted,
            } => {
                let node = msg.header.sender;
                self.replies.insert((node, rid), msg_id);
                inputs.push(Input::AllocPage {
                    from: node,
                    request_id: rid,
                    epoch: msg.header.epoch,
                    primary_page,
                    backups_wanted,
                });
                return None;
            }
            Body::MappingLookup { page_id } => self.lookup_mapping(page_id),
            other => Err((
                ErrorCode::Malformed,
                format!("{} is not a request to the monitor", other.name()),
            )),
        };
        Some(self.reply(rid, answer))
    }

    /// The live data nodes that serve the data path, with their free pages as the
    /// coordinator counts them (nodes still reconciling are not listed).
    fn node_list(&self) -> Body {
        let nodes = self
            .by_node
            .iter()
            .filter_map(|(&node, &i)| {
                let (ip, port) = self.peers.get(i)?.data_addr?;
                let view = self.coordinator.node(node)?;
                Some(pmgas_layout::wire::NodeInfo {
                    node,
                    ip,
                    port,
                    free_pages: view.free_pages,
                })
            })
            .take(pmgas_layout::wire::MAX_NODES)
            .collect();
        Body::NodeList { nodes }
    }

    /// The message that carries `answer` to wire request `rid`.
    fn reply(&self, rid: u64, answer: Answer) -> Message {
        let body = answer.unwrap_or_else(|(code, detail)| Body::Error { code, detail });
        Message::new(self.epoch, MONITOR_SENDER, rid, body)
    }

    /// A node joins on connection `i`: it is indexed under its id, and reconciles its ART
    /// with the GAT before it takes part in transactions.
    fn join(&mut self, i: usize, node: NodeId, j: &pmgas_layout::wire::Join) -> Answer {
        let config = self.config;
        if j.cluster_id != config.cluster_id {
            return Err((
                ErrorCode::WrongCluster,
                format!("cluster {} is not {}", j.cluster_id.0, config.cluster_id.0),
            ));
        }
        if j.page_size_bytes != config.page_size_bytes {
            return Err((
                ErrorCode::BadGeometry,
                format!(
                    "page size {} is not {}",
                    j.page_size_bytes, config.page_size_bytes
                ),
            ));
        }
        if self.by_node.contains_key(&node) {
            return Err((
                ErrorCode::DuplicateNode,
                format!("{node} is already joined"),
            ));
        }
        let peer = &mut self.peers[i];
        peer.node = Some(node);
        self.by_node.insert(node, i);
        // The ART region a node exports: used only if it is consistent with the pool
        // geometry it declared (a forged or old join gets no one-sided check).
        let art_end = u64::from(j.page_count)
            .checked_mul(pmgas_layout::pool::ART_ENTRY_BYTES)
            .and_then(|b| b.checked_add(pmgas_layout::pool::ART_OFFSET));
        peer.data_addr = (j.cm_port != 0).then_some((j.cm_ip, j.cm_port));
        peer.art = match art_end {
            Some(end)
                if j.art_rkey != 0
                    && j.region_addr != 0
                    && end <= j.region_len
                    && j.page_count <= 1 << 26 =>
            {
                Some((
                    RemoteRegion {
                        addr: j.region_addr,
                        len: end,
                        rkey: j.art_rkey,
                    },
                    j.page_count,
                ))
            }
            _ => {
                tracing::warn!(%node, "the node exports no usable ART region: no one-sided cross-check");
                None
            }
        };
        peer.reconcile = Some(Reconciling {
            view: NodeView {
                free_pages: j.free_pages,
            },
            messages: None,
            next: 0,
            sent_last: false,
            started: Instant::now(),
        });
        tracing::info!(%node, free = j.free_pages, "node joined; reconciling");
        Ok(Body::JoinAck {
            live_nodes: self.by_node.len() as u32,
        })
    }

    /// A page's replicas, from the in-memory GAT.
    fn lookup_mapping(&self, page_id: PageId) -> Answer {
        match self.mappings.get(&page_id) {
            Some(m) if m.freed => Err((
                ErrorCode::PageFreed,
                format!("page {} was freed", page_id.0),
            )),
            Some(m) if m.replicas.is_empty() => Err((
                ErrorCode::PageLost,
                format!(
                    "page {}: every replica was on data servers declared dead",
                    page_id.0
                ),
            )),
            Some(m) => Ok(Body::Mapping {
                page_id,
                replicas: m.replicas.clone(),
            }),
            None => Err((
                ErrorCode::UnknownPage,
                format!("page {} is not mapped", page_id.0),
            )),
        }
    }

    /// F1: a client asks to free `page_id`. Refused at once (`Some`) when this monitor was
    /// deposed or the page is not live; otherwise the answer comes once the replicas are
    /// freed (`None`; [`Monitor::carry_out_frees`] sends it).
    fn free_page(&mut self, page_id: PageId, waiter: Waiter) -> Option<Answer> {
        if self.deposed.is_some() {
            return Some(Err(deposed()));
        }
        let mapping = match self.mappings.get(&page_id) {
            Some(m) if !m.freed => m.clone(),
            _ => return Some(self.lookup_mapping(page_id)),
        };
        if self.rereplication.busy(page_id) {
            return Some(Err((
                ErrorCode::Busy,
                format!(
                    "page {} is being given a new replica; ask again shortly",
                    page_id.0
                ),
            )));
        }
        let actions = self.freer.request(&mapping, waiter);
        self.carry_out_frees(actions);
        None
    }

    /// F3, F4: what the frees in progress have due; returns whether anything was.
    fn drive_frees(&mut self) -> bool {
        if self.freer.in_flight() == 0 {
            return false;
        }
        let (by_node, peers) = (&self.by_node, &self.peers);
        let state = |node: NodeId| match by_node.get(&node).and_then(|&i| peers.get(i)) {
            Some(p) if p.reconcile.is_some() => NodeState::Reconciling,
            Some(_) => NodeState::Ready,
            None => NodeState::Away,
        };
        let now_ns = self.start.elapsed().as_nanos() as u64;
        let actions = self.freer.drive(state, now_ns);
        let any = !actions.is_empty();
        self.carry_out_frees(actions);
        any
    }

    /// Carries out the free state machine's actions: the tombstone to the GAT writer,
    /// FreeReplicas to a node, answers to clients.
    fn carry_out_frees(&mut self, actions: Vec<FreeAction<Waiter>>) {
        for action in actions {
            match action {
                FreeAction::Persist { tombstone } => {
                    tracing::info!(
                        page_id = tombstone.page_id.0,
                        "freeing a page: writing its tombstone"
                    );
                    if self
                        .to_persister
                        .send(vec![(None, tombstone.clone())])
                        .is_err()
                    {
                        let page_id = tombstone.page_id;
                        let failed = Err((ErrorCode::Internal, "the GAT writer ended".into()));
                        let more = self.freer.persisted(page_id, failed);
                        self.carry_out_frees(more);
                    }
                }
                FreeAction::Send {
                    to,
                    page,
                    page_id,
                    attempt,
                } => {
                    let body = Body::FreeReplicas {
                        entries: vec![(page, page_id)],
                    };
                    self.send(to, body, Sent::Free { page_id, attempt });
                    fault::point("monitor.free-sent");
                }
                FreeAction::Reply {
                    page_id,
                    waiters,
                    result,
                } => {
                    if let Ok(count) = &result {
                        println!(
                            "PAGE FREED page_id={} replicas_freed={count} unix_ms={}",
                            page_id.0,
                            fault::unix_ms()
                        );
                    }
                    let body = match result {
                        Ok(count) => Body::Freed { count },
                        Err((code, detail)) => Body::Error { code, detail },
                    };
                    for w in waiters {
                        let msg = Message::new(self.epoch, MONITOR_SENDER, w.rid, body.clone());
                        if let Some(p) = self.peers.iter_mut().find(|p| p.serial == w.serial) {
                            let _ = p.ep.respond(w.msg_id, &msg.encode());
                        }
                    }
                }
            }
        }
    }

    /// A response on connection `i` to what the monitor sent: the last reconciliation
    /// message's answer completes the node's reconciliation (after the one-sided ART
    /// check, whose failure closes the connection); the two-phase answers go to the
    /// coordinator.
    fn handle_peer_response(
        &mut self,
        i: usize,
        request_id: u64,
        payload: &[u8],
        inputs: &mut Vec<Input>,
    ) -> Connection {
        let peer = &mut self.peers[i];
        let (Some(node), Some(sent)) = (peer.node, peer.sent.remove(&request_id)) else {
            return Connection::Keep;
        };
        if let Sent::Rere(sent) = sent {
            let body = Message::decode(payload).map(|m| m.body).ok();
            self.rereplicate_answer(node, sent, body);
            return Connection::Keep;
        }
        match (Message::decode(payload).map(|m| m.body), sent) {
            (
                Ok(Body::Reconciled {
                    committed,
                    freed,
                    unknown_allocated,
                    conflicting,
                }),
                Sent::Reconcile { last: true },
            ) => {
                if let Some(mut r) = peer.reconcile.take() {
                    // The FreeReplicas went before: its dropped replicas are FREE now.
                    self.failures.dropped.remove(&node);
                    if let Some((region, page_count)) = peer.art {
                        let t = Instant::now();
                        match check_art(&mut peer.ep, node, &region, page_count, &self.mappings) {
                            Ok(c) => report_art_check(node, &c, t.elapsed()),
                            Err(e) => {
                                tracing::error!(%node, error = %e, "one-sided ART cross-check failed; dropping the connection");
                                return Connection::Close;
                            }
                        }
                    }
                    r.view.free_pages = r.view.free_pages.saturating_add(freed);
                    self.coordinator.set_node(node, r.view);
                    let ms = r.started.elapsed().as_secs_f64() * 1e3;
                    tracing::info!(
                        %node, committed, freed, unknown_allocated, conflicting,
                        ms = format!("{ms:.1}"), "node reconciled with the GAT"
                    );
                    self.rereplicate_node_ready(node);
                    if unknown_allocated + conflicting > 0 {
                        tracing::error!(
                            %node, unknown_allocated, conflicting,
                            "ALLOCATED pages the GAT does not account for (left untouched)"
                        );
                    }
                }
            }
            (Ok(Body::Reconciled { .. }), Sent::Reconcile { last: false }) => {}
            // A reconciliation's FreeReplicas (freed pages' replicas on the node).
            (Ok(Body::Freed { count }), Sent::Reconcile { .. }) => {
                if count > 0 {
                    tracing::info!(%node, count, "reconciliation freed replicas of freed pages");
                }
                if let Some(r) = peer.reconcile.as_mut() {
                    r.view.free_pages = r.view.free_pages.saturating_add(count);
                }
            }
            (Ok(Body::Freed { count }), Sent::Free { page_id, attempt }) => {
                // The node's free pages as the coordinator counts them (for choosing
                // backups and clients' primaries) grow by what it freed.
                if let Some(mut view) = self.coordinator.node(node) {
                    view.free_pages = view.free_pages.saturating_add(count);
                    self.coordinator.set_node(node, view);
                }
                self.freer.answered(page_id, attempt, Ok(count))
            }
            (other, Sent::Free { page_id, attempt }) => {
                tracing::warn!(%node, page_id = page_id.0, answer = ?other, "FreeReplicas refused; the node's reconciliation frees it");
                self.freer.answered(page_id, attempt, Err(()))
            }
            (Ok(Body::EpochChanged { .. }), Sent::EpochNotice) => {}
            (_, Sent::Heartbeat) => {}
            (Ok(Body::Prepared { txn_id, page }), _) => inputs.push(Input::Prepared {
                from: node,
                txn_id,
                page,
            }),
            (Ok(Body::CommitAck { txn_id, .. }), _) => {
                inputs.push(Input::CommitAck { from: node, txn_id })
            }
            (Ok(Body::AbortAck { txn_id }), _) => {
                inputs.push(Input::AbortAck { from: node, txn_id })
            }
            (Ok(Body::Error { code, .. }), Sent::Prepare(txn_id)) => {
                inputs.push(Input::PrepareFailed {
                    from: node,
                    txn_id,
                    code,
                })
            }
            (other, sent) => {
                tracing::warn!(?node, ?sent, ?other, "unexpected response")
            }
        }
        Connection::Keep
    }

    /// Every 10 ms: the coordinator's [`Input::Tick`], then connections that are gone or
    /// silent are dropped, idle nodes are sent heartbeats, and a node away too long is
    /// declared dead.
    fn tick(&mut self, inputs: &mut Vec<Input>) {
        if self.last_tick.elapsed() < Duration::from_millis(10) {
            return;
        }
        self.last_tick = Instant::now();
        inputs.push(Input::Tick);
        // Drop connections whose peer has gone (a node restarting rejoins on a new one).
        for i in (0..self.peers.len()).rev() {
            if self.peers[i]
                .ep
                .connection()
                .peer_disconnected()
                .unwrap_or(true)
            {
                self.remove_peer(i, inputs);
            }
        }
        // Heartbeats: a joined node that has answered nothing for the heartbeat
        // timeout is dropped as if its connection had failed (a hung or partitioned
        // node keeps its RC connection up as long as nothing is sent to it).
        for i in (0..self.peers.len()).rev() {
            let Some(node) = self.peers[i].node else {
                continue;
            };
            let silent = self.peers[i].heard.elapsed();
            if silent >= self.config.heartbeat_timeout {
                tracing::warn!(%node, silent_ms = silent.as_millis() as u64, "node answers no heartbeat; dropping its connection");
                self.remove_peer(i, inputs);
                continue;
            }
            if self.peers[i].pinged.elapsed() >= HEARTBEAT_EVERY && silent >= HEARTBEAT_EVERY {
                self.peers[i].pinged = Instant::now();
                let seq = self.start.elapsed().as_millis() as u64;
                let body = Body::Heartbeat { seq };
                self.send(node, body, Sent::Heartbeat);
            }
        }
        // Nodes away past the node timeout are declared dead, one per tick.
        self.declare_overdue_node(inputs);
    }

    /// Declares the first node away past the node timeout dead (not once deposed), in
    /// the next epoch, which every joined node is told.
    fn declare_overdue_node(&mut self, inputs: &mut Vec<Input>) {
        let overdue = self
            .failures
            .missing
            .iter()
            .find(|(_, since)| since.elapsed() >= self.config.node_timeout)
            .map(|(n, since)| (*n, since.elapsed()));
        let Some((node, away)) = overdue else {
            return;
        };
        if self.deposed.is_some() {
            return;
        }
        let record = pmgas_layout::gat::DeadNode {
            epoch: Epoch(self.epoch.0 + 1),
            max_page_id: self.coordinator.next_page_id() - 1,
        };
        match self.declare_dead(node, record, away) {
            Ok(new_epoch) => {
                self.epoch = new_epoch;
                let joined: Vec<NodeId> = self.by_node.keys().copied().collect();
                for to in joined {
                    let body = Body::EpochChanged { dead_node: node };
                    self.send(to, body, Sent::EpochNotice);
                }
                inputs.push(Input::NodeDead {
                    node,
                    epoch: new_epoch,
                });
            }
            Err(StoreError::Fenced { path }) => {
                tracing::error!(%node, %path, "deposed while declaring a node dead");
                self.deposed.get_or_insert(format!("fenced at {path}"));
            }
            Err(e) => {
                tracing::warn!(%node, error = %e, "declaring a node dead failed; retrying")
            }
        }
    }

    /// Declares `node` dead: stores `record` (the next epoch, the largest page id handed out)
    /// in one fenced multi-op,
    /// then drops its replicas from the in-memory GAT and reports the pages that lost a
    /// replica with the count that remains. Returns the new epoch, or the store's error
    /// (nothing changed then); the caller tells the coordinator ([`Input::NodeDead`]).
    fn declare_dead(
        &mut self,
        node: NodeId,
        record: pmgas_layout::gat::DeadNode,
        away: Duration,
    ) -> Result<Epoch, StoreError> {
        bounded(self.rt, self.store.declare_dead(node, record)).unwrap_or_else(|_| {
            Err(StoreError::Corrupt {
                path: format!("dead/node{}", node.0),
                reason: "ZooKeeper did not answer (outcome unknown: asked again next tick)".into(),
            })
        })?;
        fault::point("monitor.node-declared-dead");
        self.failures.dead.0.insert(node, record);
        self.failures.missing.remove(&node);
        let (mut affected, mut promoted) = (0usize, 0usize);
        let mut remaining: BTreeMap<usize, usize> = BTreeMap::new();
        let mut lost: Vec<u32> = vec![];
        let mut shorts: Vec<(PageId, usize)> = vec![];
        // Replicas on the other dead nodes left the view at their declarations: this drops
        // (and remembers) this node's.
        for m in self.mappings.values_mut() {
            let was_primary = m.replicas.first().is_some_and(|r| r.node == node);
            let before = m.replicas.len();
            if self.failures.drop_dead(m) == 0 || m.freed {
                continue;
            }
            shorts.push((m.page_id, before));
            affected += 1;
            promoted += usize::from(was_primary && !m.replicas.is_empty());
            *remaining.entry(m.replicas.len()).or_default() += 1;
            if m.replicas.is_empty() {
                lost.push(m.page_id.0);
            }
        }
        let remaining_text: Vec<String> = remaining
            .iter()
            .map(|(r, n)| format!("{n} pages with {r}"))
            .collect();
        tracing::warn!(
            %node,
            away_ms = away.as_millis() as u64,
            epoch = record.epoch.0,
            pages = affected,
            primaries_promoted = promoted,
            remaining_replicas = %remaining_text.join(", "),
            "node declared dead: its replicas left the GAT"
        );
        if !lost.is_empty() {
            lost.sort_unstable();
            tracing::error!(
                %node,
                pages = lost.len(),
                first = ?&lost[..lost.len().min(16)],
                "pages LOST: every replica was on dead nodes"
            );
        }
        println!(
            "NODE DEAD node={} epoch={} max_page_id={} pages={} primaries_promoted={} lost={} \
             remaining=[{}] unix_ms={}",
            node.0,
            record.epoch.0,
            record.max_page_id,
            affected,
            promoted,
            lost.len(),
            remaining_text.join(", "),
            fault::unix_ms()
        );
        self.rereplicate_after_death(node, shorts);
        Ok(record.epoch)
    }

    /// Sends joined nodes their part of the GAT, as far as the message window allows. Returns
    /// whether it sent anything.
    fn drive_reconciliations(&mut self) -> bool {
        let mut sent_any = false;
        for peer in self.peers.iter_mut() {
            let (Some(node), Some(r)) = (peer.node, peer.reconcile.as_mut()) else {
                continue;
            };
            if r.sent_last {
                continue;
            }
            if r.messages.is_none() {
                if self.coordinator.persisting_involves(node)
                    || self.rereplication.persisting_involves(node)
                {
                    continue;
                }
                r.messages = Some(reconcile_messages(
                    &self.mappings,
                    node,
                    self.failures.dropped.get(&node),
                ));
            }
            let messages = r.messages.as_deref().unwrap_or(&[]);
            while !r.sent_last && peer.ep.outstanding() < peer.ep.request_limit() {
                let Some(body) = messages.get(r.next) else {
                    break;
                };
                let last = r.next + 1 == messages.len();
                let msg = Message::new(self.epoch, MONITOR_SENDER, 0, body.clone()).encode();
                match peer.ep.request(&msg, REQUEST_TIMEOUT) {
                    Ok(id) => {
                        peer.sent.insert(id, Sent::Reconcile { last });
                        r.next += 1;
                        r.sent_last = last;
                        sent_any = true;
                        fault::point("monitor.reconcile-sent");
                    }
                    Err(e) => {
                        tracing::warn!(%node, error = %e, "reconcile send failed; retrying");
                        break;
                    }
                }
            }
        }
        sent_any
    }

    /// Spins while the pass had work (`idle_pass` false), and after the spin budget of
    /// idle passes sleeps until something is ready.
    fn spin_or_sleep(&mut self, idle_pass: bool) -> Result<(), String> {
        if !idle_pass {
            self.spin.busy();
        } else if self.spin.should_sleep() {
            self.spin.busy();
            self.sleep()?;
            self.wake.drain();
        }
        Ok(())
    }

    /// Sleeps until a node's message, an rdma_cm event or the next 10 ms tick.
    fn sleep(&mut self) -> Result<(), String> {
        let mut fds = vec![self.listener.event_fd(), self.wake.fd()];
        for p in self.peers.iter_mut() {
            match p.ep.arm() {
                Ok(true) => {}
                // Something is ready, or the connection failed (the loop's poll reports it).
                Ok(false) | Err(_) => return Ok(()),
            }
            fds.push(p.ep.connection().cq_event_fd());
            fds.push(p.ep.connection().cm_event_fd());
        }
        let timeout = Duration::from_millis(10).saturating_sub(self.last_tick.elapsed());
        pmgas_verbs::wait::wait_readable(&fds, timeout).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Runs the coordinator on this pass's inputs (`now_ns` read at the pass's start) and
    /// carries out its actions; the Persist actions go to the writer thread in one batch.
    fn run_coordinator(&mut self, inputs: Vec<Input>, now_ns: u64) -> Result<(), String> {
        // Run the coordinator to a fixed point, group-committing its Persist actions.
        let mut pending = inputs;
        while !pending.is_empty() {
            let mut actions = vec![];
            for input in pending.drain(..) {
                actions.extend(self.coordinator.handle(input, now_ns));
            }
            let mut batch: Vec<(u64, Mapping)> = vec![];
            for action in actions {
                self.carry_out(action, &mut batch);
            }
            // Group commit: everything this pass produced goes to the writer thread in
            // one batch; it merges batches that queue while a write is in flight.
            if !batch.is_empty() {
                let items: Batch = batch.into_iter().map(|(t, m)| (Some(t), m)).collect();
                self.to_persister
                    .send(items)
                    .map_err(|_| "the GAT writer thread ended".to_string())?;
                fault::point("monitor.persist-queued");
            }
        }
        Ok(())
    }

    /// Carries out one coordinator action: a message to a node, a reply to an AllocPage,
    /// or a mapping to persist (added to `batch`, the pass's group commit).
    fn carry_out(&mut self, action: Action, batch: &mut Vec<(u64, Mapping)>) {
        match action {
            Action::Persist { txn_id, mapping } => {
                self.writing.insert(txn_id, mapping.clone());
                batch.push((txn_id, mapping));
            }
            Action::Prepare { to, txn_id } => {
                self.send(to, Body::Prepare { txn_id }, Sent::Prepare(txn_id));
                fault::point("monitor.prepare-sent");
            }
            Action::Commit {
                to,
                txn_id,
                mapping,
            } => {
                self.send(
                    to,
                    Body::Commit {
                        txn_id,
                        page_id: mapping.page_id,
                        replicas: mapping.replicas,
                    },
                    Sent::Commit,
                );
                fault::point("monitor.commit-sent");
            }
            Action::Abort { to, txn_id } => {
                self.send(to, Body::Abort { txn_id }, Sent::Abort);
                fault::point("monitor.abort-sent");
            }
            Action::Reply {
                to,
                request_id,
                txn_id,
                result,
            } => {
                let Some(msg_id) = self.replies.remove(&(to, request_id)) else {
                    return;
                };
                let committed = result.is_ok();
                let body = match result {
                    Ok(m) => Body::Commit {
                        txn_id,
                        page_id: m.page_id,
                        replicas: m.replicas,
                    },
                    Err(code) => Body::Error {
                        code,
                        detail: format!("allocation failed: {code:?}"),
                    },
                };
                if let Some(&i) = self.by_node.get(&to) {
                    let _ = self.peers[i].ep.respond(
                        msg_id,
                        &Message::new(self.epoch, MONITOR_SENDER, request_id, body).encode(),
                    );
                }
                if committed {
                    fault::point("monitor.commit-sent");
                }
            }
        }
    }

    fn stop_if_deposed(&self) -> Result<(), String> {
        // Deposed: stop once nothing is in flight and the nodes have stopped asking (they
        // were told NotLeader), so no request is left with an unknown outcome.
        if let Some(why) = &self.deposed
            && self.coordinator.in_flight() == 0
            && self.freer.in_flight() == 0
            && self.last_request.elapsed() >= Duration::from_secs(1)
        {
            return Err(format!(
                "this monitor was deposed ({why}); every transaction it started has finished"
            ));
        }
        Ok(())
    }

    /// Sends a request to joined node `to` in the current epoch, remembering what it was for.
    fn send(&mut self, to: NodeId, body: Body, sent: Sent) {
        self.send_with_timeout(to, body, sent, REQUEST_TIMEOUT);
    }

    /// As [`Monitor::send`], for a request whose answer may take `timeout`. Returns
    /// whether it went out.
    fn send_with_timeout(&mut self, to: NodeId, body: Body, sent: Sent, timeout: Duration) -> bool {
        let Some(&i) = self.by_node.get(&to) else {
            tracing::warn!(?to, "no connection to node");
            return false;
        };
        let msg = Message::new(self.epoch, MONITOR_SENDER, 0, body).encode();
        match self.peers[i].ep.request(&msg, timeout) {
            Ok(id) => {
                self.peers[i].sent.insert(id, sent);
                true
            }
            Err(e) => {
                tracing::warn!(?to, error = %e, "send failed");
                false
            }
        }
    }

    /// Forgets a node's connection (it failed, went silent, or the peer left). A joined node
    /// stays in the live-node list until it rejoins or is declared dead: it counts as away
    /// from now, and the coordinator hears that it left.
    fn remove_peer(&mut self, i: usize, inputs: &mut Vec<Input>) {
        let p = self.peers.remove(i);
        tracing::warn!(node = ?p.node, "node disconnected");
        if let Some(node) = p.node {
            self.by_node.remove(&node);
            self.failures.missing.insert(node, Instant::now());
            inputs.push(Input::NodeLeft { node });
        }
        for idx in self.by_node.values_mut() {
            if *idx > i {
                *idx -= 1;
            }
        }
        // Re-replication requests to it get no answer now: they fail as unanswered.
        if let Some(node) = p.node {
            for sent in p.sent.into_values() {
                if let Sent::Rere(sent) = sent {
                    self.rereplicate_answer(node, sent, None);
                }
            }
        }
    }
}

/// A group commit: mappings with the transaction that allocated each, or `None` for a
/// freed page's tombstone.
type Batch = Vec<(Option<u64>, Mapping)>;
/// The writer thread's answer for one write (the batch it wrote), or why it had to stop.
type PersistReport = Result<(Batch, Persisted), String>;

/// The GAT writer thread: takes batches from the RDMA loop, merges those that queued while
/// the previous write was in flight (up to `max_batch` mappings), writes them with one
/// ZooKeeper request, reports, and wakes the loop. Compacts deltas when it has nothing to
/// write.
fn persister(
    mut writer: GatWriter<'_>,
    rt: &tokio::runtime::Runtime,
    batches: &mpsc::Receiver<Batch>,
    reports: &mpsc::Sender<PersistReport>,
    wake: &Notifier,
    max_batch: usize,
) {
    let max_batch = max_batch.max(1);
    let mut fenced = false;
    let mut stats = CommitStats::default();
    let mut queued: std::collections::VecDeque<Batch> = Default::default();
    loop {
        stats.report_every(Duration::from_secs(1));
        if queued.is_empty() {
            match batches.recv_timeout(Duration::from_millis(100)) {
                Ok(b) => queued.push_back(b),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    compact(&mut writer, rt, &mut fenced, reports, wake);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        queued.extend(batches.try_iter());
        let mut items: Batch = vec![];
        while let Some(b) = queued.pop_front() {
            if !items.is_empty() && items.len() + b.len() > max_batch {
                queued.push_front(b);
                break;
            }
            items.extend(b);
        }
        // Only with group commit off can one pass's batch exceed max_batch: split it.
        if items.len() > max_batch {
            queued.push_front(items.split_off(max_batch));
        }
        let (txns, maps): (Vec<Option<u64>>, Vec<Mapping>) = items.into_iter().unzip();
        let count = maps.len();
        let started = Instant::now();
        let report = persist(&mut writer, rt, &maps, fenced).map(|outcome| {
            fenced |= matches!(outcome, Persisted::Fenced(_));
            (txns.into_iter().zip(maps).collect(), outcome)
        });
        stats.record(count, started.elapsed());
        if matches!(report, Ok((_, Persisted::Stored))) {
            fault::point("monitor.gat-written");
        }
        let fatal = report.is_err();
        if reports.send(report).is_err() || fatal {
            wake.notify();
            return;
        }
        wake.notify();
        if queued.is_empty() && writer.compaction_due() {
            compact(&mut writer, rt, &mut fenced, reports, wake);
        }
    }
}

fn compact(
    writer: &mut GatWriter<'_>,
    rt: &tokio::runtime::Runtime,
    fenced: &mut bool,
    reports: &mpsc::Sender<PersistReport>,
    wake: &Notifier,
) {
    if *fenced || !writer.compaction_due() {
        return;
    }
    match bounded(rt, writer.compact()) {
        Ok(Ok(n)) => tracing::debug!(deltas = n, "GAT deltas compacted"),
        Ok(Err(e @ StoreError::Fenced { .. })) => {
            *fenced = true;
            // Reported as a failed empty write, so the loop learns it was deposed.
            let _ = reports.send(Ok((vec![], Persisted::Fenced(e.to_string()))));
            wake.notify();
        }
        // Deltas stay valid; compaction is retried later.
        Ok(Err(e)) => tracing::warn!(error = %e, "GAT compaction failed"),
        Err(_) => tracing::warn!("GAT compaction timed out"),
    }
}

/// Runs a ZooKeeper step again while it fails for a reason other than being fenced, for
/// up to 10 s.
fn with_retries<T>(mut step: impl FnMut() -> Result<T, StoreError>) -> Result<T, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match step() {
            Ok(v) => return Ok(v),
            Err(e @ StoreError::Fenced { .. }) => return Err(e.to_string()),
            Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
            Err(e) => {
                tracing::warn!(error = %e, "ZooKeeper step failed; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Runs an idempotent ZooKeeper write up to `tries` times, each bounded by
/// [`ZK_TIMEOUT`], pausing `pause` after a failure; being fenced is final.
fn idempotent_write<F: std::future::Future<Output = Result<(), StoreError>>>(
    rt: &tokio::runtime::Runtime,
    what: &str,
    tries: usize,
    pause: Duration,
    mut call: impl FnMut() -> F,
) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..tries {
        match bounded(rt, call()) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e @ StoreError::Fenced { .. })) => return Err(e.to_string()),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("no answer from ZooKeeper within {ZK_TIMEOUT:?}"),
        }
        tracing::warn!(error = %last, "{what} failed; retrying");
        std::thread::sleep(pause);
    }
    Err(last)
}

/// Announces this monitor in ZooKeeper. A slow or lost answer is asked again (the write
/// replaces any announcement, so repeating it is harmless).
fn announce(store: &Store, rt: &tokio::runtime::Runtime, addr: &str) -> Result<(), String> {
    let announcing = || store.publish_leader(addr);
    idempotent_write(
        rt,
        "announcing this monitor",
        10,
        Duration::from_millis(200),
        announcing,
    )
    .map_err(|e| format!("cannot announce this monitor: {e}"))
}

/// Runs one ZooKeeper call on the runtime, bounded by [`ZK_TIMEOUT`].
fn bounded<T>(
    rt: &tokio::runtime::Runtime,
    call: impl std::future::Future<Output = T>,
) -> Result<T, tokio::time::error::Elapsed> {
    rt.block_on(async { tokio::time::timeout(ZK_TIMEOUT, call).await })
}

/// Group-commit statistics, logged every few seconds while allocations flow.
#[derive(Default)]
struct CommitStats {
    writes: u64,
    mappings: u64,
    write_time: Duration,
    since: Option<Instant>,
}

impl CommitStats {
    fn record(&mut self, mappings: usize, took: Duration) {
        self.since.get_or_insert_with(Instant::now);
        self.writes += 1;
        self.mappings += mappings as u64;
        self.write_time += took;
    }

    fn report_every(&mut self, every: Duration) {
        let Some(since) = self.since else { return };
        if since.elapsed() < every {
            return;
        }
        tracing::info!(
            writes = self.writes,
            mappings = self.mappings,
            per_write = format!("{:.2}", self.mappings as f64 / self.writes as f64),
            mean_write_ms = format!(
                "{:.2}",
                self.write_time.as_secs_f64() * 1e3 / self.writes as f64
            ),
            busy_in_zookeeper = format!(
                "{:.0}%",
                100.0 * self.write_time.as_secs_f64() / since.elapsed().as_secs_f64()
            ),
            "group commits"
        );
        *self = Self::default();
    }
}

enum Persisted {
    Stored,
    NotStored,
    Fenced(String),
}

/// Writes one group commit to ZooKeeper. A definite failure means nothing was stored (the
/// transactions may abort); an unknown outcome (timeout, lost connection) is resolved by
/// reading back before anything is aborted, and if ZooKeeper stays unreachable for
/// [`UNKNOWN_GIVE_UP`] the monitor stops: it can neither commit nor abort safely, and
/// the nodes' PREALLOCATED pages wait for reconciliation.
fn persist(
    writer: &mut GatWriter<'_>,
    rt: &tokio::runtime::Runtime,
    maps: &[Mapping],
    deposed: bool,
) -> Result<Persisted, String> {
    if deposed {
        return Ok(Persisted::NotStored);
    }
    let error = match bounded(rt, writer.append(maps)) {
        Ok(Ok(())) => return Ok(Persisted::Stored),
        Ok(Err(e @ StoreError::Fenced { .. })) => return Ok(Persisted::Fenced(e.to_string())),
        Ok(Err(e @ StoreError::Unknown { .. })) => e.to_string(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "GAT write failed");
            return Ok(Persisted::NotStored);
        }
        Err(_) => format!("no answer from ZooKeeper within {ZK_TIMEOUT:?}"),
    };
    tracing::error!(%error, "GAT write outcome unknown; reading back");
    let start = Instant::now();
    while start.elapsed() < UNKNOWN_GIVE_UP {
        match bounded(rt, writer.resolve(maps)) {
            Ok(Ok(true)) => return Ok(Persisted::Stored),
            Ok(Ok(false)) => return Ok(Persisted::NotStored),
            Ok(Err(e @ StoreError::Fenced { .. })) => return Ok(Persisted::Fenced(e.to_string())),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the GAT back yet"),
            Err(_) => tracing::warn!("cannot read the GAT back yet: ZooKeeper does not answer"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "a GAT write's outcome stayed unknown for {UNKNOWN_GIVE_UP:?} ({error}); stopping"
    ))
}

/// Records a joined node in the live-node list, atomically with the epoch check.
fn record_join(
    store: &Store,
    rt: &tokio::runtime::Runtime,
    node: NodeId,
    epoch: Epoch,
) -> Result<(), String> {
    let info = format!("joined in epoch {}", epoch.0);
    // Recording is idempotent (create or replace): a slow or lost answer is asked again,
    // at once (the RDMA loop waits meanwhile).
    let what = format!("recording the join of {node}");
    idempotent_write(rt, &what, 3, Duration::ZERO, || {
        store.register_node(node.0, &info)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmgas_layout::wire::Replica;

    fn m(id: u32, replicas: &[(u32, u32)], freed: bool) -> (PageId, Mapping) {
        let mut m = Mapping::new(
            PageId(id),
            replicas
                .iter()
                .map(|&(node, page)| Replica {
                    node: NodeId(node),
                    page: PageIndex(page),
                })
                .collect(),
        );
        m.freed = freed;
        (PageId(id), m)
    }

    #[test]
    fn a_returning_node_frees_what_its_declaration_dropped_but_never_a_lost_page() {
        // Node 1 was declared dead: page 1 lives on node 2, page 2 had no other replica
        // (lost), page 3 was freed since; page 4 was allocated on node 1 after it came back.
        let mappings: HashMap<PageId, Mapping> = [
            m(1, &[(2, 7)], false),
            m(2, &[], false),
            m(3, &[(2, 8)], true),
            m(4, &[(1, 5), (2, 9)], false),
        ]
        .into_iter()
        .collect();
        let dropped: std::collections::BTreeSet<(PageIndex, PageId)> = [
            (PageIndex(0), PageId(1)),
            (PageIndex(1), PageId(2)),
            (PageIndex(2), PageId(3)),
        ]
        .into_iter()
        .collect();
        let messages = reconcile_messages(&mappings, NodeId(1), Some(&dropped));
        assert_eq!(
            messages,
            vec![
                Body::FreeReplicas {
                    entries: vec![(PageIndex(0), PageId(1)), (PageIndex(2), PageId(3))],
                },
                Body::Reconcile {
                    last: true,
                    entries: vec![(PageIndex(5), PageId(4))],
                },
            ]
        );
        // Without a declaration: only its live replicas.
        let messages = reconcile_messages(&mappings, NodeId(1), None);
        assert_eq!(messages.len(), 1);
    }
}
