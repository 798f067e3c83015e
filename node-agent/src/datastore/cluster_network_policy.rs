//! The `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy custom resource as the
//! agent watches it, and the CRD sluice ships for it
//! (`manifests/crds/clusternetworkpolicies.policy.networking.k8s.io.yaml`, generated
//! from this type and checked by `node-agent/tests/cnp_kube_datastore.rs`).
//!
//! The spec is the policy crate's wire type ([`sluice_policy::wire`]), the one the
//! manifest reader parses: this wrapper only adds what kube-rs needs (the object's
//! `metadata` and `status`, the group, version and names). It lives here rather than
//! in the policy crate because kube's `CustomResource` derive pulls in the Kubernetes
//! client types, which the pure policy crate does not depend on.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_policy::wire;

// The wrapper's doc comment is the CRD's description of `spec`.
/// What the policy selects and its ingress and egress rules.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "policy.networking.k8s.io",
    version = "v1alpha2",
    kind = "ClusterNetworkPolicy",
    plural = "clusternetworkpolicies",
    doc = "A cluster-wide network policy: the Admin tier, evaluated before NetworkPolicy, or the Baseline tier, after it.",
    shortname = "cnp",
    status = "wire::ClusterNetworkPolicyStatus",
    printcolumn = r#"{"name":"Tier","type":"string","jsonPath":".spec.tier"}"#,
    printcolumn = r#"{"name":"Priority","type":"string","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct ClusterNetworkPolicySpec(pub wire::ClusterNetworkPolicySpec);
