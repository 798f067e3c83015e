//! `sluice`, the CNI plugin: parse, dispatch to one verb, print. Single-threaded and
//! synchronous: it runs once per pod start and stop and must be quick.

mod agent_api;
mod commands;
mod config;
mod error;
mod ipam;
mod log;
mod mtu;
mod netns;
mod sysctl;
mod wiring;

use std::io::Read;

use serde_json::Value;
use sluice_cni::protocol::{
    self, CniError, Command, Env, ErrorCode, NetConf, Version, catch_panic, peek_version,
};

use crate::commands::Ctx;
use crate::config::PluginConf;
use crate::error::PluginError;
use crate::log::log;

fn main() {
    let mut stdin = Vec::new();
    let outcome = catch_panic(|| run(&mut stdin));
    if let Err(e) = &outcome {
        log!("{e}");
    }
    let version = peek_version(&stdin).unwrap_or(Version::LATEST);
    protocol::finish(outcome, version)
}

fn run(stdin: &mut Vec<u8>) -> Result<Option<Value>, CniError> {
    let started = std::time::Instant::now();
    // VERSION first and without touching stdin: podman calls it for every plugin
    // on every command, and it must have no side effects.
    if std::env::var("CNI_COMMAND").as_deref() == Ok("VERSION") {
        return Ok(Some(protocol::version_info()));
    }
    std::io::stdin().read_to_end(stdin).map_err(CniError::io)?;
    let env = Env::from_process()?;
    log::set_context(match env.command {
        c if c.is_per_attachment() => {
            format!("{} {}/{}", c.as_str(), env.container_id(), env.ifname())
        }
        c => c.as_str().to_owned(),
    });
    let conf = NetConf::parse(stdin)?;
    let plugin = PluginConf::from_raw(&conf.raw)?;
    if let Some(f) = &plugin.log_file {
        log::to_file(f);
    }
    allowed_in_version(env.command, conf.cni_version)?;
    let ctx = Ctx {
        env: &env,
        conf: &conf,
        plugin: &plugin,
    };
    let r: Result<Option<Value>, PluginError> = match env.command {
        Command::Add => commands::add::exec(&ctx).map(|result| {
            log_added(&env, &result, started);
            Some(result)
        }),
        Command::Del => commands::del::exec(&ctx).map(|()| None),
        Command::Check => commands::check::exec(&ctx).map(|()| None),
        Command::Status => commands::status::exec(&ctx).map(|()| None),
        Command::Gc => commands::gc::exec(&ctx).map(|()| None),
        Command::Version => Ok(Some(protocol::version_info())),
    };
    r.map_err(CniError::from)
}

/// One line per successful ADD, the last before the result is printed: what the
/// pod got and how long the plugin took. Its time is when ADD returned, to the
/// millisecond (`tests/e2e/measure-add-to-connect.sh` reads it as such).
fn log_added(env: &Env, result: &Value, started: std::time::Instant) {
    let pod = match (&env.args.k8s_pod_namespace, &env.args.k8s_pod_name) {
        (Some(ns), Some(name)) => format!("pod {ns}/{name}"),
        _ => "container".to_owned(),
    };
    let addresses: Vec<&str> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .collect();
    log!(
        "ADD done: {pod} has {} ({:.1} ms)",
        addresses.join(", "),
        started.elapsed().as_secs_f64() * 1000.0
    );
}

/// CHECK exists from 0.4.0, STATUS and GC from 1.1.0; a runtime asking for them in
/// an older version gets code 1, as the reference skeleton answers.
fn allowed_in_version(c: Command, v: Version) -> Result<(), CniError> {
    let ok = match c {
        Command::Check => v.has_check(),
        Command::Status | Command::Gc => v.has_status_and_gc(),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("{} is not part of CNI {v}", c.as_str()),
        ))
    }
}
