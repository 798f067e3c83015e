//! Route tables of simulated nodes (namespaces on a bridge) as nodes join and leave:
//! each node's table of sluice routes (protocol 181) equals the blocks of the others,
//! our stale routes disappear, and routes of other protocols or tables are never touched.

mod net_support;

use net_support::*;
use sluice_agent::routes::ROUTE_PROTOCOL;
use sluice_agent::tunnel::{Encapsulation, VXLAN_DEVICE, vtep_mac};
use sluice_testkit::{NamedNetns, require_root};

fn assert_tables_match(c: &Cluster, when: &str) {
    for n in &c.nodes {
        assert_eq!(
            owned_routes(&n.ns),
            expected_routes(c, n.index),
            "{when}: route table of {}",
            n.name
        );
    }
}

fn not_ours(ns: &NamedNetns) -> Vec<String> {
    let ours = format!("proto {ROUTE_PROTOCOL}");
    all_routes(ns)
        .into_iter()
        .filter(|r| !r.ends_with(&ours))
        .collect()
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `ip neigh` and `bridge fdb` permanent entries on the VXLAN device, as strings.
fn vxlan_l2(ns: &NamedNetns) -> (Vec<String>, Vec<String>) {
    let neigh: serde_json::Value = serde_json::from_str(&ns.exec(&format!(
        "ip -j neigh show dev {VXLAN_DEVICE} nud permanent"
    )))
    .unwrap();
    let fdb: serde_json::Value =
        serde_json::from_str(&ns.exec(&format!("bridge -j fdb show dev {VXLAN_DEVICE}"))).unwrap();
    let mut n: Vec<String> = neigh
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["dst"].as_str().unwrap(),
                e["lladdr"].as_str().unwrap()
            )
        })
        .collect();
    let mut f: Vec<String> = fdb
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["dst"].is_string())
        .map(|e| {
            format!(
                "{} {}",
                e["mac"].as_str().unwrap(),
                e["dst"].as_str().unwrap()
            )
        })
        .collect();
    n.sort();
    f.sort();
    (n, f)
}

#[test]
fn route_tables_follow_nodes_joining_and_leaving_and_foreign_routes_survive() {
    if !require_root("route_tables_follow_nodes_joining_and_leaving_and_foreign_routes_survive") {
        return;
    }
    let mut c = Cluster::new(Encapsulation::Vxlan);
    for i in 1..=3 {
        c.add_node(i, 1500);
    }
    c.sync_all();
    assert_tables_match(&c, "3 nodes");

    // Someone else's routes on node 1: a static route, a route inside the pool
    // that is not ours, and a route with our protocol number in another table.
    let n1 = &c.node(1).ns;
    n1.exec("ip route add 10.99.0.0/16 via 192.168.77.254 proto static");
    n1.exec("ip route add 10.244.50.0/24 via 192.168.77.254 proto boot");
    n1.exec(&format!(
        "ip route add 10.244.60.0/24 via 192.168.77.254 table 100 proto {ROUTE_PROTOCOL}"
    ));
    // A stale route of ours (a node that left while the agent was down).
    n1.exec(&format!(
        "ip route add 10.244.200.0/24 via 192.168.77.200 dev eth0 onlink proto {ROUTE_PROTOCOL}"
    ));
    let foreign = not_ours(n1);
    let table100 = n1.exec("ip route show table 100");

    c.add_node(4, 1500);
    c.sync_all();
    assert_tables_match(&c, "node-4 joined");
    let n1 = &c.node(1).ns;
    assert!(
        !owned_routes(n1)
            .iter()
            .any(|r| r.contains("10.244.200.0/24")),
        "stale route of ours removed"
    );
    assert_eq!(not_ours(n1), foreign, "foreign routes untouched");
    assert_eq!(n1.exec("ip route show table 100"), table100);

    c.remove_node(2);
    c.sync_all();
    assert_tables_match(&c, "node-2 left");
    let (neigh, fdb) = vxlan_l2(&c.node(1).ns);
    let want_neigh: Vec<String> = [3u8, 4]
        .iter()
        .map(|&i| {
            format!(
                "{} {}",
                sluice_ipam::tunnel_address(node_block(i)),
                mac_str(vtep_mac(node_ip(i)))
            )
        })
        .collect();
    let want_fdb: Vec<String> = [3u8, 4]
        .iter()
        .map(|&i| format!("{} {}", mac_str(vtep_mac(node_ip(i))), node_ip(i)))
        .collect();
    assert_eq!(neigh, want_neigh, "neighbours of node-1 after node-2 left");
    assert_eq!(fdb, want_fdb, "fdb of node-1 after node-2 left");
    assert_eq!(not_ours(&c.node(1).ns), foreign, "foreign routes untouched");

    // A resync of a converged node changes nothing, in the tunnel or the table.
    let r = c.sync_node(1);
    assert!(r.added.is_empty() && r.replaced.is_empty() && r.removed.is_empty());
    assert_eq!((r.programmed(), r.l2_added, r.l2_removed), (3, 0, 0));
    assert!(!c.node(1).tunnel.as_ref().unwrap().changed);
}

#[test]
fn a_foreign_route_holding_a_wanted_block_is_reported_and_left_alone() {
    if !require_root("a_foreign_route_holding_a_wanted_block_is_reported_and_left_alone") {
        return;
    }
    let mut c = Cluster::new(Encapsulation::None);
    c.add_node(1, 1500);
    c.add_node(2, 1500);
    c.node(1)
        .ns
        .exec("ip route add 10.244.2.0/24 via 192.168.77.254 proto static");
    let r = c.sync_node(1);
    assert_eq!(r.conflicts, vec![node_block(2)]);
    assert!(
        all_routes(&c.node(1).ns)
            .contains(&"10.244.2.0/24 via 192.168.77.254 dev eth0 proto static".to_string()),
        "the foreign route still routes the block: {:?}",
        all_routes(&c.node(1).ns)
    );
    assert_eq!(
        owned_routes(&c.node(1).ns),
        vec!["blackhole 10.244.1.0/24".to_string()]
    );
}
