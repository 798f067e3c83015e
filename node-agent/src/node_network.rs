//! The node's links and routes, applied through the kernel seam in the order the
//! modules' docs give: uplink → tunnel device → MTU file → routes to every block.

use std::future::Future;
use std::path::PathBuf;

use crate::kernel::Netlink;
use crate::mtu::{self, MtuError};
use crate::reconcile::Desired;
use crate::routes::{self, RouteError, RouteFailure};
use crate::tunnel::{self, Encapsulation, TunnelError, TunnelSpec, VxlanSettings};

/// Tunnel devices and routes: the part of the node outside iptables. A trait so the
/// loop is tested without netlink and so `--manage-routes=false` is a no-op.
pub trait NodeNetwork: Send + Sync + 'static {
    /// Bring tunnel and routes to `desired`; returns the number of routes programmed.
    fn apply(&self, desired: &Desired) -> impl Future<Output = Result<usize, NetworkError>> + Send;
}

/// Why the node's links and routes could not be brought to the desired state.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "the address of node {node} is unknown: no Node object with an InternalIP, and no --node-ip"
    )]
    NodeIpUnknown { node: String },
    #[error("node {node} holds no block yet")]
    NoBlock { node: String },
    /// Uplink detection or the MTU file.
    #[error(transparent)]
    Mtu(#[from] MtuError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    /// The route table could not be read; nothing was changed.
    #[error(transparent)]
    Routes(#[from] RouteError),
    /// Some route or L2 changes failed; the others were applied.
    #[error("route sync: {}", failures(.0))]
    RouteFailures(Vec<RouteFailure>),
}

fn failures(list: &[RouteFailure]) -> String {
    list.iter()
        .map(|f| format!("{}: {}", f.what, f.error))
        .collect::<Vec<_>>()
        .join("; ")
}

pub struct KernelNetwork {
    pub netlink: Netlink,
    pub node: String,
    pub encap: Encapsulation,
    pub vxlan: VxlanSettings,
    /// Pod MTU from the command line; 0 = detect.
    pub mtu: u32,
    pub mtu_file: PathBuf,
    /// Program the tunnel device and routes; when false only the MTU file is kept,
    /// because the CNI plugin needs it either way.
    pub manage_routes: bool,
}

impl NodeNetwork for KernelNetwork {
    async fn apply(&self, d: &Desired) -> Result<usize, NetworkError> {
        if !self.manage_routes && self.mtu != 0 {
            return Ok(0); // the configured MTU was written at start
        }
        let node_ip = d.node_ip.ok_or_else(|| NetworkError::NodeIpUnknown {
            node: self.node.clone(),
        })?;
        let address =
            routes::tunnel_address(&d.own_blocks).ok_or_else(|| NetworkError::NoBlock {
                node: self.node.clone(),
            })?;
        let mut uplink = mtu::detect_uplink(&self.netlink, Some(node_ip)).await?;
        if self.mtu != 0 {
            // A configured pod MTU wins; the tunnel device gets the same.
            uplink.mtu = self.mtu + self.encap.overhead();
        }
        if !self.manage_routes {
            let pod_mtu = uplink.mtu.saturating_sub(self.encap.overhead());
            mtu::write_mtu_file(&self.mtu_file, pod_mtu)?;
            return Ok(0);
        }
        let mut spec = TunnelSpec::new(self.encap, node_ip, address, &uplink);
        spec.vxlan = self.vxlan;
        let state = tunnel::ensure(&self.netlink, &spec).await?;
        mtu::write_mtu_file(&self.mtu_file, state.mtu)?;
        let mut want = routes::desired(&self.node, &d.blocks, &state.route_encap());
        routes::add_pod_routes(&mut want, &d.blocks, &d.pod_routes);
        let report = routes::sync(&self.netlink, &want).await?;
        for c in &report.conflicts {
            tracing::warn!(route = %c, "a route of another owner holds a block destination; left alone");
        }
        if !report.failures.is_empty() {
            return Err(NetworkError::RouteFailures(report.failures));
        }
        Ok(report.programmed())
    }
}

/// The configured choice: program links and routes, or leave them alone.
pub enum Network {
    Kernel(Box<KernelNetwork>),
    Off,
}

impl NodeNetwork for Network {
    async fn apply(&self, d: &Desired) -> Result<usize, NetworkError> {
        match self {
            Network::Kernel(k) => k.apply(d).await,
            Network::Off => Ok(0),
        }
    }
}
