//! Links, addresses, routes and neighbour entries as sluice sees them: plain values,
//! no netlink types.

use std::net::Ipv4Addr;
use std::os::fd::RawFd;

use ipnet::{IpNet, Ipv4Net};

/// Route scope `universe` (`RT_SCOPE_UNIVERSE`): a gateway route.
pub const SCOPE_UNIVERSE: u8 = 0;
/// Route scope `link` (`RT_SCOPE_LINK`): the destination is on the link.
pub const SCOPE_LINK: u8 = 253;
/// The kernel's main routing table (`RT_TABLE_MAIN`).
pub const MAIN_TABLE: u32 = 254;
/// Route protocol `boot` (`RTPROT_BOOT`), what `ip route add` writes by default.
pub const PROTO_BOOT: u8 = 3;

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub up: bool,
    /// `IFLA_INFO_KIND`, e.g. `veth`, `ipip`, `vxlan`.
    pub kind: Option<String>,
    pub alias: Option<String>,
    /// The VXLAN attributes, when `kind` is `vxlan`.
    pub vxlan: Option<VxlanParams>,
}

/// The VXLAN attributes sluice sets and compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanParams {
    pub vni: u32,
    pub port: u16,
    pub local: Option<Ipv4Addr>,
    /// Index of the underlay device (`dev`).
    pub uplink: Option<u32>,
    pub learning: bool,
}

/// The peer end of a new veth pair, created directly in another namespace.
pub struct VethPeer<'a> {
    pub name: &'a str,
    pub netns_fd: RawFd,
    pub mac: Option<[u8; 6]>,
}

/// An address on a link (either family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub net: IpNet,
}

/// What a route does with a packet, as far as sluice distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Unicast,
    Blackhole,
    /// Any other `RTN_*` type (local, broadcast, unreachable, …), by number.
    Other(u8),
}

/// An IPv4 route, as the kernel reports it or as sluice asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route4 {
    pub dst: Ipv4Net,
    pub kind: RouteKind,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub scope: u8,
    /// `onlink`: the gateway is reachable on `oif` without a route to it.
    pub onlink: bool,
    /// Route protocol (`proto`), the owner's mark.
    pub protocol: u8,
    pub table: u32,
    /// Metric; 0 unless someone chose otherwise.
    pub priority: u32,
}

impl Route4 {
    /// A unicast route to `dst` in the main table, scope universe, protocol boot,
    /// metric 0, with neither gateway nor device yet.
    pub fn new(dst: Ipv4Net) -> Route4 {
        Route4 {
            dst,
            kind: RouteKind::Unicast,
            gateway: None,
            oif: None,
            scope: SCOPE_UNIVERSE,
            onlink: false,
            protocol: PROTO_BOOT,
            table: MAIN_TABLE,
            priority: 0,
        }
    }

    /// Whether `self` forwards like `other`: same destination, type, table, gateway,
    /// device, scope and onlink flag, whoever installed it and at whatever metric.
    pub fn same_path(&self, other: &Route4) -> bool {
        (
            self.dst,
            self.kind,
            self.table,
            self.gateway,
            self.oif,
            self.scope,
            self.onlink,
        ) == (
            other.dst,
            other.kind,
            other.table,
            other.gateway,
            other.oif,
            other.scope,
            other.onlink,
        )
    }
}

/// Which L2 table a [`Neighbour`] lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NeighbourTable {
    /// The IPv4 neighbour (ARP) table: IP → MAC (`ip neigh`).
    Arp,
    /// A device's forwarding database: MAC → remote IP (`bridge fdb … self`).
    Fdb,
}

/// A permanent L2 entry on a device: in the ARP table `ip` is the neighbour and `mac`
/// its address; in the FDB `mac` is the destination and `ip` the remote to send to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Neighbour {
    pub table: NeighbourTable,
    pub index: u32,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
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
    fn a_route_forwards_the_same_whoever_installed_it_and_at_any_metric() {
        let a = Route4 {
            oif: Some(3),
            ..Route4::new("10.0.0.0/8".parse().unwrap())
        };
        let b = Route4 {
            protocol: 4,
            priority: 100,
            ..a.clone()
        };
        assert!(a.same_path(&b));
        let c = Route4 {
            oif: Some(4),
            ..a.clone()
        };
        assert!(!a.same_path(&c));
    }
}
