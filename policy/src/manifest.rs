//! Manifest text → model objects: multi-document YAML, or JSON (one value, a stream of
//! values, or an array), in the shapes `kubectl get -o yaml|json` writes, including
//! `kind: List` (and `PodList`, …) with `items`.
//!
//! Pure over text: the caller reads files (sluicectl, the agent's directory datastore,
//! the lab) or serializes API objects to JSON (the agent's Kubernetes datastore) and
//! hands the text in with a name for messages.

use crate::convert::{self, ConvertError, ObjectMeta};
use crate::model::{Cluster, Namespace, NetworkPolicy, Node, Pod};

/// One object policy cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Node(Node),
    NetworkPolicy(NetworkPolicy),
}

/// What a text held: the objects in input order, and warnings (objects of kinds
/// policy does not use, which are skipped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub objects: Vec<Object>,
    pub warnings: Vec<String>,
}

impl Parsed {
    /// Adds every object to `cluster` (a later object with the same key replaces an
    /// earlier one, as a later `kubectl apply` would).
    pub fn add_to(&self, cluster: &mut Cluster) {
        for o in &self.objects {
            match o {
                Object::Namespace(n) => cluster.add_namespace(n.clone()),
                Object::Pod(p) => cluster.add_pod(p.clone()),
                Object::Node(n) => cluster.add_node(n.clone()),
                Object::NetworkPolicy(p) => cluster.add_policy(p.clone()),
            }
        }
    }

    pub fn into_cluster(self) -> Cluster {
        let mut c = Cluster::default();
        self.add_to(&mut c);
        c
    }
}

/// Why a text could not be read. Every variant names the source, and the object
/// when there is one.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{origin}: document {document}: {message}")]
    Syntax {
        origin: String,
        document: usize,
        message: String,
    },
    #[error("{origin}: {kind} {object}: {error}")]
    Object {
        origin: String,
        kind: String,
        object: String,
        // Boxed: keeps every Result in this module small. Not a `#[source]`: the
        // message already includes it, and error chains would print it twice.
        error: Box<ConvertError>,
    },
    #[error("{origin}: document {document}: not an object (expected apiVersion/kind/metadata)")]
    NotAnObject { origin: String, document: usize },
}

/// Parses `text` (named `origin` in messages, e.g. a file path) into objects.
pub fn parse_documents(origin: &str, text: &str) -> Result<Parsed, ManifestError> {
    let documents = split_documents(origin, text)?;
    let mut parsed = Parsed::default();
    for (i, doc) in documents.iter().enumerate() {
        // Documents are numbered from 1, as people count them in a file.
        collect(origin, i + 1, doc, &mut parsed)?;
    }
    Ok(parsed)
}

/// Like [`parse_documents`] for one already-decoded value (an object, a `List`, or an
/// array of them), e.g. an API object the agent serialized with serde_json.
pub fn parse_value(origin: &str, value: &serde_json::Value) -> Result<Parsed, ManifestError> {
    let mut parsed = Parsed::default();
    collect(origin, 1, value, &mut parsed)?;
    Ok(parsed)
}

fn split_documents(origin: &str, text: &str) -> Result<Vec<serde_json::Value>, ManifestError> {
    let trimmed = text.trim_start();
    let syntax = |document: usize, message: String| ManifestError::Syntax {
        origin: origin.to_string(),
        document,
        message,
    };
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        // JSON: one value or several concatenated (JSON lines).
        let mut docs = Vec::new();
        for (i, value) in serde_json::Deserializer::from_str(text)
            .into_iter::<serde_json::Value>()
            .enumerate()
        {
            docs.push(value.map_err(|e| syntax(i + 1, e.to_string()))?);
        }
        return Ok(docs);
    }
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde::Deserialize::deserialize(de)
            .map_err(|e: serde_yaml_ng::Error| syntax(i + 1, e.to_string()))?;
        docs.push(value);
    }
    Ok(docs)
}

fn collect(
    origin: &str,
    document: usize,
    value: &serde_json::Value,
    out: &mut Parsed,
) -> Result<(), ManifestError> {
    let object = match value {
        // `---` with nothing after it, or a comment-only document.
        serde_json::Value::Null => return Ok(()),
        serde_json::Value::Array(items) => {
            for item in items {
                collect(origin, document, item, out)?;
            }
            return Ok(());
        }
        serde_json::Value::Object(o) => o,
        _ => {
            return Err(ManifestError::NotAnObject {
                origin: origin.to_string(),
                document,
            });
        }
    };
    let kind = object.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let api_version = object
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or("");

    // `kubectl get pods -o yaml` writes `kind: List`; the API writes `PodList`.
    if kind == "List" || (kind.ends_with("List") && object.contains_key("items")) {
        if let Some(items) = object.get("items") {
            return collect(origin, document, items, out);
        }
        return Ok(());
    }

    let meta = object
        .get("metadata")
        .and_then(|m| serde::Deserialize::deserialize(m).ok())
        .unwrap_or_else(ObjectMeta::default);
    let fail = |error: ConvertError| ManifestError::Object {
        origin: origin.to_string(),
        kind: if kind.is_empty() {
            "object".to_string()
        } else {
            kind.to_string()
        },
        object: meta.display_name(),
        error: Box::new(error),
    };

    let converted = match (kind, api_version) {
        ("Namespace", "v1" | "") => Object::Namespace(convert::namespace(value).map_err(fail)?),
        ("Pod", "v1" | "") => Object::Pod(convert::pod(value).map_err(fail)?),
        ("Node", "v1" | "") => Object::Node(convert::node(value).map_err(fail)?),
        ("NetworkPolicy", v) if v.starts_with("networking.k8s.io/") || v.is_empty() => {
            Object::NetworkPolicy(convert::network_policy(value).map_err(fail)?)
        }
        ("", _) => {
            return Err(fail(ConvertError::Shape("kind is missing".into())));
        }
        _ => {
            out.warnings.push(format!(
                "{origin}: document {document}: ignoring {} {} {}",
                if api_version.is_empty() {
                    "?"
                } else {
                    api_version
                },
                kind,
                meta.display_name()
            ));
            return Ok(());
        }
    };
    out.objects.push(converted);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST_YAML: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata:
    name: x
    labels: {ns: x}
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: x, labels: {pod: a}}
  spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 80}]}]}
  status: {podIP: 10.244.1.2}
---
# a comment-only document
---
apiVersion: v1
kind: Service
metadata: {name: svc, namespace: x}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec:
  podSelector: {}
  ingress: []
"#;

    #[test]
    fn yaml_lists_and_documents_are_flattened_and_unknown_kinds_warned() {
        let parsed = parse_documents("t.yaml", LIST_YAML).unwrap();
        assert_eq!(parsed.objects.len(), 3);
        assert_eq!(parsed.warnings.len(), 1);
        assert!(
            parsed.warnings[0].contains("Service"),
            "{:?}",
            parsed.warnings
        );
        let c = parsed.into_cluster();
        assert_eq!(c.namespaces.len(), 1);
        assert_eq!(c.pods.len(), 1);
        assert_eq!(c.policies.len(), 1);
    }

    #[test]
    fn json_stream_and_array_both_parse() {
        let line = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n1"},"status":{"addresses":[{"type":"InternalIP","address":"192.168.0.1"},{"type":"Hostname","address":"n1"}]}}"#;
        let stream = format!("{line}\n{line}\n");
        assert_eq!(parse_documents("s", &stream).unwrap().objects.len(), 2);
        let array = format!("[{line}]");
        let parsed = parse_documents("a", &array).unwrap();
        let Object::Node(n) = &parsed.objects[0] else {
            panic!("expected a node")
        };
        assert_eq!(
            n.addresses,
            vec!["192.168.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
    }

    #[test]
    fn malformed_object_error_names_source_kind_and_object() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: foo}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - {}\n";
        let err = parse_documents("policies/bad.yaml", text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("policies/bad.yaml"), "{err}");
        assert!(err.contains("NetworkPolicy foo/bad"), "{err}");
        assert!(err.contains("spec.ingress[0].from[0]"), "{err}");
    }

    #[test]
    fn yaml_syntax_error_names_the_document() {
        let err = parse_documents("f.yaml", "kind: Pod\n---\nkind: [unclosed\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("f.yaml: document 2:"), "{err}");
    }
}
