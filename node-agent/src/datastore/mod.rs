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
pub mod cluster_network_policy;
pub mod dir;
pub mod kube;
pub mod objects;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Pods' address annotations (only pods that have one).
    pub annotations:
        BTreeMap<sluice_policy::NamespacedName, sluice_node_files::local_api::AddressAnnotations>,
    /// Pods whose address comes from the CNI plugin's report over the node-local API
    /// (not yet from the datastore), with the report's instant: the loop syncs for
    /// them at once and measures their wait from the report.
    pub reported: BTreeMap<sluice_policy::NamespacedName, Instant>,
}

impl Snapshot {
    /// Whether a pod was reported after `t`: a new pod is waiting fail-closed.
    pub fn reported_after(&self, t: Instant) -> bool {
        self.reported.values().any(|at| *at > t)
    }

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

/// How long a watch may keep failing before the datastore is reported out of sync:
/// a dropped watch that reconnects at the next try is routine, an API server gone
/// for longer is worth an operator's look.
pub const OUT_OF_SYNC_AFTER: Duration = Duration::from_secs(5);

/// The datastore's side of readiness: which watches are failing, since when and
/// why. The reflectors report errors and successes; health turns a failure older than
/// [`OUT_OF_SYNC_AFTER`] into a reason. It never changes what is programmed: while the
/// source is failing, the last snapshot stays in force.
#[derive(Debug, Default)]
pub struct DatastoreHealth {
    failing: Mutex<BTreeMap<&'static str, Failure>>,
    /// Facts about the source that are not failures but an operator should see in
    /// `/readyz` (an optional CRD that is not installed), by kind.
    notes: Mutex<BTreeMap<&'static str, String>>,
}

#[derive(Debug, Clone)]
struct Failure {
    since: Instant,
    error: String,
}

impl DatastoreHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Failure>> {
        self.failing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The watch of `kind` delivered an event or a probe of it succeeded.
    pub fn ok(&self, kind: &'static str) {
        self.lock().remove(kind);
    }

    /// The watch of `kind` failed with `error`; the failure dates from its first
    /// error since the last success.
    pub fn failed(&self, kind: &'static str, error: String) {
        self.failed_at(kind, error, Instant::now());
    }

    fn failed_at(&self, kind: &'static str, error: String, now: Instant) {
        self.lock()
            .entry(kind)
            .and_modify(|f| f.error.clone_from(&error))
            .or_insert(Failure { since: now, error });
    }

    /// Record a fact about `kind` for `/readyz` that does not make the datastore out
    /// of sync; `None` removes it.
    pub fn note(&self, kind: &'static str, note: Option<String>) {
        let mut notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        match note {
            Some(n) => notes.insert(kind, n),
            None => notes.remove(kind),
        };
    }

    /// Every note, as `kind: note` lines in kind order.
    pub fn notes(&self) -> Vec<String> {
        self.notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect()
    }

    /// Whether the watch of `kind` is failing now (at any age).
    pub fn is_failing(&self, kind: &'static str) -> bool {
        self.lock().contains_key(kind)
    }

    /// Why the datastore is out of sync, if a watch has been failing for
    /// [`OUT_OF_SYNC_AFTER`] or longer: the longest-failing one, with its last error.
    pub fn problem(&self) -> Option<String> {
        self.problem_at(Instant::now())
    }

    fn problem_at(&self, now: Instant) -> Option<String> {
        let failing = self.lock();
        let (kind, f) = failing.iter().min_by_key(|(_, f)| f.since)?;
        let age = now.saturating_duration_since(f.since);
        (age >= OUT_OF_SYNC_AFTER).then(|| {
            format!(
                "datastore out of sync for {} s ({} watch{} failing), keeping the last state: {kind}: {}",
                age.as_secs(),
                failing.len(),
                if failing.len() == 1 { "" } else { "es" },
                f.error
            )
        })
    }

    /// How long the datastore has been out of sync (the age of the longest-failing
    /// watch, once it is [`OUT_OF_SYNC_AFTER`] or older; zero otherwise) and how many
    /// watches are failing at any age: what `/metrics` exports, so an alert can fire
    /// on an API server outage without reading `/readyz`.
    pub fn out_of_sync(&self) -> (Duration, usize) {
        self.out_of_sync_at(Instant::now())
    }

    fn out_of_sync_at(&self, now: Instant) -> (Duration, usize) {
        let failing = self.lock();
        let age = failing
            .values()
            .map(|f| now.saturating_duration_since(f.since))
            .max()
            .filter(|age| *age >= OUT_OF_SYNC_AFTER)
            .unwrap_or_default();
        (age, failing.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_out_of_sync_age_counts_only_after_the_grace_and_clears_on_success() {
        let h = DatastoreHealth::default();
        let t0 = Instant::now();
        assert_eq!(h.out_of_sync_at(t0), (Duration::ZERO, 0));
        h.failed_at("pods", "connection refused".into(), t0);
        h.failed_at(
            "namespaces",
            "connection refused".into(),
            t0 + Duration::from_secs(3),
        );
        assert_eq!(
            h.out_of_sync_at(t0 + Duration::from_secs(4)),
            (Duration::ZERO, 2)
        );
        assert_eq!(
            h.out_of_sync_at(t0 + Duration::from_secs(9)),
            (Duration::from_secs(9), 2)
        );
        h.ok("pods");
        assert_eq!(
            h.out_of_sync_at(t0 + Duration::from_secs(9)),
            (Duration::from_secs(6), 1)
        );
        h.ok("namespaces");
        assert_eq!(
            h.out_of_sync_at(t0 + Duration::from_secs(9)),
            (Duration::ZERO, 0)
        );
    }

    #[test]
    fn a_failure_is_a_problem_only_after_the_grace_and_until_a_success() {
        let h = DatastoreHealth::default();
        let t0 = Instant::now();
        h.failed_at("Pod", "connection refused".into(), t0);
        assert_eq!(h.problem_at(t0 + Duration::from_secs(1)), None, "a blip");
        // Later errors keep the first one's date and bring their own text.
        h.failed_at("Pod", "timed out".into(), t0 + Duration::from_secs(3));
        let p = h.problem_at(t0 + OUT_OF_SYNC_AFTER).unwrap();
        assert!(p.contains("Pod: timed out") && p.contains("5 s"), "{p}");
        h.ok("Pod");
        assert_eq!(h.problem_at(t0 + Duration::from_secs(60)), None);
    }
}
