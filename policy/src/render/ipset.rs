//! `ipset restore` text for the sets sluice owns.
//!
//! A full sync never lets a packet see a half-filled set: each set is created if
//! missing (`-exist`), a scratch set of the same type is filled and swapped in, and the
//! scratch set is destroyed. Incremental updates are `add`/`del` lines (see
//! [`crate::diff`]). Sets are created with fixed parameters: `-exist` only tolerates
//! an existing set whose parameters are identical.

use std::fmt::Write as _;

use crate::compile::{IpSet, Ruleset, SetKind, SetMember};
use crate::model::Protocol;
use crate::names;

/// Large enough for every pod of a big cluster in one set (the kernel default, 65536,
/// is not).
pub const MAXELEM: u32 = 1_048_576;

/// The `create` line of a set (without `-exist`).
pub fn create_line(name: &str, kind: SetKind) -> String {
    format!(
        "create {name} {} family inet hashsize 1024 maxelem {MAXELEM}",
        kind.as_str()
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
            };
            format!("{ip},{p}:{port}")
        }
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

/// `destroy` lines for sets sluice owns that exist (`existing`, e.g. from
/// `ipset list -n`) but are no longer in `ruleset`. Apply only after the iptables
/// text that stopped referencing them: the kernel refuses to destroy a set in use.
/// Every `SLUICE-` name missing from `ruleset` counts as stale, so pass the ruleset
/// with the agent's own sets added, or they go too.
pub fn render_stale_set_cleanup(ruleset: &Ruleset, existing: &[String]) -> String {
    let mut stale: Vec<&String> = existing
        .iter()
        .filter(|n| n.starts_with(names::PREFIX) && !ruleset.sets.contains_key(*n))
        .collect();
    stale.sort();
    stale.dedup();
    stale.iter().map(|n| format!("destroy {n}\n")).collect()
}
