//! The nftables policy dataplane: the node's [`Ruleset`] as sluice's own table
//! (`ip sluice`, [`sluice_policy::render::nft`]), changed by one `nft -f -`
//! transaction per sync.
//!
//! One sync = read (`nft -j list table ip sluice`, or trust the last write), plan
//! (pure, [`sluice_policy::dataplane::nft_plan`]), then write the whole change as
//! one transaction. nftables commits a transaction entirely or not at all, so unlike
//! the iptables dataplane there is no ordering of steps to get right: a failed `nft`
//! leaves the table exactly as it was, the error goes to the agent's loop (which
//! retries with backoff), and the retry reads the kernel again. Nothing outside the
//! table is ever written: kube-proxy's, Docker's and iptables-nft's tables are left
//! alone by construction.
//!
//! When to read the table back: reading it costs as much as the table is big (a
//! second for 54,000 elements), planning against the last write costs as much as the
//! change. An incremental sync trusts the last successful write, as before. A full
//! sync trusts it too when nf_tables' ruleset generation
//! ([`sluice_netlink::nftables`]) is the one our own last transaction left: the
//! kernel bumps it on every commit by anyone, so an unchanged generation means no one
//! has written any table since, ours included. A foreign write anywhere, a failed
//! sync, a transaction that was not the only one between our two reads, or a start
//! (nothing trusted yet) makes the next full sync read the table. And whatever the
//! generation says, a full sync reads the table at least every
//! [`KERNEL_READ_EVERY`], so a mistake in our own bookkeeping cannot outlive that;
//! kube-proxy's nftables mode does the same with partial syncs and a full one at
//! least every `FullSyncPeriod` (`pkg/proxy/nftables/proxier.go`, `doFullSync`).
//!
//! How to write: a plan that only adds and deletes elements of existing sets and maps
//! (a new pod joining existing groups, a label change) goes over netlink as one NFNL
//! batch ([`sluice_netlink::nft_elements`], an [`ElementWriter`]): `nft -f` would first
//! load every element of the big interval sets into its cache, tens of milliseconds
//! for a one-element change on a realistic node. The batch is atomic like `nft -f`
//! and commits one generation, so failure handling and the generation bookkeeping
//! are the same; the writer reads the generation on its own socket right after the
//! batch ([`Sent::Committed`]), so the dataplane does not open another to read it. A plan that replaces the whole table (the first write, a declaration
//! that cannot change in place) goes over netlink too, as one batch holding the table,
//! its chains, sets, elements and rules ([`sluice_netlink::nft_table`], a
//! [`TableWriter`]): `nft -f` of a realistic node's table spends twice the kernel's
//! time parsing and expanding the text. Every other plan (a chain or declaration
//! changed in place) goes through `nft -f`; so does every plan of a dataplane made
//! without these writers.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sluice_policy::dataplane::Ruleset;
use sluice_policy::dataplane::nft_plan::{self, NftPlan, NftState};
use sluice_policy::render::nft;

use super::runner::CommandRunner;
use super::{DataplaneError, SyncMode, SyncReport};
use sluice_policy::dataplane::nft_plan::NftElementChanges;

/// The `nft` binary.
pub const NFT: &str = "nft";

/// A full sync reads the table back at least this often, even when the generation
/// says nothing changed.
pub const KERNEL_READ_EVERY: Duration = Duration::from_secs(600);

/// nf_tables' ruleset generation of the namespace the dataplane writes to (`None`
/// when it cannot be read: then nothing is trusted on a full sync).
pub trait RulesetGeneration: Send + Sync {
    fn current(&self) -> Option<u32>;
}

/// The kernel's generation, read with `NFT_MSG_GETGEN` in the calling thread's
/// namespace (the one the `nft` children of that thread write to).
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelGeneration;

impl RulesetGeneration for KernelGeneration {
    fn current(&self) -> Option<u32> {
        match sluice_netlink::nftables::ruleset_generation() {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::debug!(error = %e, "nf_tables generation unreadable; full syncs read the table");
                None
            }
        }
    }
}

/// What a writer that speaks netlink did with a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The plan holds a form this writer does not send: nothing was written, and the
    /// plan goes to `nft -f`.
    Declined,
    /// The plan was committed as one transaction. `generation`: the ruleset generation
    /// the writer read on its own socket right after its batch (`None`: it has none,
    /// and the dataplane reads it itself).
    Committed { generation: Option<u32> },
}

/// Writes an element-only plan without `nft`, in the namespace of the calling thread.
pub trait ElementWriter: Send + Sync {
    /// An error means the kernel refused the whole transaction.
    fn write(&self, changes: &[NftElementChanges]) -> Result<Sent, DataplaneError>;
}

/// Element changes as one netlink batch ([`sluice_netlink::nft_elements`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct NetlinkElements;

impl ElementWriter for NetlinkElements {
    fn write(&self, changes: &[NftElementChanges]) -> Result<Sent, DataplaneError> {
        let Some(sets) = super::nft_elements::netlink_changes(changes) else {
            return Ok(Sent::Declined);
        };
        let generation =
            sluice_netlink::nft_elements::write_elements(libc::AF_INET as u8, nft::TABLE, &sets)?;
        Ok(Sent::Committed {
            generation: Some(generation),
        })
    }
}

/// Writes a plan that replaces the whole table without `nft`, in the namespace of the
/// calling thread.
pub trait TableWriter: Send + Sync {
    /// [`Sent::Declined`] when the table holds a form this writer does not encode. An
    /// error means the kernel refused the whole transaction (the previous table is
    /// untouched).
    fn replace(&self, desired: &Ruleset) -> Result<Sent, DataplaneError>;
}

/// The whole table as one netlink batch ([`sluice_netlink::nft_table`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct NetlinkTable;

impl TableWriter for NetlinkTable {
    fn replace(&self, desired: &Ruleset) -> Result<Sent, DataplaneError> {
        let Some(table) = super::nft_table::table(desired) else {
            return Ok(Sent::Declined);
        };
        let generation =
            sluice_netlink::nft_table::replace_table(libc::AF_INET as u8, nft::TABLE, &table)?;
        Ok(Sent::Committed {
            generation: Some(generation),
        })
    }
}

/// Plans with more element changes than this go to `nft -f` (one batch of them would
/// approach netlink's message size limits; a change this big is a resync's, rarely a
/// pod's).
pub const NETLINK_MAX_ELEMENTS: usize = 4096;

/// What the last fully successful write left in the table.
struct Written {
    ruleset: Ruleset,
    /// The ruleset generation right after that write, when it is known to be the
    /// state of exactly that write (`None`: a full sync must read the table).
    generation: Option<u32>,
    /// When the table was last read back from the kernel.
    read_at: Instant,
}

/// The writer of sluice's nftables table through a [`CommandRunner`].
pub struct NftDataplane<R: CommandRunner> {
    runner: R,
    generation: Box<dyn RulesetGeneration>,
    /// `None`: every plan goes through `nft -f`.
    elements: Option<Box<dyn ElementWriter>>,
    /// `None`: a plan replacing the table goes through `nft -f`.
    tables: Option<Box<dyn TableWriter>>,
    /// `None` before the first successful write or after a failure, so the next
    /// sync reads the kernel.
    last: Mutex<Option<Written>>,
}

impl<R: CommandRunner> NftDataplane<R> {
    /// A dataplane that trusts the kernel's generation ([`KernelGeneration`]) and
    /// sends element-only plans ([`NetlinkElements`]) and whole tables
    /// ([`NetlinkTable`]) over netlink.
    /// (Only beside a runner that writes the kernel: [`CommandRunner::writes_kernel`].)
    pub fn new(runner: R) -> Self {
        let dp = Self::with_generation(runner, Box::new(KernelGeneration));
        if !dp.runner.writes_kernel() {
            return dp;
        }
        dp.with_element_writer(Box::new(NetlinkElements))
            .with_table_writer(Box::new(NetlinkTable))
    }

    /// The same, writing every plan with `nft -f` (tests comparing the two paths).
    pub fn nft_only(runner: R) -> Self {
        Self::with_generation(runner, Box::new(KernelGeneration))
    }

    /// A dataplane reading `generation`, writing every plan with `nft -f` until
    /// [`NftDataplane::with_element_writer`].
    pub fn with_generation(runner: R, generation: Box<dyn RulesetGeneration>) -> Self {
        NftDataplane {
            runner,
            generation,
            elements: None,
            tables: None,
            last: Mutex::new(None),
        }
    }

    /// Send element-only plans through `writer`.
    pub fn with_element_writer(mut self, writer: Box<dyn ElementWriter>) -> Self {
        self.elements = Some(writer);
        self
    }

    /// Send plans that replace the whole table through `writer`.
    pub fn with_table_writer(mut self, writer: Box<dyn TableWriter>) -> Self {
        self.tables = Some(writer);
        self
    }

    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// Bring the table to `desired`, touching only what differs.
    pub fn sync(&self, desired: &Ruleset) -> Result<SyncReport, DataplaneError> {
        self.sync_with(desired, SyncMode::Full)
    }

    /// Forget the last write: the next sync, of either mode, reads the table.
    pub fn distrust(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Sync in `mode`; the last-write view is kept only after a complete success.
    pub fn sync_with(
        &self,
        desired: &Ruleset,
        mode: SyncMode,
    ) -> Result<SyncReport, DataplaneError> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Before anything is read or written: what our own transaction is checked
        // against afterwards.
        let before = self.generation.current();
        let trusted = last.as_ref().filter(|w| match mode {
            SyncMode::Incremental => true,
            SyncMode::Full => {
                w.generation.is_some()
                    && w.generation == before
                    && w.read_at.elapsed() < KERNEL_READ_EVERY
            }
        });
        let result = self.sync_from(desired, trusted, before);
        let trusted_read_at = trusted.map(|w| w.read_at);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = match result {
            Ok((_, generation_ok, read_at)) => Some(Written {
                // The last write's model brought up to this one: only what changed is
                // copied (a whole clone cost a new pod more than its planning).
                ruleset: match last {
                    Some(w) => {
                        let mut ruleset = w.ruleset;
                        ruleset.assign(desired);
                        ruleset
                    }
                    None => desired.clone(),
                },
                generation: generation_ok,
                read_at: read_at.or(trusted_read_at).unwrap_or_else(Instant::now),
            }),
            Err(_) => None,
        };
        result.map(|(report, _, _)| report)
    }

    /// What sluice's table holds now; `None` when there is no table.
    pub fn read(&self) -> Result<Option<NftState>, DataplaneError> {
        match read_listing(&self.runner)? {
            None => Ok(None),
            Some(json) => Ok(Some(nft_plan::parse_listing(&json)?)),
        }
    }

    /// One sync from `trusted` (or, without it, from the kernel's table). Returns the
    /// report, the generation to trust afterwards, and when the table was read (if
    /// it was).
    #[allow(clippy::type_complexity)]
    fn sync_from(
        &self,
        desired: &Ruleset,
        trusted: Option<&Written>,
        before: Option<u32>,
    ) -> Result<(SyncReport, Option<u32>, Option<Instant>), DataplaneError> {
        // The planner validates `desired` (`nft_plan::check`) before anything is
        // written; a read of the table for an invalid model is only wasted.
        let (plan, read_at, base_known) = match trusted {
            Some(w) => (
                nft_plan::plan_from_written(desired, &w.ruleset)?,
                None,
                w.generation.is_some() && w.generation == before,
            ),
            None => {
                let read_at = Instant::now();
                let kernel = self.read()?;
                (
                    nft_plan::plan(desired, kernel.as_ref())?,
                    Some(read_at),
                    true,
                )
            }
        };
        let (report, seen) = self.write(&plan, desired)?;
        // Ours was the only commit since `before` (none when nothing was written):
        // the generation now names exactly the state we planned. A netlink writer
        // read it on its own socket right after its batch; otherwise read it here.
        let after = seen.or_else(|| self.generation.current());
        let expected = before.map(|g| g.wrapping_add(report.restores as u32));
        let generation = (base_known && before.is_some() && after == expected)
            .then_some(after)
            .flatten();
        Ok((report, generation, read_at))
    }

    /// Write `plan`; also returns the generation a netlink writer read right after its
    /// batch, if one wrote it.
    fn write(
        &self,
        plan: &NftPlan,
        desired: &Ruleset,
    ) -> Result<(SyncReport, Option<u32>), DataplaneError> {
        let mut report = SyncReport {
            chains_rewritten: plan.chains_rewritten,
            chains_deleted: plan.chains_deleted,
            jumps_changed: 0,
            set_members_changed: plan.elements_added + plan.elements_deleted,
            sets_destroyed: plan.sets_deleted,
            restores: 0,
        };
        if plan.is_empty() {
            return Ok((report, None));
        }
        let mut sent = match (&self.elements, &plan.element_changes) {
            (Some(writer), Some(changes)) if report.set_members_changed <= NETLINK_MAX_ELEMENTS => {
                writer.write(changes)?
            }
            _ => Sent::Declined,
        };
        if sent == Sent::Declined {
            sent = match &self.tables {
                Some(writer) if plan.replaces_table => writer.replace(desired)?,
                _ => Sent::Declined,
            };
        }
        let (by_netlink, generation) = match sent {
            Sent::Committed { generation } => (true, generation),
            Sent::Declined => (false, None),
        };
        if !by_netlink {
            self.runner.run_ok(NFT, &["-f", "-"], Some(&plan.script))?;
        }
        report.restores = 1;
        tracing::debug!(
            by_netlink,
            chains_rewritten = plan.chains_rewritten,
            chains_deleted = plan.chains_deleted,
            elements_added = plan.elements_added,
            elements_deleted = plan.elements_deleted,
            sets_created = plan.sets_created,
            sets_deleted = plan.sets_deleted,
            "nft transaction applied"
        );
        Ok((report, generation))
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
    use sluice_policy::dataplane::nft_plan::NftElementChanges;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

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

    /// A kernel in miniature: no table to list, every successful `nft -f` one commit,
    /// and a knob for another writer's commits.
    #[derive(Clone, Default)]
    struct FakeKernel {
        generation: Arc<AtomicU32>,
        fail: Arc<AtomicBool>,
        /// Reads of the generation through [`RulesetGeneration`].
        reads: Arc<AtomicU32>,
    }

    impl RulesetGeneration for FakeKernel {
        fn current(&self) -> Option<u32> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            Some(self.generation.load(Ordering::SeqCst))
        }
    }

    impl FakeKernel {
        fn runner(&self) -> RecordingRunner {
            let k = self.clone();
            RecordingRunner::new(move |c: &RecordedCall| {
                if c.args.first().map(String::as_str) == Some("-j") {
                    no_table()
                } else if k.fail.load(Ordering::SeqCst) {
                    CommandOutput {
                        status: 1,
                        stdout: String::new(),
                        stderr: "/dev/stdin:3:1-20: Error: Could not process rule".into(),
                    }
                } else {
                    k.generation.fetch_add(1, Ordering::SeqCst);
                    CommandOutput::ok("")
                }
            })
        }

        fn dataplane(&self) -> (NftDataplane<RecordingRunner>, RecordingRunner) {
            let rec = self.runner();
            (
                NftDataplane::with_generation(rec.clone(), Box::new(self.clone())),
                rec,
            )
        }

        /// Another program commits something, anywhere in nf_tables.
        fn foreign_write(&self) {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn with_member(ip: &str) -> Ruleset {
        let mut more = desired();
        more.sets
            .get_mut("SLUICE-NODES")
            .unwrap()
            .members
            .insert(SetMember::Ip(ip.parse().unwrap()));
        more
    }

    #[test]
    fn first_sync_reads_an_absent_table_and_writes_one_transaction() {
        let (dp, rec) = FakeKernel::default().dataplane();
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
    fn incremental_sync_trusts_the_last_write_and_plans_only_the_change() {
        let (dp, rec) = FakeKernel::default().dataplane();
        // No trusted write yet: incremental falls back to reading.
        dp.sync_with(&desired(), SyncMode::Incremental).unwrap();
        assert_eq!(lines(&rec)[0], "nft -j list table ip sluice");
        rec.clear();
        // The same state again, trusted: nothing read, nothing written.
        let r = dp.sync_with(&desired(), SyncMode::Incremental).unwrap();
        assert!(rec.calls().is_empty(), "{:?}", rec.calls());
        assert!(!r.changed_anything());
        // A new member: one transaction of the planner's delta, no reads.
        let more = with_member("10.0.0.2");
        dp.sync_with(&more, SyncMode::Incremental).unwrap();
        assert_eq!(lines(&rec), ["nft -f -"]);
        let want = nft_plan::plan_from_written(&more, &desired()).unwrap();
        assert_eq!(rec.calls()[0].stdin.as_deref(), Some(want.script.as_str()));
        assert_eq!(
            want.script, "add element ip sluice SLUICE-NODES { 10.0.0.2 }\n",
            "one element, nothing else"
        );
    }

    #[test]
    fn full_sync_trusts_the_last_write_while_the_generation_is_its_own_and_reads_after_another_commit()
     {
        let kernel = FakeKernel::default();
        let (dp, rec) = kernel.dataplane();
        dp.sync(&desired()).unwrap();
        rec.clear();
        // Our own commit was the only one: a no-op resync reads and writes nothing.
        let r = dp.sync(&desired()).unwrap();
        assert!(rec.calls().is_empty(), "{:?}", rec.calls());
        assert!(!r.changed_anything());
        // A change, still trusted: only the delta is written.
        dp.sync(&with_member("10.0.0.2")).unwrap();
        assert_eq!(lines(&rec), ["nft -f -"]);
        rec.clear();
        // Someone else commits (any table): the next full sync reads ours.
        kernel.foreign_write();
        dp.sync(&with_member("10.0.0.2")).unwrap();
        assert_eq!(lines(&rec)[0], "nft -j list table ip sluice");
        rec.clear();
        // The read made it trusted again.
        dp.sync(&with_member("10.0.0.2")).unwrap();
        assert!(rec.calls().is_empty(), "{:?}", rec.calls());
    }

    #[test]
    fn an_incremental_write_after_a_foreign_commit_leaves_the_next_full_sync_reading() {
        let kernel = FakeKernel::default();
        let (dp, rec) = kernel.dataplane();
        dp.sync(&desired()).unwrap();
        kernel.foreign_write();
        // Incremental syncs trust the last write whatever the generation says…
        dp.sync_with(&with_member("10.0.0.2"), SyncMode::Incremental)
            .unwrap();
        rec.clear();
        // …but what another writer did before it is not known: a full sync reads.
        dp.sync(&with_member("10.0.0.2")).unwrap();
        assert_eq!(lines(&rec)[0], "nft -j list table ip sluice");
    }

    #[test]
    fn a_commit_racing_our_own_leaves_the_next_full_sync_reading() {
        let kernel = FakeKernel::default();
        let k2 = kernel.clone();
        // Another writer commits while our `nft` runs: the generation moves by two.
        let rec = RecordingRunner::new(move |c: &RecordedCall| {
            if c.args.first().map(String::as_str) == Some("-j") {
                no_table()
            } else {
                k2.generation.fetch_add(2, Ordering::SeqCst);
                CommandOutput::ok("")
            }
        });
        let dp = NftDataplane::with_generation(rec.clone(), Box::new(kernel.clone()));
        dp.sync(&desired()).unwrap();
        rec.clear();
        dp.sync(&desired()).unwrap();
        assert_eq!(lines(&rec)[0], "nft -j list table ip sluice");
    }

    #[test]
    fn without_a_readable_generation_every_full_sync_reads_the_table() {
        struct Unreadable;
        impl RulesetGeneration for Unreadable {
            fn current(&self) -> Option<u32> {
                None
            }
        }
        let rec = FakeKernel::default().runner();
        let dp = NftDataplane::with_generation(rec.clone(), Box::new(Unreadable));
        dp.sync(&desired()).unwrap();
        rec.clear();
        dp.sync(&desired()).unwrap();
        assert_eq!(lines(&rec)[0], "nft -j list table ip sluice");
        // Incremental syncs still trust the last write.
        rec.clear();
        dp.sync_with(&desired(), SyncMode::Incremental).unwrap();
        assert!(rec.calls().is_empty());
    }

    #[test]
    fn distrust_makes_the_next_sync_read_the_table() {
        let (dp, rec) = FakeKernel::default().dataplane();
        dp.sync(&desired()).unwrap();
        dp.distrust();
        rec.clear();
        dp.sync_with(&desired(), SyncMode::Incremental).unwrap();
        assert_eq!(lines(&rec)[0], "nft -j list table ip sluice");
    }

    #[test]
    fn failed_transaction_is_an_error_and_the_next_sync_reads_the_kernel_again() {
        let kernel = FakeKernel::default();
        kernel.fail.store(true, Ordering::SeqCst);
        let (dp, rec) = kernel.dataplane();
        let err = dp.sync(&desired()).unwrap_err();
        assert!(err.to_string().contains("Could not process rule"), "{err}");
        rec.clear();
        kernel.fail.store(false, Ordering::SeqCst);
        // Even an incremental sync does not trust a write that failed.
        dp.sync_with(&desired(), SyncMode::Incremental).unwrap();
        assert_eq!(lines(&rec), ["nft -j list table ip sluice", "nft -f -"]);
    }

    /// An element writer on the fake kernel: one commit per write, or a refusal.
    #[derive(Clone, Default)]
    struct FakeElements {
        kernel: FakeKernel,
        refuse: Arc<AtomicBool>,
        /// Report the generation read after the batch, as the netlink writer does.
        reports: Arc<AtomicBool>,
        /// Commits another writer makes right after the next batch.
        racing: Arc<AtomicU32>,
        writes: Arc<Mutex<Vec<Vec<NftElementChanges>>>>,
    }

    impl ElementWriter for FakeElements {
        fn write(&self, changes: &[NftElementChanges]) -> Result<Sent, DataplaneError> {
            if self.refuse.load(Ordering::SeqCst) {
                return Err(sluice_netlink::NetlinkError::Kernel {
                    op: "writing nf_tables set elements".into(),
                    errno: libc::ENOENT,
                }
                .into());
            }
            self.writes.lock().unwrap().push(changes.to_vec());
            let generation = self.kernel.generation.fetch_add(1, Ordering::SeqCst) + 1;
            // Another writer's commit between ours and the writer's own read.
            let generation = generation + self.racing.swap(0, Ordering::SeqCst);
            self.kernel.generation.store(generation, Ordering::SeqCst);
            Ok(Sent::Committed {
                generation: self.reports.load(Ordering::SeqCst).then_some(generation),
            })
        }
    }

    #[test]
    fn an_element_only_change_goes_to_the_element_writer_and_keeps_the_generation_trusted() {
        let kernel = FakeKernel::default();
        let elements = FakeElements {
            kernel: kernel.clone(),
            ..Default::default()
        };
        let rec = kernel.runner();
        let dp = NftDataplane::with_generation(rec.clone(), Box::new(kernel.clone()))
            .with_element_writer(Box::new(elements.clone()));
        // The first write declares everything: nft.
        dp.sync(&desired()).unwrap();
        assert_eq!(lines(&rec), ["nft -j list table ip sluice", "nft -f -"]);
        assert!(elements.writes.lock().unwrap().is_empty());
        rec.clear();
        // One more member: the writer, not nft.
        let r = dp.sync(&with_member("10.0.0.2")).unwrap();
        assert!(rec.calls().is_empty(), "{:?}", rec.calls());
        assert_eq!((r.restores, r.set_members_changed), (1, 1));
        let writes = elements.writes.lock().unwrap().clone();
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0][0].name, "SLUICE-NODES");
        assert_eq!(writes[0][0].add, ["10.0.0.2"]);
        // That commit was ours alone: a no-op full sync still reads nothing.
        dp.sync(&with_member("10.0.0.2")).unwrap();
        assert!(rec.calls().is_empty(), "{:?}", rec.calls());
    }

    #[test]
    fn the_generation_the_element_writer_read_after_its_batch_is_not_read_again() {
        let kernel = FakeKernel::default();
        let elements = FakeElements {
            kernel: kernel.clone(),
            ..Default::default()
        };
        elements.reports.store(true, Ordering::SeqCst);
        let rec = kernel.runner();
        let dp = NftDataplane::with_generation(rec.clone(), Box::new(kernel.clone()))
            .with_element_writer(Box::new(elements.clone()));
        dp.sync(&desired()).unwrap();
        kernel.reads.store(0, Ordering::SeqCst);
        dp.sync(&with_member("10.0.0.2")).unwrap();
        assert_eq!(elements.writes.lock().unwrap().len(), 1);
        assert_eq!(
            kernel.reads.load(Ordering::SeqCst),
            1,
            "the read before planning only"
        );
        // The writer's generation was ours alone: the next full sync trusts it.
        rec.clear();
        dp.sync(&with_member("10.0.0.2")).unwrap();
        assert!(rec.calls().is_empty(), "{:?}", rec.calls());
    }

    #[test]
    fn a_commit_between_the_element_writers_batch_and_its_read_leaves_the_next_full_sync_reading() {
        let kernel = FakeKernel::default();
        let elements = FakeElements {
            kernel: kernel.clone(),
            ..Default::default()
        };
        elements.reports.store(true, Ordering::SeqCst);
        let rec = kernel.runner();
        let dp = NftDataplane::with_generation(rec.clone(), Box::new(kernel.clone()))
            .with_element_writer(Box::new(elements.clone()));
        dp.sync(&desired()).unwrap();
        elements.racing.store(1, Ordering::SeqCst);
        dp.sync(&with_member("10.0.0.2")).unwrap();
        rec.clear();
        dp.sync(&with_member("10.0.0.2")).unwrap();
        assert_eq!(lines(&rec)[0], "nft -j list table ip sluice");
    }

    #[test]
    fn a_refused_element_write_is_an_error_and_the_next_sync_reads_the_table() {
        let kernel = FakeKernel::default();
        let elements = FakeElements {
            kernel: kernel.clone(),
            ..Default::default()
        };
        let rec = kernel.runner();
        let dp = NftDataplane::with_generation(rec.clone(), Box::new(kernel.clone()))
            .with_element_writer(Box::new(elements.clone()));
        dp.sync(&desired()).unwrap();
        elements.refuse.store(true, Ordering::SeqCst);
        let err = dp
            .sync_with(&with_member("10.0.0.2"), SyncMode::Incremental)
            .unwrap_err();
        assert!(matches!(err, DataplaneError::Netlink(_)), "{err}");
        rec.clear();
        elements.refuse.store(false, Ordering::SeqCst);
        dp.sync_with(&with_member("10.0.0.2"), SyncMode::Incremental)
            .unwrap();
        assert_eq!(lines(&rec)[0], "nft -j list table ip sluice");
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
