//! Kubernetes NetworkPolicy, exactly: the meaning (this crate's model, selectors and
//! reference evaluator) and its compilation to iptables and ipset text. Pure: no I/O,
//! no Kubernetes client; callers read files or watch the API and hand in text/objects.
//!
//! - [`model`]: the domain types (namespaces, pods, nodes, policies, [`Cluster`]).
//! - [`selector`]: label selectors.
//! - [`manifest`] + [`convert`]: kubectl-shaped YAML/JSON text → model objects.
//! - [`evaluate`]: the reference evaluator (probe → verdict + reason).

pub mod convert;
pub mod evaluate;
pub mod manifest;
pub mod model;
pub mod selector;

// The dataplane half: rule model, renderers, diff and the in-process classifier.
pub mod classify;
pub mod compile;
pub mod diff;
pub mod names;
pub mod render;

pub use evaluate::{Endpoint, Evaluation, Probe, Verdict, evaluate};
pub use manifest::{ManifestError, Object, Parsed, parse_documents, parse_value};
pub use model::{
    Cluster, ContainerPort, IpBlock, Labels, Namespace, NamespaceScope, NamespacedName,
    NetworkPolicy, Node, Peer, Peers, Pod, PodPeer, PolicyPort, PolicyType, PolicyTypes, PortMatch,
    Ports, Protocol, Rule,
};
pub use selector::{LabelSelector, Operator, Requirement};
