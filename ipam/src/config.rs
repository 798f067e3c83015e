//! The `ipam` section of the network configuration (docs/node-files.md) and the
//! settings resolved from it, defaults filled in.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

use crate::blocks::{DEFAULT_BLOCK_PREFIX, DEFAULT_POOL, Pool, PoolError};
use crate::node_blocks::DEFAULT_NODE_BLOCKS_FILE;

/// The default `ipam.stateDir`.
pub use sluice_node_files::paths::IPAM_STATE_DIR as DEFAULT_STATE_DIR;

/// The `ipam` object as written in a conflist.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConfig {
    pub node_name: Option<String>,
    pub pool: Option<Ipv4Net>,
    pub block_size: Option<u8>,
    pub state_dir: Option<PathBuf>,
    pub node_blocks_file: Option<PathBuf>,
    pub block_store: Option<BlockStoreConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// `ipam.blockStore`: where a standalone node claims blocks itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum BlockStoreConfig {
    Dir { path: PathBuf },
}

/// An extra route to return with the address (CNI's route object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// Where this node's blocks come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockSource {
    /// Cluster mode: the agent publishes them in this file.
    NodeBlocksFile(PathBuf),
    /// Standalone/lab: `sluice-ipam` claims them in this directory store.
    DirStore(PathBuf),
}

/// Everything `sluice-ipam` needs, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamSettings {
    pub node: String,
    pub pool: Pool,
    pub state_dir: PathBuf,
    pub source: BlockSource,
    pub routes: Vec<Route>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "ipam: set either nodeBlocksFile (cluster: the agent claims blocks) or blockStore (standalone: sluice-ipam claims blocks), not both"
    )]
    BothSources,
    #[error("ipam: {0}")]
    Pool(#[from] PoolError),
    #[error(
        "ipam: no node name: set ipam.nodeName (the agent's install-cni fills it in), or K8S_NODE_NAME in CNI_ARGS"
    )]
    NoNodeName,
}

impl IpamConfig {
    /// Fill in defaults. The node name is `nodeName`, else `node_from_args` (CNI_ARGS
    /// `K8S_NODE_NAME`), else `hostname()`. The `__NODENAME__` placeholder of an
    /// unrendered template counts as unset.
    pub fn resolve(
        self,
        node_from_args: Option<&str>,
        hostname: impl FnOnce() -> Option<String>,
    ) -> Result<IpamSettings, ConfigError> {
        let node = self
            .node_name
            .filter(|n| !n.is_empty() && n != "__NODENAME__")
            .or_else(|| node_from_args.filter(|n| !n.is_empty()).map(str::to_string))
            .or_else(hostname)
            .filter(|n| !n.is_empty())
            .ok_or(ConfigError::NoNodeName)?;
        let pool = Pool::new(
            self.pool
                .unwrap_or_else(|| DEFAULT_POOL.parse().expect("default pool")),
            self.block_size.unwrap_or(DEFAULT_BLOCK_PREFIX),
        )?;
        let state_dir = self.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let source = match (self.node_blocks_file, self.block_store) {
            (Some(_), Some(_)) => return Err(ConfigError::BothSources),
            (None, Some(BlockStoreConfig::Dir { path })) => BlockSource::DirStore(path),
            (Some(f), None) => BlockSource::NodeBlocksFile(f),
            (None, None) => BlockSource::NodeBlocksFile(DEFAULT_NODE_BLOCKS_FILE.into()),
        };
        Ok(IpamSettings {
            node,
            pool,
            state_dir,
            source,
            routes: self.routes,
        })
    }
}

/// The host name, the last fallback for the node name.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> IpamConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_follow_the_node_files_contract() {
        let s = parse(serde_json::json!({"type": "sluice-ipam"}))
            .resolve(None, || Some("host-a".into()))
            .unwrap();
        assert_eq!(s.node, "host-a");
        assert_eq!(s.pool.cidr().to_string(), "10.244.0.0/16");
        assert_eq!(s.pool.block_prefix(), 24);
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/sluice/ipam"));
        assert_eq!(
            s.source,
            BlockSource::NodeBlocksFile("/var/lib/sluice/ipam/node-blocks.json".into())
        );
    }

    #[test]
    fn node_name_precedence_is_config_then_cni_args_then_hostname() {
        let c = |n: Option<&str>| IpamConfig {
            node_name: n.map(str::to_string),
            ..Default::default()
        };
        let host = || Some("host".to_string());
        assert_eq!(
            c(Some("cfg")).resolve(Some("arg"), host).unwrap().node,
            "cfg"
        );
        assert_eq!(
            c(Some("__NODENAME__"))
                .resolve(Some("arg"), host)
                .unwrap()
                .node,
            "arg"
        );
        assert_eq!(c(None).resolve(None, host).unwrap().node, "host");
        assert!(c(None).resolve(None, || None).is_err());
    }

    #[test]
    fn standalone_config_with_routes() {
        let s = parse(serde_json::json!({
            "nodeName": "n1", "pool": "10.9.0.0/16", "blockSize": 26,
            "stateDir": "/tmp/s", "blockStore": {"type": "dir", "path": "/tmp/b"},
            "routes": [{"dst": "10.96.0.0/12"}, {"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
        }))
        .resolve(None, || None)
        .unwrap();
        assert_eq!(s.source, BlockSource::DirStore("/tmp/b".into()));
        assert_eq!(s.pool.block_prefix(), 26);
        assert_eq!(s.routes.len(), 2);
    }

    #[test]
    fn both_sources_or_a_bad_block_size_are_config_errors() {
        let both = parse(serde_json::json!({
            "nodeName": "n", "nodeBlocksFile": "/x", "blockStore": {"type": "dir", "path": "/y"}
        }));
        assert!(matches!(
            both.resolve(None, || None),
            Err(ConfigError::BothSources)
        ));
        let bad = parse(serde_json::json!({"nodeName": "n", "blockSize": 12}));
        assert!(matches!(
            bad.resolve(None, || None),
            Err(ConfigError::Pool(_))
        ));
    }
}
