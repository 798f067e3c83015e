//! A synchronous rtnetlink socket with the typed operations the plugin and the agent
//! need. Each operation is one request (built in [`crate::message`]) and its replies.

use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::error::NetlinkError;
use crate::message;
use crate::types::{
    Address, Link, MAIN_TABLE, Neighbour, NeighbourTable, Route4, RouteKind, VethPeer, VxlanParams,
};

/// A route-netlink socket in one network namespace.
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

    /// Open a socket in the namespace at `path` (`/run/netns/NAME`,
    /// `/proc/PID/ns/net`). `setns` changes only the calling thread, so the socket is
    /// made on a short-lived thread of our own that enters the namespace and ends;
    /// the caller's thread never changes namespace.
    pub fn open_in(path: &Path) -> Result<Netlink, NetlinkError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let netns = |source| NetlinkError::Netns {
                    path: path.to_path_buf(),
                    source,
                };
                let ns = std::fs::File::open(path).map_err(netns)?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| netns(e.into()))?;
                Netlink::open()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
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

    fn dump(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.request(op, msg, NLM_F_DUMP)
    }

    // ---- links ----

    /// A link by name; `None` when it does not exist.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, NetlinkError> {
        match self.request(
            &format!("get link {name}"),
            message::get_link(name),
            NLM_F_ACK,
        ) {
            Ok(replies) => Ok(replies.into_iter().find_map(message::link_of)),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let replies = self.dump("list links", message::dump_links())?;
        Ok(replies.into_iter().filter_map(message::link_of).collect())
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
        self.ack(
            &format!("create veth {name} (peer {})", peer.name),
            message::new_veth(name, mac, mtu, peer),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Create an IPIP device (EEXIST when it exists).
    pub fn add_ipip(&mut self, name: &str) -> Result<(), NetlinkError> {
        self.ack(
            &format!("create ipip device {name}"),
            message::new_ipip(name),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Create a VXLAN device (EEXIST when the name is taken).
    pub fn add_vxlan(
        &mut self,
        name: &str,
        params: &VxlanParams,
        mac: [u8; 6],
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        self.ack(
            &format!("create vxlan device {name}"),
            message::new_vxlan(name, params, mac, mtu),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Bring a link up and optionally set its alias (the kernel ignores
    /// `IFLA_IFALIAS` at creation, so it is set here).
    pub fn set_up(&mut self, index: u32, alias: Option<&str>) -> Result<(), NetlinkError> {
        self.ack(
            &format!("set link {index} up"),
            message::set_link_up(index, None, alias),
            0,
        )
    }

    /// Set a link's MTU and bring it up.
    pub fn set_mtu_up(&mut self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        self.ack(
            &format!("set link {index} mtu {mtu} up"),
            message::set_link_up(index, Some(mtu), None),
            0,
        )
    }

    /// Delete a link by index. Deleting either end of a veth pair removes both,
    /// and with them every address and route on them.
    pub fn del_link(&mut self, index: u32) -> Result<(), NetlinkError> {
        self.ack(&format!("delete link {index}"), message::del_link(index), 0)
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

    /// Rename a (down) link to `name`, label it with `alias` and bring it up, in
    /// one message (see [`message::rename_label_up`]).
    pub fn rename_label_up(
        &mut self,
        index: u32,
        name: &str,
        alias: &str,
    ) -> Result<(), NetlinkError> {
        self.ack(
            &format!("rename link {index} to {name} and set it up"),
            message::rename_label_up(index, name, alias),
            0,
        )
    }

    // ---- addresses ----

    /// Add an address (EEXIST when the link has it).
    pub fn add_address(&mut self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        self.ack(
            &format!("add address {addr} to link {index}"),
            message::new_address(index, addr),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    pub fn del_address(&mut self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        self.ack(
            &format!("delete address {addr} from link {index}"),
            message::del_address(index, addr),
            0,
        )
    }

    /// Every address of the namespace (both families).
    pub fn all_addresses(&mut self) -> Result<Vec<Address>, NetlinkError> {
        let replies = self.dump("list addresses", message::dump_addresses())?;
        Ok(replies.iter().filter_map(message::address_of).collect())
    }

    /// Addresses on one link (both families).
    pub fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
        Ok(self
            .all_addresses()?
            .into_iter()
            .filter(|a| a.index == index)
            .map(|a| a.net)
            .collect())
    }

    /// IPv4 addresses on one link.
    pub fn ipv4_addresses(&mut self, index: u32) -> Result<Vec<ipnet::Ipv4Net>, NetlinkError> {
        Ok(self
            .addresses(index)?
            .into_iter()
            .filter_map(|n| match n {
                IpNet::V4(n) => Some(n),
                IpNet::V6(_) => None,
            })
            .collect())
    }

    // ---- routes ----

    /// Add (or, with `replace`, create or replace) an IPv4 route.
    pub fn add_route4(&mut self, route: &Route4, replace: bool) -> Result<(), NetlinkError> {
        let (op, flags) = if replace {
            ("replace", NLM_F_CREATE | NLM_F_REPLACE)
        } else {
            ("add", NLM_F_CREATE | NLM_F_EXCL)
        };
        self.ack(
            &format!("{op} route {}", route.dst),
            message::new_route(route),
            flags,
        )
    }

    /// Delete the route matching `route` (destination, table, type, protocol, metric,
    /// scope, and gateway and device where given).
    pub fn del_route4(&mut self, route: &Route4) -> Result<(), NetlinkError> {
        self.ack(
            &format!("delete route {}", route.dst),
            message::del_route(route),
            0,
        )
    }

    /// Every IPv4 route of every table, of every type.
    pub fn all_routes4(&mut self) -> Result<Vec<Route4>, NetlinkError> {
        let replies = self.dump("list routes", message::dump_routes4())?;
        Ok(replies.iter().filter_map(message::route_of).collect())
    }

    /// Every IPv4 unicast route of the main table.
    pub fn routes4(&mut self) -> Result<Vec<Route4>, NetlinkError> {
        Ok(self
            .all_routes4()?
            .into_iter()
            .filter(|r| r.table == MAIN_TABLE && r.kind == RouteKind::Unicast)
            .collect())
    }

    // ---- neighbours and FDB entries ----

    /// The permanent entries of `table` on link `index`.
    pub fn permanent_neighbours(
        &mut self,
        table: NeighbourTable,
        index: u32,
    ) -> Result<Vec<Neighbour>, NetlinkError> {
        let replies = self.dump("list neighbours", message::dump_neighbours(table))?;
        Ok(replies
            .iter()
            .filter_map(|m| message::neighbour_of(table, m))
            .filter(|n| n.index == index)
            .collect())
    }

    /// Create or replace a permanent entry.
    pub fn replace_neighbour(&mut self, n: &Neighbour) -> Result<(), NetlinkError> {
        self.ack(
            &format!("replace {:?} entry {}", n.table, IpAddr::V4(n.ip)),
            message::new_neighbour(n),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    pub fn del_neighbour(&mut self, n: &Neighbour) -> Result<(), NetlinkError> {
        self.ack(
            &format!("delete {:?} entry {}", n.table, IpAddr::V4(n.ip)),
            message::del_neighbour(n),
            0,
        )
    }
}
