//! The compiled dataplane, executed in-process as a packet classifier, agrees with the
//! reference evaluator on random clusters, policies and probes.
//!
//! Each random cluster has two nodes. Every node's ruleset is compiled, and each probe
//! is walked along the path a real packet takes: out of the source pod's veth on its
//! node (FORWARD, or INPUT when it is addressed to that node), over the tunnel, into
//! the destination pod's veth on its node (FORWARD; OUTPUT when the node itself sends).
//! The connection is allowed when every hop accepts its first (NEW) packet.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;
use sluice_policy::classify::{Hook, Packet, Verdict as Hop, classify};
use sluice_policy::compile::{CtState, InterfaceNames, Ruleset, Table, compile};
use sluice_policy::evaluate::{Endpoint, Probe, Resolved, Verdict, evaluate};
use sluice_policy::model::*;
use sluice_policy::names::hash16;
use sluice_policy::selector::{LabelSelector, Operator, Requirement};

/// Interface names of the same shape as the CNI plugin's (`slc` + 4 + 8 hex), made
/// from this crate's hash; the real rule lives in `sluice_cni::veth`.
struct FakeVeths;

impl InterfaceNames for FakeVeths {
    fn host_veth(&self, pod: &Pod) -> String {
        let pod_part = &hash16(format!("{}.{}", pod.namespace, pod.name).as_bytes())[..8];
        format!("{}{pod_part}", self.namespace_prefix(&pod.namespace))
    }
    fn namespace_prefix(&self, namespace: &str) -> String {
        format!("slc{}", &hash16(namespace.as_bytes())[..4])
    }
}

const NODES: [(&str, Ipv4Addr); 2] = [
    ("node-a", Ipv4Addr::new(10, 0, 0, 1)),
    ("node-b", Ipv4Addr::new(10, 0, 0, 2)),
];
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const UPLINK: &str = "eth0";
const TUNNEL: &str = "tunl0";

fn labels_from(pairs: Vec<(&'static str, &'static str)>) -> Labels {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn arb_pod_labels() -> impl Strategy<Value = Labels> {
    (
        prop::option::of(prop::sample::select(vec!["a", "b", "c"])),
        prop::option::of(prop::sample::select(vec!["fe", "be"])),
    )
        .prop_map(|(app, tier)| {
            let mut l = Vec::new();
            if let Some(a) = app {
                l.push(("app", a));
            }
            if let Some(t) = tier {
                l.push(("tier", t));
            }
            labels_from(l)
        })
}

fn arb_ns_labels() -> impl Strategy<Value = Labels> {
    (
        prop::option::of(prop::sample::select(vec!["bar", "foo"])),
        any::<bool>(),
    )
        .prop_map(|(region, team)| {
            let mut l = Vec::new();
            if let Some(r) = region {
                l.push(("region", r));
            }
            if team {
                l.push(("team", "t1"));
            }
            labels_from(l)
        })
}

fn arb_selector(keys: &'static [&'static str], values: &'static [&'static str]) -> impl Strategy<Value = LabelSelector> {
    let key = prop::sample::select(keys.to_vec());
    let value = prop::sample::select(values.to_vec());
    let op = prop_oneof![
        prop::collection::btree_set(value.clone().prop_map(String::from), 1..3).prop_map(Operator::In),
        prop::collection::btree_set(value.clone().prop_map(String::from), 1..3).prop_map(Operator::NotIn),
        Just(Operator::Exists),
        Just(Operator::DoesNotExist),
    ];
    (
        prop::collection::btree_map(key.clone().prop_map(String::from), value.prop_map(String::from), 0..2),
        prop::collection::vec(
            (key, op).prop_map(|(k, operator)| Requirement { key: k.to_string(), operator }),
            0..2,
        ),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector { match_labels, match_expressions })
}

fn arb_pod_selector() -> impl Strategy<Value = LabelSelector> {
    arb_selector(&["app", "tier"], &["a", "b", "c", "fe", "be"])
}

fn arb_ns_selector() -> impl Strategy<Value = LabelSelector> {
    arb_selector(&["region", "team", NAMESPACE_NAME_LABEL], &["bar", "foo", "t1", "x", "y"])
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

fn arb_ip_block() -> impl Strategy<Value = IpBlock> {
    prop::sample::select(vec![
        ("10.244.0.0/16", vec!["10.244.1.0/24"]),
        ("0.0.0.0/0", vec!["10.244.0.0/24"]),
        ("0.0.0.0/0", vec!["128.0.0.0/1", "10.0.0.0/8"]),
        ("192.168.1.0/24", vec![]),
        ("10.0.0.1/32", vec![]),
        ("10.244.0.0/24", vec!["10.244.0.2/32", "10.244.0.3/32"]),
    ])
    .prop_map(|(cidr, except)| IpBlock {
        cidr: net(cidr),
        except: except.into_iter().map(net).collect(),
    })
}

fn arb_peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        3 => (prop::option::of(arb_ns_selector()), arb_pod_selector()).prop_map(|(ns, pods)| Peer::Pods(PodPeer {
            namespaces: match ns {
                None => NamespaceScope::PolicyNamespace,
                Some(sel) => NamespaceScope::Matching(sel),
            },
            pods,
        })),
        2 => arb_ip_block().prop_map(Peer::IpBlock),
    ]
}

fn arb_protocol() -> impl Strategy<Value = Protocol> {
    prop::sample::select(Protocol::ALL.to_vec())
}

fn arb_policy_port() -> impl Strategy<Value = PolicyPort> {
    let port = prop_oneof![
        Just(PortMatch::All),
        Just(PortMatch::Numbers { start: 80, end: 80 }),
        Just(PortMatch::Numbers { start: 80, end: 81 }),
        Just(PortMatch::Numbers { start: 53, end: 53 }),
        Just(PortMatch::Named("http".into())),
        Just(PortMatch::Named("dns".into())),
    ];
    (arb_protocol(), port).prop_map(|(protocol, port)| PolicyPort { protocol, port })
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    (
        prop_oneof![
            1 => Just(Peers::Any),
            3 => prop::collection::vec(arb_peer(), 1..3).prop_map(Peers::Listed),
        ],
        prop_oneof![
            1 => Just(Ports::Any),
            2 => prop::collection::vec(arb_policy_port(), 1..3).prop_map(Ports::Listed),
        ],
    )
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

fn arb_policy(index: usize) -> impl Strategy<Value = NetworkPolicy> {
    (
        prop::sample::select(NAMESPACES.to_vec()),
        arb_pod_selector(),
        prop::collection::vec(arb_rule(), 0..3),
        prop::collection::vec(arb_rule(), 0..3),
        prop_oneof![
            Just(None),
            Just(Some(vec![PolicyType::Ingress])),
            Just(Some(vec![PolicyType::Egress])),
            Just(Some(vec![PolicyType::Ingress, PolicyType::Egress])),
        ],
    )
        .prop_map(move |(ns, pod_selector, ingress, egress, declared)| {
            let policy_types = PolicyTypes::defaulted(declared.as_deref(), !egress.is_empty());
            NetworkPolicy {
                namespace: ns.to_string(),
                name: format!("np{index}"),
                pod_selector,
                ingress,
                egress,
                policy_types,
            }
        })
}

fn arb_container_ports() -> impl Strategy<Value = Vec<ContainerPort>> {
    prop::sample::subsequence(
        vec![
            (Some("http"), 80, Protocol::Tcp),
            (Some("http"), 81, Protocol::Udp),
            (Some("http"), 81, Protocol::Sctp),
            (Some("dns"), 53, Protocol::Udp),
            (Some("dns"), 53, Protocol::Tcp),
            (None, 9090, Protocol::Tcp),
        ],
        0..3,
    )
    .prop_map(|v| {
        v.into_iter()
            .map(|(name, port, protocol)| ContainerPort { name: name.map(String::from), port, protocol })
            .collect()
    })
}

fn arb_cluster() -> impl Strategy<Value = Cluster> {
    let pods = prop::collection::vec(
        (
            prop::sample::select(NAMESPACES.to_vec()),
            arb_pod_labels(),
            0..NODES.len(),
            prop::bool::weighted(0.1),
            arb_container_ports(),
        ),
        1..7,
    );
    let policies = (0..5usize).prop_flat_map(|n| (0..n).map(arb_policy).collect::<Vec<_>>());
    (prop::collection::vec(arb_ns_labels(), 3), pods, policies).prop_map(|(ns_labels, pods, policies)| {
        let mut c = Cluster::default();
        for (name, labels) in NAMESPACES.iter().zip(ns_labels) {
            c.add_namespace(Namespace { name: name.to_string(), labels });
        }
        for (name, ip) in NODES {
            c.add_node(Node { name: name.into(), addresses: vec![IpAddr::V4(ip)] });
        }
        for (i, (ns, labels, node, host_network, ports)) in pods.into_iter().enumerate() {
            let ip = if host_network {
                NODES[node].1
            } else {
                Ipv4Addr::new(10, 244, node as u8, i as u8 + 2)
            };
            c.add_pod(Pod {
                namespace: ns.to_string(),
                name: format!("p{i}"),
                labels,
                ips: vec![IpAddr::V4(ip)],
                node: Some(NODES[node].0.to_string()),
                ports,
                host_network,
            });
        }
        for p in policies {
            c.add_policy(p);
        }
        c
    })
}

fn arb_endpoint_index() -> impl Strategy<Value = usize> {
    0..12usize
}

/// Endpoints to probe from/to: the cluster's pods, both nodes, outside addresses.
fn endpoints(c: &Cluster, source: bool) -> Vec<Endpoint> {
    let mut e: Vec<Endpoint> = c.pods.keys().cloned().map(Endpoint::Pod).collect();
    if source {
        e.push(Endpoint::Node("node-a".into()));
        e.push(Endpoint::Node("node-b".into()));
        e.push(Endpoint::Ip("192.168.1.5".parse().unwrap()));
    } else {
        e.push(Endpoint::Ip("10.0.0.1".parse().unwrap()));
    }
    e.push(Endpoint::Ip("8.8.8.8".parse().unwrap()));
    e.push(Endpoint::Ip("10.244.1.200".parse().unwrap()));
    e
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!("the generator makes IPv4 only"),
    }
}

/// Where an endpoint sits: (node it lives on, veth when it is a pod).
fn place(c: &Cluster, r: &Resolved) -> (Option<String>, Option<String>) {
    match r {
        Resolved::Pod { pod, .. } => {
            let p = &c.pods[pod];
            (p.node.clone(), Some(FakeVeths.host_veth(p)))
        }
        Resolved::Node { node, .. } => (Some(node.clone()), None),
        Resolved::External { .. } => (None, None),
    }
}

struct Hop_ {
    node: String,
    packet: Packet,
}

/// The filter-table hops of the connection's first packet.
fn hops(c: &Cluster, from: &Resolved, to: &Resolved, protocol: Protocol, port: u16) -> Vec<Hop_> {
    let (src_node, src_veth) = place(c, from);
    let (dst_node, dst_veth) = place(c, to);
    let packet = |hook, in_iface: Option<&str>, out_iface: Option<&str>| Packet {
        hook,
        in_iface: in_iface.map(String::from),
        out_iface: out_iface.map(String::from),
        src: v4(from.ip()),
        dst: v4(to.ip()),
        protocol,
        dport: port,
        ct: CtState::New,
    };
    let mut out = Vec::new();
    // Leaving the source.
    if let (Some(sn), Some(sv)) = (&src_node, &src_veth) {
        let p = if dst_veth.is_none() && dst_node.as_ref() == Some(sn) {
            packet(Hook::Input, Some(sv), None)
        } else if dst_node.as_ref() == Some(sn) {
            packet(Hook::Forward, Some(sv), dst_veth.as_deref())
        } else if dst_node.is_some() {
            packet(Hook::Forward, Some(sv), Some(TUNNEL))
        } else {
            packet(Hook::Forward, Some(sv), Some(UPLINK))
        };
        out.push(Hop_ { node: sn.clone(), packet: p });
    }
    // Arriving at a destination pod, unless the same-node hop above already covered it.
    if let (Some(dn), Some(dv)) = (&dst_node, &dst_veth) {
        let same_node_pod = src_veth.is_some() && src_node.as_ref() == Some(dn);
        if !same_node_pod {
            let p = if src_node.as_ref() == Some(dn) {
                packet(Hook::Output, None, Some(dv))
            } else if src_node.is_some() {
                packet(Hook::Forward, Some(TUNNEL), Some(dv))
            } else {
                packet(Hook::Forward, Some(UPLINK), Some(dv))
            };
            out.push(Hop_ { node: dn.clone(), packet: p });
        }
    }
    out
}

fn compiled(c: &Cluster) -> BTreeMap<String, Ruleset> {
    NODES
        .iter()
        .map(|(n, _)| (n.to_string(), compile(c, n, &FakeVeths).expect("compile")))
        .collect()
}

fn check(c: &Cluster, rulesets: &BTreeMap<String, Ruleset>, probe: &Probe) -> Result<(), TestCaseError> {
    let Ok(eval) = evaluate(c, probe) else {
        return Ok(()); // e.g. a node as destination: not a connection to judge
    };
    let path = hops(c, &eval.from, &eval.to, probe.protocol, probe.port);
    if path.is_empty() {
        return Ok(()); // node/outside to node/outside: no pod, sluice plays no part
    }
    let mut allowed = true;
    let mut traces = Vec::new();
    for hop in &path {
        let cls = classify(&rulesets[&hop.node], Table::Filter, &hop.packet)
            .map_err(|e| TestCaseError::fail(format!("classify: {e}")))?;
        traces.push(format!("{} {:?}: {:?} via {:?}", hop.node, hop.packet, cls.verdict, cls.trace));
        allowed &= cls.verdict == Hop::Accept;
    }
    let expected = eval.verdict == Verdict::Allow;
    prop_assert_eq!(
        allowed,
        expected,
        "probe {} -> {} {}/{}: evaluator says {} ({})\nhops:\n{}\ncluster: {:#?}",
        probe.from,
        probe.to,
        probe.protocol,
        probe.port,
        eval.verdict,
        eval.reason(),
        traces.join("\n"),
        c
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn compiled_rules_agree_with_the_reference_evaluator(
        cluster in arb_cluster(),
        probes in prop::collection::vec(
            (arb_endpoint_index(), arb_endpoint_index(), prop::sample::select(vec![53u16, 80, 81, 9090]), arb_protocol()),
            1..25,
        ),
    ) {
        let rulesets = compiled(&cluster);
        let froms = endpoints(&cluster, true);
        let tos = endpoints(&cluster, false);
        for (f, t, port, protocol) in probes {
            let from = froms[f % froms.len()].clone();
            let to = tos[t % tos.len()].clone();
            if from == to {
                continue; // a pod talking to itself never leaves its namespace
            }
            check(&cluster, &rulesets, &Probe { from, to, port, protocol })?;
        }
    }
}

/// The test above only means something if the classifier can deny: a cluster with a
/// default-deny policy must produce denials, and the same probe without it allows.
#[test]
fn the_differential_harness_sees_denials() {
    let mut c = Cluster::default();
    for (name, ip) in NODES {
        c.add_node(Node { name: name.into(), addresses: vec![IpAddr::V4(ip)] });
    }
    for (i, node) in ["node-a", "node-b"].iter().enumerate() {
        c.add_pod(Pod {
            namespace: "x".into(),
            name: format!("p{i}"),
            labels: Labels::new(),
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, 244, i as u8, 2))],
            node: Some(node.to_string()),
            ports: vec![],
            host_network: false,
        });
    }
    let probe = Probe {
        from: Endpoint::Pod(NamespacedName::new("x", "p0")),
        to: Endpoint::Pod(NamespacedName::new("x", "p1")),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let verdict_of = |c: &Cluster| {
        let rs = compiled(c);
        let eval = evaluate(c, &probe).unwrap();
        hops(c, &eval.from, &eval.to, probe.protocol, probe.port)
            .iter()
            .all(|h| classify(&rs[&h.node], Table::Filter, &h.packet).unwrap().verdict == Hop::Accept)
    };
    assert!(verdict_of(&c));
    c.add_policy(NetworkPolicy {
        namespace: "x".into(),
        name: "deny".into(),
        pod_selector: LabelSelector::everything(),
        ingress: vec![],
        egress: vec![],
        policy_types: PolicyTypes { ingress: true, egress: false },
    });
    assert!(!verdict_of(&c));
}
