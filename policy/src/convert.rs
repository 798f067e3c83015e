//! Kubernetes API objects (as `kubectl get -o yaml|json` writes them) → the model.
//!
//! The serde mirror structs below hold only the fields policy needs; everything else
//! in an object is ignored. Conversion validates what the API server would have
//! validated where a wrong guess would change a verdict (a peer with no selector and
//! no ipBlock, an `except` outside its `cidr`, `endPort` with a named port, …): such an
//! object is an error, never a silent default.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::model::{
    Action, BadLogAllowed, ClusterNetworkPolicy, ClusterPeer, ClusterRule, ContainerPort, IpBlock,
    Labels, LogAllowed, Namespace, NamespaceScope, NetworkPolicy, Node, Peer, Peers, Pod, PodPeer,
    PolicyPort, PolicyType, PolicyTypes, PortMatch, Ports, Protocol, Rule, Subject, Tier,
};
use crate::selector::{LabelSelector, Operator, Requirement};
use crate::wire::{self, MAX_ITEMS};

/// Why one object could not be converted. The caller adds which source and object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("malformed object: {0}")]
    Shape(String),
    #[error("metadata.name is missing")]
    MissingName,
    #[error("{field}: unknown protocol {value:?} (expected TCP, UDP or SCTP)")]
    Protocol { field: String, value: String },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A ClusterNetworkPolicy breaking one of the upstream API's validation rules.
    #[error("{field}: {error}")]
    ClusterPolicy {
        field: String,
        error: ClusterPolicyError,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConvertError {
    ConvertError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// `metadata` of any object.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ObjectMeta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Option<Labels>,
    /// Any values: the API allows only strings, but a hand-written manifest's
    /// unquoted `true` must not make the whole object unreadable.
    #[serde(default)]
    pub annotations: Option<std::collections::BTreeMap<String, serde_json::Value>>,
}

impl ObjectMeta {
    /// `namespace/name` or `name`, for error messages; `?` when nameless.
    pub(crate) fn display_name(&self) -> String {
        let name = self.name.as_deref().unwrap_or("?");
        match &self.namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        }
    }
}

/// The object's [`LogAllowed::ANNOTATION`]: off when missing; a YAML boolean reads
/// as its text. A value that is not one of the annotation's words is an error the
/// reader reports as a warning (the object itself still applies, not logged).
pub(crate) fn log_allowed(meta: &ObjectMeta) -> Result<LogAllowed, BadLogAllowed> {
    let Some(value) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(LogAllowed::ANNOTATION))
    else {
        return Ok(LogAllowed::OFF);
    };
    match value {
        serde_json::Value::String(s) => LogAllowed::parse(s),
        serde_json::Value::Bool(b) => LogAllowed::parse(if *b { "true" } else { "false" }),
        other => Err(BadLogAllowed(other.to_string())),
    }
}

/// The namespace a namespaced object lives in: kubectl writes it; a hand-written
/// manifest without one lands in `default`, as `kubectl apply` would put it.
pub(crate) fn namespace_of(meta: &ObjectMeta) -> String {
    meta.namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

fn name_of(meta: &ObjectMeta) -> Result<String, ConvertError> {
    meta.name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(ConvertError::MissingName)
}

fn parse<'de, T: Deserialize<'de>>(value: &'de serde_json::Value) -> Result<T, ConvertError> {
    T::deserialize(value).map_err(|e| ConvertError::Shape(e.to_string()))
}

fn protocol(field: &str, value: Option<&str>) -> Result<Protocol, ConvertError> {
    match value {
        None => Ok(Protocol::Tcp),
        // The API server accepts only upper case; seed 003 shows people type `tcp`,
        // and accepting it loses nothing.
        Some(v) => v.parse().map_err(|_| ConvertError::Protocol {
            field: field.to_string(),
            value: v.to_string(),
        }),
    }
}

fn port_number(field: &str, n: i64) -> Result<u16, ConvertError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(field, format!("port {n} is outside 1..65535")))
}

// ---------------------------------------------------------------- Namespace

/// Converts a `v1/Namespace`.
pub fn namespace(object: &serde_json::Value) -> Result<Namespace, ConvertError> {
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        metadata: ObjectMeta,
    }
    let raw: Raw = parse(object)?;
    Ok(Namespace {
        name: name_of(&raw.metadata)?,
        log_allowed: log_allowed(&raw.metadata).unwrap_or_default(),
        labels: raw.metadata.labels.unwrap_or_default(),
    })
}

// ---------------------------------------------------------------- Pod

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawContainerPort {
    #[serde(default)]
    name: Option<String>,
    container_port: i64,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize)]
struct RawContainer {
    #[serde(default)]
    ports: Option<Vec<RawContainerPort>>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPodSpec {
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    host_network: Option<bool>,
    #[serde(default)]
    containers: Option<Vec<RawContainer>>,
}

#[derive(Deserialize)]
struct RawPodIp {
    ip: String,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPodStatus {
    #[serde(default)]
    phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Option<Vec<RawPodIp>>,
}

fn parse_ip(field: &str, text: &str) -> Result<IpAddr, ConvertError> {
    text.parse()
        .map_err(|_| invalid(field, format!("{text:?} is not an IP address")))
}

/// Converts a `v1/Pod`. A pod that has finished (phase Succeeded or Failed) keeps its
/// labels but loses its addresses: its IP may already belong to a new pod, and
/// upstream implementations stop treating it as an endpoint.
pub fn pod(object: &serde_json::Value) -> Result<Pod, ConvertError> {
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        metadata: ObjectMeta,
        #[serde(default)]
        spec: Option<RawPodSpec>,
        #[serde(default)]
        status: Option<RawPodStatus>,
    }
    let raw: Raw = parse(object)?;
    let spec = raw.spec.unwrap_or_default();
    let status = raw.status.unwrap_or_default();

    let mut ports = Vec::new();
    for (ci, container) in spec.containers.unwrap_or_default().into_iter().enumerate() {
        for (pi, p) in container.ports.unwrap_or_default().into_iter().enumerate() {
            let field = format!("spec.containers[{ci}].ports[{pi}]");
            ports.push(ContainerPort {
                name: p.name.filter(|n| !n.is_empty()),
                port: port_number(&field, p.container_port)?,
                protocol: protocol(&field, p.protocol.as_deref())?,
            });
        }
    }

    let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let mut ips: Vec<IpAddr> = Vec::new();
    if !finished {
        // podIPs is authoritative (dual-stack); podIP repeats its first entry.
        let texts = status
            .pod_ips
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.ip)
            .chain(status.pod_ip);
        for text in texts.filter(|t| !t.is_empty()) {
            let ip = parse_ip("status.podIPs", &text)?;
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }

    Ok(Pod {
        namespace: namespace_of(&raw.metadata),
        name: name_of(&raw.metadata)?,
        labels: raw.metadata.labels.unwrap_or_default(),
        ips,
        node: spec.node_name.filter(|n| !n.is_empty()),
        ports,
        host_network: spec.host_network.unwrap_or(false),
    })
}

// ---------------------------------------------------------------- Node

/// Converts a `v1/Node`: its InternalIP and ExternalIP addresses (Hostname and DNS
/// entries are not addresses a packet comes from).
pub fn node(object: &serde_json::Value) -> Result<Node, ConvertError> {
    #[derive(Deserialize)]
    struct RawAddress {
        #[serde(rename = "type")]
        kind: String,
        address: String,
    }
    #[derive(Default, Deserialize)]
    struct RawStatus {
        #[serde(default)]
        addresses: Option<Vec<RawAddress>>,
    }
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        metadata: ObjectMeta,
        #[serde(default)]
        status: Option<RawStatus>,
    }
    let raw: Raw = parse(object)?;
    let mut addresses = Vec::new();
    for a in raw.status.unwrap_or_default().addresses.unwrap_or_default() {
        if matches!(a.kind.as_str(), "InternalIP" | "ExternalIP") {
            let ip = parse_ip("status.addresses", &a.address)?;
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
    }
    Ok(Node {
        name: name_of(&raw.metadata)?,
        addresses,
    })
}

// ---------------------------------------------------------------- NetworkPolicy

fn selector(field: &str, raw: wire::LabelSelector) -> Result<LabelSelector, ConvertError> {
    let mut match_expressions = Vec::new();
    for (i, r) in raw
        .match_expressions
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let field = format!("{field}.matchExpressions[{i}]");
        let values: BTreeSet<String> = r.values.unwrap_or_default().into_iter().collect();
        let operator = match r.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(invalid(field, format!("{} needs values", r.operator)));
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(invalid(field, format!("{} takes no values", r.operator)));
            }
            "In" => Operator::In(values),
            "NotIn" => Operator::NotIn(values),
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => return Err(invalid(field, format!("unknown operator {other:?}"))),
        };
        match_expressions.push(Requirement {
            key: r.key,
            operator,
        });
    }
    Ok(LabelSelector {
        match_labels: raw.match_labels.unwrap_or_default(),
        match_expressions,
    })
}

/// Converts a `metav1.LabelSelector` on its own (`{}` selects everything), for callers
/// that hold a selector outside a policy (e.g. of a policy that failed to convert).
pub fn label_selector(value: &serde_json::Value) -> Result<LabelSelector, ConvertError> {
    selector("selector", parse(value)?)
}

#[derive(Deserialize)]
struct RawIpBlock {
    cidr: String,
    #[serde(default)]
    except: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPeer {
    #[serde(default)]
    pod_selector: Option<wire::LabelSelector>,
    #[serde(default)]
    namespace_selector: Option<wire::LabelSelector>,
    #[serde(default)]
    ip_block: Option<RawIpBlock>,
}

fn parse_net(field: &str, text: &str) -> Result<IpNet, ConvertError> {
    // `10.2.3.4` without a length is not valid upstream; `10.0.0.1/24` is (the host
    // bits are ignored), so normalise it.
    text.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| invalid(field, format!("{text:?} is not a CIDR")))
}

fn peer(field: &str, raw: RawPeer) -> Result<Peer, ConvertError> {
    match raw {
        RawPeer {
            ip_block: Some(block),
            pod_selector: None,
            namespace_selector: None,
        } => {
            let cidr = parse_net(&format!("{field}.ipBlock.cidr"), &block.cidr)?;
            let mut except = Vec::new();
            for (i, e) in block.except.unwrap_or_default().iter().enumerate() {
                let f = format!("{field}.ipBlock.except[{i}]");
                let net = parse_net(&f, e)?;
                // Upstream validation: each except must lie within the cidr.
                if !cidr.contains(&net) {
                    return Err(invalid(f, format!("{net} is not inside {cidr}")));
                }
                except.push(net);
            }
            except.sort();
            except.dedup();
            Ok(Peer::IpBlock(IpBlock { cidr, except }))
        }
        RawPeer {
            ip_block: Some(_), ..
        } => Err(invalid(
            field,
            "ipBlock cannot be combined with podSelector or namespaceSelector",
        )),
        RawPeer {
            pod_selector: None,
            namespace_selector: None,
            ..
        } => Err(invalid(
            field,
            "a peer needs podSelector, namespaceSelector or ipBlock (the API server rejects an empty peer)",
        )),
        RawPeer {
            pod_selector,
            namespace_selector,
            ..
        } => Ok(Peer::Pods(PodPeer {
            namespaces: match namespace_selector {
                None => NamespaceScope::PolicyNamespace,
                Some(s) => {
                    NamespaceScope::Matching(selector(&format!("{field}.namespaceSelector"), s)?)
                }
            },
            pods: match pod_selector {
                None => LabelSelector::everything(),
                Some(s) => selector(&format!("{field}.podSelector"), s)?,
            },
        })),
    }
}

/// `port` is an IntOrString.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawPortValue {
    Number(i64),
    Name(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPolicyPort {
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    port: Option<RawPortValue>,
    #[serde(default)]
    end_port: Option<i64>,
}

fn policy_port(field: &str, raw: RawPolicyPort) -> Result<PolicyPort, ConvertError> {
    let protocol = protocol(&format!("{field}.protocol"), raw.protocol.as_deref())?;
    let port = match (raw.port, raw.end_port) {
        (None, None) => PortMatch::All,
        (None, Some(_)) => return Err(invalid(field, "endPort needs a numeric port")),
        (Some(RawPortValue::Name(_)), Some(_)) => {
            return Err(invalid(field, "endPort cannot be used with a named port"));
        }
        (Some(RawPortValue::Number(n)), end) => {
            let start = port_number(&format!("{field}.port"), n)?;
            let end = match end {
                None => start,
                Some(e) => port_number(&format!("{field}.endPort"), e)?,
            };
            if end < start {
                return Err(invalid(
                    field,
                    format!("endPort {end} is below port {start}"),
                ));
            }
            PortMatch::Numbers { start, end }
        }
        (Some(RawPortValue::Name(name)), None) => {
            // An IANA service name has at least one letter; a quoted number such as
            // "80" would otherwise silently become a name that never matches.
            if name.is_empty() || !name.chars().any(|c| c.is_ascii_alphabetic()) {
                return Err(invalid(
                    format!("{field}.port"),
                    format!("{name:?} is neither a number nor a port name"),
                ));
            }
            PortMatch::Named(name)
        }
    };
    Ok(PolicyPort { protocol, port })
}

#[derive(Deserialize)]
struct RawRule {
    #[serde(default)]
    from: Option<Vec<RawPeer>>,
    #[serde(default)]
    to: Option<Vec<RawPeer>>,
    #[serde(default)]
    ports: Option<Vec<RawPolicyPort>>,
}

fn rule(field: &str, peers_key: &str, raw: RawRule) -> Result<Rule, ConvertError> {
    let (peers_raw, other) = if peers_key == "from" {
        (raw.from, raw.to)
    } else {
        (raw.to, raw.from)
    };
    if other.is_some() {
        let wrong = if peers_key == "from" { "to" } else { "from" };
        return Err(invalid(
            field,
            format!("{wrong} does not belong in this rule (use {peers_key})"),
        ));
    }
    let peers_raw = peers_raw.unwrap_or_default();
    let peers = if peers_raw.is_empty() {
        Peers::Any
    } else {
        Peers::Listed(
            peers_raw
                .into_iter()
                .enumerate()
                .map(|(i, p)| peer(&format!("{field}.{peers_key}[{i}]"), p))
                .collect::<Result<_, _>>()?,
        )
    };
    let ports_raw = raw.ports.unwrap_or_default();
    let ports = if ports_raw.is_empty() {
        Ports::Any
    } else {
        Ports::Listed(
            ports_raw
                .into_iter()
                .enumerate()
                .map(|(i, p)| policy_port(&format!("{field}.ports[{i}]"), p))
                .collect::<Result<_, _>>()?,
        )
    };
    Ok(Rule { peers, ports })
}

/// Converts a `networking.k8s.io/v1` NetworkPolicy.
pub fn network_policy(object: &serde_json::Value) -> Result<NetworkPolicy, ConvertError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct RawSpec {
        #[serde(default)]
        pod_selector: Option<wire::LabelSelector>,
        #[serde(default)]
        ingress: Option<Vec<RawRule>>,
        #[serde(default)]
        egress: Option<Vec<RawRule>>,
        #[serde(default)]
        policy_types: Option<Vec<String>>,
    }
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        metadata: ObjectMeta,
        spec: Option<RawSpec>,
    }
    let raw: Raw = parse(object)?;
    let spec = raw
        .spec
        .ok_or_else(|| ConvertError::Shape("spec is missing".into()))?;

    let pod_selector = match spec.pod_selector {
        Some(s) => selector("spec.podSelector", s)?,
        // A Go struct, not a pointer, upstream: a missing podSelector decodes as the
        // empty selector, i.e. every pod of the namespace (and is optional since 1.31).
        None => LabelSelector::everything(),
    };
    let rules = |key: &str, peers_key: &str, raw: Option<Vec<RawRule>>| {
        raw.unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, r)| rule(&format!("spec.{key}[{i}]"), peers_key, r))
            .collect::<Result<Vec<_>, _>>()
    };
    let ingress = rules("ingress", "from", spec.ingress)?;
    let egress = rules("egress", "to", spec.egress)?;

    let declared = match spec.policy_types {
        None => None,
        Some(types) => Some(
            types
                .iter()
                .map(|t| match t.as_str() {
                    "Ingress" => Ok(PolicyType::Ingress),
                    "Egress" => Ok(PolicyType::Egress),
                    other => Err(invalid(
                        "spec.policyTypes",
                        format!("unknown policy type {other:?}"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let policy_types = PolicyTypes::defaulted(declared.as_deref(), !egress.is_empty());

    Ok(NetworkPolicy {
        namespace: namespace_of(&raw.metadata),
        name: name_of(&raw.metadata)?,
        pod_selector,
        ingress,
        egress,
        policy_types,
        log_allowed: log_allowed(&raw.metadata).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn missing_from_and_empty_from_both_mean_any_peer() {
        for from in [json!(null), json!([])] {
            let mut rule = json!({"ports": [{"port": 80}]});
            if !from.is_null() {
                rule["from"] = from;
            }
            let p = network_policy(&json!({
                "metadata": {"name": "p", "namespace": "x"},
                "spec": {"podSelector": {}, "ingress": [rule]}
            }))
            .unwrap();
            assert_eq!(p.ingress[0].peers, Peers::Any);
        }
    }

    #[test]
    fn empty_ingress_list_and_empty_rule_differ() {
        let deny = network_policy(&json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": []}
        }))
        .unwrap();
        assert!(deny.ingress.is_empty());
        assert!(deny.policy_types.ingress && !deny.policy_types.egress);

        let allow = network_policy(&json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": [{}]}
        }))
        .unwrap();
        assert_eq!(allow.ingress, vec![Rule::allow_all()]);
    }

    #[test]
    fn policy_types_default_to_egress_only_when_egress_rules_exist() {
        let p = network_policy(&json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}, "egress": [{}]}
        }))
        .unwrap();
        assert_eq!(
            p.policy_types,
            PolicyTypes {
                ingress: true,
                egress: true
            }
        );
        let p = network_policy(&json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}, "egress": [], "policyTypes": ["Egress"]}
        }))
        .unwrap();
        assert_eq!(
            p.policy_types,
            PolicyTypes {
                ingress: false,
                egress: true
            }
        );
    }

    #[test]
    fn missing_pod_selector_selects_every_pod_like_an_empty_one() {
        let p = network_policy(&json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"policyTypes": ["Ingress"]}
        }))
        .unwrap();
        assert!(p.pod_selector.is_empty());
    }

    #[test]
    fn peer_with_both_selectors_is_one_anded_peer() {
        let p = network_policy(&json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "a"}}}
            ]}]}
        }))
        .unwrap();
        let Peers::Listed(peers) = &p.ingress[0].peers else {
            panic!("expected listed peers")
        };
        assert_eq!(peers.len(), 1);
        assert_eq!(
            peers[0],
            Peer::Pods(PodPeer {
                namespaces: NamespaceScope::Matching(LabelSelector::from_labels([("ns", "y")])),
                pods: LabelSelector::from_labels([("pod", "a")]),
            })
        );
    }

    #[test]
    fn invalid_peers_and_ports_are_errors_not_defaults() {
        let cases = [
            json!({"from": [{}]}),
            json!({"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}),
            json!({"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/24"]}}]}),
            json!({"ports": [{"port": "http", "endPort": 90}]}),
            json!({"ports": [{"port": 90, "endPort": 80}]}),
            json!({"ports": [{"port": "80"}]}),
            json!({"ports": [{"protocol": "ICMP"}]}),
            json!({"to": [{"podSelector": {}}]}),
        ];
        for rule in cases {
            let r = network_policy(&json!({
                "metadata": {"name": "p", "namespace": "x"},
                "spec": {"podSelector": {}, "ingress": [rule.clone()]}
            }));
            assert!(r.is_err(), "accepted {rule}");
        }
    }

    #[test]
    fn pod_reads_ips_ports_node_and_host_network() {
        let p = pod(&json!({
            "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"}},
            "spec": {"nodeName": "n1", "containers": [
                {"ports": [{"name": "serve-80-tcp", "containerPort": 80}]},
                {"ports": [{"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"}]}
            ]},
            "status": {"podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}]}
        }))
        .unwrap();
        assert_eq!(p.ips.len(), 2);
        assert_eq!(p.node.as_deref(), Some("n1"));
        assert!(!p.host_network);
        assert_eq!(
            p.resolve_named_port("serve-81-udp", Protocol::Udp),
            vec![81]
        );
        assert!(
            p.resolve_named_port("serve-81-udp", Protocol::Tcp)
                .is_empty()
        );
    }
}

// ---------------------------------------------------------------- ClusterNetworkPolicy

/// Each validation rule of `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy
/// (kubernetes-sigs/network-policy-api `apis/v1alpha2/clusternetworkpolicy_types.go`:
/// its kubebuilder markers and CEL rules), by name, so `policy check` and the agent
/// say which rule a policy breaks. The API server enforces these for objects it
/// stores; sluice checks them again because a file (or an older CRD) may not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterPolicyError {
    #[error("priority {0} is outside 0..=1000")]
    PriorityOutOfRange(i64),
    #[error("tier {0:?} is neither Admin nor Baseline")]
    UnknownTier(String),
    #[error("subject must set exactly one of namespaces and pods (has {0})")]
    SubjectForms(usize),
    #[error("{count} {direction} rules; at most 25 are allowed")]
    TooManyRules {
        direction: &'static str,
        count: usize,
    },
    #[error("rule name is {0} characters; at most 100 are allowed")]
    RuleNameTooLong(usize),
    #[error("action {0:?} is not Accept, Deny or Pass")]
    UnknownAction(String),
    #[error("{0} is missing or empty; a rule needs at least one peer")]
    EmptyPeers(&'static str),
    #[error("{count} peers; at most 25 are allowed")]
    TooManyPeers { count: usize },
    #[error("a peer must set exactly one of {allowed} (has {count})")]
    PeerForms { allowed: &'static str, count: usize },
    #[error("protocols is empty; leave it out to match every protocol")]
    EmptyProtocols,
    #[error("{count} protocols; at most 25 are allowed")]
    TooManyProtocols { count: usize },
    #[error(
        "a protocols entry must set exactly one of tcp, udp, sctp, destinationNamedPort (has {0})"
    )]
    ProtocolForms(usize),
    #[error("a named port cannot be given together with a port number in one protocols entry")]
    NamedPortWithNumber,
    #[error("{0} must set exactly one of number and range")]
    PortForms(&'static str),
    #[error("port {0} is outside 1..=65535")]
    PortOutOfRange(i64),
    #[error("port range start {start} must be less than end {end}")]
    PortRangeOrder { start: i64, end: i64 },
    #[error("networks/nodes/domainNames peers cannot be used with destinationNamedPort")]
    NamedPortWithNonPodPeer,
    #[error("{0:?} is not a CIDR")]
    BadCidr(String),
    #[error("networks is empty or has more than 25 CIDRs ({0})")]
    NetworksCount(usize),
    #[error("domainNames is empty or has more than 25 names ({0})")]
    DomainNamesCount(usize),
    #[error("{0:?} is not a domain name (optionally with a leading *.)")]
    BadDomainName(String),
    #[error("domainNames peers are only allowed in Accept rules")]
    DomainNamesNotAccept,
}

fn cnp_error(field: impl Into<String>, error: ClusterPolicyError) -> ConvertError {
    ConvertError::ClusterPolicy {
        field: field.into(),
        error,
    }
}

fn namespaced_pod(
    field: &str,
    raw: wire::NamespacedPod,
) -> Result<(LabelSelector, LabelSelector), ConvertError> {
    let namespaces = match raw.namespace_selector {
        None => LabelSelector::everything(),
        Some(s) => selector(&format!("{field}.namespaceSelector"), s)?,
    };
    let pods = match raw.pod_selector {
        None => return Err(invalid(field, "podSelector is required")),
        Some(s) => selector(&format!("{field}.podSelector"), s)?,
    };
    Ok((namespaces, pods))
}

/// The egress-only peer forms, by their wire names.
const EGRESS_ONLY_PEERS: [&str; 3] = ["nodes", "networks", "domainNames"];

/// An ingress peer as the egress peer it is a subset of, and how many egress-only
/// forms were written in it anyway (they are not in its wire type).
fn ingress_peer(
    raw: wire::ClusterNetworkPolicyIngressPeer,
) -> (wire::ClusterNetworkPolicyEgressPeer, usize) {
    let foreign = EGRESS_ONLY_PEERS
        .iter()
        .filter(|k| raw.foreign.contains_key(**k))
        .count();
    let peer = wire::ClusterNetworkPolicyEgressPeer {
        namespaces: raw.namespaces,
        pods: raw.pods,
        ..Default::default()
    };
    (peer, foreign)
}

fn cluster_peer(
    field: &str,
    ingress: bool,
    (raw, foreign): (wire::ClusterNetworkPolicyEgressPeer, usize),
    not_implemented: &mut Vec<String>,
) -> Result<ClusterPeer, ConvertError> {
    use ClusterPolicyError as E;
    let count = [
        raw.namespaces.is_some(),
        raw.pods.is_some(),
        raw.nodes.is_some(),
        raw.networks.is_some(),
        raw.domain_names.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count()
        + foreign;
    let allowed = if ingress {
        "namespaces, pods"
    } else {
        "namespaces, pods, nodes, networks, domainNames"
    };
    let egress_only =
        foreign > 0 || raw.nodes.is_some() || raw.networks.is_some() || raw.domain_names.is_some();
    if count != 1 || (ingress && egress_only) {
        return Err(cnp_error(field, E::PeerForms { allowed, count }));
    }
    if let Some(s) = raw.namespaces {
        return Ok(ClusterPeer::Namespaces(selector(
            &format!("{field}.namespaces"),
            s,
        )?));
    }
    if let Some(p) = raw.pods {
        let (namespaces, pods) = namespaced_pod(&format!("{field}.pods"), p)?;
        return Ok(ClusterPeer::Pods { namespaces, pods });
    }
    if let Some(s) = raw.nodes {
        return Ok(ClusterPeer::Nodes(selector(&format!("{field}.nodes"), s)?));
    }
    if let Some(nets) = raw.networks {
        let f = format!("{field}.networks");
        if nets.is_empty() || nets.len() > MAX_ITEMS {
            return Err(cnp_error(f, E::NetworksCount(nets.len())));
        }
        let mut out = Vec::new();
        for (i, wire::Cidr(n)) in nets.iter().enumerate() {
            let net = n
                .parse::<IpNet>()
                .map_err(|_| cnp_error(format!("{f}[{i}]"), E::BadCidr(n.clone())))?;
            out.push(net.trunc());
        }
        out.sort();
        out.dedup();
        return Ok(ClusterPeer::Networks(out));
    }
    let names = raw.domain_names.unwrap_or_default();
    let f = format!("{field}.domainNames");
    if names.is_empty() || names.len() > MAX_ITEMS {
        return Err(cnp_error(f, E::DomainNamesCount(names.len())));
    }
    for (i, n) in names.iter().enumerate() {
        if !is_domain_name(n) {
            return Err(cnp_error(format!("{f}[{i}]"), E::BadDomainName(n.clone())));
        }
    }
    not_implemented.push(f);
    Ok(ClusterPeer::DomainNames(names))
}

/// Upstream's `DomainName` pattern: dot-separated labels of letters, digits, `-`
/// and `_` (not at a label's ends), at least two labels, an optional leading `*.`
/// and trailing `.`.
fn is_domain_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    let name = name.strip_suffix('.').unwrap_or(name);
    let labels: Vec<&str> = name.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
        })
}

fn cluster_port(field: &str, raw: Option<wire::ProtocolPort>) -> Result<PortMatch, ConvertError> {
    use ClusterPolicyError as E;
    let Some(spec) = raw.and_then(|r| r.destination_port) else {
        return Ok(PortMatch::All);
    };
    let number = |n: i32| {
        u16::try_from(n)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| cnp_error(field, E::PortOutOfRange(i64::from(n))))
    };
    match (spec.number, spec.range) {
        (Some(n), None) => {
            let p = number(n)?;
            Ok(PortMatch::Numbers { start: p, end: p })
        }
        (None, Some(r)) => {
            let (start, end) = (number(r.start)?, number(r.end)?);
            if start >= end {
                return Err(cnp_error(
                    field,
                    E::PortRangeOrder {
                        start: i64::from(r.start),
                        end: i64::from(r.end),
                    },
                ));
            }
            Ok(PortMatch::Numbers { start, end })
        }
        _ => Err(cnp_error(field, E::PortForms("destinationPort"))),
    }
}

fn cluster_protocol(
    field: &str,
    raw: wire::ClusterNetworkPolicyProtocol,
) -> Result<Vec<PolicyPort>, ConvertError> {
    use ClusterPolicyError as E;
    let numbered = [raw.tcp.is_some(), raw.udp.is_some(), raw.sctp.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    let named = raw.destination_named_port.is_some();
    if named && numbered > 0 {
        return Err(cnp_error(field, E::NamedPortWithNumber));
    }
    if numbered + usize::from(named) != 1 {
        return Err(cnp_error(
            field,
            E::ProtocolForms(numbered + usize::from(named)),
        ));
    }
    if let Some(name) = raw.destination_named_port {
        if name.is_empty() || !name.chars().any(|c| c.is_ascii_alphabetic()) {
            return Err(invalid(
                format!("{field}.destinationNamedPort"),
                format!("{name:?} is not a port name"),
            ));
        }
        // A container port's name belongs to its protocol: one entry per protocol
        // matches the named port whatever protocol the container declares it with.
        return Ok(Protocol::ALL
            .iter()
            .map(|p| PolicyPort {
                protocol: *p,
                port: PortMatch::Named(name.clone()),
            })
            .collect());
    }
    let (protocol, port, key) = match (raw.tcp, raw.udp, raw.sctp) {
        (Some(t), _, _) => (Protocol::Tcp, Some(t), "tcp"),
        (_, Some(u), _) => (Protocol::Udp, Some(u), "udp"),
        (_, _, s) => (Protocol::Sctp, s, "sctp"),
    };
    let port = cluster_port(&format!("{field}.{key}.destinationPort"), port)?;
    Ok(vec![PolicyPort { protocol, port }])
}

/// A rule of either direction, as [`cluster_rule`] reads it.
struct RuleParts {
    name: Option<String>,
    action: String,
    /// `from` of an ingress rule or `to` of an egress rule, each peer with its count
    /// of egress-only forms written into an ingress peer.
    peers: Option<Vec<(wire::ClusterNetworkPolicyEgressPeer, usize)>>,
    protocols: Option<Vec<wire::ClusterNetworkPolicyProtocol>>,
    /// The other direction's peer list was written too (`to` in an ingress rule).
    other_direction: bool,
}

impl From<wire::ClusterNetworkPolicyIngressRule> for RuleParts {
    fn from(r: wire::ClusterNetworkPolicyIngressRule) -> Self {
        RuleParts {
            name: r.name,
            action: r.action,
            peers: r
                .from
                .map(|peers| peers.into_iter().map(ingress_peer).collect()),
            protocols: r.protocols,
            other_direction: r.foreign.contains_key("to"),
        }
    }
}

impl From<wire::ClusterNetworkPolicyEgressRule> for RuleParts {
    fn from(r: wire::ClusterNetworkPolicyEgressRule) -> Self {
        RuleParts {
            name: r.name,
            action: r.action,
            peers: r
                .to
                .map(|peers| peers.into_iter().map(|p| (p, 0)).collect()),
            protocols: r.protocols,
            other_direction: r.foreign.contains_key("from"),
        }
    }
}

fn cluster_rule(
    field: &str,
    ingress: bool,
    raw: RuleParts,
    not_implemented: &mut Vec<String>,
) -> Result<ClusterRule, ConvertError> {
    use ClusterPolicyError as E;
    if let Some(n) = &raw.name
        && n.chars().count() > 100
    {
        return Err(cnp_error(
            format!("{field}.name"),
            E::RuleNameTooLong(n.chars().count()),
        ));
    }
    let action = match raw.action.as_str() {
        "Accept" => Action::Accept,
        "Deny" => Action::Deny,
        "Pass" => Action::Pass,
        other => {
            return Err(cnp_error(
                format!("{field}.action"),
                E::UnknownAction(other.to_string()),
            ));
        }
    };
    let key = if ingress { "from" } else { "to" };
    let peers_raw = raw.peers;
    if raw.other_direction {
        return Err(invalid(
            field,
            format!(
                "{} does not belong in this rule (use {key})",
                if ingress { "to" } else { "from" }
            ),
        ));
    }
    let peers_raw = peers_raw.unwrap_or_default();
    if peers_raw.is_empty() {
        return Err(cnp_error(
            format!("{field}.{key}"),
            E::EmptyPeers(if ingress { "from" } else { "to" }),
        ));
    }
    if peers_raw.len() > MAX_ITEMS {
        return Err(cnp_error(
            format!("{field}.{key}"),
            E::TooManyPeers {
                count: peers_raw.len(),
            },
        ));
    }
    let peers = peers_raw
        .into_iter()
        .enumerate()
        .map(|(i, p)| cluster_peer(&format!("{field}.{key}[{i}]"), ingress, p, not_implemented))
        .collect::<Result<Vec<_>, _>>()?;
    let not_pod = |p: &ClusterPeer| {
        matches!(
            p,
            ClusterPeer::Nodes(_) | ClusterPeer::Networks(_) | ClusterPeer::DomainNames(_)
        )
    };
    if action != Action::Accept
        && peers
            .iter()
            .any(|p| matches!(p, ClusterPeer::DomainNames(_)))
    {
        return Err(cnp_error(format!("{field}.{key}"), E::DomainNamesNotAccept));
    }
    let ports = match raw.protocols {
        None => Ports::Any,
        Some(list) if list.is_empty() => {
            return Err(cnp_error(format!("{field}.protocols"), E::EmptyProtocols));
        }
        Some(list) if list.len() > MAX_ITEMS => {
            return Err(cnp_error(
                format!("{field}.protocols"),
                E::TooManyProtocols { count: list.len() },
            ));
        }
        Some(list) => {
            let has_named = list.iter().any(|p| p.destination_named_port.is_some());
            if has_named && peers.iter().any(not_pod) {
                return Err(cnp_error(field, E::NamedPortWithNonPodPeer));
            }
            let mut ports = Vec::new();
            for (i, p) in list.into_iter().enumerate() {
                ports.extend(cluster_protocol(&format!("{field}.protocols[{i}]"), p)?);
            }
            Ports::Listed(ports)
        }
    };
    Ok(ClusterRule {
        name: raw.name.filter(|n| !n.is_empty()),
        action,
        peers,
        ports,
    })
}

/// Converts a `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy, checking every
/// validation rule of the upstream API ([`ClusterPolicyError`]).
pub fn cluster_network_policy(
    object: &serde_json::Value,
) -> Result<ClusterNetworkPolicy, ConvertError> {
    use ClusterPolicyError as E;
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        metadata: ObjectMeta,
        spec: Option<serde_json::Value>,
    }
    let raw: Raw = parse(object)?;
    let name = name_of(&raw.metadata)?;
    let log_allowed = log_allowed(&raw.metadata).unwrap_or_default();
    let spec: wire::ClusterNetworkPolicySpec = match &raw.spec {
        None => return Err(ConvertError::Shape("spec is missing".into())),
        Some(s) => parse(s)?,
    };
    let tier = match spec.tier.as_str() {
        "Admin" => Tier::Admin,
        "Baseline" => Tier::Baseline,
        other => return Err(cnp_error("spec.tier", E::UnknownTier(other.to_string()))),
    };
    let priority = u16::try_from(spec.priority)
        .ok()
        .filter(|p| *p <= 1000)
        .ok_or_else(|| {
            cnp_error(
                "spec.priority",
                E::PriorityOutOfRange(i64::from(spec.priority)),
            )
        })?;
    let subject = match (spec.subject.namespaces, spec.subject.pods) {
        (Some(ns), None) => Subject::Namespaces(selector("spec.subject.namespaces", ns)?),
        (None, Some(p)) => {
            let (namespaces, pods) = namespaced_pod("spec.subject.pods", p)?;
            Subject::Pods { namespaces, pods }
        }
        (ns, p) => {
            let count = usize::from(ns.is_some()) + usize::from(p.is_some());
            return Err(cnp_error("spec.subject", E::SubjectForms(count)));
        }
    };
    let mut not_implemented = Vec::new();
    let mut rules = |ingress: bool, list: Option<Vec<RuleParts>>| {
        let direction = if ingress { "ingress" } else { "egress" };
        let list = list.unwrap_or_default();
        if list.len() > MAX_ITEMS {
            return Err(cnp_error(
                format!("spec.{direction}"),
                E::TooManyRules {
                    direction,
                    count: list.len(),
                },
            ));
        }
        list.into_iter()
            .enumerate()
            .map(|(i, r)| {
                cluster_rule(
                    &format!("spec.{direction}[{i}]"),
                    ingress,
                    r,
                    &mut not_implemented,
                )
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let ingress = rules(
        true,
        spec.ingress
            .map(|l| l.into_iter().map(RuleParts::from).collect()),
    )?;
    let egress = rules(
        false,
        spec.egress
            .map(|l| l.into_iter().map(RuleParts::from).collect()),
    )?;
    Ok(ClusterNetworkPolicy {
        name,
        tier,
        priority,
        subject,
        ingress,
        egress,
        not_implemented,
        log_allowed,
    })
}

/// What is still known of a ClusterNetworkPolicy that did not convert: its subject's
/// selectors, each `None` when it does not read (then all namespaces, or all pods
/// of the held namespaces, are held).
pub fn rejected_cluster_subject(
    value: &serde_json::Value,
) -> (Option<LabelSelector>, Option<LabelSelector>) {
    let sel = |ptr: &str| value.pointer(ptr).and_then(|s| label_selector(s).ok());
    match (
        value.pointer("/spec/subject/namespaces"),
        value.pointer("/spec/subject/pods"),
    ) {
        (Some(_), None) => (
            sel("/spec/subject/namespaces"),
            Some(LabelSelector::everything()),
        ),
        (None, Some(_)) => (
            sel("/spec/subject/pods/namespaceSelector").or_else(|| {
                // A missing namespaceSelector means every namespace.
                value
                    .pointer("/spec/subject/pods/namespaceSelector")
                    .is_none()
                    .then(LabelSelector::everything)
            }),
            sel("/spec/subject/pods/podSelector"),
        ),
        _ => (None, None),
    }
}
