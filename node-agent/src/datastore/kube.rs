//! The Kubernetes datastore: one reflector per kind (Nodes, Pods, Namespaces,
//! NetworkPolicies, ClusterNetworkPolicies) with managed fields stripped before they
//! are stored, a change signal that coalesces bursts into one snapshot, and the node's
//! block claimed through the ipam crate's Kubernetes store and published to the
//! node-blocks file the IPAM plugin reads.
//!
//! The ClusterNetworkPolicy CRD is optional: while the API answers 404 for it, the
//! agent runs with no ClusterNetworkPolicies, says so once in its log and in
//! `/readyz` (a note, not a failure), and its reflector's backoff keeps listing, so
//! policies apply as soon as the CRD is installed.
//! Each ClusterNetworkPolicy's `Accepted` status condition is written from a task of
//! its own, only when the object does not already say it (`docs/cluster-network-policy.md`).
//!
//! Every object is serialized to JSON and converted by [`super::objects`], the same
//! path the directory datastore takes; only when its `resourceVersion` changed
//! ([`Converted`]), so one new pod is not 10,000 pods converted again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use sluice_ipam::blocks::Pool;
use sluice_ipam::store::BlockStore;
use sluice_node_files::local_api::AddressAnnotations;
use sluice_policy::sources::Sources;
use sluice_policy::{NamespacedName, RawObject};
use tokio::sync::Notify;

use super::block_lifecycle::{
    BlockSettings, OrphanTracker, ensure_capacity, publish, release_orphans,
};
use crate::metrics::Metrics;

use super::cluster_network_policy::{
    ClusterNetworkPolicy, FIELD_MANAGER, condition_update, desired_condition,
};
use super::objects::convert_source;
use super::{Datastore, DatastoreError, DatastoreHealth, Snapshot, SnapshotSender};

/// How often the block list is re-read even without an IPAMBlock event (a safety net:
/// the IPAMBlock reflector normally triggers the read at once).
const BLOCK_POLL: Duration = Duration::from_secs(30);

/// How often the IPAM state is checked against the low-water mark. Reading the
/// state file is cheap and local; a full block stops pod creation (the plugin
/// answers "try again later"), so this is short.
const CAPACITY_POLL: Duration = Duration::from_secs(2);

/// How often a failing watch's kind is probed with a one-item list. A watch that
/// reconnects without a change delivers no event, so only a probe can say the API
/// server answers again.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// How long a ClusterNetworkPolicy whose status write failed (no permission, the
/// policy just deleted, the API down) waits before the write is tried again while
/// the object is unchanged: once a minute in the log, not once a sync.
const STATUS_RETRY: Duration = Duration::from_secs(60);

pub struct KubeDatastore<S> {
    client: Client,
    blocks: S,
    pool: Pool,
    node: String,
    node_blocks_file: PathBuf,
    coalesce: Duration,
    settings: BlockSettings,
    metrics: Option<Arc<Metrics>>,
    health: Arc<DatastoreHealth>,
}

impl<S: BlockStore + Send + Sync + 'static> KubeDatastore<S> {
    pub fn new(
        client: Client,
        blocks: S,
        pool: Pool,
        node: String,
        node_blocks_file: PathBuf,
        coalesce: Duration,
    ) -> Self {
        // The node-blocks file lives in the IPAM state directory by default
        // (docs/node-files.md); `with_block_settings` names it explicitly.
        let state_dir = node_blocks_file
            .parent()
            .map_or_else(|| PathBuf::from("."), PathBuf::from);
        KubeDatastore {
            client,
            blocks,
            pool,
            node,
            node_blocks_file,
            coalesce,
            settings: BlockSettings::new(state_dir),
            metrics: None,
            health: Arc::default(),
        }
    }

    /// Report watch failures and recoveries to `health` (readiness and the status file).
    pub fn with_health(mut self, health: Arc<DatastoreHealth>) -> Self {
        self.health = health;
        self
    }

    /// Manage this node's blocks (low-water mark, orphan release) and count claims
    /// and releases in `metrics`.
    pub fn with_block_settings(mut self, settings: BlockSettings, metrics: Arc<Metrics>) -> Self {
        self.settings = settings;
        self.metrics = Some(metrics);
        self
    }

    /// Claim a block if we hold none or ours run low, publish ours for the IPAM
    /// plugin, and return our blocks and every claim in the pool.
    async fn blocks(&self) -> Result<(Vec<Ipv4Net>, BTreeMap<Ipv4Net, String>), DatastoreError> {
        let _publishing = self.settings.publish_lock.lock().await;
        let own = ensure_capacity(
            &self.blocks,
            &self.pool,
            &self.node,
            &self.settings,
            self.metrics.as_deref(),
        )
        .await?;
        publish(&self.node_blocks_file, &self.node, &own)?;
        let all = self
            .blocks
            .list()
            .await?
            .into_iter()
            .filter(|c| self.pool.has_block(c.cidr))
            .map(|c| (c.cidr, c.node))
            .collect();
        Ok((own, all))
    }
}

/// What `/readyz` says while the ClusterNetworkPolicy CRD is missing.
pub const CRD_NOT_INSTALLED: &str = "CRD clusternetworkpolicies.policy.networking.k8s.io is not installed (404): no ClusterNetworkPolicies apply; looking again periodically";

/// Start a reflector for `K`; every event pokes `changed`, and failures and
/// recoveries go to `health`.
fn reflect<K>(api: Api<K>, changed: Arc<Notify>, health: Arc<DatastoreHealth>) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    spawn_reflector(api, changed, health, None)
}

/// A kind whose CRD may be missing, watched anyway.
struct OptionalKind<K: Resource + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store: Store<K>,
    /// The last list answered 404: the kind does not exist, so none of its objects
    /// apply (whatever the store still holds from before the CRD was deleted).
    missing: Arc<AtomicBool>,
    /// Poked when a list answers 404, so start-up need not wait for a first list
    /// that cannot succeed.
    found_missing: Arc<Notify>,
}

impl<K> OptionalKind<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    /// The objects, none while the CRD is missing.
    fn state(&self) -> Vec<Arc<K>> {
        if self.missing.load(Ordering::SeqCst) {
            Vec::new()
        } else {
            self.store.state()
        }
    }
}

/// Like [`reflect`], for a kind whose CRD may not be installed: a 404 is recorded as
/// a note in `health` (logged once), not a failure, and the watcher's backoff keeps
/// listing, which is the periodic rediscovery.
fn optional_reflect<K>(
    api: Api<K>,
    changed: Arc<Notify>,
    health: Arc<DatastoreHealth>,
) -> OptionalKind<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    let missing = Arc::new(AtomicBool::new(false));
    let found_missing = Arc::new(Notify::new());
    let store = spawn_reflector(
        api,
        changed,
        health,
        Some((missing.clone(), found_missing.clone())),
    );
    OptionalKind {
        store,
        missing,
        found_missing,
    }
}

/// Whether a watch error is the API server saying the resource does not exist.
fn not_found(e: &watcher::Error) -> bool {
    let api = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s,
        watcher::Error::WatchError(s) => s,
        _ => return false,
    };
    api.code == 404
}

fn spawn_reflector<K>(
    api: Api<K>,
    changed: Arc<Notify>,
    health: Arc<DatastoreHealth>,
    optional: Option<(Arc<AtomicBool>, Arc<Notify>)>,
) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    let kind = kind_name::<K>();
    let (reader, writer) = reflector::store();
    let stream = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .map_ok(|ev| ev.modify(|o| o.managed_fields_mut().clear()));
    let stream = reflector::reflector(writer, stream);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let one = kube::api::ListParams::default().limit(1);
        let mut probe = tokio::time::interval(PROBE_EVERY);
        loop {
            tokio::select! {
                ev = stream.next() => match ev {
                    None => break,
                    Some(Ok(_)) => {
                        health.ok(kind);
                        if let Some((missing, _)) = &optional
                            && missing.swap(false, Ordering::SeqCst)
                        {
                            tracing::info!(kind, "the CRD is installed now; watching it");
                            health.note(kind, None);
                        }
                        changed.notify_one()
                    }
                    Some(Err(e)) if optional.is_some() && not_found(&e) => {
                        let (missing, found_missing) = optional.as_ref().expect("checked");
                        if !missing.swap(true, Ordering::SeqCst) {
                            tracing::warn!(kind, "{CRD_NOT_INSTALLED}");
                            health.note(kind, Some(CRD_NOT_INSTALLED.to_string()));
                            changed.notify_one();
                        }
                        // A missing CRD is a fact about the cluster, not an outage.
                        health.ok(kind);
                        found_missing.notify_one();
                    }
                    // The backoff retries; the store keeps its last content meanwhile,
                    // so an API outage freezes the snapshot rather than emptying it.
                    Some(Err(e)) => {
                        tracing::warn!(kind, error = %e, "watch error");
                        health.failed(kind, format!("Kubernetes API server: {e}"));
                    }
                },
                _ = probe.tick() => {
                    if health.is_failing(kind) && api.list(&one).await.is_ok() {
                        tracing::info!(kind, "Kubernetes API server answers again");
                        health.ok(kind);
                    }
                }
            }
        }
    });
    reader
}

/// `K`'s kind as a static name (the six kinds watched here).
fn kind_name<K: Resource>() -> &'static str
where
    K::DynamicType: Default,
{
    match K::kind(&Default::default()).as_ref() {
        "Node" => "Node",
        "Pod" => "Pod",
        "Namespace" => "Namespace",
        "NetworkPolicy" => "NetworkPolicy",
        "ClusterNetworkPolicy" => "ClusterNetworkPolicy",
        "IPAMBlock" => "IPAMBlock",
        _ => "object",
    }
}

/// How objects from the API are named in messages (a rejected policy, a skipped pod).
const ORIGIN: &str = "Kubernetes API";

fn to_json<K: Serialize + Resource<DynamicType = ()>>(objs: &[Arc<K>]) -> Vec<RawObject> {
    objs.iter()
        .filter_map(|o| {
            let mut v = serde_json::to_value(o.as_ref()).ok()?;
            // Typed objects serialize without apiVersion/kind; the converter keys on kind.
            v["kind"] = K::kind(&()).into();
            v["apiVersion"] = K::api_version(&()).into();
            Some(RawObject::new(ORIGIN, v))
        })
        .collect()
}

/// An API object's identity: kind, namespace (empty when cluster-scoped), name.
type ObjectKey = (&'static str, String, String);

/// The API's objects converted one at a time ([`Sources`], one source per object),
/// each again only when its `resourceVersion` changes: the cluster they make is
/// the one [`super::objects::convert`] makes of all of them (an object touches only
/// its own key).
#[derive(Default)]
struct Converted {
    sources: Sources<ObjectKey>,
    /// Each object's `resourceVersion` when it was converted (`None`: always again).
    versions: BTreeMap<ObjectKey, Option<String>>,
    annotations: BTreeMap<ObjectKey, BTreeMap<NamespacedName, AddressAnnotations>>,
}

impl Converted {
    /// Converts the objects of one kind that are new or changed; adds every object's
    /// key to `seen`.
    fn update<K>(&mut self, objs: &[Arc<K>], seen: &mut std::collections::BTreeSet<ObjectKey>)
    where
        K: Serialize + Resource<DynamicType = ()>,
    {
        let kind = kind_name::<K>();
        for o in objs {
            let key: ObjectKey = (kind, o.namespace().unwrap_or_default(), o.name_any());
            let version = o.meta().resource_version.clone();
            seen.insert(key.clone());
            if version.is_some() && self.versions.get(&key) == Some(&version) {
                continue;
            }
            let conv = convert_source(&to_json(std::slice::from_ref(o)));
            for s in &conv.skipped {
                tracing::warn!(object = %s, "API object skipped");
            }
            for a in &conv.ignored_annotations {
                tracing::warn!("{a}");
            }
            for r in &conv.rejected {
                tracing::error!(object = %r, "policy rejected; the pods it selects are held fail-closed");
            }
            self.sources.set(key.clone(), conv.parsed);
            self.annotations.insert(key.clone(), conv.annotations);
            self.versions.insert(key, version);
        }
    }

    /// Forgets the objects not `seen` (deleted).
    fn retain(&mut self, seen: &std::collections::BTreeSet<ObjectKey>) {
        let gone: Vec<ObjectKey> = self
            .versions
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.sources.remove(&k);
            self.annotations.remove(&k);
            self.versions.remove(&k);
        }
    }

    fn cluster(&self) -> &sluice_policy::Cluster {
        self.sources.cluster()
    }

    fn annotations(&self) -> BTreeMap<NamespacedName, AddressAnnotations> {
        self.annotations
            .values()
            .flat_map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())))
            .collect()
    }
}

/// The ClusterNetworkPolicies as the status writer sees them.
type PolicyList = Vec<Arc<ClusterNetworkPolicy>>;

/// Each policy's `(name, resourceVersion)`: what tells the status writer to look again.
fn versions(list: &PolicyList) -> Vec<(String, Option<String>)> {
    list.iter()
        .map(|p| (p.name_any(), p.resource_version()))
        .collect()
}

/// Writes each ClusterNetworkPolicy's `Accepted` condition
/// ([`desired_condition`]) by server-side apply of its `status` under
/// [`FIELD_MANAGER`], only when the object's status does not already say it
/// ([`condition_update`]). It runs in a task of its own: a slow, refused (403) or
/// missing (404) write is logged and never delays or stops a snapshot.
fn spawn_status_writer(
    api: Api<ClusterNetworkPolicy>,
    mut policies: tokio::sync::watch::Receiver<PolicyList>,
) {
    tokio::spawn(async move {
        // name → (resourceVersion handled, when to retry after a failed write).
        let mut handled: BTreeMap<String, (Option<String>, Option<tokio::time::Instant>)> =
            BTreeMap::new();
        loop {
            let list = policies.borrow_and_update().clone();
            handled.retain(|name, _| list.iter().any(|p| p.name_any() == *name));
            let mut next_retry: Option<tokio::time::Instant> = None;
            for p in &list {
                let (name, rv) = (p.name_any(), p.resource_version());
                let now = tokio::time::Instant::now();
                if let Some((seen, retry)) = handled.get(&name)
                    && *seen == rv
                {
                    match retry {
                        None => continue,
                        Some(at) if *at > now => {
                            next_retry = Some(next_retry.map_or(*at, |n| n.min(*at)));
                            continue;
                        }
                        Some(_) => {}
                    }
                }
                let retry = (!write_status(&api, p).await).then(|| now + STATUS_RETRY);
                if let Some(at) = retry {
                    next_retry = Some(next_retry.map_or(at, |n| n.min(at)));
                }
                handled.insert(name, (rv, retry));
            }
            let retry_sleep = async {
                match next_retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = policies.changed() => if changed.is_err() { return },
                _ = retry_sleep => {}
            }
        }
    });
}

/// Write one policy's condition if its status does not already hold it; false when
/// the write failed (logged).
async fn write_status(api: &Api<ClusterNetworkPolicy>, policy: &ClusterNetworkPolicy) -> bool {
    let name = policy.name_any();
    let Ok(object) = serde_json::to_value(policy) else {
        return true;
    };
    let desired = desired_condition(&object);
    let now = k8s_openapi::jiff::fmt::strtime::format(
        "%Y-%m-%dT%H:%M:%SZ",
        k8s_openapi::jiff::Timestamp::now(),
    )
    .unwrap_or_default();
    let Some(condition) = condition_update(policy.status.as_ref(), &desired, &now) else {
        return true;
    };
    let patch = serde_json::json!({
        "apiVersion": ClusterNetworkPolicy::api_version(&()),
        "kind": ClusterNetworkPolicy::kind(&()),
        "metadata": {"name": name},
        "status": {"conditions": [condition]},
    });
    // Forced: the condition is the agents' to say, whoever else last edited it.
    let params = kube::api::PatchParams::apply(FIELD_MANAGER).force();
    match api
        .patch_status(&name, &params, &kube::api::Patch::Apply(&patch))
        .await
    {
        Ok(_) => {
            tracing::info!(policy = %name, reason = desired.reason, "ClusterNetworkPolicy status written");
            true
        }
        Err(e) => {
            tracing::warn!(
                policy = %name,
                error = %e,
                "writing the ClusterNetworkPolicy's status failed; the policy is enforced all the same"
            );
            false
        }
    }
}

impl<S: BlockStore + Send + Sync + 'static> Datastore for KubeDatastore<S> {
    async fn run(self, out: SnapshotSender) -> Result<(), DatastoreError> {
        let changed = Arc::new(Notify::new());
        let h = || self.health.clone();
        let nodes = reflect(Api::<Node>::all(self.client.clone()), changed.clone(), h());
        let pods = reflect(Api::<Pod>::all(self.client.clone()), changed.clone(), h());
        let namespaces = reflect(
            Api::<Namespace>::all(self.client.clone()),
            changed.clone(),
            h(),
        );
        let policies = reflect(
            Api::<NetworkPolicy>::all(self.client.clone()),
            changed.clone(),
            h(),
        );
        let cluster_policies = optional_reflect(
            Api::<ClusterNetworkPolicy>::all(self.client.clone()),
            changed.clone(),
            h(),
        );
        // Block claims are read through the ipam store (one reading of the CRD);
        // the reflector only says when to read them again.
        let blocks_changed = Arc::new(Notify::new());
        let ipam_blocks = reflect(
            Api::<sluice_ipam::store::kube::IPAMBlock>::all(self.client.clone()),
            blocks_changed.clone(),
            h(),
        );
        for (kind, ready) in [
            ("Node", nodes.wait_until_ready().await),
            ("Pod", pods.wait_until_ready().await),
            ("Namespace", namespaces.wait_until_ready().await),
            ("NetworkPolicy", policies.wait_until_ready().await),
            ("IPAMBlock", ipam_blocks.wait_until_ready().await),
        ] {
            ready.map_err(|e| DatastoreError::Watch {
                kind,
                reason: e.to_string(),
            })?;
        }
        // The first snapshot must hold the ClusterNetworkPolicies if there are any:
        // one without them would drop the Admin tier's denies until the next. So wait
        // for their first list, unless the API says the kind does not exist.
        tokio::select! {
            ready = cluster_policies.store.wait_until_ready() => {
                ready.map_err(|e| DatastoreError::Watch {
                    kind: "ClusterNetworkPolicy",
                    reason: e.to_string(),
                })?;
            }
            _ = cluster_policies.found_missing.notified() => {}
        }
        tracing::info!("initial list of every kind complete");
        let (status_tx, status_rx) = tokio::sync::watch::channel(PolicyList::new());
        spawn_status_writer(Api::all(self.client.clone()), status_rx);

        let mut last: Option<Arc<Snapshot>> = None;
        let mut converted = Converted::default();
        let mut blocks = BTreeMap::new();
        let mut own: Vec<Ipv4Net> = Vec::new();
        let mut orphans = OrphanTracker::default();
        let mut next_block_poll = tokio::time::Instant::now();
        let mut next_capacity_check = tokio::time::Instant::now() + CAPACITY_POLL;
        // A node's absence is sampled a few times per grace period, so it is
        // released within about a quarter grace after the grace ends.
        let orphan_poll = self
            .settings
            .orphan_grace
            .map(|g| (g / 4).clamp(Duration::from_secs(1), BLOCK_POLL));
        let mut next_orphan_check = tokio::time::Instant::now();
        loop {
            status_tx.send_if_modified(|sent| {
                let policies = cluster_policies.state();
                let changed = versions(sent) != versions(&policies);
                if changed {
                    *sent = policies;
                }
                changed
            });
            let now = tokio::time::Instant::now();
            // The reflectors synced before this loop started (wait_until_ready), so
            // the Node list is a full one, not a partial first page.
            if let (Some(grace), Some(every)) = (self.settings.orphan_grace, orphan_poll)
                && now >= next_orphan_check
            {
                let live = nodes.state().iter().map(|n| n.name_any()).collect();
                match release_orphans(
                    &self.blocks,
                    &mut orphans,
                    std::time::Instant::now(),
                    &self.node,
                    &live,
                    grace,
                    self.metrics.as_deref(),
                )
                .await
                {
                    // Drop their routes now rather than at the next block poll.
                    Ok(released) if !released.is_empty() => next_block_poll = now,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "releasing orphan blocks failed; retrying later")
                    }
                }
                next_orphan_check = now + every;
            }
            if now >= next_capacity_check {
                // Only when we hold blocks: the first claim is the block poll's job.
                if !own.is_empty()
                    && super::block_lifecycle::needs_more(
                        &self.settings.state_dir,
                        &own,
                        self.settings.low_water,
                    )
                {
                    next_block_poll = now;
                }
                next_capacity_check = now + CAPACITY_POLL;
            }
            if now >= next_block_poll {
                match self.blocks().await {
                    Ok((o, b)) => (own, blocks) = (o, b),
                    Err(e) => {
                        tracing::warn!(error = %e, "block store unavailable; keeping last block list")
                    }
                }
                next_block_poll = tokio::time::Instant::now() + BLOCK_POLL;
            }
            // Until our block is known there is nothing sensible to program.
            if blocks.values().any(|n| *n == self.node) {
                let mut seen = std::collections::BTreeSet::new();
                converted.update(&nodes.state(), &mut seen);
                converted.update(&namespaces.state(), &mut seen);
                converted.update(&pods.state(), &mut seen);
                converted.update(&policies.state(), &mut seen);
                converted.update(&cluster_policies.state(), &mut seen);
                converted.retain(&seen);
                let snap = Snapshot {
                    // A cheap copy: pods are shared with the converted cluster.
                    cluster: converted.cluster().clone(),
                    blocks: blocks.clone(),
                    annotations: converted.annotations(),
                    reported: Default::default(),
                };
                if last.as_deref() != Some(&snap) {
                    let snap = Arc::new(snap);
                    last = Some(snap.clone());
                    if out.send(Some(snap)).is_err() {
                        return Ok(());
                    }
                }
            }
            tokio::select! {
                _ = changed.notified() => {
                    // A burst (a deployment scaling up) arrives as many events: wait a
                    // moment so it becomes one snapshot.
                    tokio::time::sleep(self.coalesce).await;
                }
                _ = blocks_changed.notified() => {
                    tokio::time::sleep(self.coalesce).await;
                    next_block_poll = tokio::time::Instant::now();
                }
                _ = tokio::time::sleep_until(
                    next_block_poll
                        .min(next_capacity_check)
                        .min(if orphan_poll.is_some() { next_orphan_check } else { next_block_poll }),
                ) => {}
            }
        }
    }
}

/// Build a client from in-cluster config or KUBECONFIG.
pub async fn client() -> Result<Client, DatastoreError> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| DatastoreError::KubeConfig(e.to_string()))?;
    Ok(Client::try_from(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::objects::convert;
    use crate::datastore::objects::parse_manifest_text;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: prod, labels: {app: web}}\n\
spec: {nodeName: n1, containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}]}]}\n\
status: {podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}]}\n";
    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: prod}\n\
spec: {podSelector: {matchLabels: {app: web}}, ingress: [{ports: [{port: http}]}]}\n";

    #[test]
    fn typed_objects_convert_exactly_like_manifests() {
        let from_yaml = convert(&parse_manifest_text("t", &format!("{POD}---\n{POLICY}")).unwrap());
        // What a reflector hands us: typed objects, which serialize without kind.
        let pod: Pod = serde_yaml_ng::from_str(POD).unwrap();
        let policy: NetworkPolicy = serde_yaml_ng::from_str(POLICY).unwrap();
        let mut objects = to_json(&[Arc::new(pod)]);
        objects.extend(to_json(&[Arc::new(policy)]));
        let from_api = convert(&objects);
        assert_eq!(from_api, from_yaml);
        assert_eq!(from_api.cluster.pods.len(), 1);
        assert_eq!(from_api.cluster.policies.len(), 1);
    }

    #[test]
    fn the_log_allowed_annotation_survives_the_typed_objects_of_all_three_kinds() {
        let ann = "annotations: {sluice.dev/log-allowed: ingress}";
        let ns = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: prod, {ann}}}\n");
        let policy = POLICY.replace("namespace: prod}", &format!("namespace: prod, {ann}}}"));
        let cnp = format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n\
             metadata: {{name: c, {ann}}}\nspec: {{tier: Admin, priority: 1, subject: {{namespaces: {{}}}}, \
             ingress: [{{action: Accept, from: [{{namespaces: {{}}}}]}}]}}\n"
        );
        let namespace: Namespace = serde_yaml_ng::from_str(&ns).unwrap();
        let policy: NetworkPolicy = serde_yaml_ng::from_str(&policy).unwrap();
        let cnp: ClusterNetworkPolicy = serde_yaml_ng::from_str(&cnp).unwrap();
        let mut objects = to_json(&[Arc::new(namespace)]);
        objects.extend(to_json(&[Arc::new(policy)]));
        objects.extend(to_json(&[Arc::new(cnp)]));
        let c = convert(&objects).cluster;
        let ingress = sluice_policy::LogAllowed::parse("ingress").unwrap();
        assert_eq!(c.namespaces["prod"].log_allowed, ingress);
        assert_eq!(c.policies.values().next().unwrap().log_allowed, ingress);
        assert_eq!(c.cluster_policies["c"].log_allowed, ingress);
    }

    #[test]
    fn objects_are_converted_again_only_when_their_version_changes() {
        let versioned = |yaml: &str, v: &str| {
            let mut o: serde_json::Value = serde_yaml_ng::from_str(yaml).unwrap();
            o["metadata"]["resourceVersion"] = v.into();
            o
        };
        let pod = |v: &str, app: &str| -> Pod {
            let mut p: Pod = serde_json::from_value(versioned(POD, v)).unwrap();
            p.labels_mut().insert("app".into(), app.into());
            p
        };
        let policy: NetworkPolicy = serde_json::from_value(versioned(POLICY, "1")).unwrap();
        let key = NamespacedName::new("prod", "web");
        let mut c = Converted::default();
        let sync = |c: &mut Converted, pods: &[Pod]| {
            let mut seen = std::collections::BTreeSet::new();
            let pods: Vec<Arc<Pod>> = pods.iter().cloned().map(Arc::new).collect();
            c.update(&pods, &mut seen);
            c.update(&[Arc::new(policy.clone())], &mut seen);
            c.retain(&seen);
        };

        sync(&mut c, &[pod("1", "web")]);
        let mut all = to_json(&[Arc::new(pod("1", "web"))]);
        all.extend(to_json(&[Arc::new(policy.clone())]));
        assert_eq!(c.cluster(), &convert(&all).cluster);
        // The same version is the same object: not read again (the API server gives
        // every change a new version, so a differing body here proves the cache).
        sync(&mut c, &[pod("1", "api")]);
        assert_eq!(c.cluster().pods[&key].labels["app"], "web");
        sync(&mut c, &[pod("2", "api")]);
        assert_eq!(c.cluster().pods[&key].labels["app"], "api");
        sync(&mut c, &[]);
        assert!(c.cluster().pods.is_empty());
        assert_eq!(c.cluster().policies.len(), 1);
    }
}
