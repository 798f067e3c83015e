//! `lab up` and `lab down`: the underlay, the nodes, their roots, and teardown.
//!
//! ```text
//!  NAME-underlay (switch namespace)            NAME-node-<i>
//!   br0 192.168.77.1/24  (the gateway) ──n<i>══eth0 192.168.77.(10+i)/24, default via .1
//!    │                                          CNI bin dir, conflist, agent
//!    └──x<hash>══eth0 ADDR/32   NAME-ext-a-b-c-d (outside hosts, made on first use)
//! ```
//! The gateway in the switch namespace is the "outside network": it routes each pod
//! address to the uplink of the node that hosts it (what a cloud route table or a BGP
//! peer would do) and each outside host's address to that host. Nothing is created
//! in the host's own namespace.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde_json::json;
use sluice_node_files::conflist::{BlockSource, NodeConflist};
use sluice_node_files::paths::NodePaths;

use super::state::{self, Encap, LabPaths, LabState, NodeState};
use super::{LabError, agents, names, netns};

pub const DEFAULT_UNDERLAY: &str = "192.168.77.0/24";
pub const BRIDGE: &str = "br0";
/// Locally administered, so it collides with no real card.
const GATEWAY_MAC: &str = "02:51:1c:00:00:01";
/// Node `i` sits at `.NODE_BASE + i` on the underlay.
const NODE_BASE: u8 = 10;

#[derive(clap::Args)]
pub struct UpArgs {
    #[arg(long)]
    pub name: String,
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Lay the nodes out exactly: node-i gets the i-th address (and their count
    /// is the number of nodes). The underlay is the /24 holding them, unless
    /// `--underlay` says otherwise; the lab's gateway takes a free address in it.
    #[arg(long, value_delimiter = ',')]
    pub node_ips: Vec<Ipv4Addr>,
    /// The underlay network (default: the /24 of `--node-ips`, else 192.168.77.0/24).
    #[arg(long)]
    pub underlay: Option<ipnet::Ipv4Net>,
    #[arg(long, value_enum, default_value_t = Encap::Auto)]
    pub encap: Encap,
    #[arg(long, default_value = "10.244.0.0/16")]
    pub pool: ipnet::Ipv4Net,
    /// Masquerade pod traffic leaving the pool. Off by default: the lab's gateway
    /// routes every pod address to its node (like a BGP-peered network), so outside
    /// hosts see pods' own addresses.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub nat_outgoing: bool,
    /// iptables backend of the agents: auto (the agent detects it; an empty node
    /// gets nft), nft or legacy. Shows that sluice behaves the same on both.
    #[arg(long, value_enum, default_value_t = state::IptablesBackend::Auto)]
    pub iptables_backend: state::IptablesBackend,
    /// Policy dataplane of the agents: auto (nftables where `nft` and the kernel
    /// support it, else iptables), nftables or iptables.
    #[arg(long, value_enum, default_value_t = state::Dataplane::Auto)]
    pub dataplane: state::Dataplane,
    /// Build nodes without agents (debugging the topology alone).
    #[arg(long, hide = true)]
    pub no_agent: bool,
    /// Seconds to wait for every agent to report ready.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout: u64,
}

#[derive(clap::Args)]
pub struct DownArgs {
    #[arg(long)]
    pub name: String,
}

/// The address plan for exact node addresses: node-i gets `ips[i]`, the underlay is
/// `underlay` or the /24 holding the first, and the gateway the lowest host address
/// no node has. Pure.
pub fn plan_exact(
    ips: &[Ipv4Addr],
    underlay: Option<ipnet::Ipv4Net>,
) -> Result<UnderlayPlan, LabError> {
    let first = *ips
        .first()
        .ok_or_else(|| LabError::Usage("--node-ips needs at least one address".into()))?;
    let cidr = match underlay {
        Some(c) => c.trunc(),
        None => ipnet::Ipv4Net::new(first, 24)
            .expect("24 is a prefix")
            .trunc(),
    };
    let mut seen = std::collections::BTreeSet::new();
    for ip in ips {
        if !cidr.contains(ip) || *ip == cidr.network() || *ip == cidr.broadcast() {
            return Err(LabError::Usage(format!(
                "node address {ip} is not a host address of the underlay {cidr} (give --underlay)"
            )));
        }
        if !seen.insert(*ip) {
            return Err(LabError::Usage(format!("node address {ip} is given twice")));
        }
    }
    let gateway = cidr.hosts().find(|h| !seen.contains(h)).ok_or_else(|| {
        LabError::Usage(format!("no free address left in {cidr} for the gateway"))
    })?;
    Ok(UnderlayPlan {
        cidr,
        gateway,
        nodes: ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (names::node_name(i + 1), *ip))
            .collect(),
    })
}

/// The address plan of an underlay: pure, so it is tested without a kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnderlayPlan {
    pub cidr: ipnet::Ipv4Net,
    pub gateway: Ipv4Addr,
    pub nodes: Vec<(String, Ipv4Addr)>,
}

pub fn plan_underlay(cidr: ipnet::Ipv4Net, nodes: usize) -> Result<UnderlayPlan, LabError> {
    let base = u32::from(cidr.network());
    let last = u32::from(cidr.broadcast());
    if nodes == 0 || base + NODE_BASE as u32 + nodes as u32 >= last {
        return Err(LabError::Usage(format!(
            "{nodes} nodes do not fit the underlay {cidr}"
        )));
    }
    Ok(UnderlayPlan {
        cidr,
        gateway: Ipv4Addr::from(base + 1),
        nodes: (1..=nodes)
            .map(|i| {
                (
                    names::node_name(i),
                    Ipv4Addr::from(base + NODE_BASE as u32 + i as u32),
                )
            })
            .collect(),
    })
}

/// The conflist a lab node gets: the documented cluster conflist (docs/node-files.md)
/// with every path moved under the node's root and the directory block store.
pub fn conflist(
    root: &Path,
    node: &str,
    pool: ipnet::Ipv4Net,
    require_agent: bool,
) -> serde_json::Value {
    let blocks = root
        .parent()
        .and_then(Path::parent)
        .map(|lab| lab.join("blocks"))
        .unwrap_or_default();
    NodeConflist {
        node_name: node.to_string(),
        pool: pool.to_string(),
        block_size: 24,
        mtu: 0,
        require_agent,
        paths: NodePaths::under(root),
        blocks: BlockSource::DirStore(blocks),
    }
    .to_json()
}

pub fn conflist_path(root: &Path) -> PathBuf {
    NodePaths::under(root).conflist()
}

pub fn cni_bin_dir(root: &Path) -> PathBuf {
    NodePaths::under(root).cni_bin_dir
}

/// Where the workspace's binaries are: `SLUICE_BIN_<NAME>` if set, else next to this
/// `sluicectl` (cargo puts all workspace binaries in one directory), else on PATH.
pub fn find_binary(name: &str) -> Result<PathBuf, LabError> {
    let var = format!("SLUICE_BIN_{}", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return Ok(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| LabError::MissingBinary(name.to_string(), var))
}

/// Reference plugins (Debian's containernetworking-plugins) a kubelet node also has.
const REFERENCE_PLUGIN_DIR: &str = "/usr/lib/cni";

/// Which encapsulation this kernel can do: ipip when the kernel has it, else vxlan.
/// Tested by creating the device in the (empty) switch namespace and removing it.
fn kernel_has(ns: &str, kind: &str) -> bool {
    let args: Vec<&str> = match kind {
        "ipip" => vec![
            "link",
            "add",
            "sl-probe",
            "type",
            "ipip",
            "remote",
            "192.0.2.1",
        ],
        _ => vec![
            "link", "add", "sl-probe", "type", "vxlan", "id", "42", "dstport", "4789",
        ],
    };
    let ok = netns::run_in(ns, "ip", &args).is_ok();
    let _ = netns::run_in(ns, "ip", &["link", "del", "sl-probe"]);
    ok
}

pub fn up(args: UpArgs) -> Result<LabState, LabError> {
    state::check_name(&args.name)?;
    let paths = LabPaths::new(&args.name);
    let _lock = state::lock(&paths)?;
    if paths.state_file().exists() {
        return Err(LabError::Exists(args.name.clone()));
    }
    let plan = if args.node_ips.is_empty() {
        let cidr = args
            .underlay
            .unwrap_or_else(|| DEFAULT_UNDERLAY.parse().expect("constant CIDR"));
        plan_underlay(cidr, args.nodes)?
    } else {
        plan_exact(&args.node_ips, args.underlay)?
    };
    if plan.cidr.contains(&args.pool.network()) || args.pool.contains(&plan.cidr.network()) {
        return Err(LabError::Usage(format!(
            "pool {} overlaps the underlay {}",
            args.pool, plan.cidr
        )));
    }
    let underlay = names::underlay_netns(&args.name);
    let mut st = LabState {
        name: args.name.clone(),
        encap_requested: args.encap,
        encap: args.encap,
        pool: args.pool,
        underlay_cidr: plan.cidr,
        gateway: plan.gateway,
        underlay_netns: underlay.clone(),
        bridge: BRIDGE.to_string(),
        nodes: Vec::new(),
        pods: Default::default(),
        externals: Default::default(),
        applied: Default::default(),
        agents: !args.no_agent,
        nat_outgoing: args.nat_outgoing,
        iptables_backend: args.iptables_backend,
        dataplane: args.dataplane,
    };
    // Save early: if anything below fails, `down` still finds what was made.
    for d in [paths.manifests(), paths.blocks(), paths.logs()] {
        std::fs::create_dir_all(&d).map_err(|e| LabError::io(&d, e))?;
    }
    state::save(&st)?;

    // The switch: bridge + gateway address; it forwards between the nodes and the
    // outside hosts but never tells them to take a shortcut (no redirects).
    netns::add(&underlay)?;
    // Before the bridge exists, so it inherits the defaults: send_redirects is
    // OR-ed between `all` and the device.
    sysctls(
        &underlay,
        &[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ],
    )?;
    let prefix = plan.cidr.prefix_len();
    netns::ip_batch(
        Some(&underlay),
        &[
            // A fixed MAC: a bridge otherwise takes the lowest MAC of its ports and
            // changes it when an outside host joins later, leaving every neighbour
            // cache pointing at the old one (frames then dropped as not for us).
            format!("link add {BRIDGE} address {GATEWAY_MAC} type bridge"),
            format!("addr add {}/{prefix} dev {BRIDGE}", plan.gateway),
            format!("link set {BRIDGE} up"),
        ],
    )?;

    st.encap = match args.encap {
        Encap::Auto => {
            if kernel_has(&underlay, "ipip") {
                Encap::Ipip
            } else {
                Encap::Vxlan
            }
        }
        Encap::Ipip if !kernel_has(&underlay, "ipip") => {
            return Err(LabError::Usage(
                "--encap ipip: this kernel has no ipip module (use vxlan, or run under QEMU)"
                    .into(),
            ));
        }
        e => e,
    };

    let sluice = find_binary("sluice")?;
    let sluice_ipam = find_binary("sluice-ipam")?;
    for (i, (node, ip)) in plan.nodes.iter().enumerate() {
        let index = i + 1;
        let ns = names::node_netns(&args.name, node);
        let port = names::node_port(index);
        let root = paths.node_root(node);
        st.nodes.push(NodeState {
            name: node.clone(),
            netns: ns.clone(),
            uplink_ip: *ip,
            underlay_port: port.clone(),
            root: root.clone(),
            agent_pid: None,
            servers: Vec::new(),
        });
        state::save(&st)?;
        netns::add(&ns)?;
        netns::ip_batch(
            Some(&underlay),
            &[
                format!("link add {port} type veth peer name eth0 netns {ns}"),
                format!("link set {port} master {BRIDGE} up"),
            ],
        )?;
        netns::ip_batch(
            Some(&ns),
            &[
                format!("addr add {ip}/{prefix} dev eth0"),
                "link set eth0 up".to_string(),
                // TESTBED: proxy-ARP for 169.254.1.1 only answers once a default
                // route exists; the gateway is also how outside hosts are reached.
                format!("route add default via {}", plan.gateway),
            ],
        )?;
        sysctls(
            &ns,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ],
        )?;
        install_node_root(&root, node, &sluice, &sluice_ipam, &st)?;
        write_node_object(&paths, node, *ip)?;
    }
    state::save(&st)?;

    if st.agents {
        let agent = find_binary("sluice-agent")?;
        for i in 0..st.nodes.len() {
            let pid = agents::start(&st, &st.nodes[i], &agent, &paths)?;
            st.nodes[i].agent_pid = Some(pid);
            state::save(&st)?;
        }
        agents::wait_ready(&st, std::time::Duration::from_secs(args.ready_timeout))?;
    }
    state::save(&st)?;
    Ok(st)
}

fn sysctls(ns: &str, kv: &[(&str, &str)]) -> Result<(), LabError> {
    let mut args = vec!["-q", "-w"];
    let pairs: Vec<String> = kv.iter().map(|(k, v)| format!("{k}={v}")).collect();
    args.extend(pairs.iter().map(String::as_str));
    netns::run_in(ns, "sysctl", &args).map(|_| ())
}

/// Lay out a node's root: what the agent's `install-cni` would have put on a real
/// node (`opt/cni/bin`, `etc/cni/net.d`), plus the state directories.
fn install_node_root(
    root: &Path,
    node: &str,
    sluice: &Path,
    sluice_ipam: &Path,
    st: &LabState,
) -> Result<(), LabError> {
    let files = NodePaths::under(root);
    let bin = files.cni_bin_dir.clone();
    let parent = |p: &Path| p.parent().unwrap_or(root).to_path_buf();
    for d in [
        bin.clone(),
        files.cni_conf_dir.clone(),
        files.ipam_state_dir.clone(),
        parent(&files.agent_status_file),
        parent(&files.cni_log_file),
    ] {
        std::fs::create_dir_all(&d).map_err(|e| LabError::io(&d, e))?;
    }
    // Symlinks, not copies: a rebuilt binary is what the next pod runs, and N nodes
    // do not cost N copies of every plugin.
    let link = |src: &Path, name: &str| -> Result<(), LabError> {
        let dst = bin.join(name);
        let _ = std::fs::remove_file(&dst);
        std::os::unix::fs::symlink(src, &dst).map_err(|e| LabError::io(&dst, e))
    };
    link(sluice, "sluice")?;
    link(sluice_ipam, "sluice-ipam")?;
    if let Ok(rd) = std::fs::read_dir(REFERENCE_PLUGIN_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            link(&e.path(), &name)?;
        }
    }
    let conf = conflist(root, node, st.pool, st.agents);
    let p = conflist_path(root);
    state::write_atomic(
        &p,
        serde_json::to_string_pretty(&conf)
            .expect("json")
            .as_bytes(),
    )
}

/// The Node object the agents read from the directory datastore.
fn write_node_object(paths: &LabPaths, node: &str, ip: Ipv4Addr) -> Result<(), LabError> {
    let obj = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}},
        "status": {"addresses": [
            {"type": "InternalIP", "address": ip.to_string()},
            {"type": "Hostname", "address": node}
        ]}
    });
    super::pods::write_manifest(paths, "Node", "", node, &obj).map(|_| ())
}

/// Remove everything the lab made. Keeps going past errors and reports them all.
pub fn down(name: &str) -> Result<(), LabError> {
    state::check_name(name)?;
    let paths = LabPaths::new(name);
    let mut errors = Vec::new();
    let st = match state::load(name) {
        Ok(st) => Some(st),
        Err(LabError::NoSuchLab(_)) => None,
        Err(e) => {
            errors.push(e.to_string());
            None
        }
    };
    let mut namespaces: Vec<String> = Vec::new();
    if let Some(st) = &st {
        // Agents first, so none of them reacts to pods disappearing.
        for n in &st.nodes {
            if let Some(pid) = n.agent_pid {
                netns::kill_pid(pid);
            }
        }
        for p in st.pods.values() {
            if let Some(pid) = p.server_pid {
                netns::kill_pid(pid);
            }
            namespaces.push(p.netns.clone());
        }
        for e in st.externals.values() {
            namespaces.push(e.netns.clone());
        }
        namespaces.extend(st.nodes.iter().map(|n| n.netns.clone()));
    }
    // Whatever `up` may have made even if the state is gone or incomplete.
    namespaces.extend(netns::list_with_prefix(&format!("{name}-node-")));
    namespaces.extend(netns::list_with_prefix(&format!("{name}-ext-")));
    namespaces.push(names::underlay_netns(name));
    namespaces.sort();
    namespaces.dedup();
    for ns in &namespaces {
        if let Err(e) = netns::delete(ns) {
            errors.push(e.to_string());
        }
    }
    if paths.dir.exists()
        && let Err(e) = std::fs::remove_dir_all(&paths.dir)
    {
        errors.push(format!("{}: {e}", paths.dir.display()));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(LabError::Teardown(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_node_ips_keep_their_order_and_the_gateway_takes_a_free_address() {
        let ips: Vec<Ipv4Addr> = ["10.0.5.1", "10.0.5.7", "10.0.5.3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let p = plan_exact(&ips, None).unwrap();
        assert_eq!(p.cidr, "10.0.5.0/24".parse().unwrap());
        assert_eq!(p.gateway, "10.0.5.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            p.nodes,
            vec![
                ("node-1".to_string(), ips[0]),
                ("node-2".to_string(), ips[1]),
                ("node-3".to_string(), ips[2])
            ]
        );
        let wide = plan_exact(&ips[..1], Some("10.0.0.0/16".parse().unwrap())).unwrap();
        assert_eq!(wide.cidr, "10.0.0.0/16".parse().unwrap());
        assert!(plan_exact(&ips, Some("10.9.0.0/24".parse().unwrap())).is_err());
        assert!(plan_exact(&[ips[0], ips[0]], None).is_err());
        assert!(plan_exact(&[], None).is_err());
    }

    #[test]
    fn underlay_plan_puts_gateway_first_and_nodes_after_ten() {
        let p = plan_underlay("192.168.77.0/24".parse().unwrap(), 3).unwrap();
        assert_eq!(p.gateway, Ipv4Addr::new(192, 168, 77, 1));
        assert_eq!(
            p.nodes,
            vec![
                ("node-1".to_string(), Ipv4Addr::new(192, 168, 77, 11)),
                ("node-2".to_string(), Ipv4Addr::new(192, 168, 77, 12)),
                ("node-3".to_string(), Ipv4Addr::new(192, 168, 77, 13)),
            ]
        );
    }

    #[test]
    fn underlay_plan_refuses_more_nodes_than_addresses() {
        assert!(plan_underlay("192.168.77.0/24".parse().unwrap(), 300).is_err());
        assert!(plan_underlay("192.168.77.0/24".parse().unwrap(), 0).is_err());
    }

    #[test]
    fn conflist_moves_every_node_file_under_the_node_root() {
        let root = Path::new("/run/sluice-lab/demo/nodes/node-1");
        let c = conflist(root, "node-1", "10.244.0.0/16".parse().unwrap(), true);
        let p = &c["plugins"][0];
        assert_eq!(p["type"], "sluice");
        assert_eq!(
            p["mtuFile"],
            "/run/sluice-lab/demo/nodes/node-1/var/lib/sluice/mtu"
        );
        assert_eq!(p["ipam"]["nodeName"], "node-1");
        assert_eq!(
            p["ipam"]["blockStore"]["path"],
            "/run/sluice-lab/demo/blocks"
        );
        assert_eq!(p["requireAgent"], true);
    }
}
