//! pmgas global monitor. So far: the two-phase page allocation as a pure state machine
//! ([`coordinator`]). The RDMA and ZooKeeper shells, the GAT and leadership arrive with
//! their issue.
#![forbid(unsafe_code)]

pub mod coordinator;

pub use coordinator::{Action, Coordinator, Input, Mapping, NodeView, Timeouts};
