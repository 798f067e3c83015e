//! The agent's side of the node-local API (`sluice_node_files::local_api` holds the
//! contract; docs/architecture.md, "The node-local API"): a Unix socket, root's,
//! mode 0600, one request per connection.
//!
//! ```text
//! plugin ──report──► serve ──► Reports ──wake──► overlay task
//! datastore ──snapshot──► overlay task ──merged snapshot──► the agent loop (sync now)
//! plugin ──pod-annotations──► serve ──► the datastore's latest snapshot
//! ```
//!
//! The overlay sits between the datastore and the loop, so the loop is unchanged: a
//! report is a new snapshot, which the loop applies at once (without its coalescing
//! pause: the pod is waiting fail-closed), not at the next poll. [`reports`] decides what a report changes.

pub mod claims;
pub mod reports;

use std::future::Future;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sluice_node_files::local_api::{self, MAX_MESSAGE, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use crate::datastore::{SnapshotReceiver, SnapshotSender};
use crate::metrics::Metrics;
use reports::{Outcome, Reports};

/// How long a client may take to send its request: the plugin sends at once; a
/// stuck client must not hold a task forever.
const READ_DEADLINE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    #[error("node-local API socket {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Claims the block holding a requested address for this node and publishes it
/// (`claim-block`); set only where the agent owns the node's blocks (the Kubernetes
/// datastore, [`claims::block_claims`]).
pub type BlockClaims =
    Arc<dyn Fn(Ipv4Addr) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// How long a `pod-annotations` lookup waits for the datastore to deliver a pod it
/// does not know yet (the plugin's deadline, `ANNOTATIONS_TIMEOUT`, is longer).
pub const POD_LOOKUP_WAIT: Duration = Duration::from_secs(1);

/// The state the socket and the overlay share.
pub struct LocalApi {
    reports: Mutex<Reports>,
    wake: Notify,
    /// The datastore's own snapshots (not the overlay's): annotations come from here.
    datastore: SnapshotReceiver,
    metrics: Arc<Metrics>,
    block_claims: OnceLock<BlockClaims>,
    /// The denied-connection records the `flows` op serves.
    flows: OnceLock<Arc<crate::flows::FlowStore>>,
}

impl LocalApi {
    pub fn new(datastore: SnapshotReceiver, metrics: Arc<Metrics>) -> Arc<LocalApi> {
        Arc::new(LocalApi {
            reports: Mutex::new(Reports::default()),
            wake: Notify::new(),
            datastore,
            metrics,
            block_claims: OnceLock::new(),
            flows: OnceLock::new(),
        })
    }

    /// Serve `claim-block` with `claims` (once; later calls are ignored).
    pub fn set_block_claims(&self, claims: BlockClaims) {
        let _ = self.block_claims.set(claims);
    }

    /// Serve `flows` from this store.
    pub fn with_flows(self: Arc<Self>, flows: Arc<crate::flows::FlowStore>) -> Arc<Self> {
        let _ = self.flows.set(flows);
        self
    }

    fn reports(&self) -> std::sync::MutexGuard<'_, Reports> {
        self.reports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answer one request: the shared state, or for `claim-block` the block store.
    pub async fn handle(&self, req: Request) -> Response {
        match req {
            Request::ClaimBlock { address } => match self.block_claims.get() {
                Some(claims) => claims(address).await,
                None => Response::Error {
                    message: "this agent does not claim blocks: with the directory datastore \
                              the IPAM plugin claims its node's blocks itself"
                        .into(),
                },
            },
            Request::ReportAttachment(a) => {
                tracing::info!(pod = %format!("{}/{}", a.namespace, a.name), address = %a.address, no_ipam = a.no_ipam, "attachment reported; enforcing now");
                self.metrics.local_reports.inc();
                self.reports().attach(a, Instant::now());
                self.wake.notify_one();
                Response::Ok
            }
            Request::ReportDetachment(d) => {
                if self.reports().detach(&d) {
                    self.wake.notify_one();
                }
                Response::Ok
            }
            Request::PodAnnotations { namespace, name } => {
                let key = sluice_policy::NamespacedName::new(&namespace, &name);
                // The runtime may ADD a pod a moment before the datastore's watch (or
                // poll) delivers it: wait for it, bounded, rather than answer "not
                // known" and let the plugin hand out an address the pod did not ask
                // for.
                let mut datastore = self.datastore.clone();
                let knows = |s: &Option<Arc<crate::datastore::Snapshot>>| {
                    s.as_ref()
                        .is_some_and(|s| s.cluster.pods.contains_key(&key))
                };
                let _ = tokio::time::timeout(POD_LOOKUP_WAIT, datastore.wait_for(knows)).await;
                let snap = datastore.borrow().clone();
                match snap {
                    None => Response::Annotations {
                        known: false,
                        ip_addrs: None,
                        ip_addrs_no_ipam: None,
                    },
                    Some(s) => {
                        let a = s.annotations.get(&key).cloned().unwrap_or_default();
                        Response::Annotations {
                            known: s.cluster.pods.contains_key(&key),
                            ip_addrs: a.ip_addrs,
                            ip_addrs_no_ipam: a.ip_addrs_no_ipam,
                        }
                    }
                }
            }
            // Streamed by `connection`; here only when no store serves it.
            Request::Flows(_) => Response::Error {
                message: "this agent does not record denied connections".into(),
            },
        }
    }
}

/// Bind the socket: its directory made, a stale socket of an earlier run replaced,
/// mode 0600 (only root may report pods).
pub fn bind(path: &Path) -> Result<UnixListener, LocalApiError> {
    let io = |op, source| LocalApiError::Io {
        path: path.to_owned(),
        op,
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("creating its directory", e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing the stale socket", e)),
    }
    // Bound under a umask-independent mode: tighten before anyone can connect by
    // binding a private name and renaming it into place.
    let tmp = path.with_extension("sock.tmp");
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(|e| io("binding", e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("setting mode 0600", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming into place", e))?;
    Ok(l)
}

/// Serve connections until the listener fails.
pub async fn serve(listener: UnixListener, api: Arc<LocalApi>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let api = api.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &api).await {
                        tracing::debug!(error = %e, "node-local API connection");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "node-local API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(mut stream: UnixStream, api: &LocalApi) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_MESSAGE || buf.contains(&b'\n') {
                break;
            }
        }
        std::io::Result::Ok(())
    };
    tokio::time::timeout(READ_DEADLINE, read)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let resp = match local_api::decode_request(line) {
        Ok(Request::Flows(query)) if api.flows.get().is_some() => {
            let store = api.flows.get().expect("checked");
            let mut lines = std::pin::pin!(crate::flows::answer(store, query));
            while let Some(line) = futures::StreamExt::next(&mut lines).await {
                stream.write_all(&line).await?;
            }
            return stream.shutdown().await;
        }
        Ok(req) => api.handle(req).await,
        Err(message) => Response::Error { message },
    };
    stream.write_all(&local_api::encode_response(&resp)).await?;
    stream.shutdown().await
}

/// Lay the reports over every datastore snapshot and publish the result to the loop;
/// re-run on every report, and when the oldest unconfirmed report expires.
pub async fn overlay(
    api: Arc<LocalApi>,
    mut datastore: SnapshotReceiver,
    out: SnapshotSender,
    node: String,
    grace: Duration,
) {
    let mut last_read = Instant::now();
    loop {
        let latest = datastore.borrow_and_update().clone();
        if let Some(snap) = latest.as_ref().filter(|_| api.reports().is_empty()) {
            // Nothing reported: the datastore's snapshot as it is, without a copy
            // (10k pods are worth not cloning on every change).
            let same = out.borrow().as_ref().is_some_and(|o| Arc::ptr_eq(o, snap));
            if !same && out.send(Some(snap.clone())).is_err() {
                return;
            }
            api.metrics.local_reports_pending.set(0);
        } else if let Some(snap) = latest {
            let now = Instant::now();
            // A copy of the reports is laid over outside their lock, and the copy and
            // comparison of 10,000 pods run off the async workers: a report arriving
            // meanwhile is answered at once (the plugin waits 5 ms at most) and
            // wakes the next round.
            let seen = api.reports().clone();
            let (merged, outcomes) = crate::agent::off_the_workers(|| {
                let (merged, outcomes) = seen.overlay(&snap, &node, now, grace);
                let merged = match merged {
                    // No report applies: the datastore's snapshot itself, as above.
                    std::borrow::Cow::Borrowed(_) => {
                        let same = out.borrow().as_ref().is_some_and(|o| Arc::ptr_eq(o, &snap));
                        (!same).then(|| snap.clone())
                    }
                    std::borrow::Cow::Owned(merged) => {
                        let changed = out.borrow().as_deref() != Some(&merged);
                        changed.then(|| Arc::new(merged))
                    }
                };
                (merged, outcomes)
            });
            api.reports().settle(&seen, &outcomes);
            let fresh = seen.newest().filter(|at| *at > last_read);
            last_read = now;
            for (pod, o) in &outcomes {
                match o {
                    Outcome::Expired => {
                        tracing::warn!(%pod, grace_s = grace.as_secs(), "reported pod never confirmed by the datastore; report dropped")
                    }
                    Outcome::Confirmed => {
                        tracing::debug!(%pod, "report confirmed by the datastore")
                    }
                    Outcome::Applied | Outcome::Waiting => {}
                }
            }
            api.metrics
                .local_reports_pending
                .set(api.reports().len() as i64);
            if let Some(m) = merged
                && out.send(Some(m)).is_err()
            {
                return;
            }
            // A report since the last round: how long until the loop had it
            // (tests/e2e/measure-add-to-connect.sh reads this).
            if let Some(at) = fresh {
                let ms = (at.elapsed().as_secs_f64() * 1e4).round() / 10.0;
                tracing::info!(overlay_ms = ms, "report laid over the snapshot");
            }
        }
        let expiry = api.reports().next_expiry(grace);
        let sleep = expiry
            .map(|t| t.saturating_duration_since(Instant::now()) + Duration::from_millis(1))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            r = datastore.changed() => if r.is_err() { return },
            _ = api.wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::Snapshot;
    use crate::datastore::objects::{convert, parse_manifest_text};
    use sluice_node_files::local_api::{Attachment, call};

    fn pod_snapshot() -> Snapshot {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: prod, labels: {app: web},\n\
                    annotations: {sluice.dev/ip-addrs-no-ipam: '[\"192.0.2.7\"]'}}\n\
                    spec: {nodeName: node-1, containers: [{name: c, image: x}]}\n";
        let conv = convert(&parse_manifest_text("t", text).unwrap());
        Snapshot {
            cluster: conv.cluster,
            annotations: conv.annotations,
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_report_reaches_the_loop_at_once_and_expires_unconfirmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agent.sock");
        let (ds_tx, ds_rx) = tokio::sync::watch::channel(None);
        let (tx, mut rx) = tokio::sync::watch::channel(None);
        let api = LocalApi::new(ds_rx.clone(), Arc::new(Metrics::new()));
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        tokio::spawn(serve(listener, api.clone()));
        let grace = Duration::from_millis(300);
        tokio::spawn(overlay(api.clone(), ds_rx, tx, "node-1".into(), grace));
        ds_tx.send(Some(Arc::new(pod_snapshot()))).unwrap();
        rx.changed().await.unwrap();
        assert!(
            rx.borrow_and_update()
                .as_ref()
                .unwrap()
                .cluster
                .pods
                .values()
                .all(|p| p.ips.is_empty())
        );

        // The plugin's blocking client, as ADD calls it.
        let p = path.clone();
        let ann = tokio::task::spawn_blocking(move || {
            call(
                &p,
                &Request::PodAnnotations {
                    namespace: "prod".into(),
                    name: "web".into(),
                },
                Duration::from_millis(500),
            )
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            ann,
            Response::Annotations {
                known: true,
                ip_addrs: None,
                ip_addrs_no_ipam: Some("[\"192.0.2.7\"]".into())
            }
        );

        let p = path.clone();
        let reported = Instant::now();
        let ok = tokio::task::spawn_blocking(move || {
            call(
                &p,
                &Request::ReportAttachment(Attachment {
                    namespace: "prod".into(),
                    name: "web".into(),
                    container_id: "c1".into(),
                    ifname: "eth0".into(),
                    host_ifname: "slc1".into(),
                    address: "192.0.2.7".parse().unwrap(),
                    no_ipam: true,
                }),
                Duration::from_millis(500),
            )
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(ok, Response::Ok);
        rx.changed().await.unwrap();
        assert!(reported.elapsed() < Duration::from_millis(100));
        let ips = rx
            .borrow_and_update()
            .as_ref()
            .unwrap()
            .cluster
            .pods
            .values()
            .next()
            .unwrap()
            .ips
            .clone();
        assert_eq!(ips, vec!["192.0.2.7".parse::<std::net::IpAddr>().unwrap()]);

        // The datastore never confirms it: after the grace the pod is back to what
        // the datastore says.
        tokio::time::timeout(Duration::from_secs(2), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(reported.elapsed() >= grace);
        assert!(
            rx.borrow()
                .as_ref()
                .unwrap()
                .cluster
                .pods
                .values()
                .all(|p| p.ips.is_empty())
        );
    }

    #[tokio::test]
    async fn a_lookup_waits_for_a_pod_the_datastore_delivers_a_moment_later() {
        // The runtime ADDs before the watch has the pod: the lookup must not answer
        // "not known" (the plugin would then give the pod an address it did not ask
        // for) while the datastore is about to deliver it.
        let (ds_tx, ds_rx) = tokio::sync::watch::channel(Some(Arc::new(Snapshot::default())));
        let api = LocalApi::new(ds_rx, Arc::new(Metrics::new()));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            ds_tx.send(Some(Arc::new(pod_snapshot()))).unwrap();
            // Keep the sender alive past the lookup.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let r = api
            .handle(Request::PodAnnotations {
                namespace: "prod".into(),
                name: "web".into(),
            })
            .await;
        match r {
            Response::Annotations {
                known: true,
                ip_addrs_no_ipam: Some(a),
                ..
            } => assert!(a.contains("192.0.2.7"), "{a}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_request_of_another_version_gets_an_error_answer() {
        let (_tx, rx) = tokio::sync::watch::channel(None);
        let api = LocalApi::new(rx, Arc::new(Metrics::new()));
        let r = api
            .handle(Request::PodAnnotations {
                namespace: "a".into(),
                name: "b".into(),
            })
            .await;
        assert_eq!(
            r,
            Response::Annotations {
                known: false,
                ip_addrs: None,
                ip_addrs_no_ipam: None
            }
        );
        assert!(local_api::decode_request(br#"{"v":9,"op":"pod-annotations"}"#).is_err());
        // Without the Kubernetes datastore nobody claims blocks: a clear refusal.
        let r = api
            .handle(Request::ClaimBlock {
                address: "10.244.0.9".parse().unwrap(),
            })
            .await;
        assert!(
            matches!(r, Response::Error { message } if message.contains("claims its node's blocks itself"))
        );
    }
}
