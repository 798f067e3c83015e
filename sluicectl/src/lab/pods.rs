//! `lab apply` and `lab delete`: objects into the lab.
//!
//! Namespaces, NetworkPolicies, ClusterNetworkPolicies and Services are written into
//! the shared manifests directory the agents watch. A new Pod is scheduled (to `spec.nodeName`, or to the
//! node with the fewest pods), gets a named namespace, is wired by exec'ing the
//! node's CNI chain (the real `sluice`) inside the node namespace, gets an echo
//! server for every declared container port, and is then written to the manifests
//! directory with `spec.nodeName` and `status.podIP`, the way the API server would
//! show it to the agents after kubelet reported the sandbox.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{Value, json};

use super::manifests::{self, Object};
use super::state::{self, LabPaths, LabState, ObjectKey, PodState, Protocol};
use super::{LabError, agents, cni, external, names, netns, serve, services};

#[derive(clap::Args)]
pub struct ApplyArgs {
    #[arg(long)]
    pub name: String,
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Delete objects a previous apply of these files made that they no longer hold.
    #[arg(long)]
    pub prune: bool,
    /// Return as soon as every CNI ADD has returned, without waiting for the agents
    /// to sync (so ADD → first connection can be timed from outside).
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(clap::Args)]
pub struct DeleteArgs {
    #[arg(long)]
    pub name: String,
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
}

/// The manifests-dir file of an object: `Kind_namespace_name.yaml` (`_` never occurs
/// in Kubernetes names, so this cannot collide).
pub fn manifest_path(paths: &LabPaths, kind: &str, namespace: &str, name: &str) -> PathBuf {
    if namespace.is_empty() {
        paths.manifests().join(format!("{kind}_{name}.yaml"))
    } else {
        paths
            .manifests()
            .join(format!("{kind}_{namespace}_{name}.yaml"))
    }
}

/// Write an object into the agents' datastore; true when the file changed (an
/// unchanged file is not rewritten, so the agents see no event).
pub fn write_manifest(
    paths: &LabPaths,
    kind: &str,
    namespace: &str,
    name: &str,
    value: &Value,
) -> Result<bool, LabError> {
    let p = manifest_path(paths, kind, namespace, name);
    let text = serde_yaml_ng::to_string(value).expect("JSON values serialize as YAML");
    if std::fs::read(&p).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(false);
    }
    state::write_atomic(&p, text.as_bytes())?;
    Ok(true)
}

fn remove_manifest(paths: &LabPaths, key: &ObjectKey) -> bool {
    std::fs::remove_file(manifest_path(paths, &key.kind, &key.namespace, &key.name)).is_ok()
}

/// A digest of what the agents act on (Pods, Namespaces, NetworkPolicies,
/// ClusterNetworkPolicies; Services are the kube-proxy stand-in's business): when it did not change, no agent will
/// sync, so there is nothing to wait for.
fn agent_view(paths: &LabPaths) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut files: Vec<PathBuf> = std::fs::read_dir(paths.manifests())
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| {
        p.file_name().and_then(|f| f.to_str()).is_some_and(|f| {
            ["Pod_", "Namespace_"]
                .iter()
                .chain(manifests::POLICY_KINDS)
                .any(|k| f.starts_with(k))
                && f.ends_with(".yaml")
        })
    });
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        h.update(f.as_os_str().as_encoded_bytes());
        h.update(std::fs::read(&f).unwrap_or_default());
    }
    h.finalize().to_vec()
}

/// The API server labels every namespace with its own name; policies select on it.
fn namespace_object(v: &Value, name: &str) -> Value {
    let mut v = v.clone();
    if !v["metadata"]["labels"].is_object() {
        v["metadata"]["labels"] = json!({});
    }
    v["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
    v
}

/// Pick a node: `spec.nodeName` if given (it must exist), else the node with the
/// fewest pods, lowest index first. Pure, for tests.
pub fn schedule(
    requested: Option<&str>,
    nodes: &[String],
    load: &BTreeMap<String, usize>,
) -> Result<String, LabError> {
    if let Some(n) = requested {
        return if nodes.iter().any(|x| x == n) {
            Ok(n.to_string())
        } else {
            Err(LabError::Usage(format!(
                "spec.nodeName {n:?} is not a lab node ({})",
                nodes.join(", ")
            )))
        };
    }
    nodes
        .iter()
        .min_by_key(|n| load.get(*n).copied().unwrap_or(0))
        .cloned()
        .ok_or_else(|| LabError::Usage("the lab has no nodes".into()))
}

fn pod_object(o: &Object, pod: &PodState, host_ip: std::net::Ipv4Addr) -> Value {
    let mut v = o.value.clone();
    v["metadata"]["namespace"] = json!(pod.namespace);
    v["metadata"]["uid"] = json!(pod.uid);
    v["spec"]["nodeName"] = json!(pod.node);
    v["status"] = json!({
        "phase": "Running",
        "hostIP": host_ip.to_string(),
        "podIP": pod.ip.to_string(),
        "podIPs": [{"ip": pod.ip.to_string()}],
    });
    v
}

/// A scheduled pod as the API server shows it before kubelet reports the sandbox:
/// on its node, annotations and labels known, no address yet. Written before ADD, so
/// the agent can answer the plugin's annotation lookup and enforce from its report.
fn scheduled_pod_object(o: &Object, node: &str) -> Value {
    let mut v = o.value.clone();
    v["metadata"]["namespace"] = json!(o.key.namespace);
    v["spec"]["nodeName"] = json!(node);
    v["status"] = json!({"phase": "Pending"});
    v
}

/// Schedule the new pods and write them as scheduled; returns pod key → node.
fn schedule_new_pods(
    st: &LabState,
    paths: &LabPaths,
    objects: &[Object],
) -> Result<BTreeMap<String, String>, LabError> {
    let node_names: Vec<String> = st.nodes.iter().map(|n| n.name.clone()).collect();
    let mut load = BTreeMap::new();
    for p in st.pods.values() {
        *load.entry(p.node.clone()).or_insert(0) += 1;
    }
    let mut placed = BTreeMap::new();
    for o in objects.iter().filter(|o| o.key.kind == "Pod") {
        let key = format!("{}/{}", o.key.namespace, o.key.name);
        if st.pods.contains_key(&key) {
            continue;
        }
        if o.value["spec"]["hostNetwork"].as_bool() == Some(true) {
            return Err(LabError::Usage(format!(
                "pod {key}: hostNetwork pods are not supported by the lab"
            )));
        }
        let node = schedule(o.value["spec"]["nodeName"].as_str(), &node_names, &load)?;
        *load.entry(node.clone()).or_insert(0) += 1;
        write_manifest(
            paths,
            "Pod",
            &o.key.namespace,
            &o.key.name,
            &scheduled_pod_object(o, &node),
        )?;
        placed.insert(key, node);
    }
    Ok(placed)
}

/// Wait (bounded) until each node's agent knows its scheduled pods, as kubelet's
/// node has the pod in its cache before it asks for a sandbox.
fn wait_known(st: &LabState, placed: &BTreeMap<String, String>, timeout: std::time::Duration) {
    use sluice_node_files::local_api::{Request, Response, call};
    let deadline = std::time::Instant::now() + timeout;
    for (key, node) in placed {
        let Some(n) = st.node(node) else { continue };
        // A node whose agent is down has nobody to ask: its pods start anyway.
        if !n.agent_pid.is_some_and(netns::alive) {
            continue;
        }
        let socket = sluice_node_files::paths::NodePaths::under(&n.root).agent_socket;
        let (ns, name) = key.split_once('/').expect("ns/name");
        let req = Request::PodAnnotations {
            namespace: ns.into(),
            name: name.into(),
        };
        loop {
            if let Ok(Response::Annotations { known: true, .. }) =
                call(&socket, &req, std::time::Duration::from_millis(200))
            {
                break;
            }
            if std::time::Instant::now() >= deadline {
                eprintln!(
                    "note: the agent on {node} did not learn of pod {key} in time; its ADD proceeds without it"
                );
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn create_pod(
    st: &mut LabState,
    paths: &LabPaths,
    o: &Object,
    node_name: String,
) -> Result<(), LabError> {
    let v = &o.value;
    let (ns, name) = (o.key.namespace.clone(), o.key.name.clone());
    let ports = manifests::pod_ports(v, &o.source)?;
    let node = st
        .node(&node_name)
        .expect("scheduled to a lab node")
        .clone();
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let uid = v["metadata"]["uid"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| names::pod_uid(&st.name, &ns, &name, nonce));
    let pod_ns = names::pod_netns(&st.name, &ns, &name);
    let cid = names::container_id(&st.name, &ns, &name, &uid);
    netns::add(&pod_ns)?;
    let netns_path = netns::path(&pod_ns);
    let sctp = serve::sctp_supported();
    let (served, unserved): (Vec<_>, Vec<_>) = ports
        .iter()
        .cloned()
        .partition(|p| p.protocol != Protocol::Sctp || sctp);
    for p in &unserved {
        eprintln!(
            "note: pod {ns}/{name} declares SCTP {}; this kernel has no SCTP sockets, so it is not served (probes to it are errors)",
            p.port
        );
    }
    // The echo server listens before ADD (sockets bind in a namespace without its
    // interface): the first connection after ADD then waits on the network alone,
    // not on the lab starting a process, so ADD → first connection measures sluice.
    let server_pid = if served.is_empty() {
        None
    } else {
        match serve::spawn(&pod_ns, &served, paths, &pod_ns) {
            Ok(pid) => Some(pid),
            Err(e) => {
                let _ = netns::delete(&pod_ns);
                remove_manifest(paths, &o.key);
                return Err(e);
            }
        }
    };
    let undo = |e: LabError| {
        if let Some(pid) = server_pid {
            netns::kill_pid(pid);
        }
        let _ = netns::delete(&pod_ns);
        remove_manifest(paths, &o.key);
        e
    };
    let sb = cni::Sandbox {
        namespace: &ns,
        name: &name,
        uid: &uid,
        container_id: &cid,
        netns_path: &netns_path,
    };
    let result = cni::add(&node, &sb).map_err(undo)?;
    let Some(ip) = cni::result_ipv4(&result) else {
        let _ = cni::del(&node, &sb);
        return Err(undo(LabError::Cni {
            command: "ADD".into(),
            pod: format!("{ns}/{name}"),
            message: format!("result has no IPv4 address: {result}"),
        }));
    };
    let pod = PodState {
        namespace: ns.clone(),
        name: name.clone(),
        uid,
        node: node_name.clone(),
        netns: pod_ns.clone(),
        container_id: cid,
        ip,
        ports: served,
        labels: manifests::labels(v),
        server_pid,
        unserved,
        extra_servers: Vec::new(),
    };
    // Recorded before anything else so a failure below is still cleaned up.
    st.pods.insert(pod.key(), pod.clone());
    state::save(st)?;
    external::route_pod(st, ip, node.uplink_ip)?;
    write_manifest(
        paths,
        "Pod",
        &ns,
        &name,
        &pod_object(o, &pod, node.uplink_ip),
    )?;
    println!("pod/{ns}/{name} created on {node_name} with {ip} (netns {pod_ns})");
    Ok(())
}

/// Re-apply of an existing pod: labels (and served ports) change in place, the
/// sandbox stays, as with `kubectl apply` of a label change.
fn update_pod(st: &mut LabState, paths: &LabPaths, o: &Object) -> Result<(), LabError> {
    let key = format!("{}/{}", o.key.namespace, o.key.name);
    let mut pod = st.pods[&key].clone();
    pod.labels = manifests::labels(&o.value);
    let ports = manifests::pod_ports(&o.value, &o.source)?;
    let sctp = serve::sctp_supported();
    let (served, unserved): (Vec<_>, Vec<_>) = ports
        .into_iter()
        .partition(|p| p.protocol != Protocol::Sctp || sctp);
    if served != pod.ports {
        if let Some(pid) = pod.server_pid.take() {
            netns::kill_pid(pid);
        }
        if !served.is_empty() {
            pod.server_pid = Some(serve::spawn(&pod.netns, &served, paths, &pod.netns)?);
        }
        pod.ports = served;
    }
    pod.unserved = unserved;
    let host_ip = st.node(&pod.node).map(|n| n.uplink_ip).expect("pod's node");
    write_manifest(
        paths,
        "Pod",
        &pod.namespace,
        &pod.name,
        &pod_object(o, &pod, host_ip),
    )?;
    st.pods.insert(key, pod);
    state::save(st)
}

/// Remove a pod: stop its server, CNI DEL through the chain, delete its namespace.
pub fn delete_pod(st: &mut LabState, paths: &LabPaths, key: &str) -> Result<(), LabError> {
    let Some(pod) = st.pods.get(key).cloned() else {
        return Ok(());
    };
    let mut errors = Vec::new();
    for pid in pod
        .server_pid
        .iter()
        .chain(pod.extra_servers.iter().map(|s| &s.pid))
    {
        netns::kill_pid(*pid);
    }
    // The agent sees the pod go first (as it would when the API object is deleted).
    remove_manifest(
        paths,
        &ObjectKey {
            kind: "Pod".into(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        },
    );
    if let Some(node) = st.node(&pod.node).cloned() {
        let netns_path = netns::path(&pod.netns);
        let sb = cni::Sandbox {
            namespace: &pod.namespace,
            name: &pod.name,
            uid: &pod.uid,
            container_id: &pod.container_id,
            netns_path: &netns_path,
        };
        if let Err(e) = cni::del(&node, &sb) {
            errors.push(e.to_string());
        }
    }
    let _ = external::unroute_pod(st, pod.ip);
    if let Err(e) = netns::delete(&pod.netns) {
        errors.push(e.to_string());
    }
    st.pods.remove(key);
    state::save(st)?;
    println!("pod/{key} deleted");
    if errors.is_empty() {
        Ok(())
    } else {
        Err(LabError::Teardown(errors))
    }
}

fn delete_object(st: &mut LabState, paths: &LabPaths, key: &ObjectKey) -> Result<(), LabError> {
    match key.kind.as_str() {
        "Pod" => delete_pod(st, paths, &format!("{}/{}", key.namespace, key.name)),
        _ => {
            remove_manifest(paths, key);
            println!("{} deleted", key.to_string().to_lowercase());
            Ok(())
        }
    }
}

pub fn apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let paths = LabPaths::new(&args.name);
    let _lock = state::lock(&paths)?;
    let mut st = state::load(&args.name)?;
    let objects = manifests::load(&args.files)?;
    let syncs_before = st
        .agents
        .then(|| (agent_view(&paths), agents::sync_counts(&st)));
    // Validate every Service before changing anything.
    for o in objects.iter().filter(|o| o.key.kind == "Service") {
        manifests::service_node_ports(o)?;
    }

    // Namespaces: declared ones, plus any that pods or policies live in (the API
    // server would refuse those objects; the lab makes the namespace instead).
    let mut namespaces: BTreeSet<String> = BTreeSet::new();
    for o in &objects {
        if o.key.kind == "Namespace" {
            write_manifest(
                &paths,
                "Namespace",
                "",
                &o.key.name,
                &namespace_object(&o.value, &o.key.name),
            )?;
            namespaces.insert(o.key.name.clone());
        }
    }
    for o in &objects {
        let ns = &o.key.namespace;
        if !ns.is_empty()
            && !namespaces.contains(ns)
            && !manifest_path(&paths, "Namespace", "", ns).exists()
        {
            let v = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            write_manifest(&paths, "Namespace", "", ns, &namespace_object(&v, ns))?;
            namespaces.insert(ns.clone());
        }
    }
    // Policies before pods, so a new pod's policy is already known to its agent.
    for o in objects.iter().filter(|o| {
        manifests::POLICY_KINDS.contains(&o.key.kind.as_str()) || o.key.kind == "Service"
    }) {
        write_manifest(&paths, &o.key.kind, &o.key.namespace, &o.key.name, &o.value)?;
        println!("{} configured", o.key.to_string().to_lowercase());
    }
    let mut placed = schedule_new_pods(&st, &paths, &objects)?;
    if st.agents {
        wait_known(&st, &placed, std::time::Duration::from_secs(5));
    }
    for o in objects.iter().filter(|o| o.key.kind == "Pod") {
        let key = format!("{}/{}", o.key.namespace, o.key.name);
        if let Some(node) = placed.remove(&key) {
            if let Err(e) = create_pod(&mut st, &paths, o, node) {
                // The pods not created yet leave nothing behind either.
                for k in placed.keys() {
                    if let Some(p) = objects.iter().find(|x| {
                        x.key.kind == "Pod" && format!("{}/{}", x.key.namespace, x.key.name) == *k
                    }) {
                        remove_manifest(&paths, &p.key);
                    }
                }
                return Err(e.into());
            }
        } else {
            update_pod(&mut st, &paths, o)?;
            println!("pod/{key} configured");
        }
    }

    // What each file applied, for the next `--prune`.
    let mut by_source: BTreeMap<String, Vec<ObjectKey>> = BTreeMap::new();
    for o in &objects {
        by_source
            .entry(o.source.clone())
            .or_default()
            .push(o.key.clone());
    }
    // Without --prune, objects a file no longer holds stay, and stay remembered
    // as the file's, so a later `--prune` still finds them.
    for (source, keys) in by_source {
        let old = st.applied.remove(&source).unwrap_or_default();
        let now: BTreeSet<ObjectKey> = keys.into_iter().collect();
        let mut kept = now.clone();
        for k in old.into_iter().filter(|k| !now.contains(k)) {
            if args.prune {
                delete_object(&mut st, &paths, &k)?;
            } else {
                kept.insert(k);
            }
        }
        st.applied.insert(source, kept.into_iter().collect());
    }
    state::save(&st)?;
    services::sync(&st, &paths)?;
    if !args.no_wait {
        settle(&st, &paths, syncs_before);
    }
    Ok(ExitCode::SUCCESS)
}

/// Give the agents the chance to program what was just written, so probes right
/// after `apply` see the new policy.
fn settle(st: &LabState, paths: &LabPaths, before: Option<(Vec<u8>, Vec<f64>)>) {
    let Some((view, counts)) = before else { return };
    if agent_view(paths) == view {
        return;
    }
    if !agents::wait_synced(st, &counts, std::time::Duration::from_secs(10)) {
        eprintln!(
            "note: not every agent reported a sync within 10 s; probes may see the old state"
        );
    }
}

pub fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let paths = LabPaths::new(&args.name);
    let _lock = state::lock(&paths)?;
    let mut st = state::load(&args.name)?;
    let objects = manifests::load(&args.files)?;
    let syncs_before = st
        .agents
        .then(|| (agent_view(&paths), agents::sync_counts(&st)));
    let mut errors = Vec::new();
    // Pods first, namespaces last: the reverse of creation.
    let rank = |k: &str| match k {
        "Pod" => 0,
        "Service" => 1,
        "NetworkPolicy" | "ClusterNetworkPolicy" => 2,
        _ => 3,
    };
    let mut keys: Vec<&ObjectKey> = objects.iter().map(|o| &o.key).collect();
    keys.sort_by_key(|k| rank(&k.kind));
    for k in keys {
        if let Err(e) = delete_object(&mut st, &paths, k) {
            errors.push(e.to_string());
        }
        for v in st.applied.values_mut() {
            v.retain(|x| x != k);
        }
    }
    state::save(&st)?;
    services::sync(&st, &paths)?;
    settle(&st, &paths, syncs_before);
    if errors.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(LabError::Teardown(errors).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_go_to_their_node_name_or_to_the_least_loaded_node() {
        let nodes = vec!["node-1".to_string(), "node-2".to_string()];
        let mut load = BTreeMap::new();
        assert_eq!(schedule(None, &nodes, &load).unwrap(), "node-1");
        load.insert("node-1".to_string(), 1);
        assert_eq!(schedule(None, &nodes, &load).unwrap(), "node-2");
        assert_eq!(schedule(Some("node-1"), &nodes, &load).unwrap(), "node-1");
        assert!(schedule(Some("node-9"), &nodes, &load).is_err());
    }

    #[test]
    fn namespaces_get_the_name_label_the_api_server_adds() {
        let v = namespace_object(
            &json!({"kind": "Namespace", "metadata": {"name": "foo", "labels": {"region": "a"}}}),
            "foo",
        );
        assert_eq!(
            v["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "foo"
        );
        assert_eq!(v["metadata"]["labels"]["region"], "a");
    }

    #[test]
    fn manifest_file_names_cannot_collide_across_namespaces() {
        let p = LabPaths::new("t");
        assert_ne!(
            manifest_path(&p, "Pod", "a-b", "c"),
            manifest_path(&p, "Pod", "a", "b-c")
        );
    }
}
