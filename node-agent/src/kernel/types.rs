//! The agent's vocabulary for the kernel's links, routes and L2 entries, and the
//! numbers and names that mark what is sluice's. Plain values; no I/O.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

pub use sluice_netlink::VxlanParams;

/// Route protocol number marking sluice's routes (`ip route show proto 181`).
///
/// 181 (`0xb5`) is unused by the kernel and by the routing daemons we know of (0–4,
/// 8–19, 42, 99, 186–188 are taken by the kernel, `bird`, `zebra` and friends; 181 is
/// in no `/etc/iproute2/rt_protos` we know of). A route with another protocol is
/// never sluice's to change.
pub const ROUTE_PROTOCOL: u8 = 0xb5;

/// The kernel's main routing table (`RT_TABLE_MAIN`).
pub const MAIN_TABLE: u32 = sluice_netlink::MAIN_TABLE;

/// The kernel's IPIP fallback device (exists in every namespace once `ipip` is loaded).
pub const IPIP_DEVICE: &str = "tunl0";

/// What a route does with a packet.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteTarget {
    /// `blackhole <block>`: our own block; addresses not (yet) given to a pod go nowhere
    /// instead of following the default route out of the node.
    Blackhole,
    /// `<block> via <gateway> [dev <dev>] [onlink]`. `dev: None` lets the kernel pick the
    /// device (encapsulation `none`: the gateway is on the uplink's subnet).
    Via {
        gateway: Ipv4Addr,
        dev: Option<String>,
        onlink: bool,
    },
    /// A route kind sluice never installs (seen only in the kernel's table).
    Other,
}

/// A route in the main table as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRoute {
    pub dst: Ipv4Net,
    pub protocol: u8,
    pub table: u32,
    /// Route metric; sluice installs metric 0 only.
    pub priority: u32,
    pub target: RouteTarget,
}

impl KernelRoute {
    pub fn is_ours(&self) -> bool {
        self.protocol == ROUTE_PROTOCOL && self.table == MAIN_TABLE
    }
}

/// A permanent L2 entry on the VXLAN device.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum L2Entry {
    /// `ip neigh replace <ip> lladdr <mac> dev <dev> nud permanent`
    Neighbour {
        dev: String,
        ip: Ipv4Addr,
        mac: [u8; 6],
    },
    /// `bridge fdb replace <mac> dev <dev> dst <dst> self permanent`
    Fdb {
        dev: String,
        mac: [u8; 6],
        dst: Ipv4Addr,
    },
}

/// The kind of a link as far as we care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Ipip,
    Vxlan(VxlanParams),
    Other(String),
}

/// A link as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    pub kind: LinkKind,
    pub mtu: u32,
    pub up: bool,
    pub mac: Option<[u8; 6]>,
    pub ipv4: Vec<Ipv4Net>,
}

/// A link and its IPv4 addresses, as uplink detection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkSummary {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub ipv4: Vec<Ipv4Addr>,
}

/// A default route of the main table: its device and metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DefaultRoute {
    pub oif: u32,
    pub metric: u32,
}

/// The device pod traffic leaves the node by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
}
