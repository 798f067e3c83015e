//! A NetworkPolicy that cannot be read holds the pods it selects fail-closed, in the
//! reference evaluator exactly as on a node: denied both ways whatever other policies
//! allow, with a reason naming the rejected policy; loopback and the pod's own node
//! still pass, and pods it does not select keep their normal verdict.

use sluice_policy::evaluate::{HeldBy, Probe, Side, Verdict, evaluate};
use sluice_policy::{
    Cluster, LabelSelector, NamespacedName, Protocol, RejectedPolicy, read_documents,
};

const WORLD: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: x, labels: {app: web}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: x, labels: {app: db}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: y, labels: {app: web}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.12}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all, namespace: x}
spec:
  podSelector: {}
  ingress: [{}]
  egress: [{}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}]
"#;

fn cluster() -> Cluster {
    let parsed = read_documents("world.yaml", WORLD).unwrap();
    assert_eq!(parsed.rejected.len(), 1, "{:?}", parsed.rejected);
    parsed.into_cluster()
}

fn probe(from: &str, to: &str) -> Probe {
    Probe {
        from: from.parse().unwrap(),
        to: to.parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn held_by_broken(side: &Side) -> bool {
    matches!(side, Side::Held { rejected } if rejected.len() == 1
        && rejected[0].policy == NamespacedName::new("x", "broken")
        && rejected[0].reason.contains("except"))
}

#[test]
fn a_pod_selected_by_a_rejected_policy_is_denied_both_ways_naming_the_policy() {
    let c = cluster();
    let into = evaluate(&c, &probe("x/db", "x/web")).unwrap();
    assert_eq!(into.verdict, Verdict::Deny);
    assert!(held_by_broken(&into.ingress), "{:?}", into.ingress);
    assert!(
        into.reason()
            .contains("held fail-closed by rejected NetworkPolicy x/broken"),
        "{}",
        into.reason()
    );
    let out = evaluate(&c, &probe("x/web", "ip:203.0.113.1")).unwrap();
    assert_eq!(out.verdict, Verdict::Deny);
    assert!(held_by_broken(&out.egress), "{:?}", out.egress);
}

#[test]
fn pods_the_rejected_policy_does_not_select_keep_their_verdict() {
    let c = cluster();
    // db is selected only by allow-all; `other` has the label but another namespace.
    assert_eq!(
        evaluate(&c, &probe("x/db", "y/other")).unwrap().verdict,
        Verdict::Allow
    );
    assert_eq!(
        evaluate(&c, &probe("y/other", "x/db")).unwrap().verdict,
        Verdict::Allow
    );
}

#[test]
fn loopback_and_the_own_node_still_reach_a_held_pod() {
    let c = cluster();
    assert_eq!(
        evaluate(&c, &probe("x/web", "x/web")).unwrap().verdict,
        Verdict::Allow
    );
    let e = evaluate(&c, &probe("node:n1", "x/web")).unwrap();
    assert_eq!(e.ingress, Side::OwnNode);
    assert_eq!(e.verdict, Verdict::Allow);
}

#[test]
fn an_unreadable_selector_holds_the_whole_namespace() {
    let mut c = cluster();
    c.reject_policy(
        NamespacedName::new("x", "broken"),
        RejectedPolicy {
            reason: "bad selector".into(),
            pod_selector: None,
            namespace_selector: None,
        },
    );
    let e = evaluate(&c, &probe("y/other", "x/db")).unwrap();
    assert_eq!(
        e.ingress,
        Side::Held {
            rejected: vec![HeldBy {
                policy: NamespacedName::new("x", "broken"),
                reason: "bad selector".into()
            }]
        }
    );
    // A good policy of the same name replaces the rejected one.
    c.add_policy(sluice_policy::NetworkPolicy {
        log_allowed: Default::default(),
        namespace: "x".into(),
        name: "broken".into(),
        pod_selector: LabelSelector::everything(),
        ingress: vec![sluice_policy::Rule::allow_all()],
        egress: vec![],
        policy_types: sluice_policy::PolicyTypes {
            ingress: true,
            egress: false,
        },
    });
    assert!(c.rejected_policies.is_empty());
    assert_eq!(
        evaluate(&c, &probe("y/other", "x/db")).unwrap().verdict,
        Verdict::Allow
    );
}
