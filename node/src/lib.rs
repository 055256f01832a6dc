//! pmgas data server. For now: opening the PM that a node would serve (devdax, or a tmpfs
//! file in development), refusing anything RDMA cannot register. The allocation-record
//! table, object allocator and client API arrive with their issues.
#![forbid(unsafe_code)]

pub use pmgas_verbs::{MappedRegion, RegionKind};
