//! The lab with `--encap ipip` inside a QEMU guest running Debian's cloud kernel
//! (this host's kernel has no ipip): `tests/qemu/run-vm.sh` boots it on
//! this host's own filesystem, and the same e2e test binaries run inside with
//! `SLUICE_E2E_ENCAP=ipip`: seed 001's NodePort Local/Cluster (the tunnel address is
//! tunl0's now) and cross-node traffic through tunl0 on both policy dataplanes,
//! `lab down` leaving nothing, and upstream truth tables including SCTP, which the
//! guest kernel has (five on iptables, three of them on nftables), and, in a VM of
//! its own, the ClusterNetworkPolicy SCTP conformance scenarios. The guest runs the
//! host's own `nft` (the root file system is shared) on Debian's kernel's nf_tables.

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_e2e::workspace_root;

/// The newest test binary `name-<hash>` next to this one (cargo builds every test
/// target of the package before running any).
fn sibling_test(name: &str) -> PathBuf {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let prefix = format!("{name}-");
    std::fs::read_dir(&deps)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let f = p.file_name().unwrap().to_string_lossy().into_owned();
            f.starts_with(&prefix) && !f.contains('.') && is_executable(p)
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| {
            panic!(
                "no {name} test binary in {}: run `cargo test -p sluice-e2e`",
                deps.display()
            )
        })
}

/// Run `script` in a guest with `SLUICE_E2E_ENCAP=ipip`, `SLUICE_E2E_CASES=cases`
/// and a 3 s probe timeout, within `limit_s` seconds of wall clock.
fn run_in_vm(script: &str, cases: &str, limit_s: u32) -> std::process::ExitStatus {
    let started = std::time::Instant::now();
    let status = Command::new(workspace_root().join("tests/qemu/run-vm.sh"))
        .args([
            "-t",
            &limit_s.to_string(),
            "-e",
            "SLUICE_E2E_ENCAP",
            "-e",
            "SLUICE_E2E_CASES",
            "-e",
            "SLUICE_E2E_TIMEOUT_MS",
        ])
        .args(["--", "bash", "-c", script])
        .env("SLUICE_E2E_ENCAP", "ipip")
        .env("SLUICE_E2E_CASES", cases)
        .env("SLUICE_E2E_TIMEOUT_MS", "3000")
        .current_dir(workspace_root())
        .status()
        .expect("run tests/qemu/run-vm.sh");
    eprintln!("QEMU run: {:.0} s", started.elapsed().as_secs_f64());
    status
}

/// Whether this is the host that boots the guest (not the guest, and the tools are
/// there).
fn boots_vm(test: &str) -> bool {
    std::env::var_os("SLUICE_IN_VM").is_none()
        && sluice_testkit::require_root(test)
        && sluice_testkit::require_tool(test, "qemu-system-x86_64")
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[test]
fn lab_e2e_runs_with_ipip_under_qemu() {
    if !boots_vm("lab_e2e_ipip_qemu") {
        return; // the guest (no VM inside the VM), or a host that cannot boot one
    }
    let seeds = sibling_test("lab_seeds");
    let topo = sibling_test("lab_topology");
    let upstream = sibling_test("lab_upstream");
    // Both dataplanes: seed 001 (NodePort, tunnel addresses) and cross-node traffic
    // through tunl0 on each; the upstream tables in full subset on iptables and a
    // representative part of it on nftables (plain deny, selectors, ports, SCTP),
    // which keeps the VM's run time in check (tests/e2e/TIMINGS.md).
    let script = format!(
        "set -e\n\
         nft --version\n\
         echo '== seed 001 with ipip, nftables and iptables'\n\
         {s} seed_001_nodeport_local --nocapture\n\
         echo '== cross-node through tunl0, nftables and iptables'\n\
         {t} cross_node_traffic_crosses_the_tunnel --nocapture\n\
         echo '== lab down leaves nothing'\n\
         {t} --exact lab_down_leaves_no_namespace_link_rule_set_file_or_process --nocapture\n\
         echo '== upstream truth tables, SCTP included, iptables'\n\
         {u} --exact upstream_netpol_truth_tables_hold_with_real_packets_on_iptables --nocapture\n\
         echo '== upstream truth tables, SCTP included, nftables (subset)'\n\
         SLUICE_E2E_CASES=upstream-01,upstream-14,upstream-42 \\\n\
         {u} --exact upstream_netpol_truth_tables_hold_with_real_packets_on_nftables --nocapture\n",
        s = seeds.display(),
        t = topo.display(),
        u = upstream.display(),
    );
    // a few upstream cases: plain deny, namespace and pod selectors, ports, and
    // the two SCTP ones the host kernel cannot run
    let status = run_in_vm(
        &script,
        "upstream-01,upstream-10,upstream-14,upstream-29,upstream-42",
        1500,
    );
    assert!(
        status.success(),
        "the lab e2e under QEMU with ipip failed: {status}"
    );
}

/// Every ClusterNetworkPolicy SCTP conformance scenario (upstream's admin and
/// baseline `standard-{ingress,egress}-sctp-rules`: Accept, Deny and Pass in rule
/// order, and at a port), which need SCTP sockets this host's kernel lacks:
/// `lab_cnp`'s conformance test in the guest, narrowed to them, on each dataplane in
/// turn. Its own VM, so it can be
/// run alone.
#[test]
fn cluster_network_policy_sctp_scenarios_hold_with_ipip_under_qemu() {
    if !boots_vm("lab_cnp_sctp_qemu") {
        return;
    }
    let cnp = sibling_test("lab_cnp");
    let script = format!(
        "set -e\n\
         echo '== ClusterNetworkPolicy SCTP scenarios, nftables'\n\
         {c} --exact cluster_network_policy_conformance_scenarios_hold_with_real_packets_on_nftables --nocapture\n\
         echo '== ClusterNetworkPolicy SCTP scenarios, iptables'\n\
         {c} --exact cluster_network_policy_conformance_scenarios_hold_with_real_packets_on_iptables --nocapture\n",
        c = cnp.display(),
    );
    let status = run_in_vm(
        &script,
        "cnp-admin-ingress-sctp,cnp-admin-egress-sctp,cnp-baseline-ingress-sctp,cnp-baseline-egress-sctp",
        1800,
    );
    assert!(
        status.success(),
        "the ClusterNetworkPolicy SCTP scenarios under QEMU failed: {status}"
    );
}
