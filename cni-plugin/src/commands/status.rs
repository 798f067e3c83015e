//! STATUS (CNI 1.1): succeed when an ADD would. Not ready (50) when the IPAM plugin
//! is missing, the MTU file is unusable, the agent is required and missing or not
//! ready, or the IPAM plugin itself reports not ready; 51 (limited connectivity)
//! when a required agent has stopped reporting, since then nothing keeps existing
//! pods' routes and policy.

use sluice_cni::delegate;
use sluice_cni::protocol::{CniError, Command, ErrorCode};

use super::Ctx;
use crate::error::PluginError;
use sluice_node_files::status::{self as agent_status, Readiness};

pub fn exec(ctx: &Ctx<'_>) -> Result<(), PluginError> {
    let not_ready = |msg: String| CniError::new(ErrorCode::PluginNotAvailable, msg);
    if ctx.plugin.require_agent {
        match agent_status::read(&ctx.plugin.agent_status_file) {
            Readiness::Ready => {}
            Readiness::Stale(r) => {
                return Err(
                    CniError::new(ErrorCode::PluginNotAvailableLimitedConnectivity, r).into(),
                );
            }
            Readiness::Missing(r) | Readiness::NotReady(r) => return Err(not_ready(r).into()),
        }
    }
    if ctx.plugin.mtu.is_none() {
        match std::fs::read_to_string(&ctx.plugin.mtu_file) {
            Ok(s) if s.trim().parse::<u32>().is_err() => {
                return Err(not_ready(format!(
                    "MTU file {} holds {:?}, not a number",
                    ctx.plugin.mtu_file.display(),
                    s.trim()
                ))
                .into());
            }
            _ => {}
        }
    }
    let Some(ipam) = &ctx.conf.ipam else {
        return Err(not_ready("the config has no ipam section".into()).into());
    };
    let path = delegate::find_in_path(&ipam.plugin_type, &ctx.env.path).map_err(|e| {
        not_ready(format!(
            "IPAM plugin {:?} is not installed: {e}",
            ipam.plugin_type
        ))
    })?;
    // The IPAM plugin knows whether it has (or can claim) a block and whether its
    // store is writable; a pre-1.1 plugin cannot say, and is taken as ready.
    delegate::ipam_status_or_gc(&path, Command::Status, &ctx.conf.bytes)?;
    Ok(())
}
