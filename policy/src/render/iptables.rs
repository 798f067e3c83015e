//! `iptables-restore` text for the chains sluice owns.
//!
//! A full render declares every owned chain (`:NAME - [0:0]`, which with `--noflush`
//! creates the chain or flushes it) and appends its rules, per table, ending in
//! `COMMIT`: one atomic transaction per table that never touches a chain sluice does
//! not own. Jumps from built-in chains are not part of it: the agent inserts each
//! [`BuiltinJumpSpec`] once (`-I <chain> 1 <spec>`) after checking with `-C`.
//!
//! Every rule starts with `-m comment --comment "sluice:<hash>"`, where the hash covers
//! the chain name, the previous rule's hash and the rule's own text (as Calico's felix
//! does), so identical text at another position has another identity.

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

/// The rule's matches and target, without the identity comment.
pub fn rule_body(rule: &Rule) -> String {
    let mut out = String::new();
    let mut last_proto = None;
    for m in &rule.matches {
        if !out.is_empty() {
            out.push(' ');
        }
        match m {
            Match::InInterface(i) => {
                let _ = write!(out, "-i {}", iface(i));
            }
            Match::OutInterface(i) => {
                let _ = write!(out, "-o {}", iface(i));
            }
            Match::Source { net, negated } => {
                let _ = write!(out, "{}-s {net}", if *negated { "! " } else { "" });
            }
            Match::Destination { net, negated } => {
                let _ = write!(out, "{}-d {net}", if *negated { "! " } else { "" });
            }
            Match::Protocol(p) => {
                last_proto = Some(*p);
                let _ = write!(out, "-p {}", proto(*p));
            }
            Match::DestinationPorts { start, end } => {
                // The port match module is named after the protocol (as iptables-save
                // prints it); without a protocol the rule would be rejected anyway.
                let module = proto(last_proto.unwrap_or(Protocol::Tcp));
                if start == end {
                    let _ = write!(out, "-m {module} --dport {start}");
                } else {
                    let _ = write!(out, "-m {module} --dport {start}:{end}");
                }
            }
            Match::Set { name, direction } => {
                let dir = match direction {
                    SetDirection::Src => "src",
                    SetDirection::Dst => "dst",
                    SetDirection::DstDstPort => "dst,dst",
                };
                let _ = write!(out, "-m set --match-set {name} {dir}");
            }
            Match::CtState(states) => {
                let list: Vec<&str> = states.iter().map(|s: &CtState| s.as_str()).collect();
                let _ = write!(out, "-m conntrack --ctstate {}", list.join(","));
            }
            Match::Mark { value, mask } => {
                let _ = write!(out, "-m mark --mark {value:#x}/{mask:#x}");
            }
        }
    }
    if !out.is_empty() {
        out.push(' ');
    }
    match &rule.target {
        Target::Accept => out.push_str("-j ACCEPT"),
        Target::Drop => out.push_str("-j DROP"),
        Target::Return => out.push_str("-j RETURN"),
        Target::Jump(c) => {
            let _ = write!(out, "-j {c}");
        }
        Target::Goto(c) => {
            let _ = write!(out, "-g {c}");
        }
        Target::SetMark { value, mask } => {
            let _ = write!(out, "-j MARK --set-xmark {value:#x}/{mask:#x}");
        }
    }
    out
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
            let body = rule_body(r);
            let hash = rule_hash(&chain.name, &previous, &body);
            let spec = format!("-m comment --comment \"{COMMENT_PREFIX}{hash}\" {body}");
            previous = hash;
            spec
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
/// Names without the `SLUICE-` prefix are never touched.
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
