//! `sluice-ipam`: the CNI IPAM plugin. Parses the CNI environment and config with
//! `sluice_cni_protocol`, runs the verb on [`NodeIpam`], prints the result or one
//! CNI error. All decisions live in the library ([`sluice_ipam::cni`] for the CNI
//! side, which the `sluice` plugin's in-process IPAM shares).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::Value;
use sluice_cni_protocol::{
    self as protocol, CniError, CniResult, Command, Env, ErrorCode, NetConf, Version,
};
use sluice_ipam::cni::{cni_error, settings};
use sluice_ipam::{AttachmentKey, NodeIpam};
fn main() {
    let mut stdin = Vec::new();
    let outcome = protocol::catch_panic(|| run(&mut stdin));
    let version = protocol::peek_version(&stdin).unwrap_or(Version::LATEST);
    protocol::finish(outcome, version);
}

fn run(stdin: &mut Vec<u8>) -> Result<Option<Value>, CniError> {
    let env = Env::from_process()?;
    if env.command == Command::Version {
        return Ok(Some(protocol::version_info()));
    }
    std::io::stdin().read_to_end(stdin).map_err(CniError::io)?;
    let conf = NetConf::parse(stdin)?;
    let log = EventLog::new(conf.raw.get("logFile").and_then(Value::as_str));
    let ipam = NodeIpam::new(settings(&conf, &env)?);
    let key = AttachmentKey::new(env.container_id(), env.ifname());

    let outcome = match env.command {
        Command::Add => {
            let requested = sluice_ipam::cni::requested(&env, &conf)?;
            ipam.add(&key, &conf.name, requested).map(|a| {
                log.event(format_args!(
                    "ADD {}/{} -> {} (block {}{})",
                    key.container_id,
                    key.ifname,
                    a.ip,
                    a.block,
                    if requested.is_some() {
                        ", requested"
                    } else {
                        ""
                    }
                ));
                Some(sluice_ipam::cni::add_result(ipam.settings(), a).render(conf.cni_version))
            })
        }
        Command::Del => ipam.del(&key).map(|released| {
            match released {
                Some(a) => log.event(format_args!(
                    "DEL {}/{} released {}",
                    key.container_id, key.ifname, a.ip
                )),
                None => log.event(format_args!(
                    "DEL {}/{}: held nothing",
                    key.container_id, key.ifname
                )),
            }
            None
        }),
        Command::Check => {
            let expected = expected_address(&conf)?;
            ipam.check(&key, expected).map(|_| None)
        }
        Command::Gc => match conf.valid_attachments()? {
            // No list means "I was told nothing", never "keep nothing".
            None => {
                log.event(format_args!(
                    "GC without cni.dev/valid-attachments: nothing released"
                ));
                Ok(None)
            }
            Some(list) => {
                let valid: BTreeSet<AttachmentKey> = list
                    .into_iter()
                    .map(|a| AttachmentKey::new(a.container_id, a.ifname))
                    .collect();
                ipam.gc(&conf.name, &valid).map(|released| {
                    for a in &released {
                        log.event(format_args!(
                            "GC released {} of {}/{}",
                            a.ip, a.key.container_id, a.key.ifname
                        ));
                    }
                    None
                })
            }
        },
        Command::Status => {
            return ipam.status().map(|()| None).map_err(|e| {
                let inner = cni_error(e);
                CniError::new(ErrorCode::PluginNotAvailable, inner.msg).with_details(format!(
                    "sluice-ipam error {}{}",
                    inner.code,
                    if inner.details.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", inner.details)
                    }
                ))
            });
        }
        Command::Version => unreachable!("handled above"),
    };
    outcome.map_err(|e| {
        let e = cni_error(e);
        log.event(format_args!(
            "{} {}/{} failed: {e}",
            env.command.as_str(),
            key.container_id,
            key.ifname
        ));
        e
    })
}

/// The address the runtime believes the attachment has (CHECK's prevResult).
fn expected_address(conf: &NetConf) -> Result<Option<std::net::Ipv4Addr>, CniError> {
    let Some(prev) = &conf.prev_result else {
        return Ok(None);
    };
    let prev = CniResult::parse(prev)?;
    Ok(prev.ips.iter().find_map(|ip| match ip.address.addr() {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }))
}

/// One line per event: to `logFile` when the config sets one, else to stderr (the
/// runtime's log). Never stdout, which carries the result.
struct EventLog {
    file: Option<PathBuf>,
}

impl EventLog {
    fn new(file: Option<&str>) -> EventLog {
        EventLog {
            file: file.filter(|f| !f.is_empty()).map(PathBuf::from),
        }
    }

    fn event(&self, what: std::fmt::Arguments<'_>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let line = format!("{now} sluice-ipam[{}]: {what}\n", std::process::id());
        let written = self.file.as_ref().is_some_and(|f| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
                .and_then(|mut f| f.write_all(line.as_bytes()))
                .is_ok()
        });
        if !written {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}
