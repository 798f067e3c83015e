//! The policy dataplane: the node's rule model ([`Ruleset`], built in the policy
//! crate) applied atomically to the kernel.
//!
//! One sync = read (`iptables-save` per table, `ipset save`; or, between full
//! resyncs, the model of the last complete sync), plan (pure, in
//! [`sluice_policy::dataplane::plan`]), then write, in an order where every moment
//! in between is safe (docs/reliability.md, "Agent killed mid-apply"):
//! 1. `ipset restore`: new sets (no rule uses them yet) and members removed from
//!    existing sets (removals alone go over netlink, [`CommandRunner::set_members`]).
//!    Every set a filter rule matches grants (pod peers, ipBlocks, named ports, node
//!    addresses), so a smaller set only allows less than before;
//! 2. one `iptables-restore --noflush -w` per table that changed, each atomic; a
//!    chain changed in one run of rules (a pod's dispatch rules) is edited in place,
//!    so a new pod's transaction inserts and deletes nothing;
//! 3. members added to existing sets, now under the new rules (over netlink);
//! 4. the destruction of sets nothing references any more.
//!
//! Removing before and adding after the rules keeps each intermediate within the old
//! or the new policy: old rules with old ∩ new members, then new rules with old ∩ new
//! members. Adding first would let an old rule that the change removes see a member
//! the change adds (a pod relabelled into a peer set while the policy naming that
//! peer is deleted) — allowed by neither policy.
//!
//! The nftables dataplane ([`nft`]) is the same model written as one table in one
//! transaction; [`select`] picks one per node and is what the agent holds.
//!
//! A sync with nothing to change writes nothing, which is what lets a periodic resync
//! repair drift without disturbing the rest.

pub mod backend;
pub mod nft;
mod nft_elements;
pub mod nft_table;
pub mod runner;
pub mod select;

use sluice_policy::dataplane::plan::{self, Plan};
use sluice_policy::dataplane::{ModelError, Ruleset};
use sluice_policy::names;
use sluice_policy::render::{ipset, iptables};

pub use backend::{Backend, BackendChoice};
pub use nft::NftDataplane;
pub use runner::{CommandRunner, ExecRunner, RecordingRunner};
pub use select::{DataplaneChoice, SelectedDataplane, Selection};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Run(#[from] runner::RunError),
    #[error(transparent)]
    Plan(#[from] ModelError),
    #[error(transparent)]
    NftListing(#[from] sluice_policy::dataplane::nft_plan::NftParseError),
    /// The kernel refused an element-only transaction sent over netlink (nothing of
    /// it was committed).
    #[error(transparent)]
    Netlink(#[from] sluice_netlink::NetlinkError),
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Owned chains written: rewritten whole, or (iptables) edited in place.
    pub chains_rewritten: usize,
    pub chains_deleted: usize,
    pub jumps_changed: usize,
    pub set_members_changed: usize,
    pub sets_destroyed: usize,
    pub restores: usize,
}

impl SyncReport {
    pub fn changed_anything(&self) -> bool {
        self.restores > 0 || self.sets_destroyed > 0
    }
}

/// Whether a sync reads the kernel first or trusts what the last sync wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Read `iptables-save`/`ipset save` and repair any drift (periodic resync, start).
    Full,
    /// Diff against the last successful write: a change costs only its own restore,
    /// which keeps a new pod's wait for policy short on a large node. Falls back to
    /// [`SyncMode::Full`] when there is no trusted last write.
    Incremental,
}

/// The writer of owned chains and sets through a [`CommandRunner`].
pub struct Dataplane<R: CommandRunner> {
    runner: R,
    backend: Backend,
    /// The model of the last complete sync: what the kernel holds while nobody else
    /// touched sluice's objects. An incremental sync plans against it
    /// ([`plan::diff_checked`]), comparing chains and sets by value and hashing only
    /// the few that changed.
    last: std::sync::Mutex<Option<Ruleset>>,
}

impl<R: CommandRunner> Dataplane<R> {
    pub fn new(runner: R, backend: Backend) -> Self {
        Dataplane {
            runner,
            backend,
            last: std::sync::Mutex::new(None),
        }
    }

    /// Sync in `mode`; the last-write view is kept only after a complete success.
    pub fn sync_with(
        &self,
        desired: &Ruleset,
        mode: SyncMode,
    ) -> Result<SyncReport, DataplaneError> {
        let last = match mode {
            SyncMode::Full => None,
            SyncMode::Incremental => self.last.lock().unwrap_or_else(|e| e.into_inner()).take(),
        };
        let result = self.sync_from(desired, last.as_ref());
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) =
            result.as_ref().ok().map(|_| desired.clone());
        result
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// Bring the kernel to `desired` after reading it, touching only what differs.
    pub fn sync(&self, desired: &Ruleset) -> Result<SyncReport, DataplaneError> {
        self.sync_with(desired, SyncMode::Full)
    }

    fn sync_from(
        &self,
        desired: &Ruleset,
        last: Option<&Ruleset>,
    ) -> Result<SyncReport, DataplaneError> {
        let plan = match last {
            Some(old) => plan::diff_checked(old, desired)?,
            None => self.read_and_plan(desired)?,
        };
        self.write(&plan)
    }

    /// Read what the kernel holds of ours (`ipset save`, one `*-save` per table of
    /// the model) and plan against it.
    fn read_and_plan(&self, desired: &Ruleset) -> Result<Plan, DataplaneError> {
        desired.validate()?;
        let mut plan = Plan::default();
        let sets = ipset::parse_save(
            &self.runner.run_ok("ipset", &["save"], None)?.stdout,
            names::PREFIX,
        );
        plan::plan_sets(&mut plan, desired, &sets);
        for table in desired.tables.keys().copied() {
            let text = self
                .runner
                .run_ok(self.backend.save_cmd(), &["-t", table.as_str()], None)?
                .stdout;
            let saved = iptables::parse_save(&text)
                .remove(table.as_str())
                .unwrap_or_default();
            plan::plan_table(&mut plan, desired, table, &saved);
        }
        Ok(plan)
    }

    /// Write `plan` in the order the module docs give.
    fn write(&self, plan: &Plan) -> Result<SyncReport, DataplaneError> {
        let mut report = SyncReport {
            set_members_changed: plan.set_members_changed(),
            // Edited chains count as rewritten: both are chains written.
            chains_rewritten: plan.chains_rewritten() + plan.chains_edited(),
            chains_deleted: plan.chains_deleted(),
            jumps_changed: plan.jumps_changed(),
            ..SyncReport::default()
        };
        // Step 1: new sets and removals; the additions to existing sets wait for the
        // rules (step 3). Removals alone go over netlink, no process.
        if plan.sets_before_rules_are_removals_only() {
            if !plan.remove.is_empty() {
                self.runner.set_members(&[], &plan.remove)?;
                report.restores += 1;
            }
        } else {
            self.runner
                .run_ok("ipset", &["restore"], Some(&plan.ipset_before_rules()))?;
            report.restores += 1;
        }
        // Step 2: one atomic restore per table.
        for table in plan.tables() {
            let payload = plan.iptables(table);
            self.runner.run_ok(
                self.backend.restore_cmd(),
                &["--noflush", "-w"],
                Some(&payload),
            )?;
            report.restores += 1;
            tracing::debug!(
                table = table.as_str(),
                rewritten = plan.rewrite.get(&table).map_or(0, Vec::len),
                edited = plan.edit.get(&table).map_or(0, Vec::len),
                deleted = ?plan.delete.get(&table),
                jumps_inserted = plan.insert_jumps.get(&table).map_or(0, Vec::len),
                jumps_deleted = plan.delete_jumps.get(&table).map_or(0, Vec::len),
                "iptables-restore applied"
            );
        }
        // Step 3: members added to existing sets, now under the new rules.
        if !plan.add.is_empty() {
            self.runner.set_members(&plan.add, &[])?;
            report.restores += 1;
        }
        // Step 4: sets nothing references any more.
        for set in &plan.destroy_sets {
            self.runner.run_ok("ipset", &["destroy", set], None)?;
            report.sets_destroyed += 1;
        }
        Ok(report)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::runner::{CommandOutput, RecordedCall};
    use super::*;
    use sluice_policy::dataplane::plan::KernelState;

    use sluice_policy::dataplane::{
        BuiltinJump, Chain, IpSet, Rule, SetKind, SetMember, Table, Target,
    };

    /// A small model with a chain, a built-in jump and a set: the executors' tests
    /// (this module's and `nft`'s) sync it.
    pub(in crate::dataplane) fn desired() -> Ruleset {
        let mut rs = Ruleset::default();
        rs.add_chain(
            Table::Filter,
            Chain {
                name: "SLUICE-FORWARD".into(),
                rules: vec![Rule::new(vec![], Target::Accept)],
            },
        );
        rs.jumps = vec![BuiltinJump {
            table: Table::Filter,
            chain: "FORWARD".into(),
            rule: Rule::new(vec![], Target::Jump("SLUICE-FORWARD".into())),
        }];
        rs.sets.insert(
            "SLUICE-NODES".into(),
            IpSet {
                name: "SLUICE-NODES".into(),
                kind: SetKind::HashIp,
                members: [SetMember::Ip("10.0.0.1".parse().unwrap())].into(),
            },
        );
        rs
    }

    #[test]
    fn first_sync_writes_sets_before_chains_with_noflush() {
        let rec = RecordingRunner::default();
        let dp = Dataplane::new(rec.clone(), Backend::Nft);
        let report = dp.sync(&desired()).unwrap();
        let lines: Vec<String> = rec.calls().iter().map(RecordedCall::command_line).collect();
        assert_eq!(
            lines,
            [
                "ipset save",
                "iptables-nft-save -t filter",
                "ipset restore",
                "iptables-nft-restore --noflush -w",
            ]
        );
        assert_eq!(report.restores, 2);
        assert_eq!(report.chains_rewritten, 1);
    }

    #[test]
    fn second_sync_against_a_matching_kernel_writes_nothing() {
        // A kernel that echoes back exactly what a first sync wrote.
        let d = desired();
        let mut saved = String::from("*filter\n:FORWARD ACCEPT [0:0]\n:SLUICE-FORWARD - [0:0]\n");
        let first = plan::plan(&d, &KernelState::default()).unwrap();
        for l in first.iptables(Table::Filter).lines() {
            if let Some(rest) = l.strip_prefix("-I FORWARD 1 ") {
                saved.push_str(&format!("-A FORWARD {rest}\n"));
            } else if l.starts_with("-A ") {
                saved.push_str(&format!("{l}\n"));
            }
        }
        saved.push_str("COMMIT\n");
        let rec = RecordingRunner::new(move |c: &RecordedCall| match c.program.as_str() {
            "ipset" => CommandOutput::ok(
                "create SLUICE-NODES hash:ip family inet\nadd SLUICE-NODES 10.0.0.1\n",
            ),
            _ => CommandOutput::ok(saved.clone()),
        });
        let report = Dataplane::new(rec.clone(), Backend::Legacy)
            .sync(&d)
            .unwrap();
        assert!(!report.changed_anything(), "{report:?}");
        assert!(rec.calls().iter().all(|c| c.stdin.is_none()));
    }

    #[test]
    fn incremental_sync_trusts_the_last_write_and_full_sync_reads_the_kernel() {
        let rec = RecordingRunner::default();
        let dp = Dataplane::new(rec.clone(), Backend::Nft);
        // No trusted write yet: incremental falls back to reading.
        dp.sync_with(&desired(), SyncMode::Incremental).unwrap();
        assert!(rec.calls().iter().any(|c| c.program == "iptables-nft-save"));
        rec.clear();
        let mut more = desired();
        more.sets
            .get_mut("SLUICE-NODES")
            .unwrap()
            .members
            .insert(SetMember::Ip("10.0.0.2".parse().unwrap()));
        let r = dp.sync_with(&more, SyncMode::Incremental).unwrap();
        let lines: Vec<String> = rec.calls().iter().map(RecordedCall::command_line).collect();
        assert_eq!(lines, ["ipset restore"], "no reads, one set delta");
        assert_eq!(
            rec.calls()[0].stdin.as_deref(),
            Some("add SLUICE-NODES 10.0.0.2 -exist\n")
        );
        assert_eq!(r.chains_rewritten, 0);
        rec.clear();
        dp.sync_with(&more, SyncMode::Full).unwrap();
        assert!(
            rec.calls()
                .iter()
                .any(|c| c.program == "ipset" && c.args == ["save"])
        );
    }

    #[test]
    fn members_are_removed_before_the_rules_change_and_added_after() {
        // The kernel holds the set with 10.0.0.9; the change adds 10.0.0.1 (desired)
        // and rewrites the chain: removal, rules, addition, in that order.
        let rec = RecordingRunner::new(|c: &RecordedCall| match c.program.as_str() {
            "ipset" if c.args == ["save"] => CommandOutput::ok(
                "create SLUICE-NODES hash:ip family inet\nadd SLUICE-NODES 10.0.0.9\n",
            ),
            _ => CommandOutput::ok(""),
        });
        Dataplane::new(rec.clone(), Backend::Nft)
            .sync(&desired())
            .unwrap();
        let writes: Vec<(String, String)> = rec
            .calls()
            .iter()
            .filter_map(|c| Some((c.command_line(), c.stdin.clone()?)))
            .collect();
        assert_eq!(writes.len(), 3, "{writes:?}");
        assert_eq!(writes[0].0, "ipset restore");
        assert_eq!(writes[0].1, "del SLUICE-NODES 10.0.0.9 -exist\n");
        assert_eq!(writes[1].0, "iptables-nft-restore --noflush -w");
        assert_eq!(writes[2].0, "ipset restore");
        assert_eq!(writes[2].1, "add SLUICE-NODES 10.0.0.1 -exist\n");
    }

    #[test]
    fn failed_restore_is_an_error() {
        let rec = RecordingRunner::new(|c: &RecordedCall| {
            if c.program.ends_with("restore") && c.program.starts_with("iptables") {
                CommandOutput {
                    status: 1,
                    stdout: String::new(),
                    stderr: "iptables-restore: line 3 failed".into(),
                }
            } else {
                CommandOutput::ok("")
            }
        });
        let err = Dataplane::new(rec, Backend::Nft)
            .sync(&desired())
            .unwrap_err();
        assert!(err.to_string().contains("line 3 failed"), "{err}");
    }
}
