//! One module per CNI verb, each with an `exec` entry. `main.rs` parses and
//! dispatches; these do the work.

pub mod add;
pub mod check;
pub mod del;
pub mod gc;
pub mod status;

use std::path::PathBuf;

use sluice_cni::delegate;
use sluice_cni::protocol::{Env, NetConf};
use sluice_cni::veth::{attachment_veth_name, pending_veth_name, pod_identity};

use crate::config::PluginConf;
use crate::error::PluginError;

/// Everything a verb is given.
pub struct Ctx<'a> {
    pub env: &'a Env,
    pub conf: &'a NetConf,
    pub plugin: &'a PluginConf,
}

impl Ctx<'_> {
    /// The host-side veth name of this attachment (per-attachment verbs only).
    pub fn host_ifname(&self) -> String {
        attachment_veth_name(
            pod_identity(&self.env.args, self.env.container_id()),
            self.env.ifname(),
        )
    }

    /// The name the host end carries while ADD wires it ([`pending_veth_name`]).
    pub fn pending_ifname(&self) -> String {
        pending_veth_name(&self.conf.name, self.env.container_id(), self.env.ifname())
    }

    pub fn alias(&self) -> String {
        crate::wiring::alias(&self.conf.name, self.env.container_id(), self.env.ifname())
    }

    /// The IPAM plugin binary, found through `CNI_PATH`; `None` when the config has
    /// no `ipam` section.
    pub fn ipam_path(&self) -> Result<Option<PathBuf>, PluginError> {
        match &self.conf.ipam {
            None => Ok(None),
            Some(i) => Ok(Some(delegate::find_in_path(
                &i.plugin_type,
                &self.env.path,
            )?)),
        }
    }
}
