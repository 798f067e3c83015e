//! sluice-agent: the node agent. It watches a datastore (Kubernetes or a directory of
//! manifests), computes the node's desired state (policy chains and ipsets, NAT,
//! tunnel and routes) and applies it atomically, exposing health, readiness and
//! metrics, and the status file the CNI plugin's STATUS verb reads.
//!
//! - [`config`]: flags and env of `run` and `install-cni`.
//! - [`datastore`]: where state comes from (Kubernetes, a directory).
//! - [`reconcile`]: snapshot → desired state, pure.
//! - [`dataplane`]: owned iptables chains and ipsets, planned against the kernel.
//! - [`agent`]: the loop that ties them together; [`health`], [`metrics`], [`status`].
//! - [`install_cni`]: the init container's job.
//! - [`local_api`]: the node-local socket the CNI plugin reports pods on.

pub mod agent;
pub mod config;
pub mod dataplane;
pub mod datastore;
pub mod flows;
pub mod health;
pub mod install_cni;
pub mod local_api;
pub mod metrics;
pub mod node_network;
pub mod reconcile;
pub mod run;
pub mod status;
// Tunnel device, routes to other nodes' blocks and the pod MTU, over the kernel seam.
pub mod kernel;
pub mod mtu;
pub mod routes;
pub mod tunnel;

/// The agent's allocator, for everything that links it (the binary, its tests and
/// the sync bench, so that a bench figure is the agent's). A compile allocates and
/// frees a node's worth of small objects every sync; in a long-running agent glibc's
/// malloc spent a third of a new pod's compile in `_int_malloc` sorting its bins
/// (`node-agent/BENCH.md`, "Session 9: the agent's allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
