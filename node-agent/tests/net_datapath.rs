//! Real packets between pods on different simulated nodes, through the tunnel device and
//! routes the agent's own code programs: VXLAN and `none` on this kernel (IPIP needs the
//! QEMU guest, see `net_ipip_qemu.rs`). The destination must see the client pod's own
//! address.

mod net_support;

use net_support::*;
use sluice_agent::kernel::Netlink;
use sluice_agent::tunnel::{self, Encapsulation, TunnelError, TunnelSpec, VXLAN_DEVICE, vtep_mac};
use sluice_testkit::{in_new_netns, require_root, require_tool};

#[test]
fn vxlan_pods_reach_pods_on_other_nodes_with_their_own_source_address() {
    if !require_root("vxlan_pods_reach_pods_on_other_nodes_with_their_own_source_address")
        || !require_tool("vxlan_pods_reach_pods", "socat")
    {
        return;
    }
    let mut c = Cluster::new(Encapsulation::Vxlan);
    for i in 1..=3 {
        c.add_node(i, 1500);
    }
    c.sync_all();
    c.add_pod(1, 2);
    c.add_pod(1, 3);
    c.add_pod(2, 2);
    c.add_pod(3, 2);

    for n in &c.nodes {
        let link: serde_json::Value =
            serde_json::from_str(&n.ns.exec(&format!("ip -j -d addr show dev {VXLAN_DEVICE}")))
                .unwrap();
        let l = &link[0];
        let data = &l["linkinfo"]["info_data"];
        assert_eq!(l["mtu"], 1450, "{}: uplink 1500 - 50", n.name);
        assert_eq!(data["id"], tunnel::DEFAULT_VXLAN_VNI);
        assert_eq!(data["port"], tunnel::DEFAULT_VXLAN_PORT);
        assert_eq!(data["local"], n.ip.to_string());
        assert_eq!(data["learning"], false);
        let mac = vtep_mac(n.ip)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(l["address"], mac);
        let addrs: Vec<String> = l["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["family"] == "inet")
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect();
        assert_eq!(
            addrs,
            vec![format!("{}/32", sluice_ipam::tunnel_address(n.block))]
        );
        assert_eq!(std::fs::read_to_string(&n.mtu_file).unwrap(), "1450\n");
    }
    assert_cross_node_pod_traffic(&c);
    let n = 4 << 20;
    assert_eq!(
        bulk_transfer(c.pod(1, 0), c.pod(2, 0), n),
        n,
        "full-size segments cross"
    );
}

#[test]
fn none_pods_reach_pods_on_the_same_segment_with_their_own_source_address() {
    if !require_root("none_pods_reach_pods_on_the_same_segment_with_their_own_source_address")
        || !require_tool("none_pods_reach_pods", "socat")
    {
        return;
    }
    let mut c = Cluster::new(Encapsulation::None);
    c.add_node(1, 9000);
    c.add_node(2, 9000);
    c.sync_all();
    c.add_pod(1, 2);
    c.add_pod(2, 2);
    for n in &c.nodes {
        assert_eq!(owned_routes(&n.ns), expected_routes(&c, n.index));
        assert_eq!(std::fs::read_to_string(&n.mtu_file).unwrap(), "9000\n");
        assert!(
            n.ns.try_exec(&format!("ip link show {VXLAN_DEVICE}"))
                .status
                .code()
                != Some(0)
        );
    }
    assert_cross_node_pod_traffic(&c);
}

#[test]
fn switching_vxlan_to_none_removes_the_device_and_reroutes() {
    if !require_root("switching_vxlan_to_none_removes_the_device_and_reroutes")
        || !require_tool("switching_vxlan_to_none", "socat")
    {
        return;
    }
    let mut c = Cluster::new(Encapsulation::Vxlan);
    c.add_node(1, 1500);
    c.add_node(2, 1500);
    c.sync_all();
    c.encap = Encapsulation::None;
    c.sync_all();
    for n in &c.nodes {
        assert_eq!(owned_routes(&n.ns), expected_routes(&c, n.index));
        assert!(
            n.ns.try_exec(&format!("ip link show {VXLAN_DEVICE}"))
                .status
                .code()
                != Some(0),
            "{}: VXLAN device removed",
            n.name
        );
    }
    c.add_pod(1, 2);
    c.add_pod(2, 2);
    assert_cross_node_pod_traffic(&c);
}

/// On a kernel without IPIP (this host) `ensure` says so; with IPIP (the QEMU guest)
/// it configures tunl0. Either way it returns instead of panicking or looping.
#[test]
fn ipip_on_a_kernel_without_it_is_a_clear_error() {
    if !require_root("ipip_on_a_kernel_without_it_is_a_clear_error") {
        return;
    }
    let has_ipip = std::path::Path::new("/sys/module/ipip").exists();
    let res = in_new_netns(|| {
        sluice_testkit::sh(
            "ip link add up0 type veth peer name up1 && ip link set up0 up && \
             ip addr add 192.168.5.1/24 dev up0",
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let nl = Netlink::open().unwrap();
            let ip = "192.168.5.1".parse().unwrap();
            let uplink = sluice_agent::mtu::detect_uplink(&nl, Some(ip))
                .await
                .unwrap();
            let spec = TunnelSpec::new(
                Encapsulation::Ipip,
                ip,
                "10.244.5.0".parse().unwrap(),
                &uplink,
            );
            tunnel::ensure(&nl, &spec).await
        })
    });
    if has_ipip {
        let st = res.expect("kernel has ipip");
        assert_eq!(st.mtu, 1480);
    } else {
        let e = res.expect_err("this kernel has no ipip");
        assert!(
            matches!(e, TunnelError::Unsupported { module: "ipip", .. }),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("modprobe ipip") && msg.contains("another encapsulation"),
            "{msg}"
        );
    }
}
