//! Routes to other nodes' blocks: the desired table (pure) and its sync (through a trait).
//!
//! ```text
//! desired(local_node, &blocks, &encap)  ──►  DesiredRoutes      (pure, no I/O)
//! plan(&DesiredRoutes, &kernel routes, &kernel l2)  ──►  SyncPlan   (pure)
//! sync(&impl RouteTable, &DesiredRoutes).await  ──►  RouteSyncReport   (list, plan, apply)
//! ```
//!
//! Reconcile calls, after [`crate::tunnel::ensure`]:
//! ```ignore
//! let want = routes::desired("node-1", &blocks, &tunnel_state.route_encap());
//! let report = routes::sync(&netlink, &want).await?;
//! ```
//!
//! # What is ours
//! Every route sluice installs carries the route protocol [`ROUTE_PROTOCOL`] (181, `0xb5`;
//! `ip route show proto 181`), unused by the kernel (0–4, 8–19, 42, 99, 186–188 are
//! taken by the kernel, routing daemons and `bird`/`zebra`; 181 is in no
//! `/etc/iproute2/rt_protos` we know of). A sync lists the main table, considers only routes
//! with that protocol as ours, deletes those that are no longer desired and never
//! modifies a route of another protocol: when a foreign route already holds a
//! destination we want, it is reported as a conflict and left alone.
//!
//! VXLAN needs two L2 entries per remote node on our own device (`sluice.vxlan`): a
//! permanent neighbour (remote VTEP IP → VTEP MAC) and an FDB entry (VTEP MAC → remote
//! node IP). The device is ours, so every permanent entry with a remote on it is ours.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;

pub use crate::kernel::ROUTE_PROTOCOL;
use crate::kernel::{KernelError, KernelRoute, L2Entry, MAIN_TABLE, RouteTable, RouteTarget};
use crate::tunnel::{RouteEncap, vtep_mac};

/// One IPAM block and the node that owns it (from the datastore).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockOwner {
    pub node: String,
    /// The node's underlay address: the IPIP/VXLAN outer destination.
    pub node_ip: Ipv4Addr,
    pub block: Ipv4Net,
}

/// The whole desired state of the node's routes to pod blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredRoutes {
    pub routes: BTreeMap<Ipv4Net, RouteTarget>,
    pub l2: Vec<L2Entry>,
    /// The device whose permanent L2 entries are ours (VXLAN only).
    pub l2_device: Option<String>,
    /// Underlay addresses of the other nodes (for the agent's IP-protocol-4 filter).
    pub peer_node_ips: Vec<Ipv4Addr>,
}

/// The tunnel address of a node: IPAM's reserved tunnel address of its lowest block
/// ([`sluice_ipam::tunnel_address`], the one rule IPAM keeps out of pod allocations).
/// The same rule is applied on every node, so a VXLAN peer's VTEP address needs no
/// publishing.
pub fn tunnel_address(blocks: &[Ipv4Net]) -> Option<Ipv4Addr> {
    blocks.iter().min().map(|b| sluice_ipam::tunnel_address(*b))
}

/// The routes this node wants, from every block in the cluster and the encapsulation.
/// Pure: same input, same output, no kernel involved.
pub fn desired(local_node: &str, blocks: &[BlockOwner], encap: &RouteEncap) -> DesiredRoutes {
    let mut by_node: BTreeMap<&str, (Ipv4Addr, Vec<Ipv4Net>)> = BTreeMap::new();
    for b in blocks {
        by_node
            .entry(b.node.as_str())
            .or_insert_with(|| (b.node_ip, Vec::new()))
            .1
            .push(b.block);
    }
    let mut out = DesiredRoutes::default();
    if let RouteEncap::Vxlan { device } = encap {
        out.l2_device = Some(device.clone());
    }
    for (node, (node_ip, node_blocks)) in &by_node {
        if *node == local_node {
            for block in node_blocks {
                out.routes.insert(*block, RouteTarget::Blackhole);
            }
            continue;
        }
        out.peer_node_ips.push(*node_ip);
        let target = match encap {
            RouteEncap::Ipip { device } => RouteTarget::Via {
                gateway: *node_ip,
                dev: Some(device.clone()),
                onlink: true,
            },
            RouteEncap::None => RouteTarget::Via {
                gateway: *node_ip,
                dev: None,
                onlink: false,
            },
            RouteEncap::Vxlan { device } => {
                let Some(vtep) = tunnel_address(node_blocks) else {
                    continue;
                };
                let mac = vtep_mac(*node_ip);
                out.l2.push(L2Entry::Neighbour {
                    dev: device.clone(),
                    ip: vtep,
                    mac,
                });
                out.l2.push(L2Entry::Fdb {
                    dev: device.clone(),
                    mac,
                    dst: *node_ip,
                });
                RouteTarget::Via {
                    gateway: vtep,
                    dev: Some(device.clone()),
                    onlink: true,
                }
            }
        };
        for block in node_blocks {
            out.routes.insert(*block, target.clone());
        }
    }
    out.l2.sort();
    out.peer_node_ips.sort();
    out.peer_node_ips.dedup();
    out
}

/// Pods on other nodes whose address is in none of their node's blocks (a
/// `sluice.dev/ip-addrs-no-ipam` address, inside or outside the pool), each as a /32
/// "block" of the pod's node. Learned from the datastore's pods, so every node routes
/// the address the same way. Pure.
pub fn off_block_pods(
    cluster: &sluice_policy::Cluster,
    blocks: &BTreeMap<Ipv4Net, String>,
    local_node: &str,
    node_ips: &BTreeMap<&str, Ipv4Addr>,
) -> Arc<Vec<BlockOwner>> {
    let mut memo = OffBlockPods::default();
    memo.update(None, cluster, blocks, local_node, node_ips)
}

/// What [`OffBlockPods`] was computed for: the blocks, the nodes' addresses, this node.
type OffBlockInputs = (
    BTreeMap<Ipv4Net, String>,
    BTreeMap<String, Ipv4Addr>,
    String,
);

/// [`off_block_pods`] kept between syncs: each /32's pods by node, updated from the
/// pods that changed since the previous cluster instead of walking 10,000 pods and
/// sorting their routes on every sync (a new local pod changes none of them).
#[derive(Debug, Default)]
pub struct OffBlockPods {
    /// What the routes were computed for: the blocks, the nodes' addresses, this node.
    inputs: Option<OffBlockInputs>,
    /// Each off-block /32, the nodes whose pods hold it and how many.
    by_block: BTreeMap<Ipv4Net, BTreeMap<String, usize>>,
    /// The routes as last returned: shared, not rebuilt, while no pod with an
    /// off-block address changed (thousands of them cost more to list again than
    /// the rest of a new pod's compile).
    routes: Option<Arc<Vec<BlockOwner>>>,
}

impl OffBlockPods {
    /// The off-block pods of `cluster`; `prev`, the cluster of the previous call,
    /// lets unchanged inputs be updated from the changed pods only.
    pub fn update(
        &mut self,
        prev: Option<&sluice_policy::Cluster>,
        cluster: &sluice_policy::Cluster,
        blocks: &BTreeMap<Ipv4Net, String>,
        local_node: &str,
        node_ips: &BTreeMap<&str, Ipv4Addr>,
    ) -> Arc<Vec<BlockOwner>> {
        // Each node's blocks, once: this runs over every pod of the cluster on a
        // full update, and every block for every pod is 10,000 × 100 checks.
        let mut blocks_of: BTreeMap<&str, Vec<Ipv4Net>> = BTreeMap::new();
        for (b, owner) in blocks {
            blocks_of.entry(owner).or_default().push(*b);
        }
        let route = |p| off_block_route(p, local_node, node_ips, &blocks_of);
        let same_inputs = self.inputs.as_ref().is_some_and(|(b, ips, node)| {
            b == blocks
                && node == local_node
                && ips.len() == node_ips.len()
                && ips
                    .iter()
                    .zip(node_ips)
                    .all(|(a, b)| (a.0.as_str(), a.1) == (*b.0, b.1))
        });
        match prev.filter(|_| same_inputs) {
            Some(prev) => {
                for (old, new) in sluice_policy::compile::incremental::changed_pods(prev, cluster) {
                    let (old, new) = (old.and_then(route), new.and_then(route));
                    if old == new {
                        continue;
                    }
                    self.routes = None;
                    if let Some((block, node)) = old {
                        let nodes = self.by_block.entry(block).or_default();
                        if let Some(n) = nodes.get_mut(node) {
                            *n -= 1;
                            if *n == 0 {
                                nodes.remove(node);
                            }
                        }
                        if nodes.is_empty() {
                            self.by_block.remove(&block);
                        }
                    }
                    if let Some((block, node)) = new {
                        *self
                            .by_block
                            .entry(block)
                            .or_default()
                            .entry(node.to_owned())
                            .or_default() += 1;
                    }
                }
            }
            None => {
                self.routes = None;
                self.by_block.clear();
                for p in cluster.pods.values() {
                    if let Some((block, node)) = route(p) {
                        *self
                            .by_block
                            .entry(block)
                            .or_default()
                            .entry(node.to_owned())
                            .or_default() += 1;
                    }
                }
                self.inputs = Some((
                    blocks.clone(),
                    node_ips
                        .iter()
                        .map(|(n, ip)| (n.to_string(), *ip))
                        .collect(),
                    local_node.to_owned(),
                ));
            }
        }
        // One route per address: the first node by name when two nodes' pods
        // claim it (a stale object).
        let by_block = &self.by_block;
        self.routes
            .get_or_insert_with(|| {
                Arc::new(
                    by_block
                        .iter()
                        .filter_map(|(block, nodes)| {
                            let node = nodes.keys().next()?;
                            Some(BlockOwner {
                                node: node.clone(),
                                node_ip: node_ips[node.as_str()],
                                block: *block,
                            })
                        })
                        .collect(),
                )
            })
            .clone()
    }
}

/// The /32 of `p` and its node, when `p` is a pod of another (known) node whose
/// address lies in none of that node's blocks.
fn off_block_route<'p>(
    p: &'p sluice_policy::Pod,
    local_node: &str,
    node_ips: &BTreeMap<&str, Ipv4Addr>,
    blocks_of: &BTreeMap<&str, Vec<Ipv4Net>>,
) -> Option<(Ipv4Net, &'p str)> {
    if p.host_network {
        return None;
    }
    let node = p.node.as_deref().filter(|n| *n != local_node)?;
    node_ips.get(node)?;
    let own = blocks_of.get(node).map_or(&[][..], Vec::as_slice);
    p.ips.iter().find_map(|ip| match ip {
        std::net::IpAddr::V4(a) => {
            (!own.iter().any(|b| b.contains(a))).then(|| (Ipv4Net::from(*a), node))
        }
        std::net::IpAddr::V6(_) => None,
    })
}

/// Add a /32 per off-block pod, through its node the way that node's blocks are
/// reached (the same tunnel, gateway and VTEP). A pod whose node has no block route
/// yet is skipped until it has one.
pub fn add_pod_routes(want: &mut DesiredRoutes, blocks: &[BlockOwner], pods: &[BlockOwner]) {
    for p in pods {
        let target = blocks
            .iter()
            .filter(|b| b.node == p.node)
            .find_map(|b| want.routes.get(&b.block))
            .filter(|t| !matches!(t, RouteTarget::Blackhole))
            .cloned();
        if let Some(t) = target {
            want.routes.insert(p.block, t);
        }
    }
}

/// What a sync must change; computed from the desired and the observed state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncPlan {
    /// Destinations without a route: created.
    pub add: Vec<(Ipv4Net, RouteTarget)>,
    /// Our routes that point elsewhere: replaced.
    pub replace: Vec<(Ipv4Net, RouteTarget)>,
    /// Our routes no longer desired (a node left, a block was released).
    pub delete: Vec<KernelRoute>,
    /// Destinations held by a route of another protocol: left alone, reported.
    pub conflicts: Vec<KernelRoute>,
    pub unchanged: usize,
    pub l2_add: Vec<L2Entry>,
    pub l2_delete: Vec<L2Entry>,
}

impl SyncPlan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty()
            && self.replace.is_empty()
            && self.delete.is_empty()
            && self.l2_add.is_empty()
            && self.l2_delete.is_empty()
    }
}

fn target_matches(want: &RouteTarget, have: &RouteTarget) -> bool {
    match (want, have) {
        (
            RouteTarget::Via {
                gateway: g1,
                dev: d1,
                onlink: o1,
            },
            RouteTarget::Via {
                gateway: g2,
                dev: d2,
                onlink: o2,
            },
        ) => g1 == g2 && o1 == o2 && (d1.is_none() || d1 == d2),
        (a, b) => a == b,
    }
}

/// Diff desired against the kernel's table. Pure.
pub fn plan(want: &DesiredRoutes, kernel: &[KernelRoute], l2_have: &[L2Entry]) -> SyncPlan {
    let mut p = SyncPlan::default();
    let main: Vec<&KernelRoute> = kernel.iter().filter(|r| r.table == MAIN_TABLE).collect();
    for (dst, target) in &want.routes {
        let ours = main
            .iter()
            .find(|r| r.is_ours() && r.dst == *dst && r.priority == 0);
        match ours {
            Some(r) if target_matches(target, &r.target) => p.unchanged += 1,
            Some(_) => p.replace.push((*dst, target.clone())),
            None => {
                // A foreign route with the same key (dst, metric 0) would be overwritten
                // by ours: that is someone else's decision to undo, not ours.
                match main
                    .iter()
                    .find(|r| !r.is_ours() && r.dst == *dst && r.priority == 0)
                {
                    Some(foreign) => p.conflicts.push((*foreign).clone()),
                    None => p.add.push((*dst, target.clone())),
                }
            }
        }
    }
    for r in main.iter().filter(|r| r.is_ours()) {
        let keep = r.priority == 0 && want.routes.contains_key(&r.dst);
        if !keep {
            p.delete.push((*r).clone());
        }
    }
    for e in &want.l2 {
        if !l2_have.contains(e) {
            p.l2_add.push(e.clone());
        }
    }
    for e in l2_have {
        if !want.l2.contains(e) {
            p.l2_delete.push(e.clone());
        }
    }
    p
}

/// One change that failed; the sync carries on with the others.
#[derive(Debug)]
pub struct RouteFailure {
    pub what: String,
    pub error: KernelError,
}

/// The outcome of one sync, for logs and metrics.
#[derive(Debug, Default)]
pub struct RouteSyncReport {
    pub added: Vec<Ipv4Net>,
    pub replaced: Vec<Ipv4Net>,
    pub removed: Vec<Ipv4Net>,
    pub unchanged: usize,
    /// Destinations we want but another protocol's route holds (left untouched).
    pub conflicts: Vec<Ipv4Net>,
    pub l2_added: usize,
    pub l2_removed: usize,
    pub failures: Vec<RouteFailure>,
}

impl RouteSyncReport {
    /// Routes of ours in the table after the sync (for the `routes` gauge).
    pub fn programmed(&self) -> usize {
        self.unchanged + self.added.len() + self.replaced.len()
    }
    pub fn is_clean(&self) -> bool {
        self.failures.is_empty() && self.conflicts.is_empty()
    }
}

/// Errors that stop a sync before it changes anything.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("listing routes: {0}")]
    List(#[source] KernelError),
    #[error("listing neighbour/fdb entries of {dev}: {source}")]
    ListL2 {
        dev: String,
        #[source]
        source: KernelError,
    },
}

/// Bring the kernel's table to `want`: list, plan, apply. Individual failures are
/// collected in the report (a teardown-style "keep going"), so one bad route does not
/// block the others; only a failed listing is an error.
pub async fn sync(
    table: &impl RouteTable,
    want: &DesiredRoutes,
) -> Result<RouteSyncReport, RouteError> {
    let kernel = table.routes().await.map_err(RouteError::List)?;
    let mut l2_have = Vec::new();
    if let Some(dev) = &want.l2_device {
        l2_have = table
            .l2_entries(dev)
            .await
            .map_err(|source| RouteError::ListL2 {
                dev: dev.clone(),
                source,
            })?;
    }
    let p = plan(want, &kernel, &l2_have);
    let mut report = RouteSyncReport {
        unchanged: p.unchanged,
        conflicts: p.conflicts.iter().map(|r| r.dst).collect(),
        ..Default::default()
    };
    // L2 first: a VXLAN route is useless (packets dropped) until the VTEP resolves.
    for e in &p.l2_add {
        match table.replace_l2(e).await {
            Ok(()) => report.l2_added += 1,
            Err(error) => report.failures.push(RouteFailure {
                what: format!("add {e:?}"),
                error,
            }),
        }
    }
    for (dst, target) in &p.add {
        match table.replace_route(*dst, target).await {
            Ok(()) => report.added.push(*dst),
            Err(error) => report.failures.push(RouteFailure {
                what: format!("add route {dst}"),
                error,
            }),
        }
    }
    for (dst, target) in &p.replace {
        match table.replace_route(*dst, target).await {
            Ok(()) => report.replaced.push(*dst),
            Err(error) => report.failures.push(RouteFailure {
                what: format!("replace route {dst}"),
                error,
            }),
        }
    }
    for r in &p.delete {
        match table.delete_route(r).await {
            Ok(()) => report.removed.push(r.dst),
            Err(error) => report.failures.push(RouteFailure {
                what: format!("delete route {}", r.dst),
                error,
            }),
        }
    }
    for e in &p.l2_delete {
        match table.delete_l2(e).await {
            Ok(()) => report.l2_removed += 1,
            Err(error) => report.failures.push(RouteFailure {
                what: format!("delete {e:?}"),
                error,
            }),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::FakeKernel;
    use std::future::Future;
    use std::sync::Mutex;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn owner(node: &str, node_ip: &str, block: &str) -> BlockOwner {
        BlockOwner {
            node: node.into(),
            node_ip: ip(node_ip),
            block: net(block),
        }
    }
    fn ipip() -> RouteEncap {
        RouteEncap::Ipip {
            device: "tunl0".into(),
        }
    }
    fn via_tunl0(gw: &str) -> RouteTarget {
        RouteTarget::Via {
            gateway: ip(gw),
            dev: Some("tunl0".into()),
            onlink: true,
        }
    }
    fn cluster() -> Vec<BlockOwner> {
        vec![
            owner("node-1", "192.168.0.1", "10.244.1.0/24"),
            owner("node-2", "192.168.0.2", "10.244.2.0/24"),
            owner("node-3", "192.168.0.3", "10.244.3.0/24"),
            owner("node-3", "192.168.0.3", "10.244.7.0/24"),
        ]
    }

    #[test]
    fn a_no_ipam_address_anywhere_is_routed_as_a_32_to_its_pods_node() {
        use crate::datastore::objects::{convert, parse_manifest_text};
        let pod = |name: &str, node: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: d}}\n\
                 spec: {{nodeName: {node}, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: {ip}}}\n"
            )
        };
        let text = [
            pod("in-block", "node-2", "10.244.2.9"),
            pod("outside-pool", "node-2", "192.0.2.7"),
            pod("in-another-block", "node-3", "10.244.2.200"),
            pod("local", "node-1", "198.51.100.1"),
        ]
        .join("---\n");
        let objects = convert(&parse_manifest_text("t", &text).unwrap()).cluster;
        let blocks: BTreeMap<Ipv4Net, String> = cluster_blocks_by_net();
        let node_ips: BTreeMap<&str, Ipv4Addr> = [
            ("node-1", ip("192.168.0.1")),
            ("node-2", ip("192.168.0.2")),
            ("node-3", ip("192.168.0.3")),
        ]
        .into();
        let pods = off_block_pods(&objects, &blocks, "node-1", &node_ips);
        assert_eq!(
            pods.iter()
                .map(|p| (p.block, p.node.as_str()))
                .collect::<Vec<_>>(),
            vec![
                (net("10.244.2.200/32"), "node-3"),
                (net("192.0.2.7/32"), "node-2")
            ],
            "in-block pods ride their block's route; local ones have their veth route"
        );
        let mut d = desired("node-1", &cluster(), &ipip());
        add_pod_routes(&mut d, &cluster(), &pods);
        assert_eq!(d.routes[&net("192.0.2.7/32")], via_tunl0("192.168.0.2"));
        assert_eq!(d.routes[&net("10.244.2.200/32")], via_tunl0("192.168.0.3"));
        assert_eq!(d.routes[&net("10.244.2.0/24")], via_tunl0("192.168.0.2"));
    }

    #[test]
    fn off_block_routes_kept_between_syncs_equal_a_fresh_walk_after_each_change() {
        use crate::datastore::objects::{convert, parse_manifest_text};
        let pod = |name: &str, node: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: d}}\n\
                 spec: {{nodeName: {node}, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: {ip}}}\n"
            )
        };
        let cluster_of = |pods: &[(&str, &str, &str)]| {
            let text: Vec<String> = pods.iter().map(|(n, node, ip)| pod(n, node, ip)).collect();
            convert(&parse_manifest_text("t", &text.join("---\n")).unwrap()).cluster
        };
        let blocks: BTreeMap<Ipv4Net, String> = cluster_blocks_by_net();
        let node_ips: BTreeMap<&str, Ipv4Addr> = [
            ("node-1", ip("192.168.0.1")),
            ("node-2", ip("192.168.0.2")),
            ("node-3", ip("192.168.0.3")),
        ]
        .into();
        // Each step adds, moves, readdresses or deletes a pod; two pods of two nodes
        // share an address for a while (the first node by name keeps the route).
        let steps: Vec<Vec<(&str, &str, &str)>> = vec![
            vec![
                ("a", "node-2", "192.0.2.7"),
                ("b", "node-3", "10.244.2.200"),
            ],
            vec![
                ("a", "node-2", "192.0.2.7"),
                ("b", "node-3", "10.244.2.200"),
                ("c", "node-3", "192.0.2.7"),
            ],
            // Only an in-block pod arrives: the routes are the last ones, shared.
            vec![
                ("a", "node-2", "192.0.2.7"),
                ("b", "node-3", "10.244.2.200"),
                ("c", "node-3", "192.0.2.7"),
                ("e", "node-2", "10.244.2.10"),
            ],
            vec![
                ("a", "node-2", "10.244.2.9"),
                ("b", "node-3", "10.244.2.200"),
                ("c", "node-3", "192.0.2.7"),
            ],
            vec![
                ("b", "node-1", "10.244.2.200"),
                ("c", "node-3", "192.0.2.7"),
            ],
            vec![
                ("b", "node-2", "198.51.100.9"),
                ("c", "node-3", "192.0.2.7"),
                ("d", "node-1", "203.0.113.1"),
            ],
            vec![],
        ];
        let mut kept = OffBlockPods::default();
        let mut prev: Option<sluice_policy::Cluster> = None;
        let mut last: Option<Arc<Vec<BlockOwner>>> = None;
        for (i, step) in steps.iter().enumerate() {
            let c = cluster_of(step);
            let got = kept.update(prev.as_ref(), &c, &blocks, "node-1", &node_ips);
            assert_eq!(
                got,
                off_block_pods(&c, &blocks, "node-1", &node_ips),
                "step {i}"
            );
            let shared = last.as_ref().is_some_and(|l| Arc::ptr_eq(l, &got));
            assert_eq!(
                shared,
                i == 2,
                "step {i}: routes shared only while unchanged"
            );
            last = Some(got);
            prev = Some(c);
        }
        // New inputs (another block owner) walk the pods again.
        let c = cluster_of(&steps[1]);
        let mut moved = blocks.clone();
        moved.insert(net("192.0.2.0/24"), "node-3".into());
        let got = kept.update(prev.as_ref(), &c, &moved, "node-1", &node_ips);
        assert_eq!(got, off_block_pods(&c, &moved, "node-1", &node_ips));
    }

    fn cluster_blocks_by_net() -> BTreeMap<Ipv4Net, String> {
        cluster().into_iter().map(|b| (b.block, b.node)).collect()
    }

    #[test]
    fn ipip_routes_other_blocks_via_node_onlink_and_blackholes_own() {
        let d = desired("node-1", &cluster(), &ipip());
        let want: BTreeMap<_, _> = [
            (net("10.244.1.0/24"), RouteTarget::Blackhole),
            (net("10.244.2.0/24"), via_tunl0("192.168.0.2")),
            (net("10.244.3.0/24"), via_tunl0("192.168.0.3")),
            (net("10.244.7.0/24"), via_tunl0("192.168.0.3")),
        ]
        .into();
        assert_eq!(d.routes, want);
        assert!(d.l2.is_empty());
        assert_eq!(d.peer_node_ips, vec![ip("192.168.0.2"), ip("192.168.0.3")]);
    }

    #[test]
    fn none_routes_via_node_without_device() {
        let d = desired("node-2", &cluster(), &RouteEncap::None);
        assert_eq!(
            d.routes[&net("10.244.1.0/24")],
            RouteTarget::Via {
                gateway: ip("192.168.0.1"),
                dev: None,
                onlink: false
            }
        );
        assert_eq!(d.routes[&net("10.244.2.0/24")], RouteTarget::Blackhole);
    }

    #[test]
    fn vxlan_routes_via_peer_vtep_with_neighbour_and_fdb_per_node() {
        let enc = RouteEncap::Vxlan {
            device: "sluice.vxlan".into(),
        };
        let d = desired("node-1", &cluster(), &enc);
        // node-3 has two blocks: one VTEP (tunnel address of its lowest block) for both.
        let via3 = RouteTarget::Via {
            gateway: ip("10.244.3.1"),
            dev: Some("sluice.vxlan".into()),
            onlink: true,
        };
        assert_eq!(d.routes[&net("10.244.3.0/24")], via3);
        assert_eq!(d.routes[&net("10.244.7.0/24")], via3);
        let mac3 = vtep_mac(ip("192.168.0.3"));
        assert!(d.l2.contains(&L2Entry::Neighbour {
            dev: "sluice.vxlan".into(),
            ip: ip("10.244.3.1"),
            mac: mac3
        }));
        assert!(d.l2.contains(&L2Entry::Fdb {
            dev: "sluice.vxlan".into(),
            mac: mac3,
            dst: ip("192.168.0.3")
        }));
        assert_eq!(d.l2.len(), 4, "two entries for each of two peers");
    }

    fn kroute(dst: &str, protocol: u8, target: RouteTarget) -> KernelRoute {
        KernelRoute {
            dst: net(dst),
            protocol,
            table: MAIN_TABLE,
            priority: 0,
            target,
        }
    }

    #[test]
    fn plan_keeps_matching_replaces_moved_deletes_stale_and_never_touches_foreign() {
        let want = desired("node-1", &cluster()[..3], &ipip());
        let kernel = vec![
            kroute("10.244.1.0/24", ROUTE_PROTOCOL, RouteTarget::Blackhole),
            // node-2 moved to a new address
            kroute("10.244.2.0/24", ROUTE_PROTOCOL, via_tunl0("192.168.0.99")),
            // node-9 left: ours, stale
            kroute("10.244.9.0/24", ROUTE_PROTOCOL, via_tunl0("192.168.0.9")),
            // someone else's route on a destination we want
            kroute("10.244.3.0/24", 4, via_tunl0("192.168.0.3")),
            // someone else's unrelated routes
            kroute("0.0.0.0/0", 3, via_tunl0("192.168.0.254")),
            kroute("10.244.1.5/32", 3, RouteTarget::Other),
            // ours, but in another table: not ours to manage here
            KernelRoute {
                table: 100,
                ..kroute("10.244.8.0/24", ROUTE_PROTOCOL, RouteTarget::Blackhole)
            },
        ];
        let p = plan(&want, &kernel, &[]);
        assert_eq!(p.unchanged, 1);
        assert_eq!(
            p.replace,
            vec![(net("10.244.2.0/24"), via_tunl0("192.168.0.2"))]
        );
        assert_eq!(p.delete.len(), 1);
        assert_eq!(p.delete[0].dst, net("10.244.9.0/24"));
        assert!(p.add.is_empty());
        assert_eq!(p.conflicts.len(), 1);
        assert_eq!(p.conflicts[0].dst, net("10.244.3.0/24"));
    }

    #[test]
    fn plan_of_applied_state_is_empty() {
        let want = desired("node-2", &cluster(), &ipip());
        let kernel: Vec<_> = want
            .routes
            .iter()
            .map(|(d, t)| KernelRoute {
                dst: *d,
                protocol: ROUTE_PROTOCOL,
                table: MAIN_TABLE,
                priority: 0,
                target: t.clone(),
            })
            .collect();
        assert!(plan(&want, &kernel, &[]).is_empty());
    }

    #[test]
    fn plan_none_accepts_the_device_the_kernel_chose() {
        let want = desired("node-1", &cluster()[..2], &RouteEncap::None);
        let kernel = vec![
            kroute("10.244.1.0/24", ROUTE_PROTOCOL, RouteTarget::Blackhole),
            kroute(
                "10.244.2.0/24",
                ROUTE_PROTOCOL,
                RouteTarget::Via {
                    gateway: ip("192.168.0.2"),
                    dev: Some("eth0".into()),
                    onlink: false,
                },
            ),
        ];
        assert!(plan(&want, &kernel, &[]).is_empty());
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn sync_converges_through_join_and_leave_and_keeps_foreign_routes() {
        let foreign = kroute("0.0.0.0/0", 3, via_tunl0("192.168.0.254"));
        let table = FakeKernel {
            routes: Mutex::new(vec![foreign.clone()]),
            ..Default::default()
        };
        let enc = RouteEncap::Vxlan {
            device: "sluice.vxlan".into(),
        };
        let all = cluster();
        let r = block_on(sync(&table, &desired("node-1", &all, &enc))).unwrap();
        assert_eq!(r.added.len(), 4);
        assert_eq!(r.l2_added, 4);
        // node-3 leaves: its two routes and its two L2 entries go, nothing else moves.
        let r = block_on(sync(&table, &desired("node-1", &all[..2], &enc))).unwrap();
        assert_eq!(r.removed, vec![net("10.244.3.0/24"), net("10.244.7.0/24")]);
        assert_eq!(r.l2_removed, 2);
        assert_eq!(r.unchanged, 2);
        let again = block_on(sync(&table, &desired("node-1", &all[..2], &enc))).unwrap();
        assert_eq!(again.programmed(), 2);
        assert!(again.added.is_empty() && again.removed.is_empty() && again.l2_added == 0);
        assert!(table.routes.lock().unwrap().contains(&foreign));
    }

    #[test]
    fn sync_reports_a_failed_route_and_applies_the_rest() {
        let table = FakeKernel {
            fail_dst: Some(net("10.244.2.0/24")),
            ..Default::default()
        };
        let r = block_on(sync(&table, &desired("node-1", &cluster(), &ipip()))).unwrap();
        assert_eq!(r.failures.len(), 1);
        assert_eq!(r.added.len(), 3);
        assert!(!r.is_clean());
    }
}
