//! The real `sluice-agent` on every lab node, with the directory datastore.
//!
//! Each agent runs inside its node namespace, watches the lab's shared manifests
//! directory (the Nodes, Namespaces, Pods, policies and Services `lab apply` writes),
//! claims blocks through the shared directory block store, and writes its readiness
//! to the node root's `run/sluice/agent-status.json` (docs/node-files.md), which is
//! what `up` waits on and `status` reports.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::state::{LabPaths, LabState, NodeState};
use super::{LabError, netns};

/// The health/metrics port inside each node namespace (namespaces do not share
/// ports, so every node can use the same one).
pub const HEALTH_PORT: u16 = 9099;

pub fn status_file(node: &NodeState) -> std::path::PathBuf {
    node.root.join("run/sluice/agent-status.json")
}

/// The agent's command line for a node: every path moved under the node's root.
pub fn command_line(st: &LabState, node: &NodeState, paths: &LabPaths) -> Vec<String> {
    let r = |s: &str| node.root.join(s).display().to_string();
    vec![
        "run".into(),
        "--node-name".into(),
        node.name.clone(),
        "--datastore".into(),
        "dir".into(),
        "--manifests-dir".into(),
        paths.manifests().display().to_string(),
        "--block-store-dir".into(),
        paths.blocks().display().to_string(),
        "--pool".into(),
        st.pool.to_string(),
        "--encap".into(),
        st.encap.as_str().into(),
        "--uplink".into(),
        "eth0".into(),
        "--status-file".into(),
        r("run/sluice/agent-status.json"),
        "--mtu-file".into(),
        r("var/lib/sluice/mtu"),
        "--ipam-state-dir".into(),
        r("var/lib/sluice/ipam"),
        "--listen".into(),
        format!("127.0.0.1:{HEALTH_PORT}"),
    ]
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

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct AgentStatus {
    pub ready: bool,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub node: String,
    #[serde(default, rename = "updatedUnix")]
    pub updated_unix: u64,
}

/// The node's agent health as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    pub running: bool,
    pub ready: bool,
    pub reason: String,
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
            reason: if running {
                s.reason
            } else {
                "agent process is not running".into()
            },
        },
        None => Health {
            running,
            ready: false,
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
