//! `ipset restore` text for the sets sluice owns.
//!
//! A full sync never lets a packet see a half-filled set: each set is created if
//! missing (`-exist`), a scratch set of the same type is filled and swapped in, and the
//! scratch set is destroyed. Incremental updates are `add`/`del` lines (see
//! [`crate::diff`]). Sets are created with fixed parameters: `-exist` only tolerates
//! an existing set whose parameters are identical.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::dataplane::{IfaceName, IpSet, Ruleset, SetKind, SetMember};
use crate::model::Protocol;
use crate::names;

/// Large enough for every pod of a big cluster in one set (the kernel default, 65536,
/// is not).
pub const MAXELEM: u32 = 1_048_576;

/// The set type as `ipset` names it.
pub fn kind_text(kind: SetKind) -> &'static str {
    match kind {
        SetKind::HashIp => "hash:ip",
        SetKind::HashNet => "hash:net",
        SetKind::HashIpPort => "hash:ip,port",
        SetKind::HashNetIface => "hash:net,iface",
        SetKind::AddrIntervals
        | SetKind::AddrProtoPortIntervals
        | SetKind::ClassProtoPortIntervals
        | SetKind::ClassIntervals => unreachable!(
            "interval sets are nftables-only; the iptables planner refuses such a model \
             (Ruleset::check_iptables)"
        ),
    }
}

/// The `create` line of a set (without `-exist`).
pub fn create_line(name: &str, kind: SetKind) -> String {
    format!(
        "create {name} {} family inet hashsize 1024 maxelem {MAXELEM}",
        kind_text(kind)
    )
}

/// A member as `ipset` spells it.
pub fn member_text(member: &SetMember) -> String {
    match member {
        SetMember::Ip(ip) => ip.to_string(),
        SetMember::Net { net, nomatch } => {
            if *nomatch {
                format!("{net} nomatch")
            } else {
                net.to_string()
            }
        }
        SetMember::IpPort { ip, protocol, port } => {
            let p = match protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                Protocol::Sctp => "sctp",
                Protocol::Icmp => "icmp",
            };
            format!("{ip},{p}:{port}")
        }
        // `ipset save` prints a /32 as the bare address; `add` takes either.
        SetMember::NetIface { net, iface } if net.prefix_len() == 32 => {
            format!("{},{iface}", net.addr())
        }
        SetMember::NetIface { net, iface } => format!("{net},{iface}"),
        SetMember::Range(_)
        | SetMember::Tuple { .. }
        | SetMember::ClassTuple { .. }
        | SetMember::Classes(_) => unreachable!(
            "interval members are nftables-only; the iptables planner refuses such a \
             model (Ruleset::check_iptables)"
        ),
    }
}

/// Appends the swap-based full load of one set.
pub fn push_set_full(out: &mut String, set: &IpSet) {
    let tmp = names::temp_set(&set.name);
    let _ = writeln!(out, "{} -exist", create_line(&set.name, set.kind));
    let _ = writeln!(out, "{} -exist", create_line(&tmp, set.kind));
    let _ = writeln!(out, "flush {tmp}");
    for m in &set.members {
        let _ = writeln!(out, "add {tmp} {}", member_text(m));
    }
    let _ = writeln!(out, "swap {tmp} {}", set.name);
    let _ = writeln!(out, "destroy {tmp}");
}

/// The full `ipset restore` text of every set in the ruleset, in name order.
pub fn render(ruleset: &Ruleset) -> String {
    let mut out = String::new();
    for set in ruleset.sets.values() {
        push_set_full(&mut out, set);
    }
    out
}

/// The set type `ipset` calls `text`, when sluice creates that type.
pub fn parse_kind(text: &str) -> Option<SetKind> {
    [
        SetKind::HashIp,
        SetKind::HashNet,
        SetKind::HashIpPort,
        SetKind::HashNetIface,
    ]
    .into_iter()
    .find(|k| kind_text(*k) == text)
}

/// A member as `ipset save` prints it for a set of `kind` (a hash:net member of /32
/// is printed as the bare address).
pub fn parse_member(kind: SetKind, text: &str) -> Option<SetMember> {
    let mut words = text.split_whitespace();
    let first = words.next()?;
    let flags: Vec<&str> = words.collect();
    let net = |text: &str| match text.parse::<ipnet::Ipv4Net>() {
        Ok(n) => Some(n),
        Err(_) => text
            .parse::<std::net::Ipv4Addr>()
            .ok()
            .map(ipnet::Ipv4Net::from),
    };
    match kind {
        SetKind::HashIp => flags
            .is_empty()
            .then(|| first.parse().ok().map(SetMember::Ip))
            .flatten(),
        SetKind::HashNet => {
            let net = net(first)?;
            let nomatch = match flags.as_slice() {
                [] => false,
                ["nomatch"] => true,
                _ => return None,
            };
            Some(SetMember::Net { net, nomatch })
        }
        SetKind::HashIpPort => {
            let (ip, rest) = first.split_once(',')?;
            let (proto, port) = rest.split_once(':')?;
            let protocol = match proto {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "sctp" => Protocol::Sctp,
                _ => return None,
            };
            flags.is_empty().then_some(())?;
            Some(SetMember::IpPort {
                ip: ip.parse().ok()?,
                protocol,
                port: port.parse().ok()?,
            })
        }
        SetKind::HashNetIface => {
            let (addr, iface) = first.split_once(',')?;
            flags.is_empty().then_some(())?;
            Some(SetMember::NetIface {
                net: net(addr)?,
                iface: IfaceName::new(iface)?,
            })
        }
        // ipset has no such type: nothing it prints is one of these.
        SetKind::AddrIntervals
        | SetKind::AddrProtoPortIntervals
        | SetKind::ClassProtoPortIntervals
        | SetKind::ClassIntervals => None,
    }
}

/// A set as the kernel holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedSet {
    /// `None` for a type sluice never creates.
    pub kind: Option<SetKind>,
    pub members: BTreeSet<SetMember>,
    /// Members that do not read as the set's type (kept verbatim, to delete).
    pub unreadable: BTreeSet<String>,
}

/// Parse `ipset save` output, keeping only sets whose name starts with `prefix`.
pub fn parse_save(text: &str, prefix: &str) -> BTreeMap<String, SavedSet> {
    let mut sets: BTreeMap<String, SavedSet> = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next()) {
            (Some("create"), Some(name)) if name.starts_with(prefix) => {
                sets.entry(name.to_string()).or_default().kind = w.next().and_then(parse_kind);
            }
            (Some("add"), Some(name)) if name.starts_with(prefix) => {
                // The member is the rest of the line: `10.0.0.0/8 nomatch` is one.
                let m = w.collect::<Vec<_>>().join(" ");
                if m.is_empty() {
                    continue;
                }
                let set = sets.entry(name.to_string()).or_default();
                match set.kind.and_then(|k| parse_member(k, &m)) {
                    Some(member) => {
                        set.members.insert(member);
                    }
                    None => {
                        set.unreadable.insert(m);
                    }
                }
            }
            _ => {}
        }
    }
    sets
}
