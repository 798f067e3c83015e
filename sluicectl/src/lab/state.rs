//! What `lab up` made, kept as JSON in `/run/sluice-lab/NAME/state.json` so that every
//! later subcommand (and `down`) finds the namespaces, processes and files it owns.
//!
//! `/run` is a tmpfs: a reboot forgets the lab exactly when the kernel forgets its
//! namespaces, so the state never outlives what it describes.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::LabError;

/// Root of every lab's state and per-node roots.
pub const LAB_ROOT: &str = "/run/sluice-lab";

/// The chosen encapsulation between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Encap {
    Auto,
    Ipip,
    Vxlan,
    None,
}

/// Which iptables the lab's agents program (`sluice-agent run --iptables-backend`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IptablesBackend {
    /// The agent's own detection (an empty node namespace gets nft).
    #[default]
    Auto,
    /// nf_tables through iptables-nft.
    Nft,
    /// x_tables through iptables-legacy.
    Legacy,
}

/// Which policy dataplane the lab's agents run (`sluice-agent run --dataplane`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dataplane {
    /// The agent's own choice: nftables where `nft` and the kernel support it.
    #[default]
    Auto,
    Nftables,
    Iptables,
}

impl Dataplane {
    pub fn as_str(self) -> &'static str {
        match self {
            Dataplane::Auto => "auto",
            Dataplane::Nftables => "nftables",
            Dataplane::Iptables => "iptables",
        }
    }
}

impl IptablesBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            IptablesBackend::Auto => "auto",
            IptablesBackend::Nft => "nft",
            IptablesBackend::Legacy => "legacy",
        }
    }
}

impl Encap {
    pub fn as_str(self) -> &'static str {
        match self {
            Encap::Auto => "auto",
            Encap::Ipip => "ipip",
            Encap::Vxlan => "vxlan",
            Encap::None => "none",
        }
    }
}

/// Transport protocols a pod can declare and a probe can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(format!("unknown protocol {other:?} (TCP, UDP or SCTP)")),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A container port a pod declares (and the lab serves).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeclaredPort {
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeState {
    /// Kubernetes node name: `node-1` … `node-N`.
    pub name: String,
    /// `NAME-node-<i>`.
    pub netns: String,
    pub uplink_ip: Ipv4Addr,
    /// The underlay-side end of the node's uplink veth (in the underlay namespace).
    pub underlay_port: String,
    /// Per-node root: CNI bin dir, conflist, state dirs, agent files.
    pub root: PathBuf,
    #[serde(default)]
    pub agent_pid: Option<u32>,
    /// Servers on the node's own address for ports no NodePort takes, started on a
    /// probe's first use (`lab probe --to node:NODE:PORT`).
    #[serde(default)]
    pub servers: Vec<ExternalServer>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub netns: String,
    pub container_id: String,
    pub ip: Ipv4Addr,
    pub ports: Vec<DeclaredPort>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub server_pid: Option<u32>,
    /// Ports not served because the kernel cannot (SCTP on this host).
    #[serde(default)]
    pub unserved: Vec<DeclaredPort>,
    /// Servers started on first probe of a port the pod does not declare (declared
    /// ports are informational in Kubernetes: a container may listen on any port).
    #[serde(default)]
    pub extra_servers: Vec<ExternalServer>,
}

impl PodState {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// An outside host on the underlay (`ip:ADDR`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExternalState {
    pub addr: Ipv4Addr,
    pub netns: String,
    pub underlay_port: String,
    /// Servers started for probes to this host: (port, protocol) → pid.
    #[serde(default)]
    pub servers: Vec<ExternalServer>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExternalServer {
    pub port: u16,
    pub protocol: Protocol,
    pub pid: u32,
}

/// Identity of an applied object, for `--prune` and `delete`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub kind: String,
    #[serde(default)]
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    /// What the user asked for and what was chosen (`auto` resolved).
    pub encap_requested: Encap,
    pub encap: Encap,
    pub pool: ipnet::Ipv4Net,
    pub underlay_cidr: ipnet::Ipv4Net,
    pub gateway: Ipv4Addr,
    pub underlay_netns: String,
    pub bridge: String,
    pub nodes: Vec<NodeState>,
    /// `ns/pod` → pod.
    #[serde(default)]
    pub pods: BTreeMap<String, PodState>,
    /// Address → outside host.
    #[serde(default)]
    pub externals: BTreeMap<Ipv4Addr, ExternalState>,
    /// Source file (canonical path) → objects it applied last time (`--prune`).
    #[serde(default)]
    pub applied: BTreeMap<String, Vec<ObjectKey>>,
    /// Whether the agents masquerade pod traffic leaving the pool (off by default in
    /// the lab: its outside network routes pod addresses, as a BGP peer would).
    #[serde(default)]
    pub nat_outgoing: bool,
    /// The iptables backend the agents use.
    #[serde(default)]
    pub iptables_backend: IptablesBackend,
    /// The policy dataplane the agents were asked for (each reports what it chose).
    #[serde(default)]
    pub dataplane: Dataplane,
    /// Whether agents run (false only with the hidden `--no-agent`).
    #[serde(default = "yes")]
    pub agents: bool,
}

fn yes() -> bool {
    true
}

impl LabState {
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// Paths of one lab.
#[derive(Clone, Debug)]
pub struct LabPaths {
    pub dir: PathBuf,
}

impl LabPaths {
    pub fn new(name: &str) -> LabPaths {
        LabPaths {
            dir: Path::new(LAB_ROOT).join(name),
        }
    }
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.dir.join("lock")
    }
    /// The directory datastore every agent watches (Nodes, Namespaces, Pods, policies).
    pub fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }
    /// The IPAM directory block store shared by all nodes.
    pub fn blocks(&self) -> PathBuf {
        self.dir.join("blocks")
    }
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    pub fn node_root(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }
}

/// Validate a lab name: it becomes part of namespace and file names.
pub fn check_name(name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(LabError::BadName(name.to_string()))
    }
}

/// Exclusive lock on the lab, held while a subcommand changes it.
pub struct LabLock {
    _file: File,
}

pub fn lock(paths: &LabPaths) -> Result<LabLock, LabError> {
    std::fs::create_dir_all(&paths.dir).map_err(|e| LabError::io(&paths.dir, e))?;
    let p = paths.lock_file();
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| LabError::io(&p, e))?;
    file.lock().map_err(|e| LabError::io(&p, e))?;
    Ok(LabLock { _file: file })
}

pub fn load(name: &str) -> Result<LabState, LabError> {
    let p = LabPaths::new(name).state_file();
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LabError::NoSuchLab(name.to_string()));
        }
        Err(e) => return Err(LabError::io(&p, e)),
    };
    serde_json::from_str(&text).map_err(|e| LabError::CorruptState(p, e.to_string()))
}

pub fn save(state: &LabState) -> Result<(), LabError> {
    let p = LabPaths::new(&state.name).state_file();
    let text = serde_json::to_string_pretty(state).expect("lab state serializes");
    write_atomic(&p, text.as_bytes())
}

/// `sluice_node_files::atomic::write_atomic`, so readers (and agents watching the
/// manifests dir) never see half a file; its temp names start with a dot and end in
/// `.tmp`, which no manifest reader picks up.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), LabError> {
    sluice_node_files::atomic::write_atomic(path, data, None).map_err(|e| LabError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names_are_restricted_to_what_namespaces_and_files_accept() {
        assert!(check_name("demo").is_ok());
        assert!(check_name("e2e-7").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("Demo").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("-x").is_err());
        assert!(check_name("this-name-is-far-too-long-for-a-lab").is_err());
    }

    #[test]
    fn protocol_parses_case_insensitively_and_prints_upper() {
        assert_eq!("udp".parse::<Protocol>().unwrap(), Protocol::Udp);
        assert_eq!(Protocol::Sctp.to_string(), "SCTP");
        assert!("icmp".parse::<Protocol>().is_err());
    }
}
