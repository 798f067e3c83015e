//! sluicectl against a live cluster: the built binary talks to the fake API server
//! (real HTTP/JSON wire format, lists as the API server writes them, the pod proxy)
//! through a kubeconfig found as kubectl finds it.
//!
//! - `policy check` and `policy render` without `-f` read the same objects the
//!   fixture files hold and print the very same bytes;
//! - `flows --node` finds the agent pod on the node and streams its `/flows` through
//!   the pod proxy, to a local server playing the agent.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use sluice_node_files::flows::FlowRecord;
use sluice_testkit::fake_kube::{self, CLUSTER_POLICIES, Fake, NAMESPACES, PODS, POLICIES, Shared};

/// The fixture: NetworkPolicy and ClusterNetworkPolicy scenarios of the policy crate,
/// and unabridged `kubectl get -o yaml|json` output (a Node, full pod status).
const FIXTURE: [&str; 3] = [
    "cnp-cluster",
    "cnp-integration-2-admin-pass-to-networkpolicy",
    "kubectl-shapes",
];

fn data(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policy/tests/data")
        .join(dir)
}

/// Every object in the fixture directories' files, `kind: List` expanded.
fn fixture_objects(dirs: &[&str]) -> Vec<Value> {
    let mut out = Vec::new();
    for dir in dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(data(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let docs: Vec<Value> = if file.extension().is_some_and(|e| e == "json") {
                vec![serde_json::from_str(&text).unwrap()]
            } else {
                serde_yaml_ng::Deserializer::from_str(&text)
                    .map(|d| serde::Deserialize::deserialize(d).unwrap())
                    .collect()
            };
            for doc in docs {
                match doc["kind"].as_str() {
                    Some("List") => out.extend(doc["items"].as_array().unwrap().iter().cloned()),
                    Some(_) => out.push(doc),
                    None => {}
                }
            }
        }
    }
    out
}

/// A fake API server holding `objects` (as list items: no kind or apiVersion of
/// their own, as the API server writes them), on its own runtime.
struct Cluster {
    shared: Shared,
    addr: SocketAddr,
    rt: tokio::runtime::Runtime,
}

impl Cluster {
    fn start(objects: &[Value], with_cluster_policy_crd: bool) -> Cluster {
        let shared = Fake::with_nodes(&[]);
        shared.lock().unwrap().cluster_policies_installed = with_cluster_policy_crd;
        for o in objects {
            let path = match o["kind"].as_str().unwrap() {
                "Namespace" => NAMESPACES,
                "Pod" => PODS,
                "NetworkPolicy" => POLICIES,
                "ClusterNetworkPolicy" if with_cluster_policy_crd => CLUSTER_POLICIES,
                "Node" => {
                    let name = o["metadata"]["name"].as_str().unwrap().to_string();
                    shared.lock().unwrap().nodes.insert(name, item(o));
                    continue;
                }
                _ => continue,
            };
            Fake::apply(&shared, path, item(o));
        }
        let rt = tokio::runtime::Runtime::new().unwrap();
        let addr = rt.block_on(fake_kube::start_local(shared.clone()));
        Cluster { shared, addr, rt }
    }
}

fn item(o: &Value) -> Value {
    let mut o = o.clone();
    let m = o.as_object_mut().unwrap();
    m.remove("kind");
    m.remove("apiVersion");
    o
}

/// A scratch directory: an empty HOME, and kubeconfig files.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Scratch {
        Scratch(tempfile::tempdir().unwrap())
    }
    fn home(&self) -> PathBuf {
        self.0.path().join("home")
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// sluicectl with `env` and nothing of the caller's kubeconfig, home or in-cluster
/// environment.
fn sluicectl(args: &[&str], env: &[(&str, OsString)], home: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluicectl"));
    cmd.args(args)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("HOME", home);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What each comparison runs, after the source arguments.
fn commands(probes: &Path) -> Vec<Vec<String>> {
    let gry = "network-policy-conformance-gryffindor";
    let sly = "network-policy-conformance-slytherin";
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        s(&[
            "policy",
            "check",
            "--from",
            &format!("{gry}/harry-potter-0"),
            "--to",
            &format!("{gry}/harry-potter-1"),
            "--port",
            "80",
        ]),
        s(&[
            "policy",
            "check",
            "--from",
            &format!("{sly}/draco-malfoy-0"),
            "--to",
            &format!("{gry}/harry-potter-1"),
            "--port",
            "53",
            "--protocol",
            "UDP",
            "-o",
            "json",
        ]),
        s(&[
            "policy",
            "check",
            "--probes",
            probes.to_str().unwrap(),
            "-o",
            "json",
        ]),
        s(&["policy", "render", "--node", "n1"]),
        s(&[
            "policy",
            "render",
            "--node",
            "n1",
            "--dataplane",
            "nftables",
        ]),
        s(&["policy", "render", "--node", "worker-1"]),
    ]
}

const PROBES: &str = r#"{"from": "network-policy-conformance-gryffindor/harry-potter-0", "to": "network-policy-conformance-slytherin/draco-malfoy-1", "port": 8080}
{"from": "network-policy-conformance-slytherin/draco-malfoy-1", "to": "network-policy-conformance-gryffindor/harry-potter-0", "port": 9003, "protocol": "SCTP"}
{"from": "ip:192.0.2.10", "to": "shop/web-7c9d8f6b5-x2x9k", "port": 8080}
{"from": "node:worker-1", "to": "shop/web-7c9d8f6b5-x2x9k", "port": 9090}
"#;

/// Runs every command with `-f` on `dirs` and against `cluster`, and asserts the
/// same exit status and the same stdout, byte for byte; returns the live stdouts and
/// stderrs.
fn assert_same_output(dirs: &[&str], cluster: &Cluster) -> Vec<(String, String)> {
    let scratch = Scratch::new();
    let probes = scratch.write("probes.jsonl", PROBES);
    let kubeconfig = scratch.write("kubeconfig", &fake_kube::kubeconfig(cluster.addr));
    let env = [("KUBECONFIG", kubeconfig.into_os_string())];
    let mut stderrs = Vec::new();
    for command in commands(&probes) {
        let mut from_files: Vec<String> = command.clone();
        for d in dirs {
            from_files.extend(["-f".to_string(), data(d).display().to_string()]);
        }
        let files = sluicectl(&args(&from_files), &[], &scratch.home());
        let live = sluicectl(&args(&command), &env, &scratch.home());
        let text = ok(&files);
        assert!(!text.is_empty(), "{command:?} printed nothing");
        assert_eq!(
            ok(&live),
            text,
            "{command:?}: live output differs from -f\nlive stderr:\n{}",
            stderr(&live)
        );
        stderrs.push((text, stderr(&live)));
    }
    stderrs
}

#[test]
fn policy_check_and_render_print_the_same_bytes_from_the_live_cluster_as_from_its_files() {
    let cluster = Cluster::start(&fixture_objects(&FIXTURE), true);
    let outputs = assert_same_output(&FIXTURE, &cluster);
    assert!(
        outputs
            .iter()
            .all(|(_, e)| !e.contains("ClusterNetworkPolicy CRD")),
        "{outputs:?}"
    );
    // The ClusterNetworkPolicies took part: the UDP check passed through one.
    assert!(outputs[1].0.contains("pass-example"), "{}", outputs[1].0);
    // Every collection was read from the API server (and nothing was watched).
    let f = cluster.shared.lock().unwrap();
    assert!(f.lists >= 5, "lists: {}", f.lists);
    assert_eq!(f.watches, 0);
}

#[test]
fn a_cluster_without_the_cluster_network_policy_crd_has_none_and_stderr_says_so() {
    // The fixture minus its ClusterNetworkPolicies, in files and in the cluster.
    let objects: Vec<Value> = fixture_objects(&FIXTURE)
        .into_iter()
        .filter(|o| o["kind"] != "ClusterNetworkPolicy")
        .collect();
    let scratch = Scratch::new();
    let mut text = String::new();
    for o in &objects {
        text.push_str(&serde_yaml_ng::to_string(o).unwrap());
        text.push_str("---\n");
    }
    let file = scratch.write("no-cnp/all.yaml", &text);
    let cluster = Cluster::start(&objects, false);
    let dir = file.parent().unwrap().to_str().unwrap().to_string();
    // `data(dir)` of an absolute path is that path.
    let outputs = assert_same_output(&[dir.as_str()], &cluster);
    assert!(!outputs[1].0.contains("pass-example"), "{}", outputs[1].0);
    for (_, e) in &outputs {
        assert!(
            e.contains("ClusterNetworkPolicy CRD is not installed")
                && e.contains("clusternetworkpolicies"),
            "{e}"
        );
    }
}

/// A kubeconfig with two contexts: `dead` (current) pointing at a closed port, and
/// `live` at `addr`.
fn two_contexts(addr: SocketAddr) -> String {
    let live = fake_kube::kubeconfig(addr)
        .replace("name: fake", "name: live")
        .replace("cluster: fake", "cluster: live")
        .replace("user: fake", "user: live")
        .replace("current-context: fake", "current-context: dead");
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    live.replace(
        "contexts:\n",
        "contexts:\n- name: dead\n  context:\n    cluster: dead\n    user: live\n",
    )
    .replace(
        "clusters:\n",
        &format!("clusters:\n- name: dead\n  cluster:\n    server: http://127.0.0.1:{dead_port}\n"),
    )
}

const CHECK: [&str; 8] = [
    "policy",
    "check",
    "--from",
    "ip:192.0.2.10",
    "--to",
    "shop/web-7c9d8f6b5-x2x9k",
    "--port",
    "8080",
];

#[test]
fn the_kubeconfig_is_found_as_kubectl_finds_it() {
    let cluster = Cluster::start(&fixture_objects(&["kubectl-shapes"]), true);
    let scratch = Scratch::new();
    let good = fake_kube::kubeconfig(cluster.addr);
    let expected = ok(&sluicectl(
        &[
            &CHECK[..],
            &["-f", data("kubectl-shapes").to_str().unwrap()],
        ]
        .concat(),
        &[],
        &scratch.home(),
    ));

    // ~/.kube/config when KUBECONFIG is unset.
    let home = scratch.0.path().join("h1");
    scratch.write("h1/.kube/config", &good);
    assert_eq!(ok(&sluicectl(&CHECK, &[], &home)), expected);

    // KUBECONFIG is a list: missing files are skipped, the first file to set
    // current-context wins, and ~/.kube/config is not read.
    let first = scratch.write("first", &good);
    let second = scratch.write("second", &two_contexts(cluster.addr));
    let list = std::env::join_paths([scratch.0.path().join("missing"), first, second]).unwrap();
    scratch.write("h2/.kube/config", "this is not a kubeconfig: [");
    let out = sluicectl(
        &CHECK,
        &[("KUBECONFIG", list)],
        &scratch.0.path().join("h2"),
    );
    assert_eq!(ok(&out), expected);

    // --kubeconfig is the only file read: KUBECONFIG naming a broken file is ignored.
    let broken = scratch.write("broken", "this is not a kubeconfig: [");
    let only = scratch.write("only", &good);
    let out = sluicectl(
        &[&CHECK[..], &["--kubeconfig", only.to_str().unwrap()]].concat(),
        &[("KUBECONFIG", broken.clone().into_os_string())],
        &home,
    );
    assert_eq!(ok(&out), expected);

    // And that broken file, when it is what KUBECONFIG names, is an error naming it.
    let out = sluicectl(&CHECK, &[("KUBECONFIG", broken.into_os_string())], &home);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("broken"), "{}", stderr(&out));
}

#[test]
fn context_picks_a_context_that_is_not_the_current_one() {
    let cluster = Cluster::start(&fixture_objects(&["kubectl-shapes"]), true);
    let scratch = Scratch::new();
    let config = scratch.write("config", &two_contexts(cluster.addr));
    let kc = config.to_str().unwrap();

    // The current context's server is down.
    let out = sluicectl(
        &[&CHECK[..], &["--kubeconfig", kc]].concat(),
        &[],
        &scratch.home(),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/api/v1/namespaces"),
        "{}",
        stderr(&out)
    );

    let out = sluicectl(
        &[&CHECK[..], &["--kubeconfig", kc, "--context", "live"]].concat(),
        &[],
        &scratch.home(),
    );
    assert!(!ok(&out).is_empty());

    // The same through KUBECONFIG.
    let out = sluicectl(
        &[&CHECK[..], &["--context", "live"]].concat(),
        &[("KUBECONFIG", config.clone().into_os_string())],
        &scratch.home(),
    );
    ok(&out);

    let out = sluicectl(
        &[&CHECK[..], &["--kubeconfig", kc, "--context", "nope"]].concat(),
        &[],
        &scratch.home(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
}

#[test]
fn without_any_kubeconfig_outside_a_cluster_the_error_says_what_to_give() {
    let scratch = Scratch::new();
    let out = sluicectl(&CHECK, &[], &scratch.home());
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("--kubeconfig") && e.contains("-f"), "{e}");

    // Files and a cluster at once is a mistake, not a choice made silently.
    let out = sluicectl(
        &[
            &CHECK[..],
            &[
                "-f",
                data("kubectl-shapes").to_str().unwrap(),
                "--context",
                "x",
            ],
        ]
        .concat(),
        &[],
        &scratch.home(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("-f"), "{}", stderr(&out));
}

// ---- flows --node ----

fn agent_pod(name: &str, node: &str, phase: &str, created: &str, deleting: bool) -> Value {
    let mut p = json!({
        "metadata": {"name": name, "namespace": "kube-system", "creationTimestamp": created,
                     "labels": {"app.kubernetes.io/name": "sluice",
                                "app.kubernetes.io/component": "agent",
                                "controller-revision-hash": "6d5f8b7c9"}},
        "spec": {"nodeName": node, "hostNetwork": true,
                 "containers": [{"name": "sluice-agent",
                                 "ports": [{"name": "health", "containerPort": 9099}]}]},
        "status": {"phase": phase, "podIP": "192.0.2.11"}});
    if deleting {
        p["metadata"]["deletionTimestamp"] = json!("2026-12-06T10:00:00Z");
    }
    p
}

fn record(n: u16) -> FlowRecord {
    FlowRecord {
        time: format!("2026-12-06T10:15:0{n}.123Z"),
        node: "node-1".into(),
        verdict: "deny".into(),
        direction: "ingress".into(),
        src: "other/intruder".into(),
        dst: "shop/db".into(),
        protocol: "TCP".into(),
        port: 5432,
        reason: "isolated".into(),
        policies: vec!["shop/default-deny".into(), "shop/db-from-api".into()],
    }
}

/// A local server playing the agent's `/flows`: records the queries it gets and
/// answers NDJSON lines taken from a channel until it closes.
struct FakeAgent {
    addr: SocketAddr,
    queries: Arc<Mutex<Vec<String>>>,
    lines: Arc<Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>>,
}

impl FakeAgent {
    fn start(
        rt: &tokio::runtime::Runtime,
    ) -> (FakeAgent, tokio::sync::mpsc::UnboundedSender<String>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::new(Mutex::new(Some(rx)));
        let (q, l) = (queries.clone(), lines.clone());
        let app = axum::Router::new().route(
            "/flows",
            axum::routing::get(move |uri: axum::http::Uri| {
                let (q, l) = (q.clone(), l.clone());
                async move {
                    q.lock()
                        .unwrap()
                        .push(uri.query().unwrap_or("").to_string());
                    let rx = l.lock().unwrap().take().expect("one /flows request");
                    let body = futures::stream::unfold(rx, |mut rx| async move {
                        let line = rx.recv().await?;
                        Some((Ok::<_, std::io::Error>(line + "\n"), rx))
                    });
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
                        axum::body::Body::from_stream(body),
                    )
                }
            }),
        );
        let addr = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            addr
        });
        (
            FakeAgent {
                addr,
                queries,
                lines,
            },
            tx,
        )
    }
}

/// A cluster with agent pods on node-1 (a running one, and an older one being
/// deleted) and node-2, node-1's running pod proxied to a fake agent.
fn flows_cluster() -> (
    Cluster,
    FakeAgent,
    tokio::sync::mpsc::UnboundedSender<String>,
) {
    let pods = [
        agent_pod(
            "sluice-agent-old11",
            "node-1",
            "Running",
            "2026-12-01T08:00:00Z",
            true,
        ),
        agent_pod(
            "sluice-agent-x7k2p",
            "node-1",
            "Running",
            "2026-12-05T08:00:00Z",
            false,
        ),
        agent_pod(
            "sluice-agent-q9w4z",
            "node-2",
            "Running",
            "2026-12-05T08:00:00Z",
            false,
        ),
    ];
    let objects: Vec<Value> = pods
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p["kind"] = json!("Pod");
            p
        })
        .collect();
    let cluster = Cluster::start(&objects, false);
    let (agent, tx) = FakeAgent::start(&cluster.rt);
    let mut proxies = BTreeMap::new();
    proxies.insert(
        "kube-system/sluice-agent-x7k2p:9099".to_string(),
        agent.addr,
    );
    cluster.shared.lock().unwrap().pod_proxies = proxies;
    (cluster, agent, tx)
}

#[test]
fn flows_node_reads_the_agent_pods_records_through_the_pod_proxy() {
    let (cluster, agent, tx) = flows_cluster();
    let scratch = Scratch::new();
    let kubeconfig = scratch.write("kubeconfig", &fake_kube::kubeconfig(cluster.addr));
    for n in 1..=2 {
        tx.send(serde_json::to_string(&record(n)).unwrap()).unwrap();
    }
    drop(tx);
    let out = sluicectl(
        &[
            "flows",
            "--node",
            "node-1",
            "--denied",
            "--namespace",
            "shop",
            "-o",
            "json",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ],
        &[],
        &scratch.home(),
    );
    let text = ok(&out);
    let lines: Vec<FlowRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, vec![record(1), record(2)]);
    assert_eq!(
        *agent.queries.lock().unwrap(),
        vec!["denied=1&namespace=shop".to_string()]
    );
    assert!(agent.lines.lock().unwrap().is_none());
}

#[test]
fn flows_text_output_is_one_line_per_record() {
    let (cluster, _agent, tx) = flows_cluster();
    let scratch = Scratch::new();
    let kubeconfig = scratch.write("kubeconfig", &fake_kube::kubeconfig(cluster.addr));
    tx.send(serde_json::to_string(&record(1)).unwrap()).unwrap();
    drop(tx);
    let out = sluicectl(
        &["flows", "--node", "node-1"],
        &[("KUBECONFIG", kubeconfig.into_os_string())],
        &scratch.home(),
    );
    assert_eq!(ok(&out), format!("{}\n", record(1).text()));
}

#[test]
fn flows_follow_prints_each_record_as_the_agent_sends_it() {
    let (cluster, agent, tx) = flows_cluster();
    let scratch = Scratch::new();
    let kubeconfig = scratch.write("kubeconfig", &fake_kube::kubeconfig(cluster.addr));
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluicectl"))
        .args(["flows", "--node", "node-1", "--follow", "-o", "json"])
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", scratch.home())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    for n in 1..=3 {
        // The agent sends the next record only once sluicectl printed the last: the
        // response is still open, so only streaming gets each one out.
        tx.send(serde_json::to_string(&record(n)).unwrap()).unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(
            serde_json::from_str::<FlowRecord>(&line).unwrap(),
            record(n),
            "{line}"
        );
    }
    drop(tx);
    let status = child.wait().unwrap();
    assert!(status.success());
    assert_eq!(*agent.queries.lock().unwrap(), vec!["follow=1".to_string()]);
}

#[test]
fn flows_for_a_node_without_an_agent_pod_says_what_to_check() {
    let (cluster, _agent, _tx) = flows_cluster();
    let scratch = Scratch::new();
    let kubeconfig = scratch.write("kubeconfig", &fake_kube::kubeconfig(cluster.addr));
    let out = sluicectl(
        &["flows", "--node", "node-9"],
        &[("KUBECONFIG", kubeconfig.clone().into_os_string())],
        &scratch.home(),
    );
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("no sluice agent pod on node \"node-9\"") && e.contains("kube-system"),
        "{e}"
    );

    // node-2's agent pod exists but nothing answers behind it: the proxy's error.
    let out = sluicectl(
        &["flows", "--node", "node-2"],
        &[("KUBECONFIG", kubeconfig.into_os_string())],
        &scratch.home(),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("sluice-agent-q9w4z:9099/proxy/flows"),
        "{}",
        stderr(&out)
    );
}
