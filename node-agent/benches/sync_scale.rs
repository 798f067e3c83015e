//! Sync time and rule counts for a large cluster: 10,000 pods and 1,000 policies.
//!
//! `cargo bench -p sluice-agent --bench sync_scale` (as root for the kernel part,
//! which runs in a throwaway network namespace). Prints a table; asserts nothing about
//! time. Scenarios: a realistic node (10,000 pods cluster-wide, 110 on this node) and
//! a stress case (every one of the 10,000 pods on this node).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_agent::dataplane::{Backend, Dataplane, ExecRunner, SyncMode};
use sluice_agent::datastore::Snapshot;
use sluice_agent::datastore::objects::convert;
use sluice_agent::reconcile::{self, NodeSettings, TunnelFilter};
use sluice_policy::RawObject;

const PODS: usize = 10_000;
const POLICIES: usize = 1_000;
const NAMESPACES: usize = 100;
const NODES: usize = 91; // 10,000 / 110 rounded up

fn objects(local_pods: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for n in 0..NODES {
        out.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n}")},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.{}.{}", n / 250, n % 250 + 1)}]}}));
    }
    for ns in 0..NAMESPACES {
        out.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns-{ns}"), "labels": {"team": format!("t{}", ns % 10)}}}));
    }
    for i in 0..PODS {
        // The first `local_pods` pods run on node-0; the rest spread over the others.
        let node = if i < local_pods {
            0
        } else {
            1 + i % (NODES - 1)
        };
        out.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("pod-{i}"), "namespace": format!("ns-{}", i % NAMESPACES),
                         "labels": {"app": format!("app-{}", i % 20), "tier": if i % 2 == 0 {"fe"} else {"be"}}},
            "spec": {"nodeName": format!("node-{node}"),
                     "containers": [{"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": format!("10.244.{}.{}", i / 250, i % 250 + 2)}}));
    }
    for p in 0..POLICIES {
        let ns = p % NAMESPACES;
        let mut spec = json!({
            "podSelector": {"matchLabels": {"app": format!("app-{}", p % 20)}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", (p + 1) % 20)}}},
                          {"namespaceSelector": {"matchLabels": {"team": format!("t{}", p % 10)}},
                           "podSelector": {"matchLabels": {"tier": "fe"}}}],
                 "ports": [{"port": 8080, "protocol": "TCP"}, {"port": "http"}]},
                {"from": [{"ipBlock": {"cidr": format!("172.{}.0.0/16", 16 + p % 16), "except": [format!("172.{}.1.0/24", 16 + p % 16)]}}],
                 "ports": [{"port": 443, "endPort": 450}]}
            ]
        });
        if p % 4 == 0 {
            spec["policyTypes"] = json!(["Ingress", "Egress"]);
            spec["egress"] = json!([{"to": [{"podSelector": {}}]}, {"ports": [{"port": 53, "protocol": "UDP"}]}]);
        }
        out.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("pol-{p}"), "namespace": format!("ns-{ns}")}, "spec": spec}));
    }
    out
}

fn snapshot(objs: &[Value]) -> Snapshot {
    let objs: Vec<RawObject> = objs
        .iter()
        .map(|v| RawObject::new("bench", v.clone()))
        .collect();
    let conv = convert(&objs);
    assert!(
        conv.cluster.rejected_policies.is_empty(),
        "{:?}",
        conv.cluster.rejected_policies.values().next()
    );
    Snapshot {
        cluster: conv.cluster,
        blocks: (0..NODES)
            .map(|n| {
                (
                    format!("10.244.{}.0/24", n).parse().unwrap(),
                    format!("node-{n}"),
                )
            })
            .collect(),
        ..Default::default()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn scenario(name: &str, local: usize, kernel: bool) {
    let settings = NodeSettings {
        node: "node-0".into(),
        pool: "10.244.0.0/16".parse().unwrap(),
        tunnel: TunnelFilter::Ipip,
        nat_outgoing: true,
        node_ip: None,
        dataplane: sluice_policy::dataplane::DataplaneKind::Iptables,
    };
    let objs = objects(local);
    let t = Instant::now();
    let snap = snapshot(&objs);
    let t_convert = t.elapsed();
    let t = Instant::now();
    let desired = reconcile::desired(&snap, &settings).unwrap();
    let t_desired = t.elapsed();
    let chains: usize = desired.dataplane.tables.values().map(|t| t.len()).sum();
    println!(
        "## {name}: {PODS} pods ({local} on this node), {POLICIES} policies, {NAMESPACES} namespaces, {NODES} nodes"
    );
    println!("| step | result |\n|---|---|");
    println!("| convert objects → model | {} |", ms(t_convert));
    println!("| compile + agent rules (pure) | {} |", ms(t_desired));
    println!(
        "| owned chains / rules | {chains} / {} |",
        desired.dataplane.rule_count()
    );
    println!(
        "| ipsets / members | {} / {} |",
        desired.dataplane.sets.len(),
        desired.dataplane.set_member_count()
    );

    if !kernel {
        println!("| kernel apply | skipped (not root) |\n");
        return;
    }
    sluice_testkit::in_new_netns(|| {
        let dp = Dataplane::new(ExecRunner, Backend::Nft);
        let t = Instant::now();
        let r = dp.sync(&desired.dataplane).unwrap();
        println!(
            "| first apply (ipset restore + iptables-nft-restore) | {} ({} chains written) |",
            ms(t.elapsed()),
            r.chains_rewritten
        );
        let mut noop = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let r = dp.sync(&desired.dataplane).unwrap();
            assert!(!r.changed_anything());
            noop.push(t.elapsed());
        }
        noop.sort();
        println!(
            "| no-op resync (save, parse, compare), median of 5 | {} |",
            ms(noop[2])
        );

        // One new local pod: the ADD-to-enforced work at this scale.
        let mut objs2 = objs.clone();
        objs2.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "newcomer", "namespace": "ns-0", "labels": {"app": "app-0", "tier": "fe"}},
            "spec": {"nodeName": "node-0", "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": "10.244.200.2"}}));
        let t = Instant::now();
        let snap2 = snapshot(&objs2);
        let d2 = reconcile::desired(&snap2, &settings).unwrap();
        let t_pure = t.elapsed();
        let t = Instant::now();
        let r = dp.sync_with(&d2.dataplane, SyncMode::Incremental).unwrap();
        println!(
            "| one new local pod: convert+compile / incremental apply | {} / {} ({} chains rewritten, {} set members changed) |",
            ms(t_pure),
            ms(t.elapsed()),
            r.chains_rewritten,
            r.set_members_changed
        );
        // The same change found by a full resync (kernel read back first).
        dp.sync(&desired.dataplane).unwrap();
        let t = Instant::now();
        dp.sync_with(&d2.dataplane, SyncMode::Full).unwrap();
        println!(
            "| one new local pod, full-read apply | {} |",
            ms(t.elapsed())
        );
        let saved = sluice_testkit::sh("iptables-nft-save | grep -c '^-A SLUICE'");
        println!(
            "| rules in the kernel (iptables-save) | {} |\n",
            saved.trim()
        );
    });
}

fn main() {
    // `cargo bench` passes --bench; anything else is ignored.
    let root = nix::unistd::geteuid().is_root();
    scenario("realistic node", 110, root);
    scenario("stress: every pod on this node", PODS, root);
}
