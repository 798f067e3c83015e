//! The errors of an IPAM operation and the CNI error code each maps to, in one place.

use std::path::PathBuf;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::allocator::{AllocError, RequestError};
use crate::blocks::ClaimError;
use crate::config::ConfigError;
use crate::state::StateError;
use crate::store::StoreError;

use sluice_cni_protocol::ErrorCode;

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
    #[error(
        "the requested address {ip} is outside the pool {pool}: request an address inside \
         ipam.pool"
    )]
    RequestedOutsidePool { ip: Ipv4Addr, pool: Ipv4Net },
    #[error("the requested address cannot be given: {source}")]
    Requested {
        #[source]
        source: RequestError,
    },
    #[error(
        "the requested address {ip} is in block {block}, which node {owner} owns: start the \
         pod on {owner}, or request an address of this node's blocks"
    )]
    RequestedBlockOfAnotherNode {
        ip: Ipv4Addr,
        block: Ipv4Net,
        owner: String,
    },
    #[error(
        "the requested address {ip} is in block {block}, which is not published for node \
         {node} (in a cluster the agent claims blocks; this node has {published}): request an \
         address of this node's blocks"
    )]
    RequestedBlockNotPublished {
        ip: Ipv4Addr,
        block: Ipv4Net,
        node: String,
        published: String,
    },
    #[error(
        "the requested address {ip} is in block {block}, which this node does not hold, and \
         the agent could not claim it for the node: {why}"
    )]
    RequestedBlockClaimFailed {
        ip: Ipv4Addr,
        block: Ipv4Net,
        why: String,
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
    /// The CNI error code for this error, from the registry every sluice CNI binary
    /// shares (docs/cni-errors.md).
    pub fn cni_code(&self) -> ErrorCode {
        match self {
            IpamError::Config(_) => ErrorCode::InvalidNetworkConfig,
            // A full disk is an unwritable state directory too; the message says which.
            IpamError::State(StateError::NotWritable { .. } | StateError::Full { .. }) => {
                ErrorCode::StateNotWritable
            }
            IpamError::State(StateError::Corrupt { .. }) => ErrorCode::StateCorrupt,
            IpamError::State(StateError::Io { .. }) => ErrorCode::IoFailure,
            // The agent has not published a block yet, is claiming another one, or
            // could not be reached to claim a requested address's block.
            IpamError::NoBlockPublished { .. }
            | IpamError::NodeBlocksFull { .. }
            | IpamError::RequestedBlockClaimFailed { .. } => ErrorCode::TryAgainLater,
            IpamError::PoolExhausted { .. } => ErrorCode::PoolExhausted,
            IpamError::Store(_) => ErrorCode::BlockStore,
            IpamError::NotAllocated { .. } | IpamError::AddressMismatch { .. } => {
                ErrorCode::CheckFailed
            }
            IpamError::RequestedOutsidePool { .. }
            | IpamError::Requested {
                source: RequestError::NotAPodAddress { .. },
            } => ErrorCode::RequestedAddressInvalid,
            IpamError::Requested {
                source: RequestError::Held { .. } | RequestError::HoldsAnother { .. },
            }
            | IpamError::RequestedBlockOfAnotherNode { .. }
            | IpamError::RequestedBlockNotPublished { .. } => {
                ErrorCode::RequestedAddressUnavailable
            }
        }
    }
}
