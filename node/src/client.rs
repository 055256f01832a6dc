//! The co-located application's handle on a pmgas data node: [`Client`].
//!
//! A `Client` starts the node's service ([`crate::service`]: the monitor connection, the
//! join and reconciliation, the two-phase participant) on a thread of its own and carries
//! out the application's requests through it:
//!
//! - [`Client::alloc_page`]: a replicated page whose primary is this node — pre-allocated
//!   here (durably), then the monitor's two-phase allocation; the page is ALLOCATED here
//!   only after every backup committed and the mapping is durable in ZooKeeper;
//! - [`Client::alloc`] / [`Client::free`]: objects of any size inside this node's pages
//!   (the crash-consistent slab allocator of [`crate::objects`]), new slabs on new
//!   replicated pages;
//! - [`Client::lookup`]: where a page's replicas live, from the mapping-table cache (a hit
//!   costs a hash lookup) or, on a miss, from the monitor over RDMA.
//!
//! Every method may be called from any number of threads; calls wait for their answer.
//!
//! ```no_run
//! use std::sync::Arc;
//! use pmgas_layout::{ClusterId, NodeId};
//! use pmgas_node::{Client, ClientConfig, OnBlank, Pool, PoolIdentity};
//!
//! let id = PoolIdentity { cluster_id: ClusterId(7), node_id: NodeId(1), page_size_bytes: 2 << 20 };
//! let pool = Pool::open("/dev/dax0.0".as_ref(), None, OnBlank::Format(id), Some(id)).unwrap();
//! let client = Client::connect(
//!     ClientConfig::new(NodeId(1), "10.0.0.1".parse().unwrap(), "10.0.0.4:7000".parse().unwrap()),
//!     Arc::new(pool),
//! ).unwrap();
//! let page = client.alloc_page(2).unwrap();          // this node + 2 backups
//! println!("page {} at {:#x} on {:?}", page.page_id.0, page.addr(2 << 20).raw(), page.replicas);
//! let obj = client.alloc(100).unwrap();              // 100 bytes somewhere on this node
//! let where_ = client.lookup(obj.page()).unwrap();   // cached: no round trip
//! assert_eq!(where_.replicas[0].node, NodeId(1));
//! client.free(obj).unwrap();
//! ```

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use pmgas_layout::gat::Mapping;
use pmgas_layout::wire::{ErrorCode, Replica};
use pmgas_layout::{ArtRecord, Epoch, GlobalAddr, NodeId, PageId, PageIndex};

use crate::art::ReconcileReport;
use crate::data::DataServer;
use crate::objects::{ObjectAllocator, ObjectError, PageSource};
use crate::pool::Pool;
use crate::service::{self, Command, Shared};

/// How a [`Client`] reaches its cluster.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub node_id: NodeId,
    /// This node's address: picks its RDMA device.
    pub bind: IpAddr,
    /// The active monitor's rdma_cm address.
    pub monitor: SocketAddr,
    /// Backups of the pages that [`Client::alloc`] takes for new slabs.
    pub object_backups: u8,
    /// How long one monitor request may go unanswered before it is resent.
    pub request_timeout: Duration,
    /// ZooKeeper connect string and cluster name: when the monitor connection is lost,
    /// find the active monitor there and rejoin (without it, the service stops).
    pub rediscover: Option<(String, String)>,
    /// Serve the data path (clients' reads and updates, primaries' Replicates) on this
    /// port of `bind` (0: any free port); `None`: no data path.
    pub data_port: Option<u16>,
    /// The lease a primary grants a client's cached block (`node/CACHE.md`).
    pub cache_lease: Duration,
}

impl ClientConfig {
    pub fn new(node_id: NodeId, bind: IpAddr, monitor: SocketAddr) -> Self {
        Self {
            node_id,
            bind,
            monitor,
            object_backups: 2,
            request_timeout: Duration::from_secs(30),
            rediscover: None,
            data_port: None,
            cache_lease: crate::data::DEFAULT_CACHE_LEASE,
        }
    }
}

/// A replicated page allocated through [`Client::alloc_page`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalPage {
    pub page_id: PageId,
    /// Where it is in this node's pool.
    pub page: PageIndex,
    /// Every replica, this node (the primary) first.
    pub replicas: Vec<Replica>,
    pub epoch: Epoch,
}

impl GlobalPage {
    /// The global address of the page's first byte (`page_id << 32`).
    pub fn addr(&self, page_size_bytes: u64) -> GlobalAddr {
        GlobalAddr::new(self.page_id, 0, page_size_bytes).expect("offset 0 is in every page")
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The monitor answered with an error the application can act on: `NotEnoughNodes`
    /// (fewer live nodes than replicas asked for), `NoSpace` (a backup is full),
    /// `StaleEpoch`, `NotLeader`, `UnknownPage` (lookup of an unmapped page), …
    #[error("the monitor refused: {code:?}: {detail}")]
    Refused { code: ErrorCode, detail: String },
    /// This node has no FREE page left (nothing was sent).
    #[error("no free page left on this node")]
    NoLocalSpace,
    #[error("objects: {0}")]
    Object(String),
    /// The node's connection to the monitor is gone. An allocation in flight then has an
    /// unknown outcome: its page stays PREALLOCATED here until reconciliation with the GAT
    /// settles it (never freed on a guess, never handed out twice).
    #[error("the node's service stopped: {0}")]
    Stopped(String),
    #[error("node {node}: the local pool refused: {reason}")]
    Local { node: NodeId, reason: String },
}

impl From<ObjectError> for ClientError {
    fn from(e: ObjectError) -> Self {
        Self::Object(e.to_string())
    }
}

/// New slabs of [`Client::alloc`] come from the two-phase allocation.
struct ClusterPages {
    shared: Arc<Shared>,
    backups: u8,
}

impl PageSource for ClusterPages {
    fn commit(&self, pool: &Pool, page: PageIndex) -> Result<ArtRecord, ObjectError> {
        let result = self.shared.call(|reply| Command::AllocPage {
            backups: self.backups,
            prepared: Some(page),
            reply,
        });
        match result {
            Ok(_) => Ok(pool.record(page)?),
            Err(e) => Err(ObjectError::PageSource(e.to_string())),
        }
    }
}

/// The application's handle on this node; see the module documentation.
pub struct Client {
    shared: Arc<Shared>,
    objects: ObjectAllocator,
    service: Option<JoinHandle<Result<(), String>>>,
}

impl Client {
    /// Starts the node's service: registers `pool` for RDMA, connects to the monitor and
    /// joins. Returns once joined, or with the monitor's refusal (wrong cluster, page
    /// size, duplicate node id) or the connection error.
    pub fn connect(config: ClientConfig, pool: Arc<Pool>) -> Result<Self, ClientError> {
        // The data path listens before the join, which tells the monitor its port.
        let mut config = config;
        let data = match config.data_port {
            Some(port) => {
                let d = DataServer::bind(
                    config.node_id,
                    SocketAddr::new(config.bind, port),
                    Arc::clone(&pool),
                    config.cache_lease,
                )
                .map_err(ClientError::Stopped)?;
                config.data_port = Some(d.port());
                Some(d)
            }
            None => None,
        };
        let registered = data.as_ref().map(DataServer::registered);
        let (shared, service) = service::start(&config, &pool, registered)?;
        if let Some(d) = data {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("pmgas-data{}", config.node_id.0))
                .spawn(move || d.run(shared))
                .map_err(|e| ClientError::Stopped(e.to_string()))?;
        }
        let source = ClusterPages {
            shared: Arc::clone(&shared),
            backups: config.object_backups,
        };
        // PREALLOCATED pages are left alone: reconciliation with the GAT settles them.
        let objects = ObjectAllocator::open(pool, Box::new(source), false)?;
        Ok(Self {
            shared,
            objects,
            service: Some(service),
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.shared.me
    }

    /// The config epoch this node joined in.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.shared.epoch.load(Ordering::Acquire))
    }

    /// Allocates a page with this node as primary and `backups` replicas on other nodes
    /// (never two on one node). Fails cleanly, with nothing left allocated, when there are
    /// fewer other live nodes than `backups`, when a backup or this node is full, or when
    /// the mapping cannot be made durable.
    pub fn alloc_page(&self, backups: u8) -> Result<GlobalPage, ClientError> {
        self.shared.call(|reply| Command::AllocPage {
            backups,
            prepared: None,
            reply,
        })
    }

    /// Allocates an object of `size` bytes (8 B up to a page less its slab header) on
    /// this node; takes a new replicated page when no slab of its size class has room.
    pub fn alloc(&self, size: u64) -> Result<GlobalAddr, ClientError> {
        Ok(self.objects.thread_cache().alloc(size)?)
    }

    /// Frees an object returned by [`Self::alloc`]. Anything else is refused unchanged.
    pub fn free(&self, addr: GlobalAddr) -> Result<(), ClientError> {
        Ok(self.objects.free(addr)?)
    }

    /// Where page `page_id` lives: a hit in the mapping cache costs a hash lookup; a miss
    /// (or an entry from an older epoch) asks the monitor over RDMA and caches the answer.
    pub fn lookup(&self, page_id: PageId) -> Result<Mapping, ClientError> {
        self.shared.lookup(page_id)
    }

    /// Drops a page's entry from the mapping cache (the next lookup asks the monitor).
    pub fn invalidate(&self, page_id: PageId) {
        self.shared.cache.remove(page_id);
    }

    /// What reconciling this node's ART with the GAT did when it joined: PREALLOCATED
    /// pages committed or freed, ALLOCATED pages the GAT does not know (left untouched).
    pub fn reconcile_report(&self) -> ReconcileReport {
        self.shared
            .reconciled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }

    /// Lookups that went to the monitor (cache misses) so far.
    pub fn remote_lookups(&self) -> u64 {
        self.shared.lookups_remote.load(Ordering::Relaxed)
    }

    /// The object allocator (statistics, the list of live objects).
    pub fn objects(&self) -> &ObjectAllocator {
        &self.objects
    }

    /// Whether the service is still running (false once the monitor connection is gone).
    pub fn is_running(&self) -> bool {
        !self.shared.stopped.load(Ordering::Acquire)
    }

    /// Waits until the service stops (the monitor connection ended) and returns why.
    pub fn wait(mut self) -> Result<(), String> {
        match self.service.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the node service panicked".into()),
            None => Ok(()),
        }
    }
}
