//! Shared by the `manifests_*` tests: find the repository, read YAML documents, and
//! parse them strictly into k8s-openapi types.
//!
//! Why strict parsing needs work: k8s-openapi's `Deserialize` impls skip fields they
//! do not know, so a misspelt key (`readinesProbe`, `tolerations` nested one level
//! too deep) parses fine and silently disappears — the API server would reject or
//! drop it only on a live cluster, which nothing here has. So every document is
//! round-tripped (YAML → typed object → JSON) and compared with the original; any
//! field the typed object dropped or changed is an error with its path.

#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The workspace root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

pub fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// One YAML document of a file, as plain JSON, with where it came from.
#[derive(Debug, Clone)]
pub struct Document {
    pub origin: String,
    pub value: Value,
}

/// Every non-empty document of a multi-document YAML text.
pub fn documents(origin: &str, text: &str) -> Vec<Document> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .enumerate()
        .map(|(i, de)| {
            let value = Value::deserialize(de)
                .unwrap_or_else(|e| panic!("{origin}: document {i} is not valid YAML: {e}"));
            (i, value)
        })
        .filter(|(_, v)| !v.is_null())
        .map(|(i, value)| Document {
            origin: format!("{origin}#{i}"),
            value,
        })
        .collect()
}

pub fn documents_of_file(rel: &str) -> Vec<Document> {
    documents(rel, &read(rel))
}

/// YAML files under `dir` (relative to the repository), sorted, recursively.
pub fn yaml_files_under(dir: &str) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let rel = path.strip_prefix(root).expect("under the root");
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let root = repo_root();
    let mut out = Vec::new();
    walk(&root, &root.join(dir), &mut out);
    out.sort();
    out
}

/// Parse `doc` into `T` and fail with every path the typed object does not
/// reproduce: unknown fields, misplaced fields, values of the wrong shape.
pub fn strict<T: DeserializeOwned + Serialize>(doc: &Document) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.value.clone())
        .map_err(|e| format!("{}: does not parse: {e}", doc.origin))?;
    let back = serde_json::to_value(&typed).expect("k8s-openapi types serialize");
    let mut differences = Vec::new();
    diff("", &doc.value, &back, &mut differences);
    if differences.is_empty() {
        Ok(typed)
    } else {
        Err(format!(
            "{}: fields not in the Kubernetes schema or changed by it:\n  {}",
            doc.origin,
            differences.join("\n  ")
        ))
    }
}

fn diff(path: &str, original: &Value, back: &Value, out: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(vb) => diff(&p, va, vb, out),
                    None => out.push(format!("{p}: unknown field (dropped by the schema)")),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{k}: added by the schema"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

/// The DaemonSet's spec. k8s-openapi's newest version feature made `DaemonSet.spec`
/// required where older ones have an `Option`; going through JSON keeps these tests
/// independent of which version feature the crate enables.
pub fn daemonset_spec(ds: &DaemonSet) -> DaemonSetSpec {
    let json = serde_json::to_value(ds).expect("serialize");
    serde_json::from_value(json["spec"].clone()).expect("the DaemonSet has a spec")
}

/// The DaemonSet's pod template spec.
pub fn pod_spec(ds: &DaemonSet) -> PodSpec {
    daemonset_spec(ds)
        .template
        .spec
        .expect("the DaemonSet has a pod template spec")
}

/// The object kinds sluice's manifests and the kind e2e fixtures may contain.
#[derive(Debug, Clone)]
pub enum Object {
    CustomResourceDefinition(Box<CustomResourceDefinition>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    ConfigMap(Box<ConfigMap>),
    DaemonSet(Box<DaemonSet>),
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    Deployment(Box<Deployment>),
    Service(Box<Service>),
    NetworkPolicy(Box<NetworkPolicy>),
}

/// Parse a document strictly into the type its `apiVersion` and `kind` name.
pub fn parse_object(doc: &Document) -> Result<Object, String> {
    let api_version = doc.value["apiVersion"].as_str().unwrap_or_default();
    let kind = doc.value["kind"].as_str().unwrap_or_default();
    Ok(match (api_version, kind) {
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            Object::CustomResourceDefinition(Box::new(strict(doc)?))
        }
        ("v1", "ServiceAccount") => Object::ServiceAccount(Box::new(strict(doc)?)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            Object::ClusterRole(Box::new(strict(doc)?))
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(Box::new(strict(doc)?))
        }
        ("v1", "ConfigMap") => Object::ConfigMap(Box::new(strict(doc)?)),
        ("apps/v1", "DaemonSet") => Object::DaemonSet(Box::new(strict(doc)?)),
        ("v1", "Namespace") => Object::Namespace(Box::new(strict(doc)?)),
        ("v1", "Pod") => Object::Pod(Box::new(strict(doc)?)),
        ("apps/v1", "Deployment") => Object::Deployment(Box::new(strict(doc)?)),
        ("v1", "Service") => Object::Service(Box::new(strict(doc)?)),
        ("networking.k8s.io/v1", "NetworkPolicy") => Object::NetworkPolicy(Box::new(strict(doc)?)),
        (a, k) => return Err(format!("{}: unexpected object {a}/{k}", doc.origin)),
    })
}

/// The install bundle, parsed: every document of `manifests/sluice.yaml`.
pub struct Bundle {
    pub objects: Vec<Object>,
}

impl Bundle {
    pub fn load() -> Bundle {
        let objects = documents_of_file("manifests/sluice.yaml")
            .iter()
            .map(|d| parse_object(d).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        Bundle { objects }
    }

    pub fn daemonset(&self) -> &DaemonSet {
        let all: Vec<_> = self
            .objects
            .iter()
            .filter_map(|o| match o {
                Object::DaemonSet(d) => Some(d.as_ref()),
                _ => None,
            })
            .collect();
        assert_eq!(all.len(), 1, "sluice.yaml holds exactly one DaemonSet");
        all[0]
    }

    pub fn config_map(&self, namespace: &str, name: &str) -> Option<&ConfigMap> {
        self.objects.iter().find_map(|o| match o {
            Object::ConfigMap(c)
                if c.metadata.name.as_deref() == Some(name)
                    && c.metadata.namespace.as_deref() == Some(namespace) =>
            {
                Some(c.as_ref())
            }
            _ => None,
        })
    }

    pub fn cluster_roles(&self) -> impl Iterator<Item = &ClusterRole> {
        self.objects.iter().filter_map(|o| match o {
            Object::ClusterRole(r) => Some(r.as_ref()),
            _ => None,
        })
    }

    pub fn cluster_role_bindings(&self) -> impl Iterator<Item = &ClusterRoleBinding> {
        self.objects.iter().filter_map(|o| match o {
            Object::ClusterRoleBinding(r) => Some(r.as_ref()),
            _ => None,
        })
    }

    pub fn service_accounts(&self) -> impl Iterator<Item = &ServiceAccount> {
        self.objects.iter().filter_map(|o| match o {
            Object::ServiceAccount(s) => Some(s.as_ref()),
            _ => None,
        })
    }

    pub fn crds(&self) -> impl Iterator<Item = &CustomResourceDefinition> {
        self.objects.iter().filter_map(|o| match o {
            Object::CustomResourceDefinition(c) => Some(c.as_ref()),
            _ => None,
        })
    }
}
