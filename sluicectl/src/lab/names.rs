//! Names of everything the lab creates: pure functions of the lab name and the
//! object, so `down` and a person with `ip netns` can find them again.

use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

/// Longest namespace name the lab makes; longer ones keep a readable prefix and
/// end in a hash. (`/run/netns` allows more, but `ip netns` listings become
/// unreadable and some tools truncate.)
pub const MAX_NETNS: usize = 40;

fn short_hash(s: &str, len: usize) -> String {
    let d = Sha256::digest(s.as_bytes());
    hex::encode(d)[..len].to_string()
}

/// `NAME-underlay`: the switch namespace holding the bridge and the gateway.
pub fn underlay_netns(lab: &str) -> String {
    format!("{lab}-underlay")
}

/// `NAME-node-<i>` for node `node-<i>`.
pub fn node_netns(lab: &str, node: &str) -> String {
    format!("{lab}-{node}")
}

pub fn node_name(index: usize) -> String {
    format!("node-{index}")
}

/// `NAME-<namespace>-<pod>`, shortened with a hash of the full name when too long.
pub fn pod_netns(lab: &str, namespace: &str, pod: &str) -> String {
    let full = format!("{lab}-{namespace}-{pod}");
    if full.len() <= MAX_NETNS {
        return full;
    }
    let h = short_hash(&full, 8);
    let keep = MAX_NETNS - h.len() - 1;
    // cut on a char boundary (Kubernetes names are ASCII, but be safe)
    let mut cut = keep;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{h}", &full[..cut])
}

/// `NAME-ext-<a>-<b>-<c>-<d>`: an outside host with that address.
pub fn external_netns(lab: &str, addr: Ipv4Addr) -> String {
    let o = addr.octets();
    format!("{lab}-ext-{}-{}-{}-{}", o[0], o[1], o[2], o[3])
}

/// Underlay-side veth of node `i` (≤ 15 chars, IFNAMSIZ).
pub fn node_port(index: usize) -> String {
    format!("n{index}")
}

/// Underlay-side veth of an outside host.
pub fn external_port(addr: Ipv4Addr) -> String {
    format!("x{}", short_hash(&addr.to_string(), 10))
}

/// The container id kubelet's runtime would have made up for the pod sandbox: 64
/// hex characters, unique per lab, pod and uid.
pub fn container_id(lab: &str, namespace: &str, pod: &str, uid: &str) -> String {
    let d = Sha256::digest(format!("{lab}/{namespace}/{pod}/{uid}").as_bytes());
    hex::encode(d)
}

/// A pod uid in Kubernetes' format, derived from the pod and a creation nonce.
pub fn pod_uid(lab: &str, namespace: &str, pod: &str, nonce: u128) -> String {
    let h = hex::encode(Sha256::digest(
        format!("{lab}/{namespace}/{pod}/{nonce}").as_bytes(),
    ));
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_pod_namespaces_are_readable() {
        assert_eq!(pod_netns("demo", "x", "a"), "demo-x-a");
        assert_eq!(node_netns("demo", "node-2"), "demo-node-2");
        assert_eq!(underlay_netns("demo"), "demo-underlay");
    }

    #[test]
    fn long_pod_namespaces_are_cut_with_a_hash_and_stay_distinct() {
        let a = pod_netns("lab", "a-very-long-namespace-name", "and-a-long-pod-name-1");
        let b = pod_netns("lab", "a-very-long-namespace-name", "and-a-long-pod-name-2");
        assert!(a.len() <= MAX_NETNS, "{a}");
        assert!(a.starts_with("lab-a-very-long-namespace"));
        assert_ne!(a, b);
    }

    #[test]
    fn interface_names_fit_ifnamsiz() {
        assert!(external_port(Ipv4Addr::new(255, 255, 255, 255)).len() <= 15);
        assert!(node_port(999).len() <= 15);
    }

    #[test]
    fn container_ids_look_like_runtime_ids() {
        let id = container_id("l", "x", "a", "u");
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        let uid = pod_uid("l", "x", "a", 1);
        assert_eq!(uid.len(), 36);
    }
}
