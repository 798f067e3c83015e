//! `sluice-ipam`: the CNI IPAM plugin. Parses the CNI environment and config with
//! `sluice_cni_protocol`, runs the verb on [`NodeIpam`], prints the result or one
//! CNI error. All decisions live in the library.
//!
//! The address is returned as a /32: a pod owns exactly one address and nothing is
//! on-link (the `sluice` plugin routes via 169.254.1.1), so handing a main plugin the
//! block prefix would wrongly suggest the whole block is reachable on the link.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;
use sluice_cni_protocol::{
    self as protocol, CniError, CniResult, Command, Env, ErrorCode, IpConfig, NetConf, Route,
    Version,
};
use sluice_ipam::{AttachmentKey, IpamConfig, IpamError, NodeIpam};

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
    let ipam_conf: IpamConfig = match conf.raw.get("ipam") {
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "invalid sluice-ipam configuration",
            )
            .with_details(e.to_string())
        })?,
        None => IpamConfig::default(),
    };
    let log = EventLog::new(conf.raw.get("logFile").and_then(Value::as_str));
    let node_from_args = env
        .args
        .other
        .iter()
        .find(|(k, _)| k == "K8S_NODE_NAME")
        .map(|(_, v)| v.as_str());
    let settings = ipam_conf
        .resolve(node_from_args, sluice_ipam::config::hostname)
        .map_err(|e| cni_error(IpamError::from(e)))?;
    let routes: Vec<Route> = settings
        .routes
        .iter()
        .map(|r| Route::new(r.dst, r.gw))
        .collect();
    let ipam = NodeIpam::new(settings);
    let key = AttachmentKey::new(env.container_id(), env.ifname());

    let outcome = match env.command {
        Command::Add => ipam.add(&key, &conf.name).map(|a| {
            log.event(format_args!(
                "ADD {}/{} -> {} (block {})",
                key.container_id, key.ifname, a.ip, a.block
            ));
            let result = CniResult {
                ips: vec![IpConfig {
                    address: IpNet::V4(Ipv4Net::from(a.ip)),
                    gateway: None,
                    interface: None,
                }],
                routes,
                ..CniResult::default()
            };
            Some(result.render(conf.cni_version))
        }),
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

/// The one place an IPAM error becomes a CNI error: the code from
/// [`IpamError::cni_code`], the full message (which says what to do) as `msg`, the
/// underlying cause as `details`.
fn cni_error(e: IpamError) -> CniError {
    let code = e.cni_code();
    let mut details = Vec::new();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        details.push(s.to_string());
        src = s.source();
    }
    CniError::new(code, e.to_string()).with_details(details.join(": "))
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
