//! The one manifest reader: text → objects → model. Every caller goes through it:
//! `sluicectl policy check|render`, the lab (`sluicectl lab apply|delete`), the agent's
//! directory datastore, and the agent's Kubernetes datastore (which serializes its
//! typed API objects to JSON and converts them here, so the two backends cannot
//! disagree on meaning).
//!
//! Two steps, each usable alone:
//!
//! 1. [`split_documents`]: multi-document YAML, or JSON (one value, a stream of values,
//!    or an array), in the shapes `kubectl get -o yaml|json` writes, into
//!    [`RawObject`]s: `kind: List` (and `PodList`, …) expanded to its `items`,
//!    `metadata.managedFields` dropped. A document that is not YAML/JSON at all, or
//!    not an object, cannot be attributed to any object: that is an error naming the
//!    source and the document's number ([`ManifestError::Syntax`],
//!    [`ManifestError::NotAnObject`]). The lab stops here: it keeps objects whole.
//! 2. [`convert_objects`]: raw objects → model [`Object`]s, leniently. An object of a
//!    kind policy does not use is a warning. An object of a kind it uses that does not
//!    convert is reported by name ([`ObjectError`]: source, kind, namespace/name) and
//!    left out, except a NetworkPolicy: that one becomes [`Object::RejectedPolicy`]
//!    and lands in [`Cluster::rejected_policies`], where the agent holds the pods it
//!    selects fail-closed and the evaluator denies them, because dropping it would
//!    open traffic its author meant to close.
//!
//! [`read_documents`] is both steps (lenient). [`parse_documents`] and
//! [`parse_value`] are the strict form of the same reader, for tests and tools that
//! would rather stop at the first malformed object than hold pods.
//!
//! Pure over text: the caller reads files or watches the API.

use crate::convert::{self, ConvertError, ObjectMeta};
use crate::model::{
    Cluster, ClusterNetworkPolicy, Labels, Namespace, NamespacedName, NetworkPolicy, Node, Pod,
    RejectedPolicy,
};

/// One object policy cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Node(Node),
    NetworkPolicy(NetworkPolicy),
    /// A NetworkPolicy that did not convert, and what is still known of it; a
    /// ClusterNetworkPolicy when the key is [`NamespacedName::cluster_scoped`].
    RejectedPolicy(NamespacedName, RejectedPolicy),
    /// A `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy.
    ClusterNetworkPolicy(ClusterNetworkPolicy),
    /// A Node's `metadata.labels` (ClusterNetworkPolicy `nodes` peers select by them),
    /// right after its Node when it has any.
    NodeLabels(String, Labels),
}

impl Object {
    /// Adds the object to `cluster`, replacing the one of the same key (see
    /// [`Parsed::add_to`]). Touches nothing but that key's entries.
    pub fn add_to(&self, cluster: &mut Cluster) {
        match self {
            Object::Namespace(n) => cluster.add_namespace(n.clone()),
            Object::Pod(p) => cluster.add_pod(p.clone()),
            Object::Node(n) => {
                // Its labels, if any, follow it; a relabelled Node replaces them.
                cluster.node_labels.remove(&n.name);
                cluster.add_node(n.clone())
            }
            Object::NetworkPolicy(p) => cluster.add_policy(p.clone()),
            Object::RejectedPolicy(key, r) if key.is_cluster_scoped() => {
                cluster.reject_cluster_policy(&key.name, r.clone())
            }
            Object::RejectedPolicy(key, r) => cluster.reject_policy(key.clone(), r.clone()),
            Object::ClusterNetworkPolicy(p) => cluster.add_cluster_policy(p.clone()),
            Object::NodeLabels(node, labels) => {
                cluster.node_labels.insert(node.clone(), labels.clone());
            }
        }
    }
}

/// An object as read from a source, before conversion.
#[derive(Debug, Clone, PartialEq)]
pub struct RawObject {
    /// Where it came from, for messages: a file path, or e.g. `Kubernetes API`.
    pub origin: String,
    /// The document's number in its source, from 1 (items of a List share it).
    pub document: usize,
    /// The object, `metadata.managedFields` removed.
    pub value: serde_json::Value,
}

impl RawObject {
    /// An object that did not come from a text (an API object serialized to JSON).
    pub fn new(origin: impl Into<String>, mut value: serde_json::Value) -> Self {
        strip_managed_fields(&mut value);
        RawObject {
            origin: origin.into(),
            document: 1,
            value,
        }
    }

    /// `kind`, empty when missing.
    pub fn kind(&self) -> &str {
        self.value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
    }
}

/// What a source held: the objects in input order, warnings (objects of kinds policy
/// does not use, skipped), and the objects that did not convert.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub objects: Vec<Object>,
    pub warnings: Vec<String>,
    /// Every object of a kind policy uses that did not convert, in input order. A
    /// NetworkPolicy among them is also in `objects` as [`Object::RejectedPolicy`].
    pub rejected: Vec<ObjectError>,
}

impl Parsed {
    /// Adds every object to `cluster` (a later object with the same key replaces an
    /// earlier one, as a later `kubectl apply` would; a rejected policy replaces a good
    /// one of the same name and the other way round).
    pub fn add_to(&self, cluster: &mut Cluster) {
        for o in &self.objects {
            o.add_to(cluster);
        }
    }

    pub fn into_cluster(self) -> Cluster {
        let mut c = Cluster::default();
        self.add_to(&mut c);
        c
    }

    /// Appends what `other` read after what this one did.
    pub fn extend(&mut self, other: Parsed) {
        self.objects.extend(other.objects);
        self.warnings.extend(other.warnings);
        self.rejected.extend(other.rejected);
    }

    /// The strict form: the first object that did not convert is the error.
    pub fn strict(mut self) -> Result<Parsed, ManifestError> {
        if self.rejected.is_empty() {
            Ok(self)
        } else {
            Err(ManifestError::Object(Box::new(
                self.rejected.swap_remove(0),
            )))
        }
    }
}

/// One object that did not convert, named so an operator can find it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {kind} {object}: {error}")]
pub struct ObjectError {
    pub origin: String,
    pub document: usize,
    /// `kind`, or `object` when the object has none.
    pub kind: String,
    /// `namespace/name` or `name` as written; `?` for a missing name.
    pub object: String,
    // Not a `#[source]`: the message already includes it, and error chains would
    // print it twice.
    pub error: ConvertError,
}

impl ObjectError {
    /// Whether this is a NetworkPolicy whose pods are held rather than a dropped object.
    pub fn holds_pods(&self) -> bool {
        self.kind == "NetworkPolicy" || self.kind == "ClusterNetworkPolicy"
    }
}

/// Why a text could not be read. Every variant names the source.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not YAML/JSON: nothing in it can be attributed to an object.
    #[error("{origin}: document {document}: {message}")]
    Syntax {
        origin: String,
        document: usize,
        message: String,
    },
    /// Strict mode only: an object that did not convert.
    // Boxed: keeps every Result in this module small.
    #[error(transparent)]
    Object(Box<ObjectError>),
    #[error("{origin}: document {document}: not an object (expected apiVersion/kind/metadata)")]
    NotAnObject { origin: String, document: usize },
}

/// Reads `text` (named `origin` in messages, e.g. a file path), leniently: only a
/// document that is not YAML/JSON or not an object is an error.
pub fn read_documents(origin: &str, text: &str) -> Result<Parsed, ManifestError> {
    Ok(convert_objects(&split_documents(origin, text)?))
}

/// [`read_documents`], strict: a malformed object is an error too.
pub fn parse_documents(origin: &str, text: &str) -> Result<Parsed, ManifestError> {
    read_documents(origin, text)?.strict()
}

/// Like [`parse_documents`] for one already-decoded value (an object, a `List`, or an
/// array of them), e.g. an API object serialized with serde_json.
pub fn parse_value(origin: &str, value: &serde_json::Value) -> Result<Parsed, ManifestError> {
    let mut objects = Vec::new();
    expand(origin, 1, value.clone(), &mut objects)?;
    convert_objects(&objects).strict()
}

/// Splits `text` into objects: YAML documents (`---`) or JSON values, Lists expanded,
/// empty documents skipped, managed fields dropped.
pub fn split_documents(origin: &str, text: &str) -> Result<Vec<RawObject>, ManifestError> {
    let syntax = |document: usize, message: String| ManifestError::Syntax {
        origin: origin.to_string(),
        document,
        message,
    };
    let mut documents = Vec::new();
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        // JSON: one value or several concatenated (JSON lines).
        for (i, value) in serde_json::Deserializer::from_str(text)
            .into_iter::<serde_json::Value>()
            .enumerate()
        {
            documents.push(value.map_err(|e| syntax(i + 1, e.to_string()))?);
        }
    } else {
        for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let value: serde_json::Value = serde::Deserialize::deserialize(de)
                .map_err(|e: serde_yaml_ng::Error| syntax(i + 1, e.to_string()))?;
            documents.push(value);
        }
    }
    let mut out = Vec::new();
    for (i, value) in documents.into_iter().enumerate() {
        // Documents are numbered from 1, as people count them in a file.
        expand(origin, i + 1, value, &mut out)?;
    }
    Ok(out)
}

fn expand(
    origin: &str,
    document: usize,
    value: serde_json::Value,
    out: &mut Vec<RawObject>,
) -> Result<(), ManifestError> {
    match value {
        // `---` with nothing after it, or a comment-only document.
        serde_json::Value::Null => Ok(()),
        serde_json::Value::Array(items) => items
            .into_iter()
            .try_for_each(|item| expand(origin, document, item, out)),
        serde_json::Value::Object(mut object) => {
            let kind = object.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            // `kubectl get pods -o yaml` writes `kind: List`; the API writes `PodList`,
            // whose items carry no `kind` or `apiVersion` of their own (the list's
            // name them all), so they are filled in from it.
            if kind == "List" || (kind.ends_with("List") && object.contains_key("items")) {
                let item_type = (kind != "List").then(|| {
                    let api_version = object.get("apiVersion").cloned();
                    (kind.trim_end_matches("List").to_string(), api_version)
                });
                return match object.remove("items") {
                    Some(serde_json::Value::Array(mut items)) => {
                        if let Some((kind, api_version)) = item_type {
                            items
                                .iter_mut()
                                .filter_map(|i| i.as_object_mut())
                                .filter(|i| !i.contains_key("kind"))
                                .for_each(|i| {
                                    i.insert("kind".into(), kind.clone().into());
                                    if let Some(v) = &api_version {
                                        i.entry("apiVersion").or_insert_with(|| v.clone());
                                    }
                                });
                        }
                        expand(origin, document, serde_json::Value::Array(items), out)
                    }
                    Some(items) => expand(origin, document, items, out),
                    None => Ok(()),
                };
            }
            let mut value = serde_json::Value::Object(object);
            strip_managed_fields(&mut value);
            out.push(RawObject {
                origin: origin.to_string(),
                document,
                value,
            });
            Ok(())
        }
        _ => Err(ManifestError::NotAnObject {
            origin: origin.to_string(),
            document,
        }),
    }
}

/// `metadata.managedFields` is often most of an object's size; nothing reads it.
fn strip_managed_fields(value: &mut serde_json::Value) {
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
    }
}

/// Converts raw objects to model objects, leniently (see the module doc).
pub fn convert_objects<'a>(objects: impl IntoIterator<Item = &'a RawObject>) -> Parsed {
    let mut out = Parsed::default();
    for raw in objects {
        convert_one(raw, &mut out);
    }
    out
}

fn convert_one(raw: &RawObject, out: &mut Parsed) {
    let value = &raw.value;
    let kind = raw.kind();
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or("");
    let meta: ObjectMeta = value
        .get("metadata")
        .and_then(|m| serde::Deserialize::deserialize(m).ok())
        .unwrap_or_default();
    let failed = |error: ConvertError| ObjectError {
        origin: raw.origin.clone(),
        document: raw.document,
        kind: if kind.is_empty() {
            "object".to_string()
        } else {
            kind.to_string()
        },
        object: meta.display_name(),
        error,
    };

    let converted = match (kind, api_version) {
        ("Namespace", "v1" | "") => convert::namespace(value).map(Object::Namespace),
        ("Pod", "v1" | "") => convert::pod(value).map(Object::Pod),
        ("Node", "v1" | "") => match convert::node(value) {
            Ok(node) => {
                let labels = meta.labels.clone().unwrap_or_default();
                let name = node.name.clone();
                out.objects.push(Object::Node(node));
                if !labels.is_empty() {
                    out.objects.push(Object::NodeLabels(name, labels));
                }
                return;
            }
            Err(e) => Err(e),
        },
        ("ClusterNetworkPolicy", v) if v.starts_with("policy.networking.k8s.io/") => {
            match convert::cluster_network_policy(value) {
                Ok(p) => {
                    for field in &p.not_implemented {
                        out.warnings.push(format!(
                            "{}: ClusterNetworkPolicy {}: {field} is not implemented by sluice (matches nothing); the rest of the policy applies",
                            raw.origin, p.name
                        ));
                    }
                    Ok(Object::ClusterNetworkPolicy(p))
                }
                Err(error) => {
                    let (namespace_selector, pod_selector) =
                        convert::rejected_cluster_subject(value);
                    let name = meta
                        .name
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| "?".to_string());
                    out.objects.push(Object::RejectedPolicy(
                        NamespacedName::cluster_scoped(name),
                        RejectedPolicy {
                            reason: error.to_string(),
                            pod_selector,
                            namespace_selector,
                        },
                    ));
                    out.rejected.push(failed(error));
                    return;
                }
            }
        }
        ("NetworkPolicy", v) if v.starts_with("networking.k8s.io/") || v.is_empty() => {
            match convert::network_policy(value) {
                Ok(p) => Ok(Object::NetworkPolicy(p)),
                Err(error) => {
                    out.objects.push(rejected_policy(&meta, value, &error));
                    out.rejected.push(failed(error));
                    return;
                }
            }
        }
        ("", _) => Err(ConvertError::Shape("kind is missing".into())),
        _ => {
            out.warnings.push(format!(
                "{}: document {}: ignoring {} {} {}",
                raw.origin,
                raw.document,
                if api_version.is_empty() {
                    "?"
                } else {
                    api_version
                },
                kind,
                meta.display_name()
            ));
            return;
        }
    };
    // A bad opt-in to allow records is reported, never a reason to drop or hold
    // the object: the object applies, its allows are not logged.
    if converted.is_ok()
        && matches!(kind, "Namespace" | "NetworkPolicy" | "ClusterNetworkPolicy")
        && let Err(e) = convert::log_allowed(&meta)
    {
        out.warnings.push(format!(
            "{}: {kind} {}: {e}",
            raw.origin,
            meta.display_name()
        ));
    }
    match converted {
        Ok(object) => out.objects.push(object),
        Err(error) => out.rejected.push(failed(error)),
    }
}

/// What is still known of a NetworkPolicy that did not convert: its key (`?` for a
/// missing name, `default` for a missing namespace, as `kubectl apply` would place
/// it) and its pod selector, when that alone reads (`None` holds the namespace).
fn rejected_policy(meta: &ObjectMeta, value: &serde_json::Value, error: &ConvertError) -> Object {
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "?".to_string());
    let pod_selector = value
        .pointer("/spec/podSelector")
        .and_then(|s| convert::label_selector(s).ok());
    Object::RejectedPolicy(
        NamespacedName::new(convert::namespace_of(meta), name),
        RejectedPolicy {
            reason: error.to_string(),
            pod_selector,
            namespace_selector: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LogAllowed;

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
    fn the_log_allowed_annotation_is_read_on_all_three_kinds_and_a_bad_value_is_warned_not_fatal() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, annotations: {sluice.dev/log-allowed: "ingress"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, annotations: {sluice.dev/log-allowed: true}}
---
apiVersion: v1
kind: Namespace
metadata: {name: c, annotations: {sluice.dev/log-allowed: "yes", other: x}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: a, annotations: {sluice.dev/log-allowed: "egress"}}
spec: {podSelector: {}, egress: []}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: q, namespace: a, annotations: {sluice.dev/log-allowed: "Ingress"}}
spec: {podSelector: {}, ingress: []}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: cnp, annotations: {sluice.dev/log-allowed: "true"}}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  ingress: [{action: Accept, from: [{namespaces: {}}]}]
"#;
        let parsed = parse_documents("t.yaml", text).unwrap();
        // Kubernetes would refuse the bare `true`; a hand-written manifest means it.
        let bad: Vec<&String> = parsed.warnings.iter().collect();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad[0].contains("Namespace c")
                && bad[0].contains("sluice.dev/log-allowed: \"yes\" is not one of"),
            "{bad:?}"
        );
        assert!(bad[1].contains("NetworkPolicy a/q"), "{bad:?}");
        let c = parsed.into_cluster();
        let both = LogAllowed::parse("true").unwrap();
        assert_eq!(
            c.namespaces["a"].log_allowed,
            LogAllowed::parse("ingress").unwrap()
        );
        assert_eq!(c.namespaces["b"].log_allowed, both);
        // Ignored, not dropped: the object still applies.
        assert_eq!(c.namespaces["c"].log_allowed, LogAllowed::OFF);
        let key = |n: &str| NamespacedName::new("a", n);
        assert!(c.policies[&key("p")].log_allowed.egress);
        assert!(!c.policies[&key("p")].log_allowed.ingress);
        assert_eq!(c.policies[&key("q")].log_allowed, LogAllowed::OFF);
        assert_eq!(c.cluster_policies["cnp"].log_allowed, both);
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

    const BAD_POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}]\n";

    #[test]
    fn lenient_reading_rejects_a_bad_policy_by_name_and_keeps_its_selector() {
        let text = format!("{LIST_YAML}\n---\n{BAD_POLICY}");
        let parsed = read_documents("m.yaml", &text).unwrap();
        assert_eq!(parsed.rejected.len(), 1);
        let e = &parsed.rejected[0];
        assert!(e.holds_pods());
        assert_eq!(
            (e.kind.as_str(), e.object.as_str()),
            ("NetworkPolicy", "x/bad")
        );
        assert!(
            e.to_string()
                .starts_with("m.yaml: NetworkPolicy x/bad: spec.ingress[0]"),
            "{e}"
        );
        let c = parsed.clone().into_cluster();
        assert_eq!(c.pods.len(), 1, "the good objects are all there");
        let r = &c.rejected_policies[&NamespacedName::new("x", "bad")];
        assert!(r.reason.contains("except"), "{}", r.reason);
        assert_eq!(
            r.pod_selector,
            Some(crate::LabelSelector::from_labels([("app", "a")]))
        );
        // The strict form of the same reader refuses the text, naming the object.
        let err = parsed.strict().unwrap_err().to_string();
        assert!(err.contains("m.yaml: NetworkPolicy x/bad"), "{err}");
    }

    #[test]
    fn a_malformed_pod_is_reported_and_left_out_and_a_later_good_policy_replaces_a_rejected_one() {
        let text = format!(
            "{BAD_POLICY}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: x}}\nstatus: {{podIP: nope}}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: x}}\nspec: {{podSelector: {{}}}}\n"
        );
        let parsed = read_documents("m.yaml", &text).unwrap();
        let names: Vec<String> = parsed
            .rejected
            .iter()
            .map(|e| format!("{} {}", e.kind, e.object))
            .collect();
        assert_eq!(names, ["NetworkPolicy x/bad", "Pod x/p"]);
        assert_eq!(parsed.rejected[1].document, 2);
        let c = parsed.into_cluster();
        assert!(c.pods.is_empty());
        assert!(
            c.rejected_policies.is_empty(),
            "the fixed policy replaced the broken one"
        );
        assert_eq!(c.policies.len(), 1);
    }

    #[test]
    fn managed_fields_are_dropped_and_list_items_keep_their_document_number() {
        let text = "kind: Namespace\napiVersion: v1\nmetadata: {name: a}\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: b, managedFields: [{manager: kubectl}]}\n";
        let objects = split_documents("l.yaml", text).unwrap();
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[1].document, 2);
        assert!(objects[1].value["metadata"].get("managedFields").is_none());
        assert_eq!(objects[1].kind(), "Namespace");
    }

    #[test]
    fn items_of_an_api_list_take_their_kind_and_api_version_from_the_list() {
        // As the API server answers GET /apis/networking.k8s.io/v1/networkpolicies.
        let text = r#"{"kind": "NetworkPolicyList", "apiVersion": "networking.k8s.io/v1",
            "metadata": {"resourceVersion": "7"},
            "items": [{"metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}}}]}"#;
        let objects = split_documents("api", text).unwrap();
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].kind(), "NetworkPolicy");
        assert_eq!(objects[0].value["apiVersion"], "networking.k8s.io/v1");
        let parsed = convert_objects(&objects).strict().unwrap();
        assert_eq!(parsed.into_cluster().policies.len(), 1);
    }

    #[test]
    fn a_scalar_document_cannot_be_attributed_and_is_an_error() {
        let err = read_documents("f.yaml", "kind: Pod\n---\njust text\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("f.yaml: document 2: not an object"),
            "{err}"
        );
    }

    #[test]
    fn yaml_syntax_error_names_the_document() {
        let err = parse_documents("f.yaml", "kind: Pod\n---\nkind: [unclosed\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("f.yaml: document 2:"), "{err}");
    }
}
