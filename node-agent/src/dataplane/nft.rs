//! The nftables policy dataplane: the node's [`Ruleset`] as sluice's own table
//! (`ip sluice`, [`sluice_policy::render::nft`]), changed by one `nft -f -`
//! transaction per sync.
//!
//! One sync = read (`nft -j list table ip sluice`, or trust the last write), plan
//! (pure, [`sluice_policy::dataplane::nft_plan::plan`]), then write the whole change as
//! one transaction. nftables commits a transaction entirely or not at all, so unlike
//! the iptables dataplane there is no ordering of steps to get right: a failed `nft`
//! leaves the table exactly as it was, the error goes to the agent's loop (which
//! retries with backoff), and the retry reads the kernel again. Nothing outside the
//! table is ever written: kube-proxy's, Docker's and iptables-nft's tables are left
//! alone by construction.

use std::sync::Mutex;

use sluice_policy::dataplane::Ruleset;
use sluice_policy::dataplane::nft_plan::{self, NftState};
use sluice_policy::render::nft;

use super::runner::CommandRunner;
use super::{DataplaneError, SyncMode, SyncReport};

/// The `nft` binary.
pub const NFT: &str = "nft";

/// The writer of sluice's nftables table through a [`CommandRunner`].
pub struct NftDataplane<R: CommandRunner> {
    runner: R,
    /// What the table holds after the last fully successful write; `None` before the
    /// first one or after a failure, so the next sync reads the kernel.
    last: Mutex<Option<NftState>>,
}

impl<R: CommandRunner> NftDataplane<R> {
    pub fn new(runner: R) -> Self {
        NftDataplane {
            runner,
            last: Mutex::new(None),
        }
    }

    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// Bring the table to `desired` after reading it, touching only what differs.
    pub fn sync(&self, desired: &Ruleset) -> Result<SyncReport, DataplaneError> {
        self.sync_with(desired, SyncMode::Full)
    }

    /// Sync in `mode`; the last-write view is kept only after a complete success.
    pub fn sync_with(
        &self,
        desired: &Ruleset,
        mode: SyncMode,
    ) -> Result<SyncReport, DataplaneError> {
        let cached = match mode {
            SyncMode::Full => None,
            SyncMode::Incremental => self.last.lock().unwrap_or_else(|e| e.into_inner()).take(),
        };
        let result = self.sync_from(desired, cached);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) =
            result.as_ref().ok().map(|_| NftState::of(desired));
        result
    }

    /// What sluice's table holds now; `None` when there is no table.
    pub fn read(&self) -> Result<Option<NftState>, DataplaneError> {
        match read_listing(&self.runner)? {
            None => Ok(None),
            Some(json) => Ok(Some(nft_plan::parse_listing(&json)?)),
        }
    }

    fn sync_from(
        &self,
        desired: &Ruleset,
        cached: Option<NftState>,
    ) -> Result<SyncReport, DataplaneError> {
        desired.validate()?;
        let kernel = match cached {
            Some(state) => Some(state),
            None => self.read()?,
        };
        let plan = nft_plan::plan(desired, kernel.as_ref())?;
        let mut report = SyncReport {
            chains_rewritten: plan.chains_rewritten,
            chains_deleted: plan.chains_deleted,
            jumps_changed: 0,
            set_members_changed: plan.elements_added + plan.elements_deleted,
            sets_destroyed: plan.sets_deleted,
            restores: 0,
        };
        if plan.is_empty() {
            return Ok(report);
        }
        self.runner.run_ok(NFT, &["-f", "-"], Some(&plan.script))?;
        report.restores = 1;
        tracing::debug!(
            chains_rewritten = plan.chains_rewritten,
            chains_deleted = plan.chains_deleted,
            elements_added = plan.elements_added,
            elements_deleted = plan.elements_deleted,
            sets_created = plan.sets_created,
            sets_deleted = plan.sets_deleted,
            "nft transaction applied"
        );
        Ok(report)
    }
}

/// `nft -j list table ip sluice`: `None` when the table does not exist.
pub fn read_listing(runner: &dyn CommandRunner) -> Result<Option<String>, DataplaneError> {
    let table = format!("{} {}", nft::FAMILY, nft::TABLE);
    let args = ["-j", "list", "table", nft::FAMILY, nft::TABLE];
    let out = runner.run(NFT, &args, None)?;
    if out.success() {
        return Ok(Some(out.stdout));
    }
    // nft says ENOENT in words; anything else (no permission, no nf_tables) is an error.
    if out.stderr.contains("No such file or directory") {
        return Ok(None);
    }
    Err(super::runner::RunError::Failed {
        program: NFT.into(),
        args: format!("-j list table {table}"),
        status: out.status,
        stderr: out.stderr.trim().to_string(),
    }
    .into())
}

/// Remove sluice's table (a node switched to the iptables dataplane). Reads first, so
/// a node without the table sees no write at all; a host without `nft`, or whose
/// kernel has no nf_tables, has no table. Returns whether a table was removed.
pub fn remove_table(runner: &dyn CommandRunner) -> Result<bool, DataplaneError> {
    let listing = match read_listing(runner) {
        Ok(l) => l,
        Err(DataplaneError::Run(super::runner::RunError::Spawn { .. })) => return Ok(false),
        Err(DataplaneError::Run(super::runner::RunError::Failed { stderr, .. }))
            if stderr.contains("not supported") =>
        {
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    if listing.is_none() {
        return Ok(false);
    }
    runner.run_ok(NFT, &["-f", "-"], Some(&nft::delete_script()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::super::runner::{CommandOutput, RecordedCall, RecordingRunner};
    use super::super::tests::desired;
    use super::*;
    use sluice_policy::dataplane::SetMember;

    fn no_table() -> CommandOutput {
        CommandOutput {
            status: 1,
            stdout: String::new(),
            stderr: "Error: No such file or directory\nlist table ip sluice\n".into(),
        }
    }

    fn lines(rec: &RecordingRunner) -> Vec<String> {
        rec.calls().iter().map(RecordedCall::command_line).collect()
    }

    #[test]
    fn first_sync_reads_an_absent_table_and_writes_one_transaction() {
        let rec = RecordingRunner::new(|c: &RecordedCall| {
            if c.args.first().map(String::as_str) == Some("-j") {
                no_table()
            } else {
                CommandOutput::ok("")
            }
        });
        let dp = NftDataplane::new(rec.clone());
        let report = dp.sync(&desired()).unwrap();
        assert_eq!(
            lines(&rec),
            ["nft -j list table ip sluice", "nft -f -"],
            "one read, one transaction"
        );
        let script = rec.calls()[1].stdin.clone().unwrap();
        assert_eq!(
            script,
            nft_plan::plan(&desired(), None).unwrap().script,
            "the planner's script, as is"
        );
        assert_eq!(report.restores, 1);
        assert!(report.changed_anything());
    }

    #[test]
    fn incremental_sync_trusts_the_last_write_and_full_sync_reads_the_kernel() {
        let rec = RecordingRunner::new(|c: &RecordedCall| {
            if c.args.first().map(String::as_str) == Some("-j") {
                no_table()
            } else {
                CommandOutput::ok("")
            }
        });
        let dp = NftDataplane::new(rec.clone());
        // No trusted write yet: incremental falls back to reading.
        dp.sync_with(&desired(), SyncMode::Incremental).unwrap();
        assert_eq!(lines(&rec)[0], "nft -j list table ip sluice");
        rec.clear();
        // The same state again, trusted: nothing read, nothing written.
        let r = dp.sync_with(&desired(), SyncMode::Incremental).unwrap();
        assert!(rec.calls().is_empty(), "{:?}", rec.calls());
        assert!(!r.changed_anything());
        // A new member: one transaction of the planner's delta, no reads.
        let mut more = desired();
        more.sets
            .get_mut("SLUICE-NODES")
            .unwrap()
            .members
            .insert(SetMember::Ip("10.0.0.2".parse().unwrap()));
        dp.sync_with(&more, SyncMode::Incremental).unwrap();
        assert_eq!(lines(&rec), ["nft -f -"]);
        let want = nft_plan::plan(&more, Some(&NftState::of(&desired()))).unwrap();
        assert_eq!(rec.calls()[0].stdin.as_deref(), Some(want.script.as_str()));
        rec.clear();
        dp.sync_with(&more, SyncMode::Full).unwrap();
        assert_eq!(lines(&rec)[0], "nft -j list table ip sluice");
    }

    #[test]
    fn failed_transaction_is_an_error_and_the_next_sync_reads_the_kernel_again() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let fail = Arc::new(AtomicBool::new(true));
        let f2 = fail.clone();
        let rec = RecordingRunner::new(move |c: &RecordedCall| {
            if c.args.first().map(String::as_str) == Some("-j") {
                no_table()
            } else if f2.load(Ordering::SeqCst) {
                CommandOutput {
                    status: 1,
                    stdout: String::new(),
                    stderr: "/dev/stdin:3:1-20: Error: Could not process rule".into(),
                }
            } else {
                CommandOutput::ok("")
            }
        });
        let dp = NftDataplane::new(rec.clone());
        let err = dp.sync(&desired()).unwrap_err();
        assert!(err.to_string().contains("Could not process rule"), "{err}");
        rec.clear();
        fail.store(false, Ordering::SeqCst);
        // Even an incremental sync does not trust a write that failed.
        dp.sync_with(&desired(), SyncMode::Incremental).unwrap();
        assert_eq!(lines(&rec), ["nft -j list table ip sluice", "nft -f -"]);
    }

    #[test]
    fn an_unreadable_table_is_an_error_not_an_absent_one() {
        let rec = RecordingRunner::new(|_| CommandOutput {
            status: 1,
            stdout: String::new(),
            stderr: "Error: Operation not permitted".into(),
        });
        let err = NftDataplane::new(rec.clone()).sync(&desired()).unwrap_err();
        assert!(err.to_string().contains("not permitted"), "{err}");
        assert_eq!(lines(&rec), ["nft -j list table ip sluice"], "no write");
    }

    #[test]
    fn removing_the_table_writes_nothing_when_there_is_none() {
        let rec = RecordingRunner::new(|_| no_table());
        assert!(!remove_table(&rec).unwrap());
        assert_eq!(lines(&rec), ["nft -j list table ip sluice"]);
        let rec = RecordingRunner::new(|_| CommandOutput::ok("{\"nftables\": []}"));
        assert!(remove_table(&rec).unwrap());
        assert_eq!(
            rec.calls()[1].stdin.as_deref(),
            Some(nft::delete_script().as_str())
        );
    }
}
