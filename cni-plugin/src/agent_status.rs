//! The agent's readiness, read from `agentStatusFile` (docs/node-files.md):
//! `{"ready": true, "reason": "…", "node": "node-1", "updatedUnix": 1732380000}`,
//! rewritten by the agent at least every 10 s.

use serde::Deserialize;

/// Older than this, the agent is presumed dead.
pub const STALE_AFTER_SECS: i64 = 60;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AgentStatus {
    ready: bool,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    node: String,
    updated_unix: i64,
}

/// What the file says, judged at `now`.
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

/// Judge the file's contents (or the error reading it) at unix time `now`.
pub fn assess(path: &std::path::Path, contents: std::io::Result<String>, now: i64) -> Readiness {
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
    let age = now - s.updated_unix;
    if age > STALE_AFTER_SECS {
        return Readiness::Stale(format!(
            "sluice-agent{} last reported {age} s ago (limit {STALE_AFTER_SECS} s): check the agent pod",
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

pub fn read(path: &std::path::Path) -> Readiness {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    assess(path, std::fs::read_to_string(path), now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn at(json: &str, now: i64) -> Readiness {
        assess(Path::new("/run/s.json"), Ok(json.into()), now)
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
