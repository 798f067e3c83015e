//! The real `sluice-agent` on every lab node, with the directory datastore.
//!
//! Each agent runs inside its node namespace, watches the lab's shared manifests
//! directory (the Nodes, Namespaces, Pods, policies and Services `lab apply` writes),
//! claims blocks through the shared directory block store, and writes its readiness
//! to the node root's `run/sluice/agent-status.json` (docs/node-files.md), which is
//! what `up` waits on and `status` reports.

use std::path::Path;
use std::time::{Duration, Instant};

use sluice_node_files::paths::NodePaths;

use super::state::{LabPaths, LabState, NodeState};
use super::{LabError, netns};

/// The health/metrics port inside each node namespace (namespaces do not share
/// ports, so every node can use the same one).
pub const HEALTH_PORT: u16 = 9099;

pub fn status_file(node: &NodeState) -> std::path::PathBuf {
    NodePaths::under(&node.root).agent_status_file
}

/// The agent's command line for a node: every per-node path moved under the node's
/// root; the manifests directory and the block store are shared by all nodes.
pub fn command_line(st: &LabState, node: &NodeState, paths: &LabPaths) -> Vec<String> {
    let files = NodePaths::under(&node.root);
    let r = |p: &Path| p.display().to_string();
    let mut v: Vec<String> = vec![
        "run".into(),
        "--node-name".into(),
        node.name.clone(),
        "--datastore".into(),
        "directory".into(),
        "--manifests-dir".into(),
        paths.manifests().display().to_string(),
        "--block-store-dir".into(),
        paths.blocks().display().to_string(),
        "--pool".into(),
        st.pool.to_string(),
        "--node-ip".into(),
        node.uplink_ip.to_string(),
        "--encapsulation".into(),
        st.encap.as_str().into(),
        "--nat-outgoing".into(),
        st.nat_outgoing.to_string(),
        "--iptables-backend".into(),
        st.iptables_backend.as_str().into(),
        "--dataplane".into(),
        st.dataplane.as_str().into(),
        "--status-file".into(),
        r(&files.agent_status_file),
        "--agent-socket".into(),
        r(&files.agent_socket),
        "--mtu-file".into(),
        r(&files.mtu_file),
        "--ipam-state-dir".into(),
        r(&files.ipam_state_dir),
        "--node-blocks-file".into(),
        r(&files.node_blocks_file),
        "--flow-log-file".into(),
        r(&files.flow_log_file),
        "--health-addr".into(),
        format!("127.0.0.1:{HEALTH_PORT}"),
    ];
    // The lab changes manifests in bursts and then probes: react quickly.
    v.extend(["--poll-ms", "100", "--coalesce-ms", "50"].map(String::from));
    v
}

pub fn start(
    st: &LabState,
    node: &NodeState,
    agent: &Path,
    paths: &LabPaths,
) -> Result<u32, LabError> {
    let log = paths.logs().join(format!("agent-{}.log", node.name));
    let args = command_line(st, node, paths);
    netns::spawn_daemon(
        &node.netns,
        agent,
        &args,
        &[("RUST_LOG".into(), "info".into())],
        &log,
    )
}

pub use sluice_node_files::status::AgentStatus;

/// The node's agent health as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    pub running: bool,
    pub ready: bool,
    pub reason: String,
    /// The policy dataplane the agent chose and why (its status file says).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<String>,
}

pub fn read_status(node: &NodeState) -> Option<AgentStatus> {
    let text = std::fs::read_to_string(status_file(node)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn health(node: &NodeState) -> Health {
    let running = node.agent_pid.is_some_and(netns::alive);
    match read_status(node) {
        Some(s) => Health {
            running,
            ready: running && s.ready,
            dataplane: s.dataplane,
            reason: if running {
                s.reason
            } else {
                "agent process is not running".into()
            },
        },
        None => Health {
            running,
            ready: false,
            dataplane: None,
            reason: if running {
                "no status file yet".into()
            } else {
                "agent process is not running".into()
            },
        },
    }
}

/// Wait until every node's agent reports ready; an agent that exits is an error
/// naming its log, not a timeout.
pub fn wait_ready(st: &LabState, timeout: Duration) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    let paths = LabPaths::new(&st.name);
    loop {
        let mut waiting = Vec::new();
        for n in &st.nodes {
            let h = health(n);
            if !h.running {
                let log = paths.logs().join(format!("agent-{}.log", n.name));
                let tail = std::fs::read_to_string(&log)
                    .map(|t| {
                        t.lines()
                            .rev()
                            .take(5)
                            .collect::<Vec<_>>()
                            .into_iter()
                            .rev()
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default();
                return Err(LabError::AgentDied(n.name.clone(), log, tail));
            }
            if !h.ready {
                waiting.push(format!("{}: {}", n.name, h.reason));
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LabError::NotReady(waiting.join("; ")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent's `/metrics` inside its node namespace (plain HTTP/1.0, one request).
pub fn scrape(node: &NodeState) -> Option<String> {
    use std::io::{Read, Write};
    netns::on_thread_in(&node.netns, || {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], HEALTH_PORT));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        Some(body)
    })
    .ok()
    .flatten()
}

/// A sample's value from Prometheus text (`name value` or `name{..} value`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        let n = n.split('{').next()?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

pub const SYNCS: &str = "sluice_agent_syncs_total";
pub const WAITING: &str = "sluice_agent_pods_waiting_for_policy";

/// Every agent's sync counter now (missing agents count as 0).
pub fn sync_counts(st: &LabState) -> Vec<f64> {
    st.nodes
        .iter()
        .map(|n| scrape(n).and_then(|t| metric(&t, SYNCS)).unwrap_or(0.0))
        .collect()
}

/// How long every agent's sync counter must stay still before the lab calls the
/// agents settled: longer than one directory poll plus one coalescing pause (the
/// `--poll-ms 100 --coalesce-ms 50` the lab starts agents with), so a file written
/// just before the quiet period began has been seen and applied.
pub const QUIET: Duration = Duration::from_millis(300);

/// After a change to the manifests: wait until every agent has run a sync since
/// `before`, holds no pod waiting for policy, and has been quiet for [`QUIET`]. A
/// sync still running from an earlier change also bumps the counter, hence the
/// quiet period. An agent with nothing to do may not sync at all, so running out of
/// time is not an error; the caller's probes tell the truth either way.
pub fn wait_synced(st: &LabState, before: &[f64], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut last: Vec<f64> = before.to_vec();
    let mut last_change = Instant::now();
    loop {
        let now: Vec<(f64, f64)> = st
            .nodes
            .iter()
            .map(|n| {
                scrape(n)
                    .map(|t| {
                        (
                            metric(&t, SYNCS).unwrap_or(0.0),
                            metric(&t, WAITING).unwrap_or(0.0),
                        )
                    })
                    .unwrap_or((0.0, 1.0))
            })
            .collect();
        let counts: Vec<f64> = now.iter().map(|c| c.0).collect();
        if counts != last {
            last = counts.clone();
            last_change = Instant::now();
        }
        let synced = counts.iter().zip(before).all(|(c, b)| c > b);
        let none_waiting = now.iter().all(|c| c.1 == 0.0);
        if synced && none_waiting && last_change.elapsed() >= QUIET {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_are_read_from_prometheus_text() {
        let t = "# HELP sluice_agent_syncs Dataplane syncs attempted\n# TYPE sluice_agent_syncs counter\nsluice_agent_syncs_total 7\nsluice_agent_pods_waiting_for_policy 0\nx{le=\"1\"} 3\n";
        assert_eq!(metric(t, SYNCS), Some(7.0));
        assert_eq!(metric(t, WAITING), Some(0.0));
        assert_eq!(metric(t, "x"), Some(3.0));
        assert_eq!(metric(t, "absent"), None);
    }
}
