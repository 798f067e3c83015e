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
use sluice_policy::selector::LabelSelector;

mod dataplane_support;
use dataplane_support::{FakeVeths, NODES, arb_cluster, arb_protocol};

const UPLINK: &str = "eth0";
const TUNNEL: &str = "tunl0";

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
        out.push(Hop_ {
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
            out.push(Hop_ {
                node: dn.clone(),
                packet: p,
            });
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

fn check(
    c: &Cluster,
    rulesets: &BTreeMap<String, Ruleset>,
    probe: &Probe,
) -> Result<(), TestCaseError> {
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
        traces.push(format!(
            "{} {:?}: {:?} via {:?}",
            hop.node, hop.packet, cls.verdict, cls.trace
        ));
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
        c.add_node(Node {
            name: name.into(),
            addresses: vec![IpAddr::V4(ip)],
        });
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
            .all(|h| {
                classify(&rs[&h.node], Table::Filter, &h.packet)
                    .unwrap()
                    .verdict
                    == Hop::Accept
            })
    };
    assert!(verdict_of(&c));
    c.add_policy(NetworkPolicy {
        namespace: "x".into(),
        name: "deny".into(),
        pod_selector: LabelSelector::everything(),
        ingress: vec![],
        egress: vec![],
        policy_types: PolicyTypes {
            ingress: true,
            egress: false,
        },
    });
    assert!(!verdict_of(&c));
}
