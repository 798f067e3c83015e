//! `iptables-restore` text for the chains sluice owns.
//!
//! A full render declares every owned chain (`:NAME - [0:0]`, which with `--noflush`
//! creates the chain or flushes it) and appends its rules, per table, ending in
//! `COMMIT`: one atomic transaction per table that never touches a chain sluice does
//! not own. Jumps from built-in chains are not part of it: the agent inserts each
//! [`BuiltinJumpSpec`] once (`-I <chain> 1 <spec>`) after checking with `-C`.
//!
//! Every rule carries `-m comment --comment "sluice:<hash>"`, where the hash covers
//! the chain name, the previous rule's hash and the rule's own text (as Calico's felix
//! does), so identical text at another position has another identity. Rules are
//! written in `iptables-save`'s own layout (address/interface/protocol header, then the
//! comment, then match modules and target) so that what the kernel prints back equals
//! what was written, line for line.

use std::fmt::Write as _;

use crate::compile::{
    Chain, CtState, Interface, Match, Rule, Ruleset, SetDirection, Table, Target,
};
use crate::model::Protocol;
use crate::names;

/// Comment prefix that tags every rule sluice writes.
pub const COMMENT_PREFIX: &str = "sluice:";

fn iface(i: &Interface) -> String {
    if i.wildcard {
        format!("{}+", i.name)
    } else {
        i.name.clone()
    }
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// A rule's text in the two parts `iptables-save` prints around the comment: the
/// address/interface/protocol header (always first, in the kernel's fixed order
/// `-s -d -i -o -p`), and the match modules and target (in the rule's order). Keeping
/// save's layout lets the agent compare what it wrote with what the kernel holds.
pub fn rule_parts(rule: &Rule) -> (String, String) {
    let mut src = None;
    let mut dst = None;
    let mut in_if = None;
    let mut out_if = None;
    let mut protocol = None;
    let mut rest: Vec<String> = Vec::new();
    for m in &rule.matches {
        match m {
            Match::InInterface(i) => in_if = Some(format!("-i {}", iface(i))),
            Match::OutInterface(i) => out_if = Some(format!("-o {}", iface(i))),
            Match::Source { net, negated } => {
                src = Some(format!("{}-s {net}", if *negated { "! " } else { "" }))
            }
            Match::Destination { net, negated } => {
                dst = Some(format!("{}-d {net}", if *negated { "! " } else { "" }))
            }
            Match::Protocol(p) => protocol = Some(*p),
            Match::DestinationPorts { start, end } => {
                // The port module is named after the protocol, as iptables-save prints
                // it; a port without a protocol is refused by the kernel anyway.
                let module = proto(protocol.unwrap_or(Protocol::Tcp));
                if start == end {
                    rest.push(format!("-m {module} --dport {start}"));
                } else {
                    rest.push(format!("-m {module} --dport {start}:{end}"));
                }
            }
            Match::Set { name, direction } => {
                let dir = match direction {
                    SetDirection::Src => "src",
                    SetDirection::Dst => "dst",
                    SetDirection::DstDstPort => "dst,dst",
                };
                rest.push(format!("-m set --match-set {name} {dir}"));
            }
            Match::CtState(states) => {
                let list: Vec<&str> = states.iter().map(|s: &CtState| s.as_str()).collect();
                rest.push(format!("-m conntrack --ctstate {}", list.join(",")));
            }
            Match::Mark { value, mask } => {
                rest.push(format!("-m mark --mark {value:#x}/{mask:#x}"));
            }
        }
    }
    rest.push(match &rule.target {
        Target::Accept => "-j ACCEPT".to_string(),
        Target::Drop => "-j DROP".to_string(),
        Target::Return => "-j RETURN".to_string(),
        Target::Jump(c) => format!("-j {c}"),
        Target::Goto(c) => format!("-g {c}"),
        Target::SetMark { value, mask } => format!("-j MARK --set-xmark {value:#x}/{mask:#x}"),
    });
    let header: Vec<String> = [
        src,
        dst,
        in_if,
        out_if,
        protocol.map(|p| format!("-p {}", proto(p))),
    ]
    .into_iter()
    .flatten()
    .collect();
    (header.join(" "), rest.join(" "))
}

/// The rule's text without the identity comment (what its hash covers).
pub fn rule_body(rule: &Rule) -> String {
    let (header, rest) = rule_parts(rule);
    if header.is_empty() {
        rest
    } else {
        format!("{header} {rest}")
    }
}

/// The identity hash of a rule at its position in `chain`.
pub fn rule_hash(chain: &str, previous: &str, body: &str) -> String {
    let mut key = String::with_capacity(chain.len() + previous.len() + body.len() + 2);
    key.push_str(chain);
    key.push('\0');
    key.push_str(previous);
    key.push('\0');
    key.push_str(body);
    names::hash16(key.as_bytes())
}

/// Each rule of `chain` as it follows `-A <chain> ` (comment first), in order.
pub fn chain_rule_specs(chain: &Chain) -> Vec<String> {
    let mut previous = String::new();
    chain
        .rules
        .iter()
        .map(|r| {
            let (header, rest) = rule_parts(r);
            let body = if header.is_empty() {
                rest.clone()
            } else {
                format!("{header} {rest}")
            };
            let hash = rule_hash(&chain.name, &previous, &body);
            let comment = format!("-m comment --comment \"{COMMENT_PREFIX}{hash}\"");
            previous = hash;
            if header.is_empty() {
                format!("{comment} {rest}")
            } else {
                format!("{header} {comment} {rest}")
            }
        })
        .collect()
}

/// Appends the declaration-free rule lines of a chain.
fn push_chain_rules(out: &mut String, chain: &Chain) {
    for spec in chain_rule_specs(chain) {
        let _ = writeln!(out, "-A {} {spec}", chain.name);
    }
}

/// The restore text rewriting exactly `chains` of `table` (declare = create or flush,
/// then the rules), and deleting `delete` (flushed first, removed after every rewrite
/// so nothing still references them). Empty when there is nothing to do.
pub fn render_chains<'a>(
    table: Table,
    chains: impl IntoIterator<Item = &'a Chain>,
    delete: &[String],
) -> String {
    let chains: Vec<&Chain> = chains.into_iter().collect();
    if chains.is_empty() && delete.is_empty() {
        return String::new();
    }
    let mut out = format!("*{}\n", table.as_str());
    for c in &chains {
        let _ = writeln!(out, ":{} - [0:0]", c.name);
    }
    for c in &chains {
        push_chain_rules(&mut out, c);
    }
    for name in delete {
        let _ = writeln!(out, "-F {name}");
    }
    for name in delete {
        let _ = writeln!(out, "-X {name}");
    }
    out.push_str("COMMIT\n");
    out
}

/// The full restore text of one table (every chain sluice owns there), for
/// `iptables-restore --noflush -w`. Empty when the ruleset has no chain in `table`.
pub fn render_table(ruleset: &Ruleset, table: Table) -> String {
    match ruleset.tables.get(&table) {
        Some(chains) => render_chains(table, chains.values(), &[]),
        None => String::new(),
    }
}

/// Every table, in a fixed order, concatenated (one `*table … COMMIT` block each).
pub fn render(ruleset: &Ruleset) -> String {
    ruleset
        .tables
        .keys()
        .map(|t| render_table(ruleset, *t))
        .collect()
}

/// A jump the agent must keep in a built-in chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltinJumpSpec {
    pub table: Table,
    pub chain: String,
    /// What follows `-I <chain> 1 ` or `-C <chain> `, comment included.
    pub spec: String,
}

/// The built-in jumps of a ruleset, rendered. Their hash covers the built-in chain's
/// name, so the agent can find and remove exactly its own jump.
pub fn builtin_jump_specs(ruleset: &Ruleset) -> Vec<BuiltinJumpSpec> {
    ruleset
        .jumps
        .iter()
        .map(|j| {
            let chain = Chain {
                name: j.chain.clone(),
                rules: vec![j.rule.clone()],
            };
            BuiltinJumpSpec {
                table: j.table,
                chain: j.chain.clone(),
                spec: chain_rule_specs(&chain).remove(0),
            }
        })
        .collect()
}

/// The text that deletes chains sluice owns which exist in the kernel (`existing`,
/// e.g. from `iptables-save`) but not in `ruleset`; apply after the full render.
/// Names without the `SLUICE-` prefix are never touched; every `SLUICE-` chain
/// missing from `ruleset` is, so pass the ruleset with the agent's own chains added.
pub fn render_stale_chain_cleanup(ruleset: &Ruleset, table: Table, existing: &[String]) -> String {
    let mut stale: Vec<String> = existing
        .iter()
        .filter(|n| n.starts_with(names::PREFIX) && ruleset.chain(table, n).is_none())
        .cloned()
        .collect();
    stale.sort();
    stale.dedup();
    render_chains(table, [], &stale)
}
