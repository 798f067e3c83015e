//! The Kubernetes datastore: one reflector per kind (Nodes, Pods, Namespaces,
//! NetworkPolicies) with managed fields stripped before they are stored, a change
//! signal that coalesces bursts into one snapshot, and the node's block claimed
//! through the ipam crate's Kubernetes store and published to the node-blocks file
//! the IPAM plugin reads.
//!
//! Every object is serialized to JSON and converted by [`super::objects`], the same
//! path the directory datastore takes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
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
use sluice_policy::RawObject;
use tokio::sync::Notify;

use super::block_lifecycle::{
    BlockSettings, OrphanTracker, ensure_capacity, publish, release_orphans,
};
use crate::metrics::Metrics;

use super::objects::convert;
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

/// Start a reflector for `K`; every event pokes `changed`, and failures and
/// recoveries go to `health`.
fn reflect<K>(api: Api<K>, changed: Arc<Notify>, health: Arc<DatastoreHealth>) -> Store<K>
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
                        changed.notify_one()
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

/// `K`'s kind as a static name (the five kinds watched here).
fn kind_name<K: Resource>() -> &'static str
where
    K::DynamicType: Default,
{
    match K::kind(&Default::default()).as_ref() {
        "Node" => "Node",
        "Pod" => "Pod",
        "Namespace" => "Namespace",
        "NetworkPolicy" => "NetworkPolicy",
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
        tracing::info!("initial list of every kind complete");

        let mut last: Option<Arc<Snapshot>> = None;
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
                let mut objects = to_json(&nodes.state());
                objects.extend(to_json(&namespaces.state()));
                objects.extend(to_json(&pods.state()));
                objects.extend(to_json(&policies.state()));
                let conv = convert(&objects);
                let snap = Snapshot {
                    cluster: conv.cluster,
                    blocks: blocks.clone(),
                    annotations: conv.annotations.clone(),
                    reported: Default::default(),
                };
                if last.as_deref() != Some(&snap) {
                    for s in &conv.skipped {
                        tracing::warn!(object = %s, "API object skipped");
                    }
                    for r in &conv.rejected {
                        tracing::error!(object = %r, "NetworkPolicy rejected; the pods it selects are held fail-closed");
                    }
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
}
