//! A synchronous rtnetlink socket with the few typed operations the plugin needs.
//!
//! A socket is bound to the network namespace of the thread that created it, for
//! its whole life: the plugin opens one in the host namespace and one after
//! `setns` into the pod, then returns to the host, and drives both from there. No
//! async runtime, no background thread.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The kernel refused a request; `errno` is positive (e.g. `libc::EEXIST`).
    #[error("{op}: {}", std::io::Error::from_raw_os_error(*errno))]
    Kernel { op: String, errno: i32 },
    #[error("{op}: undecodable netlink reply: {detail}")]
    Decode { op: String, detail: String },
}

impl NetlinkError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// What the plugin needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub up: bool,
    /// `IFLA_INFO_KIND`, e.g. `veth`.
    pub kind: Option<String>,
    pub alias: Option<String>,
}

/// An IPv4 route of the main table, as far as the plugin cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route4 {
    pub dst: ipnet::Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub scope: u8,
    /// `onlink`: the gateway is reachable on `oif` without a route to it.
    pub onlink: bool,
}

pub const SCOPE_UNIVERSE: u8 = 0;
pub const SCOPE_LINK: u8 = 253;

/// The peer end of a new veth pair, created directly in another namespace.
pub struct VethPeer<'a> {
    pub name: &'a str,
    pub netns_fd: RawFd,
    pub mac: Option<[u8; 6]>,
}

pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    /// Open a socket in the calling thread's current network namespace.
    pub fn open() -> Result<Netlink, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        // Extended acks would give better kernel messages, but are not needed to
        // get an errno; keep the socket default.
        Ok(Netlink { socket, seq: 0 })
    }

    /// Send one request and collect every reply message up to the ACK or DONE.
    fn request(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(NetlinkError::Socket)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(NetlinkError::Socket)?;
            let mut offset = 0;
            while offset < data.len() {
                let decode = |detail: String| NetlinkError::Decode {
                    op: op.to_owned(),
                    detail,
                };
                let len = NetlinkBuffer::new_checked(&data[offset..])
                    .map_err(|e| decode(e.to_string()))?
                    .length() as usize;
                if len == 0 {
                    return Err(decode("zero-length message".into()));
                }
                let end = (offset + len).min(data.len());
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..end])
                    .map_err(|e| decode(e.to_string()))?;
                offset += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if !dump {
                            // A non-dump reply (RTM_NEWLINK to a GET) is followed
                            // by an ACK only when NLM_F_ACK was set.
                            if flags & NLM_F_ACK == 0 {
                                return Ok(out);
                            }
                        }
                    }
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(NetlinkError::Kernel {
                                op: op.to_owned(),
                                errno: -code.get(),
                            }),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<(), NetlinkError> {
        self.request(op, msg, flags | NLM_F_ACK).map(drop)
    }

    /// A link by name; `None` when it does not exist.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.request(
            &format!("get link {name}"),
            RouteNetlinkMessage::GetLink(msg),
            NLM_F_ACK,
        ) {
            Ok(replies) => Ok(replies.into_iter().find_map(link_of)),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let replies = self.request(
            "list links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies.into_iter().filter_map(link_of).collect())
    }

    /// Create a veth pair: `name` here (with `mac`, `mtu`), the peer directly in the
    /// namespace `peer.netns_fd` under `peer.name`. Fails with EEXIST if `name`
    /// exists here; if the peer name is taken there, the kernel refuses the whole
    /// pair, so nothing is left half-made.
    pub fn add_veth(
        &mut self,
        name: &str,
        mac: [u8; 6],
        mtu: u32,
        peer: &VethPeer<'_>,
    ) -> Result<(), NetlinkError> {
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
        self.ack(
            &format!("create veth {name} (peer {})", peer.name),
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Bring a link up and optionally set its alias (the kernel ignores
    /// `IFLA_IFALIAS` at creation, so it is set here).
    pub fn set_up(&mut self, index: u32, alias: Option<&str>) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        if let Some(a) = alias {
            msg.attributes.push(LinkAttribute::IfAlias(a.to_owned()));
        }
        self.ack(
            &format!("set link {index} up"),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )
    }

    /// Rename a (down) link, label it with its owner and bring it up, in one
    /// message: the kernel applies the name before the flags, and no observer ever
    /// sees the final name without the alias.
    pub fn rename_label_up(
        &mut self,
        index: u32,
        name: &str,
        alias: &str,
    ) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        msg.attributes
            .push(LinkAttribute::IfAlias(alias.to_owned()));
        self.ack(
            &format!("rename link {index} to {name} and set it up"),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )
    }

    /// Delete a link by index. Deleting either end of a veth pair removes both,
    /// and with them every address and route on them.
    pub fn del_link(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.ack(
            &format!("delete link {index}"),
            RouteNetlinkMessage::DelLink(msg),
            0,
        )
    }

    /// Delete a link by index; `Ok(false)` when it is already gone (its peer's
    /// namespace died between a lookup and this delete). Teardown paths delete by
    /// index after checking the link's owner, never by name: a name can pass to a
    /// newer sandbox of the same pod between the two.
    pub fn del_link_if_present(&mut self, index: u32) -> Result<bool, NetlinkError> {
        match self.del_link(index) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn add_address(&mut self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = family(addr.addr());
        msg.header.prefix_len = addr.prefix_len();
        msg.header.scope = AddressScope::Universe;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr.addr()));
        msg.attributes.push(AddressAttribute::Address(addr.addr()));
        self.ack(
            &format!("add address {addr} to link {index}"),
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Addresses on one link (both families).
    pub fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
        let replies = self.request(
            "list addresses",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    let ip = a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    let ip = ip.or_else(|| {
                        a.attributes.iter().find_map(|at| match at {
                            AddressAttribute::Address(ip) => Some(*ip),
                            _ => None,
                        })
                    })?;
                    IpNet::new(ip, a.header.prefix_len).ok()
                }
                _ => None,
            })
            .collect())
    }

    /// Add (or replace) an IPv4 route in the main table.
    pub fn add_route4(&mut self, route: &Route4, replace: bool) -> Result<(), NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = route.dst.prefix_len();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::from(route.scope);
        msg.header.kind = RouteType::Unicast;
        if route.onlink {
            msg.header.flags = RouteFlags::Onlink;
        }
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                route.dst.network(),
            )));
        if let Some(gw) = route.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
        }
        if let Some(oif) = route.oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        let flags = if replace {
            NLM_F_CREATE | NLM_F_REPLACE
        } else {
            NLM_F_CREATE | NLM_F_EXCL
        };
        self.ack(
            &format!("add route {}", route.dst),
            RouteNetlinkMessage::NewRoute(msg),
            flags,
        )
    }

    /// Every IPv4 unicast route of the main table.
    pub fn routes4(&mut self) -> Result<Vec<Route4>, NetlinkError> {
        let mut req = RouteMessage::default();
        req.header.address_family = AddressFamily::Inet;
        let replies = self.request(
            "list routes",
            RouteNetlinkMessage::GetRoute(req),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r)
                    if r.header.table == RouteHeader::RT_TABLE_MAIN
                        && r.header.kind == RouteType::Unicast =>
                {
                    route4_of(&r)
                }
                _ => None,
            })
            .collect())
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn route4_of(r: &RouteMessage) -> Option<Route4> {
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
            RouteAttribute::Oif(o) => oif = Some(*o),
            _ => {}
        }
    }
    Some(Route4 {
        dst: ipnet::Ipv4Net::new(dst, r.header.destination_prefix_length).ok()?,
        gateway,
        oif,
        scope: u8::from(r.header.scope),
        onlink: r.header.flags.contains(RouteFlags::Onlink),
    })
}

fn link_of(m: RouteNetlinkMessage) -> Option<Link> {
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
    };
    for a in l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(m) => link.mac = m.try_into().ok(),
            LinkAttribute::Mtu(m) => link.mtu = Some(m),
            LinkAttribute::IfAlias(a) => link.alias = Some(a),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        link.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    Some(link)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parse `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| {
            if p.len() == 2 {
                u8::from_str_radix(p, 16).ok()
            } else {
                None
            }
        })
        .collect::<Option<_>>()?;
    parts.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_round_trip() {
        let m = parse_mac("EE:ee:0a:00:ff:01").unwrap();
        assert_eq!(m, [0xee, 0xee, 0x0a, 0x00, 0xff, 0x01]);
        assert_eq!(format_mac(m), "ee:ee:0a:00:ff:01");
        for bad in [
            "",
            "ee:ee",
            "ee:ee:ee:ee:ee:ee:ee",
            "eee:e:ee:ee:ee:ee",
            "zz:ee:ee:ee:ee:ee",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_fresh_namespace_lists_lo_and_refuses_unknown_links() {
        if !sluice_testkit::require_root("netlink_in_netns") {
            return;
        }
        sluice_testkit::in_new_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let links = nl.links().unwrap();
            assert!(links.iter().any(|l| l.name == "lo" && l.up));
            assert_eq!(nl.link_by_name("nope0").unwrap(), None);
            assert!(!nl.del_link_if_present(999_999).unwrap());
            let lo = nl.link_by_name("lo").unwrap().unwrap();
            let addrs = nl.addresses(lo.index).unwrap();
            assert!(addrs.contains(&"127.0.0.1/8".parse().unwrap()), "{addrs:?}");
        });
    }

    #[test]
    fn typed_ops_create_and_read_back_a_veth_pair_across_namespaces() {
        if !sluice_testkit::require_root("netlink_typed_ops") {
            return;
        }
        sluice_testkit::in_new_netns(|| {
            let peer_ns = sluice_testkit::NetnsHolder::new();
            let peer_fd = std::fs::File::open(peer_ns.path()).unwrap();
            let mut nl = Netlink::open().unwrap();
            let mac = [0xee; 6];
            let peer = VethPeer {
                name: "eth0",
                netns_fd: std::os::fd::AsRawFd::as_raw_fd(&peer_fd),
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
                dst: "10.9.0.5/32".parse().unwrap(),
                gateway: None,
                oif: Some(l.index),
                scope: SCOPE_LINK,
                onlink: false,
            };
            nl.add_route4(&r, false).unwrap();
            assert_eq!(
                nl.add_route4(&r, false).unwrap_err().errno(),
                Some(libc::EEXIST)
            );
            let onlink = Route4 {
                dst: "10.200.0.0/16".parse().unwrap(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                oif: Some(l.index),
                scope: SCOPE_UNIVERSE,
                onlink: true,
            };
            nl.add_route4(&onlink, false).unwrap();
            let routes = nl.routes4().unwrap();
            assert!(
                routes.contains(&r) && routes.contains(&onlink),
                "{routes:?}"
            );
            nl.add_address(l.index, "10.9.0.1/32".parse().unwrap())
                .unwrap();
            assert!(
                nl.addresses(l.index)
                    .unwrap()
                    .contains(&"10.9.0.1/32".parse().unwrap())
            );

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
}
