//! The node-blocks file (docs/node-files.md): in a cluster the node agent claims
//! blocks through the Kubernetes store and publishes the node's blocks here; the
//! `sluice-ipam` binary only reads it, so the ADD/DEL path never needs the API server.
//!
//! ```json
//! {"node": "node-1", "blocks": ["10.244.3.0/24"], "updatedUnix": 1732380000}
//! ```

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use sluice_node_files::atomic::write_atomic;

/// The default path (`ipam.nodeBlocksFile`).
pub use sluice_node_files::paths::NODE_BLOCKS_FILE as DEFAULT_NODE_BLOCKS_FILE;

/// What the agent publishes: the blocks `node` owns, in the order pods should be
/// given addresses from them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeBlocks {
    pub node: String,
    pub blocks: Vec<Ipv4Net>,
    #[serde(default)]
    pub updated_unix: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeBlocksError {
    #[error("node-blocks file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node-blocks file {path} does not parse: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

/// Read the file; `Ok(None)` when it does not exist (yet).
pub fn read(path: &Path) -> Result<Option<NodeBlocks>, NodeBlocksError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(NodeBlocksError::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| NodeBlocksError::Malformed {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Publish atomically (the agent's side), creating the parent directory.
pub fn write(path: &Path, blocks: &NodeBlocks) -> Result<(), NodeBlocksError> {
    let io = |e| NodeBlocksError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let bytes = serde_json::to_vec_pretty(blocks).expect("node blocks serialize");
    write_atomic(path, &bytes, None).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_file_reads_back_in_the_documented_format() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/node-blocks.json");
        let nb = NodeBlocks {
            node: "node-1".into(),
            blocks: vec!["10.244.3.0/24".parse().unwrap()],
            updated_unix: 1732380000,
        };
        write(&p, &nb).unwrap();
        assert_eq!(read(&p).unwrap(), Some(nb));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"node": "node-1", "blocks": ["10.244.3.0/24"], "updatedUnix": 1732380000})
        );
    }

    #[test]
    fn missing_file_is_none_and_garbage_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(&d.path().join("absent")).unwrap(), None);
        std::fs::write(d.path().join("bad"), "nope").unwrap();
        assert!(matches!(
            read(&d.path().join("bad")),
            Err(NodeBlocksError::Malformed { .. })
        ));
    }
}
