//! pmgas global monitor. So far: the two-phase page allocation as a pure state machine
//! ([`coordinator`]) and the GAT's persistence in ZooKeeper ([`store`]). The RDMA shell,
//! node join and leadership arrive with their issue.
#![forbid(unsafe_code)]

pub mod coordinator;
pub mod server;
pub mod store;

pub use coordinator::{Action, Coordinator, Input, Mapping, NodeView, Timeouts};
pub use store::{GatWriter, LoadedGat, Store, StoreError};
