//! The agent status file of docs/node-files.md, which the CNI plugin's STATUS verb
//! (and ADD with `requireAgent`) reads: written atomically (temp + rename) on every
//! readiness change and at least every [`REFRESH`], so a reader can tell a live agent
//! from a dead one by `updatedUnix`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Readers treat a file older than 60 s as stale; refreshing every 5 s leaves margin.
pub const REFRESH: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub ready: bool,
    pub reason: String,
    pub node: String,
    pub updated_unix: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("writing {path}: {source}")]
pub struct StatusError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Write `contents` to `path` through a temp file in the same directory and a rename,
/// so a reader sees the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StatusError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| StatusError {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

pub fn write_status(path: &Path, status: &AgentStatus) -> Result<(), StatusError> {
    let mut json = serde_json::to_vec(status).expect("status serializes");
    json.push(b'\n');
    write_atomic(path, &json, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_file_has_the_documented_shape() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run/sluice/agent-status.json");
        let s = AgentStatus {
            ready: false,
            reason: "waiting for first datastore sync".into(),
            node: "node-1".into(),
            updated_unix: 1732380000,
        };
        write_status(&p, &s).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ready": false, "reason": "waiting for first datastore sync",
                               "node": "node-1", "updatedUnix": 1732380000u64})
        );
        // No temp file left behind.
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
