//! The reference evaluator: would a *new* connection from a source to a destination on
//! a port and protocol be allowed by the cluster's NetworkPolicies, and why.
//!
//! This is the meaning the compiled dataplane must agree with. It is written to be
//! read, not to be fast: for every probe it walks every policy.
//!
//! Upstream semantics (networking.k8s.io/v1 and the Kubernetes docs):
//! - A connection needs both the source's egress and the destination's ingress to
//!   allow it. Each side is judged alone.
//! - A pod is isolated for a direction when at least one policy that selects it has
//!   that type (after `policyTypes` defaulting). A pod that is not isolated allows
//!   everything in that direction. An isolated pod allows what the union of the
//!   rules of those policies allows (rules only ever add).
//! - Non-pod endpoints (external addresses, nodes, hostNetwork pods) are never
//!   isolated: no podSelector selects them. A hostNetwork pod as a source is its node.
//! - Connections from a pod's own node to the pod are always allowed (kubelet probes);
//!   the docs say "the only allowed connections into the pod are those from the pod's
//!   node and those allowed by the ingress list". Egress from a pod to its own node
//!   is *not* special: the docs' ipBlock note says "to and from the node", but their
//!   "Pod isolation" section (the normative one) exempts only ingress, so a pod
//!   isolated for egress needs a rule to reach its node (the compiler polices the
//!   INPUT path the same way).
//! - A pod can always reach itself (seed 002: "a pod cannot block access to itself";
//!   upstream e2e `AllowLoopback`): the packet never leaves its network namespace.
//! - Replies of an allowed connection are always allowed: a probe is always the
//!   connection's first packet, so this evaluator never sees a reply.
//! - An address given as `ip:` that belongs to a pod (or node) *is* that pod (node):
//!   a packet carries only addresses, so the dataplane cannot tell them apart.
//! - `ipBlock` is matched against the peer's address whatever owns it, pod IPs
//!   included (what upstream e2e expects and Calico/kube-router do).
//! - Named ports are resolved on the destination pod (name and protocol); against a
//!   destination that is not a pod a named port matches nothing.
//! - Not upstream, but what sluice enforces: a pod selected by a NetworkPolicy that
//!   could not be read ([`Cluster::rejected_policies`]; or any pod of its namespace
//!   when even the policy's selector is unreadable) is held fail-closed, denied both
//!   ways whatever the other policies say, until the policy is fixed. Loopback and
//!   ingress from the pod's own node stay allowed, as for any isolated pod. This is
//!   the agent's behaviour, so `sluicectl policy check` says what the node does.
//!
//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`, the tiers around
//! NetworkPolicy; kubernetes-sigs/network-policy-api `apis/v1alpha2`), per direction
//! of a pod, after loopback, own-node ingress and held pods above:
//! 1. the Admin tier: policies whose subject selects the pod, by priority (lower
//!    first; equal priorities by name, a choice upstream leaves open), each one's
//!    rules of this direction in written order; the first rule whose peers and
//!    protocols match decides: Accept allows, Deny denies, Pass skips the rest of
//!    the tier;
//! 2. NetworkPolicy: a pod isolated in this direction is decided by its policies;
//! 3. the Baseline tier, the same walk, only for a pod no NetworkPolicy isolates in
//!    this direction; Pass or no match there allows.
//!
//! Each side is still judged alone: an egress Accept does not bypass the
//! destination's ingress (upstream: "any ingress rules at the destination do
//! apply"). Subjects are never hostNetwork pods, so node and external endpoints
//! stay unpoliced; a `networks` peer matches any address in it, pod addresses
//! included; a `nodes` peer matches a node's addresses (hostNetwork pods are their
//! node); `domainNames` peers are not implemented and match nothing.

use std::fmt;
use std::net::IpAddr;

use crate::model::{
    Action, Cluster, ClusterPeer, ClusterRule, NamespacedName, NetworkPolicy, Node, Peer, Peers,
    Pod, PolicyPort, PortMatch, Ports, Protocol, Rule, Tier,
};

/// One end of a probe, as the user names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// `NS/POD`.
    Pod(NamespacedName),
    /// `ip:ADDR`: resolved to a pod or node when one owns the address.
    Ip(IpAddr),
    /// `node:NAME` (source only): the node itself, e.g. kubelet.
    Node(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Pod(k) => write!(f, "{k}"),
            Endpoint::Ip(ip) => write!(f, "ip:{ip}"),
            Endpoint::Node(n) => write!(f, "node:{n}"),
        }
    }
}

/// The syntax of an endpoint was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not NS/POD, ip:ADDR or node:NAME")]
pub struct BadEndpoint(pub String);

impl std::str::FromStr for Endpoint {
    type Err = BadEndpoint;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadEndpoint(s.to_string());
        if let Some(ip) = s.strip_prefix("ip:") {
            return ip.parse().map(Endpoint::Ip).map_err(|_| bad());
        }
        if let Some(node) = s.strip_prefix("node:") {
            return if node.is_empty() {
                Err(bad())
            } else {
                Ok(Endpoint::Node(node.to_string()))
            };
        }
        match s.split_once('/') {
            Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => {
                Ok(Endpoint::Pod(NamespacedName::new(ns, pod)))
            }
            _ => Err(bad()),
        }
    }
}

/// A new connection to judge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Probe {
    pub from: Endpoint,
    pub to: Endpoint,
    /// The destination port; ICMP has none, so it is ignored there (0 will do).
    pub port: u16,
    pub protocol: Protocol,
}

/// A probe that cannot be judged because it names something the snapshot lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvaluateError {
    #[error("pod {0} is not in the input")]
    UnknownPod(NamespacedName),
    #[error("node {0} is not in the input")]
    UnknownNode(String),
    #[error("pod {0} has no IP address (not running yet?)")]
    PodWithoutIp(NamespacedName),
    #[error("node {0} has no address")]
    NodeWithoutAddress(String),
    #[error("a node cannot be a destination; name the hostNetwork pod or ip:ADDR")]
    NodeDestination,
    #[error("port 0 is not a port")]
    PortZero,
}

/// The overall answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a probe's endpoint turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A pod with its own network namespace (can be selected by policies).
    Pod { pod: NamespacedName, ip: IpAddr },
    /// A node's address (node:NAME, a hostNetwork pod, or ip: of a node).
    Node { node: String, ip: IpAddr },
    /// An address no pod or node owns.
    External { ip: IpAddr },
}

impl Resolved {
    pub fn ip(&self) -> IpAddr {
        match self {
            Resolved::Pod { ip, .. } | Resolved::Node { ip, .. } | Resolved::External { ip } => *ip,
        }
    }
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resolved::Pod { pod, ip } => write!(f, "pod {pod} ({ip})"),
            Resolved::Node { node, ip } => write!(f, "node {node} ({ip})"),
            Resolved::External { ip } => write!(f, "{ip}"),
        }
    }
}

/// Which rule allowed a direction: `rule` indexes `spec.ingress` or `spec.egress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub policy: NamespacedName,
    pub rule: usize,
}

/// A ClusterNetworkPolicy rule that decided a direction, or passed it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRuleRef {
    pub tier: Tier,
    pub policy: String,
    pub priority: u16,
    /// Index into the policy's `spec.ingress` or `spec.egress`.
    pub rule: usize,
    /// The rule's `name`, when it has one.
    pub name: Option<String>,
    pub action: Action,
}

impl ClusterRuleRef {
    /// `Admin ClusterNetworkPolicy NAME (priority P) egress[i] "rule-name": Deny`.
    pub fn describe(&self, direction: &str) -> String {
        let name = self
            .name
            .as_ref()
            .map(|n| format!(" {n:?}"))
            .unwrap_or_default();
        format!(
            "{} ClusterNetworkPolicy {} (priority {}) {direction}[{}]{name}: {}",
            self.tier, self.policy, self.priority, self.rule, self.action
        )
    }
}

/// How one direction (the source's egress or the destination's ingress) decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    /// The endpoint is not a pod a policy can select (node, external address,
    /// hostNetwork pod): nothing to enforce on this side.
    NotPoliced,
    /// A pod no policy of this direction selects.
    NotIsolated,
    /// Ingress from the destination pod's own node: always allowed.
    OwnNode,
    /// A pod talking to itself: never leaves its namespace, so never policed.
    Loopback,
    /// Isolated by `isolating`; the first matching rule (in policy key order) allowed
    /// it. `also` counts further rules that would have allowed it.
    Allowed {
        isolating: Vec<NamespacedName>,
        by: RuleRef,
        also: usize,
    },
    /// Isolated by `isolating`; no rule of theirs allowed it.
    Denied { isolating: Vec<NamespacedName> },
    /// Held fail-closed by policies that could not be read (in key order): denied
    /// whatever any other policy allows.
    Held { rejected: Vec<HeldBy> },
    /// An Admin rule, or a Baseline rule for a pod no NetworkPolicy isolates,
    /// accepted or denied it (`by.action` is Accept or Deny).
    ClusterPolicy { by: ClusterRuleRef },
}

/// A rejected policy holding a pod, and why it was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldBy {
    pub policy: NamespacedName,
    pub reason: String,
}

impl fmt::Display for HeldBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.policy.is_cluster_scoped() {
            "ClusterNetworkPolicy"
        } else {
            "NetworkPolicy"
        };
        write!(f, "{kind} {} ({})", self.policy, self.reason)
    }
}

/// `held fail-closed by rejected NetworkPolicy a/b (why), ...`: one text for the
/// evaluator's reason and `sluicectl policy check`.
pub fn held_text(rejected: &[HeldBy]) -> String {
    let list = rejected
        .iter()
        .map(|h| h.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    format!("held fail-closed by rejected {list}")
}

impl Side {
    pub fn allows(&self) -> bool {
        match self {
            Side::Denied { .. } | Side::Held { .. } => false,
            Side::ClusterPolicy { by } => by.action == Action::Accept,
            _ => true,
        }
    }

    /// The policies isolating this side (empty when not isolated).
    pub fn isolating(&self) -> &[NamespacedName] {
        match self {
            Side::Allowed { isolating, .. } | Side::Denied { isolating } => isolating,
            _ => &[],
        }
    }
}

/// The evaluator's answer with its reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub verdict: Verdict,
    pub from: Resolved,
    pub to: Resolved,
    pub port: u16,
    pub protocol: Protocol,
    /// The source's egress side.
    pub egress: Side,
    /// The destination's ingress side.
    pub ingress: Side,
    /// ClusterNetworkPolicy Pass rules that handed the egress side to the next tier,
    /// in evaluation order (at most one per tier).
    pub egress_passed: Vec<ClusterRuleRef>,
    /// The same for the ingress side.
    pub ingress_passed: Vec<ClusterRuleRef>,
}

fn passed_text(passed: &[ClusterRuleRef], direction: &str) -> String {
    passed
        .iter()
        .map(|p| format!(" (passed on by {})", p.describe(direction)))
        .collect()
}

fn names(list: &[NamespacedName]) -> String {
    list.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Evaluation {
    /// One line for people and for JSON's `reason`: what each side decided and why.
    pub fn reason(&self) -> String {
        let egress = match &self.egress {
            Side::NotPoliced => format!("egress: {} is not a policed pod", self.from),
            Side::NotIsolated => format!("egress: no policy isolates {} for egress", self.from),
            Side::OwnNode => "egress: own node".to_string(),
            Side::Loopback => format!("egress: {} talks to itself (loopback)", self.from),
            Side::Allowed { isolating, by, .. } => format!(
                "egress: isolated by [{}], allowed by {} egress[{}]",
                names(isolating),
                by.policy,
                by.rule
            ),
            Side::Denied { isolating } => format!(
                "egress: isolated by [{}], no egress rule allows {}/{} to {}",
                names(isolating),
                self.protocol,
                self.port,
                self.to
            ),
            Side::Held { rejected } => format!("egress: {}", held_text(rejected)),
            Side::ClusterPolicy { by } => format!("egress: {}", by.describe("egress")),
        } + &passed_text(&self.egress_passed, "egress");
        let ingress = match &self.ingress {
            Side::NotPoliced => format!("ingress: {} is not a policed pod", self.to),
            Side::NotIsolated => format!("ingress: no policy isolates {} for ingress", self.to),
            Side::OwnNode => format!(
                "ingress: {} is the destination pod's own node (always allowed)",
                self.from
            ),
            Side::Loopback => "ingress: loopback never leaves the pod".to_string(),
            Side::Allowed { isolating, by, .. } => format!(
                "ingress: isolated by [{}], allowed by {} ingress[{}]",
                names(isolating),
                by.policy,
                by.rule
            ),
            Side::Denied { isolating } => format!(
                "ingress: isolated by [{}], no ingress rule allows {}/{} from {}",
                names(isolating),
                self.protocol,
                self.port,
                self.from
            ),
            Side::Held { rejected } => format!("ingress: {}", held_text(rejected)),
            Side::ClusterPolicy { by } => format!("ingress: {}", by.describe("ingress")),
        } + &passed_text(&self.ingress_passed, "ingress");
        format!("{egress}; {ingress}")
    }
}

/// The first address of `candidates` of the same family as `like`, else the first.
fn same_family(candidates: &[IpAddr], like: Option<IpAddr>) -> Option<IpAddr> {
    like.and_then(|l| {
        candidates
            .iter()
            .copied()
            .find(|c| c.is_ipv4() == l.is_ipv4())
    })
    .or_else(|| candidates.first().copied())
}

fn node_named<'a>(cluster: &'a Cluster, name: &str) -> Result<&'a Node, EvaluateError> {
    cluster
        .nodes
        .get(name)
        .ok_or_else(|| EvaluateError::UnknownNode(name.to_string()))
}

/// Resolves an endpoint; `peer_ip` picks the address family when the endpoint has
/// several addresses.
fn resolve(
    cluster: &Cluster,
    endpoint: &Endpoint,
    peer_ip: Option<IpAddr>,
) -> Result<Resolved, EvaluateError> {
    match endpoint {
        Endpoint::Pod(key) => {
            let pod = cluster
                .pods
                .get(key)
                .ok_or_else(|| EvaluateError::UnknownPod(key.clone()))?;
            if pod.host_network {
                // Its traffic is its node's traffic, from the node's addresses.
                let ip = same_family(&pod.ips, peer_ip);
                if let Some(node_name) = &pod.node {
                    let addresses = cluster
                        .nodes
                        .get(node_name)
                        .map(|n| n.addresses.clone())
                        .unwrap_or_default();
                    let ip = same_family(&addresses, peer_ip)
                        .or(ip)
                        .ok_or_else(|| EvaluateError::PodWithoutIp(key.clone()))?;
                    return Ok(Resolved::Node {
                        node: node_name.clone(),
                        ip,
                    });
                }
                let ip = ip.ok_or_else(|| EvaluateError::PodWithoutIp(key.clone()))?;
                return Ok(Resolved::External { ip });
            }
            let ip = same_family(&pod.ips, peer_ip)
                .ok_or_else(|| EvaluateError::PodWithoutIp(key.clone()))?;
            Ok(Resolved::Pod {
                pod: key.clone(),
                ip,
            })
        }
        Endpoint::Node(name) => {
            let node = node_named(cluster, name)?;
            let ip = same_family(&node.addresses, peer_ip)
                .ok_or_else(|| EvaluateError::NodeWithoutAddress(name.clone()))?;
            Ok(Resolved::Node {
                node: name.clone(),
                ip,
            })
        }
        Endpoint::Ip(ip) => {
            let ip = *ip;
            if let Some(pod) = cluster.pod_by_ip(ip) {
                return Ok(Resolved::Pod { pod: pod.key(), ip });
            }
            if let Some(node) = cluster.node_by_ip(ip) {
                return Ok(Resolved::Node {
                    node: node.name.clone(),
                    ip,
                });
            }
            // A hostNetwork pod's IP is its node's, even when no Node object says so.
            if let Some(node) = cluster
                .pods
                .values()
                .filter(|p| p.host_network && p.ips.contains(&ip))
                .find_map(|p| p.node.clone())
            {
                return Ok(Resolved::Node { node, ip });
            }
            Ok(Resolved::External { ip })
        }
    }
}

fn pod_of<'a>(cluster: &'a Cluster, r: &Resolved) -> Option<&'a Pod> {
    match r {
        Resolved::Pod { pod, .. } => cluster.pods.get(pod).map(|p| &**p),
        _ => None,
    }
}

/// Whether `peers` (of a policy in `policy_namespace`) admit the endpoint `other`.
pub fn peers_match(
    cluster: &Cluster,
    policy_namespace: &str,
    peers: &Peers,
    other: &Resolved,
) -> bool {
    match peers {
        Peers::Any => true,
        Peers::Listed(list) => list.iter().any(|peer| match peer {
            Peer::IpBlock(block) => block.contains(other.ip()),
            Peer::Pods(pp) => pod_of(cluster, other)
                .is_some_and(|pod| cluster.pod_peer_matches(policy_namespace, pp, pod)),
        }),
    }
}

/// Whether one policy port admits `port`/`protocol` towards `destination` (a pod for
/// named ports, `None` otherwise).
pub fn port_matches(
    policy_port: &PolicyPort,
    port: u16,
    protocol: Protocol,
    destination: Option<&Pod>,
) -> bool {
    if policy_port.protocol != protocol {
        return false;
    }
    match &policy_port.port {
        PortMatch::All => true,
        PortMatch::Numbers { start, end } => (*start..=*end).contains(&port),
        PortMatch::Named(name) => {
            destination.is_some_and(|pod| pod.resolve_named_port(name, protocol).contains(&port))
        }
    }
}

/// Whether `ports` admit the connection.
pub fn ports_match(
    ports: &Ports,
    port: u16,
    protocol: Protocol,
    destination: Option<&Pod>,
) -> bool {
    match ports {
        Ports::Any => true,
        Ports::Listed(list) => list
            .iter()
            .any(|p| port_matches(p, port, protocol, destination)),
    }
}

/// Judges one direction for a pod selected (or not) by policies.
fn judge<'a>(
    policies: impl Iterator<Item = (&'a NetworkPolicy, &'a [Rule])>,
    rule_allows: impl Fn(&NetworkPolicy, &Rule) -> bool,
) -> Side {
    let mut isolating = Vec::new();
    let mut first: Option<RuleRef> = None;
    let mut also = 0;
    for (policy, rules) in policies {
        isolating.push(policy.key());
        for (i, rule) in rules.iter().enumerate() {
            if rule_allows(policy, rule) {
                if first.is_none() {
                    first = Some(RuleRef {
                        policy: policy.key(),
                        rule: i,
                    });
                } else {
                    also += 1;
                }
            }
        }
    }
    match (isolating.is_empty(), first) {
        (true, _) => Side::NotIsolated,
        (false, Some(by)) => Side::Allowed {
            isolating,
            by,
            also,
        },
        (false, None) => Side::Denied { isolating },
    }
}

/// Whether a ClusterNetworkPolicy peer names the endpoint `other`.
pub fn cluster_peer_matches(cluster: &Cluster, peer: &ClusterPeer, other: &Resolved) -> bool {
    match peer {
        ClusterPeer::Namespaces(ns) => pod_of(cluster, other)
            .is_some_and(|pod| ns.matches(&cluster.namespace_labels(&pod.namespace))),
        ClusterPeer::Pods { namespaces, pods } => pod_of(cluster, other).is_some_and(|pod| {
            namespaces.matches(&cluster.namespace_labels(&pod.namespace))
                && pods.matches(&pod.labels)
        }),
        ClusterPeer::Nodes(sel) => match other {
            Resolved::Node { node, .. } => sel.matches(&cluster.labels_of_node(node)),
            _ => false,
        },
        ClusterPeer::Networks(nets) => nets.iter().any(|n| n.contains(&other.ip())),
        ClusterPeer::DomainNames(_) => false,
    }
}

/// How one tier treated a direction of a pod.
enum TierOutcome {
    Decided(ClusterRuleRef),
    Passed(ClusterRuleRef),
    NoMatch,
}

/// One direction of a policed pod, as the cluster tiers see it.
struct Direction<'a> {
    pod: &'a Pod,
    ingress: bool,
    /// The peer: the source for ingress, the destination for egress.
    other: &'a Resolved,
    port: u16,
    protocol: Protocol,
    /// The destination pod, which resolves named ports.
    dst_pod: Option<&'a Pod>,
}

/// Walks `tier`'s policies selecting the pod for one direction; the first matching
/// rule in (priority, name, written order) decides or passes.
fn walk_tier(cluster: &Cluster, tier: Tier, d: &Direction) -> TierOutcome {
    for policy in cluster.cluster_policies_selecting(tier, d.pod) {
        let rules: &[ClusterRule] = if d.ingress {
            &policy.ingress
        } else {
            &policy.egress
        };
        for (i, rule) in rules.iter().enumerate() {
            let matches = rule
                .peers
                .iter()
                .any(|p| cluster_peer_matches(cluster, p, d.other))
                && ports_match(&rule.ports, d.port, d.protocol, d.dst_pod);
            if !matches {
                continue;
            }
            let by = ClusterRuleRef {
                tier,
                policy: policy.name.clone(),
                priority: policy.priority,
                rule: i,
                name: rule.name.clone(),
                action: rule.action,
            };
            return match rule.action {
                Action::Pass => TierOutcome::Passed(by),
                Action::Accept | Action::Deny => TierOutcome::Decided(by),
            };
        }
    }
    TierOutcome::NoMatch
}

/// One direction of a policed pod through the three tiers: Admin, NetworkPolicy
/// (`network_policy` judges it), then Baseline when no NetworkPolicy isolates it.
fn tiers(
    cluster: &Cluster,
    d: &Direction,
    passed: &mut Vec<ClusterRuleRef>,
    network_policy: impl FnOnce() -> Side,
) -> Side {
    match walk_tier(cluster, Tier::Admin, d) {
        TierOutcome::Decided(by) => return Side::ClusterPolicy { by },
        TierOutcome::Passed(by) => passed.push(by),
        TierOutcome::NoMatch => {}
    }
    let side = network_policy();
    if side != Side::NotIsolated {
        return side;
    }
    match walk_tier(cluster, Tier::Baseline, d) {
        TierOutcome::Decided(by) => Side::ClusterPolicy { by },
        TierOutcome::Passed(by) => {
            passed.push(by);
            Side::NotIsolated
        }
        TierOutcome::NoMatch => Side::NotIsolated,
    }
}

/// The rejected policies holding `pod`, if any.
fn held(cluster: &Cluster, pod: &Pod) -> Option<Side> {
    let rejected: Vec<HeldBy> = cluster
        .rejected_policies_selecting(pod)
        .map(|(key, r)| HeldBy {
            policy: key.clone(),
            reason: r.reason.clone(),
        })
        .collect();
    (!rejected.is_empty()).then_some(Side::Held { rejected })
}

/// Every NetworkPolicy one of whose rules admits the connection `e` judged, on its
/// ingress side (`ingress`) or egress side, in key order: the rule of
/// [`Side::Allowed`] and those it counts in `also`, by policy. Empty when that side
/// is not allowed by a NetworkPolicy rule. Allow records name these.
pub fn allowing_policies(cluster: &Cluster, e: &Evaluation, ingress: bool) -> Vec<NamespacedName> {
    let (side, other) = if ingress {
        (&e.ingress, &e.from)
    } else {
        (&e.egress, &e.to)
    };
    let Side::Allowed { isolating, .. } = side else {
        return Vec::new();
    };
    let dst_pod = pod_of(cluster, &e.to);
    isolating
        .iter()
        .filter(|key| {
            cluster.policies.get(key).is_some_and(|p| {
                let rules = if ingress { &p.ingress } else { &p.egress };
                rules.iter().any(|r| {
                    peers_match(cluster, &p.namespace, &r.peers, other)
                        && ports_match(&r.ports, e.port, e.protocol, dst_pod)
                })
            })
        })
        .cloned()
        .collect()
}

/// Evaluates `probe` against `cluster`.
pub fn evaluate(cluster: &Cluster, probe: &Probe) -> Result<Evaluation, EvaluateError> {
    if probe.port == 0 && probe.protocol != Protocol::Icmp {
        return Err(EvaluateError::PortZero);
    }
    if matches!(probe.to, Endpoint::Node(_)) {
        return Err(EvaluateError::NodeDestination);
    }
    // Destination first so the source's address family can follow it.
    let to = resolve(cluster, &probe.to, None)?;
    let from = resolve(cluster, &probe.from, Some(to.ip()))?;
    let (port, protocol) = (probe.port, probe.protocol);
    let dst_pod = pod_of(cluster, &to);
    let src_pod = pod_of(cluster, &from);

    let loopback = matches!((&from, &to), (Resolved::Pod { pod: a, .. }, Resolved::Pod { pod: b, .. }) if a == b);

    let (mut egress_passed, mut ingress_passed) = (Vec::new(), Vec::new());
    let egress = match src_pod {
        _ if loopback => Side::Loopback,
        None => Side::NotPoliced,
        Some(src) => held(cluster, src).unwrap_or_else(|| {
            let d = Direction {
                pod: src,
                ingress: false,
                other: &to,
                port,
                protocol,
                dst_pod,
            };
            tiers(cluster, &d, &mut egress_passed, || {
                judge(
                    cluster
                        .policies_selecting(src)
                        .filter(|p| p.policy_types.egress)
                        .map(|p| (p, p.egress.as_slice())),
                    |policy, rule| {
                        peers_match(cluster, &policy.namespace, &rule.peers, &to)
                            && ports_match(&rule.ports, port, protocol, dst_pod)
                    },
                )
            })
        }),
    };

    let ingress = match dst_pod {
        _ if loopback => Side::Loopback,
        None => Side::NotPoliced,
        Some(dst) => {
            let from_own_node = matches!(&from, Resolved::Node { node, .. }
                if dst.node.as_deref() == Some(node.as_str()));
            if from_own_node {
                Side::OwnNode
            } else if let Some(held) = held(cluster, dst) {
                held
            } else {
                let d = Direction {
                    pod: dst,
                    ingress: true,
                    other: &from,
                    port,
                    protocol,
                    dst_pod: Some(dst),
                };
                tiers(cluster, &d, &mut ingress_passed, || {
                    judge(
                        cluster
                            .policies_selecting(dst)
                            .filter(|p| p.policy_types.ingress)
                            .map(|p| (p, p.ingress.as_slice())),
                        |policy, rule| {
                            peers_match(cluster, &policy.namespace, &rule.peers, &from)
                                && ports_match(&rule.ports, port, protocol, Some(dst))
                        },
                    )
                })
            }
        }
    };

    let verdict = if egress.allows() && ingress.allows() {
        Verdict::Allow
    } else {
        Verdict::Deny
    };
    Ok(Evaluation {
        verdict,
        from,
        to,
        port,
        protocol,
        egress,
        ingress,
        egress_passed,
        ingress_passed,
    })
}
