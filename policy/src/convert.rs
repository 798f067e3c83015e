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
    ContainerPort, IpBlock, Labels, Namespace, NamespaceScope, NetworkPolicy, Node, Peer, Peers,
    Pod, PodPeer, PolicyPort, PolicyType, PolicyTypes, PortMatch, Ports, Protocol, Rule,
};
use crate::selector::{LabelSelector, Operator, Requirement};

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

#[derive(Deserialize)]
struct RawRequirement {
    key: String,
    operator: String,
    #[serde(default)]
    values: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSelector {
    #[serde(default)]
    match_labels: Option<Labels>,
    #[serde(default)]
    match_expressions: Option<Vec<RawRequirement>>,
}

fn selector(field: &str, raw: RawSelector) -> Result<LabelSelector, ConvertError> {
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
    pod_selector: Option<RawSelector>,
    #[serde(default)]
    namespace_selector: Option<RawSelector>,
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
        pod_selector: Option<RawSelector>,
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
