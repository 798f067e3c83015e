//! The rendered text is accepted by the real tools and lands in the kernel exactly as
//! written: `ipset restore` and `iptables-restore --noflush -w` (nft and legacy
//! backends) in a throwaway network namespace, read back with `iptables-save` and
//! `ipset save`, before and after an incremental update. (Real packets through these
//! rules are the node agent's tests.)

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use sluice_policy::compile::{Ruleset, Table, compile};
use sluice_policy::dataplane::plan::{self, diff};
use sluice_policy::model::*;
use sluice_policy::render::{ipset, iptables};
use sluice_policy::selector::LabelSelector;

mod dataplane_support;
use dataplane_support::*;

fn run(cmd: &str, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\ninput:\n{stdin}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `-A` lines of sluice's chains (and jumps into them) as the kernel holds them.
fn saved_rules(backend: &str) -> Vec<String> {
    run(&format!("{backend}-save"), &["-t", "filter"], "")
        .lines()
        .filter(|l| l.starts_with("-A ") && l.contains("sluice:"))
        .map(String::from)
        .collect()
}

fn expected_rules(rs: &Ruleset) -> Vec<String> {
    let mut lines: Vec<String> = iptables::render_table(rs, Table::Filter)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(String::from)
        .collect();
    for j in iptables::builtin_jump_specs(rs) {
        lines.push(format!("-A {} {}", j.chain, j.spec));
    }
    lines.sort();
    lines
}

/// `set member` pairs of sluice's sets as the kernel holds them. ipset prints a
/// hash:net /32 without its prefix length; normalise to how sluice writes it.
fn saved_members() -> BTreeSet<(String, String)> {
    run("ipset", &["save"], "")
        .lines()
        .filter_map(|l| l.strip_prefix("add SLUICE-"))
        .map(|rest| {
            let (set, member) = rest.split_once(' ').unwrap();
            (format!("SLUICE-{set}"), member.to_string())
        })
        .collect()
}

fn expected_members(rs: &Ruleset) -> BTreeSet<(String, String)> {
    rs.sets
        .values()
        .flat_map(|s| {
            s.members.iter().map(|m| {
                let text = ipset::member_text(m);
                // hash:net stores a /32 as a host address.
                let text = text.replace("/32", "");
                (s.name.clone(), text)
            })
        })
        .collect()
}

fn saved_set_names() -> BTreeSet<String> {
    run("ipset", &["list", "-n"], "")
        .lines()
        .filter(|l| l.starts_with("SLUICE-"))
        .map(String::from)
        .collect()
}

fn apply_full(backend: &str, rs: &Ruleset) {
    run("ipset", &["restore"], &ipset::render(rs));
    run(
        &format!("{backend}-restore"),
        &["--noflush", "-w"],
        &iptables::render(rs),
    );
}

fn assert_kernel_holds(backend: &str, rs: &Ruleset) {
    let mut saved = saved_rules(backend);
    saved.sort();
    assert_eq!(
        saved,
        expected_rules(rs),
        "{backend}: rules differ from what was rendered"
    );
    assert_eq!(saved_members(), expected_members(rs), "set members differ");
    let names: BTreeSet<String> = rs.sets.keys().cloned().collect();
    assert_eq!(
        saved_set_names(),
        names,
        "set names differ (scratch sets left over?)"
    );
}

fn changed_cluster() -> Cluster {
    let mut c = feature_cluster();
    // A label change (set members only), a new policy (new chain, new set), a removed
    // policy (chain deleted, set destroyed) and a new local pod (dispatch rewrite).
    c.pod_mut(&NamespacedName::new("db", "cache"))
        .unwrap()
        .labels = labels(&[("app", "pg")]);
    c.policies.remove(&NamespacedName::new("web", "front-in"));
    c.add_policy(mk_policy(
        "db",
        "pg-in",
        LabelSelector::from_labels([("app", "pg")]),
        Some(vec![rule(
            vec![pods_in(
                Some(LabelSelector::everything()),
                LabelSelector::from_labels([("app", "api")]),
            )],
            vec![port(Protocol::Tcp, num(5432))],
        )]),
        None,
    ));
    c.add_pod(mk_pod(
        "web",
        "new",
        &[("app", "front")],
        "10.244.1.9",
        "node-1",
    ));
    // Both tiers of ClusterNetworkPolicy: their chains, per-rule sets and the
    // second `-m comment` naming each rule must read back as written.
    let tcp =
        |start, end| Ports::Listed(vec![port(Protocol::Tcp, PortMatch::Numbers { start, end })]);
    for (name, tier, action, peer, ports) in [
        (
            "deny-metadata",
            Tier::Admin,
            Action::Deny,
            ClusterPeer::Networks(vec!["169.254.169.254/32".parse().unwrap()]),
            Ports::Any,
        ),
        (
            "pass-db",
            Tier::Admin,
            Action::Pass,
            ClusterPeer::Namespaces(LabelSelector::from_labels([("region", "bar")])),
            tcp(5432, 5440),
        ),
        (
            "accept-dns",
            Tier::Baseline,
            Action::Accept,
            ClusterPeer::Networks(vec!["0.0.0.0/0".parse().unwrap()]),
            tcp(53, 53),
        ),
    ] {
        c.add_cluster_policy(ClusterNetworkPolicy {
            log_allowed: Default::default(),
            name: name.into(),
            tier,
            priority: 10,
            subject: Subject::Namespaces(LabelSelector::everything()),
            ingress: vec![],
            egress: vec![ClusterRule {
                name: None,
                action,
                peers: vec![peer],
                ports,
            }],
            not_implemented: vec![],
        });
    }
    c
}

fn exercise(backend: &str) {
    let old = compile(&feature_cluster(), "node-1", &FakeVeths).unwrap();
    apply_full(backend, &old);
    for j in iptables::builtin_jump_specs(&old) {
        let cmd = format!(
            "{backend} -w -t {} -I {} 1 {}",
            j.table.as_str(),
            j.chain,
            j.spec
        );
        let out = Command::new("sh").args(["-c", &cmd]).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_kernel_holds(backend, &old);

    // A second full sync over the first is idempotent (chains flushed, sets swapped).
    apply_full(backend, &old);
    assert_kernel_holds(backend, &old);

    // Incremental update, in the documented order.
    let new = compile(&changed_cluster(), "node-1", &FakeVeths).unwrap();
    let delta = diff(&old, &new);
    assert!(!delta.destroy_sets.is_empty() && !delta.delete.is_empty() && !delta.add.is_empty());
    run("ipset", &["restore"], &delta.ipset_before());
    run(
        &format!("{backend}-restore"),
        &["--noflush", "-w"],
        &delta.iptables(Table::Filter),
    );
    run("ipset", &["restore"], &delta.ipset_after());
    assert_kernel_holds(backend, &new);

    // Cleanup of chains and sets a previous run left behind, and nothing else.
    run(
        &format!("{backend}-restore"),
        &["--noflush", "-w"],
        "*filter\n:SLUICE-PI-stale - [0:0]\n:OTHER-CHAIN - [0:0]\nCOMMIT\n",
    );
    run("ipset", &["create", "SLUICE-P-stale", "hash:ip"], "");
    // The planner, given what the kernel holds, removes exactly those.
    let mut kernel = plan::KernelState {
        sets: ipset::parse_save(&run("ipset", &["save"], ""), "SLUICE-"),
        ..Default::default()
    };
    let saved = run(&format!("{backend}-save"), &["-t", "filter"], "");
    kernel.tables.insert(
        Table::Filter,
        iptables::parse_save(&saved).remove("filter").unwrap(),
    );
    let cleanup = plan::plan(&new, &kernel).unwrap();
    let text = cleanup.iptables(Table::Filter);
    assert!(text.contains("-X SLUICE-PI-stale") && !text.contains("OTHER-CHAIN"));
    assert_eq!(cleanup.chains_rewritten(), 0, "{text}");
    run(&format!("{backend}-restore"), &["--noflush", "-w"], &text);
    assert_eq!(cleanup.destroy_sets, ["SLUICE-P-stale"]);
    run("ipset", &["restore"], &cleanup.ipset_after());
    assert_kernel_holds(backend, &new);
    assert!(run(&format!("{backend}-save"), &["-t", "filter"], "").contains(":OTHER-CHAIN"));
}

#[test]
fn rendered_text_applies_and_reads_back_identically_with_iptables_nft() {
    if !sluice_testkit::require_root(
        "rendered_text_applies_and_reads_back_identically_with_iptables_nft",
    ) || !sluice_testkit::require_tool("iptables nft", "iptables-restore")
        || !sluice_testkit::require_tool("iptables nft", "ipset")
    {
        return;
    }
    sluice_testkit::in_new_netns(|| exercise("iptables"));
}

#[test]
fn rendered_text_applies_and_reads_back_identically_with_iptables_legacy() {
    if !sluice_testkit::require_root(
        "rendered_text_applies_and_reads_back_identically_with_iptables_legacy",
    ) || !sluice_testkit::require_tool("iptables legacy", "iptables-legacy-restore")
    {
        return;
    }
    sluice_testkit::in_new_netns(|| exercise("iptables-legacy"));
}
