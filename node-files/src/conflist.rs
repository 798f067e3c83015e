//! The conflist sluice installs on a node: the one builder `sluice-agent install-cni`
//! and the lab both use, so the file the plugin reads names the same files the
//! agent keeps (docs/node-files.md shows it).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::paths::NodePaths;

/// The conflist's `cniVersion` and `name`.
pub const CNI_VERSION: &str = "1.0.0";
pub const NETWORK_NAME: &str = "k8s-pod-network";

/// Where `sluice-ipam` gets the node's blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockSource {
    /// A cluster node: the agent claims blocks and publishes them in
    /// [`NodePaths::node_blocks_file`] (`ipam.nodeBlocksFile`).
    NodeBlocksFile,
    /// A standalone host or the lab: `sluice-ipam` claims blocks itself in a shared
    /// directory (`ipam.blockStore`).
    DirStore(PathBuf),
}

/// Everything a node's conflist says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConflist {
    pub node_name: String,
    pub pool: String,
    pub block_size: u8,
    /// 0: the plugin reads [`NodePaths::mtu_file`].
    pub mtu: u32,
    pub require_agent: bool,
    pub paths: NodePaths,
    pub blocks: BlockSource,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct List<'a> {
    cni_version: &'static str,
    name: &'static str,
    plugins: (Sluice<'a>, Portmap),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Sluice<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    mtu: u32,
    mtu_file: String,
    agent_status_file: String,
    agent_socket: String,
    require_agent: bool,
    log_file: String,
    ipam: Ipam<'a>,
    capabilities: SluiceCapabilities,
}

/// What the runtime may pass in `runtimeConfig`: `ips` is a requested address
/// (podman `--ip`); the pod's annotations (containerd's and CRI-O's CRI,
/// [`crate::local_api::POD_ANNOTATIONS_CAPABILITY`]) carry `sluice.dev/ip-addrs`
/// and `sluice.dev/ip-addrs-no-ipam` straight to the plugin.
#[derive(Serialize)]
struct SluiceCapabilities {
    ips: bool,
    #[serde(rename = "io.kubernetes.cri.pod-annotations")]
    pod_annotations: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Ipam<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    node_name: &'a str,
    pool: &'a str,
    block_size: u8,
    state_dir: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_blocks_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    block_store: Option<DirStore>,
}

#[derive(Serialize)]
struct DirStore {
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Portmap {
    #[serde(rename = "type")]
    kind: &'static str,
    snat: bool,
    capabilities: PortmapCapabilities,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PortmapCapabilities {
    port_mappings: bool,
}

fn text(p: &Path) -> String {
    p.display().to_string()
}

/// A template given to `install-cni --template` did not give valid JSON.
#[derive(Debug, thiserror::Error)]
#[error("conflist after substitution is not valid JSON: {0}")]
pub struct TemplateError(pub String);

impl NodeConflist {
    fn list(&self) -> List<'_> {
        let (node_blocks_file, block_store) = match &self.blocks {
            BlockSource::NodeBlocksFile => (Some(text(&self.paths.node_blocks_file)), None),
            BlockSource::DirStore(dir) => (
                None,
                Some(DirStore {
                    kind: "dir",
                    path: text(dir),
                }),
            ),
        };
        List {
            cni_version: CNI_VERSION,
            name: NETWORK_NAME,
            plugins: (
                Sluice {
                    kind: "sluice",
                    mtu: self.mtu,
                    mtu_file: text(&self.paths.mtu_file),
                    agent_status_file: text(&self.paths.agent_status_file),
                    agent_socket: text(&self.paths.agent_socket),
                    require_agent: self.require_agent,
                    log_file: text(&self.paths.cni_log_file),
                    ipam: Ipam {
                        kind: "sluice-ipam",
                        node_name: &self.node_name,
                        pool: &self.pool,
                        block_size: self.block_size,
                        state_dir: text(&self.paths.ipam_state_dir),
                        node_blocks_file,
                        block_store,
                    },
                    capabilities: SluiceCapabilities {
                        ips: true,
                        pod_annotations: true,
                    },
                },
                Portmap {
                    kind: "portmap",
                    snat: true,
                    capabilities: PortmapCapabilities {
                        port_mappings: true,
                    },
                },
            ),
        }
    }

    /// The conflist as a JSON value.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.list()).expect("conflist serializes")
    }

    /// The conflist file: pretty JSON, keys in the documented order, one trailing
    /// newline.
    pub fn to_text(&self) -> String {
        let mut s = serde_json::to_string_pretty(&self.list()).expect("conflist serializes");
        s.push('\n');
        s
    }

    /// Fill an operator's template instead: `__NODENAME__`, `__MTU__`, `__POOL__`,
    /// `__BLOCK_SIZE__`, `__MTU_FILE__`, `__STATUS_FILE__`, `__IPAM_STATE_DIR__` and
    /// `__NODE_BLOCKS_FILE__` become this conflist's values. Pure.
    pub fn fill_template(&self, template: &str) -> Result<String, TemplateError> {
        // Inside a JSON string: escaped as JSON, without the quotes.
        let json_str = |s: &str| {
            let q = serde_json::to_string(s).expect("string serializes");
            q[1..q.len() - 1].to_string()
        };
        let path = |p: &Path| json_str(&text(p));
        let out = template
            .replace("__NODENAME__", &json_str(&self.node_name))
            .replace("__MTU_FILE__", &path(&self.paths.mtu_file))
            .replace("__STATUS_FILE__", &path(&self.paths.agent_status_file))
            .replace("__IPAM_STATE_DIR__", &path(&self.paths.ipam_state_dir))
            .replace("__NODE_BLOCKS_FILE__", &path(&self.paths.node_blocks_file))
            .replace("__POOL__", &self.pool)
            .replace("__BLOCK_SIZE__", &self.block_size.to_string())
            .replace("__MTU__", &self.mtu.to_string());
        serde_json::from_str::<serde_json::Value>(&out)
            .map_err(|e| TemplateError(e.to_string()))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> NodeConflist {
        NodeConflist {
            node_name: "node-\"7\"".into(),
            pool: "10.244.0.0/16".into(),
            block_size: 24,
            mtu: 1430,
            require_agent: true,
            paths: NodePaths::default(),
            blocks: BlockSource::NodeBlocksFile,
        }
    }

    #[test]
    fn a_cluster_conflist_names_the_node_files_and_the_node_blocks_file() {
        let v = cluster().to_json();
        let p = &v["plugins"][0];
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(p["mtu"], 1430);
        assert_eq!(p["agentStatusFile"], "/run/sluice/agent-status.json");
        assert_eq!(p["ipam"]["nodeName"], "node-\"7\"");
        assert_eq!(
            p["ipam"]["nodeBlocksFile"],
            "/var/lib/sluice/ipam/node-blocks.json"
        );
        assert!(p["ipam"].get("blockStore").is_none());
        // podman --ip (and any runtime's `ips`) reaches the plugin as runtimeConfig.ips;
        // containerd's and CRI-O's CRI pass the pod's annotations.
        assert_eq!(
            p["capabilities"],
            serde_json::json!({"ips": true, "io.kubernetes.cri.pod-annotations": true})
        );
        assert_eq!(v["plugins"][1]["type"], "portmap");
        let parsed: serde_json::Value = serde_json::from_str(&cluster().to_text()).unwrap();
        assert_eq!(parsed, v);
    }

    #[test]
    fn the_text_keeps_the_documented_key_order() {
        let t = cluster().to_text();
        let at = |k: &str| t.find(&format!("\"{k}\"")).unwrap();
        assert!(at("cniVersion") < at("name") && at("name") < at("plugins"));
        assert!(at("mtu") < at("mtuFile") && at("requireAgent") < at("ipam"));
        assert!(t.ends_with("}\n"));
    }

    #[test]
    fn a_dir_store_replaces_the_node_blocks_file() {
        let mut c = cluster();
        c.blocks = BlockSource::DirStore("/run/lab/blocks".into());
        let v = c.to_json();
        assert_eq!(
            v["plugins"][0]["ipam"]["blockStore"],
            serde_json::json!({"type": "dir", "path": "/run/lab/blocks"})
        );
        assert!(v["plugins"][0]["ipam"].get("nodeBlocksFile").is_none());
    }

    #[test]
    fn a_template_gets_the_same_values_escaped() {
        let t = r#"{"n": "__NODENAME__", "m": __MTU__, "s": "__STATUS_FILE__"}"#;
        let v: serde_json::Value =
            serde_json::from_str(&cluster().fill_template(t).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"n": "node-\"7\"", "m": 1430, "s": "/run/sluice/agent-status.json"})
        );
        assert!(cluster().fill_template("{__MTU__}").is_err());
    }
}
