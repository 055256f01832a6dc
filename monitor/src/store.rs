//! The monitor's metadata in ZooKeeper, under `/pmgas/<cluster>/`:
//!
//! - `epoch`: the config epoch, as decimal text;
//! - `nodes/`: the live data servers (one child per node);
//! - `gat/w<worker>/c<seq>`: the global address table, one znode series per monitor
//!   worker, each znode one chunk of at most 64 KiB (`layout::gat`).
//!
//! A [`GatWriter`] appends a batch of mappings (a group commit) with one ZooKeeper write:
//! it rewrites only its current chunk, with the chunk's version as the expected version,
//! and starts a new chunk when the current one is full. So adding mappings never
//! re-serialises older chunks, and a second writer on the same series (a deposed monitor)
//! fails with [`StoreError::Fenced`] instead of overwriting.
//!
//! A write whose outcome is unknown (connection lost in flight) is reported as
//! [`StoreError::Unknown`]; [`GatWriter::resolve`] re-reads the chunk to learn whether the
//! batch landed, as the zookeeper-client documentation advises for non-semantic errors.

use std::time::Duration;

use pmgas_layout::Epoch;
use pmgas_layout::gat::{self, CHUNK_HEADER_BYTES, CHUNK_MAX_BYTES, GatError, Mapping};
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
}

/// The whole GAT as loaded from ZooKeeper.
#[derive(Debug, Default)]
pub struct LoadedGat {
    pub mappings: Vec<Mapping>,
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
        let store = Self { client, root };
        for dir in [store.path("gat"), store.path("nodes")] {
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

    pub async fn epoch(&self) -> Result<Epoch, StoreError> {
        let path = self.path("epoch");
        let (data, _) = self
            .client
            .get_data(&path)
            .await
            .map_err(zk_error("get", path.clone()))?;
        let text = String::from_utf8_lossy(&data);
        text.trim()
            .parse()
            .map(Epoch)
            .map_err(|_| StoreError::Corrupt {
                path,
                reason: format!("epoch {text:?}"),
            })
    }

    /// Announces this monitor as the active one: an ephemeral `leader` znode holding its
    /// rdma_cm address, gone when the session ends. A second monitor is refused (standby
    /// election arrives with the high-availability work).
    pub async fn publish_leader(&self, addr: &str) -> Result<(), StoreError> {
        let path = self.path("leader");
        let options = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
        match self.client.create(&path, addr.as_bytes(), &options).await {
            Ok(_) => Ok(()),
            Err(zk::Error::NodeExists) => Err(StoreError::Fenced { path }),
            Err(source) => Err(zk_error("create", path)(source)),
        }
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

    /// Records a joined node in `nodes/` (its znode holds `info`).
    pub async fn register_node(&self, node: u32, info: &str) -> Result<(), StoreError> {
        let path = self.path(&format!("nodes/node{node}"));
        match self
            .client
            .create(&path, info.as_bytes(), &persistent())
            .await
        {
            Ok(_) => Ok(()),
            Err(zk::Error::NodeExists) => self
                .client
                .set_data(&path, info.as_bytes(), None)
                .await
                .map(|_| ())
                .map_err(zk_error("set", path)),
            Err(source) => Err(zk_error("create", path)(source)),
        }
    }

    /// Removes a node that left from `nodes/`.
    pub async fn unregister_node(&self, node: u32) -> Result<(), StoreError> {
        let path = self.path(&format!("nodes/node{node}"));
        match self.client.delete(&path, None).await {
            Ok(()) | Err(zk::Error::NoNode) => Ok(()),
            Err(source) => Err(zk_error("delete", path)(source)),
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

    /// Reads every chunk of every worker's series, concurrently, and validates them.
    pub async fn load_gat(&self) -> Result<LoadedGat, StoreError> {
        let gat = self.path("gat");
        let mut paths = vec![];
        for worker in self.children(&gat).await? {
            let dir = format!("{gat}/{worker}");
            for chunk in self.children(&dir).await? {
                paths.push(format!("{dir}/{chunk}"));
            }
        }
        let reads = paths.iter().map(|p| self.client.get_data(p));
        let results = futures::future::join_all(reads).await;
        let mut out = LoadedGat {
            chunks: paths.len(),
            ..LoadedGat::default()
        };
        let mut seen = std::collections::HashSet::new();
        for (path, result) in paths.iter().zip(results) {
            let (data, _) = result.map_err(zk_error("get", path.clone()))?;
            let mappings = gat::decode_chunk(&data).map_err(|source| StoreError::Chunk {
                path: path.clone(),
                source,
            })?;
            for m in mappings {
                if !seen.insert(m.page_id) {
                    return Err(StoreError::Corrupt {
                        path: path.clone(),
                        reason: format!("page id {} stored twice", m.page_id.0),
                    });
                }
                out.max_page_id = out.max_page_id.max(m.page_id.0);
                out.mappings.push(m);
            }
        }
        out.mappings.sort_by_key(|m| m.page_id);
        Ok(out)
    }

    pub fn client(&self) -> &zk::Client {
        &self.client
    }
}

/// Appends mappings to one worker's chunk series.
pub struct GatWriter<'a> {
    store: &'a Store,
    dir: String,
    seq: u32,
    chunk: Vec<Mapping>,
    chunk_bytes: usize,
    /// Version of the current chunk's znode; `None` until it exists.
    version: Option<i32>,
}

impl<'a> GatWriter<'a> {
    /// Opens worker `worker`'s series, resuming in its last chunk.
    pub async fn open(store: &'a Store, worker: u32) -> Result<Self, StoreError> {
        let dir = store.path(&format!("gat/w{worker:04}"));
        store
            .client
            .mkdir(&dir, &persistent())
            .await
            .map_err(zk_error("mkdir", dir.clone()))?;
        let mut w = Self {
            store,
            dir,
            seq: 0,
            chunk: vec![],
            chunk_bytes: CHUNK_HEADER_BYTES,
            version: None,
        };
        if let Some(last) = store.children(&w.dir).await?.last() {
            w.seq = last
                .strip_prefix('c')
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    path: format!("{}/{last}", w.dir),
                    reason: "not a chunk name".into(),
                })?;
            w.reload().await?;
        }
        Ok(w)
    }

    fn chunk_path(&self) -> String {
        format!("{}/c{:010}", self.dir, self.seq)
    }

    async fn reload(&mut self) -> Result<(), StoreError> {
        let path = self.chunk_path();
        match self.store.client.get_data(&path).await {
            Ok((data, stat)) => {
                self.chunk = gat::decode_chunk(&data)
                    .map_err(|source| StoreError::Chunk { path, source })?;
                self.chunk_bytes = data.len();
                self.version = Some(stat.version);
            }
            Err(zk::Error::NoNode) => {
                self.chunk.clear();
                self.chunk_bytes = CHUNK_HEADER_BYTES;
                self.version = None;
            }
            Err(source) => return Err(zk_error("get", path)(source)),
        }
        Ok(())
    }

    /// Makes `batch` durable with as few ZooKeeper writes as fit: usually one.
    pub async fn append(&mut self, batch: &[Mapping]) -> Result<(), StoreError> {
        let mut rest = batch;
        while !rest.is_empty() {
            if self.chunk_bytes >= CHUNK_MAX_BYTES - 8 - 8 * pmgas_layout::wire::MAX_REPLICAS
                && !self.chunk.is_empty()
            {
                self.seq += 1;
                self.chunk.clear();
                self.chunk_bytes = CHUNK_HEADER_BYTES;
                self.version = None;
            }
            // Take as many as fit in the current chunk.
            let mut bytes = self.chunk_bytes;
            let mut n = 0;
            while n < rest.len() && bytes + rest[n].encoded_bytes() <= CHUNK_MAX_BYTES {
                bytes += rest[n].encoded_bytes();
                n += 1;
            }
            if n == 0 {
                // Not even one fits: close this chunk and retry in a fresh one.
                self.chunk_bytes = CHUNK_MAX_BYTES;
                continue;
            }
            let mut next = self.chunk.clone();
            next.extend_from_slice(&rest[..n]);
            let data = gat::encode_chunk(&next).map_err(|source| StoreError::Chunk {
                path: self.chunk_path(),
                source,
            })?;
            let path = self.chunk_path();
            let result = match self.version {
                None => self
                    .store
                    .client
                    .create(&path, &data, &persistent())
                    .await
                    .map(|(stat, _)| stat.version),
                Some(v) => self
                    .store
                    .client
                    .set_data(&path, &data, Some(v))
                    .await
                    .map(|stat| stat.version),
            };
            match result {
                Ok(version) => {
                    self.version = Some(version);
                    self.chunk = next;
                    self.chunk_bytes = data.len();
                    rest = &rest[n..];
                }
                Err(zk::Error::BadVersion | zk::Error::NodeExists) => {
                    return Err(StoreError::Fenced { path });
                }
                Err(source) if is_definite(&source) => return Err(zk_error("write", path)(source)),
                Err(source) => {
                    return Err(StoreError::Unknown {
                        op: "write",
                        path,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// After [`StoreError::Unknown`]: re-reads the current chunk and reports whether every
    /// mapping of `batch` is stored.
    pub async fn resolve(&mut self, batch: &[Mapping]) -> Result<bool, StoreError> {
        self.reload().await?;
        Ok(batch.iter().all(|m| self.chunk.contains(m)))
    }

    pub fn chunk_seq(&self) -> u32 {
        self.seq
    }
}
