//! Kubernetes objects → the policy crate's [`Cluster`], through the policy crate's one
//! manifest reader ([`sluice_policy::manifest`]). Both datastores end here: the
//! directory splits its files with [`parse_manifest_text`], the Kubernetes backend
//! serializes its typed objects to JSON ([`RawObject::new`]), and [`convert`] gives
//! them meaning, so the two backends and `sluicectl policy check` cannot disagree.

use std::collections::BTreeMap;

use sluice_node_files::local_api::AddressAnnotations;
use sluice_policy::manifest::{self, ManifestError, RawObject};
use sluice_policy::{Cluster, NamespacedName};

/// The outcome of converting one batch of objects.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conversion {
    pub cluster: Cluster,
    /// Objects left out because they do not convert (a Pod with a bad address, …),
    /// as `origin: Kind namespace/name: reason` lines for the log.
    pub skipped: Vec<String>,
    /// NetworkPolicies that do not convert, in the same form. They are in
    /// `cluster.rejected_policies`: the pods they select are held fail-closed.
    pub rejected: Vec<String>,
    /// Pods' address annotations, for the node-local API's `pod-annotations`.
    pub annotations: BTreeMap<NamespacedName, AddressAnnotations>,
    /// Objects that apply with an annotation of sluice's ignored (a bad
    /// `sluice.dev/log-allowed` value), as lines for the log.
    pub ignored_annotations: Vec<String>,
}

/// The reader's warnings about sluice's own annotations (the others, objects of
/// kinds policy does not use, are expected in a manifests directory: not logged).
fn ignored_annotations(parsed: &manifest::Parsed) -> Vec<String> {
    parsed
        .warnings
        .iter()
        .filter(|w| w.contains(sluice_policy::LogAllowed::ANNOTATION))
        .cloned()
        .collect()
}

/// Splits a manifest file (JSON, or YAML with `---` separated documents) into
/// objects. An error (a document that is not YAML/JSON, or not an object) names the
/// file and the document: nothing in such a document can be attributed to an object.
pub fn parse_manifest_text(file: &str, text: &str) -> Result<Vec<RawObject>, ManifestError> {
    manifest::split_documents(file, text)
}

/// Converts objects of every kind policy uses; other kinds are ignored.
pub fn convert(objects: &[RawObject]) -> Conversion {
    // Finished pods keep their IP in status but no longer own it: the address may
    // already belong to a new pod, and the node has nothing left to program for them.
    let parsed = manifest::convert_objects(objects.iter().filter(|o| !finished_pod(o)));
    let (rejected, skipped): (Vec<_>, Vec<_>) =
        parsed.rejected.iter().partition(|e| e.holds_pods());
    Conversion {
        ignored_annotations: ignored_annotations(&parsed),
        annotations: address_annotations(objects),
        skipped: skipped.iter().map(|e| e.to_string()).collect(),
        rejected: rejected.iter().map(|e| e.to_string()).collect(),
        cluster: parsed.into_cluster(),
    }
}

/// One source's objects converted, for [`sluice_policy::sources::Sources`]: what
/// [`convert`] does for all of them, with its messages for the log.
pub fn convert_source(objects: &[RawObject]) -> SourceConversion {
    let parsed = manifest::convert_objects(objects.iter().filter(|o| !finished_pod(o)));
    let (rejected, skipped): (Vec<_>, Vec<_>) =
        parsed.rejected.iter().partition(|e| e.holds_pods());
    SourceConversion {
        ignored_annotations: ignored_annotations(&parsed),
        annotations: address_annotations(objects),
        skipped: skipped.iter().map(|e| e.to_string()).collect(),
        rejected: rejected.iter().map(|e| e.to_string()).collect(),
        parsed,
    }
}

/// One source's part of a [`Conversion`].
#[derive(Debug, Clone, Default)]
pub struct SourceConversion {
    pub parsed: manifest::Parsed,
    pub skipped: Vec<String>,
    pub rejected: Vec<String>,
    pub annotations: BTreeMap<NamespacedName, AddressAnnotations>,
    pub ignored_annotations: Vec<String>,
}

/// The address annotations of every pod that has one: what the plugin asks the agent
/// for on ADD, so it must be there before the pod has an address.
fn address_annotations(objects: &[RawObject]) -> BTreeMap<NamespacedName, AddressAnnotations> {
    objects
        .iter()
        .filter(|o| o.kind() == "Pod")
        .filter_map(|o| {
            let meta = o.value.get("metadata")?;
            let a = AddressAnnotations::from_metadata(meta.get("annotations")?)?;
            let name = meta.get("name")?.as_str()?;
            let ns = meta
                .get("namespace")
                .and_then(|n| n.as_str())
                .unwrap_or("default");
            Some((NamespacedName::new(ns, name), a))
        })
        .collect()
}

fn finished_pod(o: &RawObject) -> bool {
    o.kind() == "Pod"
        && matches!(
            o.value.pointer("/status/phase").and_then(|p| p.as_str()),
            Some("Succeeded" | "Failed")
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy::NamespacedName;

    #[test]
    fn a_bad_policy_is_rejected_by_file_and_name_and_finished_pods_are_left_out() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: prod}\n\
                    spec: {podSelector: {matchLabels: {app: web}}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}]}]}\n\
                    ---\napiVersion: v1\nkind: Pod\nmetadata: {name: done, namespace: prod}\nstatus: {phase: Succeeded, podIP: 10.244.1.9}\n\
                    ---\napiVersion: v1\nkind: Pod\nmetadata: {name: odd, namespace: prod}\nstatus: {podIP: not-an-ip}\n";
        let conv = convert(&parse_manifest_text("m/p.yaml", text).unwrap());
        assert_eq!(conv.rejected.len(), 1);
        assert!(
            conv.rejected[0].starts_with("m/p.yaml: NetworkPolicy prod/bad: "),
            "{:?}",
            conv.rejected
        );
        assert!(
            conv.cluster
                .rejected_policies
                .contains_key(&NamespacedName::new("prod", "bad"))
        );
        assert_eq!(conv.skipped.len(), 1);
        assert!(
            conv.skipped[0].contains("Pod prod/odd"),
            "{:?}",
            conv.skipped
        );
        assert!(conv.cluster.pods.is_empty());
    }
}
