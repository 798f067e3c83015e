//! The agent's seam to the kernel's links, addresses, routes and L2 entries.
//!
//! ```text
//! kernel/
//!   mod.rs    the traits (RouteTable, LinkTable, UplinkSource) and KernelError
//!   types.rs  the values they speak (KernelRoute, LinkState, L2Entry, Uplink, …) and
//!             the constants that mark what is sluice's (ROUTE_PROTOCOL, IPIP_DEVICE)
//!   linux.rs  Netlink: the traits over a sluice-netlink socket
//!   fake.rs   FakeKernel: the traits over plain vectors, for tests
//! ```
//!
//! `mtu`, `tunnel` and `routes` decide (purely) and act through these traits;
//! `node_network` wires them to [`Netlink`]. This folder imports none of them, so the
//! modules depend in one direction only (youki's `syscall/` has the same shape).

use std::future::Future;

use ipnet::Ipv4Net;
use sluice_netlink::NetlinkError;

mod fake;
mod linux;
mod types;

pub use fake::FakeKernel;
pub use linux::Netlink;
pub use types::*;

/// Every failure of the kernel seam.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel refused, or the socket failed (see [`KernelError::errno`]).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("no link named {0}")]
    NoSuchLink(String),
    #[error("replace route {0}: sluice installs only blackhole and via routes")]
    UnsupportedRoute(Ipv4Net),
    #[error("starting the netlink thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The thread that owns the socket ended (it panicked); the agent must restart.
    #[error("the netlink thread has stopped")]
    ThreadGone,
}

impl KernelError {
    /// A refusal with `errno` (positive, `libc::EEXIST` …), as the kernel gives it.
    pub fn refused(op: &str, errno: i32) -> KernelError {
        KernelError::Netlink(NetlinkError::Kernel {
            op: op.to_owned(),
            errno,
        })
    }

    /// The kernel's errno, when the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            KernelError::Netlink(e) => e.errno(),
            _ => None,
        }
    }
}

/// The route-table side of the kernel, kept small so reconcile is tested with a fake.
pub trait RouteTable {
    /// Every IPv4 route (all tables and protocols: the plan filters).
    fn routes(&self) -> impl Future<Output = Result<Vec<KernelRoute>, KernelError>> + Send;
    /// Create or replace `dst` in the main table with protocol [`ROUTE_PROTOCOL`].
    fn replace_route(
        &self,
        dst: Ipv4Net,
        target: &RouteTarget,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn delete_route(
        &self,
        route: &KernelRoute,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    /// Permanent neighbour and FDB entries (with a remote) on `dev`; empty when `dev`
    /// does not exist.
    fn l2_entries(
        &self,
        dev: &str,
    ) -> impl Future<Output = Result<Vec<L2Entry>, KernelError>> + Send;
    fn replace_l2(&self, entry: &L2Entry) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn delete_l2(&self, entry: &L2Entry) -> impl Future<Output = Result<(), KernelError>> + Send;
}

/// The link side of the kernel, small so reconcile is tested with a fake.
pub trait LinkTable {
    /// The link called `name`, `None` when there is none.
    fn link(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<LinkState>, KernelError>> + Send;
    /// `ip link add tunl0 type ipip`: makes the kernel load `ipip` where it can (which
    /// creates the fallback `tunl0`). `EEXIST` is success.
    fn create_ipip_fallback(&self) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn create_vxlan(
        &self,
        name: &str,
        params: &VxlanParams,
        mac: [u8; 6],
        mtu: u32,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn delete_link(&self, index: u32) -> impl Future<Output = Result<(), KernelError>> + Send;
    fn set_mtu_up(
        &self,
        index: u32,
        mtu: u32,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    /// Add an address; `EEXIST` is success.
    fn add_address(
        &self,
        index: u32,
        addr: Ipv4Net,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    /// Remove an address; one that is not there is success.
    fn delete_address(
        &self,
        index: u32,
        addr: Ipv4Net,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
}

/// What uplink detection reads from the kernel.
pub trait UplinkSource {
    /// Every link with its IPv4 addresses.
    fn link_summaries(&self) -> impl Future<Output = Result<Vec<LinkSummary>, KernelError>> + Send;
    /// Default routes of the main table.
    fn default_routes(&self)
    -> impl Future<Output = Result<Vec<DefaultRoute>, KernelError>> + Send;
}
