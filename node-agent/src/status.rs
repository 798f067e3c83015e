//! The agent's side of the status file of docs/node-files.md, which the CNI plugin's
//! STATUS verb (and ADD with `requireAgent`) reads. The file's shape, its refresh
//! interval and the reader's staleness rule are `sluice_node_files::status`; this
//! module adds the agent's error type for a failed write.

use std::path::{Path, PathBuf};

pub use sluice_node_files::status::{AgentStatus, REFRESH, unix_now};

#[derive(Debug, thiserror::Error)]
#[error("writing {path}: {source}")]
pub struct StatusError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// `sluice_node_files::atomic::write_atomic` with the path in the error.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StatusError> {
    sluice_node_files::atomic::write_atomic(path, contents, Some(mode)).map_err(|source| {
        StatusError {
            path: path.to_path_buf(),
            source,
        }
    })
}

pub fn write_status(path: &Path, status: &AgentStatus) -> Result<(), StatusError> {
    sluice_node_files::status::write(path, status).map_err(|source| StatusError {
        path: path.to_path_buf(),
        source,
    })
}
