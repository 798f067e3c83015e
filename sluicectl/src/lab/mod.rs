//! `sluicectl lab`: a multi-node sluice cluster on one Linux host, in network
//! namespaces, driven through the real CNI binary and the real agent, probed with
//! real packets.
//!
//! ```text
//! sluicectl lab up    --name NAME [--nodes N | --node-ips A,B,C [--underlay CIDR]]
//!                     [--encap auto|ipip|vxlan|none] [--pool CIDR]
//! sluicectl lab apply --name NAME -f PATH [-f PATH ...] [--prune] [--no-wait]
//! sluicectl lab probe --name NAME --from NS/POD|ip:ADDR|node:NODE
//!                     --to NS/POD|ip:ADDR|node:NODE:PORT --port N [--protocol TCP|UDP|SCTP]
//!                     [--timeout-ms MS] [-o text|json]
//! sluicectl lab probe --name NAME --probes FILE -o json
//! sluicectl lab matrix --name NAME [-o text|json]
//! sluicectl lab status --name NAME [-o text|json]
//! sluicectl lab flows --name NAME [--node NODE] [--denied] [--namespace NS]
//!                     [--since RFC3339] [--limit N] [--follow] [-o text|json]
//! sluicectl lab delete --name NAME -f PATH
//! sluicectl lab down  --name NAME
//! ```
//! Extra knobs beyond that interface: `up --dataplane auto|nftables|iptables` (the
//! agents' policy dataplane; `status` shows each one's choice and why),
//! `up --iptables-backend auto|nft|legacy` (which iptables the agents program), `up --nat-outgoing true` (off by default: the
//! lab's outside network routes pod addresses, so outside hosts see pods' own
//! addresses), `matrix --timeout-ms`, `apply --prune`. Hidden, for the flood bench
//! (`tests/bench/flows-flood.sh`): `flood` (paced SYNs from a pod) and `latency`
//! (many timed connects from a pod).
//!
//! One file per subcommand; `state` is what they share, `netns` is the OS boundary,
//! `cni` execs the node's plugin chain like kubelet's runtime, `services` is the
//! kube-proxy stand-in, `external` the outside hosts, `serve` the echo server.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub mod agents;
pub mod cni;
pub mod external;
pub mod flood;
pub mod flows;
pub mod latency;
pub mod manifests;
pub mod matrix;
pub mod names;
pub mod netns;
pub mod pods;
pub mod probe;
pub mod serve;
pub mod services;
pub mod state;
pub mod status;
pub mod topology;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Build the underlay, the nodes, and start an agent on each.
    Up(topology::UpArgs),
    /// Create or update Namespaces, Pods, NetworkPolicies, ClusterNetworkPolicies and
    /// NodePort Services.
    Apply(pods::ApplyArgs),
    /// Remove the objects in the files (pods through CNI DEL).
    Delete(pods::DeleteArgs),
    /// Send one real connection (or a file of them) and report connected/blocked.
    Probe(probe::ProbeArgs),
    /// Probe every pod from every pod on every declared port.
    Matrix(matrix::MatrixArgs),
    /// Nodes, pods, addresses and agent health.
    Status(status::StatusArgs),
    /// The nodes' denied-connection records (`sluicectl flows` on each node).
    Flows(flows::FlowsArgs),
    /// Remove everything the lab made.
    Down(topology::DownArgs),
    /// Echo server run inside pods and outside hosts (internal).
    #[command(hide = true)]
    Serve(serve::ServeArgs),
    /// Paced raw-socket TCP SYNs from a pod (the flood bench's sender; internal).
    #[command(hide = true)]
    Flood(flood::FloodArgs),
    /// Many timed connects from a pod in one process (the flood bench's prober;
    /// internal).
    #[command(hide = true)]
    Latency(latency::LatencyArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

pub fn exec(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Up(a) => {
            let requested = a.encap;
            let st = topology::up(a)?;
            let why = match requested {
                state::Encap::Auto if st.encap == state::Encap::Ipip => {
                    "auto: this kernel has ipip"
                }
                state::Encap::Auto => "auto: this kernel has no ipip, so vxlan",
                _ => "as requested",
            };
            println!(
                "lab {} up: {} nodes on {}, encapsulation {} ({why}), pool {}",
                st.name,
                st.nodes.len(),
                st.underlay_cidr,
                st.encap.as_str(),
                st.pool
            );
            for n in &st.nodes {
                let dataplane = agents::read_status(n)
                    .and_then(|s| s.dataplane)
                    .map(|d| format!("  {d}"))
                    .unwrap_or_default();
                println!(
                    "  {}  netns {}  uplink {}{dataplane}",
                    n.name, n.netns, n.uplink_ip
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply(a) => pods::apply(a),
        Command::Delete(a) => pods::delete(a),
        Command::Probe(a) => probe::exec(a),
        Command::Matrix(a) => matrix::exec(a),
        Command::Status(a) => status::exec(a),
        Command::Flows(a) => flows::exec(a),
        Command::Down(a) => {
            topology::down(&a.name)?;
            println!("lab {} down", a.name);
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(a) => serve::exec(a),
        Command::Flood(a) => flood::exec(a),
        Command::Latency(a) => latency::exec(a),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("invalid lab name {0:?}: lowercase letters, digits and '-', at most 24 characters")]
    BadName(String),
    #[error("no lab named {0:?} (run `sluicectl lab up --name {0}` first)")]
    NoSuchLab(String),
    #[error("lab {0:?} already exists (run `sluicectl lab down --name {0}` first)")]
    Exists(String),
    #[error("lab state {0} is corrupt: {1}")]
    CorruptState(PathBuf, String),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("could not run {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("entering network namespace {0}: {1}")]
    Setns(String, nix::Error),
    #[error("binary {0} not found (build it with `cargo build --workspace --bins`, or set {1})")]
    MissingBinary(String, String),
    #[error("agent on {0} exited; its log {1} ends with:\n{2}")]
    AgentDied(String, PathBuf, String),
    #[error("agents not ready in time: {0}")]
    NotReady(String),
    #[error("{0}")]
    Usage(String),
    #[error("{file}: {message}")]
    Manifest { file: String, message: String },
    /// A document that is not YAML/JSON (names the file and the document).
    #[error(transparent)]
    ManifestText(#[from] sluice_policy::ManifestError),
    #[error("CNI {command} for pod {pod} failed: {message}")]
    Cni {
        command: String,
        pod: String,
        message: String,
    },
    #[error("teardown left errors: {}", .0.join("; "))]
    Teardown(Vec<String>),
    #[error("probe cannot be sent: {0}")]
    Probe(String),
}

impl LabError {
    pub fn io(path: &Path, e: std::io::Error) -> LabError {
        LabError::Io(path.to_path_buf(), e)
    }
}
