//! On-PM and wire formats of pmgas.
//!
//! This crate does no I/O and contains no `unsafe`: it only describes bytes. The global
//! address newtypes live here because every other crate speaks them.
#![forbid(unsafe_code)]

pub mod addr;

pub use addr::{AddrError, GlobalAddr, PageId};
