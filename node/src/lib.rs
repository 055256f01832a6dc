//! pmgas data server: a node's PM pool (devdax, or a tmpfs file in development), its
//! allocation-record table (ART) and the persistence primitive that every PM update goes
//! through, and the crash-consistent object allocator inside ALLOCATED pages.
//! [`Client`] is the co-located application's handle: replicated pages, objects, mapping
//! lookups; [`service`] is the node's connection to the monitor that carries them out.
#![deny(unsafe_code)]

pub mod art;
pub mod audit;
mod cache;
pub mod client;
pub mod data;
pub mod objects;
pub mod participant;
#[allow(unsafe_code)] // the one module that touches the mapping and issues flushes
pub mod pmem;
pub mod pool;
pub mod service;
pub mod space;

pub use art::{ArtError, ArtState, ReconcileReport};
pub use client::{Client, ClientConfig, ClientError, GlobalPage};
pub use objects::{LocalPageIds, ObjectAllocator, ObjectError, PageSource, ThreadCache};
pub use pmgas_verbs::{MappedRegion, RegionKind};
pub use pool::{OnBlank, Pool, PoolError, PoolIdentity};
