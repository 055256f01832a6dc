//! pmgas global monitor. The two-phase page allocation and the ZooKeeper-backed global
//! address table arrive with their issue; this crate holds the place in the workspace.
#![forbid(unsafe_code)]
