//! The plugin's side of the host-side interface naming rule: which identity an
//! attachment is named by. The rule itself is `sluice_node_files::ifname`, shared
//! with the agent; it is re-exported here for the plugin's commands.

pub use sluice_node_files::ifname::*;

/// The identity the plugin uses for an attachment: Kubernetes when `CNI_ARGS` names
/// the pod, else the container id.
pub fn pod_identity<'a>(
    args: &'a crate::protocol::CniArgs,
    container_id: &'a str,
) -> PodIdentity<'a> {
    match args.k8s_pod() {
        Some((namespace, pod)) => PodIdentity::Kubernetes { namespace, pod },
        None => PodIdentity::Container { id: container_id },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_prefers_kubernetes_args() {
        let args = crate::protocol::CniArgs::parse("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p").unwrap();
        assert_eq!(
            pod_identity(&args, "cid"),
            PodIdentity::Kubernetes {
                namespace: "ns",
                pod: "p"
            }
        );
        let none = crate::protocol::CniArgs::default();
        assert_eq!(
            pod_identity(&none, "cid"),
            PodIdentity::Container { id: "cid" }
        );
    }

    #[test]
    fn every_host_name_is_a_valid_cni_ifname() {
        for who in [
            PodIdentity::Kubernetes {
                namespace: "kube-system",
                pod: "coredns-5d78c9869d-xyz12",
            },
            PodIdentity::Container { id: "abc" },
        ] {
            crate::protocol::validate_ifname(&host_veth_name(who)).unwrap();
        }
    }
}
