//! The kind e2e (tests/kind/) against the manifests: the cluster has no default CNI,
//! sluice's pool as its pod subnet and the nodes e2e.sh places pods on; every
//! scenario file e2e.sh applies exists, is applied, and has its placeholders filled.
//! (The scenario objects themselves are parsed strictly in manifests_objects.rs.)

mod manifests_common;

use std::collections::BTreeSet;

use manifests_common::{Bundle, documents_of_file, read, yaml_files_under};
use serde::Deserialize;

/// The part of kind's `Cluster` (kind.x-k8s.io/v1alpha4) this repository uses;
/// unknown fields are errors so a typo in cluster.yaml cannot pass.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindCluster {
    kind: String,
    api_version: String,
    networking: KindNetworking,
    nodes: Vec<KindNode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindNetworking {
    #[serde(rename = "disableDefaultCNI")]
    disable_default_cni: bool,
    pod_subnet: String,
    service_subnet: Option<String>,
    kube_proxy_mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KindNode {
    role: String,
}

fn cluster() -> KindCluster {
    let docs = documents_of_file("tests/kind/cluster.yaml");
    assert_eq!(docs.len(), 1);
    serde_json::from_value(docs[0].value.clone()).expect("tests/kind/cluster.yaml")
}

#[test]
fn kind_cluster_has_no_default_cni_and_sluices_pool() {
    let c = cluster();
    assert_eq!(
        (c.kind.as_str(), c.api_version.as_str()),
        ("Cluster", "kind.x-k8s.io/v1alpha4")
    );
    assert!(
        c.networking.disable_default_cni,
        "kindnet must not be installed"
    );
    assert_eq!(
        c.networking.kube_proxy_mode.as_deref(),
        Some("iptables"),
        "seed 001's checks assume kube-proxy's iptables NodePort rules"
    );
    let bundle = Bundle::load();
    let pool = bundle
        .config_map("kube-system", "sluice-config")
        .and_then(|cm| cm.data.as_ref()?.get("pool").cloned())
        .expect("sluice-config pool");
    assert_eq!(
        c.networking.pod_subnet, pool,
        "kind's podSubnet must be sluice's pool"
    );
    if let Some(svc) = &c.networking.service_subnet {
        let svc: ipnet::Ipv4Net = svc.parse().unwrap();
        let pool: ipnet::Ipv4Net = pool.parse().unwrap();
        assert!(!svc.contains(&pool.network()) && !pool.contains(&svc.network()));
    }
}

/// e2e.sh labels `$CLUSTER-worker` and `$CLUSTER-worker2` (kind's names for the
/// first two workers) as slots a and b: the cluster must have exactly those.
#[test]
fn kind_cluster_has_the_nodes_e2e_places_pods_on() {
    let roles: Vec<String> = cluster().nodes.into_iter().map(|n| n.role).collect();
    assert_eq!(roles, ["control-plane", "worker", "worker"]);
    let script = read("tests/kind/e2e.sh");
    assert!(script.contains("\"$CLUSTER-worker\" sluice.dev/e2e-slot=a"));
    assert!(script.contains("\"$CLUSTER-worker2\" sluice.dev/e2e-slot=b"));
}

#[test]
fn every_scenario_is_applied_and_every_applied_scenario_exists() {
    let script = read("tests/kind/e2e.sh");
    let applied: BTreeSet<String> = script
        .lines()
        .filter_map(|l| l.trim().strip_prefix("apply_scenario "))
        .map(|rest| rest.split_whitespace().next().unwrap().to_string())
        .collect();
    let files: BTreeSet<String> = yaml_files_under("tests/kind/scenarios")
        .into_iter()
        .map(|f| f.rsplit('/').next().unwrap().to_string())
        .collect();
    assert!(!files.is_empty());
    assert_eq!(
        applied, files,
        "e2e.sh's apply_scenario calls vs tests/kind/scenarios/"
    );
}

#[test]
fn every_placeholder_is_filled_and_every_namespace_is_created() {
    let script = read("tests/kind/e2e.sh");
    for file in yaml_files_under("tests/kind/scenarios") {
        let text = read(&file);
        let name = file.rsplit('/').next().unwrap();
        for (i, _) in text.match_indices("__") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find("__") else { continue };
            let token = &rest[..end];
            if token.is_empty() || !token.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                continue;
            }
            let placeholder = format!("__{token}__");
            let call = script.lines().find(|l| {
                l.contains(&format!("apply_scenario {name}")) && l.contains(&placeholder)
            });
            assert!(
                call.is_some(),
                "{file}: {placeholder} is not filled in where e2e.sh applies it"
            );
        }
        for doc in documents_of_file(&file) {
            if let Some(ns) = doc.value["metadata"]["namespace"].as_str() {
                assert!(
                    script.contains(&format!("namespace {ns}")),
                    "{file}: namespace {ns} is never created by e2e.sh"
                );
            }
        }
    }
}

/// Every seed with a scenario the brief calls a test is exercised.
#[test]
fn the_e2e_covers_the_seed_scenarios() {
    let script = read("tests/kind/e2e.sh");
    let main = script.split("main() {").nth(1).expect("a main function");
    for seed in ["seed_000", "seed_001", "seed_003", "seed_004"] {
        assert!(
            script.contains(&format!("{seed}() {{")),
            "{seed} is defined"
        );
        assert!(main.contains(seed), "{seed} is run");
    }
}

/// e2e.sh writes its pods from a shell function; source the script (without running
/// `main`), call that function with a stub `kubectl`, and parse what it would apply
/// strictly, for a pod with and without extra labels.
#[test]
fn the_pods_e2e_generates_are_valid_kubernetes() {
    use manifests_common::{Object, documents, parse_object, repo_root};
    let script = r#"
        set -euo pipefail
        exec 3>&1 1>&2
        source <(sed '/^main "$@"$/d' tests/kind/e2e.sh)
        k() { cat >&3; echo '---' >&3; }
        pod e2e-net net-a a app=net-a
        pod e2e-egress internet b networking/allow-internet-egress=true
        pod e2e-client client-b b
    "#;
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(repo_root())
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = documents("e2e.sh pod()", &String::from_utf8_lossy(&out.stdout));
    assert_eq!(docs.len(), 3);
    for doc in &docs {
        let Ok(Object::Pod(pod)) = parse_object(doc) else {
            panic!("{:?}", parse_object(doc));
        };
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("e2e").map(String::as_str), Some("sluice"));
    }
    assert_eq!(
        docs[1].value["metadata"]["labels"]["networking/allow-internet-egress"],
        "true"
    );
}
