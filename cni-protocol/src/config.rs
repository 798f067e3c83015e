//! The network configuration a plugin reads on stdin.
//!
//! The common keys are typed; everything else stays in [`NetConf::raw`] so a plugin
//! can read its own keys with [`NetConf::plugin_keys`] and a delegate receives the
//! bytes the runtime sent, untouched.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::codes::ErrorCode;
use crate::error::CniError;
use crate::result::Dns;
use crate::version::Version;

/// The `ipam` section; only `type` is common, the rest belongs to the IPAM plugin.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IpamConf {
    #[serde(rename = "type")]
    pub plugin_type: String,
}

/// One entry of a GC's valid-attachments list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// A parsed network config (one plugin's entry of a conflist, as the runtime hands it).
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: Version,
    pub name: String,
    pub plugin_type: String,
    pub ipam: Option<IpamConf>,
    pub dns: Option<Dns>,
    /// The previous plugin's result in a chain, as sent (any version).
    pub prev_result: Option<Value>,
    /// `runtimeConfig`, as sent.
    pub runtime_config: Map<String, Value>,
    /// The whole object, plugin-specific keys included.
    pub raw: Value,
    /// The exact bytes read from stdin, for delegation.
    pub bytes: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Common {
    cni_version: Option<String>,
    /// CNI 1.1 conflists may list `cniVersions`; a runtime then sends the chosen
    /// `cniVersion` too, but a config carrying only the list is still readable.
    #[serde(default)]
    cni_versions: Vec<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    ipam: Option<Value>,
    dns: Option<Value>,
    prev_result: Option<Value>,
    runtime_config: Option<Map<String, Value>>,
}

impl NetConf {
    /// Parse stdin. Not JSON, or not an object: code 6. No or unknown `cniVersion`:
    /// code 1. Missing `name`/`type`, or a malformed common key: code 7.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let raw: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                ErrorCode::DecodingFailure,
                "network config on stdin is not valid JSON",
            )
            .with_details(e.to_string())
        })?;
        if !raw.is_object() {
            return Err(CniError::new(
                ErrorCode::DecodingFailure,
                "network config on stdin is not a JSON object",
            ));
        }
        let common: Common = serde_json::from_value(raw.clone()).map_err(|e| {
            CniError::new(ErrorCode::InvalidNetworkConfig, "malformed network config")
                .with_details(e.to_string())
        })?;
        let cni_version = match common.cni_version.as_deref() {
            Some(v) => Version::parse(v)?,
            // The newest listed version we speak.
            None => common
                .cni_versions
                .iter()
                .filter_map(|v| Version::parse(v).ok())
                .max()
                .ok_or_else(|| {
                    CniError::new(
                        ErrorCode::IncompatibleVersion,
                        "network config has no cniVersion we speak",
                    )
                    .with_details(format!("cniVersions: {:?}", common.cni_versions))
                })?,
        };
        let name = common.name.filter(|n| !n.is_empty()).ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "network config has no name",
            )
        })?;
        validate_network_name(&name)?;
        let plugin_type = common
            .plugin_type
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                CniError::new(
                    ErrorCode::InvalidNetworkConfig,
                    "network config has no type",
                )
            })?;
        let ipam = match common.ipam {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value::<IpamConf>(v).map_err(|e| {
                CniError::new(
                    ErrorCode::InvalidNetworkConfig,
                    "the ipam section needs a \"type\"",
                )
                .with_details(e.to_string())
            })?),
        };
        let dns = match common.dns {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value::<Dns>(v).map_err(|e| {
                CniError::new(ErrorCode::InvalidNetworkConfig, "malformed dns section")
                    .with_details(e.to_string())
            })?),
        };
        Ok(NetConf {
            cni_version,
            name,
            plugin_type,
            ipam,
            dns,
            prev_result: common.prev_result.filter(|v| !v.is_null()),
            runtime_config: common.runtime_config.unwrap_or_default(),
            raw,
            bytes: bytes.to_vec(),
        })
    }

    /// Deserialize the plugin's own keys from the whole object (unknown keys are
    /// the deserializer's business; serde ignores them by default). Code 7 on error.
    pub fn plugin_keys<T: DeserializeOwned>(&self) -> Result<T, CniError> {
        serde_json::from_value(self.raw.clone()).map_err(|e| {
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                format!("invalid {} configuration", self.plugin_type),
            )
            .with_details(e.to_string())
        })
    }

    /// A `runtimeConfig` key by its camelCase name, also found when a runtime sent
    /// it Capitalized (containerd's CRI sends `PortMappings`, podman `portMappings`).
    pub fn runtime_config_key(&self, camel: &str) -> Option<&Value> {
        self.runtime_config.get(camel).or_else(|| {
            let mut c = camel.chars();
            let capitalized: String = c
                .next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default();
            self.runtime_config.get(&capitalized)
        })
    }

    /// GC's list of attachments to keep: `cni.dev/valid-attachments` (spec 1.1), or
    /// the older `cni.dev/attachments`. `None` when neither key is present, which a
    /// GC must read as "I was told nothing", never as "keep nothing".
    pub fn valid_attachments(&self) -> Result<Option<Vec<Attachment>>, CniError> {
        let v = self
            .raw
            .get("cni.dev/valid-attachments")
            .or_else(|| self.raw.get("cni.dev/attachments"));
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
                CniError::new(
                    ErrorCode::InvalidNetworkConfig,
                    "malformed cni.dev/valid-attachments",
                )
                .with_details(e.to_string())
            }),
        }
    }
}

/// The longest network name sluice accepts. The spec sets no limit, but the name
/// goes into the host link's alias (`sluice:<network>:<containerID>:<ifname>`), which
/// the kernel caps at 255 bytes: with [`crate::MAX_CONTAINER_ID_LEN`] and a
/// 15-byte ifname this always fits. (The fuzzer found a 70,000-byte name panicking
/// the netlink encoder, which cannot write an attribute over 64 KiB.)
pub const MAX_NETWORK_NAME_LEN: usize = 100;

/// The spec: a network name starts with an alphanumeric character, followed by
/// alphanumerics, `_`, `.` and `-` (libcni refuses others too). Code 7.
fn validate_network_name(name: &str) -> Result<(), CniError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        return Err(CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!("network name {:?} has invalid characters", head(name)),
        )
        .with_details("a letter or digit, then letters, digits, '_', '.' or '-'"));
    }
    if name.len() > MAX_NETWORK_NAME_LEN {
        return Err(CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!(
                "network name {:?}… is {} bytes; sluice accepts at most {MAX_NETWORK_NAME_LEN}",
                head(name),
                name.len()
            ),
        ));
    }
    Ok(())
}

/// The start of a value for a message: a refused name may be huge.
pub(crate) fn head(s: &str) -> &str {
    s.char_indices().nth(64).map_or(s, |(i, _)| &s[..i])
}

/// Read only `cniVersion` from stdin, leniently: used to stamp an error with the
/// runtime's version when the full parse failed, and for VERSION's input.
pub fn peek_version(bytes: &[u8]) -> Option<Version> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    Version::parse(v.get("cniVersion")?.as_str()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetConf, CniError> {
        NetConf::parse(v.to_string().as_bytes())
    }

    #[test]
    fn a_network_name_must_follow_the_spec_and_fit_the_host_link_alias() {
        let conf = |name: &str| json!({"cniVersion": "1.0.0", "name": name, "type": "sluice"});
        for ok in [
            "k8s-pod-network",
            "a",
            "net_1.2",
            &"n".repeat(MAX_NETWORK_NAME_LEN),
        ] {
            assert!(parse(conf(ok)).is_ok(), "{ok}");
        }
        // The last one used to panic the plugin's netlink encoder (fuzz_binary).
        for bad in ["-net", "a:b", "a b", "net\n", "é", &"n".repeat(70_000)] {
            let e = parse(conf(bad)).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidNetworkConfig.code(), "{bad}: {e}");
            assert!(e.msg.len() < 200, "{}", e.msg);
        }
    }

    #[test]
    fn a_full_config_keeps_common_and_plugin_keys() {
        let c = parse(json!({
            "cniVersion": "1.0.0", "name": "k8s", "type": "sluice",
            "mtu": 1480, "unknownKey": {"x": 1},
            "capabilities": {"portMappings": true},
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.1.0.0/24"}]]},
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
            "runtimeConfig": {"PortMappings": [{"hostPort": 80}]},
            "prevResult": {"cniVersion": "1.0.0", "ips": []}
        }))
        .unwrap();
        assert_eq!(c.cni_version, Version::V1_0_0);
        assert_eq!(c.name, "k8s");
        assert_eq!(c.plugin_type, "sluice");
        assert_eq!(c.ipam.as_ref().unwrap().plugin_type, "host-local");
        assert_eq!(c.dns.as_ref().unwrap().nameservers, vec!["10.96.0.10"]);
        assert!(c.prev_result.is_some());
        assert_eq!(
            c.runtime_config_key("portMappings").unwrap()[0]["hostPort"],
            80
        );
        #[derive(Deserialize)]
        struct Mine {
            mtu: u32,
        }
        assert_eq!(c.plugin_keys::<Mine>().unwrap().mtu, 1480);
    }

    #[test]
    fn decode_version_and_config_errors_have_their_codes() {
        let table: &[(&[u8], u32)] = &[
            (b"{not json", 6),
            (b"", 6),
            (b"[1,2]", 6),
            (br#"{"name":"n","type":"sluice"}"#, 1),
            (br#"{"cniVersion":"9.9.9","name":"n","type":"sluice"}"#, 1),
            (br#"{"cniVersion":"1.0.0","type":"sluice"}"#, 7),
            (br#"{"cniVersion":"1.0.0","name":"n"}"#, 7),
            (
                br#"{"cniVersion":"1.0.0","name":"n","type":"sluice","ipam":{}}"#,
                7,
            ),
            (br#"{"cniVersion":"1.0.0","name":5,"type":"sluice"}"#, 7),
        ];
        for (input, code) in table {
            let e = NetConf::parse(input).unwrap_err();
            assert_eq!(e.code, *code, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn cni_versions_alone_picks_the_newest_we_speak() {
        let c = NetConf::parse(
            br#"{"cniVersions":["0.4.0","1.1.0","9.0.0"],"name":"n","type":"sluice"}"#,
        )
        .unwrap();
        assert_eq!(c.cni_version, Version::V1_1_0);
        let both = NetConf::parse(
            br#"{"cniVersion":"1.0.0","cniVersions":["1.0.0","1.1.0"],"name":"n","type":"sluice"}"#,
        )
        .unwrap();
        assert_eq!(
            both.cni_version,
            Version::V1_0_0,
            "the runtime's choice wins"
        );
        let none = NetConf::parse(br#"{"cniVersions":["9.0.0"],"name":"n","type":"sluice"}"#);
        assert_eq!(none.unwrap_err().code, 1);
    }

    #[test]
    fn valid_attachments_read_both_keys_and_absence_is_none() {
        let base = json!({"cniVersion": "1.1.0", "name": "n", "type": "sluice"});
        assert_eq!(
            parse(base.clone()).unwrap().valid_attachments().unwrap(),
            None
        );
        for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
            let mut v = base.clone();
            v[key] = json!([{"containerID": "c1", "ifname": "eth0"}]);
            let got = parse(v).unwrap().valid_attachments().unwrap().unwrap();
            assert_eq!(
                got,
                vec![Attachment {
                    container_id: "c1".into(),
                    ifname: "eth0".into()
                }],
                "{key}"
            );
        }
        let mut bad = base;
        bad["cni.dev/valid-attachments"] = json!([{"containerID": 1}]);
        assert_eq!(parse(bad).unwrap().valid_attachments().unwrap_err().code, 7);
    }

    #[test]
    fn peek_version_is_lenient() {
        assert_eq!(
            peek_version(br#"{"cniVersion":"0.4.0"}"#),
            Some(Version::V0_4_0)
        );
        assert_eq!(peek_version(b"garbage"), None);
    }
}
