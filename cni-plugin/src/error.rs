//! Everything that can fail in the plugin, and the one place that turns it into a
//! CNI error code. The codes are the registry's (`sluice_cni_protocol::codes`,
//! docs/cni-errors.md), shared with sluice-ipam so each number means one thing.

use std::path::PathBuf;

use sluice_cni::delegate::DelegateError;
use sluice_cni::protocol::{CniError, ErrorCode};

use crate::netns::NetnsError;
use crate::sysctl::SysctlError;
use sluice_netlink::NetlinkError;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Already a CNI error (protocol parsing, a verb not allowed in this version).
    #[error(transparent)]
    Cni(#[from] CniError),
    #[error(transparent)]
    Delegate(#[from] DelegateError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
    #[error("{0}")]
    Config(String),
    #[error("interface {ifname} already exists in network namespace {netns}")]
    IfnameTaken { ifname: String, netns: PathBuf },
    #[error(
        "host interface name {name} is taken by a {kind} interface (alias {alias:?}) that is not this attachment's"
    )]
    HostNameTaken {
        name: String,
        kind: String,
        alias: String,
    },
    #[error("IPAM plugin {ipam} returned no IPv4 address")]
    NoIpv4 { ipam: String },
    #[error("MTU file {path}: {detail}")]
    MtuFile { path: PathBuf, detail: String },
    #[error("{0}")]
    AgentNotReady(String),
    #[error(transparent)]
    AddressAnnotation(#[from] sluice_node_files::local_api::AnnotationError),
    #[error("no-IPAM address {address} is already used by {holder}")]
    NoIpamCollides {
        address: std::net::Ipv4Addr,
        holder: String,
    },
    #[error("CHECK failed: {}", .0.join("; "))]
    Check(Vec<String>),
    /// Teardown (DEL, GC) keeps going past failures and reports them together.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Several(Vec<PluginError>),
}

impl From<PluginError> for CniError {
    fn from(e: PluginError) -> CniError {
        let sluice =
            |code: ErrorCode, msg: String, hint: &str| CniError::new(code, msg).with_details(hint);
        match e {
            PluginError::Cni(c) => c,
            PluginError::Delegate(d) => d.into(),
            PluginError::Netns(NetnsError::Missing(p)) => CniError::new(
                ErrorCode::UnknownContainer,
                format!("network namespace {} does not exist", p.display()),
            )
            .with_details("the sandbox is gone; nothing was configured"),
            PluginError::Netns(n) => sluice(
                ErrorCode::Netns,
                n.to_string(),
                "CNI_NETNS must name a network namespace (/run/netns/<name> or /proc/<pid>/ns/net)",
            ),
            PluginError::Netlink(n) => sluice(
                ErrorCode::Netlink,
                n.to_string(),
                "the kernel refused a link/address/route change; see the plugin log",
            ),
            PluginError::Sysctl(s) => {
                sluice(ErrorCode::Sysctl, s.to_string(), "is /proc/sys writable?")
            }
            PluginError::Config(m) => CniError::new(ErrorCode::InvalidNetworkConfig, m),
            e @ PluginError::IfnameTaken { .. } => sluice(
                ErrorCode::IfnameTaken,
                e.to_string(),
                "pick another CNI_IFNAME, or DEL the attachment that holds it",
            ),
            e @ PluginError::HostNameTaken { .. } => sluice(
                ErrorCode::HostNameTaken,
                e.to_string(),
                "remove or rename that interface; sluice only replaces its own stale veth of the same pod, network and interface",
            ),
            e @ PluginError::NoIpv4 { .. } => sluice(
                ErrorCode::NoIpv4,
                e.to_string(),
                "sluice wires IPv4 pods: give the IPAM plugin an IPv4 range",
            ),
            e @ PluginError::MtuFile { .. } => sluice(
                ErrorCode::MtuFile,
                e.to_string(),
                "the agent writes one number; fix or remove the file, or set mtu in the config",
            ),
            PluginError::AgentNotReady(m) => CniError::new(ErrorCode::TryAgainLater, m),
            e @ PluginError::AddressAnnotation(_) => sluice(
                ErrorCode::AddressAnnotationInvalid,
                e.to_string(),
                "write a JSON list of one IPv4 address, e.g. [\"10.244.3.7\"], in one of the two annotations",
            ),
            e @ PluginError::NoIpamCollides { .. } => sluice(
                ErrorCode::NoIpamAddressCollides,
                e.to_string(),
                "with sluice.dev/ip-addrs-no-ipam the operator answers for uniqueness: pick an unused address",
            ),
            e @ PluginError::Check(_) => sluice(
                ErrorCode::CheckFailed,
                e.to_string(),
                "the pod's network was changed after ADD; recreate the pod",
            ),
            PluginError::Several(mut v) => match v.len() {
                1 => v.remove(0).into(),
                _ => {
                    let all = v
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; ");
                    let first: CniError = v.remove(0).into();
                    first.with_details(all)
                }
            },
        }
    }
}

/// Collects teardown errors so DEL and GC do everything they can before reporting.
#[derive(Default)]
pub struct Errors(Vec<PluginError>);

impl Errors {
    pub fn keep<T>(&mut self, r: Result<T, impl Into<PluginError>>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                let e = e.into();
                crate::log::log!("error (continuing): {e}");
                self.0.push(e);
                None
            }
        }
    }

    pub fn push(&mut self, e: PluginError) {
        crate::log::log!("error (continuing): {e}");
        self.0.push(e);
    }

    pub fn finish(self) -> Result<(), PluginError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(PluginError::Several(self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_its_code() {
        let table: Vec<(PluginError, ErrorCode)> = vec![
            (
                PluginError::Netns(NetnsError::Missing("/run/netns/x".into())),
                ErrorCode::UnknownContainer,
            ),
            (
                PluginError::Config("bad".into()),
                ErrorCode::InvalidNetworkConfig,
            ),
            (
                PluginError::AgentNotReady("starting".into()),
                ErrorCode::TryAgainLater,
            ),
            (
                PluginError::Netlink(NetlinkError::Kernel {
                    op: "x".into(),
                    errno: libc::EPERM,
                }),
                ErrorCode::Netlink,
            ),
            (
                PluginError::IfnameTaken {
                    ifname: "eth0".into(),
                    netns: "/x".into(),
                },
                ErrorCode::IfnameTaken,
            ),
            (
                PluginError::HostNameTaken {
                    name: "slc".into(),
                    kind: "bridge".into(),
                    alias: String::new(),
                },
                ErrorCode::HostNameTaken,
            ),
            (
                PluginError::NoIpv4 {
                    ipam: "host-local".into(),
                },
                ErrorCode::NoIpv4,
            ),
            (
                PluginError::MtuFile {
                    path: "/f".into(),
                    detail: "x".into(),
                },
                ErrorCode::MtuFile,
            ),
            (PluginError::Check(vec!["x".into()]), ErrorCode::CheckFailed),
            (
                PluginError::AddressAnnotation(sluice_node_files::local_api::AnnotationError::Both),
                ErrorCode::AddressAnnotationInvalid,
            ),
            (
                PluginError::NoIpamCollides {
                    address: "10.0.0.1".parse().unwrap(),
                    holder: "x".into(),
                },
                ErrorCode::NoIpamAddressCollides,
            ),
            (
                PluginError::Delegate(DelegateError::NotFound {
                    plugin: "p".into(),
                    searched: "/x".into(),
                }),
                ErrorCode::IpamPluginNotFound,
            ),
        ];
        for (e, code) in table {
            let shown = e.to_string();
            let c: CniError = e.into();
            assert_eq!(c.code, code.code(), "{shown}");
            assert!(!c.msg.is_empty());
        }
    }

    #[test]
    fn several_errors_report_the_first_code_and_all_messages() {
        let e = PluginError::Several(vec![
            PluginError::Config("first".into()),
            PluginError::Check(vec!["second".into()]),
        ]);
        let c: CniError = e.into();
        assert_eq!(c.code, 7);
        assert!(
            c.details.contains("first") && c.details.contains("second"),
            "{}",
            c.details
        );
    }
}
