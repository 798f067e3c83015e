//! What the rendered text looks like and how it changes: snapshots (insta) of the
//! iptables-restore and ipset text, byte-for-byte determinism, the kernel's name
//! limits, rule counts that do not grow with remote pods, and the incremental diff.

use std::collections::BTreeSet;

use proptest::prelude::*;
use sluice_policy::classify::{Hook, Packet, Verdict, classify};
use sluice_policy::compile::{
    CtState, IfaceName, Ruleset, SetMember, Table, compile, pod_group_chain_of,
};
use sluice_policy::dataplane::plan::diff;
use sluice_policy::model::*;
use sluice_policy::names::{self, Direction, MAX_CHAIN_LEN, MAX_SET_LEN, PREFIX};
use sluice_policy::render::{ipset, iptables};
use sluice_policy::selector::LabelSelector;

mod dataplane_support;
use dataplane_support::*;

fn compile_node(c: &Cluster, node: &str) -> Ruleset {
    compile(c, node, &FakeVeths).expect("compile")
}

fn full_text(rs: &Ruleset) -> String {
    format!(
        "# ipset\n{}# iptables\n{}",
        ipset::render(rs),
        iptables::render(rs)
    )
}

#[test]
fn feature_cluster_renders_as_snapshotted() {
    let rs = compile_node(&feature_cluster(), "node-1");
    insta::assert_snapshot!("feature_cluster_node1_iptables", iptables::render(&rs));
    insta::assert_snapshot!("feature_cluster_node1_ipset", ipset::render(&rs));
    let jumps: Vec<String> = iptables::builtin_jump_specs(&rs)
        .into_iter()
        .map(|j| format!("-t {} -I {} 1 {}", j.table.as_str(), j.chain, j.spec))
        .collect();
    insta::assert_snapshot!("feature_cluster_node1_jumps", jumps.join("\n"));
}

/// The seed scenarios as policy-core wrote them (`tests/data/seed-*/`, one directory
/// of manifests each): every node's full text.
#[test]
fn seed_scenarios_render_as_snapshotted() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut scenarios: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    scenarios.retain(|p| {
        p.is_dir()
            && p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
    });
    scenarios.sort();
    assert!(
        !scenarios.is_empty(),
        "no seed scenarios in {}",
        dir.display()
    );
    for scenario in scenarios {
        let mut files: Vec<_> = std::fs::read_dir(&scenario)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
            })
            .collect();
        files.sort();
        let mut cluster = Cluster::default();
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            let origin = path.display().to_string();
            sluice_policy::parse_documents(&origin, &text)
                .unwrap_or_else(|e| panic!("{origin}: {e}"))
                .add_to(&mut cluster);
        }
        let mut nodes: BTreeSet<String> = cluster.nodes.keys().cloned().collect();
        nodes.extend(cluster.pods.values().filter_map(|p| p.node.clone()));
        let mut out = String::new();
        for node in nodes {
            let rs = compile_node(&cluster, &node);
            out.push_str(&format!("### node {node}\n{}", full_text(&rs)));
        }
        let name = scenario.file_name().unwrap().to_string_lossy().to_string();
        insta::assert_snapshot!(name, out);
    }
}

/// Seed 003: ingress to app=linuxea.com from 172.16.0.0/16 except 172.16.8.0/24 on
/// TCP 80 and 81, written out so the exact lines are checked, not only snapshotted.
#[test]
fn ip_block_except_and_two_ports_render_as_nomatch_and_two_rules() {
    let mut c = Cluster::default();
    c.add_pod(mk_pod(
        "default",
        "web",
        &[("app", "linuxea.com")],
        "10.244.1.2",
        "n1",
    ));
    c.add_policy(mk_policy(
        "default",
        "linuxea",
        LabelSelector::from_labels([("app", "linuxea.com")]),
        Some(vec![rule(
            vec![block("172.16.0.0/16", &["172.16.8.0/24"])],
            vec![port(Protocol::Tcp, num(80)), port(Protocol::Tcp, num(81))],
        )]),
        None,
    ));
    let rs = compile_node(&c, "n1");
    let set = rs
        .sets
        .values()
        .find(|s| s.name.starts_with("SLUICE-N-"))
        .unwrap();
    let members: Vec<String> = set.members.iter().map(ipset::member_text).collect();
    assert_eq!(members, ["172.16.0.0/16", "172.16.8.0/24 nomatch"]);
    let text = iptables::render(&rs);
    for p in [80, 81] {
        let line = format!(
            "-p tcp -m comment --comment \"sluice:{{}}\" -m set --match-set {} src -m tcp --dport {p} -j MARK --set-xmark 0x10000/0x10000",
            set.name
        );
        let (before, after) = line.split_once("{}").unwrap();
        assert!(
            text.lines().any(|l| l.contains(before)
                && l.contains(after.trim_start_matches('"').trim_start_matches('}'))),
            "no rule for port {p} in\n{text}"
        );
    }
}

#[test]
fn every_name_fits_and_every_rule_is_tagged_once() {
    let rs = compile_node(&feature_cluster(), "node-1");
    for chains in rs.tables.values() {
        for chain in chains.values() {
            assert!(
                chain.name.starts_with(PREFIX) && chain.name.len() <= MAX_CHAIN_LEN,
                "{}",
                chain.name
            );
        }
    }
    for name in rs.sets.keys() {
        assert!(name.len() <= MAX_SET_LEN, "{name}");
    }
    let text = iptables::render(&rs);
    // A tag covers its chain and the rule's text, not its position: equal tags only
    // on equal lines (the same rule twice in one chain), never on different rules.
    let mut by_tag: std::collections::BTreeMap<&str, &str> = Default::default();
    for l in text.lines().filter(|l| l.starts_with("-A ")) {
        let tag = l
            .split("sluice:")
            .nth(1)
            .expect("every rule has a tag")
            .split('"')
            .next()
            .unwrap();
        let first = by_tag.entry(tag).or_insert(l);
        assert_eq!(*first, l, "rule tags must identify rules");
    }
}

#[test]
fn node_traffic_and_unknown_pods_follow_the_decided_layout() {
    let c = feature_cluster();
    let rs = compile_node(&c, "node-1");
    let text = iptables::render(&rs);
    // Conntrack first in the forward path.
    let fwd = rs.chain(Table::Filter, "SLUICE-FWD-POD").unwrap();
    assert_eq!(
        iptables::rule_body(&fwd.rules[0]),
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );
    assert_eq!(
        iptables::rule_body(&fwd.rules[1]),
        "-m conntrack --ctstate INVALID -j DROP"
    );
    // No OUTPUT chain: the node's own traffic to its pods is never policed.
    assert!(rs.jumps.iter().all(|j| j.chain != "OUTPUT"));
    // Both namespaces have policies: unknown pods of web fail closed on ingress, of
    // db on egress; and the prefix rules come after every known pod.
    let web = FakeVeths_prefix("web");
    let db = FakeVeths_prefix("db");
    let to_pod = rs.chain(Table::Filter, "SLUICE-TO-POD").unwrap();
    let last = iptables::rule_body(to_pod.rules.last().unwrap());
    assert_eq!(last, format!("-o {web}+ -j DROP"));
    let from_pod = rs.chain(Table::Filter, "SLUICE-FROM-POD").unwrap();
    assert_eq!(
        iptables::rule_body(from_pod.rules.last().unwrap()),
        format!("-i {db}+ -j DROP")
    );
    assert!(
        !text.contains(&format!("-o {db}+")),
        "db has no ingress policy: new pods open"
    );
    // The hostNetwork pod has no chain of its own.
    let host = sluice_policy::compile::InterfaceNames::host_veth(
        &FakeVeths,
        &c.pods[&NamespacedName::new("web", "node-exporter")],
    );
    assert!(!text.contains(&host));
}

#[allow(non_snake_case)]
fn FakeVeths_prefix(ns: &str) -> String {
    sluice_policy::compile::InterfaceNames::namespace_prefix(&FakeVeths, ns)
}

#[test]
fn anti_spoofing_sends_only_a_pods_own_addresses_to_its_group_and_drops_the_rest() {
    let c = feature_cluster();
    let rs = compile_node(&c, "node-1");
    let pg = c.pods[&NamespacedName::new("db", "pg")].clone();
    let veth = sluice_policy::compile::InterfaceNames::host_veth(&FakeVeths, &pg);
    let iface = IfaceName::new(&veth).unwrap();
    let from_pod = rs.chain(Table::Filter, "SLUICE-FROM-POD").unwrap();
    // pg's egress group set holds its own address on its veth, and nothing else of it.
    let group = pod_group_chain_of(&rs, &veth, Direction::Egress).unwrap();
    let set = names::pod_group_set(Direction::Egress, &group.name);
    let of_pg: Vec<SetMember> = rs.sets[&set]
        .members
        .iter()
        .filter(|m| matches!(m, SetMember::NetIface { iface: i, .. } if *i == iface))
        .copied()
        .collect();
    assert_eq!(
        of_pg,
        [SetMember::NetIface {
            net: "10.244.1.3/32".parse().unwrap(),
            iface
        }]
    );
    let bodies: Vec<String> = from_pod.rules.iter().map(iptables::rule_body).collect();
    let dispatch = format!("-m set --match-set {set} src,src -g {}", group.name);
    let spoof_log = "-m set --match-set SLUICE-POD-VETHS-0 src,src -m conntrack --ctstate NEW \
                     -m limit --limit 100/sec --limit-burst 100 -j NFLOG --nflog-prefix \
                     \"slc:spoof:e\" --nflog-group 7";
    let spoof_drop = "-m set --match-set SLUICE-POD-VETHS-0 src,src -j DROP";
    let at = |body: &str| bodies.iter().position(|b| b == body);
    assert!(
        at(&dispatch).unwrap() < at(spoof_log).unwrap(),
        "{bodies:#?}"
    );
    assert_eq!(at(spoof_log).unwrap() + 1, at(spoof_drop).unwrap());
    assert!(
        rs.sets["SLUICE-POD-VETHS-0"]
            .members
            .contains(&SetMember::NetIface {
                net: Default::default(),
                iface
            })
    );
    // And as the kernel would run it: pg's own address reaches its egress policy
    // (DNS allowed), another source from its veth is dropped.
    let from = |src: &str| {
        let packet = Packet {
            hook: Hook::Forward,
            in_iface: Some(veth.clone()),
            out_iface: Some("eth0".into()),
            src: src.parse().unwrap(),
            dst: "8.8.8.8".parse().unwrap(),
            protocol: Protocol::Udp,
            dport: 53,
            ct: CtState::New,
        };
        classify(&rs, Table::Filter, &packet).unwrap().verdict
    };
    assert_eq!(from("10.244.1.3"), Verdict::Accept);
    assert_eq!(
        from("10.244.1.4"),
        Verdict::Drop,
        "cache's address, from pg's veth"
    );
}

/// The kernel keeps at most 64 hash:net,iface members of one network in a set (it
/// does not hash the interface): a node of 1,000 local pods in one group must not
/// put more than that on one network in any set.
#[test]
fn no_interface_set_holds_more_members_of_one_network_than_the_kernel_can() {
    let mut c = feature_cluster();
    for i in 0..1000u32 {
        c.add_pod(mk_pod(
            "db",
            &format!("many-{i}"),
            &[("app", "pg")],
            &format!("10.244.{}.{}", 10 + i / 250, 1 + i % 250),
            "node-1",
        ));
    }
    let rs = compile_node(&c, "node-1");
    for set in rs.sets.values() {
        let mut per_net = std::collections::BTreeMap::new();
        for m in &set.members {
            if let SetMember::NetIface { net, .. } = m {
                *per_net.entry(*net).or_insert(0usize) += 1;
            }
        }
        let most = per_net.values().max().copied().unwrap_or(0);
        assert!(most <= 64, "{}: {most} members of one network", set.name);
    }
    let group = names::pod_group_set(
        Direction::Ingress,
        &pod_group_chain_of(&rs, &pg_veth(&c), Direction::Ingress)
            .unwrap()
            .name,
    );
    assert_eq!(
        rs.sets[&group].members.len(),
        1002,
        "pg, cache and the 1,000"
    );
}

fn pg_veth(c: &Cluster) -> String {
    sluice_policy::compile::InterfaceNames::host_veth(
        &FakeVeths,
        &c.pods[&NamespacedName::new("db", "pg")],
    )
}

/// Rule count grows with policies and local pods; pods elsewhere only add set members.
#[test]
fn remote_pods_add_set_members_not_rules() {
    let base = feature_cluster();
    let before = compile_node(&base, "node-1");
    let mut more = base.clone();
    for i in 0..200u32 {
        more.add_pod(mk_pod(
            if i % 2 == 0 { "web" } else { "db" },
            &format!("remote-{i}"),
            &[("app", "pg")],
            &format!("10.244.{}.{}", 2 + i / 250, 10 + i % 250),
            "node-2",
        ));
    }
    let after = compile_node(&more, "node-1");
    assert_eq!(before.rule_count(), after.rule_count());
    assert!(after.set_member_count() >= before.set_member_count() + 100);
    let delta = diff(&before, &after);
    assert_eq!(delta.chains_touched(), 0, "{}", delta.iptables_all());
    assert!(!delta.add.is_empty() && delta.remove.is_empty());
}

#[test]
fn a_label_change_moves_set_members_and_touches_no_chain() {
    let old = feature_cluster();
    let mut new = old.clone();
    // cache becomes app=pg: it enters the db/app=pg peer set, nothing else changes.
    new.pod_mut(&NamespacedName::new("db", "cache"))
        .unwrap()
        .labels = labels(&[("app", "pg")]);
    let (a, b) = (compile_node(&old, "node-1"), compile_node(&new, "node-1"));
    let delta = diff(&a, &b);
    assert_eq!(delta.chains_touched(), 0);
    assert_eq!(delta.add.len(), 1);
    assert_eq!(delta.add[0].1, SetMember::Ip("10.244.1.4".parse().unwrap()));
    assert!(delta.iptables_all().is_empty());
    assert_eq!(
        delta.ipset_before(),
        format!("add {} 10.244.1.4 -exist\n", delta.add[0].0)
    );
}

#[test]
fn a_pod_becoming_isolated_moves_to_a_new_group_chain() {
    let old = feature_cluster();
    let mut new = old.clone();
    new.add_policy(mk_policy(
        "db",
        "pg-in",
        LabelSelector::from_labels([("app", "pg")]),
        Some(vec![rule(
            vec![pods_in(None, LabelSelector::everything())],
            vec![],
        )]),
        None,
    ));
    let (a, b) = (compile_node(&old, "node-1"), compile_node(&new, "node-1"));
    let delta = diff(&a, &b);
    let rewritten: BTreeSet<&str> = delta.rewrite[&Table::Filter]
        .iter()
        .map(|c| c.name.as_str())
        .chain(delta.edit.values().flatten().map(|e| e.chain.as_str()))
        .collect();
    let veth = |pod: &str| {
        sluice_policy::compile::InterfaceNames::host_veth(
            &FakeVeths,
            &new.pods[&NamespacedName::new("db", pod)],
        )
    };
    let (pg_veth, cache_veth) = (veth("pg"), veth("cache"));
    let db_prefix = FakeVeths_prefix("db");
    // pg leaves the group it shared with cache for a group of its own: that group's
    // chain, the new policy chain, and the ingress dispatch (its rule, and, db now
    // having an ingress policy, the fail-closed drop of unknown db pods) — nothing
    // else; cache's chain stays.
    let pg_group = pod_group_chain_of(&b, &pg_veth, Direction::Ingress).unwrap();
    let cache_group = pod_group_chain_of(&b, &cache_veth, Direction::Ingress).unwrap();
    assert_eq!(
        pod_group_chain_of(&a, &pg_veth, Direction::Ingress).unwrap(),
        cache_group
    );
    assert_ne!(pg_group, cache_group);
    assert!(rewritten.contains(pg_group.name.as_str()));
    assert!(rewritten.iter().any(|n| n.starts_with("SLUICE-PI-")));
    assert!(rewritten.contains("SLUICE-TO-POD"));
    assert_eq!(rewritten.len(), 3, "{rewritten:?}");
    let to_pod = b.chain(Table::Filter, "SLUICE-TO-POD").unwrap();
    assert!(
        to_pod
            .rules
            .iter()
            .any(|r| iptables::rule_body(r) == format!("-o {db_prefix}+ -j DROP"))
    );
    // pg's veth left the old group's set; the new group's set is created with it.
    let pg_own = SetMember::NetIface {
        net: "10.244.1.3/32".parse().unwrap(),
        iface: IfaceName::new(&pg_veth).unwrap(),
    };
    let old_set = names::pod_group_set(Direction::Ingress, &cache_group.name);
    assert_eq!(delta.remove, [(old_set, pg_own)]);
    let created: Vec<&str> = delta.create_sets.iter().map(|s| s.name.as_str()).collect();
    let pg_set = names::pod_group_set(Direction::Ingress, &pg_group.name);
    assert!(created.contains(&pg_set.as_str()), "{created:?}");
    // And back: the group and policy chains are deleted after the dispatch rule that
    // sent packets there.
    let back = diff(&b, &a);
    let text = back.iptables(Table::Filter);
    let x = text.find("-X SLUICE-PI-").expect("policy chain deleted");
    assert!(text.contains(&format!("-X {}", pg_group.name)));
    // (rewritten, or edited in place: either way before the deletions)
    let dispatch = text.rfind("SLUICE-TO-POD").unwrap();
    assert!(dispatch < x, "{text}");
}

/// Issue 12: a new local pod whose chains already exist (its group's) costs set
/// members only — no iptables-restore, so no process and no table validation.
#[test]
fn a_pod_joining_an_existing_group_is_set_members_only() {
    let old = feature_cluster();
    let mut new = old.clone();
    // Selected as pg and cache are: the same groups in both directions.
    new.add_pod(mk_pod(
        "db",
        "pg-2",
        &[("app", "pg")],
        "10.244.1.9",
        "node-1",
    ));
    let (a, b) = (compile_node(&old, "node-1"), compile_node(&new, "node-1"));
    let delta = diff(&a, &b);
    assert_eq!(delta.chains_touched(), 0, "{}", delta.iptables_all());
    assert!(delta.iptables_all().is_empty());
    assert!(delta.tables().is_empty());
    assert!(delta.create_sets.is_empty() && delta.retyped_sets.is_empty());
    assert!(delta.remove.is_empty() && delta.destroy_sets.is_empty());
    let veth = sluice_policy::compile::InterfaceNames::host_veth(
        &FakeVeths,
        &new.pods[&NamespacedName::new("db", "pg-2")],
    );
    let iface = IfaceName::new(&veth).unwrap();
    let ingress = pod_group_chain_of(&b, &veth, Direction::Ingress).unwrap();
    let egress = pod_group_chain_of(&b, &veth, Direction::Egress).unwrap();
    let any = SetMember::NetIface {
        net: Default::default(),
        iface,
    };
    let own = SetMember::NetIface {
        net: "10.244.1.9/32".parse().unwrap(),
        iface,
    };
    let mut added: Vec<(String, SetMember)> = delta.add.clone();
    added.retain(|(_, m)| matches!(m, SetMember::NetIface { .. }));
    added.sort();
    let mut want = vec![
        (names::pod_group_set(Direction::Ingress, &ingress.name), own),
        (names::pod_group_set(Direction::Egress, &egress.name), own),
        (names::pod_veths_set(0), any),
    ];
    want.sort();
    assert_eq!(added, want);
    // The rest are the peer sets that select app=pg (db/egress's pg peer).
    assert!(
        delta
            .add
            .iter()
            .all(|(_, m)| matches!(m, SetMember::NetIface { .. } | SetMember::Ip(_))),
        "{:?}",
        delta.add
    );
}

/// A new local pod in a group no other local pod is in: its chains and sets, and
/// the dispatch rules, in one iptables-restore of one table that deletes nothing.
#[test]
fn a_pod_in_a_new_group_is_one_restore_that_only_adds() {
    let mut new = feature_cluster();
    new.add_policy(mk_policy(
        "db",
        "batch-in",
        LabelSelector::from_labels([("app", "batch")]),
        Some(vec![rule(
            vec![pods_in(None, LabelSelector::everything())],
            vec![],
        )]),
        None,
    ));
    let with_policy = compile_node(&new, "node-1");
    new.add_pod(mk_pod(
        "db",
        "batch",
        &[("app", "batch")],
        "10.244.1.9",
        "node-1",
    ));
    let b = compile_node(&new, "node-1");
    let delta = diff(&with_policy, &b);
    assert_eq!(delta.tables(), [Table::Filter]);
    assert!(delta.delete.values().all(Vec::is_empty));
    for edit in delta.edit.values().flatten() {
        assert_eq!(edit.delete, 0, "{edit:?}");
    }
    let veth = sluice_policy::compile::InterfaceNames::host_veth(
        &FakeVeths,
        &new.pods[&NamespacedName::new("db", "batch")],
    );
    let group = pod_group_chain_of(&b, &veth, Direction::Ingress).unwrap();
    let rewritten: Vec<&str> = delta.rewrite[&Table::Filter]
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert!(rewritten.contains(&group.name.as_str()), "{rewritten:?}");
    let created: Vec<&str> = delta.create_sets.iter().map(|s| s.name.as_str()).collect();
    assert!(created.contains(&names::pod_group_set(Direction::Ingress, &group.name).as_str()));
    // Sets come first (the rules reference them), then the one restore.
    assert!(delta.ipset_before().contains("create "));
    let text = delta.iptables_all();
    assert_eq!(text.matches("COMMIT").count(), 1, "{text}");
}

#[test]
fn removing_everything_destroys_sets_after_the_rules() {
    let a = compile_node(&feature_cluster(), "node-1");
    let b = compile_node(&Cluster::default(), "node-1");
    let delta = diff(&a, &b);
    assert_eq!(delta.destroy_sets.len(), a.sets.len());
    assert!(delta.ipset_before().is_empty());
    assert_eq!(delta.ipset_after().lines().count(), a.sets.len());
    assert!(diff(&b, &b).is_empty());
}

/// Shuffles what does not carry meaning: insertion order into the cluster and the
/// order of matchExpressions.
fn scrambled(c: &Cluster) -> Cluster {
    let mut out = Cluster::default();
    for ns in c.namespaces.values().rev() {
        out.add_namespace(ns.clone());
    }
    for n in c.nodes.values().rev() {
        out.add_node(n.clone());
    }
    for p in c.pods.values().rev() {
        out.add_pod(Pod::clone(p));
    }
    for p in c.policies.values().rev() {
        let mut p = NetworkPolicy::clone(p);
        p.pod_selector.match_expressions.reverse();
        for r in p.ingress.iter_mut().chain(p.egress.iter_mut()) {
            if let Peers::Listed(peers) = &mut r.peers {
                for peer in peers {
                    if let Peer::Pods(pp) = peer {
                        pp.pods.match_expressions.reverse();
                    }
                }
            }
        }
        out.add_policy(p);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn rendering_is_byte_for_byte_deterministic(cluster in arb_cluster()) {
        for (node, _) in NODES {
            let a = full_text(&compile_node(&cluster, node));
            let b = full_text(&compile_node(&cluster, node));
            prop_assert_eq!(&a, &b);
            let c = full_text(&compile_node(&scrambled(&cluster), node));
            prop_assert_eq!(&a, &c);
        }
    }

    #[test]
    fn the_agents_diff_equals_the_plan_against_what_the_old_model_left_in_the_kernel(
        a in arb_cluster(),
        b in arb_cluster(),
    ) {
        let (old, new) = (compile_node(&a, "node-a"), compile_node(&b, "node-a"));
        let kernel = sluice_policy::dataplane::plan::KernelState::of(&old);
        prop_assert_eq!(
            diff(&old, &new),
            sluice_policy::dataplane::plan::plan(&new, &kernel).unwrap()
        );
    }

    #[test]
    fn applying_a_diff_reaches_the_new_ruleset(a in arb_cluster(), b in arb_cluster()) {
        let (old, new) = (compile_node(&a, "node-a"), compile_node(&b, "node-a"));
        let delta = diff(&old, &new);
        // Replay the delta on the old model: it must give exactly the new one.
        let mut replay = old.clone();
        for (table, chains) in &delta.rewrite {
            for chain in chains {
                replay.add_chain(*table, chain.clone());
            }
        }
        for (table, edits) in &delta.edit {
            for e in edits {
                e.apply(replay.tables.get_mut(table).unwrap().get_mut(&e.chain).unwrap());
            }
        }
        for (table, names) in &delta.delete {
            for n in names {
                replay.tables.get_mut(table).unwrap().remove(n);
            }
        }
        for set in &delta.create_sets {
            replay.sets.insert(set.name.clone(), set.clone());
        }
        for (name, m) in &delta.add {
            prop_assert!(replay.sets.get_mut(name).unwrap().members.insert(*m));
        }
        for (name, m) in &delta.remove {
            prop_assert!(replay.sets.get_mut(name).unwrap().members.remove(m));
        }
        for name in &delta.destroy_sets {
            replay.sets.remove(name);
        }
        replay.tables.retain(|_, chains| !chains.is_empty());
        let mut expected = new.clone();
        expected.tables.retain(|_, chains| !chains.is_empty());
        // What names the policies of a log record is the agent's, never the kernel's.
        expected.deny_policies = replay.deny_policies.clone();
        prop_assert_eq!(replay, expected);
        prop_assert!(delta.retyped_sets.is_empty());
    }
}
