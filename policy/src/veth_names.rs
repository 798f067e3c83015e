//! The interface names the CNI plugin really gives pods: [`VethNames`] implements
//! [`InterfaceNames`] with the one naming rule, `sluice_node_files::ifname` (pure).
//! The agent and `sluicectl policy render` both compile with it, so what is
//! rendered names the interfaces the plugin made.

use sluice_node_files::ifname::{PodIdentity, host_veth_name, namespace_iface_prefix};

use crate::compile::InterfaceNames;
use crate::model::Pod;

/// Host-side veth names by the CNI plugin's rule (Kubernetes pods: `slc…`).
#[derive(Debug, Clone, Copy, Default)]
pub struct VethNames;

impl InterfaceNames for VethNames {
    fn host_veth(&self, pod: &Pod) -> String {
        host_veth_name(PodIdentity::Kubernetes {
            namespace: &pod.namespace,
            pod: &pod.name,
        })
    }

    fn namespace_prefix(&self, namespace: &str) -> String {
        namespace_iface_prefix(namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_are_the_cni_plugins_own_names() {
        let pod = Pod {
            namespace: "default".into(),
            name: "web-0".into(),
            labels: Default::default(),
            ips: vec![],
            node: None,
            ports: vec![],
            host_network: false,
        };
        // The value pinned by the naming rule's own test.
        assert_eq!(VethNames.host_veth(&pod), "slc37a814bf1fdb");
        assert!(
            VethNames
                .host_veth(&pod)
                .starts_with(&VethNames.namespace_prefix("default"))
        );
    }
}
