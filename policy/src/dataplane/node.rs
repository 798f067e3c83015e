//! Everything the agent programs on one node, as one model: the policy chains and
//! sets of [`crate::compile`], plus the agent's own rules:
//!
//! - tunnel guard (filter): IP protocol 4 (IPIP) or the VXLAN UDP port is accepted
//!   only from known node addresses (ipset `SLUICE-NODES`), and never from a pod;
//! - NAT outgoing (nat POSTROUTING): masquerade only what leaves the pool for a
//!   destination outside the pool and the nodes, so traffic *to* a pod is never
//!   SNATed and a NodePort client with `externalTrafficPolicy: Local` keeps its
//!   address all the way to the pod's ingress policy (seed 001). tunl0 addresses get
//!   no special treatment anywhere;
//! - fail-closed: a policy that cannot be expressed holds the pods it selects (the
//!   whole namespace when even the selector is broken): their new connections are
//!   dropped in both directions ahead of every allow, since policies are additive and
//!   a deny-all stand-in alone would be overruled by any other policy that allows.
//!   The stand-in is added too, so the namespace counts as having policy and its
//!   not-yet-known pods stay fail-closed.
//!
//! Each hook joins the policy chain for that built-in chain when it exists, so there
//! is one jump per built-in chain. Both the filter and the nat table are always in
//! the model, so turning a feature off (NAT outgoing) removes its chains instead of
//! leaving them in a table nobody looks at.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;

use super::deny_log::{self, DenyReason, DenyTag};
use super::{
    BuiltinJump, Chain, CtState, Interface, IpSet, Match, Rule, Ruleset, SetDirection, SetKind,
    SetMember, Table, Target,
};
use crate::compile::{self, CompileError, InterfaceNames, jump_rule, pod_iface_prefixes};
use crate::model::{Cluster, NamespacedName, NetworkPolicy, PolicyTypes, Protocol};
use crate::names::Direction;
use crate::selector::LabelSelector;

/// Node addresses: the only sources allowed to send us tunnel packets.
pub const SET_NODES: &str = "SLUICE-NODES";
/// The pod pool(s).
pub const SET_POOLS: &str = "SLUICE-POOLS";
pub const CHAIN_TUNNEL_IN: &str = "SLUICE-TUNNEL-IN";
pub const CHAIN_NAT_OUTGOING: &str = "SLUICE-NAT-OUTGOING";
/// New connections of pods selected by a policy that cannot be expressed.
pub const CHAIN_HELD: &str = "SLUICE-HELD";
/// The agent's own chains for built-in chains the policy part does not jump from.
const FALLBACK_FORWARD: &str = "SLUICE-FORWARD";
const FALLBACK_INPUT: &str = "SLUICE-INPUT";
const FALLBACK_POSTROUTING: &str = "SLUICE-POSTROUTING";

/// IANA protocol number of IP-in-IP.
const IPPROTO_IPIP: u8 = 4;

/// How this node's traffic between nodes is carried, as far as filtering cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelFilter {
    /// IP protocol 4.
    Ipip,
    /// UDP to this port.
    Vxlan { port: u16 },
    /// No encapsulation: nothing to guard.
    None,
}

impl TunnelFilter {
    /// What an encapsulated packet matches, or `None` when there is no tunnel.
    fn matches(self) -> Option<Vec<Match>> {
        match self {
            TunnelFilter::Ipip => Some(vec![Match::IpProtocol(IPPROTO_IPIP)]),
            TunnelFilter::Vxlan { port } => Some(vec![
                Match::Protocol(Protocol::Udp),
                Match::DestinationPorts {
                    start: port,
                    end: port,
                },
            ]),
            TunnelFilter::None => None,
        }
    }
}

/// The node's settings that shape its rules (the agent's command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    pub node: String,
    pub pool: Ipv4Net,
    pub tunnel: TunnelFilter,
    pub nat_outgoing: bool,
    /// Overrides the Node object's address for this node.
    pub node_ip: Option<Ipv4Addr>,
    /// Which kernel dataplane the ruleset is for: it decides the policy part's form
    /// (chains walked per policy for iptables, one set lookup per direction for
    /// nftables); the agent's own rules are the same model on both.
    pub dataplane: super::DataplaneKind,
}

/// A rejected policy's stand-in: deny everything, both directions, for the pods it
/// would have selected. Its name cannot collide with a real policy (`:` is not
/// allowed in object names).
fn fail_closed_policy(key: &NamespacedName, selector: Option<&LabelSelector>) -> NetworkPolicy {
    NetworkPolicy {
        log_allowed: Default::default(),
        namespace: key.namespace.clone(),
        name: format!("rejected:{}", key.name),
        pod_selector: selector.cloned().unwrap_or_else(LabelSelector::everything),
        ingress: Vec::new(),
        egress: Vec::new(),
        policy_types: PolicyTypes {
            ingress: true,
            egress: true,
        },
    }
}

/// The cluster with a fail-closed stand-in for every rejected policy.
pub fn with_stand_ins(cluster: &Cluster) -> Cluster {
    let mut out = cluster.clone();
    for (key, rejected) in &cluster.rejected_policies {
        if !key.is_cluster_scoped() {
            out.add_policy(fail_closed_policy(key, rejected.pod_selector.as_ref()));
            continue;
        }
        // A rejected ClusterNetworkPolicy: one stand-in in every namespace its
        // subject would reach, with its pod selector.
        let namespaces: BTreeSet<&String> = cluster
            .namespaces
            .keys()
            .chain(cluster.pods.values().map(|p| &p.namespace))
            .collect();
        for ns in namespaces {
            let held = rejected
                .namespace_selector
                .as_ref()
                .is_none_or(|s| s.matches(&cluster.namespace_labels(ns)));
            if held {
                let stand_in = NamespacedName::new(ns.as_str(), format!("cnp:{}", key.name));
                out.add_policy(fail_closed_policy(
                    &stand_in,
                    rejected.pod_selector.as_ref(),
                ));
            }
        }
    }
    out
}

/// Every rule and set the agent programs on node `settings.node`. Pure: same input,
/// same output; `sluicectl policy render` prints exactly this.
pub fn node_ruleset(
    cluster: &Cluster,
    settings: &NodeSettings,
    ifaces: &dyn InterfaceNames,
) -> Result<Ruleset, CompileError> {
    node_ruleset_with(cluster, settings, ifaces, None)
}

/// [`node_ruleset`] with the policy part compiled incrementally from `cache`
/// ([`compile::incremental`]); the same result.
pub fn node_ruleset_with(
    cluster: &Cluster,
    settings: &NodeSettings,
    ifaces: &dyn InterfaceNames,
    cache: Option<&mut compile::incremental::SetCache>,
) -> Result<Ruleset, CompileError> {
    // Copying 10,000 pods costs more than an incremental compile: only when there
    // are stand-ins to add.
    let full = if cluster.rejected_policies.is_empty() {
        std::borrow::Cow::Borrowed(cluster)
    } else {
        std::borrow::Cow::Owned(with_stand_ins(cluster))
    };
    let mut rs =
        compile::compile_for_with(settings.dataplane, &full, &settings.node, ifaces, cache)?;
    for table in [Table::Filter, Table::Nat] {
        rs.tables.entry(table).or_default();
    }
    let held = held_interfaces(cluster, &settings.node, ifaces);
    hold_pods(&mut rs, held);
    add_node_sets(&mut rs, cluster, settings);
    guard_tunnel(&mut rs, settings.tunnel);
    if settings.nat_outgoing {
        nat_outgoing(&mut rs);
    }
    Ok(rs)
}

/// Every IPv4 address of every node, and this node's override.
pub fn node_addresses(cluster: &Cluster, settings: &NodeSettings) -> BTreeSet<Ipv4Addr> {
    cluster
        .nodes
        .values()
        .flat_map(|n| n.addresses.iter())
        .filter_map(|a| match a {
            IpAddr::V4(v) => Some(*v),
            IpAddr::V6(_) => None,
        })
        .chain(settings.node_ip)
        .collect()
}

/// Interfaces of pods held by rejected policies: exact veths, or the namespace's
/// prefix when the policy's selector is unreadable.
fn held_interfaces(cluster: &Cluster, node: &str, ifaces: &dyn InterfaceNames) -> Vec<Interface> {
    let mut out = BTreeSet::new();
    for (key, rejected) in &cluster.rejected_policies {
        if rejected.pod_selector.is_none() && !key.is_cluster_scoped() {
            out.insert(Interface::prefix(ifaces.namespace_prefix(&key.namespace)));
        }
    }
    // The evaluator's own reading of "selected by a rejected policy", so `policy
    // check` and the dataplane hold the same pods; a namespace held whole by its
    // prefix needs no per-pod entry.
    for pod in cluster
        .pods
        .values()
        .filter(|p| p.node.as_deref() == Some(node))
    {
        if cluster
            .rejected_policies_selecting(pod)
            .any(|(_, r)| r.pod_selector.is_some())
        {
            out.insert(Interface::exact(ifaces.host_veth(pod)));
        }
    }
    // In the order the interface text sorts, as the agent always wrote them.
    let mut out: Vec<Interface> = out.into_iter().collect();
    out.sort_by_key(iface_text);
    out
}

fn iface_text(i: &Interface) -> String {
    if i.wildcard {
        format!("{}+", i.name)
    } else {
        i.name.clone()
    }
}

/// Put `rules` first in whatever owned chain `builtin` jumps to unconditionally, or in
/// a chain of our own (`fallback`) with its own jump.
fn hook(rs: &mut Ruleset, table: Table, builtin: &str, fallback: &str, rules: Vec<Rule>) {
    if rules.is_empty() {
        return;
    }
    let target = rs
        .jumps
        .iter()
        .find(|j| j.table == table && j.chain == builtin && j.rule.matches.is_empty())
        .and_then(|j| match &j.rule.target {
            Target::Jump(t) => Some(t.clone()),
            _ => None,
        });
    let name = match target {
        Some(t) => t,
        None => {
            rs.jumps.push(BuiltinJump {
                table,
                chain: builtin.to_string(),
                rule: jump_rule(fallback),
            });
            fallback.to_string()
        }
    };
    let chain = rs.chain_mut(table, &name);
    let mut merged = rules;
    merged.append(&mut chain.rules);
    chain.rules = merged;
}

/// New connections to or from a held pod are dropped, ahead of every allow.
fn hold_pods(rs: &mut Ruleset, held: Vec<Interface>) {
    if held.is_empty() {
        return;
    }
    let mut rules = Vec::new();
    let held_tag = |dir| DenyTag::new(DenyReason::PodNotYetProgrammed, dir, None);
    for iface in held {
        rules.extend(deny_log::deny(
            vec![Match::OutInterface(iface.clone())],
            &held_tag(Direction::Ingress),
        ));
        rules.extend(deny_log::deny(
            vec![Match::InInterface(iface)],
            &held_tag(Direction::Egress),
        ));
    }
    rs.add_chain(
        Table::Filter,
        Chain {
            name: CHAIN_HELD.into(),
            rules,
        },
    );
    let jump = || {
        Rule::new(
            vec![Match::CtState(vec![CtState::New])],
            Target::Jump(CHAIN_HELD.into()),
        )
    };
    hook(rs, Table::Filter, "FORWARD", FALLBACK_FORWARD, vec![jump()]);
    hook(rs, Table::Filter, "INPUT", FALLBACK_INPUT, vec![jump()]);
}

fn add_node_sets(rs: &mut Ruleset, cluster: &Cluster, settings: &NodeSettings) {
    let sets = [
        IpSet {
            name: SET_NODES.into(),
            kind: SetKind::HashIp,
            members: node_addresses(cluster, settings)
                .into_iter()
                .map(SetMember::Ip)
                .collect(),
        },
        IpSet {
            name: SET_POOLS.into(),
            kind: SetKind::HashNet,
            members: [SetMember::Net {
                net: settings.pool,
                nomatch: false,
            }]
            .into(),
        },
    ];
    for set in sets {
        rs.sets.insert(set.name.clone(), set);
    }
}

fn set_match(name: &str, direction: SetDirection, negated: bool) -> Match {
    Match::Set {
        name: name.into(),
        direction,
        negated,
    }
}

/// Encapsulated packets only from node addresses, and never from a pod.
fn guard_tunnel(rs: &mut Ruleset, tunnel: TunnelFilter) {
    let Some(encapsulated) = tunnel.matches() else {
        return;
    };
    let tag = DenyTag::new(DenyReason::TunnelGuard, Direction::Ingress, None);
    let mut guard: Vec<Rule> = pod_iface_prefixes()
        .flat_map(|p| deny_log::deny(vec![Match::InInterface(p)], &tag))
        .collect();
    guard.push(Rule::new(
        vec![set_match(SET_NODES, SetDirection::Src, false)],
        Target::Return,
    ));
    guard.extend(deny_log::deny(vec![], &tag));
    rs.add_chain(
        Table::Filter,
        Chain {
            name: CHAIN_TUNNEL_IN.into(),
            rules: guard,
        },
    );
    hook(
        rs,
        Table::Filter,
        "INPUT",
        FALLBACK_INPUT,
        vec![Rule::new(
            encapsulated.clone(),
            Target::Jump(CHAIN_TUNNEL_IN.into()),
        )],
    );
    // A pod must not reach another node's tunnel endpoint with a hand-made
    // encapsulated packet either.
    let from_pods = pod_iface_prefixes()
        .flat_map(|p| {
            let mut matches = vec![Match::InInterface(p)];
            matches.extend(encapsulated.iter().cloned());
            deny_log::deny(matches, &tag)
        })
        .collect();
    hook(rs, Table::Filter, "FORWARD", FALLBACK_FORWARD, from_pods);
}

/// Masquerade what leaves the pool for anywhere but the pool and the nodes.
fn nat_outgoing(rs: &mut Ruleset) {
    rs.add_chain(
        Table::Nat,
        Chain {
            name: CHAIN_NAT_OUTGOING.into(),
            rules: vec![Rule::new(
                vec![
                    set_match(SET_POOLS, SetDirection::Src, false),
                    set_match(SET_POOLS, SetDirection::Dst, true),
                    set_match(SET_NODES, SetDirection::Dst, true),
                ],
                Target::Masquerade,
            )],
        },
    );
    hook(
        rs,
        Table::Nat,
        "POSTROUTING",
        FALLBACK_POSTROUTING,
        vec![jump_rule(CHAIN_NAT_OUTGOING)],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Node, Pod, RejectedPolicy};
    use crate::render::iptables::rule_body;

    struct Veths;

    impl InterfaceNames for Veths {
        fn host_veth(&self, pod: &Pod) -> String {
            format!("slc{}", pod.name)
        }
        fn namespace_prefix(&self, namespace: &str) -> String {
            format!("slc{}", &namespace[..1])
        }
    }

    fn cluster() -> Cluster {
        let mut c = Cluster::default();
        c.add_node(Node {
            name: "n1".into(),
            addresses: vec!["192.168.0.1".parse().unwrap()],
        });
        c.add_pod(Pod {
            namespace: "prod".into(),
            name: "web".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            ips: vec!["10.244.1.5".parse().unwrap()],
            node: Some("n1".into()),
            ports: vec![],
            host_network: false,
        });
        c.rejected_policies.insert(
            NamespacedName::new("prod", "broken"),
            RejectedPolicy {
                reason: "test".into(),
                pod_selector: Some(LabelSelector::from_labels([("app", "web")])),
                namespace_selector: None,
            },
        );
        c
    }

    fn settings(tunnel: TunnelFilter, nat_outgoing: bool) -> NodeSettings {
        NodeSettings {
            node: "n1".into(),
            pool: "10.244.0.0/16".parse().unwrap(),
            tunnel,
            nat_outgoing,
            node_ip: None,
            dataplane: crate::dataplane::DataplaneKind::Iptables,
        }
    }

    fn bodies(rs: &Ruleset, table: Table, chain: &str) -> Vec<String> {
        rs.chain(table, chain)
            .unwrap_or_else(|| panic!("no chain {chain}"))
            .rules
            .iter()
            .map(rule_body)
            .collect()
    }

    #[test]
    fn held_pods_drop_new_connections_before_the_policy_dispatch_sees_them() {
        let rs = node_ruleset(&cluster(), &settings(TunnelFilter::Ipip, true), &Veths).unwrap();
        let log = |m: &str, dir: &str| {
            format!(
                "{m} -m conntrack --ctstate NEW -m limit --limit 100/sec --limit-burst 100 \
                 -j NFLOG --nflog-prefix \"slc:hold:{dir}\" --nflog-group 7"
            )
        };
        assert_eq!(
            bodies(&rs, Table::Filter, CHAIN_HELD),
            [
                log("-o slcweb", "i"),
                "-o slcweb -j DROP".into(),
                log("-i slcweb", "e"),
                "-i slcweb -j DROP".into()
            ]
        );
        let forward = bodies(&rs, Table::Filter, crate::names::CHAIN_FORWARD);
        let held = forward
            .iter()
            .position(|r| r == "-m conntrack --ctstate NEW -j SLUICE-HELD")
            .unwrap();
        let first_dispatch = forward.iter().position(|r| r.contains("-g ")).unwrap();
        assert!(held < first_dispatch, "{forward:#?}");
        // The stand-in policy makes the namespace count as having policy.
        assert!(
            bodies(&rs, Table::Filter, crate::names::CHAIN_TO_POD)
                .contains(&"-o slcp+ -j DROP".to_string())
        );
    }

    #[test]
    fn one_jump_per_builtin_chain_and_both_tables_always_present() {
        let rs = node_ruleset(&cluster(), &settings(TunnelFilter::Ipip, true), &Veths).unwrap();
        let jumps: Vec<(Table, &str)> = rs
            .jumps
            .iter()
            .map(|j| (j.table, j.chain.as_str()))
            .collect();
        assert_eq!(
            jumps,
            [
                (Table::Filter, "FORWARD"),
                (Table::Filter, "INPUT"),
                (Table::Nat, "POSTROUTING")
            ]
        );
        rs.validate().unwrap();
        let off = node_ruleset(&cluster(), &settings(TunnelFilter::None, false), &Veths).unwrap();
        assert!(
            off.tables[&Table::Nat].is_empty(),
            "an empty nat table is still synced"
        );
        assert!(off.chain(Table::Filter, CHAIN_TUNNEL_IN).is_none());
    }

    fn nft_settings() -> NodeSettings {
        NodeSettings {
            dataplane: crate::dataplane::DataplaneKind::Nftables,
            ..settings(TunnelFilter::Vxlan { port: 4789 }, true)
        }
    }

    #[test]
    fn the_agents_own_rules_are_the_same_model_on_both_dataplanes() {
        let ipt = node_ruleset(
            &cluster(),
            &settings(TunnelFilter::Vxlan { port: 4789 }, true),
            &Veths,
        )
        .unwrap();
        let nft = node_ruleset(&cluster(), &nft_settings(), &Veths).unwrap();
        for (table, chain) in [
            (Table::Filter, CHAIN_HELD),
            (Table::Filter, CHAIN_TUNNEL_IN),
            (Table::Nat, CHAIN_NAT_OUTGOING),
        ] {
            assert_eq!(ipt.chain(table, chain), nft.chain(table, chain), "{chain}");
        }
        for set in [SET_NODES, SET_POOLS] {
            assert_eq!(ipt.sets[set], nft.sets[set]);
        }
        assert_eq!(ipt.jumps, nft.jumps);
        // The forward chain starts with the same held and tunnel rules on both.
        let head = |rs: &Ruleset| {
            rs.chain(Table::Filter, crate::names::CHAIN_FORWARD)
                .unwrap()
                .rules[..3]
                .to_vec()
        };
        assert_eq!(head(&ipt), head(&nft));
        nft.validate().unwrap();
    }

    #[test]
    fn the_nftables_form_dispatches_through_verdict_maps_and_holds_pods_first() {
        let rs = node_ruleset(&cluster(), &nft_settings(), &Veths).unwrap();
        let to_pod = &rs.maps[crate::compile::flat::MAP_TO_POD];
        // The stand-in policy isolates web: its element goes to a group chain.
        let super::super::MapVerdict::Goto(group) =
            &to_pod.elements[&super::super::MapKeyValue::Iface("slcweb".into())]
        else {
            panic!("{to_pod:?}");
        };
        assert!(rs.chain(Table::Filter, group).is_some());
        assert!(
            rs.chain_comments[group].contains("prod/rejected:broken"),
            "{:?}",
            rs.chain_comments
        );
        let script = crate::render::nft::render(&rs);
        let held = script.find("ct state new jump SLUICE-HELD").unwrap();
        let dispatch = script
            .find("add rule ip sluice SLUICE-FORWARD iifname \"slc*\" goto SLUICE-FWD-POD")
            .unwrap();
        assert!(held < dispatch, "{script}");
        assert!(script.contains("add chain ip sluice NAT-POSTROUTING { type nat hook postrouting priority srcnat; policy accept; }"), "{script}");
        assert!(script.contains("masquerade"));
    }

    #[test]
    fn the_iptables_side_refuses_an_nftables_form_model() {
        let rs = node_ruleset(&cluster(), &nft_settings(), &Veths).unwrap();
        assert!(matches!(
            rs.check_iptables(),
            Err(crate::dataplane::ModelError::NftOnly(_))
        ));
        assert!(matches!(
            crate::dataplane::plan::plan(&rs, &Default::default()),
            Err(crate::dataplane::ModelError::NftOnly(_))
        ));
        let ipt = node_ruleset(&cluster(), &settings(TunnelFilter::Ipip, true), &Veths).unwrap();
        ipt.check_iptables().unwrap();
    }

    #[test]
    #[should_panic(expected = "nftables-only")]
    fn rendering_a_verdict_map_dispatch_as_iptables_is_a_bug_not_text() {
        let rs = node_ruleset(&cluster(), &nft_settings(), &Veths).unwrap();
        let _ = crate::render::iptables::render(&rs);
    }

    #[test]
    fn node_rule_set_is_deterministic() {
        let s = settings(TunnelFilter::Vxlan { port: 4799 }, true);
        assert_eq!(
            node_ruleset(&cluster(), &s, &Veths).unwrap(),
            node_ruleset(&cluster(), &s, &Veths).unwrap()
        );
    }

    #[test]
    fn every_drop_of_a_new_connection_is_logged_right_before_it_on_both_dataplanes() {
        use crate::dataplane::DataplaneKind;
        for kind in [DataplaneKind::Iptables, DataplaneKind::Nftables] {
            let mut s = settings(TunnelFilter::Ipip, true);
            s.dataplane = kind;
            let rs = node_ruleset(&cluster(), &s, &Veths).unwrap();
            let mut drops = 0;
            for chain in rs.tables.values().flat_map(|t| t.values()) {
                for (i, rule) in chain.rules.iter().enumerate() {
                    let by_state = rule.matches.iter().any(|m| matches!(m, Match::CtState(_)));
                    if rule.target != Target::Drop || by_state {
                        continue;
                    }
                    drops += 1;
                    let before = i.checked_sub(1).map(|j| &chain.rules[j]);
                    let logged = before.is_some_and(|b| {
                        matches!(b.target, Target::Log(_))
                            && b.matches[..b.matches.len() - 1] == rule.matches[..]
                            && b.matches.last() == Some(&Match::CtState(vec![CtState::New]))
                    });
                    assert!(logged, "{kind:?} {}: {rule:?} not logged", chain.name);
                }
            }
            assert!(drops > 3, "{kind:?}: only {drops} drops");
            assert!(
                rs.deny_policies
                    .values()
                    .all(|p| p.iter().all(|p| p.contains('/'))),
                "{:?}",
                rs.deny_policies
            );
        }
    }
}
