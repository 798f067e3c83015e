//! The one error of the netlink layer.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("entering network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused a request; `errno` is positive (e.g. `libc::EEXIST`).
    #[error("{op}: {}", std::io::Error::from_raw_os_error(*errno))]
    Kernel { op: String, errno: i32 },
    #[error("{op}: undecodable netlink reply: {detail}")]
    Decode { op: String, detail: String },
}

impl NetlinkError {
    /// The kernel's errno, when the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}
