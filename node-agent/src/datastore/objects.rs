//! Kubernetes objects as JSON → the policy crate's [`Cluster`]. Both datastores end
//! here: the directory reads manifests into JSON values, the Kubernetes backend
//! serializes its typed objects to JSON, and this one path gives them meaning.

use serde_json::Value;
use sluice_policy::convert::{self, ConvertError};
use sluice_policy::{Cluster, LabelSelector, NamespacedName, RejectedPolicy};

/// The outcome of converting one batch of objects.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conversion {
    pub cluster: Cluster,
    /// Objects skipped because they are not usable at all (no name, unknown shape),
    /// as `kind/name: reason` lines for the log.
    pub skipped: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}: document {index}: {reason}")]
    Parse {
        file: String,
        index: usize,
        reason: String,
    },
}

/// Split a manifest file (JSON, or YAML with `---` separated documents) into objects,
/// expanding `kind: List` (what `kubectl get -o yaml` prints) and dropping
/// `metadata.managedFields`, which is large and means nothing to us.
pub fn parse_manifest_text(file: &str, text: &str) -> Result<Vec<Value>, ManifestError> {
    let mut docs = Vec::new();
    if text.trim_start().starts_with('{') || text.trim_start().starts_with('[') {
        let v: Value = serde_json::from_str(text).map_err(|e| ManifestError::Parse {
            file: file.into(),
            index: 0,
            reason: e.to_string(),
        })?;
        docs.push(v);
    } else {
        for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let v = <Value as serde::Deserialize>::deserialize(doc).map_err(|e| {
                ManifestError::Parse {
                    file: file.into(),
                    index,
                    reason: e.to_string(),
                }
            })?;
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    let mut out = Vec::new();
    for d in docs {
        expand(d, &mut out);
    }
    Ok(out)
}

fn expand(v: Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(items) => items.into_iter().for_each(|i| expand(i, out)),
        Value::Object(ref m)
            if m.get("kind")
                .and_then(Value::as_str)
                .is_some_and(|k| k.ends_with("List")) =>
        {
            if let Some(Value::Array(items)) = m.get("items") {
                items.iter().cloned().for_each(|i| expand(i, out));
            }
        }
        mut obj @ Value::Object(_) => {
            strip_managed_fields(&mut obj);
            out.push(obj);
        }
        _ => {}
    }
}

/// `metadata.managedFields` is often most of an object's size; nothing reads it.
pub fn strip_managed_fields(obj: &mut Value) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
}

fn str_at<'a>(v: &'a Value, path: &str) -> Option<&'a str> {
    v.pointer(path).and_then(Value::as_str)
}

/// Convert objects of every kind we care about with the policy crate's converters;
/// unknown kinds are ignored. An object that does not convert is skipped and named in
/// [`Conversion::skipped`], except a NetworkPolicy: that one is remembered as
/// rejected, because dropping it silently would open traffic it meant to close.
pub fn convert(objects: &[Value]) -> Conversion {
    let mut c = Conversion::default();
    for obj in objects {
        let kind = str_at(obj, "/kind").unwrap_or("");
        let name = str_at(obj, "/metadata/name").unwrap_or("?");
        let skip =
            |c: &mut Conversion, e: ConvertError| c.skipped.push(format!("{kind}/{name}: {e}"));
        match kind {
            "Namespace" => match convert::namespace(obj) {
                Ok(n) => c.cluster.add_namespace(n),
                Err(e) => skip(&mut c, e),
            },
            "Node" => match convert::node(obj) {
                Ok(n) => c.cluster.add_node(n),
                Err(e) => skip(&mut c, e),
            },
            "Pod" => {
                // Finished pods keep their IP in status but no longer own it: the
                // address may already belong to a new pod.
                if matches!(str_at(obj, "/status/phase"), Some("Succeeded" | "Failed")) {
                    continue;
                }
                match convert::pod(obj) {
                    Ok(p) => c.cluster.add_pod(p),
                    Err(e) => skip(&mut c, e),
                }
            }
            "NetworkPolicy" => match convert::network_policy(obj) {
                Ok(p) => c.cluster.add_policy(p),
                Err(e) => {
                    let namespace = str_at(obj, "/metadata/namespace").unwrap_or("default");
                    let pod_selector = obj.pointer("/spec/podSelector").and_then(selector_of);
                    c.cluster.rejected_policies.insert(
                        NamespacedName::new(namespace, name),
                        RejectedPolicy {
                            reason: e.to_string(),
                            pod_selector,
                        },
                    );
                }
            },
            _ => {}
        }
    }
    c
}

/// The pod selector of a policy that did not convert, read through the converter by
/// wrapping it in an otherwise empty policy; `None` when the selector itself is bad.
fn selector_of(selector: &Value) -> Option<LabelSelector> {
    let probe = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "selector-probe", "namespace": "default"},
        "spec": {"podSelector": selector, "policyTypes": ["Ingress"]}
    });
    convert::network_policy(&probe).ok().map(|p| p.pod_selector)
}
