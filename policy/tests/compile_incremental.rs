//! An incremental compile ([`sluice_policy::compile::incremental`]) equals the full
//! compile exactly, on both compiled forms, after any sequence of pod adds, deletes,
//! relabels, address and port changes, policy and ClusterNetworkPolicy adds,
//! rewrites and removals, rejected policies and namespace relabels.

use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;
use sluice_policy::compile::incremental::SetCache;
use sluice_policy::dataplane::DataplaneKind;
use sluice_policy::dataplane::node::{NodeSettings, TunnelFilter, node_ruleset, node_ruleset_with};
use sluice_policy::model::*;

mod dataplane_support;
use dataplane_support::{
    FakeVeths, NAMESPACES, NODES, arb_cluster_policy, arb_cluster_with_cluster_policies,
    arb_container_ports, arb_ns_labels, arb_pod_labels, arb_policy, mk_pod, mk_policy, num,
    pods_in, port, rule,
};

#[derive(Debug, Clone)]
enum Op {
    AddPod {
        ns: usize,
        labels: Labels,
        node: usize,
        host_network: bool,
        ports: Vec<ContainerPort>,
        ip: u8,
    },
    DeletePod(usize),
    Relabel(usize, Labels),
    Readdress(usize, u8),
    Reports(usize, Vec<ContainerPort>),
    Move(usize, usize),
    AddPolicy(NetworkPolicy),
    /// A policy's spec rewritten under its own key: what the per-pod memo of
    /// selecting policies must notice without any pod changing.
    ChangePolicy(usize, NetworkPolicy),
    DeletePolicy(usize),
    /// A policy converted again to the same value, not the same shared one (a
    /// datastore reading the object anew): its chain may be reused by equality.
    ReconvertPolicy(usize),
    RejectPolicy(usize),
    AddClusterPolicy(ClusterNetworkPolicy),
    ChangeClusterPolicy(usize, ClusterNetworkPolicy),
    DeleteClusterPolicy(usize),
    RelabelNamespace(usize, Labels),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..NAMESPACES.len(), arb_pod_labels(), 0..NODES.len(), prop::bool::weighted(0.1), arb_container_ports(), 0..12u8)
            .prop_map(|(ns, labels, node, host_network, ports, ip)| Op::AddPod { ns, labels, node, host_network, ports, ip }),
        3 => any::<usize>().prop_map(Op::DeletePod),
        3 => (any::<usize>(), arb_pod_labels()).prop_map(|(i, l)| Op::Relabel(i, l)),
        1 => (any::<usize>(), 0..12u8).prop_map(|(i, ip)| Op::Readdress(i, ip)),
        1 => (any::<usize>(), arb_container_ports()).prop_map(|(i, p)| Op::Reports(i, p)),
        1 => (any::<usize>(), 0..NODES.len()).prop_map(|(i, n)| Op::Move(i, n)),
        1 => (5..9usize).prop_flat_map(arb_policy).prop_map(Op::AddPolicy),
        1 => (any::<usize>(), (5..9usize).prop_flat_map(arb_policy)).prop_map(|(i, p)| Op::ChangePolicy(i, p)),
        1 => any::<usize>().prop_map(Op::DeletePolicy),
        1 => any::<usize>().prop_map(Op::ReconvertPolicy),
        1 => any::<usize>().prop_map(Op::RejectPolicy),
        1 => (5..7usize).prop_flat_map(arb_cluster_policy).prop_map(Op::AddClusterPolicy),
        1 => (any::<usize>(), (5..7usize).prop_flat_map(arb_cluster_policy)).prop_map(|(i, p)| Op::ChangeClusterPolicy(i, p)),
        1 => any::<usize>().prop_map(Op::DeleteClusterPolicy),
        1 => (0..NAMESPACES.len(), arb_ns_labels()).prop_map(|(i, l)| Op::RelabelNamespace(i, l)),
    ]
}

/// A small address pool, so two pods sometimes claim the same address (a stale
/// object), which a set must survive either pod leaving.
fn addr(node: usize, ip: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 244, node as u8, 2 + ip % 6))
}

fn nth_key<K: Clone, V>(map: &std::collections::BTreeMap<K, V>, i: usize) -> Option<K> {
    (!map.is_empty()).then(|| map.keys().nth(i % map.len()).unwrap().clone())
}

fn apply(c: &mut Cluster, op: Op, serial: usize) {
    let pod_key = |c: &Cluster, i| nth_key(&c.pods, i);
    match op {
        Op::AddPod {
            ns,
            labels,
            node,
            host_network,
            ports,
            ip,
        } => {
            let mut p = mk_pod(
                NAMESPACES[ns],
                &format!("q{serial}"),
                &[],
                "0.0.0.0",
                NODES[node].0,
            );
            p.labels = labels;
            p.host_network = host_network;
            p.ports = ports;
            p.ips = vec![if host_network {
                IpAddr::V4(NODES[node].1)
            } else {
                addr(node, ip)
            }];
            c.add_pod(p);
        }
        Op::DeletePod(i) => {
            if let Some(k) = pod_key(c, i) {
                c.pods.remove(&k);
            }
        }
        Op::Relabel(i, labels) => {
            if let Some(k) = pod_key(c, i) {
                c.pod_mut(&k).unwrap().labels = labels;
            }
        }
        Op::Readdress(i, ip) => {
            if let Some(k) = pod_key(c, i) {
                let p = c.pod_mut(&k).unwrap();
                if !p.host_network {
                    p.ips = vec![addr(serial % NODES.len(), ip)];
                }
            }
        }
        Op::Reports(i, ports) => {
            if let Some(k) = pod_key(c, i) {
                c.pod_mut(&k).unwrap().ports = ports;
            }
        }
        Op::Move(i, node) => {
            if let Some(k) = pod_key(c, i) {
                c.pod_mut(&k).unwrap().node = Some(NODES[node].0.to_string());
            }
        }
        Op::AddPolicy(mut p) => {
            p.name = format!("np{serial}");
            c.add_policy(p);
        }
        Op::ChangePolicy(i, mut p) => {
            if let Some(k) = nth_key(&c.policies, i) {
                (p.namespace, p.name) = (k.namespace, k.name);
                c.add_policy(p);
            }
        }
        Op::DeletePolicy(i) => {
            if let Some(k) = nth_key(&c.policies, i) {
                c.policies.remove(&k);
            }
        }
        Op::ReconvertPolicy(i) => {
            if let Some(k) = nth_key(&c.policies, i) {
                let again = NetworkPolicy::clone(&c.policies[&k]);
                c.add_policy(again);
            }
        }
        Op::RejectPolicy(i) => {
            if let Some(k) = nth_key(&c.policies, i) {
                let sel = c.policies[&k].pod_selector.clone();
                c.policies.remove(&k);
                c.reject_policy(k, RejectedPolicy::network_policy("test", Some(sel)));
            }
        }
        Op::AddClusterPolicy(mut p) => {
            p.name = format!("cnp{serial}");
            c.add_cluster_policy(p);
        }
        Op::ChangeClusterPolicy(i, mut p) => {
            if let Some(name) = nth_key(&c.cluster_policies, i) {
                p.name = name;
                c.add_cluster_policy(p);
            }
        }
        Op::DeleteClusterPolicy(i) => {
            if let Some(name) = nth_key(&c.cluster_policies, i) {
                c.cluster_policies.remove(&name);
            }
        }
        Op::RelabelNamespace(i, labels) => {
            c.add_namespace(Namespace {
                log_allowed: Default::default(),
                name: NAMESPACES[i].to_string(),
                labels,
            });
        }
    }
}

fn settings(node: &str, dataplane: DataplaneKind) -> NodeSettings {
    NodeSettings {
        node: node.into(),
        pool: "10.244.0.0/16".parse().unwrap(),
        tunnel: TunnelFilter::Ipip,
        nat_outgoing: true,
        node_ip: None,
        dataplane,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn an_incremental_compile_equals_the_full_compile_after_any_changes(
        start in arb_cluster_with_cluster_policies(),
        ops in prop::collection::vec(arb_op(), 1..12),
    ) {
        let targets: Vec<(&str, DataplaneKind)> = NODES
            .iter()
            .flat_map(|(n, _)| [(*n, DataplaneKind::Iptables), (*n, DataplaneKind::Nftables)])
            .collect();
        let mut caches: Vec<SetCache> = targets.iter().map(|_| SetCache::default()).collect();
        let mut prev = start.clone();
        for (cache, (node, kind)) in caches.iter_mut().zip(&targets) {
            node_ruleset_with(&prev, &settings(node, *kind), &FakeVeths, Some(cache)).unwrap();
        }
        for (serial, op) in ops.into_iter().enumerate() {
            let mut next = prev.clone();
            apply(&mut next, op.clone(), serial);
            for (cache, (node, kind)) in caches.iter_mut().zip(&targets) {
                let s = settings(node, *kind);
                cache.advance(&prev, &next);
                let incremental = node_ruleset_with(&next, &s, &FakeVeths, Some(cache)).unwrap();
                let full = node_ruleset(&next, &s, &FakeVeths).unwrap();
                prop_assert_eq!(&incremental, &full, "{:?} on {} ({:?}) after {:?}", kind, node, cache.stats(), op);
            }
            prev = next;
        }
    }
}

/// The cache must actually be reused, or the property above proves nothing about
/// incrementality: a new pod no peer selects recomputes no set, one a peer selects
/// is added to that peer's set, one leaving it recomputes that set only.
#[test]
fn a_new_pod_recomputes_only_the_sets_of_the_peers_that_select_it() {
    let sel = |k: &str, v: &str| sluice_policy::LabelSelector {
        match_labels: dataplane_support::labels(&[(k, v)]),
        match_expressions: vec![],
    };
    let mut c = Cluster::default();
    c.add_pod(mk_pod(
        "prod",
        "web",
        &[("app", "web")],
        "10.244.0.2",
        "node-a",
    ));
    c.add_pod(mk_pod(
        "prod",
        "api",
        &[("app", "api")],
        "10.244.1.2",
        "node-b",
    ));
    c.add_pod(mk_pod(
        "prod",
        "db",
        &[("app", "db")],
        "10.244.1.3",
        "node-b",
    ));
    c.add_policy(mk_policy(
        "prod",
        "web",
        sel("app", "web"),
        Some(vec![
            rule(
                vec![pods_in(None, sel("app", "api"))],
                vec![port(Protocol::Tcp, num(80))],
            ),
            rule(vec![pods_in(None, sel("app", "db"))], vec![]),
        ]),
        None,
    ));
    for kind in [DataplaneKind::Iptables, DataplaneKind::Nftables] {
        let s = settings(NODES[0].0, kind);
        let mut cache = SetCache::default();
        node_ruleset_with(&c, &s, &FakeVeths, Some(&mut cache)).unwrap();
        let first = cache.stats();
        assert!(first.full && first.computed == 2, "{kind:?}: {first:?}");

        let step = |cache: &mut SetCache, prev: &Cluster, next: &Cluster| {
            cache.advance(prev, next);
            let rs = node_ruleset_with(next, &s, &FakeVeths, Some(cache)).unwrap();
            assert_eq!(rs, node_ruleset(next, &s, &FakeVeths).unwrap());
            cache.stats()
        };
        let mut lonely = c.clone();
        lonely.add_pod(mk_pod(
            "prod",
            "cache",
            &[("app", "cache")],
            "10.244.1.4",
            "node-b",
        ));
        let st = step(&mut cache, &c, &lonely);
        assert_eq!(
            (st.full, st.invalidated, st.computed, st.reused),
            (false, 0, 0, 2),
            "{kind:?}"
        );

        let mut selected = lonely.clone();
        selected.add_pod(mk_pod(
            "prod",
            "api-2",
            &[("app", "api")],
            "10.244.1.5",
            "node-b",
        ));
        let st = step(&mut cache, &lonely, &selected);
        assert_eq!(
            (st.full, st.invalidated, st.patched, st.computed, st.reused),
            (false, 0, 1, 0, 2),
            "{kind:?}: a pod joining a peer's set adds its address to the entry"
        );

        // A pod leaving a peer's set (deleted, or relabelled out of it) drops the
        // entry: the set is computed again.
        let mut left = selected.clone();
        left.pods.remove(&NamespacedName::new("prod", "api-2"));
        let st = step(&mut cache, &selected, &left);
        assert_eq!(
            (st.full, st.invalidated, st.patched, st.computed, st.reused),
            (false, 1, 0, 1, 1),
            "{kind:?}: a pod leaving"
        );
        let st = step(&mut cache, &left, &selected);
        assert_eq!((st.invalidated, st.patched), (0, 1), "{kind:?}");

        // The per-policy form keeps a policy's chain while the policy is the same
        // value, shared or converted again; a changed policy's chain is built anew.
        let chains = usize::from(kind == DataplaneKind::Iptables);
        assert_eq!(st.chains_reused, chains, "{kind:?}");
        let key = NamespacedName::new("prod", "web");
        let mut again = selected.clone();
        again.add_policy(NetworkPolicy::clone(&selected.policies[&key]));
        let st = step(&mut cache, &selected, &again);
        assert_eq!(st.chains_reused, chains, "{kind:?}");
        let mut changed = again.clone();
        changed.policy_mut(&key).unwrap().ingress.pop();
        let st = step(&mut cache, &again, &changed);
        assert_eq!(st.chains_reused, 0, "{kind:?}");
    }
}

/// The flat form's class partition is taken from the previous compile exactly when
/// no region and no declared set changed, and every step still equals the full
/// compile: a pod joining an existing group, a pod founding a new group, a relabel
/// moving a pod between groups, a pod a peer selects, a policy change.
#[test]
fn the_class_partition_is_reused_only_when_its_sets_and_regions_are_unchanged() {
    let sel = |k: &str, v: &str| sluice_policy::LabelSelector {
        match_labels: dataplane_support::labels(&[(k, v)]),
        match_expressions: vec![],
    };
    let node = NODES[0].0;
    let mut c = Cluster::default();
    c.add_pod(mk_pod(
        "prod",
        "web-1",
        &[("app", "web")],
        "10.244.0.2",
        node,
    ));
    c.add_pod(mk_pod(
        "prod",
        "api",
        &[("app", "api")],
        "10.244.1.2",
        "node-b",
    ));
    c.add_pod(mk_pod("prod", "db", &[("app", "db")], "10.244.0.3", node));
    let from_api = |name: &str, app: &str, p: u16| {
        mk_policy(
            "prod",
            name,
            sel("app", app),
            Some(vec![rule(
                vec![pods_in(None, sel("app", "api"))],
                vec![port(Protocol::Tcp, num(p))],
            )]),
            None,
        )
    };
    c.add_policy(from_api("web", "web", 80));
    let s = settings(node, DataplaneKind::Nftables);
    let mut cache = SetCache::default();
    node_ruleset_with(&c, &s, &FakeVeths, Some(&mut cache)).unwrap();
    let mut step = |prev: &Cluster, next: &Cluster| {
        cache.advance(prev, next);
        let rs = node_ruleset_with(next, &s, &FakeVeths, Some(&mut cache)).unwrap();
        assert_eq!(rs, node_ruleset(next, &s, &FakeVeths).unwrap());
        cache.stats().classes_reused
    };

    let mut joined = c.clone();
    joined.add_pod(mk_pod(
        "prod",
        "web-2",
        &[("app", "web")],
        "10.244.0.4",
        node,
    ));
    assert!(
        step(&c, &joined),
        "a pod joining its group reuses the classes"
    );

    let mut founded = joined.clone();
    founded.add_policy(from_api("db", "db", 80));
    assert!(
        step(&joined, &founded),
        "a new group of the same pairs shares their sets"
    );
    let mut other = founded.clone();
    other.add_policy(from_api("db", "db", 5432));
    assert!(
        !step(&founded, &other),
        "a new group's own sets partition anew"
    );

    let mut moved = other.clone();
    moved
        .pod_mut(&NamespacedName::new("prod", "web-2"))
        .unwrap()
        .labels = dataplane_support::labels(&[("app", "db")]);
    assert!(
        step(&other, &moved),
        "a pod moving between existing groups reuses them"
    );

    let mut lonely = moved.clone();
    lonely.add_pod(mk_pod(
        "prod",
        "cache",
        &[("app", "cache")],
        "10.244.0.5",
        node,
    ));
    assert!(step(&moved, &lonely), "a pod no policy selects reuses them");

    let mut selected = lonely.clone();
    selected.add_pod(mk_pod(
        "prod",
        "api-2",
        &[("app", "api")],
        "10.244.1.3",
        "node-b",
    ));
    assert!(
        !step(&lonely, &selected),
        "a pod a peer selects changes a region"
    );

    let mut changed = selected.clone();
    changed
        .policy_mut(&NamespacedName::new("prod", "web"))
        .unwrap()
        .ingress[0]
        .ports = Ports::Any;
    assert!(
        !step(&selected, &changed),
        "a policy change declares other sets"
    );

    let mut same = changed.clone();
    same.pod_mut(&NamespacedName::new("prod", "db"))
        .unwrap()
        .labels = dataplane_support::labels(&[("app", "db"), ("v", "2")]);
    assert!(
        step(&changed, &same),
        "a relabel no selector sees reuses them"
    );
}
