//! ClusterNetworkPolicies through the Kubernetes datastore, against the fake API server
//! (real wire format: lists, watch streams of JSON lines, 404 `Status` for a resource
//! whose CRD is not installed): they reach the snapshot the compiler reads and follow
//! changes; a missing CRD is not a failure (no ClusterNetworkPolicies, a note in
//! `/readyz`, found again once installed); each gets its `Accepted` status condition,
//! written once, whatever the number of agents, and a refused write changes nothing
//! else. Also checks that the CRD manifest in
//! `manifests/crds/` is what the Rust type generates and carries upstream's validation.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kube::CustomResourceExt;
use serde_json::{Value, json};
use sluice_agent::datastore::cluster_network_policy::ClusterNetworkPolicy;
use sluice_agent::datastore::kube::{CRD_NOT_INSTALLED, KubeDatastore};
use sluice_agent::datastore::{Datastore, DatastoreHealth, Snapshot};
use sluice_agent::health::Health;
use sluice_ipam::blocks::Pool;
use sluice_ipam::store::kube::KubeStore;
use sluice_policy::{NamespacedName, Tier};
use sluice_testkit::fake_kube::{self, CLUSTER_POLICIES, Fake, Shared};

const CRD: &str = "manifests/crds/clusternetworkpolicies.policy.networking.k8s.io.yaml";

fn repo_file(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The CRD manifest is what `ClusterNetworkPolicy::crd()` generates from the policy
/// crate's wire types. Regenerate with
/// `SLUICE_WRITE_CRD=1 cargo test -p sluice-agent --test cnp_kube_datastore crd_manifest`.
#[test]
fn crd_manifest_matches_the_rust_type() {
    let path = repo_file(CRD);
    let generated = serde_json::to_value(ClusterNetworkPolicy::crd()).unwrap();
    if std::env::var_os("SLUICE_WRITE_CRD").is_some() {
        let yaml = serde_yaml_ng::to_string(&generated).unwrap();
        let header = "# ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2, kubernetes-sigs/network-policy-api):\n\
                      # admin and baseline tiers around NetworkPolicy. Generated from\n\
                      # sluice_agent::datastore::cluster_network_policy::ClusterNetworkPolicy, whose spec is\n\
                      # sluice_policy::wire (node-agent/tests/cnp_kube_datastore.rs checks it;\n\
                      # SLUICE_WRITE_CRD=1 regenerates). docs/cluster-network-policy.md says how to install it.\n";
        std::fs::write(&path, format!("{header}{yaml}")).unwrap();
    }
    let on_disk: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&path).expect("CRD manifest exists"))
            .unwrap();
    assert_eq!(on_disk, generated, "regenerate with SLUICE_WRITE_CRD=1");
    assert_eq!(
        on_disk["metadata"]["name"],
        "clusternetworkpolicies.policy.networking.k8s.io"
    );
    assert_eq!(on_disk["spec"]["scope"], "Cluster");
    assert_eq!(on_disk["spec"]["names"]["shortNames"], json!(["cnp"]));
}

/// The validation upstream's CRD carries (kubebuilder markers and CEL rules of
/// `apis/v1alpha2/clusternetworkpolicy_types.go`) is in the schema sluice generates.
#[test]
fn the_crd_schema_carries_the_upstream_validation() {
    let crd = serde_json::to_value(ClusterNetworkPolicy::crd()).unwrap();
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha2");
    assert_eq!(version["subresources"]["status"], json!({}));
    let root = &version["schema"]["openAPIV3Schema"]["properties"];
    let spec = &root["spec"]["properties"];
    assert_eq!(spec["tier"]["enum"], json!(["Admin", "Baseline"]));
    // JSONSchemaProps holds bounds as f64: they serialize as 0.0 and 1000.0.
    assert_eq!(
        (
            spec["priority"]["minimum"].as_f64(),
            spec["priority"]["maximum"].as_f64()
        ),
        (Some(0.0), Some(1000.0))
    );
    let required = &root["spec"]["required"];
    for f in ["tier", "priority", "subject"] {
        assert!(required.as_array().unwrap().contains(&json!(f)), "{f}");
    }
    let subject = &spec["subject"];
    assert_eq!(
        (&subject["minProperties"], &subject["maxProperties"]),
        (&json!(1), &json!(1))
    );
    for direction in ["ingress", "egress"] {
        assert_eq!(spec[direction]["maxItems"], 25, "{direction}");
    }
    let ingress = &spec["ingress"]["items"];
    let egress = &spec["egress"]["items"];
    assert_eq!(ingress["properties"]["name"]["maxLength"], 100);
    assert_eq!(
        ingress["properties"]["action"]["enum"],
        json!(["Accept", "Deny", "Pass"])
    );
    let from = &ingress["properties"]["from"];
    assert_eq!(
        (&from["minItems"], &from["maxItems"]),
        (&json!(1), &json!(25))
    );
    assert!(
        ingress["required"]
            .as_array()
            .unwrap()
            .contains(&json!("from"))
    );
    let ingress_peer = &from["items"];
    assert_eq!(ingress_peer["maxProperties"], 1);
    let ingress_forms: Vec<_> = ingress_peer["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(ingress_forms, ["namespaces", "pods"], "ingress peers");
    let egress_peer = &egress["properties"]["to"]["items"]["properties"];
    let networks = &egress_peer["networks"];
    assert_eq!(networks["x-kubernetes-list-type"], "set");
    assert_eq!(networks["items"]["maxLength"], 43);
    assert_eq!(
        networks["items"]["x-kubernetes-validations"][0]["rule"],
        "isCIDR(self)"
    );
    assert!(egress_peer["domainNames"]["items"]["pattern"].is_string());
    let rules: Vec<_> = egress["x-kubernetes-validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule"].as_str().unwrap().to_string())
        .collect();
    assert!(
        rules.iter().any(|r| r.contains("destinationNamedPort")),
        "{rules:?}"
    );
    let protocol = &ingress["properties"]["protocols"]["items"];
    assert_eq!(protocol["maxProperties"], 1);
    let port = &protocol["properties"]["tcp"]["properties"]["destinationPort"];
    assert_eq!(
        port["properties"]["number"]["maximum"].as_f64(),
        Some(65535.0)
    );
    assert_eq!(
        port["properties"]["range"]["x-kubernetes-validations"][0]["rule"],
        "self.start < self.end"
    );
    let conditions = &root["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
}

fn cnp(name: &str, priority: i64, port: u16) -> Value {
    json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": name, "uid": format!("cnp-{name}"), "generation": 1},
           "spec": {"tier": "Admin", "priority": priority,
                    "subject": {"namespaces": {"matchLabels": {"tenant": "a"}}},
                    "ingress": [{"name": "no-ssh", "action": "Deny",
                                 "from": [{"namespaces": {}}],
                                 "protocols": [{"tcp": {"destinationPort": {"number": port}}}]}]}})
}

async fn fake_api(installed: bool) -> (kube::Client, Shared) {
    let shared = Fake::with_nodes(&[("n1", "192.168.1.1")]);
    shared.lock().unwrap().cluster_policies_installed = installed;
    let addr = fake_kube::start_local(shared.clone()).await;
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    (kube::Client::try_from(config).unwrap(), shared)
}

struct Agent {
    rx: tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>,
    datastore: Arc<DatastoreHealth>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn start(client: kube::Client) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::new("10.250.0.0/24".parse().unwrap(), 29).unwrap();
    let datastore = Arc::new(DatastoreHealth::default());
    let ds = KubeDatastore::new(
        client.clone(),
        KubeStore::new(client),
        pool,
        "n1".into(),
        dir.path().join("node-blocks.json"),
        Duration::from_millis(20),
    )
    .with_health(datastore.clone());
    let (tx, rx) = tokio::sync::watch::channel(None);
    let task = tokio::spawn(async move {
        ds.run(tx).await.unwrap();
    });
    Agent {
        rx,
        datastore,
        task,
        _dir: dir,
    }
}

/// The next snapshot that satisfies `cond` (up to 30 s: a rediscovery waits out the
/// watcher's backoff).
async fn snapshot(a: &mut Agent, what: &str, cond: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
    tokio::time::timeout(
        Duration::from_secs(30),
        a.rx.wait_for(|s| s.as_ref().is_some_and(|s| cond(s))),
    )
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
    .unwrap()
    .clone()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_network_policies_reach_the_snapshot_and_follow_changes() {
    let (client, shared) = fake_api(true).await;
    Fake::apply(&shared, CLUSTER_POLICIES, cnp("deny-ssh", 10, 22));
    let mut a = start(client);

    // The very first snapshot already has it: one without it would open, for a
    // moment, what the Admin tier denies.
    let first = snapshot(&mut a, "a first snapshot", |_| true).await;
    let p = &first.cluster.cluster_policies["deny-ssh"];
    assert_eq!((p.tier, p.priority), (Tier::Admin, 10));
    assert_eq!(p.ingress[0].name.as_deref(), Some("no-ssh"));
    assert!(a.datastore.notes().is_empty(), "{:?}", a.datastore.notes());

    // A change arrives through the watch.
    Fake::apply(&shared, CLUSTER_POLICIES, cnp("deny-ssh", 20, 22));
    snapshot(&mut a, "the new priority", |s| {
        s.cluster
            .cluster_policies
            .get("deny-ssh")
            .is_some_and(|p| p.priority == 20)
    })
    .await;

    // One the API would have refused (an older CRD without its validation): named,
    // and its subject held fail-closed, through the same reader as a file.
    Fake::apply(&shared, CLUSTER_POLICIES, cnp("too-low", 5000, 22));
    let s = snapshot(&mut a, "the rejected policy", |s| {
        s.cluster
            .rejected_policies
            .contains_key(&NamespacedName::cluster_scoped("too-low"))
    })
    .await;
    let r = &s.cluster.rejected_policies[&NamespacedName::cluster_scoped("too-low")];
    assert!(r.reason.contains("priority 5000"), "{}", r.reason);

    // Deleting removes them.
    Fake::delete(&shared, CLUSTER_POLICIES, cnp("deny-ssh", 20, 22));
    Fake::delete(&shared, CLUSTER_POLICIES, cnp("too-low", 5000, 22));
    snapshot(&mut a, "no cluster policies", |s| {
        s.cluster.cluster_policies.is_empty() && s.cluster.rejected_policies.is_empty()
    })
    .await;
    a.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_crd_the_agent_runs_notes_it_in_readyz_and_finds_it_once_installed() {
    let (client, shared) = fake_api(false).await;
    let mut a = start(client);

    let first = snapshot(&mut a, "a first snapshot without the CRD", |_| true).await;
    assert!(first.cluster.cluster_policies.is_empty());
    assert!(
        first.blocks_of("n1").len() == 1,
        "the rest of the agent runs"
    );
    let health = Health::new(Duration::from_secs(60)).with_datastore(a.datastore.clone());
    health.applied();
    let view = health.view();
    assert!(
        view.serving_ready(),
        "a missing optional CRD is not an outage: {view:?}"
    );
    assert_eq!(
        view.datastore_notes,
        [format!("ClusterNetworkPolicy: {CRD_NOT_INSTALLED}")]
    );
    let probes = shared.lock().unwrap().cluster_policy_lists;
    assert!(probes >= 1);

    // The CRD is installed and a policy created: the agent finds both by itself.
    {
        shared.lock().unwrap().cluster_policies_installed = true;
    }
    Fake::apply(&shared, CLUSTER_POLICIES, cnp("deny-ssh", 10, 22));
    snapshot(&mut a, "the policy after the CRD appeared", |s| {
        s.cluster.cluster_policies.contains_key("deny-ssh")
    })
    .await;
    assert!(
        a.datastore.notes().is_empty(),
        "the note is gone: {:?}",
        a.datastore.notes()
    );
    assert!(shared.lock().unwrap().cluster_policy_lists > probes);
    a.task.abort();
}

/// A policy whose second egress peer is `domainNames`, which sluice does not implement.
fn cnp_with_domain_names(name: &str) -> Value {
    json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": name, "uid": format!("cnp-{name}"), "generation": 4},
           "spec": {"tier": "Admin", "priority": 30,
                    "subject": {"namespaces": {}},
                    "egress": [{"action": "Accept",
                                "to": [{"networks": ["10.0.0.0/8"]},
                                       {"domainNames": ["example.com"]}]}]}})
}

/// The `Accepted` condition the fake holds for `name`, if written.
fn condition(shared: &Shared, name: &str) -> Option<Value> {
    let f = shared.lock().unwrap();
    let obj = f.objects.get(CLUSTER_POLICIES)?.get(&format!("/{name}"))?;
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .cloned()
}

fn patches(shared: &Shared) -> usize {
    shared.lock().unwrap().status_patches.len()
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..300 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_gets_its_accepted_condition_written_once() {
    let (client, shared) = fake_api(true).await;
    Fake::apply(&shared, CLUSTER_POLICIES, cnp("deny-ssh", 10, 22));
    Fake::apply(
        &shared,
        CLUSTER_POLICIES,
        cnp_with_domain_names("to-example"),
    );
    Fake::apply(&shared, CLUSTER_POLICIES, cnp("too-low", 5000, 22));
    let mut a = start(client.clone());
    snapshot(&mut a, "a first snapshot", |_| true).await;
    eventually("three conditions", || {
        ["deny-ssh", "to-example", "too-low"]
            .iter()
            .all(|n| condition(&shared, n).is_some())
    })
    .await;

    let c = condition(&shared, "deny-ssh").unwrap();
    assert_eq!(
        (&c["status"], &c["reason"]),
        (&json!("True"), &json!("Accepted"))
    );
    assert_eq!(c["observedGeneration"], 1);
    assert!(
        c["lastTransitionTime"].as_str().unwrap().ends_with('Z'),
        "{c}"
    );

    // domainNames: accepted, the unimplemented field named, the rest enforced.
    let c = condition(&shared, "to-example").unwrap();
    assert_eq!(
        (&c["status"], &c["reason"]),
        (&json!("True"), &json!("NotImplemented"))
    );
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("spec.egress[0].to[1].domainNames"),
        "{c}"
    );
    assert_eq!(c["observedGeneration"], 4);

    let c = condition(&shared, "too-low").unwrap();
    assert_eq!(
        (&c["status"], &c["reason"]),
        (&json!("False"), &json!("Invalid"))
    );
    let message = c["message"].as_str().unwrap();
    assert!(message.starts_with("spec.priority: "), "{message}");
    assert!(message.contains("5000"), "{message}");

    {
        let f = shared.lock().unwrap();
        assert_eq!(f.status_patches.len(), 3, "{:?}", f.status_patches);
        for p in &f.status_patches {
            assert_eq!(p.content_type, "application/apply-patch+yaml");
            assert_eq!(p.field_manager.as_deref(), Some("sluice-agent"));
            assert!(p.force);
            assert_eq!(p.body["status"]["conditions"].as_array().unwrap().len(), 1);
        }
    }

    // The writes came back through the watch; later syncs, and a second agent with
    // the same objects, find the status already right and write nothing.
    let mut b = start(client);
    snapshot(&mut b, "the second agent's first snapshot", |s| {
        s.cluster.cluster_policies.contains_key("to-example")
    })
    .await;
    Fake::apply(&shared, CLUSTER_POLICIES, cnp("later", 40, 80));
    eventually("the new policy's condition", || {
        condition(&shared, "later").is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written: Vec<String> = shared.lock().unwrap().status_patches[3..]
        .iter()
        .map(|p| p.name.clone())
        .collect();
    assert!(
        !written.is_empty() && written.iter().all(|n| n == "later"),
        "only the new policy is written (once per agent at most): {written:?}"
    );
    assert!(written.len() <= 2, "{written:?}");

    // A new generation that stays accepted: observedGeneration moves, the
    // transition time does not.
    let before = condition(&shared, "deny-ssh").unwrap();
    let mut changed = cnp("deny-ssh", 11, 22);
    changed["metadata"]["generation"] = json!(2);
    changed["status"] = json!({"conditions": [before.clone()]});
    Fake::apply(&shared, CLUSTER_POLICIES, changed);
    eventually("observedGeneration 2", || {
        condition(&shared, "deny-ssh").is_some_and(|c| c["observedGeneration"] == 2)
    })
    .await;
    assert_eq!(
        condition(&shared, "deny-ssh").unwrap()["lastTransitionTime"],
        before["lastTransitionTime"]
    );
    a.task.abort();
    b.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_status_write_is_logged_and_the_policy_still_applies() {
    let (client, shared) = fake_api(true).await;
    shared.lock().unwrap().status_patch_error = Some(403);
    Fake::apply(&shared, CLUSTER_POLICIES, cnp("deny-ssh", 10, 22));
    let mut a = start(client);
    let first = snapshot(&mut a, "a first snapshot", |_| true).await;
    assert!(first.cluster.cluster_policies.contains_key("deny-ssh"));
    eventually("the refused write", || patches(&shared) == 1).await;

    // Enforcement goes on: a change still reaches the snapshot, and the refused
    // write is not retried at every sync.
    Fake::apply(&shared, CLUSTER_POLICIES, cnp("deny-dns", 20, 53));
    snapshot(&mut a, "the second policy", |s| {
        s.cluster.cluster_policies.contains_key("deny-dns")
    })
    .await;
    eventually("the second policy's refused write", || {
        patches(&shared) == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let names: Vec<String> = shared
        .lock()
        .unwrap()
        .status_patches
        .iter()
        .map(|p| p.name.clone())
        .collect();
    assert_eq!(names, ["deny-ssh", "deny-dns"]);
    assert!(condition(&shared, "deny-ssh").is_none());
    a.task.abort();
}
