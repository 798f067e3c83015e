//! The policy engine's scenario files (`policy/tests/data/*.expect.yaml`, written by
//! hand from upstream semantics) run against the lab with real packets.
//!
//! A scenario's manifests name its own nodes, their addresses and fixed pod
//! addresses. [`stage`] lays a lab out as that cluster ([`crate::layout`]): node-i
//! gets the scenario's i-th node (names mapped in the order the scenario lists its
//! Nodes) and its address (`lab up --node-ips`), and every pod asks for its scenario
//! address (`sluice.dev/ip-addrs` or `sluice.dev/ip-addrs-no-ipam`), so policies and
//! probes that name those addresses mean in the lab what they mean in the scenario.
//! A pod whose address the lab cannot honour keeps an IPAM address, and every `/32`
//! naming it is rewritten to that. Probes that cannot be reproduced honestly in the
//! lab are skipped with a reason (SCTP where the kernel has none, an `ip:` end the
//! lab cannot place), never turned into a verdict; in CI a skip that is not one of
//! [`KNOWN_SKIPS`] fails the suite.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::fixture::documents;
pub use crate::fixture::{Fixture, fixture};
use crate::layout::{self, LabFacts, Layout, Nodes};
use crate::{Dataplane, Lab, Truth, policy_data};

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

pub fn pool() -> Ipv4Net {
    POOL.parse().expect("pool")
}

/// The reason of a skip that only a kernel with SCTP sockets removes (the QEMU suite
/// runs those probes).
pub const NO_SCTP: &str = "this kernel has no SCTP sockets";

/// How a scenario probe is sent in the lab: its ends as `lab probe` takes them, and,
/// for an `ip:` source that is a lab node's address (sent from that node), the
/// node's namespace and that address, which the kernel must pick as the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub from: String,
    pub to: String,
    pub source: Option<(String, Ipv4Addr)>,
}

/// Why an `ip:` end cannot be an outside host of this lab, if so.
fn not_outside(end: &str, ip: Ipv4Addr, fx: &Fixture, layout: &Layout) -> Result<(), String> {
    if let Some((pod, _)) = layout.pods.pins.iter().find(|(_, (a, _))| *a == ip) {
        return Err(format!(
            "{end} is {pod}'s address, and an outside host cannot have it"
        ));
    }
    if layout.pool.contains(&ip) {
        return Err(format!(
            "{end} is inside the lab's pod pool {} and no lab node or pod has it (an outside host cannot)",
            layout.pool
        ));
    }
    if fx
        .node_ips
        .iter()
        .any(|n| n.parse::<Ipv4Addr>().is_ok_and(|a| a == ip))
    {
        let why = layout.nodes_exact().err().unwrap_or("it is no lab node's");
        return Err(format!(
            "{end} is a scenario node's address, not a lab node's: {why}"
        ));
    }
    if let Some((underlay, gateway)) = layout.underlay {
        if ip == gateway {
            return Err(format!("{end} is the lab's gateway"));
        }
        if underlay.contains(&ip) {
            return Err(format!(
                "{end} is inside the lab's underlay {underlay} (an outside host cannot be)"
            ));
        }
    }
    Ok(())
}

/// How to send a probe of the scenario in the lab laid out as `layout`, or why it
/// cannot be reproduced honestly there.
pub fn route(p: &ProbeSpec, fx: &Fixture, layout: &Layout, sctp: bool) -> Result<Route, String> {
    if p.protocol == "SCTP" && !sctp {
        return Err(NO_SCTP.into());
    }
    if p.to.starts_with("node:") {
        return Err("probes to a node are NodePort probes in the lab".into());
    }
    let map = |s: &str| match s.strip_prefix("node:") {
        Some(n) => format!("node:{}", fx.map_node(n)),
        None => s.to_string(),
    };
    let mut r = Route {
        from: map(&p.from),
        to: map(&p.to),
        source: None,
    };
    if let Some(a) = p.from.strip_prefix("ip:") {
        let ip: Ipv4Addr = a.parse().expect("ip");
        match layout.node_addrs.get(&ip) {
            Some((node, netns)) => {
                r.from = format!("node:{node}");
                r.source = Some((netns.clone(), ip));
            }
            None => not_outside(&p.from, ip, fx, layout)?,
        }
    }
    if let Some(a) = p.to.strip_prefix("ip:") {
        let ip: Ipv4Addr = a.parse().expect("ip");
        match layout.node_addrs.get(&ip) {
            // The uplink: the node serves the port there on first use.
            Some((node, _)) if !layout.pool.contains(&ip) => {
                r.to = format!("node:{node}:{}", p.port);
            }
            Some((node, _)) => {
                return Err(format!(
                    "{} is {node}'s tunnel address, and the lab serves a node's ports on its uplink address only",
                    p.to
                ));
            }
            None => not_outside(&p.to, ip, fx, layout)?,
        }
    }
    for end in [&p.from, &p.to] {
        let Some(ip) = fx.pod_ips.get(end.as_str()) else {
            continue;
        };
        let outside_pool = ip
            .parse()
            .is_ok_and(|a: Ipv4Addr| !layout.pool.contains(&a));
        if outside_pool && !layout.pods.pins.contains_key(end.as_str()) {
            let why = layout
                .pods
                .refused
                .get(end.as_str())
                .map(String::as_str)
                .or(layout.nodes_exact().err())
                .unwrap_or("it was not asked for");
            return Err(format!(
                "the scenario gives {end} the address {ip}, outside the lab's pod pool, and the lab could not give it: {why}"
            ));
        }
    }
    Ok(r)
}

/// The source address a node's kernel picks towards `dest` (`ip route get`).
fn source_address(netns: &str, dest: Ipv4Addr) -> Option<Ipv4Addr> {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-4", "-o", "route", "get", &dest.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "src")?;
    words.next()?.parse().ok()
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

    #[test]
    fn every_known_skip_names_a_case_and_a_probe_that_exist() {
        for (case, probe, why) in KNOWN_SKIPS {
            assert!(!why.is_empty(), "{case}: say why");
            let e = load_expect(case);
            if *probe == "*" {
                assert!(unsupported(&e).is_some(), "{case} runs: drop its entry");
                continue;
            }
            assert!(
                e.probes.iter().any(|p| {
                    format!("{} -> {} {}/{}", p.from, p.to, p.protocol, p.port) == *probe
                }),
                "{case} has no probe {probe}"
            );
        }
    }

    #[test]
    fn a_skip_is_known_only_when_listed_or_for_want_of_sctp() {
        let skip = |case: &str, probe: Option<&str>, why: &str| Skip {
            case: case.into(),
            probe: probe.map(str::to_string),
            why: why.into(),
        };
        let (case, probe, _) = KNOWN_SKIPS[0];
        assert!(skip(case, Some(probe), "whatever the lab says").is_known());
        assert!(skip("upstream-01-anything", Some("x/a -> x/b TCP/80"), NO_SCTP).is_known());
        assert!(!skip(case, Some("x/a -> x/b TCP/80"), "a new reason").is_known());
        assert!(!skip("seed-003-linuxea-ipblock-except", None, "host-networked").is_known());
        assert!(skip("cnp-admin-egress-node-peers", None, "host-networked").is_known());
    }

    fn probe(from: &str, to: &str) -> ProbeSpec {
        ProbeSpec {
            from: from.into(),
            to: to.into(),
            port: 80,
            protocol: "TCP".into(),
            verdict: "deny".into(),
        }
    }

    /// The scenario of seed 001/003 in miniature, laid out as `stage` would.
    fn laid_out() -> (Fixture, Layout) {
        let mut fx = Fixture {
            nodes: vec!["n1".into(), "n2".into()],
            node_ips: vec!["192.168.100.1".into(), "192.168.100.2".into()],
            ..Fixture::default()
        };
        for (p, ip) in [("x/a", "10.244.1.10"), ("x/out", "172.16.8.5")] {
            fx.pods.push(p.into());
            fx.pod_ips.insert(p.into(), ip.into());
        }
        let ip = |s: &str| -> Ipv4Addr { s.parse().unwrap() };
        let mut layout = Layout::unplanned(pool());
        layout.nodes = Nodes::Exact {
            ips: vec![ip("192.168.100.1"), ip("192.168.100.2")],
            underlay: None,
        };
        layout.underlay = Some(("192.168.100.0/24".parse().unwrap(), ip("192.168.100.3")));
        layout
            .pods
            .pins
            .insert("x/a".into(), (ip("10.244.1.10"), layout::Pin::Ipam));
        layout
            .pods
            .pins
            .insert("x/out".into(), (ip("172.16.8.5"), layout::Pin::NoIpam));
        for (a, node) in [
            ("192.168.100.1", "node-1"),
            ("192.168.100.2", "node-2"),
            ("10.244.2.1", "node-2"),
        ] {
            layout
                .node_addrs
                .insert(ip(a), (node.into(), format!("lab-{node}")));
        }
        (fx, layout)
    }

    #[test]
    fn an_ip_end_that_is_a_lab_nodes_address_is_sent_from_or_to_that_node() {
        let (fx, layout) = laid_out();
        let r = route(&probe("ip:192.168.100.1", "x/a"), &fx, &layout, false).unwrap();
        assert_eq!(r.from, "node:node-1");
        assert_eq!(
            r.source,
            Some(("lab-node-1".into(), "192.168.100.1".parse().unwrap()))
        );
        // A tunnel address is the node's too.
        let r = route(&probe("ip:10.244.2.1", "x/a"), &fx, &layout, false).unwrap();
        assert_eq!(r.from, "node:node-2");
        // Scenario node names are mapped; outside hosts stay outside hosts.
        let r = route(&probe("node:n2", "x/a"), &fx, &layout, false).unwrap();
        assert_eq!((r.from.as_str(), r.source), ("node:node-2", None));
        let r = route(&probe("x/a", "ip:203.0.113.9"), &fx, &layout, false).unwrap();
        assert_eq!(r.to, "ip:203.0.113.9");
        // To a node's uplink address: the node serves the port there.
        let r = route(&probe("x/a", "ip:192.168.100.1"), &fx, &layout, false).unwrap();
        assert_eq!((r.to.as_str(), r.source), ("node:node-1:80", None));
    }

    #[test]
    fn a_pod_at_its_scenario_address_outside_the_pool_is_probed_once_the_lab_gave_it() {
        let (fx, layout) = laid_out();
        assert!(route(&probe("x/out", "x/a"), &fx, &layout, false).is_ok());
        let unplanned = Layout::unplanned(pool());
        let why = route(&probe("x/out", "x/a"), &fx, &unplanned, false).unwrap_err();
        assert!(
            why.contains("172.16.8.5, outside the lab's pod pool"),
            "{why}"
        );
    }

    #[test]
    fn addresses_the_lab_cannot_place_are_skipped_with_a_precise_reason() {
        let (fx, layout) = laid_out();
        let why = |from: &str, to: &str, sctp: bool| {
            let mut p = probe(from, to);
            if sctp {
                p.protocol = "SCTP".into();
            }
            route(&p, &fx, &layout, false).unwrap_err()
        };
        assert_eq!(why("x/a", "x/a", true), NO_SCTP);
        assert!(why("x/a", "ip:10.244.2.1", false).contains("node-2's tunnel address"));
        assert!(why("ip:10.244.9.9", "x/a", false).contains("inside the lab's pod pool"));
        assert!(why("ip:10.244.1.10", "x/a", false).contains("x/a's address"));
        assert!(why("ip:192.168.100.3", "x/a", false).contains("the lab's gateway"));
        assert!(why("ip:192.168.100.9", "x/a", false).contains("inside the lab's underlay"));
        assert!(why("x/a", "node:n1:31000", false).contains("NodePort"));
        // Scenario node addresses the lab could not take.
        let mut other = layout.clone();
        other.nodes = Nodes::Default {
            why: "because".into(),
        };
        other.node_addrs.clear();
        other.underlay = None;
        let w = route(&probe("ip:192.168.100.1", "x/a"), &fx, &other, false).unwrap_err();
        assert!(
            w.contains("a scenario node's address, not a lab node's: because"),
            "{w}"
        );
    }
}

/// A probe (or a whole case) the lab did not run, and why.
#[derive(Clone, PartialEq, Eq)]
pub struct Skip {
    pub case: String,
    /// `FROM -> TO PROTOCOL/PORT` as the scenario writes it; `None` for a whole case.
    pub probe: Option<String>,
    pub why: String,
}

impl Skip {
    fn of_probe(case: &str, p: &ProbeSpec, why: String) -> Skip {
        Skip {
            case: case.to_string(),
            probe: Some(format!("{} -> {} {}/{}", p.from, p.to, p.protocol, p.port)),
            why,
        }
    }

    /// Whether the skip is expected here: SCTP on a kernel without it, or one of
    /// [`KNOWN_SKIPS`].
    pub fn is_known(&self) -> bool {
        self.why == NO_SCTP
            || KNOWN_SKIPS.iter().any(|(case, probe, _)| {
                *case == self.case && self.probe.as_deref().unwrap_or("*") == *probe
            })
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.probe {
            Some(p) => write!(f, "{}: {p}: {}", self.case, self.why),
            None => write!(f, "{}: {}", self.case, self.why),
        }
    }
}

/// As the line it prints (so a report's `{:#?}` reads as a list of reasons).
impl std::fmt::Debug for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// The scenario probes and cases the lab cannot reproduce honestly, each with why;
/// any other skip fails the suites in CI ([`Report::assert_skips_known`]), so a
/// scenario added with an address the lab cannot place is noticed, not silently
/// left out. SCTP on a kernel without it is always expected ([`NO_SCTP`]). `*` is
/// the whole case. A unit test checks that every entry names a case and a probe
/// that exist. The same list is in docs/known-gaps.md ("Lab").
pub const KNOWN_SKIPS: &[(&str, &str, &str)] = &[
    (
        "upstream-27-egress-cidr-except",
        "x/a -> ip:10.244.9.9 TCP/443",
        "a pool address no pod has: no outside host can have it",
    ),
    (
        "cnp-admin-egress-node-peers",
        "*",
        "its server is host-networked, which the lab refuses",
    ),
    (
        "cnp-baseline-egress-node-peers",
        "*",
        "its server is host-networked, which the lab refuses",
    ),
];

/// What one scenario run found.
#[derive(Debug, Default)]
pub struct Report {
    pub cells: usize,
    pub probes: usize,
    /// Cases that probed anything (a case whose every probe was skipped is not one).
    pub cases: usize,
    pub skipped: Vec<Skip>,
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

    /// Skips that are not [`Skip::is_known`]: each printed; a failure in CI (where a
    /// privileged test may not skip either, `sluice_testkit::privileged_required`).
    pub fn assert_skips_known(&self, suite: &str) {
        let unknown: Vec<String> = self
            .skipped
            .iter()
            .filter(|s| !s.is_known())
            .map(Skip::to_string)
            .collect();
        if unknown.is_empty() {
            return;
        }
        let msg = format!(
            "{suite}: {} skips not in scenario::KNOWN_SKIPS:\n{}",
            unknown.len(),
            unknown.join("\n")
        );
        if sluice_testkit::privileged_required() {
            panic!("{msg}\n(in CI an unexpected skip is a failure)");
        }
        eprintln!("WARNING {msg}\n(CI fails on these)");
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
pub fn check(
    lab: &Lab,
    name: &str,
    e: &Expect,
    fx: &Fixture,
    layout: &Layout,
    sctp: bool,
) -> Report {
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
    // Each probe as the scenario names it (what `policy check` is asked and what a
    // failure says), and as the lab sends it.
    let mut to_check: Vec<(Key, bool)> = Vec::new();
    let mut sends: Vec<Key> = Vec::new();
    let mut sources: Vec<Option<Ipv4Addr>> = Vec::new();
    let ips = if e.probes.is_empty() {
        BTreeMap::new()
    } else {
        lab_pod_ips(lab)
    };
    for p in &e.probes {
        let route = match route(p, fx, layout, sctp) {
            Ok(r) => r,
            Err(why) => {
                r.skipped.push(Skip::of_probe(name, p, why));
                continue;
            }
        };
        // An `ip:` source sent from a node: only honest if the node's kernel picks
        // that address as the source towards the destination.
        if let Some((netns, want)) = &route.source {
            let dest: Option<Ipv4Addr> = match p.to.strip_prefix("ip:") {
                Some(a) => a.parse().ok(),
                None => ips.get(&route.to).and_then(|a| a.parse().ok()),
            };
            let got = dest.and_then(|d| source_address(netns, d));
            if got != Some(*want) {
                r.skipped.push(Skip::of_probe(
                    name,
                    p,
                    format!(
                        "{} sends to {} from {}, not {want}",
                        route.from,
                        p.to,
                        got.map_or("no address".to_string(), |a| a.to_string())
                    ),
                ));
                continue;
            }
        }
        let map = |s: &str| match s.strip_prefix("node:") {
            Some(n) => format!("node:{}", fx.map_node(n)),
            None => s.to_string(),
        };
        to_check.push((
            (map(&p.from), map(&p.to), p.port, p.protocol.clone()),
            p.verdict == "allow",
        ));
        sends.push((route.from, route.to, p.port, p.protocol.clone()));
        sources.push(route.source.map(|(_, a)| a));
    }
    if !to_check.is_empty() {
        let keys: Vec<Key> = to_check.iter().map(|(k, _)| k.clone()).collect();
        let want: Truth = to_check.iter().cloned().collect();
        let mut wrong_source: Vec<String> = Vec::new();
        let mut measure_probes = || -> Truth {
            let outcomes = lab.probe_all(&sends);
            wrong_source.clear();
            for ((k, o), source) in keys.iter().zip(&outcomes).zip(&sources) {
                if let (Some(want), Some(seen)) = (source, &o.source_seen)
                    && o.connected()
                    && *seen != want.to_string()
                {
                    wrong_source.push(format!(
                        "{name}: probe {} -> {} {}/{} arrived from {seen}, not {want}",
                        k.0, k.1, k.3, k.2
                    ));
                }
            }
            keys.iter()
                .cloned()
                .zip(outcomes.iter().map(|o| o.connected()))
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
        r.failures.extend(wrong_source);
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

/// Run `cases` one after the other in `scene` (its cluster applied): each case's
/// policies are applied with pod addresses rewritten, checked with [`check`], and
/// deleted again (and the cluster applied again when the case changed it), so every
/// case starts from the same cluster. One line per case on stderr.
pub fn run_cases(scene: &Scene, label: &str, cases: &[String], sctp: bool) -> Report {
    let lab = &scene.lab;
    let fx = &scene.fx;
    let ips = lab_pod_ips(lab);
    let mut total = Report::default();
    for case in cases {
        let e = load_expect(case);
        if let Some(why) = unsupported(&e) {
            eprintln!("{label} {case}: skipped: {why}");
            total.skipped.push(Skip {
                case: case.clone(),
                probe: None,
                why,
            });
            continue;
        }
        let (_, policies) = scenario_files(&e);
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = rewrite(&policies, dir.path(), fx, &ips);
        let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        let t = std::time::Instant::now();
        lab.apply(&refs);
        let r = check(lab, case, &e, fx, &scene.layout, sctp);
        lab.delete(&refs);
        if changes_cluster(&files) {
            let c: Vec<&Path> = scene.cluster.iter().map(PathBuf::as_path).collect();
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

/// A lab laid out as a scenario's cluster, with that cluster applied.
pub struct Scene {
    pub lab: Lab,
    pub fx: Fixture,
    pub layout: Layout,
    /// The cluster files as applied (node names mapped, pods annotated).
    pub cluster: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

/// The block claims of a lab's directory block store: block → node.
fn block_claims(lab: &Lab) -> BTreeMap<Ipv4Net, String> {
    let dir = lab
        .manifests_dir()
        .parent()
        .expect("lab directory")
        .join("blocks");
    let mut out = BTreeMap::new();
    for f in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(f.path()) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        if let (Some(cidr), Some(node)) = (
            v["cidr"].as_str().and_then(|c| c.parse().ok()),
            v["node"].as_str(),
        ) {
            out.insert(cidr, node.to_string());
        }
    }
    out
}

/// Each lab node's uplink and tunnel address → (node, its namespace).
fn node_addrs(st: &serde_json::Value) -> BTreeMap<Ipv4Addr, (String, String)> {
    let mut out = BTreeMap::new();
    for n in st["nodes"].as_array().into_iter().flatten() {
        let name = n["name"].as_str().unwrap_or_default().to_string();
        let netns = n["netns"].as_str().unwrap_or_default().to_string();
        for k in ["uplinkIP", "tunnelIP"] {
            if let Some(a) = n[k].as_str().and_then(|a| a.parse().ok()) {
                out.insert(a, (name.clone(), netns.clone()));
            }
        }
    }
    out
}

/// Bring up a lab named for `base` and `dataplane`, laid out as the cluster of
/// `cluster` ([`crate::layout`]): the scenario's node addresses where the lab can
/// take them, and every pod asking for its scenario address. Then apply the cluster
/// and check that every pod that asked has its address (a lab that does not honour
/// a request it accepted fails here, it is not a skip).
pub fn stage(base: &str, cluster: &[PathBuf], encap: &str, dataplane: Dataplane) -> Scene {
    let fx = fixture(cluster);
    let pool = pool();
    let count = fx.nodes.len().max(2);
    let nodes = layout::plan_nodes(&fx, count, pool);
    if let Nodes::Default { why } = &nodes {
        eprintln!("{base}: the lab's own node addresses, not the scenario's: {why}");
    }
    let args = nodes.up_args(count);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let lab = Lab::up_laid_out(base, &refs, encap, dataplane);
    let st = lab.status();
    let underlay: Ipv4Net = st["underlay"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("status reports the underlay");
    let gateway: Ipv4Addr = st["gateway"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("status reports the gateway");
    let facts = LabFacts {
        pool,
        underlay,
        gateway,
        uplinks: node_addrs(&st)
            .into_iter()
            .filter(|(a, _)| underlay.contains(a))
            .map(|(a, (n, _))| (a, n))
            .collect(),
        claims: block_claims(&lab),
    };
    let pods = layout::plan_pods(&fx, &facts);
    for (pod, why) in &pods.refused {
        eprintln!("{base}: {pod} keeps an IPAM address: {why}");
    }
    let dir = tempfile::tempdir().unwrap();
    let files = rewrite(cluster, dir.path(), &fx, &BTreeMap::new());
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        if let Some(pinned) = layout::annotate(&text, &pods.pins) {
            std::fs::write(f, pinned).unwrap();
        }
    }
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    lab.apply(&refs);
    let ips = lab_pod_ips(&lab);
    for (pod, (ip, pin)) in &pods.pins {
        assert_eq!(
            ips.get(pod).map(String::as_str),
            Some(ip.to_string().as_str()),
            "{pod} asked for {ip} with {}",
            pin.annotation()
        );
    }
    // Read after the pods: a node's tunnel address is its lowest block's, which a
    // pod's requested block can change.
    let node_addrs = node_addrs(&lab.status());
    Scene {
        lab,
        fx,
        layout: Layout {
            nodes,
            pods,
            pool,
            underlay: Some((underlay, gateway)),
            node_addrs,
        },
        cluster: files,
        _dir: dir,
    }
}

/// A whole scenario in a lab of its own laid out as its cluster ([`stage`]): its
/// policies applied with addresses rewritten, and checked.
pub fn run(base: &str, name: &str, encap: &str, dataplane: Dataplane) -> (Scene, Report) {
    let e = load_expect(name);
    let (cluster, policies) = scenario_files(&e);
    let scene = stage(base, &cluster, encap, dataplane);
    let ips = lab_pod_ips(&scene.lab);
    let pdir = tempfile::tempdir().unwrap();
    let p = rewrite(&policies, pdir.path(), &scene.fx, &ips);
    let refs: Vec<&Path> = p.iter().map(PathBuf::as_path).collect();
    scene.lab.apply(&refs);
    let sctp = scene.lab.serves_sctp();
    let r = check(&scene.lab, name, &e, &scene.fx, &scene.layout, sctp);
    (scene, r)
}
