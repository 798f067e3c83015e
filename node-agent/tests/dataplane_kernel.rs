//! The dataplane against the real kernel, in throwaway network namespaces: what
//! `iptables-save` and `ipset save` show after a sync is what was rendered; foreign
//! chains survive syncs byte for byte; a hand-deleted rule is restored; both iptables
//! backends behave the same. The same cases run on the nftables dataplane (sluice's
//! table `ip sluice` read back with `nft -j list`), and switching a node between the
//! two removes the other's sluice objects and leaves foreign ones byte for byte.

use sluice_agent::dataplane::nft::NftDataplane;
use sluice_agent::dataplane::select::{DataplaneChoice, SelectedDataplane, decide};
use sluice_agent::dataplane::{Backend, CommandRunner, Dataplane, ExecRunner, SyncMode};
use sluice_policy::dataplane::nft_plan::NftState;
use sluice_policy::dataplane::{
    BuiltinJump, Chain, CtState, Interface, IpSet, Match, Rule, Ruleset, SetDirection, SetKind,
    SetMember, Table, Target,
};
use sluice_policy::render::iptables;
use sluice_testkit::{in_new_netns, require_root, sh};

fn set(name: &str, direction: SetDirection, negated: bool) -> Match {
    Match::Set {
        name: name.into(),
        direction,
        negated,
    }
}

fn chain(name: &str, rules: Vec<Rule>) -> Chain {
    Chain {
        name: name.into(),
        rules,
    }
}

fn jump(table: Table, from: &str, to: &str) -> BuiltinJump {
    BuiltinJump {
        table,
        chain: from.into(),
        rule: Rule::new(vec![], Target::Jump(to.into())),
    }
}

fn desired(extra_member: Option<&str>) -> Ruleset {
    let mut d = Ruleset::default();
    d.add_chain(
        Table::Filter,
        chain(
            "SLUICE-FORWARD",
            vec![
                Rule::new(
                    vec![Match::CtState(vec![CtState::Related, CtState::Established])],
                    Target::Accept,
                ),
                Rule::new(
                    vec![Match::OutInterface(Interface::prefix("slc"))],
                    Target::Jump("SLUICE-TO-POD".into()),
                ),
            ],
        ),
    );
    d.add_chain(
        Table::Filter,
        chain(
            "SLUICE-TO-POD",
            vec![
                Rule::new(
                    vec![set("SLUICE-NODES", SetDirection::Src, false)],
                    Target::Accept,
                ),
                Rule::new(vec![], Target::Drop),
            ],
        ),
    );
    d.add_chain(
        Table::Nat,
        chain(
            "SLUICE-POSTROUTING",
            vec![Rule::new(
                vec![
                    set("SLUICE-POOLS", SetDirection::Src, false),
                    set("SLUICE-POOLS", SetDirection::Dst, true),
                ],
                Target::Masquerade,
            )],
        ),
    );
    d.jumps = vec![
        jump(Table::Filter, "FORWARD", "SLUICE-FORWARD"),
        jump(Table::Nat, "POSTROUTING", "SLUICE-POSTROUTING"),
    ];
    let mut nodes = vec!["192.168.50.1", "192.168.50.2"];
    nodes.extend(extra_member);
    for s in [
        IpSet {
            name: "SLUICE-NODES".into(),
            kind: SetKind::HashIp,
            members: nodes
                .iter()
                .map(|n| SetMember::Ip(n.parse().unwrap()))
                .collect(),
        },
        IpSet {
            name: "SLUICE-POOLS".into(),
            kind: SetKind::HashNet,
            members: [SetMember::Net {
                net: "10.244.0.0/16".parse().unwrap(),
                nomatch: false,
            }]
            .into(),
        },
    ] {
        d.sets.insert(s.name.clone(), s);
    }
    d
}

/// kube-proxy and Docker stand-ins: chains and rules in built-in chains that are not ours.
fn install_foreign(backend: Backend) {
    let restore = backend.restore_cmd();
    sh(&format!(
        "{restore} --noflush <<'EOF'
*filter
:KUBE-FORWARD - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -j DOCKER-USER
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -m comment --comment \"kubernetes forwarding rules\" -j ACCEPT
-A DOCKER-USER -j RETURN
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m udp --dport 53 -j DNAT --to-destination 10.244.1.5:53
COMMIT
EOF"
    ));
}

/// Every line of iptables-save that is not ours and not a counter or comment header.
fn foreign_lines(backend: Backend) -> Vec<String> {
    sh(backend.save_cmd())
        .lines()
        .filter(|l| !l.starts_with('#') && !iptables::SavedTable::is_ours(l))
        .map(|l| {
            // Built-in chain policy lines carry packet counters that real traffic moves.
            if l.starts_with(':') {
                l.split(" [").next().unwrap_or(l).to_string()
            } else {
                l.to_string()
            }
        })
        .collect()
}

fn owned_lines(backend: Backend, table: &str) -> Vec<String> {
    sh(&format!("{} -t {table}", backend.save_cmd()))
        .lines()
        .filter(|l| l.starts_with("-A ") && iptables::SavedTable::is_ours(l))
        .map(str::to_string)
        .collect()
}

fn expected_owned(d: &Ruleset, table: &str) -> Vec<String> {
    // iptables-save lists built-in chains first, then the rest, each in its own order.
    let t = iptables::parse_table(table).unwrap();
    let mut lines: Vec<String> = d
        .jumps
        .iter()
        .filter(|j| j.table == t)
        .map(|j| format!("-A {} {}", j.chain, iptables::jump_spec(j)))
        .collect();
    for c in d.tables[&t].values() {
        lines.extend(iptables::chain_lines(c));
    }
    lines
}

fn both_backends(test: &str, f: impl Fn(Backend) + Sync) {
    if !require_root(test) {
        return;
    }
    for backend in [Backend::Nft, Backend::Legacy] {
        in_new_netns(|| f(backend));
    }
}

/// A foreign nftables table (a kube-proxy nftables-mode stand-in) in the current netns.
fn install_foreign_nft() {
    sh("nft -f - <<'EOF'
table inet kube-proxy {
    set cluster-ips {
        type ipv4_addr
        elements = { 10.96.0.1, 10.96.0.10 }
    }
    chain forward {
        type filter hook forward priority filter - 1; policy accept;
        ip daddr @cluster-ips ct state new counter accept
    }
}
EOF");
}

/// The nftables tables that are neither sluice's nor iptables-nft's (those are
/// compared through `iptables-save`), counters set aside.
fn foreign_nft() -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for l in sh("nft list ruleset").lines() {
        if l.starts_with("table ") {
            skip = l.starts_with("table ip sluice ")
                || ["filter", "nat", "mangle", "raw", "security"]
                    .iter()
                    .any(|t| l == format!("table ip {t} {{"));
        }
        if !skip {
            let l = match l.find("counter packets") {
                Some(i) => format!("{}counter", &l[..i]),
                None => l.to_string(),
            };
            out.push(l);
        }
        if l == "}" {
            skip = false;
        }
    }
    out
}

/// sluice's table as the kernel holds it, through the planner's own parser.
fn nft_state() -> Option<NftState> {
    NftDataplane::new(ExecRunner).read().unwrap()
}

fn nft_available(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    sluice_testkit::require_tool(test, "nft")
}

#[test]
fn saved_rules_and_sets_are_the_rendered_text() {
    both_backends("saved_rules_and_sets_are_the_rendered_text", |backend| {
        let dp = Dataplane::new(ExecRunner, backend);
        let d = desired(None);
        dp.sync(&d).unwrap();
        for table in ["filter", "nat"] {
            let mut got = owned_lines(backend, table);
            // Normalisation of the match text is iptables' business; compare the
            // rendered lines through the same normaliser by re-saving them.
            let want = expected_owned(&d, table);
            assert_eq!(
                got.len(),
                want.len(),
                "{backend:?} {table}: {got:#?} vs {want:#?}"
            );
            // Same identity (hash comment) and the same text once the comment is set
            // aside: iptables-save prints the address/interface part of a rule before
            // its match modules, so only the comment's position differs.
            let without_comment = |l: &str| {
                let h = iptables::comment_hash(l).unwrap();
                l.replace(&format!("-m comment --comment \"sluice:{h}\" "), "")
            };
            got.iter_mut().zip(&want).for_each(|(g, w)| {
                assert_eq!(
                    iptables::comment_hash(g),
                    iptables::comment_hash(w),
                    "{backend:?}"
                );
                assert_eq!(without_comment(g), without_comment(w), "{backend:?}");
            });
        }
        let mut sets: Vec<String> = sh("ipset save")
            .lines()
            .filter(|l| l.starts_with("add "))
            .map(str::to_string)
            .collect();
        sets.sort();
        assert_eq!(
            sets,
            [
                "add SLUICE-NODES 192.168.50.1",
                "add SLUICE-NODES 192.168.50.2",
                "add SLUICE-POOLS 10.244.0.0/16"
            ]
        );
        let listed = sh("ipset list SLUICE-NODES");
        assert!(
            listed.contains("Type: hash:ip") && listed.contains("Number of entries: 2"),
            "{listed}"
        );
        // Idempotent: a second sync writes nothing.
        let again = dp.sync(&d).unwrap();
        assert!(!again.changed_anything(), "{backend:?}: {again:?}");
    });
}

#[test]
fn foreign_rules_are_byte_identical_after_ten_syncs() {
    both_backends(
        "foreign_rules_are_byte_identical_after_ten_syncs",
        |backend| {
            install_foreign(backend);
            let before = foreign_lines(backend);
            assert!(
                before
                    .iter()
                    .any(|l| l.contains("KUBE-SERVICES -d 10.96.0.10"))
            );
            let dp = Dataplane::new(ExecRunner, backend);
            for i in 0..10 {
                // Alternate the desired state so syncs really rewrite our chains and sets.
                let extra = (i % 2 == 1).then_some("192.168.50.9");
                let mut d = desired(extra);
                if i % 3 == 2 {
                    d.tables
                        .get_mut(&Table::Filter)
                        .unwrap()
                        .get_mut("SLUICE-TO-POD")
                        .unwrap()
                        .rules
                        .insert(
                            0,
                            Rule::new(
                                vec![
                                    Match::Protocol(sluice_policy::Protocol::Udp),
                                    Match::DestinationPorts { start: 53, end: 53 },
                                ],
                                Target::Accept,
                            ),
                        );
                }
                dp.sync(&d).unwrap();
            }
            assert_eq!(foreign_lines(backend), before, "{backend:?}");
            // And our jump is still exactly one per built-in chain.
            let fwd = sh(&format!("{} -t filter", backend.save_cmd()));
            assert_eq!(fwd.matches("-j SLUICE-FORWARD").count(), 1, "{fwd}");
        },
    );
}

#[test]
fn hand_deleted_rule_is_restored_and_untouched_chains_are_not_rewritten() {
    both_backends("hand_deleted_rule_is_restored", |backend| {
        let dp = Dataplane::new(ExecRunner, backend);
        let d = desired(None);
        dp.sync(&d).unwrap();
        let before = owned_lines(backend, "filter");
        let victim = before
            .iter()
            .find(|l| l.starts_with("-A SLUICE-TO-POD") && l.contains("DROP"))
            .unwrap();
        let legacy = if backend == Backend::Legacy {
            "iptables-legacy"
        } else {
            "iptables-nft"
        };
        sh(&format!("{legacy} -D {}", &victim[3..]));
        assert_ne!(owned_lines(backend, "filter"), before);
        let report = dp.sync(&d).unwrap();
        assert_eq!(
            report.chains_rewritten, 1,
            "only the damaged chain: {report:?}"
        );
        assert_eq!(owned_lines(backend, "filter"), before);
        // The jump too.
        sh(&format!("{legacy} -D FORWARD 1"));
        let report = dp.sync(&d).unwrap();
        assert_eq!((report.chains_rewritten, report.jumps_changed), (0, 1));
        assert_eq!(owned_lines(backend, "filter"), before);
    });
}

#[test]
fn removed_chains_and_sets_are_deleted() {
    both_backends("removed_chains_and_sets_are_deleted", |backend| {
        let dp = Dataplane::new(ExecRunner, backend);
        dp.sync(&desired(None)).unwrap();
        let mut smaller = Ruleset::default();
        smaller.tables.insert(Table::Filter, Default::default());
        smaller.tables.insert(Table::Nat, Default::default());
        let r = dp.sync(&smaller).unwrap();
        assert_eq!((r.chains_deleted, r.sets_destroyed), (3, 2), "{r:?}");
        let all = sh(backend.save_cmd());
        assert!(!all.contains("SLUICE"), "{all}");
        assert!(!sh("ipset save").contains("SLUICE"));
    });
}

#[test]
fn auto_detection_follows_the_backend_that_holds_the_rules() {
    use sluice_agent::dataplane::{BackendChoice, backend::detect_backend};
    if !require_root("auto_detection_follows_the_backend_that_holds_the_rules") {
        return;
    }
    in_new_netns(|| {
        assert_eq!(
            detect_backend(&ExecRunner, BackendChoice::Auto).unwrap(),
            Backend::Nft,
            "empty: nft"
        );
        // kube-proxy on a legacy host: its rules live in x_tables.
        sh(
            "iptables-legacy -t nat -N KUBE-SERVICES && iptables-legacy -t nat -A PREROUTING -j KUBE-SERVICES",
        );
        assert_eq!(
            detect_backend(&ExecRunner, BackendChoice::Auto).unwrap(),
            Backend::Legacy
        );
        // kubelet's hint chain in nft outranks the rule count.
        sh("iptables-nft -t mangle -N KUBE-IPTABLES-HINT");
        assert_eq!(
            detect_backend(&ExecRunner, BackendChoice::Auto).unwrap(),
            Backend::Nft
        );
    });
}

#[test]
fn nft_table_holds_what_was_planned_and_a_second_sync_writes_nothing() {
    if !nft_available("nft_table_holds_what_was_planned") {
        return;
    }
    in_new_netns(|| {
        let dp = NftDataplane::new(ExecRunner);
        let d = desired(None);
        let first = dp.sync(&d).unwrap();
        assert!(first.changed_anything());
        assert_eq!(nft_state(), Some(NftState::of(&d)), "read back = planned");
        let again = dp.sync(&d).unwrap();
        assert!(!again.changed_anything(), "{again:?}");
        // An added member, incremental: the kernel matches the model again.
        let more = desired(Some("192.168.50.9"));
        dp.sync_with(&more, SyncMode::Incremental).unwrap();
        assert_eq!(nft_state(), Some(NftState::of(&more)));
    });
}

#[test]
fn nft_foreign_tables_and_iptables_rules_are_byte_identical_after_ten_syncs() {
    if !nft_available("nft_foreign_tables_are_byte_identical") {
        return;
    }
    in_new_netns(|| {
        install_foreign(Backend::Nft);
        install_foreign_nft();
        let before = (foreign_lines(Backend::Nft), foreign_nft());
        assert!(
            before.1.iter().any(|l| l.contains("cluster-ips")),
            "{before:?}"
        );
        let dp = NftDataplane::new(ExecRunner);
        for i in 0..10 {
            let extra = (i % 2 == 1).then_some("192.168.50.9");
            let mode = if i % 3 == 0 {
                SyncMode::Full
            } else {
                SyncMode::Incremental
            };
            dp.sync_with(&desired(extra), mode).unwrap();
        }
        assert!(nft_state().is_some());
        assert_eq!((foreign_lines(Backend::Nft), foreign_nft()), before);
    });
}

#[test]
fn nft_hand_deleted_rule_and_table_are_restored_by_a_full_sync() {
    if !nft_available("nft_hand_deleted_rule_is_restored") {
        return;
    }
    in_new_netns(|| {
        let dp = NftDataplane::new(ExecRunner);
        let d = desired(None);
        dp.sync(&d).unwrap();
        let before = sh("nft list table ip sluice");
        // The first rule of the first chain that has one, by handle.
        let listing = sh("nft -a list table ip sluice");
        let mut chain = None;
        let mut victim = None;
        for l in listing.lines().map(str::trim) {
            if let Some(c) = l.strip_prefix("chain ") {
                chain = c.split_whitespace().next().map(str::to_string);
            } else if let (Some(c), Some((rule, h))) = (&chain, l.rsplit_once(" # handle "))
                && !rule.starts_with("type ")
                && !rule.starts_with("policy ")
            {
                victim = Some((c.clone(), h.to_string()));
                break;
            }
        }
        let (c, h) = victim.unwrap_or_else(|| panic!("no rule:\n{listing}"));
        sh(&format!("nft delete rule ip sluice {c} handle {h}"));
        assert_ne!(sh("nft list table ip sluice"), before);
        let r = dp.sync(&d).unwrap();
        assert!(r.chains_rewritten >= 1, "{r:?}");
        assert_eq!(sh("nft list table ip sluice"), before);
        // The whole table gone: recreated.
        sh("nft delete table ip sluice");
        dp.sync(&d).unwrap();
        assert_eq!(sh("nft list table ip sluice"), before);
    });
}

#[test]
fn nft_removed_chains_and_sets_are_deleted() {
    if !nft_available("nft_removed_chains_and_sets_are_deleted") {
        return;
    }
    in_new_netns(|| {
        let dp = NftDataplane::new(ExecRunner);
        dp.sync(&desired(None)).unwrap();
        let mut smaller = Ruleset::default();
        smaller.tables.insert(Table::Filter, Default::default());
        smaller.tables.insert(Table::Nat, Default::default());
        let r = dp.sync(&smaller).unwrap();
        assert!(r.changed_anything(), "{r:?}");
        assert_eq!(nft_state(), Some(NftState::of(&smaller)));
        let listed = sh("nft list table ip sluice");
        assert!(
            !listed.contains("192.168.50.1") && !listed.contains("10.244.0.0/16"),
            "{listed}"
        );
    });
}

#[test]
fn switching_dataplanes_removes_the_others_sluice_objects_and_nothing_foreign() {
    if !nft_available("switching_dataplanes") {
        return;
    }
    in_new_netns(|| {
        install_foreign(Backend::Nft);
        install_foreign_nft();
        let foreign = || {
            (
                foreign_lines(Backend::Nft),
                foreign_nft(),
                ipsets_not_ours(),
            )
        };
        sh("ipset create FOREIGN-SET hash:ip && ipset add FOREIGN-SET 10.1.1.1");
        let before = foreign();
        // Both of sluice's at once, as a node mid-switch could hold them.
        let d = desired(None);
        Dataplane::new(ExecRunner, Backend::Nft).sync(&d).unwrap();
        NftDataplane::new(ExecRunner).sync(&d).unwrap();
        assert!(sh("iptables-nft-save").contains("SLUICE") && nft_state().is_some());

        // Start on nftables: sluice's iptables chains, jumps and ipsets go.
        let on_nft = SelectedDataplane::new(
            ExecRunner,
            Backend::Nft,
            decide(DataplaneChoice::Nftables, || Ok(())),
        );
        on_nft.sync_with(&d, SyncMode::Full).unwrap();
        assert!(
            !sh("iptables-nft-save").contains("SLUICE"),
            "{}",
            sh("iptables-nft-save")
        );
        assert!(!sh("ipset save").contains("SLUICE"));
        assert_eq!(nft_state(), Some(NftState::of(&d)));
        assert_eq!(
            foreign(),
            before,
            "foreign objects after switching to nftables"
        );
        // A restart on nftables finds nothing to remove and writes nothing.
        let again = SelectedDataplane::new(
            ExecRunner,
            Backend::Nft,
            decide(DataplaneChoice::Nftables, || Ok(())),
        );
        assert!(
            !again
                .sync_with(&d, SyncMode::Full)
                .unwrap()
                .changed_anything()
        );

        // Back to iptables: sluice's table goes, its chains come back.
        let on_ipt = SelectedDataplane::new(
            ExecRunner,
            Backend::Nft,
            decide(DataplaneChoice::Iptables, || Ok(())),
        );
        on_ipt.sync_with(&d, SyncMode::Full).unwrap();
        assert_eq!(nft_state(), None, "{}", sh("nft list ruleset"));
        assert!(sh("iptables-nft-save").contains("SLUICE-FORWARD"));
        let now = foreign();
        assert_eq!(
            now, before,
            "foreign objects after switching back to iptables"
        );
    });
}

/// `ipset save` lines of sets that are not sluice's.
fn ipsets_not_ours() -> Vec<String> {
    sh("ipset save")
        .lines()
        .filter(|l| !l.contains("SLUICE-"))
        .map(str::to_string)
        .collect()
}

#[test]
fn auto_picks_nftables_on_this_kernel_because_nft_check_accepts_the_probe() {
    if !nft_available("auto_picks_nftables") {
        return;
    }
    in_new_netns(|| {
        let s = sluice_agent::dataplane::select::select(&ExecRunner, DataplaneChoice::Auto);
        assert_eq!(
            s.kind,
            sluice_policy::dataplane::DataplaneKind::Nftables,
            "{s:?}"
        );
        // --check commits nothing: no probe table is left behind.
        assert!(
            !sh("nft list ruleset").contains("table"),
            "{}",
            sh("nft list ruleset")
        );
    });
}

/// The probe table (every set and map kind the renderer writes) with a few thousand
/// more elements, then element-only changes of every kind, step by step.
fn element_steps() -> Vec<Ruleset> {
    use sluice_policy::dataplane::{AddrRange, ClassRange, MapKeyValue, MapVerdict, PortRange};
    use sluice_policy::model::Protocol;
    use std::net::Ipv4Addr;
    let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    let range = |a: &str, b: &str| {
        SetMember::Range(AddrRange {
            start: ip(a),
            end: ip(b),
        })
    };
    let classes = |start, end, protocol, ports: (u16, u16)| SetMember::ClassTuple {
        classes: ClassRange { start, end },
        protocol,
        ports: PortRange {
            start: ports.0,
            end: ports.1,
        },
    };
    let class_map = |a: &str, b: &str| {
        MapKeyValue::Range(AddrRange {
            start: ip(a),
            end: ip(b),
        })
    };
    let mut base = sluice_policy::render::nft::probe_ruleset();
    {
        let t = &mut base.sets.get_mut("SLUICE-T").unwrap().members;
        for i in 0..2000u32 {
            let a = Ipv4Addr::from(u32::from(ip("10.100.0.0")) + 2 * i);
            t.insert(SetMember::Tuple {
                addrs: AddrRange { start: a, end: a },
                protocol: [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][i as usize % 3],
                ports: PortRange {
                    start: 8080,
                    end: 8080 + (i % 3) as u16,
                },
            });
        }
    }
    let mut one = base.clone();
    {
        let s = &mut one.sets;
        let t = &mut s.get_mut("SLUICE-T").unwrap().members;
        t.insert(SetMember::IpPort {
            ip: ip("10.200.0.2"),
            protocol: Protocol::Tcp,
            port: 443,
        });
        t.insert(SetMember::Tuple {
            addrs: AddrRange {
                start: ip("172.16.0.0"),
                end: ip("172.16.255.255"),
            },
            protocol: Protocol::Udp,
            ports: PortRange {
                start: 0,
                end: 65535,
            },
        });
        let a = &mut s.get_mut("SLUICE-A").unwrap().members;
        a.insert(range("10.3.0.0", "10.3.0.127"));
        a.insert(SetMember::Ip(ip("10.3.3.3")));
        a.insert(range("200.0.0.0", "255.255.255.255"));
        s.get_mut("SLUICE-I")
            .unwrap()
            .members
            .insert(SetMember::Ip(ip("10.0.0.2")));
        s.get_mut("SLUICE-N")
            .unwrap()
            .members
            .insert(SetMember::Net {
                net: "10.1.2.0/24".parse().unwrap(),
                nomatch: false,
            });
        let mo = &mut one.maps.get_mut("SLUICE-MO").unwrap().elements;
        mo.insert(
            MapKeyValue::Iface("slc5aaaaaaaaaaa".into()),
            MapVerdict::Goto("SLUICE-G".into()),
        );
        mo.insert(MapKeyValue::Iface("slc1".into()), MapVerdict::Drop);
        one.maps.get_mut("SLUICE-MS").unwrap().elements.insert(
            MapKeyValue::IfaceAddr("slc7".into(), ip("10.244.0.7")),
            MapVerdict::Jump("SLUICE-G".into()),
        );
        let ct = &mut s.get_mut("SLUICE-CT").unwrap().members;
        ct.insert(classes(8, 15, Protocol::Udp, (53, 53)));
        ct.insert(classes(16, 16, Protocol::Tcp, (443, 443)));
        ct.insert(classes(0, 0x3fff, Protocol::Sctp, (0, 65535)));
        let ca = &mut s.get_mut("SLUICE-CA").unwrap().members;
        ca.insert(SetMember::Classes(ClassRange { start: 5, end: 9 }));
        ca.insert(SetMember::Classes(ClassRange {
            start: 100,
            end: 100,
        }));
        let mc = &mut one.maps.get_mut("SLUICE-MC").unwrap().elements;
        mc.insert(
            class_map("10.0.1.1", "10.0.1.1"),
            MapVerdict::Jump("SLUICE-C".into()),
        );
        mc.insert(
            class_map("10.244.0.0", "10.244.0.127"),
            MapVerdict::Jump("SLUICE-C".into()),
        );
        mc.insert(
            class_map("192.168.0.0", "255.255.255.255"),
            MapVerdict::Jump("SLUICE-C".into()),
        );
    }
    let mut two = one.clone();
    {
        let s = &mut two.sets;
        let t = &mut s.get_mut("SLUICE-T").unwrap().members;
        let gone: Vec<SetMember> = t.iter().step_by(7).cloned().collect();
        for m in gone {
            t.remove(&m);
        }
        let a = &mut s.get_mut("SLUICE-A").unwrap().members;
        a.remove(&range("200.0.0.0", "255.255.255.255"));
        a.remove(&SetMember::Ip(ip("10.3.3.3")));
        a.insert(range("10.3.3.0", "10.3.3.255"));
        s.get_mut("SLUICE-I")
            .unwrap()
            .members
            .remove(&SetMember::Ip(ip("10.0.0.1")));
        s.get_mut("SLUICE-N")
            .unwrap()
            .members
            .insert(SetMember::Net {
                net: "10.1.2.128/25".parse().unwrap(),
                nomatch: true,
            });
        let mo = &mut two.maps.get_mut("SLUICE-MO").unwrap().elements;
        mo.remove(&MapKeyValue::Iface("slc3".into()));
        mo.insert(MapKeyValue::Iface("slc4".into()), MapVerdict::Return);
        two.maps
            .get_mut("SLUICE-MI")
            .unwrap()
            .elements
            .insert(MapKeyValue::Iface("slc8".into()), MapVerdict::Continue);
        two.maps
            .get_mut("SLUICE-MS")
            .unwrap()
            .elements
            .remove(&MapKeyValue::IfaceAddr("slc0".into(), ip("10.0.0.1")));
        let ct = &mut s.get_mut("SLUICE-CT").unwrap().members;
        ct.remove(&classes(8, 15, Protocol::Udp, (53, 53)));
        ct.insert(classes(8, 9, Protocol::Udp, (53, 54)));
        let ca = &mut s.get_mut("SLUICE-CA").unwrap().members;
        ca.remove(&SetMember::Classes(ClassRange { start: 5, end: 9 }));
        ca.insert(SetMember::Classes(ClassRange { start: 5, end: 6 }));
        let mc = &mut two.maps.get_mut("SLUICE-MC").unwrap().elements;
        mc.remove(&class_map("192.168.0.0", "255.255.255.255"));
        mc.remove(&class_map("10.0.1.1", "10.0.1.1"));
        mc.insert(
            class_map("10.244.0.128", "10.244.0.255"),
            MapVerdict::Jump("SLUICE-C".into()),
        );
    }
    vec![base, one, two.clone(), base_again(&two)]
}

/// Every element of `rs` removed but one per set (sets stay, as a group's would).
fn base_again(rs: &Ruleset) -> Ruleset {
    let mut out = rs.clone();
    for s in out.sets.values_mut() {
        let first = s.members.iter().next().cloned();
        s.members = first.into_iter().collect();
    }
    for m in out.maps.values_mut() {
        let first = m
            .elements
            .iter()
            .next()
            .map(|(k, v)| (k.clone(), v.clone()));
        m.elements = first.into_iter().collect();
    }
    out
}

#[test]
fn nft_element_changes_sent_over_netlink_leave_the_listing_nft_leaves() {
    if !nft_available("nft_element_changes_over_netlink") {
        return;
    }
    let steps = element_steps();
    for w in steps.windows(2) {
        let plan = sluice_policy::dataplane::nft_plan::plan_from_written(&w[1], &w[0]).unwrap();
        assert!(
            plan.element_changes.is_some() && !plan.is_empty(),
            "each step after the first changes elements only:\n{}",
            plan.script
        );
    }
    // The same steps, each trusted from the last write (incremental), in two
    // namespaces: one dataplane sends element changes over netlink, one runs nft.
    let listings = |dp: NftDataplane<ExecRunner>| -> Vec<String> {
        in_new_netns(|| {
            steps
                .iter()
                .map(|rs| {
                    let before = sluice_netlink::nftables::ruleset_generation().unwrap();
                    let r = dp.sync_with(rs, SyncMode::Incremental).unwrap();
                    assert_eq!(r.restores, 1);
                    assert_eq!(
                        sluice_netlink::nftables::ruleset_generation().unwrap(),
                        before.wrapping_add(1),
                        "one commit per step"
                    );
                    assert_eq!(nft_state(), Some(NftState::of(rs)), "read back = planned");
                    listing_as_sets()
                })
                .collect()
        })
    };
    let by_netlink = listings(NftDataplane::new(ExecRunner));
    let by_nft = listings(NftDataplane::nft_only(ExecRunner));
    for (i, (a, b)) in by_netlink.iter().zip(&by_nft).enumerate() {
        assert_eq!(a, b, "step {i}: netlink and nft listings differ");
    }
}

/// `desired(None)` with `SLUICE-TO-POD` holding one accept per port in `ports`
/// before its final drop: a dispatch chain that grows and shrinks in the middle.
fn dispatch(ports: &[u16]) -> Ruleset {
    let mut d = desired(None);
    let rules = &mut d
        .tables
        .get_mut(&Table::Filter)
        .unwrap()
        .get_mut("SLUICE-TO-POD")
        .unwrap()
        .rules;
    for (i, port) in ports.iter().enumerate() {
        rules.insert(
            1 + i,
            Rule::new(
                vec![
                    Match::Protocol(sluice_policy::Protocol::Tcp),
                    Match::DestinationPorts {
                        start: *port,
                        end: *port,
                    },
                ],
                Target::Accept,
            ),
        );
    }
    d
}

#[test]
fn rules_inserted_and_deleted_mid_chain_are_edited_in_place_and_match_the_model() {
    both_backends("rules_edited_in_place", |backend| {
        install_foreign(backend);
        let foreign = foreign_lines(backend);
        let dp = Dataplane::new(ExecRunner, backend);
        dp.sync(&dispatch(&[80, 443])).unwrap();
        for (mode, ports) in [
            (SyncMode::Incremental, &[80, 8080, 443][..]),
            (SyncMode::Incremental, &[8080, 443]),
            (SyncMode::Full, &[8080, 9090, 9091, 443]),
            (SyncMode::Incremental, &[8080, 443]),
        ] {
            let d = dispatch(ports);
            let r = dp.sync_with(&d, mode).unwrap();
            assert_eq!(r.chains_rewritten, 1, "{backend:?} {ports:?}: {r:?}");
            // Each chain's rules in order, by identity (iptables may print a rule's
            // text in another layout than it was written).
            let ids = |lines: Vec<String>| -> Vec<(String, Option<String>)> {
                lines
                    .iter()
                    .map(|l| {
                        (
                            l.split(' ').nth(1).unwrap().to_string(),
                            iptables::comment_hash(l),
                        )
                    })
                    .collect()
            };
            assert_eq!(
                ids(owned_lines(backend, "filter")),
                ids(expected_owned(&d, "filter")),
                "{backend:?} {ports:?}"
            );
            // What an edit leaves is what a full read finds equal to the model.
            let again = dp.sync(&d).unwrap();
            assert!(!again.changed_anything(), "{backend:?}: {again:?}");
        }
        assert_eq!(foreign_lines(backend), foreign, "{backend:?}");
    });
}

#[test]
fn set_members_written_over_netlink_are_what_ipset_restore_would_write() {
    if !require_root("set_members_over_netlink") {
        return;
    }
    in_new_netns(|| {
        sh("ipset create SLUICE-A hash:ip family inet
            ipset create SLUICE-B hash:net family inet
            ipset create SLUICE-C hash:ip,port family inet
            ipset create SLUICE-D hash:net,iface family inet
            ipset add SLUICE-A 10.0.0.9");
        let ip = |s: &str| SetMember::Ip(s.parse().unwrap());
        let net = |s: &str, nomatch| SetMember::Net {
            net: s.parse().unwrap(),
            nomatch,
        };
        let port = |s: &str, protocol, port| SetMember::IpPort {
            ip: s.parse().unwrap(),
            protocol,
            port,
        };
        let on = |s: &str, iface| SetMember::NetIface {
            net: s.parse().unwrap(),
            iface: sluice_policy::compile::IfaceName::new(iface).unwrap(),
        };
        use sluice_policy::Protocol::{Sctp, Tcp, Udp};
        let add: Vec<(String, SetMember)> = vec![
            ("SLUICE-D".into(), on("0.0.0.0/0", "slc1a2b3c4d5e6f")),
            ("SLUICE-D".into(), on("10.244.1.3/32", "slc1a2b3c4d5e6f")),
            ("SLUICE-D".into(), on("10.244.0.0/16", "slx0")),
            ("SLUICE-A".into(), ip("10.0.0.1")),
            // Already there: -exist.
            ("SLUICE-A".into(), ip("10.0.0.9")),
            ("SLUICE-B".into(), net("10.1.0.0/16", false)),
            ("SLUICE-B".into(), net("10.1.2.0/24", true)),
            ("SLUICE-B".into(), net("10.2.0.7/32", false)),
            ("SLUICE-C".into(), port("10.0.0.3", Tcp, 8080)),
            ("SLUICE-C".into(), port("10.0.0.3", Udp, 53)),
            ("SLUICE-C".into(), port("10.0.0.4", Sctp, 9)),
        ];
        let remove: Vec<(String, SetMember)> = vec![
            ("SLUICE-A".into(), ip("10.0.0.9")),
            // Not there: -exist.
            ("SLUICE-A".into(), ip("10.0.0.77")),
        ];
        ExecRunner.set_members(&add, &remove).unwrap();
        let mut got: Vec<String> = sh("ipset save")
            .lines()
            .filter(|l| l.starts_with("add "))
            .map(str::to_string)
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                "add SLUICE-A 10.0.0.1",
                "add SLUICE-B 10.1.0.0/16",
                "add SLUICE-B 10.1.2.0/24 nomatch",
                "add SLUICE-B 10.2.0.7",
                "add SLUICE-C 10.0.0.3,tcp:8080",
                "add SLUICE-C 10.0.0.3,udp:53",
                "add SLUICE-C 10.0.0.4,sctp:9",
                "add SLUICE-D 0.0.0.0/0,slc1a2b3c4d5e6f",
                "add SLUICE-D 10.244.0.0/16,slx0",
                "add SLUICE-D 10.244.1.3,slc1a2b3c4d5e6f",
            ]
        );
        // What the kernel prints back reads as what was written.
        let saved = sluice_policy::render::ipset::parse_save(&sh("ipset save SLUICE-D"), "SLUICE-");
        assert_eq!(saved["SLUICE-D"].members.len(), 3, "{saved:?}");
        assert!(saved["SLUICE-D"].unreadable.is_empty(), "{saved:?}");
        // A set that does not exist is the kernel's refusal, named.
        let err = ExecRunner
            .set_members(&[("SLUICE-NONE".into(), ip("10.0.0.1"))], &[])
            .unwrap_err();
        assert!(err.to_string().contains("SLUICE-NONE"), "{err}");
        sh(
            "ipset destroy SLUICE-A; ipset destroy SLUICE-B; ipset destroy SLUICE-C; \
            ipset destroy SLUICE-D",
        );
    });
}

/// The probe table with one more rule of every match and target the renderer writes
/// that the probe leaves out (a prefix that is not whole bytes, a port range, a mark
/// test, a log rule, a `hash:ip,port` lookup, …).
fn every_form() -> Ruleset {
    use sluice_policy::dataplane::deny_log::LogSpec;
    use sluice_policy::model::Protocol;
    let mut rs = sluice_policy::render::nft::probe_ruleset();
    rs.sets.insert(
        "SLUICE-IP".into(),
        IpSet {
            name: "SLUICE-IP".into(),
            kind: SetKind::HashIpPort,
            members: [SetMember::IpPort {
                ip: "10.0.0.7".parse().unwrap(),
                protocol: Protocol::Udp,
                port: 53,
            }]
            .into_iter()
            .collect(),
        },
    );
    rs.add_chain(
        Table::Filter,
        chain(
            "SLUICE-X",
            vec![
                Rule::new(
                    vec![
                        Match::Source {
                            net: "10.16.0.0/12".parse().unwrap(),
                            negated: false,
                        },
                        Match::Destination {
                            net: "10.1.2.3/32".parse().unwrap(),
                            negated: true,
                        },
                        Match::Protocol(Protocol::Tcp),
                        Match::DestinationPorts { start: 80, end: 90 },
                    ],
                    Target::Accept,
                ),
                Rule::new(
                    vec![
                        Match::Destination {
                            net: "192.168.0.0/16".parse().unwrap(),
                            negated: false,
                        },
                        Match::InInterface(Interface::exact("eth0")),
                        Match::Protocol(Protocol::Sctp),
                        Match::DestinationPorts { start: 53, end: 53 },
                    ],
                    Target::Drop,
                ),
                Rule::new(
                    vec![
                        Match::CtState(vec![CtState::New]),
                        Match::Mark {
                            value: 0x4000,
                            mask: 0x4000,
                        },
                    ],
                    Target::Log(LogSpec {
                        group: 5,
                        prefix: "sluice-x ".into(),
                    }),
                ),
                Rule::new(
                    vec![set("SLUICE-IP", SetDirection::DstDstPort, false)],
                    Target::Return,
                ),
                Rule::new(
                    vec![set("SLUICE-IP", SetDirection::Dst, true)],
                    Target::Return,
                ),
                Rule::new(
                    vec![Match::Protocol(Protocol::Udp)],
                    Target::SetMark {
                        value: 0x4000,
                        mask: 0x4000,
                    },
                ),
                Rule::new(
                    vec![],
                    Target::AddrVmap {
                        map: "SLUICE-MC".into(),
                        direction: SetDirection::Src,
                    },
                ),
                Rule::new(vec![], Target::Goto("SLUICE-G".into())),
            ],
        ),
    );
    rs.jumps.push(jump(Table::Filter, "OUTPUT", "SLUICE-X"));
    rs
}

/// `nft -j list table ip sluice` with each set's elements sorted: a concatenated
/// interval set lists its elements in the order they went in, which for a set of
/// more than one `add element` command of nft's is nft's own merge order.
fn listing_as_sets() -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&sh("nft -j list table ip sluice")).unwrap();
    for o in v["nftables"].as_array_mut().unwrap() {
        for kind in ["set", "map"] {
            if let Some(elem) = o
                .get_mut(kind)
                .and_then(|s| s.get_mut("elem"))
                .and_then(|e| e.as_array_mut())
            {
                elem.sort_by_key(|e| e.to_string());
            }
        }
    }
    serde_json::to_string_pretty(&v).unwrap()
}

/// `nft --debug=netlink list table ip sluice` without its closing listing: every
/// rule's expressions and every set's raw elements as the kernel holds them. A hash
/// set's elements come in the kernel's hash order (its seed is per set), so each
/// set's elements are sorted.
fn kernel_objects() -> String {
    let all = sh("nft --debug=netlink list table ip sluice");
    // The listing comes last, from its `table` line on.
    let text = all.split("\ntable ").next().unwrap();
    let mut blocks: Vec<Vec<String>> = Vec::new();
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) && !blocks.is_empty() {
            blocks.last_mut().unwrap().push(line.to_string());
        } else {
            blocks.push(vec![line.to_string()]);
        }
    }
    for b in &mut blocks {
        if b[0].contains(" @") {
            b[1..].sort();
        }
    }
    blocks.concat().join("\n")
}

#[test]
fn nft_a_whole_table_sent_over_netlink_is_what_nft_makes_of_its_text() {
    if !nft_available("nft_whole_table_over_netlink") {
        return;
    }
    let cases = [
        ("probe", sluice_policy::render::nft::probe_ruleset()),
        (
            "probe with thousands of elements",
            element_steps().remove(0),
        ),
        ("every form", every_form()),
        ("dispatch", desired(Some("10.0.0.9"))),
    ];
    for (name, rs) in &cases {
        assert!(
            sluice_agent::dataplane::nft_table::table(rs).is_some(),
            "{name}: every form is encoded"
        );
        let first_write = |dp: NftDataplane<ExecRunner>| {
            in_new_netns(|| {
                // A table to replace: its FORWARD chain hooks elsewhere, which cannot
                // change in place.
                sh(
                    "nft add table ip sluice; nft 'add chain ip sluice FORWARD { type filter hook input priority 0; policy accept; }'",
                );
                let kernel = dp.read().unwrap();
                let plan = sluice_policy::dataplane::nft_plan::plan(rs, kernel.as_ref()).unwrap();
                assert!(plan.replaces_table, "{name}: the table is replaced");
                let before = sluice_netlink::nftables::ruleset_generation().unwrap();
                let r = dp.sync(rs).unwrap();
                assert_eq!(r.restores, 1);
                assert_eq!(
                    sluice_netlink::nftables::ruleset_generation().unwrap(),
                    before.wrapping_add(1),
                    "{name}: one commit"
                );
                assert_eq!(
                    nft_state(),
                    Some(NftState::of(rs)),
                    "{name}: read back = planned"
                );
                (kernel_objects(), listing_as_sets())
            })
        };
        let (nl_objects, nl_json) = first_write(NftDataplane::new(ExecRunner));
        let (nft_objects, nft_json) = first_write(NftDataplane::nft_only(ExecRunner));
        let first_difference = nl_objects
            .lines()
            .zip(nft_objects.lines())
            .enumerate()
            .find(|(_, (a, b))| a != b);
        assert!(
            nl_objects == nft_objects,
            "{name}: expressions or elements differ, first at line (netlink, nft) {first_difference:?}"
        );
        assert_eq!(nl_json, nft_json, "{name}: listings differ");
    }
}

#[test]
fn nft_a_refused_whole_table_leaves_the_previous_one_whole() {
    if !nft_available("nft_refused_whole_table") {
        return;
    }
    in_new_netns(|| {
        let dp = NftDataplane::new(ExecRunner);
        let good = desired(None);
        dp.sync(&good).unwrap();
        let listing = sh("nft -j list table ip sluice");
        let generation = sluice_netlink::nftables::ruleset_generation().unwrap();
        // The whole table with one more rule jumping to a chain it does not hold:
        // the kernel refuses the batch.
        let mut table = sluice_agent::dataplane::nft_table::table(&every_form()).unwrap();
        table.rules.push(sluice_netlink::nft_table::Rule {
            chain: "SLUICE-X".into(),
            exprs: vec![sluice_netlink::nft_table::Expr::Verdict(
                sluice_netlink::nft_elements::Verdict::Jump("SLUICE-ABSENT".into()),
            )],
            comment: None,
        });
        let err = sluice_netlink::nft_table::replace_table(libc::AF_INET as u8, "sluice", &table)
            .unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
        assert_eq!(sh("nft -j list table ip sluice"), listing);
        assert_eq!(
            sluice_netlink::nftables::ruleset_generation().unwrap(),
            generation
        );
        // The next sync goes through.
        dp.sync(&every_form()).unwrap();
        assert_eq!(nft_state(), Some(NftState::of(&every_form())));
    });
}
