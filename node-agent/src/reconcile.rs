//! Snapshot → desired node state, purely. The loop in [`crate::agent`] applies it.
//!
//! The rules and sets come whole from the policy crate
//! ([`sluice_policy::dataplane::node::node_ruleset`]: policy chains, tunnel guard,
//! NAT outgoing, held pods); this module adds what only the agent needs: block
//! routes, this node's address, the local pods to wait for, and warnings.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use sluice_policy::NamespacedName;
use sluice_policy::compile::CompileError;
use sluice_policy::compile::incremental::SetCache;
use sluice_policy::dataplane::Ruleset;
use sluice_policy::dataplane::node::node_ruleset_with;

use crate::datastore::Snapshot;
use crate::routes::OffBlockPods;

pub use sluice_policy::dataplane::node::{
    CHAIN_HELD, CHAIN_NAT_OUTGOING, CHAIN_TUNNEL_IN, NodeSettings, SET_NODES, SET_POOLS,
    TunnelFilter,
};

/// The host-side interface names, by the CNI plugin's own rule.
pub use sluice_policy::veth_names::VethNames;

/// One block of the pool, its node, and where to send its traffic: the routes'
/// own type, so the desired state goes to route sync without a copy.
pub use crate::routes::BlockOwner as BlockRoute;

/// Everything the node should look like after one apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Every rule and set of this node, as `sluicectl policy render` prints it.
    pub dataplane: Ruleset,
    /// Every block whose owner's address is known (ours included).
    pub blocks: Vec<BlockRoute>,
    /// Pods on other nodes whose address lies in none of their node's blocks
    /// (`sluice.dev/ip-addrs-no-ipam`), each as a /32 owned by the pod's node.
    /// Shared with the compiler's memo while unchanged.
    pub pod_routes: std::sync::Arc<Vec<BlockRoute>>,
    /// This node's blocks, ascending; tunl0 gets IPAM's tunnel address of the first.
    pub own_blocks: Vec<Ipv4Net>,
    /// This node's address, when known.
    pub node_ip: Option<Ipv4Addr>,
    /// Local pods with an address: their policy is in force once this is applied.
    pub local_pods: BTreeSet<NamespacedName>,
    /// Things an operator should hear about (rejected policies, nodes without address).
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("compiling policy: {0}")]
    Compile(#[from] CompileError),
    #[error("dataplane model: {0}")]
    Dataplane(#[from] sluice_policy::dataplane::ModelError),
}

fn first_v4(addrs: &[IpAddr]) -> Option<Ipv4Addr> {
    addrs.iter().find_map(|a| match a {
        IpAddr::V4(v) => Some(*v),
        IpAddr::V6(_) => None,
    })
}

/// Compute the desired state. Pure: no I/O, same input → same output.
pub fn desired(snapshot: &Snapshot, settings: &NodeSettings) -> Result<Desired, ReconcileError> {
    desired_with(snapshot, settings, None, None)
}

/// Which compile produced a desired state: from nothing, or reusing the sets of the
/// previous one ([`sluice_policy::compile::incremental`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompileKind {
    Full,
    Incremental,
}

impl CompileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CompileKind::Full => "full",
            CompileKind::Incremental => "incremental",
        }
    }
}

/// The agent's side of the incremental compile: the set contents the last compile
/// left, and the snapshot they were computed from. The result is the same as
/// [`desired`]'s; only the time differs (a new pod at 10,000 pods: milliseconds
/// instead of a whole-node recompile).
#[derive(Default)]
pub struct Compiler {
    cache: SetCache,
    /// The off-block pod routes, kept like the sets.
    off_block: OffBlockPods,
    last: Option<std::sync::Arc<Snapshot>>,
}

impl Compiler {
    /// The next compile starts from nothing. The agent does this with every periodic
    /// full resync, so that a flaw in the cache's invalidation could not outlive one
    /// resync period.
    pub fn reset(&mut self) {
        self.cache.clear();
        self.last = None;
    }

    /// [`desired`] for `snapshot`, reusing what the previous call computed.
    pub fn desired(
        &mut self,
        snapshot: &std::sync::Arc<Snapshot>,
        settings: &NodeSettings,
    ) -> Result<(Desired, CompileKind), ReconcileError> {
        let prev = self.last.take();
        let kind = match &prev {
            Some(prev) => {
                self.cache.advance(&prev.cluster, &snapshot.cluster);
                CompileKind::Incremental
            }
            None => {
                self.cache.clear();
                CompileKind::Full
            }
        };
        // On an error `last` stays empty: the next compile is a full one.
        let off_block = (&mut self.off_block, prev.as_ref().map(|p| &p.cluster));
        let out = desired_with(snapshot, settings, Some(&mut self.cache), Some(off_block))?;
        self.last = Some(snapshot.clone());
        Ok((out, kind))
    }
}

/// `off_block`: the routes kept between compiles, and the cluster they were last
/// computed for.
fn desired_with(
    snapshot: &Snapshot,
    settings: &NodeSettings,
    cache: Option<&mut SetCache>,
    off_block: Option<(&mut OffBlockPods, Option<&sluice_policy::Cluster>)>,
) -> Result<Desired, ReconcileError> {
    let mut out = Desired::default();
    let cluster = &snapshot.cluster;
    for (key, rejected) in &cluster.rejected_policies {
        out.warnings.push(format!(
            "NetworkPolicy {key} cannot be enforced ({}); the pods it selects are held fail-closed",
            rejected.reason
        ));
    }
    out.dataplane = node_ruleset_with(cluster, settings, &VethNames, cache)?;
    out.dataplane.validate()?;

    // Node addresses and block routes.
    let mut node_ips: BTreeMap<&str, Ipv4Addr> = cluster
        .nodes
        .values()
        .filter_map(|n| Some((n.name.as_str(), first_v4(&n.addresses)?)))
        .collect();
    if let Some(ip) = settings.node_ip {
        node_ips.insert(settings.node.as_str(), ip);
    }
    out.node_ip = node_ips.get(settings.node.as_str()).copied();
    for (block, node) in &snapshot.blocks {
        if node == &settings.node {
            out.own_blocks.push(*block);
        }
        match node_ips.get(node.as_str()) {
            Some(ip) => out.blocks.push(BlockRoute {
                node: node.clone(),
                node_ip: *ip,
                block: *block,
            }),
            None => out.warnings.push(format!(
                "block {block} belongs to node {node}, whose address is unknown"
            )),
        }
    }

    out.pod_routes = match off_block {
        Some((memo, prev)) => {
            memo.update(prev, cluster, &snapshot.blocks, &settings.node, &node_ips)
        }
        None => crate::routes::off_block_pods(cluster, &snapshot.blocks, &settings.node, &node_ips),
    };

    out.local_pods = cluster
        .pods
        .values()
        .filter(|p| {
            !p.host_network && p.node.as_deref() == Some(&settings.node) && !p.ips.is_empty()
        })
        .map(|p| p.key())
        .collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::Snapshot;
    use crate::datastore::objects::{convert, parse_manifest_text};
    use sluice_policy::compile::InterfaceNames;
    use sluice_policy::{LabelSelector, RejectedPolicy};

    const WORLD: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}, {type: Hostname, address: node-1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: prod, labels: {app: web}}
spec: {nodeName: node-2, containers: [{name: c, image: x}]}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: prod}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: prod}
spec: {podSelector: {}}
"#;

    fn snapshot(extra: &str) -> Snapshot {
        let objs = parse_manifest_text("test", &format!("{WORLD}\n---\n{extra}")).unwrap();
        let conv = convert(&objs);
        assert!(conv.skipped.is_empty(), "{:?}", conv.skipped);
        Snapshot {
            cluster: conv.cluster,
            blocks: [
                ("10.244.1.0/24".parse().unwrap(), "node-1".to_string()),
                ("10.244.2.0/24".parse().unwrap(), "node-2".to_string()),
                ("10.244.9.0/24".parse().unwrap(), "node-gone".to_string()),
            ]
            .into(),
            ..Default::default()
        }
    }

    fn settings() -> NodeSettings {
        NodeSettings {
            node: "node-1".into(),
            pool: "10.244.0.0/16".parse().unwrap(),
            tunnel: TunnelFilter::Ipip,
            nat_outgoing: true,
            node_ip: None,
            dataplane: sluice_policy::dataplane::DataplaneKind::Iptables,
        }
    }

    /// The model as text, in the shape these tests were written against.
    struct View {
        tables: BTreeMap<&'static str, TableView>,
        sets: Vec<SetView>,
    }
    #[derive(Default)]
    struct TableView {
        chains: Vec<ChainView>,
        jumps: Vec<JumpView>,
    }
    #[derive(Clone)]
    struct ChainView {
        name: String,
        rules: Vec<String>,
    }
    struct JumpView {
        from: String,
        rule: String,
    }
    impl JumpView {
        fn target(&self) -> Option<&str> {
            self.rule.strip_prefix("-j ")
        }
    }
    struct SetView {
        name: String,
        members: BTreeSet<String>,
    }

    fn view(d: &Desired) -> View {
        use sluice_policy::render::{ipset, iptables};
        let mut tables: BTreeMap<&'static str, TableView> = BTreeMap::new();
        for (table, chains) in &d.dataplane.tables {
            tables.entry(table.as_str()).or_default().chains = chains
                .values()
                .map(|c| ChainView {
                    name: c.name.clone(),
                    rules: c.rules.iter().map(iptables::rule_body).collect(),
                })
                .collect();
        }
        for j in &d.dataplane.jumps {
            tables
                .entry(j.table.as_str())
                .or_default()
                .jumps
                .push(JumpView {
                    from: j.chain.clone(),
                    rule: iptables::rule_body(&j.rule),
                });
        }
        let sets = d
            .dataplane
            .sets
            .values()
            .map(|s| SetView {
                name: s.name.clone(),
                members: s.members.iter().map(ipset::member_text).collect(),
            })
            .collect();
        View { tables, sets }
    }

    fn chain(d: &Desired, table: &str, name: &str) -> ChainView {
        view(d).tables[table]
            .chains
            .iter()
            .find(|c| c.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no chain {name}"))
    }

    #[test]
    fn the_compiler_gives_what_a_full_compile_gives_and_says_which_compile_ran() {
        let s = settings();
        let mut compiler = Compiler::default();
        let first = std::sync::Arc::new(snapshot(""));
        let (d, kind) = compiler.desired(&first, &s).unwrap();
        assert_eq!(kind, CompileKind::Full);
        assert_eq!(d, desired(&first, &s).unwrap());
        let next = std::sync::Arc::new(snapshot(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: new, namespace: prod, labels: {app: web}}\n\
             spec: {nodeName: node-1, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.244.1.11}\n",
        ));
        let (d, kind) = compiler.desired(&next, &s).unwrap();
        assert_eq!(kind, CompileKind::Incremental);
        assert_eq!(d, desired(&next, &s).unwrap());
        assert!(d.local_pods.contains(&NamespacedName::new("prod", "new")));
        compiler.reset();
        assert_eq!(compiler.desired(&first, &s).unwrap().1, CompileKind::Full);
    }

    #[test]
    fn blocks_routes_and_local_pods_come_from_the_snapshot() {
        let d = desired(&snapshot(""), &settings()).unwrap();
        assert_eq!(d.node_ip, Some("192.168.0.1".parse().unwrap()));
        assert_eq!(
            d.own_blocks,
            vec!["10.244.1.0/24".parse::<Ipv4Net>().unwrap()]
        );
        let routed: Vec<_> = d
            .blocks
            .iter()
            .map(|b| (b.block.to_string(), b.node_ip.to_string()))
            .collect();
        assert_eq!(
            routed,
            [
                ("10.244.1.0/24".into(), "192.168.0.1".into()),
                ("10.244.2.0/24".into(), "192.168.0.2".to_string())
            ]
        );
        assert!(
            d.warnings.iter().any(|w| w.contains("node-gone")),
            "{:?}",
            d.warnings
        );
        // Only local pods with an address are waited for.
        assert_eq!(d.local_pods, [NamespacedName::new("prod", "web")].into());
    }

    #[test]
    fn node_set_holds_every_node_and_nat_skips_pool_and_nodes() {
        let d = desired(&snapshot(""), &settings()).unwrap();
        let v = view(&d);
        let nodes = v.sets.iter().find(|s| s.name == SET_NODES).unwrap();
        assert_eq!(
            nodes.members.iter().cloned().collect::<Vec<_>>(),
            ["192.168.0.1", "192.168.0.2"]
        );
        let nat = chain(&d, "nat", CHAIN_NAT_OUTGOING);
        assert_eq!(
            nat.rules,
            [
                "-m set --match-set SLUICE-POOLS src -m set ! --match-set SLUICE-POOLS dst \
              -m set ! --match-set SLUICE-NODES dst -j MASQUERADE"
            ]
        );
        // The only nat rule sluice has: nothing that could SNAT traffic to a pod, and
        // no rule anywhere that names a tunnel address.
        let all: Vec<&String> = v
            .tables
            .values()
            .flat_map(|t| t.chains.iter())
            .flat_map(|c| c.rules.iter())
            .collect();
        assert!(
            all.iter()
                .filter(|r| r.contains("MASQUERADE") || r.contains("SNAT"))
                .count()
                == 1
        );
        assert!(
            !all.iter()
                .any(|r| r.contains("tunl0") || r.contains("10.244.1.0/32"))
        );
    }

    #[test]
    fn tunnel_guard_joins_the_policy_input_chain_with_one_jump_per_builtin() {
        let d = desired(&snapshot(""), &settings()).unwrap();
        let filter = &view(&d).tables["filter"];
        for builtin in ["INPUT", "FORWARD"] {
            assert_eq!(
                filter.jumps.iter().filter(|j| j.from == builtin).count(),
                1,
                "{builtin}"
            );
        }
        let input_target = filter
            .jumps
            .iter()
            .find(|j| j.from == "INPUT")
            .unwrap()
            .target()
            .unwrap();
        assert_eq!(
            chain(&d, "filter", input_target).rules[0],
            format!("-p 4 -j {CHAIN_TUNNEL_IN}")
        );
        // Each drop's log rule is the policy crate's to check (deny_log); here the drops.
        let drops = |c: &str| -> Vec<String> {
            chain(&d, "filter", c)
                .rules
                .iter()
                .filter(|r| !r.contains("NFLOG"))
                .cloned()
                .collect()
        };
        assert_eq!(
            drops(CHAIN_TUNNEL_IN),
            [
                "-i slc+ -j DROP",
                "-i slx+ -j DROP",
                "-m set --match-set SLUICE-NODES src -j RETURN",
                "-j DROP"
            ]
        );
        let fwd_target = filter
            .jumps
            .iter()
            .find(|j| j.from == "FORWARD")
            .unwrap()
            .target()
            .unwrap();
        assert!(
            drops(fwd_target)[..2]
                .iter()
                .all(|r| r.ends_with("-p 4 -j DROP"))
        );
    }

    #[test]
    fn vxlan_guards_its_port_and_none_guards_nothing() {
        let mut s = settings();
        s.tunnel = TunnelFilter::Vxlan { port: 4799 };
        let d = desired(&snapshot(""), &s).unwrap();
        let v = view(&d);
        let input = v.tables["filter"]
            .jumps
            .iter()
            .find(|j| j.from == "INPUT")
            .unwrap()
            .target()
            .unwrap();
        assert_eq!(
            chain(&d, "filter", input).rules[0],
            format!("-p udp -m udp --dport 4799 -j {CHAIN_TUNNEL_IN}")
        );
        s.tunnel = TunnelFilter::None;
        let d = desired(&snapshot(""), &s).unwrap();
        assert!(
            view(&d).tables["filter"]
                .chains
                .iter()
                .all(|c| c.name != CHAIN_TUNNEL_IN)
        );
    }

    #[test]
    fn rejected_policy_holds_exactly_the_pods_it_selects() {
        let mut snap = snapshot("");
        snap.cluster.rejected_policies.insert(
            NamespacedName::new("prod", "broken"),
            RejectedPolicy {
                reason: "except outside cidr".into(),
                pod_selector: Some(LabelSelector::from_labels([("app", "web")])),
                namespace_selector: None,
            },
        );
        let d = desired(&snap, &settings()).unwrap();
        let veth = VethNames.host_veth(&snap.cluster.pods[&NamespacedName::new("prod", "web")]);
        // `far` runs on node-2: not ours to hold.
        let held: Vec<String> = chain(&d, "filter", CHAIN_HELD)
            .rules
            .iter()
            .filter(|r| !r.contains("NFLOG"))
            .cloned()
            .collect();
        assert_eq!(
            held,
            [format!("-o {veth} -j DROP"), format!("-i {veth} -j DROP")]
        );
        assert!(
            d.warnings
                .iter()
                .any(|w| w.contains("prod/broken") && w.contains("except outside cidr"))
        );
        let v = view(&d);
        let fwd = v.tables["filter"]
            .jumps
            .iter()
            .find(|j| j.from == "FORWARD")
            .unwrap()
            .target()
            .unwrap();
        // Ahead of every allow in the chain FORWARD jumps to.
        let rules = &chain(&d, "filter", fwd).rules;
        let held_at = rules
            .iter()
            .position(|r| r == &format!("-m conntrack --ctstate NEW -j {CHAIN_HELD}"))
            .unwrap();
        let first_accept = rules
            .iter()
            .position(|r| r.contains("ACCEPT") || r.contains("-g ") || r.contains("-j SLUICE-FWD"))
            .unwrap();
        assert!(held_at < first_accept, "{rules:#?}");

        // Unreadable selector: the whole namespace, by wildcard.
        snap.cluster
            .rejected_policies
            .values_mut()
            .for_each(|r| r.pod_selector = None);
        let d = desired(&snap, &settings()).unwrap();
        let prefix = VethNames.namespace_prefix("prod");
        assert_eq!(
            chain(&d, "filter", CHAIN_HELD).rules[1],
            format!("-o {prefix}+ -j DROP")
        );
    }

    #[test]
    fn invalid_policy_in_manifests_is_rejected_with_its_name() {
        let snap = snapshot(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: prod}\n\
             spec: {podSelector: {matchLabels: {app: web}}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}]}]}\n",
        );
        let r = &snap.cluster.rejected_policies[&NamespacedName::new("prod", "bad")];
        assert!(r.pod_selector.is_some());
        assert!(
            view(&desired(&snap, &settings()).unwrap()).tables["filter"]
                .chains
                .iter()
                .any(|c| c.name == CHAIN_HELD)
        );
    }

    #[test]
    fn desired_state_is_deterministic() {
        let a = desired(&snapshot(""), &settings()).unwrap();
        let b = desired(&snapshot(""), &settings()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn node_ip_flag_overrides_the_node_object() {
        let mut s = settings();
        s.node_ip = Some("10.9.9.9".parse().unwrap());
        let d = desired(&snapshot(""), &s).unwrap();
        assert_eq!(d.node_ip, s.node_ip);
        assert!(
            view(&d)
                .sets
                .iter()
                .find(|x| x.name == SET_NODES)
                .unwrap()
                .members
                .contains("10.9.9.9")
        );
    }
}
