//! The ADD result (`interfaces`, `ips`, `routes`, `dns`), read in any supported
//! version and rendered in the version the runtime asked for.
//!
//! Differences handled: 0.3.1/0.4.0 `ips` entries carry `"version": "4"|"6"`,
//! 1.0.0 dropped it; 1.1.0 added `mtu`, `socketPath`, `pciID` on interfaces and
//! `mtu`, `advmss`, `priority`, `table`, `scope` on routes. Rendering for an older
//! version leaves out what that version does not define, because runtimes that
//! link libcni validate the result against the version they asked for.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::codes::ErrorCode;
use crate::error::CniError;
use crate::version::Version;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Empty or absent for host-side interfaces; the netns path for sandbox ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// 1.1.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// 1.1.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    /// 1.1.0 only.
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// 1.1.0 only (as are the four below).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

impl Route {
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// A result, version-neutral. Read an IPAM or chained result with
/// [`CniResult::parse`]; print with [`CniResult::render`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// Read a result of any supported version (an IPAM plugin's stdout, or a
    /// `prevResult`). The 0.x `version` field on `ips` is ignored: the address says
    /// its family. Code 6 when it does not decode, 1 for a version we do not speak.
    pub fn parse(v: &Value) -> Result<CniResult, CniError> {
        if let Some(ver) = v.get("cniVersion").and_then(Value::as_str) {
            Version::parse(ver)?;
        }
        serde_json::from_value(v.clone()).map_err(|e| {
            CniError::new(ErrorCode::DecodingFailure, "cannot decode CNI result")
                .with_details(e.to_string())
        })
    }

    /// The JSON a runtime that asked for `version` accepts.
    pub fn render(&self, version: Version) -> Value {
        let mut out = Map::new();
        out.insert("cniVersion".into(), version.as_str().into());
        let ifaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut o = Map::new();
                o.insert("name".into(), i.name.clone().into());
                if let Some(m) = &i.mac {
                    o.insert("mac".into(), m.clone().into());
                }
                if let Some(s) = &i.sandbox {
                    o.insert("sandbox".into(), s.clone().into());
                }
                if version >= Version::V1_1_0 {
                    if let Some(m) = i.mtu {
                        o.insert("mtu".into(), m.into());
                    }
                    if let Some(s) = &i.socket_path {
                        o.insert("socketPath".into(), s.clone().into());
                    }
                    if let Some(p) = &i.pci_id {
                        o.insert("pciID".into(), p.clone().into());
                    }
                }
                Value::Object(o)
            })
            .collect();
        if !ifaces.is_empty() {
            out.insert("interfaces".into(), ifaces.into());
        }
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o = Map::new();
                if version.ips_carry_version() {
                    let fam = if ip.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    };
                    o.insert("version".into(), fam.into());
                }
                o.insert("address".into(), ip.address.to_string().into());
                if let Some(g) = ip.gateway {
                    o.insert("gateway".into(), g.to_string().into());
                }
                if let Some(i) = ip.interface {
                    o.insert("interface".into(), i.into());
                }
                Value::Object(o)
            })
            .collect();
        if !ips.is_empty() {
            out.insert("ips".into(), ips.into());
        }
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut o = Map::new();
                o.insert("dst".into(), r.dst.to_string().into());
                if let Some(g) = r.gw {
                    o.insert("gw".into(), g.to_string().into());
                }
                if version >= Version::V1_1_0 {
                    for (k, v) in [
                        ("mtu", r.mtu),
                        ("advmss", r.advmss),
                        ("priority", r.priority),
                        ("table", r.table),
                        ("scope", r.scope),
                    ] {
                        if let Some(v) = v {
                            o.insert(k.into(), v.into());
                        }
                    }
                }
                Value::Object(o)
            })
            .collect();
        if !routes.is_empty() {
            out.insert("routes".into(), routes.into());
        }
        if !self.dns.is_empty() {
            out.insert("dns".into(), json!(self.dns));
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "slc1234abcd5678".into(),
                    mac: Some("ee:ee:ee:ee:ee:ee".into()),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("0a:00:00:00:00:01".into()),
                    sandbox: Some("/var/run/netns/p".into()),
                    mtu: Some(1480),
                    ..Default::default()
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.5/32".parse().unwrap(),
                gateway: None,
                interface: Some(1),
            }],
            routes: vec![Route {
                table: Some(100),
                ..Route::new(
                    "0.0.0.0/0".parse().unwrap(),
                    Some("169.254.1.1".parse().unwrap()),
                )
            }],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                ..Default::default()
            },
        }
    }

    #[test]
    fn render_0_3_1_and_0_4_0_tag_ips_with_a_family_and_drop_1_1_fields() {
        for v in [Version::V0_3_1, Version::V0_4_0] {
            let out = sample().render(v);
            assert_eq!(out["cniVersion"], v.as_str());
            assert_eq!(out["ips"][0]["version"], "4");
            assert_eq!(out["ips"][0]["interface"], 1);
            assert!(out["interfaces"][1].get("mtu").is_none());
            assert!(out["routes"][0].get("table").is_none());
        }
    }

    #[test]
    fn render_1_0_0_has_no_ip_version_and_no_1_1_fields() {
        let out = sample().render(Version::V1_0_0);
        assert_eq!(
            out,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "slc1234abcd5678", "mac": "ee:ee:ee:ee:ee:ee"},
                    {"name": "eth0", "mac": "0a:00:00:00:00:01", "sandbox": "/var/run/netns/p"}
                ],
                "ips": [{"address": "10.244.1.5/32", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
                "dns": {"nameservers": ["10.96.0.10"]}
            })
        );
    }

    #[test]
    fn render_1_1_0_keeps_interface_mtu_and_route_table() {
        let out = sample().render(Version::V1_1_0);
        assert_eq!(out["interfaces"][1]["mtu"], 1480);
        assert_eq!(out["routes"][0]["table"], 100);
        assert!(out["ips"][0].get("version").is_none());
    }

    #[test]
    fn empty_sections_are_left_out() {
        assert_eq!(
            CniResult::default().render(Version::V1_0_0),
            json!({"cniVersion": "1.0.0"})
        );
    }

    #[test]
    fn a_host_local_0_3_1_result_parses() {
        let r = CniResult::parse(&json!({
            "cniVersion": "0.3.1",
            "ips": [{"version": "4", "address": "10.22.0.2/16", "gateway": "10.22.0.1"}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        }))
        .unwrap();
        assert_eq!(r.ips[0].address, "10.22.0.2/16".parse::<IpNet>().unwrap());
        assert_eq!(r.ips[0].gateway, Some("10.22.0.1".parse().unwrap()));
        assert_eq!(r.routes[0].gw, None);
        assert!(r.dns.is_empty());
    }

    #[test]
    fn every_version_rendering_parses_back_to_what_it_kept() {
        for v in crate::version::SUPPORTED_VERSIONS {
            let back = CniResult::parse(&sample().render(v)).unwrap();
            assert_eq!(back.ips, sample().ips, "{v}");
            assert_eq!(back.dns, sample().dns, "{v}");
        }
    }

    #[test]
    fn undecodable_results_are_code_6_and_foreign_versions_code_1() {
        assert_eq!(
            CniResult::parse(&json!({"ips": [{"address": "nope"}]}))
                .unwrap_err()
                .code,
            6
        );
        assert_eq!(
            CniResult::parse(&json!({"cniVersion": "0.2.0", "ip4": {}}))
                .unwrap_err()
                .code,
            1
        );
    }
}
