//! Reading the manifests `lab apply` takes: YAML or JSON files or directories of them,
//! multi-document, `List` objects unwrapped, exactly what `kubectl get -o yaml` writes.
//! The text is split by the policy crate's reader ([`sluice_policy::split_documents`],
//! the same the agent and `sluicectl policy check` use).
//!
//! The lab needs the objects whole (it writes them back into the agents' datastore),
//! so it keeps each as JSON and reads out only the few fields it acts on: a pod's
//! node and ports, a Service's selector and NodePorts. The meaning of policies is
//! `sluice_policy`'s business; the lab never interprets them (a malformed policy is
//! written through, and the agents hold the pods it selects).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::LabError;
use super::state::{DeclaredPort, ObjectKey, Protocol};

/// Kinds the lab acts on; `Node` is accepted and ignored (the lab makes its own).
pub const KINDS: &[&str] = &[
    "Namespace",
    "Pod",
    "NetworkPolicy",
    "ClusterNetworkPolicy",
    "Service",
];

/// Kinds without a namespace: their key's namespace is empty.
const CLUSTER_SCOPED: &[&str] = &["Namespace", "ClusterNetworkPolicy"];

#[derive(Debug, Clone)]
pub struct Object {
    pub key: ObjectKey,
    /// The file it came from (canonical path), for `--prune` and error messages.
    pub source: String,
    pub value: Value,
}

/// Every object in `paths`, in file order (directories sorted by name).
pub fn load(paths: &[PathBuf]) -> Result<Vec<Object>, LabError> {
    let mut files = Vec::new();
    for p in paths {
        collect_files(p, &mut files)?;
    }
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| LabError::io(&f, e))?;
        let source = std::fs::canonicalize(&f)
            .unwrap_or_else(|_| f.clone())
            .display()
            .to_string();
        for raw in sluice_policy::split_documents(&source, &text)? {
            push_object(raw.value, &source, &mut out)?;
        }
    }
    Ok(out)
}

fn collect_files(p: &Path, out: &mut Vec<PathBuf>) -> Result<(), LabError> {
    let md = std::fs::metadata(p).map_err(|e| LabError::io(p, e))?;
    if md.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|e| LabError::io(p, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
            })
            .collect();
        entries.sort();
        out.extend(entries);
    } else {
        out.push(p.to_path_buf());
    }
    Ok(())
}

fn push_object(v: Value, source: &str, out: &mut Vec<Object>) -> Result<(), LabError> {
    let bad = |message: String| LabError::Manifest {
        file: source.to_string(),
        message,
    };
    let kind = v["kind"].as_str().unwrap_or_default().to_string();
    if kind == "Node" {
        return Ok(());
    }
    if !KINDS.contains(&kind.as_str()) {
        eprintln!("sluicectl lab: {source}: ignoring object of kind {kind:?}");
        return Ok(());
    }
    let name = v["metadata"]["name"]
        .as_str()
        .ok_or_else(|| bad(format!("a {kind} without metadata.name")))?
        .to_string();
    let namespace = if CLUSTER_SCOPED.contains(&kind.as_str()) {
        String::new()
    } else {
        v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string()
    };
    out.push(Object {
        key: ObjectKey {
            kind,
            namespace,
            name,
        },
        source: source.to_string(),
        value: v,
    });
    Ok(())
}

pub fn labels(v: &Value) -> BTreeMap<String, String> {
    v["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The container ports a Pod declares (protocol defaults to TCP, as in Kubernetes).
pub fn pod_ports(v: &Value, what: &str) -> Result<Vec<DeclaredPort>, LabError> {
    let mut ports = Vec::new();
    for c in v["spec"]["containers"].as_array().into_iter().flatten() {
        for p in c["ports"].as_array().into_iter().flatten() {
            let port = p["containerPort"]
                .as_u64()
                .filter(|n| (1..=65535).contains(n))
                .ok_or_else(|| LabError::Manifest {
                    file: what.to_string(),
                    message: format!("invalid containerPort {}", p["containerPort"]),
                })? as u16;
            let protocol = p["protocol"]
                .as_str()
                .unwrap_or("TCP")
                .parse::<Protocol>()
                .map_err(|message| LabError::Manifest {
                    file: what.to_string(),
                    message,
                })?;
            ports.push(DeclaredPort {
                port,
                protocol,
                name: p["name"].as_str().map(str::to_string),
            });
        }
    }
    ports.sort();
    ports.dedup_by(|a, b| a.port == b.port && a.protocol == b.protocol);
    Ok(ports)
}

/// One NodePort of a Service, as the kube-proxy stand-in needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePort {
    pub namespace: String,
    pub service: String,
    pub port_name: String,
    pub protocol: Protocol,
    pub node_port: u16,
    /// A number, or a container port name resolved per endpoint pod.
    pub target: TargetPort,
    pub local: bool,
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// The NodePorts of a `type: NodePort` Service. Other Service types are refused:
/// the lab's kube-proxy stand-in only does NodePort.
pub fn service_node_ports(o: &Object) -> Result<Vec<NodePort>, LabError> {
    let v = &o.value;
    let bad = |message: String| LabError::Manifest {
        file: o.source.clone(),
        message: format!("Service {}/{}: {message}", o.key.namespace, o.key.name),
    };
    let ty = v["spec"]["type"].as_str().unwrap_or("ClusterIP");
    if ty != "NodePort" {
        return Err(bad(format!(
            "type {ty} is not supported by the lab (NodePort only)"
        )));
    }
    let local = match v["spec"]["externalTrafficPolicy"]
        .as_str()
        .unwrap_or("Cluster")
    {
        "Cluster" => false,
        "Local" => true,
        other => return Err(bad(format!("externalTrafficPolicy {other:?}"))),
    };
    let selector: BTreeMap<String, String> = v["spec"]["selector"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for p in v["spec"]["ports"].as_array().into_iter().flatten() {
        let node_port = p["nodePort"]
            .as_u64()
            .filter(|n| (1..=65535).contains(n))
            .ok_or_else(|| bad("every port needs an explicit nodePort in the lab".into()))?
            as u16;
        let port = p["port"].as_u64().unwrap_or(0) as u16;
        let target = match &p["targetPort"] {
            Value::Number(n) => TargetPort::Number(n.as_u64().unwrap_or(0) as u16),
            Value::String(s) => match s.parse::<u16>() {
                Ok(n) => TargetPort::Number(n),
                Err(_) => TargetPort::Name(s.clone()),
            },
            _ => TargetPort::Number(port),
        };
        let protocol = p["protocol"]
            .as_str()
            .unwrap_or("TCP")
            .parse::<Protocol>()
            .map_err(bad)?;
        out.push(NodePort {
            namespace: o.key.namespace.clone(),
            service: o.key.name.clone(),
            port_name: p["name"].as_str().unwrap_or_default().to_string(),
            protocol,
            node_port,
            target,
            local,
            selector: selector.clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_and_lists_are_flattened_and_nodes_ignored() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: x}, spec: {containers: [{name: c, ports: [{containerPort: 80}, {containerPort: 81, protocol: UDP, name: dns}]}]}}
- {apiVersion: v1, kind: Node, metadata: {name: node-9}}
---
"#;
        let mut out = Vec::new();
        for raw in sluice_policy::split_documents("t.yaml", text).unwrap() {
            push_object(raw.value, "t.yaml", &mut out).unwrap();
        }
        let keys: Vec<String> = out.iter().map(|o| o.key.to_string()).collect();
        assert_eq!(keys, vec!["Namespace/x", "Pod/x/a"]);
        let ports = pod_ports(&out[1].value, "t").unwrap();
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[0].protocol, Protocol::Tcp);
        assert_eq!(ports[1].name.as_deref(), Some("dns"));
    }

    #[test]
    fn cluster_network_policies_are_kept_cluster_scoped() {
        let text = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: deny-all}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}}\n";
        let mut out = Vec::new();
        for raw in sluice_policy::split_documents("t.yaml", text).unwrap() {
            push_object(raw.value, "t.yaml", &mut out).unwrap();
        }
        let keys: Vec<String> = out.iter().map(|o| o.key.to_string()).collect();
        assert_eq!(keys, vec!["ClusterNetworkPolicy/deny-all"]);
    }

    #[test]
    fn nodeport_services_read_policy_and_named_target_ports() {
        let v: Value = serde_json::from_str(
            r#"{"apiVersion":"v1","kind":"Service",
          "metadata":{"name":"web","namespace":"foo"},
          "spec":{"type":"NodePort","externalTrafficPolicy":"Local","selector":{"app":"web"},
            "ports":[{"port":80,"targetPort":"http","nodePort":30080}]}}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        push_object(v, "s.json", &mut out).unwrap();
        let np = service_node_ports(&out[0]).unwrap();
        assert_eq!(np.len(), 1);
        assert!(np[0].local);
        assert_eq!(np[0].target, TargetPort::Name("http".into()));
        assert_eq!(np[0].node_port, 30080);
    }

    #[test]
    fn clusterip_services_are_refused_with_a_reason() {
        let v: Value = serde_json::from_str(r#"{"kind":"Service","metadata":{"name":"s","namespace":"d"},"spec":{"ports":[{"port":80}]}}"#).unwrap();
        let mut out = Vec::new();
        push_object(v, "s.json", &mut out).unwrap();
        let err = service_node_ports(&out[0]).unwrap_err().to_string();
        assert!(err.contains("NodePort only"), "{err}");
    }
}
