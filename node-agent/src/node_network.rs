//! The node's links and routes, applied through agent-net's modules in the order
//! their docs give: uplink → tunnel device → MTU file → routes to every block.

use std::path::PathBuf;

use crate::agent::NodeNetwork;
use crate::mtu;
use crate::netlink::Netlink;
use crate::reconcile::Desired;
use crate::routes;
use crate::tunnel::{self, Encapsulation, TunnelSpec, VxlanSettings};

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
    async fn apply(&self, d: &Desired) -> Result<usize, String> {
        if !self.manage_routes && self.mtu != 0 {
            return Ok(0); // the configured MTU was written at start
        }
        let node_ip = d.node_ip.ok_or_else(|| {
            format!(
                "the address of node {} is unknown: no Node object with an InternalIP, and no --node-ip",
                self.node
            )
        })?;
        let address = routes::tunnel_address(&d.own_blocks)
            .ok_or_else(|| format!("node {} holds no block yet", self.node))?;
        let mut uplink = mtu::detect_uplink(&self.netlink, Some(node_ip))
            .await
            .map_err(|e| e.to_string())?;
        if self.mtu != 0 {
            // A configured pod MTU wins; the tunnel device gets the same.
            uplink.mtu = self.mtu + self.encap.overhead();
        }
        if !self.manage_routes {
            let pod_mtu = uplink.mtu.saturating_sub(self.encap.overhead());
            mtu::write_mtu_file(&self.mtu_file, pod_mtu).map_err(|e| e.to_string())?;
            return Ok(0);
        }
        let mut spec = TunnelSpec::new(self.encap, node_ip, address, &uplink);
        spec.vxlan = self.vxlan;
        let state = tunnel::ensure(&self.netlink, &spec)
            .await
            .map_err(|e| e.to_string())?;
        mtu::write_mtu_file(&self.mtu_file, state.mtu).map_err(|e| e.to_string())?;
        let want = routes::desired(&self.node, &d.blocks, &state.route_encap());
        let report = routes::sync(&self.netlink, &want)
            .await
            .map_err(|e| e.to_string())?;
        for c in &report.conflicts {
            tracing::warn!(route = %c, "a route of another owner holds a block destination; left alone");
        }
        if !report.failures.is_empty() {
            let list: Vec<String> = report
                .failures
                .iter()
                .map(|f| format!("{}: {}", f.what, f.error))
                .collect();
            return Err(format!("route sync: {}", list.join("; ")));
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
    async fn apply(&self, d: &Desired) -> Result<usize, String> {
        match self {
            Network::Kernel(k) => k.apply(d).await,
            Network::Off => Ok(0),
        }
    }
}
