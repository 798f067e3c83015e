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
use sluice_policy::classify::{Verdict as Hop, classify};
use sluice_policy::compile::{Ruleset, Table, compile_for};
use sluice_policy::dataplane::DataplaneKind;
use sluice_policy::evaluate::{Endpoint, Probe, Verdict, evaluate};
use sluice_policy::model::*;
use sluice_policy::selector::LabelSelector;

mod dataplane_support;
use dataplane_support::{
    FakeVeths, NODES, arb_cluster, arb_cluster_with_cluster_policies, arb_protocol,
    dataplane_allows, hops,
};

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

fn compiled(c: &Cluster, dataplane: DataplaneKind) -> BTreeMap<String, Ruleset> {
    NODES
        .iter()
        .map(|(n, _)| {
            let rs = compile_for(dataplane, c, n, &FakeVeths).expect("compile");
            (n.to_string(), rs)
        })
        .collect()
}

type ProbeSpec = (usize, usize, u16, Protocol);

/// Every probe on `dataplane`'s compiled rules agrees with the evaluator.
fn agree(
    dataplane: DataplaneKind,
    cluster: &Cluster,
    probes: &[ProbeSpec],
) -> Result<(), TestCaseError> {
    let rulesets = compiled(cluster, dataplane);
    let froms = endpoints(cluster, true);
    let tos = endpoints(cluster, false);
    for &(f, t, port, protocol) in probes {
        let from = froms[f % froms.len()].clone();
        let to = tos[t % tos.len()].clone();
        if from == to {
            continue; // a pod talking to itself never leaves its namespace
        }
        check(
            cluster,
            &rulesets,
            &Probe {
                from,
                to,
                port,
                protocol,
            },
        )?;
    }
    Ok(())
}

fn arb_probes() -> impl Strategy<Value = Vec<ProbeSpec>> {
    prop::collection::vec(
        (
            arb_endpoint_index(),
            arb_endpoint_index(),
            prop::sample::select(vec![53u16, 80, 81, 9090]),
            // ICMP too: only the rules without ports admit it (its port is ignored).
            prop_oneof![4 => arb_protocol(), 1 => Just(Protocol::Icmp)],
        ),
        1..25,
    )
}

fn check(
    c: &Cluster,
    rulesets: &BTreeMap<String, Ruleset>,
    probe: &Probe,
) -> Result<(), TestCaseError> {
    let Ok(eval) = evaluate(c, probe) else {
        return Ok(()); // e.g. a node as destination: not a connection to judge
    };
    let Some((allowed, traces)) = dataplane_allows(
        c,
        rulesets,
        &eval.from,
        &eval.to,
        probe.protocol,
        probe.port,
    ) else {
        return Ok(()); // node/outside to node/outside: no pod, sluice plays no part
    };
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
        probes in arb_probes(),
    ) {
        agree(DataplaneKind::Iptables, &cluster, &probes)?;
    }

    #[test]
    fn flat_nftables_rules_agree_with_the_reference_evaluator(
        cluster in arb_cluster(),
        probes in arb_probes(),
    ) {
        agree(DataplaneKind::Nftables, &cluster, &probes)?;
    }

    /// Both tiers of ClusterNetworkPolicy over NetworkPolicy, on random mixes: the
    /// iptables form walks ordered chains, the nftables form paints ordered sets,
    /// and both must mean what the evaluator says.
    #[test]
    fn iptables_rules_agree_with_the_evaluator_under_cluster_network_policies(
        cluster in arb_cluster_with_cluster_policies(),
        probes in arb_probes(),
    ) {
        agree(DataplaneKind::Iptables, &cluster, &probes)?;
    }

    #[test]
    fn flat_nftables_rules_agree_with_the_evaluator_under_cluster_network_policies(
        cluster in arb_cluster_with_cluster_policies(),
        probes in arb_probes(),
    ) {
        agree(DataplaneKind::Nftables, &cluster, &probes)?;
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
    let verdict_of = |c: &Cluster, dataplane| {
        let rs = compiled(c, dataplane);
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
    for dataplane in [DataplaneKind::Iptables, DataplaneKind::Nftables] {
        assert!(verdict_of(&c, dataplane));
    }
    c.add_policy(NetworkPolicy {
        log_allowed: Default::default(),
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
    for dataplane in [DataplaneKind::Iptables, DataplaneKind::Nftables] {
        assert!(!verdict_of(&c, dataplane), "{dataplane:?}");
    }
}
