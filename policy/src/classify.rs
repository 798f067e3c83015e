//! The compiled rule model executed in-process, as the kernel would run it, on one
//! packet. It exists so the compiler can be checked against the reference evaluator
//! without a kernel (`tests/dataplane_differential.rs`), and so a node's verdict on a
//! packet can be explained rule by rule.
//!
//! Semantics modelled: netfilter chain traversal (jump, goto, return, falling off a
//! user chain = return, falling off a built-in chain = its policy, taken as ACCEPT
//! since the rest of the host's rules are not sluice's), interface matches with `+`
//! wildcards, addresses, protocol and destination port, conntrack state, the
//! packet mark (`MARK --set-xmark`), and ipset lookups: hash:ip, hash:net with the
//! most specific entry deciding (so `nomatch` excludes), hash:ip,port, hash:net,iface
//! (`src,src`: source and incoming interface; `dst,dst`: destination and outgoing
//! interface). And the
//! nftables form's constructs: address interval sets, (address . protocol . port)
//! interval tuple lookups, and verdict maps (`vmap`: the element's verdict, or the
//! next rule when there is no element; an address-keyed map by range), and the address
//! class lookups (`meta mark & MARK_CLASS_MASK . …`). sluice's nftables table has base chains of
//! its own at the same hooks, with policy accept: its verdict is modelled the same
//! way as the built-in chain's.

use std::net::Ipv4Addr;

use crate::dataplane::{
    CtState, MARK_CLASS_MASK, MapKey, MapKeyValue, MapVerdict, Match, Ruleset, SetDirection,
    SetKind, SetMember, Table, Target,
};
use crate::model::Protocol;

/// The netfilter hook (built-in chain of the filter table) a packet traverses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// Routed through the node: in one interface, out another.
    Forward,
    /// Addressed to the node itself (no output interface).
    Input,
    /// Sent by the node itself (no input interface).
    Output,
}

impl Hook {
    pub fn chain(self) -> &'static str {
        match self {
            Hook::Forward => "FORWARD",
            Hook::Input => "INPUT",
            Hook::Output => "OUTPUT",
        }
    }
}

/// A packet as the filter table sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub hook: Hook,
    pub in_iface: Option<String>,
    pub out_iface: Option<String>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: Protocol,
    pub dport: u16,
    pub ct: CtState,
}

/// What the filter table decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Accept,
    Drop,
}

/// A verdict and the rules that led to it: `(chain, rule index)` of every rule that
/// matched, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    pub verdict: Verdict,
    pub trace: Vec<(String, usize)>,
}

/// A ruleset the kernel would also refuse (or loop on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    #[error("rule {chain}[{index}] jumps to chain {target}, which does not exist")]
    NoSuchChain {
        chain: String,
        index: usize,
        target: String,
    },
    #[error("rule {chain}[{index}] uses ipset {set}, which does not exist")]
    NoSuchSet {
        chain: String,
        index: usize,
        set: String,
    },
    #[error("rule {chain}[{index}] uses verdict map {map}, which does not exist")]
    NoSuchMap {
        chain: String,
        index: usize,
        map: String,
    },
    #[error("chain nesting deeper than {0}: a loop")]
    TooDeep(usize),
}

/// The kernel's own limit on nested jumps is about this deep too.
const MAX_DEPTH: usize = 64;

/// The IP header's protocol number (IANA), what `Match::IpProtocol` compares.
fn ip_protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Icmp => 1,
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// Whether a set holds the packet's (address, protocol, port), or, for a
/// hash:net,iface set, its (address, interface): `iface` is the interface the
/// lookup's direction names, `None` when the packet has none there.
fn set_contains(
    kind: SetKind,
    members: &std::collections::BTreeSet<SetMember>,
    ip: Ipv4Addr,
    iface: Option<&str>,
    proto: Protocol,
    port: u16,
) -> bool {
    match kind {
        SetKind::HashIp => members.contains(&SetMember::Ip(ip)),
        SetKind::HashIpPort => members.contains(&SetMember::IpPort {
            ip,
            protocol: proto,
            port,
        }),
        SetKind::HashNet => {
            // The most specific entry containing the address decides.
            let best = members
                .iter()
                .filter_map(|m| match m {
                    SetMember::Net { net, nomatch } if net.contains(&ip) => {
                        Some((net.prefix_len(), *nomatch))
                    }
                    _ => None,
                })
                .max_by_key(|(len, _)| *len);
            matches!(best, Some((_, false)))
        }
        // Any entry of that interface containing the address (sluice writes no
        // `nomatch` entries into these).
        SetKind::HashNetIface => iface.is_some_and(|iface| {
            members.iter().any(|m| {
                matches!(m, SetMember::NetIface { net, iface: i } if i.as_str() == iface && net.contains(&ip))
            })
        }),
        SetKind::AddrIntervals => members.iter().any(|m| match m {
            SetMember::Range(r) => r.contains(ip),
            SetMember::Ip(a) => *a == ip,
            _ => false,
        }),
        SetKind::AddrProtoPortIntervals => members.iter().any(|m| match m {
            SetMember::Tuple {
                addrs,
                protocol,
                ports,
            } => addrs.contains(ip) && *protocol == proto && ports.contains(port),
            _ => false,
        }),
        // Looked up by class, never by address: see class_set_contains.
        SetKind::ClassProtoPortIntervals | SetKind::ClassIntervals => false,
    }
}

/// Whether a class set holds (class, protocol, port); an address set never does.
fn class_set_contains(
    kind: SetKind,
    members: &std::collections::BTreeSet<SetMember>,
    class: u32,
    proto: Protocol,
    port: u16,
) -> bool {
    members.iter().any(|m| match (kind, m) {
        (
            SetKind::ClassProtoPortIntervals,
            SetMember::ClassTuple {
                classes,
                protocol,
                ports,
            },
        ) => classes.contains(class) && *protocol == proto && ports.contains(port),
        (SetKind::ClassIntervals, SetMember::Classes(c)) => c.contains(class),
        _ => false,
    })
}

struct Frame<'a> {
    chain: &'a str,
    rules: &'a [crate::dataplane::Rule],
    next: usize,
}

/// Runs `packet` through `table` of `ruleset`, starting at the built-in chain of its
/// hook: sluice's jumps into its own chains, then (if nothing decided) the built-in
/// policy, ACCEPT.
pub fn classify(
    ruleset: &Ruleset,
    table: Table,
    packet: &Packet,
) -> Result<Classification, ClassifyError> {
    let builtin: Vec<crate::dataplane::Rule> = ruleset
        .jumps
        .iter()
        .filter(|j| j.table == table && j.chain == packet.hook.chain())
        .map(|j| j.rule.clone())
        .collect();
    let mut mark: u32 = 0;
    let mut trace = Vec::new();
    let mut stack: Vec<Frame> = vec![Frame {
        chain: packet.hook.chain(),
        rules: &builtin,
        next: 0,
    }];
    let chains = ruleset.tables.get(&table);

    while let Some(frame) = stack.last_mut() {
        let rules = frame.rules;
        let Some(rule) = rules.get(frame.next) else {
            stack.pop();
            continue;
        };
        let index = frame.next;
        let chain_name = frame.chain;
        frame.next += 1;

        let mut matched = true;
        for m in &rule.matches {
            let ok = match m {
                Match::InInterface(i) => packet.in_iface.as_deref().is_some_and(|n| i.matches(n)),
                Match::OutInterface(i) => packet.out_iface.as_deref().is_some_and(|n| i.matches(n)),
                Match::Source { net, negated } => net.contains(&packet.src) != *negated,
                Match::Destination { net, negated } => net.contains(&packet.dst) != *negated,
                Match::Protocol(p) => packet.protocol == *p,
                // Packets here are TCP, UDP, SCTP or ICMP, never a tunnel's.
                Match::IpProtocol(n) => ip_protocol_number(packet.protocol) == *n,
                // An ICMP packet has no ports, so no port range admits it.
                Match::DestinationPorts { start, end } => {
                    packet.protocol != Protocol::Icmp && (*start..=*end).contains(&packet.dport)
                }
                Match::Set {
                    name,
                    direction,
                    negated,
                } => {
                    let set = ruleset
                        .sets
                        .get(name)
                        .ok_or_else(|| ClassifyError::NoSuchSet {
                            chain: chain_name.to_string(),
                            index,
                            set: name.clone(),
                        })?;
                    let (ip, iface) = match direction {
                        SetDirection::Src => (packet.src, None),
                        SetDirection::SrcInIface => (packet.src, packet.in_iface.as_deref()),
                        SetDirection::Dst | SetDirection::DstDstPort => (packet.dst, None),
                        SetDirection::DstOutIface => (packet.dst, packet.out_iface.as_deref()),
                    };
                    let hit = set_contains(
                        set.kind,
                        &set.members,
                        ip,
                        iface,
                        packet.protocol,
                        packet.dport,
                    );
                    hit != *negated
                }
                Match::Tuple { set, direction } => {
                    let s = ruleset
                        .sets
                        .get(set)
                        .ok_or_else(|| ClassifyError::NoSuchSet {
                            chain: chain_name.to_string(),
                            index,
                            set: set.clone(),
                        })?;
                    let ip = match direction {
                        SetDirection::Src | SetDirection::SrcInIface => packet.src,
                        SetDirection::Dst
                        | SetDirection::DstDstPort
                        | SetDirection::DstOutIface => packet.dst,
                    };
                    set_contains(s.kind, &s.members, ip, None, packet.protocol, packet.dport)
                }
                Match::ClassTuple { set } | Match::ClassSet { set } => {
                    let s = ruleset
                        .sets
                        .get(set)
                        .ok_or_else(|| ClassifyError::NoSuchSet {
                            chain: chain_name.to_string(),
                            index,
                            set: set.clone(),
                        })?;
                    // No element names ICMP, which has no port.
                    class_set_contains(
                        s.kind,
                        &s.members,
                        mark & MARK_CLASS_MASK,
                        packet.protocol,
                        packet.dport,
                    )
                }
                Match::CtState(states) => states.contains(&packet.ct),
                Match::Mark { value, mask } => mark & mask == *value,
                Match::Comment(_) => true,
            };
            if !ok {
                matched = false;
                break;
            }
        }
        if !matched {
            continue;
        }
        // A verdict map decides like the target its element names; no element (or
        // `continue`): on to the next rule.
        let mapped;
        let target = match &rule.target {
            Target::Vmap(name) | Target::AddrVmap { map: name, .. } => {
                let map = ruleset
                    .maps
                    .get(name)
                    .ok_or_else(|| ClassifyError::NoSuchMap {
                        chain: chain_name.to_string(),
                        index,
                        map: name.clone(),
                    })?;
                let addr = match &rule.target {
                    Target::AddrVmap {
                        direction: SetDirection::Src,
                        ..
                    } => packet.src,
                    _ => packet.dst,
                };
                let element = match map.key {
                    MapKey::OutIface => packet
                        .out_iface
                        .clone()
                        .and_then(|i| map.elements.get(&MapKeyValue::Iface(i))),
                    MapKey::InIface => packet
                        .in_iface
                        .clone()
                        .and_then(|i| map.elements.get(&MapKeyValue::Iface(i))),
                    MapKey::InIfaceSource => packet
                        .in_iface
                        .clone()
                        .and_then(|i| map.elements.get(&MapKeyValue::IfaceAddr(i, packet.src))),
                    // Disjoint ranges: the one containing the address, if any.
                    MapKey::Addr => map.elements.iter().find_map(|(k, v)| match k {
                        MapKeyValue::Range(r) if r.contains(addr) => Some(v),
                        _ => None,
                    }),
                };
                mapped = match element {
                    None | Some(MapVerdict::Continue) => continue,
                    Some(MapVerdict::Accept) => Target::Accept,
                    Some(MapVerdict::Drop) => Target::Drop,
                    Some(MapVerdict::Return) => Target::Return,
                    Some(MapVerdict::Jump(c)) => Target::Jump(c.clone()),
                    Some(MapVerdict::Goto(c)) => Target::Goto(c.clone()),
                };
                &mapped
            }
            other => other,
        };
        trace.push((chain_name.to_string(), index));

        let lookup = |target: &str| {
            chains
                .and_then(|t| t.get(target))
                .ok_or_else(|| ClassifyError::NoSuchChain {
                    chain: chain_name.to_string(),
                    index,
                    target: target.to_string(),
                })
        };
        match target {
            Target::Vmap(_) | Target::AddrVmap { .. } => {
                unreachable!("resolved to its element's verdict above")
            }
            Target::Accept => {
                return Ok(Classification {
                    verdict: Verdict::Accept,
                    trace,
                });
            }
            Target::Drop => {
                return Ok(Classification {
                    verdict: Verdict::Drop,
                    trace,
                });
            }
            Target::Return => {
                stack.pop();
                // RETURN from the built-in chain itself means its policy.
            }
            Target::SetMark { value, mask } => mark = (mark & !mask) ^ value,
            // Address translation decides nothing about the verdict.
            Target::Masquerade | Target::Log(_) => {}
            Target::Jump(target) => {
                let chain = lookup(target)?;
                if stack.len() >= MAX_DEPTH {
                    return Err(ClassifyError::TooDeep(MAX_DEPTH));
                }
                stack.push(Frame {
                    chain: &chain.name,
                    rules: &chain.rules,
                    next: 0,
                });
            }
            Target::Goto(target) => {
                let chain = lookup(target)?;
                // A goto replaces the current frame. From the built-in chain itself, the
                // kernel returns to its policy when the target falls off, so the
                // built-in frame stays, finished.
                if stack.len() > 1 {
                    stack.pop();
                } else if let Some(base) = stack.last_mut() {
                    base.next = base.rules.len();
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(ClassifyError::TooDeep(MAX_DEPTH));
                }
                stack.push(Frame {
                    chain: &chain.name,
                    rules: &chain.rules,
                    next: 0,
                });
            }
        }
    }
    Ok(Classification {
        verdict: Verdict::Accept,
        trace,
    })
}
