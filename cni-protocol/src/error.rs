//! The CNI error object `{cniVersion, code, msg, details}` and the one place that
//! prints it. Its codes come from the registry in [`crate::codes`].

use std::fmt;
use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::codes::ErrorCode;
use crate::version::Version;

/// A CNI error as the spec defines it. `code`, `msg` and `details` are what the
/// runtime logs; write `msg` for an operator (what failed and what to do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> CniError {
        CniError {
            code: code.code(),
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// The JSON object the spec asks for, stamped with `version` (the config's
    /// version when it was readable, else our newest).
    pub fn to_json(&self, version: Version) -> serde_json::Value {
        let mut v = serde_json::json!({
            "cniVersion": version.as_str(),
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = self.details.clone().into();
        }
        v
    }

    /// Print the error to `out` (stdout in a plugin) as one JSON object: the only
    /// way an error leaves a CNI binary. The caller then exits non-zero.
    pub fn write_to(&self, version: Version, mut out: impl Write) -> std::io::Result<()> {
        serde_json::to_writer(&mut out, &self.to_json(version))?;
        out.write_all(b"\n")?;
        out.flush()
    }

    /// Decode an error another plugin printed (a delegated IPAM plugin).
    pub fn from_plugin_output(stdout: &[u8]) -> Option<CniError> {
        let v: serde_json::Value = serde_json::from_slice(stdout).ok()?;
        let code = v.get("code")?.as_u64()?;
        Some(CniError {
            code: u32::try_from(code).unwrap_or(ErrorCode::Internal.code()),
            msg: v
                .get("msg")
                .and_then(|m| m.as_str())
                .unwrap_or("")
                .to_owned(),
            details: v
                .get("details")
                .and_then(|m| m.as_str())
                .unwrap_or("")
                .to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_error_is_one_json_line_with_version_code_msg_details() {
        let e = CniError::new(ErrorCode::InvalidNetworkConfig, "bad mtu").with_details("mtu=-1");
        let mut out = Vec::new();
        e.write_to(Version::V1_0_0, &mut out).unwrap();
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion": "1.0.0", "code": 7, "msg": "bad mtu", "details": "mtu=-1"})
        );
    }

    #[test]
    fn empty_details_are_omitted() {
        let v = CniError::new(ErrorCode::TryAgainLater, "busy").to_json(Version::V1_1_0);
        assert!(v.get("details").is_none());
    }

    #[test]
    fn a_delegate_error_is_decoded_back() {
        let e = CniError::from_plugin_output(
            br#"{"cniVersion":"1.0.0","code":11,"msg":"no addresses","details":"pool full"}"#,
        )
        .unwrap();
        assert_eq!(e.code, 11);
        assert_eq!(e.msg, "no addresses");
        assert_eq!(e.details, "pool full");
        assert!(CniError::from_plugin_output(b"not json").is_none());
        assert!(CniError::from_plugin_output(br#"{"ips":[]}"#).is_none());
    }
}
