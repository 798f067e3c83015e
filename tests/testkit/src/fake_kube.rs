//! A fake Kubernetes API server that speaks the real HTTP/JSON wire format, for the
//! Kubernetes datastore (no API server runs on these machines): lists with a
//! `resourceVersion`, `watch=true` streams (Node events pushed by the test, other
//! kinds never change), and IPAMBlocks with create (409 AlreadyExists), get and
//! delete with uid/resourceVersion preconditions (409 Conflict), errors as `Status`
//! objects. Serves Nodes, Pods, Namespaces, NetworkPolicies and IPAMBlocks; anything
//! else is a 404 `Status`.
//!
//! Shared by the agent's datastore tests and the image test, which runs it inside a
//! lab node's network namespace ([`FakeApi::start_in_netns`]) so the containerized
//! agent reaches it over that namespace's loopback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};

/// The IPAMBlock collection (sluice's CRD, cluster-scoped).
pub const BLOCKS: &str = "/apis/sluice.dev/v1/ipamblocks";

/// What the fake server holds. Tests read and change it through [`Shared`].
pub struct Fake {
    pub nodes: BTreeMap<String, Value>,
    /// IPAMBlocks by object name.
    pub blocks: BTreeMap<String, Value>,
    pub rv: u64,
    /// Watch events for Nodes, one JSON line each.
    pub node_events: tokio::sync::broadcast::Sender<String>,
}

pub type Shared = Arc<Mutex<Fake>>;

impl Fake {
    /// A server state with these `(name, InternalIP)` nodes and no blocks.
    pub fn with_nodes(nodes: &[(&str, &str)]) -> Shared {
        Arc::new(Mutex::new(Fake {
            nodes: nodes
                .iter()
                .map(|(n, ip)| (n.to_string(), node(n, ip)))
                .collect(),
            blocks: BTreeMap::new(),
            rv: 100,
            node_events: tokio::sync::broadcast::channel(16).0,
        }))
    }

    /// CIDR → owning node of every block, as the server holds them now.
    pub fn owners(shared: &Shared) -> BTreeMap<String, String> {
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
}

/// A Node object with one InternalIP.
pub fn node(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "1"},
           "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}

/// An IPAMBlock object; `name` is `sluice_ipam::blocks::block_name` of the CIDR.
pub fn block(name: &str, cidr: &str, owner: &str, uid: u64) -> Value {
    json!({"apiVersion": "sluice.dev/v1", "kind": "IPAMBlock",
           "metadata": {"name": name, "uid": format!("b-{uid}"), "resourceVersion": uid.to_string()},
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
            lines(rx).boxed()
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

fn lines(
    rx: tokio::sync::broadcast::Receiver<String>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await.ok()?;
        Some((Ok(Bytes::from(line + "\n")), rx))
    })
}

/// The fake server's routes over `shared`.
pub fn router(shared: Shared) -> Router {
    Router::new().fallback(move |req: Request| handle(shared.clone(), req))
}

/// Serve on 127.0.0.1 (an ephemeral port) from the current tokio runtime; returns the
/// address. The server lives as long as the runtime.
pub async fn start_local(shared: Shared) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(shared);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A fake server on its own thread and runtime, listening on 127.0.0.1 of another
/// network namespace; stopped on drop.
pub struct FakeApi {
    pub addr: SocketAddr,
    pub shared: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApi {
    /// Start serving `shared` on 127.0.0.1 inside the network namespace at `netns`
    /// (e.g. `/proc/<pid>/ns/net`). The socket belongs to that namespace: processes
    /// in it reach the server at [`FakeApi::addr`], the host does not.
    pub fn start_in_netns(netns: &Path, shared: Shared) -> FakeApi {
        let netns = netns.to_owned();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            // setns affects this thread only; the runtime below is built after it, on
            // this thread, so its listener is created in the node's namespace.
            let f = std::fs::File::open(&netns).expect("open the netns file");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let addr = start_local(s).await;
                addr_tx.send(addr).unwrap();
                let _ = stopped.await;
            });
        });
        let addr = addr_rx.recv().expect("the fake API server started");
        FakeApi {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// A kubeconfig that points kube clients at this server over plain HTTP. It names
    /// a CA ([`UNUSED_CA_PEM_BASE64`]), as an in-cluster configuration always does
    /// (the service-account CA): without one, kube-rs builds its TLS settings from the
    /// system's trust store, and an image without `ca-certificates` has none, so the
    /// client could not even be created.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             \x20   certificate-authority-data: {UNUSED_CA_PEM_BASE64}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n",
            self.addr
        )
    }
}

/// A self-signed CA certificate (PEM, base64), never used to verify anything: the
/// fake server is plain HTTP. Its key was thrown away.
pub const UNUSED_CA_PEM_BASE64: &str = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJrakNDQVRlZ0F3SUJBZ0lVZWdxaXBJSTI4LzgySTJaR3Nna0dFN0g2bU5Vd0NnWUlLb1pJemowRUF3SXcKSFRFYk1Ca0dBMVVFQXd3U2MyeDFhV05sTFdaaGEyVXRZWEJwTFdOaE1DQVhEVEkyTVRJd05qQTBORFl3TUZvWQpEekl4TWpZeE1URXlNRFEwTmpBd1dqQWRNUnN3R1FZRFZRUUREQkp6YkhWcFkyVXRabUZyWlMxaGNHa3RZMkV3CldUQVRCZ2NxaGtqT1BRSUJCZ2dxaGtqT1BRTUJCd05DQUFSVktpbFJNN2tmZmNhVUxIancxMzV0R1NzSldWZVEKei8reVRjZGIvalpCQjRmS2kxTDhTOFJtby9GQmRndjRkVm5pVkhkTC9Kd2JQZ09CYmFpQkRuMGJvMU13VVRBZApCZ05WSFE0RUZnUVVDUWZXck1KdGdyTDRBWjg2RzBONzlQZkZWYU13SHdZRFZSMGpCQmd3Rm9BVUNRZldyTUp0CmdyTDRBWjg2RzBONzlQZkZWYU13RHdZRFZSMFRBUUgvQkFVd0F3RUIvekFLQmdncWhrak9QUVFEQWdOSkFEQkcKQWlFQW5qU2kvSWRlMEVmTUR4aTZSaURHcHVHZnh6ZEM4ZWJJTUh2VEpXZ2NXYkFDSVFEN3FDb3R1Sld3VlUrTApCU1BGSk80V0U1Z0VIWVpwSmhSMGxhbDRyZ3hOenc9PQotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg==";

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
