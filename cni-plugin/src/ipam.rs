//! The attachment's IPAM, in-process or delegated.
//!
//! When `ipam.type` is sluice's own (`sluice-ipam`) the plugin allocates in its own
//! process with the `sluice_ipam` library: the same state directory, the same lock,
//! the same decisions and error codes as the `sluice-ipam` binary, so the two
//! interleave safely on one node (and the binary stays, for chaining and for other
//! plugins). That saves ADD and DEL a second process start. Any other type is
//! exec'd through `CNI_PATH`, as the spec's delegation says.
//!
//! [`Requested`] is the one place the addresses an ADD asks for are gathered, from
//! every source, before IPAM sees them.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use sluice_cni::delegate;
use sluice_cni::protocol::{
    CniError, CniResult, Command, Env, NetConf, requested_ips, single_requested,
};
use sluice_ipam::{AttachmentKey, NodeIpam};

use crate::commands::Ctx;
use crate::error::PluginError;
use crate::log::log;

/// The IPAM type the plugin runs in-process.
pub const IN_PROCESS_TYPE: &str = "sluice-ipam";

/// The addresses this ADD asks IPAM for. Filled from the CNI conventions
/// ([`Requested::from_cni`]: `runtimeConfig.ips`, `IP=` in CNI_ARGS); other
/// sources (a pod annotation the agent reports) add theirs with [`Requested::add`]
/// before IPAM runs. In-process IPAM accepts at most one address (code 115
/// otherwise); a delegated plugin reads the CNI sources itself and is handed the
/// others as `runtimeConfig.ips`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requested {
    /// From the runtime's own config and environment, which a delegate sees too.
    from_cni: Vec<Ipv4Addr>,
    /// From elsewhere (an annotation), which a delegate must be told.
    added: Vec<Ipv4Addr>,
}

impl Requested {
    pub fn from_cni(env: &Env, conf: &NetConf) -> Result<Requested, PluginError> {
        Ok(Requested {
            from_cni: requested_ips(&env.args, conf)?,
            added: Vec::new(),
        })
    }

    /// Ask for `ip` too (another source than the CNI config and environment).
    // The pod's `sluice.dev/ip-addrs` annotation (the node-local API) is its caller.
    pub fn add(&mut self, ip: Ipv4Addr) {
        if !self.from_cni.contains(&ip) && !self.added.contains(&ip) {
            self.added.push(ip);
        }
    }

    /// Every address asked for, each once.
    pub fn all(&self) -> Vec<Ipv4Addr> {
        self.from_cni.iter().chain(&self.added).copied().collect()
    }

    /// The one address for in-process IPAM; two are code 115.
    pub fn single(&self) -> Result<Option<Ipv4Addr>, PluginError> {
        Ok(single_requested(&self.all())?)
    }
}

/// How this attachment's addresses are allocated.
pub enum Ipam {
    InProcess(Box<NodeIpam>),
    /// The plugin binary and the config it is given.
    Delegate {
        path: PathBuf,
        conf: Vec<u8>,
    },
}

impl Ipam {
    /// The config's IPAM; `None` when it has no `ipam` section.
    pub fn of(ctx: &Ctx<'_>) -> Result<Option<Ipam>, PluginError> {
        let Some(section) = &ctx.conf.ipam else {
            return Ok(None);
        };
        if section.plugin_type == IN_PROCESS_TYPE {
            let settings = sluice_ipam::cni::settings(ctx.conf, ctx.env).map_err(named)?;
            return Ok(Some(Ipam::InProcess(Box::new(NodeIpam::new(settings)))));
        }
        let path = delegate::find_in_path(&section.plugin_type, &ctx.env.path)?;
        let conf = delegate::config_for(&path, ctx.conf)?;
        Ok(Some(Ipam::Delegate { path, conf }))
    }

    /// ADD: the attachment's addresses.
    pub fn add(&mut self, ctx: &Ctx<'_>, requested: &Requested) -> Result<CniResult, PluginError> {
        match self {
            Ipam::InProcess(ipam) => {
                let want = requested.single()?;
                let a = ipam
                    .add(&key(ctx), &ctx.conf.name, want)
                    .map_err(|e| named(sluice_ipam::cni::cni_error(e)))?;
                log!(
                    "IPAM gave {} (block {}{})",
                    a.ip,
                    a.block,
                    if want.is_some() { ", requested" } else { "" }
                );
                Ok(sluice_ipam::cni::add_result(ipam.settings(), a))
            }
            Ipam::Delegate { path, conf } => {
                if !requested.added.is_empty() {
                    *conf = with_runtime_ips(conf, &requested.all())?;
                }
                Ok(delegate::ipam_add(path, conf)?)
            }
        }
    }

    /// DEL: release what the attachment holds (nothing held is not an error).
    pub fn del(&self, ctx: &Ctx<'_>) -> Result<(), PluginError> {
        match self {
            Ipam::InProcess(ipam) => {
                ipam.del(&key(ctx))
                    .map_err(|e| named(sluice_ipam::cni::cni_error(e)))?;
                Ok(())
            }
            Ipam::Delegate { path, conf } => Ok(delegate::ipam_verb(path, Command::Del, conf)?),
        }
    }
}

fn key(ctx: &Ctx<'_>) -> AttachmentKey {
    AttachmentKey::new(ctx.env.container_id(), ctx.env.ifname())
}

/// An in-process IPAM error reads as the `sluice-ipam` binary's would through
/// delegation: same code, message prefixed with its name.
fn named(mut e: CniError) -> PluginError {
    e.msg = format!("{IN_PROCESS_TYPE}: {}", e.msg);
    PluginError::Cni(e)
}

/// The delegate's config with `runtimeConfig.ips` set to `ips`.
fn with_runtime_ips(conf: &[u8], ips: &[Ipv4Addr]) -> Result<Vec<u8>, PluginError> {
    let mut v: serde_json::Value = serde_json::from_slice(conf)
        .map_err(|e| PluginError::Config(format!("network config: {e}")))?;
    let list: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
    if !v["runtimeConfig"].is_object() {
        v["runtimeConfig"] = serde_json::json!({});
    }
    v["runtimeConfig"]["ips"] = list.into();
    Ok(v.to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_added_address_reaches_a_delegate_as_runtime_config_ips() {
        let conf =
            br#"{"cniVersion":"1.0.0","name":"n","type":"sluice","runtimeConfig":{"mac":"x"}}"#;
        let out = with_runtime_ips(conf, &["10.0.0.9".parse().unwrap()]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["runtimeConfig"]["ips"], serde_json::json!(["10.0.0.9"]));
        assert_eq!(v["runtimeConfig"]["mac"], "x");
    }

    #[test]
    fn the_same_address_from_two_sources_counts_once_and_two_are_refused() {
        let mut r = Requested {
            from_cni: vec!["10.0.0.5".parse().unwrap()],
            added: vec![],
        };
        r.add("10.0.0.5".parse().unwrap());
        assert_eq!(r.single().unwrap(), Some("10.0.0.5".parse().unwrap()));
        r.add("10.0.0.6".parse().unwrap());
        let e: CniError = r.single().unwrap_err().into();
        assert_eq!(
            e.code,
            sluice_cni::protocol::ErrorCode::RequestedAddressInvalid.code()
        );
    }
}
