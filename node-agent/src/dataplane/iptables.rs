//! Owned iptables chains: parse `iptables-save`, compare with the desired chains by
//! their hash comments, and build one `iptables-restore --noflush` payload per table
//! that rewrites only the chains that differ.
//!
//! Ownership (Calico's felix/iptables/table.go does the same): every chain we own
//! starts with [`CHAIN_PREFIX`]; every rule we write carries a comment
//! `sluice:<hash>` where the hash chains over the chain name, the previous rule's
//! hash and the rule text. Comparing the hashes read back from the kernel with the
//! rendered ones tells whether a chain is intact without parsing iptables'
//! normalised rule syntax. Built-in chains (FORWARD, POSTROUTING, …) are never
//! rewritten: we only insert or delete our own commented jump rules in them, so
//! kube-proxy's and Docker's rules stay byte for byte.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

/// Prefix of every chain sluice owns.
pub const CHAIN_PREFIX: &str = "SLUICE-";
/// Prefix of the comment that marks a rule as sluice's.
pub const COMMENT_PREFIX: &str = "sluice:";

const BUILTIN_CHAINS: [&str; 5] = ["INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IptablesError {
    #[error("chain {0} does not start with {CHAIN_PREFIX}: sluice only writes chains it owns")]
    NotOwned(String),
    #[error("chain {chain} jumps to {target}, which is neither built in nor desired")]
    DanglingJump { chain: String, target: String },
}

/// A chain we own, with its rules as the arguments after `-A <name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub rules: Vec<String>,
}

impl Chain {
    pub fn new(name: impl Into<String>) -> Chain {
        Chain {
            name: name.into(),
            rules: Vec::new(),
        }
    }

    pub fn rule(mut self, rule: impl Into<String>) -> Chain {
        self.rules.push(rule.into());
        self
    }

    pub fn push(&mut self, rule: impl Into<String>) {
        self.rules.push(rule.into());
    }

    /// The hash comment of each rule, in order.
    pub fn rule_hashes(&self) -> Vec<String> {
        let mut prev = String::new();
        self.rules
            .iter()
            .map(|rule| {
                let mut h = Sha256::new();
                h.update(self.name.as_bytes());
                h.update([0]);
                h.update(prev.as_bytes());
                h.update([0]);
                h.update(rule.as_bytes());
                prev = hex::encode(&h.finalize()[..8]);
                prev.clone()
            })
            .collect()
    }

    /// `-A NAME -m comment --comment "sluice:HASH" RULE` lines.
    pub fn render_rules(&self) -> Vec<String> {
        self.rules
            .iter()
            .zip(self.rule_hashes())
            .map(|(rule, hash)| {
                format!(
                    "-A {} -m comment --comment \"{COMMENT_PREFIX}{hash}\" {rule}",
                    self.name
                )
            })
            .collect()
    }
}

/// Where in a built-in chain our jump goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JumpPosition {
    /// First rule: our chain sees every packet before anyone else's.
    Top,
    /// Last rule: only what earlier rules let through.
    Bottom,
}

/// One jump from a built-in chain into one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub from: String,
    /// The rule without its comment, e.g. `-j SLUICE-FORWARD` (matches allowed).
    pub rule: String,
    pub position: JumpPosition,
}

impl Jump {
    /// An unconditional jump, first in the built-in chain.
    pub fn top(from: &str, to: &str) -> Jump {
        Jump {
            from: from.into(),
            rule: format!("-j {to}"),
            position: JumpPosition::Top,
        }
    }

    /// The owned chain this jump leads to.
    pub fn target(&self) -> Option<&str> {
        jump_target(&self.rule)
    }

    /// Unconditional: every packet of the built-in chain reaches the target.
    pub fn is_unconditional(&self) -> bool {
        self.rule.split_whitespace().count() == 2
    }

    fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("jump\0{}\0{}", self.from, self.rule).as_bytes());
        hex::encode(&h.finalize()[..8])
    }

    /// What follows `-A <chain> ` for this jump, comment included.
    pub fn spec(&self) -> String {
        format!(
            "-m comment --comment \"{COMMENT_PREFIX}{}\" {}",
            self.hash(),
            self.rule
        )
    }
}

/// Everything we want in one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredTable {
    pub chains: Vec<Chain>,
    pub jumps: Vec<Jump>,
}

impl DesiredTable {
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum::<usize>() + self.jumps.len()
    }

    /// Owned names only, and every `-j`/`-g` target of ours exists.
    pub fn validate(&self) -> Result<(), IptablesError> {
        let names: BTreeSet<&str> = self.chains.iter().map(|c| c.name.as_str()).collect();
        for c in &self.chains {
            if !c.name.starts_with(CHAIN_PREFIX) {
                return Err(IptablesError::NotOwned(c.name.clone()));
            }
            for rule in &c.rules {
                if let Some(t) = jump_target(rule)
                    && t.starts_with(CHAIN_PREFIX)
                    && !names.contains(t)
                {
                    return Err(IptablesError::DanglingJump {
                        chain: c.name.clone(),
                        target: t.to_string(),
                    });
                }
            }
        }
        for j in &self.jumps {
            match j.target() {
                Some(t) if names.contains(t) => {}
                t => {
                    return Err(IptablesError::DanglingJump {
                        chain: j.from.clone(),
                        target: t.unwrap_or("(none)").to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

fn jump_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" || w == "--jump" || w == "--goto" {
            return words.next();
        }
    }
    None
}

/// One table as `iptables-save` printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    /// Chain name → its `-A` lines, verbatim, in order (chains with no rules too).
    pub chains: BTreeMap<String, Vec<String>>,
}

impl SavedTable {
    /// The sluice hash of each rule in an owned chain (`None` for a rule without one,
    /// e.g. added by hand).
    fn hashes(&self, chain: &str) -> Option<Vec<Option<String>>> {
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
        chain.is_some_and(|c| c.starts_with(CHAIN_PREFIX)) || comment_hash(line).is_some()
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

/// What one table's sync changes, for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TablePlan {
    pub table: String,
    pub rewritten: Vec<String>,
    pub deleted: Vec<String>,
    pub jumps_inserted: usize,
    pub jumps_deleted: usize,
    /// The `iptables-restore --noflush` input; `None` when the kernel already matches.
    pub payload: Option<String>,
}

/// Compare the desired table with what the kernel holds and build the restore text
/// that makes them equal, touching only owned chains and our own jump rules.
pub fn plan_table(
    table: &str,
    desired: &DesiredTable,
    current: &SavedTable,
) -> Result<TablePlan, IptablesError> {
    desired.validate()?;
    let mut plan = TablePlan {
        table: table.to_string(),
        ..TablePlan::default()
    };
    let desired_names: BTreeSet<&str> = desired.chains.iter().map(|c| c.name.as_str()).collect();

    for chain in &desired.chains {
        let want: Vec<Option<String>> = chain.rule_hashes().into_iter().map(Some).collect();
        if current.hashes(&chain.name).as_ref() != Some(&want) {
            plan.rewritten.push(chain.name.clone());
        }
    }
    plan.deleted = current
        .chains
        .keys()
        .filter(|n| n.starts_with(CHAIN_PREFIX) && !desired_names.contains(n.as_str()))
        .cloned()
        .collect();

    // Our jumps in built-in chains: keep exactly one of each desired jump, delete the
    // rest (stale targets, duplicates from a crash between two syncs).
    let mut jump_deletes = Vec::new();
    let mut jump_inserts = Vec::new();
    for builtin in BUILTIN_CHAINS {
        let wanted: Vec<&Jump> = desired.jumps.iter().filter(|j| j.from == builtin).collect();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        for line in current.chains.get(builtin).into_iter().flatten() {
            let Some(hash) = comment_hash(line) else {
                continue;
            };
            let keep = wanted.iter().any(|j| j.hash() == hash) && seen.insert(hash);
            if !keep {
                jump_deletes.push(format!("-D{}", &line[2..]));
            }
        }
        for j in wanted {
            if !seen.contains(&j.hash()) {
                jump_inserts.push(match j.position {
                    JumpPosition::Top => format!("-I {} 1 {}", j.from, j.spec()),
                    JumpPosition::Bottom => format!("-A {} {}", j.from, j.spec()),
                });
            }
        }
    }
    plan.jumps_inserted = jump_inserts.len();
    plan.jumps_deleted = jump_deletes.len();

    if plan.rewritten.is_empty()
        && plan.deleted.is_empty()
        && jump_inserts.is_empty()
        && jump_deletes.is_empty()
    {
        return Ok(plan);
    }

    let mut out = format!("*{table}\n");
    // Jumps to chains about to vanish go first, so no -X meets a reference.
    for d in &jump_deletes {
        out.push_str(d);
        out.push('\n');
    }
    // Under --noflush, declaring an existing chain flushes it; a new one is created.
    for name in plan.rewritten.iter().chain(&plan.deleted) {
        out.push_str(&format!(":{name} - [0:0]\n"));
    }
    for chain in desired
        .chains
        .iter()
        .filter(|c| plan.rewritten.contains(&c.name))
    {
        for line in chain.render_rules() {
            out.push_str(&line);
            out.push('\n');
        }
    }
    for i in &jump_inserts {
        out.push_str(i);
        out.push('\n');
    }
    for name in &plan.deleted {
        out.push_str(&format!("-X {name}\n"));
    }
    out.push_str("COMMIT\n");
    plan.payload = Some(out);
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> DesiredTable {
        DesiredTable {
            chains: vec![
                Chain::new("SLUICE-FORWARD").rule("-o slc+ -j SLUICE-TO-POD"),
                Chain::new("SLUICE-TO-POD").rule("-p tcp -j ACCEPT"),
            ],
            jumps: vec![Jump::top("FORWARD", "SLUICE-FORWARD")],
        }
    }

    /// Turn our own payload into what iptables-save would print after applying it to
    /// `base` (good enough for chains: the comment is printed as written).
    fn saved_after(base: &str, d: &DesiredTable) -> String {
        let mut s = String::from(base);
        s.push_str("*filter\n:FORWARD ACCEPT [0:0]\n");
        for c in &d.chains {
            s.push_str(&format!(":{} - [0:0]\n", c.name));
        }
        for j in &d.jumps {
            s.push_str(&format!("-A {} {}\n", j.from, j.spec()));
        }
        s.push_str("-A FORWARD -j DOCKER-USER\n");
        for c in &d.chains {
            for l in c.render_rules() {
                s.push_str(&l);
                s.push('\n');
            }
        }
        s.push_str("COMMIT\n");
        s
    }

    #[test]
    fn empty_kernel_gets_every_chain_and_the_jump() {
        let plan = plan_table("filter", &desired(), &SavedTable::default()).unwrap();
        assert_eq!(plan.rewritten, vec!["SLUICE-FORWARD", "SLUICE-TO-POD"]);
        let p = plan.payload.unwrap();
        assert!(p.starts_with("*filter\n:SLUICE-FORWARD - [0:0]\n"));
        assert!(p.contains("-I FORWARD 1 -m comment --comment \"sluice:"));
        assert!(p.ends_with("COMMIT\n"));
    }

    #[test]
    fn matching_kernel_needs_no_restore() {
        let d = desired();
        let saved = parse_save(&saved_after("", &d));
        let plan = plan_table("filter", &d, &saved["filter"]).unwrap();
        assert_eq!(plan.payload, None, "{plan:?}");
    }

    #[test]
    fn deleted_rule_rewrites_only_its_chain() {
        let d = desired();
        let text = saved_after("", &d);
        let text: String = text
            .lines()
            .filter(|l| !l.starts_with("-A SLUICE-TO-POD"))
            .map(|l| format!("{l}\n"))
            .collect();
        let plan = plan_table("filter", &d, &parse_save(&text)["filter"]).unwrap();
        assert_eq!(plan.rewritten, vec!["SLUICE-TO-POD"]);
        assert_eq!(plan.jumps_inserted, 0);
    }

    #[test]
    fn hand_added_rule_in_owned_chain_is_drift() {
        let d = desired();
        let text = saved_after("", &d).replace("COMMIT", "-A SLUICE-FORWARD -j ACCEPT\nCOMMIT");
        let plan = plan_table("filter", &d, &parse_save(&text)["filter"]).unwrap();
        assert_eq!(plan.rewritten, vec!["SLUICE-FORWARD"]);
    }

    #[test]
    fn stale_owned_chain_and_its_jump_are_removed_foreign_untouched() {
        let old = DesiredTable {
            chains: vec![Chain::new("SLUICE-OLD").rule("-j RETURN")],
            jumps: vec![Jump::top("FORWARD", "SLUICE-OLD")],
        };
        let text = saved_after("", &old);
        let plan = plan_table("filter", &desired(), &parse_save(&text)["filter"]).unwrap();
        assert_eq!(plan.deleted, vec!["SLUICE-OLD"]);
        let p = plan.payload.unwrap();
        assert!(p.contains("-D FORWARD -m comment"), "{p}");
        assert!(p.contains("-X SLUICE-OLD\n"));
        assert!(!p.contains("DOCKER"), "foreign rules never appear: {p}");
        let del = p.find("-D FORWARD").unwrap();
        assert!(del < p.find("-X SLUICE-OLD").unwrap());
    }

    #[test]
    fn duplicate_jump_is_deleted_once() {
        let d = desired();
        let spec = d.jumps[0].spec();
        let text = saved_after("", &d).replace("COMMIT", &format!("-A FORWARD {spec}\nCOMMIT"));
        let plan = plan_table("filter", &d, &parse_save(&text)["filter"]).unwrap();
        assert_eq!(plan.jumps_deleted, 1);
        assert_eq!(plan.jumps_inserted, 0);
    }

    #[test]
    fn unowned_or_dangling_chains_are_refused() {
        let bad = DesiredTable {
            chains: vec![Chain::new("KUBE-FORWARD")],
            jumps: vec![],
        };
        assert!(matches!(bad.validate(), Err(IptablesError::NotOwned(_))));
        let dangling = DesiredTable {
            chains: vec![Chain::new("SLUICE-A").rule("-j SLUICE-B")],
            jumps: vec![],
        };
        assert!(matches!(
            dangling.validate(),
            Err(IptablesError::DanglingJump { .. })
        ));
    }

    #[test]
    fn comment_hash_reads_quoted_and_bare() {
        assert_eq!(
            comment_hash("-A X -m comment --comment \"sluice:abc\" -j ACCEPT").as_deref(),
            Some("abc")
        );
        assert_eq!(
            comment_hash("-A X -m comment --comment sluice:abc -j ACCEPT").as_deref(),
            Some("abc")
        );
        assert_eq!(
            comment_hash("-A X -m comment --comment \"kube\" -j ACCEPT"),
            None
        );
    }
}
