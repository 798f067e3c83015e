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

/// The one condition type the agent reports. Upstream defines no condition types for
/// v1alpha2 (only `metav1.Condition`, keyed by `type`), so the type and its reasons
/// are sluice's; `docs/cluster-network-policy.md` lists them.
pub const CONDITION_TYPE: &str = "Accepted";

/// The field manager of every agent's status write: one name, so the agents share
/// ownership of the condition instead of conflicting over it.
pub const FIELD_MANAGER: &str = "sluice-agent";

/// What the `Accepted` condition should say about a policy, computed only from the
/// object (spec and generation), so every agent reaches the same answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredCondition {
    /// `True` or `False`.
    pub status: &'static str,
    /// `Accepted`, `NotImplemented` or `Invalid`.
    pub reason: &'static str,
    pub message: String,
    /// The object's `metadata.generation`.
    pub observed_generation: Option<i64>,
}

/// The `Accepted` condition for a ClusterNetworkPolicy as read from the API (its
/// JSON, as the converter reads it): `True`/`Accepted` when sluice enforces all of
/// it; `True`/`NotImplemented` naming each field it does not implement
/// (`domainNames` peers, which match nothing) while the rest applies, as upstream
/// allows; `False`/`Invalid` with the named validation error when the policy breaks
/// one of the API's rules (its subject is then held fail-closed).
pub fn desired_condition(object: &serde_json::Value) -> DesiredCondition {
    let observed_generation = object
        .pointer("/metadata/generation")
        .and_then(|g| g.as_i64());
    let (status, reason, message) = match sluice_policy::convert::cluster_network_policy(object) {
        Err(e) => (
            "False",
            "Invalid",
            format!("{e}; the pods of its subject are held fail-closed"),
        ),
        Ok(p) if !p.not_implemented.is_empty() => (
            "True",
            "NotImplemented",
            format!(
                "not implemented, these peers match nothing: {}; the rest of the policy applies",
                p.not_implemented.join(", ")
            ),
        ),
        Ok(_) => ("True", "Accepted", "enforced by sluice".to_string()),
    };
    DesiredCondition {
        status,
        reason,
        message,
        observed_generation,
    }
}

/// The condition to write, or `None` when the object's status already says what
/// `desired` says (so repeated syncs, and every other agent, write nothing).
/// `lastTransitionTime` is kept while the condition's status is unchanged
/// (`metav1.Condition`'s meaning) and is `now` (RFC 3339) when it changes.
pub fn condition_update(
    current: Option<&wire::ClusterNetworkPolicyStatus>,
    desired: &DesiredCondition,
    now: &str,
) -> Option<wire::Condition> {
    let existing = current
        .into_iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.kind == CONDITION_TYPE);
    if let Some(c) = existing
        && c.status == desired.status
        && c.reason == desired.reason
        && c.message == desired.message
        && c.observed_generation == desired.observed_generation
    {
        return None;
    }
    let last_transition_time = match existing {
        Some(c) if c.status == desired.status && !c.last_transition_time.is_empty() => {
            c.last_transition_time.clone()
        }
        _ => now.to_string(),
    };
    Some(wire::Condition {
        kind: CONDITION_TYPE.to_string(),
        status: desired.status.to_string(),
        observed_generation: desired.observed_generation,
        last_transition_time,
        reason: desired.reason.to_string(),
        message: desired.message.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(egress: serde_json::Value, priority: i64) -> serde_json::Value {
        json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
               "metadata": {"name": "p", "generation": 3},
               "spec": {"tier": "Admin", "priority": priority,
                        "subject": {"namespaces": {}}, "egress": egress}})
    }

    fn accept_to(peers: serde_json::Value) -> serde_json::Value {
        json!([{"action": "Accept", "to": peers}])
    }

    #[test]
    fn a_policy_sluice_enforces_fully_is_accepted() {
        let d = desired_condition(&policy(accept_to(json!([{"networks": ["10.0.0.0/8"]}])), 1));
        assert_eq!((d.status, d.reason), ("True", "Accepted"));
        assert_eq!(d.observed_generation, Some(3));
    }

    #[test]
    fn domain_names_are_named_as_not_implemented_while_the_policy_stays_accepted() {
        let d = desired_condition(&policy(
            accept_to(json!([{"networks": ["10.0.0.0/8"]}, {"domainNames": ["example.com"]}])),
            1,
        ));
        assert_eq!((d.status, d.reason), ("True", "NotImplemented"));
        assert!(
            d.message.contains("spec.egress[0].to[1].domainNames"),
            "{}",
            d.message
        );
    }

    #[test]
    fn an_invalid_policy_is_not_accepted_and_the_error_is_named() {
        let d = desired_condition(&policy(json!([]), 5000));
        assert_eq!((d.status, d.reason), ("False", "Invalid"));
        assert!(d.message.starts_with("spec.priority: "), "{}", d.message);
        assert!(d.message.contains("5000"), "{}", d.message);
    }

    #[test]
    fn a_status_that_already_says_it_is_not_written_again() {
        let d = desired_condition(&policy(json!([]), 1));
        let first = condition_update(None, &d, "2026-01-01T00:00:00Z").unwrap();
        let status = wire::ClusterNetworkPolicyStatus {
            conditions: vec![first],
        };
        assert_eq!(
            condition_update(Some(&status), &d, "2026-01-02T00:00:00Z"),
            None
        );
    }

    #[test]
    fn the_transition_time_moves_only_when_the_condition_status_changes() {
        let old = wire::Condition {
            kind: CONDITION_TYPE.into(),
            status: "True".into(),
            observed_generation: Some(2),
            last_transition_time: "2026-01-01T00:00:00Z".into(),
            reason: "Accepted".into(),
            message: "enforced by sluice".into(),
        };
        let other = wire::Condition {
            kind: "Other".into(),
            ..old.clone()
        };
        let status = wire::ClusterNetworkPolicyStatus {
            conditions: vec![other, old],
        };
        let now = "2026-02-01T00:00:00Z";
        // A new generation, still accepted: same status, the time stays.
        let same = condition_update(
            Some(&status),
            &desired_condition(&policy(json!([]), 1)),
            now,
        );
        let same = same.expect("the generation changed");
        assert_eq!(same.last_transition_time, "2026-01-01T00:00:00Z");
        assert_eq!(same.observed_generation, Some(3));
        // Now invalid: the status flips, the time is now.
        let flipped = condition_update(
            Some(&status),
            &desired_condition(&policy(json!([]), 5000)),
            now,
        );
        assert_eq!(flipped.unwrap().last_transition_time, now);
    }
}
