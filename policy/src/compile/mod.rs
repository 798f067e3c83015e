//! The compiler: a [`Cluster`] and one node's view of it in, the node's policy
//! chains and sets out, in the dataplane model ([`crate::dataplane`]: tables → chains
//! → rules, plus ipsets), ready to complete with the agent's own rules, render, plan
//! or execute in-process. [`compile`] runs as named steps, one function each.
//!
//! # Chain layout (filter table, IPv4)
//!
//! ```text
//! FORWARD ─► SLUICE-FORWARD ─(-i/-o slc+|slx+)─► SLUICE-FWD-POD
//!              1. ESTABLISHED,RELATED ACCEPT   2. INVALID DROP
//!              3. clear mark, -j SLUICE-FROM-POD (egress of the source pod)
//!              4. clear mark, -j SLUICE-TO-POD   (ingress of the destination pod)
//!              5. ACCEPT
//! INPUT ───► SLUICE-INPUT ─(-i slc+|slx+)─► SLUICE-IN-POD
//!              ESTABLISHED,RELATED RETURN, INVALID DROP, -j SLUICE-FROM-POD
//!              (then back to the host's own INPUT rules)
//! SLUICE-FROM-POD: -m set --match-set SLUICE-FD-<group> src,src -g SLUICE-FW-<group>;
//!                  ... one per egress group (members `<podIP>,<veth>`: a pod's own
//!                  addresses from its veth); then log + DROP of `-m set --match-set
//!                  SLUICE-POD-VETHS-<n> src,src` (every local veth, any address:
//!                  spoofed; in shards of ~32 veths, see SAME_NET_PER_SET);
//!                  then -i <nsprefix>+ -j DROP for every namespace with an egress
//!                  policy (a pod we do not know yet).
//! SLUICE-TO-POD:   -m set --match-set SLUICE-TD-<group> dst,dst -g SLUICE-TW-<group>;
//!                  ... one per ingress group (members `<podIP>,<veth>`); then -o
//!                  <nsprefix>+ -j DROP for every namespace with an ingress policy.
//! SLUICE-TW-<group> (isolated): -j SLUICE-PI-<policy>; mark? RETURN; ...; DROP
//! SLUICE-TW-<group> (not isolated): empty (or the Baseline tier, below).
//!                  A group is the local pods whose chain would be the same: the same
//!                  selecting policies, tier group chains and allow logging
//!                  ([`names::pod_group_chain`]). A pod joining a group that exists
//!                  is set members only: no rule, no chain, no table validation
//!                  (nf_tables re-walks every path from the base chains when a
//!                  transaction adds a jump). A pod becoming isolated moves to
//!                  another group: members again, plus the group's chain and
//!                  dispatch rule when it is the group's first pod.
//!                  ClusterNetworkPolicy ([`tiers`]) adds `-j SLUICE-CGI-<Admin
//!                  group>; mark? RETURN` in front, and (not isolated) `-j
//!                  SLUICE-CGI-<Baseline group>` in place of nothing.
//! SLUICE-PI-<policy>: one rule per (peer, port) of each ingress rule, each setting
//!                  the allow mark: `-m set --match-set SLUICE-P-… src -p tcp
//!                  --dport 80 -j MARK --set-xmark 0x10000/0x10000`.
//! ```
//!
//! ClusterNetworkPolicy ([`tiers`]): a pod's chain starts with a jump to its Admin
//! tier's group chain (an Accept returns at once, allowed; a Deny drops; a Pass or
//! no match goes on), and a pod no NetworkPolicy isolates in that direction ends
//! with its Baseline tier's group chain instead of nothing. The tiers are ordered
//! chains, walked in rule count; the nftables form ([`flat`]) keeps the order in
//! set contents instead.
//!
//! Decisions, and why:
//! - Rule count is O(policies selecting local pods + groups of local pods): peers are
//!   ipsets, so a pod joining a peer is one set member, a policy's chain is shared by
//!   all the local pods it selects (kube-router's pods × policies blow-up is what this
//!   avoids), and so is a group's chain, dispatched to by a hash:net,iface set.
//! - Named ports resolve per destination pod through one hash:ip,port set per
//!   (name, protocol), keyed by the destination address, so policy chains stay shared
//!   even when the name means a different number on each pod.
//! - Egress policy applies to pod → node traffic too (INPUT path), as upstream treats
//!   the node's address like any other destination; traffic the policy allows is then
//!   left to the host's own INPUT rules (RETURN, not ACCEPT).
//! - Traffic from the node itself to its pods leaves through OUTPUT, never FORWARD, so
//!   it is never policed (kubelet probes). Everything forwarded to a pod (other nodes,
//!   NodePort traffic DNATed by kube-proxy, SNATed or not) is. kube-proxy DNATs in
//!   PREROUTING (so FORWARD sees the backend pod) and SNATs in POSTROUTING (so FORWARD
//!   on the pod's node still sees the client, even with `externalTrafficPolicy:
//!   Cluster`); only a connection another node forwarded arrives with that node's
//!   address, and is policed as such (no special case for node or tunnel addresses).
//! - Allowed forwarded pod traffic is ACCEPTed, as Calico does by default: a host whose
//!   FORWARD policy is DROP (Docker sets it) must not black-hole pods.
//! - The allow mark is bit 0x10000, clear of kube-proxy's 0x4000 (masq) and 0x8000
//!   (drop); [`MARK_ALLOW`] is cleared before each direction is evaluated.
//! - IPv4 only: IPv6 pod addresses and ipBlocks are ignored by this (iptables, not
//!   ip6tables) rule model.
//! - Allow records (`sluice.dev/log-allowed`, docs/flows.md): a pod an opt-in covers
//!   in a direction has `-g SLUICE-ALLOW-LOG-<I|E>` where its chain would return
//!   allowed (and at the end of a chain that allows by falling off), a chain that
//!   logs new connections and returns; every other pod's chain is unchanged.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::{IpNet, Ipv4Net};

use crate::dataplane::deny_log::{self, DenyReason, DenyTag};
use crate::model::{Cluster, NetworkPolicy, Peer, Peers, Pod, PortMatch, Ports, Protocol, Tier};
use crate::names::{self, Direction};

pub mod classes;
pub mod flat;
pub mod incremental;
pub mod intervals;
mod members;
pub mod tiers;
use incremental::{Dependency, Recipe, Selected, SetCache, SetSpec};
use members::{Index, ip_block_members, v4, v4_excepts};

// The model's types, reachable here too: the compiler's output is spelled in them.
pub use crate::dataplane::{
    BuiltinJump, Chain, CtState, IfaceName, Interface, InterfaceNames, IpSet, MARK_ALLOW,
    MARK_MASK, Match, Rule, Ruleset, SetDirection, SetKind, SetMember, Table, Target,
};

/// A name the caller handed in that would break the restore text or the kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("interface name {name:?} for {what} is not a valid Linux interface name")]
    BadInterface { name: String, what: String },
}

/// IFNAMSIZ - 1.
const MAX_IFACE_LEN: usize = 15;

pub(crate) fn check_iface(name: &str, what: impl FnOnce() -> String) -> Result<(), CompileError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFACE_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(CompileError::BadInterface {
            name: name.to_string(),
            what: what(),
        })
    }
}

fn mark_is_allow() -> Match {
    Match::Mark {
        value: MARK_ALLOW,
        mask: MARK_ALLOW,
    }
}

fn clear_allow() -> Target {
    Target::SetMark {
        value: 0,
        mask: MARK_ALLOW,
    }
}

fn set_allow() -> Target {
    Target::SetMark {
        value: MARK_ALLOW,
        mask: MARK_ALLOW,
    }
}

/// What one policy-rule entry matches on the peer side.
enum PeerMatch {
    Any,
    Set(String),
}

/// What one policy-rule entry matches on the port side.
enum PortSpec {
    Any,
    Protocol(Protocol),
    Range(Protocol, u16, u16),
    Named(Protocol, String),
}

/// The matches of one port entry (nothing for [`PortSpec::Any`]).
fn port_spec_matches(port: &PortSpec) -> Vec<Match> {
    match port {
        PortSpec::Any => vec![],
        PortSpec::Protocol(proto) => vec![Match::Protocol(*proto)],
        PortSpec::Range(proto, start, end) => vec![
            Match::Protocol(*proto),
            Match::DestinationPorts {
                start: *start,
                end: *end,
            },
        ],
        PortSpec::Named(proto, name) => vec![
            Match::Protocol(*proto),
            Match::Set {
                name: names::named_port_set(name, *proto),
                direction: SetDirection::DstDstPort,
                negated: false,
            },
        ],
    }
}

struct Compiler<'a> {
    index: Index<'a>,
    ruleset: Ruleset,
    cache: Option<&'a mut SetCache>,
    /// While a policy chain is built for the cache: the sets it looks up, and how
    /// each is filled.
    recording: Option<Vec<(String, SetSpec)>>,
}

impl<'a> Compiler<'a> {
    fn peer_matches(&mut self, policy: &NetworkPolicy, peers: &Peers) -> Vec<PeerMatch> {
        let listed = match peers {
            Peers::Any => return vec![PeerMatch::Any],
            Peers::Listed(list) => list,
        };
        let mut out = Vec::new();
        for peer in listed {
            match peer {
                Peer::Pods(pp) => {
                    let name = names::pod_peer_set(&policy.namespace, pp);
                    self.use_set(
                        &name,
                        SetSpec::Pods {
                            namespace: policy.namespace.clone(),
                            peer: pp.clone(),
                        },
                    );
                    out.push(PeerMatch::Set(name));
                }
                Peer::IpBlock(block) => {
                    if !matches!(block.cidr, IpNet::V4(_)) {
                        continue; // an IPv6 block names no IPv4 packet
                    }
                    let name = names::ip_block_set(block);
                    self.use_set(&name, SetSpec::Block(block.clone()));
                    out.push(PeerMatch::Set(name));
                }
            }
        }
        out
    }

    /// The set `name`, filled as `spec` says, in the ruleset (added when it is not
    /// there yet), and in the recording of the policy chain being built.
    fn use_set(&mut self, name: &str, spec: SetSpec) {
        if !self.ruleset.sets.contains_key(name) {
            self.fill_set(name, &spec);
        }
        if let Some(r) = &mut self.recording {
            r.push((name.to_string(), spec));
        }
    }

    fn fill_set(&mut self, name: &str, spec: &SetSpec) {
        let index = &self.index;
        let (kind, members) = match spec {
            SetSpec::Pods { namespace, peer } => (
                SetKind::HashIp,
                incremental::through(
                    &mut self.cache,
                    || {
                        let dep = Dependency::PodPeer {
                            namespace: namespace.clone(),
                            peer: peer.clone(),
                        };
                        let recipe = Recipe::PodPeer {
                            namespace: namespace.clone(),
                            peer: peer.clone(),
                        };
                        (recipe, vec![dep])
                    },
                    || index.pod_peer_members(namespace, peer),
                ),
            ),
            SetSpec::NamedPort {
                name: port,
                protocol,
            } => (
                SetKind::HashIpPort,
                incremental::through(
                    &mut self.cache,
                    || {
                        let dep = Dependency::NamedPort {
                            name: port.clone(),
                            protocol: *protocol,
                        };
                        let recipe = Recipe::NamedPort {
                            name: port.clone(),
                            protocol: *protocol,
                        };
                        (recipe, vec![dep])
                    },
                    || index.named_port_members(port, *protocol),
                ),
            ),
            SetSpec::Block(block) => {
                let IpNet::V4(cidr) = block.cidr else {
                    return; // never recorded: an IPv6 block names no IPv4 packet
                };
                let except: Vec<Ipv4Net> = v4_excepts(block);
                (SetKind::HashNet, ip_block_members(cidr, &except))
            }
        };
        self.add_set(name.to_string(), kind, members);
    }

    fn port_specs(&mut self, ports: &Ports) -> Vec<PortSpec> {
        let listed = match ports {
            Ports::Any => return vec![PortSpec::Any],
            Ports::Listed(list) => list,
        };
        let mut out = Vec::new();
        for p in listed {
            match &p.port {
                PortMatch::All => out.push(PortSpec::Protocol(p.protocol)),
                PortMatch::Numbers { start, end } => {
                    if start <= end {
                        out.push(PortSpec::Range(p.protocol, *start, *end));
                    }
                }
                PortMatch::Named(name) => {
                    let set = names::named_port_set(name, p.protocol);
                    self.use_set(
                        &set,
                        SetSpec::NamedPort {
                            name: name.clone(),
                            protocol: p.protocol,
                        },
                    );
                    out.push(PortSpec::Named(p.protocol, name.clone()));
                }
            }
        }
        out
    }

    fn add_set(&mut self, name: String, kind: SetKind, members: BTreeSet<SetMember>) {
        self.ruleset.sets.insert(
            name.clone(),
            IpSet {
                name,
                kind,
                members,
            },
        );
    }

    /// The name of `policy`'s chain in `direction`: the cached chain's when there is
    /// one (no hashing per pod and policy).
    fn policy_chain_name(&mut self, policy: &NetworkPolicy, direction: Direction) -> String {
        if let Some(cache) = self.cache.as_deref_mut()
            && let Some((chain, _)) = cache.policy_chain(policy, direction)
        {
            return chain.name.clone();
        }
        names::policy_chain(&policy.key(), direction)
    }

    /// [`Compiler::build_policy_chain`], taken from the cache when the policy did not
    /// change since a previous compile (its sets added as that compile added them).
    fn policy_chain(&mut self, policy: &NetworkPolicy, direction: Direction) -> Chain {
        let Some(cache) = self.cache.as_deref_mut() else {
            return self.build_policy_chain(policy, direction);
        };
        if let Some((chain, sets)) = cache.policy_chain(policy, direction) {
            let (chain, sets) = (chain.clone(), sets.to_vec());
            cache.chain_reused();
            for (name, spec) in &sets {
                if !self.ruleset.sets.contains_key(name) {
                    self.fill_set(name, spec);
                }
            }
            return chain;
        }
        self.recording = Some(Vec::new());
        let chain = self.build_policy_chain(policy, direction);
        let sets = self.recording.take().unwrap_or_default();
        if let Some(shared) = self.index.cluster.policies.get(&policy.key())
            && let Some(cache) = self.cache.as_deref_mut()
        {
            cache.keep_policy_chain(shared.clone(), direction, chain.clone(), sets);
        }
        chain
    }

    /// The chain of one policy in one direction: every (peer, port) pair of every rule
    /// sets the allow mark. Order within the chain does not change the outcome (marks
    /// only accumulate), so duplicates are dropped.
    fn build_policy_chain(&mut self, policy: &NetworkPolicy, direction: Direction) -> Chain {
        let (rules, set_dir) = match direction {
            Direction::Ingress => (&policy.ingress, SetDirection::Src),
            Direction::Egress => (&policy.egress, SetDirection::Dst),
        };
        let mut out: Vec<Rule> = Vec::new();
        let mut seen: BTreeSet<Rule> = BTreeSet::new();
        for rule in rules {
            let peers = self.peer_matches(policy, &rule.peers);
            let ports = self.port_specs(&rule.ports);
            for peer in &peers {
                for port in &ports {
                    let mut matches = Vec::new();
                    if let PeerMatch::Set(name) = peer {
                        matches.push(Match::Set {
                            name: name.clone(),
                            direction: set_dir,
                            negated: false,
                        });
                    }
                    matches.extend(port_spec_matches(port));
                    let r = Rule::new(matches, set_allow());
                    if seen.insert(r.clone()) {
                        out.push(r);
                    }
                }
            }
        }
        Chain {
            name: names::policy_chain(&policy.key(), direction),
            rules: out,
        }
    }

    /// The group chain of `pod` for one direction, built on the group's first pod:
    /// pods whose chain would be the same share it ([`names::pod_group_chain`]).
    /// The Admin tier's group chain first (an Accept there returns, allowed); then,
    /// isolated → each selecting policy in key order, returning as soon as one
    /// allowed, and DROP when none did; not isolated → the Baseline tier's group
    /// chain, else nothing (RETURN, allowed).
    fn pod_group(
        &mut self,
        pod: &Pod,
        selected: &Selected<'_>,
        policies: &[&NetworkPolicy],
        dir: Direction,
    ) -> String {
        let admin = self.tier_group(Tier::Admin, selected, dir);
        let baseline = if policies.is_empty() {
            self.tier_group(Tier::Baseline, selected, dir)
        } else {
            None
        };
        // An opted-in pod's allows go through the direction's allow log chain in
        // place of the return; nobody else's path gains a rule.
        let allowed = self.allowed_target(pod, selected, dir);
        let keys: Vec<_> = policies.iter().map(|p| p.key()).collect();
        let name = names::pod_group_chain(
            dir,
            &keys,
            admin.as_deref(),
            baseline.as_deref(),
            allowed != Target::Return,
        );
        if self.ruleset.chain(Table::Filter, &name).is_some() {
            return name;
        }
        let mut rules = Vec::new();
        if let Some(admin) = admin {
            rules.push(jump_rule(&admin));
            if !policies.is_empty() || baseline.is_some() {
                rules.push(Rule::new(vec![mark_is_allow()], allowed.clone()));
            }
        }
        if !policies.is_empty() {
            for policy in policies {
                let chain_name = self.policy_chain_name(policy, dir);
                let exists = self.ruleset.chain(Table::Filter, &chain_name).is_some();
                if !exists {
                    let chain = self.policy_chain(policy, dir);
                    self.ruleset.add_chain(Table::Filter, chain);
                }
                rules.push(Rule::new(vec![], Target::Jump(chain_name)));
                rules.push(Rule::new(vec![mark_is_allow()], allowed.clone()));
            }
            // Named by the group chain, which is what `deny_policies` maps to the
            // policies isolating every pod of the group.
            let tag = DenyTag::new(DenyReason::Isolated, dir, Some(name.clone()));
            rules.extend(deny_log::deny(vec![], &tag));
            self.ruleset
                .deny_policies
                .insert(name.clone(), keys.iter().map(|k| k.to_string()).collect());
        } else {
            if let Some(baseline) = baseline {
                // Deny drops in there; Accept, Pass and no match fall off: allowed.
                rules.push(jump_rule(&baseline));
            }
            if allowed != Target::Return {
                rules.push(Rule::new(vec![], allowed));
            }
        }
        self.ruleset.add_chain(
            Table::Filter,
            Chain {
                name: name.clone(),
                rules,
            },
        );
        name
    }

    /// How `pod`'s chain of `dir` lets an allowed connection go: `return`, or, when
    /// an opt-in asks for allow records of it ([`Cluster::logs_allowed`]), a goto to
    /// the direction's allow log chain (added on first use), which logs and returns.
    fn allowed_target(&mut self, pod: &Pod, selected: &Selected<'_>, dir: Direction) -> Target {
        if !selected.logs_allowed(self.index.cluster, pod, dir) {
            return Target::Return;
        }
        let name = names::allow_log_chain(dir);
        if self.ruleset.chain(Table::Filter, name).is_none() {
            self.ruleset
                .add_chain(Table::Filter, deny_log::allow_log_chain(dir));
        }
        Target::Goto(name.to_string())
    }
}

pub(crate) fn pod_iface_prefixes() -> impl Iterator<Item = Interface> {
    names::POD_IFACE_PREFIXES.into_iter().map(Interface::prefix)
}

pub(crate) fn jump_rule(chain: &str) -> Rule {
    Rule::new(vec![], Target::Jump(chain.to_string()))
}

/// The policy dataplane of node `node` in the form `dataplane` needs: chains walked
/// per policy ([`compile`]) for iptables, the flat form ([`flat::compile`]) for
/// nftables.
pub fn compile_for(
    dataplane: crate::dataplane::DataplaneKind,
    cluster: &Cluster,
    node: &str,
    ifaces: &dyn InterfaceNames,
) -> Result<Ruleset, CompileError> {
    compile_for_with(dataplane, cluster, node, ifaces, None)
}

/// [`compile_for`], taking set contents from `cache` where a previous compile left
/// them ([`incremental`]); without a cache, a full compile that keeps nothing.
pub fn compile_for_with(
    dataplane: crate::dataplane::DataplaneKind,
    cluster: &Cluster,
    node: &str,
    ifaces: &dyn InterfaceNames,
    mut cache: Option<&mut SetCache>,
) -> Result<Ruleset, CompileError> {
    if let Some(c) = cache.as_deref_mut() {
        c.start();
    }
    let out = match dataplane {
        crate::dataplane::DataplaneKind::Iptables => {
            compile_with(cluster, node, ifaces, cache.as_deref_mut())
        }
        crate::dataplane::DataplaneKind::Nftables => {
            flat::compile_with(cluster, node, ifaces, cache.as_deref_mut())
        }
    };
    if let Some(c) = cache
        && out.is_ok()
    {
        c.finish();
    }
    out
}

/// Compiles the policy dataplane of node `node`: the local pods are the cluster's
/// non-hostNetwork pods whose `spec.nodeName` is `node`. The agent's own rules come
/// on top in [`crate::dataplane::node::node_ruleset`].
pub fn compile(
    cluster: &Cluster,
    node: &str,
    ifaces: &dyn InterfaceNames,
) -> Result<Ruleset, CompileError> {
    compile_with(cluster, node, ifaces, None)
}

fn compile_with(
    cluster: &Cluster,
    node: &str,
    ifaces: &dyn InterfaceNames,
    cache: Option<&mut SetCache>,
) -> Result<Ruleset, CompileError> {
    let mut c = Compiler {
        index: Index::new(cluster),
        ruleset: Ruleset::default(),
        cache,
        recording: None,
    };
    let mut dispatch = Dispatch::default();
    c.local_pods(node, ifaces, &mut dispatch)?;
    fail_closed_unknown_pods(cluster, ifaces, &mut dispatch)?;
    let filter = Table::Filter;
    let chains = dispatch
        .into_chains()
        .into_iter()
        .chain(forward_chains(true))
        .chain(input_chains(true));
    for chain in chains {
        c.ruleset.add_chain(filter, chain);
    }
    c.ruleset.jumps = builtin_jumps();
    Ok(c.ruleset)
}

/// The rules of the two dispatch chains, built up pod by pod.
#[derive(Default)]
pub(crate) struct Dispatch {
    /// `SLUICE-FROM-POD`: local pods' own addresses from their veths to their egress
    /// chains, then a drop of anything else from those veths (spoofed sources).
    pub(crate) from_pod: Vec<Rule>,
    /// `SLUICE-TO-POD`: local pods' veths to their ingress chains.
    pub(crate) to_pod: Vec<Rule>,
}

impl Dispatch {
    /// The two dispatch chains, `SLUICE-FROM-POD` and `SLUICE-TO-POD`.
    pub(crate) fn into_chains(self) -> [Chain; 2] {
        [
            Chain {
                name: names::CHAIN_FROM_POD.into(),
                rules: self.from_pod,
            },
            Chain {
                name: names::CHAIN_TO_POD.into(),
                rules: self.to_pod,
            },
        ]
    }
}

/// The iptables dispatch by group, gathered pod by pod: each group chain's
/// hash:net,iface members, and every local pod's veth.
#[derive(Default)]
struct Groups {
    /// Ingress group chain → `<pod address>,<veth>` of each of its pods' addresses.
    ingress: BTreeMap<String, BTreeSet<SetMember>>,
    /// Egress group chain → the same, the pod's own addresses on its veth.
    egress: BTreeMap<String, BTreeSet<SetMember>>,
    /// Every local pod's veth.
    veths: Vec<IfaceName>,
}

/// At most this many members of one hash:net,iface set share a network: the kernel
/// hashes the address and prefix but not the interface, so `0.0.0.0/0` on every veth
/// lands in one bucket, which holds 64 (`ipset add` answers "Hash is full" at the
/// 65th). Half of that, so a shard's share of a hash split stays clear of it.
const SAME_NET_PER_SET: usize = 32;

/// The shard of the local veth set ([`names::pod_veths_set`]) `veth` goes to, of
/// `shards` (a power of two).
fn veth_shard(veth: &IfaceName, shards: usize) -> usize {
    let h = names::hash16(veth.as_str().as_bytes());
    usize::from_str_radix(&h[..8], 16).unwrap_or(0) & (shards - 1)
}

impl Compiler<'_> {
    /// Step 1: every local pod joins its group chain of each direction (built, with
    /// the policy chains it jumps to, by the group's first pod); then one dispatch
    /// rule per group, matching the group's set.
    fn local_pods(
        &mut self,
        node: &str,
        ifaces: &dyn InterfaceNames,
        dispatch: &mut Dispatch,
    ) -> Result<(), CompileError> {
        let mut groups = Groups::default();
        for (pod, veth) in local_pod_veths(self.index.cluster, node, ifaces)? {
            self.local_pod(pod, &veth, &mut groups);
        }
        self.group_dispatch(groups, dispatch);
        Ok(())
    }

    fn local_pod(&mut self, pod: &Pod, veth: &str, groups: &mut Groups) {
        let selected = incremental::selected(&mut self.cache, self.index.cluster, pod);
        let ingress = selected.policies(Direction::Ingress);
        let egress = selected.policies(Direction::Egress);
        let tw = self.pod_group(pod, &selected, &ingress, Direction::Ingress);
        let fw = self.pod_group(pod, &selected, &egress, Direction::Egress);

        let iface = IfaceName::new(veth).expect("local_pod_veths checked the name");
        groups.veths.push(iface);
        // Only the pod's own addresses: to them out of its veth (what its /32 route
        // sends there), from them in from its veth (anti-spoofing).
        let own: BTreeSet<SetMember> = pod
            .ips
            .iter()
            .filter_map(v4)
            .map(|ip| SetMember::NetIface {
                net: Ipv4Net::from(ip),
                iface,
            })
            .collect();
        groups
            .ingress
            .entry(tw)
            .or_default()
            .extend(own.iter().copied());
        groups.egress.entry(fw).or_default().extend(own);
    }

    /// The dispatch rules and sets of the groups: `-m set --match-set <group set>
    /// dst,dst -g <group chain>` per ingress group, the same with `src,src` per
    /// egress group, then the spoofed-source drop of every local veth. A pod joining
    /// a group that exists changes set members only, never a rule.
    fn group_dispatch(&mut self, groups: Groups, dispatch: &mut Dispatch) {
        let lookup = |name: &str, direction| Match::Set {
            name: name.to_string(),
            direction,
            negated: false,
        };
        for (dir, members) in [
            (Direction::Ingress, groups.ingress),
            (Direction::Egress, groups.egress),
        ] {
            for (chain, members) in members {
                let set = names::pod_group_set(dir, &chain);
                let (rules, set_dir) = match dir {
                    Direction::Ingress => (&mut dispatch.to_pod, SetDirection::DstOutIface),
                    Direction::Egress => (&mut dispatch.from_pod, SetDirection::SrcInIface),
                };
                rules.push(Rule::new(vec![lookup(&set, set_dir)], Target::Goto(chain)));
                self.add_set(set, SetKind::HashNetIface, members);
            }
        }
        // Anything else from a known veth is spoofed. Its set holds `0.0.0.0/0` per
        // veth, so it is split in shards of about SAME_NET_PER_SET veths (a power of
        // two, by a hash of the name: a new pod lands in a shard that exists unless
        // the count doubles).
        let shards = groups
            .veths
            .len()
            .div_ceil(SAME_NET_PER_SET)
            .next_power_of_two();
        let mut sharded: BTreeMap<usize, BTreeSet<SetMember>> = BTreeMap::new();
        for veth in groups.veths {
            sharded
                .entry(veth_shard(&veth, shards))
                .or_default()
                .insert(SetMember::NetIface {
                    net: Ipv4Net::default(),
                    iface: veth,
                });
        }
        let spoofed = DenyTag::new(DenyReason::Spoofed, Direction::Egress, None);
        for (shard, members) in sharded {
            let set = names::pod_veths_set(shard);
            dispatch.from_pod.extend(deny_log::deny(
                vec![lookup(&set, SetDirection::SrcInIface)],
                &spoofed,
            ));
            self.add_set(set, SetKind::HashNetIface, members);
        }
    }
}

/// The group chain (iptables form) the dispatch chain of `dir` sends the packets of
/// the local pod on `veth` to: the goto of the rule whose set holds the veth.
pub fn pod_group_chain_of<'r>(rs: &'r Ruleset, veth: &str, dir: Direction) -> Option<&'r Chain> {
    let dispatch = match dir {
        Direction::Ingress => names::CHAIN_TO_POD,
        Direction::Egress => names::CHAIN_FROM_POD,
    };
    rs.chain(Table::Filter, dispatch)?
        .rules
        .iter()
        .find_map(|rule| {
            let (Some(Match::Set { name, .. }), Target::Goto(chain)) =
                (rule.matches.first(), &rule.target)
            else {
                return None;
            };
            let set = rs.sets.get(name)?;
            let member = set
                .members
                .iter()
                .any(|m| matches!(m, SetMember::NetIface { iface, .. } if iface.as_str() == veth));
            member.then_some(chain)
        })
        .and_then(|chain| rs.chain(Table::Filter, chain))
}

/// The local pods of `node` (non-hostNetwork, `spec.nodeName` is `node`) with their
/// host-side veths, checked: valid interface names, one pod per interface.
pub(crate) fn local_pod_veths<'c>(
    cluster: &'c Cluster,
    node: &str,
    ifaces: &dyn InterfaceNames,
) -> Result<Vec<(&'c Pod, String)>, CompileError> {
    let local = cluster
        .pods
        .values()
        .filter(|p| !p.host_network && p.node.as_deref() == Some(node))
        .map(|p| &**p);
    let mut seen_veths: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::new();
    for pod in local {
        let veth = ifaces.host_veth(pod);
        check_iface(&veth, || format!("pod {}", pod.key()))?;
        if let Some(other) = seen_veths.insert(veth.clone(), pod.key().to_string()) {
            // Two pods on one interface would police each other; the hash must differ.
            return Err(CompileError::BadInterface {
                name: veth,
                what: format!("pod {} (also used by {other})", pod.key()),
            });
        }
        out.push((pod, veth));
    }
    Ok(out)
}

/// Step 2: fail closed for pods sluice does not know yet (created after this
/// snapshot) in namespaces where some policy of that direction exists: their veth
/// starts with the namespace prefix but matched no rule of step 1.
pub(crate) fn fail_closed_unknown_pods(
    cluster: &Cluster,
    ifaces: &dyn InterfaceNames,
    dispatch: &mut Dispatch,
) -> Result<(), CompileError> {
    let mut ingress_ns = BTreeSet::new();
    let mut egress_ns = BTreeSet::new();
    for p in cluster.policies.values() {
        if p.policy_types.ingress {
            ingress_ns.insert(p.namespace.as_str());
        }
        if p.policy_types.egress {
            egress_ns.insert(p.namespace.as_str());
        }
    }
    let prefixes = |namespaces: BTreeSet<&str>| -> Result<BTreeSet<String>, CompileError> {
        namespaces
            .into_iter()
            .map(|ns| {
                let prefix = ifaces.namespace_prefix(ns);
                check_iface(&prefix, || format!("namespace prefix of {ns}"))?;
                Ok(prefix)
            })
            .collect()
    };
    let egress_prefixes = prefixes(egress_ns)?;
    let ingress_prefixes = prefixes(ingress_ns)?;
    let unknown = |dir| DenyTag::new(DenyReason::PodNotYetProgrammed, dir, None);
    for prefix in egress_prefixes {
        dispatch.from_pod.extend(deny_log::deny(
            vec![Match::InInterface(Interface::prefix(prefix))],
            &unknown(Direction::Egress),
        ));
    }
    for prefix in ingress_prefixes {
        dispatch.to_pod.extend(deny_log::deny(
            vec![Match::OutInterface(Interface::prefix(prefix))],
            &unknown(Direction::Ingress),
        ));
    }
    Ok(())
}

fn established() -> Match {
    Match::CtState(vec![CtState::Related, CtState::Established])
}

fn invalid() -> Match {
    Match::CtState(vec![CtState::Invalid])
}

/// Step 3: the forwarding path, conntrack first: `SLUICE-FORWARD` sends pod traffic
/// to `SLUICE-FWD-POD`, which checks the source's egress, then the destination's
/// ingress, and accepts what both allowed. `marks`: the per-policy form, whose
/// policy chains say "allowed" with [`MARK_ALLOW`], cleared before each direction;
/// the flat form decides by returning or dropping and needs no mark.
pub(crate) fn forward_chains(marks: bool) -> [Chain; 2] {
    let mut forward = Vec::new();
    for iface in pod_iface_prefixes() {
        forward.push(Rule::new(
            vec![Match::InInterface(iface.clone())],
            Target::Goto(names::CHAIN_FWD_POD.into()),
        ));
        forward.push(Rule::new(
            vec![Match::OutInterface(iface)],
            Target::Goto(names::CHAIN_FWD_POD.into()),
        ));
    }
    [
        Chain {
            name: names::CHAIN_FORWARD.into(),
            rules: forward,
        },
        Chain {
            name: names::CHAIN_FWD_POD.into(),
            rules: [
                Some(Rule::new(vec![established()], Target::Accept)),
                Some(Rule::new(vec![invalid()], Target::Drop)),
                marks.then(|| Rule::new(vec![], clear_allow())),
                Some(jump_rule(names::CHAIN_FROM_POD)),
                marks.then(|| Rule::new(vec![], clear_allow())),
                Some(jump_rule(names::CHAIN_TO_POD)),
                Some(Rule::new(vec![], Target::Accept)),
            ]
            .into_iter()
            .flatten()
            .collect(),
        },
    ]
}

/// Step 4: pod → node traffic, policed by the source's egress only, then left to the
/// host's own INPUT rules.
pub(crate) fn input_chains(marks: bool) -> [Chain; 2] {
    let input = pod_iface_prefixes()
        .map(|iface| {
            Rule::new(
                vec![Match::InInterface(iface)],
                Target::Goto(names::CHAIN_IN_POD.into()),
            )
        })
        .collect();
    [
        Chain {
            name: names::CHAIN_INPUT.into(),
            rules: input,
        },
        Chain {
            name: names::CHAIN_IN_POD.into(),
            rules: [
                Some(Rule::new(vec![established()], Target::Return)),
                Some(Rule::new(vec![invalid()], Target::Drop)),
                marks.then(|| Rule::new(vec![], clear_allow())),
                Some(jump_rule(names::CHAIN_FROM_POD)),
            ]
            .into_iter()
            .flatten()
            .collect(),
        },
    ]
}

/// Step 5: one jump per built-in chain into sluice's.
pub(crate) fn builtin_jumps() -> Vec<BuiltinJump> {
    vec![
        BuiltinJump {
            table: Table::Filter,
            chain: "FORWARD".into(),
            rule: jump_rule(names::CHAIN_FORWARD),
        },
        BuiltinJump {
            table: Table::Filter,
            chain: "INPUT".into(),
            rule: jump_rule(names::CHAIN_INPUT),
        },
    ]
}
