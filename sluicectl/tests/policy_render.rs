//! `sluicectl policy render`, run as the built binary: the agent's own chains and
//! sets are part of the output, shaped by the agent's flags and defaults.

use std::path::{Path, PathBuf};
use std::process::Command;

fn data(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/e2e/data")
        .join(path)
}

fn render(extra: &[&str]) -> String {
    let dir = data("basic");
    let dir = dir.display().to_string();
    let mut args = vec!["policy", "render", "-f", dir.as_str(), "--node", "node-1"];
    args.extend(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_sluicectl"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn defaults_are_the_agents_ipip_guard_and_nat_outgoing() {
    let text = render(&[]);
    assert!(text.contains("-A SLUICE-INPUT -p 4 -m comment"), "{text}");
    assert!(text.contains("-A SLUICE-TUNNEL-IN "), "{text}");
    assert!(text.contains("-j MASQUERADE"), "{text}");
    assert!(text.contains("add SLUICE-T-POOLS 10.244.0.0/16"), "{text}");
    assert!(
        text.contains("# iptables -t nat -I POSTROUTING 1 -m comment"),
        "{text}"
    );
}

#[test]
fn agent_flags_change_the_agent_rules() {
    let text = render(&[
        "--encapsulation",
        "vxlan",
        "--vxlan-port",
        "4800",
        "--nat-outgoing",
        "false",
        "--pool",
        "10.50.0.0/16",
        "--node-ip",
        "192.0.2.7",
    ]);
    assert!(text.contains("-p udp -m comment"), "{text}");
    assert!(text.contains("--dport 4800 -j SLUICE-TUNNEL-IN"), "{text}");
    assert!(!text.contains("MASQUERADE"), "{text}");
    assert!(text.contains("add SLUICE-T-POOLS 10.50.0.0/16"), "{text}");
    assert!(text.contains("add SLUICE-T-NODES 192.0.2.7"), "{text}");
    let none = render(&["--encapsulation", "none"]);
    assert!(!none.contains("SLUICE-TUNNEL-IN"), "{none}");
}

#[test]
fn dataplane_nftables_prints_the_nft_text_of_sluices_table_and_iptables_is_the_default() {
    assert_eq!(render(&[]), render(&["--dataplane", "iptables"]));
    let text = render(&["--dataplane", "nftables"]);
    assert!(text.starts_with("add table ip sluice\n"), "{text}");
    assert!(text.contains("masquerade"), "{text}");
    assert!(!text.contains("-A SLUICE-"), "no iptables text: {text}");
}

#[test]
fn cluster_network_policies_are_compiled_on_iptables_without_a_warning() {
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/tests/data");
    let cluster = policy.join("cnp-cluster").display().to_string();
    let case = policy
        .join("cnp-integration-1-admin-deny")
        .display()
        .to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_sluicectl"))
        .args([
            "policy", "render", "-f", &cluster, "-f", &case, "--node", "n1",
        ])
        .output()
        .unwrap();
    let (text, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("ClusterNetworkPolic"), "{err}");
    // The Admin Deny is a drop of its own, naming the policy and the rule.
    assert!(
        text.lines().any(|l| l
            .contains("--comment \"ClusterNetworkPolicy/pass-example ingress[0]\"")
            && l.ends_with("-j DROP")),
        "{text}"
    );
    assert!(text.contains("-A SLUICE-CGI-"), "{text}");
}
