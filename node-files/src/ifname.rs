//! THE host-side interface naming rule, pure. The plugin names the host end of every
//! pod's veth pair with [`host_veth_name`]; the agent (through the policy crate's
//! `VethNames`) calls the same function to find a pod's interface, and
//! [`namespace_iface_prefix`] to match every interface of one namespace with an
//! iptables wildcard (`slcXXXX+`). No other copy of the rule exists.
//!
//! Layout (15 characters, the kernel's IFNAMSIZ limit less the NUL):
//! - Kubernetes pod: `slc` + first 4 hex of sha256(namespace) + first 8 hex of
//!   sha256("namespace.pod").
//! - Elsewhere (podman, `ctr`, no `K8S_POD_NAMESPACE`/`K8S_POD_NAME`): `slx` + first
//!   12 hex of sha256(container id).
//!
//! Collision odds (names only clash between interfaces on the same node):
//! - Two pods on one node get the same name only if both the 16-bit namespace part
//!   and the 32-bit pod part match. Within one namespace the 32-bit part decides: with
//!   n pods of that namespace on the node, p ≈ n²/2³³ (250 pods: 7·10⁻⁶). Across
//!   namespaces a clash needs 48 bits to match: p ≈ n²/2⁴⁹.
//! - Outside Kubernetes, 48 bits: p ≈ n²/2⁴⁹ (1000 containers: 9·10⁻¹⁰).
//! - The 16-bit namespace prefix is *not* unique: with k namespaces on a node, two of
//!   them share a prefix with p ≈ k²/2¹⁷ (50 namespaces: 2 %). A wildcard
//!   `slcXXXX+` may therefore also cover another namespace's pods; use it only where
//!   over-matching is safe (fail-closed drops), never to grant traffic.
//!
//! On a clash, ADD fails with "interface exists" rather than touch the other pod.

use sha2::{Digest, Sha256};

/// Prefix of host-side interfaces of Kubernetes pods.
pub const K8S_PREFIX: &str = "slc";
/// Prefix of host-side interfaces of containers outside Kubernetes.
pub const OTHER_PREFIX: &str = "slx";
/// Every sluice pod interface starts with one of these.
pub const POD_IFACE_PREFIXES: [&str; 2] = [K8S_PREFIX, OTHER_PREFIX];
/// IFNAMSIZ less the NUL: the longest interface name the kernel accepts.
pub const MAX_IFNAME_LEN: usize = 15;

fn sha_hex(data: &str, chars: usize) -> String {
    let mut h = hex::encode(Sha256::digest(data.as_bytes()));
    h.truncate(chars);
    h
}

/// Who a pod is, for naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodIdentity<'a> {
    /// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS`.
    Kubernetes { namespace: &'a str, pod: &'a str },
    /// Only a container id (podman, `ctr run --cni`, …).
    Container { id: &'a str },
}

/// `slc` + 4 hex of sha256(namespace): the first 7 characters of every host-side
/// interface of that namespace's pods.
pub fn namespace_iface_prefix(namespace: &str) -> String {
    format!("{K8S_PREFIX}{}", sha_hex(namespace, 4))
}

/// The host-side veth name of a pod (always 15 characters).
pub fn host_veth_name(who: PodIdentity<'_>) -> String {
    match who {
        PodIdentity::Kubernetes { namespace, pod } => format!(
            "{}{}",
            namespace_iface_prefix(namespace),
            sha_hex(&format!("{namespace}.{pod}"), 8)
        ),
        PodIdentity::Container { id } => format!("{OTHER_PREFIX}{}", sha_hex(id, 12)),
    }
}

/// The interface name runtimes give a pod's primary attachment.
pub const PRIMARY_IFNAME: &str = "eth0";

/// The host-side name of one attachment. For the primary interface (`eth0`) it is
/// exactly [`host_veth_name`], the name the agent looks up. A pod attached to more
/// networks (`net1`, … under Multus, or a second podman network) needs one host
/// interface per attachment, so for any other interface name the hashed part also
/// covers it (`namespace.pod/ifname`, `containerid/ifname`); the namespace prefix
/// stays, so `slcXXXX+` still covers every interface of the namespace.
pub fn attachment_veth_name(who: PodIdentity<'_>, ifname: &str) -> String {
    if ifname == PRIMARY_IFNAME {
        return host_veth_name(who);
    }
    match who {
        PodIdentity::Kubernetes { namespace, pod } => format!(
            "{}{}",
            namespace_iface_prefix(namespace),
            sha_hex(&format!("{namespace}.{pod}/{ifname}"), 8)
        ),
        PodIdentity::Container { id } => {
            format!("{OTHER_PREFIX}{}", sha_hex(&format!("{id}/{ifname}"), 12))
        }
    }
}

/// Prefix of host-side interfaces still being wired (see [`pending_veth_name`]).
pub const PENDING_PREFIX: &str = "slt";

/// `slt` + 4 hex of sha256(network): the first 7 characters of every pending host
/// interface of one network, so GC collects only its own network's leftovers.
pub fn network_pending_prefix(network: &str) -> String {
    format!("{PENDING_PREFIX}{}", sha_hex(network, 4))
}

/// The name ADD creates the host end under, before it renames it to its final name
/// and labels it with its owner in the same netlink message. The kernel ignores an
/// alias at creation, so a plugin killed between creation and labelling would
/// otherwise leave an unlabelled link under the pod's name that nothing could claim;
/// under this name, derived from the attachment (network, container id, ifname), the
/// attachment's DEL and the network's GC find it. Always 15 characters.
pub fn pending_veth_name(network: &str, container_id: &str, ifname: &str) -> String {
    format!(
        "{}{}",
        network_pending_prefix(network),
        sha_hex(&format!("{network}/{container_id}/{ifname}"), 8)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_names_are_per_attachment_and_share_their_networks_prefix() {
        let a = pending_veth_name("k8s-pod-network", "c1", "eth0");
        assert_eq!(a.len(), MAX_IFNAME_LEN);
        assert!(a.starts_with(&network_pending_prefix("k8s-pod-network")));
        assert_ne!(a, pending_veth_name("k8s-pod-network", "c2", "eth0"));
        assert_ne!(a, pending_veth_name("k8s-pod-network", "c1", "net1"));
        assert_ne!(a[..7], pending_veth_name("other", "c1", "eth0")[..7]);
    }

    #[test]
    fn kubernetes_names_are_fixed_values_of_the_rule() {
        // sha256("default") = 37a8eec1…, sha256("default.web-0") = 14bf1fdb…: pinning
        // exact strings catches any accidental change of the rule, which would
        // orphan every existing pod's interface on upgrade.
        let n = host_veth_name(PodIdentity::Kubernetes {
            namespace: "default",
            pod: "web-0",
        });
        assert_eq!(n.len(), 15);
        assert_eq!(&n[..7], "slc37a8");
        assert_eq!(n, "slc37a814bf1fdb");
        assert_eq!(namespace_iface_prefix("default"), "slc37a8");
    }

    #[test]
    fn container_names_are_slx_and_12_hex() {
        let n = host_veth_name(PodIdentity::Container { id: "abc" });
        // sha256("abc") = ba7816bf8f01cfea…
        assert_eq!(n, "slxba7816bf8f01");
    }

    #[test]
    fn every_name_fits_ifnamsiz_and_is_a_valid_ifname() {
        for (ns, pod) in [
            ("a", "b"),
            ("kube-system", "coredns-5d78c9869d-xyz12"),
            ("", ""),
        ] {
            let n = host_veth_name(PodIdentity::Kubernetes { namespace: ns, pod });
            assert_eq!(n.len(), MAX_IFNAME_LEN);
            assert!(n.bytes().all(|b| b.is_ascii_alphanumeric()), "{n}");
            assert!(n.starts_with(&namespace_iface_prefix(ns)));
        }
    }

    #[test]
    fn namespace_and_pod_both_matter() {
        let a = host_veth_name(PodIdentity::Kubernetes {
            namespace: "a",
            pod: "b.c",
        });
        let b = host_veth_name(PodIdentity::Kubernetes {
            namespace: "a.b",
            pod: "c",
        });
        // Same "namespace.pod" string, different namespace prefix.
        assert_eq!(a[7..], b[7..]);
        assert_ne!(a, b);
    }

    #[test]
    fn secondary_attachments_get_their_own_name_in_the_same_namespace_prefix() {
        let k8s = PodIdentity::Kubernetes {
            namespace: "default",
            pod: "web-0",
        };
        assert_eq!(attachment_veth_name(k8s, "eth0"), host_veth_name(k8s));
        let net1 = attachment_veth_name(k8s, "net1");
        assert_ne!(net1, host_veth_name(k8s));
        assert_eq!(net1.len(), 15);
        assert!(net1.starts_with(&namespace_iface_prefix("default")));
        let c = PodIdentity::Container { id: "abc" };
        assert_eq!(attachment_veth_name(c, "eth0"), "slxba7816bf8f01");
        let other = attachment_veth_name(c, "eth1");
        assert!(other.starts_with("slx") && other.len() == 15 && other != "slxba7816bf8f01");
    }
}
