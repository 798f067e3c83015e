//! DEL: remove the attachment, succeeding in every case real runtimes produce —
//! repeated DEL, no `prevResult`, empty `CNI_NETNS`, a namespace already gone,
//! links already gone. Every step runs even when an earlier one failed; failures
//! are reported together at the end.

use super::Ctx;
use crate::error::{Errors, PluginError};
use crate::ipam::Ipam;
use crate::log::log;
use crate::netns::{Netns, NetnsError};
use sluice_netlink::Netlink;

pub fn exec(ctx: &Ctx<'_>) -> Result<(), PluginError> {
    let mut errors = Errors::default();
    let host_ifname = ctx.host_ifname();
    let alias = ctx.alias();

    // Whether the host end was deleted here, taking the pod end with it.
    let mut pair_deleted = false;
    if let Some(mut host) = errors.keep(Netlink::open()) {
        match errors.keep(host.link_by_name(&host_ifname)) {
            Some(Some(l)) if l.alias.as_deref() == Some(alias.as_str()) => {
                match errors.keep(host.del_link_if_present(l.index)) {
                    Some(true) => {
                        log!("deleted {host_ifname}");
                        pair_deleted = true;
                    }
                    Some(false) => log!("{host_ifname} vanished before it could be deleted"),
                    None => {}
                }
            }
            // The name is derived from the pod, not the sandbox, so every sandbox of
            // one pod shares it: a newer sandbox's ADD took the name over, and this
            // DEL of the old one (kubelet removes dead sandboxes later, with or
            // without their netns) must leave the pod's live network alone.
            Some(Some(l)) => {
                log!(
                    "{host_ifname} belongs to another attachment (alias {:?}); left alone",
                    l.alias.unwrap_or_default()
                );
                pair_deleted = by_alias(&mut host, &alias, &mut errors);
            }
            Some(None) => {
                log!("{host_ifname} already gone");
                pair_deleted = by_alias(&mut host, &alias, &mut errors);
            }
            None => {}
        }
        // An ADD killed before it labelled the host end left it under its pending
        // name, which only this attachment can have.
        if !pair_deleted
            && let Some(Some(l)) = errors.keep(host.link_by_name(&ctx.pending_ifname()))
            && l.alias.is_none()
            && errors.keep(host.del_link_if_present(l.index)) == Some(true)
        {
            log!("deleted {} left by an interrupted ADD", l.name);
            pair_deleted = true;
        }
    }

    // The pod end normally went with the host end; remove it too if it survived
    // (the host end was renamed or moved by hand), but only if its alias says it
    // is this attachment's (ADD sets it on both ends).
    if let Some(path) = ctx.env.netns.as_deref().filter(|_| !pair_deleted) {
        match Netns::open(path) {
            Ok(ns) => {
                let ifname = ctx.env.ifname();
                let alias = alias.as_str();
                let r = ns.run(|| -> Result<bool, PluginError> {
                    let mut pod = Netlink::open()?;
                    match pod.link_by_name(ifname)? {
                        Some(l) if l.alias.as_deref() == Some(alias) => {
                            pod.del_link(l.index)?;
                            Ok(true)
                        }
                        _ => Ok(false),
                    }
                });
                match r {
                    Ok(Ok(true)) => log!("deleted {ifname} inside {}", path.display()),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => errors.push(e),
                    Err(e) => errors.push(e.into()),
                }
            }
            Err(NetnsError::Missing(_)) => {
                log!("netns {} is gone; nothing to do inside it", path.display())
            }
            Err(e) => errors.push(e.into()),
        }
    }

    if let Some(Some(ipam)) = errors.keep(Ipam::of(ctx))
        && errors.keep(ipam.del(ctx)).is_some()
    {
        log!("IPAM released the address");
    }
    crate::agent_api::report_detachment(ctx);
    errors.finish()
}

/// Not under the expected name, or the name now belongs to another sandbox: the
/// ADD may have seen different CNI_ARGS (a runtime that sends K8S_POD_* on ADD
/// only). The alias records the attachment. True when one was found and deleted.
fn by_alias(host: &mut Netlink, alias: &str, errors: &mut Errors) -> bool {
    let mut deleted = false;
    if let Some(links) = errors.keep(host.links()) {
        for l in links.iter().filter(|l| l.alias.as_deref() == Some(alias)) {
            if errors.keep(host.del_link_if_present(l.index)) == Some(true) {
                log!("deleted {} (found by alias)", l.name);
                deleted = true;
            }
        }
    }
    deleted
}
