//! The netlink layer against the real kernel, each test in a throwaway network
//! namespace (`unshare(CLONE_NEWNET)` on the test's own thread): nothing outside it
//! is touched and nothing is left behind.

use std::os::fd::AsRawFd;

use ipnet::IpNet;
use sluice_netlink::{
    Neighbour, NeighbourTable, Netlink, Route4, RouteKind, SCOPE_LINK, SCOPE_UNIVERSE, VethPeer,
    VxlanParams,
};
use sluice_testkit::{NetnsHolder, in_new_netns, require_root, sh};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn a_fresh_namespace_lists_lo_and_refuses_unknown_links() {
    if !require_root("netlink_in_netns") {
        return;
    }
    in_new_netns(|| {
        let mut nl = Netlink::open().unwrap();
        let links = nl.links().unwrap();
        assert!(links.iter().any(|l| l.name == "lo" && l.up));
        assert_eq!(nl.link_by_name("nope0").unwrap(), None);
        assert!(!nl.del_link_if_present(999_999).unwrap());
        let lo = nl.link_by_name("lo").unwrap().unwrap();
        let addrs = nl.addresses(lo.index).unwrap();
        assert!(addrs.contains(&net("127.0.0.1/8")), "{addrs:?}");
    });
}

#[test]
fn rename_label_up_renames_labels_and_raises_a_link_in_one_step() {
    if !require_root("netlink_rename_label_up") {
        return;
    }
    in_new_netns(|| {
        sh("ip link add sltpending0 type veth peer name peer0");
        let mut nl = Netlink::open().unwrap();
        let l = nl.link_by_name("sltpending0").unwrap().unwrap();
        assert_eq!(l.alias, None);
        nl.rename_label_up(l.index, "slcfinal0", "sluice:n:c:eth0")
            .unwrap();
        assert_eq!(nl.link_by_name("sltpending0").unwrap(), None);
        let r = nl.link_by_name("slcfinal0").unwrap().unwrap();
        assert_eq!(r.index, l.index);
        assert_eq!(r.alias.as_deref(), Some("sluice:n:c:eth0"));
        assert!(r.up);
    });
}

#[test]
fn typed_ops_create_and_read_back_a_veth_pair_across_namespaces() {
    if !require_root("netlink_typed_ops") {
        return;
    }
    in_new_netns(|| {
        let peer_ns = NetnsHolder::new();
        let peer_fd = std::fs::File::open(peer_ns.path()).unwrap();
        let mut nl = Netlink::open().unwrap();
        let mac = [0xee; 6];
        let peer = VethPeer {
            name: "eth0",
            netns_fd: peer_fd.as_raw_fd(),
            mac: Some([0x0a, 0x58, 0, 0, 0, 9]),
        };
        nl.add_veth("slxtest0", mac, 1400, &peer).unwrap();
        let e = nl.add_veth("slxtest0", mac, 1400, &peer).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EEXIST));
        let l = nl.link_by_name("slxtest0").unwrap().unwrap();
        assert_eq!(
            (l.mac, l.mtu, l.kind.as_deref(), l.up),
            (Some(mac), Some(1400), Some("veth"), false)
        );
        nl.set_up(l.index, Some("sluice:n:c:eth0")).unwrap();
        let l = nl.link_by_name("slxtest0").unwrap().unwrap();
        assert!(l.up);
        assert_eq!(l.alias.as_deref(), Some("sluice:n:c:eth0"));
        assert!(
            peer_ns
                .exec("ip link show eth0")
                .contains("0a:58:00:00:00:09")
        );

        let r = Route4 {
            oif: Some(l.index),
            scope: SCOPE_LINK,
            ..Route4::new("10.9.0.5/32".parse().unwrap())
        };
        nl.add_route4(&r, false).unwrap();
        assert_eq!(
            nl.add_route4(&r, false).unwrap_err().errno(),
            Some(libc::EEXIST)
        );
        let onlink = Route4 {
            gateway: Some("169.254.1.1".parse().unwrap()),
            oif: Some(l.index),
            scope: SCOPE_UNIVERSE,
            onlink: true,
            ..Route4::new("10.200.0.0/16".parse().unwrap())
        };
        nl.add_route4(&onlink, false).unwrap();
        let routes = nl.routes4().unwrap();
        assert!(
            routes.contains(&r) && routes.contains(&onlink),
            "{routes:?}"
        );
        nl.add_address(l.index, net("10.9.0.1/32")).unwrap();
        assert!(nl.addresses(l.index).unwrap().contains(&net("10.9.0.1/32")));

        assert!(nl.del_link_if_present(l.index).unwrap());
        assert!(!nl.del_link_if_present(l.index).unwrap());
        assert!(
            !nl.routes4().unwrap().contains(&r),
            "routes die with the link"
        );
        assert_eq!(
            peer_ns.exec("ip -o link show").lines().count(),
            1,
            "the peer died too"
        );
    });
}

#[test]
fn a_socket_opened_in_another_namespace_acts_there_from_any_thread() {
    if !require_root("netlink_open_in") {
        return;
    }
    let other = NetnsHolder::new();
    let mut nl = Netlink::open_in(other.path()).unwrap();
    let lo = nl.link_by_name("lo").unwrap().unwrap();
    nl.add_address(lo.index, net("10.66.0.1/32")).unwrap();
    assert!(
        other
            .exec("ip -o addr show dev lo")
            .contains("10.66.0.1/32")
    );
    let e = Netlink::open_in(std::path::Path::new("/nonexistent/ns")).err();
    assert!(matches!(
        e,
        Some(sluice_netlink::NetlinkError::Netns { .. })
    ));
}

#[test]
fn an_agent_route_replaces_in_place_and_deletes_by_protocol_and_type() {
    if !require_root("netlink_agent_routes") {
        return;
    }
    in_new_netns(|| {
        sh(
            "ip link add up0 type veth peer name up1 && ip link set up0 up && \
            ip link set up1 up && ip addr add 192.168.5.1/24 dev up0",
        );
        let mut nl = Netlink::open().unwrap();
        let up0 = nl.link_by_name("up0").unwrap().unwrap();
        let blackhole = Route4 {
            kind: RouteKind::Blackhole,
            protocol: 181,
            ..Route4::new("10.244.1.0/24".parse().unwrap())
        };
        nl.add_route4(&blackhole, true).unwrap();
        let via = Route4 {
            gateway: Some("192.168.5.2".parse().unwrap()),
            oif: Some(up0.index),
            protocol: 181,
            ..Route4::new("10.244.2.0/24".parse().unwrap())
        };
        nl.add_route4(&via, true).unwrap();
        let moved = Route4 {
            gateway: Some("192.168.5.3".parse().unwrap()),
            ..via.clone()
        };
        nl.add_route4(&moved, true).unwrap();
        let all = nl.all_routes4().unwrap();
        assert!(all.contains(&blackhole), "{all:?}");
        assert!(all.contains(&moved) && !all.contains(&via), "{all:?}");
        assert!(
            sh("ip route show proto 181").contains("blackhole 10.244.1.0/24"),
            "the kernel shows the protocol"
        );
        assert!(
            !nl.routes4().unwrap().contains(&blackhole),
            "routes4 lists unicast routes only"
        );
        // Deleting names destination, table, type, protocol and metric only.
        for r in [&blackhole, &moved] {
            nl.del_route4(&Route4 {
                gateway: None,
                oif: None,
                ..(*r).clone()
            })
            .unwrap();
        }
        assert_eq!(sh("ip route show proto 181"), "");
    });
}

#[test]
fn a_vxlan_device_with_neighbour_and_fdb_entries_reads_back_as_built() {
    if !require_root("netlink_vxlan") {
        return;
    }
    in_new_netns(|| {
        sh(
            "ip link add up0 type veth peer name up1 && ip link set up0 up && \
            ip addr add 192.168.5.1/24 dev up0",
        );
        let mut nl = Netlink::open().unwrap();
        let up0 = nl.link_by_name("up0").unwrap().unwrap();
        let params = VxlanParams {
            vni: 4181,
            port: 4799,
            local: Some("192.168.5.1".parse().unwrap()),
            uplink: Some(up0.index),
            learning: false,
        };
        let mac = [0x0e, 0x5c, 192, 168, 5, 1];
        nl.add_vxlan("sluice.vxlan", &params, mac, 1450).unwrap();
        let v = nl.link_by_name("sluice.vxlan").unwrap().unwrap();
        assert_eq!(v.vxlan.as_ref(), Some(&params));
        assert_eq!((v.mac, v.mtu, v.up), (Some(mac), Some(1450), false));
        nl.set_mtu_up(v.index, 1400).unwrap();
        let v = nl.link_by_name("sluice.vxlan").unwrap().unwrap();
        assert_eq!((v.mtu, v.up), (Some(1400), true));

        nl.add_address(v.index, net("10.244.1.0/32")).unwrap();
        assert_eq!(
            nl.add_address(v.index, net("10.244.1.0/32"))
                .unwrap_err()
                .errno(),
            Some(libc::EEXIST)
        );
        assert_eq!(
            nl.ipv4_addresses(v.index).unwrap(),
            vec!["10.244.1.0/32".parse().unwrap()]
        );
        nl.del_address(v.index, net("10.244.1.0/32")).unwrap();
        assert!(nl.ipv4_addresses(v.index).unwrap().is_empty());

        let peer_mac = [0x0e, 0x5c, 192, 168, 5, 2];
        let neigh = Neighbour {
            table: NeighbourTable::Arp,
            index: v.index,
            ip: "10.244.2.0".parse().unwrap(),
            mac: peer_mac,
        };
        let fdb = Neighbour {
            table: NeighbourTable::Fdb,
            index: v.index,
            ip: "192.168.5.2".parse().unwrap(),
            mac: peer_mac,
        };
        for n in [&neigh, &fdb] {
            nl.replace_neighbour(n).unwrap();
            nl.replace_neighbour(n).unwrap(); // replace: idempotent
        }
        assert_eq!(
            nl.permanent_neighbours(NeighbourTable::Arp, v.index)
                .unwrap(),
            vec![neigh.clone()]
        );
        assert_eq!(
            nl.permanent_neighbours(NeighbourTable::Fdb, v.index)
                .unwrap(),
            vec![fdb.clone()]
        );
        assert!(sh("bridge fdb show dev sluice.vxlan").contains("dst 192.168.5.2 self permanent"));
        for n in [&neigh, &fdb] {
            nl.del_neighbour(n).unwrap();
        }
        assert!(
            nl.permanent_neighbours(NeighbourTable::Arp, v.index)
                .unwrap()
                .is_empty()
        );
        assert!(
            nl.permanent_neighbours(NeighbourTable::Fdb, v.index)
                .unwrap()
                .is_empty()
        );

        nl.del_link(v.index).unwrap();
        assert_eq!(nl.link_by_name("sluice.vxlan").unwrap(), None);
    });
}

#[test]
fn asking_for_tunl0_yields_an_ipip_device_or_a_kernel_errno() {
    if !require_root("netlink_ipip") {
        return;
    }
    in_new_netns(|| {
        let mut nl = Netlink::open().unwrap();
        // With ipip loaded, tunl0 exists in every namespace already (EEXIST); without
        // it, the kernel refuses with an errno the agent maps to "unsupported".
        let res = nl.add_ipip("tunl0");
        match nl.link_by_name("tunl0").unwrap() {
            Some(t) => assert_eq!(t.kind.as_deref(), Some("ipip")),
            None => assert!(res.unwrap_err().errno().is_some()),
        }
    });
}
