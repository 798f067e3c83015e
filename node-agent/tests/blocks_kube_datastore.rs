//! The Kubernetes datastore's block lifecycle end to end, against a fake API server
//! that speaks the real HTTP/JSON wire format (lists, watch streams, create with 409
//! AlreadyExists, get, delete with uid/resourceVersion preconditions): the agent's
//! loop claims another block when the IPAM state runs low and republishes the
//! node-blocks file, and releases the blocks of a node only after it has been gone
//! for the grace period, never those of a live node.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use ipnet::Ipv4Net;
use serde_json::{Value, json};
use sluice_agent::datastore::block_lifecycle::BlockSettings;
use sluice_agent::datastore::kube::KubeDatastore;
use sluice_agent::datastore::{Datastore, Snapshot};
use sluice_agent::metrics::Metrics;
use sluice_ipam::blocks::{Pool, block_name};
use sluice_ipam::store::kube::KubeStore;
use sluice_ipam::{AttachmentKey, StateDir};

const BLOCKS: &str = "/apis/sluice.dev/v1/ipamblocks";

struct Fake {
    nodes: BTreeMap<String, Value>,
    blocks: BTreeMap<String, Value>,
    rv: u64,
    /// Watch events for Nodes, one JSON line each.
    node_events: tokio::sync::broadcast::Sender<String>,
}

type Shared = Arc<Mutex<Fake>>;

fn node(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "1"},
           "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}

fn block(cidr: &str, owner: &str, uid: u64) -> Value {
    let net: Ipv4Net = cidr.parse().unwrap();
    json!({"apiVersion": "sluice.dev/v1", "kind": "IPAMBlock",
           "metadata": {"name": block_name(net), "uid": format!("b-{uid}"), "resourceVersion": uid.to_string()},
           "spec": {"node": owner, "cidr": cidr}})
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn status(code: u16, reason: &str) -> Response {
    json_response(
        StatusCode::from_u16(code).unwrap(),
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": reason, "reason": reason, "code": code}),
    )
}

fn list(kind: &str, api_version: &str, rv: u64, items: Vec<Value>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({"apiVersion": api_version, "kind": format!("{kind}List"),
                "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
    )
}

async fn handle(shared: Shared, req: Request) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let watch = req.uri().query().is_some_and(|q| q.contains("watch=true"));
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap();
    if watch {
        // Node events are streamed from the test; other kinds never change.
        let stream = if path == "/api/v1/nodes" {
            let rx = shared.lock().unwrap().node_events.subscribe();
            tokio_stream_from(rx).boxed()
        } else {
            futures::stream::pending().boxed()
        };
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    let mut f = shared.lock().unwrap();
    let rv = f.rv;
    match (method, path.as_str()) {
        (Method::GET, "/api/v1/nodes") => {
            list("Node", "v1", rv, f.nodes.values().cloned().collect())
        }
        (Method::GET, "/api/v1/pods") => list("Pod", "v1", rv, vec![]),
        (Method::GET, "/api/v1/namespaces") => list("Namespace", "v1", rv, vec![]),
        (Method::GET, "/apis/networking.k8s.io/v1/networkpolicies") => {
            list("NetworkPolicy", "networking.k8s.io/v1", rv, vec![])
        }
        (Method::GET, BLOCKS) => list(
            "IPAMBlock",
            "sluice.dev/v1",
            rv,
            f.blocks.values().cloned().collect(),
        ),
        (Method::POST, BLOCKS) => {
            let mut obj: Value = serde_json::from_slice(&body).unwrap();
            let name = obj["metadata"]["name"].as_str().unwrap().to_string();
            if f.blocks.contains_key(&name) {
                return status(409, "AlreadyExists");
            }
            f.rv += 1;
            obj["metadata"]["uid"] = json!(format!("b-{}", f.rv));
            obj["metadata"]["resourceVersion"] = json!(f.rv.to_string());
            f.blocks.insert(name, obj.clone());
            json_response(StatusCode::CREATED, &obj)
        }
        (m, p) if p.starts_with(BLOCKS) => {
            let name = p[BLOCKS.len() + 1..].to_string();
            let Some(obj) = f.blocks.get(&name).cloned() else {
                return status(404, "NotFound");
            };
            if m == Method::GET {
                return json_response(StatusCode::OK, &obj);
            }
            let opts: Value = serde_json::from_slice(&body).unwrap_or(json!({}));
            for field in ["uid", "resourceVersion"] {
                if let Some(want) = opts["preconditions"].get(field).and_then(Value::as_str)
                    && obj["metadata"][field].as_str() != Some(want)
                {
                    return status(409, "Conflict");
                }
            }
            f.blocks.remove(&name);
            f.rv += 1;
            json_response(StatusCode::OK, &obj)
        }
        _ => status(404, "NotFound"),
    }
}

fn tokio_stream_from(
    rx: tokio::sync::broadcast::Receiver<String>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await.ok()?;
        Some((Ok(Bytes::from(line + "\n")), rx))
    })
}

async fn fake_api(nodes: &[(&str, &str)], blocks: &[(&str, &str)]) -> (kube::Client, Shared) {
    let shared: Shared = Arc::new(Mutex::new(Fake {
        nodes: nodes
            .iter()
            .map(|(n, ip)| (n.to_string(), node(n, ip)))
            .collect(),
        blocks: BTreeMap::new(),
        rv: 100,
        node_events: tokio::sync::broadcast::channel(16).0,
    }));
    for (i, (cidr, owner)) in blocks.iter().enumerate() {
        let b = block(cidr, owner, i as u64 + 1);
        let name = b["metadata"]["name"].as_str().unwrap().to_string();
        shared.lock().unwrap().blocks.insert(name, b);
    }
    let s = shared.clone();
    let app = Router::new().fallback(move |req: Request| handle(s.clone(), req));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    (kube::Client::try_from(config).unwrap(), shared)
}

fn owners(shared: &Shared) -> BTreeMap<String, String> {
    shared
        .lock()
        .unwrap()
        .blocks
        .values()
        .map(|b| {
            (
                b["spec"]["cidr"].as_str().unwrap().to_string(),
                b["spec"]["node"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Wait (up to 20 s) for `cond`, polling.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn published(file: &Path) -> Vec<Ipv4Net> {
    sluice_ipam::node_blocks::read(file)
        .unwrap()
        .map(|n| n.blocks)
        .unwrap_or_default()
}

struct Agent {
    rx: tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>,
    metrics: Arc<Metrics>,
    task: tokio::task::JoinHandle<()>,
}

fn start(client: kube::Client, dir: &Path, low_water: u32, grace: Duration) -> Agent {
    let pool = Pool::new("10.250.0.0/24".parse().unwrap(), 29).unwrap();
    let metrics = Arc::new(Metrics::new());
    let ds = KubeDatastore::new(
        client.clone(),
        KubeStore::new(client),
        pool,
        "n1".into(),
        dir.join("ipam/node-blocks.json"),
        Duration::from_millis(20),
    )
    .with_block_settings(
        BlockSettings {
            state_dir: dir.join("ipam"),
            low_water,
            orphan_grace: Some(grace),
        },
        metrics.clone(),
    );
    let (tx, rx) = tokio::sync::watch::channel(None);
    let task = tokio::spawn(async move {
        ds.run(tx).await.unwrap();
    });
    Agent { rx, metrics, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_loop_claims_a_second_block_when_the_first_fills_and_republishes() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("ipam")).unwrap();
    let (client, shared) = fake_api(&[("n1", "192.168.1.1")], &[]).await;
    let mut a = start(client, d.path(), 2, Duration::from_secs(600));
    let file = d.path().join("ipam/node-blocks.json");

    a.rx.wait_for(|s| s.as_ref().is_some_and(|s| s.blocks_of("n1").len() == 1))
        .await
        .unwrap();
    let first = published(&file);
    assert_eq!(first.len(), 1);
    // Nothing else is claimed while the block has room.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        owners(&shared).len(),
        1,
        "no claim while the block has room"
    );

    // Four of five addresses in use, as sluice-ipam ADDs would leave them.
    {
        let state = StateDir::new(d.path().join("ipam"));
        let mut l = state.lock().unwrap();
        for i in 0..4 {
            l.allocator
                .allocate(&AttachmentKey::new(format!("c{i}"), "eth0"), &first, 0)
                .unwrap();
        }
        l.commit().unwrap();
    }
    eventually("a second block published", || published(&file).len() == 2).await;
    let snap =
        a.rx.wait_for(|s| s.as_ref().is_some_and(|s| s.blocks_of("n1").len() == 2))
            .await
            .unwrap()
            .clone()
            .unwrap();
    assert_eq!(snap.blocks_of("n1"), published(&file));
    assert!(owners(&shared).values().all(|n| n == "n1"));
    assert_eq!(a.metrics.blocks_claimed.get(), 2);
    a.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_loop_releases_blocks_of_gone_nodes_after_the_grace_period_only() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("ipam")).unwrap();
    let (client, shared) = fake_api(
        &[("n1", "192.168.1.1"), ("n2", "192.168.1.2")],
        &[("10.250.0.8/29", "gone"), ("10.250.0.16/29", "n2")],
    )
    .await;
    let grace = Duration::from_secs(4);
    let mut a = start(client, d.path(), 2, grace);
    a.rx.wait_for(|s| s.is_some()).await.unwrap();
    assert_eq!(
        owners(&shared).get("10.250.0.8/29").map(String::as_str),
        Some("gone"),
        "not released before the grace period"
    );

    eventually("the gone node's block released", || {
        !owners(&shared).contains_key("10.250.0.8/29")
    })
    .await;
    assert_eq!(a.metrics.blocks_released.get(), 1);
    assert_eq!(
        owners(&shared).get("10.250.0.16/29").map(String::as_str),
        Some("n2"),
        "a live node keeps its block"
    );

    // n2 is deleted: its block goes too, after its own grace period.
    let n2 = shared.lock().unwrap().nodes.remove("n2").unwrap();
    let ev = json!({"type": "DELETED", "object": n2}).to_string();
    shared.lock().unwrap().node_events.send(ev).unwrap();
    a.rx.wait_for(|s| {
        s.as_ref()
            .is_some_and(|s| !s.cluster.nodes.keys().any(|n| n == "n2"))
    })
    .await
    .unwrap();
    assert!(owners(&shared).contains_key("10.250.0.16/29"));
    eventually("n2's block released", || {
        !owners(&shared).contains_key("10.250.0.16/29")
    })
    .await;
    assert_eq!(a.metrics.blocks_released.get(), 2);
    assert!(owners(&shared).values().all(|n| n == "n1"));
    a.task.abort();
}
