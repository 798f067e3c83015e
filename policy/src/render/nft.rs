//! `nft -f` input from a [`Ruleset`]: sluice's one table, `ip sluice`, holding every
//! chain, set and verdict map of the model. Nothing outside that table is ever
//! written, so kube-proxy's, Docker's and iptables-nft's tables are left alone by
//! construction.
//!
//! Layout of the table:
//! - every [`BuiltinJump`] becomes a rule of a base chain of sluice's own at that
//!   hook, policy accept: `FORWARD` (`type filter hook forward priority filter`),
//!   `INPUT` (`hook input`), and for the nat table `NAT-POSTROUTING` (`type nat hook
//!   postrouting priority srcnat`). Base chains of other tables than filter are named
//!   `<TABLE>-<HOOK>` so the two tables of the model share one nft table. An `accept`
//!   here ends sluice's table only: another table's base chain at the same hook
//!   (Docker's FORWARD policy DROP through iptables-nft) still decides too.
//! - the model's chains of every table keep their names (one namespace: the model
//!   never uses one name in two tables, [`crate::dataplane::ModelError::Collision`]);
//! - ipsets become nft sets: `hash:ip` a plain `ipv4_addr` set; `hash:net` an
//!   `ipv4_addr` interval set whose elements are the disjoint ranges the most
//!   specific entries decide (a `nomatch` entry cut out of its net); `hash:ip,port`
//!   and [`SetKind::AddrProtoPortIntervals`] an `ipv4_addr . inet_proto .
//!   inet_service` interval set; [`SetKind::AddrIntervals`] an `ipv4_addr` interval
//!   set;
//!   [`SetKind::ClassProtoPortIntervals`] a `mark . inet_proto . inet_service`
//!   interval set and [`SetKind::ClassIntervals`] a `mark` interval set (address
//!   classes in [`crate::dataplane::MARK_CLASS_MASK`]);
//! - verdict maps become `map`s (`type ifname : verdict`, `type ifname . ipv4_addr :
//!   verdict`, `type ipv4_addr : verdict; flags interval` for the address class map).
//!
//! Every rule carries `comment "sluice:<hash>"`, from the iptables renderer's hash
//! ([`iptables::rule_hash`]: chain, previous hash, rule text), here over the nft text
//! of the rule and chained over the previous rule's. The planner compares chains by
//! these.
//!
//! The script is a list of commands, never a `table { }` block, so one vocabulary
//! (`add chain`, `add set`, `add element`, `add rule`, …) serves the full render and
//! the planner's increments. Interface names are quoted (`"slc*"` is the prefix
//! wildcard); chain names never use the keyword `fwd`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::super::dataplane::Ruleset;
use super::iptables;
use crate::compile::intervals::Painter;
use crate::dataplane::{
    BuiltinJump, Chain, CtState, Interface, IpSet, MARK_CLASS_MASK, MapKey, MapKeyValue,
    MapVerdict, Match, Rule, SetDirection, SetKind, SetMember, Table, Target, VerdictMap,
};
use crate::model::Protocol;

/// The table's family and name: `ip sluice`.
pub const FAMILY: &str = "ip";
pub const TABLE: &str = "sluice";
/// The probe's throwaway table.
pub const PROBE_TABLE: &str = "sluice-probe";

/// The complete table as `nft -f` input that creates it, or replaces an existing one,
/// in one transaction (`add table`, `delete table`, then the table's full text).
pub fn render(ruleset: &Ruleset) -> String {
    let mut out = format!("add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n");
    out.push_str(&create_script(ruleset, TABLE));
    out
}

/// Commands creating every object of `ruleset` in an empty or absent table `table`.
fn create_script(ruleset: &Ruleset, table: &str) -> String {
    let mut out = format!("add table {FAMILY} {table}\n");
    let chains = chains(ruleset);
    for c in chains.values() {
        out.push_str(&add_chain_line(table, c));
    }
    let sets = sets(ruleset);
    for s in sets.values() {
        out.push_str(&add_set_line(table, s));
    }
    for s in sets.values() {
        push_elements(&mut out, "add", table, &s.name, s.elements.iter());
    }
    for c in chains.values() {
        push_rules(&mut out, table, c);
    }
    out
}

/// `nft -f` input that removes sluice's table and everything in it, and succeeds when
/// there is none (`add table` first, then `delete table`, one transaction).
pub fn delete_script() -> String {
    format!("add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")
}

/// A throwaway table using every nftables feature the renderer emits (concatenated
/// interval sets, verdict maps, the hooks and priorities), for `nft --check -f -`:
/// the kernel validates it in a transaction that is never committed. Success means
/// the host can run the nftables dataplane.
pub fn probe_script() -> String {
    format!(
        "add table {FAMILY} {PROBE_TABLE}\ndelete table {FAMILY} {PROBE_TABLE}\n{}\
         delete table {FAMILY} {PROBE_TABLE}\n",
        create_script(&probe_ruleset(), PROBE_TABLE)
    )
}

/// A small model with one of everything the renderer can emit (the probe's, and
/// tests' of every set and map kind).
pub fn probe_ruleset() -> Ruleset {
    use crate::dataplane::{AddrRange, ClassRange, PortRange};
    let ip = |s: &str| s.parse::<Ipv4Addr>().expect("literal address");
    let mut rs = Ruleset::default();
    let set = |name: &str, kind, members: Vec<SetMember>| IpSet {
        name: name.into(),
        kind,
        members: members.into_iter().collect(),
    };
    for s in [
        set(
            "SLUICE-T",
            SetKind::AddrProtoPortIntervals,
            vec![SetMember::Tuple {
                addrs: AddrRange {
                    start: ip("10.0.0.0"),
                    end: ip("10.0.0.9"),
                },
                protocol: Protocol::Sctp,
                ports: PortRange { start: 80, end: 90 },
            }],
        ),
        set(
            "SLUICE-A",
            SetKind::AddrIntervals,
            vec![SetMember::Range(AddrRange {
                start: ip("10.0.0.0"),
                end: ip("10.0.0.9"),
            })],
        ),
        set(
            "SLUICE-CT",
            SetKind::ClassProtoPortIntervals,
            vec![SetMember::ClassTuple {
                classes: ClassRange { start: 0, end: 7 },
                protocol: Protocol::Tcp,
                ports: PortRange { start: 80, end: 90 },
            }],
        ),
        set(
            "SLUICE-CA",
            SetKind::ClassIntervals,
            vec![SetMember::Classes(ClassRange { start: 3, end: 3 })],
        ),
        set(
            "SLUICE-I",
            SetKind::HashIp,
            vec![SetMember::Ip(ip("10.0.0.1"))],
        ),
        set(
            "SLUICE-N",
            SetKind::HashNet,
            vec![
                SetMember::Net {
                    net: "10.0.0.0/8".parse().expect("literal"),
                    nomatch: false,
                },
                SetMember::Net {
                    net: "10.1.0.0/16".parse().expect("literal"),
                    nomatch: true,
                },
            ],
        ),
    ] {
        rs.sets.insert(s.name.clone(), s);
    }
    let chain = |name: &str, rules| Chain {
        name: name.into(),
        rules,
    };
    let group = "SLUICE-G";
    rs.chain_comments.insert(group.into(), "probe".into());
    let iface = |n: &str| Interface::exact(n);
    let map = |name: &str, key, elements: Vec<(MapKeyValue, MapVerdict)>| VerdictMap {
        name: name.into(),
        key,
        elements: elements.into_iter().collect(),
    };
    for m in [
        map(
            "SLUICE-MO",
            MapKey::OutIface,
            vec![
                (
                    MapKeyValue::Iface("slc0".into()),
                    MapVerdict::Goto(group.into()),
                ),
                (MapKeyValue::Iface("slc1".into()), MapVerdict::Return),
                (
                    MapKeyValue::Iface("slc2".into()),
                    MapVerdict::Jump(group.into()),
                ),
                (MapKeyValue::Iface("slc3".into()), MapVerdict::Continue),
                (MapKeyValue::Iface("slc4".into()), MapVerdict::Accept),
            ],
        ),
        map(
            "SLUICE-MC",
            MapKey::Addr,
            vec![(
                MapKeyValue::Range(AddrRange {
                    start: ip("10.0.0.0"),
                    end: ip("10.0.0.9"),
                }),
                MapVerdict::Jump("SLUICE-C".into()),
            )],
        ),
        map(
            "SLUICE-MI",
            MapKey::InIface,
            vec![(MapKeyValue::Iface("slc0".into()), MapVerdict::Drop)],
        ),
        map(
            "SLUICE-MS",
            MapKey::InIfaceSource,
            vec![(
                MapKeyValue::IfaceAddr("slc0".into(), ip("10.0.0.1")),
                MapVerdict::Goto(group.into()),
            )],
        ),
    ] {
        rs.maps.insert(m.name.clone(), m);
    }
    rs.add_chain(
        Table::Filter,
        chain(
            "SLUICE-C",
            vec![Rule::new(
                vec![],
                Target::SetMark {
                    value: 3,
                    mask: MARK_CLASS_MASK,
                },
            )],
        ),
    );
    rs.add_chain(
        Table::Filter,
        chain(
            group,
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
                        map: "SLUICE-MC".into(),
                        direction: SetDirection::Dst,
                    },
                ),
                Rule::new(
                    vec![Match::ClassTuple {
                        set: "SLUICE-CT".into(),
                    }],
                    Target::Return,
                ),
                Rule::new(
                    vec![Match::ClassSet {
                        set: "SLUICE-CA".into(),
                    }],
                    Target::Return,
                ),
                Rule::new(
                    vec![Match::Tuple {
                        set: "SLUICE-T".into(),
                        direction: SetDirection::Src,
                    }],
                    Target::Return,
                ),
                Rule::new(
                    vec![Match::Set {
                        name: "SLUICE-A".into(),
                        direction: SetDirection::Dst,
                        negated: true,
                    }],
                    Target::Return,
                ),
                Rule::new(vec![], Target::Drop),
            ],
        ),
    );
    rs.add_chain(
        Table::Filter,
        chain(
            "SLUICE-F",
            vec![
                Rule::new(
                    vec![Match::CtState(vec![CtState::Established, CtState::Related])],
                    Target::Accept,
                ),
                Rule::new(vec![Match::CtState(vec![CtState::Invalid])], Target::Drop),
                Rule::new(vec![], Target::Vmap("SLUICE-MS".into())),
                Rule::new(vec![], Target::Vmap("SLUICE-MI".into())),
                Rule::new(vec![], Target::Vmap("SLUICE-MO".into())),
                Rule::new(
                    vec![
                        Match::InInterface(Interface::prefix("slc")),
                        Match::Protocol(Protocol::Udp),
                        Match::DestinationPorts {
                            start: 4789,
                            end: 4789,
                        },
                    ],
                    Target::Drop,
                ),
                Rule::new(
                    vec![Match::OutInterface(iface("eth0")), Match::IpProtocol(4)],
                    Target::Goto(group.into()),
                ),
                Rule::new(
                    vec![Match::Source {
                        net: "10.0.0.0/8".parse().expect("literal"),
                        negated: true,
                    }],
                    Target::Jump(group.into()),
                ),
                Rule::new(
                    vec![Match::Set {
                        name: "SLUICE-I".into(),
                        direction: SetDirection::Src,
                        negated: false,
                    }],
                    Target::Accept,
                ),
            ],
        ),
    );
    rs.add_chain(
        Table::Nat,
        chain(
            "SLUICE-NATO",
            vec![Rule::new(
                vec![
                    Match::Set {
                        name: "SLUICE-N".into(),
                        direction: SetDirection::Src,
                        negated: false,
                    },
                    Match::Set {
                        name: "SLUICE-N".into(),
                        direction: SetDirection::Dst,
                        negated: true,
                    },
                ],
                Target::Masquerade,
            )],
        ),
    );
    rs.jumps = vec![
        BuiltinJump {
            table: Table::Filter,
            chain: "FORWARD".into(),
            rule: Rule::new(vec![], Target::Jump("SLUICE-F".into())),
        },
        BuiltinJump {
            table: Table::Filter,
            chain: "INPUT".into(),
            rule: Rule::new(vec![], Target::Jump("SLUICE-F".into())),
        },
        BuiltinJump {
            table: Table::Nat,
            chain: "POSTROUTING".into(),
            rule: Rule::new(vec![], Target::Jump("SLUICE-NATO".into())),
        },
    ];
    rs
}

// ---- the table's objects as text: one source for the render and the state ----

/// A chain of the nft table: its declaration (empty for a regular chain, the hook
/// spec for a base chain), comment, and rules with their identity hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftChain {
    pub name: String,
    /// `type filter hook forward priority 0; policy accept;` or empty.
    pub hook: Option<BaseHook>,
    pub comment: Option<String>,
    /// (rule text without comment, identity hash), in order.
    pub rules: Vec<(String, String)>,
}

/// A base chain's hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BaseHook {
    /// `filter` or `nat`.
    pub kind: &'static str,
    /// `forward`, `input`, `output`, `prerouting`, `postrouting`.
    pub hook: &'static str,
    /// The priority keyword (`filter`, `srcnat`, …).
    pub priority: &'static str,
    /// Its number, as `nft -j` lists it.
    pub priority_number: i32,
}

impl BaseHook {
    /// The declaration as the state compares it: kind, hook, priority number, policy.
    pub fn state_text(&self) -> String {
        format!(
            "{} {} {} accept",
            self.kind, self.hook, self.priority_number
        )
    }
}

/// The base chain a built-in chain of `table` becomes, and its hook.
pub fn base_chain(table: Table, builtin: &str) -> (String, BaseHook) {
    let hook: &'static str = match builtin {
        "PREROUTING" => "prerouting",
        "INPUT" => "input",
        "FORWARD" => "forward",
        "OUTPUT" => "output",
        _ => "postrouting",
    };
    let (kind, priority, priority_number) = match (table, hook) {
        (Table::Nat, "postrouting" | "input") => ("nat", "srcnat", 100),
        (Table::Nat, _) => ("nat", "dstnat", -100),
        (Table::Filter, _) => ("filter", "filter", 0),
        (Table::Mangle, _) => ("filter", "mangle", -150),
        (Table::Raw, _) => ("filter", "raw", -300),
    };
    let name = match table {
        Table::Filter => builtin.to_string(),
        other => format!("{}-{builtin}", other.as_str().to_uppercase()),
    };
    (
        name,
        BaseHook {
            kind,
            hook,
            priority,
            priority_number,
        },
    )
}

/// Every chain of the nft table, base chains included, by name.
pub fn chains(ruleset: &Ruleset) -> BTreeMap<String, NftChain> {
    model_chains(ruleset)
        .into_iter()
        .map(|(name, c)| {
            let rendered = chain(ruleset, &name, c.hook, &c.rules);
            (name, rendered)
        })
        .collect()
}

/// A chain of the nft table as the model holds it, before any rendering: what the
/// planner compares by value, rendering only the chains that differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelChain<'a> {
    pub hook: Option<BaseHook>,
    pub rules: Vec<&'a Rule>,
}

/// Every chain of the nft table, base chains included, by name, unrendered: a table
/// chain's rules, or the [`BuiltinJump`]s a base chain gathers, in order.
pub fn model_chains(ruleset: &Ruleset) -> BTreeMap<String, ModelChain<'_>> {
    let mut out: BTreeMap<String, ModelChain<'_>> = BTreeMap::new();
    for chains in ruleset.tables.values() {
        for c in chains.values() {
            out.insert(
                c.name.clone(),
                ModelChain {
                    hook: None,
                    rules: c.rules.iter().collect(),
                },
            );
        }
    }
    let mut base: BTreeMap<String, (BaseHook, Vec<&Rule>)> = BTreeMap::new();
    for j in &ruleset.jumps {
        let (name, hook) = base_chain(j.table, &j.chain);
        base.entry(name)
            .or_insert_with(|| (hook, Vec::new()))
            .1
            .push(&j.rule);
    }
    for (name, (hook, rules)) in base {
        out.insert(
            name,
            ModelChain {
                hook: Some(hook),
                rules,
            },
        );
    }
    out
}

/// One chain rendered: `rules` in order with their chained identity hashes, and the
/// model's comment for it.
pub fn chain(ruleset: &Ruleset, name: &str, hook: Option<BaseHook>, rules: &[&Rule]) -> NftChain {
    NftChain {
        name: name.to_string(),
        hook,
        comment: if hook.is_none() {
            ruleset.chain_comments.get(name).cloned()
        } else {
            None
        },
        rules: rules_with_hashes(ruleset, name, rules),
    }
}

/// Whether `rule` renders to the same text in `a` as in `b`. [`rule_text`] reads the
/// ruleset besides the rule only for the kind of a set a [`Match::Set`] names and the
/// key of a map a [`Target::Vmap`] looks up; keep the two in step.
pub fn renders_alike(a: &Ruleset, b: &Ruleset, rule: &Rule) -> bool {
    let sets_alike = rule.matches.iter().all(|m| match m {
        Match::Set { name, .. } => {
            a.sets.get(name).map(|s| s.kind) == b.sets.get(name).map(|s| s.kind)
        }
        _ => true,
    });
    let maps_alike = match &rule.target {
        Target::Vmap(name) => a.maps.get(name).map(|m| m.key) == b.maps.get(name).map(|m| m.key),
        _ => true,
    };
    sets_alike && maps_alike
}

fn rules_with_hashes(ruleset: &Ruleset, chain: &str, rules: &[&Rule]) -> Vec<(String, String)> {
    let mut previous = String::new();
    rules
        .iter()
        .map(|r| {
            let body = rule_text(ruleset, r);
            previous = iptables::rule_hash(chain, &previous, &body);
            (body, previous.clone())
        })
        .collect()
}

/// A set or map of the nft table: declaration and elements, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftSet {
    pub name: String,
    /// `set` or `map`.
    pub keyword: &'static str,
    /// What follows the name in braces: `type …; flags interval;`.
    pub decl: String,
    /// Each element as written (and as the listing is read back into).
    pub elements: BTreeSet<String>,
}

impl NftSet {
    /// The declaration as the state compares it.
    pub fn state_text(&self) -> String {
        format!("{} {}", self.keyword, self.decl)
    }
}

/// Every set and map of the nft table, by name.
pub fn sets(ruleset: &Ruleset) -> BTreeMap<String, NftSet> {
    let mut out = BTreeMap::new();
    for s in ruleset.sets.values() {
        out.insert(s.name.clone(), nft_set(s));
    }
    for m in ruleset.maps.values() {
        out.insert(m.name.clone(), nft_map(m));
    }
    out
}

pub const TUPLE_TYPE: &str = "ipv4_addr . inet_proto . inet_service";
/// The type of a class tuple set: address class (mark bits), protocol, port.
pub const CLASS_TUPLE_TYPE: &str = "mark . inet_proto . inet_service";

/// The set declaration for a type list and its interval flag.
pub fn set_decl(types: &str, interval: bool) -> String {
    if interval {
        format!("type {types}; flags interval;")
    } else {
        format!("type {types};")
    }
}

/// The declaration of an ipset of `kind` in nft.
pub fn set_decl_of(kind: SetKind) -> String {
    match kind {
        SetKind::HashIp => set_decl("ipv4_addr", false),
        SetKind::HashNet | SetKind::AddrIntervals => set_decl("ipv4_addr", true),
        SetKind::HashIpPort | SetKind::AddrProtoPortIntervals => set_decl(TUPLE_TYPE, true),
        SetKind::ClassProtoPortIntervals => set_decl(CLASS_TUPLE_TYPE, true),
        SetKind::ClassIntervals => set_decl("mark", true),
        SetKind::HashNetIface => {
            unreachable!("hash:net,iface is the iptables dispatch's; the flat form never makes one")
        }
    }
}

/// Whether each member of a set of `kind` is one element of its own, written by
/// [`element_text`]; not so for `hash:net`, whose elements are what the members paint
/// together (a `nomatch` entry cuts a hole in another's range).
pub fn member_local(kind: SetKind) -> bool {
    kind != SetKind::HashNet
}

/// The element a member of a set of `kind` becomes (`None`: a member the kind
/// ignores), for every kind but `hash:net` ([`member_local`]).
pub fn element_text(kind: SetKind, member: &SetMember) -> Option<String> {
    match (kind, member) {
        (SetKind::HashIp, SetMember::Ip(ip)) => Some(ip.to_string()),
        (SetKind::AddrIntervals, SetMember::Range(r)) => {
            Some(addr_text(u32::from(r.start), u32::from(r.end)))
        }
        (SetKind::AddrIntervals, SetMember::Ip(ip)) => Some(ip.to_string()),
        (
            SetKind::HashIpPort | SetKind::AddrProtoPortIntervals,
            SetMember::IpPort { ip, protocol, port },
        ) => Some(tuple_text(
            u32::from(*ip),
            u32::from(*ip),
            *protocol,
            *port,
            *port,
        )),
        (
            SetKind::HashIpPort | SetKind::AddrProtoPortIntervals,
            SetMember::Tuple {
                addrs,
                protocol,
                ports,
            },
        ) => Some(tuple_text(
            u32::from(addrs.start),
            u32::from(addrs.end),
            *protocol,
            ports.start,
            ports.end,
        )),
        (
            SetKind::ClassProtoPortIntervals,
            SetMember::ClassTuple {
                classes,
                protocol,
                ports,
            },
        ) => Some(format!(
            "{} . {} . {}",
            class_text(classes.start, classes.end),
            proto_text(*protocol),
            port_text(ports.start, ports.end)
        )),
        (SetKind::ClassIntervals, SetMember::Classes(c)) => Some(class_text(c.start, c.end)),
        _ => None,
    }
}

/// The other spelling of the same element, if the model has one: an address and the
/// one-address range, an address-port pair and its one-port tuple. A planner that diffs
/// members must not delete an element another member still writes.
pub fn element_alias(kind: SetKind, member: &SetMember) -> Option<SetMember> {
    use crate::dataplane::{AddrRange, PortRange};
    match (kind, member) {
        (SetKind::AddrIntervals, SetMember::Ip(ip)) => Some(SetMember::Range(AddrRange {
            start: *ip,
            end: *ip,
        })),
        (SetKind::AddrIntervals, SetMember::Range(r)) if r.start == r.end => {
            Some(SetMember::Ip(r.start))
        }
        (
            SetKind::HashIpPort | SetKind::AddrProtoPortIntervals,
            SetMember::IpPort { ip, protocol, port },
        ) => Some(SetMember::Tuple {
            addrs: AddrRange {
                start: *ip,
                end: *ip,
            },
            protocol: *protocol,
            ports: PortRange {
                start: *port,
                end: *port,
            },
        }),
        (
            SetKind::HashIpPort | SetKind::AddrProtoPortIntervals,
            SetMember::Tuple {
                addrs,
                protocol,
                ports,
            },
        ) if addrs.start == addrs.end && ports.start == ports.end => Some(SetMember::IpPort {
            ip: addrs.start,
            protocol: *protocol,
            port: ports.start,
        }),
        _ => None,
    }
}

/// An ipset as an nft set, every element rendered.
pub fn nft_set(set: &IpSet) -> NftSet {
    let elements: BTreeSet<String> = if member_local(set.kind) {
        set.members
            .iter()
            .filter_map(|m| element_text(set.kind, m))
            .collect()
    } else {
        net_ranges(&set.members)
            .into_iter()
            .map(|(a, b)| addr_text(a, b))
            .collect()
    };
    NftSet {
        name: set.name.clone(),
        keyword: "set",
        decl: set_decl_of(set.kind),
        elements,
    }
}

/// hash:net members as the disjoint ranges that match, ascending: the most specific
/// entry containing an address decides, so paint from the most specific down.
pub fn net_ranges(members: &BTreeSet<SetMember>) -> Vec<(u32, u32)> {
    let mut nets: Vec<(u8, u32, u32, bool)> = members
        .iter()
        .filter_map(|m| match m {
            SetMember::Net { net, nomatch } => {
                let (a, b) = crate::compile::intervals::net_bounds(*net);
                Some((net.prefix_len(), a, b, !*nomatch))
            }
            _ => None,
        })
        .collect();
    nets.sort_by_key(|n| std::cmp::Reverse(n.0));
    let mut painter = Painter::default();
    for (_, a, b, matches) in nets {
        painter.paint(a, b, &matches);
    }
    painter
        .merged()
        .into_iter()
        .filter(|(_, _, m)| *m)
        .map(|(a, b, _)| (a, b))
        .collect()
}

fn map_key_type(key: MapKey) -> &'static str {
    match key {
        MapKey::OutIface | MapKey::InIface => "ifname",
        MapKey::InIfaceSource => "ifname . ipv4_addr",
        MapKey::Addr => "ipv4_addr",
    }
}

/// The declaration of a verdict map keyed by `key` in nft.
pub fn map_decl_of(key: MapKey) -> String {
    match key {
        MapKey::Addr => format!("type {} : verdict; flags interval;", map_key_type(key)),
        _ => format!("type {} : verdict;", map_key_type(key)),
    }
}

/// A verdict map element as written and read back: `key : verdict`.
pub fn map_element_text(key: &MapKeyValue, verdict: &MapVerdict) -> String {
    format!("{} : {}", map_key_text(key), verdict_text(verdict))
}

/// A verdict map as an nft map, every element rendered.
pub fn nft_map(map: &VerdictMap) -> NftSet {
    NftSet {
        name: map.name.clone(),
        keyword: "map",
        decl: map_decl_of(map.key),
        elements: map
            .elements
            .iter()
            .map(|(k, v)| map_element_text(k, v))
            .collect(),
    }
}

/// An address range as written and as read back: `a` or `a-b`.
pub fn addr_text(start: u32, end: u32) -> String {
    if start == end {
        Ipv4Addr::from(start).to_string()
    } else {
        format!("{}-{}", Ipv4Addr::from(start), Ipv4Addr::from(end))
    }
}

/// A range of address classes as written and as read back: `a` or `a-b`, decimal.
pub fn class_text(start: u32, end: u32) -> String {
    if start == end {
        start.to_string()
    } else {
        format!("{start}-{end}")
    }
}

pub fn port_text(start: u16, end: u16) -> String {
    if start == end {
        start.to_string()
    } else {
        format!("{start}-{end}")
    }
}

pub fn proto_text(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
        Protocol::Icmp => "icmp",
    }
}

fn tuple_text(a: u32, b: u32, protocol: Protocol, ps: u16, pe: u16) -> String {
    format!(
        "{} . {} . {}",
        addr_text(a, b),
        proto_text(protocol),
        port_text(ps, pe)
    )
}

pub fn iface_text(name: &str) -> String {
    format!("\"{name}\"")
}

pub fn map_key_text(k: &MapKeyValue) -> String {
    match k {
        MapKeyValue::Iface(i) => iface_text(i),
        MapKeyValue::IfaceAddr(i, a) => format!("{} . {a}", iface_text(i)),
        MapKeyValue::Range(r) => addr_text(u32::from(r.start), u32::from(r.end)),
    }
}

pub fn verdict_text(v: &MapVerdict) -> String {
    match v {
        MapVerdict::Accept => "accept".into(),
        MapVerdict::Drop => "drop".into(),
        MapVerdict::Return => "return".into(),
        MapVerdict::Continue => "continue".into(),
        MapVerdict::Jump(c) => format!("jump {c}"),
        MapVerdict::Goto(c) => format!("goto {c}"),
    }
}

fn iface_match(i: &Interface) -> String {
    if i.wildcard {
        iface_text(&format!("{}*", i.name))
    } else {
        iface_text(&i.name)
    }
}

fn ct_state(s: CtState) -> &'static str {
    match s {
        CtState::New => "new",
        CtState::Established => "established",
        CtState::Related => "related",
        CtState::Invalid => "invalid",
    }
}

fn addr_field(direction: SetDirection) -> &'static str {
    match direction {
        SetDirection::Src => "ip saddr",
        SetDirection::Dst | SetDirection::DstDstPort => "ip daddr",
        SetDirection::SrcInIface | SetDirection::DstOutIface => unreachable!(
            "interface-keyed set lookups are the iptables dispatch's; the flat form never \
             makes one"
        ),
    }
}

/// The nft text of a rule, without its comment (what its hash covers).
pub fn rule_text(ruleset: &Ruleset, rule: &Rule) -> String {
    let mut parts: Vec<String> = Vec::new();
    for m in &rule.matches {
        parts.push(match m {
            Match::InInterface(i) => format!("iifname {}", iface_match(i)),
            Match::OutInterface(i) => format!("oifname {}", iface_match(i)),
            Match::Source { net, negated } => {
                format!("ip saddr {}{net}", if *negated { "!= " } else { "" })
            }
            Match::Destination { net, negated } => {
                format!("ip daddr {}{net}", if *negated { "!= " } else { "" })
            }
            Match::Protocol(p) => format!("meta l4proto {}", proto_text(*p)),
            Match::IpProtocol(n) => format!("meta l4proto {n}"),
            Match::DestinationPorts { start, end } => {
                format!("th dport {}", port_text(*start, *end))
            }
            Match::Set {
                name,
                direction,
                negated,
            } => {
                let not = if *negated { "!= " } else { "" };
                match (direction, ruleset.sets.get(name).map(|s| s.kind)) {
                    // hash:ip,port is looked up by destination address and port.
                    (SetDirection::DstDstPort, _) | (_, Some(SetKind::HashIpPort)) => {
                        format!("ip daddr . meta l4proto . th dport {not}@{name}")
                    }
                    (d, _) => format!("{} {not}@{name}", addr_field(*d)),
                }
            }
            Match::Tuple { set, direction } => {
                format!(
                    "{} . meta l4proto . th dport @{set}",
                    addr_field(*direction)
                )
            }
            Match::CtState(states) => {
                let list: Vec<&str> = states.iter().map(|s| ct_state(*s)).collect();
                format!("ct state {}", list.join(","))
            }
            Match::Mark { value, mask } => format!("meta mark & {mask:#x} == {value:#x}"),
            Match::ClassTuple { set } => {
                format!("meta mark & {MARK_CLASS_MASK:#x} . meta l4proto . th dport @{set}")
            }
            Match::ClassSet { set } => format!("meta mark & {MARK_CLASS_MASK:#x} @{set}"),
            // The flat form never writes one; a rule's nft comment is its identity.
            Match::Comment(_) => continue,
        });
    }
    parts.push(match &rule.target {
        Target::Accept => "accept".into(),
        Target::Drop => "drop".into(),
        Target::Return => "return".into(),
        Target::Jump(c) => format!("jump {c}"),
        Target::Goto(c) => format!("goto {c}"),
        Target::SetMark { value, mask } => {
            // mark = (mark & !mask) ^ value; with value inside mask, ^ is |.
            let keep = !mask;
            if *value == 0 {
                format!("meta mark set meta mark & {keep:#x}")
            } else {
                format!("meta mark set meta mark & {keep:#x} | {value:#x}")
            }
        }
        Target::Masquerade => "masquerade".into(),
        Target::Log(spec) => format!(
            "limit rate {rate}/second burst {burst} packets log prefix \"{prefix}\" group {group}",
            rate = crate::dataplane::deny_log::LOG_RATE_PER_SECOND,
            burst = crate::dataplane::deny_log::LOG_BURST,
            prefix = spec.prefix,
            group = spec.group,
        ),
        Target::Vmap(name) => {
            let key = match ruleset.maps.get(name).map(|m| m.key) {
                Some(MapKey::OutIface) => "oifname",
                Some(MapKey::InIface) => "iifname",
                Some(MapKey::InIfaceSource) => "iifname . ip saddr",
                // Looked up with Target::AddrVmap, which says by which address.
                Some(MapKey::Addr) => "ip saddr",
                // validate() refuses this before any render that reaches the kernel.
                None => "oifname",
            };
            format!("{key} vmap @{name}")
        }
        Target::AddrVmap { map, direction } => format!("{} vmap @{map}", addr_field(*direction)),
    });
    parts.join(" ")
}

// ---- commands ----

pub fn add_chain_line(table: &str, c: &NftChain) -> String {
    let mut spec = String::new();
    if let Some(h) = &c.hook {
        let _ = write!(
            spec,
            " type {} hook {} priority {}; policy accept;",
            h.kind, h.hook, h.priority
        );
    }
    if let Some(comment) = &c.comment {
        let _ = write!(spec, " comment \"{comment}\";");
    }
    if spec.is_empty() {
        format!("add chain {FAMILY} {table} {}\n", c.name)
    } else {
        format!("add chain {FAMILY} {table} {} {{{spec} }}\n", c.name)
    }
}

pub fn add_set_line(table: &str, s: &NftSet) -> String {
    format!(
        "add {} {FAMILY} {table} {} {{ {} }}\n",
        s.keyword, s.name, s.decl
    )
}

/// Elements per command: keeps lines a sane length for big sets.
const ELEMENTS_PER_LINE: usize = 256;

/// `add element …` / `delete element …` lines for `elements` (none when empty).
pub fn push_elements<'a>(
    out: &mut String,
    verb: &str,
    table: &str,
    set: &str,
    elements: impl Iterator<Item = &'a String>,
) {
    let elements: Vec<&String> = elements.collect();
    for chunk in elements.chunks(ELEMENTS_PER_LINE) {
        let list: Vec<&str> = chunk.iter().map(|e| e.as_str()).collect();
        let _ = writeln!(
            out,
            "{verb} element {FAMILY} {table} {set} {{ {} }}",
            list.join(", ")
        );
    }
}

pub fn push_rules(out: &mut String, table: &str, c: &NftChain) {
    for (body, hash) in &c.rules {
        let _ = writeln!(
            out,
            "add rule {FAMILY} {table} {} {body} comment \"{}{hash}\"",
            c.name,
            iptables::COMMENT_PREFIX
        );
    }
}
