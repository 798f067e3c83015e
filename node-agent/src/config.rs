//! Command line and environment of `sluice-agent`. Every path is a flag with an env
//! twin, because the lab runs several agents on one host, one per node network
//! namespace, each with its own files (docs/node-files.md is the contract).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use ipnet::Ipv4Net;
use sluice_node_files::paths;

use crate::dataplane::{BackendChoice, DataplaneChoice};
use crate::tunnel::{DEFAULT_VXLAN_PORT, DEFAULT_VXLAN_VNI, Encapsulation};

#[derive(Debug, Parser)]
#[command(
    name = "sluice-agent",
    version,
    about = "sluice node agent: tunnel routes, NetworkPolicy dataplane and NAT for one node"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch the datastore and keep this node's routes, iptables chains and ipsets in sync.
    Run(Box<RunConfig>),
    /// Copy the CNI binaries into the CNI bin dir and write the conflist (init container).
    InstallCni(InstallCniConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatastoreKind {
    /// The Kubernetes API (in-cluster config or KUBECONFIG).
    Kubernetes,
    /// A directory of kubectl-shaped YAML/JSON manifests plus a directory block store.
    Directory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `sluice-agent run`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
One agent per node. To run several simulated nodes on one host, start each agent inside its \
node's network namespace (`ip netns exec node-1 sluice-agent run ...`) and give each its own \
--status-file, --mtu-file, --ipam-state-dir, --node-blocks-file and --health-addr; \
--block-store-dir and --manifests-dir are shared by all nodes of the directory datastore.")]
pub struct RunConfig {
    /// This node's name (the Node object's metadata.name).
    #[arg(long, env = "SLUICE_NODE_NAME")]
    pub node_name: String,

    /// Where cluster state comes from.
    #[arg(
        long,
        env = "SLUICE_DATASTORE",
        value_enum,
        default_value = "kubernetes"
    )]
    pub datastore: DatastoreKind,

    /// Directory datastore: a directory of Node, Pod, Namespace and NetworkPolicy
    /// manifests (YAML or JSON, several documents per file allowed), re-read on change.
    #[arg(
        long,
        env = "SLUICE_MANIFESTS_DIR",
        required_if_eq("datastore", "directory")
    )]
    pub manifests_dir: Option<PathBuf>,

    /// Directory datastore: the shared block store directory (one file per claimed
    /// block). The same directory the CNI conflist names in ipam.blockStore.path.
    #[arg(
        long,
        env = "SLUICE_BLOCK_STORE_DIR",
        required_if_eq("datastore", "directory")
    )]
    pub block_store_dir: Option<PathBuf>,

    /// How often the directory datastore looks for changed manifests, in milliseconds.
    #[arg(long, env = "SLUICE_POLL_MS", default_value_t = 500)]
    pub poll_ms: u64,

    /// The cluster pod pool; each node claims /--block-size blocks of it.
    #[arg(long, env = "SLUICE_POOL", default_value = "10.244.0.0/16")]
    pub pool: Ipv4Net,

    /// Prefix length of the per-node blocks.
    #[arg(long, env = "SLUICE_BLOCK_SIZE", default_value_t = 24)]
    pub block_size: u8,

    /// This node's address for tunnels and the node ipset. Default: the Node object's
    /// first InternalIP.
    #[arg(long, env = "SLUICE_NODE_IP")]
    pub node_ip: Option<IpAddr>,

    /// Encapsulation between nodes: ipip (tunl0, IP protocol 4), vxlan (UDP; for clouds
    /// that drop protocol 4 and kernels without ipip) or none (nodes share one L2 segment).
    #[arg(long, env = "SLUICE_ENCAPSULATION", default_value = "ipip")]
    pub encapsulation: Encapsulation,

    /// VXLAN UDP port (cluster-wide; accepted only from node addresses).
    #[arg(long, env = "SLUICE_VXLAN_PORT", default_value_t = DEFAULT_VXLAN_PORT)]
    pub vxlan_port: u16,

    /// VXLAN network identifier (cluster-wide).
    #[arg(long, env = "SLUICE_VXLAN_VNI", default_value_t = DEFAULT_VXLAN_VNI)]
    pub vxlan_vni: u32,

    /// Pod MTU; 0 = the MTU of the uplink (the link holding the node address, else the
    /// default route's device) minus the encapsulation overhead.
    #[arg(long, env = "SLUICE_MTU", default_value_t = 0)]
    pub mtu: u32,

    /// Masquerade pod traffic leaving the pool for destinations outside pool and nodes.
    #[arg(long, env = "SLUICE_NAT_OUTGOING", default_value_t = true, action = clap::ArgAction::Set)]
    pub nat_outgoing: bool,

    /// Program tunnel devices and routes (off: policy, NAT and the MTU file only).
    #[arg(long, env = "SLUICE_MANAGE_ROUTES", default_value_t = true, action = clap::ArgAction::Set)]
    pub manage_routes: bool,

    #[command(flatten)]
    pub files: NodeFiles,

    /// The denied-connection records, JSON lines, rotated at 4 MiB to `<file>.1`
    /// (docs/flows.md); served by `sluicectl flows` and `GET /flows`.
    #[arg(long, env = "SLUICE_FLOW_LOG_FILE", default_value = paths::FLOW_LOG_FILE)]
    pub flow_log_file: PathBuf,

    /// Record denied connections from the kernel's log rules (off: the rules stay,
    /// the agent does not read them).
    #[arg(long, env = "SLUICE_RECORD_FLOWS", default_value_t = true, action = clap::ArgAction::Set)]
    pub record_flows: bool,

    /// Kubernetes datastore: claim another block for this node when fewer than this
    /// many pod addresses are free in its blocks (checked every 2 s against the IPAM
    /// state; the IPAM plugin answers "try again later" once the blocks are full).
    #[arg(long, env = "SLUICE_BLOCK_LOW_WATER", default_value_t = crate::datastore::block_lifecycle::DEFAULT_LOW_WATER)]
    pub block_low_water: u32,

    /// Kubernetes datastore: release the IPAM blocks of a node once its Node object has
    /// been gone this many seconds (0 = never release). Several agents may do it at
    /// once: each release is a delete guarded by the block's uid and resourceVersion.
    #[arg(long, env = "SLUICE_ORPHAN_BLOCK_GRACE_SECONDS", default_value_t = 600)]
    pub orphan_block_grace_seconds: u64,

    /// Address of /healthz, /readyz and /metrics (bound in the agent's network namespace).
    /// How long a pod the CNI plugin reported over the node-local API is enforced
    /// without the datastore confirming it; then the report is dropped (the
    /// datastore is the truth).
    #[arg(long, env = "SLUICE_REPORT_GRACE_SECONDS", default_value_t = 120)]
    pub report_grace_seconds: u64,

    #[arg(long, env = "SLUICE_HEALTH_ADDR", default_value = "0.0.0.0:9099")]
    pub health_addr: SocketAddr,

    /// iptables backend; auto picks the one that already holds the host's rules.
    #[arg(
        long,
        env = "SLUICE_IPTABLES_BACKEND",
        value_enum,
        default_value = "auto"
    )]
    pub iptables_backend: BackendChoice,

    /// Policy dataplane: nftables (one table of sluice's, set lookups whose cost does
    /// not grow with the number of policies), iptables (chains and ipsets), or auto:
    /// nftables when `nft` and the kernel support what sluice uses, else iptables.
    /// Switching removes the other dataplane's sluice objects and nothing else.
    #[arg(long, env = "SLUICE_DATAPLANE", value_enum, default_value = "auto")]
    pub dataplane: DataplaneChoice,

    /// Full resync (read kernel state, repair drift) at least this often, in seconds.
    #[arg(long, env = "SLUICE_RESYNC_SECONDS", default_value_t = 30)]
    pub resync_seconds: u64,

    /// Wait this long after a change for more changes before reconciling (milliseconds).
    #[arg(long, env = "SLUICE_COALESCE_MS", default_value_t = 100)]
    pub coalesce_ms: u64,

    /// Log format on stderr.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax, e.g. `info,sluice_agent=debug`).
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    pub log: String,
}

impl RunConfig {
    pub fn resync_interval(&self) -> Duration {
        Duration::from_secs(self.resync_seconds.max(1))
    }

    pub fn coalesce(&self) -> Duration {
        Duration::from_millis(self.coalesce_ms)
    }

    /// `None` when orphan blocks are never released.
    pub fn orphan_block_grace(&self) -> Option<Duration> {
        (self.orphan_block_grace_seconds > 0)
            .then(|| Duration::from_secs(self.orphan_block_grace_seconds))
    }

    pub fn report_grace(&self) -> Duration {
        Duration::from_secs(self.report_grace_seconds)
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_ms.max(10))
    }
}

/// `sluice-agent install-cni`.
#[derive(Debug, Clone, Args)]
pub struct InstallCniConfig {
    /// Directory holding the binaries to install (in the agent image).
    #[arg(long, env = "SLUICE_SOURCE_BIN_DIR", default_value = "/opt/sluice/bin")]
    pub source_bin_dir: PathBuf,

    /// Binaries to copy from --source-bin-dir.
    #[arg(long, value_delimiter = ',', default_value = "sluice,sluice-ipam")]
    pub binaries: Vec<String>,

    /// The node's CNI binary directory.
    #[arg(long, env = "SLUICE_CNI_BIN_DIR", default_value = paths::CNI_BIN_DIR)]
    pub cni_bin_dir: PathBuf,

    /// The node's CNI configuration directory.
    #[arg(long, env = "SLUICE_CNI_CONF_DIR", default_value = paths::CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,

    /// File name of the conflist in --cni-conf-dir.
    #[arg(long, env = "SLUICE_CONFLIST_NAME", default_value = paths::CONFLIST_NAME)]
    pub conflist_name: String,

    /// A conflist template with __NODENAME__, __MTU__, __POOL__ and __BLOCK_SIZE__
    /// placeholders; default: the conflist of docs/node-files.md.
    #[arg(long, env = "SLUICE_CONFLIST_TEMPLATE")]
    pub template: Option<PathBuf>,

    /// Node name substituted into the conflist.
    #[arg(long, env = "SLUICE_NODE_NAME")]
    pub node_name: String,

    /// MTU substituted into the conflist; 0 makes the plugin read --mtu-file.
    #[arg(long, env = "SLUICE_MTU", default_value_t = 0)]
    pub mtu: u32,

    #[arg(long, env = "SLUICE_POOL", default_value = "10.244.0.0/16")]
    pub pool: Ipv4Net,

    #[arg(long, env = "SLUICE_BLOCK_SIZE", default_value_t = 24)]
    pub block_size: u8,

    #[command(flatten)]
    pub files: NodeFiles,
}

/// The files on a node that the agent and the CNI binaries share (docs/node-files.md).
/// One definition for `run` and `install-cni`, so the conflist the init container writes
/// always names the files the agent keeps.
#[derive(Debug, Clone, Args)]
pub struct NodeFiles {
    /// File the CNI plugin reads the pod MTU from (conflist mtuFile).
    #[arg(long, env = "SLUICE_MTU_FILE", default_value = paths::MTU_FILE)]
    pub mtu_file: PathBuf,

    /// Agent status file the CNI STATUS verb reads (conflist agentStatusFile).
    #[arg(long, env = "SLUICE_STATUS_FILE", default_value = paths::AGENT_STATUS_FILE)]
    pub status_file: PathBuf,

    /// The node-local API socket the agent serves and the CNI plugin reports to
    /// (conflist agentSocket; docs/architecture.md, "The node-local API").
    #[arg(long, env = "SLUICE_AGENT_SOCKET", default_value = paths::AGENT_SOCKET)]
    pub agent_socket: PathBuf,

    /// The IPAM plugin's per-node state directory (conflist ipam.stateDir). The agent
    /// only creates it at start, so the plugin's first ADD finds it.
    #[arg(long, env = "SLUICE_IPAM_STATE_DIR", default_value = paths::IPAM_STATE_DIR)]
    pub ipam_state_dir: PathBuf,

    /// Where the node's claimed blocks are published for the IPAM plugin
    /// (conflist ipam.nodeBlocksFile).
    #[arg(long, env = "SLUICE_NODE_BLOCKS_FILE", default_value = paths::NODE_BLOCKS_FILE)]
    pub node_blocks_file: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn directory_datastore_needs_its_dirs() {
        let r = Cli::try_parse_from([
            "sluice-agent",
            "run",
            "--node-name",
            "n1",
            "--datastore",
            "directory",
        ]);
        assert!(r.is_err());
        let ok = Cli::try_parse_from([
            "sluice-agent",
            "run",
            "--node-name",
            "n1",
            "--datastore",
            "directory",
            "--manifests-dir",
            "/m",
            "--block-store-dir",
            "/b",
            "--nat-outgoing",
            "false",
        ])
        .unwrap();
        let Command::Run(c) = ok.command else {
            panic!()
        };
        assert!(!c.nat_outgoing);
        assert_eq!(c.health_addr.port(), 9099);
    }
}
