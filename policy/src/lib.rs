//! Kubernetes NetworkPolicy, exactly: the meaning (this crate's model, selectors and
//! reference evaluator) and its compilation to iptables and ipset text, or to one
//! nftables table. Pure: no I/O, no Kubernetes client; callers read files or watch
//! the API and hand in text/objects.
//!
//! - [`dataplane`]: the typed rule model of a node, the complete rule set the agent
//!   programs ([`dataplane::node`]) and the change planners ([`dataplane::plan`] for
//!   iptables and ipset, [`dataplane::nft_plan`] for nftables); [`compile`] fills in
//!   its policy part (per policy for iptables, the flat form of [`compile::flat`]
//!   for nftables), [`render`] turns it into kernel text.
//!
//! - [`model`]: the domain types (namespaces, pods, nodes, policies, [`Cluster`]).
//! - [`selector`]: label selectors.
//! - [`manifest`] + [`convert`]: kubectl-shaped YAML/JSON text → model objects; the
//!   one manifest reader of sluice (CLI, lab and agent), lenient or strict.
//! - [`evaluate`]: the reference evaluator (probe → verdict + reason).
//! - [`wire`]: the ClusterNetworkPolicy API's wire types, which the reader parses and
//!   the agent's CRD is generated from.
//!
//! ```
//! use sluice_policy::{Protocol, Verdict, evaluate::Probe, evaluate, parse_documents};
//!
//! let text = r#"
//! apiVersion: v1
//! kind: Pod
//! metadata: {name: web, namespace: shop, labels: {app: web}}
//! spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
//! status: {podIP: 10.244.1.5}
//! ---
//! apiVersion: networking.k8s.io/v1
//! kind: NetworkPolicy
//! metadata: {name: http-only, namespace: shop}
//! spec:
//!   podSelector: {matchLabels: {app: web}}
//!   ingress: [{ports: [{port: http}]}]
//! "#;
//! let cluster = parse_documents("example.yaml", text).unwrap().into_cluster();
//! let probe = |port| Probe {
//!     from: "ip:203.0.113.7".parse().unwrap(),
//!     to: "shop/web".parse().unwrap(),
//!     port,
//!     protocol: Protocol::Tcp,
//! };
//! // The named port `http` resolves to 8080 on the destination pod.
//! assert_eq!(evaluate(&cluster, &probe(8080)).unwrap().verdict, Verdict::Allow);
//! let denied = evaluate(&cluster, &probe(22)).unwrap();
//! assert_eq!(denied.verdict, Verdict::Deny);
//! assert!(denied.reason().contains("isolated by [shop/http-only]"));
//! ```

pub mod convert;
pub mod evaluate;
pub mod manifest;
pub mod model;
pub mod selector;
pub mod sources;
pub mod wire;

// The dataplane half: rule model, compiler, renderers, planner and the in-process
// classifier.
pub mod classify;
pub mod compile;
pub mod dataplane;
pub mod names;
pub mod render;
pub mod veth_names;

pub use convert::ClusterPolicyError;
pub use evaluate::{Endpoint, Evaluation, Probe, Verdict, evaluate};
pub use manifest::{
    ManifestError, Object, ObjectError, Parsed, RawObject, convert_objects, parse_documents,
    parse_value, read_documents, split_documents,
};
pub use model::{
    Action, Cluster, ClusterNetworkPolicy, ClusterPeer, ClusterRule, ContainerPort, IpBlock,
    Labels, LogAllowed, Namespace, NamespaceScope, NamespacedName, NetworkPolicy, Node, Peer,
    Peers, Pod, PodPeer, PolicyPort, PolicyType, PolicyTypes, PortMatch, Ports, Protocol,
    RejectedPolicy, Rule, Subject, Tier,
};
pub use selector::{LabelSelector, Operator, Requirement};
