//! A scenario's cluster laid out in the lab so that the addresses it names are real.
//!
//! A scenario gives its nodes addresses (`status.addresses`) and its pods addresses
//! (`status.podIP`), and its policies and probes name them. The lab can reproduce
//! both (issue 12): `lab up --node-ips` (and `--underlay` when one /24 does not hold
//! them) gives node-i the scenario's i-th node address, and a pod asks for its
//! address with `sluice.dev/ip-addrs` (from the pool, through IPAM: its node claims
//! the block) or `sluice.dev/ip-addrs-no-ipam` (used as given). Deciding is pure
//! ([`plan_nodes`], [`plan_pods`]); the scenario runner does the lab calls.
//!
//! What cannot be honoured is said, never guessed around: such a pod keeps an IPAM
//! address (the runner rewrites `/32`s naming it, as before), and the probes that need
//! the scenario's address are skipped with the reason given here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::fixture::Fixture;

/// The lab's block size (`lab up`'s conflist: `blockSize` 24).
pub const BLOCK_PREFIX: u8 = 24;

/// The annotations a pod asks for its address with (issue 12; exact names).
pub const IP_ADDRS: &str = "sluice.dev/ip-addrs";
pub const IP_ADDRS_NO_IPAM: &str = "sluice.dev/ip-addrs-no-ipam";

/// How the lab's nodes are addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nodes {
    /// node-i gets `ips[i]`; `underlay` is given when the /24 of the first address
    /// (the lab's default) does not hold them all.
    Exact {
        ips: Vec<Ipv4Addr>,
        underlay: Option<Ipv4Net>,
    },
    /// The lab's own addresses (192.168.77.0/24), and why not the scenario's.
    Default { why: String },
}

impl Nodes {
    /// `lab up` arguments for `count` nodes.
    pub fn up_args(&self, count: usize) -> Vec<String> {
        match self {
            Nodes::Exact { ips, underlay } => {
                let list: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
                let mut v = vec!["--node-ips".to_string(), list.join(",")];
                if let Some(u) = underlay {
                    v.extend(["--underlay".to_string(), u.to_string()]);
                }
                v
            }
            Nodes::Default { .. } => vec!["--nodes".to_string(), count.to_string()],
        }
    }
}

/// The narrowest network from /24 up to /16 that holds every address, if any.
fn covering(ips: &[Ipv4Addr]) -> Option<Ipv4Net> {
    let first = *ips.first()?;
    (16..=24)
        .rev()
        .map(|p| Ipv4Net::new(first, p).expect("prefix ≤ 32").trunc())
        .find(|n| ips.iter().all(|ip| n.contains(ip)))
}

/// The node layout for a lab of `count` nodes (at least the scenario's): the
/// scenario's node addresses in its order, the lab's extra nodes on the highest free
/// host addresses of the same underlay (so the gateway, the lowest free one, stays
/// clear of them).
pub fn plan_nodes(fx: &Fixture, count: usize, pool: Ipv4Net) -> Nodes {
    let default = |why: String| Nodes::Default { why };
    if fx.nodes.is_empty() {
        return default("the scenario names no nodes".into());
    }
    let mut ips = Vec::new();
    for n in &fx.nodes {
        match fx.node_ip.get(n) {
            Some(ip) if ips.contains(ip) => {
                return default(format!("scenario nodes share the address {ip}"));
            }
            Some(ip) => ips.push(*ip),
            None => return default(format!("scenario node {n} has no IPv4 address")),
        }
    }
    let Some(underlay) = covering(&ips) else {
        return default(format!(
            "the scenario's node addresses {ips:?} are not within one /16"
        ));
    };
    if underlay.contains(&pool.network()) || pool.contains(&underlay.network()) {
        return default(format!(
            "the scenario's node network {underlay} overlaps the lab's pod pool {pool}"
        ));
    }
    if let Some(ip) = ips
        .iter()
        .find(|ip| **ip == underlay.network() || **ip == underlay.broadcast())
    {
        return default(format!(
            "node address {ip} is not a host address of {underlay}"
        ));
    }
    let used: BTreeSet<Ipv4Addr> = ips.iter().copied().collect();
    let mut spare = underlay
        .hosts()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .filter(|h| !used.contains(h));
    while ips.len() < count {
        match spare.next() {
            Some(h) => ips.push(h),
            None => return default(format!("{count} nodes do not fit {underlay}")),
        }
    }
    let lab_default = Ipv4Net::new(ips[0], 24).expect("24").trunc();
    Nodes::Exact {
        underlay: (underlay != lab_default).then_some(underlay),
        ips,
    }
}

/// Which annotation a pod asks for its address with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// `sluice.dev/ip-addrs`: inside the pool, in a block the pod's node can claim.
    Ipam,
    /// `sluice.dev/ip-addrs-no-ipam`: anything else the lab can route.
    NoIpam,
}

impl Pin {
    pub fn annotation(self) -> &'static str {
        match self {
            Pin::Ipam => IP_ADDRS,
            Pin::NoIpam => IP_ADDRS_NO_IPAM,
        }
    }
}

/// What the lab already is when pods are planned (after `lab up`).
#[derive(Debug, Clone)]
pub struct LabFacts {
    pub pool: Ipv4Net,
    pub underlay: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Uplink address → lab node.
    pub uplinks: BTreeMap<Ipv4Addr, String>,
    /// Block → the lab node that claimed it.
    pub claims: BTreeMap<Ipv4Net, String>,
}

/// Each scenario pod's address: asked for with an annotation, or refused with why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pods {
    pub pins: BTreeMap<String, (Ipv4Addr, Pin)>,
    pub refused: BTreeMap<String, String>,
}

/// Why `ip` cannot be a pod's address in this lab, if so (`node` is the pod's lab
/// node, when the scenario names it).
fn unusable(ip: Ipv4Addr, facts: &LabFacts) -> Option<String> {
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
        return Some(format!("{ip} is not a unicast host address"));
    }
    if ip == facts.gateway {
        return Some(format!("{ip} is the lab's gateway"));
    }
    if let Some(n) = facts.uplinks.get(&ip) {
        return Some(format!("{ip} is {n}'s uplink address"));
    }
    if facts.underlay.contains(&ip) {
        return Some(format!(
            "{ip} is inside the lab's underlay {}, which the gateway reaches directly, not through a node",
            facts.underlay
        ));
    }
    if facts.pool.contains(&ip) {
        let block = Ipv4Net::new(ip, BLOCK_PREFIX).expect("prefix").trunc();
        if ip == block.network() || ip == block.broadcast() {
            return Some(format!(
                "{ip} is the network or broadcast address of block {block}"
            ));
        }
        if u32::from(ip) == u32::from(block.network()) + 1 {
            return Some(format!(
                "{ip} is block {block}'s tunnel address, which IPAM keeps for a node"
            ));
        }
    }
    None
}

/// Each scenario pod with an address gets it: `sluice.dev/ip-addrs` when the address
/// is in the pool and its block is free or already its node's, and no scenario pod
/// on another node (or on no named node) shares the block; `ip-addrs-no-ipam`
/// otherwise. Refused: addresses [`unusable`] names, and a second pod with the same
/// address.
pub fn plan_pods(fx: &Fixture, facts: &LabFacts) -> Pods {
    let mut out = Pods::default();
    let block_of = |ip: Ipv4Addr| Ipv4Net::new(ip, BLOCK_PREFIX).expect("prefix").trunc();
    let lab_node = |pod: &str| fx.pod_nodes.get(pod).map(|n| fx.map_node(n));
    // Block → the lab nodes of the scenario pods in it (None: a pod with no node).
    let mut sharers: BTreeMap<Ipv4Net, BTreeSet<Option<String>>> = BTreeMap::new();
    for (pod, ip) in &fx.pod_ips {
        if let Ok(ip) = ip.parse::<Ipv4Addr>()
            && facts.pool.contains(&ip)
        {
            sharers
                .entry(block_of(ip))
                .or_default()
                .insert(lab_node(pod));
        }
    }
    let mut taken: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for pod in &fx.pods {
        let Some(text) = fx.pod_ips.get(pod) else {
            continue;
        };
        let Ok(ip) = text.parse::<Ipv4Addr>() else {
            out.refused
                .insert(pod.clone(), format!("{text:?} is not an IPv4 address"));
            continue;
        };
        if let Some(other) = taken.get(&ip) {
            out.refused
                .insert(pod.clone(), format!("{ip} is {other}'s address too"));
            continue;
        }
        if let Some(why) = unusable(ip, facts) {
            out.refused.insert(pod.clone(), why);
            continue;
        }
        taken.insert(ip, pod.clone());
        let pin = match lab_node(pod) {
            Some(node) if facts.pool.contains(&ip) => {
                let block = block_of(ip);
                let claimable = facts.claims.get(&block).is_none_or(|n| *n == node);
                let alone = sharers[&block].iter().all(|n| n.as_ref() == Some(&node));
                if claimable && alone {
                    Pin::Ipam
                } else {
                    Pin::NoIpam
                }
            }
            _ => Pin::NoIpam,
        };
        out.pins.insert(pod.clone(), (ip, pin));
    }
    out
}

/// A cluster file's text with each pinned pod annotated for its address (its other
/// annotations kept), or `None` when it holds no pinned pod (the file is then used
/// as it is).
pub fn annotate(text: &str, pins: &BTreeMap<String, (Ipv4Addr, Pin)>) -> Option<String> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(text) {
        let v = serde_json::Value::deserialize(de).expect("valid YAML");
        if v["kind"].as_str().is_some_and(|k| k.ends_with("List")) {
            docs.extend(v["items"].as_array().cloned().unwrap_or_default());
        } else if !v.is_null() {
            docs.push(v);
        }
    }
    let mut changed = false;
    for v in &mut docs {
        if v["kind"] != "Pod" {
            continue;
        }
        let key = format!(
            "{}/{}",
            v["metadata"]["namespace"].as_str().unwrap_or("default"),
            v["metadata"]["name"].as_str().unwrap_or_default()
        );
        if let Some((ip, pin)) = pins.get(&key) {
            let meta = v["metadata"].as_object_mut().expect("pod metadata");
            let ann = meta
                .entry("annotations")
                .or_insert_with(|| serde_json::json!({}));
            ann[pin.annotation()] = serde_json::Value::String(format!("[\"{ip}\"]"));
            changed = true;
        }
    }
    changed.then(|| {
        docs.iter()
            .map(|d| serde_yaml_ng::to_string(d).expect("YAML"))
            .collect::<Vec<_>>()
            .join("---\n")
    })
}

/// What the lab made of a scenario's cluster, once it is applied: what the probe
/// router needs to send a probe from, or to, the address the scenario names.
#[derive(Debug, Clone)]
pub struct Layout {
    pub nodes: Nodes,
    pub pods: Pods,
    pub pool: Ipv4Net,
    /// The underlay and its gateway (`None` when not read from a lab).
    pub underlay: Option<(Ipv4Net, Ipv4Addr)>,
    /// Each lab node's uplink and tunnel address → (node, its namespace).
    pub node_addrs: BTreeMap<Ipv4Addr, (String, String)>,
}

impl Layout {
    /// A lab not laid out from a scenario: the default pool, nothing pinned.
    pub fn unplanned(pool: Ipv4Net) -> Layout {
        Layout {
            nodes: Nodes::Default {
                why: "the lab was not laid out from a scenario".into(),
            },
            pods: Pods::default(),
            pool,
            underlay: None,
            node_addrs: BTreeMap::new(),
        }
    }

    /// Whether the scenario's node addresses are the lab nodes' own.
    pub fn nodes_exact(&self) -> Result<(), &str> {
        match &self.nodes {
            Nodes::Exact { .. } => Ok(()),
            Nodes::Default { why } => Err(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn fixture(nodes: &[(&str, &str)], pods: &[(&str, &str, &str)]) -> Fixture {
        let mut fx = Fixture::default();
        for (n, a) in nodes {
            fx.nodes.push(n.to_string());
            fx.node_ips.push(a.to_string());
            fx.node_ip.insert(n.to_string(), ip(a));
        }
        for (p, node, a) in pods {
            fx.pods.push(p.to_string());
            fx.pod_ips.insert(p.to_string(), a.to_string());
            if !node.is_empty() {
                fx.pod_nodes.insert(p.to_string(), node.to_string());
            }
        }
        fx
    }

    fn facts() -> LabFacts {
        LabFacts {
            pool: net("10.244.0.0/16"),
            underlay: net("192.168.100.0/24"),
            gateway: ip("192.168.100.3"),
            uplinks: [
                (ip("192.168.100.1"), "node-1".into()),
                (ip("192.168.100.2"), "node-2".into()),
            ]
            .into(),
            claims: [
                (net("10.244.131.0/24"), "node-1".into()),
                (net("10.244.22.0/24"), "node-2".into()),
            ]
            .into(),
        }
    }

    #[test]
    fn scenario_node_addresses_become_node_ips_and_extra_nodes_take_the_top_of_the_underlay() {
        let pool = net("10.244.0.0/16");
        let fx = fixture(&[("a", "192.168.100.1")], &[]);
        assert_eq!(
            plan_nodes(&fx, 2, pool),
            Nodes::Exact {
                ips: vec![ip("192.168.100.1"), ip("192.168.100.254")],
                underlay: None
            }
        );
        assert_eq!(
            plan_nodes(&fx, 2, pool).up_args(2),
            ["--node-ips", "192.168.100.1,192.168.100.254"]
        );
    }

    #[test]
    fn node_addresses_across_several_24s_get_an_underlay_that_holds_them() {
        let fx = fixture(&[("a", "10.10.1.5"), ("b", "10.10.2.5")], &[]);
        let n = plan_nodes(&fx, 2, net("10.244.0.0/16"));
        assert_eq!(
            n.up_args(2),
            [
                "--node-ips",
                "10.10.1.5,10.10.2.5",
                "--underlay",
                "10.10.0.0/22"
            ]
        );
    }

    #[test]
    fn node_addresses_the_lab_cannot_use_keep_its_default_layout_with_the_reason() {
        let pool = net("10.244.0.0/16");
        for (nodes, why) in [
            (
                vec![("a", "10.244.9.1"), ("b", "10.244.9.2")],
                "overlaps the lab's pod pool",
            ),
            (
                vec![("a", "10.1.0.1"), ("b", "10.2.0.1")],
                "not within one /16",
            ),
            (
                vec![("a", "10.1.0.1"), ("b", "10.1.0.1")],
                "share the address",
            ),
        ] {
            match plan_nodes(&fixture(&nodes, &[]), 2, pool) {
                Nodes::Default { why: w } => assert!(w.contains(why), "{w}"),
                other => panic!("{nodes:?}: {other:?}"),
            }
        }
        let mut fx = fixture(&[("a", "10.1.0.1")], &[]);
        fx.nodes.push("b".into());
        assert!(
            matches!(plan_nodes(&fx, 2, pool), Nodes::Default { why } if why.contains("b has no IPv4"))
        );
    }

    #[test]
    fn pool_addresses_in_a_block_their_node_can_claim_go_through_ipam_and_the_rest_bypass_it() {
        let fx = fixture(
            &[("n1", "192.168.100.1"), ("n2", "192.168.100.2")],
            &[
                ("x/a", "n1", "10.244.1.10"),
                ("x/b", "n1", "10.244.1.11"),
                ("x/c", "n2", "10.244.2.10"),
                // node-1 already holds 10.244.131.0/24: node-2 cannot claim it.
                ("x/d", "n2", "10.244.131.7"),
                // A block shared by pods of two nodes: neither can own it.
                ("y/a", "n1", "10.244.5.10"),
                ("y/b", "n2", "10.244.5.11"),
                // Outside the pool.
                ("z/a", "n2", "172.16.4.8"),
                // No node named: the block's owner is not known in advance.
                ("z/b", "", "10.244.7.7"),
            ],
        );
        let p = plan_pods(&fx, &facts());
        let pin = |k: &str| p.pins[k].1;
        assert_eq!(pin("x/a"), Pin::Ipam);
        assert_eq!(pin("x/b"), Pin::Ipam);
        assert_eq!(pin("x/c"), Pin::Ipam);
        assert_eq!(pin("x/d"), Pin::NoIpam);
        assert_eq!(pin("y/a"), Pin::NoIpam);
        assert_eq!(pin("y/b"), Pin::NoIpam);
        assert_eq!(pin("z/a"), Pin::NoIpam);
        assert_eq!(pin("z/b"), Pin::NoIpam);
        assert!(p.refused.is_empty(), "{:?}", p.refused);
    }

    #[test]
    fn pod_addresses_the_lab_cannot_honour_are_refused_with_a_precise_reason() {
        let fx = fixture(
            &[("n1", "192.168.100.1")],
            &[
                ("x/gw", "n1", "192.168.100.3"),
                ("x/node", "n1", "192.168.100.2"),
                ("x/underlay", "n1", "192.168.100.77"),
                ("x/tunnel", "n1", "10.244.4.1"),
                ("x/net", "n1", "10.244.4.0"),
                ("x/one", "n1", "172.16.0.9"),
                ("x/two", "n1", "172.16.0.9"),
                ("x/bad", "n1", "fd00::1"),
            ],
        );
        let p = plan_pods(&fx, &facts());
        let why = |k: &str| p.refused[k].clone();
        assert!(why("x/gw").contains("the lab's gateway"));
        assert!(why("x/node").contains("node-2's uplink address"));
        assert!(why("x/underlay").contains("inside the lab's underlay"));
        assert!(why("x/tunnel").contains("tunnel address"));
        assert!(why("x/net").contains("network or broadcast"));
        assert!(why("x/two").contains("x/one's address too"));
        assert!(why("x/bad").contains("not an IPv4 address"));
        assert_eq!(p.pins.keys().collect::<Vec<_>>(), ["x/one"]);
    }

    #[test]
    fn annotating_keeps_other_annotations_and_leaves_files_without_pinned_pods_alone() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: x}}\n\
                    - {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: x, annotations: {keep: me}}, spec: {containers: [{name: c}]}}\n";
        let pins: BTreeMap<String, (Ipv4Addr, Pin)> =
            [("x/a".to_string(), (ip("10.244.1.10"), Pin::Ipam))].into();
        let out = annotate(text, &pins).expect("a pinned pod");
        let docs: Vec<serde_json::Value> = out
            .split("---\n")
            .map(|d| serde_yaml_ng::from_str(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1]["metadata"]["annotations"]["keep"], "me");
        assert_eq!(
            docs[1]["metadata"]["annotations"][IP_ADDRS],
            "[\"10.244.1.10\"]"
        );
        assert_eq!(annotate(text, &BTreeMap::new()), None);
    }
}
