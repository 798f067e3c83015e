//! The policy dataplane: owned iptables chains and ipsets, applied atomically.
//!
//! One sync = read (`iptables-save` per table, `ipset save`), plan (pure, see
//! [`iptables::plan_table`] and [`ipset::plan_sets`]), then write: one `ipset
//! restore`, one `iptables-restore --noflush -w` per table that changed, and the
//! destruction of stale sets last. A sync with nothing to change writes nothing,
//! which is what lets a periodic resync repair drift without disturbing the rest.

pub mod backend;
pub mod ipset;
pub mod iptables;
pub mod runner;

use std::collections::BTreeMap;

pub use backend::{Backend, BackendChoice};
pub use ipset::{IpSet, SetKind};
pub use iptables::{Chain, DesiredTable, Jump};
pub use runner::{CommandRunner, ExecRunner, RecordingRunner};

/// Prefix of every ipset sluice owns (and of every chain, see [`iptables::CHAIN_PREFIX`]).
pub const SET_PREFIX: &str = "SLUICE-";

/// Everything the dataplane should hold after a sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredDataplane {
    /// Table name (`filter`, `nat`, `raw`, `mangle`) → owned chains and jumps.
    pub tables: BTreeMap<String, DesiredTable>,
    pub sets: Vec<IpSet>,
}

impl DesiredDataplane {
    pub fn rule_count(&self) -> usize {
        self.tables.values().map(DesiredTable::rule_count).sum()
    }

    pub fn set_member_count(&self) -> usize {
        self.sets.iter().map(|s| s.members.len()).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Run(#[from] runner::RunError),
    #[error(transparent)]
    Plan(#[from] iptables::IptablesError),
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
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

/// What the kernel holds of ours, as read back or as last written.
#[derive(Debug, Clone, Default)]
struct KernelView {
    tables: BTreeMap<String, iptables::SavedTable>,
    sets: BTreeMap<String, ipset::SavedSet>,
}

impl KernelView {
    /// The view a successful sync of `desired` leaves behind.
    fn after(desired: &DesiredDataplane) -> KernelView {
        let mut view = KernelView::default();
        for (name, t) in &desired.tables {
            let saved = view.tables.entry(name.clone()).or_default();
            for c in &t.chains {
                saved.chains.insert(c.name.clone(), c.render_rules());
            }
            for j in &t.jumps {
                saved
                    .chains
                    .entry(j.from.clone())
                    .or_default()
                    .push(format!("-A {} {}", j.from, j.spec()));
            }
        }
        for s in &desired.sets {
            view.sets.insert(
                s.name.clone(),
                ipset::SavedSet {
                    kind: Some(s.kind),
                    members: s.members.clone(),
                },
            );
        }
        view
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
    last: std::sync::Mutex<Option<KernelView>>,
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
        desired: &DesiredDataplane,
        mode: SyncMode,
    ) -> Result<SyncReport, DataplaneError> {
        let cached = match mode {
            SyncMode::Full => None,
            SyncMode::Incremental => self.last.lock().unwrap_or_else(|e| e.into_inner()).take(),
        };
        let result = self.sync_from(desired, cached);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) =
            result.as_ref().ok().map(|_| KernelView::after(desired));
        result
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// Bring the kernel to `desired` after reading it, touching only what differs.
    pub fn sync(&self, desired: &DesiredDataplane) -> Result<SyncReport, DataplaneError> {
        self.sync_with(desired, SyncMode::Full)
    }

    fn sync_from(
        &self,
        desired: &DesiredDataplane,
        mut view: Option<KernelView>,
    ) -> Result<SyncReport, DataplaneError> {
        let mut report = SyncReport::default();

        let current_sets = match view.as_mut() {
            Some(v) => std::mem::take(&mut v.sets),
            None => ipset::parse_save(
                &self.runner.run_ok("ipset", &["save"], None)?.stdout,
                SET_PREFIX,
            ),
        };
        let set_plan = ipset::plan_sets(&desired.sets, &current_sets, SET_PREFIX);
        if let Some(payload) = &set_plan.restore {
            self.runner.run_ok("ipset", &["restore"], Some(payload))?;
            report.restores += 1;
        }
        report.set_members_changed = set_plan.members_added + set_plan.members_removed;

        for (table, want) in &desired.tables {
            let current = match view.as_mut() {
                Some(v) => v.tables.remove(table).unwrap_or_default(),
                None => {
                    let saved = self
                        .runner
                        .run_ok(self.backend.save_cmd(), &["-t", table], None)?
                        .stdout;
                    iptables::parse_save(&saved)
                        .remove(table)
                        .unwrap_or_default()
                }
            };
            let plan = iptables::plan_table(table, want, &current)?;
            if let Some(payload) = &plan.payload {
                self.runner.run_ok(
                    self.backend.restore_cmd(),
                    &["--noflush", "-w"],
                    Some(payload),
                )?;
                report.restores += 1;
                tracing::debug!(
                    table,
                    rewritten = ?plan.rewritten,
                    deleted = ?plan.deleted,
                    jumps_inserted = plan.jumps_inserted,
                    jumps_deleted = plan.jumps_deleted,
                    "iptables-restore applied"
                );
            }
            report.chains_rewritten += plan.rewritten.len();
            report.chains_deleted += plan.deleted.len();
            report.jumps_changed += plan.jumps_inserted + plan.jumps_deleted;
        }

        for set in &set_plan.destroy {
            self.runner.run_ok("ipset", &["destroy", set], None)?;
            report.sets_destroyed += 1;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::runner::{CommandOutput, RecordedCall};
    use super::*;

    fn desired() -> DesiredDataplane {
        let mut tables = BTreeMap::new();
        tables.insert(
            "filter".to_string(),
            DesiredTable {
                chains: vec![Chain::new("SLUICE-FORWARD").rule("-j ACCEPT")],
                jumps: vec![Jump::top("FORWARD", "SLUICE-FORWARD")],
            },
        );
        DesiredDataplane {
            tables,
            sets: vec![IpSet::new("SLUICE-NODES", SetKind::HashIp).with(["10.0.0.1"])],
        }
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
                "ipset restore",
                "iptables-nft-save -t filter",
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
        let filter = &d.tables["filter"];
        let mut saved = String::from("*filter\n:FORWARD ACCEPT [0:0]\n:SLUICE-FORWARD - [0:0]\n");
        let first = iptables::plan_table("filter", filter, &Default::default()).unwrap();
        for l in first.payload.unwrap().lines() {
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
        more.sets[0].members.insert("10.0.0.2".into());
        let r = dp.sync_with(&more, SyncMode::Incremental).unwrap();
        let lines: Vec<String> = rec.calls().iter().map(RecordedCall::command_line).collect();
        assert_eq!(lines, ["ipset restore"], "no reads, one set delta");
        assert_eq!(
            rec.calls()[0].stdin.as_deref(),
            Some("add SLUICE-NODES 10.0.0.2\n")
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
