//! `iptables-restore` text for the chains sluice owns, and the identity hash of every
//! rule (the one hash: the planner in [`crate::dataplane::plan`] compares these with
//! the comments `iptables-save` prints back).
//!
//! A full render declares every owned chain (`:NAME - [0:0]`, which with `--noflush`
//! creates the chain or flushes it) and appends its rules, per table, ending in
//! `COMMIT`: one atomic transaction per table that never touches a chain sluice does
//! not own. Jumps from built-in chains are not part of it: the agent inserts each
//! [`BuiltinJumpSpec`] once (`-I <chain> 1 <spec>`) when the kernel lacks it.
//!
//! Every rule carries `-m comment --comment "sluice:<hash>"`, where the hash covers
//! the chain name and the rule's own text, not its position: a chain is the list of
//! its rules' hashes, in order, so a rule inserted into a chain leaves every other
//! rule's identity alone and the planner can write it as one `-I` instead of
//! rewriting the chain (a new pod's dispatch rules, issue 12). Rules are
//! written in `iptables-save`'s own layout (address/interface/protocol header, then the
//! comment, then match modules and target) so that what the kernel prints back equals
//! what was written, line for line.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::dataplane::{
    BuiltinJump, Chain, CtState, Interface, Match, Rule, Ruleset, SetDirection, Table, Target,
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

fn ct_state(s: CtState) -> &'static str {
    match s {
        CtState::New => "NEW",
        CtState::Established => "ESTABLISHED",
        CtState::Related => "RELATED",
        CtState::Invalid => "INVALID",
    }
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
        Protocol::Icmp => "icmp",
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
    let mut protocol_number = None;
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
            Match::IpProtocol(n) => protocol_number = Some(*n),
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
            Match::Set {
                name,
                direction,
                negated,
            } => {
                let dir = match direction {
                    SetDirection::Src => "src",
                    SetDirection::Dst => "dst",
                    SetDirection::DstDstPort | SetDirection::DstOutIface => "dst,dst",
                    SetDirection::SrcInIface => "src,src",
                };
                let not = if *negated { "! " } else { "" };
                rest.push(format!("-m set {not}--match-set {name} {dir}"));
            }
            Match::CtState(states) => {
                let list: Vec<&str> = states.iter().map(|s| ct_state(*s)).collect();
                rest.push(format!("-m conntrack --ctstate {}", list.join(",")));
            }
            Match::Mark { value, mask } => {
                rest.push(format!("-m mark --mark {value:#x}/{mask:#x}"));
            }
            Match::Comment(text) => {
                // Quoted as iptables-save prints it (always, for text with a `/`).
                rest.push(format!("-m comment --comment \"{text}\""));
            }
            Match::Tuple { .. } | Match::ClassTuple { .. } | Match::ClassSet { .. } => {
                unreachable!(
                    "tuple lookups are nftables-only; the iptables planner refuses such a \
                 model (Ruleset::check_iptables) and its compiler never makes one"
                )
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
        Target::Masquerade => "-j MASQUERADE".to_string(),
        Target::Log(spec) => format!(
            "-m limit --limit {rate}/sec --limit-burst {burst} -j NFLOG --nflog-prefix \"{prefix}\" --nflog-group {group}",
            rate = crate::dataplane::deny_log::LOG_RATE_PER_SECOND,
            burst = crate::dataplane::deny_log::LOG_BURST,
            prefix = spec.prefix,
            group = spec.group,
        ),
        Target::Vmap(_) | Target::AddrVmap { .. } => unreachable!(
            "verdict maps are nftables-only; the iptables planner refuses such a model \
             (Ruleset::check_iptables) and its compiler never makes one"
        ),
    });
    let header: Vec<String> = [
        src,
        dst,
        in_if,
        out_if,
        protocol
            .map(|p| format!("-p {}", proto(p)))
            .or(protocol_number.map(|n| format!("-p {n}"))),
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

/// The identity hash of a rule after `previous` in `chain` (the nftables renderer
/// chains it; the iptables rules pass `""`, see [`chain_rule_hashes`]).
pub fn rule_hash(chain: &str, previous: &str, body: &str) -> String {
    let mut key = String::with_capacity(chain.len() + previous.len() + body.len() + 2);
    key.push_str(chain);
    key.push('\0');
    key.push_str(previous);
    key.push('\0');
    key.push_str(body);
    names::hash16(key.as_bytes())
}

/// The identity hash of `rule` in the chain named `chain`, wherever it stands there.
pub fn chain_rule_hash(chain: &str, rule: &Rule) -> String {
    rule_hash(chain, "", &rule_body(rule))
}

/// The identity hash of each rule of `chain`, in order. A rule's hash does not cover
/// its position: the order is the list's, so inserting or deleting one rule changes
/// only that rule's entry and the planner can edit the chain in place.
pub fn chain_rule_hashes(chain: &Chain) -> Vec<String> {
    chain
        .rules
        .iter()
        .map(|r| chain_rule_hash(&chain.name, r))
        .collect()
}

/// What follows `-A <chain> ` or `-I <chain> <n> ` for `rule` of the chain named
/// `chain`, comment included.
pub fn rule_spec(chain: &str, rule: &Rule) -> String {
    with_comment(rule, &chain_rule_hash(chain, rule))
}

/// `rule` with its identity comment where `iptables-save` prints it: after the
/// address/interface/protocol header, before the match modules.
fn with_comment(rule: &Rule, hash: &str) -> String {
    let (header, rest) = rule_parts(rule);
    let comment = format!("-m comment --comment \"{COMMENT_PREFIX}{hash}\"");
    if header.is_empty() {
        format!("{comment} {rest}")
    } else {
        format!("{header} {comment} {rest}")
    }
}

/// Each rule of `chain` as it follows `-A <chain> ` (comment included), in order.
pub fn chain_rule_specs(chain: &Chain) -> Vec<String> {
    chain
        .rules
        .iter()
        .zip(chain_rule_hashes(chain))
        .map(|(r, hash)| with_comment(r, &hash))
        .collect()
}

/// The `-A <chain> …` lines of `chain`, as written and as `iptables-save` prints them.
pub fn chain_lines(chain: &Chain) -> Vec<String> {
    chain_rule_specs(chain)
        .into_iter()
        .map(|spec| format!("-A {} {spec}", chain.name))
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

/// The identity hash of a jump in a built-in chain. It covers the built-in chain's
/// name, so the agent finds and removes exactly its own jump and nobody else's.
pub fn jump_hash(jump: &BuiltinJump) -> String {
    names::hash16(format!("jump\0{}\0{}", jump.chain, rule_body(&jump.rule)).as_bytes())
}

/// What follows `-A <chain> ` or `-I <chain> 1 ` for a jump, comment included.
pub fn jump_spec(jump: &BuiltinJump) -> String {
    with_comment(&jump.rule, &jump_hash(jump))
}

/// The built-in jumps of a ruleset, rendered.
pub fn builtin_jump_specs(ruleset: &Ruleset) -> Vec<BuiltinJumpSpec> {
    ruleset
        .jumps
        .iter()
        .map(|j| BuiltinJumpSpec {
            table: j.table,
            chain: j.chain.clone(),
            spec: jump_spec(j),
        })
        .collect()
}

/// One table as `iptables-save` printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    /// Chain name → its `-A` lines, verbatim, in order (chains with no rules too).
    pub chains: BTreeMap<String, Vec<String>>,
}

impl SavedTable {
    /// The sluice hash of each rule of `chain` (`None` for a rule without one, e.g.
    /// added by hand); `None` when the chain does not exist.
    pub fn hashes(&self, chain: &str) -> Option<Vec<Option<String>>> {
        self.chains
            .get(chain)
            .map(|lines| lines.iter().map(|l| comment_hash(l)).collect())
    }

    /// Lines that belong to nobody but us: owned chains and our jumps.
    pub fn is_ours(line: &str) -> bool {
        let chain = line
            .strip_prefix("-A ")
            .or_else(|| line.strip_prefix(':'))
            .and_then(|r| r.split_whitespace().next());
        chain.is_some_and(|c| c.starts_with(names::PREFIX)) || comment_hash(line).is_some()
    }
}

/// The value of our `sluice:` comment in a saved rule line, if it has one.
pub fn comment_hash(line: &str) -> Option<String> {
    let idx = line.find("--comment ")?;
    let rest = &line[idx + "--comment ".len()..];
    let value = rest
        .strip_prefix('"')
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| rest.split_whitespace().next().unwrap_or(""));
    value.strip_prefix(COMMENT_PREFIX).map(str::to_string)
}

/// The table `iptables-save` calls `name`, when sluice models it.
pub fn parse_table(name: &str) -> Option<Table> {
    [Table::Raw, Table::Mangle, Table::Nat, Table::Filter]
        .into_iter()
        .find(|t| t.as_str() == name)
}

/// Parse `iptables-save` output into tables.
pub fn parse_save(text: &str) -> BTreeMap<String, SavedTable> {
    let mut tables: BTreeMap<String, SavedTable> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            current = Some(t.trim().to_string());
            tables.entry(t.trim().to_string()).or_default();
        } else if let Some(table) = current.as_ref() {
            let t = tables.get_mut(table).expect("table entered");
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    t.chains.entry(name.to_string()).or_default();
                }
            } else if let Some(rest) = line.strip_prefix("-A ")
                && let Some(name) = rest.split_whitespace().next()
            {
                t.chains
                    .entry(name.to_string())
                    .or_default()
                    .push(line.to_string());
            } else if line == "COMMIT" {
                current = None;
            }
        }
    }
    tables
}
