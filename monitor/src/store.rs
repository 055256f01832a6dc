//! The monitor's metadata in ZooKeeper, under `/pmgas/<cluster>/`:
//!
//! - `epoch`: the config epoch, as decimal text;
//! - `nodes/`: the live data servers (one child per node);
//! - `gat/w<worker>/`: the global address table, one znode series per monitor worker:
//!   deltas `d<seq>` (one group commit each) and compacted chunks `c<seq>` of at most
//!   64 KiB (`layout::gat` encodes both); see [`GatWriter`].
//! - `dead/node<N>`: data servers declared dead (`layout::gat::DeadNode`); the GAT's
//!   current view drops their replicas of the pages allocated before the declaration;
//!
//! A write whose outcome is unknown (connection lost in flight) is reported as
//! [`StoreError::Unknown`]; [`GatWriter::resolve`] re-reads the chunk to learn whether the
//! batch landed, as the zookeeper-client documentation advises for non-semantic errors.

use std::time::Duration;

use pmgas_layout::gat::{
    self, CHUNK_HEADER_BYTES, CHUNK_MAX_BYTES, DeadNode, DeadNodes, GatError, Mapping,
};
use pmgas_layout::{Epoch, NodeId, PageId, PageIndex};
use zookeeper_client as zk;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("ZooKeeper at {connect}: {source}")]
    Connect { connect: String, source: zk::Error },
    #[error("ZooKeeper {op} {path}: {source}")]
    Zk {
        op: &'static str,
        path: String,
        source: zk::Error,
    },
    #[error("{path}: another writer changed this GAT series (this monitor was deposed?)")]
    Fenced { path: String },
    #[error("{op} {path}: outcome unknown ({source}); call resolve() before retrying")]
    Unknown {
        op: &'static str,
        path: String,
        source: zk::Error,
    },
    #[error("{path}: {source}")]
    Chunk { path: String, source: GatError },
    #[error("{path}: {reason}")]
    Corrupt { path: String, reason: String },
}

/// Semantic errors are definite; everything else may or may not have been applied.
fn is_definite(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::NoNode
            | zk::Error::NodeExists
            | zk::Error::BadVersion
            | zk::Error::NotEmpty
            | zk::Error::NoAuth
            | zk::Error::InvalidAcl
            | zk::Error::BadArguments(_)
    )
}

/// Builds the error for a failed ZooKeeper operation `op` on `path`.
fn zk_error(op: &'static str, path: impl Into<String>) -> impl FnOnce(zk::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Zk { op, path, source }
}

fn persistent() -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all())
}

/// A connection to the cluster's metadata.
pub struct Store {
    client: zk::Client,
    root: String,
    /// Version of the epoch znode when this store last read it (-1: not read yet).
    epoch_version: std::sync::atomic::AtomicI32,
    /// This monitor's election znode once it won the election ([`Self::campaign`]): every
    /// metadata write checks that it still exists, so a deposed monitor writes nothing.
    lock: std::sync::OnceLock<zk::OwnedLockClient>,
}

/// The whole GAT as loaded from ZooKeeper.
#[derive(Debug, Default)]
pub struct LoadedGat {
    /// The current view, sorted by page id: dead nodes' replicas removed
    /// ([`DeadNodes::apply`]), freed pages as their tombstones.
    pub mappings: Vec<Mapping>,
    pub dead: DeadNodes,
    /// Replicas the dead-node records removed from the stored mappings.
    pub dropped_replicas: usize,
    /// Those replicas, by node: (page index there, page id), tombstones' and every stored
    /// revision's included. A node declared dead that comes back is told to free them.
    pub dropped:
        std::collections::BTreeMap<NodeId, std::collections::BTreeSet<(PageIndex, PageId)>>,
    /// Per live page, how many replicas its last revision lost to dead nodes: what a
    /// re-replication still has to restore (`monitor/REREPLICATION.md`).
    pub short: std::collections::BTreeMap<PageId, usize>,
    pub chunks: usize,
    pub max_page_id: u32,
}

impl Store {
    /// Connects and makes sure the cluster's znodes exist.
    pub async fn connect(
        connect: &str,
        cluster: &str,
        session_timeout: Duration,
    ) -> Result<Self, StoreError> {
        if cluster.is_empty() || cluster.contains('/') {
            return Err(StoreError::Corrupt {
                path: cluster.into(),
                reason: "cluster names have no '/'".into(),
            });
        }
        let client = zk::Client::connector()
            .with_session_timeout(session_timeout)
            .connect(connect)
            .await
            .map_err(|source| StoreError::Connect {
                connect: connect.into(),
                source,
            })?;
        let root = format!("/pmgas/{cluster}");
        let store = Self {
            client,
            root,
            epoch_version: std::sync::atomic::AtomicI32::new(-1),
            lock: std::sync::OnceLock::new(),
        };
        for dir in [store.path("gat"), store.path("nodes"), store.path("dead")] {
            store
                .client
                .mkdir(&dir, &persistent())
                .await
                .map_err(zk_error("mkdir", dir))?;
        }
        let epoch = store.path("epoch");
        match store.client.create(&epoch, b"0", &persistent()).await {
            Ok(_) | Err(zk::Error::NodeExists) => {}
            Err(source) => return Err(zk_error("create", epoch)(source)),
        }
        Ok(store)
    }

    fn path(&self, rel: &str) -> String {
        format!("{}/{rel}", self.root)
    }

    /// The config epoch. Also remembers the epoch znode's version, which
    /// [`Self::register_node`] checks.
    pub async fn epoch(&self) -> Result<Epoch, StoreError> {
        let path = self.path("epoch");
        let (data, stat) = self
            .client
            .get_data(&path)
            .await
            .map_err(zk_error("get", path.clone()))?;
        self.epoch_version
            .store(stat.version, std::sync::atomic::Ordering::Release);
        let text = String::from_utf8_lossy(&data);
        text.trim()
            .parse()
            .map(Epoch)
            .map_err(|_| StoreError::Corrupt {
                path,
                reason: format!("epoch {text:?}"),
            })
    }

    /// Stands for election: an ephemeral sequential znode under `election/` (the ZooKeeper
    /// leader-election recipe, as Curator's `LeaderLatch`), then waits until it is the
    /// lowest, i.e. every monitor ahead of this one is gone. Returns once this monitor
    /// leads; from then on every write of this store is fenced by the election znode
    /// ([`Self::add_fence`]), which vanishes with this monitor's session.
    pub async fn campaign(&self, addr: &str) -> Result<(), StoreError> {
        let dir = self.path("election");
        let prefix = zk::LockPrefix::new_curator(&dir, "latch-")
            .map_err(zk_error("campaign", dir.clone()))?;
        let options = zk::LockOptions::new(zk::Acls::anyone_all())
            .with_ancestor_options(persistent())
            .map_err(zk_error("campaign", dir.clone()))?;
        let lock = self
            .client
            .lock(prefix, addr.as_bytes(), options)
            .await
            .map_err(zk_error("campaign", dir))?;
        let _ = self.lock.set(lock.into_owned());
        Ok(())
    }

    /// This monitor's election znode, if it won.
    pub fn election_path(&self) -> Option<&str> {
        self.lock.get().map(|l| l.lock_path())
    }

    /// Adds the leadership check (the election znode still exists) to a multi-op. Always
    /// the multi's first operation (index 0) once this monitor was elected.
    fn add_fence(&self, multi: &mut zk::MultiWriter<'_>) -> Result<bool, zk::Error> {
        match self.election_path() {
            Some(path) => multi.add_check_version(path, -1).map(|()| true),
            None => Ok(false),
        }
    }

    /// The ZooKeeper session's state watcher (a monitor stops leading when its session
    /// expires: its election znode is gone and a standby may already lead).
    pub fn state_watcher(&self) -> zk::StateWatcher {
        self.client.state_watcher()
    }

    /// Announces this monitor as the active one: an ephemeral `leader` znode holding its
    /// rdma_cm address, gone when the session ends. Written under the election fence; an
    /// announcement left by a predecessor (whose session has not expired yet, or which
    /// resigned) is replaced.
    pub async fn publish_leader(&self, addr: &str) -> Result<(), StoreError> {
        let path = self.path("leader");
        let options = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
        for replace in [false, true] {
            let mut multi = self.client.new_multi_writer();
            let fenced = self
                .add_fence(&mut multi)
                .map_err(zk_error("announce", path.clone()))?;
            if replace {
                multi
                    .add_delete(&path, None)
                    .map_err(zk_error("announce", path.clone()))?;
            }
            multi
                .add_create(&path, addr.as_bytes(), &options)
                .map_err(zk_error("announce", path.clone()))?;
            match multi.commit().await {
                Ok(_) => return Ok(()),
                Err(zk::MultiWriteError::OperationFailed {
                    index: 0,
                    source: zk::Error::NoNode,
                }) if fenced => {
                    return Err(StoreError::Fenced { path });
                }
                Err(zk::MultiWriteError::OperationFailed {
                    source: zk::Error::NodeExists,
                    ..
                }) if !replace && fenced => continue,
                Err(zk::MultiWriteError::OperationFailed {
                    source: zk::Error::NodeExists,
                    ..
                }) => {
                    return Err(StoreError::Fenced { path });
                }
                // Deleted between the two tries.
                Err(zk::MultiWriteError::OperationFailed {
                    source: zk::Error::NoNode,
                    ..
                }) if replace => {
                    return Box::pin(self.publish_leader(addr)).await;
                }
                Err(e) => return Err(zk_error("announce", path)(e.into())),
            }
        }
        Err(StoreError::Fenced { path })
    }

    /// The active monitor's rdma_cm address, if one is announced.
    pub async fn leader(&self) -> Result<Option<String>, StoreError> {
        let path = self.path("leader");
        match self.client.get_data(&path).await {
            Ok((data, _)) => Ok(Some(String::from_utf8_lossy(&data).into_owned())),
            Err(zk::Error::NoNode) => Ok(None),
            Err(source) => Err(zk_error("get", path)(source)),
        }
    }

    /// Records a joined node in `nodes/` (its znode holds `info`), atomically with a check
    /// that the config epoch is still the one this monitor read ([`Self::epoch`]): one
    /// multi-op, so the live-node list never changes under an epoch this monitor did not
    /// see. [`StoreError::Fenced`] if the epoch moved on (another monitor is in charge).
    pub async fn register_node(&self, node: u32, info: &str) -> Result<(), StoreError> {
        let path = self.path(&format!("nodes/node{node}"));
        let epoch = self.path("epoch");
        let fence = self
            .epoch_version
            .load(std::sync::atomic::Ordering::Acquire);
        for replace in [false, true] {
            let mut multi = self.client.new_multi_writer();
            let first = usize::from(
                self.add_fence(&mut multi)
                    .map_err(zk_error("join", path.clone()))?,
            );
            multi
                .add_check_version(&epoch, fence)
                .and_then(|()| {
                    if replace {
                        multi.add_set_data(&path, info.as_bytes(), None)
                    } else {
                        multi.add_create(&path, info.as_bytes(), &persistent())
                    }
                })
                .map_err(zk_error("join", path.clone()))?;
            match multi.commit().await {
                Ok(_) => return Ok(()),
                Err(zk::MultiWriteError::OperationFailed {
                    index,
                    source: zk::Error::BadVersion | zk::Error::NoNode,
                }) if index <= first => return Err(StoreError::Fenced { path: epoch }),
                // Recorded by an earlier run that ended without removing it: overwrite.
                Err(zk::MultiWriteError::OperationFailed {
                    source: zk::Error::NodeExists,
                    ..
                }) if !replace => continue,
                Err(e) => return Err(zk_error("join", path)(e.into())),
            }
        }
        Err(StoreError::Corrupt {
            path,
            reason: "created and deleted concurrently".into(),
        })
    }

    /// Removes a node that left from `nodes/`.
    pub async fn unregister_node(&self, node: u32) -> Result<(), StoreError> {
        let path = self.path(&format!("nodes/node{node}"));
        let mut multi = self.client.new_multi_writer();
        let fenced = self
            .add_fence(&mut multi)
            .map_err(zk_error("delete", path.clone()))?;
        multi
            .add_delete(&path, None)
            .map_err(zk_error("delete", path.clone()))?;
        match multi.commit().await {
            Ok(_) => Ok(()),
            Err(zk::MultiWriteError::OperationFailed {
                index: 0,
                source: zk::Error::NoNode,
            }) if fenced => Err(StoreError::Fenced { path }),
            Err(zk::MultiWriteError::OperationFailed {
                source: zk::Error::NoNode,
                ..
            }) => Ok(()),
            Err(e) => Err(zk_error("delete", path)(e.into())),
        }
    }

    pub async fn live_nodes(&self) -> Result<Vec<String>, StoreError> {
        self.children(&self.path("nodes")).await
    }

    async fn children(&self, path: &str) -> Result<Vec<String>, StoreError> {
        let mut c = self
            .client
            .list_children(path)
            .await
            .map_err(zk_error("list", path))?;
        c.sort();
        Ok(c)
    }

    /// Reads every chunk and delta of every worker's series, concurrently, and validates
    /// them. A znode that vanishes between listing and reading (a compaction of a live
    /// monitor raced this read) makes it read again.
    pub async fn load_gat(&self) -> Result<LoadedGat, StoreError> {
        let mut attempts = 0;
        loop {
            match self.load_gat_once().await {
                Err(StoreError::Zk {
                    source: zk::Error::NoNode,
                    ..
                }) if attempts < 5 => attempts += 1,
                other => return other,
            }
        }
    }

    /// The dead-node records (`dead/node<N>`).
    pub async fn dead_nodes(&self) -> Result<DeadNodes, StoreError> {
        let dir = self.path("dead");
        let mut out = DeadNodes::default();
        for name in self.children(&dir).await? {
            let path = format!("{dir}/{name}");
            let node = name
                .strip_prefix("node")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    path: path.clone(),
                    reason: "not a node<N> record".into(),
                })?;
            let (data, _) = self
                .client
                .get_data(&path)
                .await
                .map_err(zk_error("get", path.clone()))?;
            let record = DeadNode::decode(&String::from_utf8_lossy(&data))
                .map_err(|source| StoreError::Chunk { path, source })?;
            out.0.insert(NodeId(node), record);
        }
        Ok(out)
    }

    /// Declares data server `node` dead, in one fenced multi-op: the epoch becomes
    /// `record.epoch` (checked against the version this store last read, so two monitors
    /// can never both move it), the node leaves `nodes/`, and `dead/node<N>` holds the
    /// record. [`StoreError::Fenced`] if this monitor no longer leads or the epoch moved.
    pub async fn declare_dead(&self, node: NodeId, record: DeadNode) -> Result<(), StoreError> {
        let epoch = self.path("epoch");
        let live = self.path(&format!("nodes/node{}", node.0));
        let dead = self.path(&format!("dead/node{}", node.0));
        if self.election_path().is_none() {
            return Err(StoreError::Fenced { path: dead });
        }
        // Asked again after an unknown outcome: done if the declaration landed.
        let (now, stat) = self
            .client
            .get_data(&epoch)
            .await
            .map_err(zk_error("get", epoch.clone()))?;
        if String::from_utf8_lossy(&now).trim() == record.epoch.0.to_string()
            && let Ok((data, _)) = self.client.get_data(&dead).await
            && DeadNode::decode(&String::from_utf8_lossy(&data)) == Ok(record)
        {
            self.epoch_version
                .store(stat.version, std::sync::atomic::Ordering::Release);
            return Ok(());
        }
        let version = self
            .epoch_version
            .load(std::sync::atomic::Ordering::Acquire);
        if version < 0 {
            return Err(StoreError::Corrupt {
                path: epoch,
                reason: "declaring a node dead before reading the epoch".into(),
            });
        }
        let listed = self
            .client
            .check_stat(&live)
            .await
            .map_err(zk_error("stat", live.clone()))?
            .is_some();
        let recorded = self
            .client
            .check_stat(&dead)
            .await
            .map_err(zk_error("stat", dead.clone()))?
            .is_some();
        let mut multi = self.client.new_multi_writer();
        let first = usize::from(
            self.add_fence(&mut multi)
                .map_err(zk_error("declare dead", dead.clone()))?,
        );
        let text = record.encode();
        multi
            .add_set_data(&epoch, record.epoch.0.to_string().as_bytes(), Some(version))
            .and_then(|()| {
                if listed {
                    multi.add_delete(&live, None)
                } else {
                    Ok(())
                }
            })
            .and_then(|()| {
                if recorded {
                    multi.add_set_data(&dead, text.as_bytes(), None)
                } else {
                    multi.add_create(&dead, text.as_bytes(), &persistent())
                }
            })
            .map_err(zk_error("declare dead", dead.clone()))?;
        match multi.commit().await {
            Ok(_) => {
                self.epoch_version
                    .store(version + 1, std::sync::atomic::Ordering::Release);
                Ok(())
            }
            Err(zk::MultiWriteError::OperationFailed {
                index,
                source: zk::Error::BadVersion | zk::Error::NoNode,
            }) if index <= first => Err(StoreError::Fenced { path: epoch }),
            Err(e) => Err(zk_error("declare dead", dead)(e.into())),
        }
    }

    async fn load_gat_once(&self) -> Result<LoadedGat, StoreError> {
        let dead = self.dead_nodes().await?;
        let gat = self.path("gat");
        let mut paths = vec![];
        for worker in self.children(&gat).await? {
            let dir = format!("{gat}/{worker}");
            for chunk in self.children(&dir).await? {
                paths.push(format!("{dir}/{chunk}"));
            }
        }
        // Every read is sent at once; each chunk is decoded as soon as it arrives, while
        // the rest are still on their way.
        let mut reads: futures::stream::FuturesUnordered<_> = paths
            .iter()
            .map(|p| async move { (p, self.client.get_data(p).await) })
            .collect();
        let mut out = LoadedGat {
            chunks: paths.len(),
            ..LoadedGat::default()
        };
        out.dead = dead;
        // Replicas the declarations dropped, with the revision of the mapping that named
        // them: all are to be freed by their nodes if they come back, but only the page's
        // last revision says what it is short of (a re-replication's mapping names live
        // replicas only).
        let mut drops: Vec<(PageId, u16, pmgas_layout::wire::Replica)> = vec![];
        while let Some((path, result)) = futures::StreamExt::next(&mut reads).await {
            let (data, _) = result.map_err(zk_error("get", path.clone()))?;
            let mappings = gat::decode_chunk(&data).map_err(|source| StoreError::Chunk {
                path: path.clone(),
                source,
            })?;
            for mut m in mappings {
                out.max_page_id = out.max_page_id.max(m.page_id.0);
                let gone = out.dead.apply_dropping(&mut m);
                drops.extend(gone.into_iter().map(|r| (m.page_id, m.revision, r)));
                out.mappings.push(m);
            }
        }
        // Sorted, a page id stored twice sits next to itself (a hash set of a million ids
        // took as long as decoding them); a freed page's tombstone replaces its mapping.
        if let Err(id) = gat::merge_tombstones(&mut out.mappings) {
            return Err(StoreError::Corrupt {
                path: self.chunks_holding(&paths, id).await.join(" and "),
                reason: format!("page id {} stored twice", id.0),
            });
        }
        let last: std::collections::HashMap<PageId, u16> = out
            .mappings
            .iter()
            .map(|m| (m.page_id, m.revision))
            .collect();
        let live: std::collections::HashSet<PageId> = out
            .mappings
            .iter()
            .filter(|m| !m.freed)
            .map(|m| m.page_id)
            .collect();
        for (page_id, revision, r) in drops {
            out.dropped
                .entry(r.node)
                .or_default()
                .insert((r.page, page_id));
            if last.get(&page_id) == Some(&revision) {
                out.dropped_replicas += 1;
                if live.contains(&page_id) {
                    *out.short.entry(page_id).or_default() += 1;
                }
            }
        }
        Ok(out)
    }

    /// The chunks that hold a mapping for `id` (read again: only to report corruption).
    async fn chunks_holding(&self, paths: &[String], id: PageId) -> Vec<String> {
        let mut holding = vec![];
        for path in paths {
            if let Ok((data, _)) = self.client.get_data(path).await
                && let Ok(mappings) = gat::decode_chunk(&data)
                && mappings.iter().any(|m| m.page_id == id)
            {
                holding.push(path.clone());
            }
        }
        holding
    }

    pub fn client(&self) -> &zk::Client {
        &self.client
    }
}

/// Deltas a writer lets accumulate before it folds them into a chunk, whatever their size.
pub const COMPACT_AFTER_DELTAS: usize = 64;
/// Hard limit: past this many deltas, [`GatWriter::append`] compacts before returning.
const MAX_DELTAS: usize = 1024;

/// One znode of a worker's series.
#[derive(Debug, Clone)]
struct Delta {
    seq: u64,
    mappings: Vec<Mapping>,
    bytes: usize,
}

/// Appends mappings to one worker's series.
///
/// A group commit becomes one new *delta* znode `d<seq>` holding only the new mappings, so
/// an allocation never re-serialises older ones and a write carries tens of bytes per
/// mapping, not a whole chunk. Deltas are folded into full *chunks* `c<seq>` (≤ 64 KiB)
/// by [`GatWriter::compact`], one atomic multi-op that creates the chunk and deletes the
/// deltas it absorbed, so a reader sees every mapping exactly once, before or after.
///
/// Fencing: opening a writer bumps the version of the series' directory znode; every
/// write is a multi-op that first checks that version. A writer whose series was opened
/// again (by a new active monitor) gets [`StoreError::Fenced`] and has written nothing.
pub struct GatWriter<'a> {
    store: &'a Store,
    dir: String,
    /// Version of `dir` this writer set when it opened.
    fence: i32,
    next_seq: u64,
    deltas: Vec<Delta>,
    /// Sequence number of the newest compacted chunk.
    chunk_seq: Option<u64>,
}

fn parse_name(name: &str) -> Option<(char, u64)> {
    let kind = name.chars().next()?;
    let seq = name.get(1..)?.parse().ok()?;
    matches!(kind, 'c' | 'd').then_some((kind, seq))
}

impl<'a> GatWriter<'a> {
    /// Opens worker `worker`'s series, fencing off any earlier writer of it.
    pub async fn open(store: &'a Store, worker: u32) -> Result<Self, StoreError> {
        let dir = store.path(&format!("gat/w{worker:04}"));
        store
            .client
            .mkdir(&dir, &persistent())
            .await
            .map_err(zk_error("mkdir", dir.clone()))?;
        let stat = store
            .client
            .set_data(&dir, b"", None)
            .await
            .map_err(zk_error("set", dir.clone()))?;
        let mut w = Self {
            store,
            dir,
            fence: stat.version,
            next_seq: 0,
            deltas: vec![],
            chunk_seq: None,
        };
        w.reload().await?;
        Ok(w)
    }

    fn name(&self, kind: char, seq: u64) -> String {
        format!("{}/{kind}{seq:010}", self.dir)
    }

    /// Reads and decodes one znode of the series: its mappings and its size.
    async fn read(&self, path: &str) -> Result<(Vec<Mapping>, usize), StoreError> {
        let (data, _) = self
            .store
            .client
            .get_data(path)
            .await
            .map_err(zk_error("get", path))?;
        let mappings = gat::decode_chunk(&data).map_err(|source| StoreError::Chunk {
            path: path.into(),
            source,
        })?;
        Ok((mappings, data.len()))
    }

    /// Re-reads the series' names and its deltas (after an unknown outcome, or at open).
    async fn reload(&mut self) -> Result<(), StoreError> {
        self.deltas.clear();
        self.chunk_seq = None;
        let mut max = None;
        for child in self.store.children(&self.dir).await? {
            let (kind, seq) = parse_name(&child).ok_or_else(|| StoreError::Corrupt {
                path: format!("{}/{child}", self.dir),
                reason: "not a chunk or delta name".into(),
            })?;
            max = max.max(Some(seq));
            if kind == 'c' {
                self.chunk_seq = self.chunk_seq.max(Some(seq));
                continue;
            }
            let (mappings, bytes) = self.read(&self.name('d', seq)).await?;
            self.deltas.push(Delta {
                seq,
                mappings,
                bytes,
            });
        }
        self.next_seq = max.map_or(0, |m| m + 1);
        Ok(())
    }

    /// Runs `ops` after the fence check as one multi-op; maps the outcome to our errors.
    async fn fenced_multi(
        &self,
        what: &'static str,
        path: &str,
        ops: impl FnOnce(&mut zk::MultiWriter<'_>) -> Result<(), zk::Error>,
    ) -> Result<(), StoreError> {
        let mut multi = self.store.client.new_multi_writer();
        let built = self
            .store
            .add_fence(&mut multi)
            .and_then(|_| multi.add_check_version(&self.dir, self.fence))
            .and_then(|()| ops(&mut multi));
        built.map_err(zk_error(what, path))?;
        let elected = self.store.election_path().is_some();
        match multi.commit().await {
            Ok(_) => Ok(()),
            Err(zk::MultiWriteError::OperationFailed {
                source: zk::Error::BadVersion | zk::Error::NodeExists,
                ..
            }) => Err(StoreError::Fenced { path: path.into() }),
            // The election znode is gone: this monitor no longer leads.
            Err(zk::MultiWriteError::OperationFailed {
                index: 0,
                source: zk::Error::NoNode,
            }) if elected => Err(StoreError::Fenced { path: path.into() }),
            Err(zk::MultiWriteError::OperationFailed { source, .. }) => {
                Err(zk_error(what, path)(source))
            }
            Err(zk::MultiWriteError::RequestFailed { source }) if is_definite(&source) => {
                Err(zk_error(what, path)(source))
            }
            Err(zk::MultiWriteError::RequestFailed { source }) => Err(StoreError::Unknown {
                op: what,
                path: path.into(),
                source,
            }),
        }
    }

    /// Makes `batch` durable: one fenced write of one delta (more only for a batch over
    /// a chunk's size). Compacts first if the deltas have piled up past their limit.
    pub async fn append(&mut self, batch: &[Mapping]) -> Result<(), StoreError> {
        if self.deltas.len() >= MAX_DELTAS {
            self.compact().await?;
        }
        let mut rest = batch;
        while !rest.is_empty() {
            let mut bytes = CHUNK_HEADER_BYTES;
            let mut n = 0;
            while n < rest.len() && bytes + rest[n].encoded_bytes() <= CHUNK_MAX_BYTES {
                bytes += rest[n].encoded_bytes();
                n += 1;
            }
            let data = gat::encode_chunk(&rest[..n]).map_err(|source| StoreError::Chunk {
                path: self.dir.clone(),
                source,
            })?;
            // A batch that nearly fills a chunk is written as one: nothing to fold later.
            let full = data.len() >= CHUNK_MAX_BYTES * 3 / 4;
            let seq = self.next_seq;
            let path = self.name(if full { 'c' } else { 'd' }, seq);
            self.fenced_multi("write", &path, |m| {
                m.add_create(&path, &data, &persistent())
            })
            .await?;
            self.next_seq += 1;
            if full {
                self.chunk_seq = Some(seq);
            } else {
                self.deltas.push(Delta {
                    seq,
                    mappings: rest[..n].to_vec(),
                    bytes: data.len(),
                });
            }
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Whether [`Self::compact`] has work worth a write: a chunk's worth of deltas, or
    /// [`COMPACT_AFTER_DELTAS`] of them.
    pub fn compaction_due(&self) -> bool {
        let bytes: usize = self
            .deltas
            .iter()
            .map(|d| d.bytes - CHUNK_HEADER_BYTES)
            .sum();
        self.deltas.len() >= COMPACT_AFTER_DELTAS
            || (self.deltas.len() > 1 && bytes + CHUNK_HEADER_BYTES >= CHUNK_MAX_BYTES * 3 / 4)
    }

    /// Folds the oldest deltas (as many as fit in one chunk) into a new chunk and deletes
    /// them, atomically. Returns how many deltas it absorbed. After an unknown outcome it
    /// re-reads the series, so a retry starts from what ZooKeeper really holds.
    pub async fn compact(&mut self) -> Result<usize, StoreError> {
        let mut mappings: Vec<Mapping> = vec![];
        let mut bytes = CHUNK_HEADER_BYTES;
        let mut n = 0;
        for d in &self.deltas {
            let add = d.bytes - CHUNK_HEADER_BYTES;
            if bytes + add > CHUNK_MAX_BYTES {
                break;
            }
            bytes += add;
            mappings.extend_from_slice(&d.mappings);
            n += 1;
        }
        if n < 2 {
            return Ok(0);
        }
        let data = gat::encode_chunk(&mappings).map_err(|source| StoreError::Chunk {
            path: self.dir.clone(),
            source,
        })?;
        let seq = self.next_seq;
        let path = self.name('c', seq);
        let absorbed: Vec<String> = self.deltas[..n]
            .iter()
            .map(|d| self.name('d', d.seq))
            .collect();
        let result = self
            .fenced_multi("compact", &path, |m| {
                m.add_create(&path, &data, &persistent())?;
                absorbed.iter().try_for_each(|d| m.add_delete(d, None))
            })
            .await;
        match result {
            Ok(()) => {
                self.next_seq += 1;
                self.chunk_seq = Some(seq);
                self.deltas.drain(..n);
                Ok(n)
            }
            Err(e @ StoreError::Fenced { .. }) => Err(e),
            Err(e) => {
                self.reload().await?;
                Err(e)
            }
        }
    }

    /// After [`StoreError::Unknown`]: re-reads the series and reports whether every
    /// mapping of `batch` is stored in it.
    pub async fn resolve(&mut self, batch: &[Mapping]) -> Result<bool, StoreError> {
        self.reload().await?;
        if batch
            .iter()
            .all(|m| self.deltas.iter().any(|d| d.mappings.contains(m)))
        {
            return Ok(true);
        }
        // A batch written whole as a chunk: read the newest chunk.
        let Some(seq) = self.chunk_seq else {
            return Ok(false);
        };
        let (chunk, _) = self.read(&self.name('c', seq)).await?;
        Ok(batch.iter().all(|m| chunk.contains(m)))
    }

    /// Sequence number of the newest compacted chunk, if any.
    pub fn chunk_seq(&self) -> Option<u64> {
        self.chunk_seq
    }

    /// Deltas not yet compacted.
    pub fn pending_deltas(&self) -> usize {
        self.deltas.len()
    }
}
