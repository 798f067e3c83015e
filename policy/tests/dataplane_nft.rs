//! The nftables renderer and planner against the real `nft`, in a throwaway network
//! namespace: the full render loads and reads back (`nft -j list table ip sluice`)
//! as exactly the state the planner expects, so a resync is a no-op; a sequence of
//! planned increments lands the same way; adding a pod, a label or a peer changes
//! only elements; the probe passes `nft --check`; another table is never touched.

use std::io::Write;
use std::process::{Command, Stdio};

use sluice_policy::compile::Ruleset;
use sluice_policy::dataplane::DataplaneKind;
use sluice_policy::dataplane::nft_plan::{NftState, parse_listing, plan};
use sluice_policy::dataplane::node::{NodeSettings, TunnelFilter, node_ruleset};
use sluice_policy::model::*;
use sluice_policy::render::nft;
use sluice_policy::selector::LabelSelector;

mod dataplane_support;
use dataplane_support::*;

fn nft_run(args: &[&str], stdin: &str) -> Result<String, String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn nft: {e}"))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "nft {args:?} failed: {}\ninput:\n{stdin}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn apply(script: &str) {
    nft_run(&["-f", "-"], script).unwrap_or_else(|e| panic!("{e}"));
}

fn kernel_state() -> NftState {
    let json = nft_run(&["-j", "list", "table", nft::FAMILY, nft::TABLE], "").unwrap();
    parse_listing(&json).unwrap()
}

/// `None` when there is no sluice table yet.
fn kernel_state_if_any() -> Option<NftState> {
    nft_run(&["-j", "list", "table", nft::FAMILY, nft::TABLE], "")
        .ok()
        .map(|json| parse_listing(&json).unwrap())
}

fn settings() -> NodeSettings {
    NodeSettings {
        node: "node-1".into(),
        pool: "10.244.0.0/16".parse().unwrap(),
        tunnel: TunnelFilter::Vxlan { port: 4789 },
        nat_outgoing: true,
        node_ip: None,
        dataplane: DataplaneKind::Nftables,
    }
}

fn desired(c: &Cluster) -> Ruleset {
    node_ruleset(c, &settings(), &FakeVeths).unwrap()
}

/// Applies the plan from what the kernel holds to `want`, and checks the kernel then
/// holds exactly `want` and a resync would change nothing.
fn sync(want: &Ruleset) -> sluice_policy::dataplane::nft_plan::NftPlan {
    let p = plan(want, kernel_state_if_any().as_ref()).unwrap();
    if !p.is_empty() {
        apply(&p.script);
    }
    let now = kernel_state();
    assert_eq!(now, NftState::of(want), "after:\n{}", p.script);
    let again = plan(want, Some(&now)).unwrap();
    assert!(again.is_empty(), "resync not a no-op:\n{}", again.script);
    p
}

fn skip(test: &str) -> bool {
    !sluice_testkit::require_root(test) || !sluice_testkit::require_tool(test, "nft")
}

#[test]
fn the_full_render_loads_and_reads_back_as_the_planned_state() {
    if skip("the_full_render_loads_and_reads_back_as_the_planned_state") {
        return;
    }
    sluice_testkit::in_new_netns(|| {
        apply(
            "table ip other {\n chain c {\n type filter hook forward priority 0; policy drop;\n }\n}\n",
        );
        let before_other = nft_run(&["list", "table", "ip", "other"], "").unwrap();
        let want = desired(&feature_cluster());
        apply(&nft::render(&want));
        assert_eq!(kernel_state(), NftState::of(&want));
        assert!(plan(&want, Some(&kernel_state())).unwrap().is_empty());
        // Rendering again over an existing table replaces it, in one transaction.
        apply(&nft::render(&want));
        assert_eq!(kernel_state(), NftState::of(&want));
        // From nothing, the plan is the full render.
        assert_eq!(plan(&want, None).unwrap().script, nft::render(&want));
        apply(&nft::delete_script());
        apply(&nft::delete_script());
        assert_eq!(
            nft_run(&["list", "table", "ip", "other"], "").unwrap(),
            before_other,
            "another table changed"
        );
    });
}

#[test]
fn the_probe_passes_nft_check_and_leaves_nothing_behind() {
    if skip("the_probe_passes_nft_check_and_leaves_nothing_behind") {
        return;
    }
    sluice_testkit::in_new_netns(|| {
        nft_run(&["--check", "-f", "-"], &nft::probe_script()).unwrap();
        apply(&nft::probe_script());
        assert_eq!(nft_run(&["list", "ruleset"], "").unwrap().trim(), "");
    });
}

#[test]
fn pods_labels_and_peers_are_element_changes_and_every_plan_lands_exactly() {
    if skip("pods_labels_and_peers_are_element_changes_and_every_plan_lands_exactly") {
        return;
    }
    sluice_testkit::in_new_netns(|| {
        let mut c = feature_cluster();
        sync(&desired(&c));

        // A new local pod selected by the same policies, whose named port `http`
        // means what it means on `front`: same group, map and set elements only.
        let mut new = mk_pod("web", "new", &[("app", "front")], "10.244.1.9", "node-1");
        new.ports = vec![named_port("http", 8080, Protocol::Tcp)];
        c.add_pod(new);
        let p = sync(&desired(&c));
        assert_eq!((p.chains_rewritten, p.sets_created), (0, 0), "{}", p.script);
        assert!(p.elements_added > 0, "{}", p.script);

        // A label change that makes a local pod a peer (cache joins pg, its
        // neighbouring address): a merged interval replaces its part, elements only.
        c.pod_mut(&NamespacedName::new("db", "cache"))
            .unwrap()
            .labels = labels(&[("app", "pg")]);
        let p = sync(&desired(&c));
        assert_eq!((p.chains_rewritten, p.sets_created), (0, 0), "{}", p.script);
        assert!(
            p.elements_added > 0 && p.elements_deleted > 0,
            "{}",
            p.script
        );

        // A peer pod appearing on another node, then going: elements only.
        c.add_pod(mk_pod(
            "db",
            "pg2",
            &[("app", "pg")],
            "10.244.2.7",
            "node-2",
        ));
        let p = sync(&desired(&c));
        assert_eq!((p.chains_rewritten, p.sets_created), (0, 0), "{}", p.script);
        assert_eq!(
            (p.elements_added, p.elements_deleted),
            (1, 0),
            "{}",
            p.script
        );
        c.pods.remove(&NamespacedName::new("db", "pg2"));
        let p = sync(&desired(&c));
        assert_eq!((p.chains_rewritten, p.sets_created), (0, 0), "{}", p.script);
        assert_eq!(
            (p.elements_added, p.elements_deleted),
            (0, 1),
            "{}",
            p.script
        );

        // A new policy: a new group, its chain and sets; a removed one: deleted.
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
        let p = sync(&desired(&c));
        assert!(p.sets_created > 0 && p.sets_deleted > 0 && p.chains_deleted > 0);

        // A rejected policy holds pods: the agent's own chain appears and goes.
        c.rejected_policies.insert(
            NamespacedName::new("db", "broken"),
            RejectedPolicy {
                reason: "test".into(),
                pod_selector: None,
                namespace_selector: None,
            },
        );
        sync(&desired(&c));
        c.rejected_policies.clear();
        sync(&desired(&c));

        // Everything gone at once, then back.
        sync(&desired(&Cluster::default()));
        sync(&desired(&feature_cluster()));
    });
}

/// Random clusters in sequence, each synced from what the kernel holds after the
/// last: every plan applies (no overlapping intervals, no dangling reference, in
/// any transition) and lands exactly on the desired state.
#[test]
fn random_sequences_of_clusters_sync_exactly() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    if skip("random_sequences_of_clusters_sync_exactly") {
        return;
    }
    sluice_testkit::in_new_netns(|| {
        let mut runner = TestRunner::new(Config {
            cases: 64,
            ..Config::default()
        });
        runner
            .run(&prop::collection::vec(arb_cluster(), 1..4), |clusters| {
                for c in &clusters {
                    let want = node_ruleset(
                        c,
                        &NodeSettings {
                            node: NODES[0].0.into(),
                            ..settings()
                        },
                        &FakeVeths,
                    )
                    .unwrap();
                    sync(&want);
                }
                Ok(())
            })
            .unwrap();
        apply(&nft::delete_script());
    });
}

#[test]
fn a_one_class_one_port_tuple_is_deleted_by_nft_as_by_netlink() {
    if skip("a_one_class_one_port_tuple_is_deleted_by_nft_as_by_netlink") {
        return;
    }
    use sluice_policy::dataplane::{ClassRange, PortRange, SetMember};
    use sluice_policy::model::Protocol;
    let one = |class: u32, port: u16| SetMember::ClassTuple {
        classes: ClassRange {
            start: class,
            end: class,
        },
        protocol: Protocol::Tcp,
        ports: PortRange {
            start: port,
            end: port,
        },
    };
    let mut before = nft::probe_ruleset();
    let tuples = &mut before.sets.get_mut("SLUICE-CT").unwrap().members;
    tuples.insert(one(16, 443));
    tuples.insert(one(19, 1));
    // Every plan with a chain change goes through `nft -f` (only element-only plans
    // go over netlink). nft 1.0.6 names such an element by its key alone, mark in
    // host order, unless the command spells a range: the kernel then answers ENOENT
    // and the whole transaction (and every retry of it) would fail.
    let mut after = before.clone();
    let tuples = &mut after.sets.get_mut("SLUICE-CT").unwrap().members;
    tuples.remove(&one(16, 443));
    tuples.remove(&one(19, 1));
    sluice_testkit::in_new_netns(|| {
        sync(&before);
        let p = sync(&after);
        assert_eq!(p.elements_deleted, 2, "{}", p.script);
        sync(&before);
    });
}

/// The planner from the last write (which compares chains, sets and maps by value
/// and renders only what differs) against the planner from a listing of what that
/// write left (which renders everything): the same transaction for any two nodes'
/// rulesets, and the last write's model brought up to the next one equals it. No
/// kernel: this is the comparison shortcut's own check.
mod from_the_last_write {
    use super::*;
    use proptest::prelude::*;
    use sluice_policy::dataplane::nft_plan::plan_from_written;

    fn node(c: &Cluster) -> Ruleset {
        node_ruleset(
            c,
            &NodeSettings {
                node: NODES[0].0.into(),
                ..settings()
            },
            &FakeVeths,
        )
        .unwrap()
    }

    fn sorted(script: &str) -> Vec<&str> {
        let mut l: Vec<&str> = script.lines().collect();
        l.sort_unstable();
        l
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn planning_from_the_last_write_equals_planning_from_its_listing(
            a in arb_cluster_with_cluster_policies(),
            b in arb_cluster_with_cluster_policies(),
        ) {
            let (old, new) = (node(&a), node(&b));
            let written = plan_from_written(&new, &old).unwrap();
            let listed = plan(&new, Some(&NftState::of(&old))).unwrap();
            prop_assert_eq!(sorted(&written.script), sorted(&listed.script));
            prop_assert_eq!(
                (written.chains_rewritten, written.chains_deleted, written.sets_created),
                (listed.chains_rewritten, listed.chains_deleted, listed.sets_created)
            );
            prop_assert_eq!(written.element_changes.is_some(), listed.element_changes.is_some());
            prop_assert!(plan_from_written(&new, &new).unwrap().is_empty());
            let mut kept = old.clone();
            kept.assign(&new);
            prop_assert_eq!(kept, new);
        }
    }
}
