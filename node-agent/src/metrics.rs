//! Prometheus metrics of the agent, registered once and shared.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `compile="full"` or `compile="incremental"`.
pub type CompileLabels = Vec<(&'static str, &'static str)>;

pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    /// Objects → desired state, by kind of compile.
    pub compile_duration: Family<CompileLabels, Histogram, fn() -> Histogram>,
    pub add_to_enforced: Histogram,
    pub syncs: Counter,
    pub restore_failures: Counter,
    pub rules_programmed: Gauge,
    pub set_members_programmed: Gauge,
    pub pods_waiting_for_policy: Gauge,
    pub pods_without_report: Counter,
    pub routes_programmed: Gauge,
    pub rejected_policies: Gauge,
    pub blocks_claimed: Counter,
    pub block_claim_failures: Counter,
    pub blocks_released: Counter,
    pub local_reports: Counter,
    pub local_reports_pending: Gauge,
    /// Refreshed at each scrape from `DatastoreHealth` (see `health::metrics_text`).
    pub datastore_out_of_sync: Gauge<f64, AtomicU64>,
    pub datastore_watches_failing: Gauge,
    /// `sluice_policy_denied_connections_total{namespace,policy,direction}`: one
    /// increment per denied-connection record (docs/flows.md, "Counters").
    pub denied_connections: Family<Vec<(String, String)>, Counter>,
    /// `sluice_policy_allowed_connections_total{namespace,policy,direction}`: the
    /// same for allow records, made only where an opt-in asks for them.
    pub allowed_connections: Family<Vec<(String, String)>, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        // The agent's own metrics are `sluice_agent_*`; the policy counter's name is
        // the issue's, `sluice_policy_denied_connections_total`, so it sits at the root.
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("sluice_agent");
        // 1 ms … ~33 s: a no-op resync is milliseconds, a 10k-pod rewrite seconds.
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let add_to_enforced = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        // 0.1 ms … ~3 s: an incremental compile is a few ms, a full one at 10k pods
        // a few hundred.
        let compile_duration: Family<CompileLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 16)));
        let m = Metrics {
            sync_duration,
            compile_duration,
            add_to_enforced,
            syncs: Counter::default(),
            restore_failures: Counter::default(),
            rules_programmed: Gauge::default(),
            set_members_programmed: Gauge::default(),
            pods_waiting_for_policy: Gauge::default(),
            pods_without_report: Counter::default(),
            routes_programmed: Gauge::default(),
            rejected_policies: Gauge::default(),
            blocks_claimed: Counter::default(),
            block_claim_failures: Counter::default(),
            blocks_released: Counter::default(),
            local_reports: Counter::default(),
            local_reports_pending: Gauge::default(),
            datastore_out_of_sync: Gauge::default(),
            datastore_watches_failing: Gauge::default(),
            denied_connections: Family::default(),
            allowed_connections: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sync_duration_seconds",
            "Time to compute and apply one dataplane sync",
            m.sync_duration.clone(),
        );
        registry.register(
            "compile_duration_seconds",
            "Time to compute one sync's desired state from the cluster objects, by compile: full (from nothing: the first sync, every periodic full resync, after an error) or incremental (reusing the sets the previous compile left)",
            m.compile_duration.clone(),
        );
        registry.register(
            "add_to_enforced_seconds",
            "From a local pod's first appearance with an IP (the CNI plugin's report over the node-local API, or the datastore) to its policy chains applied",
            m.add_to_enforced.clone(),
        );
        registry.register("syncs", "Dataplane syncs attempted", m.syncs.clone());
        registry.register(
            "restore_failures",
            "Failed iptables-restore/ipset restore runs (retried with backoff)",
            m.restore_failures.clone(),
        );
        registry.register(
            "rules_programmed",
            "iptables rules in chains sluice owns, as last applied",
            m.rules_programmed.clone(),
        );
        registry.register(
            "set_members_programmed",
            "Members of ipsets sluice owns, as last applied",
            m.set_members_programmed.clone(),
        );
        registry.register(
            "pods_waiting_for_policy",
            "Local pods with an address whose policy is not applied yet (held fail-closed)",
            m.pods_waiting_for_policy.clone(),
        );
        registry.register(
            "pods_without_report",
            "New local pods first seen with an address in the datastore, without a report from the CNI plugin (the plugin gave up on it or could not reach the agent): each waited fail-closed for the datastore. Pods already there when the agent started are not counted",
            m.pods_without_report.clone(),
        );
        registry.register(
            "routes_programmed",
            "Routes to pod blocks programmed by sluice",
            m.routes_programmed.clone(),
        );
        registry.register(
            "rejected_policies",
            "NetworkPolicies the engine cannot express (their pods are held fail-closed)",
            m.rejected_policies.clone(),
        );
        registry.register(
            "blocks_claimed",
            "IPAM blocks this node claimed (its first, and more when its blocks ran low)",
            m.blocks_claimed.clone(),
        );
        registry.register(
            "block_claim_failures",
            "Failed claims of an additional IPAM block (pool exhausted or store error)",
            m.block_claim_failures.clone(),
        );
        registry.register(
            "blocks_released",
            "IPAM blocks of nodes gone longer than the grace period that this agent released",
            m.blocks_released.clone(),
        );
        registry.register(
            "local_reports",
            "Attachments the CNI plugin reported over the node-local API",
            m.local_reports.clone(),
        );
        registry.register(
            "local_reports_pending",
            "Reported attachments the datastore has not confirmed yet",
            m.local_reports_pending.clone(),
        );
        registry.register(
            "datastore_out_of_sync_seconds",
            "How long the datastore's longest-failing watch has failed, once past the 5 s grace (0 while in sync); the last state stays programmed meanwhile",
            m.datastore_out_of_sync.clone(),
        );
        registry.register(
            "datastore_watches_failing",
            "Datastore watches failing now, at any age (a dropped watch that reconnects at once shows briefly)",
            m.datastore_watches_failing.clone(),
        );
        root.register(
            "sluice_policy_denied_connections",
            "Denied new connections recorded from the kernel's log rules, by the protected pod's namespace, the deciding policies (- for isolation by none) and direction",
            m.denied_connections.clone(),
        );
        root.register(
            "sluice_policy_allowed_connections",
            "Allowed new connections recorded where sluice.dev/log-allowed asks for them, by the protected pod's namespace, the allowing policies (- for a pod no policy isolates) and direction",
            m.allowed_connections.clone(),
        );
        Metrics {
            registry: root,
            ..m
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_denied_counter_has_the_issues_name_and_labels() {
        let m = Metrics::new();
        m.denied_connections
            .get_or_create(&vec![
                ("namespace".into(), "prod".into()),
                ("policy".into(), "-".into()),
                ("direction".into(), "ingress".into()),
            ])
            .inc();
        let text = m.encode();
        assert!(
            text.contains(
                "sluice_policy_denied_connections_total{namespace=\"prod\",policy=\"-\",direction=\"ingress\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("sluice_agent_syncs_total"), "{text}");
    }
}
