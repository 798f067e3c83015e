//! The directory datastore: kubectl-shaped manifests in a directory (re-read when a
//! file's mtime or size changes; polling is enough for the lab and standalone hosts
//! and needs no inotify limits), plus the ipam directory block store, where the agent
//! claims its node's block at start so tunl0 has an address before any pod exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sluice_ipam::blocks::{Pool, blocks_of, claim_block};
use sluice_ipam::store::BlockStore;
use sluice_ipam::store::dir::DirStore;

use sluice_node_files::local_api::AddressAnnotations;
use sluice_policy::NamespacedName;
use sluice_policy::sources::Sources;

use super::objects::{convert_source, parse_manifest_text};
use super::{Datastore, DatastoreError, Snapshot, SnapshotSender};

pub struct DirDatastore {
    manifests: PathBuf,
    store: DirStore,
    pool: Pool,
    node: String,
    poll: Duration,
}

/// What identifies a file's content without reading it.
type Stamp = (SystemTime, u64);

impl DirDatastore {
    pub fn new(
        manifests: PathBuf,
        block_store: PathBuf,
        pool: Pool,
        node: String,
        poll: Duration,
    ) -> Self {
        DirDatastore {
            manifests,
            store: DirStore::new(block_store),
            pool,
            node,
            poll,
        }
    }

    /// Make sure this node holds a block; returns every claim in the pool.
    ///
    /// Only the first block: with the directory store `sluice-ipam` claims further
    /// blocks itself when its node's are full (standalone hosts run no agent), so
    /// the agent would only race it. Blocks it claims show up in the next poll's
    /// list, and their routes follow. Nor does the agent release blocks here: there
    /// is no authoritative node list to tell a gone node from an unlisted one.
    async fn blocks(&self) -> Result<BTreeMap<ipnet::Ipv4Net, String>, DatastoreError> {
        if blocks_of(&self.store, &self.pool, &self.node)
            .await?
            .is_empty()
        {
            let block = claim_block(&self.store, &self.pool, &self.node)
                .await
                .map_err(|source| DatastoreError::Claim {
                    node: self.node.clone(),
                    source,
                })?;
            tracing::info!(%block, node = %self.node, "claimed block");
        }
        Ok(self
            .store
            .list()
            .await?
            .into_iter()
            .filter(|c| self.pool.has_block(c.cidr))
            .map(|c| (c.cidr, c.node))
            .collect())
    }
}

/// Manifest files under `dir` (recursively), sorted, with their stamps.
fn scan(dir: &Path) -> Result<BTreeMap<PathBuf, Stamp>, DatastoreError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| DatastoreError::Io {
            path: d.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| matches!(x, "yaml" | "yml" | "json"))
            {
                out.insert(
                    path,
                    (
                        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        meta.len(),
                    ),
                );
            }
        }
    }
    Ok(out)
}

/// Per-file cache: a file that stops parsing keeps its last good objects, so a
/// half-written edit never removes policies (and opens traffic) for a moment.
///
/// Each file's objects are converted once, when it changes, and the cluster is
/// updated by that file's objects only ([`Sources`]): a new pod's file at 10,000
/// pods costs its own conversion, not everyone's.
#[derive(Default)]
pub struct ManifestCache {
    files: BTreeMap<PathBuf, Stamp>,
    sources: Sources<PathBuf>,
    annotations: BTreeMap<PathBuf, BTreeMap<NamespacedName, AddressAnnotations>>,
}

impl ManifestCache {
    /// Re-read changed files; returns whether anything changed.
    pub fn refresh(&mut self, dir: &Path) -> Result<bool, DatastoreError> {
        let now = scan(dir)?;
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !now.contains_key(*p))
            .cloned()
            .collect();
        let mut changed = !gone.is_empty();
        for path in gone {
            self.files.remove(&path);
            self.annotations.remove(&path);
            self.sources.remove(&path);
        }
        for (path, stamp) in now {
            if self.files.get(&path).is_some_and(|s| *s == stamp) {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read manifest");
                    continue;
                }
            };
            match parse_manifest_text(&path.display().to_string(), &text) {
                Ok(objects) => {
                    let conv = convert_source(&objects);
                    for s in &conv.skipped {
                        tracing::warn!(object = %s, "manifest object skipped");
                    }
                    for a in &conv.ignored_annotations {
                        tracing::warn!("{a}");
                    }
                    for r in &conv.rejected {
                        tracing::error!(object = %r, "NetworkPolicy rejected; the pods it selects are held fail-closed");
                    }
                    self.files.insert(path.clone(), stamp);
                    if conv.annotations.is_empty() {
                        changed |= self.annotations.remove(&path).is_some();
                    } else {
                        changed |= self.annotations.get(&path) != Some(&conv.annotations);
                        self.annotations.insert(path.clone(), conv.annotations);
                    }
                    changed |= self.sources.set(path, conv.parsed);
                }
                Err(e) => {
                    // Not YAML/JSON: nothing in it can be attributed to an object, so
                    // nothing can be held by name. Keep the last good content (a
                    // half-written edit must not open anything); remember the stamp so
                    // the error is logged once per edit, not once per poll.
                    tracing::error!(error = %e, "manifest does not parse; keeping its previous content");
                    self.files.insert(path, stamp);
                }
            }
        }
        Ok(changed)
    }

    /// The cluster every file's objects make.
    pub fn cluster(&self) -> &sluice_policy::Cluster {
        self.sources.cluster()
    }

    /// Pods' address annotations, a later file's winning as a later object would.
    pub fn annotations(&self) -> BTreeMap<NamespacedName, AddressAnnotations> {
        let mut out = BTreeMap::new();
        for a in self.annotations.values() {
            out.extend(a.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        out
    }
}

impl Datastore for DirDatastore {
    async fn run(self, out: SnapshotSender) -> Result<(), DatastoreError> {
        let mut cache = ManifestCache::default();
        let mut last: Option<Arc<Snapshot>> = None;
        loop {
            let result: Result<Option<Snapshot>, DatastoreError> = async {
                let changed = cache.refresh(&self.manifests)?;
                let blocks = self.blocks().await?;
                if !changed && last.as_ref().is_some_and(|l| l.blocks == blocks) {
                    return Ok(None);
                }
                Ok(Some(Snapshot {
                    cluster: cache.cluster().clone(),
                    blocks,
                    annotations: cache.annotations(),
                    reported: Default::default(),
                }))
            }
            .await;
            match result {
                Ok(Some(snap)) if last.as_deref() != Some(&snap) => {
                    let snap = Arc::new(snap);
                    last = Some(snap.clone());
                    if out.send(Some(snap)).is_err() {
                        return Ok(()); // nobody listens: shutting down
                    }
                }
                Ok(_) => {}
                // An unreadable directory or block store is an outage: publish
                // nothing, so the last programmed state stays.
                Err(e) => {
                    tracing::warn!(error = %e, "directory datastore unavailable; keeping last state")
                }
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy::NamespacedName;

    async fn next(rx: &mut crate::datastore::SnapshotReceiver) -> Arc<Snapshot> {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("a snapshot")
            .unwrap();
        rx.borrow_and_update().clone().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claims_a_block_rereads_changes_and_keeps_last_good_content() {
        let dir = tempfile::tempdir().unwrap();
        let (m, b) = (dir.path().join("m"), dir.path().join("b"));
        std::fs::create_dir_all(m.join("sub")).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(
            m.join("sub/pod.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, managedFields: [{manager: kubectl}]}\nspec: {nodeName: n1}\n",
        )
        .unwrap();
        let pool = Pool::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
        let ds = DirDatastore::new(
            m.clone(),
            b.clone(),
            pool,
            "n1".into(),
            Duration::from_millis(20),
        );
        let (tx, mut rx) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(ds.run(tx));

        let s = next(&mut rx).await;
        assert_eq!(
            s.blocks_of("n1").len(),
            1,
            "the node claims a block before any pod"
        );
        assert!(s.cluster.pods.contains_key(&NamespacedName::new("x", "a")));

        // A new file is picked up.
        std::fs::write(m.join("ns.json"), r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"x","labels":{"team":"a"}}}"#).unwrap();
        let s = next(&mut rx).await;
        assert_eq!(s.cluster.namespaces["x"].labels["team"], "a");

        // A half-written edit does not remove the pod.
        std::fs::write(
            m.join("sub/pod.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namesp",
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = rx.borrow().clone().unwrap();
        assert!(s.cluster.pods.contains_key(&NamespacedName::new("x", "a")));

        // Deleting the file removes it.
        std::fs::remove_file(m.join("sub/pod.yaml")).unwrap();
        let s = next(&mut rx).await;
        assert!(s.cluster.pods.is_empty());
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_network_policies_in_the_directory_reach_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (m, b) = (dir.path().join("m"), dir.path().join("b"));
        std::fs::create_dir_all(&m).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(
            m.join("cnp.yaml"),
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: block-metadata}\n\
             spec: {tier: Admin, priority: 0, subject: {namespaces: {}}, egress: [{action: Deny, to: [{networks: [169.254.169.254/32]}]}]}\n\
             ---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: broken}\n\
             spec: {tier: Admin, priority: 1001, subject: {namespaces: {matchLabels: {tenant: a}}}}\n",
        )
        .unwrap();
        let pool = Pool::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
        let ds = DirDatastore::new(m, b, pool, "n1".into(), Duration::from_millis(20));
        let (tx, mut rx) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(ds.run(tx));
        let s = next(&mut rx).await;
        assert!(s.cluster.cluster_policies.contains_key("block-metadata"));
        // A broken one holds its subject, as a broken NetworkPolicy does.
        assert!(
            s.cluster
                .rejected_policies
                .contains_key(&NamespacedName::cluster_scoped("broken"))
        );
        task.abort();
    }

    #[test]
    fn list_and_managed_fields_are_handled() {
        let objs = parse_manifest_text(
            "list.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: a, managedFields: [{}]}\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: b}\n",
        )
        .unwrap();
        assert_eq!(objs.len(), 2);
        assert!(objs[0].value["metadata"].get("managedFields").is_none());
    }
}
