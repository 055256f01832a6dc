//! pmgas data server: a node's PM pool (devdax, or a tmpfs file in development), its
//! allocation-record table (ART) and the persistence primitive that every PM update goes
//! through. The object allocator and the client API arrive with their issues.
#![deny(unsafe_code)]

pub mod art;
#[allow(unsafe_code)] // the one module that touches the mapping and issues flushes
pub mod pmem;
pub mod pool;

pub use art::{ArtError, ArtState, ReconcileReport};
pub use pmgas_verbs::{MappedRegion, RegionKind};
pub use pool::{OnBlank, Pool, PoolError, PoolIdentity};
