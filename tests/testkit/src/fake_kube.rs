//! A fake Kubernetes API server that speaks the real HTTP/JSON wire format, for the
//! Kubernetes datastore (no API server runs on these machines): lists with a
//! `resourceVersion`, `watch=true` streams (Node events pushed by the test, other
//! kinds never change), and IPAMBlocks with create (409 AlreadyExists), get and
//! delete with uid/resourceVersion preconditions (409 Conflict), errors as `Status`
//! objects. Serves Nodes, Pods, Namespaces, NetworkPolicies, IPAMBlocks and
//! ClusterNetworkPolicies; anything else is a 404 `Status`. The ClusterNetworkPolicy
//! CRD can be "not installed" ([`Fake::cluster_policies_installed`]): then its list
//! and watch answer 404 NotFound, as an API server without the CRD does. A
//! ClusterNetworkPolicy's `status` subresource takes a server-side apply PATCH
//! (`application/apply-patch+yaml`): its conditions replace those of the same `type`,
//! the object gets a new resourceVersion and a MODIFIED event, and the PATCH is
//! recorded ([`Fake::status_patches`]); [`Fake::status_patch_error`] refuses it.
//! Pods are also listed per namespace with `labelSelector` (equality terms) and
//! `fieldSelector=spec.nodeName=…`, and the pod proxy
//! (`/api/v1/namespaces/NS/pods/NAME:PORT/proxy/REST`) forwards to the local server a
//! test registers in [`Fake::pod_proxies`], streaming its response back.
//!
//! Faults, as a real API server shows them: Pods, Namespaces and NetworkPolicies
//! changed with [`Fake::apply`] are kept in a watch history, so a watch that resumes
//! from a `resourceVersion` gets the events it missed ([`Fake::cut_watches`] ends
//! every watch stream, as the server's own timeout does); [`Fake::expire_watches`]
//! sends each watch an `ERROR` event carrying a `410 Expired` `Status` and refuses
//! older versions from then on, forcing a relist; [`SwitchableApi`] makes the server
//! unreachable (listener closed, connections dropped) and brings it back on the
//! same address.
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
use serde_json::{Value, json};
use tokio::sync::broadcast;

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
    /// Objects of the other watched collections, by collection path and then
    /// `namespace/name`, changed through [`Fake::apply`].
    pub objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// Every [`Fake::apply`] as `(resourceVersion, collection path, event line)`, so a
    /// resumed watch replays what it missed.
    history: Vec<(u64, String, String)>,
    /// The oldest resourceVersion a watch may resume from (older: 410 Expired).
    min_rv: u64,
    /// Live events of [`Fake::apply`]: `(collection path, event line)`.
    events: broadcast::Sender<(String, String)>,
    /// Fault signals for open watch streams.
    control: broadcast::Sender<Control>,
    /// Lists of Nodes, Pods, Namespaces and NetworkPolicies served (a relist shows
    /// here; a resumed watch does not).
    pub lists: u64,
    /// Watch requests served.
    pub watches: u64,
    /// Whether the ClusterNetworkPolicy CRD is installed (true unless a test says
    /// otherwise); while it is not, [`CLUSTER_POLICIES`] answers 404.
    pub cluster_policies_installed: bool,
    /// Lists of ClusterNetworkPolicies asked for, 404s included (not in `lists`).
    pub cluster_policy_lists: u64,
    /// Every PATCH of a ClusterNetworkPolicy's status, refused ones included.
    pub status_patches: Vec<StatusPatch>,
    /// Answer status PATCHes with this code (403 Forbidden, say) instead of applying.
    pub status_patch_error: Option<u16>,
    /// Where the pod proxy sends `NS/NAME:PORT`: a local server standing in for the
    /// pod (an unregistered pod answers 503, as an unreachable one does).
    pub pod_proxies: BTreeMap<String, SocketAddr>,
}

/// One PATCH of a ClusterNetworkPolicy's `status` subresource, as the fake received it.
#[derive(Debug, Clone)]
pub struct StatusPatch {
    pub name: String,
    pub content_type: String,
    /// The `fieldManager` query parameter.
    pub field_manager: Option<String>,
    /// The `force` query parameter was `true`.
    pub force: bool,
    pub body: Value,
}

#[derive(Debug, Clone, Copy)]
enum Control {
    /// End every watch stream (a clean end, as the server's timeout gives).
    Cut,
    /// Send every watch a 410 Expired `ERROR` event, then end it.
    Expire,
}

/// The collection paths [`Fake::apply`] serves.
pub const PODS: &str = "/api/v1/pods";
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";
/// ClusterNetworkPolicies (cluster-scoped): their key in [`Fake::apply`] is `/name`.
pub const CLUSTER_POLICIES: &str = "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies";

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
            objects: BTreeMap::new(),
            history: Vec::new(),
            min_rv: 0,
            events: broadcast::channel(1024).0,
            control: broadcast::channel(16).0,
            lists: 0,
            watches: 0,
            cluster_policies_installed: true,
            cluster_policy_lists: 0,
            status_patches: Vec::new(),
            status_patch_error: None,
            pod_proxies: BTreeMap::new(),
        }))
    }

    /// Create or replace `obj` in the collection at `path` ([`PODS`], [`NAMESPACES`],
    /// [`POLICIES`], [`CLUSTER_POLICIES`]): a new resourceVersion, and an ADDED or MODIFIED event to every
    /// watch of that collection (and to the history a resumed watch replays).
    pub fn apply(shared: &Shared, path: &str, mut obj: Value) {
        Self::change(shared, path, &mut obj, false);
    }

    /// Delete `obj` (by namespace/name) from the collection at `path`, with a DELETED
    /// event.
    pub fn delete(shared: &Shared, path: &str, mut obj: Value) {
        Self::change(shared, path, &mut obj, true);
    }

    fn change(shared: &Shared, path: &str, obj: &mut Value, delete: bool) {
        shared.lock().unwrap().change_locked(path, obj, delete);
    }

    fn change_locked(&mut self, path: &str, obj: &mut Value, delete: bool) {
        let f = self;
        f.rv += 1;
        let rv = f.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = format!(
            "{}/{}",
            obj["metadata"]["namespace"].as_str().unwrap_or(""),
            obj["metadata"]["name"].as_str().unwrap()
        );
        let coll = f.objects.entry(path.to_string()).or_default();
        let kind = if delete {
            coll.remove(&key);
            "DELETED"
        } else if coll.insert(key, obj.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let line = json!({"type": kind, "object": obj}).to_string();
        f.history.push((rv, path.to_string(), line.clone()));
        // No watcher (the server is "down" for the client): the history has it.
        let _ = f.events.send((path.to_string(), line));
    }

    /// End every open watch stream cleanly; clients resume from their last version.
    pub fn cut_watches(shared: &Shared) {
        let _ = shared.lock().unwrap().control.send(Control::Cut);
    }

    /// Compact the history as etcd does: every open watch gets an `ERROR` event with
    /// a 410 Expired `Status` and ends, and a watch resuming from an older version
    /// gets the same, so the client must list again.
    pub fn expire_watches(shared: &Shared) {
        let mut f = shared.lock().unwrap();
        f.rv += 1;
        f.min_rv = f.rv;
        f.history.clear();
        let _ = f.control.send(Control::Expire);
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
    let query = req.uri().query().unwrap_or("").to_string();
    if let Some((pod, rest)) = proxied(&path) {
        let target = shared.lock().unwrap().pod_proxies.get(&pod).copied();
        return match target {
            Some(addr) if method == Method::GET => forward(addr, &rest, &query).await,
            _ => status(503, "ServiceUnavailable"),
        };
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let watch = query_param(&query, "watch") == Some("true".into());
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap();
    if method == Method::PATCH
        && let Some(name) = path
            .strip_prefix(CLUSTER_POLICIES)
            .and_then(|p| p.strip_prefix('/'))
            .and_then(|p| p.strip_suffix("/status"))
    {
        return patch_cluster_policy_status(&shared, name, &query, content_type, &body);
    }
    if path == CLUSTER_POLICIES && !shared.lock().unwrap().cluster_policies_installed {
        if !watch {
            shared.lock().unwrap().cluster_policy_lists += 1;
        }
        return status(404, "NotFound");
    }
    if watch {
        let from: u64 = query_param(&query, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut f = shared.lock().unwrap();
        f.watches += 1;
        // Subscribed under the lock that `apply` takes: no event falls between the
        // replay and the live stream.
        let stream = WatchState {
            replay: if from != 0 && from < f.min_rv {
                vec![expired(from, f.rv)].into()
            } else {
                f.history
                    .iter()
                    .filter(|(rv, p, _)| *rv > from && *p == path)
                    .map(|(_, _, l)| l.clone())
                    .collect()
            },
            end_after_replay: from != 0 && from < f.min_rv,
            live: f.events.subscribe(),
            // Node events are pushed by the test as lines.
            nodes: (path == "/api/v1/nodes").then(|| f.node_events.subscribe()),
            control: f.control.subscribe(),
            path,
            rv: f.rv,
            done: false,
        }
        .into_stream();
        drop(f);
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    let mut f = shared.lock().unwrap();
    let rv = f.rv;
    if method == Method::GET && path == CLUSTER_POLICIES {
        f.cluster_policy_lists += 1;
    } else if method == Method::GET && !path.starts_with(BLOCKS) {
        f.lists += 1;
    }
    match (method, path.as_str()) {
        (Method::GET, p) if namespaced_pods(p).is_some() => {
            let ns = namespaced_pods(p).unwrap_or_default();
            let items = f
                .items(PODS)
                .into_iter()
                .filter(|pod| pod["metadata"]["namespace"] == ns)
                .filter(|pod| selected(pod, &query))
                .collect();
            list("Pod", "v1", rv, items)
        }
        (Method::GET, "/api/v1/nodes") => {
            list("Node", "v1", rv, f.nodes.values().cloned().collect())
        }
        (Method::GET, PODS) => list("Pod", "v1", rv, f.items(PODS)),
        (Method::GET, NAMESPACES) => list("Namespace", "v1", rv, f.items(NAMESPACES)),
        (Method::GET, POLICIES) => list(
            "NetworkPolicy",
            "networking.k8s.io/v1",
            rv,
            f.items(POLICIES),
        ),
        (Method::GET, CLUSTER_POLICIES) => list(
            "ClusterNetworkPolicy",
            "policy.networking.k8s.io/v1alpha2",
            rv,
            f.items(CLUSTER_POLICIES),
        ),
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

/// Server-side apply of a ClusterNetworkPolicy's status: the applied conditions
/// replace those of the same `type` (the list is a map keyed by `type`).
fn patch_cluster_policy_status(
    shared: &Shared,
    name: &str,
    query: &str,
    content_type: String,
    body: &[u8],
) -> Response {
    let mut f = shared.lock().unwrap();
    let Ok(applied) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest");
    };
    f.status_patches.push(StatusPatch {
        name: name.to_string(),
        content_type: content_type.clone(),
        field_manager: query_param(query, "fieldManager"),
        force: query_param(query, "force") == Some("true".into()),
        body: applied.clone(),
    });
    if let Some(code) = f.status_patch_error {
        return status(code, "Refused");
    }
    if content_type != "application/apply-patch+yaml" {
        return status(415, "UnsupportedMediaType");
    }
    let key = format!("/{name}");
    let Some(mut obj) = f
        .objects
        .get(CLUSTER_POLICIES)
        .and_then(|c| c.get(&key))
        .cloned()
    else {
        return status(404, "NotFound");
    };
    let mut conditions: Vec<Value> = obj["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for new in applied["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        conditions.retain(|c| c["type"] != new["type"]);
        conditions.push(new.clone());
    }
    obj["status"] = json!({"conditions": conditions});
    f.change_locked(CLUSTER_POLICIES, &mut obj, false);
    json_response(StatusCode::OK, &obj)
}

impl Fake {
    fn items(&self, path: &str) -> Vec<Value> {
        self.objects
            .get(path)
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// `NS` of `/api/v1/namespaces/NS/pods`.
fn namespaced_pods(path: &str) -> Option<&str> {
    let ns = path
        .strip_prefix("/api/v1/namespaces/")?
        .strip_suffix("/pods")?;
    (!ns.contains('/')).then_some(ns)
}

/// `(NS/NAME:PORT, /REST)` of a pod proxy path.
fn proxied(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, rest) = rest.split_once("/pods/")?;
    let (pod, rest) = rest.split_once("/proxy")?;
    Some((
        format!("{ns}/{pod}"),
        format!("/{}", rest.trim_start_matches('/')),
    ))
}

/// Whether `pod` matches the query's `labelSelector` (comma-separated `k=v` terms)
/// and `fieldSelector` (`spec.nodeName=…` only).
fn selected(pod: &Value, query: &str) -> bool {
    let labels = query_param(query, "labelSelector").map(|s| unescape(&s));
    let fields = query_param(query, "fieldSelector").map(|s| unescape(&s));
    let terms = |s: &Option<String>| -> Vec<(String, String)> {
        s.iter()
            .flat_map(|s| s.split(','))
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    terms(&labels)
        .iter()
        .all(|(k, v)| pod["metadata"]["labels"][k] == v.as_str())
        && terms(&fields).iter().all(|(k, v)| match k.as_str() {
            "spec.nodeName" => pod["spec"]["nodeName"] == v.as_str(),
            other => panic!("the fake API server has no field selector {other}"),
        })
}

/// Percent-decoding of a query value.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The pod proxy's request to the local stand-in for the pod, its response (status,
/// headers, body) streamed back as it arrives.
async fn forward(addr: SocketAddr, path: &str, query: &str) -> Response {
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        return status(503, "ServiceUnavailable");
    };
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
    else {
        return status(503, "ServiceUnavailable");
    };
    tokio::spawn(conn);
    let uri = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    };
    let request = axum::http::Request::get(uri)
        .header(header::HOST, addr.to_string())
        .body(Body::empty())
        .unwrap();
    match sender.send_request(request).await {
        Ok(response) => response.map(Body::new),
        Err(_) => status(503, "ServiceUnavailable"),
    }
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

/// The `ERROR` watch event the API server sends for a version it no longer has.
fn expired(from: u64, now: u64) -> String {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": format!("too old resource version: {from} ({now})"),
        "reason": "Expired", "code": 410}})
    .to_string()
}

/// One watch stream: the missed events, then live ones, until a fault ends it.
struct WatchState {
    replay: std::collections::VecDeque<String>,
    end_after_replay: bool,
    live: broadcast::Receiver<(String, String)>,
    nodes: Option<broadcast::Receiver<String>>,
    control: broadcast::Receiver<Control>,
    path: String,
    rv: u64,
    done: bool,
}

impl WatchState {
    fn into_stream(self) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
        futures::stream::unfold(self, |mut w| async move {
            let line = w.next_line().await?;
            Some((Ok(Bytes::from(line + "\n")), w))
        })
    }

    async fn next_line(&mut self) -> Option<String> {
        if self.done {
            return None;
        }
        if let Some(l) = self.replay.pop_front() {
            return Some(l);
        }
        if self.end_after_replay {
            return None;
        }
        loop {
            let nodes = async {
                match self.nodes.as_mut() {
                    Some(rx) => rx.recv().await.ok(),
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                c = self.control.recv() => match c {
                    Ok(Control::Cut) | Err(broadcast::error::RecvError::Closed) => return None,
                    Ok(Control::Expire) => {
                        self.done = true;
                        return Some(expired(self.rv, self.rv + 1));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                },
                ev = self.live.recv() => match ev {
                    Ok((p, line)) if p == self.path => return Some(line),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                n = nodes => return n,
            }
        }
    }
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

/// A fake server that can be made unreachable and brought back on the same address:
/// clients talk to a TCP relay in front of the server; [`SwitchableApi::go_down`]
/// closes the relay's listener (new connections are refused) and drops every open
/// connection, [`SwitchableApi::come_back`] listens again.
pub struct SwitchableApi {
    pub addr: SocketAddr,
    pub shared: Shared,
    backend: SocketAddr,
    up: tokio::sync::watch::Sender<bool>,
}

impl SwitchableApi {
    /// Start on 127.0.0.1 from the current tokio runtime.
    pub async fn start(shared: Shared) -> SwitchableApi {
        let backend = start_local(shared.clone()).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, _) = tokio::sync::watch::channel(true);
        tokio::spawn(relay(listener, backend, up.subscribe()));
        SwitchableApi {
            addr,
            shared,
            backend,
            up,
        }
    }

    pub fn go_down(&self) {
        self.up.send_replace(false);
    }

    pub async fn come_back(&self) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        // The old listener closes when its relay task sees the signal: retry briefly.
        let mut tries = 0;
        while let Err(e) = socket.bind(self.addr) {
            tries += 1;
            assert!(tries < 100, "rebinding {}: {e}", self.addr);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let listener = socket.listen(128).unwrap();
        self.up.send_replace(true);
        tokio::spawn(relay(listener, self.backend, self.up.subscribe()));
    }
}

async fn relay(
    listener: tokio::net::TcpListener,
    backend: SocketAddr,
    mut up: tokio::sync::watch::Receiver<bool>,
) {
    let each = up.clone();
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((mut client, _)) = conn else { continue };
                let mut conn_up = each.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = conn_up.wait_for(|u| !*u) => {}
                    }
                });
            }
            _ = up.wait_for(|u| !*u) => return,
        }
    }
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
        kubeconfig(self.addr)
    }
}

/// A kubeconfig whose one context `fake` points kube clients at a fake server on
/// `addr` over plain HTTP (see [`FakeApi::kubeconfig`] for the CA it names).
pub fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
         \x20   certificate-authority-data: {UNUSED_CA_PEM_BASE64}\n\
         users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
         current-context: fake\n"
    )
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
