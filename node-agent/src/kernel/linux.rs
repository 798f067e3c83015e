//! [`Netlink`]: the kernel seam's traits over a `sluice-netlink` socket.
//!
//! The socket is synchronous and lives on a thread of its own for its whole life;
//! the async trait methods send it a job and await the answer. So no tokio worker
//! blocks on the kernel, no runtime thread ever changes namespace, and nothing holds
//! a namespace across `.await` (setns changes one thread only). A socket belongs to the namespace it
//! was created in: [`Netlink::open`] makes it in the caller's, [`Netlink::open_in`]
//! (tests, the lab) in another one, on a short-lived thread that enters it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;

use ipnet::{IpNet, Ipv4Net};
use sluice_netlink::{Link, Neighbour, NeighbourTable, Route4, RouteKind};

use super::{
    DefaultRoute, IPIP_DEVICE, KernelError, KernelRoute, L2Entry, LinkKind, LinkState, LinkSummary,
    LinkTable, MAIN_TABLE, ROUTE_PROTOCOL, RouteTable, RouteTarget, UplinkSource, VxlanParams,
};

type Socket = sluice_netlink::Netlink;
type Job = Box<dyn FnOnce(&mut Socket) + Send>;

/// A route-netlink connection to one network namespace. Clones share the socket.
#[derive(Clone)]
pub struct Netlink {
    jobs: mpsc::Sender<Job>,
}

impl Netlink {
    /// A connection to the calling thread's namespace.
    pub fn open() -> Result<Netlink, KernelError> {
        Netlink::serve(Socket::open()?)
    }

    /// A connection to the namespace at `path` (`/run/netns/NAME`, `/proc/PID/ns/net`).
    pub fn open_in(path: &Path) -> Result<Netlink, KernelError> {
        Netlink::serve(Socket::open_in(path)?)
    }

    /// Hand `socket` to a thread that runs jobs on it until every clone is dropped.
    fn serve(mut socket: Socket) -> Result<Netlink, KernelError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("sluice-netlink".into())
            .spawn(move || {
                for job in queue {
                    job(&mut socket);
                }
            })
            .map_err(KernelError::Thread)?;
        Ok(Netlink { jobs })
    }

    /// Run `f` on the socket's thread and await its result.
    async fn call<T, F>(&self, f: F) -> Result<T, KernelError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Socket) -> Result<T, KernelError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |s| {
                let _ = tx.send(f(s));
            }))
            .map_err(|_| KernelError::ThreadGone)?;
        rx.await.map_err(|_| KernelError::ThreadGone)?
    }
}

fn index_of(s: &mut Socket, name: &str) -> Result<u32, KernelError> {
    match s.link_by_name(name)? {
        Some(l) => Ok(l.index),
        None => Err(KernelError::NoSuchLink(name.to_string())),
    }
}

fn link_kind(l: &Link) -> LinkKind {
    match (l.kind.as_deref(), &l.vxlan) {
        (_, Some(p)) => LinkKind::Vxlan(p.clone()),
        (Some("ipip"), _) => LinkKind::Ipip,
        (Some(k), _) => LinkKind::Other(k.to_string()),
        (None, _) => LinkKind::Other(String::new()),
    }
}

fn kernel_route(r: Route4, name_of: &HashMap<u32, String>) -> KernelRoute {
    let target = match (r.kind, r.gateway) {
        (RouteKind::Blackhole, _) => RouteTarget::Blackhole,
        (RouteKind::Unicast, Some(gateway)) => RouteTarget::Via {
            gateway,
            dev: r.oif.and_then(|i| name_of.get(&i).cloned()),
            onlink: r.onlink,
        },
        _ => RouteTarget::Other,
    };
    KernelRoute {
        dst: r.dst,
        protocol: r.protocol,
        table: r.table,
        priority: r.priority,
        target,
    }
}

/// The neighbour-table entry for `entry`, on the device's index.
fn neighbour(s: &mut Socket, entry: &L2Entry) -> Result<Neighbour, KernelError> {
    Ok(match entry {
        L2Entry::Neighbour { dev, ip, mac } => Neighbour {
            table: NeighbourTable::Arp,
            index: index_of(s, dev)?,
            ip: *ip,
            mac: *mac,
        },
        L2Entry::Fdb { dev, mac, dst } => Neighbour {
            table: NeighbourTable::Fdb,
            index: index_of(s, dev)?,
            ip: *dst,
            mac: *mac,
        },
    })
}

fn eexist_is_ok(r: Result<(), sluice_netlink::NetlinkError>) -> Result<(), KernelError> {
    match r {
        Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
        other => Ok(other?),
    }
}

impl RouteTable for Netlink {
    async fn routes(&self) -> Result<Vec<KernelRoute>, KernelError> {
        self.call(|s| {
            let names: HashMap<u32, String> =
                s.links()?.into_iter().map(|l| (l.index, l.name)).collect();
            Ok(s.all_routes4()?
                .into_iter()
                .map(|r| kernel_route(r, &names))
                .collect())
        })
        .await
    }

    async fn replace_route(&self, dst: Ipv4Net, target: &RouteTarget) -> Result<(), KernelError> {
        let target = target.clone();
        self.call(move |s| {
            let mut r = Route4 {
                protocol: ROUTE_PROTOCOL,
                ..Route4::new(dst)
            };
            match target {
                RouteTarget::Blackhole => r.kind = RouteKind::Blackhole,
                RouteTarget::Via {
                    gateway,
                    dev,
                    onlink,
                } => {
                    r.gateway = Some(gateway);
                    if let Some(dev) = dev {
                        r.oif = Some(index_of(s, &dev)?);
                    }
                    r.onlink = onlink;
                }
                RouteTarget::Other => return Err(KernelError::UnsupportedRoute(dst)),
            }
            Ok(s.add_route4(&r, true)?)
        })
        .await
    }

    async fn delete_route(&self, route: &KernelRoute) -> Result<(), KernelError> {
        // Named by destination, table, type, protocol and metric: exactly one route.
        let r = Route4 {
            kind: match route.target {
                RouteTarget::Blackhole => RouteKind::Blackhole,
                _ => RouteKind::Unicast,
            },
            protocol: route.protocol,
            table: route.table,
            priority: route.priority,
            ..Route4::new(route.dst)
        };
        self.call(move |s| Ok(s.del_route4(&r)?)).await
    }

    async fn l2_entries(&self, dev: &str) -> Result<Vec<L2Entry>, KernelError> {
        let dev = dev.to_string();
        self.call(move |s| {
            let Some(link) = s.link_by_name(&dev)? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for table in [NeighbourTable::Arp, NeighbourTable::Fdb] {
                for n in s.permanent_neighbours(table, link.index)? {
                    out.push(match table {
                        NeighbourTable::Arp => L2Entry::Neighbour {
                            dev: dev.clone(),
                            ip: n.ip,
                            mac: n.mac,
                        },
                        NeighbourTable::Fdb => L2Entry::Fdb {
                            dev: dev.clone(),
                            mac: n.mac,
                            dst: n.ip,
                        },
                    });
                }
            }
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn replace_l2(&self, entry: &L2Entry) -> Result<(), KernelError> {
        let entry = entry.clone();
        self.call(move |s| {
            let n = neighbour(s, &entry)?;
            Ok(s.replace_neighbour(&n)?)
        })
        .await
    }

    async fn delete_l2(&self, entry: &L2Entry) -> Result<(), KernelError> {
        let entry = entry.clone();
        self.call(move |s| {
            let n = neighbour(s, &entry)?;
            Ok(s.del_neighbour(&n)?)
        })
        .await
    }
}

impl LinkTable for Netlink {
    async fn link(&self, name: &str) -> Result<Option<LinkState>, KernelError> {
        let name = name.to_string();
        self.call(move |s| {
            let Some(l) = s.link_by_name(&name)? else {
                return Ok(None);
            };
            Ok(Some(LinkState {
                index: l.index,
                kind: link_kind(&l),
                mtu: l.mtu.unwrap_or(0),
                up: l.up,
                mac: l.mac,
                ipv4: s.ipv4_addresses(l.index)?,
                name: l.name,
            }))
        })
        .await
    }

    async fn create_ipip_fallback(&self) -> Result<(), KernelError> {
        self.call(|s| eexist_is_ok(s.add_ipip(IPIP_DEVICE))).await
    }

    async fn create_vxlan(
        &self,
        name: &str,
        params: &VxlanParams,
        mac: [u8; 6],
        mtu: u32,
    ) -> Result<(), KernelError> {
        let (name, params) = (name.to_string(), params.clone());
        self.call(move |s| Ok(s.add_vxlan(&name, &params, mac, mtu)?))
            .await
    }

    async fn delete_link(&self, index: u32) -> Result<(), KernelError> {
        self.call(move |s| Ok(s.del_link(index)?)).await
    }

    async fn set_mtu_up(&self, index: u32, mtu: u32) -> Result<(), KernelError> {
        self.call(move |s| Ok(s.set_mtu_up(index, mtu)?)).await
    }

    async fn add_address(&self, index: u32, addr: Ipv4Net) -> Result<(), KernelError> {
        self.call(move |s| eexist_is_ok(s.add_address(index, IpNet::V4(addr))))
            .await
    }

    async fn delete_address(&self, index: u32, addr: Ipv4Net) -> Result<(), KernelError> {
        self.call(move |s| {
            if !s.ipv4_addresses(index)?.contains(&addr) {
                return Ok(());
            }
            Ok(s.del_address(index, IpNet::V4(addr))?)
        })
        .await
    }
}

impl UplinkSource for Netlink {
    async fn link_summaries(&self) -> Result<Vec<LinkSummary>, KernelError> {
        self.call(|s| {
            let addrs = s.all_addresses()?;
            Ok(s.links()?
                .into_iter()
                .map(|l| LinkSummary {
                    ipv4: addrs
                        .iter()
                        .filter(|a| a.index == l.index)
                        .filter_map(|a| match a.net {
                            IpNet::V4(n) => Some(n.addr()),
                            IpNet::V6(_) => None,
                        })
                        .collect(),
                    index: l.index,
                    name: l.name,
                    mtu: l.mtu.unwrap_or(0),
                })
                .collect())
        })
        .await
    }

    async fn default_routes(&self) -> Result<Vec<DefaultRoute>, KernelError> {
        self.call(|s| {
            Ok(s.all_routes4()?
                .into_iter()
                .filter(|r| r.table == MAIN_TABLE && r.dst.prefix_len() == 0)
                .filter_map(|r| {
                    Some(DefaultRoute {
                        oif: r.oif?,
                        metric: r.priority,
                    })
                })
                .collect())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str) -> Route4 {
        Route4::new(dst.parse().unwrap())
    }

    #[test]
    fn kernel_routes_read_as_blackhole_via_or_other() {
        let names = HashMap::from([(3, "tunl0".to_string())]);
        let blackhole = Route4 {
            kind: RouteKind::Blackhole,
            protocol: ROUTE_PROTOCOL,
            ..route("10.244.1.0/24")
        };
        assert_eq!(
            kernel_route(blackhole, &names).target,
            RouteTarget::Blackhole
        );
        let via = Route4 {
            gateway: Some("192.168.0.2".parse().unwrap()),
            oif: Some(3),
            onlink: true,
            priority: 5,
            ..route("10.244.2.0/24")
        };
        let k = kernel_route(via, &names);
        assert_eq!(
            k.target,
            RouteTarget::Via {
                gateway: "192.168.0.2".parse().unwrap(),
                dev: Some("tunl0".into()),
                onlink: true
            }
        );
        assert_eq!((k.protocol, k.table, k.priority), (3, MAIN_TABLE, 5));
        let on_link = Route4 {
            oif: Some(3),
            ..route("10.244.3.0/24")
        };
        assert_eq!(kernel_route(on_link, &names).target, RouteTarget::Other);
    }

    #[test]
    fn link_kinds_follow_the_info_kind() {
        let link = |kind: Option<&str>, vxlan: Option<VxlanParams>| Link {
            index: 1,
            name: "x".into(),
            mac: None,
            mtu: None,
            up: false,
            kind: kind.map(str::to_string),
            alias: None,
            vxlan,
        };
        let p = VxlanParams {
            vni: 1,
            port: 2,
            local: None,
            uplink: None,
            learning: false,
        };
        assert_eq!(link_kind(&link(Some("ipip"), None)), LinkKind::Ipip);
        assert_eq!(
            link_kind(&link(Some("vxlan"), Some(p.clone()))),
            LinkKind::Vxlan(p)
        );
        assert_eq!(
            link_kind(&link(Some("veth"), None)),
            LinkKind::Other("veth".into())
        );
        assert_eq!(link_kind(&link(None, None)), LinkKind::Other(String::new()));
    }
}
