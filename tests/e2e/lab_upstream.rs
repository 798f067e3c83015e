//! The upstream Kubernetes e2e NetworkPolicy cases (x, y, z × a, b, c; ports 80 and
//! 81 over TCP and UDP, SCTP where the kernel has it) with real packets through
//! `sluice`, `sluice-agent` and the kernel, each truth table checked against the
//! hand-written expectation and against `sluicectl policy check` (the differential),
//! on the nftables and the iptables dataplane.

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
    // `$SLUICE_E2E_LAB_PREFIX-upstream` keeps runs side by side on one machine apart.
    let base = std::env::var("SLUICE_E2E_LAB_PREFIX")
        .map_or_else(|_| "e2e-upstream".into(), |p| format!("{p}-upstream"));
    let lab = Lab::up_on(&base, 2, &encap(), dataplane);
    let cluster = policy_data("upstream-cluster/cluster.yaml");
    lab.apply(&[&cluster]);
    let fx = scenario::fixture(std::slice::from_ref(&cluster));
    let sctp = lab.serves_sctp();
    // SLUICE_E2E_CASES=upstream-01,upstream-29 runs a subset (the QEMU suite does).
    let only = scenario::only();
    let selected = scenario::selected(scenario::upstream_cases());
    let total: Report =
        scenario::run_cases(&lab, dataplane.as_str(), &selected, &[cluster], &fx, sctp);
    let cases = total.cases;
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
