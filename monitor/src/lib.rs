//! pmgas global monitor: the two-phase page allocation as a pure state machine
//! ([`coordinator`]), the GAT's persistence in ZooKeeper ([`store`]: fenced delta writes,
//! compaction into chunks, atomic node registration) and the RDMA shell that joins nodes
//! and drives allocations ([`server`]); freeing a page is its own small state machine
//! ([`freeing`]).
#![forbid(unsafe_code)]

pub mod coordinator;
pub mod freeing;
pub mod rereplication;
pub mod server;
pub mod store;

pub use coordinator::{Action, Coordinator, Input, Mapping, NodeView, Timeouts};
pub use store::{GatWriter, LoadedGat, Store, StoreError};
