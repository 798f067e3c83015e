//! The operator recipes of `docs/cluster-network-policy.md`, read from the page's
//! YAML blocks (in order) so the page and the test cannot drift, each checked in
//! the reference evaluator.

use sluice_policy::evaluate::{Probe, Verdict, evaluate};
use sluice_policy::{Cluster, Protocol, read_documents};

const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {tenant: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: blog, labels: {tenant: b}}
---
apiVersion: v1
kind: Namespace
metadata: {name: monitoring}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: n1}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: blog}
spec: {nodeName: n1}
status: {podIP: 10.0.0.20}
---
apiVersion: v1
kind: Pod
metadata: {name: prom, namespace: monitoring}
spec: {nodeName: n1}
status: {podIP: 10.0.0.30}
---
apiVersion: v1
kind: Pod
metadata: {name: grafana, namespace: monitoring}
spec: {nodeName: n1}
status: {podIP: 10.0.0.31}
"#;

/// The page's ```yaml blocks, in order.
fn recipes() -> Vec<String> {
    let out = sluice_testkit::yaml_blocks(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cluster-network-policy.md"),
    );
    assert_eq!(out.len(), 3, "the page has three recipes");
    out
}

fn cluster(extra: &str) -> Cluster {
    let parsed = read_documents("recipe.yaml", &format!("{WORLD}\n---\n{extra}")).unwrap();
    assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
    parsed.into_cluster()
}

fn verdict(c: &Cluster, from: &str, to: &str, port: u16) -> Verdict {
    evaluate(
        c,
        &Probe {
            from: from.parse().unwrap(),
            to: to.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        },
    )
    .unwrap()
    .verdict
}

const ALLOW_ALL_NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: open, namespace: shop}\nspec: {podSelector: {}, ingress: [{}]}\n";

#[test]
fn tenant_isolation_denies_other_tenants_unless_the_namespace_opts_out() {
    let recipe = &recipes()[0];
    let c = cluster(&format!("{recipe}---\n{ALLOW_ALL_NP}"));
    assert_eq!(
        verdict(&c, "blog/api", "shop/web", 80),
        Verdict::Deny,
        "another tenant, even past an allow-all NetworkPolicy"
    );
    assert_eq!(
        verdict(&c, "monitoring/prom", "shop/web", 80),
        Verdict::Allow,
        "not a tenant namespace"
    );
    assert_eq!(
        verdict(&c, "shop/web", "blog/api", 80),
        Verdict::Allow,
        "tenant b has no policy"
    );
    let opted_out = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{tenant: a, tenant-isolation: open}}}}\n---\n{recipe}---\n{ALLOW_ALL_NP}"
    );
    let c = cluster(&opted_out);
    assert_eq!(
        verdict(&c, "blog/api", "shop/web", 80),
        Verdict::Allow,
        "passed to the team's NetworkPolicy"
    );
}

#[test]
fn a_protected_namespace_admits_only_itself_whatever_networkpolicies_say() {
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: open, namespace: monitoring}\nspec: {podSelector: {}, ingress: [{}]}\n";
    let c = cluster(&format!("{}---\n{np}", recipes()[1]));
    assert_eq!(
        verdict(&c, "shop/web", "monitoring/prom", 9090),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&c, "monitoring/grafana", "monitoring/prom", 9090),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&c, "monitoring/prom", "shop/web", 80),
        Verdict::Allow,
        "egress from it is not touched"
    );
}

#[test]
fn the_metadata_address_is_blocked_for_every_pod_and_nothing_else_is() {
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: egress-all, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{}]}\n";
    let c = cluster(&format!("{}---\n{np}", recipes()[2]));
    for pod in ["shop/web", "blog/api", "monitoring/prom"] {
        assert_eq!(
            verdict(&c, pod, "ip:169.254.169.254", 80),
            Verdict::Deny,
            "{pod}"
        );
        assert_eq!(
            verdict(&c, pod, "ip:169.254.169.253", 80),
            Verdict::Allow,
            "{pod}"
        );
    }
}
