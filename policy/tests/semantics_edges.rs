//! The corners of upstream NetworkPolicy semantics that the e2e matrix does not reach:
//! hostNetwork pods, nodes, named ports resolved per destination, policyTypes
//! defaulting, addresses that belong to pods, and the evaluator's errors.

use sluice_policy::evaluate::{Endpoint, EvaluateError, Probe, Side, Verdict, evaluate};
use sluice_policy::{Cluster, Protocol, parse_documents};

/// Two nodes; namespace `x` (no manifest: only its automatic name label) and `y`
/// labelled team=blue; ordinary pods and a hostNetwork pod on node-1.
const BASE: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: node-1}, status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}}
- {apiVersion: v1, kind: Node, metadata: {name: node-2}, status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}}
- {apiVersion: v1, kind: Namespace, metadata: {name: y, labels: {team: blue}}}
- apiVersion: v1
  kind: Pod
  metadata: {name: web, namespace: x, labels: {app: web}}
  spec:
    nodeName: node-1
    containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]}]
  status: {podIP: 10.0.1.10}
- apiVersion: v1
  kind: Pod
  metadata: {name: api, namespace: x, labels: {app: api}}
  spec:
    nodeName: node-2
    containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]
  status: {podIP: 10.0.2.10}
- apiVersion: v1
  kind: Pod
  metadata: {name: client, namespace: y, labels: {app: client}}
  spec: {nodeName: node-2, containers: [{name: c}]}
  status: {podIP: 10.0.2.20}
- apiVersion: v1
  kind: Pod
  metadata: {name: agent, namespace: x, labels: {app: agent}}
  spec: {nodeName: node-1, hostNetwork: true, containers: [{name: c}]}
  status: {podIP: 192.168.0.1}
- apiVersion: v1
  kind: Pod
  metadata: {name: agent2, namespace: x, labels: {app: agent}}
  spec: {nodeName: node-2, hostNetwork: true, containers: [{name: c}]}
  status: {podIP: 192.168.0.2}
- apiVersion: v1
  kind: Pod
  metadata: {name: done, namespace: x, labels: {app: web}}
  spec: {nodeName: node-1, containers: [{name: c}]}
  status: {phase: Succeeded, podIP: 10.0.1.99}
"#;

fn cluster(policies: &str) -> Cluster {
    let mut c = parse_documents("base", BASE).unwrap().into_cluster();
    parse_documents("policies", policies)
        .unwrap()
        .add_to(&mut c);
    c
}

fn probe(from: &str, to: &str, port: u16, protocol: Protocol) -> Probe {
    Probe {
        from: from.parse().unwrap(),
        to: to.parse().unwrap(),
        port,
        protocol,
    }
}

fn verdict(c: &Cluster, from: &str, to: &str, port: u16, protocol: Protocol) -> Verdict {
    evaluate(c, &probe(from, to, port, protocol))
        .unwrap()
        .verdict
}

const DENY_ALL_X: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
"#;

#[test]
fn host_network_pods_are_not_selected_by_an_empty_pod_selector() {
    let c = cluster(DENY_ALL_X);
    // x/agent2 is in x but on the host network: deny-all does not isolate it.
    let e = evaluate(&c, &probe("y/client", "x/agent2", 10250, Protocol::Tcp)).unwrap();
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(e.ingress, Side::NotPoliced);
    // Ordinary pods of x are isolated both ways.
    assert_eq!(
        verdict(&c, "y/client", "x/api", 9090, Protocol::Tcp),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&c, "x/api", "y/client", 80, Protocol::Tcp),
        Verdict::Deny
    );
}

#[test]
fn a_host_network_pod_as_a_source_is_its_node() {
    let allow_x_pods = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-x-pods, namespace: x}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{from: [{podSelector: {}}]}]
"#;
    let c = cluster(allow_x_pods);
    // x/agent (node-1) matches `podSelector: {}` by labels and namespace, but a
    // hostNetwork pod is never a pod peer: x/api on node-2 denies it.
    let e = evaluate(&c, &probe("x/agent", "x/api", 9090, Protocol::Tcp)).unwrap();
    assert_eq!(e.verdict, Verdict::Deny, "{}", e.reason());
    // x/agent2 runs on node-2, x/api's own node: always allowed.
    let e = evaluate(&c, &probe("x/agent2", "x/api", 9090, Protocol::Tcp)).unwrap();
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(e.ingress, Side::OwnNode);
    // Same through its address and through node:NAME.
    assert_eq!(
        verdict(&c, "ip:192.168.0.2", "x/api", 1, Protocol::Udp),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&c, "node:node-1", "x/api", 1, Protocol::Udp),
        Verdict::Deny
    );
    // An ordinary pod of x is admitted.
    assert_eq!(
        verdict(&c, "x/web", "x/api", 9090, Protocol::Tcp),
        Verdict::Allow
    );
}

#[test]
fn own_node_is_special_for_ingress_only() {
    let c = cluster(DENY_ALL_X);
    assert_eq!(
        verdict(&c, "node:node-1", "x/web", 8080, Protocol::Tcp),
        Verdict::Allow
    );
    // x/web → its own node's address is egress, and egress is isolated.
    assert_eq!(
        verdict(&c, "x/web", "ip:192.168.0.1", 10250, Protocol::Tcp),
        Verdict::Deny
    );
}

const NAMED_HTTP: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named-http, namespace: x}
spec:
  podSelector: {}
  ingress: [{ports: [{port: http}]}]
"#;

#[test]
fn named_ports_resolve_on_each_destination_pod() {
    let c = cluster(NAMED_HTTP);
    assert_eq!(
        verdict(&c, "y/client", "x/web", 8080, Protocol::Tcp),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&c, "y/client", "x/web", 9090, Protocol::Tcp),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&c, "y/client", "x/api", 9090, Protocol::Tcp),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&c, "y/client", "x/api", 8080, Protocol::Tcp),
        Verdict::Deny
    );
}

#[test]
fn a_named_port_needs_the_same_name_and_protocol() {
    let policies = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: names, namespace: x}
spec:
  podSelector: {}
  ingress: [{ports: [{port: nobody-declares-this}, {protocol: TCP, port: dns}]}]
"#;
    let c = cluster(policies);
    // `dns` is declared UDP; a TCP policy port of that name matches nothing.
    assert_eq!(
        verdict(&c, "y/client", "x/web", 53, Protocol::Tcp),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&c, "y/client", "x/web", 53, Protocol::Udp),
        Verdict::Deny
    );
    for port in [1, 80, 8080, 65535] {
        assert_eq!(
            verdict(&c, "y/client", "x/web", port, Protocol::Tcp),
            Verdict::Deny
        );
    }
}

#[test]
fn a_policy_with_only_egress_rules_and_no_policy_types_also_isolates_ingress() {
    // The classic surprise: policyTypes defaults to [Ingress] plus Egress when egress
    // rules exist, so this "egress policy" denies all ingress to app=web.
    let policies = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-only-rules, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  egress: [{}]
"#;
    let c = cluster(policies);
    assert_eq!(
        verdict(&c, "y/client", "x/web", 8080, Protocol::Tcp),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&c, "x/web", "y/client", 80, Protocol::Tcp),
        Verdict::Allow
    );
}

#[test]
fn an_address_owned_by_a_pod_is_that_pod() {
    let policies = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-blue, namespace: x}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]
"#;
    let c = cluster(policies);
    // 10.0.2.20 is y/client: the namespace selector matches it by identity.
    assert_eq!(
        verdict(&c, "ip:10.0.2.20", "x/web", 8080, Protocol::Tcp),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&c, "ip:10.0.2.21", "x/web", 8080, Protocol::Tcp),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&c, "y/client", "ip:10.0.1.10", 8080, Protocol::Tcp),
        Verdict::Allow
    );
}

#[test]
fn namespaces_without_a_manifest_still_carry_their_name_label() {
    let policies = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-x-by-name, namespace: x}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}}]}]
"#;
    let c = cluster(policies);
    assert!(!c.namespaces.contains_key("x"));
    assert_eq!(
        verdict(&c, "x/web", "x/api", 9090, Protocol::Tcp),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&c, "y/client", "x/api", 9090, Protocol::Tcp),
        Verdict::Deny
    );
}

#[test]
fn ip_blocks_match_pod_addresses_too() {
    let policies = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-node-2-pods, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{ipBlock: {cidr: 10.0.2.0/24, except: [10.0.2.10/32]}}]}]
"#;
    let c = cluster(policies);
    assert_eq!(
        verdict(&c, "y/client", "x/web", 8080, Protocol::Tcp),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&c, "x/api", "x/web", 8080, Protocol::Tcp),
        Verdict::Deny
    );
}

#[test]
fn the_reason_names_the_isolating_policies_and_the_rule() {
    let c = cluster(&format!("{DENY_ALL_X}---\n{NAMED_HTTP}"));
    let e = evaluate(&c, &probe("y/client", "x/web", 8080, Protocol::Tcp)).unwrap();
    assert_eq!(e.verdict, Verdict::Allow);
    let reason = e.reason();
    assert!(
        reason.contains("isolated by [x/deny-all, x/named-http]"),
        "{reason}"
    );
    assert!(
        reason.contains("allowed by x/named-http ingress[0]"),
        "{reason}"
    );
    let e = evaluate(&c, &probe("y/client", "x/web", 22, Protocol::Tcp)).unwrap();
    assert_eq!(e.verdict, Verdict::Deny);
    assert!(
        e.reason().contains("no ingress rule allows TCP/22"),
        "{}",
        e.reason()
    );
}

#[test]
fn probes_that_cannot_happen_are_errors() {
    let c = cluster(DENY_ALL_X);
    let err = |from: &str, to: &str| evaluate(&c, &probe(from, to, 80, Protocol::Tcp)).unwrap_err();
    assert!(matches!(
        err("x/nope", "x/web"),
        EvaluateError::UnknownPod(_)
    ));
    assert!(matches!(
        err("node:node-9", "x/web"),
        EvaluateError::UnknownNode(_)
    ));
    // A finished pod has given its address back.
    assert!(matches!(
        err("x/done", "x/web"),
        EvaluateError::PodWithoutIp(_)
    ));
    assert!(matches!(
        err("x/web", "node:node-1"),
        EvaluateError::NodeDestination
    ));
    assert!(matches!(
        evaluate(&c, &probe("x/web", "x/api", 0, Protocol::Tcp)),
        Err(EvaluateError::PortZero)
    ));
}

#[test]
fn endpoint_syntax() {
    assert!(matches!("x/a".parse(), Ok(Endpoint::Pod(_))));
    assert!(matches!("ip:fd00::1".parse(), Ok(Endpoint::Ip(_))));
    assert!(matches!("node:n1".parse(), Ok(Endpoint::Node(_))));
    for bad in [
        "x",
        "x/",
        "/a",
        "x/a/b",
        "ip:300.1.1.1",
        "node:",
        "10.0.0.1",
    ] {
        assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
    }
}

#[test]
fn dual_stack_pods_are_judged_in_the_destinations_family() {
    let text = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: server, namespace: ds, labels: {app: server}}
  spec: {nodeName: n1, containers: [{name: c}]}
  status: {podIPs: [{ip: 10.0.0.10}, {ip: "fd00::10"}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: client, namespace: ds}
  spec: {nodeName: n2, containers: [{name: c}]}
  status: {podIPs: [{ip: 10.0.0.20}, {ip: "fd00::20"}]}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: v6-only, namespace: ds}
  spec:
    podSelector: {matchLabels: {app: server}}
    ingress: [{from: [{ipBlock: {cidr: "fd00::/64", except: ["fd00::30/128"]}}]}]
"#;
    let c = parse_documents("ds", text).unwrap().into_cluster();
    // To the server's IPv6 address the client speaks from its IPv6 address: allowed.
    let e = evaluate(&c, &probe("ds/client", "ip:fd00::10", 80, Protocol::Tcp)).unwrap();
    assert_eq!(e.verdict, Verdict::Allow, "{}", e.reason());
    // To its IPv4 address (the first, what NS/POD means) the v6 block does not match.
    assert_eq!(
        verdict(&c, "ds/client", "ds/server", 80, Protocol::Tcp),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&c, "ip:fd00::30", "ds/server", 80, Protocol::Tcp),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&c, "ip:fd00::31", "ds/server", 80, Protocol::Tcp),
        Verdict::Allow
    );
}

#[test]
fn an_api_object_parses_without_a_text_round_trip() {
    let object = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"]}
    });
    let parsed = sluice_policy::parse_value("watch", &object).unwrap();
    let c = parsed.into_cluster();
    let p = &c.policies[&sluice_policy::NamespacedName::new("x", "p")];
    assert!(p.policy_types.egress && !p.policy_types.ingress);
    let bad = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "x"},
        "status": {"podIP": "not-an-ip"}});
    let err = sluice_policy::parse_value("watch", &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("watch: Pod x/a"), "{err}");
}
