//! The upstream Kubernetes e2e NetworkPolicy cases (x, y, z × a, b, c; ports 80 and
//! 81 over TCP and UDP, SCTP where the kernel has it) with real packets through
//! `sluice`, `sluice-agent` and the kernel, each truth table checked against the
//! hand-written expectation and against `sluicectl policy check` (the differential),
//! on the nftables and the iptables dataplane.

use std::path::{Path, PathBuf};

use sluice_e2e::scenario::{self, Report};
use sluice_e2e::{Dataplane, Lab, policy_data};

fn encap() -> String {
    std::env::var("SLUICE_E2E_ENCAP").unwrap_or_else(|_| "auto".into())
}

#[test]
fn upstream_netpol_truth_tables_hold_with_real_packets_on_nftables() {
    upstream_truth_tables(Dataplane::Nftables);
}

#[test]
fn upstream_netpol_truth_tables_hold_with_real_packets_on_iptables() {
    upstream_truth_tables(Dataplane::Iptables);
}

fn upstream_truth_tables(dataplane: Dataplane) {
    if !dataplane.runs("upstream_netpol_truth_tables") {
        return;
    }
    let started = std::time::Instant::now();
    let lab = Lab::up_on("e2e-upstream", 2, &encap(), dataplane);
    let cluster = policy_data("upstream-cluster/cluster.yaml");
    lab.apply(&[&cluster]);
    let fx = scenario::fixture(&[cluster]);
    let ips = scenario::lab_pod_ips(&lab);
    let sctp = lab.serves_sctp();
    let mut total = Report::default();
    let mut cases = 0;
    // SLUICE_E2E_CASES=upstream-01,upstream-29 runs a subset (the QEMU suite does).
    let only: Option<Vec<String>> = std::env::var("SLUICE_E2E_CASES")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let selected: Vec<String> = scenario::upstream_cases()
        .into_iter()
        .filter(|c| {
            only.as_ref()
                .is_none_or(|o| o.iter().any(|p| c.starts_with(p.as_str())))
        })
        .collect();
    for case in selected.clone() {
        let e = scenario::load_expect(&case);
        let (_, policies) = scenario::scenario_files(&e);
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = scenario::rewrite(&policies, dir.path(), &fx, &ips);
        let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        let t = std::time::Instant::now();
        lab.apply(&refs);
        let r = scenario::check(&lab, &case, &e, &fx, sctp);
        lab.delete(&refs);
        eprintln!(
            "{} {case}: {} cells, {} probes, {} failures, {} differential, {} skipped, {:.1} s",
            dataplane.as_str(),
            r.cells,
            r.probes,
            r.failures.len(),
            r.differential.len(),
            r.skipped.len(),
            t.elapsed().as_secs_f64()
        );
        if r.cells > 0 {
            cases += 1;
        }
        total.cells += r.cells;
        total.probes += r.probes;
        total.failures.extend(r.failures);
        total.differential.extend(r.differential);
        total.skipped.extend(r.skipped);
    }
    eprintln!(
        "upstream on {}: {cases} truth tables, {} cells, {} probes in {:.0} s; skipped: {:#?}",
        dataplane.as_str(),
        total.cells,
        total.probes,
        started.elapsed().as_secs_f64(),
        total.skipped
    );
    match &only {
        None => assert!(cases >= 20, "only {cases} upstream truth tables ran"),
        Some(o) => assert!(
            cases >= o.len() && !selected.is_empty(),
            "selected {o:?}, ran {cases}"
        ),
    }
    assert!(
        total.failures.is_empty() && total.differential.is_empty(),
        "{}: lab vs expectations:\n{}\n\nlab vs sluicectl policy check:\n{}",
        dataplane.as_str(),
        total.failures.join("\n"),
        total.differential.join("\n")
    );
}
