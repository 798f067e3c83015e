//! IPIP needs a kernel with the `ipip` module, which this host lacks. The host-side test
//! boots a Debian kernel under QEMU with `tests/qemu/run-vm.sh` and re-runs this very
//! test binary inside the guest, where the `#[ignore]`d guest test builds a 2-node cluster
//! (namespaces on a bridge) through the agent's own `tunnel::ensure` and `routes::sync`
//! and checks tunl0, the routes and real pod-to-pod packets.

mod net_support;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use net_support::*;
use sluice_agent::tunnel::{Encapsulation, IPIP_DEVICE};
use sluice_testkit::{require_root, require_tool};

#[test]
fn ipip_datapath_under_qemu() {
    if !require_root("ipip_datapath_under_qemu")
        || !require_tool("ipip_datapath_under_qemu", "qemu-system-x86_64")
        || !require_tool("ipip_datapath_under_qemu", "socat")
    {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/qemu/run-vm.sh");
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let status = Command::new(&script)
        .args(["-t", "600", "--"])
        .arg(&exe)
        .args([
            "--ignored",
            "--exact",
            "ipip_datapath_in_guest",
            "--nocapture",
        ])
        .status()
        .expect("run tests/qemu/run-vm.sh");
    eprintln!(
        "ipip_datapath_under_qemu: VM boot + guest test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(status.success(), "the guest test failed: {status}");
}

#[test]
#[ignore = "needs a kernel with ipip; ipip_datapath_under_qemu runs it inside the QEMU guest"]
fn ipip_datapath_in_guest() {
    assert!(
        Path::new("/sys/module/ipip").exists(),
        "no ipip in this kernel: run through ipip_datapath_under_qemu (tests/qemu/run-vm.sh)"
    );
    let started = Instant::now();
    let mut c = Cluster::new(Encapsulation::Ipip);
    for i in 1..=3 {
        c.add_node(i, 1500);
    }
    c.sync_all();
    for n in &c.nodes {
        let link: serde_json::Value =
            serde_json::from_str(&n.ns.exec(&format!("ip -j -d addr show dev {IPIP_DEVICE}")))
                .unwrap();
        let l = &link[0];
        assert_eq!(l["mtu"], 1480, "{}: tunl0 MTU = uplink 1500 - 20", n.name);
        assert!(
            l["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
            "{}: tunl0 up: {l}",
            n.name
        );
        let addrs: Vec<String> = l["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["family"] == "inet")
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect();
        assert_eq!(
            addrs,
            vec![format!("{}/32", sluice_ipam::tunnel_address(n.block))],
            "{}",
            n.name
        );
        assert_eq!(std::fs::read_to_string(&n.mtu_file).unwrap(), "1480\n");
        let routes = owned_routes(&n.ns);
        assert_eq!(routes, expected_routes(&c, n.index), "{}", n.name);
        assert!(routes.contains(&format!("blackhole {}", n.block)));
    }
    assert!(
        owned_routes(&c.node(1).ns)
            .contains(&"10.244.2.0/24 via 192.168.77.2 dev tunl0 onlink".to_string())
    );

    c.add_pod(1, 2);
    c.add_pod(1, 3);
    c.add_pod(2, 2);
    c.add_pod(3, 2);
    assert_cross_node_pod_traffic(&c);
    let n = 1 << 20;
    assert_eq!(
        bulk_transfer(c.pod(1, 0), c.pod(2, 0), n),
        n,
        "full-size segments cross"
    );

    // The packets really went through the tunnel: IPIP counters moved on every node.
    for n in &c.nodes {
        let s: serde_json::Value =
            serde_json::from_str(&n.ns.exec(&format!("ip -j -s link show dev {IPIP_DEVICE}")))
                .unwrap();
        let rx = s[0]["stats64"]["rx"]["packets"].as_u64().unwrap();
        let tx = s[0]["stats64"]["tx"]["packets"].as_u64().unwrap();
        assert!(rx > 0 && tx > 0, "{}: tunl0 rx {rx} tx {tx}", n.name);
    }

    // Node 3 leaves: the others drop its route; a resync is then a no-op.
    c.remove_node(3);
    c.sync_all();
    for n in &c.nodes {
        assert_eq!(
            owned_routes(&n.ns),
            expected_routes(&c, n.index),
            "{} after node-3 left",
            n.name
        );
    }
    let r = c.sync_node(1);
    assert!(r.added.is_empty() && r.removed.is_empty() && r.replaced.is_empty());
    assert!(!c.node(1).tunnel.as_ref().unwrap().changed);
    eprintln!(
        "ipip_datapath_in_guest: {:.1} s in the guest",
        started.elapsed().as_secs_f64()
    );
}
