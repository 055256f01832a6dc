//! The crate's one error type. Variants name the verb or step that failed and carry the
//! errno (as `std::io::Error`) where the system gave one.

use std::io;

use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A libibverbs or librdmacm call returned failure; `verb` is its C name.
    #[error("{verb} failed{context}: {source}")]
    Verb {
        verb: &'static str,
        /// Extra words for the message, such as the device or address involved.
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("no RDMA device named {name:?} (devices present: {present:?})")]
    NoSuchDevice { name: String, present: Vec<String> },
    #[error("no RoCE v2 GID for {ip} on {device} port {port}")]
    NoGidForIp {
        device: String,
        port: u8,
        ip: std::net::IpAddr,
    },
    #[error("rdma_cm on {addr}: expected {expected}, got {got} (status {status})")]
    CmEvent {
        addr: String,
        expected: &'static str,
        got: String,
        status: i32,
    },
    #[error("rdma_cm peer {addr} rejected the connection (status {status})")]
    Rejected { addr: String, status: i32 },
    #[error("timed out after {timeout_ms} ms waiting for {what}")]
    Timeout { what: String, timeout_ms: u64 },
    #[error(
        "work request {wr_id:#x} ({opcode}) completed with {status_text} (status {status}, vendor error {vendor_err:#x})"
    )]
    WorkCompletion {
        wr_id: u64,
        opcode: &'static str,
        status: u32,
        status_text: String,
        vendor_err: u32,
    },
    #[error(
        "the connection's resources belong to device {pd_device}, but the route uses {route_device}"
    )]
    DeviceMismatch {
        pd_device: String,
        route_device: String,
    },
    #[error("{what} is {len_bytes} bytes, more than the limit of {max_bytes}")]
    TooLarge {
        what: &'static str,
        len_bytes: usize,
        max_bytes: usize,
    },
    #[error("{what} [{offset}, +{len_bytes}) is outside its region of {region_bytes} bytes")]
    OutOfBounds {
        what: &'static str,
        offset: u64,
        len_bytes: u64,
        region_bytes: u64,
    },
    #[error("all {limit} request slots are in use; retry once responses arrive")]
    Backpressure { limit: usize },
    #[error("malformed message from the peer: {reason}")]
    Malformed { reason: String },
    #[error("the peer disconnected")]
    Disconnected,
    #[error("{path}: {reason}")]
    Region {
        path: String,
        reason: String,
        #[source]
        source: Option<io::Error>,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// Builds a [`Error::Verb`] from the current `errno`.
    pub(crate) fn last_os(verb: &'static str, context: impl Into<String>) -> Self {
        Self::from_errno(verb, context, io::Error::last_os_error())
    }

    /// Builds a [`Error::Verb`] from a verb that returns the errno (or its negation) directly,
    /// as `ibv_post_send` and `ibv_modify_qp` do.
    pub(crate) fn from_ret(verb: &'static str, context: impl Into<String>, ret: i32) -> Self {
        Self::from_errno(verb, context, io::Error::from_raw_os_error(ret.abs()))
    }

    fn from_errno(verb: &'static str, context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        let context = if context.is_empty() {
            context
        } else {
            format!(" ({context})")
        };
        Self::Verb {
            verb,
            context,
            source,
        }
    }

    /// The errno carried by a failed verb, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Verb { source, .. } => source.raw_os_error(),
            Self::Region {
                source: Some(source),
                ..
            } => source.raw_os_error(),
            _ => None,
        }
    }
}
