//! CHECK: compare the kernel with what ADD made (interface, addresses, routes,
//! sysctls), after the IPAM plugin's own CHECK (skipped for a no-IPAM address). Any difference is an error listing
//! every one found.

use std::path::Path;

use sluice_cni::delegate;
use sluice_cni::protocol::{CniError, CniResult, Command, ErrorCode};

use super::Ctx;
use crate::agent_api;
use crate::error::PluginError;
use crate::netns::Netns;
use crate::sysctl;
use crate::wiring::{self, HostView, Plan, PodView};
use sluice_cni::veth::PRIMARY_IFNAME;
use sluice_netlink::Netlink;
use sluice_node_files::local_api::RequestedAddress;

pub fn exec(ctx: &Ctx<'_>) -> Result<(), PluginError> {
    let prev = ctx.conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidNetworkConfig,
            "CHECK needs prevResult (the result of ADD)",
        )
    })?;
    let prev = CniResult::parse(prev)?;
    // The address ADD reported for our pod interface.
    let pod_index = prev.interfaces.iter().position(|i| {
        i.name == ctx.env.ifname() && i.sandbox.as_deref().is_some_and(|s| !s.is_empty())
    });
    let address = prev
        .ips
        .iter()
        .filter(|ip| pod_index.is_none() || ip.interface == pod_index)
        .find_map(|ip| match ip.address {
            ipnet::IpNet::V4(a) => ipnet::Ipv4Net::new(a.addr(), 32).ok(),
            _ => None,
        })
        .ok_or_else(|| {
            PluginError::Check(vec![format!(
                "prevResult has no IPv4 address for {}",
                ctx.env.ifname()
            )])
        })?;
    // IPAM's own CHECK, unless the address is the pod's no-IPAM one (ADD used it as
    // given and IPAM holds nothing for it). Only the agent knows the annotation; when
    // it cannot say, IPAM's CHECK runs and reports what it holds.
    // An annotation changed since ADD into something malformed is not CHECK's error.
    let no_ipam = matches!(
        agent_api::requested_address(ctx).ok().flatten(),
        Some(RequestedAddress::NoIpam(a)) if a == address.addr()
    );
    if let Some(path) = ctx.ipam_path()?.filter(|_| !no_ipam) {
        let conf = delegate::config_for(&path, ctx.conf)?;
        delegate::ipam_verb(&path, Command::Check, &conf)?;
    }

    let netns = Netns::open(ctx.env.netns.as_deref().unwrap_or(Path::new("")))?;
    let mut host = Netlink::open()?;
    let host_ifname = ctx.host_ifname();
    let host_link = host.link_by_name(&host_ifname)?;
    let host_view = HostView {
        addresses: match &host_link {
            Some(l) => host.addresses(l.index)?,
            None => vec![],
        },
        routes: host.routes4()?,
        sysctls: sysctl::HOST_VETH
            .iter()
            .map(|(k, _)| (*k, sysctl::read(k, &host_ifname).ok()))
            .collect(),
        link: host_link,
    };
    let ifname = ctx.env.ifname();
    let pod_view = netns.run(|| -> Result<PodView, PluginError> {
        let mut pod = Netlink::open()?;
        let link = pod.link_by_name(ifname)?;
        Ok(PodView {
            addresses: match &link {
                Some(l) => pod.addresses(l.index)?,
                None => vec![],
            },
            routes: pod.routes4()?,
            link,
        })
    })??;
    let plan = Plan {
        host_ifname,
        pod_ifname: ifname.to_owned(),
        address,
        mtu: 0,
        primary: ifname == PRIMARY_IFNAME,
        routes: wiring::secondary_routes(&prev),
        alias: ctx.alias(),
    };
    let bad = wiring::check(&plan, &host_view, &pod_view);
    if bad.is_empty() {
        Ok(())
    } else {
        Err(PluginError::Check(bad))
    }
}
