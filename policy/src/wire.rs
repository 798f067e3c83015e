//! The wire types of `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy, and of
//! the `metav1.LabelSelector` every policy kind uses: what a manifest or the API
//! server holds, field for field, before any meaning is given to it.
//!
//! One set of types serves three readers. [`crate::convert`] deserializes every
//! ClusterNetworkPolicy (and every selector) through them and then validates and
//! converts to the model, with a named error per upstream rule; the agent's
//! Kubernetes datastore watches the same types (its `CustomResource` wrapper, in
//! `sluice-agent`, adds `metadata`); and the CRD in `manifests/crds/` is generated from
//! their JSON schema, so the schema the API server enforces is the one the reader
//! reads.
//!
//! Reference: kubernetes-sigs/network-policy-api, `apis/v1alpha2/clusternetworkpolicy_types.go`
//! (its kubebuilder markers and CEL rules) and the CRD generated from it
//! (`config/crd/experimental/`). Read there, written here.
//!
//! The fields stay lenient where the converter gives a named error (a tier or an action
//! is a `String`, not an enum, so "Middle" becomes `UnknownTier` rather than a serde
//! message), and the schema carries the constraint for the API server.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most lists of the API hold at most this many entries (rules per direction, peers
/// per rule, protocols per rule, CIDRs or domain names per peer).
pub const MAX_ITEMS: usize = 25;

/// Fields the wire type does not have, kept only so the converter can say that a
/// field of the other direction was used (`to` in an ingress rule, `networks` in an
/// ingress peer). Not part of the schema: the API server prunes such fields.
pub type Foreign = BTreeMap<String, serde_json::Value>;

/// `metav1.LabelSelector`. `{}` selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-map-type" = "atomic"))]
pub struct LabelSelector {
    /// Labels that must all be present with these values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub match_expressions: Option<Vec<LabelSelectorRequirement>>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LabelSelectorRequirement {
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub values: Option<Vec<String>>,
}

/// `spec` of a ClusterNetworkPolicy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterNetworkPolicySpec {
    /// `Admin` (evaluated before NetworkPolicy, cannot be overridden by it) or
    /// `Baseline` (evaluated only for pods no NetworkPolicy selects).
    #[schemars(extend("enum" = ["Admin", "Baseline"]))]
    pub tier: String,
    /// 0 to 1000; lower values are evaluated first within a tier.
    #[schemars(extend("minimum" = 0, "maximum" = 1000))]
    pub priority: i32,
    /// The pods the policy applies to (never host-networked ones).
    pub subject: ClusterNetworkPolicySubject,
    /// Ingress rules, evaluated in written order; at most 25.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 25))]
    pub ingress: Option<Vec<ClusterNetworkPolicyIngressRule>>,
    /// Egress rules, evaluated in written order; at most 25.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 25))]
    pub egress: Option<Vec<ClusterNetworkPolicyEgressRule>>,
}

/// `spec.subject`: exactly one of `namespaces` and `pods`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct ClusterNetworkPolicySubject {
    /// Every pod of the namespaces this selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    /// Pods this selects within the namespaces it selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

/// Pods matching `podSelector` in namespaces matching `namespaceSelector`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    /// Missing or `{}`: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Required upstream; `{}` selects every pod. (An `Option` so that a missing one
    /// is a named error rather than a serde message.)
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// One ingress rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterNetworkPolicyIngressRule {
    /// For observability; at most 100 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub name: Option<String>,
    /// `Accept`, `Deny` or `Pass`.
    #[schemars(extend("enum" = ["Accept", "Deny", "Pass"]))]
    pub action: String,
    /// Sources; 1 to 25, any of which matches.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(required, length(min = 1, max = 25))]
    pub from: Option<Vec<ClusterNetworkPolicyIngressPeer>>,
    /// Destination ports; missing matches every port of every protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub protocols: Option<Vec<ClusterNetworkPolicyProtocol>>,
    /// `to`, when someone wrote it here.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub foreign: Foreign,
}

/// One egress rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(self.to.exists(peer, has(peer.networks) || has(peer.nodes) || has(peer.domainNames)) && has(self.protocols) && self.protocols.exists(protocol, has(protocol.destinationNamedPort)))",
        "message": "networks, nodes and domainNames peers have no named ports: destinationNamedPort cannot be used with them"
    },
    {
        "rule": "self.action == 'Accept' || !self.to.exists(peer, has(peer.domainNames))",
        "message": "domainNames peers are only allowed in Accept rules"
    }
]))]
pub struct ClusterNetworkPolicyEgressRule {
    /// For observability; at most 100 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub name: Option<String>,
    /// `Accept`, `Deny` or `Pass`.
    #[schemars(extend("enum" = ["Accept", "Deny", "Pass"]))]
    pub action: String,
    /// Destinations; 1 to 25, any of which matches.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(required, length(min = 1, max = 25))]
    pub to: Option<Vec<ClusterNetworkPolicyEgressPeer>>,
    /// Destination ports; missing matches every port of every protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub protocols: Option<Vec<ClusterNetworkPolicyProtocol>>,
    /// `from`, when someone wrote it here.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub foreign: Foreign,
}

/// A source of an ingress rule: exactly one of `namespaces` and `pods`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct ClusterNetworkPolicyIngressPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    /// Egress-only peer forms (`nodes`, `networks`, `domainNames`), when someone
    /// wrote them here.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub foreign: Foreign,
}

/// A destination of an egress rule: exactly one of its fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct ClusterNetworkPolicyEgressPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    /// Every address of the nodes this selects (experimental upstream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelector>,
    /// 1 to 25 CIDRs, IPv4 or IPv6; pod addresses inside them match too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 25),
        inner(length(max = 43)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub networks: Option<Vec<Cidr>>,
    /// 1 to 25 domain names, optionally `*.`-prefixed, only in Accept rules
    /// (experimental upstream; sluice does not implement it: it matches nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 25),
        inner(pattern(
            r"^(\*\.)?([A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?\.)+[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?\.?$"
        )),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub domain_names: Option<Vec<String>>,
}

/// An address range in CIDR notation, e.g. `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "isCIDR(self)", "message": "not a CIDR (expected e.g. 10.0.0.0/8 or fd00::/8)"}
]))]
pub struct Cidr(pub String);

/// One `protocols` entry: exactly one of `tcp`, `udp`, `sctp`, `destinationNamedPort`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct ClusterNetworkPolicyProtocol {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<ProtocolPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<ProtocolPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<ProtocolPort>,
    /// A container port's name on the destination pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

/// What a `tcp`, `udp` or `sctp` entry matches. Upstream has one Go type per
/// protocol with the same one field; one type here, since they cannot differ.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1))]
pub struct ProtocolPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<Port>,
}

/// A port number or a range: exactly one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct Port {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 1, "maximum" = 65535))]
    pub number: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<PortRange>,
}

/// `start..=end`, with `start < end`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.start < self.end", "message": "start must be less than end"}
]))]
pub struct PortRange {
    #[schemars(extend("minimum" = 1, "maximum" = 65535))]
    pub start: i32,
    #[schemars(extend("minimum" = 1, "maximum" = 65535))]
    pub end: i32,
}

/// `status`: conditions an implementation reports (`metav1.Condition`, a list keyed
/// by `type`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterNetworkPolicyStatus {
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// `metav1.Condition`, with the API's own validation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// CamelCase or `domain/CamelCase`, e.g. `Accepted`.
    #[serde(rename = "type")]
    #[schemars(
        length(max = 316),
        pattern(
            r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
        )
    )]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    #[schemars(extend("enum" = ["True", "False", "Unknown"]))]
    pub status: String,
    /// The `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0))]
    pub observed_generation: Option<i64>,
    /// RFC 3339.
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
    /// A CamelCase identifier.
    #[schemars(
        length(min = 1, max = 1024),
        pattern(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    )]
    pub reason: String,
    #[schemars(length(max = 32768))]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The agent serializes what it watched back to JSON for the reader: that must
    /// give back the object as written.
    #[test]
    fn a_spec_serializes_back_to_what_was_read() {
        let spec = json!({
            "tier": "Admin", "priority": 10,
            "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}},
            "ingress": [{"name": "r", "action": "Pass", "from": [{"namespaces": {"matchExpressions": [
                {"key": "tenant", "operator": "In", "values": ["a"]}]}}],
                "protocols": [{"destinationNamedPort": "http"}]}],
            "egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}, {"nodes": {}}],
                "protocols": [{"udp": {"destinationPort": {"range": {"start": 1, "end": 9}}}}]}]
        });
        let typed: ClusterNetworkPolicySpec = serde_json::from_value(spec.clone()).unwrap();
        assert_eq!(serde_json::to_value(&typed).unwrap(), spec);
    }

    #[test]
    fn fields_of_the_other_direction_are_kept_for_the_converter_to_name() {
        let rule: ClusterNetworkPolicyIngressRule = serde_json::from_value(json!({
            "action": "Deny", "from": [{"pods": {"podSelector": {}}, "networks": ["10.0.0.0/8"]}],
            "to": [{"namespaces": {}}]
        }))
        .unwrap();
        assert!(rule.foreign.contains_key("to"));
        assert!(rule.from.unwrap()[0].foreign.contains_key("networks"));
    }
}
