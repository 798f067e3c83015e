//! sluice's own keys in the network config (docs/node-files.md), with their defaults.

use std::path::PathBuf;

use serde::Deserialize;

use crate::error::PluginError;

use sluice_node_files::paths::{
    AGENT_SOCKET as DEFAULT_AGENT_SOCKET, AGENT_STATUS_FILE as DEFAULT_AGENT_STATUS_FILE,
    MTU_FILE as DEFAULT_MTU_FILE,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConf {
    /// `Some(n)` when the config fixes the MTU; `None` for `0` or absent (read the
    /// agent's MTU file).
    pub mtu: Option<u32>,
    pub mtu_file: PathBuf,
    pub agent_status_file: PathBuf,
    /// The agent's node-local API socket (conflist `agentSocket`).
    pub agent_socket: PathBuf,
    pub require_agent: bool,
    pub log_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Keys {
    #[serde(default)]
    mtu: Option<i64>,
    #[serde(default)]
    mtu_file: Option<PathBuf>,
    #[serde(default)]
    agent_status_file: Option<PathBuf>,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    #[serde(default)]
    require_agent: Option<bool>,
    #[serde(default)]
    log_file: Option<PathBuf>,
}

/// IPv4 needs at least 68; a veth takes at most 65535.
const MTU_RANGE: std::ops::RangeInclusive<i64> = 68..=65535;

impl PluginConf {
    pub fn from_raw(raw: &serde_json::Value) -> Result<PluginConf, PluginError> {
        let k: Keys = serde_json::from_value(raw.clone())
            .map_err(|e| PluginError::Config(format!("invalid sluice configuration: {e}")))?;
        let mtu = match k.mtu {
            None | Some(0) => None,
            Some(m) if MTU_RANGE.contains(&m) => Some(m as u32),
            Some(m) => {
                return Err(PluginError::Config(format!(
                    "mtu {m} is out of range: use 0 (from the agent's MTU file) or 68-65535"
                )));
            }
        };
        let nonempty = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        Ok(PluginConf {
            mtu,
            mtu_file: nonempty(k.mtu_file).unwrap_or_else(|| DEFAULT_MTU_FILE.into()),
            agent_status_file: nonempty(k.agent_status_file)
                .unwrap_or_else(|| DEFAULT_AGENT_STATUS_FILE.into()),
            agent_socket: nonempty(k.agent_socket).unwrap_or_else(|| DEFAULT_AGENT_SOCKET.into()),
            require_agent: k.require_agent.unwrap_or(false),
            log_file: nonempty(k.log_file),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_follow_node_files_md() {
        let c = PluginConf::from_raw(&json!({"type": "sluice"})).unwrap();
        assert_eq!(
            c,
            PluginConf {
                mtu: None,
                mtu_file: DEFAULT_MTU_FILE.into(),
                agent_status_file: DEFAULT_AGENT_STATUS_FILE.into(),
                agent_socket: DEFAULT_AGENT_SOCKET.into(),
                require_agent: false,
                log_file: None,
            }
        );
    }

    #[test]
    fn keys_are_read_and_mtu_zero_means_from_file() {
        let c = PluginConf::from_raw(&json!({
            "mtu": 0, "mtuFile": "/x/mtu", "agentStatusFile": "/x/s.json",
            "requireAgent": true, "logFile": "/x/log", "somethingElse": 1
        }))
        .unwrap();
        assert_eq!(c.mtu, None);
        assert_eq!(c.mtu_file, PathBuf::from("/x/mtu"));
        assert!(c.require_agent);
        assert_eq!(c.log_file, Some("/x/log".into()));
        assert_eq!(
            PluginConf::from_raw(&json!({"mtu": 1450})).unwrap().mtu,
            Some(1450)
        );
    }

    #[test]
    fn bad_values_are_config_errors() {
        for bad in [
            json!({"mtu": -1}),
            json!({"mtu": 67}),
            json!({"mtu": 70000}),
            json!({"mtu": "1500"}),
            json!({"requireAgent": "yes"}),
        ] {
            assert!(
                matches!(PluginConf::from_raw(&bad), Err(PluginError::Config(_))),
                "{bad}"
            );
        }
    }
}
