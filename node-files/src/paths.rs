//! Where the shared files live by default (the table of docs/node-files.md). Every
//! path can be moved by a conflist key or an agent flag, and the lab moves them all
//! under a per-node root ([`NodePaths::under`]), so nothing else may hard-wire them.

use std::path::{Path, PathBuf};

/// The pod MTU the agent writes and the plugin reads (conflist `mtuFile`).
pub const MTU_FILE: &str = "/var/lib/sluice/mtu";
/// The agent status file (conflist `agentStatusFile`), see [`crate::status`].
pub const AGENT_STATUS_FILE: &str = "/run/sluice/agent-status.json";
/// The agent's node-local API socket (conflist `agentSocket`), see
/// [`crate::local_api`].
pub const AGENT_SOCKET: &str = "/run/sluice/agent.sock";
/// `sluice-ipam`'s per-node state directory (conflist `ipam.stateDir`).
pub const IPAM_STATE_DIR: &str = "/var/lib/sluice/ipam";
/// The node's claimed blocks, published by the agent (conflist `ipam.nodeBlocksFile`).
pub const NODE_BLOCKS_FILE: &str = "/var/lib/sluice/ipam/node-blocks.json";
/// The CNI binaries' event log, when the conflist sets `logFile`.
pub const CNI_LOG_FILE: &str = "/var/log/sluice/cni.log";
/// The agent's denied-connection records, JSON lines (see [`crate::flows`]).
pub const FLOW_LOG_FILE: &str = "/var/log/sluice/flows.jsonl";
/// The node's CNI binary directory.
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// The node's CNI configuration directory.
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// The conflist's file name in [`CNI_CONF_DIR`].
pub const CONFLIST_NAME: &str = "10-sluice.conflist";

/// The files one node's sluice processes share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePaths {
    pub mtu_file: PathBuf,
    pub agent_status_file: PathBuf,
    pub agent_socket: PathBuf,
    pub ipam_state_dir: PathBuf,
    pub node_blocks_file: PathBuf,
    pub cni_log_file: PathBuf,
    pub flow_log_file: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
}

impl Default for NodePaths {
    fn default() -> NodePaths {
        NodePaths::under(Path::new("/"))
    }
}

impl NodePaths {
    /// Every default path moved under `root` (`/` gives the defaults): how the lab
    /// runs several "nodes" on one host.
    pub fn under(root: &Path) -> NodePaths {
        let p = |default: &str| root.join(default.trim_start_matches('/'));
        NodePaths {
            mtu_file: p(MTU_FILE),
            agent_status_file: p(AGENT_STATUS_FILE),
            agent_socket: p(AGENT_SOCKET),
            ipam_state_dir: p(IPAM_STATE_DIR),
            node_blocks_file: p(NODE_BLOCKS_FILE),
            cni_log_file: p(CNI_LOG_FILE),
            flow_log_file: p(FLOW_LOG_FILE),
            cni_bin_dir: p(CNI_BIN_DIR),
            cni_conf_dir: p(CNI_CONF_DIR),
        }
    }

    /// The conflist's path: [`CONFLIST_NAME`] in the CNI configuration directory.
    pub fn conflist(&self) -> PathBuf {
        self.cni_conf_dir.join(CONFLIST_NAME)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_documented_paths() {
        let d = NodePaths::default();
        assert_eq!(d.mtu_file, Path::new("/var/lib/sluice/mtu"));
        assert_eq!(
            d.agent_status_file,
            Path::new("/run/sluice/agent-status.json")
        );
        assert_eq!(d.agent_socket, Path::new("/run/sluice/agent.sock"));
        assert_eq!(d.conflist(), Path::new("/etc/cni/net.d/10-sluice.conflist"));
    }

    #[test]
    fn under_a_root_every_path_moves_below_it() {
        let n = NodePaths::under(Path::new("/run/sluice-lab/demo/nodes/node-1"));
        assert_eq!(
            n.mtu_file,
            Path::new("/run/sluice-lab/demo/nodes/node-1/var/lib/sluice/mtu")
        );
        assert_eq!(
            n.cni_bin_dir,
            Path::new("/run/sluice-lab/demo/nodes/node-1/opt/cni/bin")
        );
        assert!(n.node_blocks_file.starts_with(&n.ipam_state_dir));
    }
}
