//! ClusterNetworkPolicy with real packets: the translated upstream conformance
//! scenarios (every `policy/tests/data/cnp-*.expect.yaml`, found by listing) and the
//! three operator recipes of `docs/cluster-network-policy.md` (read from the page),
//! applied with `sluicectl lab apply` to a two-node lab (for the scenarios, one laid
//! out as their cluster, node and pod addresses included: `scenario::stage`),
//! delivered to the real agents through the lab's datastore, and probed. Every probed cell is checked against the
//! hand-written expectation and against `sluicectl policy check` over what the agents
//! see (the evaluator), on the nftables and the iptables dataplane. SCTP cells need
//! SCTP sockets: on a kernel without them they are skipped with a reason, and the
//! QEMU suite (`lab_qemu_ipip`) runs the SCTP scenarios in its guest.

use std::path::{Path, PathBuf};

use sluice_e2e::layout::Layout;
use sluice_e2e::scenario::{self, Expect, ProbeSpec, Report};
use sluice_e2e::{Dataplane, Lab, e2e_data, workspace_root};

fn encap() -> String {
    std::env::var("SLUICE_E2E_ENCAP").unwrap_or_else(|_| "auto".into())
}

fn assert_clean(dataplane: Dataplane, what: &str, r: &Report) {
    assert!(
        r.is_clean(),
        "{what} on {}: lab vs expectations:\n{}\n\nlab vs sluicectl policy check:\n{}",
        dataplane.as_str(),
        r.failures.join("\n"),
        r.differential.join("\n")
    );
}

#[test]
fn cluster_network_policy_conformance_scenarios_hold_with_real_packets_on_nftables() {
    conformance(Dataplane::Nftables);
}

#[test]
fn cluster_network_policy_conformance_scenarios_hold_with_real_packets_on_iptables() {
    conformance(Dataplane::Iptables);
}

/// Whether a case has anything the lab can probe (a matrix on a protocol this kernel
/// serves, or a probe [`scenario::route`] can send) in a cluster it can build, so
/// that a case which probes nothing is noticed.
fn runnable(case: &str, scene: &scenario::Scene, sctp: bool) -> bool {
    let e = scenario::load_expect(case);
    let matrix = e
        .matrix
        .iter()
        .any(|m| m.protocols.iter().any(|p| sctp || p != "SCTP"));
    let probes = e
        .probes
        .iter()
        .any(|p| scenario::route(p, &scene.fx, &scene.layout, sctp).is_ok());
    scenario::unsupported(&e).is_none() && (matrix || probes)
}

fn conformance(dataplane: Dataplane) {
    if !dataplane.runs("cluster_network_policy_conformance") {
        return;
    }
    let started = std::time::Instant::now();
    // SLUICE_E2E_CASES=cnp-admin-ingress-sctp runs a subset (the QEMU suite does).
    let cases = scenario::selected(scenario::cases("cnp-"));
    assert!(
        !cases.is_empty(),
        "no cnp-* case selected (SLUICE_E2E_CASES={:?})",
        scenario::only()
    );
    let mut total = Report::default();
    let mut want_run = 0;
    // One lab per fixture: cases written against different clusters never share pods.
    for (i, (cluster, group)) in scenario::by_cluster(&cases).into_iter().enumerate() {
        let scene = scenario::stage(&format!("cnp-lab{i}"), &cluster, &encap(), dataplane);
        let sctp = scene.lab.serves_sctp();
        want_run += group.iter().filter(|c| runnable(c, &scene, sctp)).count();
        total.merge(scenario::run_cases(
            &scene,
            dataplane.as_str(),
            &group,
            sctp,
        ));
        scene.lab.down();
    }
    eprintln!(
        "cnp conformance on {}: {} of {} cases, {} cells, {} probes in {:.0} s; skipped: {:#?}",
        dataplane.as_str(),
        total.cases,
        cases.len(),
        total.cells,
        total.probes,
        started.elapsed().as_secs_f64(),
        total.skipped
    );
    assert!(
        total.cases >= want_run && total.cases > 0,
        "{} cases probed something, {want_run} could",
        total.cases
    );
    assert_clean(dataplane, "cnp conformance", &total);
    total.assert_skips_known("lab_cnp");
}

/// The page's ```yaml blocks, in order (the policy crate's recipe test reads them
/// through the same reader, so the page, the evaluator's test and this one cannot
/// drift apart).
fn recipes() -> Vec<String> {
    let out = sluice_testkit::yaml_blocks(&workspace_root().join("docs/cluster-network-policy.md"));
    assert_eq!(out.len(), 3, "the page has three recipes");
    out
}

/// Hand-written cells: (from, to, port, allowed).
type Cells<'a> = &'a [(&'a str, &'a str, u16, bool)];

/// The hand-written cells against the lab and `policy check`, and the whole matrix
/// against `policy check`.
fn judge(lab: &Lab, what: &str, cells: Cells) -> Report {
    let e = Expect {
        manifests: vec![],
        matrix: vec![],
        probes: cells
            .iter()
            .map(|&(from, to, port, allow)| ProbeSpec {
                from: from.into(),
                to: to.into(),
                port,
                protocol: "TCP".into(),
                verdict: if allow { "allow" } else { "deny" }.into(),
            })
            .collect(),
    };
    let mut r = scenario::check(
        lab,
        what,
        &e,
        &scenario::Fixture::default(),
        &Layout::unplanned(scenario::pool()),
        false,
    );
    let (cells, d) = scenario::differential(lab, what);
    r.cells += cells;
    r.differential.extend(d);
    eprintln!(
        "{what}: {} probes, {} matrix cells, {} failures, {} differential",
        r.probes,
        r.cells,
        r.failures.len(),
        r.differential.len()
    );
    r
}

/// YAML text into a file of `dir` named `name`.
fn file(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, yaml).unwrap();
    p
}

#[test]
fn cluster_network_policy_recipes_of_the_docs_hold_with_real_packets_on_nftables() {
    recipes_in_the_lab(Dataplane::Nftables);
}

#[test]
fn cluster_network_policy_recipes_of_the_docs_hold_with_real_packets_on_iptables() {
    recipes_in_the_lab(Dataplane::Iptables);
}

const OPEN_SHOP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: open, namespace: shop}\nspec: {podSelector: {}, ingress: [{}]}\n";
const OPEN_MONITORING: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: open, namespace: monitoring}\nspec: {podSelector: {}, ingress: [{}]}\n";
const SHOP_EGRESS_ALL: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: egress-all, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{}]}\n";
const SHOP_OPTED_OUT: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {tenant: a, tenant-isolation: open}}\n";
const SHOP: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {tenant: a}}\n";

/// The metadata address, and an outside address nothing blocks.
const METADATA: &str = "ip:169.254.169.254";
const ELSEWHERE: &str = "ip:203.0.113.9";

fn recipes_in_the_lab(dataplane: Dataplane) {
    if !dataplane.runs("cluster_network_policy_recipes") {
        return;
    }
    let started = std::time::Instant::now();
    let lab = Lab::up_on("cnp-lab-recipes", 2, &encap(), dataplane);
    lab.apply(&[&e2e_data("cnp-recipes/world.yaml")]);
    let recipes = recipes();
    let dir = tempfile::tempdir().unwrap();
    let mut total = Report::default();
    let pods = [
        "shop/web",
        "blog/api",
        "monitoring/prom",
        "monitoring/grafana",
    ];

    // Without a policy every cell is open, the metadata address included: what the
    // recipes close below is closed by them, not by the lab.
    let before: Vec<(&str, &str, u16, bool)> = pods
        .iter()
        .flat_map(|p| [(*p, METADATA, 80, true), (*p, ELSEWHERE, 80, true)])
        .collect();
    total.merge(judge(&lab, "no policy", &before));

    // 1. Tenants isolated from each other, with an opt-out.
    let r1 = file(dir.path(), "recipe-1.yaml", &recipes[0]);
    let np1 = file(dir.path(), "open-shop.yaml", OPEN_SHOP);
    lab.apply(&[&r1, &np1]);
    total.merge(judge(
        &lab,
        "tenant isolation",
        &[
            ("blog/api", "shop/web", 80, false),
            ("blog/api", "shop/web", 9090, false),
            ("monitoring/prom", "shop/web", 80, true),
            ("shop/web", "blog/api", 80, true),
        ],
    ));
    lab.apply_yaml(SHOP_OPTED_OUT);
    total.merge(judge(
        &lab,
        "tenant isolation, shop opted out",
        &[("blog/api", "shop/web", 80, true)],
    ));
    lab.apply_yaml(SHOP);
    lab.delete(&[&r1, &np1]);

    // 2. A protected namespace.
    let r2 = file(dir.path(), "recipe-2.yaml", &recipes[1]);
    let np2 = file(dir.path(), "open-monitoring.yaml", OPEN_MONITORING);
    lab.apply(&[&r2, &np2]);
    total.merge(judge(
        &lab,
        "protected namespace",
        &[
            ("shop/web", "monitoring/prom", 9090, false),
            ("blog/api", "monitoring/grafana", 80, false),
            ("monitoring/grafana", "monitoring/prom", 9090, true),
            ("monitoring/prom", "shop/web", 80, true),
        ],
    ));
    lab.delete(&[&r2, &np2]);

    // 3. Blocking the cloud metadata address, which an egress allow-all
    // NetworkPolicy cannot reopen.
    let r3 = file(dir.path(), "recipe-3.yaml", &recipes[2]);
    let np3 = file(dir.path(), "shop-egress-all.yaml", SHOP_EGRESS_ALL);
    lab.apply(&[&r3, &np3]);
    let after: Vec<(&str, &str, u16, bool)> = pods
        .iter()
        .flat_map(|p| [(*p, METADATA, 80, false), (*p, ELSEWHERE, 80, true)])
        .chain([("shop/web", "blog/api", 80, true)])
        .collect();
    total.merge(judge(&lab, "metadata address", &after));
    lab.delete(&[&r3, &np3]);

    eprintln!(
        "cnp recipes on {}: {} probes, {} matrix cells in {:.0} s",
        dataplane.as_str(),
        total.probes,
        total.cells,
        started.elapsed().as_secs_f64()
    );
    assert_clean(dataplane, "cnp recipes", &total);
}
