//! What `sluicectl policy check` costs at scale: 10,000 pods, 1,000 policies, 200
//! namespaces, 50 nodes, given as one `kubectl get -o json`-shaped List (about 3.6 MB).
//! Measures parsing that text into a [`Cluster`] and judging one probe with the
//! reference evaluator (which walks every policy per probe, by design).
//!
//! `CARGO_TARGET_DIR=... cargo bench -p sluice-policy --bench evaluate`
//!
//! Figures seen on the project machine (2 shared cores, release build, criterion
//! medians; printed, never asserted):
//!
//! | step | time |
//! |---|---|
//! | parse the 3.3 MB List into a `Cluster` | 175 ms |
//! | judge a pod → pod probe (both sides isolated by 5 policies) | 20 µs |
//! | judge an `ip:` source (owner looked up by a scan of 10k pods) | 535 µs |

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use sluice_policy::evaluate::{Probe, Verdict, evaluate};
use sluice_policy::{Cluster, Protocol, parse_documents};

const PODS: usize = 10_000;
const NAMESPACES: usize = 200;
const POLICIES: usize = 1_000;
const NODES: usize = 50;
const TIERS: [&str; 3] = ["fe", "be", "db"];

fn manifest_text() -> String {
    let mut items = Vec::new();
    for n in 0..NODES {
        items.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n}")},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.0.{}", n + 1)}]}}));
    }
    for i in 0..NAMESPACES {
        items.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("ns-{i}"),
            "labels": {"team": format!("t{}", i % 10), "env": if i % 2 == 0 { "dev" } else { "prod" }}}}));
    }
    for p in 0..PODS {
        let node = p % NODES;
        items.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("pod-{p}"), "namespace": format!("ns-{}", p % NAMESPACES),
                "labels": {"app": format!("app-{}", p % 20), "tier": TIERS[p % 3]}},
            "spec": {"nodeName": format!("node-{node}"),
                "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": format!("10.{}.{}.{}", node, (p / 250) % 256, p % 250 + 1)}}));
    }
    for q in 0..POLICIES {
        items.push(
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("np-{q}"), "namespace": format!("ns-{}", q % NAMESPACES)},
            "spec": {"podSelector": {"matchLabels": {"app": format!("app-{}", q % 20)}},
                "ingress": [{"from": [
                        {"namespaceSelector": {"matchLabels": {"team": format!("t{}", q % 10)}},
                         "podSelector": {"matchLabels": {"tier": "fe"}}},
                        {"ipBlock": {"cidr": "172.16.0.0/12", "except": ["172.16.8.0/24"]}}],
                    "ports": [{"port": "http"}, {"port": 9000, "endPort": 9100}]}],
                "egress": [{"to": [{"namespaceSelector": {"matchExpressions":
                    [{"key": "env", "operator": "NotIn", "values": ["prod"]}]}}]}]}}),
        );
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

fn probe(from: &str, to: &str) -> Probe {
    Probe {
        from: from.parse().unwrap(),
        to: to.parse().unwrap(),
        port: 8080,
        protocol: Protocol::Tcp,
    }
}

fn bench(c: &mut Criterion) {
    let text = manifest_text();
    let cluster: Cluster = parse_documents("bench.json", &text).unwrap().into_cluster();
    let isolated = probe("ns-1/pod-1", "ns-2/pod-2");
    let external = probe("ip:203.0.113.9", "ns-125/pod-8125");
    println!(
        "input: {} bytes, {} pods, {} policies; isolated probe: {}; external probe: {}",
        text.len(),
        cluster.pods.len(),
        cluster.policies.len(),
        evaluate(&cluster, &isolated).unwrap().verdict,
        evaluate(&cluster, &external).unwrap().verdict,
    );
    assert_eq!(
        evaluate(&cluster, &isolated).unwrap().verdict,
        Verdict::Deny,
        "the scenario must exercise isolation"
    );

    let mut g = c.benchmark_group("policy_check_10k_pods_1k_policies");
    g.sample_size(10);
    g.bench_function("parse_json_list", |b| {
        b.iter(|| parse_documents("bench.json", black_box(&text)).unwrap())
    });
    g.bench_function("evaluate_isolated_probe", |b| {
        b.iter(|| evaluate(black_box(&cluster), black_box(&isolated)).unwrap())
    });
    g.bench_function("evaluate_external_source", |b| {
        b.iter(|| evaluate(black_box(&cluster), black_box(&external)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
