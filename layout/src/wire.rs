//! Wire messages of the pmgas control protocol (monitor <-> nodes), carried as payloads of
//! the verbs message layer. FORMAT.md describes the bytes.
//!
//! Every message is a 32-byte header — magic, version, kind, body length, epoch, sender,
//! request id — and a body whose size the kind fixes (or bounds, for lists and text).
//! [`Message::decode`] checks all of it, including that reserved bytes are zero, and
//! returns [`WireError`] on anything else; it never panics.

use crate::PageId;
use crate::ids::{ClusterId, Epoch, NodeId, PageIndex};

pub const WIRE_MAGIC: u16 = 0x4750;
pub const WIRE_VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 32;
/// Most replicas of one page (primary included).
pub const MAX_REPLICAS: usize = 8;
/// Longest error detail text.
pub const MAX_DETAIL_BYTES: usize = 256;
/// Most (page, page id) entries in one [`Body::Reconcile`].
pub const MAX_RECONCILE_ENTRIES: usize = 256;
/// Blocks one CacheRenew or Renewed names at most.
pub const MAX_CACHE_BLOCKS: usize = 256;
/// Most bytes one [`Body::Update`] or [`Body::Replicate`] carries (a longer write is
/// several updates).
pub const MAX_UPDATE_BYTES: usize = 4096;
/// Most nodes in one [`Body::NodeList`].
pub const MAX_NODES: usize = 64;
/// Largest encoded message (an Update of [`MAX_UPDATE_BYTES`]; a full Reconcile is
/// smaller).
pub const MAX_MESSAGE_BYTES: usize = HEADER_BYTES + 32 + MAX_UPDATE_BYTES;
const _: () = assert!(HEADER_BYTES + 8 + MAX_RECONCILE_ENTRIES * 8 <= MAX_MESSAGE_BYTES);
const _: () = assert!(HEADER_BYTES + 8 + MAX_NODES * 16 <= MAX_MESSAGE_BYTES);
const _: () = assert!(HEADER_BYTES + 16 + MAX_CACHE_BLOCKS * 8 <= MAX_MESSAGE_BYTES);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    #[error("malformed message: {0}")]
    Corrupt(String),
}

fn corrupt<T>(reason: impl Into<String>) -> Result<T, WireError> {
    Err(WireError::Corrupt(reason.into()))
}

/// Fields every message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub epoch: Epoch,
    pub sender: NodeId,
    pub request_id: u64,
}

/// One replica of a page: which node, which page of its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Replica {
    pub node: NodeId,
    pub page: PageIndex,
}

/// Why a request failed; the numeric codes are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    Malformed,
    StaleEpoch,
    UnknownPage,
    NoSpace,
    NotEnoughNodes,
    WrongCluster,
    DuplicateNode,
    BadGeometry,
    NotLeader,
    Internal,
    /// A backup failed or left while preparing (timed out, disconnected): the transaction
    /// was aborted and nothing allocated; asking again is safe.
    BackupLost,
    /// Every replica of the page was on data servers declared dead: its contents are gone
    /// (the page id is never reused).
    PageLost,
    /// A data request went to a node that is not the page's primary in its epoch (the
    /// mapping changed: look it up again). Nothing was applied.
    NotPrimary,
    /// A data request names bytes outside its page, or an 8-byte operation on an
    /// unaligned address. Nothing was applied.
    BadAddress,
    /// The page was freed (its id is never handed out again). Nothing was applied.
    PageFreed,
    /// A cache fill or renewal from a client whose invalidation connection the primary
    /// does not know (never opened, or lost): open it again (`CacheListen`).
    NotListening,
    /// The page is being given a new replica (re-replication) past the point where a free
    /// could come between: ask again shortly. Nothing changed.
    Busy,
}

impl ErrorCode {
    const ALL: [Self; 17] = [
        Self::Malformed,
        Self::StaleEpoch,
        Self::UnknownPage,
        Self::NoSpace,
        Self::NotEnoughNodes,
        Self::WrongCluster,
        Self::DuplicateNode,
        Self::BadGeometry,
        Self::NotLeader,
        Self::Internal,
        Self::BackupLost,
        Self::PageLost,
        Self::NotPrimary,
        Self::BadAddress,
        Self::PageFreed,
        Self::NotListening,
        Self::Busy,
    ];

    pub fn code(self) -> u16 {
        Self::ALL
            .iter()
            .position(|c| *c == self)
            .map_or(0, |i| i as u16 + 1)
    }

    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.get((code as usize).checked_sub(1)?).copied()
    }
}

/// A node registering with the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Join {
    pub cluster_id: ClusterId,
    pub page_size_bytes: u64,
    pub page_count: u32,
    pub free_pages: u32,
    /// The node's whole PM mapping (header, ART, pages) as registered for RDMA:
    /// `rkey` grants remote read, write and atomics on the pages (from the pool's data
    /// offset on), `art_rkey` remote read only of the header and ART before it (the
    /// monitor's one-sided cross-check; nobody may write a node's ART remotely).
    pub region_addr: u64,
    pub region_len: u64,
    pub rkey: u32,
    /// Where the node accepts rdma_cm connections.
    pub cm_ip: [u8; 4],
    pub cm_port: u16,
    pub art_rkey: u32,
}

/// Where a data node accepts data-path connections, as the monitor lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeInfo {
    pub node: NodeId,
    pub ip: [u8; 4],
    pub port: u16,
    pub free_pages: u32,
}

/// What an [`Body::Update`] does to the bytes at its offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOp {
    /// Store these bytes (at most [`MAX_UPDATE_BYTES`], within the page).
    Write(Vec<u8>),
    /// If the aligned 8-byte word equals `expected`, store `new`; answer the old word.
    CompareAndSwap { expected: u64, new: u64 },
    /// Add `delta` (wrapping) to the aligned 8-byte word; answer the old word.
    FetchAdd { delta: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Join(Join),
    JoinAck {
        live_nodes: u32,
    },
    /// Primary -> monitor: "I pre-allocated `primary_page`; find me backups."
    AllocPage {
        primary_page: PageIndex,
        backups_wanted: u8,
    },
    /// Monitor -> backup: pre-allocate a page for transaction `txn_id`.
    Prepare {
        txn_id: u64,
    },
    Prepared {
        txn_id: u64,
        page: PageIndex,
    },
    /// Monitor -> every replica (backups first, primary last): the durable mapping.
    Commit {
        txn_id: u64,
        page_id: PageId,
        replicas: Vec<Replica>,
    },
    CommitAck {
        txn_id: u64,
        page_id: PageId,
    },
    Abort {
        txn_id: u64,
    },
    AbortAck {
        txn_id: u64,
    },
    MappingLookup {
        page_id: PageId,
    },
    /// Replicas of a page, primary first.
    Mapping {
        page_id: PageId,
        replicas: Vec<Replica>,
    },
    Error {
        code: ErrorCode,
        detail: String,
    },
    /// Monitor -> a joining node: these of its pages are committed in the GAT (page index,
    /// page id), in as many messages as needed; `last` ends the list, and the node then
    /// reconciles its ART with it (PREALLOCATED pages listed become ALLOCATED, the others
    /// FREE; ALLOCATED pages not listed are reported, never freed).
    Reconcile {
        last: bool,
        entries: Vec<(PageIndex, PageId)>,
    },
    /// Node -> monitor, for each Reconcile; the counts are those of the reconciliation
    /// (zero until `last`).
    Reconciled {
        committed: u32,
        freed: u32,
        unknown_allocated: u32,
        conflicting: u32,
    },
    /// Monitor -> every node (and the node echoes it back): a data server was declared
    /// dead and the config epoch (the header's) moved on; mappings cached from older
    /// epochs must be looked up again. Any monitor message with a newer epoch says the
    /// same; this one says it at once.
    EpochChanged {
        dead_node: NodeId,
    },
    /// Monitor -> node, echoed back: the node is alive and its service answers. A node
    /// that answers nothing (not even an error) for the monitor's heartbeat timeout is
    /// disconnected, as if its connection had failed.
    Heartbeat {
        seq: u64,
    },
    /// Anyone -> monitor: which data nodes are live, where they take data-path
    /// connections, and how much room they have.
    NodesQuery,
    NodeList {
        nodes: Vec<NodeInfo>,
    },
    /// Client or node -> data node, first on a data-path connection: where its pages are
    /// for one-sided READs.
    DataHello,
    /// The pages' region: page `i` starts at `data_addr + i * page_size_bytes`, readable
    /// with `rkey`; the header and ART at `art_addr`, readable with `art_rkey`; page `i`'s
    /// version word (`node/CACHE.md`) at `version_addr + 8 * i`, readable with
    /// `version_rkey`.
    DataHelloAck {
        page_size_bytes: u64,
        data_addr: u64,
        art_addr: u64,
        rkey: u32,
        art_rkey: u32,
        page_count: u32,
        version_rkey: u32,
        version_addr: u64,
    },
    /// Client -> the page's primary: apply `op` at `offset` of page `page_id`, durably on
    /// every live replica, then answer [`Body::UpdateAck`].
    Update {
        page_id: PageId,
        offset: u32,
        op: UpdateOp,
    },
    /// The word before the update (CAS, FAA; 0 for a write).
    UpdateAck {
        old: u64,
    },
    /// Primary -> backup: store these bytes at `offset` of `page` (the backup's replica of
    /// `page_id`), durably, then answer [`Body::ReplicateAck`]. Absolute bytes, one in
    /// flight per page: sending it again is harmless.
    Replicate {
        page_id: PageId,
        page: PageIndex,
        offset: u32,
        data: Vec<u8>,
    },
    ReplicateAck {
        page_id: PageId,
    },
    /// Client -> data node: allocate a page with this node as primary (answered with
    /// [`Body::Mapping`]).
    DataAlloc {
        backups_wanted: u8,
    },
    /// Client -> monitor: free page `page_id` (a tombstone in the GAT, then every replica
    /// FREE); answered [`Body::Freed`] once every live replica is FREE.
    FreePage {
        page_id: PageId,
    },
    /// Monitor -> node: these of its pages held these page ids, which are freed: each
    /// still ALLOCATED under its id becomes FREE (zeroed first); the others are left as
    /// they are. Answered [`Body::Freed`].
    FreeReplicas {
        entries: Vec<(PageIndex, PageId)>,
    },
    /// How many replicas the free turned FREE (a node: of the entries it was sent; the
    /// monitor: of the page's replicas).
    Freed {
        count: u32,
    },
    /// Client -> the page's primary (`node/CACHE.md` C1): register client `client` (whose
    /// invalidation connection said [`Body::CacheListen`]) as a sharer of block `block`
    /// (of `block_bytes`, a power of two) of `page_id`, posted with the READs that fill
    /// it. Answered [`Body::Leased`].
    CacheFill {
        page_id: PageId,
        block: u32,
        block_bytes: u32,
        client: u64,
    },
    /// The lease granted (`lease_ms` 0: not cacheable now, an update of the page is in
    /// flight) and the page's version word when the sharer was registered.
    Leased {
        lease_ms: u32,
        version: u64,
    },
    /// Primary -> a sharer (C3, C5): drop block `block` of `page_id`; answered
    /// [`Body::Invalidated`] once dropped.
    Invalidate {
        page_id: PageId,
        block: u32,
    },
    Invalidated {
        page_id: PageId,
        block: u32,
    },
    /// Client -> data node, first on a connection of its own: invalidations of client
    /// `client`'s cached blocks come on this connection. Answered with the same message.
    CacheListen {
        client: u64,
    },
    /// Client -> the pages' primary (`node/CACHE.md` C2a): extend the leases of these
    /// cached blocks (of `block_bytes`), which the client holds under leases still running.
    /// Answered [`Body::Renewed`].
    CacheRenew {
        client: u64,
        block_bytes: u32,
        blocks: Vec<(PageId, u32)>,
    },
    /// The blocks whose leases were extended by `lease_ms` (from when the primary answered);
    /// the others must be filled again.
    Renewed {
        lease_ms: u32,
        blocks: Vec<(PageId, u32)>,
    },
    /// Monitor -> a re-replication's target (`monitor/REREPLICATION.md` R2): pre-allocate
    /// a page for transaction `txn_id` that will receive a copy of `page_id` (Replicates
    /// of `page_id` may store into it before it commits). Answered [`Body::Prepared`].
    PrepareCopy {
        txn_id: u64,
        page_id: PageId,
    },
    /// Monitor -> the page's primary (R3): copy the page to `target` through the page's
    /// update queue and send it every later update. Answered [`Body::ReplicaAdded`] once
    /// the copy is acknowledged.
    AddReplica {
        txn_id: u64,
        page_id: PageId,
        target: Replica,
    },
    /// R4: the copy of `bytes` is on the target, which now gets every update.
    ReplicaAdded {
        txn_id: u64,
        page_id: PageId,
        bytes: u64,
    },
}

impl Body {
    fn kind(&self) -> u8 {
        match self {
            Self::Join(_) => 1,
            Self::JoinAck { .. } => 2,
            Self::AllocPage { .. } => 3,
            Self::Prepare { .. } => 4,
            Self::Prepared { .. } => 5,
            Self::Commit { .. } => 6,
            Self::CommitAck { .. } => 7,
            Self::Abort { .. } => 8,
            Self::AbortAck { .. } => 9,
            Self::MappingLookup { .. } => 10,
            Self::Mapping { .. } => 11,
            Self::Error { .. } => 12,
            Self::Reconcile { .. } => 13,
            Self::Reconciled { .. } => 14,
            Self::EpochChanged { .. } => 15,
            Self::Heartbeat { .. } => 16,
            Self::NodesQuery => 17,
            Self::NodeList { .. } => 18,
            Self::DataHello => 19,
            Self::DataHelloAck { .. } => 20,
            Self::Update { .. } => 21,
            Self::UpdateAck { .. } => 22,
            Self::Replicate { .. } => 23,
            Self::ReplicateAck { .. } => 24,
            Self::DataAlloc { .. } => 25,
            Self::FreePage { .. } => 26,
            Self::FreeReplicas { .. } => 27,
            Self::Freed { .. } => 28,
            Self::CacheFill { .. } => 29,
            Self::Leased { .. } => 30,
            Self::Invalidate { .. } => 31,
            Self::Invalidated { .. } => 32,
            Self::CacheListen { .. } => 33,
            Self::CacheRenew { .. } => 34,
            Self::Renewed { .. } => 35,
            Self::PrepareCopy { .. } => 36,
            Self::AddReplica { .. } => 37,
            Self::ReplicaAdded { .. } => 38,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Join(_) => "Join",
            Self::JoinAck { .. } => "JoinAck",
            Self::AllocPage { .. } => "AllocPage",
            Self::Prepare { .. } => "Prepare",
            Self::Prepared { .. } => "Prepared",
            Self::Commit { .. } => "Commit",
            Self::CommitAck { .. } => "CommitAck",
            Self::Abort { .. } => "Abort",
            Self::AbortAck { .. } => "AbortAck",
            Self::MappingLookup { .. } => "MappingLookup",
            Self::Mapping { .. } => "Mapping",
            Self::Error { .. } => "Error",
            Self::Reconcile { .. } => "Reconcile",
            Self::Reconciled { .. } => "Reconciled",
            Self::EpochChanged { .. } => "EpochChanged",
            Self::Heartbeat { .. } => "Heartbeat",
            Self::NodesQuery => "NodesQuery",
            Self::NodeList { .. } => "NodeList",
            Self::DataHello => "DataHello",
            Self::DataHelloAck { .. } => "DataHelloAck",
            Self::Update { .. } => "Update",
            Self::UpdateAck { .. } => "UpdateAck",
            Self::Replicate { .. } => "Replicate",
            Self::ReplicateAck { .. } => "ReplicateAck",
            Self::DataAlloc { .. } => "DataAlloc",
            Self::FreePage { .. } => "FreePage",
            Self::FreeReplicas { .. } => "FreeReplicas",
            Self::Freed { .. } => "Freed",
            Self::CacheFill { .. } => "CacheFill",
            Self::Leased { .. } => "Leased",
            Self::Invalidate { .. } => "Invalidate",
            Self::Invalidated { .. } => "Invalidated",
            Self::CacheListen { .. } => "CacheListen",
            Self::CacheRenew { .. } => "CacheRenew",
            Self::Renewed { .. } => "Renewed",
            Self::PrepareCopy { .. } => "PrepareCopy",
            Self::AddReplica { .. } => "AddReplica",
            Self::ReplicaAdded { .. } => "ReplicaAdded",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub body: Body,
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn zeros(&mut self, n: usize) {
        self.0.resize(self.0.len() + n, 0);
    }
    fn replicas(&mut self, replicas: &[Replica]) {
        for r in replicas {
            self.u32(r.node.0);
            self.u32(r.page.0);
        }
    }
    /// count u32, then count × (page_id u32, block u32).
    fn block_list(&mut self, blocks: &[(PageId, u32)]) {
        assert!(blocks.len() <= MAX_CACHE_BLOCKS, "block list");
        self.u32(blocks.len() as u32);
        for (page_id, block) in blocks {
            self.u32(page_id.0);
            self.u32(*block);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return corrupt(format!("truncated: need {n} bytes at offset {}", self.pos));
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn zeros(&mut self, n: usize) -> Result<(), WireError> {
        if self.take(n)?.iter().any(|&b| b != 0) {
            return corrupt("reserved bytes are not zero");
        }
        Ok(())
    }
    fn replicas(&mut self, count: u8) -> Result<Vec<Replica>, WireError> {
        let count = count as usize;
        if count == 0 || count > MAX_REPLICAS {
            return corrupt(format!("{count} replicas (allowed 1..={MAX_REPLICAS})"));
        }
        let mut out: Vec<Replica> = Vec::with_capacity(count);
        for _ in 0..count {
            let r = Replica {
                node: NodeId(self.u32()?),
                page: PageIndex(self.u32()?),
            };
            if out.iter().any(|o| o.node == r.node) {
                return corrupt(format!("two replicas on {}", r.node));
            }
            out.push(r);
        }
        Ok(out)
    }
    fn block_list(&mut self) -> Result<Vec<(PageId, u32)>, WireError> {
        let count = self.u32()? as usize;
        if count > MAX_CACHE_BLOCKS {
            return corrupt(format!("{count} blocks (at most {MAX_CACHE_BLOCKS})"));
        }
        (0..count)
            .map(|_| Ok((PageId(self.u32()?), self.u32()?)))
            .collect()
    }
    fn finish(&self) -> Result<(), WireError> {
        if self.pos != self.bytes.len() {
            return corrupt(format!("{} trailing bytes", self.bytes.len() - self.pos));
        }
        Ok(())
    }
}

impl Message {
    pub fn new(epoch: Epoch, sender: NodeId, request_id: u64, body: Body) -> Self {
        Self {
            header: Header {
                epoch,
                sender,
                request_id,
            },
            body,
        }
    }

    /// Encodes the message. Bodies that break the format's bounds (too many replicas, too
    /// long a detail) are programmer errors and are truncated to fit, with the detail cut
    /// at a character boundary; replicas beyond [`MAX_REPLICAS`] are an assertion failure.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64));
        w.u16(WIRE_MAGIC);
        w.u8(WIRE_VERSION);
        w.u8(self.body.kind());
        w.u32(0); // body length, patched below
        w.u64(self.header.epoch.0);
        w.u32(self.header.sender.0);
        w.u32(0);
        w.u64(self.header.request_id);
        match &self.body {
            Body::Join(j) => {
                w.u64(j.cluster_id.0);
                w.u64(j.page_size_bytes);
                w.u32(j.page_count);
                w.u32(j.free_pages);
                w.u64(j.region_addr);
                w.u64(j.region_len);
                w.u32(j.rkey);
                w.0.extend_from_slice(&j.cm_ip);
                w.u16(j.cm_port);
                w.u32(j.art_rkey);
                w.zeros(2);
            }
            Body::JoinAck { live_nodes } => {
                w.u32(*live_nodes);
                w.zeros(4);
            }
            Body::AllocPage {
                primary_page,
                backups_wanted,
            } => {
                w.u32(primary_page.0);
                w.u8(*backups_wanted);
                w.zeros(3);
            }
            Body::Prepare { txn_id } | Body::Abort { txn_id } | Body::AbortAck { txn_id } => {
                w.u64(*txn_id)
            }
            Body::Prepared { txn_id, page } => {
                w.u64(*txn_id);
                w.u32(page.0);
                w.zeros(4);
            }
            Body::Commit {
                txn_id,
                page_id,
                replicas,
            } => {
                assert!(
                    !replicas.is_empty() && replicas.len() <= MAX_REPLICAS,
                    "replica count"
                );
                w.u64(*txn_id);
                w.u32(page_id.0);
                w.u8(replicas.len() as u8);
                w.zeros(3);
                w.replicas(replicas);
            }
            Body::CommitAck { txn_id, page_id } => {
                w.u64(*txn_id);
                w.u32(page_id.0);
                w.zeros(4);
            }
            Body::MappingLookup { page_id } => {
                w.u32(page_id.0);
                w.zeros(4);
            }
            Body::Mapping { page_id, replicas } => {
                assert!(
                    !replicas.is_empty() && replicas.len() <= MAX_REPLICAS,
                    "replica count"
                );
                w.u32(page_id.0);
                w.u8(replicas.len() as u8);
                w.zeros(3);
                w.replicas(replicas);
            }
            Body::Error { code, detail } => {
                let mut end = detail.len().min(MAX_DETAIL_BYTES);
                while !detail.is_char_boundary(end) {
                    end -= 1;
                }
                w.u16(code.code());
                w.u16(end as u16);
                w.zeros(4);
                w.0.extend_from_slice(&detail.as_bytes()[..end]);
            }
            Body::Reconcile { last, entries } => {
                assert!(entries.len() <= MAX_RECONCILE_ENTRIES, "reconcile entries");
                w.u32(entries.len() as u32);
                w.u8(*last as u8);
                w.zeros(3);
                for (page, id) in entries {
                    w.u32(page.0);
                    w.u32(id.0);
                }
            }
            Body::Reconciled {
                committed,
                freed,
                unknown_allocated,
                conflicting,
            } => {
                w.u32(*committed);
                w.u32(*freed);
                w.u32(*unknown_allocated);
                w.u32(*conflicting);
            }
            Body::EpochChanged { dead_node } => {
                w.u32(dead_node.0);
                w.zeros(4);
            }
            Body::Heartbeat { seq } => w.u64(*seq),
            Body::NodesQuery | Body::DataHello => w.zeros(8),
            Body::NodeList { nodes } => {
                assert!(nodes.len() <= MAX_NODES, "node count");
                w.u32(nodes.len() as u32);
                w.zeros(4);
                for n in nodes {
                    w.u32(n.node.0);
                    w.0.extend_from_slice(&n.ip);
                    w.u16(n.port);
                    w.zeros(2);
                    w.u32(n.free_pages);
                }
            }
            Body::DataHelloAck {
                page_size_bytes,
                data_addr,
                art_addr,
                rkey,
                art_rkey,
                page_count,
                version_rkey,
                version_addr,
            } => {
                w.u64(*page_size_bytes);
                w.u64(*data_addr);
                w.u64(*art_addr);
                w.u32(*rkey);
                w.u32(*art_rkey);
                w.u32(*page_count);
                w.u32(*version_rkey);
                w.u64(*version_addr);
            }
            Body::Update {
                page_id,
                offset,
                op,
            } => {
                w.u32(page_id.0);
                w.u32(*offset);
                let (code, a, b, data): (u8, u64, u64, &[u8]) = match op {
                    UpdateOp::Write(d) => {
                        assert!(d.len() <= MAX_UPDATE_BYTES, "update bytes");
                        (1, 0, 0, d)
                    }
                    UpdateOp::CompareAndSwap { expected, new } => (2, *expected, *new, &[]),
                    UpdateOp::FetchAdd { delta } => (3, *delta, 0, &[]),
                };
                w.u8(code);
                w.zeros(1);
                w.u16(data.len() as u16);
                w.zeros(4);
                w.u64(a);
                w.u64(b);
                w.0.extend_from_slice(data);
            }
            Body::UpdateAck { old } => w.u64(*old),
            Body::Replicate {
                page_id,
                page,
                offset,
                data,
            } => {
                assert!(data.len() <= MAX_UPDATE_BYTES, "replicate bytes");
                w.u32(page_id.0);
                w.u32(page.0);
                w.u32(*offset);
                w.u16(data.len() as u16);
                w.zeros(2);
                w.0.extend_from_slice(data);
            }
            Body::ReplicateAck { page_id } => {
                w.u32(page_id.0);
                w.zeros(4);
            }
            Body::DataAlloc { backups_wanted } => {
                w.u8(*backups_wanted);
                w.zeros(7);
            }
            Body::FreePage { page_id } => {
                w.u32(page_id.0);
                w.zeros(4);
            }
            Body::FreeReplicas { entries } => {
                assert!(entries.len() <= MAX_RECONCILE_ENTRIES, "free entries");
                w.u32(entries.len() as u32);
                w.zeros(4);
                for (page, id) in entries {
                    w.u32(page.0);
                    w.u32(id.0);
                }
            }
            Body::Freed { count } => {
                w.u32(*count);
                w.zeros(4);
            }
            Body::CacheFill {
                page_id,
                block,
                block_bytes,
                client,
            } => {
                w.u32(page_id.0);
                w.u32(*block);
                w.u32(*block_bytes);
                w.zeros(4);
                w.u64(*client);
            }
            Body::Invalidate { page_id, block } | Body::Invalidated { page_id, block } => {
                w.u32(page_id.0);
                w.u32(*block);
            }
            Body::CacheListen { client } => w.u64(*client),
            Body::CacheRenew {
                client,
                block_bytes,
                blocks,
            } => {
                w.u64(*client);
                w.u32(*block_bytes);
                w.block_list(blocks);
            }
            Body::Renewed { lease_ms, blocks } => {
                w.u32(*lease_ms);
                w.block_list(blocks);
            }
            Body::PrepareCopy { txn_id, page_id } => {
                w.u64(*txn_id);
                w.u32(page_id.0);
                w.zeros(4);
            }
            Body::AddReplica {
                txn_id,
                page_id,
                target,
            } => {
                w.u64(*txn_id);
                w.u32(page_id.0);
                w.zeros(4);
                w.replicas(std::slice::from_ref(target));
            }
            Body::ReplicaAdded {
                txn_id,
                page_id,
                bytes,
            } => {
                w.u64(*txn_id);
                w.u32(page_id.0);
                w.zeros(4);
                w.u64(*bytes);
            }
            Body::Leased { lease_ms, version } => {
                w.u32(*lease_ms);
                w.zeros(4);
                w.u64(*version);
            }
        }
        let body_len = (w.0.len() - HEADER_BYTES) as u32;
        w.0[4..8].copy_from_slice(&body_len.to_le_bytes());
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return corrupt(format!(
                "{} bytes, more than the largest message",
                bytes.len()
            ));
        }
        let mut r = Reader { bytes, pos: 0 };
        let magic = r.u16()?;
        if magic != WIRE_MAGIC {
            return corrupt(format!("bad magic {magic:#06x}"));
        }
        let version = r.u8()?;
        if version != WIRE_VERSION {
            return corrupt(format!("unsupported version {version}"));
        }
        let kind = r.u8()?;
        let body_len = r.u32()? as usize;
        if HEADER_BYTES + body_len != bytes.len() {
            return corrupt(format!(
                "body length {body_len} does not match {} bytes",
                bytes.len()
            ));
        }
        let epoch = Epoch(r.u64()?);
        let sender = NodeId(r.u32()?);
        r.zeros(4)?;
        let request_id = r.u64()?;
        let body = match kind {
            1 => {
                let j = Join {
                    cluster_id: ClusterId(r.u64()?),
                    page_size_bytes: r.u64()?,
                    page_count: r.u32()?,
                    free_pages: r.u32()?,
                    region_addr: r.u64()?,
                    region_len: r.u64()?,
                    rkey: r.u32()?,
                    cm_ip: {
                        let b = r.take(4)?;
                        [b[0], b[1], b[2], b[3]]
                    },
                    cm_port: r.u16()?,
                    art_rkey: r.u32()?,
                };
                r.zeros(2)?;
                if j.free_pages > j.page_count {
                    return corrupt(format!("{} free pages of {}", j.free_pages, j.page_count));
                }
                Body::Join(j)
            }
            2 => {
                let live_nodes = r.u32()?;
                r.zeros(4)?;
                Body::JoinAck { live_nodes }
            }
            3 => {
                let primary_page = PageIndex(r.u32()?);
                let backups_wanted = r.u8()?;
                r.zeros(3)?;
                if backups_wanted as usize >= MAX_REPLICAS {
                    return corrupt(format!(
                        "{backups_wanted} backups wanted (at most {})",
                        MAX_REPLICAS - 1
                    ));
                }
                Body::AllocPage {
                    primary_page,
                    backups_wanted,
                }
            }
            4 => Body::Prepare { txn_id: r.u64()? },
            5 => {
                let txn_id = r.u64()?;
                let page = PageIndex(r.u32()?);
                r.zeros(4)?;
                Body::Prepared { txn_id, page }
            }
            6 => {
                let txn_id = r.u64()?;
                let page_id = PageId(r.u32()?);
                let count = r.u8()?;
                r.zeros(3)?;
                Body::Commit {
                    txn_id,
                    page_id,
                    replicas: r.replicas(count)?,
                }
            }
            7 => {
                let txn_id = r.u64()?;
                let page_id = PageId(r.u32()?);
                r.zeros(4)?;
                Body::CommitAck { txn_id, page_id }
            }
            8 => Body::Abort { txn_id: r.u64()? },
            9 => Body::AbortAck { txn_id: r.u64()? },
            10 => {
                let page_id = PageId(r.u32()?);
                r.zeros(4)?;
                Body::MappingLookup { page_id }
            }
            11 => {
                let page_id = PageId(r.u32()?);
                let count = r.u8()?;
                r.zeros(3)?;
                Body::Mapping {
                    page_id,
                    replicas: r.replicas(count)?,
                }
            }
            12 => {
                let raw = r.u16()?;
                let code = ErrorCode::from_code(raw)
                    .ok_or_else(|| WireError::Corrupt(format!("unknown error code {raw}")))?;
                let len = r.u16()? as usize;
                r.zeros(4)?;
                if len > MAX_DETAIL_BYTES {
                    return corrupt(format!("error detail of {len} bytes"));
                }
                let detail = std::str::from_utf8(r.take(len)?)
                    .map_err(|_| WireError::Corrupt("error detail is not UTF-8".into()))?
                    .to_owned();
                Body::Error { code, detail }
            }
            13 => {
                let count = r.u32()? as usize;
                let last = match r.u8()? {
                    0 => false,
                    1 => true,
                    other => return corrupt(format!("reconcile flag {other}")),
                };
                r.zeros(3)?;
                if count > MAX_RECONCILE_ENTRIES {
                    return corrupt(format!("{count} reconcile entries"));
                }
                let mut entries = Vec::with_capacity(count);
                let mut seen = std::collections::HashSet::new();
                for _ in 0..count {
                    let page = PageIndex(r.u32()?);
                    let id = PageId(r.u32()?);
                    if id.0 == 0 || !seen.insert(page) {
                        return corrupt(format!("reconcile entry {page:?} -> {id:?}"));
                    }
                    entries.push((page, id));
                }
                Body::Reconcile { last, entries }
            }
            14 => Body::Reconciled {
                committed: r.u32()?,
                freed: r.u32()?,
                unknown_allocated: r.u32()?,
                conflicting: r.u32()?,
            },
            15 => {
                let dead_node = NodeId(r.u32()?);
                r.zeros(4)?;
                Body::EpochChanged { dead_node }
            }
            16 => Body::Heartbeat { seq: r.u64()? },
            17 | 19 => {
                r.zeros(8)?;
                if kind == 17 {
                    Body::NodesQuery
                } else {
                    Body::DataHello
                }
            }
            18 => {
                let count = r.u32()? as usize;
                r.zeros(4)?;
                if count > MAX_NODES {
                    return corrupt(format!("{count} nodes (at most {MAX_NODES})"));
                }
                let mut nodes = Vec::with_capacity(count);
                for _ in 0..count {
                    let node = NodeId(r.u32()?);
                    let b = r.take(4)?;
                    let ip = [b[0], b[1], b[2], b[3]];
                    let port = r.u16()?;
                    r.zeros(2)?;
                    let free_pages = r.u32()?;
                    nodes.push(NodeInfo {
                        node,
                        ip,
                        port,
                        free_pages,
                    });
                }
                Body::NodeList { nodes }
            }
            20 => Body::DataHelloAck {
                page_size_bytes: r.u64()?,
                data_addr: r.u64()?,
                art_addr: r.u64()?,
                rkey: r.u32()?,
                art_rkey: r.u32()?,
                page_count: r.u32()?,
                version_rkey: r.u32()?,
                version_addr: r.u64()?,
            },
            21 => {
                let page_id = PageId(r.u32()?);
                let offset = r.u32()?;
                let code = r.u8()?;
                r.zeros(1)?;
                let len = r.u16()? as usize;
                r.zeros(4)?;
                let a = r.u64()?;
                let b = r.u64()?;
                if len > MAX_UPDATE_BYTES {
                    return corrupt(format!(
                        "update of {len} bytes (at most {MAX_UPDATE_BYTES})"
                    ));
                }
                let data = r.take(len)?.to_vec();
                let op = match code {
                    1 if b == 0 && a == 0 => UpdateOp::Write(data),
                    2 if len == 0 => UpdateOp::CompareAndSwap {
                        expected: a,
                        new: b,
                    },
                    3 if len == 0 && b == 0 => UpdateOp::FetchAdd { delta: a },
                    other => return corrupt(format!("update op {other} with {len} bytes")),
                };
                Body::Update {
                    page_id,
                    offset,
                    op,
                }
            }
            22 => Body::UpdateAck { old: r.u64()? },
            23 => {
                let page_id = PageId(r.u32()?);
                let page = PageIndex(r.u32()?);
                let offset = r.u32()?;
                let len = r.u16()? as usize;
                r.zeros(2)?;
                if len > MAX_UPDATE_BYTES {
                    return corrupt(format!("replicate of {len} bytes"));
                }
                Body::Replicate {
                    page_id,
                    page,
                    offset,
                    data: r.take(len)?.to_vec(),
                }
            }
            24 => {
                let page_id = PageId(r.u32()?);
                r.zeros(4)?;
                Body::ReplicateAck { page_id }
            }
            25 => {
                let backups_wanted = r.u8()?;
                r.zeros(7)?;
                if backups_wanted as usize >= MAX_REPLICAS {
                    return corrupt(format!("{backups_wanted} backups wanted"));
                }
                Body::DataAlloc { backups_wanted }
            }
            26 => {
                let page_id = PageId(r.u32()?);
                r.zeros(4)?;
                Body::FreePage { page_id }
            }
            27 => {
                let count = r.u32()? as usize;
                r.zeros(4)?;
                if count > MAX_RECONCILE_ENTRIES {
                    return corrupt(format!("{count} free entries"));
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    let page = PageIndex(r.u32()?);
                    let id = PageId(r.u32()?);
                    if id.0 == 0 {
                        return corrupt(format!("free entry {page:?} -> page id 0"));
                    }
                    entries.push((page, id));
                }
                Body::FreeReplicas { entries }
            }
            28 => {
                let count = r.u32()?;
                r.zeros(4)?;
                Body::Freed { count }
            }
            29 => {
                let page_id = PageId(r.u32()?);
                let block = r.u32()?;
                let block_bytes = r.u32()?;
                if !block_bytes.is_power_of_two() {
                    return corrupt(format!("cache block size {block_bytes}"));
                }
                r.zeros(4)?;
                Body::CacheFill {
                    page_id,
                    block,
                    block_bytes,
                    client: r.u64()?,
                }
            }
            31 | 32 => {
                let page_id = PageId(r.u32()?);
                let block = r.u32()?;
                match kind {
                    31 => Body::Invalidate { page_id, block },
                    _ => Body::Invalidated { page_id, block },
                }
            }
            33 => Body::CacheListen { client: r.u64()? },
            34 => {
                let client = r.u64()?;
                let block_bytes = r.u32()?;
                if !block_bytes.is_power_of_two() {
                    return corrupt(format!("cache block size {block_bytes}"));
                }
                Body::CacheRenew {
                    client,
                    block_bytes,
                    blocks: r.block_list()?,
                }
            }
            35 => Body::Renewed {
                lease_ms: r.u32()?,
                blocks: r.block_list()?,
            },
            36..=38 => {
                let txn_id = r.u64()?;
                let page_id = PageId(r.u32()?);
                r.zeros(4)?;
                match kind {
                    36 => Body::PrepareCopy { txn_id, page_id },
                    37 => Body::AddReplica {
                        txn_id,
                        page_id,
                        target: r.replicas(1)?.remove(0),
                    },
                    _ => Body::ReplicaAdded {
                        txn_id,
                        page_id,
                        bytes: r.u64()?,
                    },
                }
            }
            30 => {
                let lease_ms = r.u32()?;
                r.zeros(4)?;
                Body::Leased {
                    lease_ms,
                    version: r.u64()?,
                }
            }
            other => return corrupt(format!("unknown message kind {other}")),
        };
        r.finish()?;
        Ok(Self {
            header: Header {
                epoch,
                sender,
                request_id,
            },
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr() -> (Epoch, NodeId, u64) {
        (Epoch(5), NodeId(2), 0x1122_3344)
    }

    fn msg(body: Body) -> Message {
        let (e, s, id) = hdr();
        Message::new(e, s, id, body)
    }

    fn replicas(n: u32) -> Vec<Replica> {
        (0..n)
            .map(|i| Replica {
                node: NodeId(i + 1),
                page: PageIndex(i * 10),
            })
            .collect()
    }

    pub(crate) fn samples() -> Vec<Message> {
        vec![
            msg(Body::Join(Join {
                cluster_id: ClusterId(0xabc),
                page_size_bytes: 2 << 20,
                page_count: 511,
                free_pages: 500,
                region_addr: 0x7f00_0000_0000,
                region_len: 1 << 30,
                rkey: 0x1234,
                cm_ip: [10, 0, 0, 2],
                cm_port: 7100,
                art_rkey: 0x77,
            })),
            msg(Body::JoinAck { live_nodes: 3 }),
            msg(Body::AllocPage {
                primary_page: PageIndex(17),
                backups_wanted: 2,
            }),
            msg(Body::Prepare { txn_id: 99 }),
            msg(Body::Prepared {
                txn_id: 99,
                page: PageIndex(4),
            }),
            msg(Body::Commit {
                txn_id: 99,
                page_id: PageId(1000),
                replicas: replicas(3),
            }),
            msg(Body::CommitAck {
                txn_id: 99,
                page_id: PageId(1000),
            }),
            msg(Body::Abort { txn_id: 98 }),
            msg(Body::AbortAck { txn_id: 98 }),
            msg(Body::MappingLookup { page_id: PageId(7) }),
            msg(Body::Mapping {
                page_id: PageId(7),
                replicas: replicas(MAX_REPLICAS as u32),
            }),
            msg(Body::Error {
                code: ErrorCode::StaleEpoch,
                detail: "epoch 4 < 5".into(),
            }),
            msg(Body::Reconcile {
                last: true,
                entries: vec![(PageIndex(3), PageId(70)), (PageIndex(9), PageId(71))],
            }),
            msg(Body::Reconciled {
                committed: 2,
                freed: 1,
                unknown_allocated: 0,
                conflicting: 0,
            }),
            msg(Body::EpochChanged {
                dead_node: NodeId(3),
            }),
            msg(Body::Heartbeat { seq: 9 }),
            msg(Body::NodesQuery),
            msg(Body::NodeList {
                nodes: vec![NodeInfo {
                    node: NodeId(2),
                    ip: [10, 0, 0, 2],
                    port: 7470,
                    free_pages: 99,
                }],
            }),
            msg(Body::DataHello),
            msg(Body::DataHelloAck {
                page_size_bytes: 1 << 16,
                data_addr: 0x7f00_0000_0000,
                art_addr: 0x7eff_0000_0000,
                rkey: 5,
                art_rkey: 6,
                page_count: 100,
                version_rkey: 7,
                version_addr: 0x7efe_0000_0000,
            }),
            msg(Body::Update {
                page_id: PageId(3),
                offset: 64,
                op: UpdateOp::Write(vec![7; MAX_UPDATE_BYTES]),
            }),
            msg(Body::Update {
                page_id: PageId(3),
                offset: 8,
                op: UpdateOp::CompareAndSwap {
                    expected: 1,
                    new: 2,
                },
            }),
            msg(Body::Update {
                page_id: PageId(3),
                offset: 16,
                op: UpdateOp::FetchAdd { delta: u64::MAX },
            }),
            msg(Body::UpdateAck { old: 42 }),
            msg(Body::Replicate {
                page_id: PageId(3),
                page: PageIndex(9),
                offset: 0,
                data: vec![1, 2, 3],
            }),
            msg(Body::ReplicateAck { page_id: PageId(3) }),
            msg(Body::DataAlloc { backups_wanted: 2 }),
            msg(Body::FreePage { page_id: PageId(9) }),
            msg(Body::FreeReplicas {
                entries: vec![(PageIndex(3), PageId(9)), (PageIndex(0), PageId(12))],
            }),
            msg(Body::Freed { count: 2 }),
            msg(Body::CacheFill {
                page_id: PageId(9),
                block: 3,
                block_bytes: 4096,
                client: 0xfeed_beef,
            }),
            msg(Body::Leased {
                lease_ms: 500,
                version: 42,
            }),
            msg(Body::Invalidate {
                page_id: PageId(9),
                block: 3,
            }),
            msg(Body::Invalidated {
                page_id: PageId(9),
                block: 3,
            }),
            msg(Body::CacheListen {
                client: 0xfeed_beef,
            }),
            msg(Body::CacheRenew {
                client: 0xfeed_beef,
                block_bytes: 64,
                blocks: vec![(PageId(9), 3), (PageId(10), 1023)],
            }),
            msg(Body::Renewed {
                lease_ms: 500,
                blocks: vec![(PageId(9), 3)],
            }),
            msg(Body::PrepareCopy {
                txn_id: 1 << 40,
                page_id: PageId(12),
            }),
            msg(Body::AddReplica {
                txn_id: 1 << 40,
                page_id: PageId(12),
                target: replicas(1)[0],
            }),
            msg(Body::ReplicaAdded {
                txn_id: 1 << 40,
                page_id: PageId(12),
                bytes: 1 << 20,
            }),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let bytes = m.encode();
            assert!(bytes.len() <= MAX_MESSAGE_BYTES);
            assert_eq!(Message::decode(&bytes).unwrap(), m, "{}", m.body.name());
        }
    }

    #[test]
    fn golden_bytes() {
        let b = msg(Body::AllocPage {
            primary_page: PageIndex(17),
            backups_wanted: 2,
        })
        .encode();
        let want: Vec<u8> = [
            &[0x50, 0x47, 1, 3][..],
            &8u32.to_le_bytes(),
            &5u64.to_le_bytes(),
            &2u32.to_le_bytes(),
            &[0; 4],
            &0x1122_3344u64.to_le_bytes(),
            &17u32.to_le_bytes(),
            &[2, 0, 0, 0],
        ]
        .concat();
        assert_eq!(b, want);
        let c = msg(Body::Commit {
            txn_id: 1,
            page_id: PageId(2),
            replicas: replicas(2),
        })
        .encode();
        assert_eq!(&c[..4], &[0x50, 0x47, 1, 6]);
        assert_eq!(
            &c[32..],
            &[
                &1u64.to_le_bytes()[..],
                &2u32.to_le_bytes(),
                &[2, 0, 0, 0],
                &1u32.to_le_bytes(),
                &0u32.to_le_bytes(),
                &2u32.to_le_bytes(),
                &10u32.to_le_bytes()
            ]
            .concat()[..]
        );
        let e = msg(Body::Error {
            code: ErrorCode::NoSpace,
            detail: "full".into(),
        })
        .encode();
        assert_eq!(
            &e[32..],
            &[
                &4u16.to_le_bytes()[..],
                &4u16.to_le_bytes(),
                &[0; 4],
                b"full"
            ]
            .concat()[..]
        );
    }

    /// Frozen encodings of every message kind (format version 1). A change here is a wire
    /// format change: bump `WIRE_VERSION` and keep decoding the old one, or do not make it.
    const GOLDEN: [&str; 16] = [
        "5047010138000000050000000000000002000000000000004433221100000000bc0a0000000000000000200000000000ff010000f401000000000000007f00000000004000000000341200000a000002bc1b770000000000",
        "50470102080000000500000000000000020000000000000044332211000000000300000000000000",
        "50470103080000000500000000000000020000000000000044332211000000001100000002000000",
        "50470104080000000500000000000000020000000000000044332211000000006300000000000000",
        "504701051000000005000000000000000200000000000000443322110000000063000000000000000400000000000000",
        "50470106280000000500000000000000020000000000000044332211000000006300000000000000e8030000030000000100000000000000020000000a0000000300000014000000",
        "50470107100000000500000000000000020000000000000044332211000000006300000000000000e803000000000000",
        "50470108080000000500000000000000020000000000000044332211000000006200000000000000",
        "50470109080000000500000000000000020000000000000044332211000000006200000000000000",
        "5047010a080000000500000000000000020000000000000044332211000000000700000000000000",
        "5047010b4800000005000000000000000200000000000000443322110000000007000000080000000100000000000000020000000a0000000300000014000000040000001e00000005000000280000000600000032000000070000003c0000000800000046000000",
        "5047010c1300000005000000000000000200000000000000443322110000000002000b000000000065706f63682034203c2035",
        "5047010d18000000050000000000000002000000000000004433221100000000020000000100000003000000460000000900000047000000",
        "5047010e1000000005000000000000000200000000000000443322110000000002000000010000000000000000000000",
        "5047010f080000000500000000000000020000000000000044332211000000000300000000000000",
        "50470110080000000500000000000000020000000000000044332211000000000900000000000000",
    ];

    #[test]
    fn golden_bytes_of_every_message() {
        for (m, golden) in samples().iter().zip(GOLDEN) {
            let hex: String = m.encode().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, golden, "{}", m.body.name());
        }
    }

    #[test]
    fn rejects_malformed_messages() {
        let good = msg(Body::Commit {
            txn_id: 1,
            page_id: PageId(2),
            replicas: replicas(2),
        })
        .encode();
        for cut in 0..good.len() {
            assert!(Message::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(Message::decode(&long).is_err());
        let flip = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            Message::decode(&b)
        };
        assert!(flip(0, 0).is_err(), "magic");
        assert!(flip(2, 2).is_err(), "version");
        assert!(flip(3, 200).is_err(), "kind");
        assert!(flip(20, 1).is_err(), "header reserved");
        assert!(flip(44, 3).is_err(), "replica count vs length");
        assert!(flip(45, 1).is_err(), "body reserved");
        // Two replicas on one node.
        assert!(flip(56, 1).is_err(), "duplicate node");
        let zero = msg(Body::Mapping {
            page_id: PageId(1),
            replicas: replicas(1),
        })
        .encode();
        let mut z = zero.clone();
        z[36] = 0;
        assert!(Message::decode(&z).is_err(), "zero replicas");
        let too_many = msg(Body::AllocPage {
            primary_page: PageIndex(0),
            backups_wanted: 7,
        })
        .encode();
        let mut t = too_many.clone();
        t[36] = 8;
        assert!(Message::decode(&t).is_err(), "backups wanted");
        let mut bad_code = msg(Body::Error {
            code: ErrorCode::Internal,
            detail: String::new(),
        })
        .encode();
        bad_code[32] = 0;
        assert!(Message::decode(&bad_code).is_err(), "error code 0");
        let mut bad_utf8 = msg(Body::Error {
            code: ErrorCode::Internal,
            detail: "ab".into(),
        })
        .encode();
        bad_utf8[40] = 0xff;
        assert!(Message::decode(&bad_utf8).is_err(), "utf8");
    }

    #[test]
    fn long_error_detail_is_cut_at_a_char_boundary() {
        let detail = "é".repeat(200); // 400 bytes
        let m = Message::decode(
            &msg(Body::Error {
                code: ErrorCode::Internal,
                detail,
            })
            .encode(),
        )
        .unwrap();
        let Body::Error { detail, .. } = m.body else {
            panic!()
        };
        assert_eq!(detail.len(), 256);
        assert!(detail.chars().all(|c| c == 'é'));
    }

    #[test]
    fn error_codes_round_trip() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(c.code()), Some(c));
        }
        assert_eq!(ErrorCode::from_code(0), None);
        // Codes are append-only: the existing ones keep their numbers.
        assert_eq!(ErrorCode::Internal.code(), 10);
        assert_eq!(ErrorCode::BackupLost.code(), 11);
        assert_eq!(ErrorCode::PageLost.code(), 12);
        assert_eq!(ErrorCode::NotPrimary.code(), 13);
        assert_eq!(ErrorCode::BadAddress.code(), 14);
        assert_eq!(ErrorCode::PageFreed.code(), 15);
        assert_eq!(ErrorCode::NotListening.code(), 16);
        assert_eq!(ErrorCode::Busy.code(), 17);
        assert_eq!(ErrorCode::from_code(18), None);
    }

    #[test]
    fn decode_never_panics_on_mutations() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for m in samples() {
            let good = m.encode();
            for _ in 0..3000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let mut b = good.clone();
                let i = (x as usize) % b.len();
                b[i] = (x >> 32) as u8;
                if x.is_multiple_of(5) {
                    b.truncate((x >> 40) as usize % (b.len() + 1));
                }
                if let Ok(d) = Message::decode(&b) {
                    // Whatever decodes must re-encode to the same bytes.
                    assert_eq!(d.encode(), b);
                }
            }
        }
    }
}
