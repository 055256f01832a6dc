//! The data node's service: the thread that holds the node's connection to the active
//! monitor. It registers the whole pool for one-sided access, connects over rdma_cm,
//! joins, has its ART reconciled with the GAT, and from then on serves the monitor's
//! Prepare / Commit / Abort / Reconcile / Heartbeat / EpochChanged requests (this node as a
//! backup) while sending the monitor what the node's applications ask for (AllocPage as a
//! primary, MappingLookup). When the monitor connection is lost it finds the active
//! monitor in ZooKeeper again and rejoins; allocations in flight are carried over.
//!
//! The application's side of it is [`crate::client::Client`]; callers reach this thread
//! through [`Command`]s.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pmgas_layout::gat::Mapping;
use pmgas_layout::wire::{Body, ErrorCode, Join, Message, NodeInfo, Replica};
use pmgas_layout::{Epoch, NodeId, PageId, PageIndex, PageState};
use pmgas_verbs::fault;
use pmgas_verbs::msg::{Endpoint, Incoming, MsgConfig};
use pmgas_verbs::{Access, ConnectionConfig, Connector, MemoryRegion, ProtectionDomain};

use crate::art::ReconcileReport;
use crate::cache::MappingCache;
use crate::client::{ClientConfig, ClientError, GlobalPage};
use crate::participant::{Participant, primary_finish, primary_prepare};
use crate::pool::Pool;

pub(crate) type Reply<T> = SyncSender<Result<T, ClientError>>;

pub(crate) enum Command {
    AllocPage {
        backups: u8,
        /// A page the caller already pre-allocated (a new slab), or `None`.
        prepared: Option<PageIndex>,
        reply: Reply<GlobalPage>,
    },
    Lookup {
        page_id: PageId,
        reply: Reply<Mapping>,
    },
    /// The monitor's list of live data nodes and their data-path addresses.
    Nodes { reply: Reply<Vec<NodeInfo>> },
}

/// What the service thread and the handles share.
pub(crate) struct Shared {
    pub(crate) me: NodeId,
    pub(crate) commands: Mutex<Sender<Command>>,
    pub(crate) epoch: AtomicU64,
    pub(crate) stopped: AtomicBool,
    /// The mapping-table cache: page id -> (epoch it was learned in, replicas).
    pub(crate) cache: MappingCache,
    pub(crate) lookups_remote: AtomicU64,
    /// Wakes the service thread when a command is queued.
    pub(crate) notifier: pmgas_verbs::wait::Notifier,
    /// What the reconciliation at join did.
    pub(crate) reconciled: Mutex<Option<ReconcileReport>>,
    /// Leases of cached blocks, by page (the data path grants them; a free waits for them:
    /// `node/CACHE.md` C5).
    pub(crate) leases: Mutex<crate::data::PageLeases>,
    /// Re-replication: prepared copies (target), joins and their answers (primary).
    pub(crate) rereplica: crate::rereplica::Rereplica,
}

impl Shared {
    pub(crate) fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ClientError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let sent = self
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(make(tx));
        if sent.is_err() {
            return Err(ClientError::Stopped("the service thread ended".into()));
        }
        self.notifier.notify();
        rx.recv()
            .unwrap_or_else(|_| Err(ClientError::Stopped("the service thread ended".into())))
    }

    /// Where page `page_id` lives: a hit in the mapping cache costs a hash lookup; a miss
    /// (or an entry from an older epoch) asks the monitor over RDMA and caches the answer.
    pub(crate) fn lookup(&self, page_id: PageId) -> Result<Mapping, ClientError> {
        let epoch = Epoch(self.epoch.load(Ordering::Acquire));
        if let Some(m) = self.cache.get(page_id, epoch) {
            return Ok(m);
        }
        self.lookups_remote.fetch_add(1, Ordering::Relaxed);
        let m = self.call(|reply| Command::Lookup { page_id, reply })?;
        self.remember(page_id, epoch, &m.replicas);
        Ok(m)
    }

    pub(crate) fn remember(&self, page_id: PageId, epoch: Epoch, replicas: &[Replica]) {
        self.cache.insert(page_id, epoch, replicas);
    }
}

/// The service thread; it ends with why the service stopped.
pub(crate) type ServiceThread = JoinHandle<Result<(), String>>;

/// Starts the node's service thread ([`run`]) and waits until it has joined and
/// reconciled (or failed to).
/// `registered`: the pool as the data path registered it already (the same device's
/// protection domain serves both; pinning the pool twice is slow).
pub(crate) fn start(
    config: &ClientConfig,
    pool: &Arc<Pool>,
    registered: Option<Registered>,
) -> Result<(Arc<Shared>, ServiceThread), ClientError> {
    let (commands, rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        me: config.node_id,
        commands: Mutex::new(commands),
        epoch: AtomicU64::new(0),
        stopped: AtomicBool::new(false),
        cache: MappingCache::default(),
        lookups_remote: AtomicU64::new(0),
        notifier: pmgas_verbs::wait::Notifier::new()
            .map_err(|e| ClientError::Stopped(e.to_string()))?,
        reconciled: Mutex::new(None),
        leases: Mutex::new(crate::data::PageLeases::default()),
        rereplica: crate::rereplica::Rereplica::default(),
    });
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let service = {
        let shared = Arc::clone(&shared);
        let pool = Arc::clone(pool);
        let config = config.clone();
        std::thread::Builder::new()
            .name(format!("pmgas-node{}", config.node_id.0))
            .spawn(move || {
                let result = run(&config, &pool, &shared, rx, ready_tx, registered);
                shared.stopped.store(true, Ordering::Release);
                if let Err(e) = &result {
                    tracing::error!(error = %e, "node service stopped");
                }
                result
            })
            .map_err(|e| ClientError::Stopped(e.to_string()))?
    };
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = service.join();
            return Err(e);
        }
        Err(_) => {
            let why = match service.join() {
                Ok(Err(e)) => e,
                _ => "the service thread ended during the join".into(),
            };
            return Err(ClientError::Stopped(why));
        }
    }
    Ok((shared, service))
}

/// The pool's mapping as registered for RDMA, in two regions: the header and ART,
/// readable by peers and never writable by them (the monitor's one-sided cross-check
/// reads it), and the pages, readable, writable and atomically updatable.
pub(crate) struct PoolRegions {
    pub(crate) art: MemoryRegion,
    pub(crate) data: MemoryRegion,
}

/// The pool registered on a protection domain, shared by the service and the data path.
pub(crate) type Registered = (ProtectionDomain, Arc<PoolRegions>);

/// Registers the pool's whole mapping for one-sided access ([`PoolRegions`]).
#[allow(unsafe_code)]
pub(crate) fn register_pool(pd: &ProtectionDomain, pool: &Pool) -> Result<PoolRegions, String> {
    let region = pool.region();
    let data_offset = pool
        .header()
        .page_offset(PageIndex(0))
        .map_or(region.len(), |o| o as usize)
        .min(region.len());
    // SAFETY: the mapping belongs to `pool`, which the caller keeps alive (and mapped)
    // for as long as the returned regions: `run` holds an Arc of the pool and drops the
    // regions before returning. Both ranges lie inside the mapping.
    let art = unsafe { pd.register_raw(region.as_ptr(), data_offset, Access::REMOTE_READ) }
        .map_err(|e| format!("registering the ART read-only: {e}"))?;
    // SAFETY: as above; `data_offset` is at most the mapping's length.
    let data = unsafe {
        pd.register_raw(
            region.as_ptr().add(data_offset),
            region.len() - data_offset,
            Access::ALL_REMOTE,
        )
    }
    .map_err(|e| format!("registering the pages: {e}"))?;
    Ok(PoolRegions { art, data })
}

/// An allocation this node asked the monitor for, as primary.
struct Pending {
    page: PageIndex,
    backups: u8,
    wire_id: u64,
    reply: Reply<GlobalPage>,
    sent_at: Instant,
}

enum Outstanding {
    Alloc(Pending),
    Lookup(PageId, Reply<Mapping>),
    Nodes(Reply<Vec<NodeInfo>>),
    /// An allocation whose answer was lost with the previous monitor connection and whose
    /// page the reconciliation committed under this page id: its replicas are looked up.
    Resolve(Pending, PageId),
}

struct Service<'a> {
    ep: Endpoint,
    me: NodeId,
    epoch: Epoch,
    pool: &'a Pool,
    shared: &'a Shared,
    timeout: Duration,
    participant: Participant,
    /// The GAT's entries for this node, as Reconcile messages bring them.
    reconcile: HashMap<PageIndex, (PageId, Epoch)>,
    reconciled: Option<ReconcileReport>,
    /// Message-layer request id -> what it was for.
    outstanding: HashMap<u64, Outstanding>,
    next_wire_id: u64,
    /// AddReplica requests the data path is carrying out: transaction -> the monitor's
    /// message-layer request id, answered when the copy is done.
    adding: HashMap<u64, u64>,
}

fn join(
    ep: &mut Endpoint,
    config: &ClientConfig,
    pool: &Pool,
    mr: &PoolRegions,
) -> Result<Epoch, ClientError> {
    let me = config.node_id;
    let header = *pool.header();
    let ip = match config.bind {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(_) => [0; 4],
    };
    let join = Join {
        cluster_id: header.cluster_id,
        page_size_bytes: header.page_size_bytes,
        page_count: header.page_count,
        free_pages: pool.art().free_count(),
        region_addr: mr.art.addr(),
        region_len: (mr.art.len() + mr.data.len()) as u64,
        rkey: mr.data.rkey(),
        cm_ip: ip,
        cm_port: config.data_port.unwrap_or(0),
        art_rkey: mr.art.rkey(),
    };
    let stopped = |e: String| ClientError::Stopped(e);
    let reply = ep
        .call(
            &Message::new(Epoch(0), me, 1, Body::Join(join)).encode(),
            Duration::from_secs(10),
        )
        .map_err(|e| stopped(format!("join: {e}")))?;
    let reply = Message::decode(&reply).map_err(|e| stopped(format!("join answer: {e}")))?;
    match reply.body {
        Body::JoinAck { live_nodes } => {
            tracing::info!(%me, live_nodes, epoch = reply.header.epoch.0, "joined");
            Ok(reply.header.epoch)
        }
        Body::Error { code, detail } => Err(ClientError::Refused { code, detail }),
        other => Err(stopped(format!(
            "unexpected answer to Join: {}",
            other.name()
        ))),
    }
}

/// How long a starting node looks for a reachable monitor through ZooKeeper (one may be
/// taking over) before its start fails.
pub const FIRST_JOIN_PATIENCE: Duration = Duration::from_secs(30);

fn run(
    config: &ClientConfig,
    pool: &Pool,
    shared: &Shared,
    commands: Receiver<Command>,
    ready: SyncSender<Result<(), ClientError>>,
    mut registered: Option<Registered>,
) -> Result<(), String> {
    let mut monitor = config.monitor;
    let mut first = true;
    let mut finder: Option<MonitorFinder> = None;
    // Allocations in flight when a connection ended: answered after the next join.
    let mut carried: Vec<Pending> = vec![];
    let started = Instant::now();
    loop {
        let patient = config.rediscover.is_some() && started.elapsed() < FIRST_JOIN_PATIENCE;
        let result = connection(
            config,
            monitor,
            pool,
            shared,
            &commands,
            &ready,
            first,
            patient,
            &mut carried,
            &mut registered,
        );
        let (why, was_joined) = match result {
            Ok(()) => return Ok(()),
            Err(Lost::BeforeReady(e)) => return Err(e),
            Err(Lost::After(e)) => {
                first = false;
                (e, true)
            }
            Err(Lost::Unreachable(e)) => (e, false),
        };
        let Some((zk, cluster)) = &config.rediscover else {
            for p in carried.drain(..) {
                let _ = p.reply.send(Err(ClientError::Stopped(format!(
                    "{why}; outcome unknown (page {} stays PREALLOCATED until a monitor \
                     reconciles this node)",
                    p.page.0
                ))));
            }
            return Err(why);
        };
        // Find the active monitor again (a restarted or new one announces itself in
        // ZooKeeper) and rejoin; the join reconciles whatever was in flight.
        if was_joined {
            tracing::warn!(error = %why, "monitor connection lost; looking for the active monitor");
        } else {
            // The announced monitor is not (yet) there: a dead one's address until a
            // standby replaces the announcement.
            tracing::debug!(error = %why, "could not rejoin; looking again");
        }
        let finder = match &mut finder {
            Some(f) => f,
            None => finder.insert(MonitorFinder::new(zk, cluster)?),
        };
        monitor = loop {
            refuse_waiting(&commands, pool, &format!("{why}; reconnecting"));
            std::thread::sleep(Duration::from_millis(20));
            // A killed monitor's announcement outlives it until its session expires or a
            // standby replaces it: joining that address fails and brings us back here.
            match finder.find() {
                Ok(addr) => break addr,
                Err(e) => tracing::debug!(error = %e, "no active monitor yet"),
            }
        };
        tracing::debug!(%monitor, "rejoining");
    }
}

/// Why one connection to the monitor ended.
enum Lost {
    /// Before the first join completed: `connect` fails with it.
    BeforeReady(String),
    /// After: the service may look for the monitor again.
    After(String),
    /// A later connection attempt failed before joining.
    Unreachable(String),
}

/// One connection: connect, join, reconcile, then serve until it ends. Allocations in
/// flight when it ends keep their PREALLOCATED pages and are moved to `carried`: the next
/// join's reconciliation commits or frees those pages, and then each caller gets the page
/// the GAT holds for it, or its allocation is sent again on a fresh page. So a caller
/// never gets two pages for one call, and no page is lost to a lost answer.
#[allow(clippy::too_many_arguments)]
fn connection(
    config: &ClientConfig,
    monitor: SocketAddr,
    pool: &Pool,
    shared: &Shared,
    commands: &Receiver<Command>,
    ready: &SyncSender<Result<(), ClientError>>,
    first: bool,
    // The first join may wait for a monitor found through ZooKeeper: an unreachable
    // one is looked up again instead of failing the start.
    patient: bool,
    carried: &mut Vec<Pending>,
    registered: &mut Option<Registered>,
) -> Result<(), Lost> {
    let mut setup = || -> Result<_, ClientError> {
        let stopped = |e: pmgas_verbs::Error| ClientError::Stopped(e.to_string());
        let t0 = Instant::now();
        let ms = || format!("{:.1}", t0.elapsed().as_secs_f64() * 1e3);
        let route = Connector::new(Some(config.bind), monitor)
            .resolve()
            .map_err(stopped)?;
        tracing::debug!(%monitor, ms = ms(), "route resolved");
        // The pool stays registered across monitor connections on one device: pinning
        // it again is the slow part of a rejoin.
        let (pd, mr) = match registered.take() {
            Some((pd, mr)) if pd.context().same_device(route.context()) => (pd, Some(mr)),
            _ => (
                ProtectionDomain::new(route.context()).map_err(stopped)?,
                None,
            ),
        };
        // Connect before registering the pool: while a standby takes over, joins to the
        // dead monitor's address fail here, fast.
        // (The endpoint's receive ring is posted before connecting: the monitor's first
        // message never waits out an RNR back-off.)
        let mut ep = match route.connect_endpoint(
            &pd,
            &ConnectionConfig::default(),
            &[],
            MsgConfig::default(),
        ) {
            Ok(ep) => ep,
            Err(e) => {
                *registered = mr.map(|mr| (pd, mr));
                return Err(stopped(e));
            }
        };
        tracing::debug!(%monitor, ms = ms(), "connected");
        let mr = match mr {
            Some(mr) => mr,
            None => Arc::new(register_pool(&pd, pool).map_err(ClientError::Stopped)?),
        };
        match join(&mut ep, config, pool, &mr) {
            Ok(epoch) => {
                tracing::debug!(%monitor, ms = ms(), "join answered");
                Ok((pd, mr, ep, epoch))
            }
            Err(e) => {
                drop(ep);
                *registered = Some((pd, mr));
                Err(e)
            }
        }
    };
    let (pd, mr, ep, epoch) = match setup() {
        Ok(s) => s,
        Err(e) => {
            let why = e.to_string();
            if first && patient && matches!(e, ClientError::Stopped(_)) {
                tracing::warn!(error = %why, "the announced monitor is not reachable (yet); looking again");
                return Err(Lost::Unreachable(why));
            }
            if first {
                let _ = ready.send(Err(e));
                return Err(Lost::BeforeReady(why));
            }
            return Err(Lost::Unreachable(why));
        }
    };
    shared.epoch.store(epoch.0, Ordering::Release);
    shared.rereplica.rejoined();
    let mut service = Service {
        ep,
        me: config.node_id,
        epoch,
        pool,
        shared,
        timeout: config.request_timeout,
        // Transaction ids belong to the monitor incarnation: start afresh.
        participant: Participant::new(config.node_id),
        reconcile: HashMap::new(),
        reconciled: None,
        outstanding: HashMap::new(),
        // Fresh per connection (request ids identify retries to the monitor).
        next_wire_id: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(2, |d| d.as_nanos() as u64 & ((1 << 62) - 1))
            .max(2),
        adding: HashMap::new(),
    };
    // The monitor sends this node its part of the GAT next; nothing is allocated here
    // until the ART agrees with it.
    match service.await_reconcile(RECONCILE_TIMEOUT) {
        Ok(report) => {
            *shared.reconciled.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
        }
        Err(e) => {
            // The pool stays registered for the next attempt.
            drop(service);
            *registered = Some((pd, mr));
            if first {
                let _ = ready.send(Err(ClientError::Stopped(e.clone())));
                return Err(Lost::BeforeReady(e));
            }
            return Err(Lost::After(e));
        }
    }
    if first {
        let _ = ready.send(Ok(()));
    }
    let resumed = service.resume(std::mem::take(carried));
    let result = resumed.and_then(|()| service.serve(commands));
    let why = match &result {
        Ok(()) => "the node service stopped".to_string(),
        Err(e) => e.clone(),
    };
    for (_, o) in service.outstanding.drain() {
        match o {
            Outstanding::Alloc(p) | Outstanding::Resolve(p, _) => carried.push(p),
            Outstanding::Lookup(_, r) => drop(r.send(Err(ClientError::Stopped(why.clone())))),
            Outstanding::Nodes(r) => drop(r.send(Err(ClientError::Stopped(why.clone())))),
        }
    }
    refuse_waiting(commands, pool, &why);
    drop(service);
    *registered = Some((pd, mr));
    result.map_err(Lost::After)
}

/// Answers every queued command with `Stopped(why)`; pages prepared for them were never
/// sent, so nobody else knows them: they are freed.
fn refuse_waiting(commands: &Receiver<Command>, pool: &Pool, why: &str) {
    while let Ok(c) = commands.try_recv() {
        let err = ClientError::Stopped(why.to_owned());
        match c {
            Command::AllocPage {
                reply, prepared, ..
            } => {
                if let Some(page) = prepared {
                    let mut table = pool;
                    let _ = primary_finish(&mut table, page, Epoch(0), Err(ErrorCode::Internal));
                }
                drop(reply.send(Err(err)))
            }
            Command::Lookup { reply, .. } => drop(reply.send(Err(err))),
            Command::Nodes { reply } => drop(reply.send(Err(err))),
        }
    }
}

/// Reads the active monitor's rdma_cm address from `/pmgas/<cluster>/leader`.
/// Looks up the active monitor, waiting up to `patience` for one to be announced (the
/// cluster may be starting, or a standby taking over).
pub fn find_monitor(zk: &str, cluster: &str, patience: Duration) -> Result<SocketAddr, String> {
    let deadline = Instant::now() + patience;
    let mut finder: Option<MonitorFinder> = None;
    loop {
        let attempt = match &mut finder {
            Some(f) => f.find(),
            None => MonitorFinder::new(zk, cluster).and_then(|f| finder.insert(f).find()),
        };
        match attempt {
            Ok(addr) => return Ok(addr),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "no active monitor yet; looking again");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Looks up the active monitor in ZooKeeper, keeping one session for repeated lookups (a
/// node that lost its monitor asks every few tens of milliseconds until a standby has
/// taken over).
pub struct MonitorFinder {
    rt: tokio::runtime::Runtime,
    zk: String,
    path: String,
    client: Option<zookeeper_client::Client>,
}

impl MonitorFinder {
    pub fn new(zk: &str, cluster: &str) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            rt,
            zk: zk.to_owned(),
            path: format!("/pmgas/{cluster}/leader"),
            client: None,
        })
    }

    /// The announced monitor's address; reconnects first if the session was lost.
    pub fn find(&mut self) -> Result<SocketAddr, String> {
        let Self {
            rt,
            zk,
            path,
            client,
        } = self;
        if client.as_ref().is_some_and(|c| c.state().is_terminated()) {
            *client = None;
        }
        let result = rt.block_on(async {
            if client.is_none() {
                let connect = zookeeper_client::Client::connector()
                    .with_session_timeout(Duration::from_secs(6))
                    .connect(zk);
                *client = Some(
                    tokio::time::timeout(Duration::from_secs(10), connect)
                        .await
                        .map_err(|_| format!("ZooKeeper at {zk} did not answer within 10 s"))?
                        .map_err(|e| format!("ZooKeeper at {zk}: {e}"))?,
                );
            }
            let c = client.as_ref().ok_or("no ZooKeeper session")?;
            let (data, _) = tokio::time::timeout(Duration::from_secs(2), c.get_data(path))
                .await
                .map_err(|_| format!("ZooKeeper at {zk} did not answer within 2 s"))?
                .map_err(|e| format!("no active monitor ({path}: {e})"))?;
            let text = String::from_utf8_lossy(&data).into_owned();
            text.parse()
                .map_err(|_| format!("{path} holds {text:?}, not an address"))
        });
        if result
            .as_ref()
            .is_err_and(|e: &String| e.contains("did not answer"))
        {
            *client = None;
        }
        result
    }
}

/// How long a joining node waits for the monitor's reconciliation.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(120);

impl Service<'_> {
    /// After a reconciliation: answers allocations carried over from a lost connection.
    /// A page the reconciliation committed is the caller's (its replicas are looked up);
    /// a page it freed means the allocation never happened: it is sent again.
    fn resume(&mut self, carried: Vec<Pending>) -> Result<(), String> {
        for p in carried {
            match self.pool.record(p.page) {
                Ok(r) if r.state == PageState::Allocated => {
                    tracing::info!(
                        page = p.page.0,
                        page_id = r.page_id.0,
                        "in-flight allocation was committed"
                    );
                    self.lookup_for(p, r.page_id)?;
                }
                // Freed by the reconciliation (and maybe taken since by another caller's new
                // allocation, which prepares pages on its own thread).
                Ok(_) => {
                    tracing::info!(
                        page = p.page.0,
                        "in-flight allocation was not committed; sending it again"
                    );
                    self.command(Command::AllocPage {
                        backups: p.backups,
                        prepared: None,
                        reply: p.reply,
                    })?;
                }
                Err(e) => {
                    let _ = p.reply.send(Err(ClientError::Local {
                        node: self.me,
                        reason: format!("page {} after reconciliation: {e}", p.page.0),
                    }));
                }
            }
        }
        Ok(())
    }

    /// Sends a MappingLookup; returns the message layer's request id.
    fn send_lookup(&mut self, page_id: PageId) -> Result<u64, pmgas_verbs::Error> {
        let wire_id = self.next_wire_id;
        self.next_wire_id += 1;
        let msg = Message::new(
            self.epoch,
            self.me,
            wire_id,
            Body::MappingLookup { page_id },
        );
        self.ep.request(&msg.encode(), self.timeout)
    }

    fn lookup_for(&mut self, p: Pending, page_id: PageId) -> Result<(), String> {
        let id = self
            .send_lookup(page_id)
            .map_err(|e| format!("sending MappingLookup: {e}"))?;
        self.outstanding
            .insert(id, Outstanding::Resolve(p, page_id));
        Ok(())
    }

    /// Serves the monitor (only Reconcile is expected now) until the ART is reconciled.
    fn await_reconcile(&mut self, timeout: Duration) -> Result<ReconcileReport, String> {
        let deadline = Instant::now() + timeout;
        while self.reconciled.is_none() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "the monitor did not reconcile this node within {timeout:?}"
                ));
            }
            match self.ep.poll() {
                Ok(Some(incoming)) => self.incoming(incoming)?,
                Ok(None) => {
                    self.sleep()?;
                    // A monitor that dies mid-reconciliation is noticed here (its
                    // successor reconciles this node from the start).
                    if self.ep.connection().peer_disconnected().unwrap_or(true) {
                        return Err("the monitor disconnected while reconciling".into());
                    }
                }
                Err(e) => return Err(format!("monitor connection lost: {e}")),
            }
        }
        Ok(self.reconciled.clone().unwrap_or_default())
    }

    fn serve(&mut self, commands: &Receiver<Command>) -> Result<(), String> {
        // Spin briefly while messages flow, then sleep until the CQ, rdma_cm or a caller
        // wakes us: several nodes and the monitor may share few cores (the rig has two).
        let mut spin = pmgas_verbs::spin::SpinThenSleep::default();
        loop {
            let mut busy = false;
            while self.ep.outstanding() < self.ep.request_limit() {
                match commands.try_recv() {
                    Ok(c) => {
                        busy = true;
                        self.command(c)?;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    // Every handle is gone: nothing more will be asked; keep serving as a
                    // backup until the monitor connection ends.
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            }
            match self.ep.poll() {
                Ok(Some(incoming)) => {
                    busy = true;
                    self.incoming(incoming)?;
                }
                Ok(None) => {}
                Err(e) => return Err(format!("monitor connection lost: {e}")),
            }
            busy |= self.answer_joins();
            if busy {
                spin.busy();
            } else if spin.should_sleep() {
                spin.busy();
                self.sleep()?;
                if self.ep.connection().peer_disconnected().unwrap_or(true) {
                    return Err("the monitor disconnected".into());
                }
            }
        }
    }

    /// Sleeps until a completion, an rdma_cm event, a caller's command or the next request
    /// deadline (at most a second).
    fn sleep(&mut self) -> Result<(), String> {
        let notifier = &self.shared.notifier;
        if !self
            .ep
            .arm()
            .map_err(|e| format!("monitor connection lost: {e}"))?
        {
            return Ok(());
        }
        let now = Instant::now();
        let timeout = self
            .ep
            .next_deadline()
            .map_or(Duration::from_secs(1), |d| d.saturating_duration_since(now))
            .min(Duration::from_secs(1));
        let conn = self.ep.connection();
        let fds = [conn.cq_event_fd(), conn.cm_event_fd(), notifier.fd()];
        pmgas_verbs::wait::wait_readable(&fds, timeout).map_err(|e| e.to_string())?;
        notifier.drain();
        Ok(())
    }

    fn command(&mut self, c: Command) -> Result<(), String> {
        match c {
            Command::AllocPage {
                backups,
                prepared,
                reply,
            } => {
                let page = match prepared {
                    Some(p) => p,
                    None => {
                        let mut table = self.pool;
                        match primary_prepare(&mut table) {
                            Ok(p) => p,
                            Err(ErrorCode::NoSpace) => {
                                let _ = reply.send(Err(ClientError::NoLocalSpace));
                                return Ok(());
                            }
                            Err(code) => {
                                let _ = reply.send(Err(ClientError::Local {
                                    node: self.me,
                                    reason: format!("{code:?}"),
                                }));
                                return Ok(());
                            }
                        }
                    }
                };
                let p = Pending {
                    page,
                    backups,
                    wire_id: self.next_wire_id,
                    reply,
                    sent_at: Instant::now(),
                };
                self.next_wire_id += 1;
                self.send_alloc(p)
            }
            Command::Lookup { page_id, reply } => {
                match self.send_lookup(page_id) {
                    Ok(id) => {
                        self.outstanding
                            .insert(id, Outstanding::Lookup(page_id, reply));
                    }
                    Err(e) => drop(reply.send(Err(ClientError::Stopped(e.to_string())))),
                }
                Ok(())
            }
            Command::Nodes { reply } => {
                let wire_id = self.next_wire_id;
                self.next_wire_id += 1;
                let msg = Message::new(self.epoch, self.me, wire_id, Body::NodesQuery);
                match self.ep.request(&msg.encode(), self.timeout) {
                    Ok(id) => {
                        self.outstanding.insert(id, Outstanding::Nodes(reply));
                    }
                    Err(e) => drop(reply.send(Err(ClientError::Stopped(e.to_string())))),
                }
                Ok(())
            }
        }
    }

    /// Sends (or resends: the wire id stays the same, so the monitor answers it once) a
    /// primary's AllocPage and tracks it under the message layer's request id.
    fn send_alloc(&mut self, p: Pending) -> Result<(), String> {
        let body = Body::AllocPage {
            primary_page: p.page,
            backups_wanted: p.backups,
        };
        let msg = Message::new(self.epoch, self.me, p.wire_id, body);
        let id = self
            .ep
            .request(&msg.encode(), self.timeout)
            .map_err(|e| format!("sending AllocPage: {e}"))?;
        self.outstanding.insert(id, Outstanding::Alloc(p));
        fault::point("node.preallocated");
        Ok(())
    }

    fn incoming(&mut self, incoming: Incoming) -> Result<(), String> {
        match incoming {
            Incoming::Request {
                request_id,
                payload,
            } => {
                if let Some(body) = self.monitor_request(request_id, &payload) {
                    let _ = self.ep.respond(
                        request_id,
                        &Message::new(self.epoch, self.me, 0, body).encode(),
                    );
                }
            }
            Incoming::Response {
                request_id,
                payload,
            } => {
                // Every monitor message carries its epoch: a newer one is adopted.
                let newer = Message::decode(&payload)
                    .ok()
                    .filter(|m| m.header.epoch > self.epoch);
                if let Some(m) = &newer {
                    self.adopt(m.header.epoch);
                }
                let refused_stale = matches!(
                    newer.map(|m| m.body),
                    Some(Body::Error {
                        code: ErrorCode::StaleEpoch,
                        ..
                    })
                );
                self.response(request_id, &payload, refused_stale)?;
            }
            Incoming::TimedOut { request_id } => match self.outstanding.remove(&request_id) {
                // Retry with the same wire request id: the monitor answers it once.
                Some(Outstanding::Alloc(p)) => self.send_alloc(p)?,
                Some(Outstanding::Resolve(p, page_id)) => self.lookup_for(p, page_id)?,
                Some(Outstanding::Lookup(page_id, reply)) => {
                    let _ = reply.send(Err(ClientError::Stopped(format!(
                        "no answer to the lookup of page {} within {:?}",
                        page_id.0, self.timeout
                    ))));
                }
                Some(Outstanding::Nodes(reply)) => {
                    let _ = reply.send(Err(ClientError::Stopped(format!(
                        "no answer to the node list within {:?}",
                        self.timeout
                    ))));
                }
                None => {}
            },
        }
        Ok(())
    }

    /// The monitor's answer to one of our requests. `refused_stale`: refused because the
    /// epoch moved on (just adopted): the monitor did not look at it, so an allocation is
    /// asked again in the new epoch with its page still PREALLOCATED.
    fn response(
        &mut self,
        request_id: u64,
        payload: &[u8],
        refused_stale: bool,
    ) -> Result<(), String> {
        match self.outstanding.remove(&request_id) {
            Some(Outstanding::Alloc(p)) if refused_stale => self.send_alloc(p)?,
            Some(Outstanding::Resolve(p, page_id)) if refused_stale => {
                self.lookup_for(p, page_id)?
            }
            Some(Outstanding::Lookup(page_id, reply)) if refused_stale => {
                match self.send_lookup(page_id) {
                    Ok(id) => {
                        self.outstanding
                            .insert(id, Outstanding::Lookup(page_id, reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ClientError::Stopped(format!(
                            "sending MappingLookup: {e}"
                        ))));
                    }
                }
            }
            Some(Outstanding::Alloc(p)) => self.alloc_answer(p, payload),
            Some(Outstanding::Nodes(reply)) => {
                let answer = match Message::decode(payload).map(|m| m.body) {
                    Ok(Body::NodeList { nodes }) => Ok(nodes),
                    Ok(Body::Error { code, detail }) => Err(ClientError::Refused { code, detail }),
                    other => Err(ClientError::Refused {
                        code: ErrorCode::Malformed,
                        detail: format!("unexpected answer to NodesQuery: {other:?}"),
                    }),
                };
                let _ = reply.send(answer);
            }
            Some(Outstanding::Resolve(p, page_id)) => {
                let answer = match Message::decode(payload).map(|m| m.body) {
                    Ok(Body::Mapping {
                        page_id: got,
                        replicas,
                    }) if got == page_id => {
                        self.shared.remember(page_id, self.epoch, &replicas);
                        Ok(GlobalPage {
                            page_id,
                            page: p.page,
                            replicas,
                            epoch: self.epoch,
                        })
                    }
                    other => Err(ClientError::Local {
                        node: self.me,
                        reason: format!(
                            "page {} was committed as page id {} but its mapping could not be read: {other:?}",
                            p.page.0, page_id.0
                        ),
                    }),
                };
                let _ = p.reply.send(answer);
            }
            Some(Outstanding::Lookup(page_id, reply)) => {
                let answer = match Message::decode(payload).map(|m| m.body) {
                    Ok(Body::Mapping {
                        page_id: got,
                        replicas,
                    }) if got == page_id => Ok(Mapping::new(page_id, replicas)),
                    Ok(Body::Error { code, detail }) => Err(ClientError::Refused { code, detail }),
                    other => Err(ClientError::Refused {
                        code: ErrorCode::Malformed,
                        detail: format!("unexpected answer to a lookup: {other:?}"),
                    }),
                };
                let _ = reply.send(answer);
            }
            None => {}
        }
        Ok(())
    }

    /// The monitor's answer to one of our AllocPage requests: commit or free the primary
    /// page, durably, then tell the caller.
    fn alloc_answer(&mut self, p: Pending, payload: &[u8]) {
        let mut table = self.pool;
        let answer = Message::decode(payload).map(|m| m.body);
        let result = match answer {
            Ok(Body::Commit {
                page_id, replicas, ..
            }) => primary_finish(&mut table, p.page, self.epoch, Ok((page_id, &replicas)))
                .inspect(|()| fault::point("node.primary-committed"))
                .map(|()| GlobalPage {
                    page_id,
                    page: p.page,
                    replicas,
                    epoch: self.epoch,
                })
                .map_err(|code| ClientError::Local {
                    node: self.me,
                    reason: format!("committing the primary page: {code:?}"),
                }),
            Ok(Body::Error { code, detail }) => {
                let freed = primary_finish(&mut table, p.page, self.epoch, Err(code));
                if let Err(e) = freed {
                    tracing::error!(page = p.page.0, ?e, "could not free an aborted page");
                }
                Err(ClientError::Refused { code, detail })
            }
            other => {
                // Not an answer we understand: the outcome is unknown, so the page stays
                // PREALLOCATED for reconciliation rather than being freed on a guess.
                tracing::error!(?other, page = p.page.0, "unexpected answer to AllocPage");
                Err(ClientError::Refused {
                    code: ErrorCode::Malformed,
                    detail: format!("unexpected answer to AllocPage: {other:?}"),
                })
            }
        };
        if let Ok(g) = &result {
            self.shared.remember(g.page_id, g.epoch, &g.replicas);
            tracing::debug!(
                page_id = g.page_id.0,
                us = p.sent_at.elapsed().as_micros() as u64,
                "allocated"
            );
        }
        let _ = p.reply.send(result);
    }

    /// Handles one request from the monitor (this node as a backup). Malformed or
    /// stale-epoch requests are refused without touching the pool.
    /// One request of the monitor's (`msg_id`: its message-layer id): the answer now, or
    /// `None` when it comes later (an AddReplica's, once the copy is done:
    /// [`Service::answer_joins`]).
    fn monitor_request(&mut self, msg_id: u64, payload: &[u8]) -> Option<Body> {
        let m = match Message::decode(payload) {
            Err(e) => {
                return Some(Body::Error {
                    code: ErrorCode::Malformed,
                    detail: e.to_string(),
                });
            }
            Ok(m) => m,
        };
        if m.header.epoch > self.epoch {
            self.adopt(m.header.epoch);
        }
        if m.header.epoch != self.epoch {
            return Some(Body::Error {
                code: ErrorCode::StaleEpoch,
                detail: format!("epoch {} is not {}", m.header.epoch.0, self.epoch.0),
            });
        }
        Some(match m.body {
            // R3: answered by the data path when the copy is acknowledged.
            Body::AddReplica {
                txn_id,
                page_id,
                target,
            } => {
                self.adding.insert(txn_id, msg_id);
                self.shared.rereplica.ask(crate::rereplica::AddReplica {
                    txn_id,
                    page_id,
                    target,
                });
                return None;
            }
            body => self.monitor_order(body),
        })
    }

    /// The answer to one of the monitor's requests (the epoch checked).
    fn monitor_order(&mut self, body: Body) -> Body {
        let mut table = self.pool;
        let failed = |code, what: String| Body::Error { code, detail: what };
        match body {
            Body::Prepare { txn_id } => match self.participant.prepare(&mut table, txn_id) {
                Ok(page) => {
                    fault::point("node.prepared");
                    Body::Prepared { txn_id, page }
                }
                Err(code) => failed(code, format!("prepare {txn_id}")),
            },
            // R2: a page to receive a copy of `page_id`.
            Body::PrepareCopy { txn_id, page_id } => {
                match self.participant.prepare(&mut table, txn_id) {
                    Ok(page) => {
                        self.shared.rereplica.expect_copy(page, page_id);
                        fault::point("node.rereplicate-prepared");
                        Body::Prepared { txn_id, page }
                    }
                    Err(code) => failed(code, format!("prepare a copy of page {}", page_id.0)),
                }
            }
            // R6 on the primary: the page's mapping is now this (with the new replica, or
            // without it: the re-replication was rolled back); a join of the page ends.
            Body::Mapping { page_id, replicas } => {
                self.shared.remember(page_id, self.epoch, &replicas);
                self.shared.rereplica.notice(page_id, replicas.clone());
                Body::Mapping { page_id, replicas }
            }
            Body::Commit {
                txn_id,
                page_id,
                replicas,
            } => match self
                .participant
                .commit(&mut table, txn_id, page_id, self.epoch, &replicas)
            {
                Ok(()) => {
                    self.shared.remember(page_id, self.epoch, &replicas);
                    for r in replicas.iter().filter(|r| r.node == self.me) {
                        self.shared.rereplica.copy_ended(r.page);
                    }
                    fault::point("node.backup-committed");
                    Body::CommitAck { txn_id, page_id }
                }
                Err(code) => failed(code, format!("commit {txn_id}")),
            },
            Body::Abort { txn_id } => {
                // A page prepared for a copy takes no more Replicates before it is freed.
                if let Some(page) = self.participant.page_of(txn_id) {
                    self.shared.rereplica.copy_ended(page);
                }
                match self.participant.abort(&mut table, txn_id) {
                    Ok(()) => Body::AbortAck { txn_id },
                    Err(code) => failed(code, format!("abort {txn_id}")),
                }
            }
            Body::Reconcile { last, entries } => {
                for (page, id) in entries {
                    self.reconcile.insert(page, (id, self.epoch));
                }
                if !last {
                    return Body::Reconciled {
                        committed: 0,
                        freed: 0,
                        unknown_allocated: 0,
                        conflicting: 0,
                    };
                }
                let gat = std::mem::take(&mut self.reconcile);
                match self.pool.reconcile(&gat) {
                    Ok(r) => {
                        let count = |n: usize| n as u32;
                        tracing::info!(
                            committed = r.committed.len(),
                            freed = r.freed.len(),
                            unknown_allocated = r.unknown_allocated.len(),
                            conflicting = r.conflicting.len(),
                            "ART reconciled with the GAT"
                        );
                        let body = Body::Reconciled {
                            committed: count(r.committed.len()),
                            freed: count(r.freed.len()),
                            unknown_allocated: count(r.unknown_allocated.len()),
                            conflicting: count(r.conflicting.len()),
                        };
                        self.reconciled = Some(r);
                        fault::point("node.reconciled");
                        body
                    }
                    Err(e) => failed(ErrorCode::Internal, format!("reconcile: {e}")),
                }
            }
            Body::FreeReplicas { entries } => self.free_replicas(&entries),
            Body::Heartbeat { seq } => Body::Heartbeat { seq },
            Body::EpochChanged { dead_node } => {
                tracing::warn!(%dead_node, epoch = self.epoch.0, "a data server was declared dead");
                Body::EpochChanged { dead_node }
            }
            other => failed(
                ErrorCode::Malformed,
                format!("{} is not a request to a node", other.name()),
            ),
        }
    }

    /// R4: answers the AddReplica requests whose copies the data path finished (or
    /// gave up). Returns whether there were any.
    fn answer_joins(&mut self) -> bool {
        let answers = self.shared.rereplica.take_answers();
        let any = !answers.is_empty();
        for (txn_id, body) in answers {
            if let Some(msg_id) = self.adding.remove(&txn_id) {
                let msg = Message::new(self.epoch, self.me, 0, body).encode();
                let _ = self.ep.respond(msg_id, &msg);
            }
        }
        any
    }

    /// F3 on this node: its replicas of freed pages go FREE (zeroed first), each only if
    /// still ALLOCATED under the freed id, and leave the mapping cache. The data path
    /// stores only into pages ALLOCATED under the update's id, checked under the ART's lock
    /// ([`Pool::store_in_page_as`]), so an update still in flight lands nowhere.
    fn free_replicas(&mut self, entries: &[(PageIndex, PageId)]) -> Body {
        let mut count = 0u32;
        for &(page, page_id) in entries {
            self.shared.cache.remove(page_id);
            // C5: no client may still serve a cached block of the page once it is freed.
            let wait = self
                .shared
                .leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .freeing(page_id);
            if !wait.is_zero() {
                tracing::debug!(
                    page_id = page_id.0,
                    ?wait,
                    "free waits for cached blocks' leases"
                );
                std::thread::sleep(wait);
            }
            let freed = self.pool.free_page(page, page_id);
            self.shared
                .leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .freed(page_id);
            match freed {
                Ok(true) => {
                    count += 1;
                    println!(
                        "REPLICA FREED node={} page_id={} page={} unix_ms={}",
                        self.me.0,
                        page_id.0,
                        page.0,
                        fault::unix_ms()
                    );
                    fault::point("node.replica-freed");
                }
                Ok(false) => {}
                Err(e) => {
                    return Body::Error {
                        code: ErrorCode::Internal,
                        detail: format!("freeing page {} (id {}): {e}", page.0, page_id.0),
                    };
                }
            }
        }
        Body::Freed { count }
    }

    /// Moves to a newer config epoch, announced by the monitor (a data server was declared
    /// dead): requests go out in it, and mappings cached in older epochs are looked up
    /// again ([`Client::lookup`]).
    fn adopt(&mut self, epoch: Epoch) {
        if epoch > self.epoch {
            tracing::info!(
                from = self.epoch.0,
                to = epoch.0,
                "adopted a new config epoch"
            );
            self.epoch = epoch;
            self.shared.epoch.store(epoch.0, Ordering::Release);
            let dropped = self.shared.cache.drop_older_than(epoch);
            tracing::debug!(dropped, "mapping cache entries of older epochs dropped");
        }
    }
}
