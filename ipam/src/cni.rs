//! What `sluice-ipam` does with the CNI protocol, as a library: the settings from a
//! network config and environment, the ADD result, the requested address, and the
//! one mapping of an [`IpamError`] to a CNI error. The `sluice-ipam` binary and the
//! `sluice` plugin's in-process IPAM both use it, so the two answer alike.
//!
//! The address is returned as a /32: a pod owns exactly one address and nothing is
//! on-link (the `sluice` plugin routes via 169.254.1.1), so handing a main plugin the
//! block prefix would wrongly suggest the whole block is reachable on the link.

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};
use sluice_cni_protocol::{
    CniError, CniResult, Env, ErrorCode, IpConfig, NetConf, Route, requested_ips, single_requested,
};

use crate::config::{IpamConfig, IpamSettings};
use crate::error::IpamError;
use crate::node_ipam::{Assigned, BlockClaimer, ClaimAnswer};

/// The `ipam` section of `conf`, resolved (the node name may come from CNI_ARGS
/// `K8S_NODE_NAME`, else the host name).
pub fn settings(conf: &NetConf, env: &Env) -> Result<IpamSettings, CniError> {
    let ipam_conf: IpamConfig = match conf.raw.get("ipam") {
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "invalid sluice-ipam configuration",
            )
            .with_details(e.to_string())
        })?,
        None => IpamConfig::default(),
    };
    let node_from_args = env
        .args
        .other
        .iter()
        .find(|(k, _)| k == "K8S_NODE_NAME")
        .map(|(_, v)| v.as_str());
    ipam_conf
        .resolve(node_from_args, crate::config::hostname)
        .map_err(|e| cni_error(IpamError::from(e)))
}

/// The address the runtime asked for through the CNI conventions (`runtimeConfig.ips`,
/// `IP=` in CNI_ARGS), at most one.
pub fn requested(env: &Env, conf: &NetConf) -> Result<Option<Ipv4Addr>, CniError> {
    single_requested(&requested_ips(&env.args, conf)?)
}

/// ADD's result: the address as a /32, and the configured routes.
pub fn add_result(settings: &IpamSettings, assigned: Assigned) -> CniResult {
    CniResult {
        ips: vec![IpConfig {
            address: IpNet::V4(Ipv4Net::from(assigned.ip)),
            gateway: None,
            interface: None,
        }],
        routes: settings
            .routes
            .iter()
            .map(|r| Route::new(r.dst, r.gw))
            .collect(),
        ..CniResult::default()
    }
}

/// The one place an IPAM error becomes a CNI error: the code from
/// [`IpamError::cni_code`], the full message (which says what to do) as `msg`, the
/// underlying cause as `details`.
pub fn cni_error(e: IpamError) -> CniError {
    let code = e.cni_code();
    let mut details = Vec::new();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        details.push(s.to_string());
        src = s.source();
    }
    CniError::new(code, e.to_string()).with_details(details.join(": "))
}

/// The block claimer of a cluster node: the agent claims the block of a requested
/// address over the node-local API (`claim-block`, `sluice_node_files::local_api`)
/// and publishes it in the node-blocks file before answering.
pub struct AgentClaimer {
    pub socket: std::path::PathBuf,
}

impl BlockClaimer for AgentClaimer {
    fn claim(&self, ip: Ipv4Addr, _block: Ipv4Net) -> Result<ClaimAnswer, String> {
        use sluice_node_files::local_api::{self, CLAIM_TIMEOUT, Request, Response};
        let req = Request::ClaimBlock { address: ip };
        match local_api::call(&self.socket, &req, CLAIM_TIMEOUT) {
            Ok(Response::BlockClaimed { .. }) => Ok(ClaimAnswer::Claimed),
            Ok(Response::BlockTaken { owner, .. }) => Ok(ClaimAnswer::Taken { owner }),
            Ok(Response::Error { message }) => Err(format!("the agent says: {message}")),
            Ok(other) => Err(format!("the agent answered {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}
