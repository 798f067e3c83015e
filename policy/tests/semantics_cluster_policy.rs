//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`) in the reference
//! evaluator: every validation rule of the upstream API is a named error and holds
//! the subject's pods fail-closed; the tiers decide in the order upstream gives
//! (Admin by priority then rule order, NetworkPolicy, Baseline only for pods no
//! NetworkPolicy isolates), each side of a connection alone.

use sluice_policy::convert::ConvertError;
use sluice_policy::evaluate::{Probe, Side, Verdict, evaluate};
use sluice_policy::{Cluster, ClusterPolicyError, Protocol, Tier, read_documents};

const WORLD: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {role: worker}}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: tenant-a, labels: {tenant: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: tenant-b, labels: {tenant: b}}
---
apiVersion: v1
kind: Namespace
metadata: {name: monitoring}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: tenant-a, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: tenant-b, labels: {app: api}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.20}
---
apiVersion: v1
kind: Pod
metadata: {name: prom, namespace: monitoring, labels: {app: prometheus}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.30}
"#;

fn cluster(policies: &str) -> Cluster {
    let text = format!("{WORLD}\n---\n{policies}");
    let parsed = read_documents("world.yaml", &text).unwrap();
    assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
    parsed.into_cluster()
}

fn check(
    c: &Cluster,
    from: &str,
    to: &str,
    port: u16,
    protocol: Protocol,
) -> sluice_policy::Evaluation {
    evaluate(
        c,
        &Probe {
            from: from.parse().unwrap(),
            to: to.parse().unwrap(),
            port,
            protocol,
        },
    )
    .unwrap()
}

fn verdict(c: &Cluster, from: &str, to: &str, port: u16) -> Verdict {
    check(c, from, to, port, Protocol::Tcp).verdict
}

fn cnp(name: &str, tier: &str, priority: i64, body: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n{body}\n---\n"
    )
}

#[test]
fn an_admin_deny_overrides_a_networkpolicy_that_allows() {
    let c = cluster(
        &(cnp(
            "isolate-tenants",
            "Admin",
            10,
            "  subject: {namespaces: {matchLabels: {tenant: a}}}\n  ingress:\n  - name: no-other-tenants\n    action: Deny\n    from: [{namespaces: {matchExpressions: [{key: tenant, operator: NotIn, values: [a]}]}}]\n",
        ) + "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-all, namespace: tenant-a}\nspec: {podSelector: {}, ingress: [{}]}\n"),
    );
    let e = check(&c, "tenant-b/api", "tenant-a/web", 8080, Protocol::Tcp);
    assert_eq!(e.verdict, Verdict::Deny);
    let Side::ClusterPolicy { by } = &e.ingress else {
        panic!("{}", e.reason())
    };
    assert_eq!(
        (by.tier, by.policy.as_str(), by.rule),
        (Tier::Admin, "isolate-tenants", 0)
    );
    assert_eq!(by.name.as_deref(), Some("no-other-tenants"));
    assert!(e.reason().contains("Admin ClusterNetworkPolicy isolate-tenants (priority 10) ingress[0] \"no-other-tenants\": Deny"), "{}", e.reason());
    // monitoring has no tenant label: NotIn matches it too, so it is denied as well.
    assert_eq!(
        verdict(&c, "monitoring/prom", "tenant-a/web", 8080),
        Verdict::Deny
    );
    // Same tenant: no admin rule matches, the NetworkPolicy allows.
    assert_eq!(
        verdict(&c, "tenant-a/web", "tenant-a/web", 8080),
        Verdict::Allow
    );
}

#[test]
fn a_lower_priority_value_wins_and_rules_keep_written_order() {
    let deny =
        "  subject: {namespaces: {}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n";
    let accept = "  subject: {namespaces: {}}\n  ingress:\n  - {action: Accept, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: prometheus}}}}]}\n  - {action: Deny, from: [{namespaces: {}}]}\n";
    let c = cluster(&(cnp("deny", "Admin", 20, deny) + &cnp("allow-prom", "Admin", 5, accept)));
    assert_eq!(
        verdict(&c, "monitoring/prom", "tenant-a/web", 80),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&c, "tenant-b/api", "tenant-a/web", 80),
        Verdict::Deny
    );
    let c = cluster(&(cnp("deny", "Admin", 1, deny) + &cnp("allow-prom", "Admin", 5, accept)));
    assert_eq!(
        verdict(&c, "monitoring/prom", "tenant-a/web", 80),
        Verdict::Deny
    );
}

#[test]
fn pass_hands_the_decision_to_networkpolicy_and_then_to_the_baseline() {
    let admin = cnp(
        "pass-monitoring",
        "Admin",
        1,
        "  subject: {namespaces: {}}\n  ingress:\n  - {name: to-np, action: Pass, from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]}\n  - {action: Deny, from: [{namespaces: {}}]}\n",
    );
    let baseline = cnp(
        "baseline-deny",
        "Baseline",
        1,
        "  subject: {namespaces: {}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n",
    );
    let c = cluster(&(admin.clone() + &baseline));
    // Passed, no NetworkPolicy isolates tenant-a/web, the baseline denies.
    let e = check(&c, "monitoring/prom", "tenant-a/web", 80, Protocol::Tcp);
    assert_eq!(e.verdict, Verdict::Deny, "{}", e.reason());
    assert_eq!(e.ingress_passed.len(), 1);
    assert!(e.reason().contains("passed on by Admin"), "{}", e.reason());
    // A NetworkPolicy selecting the pod replaces the baseline for it.
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-monitoring, namespace: tenant-a}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]}]\n";
    let c = cluster(&(admin + &baseline + np));
    assert_eq!(
        verdict(&c, "monitoring/prom", "tenant-a/web", 80),
        Verdict::Allow
    );
}

#[test]
fn egress_accept_does_not_bypass_the_destinations_ingress() {
    let c = cluster(
        &(cnp(
            "egress-ok",
            "Admin",
            1,
            "  subject: {namespaces: {}}\n  egress:\n  - {action: Accept, to: [{networks: [0.0.0.0/0]}]}\n",
        ) + &cnp(
            "ingress-no",
            "Admin",
            2,
            "  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: api}}}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n",
        )),
    );
    let e = check(&c, "tenant-a/web", "tenant-b/api", 80, Protocol::Tcp);
    assert!(e.egress.allows());
    assert_eq!(e.verdict, Verdict::Deny);
}

#[test]
fn protocols_ports_ranges_and_named_ports_match_as_written() {
    let c = cluster(&cnp(
        "ports",
        "Admin",
        1,
        "  subject: {namespaces: {}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}], protocols: [{udp: {destinationPort: {number: 53}}}, {sctp: {destinationPort: {range: {start: 9000, end: 9010}}}}, {destinationNamedPort: http}]}\n",
    ));
    let deny = |port, proto| check(&c, "tenant-b/api", "tenant-a/web", port, proto).verdict;
    assert_eq!(deny(53, Protocol::Udp), Verdict::Deny);
    assert_eq!(deny(53, Protocol::Tcp), Verdict::Allow);
    assert_eq!(deny(9005, Protocol::Sctp), Verdict::Deny);
    assert_eq!(deny(9011, Protocol::Sctp), Verdict::Allow);
    assert_eq!(
        deny(8080, Protocol::Tcp),
        Verdict::Deny,
        "http resolves to 8080/TCP on web"
    );
    assert_eq!(deny(8080, Protocol::Udp), Verdict::Allow);
}

/// Upstream (apis/v1alpha2 `protocols`: "If unspecified, protocol-specific
/// attributes will not be used to match traffic"; `networks` "matches both regular IP
/// traffic and ICMP traffic"): a rule without protocols matches ICMP, a rule with
/// protocols (ports or named ports) never does, and NetworkPolicy ports likewise.
#[test]
fn icmp_is_matched_only_by_rules_without_protocols() {
    let icmp = |c: &Cluster, from: &str, to: &str| check(c, from, to, 0, Protocol::Icmp).verdict;
    let with_ports = cnp(
        "ports-only",
        "Admin",
        1,
        "  subject: {namespaces: {}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 80}}}, {destinationNamedPort: http}]}\n",
    );
    let c = cluster(&with_ports);
    assert_eq!(icmp(&c, "tenant-b/api", "tenant-a/web"), Verdict::Allow);
    let everything = cnp(
        "everything",
        "Admin",
        2,
        "  subject: {namespaces: {}}\n  egress:\n  - {action: Deny, to: [{networks: [0.0.0.0/0]}]}\n",
    );
    let c = cluster(&(with_ports + &everything));
    let e = check(&c, "tenant-b/api", "tenant-a/web", 0, Protocol::Icmp);
    assert_eq!(e.verdict, Verdict::Deny, "{}", e.reason());
    assert!(e.reason().contains("everything"), "{}", e.reason());
    // A NetworkPolicy port names a protocol too: only its port-less rules admit ICMP.
    let np = |ports: &str| {
        cluster(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np, namespace: tenant-a}}\nspec:\n  podSelector: {{}}\n  ingress: [{{from: [{{namespaceSelector: {{}}}}]{ports}}}]\n"
        ))
    };
    assert_eq!(
        icmp(
            &np(", ports: [{protocol: TCP}]"),
            "tenant-b/api",
            "tenant-a/web"
        ),
        Verdict::Deny
    );
    assert_eq!(
        icmp(&np(""), "tenant-b/api", "tenant-a/web"),
        Verdict::Allow
    );
}

#[test]
fn egress_to_networks_and_nodes_and_domain_names_are_read() {
    let text = format!(
        "{WORLD}\n---\n{}",
        cnp(
            "egress",
            "Admin",
            1,
            "  subject: {namespaces: {}}\n  egress:\n  - {action: Accept, to: [{domainNames: [\"*.example.com\"]}]}\n  - {action: Deny, to: [{networks: [169.254.169.254/32]}]}\n  - {action: Deny, to: [{nodes: {matchLabels: {role: worker}}}]}\n",
        )
    );
    let parsed = read_documents("w.yaml", &text).unwrap();
    assert!(
        parsed
            .warnings
            .iter()
            .any(|w| w.contains("spec.egress[0].to[0].domainNames is not implemented")),
        "{:?}",
        parsed.warnings
    );
    let c = parsed.into_cluster();
    assert_eq!(c.cluster_policies["egress"].not_implemented.len(), 1);
    assert_eq!(
        verdict(&c, "tenant-a/web", "ip:169.254.169.254", 80),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&c, "tenant-a/web", "ip:192.168.0.1", 10250),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&c, "tenant-a/web", "ip:203.0.113.1", 443),
        Verdict::Allow
    );
}

/// Each upstream validation rule, with the error it must give.
#[test]
fn every_validation_rule_is_a_named_error_and_holds_the_subject_fail_closed() {
    use ClusterPolicyError as E;
    let rule = "  - {action: Deny, from: [{namespaces: {}}]}\n";
    let many: String = std::iter::repeat_n(rule, 26).collect();
    let subject = "  subject: {namespaces: {matchLabels: {tenant: a}}}\n";
    type Expect = fn(&E) -> bool;
    let cases: Vec<(String, Expect)> = vec![
        (
            cnp("p", "Admin", 1001, &format!("{subject}  ingress:\n{rule}")),
            |e| matches!(e, E::PriorityOutOfRange(1001)),
        ),
        (
            cnp("p", "Admin", -1, &format!("{subject}  ingress:\n{rule}")),
            |e| matches!(e, E::PriorityOutOfRange(-1)),
        ),
        (
            cnp("p", "Middle", 1, &format!("{subject}  ingress:\n{rule}")),
            |e| matches!(e, E::UnknownTier(_)),
        ),
        (
            cnp(
                "p",
                "Admin",
                1,
                "  subject: {namespaces: {matchLabels: {tenant: a}}, pods: {namespaceSelector: {matchLabels: {tenant: a}}, podSelector: {}}}\n",
            ),
            |e| matches!(e, E::SubjectForms(2)),
        ),
        (
            cnp("p", "Admin", 1, &format!("{subject}  ingress:\n{many}")),
            |e| matches!(e, E::TooManyRules { count: 26, .. }),
        ),
        (
            cnp(
                "p",
                "Admin",
                1,
                &format!("{subject}  ingress:\n  - {{action: Deny, from: []}}\n"),
            ),
            |e| matches!(e, E::EmptyPeers("from")),
        ),
        (
            cnp(
                "p",
                "Admin",
                1,
                &format!("{subject}  egress:\n  - {{action: Deny}}\n"),
            ),
            |e| matches!(e, E::EmptyPeers("to")),
        ),
        (
            cnp(
                "p",
                "Admin",
                1,
                &format!(
                    "{subject}  ingress:\n  - {{action: Allow, from: [{{namespaces: {{}}}}]}}\n"
                ),
            ),
            |e| matches!(e, E::UnknownAction(_)),
        ),
        (
            cnp(
                "p",
                "Admin",
                1,
                &format!("{subject}  ingress:\n  - {{action: Deny, from: [{{}}]}}\n"),
            ),
            |e| matches!(e, E::PeerForms { count: 0, .. }),
        ),
        (
            cnp(
                "p",
                "Admin",
                1,
                &format!(
                    "{subject}  ingress:\n  - {{action: Deny, from: [{{networks: [10.0.0.0/8]}}]}}\n"
                ),
            ),
            |e| matches!(e, E::PeerForms { .. }),
        ),
        (
            cnp(
                "p",
                "Admin",
                1,
                &format!(
                    "{subject}  ingress:\n  - {{action: Deny, from: [{{namespaces: {{}}, nodes: {{}}}}]}}\n"
                ),
            ),
            |e| matches!(e, E::PeerForms { count: 2, .. }),
        ),
        (
            cnp(
                "p",
                "Admin",
                1,
                &format!(
                    "{subject}  ingress:\n  - {{action: Deny, from: [{{namespaces: {{}}}}], protocols: [{{tcp: {{destinationPort: {{number: 80}}}}, destinationNamedPort: http}}]}}\n"
                ),
            ),
            |e| matches!(e, E::NamedPortWithNumber),
        ),
        (
            cnp(
                "p",
                "Admin",
                1,
                &format!(
                    "{subject}  ingress:\n  - {{action: Deny, from: [{{namespaces: {{}}}}], protocols: []}}\n"
                ),
            ),
            |e| matches!(e, E::EmptyProtocols),
        ),
        (
            cnp(
                "p",
                "Admin",
                1,
                &format!(
                    "{subject}  ingress:\n  - {{action: Deny, from: [{{namespaces: {{}}}}], protocols: [{{tcp: {{destinationPort: {{range: {{start: 90, end: 80}}}}}}}}]}}\n"
                ),
            ),
            |e| matches!(e, E::PortRangeOrder { .. }),
        ),
        (
            cnp(
                "p",
                "Admin",
                1,
                &format!(
                    "{subject}  ingress:\n  - {{action: Deny, from: [{{namespaces: {{}}}}], protocols: [{{tcp: {{destinationPort: {{number: 70000}}}}}}]}}\n"
                ),
            ),
            |e| matches!(e, E::PortOutOfRange(70000)),
        ),
        (
            cnp(
                "p",
                "Admin",
                1,
                &format!(
                    "{subject}  egress:\n  - {{action: Deny, to: [{{networks: [10.0.0.0/8]}}], protocols: [{{destinationNamedPort: http}}]}}\n"
                ),
            ),
            |e| matches!(e, E::NamedPortWithNonPodPeer),
        ),
        (
            cnp(
                "p",
                "Admin",
                1,
                &format!(
                    "{subject}  egress:\n  - {{action: Deny, to: [{{networks: [not-a-cidr]}}]}}\n"
                ),
            ),
            |e| matches!(e, E::BadCidr(_)),
        ),
        (
            cnp(
                "p",
                "Admin",
                1,
                &format!(
                    "{subject}  egress:\n  - {{action: Deny, to: [{{domainNames: [example.com]}}]}}\n"
                ),
            ),
            |e| matches!(e, E::DomainNamesNotAccept),
        ),
    ];
    for (text, expected) in cases {
        let parsed = read_documents("bad.yaml", &format!("{WORLD}\n---\n{text}")).unwrap();
        assert_eq!(parsed.rejected.len(), 1, "{text}");
        let err = &parsed.rejected[0];
        assert!(err.holds_pods());
        assert_eq!(
            (err.kind.as_str(), err.object.as_str()),
            ("ClusterNetworkPolicy", "p")
        );
        match &err.error {
            ConvertError::ClusterPolicy { error, .. } if expected(error) => {}
            other => panic!("{text}: unexpected {other:?}"),
        }
        let c = parsed.into_cluster();
        assert!(c.cluster_policies.is_empty());
        // tenant-a/web is held (every rejected form's subject reaches tenant a, or is
        // unreadable and holds everything); loopback still works.
        let e = check(&c, "tenant-b/api", "tenant-a/web", 80, Protocol::Tcp);
        assert!(
            matches!(&e.ingress, Side::Held { rejected } if rejected[0].to_string().starts_with("ClusterNetworkPolicy p (")),
            "{text}: {}",
            e.reason()
        );
        assert_eq!(
            verdict(&c, "tenant-a/web", "tenant-a/web", 80),
            Verdict::Allow
        );
    }
}

#[test]
fn a_rejected_policy_holds_only_its_subject_when_the_subject_reads() {
    let text = format!(
        "{WORLD}\n---\n{}",
        cnp(
            "p",
            "Admin",
            5000,
            "  subject: {namespaces: {matchLabels: {tenant: a}}}\n"
        )
    );
    let c = read_documents("bad.yaml", &text).unwrap().into_cluster();
    assert_eq!(
        verdict(&c, "tenant-b/api", "tenant-a/web", 80),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&c, "tenant-a/web", "tenant-b/api", 80),
        Verdict::Deny,
        "held both ways"
    );
    assert_eq!(
        verdict(&c, "monitoring/prom", "tenant-b/api", 80),
        Verdict::Allow
    );
    // A fixed policy of the same name replaces the rejection.
    let fixed = format!(
        "{text}\n---\n{}",
        cnp(
            "p",
            "Admin",
            5,
            "  subject: {namespaces: {matchLabels: {tenant: a}}}\n"
        )
    );
    let c = read_documents("fixed.yaml", &fixed).unwrap().into_cluster();
    assert!(c.rejected_policies.is_empty());
    assert_eq!(
        verdict(&c, "tenant-b/api", "tenant-a/web", 80),
        Verdict::Allow
    );
}
