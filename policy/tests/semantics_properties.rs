//! Invariants of NetworkPolicy's meaning, checked on random clusters with proptest:
//! rules only ever add, isolation is the only thing that denies, names and order of
//! policies do not matter, allow-all everywhere allows everything.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use proptest::prelude::*;
use sluice_policy::evaluate::{Endpoint, Probe, Verdict, evaluate};
use sluice_policy::{
    Cluster, ContainerPort, IpBlock, LabelSelector, Labels, Namespace, NamespaceScope,
    NamespacedName, NetworkPolicy, Node, Operator, Peer, Peers, Pod, PodPeer, PolicyPort,
    PolicyTypes, PortMatch, Ports, Protocol, Requirement, Rule,
};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];

fn labels_strategy() -> impl Strategy<Value = Labels> {
    (
        prop::option::of(prop::sample::select(vec!["a", "b"])),
        prop::option::of(prop::sample::select(vec!["fe", "be"])),
    )
        .prop_map(|(app, tier)| {
            let mut l = Labels::new();
            if let Some(a) = app {
                l.insert("app".into(), a.into());
            }
            if let Some(t) = tier {
                l.insert("tier".into(), t.into());
            }
            l
        })
}

fn selector_strategy() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::everything()),
        prop::sample::select(vec!["a", "b"]).prop_map(|a| LabelSelector::from_labels([("app", a)])),
        (
            prop::sample::select(vec!["app", "tier", "region"]),
            0..4usize
        )
            .prop_map(|(key, op)| {
                let values: BTreeSet<String> =
                    ["a", "fe", "east"].iter().map(|s| s.to_string()).collect();
                let operator = match op {
                    0 => Operator::In(values),
                    1 => Operator::NotIn(values),
                    2 => Operator::Exists,
                    _ => Operator::DoesNotExist,
                };
                LabelSelector {
                    match_labels: Labels::new(),
                    match_expressions: vec![Requirement {
                        key: key.into(),
                        operator,
                    }],
                }
            }),
    ]
}

fn protocol_strategy() -> impl Strategy<Value = Protocol> {
    prop::sample::select(Protocol::ALL.to_vec())
}

fn peer_strategy() -> impl Strategy<Value = Peer> {
    prop_oneof![
        (prop::option::of(selector_strategy()), selector_strategy()).prop_map(|(ns, pods)| {
            Peer::Pods(PodPeer {
                namespaces: ns.map_or(NamespaceScope::PolicyNamespace, NamespaceScope::Matching),
                pods,
            })
        }),
        prop::sample::select(vec![
            ("10.244.0.0/16", vec![]),
            ("10.244.1.0/24", vec!["10.244.1.0/28"]),
            ("0.0.0.0/0", vec!["10.244.0.0/16"]),
            ("192.168.0.0/24", vec![]),
        ])
        .prop_map(|(cidr, except)| Peer::IpBlock(IpBlock {
            cidr: cidr.parse().unwrap(),
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
        })),
    ]
}

fn port_strategy() -> impl Strategy<Value = PolicyPort> {
    (
        protocol_strategy(),
        prop_oneof![
            Just(PortMatch::All),
            prop::sample::select(vec![80u16, 81, 8080])
                .prop_map(|p| PortMatch::Numbers { start: p, end: p }),
            Just(PortMatch::Numbers { start: 80, end: 90 }),
            prop::sample::select(vec!["http", "metrics", "none"])
                .prop_map(|n| PortMatch::Named(n.into())),
        ],
    )
        .prop_map(|(protocol, port)| PolicyPort { protocol, port })
}

fn rule_strategy() -> impl Strategy<Value = Rule> {
    (
        prop::option::of(prop::collection::vec(peer_strategy(), 1..3)),
        prop::option::of(prop::collection::vec(port_strategy(), 1..3)),
    )
        .prop_map(|(peers, ports)| Rule {
            peers: peers.map_or(Peers::Any, Peers::Listed),
            ports: ports.map_or(Ports::Any, Ports::Listed),
        })
}

fn policy_strategy(index: usize) -> impl Strategy<Value = NetworkPolicy> {
    (
        prop::sample::select(NAMESPACES.to_vec()),
        selector_strategy(),
        prop::collection::vec(rule_strategy(), 0..3),
        prop::collection::vec(rule_strategy(), 0..3),
        any::<(bool, bool)>(),
    )
        .prop_map(
            move |(ns, pod_selector, ingress, egress, (i, e))| NetworkPolicy {
                log_allowed: Default::default(),
                namespace: ns.into(),
                name: format!("np{index}"),
                pod_selector,
                ingress,
                egress,
                // Upstream defaulting applies to manifests; here any combination with at
                // least one type, as a manifest can declare.
                policy_types: PolicyTypes {
                    ingress: i || !e,
                    egress: e,
                },
            },
        )
}

fn cluster_strategy() -> impl Strategy<Value = Cluster> {
    let pods = prop::collection::vec(
        (
            prop::sample::select(NAMESPACES.to_vec()),
            labels_strategy(),
            any::<bool>(),
            prop::sample::select(vec![0u8, 1, 2]),
            any::<bool>(),
        ),
        1..6,
    );
    let ns_labels = prop::collection::vec(
        prop::option::of(prop::sample::select(vec!["east", "west"])),
        3,
    );
    let policies = (0..4usize).prop_flat_map(|n| (0..n).map(policy_strategy).collect::<Vec<_>>());
    (pods, ns_labels, policies).prop_map(|(pods, ns_labels, policies)| {
        let mut c = Cluster::default();
        for (ns, region) in NAMESPACES.iter().zip(ns_labels) {
            let mut labels = Labels::new();
            if let Some(r) = region {
                labels.insert("region".into(), r.into());
            }
            c.add_namespace(Namespace {
                log_allowed: Default::default(),
                name: ns.to_string(),
                labels,
            });
        }
        c.add_node(Node {
            name: "node-1".into(),
            addresses: vec!["192.168.0.1".parse().unwrap()],
        });
        c.add_node(Node {
            name: "node-2".into(),
            addresses: vec!["192.168.0.2".parse().unwrap()],
        });
        for (i, (ns, labels, node_one, port_kind, host_network)) in pods.into_iter().enumerate() {
            let node = if node_one { "node-1" } else { "node-2" };
            let ports = match port_kind {
                0 => vec![],
                1 => vec![ContainerPort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Protocol::Tcp,
                }],
                _ => vec![ContainerPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Protocol::Tcp,
                }],
            };
            // One in five pods is on the host network, sharing its node's address.
            let host_network = host_network && i % 5 == 4;
            let ip: IpAddr = if host_network {
                if node_one {
                    "192.168.0.1"
                } else {
                    "192.168.0.2"
                }
                .parse()
                .unwrap()
            } else {
                format!("10.244.{}.{}", if node_one { 1 } else { 2 }, 10 + i)
                    .parse()
                    .unwrap()
            };
            c.add_pod(Pod {
                namespace: ns.into(),
                name: format!("p{i}"),
                labels,
                ips: vec![ip],
                node: Some(node.into()),
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

/// Every probe worth asking in `c` for one port/protocol.
fn probes(c: &Cluster, port: u16, protocol: Protocol) -> Vec<Probe> {
    let mut sources: Vec<Endpoint> = c.pods.keys().cloned().map(Endpoint::Pod).collect();
    sources.push(Endpoint::Node("node-1".into()));
    sources.push(Endpoint::Ip("203.0.113.9".parse().unwrap()));
    sources.push(Endpoint::Ip("10.244.1.3".parse().unwrap()));
    let mut destinations: Vec<Endpoint> = c.pods.keys().cloned().map(Endpoint::Pod).collect();
    destinations.push(Endpoint::Ip("203.0.113.9".parse().unwrap()));
    let mut out = Vec::new();
    for from in &sources {
        for to in &destinations {
            out.push(Probe {
                from: from.clone(),
                to: to.clone(),
                port,
                protocol,
            });
        }
    }
    out
}

fn verdicts(c: &Cluster, probes: &[Probe]) -> Vec<Verdict> {
    probes
        .iter()
        .map(|p| evaluate(c, p).unwrap().verdict)
        .collect()
}

fn probe_params() -> impl Strategy<Value = (u16, Protocol)> {
    (
        prop::sample::select(vec![80u16, 81, 85, 8080, 9999]),
        protocol_strategy(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn adding_a_rule_never_denies_what_was_allowed(
        c in cluster_strategy(),
        (port, protocol) in probe_params(),
        rule in rule_strategy(),
        pick in any::<prop::sample::Index>(),
        to_egress in any::<bool>(),
    ) {
        prop_assume!(!c.policies.is_empty());
        let probes = probes(&c, port, protocol);
        let before = verdicts(&c, &probes);
        let mut more = c.clone();
        let key = pick.get(&more.policies.keys().cloned().collect::<Vec<_>>()).clone();
        let policy = more.policy_mut(&key).unwrap();
        if to_egress { policy.egress.push(rule) } else { policy.ingress.push(rule) }
        let after = verdicts(&more, &probes);
        for ((p, b), a) in probes.iter().zip(before).zip(after) {
            prop_assert!(
                !(b == Verdict::Allow && a == Verdict::Deny),
                "{} -> {} {}/{} turned from allow to deny", p.from, p.to, p.protocol, p.port
            );
        }
    }

    #[test]
    fn only_isolation_denies(c in cluster_strategy(), (port, protocol) in probe_params()) {
        for p in probes(&c, port, protocol) {
            let e = evaluate(&c, &p).unwrap();
            if e.verdict == Verdict::Deny {
                prop_assert!(
                    !e.egress.isolating().is_empty() || !e.ingress.isolating().is_empty(),
                    "denied without an isolating policy: {}", e.reason()
                );
            }
        }
    }

    #[test]
    fn policy_names_do_not_matter(c in cluster_strategy(), (port, protocol) in probe_params()) {
        // Renaming reverses the key order in which policies are visited.
        let mut renamed = c.clone();
        renamed.policies = c
            .policies
            .values()
            .map(|p| {
                let mut p = p.clone();
                std::sync::Arc::make_mut(&mut p).name = format!("zz-{}", 99 - p.name.trim_start_matches("np").parse::<u32>().unwrap());
                (NamespacedName::new(&p.namespace, &p.name), p)
            })
            .collect::<BTreeMap<_, _>>();
        let probes = probes(&c, port, protocol);
        prop_assert_eq!(verdicts(&c, &probes), verdicts(&renamed, &probes));
    }

    #[test]
    fn allow_all_everywhere_allows_everything(c in cluster_strategy(), (port, protocol) in probe_params()) {
        let mut open = c.clone();
        for ns in NAMESPACES {
            open.add_policy(NetworkPolicy {
                log_allowed: Default::default(),
                namespace: ns.into(),
                name: "allow-all".into(),
                pod_selector: LabelSelector::everything(),
                ingress: vec![Rule::allow_all()],
                egress: vec![Rule::allow_all()],
                policy_types: PolicyTypes { ingress: true, egress: true },
            });
        }
        for p in probes(&open, port, protocol) {
            let e = evaluate(&open, &p).unwrap();
            prop_assert_eq!(e.verdict, Verdict::Allow, "{}", e.reason());
        }
    }

    #[test]
    fn deny_all_everywhere_leaves_only_loopback_own_node_and_unpoliced(
        c in cluster_strategy(),
        (port, protocol) in probe_params(),
    ) {
        let mut closed = c.clone();
        closed.policies.clear();
        for ns in NAMESPACES {
            closed.add_policy(NetworkPolicy {
                log_allowed: Default::default(),
                namespace: ns.into(),
                name: "deny-all".into(),
                pod_selector: LabelSelector::everything(),
                ingress: vec![],
                egress: vec![],
                policy_types: PolicyTypes { ingress: true, egress: true },
            });
        }
        use sluice_policy::evaluate::Side::*;
        for p in probes(&closed, port, protocol) {
            let e = evaluate(&closed, &p).unwrap();
            let expected = matches!(e.egress, Loopback | NotPoliced)
                && matches!(e.ingress, Loopback | NotPoliced | OwnNode);
            prop_assert_eq!(e.verdict == Verdict::Allow, expected, "{}", e.reason());
        }
    }
}
