//! Which MTU a pod gets: the config's `mtu` when > 0; else the agent's MTU file
//! (docs/node-files.md); else, with no agent on this host yet, the default-route
//! device's MTU minus 20 (the IPIP header), logged so an operator sees the guess.

use std::path::Path;

use crate::error::PluginError;

/// IPIP adds a 20-byte outer IPv4 header.
pub const IPIP_OVERHEAD: u32 = 20;
/// When even the uplink is unknown (no default route).
pub const FALLBACK_LINK_MTU: u32 = 1500;

/// Where the MTU came from, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MtuSource {
    Config,
    File,
    Uplink(String),
    Fallback,
}

/// Decide the MTU. `read_file` reads the MTU file (NotFound → fall through);
/// `uplink` names the default-route device and its MTU.
pub fn resolve(
    configured: Option<u32>,
    mtu_file: &Path,
    read_file: impl FnOnce(&Path) -> std::io::Result<String>,
    uplink: impl FnOnce() -> Option<(String, u32)>,
) -> Result<(u32, MtuSource), PluginError> {
    if let Some(m) = configured {
        return Ok((m, MtuSource::Config));
    }
    match read_file(mtu_file) {
        Ok(s) => {
            let m: u32 = s.trim().parse().map_err(|_| PluginError::MtuFile {
                path: mtu_file.to_owned(),
                detail: format!("{:?} is not a number", s.trim()),
            })?;
            if !(68..=65535).contains(&m) {
                return Err(PluginError::MtuFile {
                    path: mtu_file.to_owned(),
                    detail: format!("{m} is out of range 68-65535"),
                });
            }
            Ok((m, MtuSource::File))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(match uplink() {
            Some((dev, m)) => (
                m.saturating_sub(IPIP_OVERHEAD).max(68),
                MtuSource::Uplink(dev),
            ),
            None => (FALLBACK_LINK_MTU - IPIP_OVERHEAD, MtuSource::Fallback),
        }),
        Err(e) => Err(PluginError::MtuFile {
            path: mtu_file.to_owned(),
            detail: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    fn missing(_: &Path) -> std::io::Result<String> {
        Err(Error::from(ErrorKind::NotFound))
    }

    #[test]
    fn config_wins_over_file_and_uplink() {
        let r = resolve(
            Some(1400),
            Path::new("/f"),
            |_| Ok("1300\n".into()),
            || Some(("eth0".into(), 9000)),
        );
        assert_eq!(r.unwrap(), (1400, MtuSource::Config));
    }

    #[test]
    fn file_wins_over_uplink() {
        let r = resolve(
            None,
            Path::new("/f"),
            |_| Ok("1430\n".into()),
            || Some(("eth0".into(), 9000)),
        );
        assert_eq!(r.unwrap(), (1430, MtuSource::File));
    }

    #[test]
    fn no_file_means_uplink_minus_20_or_1480() {
        let r = resolve(None, Path::new("/f"), missing, || {
            Some(("ens3".into(), 9000))
        });
        assert_eq!(r.unwrap(), (8980, MtuSource::Uplink("ens3".into())));
        let r = resolve(None, Path::new("/f"), missing, || None);
        assert_eq!(r.unwrap(), (1480, MtuSource::Fallback));
    }

    #[test]
    fn a_garbage_or_unreadable_file_is_an_error_not_a_guess() {
        for body in ["", "abc", "1e3", "10", "70000"] {
            let r = resolve(None, Path::new("/f"), |_| Ok(body.into()), || None);
            assert!(matches!(r, Err(PluginError::MtuFile { .. })), "{body:?}");
        }
        let r = resolve(
            None,
            Path::new("/f"),
            |_| Err(Error::from(ErrorKind::PermissionDenied)),
            || None,
        );
        assert!(matches!(r, Err(PluginError::MtuFile { .. })));
    }
}
