//! The Kubernetes datastore and the agent's loop, in process, against the fake API
//! server (real wire format: lists with resourceVersion, watch streams of JSON lines,
//! a 410 Expired `ERROR` event, a server that stops listening): watch connections cut
//! mid-stream, a 410 forcing a relist, and the server unreachable for a minute. The
//! agent keeps the last state (no snapshot ever has fewer objects, nothing is
//! flushed or destroyed in the dataplane), `/readyz` answers 503 naming the API server
//! while the status file keeps `ready` (the ADD gate) and carries the reason in
//! `datastore`, and changes made meanwhile arrive once the server is back.
//!
//! The dataplane is a recording runner (the kernel side of "nothing flushed" is shown
//! by the whole-binary tests: agent_e2e's restart and agent_kill_mid_apply).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_agent::agent::{Loop, status_writer};
use sluice_agent::dataplane::runner::RecordedCall;
use sluice_agent::dataplane::{Backend, Dataplane, RecordingRunner};
use sluice_agent::datastore::block_lifecycle::BlockSettings;
use sluice_agent::datastore::kube::KubeDatastore;
use sluice_agent::datastore::{Datastore, DatastoreHealth, Snapshot};
use sluice_agent::health::Health;
use sluice_agent::metrics::Metrics;
use sluice_agent::node_network::Network;
use sluice_agent::reconcile::{NodeSettings, TunnelFilter};
use sluice_ipam::blocks::{Pool, block_name};
use sluice_ipam::store::kube::KubeStore;
use sluice_testkit::fake_kube::{self, Fake, PODS, POLICIES, SwitchableApi};

const NODE: &str = "node-1";

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "uid": format!("ns-{name}")}})
}

fn pod(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "prod", "uid": format!("pod-{name}"),
                        "labels": {"app": name}},
           "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn policy(name: &str, port: u16) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": "prod", "uid": format!("np-{name}")},
           "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                 "ports": [{"port": port, "protocol": "TCP"}]}]}})
}

struct Agent {
    api: SwitchableApi,
    rx: tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>,
    health: Arc<Health>,
    runner: RecordingRunner,
    health_addr: std::net::SocketAddr,
    status: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn start() -> Agent {
    let shared = Fake::with_nodes(&[(NODE, "192.168.77.1")]);
    {
        let net = "10.250.0.0/29".parse().unwrap();
        let b = fake_kube::block(&block_name(net), "10.250.0.0/29", NODE, 1);
        shared.lock().unwrap().blocks.insert(block_name(net), b);
    }
    Fake::apply(&shared, fake_kube::NAMESPACES, namespace("prod"));
    Fake::apply(&shared, PODS, pod("web", "10.250.0.2"));
    Fake::apply(&shared, PODS, pod("client", "10.250.0.3"));
    Fake::apply(&shared, POLICIES, policy("p1", 8001));
    let api = SwitchableApi::start(shared).await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("ipam")).unwrap();
    let config = kube::Config::new(format!("http://{}", api.addr).parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let pool = Pool::new("10.250.0.0/24".parse().unwrap(), 29).unwrap();
    let metrics = Arc::new(Metrics::new());
    let dh = Arc::new(DatastoreHealth::default());
    let ds = KubeDatastore::new(
        client.clone(),
        KubeStore::new(client),
        pool,
        NODE.into(),
        dir.path().join("ipam/node-blocks.json"),
        Duration::from_millis(20),
    )
    .with_block_settings(
        BlockSettings {
            state_dir: dir.path().join("ipam"),
            low_water: 0,
            orphan_grace: None,
            publish_lock: Default::default(),
        },
        metrics.clone(),
    )
    .with_health(dh.clone());
    let health = Arc::new(Health::new(Duration::from_secs(60)).with_datastore(dh));
    let runner = RecordingRunner::default();
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move { ds.run(tx).await.unwrap() });
    let lp = Loop {
        settings: NodeSettings {
            node: NODE.into(),
            pool: "10.250.0.0/24".parse().unwrap(),
            tunnel: TunnelFilter::None,
            nat_outgoing: true,
            node_ip: None,
            dataplane: sluice_policy::dataplane::DataplaneKind::Iptables,
        },
        dataplane: Arc::new(Dataplane::new(runner.clone(), Backend::Nft)),
        network: Network::Off,
        health: health.clone(),
        metrics: metrics.clone(),
        resync: Duration::from_millis(500),
        coalesce: Duration::from_millis(20),
        flows: None,
    };
    tokio::spawn(lp.run(rx.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health_addr = listener.local_addr().unwrap();
    tokio::spawn(sluice_agent::health::serve(
        listener,
        health.clone(),
        metrics,
    ));
    let status = dir.path().join("agent-status.json");
    tokio::spawn(status_writer(status.clone(), NODE.into(), health.clone()));
    Agent {
        api,
        rx,
        health,
        runner,
        health_addr,
        status,
        _dir: dir,
    }
}

impl Agent {
    fn policies(&self) -> Vec<String> {
        self.rx
            .borrow()
            .as_ref()
            .map(|s| {
                s.cluster
                    .policies
                    .values()
                    .map(|p| p.name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.health_addr)
            .await
            .unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out[9..12].parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (code, body)
    }

    async fn readyz(&self) -> (u16, String) {
        self.get("/readyz").await
    }

    /// The value of the unlabelled metric `name` as `/metrics` serves it.
    async fn metric(&self, name: &str) -> f64 {
        let (code, body) = self.get("/metrics").await;
        assert_eq!(code, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
    }

    /// (list requests, watch requests) the server has served.
    fn requests(&self) -> (u64, u64) {
        let f = self.api.shared.lock().unwrap();
        (f.lists, f.watches)
    }

    fn status_file(&self) -> Value {
        serde_json::from_slice(&std::fs::read(&self.status).unwrap()).unwrap()
    }

    /// Nothing the dataplane was asked to write removes anything: no chain deleted or
    /// flushed on its own, no set destroyed or flushed. Except a pod group's chain and
    /// dispatch set (iptables: `SLUICE-TW-`/`SLUICE-FW-`, `SLUICE-TD-`/`SLUICE-FD-`),
    /// which go when a policy arriving moves the group's pods to another group: a
    /// policy lost in the gap would still delete its own chain (`SLUICE-PI-`/`-PE-`)
    /// and its peers' sets, which stay refused here.
    fn assert_nothing_flushed(&self, during: &str) {
        let group = |name: &str| {
            ["SLUICE-TW-", "SLUICE-FW-", "SLUICE-TD-", "SLUICE-FD-"]
                .iter()
                .any(|p| name.starts_with(p))
        };
        let removes = |l: &str| {
            let mut words = l.split_whitespace();
            match (words.next(), words.next()) {
                (Some("-X" | "destroy"), Some(name)) => !group(name),
                (Some(w), _) => {
                    w.starts_with("-F") || w.starts_with("-X") || w == "flush" || w == "destroy"
                }
                _ => false,
            }
        };
        for c in self.runner.calls() {
            let stdin = c.stdin.as_deref().unwrap_or("");
            assert!(
                stdin.lines().all(|l| !removes(l))
                    && !(c.program == "ipset"
                        && c.args.first().is_some_and(|a| a == "destroy")
                        && !c.args.get(1).is_some_and(|n| group(n))),
                "{during}: {}\n{stdin}",
                RecordedCall::command_line(&c)
            );
        }
    }
}

async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if cond() {
            return t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {limit:?} waiting for: {what}");
}

/// Every snapshot published from now on, as its policy count.
fn watch_policy_counts(a: &Agent) -> Arc<std::sync::Mutex<Vec<usize>>> {
    let counts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, mut rx) = (counts.clone(), a.rx.clone());
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let n = rx
                .borrow_and_update()
                .as_ref()
                .map_or(0, |s| s.cluster.policies.len());
            c.lock().unwrap().push(n);
        }
    });
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_watches_and_a_410_lose_nothing_and_changes_in_the_gap_arrive() {
    let a = start().await;
    eventually("ready", Duration::from_secs(20), || {
        a.health.view().serving_ready()
    })
    .await;
    assert_eq!(a.policies(), ["p1"]);
    let counts = watch_policy_counts(&a);

    // (1) The server ends every watch mid-stream; a change made right then arrives
    // through the resumed watch (the server replays it from its history).
    let (lists, watches) = a.requests();
    Fake::cut_watches(&a.api.shared);
    Fake::apply(&a.api.shared, POLICIES, policy("p2", 8002));
    let t = eventually("p2 after cut watches", Duration::from_secs(20), || {
        a.policies().len() == 2
    })
    .await;
    let (lists_after, watches_after) = a.requests();
    assert!(watches_after > watches, "the watches were opened again");
    assert_eq!(
        lists_after, lists,
        "a cut watch resumes from its version: no relist"
    );
    eprintln!("FIGURES cut watches: change in the gap applied after {t:?}");

    // (2) 410 Expired on every watch: the reflectors list again and converge.
    let (lists, _) = a.requests();
    Fake::expire_watches(&a.api.shared);
    Fake::apply(&a.api.shared, POLICIES, policy("p3", 8003));
    // Each of the four reflectors lists again (after its backoff) and p3 arrives.
    let t = eventually(
        "p3 and a relist of every kind after 410",
        Duration::from_secs(30),
        || a.policies().len() == 3 && a.requests().0 >= lists + 4,
    )
    .await;
    eprintln!("FIGURES 410 Expired: relisted and applied after {t:?}");
    eventually("ready after the relist", Duration::from_secs(20), || {
        a.health.view().serving_ready()
    })
    .await;
    let seen = counts.lock().unwrap().clone();
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]) && seen.iter().all(|n| *n >= 1),
        "no snapshot lost a policy: {seen:?}"
    );
    a.assert_nothing_flushed("cut watches and 410");
    let (code, body) = a.readyz().await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_unreachable_for_a_minute_keeps_the_state_reports_not_ready_and_converges_after()
{
    let a = start().await;
    eventually("ready", Duration::from_secs(20), || {
        a.health.view().serving_ready()
    })
    .await;
    eventually("status file ready", Duration::from_secs(5), || {
        a.status.exists() && a.status_file()["ready"] == json!(true)
    })
    .await;
    let counts = watch_policy_counts(&a);
    let before = a.policies();
    const OUT_OF_SYNC: &str = "sluice_agent_datastore_out_of_sync_seconds";
    const FAILING: &str = "sluice_agent_datastore_watches_failing";
    assert_eq!(a.metric(OUT_OF_SYNC).await, 0.0);
    assert_eq!(a.metric(FAILING).await, 0.0);

    let down_at = Instant::now();
    a.api.go_down();
    // A change made while the agent cannot see it; the server keeps it.
    Fake::apply(&a.api.shared, POLICIES, policy("p-during", 8100));
    let mut detected = None;
    let mut checks = 0;
    while down_at.elapsed() < Duration::from_secs(60) {
        let (code, body) = a.readyz().await;
        if code == 503 && detected.is_none() {
            assert!(body.contains("Kubernetes API server"), "{body}");
            detected = Some(down_at.elapsed());
            eprintln!("readyz during the outage: {body}");
        }
        if let Some(d) = detected
            && down_at.elapsed() > d + Duration::from_secs(1)
        {
            // Once detected it stays so for the whole outage, and the programmed
            // state stays: the ADD gate (`ready`) holds, the reason is `datastore`.
            assert_eq!(code, 503, "{body}");
            // So does the metric an alert would fire on, with the outage's age.
            let age = a.metric(OUT_OF_SYNC).await;
            assert!(
                age >= 5.0 && age <= down_at.elapsed().as_secs_f64(),
                "{age}"
            );
            assert!(a.metric(FAILING).await >= 1.0);
            let s = a.status_file();
            if s.get("datastore").is_some() {
                checks += 1;
                assert_eq!(s["ready"], json!(true), "{s}");
                assert!(
                    s["datastore"]
                        .as_str()
                        .unwrap()
                        .contains("Kubernetes API server"),
                    "{s}"
                );
            }
        }
        assert_eq!(a.policies(), before, "the last state stays");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let detected = detected.expect("/readyz went 503 during the outage");
    assert!(checks > 10, "the status file carried the datastore reason");
    a.assert_nothing_flushed("the outage");
    assert!(
        counts.lock().unwrap().iter().all(|n| *n == before.len()),
        "no emptier snapshot published while the API server was unreachable: {:?}",
        counts.lock().unwrap()
    );

    let back_at = Instant::now();
    a.api.come_back().await;
    let applied = eventually(
        "the change made during the outage",
        Duration::from_secs(60),
        || a.policies().contains(&"p-during".to_string()),
    )
    .await;
    let mut ready = None;
    while back_at.elapsed() < Duration::from_secs(60) {
        if a.readyz().await.0 == 200 {
            ready = Some(back_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = ready.expect("ready again after the outage");
    assert_eq!(a.metric(OUT_OF_SYNC).await, 0.0, "in sync again");
    eventually(
        "status file without datastore",
        Duration::from_secs(10),
        || a.status_file().get("datastore").is_none(),
    )
    .await;
    a.assert_nothing_flushed("recovery");
    eprintln!(
        "FIGURES outage 60 s: detected (readyz 503) after {detected:?}; after the server came back \
         the change made during the outage was applied in {applied:?} and readyz was 200 in {ready:?}"
    );
}
