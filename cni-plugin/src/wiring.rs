//! What a wired pod looks like (docs/architecture.md, "A pod is wired"), as values: the plan ADD
//! carries out, the result it reports, and the comparison CHECK makes against what
//! the kernel shows. No I/O here.

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};
use sluice_cni::protocol::{CniResult, Dns, Interface, IpConfig, Route};

use sluice_netlink::{Link, Route4, SCOPE_LINK, format_mac};

/// The host side's fixed MAC: the pod then always ARPs for the same address, and
/// the host answers for 169.254.1.1 with proxy ARP.
pub const HOST_MAC: [u8; 6] = [0xee; 6];
/// The pod's next hop: link-local, never assigned anywhere, answered by proxy ARP.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// One attachment's wiring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub host_ifname: String,
    pub pod_ifname: String,
    /// The pod address, always /32.
    pub address: Ipv4Net,
    pub mtu: u32,
    /// The pod's primary interface (`eth0`) gets the link route to 169.254.1.1 and
    /// the default route. A secondary one (`net1`, …) must not take those from
    /// the primary: it gets only `routes`, each `via 169.254.1.1 onlink`.
    pub primary: bool,
    /// Destinations a secondary attachment routes (from its IPAM result).
    pub routes: Vec<Ipv4Net>,
    /// Stored as the host link's alias so GC can map an interface back to its
    /// attachment (container id and ifname are all GC is given).
    pub alias: String,
}

/// `sluice:<network>:<containerID>:<ifname>`. Container ids and interface names
/// cannot contain `:` (the spec and the kernel forbid it), so the last two fields
/// split unambiguously even if a network name has one.
pub fn alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("sluice:{network}:{container_id}:{ifname}")
}

/// The inverse of [`alias`]: `(network, container id, ifname)`.
pub fn parse_alias(alias: &str) -> Option<(&str, &str, &str)> {
    let rest = alias.strip_prefix("sluice:")?;
    let mut it = rest.rsplitn(3, ':');
    let ifname = it.next()?;
    let cid = it.next()?;
    let network = it.next()?;
    Some((network, cid, ifname))
}

/// The IPv4 destinations of an IPAM result's routes, less the default route: a
/// secondary attachment must not compete with the primary's default.
pub fn secondary_routes(ipam: &CniResult) -> Vec<Ipv4Net> {
    ipam.routes
        .iter()
        .filter_map(|r| match r.dst {
            IpNet::V4(d) if d.prefix_len() > 0 => Some(d.trunc()),
            _ => None,
        })
        .collect()
}

/// The first IPv4 address of an IPAM result, as the pod's /32.
pub fn pod_address(ipam: &CniResult) -> Option<Ipv4Net> {
    ipam.ips.iter().find_map(|ip| match ip.address {
        IpNet::V4(a) => Ipv4Net::new(a.addr(), 32).ok(),
        IpNet::V6(_) => None,
    })
}

impl Plan {
    /// Routes inside the pod. Primary: `169.254.1.1 dev <if> scope link`, then
    /// `default via 169.254.1.1 dev <if>`. Secondary: each of `routes` via
    /// 169.254.1.1 onlink.
    pub fn pod_routes(&self, pod_index: u32) -> Vec<Route4> {
        if !self.primary {
            return self
                .routes
                .iter()
                .map(|dst| Route4 {
                    gateway: Some(GATEWAY),
                    oif: Some(pod_index),
                    onlink: true,
                    ..Route4::new(*dst)
                })
                .collect();
        }
        vec![
            Route4 {
                oif: Some(pod_index),
                scope: SCOPE_LINK,
                ..Route4::new(Ipv4Net::new(GATEWAY, 32).expect("/32"))
            },
            Route4 {
                gateway: Some(GATEWAY),
                oif: Some(pod_index),
                ..Route4::new(Ipv4Net::default())
            },
        ]
    }

    /// The host route: `<podIP>/32 dev <veth> scope link`.
    pub fn host_route(&self, host_index: u32) -> Route4 {
        Route4 {
            oif: Some(host_index),
            scope: SCOPE_LINK,
            ..Route4::new(self.address)
        }
    }

    /// The ADD result: host interface, pod interface (with its sandbox), the /32
    /// on the pod interface, the default route; a chained `prevResult` comes first.
    pub fn result(
        &self,
        pod_mac: [u8; 6],
        netns: &str,
        dns: Dns,
        prev: Option<CniResult>,
    ) -> CniResult {
        let mut out = prev.unwrap_or_default();
        let base = out.interfaces.len();
        out.interfaces.push(Interface {
            name: self.host_ifname.clone(),
            mac: Some(format_mac(HOST_MAC)),
            ..Default::default()
        });
        out.interfaces.push(Interface {
            name: self.pod_ifname.clone(),
            mac: Some(format_mac(pod_mac)),
            sandbox: Some(netns.to_owned()),
            mtu: Some(self.mtu),
            ..Default::default()
        });
        out.ips.push(IpConfig {
            address: IpNet::V4(self.address),
            gateway: Some(GATEWAY.into()),
            interface: Some(base + 1),
        });
        if self.primary {
            out.routes.push(Route::new(
                IpNet::V4(Ipv4Net::default()),
                Some(GATEWAY.into()),
            ));
        } else {
            for dst in &self.routes {
                out.routes
                    .push(Route::new(IpNet::V4(*dst), Some(GATEWAY.into())));
            }
        }
        if !dns.is_empty() {
            out.dns = dns;
        }
        out
    }
}

/// What CHECK reads from the host namespace.
pub struct HostView {
    pub link: Option<Link>,
    pub addresses: Vec<IpNet>,
    pub routes: Vec<Route4>,
    /// `(sysctl key, value read)`; `None` when unreadable.
    pub sysctls: Vec<(&'static str, Option<String>)>,
}

/// What CHECK reads inside the pod.
pub struct PodView {
    pub link: Option<Link>,
    pub addresses: Vec<IpNet>,
    pub routes: Vec<Route4>,
}

/// Every way the kernel differs from `plan` (empty: CHECK passes).
pub fn check(plan: &Plan, host: &HostView, pod: &PodView) -> Vec<String> {
    let mut bad = Vec::new();
    let h = &plan.host_ifname;
    match &host.link {
        None => bad.push(format!("host interface {h} is missing")),
        Some(l) => {
            if l.kind.as_deref() != Some("veth") {
                bad.push(format!("host interface {h} is a {:?}, not a veth", l.kind));
            }
            if !l.up {
                bad.push(format!("host interface {h} is down"));
            }
            if l.mac != Some(HOST_MAC) {
                bad.push(format!(
                    "host interface {h} has MAC {:?}, want ee:ee:ee:ee:ee:ee",
                    l.mac.map(format_mac)
                ));
            }
            if let Some(a) = host.addresses.iter().find(|a| a.addr().is_ipv4()) {
                bad.push(format!(
                    "host interface {h} has address {a}; it must have none"
                ));
            }
            let want = plan.host_route(l.index);
            if !host.routes.iter().any(|r| r.same_path(&want)) {
                bad.push(format!(
                    "host route {} dev {h} scope link is missing",
                    plan.address
                ));
            }
        }
    }
    for (key, got) in &host.sysctls {
        let want = crate::sysctl::HOST_VETH
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v);
        if got.as_deref() != want {
            bad.push(format!(
                "sysctl {} on {h} is {got:?}, want {want:?}",
                key.replace("{if}", h)
            ));
        }
    }
    let p = &plan.pod_ifname;
    match &pod.link {
        None => bad.push(format!("pod interface {p} is missing")),
        Some(l) => {
            if !l.up {
                bad.push(format!("pod interface {p} is down"));
            }
            let host_mtu = host.link.as_ref().and_then(|l| l.mtu);
            if host_mtu.is_some() && l.mtu != host_mtu {
                bad.push(format!(
                    "pod interface {p} MTU {:?} differs from the host side's {host_mtu:?}",
                    l.mtu
                ));
            }
            if !pod.addresses.contains(&IpNet::V4(plan.address)) {
                bad.push(format!("pod interface {p} lacks address {}", plan.address));
            }
            for r in plan.pod_routes(l.index) {
                if !pod.routes.iter().any(|k| k.same_path(&r)) {
                    bad.push(format!(
                        "pod route {} {} is missing",
                        r.dst,
                        r.gateway
                            .map(|g| format!("via {g}"))
                            .unwrap_or_else(|| "scope link".into())
                    ));
                }
            }
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_cni::protocol::Version;

    fn plan() -> Plan {
        Plan {
            host_ifname: "slc37a8aaaaaaaa".into(),
            pod_ifname: "eth0".into(),
            address: "10.244.1.5/32".parse().unwrap(),
            mtu: 1480,
            primary: true,
            routes: vec![],
            alias: alias("k8s", "cid", "eth0"),
        }
    }

    #[test]
    fn a_secondary_attachment_routes_only_its_ipam_routes_onlink_and_no_default() {
        let mut p = plan();
        p.primary = false;
        p.pod_ifname = "net1".into();
        let ipam = CniResult::parse(&json!({"cniVersion": "1.0.0", "ips": [], "routes": [
            {"dst": "0.0.0.0/0"}, {"dst": "10.200.1.7/16"}, {"dst": "fd00::/8"}
        ]}))
        .unwrap();
        p.routes = secondary_routes(&ipam);
        assert_eq!(p.routes, vec!["10.200.0.0/16".parse::<Ipv4Net>().unwrap()]);
        let r = p.pod_routes(3);
        assert_eq!(r.len(), 1);
        assert!(r[0].onlink && r[0].gateway == Some(GATEWAY) && r[0].oif == Some(3));
        let res = p.result([2, 0, 0, 0, 0, 1], "/x", Dns::default(), None);
        assert_eq!(res.routes.len(), 1);
        assert_eq!(res.routes[0].dst.to_string(), "10.200.0.0/16");
    }

    #[test]
    fn aliases_round_trip_even_with_a_colon_in_the_network() {
        assert_eq!(
            parse_alias(&alias("a:b", "c1", "eth0")),
            Some(("a:b", "c1", "eth0"))
        );
        assert_eq!(parse_alias("something else"), None);
        assert_eq!(parse_alias("sluice:onlyone"), None);
    }

    #[test]
    fn the_pod_gets_a_slash_32_whatever_the_ipam_prefix() {
        let r = CniResult::parse(&json!({"cniVersion": "0.4.0", "ips": [
            {"version": "6", "address": "fd00::5/64"},
            {"version": "4", "address": "10.22.0.9/16", "gateway": "10.22.0.1"}
        ]}))
        .unwrap();
        assert_eq!(pod_address(&r), Some("10.22.0.9/32".parse().unwrap()));
        assert_eq!(pod_address(&CniResult::default()), None);
    }

    #[test]
    fn the_result_points_ips_at_the_pod_interface_after_a_prev_result() {
        let prev = CniResult {
            interfaces: vec![Interface {
                name: "lo0".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let r = plan().result(
            [2, 0, 0, 0, 0, 1],
            "/run/netns/p",
            Dns::default(),
            Some(prev),
        );
        assert_eq!(r.interfaces.len(), 3);
        assert_eq!(r.ips[0].interface, Some(2));
        assert_eq!(r.interfaces[2].name, "eth0");
        let v = r.render(Version::V1_0_0);
        assert_eq!(v["interfaces"][1]["mac"], "ee:ee:ee:ee:ee:ee");
        assert_eq!(v["interfaces"][2]["mac"], "02:00:00:00:00:01");
        assert_eq!(v["interfaces"][2]["sandbox"], "/run/netns/p");
        assert_eq!(v["ips"][0]["address"], "10.244.1.5/32");
        assert_eq!(
            v["routes"][0],
            json!({"dst": "0.0.0.0/0", "gw": "169.254.1.1"})
        );
    }

    fn link(index: u32, name: &str, mac: [u8; 6]) -> Link {
        Link {
            index,
            name: name.into(),
            mac: Some(mac),
            mtu: Some(1480),
            up: true,
            kind: Some("veth".into()),
            alias: None,
            vxlan: None,
        }
    }

    fn good() -> (HostView, PodView) {
        let p = plan();
        (
            HostView {
                link: Some(link(7, &p.host_ifname, HOST_MAC)),
                addresses: vec!["fe80::ecee:eeff:feee:eeee/64".parse().unwrap()],
                routes: vec![p.host_route(7)],
                sysctls: crate::sysctl::HOST_VETH
                    .iter()
                    .map(|(k, v)| (*k, Some(v.to_string())))
                    .collect(),
            },
            PodView {
                link: Some(link(2, "eth0", [2, 0, 0, 0, 0, 1])),
                addresses: vec!["10.244.1.5/32".parse().unwrap()],
                routes: p.pod_routes(2),
            },
        )
    }

    #[test]
    fn a_correct_attachment_checks_clean() {
        let (h, p) = good();
        assert_eq!(check(&plan(), &h, &p), Vec::<String>::new());
    }

    #[test]
    fn each_deviation_is_reported() {
        type Mutate = fn(&mut HostView, &mut PodView);
        let cases: &[(&str, Mutate)] = &[
            ("host interface", |h, _| h.link = None),
            ("down", |h, _| h.link.as_mut().unwrap().up = false),
            ("MAC", |h, _| h.link.as_mut().unwrap().mac = Some([1; 6])),
            ("must have none", |h, _| {
                h.addresses.push("10.0.0.1/24".parse().unwrap())
            }),
            ("host route", |h, _| h.routes.clear()),
            ("proxy_arp", |h, _| h.sysctls[0].1 = Some("0".into())),
            ("pod interface eth0 is missing", |_, p| p.link = None),
            ("MTU", |_, p| p.link.as_mut().unwrap().mtu = Some(1500)),
            ("lacks address", |_, p| p.addresses.clear()),
            ("via 169.254.1.1", |_, p| {
                p.routes.pop();
            }),
            ("scope link is missing", |_, p| {
                p.routes.remove(0);
            }),
        ];
        for (needle, mutate) in cases {
            let (mut h, mut p) = good();
            mutate(&mut h, &mut p);
            let bad = check(&plan(), &h, &p);
            assert!(bad.iter().any(|b| b.contains(needle)), "{needle}: {bad:?}");
        }
    }
}
