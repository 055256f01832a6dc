//! pmgas data server: a node's PM pool (devdax, or a tmpfs file in development), its
//! allocation-record table (ART) and the persistence primitive that every PM update goes
//! through, and the crash-consistent object allocator inside ALLOCATED pages.
//! [`Client`] is the co-located application's handle: replicated pages, objects, mapping
//! lookups; [`service`] is the node's connection to the monitor that carries them out.
//! [`space::Space`] is any process's handle on the global address space, [`data`] the data
//! node's side of it (`DATAPATH.md`); [`blockcache`] and [`directory`] are the pure parts
//! of the coherent client block cache (`CACHE.md`, not wired in yet).
#![deny(unsafe_code)]

pub mod art;
pub mod audit;
pub mod blockcache;
mod cache;
pub mod client;
mod coherence;
pub mod data;
pub mod directory;
pub mod objects;
pub mod participant;
#[allow(unsafe_code)] // the one module that touches the mapping and issues flushes
pub mod pmem;
pub mod pool;
mod rereplica;
pub mod service;
pub mod space;

pub use art::{ArtError, ArtState, ReconcileReport};
pub use client::{Client, ClientConfig, ClientError, GlobalPage};
pub use objects::{LocalPageIds, ObjectAllocator, ObjectError, PageSource, ThreadCache};
pub use pmgas_verbs::{MappedRegion, RegionKind};
pub use pool::{OnBlank, Pool, PoolError, PoolIdentity};

/// Logs to stderr through `tracing`: warnings and errors unless `RUST_LOG` says otherwise
/// (failures of peers, nodes declared dead and replicas lost must reach an operator by
/// default). The node's binaries (`pmgas-node`, `pmgas`) call it first.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::builder()
                .with_default_directive(tracing_subscriber::filter::LevelFilter::WARN.into())
                .from_env_lossy(),
        )
        .init();
}

/// FNV-1a, 64 bits: a stable digest of a page's bytes or a client's name (not a
/// cryptographic hash).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
