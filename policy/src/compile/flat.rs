//! The flat compiled form, for the nftables dataplane: a new connection's verdict
//! costs one verdict-map lookup per direction plus one or two set lookups, however
//! many policies select the pod.
//!
//! NetworkPolicy is a union: a packet is allowed in a direction when any policy
//! isolating the pod in that direction allows it. So for each *group* of local pods
//! isolated in a direction by the same set of policies (for ingress also resolving
//! every named port those policies reference to the same numbers), the allowed
//! (peer address, protocol, destination port) tuples are computed once, with
//! interval arithmetic ([`super::intervals`]): ipBlock `except`s subtracted, pod and
//! namespace selectors turned into the selected pods' addresses (adjacent addresses
//! merged), named ports resolved on the destination pod (ingress: the group's own
//! pods, which agree by construction; egress: each peer pod's own number, one point
//! element per pod), "every port of a protocol" as 0-65535. Peers allowed with no
//! port restriction at all (every protocol, ICMP included, where `th dport` means
//! nothing) go into a separate plain address set.
//!
//! ```text
//! SLUICE-FWD-POD:  ct state established,related accept; ct state invalid drop;
//!                  jump SLUICE-FROM-POD; jump SLUICE-TO-POD; accept
//! SLUICE-IN-POD:   ct state established,related return; ct state invalid drop;
//!                  jump SLUICE-FROM-POD          (then back to the host's INPUT)
//! SLUICE-FROM-POD: meta mark set meta mark & ~0x3fff        (class 0)
//!                  ip daddr vmap @SLUICE-M-CLASSES          (address → jump SLUICE-C-<n>)
//!                  iifname . ip saddr vmap @SLUICE-M-FROM-POD
//!                      "<veth>" . <pod ip> : goto SLUICE-GE-<h> | return
//!                  iifname vmap @SLUICE-M-VETHS  "<veth>" : drop   (spoofed source)
//!                  iifname "<nsprefix>*" drop    (unknown pod, egress policy in ns)
//! SLUICE-TO-POD:   meta mark set meta mark & ~0x3fff
//!                  ip saddr vmap @SLUICE-M-CLASSES
//!                  oifname vmap @SLUICE-M-TO-POD "<veth>" : goto SLUICE-GI-<h> | return
//!                  oifname "<nsprefix>*" drop    (unknown pod, ingress policy in ns)
//! SLUICE-GI-<h>:   meta mark & 0x3fff . meta l4proto . th dport @SLUICE-CT-<t> return
//!                  meta mark & 0x3fff @SLUICE-CA-<a> return
//!                  drop
//! SLUICE-C-<n>:    meta mark set meta mark & ~0x3fff | <n>
//! ```
//!
//! The sets hold *address classes* ([`super::classes`]), not addresses: the node's
//! IPv4 addresses partitioned by what its group sets tell apart (per set and port,
//! the union of its peers), each class an id in the mark bits
//! [`MARK_CLASS_MASK`]. One node-wide interval map sends a peer address to the chain
//! that sets its class (egress looks up `ip daddr`), so a group's tuple set is
//! (class . protocol . port), a few elements per peer, and a thousand peer pods are
//! one class-map element each once, not one tuple element each per group. The class
//! bits are cleared before every lookup, so an address in no class is class 0 (which
//! only an "every address" peer allows) and a class an earlier lookup left (the
//! source's egress, before the destination's ingress) never decides. The lookup is
//! made once per direction, in the dispatch chain before the group's verdict (when
//! some group of that direction reads a class), not in each group chain: a commit that
//! adds a `jump`/`goto` element (every new pod's does) makes the kernel validate every
//! path from a base chain, walking a verdict map's elements each time a path meets it,
//! and a lookup in each of 125 group chains (realistic node) made a new pod's
//! 4-element commit walk the 5,032 class elements ~600 times ([`class_lookup`]). A new
//! pod in an existing class is one class-map element; a node with more classes than ids (16,383)
//! falls back to the address form, where the group sets hold addresses themselves
//! (`ip saddr . meta l4proto . th dport @SLUICE-FT-<t>`, `ip saddr @SLUICE-FA-<a>`).
//!
//! ClusterNetworkPolicy (issue 13) wraps that NetworkPolicy part. A pod's group also
//! keys on the Admin (and, when no NetworkPolicy isolates it in the direction, the
//! Baseline) policies selecting it, in evaluation order. A tier is one chain whose
//! rules are painted first-writer-wins in (priority, name, written order) into
//! disjoint boxes ([`BoxSet`]: peer address × protocol × port → Accept/Deny/Pass),
//! so order lives in the sets' contents, not in a walk:
//!
//! ```text
//! SLUICE-GI-<admin h>: ip saddr . meta l4proto . th dport @<Deny> drop
//!                      ip saddr . meta l4proto . th dport @<Accept> return
//!                      ip saddr . meta l4proto . th dport @<Pass> goto <then>
//!                      ip saddr @<Deny, every protocol> drop      (ICMP & co)
//!                      ip saddr @<Accept, every protocol> return
//!                      ip saddr @<Pass, every protocol> goto <then>
//!                      goto <then>
//! <then>:              the NetworkPolicy group chain above; else the Baseline
//!                      chain (same shape, Pass and no match `return`); else return
//! ```
//!
//! A rule on every protocol is painted as 0-65535 of TCP, UDP and SCTP too, so a
//! TCP/UDP/SCTP packet in none of the tuple sets matched no rule, and cannot be in
//! the address sets (painted from the every-protocol rules only, in the same order),
//! which decide the other protocols alone. `Accept` is `return`: allowed in this
//! direction, the other side still judges. A new connection costs at most six set
//! lookups per tier however many ClusterNetworkPolicies there are. The tier sets
//! are named after their chain and are looked up only when not empty, so unlike the
//! NetworkPolicy sets a pod or label change can add or drop a lookup rule there.
//! The tier sets keep the address form (their boxes are painted per group, not
//! shared, and are few at the scales measured); the same classes could key them.
//!
//! Decisions, and why:
//! - A pod that is not isolated in a direction has a `return` element, so its
//!   becoming isolated (or a policy change regrouping it) changes one map element.
//! - A group chain is named after the group's identity (its policies and the
//!   (peer, ports) pairs they allow it, named ports resolved: a new pod that resolves
//!   differently to the same pairs joins the chain, not a copy of it); its sets are named after the (peer, ports) pairs they are built
//!   from, so groups whose policies allow the same pairs share one set (every
//!   namespace's "DNS and everything in env=prod" egress policy, say) instead of
//!   copying thousands of addresses per group. Neither name hashes contents: pods,
//!   labels and peers coming and going change elements only.
//! - A set is looked up only when some pair can put an element in it (a tuple
//!   lookup for pairs with ports, an address lookup for pairs without); which pairs
//!   exist changes only with the policies, and then so does the group.
//! - Each group chain's comment names the policies that isolate it (truncated to what
//!   a comment holds, with the count of the rest), to trace a drop to its policies.
//! - Anti-spoofing, fail-closed unknown pods, conntrack first and the INPUT path
//!   back to the host's rules are the same as the per-policy form's.
//! - Allow records (`sluice.dev/log-allowed`, docs/flows.md): the allowed tuples of
//!   a group's policies are one set, so the kernel cannot tell which policy allowed.
//!   A pod an opt-in covers gets chains of its own (the group key carries a
//!   marker) whose `return`s are `goto SLUICE-ALLOW-LOG-<I|E>` (log new, return),
//!   and `goto` that chain instead of a `return` map element when not isolated; the
//!   agent names the allowing policies and keeps what an opt-in asked for.
//!
//! Why the iptables dataplane does not use this form: ipset `hash:net,port` holds
//! one port per member, so a port range (`endPort`, or every port of a protocol)
//! expands into a member per port per net — 65,536 members for one peer on a whole
//! protocol — and iptables has no verdict map, so the per-pod dispatch chain would
//! stay linear anyway. The gain would be limited to the per-policy walk inside one
//! pod's chain, for sets orders of magnitude larger.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::IpNet;

use super::classes::{MAX_CLASS, TooManyClasses};
use super::incremental::{self, Dependency, Recipe, SetCache};
use super::intervals::{AddrSet, Box3, BoxSet, Painter};
use super::members::{Index, v4, v4_excepts};
use super::{
    CompileError, Dispatch, builtin_jumps, fail_closed_unknown_pods, forward_chains, input_chains,
    local_pod_veths,
};
use crate::dataplane::deny_log::{self, DenyReason, DenyTag};
use crate::dataplane::{
    AddrRange, Chain, ClassRange, InterfaceNames, IpSet, MARK_CLASS_MASK, MapKey, MapKeyValue,
    MapVerdict, Match, PortRange, Rule, Ruleset, SetDirection, SetKind, SetMember, Table, Target,
    VerdictMap,
};
use crate::model::{
    Action, Cluster, ClusterNetworkPolicy, ClusterPeer, ClusterRule, IpBlock, NamespacedName,
    NetworkPolicy, Peer, Peers, Pod, PodPeer, PortMatch, Ports, Protocol, Tier,
};
use crate::names::{self, Direction};

/// `oifname` → the destination pod's ingress verdict.
pub const MAP_TO_POD: &str = "SLUICE-M-TO-POD";
/// `iifname . ip saddr` → the source pod's egress verdict.
pub const MAP_FROM_POD: &str = "SLUICE-M-FROM-POD";
/// `iifname` of every local pod → drop: what the map above did not take is spoofed.
pub const MAP_VETHS: &str = "SLUICE-M-VETHS";
/// Where [`MAP_VETHS`] sends a pod's packets with a source not its own: logged, dropped.
pub const CHAIN_SPOOFED: &str = "SLUICE-SPOOFED";
/// Peer address → `jump` to the chain setting its class ([`super::classes`]).
pub const MAP_CLASSES: &str = "SLUICE-M-CLASSES";

/// How a group's sets name peer addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// By address class, with at most `capacity` classes.
    Classes { capacity: u32 },
    /// By address: what a node with more classes than ids falls back to.
    Addresses,
}

/// Longest chain comment written (nft keeps at most 128 bytes of it).
const MAX_COMMENT: usize = 120;

/// What one group allows (address form): tuples with ports, and peers allowed on
/// every port of every protocol.
#[derive(Debug, Default)]
pub struct Allowed {
    pub tuples: BoxSet<()>,
    pub any: AddrSet,
}

/// The policy dataplane of node `node` in flat form (see the module doc).
pub fn compile(
    cluster: &Cluster,
    node: &str,
    ifaces: &dyn InterfaceNames,
) -> Result<Ruleset, CompileError> {
    compile_with(cluster, node, ifaces, None)
}

/// [`compile`], taking the shared sets' contents from `cache` where a previous
/// compile left them ([`super::incremental`]).
pub(super) fn compile_with(
    cluster: &Cluster,
    node: &str,
    ifaces: &dyn InterfaceNames,
    cache: Option<&mut SetCache>,
) -> Result<Ruleset, CompileError> {
    compile_form(cluster, node, ifaces, cache, MAX_CLASS)
}

/// [`compile_with`] with at most `capacity` address classes, else the address form.
fn compile_form(
    cluster: &Cluster,
    node: &str,
    ifaces: &dyn InterfaceNames,
    mut cache: Option<&mut SetCache>,
    capacity: u32,
) -> Result<Ruleset, CompileError> {
    let form = Form::Classes { capacity };
    match compile_in(cluster, node, ifaces, cache.as_deref_mut(), form)? {
        Ok(ruleset) => Ok(ruleset),
        Err(_) => compile_in(cluster, node, ifaces, cache, Form::Addresses)?
            .map_err(|_| unreachable!("the address form has no classes to run out of")),
    }
}

fn compile_in(
    cluster: &Cluster,
    node: &str,
    ifaces: &dyn InterfaceNames,
    cache: Option<&mut SetCache>,
    form: Form,
) -> Result<Result<Ruleset, TooManyClasses>, CompileError> {
    let mut c = Flat {
        index: Index::new(cluster),
        ruleset: Ruleset::default(),
        named_cache: BTreeMap::new(),
        cache,
        form,
        pending: Vec::new(),
        class_directions: BTreeSet::new(),
    };
    let mut to_pod = VerdictMap {
        name: MAP_TO_POD.into(),
        key: MapKey::OutIface,
        elements: BTreeMap::new(),
    };
    let mut from_pod = VerdictMap {
        name: MAP_FROM_POD.into(),
        key: MapKey::InIfaceSource,
        elements: BTreeMap::new(),
    };
    let mut veths = VerdictMap {
        name: MAP_VETHS.into(),
        key: MapKey::InIface,
        elements: BTreeMap::new(),
    };
    for (pod, veth) in local_pod_veths(cluster, node, ifaces)? {
        let ingress = c.group_verdict(pod, Direction::Ingress);
        let egress = c.group_verdict(pod, Direction::Egress);
        to_pod
            .elements
            .insert(MapKeyValue::Iface(veth.clone()), ingress);
        for ip in pod.ips.iter().filter_map(v4) {
            from_pod
                .elements
                .insert(MapKeyValue::IfaceAddr(veth.clone(), ip), egress.clone());
        }
        veths.elements.insert(
            MapKeyValue::Iface(veth),
            MapVerdict::Goto(CHAIN_SPOOFED.into()),
        );
    }
    let vmap = |m: &str| Rule::new(vec![], Target::Vmap(m.to_string()));
    let class = |direction| {
        if c.class_directions.contains(&direction) {
            class_lookup(direction)
        } else {
            Vec::new()
        }
    };
    let mut dispatch = Dispatch {
        from_pod: [
            class(Direction::Egress),
            vec![vmap(MAP_FROM_POD), vmap(MAP_VETHS)],
        ]
        .concat(),
        to_pod: [class(Direction::Ingress), vec![vmap(MAP_TO_POD)]].concat(),
    };
    fail_closed_unknown_pods(cluster, ifaces, &mut dispatch)?;
    let chains = dispatch
        .into_chains()
        .into_iter()
        .chain(forward_chains(false))
        .chain(input_chains(false));
    for chain in chains {
        c.ruleset.add_chain(Table::Filter, chain);
    }
    if !veths.elements.is_empty() {
        let spoofed = DenyTag::new(DenyReason::Spoofed, Direction::Egress, None);
        c.ruleset.add_chain(
            Table::Filter,
            Chain {
                name: CHAIN_SPOOFED.into(),
                rules: deny_log::deny(vec![], &spoofed).into(),
            },
        );
    }
    for map in [to_pod, from_pod, veths] {
        c.ruleset.maps.insert(map.name.clone(), map);
    }
    if let Err(e) = c.fill_class_sets() {
        return Ok(Err(e));
    }
    c.ruleset.jumps = builtin_jumps();
    Ok(Ok(c.ruleset))
}

/// The peer's class into the mark's class bits, cleared first (an address in no
/// class is class 0, whatever an earlier lookup left): the peer is the source for
/// ingress, the destination for egress. Looked up once per direction in the dispatch
/// chain, before the group's verdict, not in every group chain: on every commit that
/// adds a `jump`/`goto` element (a new pod's does) the kernel validates every path
/// from a base chain, walking the class map's elements wherever a path meets the
/// map; from each group chain that was every class-map element hundreds of times per
/// commit (node-agent/BENCH.md, "Where a new pod's 45 ms went").
fn class_lookup(direction: Direction) -> Vec<Rule> {
    let direction = match direction {
        Direction::Ingress => SetDirection::Src,
        Direction::Egress => SetDirection::Dst,
    };
    vec![
        Rule::new(
            vec![],
            Target::SetMark {
                value: 0,
                mask: MARK_CLASS_MASK,
            },
        ),
        Rule::new(
            vec![],
            Target::AddrVmap {
                map: MAP_CLASSES.into(),
                direction,
            },
        ),
    ]
}

/// The group key marking chains whose allows are logged (no policy has this
/// cluster-scoped name: a ClusterNetworkPolicy key is `<tier>:<name>`).
const LOG_ALLOWED_KEY: &str = "log-allowed";

/// `keys`, with the log marker when there is one.
fn with_log(keys: &[NamespacedName], log: &Option<NamespacedName>) -> Vec<NamespacedName> {
    keys.iter().cloned().chain(log.clone()).collect()
}

/// Where a tier chain sends what it allows (`Accept`) and what it leaves to what
/// follows (`Pass`, no match): `return`, the allow log chain, or the next part.
struct TierExits {
    accept: Target,
    on_pass: Target,
}

/// The set a tier rule's one match looks up.
fn set_name(m: &Match) -> &str {
    match m {
        Match::Tuple { set, .. } | Match::Set { name: set, .. } => set,
        _ => "",
    }
}

/// One tier's decisions for one group: disjoint (address × protocol × port) boxes,
/// and address ranges decided by rules on every protocol.
type TierDecisions = (Vec<(Box3, Decision)>, Vec<(u32, u32, Decision)>);

/// What a tier decides at a point: the action, and for `Deny` the policy whose rule
/// denied, so each denying policy gets its own sets and its own log rule (a record
/// names the ClusterNetworkPolicy that dropped the connection). `Accept` and `Pass`
/// carry no name, so their points still merge across policies.
type Decision = (Action, Option<String>);

struct Flat<'a> {
    index: Index<'a>,
    ruleset: Ruleset,
    /// Egress named ports: (name, protocol) → every pod's (address, port).
    named_cache: BTreeMap<(String, Protocol), Vec<(Ipv4Addr, u16)>>,
    /// Shared sets' contents from earlier compiles (an incremental compile).
    cache: Option<&'a mut SetCache>,
    form: Form,
    /// Class form: the sets declared by the group walk, filled once every group is
    /// known ([`Flat::fill_class_sets`]): (name, every protocol?, pairs).
    pending: Vec<PendingSet<'a>>,
    /// Class form: the directions some group chain reads the peer's class in, so
    /// the dispatch chain of that direction looks it up ([`class_lookup`]).
    class_directions: BTreeSet<Direction>,
}

/// A class set waiting for the node's classes: (name, every protocol?, pairs).
type PendingSet<'a> = (String, bool, Vec<(PeerRef<'a>, PortRef)>);

/// The named ports (name, protocol) that `policies` reference in `direction`.
fn referenced_names(
    policies: &[&NetworkPolicy],
    direction: Direction,
) -> BTreeSet<(String, Protocol)> {
    named_ports_in(
        policies
            .iter()
            .flat_map(|p| rules_of(p, direction))
            .map(|r| &r.ports),
    )
}

/// The named ports (name, protocol) among `ports`.
fn named_ports_in<'a>(ports: impl Iterator<Item = &'a Ports>) -> BTreeSet<(String, Protocol)> {
    let mut out = BTreeSet::new();
    for list in ports.filter_map(|p| match p {
        Ports::Listed(list) => Some(list),
        Ports::Any => None,
    }) {
        for port in list {
            if let PortMatch::Named(name) = &port.port {
                out.insert((name.clone(), port.protocol));
            }
        }
    }
    out
}

fn cluster_rules_of(policy: &ClusterNetworkPolicy, direction: Direction) -> &[ClusterRule] {
    match direction {
        Direction::Ingress => &policy.ingress,
        Direction::Egress => &policy.egress,
    }
}

/// The named ports (name, protocol) that ClusterNetworkPolicies reference in
/// `direction`.
fn cluster_referenced_names<'p>(
    policies: impl Iterator<Item = &'p ClusterNetworkPolicy>,
    direction: Direction,
) -> BTreeSet<(String, Protocol)> {
    named_ports_in(
        policies
            .flat_map(|p| cluster_rules_of(p, direction))
            .map(|r| &r.ports),
    )
}

/// A tier's policies as a group identity: cluster-scoped keys `<tier>:<name>`, in
/// evaluation order (which is part of what they mean).
fn tier_keys(tier: Tier, policies: &[&ClusterNetworkPolicy]) -> Vec<NamespacedName> {
    policies
        .iter()
        .map(|p| NamespacedName::cluster_scoped(format!("{}:{}", tier.as_str(), p.name)))
        .collect()
}

fn rules_of(policy: &NetworkPolicy, direction: Direction) -> &[crate::model::Rule] {
    match direction {
        Direction::Ingress => &policy.ingress,
        Direction::Egress => &policy.egress,
    }
}

/// One (peer, ports) pair a group's policies allow: the unit the sets are built from
/// and named after.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PeerRef<'p> {
    Any,
    Pods(&'p str, &'p PodPeer),
    Block(&'p IpBlock),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PortRef {
    /// Every port of every protocol.
    Any,
    Range(Protocol, u16, u16),
    /// Egress: resolved on each peer pod.
    Named(Protocol, String),
}

impl PeerRef<'_> {
    /// The peer's identity: the name its ipset has on iptables, a hash of its
    /// canonical encoding.
    fn key(&self) -> String {
        match self {
            PeerRef::Any => "any".into(),
            PeerRef::Pods(ns, pp) => names::pod_peer_set(ns, pp),
            PeerRef::Block(b) => names::ip_block_set(b),
        }
    }
}

impl PortRef {
    fn key(&self) -> String {
        match self {
            PortRef::Any => "any".into(),
            PortRef::Range(p, a, b) => format!("{}:{a}-{b}", p.as_str()),
            PortRef::Named(p, n) => format!("{}:name:{n}", p.as_str()),
        }
    }
}

impl<'a> Flat<'a> {
    /// The map verdict of `pod` in `direction`: `return` when no policy isolates it,
    /// else a goto to its group's chain (built on first use). Through the cache,
    /// the verdict an earlier compile made for the pod is taken while nothing it
    /// depends on changed ([`SetCache::group_verdict`]) and this compile already
    /// built the chain it names; else it is made, as for the first pod of a group.
    fn group_verdict(&mut self, pod: &'a Pod, direction: Direction) -> MapVerdict {
        let Some(cache) = self.cache.as_deref_mut() else {
            return self.make_group_verdict(pod, direction);
        };
        let key = pod.key();
        if let Some(verdict) = cache.group_verdict(&key, direction) {
            let built = match &verdict {
                MapVerdict::Goto(chain) | MapVerdict::Jump(chain) => {
                    self.ruleset.chain(Table::Filter, chain).is_some()
                }
                _ => true,
            };
            if built {
                return verdict;
            }
        }
        let verdict = self.make_group_verdict(pod, direction);
        if let Some(cache) = self.cache.as_deref_mut() {
            cache.keep_group_verdict(&key, direction, verdict.clone());
        }
        verdict
    }

    /// [`Flat::group_verdict`], made from the pod's policies.
    fn make_group_verdict(&mut self, pod: &'a Pod, direction: Direction) -> MapVerdict {
        let selected = incremental::selected(&mut self.cache, self.index.cluster, pod);
        let policies = selected.policies(direction);
        let admin = selected.tier(Tier::Admin, direction);
        // Baseline decides only for pods no NetworkPolicy isolates in this direction.
        let baseline = if policies.is_empty() {
            selected.tier(Tier::Baseline, direction)
        } else {
            Vec::new()
        };
        // An opted-in pod's allows go through the direction's allow log chain in
        // place of `return`, in chains of its own (the marker keeps their names
        // apart from the same policies' unlogged chains); nobody else's path changes.
        let allowed = self.allowed_target(pod, &selected, direction);
        let log_key =
            (allowed != Target::Return).then(|| NamespacedName::cluster_scoped(LOG_ALLOWED_KEY));
        if policies.is_empty() && admin.is_empty() && baseline.is_empty() {
            return match allowed {
                Target::Goto(chain) => MapVerdict::Goto(chain),
                _ => MapVerdict::Return,
            };
        }
        let named: Vec<(String, Protocol, Vec<u16>)> = match direction {
            Direction::Ingress => {
                let mut refs = referenced_names(&policies, direction);
                refs.extend(cluster_referenced_names(
                    admin.iter().chain(&baseline).copied(),
                    direction,
                ));
                refs.into_iter()
                    .map(|(name, proto)| {
                        let ports = pod.resolve_named_port(&name, proto);
                        (name, proto, ports)
                    })
                    .collect()
            }
            Direction::Egress => Vec::new(),
        };
        // The part after the Admin tier: the NetworkPolicy group chain (as without
        // ClusterNetworkPolicy), else the Baseline chain, else allowed.
        let tail = if !policies.is_empty() {
            let keys: Vec<NamespacedName> = policies.iter().map(|p| p.key()).collect();
            // Named after what the chain holds, not after how the pod resolves named
            // ports: a pod whose resolution yields the same pairs (a port named
            // `http` it does not declare, next to the number 8080 it is also allowed)
            // joins the existing chain, so adding it changes elements only.
            let pairs = contributions(&policies, direction, pod);
            let chain = names::policy_group_chain(
                direction,
                &with_log(&keys, &log_key),
                &pairs_key(&pairs),
            );
            if self.ruleset.chain(Table::Filter, &chain).is_none() {
                self.add_group(&chain, direction, &keys, &pairs, &allowed);
            }
            Some(chain)
        } else if !baseline.is_empty() {
            let keys = with_log(&tier_keys(Tier::Baseline, &baseline), &log_key);
            let chain = names::group_chain(direction, &keys, &named);
            if self.ruleset.chain(Table::Filter, &chain).is_none() {
                let exits = TierExits {
                    accept: allowed.clone(),
                    on_pass: allowed.clone(),
                };
                self.add_tier(&chain, Tier::Baseline, direction, &baseline, pod, &exits);
            }
            Some(chain)
        } else {
            None
        };
        if admin.is_empty() {
            return match tail {
                Some(chain) => MapVerdict::Goto(chain),
                None => MapVerdict::Return,
            };
        }
        let mut keys = with_log(&tier_keys(Tier::Admin, &admin), &log_key);
        if let Some(tail) = &tail {
            keys.push(NamespacedName::cluster_scoped(format!("then:{tail}")));
        }
        let chain = names::group_chain(direction, &keys, &named);
        if self.ruleset.chain(Table::Filter, &chain).is_none() {
            let exits = TierExits {
                on_pass: tail.map(Target::Goto).unwrap_or_else(|| allowed.clone()),
                accept: allowed,
            };
            self.add_tier(&chain, Tier::Admin, direction, &admin, pod, &exits);
        }
        MapVerdict::Goto(chain)
    }

    /// How `pod`'s verdict of `direction` lets an allowed connection go: `return`,
    /// or, when an opt-in asks for allow records of it, a goto to the direction's
    /// allow log chain (added on first use), which logs and returns.
    fn allowed_target(
        &mut self,
        pod: &Pod,
        selected: &incremental::Selected<'_>,
        direction: Direction,
    ) -> Target {
        if !selected.logs_allowed(self.index.cluster, pod, direction) {
            return Target::Return;
        }
        let name = names::allow_log_chain(direction);
        if self.ruleset.chain(Table::Filter, name).is_none() {
            self.ruleset
                .add_chain(Table::Filter, deny_log::allow_log_chain(direction));
        }
        Target::Goto(name.to_string())
    }

    /// A chain deciding one tier of ClusterNetworkPolicy for one group (see
    /// [`tier_decisions`]): `Deny` drops, `Accept` returns (allowed in this
    /// direction), `Pass` or no match goes on to `then` (Admin: the NetworkPolicy or
    /// Baseline part; Baseline: nothing, allowed). At most six set lookups, whatever
    /// the number of policies and rules.
    fn add_tier(
        &mut self,
        chain: &str,
        tier: Tier,
        direction: Direction,
        policies: &[&ClusterNetworkPolicy],
        pod: &Pod,
        exits: &TierExits,
    ) {
        let (tuples, any) = self.tier_decisions(policies, direction, pod);
        let set_dir = match direction {
            Direction::Ingress => SetDirection::Src,
            Direction::Egress => SetDirection::Dst,
        };
        let on_pass = exits.on_pass.clone();
        let mut rules = Vec::new();
        // TCP/UDP/SCTP: every rule is in the tuple boxes (a rule on every protocol as
        // 0-65535 of each), so a packet in none of them matched no rule and the
        // address sets below, built from the every-protocol rules only, cannot
        // contain it. Other protocols (ICMP) never hit a tuple box and are decided by
        // those address sets alone, painted in the same order.
        let deny_policies: BTreeSet<String> = tuples
            .iter()
            .map(|(_, d)| d)
            .chain(any.iter().map(|(_, _, d)| d))
            .filter_map(|d| d.1.clone())
            .collect();
        let deny = self.tier_sets(&tuples, &any, &format!("{chain};Deny"), set_dir, |d| {
            d.0 == Action::Deny
        });
        // Denied packets are logged under the policy that denied them. With one
        // denying policy the tier's Deny sets say which; with several, a packet in
        // the tier's Deny sets goes to a chain that asks each policy's own sets, so
        // only denied packets pay a lookup per denying policy and the tier chain
        // keeps its fixed number of lookups.
        let deny_target = if deny_policies.len() > 1 {
            let deny_chain = names::tier_deny_chain(chain);
            let mut deny_rules = Vec::new();
            for p in &deny_policies {
                let own =
                    self.tier_sets(&tuples, &any, &format!("{chain};Deny;{p}"), set_dir, |d| {
                        d.0 == Action::Deny && d.1.as_deref() == Some(p.as_str())
                    });
                for m in own {
                    let tag = self.deny_tag(direction, set_name(&m), [p]);
                    deny_rules.extend(deny_log::deny(vec![m], &tag));
                }
            }
            // Not reached (the tier's Deny sets are the union of the policies'), but
            // a drop is never unlogged.
            let tag = self.deny_tag(direction, &deny_chain, &deny_policies);
            deny_rules.extend(deny_log::deny(vec![], &tag));
            self.ruleset.add_chain(
                Table::Filter,
                Chain {
                    name: deny_chain.clone(),
                    rules: deny_rules,
                },
            );
            Some(Target::Goto(deny_chain))
        } else {
            None
        };
        let mut tuple_rules = Vec::new();
        let mut any_rules = Vec::new();
        for m in deny {
            let out = if matches!(m, Match::Tuple { .. }) {
                &mut tuple_rules
            } else {
                &mut any_rules
            };
            match &deny_target {
                Some(t) => out.push(Rule::new(vec![m], t.clone())),
                None => {
                    let tag = self.deny_tag(direction, set_name(&m), &deny_policies);
                    out.extend(deny_log::deny(vec![m], &tag));
                }
            }
        }
        for (action, target) in [
            (Action::Accept, exits.accept.clone()),
            (Action::Pass, on_pass.clone()),
        ] {
            let key = format!("{chain};{}", action.as_str());
            for m in self.tier_sets(&tuples, &any, &key, set_dir, |d| d.0 == action) {
                let out = if matches!(m, Match::Tuple { .. }) {
                    &mut tuple_rules
                } else {
                    &mut any_rules
                };
                out.push(Rule::new(vec![m], target.clone()));
            }
        }
        rules.extend(tuple_rules);
        rules.extend(any_rules);
        // Lookups whose verdict is the fall-through's anyway (a Pass set last, say)
        // decide nothing: one lookup fewer per packet.
        while rules.last().is_some_and(|r| r.target == on_pass) {
            for m in rules.pop().map(|r| r.matches).unwrap_or_default() {
                if let Match::Tuple { set: name, .. } | Match::Set { name, .. } = m {
                    self.ruleset.sets.remove(&name);
                }
            }
        }
        rules.push(Rule::new(vec![], on_pass));
        self.ruleset.add_chain(
            Table::Filter,
            Chain {
                name: chain.to_string(),
                rules,
            },
        );
        let keys: Vec<NamespacedName> = policies
            .iter()
            .map(|p| NamespacedName::new(tier.as_str(), &p.name))
            .collect();
        self.ruleset
            .chain_comments
            .insert(chain.to_string(), group_comment(direction, &keys));
    }

    /// The set matches of one tier decision: a tuple set of the boxes and an
    /// address set of the every-protocol ranges whose decision passes `keep`, named
    /// from `key`, each only when it has members.
    fn tier_sets(
        &mut self,
        tuples: &[(Box3, Decision)],
        any: &[(u32, u32, Decision)],
        key: &str,
        set_dir: SetDirection,
        keep: impl Fn(&Decision) -> bool,
    ) -> Vec<Match> {
        let mut out = Vec::new();
        let members: BTreeSet<SetMember> = tuples
            .iter()
            .filter(|(_, d)| keep(d))
            .map(|(b, _)| SetMember::Tuple {
                addrs: b.addrs,
                protocol: b.protocol,
                ports: PortRange {
                    start: b.ports.start,
                    end: b.ports.end,
                },
            })
            .collect();
        if !members.is_empty() {
            let name = names::flat_set(false, key);
            self.ruleset.sets.insert(
                name.clone(),
                IpSet {
                    name: name.clone(),
                    kind: SetKind::AddrProtoPortIntervals,
                    members,
                },
            );
            out.push(Match::Tuple {
                set: name,
                direction: set_dir,
            });
        }
        let members: BTreeSet<SetMember> = any
            .iter()
            .filter(|(_, _, d)| keep(d))
            .map(|(s, e, _)| {
                SetMember::Range(AddrRange {
                    start: Ipv4Addr::from(*s),
                    end: Ipv4Addr::from(*e),
                })
            })
            .collect();
        if !members.is_empty() {
            let name = names::flat_set(true, key);
            self.ruleset.sets.insert(
                name.clone(),
                IpSet {
                    name: name.clone(),
                    kind: SetKind::AddrIntervals,
                    members,
                },
            );
            out.push(Match::Set {
                name,
                direction: set_dir,
                negated: false,
            });
        }
        out
    }

    /// The log tag of a ClusterNetworkPolicy Deny under `id`, and what it names.
    fn deny_tag<'p>(
        &mut self,
        direction: Direction,
        id: &str,
        policies: impl IntoIterator<Item = &'p String>,
    ) -> DenyTag {
        self.ruleset.deny_policies.insert(
            id.to_string(),
            policies
                .into_iter()
                .map(|p| format!("ClusterNetworkPolicy/{p}"))
                .collect(),
        );
        DenyTag::new(DenyReason::DeniedByRule, direction, Some(id.to_string()))
    }

    /// One tier's rules for one group, in evaluation order (priority, name, written
    /// order), painted first-writer-wins: each point of (peer address × protocol ×
    /// port) keeps the action of the first rule that matches it, so the order lives
    /// in the contents and a packet needs one lookup per action. Returns the
    /// disjoint tuple boxes (TCP/UDP/SCTP) and the address ranges decided by rules
    /// on every protocol (for the others).
    fn tier_decisions(
        &mut self,
        policies: &[&ClusterNetworkPolicy],
        direction: Direction,
        pod: &Pod,
    ) -> TierDecisions {
        let mut tuples: BoxSet<Decision> = BoxSet::default();
        let mut any: Painter<Decision> = Painter::default();
        for policy in policies {
            for rule in cluster_rules_of(policy, direction) {
                let mut region = AddrSet::default();
                for peer in &rule.peers {
                    region.insert_set(&self.cluster_peer_region(peer));
                }
                if region.is_empty() {
                    continue;
                }
                let action: Decision = match rule.action {
                    Action::Deny => (Action::Deny, Some(policy.name.clone())),
                    a => (a, None),
                };
                let action = &action;
                match &rule.ports {
                    Ports::Any => {
                        for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                            tuples.insert(&region, proto, 0, u16::MAX, action.clone());
                        }
                        for (s, e) in region.bounds() {
                            any.paint(s, e, action);
                        }
                    }
                    Ports::Listed(list) => {
                        for p in list {
                            match &p.port {
                                PortMatch::All => {
                                    tuples.insert(&region, p.protocol, 0, u16::MAX, action.clone())
                                }
                                PortMatch::Numbers { start, end } => {
                                    tuples.insert(&region, p.protocol, *start, *end, action.clone())
                                }
                                PortMatch::Named(name) => match direction {
                                    Direction::Ingress => {
                                        for n in pod.resolve_named_port(name, p.protocol) {
                                            tuples.insert(
                                                &region,
                                                p.protocol,
                                                n,
                                                n,
                                                action.clone(),
                                            );
                                        }
                                    }
                                    Direction::Egress => {
                                        for (ip, port) in self.named_ports(name, p.protocol) {
                                            if region.contains(ip) {
                                                let mut point = AddrSet::default();
                                                point.insert(u32::from(ip), u32::from(ip));
                                                tuples.insert(
                                                    &point,
                                                    p.protocol,
                                                    port,
                                                    port,
                                                    action.clone(),
                                                );
                                            }
                                        }
                                    }
                                },
                            }
                        }
                    }
                }
            }
        }
        (tuples.boxes(), any.merged())
    }

    /// The IPv4 addresses a ClusterNetworkPolicy peer names ([`Index`]'s reading).
    fn cluster_peer_region(&self, peer: &ClusterPeer) -> AddrSet {
        let (ips, nets) = self.index.cluster_peer_addresses(peer);
        let mut out = AddrSet::default();
        for ip in ips {
            out.insert(u32::from(ip), u32::from(ip));
        }
        for net in nets {
            out.insert_set(&AddrSet::of_net(net));
        }
        out
    }

    /// What a list of (peer, ports) pairs allows.
    fn allowed(&mut self, pairs: &[(PeerRef<'_>, PortRef)]) -> Allowed {
        let mut out = Allowed::default();
        let mut regions: BTreeMap<&PeerRef<'_>, AddrSet> = BTreeMap::new();
        for (peer, port) in pairs {
            if !regions.contains_key(peer) {
                let r = self.peer_region(peer);
                regions.insert(peer, r);
            }
            let region = &regions[peer];
            if region.is_empty() {
                continue;
            }
            match port {
                PortRef::Any => out.any.insert_set(region),
                PortRef::Range(proto, a, b) => out.tuples.insert(region, *proto, *a, *b, ()),
                PortRef::Named(proto, name) => {
                    for (ip, port) in self.named_ports(name, *proto) {
                        if region.contains(ip) {
                            let mut point = AddrSet::default();
                            point.insert(u32::from(ip), u32::from(ip));
                            out.tuples.insert(&point, *proto, port, port, ());
                        }
                    }
                }
            }
        }
        out
    }

    fn named_ports(&mut self, name: &str, protocol: Protocol) -> Vec<(Ipv4Addr, u16)> {
        let index = &self.index;
        self.named_cache
            .entry((name.to_string(), protocol))
            .or_insert_with(|| {
                index
                    .named_port_members(name, protocol)
                    .into_iter()
                    .filter_map(|m| match m {
                        SetMember::IpPort { ip, port, .. } => Some((ip, port)),
                        _ => None,
                    })
                    .collect()
            })
            .clone()
    }

    /// The addresses a peer names (IPv4 only).
    fn peer_region(&self, peer: &PeerRef<'_>) -> AddrSet {
        match peer {
            PeerRef::Any => AddrSet::all(),
            PeerRef::Pods(ns, pp) => {
                let mut out = AddrSet::default();
                for m in self.index.pod_peer_members(ns, pp) {
                    if let SetMember::Ip(ip) = m {
                        out.insert(u32::from(ip), u32::from(ip));
                    }
                }
                out
            }
            PeerRef::Block(block) => {
                let IpNet::V4(cidr) = block.cidr else {
                    return AddrSet::default(); // an IPv6 block names no IPv4 packet
                };
                let mut region = AddrSet::of_net(cidr);
                for e in v4_excepts(block) {
                    let (a, b) = super::intervals::net_bounds(e);
                    region.subtract(a, b);
                }
                region
            }
        }
    }

    /// A set named after the pairs it is built from, created (and filled) on first
    /// use: groups whose policies allow the same pairs share it, and its content
    /// changes only by elements when pods and labels change.
    fn shared_set(&mut self, any: bool, pairs: &[(PeerRef<'a>, PortRef)]) -> String {
        let key = pairs_key(pairs);
        if let Form::Classes { .. } = self.form {
            let name = names::class_set(any, &key);
            if !self.ruleset.sets.contains_key(&name) {
                let kind = if any {
                    SetKind::ClassIntervals
                } else {
                    SetKind::ClassProtoPortIntervals
                };
                self.ruleset.sets.insert(
                    name.clone(),
                    IpSet {
                        name: name.clone(),
                        kind,
                        members: BTreeSet::new(),
                    },
                );
                self.pending.push((name.clone(), any, pairs.to_vec()));
            }
            return name;
        }
        let name = names::flat_set(any, &key);
        if !self.ruleset.sets.contains_key(&name) {
            let kind = if any {
                SetKind::AddrIntervals
            } else {
                SetKind::AddrProtoPortIntervals
            };
            let mut cache = self.cache.take();
            let members = incremental::through(
                &mut cache,
                || (Recipe::Flat { any, pairs: key }, dependencies(pairs)),
                || self.shared_members(any, pairs),
            );
            self.cache = cache;
            self.ruleset.sets.insert(
                name.clone(),
                IpSet {
                    name: name.clone(),
                    kind,
                    members,
                },
            );
        }
        name
    }

    /// What a shared set of `pairs` holds (see [`Flat::shared_set`]).
    fn shared_members(
        &mut self,
        any: bool,
        pairs: &[(PeerRef<'_>, PortRef)],
    ) -> BTreeSet<SetMember> {
        let allowed = self.allowed(pairs);
        if any {
            allowed.any.ranges().map(SetMember::Range).collect()
        } else {
            allowed
                .tuples
                .boxes()
                .into_iter()
                .map(|(b, ())| SetMember::Tuple {
                    addrs: b.addrs,
                    protocol: b.protocol,
                    ports: PortRange {
                        start: b.ports.start,
                        end: b.ports.end,
                    },
                })
                .collect()
        }
    }

    fn add_group(
        &mut self,
        chain: &str,
        direction: Direction,
        policies: &[NamespacedName],
        pairs: &[(PeerRef<'a>, PortRef)],
        allowed: &Target,
    ) {
        let set_dir = match direction {
            Direction::Ingress => SetDirection::Src,
            Direction::Egress => SetDirection::Dst,
        };
        let (any, tuples): (Vec<_>, Vec<_>) = pairs
            .iter()
            .cloned()
            .partition(|(_, port)| *port == PortRef::Any);
        let classes = matches!(self.form, Form::Classes { .. });
        let mut rules = Vec::new();
        if classes && !pairs.is_empty() {
            // The dispatch chain put the peer's class in the mark ([`class_lookup`]).
            self.class_directions.insert(direction);
        }
        // A lookup only where some pair can ever put an element in the set: which
        // pairs a group has changes only with its policies, and so does its name.
        if !tuples.is_empty() {
            let set = self.shared_set(false, &tuples);
            let lookup = if classes {
                Match::ClassTuple { set }
            } else {
                Match::Tuple {
                    set,
                    direction: set_dir,
                }
            };
            rules.push(Rule::new(vec![lookup], allowed.clone()));
        }
        if !any.is_empty() {
            let set = self.shared_set(true, &any);
            let lookup = if classes {
                Match::ClassSet { set }
            } else {
                Match::Set {
                    name: set,
                    direction: set_dir,
                    negated: false,
                }
            };
            rules.push(Rule::new(vec![lookup], allowed.clone()));
        }
        let tag = DenyTag::new(DenyReason::Isolated, direction, Some(chain.to_string()));
        rules.extend(deny_log::deny(vec![], &tag));
        self.ruleset.deny_policies.insert(
            chain.to_string(),
            policies.iter().map(ToString::to_string).collect(),
        );
        self.ruleset.add_chain(
            Table::Filter,
            Chain {
                name: chain.to_string(),
                rules,
            },
        );
        self.ruleset
            .chain_comments
            .insert(chain.to_string(), group_comment(direction, policies));
    }
}

impl Flat<'_> {
    /// Class form, after the group walk: the node's classes from every region the
    /// declared sets' pairs name, then the sets' elements (classes × ports), the
    /// class map and one chain per class. Nothing when no group needs classes.
    /// Taken whole from the previous compile when it declared the same sets and
    /// every region is the same cache entry ([`incremental::ClassMemo`]).
    fn fill_class_sets(&mut self) -> Result<(), TooManyClasses> {
        let Form::Classes { capacity } = self.form else {
            return Ok(());
        };
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let key = (
            pending.iter().map(|(name, _, _)| name.clone()).collect(),
            capacity,
        );
        if let Some(cache) = self.cache.as_deref_mut() {
            let recipes = region_recipes(&pending);
            let serials: Option<Vec<u64>> = recipes.iter().map(|r| cache.serial(r)).collect();
            if let Some(memo) =
                serials.and_then(|s| cache.class_memo(&key).filter(|m| m.serials == s).cloned())
            {
                cache.class_memo_reused(recipes.len());
                self.put_classes(memo.members, memo.map, &memo.ids);
                return Ok(());
            }
        }
        // Address regions: every peer but "any", and per egress named port one
        // region per number it resolves to (the pods declaring it with that number).
        // Every recipe is asked for (two peers of one key, a namespaceSelector peer
        // written in two namespaces, fill one region), so the memo's serials are
        // those of every region entry, in [`region_recipes`]' order.
        let mut regions: BTreeMap<String, Arc<AddrSet>> = BTreeMap::new();
        let mut named: BTreeMap<(Protocol, String), BTreeMap<u16, String>> = BTreeMap::new();
        let mut serials: Vec<u64> = Vec::new();
        let mut asked = RecipeSeen::default();
        for (_, _, pairs) in &pending {
            for (peer, port) in pairs {
                if let PeerRef::Pods(ns, pp) = peer {
                    if asked.first_pod_peer(ns, pp).is_some() {
                        let (region, serial) = self.cached_peer_region(peer);
                        serials.extend(serial);
                        regions.entry(peer.key()).or_insert(region);
                    }
                } else if *peer != PeerRef::Any && !regions.contains_key(&peer.key()) {
                    let (region, _) = self.cached_peer_region(peer);
                    regions.insert(peer.key(), region);
                }
                if let PortRef::Named(proto, name) = port
                    && !named.contains_key(&(*proto, name.clone()))
                {
                    let (by_number, serial) = self.cached_named_ports(name, *proto);
                    serials.extend(serial);
                    let mut numbers: BTreeMap<u16, String> = BTreeMap::new();
                    for (number, addrs) in by_number.iter() {
                        let key = format!("named;{};{name};{number}", proto.as_str());
                        regions.insert(key.clone(), addrs.clone());
                        numbers.insert(*number, key);
                    }
                    named.insert((*proto, name.clone()), numbers);
                }
            }
        }
        // What each set tells apart: per set and ports (and named port number), the
        // union of its peers' regions. An "any" peer there means every class, 0
        // included, whatever classes come and go: no union needed.
        let mut unions: BTreeMap<String, super::classes::Union> = BTreeMap::new();
        let mut every: BTreeSet<String> = BTreeSet::new();
        for (name, _, pairs) in &pending {
            for (peer, port) in pairs {
                let key = format!("{name} {}", port.key());
                match port {
                    PortRef::Any | PortRef::Range(..) => match peer {
                        PeerRef::Any => {
                            every.insert(key);
                        }
                        p => unions.entry(key).or_default().push(vec![p.key()]),
                    },
                    PortRef::Named(proto, port_name) => {
                        for (number, region) in &named[&(*proto, port_name.clone())] {
                            let mut term = vec![region.clone()];
                            if *peer != PeerRef::Any {
                                term.push(peer.key());
                            }
                            unions
                                .entry(format!("{key} {number}"))
                                .or_default()
                                .push(term);
                        }
                    }
                }
            }
        }
        let classes = super::classes::partition(&regions, &unions, capacity)?;
        let class_set = |key: &str| {
            let mut out = AddrSet::default();
            if every.contains(key) {
                out.insert(0, MAX_CLASS);
            }
            for id in classes.of(key) {
                out.insert(id, id);
            }
            out
        };
        let mut filled: Vec<(String, BTreeSet<SetMember>)> = Vec::new();
        for (name, any, pairs) in pending {
            // The class axis rides on the box set's address axis: the same interval
            // arithmetic, disjoint and canonical.
            let mut tuples: BoxSet<()> = BoxSet::default();
            let mut all = AddrSet::default();
            let ports: BTreeSet<&PortRef> = pairs.iter().map(|(_, port)| port).collect();
            for port in ports {
                let key = format!("{name} {}", port.key());
                match port {
                    PortRef::Any => all.insert_set(&class_set(&key)),
                    PortRef::Range(proto, a, b) => {
                        tuples.insert(&class_set(&key), *proto, *a, *b, ())
                    }
                    PortRef::Named(proto, port_name) => {
                        for number in named[&(*proto, port_name.clone())].keys() {
                            let ids = class_set(&format!("{key} {number}"));
                            tuples.insert(&ids, *proto, *number, *number, ());
                        }
                    }
                }
            }
            let members: BTreeSet<SetMember> = if any {
                all.bounds()
                    .map(|(start, end)| SetMember::Classes(ClassRange { start, end }))
                    .collect()
            } else {
                tuples
                    .boxes()
                    .into_iter()
                    .map(|(b, ())| SetMember::ClassTuple {
                        classes: ClassRange {
                            start: u32::from(b.addrs.start),
                            end: u32::from(b.addrs.end),
                        },
                        protocol: b.protocol,
                        ports: PortRange {
                            start: b.ports.start,
                            end: b.ports.end,
                        },
                    })
                    .collect()
            };
            filled.push((name, members));
        }
        let mut map = VerdictMap {
            name: MAP_CLASSES.into(),
            key: MapKey::Addr,
            elements: BTreeMap::new(),
        };
        for &(start, end, class) in &classes.ranges {
            map.elements.insert(
                MapKeyValue::Range(AddrRange {
                    start: Ipv4Addr::from(start),
                    end: Ipv4Addr::from(end),
                }),
                MapVerdict::Jump(names::class_chain(class)),
            );
        }
        let ids: Vec<u32> = classes.ids().into_iter().collect();
        if let Some(cache) = self.cache.as_deref_mut() {
            cache.keep_class_memo(incremental::ClassMemo {
                key,
                serials,
                members: filled.clone(),
                map: map.clone(),
                ids: ids.clone(),
            });
        }
        self.put_classes(filled, map, &ids);
        Ok(())
    }

    /// A peer's region, through the cache: a pod peer's addresses are the
    /// iptables form's hash:ip set, under the same recipe, and the region built
    /// from them is kept beside the entry ([`incremental::Region`]). With the cache
    /// entry's serial, for a pod peer through a cache.
    fn cached_peer_region(&mut self, peer: &PeerRef<'_>) -> (Arc<AddrSet>, Option<u64>) {
        let PeerRef::Pods(ns, pp) = peer else {
            return (Arc::new(self.peer_region(peer)), None);
        };
        if let Some(cache) = self.cache.as_deref_mut()
            && let Some((incremental::Region::Addrs(region), serial)) =
                cache.region(&pod_peer_recipe(ns, pp))
        {
            return (region, Some(serial));
        }
        let index = &self.index;
        let (members, serial) = incremental::through_serial(
            &mut self.cache,
            || {
                let dep = Dependency::PodPeer {
                    namespace: ns.to_string(),
                    peer: (*pp).clone(),
                };
                (pod_peer_recipe(ns, pp), vec![dep])
            },
            || index.pod_peer_members(ns, pp),
        );
        let mut out = AddrSet::default();
        for m in members {
            if let SetMember::Ip(ip) = m {
                out.insert(u32::from(ip), u32::from(ip));
            }
        }
        let out = Arc::new(out);
        if let (Some(cache), Some(serial)) = (self.cache.as_deref_mut(), serial) {
            cache.keep_region(serial, incremental::Region::Addrs(out.clone()));
        }
        (out, serial)
    }

    /// The addresses of the pods declaring a named port, per number it resolves to,
    /// through the cache (the iptables form's hash:ip,port set, under the same
    /// recipe; the regions kept beside the entry), with the cache entry's serial.
    fn cached_named_ports(
        &mut self,
        name: &str,
        protocol: Protocol,
    ) -> (Arc<BTreeMap<u16, Arc<AddrSet>>>, Option<u64>) {
        if let Some(cache) = self.cache.as_deref_mut()
            && let Some((incremental::Region::Numbered(numbers), serial)) =
                cache.region(&named_port_recipe(name, protocol))
        {
            return (numbers, Some(serial));
        }
        let index = &self.index;
        let (members, serial) = incremental::through_serial(
            &mut self.cache,
            || {
                let dep = Dependency::NamedPort {
                    name: name.to_string(),
                    protocol,
                };
                (named_port_recipe(name, protocol), vec![dep])
            },
            || index.named_port_members(name, protocol),
        );
        let mut numbers: BTreeMap<u16, AddrSet> = BTreeMap::new();
        for m in members {
            if let SetMember::IpPort { ip, port, .. } = m {
                let ip = u32::from(ip);
                numbers.entry(port).or_default().insert(ip, ip);
            }
        }
        let numbers: Arc<BTreeMap<u16, Arc<AddrSet>>> =
            Arc::new(numbers.into_iter().map(|(n, a)| (n, Arc::new(a))).collect());
        if let (Some(cache), Some(serial)) = (self.cache.as_deref_mut(), serial) {
            cache.keep_region(serial, incremental::Region::Numbered(numbers.clone()));
        }
        (numbers, serial)
    }

    /// Puts a class partition's output in the ruleset: each declared set's
    /// members, the class map, one chain per class.
    fn put_classes(
        &mut self,
        members: Vec<(String, BTreeSet<SetMember>)>,
        map: VerdictMap,
        ids: &[u32],
    ) {
        for (name, members) in members {
            if let Some(set) = self.ruleset.sets.get_mut(&name) {
                set.members = members;
            }
        }
        self.ruleset.maps.insert(map.name.clone(), map);
        for &class in ids {
            self.ruleset.add_chain(
                Table::Filter,
                Chain {
                    name: names::class_chain(class),
                    rules: vec![Rule::new(
                        vec![],
                        Target::SetMark {
                            value: class,
                            mask: MARK_CLASS_MASK,
                        },
                    )],
                },
            );
        }
    }
}

fn pod_peer_recipe(namespace: &str, peer: &PodPeer) -> Recipe {
    Recipe::PodPeer {
        namespace: namespace.to_string(),
        peer: peer.clone(),
    }
}

fn named_port_recipe(name: &str, protocol: Protocol) -> Recipe {
    Recipe::NamedPort {
        name: name.to_string(),
        protocol,
    }
}

/// Which region recipes a class fill has asked for already. Peers are compared by
/// address first (most pairs repeat the same policy's peer), then by value.
#[derive(Default)]
struct RecipeSeen<'p> {
    pointers: std::collections::HashSet<(*const PodPeer, *const u8)>,
    recipes: std::collections::HashSet<Recipe>,
    _peers: std::marker::PhantomData<&'p PodPeer>,
}

impl<'p> RecipeSeen<'p> {
    /// The recipe of pod peer `peer` of namespace `ns`, when not asked for before.
    fn first_pod_peer(&mut self, ns: &'p str, peer: &'p PodPeer) -> Option<Recipe> {
        if !self.pointers.insert((peer as *const PodPeer, ns.as_ptr())) {
            return None;
        }
        let recipe = pod_peer_recipe(ns, peer);
        self.recipes.insert(recipe.clone()).then_some(recipe)
    }

    /// The recipe of named port `name`, when not asked for before.
    fn first_named_port(&mut self, name: &str, protocol: Protocol) -> Option<Recipe> {
        let recipe = named_port_recipe(name, protocol);
        self.recipes.insert(recipe.clone()).then_some(recipe)
    }
}

/// The cache recipes of the regions the declared class sets `pending` name, each
/// once, in the order [`Flat::fill_class_sets`] asks for them: per pair, its pod
/// peer, then its named port.
fn region_recipes(pending: &[PendingSet<'_>]) -> Vec<Recipe> {
    let mut seen = RecipeSeen::default();
    let mut out = Vec::new();
    for (_, _, pairs) in pending {
        for (peer, port) in pairs {
            if let PeerRef::Pods(ns, pp) = peer {
                out.extend(seen.first_pod_peer(ns, pp));
            }
            if let PortRef::Named(proto, name) = port {
                out.extend(seen.first_named_port(name, *proto));
            }
        }
    }
    out
}

/// The (peer, ports) pairs `policies` allow in `direction`, sorted and deduplicated;
/// ingress named ports resolved on `pod` (every pod of its group agrees).
fn contributions<'p>(
    policies: &[&'p NetworkPolicy],
    direction: Direction,
    pod: &Pod,
) -> Vec<(PeerRef<'p>, PortRef)> {
    let mut out = BTreeSet::new();
    for policy in policies {
        for rule in rules_of(policy, direction) {
            let peers: Vec<PeerRef<'p>> = match &rule.peers {
                Peers::Any => vec![PeerRef::Any],
                Peers::Listed(list) => list
                    .iter()
                    .filter_map(|peer| match peer {
                        Peer::Pods(pp) => Some(PeerRef::Pods(&policy.namespace, pp)),
                        Peer::IpBlock(b) if matches!(b.cidr, IpNet::V4(_)) => {
                            Some(PeerRef::Block(b))
                        }
                        Peer::IpBlock(_) => None,
                    })
                    .collect(),
            };
            let ports: Vec<PortRef> = match &rule.ports {
                Ports::Any => vec![PortRef::Any],
                Ports::Listed(list) => list
                    .iter()
                    .flat_map(|p| match &p.port {
                        PortMatch::All => vec![PortRef::Range(p.protocol, 0, u16::MAX)],
                        PortMatch::Numbers { start, end } if start <= end => {
                            vec![PortRef::Range(p.protocol, *start, *end)]
                        }
                        PortMatch::Numbers { .. } => vec![],
                        PortMatch::Named(name) => match direction {
                            Direction::Ingress => pod
                                .resolve_named_port(name, p.protocol)
                                .into_iter()
                                .map(|n| PortRef::Range(p.protocol, n, n))
                                .collect(),
                            Direction::Egress => vec![PortRef::Named(p.protocol, name.clone())],
                        },
                    })
                    .collect(),
            };
            for peer in &peers {
                for port in &ports {
                    out.insert((peer.clone(), port.clone()));
                }
            }
        }
    }
    out.into_iter().collect()
}

/// The canonical text of (peer, ports) pairs: what shared sets and group chains are
/// named after.
fn pairs_key(pairs: &[(PeerRef<'_>, PortRef)]) -> String {
    let mut key = String::new();
    for (peer, port) in pairs {
        key.push_str(&peer.key());
        key.push(' ');
        key.push_str(&port.key());
        key.push(';');
    }
    key
}

/// What a shared set of `pairs` changes with: the pods its pod peers select, the
/// pods declaring its (egress) named ports.
fn dependencies(pairs: &[(PeerRef<'_>, PortRef)]) -> Vec<Dependency> {
    let mut out = Vec::new();
    for (peer, port) in pairs {
        if let PeerRef::Pods(ns, pp) = peer {
            out.push(Dependency::PodPeer {
                namespace: ns.to_string(),
                peer: (*pp).clone(),
            });
        }
        if let PortRef::Named(protocol, name) = port {
            out.push(Dependency::NamedPort {
                name: name.clone(),
                protocol: *protocol,
            });
        }
    }
    out
}

/// `ingress: ns/a, ns/b` — as many policies as fit, then `+N`.
fn group_comment(direction: Direction, policies: &[NamespacedName]) -> String {
    let mut out = String::from(match direction {
        Direction::Ingress => "ingress:",
        Direction::Egress => "egress:",
    });
    for (i, p) in policies.iter().enumerate() {
        let item = format!(" {}/{}", p.namespace, p.name);
        let rest = policies.len() - i;
        // Room for the item, its comma, and a "+N more" tail if something follows.
        if out.len() + item.len() + 1 + if rest > 1 { 12 } else { 0 } > MAX_COMMENT {
            out.push_str(&format!(" +{rest}"));
            break;
        }
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item);
    }
    // Only characters the comment's quoting can carry: object names are DNS labels
    // and `rejected:` stand-ins, so this never changes anything but is cheap.
    out.retain(|ch| ch != '"' && ch != '\\');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{Hook, Packet, Verdict, classify};
    use crate::dataplane::CtState;
    use crate::model::{ContainerPort, IpBlock, PolicyPort, PolicyTypes, Rule as NpRule};
    use crate::selector::LabelSelector;

    struct Veths;

    impl InterfaceNames for Veths {
        fn host_veth(&self, pod: &Pod) -> String {
            format!("slc{}", pod.name)
        }
        fn namespace_prefix(&self, namespace: &str) -> String {
            format!("slc{}", &namespace[..1])
        }
    }

    fn pod(name: &str, ip: &str, node: &str, ports: Vec<ContainerPort>) -> Pod {
        Pod {
            namespace: "prod".into(),
            name: name.into(),
            labels: [("app".to_string(), name.to_string())].into(),
            ips: vec![ip.parse().unwrap()],
            node: Some(node.into()),
            ports,
            host_network: false,
        }
    }

    fn http(port: u16) -> Vec<ContainerPort> {
        vec![ContainerPort {
            name: Some("http".into()),
            port,
            protocol: Protocol::Tcp,
        }]
    }

    fn ingress_policy(name: &str, block: &str, except: &[&str], port: PortMatch) -> NetworkPolicy {
        NetworkPolicy {
            log_allowed: Default::default(),
            namespace: "prod".into(),
            name: name.into(),
            pod_selector: LabelSelector::everything(),
            ingress: vec![NpRule {
                peers: Peers::Listed(vec![Peer::IpBlock(IpBlock {
                    cidr: block.parse().unwrap(),
                    except: except.iter().map(|e| e.parse().unwrap()).collect(),
                })]),
                ports: Ports::Listed(vec![PolicyPort {
                    protocol: Protocol::Tcp,
                    port,
                }]),
            }],
            egress: vec![],
            policy_types: PolicyTypes {
                ingress: true,
                egress: false,
            },
        }
    }

    fn tuple_set_of(rs: &Ruleset, chain: &str) -> String {
        rs.chain(Table::Filter, chain)
            .unwrap()
            .rules
            .iter()
            .flat_map(|r| &r.matches)
            .find_map(|m| match m {
                Match::Tuple { set, .. } | Match::ClassTuple { set } => Some(set.clone()),
                _ => None,
            })
            .unwrap()
    }

    /// The address form, which a node with more classes than ids falls back to.
    fn compile_addresses(c: &Cluster) -> Ruleset {
        compile_form(c, "n1", &Veths, None, 0).unwrap()
    }

    fn elements(rs: &Ruleset, set: &str) -> Vec<String> {
        crate::render::nft::sets(rs)[set]
            .elements
            .iter()
            .cloned()
            .collect()
    }

    #[test]
    fn in_the_address_form_one_pods_ingress_is_one_disjoint_tuple_set_and_named_ports_split_groups()
    {
        let mut c = Cluster::default();
        c.add_pod(pod("a", "10.244.1.2", "n1", http(8080)));
        c.add_pod(pod("b", "10.244.1.3", "n1", http(8080)));
        c.add_pod(pod("c", "10.244.1.4", "n1", http(9090)));
        c.add_policy(ingress_policy(
            "wide",
            "172.16.0.0/16",
            &["172.16.8.0/24"],
            PortMatch::Named("http".into()),
        ));
        c.add_policy(ingress_policy(
            "overlap",
            "172.16.0.0/12",
            &[],
            PortMatch::Numbers {
                start: 8000,
                end: 8100,
            },
        ));
        let rs = compile_addresses(&c);
        assert!(rs.sets.values().all(
            |s| s.kind != SetKind::ClassIntervals && s.kind != SetKind::ClassProtoPortIntervals
        ));
        let to_pod = &rs.maps[MAP_TO_POD];
        let group = |p: &str| to_pod.elements[&MapKeyValue::Iface(format!("slc{p}"))].clone();
        assert_eq!(group("a"), group("b"), "same policies, same named port");
        assert_ne!(group("a"), group("c"), "http means another number on c");
        let MapVerdict::Goto(chain) = group("a") else {
            panic!()
        };
        assert_eq!(
            elements(&rs, &tuple_set_of(&rs, &chain)),
            // 8080 lies inside 8000-8100: one box for the /12 over the range, none
            // overlapping it for the named port.
            ["172.16.0.0-172.31.255.255 . tcp . 8000-8100"]
        );
        let MapVerdict::Goto(chain_c) = group("c") else {
            panic!()
        };
        assert_eq!(
            elements(&rs, &tuple_set_of(&rs, &chain_c)),
            [
                "172.16.0.0-172.16.7.255 . tcp . 9090",
                "172.16.0.0-172.31.255.255 . tcp . 8000-8100",
                "172.16.9.0-172.16.255.255 . tcp . 9090",
            ]
        );
    }

    /// `name` in namespace prod allows `direction` to or from the pods labelled
    /// app=`peer`, on TCP 80.
    fn pods_policy(name: &str, direction: Direction, selected: &str, peer: &str) -> NetworkPolicy {
        let rule = NpRule {
            peers: Peers::Listed(vec![Peer::Pods(PodPeer {
                namespaces: crate::model::NamespaceScope::PolicyNamespace,
                pods: LabelSelector::from_labels([("app", peer)]),
            })]),
            ports: Ports::Listed(vec![PolicyPort {
                protocol: Protocol::Tcp,
                port: PortMatch::Numbers { start: 80, end: 80 },
            }]),
        };
        let ingress = direction == Direction::Ingress;
        NetworkPolicy {
            namespace: "prod".into(),
            name: name.into(),
            pod_selector: LabelSelector::from_labels([("app", selected)]),
            ingress: if ingress { vec![rule.clone()] } else { vec![] },
            egress: if ingress { vec![] } else { vec![rule] },
            policy_types: PolicyTypes {
                ingress,
                egress: !ingress,
            },
            log_allowed: Default::default(),
        }
    }

    #[test]
    fn a_group_set_holds_classes_and_a_new_peer_pod_is_one_class_map_element() {
        let mut c = Cluster::default();
        c.add_pod(pod("web", "10.244.1.2", "n1", vec![]));
        for i in 0..50 {
            let mut api = pod(
                &format!("api{i}"),
                &format!("10.244.2.{}", 2 * i),
                "n2",
                vec![],
            );
            api.labels = [("app".to_string(), "api".to_string())].into();
            c.add_pod(api);
        }
        c.add_policy(pods_policy("web", Direction::Ingress, "web", "api"));
        let rs = compile(&c, "n1", &Veths).unwrap();
        let MapVerdict::Goto(chain) =
            rs.maps[MAP_TO_POD].elements[&MapKeyValue::Iface("slcweb".into())].clone()
        else {
            panic!()
        };
        // Fifty peer addresses, one class: one element in the group's set.
        let set = tuple_set_of(&rs, &chain);
        assert_eq!(rs.sets[&set].kind, SetKind::ClassProtoPortIntervals);
        assert_eq!(rs.sets[&set].members.len(), 1);
        assert_eq!(rs.maps[MAP_CLASSES].elements.len(), 50);
        let mut next = c.clone();
        let mut api = pod("api50", "10.244.3.9", "n2", vec![]);
        api.labels = [("app".to_string(), "api".to_string())].into();
        next.add_pod(api);
        let after = compile(&next, "n1", &Veths).unwrap();
        assert_eq!(after.sets, rs.sets);
        assert_eq!(after.tables, rs.tables);
        let added: Vec<_> = after.maps[MAP_CLASSES]
            .elements
            .iter()
            .filter(|(k, _)| !rs.maps[MAP_CLASSES].elements.contains_key(*k))
            .collect();
        assert_eq!(added.len(), 1, "{added:?}");
        assert_eq!(after.maps[MAP_CLASSES].elements.len(), 51);
    }

    #[test]
    fn the_class_an_egress_lookup_left_never_decides_the_ingress_of_a_source_in_no_class() {
        // b may send to a (egress: a's address has a class); a admits only itself.
        // b's address is in no class: a's ingress must see class 0, not a's class.
        let mut c = Cluster::default();
        c.add_pod(pod("a", "10.244.1.2", "n1", vec![]));
        c.add_pod(pod("b", "10.244.1.3", "n1", vec![]));
        c.add_policy(pods_policy("b-out", Direction::Egress, "b", "a"));
        c.add_policy(pods_policy("a-in", Direction::Ingress, "a", "a"));
        let rs = compile(&c, "n1", &Veths).unwrap();
        let packet = |src: &str, dst: &str, in_iface: &str, out_iface: &str| Packet {
            hook: Hook::Forward,
            in_iface: Some(in_iface.into()),
            out_iface: Some(out_iface.into()),
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: Protocol::Tcp,
            dport: 80,
            ct: CtState::New,
        };
        let b_to_a = packet("10.244.1.3", "10.244.1.2", "slcb", "slca");
        assert_eq!(
            classify(&rs, Table::Filter, &b_to_a).unwrap().verdict,
            Verdict::Drop
        );
        // Passed b's egress by the class of a's address: the mark held it.
        let trace = classify(&rs, Table::Filter, &b_to_a).unwrap().trace;
        assert!(
            trace
                .iter()
                .any(|(chain, _)| chain.starts_with("SLUICE-C-"))
        );
    }

    #[test]
    fn the_class_map_is_looked_up_once_per_direction_however_many_groups_read_it() {
        // Each of 30 pods isolated both ways by its own policy: 60 group chains that
        // read a class. The kernel validates every path to the class map's `jump`
        // elements on each commit adding one, so its lookups must not multiply with
        // the groups (node-agent/BENCH.md, "Where a new pod's 45 ms went").
        let mut c = Cluster::default();
        for i in 0..30 {
            let name = format!("p{i}");
            c.add_pod(pod(&name, &format!("10.244.1.{}", i + 2), "n1", vec![]));
            c.add_pod(pod(
                &format!("q{i}"),
                &format!("10.244.2.{}", i + 2),
                "n2",
                vec![],
            ));
            let peer = format!("q{i}");
            c.add_policy(pods_policy(
                &format!("{name}-in"),
                Direction::Ingress,
                &name,
                &peer,
            ));
            c.add_policy(pods_policy(
                &format!("{name}-out"),
                Direction::Egress,
                &name,
                &peer,
            ));
        }
        let rs = compile(&c, "n1", &Veths).unwrap();
        let groups = rs.tables[&Table::Filter]
            .keys()
            .filter(|n| n.starts_with("SLUICE-GI-") || n.starts_with("SLUICE-GE-"))
            .count();
        assert_eq!(groups, 60);
        let lookups: Vec<(&str, SetDirection)> = rs.tables[&Table::Filter]
            .values()
            .flat_map(|ch| ch.rules.iter().map(move |r| (ch.name.as_str(), r)))
            .filter_map(|(chain, r)| match &r.target {
                Target::AddrVmap { map, direction } if map == MAP_CLASSES => {
                    Some((chain, *direction))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            lookups,
            [
                (names::CHAIN_FROM_POD, SetDirection::Dst),
                (names::CHAIN_TO_POD, SetDirection::Src)
            ]
        );
        // And the classes still decide: q3 → p3 is allowed, q4 → p3 is not.
        let packet = |src: &str, dst: &str, out_iface: &str| Packet {
            hook: Hook::Forward,
            in_iface: Some("eth0".into()),
            out_iface: Some(out_iface.into()),
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: Protocol::Tcp,
            dport: 80,
            ct: CtState::New,
        };
        let verdict = |p: &Packet| classify(&rs, Table::Filter, p).unwrap().verdict;
        assert_eq!(
            verdict(&packet("10.244.2.5", "10.244.1.5", "slcp3")),
            Verdict::Accept
        );
        assert_eq!(
            verdict(&packet("10.244.2.6", "10.244.1.5", "slcp3")),
            Verdict::Drop
        );
    }

    #[test]
    fn a_group_comment_names_its_policies_within_what_nft_keeps() {
        let many: Vec<NamespacedName> = (0..40)
            .map(|i| NamespacedName::new("payments", format!("allow-from-service-{i}")))
            .collect();
        let c = group_comment(Direction::Ingress, &many);
        assert!(c.len() <= MAX_COMMENT, "{c}");
        assert!(
            c.starts_with("ingress: payments/allow-from-service-0,"),
            "{c}"
        );
        let (listed, rest) = c.rsplit_once(" +").unwrap();
        let shown = listed.matches("payments/").count();
        assert_eq!(shown + rest.parse::<usize>().unwrap(), many.len(), "{c}");
        assert_eq!(
            group_comment(Direction::Egress, &many[..1]),
            "egress: payments/allow-from-service-0"
        );
    }

    #[test]
    fn a_new_connection_costs_the_same_lookups_under_one_policy_or_a_thousand() {
        let trace_len = |policies: usize| {
            let mut c = Cluster::default();
            c.add_pod(pod("a", "10.244.1.2", "n1", vec![]));
            for i in 0..policies {
                c.add_policy(ingress_policy(
                    &format!("p{i}"),
                    &format!("10.{}.{}.0/24", i / 256, i % 256),
                    &[],
                    PortMatch::Numbers { start: 80, end: 80 },
                ));
            }
            let rs = compile(&c, "n1", &Veths).unwrap();
            let packet = Packet {
                hook: Hook::Forward,
                in_iface: Some("eth0".into()),
                out_iface: Some("slca".into()),
                src: format!("10.{}.{}.9", (policies - 1) / 256, (policies - 1) % 256)
                    .parse()
                    .unwrap(),
                dst: "10.244.1.2".parse().unwrap(),
                protocol: Protocol::Tcp,
                dport: 80,
                ct: CtState::New,
            };
            let cls = classify(&rs, Table::Filter, &packet).unwrap();
            assert_eq!(cls.verdict, Verdict::Accept);
            // Adjacent /24s merge: a thousand policies, one element.
            let MapVerdict::Goto(chain) =
                rs.maps[MAP_TO_POD].elements[&MapKeyValue::Iface("slca".into())].clone()
            else {
                panic!()
            };
            assert_eq!(rs.sets[&tuple_set_of(&rs, &chain)].members.len(), 1);
            cls.trace.len()
        };
        assert_eq!(trace_len(1), trace_len(1000));
    }

    fn admin(
        name: &str,
        priority: u16,
        action: Action,
        cidr: &str,
        port: u16,
    ) -> ClusterNetworkPolicy {
        ClusterNetworkPolicy {
            log_allowed: Default::default(),
            name: name.into(),
            tier: Tier::Admin,
            priority,
            subject: crate::model::Subject::Namespaces(LabelSelector::everything()),
            ingress: vec![ClusterRule {
                name: None,
                action,
                peers: vec![ClusterPeer::Networks(vec![cidr.parse().unwrap()])],
                ports: Ports::Listed(vec![PolicyPort {
                    protocol: Protocol::Tcp,
                    port: PortMatch::Numbers {
                        start: port,
                        end: port,
                    },
                }]),
            }],
            egress: vec![],
            not_implemented: vec![],
        }
    }

    fn ingress_from(rs: &Ruleset, src: &str, dport: u16) -> (Verdict, usize) {
        let packet = Packet {
            hook: Hook::Forward,
            in_iface: Some("eth0".into()),
            out_iface: Some("slca".into()),
            src: src.parse().unwrap(),
            dst: "10.244.1.2".parse().unwrap(),
            protocol: Protocol::Tcp,
            dport,
            ct: CtState::New,
        };
        let cls = classify(rs, Table::Filter, &packet).unwrap();
        (cls.verdict, cls.trace.len())
    }

    #[test]
    fn an_earlier_admin_rule_wins_over_a_later_one_in_the_same_box() {
        let mut c = Cluster::default();
        c.add_pod(pod("a", "10.244.1.2", "n1", vec![]));
        // Deny at priority 10 for a /24, Accept at 20 for the /16 around it, Pass
        // at 5 for one address inside the /24 (then nothing isolates: allowed).
        c.add_cluster_policy(admin("deny", 10, Action::Deny, "172.16.1.0/24", 80));
        c.add_cluster_policy(admin("accept", 20, Action::Accept, "172.16.0.0/16", 80));
        c.add_cluster_policy(admin("pass", 5, Action::Pass, "172.16.1.9/32", 80));
        c.add_policy(ingress_policy("np", "192.0.2.0/24", &[], PortMatch::All));
        let rs = compile(&c, "n1", &Veths).unwrap();
        assert_eq!(ingress_from(&rs, "172.16.1.8", 80).0, Verdict::Drop);
        assert_eq!(ingress_from(&rs, "172.16.2.8", 80).0, Verdict::Accept);
        // Passed to NetworkPolicy, which does not allow 172.16.1.9.
        assert_eq!(ingress_from(&rs, "172.16.1.9", 80).0, Verdict::Drop);
        // No admin rule for port 81: NetworkPolicy decides.
        assert_eq!(ingress_from(&rs, "192.0.2.1", 81).0, Verdict::Accept);
        assert_eq!(ingress_from(&rs, "172.16.2.8", 81).0, Verdict::Drop);
    }

    #[test]
    fn a_cluster_policy_deny_is_logged_under_the_policy_that_denied_it() {
        use crate::dataplane::deny_log::{DenyReason, DenyTag};
        for denying in [1usize, 3] {
            let mut c = Cluster::default();
            c.add_pod(pod("a", "10.244.1.2", "n1", vec![]));
            for i in 0..denying {
                let cidr = format!("172.16.{i}.0/24");
                c.add_cluster_policy(admin(
                    &format!("deny-{i}"),
                    10 + i as u16,
                    Action::Deny,
                    &cidr,
                    80,
                ));
            }
            c.add_cluster_policy(admin("accept", 50, Action::Accept, "172.16.0.0/16", 80));
            let rs = compile(&c, "n1", &Veths).unwrap();
            for i in 0..denying {
                let packet = Packet {
                    hook: Hook::Forward,
                    in_iface: Some("eth0".into()),
                    out_iface: Some("slca".into()),
                    src: format!("172.16.{i}.9").parse().unwrap(),
                    dst: "10.244.1.2".parse().unwrap(),
                    protocol: Protocol::Tcp,
                    dport: 80,
                    ct: CtState::New,
                };
                let cls = classify(&rs, Table::Filter, &packet).unwrap();
                assert_eq!(cls.verdict, Verdict::Drop);
                let logs: Vec<DenyTag> = cls
                    .trace
                    .iter()
                    .filter_map(|(chain, i)| {
                        match &rs.chain(Table::Filter, chain)?.rules[*i].target {
                            Target::Log(spec) => DenyTag::parse(&spec.prefix),
                            _ => None,
                        }
                    })
                    .collect();
                assert_eq!(logs.len(), 1, "{denying} denying: {logs:?}");
                assert_eq!(logs[0].reason, DenyReason::DeniedByRule);
                let id = logs[0].id.as_deref().unwrap();
                assert_eq!(
                    rs.deny_policies[id],
                    [format!("ClusterNetworkPolicy/deny-{i}")],
                    "{denying} denying"
                );
            }
        }
    }

    #[test]
    fn a_new_connection_costs_the_same_lookups_under_one_cluster_policy_or_a_hundred() {
        let trace_len = |policies: usize| {
            let mut c = Cluster::default();
            c.add_pod(pod("a", "10.244.1.2", "n1", vec![]));
            for i in 0..policies {
                let action = if i.is_multiple_of(2) {
                    Action::Deny
                } else {
                    Action::Accept
                };
                let cidr = format!("10.{}.{}.0/24", i / 256, i % 256);
                c.add_cluster_policy(admin(&format!("p{i:03}"), i as u16, action, &cidr, 80));
            }
            let rs = compile(&c, "n1", &Veths).unwrap();
            // The last policy's network: every earlier rule is walked past in a
            // linear form, here only set lookups are.
            let last = policies - 1;
            let (verdict, len) =
                ingress_from(&rs, &format!("10.{}.{}.9", last / 256, last % 256), 80);
            let expected = if last.is_multiple_of(2) {
                Verdict::Drop
            } else {
                Verdict::Accept
            };
            assert_eq!(verdict, expected);
            // Only denied packets go on to the chain that logs them by policy.
            let rules: usize = rs.tables[&Table::Filter]
                .iter()
                .filter(|(name, _)| !name.starts_with("SLUICE-DN-"))
                .map(|(_, c)| c.rules.len())
                .sum();
            (len, rules)
        };
        // Same rules matched and the same rules in all: the policies are elements
        // (one denying policy logs its drop in the tier chain itself: one rule more).
        let (few, many) = (trace_len(2), trace_len(100));
        assert_eq!(few.0, many.0);
        assert!(few.1.abs_diff(many.1) <= 1, "{few:?} vs {many:?}");
    }

    /// Allow logging on both dataplanes: only the pods an opt-in covers (their
    /// namespace's, or a policy's selecting them) pass an allow log rule, in the
    /// direction opted in, and every other pod's new connection walks exactly the
    /// rules it walks with no opt-in anywhere.
    #[test]
    fn allows_are_logged_only_on_opted_in_pods_paths_and_cost_the_others_nothing() {
        use crate::compile::compile_for;
        use crate::dataplane::DataplaneKind;
        use crate::dataplane::deny_log::{AllowTag, LogTag};
        use crate::model::{LogAllowed, Namespace};
        let cluster = |opt_in: bool| {
            let mut c = Cluster::default();
            for (name, ip, ns) in [
                ("a", "10.244.1.2", "prod"),
                ("b", "10.244.1.3", "prod"),
                ("c", "10.244.1.4", "dev"),
                ("d", "10.244.1.5", "web"),
            ] {
                let mut p = pod(name, ip, "n1", vec![]);
                p.namespace = ns.into();
                c.add_pod(p);
            }
            let on = |v: &str| {
                if opt_in {
                    LogAllowed::parse(v).unwrap()
                } else {
                    LogAllowed::OFF
                }
            };
            c.add_namespace(Namespace {
                name: "dev".into(),
                labels: Default::default(),
                log_allowed: on("ingress"),
            });
            // prod/to-a selects a only and opts in; prod/to-b selects b, does not.
            for (name, opted) in [("a", true), ("b", false)] {
                let mut p = ingress_policy(
                    &format!("to-{name}"),
                    "172.16.0.0/16",
                    &[],
                    PortMatch::Numbers { start: 80, end: 80 },
                );
                p.pod_selector = LabelSelector::from_labels([("app", name)]);
                p.log_allowed = if opted { on("true") } else { LogAllowed::OFF };
                c.add_policy(p);
            }
            c
        };
        let packet = |to: &str, ip: &str, ingress: bool| {
            let (src, dst) = if ingress {
                ("172.16.0.9", ip)
            } else {
                (ip, "192.0.2.1")
            };
            let (in_iface, out_iface) = if ingress {
                ("eth0".to_string(), format!("slc{to}"))
            } else {
                (format!("slc{to}"), "eth0".to_string())
            };
            Packet {
                hook: Hook::Forward,
                in_iface: Some(in_iface),
                out_iface: Some(out_iface),
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                protocol: Protocol::Tcp,
                dport: 80,
                ct: CtState::New,
            }
        };
        for kind in [DataplaneKind::Iptables, DataplaneKind::Nftables] {
            let on = compile_for(kind, &cluster(true), "n1", &Veths).unwrap();
            let off = compile_for(kind, &cluster(false), "n1", &Veths).unwrap();
            assert!(
                !off.tables[&Table::Filter]
                    .keys()
                    .any(|c| c.starts_with("SLUICE-ALLOW-LOG")),
                "{kind:?}: an allow log chain with no opt-in"
            );
            let logged = |rs: &Ruleset, p: &Packet| -> (Verdict, Vec<AllowTag>, usize) {
                let cls = classify(rs, Table::Filter, p).unwrap();
                let tags = cls
                    .trace
                    .iter()
                    .filter_map(|(chain, i)| {
                        match &rs.chain(Table::Filter, chain)?.rules[*i].target {
                            Target::Log(spec) => match LogTag::parse(&spec.prefix)? {
                                LogTag::Allow(t) => Some(t),
                                LogTag::Deny(_) => None,
                            },
                            _ => None,
                        }
                    })
                    .collect();
                (cls.verdict, tags, cls.trace.len())
            };
            for (pod, ip, ingress, opted) in [
                ("a", "10.244.1.2", true, true),   // its policy opts in
                ("a", "10.244.1.2", false, false), // its policy polices ingress only
                ("b", "10.244.1.3", true, false),  // same namespace, other policy
                ("c", "10.244.1.4", true, true),   // its namespace opts in ingress
                ("c", "10.244.1.4", false, false), // ... not egress
                ("d", "10.244.1.5", true, false),
                ("d", "10.244.1.5", false, false),
            ] {
                let p = packet(pod, ip, ingress);
                let (verdict, tags, walked) = logged(&on, &p);
                assert_eq!(verdict, Verdict::Accept, "{kind:?} {pod} ingress={ingress}");
                if opted {
                    let direction = if ingress {
                        Direction::Ingress
                    } else {
                        Direction::Egress
                    };
                    assert_eq!(tags, [AllowTag { direction }], "{kind:?} {pod} {ingress}");
                } else {
                    assert!(
                        tags.is_empty(),
                        "{kind:?} {pod} ingress={ingress}: {tags:?}"
                    );
                    let (_, _, before) = logged(&off, &p);
                    assert_eq!(walked, before, "{kind:?} {pod} ingress={ingress}: cost");
                }
            }
            // A denied connection of an opted-in pod is a deny, never an allow record.
            let mut p = packet("a", "10.244.1.2", true);
            p.src = "192.0.2.9".parse().unwrap();
            let (verdict, tags, _) = logged(&on, &p);
            assert_eq!((verdict, tags.len()), (Verdict::Drop, 0), "{kind:?}");
        }
    }
}
