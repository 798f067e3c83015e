//! Addresses a runtime asks for, by the CNI conventions every IPAM plugin reads: the
//! `ips` capability (`runtimeConfig.ips`, a list of `"10.0.0.5"` or
//! `"10.0.0.5/24"`; what podman `--ip` sends) and `IP=` in `CNI_ARGS` (one address,
//! or several separated by commas). sluice gives a pod one IPv4 address, so a request
//! is at most one IPv4 address; the same address named twice counts once.

use std::net::{IpAddr, Ipv4Addr};

use serde_json::Value;

use crate::{CniArgs, CniError, ErrorCode, NetConf};

/// Every address the runtime asked for, in the order given, each once. A value that
/// is not an address is code 115 here; more than one address is refused later, by
/// [`single_requested`], after every source (an annotation too) has been added.
pub fn requested_ips(args: &CniArgs, conf: &NetConf) -> Result<Vec<Ipv4Addr>, CniError> {
    let mut out = Vec::new();
    if let Some(v) = conf.runtime_config_key("ips") {
        let Some(list) = v.as_array() else {
            return Err(invalid(format!(
                "runtimeConfig.ips must be a list of addresses, not {v}"
            )));
        };
        for item in list {
            let Value::String(s) = item else {
                return Err(invalid(format!(
                    "runtimeConfig.ips holds {item}, not an address string"
                )));
            };
            push(&mut out, parse(s, "runtimeConfig.ips")?);
        }
    }
    if let Some(ip) = &args.ip {
        for s in ip.split(',') {
            push(&mut out, parse(s, "CNI_ARGS IP")?);
        }
    }
    Ok(out)
}

/// The one address to allocate, if any was asked for: two different addresses are
/// code 115 (sluice wires one IPv4 address per attachment).
pub fn single_requested(ips: &[Ipv4Addr]) -> Result<Option<Ipv4Addr>, CniError> {
    match ips {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        many => Err(invalid(format!(
            "{} addresses were requested ({}); sluice gives an attachment exactly one IPv4 address: request one",
            many.len(),
            many.iter()
                .map(Ipv4Addr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn push(out: &mut Vec<Ipv4Addr>, ip: Ipv4Addr) {
    if !out.contains(&ip) {
        out.push(ip);
    }
}

/// `10.0.0.5` or `10.0.0.5/24` (the prefix, which podman adds, is ignored).
fn parse(s: &str, source: &str) -> Result<Ipv4Addr, CniError> {
    let addr = s.trim().split_once('/').map_or(s.trim(), |(a, _)| a);
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => Ok(v4),
        Ok(IpAddr::V6(_)) => Err(invalid(format!(
            "{source} requests {s}, an IPv6 address; sluice allocates IPv4 only"
        ))),
        Err(_) => Err(invalid(format!(
            "{source} requests {s:?}, which is not an IPv4 address"
        ))),
    }
}

fn invalid(msg: String) -> CniError {
    CniError::new(ErrorCode::RequestedAddressInvalid, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(rc: &str) -> NetConf {
        NetConf::parse(
            format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"sluice","runtimeConfig":{rc}}}"#)
                .as_bytes(),
        )
        .unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn the_ips_capability_and_cni_args_ip_are_read_and_merged() {
        let args = CniArgs::parse("IgnoreUnknown=1;IP=10.0.0.5").unwrap();
        let c = conf(r#"{"ips":["10.0.0.5/24"]}"#);
        assert_eq!(requested_ips(&args, &c).unwrap(), [ip("10.0.0.5")]);
        let c = conf(r#"{"ips":["10.0.0.6"]}"#);
        let both = requested_ips(&args, &c).unwrap();
        assert_eq!(both, [ip("10.0.0.6"), ip("10.0.0.5")]);
        let e = single_requested(&both).unwrap_err();
        assert_eq!(e.code, ErrorCode::RequestedAddressInvalid.code());
        assert!(e.msg.contains("2 addresses"), "{}", e.msg);
        assert!(
            requested_ips(&CniArgs::default(), &conf("{}"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(single_requested(&[]).unwrap(), None);
    }

    #[test]
    fn malformed_and_ipv6_requests_are_code_115() {
        for (args, rc) in [
            ("IP=10.0.0", "{}"),
            ("IP=10.0.0.1,", "{}"),
            ("IP=fd00::1", "{}"),
            ("", r#"{"ips":"10.0.0.1"}"#),
            ("", r#"{"ips":[5]}"#),
            ("", r#"{"ips":["x/24"]}"#),
        ] {
            let e = requested_ips(&CniArgs::parse(args).unwrap(), &conf(rc)).unwrap_err();
            assert_eq!(
                e.code,
                ErrorCode::RequestedAddressInvalid.code(),
                "{args} {rc}"
            );
        }
    }
}
