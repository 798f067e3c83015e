//! Outside hosts (`ip:ADDR`): a namespace on the underlay with that one address, whose
//! only way anywhere is the gateway in the switch namespace, which routes pod
//! addresses to the node hosting the pod. That is how an external load balancer or
//! client reaches a cluster: through the nodes' uplinks, never a pod network.

use std::net::Ipv4Addr;

use super::state::{self, DeclaredPort, ExternalServer, ExternalState, LabPaths, LabState};
use super::{LabError, names, netns, serve};

/// Addresses that cannot be an outside host.
pub fn check_addr(st: &LabState, addr: Ipv4Addr) -> Result<(), LabError> {
    let why = if st.pool.contains(&addr) {
        Some(format!("is inside the pod pool {}", st.pool))
    } else if st.underlay_cidr.contains(&addr) {
        Some(format!("is inside the underlay {}", st.underlay_cidr))
    } else if addr.is_loopback()
        || addr.is_unspecified()
        || addr.is_multicast()
        || addr.is_broadcast()
    {
        Some("is not a unicast host address".to_string())
    } else {
        None
    };
    match why {
        Some(w) => Err(LabError::Usage(format!("ip:{addr} {w}"))),
        None => Ok(()),
    }
}

/// The outside host with `addr`, created on first use.
pub fn ensure(st: &mut LabState, addr: Ipv4Addr) -> Result<&ExternalState, LabError> {
    if !st.externals.contains_key(&addr) {
        check_addr(st, addr)?;
        let ns = names::external_netns(&st.name, addr);
        let port = names::external_port(addr);
        st.externals.insert(
            addr,
            ExternalState {
                addr,
                netns: ns.clone(),
                underlay_port: port.clone(),
                servers: Vec::new(),
            },
        );
        // recorded before it exists, so a failure half-way is still torn down
        state::save(st)?;
        netns::add(&ns)?;
        let gw = st.gateway;
        netns::ip_batch(
            Some(&st.underlay_netns),
            &[
                format!("link add {port} type veth peer name eth0 netns {ns}"),
                format!("link set {port} master {} up", st.bridge),
                format!("route replace {addr}/32 dev {}", st.bridge),
            ],
        )?;
        netns::ip_batch(
            Some(&ns),
            &[
                format!("addr add {addr}/32 dev eth0"),
                "link set eth0 up".to_string(),
                format!("route add {gw} dev eth0 scope link"),
                format!("route add default via {gw} dev eth0"),
            ],
        )?;
    }
    Ok(&st.externals[&addr])
}

/// A server on `port` in the outside host, started on first use.
pub fn ensure_server(
    st: &mut LabState,
    addr: Ipv4Addr,
    port: DeclaredPort,
) -> Result<(), LabError> {
    let ext = &st.externals[&addr];
    if ext
        .servers
        .iter()
        .any(|s| s.port == port.port && s.protocol == port.protocol && netns::alive(s.pid))
    {
        return Ok(());
    }
    let paths = LabPaths::new(&st.name);
    let tag = format!("{}-{}-{}", ext.netns, port.protocol.lower(), port.port);
    let pid = serve::spawn(&ext.netns, std::slice::from_ref(&port), &paths, &tag)?;
    let ext = st.externals.get_mut(&addr).expect("present");
    ext.servers
        .retain(|s| !(s.port == port.port && s.protocol == port.protocol));
    ext.servers.push(ExternalServer {
        port: port.port,
        protocol: port.protocol,
        pid,
    });
    state::save(st)
}

/// The gateway's route to a pod: via the uplink of the node that hosts it.
pub fn route_pod(st: &LabState, pod_ip: Ipv4Addr, node_ip: Ipv4Addr) -> Result<(), LabError> {
    netns::ip_batch(
        Some(&st.underlay_netns),
        &[format!("route replace {pod_ip}/32 via {node_ip}")],
    )
}

pub fn unroute_pod(st: &LabState, pod_ip: Ipv4Addr) -> Result<(), LabError> {
    netns::run_in(
        &st.underlay_netns,
        "ip",
        &["route", "del", &format!("{pod_ip}/32")],
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab() -> LabState {
        serde_json::from_value(serde_json::json!({
            "name": "t", "encap_requested": "auto", "encap": "vxlan",
            "pool": "10.244.0.0/16", "underlay_cidr": "192.168.77.0/24",
            "gateway": "192.168.77.1", "underlay_netns": "t-underlay", "bridge": "br0",
            "nodes": []
        }))
        .unwrap()
    }

    #[test]
    fn outside_hosts_cannot_take_pool_or_underlay_addresses() {
        let st = lab();
        assert!(check_addr(&st, "10.2.3.4".parse().unwrap()).is_ok());
        assert!(check_addr(&st, "172.16.8.1".parse().unwrap()).is_ok());
        assert!(check_addr(&st, "10.244.3.4".parse().unwrap()).is_err());
        assert!(check_addr(&st, "192.168.77.50".parse().unwrap()).is_err());
        assert!(check_addr(&st, "127.0.0.1".parse().unwrap()).is_err());
    }
}
