//! The agent status file: `{"ready": true, "reason": "…", "node": "node-1",
//! "updatedUnix": 1732380000}`, plus `"datastore": "…"` while the agent's datastore
//! is out of sync (the API server unreachable), and `"dataplane": "…"` once the agent
//! has chosen its policy dataplane. `ready` alone gates ADD: a node whose
//! dataplane is programmed keeps starting pods through an API outage. The agent writes it atomically on every readiness
//! change and at least every [`REFRESH`]; the plugin's STATUS (and ADD with
//! `requireAgent`) reads it and judges it with [`assess`], which treats a file older
//! than [`STALE_AFTER`] as written by a dead agent.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The agent rewrites the file at least this often.
pub const REFRESH: Duration = Duration::from_secs(5);
/// A file older than this was written by an agent that stopped: twelve missed
/// refreshes, so a busy agent is not mistaken for a dead one.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub ready: bool,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub node: String,
    /// Seconds since the Unix epoch when the agent wrote the file.
    pub updated_unix: u64,
    /// Why the agent's datastore is out of sync, while it is; absent otherwise.
    /// Informational: readers do not gate on it (the last state stays programmed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore: Option<String>,
    /// The policy dataplane the agent runs and why (`dataplane nftables (auto: …)`);
    /// absent before it has chosen. Informational, like `datastore`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<String>,
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Write `status` to `path` (the agent's side), atomically, mode 0644.
pub fn write(path: &Path, status: &AgentStatus) -> std::io::Result<()> {
    let mut json = serde_json::to_vec(status).expect("status serializes");
    json.push(b'\n');
    crate::atomic::write_atomic(path, &json, Some(0o644))
}

/// What the file says, judged at a given time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// The agent never wrote the file (not started, or not on this node yet):
    /// STATUS 50.
    Missing(String),
    /// The agent says it is not ready (policy not programmed yet, …): STATUS 50.
    NotReady(String),
    /// The agent stopped updating the file: it is likely dead, so routes and policy
    /// are no longer kept and existing pods may lose connectivity: STATUS 51.
    Stale(String),
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        matches!(self, Readiness::Ready)
    }

    pub fn reason(&self) -> &str {
        match self {
            Readiness::Ready => "ready",
            Readiness::Missing(r) | Readiness::NotReady(r) | Readiness::Stale(r) => r,
        }
    }
}

/// Judge the file's contents (or the error reading it) at unix time `now` (the
/// reader's side). Pure.
pub fn assess(path: &Path, contents: std::io::Result<String>, now: u64) -> Readiness {
    let text = match contents {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Readiness::Missing(format!(
                "agent status file {} does not exist: is sluice-agent running on this node?",
                path.display()
            ));
        }
        Err(e) => {
            return Readiness::Missing(format!(
                "cannot read agent status file {}: {e}",
                path.display()
            ));
        }
    };
    let s: AgentStatus = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => {
            return Readiness::NotReady(format!(
                "agent status file {} is malformed: {e}",
                path.display()
            ));
        }
    };
    // A reader's clock slightly behind the agent's is not staleness.
    let age = now.saturating_sub(s.updated_unix);
    let limit = STALE_AFTER.as_secs();
    if age > limit {
        return Readiness::Stale(format!(
            "sluice-agent{} last reported {age} s ago (limit {limit} s): check the agent pod",
            if s.node.is_empty() {
                String::new()
            } else {
                format!(" on {}", s.node)
            }
        ));
    }
    if !s.ready {
        let why = if s.reason.is_empty() {
            "no reason given"
        } else {
            &s.reason
        };
        return Readiness::NotReady(format!("sluice-agent is not ready: {why}"));
    }
    Readiness::Ready
}

/// Read and judge the file now.
pub fn read(path: &Path) -> Readiness {
    assess(path, std::fs::read_to_string(path), unix_now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(json: &str, now: u64) -> Readiness {
        assess(Path::new("/run/s.json"), Ok(json.into()), now)
    }

    #[test]
    fn what_the_agent_writes_the_reader_reads_as_ready() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run/sluice/agent-status.json");
        let s = AgentStatus {
            ready: true,
            reason: "ok".into(),
            node: "node-1".into(),
            updated_unix: unix_now(),
            datastore: None,
            dataplane: None,
        };
        write(&p, &s).unwrap();
        assert_eq!(read(&p), Readiness::Ready);
    }

    #[test]
    fn status_file_has_the_documented_shape() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run/sluice/agent-status.json");
        let s = AgentStatus {
            ready: false,
            reason: "waiting for first datastore sync".into(),
            node: "node-1".into(),
            updated_unix: 1732380000,
            datastore: None,
            dataplane: None,
        };
        write(&p, &s).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ready": false, "reason": "waiting for first datastore sync",
                               "node": "node-1", "updatedUnix": 1732380000u64})
        );
        let with = AgentStatus {
            ready: true,
            updated_unix: unix_now(),
            datastore: Some("datastore out of sync".into()),
            ..s
        };
        write(&p, &with).unwrap();
        assert_eq!(
            read(&p),
            Readiness::Ready,
            "the datastore field does not gate readiness"
        );
        // No temp file left behind.
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn the_refresh_leaves_margin_below_the_staleness_limit() {
        assert!(REFRESH * 4 <= STALE_AFTER);
    }

    #[test]
    fn fresh_and_ready_is_ready() {
        assert_eq!(
            at(
                r#"{"ready":true,"reason":"ok","node":"n1","updatedUnix":1000}"#,
                1010
            ),
            Readiness::Ready
        );
        // A clock slightly behind the agent's is not staleness.
        assert_eq!(
            at(r#"{"ready":true,"updatedUnix":1000}"#, 990),
            Readiness::Ready
        );
    }

    #[test]
    fn not_ready_carries_the_agents_reason() {
        let r = at(
            r#"{"ready":false,"reason":"policy not programmed","updatedUnix":1000}"#,
            1000,
        );
        assert!(
            matches!(&r, Readiness::NotReady(m) if m.contains("policy not programmed")),
            "{r:?}"
        );
    }

    #[test]
    fn older_than_60_s_is_stale_even_if_it_said_ready() {
        assert!(matches!(
            at(r#"{"ready":true,"node":"n1","updatedUnix":1000}"#, 1061),
            Readiness::Stale(_)
        ));
        assert_eq!(
            at(r#"{"ready":true,"updatedUnix":1000}"#, 1060),
            Readiness::Ready
        );
    }

    #[test]
    fn missing_and_malformed_files_are_not_ready() {
        let r = assess(Path::new("/x"), Err(std::io::ErrorKind::NotFound.into()), 0);
        assert!(matches!(r, Readiness::Missing(_)));
        assert!(matches!(at("{", 0), Readiness::NotReady(_)));
        assert!(
            matches!(at(r#"{"ready":true}"#, 0), Readiness::NotReady(_)),
            "no updatedUnix"
        );
    }
}
