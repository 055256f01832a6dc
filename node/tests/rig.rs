//! The node's crash tests (ART and objects) again, on the rig's devdax PM (`/dev/dax0.0`) instead of tmpfs.
//! Built only with the `rig` feature; without a devdax device they fail.

// Both suites include the shared `support/target.rs`; that is intended here.
#![allow(clippy::duplicate_mod)]

#[path = "crash.rs"]
mod crash;

#[path = "object_crash.rs"]
mod object_crash;
