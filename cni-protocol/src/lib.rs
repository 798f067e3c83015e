//! The CNI protocol, as the spec (0.3.1 – 1.1.0) defines it, with no I/O beyond
//! reading a lookup and writing to a given writer: environment ([`Env`]), network
//! config ([`NetConf`]), results ([`CniResult`], rendered per [`Version`]), errors
//! ([`CniError`], printed by [`CniError::write_to`]), VERSION ([`version_info`]),
//! GC's attachment list ([`NetConf::valid_attachments`]) and [`catch_panic`].
//!
//! Shared by the `sluice` plugin and the `sluice-ipam` plugin. A typical `main`:
//!
//! ```no_run
//! use sluice_cni_protocol::{self as protocol, Command, Env, NetConf, Version};
//! let mut stdin = Vec::new();
//! let outcome = protocol::catch_panic(|| {
//!     let env = Env::from_process()?;
//!     if env.command == Command::Version {
//!         return Ok(Some(protocol::version_info()));
//!     }
//!     std::io::Read::read_to_end(&mut std::io::stdin(), &mut stdin)
//!         .map_err(protocol::CniError::io)?;
//!     let conf = NetConf::parse(&stdin)?;
//!     // … do the verb …
//!     Ok(None)
//! });
//! let version = protocol::peek_version(&stdin).unwrap_or(Version::LATEST);
//! protocol::finish(outcome, version);
//! ```

pub mod codes;
mod config;
mod env;
mod error;
mod panic;
mod requested;
mod result;
mod version;

pub use codes::ErrorCode;
pub use config::{Attachment, IpamConf, MAX_NETWORK_NAME_LEN, NetConf, peek_version};
pub use env::{
    CniArgs, Command, Env, MAX_CONTAINER_ID_LEN, validate_container_id, validate_ifname,
};
pub use error::CniError;
pub use panic::catch_panic;
pub use requested::{requested_ips, single_requested};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use version::{SUPPORTED_VERSIONS, Version, version_info};

impl CniError {
    /// Reading stdin (or another pipe) failed: code 5.
    pub fn io(e: std::io::Error) -> CniError {
        CniError::new(ErrorCode::IoFailure, "I/O failure").with_details(e.to_string())
    }
}

/// Print the outcome of a verb the way the spec asks and exit: a JSON value (result
/// or VERSION info) on stdout and exit 0; nothing and exit 0 (DEL, CHECK, GC,
/// STATUS success); or one JSON error on stdout, stamped with `version`, and exit 1.
pub fn finish(outcome: Result<Option<serde_json::Value>, CniError>, version: Version) -> ! {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let code = match outcome {
        Ok(Some(v)) => {
            let ok = serde_json::to_writer(&mut out, &v).is_ok() && out.write_all(b"\n").is_ok();
            if ok { 0 } else { 1 }
        }
        Ok(None) => 0,
        Err(e) => {
            let _ = e.write_to(version, &mut out);
            1
        }
    };
    let _ = out.flush();
    std::process::exit(code)
}
