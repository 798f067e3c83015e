//! The change planner, the only one: from a desired [`Ruleset`] and what the kernel
//! holds of sluice's ([`KernelState`], read back with `iptables-save`/`ipset save`
//! or left by the previous model), the least work that turns one into the other.
//!
//! - Chains sluice owns (name prefix `SLUICE-`) are compared by the hash comments
//!   their rules carry ([`iptables::chain_rule_hashes`]), not by text, so iptables'
//!   normalisation never counts as a change. Only chains that differ are written: a
//!   chain whose rules changed in one run (a pod's dispatch rules inserted or
//!   deleted) is edited in place ([`ChainEdit`]: `-D <chain> <n>`, `-I <chain> <n>`),
//!   any other is rewritten whole. An edit that only inserts deletes nothing, which
//!   matters on iptables-nft: a transaction that removes a rule makes the writer's
//!   exit wait for an RCU grace period (nf_tables frees the removed rules before it
//!   lets the netlink socket go), 10-25 ms on a busy node, where an insert costs the
//!   process start alone. Owned chains no longer wanted are flushed and deleted after
//!   every rewrite, in the same transaction, so nothing references them when they go.
//! - Built-in chains are never rewritten: exactly one copy of each wanted jump is
//!   kept (inserted at the top when missing), our stale or duplicate jumps are
//!   deleted, and everyone else's rules are left byte for byte.
//! - Sets: new sets are created and filled, existing sets change by member adds and
//!   deletes (a pod moving between selectors touches no chain), sets of another type
//!   are rebuilt aside and swapped in, and sets no longer wanted are destroyed after
//!   the iptables text stopped referencing them.
//!
//! Apply order: [`Plan::ipset_before`], then [`Plan::iptables`] per table
//! (`iptables-restore --noflush -w`), then [`Plan::destroy_sets`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::{BuiltinJump, Chain, IpSet, ModelError, Rule, Ruleset, SetMember, Table};
use crate::names;
use crate::render::ipset::{self, SavedSet};
use crate::render::iptables::{self, SavedTable};

/// Built-in chains sluice may jump from; the only ones whose jumps it manages.
const BUILTIN_CHAINS: [&str; 5] = ["INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"];

/// What the kernel holds, as far as sluice cares: the tables it syncs and its sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    pub tables: BTreeMap<Table, SavedTable>,
    /// Sets whose name starts with sluice's prefix.
    pub sets: BTreeMap<String, SavedSet>,
}

impl KernelState {
    /// What the kernel holds after a successful sync of `ruleset` (the agent trusts
    /// it between full reads; [`diff`] compares two models through it).
    pub fn of(ruleset: &Ruleset) -> KernelState {
        let mut state = KernelState::default();
        for (table, chains) in &ruleset.tables {
            let saved = state.tables.entry(*table).or_default();
            for chain in chains.values() {
                saved
                    .chains
                    .insert(chain.name.clone(), iptables::chain_lines(chain));
            }
        }
        for j in &ruleset.jumps {
            state
                .tables
                .entry(j.table)
                .or_default()
                .chains
                .entry(j.chain.clone())
                .or_default()
                .push(format!("-A {} {}", j.chain, iptables::jump_spec(j)));
        }
        for set in ruleset.sets.values() {
            state.sets.insert(
                set.name.clone(),
                SavedSet {
                    kind: Some(set.kind),
                    members: set.members.clone(),
                    unreadable: BTreeSet::new(),
                },
            );
        }
        state
    }
}

/// An owned chain changed in one run of rules: the kernel's rules `at..at + delete`
/// (0-based) give way to `insert`; the rules before and after stay as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEdit {
    pub chain: String,
    /// Rules kept at the top of the chain.
    pub at: usize,
    /// Rules deleted after those.
    pub delete: usize,
    /// Rules inserted in their place, in order.
    pub insert: Vec<Rule>,
    /// Rules kept at the bottom of the chain.
    pub keep_after: usize,
}

impl ChainEdit {
    /// The edit from the kernel's rule hashes `have` to `want` (the desired chain),
    /// when it writes fewer rules than rewriting the chain would; `None` otherwise.
    fn between(want: &Chain, want_hashes: &[String], have: &[Option<String>]) -> Option<Self> {
        let same = |h: &Option<String>, w: &String| h.as_ref() == Some(w);
        let at = have
            .iter()
            .zip(want_hashes)
            .take_while(|(h, w)| same(h, w))
            .count();
        let keep_after = have[at..]
            .iter()
            .rev()
            .zip(want_hashes[at..].iter().rev())
            .take_while(|(h, w)| same(h, w))
            .count();
        let delete = have.len() - at - keep_after;
        let insert = want_hashes.len() - at - keep_after;
        (delete + insert < want_hashes.len()).then(|| ChainEdit {
            chain: want.name.clone(),
            at,
            delete,
            insert: want.rules[at..at + insert].to_vec(),
            keep_after,
        })
    }

    /// The `iptables-restore` lines: deletions by number first (each at the same
    /// place, the rules below moving up), then insertions before the kept bottom rules
    /// (always before a rule the kernel already holds), or appends when none is kept.
    fn lines(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.delete + self.insert.len());
        for _ in 0..self.delete {
            out.push(format!("-D {} {}", self.chain, self.at + 1));
        }
        for (i, rule) in self.insert.iter().enumerate() {
            let spec = iptables::rule_spec(&self.chain, rule);
            if self.keep_after == 0 {
                out.push(format!("-A {} {spec}", self.chain));
            } else {
                out.push(format!("-I {} {} {spec}", self.chain, self.at + i + 1));
            }
        }
        out
    }

    /// `chain`'s rules after the edit (what replaying it on the old model gives).
    pub fn apply(&self, chain: &mut Chain) {
        chain
            .rules
            .splice(self.at..self.at + self.delete, self.insert.iter().cloned());
    }
}

/// What one sync changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Per table: chains to rewrite whole (new or changed), from the desired model.
    pub rewrite: BTreeMap<Table, Vec<Chain>>,
    /// Per table: existing chains edited in place (see [`ChainEdit`]).
    pub edit: BTreeMap<Table, Vec<ChainEdit>>,
    /// Per table: owned chains to delete.
    pub delete: BTreeMap<Table, Vec<String>>,
    /// Per table: jumps to insert at the top of their built-in chain.
    pub insert_jumps: BTreeMap<Table, Vec<BuiltinJump>>,
    /// Per table: our jump lines (as saved, `-A CHAIN …`) to delete.
    pub delete_jumps: BTreeMap<Table, Vec<String>>,
    /// Sets to create (and fill) before the chains that use them are written.
    pub create_sets: Vec<IpSet>,
    /// Members to add to existing sets.
    pub add: Vec<(String, SetMember)>,
    /// Members to remove from existing sets.
    pub remove: Vec<(String, SetMember)>,
    /// Members the kernel holds that do not read as their set's type, to remove.
    pub remove_unreadable: Vec<(String, String)>,
    /// Sets whose type changed: rebuilt aside and swapped in.
    pub retyped_sets: Vec<IpSet>,
    /// Sets to destroy once no rule references them.
    pub destroy_sets: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.iptables_is_empty() && self.ipset_before().is_empty() && self.destroy_sets.is_empty()
    }

    fn iptables_is_empty(&self) -> bool {
        self.tables().is_empty()
    }

    /// Tables with something to do, in order.
    pub fn tables(&self) -> Vec<Table> {
        fn busy<T>(m: &BTreeMap<Table, Vec<T>>) -> impl Iterator<Item = Table> + '_ {
            m.iter().filter(|(_, v)| !v.is_empty()).map(|(t, _)| *t)
        }
        let tables: BTreeSet<Table> = busy(&self.rewrite)
            .chain(busy(&self.edit))
            .chain(busy(&self.delete))
            .chain(busy(&self.insert_jumps))
            .chain(busy(&self.delete_jumps))
            .collect();
        tables.into_iter().collect()
    }

    /// Chains touched (rewritten, edited or deleted), over all tables.
    pub fn chains_touched(&self) -> usize {
        self.chains_rewritten() + self.chains_edited() + self.chains_deleted()
    }

    pub fn chains_edited(&self) -> usize {
        self.edit.values().map(Vec::len).sum()
    }

    pub fn chains_rewritten(&self) -> usize {
        self.rewrite.values().map(Vec::len).sum()
    }

    pub fn chains_deleted(&self) -> usize {
        self.delete.values().map(Vec::len).sum()
    }

    pub fn jumps_changed(&self) -> usize {
        self.insert_jumps.values().map(Vec::len).sum::<usize>()
            + self.delete_jumps.values().map(Vec::len).sum::<usize>()
    }

    /// Rules written by the rewrites and edits.
    pub fn rules_written(&self) -> usize {
        self.rewrite
            .values()
            .flatten()
            .map(|c| c.rules.len())
            .sum::<usize>()
            + self
                .edit
                .values()
                .flatten()
                .map(|e| e.insert.len())
                .sum::<usize>()
    }

    pub fn set_members_changed(&self) -> usize {
        self.add.len()
            + self.remove.len()
            + self.remove_unreadable.len()
            + self
                .create_sets
                .iter()
                .chain(&self.retyped_sets)
                .map(|s| s.members.len())
                .sum::<usize>()
    }

    /// `ipset restore` text to apply first: new sets, swapped retyped sets, then
    /// member changes. Empty when no set changes.
    pub fn ipset_before(&self) -> String {
        let mut out = String::new();
        self.push_sets(&mut out);
        for (name, m) in &self.add {
            let _ = writeln!(out, "add {name} {} -exist", ipset::member_text(m));
        }
        for (name, m) in &self.remove {
            let _ = writeln!(out, "del {name} {} -exist", ipset::member_text(m));
        }
        for (name, m) in &self.remove_unreadable {
            let _ = writeln!(out, "del {name} {m} -exist");
        }
        out
    }

    /// The new sets (filled) and the retyped ones (rebuilt aside and swapped in).
    fn push_sets(&self, out: &mut String) {
        for set in &self.create_sets {
            let _ = writeln!(out, "{}", ipset::create_line(&set.name, set.kind));
            for m in &set.members {
                let _ = writeln!(out, "add {} {}", set.name, ipset::member_text(m));
            }
        }
        for set in &self.retyped_sets {
            // Same name, other type: build a replacement and swap it in atomically.
            let tmp = names::temp_set(&set.name);
            let _ = writeln!(out, "{} -exist", ipset::create_line(&tmp, set.kind));
            let _ = writeln!(out, "flush {tmp}");
            for m in &set.members {
                let _ = writeln!(out, "add {tmp} {}", ipset::member_text(m));
            }
            let _ = writeln!(out, "swap {tmp} {}", set.name);
            let _ = writeln!(out, "destroy {tmp}");
        }
    }

    /// Whether the set work before the rules is member deletions alone ([`Plan::remove`]),
    /// which the agent writes without `ipset restore`.
    pub fn sets_before_rules_are_removals_only(&self) -> bool {
        self.create_sets.is_empty()
            && self.retyped_sets.is_empty()
            && self.remove_unreadable.is_empty()
    }

    /// The agent's first `ipset restore`: [`Plan::ipset_before`] without the
    /// additions, which wait for the rules (see the agent's dataplane module).
    pub fn ipset_before_rules(&self) -> String {
        let mut out = String::new();
        self.push_sets(&mut out);
        for (name, m) in &self.remove {
            let _ = writeln!(out, "del {name} {} -exist", ipset::member_text(m));
        }
        for (name, m) in &self.remove_unreadable {
            let _ = writeln!(out, "del {name} {m} -exist");
        }
        out
    }

    /// `iptables-restore --noflush -w` text for `table` (empty when untouched).
    pub fn iptables(&self, table: Table) -> String {
        let get = |m: &BTreeMap<Table, Vec<String>>| m.get(&table).cloned().unwrap_or_default();
        let rewrite = self.rewrite.get(&table).map(Vec::as_slice).unwrap_or(&[]);
        let edit = self.edit.get(&table).map(Vec::as_slice).unwrap_or(&[]);
        let delete = get(&self.delete);
        let delete_jumps = get(&self.delete_jumps);
        let insert_jumps = self
            .insert_jumps
            .get(&table)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if rewrite.is_empty()
            && edit.is_empty()
            && delete.is_empty()
            && delete_jumps.is_empty()
            && insert_jumps.is_empty()
        {
            return String::new();
        }
        let mut out = format!("*{}\n", table.as_str());
        // Jumps to chains about to vanish go first, so no -X meets a reference.
        for line in &delete_jumps {
            let _ = writeln!(out, "-D{}", &line[2..]);
        }
        // Under --noflush, declaring an existing chain flushes it; a new one is created.
        for name in rewrite.iter().map(|c| &c.name).chain(&delete) {
            let _ = writeln!(out, ":{name} - [0:0]");
        }
        for chain in rewrite {
            for line in iptables::chain_lines(chain) {
                let _ = writeln!(out, "{line}");
            }
        }
        // After the rewrites, so an inserted jump finds its (new) target complete.
        for line in edit.iter().flat_map(ChainEdit::lines) {
            let _ = writeln!(out, "{line}");
        }
        for j in insert_jumps {
            let _ = writeln!(out, "-I {} 1 {}", j.chain, iptables::jump_spec(j));
        }
        for name in &delete {
            let _ = writeln!(out, "-X {name}");
        }
        out.push_str("COMMIT\n");
        out
    }

    /// Every table's text, concatenated in table order.
    pub fn iptables_all(&self) -> String {
        self.tables()
            .into_iter()
            .map(|t| self.iptables(t))
            .collect()
    }

    /// `ipset restore` text to apply last: sets nothing references any more.
    pub fn ipset_after(&self) -> String {
        self.destroy_sets
            .iter()
            .map(|n| format!("destroy {n}\n"))
            .collect()
    }
}

/// The plan that brings `kernel` to `desired`. Every table of either is planned, so
/// an owned chain in a table the model no longer uses is deleted too.
pub fn plan(desired: &Ruleset, kernel: &KernelState) -> Result<Plan, ModelError> {
    desired.validate()?;
    desired.check_iptables()?;
    let mut plan = Plan::default();
    let tables: BTreeSet<Table> = desired
        .tables
        .keys()
        .chain(kernel.tables.keys())
        .copied()
        .collect();
    let empty = SavedTable::default();
    plan_sets(&mut plan, desired, &kernel.sets);
    for table in tables {
        plan_table(
            &mut plan,
            desired,
            table,
            kernel.tables.get(&table).unwrap_or(&empty),
        );
    }
    Ok(plan)
}

/// The part of the plan for one table, given what the kernel holds there (for a
/// caller that reads and writes one table at a time; `desired` must be valid).
pub fn plan_table(plan: &mut Plan, desired: &Ruleset, table: Table, have: &SavedTable) {
    let no_chains = BTreeMap::new();
    let want = desired.tables.get(&table).unwrap_or(&no_chains);
    plan_chains(plan, table, want, have);
    let jumps: Vec<&BuiltinJump> = desired.jumps.iter().filter(|j| j.table == table).collect();
    plan_jumps(plan, table, &jumps, have);
}

fn plan_chains(plan: &mut Plan, table: Table, want: &BTreeMap<String, Chain>, have: &SavedTable) {
    let mut rewrite: Vec<Chain> = Vec::new();
    let mut edit: Vec<ChainEdit> = Vec::new();
    for c in want.values() {
        let hashes = iptables::chain_rule_hashes(c);
        match have.hashes(&c.name) {
            Some(old) if old.iter().map(Option::as_ref).eq(hashes.iter().map(Some)) => {}
            Some(old) => match ChainEdit::between(c, &hashes, &old) {
                Some(e) => edit.push(e),
                None => rewrite.push(c.clone()),
            },
            None => rewrite.push(c.clone()),
        }
    }
    if !edit.is_empty() {
        plan.edit.insert(table, edit);
    }
    let delete: Vec<String> = have
        .chains
        .keys()
        .filter(|n| n.starts_with(names::PREFIX) && !want.contains_key(*n))
        .cloned()
        .collect();
    if !rewrite.is_empty() {
        plan.rewrite.insert(table, rewrite);
    }
    if !delete.is_empty() {
        plan.delete.insert(table, delete);
    }
}

/// Keep exactly one of each wanted jump; delete the rest of ours (stale targets,
/// duplicates from a crash between two syncs).
fn plan_jumps(plan: &mut Plan, table: Table, wanted: &[&BuiltinJump], have: &SavedTable) {
    let mut deletes = Vec::new();
    let mut inserts = Vec::new();
    for builtin in BUILTIN_CHAINS {
        let wanted: Vec<(&BuiltinJump, String)> = wanted
            .iter()
            .filter(|j| j.chain == builtin)
            .map(|j| (*j, iptables::jump_hash(j)))
            .collect();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        for line in have.chains.get(builtin).into_iter().flatten() {
            let Some(hash) = iptables::comment_hash(line) else {
                continue;
            };
            let keep = wanted.iter().any(|(_, h)| *h == hash) && seen.insert(hash);
            if !keep {
                deletes.push(line.clone());
            }
        }
        for (j, hash) in wanted {
            if !seen.contains(&hash) {
                inserts.push(j.clone());
            }
        }
    }
    if !deletes.is_empty() {
        plan.delete_jumps.insert(table, deletes);
    }
    if !inserts.is_empty() {
        plan.insert_jumps.insert(table, inserts);
    }
}

/// The part of the plan for the sets, given every set of ours the kernel holds.
pub fn plan_sets(plan: &mut Plan, desired: &Ruleset, have: &BTreeMap<String, SavedSet>) {
    for (name, set) in &desired.sets {
        match have.get(name) {
            Some(prev) if prev.kind == Some(set.kind) => {
                for m in set.members.difference(&prev.members) {
                    plan.add.push((name.clone(), *m));
                }
                for m in prev.members.difference(&set.members) {
                    plan.remove.push((name.clone(), *m));
                }
                for m in &prev.unreadable {
                    plan.remove_unreadable.push((name.clone(), m.clone()));
                }
            }
            Some(_) => plan.retyped_sets.push(set.clone()),
            None => plan.create_sets.push(set.clone()),
        }
    }
    plan.destroy_sets = have
        .keys()
        .filter(|n| n.starts_with(names::PREFIX) && !desired.sets.contains_key(*n))
        .cloned()
        .collect();
}

/// The plan from `old` (what the kernel holds after a sync of it) to `new`.
pub fn diff(old: &Ruleset, new: &Ruleset) -> Plan {
    diff_checked(old, new).unwrap_or_else(|e| {
        // A model the compiler built is valid by construction; a hand-made one that is
        // not gets an empty plan rather than a half one.
        debug_assert!(false, "invalid model: {e}");
        Plan::default()
    })
}

/// The plan from `old` (what the kernel holds after a sync of it) to `new`: exactly
/// [`plan`]`(new, &`[`KernelState::of`]`(old))`, without rendering and hashing what
/// did not change. A new pod on a realistic node changes 4 chains and 2 set members
/// of 1,500 chains and 17,000 members; this is the agent's path between syncs that
/// trust their last write.
pub fn diff_checked(old: &Ruleset, new: &Ruleset) -> Result<Plan, ModelError> {
    new.validate()?;
    new.check_iptables()?;
    let mut plan = Plan::default();
    diff_sets(&mut plan, old, new);
    // The tables `KernelState::of(old)` holds (chains or jumps) and the desired ones.
    let tables: BTreeSet<Table> = new
        .tables
        .keys()
        .chain(old.tables.keys())
        .copied()
        .chain(old.jumps.iter().map(|j| j.table))
        .collect();
    let none = BTreeMap::new();
    for table in tables {
        let want = new.tables.get(&table).unwrap_or(&none);
        let had = old.tables.get(&table).unwrap_or(&none);
        diff_chains(&mut plan, table, want, had);
        let mut have = SavedTable::default();
        for j in old.jumps.iter().filter(|j| j.table == table) {
            have.chains
                .entry(j.chain.clone())
                .or_default()
                .push(format!("-A {} {}", j.chain, iptables::jump_spec(j)));
        }
        let jumps: Vec<&BuiltinJump> = new.jumps.iter().filter(|j| j.table == table).collect();
        plan_jumps(&mut plan, table, &jumps, &have);
    }
    Ok(plan)
}

/// [`plan_chains`] against the chains of the last model: a chain equal to its last
/// version is skipped unhashed.
fn diff_chains(
    plan: &mut Plan,
    table: Table,
    want: &BTreeMap<String, Chain>,
    had: &BTreeMap<String, Chain>,
) {
    let mut rewrite: Vec<Chain> = Vec::new();
    let mut edit: Vec<ChainEdit> = Vec::new();
    for c in want.values() {
        let Some(prev) = had.get(&c.name) else {
            rewrite.push(c.clone());
            continue;
        };
        if prev == c {
            continue;
        }
        let hashes = iptables::chain_rule_hashes(c);
        let old: Vec<Option<String>> = iptables::chain_rule_hashes(prev)
            .into_iter()
            .map(Some)
            .collect();
        if old.iter().map(Option::as_ref).eq(hashes.iter().map(Some)) {
            continue;
        }
        match ChainEdit::between(c, &hashes, &old) {
            Some(e) => edit.push(e),
            None => rewrite.push(c.clone()),
        }
    }
    let delete: Vec<String> = had
        .keys()
        .filter(|n| n.starts_with(names::PREFIX) && !want.contains_key(*n))
        .cloned()
        .collect();
    if !edit.is_empty() {
        plan.edit.insert(table, edit);
    }
    if !rewrite.is_empty() {
        plan.rewrite.insert(table, rewrite);
    }
    if !delete.is_empty() {
        plan.delete.insert(table, delete);
    }
}

/// [`plan_sets`] against the sets of the last model: an unchanged set costs one
/// comparison.
fn diff_sets(plan: &mut Plan, old: &Ruleset, new: &Ruleset) {
    for (name, set) in &new.sets {
        match old.sets.get(name) {
            Some(prev) if prev.kind == set.kind => {
                if prev.members != set.members {
                    for m in set.members.difference(&prev.members) {
                        plan.add.push((name.clone(), *m));
                    }
                    for m in prev.members.difference(&set.members) {
                        plan.remove.push((name.clone(), *m));
                    }
                }
            }
            Some(_) => plan.retyped_sets.push(set.clone()),
            None => plan.create_sets.push(set.clone()),
        }
    }
    plan.destroy_sets = old
        .sets
        .keys()
        .filter(|n| n.starts_with(names::PREFIX) && !new.sets.contains_key(*n))
        .cloned()
        .collect();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{Match, Rule, SetKind, Target};

    fn jump(chain: &str, to: &str) -> BuiltinJump {
        BuiltinJump {
            table: Table::Filter,
            chain: chain.into(),
            rule: Rule::new(vec![], Target::Jump(to.into())),
        }
    }

    fn chain(name: &str, rules: Vec<Rule>) -> Chain {
        Chain {
            name: name.into(),
            rules,
        }
    }

    fn desired() -> Ruleset {
        let mut rs = Ruleset::default();
        rs.add_chain(
            Table::Filter,
            chain(
                "SLUICE-FORWARD",
                vec![Rule::new(
                    vec![Match::OutInterface(crate::dataplane::Interface::prefix(
                        "slc",
                    ))],
                    Target::Jump("SLUICE-TO-POD".into()),
                )],
            ),
        );
        rs.add_chain(
            Table::Filter,
            chain(
                "SLUICE-TO-POD",
                vec![Rule::new(
                    vec![Match::Protocol(crate::Protocol::Tcp)],
                    Target::Accept,
                )],
            ),
        );
        rs.jumps = vec![jump("FORWARD", "SLUICE-FORWARD")];
        rs
    }

    /// What iptables-save prints after our restore on a table that also holds
    /// someone else's rules.
    fn saved(rs: &Ruleset) -> KernelState {
        let mut k = KernelState::of(rs);
        k.tables
            .entry(Table::Filter)
            .or_default()
            .chains
            .entry("FORWARD".into())
            .or_default()
            .push("-A FORWARD -j DOCKER-USER".into());
        k
    }

    #[test]
    fn empty_kernel_gets_every_chain_and_the_jump() {
        let p = plan(&desired(), &KernelState::default()).unwrap();
        assert_eq!(p.chains_rewritten(), 2);
        let text = p.iptables(Table::Filter);
        assert!(
            text.starts_with("*filter\n:SLUICE-FORWARD - [0:0]\n"),
            "{text}"
        );
        assert!(text.contains("-I FORWARD 1 -m comment --comment \"sluice:"));
        assert!(text.ends_with("COMMIT\n"));
    }

    #[test]
    fn matching_kernel_needs_no_restore() {
        let d = desired();
        let p = plan(&d, &saved(&d)).unwrap();
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn deleted_rule_rewrites_only_its_chain() {
        let d = desired();
        let mut k = saved(&d);
        k.tables
            .get_mut(&Table::Filter)
            .unwrap()
            .chains
            .insert("SLUICE-TO-POD".into(), vec![]);
        let p = plan(&d, &k).unwrap();
        let names: Vec<&str> = p.rewrite[&Table::Filter]
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["SLUICE-TO-POD"]);
        assert_eq!(p.jumps_changed(), 0);
    }

    #[test]
    fn hand_added_rule_in_owned_chain_is_drift() {
        let d = desired();
        let mut k = saved(&d);
        k.tables
            .get_mut(&Table::Filter)
            .unwrap()
            .chains
            .get_mut("SLUICE-FORWARD")
            .unwrap()
            .push("-A SLUICE-FORWARD -j ACCEPT".into());
        let p = plan(&d, &k).unwrap();
        assert_eq!(p.rewrite[&Table::Filter][0].name, "SLUICE-FORWARD");
    }

    #[test]
    fn stale_owned_chain_and_its_jump_are_removed_foreign_untouched() {
        let mut old = Ruleset::default();
        old.add_chain(
            Table::Filter,
            chain("SLUICE-OLD", vec![Rule::new(vec![], Target::Return)]),
        );
        old.jumps = vec![jump("FORWARD", "SLUICE-OLD")];
        let p = plan(&desired(), &saved(&old)).unwrap();
        assert_eq!(p.delete[&Table::Filter], ["SLUICE-OLD"]);
        let text = p.iptables(Table::Filter);
        assert!(text.contains("-D FORWARD -m comment"), "{text}");
        assert!(text.contains("-X SLUICE-OLD\n"));
        assert!(
            !text.contains("DOCKER"),
            "foreign rules never appear: {text}"
        );
        assert!(text.find("-D FORWARD").unwrap() < text.find("-X SLUICE-OLD").unwrap());
    }

    #[test]
    fn duplicate_jump_is_deleted_once() {
        let d = desired();
        let mut k = saved(&d);
        let spec = iptables::jump_spec(&d.jumps[0]);
        k.tables
            .get_mut(&Table::Filter)
            .unwrap()
            .chains
            .get_mut("FORWARD")
            .unwrap()
            .push(format!("-A FORWARD {spec}"));
        let p = plan(&d, &k).unwrap();
        assert_eq!(p.delete_jumps[&Table::Filter].len(), 1);
        assert!(p.insert_jumps.is_empty());
    }

    #[test]
    fn unowned_or_dangling_chains_are_refused() {
        let mut bad = Ruleset::default();
        bad.add_chain(Table::Filter, chain("KUBE-FORWARD", vec![]));
        assert!(matches!(
            plan(&bad, &KernelState::default()),
            Err(ModelError::NotOwned(_))
        ));
        let mut dangling = Ruleset::default();
        dangling.add_chain(
            Table::Filter,
            chain(
                "SLUICE-A",
                vec![Rule::new(vec![], Target::Jump("SLUICE-B".into()))],
            ),
        );
        assert!(matches!(
            plan(&dangling, &KernelState::default()),
            Err(ModelError::DanglingJump { .. })
        ));
    }

    const SAVED_SETS: &str = "create SLUICE-NODES hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1\n\
add SLUICE-NODES 10.0.0.1\n\
add SLUICE-NODES 10.0.0.9\n\
create KUBE-LOOP hash:ip family inet\n\
add KUBE-LOOP 1.2.3.4\n\
create SLUICE-OLD hash:net family inet\n";

    fn set(name: &str, kind: SetKind, members: &[&str]) -> IpSet {
        IpSet {
            name: name.into(),
            kind,
            members: members
                .iter()
                .map(|m| ipset::parse_member(kind, m).unwrap())
                .collect(),
        }
    }

    fn kernel_sets(text: &str) -> KernelState {
        KernelState {
            tables: BTreeMap::new(),
            sets: ipset::parse_save(text, names::PREFIX),
        }
    }

    #[test]
    fn set_deltas_only_and_stale_sets_destroyed_foreign_untouched() {
        let k = kernel_sets(SAVED_SETS);
        assert_eq!(
            k.sets.keys().collect::<Vec<_>>(),
            ["SLUICE-NODES", "SLUICE-OLD"]
        );
        let mut rs = Ruleset::default();
        for s in [
            set("SLUICE-NODES", SetKind::HashIp, &["10.0.0.1", "10.0.0.2"]),
            set("SLUICE-POOLS", SetKind::HashNet, &["10.244.0.0/16"]),
        ] {
            rs.sets.insert(s.name.clone(), s);
        }
        let p = plan(&rs, &k).unwrap();
        assert_eq!(
            p.ipset_before(),
            "create SLUICE-POOLS hash:net family inet hashsize 1024 maxelem 1048576\n\
add SLUICE-POOLS 10.244.0.0/16\n\
add SLUICE-NODES 10.0.0.2 -exist\ndel SLUICE-NODES 10.0.0.9 -exist\n"
        );
        assert_eq!(p.destroy_sets, ["SLUICE-OLD"]);
    }

    #[test]
    fn host_routes_in_hash_net_compare_equal_to_saved_bare_addresses() {
        let k = kernel_sets("create SLUICE-X hash:net family inet\nadd SLUICE-X 10.1.1.1\n");
        let mut rs = Ruleset::default();
        rs.sets.insert(
            "SLUICE-X".into(),
            set("SLUICE-X", SetKind::HashNet, &["10.1.1.1/32"]),
        );
        assert!(plan(&rs, &k).unwrap().is_empty());
    }

    #[test]
    fn type_change_swaps() {
        let k = kernel_sets("create SLUICE-X hash:ip family inet\n");
        let mut rs = Ruleset::default();
        rs.sets.insert(
            "SLUICE-X".into(),
            set("SLUICE-X", SetKind::HashNet, &["10.0.0.0/8"]),
        );
        let text = plan(&rs, &k).unwrap().ipset_before();
        assert!(
            text.contains("swap SLUICE-T-X SLUICE-X\ndestroy SLUICE-T-X\n"),
            "{text}"
        );
    }

    /// `desired()` with `SLUICE-TO-POD` dispatching to one chain per name in `rules`.
    fn to_pod(rules: &[&str]) -> Ruleset {
        let mut rs = desired();
        let dispatch = rs
            .tables
            .get_mut(&Table::Filter)
            .unwrap()
            .get_mut("SLUICE-TO-POD")
            .unwrap();
        dispatch.rules = rules
            .iter()
            .map(|veth| {
                Rule::new(
                    vec![Match::OutInterface(crate::dataplane::Interface::exact(
                        *veth,
                    ))],
                    Target::Goto(format!("SLUICE-TW-{veth}")),
                )
            })
            .collect();
        for veth in rules {
            rs.add_chain(
                Table::Filter,
                chain(
                    &format!("SLUICE-TW-{veth}"),
                    vec![Rule::new(vec![], Target::Drop)],
                ),
            );
        }
        rs
    }

    #[test]
    fn a_rule_inserted_mid_chain_is_one_insert_and_deletes_nothing() {
        let old = to_pod(&["slca", "slcc", "slcd"]);
        let new = to_pod(&["slca", "slcb", "slcc", "slcd"]);
        let p = plan(&new, &saved(&old)).unwrap();
        let rewritten: Vec<&str> = p.rewrite[&Table::Filter]
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            rewritten,
            ["SLUICE-TW-slcb"],
            "the new pod's own chain only"
        );
        assert_eq!(p.chains_edited(), 1);
        let text = p.iptables(Table::Filter);
        let spec = iptables::rule_spec(
            "SLUICE-TO-POD",
            &new.chain(Table::Filter, "SLUICE-TO-POD").unwrap().rules[1],
        );
        assert!(
            text.contains(&format!("-I SLUICE-TO-POD 2 {spec}\n")),
            "{text}"
        );
        assert!(
            !text.contains("-D ") && !text.contains(":SLUICE-TO-POD"),
            "{text}"
        );
        // The new chain exists before the rule that jumps to it.
        assert!(text.find(":SLUICE-TW-slcb").unwrap() < text.find("-I SLUICE-TO-POD").unwrap());
    }

    #[test]
    fn a_rule_deleted_mid_chain_is_one_delete_by_number() {
        let old = to_pod(&["slca", "slcb", "slcc"]);
        let new = to_pod(&["slca", "slcc"]);
        let p = plan(&new, &saved(&old)).unwrap();
        assert!(p.rewrite.is_empty(), "{p:?}");
        assert_eq!(p.delete[&Table::Filter], ["SLUICE-TW-slcb"]);
        let text = p.iptables(Table::Filter);
        assert!(text.contains("-D SLUICE-TO-POD 2\n"), "{text}");
        assert!(text.find("-D SLUICE-TO-POD 2").unwrap() < text.find("-X SLUICE-TW-slcb").unwrap());
    }

    #[test]
    fn a_rule_appended_at_the_end_is_an_append() {
        let old = to_pod(&["slca"]);
        let new = to_pod(&["slca", "slcb"]);
        let text = plan(&new, &saved(&old)).unwrap().iptables(Table::Filter);
        assert!(text.contains("-A SLUICE-TO-POD -o slcb "), "{text}");
        assert!(!text.contains("-I SLUICE-TO-POD"), "{text}");
    }

    #[test]
    fn a_chain_changed_throughout_is_rewritten_whole() {
        let old = to_pod(&["slca", "slcb"]);
        let new = to_pod(&["slcc", "slcd"]);
        let p = plan(&new, &saved(&old)).unwrap();
        assert_eq!(p.chains_edited(), 0);
        assert!(
            p.iptables(Table::Filter)
                .contains(":SLUICE-TO-POD - [0:0]\n")
        );
    }

    #[test]
    fn an_edit_replayed_on_the_old_chain_gives_the_new_one() {
        let cases: [(&[&str], &[&str]); 5] = [
            (&["a", "b", "c", "d", "e"], &["a", "x", "y", "d", "e"]),
            (&["a", "b", "c", "d"], &["a", "b", "c", "d", "e"]),
            (&["a", "b", "c", "d"], &["z", "a", "b", "c", "d"]),
            (&["a", "b", "b", "b"], &["a", "b", "b", "b", "b"]),
            (&["a", "b", "c", "d", "e"], &["a", "d", "e"]),
        ];
        for (old, new) in cases {
            let (o, n) = (to_pod(old), to_pod(new));
            let p = plan(&n, &saved(&o)).unwrap();
            let edit = &p.edit[&Table::Filter][0];
            let mut chain = o.chain(Table::Filter, "SLUICE-TO-POD").unwrap().clone();
            edit.apply(&mut chain);
            assert_eq!(
                &chain,
                n.chain(Table::Filter, "SLUICE-TO-POD").unwrap(),
                "{old:?} → {new:?}"
            );
        }
    }

    #[test]
    fn the_fast_diff_is_the_plan_against_the_last_kernel_state() {
        let pairs = [
            (to_pod(&["slca", "slcc"]), to_pod(&["slca", "slcb", "slcc"])),
            (to_pod(&["slca", "slcb", "slcc"]), to_pod(&["slcc"])),
            (desired(), Ruleset::default()),
            (Ruleset::default(), desired()),
        ];
        for (old, new) in pairs {
            assert_eq!(
                diff_checked(&old, &new).unwrap(),
                plan(&new, &KernelState::of(&old)).unwrap()
            );
        }
    }
}
