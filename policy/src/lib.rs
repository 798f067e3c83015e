//! Kubernetes NetworkPolicy, exactly: the meaning (this crate's model, selectors and
//! reference evaluator) and its compilation to iptables and ipset text. Pure: no I/O,
//! no Kubernetes client; callers read files or watch the API and hand in text/objects.
//!
//! - [`model`]: the domain types (namespaces, pods, nodes, policies, [`Cluster`]).
//! - [`selector`]: label selectors.

pub mod model;
pub mod selector;

pub use model::{
    Cluster, ContainerPort, IpBlock, Labels, Namespace, NamespaceScope, NamespacedName,
    NetworkPolicy, Node, Peer, Peers, Pod, PodPeer, PolicyPort, PolicyType, PolicyTypes, PortMatch,
    Ports, Protocol, Rule,
};
pub use selector::{LabelSelector, Operator, Requirement};
