//! A safe Rust layer over the system's rdma-core (libibverbs + librdmacm), as pmgas uses it:
//! devices and GIDs, protection domains and memory regions (over owned buffers or raw PM
//! mappings), completion queues, RC queue pairs connected with rdma_cm, one-sided READ /
//! WRITE / atomics, two-sided SEND / RECV, and a small request/response message layer for
//! the control plane.
//!
//! Resources hold an `Arc` to what they depend on (MR → PD → context), so drop order always
//! follows dependencies. Posting work requests is `unsafe`, with the contract in [`qp`].

pub mod cm;
pub mod cq;
pub mod device;
pub mod error;
pub mod fault;
pub mod mr;
pub mod msg;
pub mod peer;
pub mod qp;
pub mod region;
pub mod spin;
pub mod wait;

pub use cm::{ConnectRequest, Connection, ConnectionConfig, Connector, Listener, ResolvedRoute};
pub use cq::WorkCompletion;
pub use device::{Context, GidEntry, GidType, PortAttr, device_names};
pub use error::{Error, Result};
pub use mr::{Access, AlignedBuf, MemoryRegion, ProtectionDomain, RemoteRegion};
pub use msg::{Endpoint, Incoming, MsgConfig, MsgStats, OneSided};
pub use qp::{Opcode, WorkRequest};
pub use region::{MappedRegion, RegionKind};
