//! Scale: 10,000 pods, 1,000 policies, 200 namespaces, 100 nodes (so ~100 pods on the
//! node compiled). Measures the full compile + render of one node, and the incremental
//! cost of one pod's label change (recompile + diff + delta text). Sizes (rules, sets,
//! members, text) are printed once before timing; the figures are in `policy/BENCH.md`.
//!
//! The same figures for the nftables dataplane's flat form (`compile::flat`, the
//! `nft -f` text, the planner's no-op resync and one remote label change), beside.
//!
//! `CARGO_TARGET_DIR=... cargo bench -p sluice-policy --bench render`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, criterion_group, criterion_main};
use sluice_policy::compile::{Ruleset, compile, flat};
use sluice_policy::dataplane::nft_plan::{NftState, plan as nft_plan};
use sluice_policy::dataplane::plan::diff;
use sluice_policy::model::*;
use sluice_policy::render::{ipset, iptables, nft};
use sluice_policy::selector::{LabelSelector, Operator, Requirement};

#[path = "../tests/dataplane_support/mod.rs"]
mod support;
use support::FakeVeths;

const NODE: &str = "node-0";

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector::from_labels(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

fn lbl(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn listed(peers: Vec<Peer>) -> Peers {
    Peers::Listed(peers)
}

fn tcp(p: PortMatch) -> PolicyPort {
    PolicyPort {
        protocol: Protocol::Tcp,
        port: p,
    }
}

/// A cluster of `pods` pods over `namespaces` namespaces and `nodes` nodes, with
/// `policies` policies (five shapes, round robin over namespaces).
fn cluster(pods: usize, policies: usize, namespaces: usize, nodes: usize) -> Cluster {
    let mut c = Cluster::default();
    for n in 0..namespaces {
        c.add_namespace(Namespace {
            log_allowed: Default::default(),
            name: format!("ns-{n}"),
            labels: lbl(&[
                ("team", format!("t{}", n % 10)),
                ("env", if n % 3 == 0 { "prod" } else { "dev" }.to_string()),
            ]),
        });
    }
    for n in 0..nodes {
        c.add_node(Node {
            name: format!("node-{n}"),
            addresses: vec![IpAddr::V4(Ipv4Addr::new(
                192,
                168,
                (n / 250) as u8,
                (n % 250) as u8 + 1,
            ))],
        });
    }
    // 50 consecutive pods per namespace (wrapping), spread over nodes with a skew so
    // that each node holds pods of many namespaces, as a scheduler would.
    let mut per_node = vec![0usize; nodes];
    let per_ns = pods.div_ceil(namespaces).max(1);
    for i in 0..pods {
        let node = (i + i / nodes) % nodes;
        let slot = per_node[node];
        per_node[node] += 1;
        c.add_pod(Pod {
            namespace: format!("ns-{}", (i / per_ns) % namespaces),
            name: format!("pod-{i}"),
            labels: lbl(&[
                ("app", format!("a{}", i % 10)),
                ("tier", format!("t{}", i % 3)),
            ]),
            ips: vec![IpAddr::V4(Ipv4Addr::new(
                10,
                (node / 256) as u8 + 1 + (slot / 250) as u8 * 16,
                (node % 256) as u8,
                (slot % 250) as u8 + 2,
            ))],
            node: Some(format!("node-{node}")),
            ports: vec![ContainerPort {
                name: Some("http".into()),
                port: 8000 + (i % 50) as u16,
                protocol: Protocol::Tcp,
            }],
            host_network: false,
        });
    }
    for p in 0..policies {
        let ns = format!("ns-{}", p % namespaces);
        let shape = (p / namespaces) % 5;
        let k = (p / 7) % 10; // decorrelated from the namespace
        let (pod_selector, ingress, egress, types) = match shape {
            0 => (LabelSelector::everything(), vec![], vec![], (true, false)),
            1 => (
                sel(&[("app", &format!("a{k}"))]),
                vec![Rule {
                    peers: listed(vec![Peer::Pods(PodPeer {
                        namespaces: NamespaceScope::PolicyNamespace,
                        pods: sel(&[("app", &format!("a{}", (k + 1) % 10))]),
                    })]),
                    ports: Ports::Listed(vec![tcp(PortMatch::Numbers { start: 80, end: 80 })]),
                }],
                vec![],
                (true, false),
            ),
            2 => (
                sel(&[("tier", &format!("t{}", k % 3))]),
                vec![Rule {
                    peers: listed(vec![Peer::Pods(PodPeer {
                        namespaces: NamespaceScope::Matching(sel(&[("team", &format!("t{k}"))])),
                        pods: sel(&[("app", &format!("a{k}"))]),
                    })]),
                    ports: Ports::Listed(vec![tcp(PortMatch::Named("http".into()))]),
                }],
                vec![],
                (true, false),
            ),
            3 => (
                sel(&[("app", &format!("a{k}"))]),
                vec![Rule {
                    peers: listed(vec![Peer::IpBlock(IpBlock {
                        cidr: format!("172.{}.0.0/16", 16 + k).parse().unwrap(),
                        except: vec![format!("172.{}.8.0/24", 16 + k).parse().unwrap()],
                    })]),
                    ports: Ports::Listed(vec![
                        tcp(PortMatch::Numbers { start: 80, end: 80 }),
                        tcp(PortMatch::Numbers {
                            start: 8000,
                            end: 8100,
                        }),
                    ]),
                }],
                vec![],
                (true, false),
            ),
            _ => (
                LabelSelector {
                    match_labels: Labels::new(),
                    match_expressions: vec![Requirement {
                        key: "app".into(),
                        operator: Operator::In(
                            [format!("a{k}"), format!("a{}", (k + 5) % 10)].into(),
                        ),
                    }],
                },
                vec![],
                vec![
                    Rule {
                        peers: Peers::Any,
                        ports: Ports::Listed(vec![
                            PolicyPort {
                                protocol: Protocol::Udp,
                                port: PortMatch::Numbers { start: 53, end: 53 },
                            },
                            tcp(PortMatch::Numbers { start: 53, end: 53 }),
                        ]),
                    },
                    Rule {
                        peers: listed(vec![Peer::Pods(PodPeer {
                            namespaces: NamespaceScope::Matching(sel(&[("env", "prod")])),
                            pods: LabelSelector::everything(),
                        })]),
                        ports: Ports::Any,
                    },
                ],
                (false, true),
            ),
        };
        c.add_policy(NetworkPolicy {
            log_allowed: Default::default(),
            namespace: ns,
            name: format!("np-{p}"),
            pod_selector,
            ingress,
            egress,
            policy_types: PolicyTypes {
                ingress: types.0,
                egress: types.1,
            },
        });
    }
    c
}

fn render_all(rs: &Ruleset) -> (String, String) {
    (iptables::render(rs), ipset::render(rs))
}

/// `c` with pod `key`'s `app` label moved to the next value.
fn relabel(c: &Cluster, key: &NamespacedName) -> Cluster {
    let mut c = c.clone();
    let pod = c.pod_mut(key).expect("pod");
    let app = pod.labels["app"]
        .trim_start_matches('a')
        .parse::<u32>()
        .unwrap();
    pod.labels
        .insert("app".into(), format!("a{}", (app + 1) % 10));
    c
}

/// The first pod (on this node, or elsewhere) whose label change changes this node's
/// ruleset at all, and the cluster after the change: a change nothing depends on
/// would measure nothing.
fn relabelled(c: &Cluster, base: &Ruleset, local: bool) -> Cluster {
    for (key, pod) in &c.pods {
        if (pod.node.as_deref() == Some(NODE)) != local {
            continue;
        }
        let changed = relabel(c, key);
        let new = compile(&changed, NODE, &FakeVeths).unwrap();
        if !diff(base, &new).is_empty() {
            return changed;
        }
    }
    panic!("no pod's label change matters to {NODE}");
}

fn report(label: &str, c: &Cluster) {
    let rs = compile(c, NODE, &FakeVeths).unwrap();
    let (ipt, ips) = render_all(&rs);
    let local = c
        .pods
        .values()
        .filter(|p| p.node.as_deref() == Some(NODE))
        .count();
    eprintln!(
        "{label}: {} pods ({local} local), {} policies, {} namespaces -> {} chains, {} rules, {} sets, {} set members, iptables text {} KiB, ipset text {} KiB",
        c.pods.len(),
        c.policies.len(),
        c.namespaces.len(),
        rs.chain_count(),
        rs.rule_count(),
        rs.sets.len(),
        rs.set_member_count(),
        ipt.len() / 1024,
        ips.len() / 1024,
    );
    for (what, local) in [("local pod relabel", true), ("remote pod relabel", false)] {
        let changed = relabelled(c, &rs, local);
        let new = compile(&changed, NODE, &FakeVeths).unwrap();
        let d = diff(&rs, &new);
        eprintln!(
            "  {what}: {} chains rewritten ({} rules), {} chains deleted, {} set members added, {} removed, {} sets created, {} destroyed; delta text {} bytes",
            d.rewrite.values().map(Vec::len).sum::<usize>(),
            d.rules_written(),
            d.delete.values().map(Vec::len).sum::<usize>(),
            d.add.len(),
            d.remove.len(),
            d.create_sets.len(),
            d.destroy_sets.len(),
            d.ipset_before().len() + d.iptables_all().len() + d.ipset_after().len(),
        );
    }
}

/// Sizes of the flat (nftables) form, and of one remote relabel's plan.
fn report_nft(label: &str, c: &Cluster) {
    let rs = flat::compile(c, NODE, &FakeVeths).unwrap();
    let text = nft::render(&rs);
    let state = NftState::of(&rs);
    eprintln!(
        "{label} (nftables): {} chains, {} rules, {} sets/maps, {} elements, nft text {} KiB",
        nft::chains(&rs).len(),
        rs.rule_count() + rs.jumps.len(),
        state.sets.len(),
        state.element_count(),
        text.len() / 1024,
    );
    if std::env::var_os("SLUICE_BENCH_TOP").is_some() {
        let mut sizes: Vec<(usize, &String)> = state
            .sets
            .iter()
            .map(|(n, s)| (s.elements.len(), n))
            .collect();
        sizes.sort();
        for (n, name) in sizes.iter().rev().take(15) {
            eprintln!("    {n:>6} {name}");
        }
        let groups = state.chains.keys().filter(|n| n.contains("-G")).count();
        eprintln!("    {groups} group chains");
    }
    let iptables_rs = compile(c, NODE, &FakeVeths).unwrap();
    let changed = relabelled(c, &iptables_rs, false);
    let new = flat::compile(&changed, NODE, &FakeVeths).unwrap();
    let p = nft_plan(&new, Some(&state)).unwrap();
    eprintln!(
        "  remote pod relabel (nftables): {} chains rewritten, {} elements added, {} deleted, {} sets created; script {} bytes",
        p.chains_rewritten,
        p.elements_added,
        p.elements_deleted,
        p.sets_created,
        p.script.len()
    );
}

/// Feeds `text` to a restore tool and returns how long it took.
fn restore(tool: &str, args: &[&str], text: &str) -> std::time::Duration {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let start = std::time::Instant::now();
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn restore tool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    start.elapsed()
}

/// With `SLUICE_BENCH_KERNEL=1` (root): how long the kernel's tools take to load the
/// full text, and then the delta of one remote label change, in a throwaway netns.
fn kernel_apply(c: &Cluster) {
    if std::env::var_os("SLUICE_BENCH_KERNEL").is_none_or(|v| v != "1") {
        return;
    }
    let rs = compile(c, NODE, &FakeVeths).unwrap();
    let new = compile(&relabelled(c, &rs, false), NODE, &FakeVeths).unwrap();
    let d = diff(&rs, &new);
    sluice_testkit::in_new_netns(|| {
        let sets = restore("ipset", &["restore"], &ipset::render(&rs));
        let rules = restore(
            "iptables-restore",
            &["--noflush", "-w"],
            &iptables::render(&rs),
        );
        let again = restore(
            "iptables-restore",
            &["--noflush", "-w"],
            &iptables::render(&rs),
        );
        let delta = restore("ipset", &["restore"], &d.ipset_before());
        eprintln!(
            "kernel (iptables-nft): ipset restore {sets:?}, iptables-restore {rules:?} (first), {again:?} (rewrite of everything), delta of one remote relabel {delta:?}"
        );
    });
    if std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_err()
    {
        return;
    }
    let rs = flat::compile(c, NODE, &FakeVeths).unwrap();
    let changed = flat::compile(
        &relabelled(c, &compile(c, NODE, &FakeVeths).unwrap(), false),
        NODE,
        &FakeVeths,
    )
    .unwrap();
    let p = nft_plan(&changed, Some(&NftState::of(&rs))).unwrap();
    sluice_testkit::in_new_netns(|| {
        let first = restore("nft", &["-f", "-"], &nft::render(&rs));
        let again = restore("nft", &["-f", "-"], &nft::render(&rs));
        let delta = restore("nft", &["-f", "-"], &p.script);
        eprintln!(
            "kernel (nftables): nft -f {first:?} (first), {again:?} (replace the table), delta of one remote relabel {delta:?}"
        );
    });
}

/// With `SLUICE_BENCH_STRESS=1` (root, nft installed): the stress node, every one of
/// 10,000 pods local, in the flat form: compile, render, and one `nft -f`.
fn stress_nft() {
    if std::env::var_os("SLUICE_BENCH_STRESS").is_none_or(|v| v != "1") {
        return;
    }
    let c = cluster(10_000, 1_000, 200, 1);
    let start = std::time::Instant::now();
    let rs = flat::compile(&c, NODE, &FakeVeths).unwrap();
    let compiled = start.elapsed();
    let text = nft::render(&rs);
    let state = NftState::of(&rs);
    eprintln!(
        "stress (10,000 local pods, nftables): compile {compiled:?}, {} chains, {} sets/maps, {} elements, nft text {} KiB",
        state.chains.len(),
        state.sets.len(),
        state.element_count(),
        text.len() / 1024
    );
    // One more local pod, as a new pod's sync would plan it.
    let mut more = c.clone();
    let mut pod = Pod::clone(c.pods.values().next().unwrap());
    pod.name = "pod-new".into();
    pod.ips = vec![IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2))];
    more.add_pod(pod);
    let start = std::time::Instant::now();
    let p = nft_plan(
        &flat::compile(&more, NODE, &FakeVeths).unwrap(),
        Some(&state),
    )
    .unwrap();
    let planned = start.elapsed();
    sluice_testkit::in_new_netns(|| {
        let first = restore("nft", &["-f", "-"], &text);
        let again = restore("nft", &["-f", "-"], &text);
        let delta = restore("nft", &["-f", "-"], &p.script);
        eprintln!(
            "stress (nftables): nft -f {first:?} (first), {again:?} (replace); one new pod: compile + plan {planned:?}, {} elements added, {} chains rewritten, nft -f {delta:?}",
            p.elements_added, p.chains_rewritten
        );
    });
}

fn bench(cr: &mut Criterion) {
    stress_nft();
    // Growth check: rules follow policies and local pods, not pods × policies.
    report("quarter", &cluster(2_500, 250, 50, 25));
    report("half", &cluster(5_000, 500, 100, 50));
    let c = cluster(10_000, 1_000, 200, 100);
    report("full", &c);
    kernel_apply(&c);
    let more_remote = cluster(20_000, 1_000, 200, 200);
    report("double pods, same policies, same local count", &more_remote);
    report_nft("full", &c);

    let rs = compile(&c, NODE, &FakeVeths).unwrap();
    // The common case: a pod elsewhere changes labels, this node updates set members.
    let changed = relabelled(&c, &rs, false);
    let changed_rs = compile(&changed, NODE, &FakeVeths).unwrap();

    let mut g = cr.benchmark_group("policy_10k_pods_1k_policies");
    g.sample_size(10);
    g.bench_function("compile", |b| {
        b.iter(|| compile(black_box(&c), NODE, &FakeVeths).unwrap())
    });
    g.bench_function("render_text", |b| b.iter(|| render_all(black_box(&rs))));
    g.bench_function("compile_and_render", |b| {
        b.iter(|| render_all(&compile(black_box(&c), NODE, &FakeVeths).unwrap()))
    });
    g.bench_function("diff_only_one_remote_label_change", |b| {
        b.iter(|| {
            let d = diff(black_box(&rs), black_box(&changed_rs));
            (d.ipset_before(), d.iptables_all(), d.ipset_after())
        })
    });
    g.bench_function("incremental_one_remote_label_change", |b| {
        b.iter(|| {
            let new = compile(black_box(&changed), NODE, &FakeVeths).unwrap();
            let d = diff(&rs, &new);
            (d.ipset_before(), d.iptables_all(), d.ipset_after())
        })
    });
    let flat_rs = flat::compile(&c, NODE, &FakeVeths).unwrap();
    let flat_state = NftState::of(&flat_rs);
    g.bench_function("nft_compile_flat", |b| {
        b.iter(|| flat::compile(black_box(&c), NODE, &FakeVeths).unwrap())
    });
    g.bench_function("nft_render_text", |b| {
        b.iter(|| nft::render(black_box(&flat_rs)))
    });
    g.bench_function("nft_noop_resync_plan", |b| {
        b.iter(|| nft_plan(black_box(&flat_rs), Some(&flat_state)).unwrap())
    });
    g.bench_function("nft_incremental_one_remote_label_change", |b| {
        b.iter(|| {
            let new = flat::compile(black_box(&changed), NODE, &FakeVeths).unwrap();
            nft_plan(&new, Some(&flat_state)).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
