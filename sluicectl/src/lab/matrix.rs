//! `sluicectl lab matrix`: every pod probes every pod on every port the destination
//! declares, with real packets, and the result is printed as a truth table (rows
//! are sources, columns destinations; `.` connected, `X` blocked, as in the
//! upstream Kubernetes e2e reachability tables) or as JSON.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use super::probe::{self, Resolved, Verdict};
use super::state::{self, LabState, Protocol};
use super::{LabError, Output};

#[derive(clap::Args)]
pub struct MatrixArgs {
    #[arg(long)]
    pub name: String,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// How long a probe waits before it counts as blocked.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Protocol,
    /// `connected`, `blocked`, or absent with `error` set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Verdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Matrix {
    pub pods: Vec<String>,
    pub probes: Vec<Cell>,
}

/// The probes a matrix sends: pure, from the lab state.
pub fn plan(st: &LabState, timeout: Duration) -> Vec<(Cell, Resolved)> {
    let mut out = Vec::new();
    for dst in st.pods.values() {
        for port in &dst.ports {
            for src in st.pods.values() {
                out.push((
                    Cell {
                        from: src.key(),
                        to: dst.key(),
                        port: port.port,
                        protocol: port.protocol,
                        result: None,
                        latency_ms: None,
                        error: None,
                    },
                    Resolved {
                        source_netns: src.netns.clone(),
                        dest: std::net::SocketAddrV4::new(dst.ip, port.port),
                        protocol: port.protocol,
                        timeout,
                    },
                ));
            }
        }
    }
    out
}

pub fn run(st: &LabState, timeout: Duration) -> Matrix {
    let planned = plan(st, timeout);
    let resolved: Vec<Resolved> = planned.iter().map(|(_, r)| r.clone()).collect();
    let results = probe::send_all_retrying(&resolved, probe::PARALLEL);
    let probes = planned
        .into_iter()
        .zip(results)
        .map(|((mut cell, _), r)| {
            match r {
                Ok(o) => {
                    cell.result = Some(o.result);
                    cell.latency_ms = Some(o.latency_ms);
                }
                Err(e) => cell.error = Some(e.to_string()),
            }
            cell
        })
        .collect();
    Matrix {
        pods: st.pods.keys().cloned().collect(),
        probes,
    }
}

/// The text table, one per (protocol, port).
pub fn render_text(m: &Matrix) -> String {
    let ports: BTreeSet<(Protocol, u16)> = m.probes.iter().map(|c| (c.protocol, c.port)).collect();
    let width = m.pods.iter().map(String::len).max().unwrap_or(1).max(4);
    let mut s = String::new();
    for (proto, port) in ports {
        s.push_str(&format!(
            "{proto}/{port}  (rows: from, columns: to; . connected, X blocked, E error)\n"
        ));
        // only the destinations that serve this port are columns
        let cols: Vec<&String> = m
            .pods
            .iter()
            .filter(|p| {
                m.probes
                    .iter()
                    .any(|c| &c.to == *p && c.protocol == proto && c.port == port)
            })
            .collect();
        s.push_str(&format!("{:width$}", ""));
        for p in &cols {
            s.push_str(&format!(" {p:>width$}"));
        }
        s.push('\n');
        for from in &m.pods {
            s.push_str(&format!("{from:width$}"));
            for to in &cols {
                let to = *to;
                let c = m.probes.iter().find(|c| {
                    &c.from == from && &c.to == to && c.protocol == proto && c.port == port
                });
                let mark = match c {
                    None => "-",
                    Some(c) => match (&c.result, &c.error) {
                        (Some(Verdict::Connected), _) => ".",
                        (Some(Verdict::Blocked), _) => "X",
                        _ => "E",
                    },
                };
                s.push_str(&format!(" {mark:>width$}"));
            }
            s.push('\n');
        }
        s.push('\n');
    }
    for c in m.probes.iter().filter(|c| c.error.is_some()) {
        s.push_str(&format!(
            "error: {} -> {} {}/{}: {}\n",
            c.from,
            c.to,
            c.protocol,
            c.port,
            c.error.as_deref().unwrap_or_default()
        ));
    }
    s
}

pub fn exec(args: MatrixArgs) -> anyhow::Result<ExitCode> {
    let st = state::load(&args.name)?;
    if st.pods.is_empty() {
        return Err(
            LabError::Usage(format!("lab {} has no pods (lab apply first)", st.name)).into(),
        );
    }
    let m = run(&st, Duration::from_millis(args.timeout_ms));
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&m)?),
        Output::Text => print!("{}", render_text(&m)),
    }
    if m.probes.iter().any(|c| c.error.is_some()) {
        eprintln!("sluicectl lab matrix: some probes could not be sent");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(from: &str, to: &str, r: Option<Verdict>) -> Cell {
        Cell {
            from: from.into(),
            to: to.into(),
            port: 80,
            protocol: Protocol::Tcp,
            error: if r.is_none() {
                Some("boom".into())
            } else {
                None
            },
            result: r,
            latency_ms: Some(0.1),
        }
    }

    #[test]
    fn plan_probes_every_pod_to_every_declared_port_of_each_destination() {
        let mut st: LabState = serde_json::from_value(serde_json::json!({
            "name": "t", "encap_requested": "auto", "encap": "vxlan",
            "pool": "10.244.0.0/16", "underlay_cidr": "192.168.77.0/24",
            "gateway": "192.168.77.1", "underlay_netns": "t-underlay", "bridge": "br0",
            "nodes": []
        }))
        .unwrap();
        for (name, ports) in [("a", vec![80u16, 81]), ("b", vec![80]), ("c", vec![])] {
            let pod: crate::lab::state::PodState = serde_json::from_value(serde_json::json!({
                "namespace": "x", "name": name, "uid": "u", "node": "node-1",
                "netns": format!("t-x-{name}"), "container_id": "c", "ip": "10.244.0.9",
                "ports": ports.iter().map(|p| serde_json::json!({"port": p, "protocol": "TCP"})).collect::<Vec<_>>(),
            }))
            .unwrap();
            st.pods.insert(pod.key(), pod);
        }
        let plan = plan(&st, Duration::from_millis(5));
        // 3 sources × (2 ports of a + 1 of b); c serves nothing so is no destination
        assert_eq!(plan.len(), 9);
        assert!(plan.iter().all(|(c, _)| c.to != "x/c"));
        assert_eq!(plan.iter().filter(|(c, _)| c.from == "x/c").count(), 3);
    }

    #[test]
    fn text_table_marks_connected_blocked_and_errors_distinctly() {
        let m = Matrix {
            pods: vec!["x/a".into(), "x/b".into()],
            probes: vec![
                cell("x/a", "x/a", Some(Verdict::Connected)),
                cell("x/a", "x/b", Some(Verdict::Blocked)),
                cell("x/b", "x/a", None),
            ],
        };
        let t = render_text(&m);
        let rows: Vec<&str> = t.lines().collect();
        assert!(rows[0].starts_with("TCP/80"));
        assert_eq!(
            rows[2].split_whitespace().collect::<Vec<_>>(),
            ["x/a", ".", "X"]
        );
        assert_eq!(
            rows[3].split_whitespace().collect::<Vec<_>>(),
            ["x/b", "E", "-"]
        );
        assert!(t.contains("error: x/b -> x/a TCP/80: boom"));
    }
}
