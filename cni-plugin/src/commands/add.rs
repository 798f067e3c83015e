//! ADD: wire one pod (docs/architecture.md, "A pod is wired"). Every step that creates something
//! is recorded, and on any failure the record is undone in reverse, IPAM DEL
//! included, so a failed ADD leaves nothing behind.

use std::path::Path;

use serde_json::Value;
use sluice_cni::protocol::CniResult;

use super::Ctx;
use crate::agent_api;
use crate::error::PluginError;
use crate::ipam::{Ipam, Requested};
use crate::log::log;
use crate::mtu;
use crate::netns::Netns;
use crate::sysctl;
use crate::wiring::{self, HOST_MAC, Plan};
use sluice_cni::veth::PRIMARY_IFNAME;
use sluice_netlink::{Netlink, VethPeer, parse_mac};
use sluice_node_files::local_api::RequestedAddress;
use sluice_node_files::status as agent_status;

/// What has been created so far, to undo on failure.
enum Done {
    /// IPAM allocated (in-process or delegated).
    Ipam(Ipam),
    /// The host end: recorded as soon as the kernel accepted the pair, its index
    /// as soon as it is known. Undone by index, never by name alone: the name is
    /// the pod's, shared by all its sandboxes, and may pass to another one.
    HostVeth { name: String, index: Option<u32> },
}

pub fn exec(ctx: &Ctx<'_>) -> Result<Value, PluginError> {
    if ctx.plugin.require_agent {
        let r = agent_status::read(&ctx.plugin.agent_status_file);
        if !r.is_ready() {
            return Err(PluginError::AgentNotReady(r.reason().to_owned()));
        }
    }
    let Some(ipam) = ctx.conf.ipam.as_ref() else {
        return Err(PluginError::Config(
            "the sluice plugin needs an \"ipam\" section (e.g. sluice-ipam or host-local)".into(),
        ));
    };
    // Every address this ADD asks for, gathered (and a malformed one refused)
    // before anything is touched; IPAM takes them from here. Then the pod's
    // annotations through the agent: ip-addrs joins the same request,
    // ip-addrs-no-ipam bypasses IPAM.
    let mut requested = Requested::from_cni(ctx.env, ctx.conf)?;
    let no_ipam = match agent_api::requested_address(ctx)? {
        Some(RequestedAddress::Ipam(a)) => {
            requested.add(a);
            None
        }
        Some(RequestedAddress::NoIpam(a)) => {
            agent_api::no_ipam_alone(a, &requested.all())?;
            Some(a)
        }
        None => None,
    };
    let netns_path = ctx.env.netns.as_deref().unwrap_or(Path::new(""));
    let netns = Netns::open(netns_path)?;
    let ifname = ctx.env.ifname();
    let host_ifname = ctx.host_ifname();

    let mut host = Netlink::open()?;
    let mut pod = netns.run(Netlink::open)??;

    // Refuse before IPAM runs, so a refused ADD allocates nothing.
    if pod.link_by_name(ifname)?.is_some() {
        return Err(PluginError::IfnameTaken {
            ifname: ifname.to_owned(),
            netns: netns_path.to_owned(),
        });
    }
    if let Some(old) = host.link_by_name(&host_ifname)? {
        // By the naming rule the name belongs to this pod and interface: a veth
        // left by an earlier sandbox of the same pod whose DEL never came (same
        // network and ifname, older container id). Anything else is not ours.
        let ours = old.kind.as_deref() == Some("veth")
            && old
                .alias
                .as_deref()
                .and_then(wiring::parse_alias)
                .is_some_and(|(net, _, ifn)| net == ctx.conf.name && ifn == ifname);
        if !ours {
            return Err(PluginError::HostNameTaken {
                name: host_ifname,
                kind: old.kind.unwrap_or_else(|| "unknown".into()),
                alias: old.alias.unwrap_or_default(),
            });
        }
        log!(
            "removing stale host interface {host_ifname} (alias {:?})",
            old.alias
        );
        host.del_link(old.index)?;
    }
    // A runtime retrying an ADD whose plugin was killed mid-way: the half-wired
    // host end of this very attachment is still there under its pending name.
    if let Some(old) = host.link_by_name(&ctx.pending_ifname())?
        && old.alias.is_none()
    {
        log!("removing {} left by an interrupted ADD", old.name);
        host.del_link_if_present(old.index)?;
    }
    let (mtu, source) = mtu::resolve(
        ctx.plugin.mtu,
        &ctx.plugin.mtu_file,
        |p| std::fs::read_to_string(p),
        || uplink(&mut host),
    )?;
    if !matches!(source, mtu::MtuSource::Config | mtu::MtuSource::File) {
        log!(
            "MTU file {} missing: using {mtu} from {source:?} minus IPIP overhead",
            ctx.plugin.mtu_file.display()
        );
    }
    let pod_mac = requested_mac(ctx)?;

    let mut done = Vec::new();
    let outcome = wire(
        ctx,
        &netns,
        &mut host,
        &mut pod,
        &mut done,
        &ipam.plugin_type,
        &requested,
        mtu,
        pod_mac,
        no_ipam,
    );
    match outcome {
        Ok(v) => Ok(v),
        Err(e) => {
            log!("ADD failed: {e}; rolling back");
            rollback(ctx, &mut host, done);
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn wire(
    ctx: &Ctx<'_>,
    netns: &Netns,
    host: &mut Netlink,
    pod: &mut Netlink,
    done: &mut Vec<Done>,
    ipam_type: &str,
    requested: &Requested,
    mtu: u32,
    pod_mac: Option<[u8; 6]>,
    no_ipam: Option<std::net::Ipv4Addr>,
) -> Result<Value, PluginError> {
    let ipam_result = match no_ipam {
        // IPAM bypassed: the operator answers for uniqueness, this node only
        // refuses what it already uses.
        Some(a) => {
            agent_api::check_no_ipam(host, a)?;
            agent_api::check_no_ipam_allocations(Ipam::of(ctx)?.as_ref(), a)?;
            agent_api::no_ipam_result(a)
        }
        None => {
            let mut ipam = Ipam::of(ctx)?.expect("exec checked the ipam section");
            let r = ipam.add(ctx, requested)?;
            done.push(Done::Ipam(ipam));
            r
        }
    };
    let address = wiring::pod_address(&ipam_result).ok_or_else(|| PluginError::NoIpv4 {
        ipam: ipam_type.to_owned(),
    })?;
    if ipam_result.ips.iter().any(|ip| ip.address.addr().is_ipv6()) {
        log!("IPAM returned IPv6 addresses too; sluice wires IPv4 only and leaves them out");
    }
    let plan = Plan {
        host_ifname: ctx.host_ifname(),
        pod_ifname: ctx.env.ifname().to_owned(),
        address,
        mtu,
        primary: ctx.env.ifname() == PRIMARY_IFNAME,
        routes: wiring::secondary_routes(&ipam_result),
        alias: ctx.alias(),
    };

    // Created under the attachment's pending name, renamed and labelled with its
    // owner only once configured (see `pending_veth_name`).
    let pending = ctx.pending_ifname();
    host.add_veth(
        &pending,
        HOST_MAC,
        mtu,
        &VethPeer {
            name: &plan.pod_ifname,
            netns_fd: netns.raw_fd(),
            mac: pod_mac,
        },
    )?;
    done.push(Done::HostVeth {
        name: pending.clone(),
        index: None,
    });
    let host_link = host
        .link_by_name(&pending)?
        .ok_or_else(|| PluginError::Config(format!("{pending} vanished after creation")))?;
    if let Some(Done::HostVeth { index, .. }) = done.last_mut() {
        *index = Some(host_link.index);
    }
    // Per-interface sysctls follow the device through the rename.
    for (key, value) in sysctl::HOST_VETH {
        sysctl::write(key, &pending, value)?;
    }
    host.rename_label_up(host_link.index, &plan.host_ifname, &plan.alias)?;

    let pod_link = pod.link_by_name(&plan.pod_ifname)?.ok_or_else(|| {
        PluginError::Config(format!("{} did not appear in the pod", plan.pod_ifname))
    })?;
    // The same alias on the pod end lets DEL recognise it: a /proc/<pid>/ns/net
    // path may, after the pod died and the pid was reused, name someone else's
    // namespace, whose eth0 DEL must not touch.
    pod.set_up(pod_link.index, Some(&plan.alias))?;
    pod.add_address(pod_link.index, ipnet::IpNet::V4(plan.address))?;
    for r in plan.pod_routes(pod_link.index) {
        pod.add_route4(&r, false)?;
    }
    // Exclusive, not replace: a route for this address can only exist if another
    // live pod holds it (routes die with their link), i.e. IPAM handed out one
    // address twice. Failing here keeps that pod's traffic where it is.
    host.add_route4(&plan.host_route(host_link.index), false)?;

    let prev = ctx
        .conf
        .prev_result
        .as_ref()
        .map(CniResult::parse)
        .transpose()?;
    let dns = ctx
        .conf
        .dns
        .clone()
        .filter(|d| !d.is_empty())
        .unwrap_or(ipam_result.dns);
    let mac = pod_link.mac.unwrap_or_default();
    let netns_str = ctx
        .env
        .netns
        .as_deref()
        .unwrap_or(Path::new(""))
        .display()
        .to_string();
    log!(
        "wired {} <-> {} {} mtu {mtu}",
        plan.host_ifname,
        plan.pod_ifname,
        plan.address
    );
    agent_api::report_attachment(
        ctx,
        &plan.host_ifname,
        plan.address.addr(),
        no_ipam.is_some(),
    );
    Ok(plan
        .result(mac, &netns_str, dns, prev)
        .render(ctx.conf.cni_version))
}

fn rollback(ctx: &Ctx<'_>, host: &mut Netlink, done: Vec<Done>) {
    for step in done.into_iter().rev() {
        match step {
            // Deleting the host end removes the pod end, the pod's address and
            // routes, and the host /32 route with it.
            Done::HostVeth { name, index } => {
                // Without an index the link was created but could not be looked
                // up again: delete it by name only while it carries no alias,
                // i.e. while it is still the unlabelled one this ADD created.
                let index = index.or_else(|| match host.link_by_name(&name) {
                    Ok(Some(l)) if l.alias.is_none() => Some(l.index),
                    _ => None,
                });
                if let Some(i) = index
                    && let Err(e) = host.del_link_if_present(i)
                {
                    log!("rollback: deleting {name}: {e}");
                }
            }
            Done::Ipam(ipam) => {
                if let Err(e) = ipam.del(ctx) {
                    log!("rollback: IPAM DEL: {e}");
                }
            }
        }
    }
}

/// `MAC=` from CNI_ARGS, or `runtimeConfig.mac` (the `mac` capability).
fn requested_mac(ctx: &Ctx<'_>) -> Result<Option<[u8; 6]>, PluginError> {
    let s = ctx.env.args.mac.clone().or_else(|| {
        ctx.conf
            .runtime_config_key("mac")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    });
    match s {
        None => Ok(None),
        Some(s) => parse_mac(&s).map(Some).ok_or_else(|| {
            PluginError::Config(format!("requested MAC {s:?} is not aa:bb:cc:dd:ee:ff"))
        }),
    }
}

/// The default-route device and its MTU, for the MTU fallback.
fn uplink(host: &mut Netlink) -> Option<(String, u32)> {
    let routes = host.routes4().ok()?;
    let oif = routes
        .iter()
        .find(|r| r.dst.prefix_len() == 0 && r.oif.is_some())?
        .oif?;
    host.links()
        .ok()?
        .into_iter()
        .find(|l| l.index == oif)
        .and_then(|l| Some((l.name, l.mtu?)))
}
