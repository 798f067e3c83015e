//! The rtnetlink connection the tunnel, route and MTU code talks to the kernel through.
//!
//! [`Netlink`] implements [`crate::routes::RouteTable`] and [`crate::tunnel::LinkTable`]
//! and answers the few queries of [`crate::mtu`]. It is the only file of the agent that
//! knows rtnetlink's message types.
//!
//! A netlink socket belongs to the network namespace it was created in, for its whole
//! life. [`Netlink::open_in`] creates the socket on a short-lived `std::thread` that has
//! entered the target namespace, then drives it from the caller's tokio runtime: no
//! runtime thread ever changes namespace and nothing holds a namespace across `.await`
//! (STYLE.md 7). The agent uses [`Netlink::open`] (its own namespace); tests and the lab
//! use `open_in("/run/netns/<node>")` to act as several nodes from one process.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, LinkIpIp, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::mtu::{DefaultRoute, LinkSummary};
use crate::routes::{KernelRoute, L2Entry, ROUTE_PROTOCOL, RouteTable, RouteTarget};
use crate::tunnel::{LinkKind, LinkState, LinkTable, VxlanParams};

/// A failed netlink operation.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket: {0}")]
    Open(#[source] std::io::Error),
    #[error("entering network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused a request; `errno` is positive (`libc::EEXIST`, …).
    #[error("{op}: {message} (errno {errno})")]
    Kernel {
        op: &'static str,
        errno: i32,
        message: String,
    },
    /// The conversation failed in another way (unexpected message, closed socket).
    #[error("{op}: {message}")]
    Protocol { op: &'static str, message: String },
    #[error("no link named {0}")]
    NoSuchLink(String),
}

impl NetlinkError {
    /// The kernel's errno, when the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    fn from_rtnl(op: &'static str) -> impl Fn(rtnetlink::Error) -> NetlinkError {
        move |e| match e {
            rtnetlink::Error::NetlinkError(m) if m.code.is_some() => {
                let errno = -m.code.map(|c| c.get()).unwrap_or_default();
                NetlinkError::Kernel {
                    op,
                    errno,
                    message: std::io::Error::from_raw_os_error(errno).to_string(),
                }
            }
            other => NetlinkError::Protocol {
                op,
                message: other.to_string(),
            },
        }
    }
}

/// A route-netlink connection to one network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// A connection to the calling thread's namespace. Must run inside a tokio runtime.
    pub fn open() -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Open)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// A connection to the namespace at `path` (`/run/netns/NAME`, `/proc/PID/ns/net`).
    /// Must be called inside a tokio runtime, which then drives the socket.
    pub fn open_in(path: &Path) -> Result<Netlink, NetlinkError> {
        let rt = tokio::runtime::Handle::current();
        let path = path.to_path_buf();
        let (conn, handle) = std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).map_err(|source| NetlinkError::Netns {
                    path: path.clone(),
                    source,
                })?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    NetlinkError::Netns {
                        path: path.clone(),
                        source: e.into(),
                    }
                })?;
                // The socket is created here, in the target namespace; registering it
                // with the runtime's reactor needs the runtime context.
                let _guard = rt.enter();
                let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Open)?;
                Ok::<_, NetlinkError>((conn, handle))
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })?;
        rt.spawn(conn);
        Ok(Netlink { handle })
    }

    async fn link_messages(&self) -> Result<Vec<LinkMessage>, NetlinkError> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::from_rtnl("listing links"))
    }

    async fn ipv4_addresses(
        &self,
        index: Option<u32>,
    ) -> Result<Vec<AddressMessage>, NetlinkError> {
        let mut req = self.handle.address().get();
        if let Some(i) = index {
            req = req.set_link_index_filter(i);
        }
        let all: Vec<AddressMessage> = req
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::from_rtnl("listing addresses"))?;
        Ok(all
            .into_iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
            .filter(|m| index.is_none_or(|i| m.header.index == i))
            .collect())
    }

    async fn route_messages(&self) -> Result<Vec<RouteMessage>, NetlinkError> {
        self.handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::from_rtnl("listing routes"))
    }

    /// The link message for `name`, `None` when there is no such link.
    async fn link_message(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let res: Result<Vec<LinkMessage>, _> = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_collect()
            .await;
        match res.map_err(NetlinkError::from_rtnl("get link")) {
            Ok(m) => Ok(m.into_iter().next()),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn index_of(&self, name: &str) -> Result<u32, NetlinkError> {
        match self.link_message(name).await? {
            Some(m) => Ok(m.header.index),
            None => Err(NetlinkError::NoSuchLink(name.to_string())),
        }
    }

    /// Every link with its IPv4 addresses (for [`crate::mtu::detect_uplink`]).
    pub async fn link_summaries(&self) -> Result<Vec<LinkSummary>, NetlinkError> {
        let addrs = self.ipv4_addresses(None).await?;
        Ok(self
            .link_messages()
            .await?
            .iter()
            .map(|m| LinkSummary {
                index: m.header.index,
                name: link_name(m),
                mtu: link_mtu(m),
                ipv4: addrs
                    .iter()
                    .filter(|a| a.header.index == m.header.index)
                    .filter_map(address_of)
                    .map(|n| n.addr())
                    .collect(),
            })
            .collect())
    }

    /// Default routes of the main table (for [`crate::mtu::detect_uplink`]).
    pub async fn default_routes(&self) -> Result<Vec<DefaultRoute>, NetlinkError> {
        Ok(self
            .route_messages()
            .await?
            .iter()
            .filter(|m| route_table(m) == crate::routes::MAIN_TABLE)
            .filter(|m| m.header.destination_prefix_length == 0)
            .filter_map(|m| {
                let oif = m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })?;
                let metric = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Priority(p) => Some(*p),
                        _ => None,
                    })
                    .unwrap_or(0);
                Some(DefaultRoute { oif, metric })
            })
            .collect())
    }
}

fn link_name(m: &LinkMessage) -> String {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn link_mtu(m: &LinkMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}

fn address_of(m: &AddressMessage) -> Option<Ipv4Net> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on
    // point-to-point links and equal to IFA_LOCAL elsewhere.
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    });
    let addr = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    });
    Ipv4Net::new(local.or(addr)?, m.header.prefix_len).ok()
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table as u32)
}

fn link_kind(m: &LinkMessage) -> LinkKind {
    let infos = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    });
    let Some(infos) = infos else {
        return LinkKind::Other(String::new());
    };
    let kind = infos.iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k.clone()),
        _ => None,
    });
    match kind {
        Some(InfoKind::IpIp) => LinkKind::Ipip,
        Some(InfoKind::Vxlan) => {
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
            LinkKind::Vxlan(p)
        }
        Some(k) => LinkKind::Other(k.to_string()),
        None => LinkKind::Other(String::new()),
    }
}

fn mac6(bytes: &[u8]) -> Option<[u8; 6]> {
    bytes.try_into().ok()
}

impl RouteTable for Netlink {
    async fn routes(&self) -> Result<Vec<KernelRoute>, NetlinkError> {
        let names: Vec<(u32, String)> = self
            .link_messages()
            .await?
            .iter()
            .map(|m| (m.header.index, link_name(m)))
            .collect();
        let name_of = |i: u32| names.iter().find(|(n, _)| *n == i).map(|(_, s)| s.clone());
        let mut out = Vec::new();
        for m in self.route_messages().await? {
            if m.header.address_family != AddressFamily::Inet {
                continue;
            }
            let dst_ip = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
                    _ => None,
                })
                .unwrap_or(Ipv4Addr::UNSPECIFIED);
            let Ok(dst) = Ipv4Net::new(dst_ip, m.header.destination_prefix_length) else {
                continue;
            };
            let gateway = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            let oif = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            let target = match (m.header.kind, gateway) {
                (RouteType::BlackHole, _) => RouteTarget::Blackhole,
                (RouteType::Unicast, Some(gateway)) => RouteTarget::Via {
                    gateway,
                    dev: oif.and_then(name_of),
                    onlink: m.header.flags.contains(RouteFlags::Onlink),
                },
                _ => RouteTarget::Other,
            };
            out.push(KernelRoute {
                dst,
                protocol: u8::from(m.header.protocol),
                table: route_table(&m),
                priority: m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Priority(p) => Some(*p),
                        _ => None,
                    })
                    .unwrap_or(0),
                target,
            });
        }
        Ok(out)
    }

    async fn replace_route(&self, dst: Ipv4Net, target: &RouteTarget) -> Result<(), NetlinkError> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
        match target {
            RouteTarget::Blackhole => b = b.kind(RouteType::BlackHole),
            RouteTarget::Via {
                gateway,
                dev,
                onlink,
            } => {
                b = b.gateway(*gateway);
                if let Some(dev) = dev {
                    b = b.output_interface(self.index_of(dev).await?);
                }
                if *onlink {
                    b = b.onlink();
                }
            }
            RouteTarget::Other => {
                return Err(NetlinkError::Protocol {
                    op: "replace route",
                    message: "sluice installs only blackhole and via routes".into(),
                });
            }
        }
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(NetlinkError::from_rtnl("replace route"))
    }

    async fn delete_route(&self, route: &KernelRoute) -> Result<(), NetlinkError> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(route.dst.network(), route.dst.prefix_len())
            .table_id(route.table)
            .protocol(RouteProtocol::from(route.protocol))
            .priority(route.priority);
        if route.target == RouteTarget::Blackhole {
            b = b.kind(RouteType::BlackHole);
        }
        self.handle
            .route()
            .del(b.build())
            .execute()
            .await
            .map_err(NetlinkError::from_rtnl("delete route"))
    }

    async fn l2_entries(&self, dev: &str) -> Result<Vec<L2Entry>, NetlinkError> {
        let Some(link) = self.link(dev).await? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Bridge] {
            let msgs: Vec<NeighbourMessage> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .map_err(NetlinkError::from_rtnl("listing neighbours"))?;
            for m in msgs {
                if m.header.ifindex != link.index || m.header.state != NeighbourState::Permanent {
                    continue;
                }
                let ip = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                    // In an AF_BRIDGE (FDB) message the parser cannot know the remote's
                    // family and hands back raw bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                    }
                    _ => None,
                });
                let mac = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(b) => mac6(b),
                    _ => None,
                });
                let (Some(ip), Some(mac)) = (ip, mac) else {
                    continue;
                };
                out.push(match family {
                    AddressFamily::Bridge => L2Entry::Fdb {
                        dev: dev.to_string(),
                        mac,
                        dst: ip,
                    },
                    _ => L2Entry::Neighbour {
                        dev: dev.to_string(),
                        ip,
                        mac,
                    },
                });
            }
        }
        out.sort();
        Ok(out)
    }

    async fn replace_l2(&self, entry: &L2Entry) -> Result<(), NetlinkError> {
        let req = match entry {
            L2Entry::Neighbour { dev, ip, mac } => self
                .handle
                .neighbours()
                .add(self.index_of(dev).await?, IpAddr::V4(*ip))
                .link_layer_address(mac),
            L2Entry::Fdb { dev, mac, dst } => self
                .handle
                .neighbours()
                .add_bridge(self.index_of(dev).await?, mac)
                .destination(IpAddr::V4(*dst))
                // NTF_SELF: the entry belongs to the VXLAN device itself, not to a bridge
                // it might be enslaved to (`bridge fdb … self`).
                .flags(NeighbourFlags::Own),
        };
        req.state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(NetlinkError::from_rtnl("replace neighbour/fdb entry"))
    }

    async fn delete_l2(&self, entry: &L2Entry) -> Result<(), NetlinkError> {
        let mut m = NeighbourMessage::default();
        match entry {
            L2Entry::Neighbour { dev, ip, .. } => {
                m.header.family = AddressFamily::Inet;
                m.header.ifindex = self.index_of(dev).await?;
                m.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(*ip)));
            }
            L2Entry::Fdb { dev, mac, dst } => {
                m.header.family = AddressFamily::Bridge;
                m.header.ifindex = self.index_of(dev).await?;
                m.header.flags = NeighbourFlags::Own;
                m.attributes
                    .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
                m.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                        *dst,
                    )));
            }
        }
        self.handle
            .neighbours()
            .del(m)
            .execute()
            .await
            .map_err(NetlinkError::from_rtnl("delete neighbour/fdb entry"))
    }
}

impl LinkTable for Netlink {
    async fn link(&self, name: &str) -> Result<Option<LinkState>, NetlinkError> {
        let Some(m) = self.link_message(name).await? else {
            return Ok(None);
        };
        let ipv4 = self
            .ipv4_addresses(Some(m.header.index))
            .await?
            .iter()
            .filter_map(address_of)
            .collect();
        Ok(Some(LinkState {
            index: m.header.index,
            name: link_name(&m),
            kind: link_kind(&m),
            mtu: link_mtu(&m),
            up: m.header.flags.contains(LinkFlags::Up),
            mac: m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(b) => mac6(b),
                _ => None,
            }),
            ipv4,
        }))
    }

    async fn create_ipip_fallback(&self) -> Result<(), NetlinkError> {
        match self
            .handle
            .link()
            .add(LinkIpIp::new(crate::tunnel::IPIP_DEVICE).build())
            .execute()
            .await
            .map_err(NetlinkError::from_rtnl("create tunl0"))
        {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    async fn create_vxlan(
        &self,
        name: &str,
        params: &VxlanParams,
        mac: [u8; 6],
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        let mut b = LinkVxlan::new(name, params.vni)
            .port(params.port)
            .learning(params.learning)
            .mtu(mtu)
            .address(mac.to_vec());
        if let Some(local) = params.local {
            b = b.local(local);
        }
        if let Some(dev) = params.uplink {
            b = b.dev(dev);
        }
        self.handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(NetlinkError::from_rtnl("create vxlan device"))
    }

    async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(NetlinkError::from_rtnl("delete link"))
    }

    async fn set_mtu_up(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(NetlinkError::from_rtnl("set link mtu/up"))
    }

    async fn add_address(&self, index: u32, addr: Ipv4Net) -> Result<(), NetlinkError> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
            .execute()
            .await
            .map_err(NetlinkError::from_rtnl("add address"))
        {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    async fn delete_address(&self, index: u32, addr: Ipv4Net) -> Result<(), NetlinkError> {
        let msgs = self.ipv4_addresses(Some(index)).await?;
        let Some(m) = msgs.into_iter().find(|m| address_of(m) == Some(addr)) else {
            return Ok(());
        };
        self.handle
            .address()
            .del(m)
            .execute()
            .await
            .map_err(NetlinkError::from_rtnl("delete address"))
    }
}
