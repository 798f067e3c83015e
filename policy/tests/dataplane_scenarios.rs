//! The upstream e2e cases and seed scenarios policy-core wrote in `tests/data/` (each
//! `*.expect.yaml` names the manifest directories of its cluster), run through the
//! compiled rules of every node: for every pair of endpoints (every pod, every node,
//! the addresses the expectations mention) on the ports and protocols that matter, the
//! classifier must agree with the reference evaluator, which `semantics_scenarios.rs`
//! holds to the expected verdicts. So the dataplane meets the same expectations.

use std::collections::BTreeSet;

use sluice_policy::evaluate::{Endpoint, Probe, Verdict, evaluate};
use sluice_policy::model::*;

mod dataplane_support;
use dataplane_support::{Expect, compile_all_nodes, dataplane_allows, load, mentioned_endpoints};
use sluice_policy::dataplane::DataplaneKind;

#[test]
fn compiled_rules_meet_every_scenario_expectation_with_iptables() {
    scenarios(DataplaneKind::Iptables);
}

#[test]
fn compiled_rules_meet_every_scenario_expectation_with_nftables() {
    scenarios(DataplaneKind::Nftables);
}

fn scenarios(dataplane: DataplaneKind) {
    let (dir, expects) = dataplane_support::scenario_files("");
    assert!(
        expects.len() >= 10,
        "expected the scenario files in {}",
        dir.display()
    );

    let mut failures = Vec::new();
    let (mut judged, mut denied) = (0usize, 0usize);
    for path in &expects {
        let text = std::fs::read_to_string(path).unwrap();
        let expect: Expect = serde_yaml_ng::from_str(&text).unwrap();
        let cluster = load(&dir, &expect.manifests);
        let rulesets = compile_all_nodes(&cluster, dataplane);

        let mut froms: Vec<Endpoint> = cluster.pods.keys().cloned().map(Endpoint::Pod).collect();
        let mut tos = froms.clone();
        froms.extend(cluster.nodes.keys().map(|n| Endpoint::Node(n.clone())));
        for e in mentioned_endpoints(&text) {
            let e: Endpoint = e.parse().unwrap();
            if !matches!(e, Endpoint::Node(_)) {
                tos.push(e.clone());
            }
            froms.push(e);
        }
        // Every port a policy or a pod names, plus one nobody does.
        let mut ports: BTreeSet<u16> = [80, 81, 9999].into();
        for pod in cluster.pods.values() {
            ports.extend(pod.ports.iter().map(|p| p.port));
        }
        for p in cluster.policies.values() {
            for r in p.ingress.iter().chain(&p.egress) {
                if let Ports::Listed(list) = &r.ports {
                    for pp in list {
                        if let PortMatch::Numbers { start, end } = pp.port {
                            ports.extend([start, end, end.saturating_add(1)]);
                        }
                    }
                }
            }
        }
        for p in cluster.cluster_policies.values() {
            for r in p.ingress.iter().chain(&p.egress) {
                if let Ports::Listed(list) = &r.ports {
                    for pp in list {
                        if let PortMatch::Numbers { start, end } = pp.port {
                            ports.extend([
                                start.saturating_sub(1),
                                start,
                                end,
                                end.saturating_add(1),
                            ]);
                        }
                    }
                }
            }
        }
        ports.remove(&0);

        for from in &froms {
            for to in &tos {
                if from == to {
                    continue;
                }
                // ICMP has no port: one probe of it per pair is enough.
                let probes = ports
                    .iter()
                    .flat_map(|&port| Protocol::ALL.map(|protocol| (port, protocol)))
                    .chain([(0, Protocol::Icmp)]);
                for (port, protocol) in probes {
                    let probe = Probe {
                        from: from.clone(),
                        to: to.clone(),
                        port,
                        protocol,
                    };
                    let Ok(eval) = evaluate(&cluster, &probe) else {
                        continue;
                    };
                    let Some((allowed, traces)) =
                        dataplane_allows(&cluster, &rulesets, &eval.from, &eval.to, protocol, port)
                    else {
                        continue;
                    };
                    judged += 1;
                    denied += usize::from(!allowed);
                    if allowed != (eval.verdict == Verdict::Allow) {
                        failures.push(format!(
                                "{}: {} -> {} {protocol}/{port}: evaluator {} ({}), dataplane {allowed}\n  {}",
                                path.file_name().unwrap().to_string_lossy(),
                                from,
                                to,
                                eval.verdict,
                                eval.reason(),
                                traces.join("\n  ")
                            ));
                    }
                }
            }
        }
    }
    assert!(
        judged > 10_000 && denied > 1_000,
        "too few probes judged: {judged} ({denied} denied)"
    );
    assert!(
        failures.is_empty(),
        "{} disagreements, first:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
    eprintln!(
        "{}: {} scenario files, {judged} connections judged, {denied} denied",
        dataplane.as_str(),
        expects.len()
    );
}
