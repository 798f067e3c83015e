//! The seed documents' scenarios with real packets: egress default-deny that still
//! allows DNS (seed 000, both variants), namespace foo behind a NodePort Service with
//! ipBlock 10.2.3.4/32 and `region NotIn [bar]` (seed 001, including
//! externalTrafficPolicy Local vs Cluster), and ipBlock 172.16.0.0/16 except
//! 172.16.8.0/24 on TCP 80 and 81 (seed 003). Expectations are the policy engine's
//! hand-written files; every probe is also checked against `sluicectl policy check`.
//! Each lab is laid out as the seed's cluster (its node addresses, and every pod at
//! its `status.podIP`), so probes naming those addresses run with real packets.
//! Each scenario runs on the nftables and on the iptables dataplane.

use std::path::Path;

use sluice_e2e::scenario::{self, Report};
use sluice_e2e::{Dataplane, Lab, e2e_data, policy_data};

fn encap() -> String {
    std::env::var("SLUICE_E2E_ENCAP").unwrap_or_else(|_| "auto".into())
}

fn assert_clean(r: &Report) {
    eprintln!(
        "{} probes, {} cells; skipped: {:#?}",
        r.probes, r.cells, r.skipped
    );
    assert!(r.probes > 0 || r.cells > 0, "nothing was probed");
    assert!(
        r.failures.is_empty() && r.differential.is_empty(),
        "lab vs expectations:\n{}\n\nlab vs sluicectl policy check:\n{}",
        r.failures.join("\n"),
        r.differential.join("\n")
    );
    r.assert_skips_known("lab_seeds");
}

fn run_seed(test: &str, lab_name: &str, scenario_name: &str, dataplane: Dataplane) {
    if !dataplane.runs(test) {
        return;
    }
    let (_scene, r) = scenario::run(lab_name, scenario_name, &encap(), dataplane);
    assert_clean(&r);
}

#[test]
fn seed_000_egress_default_deny_still_allows_dns_on_tcp_and_udp_53_on_nftables() {
    run_seed(
        "seed_000",
        "e2e-seed0",
        "seed-000-egress-dns",
        Dataplane::Nftables,
    );
}

#[test]
fn seed_000_egress_default_deny_still_allows_dns_on_tcp_and_udp_53_on_iptables() {
    run_seed(
        "seed_000",
        "e2e-seed0",
        "seed-000-egress-dns",
        Dataplane::Iptables,
    );
}

#[test]
fn seed_000_egress_to_kube_dns_only_allows_nothing_else_on_nftables() {
    run_seed(
        "seed_000_kube_dns_only",
        "e2e-seed0k",
        "seed-000-egress-dns-kube-dns-only",
        Dataplane::Nftables,
    );
}

#[test]
fn seed_000_egress_to_kube_dns_only_allows_nothing_else_on_iptables() {
    run_seed(
        "seed_000_kube_dns_only",
        "e2e-seed0k",
        "seed-000-egress-dns-kube-dns-only",
        Dataplane::Iptables,
    );
}

#[test]
fn seed_003_ipblock_except_on_tcp_80_and_81_on_nftables() {
    run_seed(
        "seed_003",
        "e2e-seed3",
        "seed-003-linuxea-ipblock-except",
        Dataplane::Nftables,
    );
}

#[test]
fn seed_003_ipblock_except_on_tcp_80_and_81_on_iptables() {
    run_seed(
        "seed_003",
        "e2e-seed3",
        "seed-003-linuxea-ipblock-except",
        Dataplane::Iptables,
    );
}

fn tunnel_ip(lab: &Lab, node: &str) -> String {
    let st = lab.status();
    st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["tunnelIP"].as_str())
        .unwrap_or_else(|| panic!("{node} has no tunnel address: {st}"))
        .to_string()
}

#[test]
fn seed_001_nodeport_local_keeps_the_load_balancer_address_and_cluster_does_not_on_nftables() {
    seed_001(Dataplane::Nftables);
}

#[test]
fn seed_001_nodeport_local_keeps_the_load_balancer_address_and_cluster_does_not_on_iptables() {
    seed_001(Dataplane::Iptables);
}

fn seed_001(dataplane: Dataplane) {
    if !dataplane.runs("seed_001") {
        return;
    }
    // The seed's own probes (pod and ipBlock semantics), in a lab laid out as its
    // cluster: its node and pod addresses are the seed's.
    let (scene, r) = scenario::run(
        "e2e-seed1",
        "seed-001-foo-ipblock-region",
        &encap(),
        dataplane,
    );
    assert_clean(&r);
    let lab = &scene.lab;
    let lb = "ip:10.2.3.4";
    let via_pod_node = "node:node-1:31602";
    let via_other_node = "node:node-2:31602";

    // externalTrafficPolicy: Local. The LB enters through the pod's node: allowed,
    // and the pod sees the LB's own address.
    lab.apply(&[&e2e_data("seed-001/service-local.yaml")]);
    let o = lab.probe(lb, via_pod_node, 31602, "TCP");
    assert!(o.connected(), "LB through the pod's node with Local: {o:?}");
    assert_eq!(o.source_seen.as_deref(), Some("10.2.3.4"));
    // Through a node without a local endpoint, Local drops it (kube-proxy).
    assert!(!lab.probe(lb, via_other_node, 31602, "TCP").connected());
    // Pods of namespace bar stay out, through the NodePort as well.
    assert!(
        !lab.probe("bar/client", via_pod_node, 31602, "TCP")
            .connected()
    );
    assert!(
        lab.probe("baz/client", via_pod_node, 31602, "TCP")
            .connected()
    );

    // externalTrafficPolicy: Cluster. Entering through node-2, the flow is DNATed
    // and masqueraded there, crosses the tunnel, and arrives from node-2's tunnel
    // address: not 10.2.3.4, so denied.
    lab.apply(&[&e2e_data("seed-001/service-cluster.yaml")]);
    let o = lab.probe(lb, via_other_node, 31602, "TCP");
    assert!(
        !o.connected(),
        "LB through another node with Cluster: {o:?}"
    );
    // The seed's failed scheme 1: allow the tunnel address. Now the LB gets in,
    // and the pod sees node-2's tunnel address...
    let tun = tunnel_ip(lab, "node-2");
    let dir = tempfile::tempdir().unwrap();
    let scheme1 = dir.path().join("allow-tunnel.yaml");
    std::fs::write(
        &scheme1,
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-node-2-tunnel, namespace: foo}}\n\
             spec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - ipBlock: {{cidr: {tun}/32}}\n"
        ),
    )
    .unwrap();
    lab.apply(&[&scheme1]);
    let o = lab.probe(lb, via_other_node, 31602, "TCP");
    assert!(o.connected(), "with node-2's tunnel address allowed: {o:?}");
    assert_eq!(
        o.source_seen.as_deref(),
        Some(tun.as_str()),
        "arrives with node-2's tunnel address"
    );
    // ...and so does namespace bar, through node-2: why scheme 1 is wrong.
    let o = lab.probe("bar/client", via_other_node, 31602, "TCP");
    assert!(
        o.connected(),
        "bar through node-2 once tunnel addresses are allowed: {o:?}"
    );
    lab.delete(&[&scheme1]);
    assert!(
        !lab.probe("bar/client", via_other_node, 31602, "TCP")
            .connected()
    );
    let _ = Path::new(&policy_data(""));
}
