//! Snapshot → desired node state, purely. The loop in [`crate::agent`] applies it.
//!
//! The policy crate compiles the snapshot into its rule model; this module turns that
//! model into the dataplane's owned chains and sets and adds the agent's own rules:
//!
//! - tunnel guard (filter): IP protocol 4 (IPIP) or the VXLAN UDP port is accepted
//!   only from known node addresses (ipset `SLUICE-NODES`), and never from a pod;
//! - NAT outgoing (nat POSTROUTING): masquerade only what leaves the pool for a
//!   destination outside the pool and the nodes, so traffic *to* a pod is never
//!   SNATed and a NodePort client with `externalTrafficPolicy: Local` keeps its
//!   address all the way to the pod's ingress policy (seed 001). tunl0 addresses get
//!   no special treatment anywhere;
//! - fail-closed: a policy that cannot be expressed holds the pods it selects (the
//!   whole namespace when even the selector is broken): their new connections are
//!   dropped in both directions ahead of every allow, since policies are additive and
//!   a deny-all stand-in alone would be overruled by any other policy that allows.
//!   The stand-in is added too, so the namespace counts as having policy and its
//!   not-yet-known pods stay fail-closed.
//!
//! Each hook joins the policy crate's chain for that built-in chain when it exists, so
//! there is one jump per built-in chain.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use sluice_policy::compile::{self, CompileError, InterfaceNames, Ruleset, SetMember};
use sluice_policy::render::{ipset as render_ipset, iptables as render_iptables};
use sluice_policy::{LabelSelector, NamespacedName, NetworkPolicy, Pod, PolicyTypes};

use crate::dataplane::{Chain, DesiredDataplane, DesiredTable, IpSet, Jump, SetKind};
use crate::datastore::Snapshot;

/// Node addresses: the only sources allowed to send us tunnel packets.
pub const SET_NODES: &str = "SLUICE-NODES";
/// The pod pool(s).
pub const SET_POOLS: &str = "SLUICE-POOLS";
pub const CHAIN_TUNNEL_IN: &str = "SLUICE-TUNNEL-IN";
pub const CHAIN_NAT_OUTGOING: &str = "SLUICE-NAT-OUTGOING";
/// New connections of pods selected by a policy that cannot be expressed.
pub const CHAIN_HELD: &str = "SLUICE-HELD";

/// How this node's traffic between nodes is carried, as far as filtering cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelFilter {
    /// IP protocol 4.
    Ipip,
    /// UDP to this port.
    Vxlan { port: u16 },
    /// No encapsulation: nothing to guard.
    None,
}

impl TunnelFilter {
    fn match_text(self) -> Option<String> {
        match self {
            TunnelFilter::Ipip => Some("-p 4".into()),
            TunnelFilter::Vxlan { port } => Some(format!("-p udp -m udp --dport {port}")),
            TunnelFilter::None => None,
        }
    }
}

/// Node settings reconcile needs (from the command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    pub node: String,
    pub pool: Ipv4Net,
    pub tunnel: TunnelFilter,
    pub nat_outgoing: bool,
    /// Overrides the Node object's address for this node.
    pub node_ip: Option<Ipv4Addr>,
}

/// The host-side interface names, by the CNI plugin's own rule.
pub use sluice_policy::veth_names::VethNames;

/// One block of the pool, its node, and where to send its traffic: the routes'
/// own type, so the desired state goes to route sync without a copy.
pub use crate::routes::BlockOwner as BlockRoute;

/// Everything the node should look like after one apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub dataplane: DesiredDataplane,
    /// Every block whose owner's address is known (ours included).
    pub blocks: Vec<BlockRoute>,
    /// This node's blocks, ascending; tunl0 gets IPAM's tunnel address of the first.
    pub own_blocks: Vec<Ipv4Net>,
    /// This node's address, when known.
    pub node_ip: Option<Ipv4Addr>,
    /// Local pods with an address: their policy is in force once this is applied.
    pub local_pods: BTreeSet<NamespacedName>,
    /// Things an operator should hear about (rejected policies, nodes without address).
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("compiling policy: {0}")]
    Compile(#[from] CompileError),
    #[error("dataplane model: {0}")]
    Dataplane(#[from] crate::dataplane::iptables::IptablesError),
}

fn first_v4(addrs: &[IpAddr]) -> Option<Ipv4Addr> {
    addrs.iter().find_map(|a| match a {
        IpAddr::V4(v) => Some(*v),
        IpAddr::V6(_) => None,
    })
}

/// A rejected policy's stand-in: deny everything, both directions, for the pods it
/// would have selected. Its name cannot collide with a real policy (`:` is not
/// allowed in object names).
fn fail_closed_policy(key: &NamespacedName, selector: Option<&LabelSelector>) -> NetworkPolicy {
    NetworkPolicy {
        namespace: key.namespace.clone(),
        name: format!("rejected:{}", key.name),
        pod_selector: selector.cloned().unwrap_or_else(LabelSelector::everything),
        ingress: Vec::new(),
        egress: Vec::new(),
        policy_types: PolicyTypes {
            ingress: true,
            egress: true,
        },
    }
}

/// Compute the desired state. Pure: no I/O, same input → same output.
pub fn desired(snapshot: &Snapshot, settings: &NodeSettings) -> Result<Desired, ReconcileError> {
    let mut out = Desired::default();
    let mut cluster = snapshot.cluster.clone();
    for (key, rejected) in &snapshot.cluster.rejected_policies {
        out.warnings.push(format!(
            "NetworkPolicy {key} cannot be enforced ({}); the pods it selects are held fail-closed",
            rejected.reason
        ));
        let p = fail_closed_policy(key, rejected.pod_selector.as_ref());
        cluster.add_policy(p);
    }

    let ruleset = compile::compile(&cluster, &settings.node, &VethNames)?;
    out.dataplane = from_ruleset(&ruleset);

    // Node addresses and block routes.
    let mut node_ips: BTreeMap<&str, Ipv4Addr> = cluster
        .nodes
        .values()
        .filter_map(|n| Some((n.name.as_str(), first_v4(&n.addresses)?)))
        .collect();
    if let Some(ip) = settings.node_ip {
        node_ips.insert(settings.node.as_str(), ip);
    }
    out.node_ip = node_ips.get(settings.node.as_str()).copied();
    for (block, node) in &snapshot.blocks {
        if node == &settings.node {
            out.own_blocks.push(*block);
        }
        match node_ips.get(node.as_str()) {
            Some(ip) => out.blocks.push(BlockRoute {
                node: node.clone(),
                node_ip: *ip,
                block: *block,
            }),
            None => out.warnings.push(format!(
                "block {block} belongs to node {node}, whose address is unknown"
            )),
        }
    }
    let all_node_addrs: BTreeSet<String> = cluster
        .nodes
        .values()
        .flat_map(|n| n.addresses.iter())
        .filter(|a| a.is_ipv4())
        .map(|a| a.to_string())
        .chain(settings.node_ip.map(|a| a.to_string()))
        .collect();

    out.local_pods = cluster
        .pods
        .values()
        .filter(|p| {
            !p.host_network && p.node.as_deref() == Some(&settings.node) && !p.ips.is_empty()
        })
        .map(Pod::key)
        .collect();

    let held = held_interfaces(snapshot, &cluster, &settings.node);
    add_agent_rules(&mut out.dataplane, settings, all_node_addrs, held);
    for t in out.dataplane.tables.values() {
        t.validate()?;
    }
    Ok(out)
}

/// The policy crate's rule model as owned chains and sets.
pub fn from_ruleset(ruleset: &Ruleset) -> DesiredDataplane {
    let mut dp = DesiredDataplane::default();
    for (table, chains) in &ruleset.tables {
        let t = dp.tables.entry(table.as_str().to_string()).or_default();
        for chain in chains.values() {
            t.chains.push(Chain {
                name: chain.name.clone(),
                rules: chain.rules.iter().map(render_iptables::rule_body).collect(),
            });
        }
    }
    for j in &ruleset.jumps {
        dp.tables
            .entry(j.table.as_str().to_string())
            .or_default()
            .jumps
            .push(Jump {
                from: j.chain.clone(),
                rule: render_iptables::rule_body(&j.rule),
                position: crate::dataplane::iptables::JumpPosition::Top,
            });
    }
    for set in ruleset.sets.values() {
        let kind = match set.kind {
            compile::SetKind::HashIp => SetKind::HashIp,
            compile::SetKind::HashNet => SetKind::HashNet,
            compile::SetKind::HashIpPort => SetKind::HashIpPort,
        };
        dp.sets
            .push(IpSet::new(&set.name, kind).with(set.members.iter().map(member_text)));
    }
    dp
}

fn member_text(m: &SetMember) -> String {
    render_ipset::member_text(m)
}

/// Put `rules` first in whatever owned chain `builtin` jumps to unconditionally, or in
/// a chain of our own (`fallback`) with its own jump.
fn hook(table: &mut DesiredTable, builtin: &str, fallback: &str, rules: Vec<String>) {
    if rules.is_empty() {
        return;
    }
    let target = table
        .jumps
        .iter()
        .find(|j| j.from == builtin && j.is_unconditional())
        .and_then(|j| j.target())
        .map(str::to_string);
    let name = match target {
        Some(t) => t,
        None => {
            table.jumps.push(Jump::top(builtin, fallback));
            fallback.to_string()
        }
    };
    match table.chains.iter_mut().find(|c| c.name == name) {
        Some(c) => {
            let mut merged = rules;
            merged.append(&mut c.rules);
            c.rules = merged;
        }
        None => table.chains.push(Chain { name, rules }),
    }
}

/// `-i`/`-o` arguments for the interfaces of pods held by rejected policies:
/// exact veths, or `slcXXXX+` for a namespace whose policy selector is unreadable.
fn held_interfaces(
    snapshot: &Snapshot,
    cluster: &sluice_policy::Cluster,
    node: &str,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (key, rejected) in &snapshot.cluster.rejected_policies {
        match &rejected.pod_selector {
            None => {
                out.insert(format!("{}+", VethNames.namespace_prefix(&key.namespace)));
            }
            Some(sel) => {
                for pod in cluster.pods.values().filter(|p| {
                    !p.host_network
                        && p.node.as_deref() == Some(node)
                        && p.namespace == key.namespace
                }) {
                    if sel.matches(&pod.labels) {
                        out.insert(VethNames.host_veth(pod));
                    }
                }
            }
        }
    }
    out
}

fn add_agent_rules(
    dp: &mut DesiredDataplane,
    s: &NodeSettings,
    node_addrs: BTreeSet<String>,
    held: BTreeSet<String>,
) {
    // Both tables are always synced, so turning a feature off (NAT outgoing) removes
    // its chains instead of leaving them behind in a table nobody looks at.
    for t in ["filter", "nat"] {
        dp.tables.entry(t.into()).or_default();
    }
    if !held.is_empty() {
        let filter = dp.tables.entry("filter".into()).or_default();
        let mut chain = Chain::new(CHAIN_HELD);
        for iface in &held {
            chain.push(format!("-o {iface} -j DROP"));
            chain.push(format!("-i {iface} -j DROP"));
        }
        filter.chains.push(chain);
        let jump = format!("-m conntrack --ctstate NEW -j {CHAIN_HELD}");
        hook(filter, "FORWARD", "SLUICE-FORWARD", vec![jump.clone()]);
        hook(filter, "INPUT", "SLUICE-INPUT", vec![jump]);
    }
    dp.sets
        .push(IpSet::new(SET_NODES, SetKind::HashIp).with(node_addrs));
    dp.sets
        .push(IpSet::new(SET_POOLS, SetKind::HashNet).with([s.pool.to_string()]));

    let pod_ifaces = [sluice_cni::veth::K8S_PREFIX, sluice_cni::veth::OTHER_PREFIX];
    if let Some(tunnel) = s.tunnel.match_text() {
        let filter = dp.tables.entry("filter".into()).or_default();
        let mut guard = Chain::new(CHAIN_TUNNEL_IN);
        for p in pod_ifaces {
            guard.push(format!("-i {p}+ -j DROP"));
        }
        guard.push(format!("-m set --match-set {SET_NODES} src -j RETURN"));
        guard.push("-j DROP");
        filter.chains.push(guard);
        hook(
            filter,
            "INPUT",
            "SLUICE-INPUT",
            vec![format!("{tunnel} -j {CHAIN_TUNNEL_IN}")],
        );
        // A pod must not reach another node's tunnel endpoint with a hand-made
        // encapsulated packet either.
        let fwd = pod_ifaces
            .iter()
            .map(|p| format!("-i {p}+ {tunnel} -j DROP"))
            .collect();
        hook(filter, "FORWARD", "SLUICE-FORWARD", fwd);
    }
    if s.nat_outgoing {
        let nat = dp.tables.entry("nat".into()).or_default();
        nat.chains.push(Chain::new(CHAIN_NAT_OUTGOING).rule(format!(
            "-m set --match-set {SET_POOLS} src -m set ! --match-set {SET_POOLS} dst \
             -m set ! --match-set {SET_NODES} dst -j MASQUERADE"
        )));
        hook(
            nat,
            "POSTROUTING",
            "SLUICE-POSTROUTING",
            vec![format!("-j {CHAIN_NAT_OUTGOING}")],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::Snapshot;
    use crate::datastore::objects::{convert, parse_manifest_text};
    use sluice_policy::RejectedPolicy;

    const WORLD: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}, {type: Hostname, address: node-1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: prod, labels: {app: web}}
spec: {nodeName: node-2, containers: [{name: c, image: x}]}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: prod}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: prod}
spec: {podSelector: {}}
"#;

    fn snapshot(extra: &str) -> Snapshot {
        let objs = parse_manifest_text("test", &format!("{WORLD}\n---\n{extra}")).unwrap();
        let conv = convert(&objs);
        assert!(conv.skipped.is_empty(), "{:?}", conv.skipped);
        Snapshot {
            cluster: conv.cluster,
            blocks: [
                ("10.244.1.0/24".parse().unwrap(), "node-1".to_string()),
                ("10.244.2.0/24".parse().unwrap(), "node-2".to_string()),
                ("10.244.9.0/24".parse().unwrap(), "node-gone".to_string()),
            ]
            .into(),
        }
    }

    fn settings() -> NodeSettings {
        NodeSettings {
            node: "node-1".into(),
            pool: "10.244.0.0/16".parse().unwrap(),
            tunnel: TunnelFilter::Ipip,
            nat_outgoing: true,
            node_ip: None,
        }
    }

    fn chain<'a>(d: &'a Desired, table: &str, name: &str) -> &'a Chain {
        d.dataplane.tables[table]
            .chains
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no chain {name}"))
    }

    #[test]
    fn blocks_routes_and_local_pods_come_from_the_snapshot() {
        let d = desired(&snapshot(""), &settings()).unwrap();
        assert_eq!(d.node_ip, Some("192.168.0.1".parse().unwrap()));
        assert_eq!(
            d.own_blocks,
            vec!["10.244.1.0/24".parse::<Ipv4Net>().unwrap()]
        );
        let routed: Vec<_> = d
            .blocks
            .iter()
            .map(|b| (b.block.to_string(), b.node_ip.to_string()))
            .collect();
        assert_eq!(
            routed,
            [
                ("10.244.1.0/24".into(), "192.168.0.1".into()),
                ("10.244.2.0/24".into(), "192.168.0.2".to_string())
            ]
        );
        assert!(
            d.warnings.iter().any(|w| w.contains("node-gone")),
            "{:?}",
            d.warnings
        );
        // Only local pods with an address are waited for.
        assert_eq!(d.local_pods, [NamespacedName::new("prod", "web")].into());
    }

    #[test]
    fn node_set_holds_every_node_and_nat_skips_pool_and_nodes() {
        let d = desired(&snapshot(""), &settings()).unwrap();
        let nodes = d
            .dataplane
            .sets
            .iter()
            .find(|s| s.name == SET_NODES)
            .unwrap();
        assert_eq!(
            nodes.members.iter().cloned().collect::<Vec<_>>(),
            ["192.168.0.1", "192.168.0.2"]
        );
        let nat = chain(&d, "nat", CHAIN_NAT_OUTGOING);
        assert_eq!(
            nat.rules,
            [
                "-m set --match-set SLUICE-POOLS src -m set ! --match-set SLUICE-POOLS dst \
              -m set ! --match-set SLUICE-NODES dst -j MASQUERADE"
            ]
        );
        // The only nat rule sluice has: nothing that could SNAT traffic to a pod, and
        // no rule anywhere that names a tunnel address.
        let all: Vec<&String> = d
            .dataplane
            .tables
            .values()
            .flat_map(|t| t.chains.iter())
            .flat_map(|c| c.rules.iter())
            .collect();
        assert!(
            all.iter()
                .filter(|r| r.contains("MASQUERADE") || r.contains("SNAT"))
                .count()
                == 1
        );
        assert!(
            !all.iter()
                .any(|r| r.contains("tunl0") || r.contains("10.244.1.0/32"))
        );
    }

    #[test]
    fn tunnel_guard_joins_the_policy_input_chain_with_one_jump_per_builtin() {
        let d = desired(&snapshot(""), &settings()).unwrap();
        let filter = &d.dataplane.tables["filter"];
        for builtin in ["INPUT", "FORWARD"] {
            assert_eq!(
                filter.jumps.iter().filter(|j| j.from == builtin).count(),
                1,
                "{builtin}"
            );
        }
        let input_target = filter
            .jumps
            .iter()
            .find(|j| j.from == "INPUT")
            .unwrap()
            .target()
            .unwrap();
        assert_eq!(
            chain(&d, "filter", input_target).rules[0],
            format!("-p 4 -j {CHAIN_TUNNEL_IN}")
        );
        assert_eq!(
            chain(&d, "filter", CHAIN_TUNNEL_IN).rules,
            [
                "-i slc+ -j DROP",
                "-i slx+ -j DROP",
                "-m set --match-set SLUICE-NODES src -j RETURN",
                "-j DROP"
            ]
        );
        let fwd_target = filter
            .jumps
            .iter()
            .find(|j| j.from == "FORWARD")
            .unwrap()
            .target()
            .unwrap();
        assert!(
            chain(&d, "filter", fwd_target).rules[..2]
                .iter()
                .all(|r| r.ends_with("-p 4 -j DROP"))
        );
    }

    #[test]
    fn vxlan_guards_its_port_and_none_guards_nothing() {
        let mut s = settings();
        s.tunnel = TunnelFilter::Vxlan { port: 4799 };
        let d = desired(&snapshot(""), &s).unwrap();
        let input = d.dataplane.tables["filter"]
            .jumps
            .iter()
            .find(|j| j.from == "INPUT")
            .unwrap()
            .target()
            .unwrap();
        assert_eq!(
            chain(&d, "filter", input).rules[0],
            format!("-p udp -m udp --dport 4799 -j {CHAIN_TUNNEL_IN}")
        );
        s.tunnel = TunnelFilter::None;
        let d = desired(&snapshot(""), &s).unwrap();
        assert!(
            d.dataplane.tables["filter"]
                .chains
                .iter()
                .all(|c| c.name != CHAIN_TUNNEL_IN)
        );
    }

    #[test]
    fn rejected_policy_holds_exactly_the_pods_it_selects() {
        let mut snap = snapshot("");
        snap.cluster.rejected_policies.insert(
            NamespacedName::new("prod", "broken"),
            RejectedPolicy {
                reason: "except outside cidr".into(),
                pod_selector: Some(LabelSelector::from_labels([("app", "web")])),
            },
        );
        let d = desired(&snap, &settings()).unwrap();
        let veth = VethNames.host_veth(&snap.cluster.pods[&NamespacedName::new("prod", "web")]);
        // `far` runs on node-2: not ours to hold.
        assert_eq!(
            chain(&d, "filter", CHAIN_HELD).rules,
            [format!("-o {veth} -j DROP"), format!("-i {veth} -j DROP")]
        );
        assert!(
            d.warnings
                .iter()
                .any(|w| w.contains("prod/broken") && w.contains("except outside cidr"))
        );
        let fwd = d.dataplane.tables["filter"]
            .jumps
            .iter()
            .find(|j| j.from == "FORWARD")
            .unwrap()
            .target()
            .unwrap();
        // Ahead of every allow in the chain FORWARD jumps to.
        let rules = &chain(&d, "filter", fwd).rules;
        let held_at = rules
            .iter()
            .position(|r| r == &format!("-m conntrack --ctstate NEW -j {CHAIN_HELD}"))
            .unwrap();
        let first_accept = rules
            .iter()
            .position(|r| r.contains("ACCEPT") || r.contains("-g ") || r.contains("-j SLUICE-FWD"))
            .unwrap();
        assert!(held_at < first_accept, "{rules:#?}");

        // Unreadable selector: the whole namespace, by wildcard.
        snap.cluster
            .rejected_policies
            .values_mut()
            .for_each(|r| r.pod_selector = None);
        let d = desired(&snap, &settings()).unwrap();
        let prefix = VethNames.namespace_prefix("prod");
        assert_eq!(
            chain(&d, "filter", CHAIN_HELD).rules[0],
            format!("-o {prefix}+ -j DROP")
        );
    }

    #[test]
    fn invalid_policy_in_manifests_is_rejected_with_its_name() {
        let snap = snapshot(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: prod}\n\
             spec: {podSelector: {matchLabels: {app: web}}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}]}]}\n",
        );
        let r = &snap.cluster.rejected_policies[&NamespacedName::new("prod", "bad")];
        assert!(r.pod_selector.is_some());
        assert!(
            desired(&snap, &settings()).unwrap().dataplane.tables["filter"]
                .chains
                .iter()
                .any(|c| c.name == CHAIN_HELD)
        );
    }

    #[test]
    fn desired_state_is_deterministic() {
        let a = desired(&snapshot(""), &settings()).unwrap();
        let b = desired(&snapshot(""), &settings()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn node_ip_flag_overrides_the_node_object() {
        let mut s = settings();
        s.node_ip = Some("10.9.9.9".parse().unwrap());
        let d = desired(&snapshot(""), &s).unwrap();
        assert_eq!(d.node_ip, s.node_ip);
        assert!(
            d.dataplane
                .sets
                .iter()
                .find(|x| x.name == SET_NODES)
                .unwrap()
                .members
                .contains("10.9.9.9")
        );
    }
}
