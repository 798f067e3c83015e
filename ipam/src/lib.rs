//! sluice IPAM: the cluster pool cut into per-node blocks, and per-pod addresses from
//! a node's blocks that are never handed out twice.
//!
//! - [`allocator`]: which address a pod gets (pure, property-tested).
//! - [`blocks`]: pool → blocks, block names, the claiming policy, orphan release.
//! - [`store`]: where block claims live (directory; Kubernetes with feature `kube`).
//! - [`state`]: the node's allocation state on disk (lock + atomic replace).
//! - [`node_blocks`]: the file in which the agent publishes a node's blocks.
//! - [`config`]: the conflist's `ipam` section.
//! - [`node_ipam`]: ADD, DEL, CHECK, GC and STATUS for one node.
//! - [`error`]: the operations' errors and their CNI codes.
//! - [`cni`]: the CNI side (settings, result, requested address, error mapping),
//!   shared by `sluice-ipam` and the `sluice` plugin's in-process IPAM.
//!
//! On a node (docs/node-files.md): `<stateDir>/lock` (flock), `<stateDir>/allocations.json`
//! (the [`Allocator`], replaced atomically by `sluice_node_files::atomic`), the node-blocks file (cluster), or one
//! file per claimed block in the directory store (standalone/lab).
//!
//! What the node agent calls: [`blocks::blocks_of`] and [`blocks::claim_block`] with a
//! [`store::BlockStore`] (`store::kube::KubeStore` in a cluster), [`node_blocks::write`]
//! to publish, [`node_ipam::needs_another_block`] to know when to claim more, and
//! [`blocks::release_orphan_blocks`] with the cluster's live nodes.

pub mod allocator;
pub mod block_on;
pub mod blocks;
pub mod cni;
pub mod config;
pub mod error;
pub mod node_blocks;
pub mod node_ipam;
pub mod state;
pub mod store;

pub use allocator::{
    Allocation, Allocator, AttachmentKey, RequestError, block_capacity, tunnel_address,
};
pub use blocks::{
    Pool, block_name, blocks_of, claim_block, parse_block_name, release_orphan_blocks,
};
pub use config::{IpamConfig, IpamSettings};
pub use error::IpamError;
pub use node_ipam::{Assigned, BlockClaimer, ClaimAnswer, NodeIpam, needs_another_block};
pub use state::StateDir;
pub use store::{BlockClaim, BlockStore, ClaimOutcome, StoreError, dir::DirStore};
