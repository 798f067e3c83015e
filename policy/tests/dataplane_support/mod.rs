//! Builders shared by the dataplane tests: fake interface names and a small cluster
//! that exercises every feature the compiler has (pod and namespace selectors, ipBlock
//! with except and /0, numbered, ranged and named ports over TCP, UDP and SCTP,
//! egress, a hostNetwork pod, pods on two nodes).
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;
use sluice_policy::classify::{Hook, Packet, Verdict, classify};
use sluice_policy::compile::{CtState, InterfaceNames, Ruleset, Table};
use sluice_policy::evaluate::Resolved;
use sluice_policy::model::*;
use sluice_policy::names::hash16;
use sluice_policy::selector::{LabelSelector, Operator, Requirement};

/// Interface names of the CNI plugin's shape (`slc` + 4 + 8 hex) from this crate's
/// hash; the real rule is `sluice_cni::veth`, which this crate must not depend on.
pub struct FakeVeths;

impl InterfaceNames for FakeVeths {
    fn host_veth(&self, pod: &Pod) -> String {
        let pod_part = &hash16(format!("{}.{}", pod.namespace, pod.name).as_bytes())[..8];
        format!("{}{pod_part}", self.namespace_prefix(&pod.namespace))
    }
    fn namespace_prefix(&self, namespace: &str) -> String {
        format!("slc{}", &hash16(namespace.as_bytes())[..4])
    }
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn mk_pod(ns: &str, name: &str, pairs: &[(&str, &str)], addr: &str, node: &str) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(pairs),
        ips: vec![ip(addr)],
        node: Some(node.into()),
        ports: vec![],
        host_network: false,
    }
}

pub fn named_port(name: &str, port: u16, protocol: Protocol) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        port,
        protocol,
    }
}

pub fn pods_in(ns: Option<LabelSelector>, pods: LabelSelector) -> Peer {
    Peer::Pods(PodPeer {
        namespaces: match ns {
            None => NamespaceScope::PolicyNamespace,
            Some(s) => NamespaceScope::Matching(s),
        },
        pods,
    })
}

pub fn block(cidr: &str, except: &[&str]) -> Peer {
    Peer::IpBlock(IpBlock {
        cidr: cidr.parse().unwrap(),
        except: except.iter().map(|e| e.parse().unwrap()).collect(),
    })
}

pub fn port(protocol: Protocol, port: PortMatch) -> PolicyPort {
    PolicyPort { protocol, port }
}

pub fn num(p: u16) -> PortMatch {
    PortMatch::Numbers { start: p, end: p }
}

pub fn mk_policy(
    ns: &str,
    name: &str,
    selector: LabelSelector,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
) -> NetworkPolicy {
    NetworkPolicy {
        log_allowed: Default::default(),
        namespace: ns.into(),
        name: name.into(),
        pod_selector: selector,
        policy_types: PolicyTypes {
            ingress: ingress.is_some(),
            egress: egress.is_some(),
        },
        ingress: ingress.unwrap_or_default(),
        egress: egress.unwrap_or_default(),
    }
}

pub fn rule(peers: Vec<Peer>, ports: Vec<PolicyPort>) -> Rule {
    Rule {
        peers: if peers.is_empty() {
            Peers::Any
        } else {
            Peers::Listed(peers)
        },
        ports: if ports.is_empty() {
            Ports::Any
        } else {
            Ports::Listed(ports)
        },
    }
}

/// Every compiler feature in one small cluster; `node-1` has pods of `web` and `db`.
pub fn feature_cluster() -> Cluster {
    let mut c = Cluster::default();
    c.add_namespace(Namespace {
        log_allowed: Default::default(),
        name: "web".into(),
        labels: labels(&[("region", "foo")]),
    });
    c.add_namespace(Namespace {
        log_allowed: Default::default(),
        name: "db".into(),
        labels: labels(&[("region", "bar")]),
    });
    c.add_node(Node {
        name: "node-1".into(),
        addresses: vec![ip("192.168.0.11")],
    });
    c.add_node(Node {
        name: "node-2".into(),
        addresses: vec![ip("192.168.0.12")],
    });
    let mut front = mk_pod("web", "front", &[("app", "front")], "10.244.1.2", "node-1");
    front.ports = vec![named_port("http", 8080, Protocol::Tcp)];
    c.add_pod(front);
    let mut api = mk_pod("web", "api", &[("app", "api")], "10.244.2.2", "node-2");
    api.ports = vec![
        named_port("http", 9090, Protocol::Tcp),
        named_port("sig", 5060, Protocol::Sctp),
    ];
    c.add_pod(api);
    c.add_pod(mk_pod("db", "pg", &[("app", "pg")], "10.244.1.3", "node-1"));
    c.add_pod(mk_pod(
        "db",
        "cache",
        &[("app", "cache")],
        "10.244.1.4",
        "node-1",
    ));
    let mut host = mk_pod(
        "web",
        "node-exporter",
        &[("app", "front")],
        "192.168.0.11",
        "node-1",
    );
    host.host_network = true;
    c.add_pod(host);

    // web: default deny ingress, then front open on the named port http from ipBlocks,
    // and from namespaces NotIn region=bar (seed 001).
    c.add_policy(mk_policy(
        "web",
        "default-deny",
        LabelSelector::everything(),
        Some(vec![]),
        None,
    ));
    let not_bar = LabelSelector {
        match_labels: Labels::new(),
        match_expressions: vec![Requirement {
            key: "region".into(),
            operator: Operator::NotIn(["bar".to_string()].into()),
        }],
    };
    c.add_policy(mk_policy(
        "web",
        "front-in",
        LabelSelector::from_labels([("app", "front")]),
        Some(vec![
            rule(
                vec![
                    block("172.16.0.0/16", &["172.16.8.0/24"]),
                    block("10.2.3.4/32", &[]),
                ],
                vec![
                    port(Protocol::Tcp, PortMatch::Named("http".into())),
                    port(Protocol::Tcp, num(81)),
                ],
            ),
            rule(
                vec![pods_in(Some(not_bar), LabelSelector::everything())],
                vec![],
            ),
        ]),
        None,
    ));
    // db: egress default deny except DNS on TCP and UDP 53, and to pg on a range, and
    // SCTP to the world except the cluster.
    c.add_policy(mk_policy(
        "db",
        "egress",
        LabelSelector::everything(),
        None,
        Some(vec![
            rule(
                vec![],
                vec![port(Protocol::Udp, num(53)), port(Protocol::Tcp, num(53))],
            ),
            rule(
                vec![pods_in(None, LabelSelector::from_labels([("app", "pg")]))],
                vec![port(
                    Protocol::Tcp,
                    PortMatch::Numbers {
                        start: 5432,
                        end: 5440,
                    },
                )],
            ),
            rule(
                vec![block("0.0.0.0/0", &["10.244.0.0/16"])],
                vec![
                    port(Protocol::Sctp, PortMatch::All),
                    port(Protocol::Sctp, PortMatch::Named("sig".into())),
                ],
            ),
        ]),
    ));
    c
}

// ---- proptest generators: small random clusters, policies and probes ----

pub const NODES: [(&str, Ipv4Addr); 2] = [
    ("node-a", Ipv4Addr::new(10, 0, 0, 1)),
    ("node-b", Ipv4Addr::new(10, 0, 0, 2)),
];
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];

fn labels_from(pairs: Vec<(&'static str, &'static str)>) -> Labels {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn arb_pod_labels() -> impl Strategy<Value = Labels> {
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

pub fn arb_ns_labels() -> impl Strategy<Value = Labels> {
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

pub fn arb_selector(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = LabelSelector> {
    let key = prop::sample::select(keys.to_vec());
    let value = prop::sample::select(values.to_vec());
    let op = prop_oneof![
        prop::collection::btree_set(value.clone().prop_map(String::from), 1..3)
            .prop_map(Operator::In),
        prop::collection::btree_set(value.clone().prop_map(String::from), 1..3)
            .prop_map(Operator::NotIn),
        Just(Operator::Exists),
        Just(Operator::DoesNotExist),
    ];
    (
        prop::collection::btree_map(
            key.clone().prop_map(String::from),
            value.prop_map(String::from),
            0..2,
        ),
        prop::collection::vec(
            (key, op).prop_map(|(k, operator)| Requirement {
                key: k.to_string(),
                operator,
            }),
            0..2,
        ),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        })
}

pub fn arb_pod_selector() -> impl Strategy<Value = LabelSelector> {
    arb_selector(&["app", "tier"], &["a", "b", "c", "fe", "be"])
}

pub fn arb_ns_selector() -> impl Strategy<Value = LabelSelector> {
    arb_selector(
        &["region", "team", NAMESPACE_NAME_LABEL],
        &["bar", "foo", "t1", "x", "y"],
    )
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

pub fn arb_ip_block() -> impl Strategy<Value = IpBlock> {
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

pub fn arb_peer() -> impl Strategy<Value = Peer> {
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

pub fn arb_protocol() -> impl Strategy<Value = Protocol> {
    prop::sample::select(Protocol::ALL.to_vec())
}

pub fn arb_policy_port() -> impl Strategy<Value = PolicyPort> {
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

pub fn arb_rule() -> impl Strategy<Value = Rule> {
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

pub fn arb_policy(index: usize) -> impl Strategy<Value = NetworkPolicy> {
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
                log_allowed: Default::default(),
                namespace: ns.to_string(),
                name: format!("np{index}"),
                pod_selector,
                ingress,
                egress,
                policy_types,
            }
        })
}

pub fn arb_container_ports() -> impl Strategy<Value = Vec<ContainerPort>> {
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
            .map(|(name, port, protocol)| ContainerPort {
                name: name.map(String::from),
                port,
                protocol,
            })
            .collect()
    })
}

pub fn arb_cluster() -> impl Strategy<Value = Cluster> {
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
    (prop::collection::vec(arb_ns_labels(), 3), pods, policies).prop_map(
        |(ns_labels, pods, policies)| {
            let mut c = Cluster::default();
            for (name, labels) in NAMESPACES.iter().zip(ns_labels) {
                c.add_namespace(Namespace {
                    log_allowed: Default::default(),
                    name: name.to_string(),
                    labels,
                });
            }
            for (name, ip) in NODES {
                c.add_node(Node {
                    name: name.into(),
                    addresses: vec![IpAddr::V4(ip)],
                });
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
        },
    )
}

// ---- walking a connection through the compiled rules of every node ----

/// Interface towards the outside world on every node.
pub const UPLINK: &str = "eth0";
/// Interface towards other nodes.
pub const TUNNEL: &str = "tunl0";

pub fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!("the generator makes IPv4 only"),
    }
}

/// Where an endpoint sits: (node it lives on, veth when it is a pod).
pub fn place(c: &Cluster, r: &Resolved) -> (Option<String>, Option<String>) {
    match r {
        Resolved::Pod { pod, .. } => {
            let p = &c.pods[pod];
            (p.node.clone(), Some(FakeVeths.host_veth(p)))
        }
        Resolved::Node { node, .. } => (Some(node.clone()), None),
        Resolved::External { .. } => (None, None),
    }
}

pub struct NodePacket {
    pub node: String,
    pub packet: Packet,
}

/// The filter-table hops of a connection's first packet through the nodes: out of
/// the source pod's veth on its node (FORWARD, or INPUT when addressed to that node),
/// over the tunnel, into the destination pod's veth (FORWARD; OUTPUT when the node
/// itself sends). Empty when no pod is involved.
pub fn hops(
    c: &Cluster,
    from: &Resolved,
    to: &Resolved,
    protocol: Protocol,
    port: u16,
) -> Vec<NodePacket> {
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
        out.push(NodePacket {
            node: sn.clone(),
            packet: p,
        });
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
            out.push(NodePacket {
                node: dn.clone(),
                packet: p,
            });
        }
    }
    out
}

/// Whether every hop of the connection accepts its first packet, with the traces
/// (for failure messages); `None` when no pod is involved.
pub fn dataplane_allows(
    c: &Cluster,
    rulesets: &BTreeMap<String, Ruleset>,
    from: &Resolved,
    to: &Resolved,
    protocol: Protocol,
    port: u16,
) -> Option<(bool, Vec<String>)> {
    let path = hops(c, from, to, protocol, port);
    if path.is_empty() {
        return None;
    }
    let mut allowed = true;
    let mut traces = Vec::new();
    for hop in &path {
        let cls = classify(&rulesets[&hop.node], Table::Filter, &hop.packet).expect("classify");
        traces.push(format!(
            "{} {:?}: {:?} via {:?}",
            hop.node, hop.packet, cls.verdict, cls.trace
        ));
        allowed &= cls.verdict == Verdict::Accept;
    }
    Some((allowed, traces))
}

/// Both dataplanes, for tests that run on each.
pub const DATAPLANES: [sluice_policy::dataplane::DataplaneKind; 2] = [
    sluice_policy::dataplane::DataplaneKind::Iptables,
    sluice_policy::dataplane::DataplaneKind::Nftables,
];

/// Every node's ruleset for `dataplane`: Node objects and nodes named by pods.
pub fn compile_all_nodes(
    c: &Cluster,
    dataplane: sluice_policy::dataplane::DataplaneKind,
) -> BTreeMap<String, Ruleset> {
    let mut nodes: std::collections::BTreeSet<String> = c.nodes.keys().cloned().collect();
    nodes.extend(c.pods.values().filter_map(|p| p.node.clone()));
    nodes
        .into_iter()
        .map(|n| {
            let rs =
                sluice_policy::compile::compile_for(dataplane, c, &n, &FakeVeths).expect("compile");
            (n, rs)
        })
        .collect()
}

// ---- random ClusterNetworkPolicies (issue 13) ----

pub fn arb_cluster_peer(ingress: bool) -> impl Strategy<Value = ClusterPeer> {
    let pods = prop_oneof![
        arb_ns_selector().prop_map(ClusterPeer::Namespaces),
        (arb_ns_selector(), arb_pod_selector())
            .prop_map(|(namespaces, pods)| ClusterPeer::Pods { namespaces, pods }),
    ];
    if ingress {
        pods.boxed()
    } else {
        prop_oneof![
            3 => pods,
            1 => arb_selector(&["zone"], &["a", "b"]).prop_map(ClusterPeer::Nodes),
            2 => prop::collection::vec(arb_ip_block().prop_map(|b| b.cidr), 1..3)
                .prop_map(ClusterPeer::Networks),
        ]
        .boxed()
    }
}

/// A rule; named ports only where validation lets them be (no `nodes`/`networks`
/// peer), which the compiled form relies on no more than the evaluator does.
pub fn arb_cluster_rule(ingress: bool) -> impl Strategy<Value = ClusterRule> {
    (
        prop::sample::select(vec![Action::Accept, Action::Deny, Action::Pass]),
        prop::collection::vec(arb_cluster_peer(ingress), 1..3),
        prop_oneof![
            1 => Just(Ports::Any),
            2 => prop::collection::vec(arb_policy_port(), 1..3).prop_map(Ports::Listed),
        ],
    )
        .prop_map(|(action, peers, ports)| ClusterRule {
            name: None,
            action,
            peers,
            ports,
        })
}

pub fn arb_cluster_policy(index: usize) -> impl Strategy<Value = ClusterNetworkPolicy> {
    (
        prop::sample::select(vec![Tier::Admin, Tier::Baseline]),
        prop::sample::select(vec![10u16, 20, 20, 500]),
        prop_oneof![
            arb_ns_selector().prop_map(Subject::Namespaces),
            (arb_ns_selector(), arb_pod_selector())
                .prop_map(|(namespaces, pods)| Subject::Pods { namespaces, pods }),
        ],
        prop::collection::vec(arb_cluster_rule(true), 0..4),
        prop::collection::vec(arb_cluster_rule(false), 0..4),
    )
        .prop_map(
            move |(tier, priority, subject, ingress, egress)| ClusterNetworkPolicy {
                log_allowed: Default::default(),
                name: format!("cnp{index}"),
                tier,
                priority,
                subject,
                ingress,
                egress,
                not_implemented: vec![],
            },
        )
}

/// [`arb_cluster`] plus up to four ClusterNetworkPolicies of both tiers and node
/// labels for `nodes` peers.
pub fn arb_cluster_with_cluster_policies() -> impl Strategy<Value = Cluster> {
    let cnps = (0..5usize).prop_flat_map(|n| (0..n).map(arb_cluster_policy).collect::<Vec<_>>());
    (arb_cluster(), cnps, prop::sample::select(vec!["a", "b"])).prop_map(|(mut c, cnps, zone)| {
        c.node_labels
            .insert(NODES[0].0.to_string(), labels(&[("zone", zone)]));
        for p in cnps {
            c.add_cluster_policy(p);
        }
        c
    })
}

// ---- the scenario files of tests/data ----

/// What the dataplane tests read of a `*.expect.yaml`: the manifest directories of
/// its cluster.
#[derive(serde::Deserialize)]
pub struct Expect {
    pub manifests: Vec<String>,
}

/// The cluster of a scenario: every manifest file of `manifests` (directories of
/// `dir`), in name order.
pub fn load(dir: &std::path::Path, manifests: &[String]) -> Cluster {
    let mut cluster = Cluster::default();
    for m in manifests {
        let mut files: Vec<_> = std::fs::read_dir(dir.join(m))
            .unwrap_or_else(|e| panic!("{m}: {e}"))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
            })
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            sluice_policy::parse_documents(&f.display().to_string(), &text)
                .unwrap_or_else(|e| panic!("{e}"))
                .add_to(&mut cluster);
        }
    }
    cluster
}

/// `ip:` and `node:` endpoints the expectation file mentions, verbatim.
pub fn mentioned_endpoints(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for token in text.split(|c: char| c.is_whitespace() || matches!(c, ',' | '{' | '}' | '"')) {
        if token.starts_with("ip:") || token.starts_with("node:") {
            out.insert(token.to_string());
        }
    }
    out
}

/// The scenario files whose name starts with `prefix`, sorted, with their directory.
pub fn scenario_files(prefix: &str) -> (std::path::PathBuf, Vec<std::path::PathBuf>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut expects: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(".expect.yaml")
        })
        .collect();
    expects.sort();
    (dir, expects)
}
