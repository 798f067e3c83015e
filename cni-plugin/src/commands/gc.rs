//! GC (CNI 1.1): remove host-side interfaces of this network whose attachment is
//! not in `cni.dev/valid-attachments` (or the older `cni.dev/attachments`), then
//! forward GC to the IPAM plugin so it releases their addresses.
//!
//! An interface is ours when its alias is `sluice:<this network>:<cid>:<ifname>`
//! (set by ADD); interfaces of other networks and of anyone else are never touched.

use std::collections::HashSet;

use sluice_cni::delegate;
use sluice_cni::protocol::{CniError, Command, ErrorCode};

use super::Ctx;
use crate::error::{Errors, PluginError};
use crate::log::log;
use crate::wiring::parse_alias;
use sluice_cni::veth::{network_pending_prefix, pending_veth_name};
use sluice_netlink::Netlink;

pub fn exec(ctx: &Ctx<'_>) -> Result<(), PluginError> {
    // Without the list, "keep nothing" and "I was told nothing" look the same;
    // deleting every pod's interface on a malformed request is not an option.
    let Some(valid) = ctx.conf.valid_attachments()? else {
        return Err(CniError::new(
            ErrorCode::InvalidNetworkConfig,
            "GC needs cni.dev/valid-attachments",
        )
        .into());
    };
    let keep: HashSet<(&str, &str)> = valid
        .iter()
        .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
        .collect();
    // Host ends of ADDs killed before they were labelled carry only a pending
    // name: those of this network that belong to no valid attachment are leftovers.
    let pending_prefix = network_pending_prefix(&ctx.conf.name);
    let keep_pending: HashSet<String> = valid
        .iter()
        .map(|a| pending_veth_name(&ctx.conf.name, &a.container_id, &a.ifname))
        .collect();
    let mut errors = Errors::default();
    if let Some(mut host) = errors.keep(Netlink::open())
        && let Some(links) = errors.keep(host.links())
    {
        for l in links {
            if l.alias.is_none()
                && l.name.starts_with(&pending_prefix)
                && !keep_pending.contains(&l.name)
            {
                if errors.keep(host.del_link_if_present(l.index)).is_some() {
                    log!("GC: deleted {} left by an interrupted ADD", l.name);
                }
                continue;
            }
            let Some((net, cid, ifname)) = l.alias.as_deref().and_then(parse_alias) else {
                continue;
            };
            if net != ctx.conf.name || keep.contains(&(cid, ifname)) {
                continue;
            }
            if errors.keep(host.del_link_if_present(l.index)).is_some() {
                log!("GC: deleted {} of stale attachment {cid}/{ifname}", l.name);
            }
        }
    }
    if let Some(Some(path)) = errors.keep(ctx.ipam_path()) {
        errors.keep(delegate::ipam_status_or_gc(
            &path,
            Command::Gc,
            &ctx.conf.bytes,
        ));
    }
    errors.finish()
}
