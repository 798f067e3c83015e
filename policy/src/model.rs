//! The crate's own domain types: a snapshot of the objects NetworkPolicy is about.
//!
//! These types are deliberately smaller than the Kubernetes API objects and carry the
//! distinctions that change a verdict in the type itself, so a consumer (the evaluator,
//! the compiler) cannot forget them:
//!
//! - a rule's peer list is [`Peers::Any`] (the manifest's `from`/`to` was missing or
//!   `[]`) or a non-empty [`Peers::Listed`];
//! - a rule's port list is [`Ports::Any`] (`ports` missing or `[]`) or a non-empty
//!   [`Ports::Listed`];
//! - a policy's rule list being empty (`ingress` missing or `ingress: []`) means "no
//!   traffic allowed by this policy" when the policy has that type, while one rule
//!   with `Peers::Any` and `Ports::Any` (`ingress: [{}]`) means "everything allowed";
//! - [`PolicyTypes`] holds the *effective* types, defaulting already applied;
//! - a pod peer's namespace scope is either the policy's own namespace or a selector
//!   ([`NamespaceScope`]), never an `Option` whose `None` could be misread.
//!
//! Everything is ordered (`BTreeMap`, derived `Ord`) so that iterating a [`Cluster`]
//! is deterministic and rendered output can be byte-for-byte stable.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::selector::LabelSelector;

/// Labels of a namespace or pod: key → value, ordered.
pub type Labels = BTreeMap<String, String>;

/// The label every namespace carries automatically since Kubernetes 1.21, whose value
/// is the namespace's name; [`Cluster::namespace_labels`] adds it so that selectors
/// written against it work even when a manifest omits it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// An L4 protocol a policy port or a container port names. Kubernetes defaults a
/// missing protocol to TCP; so does [`Protocol::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
    /// A packet's protocol only, never a port's: neither NetworkPolicy nor
    /// ClusterNetworkPolicy can name it (so [`FromStr`](std::str::FromStr) and
    /// [`Protocol::ALL`] leave it out), yet an ICMP packet is policed all the same, by
    /// the rules without ports. Probes and the classifier use it to check that.
    Icmp,
}

impl Protocol {
    /// All protocols NetworkPolicy can name, in a fixed order.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The Kubernetes spelling: `TCP`, `UDP`, `SCTP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Icmp => "ICMP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A protocol name that is not TCP, UDP or SCTP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {0:?} (expected TCP, UDP or SCTP)")]
pub struct UnknownProtocol(pub String);

impl std::str::FromStr for Protocol {
    type Err = UnknownProtocol;

    /// Accepts the Kubernetes spelling, case-insensitively (CLI users type `tcp`), of
    /// the protocols a port can name: not ICMP.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(UnknownProtocol(s.to_string())),
        }
    }
}

/// `namespace/name`: identity of a pod or a policy. Orders by namespace, then name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl NamespacedName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl NamespacedName {
    /// The key of a cluster-scoped object (a ClusterNetworkPolicy) among namespaced
    /// ones: an empty namespace, which no namespaced object can have.
    pub fn cluster_scoped(name: impl Into<String>) -> Self {
        Self::new("", name)
    }

    pub fn is_cluster_scoped(&self) -> bool {
        self.namespace.is_empty()
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_cluster_scoped() {
            return f.write_str(&self.name);
        }
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A namespace and its labels as written in the manifest (without the automatic
/// [`NAMESPACE_NAME_LABEL`]; ask [`Cluster::namespace_labels`] for the effective set).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    /// `sluice.dev/log-allowed`: record every allowed new connection to or from its
    /// pods, in these directions.
    pub log_allowed: LogAllowed,
}

/// The opt-in to allow records, read from the [`LogAllowed::ANNOTATION`] annotation
/// of a Namespace, NetworkPolicy or ClusterNetworkPolicy (docs/flows.md): which
/// directions' allowed new connections are recorded. Off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogAllowed {
    pub ingress: bool,
    pub egress: bool,
}

/// An annotation value [`LogAllowed::parse`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "annotation {annotation}: {0:?} is not one of \"true\", \"ingress\", \"egress\", \"false\"; allowed connections are not logged for it",
    annotation = LogAllowed::ANNOTATION
)]
pub struct BadLogAllowed(pub String);

impl LogAllowed {
    /// The annotation's name, exactly.
    pub const ANNOTATION: &'static str = "sluice.dev/log-allowed";
    pub const OFF: LogAllowed = LogAllowed {
        ingress: false,
        egress: false,
    };

    /// `true` (both directions), `ingress`, `egress`, or `false` (off); nothing else,
    /// so a typo is reported rather than read as one of them.
    pub fn parse(value: &str) -> Result<LogAllowed, BadLogAllowed> {
        let (ingress, egress) = match value {
            "true" => (true, true),
            "ingress" => (true, false),
            "egress" => (false, true),
            "false" => (false, false),
            _ => return Err(BadLogAllowed(value.to_string())),
        };
        Ok(LogAllowed { ingress, egress })
    }

    pub fn any(self) -> bool {
        self.ingress || self.egress
    }

    /// Whether it covers the ingress (`true`) or the egress direction.
    pub fn covers(self, ingress: bool) -> bool {
        if ingress { self.ingress } else { self.egress }
    }
}

/// A port one of the pod's containers declares (`spec.containers[].ports[]`). Only
/// these give meaning to a named port in a policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerPort {
    /// `name`, when the container port has one (named ports resolve against it).
    pub name: Option<String>,
    /// `containerPort`.
    pub port: u16,
    /// `protocol`, TCP when the manifest omits it.
    pub protocol: Protocol,
}

/// A pod: what NetworkPolicy can see of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// `status.podIPs` (or `status.podIP`); empty while the pod has no address yet.
    /// For a hostNetwork pod these are its node's addresses.
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName`; `None` while unscheduled.
    pub node: Option<String>,
    /// Every container's declared ports, in manifest order.
    pub ports: Vec<ContainerPort>,
    /// `spec.hostNetwork`. Such a pod shares its node's network namespace: no
    /// podSelector selects it (neither as a policy target nor as a peer); its traffic
    /// is the node's traffic.
    pub host_network: bool,
}

impl Pod {
    pub fn key(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.name)
    }

    /// The port numbers a named port means on this pod for `protocol`: every declared
    /// container port with that name *and* protocol. Usually zero or one; empty means
    /// the name matches nothing on this pod.
    pub fn resolve_named_port(&self, name: &str, protocol: Protocol) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .ports
            .iter()
            .filter(|p| p.protocol == protocol && p.name.as_deref() == Some(name))
            .map(|p| p.port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// A node and its addresses (`status.addresses[]` of type InternalIP/ExternalIP).
/// Traffic from any of these addresses to a pod on this node is from "the node".
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

/// Which directions a policy isolates, *after* upstream defaulting: when the manifest
/// has no `spec.policyTypes`, ingress is always isolated and egress only when the
/// policy has at least one egress rule. Build it with [`PolicyTypes::defaulted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyTypes {
    pub ingress: bool,
    pub egress: bool,
}

/// One entry of `spec.policyTypes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyType {
    Ingress,
    Egress,
}

impl PolicyTypes {
    /// Applies the upstream default: `declared` is `spec.policyTypes` (`None` when the
    /// field is absent or empty), `has_egress_rules` whether `spec.egress` has at least
    /// one rule.
    pub fn defaulted(declared: Option<&[PolicyType]>, has_egress_rules: bool) -> Self {
        match declared {
            Some(types) if !types.is_empty() => PolicyTypes {
                ingress: types.contains(&PolicyType::Ingress),
                egress: types.contains(&PolicyType::Egress),
            },
            _ => PolicyTypes {
                ingress: true,
                egress: has_egress_rules,
            },
        }
    }
}

/// Which namespaces a pod peer draws its pods from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamespaceScope {
    /// No `namespaceSelector` in the peer: only the policy's own namespace.
    PolicyNamespace,
    /// `namespaceSelector` present: every namespace whose (effective) labels match.
    /// An empty selector (`namespaceSelector: {}`) means every namespace.
    Matching(LabelSelector),
}

/// A peer that names pods: `podSelector` and/or `namespaceSelector` in ONE peer entry,
/// which upstream ANDs (pods matching `pods` inside namespaces in `namespaces`).
/// Two separate peer entries are ORed; they are two `Peer`s.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodPeer {
    pub namespaces: NamespaceScope,
    /// `podSelector`; a missing one (peer with only `namespaceSelector`) is stored as
    /// the empty selector, which matches every pod. hostNetwork pods never match.
    pub pods: LabelSelector,
}

/// `ipBlock`: addresses in `cidr` but in none of `except`. Matched against the packet's
/// address whatever it belongs to (a pod, a node or an external host): upstream says
/// ipBlock is meant for cluster-external addresses, but its e2e suite and the common
/// implementations (Calico, kube-router) match pod IPs too, and so do we.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpBlock {
    pub cidr: IpNet,
    /// Each entry lies inside `cidr` (validated at conversion).
    pub except: Vec<IpNet>,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

/// One entry of a rule's `from` (ingress) or `to` (egress) list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Pods(PodPeer),
    IpBlock(IpBlock),
}

/// The peers a rule admits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peers {
    /// `from`/`to` missing or `[]`: any source (ingress) or destination (egress),
    /// pod or not, inside the cluster or out.
    Any,
    /// At least one peer (conversion never builds an empty list; one built by hand
    /// matches nothing); traffic matches when it matches any of them (OR).
    Listed(Vec<Peer>),
}

/// What one policy port entry matches, for its [`PolicyPort::protocol`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    /// No `port`: every port of the protocol.
    All,
    /// `port` as a number, with `endPort` when given: `start..=end`, inclusive.
    /// A single port has `start == end`.
    Numbers { start: u16, end: u16 },
    /// `port` as a name: resolved on the *destination* pod with
    /// [`Pod::resolve_named_port`] (same name and protocol). Matches nothing when the
    /// destination is not a pod or no container of it declares the name.
    Named(String),
}

/// One entry of a rule's `ports` list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyPort {
    pub protocol: Protocol,
    pub port: PortMatch,
}

/// The destination ports a rule admits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ports {
    /// `ports` missing or `[]`: every port of every protocol.
    Any,
    /// At least one entry (conversion never builds an empty list; one built by hand
    /// matches nothing); traffic matches when it matches any of them (OR).
    Listed(Vec<PolicyPort>),
}

/// One ingress or egress rule: traffic is allowed by it when it matches `peers` AND
/// `ports`. For ingress `peers` are sources (`from`), for egress destinations (`to`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    pub peers: Peers,
    pub ports: Ports,
}

impl Rule {
    /// `{}`: a rule that allows everything.
    pub fn allow_all() -> Self {
        Rule {
            peers: Peers::Any,
            ports: Ports::Any,
        }
    }
}

/// A `networking.k8s.io/v1` NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    /// `spec.podSelector`, applied to non-hostNetwork pods of `namespace` only. `{}`
    /// (empty, or the field missing) selects every pod of the namespace.
    pub pod_selector: LabelSelector,
    /// `spec.ingress`; empty when missing or `[]`. Only meaningful when
    /// `policy_types.ingress`; then an empty list allows no ingress.
    pub ingress: Vec<Rule>,
    /// `spec.egress`; as `ingress`, for `policy_types.egress`.
    pub egress: Vec<Rule>,
    /// Effective policy types (defaulting applied).
    pub policy_types: PolicyTypes,
    /// `sluice.dev/log-allowed`: record the connections this policy allows.
    pub log_allowed: LogAllowed,
}

impl NetworkPolicy {
    pub fn key(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.name)
    }

    /// Whether this policy applies to `pod` (selects it as a target). hostNetwork pods
    /// and pods of other namespaces are never selected.
    pub fn selects(&self, pod: &Pod) -> bool {
        !pod.host_network
            && pod.namespace == self.namespace
            && self.pod_selector.matches(&pod.labels)
    }
}

/// A consistent snapshot of everything policy depends on, keyed for deterministic
/// iteration. Pods of namespaces missing from `namespaces` still work: their namespace
/// is taken to have only the automatic [`NAMESPACE_NAME_LABEL`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Behind `Arc`, so that copying a cluster of 10,000 pods (each snapshot a
    /// datastore publishes) copies pointers, not pods, and comparing two copies
    /// skips the pods they share (`Arc` equality of `Eq` values checks the pointer
    /// first). Change one through [`Cluster::pod_mut`].
    pub pods: BTreeMap<NamespacedName, Arc<Pod>>,
    pub nodes: BTreeMap<String, Node>,
    /// Behind `Arc` for the same reason as `pods`: 1,000 policies copied into every
    /// snapshot cost more than the incremental compile of a new pod. Change one
    /// through [`Cluster::policy_mut`].
    pub policies: BTreeMap<NamespacedName, Arc<NetworkPolicy>>,
    /// Policies that could not be expressed, with the reason. The pods they select
    /// are held fail-closed (denied both ways) until the policy is fixed: guessing
    /// what a broken policy meant could open a pod its author meant to close.
    pub rejected_policies: BTreeMap<NamespacedName, RejectedPolicy>,
    /// `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicies by name. One that
    /// could not be read is in `rejected_policies` instead, keyed by
    /// [`NamespacedName::cluster_scoped`].
    pub cluster_policies: BTreeMap<String, ClusterNetworkPolicy>,
    /// Node labels (`metadata.labels`), for ClusterNetworkPolicy `nodes` peers.
    pub node_labels: BTreeMap<String, Labels>,
}

/// A NetworkPolicy or ClusterNetworkPolicy the engine cannot express, and what is
/// still known of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedPolicy {
    pub reason: String,
    /// The raw `spec.podSelector` (for a ClusterNetworkPolicy, the subject's pod
    /// selector), so the pods it would select can still be found (`None` when even
    /// that does not parse: then every pod of the held namespaces is held).
    pub pod_selector: Option<LabelSelector>,
    /// Only for a ClusterNetworkPolicy (key namespace empty): the subject's namespace
    /// selector; `None` when unreadable, then every namespace is held. A
    /// NetworkPolicy holds only its own namespace and leaves this `None`.
    pub namespace_selector: Option<LabelSelector>,
}

impl RejectedPolicy {
    /// A rejected NetworkPolicy's stand-in fields.
    pub fn network_policy(reason: impl Into<String>, pod_selector: Option<LabelSelector>) -> Self {
        RejectedPolicy {
            reason: reason.into(),
            pod_selector,
            namespace_selector: None,
        }
    }
}

impl Cluster {
    /// The opt-in of namespace `namespace` (off for one the snapshot lacks).
    pub fn namespace_log_allowed(&self, namespace: &str) -> LogAllowed {
        self.namespaces
            .get(namespace)
            .map(|n| n.log_allowed)
            .unwrap_or_default()
    }

    /// Whether any allowed new connection of `pod` in this direction (`ingress`, else
    /// egress) may need a record: its namespace opts in, or a NetworkPolicy or
    /// ClusterNetworkPolicy selecting it in that direction does. The dataplane logs
    /// such a pod's allows; which policy allowed is the agent's to tell.
    pub fn logs_allowed(&self, pod: &Pod, ingress: bool) -> bool {
        if self.namespace_log_allowed(&pod.namespace).covers(ingress) {
            return true;
        }
        let policy = self.policies_selecting(pod).any(|p| {
            p.log_allowed.covers(ingress)
                && if ingress {
                    p.policy_types.ingress
                } else {
                    p.policy_types.egress
                }
        });
        policy
            || [Tier::Admin, Tier::Baseline].into_iter().any(|tier| {
                self.cluster_policies_selecting(tier, pod)
                    .into_iter()
                    .any(|p| {
                        p.log_allowed.covers(ingress)
                            && !if ingress { &p.ingress } else { &p.egress }.is_empty()
                    })
            })
    }

    /// Inserts or replaces by key.
    pub fn add_namespace(&mut self, ns: Namespace) {
        self.namespaces.insert(ns.name.clone(), ns);
    }
    pub fn add_pod(&mut self, pod: Pod) {
        self.pods.insert(pod.key(), Arc::new(pod));
    }
    /// The pod of `key` to change in place: copied first when another cluster
    /// (an earlier snapshot) shares it.
    pub fn pod_mut(&mut self, key: &NamespacedName) -> Option<&mut Pod> {
        self.pods.get_mut(key).map(Arc::make_mut)
    }
    pub fn add_node(&mut self, node: Node) {
        self.nodes.insert(node.name.clone(), node);
    }
    /// Inserts or replaces by key; a rejected policy of the same key is gone.
    pub fn add_policy(&mut self, policy: NetworkPolicy) {
        self.rejected_policies.remove(&policy.key());
        self.policies.insert(policy.key(), Arc::new(policy));
    }
    /// The policy of `key` to change in place: copied first when another cluster
    /// shares it.
    pub fn policy_mut(&mut self, key: &NamespacedName) -> Option<&mut NetworkPolicy> {
        self.policies.get_mut(key).map(Arc::make_mut)
    }
    /// Records a policy that did not convert; a good one of the same key is gone
    /// (the newer object is what the author means now).
    pub fn reject_policy(&mut self, key: NamespacedName, rejected: RejectedPolicy) {
        self.policies.remove(&key);
        self.rejected_policies.insert(key, rejected);
    }

    /// The rejected policies that hold `pod` fail-closed: those of its namespace whose
    /// selector matches it, or cannot be read (then the whole namespace is held).
    /// hostNetwork pods are never held: no podSelector selects them.
    pub fn rejected_policies_selecting<'a>(
        &'a self,
        pod: &'a Pod,
    ) -> impl Iterator<Item = (&'a NamespacedName, &'a RejectedPolicy)> + 'a {
        self.rejected_policies.iter().filter(move |(key, r)| {
            let namespace_held = if key.is_cluster_scoped() {
                r.namespace_selector
                    .as_ref()
                    .is_none_or(|s| s.matches(&self.namespace_labels(&pod.namespace)))
            } else {
                key.namespace == pod.namespace
            };
            !pod.host_network
                && namespace_held
                && r.pod_selector
                    .as_ref()
                    .is_none_or(|s| s.matches(&pod.labels))
        })
    }

    /// Inserts or replaces by name; a rejected ClusterNetworkPolicy of that name is gone.
    pub fn add_cluster_policy(&mut self, policy: ClusterNetworkPolicy) {
        self.rejected_policies
            .remove(&NamespacedName::cluster_scoped(&policy.name));
        self.cluster_policies.insert(policy.name.clone(), policy);
    }

    /// Records a ClusterNetworkPolicy that did not convert (the good one of that name
    /// is gone): the pods its subject would select are held fail-closed.
    pub fn reject_cluster_policy(&mut self, name: &str, rejected: RejectedPolicy) {
        self.cluster_policies.remove(name);
        self.rejected_policies
            .insert(NamespacedName::cluster_scoped(name), rejected);
    }

    /// The ClusterNetworkPolicies of `tier` whose subject selects `pod`, in
    /// evaluation order: priority, then name (upstream leaves equal priorities to the
    /// implementation; sluice makes the choice deterministic).
    pub fn cluster_policies_selecting<'a>(
        &'a self,
        tier: Tier,
        pod: &Pod,
    ) -> Vec<&'a ClusterNetworkPolicy> {
        let mut out: Vec<&ClusterNetworkPolicy> = self
            .cluster_policies
            .values()
            .filter(|p| p.tier == tier && p.subject.selects(self, pod))
            .collect();
        out.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        out
    }

    /// The node's labels (empty when the Node object had none or is unknown).
    pub fn labels_of_node(&self, node: &str) -> Labels {
        self.node_labels.get(node).cloned().unwrap_or_default()
    }

    /// The labels namespaceSelectors see: the manifest's labels plus
    /// `kubernetes.io/metadata.name=<name>` (which the API server always sets).
    pub fn namespace_labels(&self, namespace: &str) -> Labels {
        let mut labels = self
            .namespaces
            .get(namespace)
            .map(|ns| ns.labels.clone())
            .unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string());
        labels
    }

    /// Policies that select `pod`, in key order.
    pub fn policies_selecting<'a>(
        &'a self,
        pod: &'a Pod,
    ) -> impl Iterator<Item = &'a NetworkPolicy> + 'a {
        self.policies
            .values()
            .map(|p| &**p)
            .filter(move |p| p.selects(pod))
    }

    /// Whether the pod peer `peer`, written in a policy of `policy_namespace`, names
    /// `pod`. hostNetwork pods are never named by a pod peer.
    pub fn pod_peer_matches(&self, policy_namespace: &str, peer: &PodPeer, pod: &Pod) -> bool {
        if pod.host_network || !peer.pods.matches(&pod.labels) {
            return false;
        }
        match &peer.namespaces {
            NamespaceScope::PolicyNamespace => pod.namespace == policy_namespace,
            NamespaceScope::Matching(sel) => sel.matches(&self.namespace_labels(&pod.namespace)),
        }
    }

    /// The pod (not hostNetwork) that owns `ip`, if any. When two pods claim the same
    /// address (a stale object), the first in key order wins.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods
            .values()
            .find(|p| !p.host_network && p.ips.contains(&ip))
            .map(|p| &**p)
    }

    /// The node owning `ip` as one of its addresses, if any.
    pub fn node_by_ip(&self, ip: IpAddr) -> Option<&Node> {
        self.nodes.values().find(|n| n.addresses.contains(&ip))
    }
}

// ---------------------------------------------------------------- ClusterNetworkPolicy

/// `spec.tier` of a ClusterNetworkPolicy: Admin rules come before NetworkPolicy,
/// Baseline rules after it (only for pods no NetworkPolicy isolates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Admin,
    Baseline,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A ClusterNetworkPolicy rule's `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Allowed; no later rule of this direction (ClusterNetworkPolicy or
    /// NetworkPolicy) is looked at.
    Accept,
    /// Dropped; no later rule is looked at.
    Deny,
    /// The rest of this tier is skipped: evaluation continues in the next tier.
    Pass,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Accept => "Accept",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `spec.subject`: the pods the policy applies to. Exactly one form upstream; both
/// forms mean "pods matching `pods` in namespaces matching `namespaces`" (the
/// `namespaces` form has `pods` = everything). hostNetwork pods are never subjects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    Namespaces(LabelSelector),
    Pods {
        namespaces: LabelSelector,
        pods: LabelSelector,
    },
}

impl Subject {
    /// The namespace and pod selectors this subject means.
    pub fn selectors(&self) -> (&LabelSelector, Option<&LabelSelector>) {
        match self {
            Subject::Namespaces(ns) => (ns, None),
            Subject::Pods { namespaces, pods } => (namespaces, Some(pods)),
        }
    }

    pub fn selects(&self, cluster: &Cluster, pod: &Pod) -> bool {
        let (ns, pods) = self.selectors();
        !pod.host_network
            && ns.matches(&cluster.namespace_labels(&pod.namespace))
            && pods.is_none_or(|p| p.matches(&pod.labels))
    }
}

/// One entry of a ClusterNetworkPolicy rule's `from` (ingress: only `Namespaces` and
/// `Pods`) or `to` (egress: all forms).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClusterPeer {
    /// Every non-hostNetwork pod of the matching namespaces.
    Namespaces(LabelSelector),
    /// Pods matching `pods` in namespaces matching `namespaces`.
    Pods {
        namespaces: LabelSelector,
        pods: LabelSelector,
    },
    /// Any address of the matching nodes (experimental upstream).
    Nodes(LabelSelector),
    /// Any address inside one of these CIDRs, pod addresses included (upstream says
    /// cluster-internal traffic is checked against it too).
    Networks(Vec<IpNet>),
    /// Experimental upstream, not implemented by sluice: matches nothing, so an
    /// Accept rule (the only action upstream allows it with) admits nothing through
    /// it. The reader warns and the rest of the policy applies.
    DomainNames(Vec<String>),
}

/// One ClusterNetworkPolicy rule, in written order within its direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterRule {
    /// `name`, when written (`policy check` names the rule by it, else by index).
    pub name: Option<String>,
    pub action: Action,
    /// `from` / `to`: never empty (validated); matches when any peer does.
    pub peers: Vec<ClusterPeer>,
    /// `protocols`: [`Ports::Any`] when missing. `destinationNamedPort` becomes one
    /// [`PortMatch::Named`] entry per protocol, since a container port's name
    /// belongs to its protocol.
    pub ports: Ports,
}

/// A `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy (cluster-scoped).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterNetworkPolicy {
    pub name: String,
    pub tier: Tier,
    /// 0..=1000, lower first.
    pub priority: u16,
    pub subject: Subject,
    pub ingress: Vec<ClusterRule>,
    pub egress: Vec<ClusterRule>,
    /// What of the policy sluice does not implement (field paths, e.g.
    /// `spec.egress[0].to[1].domainNames`): reported, while the rest applies.
    pub not_implemented: Vec<String>,
    /// `sluice.dev/log-allowed`: record the connections this policy's Accept rules
    /// allow.
    pub log_allowed: LogAllowed,
}
