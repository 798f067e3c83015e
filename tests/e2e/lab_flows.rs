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
//! Allow records (opt-in, `sluice.dev/log-allowed`) on the demo: with the opt-in on
//! a namespace, every allowed cell yields one `allow` record per opted-in side
//! (denied cells still their deny record); on a policy, only what that policy
//! allows; with none, no allow record at all.
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
use sluice_policy::evaluate::{Resolved, Side, allowing_policies};
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

/// `flows-agent-<what>`, or `$SLUICE_E2E_LAB_PREFIX-<what>` so runs side by side
/// on one machine keep their labs apart.
fn lab_base(what: &str) -> String {
    let prefix = std::env::var("SLUICE_E2E_LAB_PREFIX").unwrap_or_else(|_| "flows-agent".into());
    format!("{prefix}-{what}")
}

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

/// The allow records one side of an allowed connection makes: one when an opt-in
/// covers it (the protected pod's namespace, or a policy that allowed it), naming
/// every policy that allowed it (docs/flows.md, "Allow records").
fn allow_side_record(
    cluster: &Cluster,
    e: &sluice_policy::Evaluation,
    ingress: bool,
) -> Option<(String, String, Vec<String>)> {
    let (side, end) = if ingress {
        (&e.ingress, &e.to)
    } else {
        (&e.egress, &e.from)
    };
    let Resolved::Pod { pod, .. } = end else {
        return None;
    };
    let (reason, opted, mut policies) = match side {
        Side::Allowed { .. } => {
            let by = allowing_policies(cluster, e, ingress);
            let opted = by
                .iter()
                .any(|k| cluster.policies[k].log_allowed.covers(ingress));
            (
                "allowed-by-rule",
                opted,
                by.iter().map(|k| k.to_string()).collect(),
            )
        }
        Side::ClusterPolicy { by } if by.action == Action::Accept => (
            "allowed-by-rule",
            cluster.cluster_policies[&by.policy]
                .log_allowed
                .covers(ingress),
            vec![format!("ClusterNetworkPolicy/{}", by.policy)],
        ),
        Side::NotIsolated => ("not-isolated", false, Vec::new()),
        _ => return None,
    };
    if !opted
        && !cluster
            .namespace_log_allowed(&pod.namespace)
            .covers(ingress)
    {
        return None;
    }
    policies.sort();
    let direction = if ingress { "ingress" } else { "egress" };
    Some((direction.into(), reason.into(), policies))
}

/// The record each denied cell of `truth` must yield, and the allow records each
/// allowed cell must (none unless an opt-in asks).
fn expected_records(cluster: &Cluster, truth: &Truth) -> Vec<Key> {
    let mut out = Vec::new();
    for ((from, to, port, protocol), allowed) in truth {
        let probe = Probe {
            from: from.parse::<Endpoint>().unwrap(),
            to: to.parse::<Endpoint>().unwrap(),
            port: *port,
            protocol: protocol.parse().unwrap(),
        };
        let e = evaluate(cluster, &probe).unwrap();
        if *allowed {
            for ingress in [false, true] {
                if let Some((direction, reason, policies)) = allow_side_record(cluster, &e, ingress)
                {
                    let (f, t, p) = (from.clone(), to.clone(), protocol.clone());
                    out.push((f, t, *port, p, direction, reason, policies));
                }
            }
            continue;
        }
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

/// Runs the matrix and compares the records made since with the blocked cells
/// (and the allowed cells an opt-in covers). Returns failures.
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
    let records = records_since(lab, &since);
    for r in &records {
        let allow = r.reason == "allowed-by-rule" || r.reason == "not-isolated";
        if (r.verdict == "allow") != allow {
            failures.push(format!(
                "{name}: verdict {} with reason {}",
                r.verdict, r.reason
            ));
        }
    }
    let mut got: Vec<Key> = records.iter().map(key).collect();
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
        "{name}: {} cells, {} blocked, {} records expected, {} made",
        want.len(),
        want.values().filter(|a| !**a).count(),
        want_records.len(),
        got.len()
    );
    failures
}

/// The demo again with allow records asked for: on the `shop` namespace's ingress,
/// then on two of its policies (one allowing nothing, so its pods' allows reach the
/// agent and are dropped there), then with the opt-ins removed again. Each is
/// checked like the deny records, and the per-policy case by hand as well.
fn check_allow_records(lab: &Lab, policy: &Path, predicted: &Truth) -> Vec<String> {
    let mut failures = Vec::new();
    let namespace = |value: Option<&str>| {
        let annotations = value
            .map(|v| format!(", annotations: {{sluice.dev/log-allowed: \"{v}\"}}"))
            .unwrap_or_default();
        // Block style at the top: a document starting with `{` is read as JSON.
        format!(
            "apiVersion: v1\nkind: Namespace\n\
             metadata: {{name: shop, labels: {{team: shop}}{annotations}}}\n"
        )
    };
    lab.apply_yaml(&namespace(Some("ingress")));
    settle(lab, |c| c.namespace_log_allowed("shop").ingress);
    failures.extend(check_records(
        lab,
        "demo, shop logs allowed ingress",
        predicted,
    ));

    lab.apply_yaml(&namespace(None));
    lab.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: default-deny, namespace: shop, annotations: {sluice.dev/log-allowed: \"true\"}}\n\
         spec: {podSelector: {}, policyTypes: [Ingress]}\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: api-from-web, namespace: shop, annotations: {sluice.dev/log-allowed: ingress}}\n\
         spec: {podSelector: {matchLabels: {app: api}}, \
         ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: api}]}]}\n",
    );
    settle(lab, |c| {
        !c.namespace_log_allowed("shop").ingress
            && c.policies
                .values()
                .filter(|p| p.log_allowed.ingress)
                .count()
                == 2
    });
    let since = rfc3339(SystemTime::now());
    failures.extend(check_records(
        lab,
        "demo, two policies log allowed",
        predicted,
    ));
    let allows: Vec<Key> = records_since(lab, &since)
        .iter()
        .filter(|r| r.verdict == "allow")
        .map(key)
        .collect();
    let web_to_api = (
        "shop/web".to_string(),
        "shop/api".to_string(),
        8080,
        "TCP".to_string(),
        "ingress".to_string(),
        "allowed-by-rule".to_string(),
        vec!["shop/api-from-web".to_string()],
    );
    if allows != [web_to_api.clone()] {
        failures.push(format!(
            "per-policy opt-in: wanted only {web_to_api:?}, got {allows:?}"
        ));
    }

    // Off again (the allow log chain goes away on both dataplanes): no allow record.
    lab.apply(&[policy]);
    settle(lab, |c| c.policies.values().all(|p| !p.log_allowed.ingress));
    failures.extend(check_records(lab, "demo, opt-ins removed", predicted));
    failures
}

/// Waits until the lab's manifests say what `ready` wants, then a little for the
/// agents to apply them (the matrix would otherwise race the new rules).
fn settle(lab: &Lab, ready: impl Fn(&Cluster) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ready(&lab_cluster(lab)) {
        assert!(std::time::Instant::now() < deadline, "opt-in never landed");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
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
        let lab = Lab::up_on(&lab_base("demo"), 2, &encap(), dataplane);
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
        failures.extend(check_allow_records(&lab, &policy, &predicted));
    }

    // The upstream tables.
    let lab = Lab::up_on(&lab_base("up"), 2, &encap(), dataplane);
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
