//! A throwaway namespace made to look like a node, and the checks that a pod's
//! network left nothing on it. Shared by the plugin's root tests and the CRI suite.

use crate::sh;

pub const NODE_IP: &str = "192.168.77.2";
pub const GATEWAY_IP: &str = "192.168.77.1";
pub const UPLINK: &str = "up0";

/// Make the calling thread's (fresh) namespace look like a node: an uplink with an
/// address and a default route via a gateway that need not answer. Proxy ARP only
/// answers for 169.254.1.1 when the node has a route to it, hence the default.
pub fn setup_node() {
    sh(&format!(
        "ip link add {UPLINK} type veth peer name gw0 && ip addr add {NODE_IP}/24 dev {UPLINK} \
         && ip link set {UPLINK} up && ip link set gw0 up && ip route add default via {GATEWAY_IP}"
    ));
}

/// Link names in `ip -o link show` output (without the `@peer` suffix).
pub fn link_names(ip_o_link_show: &str) -> Vec<String> {
    ip_o_link_show
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect()
}

/// Links of the calling thread's namespace.
pub fn links() -> Vec<String> {
    link_names(&sh("ip -o link show"))
}

/// Host-side sluice interfaces in the calling thread's namespace.
pub fn sluice_links() -> Vec<String> {
    links()
        .into_iter()
        .filter(|l| l.starts_with("slc") || l.starts_with("slx"))
        .collect()
}

/// The node holds nothing but what [`setup_node`] made: no link, no route of ours.
pub fn assert_no_node_leftovers() {
    let mut l = links();
    l.sort();
    assert_eq!(l, ["gw0", "lo", UPLINK], "leftover links on the node");
    let routes = sh("ip -4 route show");
    let unexpected: Vec<&str> = routes
        .lines()
        .filter(|r| !r.starts_with("default via") && !r.contains(UPLINK))
        .collect();
    assert!(
        unexpected.is_empty(),
        "leftover routes on the node: {unexpected:?}"
    );
}
