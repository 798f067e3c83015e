//! Sync time, rule counts and kernel memory for a large cluster (10,000 pods and 1,000
//! policies), on both policy dataplanes side by side (issue 11).
//!
//! `cargo bench -p sluice-agent --bench sync_scale` (as root for the kernel part,
//! which runs in a throwaway network namespace per scenario and dataplane). Prints
//! markdown tables; asserts nothing about time. Scenarios: a realistic node (10,000
//! pods cluster-wide, 110 on this node) and a stress case (every one of the 10,000
//! pods on this node). `SLUICE_BENCH_DATAPLANES=iptables` (or `nftables`) measures one
//! dataplane only, `SLUICE_BENCH_SCENARIOS=realistic` (or `stress`) one scenario.
//! `SLUICE_BENCH_DUMP_NFT=DIR` writes the nftables table of each first apply there.
//!
//! Kernel memory is the growth of the machine's unreclaimable kernel memory
//! (`/proc/meminfo` SUnreclaim + VmallocUsed + Percpu) across the first apply, and its
//! drop when the ruleset is removed again (`nft flush ruleset` and `ipset destroy` in
//! the throwaway namespace), each after an RCU grace; other processes on the machine
//! allocate at the same time, so the idle drift over the same interval is printed as
//! the noise floor. For iptables, ipset's own figure (`Size in memory`) is printed too.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_agent::dataplane::{Backend, Dataplane, ExecRunner, NftDataplane, SyncMode};
use sluice_agent::datastore::Snapshot;
use sluice_agent::datastore::objects::{convert, convert_source};
use sluice_agent::reconcile::{self, NodeSettings, TunnelFilter};
use sluice_policy::dataplane::{DataplaneKind, Ruleset};
use sluice_policy::sources::Sources;
use sluice_policy::{Cluster, RawObject};

const PODS: usize = 10_000;
const POLICIES: usize = 1_000;
const NAMESPACES: usize = 100;
const NODES: usize = 91; // 10,000 / 110 rounded up

/// Where the synthetic cluster's pods live and what they are called.
struct Layout {
    /// The node under test.
    local_node: String,
    /// The other nodes are `<prefix><n>`.
    other_prefix: &'static str,
    /// Pod `i` gets `<first>.<second>.(i / 250).(i % 250 + 2)`.
    pod_net: (u8, u8),
    /// Whether to describe the Node objects too (their addresses).
    nodes: bool,
}

impl Layout {
    fn bench() -> Layout {
        Layout {
            local_node: "node-0".into(),
            other_prefix: "node-",
            pod_net: (10, 244),
            nodes: true,
        }
    }
}

fn objects(local_pods: usize) -> Vec<Value> {
    objects_in(local_pods, &Layout::bench())
}

fn objects_in(local_pods: usize, layout: &Layout) -> Vec<Value> {
    let mut out = Vec::new();
    for n in (0..NODES).filter(|_| layout.nodes) {
        out.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n}")},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.{}.{}", n / 250, n % 250 + 1)}]}}));
    }
    for ns in 0..NAMESPACES {
        out.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns-{ns}"), "labels": {"team": format!("t{}", ns % 10)}}}));
    }
    for i in 0..PODS {
        // The first `local_pods` pods run on node-0; the rest spread over the others.
        let node = if i < local_pods {
            layout.local_node.clone()
        } else {
            format!("{}{}", layout.other_prefix, 1 + i % (NODES - 1))
        };
        let (a, b) = layout.pod_net;
        out.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("pod-{i}"), "namespace": format!("ns-{}", i % NAMESPACES),
                         "labels": {"app": format!("app-{}", i % 20), "tier": if i % 2 == 0 {"fe"} else {"be"}}},
            "spec": {"nodeName": node,
                     "containers": [{"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": format!("{a}.{b}.{}.{}", i / 250, i % 250 + 2)}}));
    }
    for p in 0..POLICIES {
        let ns = p % NAMESPACES;
        let mut spec = json!({
            "podSelector": {"matchLabels": {"app": format!("app-{}", p % 20)}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", (p + 1) % 20)}}},
                          {"namespaceSelector": {"matchLabels": {"team": format!("t{}", p % 10)}},
                           "podSelector": {"matchLabels": {"tier": "fe"}}}],
                 "ports": [{"port": 8080, "protocol": "TCP"}, {"port": "http"}]},
                {"from": [{"ipBlock": {"cidr": format!("172.{}.0.0/16", 16 + p % 16), "except": [format!("172.{}.1.0/24", 16 + p % 16)]}}],
                 "ports": [{"port": 443, "endPort": 450}]}
            ]
        });
        if p % 4 == 0 {
            spec["policyTypes"] = json!(["Ingress", "Egress"]);
            spec["egress"] = json!([{"to": [{"podSelector": {}}]}, {"ports": [{"port": 53, "protocol": "UDP"}]}]);
        }
        out.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("pol-{p}"), "namespace": format!("ns-{ns}")}, "spec": spec}));
    }
    out
}

fn newcomer() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "newcomer", "namespace": "ns-0", "labels": {"app": "app-0", "tier": "fe"}},
        "spec": {"nodeName": "node-0", "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "10.244.200.2"}})
}

fn snapshot(objs: &[Value]) -> Snapshot {
    let objs: Vec<RawObject> = objs
        .iter()
        .map(|v| RawObject::new("bench", v.clone()))
        .collect();
    let conv = convert(&objs);
    assert!(
        conv.cluster.rejected_policies.is_empty(),
        "{:?}",
        conv.cluster.rejected_policies.values().next()
    );
    Snapshot {
        cluster: conv.cluster,
        blocks: (0..NODES)
            .map(|n| {
                (
                    format!("10.244.{}.0/24", n).parse().unwrap(),
                    format!("node-{n}"),
                )
            })
            .collect(),
        ..Default::default()
    }
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.1} ms")
    }
}

/// The writer under test: the agent's own dataplane executor of either kind.
enum Writer {
    Iptables(Dataplane<ExecRunner>),
    Nftables(NftDataplane<ExecRunner>),
}

/// What one sync wrote.
struct Wrote {
    changed: bool,
    detail: String,
}

impl Writer {
    fn new(kind: DataplaneKind) -> Writer {
        match kind {
            DataplaneKind::Iptables => Writer::Iptables(Dataplane::new(ExecRunner, Backend::Nft)),
            DataplaneKind::Nftables => Writer::Nftables(NftDataplane::new(ExecRunner)),
        }
    }

    /// The next sync reads the kernel whatever it would trust (nftables: the periodic
    /// table read, or the one after another writer's commit; iptables always reads).
    fn distrust(&self) {
        if let Writer::Nftables(dp) = self {
            dp.distrust();
        }
    }

    fn sync(&self, desired: &Ruleset, mode: SyncMode) -> Wrote {
        let (r, unit) = match self {
            Writer::Iptables(dp) => (dp.sync_with(desired, mode).unwrap(), "set members"),
            Writer::Nftables(dp) => (dp.sync_with(desired, mode).unwrap(), "set/map elements"),
        };
        Wrote {
            changed: r.changed_anything(),
            detail: format!(
                "{} chains rewritten, {} {unit} changed",
                r.chains_rewritten, r.set_members_changed
            ),
        }
    }
}

/// Unreclaimable kernel memory of the whole machine, KiB: where netfilter's rules,
/// sets and elements live (slab, vmalloc, per-cpu counters).
fn kernel_kib() -> i64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let field = |name: &str| -> i64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.trim_start_matches(':').split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    field("SUnreclaim") + field("VmallocUsed") + field("Percpu")
}

/// Let freed netfilter objects pass their RCU grace period before reading memory.
fn settle() {
    std::thread::sleep(Duration::from_millis(1500));
}

fn kib(v: i64) -> String {
    if v.abs() >= 10 * 1024 {
        format!("{:.1} MiB", v as f64 / 1024.0)
    } else {
        format!("{v} KiB")
    }
}

/// Objects in the kernel after the scenario, per dataplane.
fn kernel_counts(kind: DataplaneKind) -> Vec<(String, String)> {
    match kind {
        DataplaneKind::Iptables => {
            let rules = sluice_testkit::sh("iptables-nft-save | grep -c '^-A SLUICE' || true");
            let headers = sluice_testkit::sh("ipset list -t");
            let (mut sets, mut members, mut bytes) = (0u64, 0u64, 0u64);
            for l in headers.lines() {
                if let Some(v) = l.strip_prefix("Name: ") {
                    sets += u64::from(v.starts_with("SLUICE"));
                } else if let Some(v) = l.strip_prefix("Number of entries: ") {
                    members += v.trim().parse::<u64>().unwrap_or(0);
                } else if let Some(v) = l.strip_prefix("Size in memory: ") {
                    bytes += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
            vec![
                (
                    "rules in the kernel (iptables-save)".into(),
                    rules.trim().into(),
                ),
                (
                    "ipsets / members in the kernel".into(),
                    format!("{sets} / {members}"),
                ),
                (
                    "ipset memory (ipset's `Size in memory`)".into(),
                    kib((bytes / 1024) as i64),
                ),
            ]
        }
        DataplaneKind::Nftables => {
            let listing = sluice_testkit::sh("nft -j list table ip sluice");
            let v: Value = serde_json::from_str(&listing).unwrap();
            let mut count: BTreeMap<&str, u64> = BTreeMap::new();
            let mut elements = 0u64;
            for o in v["nftables"].as_array().into_iter().flatten() {
                for kind in ["chain", "rule", "set", "map"] {
                    if let Some(x) = o.get(kind) {
                        *count.entry(kind).or_default() += 1;
                        elements += x["elem"].as_array().map_or(0, |e| e.len() as u64);
                    }
                }
            }
            let c = |k| count.get(k).copied().unwrap_or(0);
            vec![
                (
                    "chains / rules in the kernel (nft list)".into(),
                    format!("{} / {}", c("chain"), c("rule")),
                ),
                (
                    "sets + maps / elements in the kernel".into(),
                    format!("{} + {} / {elements}", c("set"), c("map")),
                ),
            ]
        }
    }
}

/// One scenario on one dataplane: rows of (step, result).
fn measure(kind: DataplaneKind, local: usize, kernel: bool) -> Vec<(String, String)> {
    let settings = NodeSettings {
        node: "node-0".into(),
        pool: "10.244.0.0/16".parse().unwrap(),
        tunnel: TunnelFilter::Ipip,
        nat_outgoing: true,
        node_ip: None,
        dataplane: kind,
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    let objs = objects(local);
    let t = Instant::now();
    let snap = snapshot(&objs);
    rows.push(("convert objects → model".into(), ms(t.elapsed())));
    let t = Instant::now();
    let desired = reconcile::desired(&snap, &settings).unwrap();
    rows.push(("compile + agent rules (pure)".into(), ms(t.elapsed())));
    let dp = &desired.dataplane;
    let chains: usize = dp.tables.values().map(|t| t.len()).sum();
    rows.push((
        "model: chains / rules".into(),
        format!("{chains} / {}", dp.rule_count()),
    ));
    rows.push((
        "model: sets / members".into(),
        format!("{} / {}", dp.sets.len(), dp.set_member_count()),
    ));
    let mut objs2 = objs.clone();
    objs2.push(newcomer());
    let t = Instant::now();
    let d2 = reconcile::desired(&snapshot(&objs2), &settings).unwrap();
    rows.push((
        "one new local pod: convert + compile (pure)".into(),
        ms(t.elapsed()),
    ));
    rows.extend(incremental(&objs, &settings, &d2));
    if !kernel {
        rows.push(("kernel".into(), "skipped (not root)".into()));
        return rows;
    }
    let kernel_rows = sluice_testkit::in_new_netns(|| {
        let mut rows: Vec<(String, String)> = Vec::new();
        let w = Writer::new(kind);
        settle();
        let idle0 = kernel_kib();
        settle();
        let before = kernel_kib();
        let t = Instant::now();
        let r = w.sync(&desired.dataplane, SyncMode::Full);
        rows.push((
            "first apply".into(),
            format!("{} ({})", ms(t.elapsed()), r.detail),
        ));
        // SLUICE_BENCH_DUMP_NFT=DIR keeps the table as written (`nft -f`-able), for
        // timing changes to it by hand in a netns of one's own.
        if let (DataplaneKind::Nftables, Ok(dir)) = (kind, std::env::var("SLUICE_BENCH_DUMP_NFT")) {
            let path = format!("{dir}/sluice-{local}-local.nft");
            std::fs::write(&path, sluice_testkit::sh("nft list table ip sluice")).unwrap();
            eprintln!("wrote the first apply's table to {path}");
        }
        settle();
        let grown = kernel_kib() - before;
        let median = |distrust: bool| {
            let mut noop = Vec::new();
            for _ in 0..5 {
                if distrust {
                    w.distrust();
                }
                let t = Instant::now();
                let r = w.sync(&desired.dataplane, SyncMode::Full);
                assert!(!r.changed, "a no-op resync wrote something");
                noop.push(t.elapsed());
            }
            noop.sort();
            noop[2]
        };
        let label = match kind {
            // nftables trusts its last write while the ruleset generation is its own.
            DataplaneKind::Nftables => "no-op resync (generation unchanged), median of 5",
            DataplaneKind::Iptables => "no-op resync (read kernel, compare), median of 5",
        };
        rows.push((label.into(), ms(median(false))));
        if kind == DataplaneKind::Nftables {
            rows.push((
                "no-op resync reading the table (periodic, or after another writer), median of 5"
                    .into(),
                ms(median(true)),
            ));
        }
        // One new local pod: the ADD-to-enforced work at this scale, as the agent does
        // it (diff against its last write: one transaction).
        let t = Instant::now();
        let r = w.sync(&d2.dataplane, SyncMode::Incremental);
        rows.push((
            "one new local pod: incremental apply (one transaction)".into(),
            format!("{} ({})", ms(t.elapsed()), r.detail),
        ));
        // One shot is at the mercy of the machine's load: the pod removed and added
        // again many times, median of the additions. `SLUICE_BENCH_APPLY_REPEAT` sets
        // how many (a large number to profile this path).
        let repeat: usize = std::env::var("SLUICE_BENCH_APPLY_REPEAT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(21);
        let mut adds = Vec::new();
        for _ in 0..repeat {
            w.sync(&desired.dataplane, SyncMode::Incremental);
            let t = Instant::now();
            let r = w.sync(&d2.dataplane, SyncMode::Incremental);
            adds.push(t.elapsed());
            assert!(r.changed, "the new pod's apply wrote nothing");
        }
        adds.sort();
        rows.push((
            format!("… the same, median of {repeat} (the pod removed and added again in turn)"),
            adds.get(adds.len() / 2).map_or("–".into(), |d| ms(*d)),
        ));
        if kind == DataplaneKind::Nftables {
            // The same transaction written by `nft -f` instead of netlink (what
            // element-only plans cost before the netlink writer), from the same state.
            w.sync(&desired.dataplane, SyncMode::Incremental);
            let nft = NftDataplane::nft_only(ExecRunner);
            nft.sync_with(&desired.dataplane, SyncMode::Full).unwrap();
            let t = Instant::now();
            let r = nft.sync_with(&d2.dataplane, SyncMode::Incremental).unwrap();
            rows.push((
                "one new local pod: the same transaction through `nft -f`".into(),
                format!(
                    "{} ({} chains rewritten, {} set/map elements changed)",
                    ms(t.elapsed()),
                    r.chains_rewritten,
                    r.set_members_changed
                ),
            ));
            w.distrust();
        }
        // The same change found by a full resync that reads the kernel back first.
        w.sync(&desired.dataplane, SyncMode::Full);
        w.distrust();
        let t = Instant::now();
        w.sync(&d2.dataplane, SyncMode::Full);
        rows.push((
            "one new local pod, full (kernel-reading) sync".into(),
            ms(t.elapsed()),
        ));
        rows.extend(kernel_counts(kind));
        settle();
        let before_rm = kernel_kib();
        sluice_testkit::sh("nft flush ruleset; ipset destroy 2>/dev/null || true");
        settle();
        let dropped = before_rm - kernel_kib();
        rows.push((
            "kernel memory: growth on first apply / drop on removal".into(),
            format!("{} / {}", kib(grown), kib(dropped)),
        ));
        rows.push((
            "kernel memory noise floor (idle drift over the same interval)".into(),
            kib(before - idle0),
        ));
        rows
    });
    rows.extend(kernel_rows);
    rows
}

/// The same new pod as the agent handles it: the directory datastore converts only
/// the new pod's file ([`Sources`]) and copies the cluster into the snapshot it
/// publishes, the loop compiles incrementally ([`reconcile::Compiler`]). Checks the
/// result equals the full compile's.
fn incremental(
    objs: &[Value],
    settings: &NodeSettings,
    full: &reconcile::Desired,
) -> Vec<(String, String)> {
    let raw = |objs: &[Value]| -> Vec<RawObject> {
        objs.iter()
            .map(|v| RawObject::new("bench", v.clone()))
            .collect()
    };
    let mut sources: Sources<usize> = Sources::default();
    sources.set(0, convert_source(&raw(objs)).parsed);
    let base = snapshot(objs);
    // As the directory datastore publishes: the cluster copied, the rest its own.
    let snap = |cluster: Cluster| {
        Arc::new(Snapshot {
            cluster,
            blocks: base.blocks.clone(),
            annotations: base.annotations.clone(),
            reported: Default::default(),
        })
    };
    let mut compiler = reconcile::Compiler::default();
    let (_, kind) = compiler
        .desired(&snap(sources.cluster().clone()), settings)
        .unwrap();
    assert_eq!(kind, reconcile::CompileKind::Full);

    let t = Instant::now();
    sources.set(1, convert_source(&raw(&[newcomer()])).parsed);
    let converted = t.elapsed();
    let t = Instant::now();
    let next = snap(sources.cluster().clone());
    let copied = t.elapsed();
    let t = Instant::now();
    let (d, kind) = compiler.desired(&next, settings).unwrap();
    let compiled = t.elapsed();
    assert_eq!(kind, reconcile::CompileKind::Incremental);
    assert!(
        d == *full,
        "the incremental compile differs from the full one"
    );
    // One shot is at the mercy of the machine's load: the same change undone and
    // redone (the pod deleted, added again) many times, median of each part.
    // `SLUICE_BENCH_INCR_REPEAT` sets how many (a large number to profile this path).
    let repeat: usize = std::env::var("SLUICE_BENCH_INCR_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let (mut copies, mut compiles) = (Vec::new(), Vec::new());
    for i in 0..repeat {
        if i % 2 == 0 {
            sources.remove(&1);
        } else {
            sources.set(1, convert_source(&raw(&[newcomer()])).parsed);
        }
        let t = Instant::now();
        let next = snap(sources.cluster().clone());
        copies.push(t.elapsed());
        let t = Instant::now();
        let (d, kind) = compiler.desired(&next, settings).unwrap();
        compiles.push(t.elapsed());
        assert_eq!(kind, reconcile::CompileKind::Incremental);
        if i % 2 == 1 {
            assert!(
                d == *full,
                "an incremental compile differs from the full one"
            );
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    vec![
        (
            "one new local pod: incremental convert + compile (pure)".into(),
            ms(converted + copied + compiled),
        ),
        (
            "… of which: convert the new pod's source / copy the cluster into the snapshot / compile + agent rules".into(),
            format!("{} / {} / {}", ms(converted), ms(copied), ms(compiled)),
        ),
        (
            format!("… copy / compile + agent rules, median of {repeat} (the pod deleted and added again in turn)"),
            format!("{} / {}", ms(median(copies)), ms(median(compiles))),
        ),
    ]
}

fn scenario(name: &str, local: usize, kinds: &[DataplaneKind], kernel: bool) {
    let load_before = loadavg();
    let results: Vec<Vec<(String, String)>> = kinds
        .iter()
        .map(|k| {
            eprintln!("{name}: measuring {}", k.as_str());
            measure(*k, local, kernel)
        })
        .collect();
    println!(
        "## {name}: {PODS} pods ({local} on this node), {POLICIES} policies, {NAMESPACES} namespaces, {NODES} nodes\n"
    );
    println!("load average (1, 5, 15 min) before: {load_before}");
    print!("\n| step |");
    for k in kinds {
        print!(" {} |", k.as_str());
    }
    print!("\n|---|");
    for _ in kinds {
        print!("---|");
    }
    println!();
    // Rows in first-seen order; a step one dataplane lacks is shown as "–".
    let mut steps: Vec<&str> = Vec::new();
    for r in &results {
        for (s, _) in r {
            if !steps.contains(&s.as_str()) {
                steps.push(s);
            }
        }
    }
    for s in steps {
        print!("| {s} |");
        for r in &results {
            let v = r.iter().find(|(k, _)| k == s).map_or("–", |(_, v)| v);
            print!(" {v} |");
        }
        println!();
    }
    println!("\nload average (1, 5, 15 min) after: {}\n", loadavg());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    // The same cluster for the lab's agents (tests/e2e/measure-add-to-connect.sh):
    // 110 pods on the lab node SLUICE_BENCH_EMIT_NODE, the rest on nodes that do
    // not exist, with addresses outside the lab's pool, and no Node objects, so that
    // the agents route nothing to them.
    if let Ok(path) = std::env::var("SLUICE_BENCH_EMIT") {
        let layout = Layout {
            local_node: std::env::var("SLUICE_BENCH_EMIT_NODE").unwrap_or_else(|_| "node-1".into()),
            other_prefix: "scale-node-",
            pod_net: (100, 72),
            nodes: false,
        };
        let objs = objects_in(110, &layout);
        std::fs::write(&path, serde_json::to_vec(&objs).unwrap()).unwrap();
        eprintln!("wrote {} objects to {path}", objs.len());
        return;
    }
    // `cargo bench` passes --bench; anything else is ignored.
    let root = nix::unistd::geteuid().is_root();
    let kinds: Vec<DataplaneKind> = std::env::var("SLUICE_BENCH_DATAPLANES")
        .unwrap_or_else(|_| "iptables,nftables".into())
        .split(',')
        .map(|s| match s.trim() {
            "iptables" => DataplaneKind::Iptables,
            "nftables" => DataplaneKind::Nftables,
            other => panic!("SLUICE_BENCH_DATAPLANES: unknown dataplane {other:?}"),
        })
        .collect();
    // SLUICE_BENCH_SCENARIOS=realistic (or stress) runs one scenario only.
    let scenarios =
        std::env::var("SLUICE_BENCH_SCENARIOS").unwrap_or_else(|_| "realistic,stress".into());
    if scenarios.split(',').any(|s| s.trim() == "realistic") {
        scenario("realistic node", 110, &kinds, root);
    }
    if scenarios.split(',').any(|s| s.trim() == "stress") {
        scenario("stress: every pod on this node", PODS, &kinds, root);
    }
}
