//! The policy engine's scenario files (`policy/tests/data/*.expect.yaml`, written by
//! hand from upstream semantics) run against the lab with real packets.
//!
//! A scenario's manifests name its own nodes and fixed pod addresses; the lab has
//! nodes `node-1..N` and hands out addresses through the real IPAM. So the files are
//! copied with node names mapped (in the order the scenario lists its Nodes) and,
//! once the pods exist, every `/32` naming a scenario pod address rewritten to that
//! pod's lab address. Probes that cannot be reproduced honestly in the lab are
//! skipped with a reason (an `ip:` source inside the pod pool, a scenario node's
//! address, SCTP where the kernel has none), never turned into a verdict.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::{Lab, Truth, policy_data};

#[derive(Debug, Clone, Deserialize)]
pub struct Expect {
    pub manifests: Vec<String>,
    #[serde(default)]
    pub matrix: Vec<MatrixSpec>,
    #[serde(default)]
    pub probes: Vec<ProbeSpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MatrixSpec {
    pub ports: Vec<u16>,
    pub protocols: Vec<String>,
    pub default: String,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Rule {
    pub from: String,
    pub to: String,
    pub verdict: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProbeSpec {
    pub from: String,
    pub to: String,
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
    pub verdict: String,
}

fn tcp() -> String {
    "TCP".into()
}

pub fn load_expect(name: &str) -> Expect {
    let p = policy_data(&format!("{name}.expect.yaml"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every upstream case name (`upstream-NN-*`) that has an expectation file.
pub fn upstream_cases() -> Vec<String> {
    cases("upstream-")
}

/// Every case whose name starts with `prefix` and has an expectation file, sorted:
/// found by listing, so a case added to the data is run without naming it here.
pub fn cases(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(policy_data(""))
        .expect("policy/tests/data")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter_map(|f| f.strip_suffix(".expect.yaml").map(str::to_string))
        .filter(|f| f.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// `SLUICE_E2E_CASES=a,b` (name prefixes), when set: the part of `cases` this run
/// covers (the QEMU suite runs a subset this way).
pub fn only() -> Option<Vec<String>> {
    std::env::var("SLUICE_E2E_CASES")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
}

/// `cases` narrowed by [`only`].
pub fn selected(cases: Vec<String>) -> Vec<String> {
    match only() {
        None => cases,
        Some(o) => cases
            .into_iter()
            .filter(|c| o.iter().any(|p| c.starts_with(p.as_str())))
            .collect(),
    }
}

/// `cases` grouped by the cluster files (Namespaces, Pods, Nodes) their manifests
/// name, in first-seen order: each group runs in one lab built from its cluster, so
/// cases written against different fixtures never share pods.
pub fn by_cluster(cases: &[String]) -> Vec<(Vec<PathBuf>, Vec<String>)> {
    let mut groups: Vec<(Vec<PathBuf>, Vec<String>)> = Vec::new();
    for c in cases {
        let (cluster, _) = scenario_files(&load_expect(c));
        match groups.iter_mut().find(|(k, _)| *k == cluster) {
            Some((_, v)) => v.push(c.clone()),
            None => groups.push((cluster, vec![c.clone()])),
        }
    }
    groups
}

/// `*`, `ns/*`, `*/pod`, `ns/pod`.
pub fn pattern_matches(pat: &str, key: &str) -> bool {
    if pat == "*" {
        return true;
    }
    let (pn, pp) = pat.split_once('/').unwrap_or((pat, "*"));
    let (kn, kp) = key.split_once('/').unwrap_or((key, ""));
    (pn == "*" || pn == kn) && (pp == "*" || pp == kp)
}

/// The expected truth table of one matrix spec over `pods`, restricted to
/// `protocols_run` (pods to themselves are always allowed: loopback).
pub fn expected(spec: &MatrixSpec, pods: &[String], protocols_run: &[&str]) -> Truth {
    let mut t = Truth::new();
    for proto in spec
        .protocols
        .iter()
        .filter(|p| protocols_run.contains(&p.as_str()))
    {
        for &port in &spec.ports {
            for from in pods {
                for to in pods {
                    let mut allow = spec.default == "allow";
                    for r in &spec.rules {
                        if pattern_matches(&r.from, from) && pattern_matches(&r.to, to) {
                            allow = r.verdict == "allow";
                        }
                    }
                    if from == to {
                        allow = true;
                    }
                    t.insert((from.clone(), to.clone(), port, proto.clone()), allow);
                }
            }
        }
    }
    t
}

/// Files of a scenario's manifest entries, split into the cluster (Namespaces,
/// Pods, Nodes) and its policies.
pub fn scenario_files(expect: &Expect) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut cluster = Vec::new();
    let mut policies = Vec::new();
    for m in &expect.manifests {
        let p = policy_data(m);
        let files: Vec<PathBuf> = if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&p)
                .unwrap()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "json"))
                .collect();
            v.sort();
            v
        } else {
            vec![p]
        };
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let policy = ["NetworkPolicy", "ClusterNetworkPolicy"].iter().any(|k| {
                text.contains(&format!("kind: {k}")) || text.contains(&format!("\"{k}\""))
            });
            if policy {
                policies.push(f);
            } else {
                cluster.push(f);
            }
        }
    }
    (cluster, policies)
}

fn documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(text) {
        let v = Value::deserialize(de).expect("valid YAML");
        if v["kind"].as_str().is_some_and(|k| k.ends_with("List")) {
            out.extend(v["items"].as_array().cloned().unwrap_or_default());
        } else if !v.is_null() {
            out.push(v);
        }
    }
    out
}

/// What a scenario's cluster files say: node names in order, node addresses, and
/// each pod's fixed address.
#[derive(Debug, Default, Clone)]
pub struct Fixture {
    pub nodes: Vec<String>,
    /// Every pod, `ns/name`, in file order.
    pub pods: Vec<String>,
    pub node_ips: Vec<String>,
    pub pod_ips: BTreeMap<String, String>,
}

pub fn fixture(cluster: &[PathBuf]) -> Fixture {
    let mut fx = Fixture::default();
    for f in cluster {
        for v in documents(&std::fs::read_to_string(f).unwrap()) {
            match v["kind"].as_str() {
                Some("Node") => {
                    fx.nodes
                        .push(v["metadata"]["name"].as_str().unwrap().to_string());
                    for a in v["status"]["addresses"].as_array().into_iter().flatten() {
                        if let Some(ip) = a["address"]
                            .as_str()
                            .filter(|s| s.parse::<std::net::Ipv4Addr>().is_ok())
                        {
                            fx.node_ips.push(ip.to_string());
                        }
                    }
                }
                Some("Pod") => {
                    let ns = v["metadata"]["namespace"].as_str().unwrap_or("default");
                    let name = v["metadata"]["name"].as_str().unwrap();
                    fx.pods.push(format!("{ns}/{name}"));
                    if let Some(ip) = v["status"]["podIP"].as_str() {
                        fx.pod_ips.insert(format!("{ns}/{name}"), ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    fx
}

impl Fixture {
    /// Scenario node name → lab node name.
    pub fn node_map(&self) -> Vec<(String, String)> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), format!("node-{}", i + 1)))
            .collect()
    }

    pub fn map_node(&self, name: &str) -> String {
        self.node_map()
            .into_iter()
            .find(|(a, _)| a == name)
            .map(|(_, b)| b)
            .unwrap_or_else(|| name.to_string())
    }
}

/// Copy `files` into `dir` with node names mapped and pod addresses rewritten.
pub fn rewrite(
    files: &[PathBuf],
    dir: &Path,
    fx: &Fixture,
    lab_ips: &BTreeMap<String, String>,
) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let mut text = std::fs::read_to_string(f).unwrap();
        for (from, to) in fx.node_map() {
            if from != to {
                text = text.replace(&from, &to);
            }
        }
        for (pod, ip) in &fx.pod_ips {
            if let Some(lab) = lab_ips.get(pod) {
                text = text.replace(&format!("{ip}/32"), &format!("{lab}/32"));
            }
        }
        let p = dir.join(format!(
            "{i:02}-{}",
            f.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&p, text).unwrap();
        out.push(p);
    }
    out
}

/// Lab addresses of every pod.
pub fn lab_pod_ips(lab: &Lab) -> BTreeMap<String, String> {
    let st = lab.status();
    st["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap(),
                    p["name"].as_str().unwrap()
                ),
                p["ip"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The lab's pod pool (`lab up`'s default).
pub const POOL: &str = "10.244.0.0/16";

/// Why a probe of the scenario cannot be reproduced honestly in the lab, if so.
pub fn unrunnable(p: &ProbeSpec, fx: &Fixture, sctp: bool, pool: &str) -> Option<String> {
    let pool: ipnet_lite::Net = pool.parse().expect("pool");
    if p.protocol == "SCTP" && !sctp {
        return Some("this kernel has no SCTP sockets".into());
    }
    for end in [&p.from, &p.to] {
        if let Some(a) = end.strip_prefix("ip:") {
            let ip: std::net::Ipv4Addr = a.parse().expect("ip");
            if pool.contains(ip) {
                return Some(format!(
                    "{end} is inside the lab's pod pool (no outside host can have it)"
                ));
            }
            if fx.node_ips.iter().any(|n| n == a) {
                return Some(format!(
                    "{end} is a scenario node's address, not a lab node's"
                ));
            }
        }
    }
    if let Some(ip) = fx.pod_ips.get(&p.from)
        && !pool.contains(ip.parse().expect("pod ip"))
    {
        return Some(format!(
            "the scenario gives {} the address {ip}, outside the lab's pod pool",
            p.from
        ));
    }
    if p.to.starts_with("node:") {
        return Some("probes to a node are NodePort probes in the lab".into());
    }
    None
}

/// Tiny IPv4 CIDR, to keep this crate's dependencies small.
pub mod ipnet_lite {
    pub struct Net {
        base: u32,
        mask: u32,
    }
    impl std::str::FromStr for Net {
        type Err = String;
        fn from_str(s: &str) -> Result<Net, String> {
            let (a, l) = s.split_once('/').ok_or("no /")?;
            let a: std::net::Ipv4Addr = a.parse().map_err(|_| "addr")?;
            let l: u32 = l.parse().map_err(|_| "len")?;
            let mask = if l == 0 { 0 } else { u32::MAX << (32 - l) };
            Ok(Net {
                base: u32::from(a) & mask,
                mask,
            })
        }
    }
    impl Net {
        pub fn contains(&self, ip: std::net::Ipv4Addr) -> bool {
            u32::from(ip) & self.mask == self.base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_the_expectation_format_says() {
        assert!(pattern_matches("*", "x/a"));
        assert!(pattern_matches("x/*", "x/a"));
        assert!(!pattern_matches("x/*", "y/a"));
        assert!(pattern_matches("*/b", "z/b"));
        assert!(pattern_matches("x/a", "x/a"));
        assert!(!pattern_matches("x/a", "x/b"));
    }

    #[test]
    fn expected_tables_apply_rules_in_order_and_allow_loopback() {
        let spec = MatrixSpec {
            ports: vec![80],
            protocols: vec!["TCP".into(), "SCTP".into()],
            default: "allow".into(),
            rules: vec![
                Rule {
                    from: "*".into(),
                    to: "x/a".into(),
                    verdict: "deny".into(),
                },
                Rule {
                    from: "y/*".into(),
                    to: "x/a".into(),
                    verdict: "allow".into(),
                },
            ],
        };
        let pods = vec!["x/a".to_string(), "x/b".to_string(), "y/a".to_string()];
        let t = expected(&spec, &pods, &["TCP"]);
        let get = |f: &str, to: &str| t[&(f.to_string(), to.to_string(), 80, "TCP".to_string())];
        assert!(!get("x/b", "x/a"));
        assert!(get("y/a", "x/a"));
        assert!(get("x/a", "x/a"), "loopback");
        assert!(get("x/a", "x/b"));
        assert_eq!(t.len(), 9, "SCTP left out when not run");
    }

    #[test]
    fn cluster_network_policy_cases_are_found_by_listing_and_grouped_by_their_fixture() {
        let cases = cases("cnp-");
        assert!(cases.len() >= 10, "{cases:?}");
        let groups = by_cluster(&cases);
        let grouped: usize = groups.iter().map(|(_, g)| g.len()).sum();
        assert_eq!(grouped, cases.len(), "every case in exactly one group");
        for (cluster, group) in &groups {
            assert!(!fixture(cluster).pods.is_empty(), "{cluster:?}");
            for c in group {
                let (_, policies) = scenario_files(&load_expect(c));
                assert!(
                    !policies.is_empty(),
                    "{c}: its ClusterNetworkPolicies are policies"
                );
                for f in cluster {
                    let text = std::fs::read_to_string(f).unwrap();
                    assert!(
                        !text.contains("kind: ClusterNetworkPolicy"),
                        "{}",
                        f.display()
                    );
                }
            }
        }
    }

    #[test]
    fn every_upstream_expectation_file_parses() {
        let cases = upstream_cases();
        assert!(cases.len() >= 20, "{cases:?}");
        for c in cases {
            let e = load_expect(&c);
            assert!(e.manifests.iter().any(|m| m == "upstream-cluster"), "{c}");
        }
    }
}

/// What one scenario run found.
#[derive(Debug, Default)]
pub struct Report {
    pub cells: usize,
    pub probes: usize,
    /// Cases that probed anything (a case whose every probe was skipped is not one).
    pub cases: usize,
    pub skipped: Vec<String>,
    pub failures: Vec<String>,
    /// Cells where the lab and `sluicectl policy check` disagree.
    pub differential: Vec<String>,
}

impl Report {
    pub fn merge(&mut self, other: Report) {
        self.cells += other.cells;
        self.probes += other.probes;
        self.cases += other.cases;
        self.skipped.extend(other.skipped);
        self.failures.extend(other.failures);
        self.differential.extend(other.differential);
    }

    pub fn is_clean(&self) -> bool {
        self.failures.is_empty() && self.differential.is_empty()
    }
}

/// A cell's key as [`Truth`] has it.
type Key = (String, String, u16, String);

/// The cells of `want` a matrix does not cover (a port the destination does not
/// declare, or the same port on another protocol), probed in one parallel batch:
/// the lab starts a server for such a port on first use.
fn probe_missing(lab: &Lab, want: &Truth, got: &mut Truth) {
    let missing: Vec<Key> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .cloned()
        .collect();
    for (k, o) in missing.iter().zip(lab.probe_all(&missing)) {
        got.insert(k.clone(), o.connected());
    }
}

/// The matrix's cells between `pods` (every lab pod when empty), and the cells of
/// `want` it does not cover.
fn measure(lab: &Lab, want: &Truth, pods: &[String]) -> Truth {
    let mut got = lab.matrix().truth();
    if !pods.is_empty() {
        got.retain(|k, _| pods.contains(&k.0) && pods.contains(&k.1));
    }
    probe_missing(lab, want, &mut got);
    got
}

/// A [`crate::Matrix`] of the given cells (no results), to ask `policy check` about.
fn cells_of(keys: &[Key]) -> crate::Matrix {
    crate::Matrix {
        pods: vec![],
        probes: keys
            .iter()
            .map(|(from, to, port, protocol)| crate::Cell {
                from: from.clone(),
                to: to.clone(),
                port: *port,
                protocol: protocol.clone(),
                result: None,
                error: None,
            })
            .collect(),
    }
}

/// Check a scenario whose objects are already applied: its matrices against the
/// hand-written expectations and against `sluicectl policy check` over the lab's own
/// manifests directory (what the agents see), and its single probes the same way.
/// Matrices cover the scenario's own pods (every lab pod when its fixture names
/// none). Probes go out in parallel batches; a mismatch is measured once more after
/// a pause, since agents converge asynchronously, and the second answer is final.
pub fn check(lab: &Lab, name: &str, e: &Expect, fx: &Fixture, sctp: bool) -> Report {
    let mut r = Report::default();
    let protocols: Vec<&str> = if sctp {
        vec!["TCP", "UDP", "SCTP"]
    } else {
        vec!["TCP", "UDP"]
    };
    let own: Vec<String> = fx.pods.clone();
    if !e.matrix.is_empty() {
        let pods: Vec<String> = if own.is_empty() {
            lab_pod_ips(lab).into_keys().collect()
        } else {
            own.clone()
        };
        let mut want = Truth::new();
        for spec in &e.matrix {
            want.extend(expected(spec, &pods, &protocols));
        }
        let mut got = measure(lab, &want, &own);
        let mut d = crate::differences(&want, &got);
        if !d.is_empty() {
            std::thread::sleep(std::time::Duration::from_secs(2));
            got = measure(lab, &want, &own);
            d = crate::differences(&want, &got);
        }
        r.cells = want.len();
        r.failures
            .extend(d.into_iter().map(|s| format!("{name}: {s}")));
        // Every cell measured (the matrix's and the extra ones) through `policy check`.
        let keys: Vec<Key> = got.keys().cloned().collect();
        let predicted = crate::predicted(&[&lab.manifests_dir()], &cells_of(&keys));
        r.differential.extend(
            crate::differences(&predicted, &got)
                .into_iter()
                .map(|s| format!("{name}: policy check vs lab: {s}")),
        );
    }
    let mut to_check: Vec<(Key, bool)> = Vec::new();
    for p in &e.probes {
        if let Some(why) = unrunnable(p, fx, sctp, POOL) {
            r.skipped.push(format!(
                "{name}: {} -> {} {}/{}: {why}",
                p.from, p.to, p.protocol, p.port
            ));
            continue;
        }
        let map = |s: &str| match s.strip_prefix("node:") {
            Some(n) => format!("node:{}", fx.map_node(n)),
            None => s.to_string(),
        };
        to_check.push((
            (map(&p.from), map(&p.to), p.port, p.protocol.clone()),
            p.verdict == "allow",
        ));
    }
    if !to_check.is_empty() {
        let keys: Vec<Key> = to_check.iter().map(|(k, _)| k.clone()).collect();
        let want: Truth = to_check.iter().cloned().collect();
        let measure_probes = || -> Truth {
            keys.iter()
                .cloned()
                .zip(lab.probe_all(&keys).iter().map(|o| o.connected()))
                .collect()
        };
        let mut got = measure_probes();
        if !crate::differences(&want, &got).is_empty() {
            std::thread::sleep(std::time::Duration::from_secs(2));
            got = measure_probes();
        }
        r.probes += keys.len();
        r.failures.extend(
            crate::differences(&want, &got)
                .into_iter()
                .map(|s| format!("{name}: probe {s}")),
        );
        // The same single probes through `policy check`, over what the agents see.
        let pred = crate::predicted(&[&lab.manifests_dir()], &cells_of(&keys));
        for (k, allow) in &to_check {
            if pred[k] != *allow {
                r.differential.push(format!(
                    "{name}: policy check says {} for {} -> {} {}/{}, expected {}",
                    if pred[k] { "allow" } else { "deny" },
                    k.0,
                    k.1,
                    k.3,
                    k.2,
                    if *allow { "allow" } else { "deny" }
                ));
            }
        }
    }
    if r.cells > 0 || r.probes > 0 {
        r.cases = 1;
    }
    r
}

/// Every pod to every pod on every declared port, measured in the lab and asked of
/// `sluicectl policy check` over the lab's manifests directory (what the agents
/// see): the cells where they disagree, measured twice (agents converge
/// asynchronously; the second answer is final).
pub fn differential(lab: &Lab, name: &str) -> (usize, Vec<String>) {
    let mut d = Vec::new();
    let mut cells = 0;
    for attempt in 0..2 {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        let m = lab.matrix();
        let predicted = crate::predicted(&[&lab.manifests_dir()], &m);
        cells = m.probes.len();
        d = crate::differences(&predicted, &m.truth());
        if d.is_empty() {
            break;
        }
    }
    (
        cells,
        d.into_iter()
            .map(|s| format!("{name}: policy check vs lab: {s}"))
            .collect(),
    )
}

/// Why a case cannot be set up in the lab at all, if so: the lab refuses hostNetwork
/// pods (the servers of upstream's node-peer cases), so such a case is skipped with
/// this reason, and is shown in the evaluator and the compiled rules only.
pub fn unsupported(e: &Expect) -> Option<String> {
    let (cluster, policies) = scenario_files(e);
    cluster.iter().chain(&policies).find_map(|f| {
        documents(&std::fs::read_to_string(f).unwrap())
            .into_iter()
            .find(|v| v["kind"] == "Pod" && v["spec"]["hostNetwork"] == true)
            .map(|v| {
                format!(
                    "pod {}/{} is host-networked, which the lab does not support",
                    v["metadata"]["namespace"].as_str().unwrap_or("default"),
                    v["metadata"]["name"].as_str().unwrap_or("?")
                )
            })
    })
}

/// Whether a case's files hold more than policies (a Namespace relabelled for the
/// case): deleting them deletes those objects too, so the cluster is applied again.
fn changes_cluster(files: &[PathBuf]) -> bool {
    files.iter().any(|f| {
        documents(&std::fs::read_to_string(f).unwrap())
            .iter()
            .any(|v| {
                !matches!(
                    v["kind"].as_str(),
                    Some("NetworkPolicy" | "ClusterNetworkPolicy")
                )
            })
    })
}

/// Run `cases` one after the other in a lab whose cluster (`cluster`, the files as
/// applied; `fx` their fixture) is already applied: each case's policies are applied
/// with pod addresses rewritten, checked with [`check`], and deleted again (and the
/// cluster applied again when the case changed it), so every case starts from the
/// same cluster. One line per case on stderr.
pub fn run_cases(
    lab: &Lab,
    label: &str,
    cases: &[String],
    cluster: &[PathBuf],
    fx: &Fixture,
    sctp: bool,
) -> Report {
    let ips = lab_pod_ips(lab);
    let mut total = Report::default();
    for case in cases {
        let e = load_expect(case);
        if let Some(why) = unsupported(&e) {
            eprintln!("{label} {case}: skipped: {why}");
            total.skipped.push(format!("{case}: {why}"));
            continue;
        }
        let (_, policies) = scenario_files(&e);
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = rewrite(&policies, dir.path(), fx, &ips);
        let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        let t = std::time::Instant::now();
        lab.apply(&refs);
        let r = check(lab, case, &e, fx, sctp);
        lab.delete(&refs);
        if changes_cluster(&files) {
            let c: Vec<&Path> = cluster.iter().map(PathBuf::as_path).collect();
            lab.apply(&c);
        }
        eprintln!(
            "{label} {case}: {} cells, {} probes, {} failures, {} differential, {} skipped, {:.1} s",
            r.cells,
            r.probes,
            r.failures.len(),
            r.differential.len(),
            r.skipped.len(),
            t.elapsed().as_secs_f64()
        );
        total.merge(r);
    }
    total
}

/// Apply a whole scenario (cluster, then its policies with addresses rewritten) to a
/// fresh lab and check it.
pub fn run(lab: &Lab, name: &str, sctp: bool) -> Report {
    let e = load_expect(name);
    let (cluster, policies) = scenario_files(&e);
    let fx = fixture(&cluster);
    let dir = tempfile::tempdir().unwrap();
    let c = rewrite(&cluster, dir.path(), &fx, &BTreeMap::new());
    let refs: Vec<&Path> = c.iter().map(PathBuf::as_path).collect();
    lab.apply(&refs);
    let ips = lab_pod_ips(lab);
    let pdir = tempfile::tempdir().unwrap();
    let p = rewrite(&policies, pdir.path(), &fx, &ips);
    let refs: Vec<&Path> = p.iter().map(PathBuf::as_path).collect();
    lab.apply(&refs);
    check(lab, name, &e, &fx, sctp)
}
