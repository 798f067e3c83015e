//! `sluicectl policy check`: the reference evaluator on manifests, without a kernel.
//!
//! ```text
//! sluicectl policy check -f PATH [-f PATH ...] \
//!     --from NS/POD|ip:ADDR|node:NAME --to NS/POD|ip:ADDR \
//!     --port N [--protocol TCP|UDP|SCTP] [-o text|json]
//! sluicectl policy check -f PATH ... --probes FILE [-o json]
//! sluicectl policy check [--kubeconfig PATH] [--context NAME] --from … (the live cluster)
//! ```
//! JSON for one probe is `{"verdict":"allow"|"deny","reason":"..."}`; for `--probes`
//! an array of those in input order. When a ClusterNetworkPolicy rule took part in a
//! side, that object also has `egress_cluster_policy` / `ingress_cluster_policy`:
//! `{"decided_by": RULE|null, "passed_by": [RULE...]}`, RULE being
//! `{"tier","policy","priority","rule","rule_name","action"}`. Exit 0 whenever the check ran, whatever the
//! verdicts; non-zero on bad input.
//!
//! Manifests are read as the agent reads them: a malformed NetworkPolicy is a
//! warning naming file and object, and the pods it selects are denied both ways
//! (held fail-closed, as on a node) with a reason naming the policy. A document
//! that is not YAML/JSON is an error naming the file and the document's number.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde::Deserialize;
use sluice_policy::Protocol;
use sluice_policy::evaluate::{
    ClusterRuleRef, Endpoint, Evaluation, Probe, Resolved, Side, evaluate, held_text,
};

const AFTER_HELP: &str = "\
Every probe is the first packet of a new connection (replies are always allowed).
Endpoints: NS/POD, ip:ADDR (an address owned by a pod or node is that pod or node),
node:NAME (source only: the node itself, e.g. kubelet). Name the backend pod, not a
Service's ClusterIP: policy sees packets after kube-proxy's DNAT.

NodePort and ipBlock: with externalTrafficPolicy: Local the packet reaches the pod
with the client's address, so `--from ip:CLIENT` is what the pod sees. With
externalTrafficPolicy: Cluster a node that forwards the connection SNATs it to its
own address: check `--from node:FORWARDING-NODE` instead. Allowing node or tunnel
addresses in an ipBlock admits every forwarded flow, not just the client's.";

#[derive(clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    #[command(flatten)]
    source: super::Source,
    /// Source: NS/POD, ip:ADDR or node:NAME.
    #[arg(
        long,
        value_name = "ENDPOINT",
        required_unless_present = "probes",
        conflicts_with = "probes"
    )]
    from: Option<Endpoint>,
    /// Destination: NS/POD or ip:ADDR.
    #[arg(
        long,
        value_name = "ENDPOINT",
        required_unless_present = "probes",
        conflicts_with = "probes"
    )]
    to: Option<Endpoint>,
    /// Destination port.
    #[arg(long, required_unless_present = "probes", conflicts_with = "probes")]
    port: Option<u16>,
    /// TCP (default), UDP or SCTP.
    #[arg(long, default_value = "TCP", conflicts_with = "probes")]
    protocol: Protocol,
    /// JSON lines, one probe each: {"from":..,"to":..,"port":..,"protocol":..}
    /// (protocol optional, TCP by default); `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    probes: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

/// One line of a `--probes` file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeLine {
    from: String,
    to: String,
    port: u16,
    #[serde(default)]
    protocol: Option<String>,
}

pub fn exec(args: Args) -> anyhow::Result<ExitCode> {
    let (cluster, warnings) = super::load_cluster(&args.source)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }

    let probes = match &args.probes {
        Some(path) => read_probes(path)?,
        None => {
            // clap guarantees these when --probes is absent.
            let (Some(from), Some(to), Some(port)) = (args.from, args.to, args.port) else {
                bail!("--from, --to and --port are required without --probes");
            };
            vec![Probe {
                from,
                to,
                port,
                protocol: args.protocol,
            }]
        }
    };

    let evaluations = probes
        .iter()
        .enumerate()
        .map(|(i, p)| {
            evaluate(&cluster, p).with_context(|| {
                if args.probes.is_some() {
                    format!("probe {} ({} -> {})", i + 1, p.from, p.to)
                } else {
                    format!("{} -> {}", p.from, p.to)
                }
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => {
            let items: Vec<serde_json::Value> = evaluations
                .iter()
                .map(|e| {
                    let mut v =
                        serde_json::json!({"verdict": e.verdict.as_str(), "reason": e.reason()});
                    // Added only when a ClusterNetworkPolicy took part, so the
                    // NetworkPolicy-only output stays exactly as it was.
                    for (key, side, passed) in [
                        ("egress", &e.egress, &e.egress_passed),
                        ("ingress", &e.ingress, &e.ingress_passed),
                    ] {
                        if let Some(j) = cluster_json(side, passed) {
                            v[format!("{key}_cluster_policy")] = j;
                        }
                    }
                    v
                })
                .collect();
            let value = if args.probes.is_some() {
                serde_json::Value::Array(items)
            } else {
                items.into_iter().next().unwrap_or_default()
            };
            writeln!(out, "{value}")?;
        }
        Output::Text => {
            for (i, e) in evaluations.iter().enumerate() {
                if i > 0 {
                    writeln!(out)?;
                }
                write!(out, "{}", text(e))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The ClusterNetworkPolicy part of one side for JSON: the rule that decided
/// (`decided_by`) and the Pass rules on the way (`passed_by`); `None` when no
/// ClusterNetworkPolicy rule matched.
fn cluster_json(side: &Side, passed: &[ClusterRuleRef]) -> Option<serde_json::Value> {
    let rule = |r: &ClusterRuleRef| {
        serde_json::json!({
            "tier": r.tier.as_str(),
            "policy": r.policy,
            "priority": r.priority,
            "rule": r.rule,
            "rule_name": r.name,
            "action": r.action.as_str(),
        })
    };
    let decided = match side {
        Side::ClusterPolicy { by } => Some(rule(by)),
        _ => None,
    };
    if decided.is_none() && passed.is_empty() {
        return None;
    }
    Some(serde_json::json!({
        "decided_by": decided,
        "passed_by": passed.iter().map(rule).collect::<Vec<_>>(),
    }))
}

fn read_probes(path: &PathBuf) -> anyhow::Result<Vec<Probe>> {
    let name = path.display().to_string();
    let reader: Box<dyn BufRead> = if name == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {name}"))?,
        ))
    };
    let mut probes = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {name}"))?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{name}:{}", i + 1);
        let raw: ProbeLine = serde_json::from_str(line).with_context(at)?;
        probes.push(Probe {
            from: raw.from.parse().with_context(at)?,
            to: raw.to.parse().with_context(at)?,
            port: raw.port,
            protocol: match raw.protocol {
                None => Protocol::Tcp,
                Some(p) => p.parse().with_context(at)?,
            },
        });
    }
    Ok(probes)
}

fn list(policies: &[sluice_policy::NamespacedName]) -> String {
    policies
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn side_text(side: &Side, direction: &str, endpoint: &Resolved) -> String {
    match side {
        Side::NotPoliced => format!("not policed ({endpoint} is not a pod a policy can select)"),
        Side::NotIsolated => format!("not isolated (no policy selects it for {direction})"),
        Side::OwnNode => "allowed: from the pod's own node (always)".to_string(),
        Side::Loopback => "allowed: loopback (a pod can always reach itself)".to_string(),
        Side::Allowed {
            isolating,
            by,
            also,
        } => {
            let more = if *also > 0 {
                format!(" (and {also} more rule(s))")
            } else {
                String::new()
            };
            format!(
                "isolated by {}\n           allowed by {} {direction}[{}]{more}",
                list(isolating),
                by.policy,
                by.rule
            )
        }
        Side::Denied { isolating } => format!(
            "isolated by {}\n           DENIED: no {direction} rule of these policies matches",
            list(isolating)
        ),
        Side::Held { rejected } => format!("DENIED: {}", held_text(rejected)),
        Side::ClusterPolicy { by } => {
            let verdict = if side.allows() { "allowed" } else { "DENIED" };
            format!("{verdict} by {}", by.describe(direction))
        }
    }
}

/// Lines naming the ClusterNetworkPolicy Pass rules that handed a side to the next
/// tier, so a reader sees why a NetworkPolicy (or the baseline) decided.
fn passed_lines(passed: &[ClusterRuleRef], direction: &str) -> String {
    passed
        .iter()
        .map(|p| format!("           passed on by {}\n", p.describe(direction)))
        .collect()
}

/// The human form: verdict first, then each side with its policies and rule.
fn text(e: &Evaluation) -> String {
    let mut s = format!(
        "{}: {} -> {} {}/{}\n",
        e.verdict.as_str().to_uppercase(),
        e.from,
        e.to,
        e.protocol,
        e.port
    );
    s += &format!("  egress:  {}\n", side_text(&e.egress, "egress", &e.from));
    s += &passed_lines(&e.egress_passed, "egress");
    s += &format!("  ingress: {}\n", side_text(&e.ingress, "ingress", &e.to));
    s += &passed_lines(&e.ingress_passed, "ingress");
    if let (Side::Denied { .. }, Resolved::Node { node, .. }) = (&e.ingress, &e.from) {
        s += &format!(
            "  note: traffic from node {node} is not the client's. A NodePort connection \
forwarded by {node} (externalTrafficPolicy: Cluster) arrives SNATed to it; \
externalTrafficPolicy: Local keeps the client's address for ipBlock rules.\n"
        );
    }
    s
}
