//! sluice's CNI library: the protocol (shared with `sluice-ipam`), delegation to an
//! IPAM plugin, and the host-side interface naming rule (shared with the agent).
//!
//! The plugin's kernel work (netlink, namespaces, sysctls) lives in the `sluice`
//! binary's own modules, so crates that link this library stay light.

pub mod delegate;
pub mod protocol;
pub mod veth;
