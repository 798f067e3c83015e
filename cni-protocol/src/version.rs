//! CNI spec versions this crate speaks, and negotiation against a config's `cniVersion`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codes::ErrorCode;
use crate::error::CniError;

/// A CNI spec version we can read and render. Ordered oldest → newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

/// Every version handled, oldest first: what VERSION reports as `supportedVersions`.
pub const SUPPORTED_VERSIONS: [Version; 4] = [
    Version::V0_3_1,
    Version::V0_4_0,
    Version::V1_0_0,
    Version::V1_1_0,
];

impl Version {
    /// The newest version we speak.
    pub const LATEST: Version = Version::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// Parse a `cniVersion` string. Anything we do not speak is code 1
    /// (incompatible CNI version), as the spec asks, with the list we do speak.
    pub fn parse(s: &str) -> Result<Version, CniError> {
        SUPPORTED_VERSIONS
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                CniError::new(
                    ErrorCode::IncompatibleVersion,
                    format!("unsupported cniVersion {s:?}"),
                )
                .with_details(format!(
                    "this plugin supports {}",
                    SUPPORTED_VERSIONS.map(Version::as_str).join(", ")
                ))
            })
    }

    /// True from 1.1.0 on, where STATUS and GC exist and results may carry
    /// route/interface fields (`mtu`, `table`, `scope`, …).
    pub fn has_status_and_gc(self) -> bool {
        self >= Version::V1_1_0
    }

    /// True up to 0.4.0, where each `ips` entry carries `"version": "4"|"6"`.
    pub fn ips_carry_version(self) -> bool {
        self <= Version::V0_4_0
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= Version::V0_4_0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Version::parse(&s).map_err(|e| serde::de::Error::custom(e.msg))
    }
}

/// What VERSION prints: `{"cniVersion": "1.1.0", "supportedVersions": [...]}`.
/// Built without reading any config: VERSION must be fast and side-effect free.
pub fn version_info() -> serde_json::Value {
    serde_json::json!({
        "cniVersion": Version::LATEST.as_str(),
        "supportedVersions": SUPPORTED_VERSIONS.map(Version::as_str),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_version_round_trips_through_its_string() {
        for v in SUPPORTED_VERSIONS {
            assert_eq!(Version::parse(v.as_str()).unwrap(), v);
        }
    }

    #[test]
    fn unknown_versions_are_code_1() {
        for s in ["0.1.0", "0.2.0", "0.3.0", "1.2.0", "2.0.0", "", "latest"] {
            let e = Version::parse(s).unwrap_err();
            assert_eq!(e.code, ErrorCode::IncompatibleVersion.code(), "{s}");
        }
    }

    #[test]
    fn versions_order_oldest_to_newest() {
        assert!(Version::V0_3_1 < Version::V0_4_0);
        assert!(Version::V1_0_0 < Version::V1_1_0);
        assert!(Version::V1_1_0.has_status_and_gc());
        assert!(!Version::V1_0_0.has_status_and_gc());
        assert!(Version::V0_4_0.ips_carry_version());
        assert!(!Version::V1_0_0.ips_carry_version());
    }

    #[test]
    fn version_info_lists_all_four() {
        let v = version_info();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }
}
