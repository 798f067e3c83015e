//! The contract between the processes on a node (docs/node-files.md): the CNI
//! binaries never talk to the agent or the API server on the ADD/DEL path, they read
//! and write files. Each side imports this crate, so a file's path, format and
//! timing are written down once:
//!
//! - [`paths`]: the default path of every shared file, and [`paths::NodePaths`].
//! - [`status`]: the agent status file, its refresh interval and its staleness rule.
//! - [`conflist`]: the conflist `install-cni` (and the lab) writes.
//! - [`ifname`]: the host-side interface naming rule (pure).
//! - [`atomic`]: the one crash-safe file replacement.
//! - [`local_api`]: the agent's node-local socket: its requests, answers, framing and
//!   the plugin's bounded client, and the pod address annotations.
//!
//! [`ifname`] is pure (the policy crate uses it); the rest does file I/O.

pub mod atomic;
pub mod conflist;
pub mod flows;
pub mod ifname;
pub mod local_api;
pub mod paths;
pub mod status;
