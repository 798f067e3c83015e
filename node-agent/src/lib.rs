//! sluice-agent: the node agent. It watches a datastore (Kubernetes or a directory of
//! manifests), computes the node's desired state (policy chains and ipsets, NAT, tunnel
//! and routes) and applies it atomically, exposing health, readiness and metrics.

pub mod dataplane;
