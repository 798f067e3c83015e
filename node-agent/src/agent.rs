//! The agent's run loop: datastore → reconcile → apply, with health, metrics, the
//! status file and retry with backoff.
//!
//! Order on start (a restart must neither open nor close traffic): serve /healthz
//! (not ready), start the datastore, and touch nothing in the kernel until the first
//! complete snapshot has arrived; the first apply then diffs against whatever a
//! previous run left, rewriting only what differs. Nothing is ever flushed on exit or
//! while the datastore is unreachable.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_policy::NamespacedName;

use crate::dataplane::{Dataplane, DataplaneError, ExecRunner, SyncMode, SyncReport};
use crate::datastore::{Datastore, Snapshot, SnapshotReceiver};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::node_network::NodeNetwork;
use crate::reconcile::{self, NodeSettings};
use crate::status::{self, AgentStatus};

/// Consecutive failed applies before the node reports not ready.
pub const NOT_READY_AFTER_FAILURES: u32 = 3;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("binding the health endpoint {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: crate::status::StatusError,
    },
}

/// The iptables/ipset side, behind a trait so the loop can run with a recording runner.
pub trait PolicyDataplane: Send + Sync + 'static {
    fn sync(
        &self,
        desired: &sluice_policy::dataplane::Ruleset,
        mode: SyncMode,
    ) -> Result<SyncReport, DataplaneError>;
}

impl<R: crate::dataplane::CommandRunner + 'static> PolicyDataplane for Dataplane<R> {
    fn sync(
        &self,
        desired: &sluice_policy::dataplane::Ruleset,
        mode: SyncMode,
    ) -> Result<SyncReport, DataplaneError> {
        self.sync_with(desired, mode)
    }
}

impl<R: crate::dataplane::CommandRunner + 'static> PolicyDataplane
    for crate::dataplane::SelectedDataplane<R>
{
    fn sync(
        &self,
        desired: &sluice_policy::dataplane::Ruleset,
        mode: SyncMode,
    ) -> Result<SyncReport, DataplaneError> {
        self.sync_with(desired, mode)
    }
}

/// Everything the loop needs besides the snapshot stream.
pub struct Loop<P, N> {
    pub settings: NodeSettings,
    pub dataplane: Arc<P>,
    pub network: N,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub resync: Duration,
    pub coalesce: Duration,
    /// Named after each apply: who has which address, which policies each log id
    /// stands for (None: denied connections are not recorded).
    pub flows: Option<Arc<crate::flows::FlowStore>>,
}

/// Tracks local pods from first sight with an address to policy applied.
#[derive(Default)]
pub struct EnforcementTracker {
    pending: BTreeMap<NamespacedName, Instant>,
    enforced: BTreeSet<NamespacedName>,
    /// A snapshot was observed before: the pods of the first one were there before
    /// this agent started, so none of them is new.
    started: bool,
}

/// What [`EnforcementTracker::observe`] found in one snapshot.
#[derive(Debug, PartialEq, Eq)]
pub struct Observed {
    /// Local pods whose policy is not applied yet.
    pub waiting: usize,
    /// Pods new since the last snapshot that the CNI plugin never reported: their
    /// address came from the datastore, and they waited for it fail-closed.
    pub unreported: Vec<NamespacedName>,
}

impl EnforcementTracker {
    /// Note the local pods of a new snapshot and the ones the CNI plugin reported
    /// (node-local API). A pod's wait starts at its report, else at its first sight.
    pub fn observe(
        &mut self,
        local: &BTreeSet<NamespacedName>,
        reported: &BTreeMap<NamespacedName, Instant>,
        now: Instant,
    ) -> Observed {
        self.enforced.retain(|p| local.contains(p));
        self.pending.retain(|p, _| local.contains(p));
        let mut unreported = Vec::new();
        for p in local {
            if self.enforced.contains(p) {
                continue;
            }
            let report = reported.get(p).copied();
            match self.pending.entry(p.clone()) {
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(report.map_or(now, |at| at.min(now)));
                    if report.is_none() && self.started {
                        unreported.push(p.clone());
                    }
                }
                std::collections::btree_map::Entry::Occupied(mut e) => {
                    if let Some(at) = report {
                        let t = e.get_mut();
                        *t = (*t).min(at);
                    }
                }
            }
        }
        self.started = true;
        Observed {
            waiting: self.pending.len(),
            unreported,
        }
    }

    /// An apply covering `local` succeeded: every pending pod is now enforced.
    /// Returns each one's wait.
    pub fn applied(
        &mut self,
        local: &BTreeSet<NamespacedName>,
        now: Instant,
    ) -> Vec<(NamespacedName, Duration)> {
        let done: Vec<NamespacedName> = self
            .pending
            .keys()
            .filter(|p| local.contains(*p))
            .cloned()
            .collect();
        done.into_iter()
            .filter_map(|p| {
                let t = self.pending.remove(&p)?;
                self.enforced.insert(p.clone());
                Some((p, now.saturating_duration_since(t)))
            })
            .collect()
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

impl<P: PolicyDataplane, N: NodeNetwork> Loop<P, N> {
    /// One reconcile of `snap`: compute and apply. Errors are returned as text for
    /// health; metrics are updated here.
    ///
    /// `since` is when the previous sync started: a pod reported after it is new in
    /// this one, and the sync logs where that pod's time went.
    async fn apply_once(
        &self,
        snap: &Arc<Snapshot>,
        tracker: &mut EnforcementTracker,
        compiler: &mut reconcile::Compiler,
        mode: SyncMode,
        since: Option<Instant>,
        namer: Option<&Namer>,
    ) -> Result<(), String> {
        let started = Instant::now();
        let first_report = snap
            .reported
            .values()
            .filter(|at| since.is_none_or(|s| **at > s))
            .min()
            .copied();
        let (mut desired, kind) = off_the_workers(|| compiler.desired(snap, &self.settings))
            .map_err(|e| e.to_string())?;
        let compiled = Instant::now();
        self.metrics
            .compile_duration
            .get_or_create(&vec![("compile", kind.as_str())])
            .observe(compiled.duration_since(started).as_secs_f64());
        for w in &desired.warnings {
            tracing::warn!("{w}");
        }
        let observed = tracker.observe(&desired.local_pods, &snap.reported, started);
        for pod in &observed.unreported {
            // The plugin gave up on its report (REPORT_TIMEOUT) or could not reach
            // this agent: the pod waited for the datastore, on a cluster until
            // kubelet wrote its status.
            self.metrics.pods_without_report.inc();
            tracing::debug!(%pod, "new local pod first seen in the datastore, without a report from the CNI plugin");
        }
        self.metrics
            .pods_waiting_for_policy
            .set(observed.waiting as i64);
        self.metrics
            .rejected_policies
            .set(snap.cluster.rejected_policies.len() as i64);
        self.metrics.syncs.inc();

        let dp = self.dataplane.clone();
        // Moved to the blocking task and back: a copy of 50,000 set members would
        // cost more than the incremental compile that made them.
        let want = std::mem::take(&mut desired.dataplane);
        let (report, want) = tokio::task::spawn_blocking(move || (dp.sync(&want, mode), want))
            .await
            .map_err(|e| format!("dataplane task: {e}"))?;
        desired.dataplane = want;
        let applied = Instant::now();
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                self.metrics.restore_failures.inc();
                return Err(e.to_string());
            }
        };
        if let Some(namer) = namer {
            namer.send_replace(Some((
                snap.clone(),
                desired.dataplane.deny_policies.clone(),
            )));
        }
        self.metrics
            .rules_programmed
            .set(programmed_rules(&desired.dataplane) as i64);
        self.metrics
            .set_members_programmed
            .set(desired.dataplane.set_member_count() as i64);
        let now = Instant::now();
        for (pod, wait) in tracker.applied(&desired.local_pods, now) {
            self.metrics.add_to_enforced.observe(wait.as_secs_f64());
            tracing::debug!(%pod, wait_ms = wait.as_millis() as u64, "pod policy enforced");
        }
        self.metrics
            .pods_waiting_for_policy
            .set(tracker.pending() as i64);
        let named = Instant::now();

        // Routes after policy: a route to a new block is harmless before its policy,
        // but policy for a new pod must not wait for a slow netlink round.
        let routes = self
            .network
            .apply(&desired)
            .await
            .map_err(|e| e.to_string())?;
        self.metrics.routes_programmed.set(routes as i64);
        self.metrics
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        if let Some(at) = first_report {
            // Where a reported pod's time went (tests/e2e/measure-add-to-connect.sh
            // reads these): queued is the report's wait for the loop (the overlay, a
            // sync in flight, a coalescing pause); total ends when its policy is in
            // the kernel; flows and routes are what this sync did after that.
            let ms = |from: Instant, to: Instant| {
                (to.saturating_duration_since(from).as_secs_f64() * 1e4).round() / 10.0
            };
            let done = Instant::now();
            tracing::info!(
                queued_ms = ms(at, started),
                compile_ms = ms(started, compiled),
                dataplane_ms = ms(compiled, applied),
                flows_ms = ms(applied, named),
                routes_ms = ms(named, done),
                total_ms = ms(at, applied),
                ?mode,
                compile = kind.as_str(),
                "reported pod synced"
            );
        }
        if report.changed_anything() {
            tracing::info!(
                chains_rewritten = report.chains_rewritten,
                chains_deleted = report.chains_deleted,
                jumps_changed = report.jumps_changed,
                set_members_changed = report.set_members_changed,
                rules = programmed_rules(&desired.dataplane),
                ms = started.elapsed().as_millis() as u64,
                "dataplane synced"
            );
        }
        Ok(())
    }

    /// Run until the snapshot channel closes.
    pub async fn run(self, mut rx: SnapshotReceiver) {
        // Nothing is written before the first full sync.
        loop {
            self.health.heartbeat();
            if rx.borrow_and_update().is_some() {
                break;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
        tracing::info!("first full datastore sync received; applying");
        let mut tracker = EnforcementTracker::default();
        let mut compiler = reconcile::Compiler::default();
        let mut backoff = BACKOFF_MIN;
        // The first apply, every periodic resync and every retry read the kernel;
        // syncs caused by datastore changes in between trust the last write.
        let mut mode = SyncMode::Full;
        let mut next_full = Instant::now();
        let mut previous: Option<Instant> = None;
        let namer = self.flows.clone().map(spawn_namer);
        loop {
            self.health.heartbeat();
            let snap = rx.borrow_and_update().clone().expect("set before the loop");
            let applying = Instant::now();
            let since = previous.replace(applying);
            if Instant::now() >= next_full {
                mode = SyncMode::Full;
            }
            // Every full (kernel-reading) sync also compiles from nothing: the
            // incremental compile's safety net, once per resync period.
            if mode == SyncMode::Full {
                compiler.reset();
            }
            let wait = match self
                .apply_once(
                    &snap,
                    &mut tracker,
                    &mut compiler,
                    mode,
                    since,
                    namer.as_ref(),
                )
                .await
            {
                Ok(()) => {
                    self.health.applied();
                    backoff = BACKOFF_MIN;
                    if mode == SyncMode::Full {
                        next_full = Instant::now() + self.resync;
                    }
                    next_full.saturating_duration_since(Instant::now())
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "apply failed; keeping what is programmed");
                    self.health.failed(e, NOT_READY_AFTER_FAILURES);
                    let w = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    w
                }
            };
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // Let a burst settle into one apply, but not past a pod the
                    // plugin reports meanwhile: it waits fail-closed. (On a cluster
                    // the pod's scheduling is the change that starts the pause, and
                    // its ADD's report comes during it.)
                    if !self.coalesce_unless_reported(&mut rx, applying).await {
                        return;
                    }
                    mode = SyncMode::Incremental;
                }
                _ = tokio::time::sleep(wait) => mode = SyncMode::Full,
            }
        }
    }
}

/// What names denied-connection records after an apply: the snapshot its rules came
/// from and the policies behind each log id.
type Naming = (Arc<Snapshot>, BTreeMap<String, Vec<String>>);
type Namer = tokio::sync::watch::Sender<Option<Naming>>;

/// Hands each apply's naming to the flow store off the loop: the address → pod map
/// of a 10,000-pod cluster took 13 ms a sync (load 25), which a pod reported during
/// the sync waited for. The latest apply's wins; one overtaken is never set. The task
/// ends with the loop (the sender dropped).
/// CPU-bound work on the async side (the loop's compile: tens of milliseconds at
/// 10,000 pods, hundreds on a stress node; the report overlay's copy of the
/// snapshot) run with the worker handed back to the runtime, so the
/// node-local API keeps answering meanwhile: the plugin gives a report 5 ms, and a
/// report not answered in time is lost (the pod then waits for the datastore). On a
/// current-thread runtime (tests) it runs in place.
pub(crate) fn off_the_workers<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn spawn_namer(flows: Arc<crate::flows::FlowStore>) -> Namer {
    let (tx, mut rx) = tokio::sync::watch::channel::<Option<Naming>>(None);
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let Some((snap, deny)) = rx.borrow_and_update().clone() else {
                continue;
            };
            let flows = flows.clone();
            let _ = tokio::task::spawn_blocking(move || {
                flows.set_context(crate::flows::endpoints(&snap.cluster), deny);
                flows.set_snapshot(snap);
            })
            .await;
        }
    });
    tx
}

impl<P, N> Loop<P, N> {
    /// The coalescing pause after a change: until `self.coalesce` has passed or a
    /// snapshot carries a pod reported after `applying` (the last sync's start).
    /// False when the channel closed.
    async fn coalesce_unless_reported(&self, rx: &mut SnapshotReceiver, applying: Instant) -> bool {
        let end = tokio::time::Instant::now() + self.coalesce;
        loop {
            let reported = rx
                .borrow()
                .as_ref()
                .is_some_and(|s| s.reported_after(applying));
            if reported {
                return true;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return false },
                _ = tokio::time::sleep_until(end) => return true,
            }
        }
    }
}

/// Keep the status file fresh: on every change of readiness and every [`status::REFRESH`].
pub async fn status_writer(path: PathBuf, node: String, health: Arc<Health>) {
    let mut last: Option<(bool, String, bool, Option<String>)> = None;
    let mut written = Instant::now() - status::REFRESH;
    loop {
        let v = health.view();
        // The datastore reason carries its age in seconds: its presence is the change
        // (the text is refreshed with the file), so an outage is not a rewrite a tick.
        let now = (
            v.ready,
            v.reason.clone(),
            v.datastore.is_some(),
            v.dataplane.clone(),
        );
        if last.as_ref() != Some(&now) || written.elapsed() >= status::REFRESH {
            let s = AgentStatus {
                ready: v.ready,
                reason: v.reason,
                node: node.clone(),
                updated_unix: status::unix_now(),
                datastore: v.datastore,
                dataplane: v.dataplane,
            };
            match status::write_status(&path, &s) {
                Ok(()) => {
                    last = Some(now);
                    written = Instant::now();
                }
                Err(e) => tracing::warn!(error = %e, "cannot write agent status file"),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Run a datastore forever: if it fails fatally (bad config aside, e.g. a watch that
/// cannot start), start it again after a pause. The last snapshot stays published.
pub async fn supervise<D, F>(make: F, tx: crate::datastore::SnapshotSender)
where
    D: Datastore,
    F: Fn() -> D + Send + 'static,
{
    let mut pause = Duration::from_secs(1);
    loop {
        match make().run(tx.clone()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(error = %e, retry_in_s = pause.as_secs(), "datastore stopped; keeping last state");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Rules the agent keeps in the kernel: its chains' and its jumps.
fn programmed_rules(rs: &sluice_policy::dataplane::Ruleset) -> usize {
    rs.rule_count() + rs.jumps.len()
}

/// The real dataplane for this host: `dataplane` resolved (`auto` probes nftables),
/// and the iptables backend it writes with or cleans up.
pub fn exec_dataplane(
    choice: crate::dataplane::BackendChoice,
    dataplane: crate::dataplane::DataplaneChoice,
) -> Result<crate::dataplane::SelectedDataplane<ExecRunner>, crate::dataplane::runner::RunError> {
    let selection = crate::dataplane::select::select(&ExecRunner, dataplane);
    tracing::info!(
        dataplane = selection.kind.as_str(),
        reason = %selection.reason,
        "policy dataplane"
    );
    let backend = crate::dataplane::backend::detect_backend(&ExecRunner, choice)?;
    tracing::info!(backend = backend.name(), "iptables backend");
    Ok(crate::dataplane::SelectedDataplane::new(
        ExecRunner, backend, selection,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> NamespacedName {
        NamespacedName::new("default", n)
    }

    #[test]
    fn tracker_measures_from_first_sight_to_apply() {
        let mut t = EnforcementTracker::default();
        let none = BTreeMap::new();
        let t0 = Instant::now();
        let local: BTreeSet<_> = [key("a")].into();
        let first = t.observe(&local, &none, t0);
        // The first snapshot's pods were there before the agent: none is counted as
        // unreported.
        assert_eq!(
            first,
            Observed {
                waiting: 1,
                unreported: vec![]
            }
        );
        // Seen again before an apply: the clock does not restart.
        assert_eq!(
            t.observe(&local, &none, t0 + Duration::from_millis(50))
                .waiting,
            1
        );
        let done = t.applied(&local, t0 + Duration::from_millis(80));
        assert_eq!(done, vec![(key("a"), Duration::from_millis(80))]);
        assert_eq!(t.pending(), 0);
        // Already enforced pods are not pending again.
        assert_eq!(
            t.observe(&local, &none, t0 + Duration::from_secs(1))
                .waiting,
            0
        );
        // A pod the plugin reported is measured from its report, and is not
        // unreported.
        let b: BTreeSet<_> = [key("a"), key("b")].into();
        let t1 = t0 + Duration::from_secs(2);
        let seen = t.observe(&b, &[(key("b"), t1)].into(), t1 + Duration::from_millis(50));
        assert_eq!(
            seen,
            Observed {
                waiting: 1,
                unreported: vec![]
            }
        );
        let done = t.applied(&b, t1 + Duration::from_millis(60));
        assert_eq!(done, vec![(key("b"), Duration::from_millis(60))]);
        // A pod first seen without a report is counted once, and measured from its
        // first sight; a report that comes later still moves its start back.
        let c: BTreeSet<_> = [key("a"), key("b"), key("c")].into();
        let t2 = t0 + Duration::from_secs(3);
        let seen = t.observe(&c, &none, t2);
        assert_eq!(
            seen,
            Observed {
                waiting: 1,
                unreported: vec![key("c")]
            }
        );
        let late = [(key("c"), t2 - Duration::from_millis(5))].into();
        let seen = t.observe(&c, &late, t2 + Duration::from_millis(10));
        assert_eq!(
            seen,
            Observed {
                waiting: 1,
                unreported: vec![]
            }
        );
        let done = t.applied(&c, t2 + Duration::from_millis(20));
        assert_eq!(done, vec![(key("c"), Duration::from_millis(25))]);
        // A pod that left and came back (new incarnation) is measured again.
        t.observe(&BTreeSet::new(), &none, t0);
        assert_eq!(t.observe(&local, &none, t0).waiting, 1);
    }
}

#[cfg(test)]
mod loop_tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::dataplane::runner::{CommandOutput, RecordedCall, RecordingRunner};
    use crate::dataplane::{Backend, Dataplane};
    use crate::datastore::objects::{convert, parse_manifest_text};
    use crate::node_network::Network;
    use crate::reconcile::TunnelFilter;

    fn snapshot() -> Snapshot {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: prod}\n\
                    spec: {nodeName: node-1, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.244.1.10}\n";
        let conv = convert(&parse_manifest_text("t", text).unwrap());
        Snapshot {
            cluster: conv.cluster,
            blocks: [("10.244.1.0/24".parse().unwrap(), "node-1".to_string())].into(),
            ..Default::default()
        }
    }

    struct Fixture {
        runner: RecordingRunner,
        fail: Arc<AtomicBool>,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        tx: crate::datastore::SnapshotSender,
    }

    fn start() -> Fixture {
        start_with(Duration::from_millis(1), Duration::from_millis(50))
    }

    fn start_with(coalesce: Duration, resync: Duration) -> Fixture {
        let fail = Arc::new(AtomicBool::new(false));
        let f2 = fail.clone();
        let runner = RecordingRunner::new(move |c: &RecordedCall| {
            if c.program.ends_with("-restore") && f2.load(Ordering::SeqCst) {
                CommandOutput {
                    status: 2,
                    stdout: String::new(),
                    stderr: "line 2 failed".into(),
                }
            } else {
                CommandOutput::ok("")
            }
        });
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let metrics = Arc::new(Metrics::new());
        let (tx, rx) = tokio::sync::watch::channel(None);
        let lp = Loop {
            settings: NodeSettings {
                node: "node-1".into(),
                pool: "10.244.0.0/16".parse().unwrap(),
                tunnel: TunnelFilter::Ipip,
                nat_outgoing: true,
                node_ip: None,
                dataplane: sluice_policy::dataplane::DataplaneKind::Iptables,
            },
            dataplane: Arc::new(Dataplane::new(runner.clone(), Backend::Nft)),
            network: Network::Off,
            health: health.clone(),
            metrics: metrics.clone(),
            resync,
            coalesce,
            flows: None,
        };
        tokio::spawn(lp.run(rx));
        Fixture {
            runner,
            fail,
            health,
            metrics,
            tx,
        }
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_written_before_the_first_full_sync() {
        let f = start();
        settle().await;
        assert!(f.runner.calls().is_empty(), "{:?}", f.runner.calls());
        assert!(!f.health.view().ready);
        f.tx.send(Some(Arc::new(snapshot()))).unwrap();
        settle().await;
        assert!(f.health.view().ready);
        let restores: Vec<String> = f
            .runner
            .calls()
            .iter()
            .filter(|c| c.stdin.is_some())
            .map(RecordedCall::command_line)
            .collect();
        assert!(
            restores.contains(&"iptables-nft-restore --noflush -w".to_string()),
            "{restores:?}"
        );
        assert!(
            f.metrics
                .encode()
                .contains("sluice_agent_add_to_enforced_seconds_count 1")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_pod_the_plugin_never_reported_is_counted_once() {
        let f = start();
        let without = |n: usize| {
            f.metrics
                .encode()
                .contains(&format!("sluice_agent_pods_without_report_total {n}"))
        };
        // The first snapshot's pod was there before the agent: not counted.
        f.tx.send(Some(Arc::new(snapshot()))).unwrap();
        settle().await;
        assert!(without(0), "{}", f.metrics.encode());
        let with = |pods: &[(&str, &str)], reported: &[&str]| {
            let mut s = snapshot();
            for (name, ip) in pods {
                let text = format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: prod}}\n\
                     spec: {{nodeName: node-1, containers: [{{name: c, image: x}}]}}\n\
                     status: {{podIP: {ip}}}\n"
                );
                let conv = convert(&parse_manifest_text("t", &text).unwrap());
                s.cluster.pods.extend(conv.cluster.pods);
            }
            for name in reported {
                s.reported
                    .insert(NamespacedName::new("prod", *name), Instant::now());
            }
            s
        };
        // A pod with an address and no report: it came from the datastore.
        let quiet = [("quiet", "10.244.1.11")];
        f.tx.send(Some(Arc::new(with(&quiet, &[])))).unwrap();
        settle().await;
        assert!(without(1), "{}", f.metrics.encode());
        // A reported pod is not counted, and the first one is not counted again.
        let both = [("quiet", "10.244.1.11"), ("told", "10.244.1.12")];
        f.tx.send(Some(Arc::new(with(&both, &["told"])))).unwrap();
        settle().await;
        assert!(without(1), "{}", f.metrics.encode());
        assert!(
            f.metrics
                .encode()
                .contains("sluice_agent_add_to_enforced_seconds_count 3")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pod_reported_during_the_coalescing_pause_ends_it() {
        // Pause and resync longer than any test: only the report can start a sync.
        let hour = Duration::from_secs(3600);
        let f = start_with(hour, hour);
        f.tx.send(Some(Arc::new(snapshot()))).unwrap();
        settle().await;
        let enforced = |n: usize| {
            f.metrics
                .encode()
                .contains(&format!("sluice_agent_add_to_enforced_seconds_count {n}"))
        };
        assert!(enforced(1));
        // The new pod is scheduled (no address yet): a change, so the loop pauses…
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: new, namespace: prod}\n\
                   spec: {nodeName: node-1, containers: [{name: c, image: x}]}\n";
        let with = |status: &str| {
            let text = format!("{pod}{status}");
            let mut s = snapshot();
            let conv = convert(&parse_manifest_text("t", &text).unwrap());
            s.cluster.pods.extend(conv.cluster.pods);
            s
        };
        f.tx.send(Some(Arc::new(with("")))).unwrap();
        settle().await;
        // …and its ADD reports it: the sync starts now, not after the pause.
        let mut reported = with("status: {podIP: 10.244.1.11}\n");
        reported
            .reported
            .insert(NamespacedName::new("prod", "new"), Instant::now());
        f.tx.send(Some(Arc::new(reported))).unwrap();
        for _ in 0..100 {
            if enforced(2) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the reported pod waited for the coalescing pause");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_restores_back_off_and_surface_in_health_and_metrics() {
        let f = start();
        f.fail.store(true, Ordering::SeqCst);
        f.tx.send(Some(Arc::new(snapshot()))).unwrap();
        // Backoff 0.5 s, 1 s, …: after ~2 s three attempts have failed.
        tokio::time::sleep(Duration::from_millis(1800)).await;
        let v = f.health.view();
        assert!(!v.ready, "{v:?}");
        assert!(v.last_error.unwrap().contains("line 2 failed"));
        let attempts = f
            .runner
            .calls()
            .iter()
            .filter(|c| c.program == "iptables-nft-restore")
            .count();
        assert!(
            (3..=4).contains(&attempts),
            "backoff, not a hot loop: {attempts}"
        );
        let m = f.metrics.encode();
        assert!(
            m.contains(&format!("sluice_agent_restore_failures_total {attempts}")),
            "{m}"
        );
        assert!(m.contains("sluice_agent_pods_waiting_for_policy 1"), "{m}");
        // The kernel recovers: the next retry applies and the node is ready again.
        f.fail.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(f.health.view().ready);
        assert!(
            f.metrics
                .encode()
                .contains("sluice_agent_pods_waiting_for_policy 0")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn datastore_outage_keeps_resyncing_the_last_state_and_never_flushes() {
        let f = start();
        f.tx.send(Some(Arc::new(snapshot()))).unwrap();
        settle().await;
        let first: Vec<RecordedCall> = f
            .runner
            .calls()
            .into_iter()
            .filter(|c| c.stdin.is_some())
            .collect();
        f.runner.clear();
        // No new snapshots (the API server is gone); resyncs go on with the last one,
        // and every write is the same desired state again, never a flush or -X.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let later: Vec<RecordedCall> = f
            .runner
            .calls()
            .into_iter()
            .filter(|c| c.stdin.is_some())
            .collect();
        assert!(!later.is_empty(), "resync keeps running");
        for c in &later {
            let stdin = c.stdin.as_deref().unwrap();
            assert!(
                stdin.lines().all(|l| !l.starts_with("-F")
                    && !l.starts_with("-X")
                    && !l.starts_with("destroy")
                    && !l.starts_with("flush")),
                "{stdin}"
            );
            assert!(
                first.iter().any(|f| f.stdin == c.stdin),
                "same state rewritten: {stdin}"
            );
        }
    }
}
