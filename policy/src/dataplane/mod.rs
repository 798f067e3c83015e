//! The dataplane model: what one node's kernel should hold, as typed values —
//! tables → chains → rules, the jumps from built-in chains, sets, and (nftables
//! only) verdict maps. Nothing here is a backend's syntax: [`crate::render`] turns
//! the model into `iptables-restore` and `ipset restore` text or into `nft -f` input,
//! and [`plan`] / [`nft_plan`] work out the least change from what the kernel holds.
//!
//! One model serves both dataplanes. The nftables form of the policy part
//! ([`crate::compile::flat`]) uses a few constructs iptables cannot express: address
//! interval sets ([`SetKind::AddrIntervals`]), concatenated interval tuple sets
//! ([`SetKind::AddrProtoPortIntervals`], looked up with [`Match::Tuple`]) and verdict
//! maps ([`VerdictMap`], dispatched with [`Target::Vmap`]). The iptables compiler never
//! produces them; [`Ruleset::check_iptables`] refuses a model that has them, and the
//! iptables/ipset renderers treat them as unreachable. Everything else (the agent's
//! own rules of [`node`]) is the same model code on both dataplanes.
//!
//! - [`crate::compile`] fills it with a node's policy chains and sets;
//! - [`node`] completes it with the agent's own rules (tunnel guard, NAT outgoing,
//!   held pods) into everything the agent programs on one node;
//! - [`plan`] diffs a desired model against the kernel's (or a previous model).

pub mod deny_log;
pub mod merge;
pub mod nft_plan;
pub mod node;
pub mod plan;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::model::{Pod, Protocol};
use merge::Merged;

/// The mark bit a policy rule sets when it allows a packet.
pub const MARK_ALLOW: u32 = 0x10000;
/// The mark bit a ClusterNetworkPolicy rule sets (iptables form) when it decides its
/// tier (Accept or Pass), so the walk over the tier's later policies stops.
pub const MARK_DECIDED: u32 = 0x20000;
/// All mark bits sluice may use (allow and decided), disjoint from kube-proxy's
/// 0x4000 (masquerade) and 0x8000 (drop).
pub const MARK_MASK: u32 = 0x30000;
/// nftables only: the mark bits holding a packet's peer address class while a group
/// chain decides it ([`crate::compile::classes`]). Clear of [`MARK_MASK`], of
/// kube-proxy's 0x4000 and 0x8000, and of Calico's default mark mask 0xffff0000.
/// Cleared before every class lookup, so an address in no class is class 0 and a
/// class left by an earlier lookup never decides.
pub const MARK_CLASS_MASK: u32 = 0x3fff;

/// The kernel dataplane a node's ruleset is built for and written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum DataplaneKind {
    /// iptables (legacy or nft backend) and ipset: [`crate::render::iptables`].
    #[default]
    Iptables,
    /// One nftables table of sluice's own: [`crate::render::nft`].
    Nftables,
}

impl DataplaneKind {
    /// `iptables` or `nftables`: the spelling of flags, ConfigMap keys and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DataplaneKind::Iptables => "iptables",
            DataplaneKind::Nftables => "nftables",
        }
    }
}

/// An iptables table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Raw,
    Mangle,
    Nat,
    Filter,
}

impl Table {
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Raw => "raw",
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Filter => "filter",
        }
    }
}

/// An interface match: `eth0`, or a prefix `slc+` when `wildcard`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Interface {
    pub name: String,
    pub wildcard: bool,
}

impl Interface {
    pub fn exact(name: impl Into<String>) -> Self {
        Interface {
            name: name.into(),
            wildcard: false,
        }
    }
    pub fn prefix(name: impl Into<String>) -> Self {
        Interface {
            name: name.into(),
            wildcard: true,
        }
    }
    /// Whether a packet's interface `iface` matches, as the kernel decides it.
    pub fn matches(&self, iface: &str) -> bool {
        if self.wildcard {
            iface.starts_with(&self.name)
        } else {
            iface == self.name
        }
    }
}

/// Which packet fields an ipset lookup uses (`--match-set NAME src|dst|dst,dst`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetDirection {
    /// Source address.
    Src,
    /// Destination address.
    Dst,
    /// Destination address and destination port (hash:ip,port).
    DstDstPort,
    /// iptables only: source address and incoming interface (hash:net,iface,
    /// `src,src`).
    SrcInIface,
    /// iptables only: destination address and outgoing interface (hash:net,iface,
    /// `dst,dst`).
    DstOutIface,
}

/// Conntrack states sluice matches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CtState {
    New,
    Established,
    Related,
    Invalid,
}

/// One match of a rule; a rule matches when all of its matches do.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Match {
    InInterface(Interface),
    OutInterface(Interface),
    Source {
        net: Ipv4Net,
        negated: bool,
    },
    Destination {
        net: Ipv4Net,
        negated: bool,
    },
    Protocol(Protocol),
    /// An IP protocol by number, for what has no [`Protocol`] of its own (4: IPIP).
    IpProtocol(u8),
    /// Destination port range, inclusive; needs a [`Match::Protocol`] before it.
    DestinationPorts {
        start: u16,
        end: u16,
    },
    /// Membership in an ipset; `negated` matches non-members.
    Set {
        name: String,
        direction: SetDirection,
        negated: bool,
    },
    /// nftables only: `ip saddr . meta l4proto . th dport @set` ([`SetDirection::Src`])
    /// or `ip daddr . …` (any other direction) in a [`SetKind::AddrProtoPortIntervals`]
    /// set. Meaningful for TCP, UDP and SCTP only: no element names another protocol.
    Tuple {
        set: String,
        direction: SetDirection,
    },
    CtState(Vec<CtState>),
    Mark {
        value: u32,
        mask: u32,
    },
    /// iptables only (`-m comment`): names what a rule stands for, e.g. the
    /// ClusterNetworkPolicy rule a drop enforces; always matches. Part of the rule's
    /// text, so of its identity hash too; the nftables renderer leaves it out.
    Comment(String),
    /// nftables only: `meta mark & MARK_CLASS_MASK . meta l4proto . th dport @set`
    /// in a [`SetKind::ClassProtoPortIntervals`] set: the peer's address class (set
    /// by a [`Target::AddrVmap`] lookup just before), protocol and port.
    ClassTuple {
        set: String,
    },
    /// nftables only: `meta mark & MARK_CLASS_MASK @set` in a
    /// [`SetKind::ClassIntervals`] set.
    ClassSet {
        set: String,
    },
}

/// What a rule does when it matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Accept,
    Drop,
    Return,
    Jump(String),
    /// `-g`: like a jump, but a RETURN goes back to the chain that jumped here.
    Goto(String),
    /// `-j MARK --set-xmark value/mask`: `mark = (mark & !mask) ^ value`, and go on.
    SetMark {
        value: u32,
        mask: u32,
    },
    /// Source NAT to the outgoing interface's address (nat table, POSTROUTING).
    Masquerade,
    /// nftables only: look the packet up in the verdict map of this name (its
    /// [`MapKey`] says with what) and take the element's verdict; no element: the
    /// rule does not apply and the next rule is evaluated.
    Vmap(String),
    /// nftables only: the same with a [`MapKey::Addr`] map, looked up by the
    /// packet's source ([`SetDirection::Src`]) or destination address.
    AddrVmap {
        map: String,
        direction: SetDirection,
    },
    /// Non-terminal: emit a kernel log record (NFLOG / `log group`), rate-limited,
    /// and go on with the next rule. See [`deny_log`].
    Log(deny_log::LogSpec),
}

/// One rule: its matches, ANDed, and its target. Its identity comment
/// (`sluice:<hash>`) is computed when rendering, from the chain and position.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub target: Target,
}

impl Rule {
    pub fn new(matches: Vec<Match>, target: Target) -> Self {
        Rule { matches, target }
    }
}

/// A chain sluice owns, written whole.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Chain {
    pub name: String,
    pub rules: Vec<Rule>,
}

/// A rule sluice needs in a built-in chain (the agent inserts it at the top, once,
/// and checks it is still there; it is never part of a chain rewrite).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BuiltinJump {
    pub table: Table,
    /// `FORWARD`, `INPUT`, `POSTROUTING`, ...
    pub chain: String,
    pub rule: Rule,
}

/// The kind of an ipset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetKind {
    /// `hash:ip`: pod addresses.
    HashIp,
    /// `hash:net`: ipBlocks, excepts as `nomatch`.
    HashNet,
    /// `hash:ip,port`: named ports resolved per pod.
    HashIpPort,
    /// `hash:net,iface` of [`SetMember::NetIface`]s: the iptables dispatch of a group
    /// of local pods (their veths, with the addresses they may use).
    HashNetIface,
    /// nftables only: `type ipv4_addr; flags interval` of [`SetMember::Range`]s,
    /// disjoint.
    AddrIntervals,
    /// nftables only: `type ipv4_addr . inet_proto . inet_service; flags interval` of
    /// [`SetMember::Tuple`]s, disjoint (the kernel refuses overlapping elements).
    AddrProtoPortIntervals,
    /// nftables only: `type mark . inet_proto . inet_service; flags interval` of
    /// [`SetMember::ClassTuple`]s, disjoint: address classes × protocol × ports.
    ClassProtoPortIntervals,
    /// nftables only: `type mark; flags interval` of [`SetMember::Classes`].
    ClassIntervals,
}

/// One member of an ipset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetMember {
    Ip(Ipv4Addr),
    /// `nomatch`: a lookup whose most specific hit is this entry does not match.
    Net {
        net: Ipv4Net,
        nomatch: bool,
    },
    IpPort {
        ip: Ipv4Addr,
        protocol: Protocol,
        port: u16,
    },
    /// A network on one interface (hash:net,iface): a packet matches with its
    /// address in `net` and its interface (incoming or outgoing, as the lookup's
    /// [`SetDirection`] says) named `iface`.
    NetIface {
        net: Ipv4Net,
        iface: IfaceName,
    },
    /// An inclusive address range (nftables interval sets).
    Range(AddrRange),
    /// Addresses × protocol × inclusive port range (nftables tuple sets).
    Tuple {
        addrs: AddrRange,
        protocol: Protocol,
        ports: PortRange,
    },
    /// Address classes × protocol × inclusive port range (nftables class sets).
    ClassTuple {
        classes: ClassRange,
        protocol: Protocol,
        ports: PortRange,
    },
    /// An inclusive range of address classes.
    Classes(ClassRange),
}

/// A Linux interface name held by value (at most `IFNAMSIZ - 1` bytes), so that a
/// [`SetMember`] naming one stays `Copy` like the others.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfaceName {
    // NUL-padded: byte order is the names' order.
    bytes: [u8; 15],
    len: u8,
}

impl IfaceName {
    /// `None` for a name the kernel would refuse as too long, or an empty one.
    pub fn new(name: &str) -> Option<Self> {
        let len = name.len();
        if len == 0 || len > 15 || name.as_bytes().contains(&0) {
            return None;
        }
        let mut bytes = [0; 15];
        bytes[..len].copy_from_slice(name.as_bytes());
        Some(IfaceName {
            bytes,
            len: len as u8,
        })
    }

    pub fn as_str(&self) -> &str {
        // Built from a `&str` only, cut at its own length.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }
}

impl std::fmt::Debug for IfaceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl std::fmt::Display for IfaceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inclusive range of address class ids ([`MARK_CLASS_MASK`] bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassRange {
    pub start: u32,
    pub end: u32,
}

impl ClassRange {
    pub fn contains(&self, class: u32) -> bool {
        self.start <= class && class <= self.end
    }
}

/// An inclusive IPv4 address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

impl AddrRange {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.start <= ip && ip <= self.end
    }
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.start <= port && port <= self.end
    }
}

/// What a verdict map is keyed by, which is also what the dispatching rule looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MapKey {
    /// `oifname`.
    OutIface,
    /// `iifname`.
    InIface,
    /// `iifname . ip saddr`: a pod's veth and one of its own addresses.
    InIfaceSource,
    /// `ip saddr` or `ip daddr` (the [`Target::AddrVmap`] says which), keys
    /// disjoint address ranges (`flags interval`).
    Addr,
}

/// One key of a verdict map, matching its [`MapKey`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MapKeyValue {
    Iface(String),
    IfaceAddr(String, Ipv4Addr),
    Range(AddrRange),
}

/// The verdict of a map element.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MapVerdict {
    Accept,
    Drop,
    Return,
    /// Go on with the rule after the lookup.
    Continue,
    Jump(String),
    Goto(String),
}

/// An nftables verdict map sluice owns (`type <key> : verdict`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VerdictMap {
    pub name: String,
    pub key: MapKey,
    pub elements: BTreeMap<MapKeyValue, MapVerdict>,
}

/// An ipset sluice owns.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpSet {
    pub name: String,
    pub kind: SetKind,
    pub members: BTreeSet<SetMember>,
}

/// The dataplane of one node: chains per table, sets, and the jumps from built-in
/// chains. [`crate::compile::compile`] gives the policy part; [`node::node_ruleset`]
/// the whole of what the agent programs. A table present with no chains is still
/// synced, so chains of a feature turned off are removed from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub tables: BTreeMap<Table, BTreeMap<String, Chain>>,
    pub sets: BTreeMap<String, IpSet>,
    pub jumps: Vec<BuiltinJump>,
    /// nftables only: verdict maps, by name (one namespace with [`Ruleset::sets`]).
    pub maps: BTreeMap<String, VerdictMap>,
    /// nftables only: a chain's comment (e.g. the policies isolating a group chain),
    /// by chain name. It names, it does not decide: never part of a rule's identity.
    pub chain_comments: BTreeMap<String, String>,
    /// The policies behind each isolation log id ([`deny_log::DenyTag::id`]): every
    /// policy that isolated the pods of that chain, as `NS/NAME`. What the agent
    /// reads to name the policies of a denied connection.
    pub deny_policies: BTreeMap<String, Vec<String>>,
}

impl Ruleset {
    /// Adds (or replaces) a chain in `table`.
    pub fn add_chain(&mut self, table: Table, chain: Chain) {
        self.tables
            .entry(table)
            .or_default()
            .insert(chain.name.clone(), chain);
    }

    pub fn chain(&self, table: Table, name: &str) -> Option<&Chain> {
        self.tables.get(&table).and_then(|t| t.get(name))
    }

    /// Rules in chains sluice owns (built-in jumps excluded).
    pub fn rule_count(&self) -> usize {
        self.tables
            .values()
            .flat_map(|t| t.values())
            .map(|c| c.rules.len())
            .sum()
    }

    pub fn chain_count(&self) -> usize {
        self.tables.values().map(|t| t.len()).sum()
    }

    pub fn set_member_count(&self) -> usize {
        self.sets.values().map(|s| s.members.len()).sum()
    }

    /// Elements of every verdict map.
    pub fn map_element_count(&self) -> usize {
        self.maps.values().map(|m| m.elements.len()).sum()
    }

    /// Make `self` equal to `desired`, copying only what differs: a chain, set
    /// member or map element equal in both is kept, not cloned again. What a
    /// dataplane that remembers its last write does after each write: a new pod
    /// changes a handful of the model's thousands of elements, and copying the
    /// whole model for it costs more than planning the change.
    pub fn assign(&mut self, desired: &Ruleset) {
        assign_map(&mut self.tables, &desired.tables, |have, want| {
            assign_map(have, want, Clone::clone_from)
        });
        assign_map(&mut self.sets, &desired.sets, |have, want| {
            have.kind = want.kind;
            assign_set(&mut have.members, &want.members);
        });
        if self.jumps != desired.jumps {
            self.jumps.clone_from(&desired.jumps);
        }
        assign_map(&mut self.maps, &desired.maps, |have, want| {
            have.key = want.key;
            assign_map(&mut have.elements, &want.elements, Clone::clone_from);
        });
        assign_map(
            &mut self.chain_comments,
            &desired.chain_comments,
            Clone::clone_from,
        );
        assign_map(
            &mut self.deny_policies,
            &desired.deny_policies,
            Clone::clone_from,
        );
    }

    /// Whether iptables and ipset can hold this model: none of the nftables-only
    /// constructs (verdict maps, tuple lookups, interval sets). The iptables planner
    /// checks it, so an nftables-form model never reaches `iptables-restore`.
    pub fn check_iptables(&self) -> Result<(), ModelError> {
        let nft_only = |what: String| Err(ModelError::NftOnly(what));
        if let Some(m) = self.maps.keys().next() {
            return nft_only(format!("verdict map {m}"));
        }
        for set in self.sets.values() {
            if matches!(
                set.kind,
                SetKind::AddrIntervals
                    | SetKind::AddrProtoPortIntervals
                    | SetKind::ClassProtoPortIntervals
                    | SetKind::ClassIntervals
            ) {
                return nft_only(format!("interval set {}", set.name));
            }
        }
        let rules = self
            .tables
            .values()
            .flat_map(|t| t.values())
            .flat_map(|c| c.rules.iter().map(move |r| (&c.name, r)))
            .chain(self.jumps.iter().map(|j| (&j.chain, &j.rule)));
        for (chain, rule) in rules {
            let tuple = rule.matches.iter().any(|m| {
                matches!(
                    m,
                    Match::Tuple { .. } | Match::ClassTuple { .. } | Match::ClassSet { .. }
                )
            });
            if tuple || matches!(rule.target, Target::Vmap(_) | Target::AddrVmap { .. }) {
                return nft_only(format!("a rule of chain {chain}"));
            }
        }
        Ok(())
    }
}

/// `have` made equal to `want`: keys `want` lacks removed, values that differ
/// brought over by `update` (which leaves them equal), missing ones cloned. One merge
/// walk over both maps, then the removals and insertions it found: a lookup per key
/// (a tree descent each) cost a changed map of thousands of elements twice its size
/// in descents.
fn assign_map<K: Ord + Clone, V: PartialEq + Clone>(
    have: &mut BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    update: impl Fn(&mut V, &V),
) {
    let mut gone = Vec::new();
    let mut new = Vec::new();
    for step in merge::merge_by(have.iter_mut(), want, |h, w| h.0.cmp(w.0)) {
        match step {
            Merged::Left((k, _)) => gone.push(k.clone()),
            Merged::Right((k, w)) => new.push((k.clone(), w.clone())),
            Merged::Both((_, h), (_, w)) => {
                if *h != *w {
                    update(h, w);
                }
            }
        }
    }
    for k in &gone {
        have.remove(k);
    }
    have.extend(new);
}

fn assign_set<T: Ord + Clone>(have: &mut BTreeSet<T>, want: &BTreeSet<T>) {
    let mut gone = Vec::new();
    let mut new = Vec::new();
    for step in merge::merge_by(have.iter(), want, |h, w| h.cmp(w)) {
        match step {
            Merged::Left(m) => gone.push(m.clone()),
            Merged::Right(m) => new.push(m.clone()),
            Merged::Both(..) => {}
        }
    }
    for m in &gone {
        have.remove(m);
    }
    have.extend(new);
}

/// How the caller names interfaces. The agent implements it with the CNI plugin's
/// naming rule (this crate must not depend on the CNI plugin); tests use fakes.
pub trait InterfaceNames {
    /// The host-side veth of a pod on this node.
    fn host_veth(&self, pod: &Pod) -> String;
    /// The prefix every host-side veth of a pod of `namespace` starts with
    /// (`slcXXXX`), used to fail closed on pods not known yet.
    fn namespace_prefix(&self, namespace: &str) -> String;
}

/// A model that must not reach the kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error(
        "chain {0} does not start with {prefix}: sluice only writes chains it owns",
        prefix = crate::names::PREFIX
    )]
    NotOwned(String),
    #[error("chain {chain} jumps to {target}, which is neither built in nor desired")]
    DanglingJump { chain: String, target: String },
    #[error("{0} is an nftables-only construct: iptables and ipset cannot hold it")]
    NftOnly(String),
    #[error("rule of chain {chain} looks up {name}, which is not a desired set or map")]
    DanglingLookup { chain: String, name: String },
    #[error("{0} names two objects (a chain in two tables, or a set and a map)")]
    Collision(String),
}

impl Ruleset {
    /// Owned names only, and every jump or goto to a chain of ours lands on a chain
    /// of the same table.
    pub fn validate(&self) -> Result<(), ModelError> {
        let target = |rule: &Rule| match &rule.target {
            Target::Jump(t) | Target::Goto(t) => Some(t.clone()),
            _ => None,
        };
        let empty = BTreeMap::new();
        // Verdict maps hold thousands of elements (the address-class map) over a few
        // hundred chains: one hash lookup per element, not a tree descent per table.
        let chain_names: HashSet<&str> = self
            .tables
            .values()
            .flat_map(|c| c.keys().map(String::as_str))
            .collect();
        let any_chain = |t: &str| chain_names.contains(t);
        for map in self.maps.values() {
            for v in map.elements.values() {
                if let MapVerdict::Jump(t) | MapVerdict::Goto(t) = v
                    && !any_chain(t)
                {
                    return Err(ModelError::DanglingJump {
                        chain: map.name.clone(),
                        target: t.clone(),
                    });
                }
            }
        }
        for chains in self.tables.values() {
            for chain in chains.values() {
                if !chain.name.starts_with(crate::names::PREFIX) {
                    return Err(ModelError::NotOwned(chain.name.clone()));
                }
                for rule in &chain.rules {
                    let lookup = match &rule.target {
                        Target::Vmap(m) | Target::AddrVmap { map: m, .. }
                            if !self.maps.contains_key(m) =>
                        {
                            Some(m)
                        }
                        _ => rule.matches.iter().find_map(|m| match m {
                            Match::Tuple { set, .. }
                            | Match::ClassTuple { set }
                            | Match::ClassSet { set }
                                if !self.sets.contains_key(set) =>
                            {
                                Some(set)
                            }
                            _ => None,
                        }),
                    };
                    if let Some(name) = lookup {
                        return Err(ModelError::DanglingLookup {
                            chain: chain.name.clone(),
                            name: name.clone(),
                        });
                    }
                }
                for t in chain.rules.iter().filter_map(target) {
                    if t.starts_with(crate::names::PREFIX) && !chains.contains_key(&t) {
                        return Err(ModelError::DanglingJump {
                            chain: chain.name.clone(),
                            target: t,
                        });
                    }
                }
            }
        }
        for j in &self.jumps {
            let chains = self.tables.get(&j.table).unwrap_or(&empty);
            match target(&j.rule) {
                Some(t) if chains.contains_key(&t) => {}
                t => {
                    return Err(ModelError::DanglingJump {
                        chain: j.chain.clone(),
                        target: t.unwrap_or_else(|| "(none)".into()),
                    });
                }
            }
        }
        Ok(())
    }

    /// The chain `name` of `table`, created empty when missing.
    pub fn chain_mut(&mut self, table: Table, name: &str) -> &mut Chain {
        self.tables
            .entry(table)
            .or_default()
            .entry(name.to_string())
            .or_insert_with(|| Chain {
                name: name.to_string(),
                rules: Vec::new(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Sets = BTreeMap<u8, BTreeSet<u8>>;
    type Maps = BTreeMap<u8, BTreeMap<u8, u8>>;

    /// Small sets and maps whose names, members and elements overlap between draws.
    fn ruleset(sets: &Sets, maps: &Maps) -> Ruleset {
        let mut rs = Ruleset::default();
        for (n, members) in sets {
            let name = format!("SLUICE-S{n}");
            let members = members
                .iter()
                .map(|m| SetMember::Ip(Ipv4Addr::new(10, 0, 0, *m)))
                .collect();
            rs.sets.insert(
                name.clone(),
                IpSet {
                    name,
                    kind: SetKind::HashIp,
                    members,
                },
            );
        }
        for (n, elements) in maps {
            let name = format!("SLUICE-M{n}");
            let elements = elements
                .iter()
                .map(|(k, v)| {
                    let verdict = match v {
                        0 => MapVerdict::Accept,
                        v => MapVerdict::Jump(format!("SLUICE-C{v}")),
                    };
                    (MapKeyValue::Iface(format!("slc{k}")), verdict)
                })
                .collect();
            rs.maps.insert(
                name.clone(),
                VerdictMap {
                    name,
                    key: MapKey::OutIface,
                    elements,
                },
            );
        }
        rs
    }

    fn sets() -> impl Strategy<Value = Sets> {
        prop::collection::btree_map(0u8..4, prop::collection::btree_set(0u8..40, 0..20), 0..4)
    }

    fn maps() -> impl Strategy<Value = Maps> {
        prop::collection::btree_map(
            0u8..4,
            prop::collection::btree_map(0u8..30, 0u8..3, 0..20),
            0..4,
        )
    }

    proptest! {
        #[test]
        fn assign_brings_the_last_write_up_to_the_next_model(
            (sa, ma) in (sets(), maps()),
            (sb, mb) in (sets(), maps()),
        ) {
            let (old, new) = (ruleset(&sa, &ma), ruleset(&sb, &mb));
            let mut kept = old.clone();
            kept.assign(&new);
            prop_assert_eq!(&kept, &new);
            kept.assign(&old);
            prop_assert_eq!(kept, old);
        }
    }
}
