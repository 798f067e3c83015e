//! Requests built from sluice's values and replies parsed back into them: the only
//! code in the workspace that knows `netlink-packet-route`'s message types. Pure.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::types::{
    Address, Link, Neighbour, NeighbourTable, Route4, RouteKind, VethPeer, VxlanParams,
};

// ---- links ----

/// `RTM_GETLINK` for one name.
pub fn get_link(name: &str) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    RouteNetlinkMessage::GetLink(msg)
}

/// `RTM_GETLINK` dump of every link.
pub fn dump_links() -> RouteNetlinkMessage {
    RouteNetlinkMessage::GetLink(LinkMessage::default())
}

/// `ip link add NAME address MAC mtu MTU type veth peer name PEER netns FD [address M]`.
pub fn new_veth(name: &str, mac: [u8; 6], mtu: u32, peer: &VethPeer<'_>) -> RouteNetlinkMessage {
    let mut peer_msg = LinkMessage::default();
    peer_msg
        .attributes
        .push(LinkAttribute::IfName(peer.name.to_owned()));
    peer_msg.attributes.push(LinkAttribute::Mtu(mtu));
    peer_msg
        .attributes
        .push(LinkAttribute::NetNsFd(peer.netns_fd));
    if let Some(m) = peer.mac {
        peer_msg.attributes.push(LinkAttribute::Address(m.to_vec()));
    }
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
    msg.attributes.push(LinkAttribute::Mtu(mtu));
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
    ]));
    RouteNetlinkMessage::NewLink(msg)
}

/// `ip link add NAME type ipip` (for `tunl0`: makes the kernel load `ipip`).
pub fn new_ipip(name: &str) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    msg.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::IpIp,
        )]));
    RouteNetlinkMessage::NewLink(msg)
}

/// `ip link add NAME mtu MTU address MAC type vxlan id VNI dstport PORT [nolearning]
/// [local IP] [dev INDEX]`.
pub fn new_vxlan(name: &str, p: &VxlanParams, mac: [u8; 6], mtu: u32) -> RouteNetlinkMessage {
    let mut data = vec![
        InfoVxlan::Id(p.vni),
        InfoVxlan::Port(p.port),
        InfoVxlan::Learning(p.learning),
    ];
    if let Some(local) = p.local {
        data.push(InfoVxlan::Local(local));
    }
    if let Some(dev) = p.uplink {
        data.push(InfoVxlan::Link(dev));
    }
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    msg.attributes.push(LinkAttribute::Mtu(mtu));
    msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Vxlan),
        LinkInfo::Data(InfoData::Vxlan(data)),
    ]));
    RouteNetlinkMessage::NewLink(msg)
}

/// `ip link set INDEX up [mtu MTU] [alias ALIAS]`.
pub fn set_link_up(index: u32, mtu: Option<u32>, alias: Option<&str>) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    if let Some(m) = mtu {
        msg.attributes.push(LinkAttribute::Mtu(m));
    }
    if let Some(a) = alias {
        msg.attributes.push(LinkAttribute::IfAlias(a.to_owned()));
    }
    RouteNetlinkMessage::SetLink(msg)
}

/// Rename a (down) link, set its alias and bring it up: one message, so the kernel
/// applies the name before the flags and no observer sees the final name unlabelled.
pub fn rename_label_up(index: u32, name: &str, alias: &str) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    msg.attributes
        .push(LinkAttribute::IfAlias(alias.to_owned()));
    RouteNetlinkMessage::SetLink(msg)
}

pub fn del_link(index: u32) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    RouteNetlinkMessage::DelLink(msg)
}

/// A link reply as a [`Link`]; `None` for any other message.
pub fn link_of(m: RouteNetlinkMessage) -> Option<Link> {
    let RouteNetlinkMessage::NewLink(l) = m else {
        return None;
    };
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mac: None,
        mtu: None,
        up: l.header.flags.contains(LinkFlags::Up),
        kind: None,
        alias: None,
        vxlan: None,
    };
    for a in l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(m) => link.mac = m.try_into().ok(),
            LinkAttribute::Mtu(m) => link.mtu = Some(m),
            LinkAttribute::IfAlias(a) => link.alias = Some(a),
            LinkAttribute::LinkInfo(infos) => {
                for i in &infos {
                    if let LinkInfo::Kind(k) = i {
                        link.kind = Some(k.to_string());
                        if *k == InfoKind::Vxlan {
                            link.vxlan = Some(vxlan_of(&infos));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(link)
}

/// The VXLAN attributes of a link; the kernel's defaults where one is absent.
fn vxlan_of(infos: &[LinkInfo]) -> VxlanParams {
    let mut p = VxlanParams {
        vni: 0,
        port: 0,
        local: None,
        uplink: None,
        learning: true,
    };
    for i in infos {
        if let LinkInfo::Data(InfoData::Vxlan(attrs)) = i {
            for a in attrs {
                match a {
                    InfoVxlan::Id(v) => p.vni = *v,
                    InfoVxlan::Port(v) => p.port = *v,
                    InfoVxlan::Local(v) => p.local = Some(*v),
                    InfoVxlan::Link(v) => p.uplink = Some(*v),
                    InfoVxlan::Learning(v) => p.learning = *v,
                    _ => {}
                }
            }
        }
    }
    p
}

// ---- addresses ----

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn address_message(index: u32, addr: IpNet) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = family(addr.addr());
    msg.header.prefix_len = addr.prefix_len();
    msg.header.scope = AddressScope::Universe;
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(addr.addr()));
    msg.attributes.push(AddressAttribute::Address(addr.addr()));
    msg
}

/// `ip addr add ADDR dev INDEX`.
pub fn new_address(index: u32, addr: IpNet) -> RouteNetlinkMessage {
    RouteNetlinkMessage::NewAddress(address_message(index, addr))
}

/// `ip addr del ADDR dev INDEX`.
pub fn del_address(index: u32, addr: IpNet) -> RouteNetlinkMessage {
    RouteNetlinkMessage::DelAddress(address_message(index, addr))
}

pub fn dump_addresses() -> RouteNetlinkMessage {
    RouteNetlinkMessage::GetAddress(AddressMessage::default())
}

/// An address reply as an [`Address`].
pub fn address_of(m: &RouteNetlinkMessage) -> Option<Address> {
    let RouteNetlinkMessage::NewAddress(a) = m else {
        return None;
    };
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on
    // point-to-point links and equal to IFA_LOCAL elsewhere.
    let local = a.attributes.iter().find_map(|at| match at {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let ip = local.or_else(|| {
        a.attributes.iter().find_map(|at| match at {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })?;
    Some(Address {
        index: a.header.index,
        net: IpNet::new(ip, a.header.prefix_len).ok()?,
    })
}

// ---- routes ----

/// The message for `route`, to add, replace or delete it. The metric is sent only
/// when it is not 0 (the kernel reads an absent metric as 0).
pub fn route_message(r: &Route4) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.destination_prefix_length = r.dst.prefix_len();
    msg.header.protocol = RouteProtocol::from(r.protocol);
    msg.header.scope = RouteScope::from(r.scope);
    msg.header.kind = match r.kind {
        RouteKind::Unicast => RouteType::Unicast,
        RouteKind::Blackhole => RouteType::BlackHole,
        RouteKind::Other(t) => RouteType::from(t),
    };
    if r.onlink {
        msg.header.flags = RouteFlags::Onlink;
    }
    // Tables above 255 do not fit the header (what `ip route` does too).
    match u8::try_from(r.table) {
        Ok(t) => msg.header.table = t,
        Err(_) => {
            msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
            msg.attributes.push(RouteAttribute::Table(r.table));
        }
    }
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(
            r.dst.network(),
        )));
    if let Some(gw) = r.gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
    }
    if let Some(oif) = r.oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    if r.priority != 0 {
        msg.attributes.push(RouteAttribute::Priority(r.priority));
    }
    msg
}

pub fn new_route(r: &Route4) -> RouteNetlinkMessage {
    RouteNetlinkMessage::NewRoute(route_message(r))
}

pub fn del_route(r: &Route4) -> RouteNetlinkMessage {
    RouteNetlinkMessage::DelRoute(route_message(r))
}

/// `RTM_GETROUTE` dump of every IPv4 route (all tables).
pub fn dump_routes4() -> RouteNetlinkMessage {
    let mut req = RouteMessage::default();
    req.header.address_family = AddressFamily::Inet;
    RouteNetlinkMessage::GetRoute(req)
}

/// An IPv4 route reply as a [`Route4`].
pub fn route_of(m: &RouteNetlinkMessage) -> Option<Route4> {
    let RouteNetlinkMessage::NewRoute(r) = m else {
        return None;
    };
    if r.header.address_family != AddressFamily::Inet {
        return None;
    }
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    let mut table = None;
    let mut priority = 0;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
            RouteAttribute::Oif(o) => oif = Some(*o),
            RouteAttribute::Table(t) => table = Some(*t),
            RouteAttribute::Priority(p) => priority = *p,
            _ => {}
        }
    }
    Some(Route4 {
        dst: Ipv4Net::new(dst, r.header.destination_prefix_length).ok()?,
        kind: match r.header.kind {
            RouteType::Unicast => RouteKind::Unicast,
            RouteType::BlackHole => RouteKind::Blackhole,
            other => RouteKind::Other(u8::from(other)),
        },
        gateway,
        oif,
        scope: u8::from(r.header.scope),
        onlink: r.header.flags.contains(RouteFlags::Onlink),
        protocol: u8::from(r.header.protocol),
        table: table.unwrap_or(u32::from(r.header.table)),
        priority,
    })
}

// ---- neighbours and FDB entries ----

fn neighbour_family(t: NeighbourTable) -> AddressFamily {
    match t {
        NeighbourTable::Arp => AddressFamily::Inet,
        NeighbourTable::Fdb => AddressFamily::Bridge,
    }
}

/// `ip neigh replace IP lladdr MAC dev INDEX nud permanent`, or
/// `bridge fdb replace MAC dev INDEX dst IP self permanent`.
pub fn new_neighbour(n: &Neighbour) -> RouteNetlinkMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = neighbour_family(n.table);
    m.header.ifindex = n.index;
    m.header.state = NeighbourState::Permanent;
    m.header.kind = RouteType::Unspec;
    let dst = NeighbourAttribute::Destination(NeighbourAddress::Inet(n.ip));
    let lladdr = NeighbourAttribute::LinkLayerAddress(n.mac.to_vec());
    match n.table {
        NeighbourTable::Arp => m.attributes.extend([dst, lladdr]),
        NeighbourTable::Fdb => {
            // NTF_SELF: the entry belongs to the device itself, not to a bridge it
            // might be enslaved to (`bridge fdb … self`).
            m.header.flags = NeighbourFlags::Own;
            m.attributes.extend([lladdr, dst]);
        }
    }
    RouteNetlinkMessage::NewNeighbour(m)
}

/// `ip neigh del IP dev INDEX`, or `bridge fdb del MAC dev INDEX dst IP self`.
pub fn del_neighbour(n: &Neighbour) -> RouteNetlinkMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = neighbour_family(n.table);
    m.header.ifindex = n.index;
    let dst = NeighbourAttribute::Destination(NeighbourAddress::Inet(n.ip));
    match n.table {
        NeighbourTable::Arp => m.attributes.push(dst),
        NeighbourTable::Fdb => {
            m.header.flags = NeighbourFlags::Own;
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(n.mac.to_vec()));
            m.attributes.push(dst);
        }
    }
    RouteNetlinkMessage::DelNeighbour(m)
}

pub fn dump_neighbours(t: NeighbourTable) -> RouteNetlinkMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = neighbour_family(t);
    RouteNetlinkMessage::GetNeighbour(m)
}

/// A permanent entry with an IPv4 address and a MAC as a [`Neighbour`]; `None` for
/// every other entry (learnt, incomplete, IPv6, …).
pub fn neighbour_of(t: NeighbourTable, m: &RouteNetlinkMessage) -> Option<Neighbour> {
    let RouteNetlinkMessage::NewNeighbour(m) = m else {
        return None;
    };
    if m.header.state != NeighbourState::Permanent {
        return None;
    }
    let ip = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // In an AF_BRIDGE (FDB) message the parser cannot know the remote's family
        // and hands back raw bytes.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })?;
    let mac = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => <[u8; 6]>::try_from(b.as_slice()).ok(),
        _ => None,
    })?;
    Some(Neighbour {
        table: t,
        index: m.header.ifindex,
        ip,
        mac,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{MAIN_TABLE, PROTO_BOOT};

    #[test]
    fn a_route_parses_back_to_the_value_it_was_built_from() {
        let r = Route4 {
            gateway: Some("192.168.0.2".parse().unwrap()),
            oif: Some(7),
            onlink: true,
            protocol: 181,
            priority: 20,
            ..Route4::new("10.244.2.0/24".parse().unwrap())
        };
        assert_eq!(route_of(&new_route(&r)), Some(r.clone()));
        let blackhole = Route4 {
            kind: RouteKind::Blackhole,
            table: 1000,
            ..Route4::new("10.244.1.0/24".parse().unwrap())
        };
        assert_eq!(route_of(&new_route(&blackhole)), Some(blackhole));
        assert_eq!((r.table, PROTO_BOOT), (MAIN_TABLE, 3));
    }

    #[test]
    fn a_vxlan_link_request_carries_every_attribute_sluice_compares() {
        let p = VxlanParams {
            vni: 4181,
            port: 4799,
            local: Some("192.168.0.1".parse().unwrap()),
            uplink: Some(2),
            learning: false,
        };
        let RouteNetlinkMessage::NewLink(m) = new_vxlan("sluice.vxlan", &p, [0xe; 6], 1450) else {
            panic!("not a link message");
        };
        let l = link_of(RouteNetlinkMessage::NewLink(m)).unwrap();
        assert_eq!(l.kind.as_deref(), Some("vxlan"));
        assert_eq!(l.vxlan, Some(p));
        assert_eq!((l.mtu, l.mac), (Some(1450), Some([0xe; 6])));
    }

    #[test]
    fn an_fdb_entry_round_trips_and_a_learnt_one_is_not_ours() {
        let n = Neighbour {
            table: NeighbourTable::Fdb,
            index: 4,
            ip: "192.168.0.3".parse().unwrap(),
            mac: [0x0e, 0x5c, 192, 168, 0, 3],
        };
        assert_eq!(
            neighbour_of(NeighbourTable::Fdb, &new_neighbour(&n)),
            Some(n.clone())
        );
        let RouteNetlinkMessage::NewNeighbour(mut m) = new_neighbour(&n) else {
            unreachable!()
        };
        m.header.state = NeighbourState::Reachable;
        assert_eq!(
            neighbour_of(NeighbourTable::Fdb, &RouteNetlinkMessage::NewNeighbour(m)),
            None
        );
    }
}
