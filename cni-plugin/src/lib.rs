//! sluice's CNI library: delegation to an IPAM plugin, and which identity names an
//! attachment's host interface. The CNI protocol is `sluice_cni_protocol` (shared
//! with `sluice-ipam`), re-exported as [`protocol`]; the naming rule and the node's
//! files are `sluice_node_files`.
//!
//! The plugin's kernel work (netlink, namespaces, sysctls) lives in the `sluice`
//! binary's own modules, so crates that link this library stay light.

pub mod delegate;
pub use sluice_cni_protocol as protocol;
pub mod veth;
