//! Where cluster state comes from. A datastore runs as a task and publishes whole
//! [`Snapshot`]s on a `watch` channel: a burst of changes becomes one new value (the
//! channel keeps only the latest), and the reconciler never sees a half-applied burst.
//!
//! - [`dir::DirDatastore`]: a directory of kubectl-shaped manifests plus the ipam
//!   directory block store (standalone hosts, the lab).
//! - [`kube::KubeDatastore`]: reflectors on the Kubernetes API plus the ipam
//!   Kubernetes block store.
//!
//! Both feed the objects, as JSON, through one conversion ([`objects`], the policy
//! crate's manifest reader) into the policy crate's [`Cluster`], so the two backends
//! and `sluicectl policy check` cannot disagree on meaning.

pub mod block_lifecycle;
pub mod dir;
pub mod kube;
pub mod objects;

use std::collections::BTreeMap;
use std::sync::Arc;

use ipnet::Ipv4Net;
use sluice_policy::Cluster;

pub use objects::Conversion;

/// Everything the reconciler needs, complete as of one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Nodes, pods, namespaces and policies, the rejected ones included.
    pub cluster: Cluster,
    /// Every claimed block in the pool: block → owning node.
    pub blocks: BTreeMap<Ipv4Net, String>,
}

impl Snapshot {
    /// Blocks owned by `node`, ascending.
    pub fn blocks_of(&self, node: &str) -> Vec<Ipv4Net> {
        self.blocks
            .iter()
            .filter(|(_, n)| n.as_str() == node)
            .map(|(b, _)| *b)
            .collect()
    }
}

/// The channel a datastore publishes on; `None` until the first full sync.
pub type SnapshotSender = tokio::sync::watch::Sender<Option<Arc<Snapshot>>>;
pub type SnapshotReceiver = tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>;

#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("manifests directory {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("block store: {0}")]
    Blocks(#[from] sluice_ipam::store::StoreError),
    #[error("claiming a block for node {node}: {source}")]
    Claim {
        node: String,
        #[source]
        source: sluice_ipam::blocks::ClaimError,
    },
    #[error("publishing node blocks: {0}")]
    NodeBlocks(#[from] sluice_ipam::node_blocks::NodeBlocksError),
    #[error("Kubernetes client: {0}")]
    Kube(#[from] ::kube::Error),
    #[error("Kubernetes config: {0}")]
    KubeConfig(String),
    #[error("watch on {kind} ended: {reason}")]
    Watch { kind: &'static str, reason: String },
}

/// A source of snapshots. `run` publishes a snapshot after the first complete read
/// and after every change, and returns only on a fatal error. While the source is
/// unreachable it publishes nothing, so the last programmed state stays in place.
pub trait Datastore: Send + 'static {
    fn run(
        self,
        out: SnapshotSender,
    ) -> impl std::future::Future<Output = Result<(), DatastoreError>> + Send;
}
