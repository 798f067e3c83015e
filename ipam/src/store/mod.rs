//! Block stores: where a node's claim on a block is recorded. A claim is atomic: of
//! any number of claimants for one block exactly one succeeds.
//!
//! - [`dir::DirStore`]: one file per block in a shared directory (standalone hosts,
//!   the lab); the claim is an exclusive create.
//! - `kube::KubeStore` (feature `kube`): one cluster-scoped `IPAMBlock` object per
//!   block; the claim is a create, and 409 AlreadyExists means taken.
//!
//! The trait is async because the Kubernetes store is; the directory store's futures
//! are ready at once, and the synchronous CNI binary drives them with
//! [`crate::block_on::block_on`].

use std::future::Future;
use std::path::PathBuf;

use ipnet::Ipv4Net;

pub mod dir;
#[cfg(feature = "kube")]
pub mod kube;

/// A block and the node that owns it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockClaim {
    pub cidr: Ipv4Net,
    pub node: String,
}

/// What a claim attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    Claimed,
    /// Someone else (or this node, earlier) holds it.
    Taken,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("block store {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("block store entry {path} is damaged ({reason}); remove it if no node uses that block")]
    Corrupt { path: PathBuf, reason: String },
    #[error("Kubernetes API: {op} {name}: {message}")]
    Api {
        op: &'static str,
        name: String,
        message: String,
    },
}

/// Where block claims live.
pub trait BlockStore {
    /// Every claimed block of every node.
    fn list(&self) -> impl Future<Output = Result<Vec<BlockClaim>, StoreError>> + Send;

    /// Claim `cidr` for `node`; exactly one concurrent claimant gets `Claimed`.
    fn claim(
        &self,
        cidr: Ipv4Net,
        node: &str,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send;

    /// Release `cidr` if `node` holds it. `Ok(false)` when it is not claimed, or is
    /// claimed by another node (which is left alone).
    fn release(
        &self,
        cidr: Ipv4Net,
        node: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}
