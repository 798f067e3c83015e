//! The errors of an IPAM operation and the CNI error code each maps to, in one place.

use std::path::PathBuf;

use crate::allocator::AllocError;
use crate::blocks::ClaimError;
use crate::config::ConfigError;
use crate::state::StateError;
use crate::store::StoreError;

/// CNI error codes `sluice-ipam` returns. 1–99 are the spec's; ours start at 110
/// (100–109 belong to the `sluice` plugin: 100 internal error, 101–102 delegation).
pub mod codes {
    /// Spec: I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Spec: invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Spec: try again later (the agent has not published a block yet, or is
    /// claiming another one).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Every block of the pool is claimed by some node.
    pub const POOL_EXHAUSTED: u32 = 110;
    /// The state directory cannot be written.
    pub const STATE_NOT_WRITABLE: u32 = 111;
    /// The state file is corrupt (and was left alone).
    pub const STATE_CORRUPT: u32 = 112;
    /// The block store failed or holds a damaged entry.
    pub const BLOCK_STORE: u32 = 113;
    /// CHECK: the attachment holds no address, or not the one the runtime has.
    pub const CHECK_FAILED: u32 = 114;
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "no IPAM block is published for node {node} in {path} ({why}); the sluice agent claims \
         the node's block and writes that file: check that it runs on this node with the same \
         node name (or use ipam.blockStore on a host without an agent)"
    )]
    NoBlockPublished {
        node: String,
        path: PathBuf,
        why: String,
    },
    #[error(
        "{source}; the sluice agent claims another block for this node when its blocks fill \
         up: retry shortly, and check the agent's log if this persists"
    )]
    NodeBlocksFull {
        #[source]
        source: AllocError,
    },
    #[error(
        "{source}; no block could be claimed either: release the blocks of nodes that no \
         longer exist, or configure a larger pool"
    )]
    PoolExhausted {
        #[source]
        source: ClaimError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no address is allocated to container {container_id} interface {ifname}")]
    NotAllocated {
        container_id: String,
        ifname: String,
    },
    #[error(
        "container {container_id} interface {ifname} holds {held}, but the runtime has {expected}"
    )]
    AddressMismatch {
        container_id: String,
        ifname: String,
        held: String,
        expected: String,
    },
}

impl From<ClaimError> for IpamError {
    fn from(e: ClaimError) -> IpamError {
        match e {
            ClaimError::Store(s) => IpamError::Store(s),
            e @ ClaimError::PoolExhausted { .. } => IpamError::PoolExhausted { source: e },
        }
    }
}

impl IpamError {
    /// The CNI error code for this error.
    pub fn cni_code(&self) -> u32 {
        match self {
            IpamError::Config(_) => codes::INVALID_CONFIG,
            IpamError::State(StateError::NotWritable { .. }) => codes::STATE_NOT_WRITABLE,
            IpamError::State(StateError::Corrupt { .. }) => codes::STATE_CORRUPT,
            IpamError::State(StateError::Io { .. }) => codes::IO_FAILURE,
            IpamError::NoBlockPublished { .. } | IpamError::NodeBlocksFull { .. } => {
                codes::TRY_AGAIN_LATER
            }
            IpamError::PoolExhausted { .. } => codes::POOL_EXHAUSTED,
            IpamError::Store(_) => codes::BLOCK_STORE,
            IpamError::NotAllocated { .. } | IpamError::AddressMismatch { .. } => {
                codes::CHECK_FAILED
            }
        }
    }
}
