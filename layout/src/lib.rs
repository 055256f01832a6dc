//! On-PM and wire formats of pmgas.
//!
//! This crate does no I/O and contains no `unsafe`: it only describes bytes. The global
//! address and id newtypes live here because every other crate speaks them. FORMAT.md
//! describes every byte.
#![forbid(unsafe_code)]

pub mod addr;
pub mod gat;
pub mod ids;
pub mod pool;
pub mod wire;

pub use addr::{AddrError, GlobalAddr, PageId, check_page_size};
pub use ids::{ClusterId, Epoch, NodeId, PageIndex};
pub use pool::{ArtRecord, FormatError, PageState, PoolHeader};
