//! The incremental path: from the ruleset last applied and the new one, the least
//! work that turns one into the other.
//!
//! - Chains: only chains whose rules changed (or that are new) are rewritten, whole;
//!   chains that disappeared are flushed and deleted after every rewrite, in the same
//!   transaction, so nothing references them any more when they go.
//! - Sets: new sets are created and filled; for existing sets, members are added and
//!   removed one by one (a pod whose labels change usually moves between sets and
//!   touches no chain); sets that disappeared are destroyed after the iptables text
//!   stopped referencing them. A set whose type changed cannot be changed in place
//!   while rules reference it; the delta reports it in [`Delta::retyped_sets`] and the
//!   caller must do a full resync (never happens with sluice's own names, whose
//!   prefix fixes the type).
//!
//! Apply order: [`Delta::ipset_before`], then [`Delta::iptables`] per table, then
//! [`Delta::ipset_after`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::compile::{Chain, IpSet, Ruleset, SetMember, Table};
use crate::render::{ipset, iptables};

/// What changed between two rulesets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Per table: chains to rewrite whole (new or changed), from the new ruleset.
    pub rewrite: BTreeMap<Table, Vec<Chain>>,
    /// Per table: chains to delete.
    pub delete: BTreeMap<Table, Vec<String>>,
    /// Sets to create (and fill) before the chains that use them are written.
    pub create_sets: Vec<IpSet>,
    /// Members to add to existing sets.
    pub add: Vec<(String, SetMember)>,
    /// Members to remove from existing sets.
    pub remove: Vec<(String, SetMember)>,
    /// Sets to destroy once no rule references them.
    pub destroy_sets: Vec<String>,
    /// Sets whose type changed: not expressible as a delta (see the module doc).
    pub retyped_sets: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.rewrite.values().all(Vec::is_empty)
            && self.delete.values().all(Vec::is_empty)
            && self.create_sets.is_empty()
            && self.add.is_empty()
            && self.remove.is_empty()
            && self.destroy_sets.is_empty()
            && self.retyped_sets.is_empty()
    }

    /// Chains touched (rewritten or deleted), over all tables.
    pub fn chains_touched(&self) -> usize {
        self.rewrite.values().map(Vec::len).sum::<usize>()
            + self.delete.values().map(Vec::len).sum::<usize>()
    }

    /// Rules written by the rewrites.
    pub fn rules_written(&self) -> usize {
        self.rewrite.values().flatten().map(|c| c.rules.len()).sum()
    }

    /// `ipset restore` text to apply first: new sets, then member changes.
    pub fn ipset_before(&self) -> String {
        let mut out = String::new();
        for set in &self.create_sets {
            ipset::push_set_full(&mut out, set);
        }
        for (name, m) in &self.add {
            let _ = writeln!(out, "add {name} {} -exist", ipset::member_text(m));
        }
        for (name, m) in &self.remove {
            let _ = writeln!(out, "del {name} {} -exist", ipset::member_text(m));
        }
        out
    }

    /// `iptables-restore --noflush -w` text for `table` (empty when untouched).
    pub fn iptables(&self, table: Table) -> String {
        let rewrite = self.rewrite.get(&table).map(Vec::as_slice).unwrap_or(&[]);
        let delete = self.delete.get(&table).map(Vec::as_slice).unwrap_or(&[]);
        iptables::render_chains(table, rewrite, delete)
    }

    /// Every table's text, concatenated in table order.
    pub fn iptables_all(&self) -> String {
        let mut tables: Vec<Table> = self
            .rewrite
            .keys()
            .chain(self.delete.keys())
            .copied()
            .collect();
        tables.sort();
        tables.dedup();
        tables.into_iter().map(|t| self.iptables(t)).collect()
    }

    /// `ipset restore` text to apply last: sets nothing references any more.
    pub fn ipset_after(&self) -> String {
        self.destroy_sets
            .iter()
            .map(|n| format!("destroy {n}\n"))
            .collect()
    }
}

/// The delta from `old` (what the kernel holds) to `new`.
pub fn diff(old: &Ruleset, new: &Ruleset) -> Delta {
    let mut delta = Delta::default();
    let empty = BTreeMap::new();
    let mut tables: Vec<Table> = old
        .tables
        .keys()
        .chain(new.tables.keys())
        .copied()
        .collect();
    tables.sort();
    tables.dedup();
    for table in tables {
        let before = old.tables.get(&table).unwrap_or(&empty);
        let after = new.tables.get(&table).unwrap_or(&empty);
        let rewrite: Vec<Chain> = after
            .values()
            .filter(|c| before.get(&c.name).is_none_or(|b| b.rules != c.rules))
            .cloned()
            .collect();
        let delete: Vec<String> = before
            .keys()
            .filter(|n| !after.contains_key(*n))
            .cloned()
            .collect();
        if !rewrite.is_empty() {
            delta.rewrite.insert(table, rewrite);
        }
        if !delete.is_empty() {
            delta.delete.insert(table, delete);
        }
    }

    for (name, set) in &new.sets {
        match old.sets.get(name) {
            Some(prev) if prev.kind == set.kind => {
                for m in set.members.difference(&prev.members) {
                    delta.add.push((name.clone(), *m));
                }
                for m in prev.members.difference(&set.members) {
                    delta.remove.push((name.clone(), *m));
                }
            }
            Some(_) => delta.retyped_sets.push(name.clone()),
            None => delta.create_sets.push(set.clone()),
        }
    }
    for name in old.sets.keys() {
        if !new.sets.contains_key(name) {
            delta.destroy_sets.push(name.clone());
        }
    }
    delta.destroy_sets.sort();
    delta
}
