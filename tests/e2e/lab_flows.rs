//! Denied-connection records with real packets (issue 14): every blocked cell of a
//! truth table yields exactly one record naming the right `src`, `dst`, `port`,
//! `protocol`, `direction`, `reason` and `policies`, read back through `sluicectl
//! lab flows` about a second after the matrix; allowed cells yield none. On both
//! dataplanes.
//!
//! What each record must say comes from the policy engine's evaluator (the one
//! `sluicectl policy check` prints): the egress side's denial if it has one (the
//! packet never reaches the ingress side), else the ingress side's; `isolated` with
//! every isolating policy, or `denied-by-rule` with `ClusterNetworkPolicy/NAME`.
//!
//! CI runs the demo and a representative subset of the upstream tables (see
//! [`CI_CASES`]); `SLUICE_E2E_FLOW_CASES=all` runs all 42 (docs/flows.md), or a
//! comma-separated list of case prefixes some of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sluice_e2e::scenario;
use sluice_e2e::{Dataplane, Lab, Matrix, Truth, policy_data, sluicectl_out};
use sluice_node_files::flows::{FlowRecord, rfc3339};
use sluice_policy::evaluate::Side;
use sluice_policy::model::Action;
use sluice_policy::{Cluster, Endpoint, Probe, evaluate};

/// The upstream tables CI checks record by record, and why each:
/// - 02 default-deny-all: every cross-pod cell denied on egress (the largest load
///   on one log rule per group, and egress records on the source's node);
/// - 14 ports: ingress isolation where one port is allowed and the other logged;
/// - 15 stacked policies: a pod isolated by several policies (`policies` lists all);
/// - 20 deny egress from one pod: egress records from one chain only;
/// - 35 client egress deny wins over server allow: both sides policed, egress first.
const CI_CASES: &[&str] = &[
    "upstream-02",
    "upstream-14",
    "upstream-15",
    "upstream-20",
    "upstream-35",
];

fn encap() -> String {
    std::env::var("SLUICE_E2E_ENCAP").unwrap_or_else(|_| "auto".into())
}

#[test]
fn every_blocked_cell_yields_exactly_one_true_record_on_nftables() {
    flows_hold(Dataplane::Nftables);
}

#[test]
fn every_blocked_cell_yields_exactly_one_true_record_on_iptables() {
    flows_hold(Dataplane::Iptables);
}

/// (src, dst, port, protocol, direction, reason, sorted policies).
type Key = (String, String, u16, String, String, String, Vec<String>);

fn key(r: &FlowRecord) -> Key {
    let mut p = r.policies.clone();
    p.sort();
    (
        r.src.clone(),
        r.dst.clone(),
        r.port,
        r.protocol.clone(),
        r.direction.clone(),
        r.reason.clone(),
        p,
    )
}

/// The lab's manifests as the agents read them.
fn lab_cluster(lab: &Lab) -> Cluster {
    let mut cluster = Cluster::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(lab.manifests_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        sluice_policy::read_documents(&f.display().to_string(), &text)
            .unwrap()
            .add_to(&mut cluster);
    }
    cluster
}

/// The record a denied side makes, if it denies.
fn side_record(side: &Side, direction: &str) -> Option<(String, String, Vec<String>)> {
    let names = |v: Vec<String>| {
        let mut v = v;
        v.sort();
        v
    };
    match side {
        Side::Denied { isolating } => Some((
            direction.into(),
            "isolated".into(),
            names(isolating.iter().map(ToString::to_string).collect()),
        )),
        Side::ClusterPolicy { by } if by.action == Action::Deny => Some((
            direction.into(),
            "denied-by-rule".into(),
            vec![format!("ClusterNetworkPolicy/{}", by.policy)],
        )),
        Side::Held { .. } => Some((
            direction.into(),
            "pod-not-yet-programmed".into(),
            Vec::new(),
        )),
        _ => None,
    }
}

/// The one record each denied cell of `truth` must yield.
fn expected_records(cluster: &Cluster, truth: &Truth) -> Vec<Key> {
    let mut out = Vec::new();
    for ((from, to, port, protocol), allowed) in truth {
        if *allowed {
            continue;
        }
        let probe = Probe {
            from: from.parse::<Endpoint>().unwrap(),
            to: to.parse::<Endpoint>().unwrap(),
            port: *port,
            protocol: protocol.parse().unwrap(),
        };
        let e = evaluate(cluster, &probe).unwrap();
        let (direction, reason, policies) = side_record(&e.egress, "egress")
            .or_else(|| side_record(&e.ingress, "ingress"))
            .unwrap_or_else(|| {
                panic!("{from} -> {to} {protocol}/{port} blocked but no side denies")
            });
        out.push((
            from.clone(),
            to.clone(),
            *port,
            protocol.clone(),
            direction,
            reason,
            policies,
        ));
    }
    out.sort();
    out
}

fn records_since(lab: &Lab, since: &str) -> Vec<FlowRecord> {
    sluicectl_out(&[
        "lab", "flows", "--name", &lab.name, "--since", since, "-o", "json",
    ])
    .lines()
    .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("record {l:?}: {e}")))
    .collect()
}

/// Runs the matrix and compares the records made since with the blocked cells.
/// Returns failures.
fn check_records(lab: &Lab, name: &str, want: &Truth) -> Vec<String> {
    let since = rfc3339(SystemTime::now());
    let m: Matrix = lab.matrix();
    let got_truth = m.truth();
    let mut failures: Vec<String> = sluice_e2e::differences(want, &got_truth)
        .into_iter()
        .map(|d| format!("{name}: {d}"))
        .collect();
    if !failures.is_empty() {
        return failures;
    }
    // Within one second of the last probe.
    std::thread::sleep(Duration::from_secs(1));
    let cluster = lab_cluster(lab);
    let want_records = expected_records(&cluster, want);
    let mut got: Vec<Key> = records_since(lab, &since).iter().map(key).collect();
    got.sort();
    // Multisets: each expected once, nothing else.
    let mut left: BTreeMap<Key, i64> = BTreeMap::new();
    for k in &want_records {
        *left.entry(k.clone()).or_default() += 1;
    }
    for k in &got {
        *left.entry(k.clone()).or_default() -= 1;
    }
    for (k, n) in left {
        match n {
            0 => {}
            n if n > 0 => failures.push(format!("{name}: missing record {k:?}")),
            n => failures.push(format!("{name}: {} unexpected record(s) {k:?}", -n)),
        }
    }
    eprintln!(
        "{name}: {} cells, {} blocked, {} records",
        want.len(),
        want_records.len(),
        got.len()
    );
    failures
}

/// The demo's manifests, from scripts/demo.sh itself.
fn demo_files(dir: &Path) -> (PathBuf, PathBuf) {
    let script =
        std::fs::read_to_string(sluice_e2e::workspace_root().join("scripts/demo.sh")).unwrap();
    let heredoc = |file: &str| -> String {
        let start = format!("cat > \"$WORK/{file}\" <<'YAML'\n");
        let from = script.find(&start).unwrap() + start.len();
        let len = script[from..].find("\nYAML\n").unwrap();
        script[from..from + len].to_string()
    };
    let (c, p) = (dir.join("cluster.yaml"), dir.join("policy.yaml"));
    std::fs::write(&c, heredoc("cluster.yaml")).unwrap();
    std::fs::write(&p, heredoc("policy.yaml")).unwrap();
    (c, p)
}

fn flows_hold(dataplane: Dataplane) {
    if !dataplane.runs("lab_flows") {
        return;
    }
    let mut failures = Vec::new();

    // The demo: its truth is what the evaluator predicts (the lab must agree).
    {
        let lab = Lab::up_on("flows-agent-demo", 2, &encap(), dataplane);
        let dir = tempfile::tempdir().unwrap();
        let (cluster, policy) = demo_files(dir.path());
        lab.apply(&[&cluster]);
        lab.apply(&[&policy]);
        let m = lab.matrix();
        let predicted = sluice_e2e::predicted(&[&lab.manifests_dir()], &m);
        failures.extend(check_records(&lab, "demo", &predicted));
        // A sample for docs/flows.md and the closing note.
        eprintln!(
            "{}",
            sluicectl_out(&["lab", "flows", "--name", &lab.name, "--limit", "4"])
        );
    }

    // The upstream tables.
    let lab = Lab::up_on("flows-agent-up", 2, &encap(), dataplane);
    let cluster = policy_data("upstream-cluster/cluster.yaml");
    lab.apply(&[&cluster]);
    let fx = scenario::fixture(&[cluster]);
    let ips = scenario::lab_pod_ips(&lab);
    let protocols: Vec<&str> = if lab.serves_sctp() {
        vec!["TCP", "UDP", "SCTP"]
    } else {
        vec!["TCP", "UDP"]
    };
    // SLUICE_E2E_FLOW_CASES=all, or a comma-separated list of case prefixes (the
    // QEMU guest runs one); CI_CASES otherwise.
    let chosen = std::env::var("SLUICE_E2E_FLOW_CASES").ok();
    let prefixes: Vec<String> = match chosen.as_deref() {
        None => CI_CASES.iter().map(|c| c.to_string()).collect(),
        Some("all") => vec![String::new()],
        Some(list) => list.split(',').map(str::to_string).collect(),
    };
    let cases: Vec<String> = scenario::upstream_cases()
        .into_iter()
        .filter(|c| prefixes.iter().any(|p| c.starts_with(p.as_str())))
        .collect();
    assert!(
        cases.len() >= prefixes.len(),
        "{prefixes:?} chose {cases:?}"
    );
    for case in &cases {
        let e = scenario::load_expect(case);
        if e.matrix.is_empty() {
            continue;
        }
        let (_, policies) = scenario::scenario_files(&e);
        let dir = tempfile::tempdir().unwrap();
        let files = scenario::rewrite(&policies, dir.path(), &fx, &ips);
        let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        lab.apply(&refs);
        let pods: Vec<String> = ips.keys().cloned().collect();
        let mut want = Truth::new();
        for spec in &e.matrix {
            want.extend(scenario::expected(spec, &pods, &protocols));
        }
        failures.extend(check_records(&lab, case, &want));
        lab.delete(&refs);
    }
    assert!(
        failures.is_empty(),
        "{}: records vs blocked cells:\n{}",
        dataplane.as_str(),
        failures.join("\n")
    );
}
