//! A simulated cluster for the `net_*` tests: a "switch" namespace holding a bridge, one
//! named namespace per node (uplink `eth0` on the bridge, fake default gateway,
//! forwarding on) and pod namespaces wired the way the CNI plugin wires them (/32,
//! `169.254.1.1` gateway, proxy-ARP on the host side). Nothing touches the host's own
//! links or routes: every `ip` command runs inside one of these namespaces.
//!
//! The node side is programmed only through the crate's own API (`mtu::detect_uplink`,
//! `tunnel::ensure`, `routes::sync`) over a netlink socket opened inside the node's
//! namespace; the checks read the kernel back with `ip -j` and send real packets.

#![allow(dead_code)] // each test file uses a different part of the kit

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use sluice_agent::kernel::Netlink;
use sluice_agent::mtu;
use sluice_agent::routes::{self, BlockOwner, RouteSyncReport};
use sluice_agent::tunnel::{self, Encapsulation, TunnelSpec, TunnelState};
use sluice_testkit::NamedNetns;

pub const UNDERLAY_GW: &str = "192.168.77.254";

pub fn node_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, i)
}

pub fn node_block(i: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 244, i, 0), 24).unwrap()
}

pub fn pod_ip(node: u8, pod: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, pod)
}

pub struct Pod {
    pub ns: NamedNetns,
    pub ip: Ipv4Addr,
}

pub struct Node {
    pub index: u8,
    pub name: String,
    pub ns: NamedNetns,
    pub ip: Ipv4Addr,
    pub block: Ipv4Net,
    pub pods: Vec<Pod>,
    pub mtu_file: std::path::PathBuf,
    pub tunnel: Option<TunnelState>,
}

impl Node {
    pub fn owner(&self) -> BlockOwner {
        BlockOwner {
            node: self.name.clone(),
            node_ip: self.ip,
            block: self.block,
        }
    }
}

pub struct Cluster {
    pub switch: NamedNetns,
    pub nodes: Vec<Node>,
    pub encap: Encapsulation,
    pub rt: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn new(encap: Encapsulation) -> Cluster {
        let switch = NamedNetns::new("sw");
        switch.exec("ip link add br0 type bridge && ip link set br0 up");
        Cluster {
            switch,
            nodes: Vec::new(),
            encap,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Add node `i` (underlay 192.168.77.i, block 10.244.i.0/24) with an uplink MTU.
    pub fn add_node(&mut self, i: u8, uplink_mtu: u32) -> &mut Node {
        let ns = NamedNetns::new(&format!("n{i}"));
        let port = format!("p{i}-{}", sluice_testkit::unique());
        self.switch.exec(&format!(
            "ip link add {port} mtu {uplink_mtu} type veth peer name eth0 netns {node} && \
             ip link set {port} master br0 up",
            node = ns.name()
        ));
        ns.exec(&format!(
            "ip link set eth0 mtu {uplink_mtu} up && ip addr add {ip}/24 dev eth0 && \
             ip route add default via {UNDERLAY_GW} && sysctl -qw net.ipv4.ip_forward=1",
            ip = node_ip(i)
        ));
        self.nodes.push(Node {
            index: i,
            name: format!("node-{i}"),
            ns,
            ip: node_ip(i),
            block: node_block(i),
            pods: Vec::new(),
            mtu_file: self.dir.path().join(format!("node-{i}/mtu")),
            tunnel: None,
        });
        self.nodes.last_mut().unwrap()
    }

    pub fn remove_node(&mut self, i: u8) {
        self.nodes.retain(|n| n.index != i);
    }

    pub fn node(&self, i: u8) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.index == i)
            .expect("node exists")
    }

    pub fn blocks(&self) -> Vec<BlockOwner> {
        self.nodes.iter().map(Node::owner).collect()
    }

    /// What the agent's reconcile does for the node network: uplink → tunnel → MTU file
    /// → routes. Returns the route report.
    pub fn sync_node(&mut self, i: u8) -> RouteSyncReport {
        let blocks = self.blocks();
        let encap = self.encap;
        let pos = self.nodes.iter().position(|n| n.index == i).unwrap();
        let node = &self.nodes[pos];
        let (state, report) = self.rt.block_on(async {
            let nl = Netlink::open_in(&node.ns.path()).expect("netlink in node namespace");
            let uplink = mtu::detect_uplink(&nl, Some(node.ip))
                .await
                .expect("uplink");
            let own: Vec<Ipv4Net> = blocks
                .iter()
                .filter(|b| b.node == node.name)
                .map(|b| b.block)
                .collect();
            let address = routes::tunnel_address(&own).expect("node has a block");
            let spec = TunnelSpec::new(encap, node.ip, address, &uplink);
            let state = tunnel::ensure(&nl, &spec).await.expect("tunnel::ensure");
            mtu::write_mtu_file(&node.mtu_file, state.mtu).expect("mtu file");
            let want = routes::desired(&node.name, &blocks, &state.route_encap());
            let report = routes::sync(&nl, &want).await.expect("routes::sync");
            (state, report)
        });
        assert!(
            report.failures.is_empty(),
            "{}: route sync failures: {:?}",
            self.nodes[pos].name,
            report.failures
        );
        self.nodes[pos].tunnel = Some(state);
        report
    }

    pub fn sync_all(&mut self) {
        let idx: Vec<u8> = self.nodes.iter().map(|n| n.index).collect();
        for i in idx {
            self.sync_node(i);
        }
    }

    /// A pod on node `i` wired like the CNI plugin does, with the MTU the agent wrote.
    pub fn add_pod(&mut self, i: u8, pod: u8) -> Ipv4Addr {
        let pos = self.nodes.iter().position(|n| n.index == i).unwrap();
        let node = &self.nodes[pos];
        let mtu: u32 = std::fs::read_to_string(&node.mtu_file)
            .expect("sync_node wrote the MTU file before pods are added")
            .trim()
            .parse()
            .unwrap();
        let ip = pod_ip(i, pod);
        let ns = NamedNetns::new(&format!("pod{i}x{pod}"));
        let host_if = format!("cali{i}x{pod}");
        node.ns.exec(&format!(
            "ip link add {host_if} mtu {mtu} type veth peer name eth0 netns {pod_ns} && \
             ip link set {host_if} address ee:ee:ee:ee:ee:ee up && \
             sysctl -qw net.ipv4.conf.{host_if}.proxy_arp=1 \
                        net.ipv4.neigh.{host_if}.proxy_delay=0 \
                        net.ipv4.conf.{host_if}.forwarding=1 && \
             ip route add {ip}/32 dev {host_if} scope link",
            pod_ns = ns.name()
        ));
        ns.exec(&format!(
            "ip link set eth0 mtu {mtu} up && ip addr add {ip}/32 dev eth0 && \
             ip route add 169.254.1.1 dev eth0 scope link && \
             ip route add default via 169.254.1.1 dev eth0"
        ));
        self.nodes[pos].pods.push(Pod { ns, ip });
        ip
    }

    pub fn pod(&self, i: u8, pod_index: usize) -> &Pod {
        &self.node(i).pods[pod_index]
    }
}

/// Routes of ours in a namespace's main table, as comparable strings without the
/// protocol (`blackhole 10.244.1.0/24`, `10.244.2.0/24 via 192.168.77.2 dev tunl0 onlink`).
pub fn owned_routes(ns: &NamedNetns) -> Vec<String> {
    let ours = routes::ROUTE_PROTOCOL.to_string();
    main_routes(ns)
        .into_iter()
        .filter(|(_, p)| *p == ours)
        .map(|(r, _)| r)
        .collect()
}

/// Every route of the main table, as `route proto P` strings.
pub fn all_routes(ns: &NamedNetns) -> Vec<String> {
    main_routes(ns)
        .into_iter()
        .map(|(r, p)| format!("{r} proto {p}"))
        .collect()
}

/// `ip -j route show table main`, each route as (comparable string, protocol).
fn main_routes(ns: &NamedNetns) -> Vec<(String, String)> {
    let out = ns.exec("ip -j route show table main");
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output is JSON");
    let mut lines: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let mut s = String::new();
            if let Some(t) = r["type"].as_str() {
                s.push_str(t);
                s.push(' ');
            }
            s.push_str(r["dst"].as_str().unwrap_or("?"));
            if let Some(g) = r["gateway"].as_str() {
                s.push_str(&format!(" via {g}"));
            }
            if let (Some(d), true) = (r["dev"].as_str(), r["type"].as_str().is_none()) {
                s.push_str(&format!(" dev {d}"));
            }
            if r["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "onlink"))
            {
                s.push_str(" onlink");
            }
            let proto = match &r["protocol"] {
                serde_json::Value::String(p) => p.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                _ => "?".into(),
            };
            (s, proto)
        })
        .collect();
    lines.sort();
    lines
}

/// Owned routes node `i` must have: blackhole for its block, one route per other block.
pub fn expected_routes(c: &Cluster, i: u8) -> Vec<String> {
    let mut want: Vec<String> = c
        .nodes
        .iter()
        .map(|n| {
            if n.index == i {
                return format!("blackhole {}", n.block);
            }
            match c.encap {
                Encapsulation::Ipip => format!("{} via {} dev tunl0 onlink", n.block, n.ip),
                Encapsulation::Vxlan => format!(
                    "{} via {} dev {} onlink",
                    n.block,
                    sluice_ipam::tunnel_address(n.block),
                    tunnel::VXLAN_DEVICE
                ),
                Encapsulation::None => format!("{} via {} dev eth0", n.block, n.ip),
            }
        })
        .collect();
    want.sort();
    want
}

/// A TCP server in `pod` that answers every connection with the peer address it saw.
pub struct PeerEcho {
    child: Child,
}

impl PeerEcho {
    pub fn start(pod: &Pod, port: u16) -> PeerEcho {
        let child = Command::new("ip")
            .args(["netns", "exec", pod.ns.name(), "socat"])
            .arg(format!("TCP-LISTEN:{port},reuseaddr,fork"))
            .arg("SYSTEM:echo $SOCAT_PEERADDR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn socat (apt-get install socat)");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if pod.ns.exec("ss -Htln").contains(&format!(":{port}")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        PeerEcho { child }
    }
}

impl Drop for PeerEcho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connect from `from` to `to_ip:port` over TCP and return the source address the
/// server saw, or the error.
pub fn tcp_peer_seen(from: &Pod, to_ip: Ipv4Addr, port: u16) -> Result<String, String> {
    let out = from.ns.try_exec(&format!(
        "timeout 5 socat -T3 - TCP:{to_ip}:{port},connect-timeout=3 </dev/null"
    ));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Every pod reaches every pod on another node, and the server sees the client pod's own
/// address (no SNAT, no tunnel address).
pub fn assert_cross_node_pod_traffic(c: &Cluster) {
    let port = 7777;
    let servers: Vec<PeerEcho> = c
        .nodes
        .iter()
        .flat_map(|n| n.pods.iter())
        .map(|p| PeerEcho::start(p, port))
        .collect();
    for a in &c.nodes {
        for b in c.nodes.iter().filter(|b| b.index != a.index) {
            for pa in &a.pods {
                for pb in &b.pods {
                    let seen = tcp_peer_seen(pa, pb.ip, port).unwrap_or_else(|e| {
                        panic!(
                            "{} ({}) -> {} ({}) failed: {e}",
                            a.name, pa.ip, b.name, pb.ip
                        )
                    });
                    assert_eq!(
                        seen,
                        pa.ip.to_string(),
                        "{} -> {}: server saw {seen}, not the client pod",
                        pa.ip,
                        pb.ip
                    );
                }
            }
        }
    }
    drop(servers);
}

/// Send `bytes` of TCP payload from `from` to `to` (port 7778) and return how many
/// arrived: full-size segments (pod MTU from the MTU file) cross the tunnel, not only the
/// small probes. (The kernel itself refuses a VXLAN MTU above its lower device's − 50;
/// tunl0 has no lower device, and with `nopmtudisc` would fragment the outer packet.)
pub fn bulk_transfer(from: &Pod, to: &Pod, bytes: usize) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count");
    let mut server = Command::new("ip")
        .args(["netns", "exec", to.ns.name(), "socat", "-u"])
        .arg("TCP-LISTEN:7778,reuseaddr")
        .arg(format!("SYSTEM:wc -c > {}", count.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn socat");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !to.ns.exec("ss -Htln").contains(":7778") {
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = from.ns.try_exec(&format!(
        "head -c {bytes} /dev/zero | timeout 20 socat -u - TCP:{}:7778,connect-timeout=3",
        to.ip
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && server.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        sent.status.success(),
        "bulk send {} -> {} failed: {}",
        from.ip,
        to.ip,
        String::from_utf8_lossy(&sent.stderr)
    );
    std::fs::read_to_string(&count)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}
